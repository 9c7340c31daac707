//! SFTP connectors against real servers on loopback (tests/common/sshd.rs): a store on the
//! server, a remote source, a remote destination, authentication, host keys, and dropped
//! connections, each test against every server kloset is tested with (`on_every_server!`):
//! OpenSSH, asyncssh's SFTP server without OpenSSH's extensions, and an OpenSSH account
//! confined to `internal-sftp` in a chroot.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::sshd::{Flavor, Sshd};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kloset"))
}

fn run(sshd: &Sshd, args: &[&str]) -> Output {
    let out = sshd.cmd(bin()).args(args).output().expect("run kloset");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "kloset panicked: {err}");
    out
}

fn ok(sshd: &Sshd, args: &[&str]) -> String {
    let out = run(sshd, args);
    assert!(
        out.status.success(),
        "kloset {args:?} failed ({:?}): {}\nsshd log: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(sshd: &Sshd, args: &[&str], code: i32) -> String {
    let out = run(sshd, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "kloset {args:?}: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "error is not one line: {err}"
    );
    err
}

/// A small tree with nested dirs, odd modes, a symlink, an empty file and a multi-chunk file.
fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("www/css")).unwrap();
    fs::write(root.join("www/index.html"), b"<h1>hello</h1>\n").unwrap();
    fs::write(root.join("www/css/site.css"), b"body { color: red }\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(root.join("big.bin"), &big).unwrap();
    fs::write(root.join("secret"), b"x").unwrap();
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("www/css"), fs::Permissions::from_mode(0o750)).unwrap();
    // Setuid survives an owner change on the destination (chown clears it).
    fs::write(root.join("suid"), b"#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(root.join("suid"), Some(4321), Some(4321)).unwrap();
    fs::set_permissions(root.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    symlink("www/index.html", root.join("link")).unwrap();
}

#[derive(Debug, PartialEq)]
enum E {
    Dir(u32),
    File(u32, Vec<u8>),
    Link(PathBuf),
}

/// Relative path → (kind, mode, content/target, mtime seconds).
fn scan(root: &Path) -> BTreeMap<PathBuf, (E, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let mode = m.mode() & 0o7777;
            let kind = if m.file_type().is_symlink() {
                E::Link(fs::read_link(&p).unwrap())
            } else if m.is_dir() {
                stack.push(p.clone());
                E::Dir(mode)
            } else {
                E::File(mode, fs::read(&p).unwrap())
            };
            let mtime = if matches!(kind, E::Link(_)) {
                0
            } else {
                m.mtime()
            };
            out.insert(rel, (kind, mtime));
        }
    }
    out
}

fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, sb) = (scan(a), scan(b));
    assert_eq!(
        sa.keys().collect::<Vec<_>>(),
        sb.keys().collect::<Vec<_>>(),
        "different entries in {} and {}",
        a.display(),
        b.display()
    );
    for (k, v) in &sa {
        assert_eq!(Some(v), sb.get(k), "entry {} differs", k.display());
    }
}

fn snapshot_json(sshd: &Sshd, store: &str, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["at", store, "backup", "-json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(sshd, &a)).expect("backup -json output")
}

/// Each test below runs against every server of [`Flavor::SERVERS`]: `openssh::NAME`,
/// `asyncssh::NAME` and `chroot::NAME` (a server that cannot run here is skipped with a
/// `SKIP:` line saying why).
macro_rules! on_every_server {
    ($($test:ident),* $(,)?) => {
        on_every_server!(@one openssh, OpenSsh, $($test),*);
        on_every_server!(@one asyncssh, AsyncSsh, $($test),*);
        on_every_server!(@one chroot, Chroot, $($test),*);
    };
    (@one $module:ident, $flavor:ident, $($test:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    if let Some(sshd) = super::Sshd::start_flavor(super::Flavor::$flavor) {
                        super::$test(sshd);
                    }
                }
            )*
        }
    };
}

on_every_server!(
    store_on_server_round_trip_with_url_and_alias,
    remote_source_and_destination,
    unknown_changed_and_ignored_host_keys,
    authentication_agent_identity_and_wrong_key,
    unreachable_server_fails_cleanly,
    connections_killed_mid_backup_and_restore,
    a_warmed_pool_opens_its_connections_in_the_background,
    chacha20_poly1305_with_libcrypto_talks_to_openssh,
    packs_are_listed_over_several_connections,
    rm_with_a_keep_policy_on_an_sftp_store,
    symlink_order_is_asked_not_assumed,
    a_taken_name_is_not_an_upload_done,
    small_store_files_go_through_one_kept_pipe,
    racing_creates_make_one_store,
    sync_to_and_from_the_server,
    restore_onto_the_server_keeps_many_requests_in_flight,
    a_remote_source_is_read_ahead_through_the_pipe,
    key_derivation_starts_during_the_login,
);

fn store_on_server_round_trip_with_url_and_alias(sshd: Sshd) {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path());
    let remote = sshd.remote_dir("store");
    let url = sshd.url(&remote);
    ok(&sshd, &["at", &url, "create"]);
    let meta = fs::metadata(&remote).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.mode() & 0o777, 0o700, "store directory is 0700");
    let id = ok(&sshd, &["at", &url, "backup", src.path().to_str().unwrap()]);
    let id = id.trim();
    assert_eq!(id.len(), 8);

    // The same store through the ~/.ssh/config alias.
    let alias = sshd.alias_url(&remote);
    let ls = ok(&sshd, &["at", &alias, "ls"]);
    assert!(ls.starts_with(id), "ls shows the snapshot: {ls}");
    let dst = tempfile::tempdir().unwrap();
    let to = dst.path().join("r");
    ok(
        &sshd,
        &["at", &alias, "restore", "-to", to.to_str().unwrap(), id],
    );
    assert_same_tree(src.path(), &to);
    ok(&sshd, &["at", &alias, "check"]);

    // A path restore: the entry under its own name.
    let one = dst.path().join("one");
    let p = format!("{id}:{}/www/index.html", src.path().display());
    ok(
        &sshd,
        &["at", &url, "restore", "--to", one.to_str().unwrap(), &p],
    );
    assert_eq!(
        fs::read(one.join("index.html")).unwrap(),
        b"<h1>hello</h1>\n"
    );

    // A second command works from the local cache and still sees new snapshots.
    fs::write(src.path().join("new.txt"), b"new").unwrap();
    ok(&sshd, &["at", &url, "backup", src.path().to_str().unwrap()]);
    assert_eq!(ok(&sshd, &["at", &url, "ls"]).lines().count(), 2);
    assert!(
        sshd.home().join(".cache/kloset").is_dir(),
        "metadata cache exists"
    );

    // create refuses an existing store and a non-empty directory that is not one.
    fails(&sshd, &["at", &url, "create"], 1);
    let other = sshd.remote_dir("busy");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("precious"), b"keep").unwrap();
    fails(&sshd, &["at", &sshd.url(&other), "create"], 1);
    assert_eq!(fs::read(other.join("precious")).unwrap(), b"keep");
}

fn remote_source_and_destination(sshd: Sshd) {
    let store = tempfile::tempdir().unwrap();
    let store = store.path().join("s");
    let store = store.to_str().unwrap();
    ok(&sshd, &["at", store, "create"]);

    let data = sshd.remote_dir("data");
    fs::create_dir(&data).unwrap();
    sample_tree(&data);
    sshd.give(&data);
    let src_url = sshd.url(&data);
    let first = snapshot_json(&sshd, store, &[&src_url]);
    assert_eq!(first["files"], 6);
    assert!(first["bytes_read"].as_u64().unwrap() > 3_000_000);

    // Unchanged remote tree: nothing is read again.
    let second = snapshot_json(&sshd, store, &[&src_url]);
    assert_eq!(second["bytes_read"], 0, "{second}");
    // One file changed (size and mtime): only it is read.
    fs::write(data.join("www/index.html"), b"<h1>changed</h1>\n").unwrap();
    let third = snapshot_json(&sshd, store, &[&src_url]);
    assert_eq!(third["bytes_read"], 17, "{third}");

    // Restore straight onto the server, through the alias.
    let dst = sshd.remote_dir("restore");
    let dst_url = sshd.alias_url(&dst);
    let id = third["short_id"].as_str().unwrap();
    ok(&sshd, &["at", store, "restore", "-to", &dst_url, id]);
    assert_same_tree(&data, &dst);

    // Run again: the first restore finished, so nothing there is trusted and every file is
    // written anew (only a restore resuming its own unfinished run skips files).
    let out = run(&sshd, &["at", store, "restore", "-to", &dst_url, id]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("already there"));
    assert_same_tree(&data, &dst);

    // Asked to (`-overwrite if-changed`, rsync's quick check): files of the snapshot's size
    // and mtime are left, from one listing per directory; the rest is put right.
    fs::set_permissions(
        dst.join("www/index.html"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let grown = dst.join("www/css/site.css");
    fs::write(&grown, b"body { color: red } and more\n").unwrap();
    let quick = [
        "at",
        store,
        "restore",
        "-overwrite",
        "if-changed",
        "-to",
        &dst_url,
        id,
    ];
    let out = run(&sshd, &quick);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("; 5 files were already there as in the snapshot"),
        "{err}"
    );
    assert!(!err.contains("resumed"), "{err}");
    assert_same_tree(&data, &dst);
    let again = run(&sshd, &quick);
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains("; 6 files were already there as in the snapshot"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_same_tree(&data, &dst);

    // Things in the way on the server: replaced, a symlink never written through.
    let outside = sshd.remote_dir("outside");
    fs::write(&outside, b"must stay").unwrap();
    fs::remove_file(dst.join("www/index.html")).unwrap();
    symlink(&outside, dst.join("www/index.html")).unwrap();
    fs::remove_dir_all(dst.join("www/css")).unwrap();
    fs::write(dst.join("www/css"), b"a file where a directory goes").unwrap();
    ok(&sshd, &["at", store, "restore", "-to", &dst_url, id]);
    assert_eq!(fs::read(&outside).unwrap(), b"must stay");
    assert_same_tree(&data, &dst);

    // A single file onto the server.
    let dst2 = sshd.remote_dir("restore-one");
    let p = format!("{id}:{}/www/css", sshd.server_path(&data).display());
    ok(
        &sshd,
        &["at", store, "restore", "-to", &sshd.url(&dst2), &p],
    );
    assert_eq!(
        fs::read(dst2.join("css/site.css")).unwrap(),
        b"body { color: red }\n"
    );
}

fn unknown_changed_and_ignored_host_keys(sshd: Sshd) {
    let remote = sshd.remote_dir("store");
    let url = sshd.url(&remote);

    sshd.write_known_hosts("");
    let err = fails(&sshd, &["at", &url, "create"], 10);
    assert!(err.contains("SHA256:"), "{err}");
    assert!(
        err.contains(&format!("ssh-keyscan -p {} 127.0.0.1", sshd.port())),
        "{err}"
    );
    assert!(!remote.exists(), "nothing was written");

    // A different key recorded for this host: refused loudly.
    let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    sshd.write_known_hosts(&format!("[127.0.0.1]:{} {other}\n", sshd.port()));
    let err = fails(&sshd, &["at", &url, "create"], 10);
    assert!(err.contains("CHANGED"), "{err}");
    assert!(!remote.exists(), "nothing was written");

    // Only insecure_ignore_host_key skips the check.
    ok(
        &sshd,
        &["-o", "insecure_ignore_host_key=true", "at", &url, "create"],
    );
    assert!(remote.join("config").exists());

    // Hashed known_hosts entries are understood.
    sshd.write_known_hosts(&format!(
        "[127.0.0.1]:{} {}\n",
        sshd.port(),
        sshd.host_pubkey_line()
    ));
    sshd.known_hosts_hashed();
    ok(&sshd, &["at", &url, "ls"]);
}

fn authentication_agent_identity_and_wrong_key(sshd: Sshd) {
    let remote = sshd.remote_dir("store");
    let url = sshd.url(&remote);
    ok(&sshd, &["at", &url, "create"]);
    // Without the default key, only other keys can work.
    fs::remove_file(sshd.ssh_file("id_ed25519")).unwrap();
    let _ = fs::remove_file(sshd.ssh_file("id_ed25519.pub"));

    // A key the server does not know: exit 9, and the keys tried are named.
    let wrong = sshd.ssh_file("id_wrong");
    let err = fails(
        &sshd,
        &[
            "-o",
            &format!("identity={}", wrong.display()),
            "at",
            &url,
            "ls",
        ],
        9,
    );
    assert!(err.contains("id_wrong"), "{err}");

    // An encrypted key with no agent and no terminal: a clear failure, no hang.
    let enc = sshd.ssh_file("id_encrypted");
    let enc_opt = format!("identity={}", enc.display());
    let err = fails(&sshd, &["-o", &enc_opt, "at", &url, "ls"], 9);
    assert!(err.contains("KLOSET_SSH_KEY_PASSPHRASE"), "{err}");

    // ... which works with its passphrase in the environment,
    let out = sshd
        .cmd(bin())
        .env("KLOSET_SSH_KEY_PASSPHRASE", common::sshd::KEY_PASSPHRASE)
        .args(["-o", &enc_opt, "at", &url, "ls"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // ... and through ssh-agent holding it.
    let agent = sshd.agent();
    let out = sshd
        .cmd(bin())
        .env("SSH_AUTH_SOCK", agent.sock())
        .args(["at", &url, "ls"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unreachable_server_fails_cleanly(mut sshd: Sshd) {
    let remote = sshd.remote_dir("store");
    let url = sshd.url(&remote);
    ok(&sshd, &["at", &url, "create"]);
    sshd.stop();
    let err = fails(&sshd, &["at", &url, "ls"], 9);
    assert!(err.contains("127.0.0.1"), "{err}");
}

/// A backup and a restore survive connections killed in the middle; the store stays clean and
/// a re-run reuses what was uploaded.
fn connections_killed_mid_backup_and_restore(mut sshd: Sshd) {
    let src = tempfile::tempdir().unwrap();
    // About 80 MiB in 20 files: several packs, long enough to be interrupted.
    let mut x = 0x9e3779b97f4a7c15u64;
    for i in 0..20u64 {
        let mut data = Vec::with_capacity(4_000_000);
        while data.len() < 4_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        fs::write(src.path().join(format!("f{i:02}")), data).unwrap();
    }
    let remote = sshd.remote_dir("store");
    let url = sshd.url(&remote);
    ok(&sshd, &["at", &url, "-q", "create", "-no-compression"]);

    let child = sshd
        .cmd(bin())
        .args(["at", &url, "backup", "-json", src.path().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill connections once some packs are on the server.
    let packs = remote.join("packs");
    for _ in 0..400 {
        let n = walk_count(&packs);
        if n >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    sshd.kill_connections();
    let t = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    eprintln!("backup after the kill took {:?}", t.elapsed());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    // Either the backup retried and finished, or it failed cleanly with one line.
    if out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["files"], 20);
    } else {
        assert_eq!(out.status.code(), Some(9), "{err}");
    }
    ok(&sshd, &["at", &url, "check"]);
    // A re-run completes; if the first run failed, it reuses what was uploaded.
    let again = snapshot_json(&sshd, &url, &["-force-full", src.path().to_str().unwrap()]);
    assert_eq!(again["files"], 20);
    assert!(
        again["new_bytes"].as_u64().unwrap() < 80_000_000,
        "the re-run uploaded everything again: {again}"
    );
    ok(&sshd, &["at", &url, "check"]);

    // Restore with connections killed in the middle.
    let dst = tempfile::tempdir().unwrap();
    let to = dst.path().join("r");
    let child = sshd
        .cmd(bin())
        .args(["at", &url, "restore", "-to", to.to_str().unwrap(), "latest"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sshd.kill_connections();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    if !out.status.success() {
        // Re-run to completion.
        ok(
            &sshd,
            &["at", &url, "restore", "-to", to.to_str().unwrap(), "latest"],
        );
    }
    assert_same_tree(src.path(), &to);
}

fn walk_count(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk_count(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Work about to fan out (a restore's pack reads) opens the pool's other connections ahead of
/// time, in the background.
/// `dir` on the test server as a location, with options for a pool of `connections`.
fn location(
    sshd: &Sshd,
    dir: &Path,
    connections: usize,
) -> (kloset::sftp::Location, kloset::sftp::Options) {
    let loc = kloset::sftp::Location::parse(&sshd.url(dir)).unwrap();
    let key = format!("identity={}", sshd.ssh_file("id_ed25519").display());
    let n = format!("connections={connections}");
    let opts =
        kloset::sftp::Options::parse([key.as_str(), n.as_str(), "insecure_ignore_host_key=true"])
            .unwrap();
    (loc, opts)
}

fn a_warmed_pool_opens_its_connections_in_the_background(sshd: Sshd) {
    let (loc, opts) = location(&sshd, &sshd.remote_dir("pool"), 3);
    let pool = kloset::sftp::conn::Pool::open(&loc, &opts).unwrap();
    assert_eq!(pool.connections(), (1, 1));
    pool.warm();
    let t = std::time::Instant::now();
    while pool.connections() != (3, 3) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{:?} connections (open, idle) after warm(); sshd log: {}",
            pool.connections(),
            sshd.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Warming a full pool opens nothing more.
    pool.warm();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pool.connections(), (3, 3));
}

/// kloset's libssh2 does chacha20-poly1305@openssh.com with libcrypto (vendor/libssh2-sys):
/// the real OpenSSH server negotiates it, and writes and reads of every packet size come back
/// byte for byte (a wrong key stream or tag is a broken connection, not silent damage, but
/// both directions and the length field are checked here).
fn chacha20_poly1305_with_libcrypto_talks_to_openssh(sshd: Sshd) {
    let dir = sshd.remote_dir("cipher");
    fs::create_dir_all(&dir).unwrap();
    sshd.give(&dir);
    let (loc, opts) = location(&sshd, &dir, 1);
    let pool = kloset::sftp::conn::Pool::open(&loc, &opts).unwrap();
    let c = pool.take().unwrap();
    for (t, way) in [
        (ssh2::MethodType::CryptCs, "client to server"),
        (ssh2::MethodType::CryptSc, "server to client"),
    ] {
        assert_eq!(
            c.sess.methods(t),
            Some("chacha20-poly1305@openssh.com"),
            "negotiated cipher, {way}"
        );
    }
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    // Writes of many sizes, so packets of many lengths cross the wire in both directions.
    let path = dir.join("blob");
    let mut f = c.sftp().unwrap().create(&sshd.server_path(&path)).unwrap();
    let mut off = 0;
    for (i, step) in [1usize, 7, 4096, 32_768, 100_000, 1 << 20]
        .iter()
        .cycle()
        .enumerate()
    {
        if off == data.len() || i > 10_000 {
            break;
        }
        let end = (off + step).min(data.len());
        std::io::Write::write_all(&mut f, &data[off..end]).unwrap();
        off = end;
    }
    drop(f);
    assert_eq!(fs::read(&path).unwrap(), data, "written through SFTP");
    let mut back = Vec::new();
    std::io::Read::read_to_end(
        &mut c.sftp().unwrap().open(sshd.server_path(&path)).unwrap(),
        &mut back,
    )
    .unwrap();
    assert_eq!(back, data, "read back through SFTP");
    pool.give_back(c);
}

/// Listing packs, with all 256 `packs/xx/` directories (enough that listing takes longer than
/// the 50 ms after which it fans out over the pool's connections, 3 here): every pack is
/// listed once with its size; upload temporaries (dot files) and subdirectories are not.
fn packs_are_listed_over_several_connections(sshd: Sshd) {
    use kloset::store::backend::{Backend, FileType};
    let dir = sshd.remote_dir("list");
    let mut want = Vec::new();
    for i in 0..300u32 {
        let name = format!("{:02x}{:062x}", (i * 7) % 256, i);
        let sub = dir.join("packs").join(&name[..2]);
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(&name), vec![0u8; i as usize]).unwrap();
        if i % 5 == 0 {
            fs::write(sub.join(format!(".{name}.tmp")), b"partial").unwrap();
        }
        want.push((name, i as u64));
    }
    fs::create_dir_all(dir.join("packs/00/not-a-pack")).unwrap();
    want.sort();
    let (loc, opts) = location(&sshd, &dir, 3);
    let backend = kloset::sftp::SftpBackend::open(loc, &opts).unwrap();
    let list = || {
        let t = std::time::Instant::now();
        let got: Vec<(String, u64)> = backend
            .list(FileType::Pack)
            .unwrap()
            .into_iter()
            .map(|l| (l.name, l.size))
            .collect();
        eprintln!(
            "listed 256 directories in {:?} with {} connection(s)",
            t.elapsed(),
            backend.pool().connections().0
        );
        got
    };
    // With a connection idle: through a pipe on it, every directory at once.
    assert_eq!(list(), want);
    // With none idle: one request at a time, over the pool's connections.
    let held = backend.pool().take().unwrap();
    assert!(backend.pool().take_idle().is_none());
    assert_eq!(list(), want);
    backend.pool().give_back(held);

    // Several types at once (through one pipe), as each alone: a missing directory
    // (`condemned/`) is an empty list, upload temporaries are left out.
    fs::create_dir_all(dir.join("index")).unwrap();
    for i in 0..40u32 {
        fs::write(
            dir.join("index").join(format!("{i:064x}")),
            vec![1u8; i as usize],
        )
        .unwrap();
    }
    fs::write(dir.join("index/.tmp-upload"), b"partial").unwrap();
    let types = [
        FileType::Index,
        FileType::Condemned,
        FileType::Pack,
        FileType::Index,
    ];
    let alone: Vec<_> = types.iter().map(|t| backend.list(*t).unwrap()).collect();
    assert_eq!(alone[0].len(), 40);
    assert!(alone[1].is_empty());
    let together: Vec<_> = backend
        .list_several(&types)
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let names = |v: &Vec<Vec<kloset::store::backend::Listed>>| -> Vec<Vec<(String, u64)>> {
        v.iter()
            .map(|l| l.iter().map(|f| (f.name.clone(), f.size)).collect())
            .collect()
    };
    assert_eq!(names(&together), names(&alone));
}

/// Issue 15, `rm`: on an SFTP store, a keep policy removes the snapshots it does not keep (and
/// `-dry-run` removes none), named snapshots and filters select, an empty selection is refused
/// (exit 2); what is left restores exactly and checks clean.
fn rm_with_a_keep_policy_on_an_sftp_store(sshd: Sshd) {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path());
    let url = sshd.url(sshd.remote_dir("store"));
    ok(&sshd, &["at", &url, "create"]);
    let mut ids = Vec::new();
    for i in 0..4 {
        fs::write(src.path().join("round"), format!("{i}\n")).unwrap();
        let tag = format!("r{i}");
        ids.push(
            ok(
                &sshd,
                &[
                    "at",
                    &url,
                    "backup",
                    "-tag",
                    &tag,
                    src.path().to_str().unwrap(),
                ],
            )
            .trim()
            .to_string(),
        );
    }
    let listed = |sshd: &Sshd| -> Vec<String> {
        ok(sshd, &["at", &url, "ls"])
            .lines()
            .map(|l| l[..8].to_string())
            .collect()
    };
    assert_eq!(listed(&sshd), ids);

    fails(&sshd, &["at", &url, "rm"], 2);
    fails(&sshd, &["at", &url, "rm", "-keep-last", "x"], 2);
    fails(&sshd, &["at", &url, "rm", "-before", "someday"], 2);

    // Dry run: the plan, nothing removed.
    let plan = ok(
        &sshd,
        &[
            "at",
            &url,
            "rm",
            "-keep-last",
            "2",
            "-keep-tag",
            "r0",
            "-dry-run",
        ],
    );
    let rows: Vec<&str> = plan.lines().collect();
    assert_eq!(rows.len(), 4, "{plan}");
    let row = |id: &str| rows.iter().find(|r| r.starts_with(id)).copied().unwrap();
    assert!(
        row(&ids[0]).contains("keep") && row(&ids[0]).contains("tag r0"),
        "{plan}"
    );
    assert!(row(&ids[1]).contains("remove"), "{plan}");
    assert!(row(&ids[3]).contains("newest of its group, last"), "{plan}");
    assert_eq!(listed(&sshd), ids);

    // For real, through the alias `forget`, with JSON.
    let v: serde_json::Value = serde_json::from_str(&ok(
        &sshd,
        &[
            "at",
            &url,
            "forget",
            "-keep-last",
            "2",
            "-keep-tag",
            "r0",
            "-json",
        ],
    ))
    .unwrap();
    assert_eq!(v["removed"], 1, "{v}");
    assert_eq!(
        listed(&sshd),
        vec![ids[0].clone(), ids[2].clone(), ids[3].clone()]
    );

    // A named snapshot; then a filter.
    ok(&sshd, &["at", &url, "rm", &ids[0]]);
    ok(&sshd, &["at", &url, "rm", "-tag", "r2"]);
    assert_eq!(listed(&sshd), vec![ids[3].clone()]);

    // What is left restores exactly and the store checks clean.
    let dst = tempfile::tempdir().unwrap();
    let to = dst.path().join("r");
    ok(
        &sshd,
        &["at", &url, "restore", "-to", to.to_str().unwrap(), "latest"],
    );
    assert_same_tree(src.path(), &to);
    ok(&sshd, &["at", &url, "check"]);
}

/// Servers read SSH_FXP_SYMLINK's two paths in different orders (OpenSSH: target first; the
/// SFTP drafts and asyncssh: link first); the probe tells them apart and leaves nothing behind.
/// Before it, kloset always sent OpenSSH's order, and a restore to asyncssh made each symlink at
/// the path its target names, relative to the server's working directory.
fn symlink_order_is_asked_not_assumed(sshd: Sshd) {
    use kloset::sftp::destination::SymlinkOrder;
    let dir = sshd.remote_dir("probe");
    fs::create_dir(&dir).unwrap();
    sshd.give(&dir);
    let (loc, opts) = location(&sshd, &dir, 1);
    let pool = kloset::sftp::conn::Pool::open(&loc, &opts).unwrap();
    let c = pool.take().unwrap();
    let order = SymlinkOrder::probe(&c, &sshd.server_path(&dir)).unwrap();
    let want = match sshd.flavor() {
        Flavor::AsyncSsh => SymlinkOrder::LinkFirst,
        _ => SymlinkOrder::TargetFirst,
    };
    assert_eq!(order, want);
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "the probe left something"
    );
    pool.give_back(c);
}

/// An upload whose name is taken counts as done only if the file there is that upload: same
/// size under a content-addressed name, same bytes under any other (`config`, keys, locks).
/// Before, any file there was taken as "already uploaded": a second config write reported
/// success and left the first in place.
fn a_taken_name_is_not_an_upload_done(sshd: Sshd) {
    use kloset::store::backend::{Backend, FileType};
    let dir = sshd.remote_dir("taken");
    let (loc, opts) = location(&sshd, &dir, 1);
    let b = kloset::sftp::SftpBackend::open(loc, &opts).unwrap();
    b.init().unwrap();
    b.write(FileType::Config, "config", b"first").unwrap();
    let e = b
        .write(FileType::Config, "config", b"other")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already on the server, with other content"),
        "{e}"
    );
    assert_eq!(fs::read(dir.join("config")).unwrap(), b"first");
    // The same bytes again: a retry whose first rename went through.
    b.write(FileType::Config, "config", b"first").unwrap();
    let key = "0123456789abcdef0123456789abcdef";
    b.write(FileType::Key, key, b"key one").unwrap();
    assert!(b.write(FileType::Key, key, b"key two").is_err());
    assert_eq!(fs::read(dir.join("keys").join(key)).unwrap(), b"key one");
    // A content-addressed name: the same size is the same upload; another size is not.
    let pack = format!("ab{}", "0".repeat(62));
    b.write(FileType::Pack, &pack, b"0123").unwrap();
    b.write(FileType::Pack, &pack, b"0123").unwrap();
    let e = b
        .write(FileType::Pack, &pack, b"012345")
        .unwrap_err()
        .to_string();
    assert!(e.contains("with 4 bytes where this write has 6"), "{e}");
    // No temporary file stays behind.
    for d in [dir.clone(), dir.join("keys"), dir.join("packs/ab")] {
        for e in fs::read_dir(&d).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.to_string_lossy().starts_with('.'),
                "{name:?} left in {d:?}"
            );
        }
    }
}

/// A command's small store files (config, keys, locks, snapshots, index files) are written,
/// read, listed and removed through one pipe kept for the store's life: whole, with no
/// temporary file left, refused where the name is taken, a missing file missing, and one
/// larger than a piped read read whole all the same.
fn small_store_files_go_through_one_kept_pipe(sshd: Sshd) {
    use kloset::store::backend::{Backend, FileType};
    let dir = sshd.remote_dir("kept");
    let (loc, opts) = location(&sshd, &dir, 2);
    let b = kloset::sftp::SftpBackend::open(loc, &opts).unwrap();
    b.init().unwrap();
    assert!(!b.has_kept_pipe());
    let lock = "00112233445566778899aabbccddeeff";
    b.write(FileType::Lock, lock, b"a lock").unwrap();
    assert!(b.has_kept_pipe(), "the first write started no pipe");
    // The pool opens another connection in place of the pipe's.
    assert_eq!(b.pool().connections().0, 0);
    // A small pack too (an unchanged backup's few new trees), where its `packs/XX` is there
    // (made as the server's user would): no pool connection logs in for it (at 100 ms, that
    // login and the pool's upload were 2.65 s of a 5.6 s backup).
    let pack = format!("ab{}", "7".repeat(62));
    let xx = dir.join("packs").join("ab");
    fs::create_dir(&xx).unwrap();
    let owner = fs::metadata(dir.join("packs")).unwrap();
    std::os::unix::fs::chown(&xx, Some(owner.uid()), Some(owner.gid())).unwrap();
    let small: Vec<u8> = (0..200_000u32).map(|i| (i * 13 + i / 7) as u8).collect();
    b.write(FileType::Pack, &pack, &small).unwrap();
    assert_eq!(fs::read(xx.join(&pack)).unwrap(), small);
    // And where its `packs/XX` is not there yet: made through the pipe too, mode 0700.
    let pack = format!("cd{}", "8".repeat(62));
    b.write(FileType::Pack, &pack, &small[..1000]).unwrap();
    let xx = dir.join("packs").join("cd");
    assert_eq!(fs::read(xx.join(&pack)).unwrap(), &small[..1000]);
    assert_eq!(
        fs::metadata(&xx).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        b.pool().connections().0,
        0,
        "a pool connection for a small pack"
    );
    // A file where a `packs/XX` directory should be (a broken or hostile server): the write
    // fails, once the pipe's MKDIR and the pool's way have both been refused, and leaves
    // nothing behind.
    let xx = dir.join("packs").join("ef");
    fs::write(&xx, b"not a directory").unwrap();
    let pack = format!("ef{}", "9".repeat(62));
    assert!(b.write(FileType::Pack, &pack, &small[..1000]).is_err());
    assert_eq!(fs::read(&xx).unwrap(), b"not a directory");
    fs::remove_file(&xx).unwrap();
    assert_eq!(fs::read(dir.join("locks").join(lock)).unwrap(), b"a lock");
    assert_eq!(b.read(FileType::Lock, lock).unwrap(), b"a lock");
    let names = |t| -> Vec<String> { b.list(t).unwrap().into_iter().map(|l| l.name).collect() };
    assert_eq!(names(FileType::Lock), vec![lock.to_string()]);
    // Taken: refused, the file there kept.
    assert!(b.write(FileType::Lock, lock, b"other").is_err());
    assert_eq!(fs::read(dir.join("locks").join(lock)).unwrap(), b"a lock");
    b.remove(FileType::Lock, lock).unwrap();
    assert!(names(FileType::Lock).is_empty());
    // Removing what is not there is no error; reading it is.
    b.remove(FileType::Lock, lock).unwrap();
    assert!(b.read(FileType::Lock, lock).is_err());
    // Larger than one piped read, and than one WRITE request: both whole.
    let big: Vec<u8> = (0..(600u32 << 10))
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let snap = "5".repeat(64);
    b.write(FileType::Snapshot, &snap, &big).unwrap();
    assert_eq!(b.read(FileType::Snapshot, &snap).unwrap(), big);
    let index = "6".repeat(64);
    b.write(FileType::Index, &index, &big[..100_000]).unwrap();
    assert_eq!(b.read(FileType::Index, &index).unwrap(), &big[..100_000]);
    assert!(b.has_kept_pipe());
    for d in [
        dir.clone(),
        dir.join("locks"),
        dir.join("snapshots"),
        dir.join("index"),
        dir.join("packs").join("ab"),
        dir.join("packs").join("cd"),
    ] {
        for e in fs::read_dir(&d).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.to_string_lossy().starts_with('.'),
                "{name:?} left in {d:?}"
            );
        }
    }
}

/// Two `create`s of one store at once: one makes it, the other fails in one line, and the store
/// opens with the winner's passphrase. Before, both reported success (the loser's config
/// rename was refused and taken as "already uploaded"), and the loser's passphrase then failed.
fn racing_creates_make_one_store(sshd: Sshd) {
    for round in 0..6 {
        let url = sshd.url(sshd.remote_dir("race"));
        let spawn = |pass: &str| {
            sshd.cmd(bin())
                .env("KLOSET_PASSPHRASE", pass)
                .args(["at", &url, "create"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn("pass-a"), spawn("pass-b"));
        let outs = [
            ("pass-a", a.wait_with_output().unwrap()),
            ("pass-b", b.wait_with_output().unwrap()),
        ];
        let won: Vec<&str> = outs
            .iter()
            .filter(|(_, o)| o.status.success())
            .map(|(p, _)| *p)
            .collect();
        let errs: Vec<String> = outs
            .iter()
            .map(|(_, o)| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect();
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}: {errs:?}");
        for (_, o) in outs.iter().filter(|(_, o)| !o.status.success()) {
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(err.trim().lines().count(), 1, "round {round}: {err}");
        }
        let out = sshd
            .cmd(bin())
            .env("KLOSET_PASSPHRASE", won[0])
            .args(["at", &url, "ls"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: the winner's store does not open: {} ({errs:?})",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `sync` between a local store and one on the server, both ways: each copy (a new snapshot
/// id in the other store) restores exactly, `check` passes on both, a second run copies
/// nothing.
fn sync_to_and_from_the_server(sshd: Sshd) {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path());
    let local = tempfile::tempdir().unwrap();
    let local = local.path().join("s");
    let local = local.to_str().unwrap();
    let remote = sshd.url(sshd.remote_dir("synced"));
    ok(&sshd, &["at", local, "create"]);
    ok(&sshd, &["at", &remote, "create"]);
    ok(
        &sshd,
        &["at", local, "backup", src.path().to_str().unwrap()],
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&sshd, &["at", local, "sync", "-json", "to", &remote])).unwrap();
    assert_eq!(v["copied"], 1, "{v}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&sshd, &["at", local, "sync", "-json", "to", &remote])).unwrap();
    assert_eq!(v["copied"], 0, "{v}");
    ok(&sshd, &["at", &remote, "check"]);
    let dst = tempfile::tempdir().unwrap();
    let to = dst.path().join("r");
    ok(
        &sshd,
        &[
            "at",
            &remote,
            "restore",
            "-to",
            to.to_str().unwrap(),
            "latest",
        ],
    );
    assert_same_tree(src.path(), &to);

    // A snapshot made on the server's store comes back.
    fs::write(src.path().join("www/index.html"), b"<h1>second</h1>\n").unwrap();
    ok(
        &sshd,
        &["at", &remote, "backup", src.path().to_str().unwrap()],
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&sshd, &["at", local, "sync", "-json", "from", &remote])).unwrap();
    assert_eq!(v["copied"], 1, "{v}");
    ok(&sshd, &["at", local, "check"]);
    let to = dst.path().join("r2");
    ok(
        &sshd,
        &[
            "at",
            local,
            "restore",
            "-to",
            to.to_str().unwrap(),
            "latest",
        ],
    );
    assert_same_tree(src.path(), &to);
}

/// kloset commits every store file by a rename that must not replace an existing file; on a
/// server whose plain rename does (here asyncssh's, changed to), `create` says so in one line
/// and makes no store, instead of a store where two writers could overwrite each other's files
/// (before, it made one).
#[test]
fn create_refuses_a_server_whose_rename_replaces() {
    let Some(sshd) = Sshd::start_flavor(Flavor::AsyncSshRenameReplaces) else {
        return;
    };
    let remote = sshd.remote_dir("replacing");
    let err = fails(&sshd, &["at", &sshd.url(&remote), "create"], 1);
    assert!(err.contains("rename replaces an existing file"), "{err}");
    let left: Vec<_> = fs::read_dir(&remote)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the store directory: {left:?}");
}

/// The largest count in the trace lines of `stderr` that stands between `before` and `after`.
fn trace_count(stderr: &str, before: &str, after: &str) -> Option<usize> {
    stderr
        .lines()
        .filter_map(|l| l.split(before).nth(1)?.split_once(after).map(|(n, _)| n))
        .map(|n| n.trim().parse().expect("a count"))
        .max()
}

/// The most requests the restore's SFTP pipe had in flight at once, from its trace lines.
fn most_in_flight(stderr: &str) -> Option<usize> {
    trace_count(stderr, "at most ", " requests in flight in the pipe")
}

/// How many pieces of larger files the restore wrote through its SFTP pipes, from its trace.
fn pieces_piped(stderr: &str) -> Option<usize> {
    trace_count(
        stderr,
        "in the pipe; ",
        " pieces of larger files written through it",
    )
}

/// A restore onto the server sends its directories, small files, the pieces of larger ones,
/// symlinks and metadata through one pipelined channel (`sftp::pipe`), many requests in
/// flight rather than one round trip after another; the result is the same tree as without
/// the pipe (each larger file's mode and mtime set after all its pieces landed), on a new
/// destination and over an existing one (where each file is removed and created anew). On
/// loopback the server answers about as fast as the restore asks, so only a few are in flight
/// at once; tests/faults.rs checks the depth through a link with latency.
fn restore_onto_the_server_keeps_many_requests_in_flight(sshd: Sshd) {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path());
    // Files of many chunks, with modes and old mtimes that their writes would spoil.
    for (i, mib) in [(0u64, 9usize), (1, 5)] {
        let p = src.path().join(format!("large{i}"));
        fs::write(&p, common::tree::pseudo_random(i, mib << 20)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000 + i);
        fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    for d in 0..8 {
        let dir = src.path().join(format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..40 {
            let p = dir.join(format!("f{f}"));
            fs::write(&p, format!("file {d}/{f}\n").repeat(f + 1)).unwrap();
            fs::set_permissions(
                &p,
                fs::Permissions::from_mode(0o600 + (f as u32 % 8) * 0o10),
            )
            .unwrap();
        }
        fs::write(dir.join("zeros"), vec![0u8; 70_000]).unwrap();
        symlink(format!("f{d}"), dir.join("l")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o751)).unwrap();
    }
    let store = tempfile::tempdir().unwrap();
    let store = store.path().join("s");
    let store = store.to_str().unwrap();
    ok(&sshd, &["at", store, "create"]);
    ok(
        &sshd,
        &["at", store, "backup", src.path().to_str().unwrap()],
    );

    let restore = |dst: &Path, pipe: bool, extra: &[&str]| {
        let url = sshd.url(dst);
        let mut args = vec!["at", store, "restore"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-to", &url, "latest"]);
        let mut c = sshd.cmd(bin());
        c.args(&args).env("KLOSET_TRACE", "1");
        if !pipe {
            c.env("KLOSET_SFTP_PIPE", "0");
        } else {
            // As on a far server: loopback would write the pieces on the pool's connections.
            c.env("KLOSET_SFTP_WRITE_PIPES", "3");
        }
        let out = c.output().expect("run kloset");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_same_tree(src.path(), dst);
        (most_in_flight(&err), pieces_piped(&err))
    };
    let dst = sshd.remote_dir("piped");
    let (most, pieces) = restore(&dst, true, &[]);
    let most = most.expect("the restore used the pipe");
    assert!(most >= 2, "at most {most} requests in flight");
    // large0 (9 MiB) is of two chunks at least (8 MiB the largest); big.bin and large1 are
    // of several in most stores (1 MiB on average, cut where each store's seed says).
    assert!(pieces.is_some_and(|n| n >= 2), "{pieces:?} pieces piped");
    // Over what is there: every file removed and made again, through the pipe too.
    fs::write(dst.join("d0/f0"), b"changed on the server").unwrap();
    fs::write(dst.join("large0"), b"changed on the server").unwrap();
    let (most, pieces) = restore(&dst, true, &["-overwrite", "always"]);
    let most = most.expect("the pipe again");
    assert!(most >= 2, "at most {most} requests in flight");
    assert!(pieces.is_some_and(|n| n >= 2), "{pieces:?} pieces piped");
    // Without the pipe (one request at a time on pooled connections): the same tree.
    let plain = sshd.remote_dir("plain");
    assert_eq!(restore(&plain, false, &[]), (None, None));
}

/// A directory of 20,000 symlinks listed through the restore's pipe: their READLINKs go a
/// bounded number at a time. All at once, the answers (over 2 MiB) outgrew the channel's
/// window while the requests still filled the server's: both sides waited until the timeout.
#[test]
fn a_directory_of_many_symlinks_lists_through_the_pipe() {
    let Some(sshd) = Sshd::start() else { return };
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("links");
    fs::create_dir(&dir).unwrap();
    for i in 0..20_000 {
        symlink(
            format!("/a/target/long/enough/to/weigh/on/the/window/{i:08}"),
            dir.join(format!("l{i}")),
        )
        .unwrap();
    }
    let store = tempfile::tempdir().unwrap();
    let store = store.path().join("s");
    let store = store.to_str().unwrap();
    ok(&sshd, &["at", store, "create"]);
    ok(
        &sshd,
        &[
            "-quiet",
            "at",
            store,
            "backup",
            src.path().to_str().unwrap(),
        ],
    );
    let dst = sshd.remote_dir("links");
    let url = sshd.url(&dst);
    ok(
        &sshd,
        &[
            "-quiet",
            "-o",
            "timeout=20s",
            "at",
            store,
            "restore",
            "-to",
            &url,
            "latest",
        ],
    );
    assert_same_tree(src.path(), &dst);
    // Again over it: the listing reads every target, and finds each link already right.
    let args = [
        "-o",
        "timeout=20s",
        "at",
        store,
        "restore",
        "-overwrite",
        "if-changed",
        "-to",
        &url,
        "latest",
    ];
    let out = sshd
        .cmd(bin())
        .env("KLOSET_TRACE", "1")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(most_in_flight(&err).is_some(), "{err}");
    assert_same_tree(src.path(), &dst);
}

/// A backup of a remote tree lists its directories and reads its small files through the
/// pipe (`sftp::pipe`): the files asked for ahead of the workers arrive together, and their
/// attributes after the read come with them. What it stores restores as the tree was, and an
/// unchanged second backup reads nothing.
fn a_remote_source_is_read_ahead_through_the_pipe(sshd: Sshd) {
    let data = sshd.remote_dir("many");
    for d in 0..4 {
        let dir = data.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..50 {
            fs::write(
                dir.join(format!("f{f}")),
                format!("{d}/{f}\n").repeat(f * 50 + 1),
            )
            .unwrap();
        }
        symlink(format!("f{d}"), dir.join("link")).unwrap();
        fs::write(dir.join("empty"), b"").unwrap();
    }
    sshd.give(&data);
    let store = tempfile::tempdir().unwrap();
    let store = store.path().join("s");
    let store = store.to_str().unwrap();
    ok(&sshd, &["at", store, "create"]);
    let out = sshd
        .cmd(bin())
        .env("KLOSET_TRACE", "1")
        .args(["at", store, "backup", &sshd.url(&data)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let piped: usize = err
        .lines()
        .find_map(|l| {
            l.split("sftp source: ")
                .nth(1)?
                .split_once(" files read ahead through the pipe")
                .map(|(n, _)| n)
        })
        .expect("the trace line")
        .trim()
        .parse()
        .unwrap();
    assert!(piped >= 100, "{piped} files read through the pipe: {err}");
    let second = snapshot_json(&sshd, store, &[&sshd.url(&data)]);
    assert_eq!(second["bytes_read"], 0, "{second}");
    let dst = tempfile::tempdir().unwrap();
    let to = dst.path().join("r");
    ok(
        &sshd,
        &[
            "at",
            store,
            "restore",
            "-to",
            to.to_str().unwrap(),
            "latest",
        ],
    );
    assert_same_tree(&data, &to);
}

/// `kloset ARGS` traced (`KLOSET_TRACE=1`) with the passphrase `pass`: (exit code, stderr).
fn traced(sshd: &Sshd, pass: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = sshd
        .cmd(bin())
        .env("KLOSET_TRACE", "1")
        .env("KLOSET_PASSPHRASE", pass)
        .env_remove("XDG_CACHE_HOME")
        .args(args)
        .output()
        .expect("run kloset");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "kloset panicked: {err}");
    (out.status.code(), err)
}

/// Did this traced run derive the key during the login (from the remembered key file), or
/// after reading the store's key files?
fn derived_early(err: &str) -> (bool, bool) {
    let early = err.contains("keys: derived during the login");
    let late = err
        .lines()
        .any(|l| l.trim_end().ends_with("key derivation"));
    (early, late)
}

/// The second command against a store derives its key while SSH logs in, from the key file
/// that opened the store the first time; a wrong passphrase still fails (exit 4); a damaged
/// remembered file, or a new store created at the same URL, costs only the head start.
fn key_derivation_starts_during_the_login(sshd: Sshd) {
    let src = tempfile::tempdir().unwrap();
    sample_tree(src.path());
    let remote = sshd.remote_dir("early");
    let url = sshd.url(&remote);
    let pass = "correct horse battery staple";
    let (code, err) = traced(&sshd, pass, &["at", &url, "create"]);
    assert_eq!(code, Some(0), "{err}");
    let backup = ["-quiet", "at", &url, "backup", src.path().to_str().unwrap()];
    let (code, err) = traced(&sshd, pass, &backup);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        derived_early(&err),
        (false, true),
        "nothing remembered yet: {err}"
    );
    let (code, err) = traced(&sshd, pass, &["at", &url, "ls"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(derived_early(&err), (true, false), "{err}");

    // A wrong passphrase: the remembered key does not open, nor does any other.
    let (code, err) = traced(&sshd, "wrong", &["at", &url, "ls"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("wrong passphrase"), "{err}");
    // A backup writes its lock while the store opens: with the wrong passphrase it fails
    // the same way and takes its lock file away.
    let (code, err) = traced(&sshd, "wrong", &backup);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!(fs::read_dir(remote.join("locks")).unwrap().count(), 0);

    // The remembered file damaged: the keys come from the store, and it is written again.
    let dir = sshd.home().join(".cache/kloset/locations");
    let files: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one store remembered");
    let meta = files[0].metadata().unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    fs::write(files[0].path(), b"not what kloset wrote").unwrap();
    let (code, err) = traced(&sshd, pass, &["at", &url, "ls"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(derived_early(&err), (false, true), "{err}");
    let (code, err) = traced(&sshd, pass, &["at", &url, "ls"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(derived_early(&err), (true, false), "written again: {err}");

    // Another store at the same URL (other config, other keys): opened the usual way.
    fs::remove_dir_all(&remote).unwrap();
    let (code, err) = traced(&sshd, "another passphrase", &["at", &url, "create"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = traced(&sshd, "another passphrase", &backup);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(derived_early(&err), (false, true), "{err}");
    let (code, err) = traced(&sshd, pass, &["at", &url, "ls"]);
    assert_eq!(code, Some(4), "the old passphrase opens nothing: {err}");
}

/// A backup writes its lock while it opens the store: pointed at a path where no store is
/// (nothing there, or a directory of someone's files), it says so (exit 5, one line) and
/// leaves the server as it was: no `locks/` made, no lock file, nothing else.
#[test]
fn a_backup_into_no_store_leaves_nothing_on_the_server() {
    let Some(sshd) = Sshd::start() else { return };
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("f"), b"data").unwrap();
    let src = src.path().to_str().unwrap();
    let missing = sshd.remote_dir("no-store-here");
    let _ = fs::remove_dir_all(&missing);
    let err = fails(&sshd, &["at", &sshd.url(&missing), "backup", src], 5);
    assert!(err.contains("no kloset store"), "{err}");
    assert!(!missing.exists(), "the backup made {}", missing.display());
    let other = sshd.remote_dir("someones-files");
    fs::create_dir_all(other.join("docs")).unwrap();
    fs::write(other.join("docs/a.txt"), b"keep").unwrap();
    let err = fails(&sshd, &["at", &sshd.url(&other), "backup", src], 5);
    assert!(err.contains("no kloset store"), "{err}");
    let mut left: Vec<String> = fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["docs"]);
}

/// `Conn::bounded`, the guard on the few calls made on a connection after a failed write: a
/// call still running a few seconds past the session's timeout has the connection cut under
/// it (its socket shut, so that a libssh2 wait on it ends at once), and what is asked of the
/// connection afterwards fails at once.
#[test]
fn a_bounded_call_outlasting_the_timeout_has_its_connection_cut() {
    let Some(sshd) = Sshd::start() else { return };
    let dir = sshd.remote_dir("bounded");
    let loc = kloset::sftp::Location::parse(&sshd.url(&dir)).unwrap();
    let key = format!("identity={}", sshd.ssh_file("id_ed25519").display());
    let opts =
        kloset::sftp::Options::parse([key.as_str(), "timeout=1s", "insecure_ignore_host_key=true"])
            .unwrap();
    let pool = kloset::sftp::conn::Pool::open(&loc, &opts).unwrap();
    let c = pool.take().unwrap();
    // A call that returns in time leaves the connection as it was (the guard has ended when
    // `bounded` returns).
    assert!(c.bounded(|| c.sftp().unwrap().stat(Path::new("/")).is_ok()));
    assert!(!c.is_broken(), "cut after the call had returned");
    assert!(c.sftp().unwrap().stat(Path::new("/")).is_ok());
    // One that does not return on its own (it waits for the cut) is cut.
    let started = std::time::Instant::now();
    let cut = c.bounded(|| {
        while !c.is_broken() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        c.is_broken()
    });
    let took = started.elapsed();
    assert!(cut, "not cut within {took:?}");
    assert!(
        took >= Duration::from_secs(1),
        "cut before the timeout: {took:?}"
    );
    let asked = std::time::Instant::now();
    assert!(c.sftp().unwrap().stat(Path::new("/")).is_err());
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "a cut connection waited"
    );
    pool.give_back(c);
}

/// ProxyJump and ProxyCommand in ~/.ssh/config are followed, as OpenSSH follows them: the
/// connection goes through the command, never straight to the host. ProxyJump runs
/// `ssh -F <that config> -W [host]:port JUMP` (an `ssh` on PATH that logs its arguments shows
/// it); a ProxyCommand is run by `sh -c` with `%h`/`%p` expanded, and the host name is not
/// looked up here (it does not resolve in this test); a proxy that fails ends the command
/// at once, exit 9, in one line. Before, both were ignored: a direct connection, or none.
#[test]
fn proxy_jump_and_proxy_command_are_followed() {
    use std::fmt::Write as _;
    let Some(sshd) = Sshd::start() else { return };
    let store = sshd.remote_dir("behind-a-jump");
    ok(&sshd, &["at", &sshd.url(&store), "create"]);
    let home = sshd.home();
    let config = sshd.ssh_config_path();
    let known = sshd.known_hosts_path();
    let key = sshd.ssh_file("id_ed25519");
    let port = sshd.port();
    let log = home.join("ssh-argv.log");
    let bin_dir = home.join("bin");
    fs::create_dir_all(&bin_dir).unwrap();
    let wrapper = bin_dir.join("ssh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nexec /usr/bin/ssh \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let common = format!(
        "    User {user}\n    IdentityFile {key}\n    UserKnownHostsFile {known}\n    BatchMode yes\n",
        user = sshd.user(),
        key = key.display(),
        known = known.display()
    );
    let mut text = String::new();
    write!(
        text,
        "Host jumpbox\n    HostName 127.0.0.1\n    Port {port}\n{common}\
         Host via-jump\n    HostName 127.0.0.1\n    Port {port}\n{common}    ProxyJump jumpbox\n\
         Host via-command\n    HostName kloset-no-such-host.invalid\n    Port {port}\n{common}    \
         ProxyCommand /usr/bin/ssh -F {cfg} -W 127.0.0.1:%p jumpbox\n\
         Host broken-proxy\n    HostName 127.0.0.1\n    Port {port}\n{common}    \
         ProxyCommand sh -c 'echo no route to the bastion >&2; exit 3'\n\n",
        cfg = config.display()
    )
    .unwrap();
    text.push_str(&fs::read_to_string(&config).unwrap());
    fs::write(&config, text).unwrap();
    // The host key is checked under the host name, as OpenSSH does through a proxy.
    let mut hosts = fs::read_to_string(&known).unwrap();
    hosts.push_str(&format!(
        "[kloset-no-such-host.invalid]:{port} {}\n",
        sshd.host_pubkey_line()
    ));
    fs::write(&known, hosts).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let remote = store.to_str().unwrap();
    let run_at = |host: &str| {
        sshd.cmd(bin())
            .env("PATH", &path)
            .args(["at", &format!("sftp://{host}{remote}"), "ls"])
            .output()
            .unwrap()
    };

    let out = run_at("via-jump");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "via ProxyJump: {err}");
    let argv = fs::read_to_string(&log).unwrap_or_default();
    let want = format!("-F {} -W [127.0.0.1]:{port} jumpbox", config.display());
    assert!(argv.lines().any(|l| l == want), "ssh was run as: {argv}");

    let out = run_at("via-command");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "via ProxyCommand: {err}");

    let started = std::time::Instant::now();
    let out = run_at("broken-proxy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{err}");
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("kloset:")).collect();
    assert_eq!(ours.len(), 1, "{err}");
    assert!(
        ours[0].contains("proxy command `sh -c 'echo no route to the bastion >&2; exit 3'` ended"),
        "{err}"
    );
    assert!(
        err.contains("no route to the bastion"),
        "its stderr is shown: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}
