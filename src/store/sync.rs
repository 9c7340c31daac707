//! The sync pipeline: copy snapshots from one store into another.
//!
//! Blob ids are keyed per store, so the same content has different ids in the two stores and
//! nothing can be copied as stored bytes: every data blob the destination lacks is read from
//! the source, opened with the source's keys, and re-sealed by the destination's [`Packer`]
//! (its keys, its compression), which makes sync work between stores with different
//! passphrases and between plaintext and encrypted stores. Trees are then rewritten bottom-up
//! with the destination's ids, and a snapshot record with the same time, host, user, source,
//! path, tags and statistics is written last, after its packs and index, as a backup does. A
//! sync cut short therefore leaves both stores consistent, and a re-run finds the packs it
//! uploaded (from their headers) and does not upload them again.
//!
//! A snapshot is identified across stores by (time, host, source, path): the destination "has"
//! a snapshot when it holds one with the same four, so a second run copies nothing.
//!
//! Finding which blobs the destination lacks needs their destination ids, which need their
//! content. To avoid reading everything, the pipeline first learns id pairs from a snapshot
//! both stores already hold (the latest earlier copy of the same source): the two trees are
//! walked side by side, and where the destination tree is exactly the source tree with its ids
//! rewritten, each source id is paired with the destination id in the same position. A daily
//! sync then reads only what changed since the previous one. Data blobs to read are grouped by
//! pack and read in merged ranges, as a restore does, by a pool of workers.
//!
//! Chunk boundaries are kept as cut by the source: a copied file dedupes against other copied
//! snapshots, but not against files that the destination's own backups chunked with its own
//! chunker seed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::backend::FileType;
use super::crypto::BlobId;
use super::dirfd::MAX_DEPTH;
use super::error::{Error, Result};
use super::format::{BlobKind, Snapshot};
use super::repo::{Packer, SnapshotEntry, Store};
use super::restore::plan_ranges;
use super::tree::{Node, NodeKind, Time, Tree, join};

/// Progress counters, readable while a sync runs.
#[derive(Default)]
pub struct SyncProgress {
    /// Snapshots copied so far and to copy.
    pub snapshots: AtomicU64,
    pub total_snapshots: AtomicU64,
    /// Plain bytes of data blobs read from the source so far, and planned so far (the plan
    /// grows one snapshot at a time).
    pub bytes: AtomicU64,
    pub total_bytes: AtomicU64,
}

#[derive(Debug, Default, Clone)]
pub struct SyncOptions {
    /// Worker threads (0: one per core plus one).
    pub workers: usize,
}

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// (source id, destination id) of every snapshot copied, oldest first.
    pub copied: Vec<(String, String)>,
    /// Selected snapshots the destination already had.
    pub present: usize,
    /// Data blobs read from the source and their sealed bytes.
    pub blobs_read: u64,
    pub bytes_read: u64,
    /// Blobs (data and trees) added to the destination and their sealed bytes.
    pub new_blobs: u64,
    pub new_bytes: u64,
    /// Entries of the copied snapshots that were left out, one line each (path and why): names
    /// a tree must not hold (see `Tree::sanitize`), which a restore would not restore either.
    pub left_out: Vec<String>,
}

impl SyncReport {
    /// Add another direction's report (for `sync with`).
    pub fn merge(&mut self, o: SyncReport) {
        self.copied.extend(o.copied);
        self.present += o.present;
        self.blobs_read += o.blobs_read;
        self.bytes_read += o.bytes_read;
        self.new_blobs += o.new_blobs;
        self.new_bytes += o.new_bytes;
        self.left_out.extend(o.left_out);
    }
}

/// The identity of a snapshot across stores.
pub type SnapshotKey = (Time, String, String, Vec<u8>);

pub fn key(s: &Snapshot) -> SnapshotKey {
    (s.time, s.host.clone(), s.source.clone(), s.path.clone())
}

/// Copy to `dst` the snapshots of `src` it lacks: `selected` ones, or all. Both stores must be
/// open with their index loaded; the caller holds their locks.
///
/// # Errors
/// The first failure to read the source (damage included) or to write the destination ends
/// the sync; snapshots copied before it stay complete.
pub fn run(
    src: &Store,
    dst: &Store,
    selected: Option<Vec<SnapshotEntry>>,
    opts: &SyncOptions,
    progress: &SyncProgress,
) -> Result<SyncReport> {
    // Trees are compared, collected and rewritten recursively, one level per directory.
    super::dirfd::on_deep_stack("sync", || run_here(src, dst, selected, opts, progress))
}

fn run_here(
    src: &Store,
    dst: &Store,
    selected: Option<Vec<SnapshotEntry>>,
    opts: &SyncOptions,
    progress: &SyncProgress,
) -> Result<SyncReport> {
    if src.config().id == dst.config().id {
        return Err(Error::Other(format!(
            "{} and {} are the same store",
            src.backend().location(),
            dst.backend().location()
        )));
    }
    let (src_all, _) = src.snapshots()?;
    let (dst_all, _) = dst.snapshots()?;
    let mut wanted = match selected {
        Some(mut s) => {
            s.sort_by(|a, b| (a.snap.time, &a.id).cmp(&(b.snap.time, &b.id)));
            s.dedup_by(|a, b| a.id == b.id);
            s
        }
        None => src_all.clone(),
    };
    let in_dst: BTreeMap<SnapshotKey, &SnapshotEntry> =
        dst_all.iter().map(|d| (key(&d.snap), d)).collect();
    // Snapshots both stores hold: (source entry, destination entry).
    let mut pairs: Vec<(SnapshotEntry, SnapshotEntry)> = src_all
        .iter()
        .filter_map(|s| in_dst.get(&key(&s.snap)).map(|d| (s.clone(), (*d).clone())))
        .collect();
    let before = wanted.len();
    wanted.retain(|s| !in_dst.contains_key(&key(&s.snap)));
    let mut report = SyncReport {
        present: before - wanted.len(),
        ..Default::default()
    };
    progress
        .total_snapshots
        .store(wanted.len() as u64, Ordering::Relaxed);
    if wanted.is_empty() {
        return Ok(report);
    }

    let workers = if opts.workers > 0 {
        opts.workers
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
    };
    let mut c = Copier {
        src,
        dst,
        packer: Packer::new(dst),
        data: Mutex::new(HashMap::new()),
        trees: HashMap::new(),
        workers,
        progress,
        blobs_read: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
        left_out: Vec::new(),
    };
    let mut zipped: HashSet<(String, String)> = HashSet::new();
    for s in wanted {
        // Learn ids from the latest earlier copy of the same source, once per source.
        let source = (s.snap.host.clone(), s.snap.source.clone());
        if zipped.insert(source.clone()) {
            let same = |p: &&(SnapshotEntry, SnapshotEntry)| {
                p.0.snap.host == source.0 && p.0.snap.source == source.1
            };
            let base = pairs
                .iter()
                .filter(same)
                .filter(|p| p.0.snap.time <= s.snap.time)
                .max_by_key(|p| p.0.snap.time)
                .or_else(|| pairs.iter().filter(same).min_by_key(|p| p.0.snap.time));
            if let Some((a, b)) = base {
                c.zip(a.snap.root, b.snap.root, 0)?;
            }
        }
        let root = c.copy_snapshot(&s)?;
        let parent = s.snap.parent.as_ref().and_then(|p| {
            pairs
                .iter()
                .find(|(a, _)| &a.id == p)
                .map(|(_, b)| b.id.clone())
        });
        let mut snap = s.snap.clone();
        snap.root = root;
        snap.parent = parent;
        // Packs and index before the snapshot: an interrupted sync leaves no snapshot that
        // points at blobs the destination does not have.
        c.packer.finish()?;
        // As a backup does: maintenance may have condemned or deleted what this copy reuses.
        let bad = dst.verify_dependencies(&c.packer.dependencies())?;
        if let Some(first) = bad.first() {
            return Err(Error::Other(format!(
                "maintenance condemned or deleted {} pack(s) of the destination this copy reuses while it ran (first: {first}); the snapshot was not copied: run sync again",
                bad.len()
            )));
        }
        let id = dst.write_snapshot(&snap)?;
        report.copied.push((s.id.clone(), id.clone()));
        progress.snapshots.fetch_add(1, Ordering::Relaxed);
        pairs.push((s, SnapshotEntry { id, snap }));
    }
    report.blobs_read = c.blobs_read.load(Ordering::Relaxed);
    report.bytes_read = c.bytes_read.load(Ordering::Relaxed);
    report.new_blobs = c.packer.new_blobs.load(Ordering::Relaxed);
    report.new_bytes = c.packer.new_bytes.load(Ordering::Relaxed);
    report.left_out = c.left_out;
    Ok(report)
}

struct Copier<'a> {
    src: &'a Store,
    dst: &'a Store,
    packer: Packer<'a>,
    /// Source data blob id → destination id, for every data blob known to be in `dst`.
    data: Mutex<HashMap<BlobId, BlobId>>,
    /// Source tree id → destination id of its rewrite, likewise.
    trees: HashMap<BlobId, BlobId>,
    workers: usize,
    progress: &'a SyncProgress,
    blobs_read: AtomicU64,
    bytes_read: AtomicU64,
    /// See [`SyncReport::left_out`].
    left_out: Vec<String>,
}

/// Refuse trees nested deeper than a restore would go.
fn too_deep(depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::Other(format!(
            "a snapshot's trees are nested more than {MAX_DEPTH} directories deep; it is not copied"
        )));
    }
    Ok(())
}

impl Copier<'_> {
    /// Learn id pairs from source tree `s` and destination tree `d`, which should be its copy.
    /// Returns whether `d` is exactly `s` rewritten with destination ids, all present in the
    /// destination; only then are its pairs kept. Learns nothing wrong from a tree that is
    /// not a copy: it is compared field by field.
    fn zip(&mut self, s: BlobId, d: BlobId, depth: usize) -> Result<bool> {
        if let Some(&known) = self.trees.get(&s) {
            return Ok(known == d);
        }
        if depth > MAX_DEPTH {
            return Ok(false);
        }
        // Only what a writer may reuse: a blob only a condemned pack holds may go.
        // (and recorded as a pack this copy depends on, checked before it commits).
        if !self.packer.reuse(&d) {
            return Ok(false);
        }
        let (st, dt) = (self.src.load_tree(&s)?, self.dst.load_tree(&d)?);
        if st.nodes.len() != dt.nodes.len() {
            return Ok(false);
        }
        let mut learned = Vec::new();
        for (a, b) in st.nodes.iter().zip(&dt.nodes) {
            if a.content.len() != b.content.len() || a.subtree.is_some() != b.subtree.is_some() {
                return Ok(false);
            }
            let same_but_ids = Node {
                content: b.content.clone(),
                subtree: b.subtree,
                ..a.clone()
            };
            if same_but_ids != *b {
                return Ok(false);
            }
            if let (Some(x), Some(y)) = (a.subtree, b.subtree)
                && !self.zip(x, y, depth + 1)?
            {
                return Ok(false);
            }
            learned.extend(a.content.iter().copied().zip(b.content.iter().copied()));
        }
        if learned.iter().any(|(_, y)| !self.packer.reuse(y)) {
            return Ok(false);
        }
        let mut data = self.data.lock();
        if learned
            .iter()
            .any(|(x, y)| data.get(x).is_some_and(|known| known != y))
        {
            return Ok(false);
        }
        data.extend(learned);
        drop(data);
        self.trees.insert(s, d);
        Ok(true)
    }

    /// Copy the data and trees of one snapshot; returns the destination id of its root tree.
    fn copy_snapshot(&mut self, s: &SnapshotEntry) -> Result<BlobId> {
        // 1. The data blobs whose destination id is unknown.
        let mut need: HashSet<BlobId> = HashSet::new();
        let mut seen: HashSet<BlobId> = HashSet::new();
        let mut left_out = Vec::new();
        self.collect(s.snap.root, b"/", &mut need, &mut seen, &mut left_out, 0)?;
        for (path, why) in left_out {
            self.left_out.push(format!(
                "snapshot {}: {}: {why}; not copied",
                s.short(),
                String::from_utf8_lossy(&path)
            ));
        }
        // 2. Read them pack by pack, re-seal what the destination lacks.
        self.copy_data(&need)?;
        // 3. Trees, bottom-up.
        self.rewrite(s.snap.root, 0)
    }

    /// The data blobs of tree `tree` (at `path`) and below that the destination may lack, and
    /// the entries the trees left out (see [`SyncReport::left_out`]).
    fn collect(
        &self,
        tree: BlobId,
        path: &[u8],
        need: &mut HashSet<BlobId>,
        seen: &mut HashSet<BlobId>,
        left_out: &mut Vec<(Vec<u8>, &'static str)>,
        depth: usize,
    ) -> Result<()> {
        too_deep(depth)?;
        if self.trees.contains_key(&tree) || !seen.insert(tree) {
            return Ok(());
        }
        let t = self.src.load_tree(&tree)?;
        left_out.extend(t.rejected.iter().map(|r| (join(path, &r.name), r.why)));
        {
            let data = self.data.lock();
            let idx = self.src.index();
            for n in &t.nodes {
                for c in &n.content {
                    if !data.contains_key(c) {
                        if !idx.contains(c) {
                            return Err(Error::MissingBlob(c.hex()));
                        }
                        need.insert(*c);
                    }
                }
            }
        }
        for n in &t.nodes {
            if let (NodeKind::Dir, Some(sub)) = (n.kind, n.subtree) {
                self.collect(sub, &join(path, &n.name), need, seen, left_out, depth + 1)?;
            }
        }
        Ok(())
    }

    fn copy_data(&self, need: &HashSet<BlobId>) -> Result<()> {
        if need.is_empty() {
            return Ok(());
        }
        let ranges = plan_ranges(self.src, need.iter());
        let total: u64 = ranges
            .iter()
            .flat_map(|r| r.blobs.iter().map(|b| b.3 as u64))
            .sum();
        self.progress
            .total_bytes
            .fetch_add(total, Ordering::Relaxed);
        let next = AtomicUsize::new(0);
        let fatal: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|sc| {
            for _ in 0..self.workers.min(ranges.len()) {
                sc.spawn(|| {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(r) = ranges.get(k) else { break };
                        if fatal.lock().is_some() {
                            break;
                        }
                        if let Err(e) = self.copy_range(r) {
                            fatal.lock().get_or_insert(e);
                            break;
                        }
                    }
                });
            }
        });
        match fatal.into_inner() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn copy_range(&self, r: &super::restore::Range) -> Result<()> {
        let pack = self.src.index().pack_name(r.pack).to_string();
        let bytes = self
            .src
            .backend()
            .read_range(FileType::Pack, &pack, r.offset, r.length)?;
        if (bytes.len() as u64) < r.length {
            return Err(Error::damaged(
                FileType::Pack.path(&pack),
                "pack is shorter than its index says",
            ));
        }
        for &(id, off, len, raw) in &r.blobs {
            let sealed = &bytes[off as usize..(off + len as u64) as usize];
            let plain = self.src.decode_blob(&id, sealed, raw, &pack)?;
            let did = self.dst.crypto().blob_id(&plain);
            if !self.packer.claim(&did) {
                self.packer.add(BlobKind::Data, did, &plain)?;
            }
            self.data.lock().insert(id, did);
            self.blobs_read.fetch_add(1, Ordering::Relaxed);
            self.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
            self.progress.bytes.fetch_add(raw as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The destination id of source tree `id`, writing it (and its subtrees) if needed.
    fn rewrite(&mut self, id: BlobId, depth: usize) -> Result<BlobId> {
        if let Some(&d) = self.trees.get(&id) {
            return Ok(d);
        }
        too_deep(depth)?;
        let t = self.src.load_tree(&id)?;
        let mut nodes = t.nodes.clone();
        for n in &mut nodes {
            {
                let data = self.data.lock();
                for c in &mut n.content {
                    *c = *data.get(c).ok_or_else(|| {
                        Error::Other(format!("internal error: blob {} was not copied", c.hex()))
                    })?;
                }
            }
            if let Some(sub) = n.subtree {
                n.subtree = Some(self.rewrite(sub, depth + 1)?);
            }
        }
        let raw = Tree {
            nodes,
            ..Tree::default()
        }
        .encode();
        let did = self.dst.crypto().blob_id(&raw);
        if !self.packer.claim(&did) {
            self.packer.add(BlobKind::Tree, did, &raw)?;
        }
        self.trees.insert(id, did);
        Ok(did)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backup::{self, BackupOptions};
    use crate::store::repo::open_or_create_mem;
    use crate::store::restore::{self, RestoreOptions, RestoreProgress};
    use crate::store::{LocalDestination, LocalSource};

    fn tree(dir: &std::path::Path, seed: u8) {
        std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        std::fs::write(dir.join("a.txt"), b"hello").unwrap();
        std::fs::write(dir.join("sub/b.txt"), vec![seed; 10_000]).unwrap();
        let big: Vec<u8> = (0..2_500_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8 ^ seed)
            .collect();
        std::fs::write(dir.join("sub/deeper/big.bin"), big).unwrap();
        std::fs::write(dir.join("empty"), b"").unwrap();
    }

    fn backup(store: &Store, dir: &std::path::Path) -> String {
        let src = LocalSource::new(dir).unwrap();
        backup::run(store, &src, &BackupOptions::default(), &backup::progress())
            .unwrap()
            .id
    }

    fn restored(store: &Store, id: &str) -> tempfile::TempDir {
        let out = tempfile::tempdir().unwrap();
        let s = store.resolve_snapshot(id).unwrap();
        let dest = LocalDestination::new(out.path().join("r"));
        let rep = restore::run(
            store,
            &s,
            None,
            &dest,
            &RestoreOptions::default(),
            &RestoreProgress::default(),
        )
        .unwrap();
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
        out
    }

    fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                    out.push((rel, std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    fn sync(a: &Store, b: &Store) -> SyncReport {
        run(
            a,
            b,
            None,
            &SyncOptions::default(),
            &SyncProgress::default(),
        )
        .unwrap()
    }

    #[test]
    fn copies_between_encrypted_and_plaintext_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path(), 1);
        let a = open_or_create_mem(true);
        let b = open_or_create_mem(false);
        let first = backup(&a, dir.path());

        let r = sync(&a, &b);
        assert_eq!(r.copied.len(), 1);
        assert_eq!(r.present, 0);
        assert!(r.new_blobs > 0 && r.blobs_read > 0);
        let copy = &r.copied[0].1;
        assert_eq!(
            files(&restored(&a, &first).path().join("r")),
            files(&restored(&b, copy).path().join("r"))
        );
        let sa = a.resolve_snapshot(&first).unwrap().snap;
        let sb = b.resolve_snapshot(copy).unwrap().snap;
        assert_eq!(key(&sa), key(&sb));
        assert_ne!(sa.root, sb.root, "ids are keyed per store");
        let rep = crate::store::check::run(&b, None, false, &Default::default()).unwrap();
        assert!(rep.ok(), "{rep:?}");

        // Nothing to do the second time, in either direction.
        let again = sync(&a, &b);
        assert_eq!((again.copied.len(), again.present), (0, 1));
        assert_eq!((again.blobs_read, again.new_blobs), (0, 0));
        assert_eq!(sync(&b, &a).copied.len(), 0);
    }

    #[test]
    fn incremental_sync_reads_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path(), 2);
        let a = open_or_create_mem(true);
        let b = open_or_create_mem(true);
        backup(&a, dir.path());
        let r1 = sync(&a, &b);
        assert_eq!(r1.copied.len(), 1);

        // One small file changes: the next sync reads that one blob, not the big file.
        std::fs::write(dir.path().join("a.txt"), b"changed").unwrap();
        let second = backup(&a, dir.path());
        let r2 = sync(&a, &b);
        assert_eq!(r2.copied.len(), 1);
        assert_eq!(r2.blobs_read, 1, "{r2:?}");
        let copy = &r2.copied[0].1;
        assert_eq!(
            files(&restored(&a, &second).path().join("r")),
            files(&restored(&b, copy).path().join("r"))
        );
        // The copy's parent is the copy of the parent.
        let parent = b.resolve_snapshot(copy).unwrap().snap.parent;
        assert_eq!(parent.as_deref(), Some(r1.copied[0].1.as_str()));
    }

    #[test]
    fn selected_snapshots_and_both_ways() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        tree(d1.path(), 3);
        tree(d2.path(), 4);
        let a = open_or_create_mem(true);
        let b = open_or_create_mem(true);
        let s1 = backup(&a, d1.path());
        backup(&a, d2.path());
        let only = a.resolve_snapshot(&s1).unwrap();
        let r = run(
            &a,
            &b,
            Some(vec![only.clone(), only]),
            &SyncOptions::default(),
            &SyncProgress::default(),
        )
        .unwrap();
        assert_eq!(r.copied.len(), 1);
        assert_eq!(r.copied[0].0, s1);
        // b gets its own backup; then both ways leaves both with all three.
        let d3 = tempfile::tempdir().unwrap();
        tree(d3.path(), 5);
        backup(&b, d3.path());
        let mut r = sync(&a, &b);
        r.merge(sync(&b, &a));
        assert_eq!(r.copied.len(), 2);
        assert_eq!(a.snapshots().unwrap().0.len(), 3);
        assert_eq!(b.snapshots().unwrap().0.len(), 3);
        assert_eq!(sync(&a, &b).copied.len() + sync(&b, &a).copied.len(), 0);
    }

    #[test]
    fn interrupted_sync_leaves_a_consistent_store_and_a_rerun_completes() {
        use crate::store::check::{self, CheckProgress};

        let dir = tempfile::tempdir().unwrap();
        tree(dir.path(), 9);
        let a = open_or_create_mem(true);
        let first = backup(&a, dir.path());
        let b = open_or_create_mem(true);
        let clean = |s: &Store| {
            let rep = check::run(s, None, false, &CheckProgress::default()).unwrap();
            assert!(rep.ok(), "{rep:?}");
        };
        // The state a sync cut off after uploading its packs leaves: the packs, but neither
        // the index files nor the snapshot, which are written after them.
        assert_eq!(sync(&a, &b).copied.len(), 1);
        let backend = b.backend().clone();
        for t in [FileType::Snapshot, FileType::Index] {
            for f in backend.list(t).unwrap() {
                backend.remove(t, &f.name).unwrap();
            }
        }
        let pass = |_: bool| Ok(b"test".to_vec());
        let b = Store::open(backend, &pass).unwrap();
        assert!(b.snapshots().unwrap().0.is_empty());
        assert!(!b.index_report().recovered_packs.is_empty());
        clean(&b);

        // A re-run (a new process) completes, reusing every blob already uploaded.
        let r = sync(&a, &b);
        assert_eq!(r.copied.len(), 1);
        assert_eq!(r.new_blobs, 0, "{r:?}");
        clean(&b);
        assert_eq!(
            files(&restored(&a, &first).path().join("r")),
            files(&restored(&b, &r.copied[0].1).path().join("r"))
        );
    }

    #[test]
    fn same_store_is_refused() {
        let a = open_or_create_mem(false);
        let err = run(
            &a,
            &a,
            None,
            &SyncOptions::default(),
            &SyncProgress::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("same store"), "{err}");
    }
}
