//! The destination connector over SFTP: restore straight onto a server.
//!
//! Files are created with their final size (the server's ftruncate leaves holes), chunks are
//! written at their offsets (through the pipe below, or from several threads on pooled
//! connections without it), and modes, owners and mtimes are set with SETSTAT once a file is
//! complete. A file already present with the same
//! size and mtime is skipped, so an interrupted restore resumes where it stopped. SFTP v3
//! cannot make hard links (libssh2 lacks OpenSSH's extension) or device nodes: extra hard links
//! are written as copies, and fifos and devices are reported as not restored.
//!
//! Directories, whole small files, the pieces of larger ones, symlinks, metadata and listings
//! go through a pipelined channel of their own ([`super::pipe`]) when the server allows a
//! second channel: many
//! requests in flight instead of a round trip each, with the same checks as below (exclusive
//! creates, LSTAT before a SETSTAT by path); their failures come back from
//! [`Destination::settle`].
//!
//! Servers disagree on the order of SSH_FXP_SYMLINK's two paths: OpenSSH's (and paramiko's,
//! and most others') takes the link's target first, the SFTP drafts (and asyncssh's, for any
//! client but OpenSSH's and paramiko's) the new link's path first. Sent in the wrong order, a
//! symlink would be made at the path named by the target (relative to the server's working
//! directory: anywhere) pointing back into the restore. So the order is not assumed: the first
//! symlink of a restore asks the server which it is ([`SymlinkOrder::probe`]), inside a
//! private directory where either reading creates nothing elsewhere.
//!
//! The server resolves every path it is given, symlinks included, and anyone with access to
//! the destination tree may have put some there. So: every directory the restore goes through
//! below its root is looked at (LSTAT) once, the first time it is used, and a symlink there is
//! refused (the entry is reported, not written); an existing file, symlink or anything else in
//! the way of a new entry is removed and the entry created exclusively (`O_EXCL`, which never
//! follows a symlink), so a hard link to a file elsewhere is replaced, not written through;
//! metadata is set on the open handle where there is one, and by path only after an LSTAT has
//! shown that the path is not a symlink (SFTP v3 has no lsetstat, and libssh2 does not expose
//! OpenSSH's `lsetstat@openssh.com`). What remains is a race with someone swapping a checked
//! directory for a symlink while the restore runs; the protocol offers no way to close it.

use std::collections::{HashMap, HashSet};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};

use ssh2::{FileStat, OpenFlags, OpenType};

use super::backend::refused_write;
use super::backend::{Server, disk_full, disk_full_or, mkdir_p, read_all_conn};
use super::conn::{Conn, Pool, io};
use super::pipe::{self, Attrs, FileWrites, Meta, Op, Pipe};
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
    /// The root was seen to be a directory by [`Destination::warm_up`].
    root_there: AtomicBool,
    /// Directories below the root (relative paths) seen to be real directories, not
    /// symlinks: checked once each, the first time an entry goes through them.
    dirs: Mutex<HashSet<Vec<u8>>>,
    /// How this server reads SSH_FXP_SYMLINK, once the first symlink has asked.
    symlink_order: Mutex<Option<SymlinkOrder>>,
    /// What the last directories listed hold, for a restore resuming over what is there:
    /// one READDIR per directory answers [`Destination::is_complete`] and
    /// [`Destination::metadata_current`] for all its files, where an LSTAT per file (and
    /// another before each SETSTAT) took a round trip each.
    listings: Mutex<Listings>,
    /// While [`Destination::look_ahead`] runs: each directory's place in its order, and the
    /// furthest place the restore has asked about, which the look-ahead stays near.
    ahead: Mutex<HashMap<Vec<u8>, usize>>,
    asked: AtomicUsize,
    /// Directories the look-ahead is listing now: one whose parent is among them waits for
    /// that listing, which says what it is (then it is listed through the pipe, not on a
    /// pooled connection after LSTATs).
    listing_now: Mutex<HashSet<Vec<u8>>>,
    /// Directories being listed now, by the look-ahead or the restore: whoever else wants one
    /// waits for that listing ([`SftpDestination::listing_of`]).
    being_listed: Mutex<HashSet<Vec<u8>>>,
    /// Listings the restore had to wait for, and listings made ahead of it (for
    /// `KLOSET_TRACE`).
    missed: AtomicUsize,
    listed_ahead: AtomicUsize,
    /// Directories listed so far, and how many of them were listed again (for
    /// `KLOSET_TRACE`).
    listed: Mutex<HashSet<Vec<u8>>>,
    listed_twice: AtomicUsize,
    /// Pieces of files written through the pipes (for `KLOSET_TRACE`).
    piped_pieces: AtomicUsize,
    /// More pipes for the pieces of larger files, on connections of their own (see
    /// [`write_pipes`]): how many to open when the first piece comes, whether that was
    /// done, and those opened.
    writers_wanted: AtomicUsize,
    writers_started: AtomicBool,
    writers: RwLock<Vec<Pipe>>,
    /// Which pipe the next piece goes through (each in turn).
    next_piece: AtomicUsize,
    /// Files with pieces on their way through the pipes, by path: their metadata is set once
    /// the last piece is written.
    pieces: Mutex<HashMap<Vec<u8>, Arc<FileWrites>>>,
    /// The server refused to set owners (we are not root there): owners are not compared.
    owners_refused: Arc<AtomicBool>,
    /// Many operations in flight on a channel of their own (see [`pipe`]): directories,
    /// whole files, symlinks and metadata go through it when it could be opened. Its failures
    /// come back from [`Destination::settle`].
    pipe: RwLock<Option<Pipe>>,
    /// Directories in which this restore created or removed something: their mtime is not
    /// what any listing taken earlier says, so their metadata is always set again.
    touched: Mutex<HashSet<Vec<u8>>>,
}

/// Directory listings kept at once, at most.
const LISTINGS: usize = 4096;
/// A directory listing more entries, or longer names and link targets in all, than these is
/// not kept: its files are looked at one by one.
const MAX_LISTED: usize = 100_000;
const MAX_LISTED_BYTES: usize = 4 << 20;
/// What all kept listings may weigh together (see [`Listed::weight`]), however the server
/// answers: the least recently used go first.
const MAX_KEPT_BYTES: usize = 64 << 20;
/// How many directories the look-ahead lists beyond the last one the restore asked about.
const AHEAD: usize = 256;
/// Threads of the look-ahead listing through the pipe.
const LOOK_AHEAD_PIPED: usize = 64;

/// What one READDIR of a directory gave: each name's attributes, and the target of each
/// symlink among them (one READLINK each).
struct Listed {
    seen: HashMap<Vec<u8>, Seen>,
    targets: HashMap<Vec<u8>, Vec<u8>>,
    /// Bytes of names and targets.
    bytes: usize,
}

impl Listed {
    fn empty() -> Listed {
        Listed {
            seen: HashMap::new(),
            targets: HashMap::new(),
            bytes: 0,
        }
    }

    /// About what it takes in memory.
    fn weight(&self) -> usize {
        self.bytes + 96 * (self.seen.len() + self.targets.len())
    }
}

/// A directory's listing (`None`: not listed, because too big or unreadable).
type Listing = Option<Listed>;

/// The listings kept, least recently used dropped first, bounded in count and weight.
struct Listings {
    lru: lru::LruCache<Vec<u8>, Arc<Listing>>,
    weight: usize,
}

impl Listings {
    fn new() -> Listings {
        Listings {
            lru: lru::LruCache::new(std::num::NonZeroUsize::new(LISTINGS).expect("non-zero")),
            weight: 0,
        }
    }

    fn weight_of(l: &Listing) -> usize {
        64 + l.as_ref().map_or(0, Listed::weight)
    }

    fn put(&mut self, dir: Vec<u8>, l: Arc<Listing>) {
        self.weight += Self::weight_of(&l);
        if let Some((_, old)) = self.lru.push(dir, l) {
            self.weight -= Self::weight_of(&old);
        }
        while self.weight > MAX_KEPT_BYTES && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, old)) => self.weight -= Self::weight_of(&old),
                None => break,
            }
        }
    }
}

/// What a listing says of an entry (the server's LSTAT of it).
#[derive(Debug, Clone, Copy)]
struct Seen {
    file: bool,
    dir: bool,
    link: bool,
    size: Option<u64>,
    perm: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<u64>,
}

impl Seen {
    fn of(st: &FileStat) -> Seen {
        Seen {
            file: st.is_file(),
            dir: st.is_dir(),
            link: st.file_type().is_symlink(),
            size: st.size,
            perm: st.perm,
            uid: st.uid,
            gid: st.gid,
            mtime: st.mtime,
        }
    }
    fn of_pipe(st: &pipe::Stat) -> Seen {
        Seen::of(&st.file_stat())
    }
    fn complete(&self, node: &Node) -> bool {
        self.file
            && self.size == Some(node.size)
            && self.mtime == Some(node.mtime.sec.max(0) as u64)
    }
}

/// Which of SSH_FXP_SYMLINK's two paths a server takes as the new link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymlinkOrder {
    /// OpenSSH's order: the target first, then the new link's path.
    TargetFirst,
    /// The SFTP drafts' order: the new link's path first, then its target.
    LinkFirst,
}

impl SymlinkOrder {
    /// Ask the server: in a new private directory `.kloset-symlink-probe-<hex>` under `dir`,
    /// one SSH_FXP_SYMLINK naming two absolute paths of that directory, then LSTAT both to see
    /// which became the link. Either way nothing is created outside the probe directory, which
    /// is removed again.
    ///
    /// # Errors
    /// The probe directory cannot be made (the restore could not write there either), or the
    /// server made no link, or both.
    pub fn probe(c: &Conn, dir: &Path) -> std::io::Result<SymlinkOrder> {
        let probe = dir.join(format!(
            ".kloset-symlink-probe-{}",
            crate::store::crypto::random_hex(8)
        ));
        let sftp = c.sftp()?;
        sftp.mkdir(&probe, 0o700).map_err(io)?;
        let (first, second) = (probe.join("first"), probe.join("second"));
        // ssh2's `symlink(path, target)` sends `path` first, then `target`.
        let made = sftp.symlink(&first, &second).map_err(io);
        let is_link = |p: &Path| sftp.lstat(p).is_ok_and(|st| st.file_type().is_symlink());
        let found = (is_link(&second), is_link(&first));
        for p in [&first, &second] {
            let _ = sftp.unlink(p);
        }
        let _ = sftp.rmdir(&probe);
        made?;
        match found {
            (true, false) => Ok(SymlinkOrder::TargetFirst),
            (false, true) => Ok(SymlinkOrder::LinkFirst),
            _ => Err(std::io::Error::other(format!(
                "the server's SYMLINK made {} links in {} for one request; not making symlinks on it",
                if found.0 { "two" } else { "no" },
                probe.display()
            ))),
        }
    }

    /// Make the symlink `link` → `target` on a server that reads SSH_FXP_SYMLINK this way.
    fn symlink(self, c: &Conn, target: &Path, link: &Path) -> std::io::Result<()> {
        let sftp = c.sftp()?;
        match self {
            SymlinkOrder::TargetFirst => sftp.symlink(target, link),
            SymlinkOrder::LinkFirst => sftp.symlink(link, target),
        }
        .map_err(io)
    }
}

impl SftpDestination {
    pub fn open(loc: Location, opts: &Options) -> Result<SftpDestination> {
        let pool = Pool::open(&loc, opts)?;
        Ok(SftpDestination {
            loc,
            pool,
            fresh: AtomicBool::new(false),
            root_there: AtomicBool::new(false),
            dirs: Mutex::new(HashSet::new()),
            symlink_order: Mutex::new(None),
            listings: Mutex::new(Listings::new()),
            ahead: Mutex::new(HashMap::new()),
            asked: AtomicUsize::new(0),
            listing_now: Mutex::new(HashSet::new()),
            being_listed: Mutex::new(HashSet::new()),
            missed: AtomicUsize::new(0),
            listed_ahead: AtomicUsize::new(0),
            listed: Mutex::new(HashSet::new()),
            listed_twice: AtomicUsize::new(0),
            piped_pieces: AtomicUsize::new(0),
            writers_wanted: AtomicUsize::new(0),
            writers_started: AtomicBool::new(false),
            writers: RwLock::new(Vec::new()),
            next_piece: AtomicUsize::new(0),
            pieces: Mutex::new(HashMap::new()),
            owners_refused: Arc::new(AtomicBool::new(false)),
            pipe: RwLock::new(None),
            touched: Mutex::new(HashSet::new()),
        })
    }

    /// What the destination's listing of `path`'s directory says of it: from the last
    /// listings kept, or one READDIR. `None` when the directory could not be listed whole
    /// (the caller looks at the entry itself).
    fn seen(&self, path: &[u8]) -> Option<Option<Seen>> {
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        if let Some(&i) = self.ahead.lock().get(dir) {
            self.asked.fetch_max(i, Ordering::Relaxed);
        }
        let cached = self.listings.lock().lru.get(dir).cloned();
        let listing = match cached {
            Some(l) => l,
            None => {
                self.missed.fetch_add(1, Ordering::Relaxed);
                self.listing_of(dir).0
            }
        };
        listing.as_ref().as_ref().map(|m| m.seen.get(name).copied())
    }

    /// `dir`'s listing: kept, or the one another thread is making now (waited for), or made
    /// now and kept; whether this call made it. The restore and its look-ahead both ask, and
    /// the first makes it: at 100 ms a re-run's restore listed `man1` (17,852 names) again
    /// while the look-ahead's listing of it was on its way, and waited 1.6 s longer for its
    /// own.
    fn listing_of(&self, dir: &[u8]) -> (Arc<Listing>, bool) {
        loop {
            if let Some(l) = self.listings.lock().lru.get(dir).cloned() {
                return (l, false);
            }
            {
                let mut being = self.being_listed.lock();
                if !being.contains(dir) {
                    being.insert(dir.to_vec());
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let l = Arc::new(self.list(dir));
        self.listings.lock().put(dir.to_vec(), l.clone());
        self.being_listed.lock().remove(dir);
        (l, true)
    }

    /// The listing kept now of `path`'s directory, and `path`'s name in it (`None`: no
    /// listing of its directory is kept).
    fn kept_listing<'p>(&self, path: &'p [u8]) -> Option<(Arc<Listing>, &'p [u8])> {
        if path.is_empty() {
            return None;
        }
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        let l = self.listings.lock().lru.peek(dir).cloned()?;
        Some((l, name))
    }

    /// What a listing kept now says of `path` (`None`: no listing of its directory is kept).
    fn cached_seen(&self, path: &[u8]) -> Option<Option<Seen>> {
        let (l, name) = self.kept_listing(path)?;
        l.as_ref().as_ref().map(|m| m.seen.get(name).copied())
    }

    /// The target of the symlink `path` as its directory's kept listing read it.
    fn listed_target(&self, path: &[u8]) -> Option<Vec<u8>> {
        let (l, name) = self.kept_listing(path)?;
        l.as_ref().as_ref()?.targets.get(name).cloned()
    }

    /// Note that this restore changes what directory holds `path` (before changing it).
    fn touch(&self, path: &[u8]) {
        let dir = path
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(&b""[..], |i| &path[..i]);
        let mut t = self.touched.lock();
        if !t.contains(dir) {
            t.insert(dir.to_vec());
        }
    }

    /// One READDIR of directory `rel` (a symlink there is not listed through). A directory
    /// not there yet lists as empty.
    fn list(&self, rel: &[u8]) -> Listing {
        if !self.listed.lock().insert(rel.to_vec()) {
            self.listed_twice.fetch_add(1, Ordering::Relaxed);
        }
        let p = self.path(rel);
        // Through the pipe, when nothing needs a look on a pooled connection first (its
        // parents checked, its parent's listing kept): no pooled connection is held while the
        // listing waits, so many directories can be listed at once.
        if self.piped() && (self.parents_known(rel) || self.parents_seen(rel)) {
            let is_dir = if rel.is_empty() {
                true
            } else {
                match self.cached_seen(rel) {
                    Some(Some(st)) => {
                        if !st.dir || st.link {
                            return None;
                        }
                        true
                    }
                    Some(None) => return Some(Listed::empty()),
                    None => false,
                }
            };
            if is_dir && let Some(r) = self.list_piped(&p) {
                return r.ok().flatten();
            }
        }
        self.pool
            .run(&self.what(rel), |c| {
                self.check_parents(c, rel)?;
                // Its parent's listing, when kept, says what it is: no LSTAT of its own.
                let known = self.cached_seen(rel);
                if let Some(k) = known {
                    match k {
                        Some(st) if st.dir && !st.link => {}
                        Some(_) => return Ok(None),
                        None => return Ok(Some(Listed::empty())),
                    }
                } else if !rel.is_empty() {
                    match c.sftp()?.lstat(&p).map_err(io) {
                        Ok(st) if st.is_dir() => {}
                        Ok(_) => return Ok(None),
                        Err(e) if not_found(&e) => return Ok(Some(Listed::empty())),
                        Err(e) => return Err(e),
                    }
                }
                if let Some(listed) = self.list_piped(&p) {
                    return listed;
                }
                let mut dir = c.sftp()?.opendir(&p).map_err(io)?;
                let mut out = HashMap::new();
                let mut bytes = 0;
                loop {
                    let (name, st) = match dir.readdir() {
                        Ok(e) => e,
                        // LIBSSH2_ERROR_FILE: the end of the listing.
                        Err(e) if e.code() == ssh2::ErrorCode::Session(-16) => break,
                        Err(e) => return Err(c.fail(io(e))),
                    };
                    let name = name.as_os_str().as_bytes();
                    bytes += name.len();
                    if out.len() >= MAX_LISTED || bytes > MAX_LISTED_BYTES {
                        return Ok(None);
                    }
                    out.insert(name.to_vec(), Seen::of(&st));
                }
                drop(dir);
                // The symlinks' targets, so a restore finds a symlink already right without
                // asking again (on the look-ahead's connections when it runs).
                let mut targets = HashMap::new();
                for (name, st) in &out {
                    if !st.link {
                        continue;
                    }
                    let at = p.join(std::ffi::OsStr::from_bytes(name));
                    match c.sftp()?.readlink(&at) {
                        Ok(t) => {
                            let t = t.as_os_str().as_bytes().to_vec();
                            bytes += t.len();
                            if bytes > MAX_LISTED_BYTES {
                                return Ok(None);
                            }
                            targets.insert(name.clone(), t);
                        }
                        Err(e) => {
                            let e = io(e);
                            if super::timed_out(&e) {
                                return Err(c.fail(e));
                            }
                        }
                    }
                }
                Ok(Some(Listed {
                    seen: out,
                    targets,
                    bytes,
                }))
            })
            .ok()
            .flatten()
    }

    /// [`SftpDestination::list`]'s READDIR and READLINKs through the pipe, when there is
    /// one: all of a directory's symlinks read at once, rather than one round trip each.
    fn list_piped(&self, p: &Path) -> Option<std::io::Result<Listing>> {
        let guard = self.pipe.read();
        let pipe = guard.as_ref().filter(|p| p.dead().is_none())?;
        let path = p.as_os_str().as_bytes().to_vec();
        let listed = match pipe.list(path, MAX_LISTED, MAX_LISTED_BYTES, true) {
            Ok(l) => l,
            Err(why) => {
                return Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    why,
                )));
            }
        };
        Some(listed.map(|l| {
            match l {
                pipe::Listed::TooBig => None,
                pipe::Listed::Entries {
                    entries,
                    targets,
                    bytes,
                } => Some(Listed {
                    seen: entries
                        .into_iter()
                        .map(|(name, st)| (name, Seen::of_pipe(&st)))
                        .collect(),
                    targets: targets.into_iter().collect(),
                    bytes,
                }),
            }
        }))
    }

    /// How this server reads SSH_FXP_SYMLINK: probed in the destination's root the first
    /// time (other threads wait for that answer), remembered after.
    fn symlink_order(&self, c: &Conn) -> std::io::Result<SymlinkOrder> {
        let mut known = self.symlink_order.lock();
        if let Some(order) = *known {
            return Ok(order);
        }
        let order = SymlinkOrder::probe(c, &self.path(b""))?;
        *known = Some(order);
        Ok(order)
    }

    /// Check, with one LSTAT per directory not checked before, that every directory between
    /// the root and `rel` is a real directory and not a symlink.
    fn check_parents(&self, c: &Conn, rel: &[u8]) -> std::io::Result<()> {
        for (i, _) in rel.iter().enumerate().filter(|&(_, &b)| b == b'/') {
            let dir = &rel[..i];
            if dir.is_empty() || self.dirs.lock().contains(dir) {
                continue;
            }
            let p = self.path(dir);
            let st = c.sftp()?.lstat(&p).map_err(io)?;
            if st.file_type().is_symlink() {
                return Err(std::io::Error::other(format!(
                    "{} is a symlink on the server; not going through it (remove it, or restore elsewhere)",
                    p.display()
                )));
            }
            if !st.is_dir() {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory on the server",
                    p.display()
                )));
            }
            self.dirs.lock().insert(dir.to_vec());
        }
        Ok(())
    }

    /// Open the pipe on a connection of the pool, unless `KLOSET_SFTP_PIPE=0` (to measure
    /// without it) or the server refuses a second SFTP channel (then everything goes one
    /// request at a time, as before).
    fn start_pipe(&self) {
        if std::env::var_os("KLOSET_SFTP_PIPE").is_some_and(|v| v == "0") {
            return;
        }
        let mut slot = self.pipe.write();
        if slot.is_some() {
            return;
        }
        let Ok(c) = self.pool.take_for_pipe() else {
            return;
        };
        let began = std::time::Instant::now();
        match Pipe::start(c, self.owners_refused.clone()) {
            Ok(p) => {
                p.allow_in_flight(IN_FLIGHT);
                // Opening the channel, starting SFTP on it and its INIT: three round trips.
                let rtt = began.elapsed() / 3;
                let n = write_pipes(rtt, p.window());
                crate::trace::note(|| {
                    format!(
                        "sftp destination: round trip about {rtt:?}, window {} KiB: {n} pipes for the pieces of larger files",
                        p.window() >> 10
                    )
                });
                *slot = Some(p);
                if n > 1 {
                    self.writers_wanted.store(n - 1, Ordering::Relaxed);
                    // Their connections log in while the restore makes directories.
                    self.pool.warm();
                }
            }
            Err((c, e)) => {
                if let Some(c) = c {
                    self.pool.give_back(c);
                }
                crate::trace::note(|| format!("sftp destination: no pipe ({e})"));
            }
        }
    }

    fn fresh(&self) -> bool {
        self.fresh.load(Ordering::Relaxed)
    }

    /// Queue `op` on `rel` in the pipe: `None` when there is no pipe (the caller does it
    /// itself), an error when the pipe has stopped (the server was lost).
    fn submit(&self, rel: &[u8], op: Op) -> Option<Result<()>> {
        let guard = self.pipe.read();
        let p = guard.as_ref()?;
        let path = self.path(rel).into_os_string().into_vec();
        Some(
            p.submit(rel, path, op)
                .map_err(|why| self.lost(rel, &why, p.timed_out())),
        )
    }

    /// The error of an operation on `rel` that the lost pipe could not do.
    fn lost(&self, rel: &[u8], why: &str, timed_out: bool) -> Error {
        if timed_out {
            self.pool.timeout_error(&self.what(rel)).into()
        } else {
            super::Error::Connect(
                self.pool.target().display(),
                format!("{}: {why}", self.what(rel)),
            )
            .into()
        }
    }

    /// Open the more pipes for pieces [`SftpDestination::start_pipe`] asked for (once, when
    /// the first piece comes), on connections the pool lets go of. Pieces go through the
    /// pipes there are meanwhile.
    fn start_writers(&self) {
        let want = self.writers_wanted.load(Ordering::Relaxed);
        if want == 0 || self.writers_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let started: Vec<Pipe> = std::thread::scope(|s| {
            let each: Vec<_> = (0..want)
                .map(|_| {
                    s.spawn(|| {
                        let c = self.pool.take_for_pipe().ok()?;
                        self.pool.detach();
                        match Pipe::start(c, self.owners_refused.clone()) {
                            Ok(p) => {
                                p.allow_in_flight(IN_FLIGHT);
                                p.limit_queued(WRITER_QUEUED);
                                Some(p)
                            }
                            Err((c, e)) => {
                                if let Some(c) = c {
                                    c.quit();
                                }
                                crate::trace::note(|| {
                                    format!("sftp destination: no more pipe for pieces ({e})")
                                });
                                None
                            }
                        }
                    })
                })
                .collect();
            each.into_iter()
                .filter_map(|t| t.join().ok().flatten())
                .collect()
        });
        self.writers.write().extend(started);
    }

    /// Queue the piece `data` at `offset` of `rel` in the next pipe in turn (`None`: there is
    /// no pipe). Its file's metadata waits for it ([`FileWrites`]).
    fn submit_piece(&self, rel: &[u8], offset: u64, data: &[u8]) -> Option<Result<()>> {
        let main = self.pipe.read();
        let main = main.as_ref()?;
        let writers = self.writers.read();
        let i = self.next_piece.fetch_add(1, Ordering::Relaxed) % (writers.len() + 1);
        let p = if i == 0 { main } else { &writers[i - 1] };
        let file = self.pieces.lock().entry(rel.to_vec()).or_default().clone();
        file.add();
        let op = Op::WriteAt {
            offset,
            data: data.to_vec(),
            file: Some(file),
        };
        let path = self.path(rel).into_os_string().into_vec();
        self.piped_pieces.fetch_add(1, Ordering::Relaxed);
        Some(
            p.submit(rel, path, op)
                .map_err(|why| self.lost(rel, &why, p.timed_out())),
        )
    }

    /// Is the pipe there and running?
    fn piped(&self) -> bool {
        self.pipe
            .read()
            .as_ref()
            .is_some_and(|p| p.dead().is_none())
    }

    /// Are all directories between the root and `rel` known to be real directories (looked
    /// at, or made by this restore)?
    fn parents_known(&self, rel: &[u8]) -> bool {
        let dirs = self.dirs.lock();
        rel.iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'/' && i > 0)
            .all(|(i, _)| dirs.contains(&rel[..i]))
    }

    /// Is every directory above `rel` a real directory (no symlink), as checked
    /// ([`SftpDestination::parents_known`]) or as its own parent's kept listing shows it?
    fn parents_seen(&self, rel: &[u8]) -> bool {
        rel.iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'/' && i > 0)
            .all(|(i, _)| {
                let dir = &rel[..i];
                self.dirs.lock().contains(dir)
                    || matches!(self.cached_seen(dir), Some(Some(st)) if st.dir && !st.link)
            })
    }

    /// [`SftpDestination::check_parents`] on a pooled connection, when needed.
    fn ensure_parents(&self, rel: &[u8]) -> Result<()> {
        if self.parents_known(rel) {
            return Ok(());
        }
        self.pool
            .run(&self.what(rel), |c| self.check_parents(c, rel))
    }

    /// Can the pipe create `rel`, and must it remove what is there first? `None`: something
    /// there needs a closer look (a directory, or its directory could not be listed).
    fn pipe_plan(&self, rel: &[u8]) -> Option<bool> {
        if !self.piped() {
            return None;
        }
        if self.fresh() {
            return Some(false);
        }
        match self.seen(rel) {
            Some(None) => Some(false),
            Some(Some(s)) if !s.dir || s.link => Some(true),
            _ => None,
        }
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

    /// A failed write of `need` bytes to the open file `f`: a silent server's connection is
    /// cut ([`Conn::fail`]); otherwise a full disk, or a write the server refused with room to
    /// spare (an exceeded quota, most likely), is told apart from other failures by the
    /// server's `statvfs@openssh.com` (`disk_full_or`).
    fn write_failed(
        &self,
        c: &Conn,
        f: &mut ssh2::File,
        need: u64,
        e: std::io::Error,
    ) -> std::io::Error {
        let e = c.fail(e);
        if c.is_broken() {
            return e;
        }
        // libssh2 keeps several WRITEs of a file in flight, and on a failed one drops the
        // rest, one of which may be half sent (the server's window ran out in it): the
        // server then reads whatever comes next on this channel as the rest of that WRITE,
        // and every later request on it (the room asked on this handle, its CLOSE) waits the
        // whole timeout. The room is asked through the pipe when there is one, and on a full
        // disk this connection is cut (a restore onto a full disk once took twice the timeout
        // here); the pool does not retry that error.
        let Some(room) = self.pipe.read().as_ref().map(|p| self.room(p)) else {
            // No pipe: asked on this handle, bounded ([`Conn::bounded`]).
            let e = c.bounded(|| {
                disk_full_or(f, Path::new(&self.loc.path), need, e, Server::Destination)
            });
            if crate::store::error::no_room(&e) {
                c.kill();
            }
            return e;
        };
        let e = refused_write(
            room,
            Path::new(&self.loc.path),
            need,
            e,
            Server::Destination,
        );
        if crate::store::error::no_room(&e) {
            c.kill();
        }
        e
    }

    /// A failed create (of a directory or a file): "disk full" if the filesystem of the root
    /// has no inodes or bytes left ([`Self::room`]), else `e`.
    fn create_failed(&self, e: std::io::Error) -> std::io::Error {
        if super::transient(&e) || !super::fx_failure(&e) {
            return e;
        }
        let r = self.pipe.read().as_ref().and_then(|p| self.room(p));
        let Some(r) = r else { return e };
        disk_full(r, Path::new(&self.loc.path), 0, Server::Destination).unwrap_or(e)
    }

    /// The room left on the filesystem of the destination's root (free bytes, free inodes),
    /// by `statvfs@openssh.com` on its path, through the pipe. (No open file to ask
    /// `fstatvfs` on: OpenSSH answers that on file handles only, not on a directory's, so
    /// asking on a handle of the root directory always came back empty.) `None` if the
    /// server cannot say or the pipe has stopped.
    fn room(&self, p: &Pipe) -> Option<(u64, Option<u64>)> {
        p.room(self.loc.path.as_bytes().to_vec()).ok()?.ok()
    }
}

/// Takes a directory off [`SftpDestination::listing_now`] when its look-ahead is done with it.
struct ListingNow<'a>(&'a Mutex<HashSet<Vec<u8>>>, &'a [u8]);

impl Drop for ListingNow<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(self.1);
    }
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

impl Destination for SftpDestination {
    fn describe(&self) -> String {
        self.loc.url()
    }
    fn is_remote(&self) -> bool {
        true
    }

    fn warm_up(&self) {
        let root = self.path(b"");
        let there = self
            .pool
            .run(&self.what(b""), |c| {
                Ok(c.sftp()?.stat(&root).is_ok_and(|s| s.is_dir()))
            })
            .unwrap_or(false);
        self.root_there.store(there, Ordering::Relaxed);
        self.start_pipe();
    }

    fn prepare(&self) -> Result<bool> {
        if self.root_there.load(Ordering::Relaxed) {
            self.fresh.store(false, Ordering::Relaxed);
            self.start_pipe();
            return Ok(false);
        }
        let root = self.path(b"");
        self.pool
            .run(&self.what(b""), |c| {
                if c.sftp()?.stat(&root).is_ok_and(|s| s.is_dir()) {
                    return Ok(false);
                }
                mkdir_p(c, &root, 0o755)?;
                Ok(true)
            })
            .inspect(|&created| {
                self.fresh.store(created, Ordering::Relaxed);
                self.start_pipe();
            })
    }

    fn is_complete(&self, path: &[u8], node: &Node) -> bool {
        if let Some(seen) = self.seen(path) {
            return seen.is_some_and(|s| s.complete(node));
        }
        let p = self.path(path);
        self.pool
            .run(&self.what(path), |c| Ok(c.sftp()?.lstat(&p).ok()))
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
        // In an existing destination, its parent's listing tells whether it is there already
        // (a directory, not a symlink): no round trip of its own.
        if !fresh && matches!(self.seen(path), Some(Some(s)) if s.dir && !s.link) {
            self.dirs.lock().insert(path.to_vec());
            return Ok(());
        }
        // Nothing there (a new root, or its parent's listing says so): made through the pipe.
        // Counted a real directory from now on; should the MKDIR fail, what goes into it fails
        // too.
        if self.pipe_plan(path) == Some(false) {
            self.ensure_parents(path)?;
            self.touch(path);
            if let Some(r) = self.submit(path, Op::Mkdir) {
                r?;
                self.dirs.lock().insert(path.to_vec());
                return Ok(());
            }
        }
        self.pool.run(&self.what(path), |c| {
            self.check_parents(c, path)?;
            // In a root this restore created, nobody else can have swapped what it makes.
            if fresh && c.sftp()?.mkdir(&p, 0o700).is_ok() {
                self.touch(path);
                self.dirs.lock().insert(path.to_vec());
                return Ok(());
            }
            match c.sftp()?.lstat(&p) {
                Ok(st) if st.is_dir() && !st.file_type().is_symlink() => {
                    self.dirs.lock().insert(path.to_vec());
                    Ok(())
                }
                Ok(_) => {
                    self.touch(path);
                    c.sftp()?.unlink(&p).map_err(io)?;
                    c.sftp()?.mkdir(&p, 0o700).map_err(io)
                }
                Err(_) => {
                    self.touch(path);
                    c.sftp()?.mkdir(&p, 0o700).map_err(io)
                }
            }
            .map_err(|e| self.create_failed(e))
        })
    }

    fn create_file(&self, path: &[u8], size: u64) -> Result<()> {
        let p = self.path(path);
        self.touch(path);
        if let Some(remove_first) = self.pipe_plan(path) {
            self.ensure_parents(path)?;
            if let Some(r) = self.submit(path, Op::Create { size, remove_first }) {
                return r;
            }
        }
        self.pool.run(&self.what(path), |c| {
            self.check_parents(c, path)?;
            let mut f = create_new(c, &p, self.fresh()).map_err(|e| self.create_failed(e))?;
            if size > 0 {
                f.setstat(stat_size(size))
                    .map_err(|e| self.write_failed(c, &mut f, size, io(e)))?;
            }
            Ok(())
        })
    }

    fn write_at(&self, path: &[u8], offset: u64, data: &[u8]) -> Result<()> {
        if data.iter().all(|&b| b == 0) {
            // The file was created at its final size: zeros are already there, as a hole.
            return Ok(());
        }
        // Through the pipes on a far server, with the other pieces' writes in flight: no
        // round trips waited for here; the file's metadata waits for all of its pieces. On a
        // near one (one pipe would do: see [`write_pipes`]) the pool's connections write
        // them, each encrypting on a thread of its own: on loopback the pipes' one thread
        // each made a restore of a 384 MiB file and man 40% slower (6.9 s against 4.9 s).
        if self.piped() && self.writers_wanted.load(Ordering::Relaxed) > 0 {
            self.ensure_parents(path)?;
            self.start_writers();
            if let Some(r) = self.submit_piece(path, offset, data) {
                return r;
            }
        }
        let p = self.path(path);
        self.pool.run(&self.what(path), |c| {
            self.check_parents(c, path)?;
            let mut f = c
                .sftp()?
                .open_mode(&p, OpenFlags::WRITE, 0o600, OpenType::File)
                .map_err(io)?;
            f.seek(SeekFrom::Start(offset)).map_err(|e| c.fail(e))?;
            for chunk in data.chunks(super::backend::IO_BUF) {
                if let Err(e) = f.write_all(chunk) {
                    return Err(self.write_failed(c, &mut f, data.len() as u64, e));
                }
            }
            Ok(())
        })
    }

    fn symlink(&self, path: &[u8], target: &[u8]) -> Result<()> {
        let p = self.path(path);
        let t = PathBuf::from(std::ffi::OsStr::from_bytes(target));
        let fresh = self.fresh();
        // Already there with this target (its parent's listing shows a symlink of the
        // target's length, READLINK shows the target): nothing to change.
        if !fresh
            && matches!(self.seen(path), Some(Some(s)) if s.link)
            && self.listed_target(path).is_some_and(|had| had == target)
        {
            return Ok(());
        }
        self.touch(path);
        if let Some(remove_first) = self.pipe_plan(path) {
            self.ensure_parents(path)?;
            let order = self.pool.run(&self.what(path), |c| self.symlink_order(c))?;
            let op = Op::Symlink {
                target: target.to_vec(),
                target_first: order == SymlinkOrder::TargetFirst,
                remove_first,
            };
            if let Some(r) = self.submit(path, op) {
                return r;
            }
        }
        self.pool.run(&self.what(path), |c| {
            self.check_parents(c, path)?;
            let order = self.symlink_order(c)?;
            if fresh && order.symlink(c, &t, &p).is_ok() {
                return Ok(());
            }
            clear(c, &p)?;
            order.symlink(c, &t, &p)
        })
    }

    fn hardlink(&self, existing: &[u8], path: &[u8]) -> Result<()> {
        let src = self.path(existing);
        let dst = self.path(path);
        self.touch(path);
        self.pool.run(&self.what(path), |c| {
            self.check_parents(c, existing)?;
            self.check_parents(c, path)?;
            let st = c.sftp()?.lstat(&src).map_err(io)?;
            if !st.is_file() {
                return Err(std::io::Error::other(format!(
                    "{} is no longer a regular file; the hard link is not copied",
                    src.display()
                )));
            }
            let data = read_all_conn(c, &src)?;
            let mut f = create_new(c, &dst, false).map_err(|e| self.create_failed(e))?;
            if let Err(e) = f.write_all(&data) {
                return Err(self.write_failed(c, &mut f, data.len() as u64, e));
            }
            f.setstat(st).map_err(|e| c.fail(io(e)))
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

    fn settle(&self) -> Vec<(Vec<u8>, Error)> {
        let guard = self.pipe.read();
        let Some(p) = guard.as_ref() else {
            return Vec::new();
        };
        // The pipes for pieces first: the last piece of a file may set its metadata there.
        let writers = self.writers.read();
        let mut failures = Vec::new();
        for w in writers.iter().chain([p]) {
            // Whether it was lost is known once it settled.
            let settled = w.settle();
            let (lost, timed_out) = (w.dead(), w.timed_out());
            failures.extend(settled.into_iter().map(|f| (f, lost.clone(), timed_out)));
        }
        crate::trace::note(|| {
            format!(
                "sftp destination: at most {} requests in flight in the pipe; {} pieces of larger files written through it and {} more",
                p.most_in_flight(),
                self.piped_pieces.load(Ordering::Relaxed),
                writers.len()
            )
        });
        if failures.is_empty() {
            return Vec::new();
        }
        // A create or write the server failed with "failure" may be a full disk or an
        // exceeded quota: its filesystem's room says which (asked once).
        let mut room = None;
        let root = Path::new(&self.loc.path);
        failures
            .into_iter()
            .map(|(f, lost, timed_out)| {
                if let Some(why) = &lost
                    && (super::transient(&f.error)
                        || f.error.kind() == std::io::ErrorKind::InvalidData)
                {
                    return (f.key.clone(), self.lost(&f.key, why, timed_out));
                }
                let e = if super::fx_failure(&f.error) {
                    let r = *room.get_or_insert_with(|| self.room(p));
                    refused_write(r, root, 0, f.error, Server::Destination)
                } else {
                    f.error
                };
                let e = if crate::store::error::no_room(&e) {
                    e
                } else {
                    std::io::Error::new(e.kind(), format!("{}: {e}", f.doing))
                };
                let what = self.what(&f.key);
                (f.key, Error::io(what, e))
            })
            .collect()
    }

    fn look_ahead(&self, dirs: &[Vec<u8>], done: &AtomicBool) {
        if self.fresh() || dirs.is_empty() {
            return;
        }
        *self.ahead.lock() = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.clone(), i))
            .collect();
        self.asked.store(0, Ordering::Relaxed);
        let next = AtomicUsize::new(0);
        // Through the pipe a listing holds no connection and waits on its answer: many at
        // once. Re-running a restore of share/man + lib.tar (113 directories, one of 17,852
        // entries) over a complete destination: 16 threads 4.37-5.29 s at 100 ms, 64 3.30-3.48
        // s (32: 3.76 s); at 20 ms 1.17-1.35 against 1.00-1.06 s; on loopback the same
        // (0.51-0.60 s). (Before listings went two round trips and READDIRs several at once,
        // 32 threads measured slower than 16 at 20 ms.)
        let threads = if self.piped() {
            LOOK_AHEAD_PIPED
        } else {
            self.pool.target().connections.clamp(1, 8)
        };
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(dir) = dirs.get(i) else { return };
                        self.listing_now.lock().insert(dir.clone());
                        let _listed = ListingNow(&self.listing_now, dir);
                        // Near the restore's questions, so what is listed is still kept
                        // when it asks.
                        while i > self.asked.load(Ordering::Relaxed) + AHEAD {
                            if done.load(Ordering::Relaxed) {
                                return;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        if done.load(Ordering::Relaxed) {
                            return;
                        }
                        // Its parent's listing, on its way, says what this one is.
                        let parent = dir
                            .iter()
                            .rposition(|&b| b == b'/')
                            .map_or(&b""[..], |k| &dir[..k]);
                        while !dir.is_empty()
                            && self.listing_now.lock().contains(parent)
                            && !done.load(Ordering::Relaxed)
                        {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        if self.listing_of(dir).1 {
                            self.listed_ahead.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        self.ahead.lock().clear();
        crate::trace::note(|| {
            format!(
                "sftp destination: {} directories listed ahead on {threads} connections, {} listed while the restore waited, {} listed twice",
                self.listed_ahead.load(Ordering::Relaxed),
                self.missed.load(Ordering::Relaxed),
                self.listed_twice.load(Ordering::Relaxed)
            )
        });
    }

    fn metadata_current(&self, path: &[u8], node: &Node) -> bool {
        // Nothing was there before a fresh restore; a directory this restore changed has
        // another mtime than its listing says.
        if self.fresh() || (node.kind == NodeKind::Dir && self.touched.lock().contains(path)) {
            return false;
        }
        let Some(Some(s)) = self.seen(path) else {
            return false;
        };
        let owners = self.owners_refused.load(Ordering::Relaxed)
            || (s.uid == Some(node.uid) && s.gid == Some(node.gid));
        let kind = match node.kind {
            NodeKind::File => s.complete(node),
            NodeKind::Dir => s.dir && !s.link && s.mtime == Some(node.mtime.sec.max(0) as u64),
            _ => false,
        };
        kind && s.perm.map(|m| m & 0o7777) == Some(node.mode & 0o7777) && owners
    }

    fn set_metadata(&self, path: &[u8], node: &Node) -> Result<()> {
        if node.kind == NodeKind::Symlink {
            // SETSTAT follows symlinks; there is no lsetstat in SFTP v3.
            return Ok(());
        }
        // A file with pieces still on their way: the pipe that writes the last one sets it.
        let file = self.pieces.lock().remove(path);
        if let Some(file) = file
            && file.then_set(meta(node)).is_none()
        {
            return Ok(());
        }
        if self.piped() {
            self.ensure_parents(path)?;
            // LSTAT, then SETSTAT once it shows no symlink, in the pipe.
            if let Some(r) = self.submit(path, Op::SetStat { meta: meta(node) }) {
                return r;
            }
        }
        let p = self.path(path);
        self.pool.run(&self.what(path), |c| {
            self.check_parents(c, path)?;
            // SETSTAT follows a symlink: only set what LSTAT shows is not one.
            if c.sftp()?.lstat(&p).map_err(io)?.file_type().is_symlink() {
                return Err(std::io::Error::other(format!(
                    "{} is a symlink on the server now; its metadata is not set through it",
                    p.display()
                )));
            }
            // Owners, mode and times in one request; where the server refuses the owners (we
            // are not root there), mode and times alone.
            match c.sftp()?.setstat(&p, stat_all(node)).map_err(io) {
                Ok(()) => {
                    // OpenSSH applies the owner last, and chown clears setuid/setgid bits.
                    if node.mode & 0o6000 != 0 {
                        c.sftp()?.setstat(&p, stat_mode(node)).map_err(io)?;
                    }
                    return Ok(());
                }
                // A silent server is not asked a second time.
                Err(e) if super::timed_out(&e) => return Err(e),
                Err(_) => {}
            }
            let refused = c.sftp()?.setstat(&p, stat_mode_times(node));
            if refused.is_ok() {
                self.owners_refused.store(true, Ordering::Relaxed);
            }
            refused.map_err(|e| {
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
        self.touch(path);
        self.pool.run(&self.what(path), |c| {
            self.check_parents(c, path)?;
            match c.sftp()?.unlink(&p) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let e = io(e);
                    if not_found(&e) { Ok(()) } else { Err(e) }
                }
            }
        })
    }

    fn write_whole(&self, path: &[u8], data: &[u8], node: &Node) -> Result<()> {
        let p = self.path(path);
        self.touch(path);
        if let Some(remove_first) = self.pipe_plan(path) {
            self.ensure_parents(path)?;
            let op = Op::Write {
                data: data.to_vec(),
                remove_first,
                meta: meta(node),
            };
            if let Some(r) = self.submit(path, op) {
                return r;
            }
        }
        self.pool.run(&self.what(path), |c| {
            self.check_parents(c, path)?;
            let mut f = create_new(c, &p, self.fresh()).map_err(|e| self.create_failed(e))?;
            let need = data.len() as u64;
            if data.iter().all(|&b| b == 0) {
                if !data.is_empty() {
                    f.setstat(stat_size(need))
                        .map_err(|e| self.write_failed(c, &mut f, need, io(e)))?;
                }
            } else {
                for chunk in data.chunks(super::backend::IO_BUF) {
                    if let Err(e) = f.write_all(chunk) {
                        return Err(self.write_failed(c, &mut f, need, e));
                    }
                }
            }
            // On the open handle: owners, mode and times in one request, or without the owners
            // where the server refuses them.
            match f.setstat(stat_all(node)).map_err(io) {
                Ok(()) => {
                    // OpenSSH applies the owner last, and chown clears setuid/setgid bits.
                    if node.mode & 0o6000 != 0 {
                        f.setstat(stat_mode(node)).map_err(|e| c.fail(io(e)))?;
                    }
                    return Ok(());
                }
                Err(e) if super::timed_out(&e) => return Err(c.fail(e)),
                Err(_) => {}
            }
            f.setstat(stat_mode_times(node)).map_err(|e| c.fail(io(e)))
        })
    }
}

impl Drop for SftpDestination {
    fn drop(&mut self) {
        // The pipes for pieces keep their connections apart from the pool: closed here.
        for w in self.writers.get_mut().drain(..) {
            if let Some(c) = w.finish() {
                c.quit();
            }
        }
        if let Some(p) = self.pipe.get_mut().take() {
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

/// Requests in flight in each of the restore's pipes before new operations wait: its
/// answers are statuses and handles (listings' READDIRs and READLINKs are bounded apart), a
/// few tens of bytes each, while a small file costs four or five requests. Measured on
/// `/usr/share/man` (21k files) at 20 ms: 256 (the pipe's default) wrote them in 4.5 s,
/// 512 in 3.1 s, 1024 in 3.4 s, 2048 in 4.1 s; on loopback 256 and 512 took the same and
/// 4096 three times as long (libssh2 and the server slow down with deep queues).
const IN_FLIGHT: usize = 512;

/// Bytes of pieces waiting in each of the more pipes for pieces, at most: several round
/// trips' worth of the server's window (the first pipe keeps the pipe's own bound).
const WRITER_QUEUED: usize = 8 << 20;

/// Pipes the pieces of larger files go through, at most (the first is the pipe everything
/// else goes through; see [`write_pipes`]).
const MAX_WRITE_PIPES: usize = 4;

/// How many pipes to write pieces through: a channel moves at most the server's window
/// (`window` bytes) per round trip, so a far server needs several to carry [`super::SIZED_RATE`]
/// (the bandwidth-delay product over the window), from one on a near server to
/// [`MAX_WRITE_PIPES`] (which with the pool stays under OpenSSH's MaxStartups).
/// `KLOSET_SFTP_WRITE_PIPES=N` sets it (to measure).
fn write_pipes(rtt: std::time::Duration, window: u32) -> usize {
    if let Some(n) = std::env::var("KLOSET_SFTP_WRITE_PIPES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return n.clamp(1, MAX_WRITE_PIPES);
    }
    let per_pipe = f64::from(window.max(32 << 10));
    ((rtt.as_secs_f64() * super::SIZED_RATE / per_pipe).ceil() as usize).clamp(1, MAX_WRITE_PIPES)
}

/// A node's metadata as the pipe sets it.
fn meta(node: &Node) -> Meta {
    let t = node.mtime.sec.clamp(0, u32::MAX as i64) as u32;
    let mode_times = Attrs {
        perm: Some(node.mode & 0o7777),
        times: Some((t, t)),
        ..Attrs::default()
    };
    Meta {
        all: Attrs {
            owner: Some((node.uid, node.gid)),
            ..mode_times
        },
        mode_times,
        setid: node.mode & 0o6000 != 0,
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

/// Remove whatever is at `p` (a file, a symlink, a hard link to anywhere, an empty
/// directory), never following it.
fn clear(c: &Conn, p: &Path) -> std::io::Result<()> {
    match c.sftp()?.lstat(p) {
        Ok(st) if st.is_dir() && !st.file_type().is_symlink() => {
            c.sftp()?.rmdir(p).map_err(|e| {
                std::io::Error::other(format!(
                    "{} is a directory that is not empty, where the snapshot has no directory; remove it first ({e})",
                    p.display()
                ))
            })
        }
        Ok(_) => c.sftp()?.unlink(p).map_err(io),
        Err(_) => Ok(()),
    }
}

/// Create `p` as a new, empty file open for writing (0600 until its metadata is set). It is
/// always created exclusively (OpenSSH opens with `O_EXCL`, which never follows a symlink):
/// whatever was there (a file, which may be a hard link to a file elsewhere, a symlink,
/// anything else) is removed first, never opened and truncated. In a `fresh` root the create
/// is tried before any look at what is there.
fn create_new(c: &Conn, p: &Path, fresh: bool) -> std::io::Result<ssh2::File> {
    let sftp = c.sftp()?;
    let excl = || {
        sftp.open_mode(
            p,
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
            0o600,
            OpenType::File,
        )
    };
    if fresh && let Ok(f) = excl() {
        return Ok(f);
    }
    clear(c, p)?;
    excl().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(names: usize, name_len: usize) -> Listed {
        let mut l = Listed::empty();
        for i in 0..names {
            let mut name = format!("{i:08}").into_bytes();
            name.resize(name_len.max(8), b'x');
            l.bytes += name.len();
            l.seen.insert(
                name,
                Seen {
                    file: true,
                    dir: false,
                    link: false,
                    size: Some(1),
                    perm: Some(0o644),
                    uid: Some(0),
                    gid: Some(0),
                    mtime: Some(0),
                },
            );
        }
        l
    }

    #[test]
    fn kept_listings_stay_within_their_weight_however_large() {
        let mut kept = Listings::new();
        // Listings of 4 MiB of names each (what one listing may hold): 100 of them would be
        // 400 MiB; the least recently used go.
        for d in 0..100u32 {
            kept.put(d.to_be_bytes().to_vec(), Arc::new(Some(listed(1024, 4096))));
            assert!(kept.weight <= MAX_KEPT_BYTES, "{} bytes kept", kept.weight);
        }
        assert!(
            kept.lru.len() < 100 && kept.lru.len() >= 10,
            "{}",
            kept.lru.len()
        );
        // The newest is there, the oldest gone, and the count bound holds for small ones.
        assert!(kept.lru.contains(&99u32.to_be_bytes().to_vec()));
        assert!(!kept.lru.contains(&0u32.to_be_bytes().to_vec()));
        for d in 0..(2 * LISTINGS as u32) {
            kept.put(
                format!("small{d}").into_bytes(),
                Arc::new(Some(listed(1, 8))),
            );
        }
        assert_eq!(kept.lru.len(), LISTINGS);
        // Putting the same directory again replaces it and its weight.
        let before = kept.weight;
        kept.put(b"small0x".to_vec(), Arc::new(None));
        kept.put(b"small0x".to_vec(), Arc::new(None));
        assert!(kept.weight <= before + 64);
    }

    #[test]
    fn pipes_for_pieces_follow_the_bandwidth_delay_product() {
        if std::env::var_os("KLOSET_SFTP_WRITE_PIPES").is_some() {
            eprintln!("SKIP: KLOSET_SFTP_WRITE_PIPES is set");
            return;
        }
        let ms = std::time::Duration::from_millis;
        let openssh = 2 << 20;
        // Loopback, a LAN: one pipe (pieces go on the pool's connections).
        assert_eq!(
            write_pipes(std::time::Duration::from_micros(400), openssh),
            1
        );
        assert_eq!(write_pipes(ms(5), openssh), 1);
        // 20 ms: 5 MB in flight at 256 MB/s, 2 MiB per channel.
        assert_eq!(write_pipes(ms(20), openssh), 3);
        assert_eq!(write_pipes(ms(100), openssh), MAX_WRITE_PIPES);
        // A server with a larger window needs fewer; a zero window counts as 32 KiB.
        assert_eq!(write_pipes(ms(20), 16 << 20), 1);
        assert_eq!(write_pipes(ms(1), 0), MAX_WRITE_PIPES);
    }
}
