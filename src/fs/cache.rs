//! The shared chunk cache of a mount: decrypted chunks, bounded in bytes, with in-flight
//! deduplication and prefetching.
//!
//! Every read of a mounted file goes through [`ChunkCache::get`]. A chunk in the LRU is a
//! memory copy; a chunk being fetched by another thread (a reader or the prefetcher) is waited
//! for instead of fetched twice. A miss on a small blob reads a whole contiguous range of its
//! pack (up to [`PACK_RANGE`]) and caches every small blob in it: a directory's small files sit
//! together in a pack because backup packs them in walk order, so `tar` or `cp -r` of a
//! directory costs a few range reads instead of one round trip per file. [`ChunkCache::prefetch`]
//! queues chunks for a small pool of threads, which sequential readers use to fetch ahead.

use std::collections::HashMap;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Condvar, Mutex};

use crate::store::Store;
use crate::store::backend::FileType;
use crate::store::crypto::BlobId;

/// A decrypted chunk.
pub type Chunk = Arc<Vec<u8>>;

/// Largest pack range read at once for small blobs.
pub const PACK_RANGE: u64 = 4 << 20;
/// Blobs at most this large are grouped into pack-range reads.
const SMALL_BLOB: u32 = 256 << 10;

#[derive(Default)]
struct Inflight {
    done: Mutex<Option<Result<Chunk, String>>>,
    cv: Condvar,
}

struct Lru {
    map: LruCache<BlobId, Chunk>,
    bytes: usize,
}

pub struct ChunkCache {
    store: Arc<Store>,
    lru: Mutex<Lru>,
    max_bytes: usize,
    inflight: Mutex<HashMap<BlobId, Arc<Inflight>>>,
    /// Blobs of each pack sorted by offset: (offset, sealed length, raw length, id).
    by_pack: HashMap<u32, Vec<(u32, u32, u32, BlobId)>>,
    prefetch_tx: crossbeam_channel::Sender<BlobId>,
    prefetch_rx: crossbeam_channel::Receiver<BlobId>,
}

impl ChunkCache {
    pub fn new(store: Arc<Store>, max_bytes: usize) -> Arc<ChunkCache> {
        let mut by_pack: HashMap<u32, Vec<(u32, u32, u32, BlobId)>> = HashMap::new();
        {
            let idx = store.index();
            for (id, loc) in idx.iter() {
                if loc.kind == crate::store::format::BlobKind::Data {
                    by_pack.entry(loc.pack).or_default().push((
                        loc.offset,
                        loc.length,
                        loc.raw_length,
                        *id,
                    ));
                }
            }
        }
        for v in by_pack.values_mut() {
            v.sort_by_key(|b| b.0);
        }
        let (tx, rx) = crossbeam_channel::bounded(256);
        Arc::new(ChunkCache {
            store,
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            max_bytes,
            inflight: Mutex::new(HashMap::new()),
            by_pack,
            prefetch_tx: tx,
            prefetch_rx: rx,
        })
    }

    /// Start `n` prefetch threads; they end when the cache is dropped.
    pub fn start_prefetchers(self: &Arc<Self>, n: usize) {
        for _ in 0..n {
            let weak = Arc::downgrade(self);
            let rx = self.prefetch_rx.clone();
            std::thread::spawn(move || {
                while let Ok(id) = rx.recv() {
                    let Some(c) = weak.upgrade() else { return };
                    let _ = c.get(&id);
                }
            });
        }
    }

    /// Ask for a chunk to be fetched in the background; dropped if the queue is full.
    pub fn prefetch(&self, id: BlobId) {
        if self.lru.lock().map.contains(&id) || self.inflight.lock().contains_key(&id) {
            return;
        }
        let _ = self.prefetch_tx.try_send(id);
    }

    fn insert(&self, id: BlobId, c: Chunk) {
        let mut l = self.lru.lock();
        if let Some(old) = l.map.put(id, c.clone()) {
            l.bytes -= old.len();
        }
        l.bytes += c.len();
        while l.bytes > self.max_bytes && l.map.len() > 1 {
            match l.map.pop_lru() {
                Some((_, v)) => l.bytes -= v.len(),
                None => break,
            }
        }
    }

    /// The chunk `id`, from memory, from another thread's fetch, or from the store.
    pub fn get(&self, id: &BlobId) -> Result<Chunk, String> {
        if let Some(c) = self.lru.lock().map.get(id) {
            return Ok(c.clone());
        }
        let (flight, leader) = {
            let mut inf = self.inflight.lock();
            match inf.get(id) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Inflight::default());
                    inf.insert(*id, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut d = flight.done.lock();
            while d.is_none() {
                flight.cv.wait(&mut d);
            }
            return d.clone().expect("set above");
        }
        // Check again: it may have landed between the LRU check and registering.
        // (The LRU guard must be gone before fetching: `fetch` takes it again.)
        let cached = self.lru.lock().map.get(id).cloned();
        let res = match cached {
            Some(c) => Ok(c),
            None => self.fetch(id),
        };
        if let Ok(c) = &res {
            self.insert(*id, c.clone());
        }
        *flight.done.lock() = Some(res.clone());
        flight.cv.notify_all();
        self.inflight.lock().remove(id);
        res
    }

    fn fetch(&self, id: &BlobId) -> Result<Chunk, String> {
        let loc = self
            .store
            .index()
            .get(id)
            .ok_or_else(|| format!("blob {} is not in the store's index", id.short()))?;
        if loc.length > SMALL_BLOB {
            return self
                .store
                .read_blob(id)
                .map(Arc::new)
                .map_err(|e| e.to_string());
        }
        // A small blob: read the contiguous run of small blobs from here in one request.
        let Some(blobs) = self.by_pack.get(&loc.pack) else {
            return self
                .store
                .read_blob(id)
                .map(Arc::new)
                .map_err(|e| e.to_string());
        };
        let start = blobs.partition_point(|b| b.0 < loc.offset);
        let mut end = start;
        let base = loc.offset as u64;
        while end < blobs.len() {
            let b = blobs[end];
            if b.1 > SMALL_BLOB || b.0 as u64 + b.1 as u64 - base > PACK_RANGE {
                break;
            }
            end += 1;
        }
        if end <= start + 1 {
            return self
                .store
                .read_blob(id)
                .map(Arc::new)
                .map_err(|e| e.to_string());
        }
        let last = blobs[end - 1];
        let len = last.0 as u64 + last.1 as u64 - base;
        let pack = self.store.index().pack_name(loc.pack).to_string();
        let data = self
            .store
            .backend()
            .read_range(FileType::Pack, &pack, base, len)
            .map_err(|e| e.to_string())?;
        let mut wanted = None;
        for &(off, slen, raw, bid) in &blobs[start..end] {
            let rel = (off as u64 - base) as usize;
            let sealed = &data[rel..rel + slen as usize];
            if bid == *id {
                let c = Arc::new(
                    self.store
                        .decode_blob(&bid, sealed, raw, &pack)
                        .map_err(|e| e.to_string())?,
                );
                wanted = Some(c);
            } else if !self.lru.lock().map.contains(&bid) {
                // Neighbours are cached only if they authenticate; a damaged one is simply
                // fetched (and reported) when someone reads it.
                if let Ok(c) = self.store.decode_blob(&bid, sealed, raw, &pack) {
                    self.insert(bid, Arc::new(c));
                }
            }
        }
        wanted.ok_or_else(|| format!("blob {} missing from its pack range", id.short()))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lru.lock().bytes
    }
}
