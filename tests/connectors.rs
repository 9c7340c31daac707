//! Named connectors (`kloset store|source|destination …`, `@NAME`), `sync` between local stores
//! and `pkg list`, through the built binary.
//!
//! Every command runs with a cleared environment, `HOME` in a temporary directory and stdin
//! from /dev/null, so the configuration file is the test's own and no passphrase prompt can
//! appear. The SFTP forms are covered by tests/documented.rs against a real sshd.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_kloset");
const PASS: &str = "first passphrase";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Exit `code` with one `kloset: …` line on stderr mentioning each of `words`.
    fn fails(&self, code: i32, words: &[&str]) -> &Self {
        assert_eq!(
            self.code, code,
            "exit {} (want {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "want a one-line error:\n{}", self.stderr);
        assert!(lines[0].starts_with("kloset: "), "{}", lines[0]);
        for w in words {
            assert!(
                lines[0].contains(w),
                "{:?} does not mention {w:?}",
                lines[0]
            );
        }
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", self.stdout))
    }
}

/// A temporary HOME and working directory.
struct World {
    tmp: TempDir,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("home")).unwrap();
        fs::create_dir(tmp.path().join("work")).unwrap();
        World { tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_str().unwrap().to_string()
    }

    fn config(&self) -> PathBuf {
        self.path("home/.config/kloset/kloset.toml")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("HOME", self.path("home"))
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir(self.path("work"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .args(args);
        c
    }

    fn run_cmd(mut c: Command) -> Out {
        let o = c.output().expect("run kloset");
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "kloset panicked:\n{stderr}");
        Out {
            code: o.status.code().expect("exit code"),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr,
        }
    }

    /// `kloset ARGS` with no passphrase in the environment.
    fn bare(&self, args: &[&str]) -> Out {
        Self::run_cmd(self.cmd(args))
    }

    /// `kloset ARGS` with KLOSET_PASSPHRASE = [`PASS`].
    fn run(&self, args: &[&str]) -> Out {
        let mut c = self.cmd(args);
        c.env("KLOSET_PASSPHRASE", PASS);
        Self::run_cmd(c)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.run(args).ok().stdout.clone()
    }

    fn with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut c = self.cmd(args);
        for (k, v) in env {
            c.env(k, v);
        }
        Self::run_cmd(c)
    }
}

/// A small tree: two files, a nested directory, a 3 MB file of several chunks.
fn tree(root: &Path, seed: u32) {
    fs::create_dir_all(root.join("sub/deep")).unwrap();
    fs::write(root.join("a.txt"), format!("hello {seed}\n")).unwrap();
    fs::write(root.join("sub/b.txt"), b"same in every tree").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ seed as u8)
        .collect();
    fs::write(root.join("sub/deep/big.bin"), big).unwrap();
}

/// Relative path → content of every regular file under `root`.
fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn snapshot_count(w: &World, store: &str, env: &[(&str, &str)]) -> usize {
    let o = w.with_env(&["at", store, "ls"], env);
    o.ok();
    o.stdout.lines().count()
}

#[test]
fn connector_verbs_for_each_kind() {
    let w = World::new();
    for kind in ["store", "source", "destination"] {
        let loc = w.s(&format!("{kind}-dir"));
        w.ok(&[kind, "add", "one", &loc, "port=2222", "username=bob"]);
        w.ok(&[
            kind,
            "add",
            "two",
            "sftp://sftp-prod:/srv/data",
            "identity=/k1",
        ]);
        let ls = w.ok(&[kind, "ls"]);
        let lines: Vec<&str> = ls.lines().collect();
        assert_eq!(lines.len(), 2, "{ls}");
        assert!(
            lines[0].starts_with("one ") && lines[0].ends_with(&loc),
            "{ls}"
        );
        assert!(lines[1].starts_with("two ") && lines[1].ends_with("sftp://sftp-prod:/srv/data"));

        let show = w.ok(&[kind, "show", "one"]);
        assert_eq!(
            show,
            format!("location={loc}\nport=2222\nusername=bob\n"),
            "{kind}"
        );
        // set: replaces, moves, accumulates identities; `user` is `username`.
        w.ok(&[
            kind,
            "set",
            "one",
            "port=22",
            "user=alice",
            "identity=/k1",
            "identity=/k2",
        ]);
        w.ok(&[kind, "set", "one", "location=/elsewhere", "connections=8"]);
        let show = w.ok(&[kind, "show", "one"]);
        assert_eq!(
            show,
            "location=/elsewhere\nconnections=8\nidentity=/k1\nidentity=/k2\nport=22\nusername=alice\n"
        );
        w.ok(&[kind, "unset", "one", "identity", "port"]);
        let show = w.ok(&[kind, "show", "one"]);
        assert_eq!(show, "location=/elsewhere\nconnections=8\nusername=alice\n");
        w.ok(&[kind, "rm", "two"]);
        assert_eq!(w.ok(&[kind, "ls"]).lines().count(), 1);
    }
    // The three kinds are separate namespaces.
    assert!(w.ok(&["store", "show", "one"]).contains("/elsewhere"));
    w.ok(&["source", "rm", "one"]);
    w.ok(&["store", "show", "one"]);
    w.run(&["source", "show", "one"])
        .fails(1, &["no source named \"one\""]);

    // Store-only keys; the passphrase is never shown, and one replaces the other.
    w.ok(&["store", "set", "one", "passphrase=s3cret"]);
    let show = w.ok(&["store", "show", "one"]);
    assert!(
        show.contains("passphrase=********") && !show.contains("s3cret"),
        "{show}"
    );
    w.ok(&["store", "set", "one", "passphrase_cmd=cat /some/file"]);
    let show = w.ok(&["store", "show", "one"]);
    assert!(show.contains("passphrase_cmd=cat /some/file") && !show.contains("passphrase="));
    // Nothing to list is not an error.
    assert_eq!(w.ok(&["source", "ls"]), "");
}

#[test]
fn config_file_is_private_atomic_and_follows_xdg() {
    let w = World::new();
    w.ok(&["store", "add", "nas", "/backups", "passphrase=s3cret"]);
    let cfg = w.config();
    let mode = fs::metadata(&cfg).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the file can hold passphrases");
    let dir_mode = fs::metadata(cfg.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("[stores.nas]") && text.contains("location = \"/backups\""),
        "{text}"
    );
    // No temporary file is left behind.
    let names: Vec<String> = fs::read_dir(cfg.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    // A relative location is stored absolute, without `./`.
    w.ok(&["store", "add", "rel", "./here/s"]);
    assert_eq!(
        w.ok(&["store", "show", "rel"]),
        format!("location={}\n", w.s("work/here/s"))
    );

    // $XDG_CONFIG_HOME is honoured.
    let xdg = w.path("xdg");
    let o = w.with_env(
        &["source", "add", "web", "sftp://web1:/srv/www"],
        &[("XDG_CONFIG_HOME", xdg.to_str().unwrap())],
    );
    o.ok();
    assert!(xdg.join("kloset/kloset.toml").is_file());
    assert!(!fs::read_to_string(&cfg).unwrap().contains("web1"));

    // A hand-edited file with a typo is reported with the file and the key.
    fs::write(&cfg, "[stores.nas]\nlocation = \"/b\"\nprot = \"22\"\n").unwrap();
    w.run(&["at", "@nas", "ls"])
        .fails(2, &["kloset.toml", "prot"]);
    fs::write(&cfg, "this is not toml [").unwrap();
    w.run(&["store", "ls"]).fails(1, &["kloset.toml"]);
}

#[test]
fn bad_names_keys_locations_and_duplicates() {
    let w = World::new();
    w.ok(&["store", "add", "nas", &w.s("store")]);
    let before = fs::read(w.config()).unwrap();
    // Bad names.
    for name in ["", "@nas", "a b", "a/b", "ü", ".hidden"] {
        assert_eq!(
            w.run(&["store", "add", name, "/x"]).code,
            2,
            "name {name:?}"
        );
    }
    w.run(&["store", "add", "a b", "/x"])
        .fails(2, &["bad store name"]);
    // Unknown keys, store-only keys elsewhere, bad values, no `=`.
    w.run(&["store", "add", "x", "/x", "bogus=1"])
        .fails(2, &["unknown store key \"bogus\"", "passphrase_cmd"]);
    w.run(&["source", "add", "x", "/x", "passphrase=p"])
        .fails(2, &["unknown source key \"passphrase\""]);
    w.run(&["destination", "add", "x", "/x", "port=http"])
        .fails(2, &["port"]);
    w.run(&["store", "add", "x", "/x", "connections=0"])
        .fails(2, &["connections"]);
    w.run(&["store", "add", "x", "/x", "portless"])
        .fails(2, &["key=value"]);
    w.run(&["store", "add", "x", "/x", "location=/y"])
        .fails(2, &["location"]);
    // Malformed locations.
    for loc in [
        "sftp://",
        "sftp://host",
        "sftp://h:99999/x",
        "sftp://h/../x",
        "s3://bucket/x",
        "file://rel",
        "@nas",
    ] {
        w.run(&["store", "add", "x", loc])
            .fails(2, &["bad store location"]);
    }
    w.run(&["source", "add", "x", ""])
        .fails(2, &["bad source location"]);
    // Duplicates, and verbs on unknown names.
    w.run(&["store", "add", "nas", "/other"])
        .fails(1, &["already a store named \"nas\""]);
    w.run(&["store", "set", "nope", "port=22"])
        .fails(1, &["no store named \"nope\""]);
    w.run(&["store", "unset", "nope", "port"])
        .fails(1, &["no store named \"nope\""]);
    w.run(&["store", "rm", "nope"])
        .fails(1, &["no store named \"nope\""]);
    w.run(&["store", "show", "nope"])
        .fails(1, &["no store named \"nope\""]);
    w.run(&["store", "set", "nas", "bogus=1"])
        .fails(2, &["unknown store key"]);
    w.run(&["store", "set", "nas", "location=ftp://x/y"])
        .fails(2, &["bad store location"]);
    w.run(&["store", "unset", "nas", "bogus"])
        .fails(2, &["unknown store key"]);
    w.run(&["store", "unset", "nas", "location"])
        .fails(2, &["location"]);
    // Missing arguments are usage errors from the parser.
    assert_eq!(w.run(&["store", "add", "only-a-name"]).code, 2);
    assert_eq!(w.run(&["store", "set", "nas"]).code, 2);
    // None of these changed the file.
    assert_eq!(fs::read(w.config()).unwrap(), before);
    // An unknown @name where a store, source or destination goes.
    w.run(&["at", "@nope", "ls"])
        .fails(1, &["no store named \"nope\"", "nas"]);
    w.ok(&["at", "@nas", "create"]);
    w.run(&["at", "@nas", "backup", "@nope"])
        .fails(1, &["no source named \"nope\""]);
    fs::create_dir(w.path("d")).unwrap();
    w.ok(&["at", "@nas", "backup", &w.s("d")]);
    w.run(&["at", "@nas", "restore", "-to", "@nope", "latest"])
        .fails(1, &["no destination named \"nope\""]);
}

#[test]
fn named_connectors_in_use_and_passphrase_sources() {
    let w = World::new();
    tree(&w.path("data"), 1);
    let pass_file = w.path("pass");
    fs::write(&pass_file, "from the command\n").unwrap();
    w.ok(&[
        "store",
        "add",
        "nas",
        &w.s("store"),
        &format!("passphrase_cmd=cat {}", pass_file.display()),
    ]);
    w.ok(&["source", "add", "data", &w.s("data")]);
    w.ok(&["destination", "add", "out", &w.s("out")]);

    // No environment: the passphrase comes from passphrase_cmd, at create too.
    w.bare(&["at", "@nas", "create"]).ok();
    let id = w
        .bare(&["at", "@nas", "backup", "@data"])
        .ok()
        .stdout
        .trim()
        .to_string();
    assert_eq!(id.len(), 8);
    let ls = w.bare(&["at", "@nas", "ls"]).ok().stdout.clone();
    assert!(
        ls.contains(&w.s("data")),
        "the source is recorded by its location: {ls}"
    );
    w.bare(&["at", "@nas", "restore", "-to", "@out", &id]).ok();
    assert_eq!(files(&w.path("data")), files(&w.path("out")));
    w.bare(&["at", "@nas", "check"]).ok();
    // The same store by its path, with the passphrase in the environment.
    let o = w.with_env(
        &["at", &w.s("store"), "ls"],
        &[("KLOSET_PASSPHRASE", "from the command")],
    );
    o.ok();

    // The environment wins over the connector.
    w.with_env(&["at", "@nas", "ls"], &[("KLOSET_PASSPHRASE", "wrong")])
        .fails(4, &["wrong passphrase"]);
    let pf = w.path("pf");
    fs::write(&pf, "wrong\n").unwrap();
    w.with_env(
        &["at", "@nas", "ls"],
        &[("KLOSET_PASSPHRASE_FILE", pf.to_str().unwrap())],
    )
    .fails(4, &["wrong passphrase"]);
    // A literal passphrase key.
    w.ok(&["store", "set", "nas", "passphrase=from the command"]);
    w.bare(&["at", "@nas", "ls"]).ok();
    // A failing command is reported, not taken as an empty passphrase.
    w.ok(&["store", "set", "nas", "passphrase_cmd=exit 3"]);
    w.bare(&["at", "@nas", "ls"])
        .fails(1, &["passphrase_cmd of store nas failed"]);
    // No source of passphrase at all, and no terminal.
    w.ok(&["store", "unset", "nas", "passphrase_cmd"]);
    w.bare(&["at", "@nas", "ls"])
        .fails(1, &["no passphrase", "KLOSET_PASSPHRASE"]);

    // `-o` options override the connector's (a bad value shows it is applied).
    w.ok(&[
        "store",
        "add",
        "remote",
        "sftp://127.0.0.1:1/x",
        "connections=2",
    ]);
    w.run(&["-o", "connections=0", "at", "@remote", "ls"])
        .fails(2, &["connections"]);
}

#[test]
fn sync_to_from_with_and_idempotent() {
    let w = World::new();
    tree(&w.path("d1"), 1);
    tree(&w.path("d2"), 2);
    let (a, b) = (w.s("a"), w.s("b"));
    w.ok(&["at", &a, "create"]);
    w.ok(&["at", &b, "create"]);
    w.ok(&["at", &a, "backup", &w.s("d1")]);
    w.ok(&["at", &b, "backup", &w.s("d2")]);

    // to: a's snapshot goes to b.
    let r = w.run(&["at", &a, "sync", "-json", "to", &b]);
    let v = r.ok().json();
    assert_eq!(v["copied"], 1, "{v}");
    assert!(v["new_blobs"].as_u64().unwrap() > 0);
    assert_eq!(snapshot_count(&w, &b, &[("KLOSET_PASSPHRASE", PASS)]), 2);
    // Again: nothing.
    let v = w.run(&["at", &a, "sync", "-json", "to", &b]).ok().json();
    assert_eq!(
        (v["copied"].as_u64(), v["new_blobs"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    assert_eq!(v["already_present"], 1);

    // from: b's own snapshot comes to a; the summary says so on stderr.
    let o = w.run(&["at", &a, "sync", "from", &b]);
    o.ok();
    assert!(
        o.stderr.contains("1 snapshot(s) copied, 1 already there"),
        "{}",
        o.stderr
    );
    assert_eq!(snapshot_count(&w, &a, &[("KLOSET_PASSPHRASE", PASS)]), 2);

    // with: new snapshots on both sides cross over, both ways, once.
    fs::write(w.path("d1/a.txt"), b"changed on a").unwrap();
    fs::write(w.path("d2/a.txt"), b"changed on b").unwrap();
    w.ok(&["at", &a, "backup", &w.s("d1")]);
    w.ok(&["at", &b, "backup", &w.s("d2")]);
    let v = w.run(&["at", &a, "sync", "-json", "with", &b]).ok().json();
    assert_eq!(v["copied"], 2, "{v}");
    let dirs = v["directions"].as_array().unwrap();
    assert_eq!(dirs.len(), 2);
    assert_eq!(dirs[0]["copied"].as_array().unwrap().len(), 1);
    assert_eq!(dirs[1]["copied"].as_array().unwrap().len(), 1);
    // The changed small file was the only data blob read for each copy.
    assert_eq!(dirs[0]["blobs_read"], 1, "{v}");
    assert_eq!(dirs[1]["blobs_read"], 1, "{v}");
    assert_eq!(snapshot_count(&w, &a, &[("KLOSET_PASSPHRASE", PASS)]), 4);
    assert_eq!(snapshot_count(&w, &b, &[("KLOSET_PASSPHRASE", PASS)]), 4);
    let v = w.run(&["at", &a, "sync", "-json", "with", &b]).ok().json();
    assert_eq!(
        (v["copied"].as_u64(), v["already_present"].as_u64()),
        (Some(0), Some(8))
    );

    // Both stores check clean, and a copy restores to the original.
    w.ok(&["at", &a, "check"]);
    w.ok(&["at", &b, "check"]);
    let ls = w.ok(&["at", &b, "ls"]);
    let copy_of_d1 = ls
        .lines()
        .rfind(|l| l.contains(&w.s("d1")))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    w.ok(&["at", &b, "restore", "-to", &w.s("r"), &copy_of_d1]);
    assert_eq!(files(&w.path("d1")), files(&w.path("r")));
}

#[test]
fn sync_between_different_passphrases_and_plaintext() {
    let w = World::new();
    tree(&w.path("d"), 7);
    let (enc, other, plain) = (w.s("enc"), w.s("other"), w.s("plain"));
    w.ok(&["at", &enc, "create"]);
    w.with_env(
        &["at", &other, "create"],
        &[("KLOSET_PASSPHRASE", "second")],
    )
    .ok();
    w.bare(&["at", &plain, "create", "-plaintext"]).ok();
    let id = w.ok(&["at", &enc, "backup", &w.s("d")]).trim().to_string();

    // The other store's passphrase: KLOSET_OTHER_PASSPHRASE ...
    let o = w.with_env(
        &["at", &enc, "sync", "to", &other],
        &[
            ("KLOSET_PASSPHRASE", PASS),
            ("KLOSET_OTHER_PASSPHRASE", "second"),
        ],
    );
    o.ok();
    assert!(o.stderr.contains("1 snapshot(s) copied"), "{}", o.stderr);
    // ... a wrong one fails with exit 4 and names the other store ...
    w.with_env(
        &["at", &enc, "sync", "to", &other],
        &[
            ("KLOSET_PASSPHRASE", PASS),
            ("KLOSET_OTHER_PASSPHRASE", "nope"),
        ],
    )
    .fails(4, &["wrong passphrase", "KLOSET_OTHER_PASSPHRASE"]);
    // ... or the named store's passphrase key.
    w.ok(&["store", "add", "other", &other, "passphrase=second"]);
    w.with_env(
        &["at", "@other", "restore", "-to", &w.s("r1"), "latest"],
        &[],
    )
    .ok();
    assert_eq!(files(&w.path("d")), files(&w.path("r1")));

    // Encrypted → plaintext → encrypted (with a third passphrase via the file variable).
    w.ok(&["at", &enc, "sync", "to", &plain]);
    w.bare(&["at", &plain, "check"]).ok();
    w.bare(&["at", &plain, "restore", "-to", &w.s("r2"), "latest"])
        .ok();
    assert_eq!(files(&w.path("d")), files(&w.path("r2")));
    let third = w.s("third");
    w.with_env(&["at", &third, "create"], &[("KLOSET_PASSPHRASE", "third")])
        .ok();
    let pf = w.path("third-pass");
    fs::write(&pf, "third\n").unwrap();
    w.with_env(
        &["at", &plain, "sync", "to", &third],
        &[("KLOSET_OTHER_PASSPHRASE_FILE", pf.to_str().unwrap())],
    )
    .ok();
    w.with_env(
        &["at", &third, "restore", "-to", &w.s("r3"), "latest"],
        &[("KLOSET_PASSPHRASE", "third")],
    )
    .ok();
    assert_eq!(files(&w.path("d")), files(&w.path("r3")));
    w.with_env(&["at", &third, "check"], &[("KLOSET_PASSPHRASE", "third")])
        .ok();

    // Copies keep the snapshot's identity: time, host, source, path.
    let orig = w.ok(&["at", &enc, "ls", "-json"]);
    let copy = w.with_env(
        &["at", &third, "ls", "-json"],
        &[("KLOSET_PASSPHRASE", "third")],
    );
    let (o, c): (Value, Value) = (serde_json::from_str(&orig).unwrap(), copy.ok().json());
    for k in [
        "time", "host", "user", "source", "tags", "files", "dirs", "bytes",
    ] {
        assert_eq!(o[0][k], c[0][k], "{k}");
    }
    assert_eq!(o[0]["short_id"], id.as_str());
    assert_ne!(o[0]["id"], c[0]["id"], "ids are keyed per store");
}

#[test]
fn sync_named_snapshots_and_usage_errors() {
    let w = World::new();
    tree(&w.path("d1"), 1);
    tree(&w.path("d2"), 2);
    let (a, b) = (w.s("a"), w.s("b"));
    w.ok(&["at", &a, "create"]);
    w.ok(&["at", &b, "create"]);
    let s1 = w.ok(&["at", &a, "backup", &w.s("d1")]).trim().to_string();
    let s2 = w.ok(&["at", &a, "backup", &w.s("d2")]).trim().to_string();
    // Only the named one.
    let v = w
        .run(&["at", &a, "sync", "-json", &s2, "to", &b])
        .ok()
        .json();
    assert_eq!(v["copied"], 1);
    let ls = w.ok(&["at", &b, "ls"]);
    assert!(ls.contains(&w.s("d2")) && !ls.contains(&w.s("d1")), "{ls}");
    // `from` names snapshots of the other store; `with` looks in both.
    let v = w
        .run(&["at", &b, "sync", "-json", &s1, "from", &a])
        .ok()
        .json();
    assert_eq!(v["copied"], 1);
    let v = w
        .run(&["at", &b, "sync", "-json", &s1, &s2, "with", &a])
        .ok()
        .json();
    assert_eq!(v["copied"], 0);

    w.run(&["at", &a, "sync", "deadbeef", "to", &b])
        .fails(8, &["deadbeef"]);
    w.run(&["at", &a, "sync", "into", &b])
        .fails(2, &["to, from or with"]);
    w.run(&["at", &a, "sync", "to", "to", &b])
        .fails(2, &["twice"]);
    assert_eq!(w.run(&["at", &a, "sync", &b]).code, 2);
    w.run(&["at", &a, "sync", "to", &a])
        .fails(1, &["same store"]);
    w.run(&["at", &a, "sync", "to", &w.s("missing")])
        .fails(5, &["no kloset store"]);
    w.run(&["at", &a, "sync", "to", "@nope"])
        .fails(1, &["no store named \"nope\""]);
}

#[test]
fn pkg_list_names_the_builtin_connectors() {
    let w = World::new();
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(
        w.bare(&["pkg", "list"]).ok().stdout,
        format!("fs@v{v}\nsftp@v{v}\n")
    );
}
