//! Issue 13: a restore never leaves its target and a backup never leaves its source, whatever a
//! store's trees, a source or a restore target hold. Snapshots no backup would write are made
//! with the test-only builder (`common::craft`); every test checks that nothing outside the
//! target changed: content, mode and owner.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kloset::store::backup::{self, BackupOptions, Progress};
use kloset::store::check::{self, CheckProgress};
use kloset::store::crypto::KdfParams;
use kloset::store::restore::{self, RestoreOptions, RestoreProgress, RestoreReport};
use kloset::store::sync::{self, SyncOptions, SyncProgress};
use kloset::store::tree::{Node, NodeKind};
use kloset::store::{
    CreateOptions, Error, LocalBackend, LocalDestination, LocalSource, SnapshotEntry, Source, Store,
};
use tempfile::TempDir;

use common::craft::Craft;
use common::tree as t;

const PASS: &[u8] = b"correct horse battery staple";

fn store_in(dir: &Path) -> Store {
    let opts = CreateOptions {
        encrypted: true,
        compression: true,
        kdf: KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        },
    };
    Store::create(Arc::new(LocalBackend::new(dir)), &opts, &|_| {
        Ok(PASS.to_vec())
    })
    .expect("create store")
}

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn restore_with(store: &Store, snap: &SnapshotEntry, dest: &Path, resume: bool) -> RestoreReport {
    restore::run(
        store,
        snap,
        None,
        &LocalDestination::new(dest),
        &RestoreOptions {
            resume,
            ..RestoreOptions::default()
        },
        &RestoreProgress::default(),
    )
    .expect("restore")
}

fn errors(r: &RestoreReport) -> Vec<String> {
    r.errors
        .iter()
        .map(|(p, e)| format!("{}: {e}", t::show(p)))
        .collect()
}

/// A directory outside every restore target, with a file whose content, mode and owner must
/// survive: (dir, victim file, its state).
struct Outside {
    dir: TempDir,
}

impl Outside {
    fn new() -> Outside {
        let dir = tempdir();
        fs::write(dir.path().join("victim"), b"original").unwrap();
        fs::set_permissions(dir.path().join("victim"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        Outside { dir }
    }

    fn victim(&self) -> PathBuf {
        self.dir.path().join("victim")
    }

    /// Every entry of the outside directory with its content, mode and owner.
    fn state(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in walk(self.dir.path()) {
            let m = fs::symlink_metadata(&e).unwrap();
            // Length and the first bytes: enough to see any change, short enough to read.
            let content = if m.is_file() {
                let b = fs::read(&e).unwrap();
                format!(
                    "{} bytes {:?}",
                    b.len(),
                    String::from_utf8_lossy(&b[..b.len().min(32)])
                )
            } else {
                String::new()
            };
            out.push(format!(
                "{} {:o} {}:{} {content}",
                e.display(),
                m.mode(),
                m.uid(),
                m.gid()
            ));
        }
        out.sort();
        out
    }
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![p.to_path_buf()];
    if fs::symlink_metadata(p).unwrap().is_dir() {
        for e in fs::read_dir(p).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

fn uid_gid() -> (u32, u32) {
    // As root, restores chown: an owner nobody has, to see that it never lands outside.
    if t::is_root() { (4242, 4243) } else { (0, 0) }
}

fn owned(mut n: Node) -> Node {
    (n.uid, n.gid) = uid_gid();
    n
}

#[test]
fn names_that_leave_the_target_are_refused_and_reported() {
    let (sdir, dest, out) = (tempdir(), tempdir(), Outside::new());
    let store = store_in(sdir.path());
    let victim = out.victim();
    let c = Craft::new(&store);
    // Relative from the target to the victim: both are in the same temporary directory.
    let rel = format!(
        "../{}/victim",
        out.dir.path().file_name().unwrap().to_string_lossy()
    );
    let nodes = vec![
        owned(c.file(victim.as_os_str().as_bytes(), b"pwned absolute", 0o4755)),
        owned(c.file(rel.as_bytes(), b"pwned relative", 0o4755)),
        c.dir(
            b"..",
            vec![owned(c.file(b"escaped", b"pwned dotdot", 0o644))],
        ),
        owned(c.file(b"", b"empty name", 0o644)),
        owned(c.file(b"nul\0name", b"nul", 0o644)),
        owned(c.file(b"fine", b"fine", 0o640)),
    ];
    let snap = c.snapshot(nodes);
    let before = out.state();
    // `../escaped` from the target (left behind by a run of a kloset that had this defect).
    let escaped = dest.path().parent().unwrap().join("escaped");
    let escaped_before = fs::read(&escaped).ok();
    let r = restore_with(&store, &snap, dest.path(), false);
    assert_eq!(out.state(), before, "something outside the target changed");
    assert_eq!(
        fs::read(&escaped).ok(),
        escaped_before,
        "../escaped written"
    );
    assert_eq!(fs::read(dest.path().join("fine")).unwrap(), b"fine");
    let errs = errors(&r);
    for what in ["victim", "..", "nul"] {
        assert!(
            errs.iter()
                .any(|e| e.contains(what) && e.contains("not restored")),
            "{what} not reported: {errs:?}"
        );
    }
    // `check` calls the snapshot damaged and names the entries.
    let rep = check::run(&store, None, false, &CheckProgress::default()).unwrap();
    let damaged = rep
        .damaged
        .get(snap.short())
        .expect("snapshot reported damaged");
    assert!(
        damaged.iter().any(|p| p.contains("invalid entry")) && damaged.len() >= 4,
        "{damaged:?}"
    );
}

#[test]
fn a_second_entry_of_a_name_never_lets_the_restore_write_through_a_symlink() {
    let (sdir, dest, out) = (tempdir(), tempdir(), Outside::new());
    let store = store_in(sdir.path());
    let c = Craft::new(&store);
    // A directory `d` with files, then a symlink `d` -> outside: a restore that made `d/…`
    // and then replaced `d` with the link wrote content, mode and owner through it.
    let d = c.dir(
        b"d",
        vec![
            owned(c.file(b"victim", b"pwned through the link", 0o4755)),
            owned(c.big_file(b"big", &[&[1u8; 4000], &[2u8; 5000]], 0o4755)),
            c.dir(b"sub", vec![owned(c.file(b"deeper", b"pwned", 0o600))]),
        ],
    );
    let link = c.symlink(b"d", out.dir.path().as_os_str().as_bytes());
    let snap = c.snapshot(vec![d, link, owned(c.file(b"z", b"z", 0o644))]);
    let before = out.state();
    let r = restore_with(&store, &snap, dest.path(), false);
    assert_eq!(out.state(), before, "something outside the target changed");
    let m = fs::symlink_metadata(dest.path().join("d")).unwrap();
    assert!(
        m.is_dir(),
        "the first entry of the name is the one restored"
    );
    assert_eq!(
        fs::read(dest.path().join("d/victim")).unwrap(),
        b"pwned through the link"
    );
    assert!(
        errors(&r)
            .iter()
            .any(|e| e.contains("a second entry with the same name")),
        "{:?}",
        errors(&r)
    );

    // The same snapshot through `sync`: the copy leaves the entry out and says so.
    let other = tempdir();
    let store2 = store_in(other.path());
    let rep = sync::run(
        &store,
        &store2,
        None,
        &SyncOptions::default(),
        &SyncProgress::default(),
    )
    .unwrap();
    assert_eq!(rep.copied.len(), 1);
    assert!(
        rep.left_out
            .iter()
            .any(|l| l.contains("/d: a second entry")),
        "{:?}",
        rep.left_out
    );
    let copy = store2.resolve_snapshot("latest").unwrap();
    let rep = check::run(&store2, Some(vec![copy]), false, &CheckProgress::default()).unwrap();
    assert!(rep.ok(), "the copy holds no invalid entry: {rep:?}");
}

/// What a restore target may hold before the restore: symlinks to elsewhere where the
/// snapshot has a directory or a file, a hard link to a file outside, a directory where a file
/// goes. Nothing outside may change; the target ends up exactly as the snapshot says.
#[test]
fn things_in_the_way_are_replaced_never_written_through() {
    let (sdir, dest, out) = (tempdir(), tempdir(), Outside::new());
    let store = store_in(sdir.path());
    let c = Craft::new(&store);
    let snap = c.snapshot(vec![
        c.dir(
            b"d",
            vec![owned(c.file(b"victim", b"restored d/victim", 0o4755))],
        ),
        owned(c.file(b"hard", b"restored hard", 0o4755)),
        owned(c.big_file(b"hardbig", &[&[7u8; 3000], &[8u8; 3000]], 0o4755)),
        owned(c.file(b"link", b"restored link", 0o600)),
        owned(c.file(b"wasdir", b"restored wasdir", 0o600)),
    ]);
    let o = out.dir.path();
    std::os::unix::fs::symlink(o, dest.path().join("d")).unwrap();
    fs::hard_link(out.victim(), dest.path().join("hard")).unwrap();
    fs::hard_link(out.victim(), dest.path().join("hardbig")).unwrap();
    std::os::unix::fs::symlink(out.victim(), dest.path().join("link")).unwrap();
    fs::create_dir_all(dest.path().join("wasdir/x/y")).unwrap();
    std::os::unix::fs::symlink(o, dest.path().join("wasdir/x/out")).unwrap();
    let before = out.state();
    let r = restore_with(&store, &snap, dest.path(), false);
    assert!(r.errors.is_empty(), "{:?}", errors(&r));
    assert_eq!(out.state(), before, "something outside the target changed");
    for (name, want) in [
        ("d/victim", &b"restored d/victim"[..]),
        ("hard", b"restored hard"),
        ("link", b"restored link"),
        ("wasdir", b"restored wasdir"),
    ] {
        assert_eq!(fs::read(dest.path().join(name)).unwrap(), want, "{name}");
    }
    let m = fs::metadata(dest.path().join("hardbig")).unwrap();
    assert_eq!((m.len(), m.nlink()), (6000, 1));
    assert!(
        fs::symlink_metadata(dest.path().join("d"))
            .unwrap()
            .is_dir()
    );
    let m = fs::metadata(dest.path().join("hard")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755);
    assert_eq!((m.uid(), m.gid()), uid_gid());
}

/// Files of the right size and mtime are trusted only when resuming a restore kloset itself
/// started; either way their owner and mode are set again.
#[test]
fn existing_files_are_skipped_only_when_resuming_and_get_their_metadata_back() {
    let (sdir, dest) = (tempdir(), tempdir());
    let store = store_in(sdir.path());
    let c = Craft::new(&store);
    let snap = c.snapshot(vec![owned(c.file(b"f", b"snapshot", 0o640))]);
    let f = dest.path().join("f");
    let tamper = || {
        fs::write(&f, b"tampered").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4777)).unwrap();
        t::set_mtime(&f, 1_600_000_000, 0);
    };
    tamper();
    let r = restore_with(&store, &snap, dest.path(), false);
    assert!(r.errors.is_empty(), "{:?}", errors(&r));
    assert_eq!(r.skipped, 0);
    assert_eq!(fs::read(&f).unwrap(), b"snapshot");
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o640);

    // Resuming: the file is taken as done, but its mode and owner are the snapshot's.
    tamper();
    let r = restore_with(&store, &snap, dest.path(), true);
    assert_eq!(r.skipped, 1);
    let m = fs::metadata(&f).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), uid_gid());
}

/// A tree nested 200,000 levels deep: restore, check and sync report it and stop at the
/// bound instead of overflowing the stack.
#[test]
fn a_tree_nested_deeper_than_any_filesystem_is_bounded() {
    let (sdir, dest) = (tempdir(), tempdir());
    let store = store_in(sdir.path());
    let c = Craft::new(&store);
    let mut n = c.file(b"bottom", b"deep", 0o644);
    for _ in 0..200_000 {
        n = c.dir(b"d", vec![n]);
    }
    let snap = c.snapshot(vec![n]);
    let r = restore_with(&store, &snap, dest.path(), false);
    assert!(
        errors(&r).iter().any(|e| e.contains("directories deep")),
        "{:?}",
        &errors(&r)[..errors(&r).len().min(3)]
    );
    let rep = check::run(&store, None, true, &CheckProgress::default()).unwrap();
    let damaged = rep.damaged.get(snap.short()).expect("reported");
    assert!(damaged.iter().any(|p| p.contains("directories deep")));
    let other = tempdir();
    let e = sync::run(
        &store,
        &store_in(other.path()),
        None,
        &SyncOptions::default(),
        &SyncProgress::default(),
    )
    .expect_err("refused");
    assert!(e.to_string().contains("directories deep"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Backups

/// A source that answers every `read_dir` of the root with extra entries a hostile SFTP server
/// could send: `..`, a name with `/`, and a second `d` that is a symlink to elsewhere.
struct Hostile {
    inner: LocalSource,
    root: Vec<u8>,
}

impl Source for Hostile {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn has_inodes(&self) -> bool {
        true
    }
    fn stat(&self, path: &[u8]) -> Result<Node, Error> {
        self.inner.stat(path)
    }
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>, Error> {
        let mut v = self.inner.read_dir(path)?;
        if path == self.root {
            let mut link = Node::new(b"d".to_vec(), NodeKind::Symlink);
            link.target = b"/etc".to_vec();
            v.push(link);
            v.push(Node::new(b"..".to_vec(), NodeKind::Dir));
            v.push(Node::new(b"a/b".to_vec(), NodeKind::File));
        }
        Ok(v)
    }
    fn open(&self, path: &[u8], size: u64) -> Result<Box<dyn Read + Send>, Error> {
        self.inner.open(path, size)
    }
}

#[test]
fn a_backup_reports_and_leaves_out_names_a_source_must_not_give() {
    let (sdir, src) = (tempdir(), tempdir());
    fs::create_dir(src.path().join("d")).unwrap();
    fs::write(src.path().join("d/f"), b"f").unwrap();
    let store = store_in(sdir.path());
    let inner = LocalSource::new(src.path()).unwrap();
    let root = inner.root();
    let source = Hostile { inner, root };
    let r = backup::run(
        &store,
        &source,
        &BackupOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    let errs: Vec<String> = r
        .snapshot
        .errors
        .iter()
        .map(|(p, e)| format!("{}: {e}", t::show(p)))
        .collect();
    for what in [
        "entry \"..\" skipped",
        "entry \"a/b\" skipped",
        "entry \"d\" skipped: a second entry",
    ] {
        assert!(errs.iter().any(|e| e.contains(what)), "{what}: {errs:?}");
    }
    let snap = store.resolve_snapshot("latest").unwrap();
    let d = store.lookup(&snap, b"d").unwrap();
    assert_eq!(d.kind, NodeKind::Dir);
    let rep = check::run(&store, None, false, &CheckProgress::default()).unwrap();
    assert!(rep.ok(), "{rep:?}");
}

/// A source whose files change under the reader: on the first `open` (once) or on every one.
struct Changing {
    inner: LocalSource,
    every_time: bool,
    opens: AtomicUsize,
}

impl Source for Changing {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn has_inodes(&self) -> bool {
        true
    }
    fn stat(&self, path: &[u8]) -> Result<Node, Error> {
        self.inner.stat(path)
    }
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>, Error> {
        self.inner.read_dir(path)
    }
    fn open(&self, path: &[u8], size: u64) -> Result<Box<dyn Read + Send>, Error> {
        let mut content = Vec::new();
        self.inner
            .open(path, size)?
            .read_to_end(&mut content)
            .unwrap();
        let n = self.opens.fetch_add(1, Ordering::SeqCst);
        if n == 0 || self.every_time {
            // Written while "being read": the reader got the old half.
            let p = Path::new(std::ffi::OsStr::from_bytes(path));
            fs::write(p, format!("changed {n} and longer than before")).unwrap();
        }
        Ok(Box::new(std::io::Cursor::new(content)))
    }
}

#[test]
fn a_file_that_changes_while_it_is_read_is_read_again_or_reported() {
    for every_time in [false, true] {
        let (sdir, src) = (tempdir(), tempdir());
        fs::write(src.path().join("f"), b"before").unwrap();
        let store = store_in(sdir.path());
        let source = Changing {
            inner: LocalSource::new(src.path()).unwrap(),
            every_time,
            opens: AtomicUsize::new(0),
        };
        let r = backup::run(
            &store,
            &source,
            &BackupOptions::default(),
            &Progress::default(),
        )
        .unwrap();
        let snap = store.resolve_snapshot("latest").unwrap();
        let n = store.lookup(&snap, b"f").unwrap();
        if every_time {
            assert_eq!(
                source.opens.load(Ordering::SeqCst),
                2,
                "read twice, no more"
            );
            assert!(
                r.snapshot
                    .errors
                    .iter()
                    .any(|(_, e)| e.contains("changed while it was read")),
                "{:?}",
                r.snapshot.errors
            );
        } else {
            assert!(r.snapshot.errors.is_empty(), "{:?}", r.snapshot.errors);
            // The second read is the file as it is, with its metadata.
            let want = b"changed 0 and longer than before";
            assert_eq!(n.size, want.len() as u64);
            let dest = tempdir();
            restore_with(&store, &snap, dest.path(), false);
            let restored = fs::read(
                dest.path()
                    .join(src.path().strip_prefix("/").unwrap())
                    .join("f"),
            )
            .or_else(|_| fs::read(dest.path().join("f")))
            .unwrap();
            assert_eq!(restored, want);
        }
    }
}

/// A source whose server goes away after the walk, while the directories above the backed-up
/// one are looked at: no snapshot may be saved (it would carry made-up metadata for them).
struct GoneAfterWalk {
    inner: LocalSource,
}

impl Source for GoneAfterWalk {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn has_inodes(&self) -> bool {
        true
    }
    fn stat(&self, path: &[u8]) -> Result<Node, Error> {
        if path.len() < self.inner.root().len() {
            return Err(Error::Connector(
                "the server went away".into(),
                kloset::store::ErrorKind::Unreachable,
            ));
        }
        self.inner.stat(path)
    }
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>, Error> {
        self.inner.read_dir(path)
    }
    fn open(&self, path: &[u8], size: u64) -> Result<Box<dyn Read + Send>, Error> {
        self.inner.open(path, size)
    }
}

#[test]
fn a_source_lost_after_the_walk_saves_no_snapshot() {
    let (sdir, src) = (tempdir(), tempdir());
    fs::write(src.path().join("f"), b"f").unwrap();
    let store = store_in(sdir.path());
    let source = GoneAfterWalk {
        inner: LocalSource::new(src.path()).unwrap(),
    };
    let e = backup::run(
        &store,
        &source,
        &BackupOptions::default(),
        &Progress::default(),
    )
    .expect_err("no snapshot");
    assert_eq!(e.kind(), kloset::store::ErrorKind::Unreachable, "{e}");
    assert!(store.snapshots().unwrap().0.is_empty());
}
