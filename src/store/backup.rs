//! The backup pipeline: source tree → snapshot.
//!
//! One thread walks the source (readdir + lstat, names sorted), depth first. Every regular file whose size, mtime, ctime and inode differ from the
//! same path in the parent snapshot becomes a job on a bounded channel; a pool of workers (one
//! per core, plus one to cover I/O waits) reads each file, cuts it into FastCDC chunks, hashes
//! them with the store's id key, and hands new chunks to the [`Packer`], which compresses,
//! seals and uploads packs. Unchanged files reuse the parent's chunk list without being read.
//! A walked directory waits in a queue until its files' jobs are done, then its tree blob is
//! written (children before parents, so bottom-up as the walk goes); the snapshot file is
//! written last. Memory is bounded by the channel (paths only), the queue of walked
//! directories (`MAX_PENDING_ENTRIES`), the directories being walked (the widest directory
//! times the depth, at most), one chunking buffer per worker and two pack buffers: not by the
//! number of files.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::bounded;
use fastcdc::v2020::{FastCDC, Normalization};
use parking_lot::Mutex;

use super::crypto::BlobId;
use super::dirfd::MAX_DEPTH;
use super::error::{Error, ErrorKind, Result};
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
    /// A walked subdirectory, finished (or to be finished) in [`Walker::pending`] order; its
    /// node is then in [`Walker::finished`] under `slot`.
    Sub {
        slot: usize,
        /// Its [`PendingDir::reuse`].
        reuse: Option<BlobId>,
        /// Equal to the parent snapshot's entry (its tree aside, compared when finished).
        equal: bool,
    },
}

struct PendingDir {
    node: Node,
    items: Vec<Item>,
    /// The parent snapshot's tree id for this directory, if every entry came out equal to the
    /// parent's (subdirectories still to be finished the same way): the tree is then that one,
    /// and is not encoded and hashed again.
    reuse: Option<BlobId>,
    /// The last job sent while this directory was walked (its own files or its
    /// subdirectories').
    last_job: Option<usize>,
}

/// A walked directory is finished (its tree written) once the workers are this many jobs past
/// its last one, or at once when its files needed no job: the walk is never held up by
/// directories whose files are still being read, and never holds more than about this many
/// files' results.
const FINISH_LAG: usize = 2048;

/// Entries of walked directories waiting to be finished, at most, before the walk waits for the
/// oldest one's jobs: what bounds the walk's memory, with the widest directory times the depth
/// (the directories being walked), whatever the number of files.
const MAX_PENDING_ENTRIES: usize = 32_768;

/// Finished jobs, by job id, until their directory is finished.
#[derive(Default)]
struct Results {
    done: Mutex<std::collections::HashMap<usize, Option<JobOutcome>>>,
    ready: parking_lot::Condvar,
}

/// A finished job: the chunk list, or the path and reason it could not be read.
type JobOutcome = Result<JobResult, (Vec<u8>, String)>;

struct Job {
    id: usize,
    path: Vec<u8>,
    /// The file as the walk saw it (without content).
    seen: Node,
}

/// Files whose first bytes are asked of the source ahead of the workers, at most.
///
/// Workers read each file with blocking calls; on a cold cache a small file is a random disk
/// read, and a first backup of /usr/share had both cores waiting on the disk 12% of the time
/// with 3 workers (more workers: less waiting but no faster, and more memory). The files the
/// workers are about to read are instead requested ahead with [`Source::prefetch`].
pub(crate) const PREFETCH_FILES: usize = 128;
/// Bytes of one file requested ahead at most: the kernel's own readahead follows a reader
/// through a large file.
const PREFETCH_BYTES: u64 = 1 << 20;

/// How far the workers have got: the number of jobs taken, and the workers still running.
#[derive(Default)]
struct Taken {
    state: Mutex<(usize, usize)>,
    moved: parking_lot::Condvar,
}

impl Taken {
    fn take(&self, id: usize) {
        let mut st = self.state.lock();
        st.0 = st.0.max(id + 1);
        drop(st);
        self.moved.notify_all();
    }

    /// Wait until job `id` is at most [`PREFETCH_FILES`] ahead of the workers: `Some(true)`
    /// then, `Some(false)` if a worker has taken it already (too late to ask for it ahead),
    /// `None` if no worker is left to take it.
    fn wait_near(&self, id: usize) -> Option<bool> {
        let mut st = self.state.lock();
        while id >= st.0 + PREFETCH_FILES {
            if st.1 == 0 {
                return None;
            }
            self.moved.wait(&mut st);
        }
        Some(id >= st.0)
    }
}

/// Counts a worker out of [`Taken`] however it ends.
struct Working<'a>(&'a Taken);

impl<'a> Working<'a> {
    fn start(t: &'a Taken) -> Self {
        t.state.lock().1 += 1;
        Working(t)
    }
}

impl Drop for Working<'_> {
    fn drop(&mut self) {
        self.0.state.lock().1 -= 1;
        self.0.moved.notify_all();
    }
}

#[derive(Default)]
struct JobResult {
    content: Vec<BlobId>,
    size: u64,
    /// The file's state when it was read, when it had changed since the walk saw it.
    node: Option<Node>,
    /// The file's path and why its content may not be one state of it (it kept changing
    /// while it was read).
    warning: Option<(Vec<u8>, String)>,
}

/// Why a file job failed: a source file that cannot be read only loses that file; a store
/// that cannot be written to ends the backup.
enum JobError {
    Source(Error),
    Store(Error),
}

/// A directory's entries, or why they could not be read.
type Listing = Result<Vec<Node>>;

/// Which entries of a listing, in the source's order, the walk may act on (`tree::screen`).
fn screen(entries: &[Node]) -> Vec<Option<&'static str>> {
    super::tree::screen(entries.iter().map(|n| &n.name[..]))
}

/// Does this error mean the source itself is gone (not one unreadable entry)?
fn source_lost(e: &Error) -> bool {
    e.kind() == ErrorKind::Unreachable
}

/// Is `path` (whose last component is `name`) left out by the exclude patterns?
fn is_excluded(exclude: Option<&globset::GlobSet>, path: &[u8], name: &[u8]) -> bool {
    exclude.is_some_and(|g| {
        g.is_match(std::ffi::OsStr::from_bytes(path))
            || g.is_match(std::ffi::OsStr::from_bytes(name))
    })
}

/// Lists directories ahead of the walk on a few threads.
///
/// The walk stays a simple depth-first recursion on one thread (it owns the tree being built)
/// and takes each directory's listing from here, waiting only if it is still in flight. The
/// lister explores on its own from the root, depth first (a stack, so the walk's next
/// directories come first), so it can start before the store is open: with a cold page cache
/// most of an unchanged backup is the kernel reading inodes, and this overlaps it with the
/// SSH login and the key derivation. At most `LIST_AHEAD` listings are held; past that the
/// walk lists directories itself and the lister follows its requests.
pub struct Lister<'s> {
    source: &'s dyn Source,
    exclude: Option<&'s globset::GlobSet>,
    state: Mutex<ListerState>,
    /// A listing finished.
    ready: parking_lot::Condvar,
    /// Work was queued, or the lister was closed.
    work: parking_lot::Condvar,
    /// The source's root and the directories above it, looked at while the store opens
    /// ([`with_lister`]); taken by the first walk.
    ancestry: Mutex<Ancestry>,
    ancestry_ready: parking_lot::Condvar,
}

/// [`Lister::ancestry`]'s state.
enum Ancestry {
    NotAsked,
    Asked,
    Ready(Vec<Result<Node>>),
}

/// The source's root and the directories above it, up to the one below `/` (none for `/`).
fn ancestry(root: &[u8]) -> Vec<Vec<u8>> {
    let comps = components(root);
    (1..=comps.len())
        .rev()
        .map(|i| {
            let mut p = Vec::new();
            for c in &comps[..i] {
                p.push(b'/');
                p.extend_from_slice(c);
            }
            p
        })
        .collect()
}

#[derive(Default)]
struct ListerState {
    /// Requested directories: `None` while queued or in flight.
    slots: std::collections::HashMap<Vec<u8>, Option<Listing>>,
    /// Directories to list, the next one last.
    stack: Vec<Vec<u8>>,
    /// Entries in the listings held.
    held: usize,
    closed: bool,
}

/// Directories listed ahead of the walk at most; beyond that the walk lists them itself.
const LIST_AHEAD: usize = 4096;
/// Entries held in listings made ahead of the walk, at most (past it the listing threads wait,
/// and the walk lists what is still queued itself): a thousand directories of a thousand
/// files would otherwise be a million nodes held.
const LIST_AHEAD_ENTRIES: usize = 32_768;

/// Entries of the parent snapshot's trees read at most to find the directories a remote
/// source's listings start with ([`Lister::request_known`]).
const KNOWN_AHEAD_ENTRIES: usize = 65_536;

/// Threads listing directories: listing is latency-bound (disk or network), not CPU-bound.
pub const LISTER_THREADS: usize = 4;

impl<'s> Lister<'s> {
    pub fn new(source: &'s dyn Source, exclude: Option<&'s globset::GlobSet>) -> Self {
        Lister {
            source,
            exclude,
            state: Mutex::new(ListerState::default()),
            ready: parking_lot::Condvar::new(),
            work: parking_lot::Condvar::new(),
            ancestry: Mutex::new(Ancestry::NotAsked),
            ancestry_ready: parking_lot::Condvar::new(),
        }
    }

    /// Look at the source's root and the directories above it, all at once (for a remote
    /// source, one round trip where one after another took one each), for
    /// [`Lister::ancestry`]. [`Lister::ask_ancestry`] first.
    fn stat_ancestry(&self) {
        /// Should the source panic, the walk waiting for the answer looks again itself.
        struct Answered<'a, 'b>(&'a Lister<'b>);
        impl Drop for Answered<'_, '_> {
            fn drop(&mut self) {
                let mut a = self.0.ancestry.lock();
                if matches!(*a, Ancestry::Asked) {
                    *a = Ancestry::NotAsked;
                }
                drop(a);
                self.0.ancestry_ready.notify_all();
            }
        }
        let answered = Answered(self);
        let stats = self.source.stat_many(&ancestry(&self.source.root()));
        *self.ancestry.lock() = Ancestry::Ready(stats);
        drop(answered);
    }

    /// [`Lister::stat_ancestry`] is on its way: [`Lister::ancestry`] waits for it.
    fn ask_ancestry(&self) {
        *self.ancestry.lock() = Ancestry::Asked;
    }

    /// What [`Lister::stat_ancestry`] found, once (a later walk looks again itself): the
    /// root's node, then its parent's, and so on up to the directory below `/`.
    fn ancestry(&self) -> Vec<Result<Node>> {
        let mut a = self.ancestry.lock();
        loop {
            match std::mem::replace(&mut *a, Ancestry::NotAsked) {
                Ancestry::Ready(stats) => return stats,
                Ancestry::Asked => {
                    *a = Ancestry::Asked;
                    self.ancestry_ready.wait(&mut a);
                }
                Ancestry::NotAsked => {
                    drop(a);
                    return self.source.stat_many(&ancestry(&self.source.root()));
                }
            }
        }
    }

    /// Queue `path` for listing (if there is room and it is not queued already).
    pub fn request(&self, path: Vec<u8>) {
        let mut st = self.state.lock();
        Self::push(&mut st, path);
        drop(st);
        self.work.notify_one();
    }

    fn push(st: &mut ListerState, path: Vec<u8>) -> bool {
        if st.closed || st.slots.len() >= LIST_AHEAD || st.slots.contains_key(&path) {
            return false;
        }
        st.slots.insert(path.clone(), None);
        st.stack.push(path);
        true
    }

    /// Queue the directories the parent snapshot had below `path` (`node` its directory
    /// there) and not excluded, for listing in the order the walk will reach them: a remote
    /// source then lists them all at once instead of a level at a time, each level two
    /// round trips after the one above (/usr/share/man's four levels took eight at 100 ms).
    /// Reads at most `KNOWN_AHEAD_ENTRIES` (65,536) entries of the parent's trees; a directory gone
    /// since is listed for nothing (its error is never taken).
    pub fn request_known(&self, store: &Store, path: &[u8], node: &Node) {
        let mut order = Vec::new();
        let mut read = 0;
        let mut todo = vec![(path.to_vec(), node.subtree)];
        while let Some((p, id)) = todo.pop() {
            let Some(id) = id else { continue };
            let Ok(tree) = store.load_tree(&id) else {
                continue;
            };
            read += tree.nodes.len();
            if read > KNOWN_AHEAD_ENTRIES {
                break;
            }
            // Children pushed last first, so the first pops first: the walk's order.
            for n in tree.nodes.iter().rev() {
                if n.kind != NodeKind::Dir {
                    continue;
                }
                let full = join(&p, &n.name);
                if !is_excluded(self.exclude, &full, &n.name) {
                    todo.push((full, n.subtree));
                }
            }
            if p != path {
                order.push(p);
            }
        }
        let mut st = self.state.lock();
        let mut queued = false;
        for p in order.into_iter().rev() {
            queued |= Self::push(&mut st, p);
        }
        drop(st);
        if queued {
            self.work.notify_all();
        }
    }

    /// No more work: the listing threads end after the listing in hand; queued directories
    /// are dropped (the walk lists them itself if it still needs them).
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        for p in std::mem::take(&mut st.stack) {
            st.slots.remove(&p);
        }
        drop(st);
        self.work.notify_all();
        self.ready.notify_all();
    }

    fn take(&self, path: &[u8]) -> Option<Listing> {
        let mut st = self.state.lock();
        loop {
            match st.slots.get(path) {
                None => return None,
                Some(Some(_)) => {
                    let r = st.slots.remove(path).flatten();
                    if let Some(Ok(e)) = &r {
                        st.held -= e.len();
                    }
                    drop(st);
                    // Room for more listings ahead.
                    self.work.notify_all();
                    return r;
                }
                Some(None) => {
                    // Still queued while the listers wait for room: the walk lists it itself.
                    // (Checked again every few milliseconds, as the room may run out while
                    // the walk waits; one in flight is always finished.)
                    if st.held >= LIST_AHEAD_ENTRIES
                        && let Some(at) = st.stack.iter().rposition(|p| p == path)
                    {
                        st.stack.remove(at);
                        st.slots.remove(path);
                        return None;
                    }
                    self.ready
                        .wait_for(&mut st, std::time::Duration::from_millis(20));
                }
            }
        }
    }

    /// The body of a listing thread: until [`Lister::close`].
    pub fn run(&self) {
        loop {
            let path = {
                let mut st = self.state.lock();
                loop {
                    if st.held < LIST_AHEAD_ENTRIES
                        && let Some(p) = st.stack.pop()
                    {
                        break p;
                    }
                    if st.closed {
                        return;
                    }
                    self.work.wait(&mut st);
                }
            };
            let r = self.source.read_dir(&path);
            let mut subdirs: Vec<Vec<u8>> = match &r {
                Ok(entries) => entries
                    .iter()
                    .zip(screen(entries))
                    .filter(|(_, why)| why.is_none())
                    .map(|(n, _)| n)
                    .filter(|n| n.kind == NodeKind::Dir)
                    .map(|n| (join(&path, &n.name), &n.name))
                    .filter(|(full, name)| !is_excluded(self.exclude, full, name))
                    .map(|(full, _)| full)
                    .collect(),
                Err(_) => Vec::new(),
            };
            // The walk goes through names in order: the first subdirectory goes on top.
            subdirs.sort_unstable_by(|a, b| b.cmp(a));
            let mut st = self.state.lock();
            let n = r.as_ref().map_or(0, |e| e.len());
            if let Some(slot) = st.slots.get_mut(&path) {
                *slot = Some(r);
                st.held += n;
            }
            let mut queued = false;
            for d in subdirs {
                queued |= Self::push(&mut st, d);
            }
            drop(st);
            self.ready.notify_all();
            if queued {
                self.work.notify_all();
            }
        }
    }
}

struct Walker<'a> {
    lister: &'a Lister<'a>,
    store: &'a Store,
    packer: &'a Packer<'a>,
    results: &'a Results,
    taken: &'a Taken,
    /// Walked directories not finished yet, children before their parents, with their
    /// slots; and their entries in all.
    pending: std::collections::VecDeque<(usize, PendingDir)>,
    pending_entries: usize,
    /// Finished directories' nodes until their parent is finished, by slot.
    finished: std::collections::HashMap<usize, Node>,
    slots: usize,
    source: &'a dyn Source,
    opts: &'a BackupOptions,
    tx: crossbeam_channel::Sender<Job>,
    /// The prefetcher's queue: (job id, path, bytes to request).
    prefetch: crossbeam_channel::Sender<(usize, Vec<u8>, u64)>,
    jobs: usize,
    errors: Vec<(Vec<u8>, String)>,
    /// A failure that ends the backup (the source cannot be reached): set by the walk or by
    /// a worker; the walk stops at its next directory.
    fatal: &'a Mutex<Option<Error>>,
    stats: SnapshotStats,
    progress: &'a Progress,
    has_inodes: bool,
    /// Directories between the root and the one being walked.
    depth: usize,
}

/// Is `n` unchanged since `old` was backed up, so its chunk list can be reused?
fn unchanged(n: &Node, old: &Node, has_inodes: bool) -> bool {
    old.kind == NodeKind::File
        && n.size == old.size
        && n.mtime == old.mtime
        && (!has_inodes || (n.ctime == old.ctime && n.inode == old.inode))
        && (old.size == 0 || !old.content.is_empty())
}

/// Is a walked entry what the parent snapshot has for it? A directory is compared without its
/// tree, which is known once its own entries are finished.
fn item_equals(item: &Item, old: &Node) -> bool {
    match item {
        Item::Done(n) => n == old,
        Item::File(..) => false,
        Item::Sub { equal, .. } => *equal,
    }
}

/// Has the inode not changed since the parent snapshot? Any change to its metadata or extended
/// attributes moves the ctime, so the parent's attributes still hold.
fn same_inode_change(n: &Node, old: &Node) -> bool {
    n.kind == old.kind && n.ctime == old.ctime && n.inode == old.inode
}

impl Walker<'_> {
    fn excluded(&self, path: &[u8], name: &[u8]) -> bool {
        is_excluded(self.opts.exclude.as_ref(), path, name)
    }

    fn walk_dir(&mut self, path: &[u8], node: Node, parent: Option<(BlobId, &Tree)>) -> PendingDir {
        let (old_id, parent) = (parent.map(|p| p.0), parent.map(|p| p.1));
        let listed = if self.fatal.lock().is_some() {
            Ok(Vec::new())
        } else {
            match self.lister.take(path) {
                Some(r) => r,
                None => self.source.read_dir(path),
            }
        };
        let listed = if self.depth >= MAX_DEPTH {
            Err(Error::Other(format!(
                "more than {MAX_DEPTH} directories deep: its entries are not backed up"
            )))
        } else {
            listed
        };
        let entries = match listed {
            Ok(e) => e,
            Err(e) if source_lost(&e) => {
                self.fatal.lock().get_or_insert(e);
                Vec::new()
            }
            Err(e) => {
                self.errors.push((path.to_vec(), e.to_string()));
                Vec::new()
            }
        };
        // Names from a source are held to what a tree may contain (`name_problem`, first
        // entry of a name kept): a server that lists `..`, `a/b` or one name twice (a
        // directory, then a symlink to elsewhere) gets those entries reported, never stored.
        let verdicts = screen(&entries);
        let mut entries: Vec<Node> = entries
            .into_iter()
            .zip(verdicts)
            .filter_map(|(n, why)| match why {
                None => Some(n),
                Some(why) => {
                    // Reported against the directory: joined, the name could read as another
                    // path (`a/b`, `..`).
                    let name = String::from_utf8_lossy(&n.name).escape_debug().to_string();
                    let dir = String::from_utf8_lossy(path);
                    let msg = format!("{dir}: entry \"{name}\" skipped: {why}");
                    self.errors.push((path.to_vec(), msg));
                    None
                }
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        // List the subdirectories ahead on the lister's threads, in the order the walk will
        // reach them, so metadata reads (cold caches, remote round trips) overlap.
        for n in entries.iter().filter(|n| n.kind == NodeKind::Dir) {
            let full = join(path, &n.name);
            if !self.excluded(&full, &n.name) {
                self.lister.request(full);
            }
        }
        let jobs_before = self.jobs;
        let mut items = Vec::with_capacity(entries.len());
        let mut same = true;
        for mut n in entries {
            let full = join(path, &n.name);
            if self.excluded(&full, &n.name) {
                continue;
            }
            let old = parent.and_then(|t| t.find(&n.name));
            match old.filter(|o| self.has_inodes && same_inode_change(&n, o)) {
                Some(o) => n.xattrs = o.xattrs.clone(),
                None => self.source.load_xattrs(&full, &mut n),
            }
            let item = self.item(full, n, old);
            same = same && old.is_some_and(|o| item_equals(&item, o));
            items.push(item);
        }
        let same = same && parent.is_some_and(|t| t.nodes.len() == items.len());
        PendingDir {
            node,
            items,
            reuse: old_id.filter(|_| same),
            last_job: (self.jobs > jobs_before).then(|| self.jobs - 1),
        }
    }

    fn item(&mut self, full: Vec<u8>, mut n: Node, old: Option<&Node>) -> Item {
        match n.kind {
            NodeKind::Dir => {
                self.stats.dirs += 1;
                let old_tree = old
                    .filter(|o| o.kind == NodeKind::Dir)
                    .and_then(|o| o.subtree)
                    .and_then(|id| Some((id, self.store.load_tree(&id).ok()?)));
                self.depth += 1;
                let mut d = self.walk_dir(&full, n, old_tree.as_ref().map(|(id, t)| (*id, &**t)));
                self.depth -= 1;
                let equal = old.is_some_and(|o| {
                    d.node.subtree = o.subtree;
                    let eq = d.reuse.is_some() && d.node == *o;
                    d.node.subtree = None;
                    eq
                });
                let reuse = d.reuse;
                let slot = self.defer(d);
                Item::Sub { slot, reuse, equal }
            }
            NodeKind::File => {
                self.stats.files += 1;
                self.stats.bytes += n.size;
                self.progress.total_files.fetch_add(1, Ordering::Relaxed);
                self.progress
                    .total_bytes
                    .fetch_add(n.size, Ordering::Relaxed);
                // Reused only if the store still has every chunk outside condemned packs (a
                // maintenance may have condemned them, or a pack may be gone): else read again.
                if let Some(o) = old.filter(|o| {
                    unchanged(&n, o, self.has_inodes)
                        && o.content.iter().all(|id| self.store.reusable(id))
                }) {
                    n.content = o.content.clone();
                    // And the parent's block count: ext4 reports `st_blocks` 0 for a moment
                    // while writeback allocates a freshly written file's blocks (reproduced:
                    // 32 of 3,000 new files stat'ed during `sync`), which would otherwise
                    // give an unchanged file, and every directory above it, a new tree.
                    n.blocks = o.blocks;
                    self.progress.files.fetch_add(1, Ordering::Relaxed);
                    self.progress.bytes.fetch_add(n.size, Ordering::Relaxed);
                    return Item::Done(n);
                }
                let id = self.jobs;
                self.jobs += 1;
                // Never waits: with the prefetcher's queue full the file is simply not
                // requested ahead.
                let _ = self
                    .prefetch
                    .try_send((id, full.clone(), n.size.min(PREFETCH_BYTES)));
                // A send only fails when every worker has died, which `run` reports.
                let _ = self.tx.send(Job {
                    id,
                    path: full,
                    seen: n.clone(),
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

/// A worker keeps its read buffer between files up to this capacity; a larger file's window
/// (two maximum chunk sizes) is given back when the file is done.
const KEEP_BUF: usize = 8 << 20;

/// Read a file whole and check it did not change meanwhile (size, mtime, and where the source
/// has them ctime and inode, before and after, as GNU tar does). A file that changed is read
/// once more; if it moved again, what was read last is kept and reported.
fn read_file(
    store: &Store,
    packer: &Packer,
    source: &dyn Source,
    job: &Job,
    buf: &mut Vec<u8>,
    progress: &Progress,
) -> Result<JobResult, JobError> {
    let mut res = chunk_file(
        store,
        packer,
        source,
        &job.path,
        job.seen.size,
        buf,
        progress,
    )?;
    let mut seen = std::borrow::Cow::Borrowed(&job.seen);
    for attempt in 0..2 {
        match source.changed(&job.path, &seen) {
            Ok(None) => break,
            Ok(Some(now)) if attempt == 0 => {
                res = chunk_file(store, packer, source, &job.path, now.size, buf, progress)?;
                seen = std::borrow::Cow::Owned(now);
            }
            Ok(Some(now)) => {
                seen = std::borrow::Cow::Owned(now);
                res.warning = Some((
                    job.path.clone(),
                    "it changed while it was read, twice: stored as last read, which may mix \
                     its old and new content"
                        .into(),
                ));
            }
            // Gone since it was read: what was read is the file as it was.
            Err(e) if e.is_not_found() => break,
            Err(e) => return Err(JobError::Source(e)),
        }
    }
    if let std::borrow::Cow::Owned(n) = seen {
        res.node = Some(n);
    }
    Ok(res)
}

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
    // One chunk: its id, stored if new.
    let store_chunk = |data: &[u8]| -> Result<BlobId, JobError> {
        let id = store.crypto().blob_id(data);
        if !packer.claim(&id) {
            packer
                .add(BlobKind::Data, id, data)
                .map_err(JobError::Store)?;
        }
        progress
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        progress
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(id)
    };
    // The chunks cut from one window of the file, in order. Several (a large file) are
    // hashed, compressed and sealed in parallel: one file is otherwise one thread, and a
    // first backup ended with one core idle for seconds while a 512 MiB file finished.
    let handle = |chunks: &[&[u8]]| -> Result<(), JobError> {
        let ids: Vec<BlobId> = if chunks.len() > 1 {
            use rayon::prelude::*;
            chunks
                .par_iter()
                .map(|c| store_chunk(c))
                .collect::<Result<_, _>>()?
        } else {
            chunks
                .iter()
                .map(|c| store_chunk(c))
                .collect::<Result<_, _>>()?
        };
        res.content.extend(ids);
        res.size += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        Ok(())
    };
    chunk_stream(
        &mut reader,
        size,
        cp,
        seed,
        buf,
        |e| Error::from_io(pathname(), e),
        handle,
    )?;
    Ok(res)
}

/// Cut everything `reader` gives into FastCDC chunks and call `handle` with them, in order:
/// once per window, with the chunks cut from it.
///
/// The file is read into `buf` (reused across files) in windows of up to two maximum chunk
/// sizes; a chunk is cut only once a whole maximum chunk size past its start is in the buffer
/// (or the file has ended), so the cuts are exactly those of FastCDC over the whole file. The
/// unconsumed tail is moved to the front before the next read. `size_hint` (the size the walk
/// saw) sizes the first read so small files are read in one call.
fn chunk_stream(
    reader: &mut dyn Read,
    size_hint: u64,
    cp: ChunkerParams,
    seed: u64,
    buf: &mut Vec<u8>,
    io_err: impl Fn(std::io::Error) -> Error,
    mut handle: impl FnMut(&[&[u8]]) -> Result<(), JobError>,
) -> Result<(), JobError> {
    let max = cp.max as usize;
    let window = 2 * max;
    buf.clear();
    buf.reserve((size_hint as usize).saturating_add(1).min(window));
    let mut eof = false;
    loop {
        // Fill the window (or up to the end of the file).
        let want = (window - buf.len()) as u64;
        let got = reader
            .take(want)
            .read_to_end(buf)
            .map_err(|e| JobError::Source(io_err(e)))?;
        if (got as u64) < want {
            eof = true;
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut consumed = 0;
        let mut chunks = Vec::new();
        for c in FastCDC::with_level_and_seed(
            buf,
            cp.min as usize,
            cp.avg as usize,
            max,
            Normalization::Level1,
            seed,
        ) {
            if !eof && buf.len() - c.offset < max {
                break;
            }
            chunks.push(&buf[c.offset..c.offset + c.length]);
            consumed = c.offset + c.length;
        }
        handle(&chunks)?;
        drop(chunks);
        if eof {
            return Ok(());
        }
        buf.copy_within(consumed.., 0);
        buf.truncate(buf.len() - consumed);
    }
}

/// Run a backup of `source` into `store`.
pub fn run(
    store: &Store,
    source: &dyn Source,
    opts: &BackupOptions,
    progress: &Progress,
) -> Result<BackupResult> {
    with_lister(source, opts.exclude.as_ref(), |lister| {
        run_listed(store, source, opts, progress, lister)
    })
}

/// Start listing `source` from its root on [`Source::listers`] threads, call `f` with the
/// lister (for [`run_listed`]), and stop the listing when `f` returns.
pub fn with_lister<R>(
    source: &dyn Source,
    exclude: Option<&globset::GlobSet>,
    f: impl FnOnce(&Lister) -> R,
) -> R {
    /// Closes the lister however `f` ends, so the scope's threads can be joined.
    struct Closing<'a, 's>(&'a Lister<'s>);
    impl Drop for Closing<'_, '_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let lister = Lister::new(source, exclude);
    std::thread::scope(|s| {
        for _ in 0..source.listers() {
            s.spawn(|| lister.run());
        }
        let closing = Closing(&lister);
        lister.request(source.root());
        lister.ask_ancestry();
        s.spawn(|| lister.stat_ancestry());
        let r = f(closing.0);
        drop(closing);
        r
    })
}

/// [`run`] with a lister that is already listing `source` (see [`with_lister`]), so the
/// listing can start before the store is opened. `opts.exclude` must be the lister's.
pub fn run_listed(
    store: &Store,
    source: &dyn Source,
    opts: &BackupOptions,
    progress: &Progress,
    lister: &Lister,
) -> Result<BackupResult> {
    // The walk and the tree building recurse once per directory level.
    super::dirfd::on_deep_stack("backup's walk", || {
        walk_and_commit(store, source, opts, progress, lister)
    })
}

/// Times a backup is walked again because maintenance condemned or deleted packs it depended
/// on while it ran, before it gives up.
const MAX_WALKS: usize = 3;

fn walk_and_commit(
    store: &Store,
    source: &dyn Source,
    opts: &BackupOptions,
    progress: &Progress,
    lister: &Lister,
) -> Result<BackupResult> {
    let started = Instant::now();
    let mut walks = 0;
    loop {
        walks += 1;
        let (mut snapshot, deps) = walk_and_build(store, source, opts, progress, lister)?;
        // Maintenance elsewhere may have condemned (or, if this process was suspended past
        // its lock, deleted) packs this snapshot reuses: then their blobs are stored again,
        // by walking once more with the index as it now is.
        super::debug_point("backup-before-commit");
        snapshot.duration_ms = started.elapsed().as_millis() as u64;
        let mut bad = Vec::new();
        let written = {
            let _t = crate::trace::span("write the snapshot");
            // The snapshot is sent while its dependencies are checked; it appears only if
            // they pass.
            store.write_snapshot_if(&snapshot, &mut || {
                bad = store.verify_dependencies(&deps)?;
                Ok(bad.is_empty())
            })?
        };
        if let Some(id) = written {
            return Ok(BackupResult { id, snapshot });
        }
        if walks >= MAX_WALKS {
            return Err(Error::Other(format!(
                "maintenance condemned packs this backup depends on ({} of them, {}) {walks} times while it ran: no snapshot was saved; run the backup again",
                bad.len(),
                bad[0]
            )));
        }
        super::notice::warn_once(format!(
            "{} pack(s) this backup reuses were condemned or deleted by maintenance while it ran (first: {}); storing their blobs again",
            bad.len(),
            bad[0]
        ));
        store.load_index()?;
    }
}

/// Walk the source, store what is new, and make the snapshot record (not written yet); with
/// the packs it depends on.
fn walk_and_build(
    store: &Store,
    source: &dyn Source,
    opts: &BackupOptions,
    progress: &Progress,
    lister: &Lister,
) -> Result<(Snapshot, Vec<String>)> {
    let started = Instant::now();
    let root_path = source.root();
    let describe = source.describe();
    let host = super::hostname();
    // The root, then the directories above it (wrapped around it at the end), looked at
    // while the store was opened.
    let mut above = lister.ancestry().into_iter();
    let root_node = above.next().unwrap_or_else(|| source.stat(&root_path))?;

    let t_parent = crate::trace::span("find the parent snapshot");
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

    drop(t_parent);
    if source.is_remote()
        && let Some(n) = &parent_node
    {
        lister.request_known(store, &root_path, n);
    }
    let t_walk = crate::trace::span("walk and read files");
    let workers = if opts.workers > 0 {
        opts.workers
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
    };
    let packer = Packer::new(store);
    let (tx, rx) = bounded::<Job>(1024);
    let results = Results::default();
    let fatal: Mutex<Option<Error>> = Mutex::new(None);

    let taken = Taken::default();
    let (prefetch_tx, prefetch_rx) = bounded::<(usize, Vec<u8>, u64)>(1024);
    let (root_node, errors, mut stats) = std::thread::scope(|s| {
        for _ in 0..workers {
            let rx = rx.clone();
            let packer = &packer;
            let results = &results;
            let fatal = &fatal;
            let working = Working::start(&taken);
            s.spawn(move || {
                let working = working;
                let mut buf = Vec::new();
                for job in rx.iter() {
                    working.0.take(job.id);
                    if fatal.lock().is_some() {
                        results.done.lock().insert(job.id, None);
                        results.ready.notify_all();
                        continue;
                    }
                    let r = read_file(store, packer, source, &job, &mut buf, progress);
                    if buf.capacity() > KEEP_BUF {
                        buf = Vec::new();
                    }
                    progress.files.fetch_add(1, Ordering::Relaxed);
                    let r = match r {
                        Ok(r) => Some(Ok(r)),
                        Err(JobError::Source(e)) if source_lost(&e) => {
                            fatal.lock().get_or_insert(e);
                            None
                        }
                        Err(JobError::Source(e)) => Some(Err((job.path, e.to_string()))),
                        Err(JobError::Store(e)) => {
                            fatal.lock().get_or_insert(e);
                            None
                        }
                    };
                    results.done.lock().insert(job.id, r);
                    results.ready.notify_all();
                }
            });
        }
        drop(rx);
        s.spawn(|| {
            for (id, path, len) in prefetch_rx.iter() {
                match taken.wait_near(id) {
                    None => break,
                    Some(true) if len > 0 => source.prefetch(&path, len),
                    Some(_) => {}
                }
            }
        });
        let mut w = Walker {
            lister,
            store,
            packer: &packer,
            results: &results,
            taken: &taken,
            pending: Default::default(),
            pending_entries: 0,
            finished: Default::default(),
            slots: 0,
            source,
            opts,
            tx,
            prefetch: prefetch_tx,
            jobs: 0,
            errors: Vec::new(),
            fatal: &fatal,
            stats: SnapshotStats::default(),
            progress,
            has_inodes: source.has_inodes(),
            depth: 0,
        };
        let root = {
            let parent_tree = parent_node
                .as_ref()
                .filter(|n| n.kind == NodeKind::Dir)
                .and_then(|n| n.subtree)
                .and_then(|id| Some((id, store.load_tree(&id).ok()?)));
            let parent_tree = parent_tree.as_ref().map(|(id, t)| (*id, &**t));
            match root_node.kind {
                NodeKind::Dir => {
                    let d = w.walk_dir(&root_path, root_node, parent_tree);
                    let slot = w.defer(d);
                    w.finish_all(slot).map(Some)
                }
                _ => {
                    let item = w.item(root_path.clone(), root_node, parent_node.as_ref());
                    w.finish_item(item)
                }
            }
        };
        let Walker {
            errors, stats, tx, ..
        } = w;
        drop(tx);
        (root, errors, stats)
    });
    if let Some(e) = fatal.into_inner() {
        return Err(e);
    }
    let root_node = root_node?;
    drop(t_walk);
    let t_trees = crate::trace::span("write trees, packs, index");
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
        let mut t = Tree {
            nodes: vec![node],
            ..Tree::default()
        };
        t.sort();
        let id = write_tree(store, &packer, &t)?;
        if i == 0 {
            node = Node::new(Vec::new(), NodeKind::Dir);
            node.subtree = Some(id);
            break;
        }
        // A directory above the root that cannot be looked at gets default metadata; a source
        // that is gone ends the backup like anywhere else (no snapshot, exit 9).
        let mut pn = match above.next().unwrap_or_else(|| source.stat(&parent_path)) {
            Ok(n) => n,
            Err(e) if source_lost(&e) => return Err(e),
            Err(_) => Node::new(comps[i - 1].clone(), NodeKind::Dir),
        };
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
    drop(t_trees);
    Ok((snapshot, packer.dependencies()))
}

/// Write a tree blob (unless the store or this session has it already); its id.
fn write_tree(store: &Store, packer: &Packer, t: &Tree) -> Result<BlobId> {
    let data = t.encode();
    let id = store.crypto().blob_id(&data);
    if !packer.claim(&id) {
        packer.add(BlobKind::Tree, id, &data)?;
    }
    Ok(id)
}

impl Walker<'_> {
    /// Queue a walked directory to be finished, and finish the oldest queued ones whose jobs
    /// are (nearly certainly) done, or that hold too much; its slot.
    fn defer(&mut self, d: PendingDir) -> usize {
        let slot = self.slots;
        self.slots += 1;
        self.pending_entries += d.items.len();
        self.pending.push_back((slot, d));
        while let Some((_, front)) = self.pending.front() {
            let behind = front.last_job.is_none_or(|j| j + FINISH_LAG < self.jobs);
            if !behind && self.pending_entries <= MAX_PENDING_ENTRIES {
                break;
            }
            if let Err(e) = self.finish_front() {
                self.fatal.lock().get_or_insert(e);
                break;
            }
        }
        slot
    }

    /// Finish the oldest queued directory: wait for its files' jobs, write its tree.
    fn finish_front(&mut self) -> Result<()> {
        let Some((slot, d)) = self.pending.pop_front() else {
            return Ok(());
        };
        self.pending_entries -= d.items.len();
        let node = self.finish_dir(d)?;
        self.finished.insert(slot, node);
        Ok(())
    }

    /// Finish every queued directory (the walk is over); the node of the one in `slot`.
    fn finish_all(&mut self, slot: usize) -> Result<Node> {
        while !self.pending.is_empty() {
            self.finish_front()?;
        }
        self.finished
            .remove(&slot)
            .ok_or_else(|| Error::Other("internal error: a directory was lost".into()))
    }

    /// The outcome of job `id`, once a worker has it; `None` if the backup failed meanwhile
    /// or no worker is left to do it.
    fn wait_result(&self, id: usize) -> Option<JobOutcome> {
        let mut done = self.results.done.lock();
        loop {
            if let Some(r) = done.remove(&id) {
                return r;
            }
            if self.fatal.lock().is_some() || self.taken.state.lock().1 == 0 {
                return None;
            }
            self.results
                .ready
                .wait_for(&mut done, std::time::Duration::from_millis(100));
        }
    }

    /// Turn a walked item into its final node; `None` if it could not be read.
    fn finish_item(&mut self, item: Item) -> Result<Option<Node>> {
        match item {
            Item::Done(n) => {
                // An unchanged file's chunks, reused from the previous snapshot: their packs
                // must be indexed by the time this snapshot is committed.
                for id in &n.content {
                    self.packer.reuse(id);
                }
                Ok(Some(n))
            }
            Item::File(mut n, job) => match self.wait_result(job) {
                Some(Ok(r)) => {
                    let walked = n.size;
                    if let Some(now) = r.node {
                        // It changed after the walk saw it: its metadata as it was read.
                        let name = std::mem::take(&mut n.name);
                        let xattrs = std::mem::take(&mut n.xattrs);
                        n = now;
                        (n.name, n.xattrs) = (name, xattrs);
                    }
                    if let Some(w) = r.warning {
                        self.errors.push(w);
                    }
                    // What was read, whatever the file's size said.
                    self.stats.bytes = self.stats.bytes - walked + r.size;
                    n.size = r.size;
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
            },
            // Finished before its parent (the queue is in walk order, children first).
            Item::Sub { slot, .. } => self
                .finished
                .remove(&slot)
                .map(Some)
                .ok_or_else(|| Error::Other("internal error: a directory was lost".into())),
        }
    }

    /// A walked directory's final node, its tree written (or the parent snapshot's reused).
    fn finish_dir(&mut self, d: PendingDir) -> Result<Node> {
        let PendingDir {
            mut node,
            items,
            mut reuse,
            ..
        } = d;
        let mut t = Tree::default();
        for it in items {
            let sub_reuse = match &it {
                Item::Sub { reuse, .. } => Some(*reuse),
                _ => None,
            };
            match self.finish_item(it)? {
                Some(n) => {
                    // A subdirectory whose tree changed changes this one.
                    if sub_reuse.is_some_and(|r| r.is_none() || n.subtree != r) {
                        reuse = None;
                    }
                    t.nodes.push(n);
                }
                None => reuse = None,
            }
        }
        node.subtree = Some(match reuse {
            // Equal to the parent snapshot's tree, which was just read from the store (and
            // must be indexed when this snapshot is committed, like its entries, each reused
            // above).
            Some(id) if self.packer.reuse(&id) => id,
            _ => {
                t.sort();
                write_tree(self.store, self.packer, &t)?
            }
        });
        Ok(node)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalSource;

    #[derive(Debug, PartialEq)]
    enum Event {
        Open(Vec<u8>),
        Prefetch(Vec<u8>, u64),
    }

    /// A local source that logs the directories it lists and the files it opens and
    /// prefetches; opens are slowed down by `slow_open`.
    struct Recording {
        inner: LocalSource,
        listed: Mutex<Vec<Vec<u8>>>,
        log: Mutex<Vec<Event>>,
        slow_open: std::time::Duration,
        /// How long each prefetch hint takes (after it is logged).
        slow_prefetch: std::time::Duration,
        /// Paths asked of `stat`.
        single_stats: Mutex<Vec<Vec<u8>>>,
        /// The lists of paths asked of `stat_many`.
        many_stats: Mutex<Vec<Vec<Vec<u8>>>>,
        /// Says it is remote, and its root's listing waits (up to 5 s) until this directory's
        /// listing has started: then `held_saw` is set.
        remote_holding_root_for: Option<Vec<u8>>,
        held_saw: std::sync::atomic::AtomicBool,
    }

    impl Recording {
        fn new(root: &std::path::Path, slow_open: std::time::Duration) -> Self {
            Recording {
                inner: LocalSource::new(root).unwrap(),
                listed: Mutex::new(Vec::new()),
                log: Mutex::new(Vec::new()),
                slow_open,
                slow_prefetch: std::time::Duration::ZERO,
                single_stats: Mutex::default(),
                many_stats: Mutex::default(),
                remote_holding_root_for: None,
                held_saw: Default::default(),
            }
        }
    }

    impl Source for Recording {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn root(&self) -> Vec<u8> {
            self.inner.root()
        }
        fn has_inodes(&self) -> bool {
            true
        }
        fn stat(&self, path: &[u8]) -> Result<Node> {
            self.single_stats.lock().push(path.to_vec());
            self.inner.stat(path)
        }
        fn stat_many(&self, paths: &[Vec<u8>]) -> Vec<Result<Node>> {
            self.many_stats.lock().push(paths.to_vec());
            self.inner.stat_many(paths)
        }
        fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>> {
            self.listed.lock().push(path.to_vec());
            if let Some(deep) = &self.remote_holding_root_for
                && path == self.root()
            {
                let until = Instant::now() + std::time::Duration::from_secs(5);
                while Instant::now() < until {
                    if self.listed.lock().contains(deep) {
                        self.held_saw.store(true, Ordering::Relaxed);
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.inner.read_dir(path)
        }
        fn is_remote(&self) -> bool {
            self.remote_holding_root_for.is_some()
        }
        fn load_xattrs(&self, path: &[u8], node: &mut Node) {
            self.inner.load_xattrs(path, node)
        }
        fn open(&self, path: &[u8], size: u64) -> Result<Box<dyn Read + Send>> {
            self.log.lock().push(Event::Open(path.to_vec()));
            std::thread::sleep(self.slow_open);
            self.inner.open(path, size)
        }
        fn prefetch(&self, path: &[u8], len: u64) {
            self.log.lock().push(Event::Prefetch(path.to_vec(), len));
            std::thread::sleep(self.slow_prefetch);
        }
    }

    #[test]
    fn the_lister_explores_everything_not_excluded_once() {
        let t = tempfile::tempdir().unwrap();
        for d in ["a/b/c", "a/skip/x", "d", "e/f"] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        std::fs::write(t.path().join("a/b/file"), b"x").unwrap();
        let src = Recording::new(t.path(), std::time::Duration::ZERO);
        let ex = exclude_set(&["skip".to_string()]).unwrap();
        let root = src.root();
        with_lister(&src, ex.as_ref(), |l| {
            // Take every directory the walk would, waiting for the lister's work.
            for d in ["", "/a", "/a/b", "/a/b/c", "/d", "/e", "/e/f"] {
                let p = [root.as_slice(), d.as_bytes()].concat();
                l.take(&p).expect("listed ahead").unwrap();
            }
        });
        let mut listed = src.listed.into_inner();
        listed.sort();
        let mut want: Vec<Vec<u8>> = ["", "/a", "/a/b", "/a/b/c", "/d", "/e", "/e/f"]
            .iter()
            .map(|d| [root.as_slice(), d.as_bytes()].concat())
            .collect();
        want.sort();
        assert_eq!(
            listed, want,
            "each directory listed once, the excluded one never"
        );
    }

    /// A backup of `src` with the default options, which reports no error.
    fn backed_up(store: &Store, src: &dyn Source) {
        let r = run(store, src, &BackupOptions::default(), &Progress::default()).unwrap();
        assert!(r.snapshot.errors.is_empty(), "{:?}", r.snapshot.errors);
    }

    #[test]
    fn the_root_and_the_directories_above_it_are_looked_at_all_at_once() {
        assert_eq!(
            ancestry(b"/a/b/c"),
            [b"/a/b/c".to_vec(), b"/a/b".to_vec(), b"/a".to_vec()]
        );
        assert!(ancestry(b"/").is_empty());
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("x/y");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("f"), b"data").unwrap();
        let src = Recording::new(&root, std::time::Duration::ZERO);
        let store = crate::store::repo::open_or_create_mem(false);
        backed_up(&store, &src);
        let (single, many) = (src.single_stats.into_inner(), src.many_stats.into_inner());
        // One request for the root and every directory above it (one round trip for a
        // remote source); none one by one (a round trip each, the root's first and the
        // others' after the walk).
        let above = ancestry(&src.inner.root());
        assert_eq!(many, std::slice::from_ref(&above));
        let one_by_one: Vec<_> = single.iter().filter(|p| above.contains(p)).collect();
        assert!(
            one_by_one.is_empty(),
            "looked at one by one: {one_by_one:?}"
        );
        // And the snapshot holds the tree at its absolute path.
        let snap = store.resolve_snapshot("latest").unwrap();
        let node = store.lookup(&snap, &src.inner.root()).unwrap();
        assert_eq!(node.kind, NodeKind::Dir);
    }

    #[test]
    fn a_remote_source_lists_the_parent_snapshots_directories_without_waiting_for_their_parents() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b/c/d")).unwrap();
        std::fs::create_dir_all(t.path().join("e")).unwrap();
        std::fs::write(t.path().join("a/b/c/d/f"), b"deep").unwrap();
        let store = crate::store::repo::open_or_create_mem(false);
        let first = Recording::new(t.path(), std::time::Duration::ZERO);
        backed_up(&store, &first);
        // The next backup, from a "remote" source whose root is slow to list: the deepest
        // directory of the parent snapshot is asked for meanwhile, not four levels later.
        let mut src = Recording::new(t.path(), std::time::Duration::ZERO);
        let deep = [src.root().as_slice(), b"/a/b/c/d"].concat();
        src.remote_holding_root_for = Some(deep);
        backed_up(&store, &src);
        assert!(
            src.held_saw.load(Ordering::Relaxed),
            "a/b/c/d was not listed while the root's listing was on its way: {:?}",
            src.listed.lock()
        );
        // Each directory listed once, the walk taking what was listed ahead.
        let mut listed = src.listed.into_inner();
        let n = listed.len();
        listed.sort();
        listed.dedup();
        assert_eq!(listed.len(), n, "a directory listed twice");
        assert_eq!(n, 6);
    }

    /// A directory of `n` small files `f0000`… (`file 0`, `file 1`, …).
    fn small_files(n: usize) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for i in 0..n {
            std::fs::write(t.path().join(format!("f{i:04}")), format!("file {i}")).unwrap();
        }
        t
    }

    /// A prefetcher that falls behind the workers skips the files they have taken already
    /// (it used to ask for every file, opening each again after it had been read).
    #[test]
    fn files_the_workers_have_taken_are_not_prefetched() {
        let n = 3 * PREFETCH_FILES;
        let t = small_files(n);
        let mut src = Recording::new(t.path(), std::time::Duration::ZERO);
        src.slow_prefetch = std::time::Duration::from_millis(2);
        let store = crate::store::repo::open_or_create_mem(false);
        let opts = BackupOptions {
            workers: 2,
            ..BackupOptions::default()
        };
        let r = run(&store, &src, &opts, &Progress::default()).unwrap();
        assert_eq!(r.snapshot.stats.files as usize, n);
        let mut opened = std::collections::HashSet::new();
        let (mut late, mut asked) = (0, 0);
        for e in src.log.into_inner() {
            match e {
                Event::Open(p) => {
                    opened.insert(p);
                }
                Event::Prefetch(p, _) => {
                    asked += 1;
                    if opened.contains(&p) {
                        late += 1;
                    }
                }
            }
        }
        // A file taken between the prefetcher's look and its hint may be read first: at most
        // one per worker each time the prefetcher looks, which with 2 ms hints is rare.
        assert!(
            late <= asked / 4,
            "{late} of {asked} files asked for after a worker had read them"
        );
        assert!(asked < n, "all {n} files asked for: none skipped");
    }

    /// Files are asked for ahead of the workers at most once, and never more than
    /// [`PREFETCH_FILES`] ahead.
    #[test]
    fn files_are_prefetched_once_and_not_too_far_ahead() {
        let n = 3 * PREFETCH_FILES;
        let t = small_files(n);
        std::fs::write(t.path().join("empty"), b"").unwrap();
        let big = vec![7u8; PREFETCH_BYTES as usize + 1];
        std::fs::write(t.path().join("big"), &big).unwrap();
        // Slow reads: unbounded, the prefetcher would run through every file at once.
        let src = Recording::new(t.path(), std::time::Duration::from_micros(300));
        let store = crate::store::repo::open_or_create_mem(false);
        let workers = 2;
        let opts = BackupOptions {
            workers,
            ..BackupOptions::default()
        };
        let r = run(&store, &src, &opts, &Progress::default()).unwrap();
        assert_eq!(r.snapshot.stats.files as usize, n + 2);
        assert!(r.snapshot.errors.is_empty());

        let log = src.log.into_inner();
        let root = t.path().as_os_str().as_bytes();
        let path = |name: &str| [root, b"/", name.as_bytes()].concat();
        let (mut opens, mut prefetched) = (0, Vec::new());
        for e in &log {
            match e {
                Event::Open(_) => opens += 1,
                Event::Prefetch(p, len) => {
                    // Job k is requested only once the workers have taken job k - PREFETCH_FILES
                    // (each has taken at most one job it has not opened yet).
                    assert!(
                        prefetched.len() < opens + workers + PREFETCH_FILES,
                        "prefetch {} with only {opens} files opened",
                        prefetched.len()
                    );
                    prefetched.push((p.clone(), *len));
                }
            }
        }
        assert_eq!(opens, n + 2, "every file read once");
        let mut want: Vec<(Vec<u8>, u64)> = (0..n)
            .map(|i| (path(&format!("f{i:04}")), format!("file {i}").len() as u64))
            .collect();
        want.push((path("big"), PREFETCH_BYTES));
        // Each non-empty file asked for at most once, for at most PREFETCH_BYTES, and most of
        // them (those no worker took first; here the workers wait on every read).
        prefetched.sort();
        let n_asked = prefetched.len();
        prefetched.dedup();
        assert_eq!(prefetched.len(), n_asked, "a file asked for twice");
        for p in &prefetched {
            assert!(want.contains(p), "{p:?} not a non-empty file's first bytes");
        }
        assert!(
            n_asked * 2 > want.len(),
            "only {n_asked} of {} files asked for ahead",
            want.len()
        );
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    /// A reader that hands out at most `step` bytes per call, like a pipe or a network.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.step).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn windowed_chunking_cuts_where_whole_file_chunking_does() {
        let cp = ChunkerParams {
            min: 1024,
            avg: 4096,
            max: 16384,
        };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..300_000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Stretches of zeros force cuts at the maximum size.
                if (100_000..160_000).contains(&i) {
                    0
                } else {
                    x as u8
                }
            })
            .collect();
        let want: Vec<(usize, usize)> =
            FastCDC::with_level_and_seed(&data, 1024, 4096, 16384, Normalization::Level1, 7)
                .map(|c| (c.offset, c.length))
                .collect();
        for (len, step, hint) in [
            (300_000, 1 << 20, 300_000),
            (300_000, 777, 0),
            (40_000, 5000, 1),
            (0, 10, 0),
        ] {
            let mut got = Vec::new();
            let mut at = 0;
            let mut buf = Vec::new();
            let mut r = Trickle {
                data: &data[..len],
                step,
            };
            chunk_stream(
                &mut r,
                hint,
                cp,
                7,
                &mut buf,
                |e| Error::Other(e.to_string()),
                |chunks| {
                    for c in chunks {
                        assert_eq!(*c, &data[at..at + c.len()]);
                        got.push((at, c.len()));
                        at += c.len();
                    }
                    Ok(())
                },
            )
            .map_err(|_| "chunking failed")
            .unwrap();
            assert_eq!(at, len);
            if len == data.len() {
                assert_eq!(got, want, "step {step}");
            } else {
                let whole: Vec<(usize, usize)> = FastCDC::with_level_and_seed(
                    &data[..len],
                    1024,
                    4096,
                    16384,
                    Normalization::Level1,
                    7,
                )
                .map(|c| (c.offset, c.length))
                .collect();
                assert_eq!(got, whole, "len {len} step {step}");
            }
        }
    }
}
