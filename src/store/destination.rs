//! The destination connector: a tree to restore into.
//!
//! Paths given to a [`Destination`] are relative to its root, as raw bytes (`a/b/c`; the empty
//! path is the root itself). The restore pipeline creates directories first, then files with
//! their final size, writes content at offsets from several threads, and sets metadata last
//! (files when their last chunk lands, directories deepest first), so modes like 0500 never
//! block the restore. [`LocalDestination`] writes to the local filesystem and keeps files
//! sparse; the SFTP destination lives in `crate::sftp`.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use super::error::{Error, IoContext, Result};
use super::source::os;
use super::tree::{Node, NodeKind};

pub trait Destination: Send + Sync {
    fn describe(&self) -> String;
    /// Create the root if missing; returns whether it was created.
    fn prepare(&self) -> Result<bool>;
    /// Is there already a file at `path` with this size and mtime (an earlier, interrupted
    /// restore finished it)?
    fn is_complete(&self, path: &[u8], node: &Node) -> bool;
    fn mkdir(&self, path: &[u8]) -> Result<()>;
    /// Create (or truncate) a regular file of `size` bytes, all holes.
    fn create_file(&self, path: &[u8], size: u64) -> Result<()>;
    /// Write `data` at `offset` of a file made by `create_file`.
    fn write_at(&self, path: &[u8], offset: u64, data: &[u8]) -> Result<()>;
    fn symlink(&self, path: &[u8], target: &[u8]) -> Result<()>;
    fn hardlink(&self, existing: &[u8], path: &[u8]) -> Result<()>;
    /// Create a fifo, device or socket node.
    fn special(&self, path: &[u8], node: &Node) -> Result<()>;
    /// Apply mode, owner (when permitted), xattrs and times.
    fn set_metadata(&self, path: &[u8], node: &Node) -> Result<()>;
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

/// A local directory.
pub struct LocalDestination {
    root: PathBuf,
    is_root: bool,
}

impl LocalDestination {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDestination {
            root: root.into(),
            is_root: nix::unistd::geteuid().is_root(),
        }
    }

    fn path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(os(rel))
        }
    }
}

/// Remove whatever is at `p` (not following symlinks) so a restore can put its own entry there.
fn clear(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).at(p),
        Ok(_) => fs::remove_file(p).at(p),
        Err(_) => Ok(()),
    }
}

const HOLE_BLOCK: usize = 4096;

impl Destination for LocalDestination {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn prepare(&self) -> Result<bool> {
        if self.root.is_dir() {
            return Ok(false);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .create(&self.root)
            .at(&self.root)?;
        Ok(true)
    }

    fn is_complete(&self, path: &[u8], node: &Node) -> bool {
        use std::os::unix::fs::MetadataExt;
        match fs::symlink_metadata(self.path(path)) {
            Ok(m) => {
                m.is_file()
                    && m.len() == node.size
                    && m.mtime() == node.mtime.sec
                    && m.mtime_nsec() == node.mtime.nsec as i64
            }
            Err(_) => false,
        }
    }

    fn mkdir(&self, path: &[u8]) -> Result<()> {
        let p = self.path(path);
        // Made at once where nothing is in the way (mkdir never follows a symlink), so a
        // fresh restore makes one call per directory.
        match fs::DirBuilder::new().mode(0o700).create(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            r => return r.at(&p),
        }
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => clear(&p)?,
            Err(_) => {}
        }
        fs::DirBuilder::new().mode(0o700).create(&p).at(&p)
    }

    fn create_file(&self, path: &[u8], size: u64) -> Result<()> {
        let p = self.path(path);
        create_truncated(&p)?.set_len(size).at(&p)
    }

    fn write_at(&self, path: &[u8], offset: u64, data: &[u8]) -> Result<()> {
        let p = self.path(path);
        let f = fs::OpenOptions::new().write(true).open(&p).at(&p)?;
        write_sparse(&f, &p, offset, data).map(|_| ())
    }

    fn write_whole(&self, path: &[u8], data: &[u8], node: &Node) -> Result<()> {
        // Everything through the open file: no path lookups after the open (43k files in a
        // restore of /usr/share: lchown, chmod and utimensat by path were a third of the
        // syscalls). Owner first: chown clears setuid/setgid bits, so the mode comes after.
        let p = self.path(path);
        let f = create_truncated(&p)?;
        let end = write_sparse(&f, &p, 0, data)?;
        if end < data.len() as u64 {
            // The file ends in a hole.
            f.set_len(data.len() as u64).at(&p)?;
        }
        let io = |e: nix::errno::Errno| Error::io_path(&p, e.into());
        if self.is_root {
            nix::unistd::fchown(
                &f,
                Some(nix::unistd::Uid::from_raw(node.uid)),
                Some(nix::unistd::Gid::from_raw(node.gid)),
            )
            .map_err(io)?;
        }
        for x in &node.xattrs {
            use xattr::FileExt as _;
            let _ = f.set_xattr(std::ffi::OsStr::new(os(&x.name)), &x.value);
        }
        nix::sys::stat::fchmod(&f, Mode::from_bits_truncate((node.mode & 0o7777) as _))
            .map_err(io)?;
        let ts = TimeSpec::new(node.mtime.sec as _, node.mtime.nsec as _);
        nix::sys::stat::futimens(&f, &ts, &ts).map_err(io)
    }

    fn symlink(&self, path: &[u8], target: &[u8]) -> Result<()> {
        let p = self.path(path);
        clear(&p)?;
        std::os::unix::fs::symlink(os(target), &p).at(&p)
    }

    fn hardlink(&self, existing: &[u8], path: &[u8]) -> Result<()> {
        let p = self.path(path);
        clear(&p)?;
        let e = self.path(existing);
        fs::hard_link(&e, &p).at(&p)
    }

    fn special(&self, path: &[u8], node: &Node) -> Result<()> {
        let p = self.path(path);
        clear(&p)?;
        let kind = match node.kind {
            NodeKind::Fifo => SFlag::S_IFIFO,
            NodeKind::CharDevice => SFlag::S_IFCHR,
            NodeKind::BlockDevice => SFlag::S_IFBLK,
            NodeKind::Socket => SFlag::S_IFSOCK,
            _ => return Err(Error::Other(format!("{}: not a special file", p.display()))),
        };
        nix::sys::stat::mknod(
            &p,
            kind,
            Mode::from_bits_truncate((node.mode & 0o777) as _),
            node.rdev as _,
        )
        .map_err(|e| Error::io_path(&p, e.into()))
    }

    fn set_metadata(&self, path: &[u8], node: &Node) -> Result<()> {
        let p = self.path(path);
        let is_link = node.kind == NodeKind::Symlink;
        if self.is_root {
            std::os::unix::fs::lchown(&p, Some(node.uid), Some(node.gid)).at(&p)?;
        }
        for x in &node.xattrs {
            let name = std::ffi::OsStr::new(os(&x.name));
            // Extended attributes the destination filesystem refuses are not fatal.
            let _ = xattr::set(&p, name, &x.value);
        }
        if !is_link {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(node.mode & 0o7777)).at(&p)?;
        }
        let ts = |t: super::tree::Time| TimeSpec::new(t.sec as _, t.nsec as _);
        utimensat(
            nix::fcntl::AT_FDCWD,
            &p,
            // Access times are not stored (they would make every tree differ between
            // snapshots); a restored entry gets its mtime as atime.
            &ts(node.mtime),
            &ts(node.mtime),
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::io_path(&p, e.into()))
    }

    fn remove_file(&self, path: &[u8]) -> Result<()> {
        let p = self.path(path);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io_path(&p, e)),
            _ => Ok(()),
        }
    }
}

/// Open `p` for writing, created or truncated (0600 until its metadata is set), replacing
/// anything that is not a file.
fn create_truncated(p: &Path) -> Result<fs::File> {
    // A new file is created exclusively (never through a symlink), without a look first;
    // only when something is there is it looked at.
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
    {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        r => return r.at(p),
    }
    if fs::symlink_metadata(p).is_ok_and(|m| !m.is_file()) {
        clear(p)?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .at(p)
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
