//! An open store: config, keys, the loaded index, blob reads and seals, snapshots.
//!
//! [`Store`] is what every pipeline (backup, restore, check, mount, sync) works against. It
//! reads blobs through the index (`blob id → pack, offset, length`) with ranged reads, and
//! writes new blobs through a [`Packer`] that fills pack files of about `pack_size` bytes, one
//! for data and one for trees, uploads each when full, and writes an index file for every few
//! dozen packs, so an interrupted backup leaves packs that a re-run finds and reuses.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use super::backend::Listed;
use super::backend::{Backend, FileType};
use super::cache::Cache;
use super::crypto::{BlobId, Crypto, KdfParams, KeyFile, MasterKeys};
use super::early::{self, EarlyKeys};
use super::error::{Error, Result};
use super::format::{self, *};
use super::tree::{Node, NodeKind, Tree, components};

pub use super::index::{Index, Loc};
pub use super::lock::LockGuard;
pub use super::packer::Packer;

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

/// Decoded trees kept at most, and entries in all of them at most: by count alone, a thousand
/// directories of a thousand files would all be held.
const TREE_CACHE_TREES: usize = 4096;
const TREE_CACHE_ENTRIES: usize = 65_536;

/// The most recently used decoded trees, bounded by their number and their entries.
struct TreeCache {
    lru: LruCache<BlobId, Arc<Tree>>,
    entries: usize,
}

impl Default for TreeCache {
    fn default() -> Self {
        TreeCache {
            lru: LruCache::new(NonZeroUsize::new(TREE_CACHE_TREES).expect("non-zero")),
            entries: 0,
        }
    }
}

impl TreeCache {
    fn get(&mut self, id: &BlobId) -> Option<Arc<Tree>> {
        self.lru.get(id).cloned()
    }

    /// Keep `t` (a tree wider than the whole budget is not kept).
    fn put(&mut self, id: BlobId, t: Arc<Tree>) {
        let n = t.nodes.len() + 1;
        if n > TREE_CACHE_ENTRIES {
            return;
        }
        // `push` returns the tree it replaced or, at capacity, the one it evicted.
        if let Some((_, old)) = self.lru.push(id, t) {
            self.entries -= old.nodes.len() + 1;
        }
        self.entries += n;
        while self.entries > TREE_CACHE_ENTRIES {
            match self.lru.pop_lru() {
                Some((_, old)) => self.entries -= old.nodes.len() + 1,
                None => break,
            }
        }
    }
}

pub struct Store {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) config: Config,
    pub(super) crypto: Crypto,
    pub(super) index: RwLock<Index>,
    trees: Mutex<TreeCache>,
    index_report: Mutex<IndexLoadReport>,
    /// Packs no index file lists, as read from their headers when the index was loaded (an
    /// interrupted backup's, or another writer's not indexed yet), by name. A writer that
    /// reuses a blob of one lists the pack in its own index ([`Packer::claim`]).
    pub(super) recovered: Mutex<HashMap<String, IndexPack>>,
    /// `recovered` is not empty (checked without a lock on every reused blob).
    pub(super) has_recovered: AtomicBool,
    /// Local copies of index files, snapshots and tree packs (remote stores only).
    cache: Option<Cache>,
    /// The `condemned/` files read when the index was last loaded, by name.
    marks: Mutex<Vec<String>>,
    /// The `index/` files listed when the index was last loaded, by name, sorted.
    index_names: Mutex<Vec<String>>,
    /// `snapshots/` as listed with the index's directories when the store was opened, for the
    /// first look at the snapshots (taken once: later looks list again).
    listed_snapshots: Mutex<Option<Vec<Listed>>>,
    /// The lock this process holds on the store, if any ([`Store::lock`]).
    lease: Mutex<Option<Arc<super::lock::Lease>>>,
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
    /// Each `condemned/` file's bytes.
    condemned: Vec<(Listed, Fetched)>,
    packs: Vec<Listed>,
}

impl IndexFiles {
    fn read(backend: &dyn Backend, cache: Option<&Cache>) -> Result<IndexFiles> {
        let mut l = backend
            .list_several(&[FileType::Index, FileType::Condemned, FileType::Pack])
            .into_iter();
        let mut next = || {
            l.next()
                .unwrap_or_else(|| Err(Error::Other("a listing went missing".into())))
        };
        let (index, marks, packs) = (next()?, next()?, next()?);
        IndexFiles::fetch(backend, cache, index, marks, packs)
    }

    /// [`IndexFiles::read`] from the listings of `index/`, `condemned/` and `packs/`.
    fn fetch(
        backend: &dyn Backend,
        cache: Option<&Cache>,
        listed: Vec<Listed>,
        marks: Vec<Listed>,
        packs: Vec<Listed>,
    ) -> Result<IndexFiles> {
        let _t = crate::trace::span("read index files");
        if let Some(c) = cache {
            c.retain(
                FileType::Index,
                &listed.iter().map(|f| f.name.clone()).collect(),
            );
        }
        let fetch_all = |t: FileType, listed: Vec<Listed>| -> Vec<(Listed, Fetched)> {
            listed
                .into_iter()
                .map(|f| {
                    let b = fetch_via(backend, cache, t, &f.name);
                    (f, b)
                })
                .collect()
        };
        let index = fetch_all(FileType::Index, listed);
        if let Some(c) = cache {
            c.retain(
                FileType::Condemned,
                &marks.iter().map(|f| f.name.clone()).collect(),
            );
        }
        let condemned = fetch_all(FileType::Condemned, marks);
        if let Some(c) = cache {
            // Packs deleted by maintenance leave the local cache.
            c.retain(
                FileType::Pack,
                &packs.iter().map(|f| f.name.clone()).collect(),
            );
        }
        Ok(IndexFiles {
            index,
            condemned,
            packs,
        })
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

/// Open a `condemned/` file (checked against its name).
pub(super) fn open_condemned(crypto: &Crypto, b: &[u8], name: &str) -> Result<CondemnedFile> {
    let file = FileType::Condemned.path(name);
    if crypto.file_id(b) != name {
        return Err(Error::damaged(&file, "content does not match its name"));
    }
    open_record(crypto, AAD_CONDEMNED, b, &file)
}

/// The store's config, and its bytes as stored.
fn read_config_bytes(backend: &dyn Backend) -> Result<(Config, Vec<u8>)> {
    match backend.read(FileType::Config, "config") {
        Ok(b) => Ok((unframe(MAGIC_CONFIG, &b, "config")?, b)),
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
            trees: Mutex::new(TreeCache::default()),
            index_report: Mutex::new(IndexLoadReport::default()),
            recovered: Mutex::new(HashMap::new()),
            has_recovered: AtomicBool::new(false),
            marks: Mutex::new(Vec::new()),
            index_names: Mutex::new(Vec::new()),
            listed_snapshots: Mutex::new(None),
            lease: Mutex::new(None),
        }
    }

    /// Open an existing store and load its index. The index files are listed and read (from
    /// the local cache for remote stores) while Argon2id derives the key on another thread.
    pub fn open(backend: Arc<dyn Backend>, passphrase: PassphraseFn) -> Result<Store> {
        Store::open_with(backend, passphrase, true, None)
    }

    /// [`Store::open`] with a key derivation started before the login ([`EarlyKeys`]), used if
    /// the store still serves what it was started from.
    pub fn open_early(
        backend: Arc<dyn Backend>,
        passphrase: PassphraseFn,
        early: Option<EarlyKeys>,
    ) -> Result<Store> {
        Store::open_with(backend, passphrase, true, early)
    }

    /// Open an existing store without loading the index.
    pub fn open_no_index(backend: Arc<dyn Backend>, passphrase: PassphraseFn) -> Result<Store> {
        Store::open_with(backend, passphrase, false, None)
    }

    fn open_with(
        backend: Arc<dyn Backend>,
        passphrase: PassphraseFn,
        with_index: bool,
        early: Option<EarlyKeys>,
    ) -> Result<Store> {
        let t = crate::trace::span("open store (config, keys)");
        // The key files and the index's directories listed all at once, and (for a remote
        // store) while the config is read: their round trips overlap. The index files are
        // fetched while the key is derived.
        let list = || {
            if with_index {
                backend.list_several(&[
                    FileType::Key,
                    FileType::Index,
                    FileType::Condemned,
                    FileType::Pack,
                    FileType::Snapshot,
                ])
            } else {
                vec![backend.list(FileType::Key)]
            }
        };
        let (config, listed) = if backend.is_remote() {
            std::thread::scope(|s| {
                let listing = s.spawn(list);
                let config = read_config_bytes(backend.as_ref());
                let listed = listing
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                (config, listed)
            })
        } else {
            let config = read_config_bytes(backend.as_ref());
            let listed = if config.is_ok() { list() } else { Vec::new() };
            (config, listed)
        };
        let (config, config_bytes) = config?;
        let cache = cache_for(backend.as_ref(), &config);
        let mut listed = listed.into_iter();
        let mut key_files = listed.next();
        let mut index_listed = with_index.then(|| listed.by_ref().take(3).collect::<Vec<_>>());
        let snapshots_listed = listed.next().and_then(|r| r.ok());
        let mut read_files = || {
            with_index.then(|| {
                match index_listed
                    .take()
                    .map(<[Result<Vec<Listed>>; 3]>::try_from)
                {
                    Some(Ok([index, marks, packs])) => {
                        IndexFiles::fetch(backend.as_ref(), cache.as_ref(), index?, marks?, packs?)
                    }
                    _ => IndexFiles::read(backend.as_ref(), cache.as_ref()),
                }
            })
        };
        let mut index_files = None;
        let keys = match &config.plain_keys {
            Some(k) if !config.encrypted => k.clone(),
            _ => {
                let files = match key_files.take() {
                    Some(f) => f?,
                    None => backend.list(FileType::Key)?,
                };
                if files.is_empty() {
                    return Err(Error::damaged("keys/", "the store has no key file"));
                }
                // The key derived during the login, from the key file that opened this
                // store last time, if the store still serves the same config and that key.
                let mut tried = None;
                let mut ahead = None;
                match early {
                    Some(e) if e.still_valid(&config_bytes, &files) => {
                        tried = Some(e.key_name().to_string());
                        index_files = read_files();
                        ahead = e.join();
                        if ahead.is_some() {
                            crate::trace::note(|| "keys: derived during the login".into());
                        }
                    }
                    // Stale: its Argon2id ends before another starts (one 64 MiB at a time).
                    Some(e) => drop(e.join()),
                    None => {}
                }
                match ahead {
                    Some(k) => k,
                    None => Store::derive_keys(
                        backend.as_ref(),
                        &config,
                        &config_bytes,
                        &files,
                        tried.as_deref(),
                        passphrase,
                        || {
                            if index_files.is_none() {
                                index_files = read_files();
                            }
                        },
                    )?,
                }
            }
        };
        let mut keys_there = || -> Result<bool> {
            Ok(match key_files.take() {
                Some(Ok(files)) => !files.is_empty(),
                _ => !backend.list(FileType::Key)?.is_empty(),
            })
        };
        if !config.encrypted && keys_there()? {
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
        *store.listed_snapshots.lock() = snapshots_listed;
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

    /// Read the key files `files` (all but `tried`, already tried) and find the one that
    /// opens with the passphrase, deriving on another thread while `meanwhile` runs; a remote
    /// store's config and that key file are remembered for the next command ([`early`]).
    fn derive_keys(
        backend: &dyn Backend,
        config: &Config,
        config_bytes: &[u8],
        files: &[Listed],
        tried: Option<&str>,
        passphrase: PassphraseFn,
        meanwhile: impl FnOnce(),
    ) -> Result<MasterKeys> {
        let mut parsed = Vec::new();
        let mut damaged = Vec::new();
        for f in files.iter().filter(|f| Some(f.name.as_str()) != tried) {
            match backend
                .read(FileType::Key, &f.name)
                .and_then(|b| parse_key_file(&b, &f.name).map(|k| (k, b)))
            {
                Ok((k, b)) => parsed.push((k, &f.name, b)),
                Err(e) => damaged.push(e),
            }
        }
        if parsed.is_empty() && tried.is_none() {
            return Err(damaged.remove(0));
        }
        let pass = passphrase(false)?;
        // Argon2id is CPU only: the index files come over the connection meanwhile.
        let found = std::thread::scope(|s| {
            let derive = s.spawn(|| {
                let _t = crate::trace::span("key derivation");
                for (k, name, bytes) in &parsed {
                    if let Some(keys) = k.unwrap(&pass, &config.id)? {
                        return Ok(Some((keys, *name, bytes)));
                    }
                }
                Ok::<_, Error>(None)
            });
            meanwhile();
            derive
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })?;
        match found {
            Some((keys, name, bytes)) => {
                if backend.is_remote() && config.compute_auth(&keys.id) == config.auth {
                    early::remember(&backend.location(), config_bytes, name, bytes);
                }
                Ok(keys)
            }
            None => Err(Error::WrongPassphrase(files.len())),
        }
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
        let mut index_names: Vec<String> =
            files.index.iter().map(|(f, _)| f.name.clone()).collect();
        index_names.sort();
        let mut report = IndexLoadReport::default();
        let mut marks = Vec::with_capacity(files.condemned.len());
        let mut mark_names = Vec::with_capacity(files.condemned.len());
        for (f, bytes) in files.condemned {
            let file = FileType::Condemned.path(&f.name);
            let res = bytes.and_then(|(b, cached)| {
                self.accept(FileType::Condemned, &f.name, b, cached, |b| {
                    open_condemned(&self.crypto, b, &f.name)
                })
            });
            match res {
                Ok(m) => {
                    mark_names.push(f.name);
                    marks.push(m);
                }
                Err(e) if e.kind() == super::error::ErrorKind::Unreachable => return Err(e),
                Err(e) => report.damaged_index_files.push((file, e.to_string())),
            }
        }
        // A pack a `condemned/` file names is condemned, whatever index file still lists it
        // (maintenance removes those after writing the mark): its blobs are added after all
        // others, so a copy elsewhere is the one read.
        let condemned: HashSet<&str> = marks
            .iter()
            .flat_map(|m| &m.packs)
            .map(|p| p.index.pack.as_str())
            .collect();
        let t_open = crate::trace::span("open index files");
        let open_one = |(f, bytes): (Listed, Fetched)| {
            let file = format!("index/{}", f.name);
            let res = bytes.and_then(|(b, cached)| {
                self.accept(FileType::Index, &f.name, b, cached, |b| {
                    if self.crypto.file_id(b) != f.name {
                        return Err(Error::damaged(&file, "content does not match its name"));
                    }
                    open_record::<IndexFile>(&self.crypto, AAD_INDEX, b, &file)
                })
            });
            (file, res)
        };
        // Authenticating, decompressing and decoding the files is CPU work, one file at a
        // time: spread over the cores, in slices so that the order (which copy of a blob is
        // first) stays the files' order.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4)
            .min(files.index.len().max(1));
        let mut slices: Vec<Vec<(Listed, Fetched)>> = Vec::with_capacity(threads);
        let mut rest = files.index;
        let per = rest.len().div_ceil(threads);
        while rest.len() > per {
            let tail = rest.split_off(per);
            slices.push(rest);
            rest = tail;
        }
        slices.push(rest);
        let results: Vec<Vec<(String, Result<IndexFile>)>> = std::thread::scope(|s| {
            let open_one = &open_one;
            let handles: Vec<_> = slices
                .into_iter()
                .map(|slice| s.spawn(move || slice.into_iter().map(open_one).collect()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut opened = Vec::with_capacity(results.iter().map(Vec::len).sum());
        for (file, res) in results.into_iter().flatten() {
            match res {
                Ok(i) => opened.push(i),
                // Not read because the server is gone: no verdict on the file, and no index
                // without it.
                Err(e) if e.kind() == super::error::ErrorKind::Unreachable => return Err(e),
                Err(e) => report.damaged_index_files.push((file, e.to_string())),
            }
        }
        drop(t_open);
        let t_add = crate::trace::span("add index entries");
        let live = opened
            .iter()
            .flat_map(|i| &i.packs)
            .filter(|p| !condemned.contains(p.pack.as_str()));
        let hint = live.clone().map(|p| p.entries.len()).sum::<usize>()
            + marks
                .iter()
                .flat_map(|m| &m.packs)
                .map(|p| p.index.entries.len())
                .sum::<usize>();
        let mut idx = Index::from_packs(
            live,
            marks.iter().flat_map(|m| &m.packs).map(|p| &p.index),
            hint,
        );
        drop(opened);
        drop(t_add);
        drop(condemned);
        drop(marks);
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
        *self.marks.lock() = mark_names;
        *self.index_names.lock() = index_names;
        Ok(())
    }

    /// Take a shared lock for a writer (`backup`, `sync`), then load the index again if
    /// maintenance changed the store since it was loaded: condemned packs (`condemned/`
    /// changed), or deleted them (`index/` rewritten; `maintenance -now` leaves `condemned/`
    /// as it found it), or deleted a pack no index listed whose blobs were taken from its
    /// header. Once the lock is live, maintenance deletes nothing this writer could reuse
    /// without that being visible here. The listings are made at once, with the lock's own
    /// check of `locks/` (one round over a network).
    pub fn lock_for_writing(&self, command: &str) -> Result<LockGuard> {
        let (types, recovered) = self.refresh_listings();
        let (g, listings) = LockGuard::take_listing(self.backend.clone(), false, command, &types)?;
        *self.lease.lock() = Some(g.lease());
        self.refresh_from(listings, &recovered)?;
        Ok(g)
    }

    /// [`Store::lock_for_writing`] with the lock file written while the store was opened
    /// ([`write_early_lock`]): only its check is left (with the same listings, one round).
    /// Without one, or if its write failed, the lock is taken as usual (which reports why).
    pub fn lock_for_writing_early(
        &self,
        early: Option<Result<LockGuard>>,
        command: &str,
    ) -> Result<LockGuard> {
        let Some(Ok(g)) = early else {
            return self.lock_for_writing(command);
        };
        let (types, recovered) = self.refresh_listings();
        let (g, listings) = g.confirm(&types)?;
        *self.lease.lock() = Some(g.lease());
        self.refresh_from(listings, &recovered)?;
        Ok(g)
    }

    /// What [`Store::lock_for_writing`] lists, and the packs known only from their headers.
    fn refresh_listings(&self) -> (Vec<FileType>, Vec<String>) {
        let recovered: Vec<String> = if self.has_recovered.load(Ordering::Acquire) {
            self.recovered.lock().keys().cloned().collect()
        } else {
            Vec::new()
        };
        let mut types = vec![FileType::Condemned, FileType::Index];
        if !recovered.is_empty() {
            types.push(FileType::Pack);
        }
        (types, recovered)
    }

    fn refresh_from(&self, lists: Vec<Result<Vec<Listed>>>, recovered: &[String]) -> Result<()> {
        let mut listings = Vec::with_capacity(lists.len());
        for l in lists {
            let mut names: Vec<String> = l?.into_iter().map(|f| f.name).collect();
            names.sort();
            listings.push(names);
        }
        let (Some(marks), Some(index)) = (listings.first(), listings.get(1)) else {
            return Err(Error::Other("a listing went missing".into()));
        };
        let mut known_marks = self.marks.lock().clone();
        known_marks.sort();
        let packs_gone = listings
            .get(2)
            .is_some_and(|packs| recovered.iter().any(|p| packs.binary_search(p).is_err()));
        if *marks != known_marks || *index != *self.index_names.lock() || packs_gone {
            self.load_index()?;
        }
        Ok(())
    }

    /// Before a snapshot is committed: are the packs it depends on (`deps`,
    /// [`Packer::dependencies`]) still there and not condemned? Maintenance deletes a pack only
    /// when it was condemned before every live lock was taken, so this only looks when a
    /// maintenance ran meanwhile (the `condemned/` files changed) or when this process's lock
    /// lapsed (it was suspended past the lock timeout, and maintenance may have taken it for
    /// dead); the lock is renewed first. The packs that fail, by name.
    pub fn verify_dependencies(&self, deps: &[String]) -> Result<Vec<String>> {
        let lease = self.lease.lock().clone();
        let lapsed = lease.as_ref().is_some_and(|l| l.check_lapsed());
        if let Some(l) = lease.filter(|_| lapsed) {
            l.refresh()?;
        }
        let listed = self.backend.list(FileType::Condemned)?;
        let known: HashSet<String> = self.marks.lock().iter().cloned().collect();
        let mut condemned = HashSet::new();
        let mut changed = listed.len() != known.len();
        for f in listed.iter().filter(|f| !known.contains(&f.name)) {
            changed = true;
            let m = self.fetch_checked(FileType::Condemned, &f.name, |b| {
                open_condemned(&self.crypto, b, &f.name)
            })?;
            condemned.extend(m.packs.into_iter().map(|p| p.index.pack));
        }
        let mut bad: Vec<String> = deps
            .iter()
            .filter(|d| condemned.contains(*d))
            .cloned()
            .collect();
        if lapsed || changed {
            let present: HashSet<String> = self
                .backend
                .list(FileType::Pack)?
                .into_iter()
                .map(|f| f.name)
                .collect();
            bad.extend(deps.iter().filter(|d| !present.contains(*d)).cloned());
        }
        bad.sort();
        bad.dedup();
        Ok(bad)
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
    pub(super) fn store_file(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
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
            return Ok(t);
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

    /// The snapshot files: the listing made when the store was opened if nothing has looked
    /// at it yet, else a new one.
    fn list_snapshots(&self) -> Result<Vec<Listed>> {
        match self.listed_snapshots.lock().take() {
            Some(l) => Ok(l),
            None => self.backend.list(FileType::Snapshot),
        }
    }

    /// [`Store::snapshots`] from a listing made now, not the one made when the store was
    /// opened (for maintenance, which lists the index after it).
    pub fn snapshots_listed_now(&self) -> Result<(Vec<SnapshotEntry>, Vec<Error>)> {
        *self.listed_snapshots.lock() = None;
        self.snapshots()
    }

    /// All snapshots, oldest first. Damaged snapshot files are returned separately.
    pub fn snapshots(&self) -> Result<(Vec<SnapshotEntry>, Vec<Error>)> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        let listed = self.list_snapshots()?;
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
        // The listing made at open no longer tells every snapshot.
        *self.listed_snapshots.lock() = None;
        self.store_file(FileType::Snapshot, &id, &b)?;
        Ok(id)
    }

    /// [`Store::write_snapshot`] only if `check` says so (run while the snapshot is sent:
    /// over a network their round trips overlap): its id, or `None` and nothing written.
    pub fn write_snapshot_if(
        &self,
        snap: &Snapshot,
        check: &mut (dyn FnMut() -> Result<bool> + Send),
    ) -> Result<Option<String>> {
        let b = seal_record(&self.crypto, AAD_SNAPSHOT, snap);
        let id = self.crypto.file_id(&b);
        if !self.backend.write_if(FileType::Snapshot, &id, &b, check)? {
            return Ok(None);
        }
        // The listing made at open no longer tells every snapshot.
        *self.listed_snapshots.lock() = None;
        if let Some(c) = &self.cache {
            c.put(FileType::Snapshot, &id, &b);
        }
        Ok(Some(id))
    }

    /// Find a snapshot by full id, unique prefix, or `latest`.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<SnapshotEntry> {
        let names = self.list_snapshots()?;
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

    /// Replace the in-memory index (maintenance loads its own, of tree packs only).
    pub(super) fn set_index(&self, idx: Index) {
        *self.index.write() = idx;
        self.has_recovered.store(false, Ordering::Release);
        self.recovered.lock().clear();
    }

    /// Read and open an index file (through the local cache).
    pub(super) fn read_index_file(&self, name: &str) -> Result<IndexFile> {
        let file = FileType::Index.path(name);
        self.fetch_checked(FileType::Index, name, |b| {
            if self.crypto.file_id(b) != name {
                return Err(Error::damaged(&file, "content does not match its name"));
            }
            open_record::<IndexFile>(&self.crypto, AAD_INDEX, b, &file)
        })
    }

    /// Read and open a `condemned/` file (through the local cache).
    pub(super) fn read_condemned_file(&self, name: &str) -> Result<CondemnedFile> {
        self.fetch_checked(FileType::Condemned, name, |b| {
            open_condemned(&self.crypto, b, name)
        })
    }

    /// Write a sealed record as an immutable file named by its hash; its name and size.
    pub(super) fn write_record<T: serde::Serialize>(
        &self,
        t: FileType,
        aad: &[u8],
        rec: &T,
    ) -> Result<(String, u64)> {
        let b = seal_record(&self.crypto, aad, rec);
        let name = self.crypto.file_id(&b);
        self.store_file(t, &name, &b)?;
        Ok((name, b.len() as u64))
    }

    /// Remove a file from the store and from the local cache.
    pub(super) fn remove_file(&self, t: FileType, name: &str) -> Result<()> {
        self.backend.remove(t, name)?;
        if let Some(c) = &self.cache {
            c.remove(t, name);
        }
        Ok(())
    }

    /// Is blob `id` in the store, in a pack a writer may reuse (not condemned)?
    pub fn reusable(&self, id: &BlobId) -> bool {
        let idx = self.index.read();
        idx.get(id).is_some_and(|l| !idx.is_condemned(l.pack))
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
        let g = LockGuard::take(self.backend.clone(), exclusive, command)?;
        *self.lease.lock() = Some(g.lease());
        Ok(g)
    }

    /// [`Store::lock`] (shared) with the lock file written while the store was opened
    /// ([`write_early_lock`]): only its check is left. Without one, or if its write failed,
    /// the lock is taken as usual.
    pub fn lock_early(&self, early: Option<Result<LockGuard>>, command: &str) -> Result<LockGuard> {
        let Some(Ok(g)) = early else {
            return self.lock(false, command);
        };
        let (g, _) = g.confirm(&[])?;
        *self.lease.lock() = Some(g.lease());
        Ok(g)
    }
}

/// Write a writer's shared lock file for `command` on `backend` while its store is opened
/// (the round trips of both overlap), making no directory: the store may not be there. Then
/// [`Store::lock_for_writing_early`]; dropped, the file is removed.
pub fn write_early_lock(backend: Arc<dyn Backend>, command: &str) -> Result<LockGuard> {
    LockGuard::write(backend, false, command, false)
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

    /// The snapshots listed when the store was opened serve the first look only, and never
    /// hide a snapshot written or removed since.
    #[test]
    fn the_snapshot_listing_made_at_open_is_used_once_and_never_stale() {
        let mem = Arc::new(MemBackend::new());
        let pass = |_: bool| Ok(b"pw".to_vec());
        let s = Store::create(mem.clone(), &opts(true), &pass).unwrap();
        let snap = |n: i64| Snapshot {
            time: crate::store::tree::Time { sec: n, nsec: 0 },
            host: "h".into(),
            user: "u".into(),
            source: "/src".into(),
            path: b"/src".to_vec(),
            tags: Vec::new(),
            root: BlobId([0; 32]),
            parent: None,
            stats: format::SnapshotStats::default(),
            errors: Vec::new(),
            duration_ms: 0,
        };
        s.write_snapshot(&snap(1)).unwrap();
        let s = Store::open(mem.clone(), &pass).unwrap();
        assert!(s.listed_snapshots.lock().is_some(), "listed at open");
        // Written after the open: seen.
        s.write_snapshot(&snap(2)).unwrap();
        assert_eq!(s.snapshots().unwrap().0.len(), 2);
        // Removed behind its back after the first look: the next look lists again.
        let s = Store::open(mem.clone(), &pass).unwrap();
        assert_eq!(s.snapshots().unwrap().0.len(), 2);
        let first = mem.list(FileType::Snapshot).unwrap()[0].name.clone();
        mem.remove(FileType::Snapshot, &first).unwrap();
        assert_eq!(s.snapshots().unwrap().0.len(), 1);
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
