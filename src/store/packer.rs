//! The packer: new blobs into pack files, and pack files into index files.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

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
            self.store.backend.write(FileType::Pack, &name, &b.data)?;
        }
        self.written.lock().push(name.clone());
        let ip = IndexPack {
            pack: name,
            kind,
            entries: b.entries,
        };
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
        let rest = std::mem::take(&mut *self.pending_index.lock());
        self.write_index(rest)
    }
}
