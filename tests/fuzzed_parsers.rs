//! Fuzzed parsers, in the default test run: real store files, mutated, fed to every decoder of
//! bytes that come from a store.
//!
//! The two stores under `tests/fixtures/store/` were made by the real binary (`create`, two
//! backups each; `enc` with the passphrase `pw`, `plain` with `-plaintext`; a lock file left by
//! a backup killed with SIGKILL). Each test takes their files, whole or opened (the payloads
//! behind the authentication a mutation cannot forge, as the fuzz targets in `fuzz/` do),
//! and applies random mutations: bit flips, truncation, extension, insertion, and integers
//! (u32 little-endian, or varints as postcard writes lengths and counts) overwritten with huge
//! values. Every decode must return: an error whenever the bytes are invalid, which for an
//! authenticated file is whenever they changed, or a value that encodes back to itself; never
//! a panic; and never a single allocation, nor a peak of live bytes, above
//! [`MAX_ALLOCATION`], which a counting global allocator records for the decoding thread.
//!
//! `seeds_are_made_from_the_fixture_stores` checks that the seed corpus of the fuzz targets
//! (`fuzz/seeds/`) is what these stores give, and writes it when `KLOSET_WRITE_SEEDS=1`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use kloset::store::backend::FileType;
use kloset::store::crypto::{KdfParams, KeyFile, MasterKeys};
use kloset::store::format::{
    AAD_INDEX, AAD_PACK_HEADER, AAD_SNAPSHOT, BlobKind, CODEC_ZSTD, Config, FORMAT_VERSION,
    IndexFile, LockRecord, MAGIC_CONFIG, MAGIC_KEY, MAGIC_LOCK, PackHeader, Snapshot,
    decode_payload, decode_payload_ref, decode_record, frame, open_record, parse_key_file, unframe,
};
use kloset::store::tree::Tree;
use kloset::store::{Backend, CreateOptions, LocalBackend, MemBackend, Store};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The most a decoder may allocate for one of these inputs (a few KiB each), in one
/// allocation or live at once. The real files decode in well under 1 MiB; a decoder that
/// takes a length or count from its input on trust asks for far more.
const MAX_ALLOCATION: usize = 64 << 20;

// ---------------------------------------------------------------------------------------
// Counting allocator

thread_local! {
    /// Whether this thread is measuring, its live bytes, their peak and the largest single
    /// allocation since the measurement started. Const-initialised cells without destructors:
    /// reading them never allocates.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting what the measuring thread allocates.
struct Counting;

fn grew(size: usize) {
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let live = LIVE.with(|l| {
                l.set(l.get() + size);
                l.get()
            });
            PEAK.with(|p| p.set(p.get().max(live)));
            LARGEST.with(|b| b.set(b.get().max(size)));
        }
    });
}

fn shrank(size: usize) {
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            LIVE.with(|l| l.set(l.get().saturating_sub(size)));
        }
    });
}

// The crate denies unsafe code; a global allocator cannot be written without it.
#[allow(unsafe_code)]
// SAFETY: every call goes to the system allocator unchanged; the counting touches only
// const-initialised thread-local cells, which neither allocate nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller's layout, passed on as it came.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: `ptr` was allocated by `System` with `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        shrank(layout.size());
        grew(new_size);
        // SAFETY: `ptr` and `layout` are from `System` as in `dealloc`; `new_size` is the
        // caller's valid new size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What one decode allocated: the peak of its live bytes and its largest single allocation.
#[derive(Debug, Clone, Copy)]
struct Usage {
    peak: usize,
    largest: usize,
}

/// Run `f` on this thread, counting its allocations.
fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|b| b.set(0));
    MEASURING.with(|m| m.set(true));
    let r = f();
    MEASURING.with(|m| m.set(false));
    let usage = Usage {
        peak: PEAK.with(Cell::get),
        largest: LARGEST.with(Cell::get),
    };
    (r, usage)
}

/// Run a decoder on this thread and check what it allocated.
fn bounded<R>(what: &str, f: impl FnOnce() -> R) -> R {
    let (r, u) = measure(f);
    assert!(
        u.largest <= MAX_ALLOCATION && u.peak <= MAX_ALLOCATION,
        "{what}: allocated {u:?}, above the bound of {MAX_ALLOCATION} bytes"
    );
    r
}

// ---------------------------------------------------------------------------------------
// The fixture stores and what they hold

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store")
}

/// One fixture store, opened, and its files: as stored and opened.
struct Fixture {
    name: &'static str,
    store: Store,
    /// The same store over a memory backend holding only its config and key files, for
    /// tests to put files in.
    mem: Arc<MemBackend>,
    mem_store: Store,
    config: Vec<u8>,
    keys: Vec<Vec<u8>>,
    locks: Vec<Vec<u8>>,
    /// (name, sealed bytes, opened payload)
    index: Vec<(String, Vec<u8>, Vec<u8>)>,
    snapshots: Vec<(String, Vec<u8>, Vec<u8>)>,
    packs: Vec<Pack>,
}

struct Pack {
    name: String,
    data: Vec<u8>,
    header: PackHeader,
    /// The sealed header (as it sits before the length at the end) and its opened payload.
    sealed_header: Vec<u8>,
    header_payload: Vec<u8>,
    /// Each blob's opened payload, and its plain content.
    blobs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn files_of(root: &Path, dir: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
        return out;
    };
    for e in rd {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_of(root, &format!("{dir}/{name}")));
        } else {
            out.push((name, std::fs::read(e.path()).unwrap()));
        }
    }
    out.sort();
    out
}

fn load(name: &'static str) -> Fixture {
    let root = fixture_root().join(name);
    let store = Store::open(Arc::new(LocalBackend::new(&root)), &|_| Ok(b"pw".to_vec()))
        .unwrap_or_else(|e| panic!("fixture store {name} does not open: {e}"));
    let c = store.crypto().clone();
    let opened = |aad: &[u8], dir: &str| -> Vec<(String, Vec<u8>, Vec<u8>)> {
        files_of(&root, dir)
            .into_iter()
            .map(|(n, b)| {
                let p = c.open(aad, &b).expect("fixture record opens");
                (n, b, p)
            })
            .collect()
    };
    let index = opened(AAD_INDEX, "index");
    let snapshots = opened(AAD_SNAPSHOT, "snapshots");
    let packs = files_of(&root, "packs")
        .into_iter()
        .map(|(n, data)| {
            let header = store.parse_pack(&n, &data).expect("fixture pack parses");
            let len = data.len();
            let hlen = u32::from_le_bytes(data[len - 4..].try_into().unwrap()) as usize;
            let sealed_header = data[len - 4 - hlen..len - 4].to_vec();
            let header_payload = c.open(AAD_PACK_HEADER, &sealed_header).unwrap();
            let blobs = header
                .entries
                .iter()
                .map(|e| {
                    let sealed = &data[e.offset as usize..(e.offset + e.length) as usize];
                    let payload = c.open(&e.id.0, sealed).expect("fixture blob opens");
                    let plain = store.decode_blob(&e.id, sealed, e.raw_length, &n).unwrap();
                    (payload, plain)
                })
                .collect();
            Pack {
                name: n,
                data,
                header,
                sealed_header,
                header_payload,
                blobs,
            }
        })
        .collect();
    let config = std::fs::read(root.join("config")).unwrap();
    let keys: Vec<(String, Vec<u8>)> = files_of(&root, "keys");
    let mem = Arc::new(MemBackend::new());
    mem.init().unwrap();
    mem.write(FileType::Config, "config", &config).unwrap();
    for (n, k) in &keys {
        mem.write(FileType::Key, n, k).unwrap();
    }
    let mem_store = Store::open(mem.clone(), &|_| Ok(b"pw".to_vec())).unwrap();
    Fixture {
        name,
        mem,
        mem_store,
        config,
        keys: keys.into_iter().map(|f| f.1).collect(),
        locks: files_of(&root, "locks").into_iter().map(|f| f.1).collect(),
        store,
        index,
        snapshots,
        packs,
    }
}

/// Both fixture stores, opened once per test process: `[plain, enc]`.
fn fixtures() -> &'static [Fixture; 2] {
    static F: OnceLock<[Fixture; 2]> = OnceLock::new();
    F.get_or_init(|| [load("plain"), load("enc")])
}

/// The body of a framed record, between the version and the trailer.
fn frame_body(framed: &[u8]) -> &[u8] {
    &framed[12..framed.len() - 32]
}

/// `magic ‖ version ‖ body ‖ BLAKE3`: a framed record whose trailer is valid for any body.
fn reframe(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(body);
    let h = blake3::hash(&out);
    out.extend_from_slice(h.as_bytes());
    out
}

// ---------------------------------------------------------------------------------------
// Mutations

/// Values a length, count or size field is set to.
const HUGE: [u64; 7] = [
    u64::MAX,
    u32::MAX as u64,
    i64::MAX as u64,
    (1 << 30) - 1,
    1 << 30,
    1 << 31,
    (1 << 32) + 1,
];

#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit (position taken modulo the length).
    Flip { at: usize, bit: u8 },
    /// Keep only the first `to` bytes (modulo the length).
    Truncate { to: usize },
    /// Append bytes.
    Extend { bytes: Vec<u8> },
    /// Insert bytes at a position.
    Insert { at: usize, bytes: Vec<u8> },
    /// Overwrite 4 bytes with a u32 LE.
    U32 { at: usize, value: u32 },
    /// Replace one byte (a one-byte varint: most lengths and counts in these files) with the
    /// varint of a huge value, as postcard would write it.
    Varint { at: usize, value: u64 },
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

impl Mutation {
    fn apply(&self, data: &[u8]) -> Vec<u8> {
        let mut d = data.to_vec();
        let n = d.len().max(1);
        match self {
            Mutation::Flip { at, bit } => {
                if !d.is_empty() {
                    d[at % n] ^= 1 << (bit % 8);
                }
            }
            Mutation::Truncate { to } => d.truncate(to % n),
            Mutation::Extend { bytes } => d.extend_from_slice(bytes),
            Mutation::Insert { at, bytes } => {
                let at = at % (d.len() + 1);
                d.splice(at..at, bytes.iter().copied());
            }
            Mutation::U32 { at, value } => {
                if d.len() >= 4 {
                    let at = at % (d.len() - 3);
                    d[at..at + 4].copy_from_slice(&value.to_le_bytes());
                }
            }
            Mutation::Varint { at, value } => {
                if !d.is_empty() {
                    let at = at % n;
                    d.splice(at..at + 1, varint(*value));
                }
            }
        }
        d
    }
}

fn huge() -> impl Strategy<Value = u64> {
    prop_oneof![
        proptest::sample::select(HUGE.to_vec()),
        any::<u64>(),
        any::<u32>().prop_map(u64::from),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        1 => proptest::collection::vec(any::<u8>(), 1..64)
            .prop_map(|bytes| Mutation::Extend { bytes }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<usize>(), huge()).prop_map(|(at, v)| Mutation::U32 { at, value: v as u32 }),
        3 => (any::<usize>(), huge()).prop_map(|(at, value)| Mutation::Varint { at, value }),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..4)
}

fn mutate(data: &[u8], ms: &[Mutation]) -> Vec<u8> {
    ms.iter().fold(data.to_vec(), |d, m| m.apply(&d))
}

/// A value that decoded from mutated bytes must be one the format can hold: it encodes to
/// bytes that decode to a value encoding the same.
fn re_encodes<T: Serialize + DeserializeOwned>(v: &T) {
    let bytes = postcard::to_allocvec(v).unwrap();
    let again: T = postcard::from_bytes(&bytes).expect("a decoded value decodes again");
    assert_eq!(postcard::to_allocvec(&again).unwrap(), bytes);
}

// ---------------------------------------------------------------------------------------
// The real files decode

#[test]
fn the_fixture_stores_open_and_every_file_decodes() {
    for f in fixtures() {
        let c: Config = unframe(MAGIC_CONFIG, &f.config, "config").unwrap();
        assert_eq!(c.encrypted, f.name == "enc");
        for k in &f.keys {
            parse_key_file(k, "k").unwrap();
        }
        for l in &f.locks {
            unframe::<LockRecord>(MAGIC_LOCK, l, "l").unwrap();
        }
        assert_eq!(f.index.len(), 2, "{}", f.name);
        assert_eq!(f.snapshots.len(), 2, "{}", f.name);
        let (snaps, errors) = f.store.snapshots().unwrap();
        assert!(errors.is_empty() && snaps.len() == 2);
        for (_, _, p) in &f.index {
            decode_record::<IndexFile>(p, "i").unwrap();
        }
        let mut trees = 0;
        for p in &f.packs {
            assert_eq!(
                decode_record::<PackHeader>(&p.header_payload, "p")
                    .unwrap()
                    .entries,
                p.header.entries
            );
            for ((_, plain), e) in p.blobs.iter().zip(&p.header.entries) {
                assert_eq!(plain.len(), e.raw_length as usize);
                if p.header.kind == BlobKind::Tree {
                    Tree::decode(plain).expect("a fixture tree decodes");
                    trees += 1;
                }
            }
        }
        assert_eq!(trees, 10, "{}", f.name);
    }
    assert_eq!(fixtures()[0].locks.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Files as stored: every change is an error

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// `config`, key files and lock files, whole: the BLAKE3 trailer refuses every change.
    #[test]
    fn mutated_framed_files_are_refused(which in 0usize..5, ms in mutations()) {
        let [p, e] = fixtures();
        let (magic, orig) = match which {
            0 => (MAGIC_CONFIG, &p.config),
            1 => (MAGIC_CONFIG, &e.config),
            2 => (MAGIC_KEY, &e.keys[0]),
            3 => (MAGIC_LOCK, &p.locks[0]),
            _ => (MAGIC_KEY, &p.config),
        };
        let data = mutate(orig, &ms);
        let (c, k, l) = bounded("framed", || (
            unframe::<Config>(MAGIC_CONFIG, &data, "config").is_ok(),
            parse_key_file(&data, "k").is_ok(),
            unframe::<LockRecord>(MAGIC_LOCK, &data, "l").is_ok(),
        ));
        if data != *orig {
            prop_assert!(!c && !k && !l);
        } else {
            prop_assert_eq!((c, k, l), (magic == MAGIC_CONFIG, magic == MAGIC_KEY, magic == MAGIC_LOCK));
        }
    }

    /// Index files, snapshots and pack headers, whole, with each store's keys: authentication
    /// refuses every change.
    #[test]
    fn mutated_sealed_records_are_refused(store in 0usize..2, pick in any::<usize>(), ms in mutations()) {
        let f = &fixtures()[store];
        let c = f.store.crypto();
        let n = f.index.len() + f.snapshots.len() + f.packs.len();
        let i = pick % n;
        let (orig, ok) = if i < f.index.len() {
            let d = mutate(&f.index[i].1, &ms);
            let ok = bounded("index", || open_record::<IndexFile>(c, AAD_INDEX, &d, "i").is_ok());
            (&f.index[i].1, (d, ok))
        } else if i < f.index.len() + f.snapshots.len() {
            let s = &f.snapshots[i - f.index.len()].1;
            let d = mutate(s, &ms);
            let ok = bounded("snapshot", || open_record::<Snapshot>(c, AAD_SNAPSHOT, &d, "s").is_ok());
            (s, (d, ok))
        } else {
            let h = &f.packs[i - f.index.len() - f.snapshots.len()].sealed_header;
            let d = mutate(h, &ms);
            let ok = bounded("pack header", || open_record::<PackHeader>(c, AAD_PACK_HEADER, &d, "p").is_ok());
            (h, (d, ok))
        };
        let (data, ok) = ok;
        prop_assert_eq!(ok, data == *orig);
    }

    /// Whole packs: a change to the header or the length after it is refused, both ways the
    /// engine reads a header; a change before them leaves the header readable, and makes
    /// exactly the blobs whose bytes changed fail to decode.
    #[test]
    fn mutated_packs_are_refused_where_they_changed(store in 0usize..2, pick in any::<usize>(), ms in mutations()) {
        let f = &fixtures()[store];
        let p = &f.packs[pick % f.packs.len()];
        let data = mutate(&p.data, &ms);
        let parsed = bounded("pack", || f.store.parse_pack(&p.name, &data));
        // The same store over a backend that holds the mutated pack, read by ranges.
        let name = "0".repeat(64);
        f.mem.write(FileType::Pack, &name, &data).unwrap();
        let ranged = bounded("pack", || f.mem_store.read_pack_header(&name, data.len() as u64));
        f.mem.remove(FileType::Pack, &name).unwrap();
        prop_assert_eq!(parsed.is_ok(), ranged.is_ok());
        // The header and the length after it, as they were: nothing else authenticates them.
        let tail = &p.data[p.data.len() - 4 - p.sealed_header.len()..];
        if !data.ends_with(tail) {
            prop_assert!(parsed.is_err());
            return Ok(());
        }
        let h = parsed.expect("the header is untouched");
        prop_assert_eq!(&h.entries, &p.header.entries);
        for e in &h.entries {
            let range = e.offset as usize..(e.offset + e.length) as usize;
            let Some(sealed) = data.get(range.clone()) else {
                continue;
            };
            let r = bounded("blob", || f.store.decode_blob(&e.id, sealed, e.raw_length, &p.name));
            prop_assert_eq!(r.is_ok(), *sealed == p.data[range]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Behind the authentication: what the holder of the keys could write

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// The bodies of framed records under a valid trailer: a config, key file or lock that
    /// parses re-encodes to itself, and a key file's key-derivation parameters are within the
    /// bounds (`KdfParams::check`).
    #[test]
    fn mutated_framed_bodies_decode_or_fail(which in 0usize..4, ms in mutations()) {
        let [p, e] = fixtures();
        let (magic, orig) = match which {
            0 => (MAGIC_CONFIG, &p.config),
            1 => (MAGIC_CONFIG, &e.config),
            2 => (MAGIC_KEY, &e.keys[0]),
            _ => (MAGIC_LOCK, &p.locks[0]),
        };
        let data = reframe(magic, &mutate(frame_body(orig), &ms));
        if magic == MAGIC_CONFIG {
            if let Ok(c) = bounded("config", || unframe::<Config>(magic, &data, "config")) {
                re_encodes(&c);
            }
        } else if magic == MAGIC_KEY {
            if let Ok(k) = bounded("key file", || parse_key_file(&data, "k")) {
                prop_assert!(k.kdf.check().is_ok());
                re_encodes(&k);
            }
        } else if let Ok(l) = bounded("lock", || unframe::<LockRecord>(magic, &data, "l")) {
            re_encodes(&l);
        }
    }

    /// Opened payloads of index files, snapshots and pack headers (codec byte, zstd, postcard).
    #[test]
    fn mutated_record_payloads_decode_or_fail(store in 0usize..2, pick in any::<usize>(), ms in mutations()) {
        let f = &fixtures()[store];
        let n = f.index.len() + f.snapshots.len() + f.packs.len();
        let i = pick % n;
        if i < f.index.len() {
            let d = mutate(&f.index[i].2, &ms);
            if let Ok(v) = bounded("index", || decode_record::<IndexFile>(&d, "i")) {
                re_encodes(&v);
            }
        } else if i < f.index.len() + f.snapshots.len() {
            let d = mutate(&f.snapshots[i - f.index.len()].2, &ms);
            if let Ok(v) = bounded("snapshot", || decode_record::<Snapshot>(&d, "s")) {
                re_encodes(&v);
            }
        } else {
            let d = mutate(&f.packs[i - f.index.len() - f.snapshots.len()].header_payload, &ms);
            if let Ok(v) = bounded("pack header", || decode_record::<PackHeader>(&d, "p")) {
                re_encodes(&v);
            }
        }
    }

    /// Opened blob payloads, with the blob's `raw_length` from the index mutated too: both
    /// payload decoders agree, give at most `raw_length` bytes, and a tree blob that decodes
    /// is a tree that re-encodes to itself.
    #[test]
    fn mutated_blob_payloads_decode_or_fail(
        store in 0usize..2, pick in any::<(usize, usize)>(), ms in mutations(), len in prop_oneof![Just(None), huge().prop_map(Some)],
    ) {
        let f = &fixtures()[store];
        let p = &f.packs[pick.0 % f.packs.len()];
        let i = pick.1 % p.blobs.len();
        let raw_len = len.map_or(p.header.entries[i].raw_length as usize, |v| v as u32 as usize);
        let payload = mutate(&p.blobs[i].0, &ms);
        let (owned, reused) = bounded("blob", || {
            let mut buf = Vec::new();
            let reused = decode_payload_ref(&payload, raw_len, &mut buf).map(<[u8]>::to_vec);
            (decode_payload(&payload, raw_len), reused)
        });
        prop_assert_eq!(&owned, &reused);
        if let Some(plain) = owned {
            // A raw body is what it is (the blob id check catches a wrong one); a
            // decompressed one never exceeds the size the index gives.
            prop_assert!(payload[0] != CODEC_ZSTD || raw_len == 0 || plain.len() <= raw_len);
            if p.header.kind == BlobKind::Tree
                && let Some(t) = bounded("tree", || Tree::decode(&plain))
            {
                re_encodes(&t);
            }
        }
    }

    /// Tree blobs once decompressed: what decodes re-encodes to itself, and sanitizing it
    /// keeps only usable names.
    #[test]
    fn mutated_trees_decode_or_fail(store in 0usize..2, pick in any::<usize>(), ms in mutations()) {
        let f = &fixtures()[store];
        let trees: Vec<&Vec<u8>> = f
            .packs
            .iter()
            .filter(|p| p.header.kind == BlobKind::Tree)
            .flat_map(|p| p.blobs.iter().map(|b| &b.1))
            .collect();
        let d = mutate(trees[pick % trees.len()], &ms);
        if let Some(mut t) = bounded("tree", || Tree::decode(&d)) {
            re_encodes(&t);
            bounded("sanitize", || t.sanitize());
            prop_assert!(t.nodes.windows(2).all(|w| w[0].name < w[1].name));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Regressions: what fuzzing found

/// A zstd frame header that claims a huge content size, in a payload of a few bytes, or a
/// payload tagged zstd that is no frame at all: the decoder used to reserve the claimed size,
/// or 1 GiB when the frame header could not be read, before decompressing a byte (the
/// `record_payload` and `blob_payload` fuzz targets found both within seconds). Nothing
/// decompresses to more than 128 KiB per 4 bytes of frame, so it now reserves no more than a
/// frame can produce, and grows past 16 MiB only with bytes actually produced.
#[test]
fn a_zstd_frame_claiming_a_huge_size_allocates_little() {
    // The fuzzers' inputs: an index payload tagged zstd whose body is not a frame; a blob
    // payload tagged zstd whose index entry says 167 MiB.
    let mut not_a_frame = vec![CODEC_ZSTD, 0x00, 0x40];
    not_a_frame.extend_from_slice(b"7c0f177f3bb9957f6e82bd5a394069180c7ae54e2d3c");
    let (r, u) = measure(|| decode_record::<IndexFile>(&not_a_frame, "i"));
    assert!(r.is_err());
    assert!(u.largest < 1 << 20, "not a frame: {u:?}");
    let (r, u) = measure(|| decode_payload(&not_a_frame, 0x0a00_0500));
    assert!(r.is_none());
    // At most what a frame of this length could hold, as the index entry may be true.
    assert!(
        u.largest <= not_a_frame.len() * 32 * 1024,
        "not a frame, raw_length 167 MiB: {u:?}"
    );
    for claim in [(1u64 << 30) - 1, 1 << 29, 100 << 20, 64 << 20] {
        // Magic, a descriptor with an 8-byte content size and one segment, the size, then
        // one last raw block of 1 byte.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
        frame.extend_from_slice(&claim.to_le_bytes());
        frame.extend_from_slice(&[0x09, 0x00, 0x00, b'x']);
        let mut payload = vec![CODEC_ZSTD];
        payload.extend_from_slice(&frame);
        let (r, u) = measure(|| decode_record::<IndexFile>(&payload, "i"));
        assert!(r.is_err());
        assert!(u.largest < 1 << 20, "claim {claim}: {u:?}");
        let (r, u) = measure(|| decode_payload(&payload, 0));
        assert!(r.is_none());
        assert!(u.largest < 1 << 20, "claim {claim}: {u:?}");
        // A blob whose index entry claims as much.
        let (r, u) = measure(|| decode_payload(&payload, claim as usize));
        assert!(r.is_none());
        assert!(u.largest < 1 << 20, "raw_length {claim}: {u:?}");
    }
    // A frame that does hold a lot still decodes: 2 MiB of zeros in a few hundred bytes.
    let big = vec![0u8; 2 << 20];
    let mut payload = vec![CODEC_ZSTD];
    payload.extend_from_slice(&zstd::bulk::compress(&big, 3).unwrap());
    assert!(payload.len() < 1000);
    assert_eq!(decode_payload(&payload, 0).unwrap(), big);
    assert_eq!(decode_payload(&payload, big.len()).unwrap(), big);
    let mut out = Vec::new();
    assert_eq!(decode_payload_ref(&payload, 0, &mut out).unwrap(), &big[..]);
}

fn key_file_with(kdf: KdfParams) -> Vec<u8> {
    let mut k: KeyFile = parse_key_file(&fixtures()[1].keys[0], "k").unwrap();
    k.kdf = kdf;
    frame(MAGIC_KEY, &k)
}

/// A key file is read before any key is known, from a directory anyone with write access to
/// the store can add to. Its key-derivation parameters used to go to Argon2id as they came:
/// `m_kib = u32::MAX` asked for 4 TiB, `t = u32::MAX` ran for years, and parameters Argon2
/// refuses (`p = 0`) failed the whole open even when another key file was good.
#[test]
fn key_files_with_unbounded_key_derivation_are_refused() {
    let d = KdfParams::default();
    for (m_kib, t, p) in [
        (u32::MAX, d.t, d.p),
        (d.m_kib, u32::MAX, d.p),
        (d.m_kib, d.t, u32::MAX),
        (d.m_kib, d.t, 0),
        (d.m_kib, 0, d.p),
        (0, d.t, d.p),
        (4 * 1024 * 1024, d.t, d.p),
    ] {
        let kdf = KdfParams { m_kib, t, p };
        let e = parse_key_file(&key_file_with(kdf), "k").unwrap_err();
        assert!(e.to_string().contains("key derivation"), "{kdf:?}: {e}");
    }
    parse_key_file(&key_file_with(d), "k").unwrap();
    let strongest = KdfParams {
        m_kib: 2 * 1024 * 1024,
        t: 16,
        p: 64,
    };
    assert!(strongest.check().is_ok());
}

/// A planted key file that sorts before the real one does not stop the store from opening.
#[test]
fn a_store_opens_past_a_planted_key_file_with_absurd_parameters() {
    let mem = Arc::new(MemBackend::new());
    let kdf = KdfParams {
        m_kib: 256,
        t: 1,
        p: 1,
    };
    let opts = CreateOptions {
        kdf,
        ..CreateOptions::default()
    };
    let pass = |_| Ok(b"secret".to_vec());
    Store::create(mem.clone(), &opts, &pass).unwrap();
    let config: Config = unframe(
        MAGIC_CONFIG,
        &mem.read(FileType::Config, "config").unwrap(),
        "config",
    )
    .unwrap();
    for (i, (m_kib, t, p)) in [(u32::MAX, u32::MAX, 1), (256, 1, 0)].iter().enumerate() {
        let planted = KeyFile::wrap(&MasterKeys::random(), b"other", &config.id, kdf).unwrap();
        let planted = KeyFile {
            kdf: KdfParams {
                m_kib: *m_kib,
                t: *t,
                p: *p,
            },
            ..planted
        };
        let name = format!("{i:032}");
        mem.write(FileType::Key, &name, &frame(MAGIC_KEY, &planted))
            .unwrap();
    }
    let store = Store::open(mem, &pass).expect("the store opens with its own key file");
    assert!(!store.snapshots().unwrap().0.iter().any(|s| s.id.is_empty()));
}

// ---------------------------------------------------------------------------------------
// The fuzz targets' seed corpus

/// The seed corpus of every fuzz target, by target and file name, made from the fixtures.
fn seeds() -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let mut s: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut add = |target: &str, name: String, bytes: Vec<u8>| {
        s.entry(target.to_string()).or_default().insert(name, bytes);
    };
    let with = |sel: u8, b: &[u8]| {
        let mut v = vec![sel];
        v.extend_from_slice(b);
        v
    };
    for (si, f) in fixtures().iter().enumerate() {
        let si = si as u8;
        let n = f.name;
        add("framed", format!("{n}-config"), f.config.clone());
        add(
            "framed_body",
            format!("{n}-config"),
            with(0, frame_body(&f.config)),
        );
        for (i, k) in f.keys.iter().enumerate() {
            add("framed", format!("{n}-key{i}"), k.clone());
            add("framed_body", format!("{n}-key{i}"), with(1, frame_body(k)));
        }
        for (i, l) in f.locks.iter().enumerate() {
            add("framed", format!("{n}-lock{i}"), l.clone());
            add(
                "framed_body",
                format!("{n}-lock{i}"),
                with(2, frame_body(l)),
            );
        }
        let keys = postcard::to_allocvec(f.store.crypto().keys()).unwrap();
        add("framed_body", format!("{n}-master-keys"), with(3, &keys));
        for (name, sealed, payload) in &f.index {
            let short = &name[..8];
            add("sealed", format!("{n}-index-{short}"), with(si, sealed));
            add(
                "record_payload",
                format!("{n}-index-{short}"),
                with(0, payload),
            );
        }
        for (name, sealed, payload) in &f.snapshots {
            let short = &name[..8];
            add(
                "sealed",
                format!("{n}-snapshot-{short}"),
                with(2 | si, sealed),
            );
            add(
                "record_payload",
                format!("{n}-snapshot-{short}"),
                with(1, payload),
            );
        }
        for p in &f.packs {
            let short = &p.name[..8];
            let kind = if p.header.kind == BlobKind::Tree {
                "tree"
            } else {
                "data"
            };
            add(
                "pack",
                format!("{n}-{kind}-pack-{short}"),
                with(si, &p.data),
            );
            add(
                "sealed",
                format!("{n}-header-{short}"),
                with(4 | si, &p.sealed_header),
            );
            add(
                "record_payload",
                format!("{n}-header-{short}"),
                with(2, &p.header_payload),
            );
            for ((payload, plain), e) in p.blobs.iter().zip(&p.header.entries) {
                let id = &e.id.hex()[..8];
                let mut b = e.raw_length.to_le_bytes().to_vec();
                b.extend_from_slice(payload);
                add("blob_payload", format!("{n}-{kind}-{id}"), b);
                if p.header.kind == BlobKind::Tree {
                    add("tree", format!("{n}-{id}"), plain.clone());
                    let t = Tree::decode(plain).unwrap();
                    add("sftp_listing", format!("{n}-{id}"), listing_of(&t));
                }
            }
        }
    }
    s
}

/// The READDIR an SFTP server would send for a directory of this tree, in the input format
/// of the `sftp_listing` target: `name_len ‖ name ‖ 0x3f ‖ size u64 ‖ uid u32 ‖ gid u32 ‖
/// perm u32 ‖ atime u64 ‖ mtime u64`, plus `.` and `..`.
fn listing_of(t: &Tree) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &[u8], size: u64, uid: u32, gid: u32, perm: u32, mtime: u64| {
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.push(0x3f);
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&uid.to_le_bytes());
        out.extend_from_slice(&gid.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&mtime.to_le_bytes());
        out.extend_from_slice(&mtime.to_le_bytes());
    };
    entry(b".", 4096, 0, 0, 0o40755, 1_700_000_000);
    entry(b"..", 4096, 0, 0, 0o40755, 1_700_000_000);
    for n in &t.nodes {
        let perm = n.kind.ifmt() | n.mode;
        entry(&n.name, n.size, n.uid, n.gid, perm, n.mtime.sec as u64);
    }
    out
}

/// The checked-in seed corpus is what the fixture stores give (written anew with
/// `KLOSET_WRITE_SEEDS=1`, e.g. after the format changes), and is small.
#[test]
fn seeds_are_made_from_the_fixture_stores() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let want = seeds();
    if std::env::var_os("KLOSET_WRITE_SEEDS").is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        for (t, files) in &want {
            std::fs::create_dir_all(dir.join(t)).unwrap();
            for (n, b) in files {
                std::fs::write(dir.join(t).join(n), b).unwrap();
            }
        }
    }
    let mut total = 0;
    for (t, files) in &want {
        let have: BTreeMap<String, Vec<u8>> = files_of(&dir, t).into_iter().collect();
        assert_eq!(
            have.keys().collect::<Vec<_>>(),
            files.keys().collect::<Vec<_>>(),
            "fuzz/seeds/{t}: run this test with KLOSET_WRITE_SEEDS=1"
        );
        for (n, b) in files {
            assert!(
                have[n] == *b,
                "fuzz/seeds/{t}/{n} differs from the fixture stores"
            );
            total += b.len();
        }
    }
    assert_eq!(want.len(), 8, "one seed directory per fuzz target");
    assert!(total < 256 << 10, "the seed corpus is {total} bytes");
}
