//! Real FUSE mounts of a local store and of an SFTP store: the mounted tree against the source,
//! sub-path mounts, `cp` out, concurrent readers, writes refused, clean unmount and SIGTERM,
//! damage giving EIO for the damaged file only, and new snapshots appearing while mounted.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kloset"))
}

fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse is missing, no FUSE mount tests");
        return false;
    }
    true
}

fn kloset(home: &Path) -> Command {
    let mut c = Command::new(bin());
    c.env("HOME", home)
        .env("KLOSET_PASSPHRASE", "mount-test")
        .env_remove("SSH_AUTH_SOCK");
    c
}

fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_mounted(p: &Path) -> bool {
    let canon = fs::canonicalize(p).unwrap_or(p.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

/// A running `kloset mount`, stopped with SIGTERM on drop.
struct Mounted {
    child: Option<Child>,
    point: PathBuf,
}

impl Mounted {
    fn start(home: &Path, store: &str, args: &[&str], point: &Path) -> Mounted {
        let mut c = kloset(home);
        c.args(["at", store, "mount"]).args(args).arg(point);
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(point) {
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("kloset mount exited early ({st}): {err}");
            }
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mounted {
            child: Some(child),
            point: point.to_path_buf(),
        }
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = wait_timeout(&mut child, Duration::from_secs(20));
        assert!(!is_mounted(&self.point), "still mounted after SIGTERM");
        st
    }
}

fn wait_timeout(child: &mut Child, d: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + d;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "kloset mount did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
    }
}

fn source_tree(root: &Path) {
    fs::create_dir_all(root.join("www/css")).unwrap();
    fs::write(root.join("www/index.html"), b"<h1>hi</h1>\n").unwrap();
    fs::write(root.join("www/css/a.css"), b"a{}\n").unwrap();
    let big: Vec<u8> = {
        let mut x = 0x2545f4914f6cdd1du64;
        let mut v = Vec::with_capacity(6 << 20);
        while v.len() < 6 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    };
    fs::write(root.join("big.bin"), &big).unwrap();
    fs::hard_link(root.join("big.bin"), root.join("big-again.bin")).unwrap();
    symlink("www/index.html", root.join("link")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    fs::write(root.join("secret"), b"s").unwrap();
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(root.join("secret"), Some(1234), Some(5678)).unwrap();
    // A sparse file: 8 MiB with 4 KiB of data in the middle.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[7u8; 4096], 4 << 20).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let _ = xattr::set(root.join("www/index.html"), "user.note", b"kept");
    // ns mtimes.
    let t = fs::FileTimes::new()
        .set_modified(std::time::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789));
    fs::File::options()
        .write(true)
        .open(root.join("www/css/a.css"))
        .unwrap()
        .set_times(t)
        .unwrap();
}

#[derive(Debug, PartialEq)]
struct Meta {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    content: Option<Vec<u8>>,
    target: Option<PathBuf>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn scan(root: &Path) -> BTreeMap<PathBuf, (Meta, u64, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            if ft.is_dir() {
                stack.push(p.clone());
            }
            let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(&p)
                .map(|l| {
                    l.filter_map(|n| {
                        let v = xattr::get(&p, &n).ok().flatten()?;
                        Some((n.to_string_lossy().into_owned(), v))
                    })
                    .collect()
                })
                .unwrap_or_default();
            xattrs.sort();
            let meta = Meta {
                kind: m.mode() & libc::S_IFMT,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_dir() { 0 } else { m.size() },
                mtime: if ft.is_symlink() {
                    (0, 0)
                } else {
                    (m.mtime(), m.mtime_nsec())
                },
                content: ft.is_file().then(|| fs::read(&p).unwrap()),
                target: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
                xattrs,
            };
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                (meta, m.ino(), m.nlink()),
            );
        }
    }
    out
}

fn assert_same(src: &Path, mounted: &Path) {
    let a = scan(src);
    let b = scan(mounted);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, (ma, _, _)) in &a {
        let (mb, _, _) = &b[k];
        assert_eq!(ma, mb, "{} differs", k.display());
    }
    // Hard links: one inode, link count 2.
    let (_, i1, n1) = b[Path::new("big.bin")];
    let (_, i2, n2) = b[Path::new("big-again.bin")];
    assert_eq!(i1, i2, "hard links share an inode in the mount");
    assert_eq!((n1, n2), (2, 2));
    // The sparse file reads zeros and reports few blocks.
    let sp = fs::symlink_metadata(mounted.join("sparse")).unwrap();
    assert!(
        sp.blocks() < 4096,
        "st_blocks of a sparse file: {}",
        sp.blocks()
    );
}

fn setup() -> (tempfile::TempDir, PathBuf, String, String) {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    source_tree(&src);
    let store = t.path().join("store").to_string_lossy().into_owned();
    let mut c = kloset(&home);
    c.args(["at", &store, "create"]);
    ok(c);
    let mut c = kloset(&home);
    c.args([
        "at",
        &store,
        "backup",
        "-tag",
        "daily",
        src.to_str().unwrap(),
    ]);
    let id = ok(c).trim().to_string();
    (t, src, store, id)
}

#[test]
fn mount_local_store_whole_and_sub_path() {
    if !fuse_available() {
        return;
    }
    let (t, src, store, id) = setup();
    let home = t.path().join("home");
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = Mounted::start(&home, &store, &[], &mnt);

    // Layout: id dir, latest, by-time, by-tag.
    let names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&id), "{names:?}");
    assert_eq!(fs::read_link(mnt.join("latest")).unwrap(), Path::new(&id));
    assert_eq!(fs::read_dir(mnt.join("by-time")).unwrap().count(), 1);
    assert_eq!(fs::read_dir(mnt.join("by-tag/daily")).unwrap().count(), 1);

    let in_mount = mnt.join(&id).join(src.strip_prefix("/").unwrap());
    assert_same(&src, &in_mount);

    // cp out is a partial restore.
    let out = t.path().join("out");
    let st = Command::new("cp")
        .arg("-a")
        .arg(in_mount.join("www"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(fs::read(out.join("index.html")).unwrap(), b"<h1>hi</h1>\n");

    // Several readers of one file at once.
    let big = in_mount.join("big.bin");
    let want = fs::read(src.join("big.bin")).unwrap();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let p = big.clone();
            std::thread::spawn(move || fs::read(p).unwrap())
        })
        .collect();
    for r in readers {
        assert!(
            r.join().unwrap() == want,
            "a concurrent reader got other bytes"
        );
    }

    // Writes are refused.
    let e = fs::write(in_mount.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = fs::OpenOptions::new().write(true).open(&big).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = fs::remove_file(in_mount.join("link")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));

    // A new snapshot appears without remounting.
    fs::write(src.join("www/new.html"), b"new").unwrap();
    let mut c = kloset(&home);
    c.args(["at", &store, "backup", src.to_str().unwrap()]);
    let id2 = ok(c).trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mnt.join(&id2).exists() {
        assert!(Instant::now() < deadline, "new snapshot did not appear");
        std::thread::sleep(Duration::from_millis(200));
    }
    let p2 = mnt
        .join(&id2)
        .join(src.strip_prefix("/").unwrap())
        .join("www/new.html");
    assert_eq!(fs::read(p2).unwrap(), b"new");

    // SIGTERM unmounts and exits 0.
    assert!(m.stop().success());

    // A sub-path mount; stopped with umount.
    let spec = format!("{id}:{}/www", src.display());
    let mut c = kloset(&home);
    c.args(["at", &store, "mount", "-to"]).arg(&mnt).arg(&spec);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "sub-path mount did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read(mnt.join("css/a.css")).unwrap(), b"a{}\n");
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    assert!(wait_timeout(&mut child, Duration::from_secs(20)).success());
}

#[test]
fn mount_errors_are_clear() {
    if !fuse_available() {
        return;
    }
    let (t, _src, store, _id) = setup();
    let home = t.path().join("home");
    let missing = t.path().join("nope");
    let mut c = kloset(&home);
    c.args(["at", &store, "mount"]).arg(&missing);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");

    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let _m = Mounted::start(&home, &store, &[], &mnt);
    let mut c = kloset(&home);
    c.args(["at", &store, "mount"]).arg(&mnt);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("busy"));
}

#[test]
fn damaged_pack_gives_eio_for_that_file_only() {
    if !fuse_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let store = t.path().join("store");
    let store_s = store.to_string_lossy().into_owned();
    let mut c = kloset(&home);
    c.args(["at", &store_s, "create", "-plaintext", "-no-compression"]);
    ok(c);
    // Two backups so the two files land in two different packs.
    let a = t.path().join("a");
    fs::create_dir(&a).unwrap();
    fs::write(a.join("victim.txt"), b"victim-content-".repeat(100)).unwrap();
    let mut c = kloset(&home);
    c.args(["at", &store_s, "backup", a.to_str().unwrap()]);
    ok(c);
    let data_packs: Vec<PathBuf> = walk(&store.join("packs"));
    // Flip bytes inside the victim's content (plaintext store: find it by its bytes).
    for p in &data_packs {
        let mut b = fs::read(p).unwrap();
        if let Some(i) = b.windows(15).position(|w| w == b"victim-content-") {
            b[i + 3] ^= 0xff;
            fs::write(p, b).unwrap();
        }
    }
    let bdir = t.path().join("b");
    fs::create_dir(&bdir).unwrap();
    fs::write(bdir.join("fine.txt"), b"fine").unwrap();
    let mut c = kloset(&home);
    c.args(["at", &store_s, "backup", bdir.to_str().unwrap()]);
    ok(c);

    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = Mounted::start(&home, &store_s, &[], &mnt);
    let snaps: Vec<PathBuf> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 8)
        .collect();
    let mut saw_eio = false;
    let mut saw_fine = false;
    for s in snaps {
        let v = s.join(a.strip_prefix("/").unwrap()).join("victim.txt");
        if v.exists() {
            let e = fs::read(&v).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
            saw_eio = true;
        }
        let f = s.join(bdir.strip_prefix("/").unwrap()).join("fine.txt");
        if f.exists() {
            assert_eq!(fs::read(&f).unwrap(), b"fine");
            saw_fine = true;
        }
    }
    assert!(saw_eio && saw_fine);
    assert!(m.stop().success());
}

/// [`mount_sftp_store`] on each server the SFTP suite runs against (tests/sftp.rs).
mod sftp_servers {
    use super::common::sshd::Flavor;

    #[test]
    fn openssh() {
        super::mount_sftp_store(Flavor::OpenSsh);
    }

    #[test]
    fn asyncssh() {
        super::mount_sftp_store(Flavor::AsyncSsh);
    }

    #[test]
    fn chroot() {
        super::mount_sftp_store(Flavor::Chroot);
    }
}

/// A store on the server mounted: every file reads back exactly, and a read after the
/// server's connections were killed is retried on a new one.
fn mount_sftp_store(flavor: common::sshd::Flavor) {
    if !fuse_available() {
        return;
    }
    let Some(mut sshd) = common::sshd::Sshd::start_flavor(flavor) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    source_tree(&src);
    let remote = sshd.remote_dir("store");
    let url = sshd.alias_url(&remote);
    let run = |args: &[&str]| {
        let out = sshd.cmd(bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["at", &url, "create"]);
    let id = run(&["at", &url, "backup", src.to_str().unwrap()])
        .trim()
        .to_string();
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut c = sshd.cmd(bin());
    c.args(["at", &url, "mount"])
        .arg(&mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = c.spawn().unwrap();
    let m = {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&mnt) {
            assert!(Instant::now() < deadline, "sftp mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mounted {
            child: Some(child),
            point: mnt.clone(),
        }
    };
    assert_same(&src, &mnt.join(&id).join(src.strip_prefix("/").unwrap()));
    // A dropped connection is reconnected and the read retried.
    sshd.kill_connections();
    let again = mnt
        .join(&id)
        .join(src.strip_prefix("/").unwrap())
        .join("www/css/a.css");
    assert_eq!(fs::read(again).unwrap(), b"a{}\n");
    assert!(m.stop().success());
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The kernel's FORGETs reach the daemon: after `find` over the mount and the kernel dropping
/// its dentries and inodes, the directories it forgot lose their records, and everything
/// still reads (the records are made again).
#[test]
fn directories_the_kernel_forgets_are_dropped_and_read_again() {
    if !fuse_available() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: not root, cannot make the kernel drop its dentries (drop_caches)");
        return;
    }
    let (t, src, store, id) = setup();
    // Many directories, so that the kernel has some to forget.
    let many = src.join("many");
    for d in 0..40 {
        let dir = many.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..10 {
            fs::write(dir.join(format!("f{f}")), format!("{d}:{f}")).unwrap();
        }
    }
    let home = t.path().join("home");
    let mut c = kloset(&home);
    c.args(["at", &store, "backup", src.to_str().unwrap()]);
    let id2 = ok(c).trim().to_string();
    assert_ne!(id, id2);
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut c = kloset(&home);
    c.env("KLOSET_TRACE", "1")
        .args(["at", &store, "mount"])
        .arg(&mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(&mnt) {
        assert!(child.try_wait().unwrap().is_none(), "mount exited early");
        assert!(Instant::now() < deadline, "mount did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_mount = mnt.join(&id2).join(src.strip_prefix("/").unwrap());
    let count = |p: &Path| walk(p).len();
    let n = count(&in_mount.join("many"));
    assert_eq!(n, 40 * 10);
    // The kernel drops what nothing uses, and sends FORGET for each inode it drops.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Everything reads again, through records made anew.
    assert_eq!(count(&in_mount.join("many")), n);
    assert_eq!(fs::read(in_mount.join("many/d17/f3")).unwrap(), b"17:3");
    assert_same(&src, &in_mount);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = wait_timeout(&mut child, Duration::from_secs(20));
    assert!(st.success(), "{st}");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let line = err
        .lines()
        .find(|l| l.contains("directory records kept"))
        .unwrap_or_else(|| panic!("no record count in the trace: {err}"));
    eprintln!("{line}");
    let dropped: u64 = line
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line}"));
    assert!(
        dropped >= 40,
        "only {dropped} records dropped on forgets: {line}"
    );
}
