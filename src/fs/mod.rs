//! Snapshots as a read-only filesystem.
//!
//! [`SnapshotFs`] is the whole filesystem without FUSE: it answers lookup, getattr, readdir,
//! readlink, open, read, getxattr, listxattr and statfs with plain structs or an [`Error`]
//! that maps to an errno ([`Error::errno`]), so it is unit-tested without the kernel. `fuse.rs`
//! is a thin `fuser::Filesystem` adapter over it. Every path has a stable inode and every
//! hard-link group one inode, and the inode table stays small however many entries the kernel
//! has seen: a listed directory's entries get a run of consecutive inode numbers, in its
//! tree's (sorted) order, so an entry is found again from its number through its directory's
//! record and the decoded tree, which the store's tree cache keeps (bounded); nothing is kept
//! per file but hard links. File contents come through the shared
//! [`cache::ChunkCache`]; sequential readers prefetch the chunks ahead of them.
//!
//! Layout of a whole-store mount: one directory per snapshot named by its short id, holding the
//! backed-up tree at its absolute path (`<id>/var/www/index.html`), a `latest` symlink, and
//! `by-time/<time>` and `by-tag/<tag>/<time>` symlinks into the id directories. The snapshot
//! list is re-read at most every [`REFRESH`], so new snapshots appear without remounting.

pub mod cache;
pub mod fuse;

use std::collections::{BTreeMap, HashMap};
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::store::crypto::BlobId;
use crate::store::repo::SnapshotEntry;
use crate::store::tree::{Node, NodeKind, Time, Tree};
use crate::store::{Store, format::BlobKind};
use cache::ChunkCache;

/// How often the snapshot list of a whole-store mount is re-read.
pub const REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("not a symlink")]
    NotLink,
    #[error("no such attribute")]
    NoXattr,
    #[error("stale file handle")]
    BadHandle,
    #[error("{0}")]
    Io(String),
}

impl Error {
    /// The errno a FUSE reply carries.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc::ENOENT,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::NotLink => libc::EINVAL,
            Error::NoXattr => libc::ENODATA,
            Error::BadHandle => libc::EBADF,
            Error::Io(_) => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub const ROOT: u64 = 1;

/// Attributes of an inode, FUSE-free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub blocks: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: NodeKind,
    pub name: Vec<u8>,
}

/// An entry of a [`Listing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub ino: u64,
    pub kind: NodeKind,
    pub name: &'a [u8],
}

/// The entries of a directory (without `.` and `..`), sorted by name.
#[derive(Clone)]
pub enum Listing {
    /// A directory the mount makes up (the store root, `by-time`, `by-tag`).
    Made(Arc<Vec<DirEntry>>),
    /// A snapshot directory: its tree, read in place.
    Tree(Arc<Dir>, Option<Arc<Tree>>),
}

impl Listing {
    pub fn len(&self) -> usize {
        match self {
            Listing::Made(v) => v.len(),
            Listing::Tree(_, t) => t.as_ref().map_or(0, |t| t.nodes.len()),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> Option<Entry<'_>> {
        match self {
            Listing::Made(v) => v.get(i).map(|e| Entry {
                ino: e.ino,
                kind: e.kind,
                name: &e.name,
            }),
            Listing::Tree(d, t) => t.as_ref()?.nodes.get(i).map(|n| Entry {
                ino: d.ino_at(i),
                kind: n.kind,
                name: &n.name,
            }),
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = Entry<'_>> {
        (0..self.len()).filter_map(|i| self.get(i))
    }
    /// Where `name` is (a binary search: the entries are sorted).
    fn position(&self, name: &[u8]) -> Option<usize> {
        match self {
            Listing::Made(v) => v.binary_search_by(|e| e.name.as_slice().cmp(name)).ok(),
            Listing::Tree(_, t) => t
                .as_ref()?
                .nodes
                .binary_search_by(|n| n.name.as_slice().cmp(name))
                .ok(),
        }
    }
}

/// A listed snapshot directory. Its entries have the inodes `base..base + count`, in the
/// order of its tree, except hard links seen before elsewhere, which keep their first inode.
pub struct Dir {
    /// The directory's own inode.
    ino: u64,
    snap: usize,
    tree: Option<BlobId>,
    base: u64,
    count: u64,
    /// (position, inode) of the entries that are hard links to an inode given before.
    aliases: Vec<(u32, u64)>,
    /// It holds hard links: other directories' entries may carry its inode numbers, so its
    /// record is kept when the kernel forgets the directory.
    pinned: bool,
}

impl Dir {
    fn ino_at(&self, i: usize) -> u64 {
        match self.aliases.binary_search_by_key(&(i as u32), |a| a.0) {
            Ok(k) => self.aliases[k].1,
            Err(_) => self.base + i as u64,
        }
    }
}

/// The listed snapshot directories, by their own inode and by the first inode of their
/// entries.
#[derive(Default)]
struct Dirs {
    by_ino: HashMap<u64, Arc<Dir>>,
    by_base: BTreeMap<u64, Arc<Dir>>,
}

/// A snapshot entry: a node the mount owns (a snapshot's root) or one in a decoded tree.
enum NodeRef {
    Own(Arc<Node>),
    InTree(Arc<Tree>, usize),
}

impl Deref for NodeRef {
    type Target = Node;
    fn deref(&self) -> &Node {
        match self {
            NodeRef::Own(n) => n,
            NodeRef::InTree(t, i) => &t.nodes[*i],
        }
    }
}

/// What an inode number stands for.
enum Found {
    /// A made-up inode (store root, virtual directory, made-up link).
    Made(Arc<Inode>),
    /// A snapshot entry.
    Node {
        snap: usize,
        parent: u64,
        node: NodeRef,
    },
}

/// What an inode is.
#[derive(Debug, Clone)]
enum What {
    /// The mount root of a whole-store mount.
    StoreRoot,
    /// `by-time`, `by-tag`, `by-tag/<tag>`.
    Virtual(Vec<u8>),
    /// A symlink made up by the mount (`latest`, `by-time/…`).
    Link(Vec<u8>),
    /// An entry of a snapshot (its tree root has name `/`).
    Node { snap: usize, node: Arc<Node> },
}

/// An inode the mount makes up, or a snapshot's root: the only ones kept one by one.
struct Inode {
    what: What,
    parent: u64,
    name: Vec<u8>,
    /// Directory listing of a made-up directory, built on first readdir.
    children: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

/// Prefetch threads at most, whatever the store asks for.
const MAX_PREFETCHERS: usize = 16;

/// The prefetch window of a sequential reader's first read; it doubles with each read after.
const FIRST_WINDOW: u64 = 1 << 20;

/// How far ahead (decoded bytes) a sequential reader's window grows: two runs
/// ([`crate::store::stream::RUN_BYTES`]) for each range read the store wants in flight, at
/// most half the cache's ring, so that what was read ahead is never pushed out of the ring
/// before the reader gets to it (a window of 32 chunks, 48 MiB of a file of 1.5 MiB chunks,
/// read a third of a 384 MiB file twice through the 64 MiB ring).
fn max_ahead(readers: usize, ring: usize) -> u64 {
    (2 * readers as u64 * crate::store::stream::RUN_BYTES).min(ring as u64 / 2)
}

/// The chunks after chunk `i` (of a file whose chunks start at `offsets`, plus its end) that
/// start within `window` bytes of the next one: at least that next one, none past the file.
fn window_ahead(offsets: &[u64], i: usize, window: u64) -> std::ops::Range<usize> {
    let chunks = offsets.len() - 1;
    let next = (i + 1).min(chunks);
    let reach = offsets[next].saturating_add(window);
    let end = offsets[..chunks].partition_point(|&o| o <= reach);
    next..end.max((next + 1).min(chunks))
}

/// A file of at least this many chunks (4 MiB and more) read sequentially is streamed: its
/// chunks are kept only in the cache's ring ([`cache::STREAM_RING`]).
const STREAMED_FILE_CHUNKS: usize = 8;

struct Open {
    ino: u64,
    content: Vec<BlobId>,
    /// Start offset of each chunk, plus the end.
    offsets: Vec<u64>,
    /// Where the last read ended, to detect sequential reading, and the prefetch window.
    next: Mutex<(u64, u64)>,
    /// The chunks stored one after another in a pack, each group read ahead as one range
    /// ([`crate::store::stream::plan_runs`]); fixed at open, so a window sliding over them
    /// always asks for the same runs.
    runs: Vec<std::ops::Range<usize>>,
}

/// Options of a mount.
pub struct MountConfig {
    /// Bytes of decrypted chunks kept in memory.
    pub cache_bytes: usize,
    /// The root: a whole store, or one snapshot path.
    pub root: Option<(SnapshotEntry, Vec<u8>)>,
}

pub struct SnapshotFs {
    store: Arc<Store>,
    cache: Arc<ChunkCache>,
    /// The made-up inodes and the snapshot roots.
    inodes: RwLock<HashMap<u64, Arc<Inode>>>,
    /// (parent, name) → ino of the made-up inodes, so a path keeps its inode.
    names: Mutex<HashMap<(u64, Vec<u8>), u64>>,
    /// The listed snapshot directories.
    dirs: RwLock<Dirs>,
    /// (snapshot, dev, inode) → ino, so hard links share one inode.
    links: Mutex<HashMap<(usize, u64, u64), u64>>,
    /// How many times the kernel was given each snapshot directory's inode (FUSE's lookup
    /// count), so that the directory's record goes when the kernel forgets it.
    lookups: Mutex<HashMap<u64, u64>>,
    /// Directory records dropped on the kernel's forgets (for tracing).
    forgotten: AtomicU64,
    next_ino: AtomicU64,
    snaps: RwLock<Vec<SnapshotEntry>>,
    refreshed: Mutex<Option<Instant>>,
    whole_store: bool,
    handles: RwLock<HashMap<u64, Arc<Open>>>,
    /// Read state of files read without a handle (kernel "no open" mode).
    by_ino: Mutex<lru::LruCache<u64, Arc<Open>>>,
    next_fh: AtomicU64,
    /// Id of an all-zero maximum-size chunk, not counted in `st_blocks` (sparse files).
    zero_chunk: BlobId,
    mount_time: SystemTime,
    /// Bytes a sequential reader's prefetch window grows to ([`max_ahead`]).
    max_ahead: u64,
}

fn systime(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
    }
}

impl SnapshotFs {
    pub fn new(store: Arc<Store>, cfg: MountConfig) -> Result<Arc<SnapshotFs>> {
        let readers = store.backend().ranges_at_once().clamp(1, MAX_PREFETCHERS);
        let cache = ChunkCache::for_readers(store.clone(), cfg.cache_bytes, readers);
        cache.start_prefetchers(readers);
        cache.prepare();
        let ring = cache.ring_bytes();
        let zero = vec![0u8; store.config().chunker.max as usize];
        let zero_chunk = store.crypto().blob_id(&zero);
        let fs = SnapshotFs {
            cache,
            inodes: RwLock::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            dirs: RwLock::new(Dirs::default()),
            links: Mutex::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
            forgotten: AtomicU64::new(0),
            next_ino: AtomicU64::new(ROOT + 1),
            snaps: RwLock::new(Vec::new()),
            refreshed: Mutex::new(None),
            whole_store: cfg.root.is_none(),
            handles: RwLock::new(HashMap::new()),
            by_ino: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).expect("non-zero"),
            )),
            next_fh: AtomicU64::new(1),
            zero_chunk,
            mount_time: SystemTime::now(),
            max_ahead: max_ahead(readers, ring),
            store,
        };
        let root = match cfg.root {
            None => What::StoreRoot,
            Some((snap, path)) => {
                let node = fs
                    .store
                    .lookup(&snap, &path)
                    .map_err(|e| Error::Io(e.to_string()))?;
                if node.kind != NodeKind::Dir {
                    return Err(Error::NotDir);
                }
                fs.snaps.write().push(snap);
                What::Node {
                    snap: 0,
                    node: Arc::new(node),
                }
            }
        };
        fs.inodes.write().insert(
            ROOT,
            Arc::new(Inode {
                what: root,
                parent: ROOT,
                name: Vec::new(),
                children: Mutex::new(None),
            }),
        );
        let fs = Arc::new(fs);
        if fs.whole_store {
            fs.refresh(true)?;
        }
        Ok(fs)
    }

    /// Re-read the snapshot list (whole-store mounts) if it is older than [`REFRESH`].
    fn refresh(&self, force: bool) -> Result<()> {
        if !self.whole_store {
            return Ok(());
        }
        {
            let mut r = self.refreshed.lock();
            if !force && r.is_some_and(|t| t.elapsed() < REFRESH) {
                return Ok(());
            }
            *r = Some(Instant::now());
        }
        let (list, _) = self
            .store
            .snapshots()
            .map_err(|e| Error::Io(e.to_string()))?;
        let mut snaps = self.snaps.write();
        let new: Vec<_> = list
            .into_iter()
            .filter(|s| !snaps.iter().any(|o| o.id == s.id))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        // New snapshots may reference packs this process has not indexed yet.
        if !force {
            self.store
                .load_index()
                .map_err(|e| Error::Io(e.to_string()))?;
        }
        snaps.extend(new);
        snaps.sort_by(|a, b| (a.snap.time, &a.id).cmp(&(b.snap.time, &b.id)));
        drop(snaps);
        // Drop the cached listings of the virtual directories.
        for ino in self.inodes.read().values() {
            if matches!(ino.what, What::StoreRoot | What::Virtual(_)) {
                *ino.children.lock() = None;
            }
        }
        Ok(())
    }

    /// What inode `ino` is.
    fn found(&self, ino: u64) -> Result<Found> {
        if let Some(i) = self.inodes.read().get(&ino) {
            return Ok(match &i.what {
                What::Node { snap, node } => Found::Node {
                    snap: *snap,
                    parent: i.parent,
                    node: NodeRef::Own(node.clone()),
                },
                _ => Found::Made(i.clone()),
            });
        }
        let dir = {
            let dirs = self.dirs.read();
            let (_, d) = dirs
                .by_base
                .range(..=ino)
                .next_back()
                .ok_or(Error::NotFound)?;
            if ino >= d.base + d.count {
                return Err(Error::NotFound);
            }
            d.clone()
        };
        let tree = self.tree_of(&dir)?.ok_or(Error::NotFound)?;
        let i = (ino - dir.base) as usize;
        if i >= tree.nodes.len() {
            return Err(Error::NotFound);
        }
        Ok(Found::Node {
            snap: dir.snap,
            parent: dir.ino,
            node: NodeRef::InTree(tree, i),
        })
    }

    /// A listed directory's tree (from the store's tree cache, or read again).
    fn tree_of(&self, dir: &Dir) -> Result<Option<Arc<Tree>>> {
        match &dir.tree {
            None => Ok(None),
            Some(id) => self
                .store
                .load_tree(id)
                .map(Some)
                .map_err(|e| self.io_error(dir.ino, e.to_string())),
        }
    }

    /// The made-up inode for `name` in `parent`, created on first sight.
    fn child_ino(&self, parent: u64, name: &[u8], what: What) -> u64 {
        let key = (parent, name.to_vec());
        let mut names = self.names.lock();
        if let Some(&ino) = names.get(&key) {
            return ino;
        }
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        self.inodes.write().insert(
            ino,
            Arc::new(Inode {
                what,
                parent,
                name: name.to_vec(),
                children: Mutex::new(None),
            }),
        );
        names.insert(key, ino);
        ino
    }

    /// The record of snapshot directory `ino`, made on its first listing: its entries get
    /// the next `count` inode numbers.
    fn dir(&self, ino: u64, snap: usize, node: &Node) -> Result<(Arc<Dir>, Option<Arc<Tree>>)> {
        if let Some(d) = self.dirs.read().by_ino.get(&ino).cloned() {
            let t = self.tree_of(&d)?;
            return Ok((d, t));
        }
        let tree = match node.subtree {
            Some(sub) => Some(
                self.store
                    .load_tree(&sub)
                    .map_err(|e| self.io_error(ino, e.to_string()))?,
            ),
            None => None,
        };
        let mut dirs = self.dirs.write();
        if let Some(d) = dirs.by_ino.get(&ino).cloned() {
            return Ok((d, tree));
        }
        let count = tree.as_ref().map_or(0, |t| t.nodes.len()) as u64;
        let base = self.next_ino.fetch_add(count.max(1), Ordering::Relaxed);
        let mut aliases = Vec::new();
        let mut pinned = false;
        if let Some(t) = &tree {
            // Entries a tree must not hold (see `Tree::sanitize`) are not shown.
            for r in &t.rejected {
                eprintln!(
                    "kloset: mount: {}/{}: {}; not shown",
                    self.path_of(ino),
                    String::from_utf8_lossy(&r.name).escape_debug(),
                    r.why
                );
            }
            let mut links = self.links.lock();
            for (i, n) in t.nodes.iter().enumerate() {
                if n.is_hardlink() {
                    pinned = true;
                    let first = *links
                        .entry((snap, n.dev, n.inode))
                        .or_insert(base + i as u64);
                    if first != base + i as u64 {
                        aliases.push((i as u32, first));
                    }
                }
            }
        }
        let d = Arc::new(Dir {
            ino,
            snap,
            tree: node.subtree,
            base,
            count,
            aliases,
            pinned,
        });
        dirs.by_ino.insert(ino, d.clone());
        dirs.by_base.insert(base, d.clone());
        Ok((d, tree))
    }

    fn short_snap_name(s: &SnapshotEntry) -> Vec<u8> {
        s.short().as_bytes().to_vec()
    }

    fn time_name(s: &SnapshotEntry) -> Vec<u8> {
        crate::cli::time(s.snap.time).replace(':', "-").into_bytes()
    }

    /// Entries of a directory inode (without `.` and `..`).
    fn list(&self, ino: u64) -> Result<Listing> {
        let inode = match self.found(ino)? {
            Found::Made(i) => i,
            Found::Node { snap, node, .. } => {
                if node.kind != NodeKind::Dir {
                    return Err(Error::NotDir);
                }
                let (d, t) = self.dir(ino, snap, &node)?;
                return Ok(Listing::Tree(d, t));
            }
        };
        if matches!(inode.what, What::StoreRoot | What::Virtual(_)) {
            self.refresh(false)?;
        }
        if let Some(c) = inode.children.lock().as_ref() {
            return Ok(Listing::Made(c.clone()));
        }
        let mut raw: Vec<(Vec<u8>, What, NodeKind)> = Vec::new();
        match &inode.what {
            What::StoreRoot => {
                let snaps = self.snaps.read();
                for (i, s) in snaps.iter().enumerate() {
                    let mut root = Node::new(b"/".to_vec(), NodeKind::Dir);
                    root.mode = 0o755;
                    root.mtime = s.snap.time;
                    root.ctime = s.snap.time;
                    root.subtree = Some(s.snap.root);
                    raw.push((
                        Self::short_snap_name(s),
                        What::Node {
                            snap: i,
                            node: Arc::new(root),
                        },
                        NodeKind::Dir,
                    ));
                }
                if let Some(last) = snaps.last() {
                    raw.push((
                        b"latest".to_vec(),
                        What::Link(Self::short_snap_name(last)),
                        NodeKind::Symlink,
                    ));
                }
                raw.push((
                    b"by-time".to_vec(),
                    What::Virtual(b"by-time".to_vec()),
                    NodeKind::Dir,
                ));
                raw.push((
                    b"by-tag".to_vec(),
                    What::Virtual(b"by-tag".to_vec()),
                    NodeKind::Dir,
                ));
            }
            What::Virtual(v) if v == b"by-time" => {
                for s in self.snaps.read().iter() {
                    let mut target = b"../".to_vec();
                    target.extend(Self::short_snap_name(s));
                    let mut name = Self::time_name(s);
                    name.push(b'_');
                    name.extend(Self::short_snap_name(s));
                    raw.push((name, What::Link(target), NodeKind::Symlink));
                }
            }
            What::Virtual(v) if v == b"by-tag" => {
                let mut tags: Vec<String> = self
                    .snaps
                    .read()
                    .iter()
                    .flat_map(|s| s.snap.tags.clone())
                    .filter(|t| !t.is_empty() && !t.contains('/'))
                    .collect();
                tags.sort();
                tags.dedup();
                for t in tags {
                    let mut v = b"by-tag/".to_vec();
                    v.extend(t.as_bytes());
                    raw.push((t.into_bytes(), What::Virtual(v), NodeKind::Dir));
                }
            }
            What::Virtual(v) => {
                let tag = String::from_utf8_lossy(&v[b"by-tag/".len()..]).into_owned();
                for s in self
                    .snaps
                    .read()
                    .iter()
                    .filter(|s| s.snap.tags.contains(&tag))
                {
                    let mut target = b"../../".to_vec();
                    target.extend(Self::short_snap_name(s));
                    let mut name = Self::time_name(s);
                    name.push(b'_');
                    name.extend(Self::short_snap_name(s));
                    raw.push((name, What::Link(target), NodeKind::Symlink));
                }
            }
            What::Link(_) | What::Node { .. } => return Err(Error::NotDir),
        }
        let mut entries: Vec<DirEntry> = raw
            .into_iter()
            .map(|(name, what, kind)| DirEntry {
                ino: self.child_ino(ino, &name, what),
                kind,
                name,
            })
            .collect();
        // Sorted by name, so lookups are binary searches (directories of thousands of files).
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let entries = Arc::new(entries);
        *inode.children.lock() = Some(entries.clone());
        Ok(Listing::Made(entries))
    }

    /// The path of an inode inside the mount, for log lines.
    pub fn path_of(&self, mut ino: u64) -> String {
        let mut parts = Vec::new();
        while ino != ROOT {
            match self.found(ino) {
                Ok(Found::Made(i)) => {
                    parts.push(String::from_utf8_lossy(&i.name).into_owned());
                    ino = i.parent;
                }
                Ok(Found::Node { parent, node, .. }) => {
                    let name = match self.inodes.read().get(&ino) {
                        Some(i) => i.name.clone(),
                        None => node.name.clone(),
                    };
                    parts.push(String::from_utf8_lossy(&name).into_owned());
                    ino = parent;
                }
                Err(_) => break,
            }
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn io_error(&self, ino: u64, msg: String) -> Error {
        eprintln!("kloset: mount: {}: {msg}", self.path_of(ino));
        Error::Io(msg)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        let entries = self.list(parent)?;
        let i = entries.position(name).ok_or(Error::NotFound)?;
        let ino = entries.get(i).ok_or(Error::NotFound)?.ino;
        self.getattr(ino)
    }

    /// The parent's inode and the entries of directory `ino`.
    pub fn readdir(&self, ino: u64) -> Result<(u64, Listing)> {
        let parent = match self.found(ino)? {
            Found::Made(i) => i.parent,
            Found::Node { parent, .. } => parent,
        };
        Ok((parent, self.list(ino)?))
    }

    fn blocks(&self, node: &Node) -> u64 {
        if node.blocks > 0 || node.size == 0 {
            return node.blocks;
        }
        let idx = self.store.index();
        let bytes: u64 = node
            .content
            .iter()
            .filter(|c| **c != self.zero_chunk)
            .filter_map(|c| idx.get(c))
            .map(|l| l.raw_length as u64)
            .sum();
        bytes.div_ceil(512)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let found = self.found(ino)?;
        let now = self.mount_time;
        let dir = |mode: u32| Attr {
            ino,
            kind: NodeKind::Dir,
            size: 0,
            blocks: 0,
            mode,
            nlink: 2,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            rdev: 0,
            mtime: now,
            ctime: now,
        };
        let node = match found {
            Found::Node { node, .. } => node,
            Found::Made(i) => {
                return Ok(match &i.what {
                    What::Link(t) => Attr {
                        kind: NodeKind::Symlink,
                        size: t.len() as u64,
                        mode: 0o777,
                        nlink: 1,
                        ..dir(0o777)
                    },
                    _ => dir(0o555),
                });
            }
        };
        Ok(Attr {
            ino,
            kind: node.kind,
            size: node.size,
            blocks: match node.kind {
                NodeKind::File => self.blocks(&node),
                NodeKind::Dir => 8,
                _ => 0,
            },
            mode: node.mode,
            nlink: match node.kind {
                NodeKind::Dir => 2,
                _ => node.nlink.clamp(1, u32::MAX as u64) as u32,
            },
            uid: node.uid,
            gid: node.gid,
            rdev: node.rdev,
            mtime: systime(node.mtime),
            ctime: systime(node.ctime),
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        match self.found(ino)? {
            Found::Made(i) => match &i.what {
                What::Link(t) => Ok(t.clone()),
                _ => Err(Error::NotLink),
            },
            Found::Node { node, .. } if node.kind == NodeKind::Symlink => Ok(node.target.clone()),
            Found::Node { .. } => Err(Error::NotLink),
        }
    }

    /// Open a file for reading; returns a handle.
    pub fn open(&self, ino: u64) -> Result<u64> {
        let h = Arc::new(self.make_open(ino)?);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(fh, h);
        Ok(fh)
    }

    /// The read state of a file, built from its chunk list.
    fn make_open(&self, ino: u64) -> Result<Open> {
        self.openable(ino)?;
        let Found::Node { node, .. } = self.found(ino)? else {
            return Err(Error::NotFound);
        };
        let mut offsets = Vec::with_capacity(node.content.len() + 1);
        let mut off = 0u64;
        {
            let idx = self.store.index();
            for c in &node.content {
                offsets.push(off);
                let l = idx
                    .get(c)
                    .filter(|l| l.kind == BlobKind::Data)
                    .ok_or_else(|| {
                        self.io_error(
                            ino,
                            format!("chunk {} is missing from the store", c.short()),
                        )
                    })?;
                off += l.raw_length as u64;
            }
        }
        offsets.push(off);
        let runs: Vec<std::ops::Range<usize>> = crate::store::stream::plan_runs(
            &self.store,
            &node.content,
            crate::store::stream::RUN_BYTES,
        )
        .into_iter()
        .map(|r| r.ids)
        .collect();
        Ok(Open {
            ino,
            content: node.content.clone(),
            offsets,
            next: Mutex::new((0, 0)),
            runs,
        })
    }

    /// Check that `ino` can be opened for reading (for kernels that skip OPEN requests).
    pub fn openable(&self, ino: u64) -> Result<()> {
        match self.found(ino)? {
            Found::Node { node, .. } if node.kind == NodeKind::File => Ok(()),
            Found::Node { node, .. } if node.kind == NodeKind::Dir => Err(Error::IsDir),
            Found::Made(i) if matches!(i.what, What::StoreRoot | What::Virtual(_)) => {
                Err(Error::IsDir)
            }
            _ => Err(Error::NotFound),
        }
    }

    /// Read without an open handle: the kernel sends no OPEN/RELEASE when the filesystem
    /// supports "no open" (one request per small file instead of three). The read state is
    /// kept per inode in a small LRU.
    pub fn read_ino(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let cached = self.by_ino.lock().get(&ino).cloned();
        let h = match cached {
            Some(h) => h,
            None => {
                let h = Arc::new(self.make_open(ino)?);
                self.by_ino.lock().put(ino, h.clone());
                h
            }
        };
        self.read_open(&h, offset, size)
    }

    pub fn release(&self, fh: u64) {
        self.handles.write().remove(&fh);
    }

    /// Read up to `size` bytes at `offset`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self
            .handles
            .read()
            .get(&fh)
            .cloned()
            .ok_or(Error::BadHandle)?;
        self.read_open(&h, offset, size)
    }

    fn read_open(&self, h: &Open, offset: u64, size: u32) -> Result<Vec<u8>> {
        let end_of_file = *h.offsets.last().expect("at least the end offset");
        if offset >= end_of_file || size == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(end_of_file);
        // The chunk holding `offset`.
        let first = h.offsets.partition_point(|&o| o <= offset) - 1;
        // Sequential? Grow the prefetch window (doubling, up to `max_ahead` bytes); random:
        // reset it to one chunk ahead.
        let (sequential, window) = {
            let mut n = h.next.lock();
            let sequential = n.0 == offset;
            let w = if sequential {
                n.1.saturating_mul(2).max(FIRST_WINDOW).min(self.max_ahead)
            } else {
                0
            };
            *n = (end, w);
            (sequential, w)
        };
        // A sequential reader of a large file streams: its chunks stay in the cache's ring.
        let streaming = sequential && h.content.len() >= STREAMED_FILE_CHUNKS;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut i = first;
        while i < h.content.len() && h.offsets[i] < end {
            // Start the fetches ahead before waiting on this one: the runs the window reaches
            // into, each one range read, from the next chunk on (the reader has this one and
            // those before it; asking again for a passed chunk that left the cache would
            // read it again for nobody).
            let ahead = window_ahead(&h.offsets, i, window);
            let from = h.runs.partition_point(|r| r.end <= ahead.start);
            for r in h.runs[from..].iter().take_while(|r| r.start < ahead.end) {
                self.cache
                    .prefetch_run(&h.content[r.start.max(ahead.start)..r.end]);
            }
            let c = self
                .cache
                .get(&h.content[i], streaming)
                .map_err(|e| self.io_error(h.ino, e))?;
            let cs = h.offsets[i];
            let from = offset.max(cs) - cs;
            let to = (end.min(h.offsets[i + 1]) - cs) as usize;
            if to > c.len() {
                return Err(self.io_error(h.ino, "chunk is shorter than the index says".into()));
            }
            out.extend_from_slice(&c[from as usize..to]);
            // Read to its end: to the ring's new end, so what the reader passed leaves last.
            let read_to_end = to == c.len();
            drop(c);
            if read_to_end && streaming {
                self.cache.passed(&h.content[i]);
            }
            i += 1;
        }
        Ok(out)
    }

    fn node(&self, ino: u64) -> Result<NodeRef> {
        match self.found(ino)? {
            Found::Node { node, .. } => Ok(node),
            Found::Made(_) => Err(Error::NoXattr),
        }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let n = match self.node(ino) {
            Ok(n) => n,
            Err(_) => return Err(Error::NoXattr),
        };
        n.xattrs
            .iter()
            .find(|x| x.name == name)
            .map(|x| x.value.clone())
            .ok_or(Error::NoXattr)
    }

    /// Attribute names, each followed by a NUL, as listxattr returns them.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        if let Ok(n) = self.node(ino) {
            for x in &n.xattrs {
                out.extend_from_slice(&x.name);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// (total blocks of 4 KiB, files) for statfs.
    pub fn statfs(&self) -> (u64, u64) {
        let idx = self.store.index();
        let bytes: u64 = idx.iter().map(|(_, l)| l.raw_length as u64).sum();
        (bytes.div_ceil(4096), idx.blob_count() as u64)
    }

    /// How long the kernel may cache entries and attributes of this inode.
    pub fn ttl(&self, ino: u64) -> Duration {
        match self.inodes.read().get(&ino).map(|i| &i.what) {
            Some(What::Node { .. }) if ino != ROOT || !self.whole_store => {
                Duration::from_secs(86_400)
            }
            Some(_) => Duration::from_secs(1),
            // A snapshot entry (never changes).
            None => Duration::from_secs(86_400),
        }
    }

    /// The kernel was given inode `ino` (a lookup, or an entry of readdirplus): FUSE's lookup
    /// count. Counted for snapshot directories only, whose records [`SnapshotFs::forget`]
    /// drops.
    pub fn remembered(&self, ino: u64, kind: NodeKind) {
        if kind == NodeKind::Dir && !self.inodes.read().contains_key(&ino) {
            *self.lookups.lock().entry(ino).or_insert(0) += 1;
        }
    }

    /// The kernel forgot `n` of the lookups of `ino`. A snapshot directory it no longer knows
    /// loses its record (it is made again, with new numbers for its entries, if the kernel
    /// looks it up again): so a mount's memory follows what the kernel holds, not all that
    /// was ever listed. The kernel forgets a directory only after all its entries (each
    /// holds its parent), so no number it still knows goes with the record.
    pub fn forget(&self, ino: u64, n: u64) {
        {
            let mut l = self.lookups.lock();
            let Some(c) = l.get_mut(&ino) else { return };
            *c = c.saturating_sub(n);
            if *c > 0 {
                return;
            }
            l.remove(&ino);
        }
        let mut dirs = self.dirs.write();
        if let Some(d) = dirs.by_ino.get(&ino).cloned()
            && !d.pinned
        {
            dirs.by_ino.remove(&ino);
            dirs.by_base.remove(&d.base);
            self.forgotten.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (directory records kept, records dropped on forgets): for tracing and tests.
    pub fn dir_records(&self) -> (usize, u64) {
        (
            self.dirs.read().by_ino.len(),
            self.forgotten.load(Ordering::Relaxed),
        )
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::backup::{BackupOptions, Progress};

    fn fixture() -> (tempfile::TempDir, Arc<Store>, Arc<crate::store::MemBackend>) {
        let src = tempfile::tempdir().unwrap();
        let d = src.path();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/small.txt"), b"hello").unwrap();
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        std::fs::write(d.join("big.bin"), &big).unwrap();
        std::fs::hard_link(d.join("big.bin"), d.join("big-link.bin")).unwrap();
        std::os::unix::fs::symlink("a/b/small.txt", d.join("ln")).unwrap();
        let _ = xattr::set(d.join("a/b/small.txt"), "user.k", b"v");
        let (store, mem) = memory_store(d, vec!["t1".into()]);
        (src, store, mem)
    }

    /// A store in memory (fast key derivation) holding one backup of `dir`, index loaded.
    /// `len` incompressible bytes (xorshift from `seed`), the same for the same seed.
    pub(crate) fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    pub(crate) fn memory_store(
        dir: &std::path::Path,
        tags: Vec<String>,
    ) -> (Arc<Store>, Arc<crate::store::MemBackend>) {
        let mem = Arc::new(crate::store::MemBackend::new());
        let opts = crate::store::CreateOptions {
            kdf: crate::store::crypto::KdfParams {
                m_kib: 64,
                t: 1,
                p: 1,
            },
            ..Default::default()
        };
        let store = Arc::new(Store::create(mem.clone(), &opts, &|_| Ok(b"t".to_vec())).unwrap());
        let source = crate::store::LocalSource::new(dir).unwrap();
        let bo = BackupOptions {
            tags,
            ..Default::default()
        };
        crate::store::backup::run(&store, &source, &bo, &Progress::default()).unwrap();
        store.load_index().unwrap();
        (store, mem)
    }

    fn walk(fs: &SnapshotFs, mut ino: u64, path: &[u8]) -> Attr {
        let mut a = fs.getattr(ino).unwrap();
        for c in crate::store::tree::components(path) {
            a = fs.lookup(ino, c).unwrap();
            ino = a.ino;
        }
        a
    }

    #[test]
    fn whole_store_layout_and_reads() {
        let (src, store, _mem) = fixture();
        let fs = SnapshotFs::new(
            store.clone(),
            MountConfig {
                cache_bytes: 64 << 20,
                root: None,
            },
        )
        .unwrap();
        let (_, root) = fs.readdir(ROOT).unwrap();
        let names: Vec<_> = root
            .iter()
            .map(|e| String::from_utf8_lossy(e.name).into_owned())
            .collect();
        assert!(names.contains(&"latest".to_string()));
        assert!(names.contains(&"by-time".to_string()));
        let id = names.iter().find(|n| n.len() == 8).unwrap().clone();
        let latest = fs.lookup(ROOT, b"latest").unwrap();
        assert_eq!(fs.readlink(latest.ino).unwrap(), id.as_bytes());
        let tagdir = walk(&fs, ROOT, b"by-tag/t1");
        let (_, tagged) = fs.readdir(tagdir.ino).unwrap();
        assert_eq!(tagged.len(), 1);

        let base = format!("{id}{}", src.path().display());
        let small = walk(&fs, ROOT, format!("{base}/a/b/small.txt").as_bytes());
        assert_eq!(small.size, 5);
        let fh = fs.open(small.ino).unwrap();
        assert_eq!(fs.read(fh, 0, 100).unwrap(), b"hello");
        assert_eq!(fs.read(fh, 2, 2).unwrap(), b"ll");
        assert_eq!(fs.read(fh, 10, 2).unwrap(), b"");
        fs.release(fh);
        // Without a handle ("no open" kernels), by inode.
        assert_eq!(fs.read_ino(small.ino, 1, 3).unwrap(), b"ell");
        assert!(fs.openable(small.ino).is_ok());
        assert!(matches!(fs.openable(ROOT), Err(Error::IsDir)));
        if !small.kind.eq(&NodeKind::Dir) {
            let x = fs.getxattr(small.ino, b"user.k");
            if let Ok(v) = x {
                assert_eq!(v, b"v");
                assert_eq!(fs.listxattr(small.ino).unwrap(), b"user.k\0");
            }
        }
        assert!(matches!(
            fs.getxattr(small.ino, b"user.none"),
            Err(Error::NoXattr)
        ));

        // Big file, read in odd-sized pieces across chunk boundaries.
        let big = walk(&fs, ROOT, format!("{base}/big.bin").as_bytes());
        let want = std::fs::read(src.path().join("big.bin")).unwrap();
        let fh = fs.open(big.ino).unwrap();
        let mut got = Vec::new();
        let mut off = 0;
        while off < want.len() as u64 {
            let b = fs.read(fh, off, 131_071).unwrap();
            assert!(!b.is_empty());
            off += b.len() as u64;
            got.extend(b);
        }
        assert_eq!(got, want);
        // Hard links share one inode.
        let link = walk(&fs, ROOT, format!("{base}/big-link.bin").as_bytes());
        assert_eq!(link.ino, big.ino);
        assert_eq!(link.nlink, 2);
        let ln = walk(&fs, ROOT, format!("{base}/ln").as_bytes());
        assert_eq!(fs.readlink(ln.ino).unwrap(), b"a/b/small.txt");
        assert!(matches!(fs.lookup(ROOT, b"nope"), Err(Error::NotFound)));
        assert!(matches!(fs.open(ROOT), Err(Error::IsDir)));
    }

    /// A mount of `store` with a cache of `cache_bytes`, the inode of the file `big` backed up
    /// from `src`, and its chunks.
    fn mount_big(
        store: &Arc<Store>,
        src: &std::path::Path,
        cache_bytes: usize,
    ) -> (Arc<SnapshotFs>, u64, Vec<BlobId>) {
        use std::os::unix::ffi::OsStrExt;
        let fs = SnapshotFs::new(
            store.clone(),
            MountConfig {
                cache_bytes,
                root: None,
            },
        )
        .unwrap();
        let (_, root) = fs.readdir(ROOT).unwrap();
        let id = root
            .iter()
            .find(|e| e.name.len() == 8)
            .unwrap()
            .name
            .to_vec();
        let file = [src.as_os_str().as_bytes(), b"/big"].concat();
        let ino = walk(&fs, ROOT, &[id.as_slice(), &file].concat()).ino;
        let snap = store.resolve_snapshot("latest").unwrap();
        let content = store.lookup(&snap, &file).unwrap().content;
        (fs, ino, content)
    }

    /// Read `len` bytes of `ino` in order, `piece` bytes a read, as `cat` does.
    fn read_in_pieces(fs: &SnapshotFs, ino: u64, len: usize, piece: u32) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        while got.len() < len {
            let b = fs.read_ino(ino, got.len() as u64, piece).unwrap();
            assert!(!b.is_empty());
            got.extend(b);
        }
        got
    }

    /// A cold sequential read of a large file is read ahead in runs of its chunks, each run a
    /// range read or two, not a read per chunk (a round trip or three each over a network).
    #[test]
    fn a_large_file_read_in_order_is_fetched_runs_at_a_time() {
        let src = tempfile::tempdir().unwrap();
        let data = noise(40 << 20, 0x9e37_79b9_7f4a_7c15);
        std::fs::write(src.path().join("big"), &data).unwrap();
        let (store, mem) = memory_store(src.path(), Vec::new());
        let (fs, ino, content) = mount_big(&store, src.path(), 256 << 20);
        let chunks = content.len() as u64;
        assert!(chunks >= 20, "{chunks} chunks");
        let before = mem.range_reads();
        let got = read_in_pieces(&fs, ino, data.len(), 256 << 10);
        assert!(got == data, "content read in order");
        let reads = mem.range_reads() - before;
        assert!(
            reads * 2 <= chunks,
            "{reads} pack reads for a file of {chunks} chunks read in order"
        );
    }

    #[test]
    fn the_window_ahead_covers_the_chunks_starting_within_it() {
        // Four chunks of 1 MiB, then one of 2 MiB: starts 0, 1, 2, 3, 4 MiB, end 6 MiB.
        let mib = 1u64 << 20;
        let offsets = [0, mib, 2 * mib, 3 * mib, 4 * mib, 6 * mib];
        assert_eq!(
            window_ahead(&offsets, 0, 0),
            1..2,
            "one chunk ahead at least"
        );
        assert_eq!(window_ahead(&offsets, 0, 2 * mib), 1..4);
        assert_eq!(window_ahead(&offsets, 1, 100 * mib), 2..5);
        assert_eq!(window_ahead(&offsets, 3, 0), 4..5);
        assert_eq!(
            window_ahead(&offsets, 4, 100 * mib),
            5..5,
            "nothing past the end"
        );
        assert_eq!(window_ahead(&[0], 0, mib), 0..0, "an empty file");
        // A cache smaller than the first window still gets a window (never a panic).
        assert_eq!(max_ahead(8, 64 << 20), 32 << 20);
        assert_eq!(max_ahead(4, 1 << 10), 512);
    }

    /// A sequential reader's window never reaches further than its chunks can wait in the
    /// cache's ring: each chunk is read from the store once (a window of a fixed number of
    /// chunks, larger than the ring, read a third of a 384 MiB file twice at 20 ms, a cold
    /// `cat` through the mount taking 1.9 times the restore of that file).
    #[test]
    fn a_file_read_in_order_is_read_from_the_store_once() {
        let src = tempfile::tempdir().unwrap();
        let data = noise(96 << 20, 0x51_7cc1_b727_220a);
        std::fs::write(src.path().join("big"), &data).unwrap();
        let (store, mem) = memory_store(src.path(), Vec::new());
        let (fs, ino, content) = mount_big(&store, src.path(), 32 << 20);
        // What reading the file's runs once asks for.
        let planned: u64 =
            crate::store::stream::plan_runs(&store, &content, crate::store::stream::RUN_BYTES)
                .iter()
                .map(|r| r.range_bytes())
                .sum();
        let before = mem.range_bytes();
        let got = read_in_pieces(&fs, ino, data.len(), 128 << 10);
        assert!(got == data, "content read in order");
        let read = mem.range_bytes() - before;
        assert!(
            read <= planned + planned / 20,
            "{read} bytes read from packs where reading each run once reads {planned}"
        );
    }

    /// A sequential read of a file larger than the cache's ring keeps only the ring of chunks
    /// it has gone past (and decompresses into their buffers as they leave), and what left can
    /// be prefetched again for the next reader; a file read out of order stays cached whole.
    #[test]
    fn a_large_file_read_in_order_is_streamed_through_a_ring() {
        let src = tempfile::tempdir().unwrap();
        // 80 MiB (more than the ring and a largest chunk): the first half compresses to about
        // half (chunks read one by one), the second to about an eighth (chunks read in pack
        // ranges with their neighbours).
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut data = Vec::with_capacity(80 << 20);
        for block in 0..(80 << 20) / 4096 {
            let noisy = if block < (40 << 20) / 4096 { 2048 } else { 512 };
            for k in 0..4096 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.push(if k < noisy { x as u8 } else { 0 });
            }
        }
        std::fs::write(src.path().join("big"), &data).unwrap();
        let (store, _mem) = memory_store(src.path(), Vec::new());
        let mount_with = |cache_bytes: usize| {
            SnapshotFs::new(
                store.clone(),
                MountConfig {
                    cache_bytes,
                    root: None,
                },
            )
            .unwrap()
        };
        let mount = || mount_with(256 << 20);
        let ring = super::cache::STREAM_RING;
        let fs = mount();
        let (_, root) = fs.readdir(ROOT).unwrap();
        let id = root
            .iter()
            .find(|e| e.name.len() == 8)
            .unwrap()
            .name
            .to_vec();
        use std::os::unix::ffi::OsStrExt;
        let path = [id.as_slice(), src.path().as_os_str().as_bytes(), b"/big"].concat();

        let read_in_order = |fs: &SnapshotFs| {
            let f = walk(fs, ROOT, &path);
            let mut got = Vec::with_capacity(data.len());
            while got.len() < data.len() {
                let b = fs.read_ino(f.ino, got.len() as u64, 256 << 10).unwrap();
                assert!(!b.is_empty());
                got.extend(b);
            }
            assert!(got == data, "content read in order");
        };
        read_in_order(&fs);
        let held = fs.cache.bytes();
        assert!(
            held <= ring + (8 << 20),
            "{held} bytes cached after streaming 80 MiB through a ring of {ring}"
        );
        // In a 16 MiB cache (all ring), chunks leave early and lend their buffers.
        let small = mount_with(16 << 20);
        read_in_order(&small);
        assert!(small.cache.reused_buffers() > 0, "no buffer was reused");
        // A chunk that left the ring is prefetched again for the next reader.
        let snap = store.resolve_snapshot("latest").unwrap();
        let node = store
            .lookup(
                &snap,
                &[src.path().as_os_str().as_bytes(), b"/big"].concat(),
            )
            .unwrap();
        // One of the first chunks, too large to come back as a pack range's neighbour.
        let first = *node
            .content
            .iter()
            .take(8)
            .find(|c| store.index().get(c).unwrap().length > 256 << 10)
            .expect("a large chunk among the first");
        assert!(!fs.cache.holds(&first), "an early chunk left the ring");
        fs.cache.prefetch(first);
        let t = std::time::Instant::now();
        while !fs.cache.holds(&first) {
            assert!(
                t.elapsed().as_secs() < 20,
                "the chunk was not prefetched again"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        // Out of order (last chunk first): nothing is streamed, the whole file stays cached.
        let fs = mount();
        let f = walk(&fs, ROOT, &path);
        let mut end = data.len();
        while end > 0 {
            let start = end.saturating_sub(1 << 20);
            let b = fs
                .read_ino(f.ino, start as u64, (end - start) as u32)
                .unwrap();
            assert!(b == data[start..end], "content at {start}");
            end = start;
        }
        assert!(
            fs.cache.bytes() >= data.len(),
            "{} bytes cached after reading 80 MiB backwards",
            fs.cache.bytes()
        );
    }

    /// Issue 13: a tree with `..`, a name holding `/`, and a directory `d` followed by a
    /// symlink `d` to elsewhere: the mount shows the directory only.
    #[test]
    fn entries_a_tree_must_not_hold_are_not_shown() {
        use crate::store::format::{BlobKind, Snapshot, SnapshotStats};
        use crate::store::tree::{Time, Tree};
        let src = tempfile::tempdir().unwrap();
        let (store, _mem) = memory_store(src.path(), Vec::new());
        let packer = crate::store::repo::Packer::new(&store);
        let put = |raw: Vec<u8>| {
            let id = store.crypto().blob_id(&raw);
            if !packer.claim(&id) {
                packer.add(BlobKind::Tree, id, &raw).unwrap();
            }
            id
        };
        let mut d = Node::new(b"d".to_vec(), NodeKind::Dir);
        d.subtree = Some(put(Tree::default().encode()));
        let mut link = Node::new(b"d".to_vec(), NodeKind::Symlink);
        link.target = b"/etc".to_vec();
        let nodes = vec![
            d,
            link,
            Node::new(b"..".to_vec(), NodeKind::Dir),
            Node::new(b"a/b".to_vec(), NodeKind::File),
        ];
        let root = put(Tree {
            nodes,
            ..Tree::default()
        }
        .encode());
        packer.finish().unwrap();
        let id = store
            .write_snapshot(&Snapshot {
                time: Time {
                    sec: 2_000_000_000,
                    nsec: 0,
                },
                host: "h".into(),
                user: "u".into(),
                source: "/".into(),
                path: b"/".to_vec(),
                tags: Vec::new(),
                root,
                parent: None,
                stats: SnapshotStats::default(),
                errors: Vec::new(),
                duration_ms: 0,
            })
            .unwrap();
        let fs = SnapshotFs::new(
            store.clone(),
            MountConfig {
                cache_bytes: 1 << 20,
                root: None,
            },
        )
        .unwrap();
        let dir = walk(&fs, ROOT, &id.as_bytes()[..8]);
        let (_, entries) = fs.readdir(dir.ino).unwrap();
        let names: Vec<&[u8]> = entries.iter().map(|e| e.name).collect();
        assert_eq!(names, vec![&b"d"[..]]);
        assert_eq!(entries.get(0).unwrap().kind, NodeKind::Dir);
        assert!(matches!(fs.lookup(dir.ino, b".."), Err(Error::NotFound)));
    }

    #[test]
    fn sub_path_mount_and_damage_is_eio() {
        let (_src, store, mem) = fixture();
        let snap = store.resolve_snapshot("latest").unwrap();
        let path = crate::store::tree::join(&snap.snap.path, b"a");
        let fs = SnapshotFs::new(
            store.clone(),
            MountConfig {
                cache_bytes: 1 << 20,
                root: Some((snap, path)),
            },
        )
        .unwrap();
        let f = walk(&fs, ROOT, b"b/small.txt");
        assert_eq!(f.size, 5);
        // Damage every data blob: reads fail with EIO, metadata still works.
        let damaged: Vec<(String, u32, u32)> = {
            let idx = store.index();
            idx.iter()
                .filter(|(_, l)| l.kind == BlobKind::Data)
                .map(|(_, l)| (idx.pack_name(l.pack).to_string(), l.offset, l.length))
                .collect()
        };
        for (pack, off, len) in damaged {
            mem.tamper(crate::store::FileType::Pack, &pack, |b| {
                b[(off + len / 2) as usize] ^= 1
            });
        }
        let fh = fs.open(f.ino).unwrap();
        let r = fs.read(fh, 0, 10);
        assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
        assert_eq!(r.unwrap_err().errno(), libc::EIO);
        assert_eq!(walk(&fs, ROOT, b"b").kind, NodeKind::Dir);
    }

    #[test]
    fn the_inode_table_keeps_nothing_per_file() {
        // 30 directories of 200 files, hard links between two of them.
        let src = tempfile::tempdir().unwrap();
        for d in 0..30 {
            let dir = src.path().join(format!("d{d:02}"));
            std::fs::create_dir(&dir).unwrap();
            for f in 0..200 {
                std::fs::write(dir.join(format!("f{f:03}")), format!("{d}/{f}")).unwrap();
            }
        }
        std::fs::hard_link(src.path().join("d00/f000"), src.path().join("d29/zz-link")).unwrap();
        let (store, _mem) = memory_store(src.path(), vec![]);
        let fs = SnapshotFs::new(
            store,
            MountConfig {
                cache_bytes: 8 << 20,
                root: None,
            },
        )
        .unwrap();
        // Walk everything, as `find` does, twice: the same inodes both times.
        let walk_all = |fs: &SnapshotFs| {
            let mut seen: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut todo = vec![(ROOT, Vec::new())];
            while let Some((ino, path)) = todo.pop() {
                let (_, entries) = fs.readdir(ino).unwrap();
                for e in entries.iter() {
                    let mut p = path.clone();
                    p.push(b'/');
                    p.extend_from_slice(e.name);
                    let a = fs.lookup(ino, e.name).unwrap();
                    assert_eq!(a.ino, e.ino);
                    if e.kind == NodeKind::Dir && !p.starts_with(b"/by-") {
                        todo.push((e.ino, p.clone()));
                    }
                    seen.push((p, a.ino));
                }
            }
            seen.sort();
            seen
        };
        let first = walk_all(&fs);
        assert_eq!(first, walk_all(&fs));
        let files = first.iter().filter(|(p, _)| p.contains(&b'f')).count();
        assert!(files >= 30 * 200, "{files}");
        // Every path its own inode but the hard link, which shares its first one.
        let mut inos: Vec<u64> = first.iter().map(|e| e.1).collect();
        inos.sort();
        inos.dedup();
        assert_eq!(inos.len(), first.len() - 1);
        let ino_of = |suffix: &[u8]| first.iter().find(|(p, _)| p.ends_with(suffix)).unwrap().1;
        assert_eq!(ino_of(b"/d00/f000"), ino_of(b"/d29/zz-link"));
        // Kept one by one: the made-up inodes and the snapshot root; a record per directory.
        assert!(fs.inodes.read().len() < 8, "{}", fs.inodes.read().len());
        assert!(fs.names.lock().len() < 8);
        let dirs = fs.dirs.read().by_ino.len();
        let depth = crate::store::tree::components(src.path().as_os_str().as_encoded_bytes()).len();
        assert_eq!(dirs, 30 + depth + 1, "one record per listed directory");
        assert_eq!(fs.links.lock().len(), 1);
        // A number no listing gave out is nothing.
        assert!(matches!(
            fs.getattr(inos[inos.len() - 1] + 1000),
            Err(Error::NotFound)
        ));
        let path = String::from_utf8_lossy(
            &first
                .iter()
                .find(|(p, _)| p.ends_with(b"d07/f123"))
                .unwrap()
                .0,
        )
        .into_owned();
        assert_eq!(fs.path_of(ino_of(b"d07/f123")), path);
    }

    #[test]
    fn a_directory_the_kernel_forgets_loses_its_record() {
        let src = tempfile::tempdir().unwrap();
        for d in 0..3 {
            let dir = src.path().join(format!("d{d}"));
            std::fs::create_dir(&dir).unwrap();
            for f in 0..50 {
                std::fs::write(dir.join(format!("f{f:02}")), format!("{d}/{f}")).unwrap();
            }
        }
        std::fs::hard_link(src.path().join("d1/f00"), src.path().join("d2/link")).unwrap();
        let (store, _mem) = memory_store(src.path(), vec![]);
        let fs = SnapshotFs::new(
            store,
            MountConfig {
                cache_bytes: 8 << 20,
                root: None,
            },
        )
        .unwrap();
        // As the kernel does: every inode it is given counts.
        let look = |parent: u64, name: &[u8]| {
            let a = fs.lookup(parent, name).unwrap();
            fs.remembered(a.ino, a.kind);
            a
        };
        let (_, root) = fs.readdir(ROOT).unwrap();
        let id = root
            .iter()
            .find(|e| e.name.len() == 8)
            .unwrap()
            .name
            .to_vec();
        let mut top = look(ROOT, &id).ino;
        for c in crate::store::tree::components(src.path().as_os_str().as_encoded_bytes()) {
            top = look(top, c).ino;
        }
        let d0 = look(top, b"d0");
        let before = look(d0.ino, b"f07");
        let (kept, _) = fs.dir_records();
        // Looked up twice: one forget of one lookup is not enough.
        look(top, b"d0");
        fs.forget(d0.ino, 1);
        assert_eq!(fs.dir_records(), (kept, 0));
        fs.forget(d0.ino, 1);
        assert_eq!(fs.dir_records(), (kept - 1, 1));
        // Looked up again: the same directory, its entries numbered anew, the same contents.
        let again = look(top, b"d0");
        assert_eq!(again.ino, d0.ino);
        let after = look(d0.ino, b"f07");
        assert_eq!(
            Attr {
                ino: 0,
                ..after.clone()
            },
            Attr {
                ino: 0,
                ..before.clone()
            }
        );
        assert_eq!(fs.read_ino(after.ino, 0, 100).unwrap(), b"0/7");
        assert!(fs.path_of(after.ino).ends_with("/d0/f07"));
        // A directory holding hard links keeps its record: other entries carry its numbers.
        let d1 = look(top, b"d1");
        let d2 = look(top, b"d2");
        let link = look(d2.ino, b"link");
        assert_eq!(link.ino, look(d1.ino, b"f00").ino);
        let (kept, dropped) = fs.dir_records();
        fs.forget(d1.ino, 1);
        fs.forget(d2.ino, 1);
        assert_eq!(fs.dir_records(), (kept, dropped));
        assert_eq!(fs.read_ino(link.ino, 0, 100).unwrap(), b"1/0");
        // Forgetting what was never counted changes nothing.
        fs.forget(ROOT, 5);
        fs.forget(u64::MAX, 1);
        assert_eq!(fs.dir_records(), (kept, dropped));
    }
}
