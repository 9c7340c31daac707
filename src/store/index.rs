//! The in-memory index: which pack holds each blob, at which offset and length.
//!
//! Built from the index files (and the headers of packs no index file lists) when a store is
//! opened; [`Index::get`] answers every blob read.

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
/// Most of them sit in one array sorted by id, 52 bytes a blob with nothing around it: a
/// hash map of a million blobs takes 2^21 slots (111 MB) and twice that while it grows, which
/// made the index most of a backup's memory. Blob ids are keyed hashes, so evenly spread: a
/// lookup goes to the bucket of the id's first bits (about 8 blobs each) and searches it,
/// three or four probes close together whatever the size (and a binary search of a big bucket
/// at worst, for a store whose ids are not spread). Blobs added since the last merge are in a small hash map (foldhash rather than
/// SipHash: loading a 50k-blob index file took 16 ms in the map, most of it hashing); every
/// [`MERGE_AT`] of them are merged into the array, in place from its end. A blob is in one of
/// the two, never both.
#[derive(Default)]
pub struct Index {
    packs: Vec<String>,
    pack_ids: HashMap<String, u32>,
    /// Per pack: condemned by maintenance (readable, but never deduplicated against).
    condemned: Vec<bool>,
    /// Sorted by id, each id once.
    sorted: Vec<(BlobId, Loc)>,
    /// Where each bucket of ids (by their first `bucket_bits` bits) starts in `sorted`, and
    /// where the last one ends: about 8 blobs a bucket, half a byte a blob.
    buckets: Vec<u32>,
    bucket_bits: u32,
    recent: HashMap<BlobId, Loc, foldhash::fast::RandomState>,
}

/// Blobs held in [`Index`]'s hash map before they are merged into its sorted array.
pub const MERGE_AT: usize = 1 << 16;

impl Index {
    /// Make room for `n` more blobs.
    pub fn reserve(&mut self, n: usize) {
        self.sorted.reserve_exact(n);
    }
    /// The index of these packs, all at once: the same as adding the `live` packs one by one
    /// and then the `condemned` ones, but every entry goes straight into the array, which is
    /// then sorted once. Adding a million blobs one by one (a lookup and a hash-map insert
    /// each, and a merge every [`MERGE_AT`]) took 1.05 s of a store's opening; this takes a
    /// fifth of that. `hint` is the number of entries, to size the array once.
    pub fn from_packs<'a>(
        live: impl Iterator<Item = &'a IndexPack>,
        condemned: impl Iterator<Item = &'a IndexPack>,
        hint: usize,
    ) -> Index {
        let mut idx = Index::default();
        idx.sorted.reserve_exact(hint);
        // Number every pack first, so that a pack condemned anywhere is condemned for all its
        // entries, as when it is added again with `add_condemned`.
        let push = |idx: &mut Index, p: &IndexPack, condemned: bool| {
            let n = idx.number(&p.pack);
            idx.condemned[n as usize] |= condemned;
            idx.sorted.extend(p.entries.iter().map(|e| {
                let loc = Loc {
                    pack: n,
                    kind: p.kind,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                };
                (e.id, loc)
            }));
        };
        for p in live {
            push(&mut idx, p, false);
        }
        for p in condemned {
            push(&mut idx, p, true);
        }
        // Of the copies of a blob the first kept is the first one added in a live pack, or
        // the first one added when all are condemned: pack numbers follow the order added.
        // Ids are keyed hashes: their first 8 bytes, compared as one integer, nearly always
        // decide (comparing whole ids, a call to `memcmp` each, took twice as long).
        let cond = std::mem::take(&mut idx.condemned);
        idx.sorted.sort_unstable_by(|a, b| {
            Self::prefix(&a.0)
                .cmp(&Self::prefix(&b.0))
                .then_with(|| a.0.cmp(&b.0))
                .then_with(|| {
                    (cond[a.1.pack as usize], a.1.pack).cmp(&(cond[b.1.pack as usize], b.1.pack))
                })
        });
        idx.condemned = cond;
        idx.sorted.dedup_by(|later, first| later.0 == first.0);
        idx.sorted.shrink_to_fit();
        idx.rebuild_buckets();
        idx
    }

    /// The number of a pack, given one if it is new.
    fn number(&mut self, name: &str) -> u32 {
        match self.pack_ids.get(name) {
            Some(&n) => n,
            None => {
                let n = self.packs.len() as u32;
                self.packs.push(name.to_owned());
                self.pack_ids.insert(name.to_owned(), n);
                self.condemned.push(false);
                n
            }
        }
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
        let n = self.number(&p.pack);
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
            let known = match self.recent.get_mut(&e.id) {
                Some(l) => Some(l),
                None => match self.find(&e.id) {
                    Ok(i) => Some(&mut self.sorted[i].1),
                    Err(_) => None,
                },
            };
            match known {
                Some(old) => {
                    if !this_condemned && self.condemned[old.pack as usize] {
                        *old = loc;
                    }
                }
                None => {
                    self.recent.insert(e.id, loc);
                }
            }
        }
        if self.recent.len() >= MERGE_AT {
            self.merge();
        }
    }

    /// Move the hash map's blobs into the sorted array: appended, then merged from the end
    /// (no second array; the ids are in one or the other, so none is equal).
    fn merge(&mut self) {
        let mut add: Vec<(BlobId, Loc)> = self.recent.drain().collect();
        add.sort_unstable_by_key(|e| e.0);
        let old = self.sorted.len();
        self.sorted.extend_from_slice(&add);
        let (mut i, mut j, mut k) = (old, add.len(), self.sorted.len());
        while j > 0 {
            k -= 1;
            if i > 0 && self.sorted[i - 1].0 > add[j - 1].0 {
                self.sorted[k] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k] = add[j - 1];
                j -= 1;
            }
        }
        self.recent.shrink_to(MERGE_AT);
        self.rebuild_buckets();
    }

    /// Rebuild [`Index::buckets`] for the sorted array as it now is.
    fn rebuild_buckets(&mut self) {
        let n = self.sorted.len();
        // About 8 blobs a bucket.
        let bits = (usize::BITS - (n / 8).leading_zeros()).min(24);
        self.bucket_bits = bits;
        self.buckets.clear();
        self.buckets.reserve_exact((1 << bits) + 1);
        let mut at = 0usize;
        for b in 0..(1u64 << bits) {
            while at < n && Self::bucket(&self.sorted[at].0, bits) < b {
                at += 1;
            }
            self.buckets.push(at as u32);
        }
        self.buckets.push(n as u32);
    }

    fn bucket(id: &BlobId, bits: u32) -> u64 {
        Self::prefix(id).checked_shr(64 - bits).unwrap_or(0)
    }

    /// An id's first 8 bytes as a number: ordered as the ids are.
    fn prefix(id: &BlobId) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&id.0[..8]);
        u64::from_be_bytes(first)
    }

    /// Where `id` is in the sorted array, or where it would go: a binary search within the
    /// bucket of its first bits.
    fn find(&self, id: &BlobId) -> std::result::Result<usize, usize> {
        let b = Self::bucket(id, self.bucket_bits) as usize;
        let (lo, hi) = match (self.buckets.get(b), self.buckets.get(b + 1)) {
            (Some(&lo), Some(&hi)) => (lo as usize, hi as usize),
            _ => (0, self.sorted.len()),
        };
        self.sorted[lo..hi]
            .binary_search_by(|e| e.0.cmp(id))
            .map(|i| i + lo)
            .map_err(|i| i + lo)
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
        if let Some(l) = self.recent.get(id) {
            return Some(*l);
        }
        self.find(id).ok().map(|i| self.sorted[i].1)
    }
    pub fn contains(&self, id: &BlobId) -> bool {
        self.get(id).is_some()
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
        self.sorted.len() + self.recent.len()
    }
    /// Every blob with its location.
    pub fn iter(&self) -> impl Iterator<Item = (&BlobId, &Loc)> {
        self.sorted
            .iter()
            .map(|(id, l)| (id, l))
            .chain(self.recent.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::{BlobKind, IndexPack, PackEntry};

    fn id(seed: u64) -> BlobId {
        BlobId(*blake3::hash(&seed.to_le_bytes()).as_bytes())
    }

    fn pack(name: &str, ids: impl Iterator<Item = BlobId>) -> IndexPack {
        IndexPack {
            pack: name.into(),
            kind: BlobKind::Data,
            entries: ids
                .enumerate()
                .map(|(i, id)| PackEntry {
                    id,
                    offset: i as u32,
                    length: 1,
                    raw_length: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn finds_every_blob_across_merges_and_none_else() {
        let mut idx = Index::default();
        let n = 3 * MERGE_AT as u64 + 123;
        for chunk in 0..4 {
            let lo = chunk * n / 4;
            let hi = (chunk + 1) * n / 4;
            idx.add_pack(&pack(&format!("p{chunk}"), (lo..hi).map(id)));
        }
        assert_eq!(idx.blob_count() as u64, n);
        assert!(idx.sorted.windows(2).all(|w| w[0].0 < w[1].0));
        for i in 0..n {
            let l = idx.get(&id(i)).expect("known blob");
            let chunk = (0..4u64).find(|c| i < (c + 1) * n / 4).unwrap();
            assert_eq!(l.pack, chunk as u32, "blob {i}");
        }
        for i in n..n + 10_000 {
            assert!(idx.get(&id(i)).is_none());
        }
        assert_eq!(idx.iter().count() as u64, n);
    }

    #[test]
    fn ids_that_are_not_spread_are_found_too() {
        // A hostile store's ids need not look random: all in one corner of the id space.
        let mut idx = Index::default();
        let ids: Vec<BlobId> = (0..(MERGE_AT as u64 + 500))
            .map(|i| {
                let mut b = [0u8; 32];
                b[24..].copy_from_slice(&i.to_be_bytes());
                if i % 3 == 0 {
                    b[0] = 0xff;
                }
                BlobId(b)
            })
            .collect();
        idx.add_pack(&pack("p", ids.iter().copied()));
        for (i, b) in ids.iter().enumerate() {
            assert_eq!(idx.get(b).map(|l| l.offset), Some(i as u32));
        }
        let mut missing = [0u8; 32];
        missing[31] = 0xff;
        missing[30] = 0xff;
        missing[29] = 0xff;
        assert!(idx.get(&BlobId(missing)).is_none());
    }

    #[test]
    fn a_condemned_copy_loses_to_another_whichever_came_first() {
        let mut idx = Index::default();
        let ids: Vec<BlobId> = (0..(MERGE_AT as u64 + 10)).map(id).collect();
        idx.add_condemned(&pack("old", ids.iter().copied()));
        // Now merged into the sorted array; the same blobs in a live pack take over.
        idx.add_pack(&pack("new", ids.iter().copied()));
        idx.add_condemned(&pack("older", ids.iter().copied()));
        let new = idx.pack_number("new").unwrap();
        for b in &ids {
            assert_eq!(idx.get(b).unwrap().pack, new);
        }
        assert_eq!(idx.blob_count(), ids.len());
    }

    #[test]
    fn all_at_once_is_the_same_as_one_by_one() {
        // Overlapping packs, a pack listed twice, condemned copies before and after live ones,
        // a pack both live and condemned, and enough blobs to merge on the one-by-one side.
        let n = MERGE_AT as u64 + 777;
        let live = [
            pack("a", (0..n / 2).map(id)),
            pack("b", (n / 3..n).map(id)),
            pack("a", (0..10).map(id)),
            pack("c", (n - 50..n + 50).map(id)),
            pack("e", (n + 60..n + 70).map(id)),
        ];
        let condemned = [
            pack("d", (n / 4..n + 100).map(id)),
            // The same pack listed again (as in a second index file): the same entries.
            pack("c", (n - 50..n - 45).map(id)),
        ];
        let mut one = Index::default();
        live.iter().for_each(|p| one.add_pack(p));
        condemned.iter().for_each(|p| one.add_condemned(p));
        let all = Index::from_packs(live.iter(), condemned.iter(), 0);
        assert_eq!(one.blob_count(), all.blob_count());
        assert!(all.sorted.windows(2).all(|w| w[0].0 < w[1].0));
        for i in 0..n + 200 {
            let (x, y) = (one.get(&id(i)), all.get(&id(i)));
            assert_eq!(x.is_some(), y.is_some(), "blob {i}");
            if let (Some(x), Some(y)) = (x, y) {
                let (px, py) = (one.pack_name(x.pack), all.pack_name(y.pack));
                assert_eq!((px, x.offset), (py, y.offset), "blob {i}");
            }
        }
        assert!(all.is_condemned(all.pack_number("d").unwrap()));
        assert!(all.is_condemned(all.pack_number("c").unwrap()));
        assert!(!all.is_condemned(all.pack_number("a").unwrap()));
        // A blob only in condemned packs is found there; one also live is found live.
        assert_eq!(all.pack_name(all.get(&id(n + 90)).unwrap().pack), "d");
        assert_eq!(all.pack_name(all.get(&id(n + 65)).unwrap().pack), "e");
    }
}
