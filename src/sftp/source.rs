//! The source connector over SFTP: back up a remote tree.
//!
//! The walk uses the attributes readdir returns (one round trip per directory, plus one per
//! symlink for its target). SFTP v3 gives mode, uid/gid, size and whole-second mtimes, but no
//! inode numbers, ctimes or owner names, so unchanged files are recognised by size and mtime.
//! Files are read through a 2 MiB buffer so libssh2 pipelines its requests; several files are
//! read at once, each on its own pooled connection, and a read that fails on a dropped
//! connection reconnects and resumes at the same offset.

use std::ffi::OsStr;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::conn::{Conn, Pool, io};
use super::pipe::{self, Pipe};
use super::{Location, Options, timed_out, transient};
use crate::store::error::{Error, Result};
use crate::store::source::Source;
use crate::store::tree::{Node, NodeKind, Time, screen};

/// Entries of one directory accepted from a server at most (a hostile one could list forever).
const MAX_ENTRIES: usize = 4_000_000;

pub struct SftpSource {
    loc: Location,
    pool: Arc<Pool>,
    /// Directories are listed through a pipelined channel ([`super::pipe`]), their symlinks'
    /// targets read all at once; started the first time (`None`: the server refused it, or
    /// `KLOSET_SFTP_PIPE=0`).
    pipe: std::sync::OnceLock<Option<Pipe>>,
    /// Small files asked of the pipe ahead of the workers ([`Source::prefetch`]), by path.
    prefetched: parking_lot::Mutex<std::collections::HashMap<Vec<u8>, pipe::ReadAnswer>>,
    /// Attributes of files read through the pipe, as an FSTAT on the open handle gave them
    /// after the reads: [`Source::changed`] compares these instead of asking again.
    after: parking_lot::Mutex<std::collections::HashMap<Vec<u8>, pipe::Stat>>,
    /// Files read through the pipe (for `KLOSET_TRACE`).
    piped_reads: std::sync::atomic::AtomicUsize,
    /// Sizes of large directories seen in their parents' listings and not listed yet, by
    /// path: their listings start with as many READDIRs as the size suggests
    /// ([`Pipe::list_sized`]).
    dir_sizes: parking_lot::Mutex<std::collections::HashMap<Vec<u8>, u64>>,
}

/// A directory at least this large (three 8 KiB steps of [`Pipe::list_sized`]) has its size
/// kept for its listing.
const BIG_DIR: u64 = 24 << 10;
/// Sizes kept at most (those of directories excluded or never reached stay).
const MAX_DIR_SIZES: usize = 4096;

/// Threads listing directories through the pipe ahead of the walk ([`Source::listers`]).
const PIPE_LISTERS: usize = 64;

/// Files up to this size are read whole through the pipe when the backup asks for them ahead.
const PIPE_READ_MAX: u64 = 256 << 10;
/// Reads ahead through the pipe waiting for their file, at most.
const PIPE_READS: usize = 256;

/// Bytes of names accepted from one directory listed through the pipe.
const MAX_LISTED_BYTES: usize = 256 << 20;

impl SftpSource {
    pub fn open(loc: Location, opts: &Options) -> Result<SftpSource> {
        let pool = Pool::open(&loc, opts)?;
        Ok(SftpSource {
            loc,
            pool,
            pipe: std::sync::OnceLock::new(),
            prefetched: Default::default(),
            after: Default::default(),
            piped_reads: Default::default(),
            dir_sizes: Default::default(),
        })
    }

    /// The pipe, started on a pooled connection the first time, if the server allows it.
    fn pipe(&self) -> Option<&Pipe> {
        self.pipe
            .get_or_init(|| {
                if std::env::var_os("KLOSET_SFTP_PIPE").is_some_and(|v| v == "0") {
                    return None;
                }
                let c = self.pool.take_for_pipe().ok()?;
                match Pipe::start(c, Arc::new(std::sync::atomic::AtomicBool::new(false))) {
                    Ok(p) => {
                        // Kept to the end of the backup: its connection is then closed at
                        // once, not by closing the channel politely first (a round trip).
                        p.quit_when_stopped();
                        Some(p)
                    }
                    Err((c, _)) => {
                        if let Some(c) = c {
                            self.pool.give_back(c);
                        }
                        None
                    }
                }
            })
            .as_ref()
            .filter(|p| p.dead().is_none())
    }

    /// The error to give at once when the pipe stopped because the server went silent: asking
    /// again on the pool would wait out the timeout again for each request (a silent server's
    /// new sessions are silent too), and the listings ahead of the walk made that 21 times.
    fn silent(&self, what: &str) -> Option<Error> {
        match self.pipe.get() {
            Some(Some(p)) if p.timed_out() => Some(self.pool.timeout_error(what).into()),
            _ => None,
        }
    }

    /// [`Source::stat_many`] through the pipe, all at once: the pipe holds the connection
    /// the pool opened first, and a stat on the pool would wait for another to be made (five
    /// round trips and more). `None` when there is no pipe, or it stopped (the caller asks the
    /// usual way).
    fn stat_piped(&self, paths: &[Vec<u8>]) -> Option<Vec<Result<Node>>> {
        let pipe = self.pipe()?;
        let answers: Vec<_> = paths
            .iter()
            .map(|p| pipe.stat_later(p.clone()))
            .collect::<Result<_, _>>()
            .ok()?;
        let mut out = Vec::with_capacity(paths.len());
        for (path, answer) in paths.iter().zip(answers) {
            let p = crate::store::source::os(path);
            let what = format!("{}: {}", self.loc.url(), p.display());
            let st = match answer.recv().ok()? {
                Ok(st) => st,
                Err(e) => {
                    out.push(Err(Error::io(what, e)));
                    continue;
                }
            };
            let name = p
                .file_name()
                .map(|n| n.as_bytes().to_vec())
                .unwrap_or_else(|| b"/".to_vec());
            let Some(mut n) = node_from_stat(name, &st.file_stat()) else {
                out.push(Err(Error::io(
                    what,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "unknown file type"),
                )));
                continue;
            };
            if n.kind == NodeKind::Symlink {
                match pipe.read_links(vec![path.clone()]).ok()?.pop()? {
                    Ok(target) => {
                        n.size = target.len() as u64;
                        n.target = target;
                    }
                    Err(e) => {
                        out.push(Err(Error::io(what, e)));
                        continue;
                    }
                }
            }
            out.push(Ok(n));
        }
        Some(out)
    }

    /// [`Source::read_dir`] through the pipe: `None` when there is none, or it stopped (the
    /// caller lists the usual way, with retries on new connections).
    fn read_dir_piped(&self, p: &Path, what: &str) -> Option<Result<Vec<Node>>> {
        let pipe = self.pipe()?;
        let size = self.dir_sizes.lock().remove(p.as_os_str().as_bytes());
        let listed = pipe
            .list_sized(
                bytes(p),
                size.unwrap_or(0),
                MAX_ENTRIES,
                MAX_LISTED_BYTES,
                false,
            )
            .ok()?;
        if pipe.dead().is_some() {
            return None;
        }
        let entries = match listed {
            Ok(pipe::Listed::Entries { entries, .. }) => entries,
            Ok(pipe::Listed::TooBig) => {
                return Some(Err(Error::io(
                    what.to_string(),
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "the server listed more than {MAX_ENTRIES} entries or {} MiB of names; directory not backed up",
                            MAX_LISTED_BYTES >> 20
                        ),
                    ),
                )));
            }
            Err(e) => return Some(Err(Error::io(what.to_string(), e))),
        };
        // The sizes of large subdirectories, for their own listings (a node keeps none).
        {
            let mut sizes = self.dir_sizes.lock();
            for (name, st) in &entries {
                if let Some(size) = st.size
                    && size >= BIG_DIR
                    && st.is_dir()
                    && sizes.len() < MAX_DIR_SIZES
                {
                    let mut full = bytes(p);
                    full.push(b'/');
                    full.extend_from_slice(name);
                    sizes.insert(full, size);
                }
            }
        }
        let mut out: Vec<Node> = entries
            .into_iter()
            .filter_map(|(name, st)| node_from_stat(name, &st.file_stat()))
            .collect();
        // Symlink targets are read only through names the walk will use, all at once.
        let verdicts = screen(out.iter().map(|n| &n.name[..]));
        let links: Vec<usize> = out
            .iter()
            .zip(verdicts)
            .enumerate()
            .filter(|(_, (n, why))| why.is_none() && n.kind == NodeKind::Symlink)
            .map(|(i, _)| i)
            .collect();
        let paths = links
            .iter()
            .map(|&i| bytes(&p.join(OsStr::from_bytes(&out[i].name))))
            .collect();
        let targets = pipe.read_links(paths).ok()?;
        if pipe.dead().is_some() {
            return None;
        }
        for (i, t) in links.into_iter().zip(targets) {
            match t {
                Ok(t) => {
                    out[i].size = t.len() as u64;
                    out[i].target = t;
                }
                Err(e) => return Some(Err(Error::io(what.to_string(), e))),
            }
        }
        Some(Ok(out))
    }
}

impl Drop for SftpSource {
    fn drop(&mut self) {
        crate::trace::note(|| {
            format!(
                "sftp source: {} files read ahead through the pipe, at most {} requests in flight in the pipe; {} connection(s) made",
                self.piped_reads.load(std::sync::atomic::Ordering::Relaxed),
                match self.pipe.get() {
                    Some(Some(p)) => p.most_in_flight(),
                    _ => 0,
                },
                self.pool.connections_made(),
            )
        });
        if let Some(Some(p)) = self.pipe.take() {
            let dead = p.dead().is_some();
            if let Some(c) = p.finish() {
                if dead {
                    self.pool.give_up(c);
                } else {
                    self.pool.give_back(c);
                }
            }
        }
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
        if let Some(r) = self.stat_piped(&[path.to_vec()]).and_then(|mut r| r.pop()) {
            return r;
        }
        let what = format!("{}: {}", self.loc.url(), p.display());
        if let Some(e) = self.silent(&what) {
            return Err(e);
        }
        self.pool.run(&what, |c| {
            let st = c.sftp()?.lstat(&p).map_err(io)?;
            let mut n = node_from_stat(name.clone(), &st).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "unknown file type")
            })?;
            if n.kind == NodeKind::Symlink {
                n.target = bytes(&c.sftp()?.readlink(&p).map_err(io)?);
                n.size = n.target.len() as u64;
            }
            Ok(n)
        })
    }
    fn stat_many(&self, paths: &[Vec<u8>]) -> Vec<Result<Node>> {
        match self.stat_piped(paths) {
            Some(r) => r,
            None => crate::store::source::stat_each(paths, |p| self.stat(p)),
        }
    }
    /// The entries as the server sent them, in its order, except the directory's own `.` and
    /// `..`. A name the walk must not use (see [`screen`]: `/`, a second `..`, …) or a
    /// second entry of one name is passed on as it came, for the backup to skip and report,
    /// but nothing is done with it here: no symlink target is read through it.
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>> {
        let p = crate::store::source::os(path).to_path_buf();
        let what = format!("{}: {}", self.loc.url(), p.display());
        if let Some(r) = self.read_dir_piped(&p, &what) {
            return r;
        }
        if let Some(e) = self.silent(&what) {
            return Err(e);
        }
        self.pool.run(&what, |c| {
            let mut dir = c.sftp()?.opendir(&p).map_err(io)?;
            let mut out = Vec::new();
            let (mut dot, mut dotdot) = (false, false);
            let mut listed = 0usize;
            loop {
                let (name, st) = match dir.readdir() {
                    Ok(e) => e,
                    // LIBSSH2_ERROR_FILE: the end of the listing.
                    Err(e) if e.code() == ssh2::ErrorCode::Session(-16) => break,
                    Err(e) => return Err(c.fail(io(e))),
                };
                listed += 1;
                if listed > MAX_ENTRIES {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "the server listed more than {MAX_ENTRIES} entries; directory not backed up"
                        ),
                    ));
                }
                let name = name.as_os_str().as_bytes().to_vec();
                match &name[..] {
                    b"." if !dot => dot = true,
                    b".." if !dotdot => dotdot = true,
                    _ => out.extend(node_from_stat(name, &st)),
                }
            }
            // Symlink targets are read only through names the walk will use.
            let verdicts = screen(out.iter().map(|n| &n.name[..]));
            for (n, why) in out.iter_mut().zip(verdicts) {
                if why.is_none() && n.kind == NodeKind::Symlink {
                    n.target = bytes(
                        &c.sftp()?
                            .readlink(&p.join(OsStr::from_bytes(&n.name)))
                            .map_err(|e| c.fail(io(e)))?,
                    );
                    n.size = n.target.len() as u64;
                }
            }
            Ok(out)
        })
    }
    fn listers(&self) -> usize {
        // Through the pipe a listing waits on the network and holds no connection: many
        // directories are listed at once, a thread each waiting for its answer. Each listing
        // takes two round trips, so the threads bound how many directories a round trip
        // lists: 16 listed /usr/share/man's 113 directories in 20 round trips, 2.3 s at 100 ms.
        if self.pipe().is_some() {
            PIPE_LISTERS
        } else {
            crate::store::backup::LISTER_THREADS
        }
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn prefetch(&self, path: &[u8], len: u64) {
        // A small file whole, through the pipe: its read is on its way while the workers
        // chunk the files before it (one round trip for many files instead of three for each).
        if len == 0 || len > PIPE_READ_MAX || self.prefetched.lock().len() >= PIPE_READS {
            return;
        }
        let Some(pipe) = self.pipe() else { return };
        if let Ok(answer) = pipe.read(path.to_vec(), len as u32) {
            self.prefetched.lock().insert(path.to_vec(), answer);
        }
    }

    fn changed(&self, path: &[u8], seen: &Node) -> Result<Option<Node>> {
        let after = self.after.lock().remove(path);
        if let Some(st) = after
            && st.size.is_some()
            && st.mtime.is_some()
            && let Some(now) = node_from_stat(seen.name.clone(), &st.file_stat())
        {
            let same = crate::store::source::same_state(&now, seen, false);
            return Ok((!same).then_some(now));
        }
        let now = self.stat(path)?;
        Ok((!crate::store::source::same_state(&now, seen, false)).then_some(now))
    }

    fn open(&self, path: &[u8], size: u64) -> Result<Box<dyn Read + Send>> {
        // Read ahead through the pipe: its bytes, and its attributes after the reads for
        // `changed`. Anything else (an error, a file grown past what was asked) is read the
        // usual way, which reports errors as it always has.
        let ahead = self.prefetched.lock().remove(path);
        if let Some(answer) = ahead
            && let Ok(Ok((data, st))) = answer.recv()
            && data.len() as u64 == size
            && st.size == Some(size)
        {
            let mut after = self.after.lock();
            if after.len() < PIPE_READS * 16 {
                after.insert(path.to_vec(), st);
            }
            drop(after);
            self.piped_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Box::new(std::io::Cursor::new(data)));
        }
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
            .map_err(|e| Error::from_io(what, e))
    }
}

/// An I/O error that carries a transport failure (the server cannot be reached, or did not
/// answer within the timeout), so the backup stops instead of recording an unreadable file.
fn lost(e: impl Into<Error>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, e.into())
}

/// Does this I/O error already carry a store error (from the pool)?
fn carries_store_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<Error>())
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
        // The pool has retried already: its failure ends the read.
        let c = self.pool.take().map_err(|e| {
            let kind = e.kind();
            lost(Error::Connector(format!("{}: {e}", self.what), kind))
        })?;
        match c.sftp()?.open(&self.path) {
            Ok(mut f) => {
                if self.pos > 0
                    && let Err(e) = f.seek(SeekFrom::Start(self.pos))
                {
                    c.kill();
                    drop(f);
                    self.pool.give_up(c);
                    return Err(e);
                }
                self.open = Some((c, f));
                Ok(())
            }
            Err(e) => {
                let e = io(e);
                if timed_out(&e) {
                    self.pool.give_up(c);
                    return Err(lost(self.pool.timeout_error(&self.what)));
                }
                if transient(&e) {
                    self.pool.give_up(c);
                } else {
                    self.pool.give_back(c);
                }
                Err(e)
            }
        }
    }

    /// Drop the open file and its connection, cutting the connection first so closing the
    /// handle does not wait on a server that stopped answering.
    fn drop_broken(&mut self) {
        if let Some((c, f)) = self.open.take() {
            c.kill();
            drop(f);
            self.pool.give_up(c);
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
            let Some((_, f)) = self.open.as_mut() else {
                match self.reopen() {
                    Ok(()) => {}
                    Err(e) if carries_store_error(&e) => return Err(e),
                    Err(e) if transient(&e) && attempt < 5 => {
                        attempt += 1;
                        std::thread::sleep(std::time::Duration::from_millis(250 << attempt));
                    }
                    Err(e) if transient(&e) => return Err(self.gave_up(e)),
                    Err(e) => return Err(e),
                }
                continue;
            };
            match f.read(buf) {
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if timed_out(&e) => {
                    self.drop_broken();
                    return Err(lost(self.pool.timeout_error(&self.what)));
                }
                Err(e)
                    if transient(&e)
                        || self
                            .open
                            .as_ref()
                            .is_some_and(|(c, _)| !super::conn::alive(c)) =>
                {
                    self.drop_broken();
                    if attempt >= 5 {
                        return Err(self.gave_up(e));
                    }
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(250 << attempt));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl RemoteReader {
    /// The error after the last retry of a lost connection: a transport failure.
    fn gave_up(&self, e: std::io::Error) -> std::io::Error {
        lost(super::Error::Connect(
            self.pool.target().display(),
            format!("{}: connection lost and not recovered: {e}", self.what),
        ))
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
