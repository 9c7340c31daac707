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
    /// Per pack: condemned by maintenance (readable, but never deduplicated against).
    condemned: Vec<bool>,
    blobs: HashMap<BlobId, Loc, foldhash::fast::RandomState>,
}

impl Index {
    /// Make room for `n` more blobs.
    pub fn reserve(&mut self, n: usize) {
        self.blobs.reserve(n);
    }
    /// Add a pack's blobs. A blob already known keeps its first location, unless that one is
    /// in a condemned pack and this one is not.
    pub fn add_pack(&mut self, p: &IndexPack) {
        self.add(p, false);
    }
    /// Add a pack that maintenance condemned: its blobs are read where no other pack has them,
    /// and never reused by a writer.
    pub fn add_condemned(&mut self, p: &IndexPack) {
        self.add(p, true);
    }
    fn add(&mut self, p: &IndexPack, condemned: bool) {
        let n = match self.pack_ids.get(&p.pack) {
            Some(&n) => n,
            None => {
                let n = self.packs.len() as u32;
                self.packs.push(p.pack.clone());
                self.pack_ids.insert(p.pack.clone(), n);
                self.condemned.push(false);
                n
            }
        };
        self.condemned[n as usize] |= condemned;
        let this_condemned = self.condemned[n as usize];
        for e in &p.entries {
            let loc = Loc {
                pack: n,
                kind: p.kind,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
            };
            match self.blobs.entry(e.id) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(loc);
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if !this_condemned && self.condemned[o.get().pack as usize] {
                        o.insert(loc);
                    }
                }
            }
        }
    }
    /// Is pack number `n` condemned?
    pub fn is_condemned(&self, n: u32) -> bool {
        self.condemned.get(n as usize).copied().unwrap_or(false)
    }
    /// The number of a pack by name.
    pub fn pack_number(&self, name: &str) -> Option<u32> {
        self.pack_ids.get(name).copied()
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
