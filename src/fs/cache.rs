//! The shared chunk cache of a mount: decrypted chunks, bounded in bytes, with in-flight
//! deduplication and prefetching.
//!
//! Every read of a mounted file goes through [`ChunkCache::get`]. A chunk in the LRU is a
//! memory copy; a chunk being fetched by another thread (a reader or the prefetcher) is waited
//! for instead of fetched twice. A miss on a small blob reads a whole contiguous range of its
//! pack (up to [`PACK_RANGE`]) and caches every small blob in it: a directory's small files sit
//! together in a pack because backup packs them in walk order, so `tar` or `cp -r` of a
//! directory costs a few range reads instead of one round trip per file. A reader's miss also
//! queues the `READ_AHEAD` ranges after it, and a reader reaching the first blob of a range
//! read ahead queues the one `READ_AHEAD` further, so a sequential reader of small files keeps
//! that many ranges in flight (bounded: nothing is read ahead that no reader is approaching).
//! [`ChunkCache::prefetch`]
//! queues chunks for a small pool of threads, which sequential readers use to fetch ahead.
//!
//! The cache is in two parts, as in a segmented LRU: a ring of [`STREAM_RING`] bytes for what
//! may not be read again, and the LRU proper. Chunks read ahead (prefetched, or a range's
//! neighbours) enter the ring and move to the LRU when a reader that is not streaming reads
//! them; a sequential reader of a large file streams, its chunks staying in the ring, and the
//! chunks it has gone past ([`ChunkCache::passed`]) move to the part of the ring that leaves
//! first. So reading a file larger than the cache does not push everything else out (the
//! kernel's page cache keeps what was read), as a database keeps a sequential scan in a small
//! ring of buffers, and what was read ahead but never wanted (a prefetch that came too late, a
//! range holding chunks a reader has gone past: a file's chunks are not always in file order
//! in their packs) leaves with the ring. The buffers of chunks leaving the cache are kept for the next fetches, which
//! then decompress into memory that is already mapped instead of faulting in fresh pages.

use std::collections::HashMap;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Condvar, Mutex};

use crate::store::Store;
use crate::store::backend::FileType;
use crate::store::crypto::BlobId;
use crate::store::stream;

/// A decrypted chunk.
pub type Chunk = Arc<Vec<u8>>;

/// Largest pack range read at once for small blobs.
pub const PACK_RANGE: u64 = 4 << 20;
/// Blobs at most this large are grouped into pack-range reads.
const SMALL_BLOB: u32 = 256 << 10;
/// Pack ranges of small blobs read ahead of a sequential reader. A range holds a few hundred
/// small files that `tar` goes through in milliseconds, about one round trip over a real
/// network: with 3 ranges ahead a cold `tar` of share/man over a 10 ms round trip took 2.4–2.6 s
/// instead of 5.3–5.5 s (docs/PERFORMANCE.md).
const READ_AHEAD: usize = 3;
/// Bytes of the ring (or the whole cache, if smaller): what is read ahead of readers (16
/// chunks and 3 pack ranges each), and chunks a streaming reader has gone past, enough for
/// requests the kernel sends out of order and for re-reads of what was just read.
pub const STREAM_RING: usize = 64 << 20;
/// Buffers of chunks that left the cache, kept for the next fetches: at most this many, and
/// this many bytes (or an eighth of the cache, if less), on top of the cache's own bound.
const FREE_BUFFERS: usize = 16;
const FREE_BYTES: usize = 32 << 20;
/// Buffers smaller than this come from the allocator's heap and are not worth keeping.
const KEEP_BUFFER: usize = 256 << 10;

thread_local! {
    /// Where a thread reads pack ranges of small blobs (up to [`PACK_RANGE`]): a fresh buffer
    /// per range was a page fault per 4 KiB.
    static RANGE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Inflight {
    done: Mutex<Option<Result<Chunk, String>>>,
    cv: Condvar,
}

struct Lru {
    map: LruCache<BlobId, Chunk>,
    /// Memory held by `map` (buffer capacities).
    bytes: usize,
    /// The chunks of `map` that are in the ring, oldest first, with their sizes: those read
    /// ahead, and (leaving first) those streaming readers have gone past.
    ring: LruCache<BlobId, usize>,
    passed: LruCache<BlobId, usize>,
    /// Bytes of both parts of the ring.
    ring_bytes: usize,
}

impl Lru {
    /// `id` (of `n` bytes) goes to the new end of the ring's read-ahead part.
    fn ring_push(&mut self, id: BlobId, n: usize) {
        self.ring_remove(&id);
        self.ring.put(id, n);
        self.ring_bytes += n;
    }

    /// `id`, in the ring, goes to the new end of the part streaming readers have gone past.
    fn ring_pass(&mut self, id: BlobId, n: usize) {
        self.ring_remove(&id);
        self.passed.put(id, n);
        self.ring_bytes += n;
    }

    /// `id` leaves the ring (for the LRU proper, or the cache).
    fn ring_remove(&mut self, id: &BlobId) {
        if let Some(n) = self.ring.pop(id).or_else(|| self.passed.pop(id)) {
            self.ring_bytes -= n;
        }
    }

    /// The ring's next chunk to leave: the oldest a reader went past, else the oldest read
    /// ahead.
    fn ring_pop(&mut self) -> Option<(BlobId, usize)> {
        let (k, n) = self.passed.pop_lru().or_else(|| self.ring.pop_lru())?;
        self.ring_bytes -= n;
        Some((k, n))
    }
}

/// Memory a chunk holds.
fn held(c: &Chunk) -> usize {
    c.capacity()
}

/// Each pack's data blobs, sorted by offset: (offset, sealed length, raw length, id).
type ByPack = HashMap<String, Vec<(u32, u32, u32, BlobId)>>;

/// [`ChunkCache::by_pack`] made from the store's index.
fn blobs_by_pack(store: &Store) -> ByPack {
    let _t = crate::trace::span("mount: blobs by pack");
    let mut by_pack: HashMap<u32, Vec<(u32, u32, u32, BlobId)>> = HashMap::new();
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
    by_pack
        .into_iter()
        .map(|(n, mut v)| {
            v.sort_by_key(|b| b.0);
            (idx.pack_name(n).to_string(), v)
        })
        .collect()
}

pub struct ChunkCache {
    store: Arc<Store>,
    lru: Mutex<Lru>,
    max_bytes: usize,
    inflight: Mutex<HashMap<BlobId, Arc<Inflight>>>,
    /// Blobs of each pack sorted by offset: (offset, sealed length, raw length, id). Keyed by
    /// the pack's name: its number in the index can change when the index is loaded again (a
    /// mount sees a new snapshot), and a number from the new index must not find the blobs of
    /// another pack here.
    /// Made on first use ([`ChunkCache::by_pack`]), or in the background once the mount is
    /// up ([`ChunkCache::prepare`]): a million blobs take a tenth of a second, which a mount's
    /// first listings need not wait for.
    by_pack: std::sync::OnceLock<ByPack>,
    /// Largest pack range read at once ([`PACK_RANGE`]; smaller in tests).
    range: u64,
    /// Prefetch jobs: one chunk, or a run of a file's chunks stored one after another.
    prefetch_tx: crossbeam_channel::Sender<Vec<BlobId>>,
    prefetch_rx: crossbeam_channel::Receiver<Vec<BlobId>>,
    /// Pack-range readahead: the first blob of a range read ahead → the first blob of the range
    /// [`READ_AHEAD`] further, queued when a reader gets to the former.
    ahead: Mutex<HashMap<BlobId, BlobId>>,
    /// Chunks of the runs waiting in the prefetch queue, so that a run is queued once: a
    /// window sliding over a run asked for it again at every read until a thread took it,
    /// and a late copy read again the chunks the reader had passed since.
    queued: Mutex<std::collections::HashSet<BlobId>>,
    /// Bytes of the ring ([`STREAM_RING`], at most the cache: a smaller cache is all ring,
    /// as an LRU alone would be, so a reader's window read ahead still fits).
    ring_max: usize,
    /// Buffers of chunks that left the cache, for the next large fetches.
    free: Mutex<Vec<Vec<u8>>>,
    /// Bytes the kept buffers may hold ([`FREE_BYTES`], at most an eighth of the cache).
    free_max: usize,
    /// Fetches that reused such a buffer.
    reused: std::sync::atomic::AtomicU64,
}

impl ChunkCache {
    /// Each pack's data blobs by offset, made now if not yet.
    fn by_pack(&self) -> &ByPack {
        self.by_pack.get_or_init(|| blobs_by_pack(&self.store))
    }

    /// Make the map of data blobs by pack on another thread, so that the first small chunk read
    /// finds it made.
    pub fn prepare(self: &Arc<Self>) {
        let cache = Arc::downgrade(self);
        std::thread::spawn(move || {
            if let Some(c) = cache.upgrade() {
                c.by_pack();
            }
        });
    }

    pub fn new(store: Arc<Store>, max_bytes: usize) -> Arc<ChunkCache> {
        Self::with_range(store, max_bytes, PACK_RANGE, STREAM_RING)
    }

    /// A cache whose ring holds, besides [`STREAM_RING`], a run
    /// ([`crate::store::stream::RUN_BYTES`]) ahead for each of `readers` range reads in
    /// flight and as much again behind: over a far server more range reads are in flight
    /// ([`crate::store::backend::Backend::ranges_at_once`]) and the window ahead must hold
    /// them. At 100 ms round trips (16 readers) a cold `cat` of a 384 MiB file through the
    /// mount took 4.55–4.63 s with the 64 MiB ring, 3.16–3.21 s with 128 MiB (daemon peak
    /// RSS 217 and 280 MB).
    pub fn for_readers(store: Arc<Store>, max_bytes: usize, readers: usize) -> Arc<ChunkCache> {
        let ring = (2 * readers as u64 * crate::store::stream::RUN_BYTES)
            .try_into()
            .unwrap_or(usize::MAX)
            .max(STREAM_RING);
        Self::with_range(store, max_bytes, PACK_RANGE, ring)
    }

    fn with_range(store: Arc<Store>, max_bytes: usize, range: u64, ring: usize) -> Arc<ChunkCache> {
        let (tx, rx) = crossbeam_channel::bounded(256);
        Arc::new(ChunkCache {
            store,
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
                ring: LruCache::unbounded(),
                passed: LruCache::unbounded(),
                ring_bytes: 0,
            }),
            max_bytes,
            inflight: Mutex::new(HashMap::new()),
            by_pack: std::sync::OnceLock::new(),
            range,
            prefetch_tx: tx,
            prefetch_rx: rx,
            ahead: Mutex::new(HashMap::new()),
            queued: Mutex::new(std::collections::HashSet::new()),
            ring_max: ring.min(max_bytes),
            free: Mutex::new(Vec::new()),
            free_max: FREE_BYTES.min(max_bytes / 8),
            reused: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Bytes of the ring: what streaming readers and read-ahead share.
    pub fn ring_bytes(&self) -> usize {
        self.ring_max
    }

    /// Start `n` prefetch threads; they end when the cache is dropped.
    pub fn start_prefetchers(self: &Arc<Self>, n: usize) {
        for _ in 0..n {
            let weak = Arc::downgrade(self);
            let rx = self.prefetch_rx.clone();
            std::thread::spawn(move || {
                while let Ok(ids) = rx.recv() {
                    let Some(c) = weak.upgrade() else { return };
                    match ids.as_slice() {
                        [id] => {
                            let _ = c.get_as(id, true, true);
                        }
                        run => c.fetch_run(run),
                    }
                }
            });
        }
    }

    /// Ask for a chunk to be fetched in the background; dropped if the queue is full.
    pub fn prefetch(&self, id: BlobId) {
        if self.lru.lock().map.contains(&id) || self.inflight.lock().contains_key(&id) {
            return;
        }
        let _ = self.prefetch_tx.try_send(vec![id]);
    }

    /// Ask for a run of a file's chunks, stored one after another in a pack, to be fetched in
    /// the background with one range read (those not held or being fetched already); dropped
    /// if the queue is full.
    pub fn prefetch_run(&self, ids: &[BlobId]) {
        let l = self.lru.lock();
        let inf = self.inflight.lock();
        let mut queued = self.queued.lock();
        let wanted: Vec<BlobId> = ids
            .iter()
            .filter(|id| !l.map.contains(id) && !inf.contains_key(id) && !queued.contains(id))
            .copied()
            .collect();
        if wanted.is_empty() {
            return;
        }
        queued.extend(wanted.iter().copied());
        if self.prefetch_tx.try_send(wanted.clone()).is_err() {
            for id in &wanted {
                queued.remove(id);
            }
        }
    }

    /// Fetch the chunks of `ids` that nobody holds or fetches, each run of them stored one
    /// after another in a pack with one range read, into the ring; readers waiting for one
    /// get it as soon as it is decoded.
    fn fetch_run(&self, ids: &[BlobId]) {
        let (mine, flights): (Vec<BlobId>, Vec<Arc<Inflight>>) = {
            let l = self.lru.lock();
            let mut inf = self.inflight.lock();
            let mut queued = self.queued.lock();
            for id in ids {
                queued.remove(id);
            }
            drop(queued);
            let mut claimed = (Vec::new(), Vec::new());
            for id in ids {
                if !l.map.contains(id) && !inf.contains_key(id) {
                    let f = Arc::new(Inflight::default());
                    inf.insert(*id, f.clone());
                    claimed.0.push(*id);
                    claimed.1.push(f);
                }
            }
            claimed
        };
        if mine.is_empty() {
            return;
        }
        let answered: Vec<std::cell::Cell<bool>> =
            mine.iter().map(|_| std::cell::Cell::new(false)).collect();
        let finish = |k: usize, res: Result<Chunk, String>| {
            if answered[k].replace(true) {
                return;
            }
            if let Ok(c) = &res {
                self.insert(mine[k], c.clone(), true);
            }
            let f = &flights[k];
            *f.done.lock() = Some(res);
            f.cv.notify_all();
            self.inflight.lock().remove(&mine[k]);
        };
        let runs = stream::plan_runs(&self.store, &mine, stream::RUN_BYTES);
        RANGE_BUF.with(|b| {
            let mut range_buf = b.borrow_mut();
            for run in &runs {
                stream::read_run(
                    &self.store,
                    &mine,
                    run,
                    &mut range_buf,
                    &mut |raw| self.buffer_for(raw),
                    &mut |pos, _, r| {
                        finish(
                            run.ids.start + pos,
                            r.map(Arc::new).map_err(|e| e.to_string()),
                        )
                    },
                );
            }
        });
        // Every claimed chunk is answered, so no reader waits forever.
        for (k, id) in mine.iter().enumerate() {
            finish(k, Err(format!("chunk {} was not read", id.short())));
        }
    }

    /// Cache chunk `id`, in the ring or in the LRU proper.
    fn insert(&self, id: BlobId, c: Chunk, in_ring: bool) {
        let mut l = self.lru.lock();
        let n = held(&c);
        l.bytes += n;
        if let Some(old) = l.map.put(id, c) {
            l.bytes -= held(&old);
        }
        if in_ring {
            l.ring_push(id, n);
        } else {
            l.ring_remove(&id);
        }
        self.trim(&mut l);
    }

    /// Drop the ring's oldest chunks beyond its size, then the LRU's beyond the cache's.
    fn trim(&self, l: &mut Lru) {
        while l.ring_bytes > self.ring_max {
            let Some((k, _)) = l.ring_pop() else {
                break;
            };
            if let Some(c) = l.map.pop(&k) {
                l.bytes -= held(&c);
                self.recycle(c);
            }
        }
        while l.bytes > self.max_bytes && l.map.len() > 1 {
            let Some((k, v)) = l.map.pop_lru() else { break };
            l.bytes -= held(&v);
            l.ring_remove(&k);
            self.recycle(v);
        }
    }

    /// A streaming reader has read chunk `id` to its end: it leaves the ring after the chunks
    /// passed before it but before anything read ahead (at the ring's new end, the chunks a
    /// reader had passed since a prefetch outlived the prefetched chunks it had not reached,
    /// which then went first and were read again).
    pub fn passed(&self, id: &BlobId) {
        let mut l = self.lru.lock();
        let Some(n) = l.map.peek(id).map(held) else {
            return;
        };
        l.ring_pass(*id, n);
        self.trim(&mut l);
    }

    /// Keep the buffer of a chunk leaving the cache for a later fetch, if no reader holds it.
    fn recycle(&self, c: Chunk) {
        if let Ok(buf) = Arc::try_unwrap(c)
            && buf.capacity() >= KEEP_BUFFER
        {
            let mut free = self.free.lock();
            let kept: usize = free.iter().map(|b| b.capacity()).sum();
            if free.len() < FREE_BUFFERS && kept + buf.capacity() <= self.free_max {
                free.push(buf);
            }
        }
    }

    /// A kept buffer for a chunk of `len` bytes: the smallest that holds it without being
    /// more than twice as large, else the largest smaller one (grown, its pages reused); empty
    /// when none suits or `len` is too small to be worth it.
    fn buffer_for(&self, len: usize) -> Vec<u8> {
        if len < KEEP_BUFFER {
            return Vec::new();
        }
        let mut free = self.free.lock();
        let fits = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() <= 2 * len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let pick = fits.or_else(|| {
            free.iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() < len)
                .max_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
        });
        match pick {
            Some(i) => {
                self.reused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                free.swap_remove(i)
            }
            None => Vec::new(),
        }
    }

    /// The chunk `id`, from memory, from another thread's fetch, or from the store, for a
    /// reader that is `streaming` (its chunks stay in the ring) or not (they join the LRU).
    pub fn get(&self, id: &BlobId, streaming: bool) -> Result<Chunk, String> {
        self.get_as(id, false, streaming)
    }

    /// Is `id` in memory (not counting fetches in flight)?
    pub fn holds(&self, id: &BlobId) -> bool {
        self.lru.lock().map.contains(id)
    }

    /// [`ChunkCache::get`] for a reader (`ahead` false) or for a prefetcher thread (`ahead`;
    /// it counts as streaming).
    fn get_as(&self, id: &BlobId, ahead: bool, streaming: bool) -> Result<Chunk, String> {
        if !ahead && let Some(next) = self.ahead.lock().remove(id) {
            self.prefetch(next);
        }
        let keep = !ahead && !streaming;
        {
            let mut l = self.lru.lock();
            if let Some(c) = l.map.get(id).cloned() {
                if keep {
                    l.ring_remove(id);
                }
                return Ok(c);
            }
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
            let r = d.clone().expect("set above");
            drop(d);
            if keep {
                self.lru.lock().ring_remove(id);
            }
            return r;
        }
        // Check again: it may have landed between the LRU check and registering.
        // (The LRU guard must be gone before fetching: `fetch` takes it again.)
        let cached = self.lru.lock().map.get(id).cloned();
        let res = match cached {
            Some(c) => Ok(c),
            None => self.fetch(id, ahead),
        };
        if let Ok(c) = &res {
            self.insert(*id, c.clone(), !keep);
        }
        *flight.done.lock() = Some(res.clone());
        flight.cv.notify_all();
        self.inflight.lock().remove(id);
        res
    }

    fn fetch(&self, id: &BlobId, ahead: bool) -> Result<Chunk, String> {
        // The location and its pack's name from one look at the index (another look could see
        // it loaded again, its packs numbered anew).
        let (loc, pack) = {
            let idx = self.store.index();
            let loc = idx
                .get(id)
                .ok_or_else(|| format!("blob {} is not in the store's index", id.short()))?;
            (loc, idx.pack_name(loc.pack).to_string())
        };
        if loc.length > SMALL_BLOB {
            let buf = self.buffer_for(loc.raw_length as usize);
            return self
                .store
                .read_blob_reusing(id, buf)
                .map(Arc::new)
                .map_err(|e| e.to_string());
        }
        // A small blob: read the contiguous run of small blobs from here in one request.
        let Some(blobs) = self.by_pack().get(&pack) else {
            return self
                .store
                .read_blob(id)
                .map(Arc::new)
                .map_err(|e| e.to_string());
        };
        let start = blobs.partition_point(|b| b.0 < loc.offset);
        let end = range_end(blobs, start, self.range);
        // Readahead of the ranges of small blobs after this one (large blobs end a range:
        // chunks of big files backed up at the same time sit between the small ones). A
        // reader's miss queues the next READ_AHEAD ranges; a range read ahead marks the one
        // READ_AHEAD further, queued when a reader gets to this one.
        if ahead {
            if let Some(k) = range_after(blobs, end, READ_AHEAD, self.range) {
                self.ahead.lock().insert(*id, blobs[k].3);
            }
        } else {
            let mut e = end;
            for _ in 0..READ_AHEAD {
                let Some(k) = range_after(blobs, e, 1, self.range) else {
                    break;
                };
                self.prefetch(blobs[k].3);
                e = range_end(blobs, k, self.range);
            }
        }
        if end <= start + 1 {
            return self
                .store
                .read_blob(id)
                .map(Arc::new)
                .map_err(|e| e.to_string());
        }
        let base = loc.offset as u64;
        let last = blobs[end - 1];
        let len = last.0 as u64 + last.1 as u64 - base;
        RANGE_BUF.with(|b| {
            let mut data = b.borrow_mut();
            self.store
                .backend()
                .read_range_into(FileType::Pack, &pack, base, len, &mut data)
                .map_err(|e| e.to_string())?;
            let mut wanted = None;
            for &(off, slen, raw, bid) in &blobs[start..end] {
                let rel = (off as u64 - base) as usize;
                let sealed = &mut data[rel..rel + slen as usize];
                let decode = |sealed: &mut [u8]| {
                    let out = self.buffer_for(raw as usize);
                    self.store.decode_blob_into(&bid, sealed, raw, &pack, out)
                };
                if bid == *id {
                    wanted = Some(Arc::new(decode(sealed).map_err(|e| e.to_string())?));
                } else if !self.lru.lock().map.contains(&bid) {
                    // Neighbours are cached only if they authenticate; a damaged one is simply
                    // fetched (and reported) when someone reads it.
                    if let Ok(c) = decode(sealed) {
                        self.insert(bid, Arc::new(c), true);
                    }
                }
            }
            wanted.ok_or_else(|| format!("blob {} missing from its pack range", id.short()))
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lru.lock().bytes
    }

    /// Fetches that decompressed into the buffer of a chunk that had left the cache.
    pub fn reused_buffers(&self) -> u64 {
        self.reused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Blobs of a pack sorted by offset: (offset, sealed length, raw length, id).
type PackBlobs = [(u32, u32, u32, BlobId)];

/// The end (exclusive) of the range of small blobs starting at `start`: contiguous small blobs
/// spanning at most `range` bytes.
fn range_end(blobs: &PackBlobs, start: usize, range: u64) -> usize {
    let base = blobs[start].0 as u64;
    let mut end = start;
    while end < blobs.len() {
        let b = blobs[end];
        if b.1 > SMALL_BLOB || b.0 as u64 + b.1 as u64 - base > range {
            break;
        }
        end += 1;
    }
    end.max(start + 1)
}

/// Where the `n`th range after the one ending at `end` starts (ranges start at small blobs).
fn range_after(blobs: &PackBlobs, mut end: usize, n: usize, range: u64) -> Option<usize> {
    let mut start = None;
    for _ in 0..n {
        let k = end + blobs.get(end..)?.iter().position(|b| b.1 <= SMALL_BLOB)?;
        start = Some(k);
        end = range_end(blobs, k, range);
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A store (in memory) holding 150 incompressible 100 KiB files: small blobs, several pack
    /// ranges of them in one pack.
    fn store_of_small_files() -> (Arc<Store>, tempfile::TempDir) {
        let src = tempfile::tempdir().unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for f in 0..150 {
            let data: Vec<u8> = (0..100 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            std::fs::write(src.path().join(format!("f{f:03}")), data).unwrap();
        }
        let (store, _) = crate::fs::tests::memory_store(src.path(), Vec::new());
        (store, src)
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "waited 20 s for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The ring grows with the range reads in flight (a run ahead and one behind each), never
    /// below [`STREAM_RING`] nor beyond the cache.
    #[test]
    fn the_ring_holds_a_run_ahead_and_behind_for_each_reader() {
        let (store, _src) = store_of_small_files();
        let ring = |cache: usize, readers: usize| {
            ChunkCache::for_readers(store.clone(), cache, readers).ring_bytes()
        };
        assert_eq!(ring(512 << 20, 4), STREAM_RING);
        assert_eq!(ring(512 << 20, 8), STREAM_RING);
        assert_eq!(ring(512 << 20, 16), 128 << 20);
        assert_eq!(ring(100 << 20, 16), 100 << 20);
        assert_eq!(ring(16 << 20, 4), 16 << 20);
    }

    /// A reader going through small blobs in pack order has READ_AHEAD pack ranges read ahead:
    /// its first miss queues the ranges after it, reaching a range read ahead queues the one
    /// READ_AHEAD further, and nothing beyond is read before the reader gets closer.
    #[test]
    fn sequential_small_blobs_are_read_ranges_ahead() {
        let (store, _src) = store_of_small_files();
        // Ranges of at most 4 blobs, so one pack holds many.
        let range = 450 << 10;
        let cache = ChunkCache::with_range(store.clone(), 256 << 20, range, STREAM_RING);
        cache.start_prefetchers(2);
        let blobs = cache
            .by_pack()
            .values()
            .max_by_key(|b| b.len())
            .unwrap()
            .clone();
        let mut starts = vec![0];
        while let Some(k) = range_after(
            &blobs,
            range_end(&blobs, *starts.last().unwrap(), range),
            1,
            range,
        ) {
            starts.push(k);
        }
        assert!(
            starts.len() >= READ_AHEAD + 3,
            "the fixture needs {} ranges in a pack: {starts:?}",
            READ_AHEAD + 3
        );
        // The ranges are what a reader gets: contiguous, 4 blobs of 100 KiB each.
        assert!(starts.windows(2).all(|w| w[1] - w[0] == 4), "{starts:?}");
        let id = |k: usize| blobs[starts[k]].3;
        let quiet = || std::thread::sleep(Duration::from_millis(300));

        // A miss reads range 0 and queues ranges 1..=READ_AHEAD.
        let first = cache.get(&id(0), false).unwrap();
        assert_eq!(*first, store.read_blob(&id(0)).unwrap());
        assert!((starts[0]..starts[1]).all(|k| cache.holds(&blobs[k].3)));
        for r in 1..=READ_AHEAD {
            wait_for(&format!("range {r} to be read ahead"), || {
                cache.holds(&id(r))
            });
        }
        quiet();
        assert!(!cache.holds(&id(READ_AHEAD + 1)), "read too far ahead");

        // Reaching range 1 queues range READ_AHEAD + 1, and no more.
        let second = cache.get(&id(1), false).unwrap();
        assert_eq!(*second, store.read_blob(&id(1)).unwrap());
        wait_for("the next range to be read ahead", || {
            cache.holds(&id(READ_AHEAD + 1))
        });
        quiet();
        assert!(!cache.holds(&id(READ_AHEAD + 2)), "read too far ahead");
        // Every blob read ahead decodes to what the store holds.
        for b in &blobs[starts[1]..starts[READ_AHEAD + 1]] {
            assert_eq!(
                *cache.get(&b.3, false).unwrap(),
                store.read_blob(&b.3).unwrap()
            );
        }
    }
}
