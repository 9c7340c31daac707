//! The documented session (Plakar's SFTP integration guide, `plakar` → `kloset`), run in order
//! against a real OpenSSH server on loopback (tests/common/sshd.rs) with a temporary HOME whose
//! `~/.ssh/config` defines the alias `sftp-prod`.
//!
//! The guide's `sftp://sftpuser@host.example.com/PATH` becomes the fixture's
//! `sftp://root@127.0.0.1:PORT/PATH`, and its scp-like `sftp://host.example.com:/srv/data`
//! becomes `sftp://127.0.0.1:/…` with `port=` and `username=` stored on the connector (the
//! fixture's sshd is not on port 22), then `sftp://sftp-prod:/…` exactly as written. `/srv/data`,
//! `/srv/restore` and `/backups` are fresh directories under the fixture's remote root. Two
//! deviations from running the text literally, both because the guide's snippets are
//! alternatives rather than one script: the named store lives in its own directory (the guide
//! creates `/backups` twice), and the connectors are `rm`-ed before being re-added with the
//! alias (a second `add` of a name is refused).

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::sshd::{ALIAS, Sshd};
use common::tree::{FsTree, scan, show};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kloset"))
}

struct Session<'a> {
    sshd: &'a Sshd,
    /// The working directory of every command (where a restore without `-to` lands).
    cwd: PathBuf,
}

impl Session<'_> {
    /// `kloset ARGS` with the fixture's HOME and KLOSET_PASSPHRASE, or without the passphrase.
    fn run(&self, args: &[&str], passphrase_env: bool) -> Output {
        let mut c = self.sshd.cmd(bin());
        c.current_dir(&self.cwd)
            .env_remove("XDG_CONFIG_HOME")
            .stdin(std::process::Stdio::null())
            .args(args);
        if !passphrase_env {
            c.env_remove("KLOSET_PASSPHRASE");
        }
        let out = c.output().expect("run kloset");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "kloset {args:?} panicked: {err}");
        out
    }

    fn ok_env(&self, args: &[&str], passphrase_env: bool) -> (String, String) {
        let out = self.run(args, passphrase_env);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "kloset {args:?} failed ({:?}):\n{err}\nsshd log: {}",
            out.status.code(),
            self.sshd.log()
        );
        (String::from_utf8_lossy(&out.stdout).into_owned(), err)
    }

    /// Runs a documented command; returns (stdout, stderr).
    fn ok(&self, args: &[&str]) -> (String, String) {
        self.ok_env(args, true)
    }
}

/// A web root: nested directories, a 0750 directory, a 0600 file, an empty file, a symlink and
/// a 3 MB file of several chunks.
fn web_tree(root: &Path, seed: u32) {
    fs::create_dir_all(root.join("css")).unwrap();
    fs::create_dir_all(root.join("img/icons")).unwrap();
    fs::write(root.join("index.html"), format!("<h1>hello {seed}</h1>\n")).unwrap();
    fs::write(root.join("css/site.css"), b"body { color: red }\n").unwrap();
    fs::write(root.join("img/icons/empty.ico"), b"").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ seed as u8)
        .collect();
    fs::write(root.join("img/big.bin"), big).unwrap();
    fs::write(root.join("secret.conf"), b"token=1\n").unwrap();
    fs::set_permissions(root.join("secret.conf"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("img/icons"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("index.html", root.join("home.html")).unwrap();
}

/// Compare two trees file by file: kind, permission bits, size, content, symlink target and
/// mtime to the second (SFTP carries whole seconds only). The roots themselves are skipped.
fn assert_same(what: &str, src: &Path, restored: &Path) {
    let (a, b): (FsTree, FsTree) = (scan(src), scan(restored));
    let mut diffs = Vec::new();
    for (p, x) in &a {
        if p.is_empty() {
            continue;
        }
        match b.get(p) {
            None => diffs.push(format!("{}: missing", show(p))),
            Some(y) => {
                let key = |e: &common::tree::FsEntry| {
                    let mtime = if e.kind == 'l' { 0 } else { e.mtime.0 };
                    (e.kind, e.mode, e.size, e.hash, e.target.clone(), mtime)
                };
                if key(x) != key(y) {
                    diffs.push(format!(
                        "{}: {:?} != restored {:?}",
                        show(p),
                        key(x),
                        key(y)
                    ));
                }
            }
        }
    }
    for p in b.keys() {
        if !p.is_empty() && !a.contains_key(p) {
            diffs.push(format!("{}: not in the source", show(p)));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differs from {}:\n{}",
        restored.display(),
        src.display(),
        diffs.join("\n")
    );
    assert!(a.len() > 8, "{what}: the compared tree is not empty");
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
fn documented_session() {
    let Some(sshd) = Sshd::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path().join("cwd");
    fs::create_dir(&cwd).unwrap();
    let k = Session {
        sshd: &sshd,
        cwd: cwd.clone(),
    };
    let port = sshd.port();
    let port_opt = format!("port={port}");

    // The local tree (`/var/www`) and the remote ones (`/srv/data`, `/srv/restore`).
    let www = work.path().join("var/www");
    web_tree(&www, 1);
    let www_s = www.to_str().unwrap();
    let data = sshd.remote_dir("srv-data");
    fs::create_dir(&data).unwrap();
    web_tree(&data, 2);
    let restore_host = sshd.remote_dir("srv-restore");
    let restore_alias = sshd.remote_dir("srv-restore-alias");
    let backups = sshd.remote_dir("backups");
    let nested = sshd.remote_dir("home").join("sftp-test/backups");
    let named = sshd.remote_dir("named-backups");
    let other = sshd.remote_dir("other-backups");

    // kloset at sftp://sftpuser@host.example.com/backups create
    let url = sshd.url(&backups);
    k.ok(&["at", &url, "create"]);
    assert!(backups.join("config").is_file());
    // kloset at sftp://sftpuser@host.example.com/home/sftp-test/backups create
    k.ok(&["at", &sshd.url(&nested), "create"]);
    assert!(nested.join("config").is_file(), "parents are created");
    // kloset at sftp://sftpuser@host.example.com/backups backup /var/www
    let (id, _) = k.ok(&["at", &url, "backup", www_s]);
    let id = id.trim().to_string();
    // <snapshot_id> is what `ls` shows.
    let (ls, _) = k.ok(&["at", &url, "ls"]);
    assert_eq!(first_word(&ls), id, "ls shows the snapshot: {ls}");
    // kloset at sftp://sftpuser@host.example.com/backups restore <snapshot_id>:/var/www/index.html
    k.ok(&["at", &url, "restore", &format!("{id}:{www_s}/index.html")]);
    assert_eq!(
        fs::read(cwd.join("index.html")).unwrap(),
        fs::read(www.join("index.html")).unwrap()
    );

    // kloset store add sftp_store sftp://host.example.com/backups
    k.ok(&["store", "add", "sftp_store", &sshd.url(&named)]);
    // kloset source add sftp_src sftp://host.example.com:/srv/data
    let scp = |p: &Path| format!("sftp://127.0.0.1:{}", p.display());
    k.ok(&[
        "source",
        "add",
        "sftp_src",
        &scp(&data),
        &port_opt,
        "username=root",
    ]);
    // kloset destination add sftp_dst sftp://host.example.com:/srv/restore
    k.ok(&[
        "destination",
        "add",
        "sftp_dst",
        &scp(&restore_host),
        &port_opt,
        "username=root",
    ]);
    // kloset at @sftp_store create
    k.ok(&["at", "@sftp_store", "create"]);
    assert!(named.join("config").is_file());
    // kloset at @sftp_store backup @sftp_src
    let (id2, _) = k.ok(&["at", "@sftp_store", "backup", "@sftp_src"]);
    let id2 = id2.trim().to_string();
    // kloset at @sftp_store restore -to @sftp_dst <snapshot_id>
    k.ok(&["at", "@sftp_store", "restore", "-to", "@sftp_dst", &id2]);
    assert_same("restore -to @sftp_dst (host form)", &data, &restore_host);

    // The same three through the ~/.ssh/config alias.
    k.ok(&["store", "rm", "sftp_store"]);
    k.ok(&["source", "rm", "sftp_src"]);
    k.ok(&["destination", "rm", "sftp_dst"]);
    // kloset store add sftp_store sftp://sftp-prod/backups
    k.ok(&["store", "add", "sftp_store", &sshd.alias_url(&named)]);
    // kloset source add sftp_src sftp://sftp-prod:/srv/data
    let alias = |p: &Path| format!("sftp://{ALIAS}:{}", p.display());
    k.ok(&["source", "add", "sftp_src", &alias(&data)]);
    // kloset destination add sftp_dst sftp://sftp-prod:/srv/restore
    k.ok(&["destination", "add", "sftp_dst", &alias(&restore_alias)]);
    // The alias forms in use: a change on the server, a new backup, a restore onto it.
    fs::write(data.join("index.html"), b"<h1>changed</h1>\n").unwrap();
    fs::write(data.join("css/new.css"), b"p { margin: 0 }\n").unwrap();
    let (id3, _) = k.ok(&["at", "@sftp_store", "backup", "@sftp_src"]);
    let id3 = id3.trim().to_string();
    k.ok(&["at", "@sftp_store", "restore", "-to", "@sftp_dst", &id3]);
    assert_same("restore -to @sftp_dst (alias form)", &data, &restore_alias);

    // kloset at @sftp_store ls
    let (ls, _) = k.ok(&["at", "@sftp_store", "ls"]);
    let shown: Vec<String> = ls.lines().map(first_word).collect();
    assert_eq!(shown, [id2.clone(), id3.clone()], "{ls}");
    // kloset at @sftp_store verify
    let (_, err) = k.ok(&["at", "@sftp_store", "verify"]);
    assert!(err.starts_with("ok:"), "{err}");

    // kloset at @sftp_store sync to @other_store: another SFTP-hosted store with its own
    // passphrase, which its connector gives (no environment needed, as in a cron job).
    k.ok(&[
        "store",
        "add",
        "other_store",
        &sshd.url(&other),
        "passphrase_cmd=printf 'other pass'",
    ]);
    k.ok_env(&["at", "@other_store", "create"], false);
    let (_, err) = k.ok(&["at", "@sftp_store", "sync", "to", "@other_store"]);
    assert!(err.contains("2 snapshot(s) copied"), "{err}");
    let (_, err) = k.ok(&["at", "@sftp_store", "sync", "to", "@other_store"]);
    assert!(
        err.contains("0 snapshot(s) copied, 2 already there"),
        "{err}"
    );
    let (ls, _) = k.ok_env(&["at", "@other_store", "ls"], false);
    assert_eq!(ls.lines().count(), 2, "{ls}");
    let (_, err) = k.ok_env(&["at", "@other_store", "verify"], false);
    assert!(err.starts_with("ok:"), "{err}");
    // The environment's passphrase wins over the connector's, so here it is the wrong one.
    let out = k.run(&["at", "@other_store", "ls"], true);
    assert_eq!(out.status.code(), Some(4));

    // The seed's set-up lines, verbatim: `login -email <Your Email Address>` and
    // `pkg add sftp` (kloset needs no account, and its SFTP connector is built in).
    let (out, _) = k.ok(&["login", "-email", "admin@example.com"]);
    assert!(out.contains("no account"), "{out}");
    let (out, _) = k.ok(&["pkg", "add", "sftp"]);
    assert!(out.contains("built in"), "{out}");

    // kloset pkg list
    let (pkgs, _) = k.ok(&["pkg", "list"]);
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(pkgs, format!("fs@v{v}\nsftp@v{v}\n"));

    // What was restored is what was backed up, file by file: the local tree from the first
    // store, and the remote tree from the synced copy in the other store.
    let local = work.path().join("restored-www");
    k.ok(&["at", &url, "restore", "-to", local.to_str().unwrap(), &id]);
    assert_same("local restore", &www, &local);
    let copied = work.path().join("restored-from-other");
    k.ok_env(
        &[
            "at",
            "@other_store",
            "restore",
            "-to",
            copied.to_str().unwrap(),
            "latest",
        ],
        false,
    );
    assert_same("restore of the synced copy", &data, &copied);
}
