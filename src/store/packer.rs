//! The packer: new blobs into pack files, and pack files into index files.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use super::backend::FileType;
use super::crypto::BlobId;
use super::error::Result;
use super::format::*;
use super::repo::Store;

thread_local! {
    /// Where [`Packer::add`] seals a blob before copying it into the pack: one buffer per
    /// thread, reused, instead of four fresh ones per blob (compressed, payload, ciphertext,
    /// sealed), which for megabyte chunks meant mmap, page faults and munmap every time.
    static SEAL_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes new blobs into packs and index files.
///
/// Data and tree blobs go to separate packs. Any thread may add blobs; the thread whose blob
/// fills a pack uploads it, outside the lock, so uploads of several packs overlap.
pub struct Packer<'a> {
    store: &'a Store,
    bufs: [Mutex<PackBuf>; 2],
    /// Ids added in this session and not uploaded yet (the index knows uploaded packs).
    seen: Mutex<HashSet<BlobId>>,
    pending_index: Mutex<Vec<IndexPack>>,
    /// Packs no index listed that this session reuses blobs of, and so lists in its index.
    adopted: Mutex<HashSet<String>>,
    /// The packs (by number in the store's index when this packer was made) holding blobs
    /// this session reused: one bit each.
    reused_packs: Vec<AtomicU64>,
    /// The packs this session wrote.
    written: Mutex<Vec<String>>,
    pub new_blobs: AtomicU64,
    pub new_bytes: AtomicU64,
    /// Data packs being uploaded in the background, and those that ended, with their
    /// outcome, not yet taken into the index; shared with the upload threads.
    shared: Arc<(Mutex<Uploads>, Condvar)>,
}

#[derive(Default)]
struct Uploads {
    running: usize,
    ended: Vec<(IndexPack, Result<()>)>,
}

/// Data packs uploaded at once in the background, at most (each holds its pack's bytes,
/// 16 MiB and more): a backup's thread filling another waits for one to end. At a 20 ms round
/// trip a 17 MB pack took 0.6 s to upload, during which the large file being read waited.
const BACKGROUND_UPLOADS: usize = 3;

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
/// And at most about this many blobs per index file: packs of small files hold a hundred
/// thousand blobs each, and 32 of them waiting would be 150 MB of entries.
const ENTRIES_PER_INDEX: usize = 1 << 16;

impl<'a> Packer<'a> {
    pub fn new(store: &'a Store) -> Self {
        Packer {
            store,
            bufs: [Mutex::default(), Mutex::default()],
            seen: Mutex::new(HashSet::new()),
            pending_index: Mutex::new(Vec::new()),
            adopted: Mutex::new(HashSet::new()),
            reused_packs: (0..store.index().pack_count().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            written: Mutex::new(Vec::new()),
            new_blobs: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            shared: Arc::new((Mutex::new(Uploads::default()), Condvar::new())),
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
        // A blob only a condemned pack holds may be deleted by a later maintenance: this
        // session stores it again (and the next maintenance sees it referenced).
        if idx.is_condemned(loc.pack) {
            return false;
        }
        if let Some(w) = self.reused_packs.get(loc.pack as usize / 64) {
            let bit = 1u64 << (loc.pack % 64);
            if w.load(Ordering::Relaxed) & bit == 0 {
                w.fetch_or(bit, Ordering::Relaxed);
            }
        }
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
        // Exactly: a pack of small blobs has a header of megabytes, and growing by doubling
        // would make its buffer twice the pack.
        b.data.reserve_exact(h.len() + 4);
        b.data.extend_from_slice(&h);
        b.data.extend_from_slice(&(h.len() as u32).to_le_bytes());
        let name = self.store.crypto.file_id(&b.data);
        if kind == BlobKind::Tree {
            self.store.store_file(FileType::Pack, &name, &b.data)?;
        } else {
            // In the background: the thread whose blob filled the pack goes on (it is often
            // the one reading a large file, whose chunks then all waited for the upload).
            let ip = IndexPack {
                pack: name,
                kind,
                entries: b.entries,
            };
            return self.upload_in_background(ip, b.data);
        }
        self.uploaded(IndexPack {
            pack: name,
            kind,
            entries: b.entries,
        })
    }

    /// Upload the data pack `ip` (its bytes `data`) on a thread of its own, once fewer than
    /// [`BACKGROUND_UPLOADS`] are under way (waiting for one to end if need be); what ended
    /// meanwhile is taken into the index (or its error returned) first.
    fn upload_in_background(&self, ip: IndexPack, data: Vec<u8>) -> Result<()> {
        {
            let mut st = self.shared.0.lock();
            while st.running >= BACKGROUND_UPLOADS {
                self.shared.1.wait(&mut st);
            }
            st.running += 1;
        }
        let backend = self.store.backend.clone();
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("pack upload".into())
            .spawn(move || {
                let r = backend.write(FileType::Pack, &ip.pack, &data);
                drop(data);
                let (st, ended) = &*shared;
                let mut st = st.lock();
                st.running -= 1;
                st.ended.push((ip, r));
                ended.notify_all();
            });
        if let Err(e) = spawned {
            self.shared.0.lock().running -= 1;
            return Err(super::error::Error::Other(format!(
                "could not start a thread to upload a pack: {e}"
            )));
        }
        self.settle()
    }

    /// Take the background uploads that ended into the index; the first error of any.
    fn settle(&self) -> Result<()> {
        let ended = std::mem::take(&mut self.shared.0.lock().ended);
        let mut first_err = None;
        for (ip, r) in ended {
            match r {
                Ok(()) => self.uploaded(ip)?,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Wait until no background upload is under way, then [`Packer::settle`].
    fn wait_uploads(&self) -> Result<()> {
        {
            let mut st = self.shared.0.lock();
            while st.running > 0 {
                self.shared.1.wait(&mut st);
            }
        }
        self.settle()
    }

    /// The pack `ip` is in the store: into the index, and into an index file with others.
    fn uploaded(&self, ip: IndexPack) -> Result<()> {
        self.written.lock().push(ip.pack.clone());
        self.store.index.write().add_pack(&ip);
        // Now in the index, which `claim` looks at first: `seen` holds only the blobs of packs
        // not uploaded yet, however many a session adds.
        {
            let mut seen = self.seen.lock();
            for e in &ip.entries {
                seen.remove(&e.id);
            }
            if seen.capacity() > 4 * seen.len().max(1 << 14) {
                seen.shrink_to_fit();
            }
        }
        let batch = {
            let mut p = self.pending_index.lock();
            p.push(ip);
            let entries: usize = p.iter().map(|ip| ip.entries.len()).sum();
            if p.len() >= PACKS_PER_INDEX || entries >= ENTRIES_PER_INDEX {
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

    /// The packs this session wrote, by name.
    pub fn written(&self) -> Vec<String> {
        self.written.lock().clone()
    }

    /// The packs a snapshot made by this session depends on: those it reused blobs of and
    /// those it wrote. Checked before the snapshot is committed
    /// ([`Store::verify_dependencies`](super::repo::Store::verify_dependencies)).
    pub fn dependencies(&self) -> Vec<String> {
        let idx = self.store.index();
        let mut out: Vec<String> = self.written.lock().clone();
        for (i, w) in self.reused_packs.iter().enumerate() {
            let mut bits = w.load(Ordering::Relaxed);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let n = (i * 64 + b) as u32;
                if (n as usize) < idx.pack_count() {
                    out.push(idx.pack_name(n).to_string());
                }
            }
        }
        out
    }

    /// Upload the partly filled packs and the remaining index entries.
    pub fn finish(&self) -> Result<()> {
        for kind in [BlobKind::Data, BlobKind::Tree] {
            let b = std::mem::take(&mut *self.bufs[kind as usize].lock());
            self.upload(kind, b)?;
        }
        self.wait_uploads()?;
        let rest = std::mem::take(&mut *self.pending_index.lock());
        self.write_index(rest)
    }
}

impl Drop for Packer<'_> {
    /// A packer dropped on an error still lets its uploads end (they are whole or removed),
    /// so that none is cut off by the process exiting after the error is reported.
    fn drop(&mut self) {
        let mut st = self.shared.0.lock();
        while st.running > 0 {
            self.shared.1.wait(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::{MemBackend, PackWrites};
    use crate::store::{CreateOptions, crypto::KdfParams};
    use std::sync::Arc;

    fn store() -> (Store, Arc<MemBackend>) {
        let mem = Arc::new(MemBackend::new());
        let opts = CreateOptions {
            kdf: KdfParams {
                m_kib: 64,
                t: 1,
                p: 1,
            },
            ..Default::default()
        };
        let store = Store::create(mem.clone(), &opts, &|_| Ok(b"t".to_vec())).unwrap();
        (store, mem)
    }

    /// The next 1 MiB of noise from the xorshift state `x`.
    fn noise(x: &mut u64) -> Vec<u8> {
        (0..1 << 20)
            .map(|_| {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                *x as u8
            })
            .collect()
    }

    /// `n` blobs of 1 MiB that do not compress, added to `p`; their ids.
    fn add_blobs(p: &Packer, store: &Store, n: usize, seed: u64) -> Result<Vec<BlobId>> {
        let mut x = seed | 1;
        let mut ids = Vec::new();
        for _ in 0..n {
            let data = noise(&mut x);
            let id = store.crypto().blob_id(&data);
            assert!(!p.claim(&id));
            p.add(BlobKind::Data, id, &data)?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// The thread whose blob fills a pack does not wait for its upload (at a 20 ms round
    /// trip a 17 MB pack took 0.6 s, and the large file being read waited that long for each):
    /// two packs fill while no pack write can end, and all are indexed once they do.
    #[test]
    fn a_full_pack_is_uploaded_while_blobs_are_still_added() {
        let (store, mem) = store();
        let packer = Packer::new(&store);
        let pack = store.config().pack_size as usize;
        let per_pack = pack.div_ceil(1 << 20);
        mem.pack_writes(PackWrites::Hold);
        let (tx, rx) = std::sync::mpsc::channel();
        let ids = std::thread::scope(|s| {
            let adder = s.spawn(|| {
                let r = add_blobs(&packer, &store, 2 * per_pack + 1, 7);
                let _ = tx.send(());
                r
            });
            let ended = rx.recv_timeout(std::time::Duration::from_secs(20));
            mem.pack_writes(PackWrites::Store);
            let ids = adder.join().unwrap().unwrap();
            assert!(
                ended.is_ok(),
                "adding two packs' worth of blobs waited for their uploads"
            );
            ids
        });
        packer.finish().unwrap();
        let idx = store.index();
        for id in &ids {
            assert!(idx.get(id).is_some(), "blob {} not indexed", id.short());
        }
        assert_eq!(packer.written().len(), 3, "two full packs and the rest");
    }

    /// A pack whose upload failed in the background fails the session: `finish` returns the
    /// error, and none of its blobs is in the index.
    #[test]
    fn a_failed_background_upload_fails_the_finish_and_indexes_nothing() {
        let (store, mem) = store();
        let packer = Packer::new(&store);
        let per_pack = (store.config().pack_size as usize).div_ceil(1 << 20);
        mem.pack_writes(PackWrites::Fail);
        // Errors of uploads may surface while adding, or at the end.
        let added = add_blobs(&packer, &store, per_pack + 1, 11);
        let finished = packer.finish();
        assert!(
            added.is_err() || finished.is_err(),
            "a failed pack upload went unnoticed"
        );
        let idx = store.index();
        let first = store.crypto().blob_id(&noise(&mut (11u64 | 1)));
        assert!(
            idx.get(&first).is_none(),
            "a blob of a failed pack is indexed"
        );
        assert!(packer.written().is_empty());
    }
}
