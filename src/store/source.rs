//! The source connector: a tree to back up.
//!
//! A [`Source`] answers "what is at this path" ([`Source::stat`]), "what is in this directory"
//! ([`Source::read_dir`], entries with their metadata; extended attributes on request through
//! [`Source::load_xattrs`]) and "give me this file's bytes" ([`Source::open`]). Paths are
//! absolute raw bytes. [`LocalSource`] reads the local filesystem with `lstat`, never following
//! symlinks; the SFTP source lives in `crate::sftp`.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, OFlags};

use super::dirfd::{DirTree, check_name, proc_path};
use super::error::{Error, IoContext, Result};
use super::tree::{Node, NodeKind, Time, Xattr};

pub trait Source: Send + Sync {
    /// What the user named, as recorded in the snapshot (`/var/www`, `sftp://host/srv`).
    fn describe(&self) -> String;
    /// The absolute path of the tree to back up.
    fn root(&self) -> Vec<u8>;
    /// Does the source report inode numbers and ctimes (so they can be compared with the parent
    /// snapshot)? Sources that do not are compared on size and mtime only.
    fn has_inodes(&self) -> bool;
    /// Metadata of one path, not following a final symlink. The node's name is the last
    /// component of `path`.
    fn stat(&self, path: &[u8]) -> Result<Node>;
    /// [`Source::stat`] of each path, in the same order: all at once where the source can
    /// (a remote one: one round trip for all). Ends early, after an error saying the source
    /// cannot be reached ([`stat_each`]).
    fn stat_many(&self, paths: &[Vec<u8>]) -> Vec<Result<Node>> {
        stat_each(paths, |p| self.stat(p))
    }
    /// The entries of a directory with their metadata, in any order. Extended attributes may
    /// be left unread: the walk reuses the parent snapshot's for entries whose ctime and inode
    /// have not moved (every change to an attribute moves the ctime) and asks
    /// [`Source::load_xattrs`] for the others.
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>>;
    /// Read the extended attributes of `path` into `node` (replacing what it has). Best effort,
    /// like the rest of the attribute reading: a filesystem without them leaves `node` without.
    /// Sources whose `read_dir` already fills them in keep this default, which does nothing.
    fn load_xattrs(&self, _path: &[u8], _node: &mut Node) {}
    /// The contents of a regular file; `size` is its size as the walk saw it (a remote source
    /// reads no more than that, so it requests nothing past the end).
    fn open(&self, path: &[u8], size: u64) -> Result<Box<dyn Read + Send>>;
    /// Has the file at `path` changed since the walk saw it as `seen` (size, mtime, and where
    /// the source has them ctime and inode)? Asked after a file was read, to tell a file read
    /// whole from one that moved under the reader. Returns its state now when it changed.
    fn changed(&self, path: &[u8], seen: &Node) -> Result<Option<Node>> {
        let now = self.stat(path)?;
        Ok((!same_state(&now, seen, self.has_inodes())).then_some(now))
    }
    /// Start reading the first `len` bytes of a file that [`Source::open`] will be asked for
    /// soon, without waiting for them. Only a hint: sources without a cheap way to do it, and
    /// any error, do nothing.
    fn prefetch(&self, _path: &[u8], _len: u64) {}
    /// Threads that list directories ahead of the walk: [`super::backup::LISTER_THREADS`]
    /// unless listing costs this source little but waiting (a pipelined remote one).
    fn listers(&self) -> usize {
        super::backup::LISTER_THREADS
    }
    /// Does a listing wait on a network (a round trip or more each)? Then the directories
    /// of the parent snapshot are listed ahead all at once ([`super::backup::Lister`]),
    /// rather than each level once the one above it is listed.
    fn is_remote(&self) -> bool {
        false
    }
}

/// `stat` of each path in turn, up to the first error saying the source cannot be reached
/// (which ends the backup): on a silent server each of the others would wait out the whole
/// timeout again.
pub fn stat_each(
    paths: &[Vec<u8>],
    mut stat: impl FnMut(&[u8]) -> Result<Node>,
) -> Vec<Result<Node>> {
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let r = stat(p);
        let lost = matches!(&r, Err(e) if e.kind() == super::error::ErrorKind::Unreachable);
        out.push(r);
        if lost {
            break;
        }
    }
    out
}

pub fn os(path: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(path))
}

/// The local filesystem, walked through directory handles ([`DirTree`]): below the root,
/// every directory is opened relative to its parent without following symlinks, so a
/// directory swapped for a symlink while the backup runs ends that directory's walk with an
/// error instead of pulling the link's target into the snapshot.
pub struct LocalSource {
    root: Vec<u8>,
    /// Opened at the first look below the root.
    tree: std::sync::OnceLock<DirTree>,
    /// Files opened by [`Source::prefetch`], oldest first, for [`Source::open`] to take
    /// (instead of opening and checking them again: two system calls of the 13 a small file
    /// cost, and the prefetcher's close); at most [`OPENED_AHEAD`], the oldest closed first.
    opened: parking_lot::Mutex<std::collections::VecDeque<(Vec<u8>, Regular)>>,
    /// How many `opened` may hold: [`OPENED_AHEAD`], less under a low open-file limit.
    opened_max: usize,
    /// Files opened ahead, and read through that open (for `KLOSET_TRACE`).
    opened_ahead: std::sync::atomic::AtomicUsize,
    read_as_opened: std::sync::atomic::AtomicUsize,
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        let ahead = *self.opened_ahead.get_mut();
        if ahead > 0 {
            let used = *self.read_as_opened.get_mut();
            crate::trace::note(|| {
                format!("local source: {ahead} files opened ahead, {used} of them read so")
            });
        }
    }
}

/// Files [`LocalSource`] keeps open between their prefetch and their read: twice the
/// backup's prefetch depth, so that one read late is still found open; at most a quarter of
/// the process's open-file limit ([`opened_max`]).
const OPENED_AHEAD: usize = 2 * super::backup::PREFETCH_FILES;

/// [`OPENED_AHEAD`], or a quarter of the soft open-file limit (`ulimit -n`) if that is less:
/// the files kept open must never be what makes another open fail.
fn opened_max() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => OPENED_AHEAD.min(usize::try_from(soft / 4).unwrap_or(usize::MAX)),
        Err(_) => OPENED_AHEAD / 4,
    }
}

impl LocalSource {
    /// A source rooted at `path`, made absolute against the current directory.
    pub fn new(path: &Path) -> Result<LocalSource> {
        let abs = std::path::absolute(path).at(path)?;
        // Normalise `.` and `..` lexically, like `realpath -s`.
        let mut out: Vec<&[u8]> = Vec::new();
        for c in abs.as_os_str().as_bytes().split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        let mut root = Vec::new();
        for c in out {
            root.push(b'/');
            root.extend_from_slice(c);
        }
        if root.is_empty() {
            root.push(b'/');
        }
        Ok(LocalSource {
            root,
            tree: std::sync::OnceLock::new(),
            opened: Default::default(),
            opened_max: opened_max(),
            opened_ahead: Default::default(),
            read_as_opened: Default::default(),
        })
    }

    fn tree(&self) -> Result<&DirTree> {
        if let Some(t) = self.tree.get() {
            return Ok(t);
        }
        let t = DirTree::open(os(&self.root)).at(os(&self.root))?;
        Ok(self.tree.get_or_init(|| t))
    }

    /// `path` relative to the root, if it is the root or below it.
    fn rel<'a>(&self, path: &'a [u8]) -> Option<&'a [u8]> {
        let rest = path.strip_prefix(&self.root[..])?;
        if rest.is_empty() || self.root == b"/" {
            Some(rest)
        } else {
            rest.strip_prefix(b"/")
        }
    }

    /// The open directory holding `path` (below the root) and `path`'s last component.
    fn parent_of<'a>(&self, path: &'a [u8]) -> Result<(Arc<OwnedFd>, &'a [u8])> {
        let rel = self.rel(path).filter(|r| !r.is_empty()).ok_or_else(|| {
            Error::Other(format!(
                "{}: not below the backup's root",
                String::from_utf8_lossy(path)
            ))
        })?;
        self.tree()?.parent(rel).at(os(path))
    }
}

/// The node named `name` for `lstat` metadata `st` of the entry `name` in `dir` (the target
/// of a symlink read there too), without extended attributes.
fn node_at(dir: &OwnedFd, name: &[u8], st: &rustix::fs::Stat, shown: &Path) -> Result<Node> {
    let kind = NodeKind::from_mode(st.st_mode)
        .ok_or_else(|| Error::Other(format!("{}: unknown file type", shown.display())))?;
    let mut n = Node::new(name.to_vec(), kind);
    n.mode = st.st_mode & 0o7777;
    n.uid = st.st_uid;
    n.gid = st.st_gid;
    n.user = user_name(n.uid);
    n.group = group_name(n.gid);
    n.mtime = time(st.st_mtime, st.st_mtime_nsec as i64);
    n.ctime = time(st.st_ctime, st.st_ctime_nsec as i64);
    n.dev = st.st_dev;
    n.inode = st.st_ino;
    n.nlink = st.st_nlink;
    n.rdev = st.st_rdev;
    n.blocks = st.st_blocks as u64;
    n.size = if kind == NodeKind::Dir {
        0
    } else {
        st.st_size as u64
    };
    if kind == NodeKind::Symlink {
        n.target = rustix::fs::readlinkat(dir, OsStr::from_bytes(name), Vec::new())
            .map_err(|e| Error::io_path(shown, e.into()))?
            .into_bytes();
        n.size = n.target.len() as u64;
    }
    Ok(n)
}

/// Read the extended attributes of the entry `name` in `dir` into `n`, through the
/// directory's /proc name and without following a final symlink.
fn read_xattrs_at(dir: &OwnedFd, name: &[u8], n: &mut Node) {
    read_xattrs(&proc_path(dir.as_raw_fd()).join(OsStr::from_bytes(name)), n);
}

fn time(sec: i64, nsec: i64) -> Time {
    Time {
        sec,
        nsec: nsec as u32,
    }
}

thread_local! {
    static NAMES: std::cell::RefCell<(std::collections::HashMap<u32, String>, std::collections::HashMap<u32, String>)> =
        Default::default();
}

/// The user name of a uid (cached per thread).
pub fn user_name(uid: u32) -> String {
    NAMES.with(|n| {
        n.borrow_mut()
            .0
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_default()
            })
            .clone()
    })
}

/// The group name of a gid (cached per thread).
pub fn group_name(gid: u32) -> String {
    NAMES.with(|n| {
        n.borrow_mut()
            .1
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
                    .unwrap_or_default()
            })
            .clone()
    })
}

/// Metadata of a local path as a node (lstat, symlink target, xattrs).
pub fn local_node(path: &Path, name: Vec<u8>) -> Result<Node> {
    let mut n = local_node_bare(path, name)?;
    read_xattrs(path, &mut n);
    Ok(n)
}

/// [`local_node`] without the extended attributes (one `listxattr` per path saved: 15% of an
/// unchanged backup's CPU).
fn local_node_bare(path: &Path, name: Vec<u8>) -> Result<Node> {
    node_of(path, name, fs::symlink_metadata(path).at(path)?)
}

/// The node for `path`, named `name`, from its `lstat` metadata `m` (without attributes).
fn node_of(path: &Path, name: Vec<u8>, m: fs::Metadata) -> Result<Node> {
    let kind = NodeKind::from_mode(m.mode())
        .ok_or_else(|| Error::Other(format!("{}: unknown file type", path.display())))?;
    let mut n = Node::new(name, kind);
    n.mode = m.mode() & 0o7777;
    n.uid = m.uid();
    n.gid = m.gid();
    n.user = user_name(n.uid);
    n.group = group_name(n.gid);
    n.mtime = time(m.mtime(), m.mtime_nsec());
    n.ctime = time(m.ctime(), m.ctime_nsec());
    n.dev = m.dev();
    n.inode = m.ino();
    n.nlink = m.nlink();
    n.rdev = m.rdev();
    n.blocks = m.blocks();
    n.size = if kind == NodeKind::Dir { 0 } else { m.size() };
    if kind == NodeKind::Symlink {
        n.target = fs::read_link(path).at(path)?.into_os_string().into_vec();
        n.size = n.target.len() as u64;
    }
    Ok(n)
}

/// Extended attributes of a local path into `n`: a filesystem without them is not an error.
fn read_xattrs(path: &Path, n: &mut Node) {
    n.xattrs.clear();
    if (n.kind != NodeKind::Symlink || cfg!(target_os = "linux"))
        && let Ok(names) = xattr::list(path)
    {
        for name in names {
            if let Ok(Some(value)) = xattr::get(path, &name) {
                n.xattrs.push(Xattr {
                    name: name.into_vec(),
                    value,
                });
            }
        }
        n.xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

use std::os::unix::ffi::OsStringExt;

/// Open a file that the walk saw as a regular file, for reading. If it has since been replaced
/// by something else, fail instead of blocking (opening a fifo waits for a writer) or following
/// it (a symlink).
fn open_regular(dir: &OwnedFd, name: &[u8]) -> std::io::Result<Regular> {
    let f = open_nonblocking(dir, name)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is no longer a regular file (it changed during the backup)",
        ));
    }
    Ok(Regular {
        file: f,
        blocking: false,
    })
}

/// A regular file opened with O_NONBLOCK ([`open_regular`]). Linux's local filesystems ignore
/// the flag on regular files, so it is cleared only if a read does answer "would block" (a
/// filesystem that honours it), then the read is made again: a system call a file saved, of
/// the 13 a small file costs a backup.
struct Regular {
    file: fs::File,
    blocking: bool,
}

impl Read for Regular {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.file.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !self.blocking => {
                rustix::fs::fcntl_setfl(&self.file, rustix::fs::OFlags::empty())?;
                self.blocking = true;
                self.file.read(buf)
            }
            r => r,
        }
    }
}

/// Open `name` in `dir` for reading without waiting (a fifo) and without following a symlink.
fn open_nonblocking(dir: &OwnedFd, name: &[u8]) -> std::io::Result<fs::File> {
    let fd = rustix::fs::openat(
        dir,
        check_name(name)?,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    Ok(fs::File::from(fd))
}

impl Source for LocalSource {
    fn describe(&self) -> String {
        String::from_utf8_lossy(&self.root).into_owned()
    }
    fn root(&self) -> Vec<u8> {
        self.root.clone()
    }
    fn has_inodes(&self) -> bool {
        true
    }
    fn stat(&self, path: &[u8]) -> Result<Node> {
        let name = path
            .rsplit(|&b| b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b"/")
            .to_vec();
        match self.rel(path) {
            // The root and the directories above it (the snapshot holds the backed-up
            // directory at its absolute path) are looked up by path, as the user named them.
            None | Some(b"") => local_node(os(path), name),
            Some(_) => {
                let (dir, last) = self.parent_of(path)?;
                let st =
                    rustix::fs::statat(&*dir, OsStr::from_bytes(last), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| Error::io_path(os(path), e.into()))?;
                let mut n = node_at(&dir, last, &st, os(path))?;
                n.name = name;
                read_xattrs_at(&dir, last, &mut n);
                Ok(n)
            }
        }
    }
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>> {
        let p = os(path);
        let rel = self
            .rel(path)
            .ok_or_else(|| Error::Other(format!("{}: not below the backup's root", p.display())))?;
        let dir = self.tree()?.dir(rel).at(p)?;
        let mut entries: Vec<(u64, Vec<u8>)> = Vec::new();
        // Listing needs read permission: a directory kloset may only search has a path handle,
        // and opening it for reading here gives the plain "permission denied".
        let listing = rustix::fs::openat(
            &*dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .and_then(rustix::fs::Dir::new)
        .map_err(|e| Error::io_path(p, e.into()))?;
        for e in listing {
            let e = e.map_err(|e| Error::io_path(p, e.into()))?;
            let name = e.file_name().to_bytes();
            if name != b"." && name != b".." {
                entries.push((e.ino(), name.to_vec()));
            }
        }
        // Inodes are read in inode-number order: neighbours share inode-table blocks, so a
        // cold cache reads them in runs rather than in the directory's hash order (cold
        // unchanged backup of /usr/share, alternating runs: median 0.95 -> 0.90 s).
        entries.sort_unstable_by_key(|e| e.0);
        let mut out = Vec::with_capacity(entries.len());
        for (_, name) in entries {
            let full = super::tree::join(path, &name);
            // An `lstat` relative to the open directory: the kernel looks up one name instead
            // of walking the whole path again.
            match rustix::fs::statat(&*dir, OsStr::from_bytes(&name), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| Error::io_path(os(&full), e.into()))
                .and_then(|st| node_at(&dir, &name, &st, os(&full)))
            {
                Ok(n) => out.push(n),
                // Vanished between readdir and lstat: it is simply not in the snapshot.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    fn load_xattrs(&self, path: &[u8], node: &mut Node) {
        match self.parent_of(path) {
            Ok((dir, name)) => read_xattrs_at(&dir, name, node),
            Err(_) => node.xattrs.clear(),
        }
    }
    fn open(&self, path: &[u8], _size: u64) -> Result<Box<dyn Read + Send>> {
        {
            let mut opened = self.opened.lock();
            if let Some(i) = opened.iter().position(|(p, _)| p == path)
                && let Some((_, f)) = opened.remove(i)
            {
                self.read_as_opened
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Box::new(f));
            }
        }
        let (dir, name) = self.parent_of(path)?;
        Ok(Box::new(open_regular(&dir, name).at(os(path))?))
    }
    fn changed(&self, path: &[u8], seen: &Node) -> Result<Option<Node>> {
        let (dir, name) = self.parent_of(path)?;
        let st = rustix::fs::statat(&*dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io_path(os(path), e.into()))?;
        let now = node_at(&dir, name, &st, os(path))?;
        Ok((!same_state(&now, seen, true)).then_some(now))
    }
    /// `posix_fadvise(WILLNEED)`: the kernel queues the reads and returns. The file is opened
    /// as [`Source::open`] opens it (anything but a regular file is left alone) and kept open
    /// for it.
    fn prefetch(&self, path: &[u8], len: u64) {
        if let (Ok((dir, name)), Some(len)) = (self.parent_of(path), std::num::NonZeroU64::new(len))
            && let Ok(f) = open_regular(&dir, name)
        {
            let _ = rustix::fs::fadvise(&f.file, 0, Some(len), rustix::fs::Advice::WillNeed);
            self.opened_ahead
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut opened = self.opened.lock();
            if opened.len() >= self.opened_max {
                opened.pop_front();
            }
            if self.opened_max > 0 {
                opened.push_back((path.to_vec(), f));
            }
        }
    }
}

/// Is `now` the state `seen` had, as far as its content goes (size, mtime, and where the
/// source has them, ctime and inode)? The check GNU tar makes around reading a file.
pub fn same_state(now: &Node, seen: &Node, has_inodes: bool) -> bool {
    now.kind == seen.kind
        && now.size == seen.size
        && now.mtime == seen.mtime
        && (!has_inodes || (now.ctime == seen.ctime && now.inode == seen.inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13, item 4: a directory the walk saw, swapped for a symlink before the walk reads
    /// it, must not pull the link's target into the snapshot.
    #[test]
    fn a_directory_swapped_for_a_symlink_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"outside").unwrap();
        std::fs::create_dir_all(t.path().join("a/d")).unwrap();
        std::fs::write(t.path().join("a/d/mine"), b"inside").unwrap();
        let src = LocalSource::new(t.path()).unwrap();
        let path = |rel: &str| t.path().join(rel).as_os_str().as_bytes().to_vec();
        // The walk lists `a` (and keeps its handle), sees `d` as a directory...
        let names: Vec<Vec<u8>> = src
            .read_dir(&path("a"))
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, vec![b"d".to_vec()]);
        src.read_dir(&path("a/d")).unwrap();
        // ... and `d` becomes a symlink to elsewhere before it is read (again).
        std::fs::rename(t.path().join("a/d"), t.path().join("old")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("a/d")).unwrap();
        let fresh = LocalSource::new(t.path()).unwrap();
        for s in [&src, &fresh] {
            // Refused, or (through the handle kept from before the swap) the directory the
            // walk saw: never the link's target.
            if let Ok(v) = s.read_dir(&path("a/d")) {
                assert!(v.iter().all(|n| n.name != b"secret"));
            }
            assert!(s.open(&path("a/d/secret"), 7).is_err());
            assert!(s.stat(&path("a/d/secret")).is_err());
            let mut n = Node::new(b"secret".to_vec(), NodeKind::File);
            s.load_xattrs(&path("a/d/secret"), &mut n);
        }
        // The same for a parent higher up.
        std::fs::rename(t.path().join("a"), t.path().join("olda")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("a")).unwrap();
        let fresh = LocalSource::new(t.path()).unwrap();
        assert!(fresh.read_dir(&path("a")).is_err());
        assert!(fresh.open(&path("a/secret"), 7).is_err());
    }

    #[test]
    fn a_file_replaced_by_a_fifo_or_a_symlink_is_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let src = LocalSource::new(t.path()).unwrap();
        let path = |name: &str| t.path().join(name).as_os_str().as_bytes().to_vec();
        std::fs::write(t.path().join("file"), b"data").unwrap();
        assert_eq!(read_whole(&src, &path("file")), b"data");

        // What the walk saw as files, replaced since: open must fail at once.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink(t.path().join("file"), t.path().join("link")).unwrap();
        for name in ["fifo", "link"] {
            let e = src.open(&path(name), 4).err().expect(name);
            assert!(e.to_string().contains(name), "{e}");
            // A hint only: returns, does nothing.
            src.prefetch(&path(name), 4);
        }
        assert!(src.opened.lock().is_empty());
    }

    /// What `open` of `path` reads, whole.
    fn read_whole(src: &LocalSource, path: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        src.open(path, 0).unwrap().read_to_end(&mut got).unwrap();
        got
    }

    /// A file the prefetch hint opened is read through that open file (not opened again):
    /// replaced at its path in between, it still reads as it was when prefetched, and the
    /// check after the read tells it changed. At most [`OPENED_AHEAD`] files stay open.
    #[test]
    fn prefetched_files_are_read_through_the_file_opened_then() {
        let t = tempfile::tempdir().unwrap();
        let src = LocalSource::new(t.path()).unwrap();
        let path = |n: &str| t.path().join(n).into_os_string().into_vec();
        std::fs::write(t.path().join("file"), b"before").unwrap();
        let seen = src.stat(&path("file")).unwrap();
        src.prefetch(&path("file"), 6);
        std::fs::write(t.path().join("new"), b"after!").unwrap();
        std::fs::rename(t.path().join("new"), t.path().join("file")).unwrap();
        assert_eq!(read_whole(&src, &path("file")), b"before");
        assert!(src.changed(&path("file"), &seen).unwrap().is_some());
        // Taken once: the next open opens the file there now.
        assert_eq!(read_whole(&src, &path("file")), b"after!");
        for i in 0..OPENED_AHEAD + 10 {
            std::fs::write(t.path().join(format!("f{i}")), b"x").unwrap();
            src.prefetch(&path(&format!("f{i}")), 1);
        }
        assert_eq!(src.opened.lock().len(), opened_max());
        assert!(opened_max() <= OPENED_AHEAD);
    }
}
