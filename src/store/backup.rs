//! The backup pipeline: source tree → snapshot.
//!
//! One thread walks the source (readdir + lstat, names sorted) and builds the directory
//! structure in memory. Every regular file whose size, mtime, ctime and inode differ from the
//! same path in the parent snapshot becomes a job on a bounded channel; a pool of workers (one
//! per core, plus one to cover I/O waits) reads each file, cuts it into FastCDC chunks, hashes
//! them with the store's id key, and hands new chunks to the [`Packer`], which compresses,
//! seals and uploads packs. Unchanged files reuse the parent's chunk list without being read.
//! When the walk and all jobs are done, tree blobs are built bottom-up and the snapshot file is
//! written last. Memory is bounded by the channel (paths only), one chunking buffer per worker
//! and two pack buffers.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::bounded;
use fastcdc::v2020::{FastCDC, Normalization, StreamCDC};
use parking_lot::Mutex;

use super::crypto::BlobId;
use super::error::{Error, Result};
use super::format::{BlobKind, ChunkerParams, Snapshot, SnapshotStats};
use super::repo::{Packer, SnapshotEntry, Store};
use super::source::Source;
use super::tree::{Node, NodeKind, Tree, components, join};

/// What to back up and how.
#[derive(Default)]
pub struct BackupOptions {
    pub tags: Vec<String>,
    /// Paths to leave out, matched against full paths and base names.
    pub exclude: Option<globset::GlobSet>,
    /// Number of worker threads (0: one per core plus one).
    pub workers: usize,
    /// Do not look for a parent snapshot: read every file.
    pub no_parent: bool,
}

/// Progress counters, readable while a backup runs.
#[derive(Default)]
pub struct Progress {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub total_files: AtomicU64,
    pub total_bytes: AtomicU64,
}

/// The outcome of a backup.
#[derive(Debug)]
pub struct BackupResult {
    pub id: String,
    pub snapshot: Snapshot,
}

enum Item {
    Done(Node),
    /// A file waiting for its job's chunk list.
    File(Node, usize),
    Dir(Box<PendingDir>),
}

struct PendingDir {
    node: Node,
    items: Vec<Item>,
}

/// A finished job: the chunk list, or the path and reason it could not be read.
type JobOutcome = Result<JobResult, (Vec<u8>, String)>;

struct Job {
    id: usize,
    path: Vec<u8>,
    size: u64,
}

#[derive(Default)]
struct JobResult {
    content: Vec<BlobId>,
    size: u64,
}

/// Why a file job failed: a source file that cannot be read only loses that file; a store
/// that cannot be written to ends the backup.
enum JobError {
    Source(Error),
    Store(Error),
}

/// A directory's entries, or why they could not be read.
type Listing = Result<Vec<Node>>;

/// Lists directories ahead of the walk on a few threads.
///
/// The walk stays a simple depth-first recursion on one thread (it owns the tree being built);
/// it asks the lister for each subdirectory as soon as it sees it and takes the result when it
/// gets there, waiting only if that listing is still in flight.
struct Lister {
    slots: Mutex<std::collections::HashMap<Vec<u8>, Option<Listing>>>,
    ready: parking_lot::Condvar,
    tx: Mutex<Option<crossbeam_channel::Sender<Vec<u8>>>>,
}

/// Directories listed ahead of the walk at most; beyond that the walk lists them itself.
const LIST_AHEAD: usize = 4096;

impl Lister {
    fn request(&self, path: Vec<u8>) {
        let mut slots = self.slots.lock();
        if slots.len() >= LIST_AHEAD || slots.contains_key(&path) {
            return;
        }
        slots.insert(path.clone(), None);
        drop(slots);
        let sent = match &*self.tx.lock() {
            Some(tx) => tx.try_send(path.clone()).is_ok(),
            None => false,
        };
        if !sent {
            self.slots.lock().remove(&path);
        }
    }

    /// No more requests: the listing threads finish what is queued and end.
    fn close(&self) {
        self.tx.lock().take();
    }

    fn take(&self, path: &[u8]) -> Option<Listing> {
        let mut slots = self.slots.lock();
        loop {
            match slots.get(path) {
                None => return None,
                Some(Some(_)) => return slots.remove(path).flatten(),
                Some(None) => self.ready.wait(&mut slots),
            }
        }
    }

    fn run(&self, source: &dyn Source, rx: crossbeam_channel::Receiver<Vec<u8>>) {
        for path in rx.iter() {
            let r = source.read_dir(&path);
            let mut slots = self.slots.lock();
            if let Some(slot) = slots.get_mut(&path) {
                *slot = Some(r);
            }
            drop(slots);
            self.ready.notify_all();
        }
    }
}

struct Walker<'a> {
    lister: &'a Lister,
    store: &'a Store,
    source: &'a dyn Source,
    opts: &'a BackupOptions,
    tx: crossbeam_channel::Sender<Job>,
    jobs: usize,
    errors: Vec<(Vec<u8>, String)>,
    stats: SnapshotStats,
    progress: &'a Progress,
    has_inodes: bool,
}

/// Is `n` unchanged since `old` was backed up, so its chunk list can be reused?
fn unchanged(n: &Node, old: &Node, has_inodes: bool) -> bool {
    old.kind == NodeKind::File
        && n.size == old.size
        && n.mtime == old.mtime
        && (!has_inodes || (n.ctime == old.ctime && n.inode == old.inode))
        && (old.size == 0 || !old.content.is_empty())
}

impl Walker<'_> {
    fn excluded(&self, path: &[u8], name: &[u8]) -> bool {
        match &self.opts.exclude {
            Some(g) => {
                let p = std::ffi::OsStr::from_bytes(path);
                let n = std::ffi::OsStr::from_bytes(name);
                g.is_match(p) || g.is_match(n)
            }
            None => false,
        }
    }

    fn walk_dir(&mut self, path: &[u8], node: Node, parent: Option<&Tree>) -> PendingDir {
        let listed = match self.lister.take(path) {
            Some(r) => r,
            None => self.source.read_dir(path),
        };
        let mut entries = match listed {
            Ok(e) => e,
            Err(e) => {
                self.errors.push((path.to_vec(), e.to_string()));
                Vec::new()
            }
        };
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        // List the subdirectories ahead on the lister's threads, in the order the walk will
        // reach them, so metadata reads (cold caches, remote round trips) overlap.
        for n in entries.iter().filter(|n| n.kind == NodeKind::Dir) {
            let full = join(path, &n.name);
            if !self.excluded(&full, &n.name) {
                self.lister.request(full);
            }
        }
        let mut items = Vec::with_capacity(entries.len());
        for n in entries {
            let full = join(path, &n.name);
            if self.excluded(&full, &n.name) {
                continue;
            }
            let old = parent.and_then(|t| t.find(&n.name));
            items.push(self.item(full, n, old));
        }
        PendingDir { node, items }
    }

    fn item(&mut self, full: Vec<u8>, mut n: Node, old: Option<&Node>) -> Item {
        match n.kind {
            NodeKind::Dir => {
                self.stats.dirs += 1;
                let old_tree = old
                    .filter(|o| o.kind == NodeKind::Dir)
                    .and_then(|o| o.subtree)
                    .and_then(|id| self.store.load_tree(&id).ok());
                let d = self.walk_dir(&full, n, old_tree.as_deref());
                Item::Dir(Box::new(d))
            }
            NodeKind::File => {
                self.stats.files += 1;
                self.stats.bytes += n.size;
                self.progress.total_files.fetch_add(1, Ordering::Relaxed);
                self.progress
                    .total_bytes
                    .fetch_add(n.size, Ordering::Relaxed);
                if let Some(o) = old.filter(|o| unchanged(&n, o, self.has_inodes)) {
                    n.content = o.content.clone();
                    self.progress.files.fetch_add(1, Ordering::Relaxed);
                    self.progress.bytes.fetch_add(n.size, Ordering::Relaxed);
                    return Item::Done(n);
                }
                let id = self.jobs;
                self.jobs += 1;
                // A send only fails when every worker has died, which `run` reports.
                let _ = self.tx.send(Job {
                    id,
                    path: full,
                    size: n.size,
                });
                Item::File(n, id)
            }
            _ => {
                self.stats.others += 1;
                Item::Done(n)
            }
        }
    }
}

use std::os::unix::ffi::OsStrExt;

/// Largest file read whole into memory and chunked from a slice; bigger ones are streamed.
const SLICE_LIMIT: u64 = 4 << 20;

fn chunk_file(
    store: &Store,
    packer: &Packer,
    source: &dyn Source,
    path: &[u8],
    size: u64,
    buf: &mut Vec<u8>,
    progress: &Progress,
) -> Result<JobResult, JobError> {
    let cp: ChunkerParams = store.config().chunker;
    let seed = store.crypto().keys().chunker_seed;
    let mut reader = source.open(path, size).map_err(JobError::Source)?;
    let mut res = JobResult::default();
    let pathname = || String::from_utf8_lossy(path).into_owned();
    let mut handle = |data: &[u8]| -> Result<(), JobError> {
        let id = store.crypto().blob_id(data);
        if !packer.claim(&id) {
            packer
                .add(BlobKind::Data, id, data)
                .map_err(JobError::Store)?;
        }
        res.content.push(id);
        res.size += data.len() as u64;
        progress
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        progress
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    };
    // Read up to SLICE_LIMIT bytes; if the file ends there, chunk the slice.
    buf.clear();
    (&mut reader)
        .take(SLICE_LIMIT + 1)
        .read_to_end(buf)
        .map_err(|e| JobError::Source(Error::io(pathname(), e)))?;
    if buf.len() as u64 <= SLICE_LIMIT {
        if buf.is_empty() {
            return Ok(res);
        }
        for c in FastCDC::with_level_and_seed(
            buf,
            cp.min as usize,
            cp.avg as usize,
            cp.max as usize,
            Normalization::Level1,
            seed,
        ) {
            handle(&buf[c.offset..c.offset + c.length])?;
        }
        return Ok(res);
    }
    let head = std::io::Cursor::new(std::mem::take(buf));
    let stream = StreamCDC::with_level_and_seed(
        head.chain(reader),
        cp.min as usize,
        cp.avg as usize,
        cp.max as usize,
        Normalization::Level1,
        seed,
    );
    for c in stream {
        let c = c.map_err(|e| {
            JobError::Source(match e {
                fastcdc::v2020::Error::IoError(e) => Error::io(pathname(), e),
                other => Error::Other(format!("{}: {other}", pathname())),
            })
        })?;
        handle(&c.data)?;
    }
    Ok(res)
}

/// Run a backup of `source` into `store`.
pub fn run(
    store: &Store,
    source: &dyn Source,
    opts: &BackupOptions,
    progress: &Progress,
) -> Result<BackupResult> {
    let started = Instant::now();
    let root_path = source.root();
    let describe = source.describe();
    let host = super::hostname();
    let root_node = source.stat(&root_path)?;

    let parent: Option<SnapshotEntry> = if opts.no_parent {
        None
    } else {
        let (snaps, _) = store.snapshots()?;
        snaps
            .into_iter()
            .rev()
            .find(|s| s.snap.source == describe && s.snap.host == host)
    };
    let parent_node = parent
        .as_ref()
        .and_then(|p| store.lookup(p, &root_path).ok());

    let workers = if opts.workers > 0 {
        opts.workers
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
    };
    let packer = Packer::new(store);
    let (tx, rx) = bounded::<Job>(1024);
    let results: Mutex<Vec<Option<JobOutcome>>> = Mutex::new(Vec::new());
    let fatal: Mutex<Option<Error>> = Mutex::new(None);

    let (list_tx, list_rx) = bounded::<Vec<u8>>(LIST_AHEAD);
    let lister = Lister {
        slots: Mutex::new(std::collections::HashMap::new()),
        ready: parking_lot::Condvar::new(),
        tx: Mutex::new(Some(list_tx)),
    };
    let (root_item, mut errors, mut stats) = std::thread::scope(|s| {
        // Listing threads: a few, as listing is latency-bound (disk or network), not CPU-bound.
        for _ in 0..4 {
            let rx = list_rx.clone();
            let lister = &lister;
            s.spawn(move || lister.run(source, rx));
        }
        drop(list_rx);
        for _ in 0..workers {
            let rx = rx.clone();
            let packer = &packer;
            let results = &results;
            let fatal = &fatal;
            s.spawn(move || {
                let mut buf = Vec::new();
                for job in rx.iter() {
                    if fatal.lock().is_some() {
                        continue;
                    }
                    let r = chunk_file(
                        store, packer, source, &job.path, job.size, &mut buf, progress,
                    );
                    if buf.capacity() > (SLICE_LIMIT as usize) * 2 {
                        buf = Vec::new();
                    }
                    progress.files.fetch_add(1, Ordering::Relaxed);
                    let r = match r {
                        Ok(r) => Some(Ok(r)),
                        Err(JobError::Source(e)) => Some(Err((job.path, e.to_string()))),
                        Err(JobError::Store(e)) => {
                            fatal.lock().get_or_insert(e);
                            None
                        }
                    };
                    let mut res = results.lock();
                    if res.len() <= job.id {
                        res.resize_with(job.id + 1, || None);
                    }
                    res[job.id] = r;
                }
            });
        }
        drop(rx);
        let mut w = Walker {
            lister: &lister,
            store,
            source,
            opts,
            tx,
            jobs: 0,
            errors: Vec::new(),
            stats: SnapshotStats::default(),
            progress,
            has_inodes: source.has_inodes(),
        };
        let item = {
            let parent_tree = parent_node
                .as_ref()
                .filter(|n| n.kind == NodeKind::Dir)
                .and_then(|n| n.subtree)
                .and_then(|id| store.load_tree(&id).ok());
            match root_node.kind {
                NodeKind::Dir => Item::Dir(Box::new(w.walk_dir(
                    &root_path,
                    root_node,
                    parent_tree.as_deref(),
                ))),
                _ => {
                    let n = root_node;
                    w.item(root_path.clone(), n, parent_node.as_ref())
                }
            }
        };
        let Walker {
            errors, stats, tx, ..
        } = w;
        drop(tx);
        lister.close();
        (item, errors, stats)
    });
    if let Some(e) = fatal.into_inner() {
        return Err(e);
    }
    let mut results = results.into_inner();

    // Build the trees bottom-up.
    let mut builder = TreeBuilder {
        store,
        packer: &packer,
        results: &mut results,
        errors: &mut errors,
        stats: &mut stats,
    };
    let root_node = builder.finish_item(root_item)?;
    let Some(mut node) = root_node else {
        return Err(Error::Other(format!(
            "{}: cannot read it: {}",
            describe,
            errors.first().map(|e| e.1.clone()).unwrap_or_default()
        )));
    };

    // Wrap the source in its ancestors so the snapshot holds it at its absolute path.
    let comps: Vec<Vec<u8>> = components(&root_path).iter().map(|c| c.to_vec()).collect();
    for i in (0..comps.len()).rev() {
        let parent_path = {
            let mut p = Vec::new();
            for c in &comps[..i] {
                p.push(b'/');
                p.extend_from_slice(c);
            }
            if p.is_empty() {
                p.push(b'/');
            }
            p
        };
        let mut t = Tree { nodes: vec![node] };
        t.sort();
        let id = builder.write_tree(&t)?;
        if i == 0 {
            node = Node::new(Vec::new(), NodeKind::Dir);
            node.subtree = Some(id);
            break;
        }
        let mut pn = source
            .stat(&parent_path)
            .unwrap_or_else(|_| Node::new(comps[i - 1].clone(), NodeKind::Dir));
        pn.name = comps[i - 1].clone();
        pn.kind = NodeKind::Dir;
        pn.subtree = Some(id);
        node = pn;
    }
    let root = if comps.is_empty() {
        // Backing up `/` itself.
        node.subtree
            .ok_or_else(|| Error::Other("/ is not a directory".into()))?
    } else {
        node.subtree.expect("wrapped in a directory")
    };
    packer.finish()?;
    stats.bytes_read = progress.bytes_read.load(Ordering::Relaxed);
    stats.new_blobs = packer.new_blobs.load(Ordering::Relaxed);
    stats.new_bytes = packer.new_bytes.load(Ordering::Relaxed);
    let now = super::now_ns();
    let snapshot = Snapshot {
        time: super::tree::Time {
            sec: now.div_euclid(1_000_000_000),
            nsec: now.rem_euclid(1_000_000_000) as u32,
        },
        host,
        user: super::username(),
        source: describe,
        path: root_path,
        tags: opts.tags.clone(),
        root,
        parent: parent.map(|p| p.id),
        stats,
        errors,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let id = store.write_snapshot(&snapshot)?;
    Ok(BackupResult { id, snapshot })
}

struct TreeBuilder<'a, 'b> {
    store: &'a Store,
    packer: &'a Packer<'b>,
    results: &'a mut Vec<Option<JobOutcome>>,
    errors: &'a mut Vec<(Vec<u8>, String)>,
    stats: &'a mut SnapshotStats,
}

impl TreeBuilder<'_, '_> {
    fn write_tree(&mut self, t: &Tree) -> Result<BlobId> {
        let data = t.encode();
        let id = self.store.crypto().blob_id(&data);
        if !self.packer.claim(&id) {
            self.packer.add(BlobKind::Tree, id, &data)?;
        }
        Ok(id)
    }

    /// Turn a walked item into its final node; `None` if it could not be read.
    fn finish_item(&mut self, item: Item) -> Result<Option<Node>> {
        match item {
            Item::Done(n) => Ok(Some(n)),
            Item::File(mut n, job) => {
                let r = self.results.get_mut(job).and_then(|r| r.take());
                match r {
                    Some(Ok(r)) => {
                        if r.size != n.size {
                            // The file changed while it was read: record what was read.
                            self.stats.bytes = self.stats.bytes - n.size + r.size;
                            n.size = r.size;
                        }
                        n.content = r.content;
                        Ok(Some(n))
                    }
                    Some(Err((path, e))) => {
                        self.errors.push((path, e));
                        self.stats.files -= 1;
                        self.stats.bytes -= n.size;
                        Ok(None)
                    }
                    None => Err(Error::Other("internal error: a backup job was lost".into())),
                }
            }
            Item::Dir(d) => {
                let PendingDir { mut node, items } = *d;
                let mut t = Tree::default();
                for it in items {
                    if let Some(n) = self.finish_item(it)? {
                        t.nodes.push(n);
                    }
                }
                t.sort();
                node.subtree = Some(self.write_tree(&t)?);
                Ok(Some(node))
            }
        }
    }
}

/// Parse exclude patterns into a matcher. A pattern matches a whole path when it contains `/`
/// and a base name otherwise.
pub fn exclude_set(patterns: &[String]) -> Result<Option<globset::GlobSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        let g = globset::GlobBuilder::new(p)
            .literal_separator(p.contains('/'))
            .build()
            .map_err(|e| Error::Other(format!("bad exclude pattern {p:?}: {e}")))?;
        b.add(g);
    }
    Ok(Some(b.build().map_err(|e| Error::Other(e.to_string()))?))
}

/// For tests: a shared counter set.
pub fn progress() -> Arc<Progress> {
    Arc::new(Progress::default())
}
