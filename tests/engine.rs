//! Integration tests of the store engine (`kloset::store`): backup → restore round trips of
//! hostile trees, chunk-boundary stability and deduplication, tamper detection of every store
//! file, incremental backups, and source read failures.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use kloset::store::backup::{self, BackupOptions, BackupResult, Progress};
use kloset::store::check::{self, CheckProgress, CheckReport};
use kloset::store::crypto::{BlobId, KdfParams};
use kloset::store::format::BlobKind;
use kloset::store::restore::{self, RestoreOptions, RestoreProgress, RestoreReport};
use kloset::store::tree::{Node, NodeKind, join};
use kloset::store::{
    Backend, CreateOptions, Error, ErrorKind, LocalBackend, LocalDestination, LocalSource,
    MemBackend, SnapshotEntry, Source, Store,
};
use proptest::prelude::*;
use tempfile::TempDir;

use common::tree::{self as t, Content, Meta, Spec, TreeSpec};

const PASS: &[u8] = b"correct horse battery staple";

// ---------------------------------------------------------------------------------------------
// Helpers

fn create_store(backend: Arc<dyn Backend>, encrypted: bool) -> Store {
    let opts = CreateOptions {
        encrypted,
        compression: true,
        kdf: KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        },
    };
    Store::create(backend, &opts, &|_| Ok(PASS.to_vec())).expect("create store")
}

fn local_store(dir: &Path, encrypted: bool) -> Store {
    create_store(Arc::new(LocalBackend::new(dir)), encrypted)
}

fn open_local(dir: &Path) -> Result<Store, Error> {
    Store::open(Arc::new(LocalBackend::new(dir)), &|_| Ok(PASS.to_vec()))
}

fn backup_with(store: &Store, source: &dyn Source, opts: &BackupOptions) -> BackupResult {
    backup::run(store, source, opts, &Progress::default()).expect("backup")
}

fn backup(store: &Store, src: &Path) -> BackupResult {
    let source = LocalSource::new(src).expect("source");
    backup_with(store, &source, &BackupOptions::default())
}

fn restore_snap(store: &Store, snap: &SnapshotEntry, dest: &Path) -> RestoreReport {
    restore::run(
        store,
        snap,
        None,
        &LocalDestination::new(dest),
        &RestoreOptions::default(),
        &RestoreProgress::default(),
    )
    .expect("restore")
}

fn restore_latest(store: &Store, dest: &Path) -> RestoreReport {
    let snap = store.resolve_snapshot("latest").expect("latest snapshot");
    restore_snap(store, &snap, dest)
}

fn check_all(store: &Store) -> CheckReport {
    check::run(store, None, false, &CheckProgress::default()).expect("check")
}

fn show_errors(errors: &[(Vec<u8>, String)]) -> Vec<String> {
    errors
        .iter()
        .map(|(p, e)| format!("{}: {e}", t::show(p)))
        .collect()
}

fn data_blobs(store: &Store) -> usize {
    store
        .index()
        .iter()
        .filter(|(_, l)| l.kind == BlobKind::Data)
        .count()
}

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Pure pseudo-random bytes (xorshift64), for chunking tests.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = (seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn abs(p: &Path) -> Vec<u8> {
    std::path::absolute(p)
        .expect("absolute")
        .as_os_str()
        .as_bytes()
        .to_vec()
}

// ---------------------------------------------------------------------------------------------
// 1. restore(backup(tree)) == tree

fn name_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        6 => prop::sample::select(b"abcdefxyz0123_.".to_vec()),
        2 => prop::sample::select(b" \n\t-\\*?\"'$;|&<>:~\x01\x1b\x7f".to_vec()),
        2 => 0x80u8..=0xff,
    ]
}

fn name() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(name_byte(), 1..16),
        1 => prop::collection::vec(name_byte(), 0..16).prop_map(|mut v| {
            v.insert(0, b'-');
            v
        }),
        1 => prop::collection::vec(name_byte(), 255..=255),
    ]
    .prop_filter("`.` and `..` are not names", |n| {
        n.as_slice() != b"." && n.as_slice() != b".."
    })
    .boxed()
}

fn mtime() -> impl Strategy<Value = (i64, u32)> {
    (
        prop_oneof![
            Just(0i64),
            1_500_000_000i64..1_800_000_000,
            -2_000_000_000i64..8_000_000_000,
        ],
        prop_oneof![Just(0u32), 0u32..1_000_000_000],
    )
}

fn owner() -> impl Strategy<Value = (u32, u32)> {
    prop::sample::select(vec![
        (0, 0),
        (1000, 1000),
        (65534, 65534),
        (123_456, 7),
        (1, 2),
    ])
}

fn xattrs() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    prop::collection::vec(
        (
            prop::collection::vec(prop::sample::select(b"abcxyz._-09".to_vec()), 1..10),
            prop::collection::vec(any::<u8>(), 0..48),
        ),
        0..3,
    )
}

fn meta(mode: impl Strategy<Value = u32>) -> impl Strategy<Value = Meta> {
    (mode, mtime(), owner(), xattrs()).prop_map(|(mode, mtime, owner, xattrs)| Meta {
        mode,
        mtime,
        owner,
        xattrs,
    })
}

fn file_mode() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o6755, 0o1644, 0o444, 0o777,
        ]),
        1 => 0u32..0o10000,
    ]
}

fn dir_mode() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => prop::sample::select(vec![0o755, 0o700, 0o1777, 0o500, 0o555, 0o2775, 0o000]),
        1 => 0u32..0o10000,
    ]
}

fn small_content() -> impl Strategy<Value = Content> {
    prop_oneof![
        1 => Just(Content::Bytes(Vec::new())),
        3 => prop::collection::vec(any::<u8>(), 1..3000).prop_map(Content::Bytes),
        1 => (any::<u8>(), 1usize..100_000).prop_map(|(b, n)| Content::Bytes(vec![b; n])),
    ]
}

fn symlink_target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Hostile relative targets, mostly dangling.
        prop::collection::vec(1u8..=255, 1..64),
        Just(b"/nonexistent/target".to_vec()),
        Just(b"..".to_vec()),
        Just(b".".to_vec()),
        name().prop_map(|n| [b"../".as_slice(), &n].concat()),
    ]
}

fn entry() -> impl Strategy<Value = Spec> {
    let file =
        (name(), small_content(), meta(file_mode())).prop_map(|(name, content, meta)| Spec::File {
            name,
            content,
            meta,
        });
    let link = (name(), symlink_target(), meta(Just(0o777)))
        .prop_map(|(name, target, meta)| Spec::Symlink { name, target, meta });
    let fifo = (name(), meta(file_mode())).prop_map(|(name, meta)| Spec::Fifo { name, meta });
    let leaf = prop_oneof![6 => file, 2 => link, 1 => fifo];
    leaf.prop_recursive(3, 32, 5, |inner| {
        (name(), meta(dir_mode()), prop::collection::vec(inner, 0..5)).prop_map(
            |(name, meta, children)| Spec::Dir {
                name,
                meta,
                children,
            },
        )
    })
}

/// Multi-chunk files (over 1 MiB, kept small enough for a fast test).
fn big_file() -> impl Strategy<Value = (usize, Spec)> {
    (
        any::<usize>(),
        name(),
        any::<u64>(),
        1_100_000usize..2_600_000,
        meta(file_mode()),
    )
        .prop_map(|(dir, name, seed, len, meta)| {
            (
                dir,
                Spec::File {
                    name,
                    content: Content::Random { seed, len },
                    meta,
                },
            )
        })
}

fn sparse_file() -> impl Strategy<Value = (usize, Spec)> {
    (
        any::<usize>(),
        name(),
        (2u64 << 20)..(6 << 20),
        prop::collection::vec(
            (any::<u64>(), prop::collection::vec(1u8..=255, 1..100)),
            1..4,
        ),
        meta(file_mode()),
    )
        .prop_map(|(dir, name, len, writes, meta)| {
            (
                dir,
                Spec::File {
                    name,
                    content: Content::Sparse { len, writes },
                    meta,
                },
            )
        })
}

fn tree_spec() -> impl Strategy<Value = TreeSpec> {
    (
        prop::collection::vec(entry(), 1..8),
        prop::collection::vec(big_file(), 0..=2),
        prop::option::weighted(0.8, sparse_file()),
        prop::collection::vec((any::<usize>(), any::<usize>(), name()), 0..4),
    )
        .prop_map(|(entries, mut extras, sparse, links)| {
            extras.extend(sparse);
            TreeSpec {
                entries,
                extras,
                links,
                specials: true,
            }
        })
}

/// Back up `src` into a fresh store in `dir`, restore it, and list every difference.
fn roundtrip(src: &Path, dir: &Path, encrypted: bool) -> Result<(), TestCaseError> {
    let store_dir = dir.join(if encrypted {
        "store-enc"
    } else {
        "store-plain"
    });
    let store = local_store(&store_dir, encrypted);
    let res = backup(&store, src);
    prop_assert!(
        res.snapshot.errors.is_empty(),
        "backup errors: {:?}",
        show_errors(&res.snapshot.errors)
    );
    // A fresh handle: the restore reads only what was written to the store directory.
    drop(store);
    let store = open_local(&store_dir).expect("reopen store");
    let dest = dir.join(if encrypted { "dst-enc" } else { "dst-plain" });
    let rep = restore_latest(&store, &dest);
    prop_assert!(
        rep.errors.is_empty(),
        "restore errors: {:?}",
        show_errors(&rep.errors)
    );
    let check = check_all(&store);
    prop_assert!(check.ok(), "check: {:?}", check);

    let a = t::scan(src);
    let b = t::scan(&dest);
    let diffs = t::diff(&a, &b);
    prop_assert!(
        diffs.is_empty(),
        "encrypted={encrypted}: {} difference(s):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    let sparse = t::lost_sparseness(&a, &b, 256 << 10);
    prop_assert!(sparse.is_empty(), "{}", sparse.join("\n"));
    t::make_removable(&dest);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        max_shrink_iters: 50,
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn restore_of_backup_is_the_same_tree(spec in tree_spec()) {
        let tmp = tempdir();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        spec.materialize(&src, t::xattrs_supported(tmp.path()));
        let res = roundtrip(&src, tmp.path(), true)
            .and_then(|()| roundtrip(&src, tmp.path(), false));
        t::make_removable(tmp.path());
        res?;
    }
}

/// The generator does produce what the round trip is meant to cover (so a change to it
/// cannot quietly stop testing, say, sparse files or hard links).
#[test]
fn fixed_hostile_tree_round_trips() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let m = |mode: u32, sec: i64, nsec: u32| Meta {
        mode,
        mtime: (sec, nsec),
        owner: (4242, 4343),
        xattrs: vec![(b"kloset.test".to_vec(), b"value\0\xff".to_vec())],
    };
    let file = |name: &[u8], content: Content, mode: u32| Spec::File {
        name: name.to_vec(),
        content,
        meta: m(mode, 1_700_000_000, 999_999_999),
    };
    let spec = TreeSpec {
        entries: vec![
            file(
                b"\xff\xfe not utf-8\n",
                Content::Bytes(b"x".to_vec()),
                0o644,
            ),
            file(&[b'n'; 255], Content::Bytes(Vec::new()), 0o000),
            file(b"-rf", Content::Bytes(b"dash".to_vec()), 0o4755),
            file(
                b"big",
                Content::Random {
                    seed: 7,
                    len: 2_500_000,
                },
                0o640,
            ),
            file(
                b"sparse",
                Content::Sparse {
                    len: 5 << 20,
                    writes: vec![(0, b"head".to_vec()), (3 << 20, b"middle".to_vec())],
                },
                0o600,
            ),
            Spec::Dir {
                name: b"ro dir".to_vec(),
                meta: m(0o500, -12_345, 1),
                children: vec![
                    file(b"inside", Content::Bytes(b"in".to_vec()), 0o644),
                    Spec::Symlink {
                        name: b"dangling".to_vec(),
                        target: b"../nowhere/\xff".to_vec(),
                        meta: m(0o777, 1, 2),
                    },
                ],
            },
            Spec::Dir {
                name: b"tmp".to_vec(),
                meta: m(0o1777, 1_000_000_000, 500),
                children: vec![Spec::Fifo {
                    name: b"fifo".to_vec(),
                    meta: m(0o620, 42, 43),
                }],
            },
        ],
        extras: Vec::new(),
        // "big" is the 4th file created; link it twice, once into "ro dir" (2nd directory).
        links: vec![(3, 1, b"big link".to_vec()), (3, 0, b"big link 2".to_vec())],
        specials: true,
    };
    spec.materialize(&src, t::xattrs_supported(tmp.path()));
    let scanned = t::scan(&src);
    assert!(t::has_sparse_file(&scanned), "the test needs a sparse file");
    assert_eq!(t::link_groups(&scanned).len(), 1, "one hard-link group");
    for encrypted in [true, false] {
        roundtrip(&src, tmp.path(), encrypted).unwrap();
    }
    t::make_removable(tmp.path());
}

// ---------------------------------------------------------------------------------------------
// 2. Chunk-boundary stability and deduplication

fn file_node(store: &Store, res: &BackupResult, rel: &[u8]) -> Node {
    let snap = store.read_snapshot(&res.id).expect("snapshot");
    store.lookup(&snap, rel).expect("lookup")
}

/// An unchanged backup reuses the parent's extended attributes only for entries whose ctime and
/// inode have not moved; a changed or removed attribute (which moves the ctime) is read again.
#[test]
fn xattrs_are_reread_when_the_ctime_moves() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    if !t::xattrs_supported(tmp.path()) {
        eprintln!(
            "SKIPPED: {} has no user extended attributes",
            tmp.path().display()
        );
        return;
    }
    for f in ["changed", "kept", "removed"] {
        fs::write(src.join(f), f).unwrap();
        xattr::set(src.join(f), "user.kloset.v", b"1").unwrap();
    }
    xattr::set(src.join("d"), "user.kloset.v", b"dir").unwrap();
    let store = create_store(Arc::new(MemBackend::new()), true);
    let r1 = backup(&store, &src);
    // Past the coarse clock tick of the writes above, so the ctimes below do move.
    std::thread::sleep(std::time::Duration::from_millis(50));
    xattr::set(src.join("changed"), "user.kloset.v", b"2").unwrap();
    xattr::remove(src.join("removed"), "user.kloset.v").unwrap();
    xattr::set(src.join("d"), "user.kloset.new", b"added").unwrap();
    let r2 = backup(&store, &src);
    assert_eq!(
        r2.snapshot.parent,
        Some(r1.id),
        "the second backup has a parent"
    );
    let attrs = |rel: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
        file_node(&store, &r2, rel)
            .xattrs
            .into_iter()
            .map(|x| (x.name, x.value))
            .collect()
    };
    let v = |name: &str, value: &[u8]| (name.as_bytes().to_vec(), value.to_vec());
    assert_eq!(attrs(b"changed"), vec![v("user.kloset.v", b"2")]);
    assert_eq!(attrs(b"kept"), vec![v("user.kloset.v", b"1")]);
    assert_eq!(attrs(b"removed"), vec![]);
    assert_eq!(
        attrs(b"d"),
        vec![v("user.kloset.new", b"added"), v("user.kloset.v", b"dir")]
    );
}

/// The nodes that differ between two trees, recursively, for failure messages.
fn tree_differences(store: &Store, a: BlobId, b: BlobId) -> Vec<String> {
    let (ta, tb) = (store.load_tree(&a).unwrap(), store.load_tree(&b).unwrap());
    let mut out = Vec::new();
    for na in &ta.nodes {
        match tb.nodes.iter().find(|n| n.name == na.name) {
            None => out.push(format!("{} only in the first", t::show(&na.name))),
            Some(nb) => match (na.subtree, nb.subtree) {
                (Some(sa), Some(sb)) if sa != sb => {
                    let mut x = na.clone();
                    x.subtree = nb.subtree;
                    if x != *nb {
                        out.push(format!("{}: {na:?} / {nb:?}", t::show(&na.name)));
                    }
                    out.extend(tree_differences(store, sa, sb));
                }
                _ if na != nb => out.push(format!("{}: {na:?} / {nb:?}", t::show(&na.name))),
                _ => {}
            },
        }
    }
    if ta.nodes.len() != tb.nodes.len() {
        out.push(format!("{} / {} entries", ta.nodes.len(), tb.nodes.len()));
    }
    out
}

/// Directories equal to the parent snapshot's keep their tree ids (the backup reuses them
/// without re-encoding); a change anywhere below a directory — a new file three levels down, a
/// directory's mode, a removed file — gives it and every ancestor a new tree, and the
/// snapshot shows the change.
#[test]
fn unchanged_trees_are_reused_and_changes_reach_the_root() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("a/b/c/f"), b"f").unwrap();
    fs::write(src.join("a/x"), b"x").unwrap();
    fs::write(src.join("d/y"), b"y").unwrap();
    let store = create_store(Arc::new(MemBackend::new()), true);
    let subtree = |r: &BackupResult, rel: &[u8]| file_node(&store, r, rel).subtree.unwrap();
    let names = |r: &BackupResult, rel: &[u8]| -> Vec<Vec<u8>> {
        let t = store.load_tree(&subtree(r, rel)).unwrap();
        t.nodes.iter().map(|n| n.name.clone()).collect()
    };

    let r1 = backup(&store, &src);
    let r2 = backup(&store, &src);
    // The backed-up directory's tree, not the snapshot's root: that one also holds the
    // directories above it (/tmp), which other processes change.
    let (t1, t2) = (subtree(&r1, b""), subtree(&r2, b""));
    assert_eq!(
        t2,
        t1,
        "nothing changed, but: {}",
        tree_differences(&store, t1, t2).join("; ")
    );

    fs::write(src.join("a/b/c/new"), b"n").unwrap();
    let r3 = backup(&store, &src);
    assert_eq!(names(&r3, b"a/b/c"), vec![b"f".to_vec(), b"new".to_vec()]);
    for dir in [&b"a/b"[..], b"a"] {
        assert_ne!(
            subtree(&r3, dir),
            subtree(&r2, dir),
            "{}",
            String::from_utf8_lossy(dir)
        );
    }
    assert_ne!(r3.snapshot.root, r2.snapshot.root);
    assert_eq!(subtree(&r3, b"d"), subtree(&r2, b"d"), "d did not change");

    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(src.join("a/b"), fs::Permissions::from_mode(0o700)).unwrap();
    let r4 = backup(&store, &src);
    assert_eq!(file_node(&store, &r4, b"a/b").mode, 0o700);
    assert_eq!(
        subtree(&r4, b"a/b"),
        subtree(&r3, b"a/b"),
        "a/b's entries did not change"
    );
    assert_ne!(
        subtree(&r4, b"a"),
        subtree(&r3, b"a"),
        "a holds a/b's new mode"
    );

    fs::remove_file(src.join("d/y")).unwrap();
    let r5 = backup(&store, &src);
    assert!(names(&r5, b"d").is_empty());
    assert_eq!(subtree(&r5, b"a"), subtree(&r4, b"a"));
    assert_ne!(r5.snapshot.root, r4.snapshot.root);
}

/// An unchanged file keeps the parent snapshot's block count, so a block count that moves
/// without the file changing (ext4 writeback) does not give unchanged directories new trees.
#[test]
fn an_unchanged_file_keeps_its_block_count() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a")).unwrap();
    fs::write(src.join("a/f"), vec![7u8; 10_000]).unwrap();
    // Written back, so the first backup sees the real block count.
    fs::File::open(src.join("a/f")).unwrap().sync_all().unwrap();
    let store = create_store(Arc::new(MemBackend::new()), true);
    let r1 = backup(&store, &src);
    let blocks = file_node(&store, &r1, b"a/f").blocks;
    assert!(blocks > 0, "a 10 kB file has blocks");
    let wb = FailingSource {
        inner: LocalSource::new(&src).unwrap(),
        fail_open: Vec::new(),
        fail_read: HashMap::new(),
        blocks_in_writeback: true,
    };
    let r2 = backup_with(&store, &wb, &BackupOptions::default());
    assert_eq!(file_node(&store, &r2, b"a/f").blocks, blocks);
    let tree = |r: &BackupResult| file_node(&store, r, b"").subtree.unwrap();
    assert_eq!(tree(&r2), tree(&r1), "nothing changed");

    // A changed file takes what the source reports.
    fs::write(src.join("a/f"), vec![8u8; 10_001]).unwrap();
    let r3 = backup_with(&store, &wb, &BackupOptions::default());
    assert_eq!(file_node(&store, &r3, b"a/f").blocks, 0);
}

/// A restore into a directory that already holds other things puts its own entries in their
/// place: a symlink where a file goes is replaced, never written through; a directory where a
/// file goes and a file where a directory goes are replaced too.
#[test]
fn restore_replaces_what_is_in_the_way() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("f"), b"file").unwrap();
    fs::write(src.join("g"), b"another file").unwrap();
    fs::write(src.join("d/x"), b"in d").unwrap();
    let store = create_store(Arc::new(MemBackend::new()), true);
    backup(&store, &src);

    let outside = tmp.path().join("outside");
    fs::write(&outside, b"must stay").unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir_all(dest.join("g/sub")).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("f")).unwrap();
    fs::write(dest.join("d"), b"a file where a directory goes").unwrap();
    let rep = restore_latest(&store, &dest);
    assert!(rep.errors.is_empty(), "{:?}", show_errors(&rep.errors));
    assert_eq!(fs::read(&outside).unwrap(), b"must stay");
    let diffs = t::diff(&t::scan(&src), &t::scan(&dest));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn chunk_boundaries_survive_an_insertion() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let store = create_store(Arc::new(MemBackend::new()), true);
    let v1 = noise(0x5eed, 20 << 20);
    fs::write(src.join("big.bin"), &v1).unwrap();
    let r1 = backup(&store, &src);
    let n1 = file_node(&store, &r1, b"big.bin");
    assert_eq!(n1.size, v1.len() as u64);
    assert!(
        n1.content.len() >= 8,
        "20 MiB should make many chunks, got {}",
        n1.content.len()
    );

    let mut v2 = v1[..1000].to_vec();
    v2.extend_from_slice(b"inserted!");
    v2.extend_from_slice(&v1[1000..]);
    fs::write(src.join("big.bin"), &v2).unwrap();
    let before = data_blobs(&store);
    let r2 = backup(&store, &src);
    let n2 = file_node(&store, &r2, b"big.bin");
    assert_eq!(n2.size, v2.len() as u64);
    let old: HashSet<BlobId> = n1.content.iter().copied().collect();
    let shared = n2.content.iter().filter(|c| old.contains(c)).count();
    assert!(
        n2.content.len() - shared <= 2,
        "only {shared} of {} chunks are shared after inserting 9 bytes at offset 1000",
        n2.content.len()
    );
    let added = data_blobs(&store) - before;
    assert!(added <= 2, "{added} new data blobs for a 9-byte insertion");
    assert_eq!(r2.snapshot.stats.bytes_read, v2.len() as u64);
}

/// Small files are chunked from a slice, big ones from a stream (the threshold is a few MiB):
/// both must cut at the same places, or a file that grows past the threshold no longer
/// deduplicates. The file grows through sizes on both sides of any threshold up to 16 MiB.
#[test]
fn slice_and_stream_chunking_agree() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let store = create_store(Arc::new(MemBackend::new()), false);
    let all = noise(42, 18 << 20);
    let mut prev: Option<(usize, Vec<BlobId>)> = None;
    for mib in [3usize, 5, 9, 17, 18] {
        fs::write(src.join("grow.bin"), &all[..mib << 20]).unwrap();
        let r = backup(&store, &src);
        let c = file_node(&store, &r, b"grow.bin").content;
        if let Some((pmib, pc)) = prev {
            // Chunks are at most 8 MiB, so a larger file has two or more; a smaller one may be a
            // single chunk with some of the store's random chunker seeds (then there is nothing
            // to compare for this step).
            assert!(
                pc.len() >= 2 || pmib <= 8,
                "{pmib} MiB made {} chunk(s)",
                pc.len()
            );
            // Every chunk but the last one of the shorter file is cut again.
            let keep = pc.len() - 1;
            assert!(
                c.len() > keep && c[..keep] == pc[..keep],
                "growing the file from {pmib} to {mib} MiB moved chunk boundaries: \
                 {pc:?} then {c:?}"
            );
        }
        prev = Some((mib, c));
    }
}

#[test]
fn identical_data_adds_no_data_blobs() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let store = create_store(Arc::new(MemBackend::new()), true);
    let data = t::pseudo_random(9, 3 << 20);
    fs::write(src.join("d/a.bin"), &data).unwrap();
    fs::write(src.join("small"), b"small file").unwrap();
    let r1 = backup(&store, &src);
    assert!(r1.snapshot.stats.new_blobs > 0);
    let blobs = data_blobs(&store);

    // Everything read again (no parent): nothing new but trees whose ancestors changed.
    let opts = BackupOptions {
        no_parent: true,
        ..BackupOptions::default()
    };
    let source = LocalSource::new(&src).unwrap();
    let r2 = backup_with(&store, &source, &opts);
    assert_eq!(r2.snapshot.stats.bytes_read, data.len() as u64 + 10);
    assert_eq!(data_blobs(&store), blobs, "identical data added data blobs");
    let trees = kloset::store::tree::components(&abs(&src)).len() as u64 + 2;
    assert!(
        r2.snapshot.stats.new_blobs <= trees,
        "{} new blobs for identical data",
        r2.snapshot.stats.new_blobs
    );

    // The same content under another name.
    fs::write(src.join("copy.bin"), &data).unwrap();
    let r3 = backup(&store, &src);
    assert_eq!(r3.snapshot.stats.bytes_read, data.len() as u64);
    assert_eq!(data_blobs(&store), blobs, "a copied file added data blobs");
    assert_eq!(
        file_node(&store, &r3, b"copy.bin").content,
        file_node(&store, &r3, b"d/a.bin").content
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Tamper detection

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let q = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&p, &q);
        } else {
            fs::copy(&p, &q).unwrap();
        }
    }
}

/// Paths of all regular files under `root`, relative to it.
fn store_files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// What a pristine store holds, to know what a flipped byte must be reported as.
struct StoreMap {
    /// Pack name → (offset, length, blob, kind).
    blobs: HashMap<String, Vec<(u64, u64, BlobId, BlobKind)>>,
    /// Data blob → (snapshot short id, absolute path of each file containing it).
    data_users: HashMap<BlobId, BTreeSet<(String, String)>>,
    /// Tree blob → short ids of the snapshots that need it.
    tree_users: HashMap<BlobId, BTreeSet<String>>,
    snaps: Vec<SnapshotEntry>,
}

fn map_store(store: &Store) -> StoreMap {
    let mut m = StoreMap {
        blobs: HashMap::new(),
        data_users: HashMap::new(),
        tree_users: HashMap::new(),
        snaps: store.snapshots().unwrap().0,
    };
    {
        let idx = store.index();
        for (id, loc) in idx.iter() {
            m.blobs
                .entry(idx.pack_name(loc.pack).to_string())
                .or_default()
                .push((loc.offset as u64, loc.length as u64, *id, loc.kind));
        }
    }
    fn walk(store: &Store, tree: BlobId, path: Vec<u8>, short: &str, m: &mut StoreMap) {
        m.tree_users
            .entry(tree)
            .or_default()
            .insert(short.to_string());
        let t = store.load_tree(&tree).unwrap();
        for n in &t.nodes {
            let p = join(&path, &n.name);
            if let Some(sub) = n.subtree {
                walk(store, sub, p, short, m);
            } else {
                for c in &n.content {
                    m.data_users
                        .entry(*c)
                        .or_default()
                        .insert((short.to_string(), String::from_utf8_lossy(&p).into_owned()));
                }
            }
        }
    }
    for s in m.snaps.clone() {
        walk(store, s.snap.root, b"/".to_vec(), s.short(), &mut m);
    }
    m
}

/// One way of damaging a store file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Flip the bits of the byte at this offset.
    Flip(u64),
    /// Cut the file to this length.
    Truncate(u64),
    /// Remove the file (packs only: a store without an index or snapshot file loses nothing
    /// that `check` can know about).
    Delete,
}

impl Damage {
    fn apply(self, p: &Path) {
        match self {
            Damage::Flip(pos) => {
                let mut bytes = fs::read(p).unwrap();
                bytes[pos as usize] ^= 0x5a;
                fs::write(p, &bytes).unwrap();
            }
            Damage::Truncate(len) => {
                fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(len)
                    .unwrap();
            }
            Damage::Delete => fs::remove_file(p).unwrap(),
        }
    }

    /// Does this damage touch the bytes `off..off + len`?
    fn hits(self, off: u64, len: u64) -> bool {
        match self {
            Damage::Flip(pos) => pos >= off && pos < off + len,
            Damage::Truncate(cut) => off + len > cut,
            Damage::Delete => true,
        }
    }
}

/// Open and check a damaged store; `Err` describes a failure of the engine to report the
/// damage properly: a panic, an unclear error, damage not detected, or damage not traced to
/// the snapshots and paths it costs (check) or a restore that loses other files than those.
fn judge_tamper(
    dir: &Path,
    rel: &str,
    damage: Damage,
    map: &StoreMap,
    restore_to: &Path,
    src_root: &[u8],
) -> Result<String, String> {
    let file_name = rel.rsplit('/').next().unwrap();
    let store = match open_local(dir) {
        Err(e) => {
            if e.kind() != ErrorKind::Damaged || !e.to_string().contains(rel) {
                return Err(format!("open failed with an unclear error: {e} ({e:?})"));
            }
            return Ok(format!("open: {e}"));
        }
        Ok(s) => s,
    };
    let rep = check::run(&store, None, false, &CheckProgress::default())
        .map_err(|e| format!("check failed instead of reporting the damage: {e}"))?;
    if rep.ok() {
        return Err("check reports no damage".into());
    }
    if !rep.errors.iter().any(|e| e.contains(file_name)) {
        return Err(format!("no check error names the file: {:?}", rep.errors));
    }
    let Some(pack) = rel.strip_prefix("packs/") else {
        return Ok(format!("check: {:?}", rep.errors));
    };
    let pack = pack.rsplit('/').next().unwrap();
    let hit: Vec<(BlobId, BlobKind)> = map
        .blobs
        .get(pack)
        .into_iter()
        .flatten()
        .filter(|(off, len, ..)| damage.hits(*off, *len))
        .map(|(_, _, id, kind)| (*id, *kind))
        .collect();
    // Every (snapshot, path) that lost data, and every snapshot with a lost tree.
    let mut users: BTreeSet<(String, String)> = BTreeSet::new();
    for (id, kind) in &hit {
        match kind {
            BlobKind::Data => users.extend(map.data_users.get(id).cloned().unwrap_or_default()),
            BlobKind::Tree => {
                for short in map.tree_users.get(id).into_iter().flatten() {
                    if !rep.damaged.contains_key(short) {
                        return Err(format!(
                            "damaged tree {id:?}: snapshot {short} not listed as damaged: {:?}",
                            rep.damaged
                        ));
                    }
                }
            }
        }
    }
    if hit.iter().any(|(_, k)| *k == BlobKind::Tree) {
        // Paths under a lost directory are reported as that directory.
        return Ok(format!("check: {:?} {:?}", rep.errors, rep.damaged));
    }
    for (short, path) in &users {
        let listed = rep.damaged.get(short).cloned().unwrap_or_default();
        if !listed.iter().any(|l| l.starts_with(&format!("{path} ("))) {
            return Err(format!(
                "{path} lost data in snapshot {short}, but check lists {listed:?}"
            ));
        }
    }
    // A restore carries on and names exactly the files that lost data.
    let shorts: BTreeSet<&String> = users.iter().map(|(s, _)| s).collect();
    for s in map
        .snaps
        .iter()
        .filter(|s| shorts.contains(&s.short().to_string()))
    {
        let dest = restore_to.join(s.short());
        let snap = store.read_snapshot(&s.id).map_err(|e| e.to_string())?;
        let r = restore::run(
            &store,
            &snap,
            None,
            &LocalDestination::new(&dest),
            &RestoreOptions::default(),
            &RestoreProgress::default(),
        )
        .map_err(|e| format!("restore failed as a whole: {e}"))?;
        let got: BTreeSet<String> = r
            .errors
            .iter()
            .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
            .collect();
        let want: BTreeSet<String> = users
            .iter()
            .filter(|(short, _)| short == s.short())
            .map(|(_, p)| String::from_utf8_lossy(&p.as_bytes()[src_root.len() + 1..]).into_owned())
            .collect();
        if got != want {
            return Err(format!(
                "restore of {} reports errors for {got:?}, expected {want:?}",
                s.short()
            ));
        }
    }
    Ok(format!("check: {:?} {:?}", rep.errors, rep.damaged))
}

fn tamper_every_file(encrypted: bool) {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::write(src.join("a.txt"), b"alpha").unwrap();
    fs::write(src.join("b.bin"), noise(1, 200_000)).unwrap();
    fs::write(src.join("sub/c.bin"), t::pseudo_random(2, 100_000)).unwrap();
    fs::write(src.join("sub/deeper/d.bin"), noise(3, 1_300_000)).unwrap();
    fs::write(src.join("sub/empty"), b"").unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    // The same content twice: one damaged blob costs two files.
    fs::write(src.join("twin1"), noise(4, 50_000)).unwrap();
    fs::write(src.join("sub/twin2"), noise(4, 50_000)).unwrap();

    let pristine = tmp.path().join("store");
    let store = local_store(&pristine, encrypted);
    backup(&store, &src);
    fs::write(src.join("b.bin"), noise(5, 150_000)).unwrap();
    fs::write(src.join("new.txt"), b"added later").unwrap();
    backup(&store, &src);
    drop(store);
    let store = open_local(&pristine).unwrap();
    assert!(check_all(&store).ok());
    let map = map_store(&store);
    drop(store);
    let src_root = abs(&src);

    let files = store_files(&pristine);
    for prefix in ["config", "index/", "packs/", "snapshots/"] {
        assert!(
            files.iter().any(|f| f.starts_with(prefix)),
            "no {prefix} in {files:?}"
        );
    }
    assert_eq!(files.iter().any(|f| f.starts_with("keys/")), encrypted);
    let mut failures = Vec::new();
    let mut n = 0;
    for rel in &files {
        let len = fs::metadata(pristine.join(rel)).unwrap().len();
        let mut damages: Vec<Damage> = [0, len / 2, len.saturating_sub(1)]
            .into_iter()
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .map(Damage::Flip)
            .collect();
        damages.push(Damage::Truncate(len / 2));
        if rel.starts_with("packs/") {
            damages.push(Damage::Delete);
        }
        for damage in damages {
            n += 1;
            let case = tmp.path().join(format!("case{n}"));
            let dir = case.join("store");
            copy_dir(&pristine, &dir);
            damage.apply(&dir.join(rel));
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                judge_tamper(&dir, rel, damage, &map, &case.join("restore"), &src_root)
            }));
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err(why)) => failures.push(format!("{rel} {damage:?}: {why}")),
                Err(_) => failures.push(format!("{rel} {damage:?}: PANIC")),
            }
            let _ = fs::remove_dir_all(&case);
        }
    }
    assert!(
        failures.is_empty(),
        "encrypted={encrypted}: {} of {n} damaged stores mishandled:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tamper_every_file_encrypted() {
    tamper_every_file(true);
}

#[test]
fn tamper_every_file_plaintext() {
    tamper_every_file(false);
}

/// A wrong passphrase is told apart from damage.
#[test]
fn wrong_passphrase_is_not_damage() {
    let tmp = tempdir();
    let dir = tmp.path().join("store");
    drop(local_store(&dir, true));
    let e = Store::open(Arc::new(LocalBackend::new(&dir)), &|_| Ok(b"nope".to_vec()))
        .err()
        .expect("wrong passphrase must fail");
    assert_eq!(e.kind(), ErrorKind::WrongPassphrase, "{e}");
}

// ---------------------------------------------------------------------------------------------
// 4. Incremental backups

#[test]
fn incremental_backup_reads_only_changed_files() {
    let tmp = tempdir();
    for encrypted in [true, false] {
        let src = tmp.path().join(format!("src-{encrypted}"));
        fs::create_dir_all(src.join("dir/sub")).unwrap();
        fs::write(src.join("a"), noise(1, 10_000)).unwrap();
        fs::write(src.join("dir/b"), noise(2, 300_000)).unwrap();
        fs::write(src.join("dir/sub/c"), noise(3, 1_200_000)).unwrap();
        fs::write(src.join("dir/empty"), b"").unwrap();
        fs::write(src.join("linked"), b"hard linked").unwrap();
        fs::hard_link(src.join("linked"), src.join("dir/linked2")).unwrap();
        std::os::unix::fs::symlink("dir/b", src.join("sym")).unwrap();
        let store = local_store(&tmp.path().join(format!("store-{encrypted}")), encrypted);
        let r1 = backup(&store, &src);
        let s1 = &r1.snapshot.stats;
        assert_eq!(s1.files, 6);
        assert_eq!(s1.bytes_read, s1.bytes, "first backup reads everything");

        let r2 = backup(&store, &src);
        assert_eq!(r2.snapshot.parent.as_deref(), Some(r1.id.as_str()));
        assert_eq!(r2.snapshot.stats.bytes_read, 0, "unchanged tree was read");
        assert_eq!(r2.snapshot.stats.files, 6);
        assert_eq!(r2.snapshot.stats.bytes, s1.bytes);
        let blobs = data_blobs(&store);

        // One file changes content (and size).
        let b2 = noise(20, 310_000);
        fs::write(src.join("dir/b"), &b2).unwrap();
        let r3 = backup(&store, &src);
        assert_eq!(r3.snapshot.stats.bytes_read, b2.len() as u64);
        assert_eq!(r3.snapshot.stats.files, 6);

        // One file only gets a new mtime: it is read again, and adds no data.
        let blobs3 = data_blobs(&store);
        assert!(blobs3 > blobs);
        t::set_mtime(&src.join("dir/sub/c"), 1_234_567_890, 42);
        let r4 = backup(&store, &src);
        assert_eq!(r4.snapshot.stats.bytes_read, 1_200_000);
        assert_eq!(data_blobs(&store), blobs3);

        // Same content, same mtime, same size, but a mode change (new ctime): read again.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o600)).unwrap();
        let r5 = backup(&store, &src);
        assert_eq!(r5.snapshot.stats.bytes_read, 10_000);

        let dest = tmp.path().join(format!("dst-{encrypted}"));
        let rep = restore_latest(&store, &dest);
        assert!(rep.errors.is_empty(), "{:?}", show_errors(&rep.errors));
        let diffs = t::diff(&t::scan(&src), &t::scan(&dest));
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        // The first snapshot still restores the first version.
        let s1 = store.read_snapshot(&r1.id).unwrap();
        let dest1 = tmp.path().join(format!("dst1-{encrypted}"));
        restore_snap(&store, &s1, &dest1);
        assert!(fs::read(dest1.join("dir/b")).unwrap() == noise(2, 300_000));
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Files the source cannot read

/// A local source whose `open` fails for one path and whose reads fail part-way for others.
struct FailingSource {
    inner: LocalSource,
    fail_open: Vec<u8>,
    /// Path → bytes delivered before the read error.
    fail_read: HashMap<Vec<u8>, usize>,
    /// Files report 0 allocated blocks, as ext4 does for a moment while writeback allocates a
    /// freshly written file (seen on this machine's /tmp during `sync`).
    blocks_in_writeback: bool,
}

struct FailAfter {
    inner: Box<dyn Read + Send>,
    left: usize,
}

impl Read for FailAfter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("simulated read error"));
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got;
        Ok(got)
    }
}

impl Source for FailingSource {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn has_inodes(&self) -> bool {
        self.inner.has_inodes()
    }
    fn stat(&self, path: &[u8]) -> kloset::store::Result<Node> {
        self.inner.stat(path)
    }
    fn read_dir(&self, path: &[u8]) -> kloset::store::Result<Vec<Node>> {
        let mut nodes = self.inner.read_dir(path)?;
        if self.blocks_in_writeback {
            for n in nodes.iter_mut().filter(|n| n.kind == NodeKind::File) {
                n.blocks = 0;
            }
        }
        Ok(nodes)
    }
    fn load_xattrs(&self, path: &[u8], node: &mut Node) {
        self.inner.load_xattrs(path, node)
    }
    fn open(&self, path: &[u8], size: u64) -> kloset::store::Result<Box<dyn Read + Send>> {
        if path == self.fail_open.as_slice() {
            return Err(Error::io(
                String::from_utf8_lossy(path),
                std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            ));
        }
        let r = self.inner.open(path, size)?;
        Ok(match self.fail_read.get(path) {
            Some(&left) => Box::new(FailAfter { inner: r, left }),
            None => r,
        })
    }
}

#[test]
fn unreadable_files_are_reported_and_the_rest_is_restorable() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("ok1"), b"fine").unwrap();
    fs::write(src.join("dir/ok2"), noise(1, 700_000)).unwrap();
    fs::write(src.join("dir/secret"), b"cannot open me").unwrap();
    fs::write(src.join("dir/flaky"), noise(2, 900_000)).unwrap();
    // Big enough to be chunked from a stream: the error comes from inside the chunker.
    fs::write(src.join("huge"), noise(3, 17 << 20)).unwrap();
    let abs_src = abs(&src);
    let p = |rel: &str| join(&abs_src, rel.as_bytes());
    let source = FailingSource {
        inner: LocalSource::new(&src).unwrap(),
        fail_open: p("dir/secret"),
        fail_read: [(p("dir/flaky"), 300_000), (p("huge"), 16_500_000)].into(),
        blocks_in_writeback: false,
    };
    for encrypted in [true, false] {
        let store_dir = tmp.path().join(format!("store-{encrypted}"));
        let store = local_store(&store_dir, encrypted);
        let r = backup_with(&store, &source, &BackupOptions::default());
        let failed: BTreeMap<Vec<u8>, String> = r.snapshot.errors.iter().cloned().collect();
        let want: BTreeSet<Vec<u8>> = [p("dir/secret"), p("dir/flaky"), p("huge")].into();
        assert_eq!(
            failed.keys().cloned().collect::<BTreeSet<_>>(),
            want,
            "{:?}",
            show_errors(&r.snapshot.errors)
        );
        assert!(failed[&p("dir/flaky")].contains("simulated read error"));
        assert!(failed[&p("huge")].contains("simulated read error"));
        assert_eq!(r.snapshot.stats.files, 2);
        assert_eq!(r.snapshot.stats.bytes, 4 + 700_000);
        assert!(check_all(&store).ok());

        let dest = tmp.path().join(format!("dst-{encrypted}"));
        let rep = restore_latest(&store, &dest);
        assert!(rep.errors.is_empty(), "{:?}", show_errors(&rep.errors));
        let mut want_tree = t::scan(&src);
        for rel in ["dir/secret", "dir/flaky", "huge"] {
            want_tree.remove(rel.as_bytes());
        }
        let diffs = t::diff(&want_tree, &t::scan(&dest));
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));

        // The next backup, with a source that can read them, reads just the missing files.
        let r2 = backup(&store, &src);
        assert!(r2.snapshot.errors.is_empty());
        assert_eq!(
            r2.snapshot.stats.bytes_read,
            14 + 900_000 + (17 << 20) as u64
        );
        let dest2 = tmp.path().join(format!("dst2-{encrypted}"));
        let rep = restore_latest(&store, &dest2);
        assert!(rep.errors.is_empty(), "{:?}", show_errors(&rep.errors));
        let diffs = t::diff(&t::scan(&src), &t::scan(&dest2));
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }
}

/// A directory that cannot be listed loses only its contents.
#[test]
fn unreadable_directory_is_reported() {
    struct NoDir(LocalSource, Vec<u8>);
    impl Source for NoDir {
        fn describe(&self) -> String {
            self.0.describe()
        }
        fn root(&self) -> Vec<u8> {
            self.0.root()
        }
        fn has_inodes(&self) -> bool {
            true
        }
        fn stat(&self, path: &[u8]) -> kloset::store::Result<Node> {
            self.0.stat(path)
        }
        fn read_dir(&self, path: &[u8]) -> kloset::store::Result<Vec<Node>> {
            if path == self.1.as_slice() {
                return Err(Error::io(
                    String::from_utf8_lossy(path),
                    std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                ));
            }
            self.0.read_dir(path)
        }
        fn open(&self, path: &[u8], size: u64) -> kloset::store::Result<Box<dyn Read + Send>> {
            self.0.open(path, size)
        }
    }
    let tmp = tempdir();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("closed/inner")).unwrap();
    fs::write(src.join("closed/inner/x"), b"x").unwrap();
    fs::write(src.join("open"), b"y").unwrap();
    let closed = join(&abs(&src), b"closed");
    let store = create_store(Arc::new(MemBackend::new()), true);
    let r = backup_with(
        &store,
        &NoDir(LocalSource::new(&src).unwrap(), closed.clone()),
        &BackupOptions::default(),
    );
    assert_eq!(
        r.snapshot.errors.iter().map(|e| &e.0).collect::<Vec<_>>(),
        vec![&closed]
    );
    let snap = store.read_snapshot(&r.id).unwrap();
    let n = store.lookup(&snap, b"closed").unwrap();
    assert_eq!(n.kind, NodeKind::Dir);
    assert!(store.lookup(&snap, b"open").is_ok());
}
