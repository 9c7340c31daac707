//! The source connector over SFTP: back up a remote tree.
//!
//! The walk uses the attributes readdir returns (one round trip per directory, plus one per
//! symlink for its target). SFTP v3 gives mode, uid/gid, size and whole-second mtimes, but no
//! inode numbers, ctimes or owner names, so unchanged files are recognised by size and mtime.
//! Files are read through a 2 MiB buffer so libssh2 pipelines its requests; several files are
//! read at once, each on its own pooled connection, and a read that fails on a dropped
//! connection reconnects and resumes at the same offset.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::conn::{Conn, Pool, io};
use super::{Location, Options, transient};
use crate::store::error::{Error, Result};
use crate::store::source::Source;
use crate::store::tree::{Node, NodeKind, Time};

pub struct SftpSource {
    loc: Location,
    pool: Arc<Pool>,
}

impl SftpSource {
    pub fn open(loc: Location, opts: &Options) -> Result<SftpSource> {
        let pool = Pool::open(&loc, opts)?;
        Ok(SftpSource { loc, pool })
    }
}

/// A node from SFTP attributes.
pub fn node_from_stat(name: Vec<u8>, st: &ssh2::FileStat) -> Option<Node> {
    let perm = st.perm.unwrap_or(0o100644);
    let kind = NodeKind::from_mode(perm)?;
    let mut n = Node::new(name, kind);
    n.mode = perm & 0o7777;
    n.uid = st.uid.unwrap_or(0);
    n.gid = st.gid.unwrap_or(0);
    n.size = if kind == NodeKind::Dir {
        0
    } else {
        st.size.unwrap_or(0)
    };
    n.mtime = Time {
        sec: st.mtime.unwrap_or(0) as i64,
        nsec: 0,
    };
    n.ctime = n.mtime;
    // SFTP v3 does not report allocated blocks.
    n.blocks = n.size.div_ceil(512);
    Some(n)
}

fn bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

impl Source for SftpSource {
    fn describe(&self) -> String {
        self.loc.url()
    }
    fn root(&self) -> Vec<u8> {
        self.loc.path.as_bytes().to_vec()
    }
    fn has_inodes(&self) -> bool {
        false
    }
    fn stat(&self, path: &[u8]) -> Result<Node> {
        let p = crate::store::source::os(path).to_path_buf();
        let name = p
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_else(|| b"/".to_vec());
        let what = format!("{}: {}", self.loc.url(), p.display());
        self.pool.run(&what, |c| {
            let st = c.sftp.lstat(&p).map_err(io)?;
            let mut n = node_from_stat(name.clone(), &st).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "unknown file type")
            })?;
            if n.kind == NodeKind::Symlink {
                n.target = bytes(&c.sftp.readlink(&p).map_err(io)?);
                n.size = n.target.len() as u64;
            }
            Ok(n)
        })
    }
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>> {
        let p = crate::store::source::os(path).to_path_buf();
        let what = format!("{}: {}", self.loc.url(), p.display());
        self.pool.run(&what, |c| {
            let mut out = Vec::new();
            for (child, st) in c.sftp.readdir(&p).map_err(io)? {
                let name = child
                    .file_name()
                    .map(|n| n.as_bytes().to_vec())
                    .unwrap_or_default();
                let Some(mut n) = node_from_stat(name, &st) else {
                    continue;
                };
                if n.kind == NodeKind::Symlink {
                    n.target = bytes(&c.sftp.readlink(&child).map_err(io)?);
                    n.size = n.target.len() as u64;
                }
                out.push(n);
            }
            Ok(out)
        })
    }
    fn open(&self, path: &[u8], size: u64) -> Result<Box<dyn Read + Send>> {
        let p = crate::store::source::os(path).to_path_buf();
        let r = RemoteReader {
            pool: self.pool.clone(),
            path: p,
            pos: 0,
            size,
            open: None,
            what: format!("{}: {}", self.loc.url(), String::from_utf8_lossy(path)),
        };
        // A buffer no larger than the file: small files are the common case.
        let cap = (size as usize).clamp(32 << 10, super::backend::IO_BUF / 2);
        let mut r = BufReader::with_capacity(cap, r);
        // Open now so a missing or unreadable file fails here, not in the middle of chunking.
        r.fill_buf_checked()?;
        Ok(Box::new(r))
    }
}

trait FillChecked {
    fn fill_buf_checked(&mut self) -> Result<()>;
}

impl FillChecked for BufReader<RemoteReader> {
    fn fill_buf_checked(&mut self) -> Result<()> {
        let what = self.get_ref().what.clone();
        std::io::BufRead::fill_buf(self)
            .map(|_| ())
            .map_err(|e| Error::io(what, e))
    }
}

/// Reads a remote file, resuming at the same offset on a fresh connection after a drop.
struct RemoteReader {
    pool: Arc<Pool>,
    path: std::path::PathBuf,
    pos: u64,
    /// The size the walk saw: reading stops there, so libssh2 requests nothing past the end
    /// (a file that grew since is recorded as it was when listed).
    size: u64,
    open: Option<(Conn, ssh2::File)>,
    what: String,
}

impl RemoteReader {
    fn reopen(&mut self) -> std::io::Result<()> {
        let c = self
            .pool
            .take()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotConnected, e.to_string()))?;
        match c.sftp.open(&self.path) {
            Ok(mut f) => {
                if self.pos > 0
                    && let Err(e) = f.seek(SeekFrom::Start(self.pos))
                {
                    self.pool.give_up(c);
                    return Err(e);
                }
                self.open = Some((c, f));
                Ok(())
            }
            Err(e) => {
                let e = io(e);
                if transient(&e) {
                    self.pool.give_up(c);
                } else {
                    self.pool.give_back(c);
                }
                Err(e)
            }
        }
    }
}

impl Read for RemoteReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let remaining = self.size.saturating_sub(self.pos) as usize;
        if remaining == 0 {
            return Ok(0);
        }
        // libssh2 reads ahead about four times each call: ask for a quarter of what is left.
        let want = (remaining / 4).max(32 << 10).min(remaining).min(buf.len());
        let buf = &mut buf[..want];
        let mut attempt = 0;
        loop {
            if self.open.is_none() {
                match self.reopen() {
                    Ok(()) => {}
                    Err(e) if transient(&e) && attempt < 5 => {
                        attempt += 1;
                        std::thread::sleep(std::time::Duration::from_millis(250 << attempt));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let (_, f) = self.open.as_mut().expect("opened above");
            match f.read(buf) {
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e)
                    if attempt < 5
                        && (transient(&e)
                            || self
                                .open
                                .as_ref()
                                .is_some_and(|(c, _)| !super::conn::alive(c))) =>
                {
                    attempt += 1;
                    if let Some((c, f)) = self.open.take() {
                        drop(f);
                        self.pool.give_up(c);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(250 << attempt));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for RemoteReader {
    fn drop(&mut self) {
        if let Some((c, f)) = self.open.take() {
            drop(f);
            self.pool.give_back(c);
        }
    }
}
