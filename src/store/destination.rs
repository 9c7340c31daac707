//! The destination connector: a tree to restore into.
//!
//! Paths given to a [`Destination`] are relative to its root, as raw bytes (`a/b/c`; the empty
//! path is the root itself). The restore pipeline creates directories first, then files with
//! their final size, writes content at offsets from several threads, and sets metadata last
//! (files when their last chunk lands, directories deepest first), so modes like 0500 never
//! block the restore. [`LocalDestination`] writes to the local filesystem and keeps files
//! sparse; the SFTP destination lives in `crate::sftp`.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use rustix::fs::{AtFlags, Mode as RMode, OFlags};

use super::dirfd::{DirTree, proc_path, remove_at};
use super::error::{Error, IoContext, Result};
use super::source::os;
use super::tree::{Node, NodeKind};

pub trait Destination: Send + Sync {
    fn describe(&self) -> String;
    /// Get ready without changing anything (log in, look at the root, open what the restore
    /// will use), on a thread of its own while the store opens: errors are left for
    /// [`Destination::prepare`] to meet. The default does nothing.
    fn warm_up(&self) {}
    /// Is every write a network round trip (a restore onto a server)? Then the writes, not
    /// the store's range reads, set the pace.
    fn is_remote(&self) -> bool {
        false
    }
    /// Create the root if missing; returns whether it was created.
    fn prepare(&self) -> Result<bool>;
    /// Is there already a file at `path` with this size and mtime (an earlier, interrupted
    /// restore finished it)?
    fn is_complete(&self, path: &[u8], node: &Node) -> bool;
    fn mkdir(&self, path: &[u8]) -> Result<()>;
    /// Create (or truncate) a regular file of `size` bytes, all holes.
    fn create_file(&self, path: &[u8], size: u64) -> Result<()>;
    /// Write `data` at `offset` of a file made by `create_file` (and settled). A destination
    /// that pipelines may answer while the write is under way (see
    /// [`Destination::settle`]); a `set_metadata` of the path called after it still takes
    /// effect after it.
    fn write_at(&self, path: &[u8], offset: u64, data: &[u8]) -> Result<()>;
    fn symlink(&self, path: &[u8], target: &[u8]) -> Result<()>;
    fn hardlink(&self, existing: &[u8], path: &[u8]) -> Result<()>;
    /// Create a fifo, device or socket node.
    fn special(&self, path: &[u8], node: &Node) -> Result<()>;
    /// Apply mode, owner (when permitted), xattrs and times.
    fn set_metadata(&self, path: &[u8], node: &Node) -> Result<()>;
    /// Whether a file [`Destination::is_complete`] found, or a directory this restore did not
    /// change, already has the node's mode, owners and mtime, so
    /// [`Destination::set_metadata`] can be skipped. `false` when not known without asking
    /// (the default: it is set again).
    fn metadata_current(&self, _path: &[u8], _node: &Node) -> bool {
        false
    }
    /// Look at the directories `dirs` of an existing destination (in the order the restore
    /// will ask about them) ahead of its questions, on connections of its own, until `done`
    /// is set. Blocks: the restore runs it on a thread of its own. The default does nothing.
    fn look_ahead(&self, _dirs: &[Vec<u8>], _done: &std::sync::atomic::AtomicBool) {}
    /// Wait until every operation above that the destination took on and has not finished yet
    /// is done, and return those that failed, by path (an SFTP destination pipelines them;
    /// see `sftp::pipe`). Until then an `Ok` from them means only "under way". The default:
    /// everything is done when it returns, nothing to report.
    fn settle(&self) -> Vec<(Vec<u8>, Error)> {
        Vec::new()
    }
    /// Create a file with all its content and metadata at once (files of one chunk, the
    /// common case: one round trip sequence instead of three on a remote destination).
    fn write_whole(&self, path: &[u8], data: &[u8], node: &Node) -> Result<()> {
        self.create_file(path, data.len() as u64)?;
        self.write_at(path, 0, data)?;
        self.set_metadata(path, node)
    }
    /// Remove a file this restore created but could not complete, so no file with wrong
    /// content is left under a real name.
    fn remove_file(&self, path: &[u8]) -> Result<()>;
}

/// A local directory, written through directory handles ([`DirTree`]): every create, chmod,
/// chown, utimes, xattr and link happens relative to an open parent without following
/// symlinks, and whatever is in the way of an entry (a symlink to elsewhere, a hard link to a
/// file outside, a directory where a file goes) is removed and replaced, never written through.
pub struct LocalDestination {
    root: PathBuf,
    tree: OnceLock<DirTree>,
    is_root: bool,
    /// Files this restore created and writes in several pieces, by path: their device and
    /// inode, checked at each reopen so that a file swapped in meanwhile is never written.
    created: Mutex<HashMap<Vec<u8>, (u64, u64)>>,
}

impl LocalDestination {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        LocalDestination {
            // Absolute, so that it names the same place from any working directory (the
            // restore's resume marker is keyed by it).
            root: std::path::absolute(&root).unwrap_or(root),
            tree: OnceLock::new(),
            is_root: nix::unistd::geteuid().is_root(),
            created: Mutex::new(HashMap::new()),
        }
    }

    fn tree(&self) -> Result<&DirTree> {
        if let Some(t) = self.tree.get() {
            return Ok(t);
        }
        let t = DirTree::open(&self.root).at(&self.root)?;
        Ok(self.tree.get_or_init(|| t))
    }

    /// `rel` below the root, for messages.
    fn show(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(os(rel))
        }
    }

    /// The open parent of `rel` and its last component.
    fn parent<'a>(&self, rel: &'a [u8]) -> Result<(Arc<OwnedFd>, &'a [u8])> {
        self.tree()?.parent(rel).at(self.show(rel))
    }

    /// Remove what is at `rel`, forgetting any directory handles below it.
    fn clear(&self, dir: &OwnedFd, rel: &[u8], name: &[u8]) -> Result<()> {
        self.tree()?.forget(rel);
        remove_at(dir, name).at(self.show(rel))
    }

    /// Create `rel` as a new, empty file (0600 until its metadata is set): exclusively, so
    /// never through a symlink or into an existing file; whatever is there is removed first.
    fn create_new(&self, rel: &[u8]) -> Result<fs::File> {
        let (dir, name) = self.parent(rel)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let open = || rustix::fs::openat(&*dir, os(name), flags, RMode::from_raw_mode(0o600));
        // Something in the way is removed once; if something is there again, someone is
        // racing the restore and the entry is reported.
        let fd = match open() {
            Err(rustix::io::Errno::EXIST) => {
                self.clear(&dir, rel, name)?;
                open()
            }
            r => r,
        };
        fd.map(fs::File::from)
            .map_err(|e| Error::io_path(&self.show(rel), e.into()))
    }

    /// Reopen a file this restore created, checking it is still the one it created.
    fn reopen(&self, rel: &[u8]) -> Result<fs::File> {
        let (dir, name) = self.parent(rel)?;
        let p = self.show(rel);
        let fd = rustix::fs::openat(
            &*dir,
            os(name),
            OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            RMode::empty(),
        )
        .map_err(|e| Error::io_path(&p, e.into()))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::io_path(&p, e.into()))?;
        if self.created.lock().get(rel) != Some(&(st.st_dev, st.st_ino)) {
            return Err(Error::Other(format!(
                "{}: replaced by another file while it was being restored; not written",
                p.display()
            )));
        }
        Ok(fs::File::from(fd))
    }

    /// Set owner, xattrs, mode and times of an open regular file or directory. Owner first:
    /// chown clears setuid/setgid bits, so the mode comes after.
    fn set_metadata_fd(&self, fd: &OwnedFd, p: &Path, node: &Node) -> Result<()> {
        let io = |e: rustix::io::Errno| Error::io_path(p, e.into());
        if self.is_root {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(node.uid)),
                Some(rustix::fs::Gid::from_raw(node.gid)),
            )
            .map_err(io)?;
        }
        for x in &node.xattrs {
            // Extended attributes the destination filesystem refuses are not fatal.
            let _ =
                rustix::fs::fsetxattr(fd, os(&x.name), &x.value, rustix::fs::XattrFlags::empty());
        }
        rustix::fs::fchmod(fd, RMode::from_raw_mode(node.mode & 0o7777)).map_err(io)?;
        rustix::fs::futimens(fd, &timestamps(node)).map_err(io)
    }
}

/// Access times are not stored (they would make every tree differ between snapshots); a
/// restored entry gets its mtime as atime.
fn timestamps(node: &Node) -> rustix::fs::Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: node.mtime.sec,
        tv_nsec: node.mtime.nsec as _,
    };
    rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

const HOLE_BLOCK: usize = 4096;

impl Destination for LocalDestination {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn prepare(&self) -> Result<bool> {
        let created = if self.root.is_dir() {
            false
        } else {
            fs::DirBuilder::new()
                .recursive(true)
                .create(&self.root)
                .at(&self.root)?;
            true
        };
        self.tree()?;
        Ok(created)
    }

    fn is_complete(&self, path: &[u8], node: &Node) -> bool {
        let Ok((dir, name)) = self.parent(path) else {
            return false;
        };
        match rustix::fs::statat(&*dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                st.st_mode & libc::S_IFMT == libc::S_IFREG
                    && st.st_nlink == 1
                    && st.st_size as u64 == node.size
                    && st.st_mtime == node.mtime.sec
                    && st.st_mtime_nsec as i64 == node.mtime.nsec as i64
            }
            Err(_) => false,
        }
    }

    fn mkdir(&self, path: &[u8]) -> Result<()> {
        let (dir, name) = self.parent(path)?;
        let p = self.show(path);
        // Made at once where nothing is in the way (mkdir never follows a symlink), so a
        // fresh restore makes one call per directory.
        let mk = || rustix::fs::mkdirat(&*dir, os(name), RMode::from_raw_mode(0o700));
        match mk() {
            Err(rustix::io::Errno::EXIST) => {}
            r => return r.map_err(|e| Error::io_path(&p, e.into())),
        }
        match rustix::fs::statat(&*dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => return Ok(()),
            _ => self.clear(&dir, path, name)?,
        }
        mk().map_err(|e| Error::io_path(&p, e.into()))
    }

    fn create_file(&self, path: &[u8], size: u64) -> Result<()> {
        let f = self.create_new(path)?;
        let p = self.show(path);
        f.set_len(size).at(&p)?;
        let st = rustix::fs::fstat(&f).map_err(|e| Error::io_path(&p, e.into()))?;
        self.created
            .lock()
            .insert(path.to_vec(), (st.st_dev, st.st_ino));
        Ok(())
    }

    fn write_at(&self, path: &[u8], offset: u64, data: &[u8]) -> Result<()> {
        let f = self.reopen(path)?;
        write_sparse(&f, &self.show(path), offset, data).map(|_| ())
    }

    fn write_whole(&self, path: &[u8], data: &[u8], node: &Node) -> Result<()> {
        // Everything through the open file: no path lookups after the open (43k files in a
        // restore of /usr/share: lchown, chmod and utimensat by path were a third of the
        // syscalls).
        let f = self.create_new(path)?;
        let p = self.show(path);
        let end = write_sparse(&f, &p, 0, data)?;
        if end < data.len() as u64 {
            // The file ends in a hole.
            f.set_len(data.len() as u64).at(&p)?;
        }
        self.set_metadata_fd(&OwnedFd::from(f), &p, node)
    }

    fn symlink(&self, path: &[u8], target: &[u8]) -> Result<()> {
        let (dir, name) = self.parent(path)?;
        let p = self.show(path);
        let mk = || rustix::fs::symlinkat(os(target), &*dir, os(name));
        match mk() {
            Err(rustix::io::Errno::EXIST) => self.clear(&dir, path, name)?,
            r => return r.map_err(|e| Error::io_path(&p, e.into())),
        }
        mk().map_err(|e| Error::io_path(&p, e.into()))
    }

    fn hardlink(&self, existing: &[u8], path: &[u8]) -> Result<()> {
        let (edir, ename) = self.parent(existing)?;
        let (dir, name) = self.parent(path)?;
        let p = self.show(path);
        // linkat without AT_SYMLINK_FOLLOW links the entry itself, never a symlink's target.
        let mk = || rustix::fs::linkat(&*edir, os(ename), &*dir, os(name), AtFlags::empty());
        match mk() {
            Err(rustix::io::Errno::EXIST) => self.clear(&dir, path, name)?,
            r => return r.map_err(|e| Error::io_path(&p, e.into())),
        }
        mk().map_err(|e| Error::io_path(&p, e.into()))
    }

    fn special(&self, path: &[u8], node: &Node) -> Result<()> {
        let (dir, name) = self.parent(path)?;
        let p = self.show(path);
        let kind = match node.kind {
            NodeKind::Fifo => rustix::fs::FileType::Fifo,
            NodeKind::CharDevice => rustix::fs::FileType::CharacterDevice,
            NodeKind::BlockDevice => rustix::fs::FileType::BlockDevice,
            NodeKind::Socket => rustix::fs::FileType::Socket,
            _ => return Err(Error::Other(format!("{}: not a special file", p.display()))),
        };
        let mk = || {
            rustix::fs::mknodat(
                &*dir,
                os(name),
                kind,
                RMode::from_raw_mode(node.mode & 0o777),
                node.rdev as _,
            )
        };
        match mk() {
            Err(rustix::io::Errno::EXIST) => self.clear(&dir, path, name)?,
            r => return r.map_err(|e| Error::io_path(&p, e.into())),
        }
        mk().map_err(|e| Error::io_path(&p, e.into()))
    }

    fn set_metadata(&self, path: &[u8], node: &Node) -> Result<()> {
        let p = self.show(path);
        let io = |e: rustix::io::Errno| Error::io_path(&p, e.into());
        let (dir, name): (Arc<OwnedFd>, &[u8]) = if path.is_empty() {
            (self.tree()?.dir(b"").at(&p)?, b"")
        } else {
            self.parent(path)?
        };
        if node.kind == NodeKind::Symlink {
            // A symlink's own owner, attributes and times; its mode means nothing on Linux.
            let nofollow = AtFlags::SYMLINK_NOFOLLOW;
            if self.is_root {
                rustix::fs::chownat(
                    &*dir,
                    os(name),
                    Some(rustix::fs::Uid::from_raw(node.uid)),
                    Some(rustix::fs::Gid::from_raw(node.gid)),
                    nofollow,
                )
                .map_err(io)?;
            }
            if !node.xattrs.is_empty() {
                let at = proc_path(dir.as_raw_fd()).join(os(name));
                for x in &node.xattrs {
                    let _ = rustix::fs::lsetxattr(
                        &at,
                        os(&x.name),
                        &x.value,
                        rustix::fs::XattrFlags::empty(),
                    );
                }
            }
            return rustix::fs::utimensat(&*dir, os(name), &timestamps(node), nofollow).map_err(io);
        }
        // Anything else: a handle on the entry itself (a path handle: it opens no device and
        // needs no permission), checked to be what the restore made there.
        let fd = if path.is_empty() {
            dir.clone()
        } else {
            Arc::new(
                rustix::fs::openat(
                    &*dir,
                    os(name),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    RMode::empty(),
                )
                .map_err(io)?,
            )
        };
        let st = rustix::fs::fstat(&*fd).map_err(io)?;
        if st.st_mode & libc::S_IFMT != node.kind.ifmt() {
            return Err(Error::Other(format!(
                "{}: is no longer what the restore made there (it changed meanwhile); metadata not set",
                p.display()
            )));
        }
        if node.kind == NodeKind::File
            && let Some(id) = self.created.lock().remove(path)
            && id != (st.st_dev, st.st_ino)
        {
            return Err(Error::Other(format!(
                "{}: replaced by another file while it was being restored; metadata not set",
                p.display()
            )));
        }
        if self.is_root {
            rustix::fs::chownat(
                &*fd,
                "",
                Some(rustix::fs::Uid::from_raw(node.uid)),
                Some(rustix::fs::Gid::from_raw(node.gid)),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io)?;
        }
        // chmod, utimes and setxattr have no form that takes a path handle: go through its
        // /proc name, which resolves to this very inode (checked above not to be a symlink).
        let at = proc_path(fd.as_raw_fd());
        for x in &node.xattrs {
            let _ =
                rustix::fs::setxattr(&at, os(&x.name), &x.value, rustix::fs::XattrFlags::empty());
        }
        rustix::fs::chmodat(
            rustix::fs::CWD,
            &at,
            RMode::from_raw_mode(node.mode & 0o7777),
            AtFlags::empty(),
        )
        .map_err(io)?;
        rustix::fs::utimensat(rustix::fs::CWD, &at, &timestamps(node), AtFlags::empty()).map_err(io)
    }

    fn remove_file(&self, path: &[u8]) -> Result<()> {
        let (dir, name) = self.parent(path)?;
        self.created.lock().remove(path);
        match rustix::fs::unlinkat(&*dir, os(name), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(Error::io_path(&self.show(path), e.into())),
        }
    }
}

/// Write `data` at `offset`, leaving runs of zero blocks as holes; returns where the last
/// write ended (`offset` if nothing was written).
fn write_sparse(f: &fs::File, p: &Path, offset: u64, data: &[u8]) -> Result<u64> {
    let mut end_written = offset;
    let mut start = 0;
    while start < data.len() {
        let end = (start + HOLE_BLOCK).min(data.len());
        if data[start..end].iter().all(|&b| b == 0) {
            start = end;
            continue;
        }
        let mut stop = end;
        while stop < data.len() {
            let e = (stop + HOLE_BLOCK).min(data.len());
            if data[stop..e].iter().all(|&b| b == 0) {
                break;
            }
            stop = e;
        }
        f.write_all_at(&data[start..stop], offset + start as u64)
            .at(p)?;
        end_written = offset + stop as u64;
        start = stop;
    }
    Ok(end_written)
}
