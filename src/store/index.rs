//! The in-memory index: which pack holds each blob, at which offset and length.
//!
//! Built from the index files (and the headers of packs no index file lists) when a store is
//! opened; [`Index::get`] answers every blob read. Blob ids are keyed hashes, so they are
//! hashed with foldhash rather than SipHash.

use std::collections::HashMap;

use super::crypto::BlobId;
use super::format::{BlobKind, IndexPack};

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
