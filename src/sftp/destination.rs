//! The destination connector over SFTP: restore straight onto a server.
//!
//! Files are created with their final size (the server's ftruncate leaves holes), chunks are
//! written at their offsets from several threads on pooled connections, and modes, owners and
//! mtimes are set with SETSTAT once a file is complete. A file already present with the same
//! size and mtime is skipped, so an interrupted restore resumes where it stopped. SFTP v3
//! cannot make hard links (libssh2 lacks OpenSSH's extension) or device nodes: extra hard links
//! are written as copies, and fifos and devices are reported as not restored.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ssh2::{FileStat, OpenFlags, OpenType};

use super::backend::{mkdir_p, read_all_conn};
use super::conn::{Pool, io};
use super::{Location, Options};
use crate::store::destination::Destination;
use crate::store::error::{Error, Result};
use crate::store::tree::{Node, NodeKind};

pub struct SftpDestination {
    loc: Location,
    pool: Arc<Pool>,
    /// The root was created by this restore, so nothing is in the way of what it makes:
    /// directories and files are created without a look first (one round trip each fewer).
    fresh: AtomicBool,
}

impl SftpDestination {
    pub fn open(loc: Location, opts: &Options) -> Result<SftpDestination> {
        let pool = Pool::open(&loc, opts)?;
        Ok(SftpDestination {
            loc,
            pool,
            fresh: AtomicBool::new(false),
        })
    }

    fn fresh(&self) -> bool {
        self.fresh.load(Ordering::Relaxed)
    }

    fn path(&self, rel: &[u8]) -> PathBuf {
        let root = Path::new(&self.loc.path);
        if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    fn what(&self, rel: &[u8]) -> String {
        format!("{}: {}", self.loc.url(), self.path(rel).display())
    }
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

impl Destination for SftpDestination {
    fn describe(&self) -> String {
        self.loc.url()
    }

    fn prepare(&self) -> Result<bool> {
        let root = self.path(b"");
        self.pool
            .run(&self.what(b""), |c| {
                if c.sftp.stat(&root).is_ok_and(|s| s.is_dir()) {
                    return Ok(false);
                }
                mkdir_p(c, &root, 0o755)?;
                Ok(true)
            })
            .inspect(|&created| self.fresh.store(created, Ordering::Relaxed))
    }

    fn is_complete(&self, path: &[u8], node: &Node) -> bool {
        let p = self.path(path);
        self.pool
            .run(&self.what(path), |c| Ok(c.sftp.lstat(&p).ok()))
            .ok()
            .flatten()
            .is_some_and(|st| {
                st.is_file()
                    && st.size == Some(node.size)
                    && st.mtime == Some(node.mtime.sec.max(0) as u64)
            })
    }

    fn mkdir(&self, path: &[u8]) -> Result<()> {
        let p = self.path(path);
        let fresh = self.fresh();
        self.pool.run(&self.what(path), |c| {
            if fresh && c.sftp.mkdir(&p, 0o700).is_ok() {
                return Ok(());
            }
            match c.sftp.lstat(&p) {
                Ok(st) if st.is_dir() => Ok(()),
                Ok(_) => {
                    c.sftp.unlink(&p).map_err(io)?;
                    c.sftp.mkdir(&p, 0o700).map_err(io)
                }
                Err(_) => c.sftp.mkdir(&p, 0o700).map_err(io),
            }
        })
    }

    fn create_file(&self, path: &[u8], size: u64) -> Result<()> {
        let p = self.path(path);
        self.pool.run(&self.what(path), |c| {
            let mut f = create_truncated(c, &p, self.fresh())?;
            if size > 0 {
                f.setstat(stat_size(size)).map_err(io)?;
            }
            Ok(())
        })
    }

    fn write_at(&self, path: &[u8], offset: u64, data: &[u8]) -> Result<()> {
        if data.iter().all(|&b| b == 0) {
            // The file was created at its final size: zeros are already there, as a hole.
            return Ok(());
        }
        let p = self.path(path);
        self.pool.run(&self.what(path), |c| {
            let mut f = c
                .sftp
                .open_mode(&p, OpenFlags::WRITE, 0o600, OpenType::File)
                .map_err(io)?;
            f.seek(SeekFrom::Start(offset))?;
            for chunk in data.chunks(super::backend::IO_BUF) {
                f.write_all(chunk)?;
            }
            Ok(())
        })
    }

    fn symlink(&self, path: &[u8], target: &[u8]) -> Result<()> {
        let p = self.path(path);
        let t = PathBuf::from(std::ffi::OsStr::from_bytes(target));
        let fresh = self.fresh();
        self.pool.run(&self.what(path), |c| {
            // OpenSSH's server swaps SSH_FXP_SYMLINK's arguments (a long-standing quirk that
            // every client works around): pass the target first.
            if fresh && c.sftp.symlink(&t, &p).is_ok() {
                return Ok(());
            }
            if c.sftp.lstat(&p).is_ok() {
                let _ = c.sftp.unlink(&p);
            }
            c.sftp.symlink(&t, &p).map_err(io)
        })
    }

    fn hardlink(&self, existing: &[u8], path: &[u8]) -> Result<()> {
        let src = self.path(existing);
        let dst = self.path(path);
        self.pool.run(&self.what(path), |c| {
            let data = read_all_conn(c, &src)?;
            let st = c.sftp.stat(&src).map_err(io)?;
            let _ = c.sftp.unlink(&dst);
            let mut f = c
                .sftp
                .open_mode(
                    &dst,
                    OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
                    0o600,
                    OpenType::File,
                )
                .map_err(io)?;
            f.write_all(&data)?;
            drop(f);
            c.sftp.setstat(&dst, st).map_err(io)
        })
    }

    fn special(&self, path: &[u8], node: &Node) -> Result<()> {
        Err(Error::Other(format!(
            "{}: SFTP cannot create {} nodes; not restored",
            self.what(path),
            match node.kind {
                NodeKind::Fifo => "fifo",
                NodeKind::Socket => "socket",
                _ => "device",
            }
        )))
    }

    fn set_metadata(&self, path: &[u8], node: &Node) -> Result<()> {
        if node.kind == NodeKind::Symlink {
            // SETSTAT follows symlinks; there is no lsetstat in SFTP v3.
            return Ok(());
        }
        let p = self.path(path);
        self.pool.run(&self.what(path), |c| {
            // Owners, mode and times in one request; where the server refuses the owners (we
            // are not root there), mode and times alone.
            if c.sftp.setstat(&p, stat_all(node)).is_ok() {
                // OpenSSH applies the owner last, and chown clears setuid/setgid bits.
                if node.mode & 0o6000 != 0 {
                    c.sftp.setstat(&p, stat_mode(node)).map_err(io)?;
                }
                return Ok(());
            }
            c.sftp.setstat(&p, stat_mode_times(node)).map_err(|e| {
                let e = io(e);
                if not_found(&e) {
                    e
                } else {
                    std::io::Error::new(e.kind(), format!("setting mode and times: {e}"))
                }
            })
        })
    }

    fn remove_file(&self, path: &[u8]) -> Result<()> {
        let p = self.path(path);
        self.pool
            .run(&self.what(path), |c| match c.sftp.unlink(&p) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let e = io(e);
                    if not_found(&e) { Ok(()) } else { Err(e) }
                }
            })
    }

    fn write_whole(&self, path: &[u8], data: &[u8], node: &Node) -> Result<()> {
        let p = self.path(path);
        self.pool.run(&self.what(path), |c| {
            let mut f = create_truncated(c, &p, self.fresh())?;
            if data.iter().all(|&b| b == 0) {
                if !data.is_empty() {
                    f.setstat(stat_size(data.len() as u64)).map_err(io)?;
                }
            } else {
                for chunk in data.chunks(super::backend::IO_BUF) {
                    f.write_all(chunk)?;
                }
            }
            // On the open handle: owners, mode and times in one request, or without the owners
            // where the server refuses them.
            if f.setstat(stat_all(node)).is_ok() {
                // OpenSSH applies the owner last, and chown clears setuid/setgid bits.
                if node.mode & 0o6000 != 0 {
                    f.setstat(stat_mode(node)).map_err(io)?;
                }
                return Ok(());
            }
            f.setstat(stat_mode_times(node)).map_err(io)
        })
    }
}

/// SETSTAT attributes: nothing.
fn stat_none() -> FileStat {
    FileStat {
        size: None,
        uid: None,
        gid: None,
        perm: None,
        atime: None,
        mtime: None,
    }
}

/// SETSTAT attributes: only the size (ftruncate).
fn stat_size(size: u64) -> FileStat {
    FileStat {
        size: Some(size),
        ..stat_none()
    }
}

/// SETSTAT attributes: only the mode.
fn stat_mode(node: &Node) -> FileStat {
    FileStat {
        perm: Some(node.mode & 0o7777),
        ..stat_none()
    }
}

/// SETSTAT attributes: owner, mode and times.
fn stat_all(node: &Node) -> FileStat {
    FileStat {
        uid: Some(node.uid),
        gid: Some(node.gid),
        ..stat_mode_times(node)
    }
}

/// SETSTAT attributes: mode, and mtime as both times (SFTP v3 has whole seconds only).
fn stat_mode_times(node: &Node) -> FileStat {
    let mtime = node.mtime.sec.max(0) as u64;
    FileStat {
        perm: Some(node.mode & 0o7777),
        atime: Some(mtime),
        mtime: Some(mtime),
        ..stat_none()
    }
}

/// Open `p` for writing, created or truncated, replacing anything that is not a file. In a
/// `fresh` root the file is first created exclusively (never through a symlink: OpenSSH
/// opens with `O_EXCL`), without a look at what is there.
fn create_truncated(c: &super::conn::Conn, p: &Path, fresh: bool) -> std::io::Result<ssh2::File> {
    if fresh
        && let Ok(f) = c.sftp.open_mode(
            p,
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
            0o600,
            OpenType::File,
        )
    {
        return Ok(f);
    }
    if c.sftp.lstat(p).is_ok_and(|s| !s.is_file()) {
        let _ = c.sftp.unlink(p);
    }
    c.sftp
        .open_mode(
            p,
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
            0o600,
            OpenType::File,
        )
        .map_err(io)
}
