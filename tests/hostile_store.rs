//! A store, a cache or a snapshot that someone else controls: stray files in every directory
//! of a store (local and on a real `sshd`), damaged copies in the local cache, names that would
//! break a terminal, a tree nested deeper than any filesystem, an interrupted backup, and bad
//! command lines (issue 13, items 5, 8 and 12).
//!
//! Every run asserts that kloset did not panic and was not killed by a signal.

mod common;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::craft::Craft;
use common::sshd::Sshd;
use kloset::store::{Backend, LocalBackend, Store};

const BIN: &str = env!("CARGO_BIN_EXE_kloset");

/// What one run of the binary gave.
struct Out {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn code(&self, want: i32) -> &Out {
        assert_eq!(
            self.code,
            want,
            "exit {} (want {want})\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.text(),
            self.stderr
        );
        self
    }

    /// How many lines of stderr contain `s`.
    fn warned(&self, s: &str) -> usize {
        self.stderr.lines().filter(|l| l.contains(s)).count()
    }
}

/// Run `cmd` to completion; it must neither panic nor die of a signal.
fn finish(mut cmd: Command) -> Out {
    let o = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run kloset");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("overflowed its stack"),
        "kloset crashed ({cmd:?}):\n{stderr}"
    );
    let code = o.status.code().unwrap_or_else(|| {
        panic!(
            "kloset killed by a signal ({:?}): {cmd:?}\n{stderr}",
            o.status
        )
    });
    Out {
        code,
        stdout: o.stdout,
        stderr,
    }
}

/// `kloset ARGS…` with HOME = `home` and a passphrase.
fn kloset<S: AsRef<OsStr>>(home: &Path, args: &[S]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("KLOSET_PASSPHRASE", "pw")
        .args(args);
    c
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().canonicalize().unwrap();
    (t, p)
}

/// A small source tree.
fn source(dir: &Path) {
    fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    fs::write(dir.join("a.txt"), b"alpha\n").unwrap();
    fs::write(dir.join("sub/b.txt"), b"beta\n").unwrap();
    fs::write(dir.join("sub/deeper/c.bin"), vec![7u8; 100_000]).unwrap();
}

/// Every regular file below `dir`, relative path → content.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
                out.push((rel, fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The short id on the first line of `backup`'s stdout.
fn short_id(o: &Out) -> String {
    o.text().trim().to_string()
}

// ---------------------------------------------------------------------------------------------
// Item 5: stray files in a store

/// Names planted in a store, and the warning each must give (escaped as `ls -b` does).
fn plant_strays(store: &Path, snapshot_id: &str) -> Vec<(PathBuf, String)> {
    let d0 = store.join("packs/d0");
    fs::create_dir_all(&d0).unwrap();
    let mut planted = Vec::new();
    let mut file = |p: PathBuf, shown: &str| {
        fs::write(&p, b"not a store file").unwrap();
        planted.push((p, shown.to_string()));
    };
    file(
        d0.join(OsStr::from_bytes(b"\xff\xfe")),
        "packs/d0/\\377\\376",
    );
    file(d0.join("ü"), "packs/d0/ü");
    // A multi-byte character across byte 2, where the pack directory name is cut.
    file(d0.join("xü"), "packs/d0/xü");
    // A pack name of the right shape in the wrong directory.
    file(
        d0.join("ab".repeat(32)),
        &format!("packs/d0/{}", "ab".repeat(32)),
    );
    file(store.join("packs/README"), "packs/README");
    // A snapshot whose name is a prefix of a real one: `ls PREFIX` must not see two.
    file(
        store.join("snapshots").join(&snapshot_id[..2]),
        &format!("snapshots/{}", &snapshot_id[..2]),
    );
    file(
        store.join("snapshots").join(OsStr::from_bytes(b"\x1b[2J")),
        "snapshots/\\033[2J",
    );
    file(store.join("index/junk"), "index/junk");
    file(store.join("keys/README"), "keys/README");
    file(store.join("locks/x"), "locks/x");
    fs::create_dir_all(store.join("packs/zz")).unwrap();
    planted.push((store.join("packs/zz"), "packs/zz".into()));
    // A pack directory's name that is a symlink to a directory elsewhere holding a file of a
    // pack's name: warned of, never listed through (the SFTP store asks the server for every
    // `packs/XX` at once and must drop that answer); `check` would fail on the fake pack.
    // The first such name the store's own packs do not use (a real pack's id may start so).
    let xx = (0..=255u8)
        .map(|b| format!("{b:02x}"))
        .find(|xx| !store.join("packs").join(xx).exists())
        .unwrap();
    let elsewhere = store.parent().unwrap().join("packs-elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(elsewhere.join(xx.repeat(32)), b"not a pack").unwrap();
    std::os::unix::fs::symlink(&elsewhere, store.join("packs").join(&xx)).unwrap();
    planted.push((store.join("packs").join(&xx), format!("packs/{xx}")));
    // Temporary files of unfinished writes stay silent.
    fs::write(d0.join(".tmp-1-0123456789abcdef"), b"partial").unwrap();
    planted
}

/// Run every command against a store holding stray files: none may panic, each warns about the
/// strays it lists (once each), and none touches them.
fn stray_files_everywhere(
    run: &dyn Fn(&[&OsStr]) -> Out,
    store_url: &str,
    store_dir: &Path,
    other_url: &str,
    work: &Path,
) {
    let src = work.join("src");
    source(&src);
    let src_s = src.to_str().unwrap();
    let a = |args: &[&str]| -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["at".into(), store_url.into()];
        v.extend(args.iter().map(OsString::from));
        v
    };
    let go = |args: Vec<OsString>| {
        let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        run(&refs)
    };
    go(a(&["create", "-plaintext"])).code(0);
    let id = short_id(go(a(&["backup", src_s])).code(0));
    let full_id: String = fs::read_dir(store_dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with(&id))
        .unwrap();
    let planted = plant_strays(store_dir, &full_id);
    let packs_warnings: Vec<&str> = planted
        .iter()
        .map(|(_, w)| w.as_str())
        .filter(|w| w.starts_with("packs/"))
        .collect();

    let restored = work.join("restored");
    let cases: Vec<(Vec<OsString>, Vec<&str>)> = vec![
        (a(&["ls"]), vec!["snapshots/\\033[2J"]),
        (a(&["ls", &full_id[..2]]), vec![]),
        (a(&["ls", "-recursive", &id]), vec![]),
        (a(&["cat", &format!("{id}:a.txt")]), vec![]),
        (
            a(&["info"]),
            planted.iter().map(|(_, w)| w.as_str()).collect(),
        ),
        (a(&["check"]), vec!["index/junk", "locks/x"]),
        (
            a(&["restore", "-to", restored.to_str().unwrap(), &id]),
            vec!["locks/x"],
        ),
        (a(&["backup", src_s]), vec!["locks/x"]),
    ];
    go(vec![
        "at".into(),
        other_url.into(),
        "create".into(),
        "-plaintext".into(),
    ])
    .code(0);
    let mut cases = cases;
    cases.push((a(&["sync", "to", other_url]), vec!["snapshots/\\033[2J"]));
    for (args, extra) in cases {
        let o = go(args.clone());
        o.code(0);
        for w in packs_warnings.iter().chain(&extra) {
            let line = format!("kloset: warning: ignoring unexpected file {w} in the store");
            let dir_line = format!("kloset: warning: ignoring {w} in the store");
            assert_eq!(
                o.warned(&line) + o.warned(&dir_line),
                1,
                "{args:?}: want one warning about {w}:\n{}",
                o.stderr
            );
        }
        assert!(!o.stderr.contains(".tmp-"), "{args:?}: {}", o.stderr);
    }
    assert_eq!(files(&restored), files(&src), "the restore is complete");
    // Nothing planted was removed or changed.
    for (p, _) in &planted {
        assert!(fs::symlink_metadata(p).is_ok(), "{} is gone", p.display());
    }
}

#[test]
fn stray_files_in_a_local_store_are_skipped_and_reported() {
    let (_t, root) = tempdir();
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    let store = root.join("store");
    let run = |args: &[&OsStr]| finish(kloset(&home, args));
    stray_files_everywhere(
        &run,
        store.to_str().unwrap(),
        &store,
        root.join("other").to_str().unwrap(),
        &root,
    );
}

#[test]
fn stray_files_in_an_sftp_store_are_skipped_and_reported() {
    let Some(sshd) = Sshd::start() else { return };
    let (_t, root) = tempdir();
    let store = sshd.remote_dir("stray");
    let other = sshd.remote_dir("stray-other");
    let run = |args: &[&OsStr]| {
        let mut c = sshd.cmd(Path::new(BIN));
        c.args(args);
        finish(c)
    };
    stray_files_everywhere(&run, &sshd.url(&store), &store, &sshd.url(&other), &root);
}

// ---------------------------------------------------------------------------------------------
// Item 8: the local cache

/// Flip one byte of a file.
fn flip(p: &Path, at: usize) {
    let mut b = fs::read(p).unwrap();
    let at = at.min(b.len() - 1);
    b[at] ^= 0x55;
    fs::write(p, b).unwrap();
}

#[test]
fn damaged_cache_files_are_fetched_again() {
    let Some(sshd) = Sshd::start() else { return };
    let (_t, root) = tempdir();
    let src = root.join("src");
    source(&src);
    let url = sshd.url(sshd.remote_dir("cached"));
    let run = |args: &[&str]| {
        let mut c = sshd.cmd(Path::new(BIN));
        c.args(["at", &url]).args(args);
        finish(c)
    };
    run(&["create"]).code(0);
    let id = short_id(run(&["backup", src.to_str().unwrap()]).code(0));
    // Fill the cache: index, snapshots, tree packs.
    run(&["ls", "-recursive", &id]).code(0);
    let cache = sshd.home().join(".cache/kloset");
    // The store's own cache (beside `locations/`, the key files remembered per URL).
    let store_cache = fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !p.ends_with("locations"))
        .unwrap();
    let mut damaged = Vec::new();
    for sub in ["index", "snapshots", "packs"] {
        for (rel, _) in files(&store_cache.join(sub)) {
            let p = store_cache.join(sub).join(rel);
            flip(&p, 0);
            damaged.push(p);
        }
    }
    assert!(
        damaged.len() >= 3,
        "index, snapshot and tree pack cached: {damaged:?}"
    );

    let restored = root.join("restored");
    let o = run(&["restore", "-to", restored.to_str().unwrap(), &id]);
    o.code(0);
    assert_eq!(files(&restored), files(&src), "every file restored");
    for p in &damaged {
        let w = format!(
            "kloset: warning: cached copy {} was damaged; fetched it again from the store",
            p.display()
        );
        assert_eq!(
            o.warned(&w),
            1,
            "want a warning about {}:\n{}",
            p.display(),
            o.stderr
        );
    }
    // The cache was repaired: the next commands say nothing.
    let o = run(&["ls", "-recursive", &id]);
    o.code(0);
    assert!(o.stderr.is_empty(), "{}", o.stderr);
    run(&["check"]).code(0);
    // Every directory kloset made for the cache is private.
    for d in [cache.clone(), store_cache.clone()]
        .into_iter()
        .chain(["index", "snapshots", "packs"].map(|s| store_cache.join(s)))
    {
        let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
    }
}

// ---------------------------------------------------------------------------------------------
// Item 12: ls shows names safely

/// A plaintext local store at `dir`, opened through the library.
fn open_store(home: &Path, dir: &Path) -> Store {
    finish(kloset(
        home,
        &["at", dir.to_str().unwrap(), "create", "-plaintext"],
    ))
    .code(0);
    let b: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir));
    Store::open(b, &|_| Ok(Vec::new())).unwrap()
}

#[test]
fn ls_escapes_names_and_warns_about_left_out_entries() {
    let (_t, root) = tempdir();
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    let dir = root.join("store");
    let store = open_store(&home, &dir);
    let c = Craft::new(&store);
    let nodes = vec![
        c.file(b"new\nline", b"", 0o644),
        c.file(b"\x1b[31mred", b"", 0o644),
        c.file(b"\xff\xfe", b"", 0o644),
        c.file(b"back\\slash", b"", 0o644),
        c.file(b"..", b"", 0o644),
        c.file(b"twice", b"", 0o644),
        c.dir(b"twice", vec![]),
        c.symlink(b"link", b"/x\x1b]0;owned\x07"),
    ];
    let id = c.snapshot(nodes).id;
    drop(c);
    drop(store);

    let s = dir.to_str().unwrap();
    let o = finish(kloset(&home, &["at", s, "ls", &id[..8]]));
    o.code(0);
    assert!(!o.stdout.contains(&0x1b), "an escape byte reached stdout");
    assert!(!o.stdout.contains(&0x07), "a BEL byte reached stdout");
    let text = o.text();
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_once("Z ").map(|(_, n)| n).unwrap_or(l))
        .collect();
    assert_eq!(
        names,
        [
            "\\033[31mred",
            "back\\\\slash",
            "link -> /x\\033]0;owned\\a",
            "new\\nline",
            "twice",
            "\\377\\376",
        ],
        "{text}"
    );
    for (name, why) in [("/..", "`.` or `..`"), ("/twice", "same name")] {
        assert!(
            o.stderr
                .lines()
                .any(|l| l.starts_with("kloset: warning: left out ")
                    && l.contains(name)
                    && l.contains(why)),
            "no warning about {name}:\n{}",
            o.stderr
        );
    }
    // -json keeps exact values; a non-UTF-8 name also comes as hex.
    let o = finish(kloset(&home, &["at", s, "ls", "-json", &id[..8]]));
    o.code(0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let by_hex: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("name_hex").is_some())
        .collect();
    assert_eq!(by_hex.len(), 1, "{v}");
    assert_eq!(by_hex[0]["name_hex"], "fffe");
    assert_eq!(by_hex[0]["path_hex"], "2ffffe");
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "new\nline" && e["path"] == "/new\nline")
    );
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["target"] == "/x\u{1b}]0;owned\u{7}")
    );
}

/// `ls -recursive` of a tree nested 5,000 directories deep, run with a 256 KiB stack (the
/// recursive walk overflowed it after about a thousand levels; with the default 8 MiB it did
/// at 200,000): the first 4,096 levels are listed and the rest reported, exit 1.
#[test]
fn ls_recursive_of_a_very_deep_tree_is_bounded() {
    let (_t, root) = tempdir();
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    let dir = root.join("store");
    let store = open_store(&home, &dir);
    let c = Craft::new(&store);
    let mut n = c.file(b"bottom", b"", 0o644);
    for _ in 0..4_999 {
        n = c.dir(b"d", vec![n]);
    }
    let id = c.snapshot(vec![n]).id;
    drop(c);
    drop(store);
    let mut c = Command::new("sh");
    c.env_clear()
        .env("HOME", &home)
        .args(["-c", "ulimit -s 256 && exec \"$@\"", "sh", BIN])
        .args(["at", dir.to_str().unwrap(), "ls", "-recursive", &id[..8]]);
    let o = finish(c);
    o.code(1);
    assert_eq!(o.text().lines().count(), 4096, "levels listed");
    assert!(
        o.stderr.contains("nested more than 4096 directories deep"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr
            .contains("1 directory nested more than 4096 levels deep"),
        "{}",
        o.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Item 12: SIGINT and SIGTERM during a backup

/// Interrupt a backup of a large file once it holds its lock: exit 128 + the signal, and no
/// lock or temporary file is left in the store.
fn interrupt_backup(sig: nix::sys::signal::Signal, want: i32) {
    let (_t, root) = tempdir();
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    // Incompressible, so the backup writes pack after pack for a while.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..150_000_000 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    fs::write(src.join("big"), &big).unwrap();
    drop(big);
    let store = root.join("store");
    let s = store.to_str().unwrap();
    finish(kloset(&home, &["at", s, "create", "-plaintext"])).code(0);
    let child = kloset(&home, &["at", s, "backup", src.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while fs::read_dir(store.join("locks")).unwrap().next().is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "no lock taken");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Into the pack writing: once the first pack is in the store (with the packs uploaded in
    // the background a fixed 300 ms was once the whole backup).
    let has_pack = || {
        walk_all(&store.join("packs"))
            .iter()
            .any(|p| p.is_file() && !p.file_name().unwrap().as_bytes().starts_with(b".tmp"))
    };
    while !has_pack() {
        assert!(start.elapsed() < Duration::from_secs(60), "no pack written");
        std::thread::sleep(Duration::from_millis(2));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(want), "{:?}: {stderr}", o.status);
    assert!(stderr.contains("interrupted by"), "{stderr}");
    let left: Vec<_> = walk_all(&store)
        .into_iter()
        .filter(|p| {
            p.starts_with(store.join("locks"))
                || p.file_name().unwrap().as_bytes().starts_with(b".tmp")
        })
        .filter(|p| p.is_file())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The store is usable at once: not locked, and check accepts it.
    finish(kloset(&home, &["at", s, "check"])).code(0);
}

fn walk_all(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn sigint_during_a_backup_removes_the_lock_and_temporary_files() {
    interrupt_backup(nix::sys::signal::Signal::SIGINT, 130);
}

#[test]
fn sigterm_during_a_backup_removes_the_lock_and_temporary_files() {
    interrupt_backup(nix::sys::signal::Signal::SIGTERM, 143);
}

// ---------------------------------------------------------------------------------------------
// Item 12: exit codes

#[test]
fn bad_options_and_locations_are_usage_errors() {
    let (_t, root) = tempdir();
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    let store = root.join("store");
    let s = store.to_str().unwrap();
    finish(kloset(&home, &["at", s, "create", "-plaintext"])).code(0);
    let src = root.join("src");
    source(&src);
    finish(kloset(&home, &["at", s, "backup", src.to_str().unwrap()])).code(0);
    for (args, word) in [
        (vec!["-o", "port=abc", "at", s, "ls"], "port"),
        (vec!["-o", "bogus=1", "at", s, "ls"], "bogus"),
        (vec!["-o", "connections", "at", s, "ls"], "connections"),
        (
            vec!["at", "sftp://host-without-path", "ls"],
            "sftp://host-without-path",
        ),
        (vec!["at", "sftp:///x", "ls"], "host is empty"),
        (vec!["at", "ftp://host/x", "ls"], "ftp://host/x"),
        (vec!["at", s, "backup", "sftp://nopath"], "sftp://nopath"),
        (
            vec!["at", s, "restore", "-to", "sftp://@h/x", "latest"],
            "sftp://@h/x",
        ),
    ] {
        let o = finish(kloset(&home, &args));
        o.code(2);
        let lines: Vec<_> = o.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {}", o.stderr);
        assert!(
            lines[0].starts_with("kloset: ") && lines[0].contains(word),
            "{args:?}: {}",
            o.stderr
        );
    }
}

#[test]
fn restore_where_every_entry_fails_says_so() {
    let (_t, root) = tempdir();
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    let src = root.join("src");
    source(&src);
    let store = root.join("store");
    let s = store.to_str().unwrap();
    finish(kloset(&home, &["at", s, "create", "-plaintext"])).code(0);
    finish(kloset(&home, &["at", s, "backup", src.to_str().unwrap()])).code(0);
    // /proc/1 exists, and nothing can be created in it.
    let o = finish(kloset(
        &home,
        &["at", s, "restore", "-to", "/proc/1", "latest"],
    ));
    o.code(3);
    assert!(!o.stderr.contains("\nrestored "), "{}", o.stderr);
    assert!(!o.stderr.starts_with("restored "), "{}", o.stderr);
    assert!(
        o.stderr.contains("nothing was restored") && o.stderr.contains("all 5 entries failed"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("kloset: not restored: a.txt: "),
        "{}",
        o.stderr
    );
}

/// Names from a snapshot in error messages are escaped as `ls` escapes them.
#[test]
fn error_messages_never_carry_terminal_escapes() {
    let (_t, root) = tempdir();
    let home = root.join("home");
    fs::create_dir_all(&home).unwrap();
    let src = root.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join(OsStr::from_bytes(b"\x1b[31mred\nline")), b"x").unwrap();
    let store = root.join("store");
    let s = store.to_str().unwrap();
    finish(kloset(&home, &["at", s, "create", "-plaintext"])).code(0);
    finish(kloset(&home, &["at", s, "backup", src.to_str().unwrap()])).code(0);
    let o = finish(kloset(
        &home,
        &["at", s, "restore", "-to", "/proc/1", "latest"],
    ));
    o.code(3);
    assert!(!o.stderr.contains('\x1b'), "{:?}", o.stderr);
    assert!(
        o.stderr
            .contains("kloset: not restored: \\033[31mred\\nline: /proc/1/\\033[31mred\\nline: "),
        "{}",
        o.stderr
    );
}
