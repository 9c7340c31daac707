//! An open store: config, keys, the in-memory index, blob reads and writes, snapshots, locks.
//!
//! [`Store`] is what every pipeline (backup, restore, check, mount, sync) works against. It
//! reads blobs through the index (`blob id → pack, offset, length`) with ranged reads, and
//! writes new blobs through a [`Packer`] that fills pack files of about `pack_size` bytes, one
//! for data and one for trees, uploads each when full, and writes an index file for every few
//! dozen packs, so an interrupted backup leaves packs that a re-run finds and reuses.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use super::backend::Listed;
use super::backend::{Backend, FileType};
use super::cache::Cache;
use super::crypto::{BlobId, Crypto, KdfParams, KeyFile, MasterKeys};
use super::error::{Error, Result};
use super::format::{self, *};
use super::tree::{Node, NodeKind, Tree, components};

/// Where a blob is.
#[derive(Debug, Clone, Copy)]
pub struct Loc {
    pub pack: u32,
    pub kind: BlobKind,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

/// All known blobs.
///
/// Blob ids are keyed hashes, so the map hashes them with foldhash rather than SipHash:
/// loading a 50k-blob index file took 16 ms in the map, most of it hashing and regrowing.
#[derive(Default)]
pub struct Index {
    packs: Vec<String>,
    pack_ids: HashMap<String, u32>,
    blobs: HashMap<BlobId, Loc, foldhash::fast::RandomState>,
}

impl Index {
    /// Make room for `n` more blobs.
    pub fn reserve(&mut self, n: usize) {
        self.blobs.reserve(n);
    }
    pub fn add_pack(&mut self, p: &IndexPack) {
        let n = match self.pack_ids.get(&p.pack) {
            Some(&n) => n,
            None => {
                let n = self.packs.len() as u32;
                self.packs.push(p.pack.clone());
                self.pack_ids.insert(p.pack.clone(), n);
                n
            }
        };
        for e in &p.entries {
            self.blobs.entry(e.id).or_insert(Loc {
                pack: n,
                kind: p.kind,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
            });
        }
    }
    pub fn get(&self, id: &BlobId) -> Option<Loc> {
        self.blobs.get(id).copied()
    }
    pub fn contains(&self, id: &BlobId) -> bool {
        self.blobs.contains_key(id)
    }
    pub fn pack_name(&self, n: u32) -> &str {
        &self.packs[n as usize]
    }
    pub fn has_pack(&self, name: &str) -> bool {
        self.pack_ids.contains_key(name)
    }
    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }
    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }
    /// Every blob with its location.
    pub fn iter(&self) -> impl Iterator<Item = (&BlobId, &Loc)> {
        self.blobs.iter()
    }
}

/// Options of `create`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub encrypted: bool,
    pub compression: bool,
    pub kdf: KdfParams,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            encrypted: true,
            compression: true,
            kdf: KdfParams::default(),
        }
    }
}

/// A snapshot with its id (the name of its file).
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub id: String,
    pub snap: Snapshot,
}

impl SnapshotEntry {
    pub fn short(&self) -> &str {
        &self.id[..8.min(self.id.len())]
    }
}

/// Problems met while loading the index, reported by `check` and warned about elsewhere.
#[derive(Debug, Default)]
pub struct IndexLoadReport {
    pub damaged_index_files: Vec<(String, String)>,
    /// Packs not in any index whose headers were read to recover their blobs.
    pub recovered_packs: Vec<String>,
    pub damaged_pack_headers: Vec<(String, String)>,
}

pub struct Store {
    backend: Arc<dyn Backend>,
    config: Config,
    crypto: Crypto,
    index: RwLock<Index>,
    trees: Mutex<LruCache<BlobId, Arc<Tree>>>,
    index_report: Mutex<IndexLoadReport>,
    /// Packs no index file lists, as read from their headers when the index was loaded (an
    /// interrupted backup's, or another writer's not indexed yet), by name. A writer that
    /// reuses a blob of one lists the pack in its own index ([`Packer::claim`]).
    recovered: Mutex<HashMap<String, IndexPack>>,
    /// `recovered` is not empty (checked without a lock on every reused blob).
    has_recovered: AtomicBool,
    /// Local copies of index files, snapshots and tree packs (remote stores only).
    cache: Option<Cache>,
}

/// Read an immutable file through the local cache `cache` (remote stores), or straight; says
/// whether the bytes came from the cache. Nothing is put in the cache here: a copy is kept
/// only once it has been checked ([`Store::accept`]).
fn fetch_via(backend: &dyn Backend, cache: Option<&Cache>, t: FileType, name: &str) -> Fetched {
    if let Some(b) = cache.and_then(|c| c.get(t, name)) {
        return Ok((b, true));
    }
    Ok((backend.read(t, name)?, false))
}

/// The local cache of a remote store's immutable files (none for local stores, or with
/// `KLOSET_NO_CACHE` set).
fn cache_for(backend: &dyn Backend, config: &Config) -> Option<Cache> {
    if backend.is_remote() && std::env::var_os("KLOSET_NO_CACHE").is_none() {
        Cache::for_store(&config.id_hex())
    } else {
        None
    }
}

/// The index files' bytes and the pack listing, read without the keys (so while they are
/// derived); [`Store::load_index_from`] authenticates them.
/// A file's bytes, and whether they came from the local cache.
type Fetched = Result<(Vec<u8>, bool)>;

struct IndexFiles {
    /// Each index file's bytes ([`Fetched`]).
    index: Vec<(Listed, Fetched)>,
    packs: Vec<Listed>,
}

impl IndexFiles {
    fn read(backend: &dyn Backend, cache: Option<&Cache>) -> Result<IndexFiles> {
        let _t = crate::trace::span("read index files");
        let listed = backend.list(FileType::Index)?;
        if let Some(c) = cache {
            c.retain(
                FileType::Index,
                &listed.iter().map(|f| f.name.clone()).collect(),
            );
        }
        let index = listed
            .into_iter()
            .map(|f| {
                let b = fetch_via(backend, cache, FileType::Index, &f.name);
                (f, b)
            })
            .collect();
        let packs = {
            let _t = crate::trace::span("list packs");
            backend.list(FileType::Pack)?
        };
        Ok(IndexFiles { index, packs })
    }
}

/// Blobs at least this large are sampled before being compressed.
const SAMPLE_ABOVE: usize = 128 << 10;
const SAMPLE: usize = 32 << 10;

/// Would compressing this blob pay? Already-compressed data (`.gz` man pages, images, archives)
/// is common in backups and costs zstd as much time as text for nothing: a large blob whose
/// first 32 KiB do not shrink by 3% at level 1 is stored raw. (perf of a first backup of
/// /usr/share: zstd was the largest single cost.)
fn worth_compressing(data: &[u8]) -> bool {
    if data.len() < SAMPLE_ABOVE {
        return true;
    }
    SAMPLE_BUF.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        // Not shrinking by 3% means not fitting in that much room: zstd reports it as an error.
        b.reserve_exact(SAMPLE);
        compress_into(&data[..SAMPLE], 1, &mut b, SAMPLE - SAMPLE / 32 - 1)
    })
}

thread_local! {
    /// One zstd context per thread and level: creating one per blob allocates and clears
    /// megabytes each time.
    static COMPRESSORS: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// Where [`worth_compressing`] compresses its sample.
    static SAMPLE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Where [`Packer::add`] seals a blob before copying it into the pack: one buffer per
    /// thread, reused, instead of four fresh ones per blob (compressed, payload, ciphertext,
    /// sealed), which for megabyte chunks meant mmap, page faults and munmap every time.
    static SEAL_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Where [`Store::read_blob`] reads a blob's ciphertext: a fresh megabyte buffer per blob
    /// was a new mapping each time, a page fault per 4 KiB.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread's read buffer is kept up to this size (sealed chunks are at most a little over
/// 8 MiB).
const MAX_KEPT_READ_BUF: usize = 9 << 20;

/// Where a blob decoded by [`Store::decode_blob_in_place`] lies in its `sealed` buffer, given
/// the decoded slice's address and length: inside (stored raw), or `None` (decompressed into
/// `out`).
fn span_in(plain: (usize, usize), sealed: &[u8]) -> Option<std::ops::Range<usize>> {
    let base = sealed.as_ptr() as usize;
    let (addr, len) = plain;
    (addr >= base && addr + len <= base + sealed.len()).then(|| addr - base..addr - base + len)
}

/// A zstd context for `level`. Level 3 (the default) gets smaller match tables than zstd's own
/// (hash log 16, chain log 14: 320 KiB instead of 768 KiB, inside the 512 KiB L2 cache of a
/// core here). Measured on /usr/share + a tar of /usr/lib: a first backup takes ~10% less CPU
/// and the store grows ~1.4% (still below restic's); zstd is a third of a first backup's CPU.
fn new_compressor(level: i32) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    use zstd::stream::raw::CParameter;
    let mut z = zstd::bulk::Compressor::new(level)?;
    if level == 3 {
        z.set_parameter(CParameter::HashLog(16))?;
        z.set_parameter(CParameter::ChainLog(14))?;
    }
    Ok(z)
}

/// Append `data` compressed at `level` to `out` if the result fits in `room` bytes; on
/// `false`, `out` is as it was.
fn compress_into(data: &[u8], level: i32, out: &mut Vec<u8>, room: usize) -> bool {
    COMPRESSORS.with(|c| {
        let mut c = c.borrow_mut();
        let i = match c.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => match new_compressor(level) {
                Ok(z) => {
                    c.push((level, z));
                    c.len() - 1
                }
                Err(_) => return false,
            },
        };
        let start = out.len();
        out.reserve(room);
        let fits = {
            // zstd writes after the cursor, up to the Vec's capacity; a result that does not
            // fit is an error and leaves nothing behind.
            let mut cur = std::io::Cursor::new(&mut *out);
            cur.set_position(start as u64);
            c[i].1.compress_to_buffer(data, &mut cur).is_ok()
        };
        if fits && out.len() - start <= room {
            true
        } else {
            out.truncate(start);
            false
        }
    })
}

/// How the passphrase is obtained: called at most once, only for encrypted stores.
pub type PassphraseFn<'a> = &'a dyn Fn(bool) -> Result<Vec<u8>>;

fn read_config(backend: &dyn Backend) -> Result<Config> {
    match backend.read(FileType::Config, "config") {
        Ok(b) => unframe(MAGIC_CONFIG, &b, "config"),
        Err(e) if e.is_not_found() => Err(Error::NoStore(backend.location())),
        Err(e) => Err(e),
    }
}

impl Store {
    /// Create a new store; `passphrase` is asked with `true` (confirm) when encrypted.
    pub fn create(
        backend: Arc<dyn Backend>,
        opts: &CreateOptions,
        passphrase: PassphraseFn,
    ) -> Result<Store> {
        let entries = backend.root_entries()?;
        if entries.iter().any(|e| e == "config") {
            return Err(Error::AlreadyExists(backend.location()));
        }
        if !entries.is_empty() {
            // What an interrupted create leaves (the directories, perhaps a key file, no
            // config) may be created over; anything else is someone's data.
            let ours = entries.iter().all(|e| {
                FileType::ALL
                    .iter()
                    .any(|t| *t != FileType::Config && t.dir() == e)
            });
            let empty = [FileType::Pack, FileType::Index, FileType::Snapshot]
                .iter()
                .map(|t| backend.list(*t))
                .collect::<Result<Vec<_>>>()?
                .iter()
                .all(|l| l.is_empty());
            if !ours || !empty {
                return Err(Error::NotEmpty(backend.location()));
            }
            for k in backend.list(FileType::Key)? {
                backend.remove(FileType::Key, &k.name)?;
            }
        }
        let keys = MasterKeys::random();
        let mut id = [0u8; 16];
        super::crypto::fill_random(&mut id);
        let config = Config {
            id,
            created_ns: super::now_ns(),
            encrypted: opts.encrypted,
            compression_level: if opts.compression { 3 } else { 0 },
            chunker: ChunkerParams::default(),
            pack_size: 16 << 20,
            plain_keys: (!opts.encrypted).then(|| keys.clone()),
            auth: [0; 32],
        };
        let config = Config {
            auth: config.compute_auth(&keys.id),
            ..config
        };
        let key_file = if opts.encrypted {
            let pass = passphrase(true)?;
            Some(KeyFile::wrap(&keys, &pass, &id, opts.kdf)?)
        } else {
            None
        };
        backend.init()?;
        if let Some(kf) = key_file {
            let name = super::crypto::random_hex(16);
            backend.write(FileType::Key, &name, &frame(MAGIC_KEY, &kf))?;
        }
        // The config is written last: a store without one is not a store, so a create that
        // fails half-way can simply be run again.
        backend.write(FileType::Config, "config", &frame(MAGIC_CONFIG, &config))?;
        Ok(Store::with(backend, config, keys))
    }

    fn with(backend: Arc<dyn Backend>, config: Config, keys: MasterKeys) -> Store {
        let cache = cache_for(backend.as_ref(), &config);
        Store::with_cache(backend, config, keys, cache)
    }

    fn with_cache(
        backend: Arc<dyn Backend>,
        config: Config,
        keys: MasterKeys,
        cache: Option<Cache>,
    ) -> Store {
        Store {
            cache,
            crypto: Crypto::new(keys, config.encrypted),
            backend,
            config,
            index: RwLock::new(Index::default()),
            trees: Mutex::new(LruCache::new(NonZeroUsize::new(4096).expect("non-zero"))),
            index_report: Mutex::new(IndexLoadReport::default()),
            recovered: Mutex::new(HashMap::new()),
            has_recovered: AtomicBool::new(false),
        }
    }

    /// Open an existing store and load its index. The index files are listed and read (from
    /// the local cache for remote stores) while Argon2id derives the key on another thread.
    pub fn open(backend: Arc<dyn Backend>, passphrase: PassphraseFn) -> Result<Store> {
        Store::open_with(backend, passphrase, true)
    }

    /// Open an existing store without loading the index.
    pub fn open_no_index(backend: Arc<dyn Backend>, passphrase: PassphraseFn) -> Result<Store> {
        Store::open_with(backend, passphrase, false)
    }

    fn open_with(
        backend: Arc<dyn Backend>,
        passphrase: PassphraseFn,
        with_index: bool,
    ) -> Result<Store> {
        let t = crate::trace::span("open store (config, keys)");
        let config = read_config(backend.as_ref())?;
        let cache = cache_for(backend.as_ref(), &config);
        let read_files = || with_index.then(|| IndexFiles::read(backend.as_ref(), cache.as_ref()));
        let mut index_files = None;
        let keys = match &config.plain_keys {
            Some(k) if !config.encrypted => k.clone(),
            _ => {
                let files = backend.list(FileType::Key)?;
                if files.is_empty() {
                    return Err(Error::damaged("keys/", "the store has no key file"));
                }
                let mut parsed = Vec::new();
                let mut damaged = Vec::new();
                for f in &files {
                    match backend
                        .read(FileType::Key, &f.name)
                        .and_then(|b| parse_key_file(&b, &f.name))
                    {
                        Ok(k) => parsed.push(k),
                        Err(e) => damaged.push(e),
                    }
                }
                if parsed.is_empty() {
                    return Err(damaged.remove(0));
                }
                let pass = passphrase(false)?;
                // Argon2id is CPU only: the index files come over the connection meanwhile.
                let found = std::thread::scope(|s| {
                    let derive = s.spawn(|| {
                        let _t = crate::trace::span("key derivation");
                        for k in &parsed {
                            if let Some(keys) = k.unwrap(&pass, &config.id)? {
                                return Ok(Some(keys));
                            }
                        }
                        Ok::<_, Error>(None)
                    });
                    index_files = read_files();
                    derive
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p))
                })?;
                match found {
                    Some(k) => k,
                    None => return Err(Error::WrongPassphrase(files.len())),
                }
            }
        };
        if !config.encrypted && !backend.list(FileType::Key)?.is_empty() {
            return Err(Error::damaged(
                "config",
                "it says the store is not encrypted, but the store has key files: the config was replaced",
            ));
        }
        if config.compute_auth(&keys.id) != config.auth {
            return Err(Error::damaged(
                "config",
                "it fails authentication with the store's keys: it was changed",
            ));
        }
        let store = Store::with_cache(backend, config, keys, cache);
        drop(t);
        if with_index {
            let files = match index_files {
                Some(f) => f?,
                None => IndexFiles::read(store.backend.as_ref(), store.cache.as_ref())?,
            };
            store.load_index_from(files)?;
        }
        Ok(store)
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }
    pub fn index(&self) -> parking_lot::RwLockReadGuard<'_, Index> {
        self.index.read()
    }
    pub fn index_report(&self) -> parking_lot::MutexGuard<'_, IndexLoadReport> {
        self.index_report.lock()
    }

    /// Read every index file; packs that no index lists (an interrupted backup) have their
    /// headers read so their blobs are known and reused.
    pub fn load_index(&self) -> Result<()> {
        let files = IndexFiles::read(self.backend.as_ref(), self.cache.as_ref())?;
        self.load_index_from(files)
    }

    /// [`Store::load_index`] from files already read: authenticate and merge them.
    fn load_index_from(&self, files: IndexFiles) -> Result<()> {
        let _t = crate::trace::span("load index");
        let mut idx = Index::default();
        let mut report = IndexLoadReport::default();
        let mut opened = Vec::with_capacity(files.index.len());
        for (f, bytes) in files.index {
            let file = format!("index/{}", f.name);
            let res = bytes.and_then(|(b, cached)| {
                self.accept(FileType::Index, &f.name, b, cached, |b| {
                    if self.crypto.file_id(b) != f.name {
                        return Err(Error::damaged(&file, "content does not match its name"));
                    }
                    open_record::<IndexFile>(&self.crypto, AAD_INDEX, b, &file)
                })
            });
            match res {
                Ok(i) => opened.push(i),
                // Not read because the server is gone: no verdict on the file, and no index
                // without it.
                Err(e) if e.kind() == super::error::ErrorKind::Unreachable => return Err(e),
                Err(e) => report.damaged_index_files.push((file, e.to_string())),
            }
        }
        // Sized once: growing the map step by step rehashes everything several times.
        idx.reserve(
            opened
                .iter()
                .flat_map(|i| &i.packs)
                .map(|p| p.entries.len())
                .sum(),
        );
        for i in &opened {
            i.packs.iter().for_each(|p| idx.add_pack(p));
        }
        drop(opened);
        let packs = files.packs;
        let mut recovered = HashMap::new();
        for p in packs {
            if idx.has_pack(&p.name) {
                continue;
            }
            match self.read_pack_header(&p.name, p.size) {
                Ok(h) => {
                    let ip = IndexPack {
                        pack: p.name.clone(),
                        kind: h.kind,
                        entries: h.entries,
                    };
                    idx.add_pack(&ip);
                    recovered.insert(p.name.clone(), ip);
                    report.recovered_packs.push(p.name);
                }
                Err(e) if e.kind() == super::error::ErrorKind::Unreachable => return Err(e),
                Err(e) => report.damaged_pack_headers.push((p.name, e.to_string())),
            }
        }
        *self.index.write() = idx;
        *self.index_report.lock() = report;
        self.has_recovered
            .store(!recovered.is_empty(), Ordering::Release);
        *self.recovered.lock() = recovered;
        Ok(())
    }

    /// Read an immutable file through the local cache (remote stores), or straight, and
    /// `check` it ([`Store::accept`]).
    fn fetch_checked<T>(
        &self,
        t: FileType,
        name: &str,
        check: impl Fn(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let (b, cached) = fetch_via(self.backend.as_ref(), self.cache.as_ref(), t, name)?;
        self.accept(t, name, b, cached, check)
    }

    /// `check` the bytes of a file (authenticate and parse them). A copy from the local cache
    /// that fails is the cache's fault, not the store's: it is dropped with a warning and the
    /// file fetched again from the store, whose copy alone decides. A copy from the store that
    /// passes is kept in the cache.
    fn accept<T>(
        &self,
        t: FileType,
        name: &str,
        bytes: Vec<u8>,
        cached: bool,
        check: impl Fn(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let bytes = match check(&bytes) {
            Ok(v) => {
                if !cached && let Some(c) = &self.cache {
                    c.put(t, name, &bytes);
                }
                return Ok(v);
            }
            Err(e) if !cached => return Err(e),
            Err(_) => {
                self.cache_damaged(t, name);
                self.backend.read(t, name)?
            }
        };
        let v = check(&bytes)?;
        if let Some(c) = &self.cache {
            c.put(t, name, &bytes);
        }
        Ok(v)
    }

    /// The cached copy of a file failed its checks: drop it, and say so once.
    fn cache_damaged(&self, t: FileType, name: &str) {
        if let Some(c) = &self.cache {
            c.remove(t, name);
            super::notice::warn_once(format!(
                "cached copy {} was damaged; fetched it again from the store",
                c.path(t, name).display()
            ));
        }
    }

    /// Write an immutable file, keeping a copy in the local cache.
    fn store_file(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        self.backend.write(t, name, data)?;
        if let Some(c) = &self.cache {
            c.put(t, name, data);
        }
        Ok(())
    }

    /// Read and open the header at the end of a pack of `size` bytes.
    pub fn read_pack_header(&self, name: &str, size: u64) -> Result<PackHeader> {
        let file = FileType::Pack.path(name);
        if size < 4 {
            return Err(Error::damaged(&file, "pack is truncated"));
        }
        let tail = self.backend.read_range(FileType::Pack, name, size - 4, 4)?;
        let hlen = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
        if hlen + 4 > size {
            return Err(Error::damaged(&file, "bad header length"));
        }
        let h = self
            .backend
            .read_range(FileType::Pack, name, size - 4 - hlen, hlen)?;
        open_record(&self.crypto, AAD_PACK_HEADER, &h, &file)
    }

    /// Parse a whole pack file (for check and recovery).
    pub fn parse_pack(&self, name: &str, data: &[u8]) -> Result<PackHeader> {
        let file = FileType::Pack.path(name);
        if data.len() < 4 {
            return Err(Error::damaged(&file, "pack is truncated"));
        }
        let n = data.len();
        let hlen = u32::from_le_bytes(data[n - 4..].try_into().expect("4 bytes")) as usize;
        if hlen + 4 > n {
            return Err(Error::damaged(&file, "bad header length"));
        }
        open_record(
            &self.crypto,
            AAD_PACK_HEADER,
            &data[n - 4 - hlen..n - 4],
            &file,
        )
    }

    /// Decode a sealed blob read from `pack`, checking it is the blob `id`.
    pub fn decode_blob(
        &self,
        id: &BlobId,
        sealed: &[u8],
        raw_len: u32,
        pack: &str,
    ) -> Result<Vec<u8>> {
        self.decode_blob_owned(id, sealed.to_vec(), raw_len, pack)
    }

    /// [`Store::decode_blob`] of a buffer the caller owns: decrypted in place, no copy.
    pub fn decode_blob_owned(
        &self,
        id: &BlobId,
        mut sealed: Vec<u8>,
        raw_len: u32,
        pack: &str,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let plain = {
            let p = self.decode_blob_in_place(id, &mut sealed, raw_len, pack, &mut out)?;
            (p.as_ptr() as usize, p.len())
        };
        match span_in(plain, &sealed) {
            Some(r) => {
                sealed.truncate(r.end);
                sealed.drain(..r.start);
                Ok(sealed)
            }
            None => Ok(out),
        }
    }

    /// [`Store::decode_blob`] of a buffer the caller lets us change (decrypted in place) into
    /// `out`'s memory (its content replaced).
    pub fn decode_blob_into(
        &self,
        id: &BlobId,
        sealed: &mut [u8],
        raw_len: u32,
        pack: &str,
        mut out: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let plain = {
            let p = self.decode_blob_in_place(id, sealed, raw_len, pack, &mut out)?;
            (p.as_ptr() as usize, p.len())
        };
        if let Some(r) = span_in(plain, sealed) {
            out.clear();
            out.extend_from_slice(&sealed[r]);
        }
        Ok(out)
    }

    /// [`Store::decode_blob`] without copies: `sealed` is decrypted in place, and the blob is
    /// returned from inside it (stored raw) or from `out` (decompressed into it).
    pub fn decode_blob_in_place<'a>(
        &self,
        id: &BlobId,
        sealed: &'a mut [u8],
        raw_len: u32,
        pack: &str,
        out: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        let damaged = |why: &str| {
            Error::damaged(
                FileType::Pack.path(pack),
                format!("blob {} {why}", id.short()),
            )
        };
        let payload = self
            .crypto
            .open_in_place(&id.0, sealed)
            .ok_or_else(|| damaged("fails authentication"))?;
        let data = decode_payload_ref(payload, raw_len as usize, out)
            .ok_or_else(|| damaged("cannot be decompressed"))?;
        if self.crypto.blob_id(data) != *id {
            return Err(damaged("has the wrong content"));
        }
        Ok(data)
    }

    /// Read one blob.
    pub fn read_blob(&self, id: &BlobId) -> Result<Vec<u8>> {
        self.read_blob_reusing(id, Vec::new())
    }

    /// [`Store::read_blob`] into `out`'s memory (its content is replaced): a data blob read
    /// into a buffer that already has the capacity costs no new pages.
    pub fn read_blob_reusing(&self, id: &BlobId, out: Vec<u8>) -> Result<Vec<u8>> {
        let (loc, pack) = {
            let idx = self.index.read();
            let loc = idx.get(id).ok_or_else(|| Error::MissingBlob(id.hex()))?;
            (loc, idx.pack_name(loc.pack).to_string())
        };
        let (off, len) = (loc.offset as u64, loc.length as u64);
        if let (Some(c), BlobKind::Tree) = (&self.cache, loc.kind) {
            // Tree packs are fetched whole once and read locally from then on. A cached pack
            // that is too short or whose blob fails its checks is dropped and fetched again.
            match c.read_range(FileType::Pack, &pack, off, len) {
                Some(sealed) => match self.decode_blob_owned(id, sealed, loc.raw_length, &pack) {
                    Err(e) if e.kind() == super::ErrorKind::Damaged => {
                        self.cache_damaged(FileType::Pack, &pack)
                    }
                    r => return r,
                },
                None if c.has(FileType::Pack, &pack) => self.cache_damaged(FileType::Pack, &pack),
                None => {}
            }
            let all = self.backend.read(FileType::Pack, &pack)?;
            // Only a pack that matches its name is kept.
            if self.crypto.file_id(&all) == pack {
                c.put(FileType::Pack, &pack, &all);
            }
            let end = off + len;
            if end > all.len() as u64 {
                return Err(Error::damaged(
                    FileType::Pack.path(&pack),
                    "pack is shorter than its index says",
                ));
            }
            let sealed = all[off as usize..end as usize].to_vec();
            return self.decode_blob_owned(id, sealed, loc.raw_length, &pack);
        }
        READ_BUF.with(|b| {
            let mut sealed = b.borrow_mut();
            let r = self
                .backend
                .read_range_into(FileType::Pack, &pack, off, len, &mut sealed)
                .and_then(|()| self.decode_blob_into(id, &mut sealed, loc.raw_length, &pack, out));
            if sealed.capacity() > MAX_KEPT_READ_BUF {
                *sealed = Vec::new();
            }
            r
        })
    }

    /// Read a tree blob (cached), sanitized: entries whose names could leave the directory or
    /// repeat an earlier name are not in [`Tree::nodes`] but listed in [`Tree::rejected`], for
    /// the caller to report ([`Tree::sanitize`]).
    pub fn load_tree(&self, id: &BlobId) -> Result<Arc<Tree>> {
        if let Some(t) = self.trees.lock().get(id) {
            return Ok(t.clone());
        }
        let raw = self.read_blob(id)?;
        let mut t = Tree::decode(&raw)
            .ok_or_else(|| Error::damaged(format!("tree {}", id.short()), "cannot parse tree"))?;
        t.sanitize();
        let t = Arc::new(t);
        self.trees.lock().put(*id, t.clone());
        Ok(t)
    }

    /// Prepare a blob for a pack: compress (when it helps) and seal it.
    pub fn seal_blob(&self, id: &BlobId, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_blob_into(id, data, &mut out);
        out
    }

    /// [`Store::seal_blob`] into `out` (cleared first), reusing its memory.
    pub fn seal_blob_into(&self, id: &BlobId, data: &[u8], out: &mut Vec<u8>) {
        let level = self.config.compression_level;
        let pre = self.crypto.seal_prefix();
        out.clear();
        out.reserve(pre + 1 + data.len() + self.crypto.overhead());
        out.resize(pre, 0);
        out.push(CODEC_ZSTD);
        // Compressed data is kept only if it saves more than 64 bytes.
        let compressed = level > 0
            && data.len() > 64
            && worth_compressing(data)
            && compress_into(data, level, out, data.len() - 65);
        if !compressed {
            out[pre] = CODEC_RAW;
            out.extend_from_slice(data);
        }
        self.crypto.seal_in_place(&id.0, out);
    }

    /// All snapshots, oldest first. Damaged snapshot files are returned separately.
    pub fn snapshots(&self) -> Result<(Vec<SnapshotEntry>, Vec<Error>)> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        let listed = self.backend.list(FileType::Snapshot)?;
        if let Some(c) = &self.cache {
            c.retain(
                FileType::Snapshot,
                &listed.iter().map(|f| f.name.clone()).collect(),
            );
        }
        for f in listed {
            match self.read_snapshot(&f.name) {
                Ok(s) => out.push(s),
                Err(e) => bad.push(e),
            }
        }
        out.sort_by(|a, b| (a.snap.time, &a.id).cmp(&(b.snap.time, &b.id)));
        Ok((out, bad))
    }

    pub fn read_snapshot(&self, name: &str) -> Result<SnapshotEntry> {
        let file = format!("snapshots/{name}");
        let snap = self.fetch_checked(FileType::Snapshot, name, |b| {
            if self.crypto.file_id(b) != name {
                return Err(Error::damaged(&file, "content does not match its name"));
            }
            open_record(&self.crypto, AAD_SNAPSHOT, b, &file)
        })?;
        Ok(SnapshotEntry {
            id: name.to_string(),
            snap,
        })
    }

    /// Write a snapshot file; returns its id.
    pub fn write_snapshot(&self, snap: &Snapshot) -> Result<String> {
        let b = seal_record(&self.crypto, AAD_SNAPSHOT, snap);
        let id = self.crypto.file_id(&b);
        self.store_file(FileType::Snapshot, &id, &b)?;
        Ok(id)
    }

    /// Find a snapshot by full id, unique prefix, or `latest`.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<SnapshotEntry> {
        let names = self.backend.list(FileType::Snapshot)?;
        if spec == "latest" {
            let (all, _) = self.snapshots()?;
            return all
                .into_iter()
                .last()
                .ok_or_else(|| Error::NoSnapshot(spec.into()));
        }
        let spec_l = spec.to_ascii_lowercase();
        let matches: Vec<_> = names
            .iter()
            .filter(|n| !spec_l.is_empty() && n.name.starts_with(&spec_l))
            .collect();
        match matches.len() {
            0 => Err(Error::NoSnapshot(spec.into())),
            1 => self.read_snapshot(&matches[0].name),
            _ => Err(Error::AmbiguousSnapshot(
                spec.into(),
                matches
                    .iter()
                    .map(|m| m.name.get(..12).unwrap_or(&m.name).to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    /// The node at `path` in a snapshot: absolute paths are taken from the snapshot root,
    /// relative ones from the backed-up directory. `/` gives a synthetic directory node.
    pub fn lookup(&self, snap: &SnapshotEntry, path: &[u8]) -> Result<Node> {
        let full = if path.first() == Some(&b'/') {
            path.to_vec()
        } else {
            super::tree::join(&snap.snap.path, path)
        };
        let mut node = Node::new(b"/".to_vec(), NodeKind::Dir);
        node.mode = 0o755;
        node.subtree = Some(snap.snap.root);
        let show = String::from_utf8_lossy(&full).into_owned();
        for c in components(&full) {
            if c == b".." {
                return Err(Error::NoSuchPath(snap.short().into(), show));
            }
            let sub = match (node.kind, node.subtree) {
                (NodeKind::Dir, Some(s)) => s,
                _ => return Err(Error::NoSuchPath(snap.short().into(), show)),
            };
            let t = self.load_tree(&sub)?;
            node = t
                .find(c)
                .cloned()
                .ok_or_else(|| Error::NoSuchPath(snap.short().into(), show.clone()))?;
        }
        Ok(node)
    }

    /// Total size of the store's files by type.
    pub fn sizes(&self) -> Result<Vec<(FileType, usize, u64)>> {
        let mut out = Vec::new();
        for t in FileType::ALL {
            let l = self.backend.list(t)?;
            out.push((t, l.len(), l.iter().map(|f| f.size).sum()));
        }
        Ok(out)
    }

    /// Take a lock; it is refreshed in the background and released on drop.
    pub fn lock(&self, exclusive: bool, command: &str) -> Result<LockGuard> {
        LockGuard::take(self.backend.clone(), exclusive, command)
    }
}

/// How often a held lock is rewritten, and after how long without refresh it is stale.
const LOCK_REFRESH: Duration = Duration::from_secs(300);
const LOCK_STALE: Duration = Duration::from_secs(1800);

/// A held store lock.
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    /// The current lock file's name (each refresh writes a new file, then removes the old).
    name: Arc<std::sync::Mutex<String>>,
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Removes the lock file if the process is interrupted.
    _job: super::interrupt::Job,
}

/// A lock that a process of this host, now gone (killed, crashed), left behind.
fn left_by_a_dead_process(rec: &LockRecord) -> bool {
    rec.host == super::hostname()
        && rec.pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{}", rec.pid)).exists()
}

fn lock_is_live(rec: &LockRecord) -> bool {
    let age_ns = super::now_ns().saturating_sub(rec.refreshed_ns);
    if age_ns > LOCK_STALE.as_nanos() as i64 {
        return false;
    }
    if rec.host == super::hostname() && rec.pid != std::process::id() {
        // A lock from a process of this host that no longer exists is stale.
        return std::path::Path::new(&format!("/proc/{}", rec.pid)).exists();
    }
    true
}

impl LockGuard {
    fn take(backend: Arc<dyn Backend>, exclusive: bool, command: &str) -> Result<LockGuard> {
        let conflicts = |mine: Option<&str>| -> Result<Option<(String, String)>> {
            for f in backend.list(FileType::Lock)? {
                if Some(f.name.as_str()) == mine {
                    continue;
                }
                let Ok(b) = backend.read(FileType::Lock, &f.name) else {
                    continue;
                };
                let Ok(rec) = unframe::<LockRecord>(MAGIC_LOCK, &b, &f.name) else {
                    continue;
                };
                if left_by_a_dead_process(&rec) {
                    // Nothing else would ever remove it, and every command reads every lock.
                    let _ = backend.remove(FileType::Lock, &f.name);
                    continue;
                }
                if lock_is_live(&rec) && (exclusive || rec.exclusive) {
                    return Ok(Some((
                        format!(
                            "{} (pid {} on {}, {})",
                            rec.command,
                            rec.pid,
                            rec.host,
                            if rec.exclusive { "exclusive" } else { "shared" }
                        ),
                        FileType::Lock.path(&f.name),
                    )));
                }
            }
            Ok(None)
        };
        if let Some((who, file)) = conflicts(None)? {
            return Err(Error::Locked(who, file));
        }
        let name = super::crypto::random_hex(16);
        // The lock file (and one being written by a refresh) is removed if the process is
        // interrupted; registered before it is written, so none is left behind.
        let current = Arc::new(std::sync::Mutex::new(name.clone()));
        let fresh_name: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let job = {
            let (backend, current, fresh_name) =
                (backend.clone(), current.clone(), fresh_name.clone());
            super::interrupt::on_interrupt(move || {
                let fresh = fresh_name.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let cur = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for n in fresh.into_iter().chain([cur]) {
                    let _ = backend.remove(FileType::Lock, &n);
                }
            })
        };
        let now = super::now_ns();
        let rec = LockRecord {
            exclusive,
            host: super::hostname(),
            user: super::username(),
            pid: std::process::id(),
            created_ns: now,
            refreshed_ns: now,
            command: command.to_string(),
        };
        backend.write(FileType::Lock, &name, &frame(MAGIC_LOCK, &rec))?;
        if let Some((who, file)) = conflicts(Some(&name))? {
            let _ = backend.remove(FileType::Lock, &name);
            return Err(Error::Locked(who, file));
        }
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let name = current;
        let thread = {
            let fresh_name = fresh_name.clone();
            let backend = backend.clone();
            let stop = stop.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                let mut rec = rec;
                let (m, cv) = &*stop;
                let mut stopped = m.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    // The flag is checked before waiting: a guard dropped before this thread
                    // first ran must not leave it (and the dropping thread) waiting a period.
                    if *stopped {
                        return;
                    }
                    let (g, _) = cv
                        .wait_timeout(stopped, LOCK_REFRESH)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = g;
                    if *stopped {
                        return;
                    }
                    // A new file, then the old one removed: the lock is never absent, and no
                    // backend has to overwrite a file.
                    rec.refreshed_ns = super::now_ns();
                    let fresh = super::crypto::random_hex(16);
                    *fresh_name.lock().unwrap_or_else(|e| e.into_inner()) = Some(fresh.clone());
                    if backend
                        .write(FileType::Lock, &fresh, &frame(MAGIC_LOCK, &rec))
                        .is_ok()
                    {
                        let mut cur = name.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = backend.remove(FileType::Lock, &cur);
                        *cur = fresh;
                    }
                    *fresh_name.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            })
        };
        Ok(LockGuard {
            backend,
            name,
            stop,
            thread: Some(thread),
            _job: job,
        })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.stop;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let name = self.name.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = self.backend.remove(FileType::Lock, &name);
    }
}

/// Writes new blobs into packs and index files.
///
/// Data and tree blobs go to separate packs. Any thread may add blobs; the thread whose blob
/// fills a pack uploads it, outside the lock, so uploads of several packs overlap.
pub struct Packer<'a> {
    store: &'a Store,
    bufs: [Mutex<PackBuf>; 2],
    /// Ids added in this session (the index only knows uploaded packs).
    seen: Mutex<HashSet<BlobId>>,
    pending_index: Mutex<Vec<IndexPack>>,
    /// Packs no index listed that this session reuses blobs of, and so lists in its index.
    adopted: Mutex<HashSet<String>>,
    pub new_blobs: AtomicU64,
    pub new_bytes: AtomicU64,
}

#[derive(Default)]
struct PackBuf {
    data: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A thread's sealing buffer is kept up to this size (most chunks are smaller; the largest
/// are 8 MiB and would keep that much per thread for good).
const MAX_KEPT_SEAL_BUF: usize = 4 << 20;

/// Packs per index file written during a backup: an interrupted backup loses at most this
/// many packs' worth of index (and the packs stay recoverable from their headers).
const PACKS_PER_INDEX: usize = 32;

impl<'a> Packer<'a> {
    pub fn new(store: &'a Store) -> Self {
        Packer {
            store,
            bufs: [Mutex::default(), Mutex::default()],
            seen: Mutex::new(HashSet::new()),
            pending_index: Mutex::new(Vec::new()),
            adopted: Mutex::new(HashSet::new()),
            new_blobs: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
        }
    }

    /// Does the store already have (or is this session adding) this blob? Marks it as being
    /// added if not, so exactly one caller gets `false` per new blob.
    ///
    /// A blob the store has only in a pack no index file lists (another writer's, uploaded but
    /// not indexed yet, or one killed before its index) is reused too, and that pack is listed
    /// in this session's index ([`Packer::reuse`]): a snapshot is committed only once every
    /// blob it references is in an indexed pack (DESIGN.md, "Safety model").
    pub fn claim(&self, id: &BlobId) -> bool {
        if self.reuse(id) {
            return true;
        }
        !self.seen.lock().insert(*id)
    }

    /// This session references the stored blob `id` (an unchanged file's chunk taken from the
    /// previous snapshot, or a blob [`Packer::claim`] found): if its pack is one no index file
    /// lists, list it in this session's index. Whether the store has the blob.
    pub fn reuse(&self, id: &BlobId) -> bool {
        let idx = self.store.index.read();
        let Some(loc) = idx.get(id) else {
            return false;
        };
        if self.store.has_recovered.load(Ordering::Acquire) {
            let pack = idx.pack_name(loc.pack);
            if !self.adopted.lock().contains(pack) {
                let ip = self.store.recovered.lock().get(pack).cloned();
                if let Some(ip) = ip {
                    self.adopted.lock().insert(ip.pack.clone());
                    self.pending_index.lock().push(ip);
                }
            }
        }
        true
    }

    /// Add a blob whose id the caller has claimed.
    pub fn add(&self, kind: BlobKind, id: BlobId, data: &[u8]) -> Result<()> {
        SEAL_BUF.with(|b| {
            let mut sealed = b.borrow_mut();
            self.store.seal_blob_into(&id, data, &mut sealed);
            let r = self.add_sealed(kind, id, data.len() as u32, &sealed);
            if sealed.capacity() > MAX_KEPT_SEAL_BUF {
                *sealed = Vec::new();
            }
            r
        })
    }

    /// Add an already sealed blob.
    pub fn add_sealed(
        &self,
        kind: BlobKind,
        id: BlobId,
        raw_len: u32,
        sealed: &[u8],
    ) -> Result<()> {
        self.new_blobs.fetch_add(1, Ordering::Relaxed);
        self.new_bytes
            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
        let full = {
            let mut b = self.bufs[kind as usize].lock();
            if b.data.capacity() == 0 {
                // One allocation per pack: growing by doubling would leave a 32 MiB buffer
                // behind for 16 MiB of data.
                b.data
                    .reserve_exact(self.store.config.pack_size as usize + (1 << 20));
            }
            let offset = b.data.len() as u32;
            b.data.extend_from_slice(sealed);
            b.entries.push(PackEntry {
                id,
                offset,
                length: sealed.len() as u32,
                raw_length: raw_len,
            });
            if b.data.len() >= self.store.config.pack_size as usize {
                Some(std::mem::take(&mut *b))
            } else {
                None
            }
        };
        match full {
            Some(b) => self.upload(kind, b),
            None => Ok(()),
        }
    }

    fn upload(&self, kind: BlobKind, mut b: PackBuf) -> Result<()> {
        if b.entries.is_empty() {
            return Ok(());
        }
        let header = PackHeader {
            kind,
            entries: b.entries.clone(),
        };
        let h = seal_record(&self.store.crypto, AAD_PACK_HEADER, &header);
        b.data.extend_from_slice(&h);
        b.data.extend_from_slice(&(h.len() as u32).to_le_bytes());
        let name = self.store.crypto.file_id(&b.data);
        if kind == BlobKind::Tree {
            self.store.store_file(FileType::Pack, &name, &b.data)?;
        } else {
            self.store.backend.write(FileType::Pack, &name, &b.data)?;
        }
        let ip = IndexPack {
            pack: name,
            kind,
            entries: b.entries,
        };
        self.store.index.write().add_pack(&ip);
        let batch = {
            let mut p = self.pending_index.lock();
            p.push(ip);
            if p.len() >= PACKS_PER_INDEX {
                Some(std::mem::take(&mut *p))
            } else {
                None
            }
        };
        if let Some(batch) = batch {
            self.write_index(batch)?;
        }
        Ok(())
    }

    fn write_index(&self, packs: Vec<IndexPack>) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        let f = seal_record(&self.store.crypto, AAD_INDEX, &IndexFile { packs });
        let name = self.store.crypto.file_id(&f);
        self.store.store_file(FileType::Index, &name, &f)
    }

    /// Upload the partly filled packs and the remaining index entries.
    pub fn finish(&self) -> Result<()> {
        for kind in [BlobKind::Data, BlobKind::Tree] {
            let b = std::mem::take(&mut *self.bufs[kind as usize].lock());
            self.upload(kind, b)?;
        }
        let rest = std::mem::take(&mut *self.pending_index.lock());
        self.write_index(rest)
    }
}

/// Convenience for engine tests and small tools: a plaintext or encrypted store in memory.
pub fn open_or_create_mem(encrypted: bool) -> Store {
    let b: Arc<dyn Backend> = Arc::new(super::backend::MemBackend::new());
    let opts = CreateOptions {
        encrypted,
        compression: true,
        kdf: KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        },
    };
    Store::create(b, &opts, &|_| Ok(b"test".to_vec())).expect("in-memory store")
}

pub use format::Snapshot as SnapshotRecord;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ErrorKind;
    use crate::store::backend::MemBackend;

    fn opts(encrypted: bool) -> CreateOptions {
        CreateOptions {
            encrypted,
            compression: true,
            kdf: KdfParams {
                m_kib: 64,
                t: 1,
                p: 1,
            },
        }
    }

    /// Replace the store's config with an edited one, framed as a valid file (as someone with
    /// write access to the store could).
    fn rewrite_config(mem: &MemBackend, edit: impl FnOnce(&mut Config)) {
        let mut cfg: Config = unframe(
            MAGIC_CONFIG,
            &mem.read(FileType::Config, "config").unwrap(),
            "config",
        )
        .unwrap();
        edit(&mut cfg);
        mem.tamper(FileType::Config, "config", |b| {
            *b = frame(MAGIC_CONFIG, &cfg)
        });
    }

    #[test]
    fn a_swapped_plaintext_config_is_refused() {
        let mem = Arc::new(MemBackend::new());
        Store::create(mem.clone(), &opts(true), &|_| Ok(b"pw".to_vec())).unwrap();
        // An attacker writes a plaintext config with keys of their own.
        let evil = MasterKeys::random();
        rewrite_config(&mem, |cfg| {
            cfg.encrypted = false;
            cfg.plain_keys = Some(evil.clone());
            cfg.auth = cfg.compute_auth(&evil.id);
        });
        let e = Store::open(mem.clone(), &|_| Ok(b"pw".to_vec()))
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
    }

    #[test]
    fn an_edited_config_is_refused() {
        let mem = Arc::new(MemBackend::new());
        Store::create(mem.clone(), &opts(true), &|_| Ok(b"pw".to_vec())).unwrap();
        rewrite_config(&mem, |cfg| cfg.pack_size = 1);
        let e = Store::open(mem.clone(), &|_| Ok(b"pw".to_vec()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("authentication"), "{e}");
    }

    #[test]
    fn an_interrupted_create_can_be_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        let b: Arc<dyn Backend> = Arc::new(super::super::LocalBackend::new(&root));
        // What a create interrupted before the config leaves.
        b.init().unwrap();
        b.write(FileType::Key, "deadbeef", b"half a key file")
            .unwrap();
        Store::create(b.clone(), &opts(true), &|_| Ok(b"pw".to_vec())).unwrap();
        Store::open(b.clone(), &|_| Ok(b"pw".to_vec())).unwrap();
        // But never over someone's files.
        let other = dir.path().join("o");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("precious"), b"x").unwrap();
        let b: Arc<dyn Backend> = Arc::new(super::super::LocalBackend::new(&other));
        let e = Store::create(b, &opts(false), &|_| Ok(Vec::new()))
            .err()
            .unwrap();
        assert!(matches!(e, Error::NotEmpty(_)), "{e}");
    }

    #[test]
    fn locks_conflict_and_stale_locks_are_ignored() {
        let mem = Arc::new(MemBackend::new());
        let store = Store::create(mem.clone(), &opts(false), &|_| Ok(Vec::new())).unwrap();
        let rec = |pid: u32, exclusive: bool| LockRecord {
            exclusive,
            host: super::super::hostname(),
            user: "u".into(),
            pid,
            created_ns: super::super::now_ns(),
            refreshed_ns: super::super::now_ns(),
            command: "prune".into(),
        };
        // Shared locks coexist and are removed when released.
        let a = store.lock(false, "backup").unwrap();
        let b = store.lock(false, "backup").unwrap();
        assert_eq!(mem.list(FileType::Lock).unwrap().len(), 2);
        drop((a, b));
        assert!(mem.list(FileType::Lock).unwrap().is_empty());
        // A live exclusive lock (pid 1 exists) blocks; the error names its file.
        mem.write(FileType::Lock, "x", &frame(MAGIC_LOCK, &rec(1, true)))
            .unwrap();
        let e = store.lock(false, "backup").err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(e.to_string().contains("locks/x"), "{e}");
        mem.remove(FileType::Lock, "x").unwrap();
        // A lock of a dead process on this host is stale.
        mem.write(
            FileType::Lock,
            "y",
            &frame(MAGIC_LOCK, &rec(u32::MAX - 7, true)),
        )
        .unwrap();
        store.lock(false, "backup").unwrap();
    }
}
