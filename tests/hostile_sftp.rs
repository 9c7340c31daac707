//! SFTP servers that lie, vanish or fall silent, and SFTP destinations with traps in them
//! (issue 13, items 2, 3, 6 and 7), against a real OpenSSH server on loopback. The lying
//! server is OpenSSH's sftp-server behind tests/common/hostile_sftp.py.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::sshd::Sshd;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kloset"))
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Run kloset, killing it (and failing the test) if it has not ended within `limit`.
fn run_within(mut cmd: Command, limit: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .expect("run kloset");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kloset still running after {limit:?} (it hangs); stderr so far:\n{}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let r = Run {
        code: status.code(),
        stdout: fs::read_to_string(&out).unwrap(),
        stderr: fs::read_to_string(&err).unwrap(),
        took: start.elapsed(),
    };
    assert!(
        !r.stderr.contains("panicked"),
        "kloset panicked: {}",
        r.stderr
    );
    eprintln!(
        "kloset exit {:?} after {:?}; stderr:\n{}",
        r.code, r.took, r.stderr
    );
    r
}

fn kloset(sshd: &Sshd, args: &[&str]) -> Run {
    let mut cmd = sshd.cmd(bin());
    cmd.args(args);
    run_within(cmd, Duration::from_secs(120))
}

fn ok(sshd: &Sshd, args: &[&str]) -> String {
    let r = kloset(sshd, args);
    assert_eq!(r.code, Some(0), "kloset {args:?}: {}", r.stderr);
    r.stdout
}

fn snapshot_count(sshd: &Sshd, store: &str) -> usize {
    let out = ok(sshd, &["at", store, "ls", "-json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ls -json");
    v.as_array().expect("ls -json is an array").len()
}

/// Every path under `root`, relative, sorted.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

/// (content, mode, uid, gid, nlink) of a file.
fn identity(p: &Path) -> (Vec<u8>, u32, u32, u32, u64) {
    let m = fs::symlink_metadata(p).unwrap();
    (fs::read(p).unwrap(), m.mode(), m.uid(), m.gid(), m.nlink())
}

/// A file outside any tree a test backs up or restores into, owned 4321:4321, mode 0640.
fn outside_file(p: &Path, content: &[u8]) {
    fs::write(p, content).unwrap();
    std::os::unix::fs::chown(p, Some(4321), Some(4321)).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(0o640)).unwrap();
}

/// A local store (the source server is the one that misbehaves) with one good snapshot of
/// `src`; returns the store's path.
fn store_with_one_snapshot(sshd: &Sshd, tmp: &Path, src_url: &str) -> String {
    let store = tmp.join("store");
    let store = store.to_str().unwrap().to_string();
    ok(sshd, &["at", &store, "create"]);
    ok(sshd, &["at", &store, "backup", src_url]);
    assert_eq!(snapshot_count(sshd, &store), 1);
    store
}

fn source_tree(sshd: &Sshd) -> std::path::PathBuf {
    let src = sshd.remote_dir("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("keep"), b"kept\n").unwrap();
    fs::write(src.join("d/inner"), b"inner\n").unwrap();
    for i in 0..20 {
        fs::create_dir_all(src.join(format!("sub{i}"))).unwrap();
        fs::write(src.join(format!("sub{i}/f")), format!("{i}\n")).unwrap();
    }
    src
}

#[test]
fn a_lying_source_listing_is_skipped_and_reported_and_never_restored() {
    let Some(sshd) = Sshd::start_hostile() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = source_tree(&sshd);
    let outside = sshd.remote_dir("outside");
    fs::create_dir(&outside).unwrap();
    outside_file(&outside.join("inner"), b"outside\n");
    let before = identity(&outside.join("inner"));

    let store = tmp.path().join("store");
    let store = store.to_str().unwrap();
    ok(&sshd, &["at", store, "create"]);
    // The server adds to the listing of `src`: a second `.` and `..`, `a/b`, a 300-byte name,
    // a name with a NUL byte, and a second `d`: a symlink to `outside`.
    sshd.hostile_mode(&format!("inject {} {}", src.display(), outside.display()));
    let r = kloset(&sshd, &["at", store, "backup", &sshd.url(&src)]);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    let dir = src.display().to_string();
    for (name, why) in [
        (".", "name is `.` or `..`"),
        ("..", "name is `.` or `..`"),
        ("a/b", "name contains `/`"),
        (&"x".repeat(300), "longer than 255 bytes"),
        // Escaped twice: by the report (`escape_debug`), then by the CLI, which shows every
        // backslash doubled as `ls -b` does.
        ("nul\\\\0name", "NUL byte"),
        ("d", "a second entry with the same name"),
    ] {
        let line = format!("{dir}: entry \"{name}\" skipped: ");
        assert!(
            r.stderr
                .lines()
                .any(|l| l.contains(&line) && l.contains(why)),
            "no report of {name:?} ({why}) in:\n{}",
            r.stderr
        );
    }
    assert!(
        r.stderr.contains("6 file(s) could not be read"),
        "{}",
        r.stderr
    );

    // The snapshot holds the real entries only: `d` is the directory.
    sshd.hostile_mode("");
    let target = tmp.path().join("target");
    ok(
        &sshd,
        &[
            "at",
            store,
            "restore",
            "-to",
            target.to_str().unwrap(),
            "latest",
        ],
    );
    let mut want = vec!["d".to_string(), "d/inner".into(), "keep".into()];
    for i in 0..20 {
        want.push(format!("sub{i}"));
        want.push(format!("sub{i}/f"));
    }
    want.sort();
    assert_eq!(listing(&target), want);
    assert!(fs::symlink_metadata(target.join("d")).unwrap().is_dir());
    assert_eq!(fs::read(target.join("d/inner")).unwrap(), b"inner\n");
    assert_eq!(identity(&outside.join("inner")), before);
    assert_eq!(listing(&outside), vec!["inner".to_string()]);
    assert_eq!(
        listing(tmp.path())
            .iter()
            .filter(|p| !p.starts_with("store"))
            .count(),
        want.len() + 1,
        "the restore wrote next to its target: {:?}",
        listing(tmp.path())
    );
}

#[test]
fn a_connection_dropped_for_good_during_the_walk_saves_no_snapshot_exit_9() {
    let Some(sshd) = Sshd::start_hostile() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = source_tree(&sshd);
    let url = sshd.url(&src);
    let store = store_with_one_snapshot(&sshd, tmp.path(), &url);
    // Once the backup has stat'ed its root, the server's SFTP side exits in the middle of
    // listing it, and every later session exits at once.
    sshd.hostile_mode(&format!("drop {}", src.display()));
    let r = kloset(&sshd, &["at", &store, "backup", &url]);
    assert_eq!(r.code, Some(9), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stdout.is_empty(),
        "a snapshot id was printed: {}",
        r.stdout
    );
    sshd.hostile_mode("");
    assert_eq!(snapshot_count(&sshd, &store), 1, "a snapshot was saved");
}

#[test]
fn a_connection_dropped_for_good_while_files_are_read_saves_no_snapshot_exit_9() {
    let Some(sshd) = Sshd::start_hostile() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // One directory: its listing is done before any file is read, so the failure comes from
    // reading a file.
    let src = sshd.remote_dir("flat");
    fs::create_dir(&src).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("f{i}")), format!("{i}\n")).unwrap();
    }
    let url = sshd.url(&src);
    let store = store_with_one_snapshot(&sshd, tmp.path(), &url);
    // Changed files are read again; the server goes away at the first one.
    for i in 0..20 {
        fs::write(src.join(format!("f{i}")), format!("changed {i}\n")).unwrap();
    }
    sshd.hostile_mode(&format!("drop-read {}", src.display()));
    let r = kloset(&sshd, &["at", &store, "backup", &url]);
    assert_eq!(r.code, Some(9), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stdout.is_empty(),
        "a snapshot id was printed: {}",
        r.stdout
    );
    assert!(r.stderr.contains("/f"), "not a file read: {}", r.stderr);
    sshd.hostile_mode("");
    assert_eq!(snapshot_count(&sshd, &store), 1, "a snapshot was saved");
}

#[test]
fn a_silent_source_server_fails_within_the_timeout_instead_of_hanging() {
    let Some(sshd) = Sshd::start_hostile() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = source_tree(&sshd);
    let url = sshd.url(&src);
    let store = store_with_one_snapshot(&sshd, tmp.path(), &url);
    // Once the backup has stat'ed its root, the server stops answering in the middle of
    // listing it and never closes the channel; every later session is silent from the start.
    sshd.hostile_mode(&format!("silent {}", src.display()));
    let mut cmd = sshd.cmd(bin());
    cmd.args(["-o", "timeout=3s", "at", &store, "backup", &url]);
    let r = run_within(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(9), "{}", r.stderr);
    assert!(r.stderr.contains("did not answer for 3s"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    // The walk's requests time out together, then every connection is cut: a few timeouts at
    // most, not one per retry and per connection.
    assert!(
        r.took < Duration::from_secs(15),
        "took {:?}: {}",
        r.took,
        r.stderr
    );
    sshd.hostile_mode("");
    assert_eq!(snapshot_count(&sshd, &store), 1, "a snapshot was saved");
}

#[test]
fn bad_timeout_values_are_refused() {
    let Some(sshd) = Sshd::start() else {
        return;
    };
    for bad in ["timeout=0", "timeout=soon", "timeout=3d"] {
        let r = kloset(&sshd, &["-o", bad, "at", "/nonexistent", "ls"]);
        assert_ne!(r.code, Some(0), "{bad}");
        assert!(r.stderr.contains("timeout"), "{bad}: {}", r.stderr);
    }
}

/// Connects to the test server as a library user (no HOME needed).
fn destination(sshd: &Sshd, root: &Path) -> kloset::sftp::SftpDestination {
    let loc = kloset::sftp::Location::parse(&sshd.url(root)).unwrap();
    let mut opts = kloset::sftp::Options::default();
    opts.set("identity", sshd.ssh_file("id_ed25519").to_str().unwrap())
        .unwrap();
    opts.set("insecure_ignore_host_key", "true").unwrap();
    kloset::sftp::SftpDestination::open(loc, &opts).unwrap()
}

#[test]
fn the_sftp_destination_never_goes_through_a_symlinked_directory() {
    use kloset::store::destination::Destination;
    use kloset::store::tree::{Node, NodeKind};
    let Some(sshd) = Sshd::start() else {
        return;
    };
    let dst = sshd.remote_dir("dst");
    fs::create_dir(&dst).unwrap();
    let outside = sshd.remote_dir("outside");
    fs::create_dir(&outside).unwrap();
    outside_file(&outside.join("f"), b"outside\n");
    let before = identity(&outside.join("f"));
    // Planted on the server where the restore will put a directory `d`.
    symlink(&outside, dst.join("d")).unwrap();

    let dest = destination(&sshd, &dst);
    assert!(!dest.prepare().unwrap());
    let mut node = Node::new(b"f".to_vec(), NodeKind::File);
    node.mode = 0o4755;
    node.size = 4;
    let mut dir = Node::new(b"sub".to_vec(), NodeKind::Dir);
    dir.mode = 0o777;
    let refused = |what: &str, r: kloset::store::Result<()>| {
        let e = settled(&dest, r).expect_err(what).to_string();
        assert!(
            e.contains(&format!("{}/d is a symlink", dst.display())),
            "{what}: {e}"
        );
    };
    refused("write_whole", dest.write_whole(b"d/f", b"new\n", &node));
    refused("create_file", dest.create_file(b"d/f", 4));
    refused("write_at", dest.write_at(b"d/f", 0, b"new\n"));
    refused("set_metadata", dest.set_metadata(b"d/f", &node));
    refused("symlink", dest.symlink(b"d/l", b"/etc/passwd"));
    refused("mkdir", dest.mkdir(b"d/sub"));
    refused(
        "set_metadata of a directory",
        dest.set_metadata(b"d/sub", &dir),
    );
    refused("remove_file", dest.remove_file(b"d/f"));
    assert_eq!(identity(&outside.join("f")), before);
    assert_eq!(listing(&outside), vec!["f".to_string()]);

    // A symlink in place of the file itself: replaced, never followed, metadata not set
    // through it.
    fs::remove_file(dst.join("d")).unwrap();
    fs::create_dir(dst.join("d")).unwrap();
    symlink(outside.join("f"), dst.join("d/f")).unwrap();
    refused_metadata(&dest, &node);
    settled(&dest, dest.write_whole(b"d/f", b"new\n", &node)).unwrap();
    assert_eq!(identity(&outside.join("f")), before);
    let m = fs::symlink_metadata(dst.join("d/f")).unwrap();
    assert!(m.is_file());
    assert_eq!(m.mode() & 0o7777, 0o4755);
    assert_eq!(fs::read(dst.join("d/f")).unwrap(), b"new\n");
}

/// What an operation of the destination came to: its error at once, or the first failure of
/// what it had under way when it returned (an SFTP destination pipelines them).
fn settled(
    dest: &kloset::sftp::SftpDestination,
    r: kloset::store::Result<()>,
) -> kloset::store::Result<()> {
    use kloset::store::destination::Destination;
    r?;
    match dest.settle().into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

fn refused_metadata(dest: &kloset::sftp::SftpDestination, node: &kloset::store::tree::Node) {
    use kloset::store::destination::Destination;
    let e = settled(dest, dest.set_metadata(b"d/f", node)).expect_err("set_metadata");
    assert!(e.to_string().contains("is a symlink"), "{e}");
}

#[test]
fn an_sftp_restore_replaces_hard_linked_files_instead_of_writing_through_them() {
    let Some(sshd) = Sshd::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("small"), b"new small content\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(data.join("big"), &big).unwrap();
    let store = tmp.path().join("store");
    let store = store.to_str().unwrap();
    ok(&sshd, &["at", store, "create"]);
    ok(&sshd, &["at", store, "backup", data.to_str().unwrap()]);

    // The destination already holds both names, as hard links to files elsewhere.
    let dst = sshd.remote_dir("dst");
    fs::create_dir(&dst).unwrap();
    let outside = sshd.remote_dir("outside");
    fs::create_dir(&outside).unwrap();
    outside_file(&outside.join("victim-small"), b"victim\n");
    outside_file(&outside.join("victim-big"), b"victim too\n");
    fs::hard_link(outside.join("victim-small"), dst.join("small")).unwrap();
    fs::hard_link(outside.join("victim-big"), dst.join("big")).unwrap();
    let before = (
        identity(&outside.join("victim-small")).0,
        identity(&outside.join("victim-big")).0,
    );

    ok(
        &sshd,
        &["at", store, "restore", "-to", &sshd.url(&dst), "latest"],
    );
    for (name, old) in [("victim-small", &before.0), ("victim-big", &before.1)] {
        let (content, mode, uid, gid, nlink) = identity(&outside.join(name));
        assert_eq!(&content, old, "{name} was written through the hard link");
        assert_eq!(
            (mode & 0o7777, uid, gid, nlink),
            (0o640, 4321, 4321, 1),
            "{name}"
        );
    }
    assert_eq!(fs::read(dst.join("small")).unwrap(), b"new small content\n");
    assert_eq!(fs::read(dst.join("big")).unwrap(), big);
    assert_eq!(fs::metadata(dst.join("big")).unwrap().nlink(), 1);
}

/// SFTP sessions the hostile relay has started so far.
fn sessions(sshd: &Sshd) -> usize {
    fs::read_to_string(sshd.hostile_ctl().join("sessions"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// The connection a store command keeps as its pipe starts one SFTP session, the pipe's own:
/// libssh2's, three more round trips at each command's start, is started only on connections
/// the pool hands out. Every connection made starts exactly one session.
#[test]
fn a_store_command_starts_one_sftp_session_per_connection() {
    let Some(sshd) = Sshd::start_hostile() else {
        return;
    };
    let repo = sshd.remote_dir("store");
    let url = sshd.url(&repo);
    ok(&sshd, &["at", &url, "create"]);
    let src = source_tree(&sshd);
    for args in [
        vec!["at", &url, "ls"],
        vec!["at", &url, "backup", src.to_str().unwrap()],
        vec!["at", &url, "check"],
    ] {
        let before = sessions(&sshd);
        let mut cmd = sshd.cmd(bin());
        cmd.env("KLOSET_TRACE", "1").args(&args);
        let r = run_within(cmd, Duration::from_secs(120));
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
        let connects = r.stderr.matches("  ssh connect").count();
        let started = sessions(&sshd) - before;
        eprintln!("{args:?}: {connects} connections, {started} SFTP sessions");
        assert!(connects >= 1, "{}", r.stderr);
        assert_eq!(started, connects, "{args:?}: {}", r.stderr);
    }
}

/// A server whose SFTP subsystem will not start: a store command fails at once, exit 9, one
/// line that says so and where to look, without retrying for seconds.
#[test]
fn a_server_whose_sftp_subsystem_will_not_start_fails_at_once() {
    let Some(sshd) = Sshd::start_hostile() else {
        return;
    };
    let repo = sshd.remote_dir("store");
    let url = sshd.url(&repo);
    ok(&sshd, &["at", &url, "create"]);
    sshd.hostile_mode("refuse");
    let r = kloset(&sshd, &["at", &url, "ls"]);
    sshd.hostile_mode("");
    assert_eq!(r.code, Some(9), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("SFTP subsystem"), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(5), "took {:?}", r.took);
}
