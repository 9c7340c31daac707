//! A pipelined SFTP client for many small operations: an SFTP v3 channel of its own, spoken
//! directly, with up to [`MAX_IN_FLIGHT`] requests waiting for their answers at once.
//!
//! libssh2's SFTP API sends a request and waits for its answer before the next one, so a
//! restore onto a server 20 ms away spends 80 ms or more on each small file (open, write,
//! set attributes, close), whatever the bandwidth. Here a driver thread owns the channel; the
//! restore's workers hand it whole operations ([`Op`]: make a directory, write a whole file
//! and its metadata, set a path's metadata, make a symlink) and go on at once. The driver
//! sends each operation's first request, and the rest as answers arrive (a file's writes,
//! attributes and close follow the answer to its OPEN, which carries the handle they need),
//! while other operations' requests are in flight. The server answers requests of one channel
//! in the order they were sent (OpenSSH's sftp-server handles them one by one), so an
//! operation queued after another sees its effect: a file created in a directory made just
//! before it, a directory's times set after its files.
//!
//! Failures come back later, by path, from [`Pipe::settle`], which also waits until everything
//! queued is done. A connection lost or gone silent fails every operation not answered yet
//! and every one queued after it; the caller treats that as the server being unreachable.
//!
//! Everything the server sends is checked before use: answers longer than [`MAX_ANSWER`], of
//! unknown ids, of the wrong type, or cut short end the pipe with a protocol error.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::conn::Conn;

/// Requests sent and not answered yet, at most (new operations wait beyond this).
pub const MAX_IN_FLIGHT: usize = 512;
/// Bytes of file data queued or in flight, at most: submitting more waits.
const MAX_QUEUED_BYTES: usize = 32 << 20;
/// The longest answer accepted: OpenSSH's limit for any SFTP message (256 KiB), and a little.
pub const MAX_ANSWER: usize = (256 << 10) + 1024;
/// The longest handle accepted (OpenSSH's are 4 bytes; the protocol allows 256).
const MAX_HANDLE: usize = 256;
/// READDIRs in flight on one directory handle, at most: two at first (a small directory's
/// names and its "end of file" come back together), up to four more with each answer that
/// shows a large directory ([`FULL_READDIR`]). READDIRs in flight beyond each listing's first,
/// over all listings: at most [`EXTRA_READDIRS`].
const READDIRS_AHEAD: usize = 64;
const EXTRA_READDIRS: usize = 128;
/// A listing's first answer shows a large directory from this many names on (OpenSSH's hold
/// up to 100); a later one, when it holds as many names as the first (a server answering in
/// smaller batches).
const FULL_READDIR: usize = 50;
/// READDIRs to send at first for a directory of `size` bytes ([`Pipe::list_sized`]).
fn first_readdirs(size: u64) -> usize {
    usize::try_from(size / (8 << 10))
        .unwrap_or(usize::MAX)
        .clamp(2, READDIRS_AHEAD)
}

/// The channel's receive window. The driver writes requests without reading answers in
/// between; should the answers in flight outgrow the window while the requests fill the
/// server's (file data), both sides would wait on each other. Answers are small (a status, a
/// handle) but for READDIR's: OpenSSH's hold at most 100 names, tens of KiB, and
/// [`EXTRA_READDIRS`] plus one per listing of them fit here many times over.
const RECEIVE_WINDOW: u32 = 128 << 20;
/// READLINKs in flight for one listing (an answer is a path: 512 of them, a few MiB at worst).
const READLINKS_AHEAD: usize = 512;
/// While it waits for answers, the driver also takes new work as it comes ([`Driver::park`]):
/// an operation submitted while the answers of others are on their way goes out at once,
/// not when the next answer comes (a round trip later when only one was in flight). It
/// waits this long at most before it reads as it used to (blocking, within the session's
/// timeout), should libssh2 hold answers where neither its channel nor the socket shows them.
const PARK_MAX: std::time::Duration = std::time::Duration::from_secs(1);
/// Data per WRITE request: every server takes 32 KiB.
const WRITE_SIZE: usize = 32 << 10;

// SFTP v3 packet types (draft-ietf-secsh-filexfer-02).
const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_LSTAT: u8 = 7;
const FXP_SETSTAT: u8 = 9;
const FXP_FSETSTAT: u8 = 10;
const FXP_REMOVE: u8 = 13;
const FXP_OPENDIR: u8 = 11;
const FXP_READDIR: u8 = 12;
const FXP_FSTAT: u8 = 8;
const FXP_MKDIR: u8 = 14;
const FXP_RENAME: u8 = 18;
const FXP_READLINK: u8 = 19;
const FXP_SYMLINK: u8 = 20;
const FXP_STATUS: u8 = 101;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;
const FXP_NAME: u8 = 104;
const FXP_ATTRS: u8 = 105;
const FXP_EXTENDED: u8 = 200;
const FXP_EXTENDED_REPLY: u8 = 201;

const FXF_READ: u32 = 0x01;
const FXF_WRITE: u32 = 0x02;
const FXF_CREAT: u32 = 0x08;
const FXF_EXCL: u32 = 0x20;

const ATTR_SIZE: u32 = 0x01;
const ATTR_UIDGID: u32 = 0x02;
const ATTR_PERMISSIONS: u32 = 0x04;
const ATTR_ACMODTIME: u32 = 0x08;
const ATTR_EXTENDED: u32 = 0x8000_0000;

const FX_OK: u32 = 0;
const FX_EOF: u32 = 1;
const FX_PERMISSION_DENIED: u32 = 3;
const FX_OP_UNSUPPORTED: u32 = 8;

const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;

/// Attributes to set (SFTP v3 ATTRS; times are whole seconds as uint32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs {
    pub size: Option<u64>,
    pub owner: Option<(u32, u32)>,
    pub perm: Option<u32>,
    /// atime, mtime
    pub times: Option<(u32, u32)>,
}

impl Attrs {
    fn put(&self, m: &mut Msg) {
        let mut flags = 0;
        flags |= if self.size.is_some() { ATTR_SIZE } else { 0 };
        flags |= if self.owner.is_some() { ATTR_UIDGID } else { 0 };
        flags |= if self.perm.is_some() {
            ATTR_PERMISSIONS
        } else {
            0
        };
        flags |= if self.times.is_some() {
            ATTR_ACMODTIME
        } else {
            0
        };
        m.u32(flags);
        if let Some(s) = self.size {
            m.u64(s);
        }
        if let Some((u, g)) = self.owner {
            m.u32(u);
            m.u32(g);
        }
        if let Some(p) = self.perm {
            m.u32(p);
        }
        if let Some((a, t)) = self.times {
            m.u32(a);
            m.u32(t);
        }
    }
}

/// A node's metadata as the requests that set it: owners with mode and times (which a server
/// refuses unless we are root there), and mode and times alone, sent after, which also puts
/// back setuid and setgid bits the change of owner cleared.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub all: Attrs,
    pub mode_times: Attrs,
    /// Set-user-ID or set-group-ID bits: mode and times go again after the owners.
    pub setid: bool,
}

/// One operation on the server. Paths are absolute, as the server sees them.
#[derive(Debug)]
pub enum Op {
    /// MKDIR with mode 0700 (the final mode is set with the directory's metadata).
    Mkdir,
    /// A whole file: REMOVE what is there first if asked, create it exclusively (never
    /// through a symlink), write `data` (a file of zeros only is sized instead, leaving a
    /// hole), set `meta` on the handle, close.
    Write {
        data: Vec<u8>,
        remove_first: bool,
        meta: Meta,
    },
    /// A file created exclusively at `size` (its data comes later by other means).
    Create { size: u64, remove_first: bool },
    /// `data` written at `offset` of a file already there (one [`Op::Create`] made): OPEN
    /// for writing (no create, no truncation), WRITEs, CLOSE. A file's pieces may go through
    /// several pipes; `file` counts those not done, and the pipe that finishes the last one
    /// sets the metadata left there ([`FileWrites`]).
    WriteAt {
        offset: u64,
        data: Vec<u8>,
        file: Option<Arc<FileWrites>>,
    },
    /// Set `meta` by path after an LSTAT shows it is no symlink (SETSTAT follows one).
    SetStat { meta: Meta },
    /// A symlink to `target`, REMOVE-ing what is there first if asked. `target_first`: the
    /// server's order of SSH_FXP_SYMLINK's paths.
    Symlink {
        target: Vec<u8>,
        target_first: bool,
        remove_first: bool,
    },
    /// List a directory (OPENDIR, READDIR to the end, CLOSE) and, if `read_links`, read every
    /// symlink's target in it (READLINK, many at once); the result goes to `reply`. The
    /// directory's own `.` and `..` (the first of each) are left out. More than `max_entries`
    /// entries, or `max_bytes` of names and targets, answers [`Listed::TooBig`].
    List {
        reply: std::sync::mpsc::Sender<std::io::Result<Listed>>,
        max_entries: usize,
        max_bytes: usize,
        read_links: bool,
        /// READDIRs sent at once when the directory is open, room allowing.
        first_readdirs: usize,
    },
    /// LSTAT of the path; its attributes (or the server's error) go to `reply`.
    Stat {
        reply: std::sync::mpsc::Sender<std::io::Result<Stat>>,
    },
    /// READLINK of the path; the target (or the server's error) goes to `reply`.
    ReadLink {
        reply: std::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    },
    /// `len` bytes of a file from `offset` (fewer if it ends before), and its attributes
    /// after the reads (FSTAT on the handle): OPEN, READs of 32 KiB all at once, FSTAT, CLOSE.
    Read {
        offset: u64,
        len: u32,
        reply: std::sync::mpsc::Sender<std::io::Result<(Vec<u8>, Stat)>>,
    },
    /// The room left on the filesystem of the path (`statvfs@openssh.com`): free bytes, and
    /// free inodes (`None` for a filesystem without an inode count); to `reply`.
    Room {
        reply: std::sync::mpsc::Sender<std::io::Result<(u64, Option<u64>)>>,
    },
    /// A store file put in place whole: `data` written to the temporary name `tmp` (created
    /// exclusively, mode 0600), `fsync@openssh.com` (a server without it is let off), CLOSE,
    /// and only once all of those succeeded (and if `rename`) a plain RENAME to the path,
    /// which never replaces a file on OpenSSH. If anything fails the temporary file is
    /// removed; the first error (the rename's, with its status, when the name is taken) goes
    /// to `reply`. Without `rename` the file stays under `tmp`, for an [`Op::Rename`] or a
    /// removal once the asker has decided.
    Upload {
        data: Vec<u8>,
        tmp: Vec<u8>,
        rename: bool,
        reply: std::sync::mpsc::Sender<std::io::Result<()>>,
    },
    /// A plain RENAME of the path to `to`; the server's answer to `reply`.
    Rename {
        to: Vec<u8>,
        reply: std::sync::mpsc::Sender<std::io::Result<()>>,
    },
    /// REMOVE the path; the server's answer to `reply`.
    Remove {
        reply: std::sync::mpsc::Sender<std::io::Result<()>>,
    },
    /// MKDIR the path with mode 0700; the server's answer to `reply` (unlike [`Op::Mkdir`],
    /// whose failures come back from [`Pipe::settle`]).
    MakeDir {
        reply: std::sync::mpsc::Sender<std::io::Result<()>>,
    },
}

/// The pieces of one file written through pipes ([`Op::WriteAt`]) and not done yet, and the
/// metadata to set once they all are: whoever comes last, the writer asking for the metadata
/// or the pipe finishing the last piece, sets it, so it lands after every write of the file
/// (a write changes the mtime) whichever pipes they went through.
#[derive(Debug, Default)]
pub struct FileWrites {
    state: Mutex<(usize, Option<Meta>)>,
}

impl FileWrites {
    /// One more piece on its way.
    pub fn add(&self) {
        self.state.lock().0 += 1;
    }

    /// Set `meta` once every piece is done: `Some(meta)` back when they all are already (the
    /// caller sets it now), `None` when the last piece's pipe will.
    pub fn then_set(&self, meta: Meta) -> Option<Meta> {
        let mut s = self.state.lock();
        if s.0 == 0 {
            return Some(meta);
        }
        s.1 = Some(meta);
        None
    }

    /// A piece done: the metadata to set now, if it was the last and the metadata is known.
    fn finished(&self) -> Option<Meta> {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(1);
        if s.0 == 0 { s.1.take() } else { None }
    }
}

/// Where an [`Op::Upload`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpStage {
    /// OPEN, then the writes, sync and close.
    Writing,
    Renaming,
    /// REMOVE of the temporary file after a failure.
    Cleaning,
}

/// Where the answer to [`Pipe::read`] comes.
pub type ReadAnswer = std::sync::mpsc::Receiver<std::io::Result<(Vec<u8>, Stat)>>;
/// The answer to an [`Op::Stat`] queued by [`Pipe::stat_later`]: the attributes by LSTAT (a
/// symlink's own).
pub type StatAnswer = std::sync::mpsc::Receiver<std::io::Result<Stat>>;

/// A read under way.
#[derive(Debug, Default)]
struct ReadState {
    buf: Vec<u8>,
    /// READ request id → its offset.
    offsets: HashMap<u32, u64>,
    /// Where the file ended ("end of file", or a short answer), if it did.
    end: Option<u64>,
    stat: Option<Stat>,
}

/// What a server says of one entry (SFTP v3 attributes; each field only if it said it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stat {
    pub size: Option<u64>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Mode with the file type bits.
    pub perm: Option<u32>,
    pub mtime: Option<u32>,
}

impl Stat {
    pub fn is_symlink(&self) -> bool {
        self.perm.is_some_and(|p| p & S_IFMT == S_IFLNK)
    }

    pub fn is_dir(&self) -> bool {
        self.perm.is_some_and(|p| p & S_IFMT == 0o040000)
    }

    /// The same as libssh2's attributes (without atime), for code written for those.
    pub fn file_stat(&self) -> ssh2::FileStat {
        ssh2::FileStat {
            size: self.size,
            uid: self.uid,
            gid: self.gid,
            perm: self.perm,
            atime: None,
            mtime: self.mtime.map(u64::from),
        }
    }
}

/// A directory's listing.
#[derive(Debug)]
pub enum Listed {
    /// Each entry (but `.` and `..`) with its attributes, and each symlink's target.
    Entries {
        entries: Vec<(Vec<u8>, Stat)>,
        targets: Vec<(Vec<u8>, Vec<u8>)>,
        bytes: usize,
    },
    TooBig,
}

/// A listing under way.
#[derive(Debug, Default)]
struct ListState {
    handle: Vec<u8>,
    entries: Vec<(Vec<u8>, Stat)>,
    targets: Vec<(Vec<u8>, Vec<u8>)>,
    bytes: usize,
    too_big: bool,
    /// READLINK request id → the entry's name.
    links: HashMap<u32, Vec<u8>>,
    /// Symlinks whose target is still to be asked for (the next one last).
    todo: Vec<Vec<u8>>,
    /// READDIRs sent and not answered.
    readdirs: usize,
    /// Names in the first READDIR answer.
    first_answer: Option<usize>,
    /// A READDIR answered "end of file" (or failed): no more are sent.
    ended: bool,
    /// `.` and `..` seen (and left out).
    dot: bool,
    dotdot: bool,
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Write { data, .. } | Op::Upload { data, .. } | Op::WriteAt { data, .. } => {
                data.len()
            }
            _ => 0,
        }
    }
}

/// What went wrong with one operation: the path (as given), what was being done, the error.
#[derive(Debug)]
pub struct Failure {
    pub key: Vec<u8>,
    pub doing: &'static str,
    pub error: std::io::Error,
}

struct Job {
    key: Vec<u8>,
    path: Vec<u8>,
    op: Op,
}

/// State shared by the submitters and the driver.
struct Shared {
    /// Operations submitted and not finished, and bytes of data among them.
    pending: Mutex<(usize, usize)>,
    changed: Condvar,
    failures: Mutex<Vec<Failure>>,
    /// Why the pipe stopped (the connection lost, a protocol error), once it has.
    dead: Mutex<Option<String>>,
    /// It stopped because the server said nothing for the session's timeout.
    timed_out: AtomicBool,
    /// The server refused to change owners (we are not root there).
    owners_refused: Arc<AtomicBool>,
    /// 0: not known yet, 1: the server changes owners.
    owners_taken: AtomicU8,
    /// Most requests in flight at once (for `KLOSET_TRACE`).
    most_in_flight: Mutex<usize>,
    /// Once stopped, close the connection at once ([`Pipe::quit_when_stopped`]).
    quit: AtomicBool,
    /// The driver waits on the socket and [`Shared::waker`]: a submitter wakes it.
    parked: AtomicBool,
    /// Written to wake a parked driver (the driver reads the other end).
    waker: Option<std::os::unix::net::UnixStream>,
    /// New operations start while fewer requests than this are in flight
    /// ([`MAX_IN_FLIGHT`] unless [`Pipe::allow_in_flight`] says otherwise).
    max_in_flight: std::sync::atomic::AtomicUsize,
    /// Bytes of file data queued or in flight before submitting waits
    /// ([`MAX_QUEUED_BYTES`] unless [`Pipe::limit_queued`] says otherwise).
    max_queued: std::sync::atomic::AtomicUsize,
}

/// The pipeline: submit operations, then [`Pipe::settle`] for their failures.
pub struct Pipe {
    tx: Option<SyncSender<Job>>,
    shared: Arc<Shared>,
    driver: Option<JoinHandle<Conn>>,
    /// The server's window for this channel when it opened: bytes it takes before it must
    /// say it has room for more (OpenSSH's: 2 MiB), which bounds what one channel moves per
    /// round trip.
    window: u32,
}

impl Pipe {
    /// Open an SFTP channel of its own on `conn` (which the pipe keeps until
    /// [`Pipe::finish`]) and start the driver. `owners_refused` is shared with the caller:
    /// set when the server refuses to change owners.
    ///
    /// # Errors
    /// The server refused a second channel or the SFTP subsystem on it, or broke the
    /// protocol: the connection back (if the OS refused a thread, it is gone).
    pub fn start(
        conn: Conn,
        owners_refused: Arc<AtomicBool>,
    ) -> Result<Pipe, (Option<Conn>, std::io::Error)> {
        let opened = (|| {
            // A receive window large enough for every answer in flight (see
            // [`RECEIVE_WINDOW`]), and SSH's usual maximum packet.
            let mut channel = conn
                .sess
                .channel_open("session", RECEIVE_WINDOW, 32 << 10, None)
                .map_err(super::io_error)?;
            channel.subsystem("sftp").map_err(super::io_error)?;
            // What the server lets us send before its first adjustment (libssh2 leaves the
            // "initial" figure at 0).
            let ww = channel.write_window();
            let window = ww.remaining.max(ww.window_size_initial);
            let mut w = channel.stream(0);
            let mut r = BufReader::with_capacity(64 << 10, channel.stream(0));
            let mut m = Msg::new(FXP_INIT);
            m.u32(3);
            w.write_all(&m.finish())?;
            let (kind, body) = read_packet(&mut r)?;
            if kind != FXP_VERSION {
                return Err(protocol(format!(
                    "the server answered INIT with packet type {kind}"
                )));
            }
            let version = Cursor(&body).u32()?;
            if version < 3 {
                return Err(protocol(format!(
                    "the server speaks SFTP version {version}"
                )));
            }
            Ok((channel, w, r, window))
        })();
        let (channel, w, r, window) = match opened {
            Ok(o) => o,
            Err(e) => return Err((Some(conn), e)),
        };
        // Without a socket pair the driver reads as it used to, blocking.
        let (waker, woken) = match std::os::unix::net::UnixStream::pair() {
            Ok((a, b)) if a.set_nonblocking(true).is_ok() && b.set_nonblocking(true).is_ok() => {
                (Some(a), Some(b))
            }
            _ => (None, None),
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new((0, 0)),
            changed: Condvar::new(),
            failures: Mutex::new(Vec::new()),
            dead: Mutex::new(None),
            timed_out: AtomicBool::new(false),
            owners_refused,
            owners_taken: AtomicU8::new(0),
            most_in_flight: Mutex::new(0),
            quit: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            waker,
            max_in_flight: std::sync::atomic::AtomicUsize::new(MAX_IN_FLIGHT),
            max_queued: std::sync::atomic::AtomicUsize::new(MAX_QUEUED_BYTES),
        });
        let (tx, rx) = sync_channel::<Job>(MAX_IN_FLIGHT);
        let sh = shared.clone();
        let quit = shared.clone();
        let driver = std::thread::Builder::new()
            .name("sftp-pipe".into())
            .spawn(move || {
                let conn = conn;
                let mut d = Driver {
                    w,
                    r,
                    shared: sh,
                    jobs: HashMap::new(),
                    waiting: HashMap::new(),
                    next_id: 0,
                    next_job: 0,
                    in_flight: 0,
                    extra_readdirs: 0,
                    out: Vec::new(),
                    ready: VecDeque::new(),
                    woken,
                };
                d.run(rx, &conn, &channel);
                drop(d);
                if quit.quit.load(Ordering::Relaxed) {
                    conn.quit();
                }
                drop(channel);
                conn
            })
            // No thread: the connection went with it.
            .map_err(|e| (None, e))?;
        Ok(Pipe {
            tx: Some(tx),
            shared,
            driver: Some(driver),
            window,
        })
    }

    /// Queue `op` on `path` (absolute), reported under `key`. Waits while too much data is
    /// queued. An error: the pipe has stopped (see [`Pipe::dead`]); nothing was queued.
    pub fn submit(&self, key: &[u8], path: Vec<u8>, op: Op) -> Result<(), String> {
        let bytes = op.bytes();
        {
            let mut p = self.shared.pending.lock();
            let most = self.shared.max_queued.load(Ordering::Relaxed);
            while p.1 > 0 && p.1 + bytes > most {
                if let Some(why) = self.dead() {
                    return Err(why);
                }
                self.shared.changed.wait(&mut p);
            }
            if let Some(why) = self.dead() {
                return Err(why);
            }
            p.0 += 1;
            p.1 += bytes;
        }
        let job = Job {
            key: key.to_vec(),
            path,
            op,
        };
        let sent = self.tx.as_ref().map(|tx| tx.send(job).is_ok());
        self.wake();
        if sent != Some(true) {
            let mut p = self.shared.pending.lock();
            p.0 -= 1;
            p.1 -= bytes;
            return Err(self
                .dead()
                .unwrap_or_else(|| "the SFTP pipe is closed".into()));
        }
        Ok(())
    }

    /// List the directory `path` (absolute) through the pipe, with other requests in flight;
    /// waits for the answer.
    ///
    /// # Errors
    /// The server's error for the directory, or the pipe stopped.
    pub fn list(
        &self,
        path: Vec<u8>,
        max_entries: usize,
        max_bytes: usize,
        read_links: bool,
    ) -> Result<std::io::Result<Listed>, String> {
        self.list_sized(path, 0, max_entries, max_bytes, read_links)
    }

    /// [`Pipe::list`] of a directory whose size (`st_size`, as its parent's listing gave it;
    /// 0 if unknown) says how many READDIRs to send at first: on ext4 a directory takes a
    /// 4 KiB block per 50 to 100 names and OpenSSH answers 100 names a READDIR, so one per
    /// 8 KiB, at least two, at most `READDIRS_AHEAD` (64). A directory of 17,852 names (1.4 MB)
    /// was listed in six round trips of READDIRs sent four more per answer, three now. More
    /// than needed costs only "end of file" answers.
    ///
    /// # Errors
    /// The server's error for the directory, or the pipe stopped.
    pub fn list_sized(
        &self,
        path: Vec<u8>,
        size: u64,
        max_entries: usize,
        max_bytes: usize,
        read_links: bool,
    ) -> Result<std::io::Result<Listed>, String> {
        let answer = self.list_later(path, size, max_entries, max_bytes, read_links)?;
        self.answer_of(&answer)
    }

    /// Queue a [`Pipe::list_sized`]; its answer comes on the returned channel.
    fn list_later(
        &self,
        path: Vec<u8>,
        size: u64,
        max_entries: usize,
        max_bytes: usize,
        read_links: bool,
    ) -> Result<std::sync::mpsc::Receiver<std::io::Result<Listed>>, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        let key = path.clone();
        self.submit(
            &key,
            path,
            Op::List {
                reply,
                max_entries,
                max_bytes,
                read_links,
                first_readdirs: first_readdirs(size),
            },
        )?;
        Ok(answer)
    }

    /// [`Pipe::list`] of many directories at once: their answers in the same order.
    ///
    /// # Errors
    /// The pipe stopped.
    pub fn list_many(
        &self,
        paths: Vec<Vec<u8>>,
        max_entries: usize,
        max_bytes: usize,
        read_links: bool,
    ) -> Result<Vec<std::io::Result<Listed>>, String> {
        let answers = paths
            .into_iter()
            .map(|path| self.list_later(path, 0, max_entries, max_bytes, read_links))
            .collect::<Result<Vec<_>, _>>()?;
        answers.iter().map(|a| self.answer_of(a)).collect()
    }

    /// The targets of the symlinks `paths` (absolute), asked all at once, in the same order.
    ///
    /// # Errors
    /// The pipe stopped.
    pub fn read_links(&self, paths: Vec<Vec<u8>>) -> Result<Vec<std::io::Result<Vec<u8>>>, String> {
        let mut answers = Vec::with_capacity(paths.len());
        for path in paths {
            let (reply, answer) = std::sync::mpsc::channel();
            let key = path.clone();
            self.submit(&key, path, Op::ReadLink { reply })?;
            answers.push(answer);
        }
        answers
            .into_iter()
            .map(|a| {
                a.recv().map_err(|_| {
                    self.dead()
                        .unwrap_or_else(|| "the SFTP pipe is closed".into())
                })
            })
            .collect()
    }

    /// Queue a read of the first `len` bytes of the file `path` (absolute); its answer comes
    /// on the returned channel: the bytes (fewer where the file ends first) and the file's
    /// attributes after the reads.
    ///
    /// # Errors
    /// The pipe stopped.
    pub fn read(&self, path: Vec<u8>, len: u32) -> Result<ReadAnswer, String> {
        self.read_at(path, 0, len)
    }

    /// [`Pipe::read`] of `len` bytes from `offset`: one round trip for the OPEN, one for all
    /// the READs (the CLOSE's answer is not waited for).
    ///
    /// # Errors
    /// The pipe stopped.
    pub fn read_at(&self, path: Vec<u8>, offset: u64, len: u32) -> Result<ReadAnswer, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        let key = path.clone();
        self.submit(&key, path, Op::Read { offset, len, reply })?;
        Ok(answer)
    }

    /// Queue an LSTAT of `path` (absolute); its answer comes on the returned channel (closed
    /// without one if the pipe stops first).
    ///
    /// # Errors
    /// The pipe stopped.
    pub fn stat_later(&self, path: Vec<u8>) -> Result<StatAnswer, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        let key = path.clone();
        self.submit(&key, path, Op::Stat { reply })?;
        Ok(answer)
    }

    /// The room left on the filesystem of `path` (absolute), by `statvfs@openssh.com`: free
    /// bytes, and free inodes (`None` where the filesystem counts none).
    ///
    /// # Errors
    /// The pipe stopped (outer); the server refused or does not know the request (inner).
    pub fn room(&self, path: Vec<u8>) -> Result<std::io::Result<(u64, Option<u64>)>, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        let key = path.clone();
        self.submit(&key, path, Op::Room { reply })?;
        self.answer_of(&answer)
    }

    /// Put `data` at `path` (absolute) through the temporary name `tmp` ([`Op::Upload`]);
    /// waits for the outcome.
    ///
    /// # Errors
    /// The pipe stopped (outer); the server's error for the upload (inner).
    pub fn upload(
        &self,
        path: Vec<u8>,
        tmp: Vec<u8>,
        data: Vec<u8>,
    ) -> Result<std::io::Result<()>, String> {
        self.upload_as(path, tmp, data, true)
    }

    /// [`Pipe::upload`] up to the RENAME: `data` is left, synced, under `tmp` (absolute; on
    /// failure it is removed), for [`Pipe::rename`].
    ///
    /// # Errors
    /// The pipe stopped (outer); the server's error (inner).
    pub fn stage(
        &self,
        path: Vec<u8>,
        tmp: Vec<u8>,
        data: Vec<u8>,
    ) -> Result<std::io::Result<()>, String> {
        self.upload_as(path, tmp, data, false)
    }

    fn upload_as(
        &self,
        path: Vec<u8>,
        tmp: Vec<u8>,
        data: Vec<u8>,
        rename: bool,
    ) -> Result<std::io::Result<()>, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        let key = path.clone();
        let op = Op::Upload {
            data,
            tmp,
            rename,
            reply,
        };
        self.submit(&key, path, op)?;
        self.answer_of(&answer)
    }

    /// RENAME `from` to `to` (absolute; OpenSSH's never replaces a file); waits for the
    /// server's answer.
    ///
    /// # Errors
    /// The pipe stopped (outer); the server's error (inner).
    pub fn rename(&self, from: Vec<u8>, to: Vec<u8>) -> Result<std::io::Result<()>, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        let key = to.clone();
        self.submit(&key, from, Op::Rename { to, reply })?;
        self.answer_of(&answer)
    }

    /// REMOVE `path` (absolute); waits for the server's answer.
    ///
    /// # Errors
    /// The pipe stopped (outer); the server's error (inner).
    pub fn remove(&self, path: Vec<u8>) -> Result<std::io::Result<()>, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        let key = path.clone();
        self.submit(&key, path, Op::Remove { reply })?;
        self.answer_of(&answer)
    }

    /// MKDIR `path` (absolute) with mode 0700; waits for the server's answer.
    ///
    /// # Errors
    /// The pipe stopped (outer); the server's error (inner).
    pub fn make_dir(&self, path: Vec<u8>) -> Result<std::io::Result<()>, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        let key = path.clone();
        self.submit(&key, path, Op::MakeDir { reply })?;
        self.answer_of(&answer)
    }

    /// The answer on `answer`, or why the pipe stopped before giving one.
    fn answer_of<T>(&self, answer: &std::sync::mpsc::Receiver<T>) -> Result<T, String> {
        answer.recv().map_err(|_| {
            self.dead()
                .unwrap_or_else(|| "the SFTP pipe is closed".into())
        })
    }

    /// Wake the driver if it is parked ([`Driver::park`]): new work, or the pipe closing.
    fn wake(&self) {
        if self.shared.parked.load(Ordering::SeqCst)
            && let Some(w) = &self.shared.waker
        {
            // Full: a wake is already on its way.
            let _ = (&*w).write(&[1]);
        }
    }

    /// Start new operations while fewer than `n` requests are in flight (instead of
    /// [`MAX_IN_FLIGHT`]): for a pipe of many small writes whose answers are all small (a
    /// restore's), where [`MAX_IN_FLIGHT`] requests are a small part of what fits in one round
    /// trip. Not for a pipe that reads files: their answers in flight must stay well within
    /// `RECEIVE_WINDOW` (128 MiB).
    pub fn allow_in_flight(&self, n: usize) {
        self.shared.max_in_flight.store(n.max(1), Ordering::Relaxed);
    }

    /// Let at most `bytes` of file data wait in this pipe (instead of `MAX_QUEUED_BYTES`, 32 MiB):
    /// for pipes that share that bound.
    pub fn limit_queued(&self, bytes: usize) {
        self.shared
            .max_queued
            .store(bytes.max(1), Ordering::Relaxed);
    }

    /// When the pipe stops (everything submitted done), close its connection at once
    /// ([`Conn::quit`]) instead of giving it back: for a pipe kept to the end of a command.
    pub fn quit_when_stopped(&self) {
        self.shared.quit.store(true, Ordering::Relaxed);
    }

    /// Why the pipe stopped, if it has.
    pub fn dead(&self) -> Option<String> {
        self.shared.dead.lock().clone()
    }

    /// Did the pipe stop because the server went silent?
    pub fn timed_out(&self) -> bool {
        self.shared.timed_out.load(Ordering::Relaxed)
    }

    /// Wait until everything submitted is done; the failures since the last settle.
    pub fn settle(&self) -> Vec<Failure> {
        let mut p = self.shared.pending.lock();
        while p.0 > 0 {
            self.shared.changed.wait(&mut p);
        }
        drop(p);
        std::mem::take(&mut *self.shared.failures.lock())
    }

    /// The server's window for the channel when it opened (see [`Pipe::window`]'s field).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Most requests that were in flight at once.
    pub fn most_in_flight(&self) -> usize {
        *self.shared.most_in_flight.lock()
    }

    /// Stop the driver, and give its connection back (its socket cut if the pipe failed: the
    /// caller drops it then).
    pub fn finish(mut self) -> Option<Conn> {
        self.stop()
    }

    fn stop(&mut self) -> Option<Conn> {
        self.tx = None;
        self.wake();
        let conn = self.driver.take()?.join().ok()?;
        if self.dead().is_some() {
            conn.kill();
        }
        Some(conn)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What an answer is to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// REMOVE before a create: any status will do (nothing there is fine).
    Clear,
    Open,
    Mkdir,
    Write,
    /// OPEN of an [`Op::WriteAt`].
    AtOpen,
    /// Owners, mode and times: refused when we are not root there.
    SetAll,
    /// Mode and times (or the size): must succeed.
    SetRest,
    Close,
    Lstat,
    Symlink,
    OpenDir,
    ReadDir,
    /// CLOSE of a directory handle: its status does not matter.
    CloseDir,
    ReadLink,
    /// READLINK of an [`Op::ReadLink`].
    ReadLinkOne,
    /// LSTAT of an [`Op::Stat`].
    StatOne,
    /// `statvfs@openssh.com` of an [`Op::Room`].
    Room,
    /// The steps of an [`Op::Read`].
    ReadOpen,
    ReadData,
    ReadStat,
    ReadClose,
    /// The steps of an [`Op::Upload`].
    UpOpen,
    UpWrite,
    UpSync,
    UpClose,
    UpRename,
    UpClean,
    /// REMOVE of an [`Op::Remove`].
    RemoveOne,
    /// RENAME of an [`Op::Rename`].
    RenameOne,
    /// MKDIR of an [`Op::MakeDir`].
    MakeDirOne,
}

impl Step {
    /// A request whose answer changes nothing for the asker: the CLOSE of a directory or of a
    /// file read. The asker has its answer without waiting for it.
    fn lingers(self) -> bool {
        matches!(self, Step::CloseDir | Step::ReadClose)
    }

    fn doing(self) -> &'static str {
        match self {
            Step::Clear => "removing what was there",
            Step::Open => "creating it",
            Step::Mkdir => "making the directory",
            Step::Write => "writing",
            Step::AtOpen => "opening it to write",
            Step::SetAll | Step::SetRest => "setting its metadata",
            Step::Close => "closing it",
            Step::Lstat | Step::StatOne => "looking at it",
            Step::Symlink => "making the symlink",
            Step::OpenDir | Step::ReadDir | Step::CloseDir | Step::ReadLink => "listing it",
            Step::ReadLinkOne => "reading the symlink",
            Step::Room => "asking for its filesystem's free space",
            Step::ReadOpen | Step::ReadData | Step::ReadStat | Step::ReadClose => "reading it",
            Step::UpOpen => "creating its temporary file",
            Step::UpWrite => "writing it",
            Step::UpSync => "syncing it to disk",
            Step::UpClose => "closing it",
            Step::UpRename => "renaming it into place",
            Step::UpClean => "removing its temporary file",
            Step::RemoveOne => "removing it",
            Step::RenameOne => "renaming it",
            Step::MakeDirOne => "making the directory",
        }
    }
}

struct Running {
    job: Job,
    /// Requests of this job not answered yet.
    waiting: usize,
    error: Option<Failure>,
    list: Option<Box<ListState>>,
    read: Option<Box<ReadState>>,
    /// An [`Op::Upload`]'s stage, and whether its temporary file was created.
    upload: Option<(UpStage, bool)>,
    /// Requests of this job in flight whose answers nobody waits for (see [`Step::lingers`]).
    lingering: usize,
    /// The asker has its answer (a listing's or a read's, given before their CLOSE is
    /// answered).
    replied: bool,
}

struct Driver {
    w: ssh2::Stream,
    r: BufReader<ssh2::Stream>,
    shared: Arc<Shared>,
    jobs: HashMap<u64, Running>,
    /// Request id → (job, what the answer is to).
    waiting: HashMap<u32, (u64, Step)>,
    next_id: u32,
    next_job: u64,
    in_flight: usize,
    /// READDIRs in flight beyond each listing's first (see [`EXTRA_READDIRS`]).
    extra_readdirs: usize,
    /// Requests built and not written yet (written together).
    out: Vec<u8>,
    /// Metadata to set now that a file's last piece is written ([`FileWrites`]), started
    /// before anything newer.
    ready: VecDeque<Job>,
    /// The end of [`Shared::waker`] the driver waits on.
    woken: Option<std::os::unix::net::UnixStream>,
}

/// Why a parked driver woke ([`Driver::park`]).
enum Woke {
    Job(Job),
    /// No more work can come.
    Closed,
    /// Something came from the server, or it waited [`PARK_MAX`].
    Read,
}

impl Driver {
    fn run(&mut self, rx: Receiver<Job>, conn: &Conn, channel: &ssh2::Channel) {
        let mut queued: VecDeque<Job> = VecDeque::new();
        let mut closed = false;
        loop {
            // Start what fits.
            while self.in_flight < self.shared.max_in_flight.load(Ordering::Relaxed) {
                let job = match self.ready.pop_front().or_else(|| queued.pop_front()) {
                    Some(j) => j,
                    None if closed => break,
                    None => match rx.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    },
                };
                self.start(job);
            }
            if let Err(e) = self.flush() {
                return self.die(e, rx, queued);
            }
            // Answers on their way: new work that comes before them goes out at once (if it
            // can start: with no room, the answers are what it waits for).
            let room = self.in_flight < self.shared.max_in_flight.load(Ordering::Relaxed);
            if self.in_flight > 0 && !closed && room {
                match self.park(&rx, conn, channel) {
                    Woke::Job(j) => {
                        queued.push_back(j);
                        continue;
                    }
                    Woke::Closed => closed = true,
                    Woke::Read => {}
                }
            }
            if self.in_flight == 0 {
                if closed {
                    return;
                }
                // Nothing to wait for: wait for work.
                match rx.recv() {
                    Ok(j) => queued.push_back(j),
                    Err(_) => closed = true,
                }
                continue;
            }
            match read_packet(&mut self.r) {
                Ok((kind, body)) => {
                    if let Err(e) = self.answer(kind, &body) {
                        return self.die(e, rx, queued);
                    }
                }
                Err(e) => return self.die(e, rx, queued),
            }
        }
    }

    /// Wait for whichever comes first: new work, or something from the server to read (then
    /// [`Woke::Read`] at once if an answer is already at hand, in the reader's buffer or
    /// libssh2's). Reading blocks, so a job submitted meanwhile would wait for the next
    /// answer: up to a round trip.
    fn park(&mut self, rx: &Receiver<Job>, conn: &Conn, channel: &ssh2::Channel) -> Woke {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        if !self.r.buffer().is_empty() || channel.read_window().available > 0 {
            return Woke::Read;
        }
        let (Some(woken), Some(socket)) = (&self.woken, conn.socket()) else {
            return Woke::Read;
        };
        let took = |rx: &Receiver<Job>| match rx.try_recv() {
            Ok(j) => Some(Woke::Job(j)),
            Err(TryRecvError::Disconnected) => Some(Woke::Closed),
            Err(TryRecvError::Empty) => None,
        };
        // Parked before looking at the queue: a job sent after this look sees the flag and
        // wakes the poll.
        self.shared.parked.store(true, Ordering::SeqCst);
        if let Some(w) = took(rx) {
            self.shared.parked.store(false, Ordering::SeqCst);
            return w;
        }
        let mut fds = [
            PollFd::new(socket, PollFlags::POLLIN),
            PollFd::new(woken.as_fd(), PollFlags::POLLIN),
        ];
        let wait = PollTimeout::try_from(PARK_MAX).unwrap_or(PollTimeout::MAX);
        let _ = poll(&mut fds, wait);
        self.shared.parked.store(false, Ordering::SeqCst);
        // Emptied (it is non-blocking): each wake is one byte.
        let mut sink = [0u8; 64];
        while matches!((&*woken).read(&mut sink), Ok(n) if n > 0) {}
        took(rx).unwrap_or(Woke::Read)
    }

    /// The connection is gone or the server broke the protocol: every operation not finished,
    /// and every one submitted from now on, fails with `e`.
    fn die(&mut self, e: std::io::Error, rx: Receiver<Job>, queued: VecDeque<Job>) {
        let timed_out = e.kind() == std::io::ErrorKind::TimedOut;
        // What every unfinished operation fails with: a lost connection, whatever libssh2
        // called it ("failure while draining incoming flow" is an `Other`), so callers treat
        // it as the server gone rather than as this one operation refused.
        let lost = if timed_out {
            std::io::ErrorKind::TimedOut
        } else {
            std::io::ErrorKind::ConnectionAborted
        };
        self.shared.timed_out.store(timed_out, Ordering::Relaxed);
        let why = if timed_out {
            "the server did not answer in time".to_string()
        } else {
            format!("the connection failed: {e}")
        };
        *self.shared.dead.lock() = Some(why.clone());
        let ids: Vec<u64> = self.jobs.keys().copied().collect();
        for id in ids {
            if let Some(mut run) = self.jobs.remove(&id) {
                if run.error.is_none() {
                    run.error = Some(Failure {
                        key: run.job.key.clone(),
                        doing: "waiting for the server",
                        error: std::io::Error::new(lost, why.clone()),
                    });
                }
                self.done(run);
            }
        }
        self.waiting.clear();
        self.in_flight = 0;
        // Whatever is ready, still queued or comes later fails the same way.
        self.shared.changed.notify_all();
        let ready: Vec<Job> = self.ready.drain(..).collect();
        for job in ready.into_iter().chain(queued).chain(rx) {
            self.never_started(job, lost, &why);
        }
    }

    /// A job the pipe stopped before starting fails with `why`.
    fn never_started(&self, job: Job, lost: std::io::ErrorKind, why: &str) {
        let bytes = job.op.bytes();
        // A listing's asker hears it from its reply channel, closed with the job.
        if !matches!(
            job.op,
            Op::List { .. }
                | Op::ReadLink { .. }
                | Op::Stat { .. }
                | Op::Read { .. }
                | Op::Room { .. }
                | Op::Upload { .. }
                | Op::Remove { .. }
                | Op::Rename { .. }
                | Op::MakeDir { .. }
        ) {
            self.shared.failures.lock().push(Failure {
                key: job.key,
                doing: "waiting for the server",
                error: std::io::Error::new(lost, why.to_string()),
            });
        }
        let mut p = self.shared.pending.lock();
        p.0 -= 1;
        p.1 -= bytes;
        self.shared.changed.notify_all();
    }

    fn request(&mut self, job: u64, step: Step, kind: u8, body: impl FnOnce(&mut Msg)) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut m = Msg::new(kind);
        m.u32(id);
        body(&mut m);
        self.out.extend_from_slice(&m.finish());
        self.waiting.insert(id, (job, step));
        self.in_flight += 1;
        if let Some(r) = self.jobs.get_mut(&job) {
            r.waiting += 1;
            if step.lingers() {
                r.lingering += 1;
            }
        }
        let mut most = self.shared.most_in_flight.lock();
        *most = (*most).max(self.in_flight);
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        // Written as it goes: no `flush`, which for a libssh2 channel throws away what has
        // been received and not read yet (the answers).
        self.w.write_all(&out)
    }

    fn start(&mut self, job: Job) {
        let id = self.next_job;
        self.next_job += 1;
        let path = job.path.clone();
        let first = match &job.op {
            Op::Mkdir => Step::Mkdir,
            Op::Write { remove_first, .. } | Op::Create { remove_first, .. } => {
                if *remove_first {
                    Step::Clear
                } else {
                    Step::Open
                }
            }
            Op::SetStat { .. } => Step::Lstat,
            Op::WriteAt { .. } => Step::AtOpen,
            Op::List { .. } => Step::OpenDir,
            Op::ReadLink { .. } => Step::ReadLinkOne,
            Op::Stat { .. } => Step::StatOne,
            Op::Room { .. } => Step::Room,
            Op::Read { .. } => Step::ReadOpen,
            Op::Upload { .. } => Step::UpOpen,
            Op::Remove { .. } => Step::RemoveOne,
            Op::Rename { .. } => Step::RenameOne,
            Op::MakeDir { .. } => Step::MakeDirOne,
            Op::Symlink { remove_first, .. } => {
                if *remove_first {
                    Step::Clear
                } else {
                    Step::Symlink
                }
            }
        };
        let sym = match &job.op {
            Op::Symlink {
                target,
                target_first,
                ..
            } => Some((target.clone(), *target_first)),
            _ => None,
        };
        self.jobs.insert(
            id,
            Running {
                job,
                waiting: 0,
                error: None,
                list: None,
                read: None,
                upload: None,
                lingering: 0,
                replied: false,
            },
        );
        match first {
            // MKDIR with mode 0700 (the final mode is set with the directory's metadata, or
            // stays so for a store's directory).
            Step::Mkdir | Step::MakeDirOne => self.request(id, first, FXP_MKDIR, |m| {
                m.str(&path);
                Attrs {
                    perm: Some(0o700),
                    ..Attrs::default()
                }
                .put(m);
            }),
            Step::Clear => self.request(id, Step::Clear, FXP_REMOVE, |m| m.str(&path)),
            Step::Open => self.open(id, &path),
            Step::Lstat => self.request(id, Step::Lstat, FXP_LSTAT, |m| m.str(&path)),
            // For writing only: no create (it is there), no truncation (other pieces are).
            Step::AtOpen => self.request(id, Step::AtOpen, FXP_OPEN, |m| {
                m.str(&path);
                m.u32(FXF_WRITE);
                Attrs::default().put(m);
            }),
            Step::ReadOpen => self.request(id, Step::ReadOpen, FXP_OPEN, |m| {
                m.str(&path);
                m.u32(FXF_READ);
                Attrs::default().put(m);
            }),
            Step::StatOne => self.request(id, Step::StatOne, FXP_LSTAT, |m| m.str(&path)),
            Step::ReadLinkOne => {
                self.request(id, Step::ReadLinkOne, FXP_READLINK, |m| m.str(&path))
            }
            Step::RemoveOne => self.request(id, Step::RemoveOne, FXP_REMOVE, |m| m.str(&path)),
            Step::RenameOne => {
                let Some(Op::Rename { to, .. }) = self.jobs.get(&id).map(|r| &r.job.op) else {
                    return;
                };
                let to = to.clone();
                self.request(id, Step::RenameOne, FXP_RENAME, |m| {
                    m.str(&path);
                    m.str(&to);
                });
            }
            Step::UpOpen => {
                let Some(run) = self.jobs.get_mut(&id) else {
                    return;
                };
                run.upload = Some((UpStage::Writing, false));
                let Op::Upload { tmp, .. } = &run.job.op else {
                    return;
                };
                let tmp = tmp.clone();
                self.request(id, Step::UpOpen, FXP_OPEN, |m| {
                    m.str(&tmp);
                    m.u32(FXF_WRITE | FXF_CREAT | FXF_EXCL);
                    Attrs {
                        perm: Some(0o600),
                        ..Attrs::default()
                    }
                    .put(m);
                });
            }
            Step::Room => self.request(id, Step::Room, FXP_EXTENDED, |m| {
                m.str(b"statvfs@openssh.com");
                m.str(&path);
            }),
            Step::OpenDir => {
                if let Some(r) = self.jobs.get_mut(&id) {
                    r.list = Some(Box::default());
                }
                self.request(id, Step::OpenDir, FXP_OPENDIR, |m| m.str(&path))
            }
            Step::Symlink => {
                let (target, target_first) = sym.expect("a symlink job");
                self.symlink(id, &path, &target, target_first);
            }
            _ => unreachable!("not a first step"),
        }
    }

    fn open(&mut self, job: u64, path: &[u8]) {
        self.request(job, Step::Open, FXP_OPEN, |m| {
            m.str(path);
            m.u32(FXF_WRITE | FXF_CREAT | FXF_EXCL);
            Attrs {
                perm: Some(0o600),
                ..Attrs::default()
            }
            .put(m);
        });
    }

    /// The WRITE requests that put `data` at `off` in the file open as `handle`.
    fn writes(&mut self, job: u64, step: Step, handle: &[u8], mut off: u64, data: &[u8]) {
        for piece in data.chunks(WRITE_SIZE) {
            self.request(job, step, FXP_WRITE, |m| {
                m.str(handle);
                m.u64(off);
                m.str(piece);
            });
            off += piece.len() as u64;
        }
    }

    fn symlink(&mut self, job: u64, link: &[u8], target: &[u8], target_first: bool) {
        self.request(job, Step::Symlink, FXP_SYMLINK, |m| {
            if target_first {
                m.str(target);
                m.str(link);
            } else {
                m.str(link);
                m.str(target);
            }
        });
    }

    /// The requests that set `meta` (on `handle`, or by `path`).
    fn set_meta(&mut self, job: u64, target: Target<'_>, meta: &Meta) {
        let refused = self.shared.owners_refused.load(Ordering::Relaxed);
        let taken = self.shared.owners_taken.load(Ordering::Relaxed) == 1;
        let send = |d: &mut Driver, step: Step, a: &Attrs| match target {
            Target::Handle(h) => d.request(job, step, FXP_FSETSTAT, |m| {
                m.str(h);
                a.put(m);
            }),
            Target::Path(p) => d.request(job, step, FXP_SETSTAT, |m| {
                m.str(p);
                a.put(m);
            }),
        };
        if !refused {
            send(self, Step::SetAll, &meta.all);
        }
        // Mode and times alone: where owners are refused, or not known to be taken yet, or
        // to put back setuid/setgid bits the change of owner cleared.
        if refused || !taken || meta.setid {
            send(self, Step::SetRest, &meta.mode_times);
        }
    }

    fn answer(&mut self, kind: u8, body: &[u8]) -> std::io::Result<()> {
        let mut c = Cursor(body);
        let id = c.u32()?;
        let Some((job, step)) = self.waiting.remove(&id) else {
            return Err(protocol(format!("an answer to request {id}, never sent")));
        };
        self.in_flight -= 1;
        let Some(mut run) = self.jobs.remove(&job) else {
            return Err(protocol(format!("request {id} belongs to no operation")));
        };
        run.waiting -= 1;
        if step.lingers() {
            run.lingering -= 1;
        }
        let status = if kind == FXP_STATUS {
            let code = c.u32()?;
            let msg = c.string(MAX_ANSWER)?;
            Some((code, String::from_utf8_lossy(msg).into_owned()))
        } else {
            None
        };
        let failed = |run: &mut Running, step: Step, code: u32, msg: String| {
            if run.error.is_none() {
                run.error = Some(Failure {
                    key: run.job.key.clone(),
                    doing: step.doing(),
                    error: super::status_error(code, msg),
                });
            }
        };
        match (step, kind, status) {
            // Whatever REMOVE said, the create follows: it fails if something stays in the way.
            (Step::Clear, FXP_STATUS, Some(_)) => {
                let path = run.job.path.clone();
                let sym = match &run.job.op {
                    Op::Symlink {
                        target,
                        target_first,
                        ..
                    } => Some((target.clone(), *target_first)),
                    _ => None,
                };
                self.jobs.insert(job, run);
                match sym {
                    Some((t, tf)) => self.symlink(job, &path, &t, tf),
                    None => self.open(job, &path),
                }
                return self.maybe_done(job);
            }
            (Step::Open, FXP_HANDLE, None) => {
                let handle = c.string(MAX_HANDLE)?.to_vec();
                let (data, meta, size) = match &mut run.job.op {
                    Op::Write { data, meta, .. } => (std::mem::take(data), Some(*meta), 0),
                    Op::Create { size, .. } => (Vec::new(), None, *size),
                    _ => return Err(protocol("a handle for an operation that opens nothing")),
                };
                self.jobs.insert(job, run);
                let zeros = data.iter().all(|&b| b == 0);
                let size = if zeros {
                    size.max(data.len() as u64)
                } else {
                    size
                };
                if !zeros {
                    self.writes(job, Step::Write, &handle, 0, &data);
                }
                if size > 0 {
                    self.request(job, Step::SetRest, FXP_FSETSTAT, |m| {
                        m.str(&handle);
                        Attrs {
                            size: Some(size),
                            ..Attrs::default()
                        }
                        .put(m);
                    });
                }
                if let Some(meta) = meta {
                    self.set_meta(job, Target::Handle(&handle), &meta);
                }
                self.request(job, Step::Close, FXP_CLOSE, |m| m.str(&handle));
                self.release(data.len());
                return self.maybe_done(job);
            }
            (Step::AtOpen, FXP_HANDLE, None) => {
                let handle = c.string(MAX_HANDLE)?.to_vec();
                let (offset, data) = match &mut run.job.op {
                    Op::WriteAt { offset, data, .. } => (*offset, std::mem::take(data)),
                    _ => return Err(protocol("a handle for an operation that writes nothing")),
                };
                self.jobs.insert(job, run);
                self.writes(job, Step::Write, &handle, offset, &data);
                self.request(job, Step::Close, FXP_CLOSE, |m| m.str(&handle));
                self.release(data.len());
                return self.maybe_done(job);
            }
            (Step::UpOpen, FXP_HANDLE, None) => {
                let handle = c.string(MAX_HANDLE)?.to_vec();
                let data = match &mut run.job.op {
                    Op::Upload { data, .. } => std::mem::take(data),
                    _ => return Err(protocol("a handle for an operation that uploads nothing")),
                };
                run.upload = Some((UpStage::Writing, true));
                self.jobs.insert(job, run);
                self.writes(job, Step::UpWrite, &handle, 0, &data);
                self.request(job, Step::UpSync, FXP_EXTENDED, |m| {
                    m.str(b"fsync@openssh.com");
                    m.str(&handle);
                });
                self.request(job, Step::UpClose, FXP_CLOSE, |m| m.str(&handle));
                self.release(data.len());
                return self.maybe_done(job);
            }
            // A server without `fsync@openssh.com` is let off (as the pool's uploads do).
            (Step::UpSync, FXP_STATUS, Some((code, msg))) => {
                if code != FX_OK && code != FX_OP_UNSUPPORTED {
                    failed(&mut run, step, code, msg);
                }
            }
            (Step::UpSync, FXP_EXTENDED_REPLY, None) => {}
            // Whatever the clean-up says, the upload's own error stands.
            (Step::UpClean, FXP_STATUS, Some(_)) => {}
            (
                Step::RemoveOne | Step::MakeDirOne | Step::RenameOne,
                FXP_STATUS,
                Some((code, msg)),
            ) => {
                if let Op::Remove { reply } | Op::MakeDir { reply } | Op::Rename { reply, .. } =
                    &run.job.op
                {
                    let _ = reply.send(if code == FX_OK {
                        Ok(())
                    } else {
                        Err(super::status_error(code, msg))
                    });
                }
            }
            (Step::Lstat, FXP_ATTRS, None) => {
                let flags = c.u32()?;
                let perm = attrs_perm(&mut c, flags)?;
                let Op::SetStat { meta } = run.job.op else {
                    return Err(protocol("attributes for an operation that asked none"));
                };
                match perm {
                    Some(p) if p & S_IFMT == S_IFLNK => {
                        if run.error.is_none() {
                            run.error = Some(Failure {
                                key: run.job.key.clone(),
                                doing: "setting its metadata",
                                error: std::io::Error::other(format!(
                                    "{} is a symlink on the server now; its metadata is not set through it",
                                    String::from_utf8_lossy(&run.job.path)
                                )),
                            });
                        }
                    }
                    _ => {
                        let path = run.job.path.clone();
                        self.jobs.insert(job, run);
                        self.set_meta(job, Target::Path(&path), &meta);
                        return self.maybe_done(job);
                    }
                }
            }
            (Step::OpenDir, FXP_HANDLE, None) => {
                let handle = c.string(MAX_HANDLE)?.to_vec();
                let l = run
                    .list
                    .as_mut()
                    .ok_or_else(|| protocol("a handle unasked"))?;
                l.handle = handle.clone();
                // Two READDIRs at once when there is room: a directory of up to a hundred
                // names (OpenSSH's most per answer) is then listed in two round trips, not
                // three. More for a directory its size shows large ([`Pipe::list_sized`]).
                let first = match run.job.op {
                    Op::List { first_readdirs, .. } => first_readdirs,
                    _ => 2,
                };
                let extra = (first.clamp(1, READDIRS_AHEAD) - 1)
                    .min(EXTRA_READDIRS.saturating_sub(self.extra_readdirs));
                self.extra_readdirs += extra;
                l.readdirs = 1 + extra;
                let n = l.readdirs;
                self.jobs.insert(job, run);
                for _ in 0..n {
                    self.request(job, Step::ReadDir, FXP_READDIR, |m| m.str(&handle));
                }
                return self.maybe_done(job);
            }
            (Step::ReadDir, FXP_NAME, None) => {
                let (max_entries, max_bytes) = match run.job.op {
                    Op::List {
                        max_entries,
                        max_bytes,
                        ..
                    } => (max_entries, max_bytes),
                    _ => return Err(protocol("names for an operation that lists nothing")),
                };
                let l = run.list.as_mut().ok_or_else(|| protocol("names unasked"))?;
                if l.readdirs > 1 {
                    self.extra_readdirs -= 1;
                }
                l.readdirs -= 1;
                let count = c.u32()?;
                for _ in 0..count {
                    let name = c.string(MAX_ANSWER)?;
                    c.string(MAX_ANSWER)?;
                    let st = read_attrs(&mut c)?;
                    if l.too_big {
                        continue;
                    }
                    // The directory's own entries, once each (a second one is passed on).
                    if name == b"." && !l.dot {
                        l.dot = true;
                        continue;
                    }
                    if name == b".." && !l.dotdot {
                        l.dotdot = true;
                        continue;
                    }
                    l.bytes += name.len();
                    if l.entries.len() >= max_entries || l.bytes > max_bytes {
                        l.too_big = true;
                        l.entries = Vec::new();
                        continue;
                    }
                    l.entries.push((name.to_vec(), st));
                }
                let handle = l.handle.clone();
                // More READDIRs on the handle at once: the server answers them in order, each
                // with the next names, then "end of file" to every one after the end. Up to
                // four more per answer, within [`READDIRS_AHEAD`] and [`EXTRA_READDIRS`]; one
                // always goes when none is left on its way. Only while the answers come full
                // ([`FULL_READDIR`]), though: a short one is most likely the last, the READDIR
                // already on its way then answers "end of file", and more sent on it only added
                // a round trip of such answers to every small directory.
                let more = if l.too_big || l.ended {
                    0
                } else {
                    let room = EXTRA_READDIRS.saturating_sub(self.extra_readdirs);
                    let full = match l.first_answer {
                        None => count as usize >= FULL_READDIR,
                        Some(first) => count as usize >= first.max(1),
                    };
                    let want = if full {
                        (READDIRS_AHEAD - l.readdirs).min(4)
                    } else {
                        0
                    };
                    let extra_now = if l.readdirs == 0 { 1 } else { 0 };
                    want.min(room + extra_now).max(extra_now)
                };
                l.first_answer.get_or_insert(count as usize);
                for _ in 0..more {
                    if l.readdirs >= 1 {
                        self.extra_readdirs += 1;
                    }
                    l.readdirs += 1;
                }
                let last = l.readdirs == 0;
                self.jobs.insert(job, run);
                for _ in 0..more {
                    self.request(job, Step::ReadDir, FXP_READDIR, |m| m.str(&handle));
                }
                if last {
                    self.end_listing(job);
                }
                return self.maybe_done(job);
            }
            (Step::ReadDir, FXP_STATUS, Some((code, msg))) => {
                let l = run
                    .list
                    .as_mut()
                    .ok_or_else(|| protocol("a listing unasked"))?;
                if l.readdirs > 1 {
                    self.extra_readdirs -= 1;
                }
                l.readdirs -= 1;
                l.ended = true;
                let last = l.readdirs == 0;
                if code != FX_EOF {
                    failed(&mut run, step, code, msg);
                }
                self.jobs.insert(job, run);
                if last {
                    self.end_listing(job);
                }
                return self.maybe_done(job);
            }
            (Step::CloseDir, FXP_STATUS, Some(_)) => {}
            (Step::ReadLink, FXP_NAME, None) => {
                let (max_bytes, l) = match (&run.job.op, run.list.as_mut()) {
                    (Op::List { max_bytes, .. }, Some(l)) => (*max_bytes, l),
                    _ => return Err(protocol("a link target unasked")),
                };
                if c.u32()? != 1 {
                    return Err(protocol("READLINK answered with other than one name"));
                }
                let target = c.string(MAX_ANSWER)?;
                if let Some(name) = l.links.remove(&id)
                    && !l.too_big
                {
                    l.bytes += target.len();
                    if l.bytes > max_bytes {
                        l.too_big = true;
                        l.todo.clear();
                    } else {
                        l.targets.push((name, target.to_vec()));
                    }
                }
                self.jobs.insert(job, run);
                self.next_readlink(job);
                return self.maybe_done(job);
            }
            // A target that cannot be read is left out: the restore looks at that link itself.
            (Step::ReadLink, FXP_STATUS, Some(_)) => {
                if let Some(l) = run.list.as_mut() {
                    l.links.remove(&id);
                }
                self.jobs.insert(job, run);
                self.next_readlink(job);
                return self.maybe_done(job);
            }
            (Step::ReadOpen, FXP_HANDLE, None) => {
                let handle = c.string(MAX_HANDLE)?.to_vec();
                let Op::Read { offset, len, .. } = run.job.op else {
                    return Err(protocol("a handle for an operation that reads nothing"));
                };
                let mut st = Box::new(ReadState {
                    buf: vec![0; len as usize],
                    ..ReadState::default()
                });
                self.jobs.insert(job, run);
                let mut off = 0u64;
                while off < u64::from(len) {
                    let n = (u64::from(len) - off).min(WRITE_SIZE as u64) as u32;
                    let id = self.next_id;
                    self.request(job, Step::ReadData, FXP_READ, |m| {
                        m.str(&handle);
                        m.u64(offset.saturating_add(off));
                        m.u32(n);
                    });
                    st.offsets.insert(id, off);
                    off += u64::from(n);
                }
                self.request(job, Step::ReadStat, FXP_FSTAT, |m| m.str(&handle));
                self.request(job, Step::ReadClose, FXP_CLOSE, |m| m.str(&handle));
                if let Some(r) = self.jobs.get_mut(&job) {
                    r.read = Some(st);
                }
                return self.maybe_done(job);
            }
            (Step::ReadData, FXP_DATA, None) => {
                let data = c.string(MAX_ANSWER)?;
                let r = run.read.as_mut().ok_or_else(|| protocol("data unasked"))?;
                let off = r
                    .offsets
                    .remove(&id)
                    .ok_or_else(|| protocol("data for no read"))?;
                let room = r.buf.len().saturating_sub(off as usize);
                if data.len() > room.min(WRITE_SIZE) {
                    return Err(protocol(format!(
                        "{} bytes in answer to a read of at most {}",
                        data.len(),
                        room.min(WRITE_SIZE)
                    )));
                }
                r.buf[off as usize..off as usize + data.len()].copy_from_slice(data);
                // A short answer: the file ends there (servers answer whole reads otherwise).
                let asked = room.min(WRITE_SIZE);
                if data.len() < asked {
                    let end = off + data.len() as u64;
                    r.end = Some(r.end.map_or(end, |e| e.min(end)));
                }
            }
            (Step::ReadData, FXP_STATUS, Some((code, msg))) => {
                let r = run
                    .read
                    .as_mut()
                    .ok_or_else(|| protocol("a read unasked"))?;
                let off = r.offsets.remove(&id).unwrap_or(0);
                if code == FX_EOF {
                    r.end = Some(r.end.map_or(off, |e| e.min(off)));
                } else {
                    failed(&mut run, step, code, msg);
                }
            }
            (Step::ReadStat, FXP_ATTRS, None) => {
                let st = read_attrs(&mut c)?;
                if let Some(r) = run.read.as_mut() {
                    r.stat = Some(st);
                }
            }
            (Step::ReadClose, FXP_STATUS, Some(_)) => {}
            (Step::ReadLinkOne, FXP_NAME, None) => {
                if c.u32()? != 1 {
                    return Err(protocol("READLINK answered with other than one name"));
                }
                let target = c.string(MAX_ANSWER)?.to_vec();
                if let Op::ReadLink { reply } = &run.job.op {
                    let _ = reply.send(Ok(target));
                }
            }
            (Step::ReadLinkOne, FXP_STATUS, Some((code, msg))) => {
                if let Op::ReadLink { reply } = &run.job.op {
                    let _ = reply.send(Err(status_answer(
                        code,
                        msg,
                        "READLINK answered OK without a name",
                    )));
                }
            }
            (Step::StatOne, FXP_ATTRS, None) => {
                let st = read_attrs(&mut c)?;
                if let Op::Stat { reply } = &run.job.op {
                    let _ = reply.send(Ok(st));
                }
            }
            (Step::StatOne, FXP_STATUS, Some((code, msg))) => {
                if let Op::Stat { reply } = &run.job.op {
                    let _ = reply.send(Err(status_answer(
                        code,
                        msg,
                        "LSTAT answered OK without attributes",
                    )));
                }
            }
            (Step::Room, FXP_EXTENDED_REPLY, None) => {
                // f_bsize, f_frsize, f_blocks, f_bfree, f_bavail, f_files, f_ffree, f_favail
                // (then fsid, flag and namemax, not needed).
                let mut v = [0u64; 8];
                for x in &mut v {
                    *x = c.u64()?;
                }
                let [bsize, frsize, _, _, bavail, files, _, favail] = v;
                let block = if frsize > 0 { frsize } else { bsize };
                if let Op::Room { reply } = &run.job.op {
                    let _ = reply.send(Ok((
                        bavail.saturating_mul(block),
                        (files > 0).then_some(favail),
                    )));
                }
            }
            (Step::Room, FXP_STATUS, Some((code, msg))) => {
                if let Op::Room { reply } = &run.job.op {
                    let _ = reply.send(Err(status_answer(
                        code,
                        msg,
                        "statvfs answered OK without figures",
                    )));
                }
            }
            (Step::SetAll, FXP_STATUS, Some((code, _))) => {
                if code == FX_OK {
                    self.shared.owners_taken.store(1, Ordering::Relaxed);
                } else if code == FX_PERMISSION_DENIED {
                    // Not root there: mode and times alone, which were sent too.
                    self.shared.owners_refused.store(true, Ordering::Relaxed);
                }
            }
            (_, FXP_STATUS, Some((code, msg))) => {
                if code != FX_OK {
                    // A failed WRITE or attribute change still closes the handle: its CLOSE
                    // was sent with them.
                    failed(&mut run, step, code, msg);
                }
            }
            (_, FXP_STATUS, None) => unreachable!("a STATUS has a status"),
            (_, kind, _) => {
                return Err(protocol(format!(
                    "packet type {kind} in answer to {}",
                    step.doing()
                )));
            }
        }
        self.jobs.insert(job, run);
        self.maybe_done(job)
    }

    /// Every READDIR of listing `job` answered: close its handle, and read its symlinks'
    /// targets, [`READLINKS_AHEAD`] at a time (however many links a directory holds, the
    /// answers waiting stay far below what the channel's window takes).
    fn end_listing(&mut self, job: u64) {
        let Some(run) = self.jobs.get_mut(&job) else {
            return;
        };
        let failed = run.error.is_some();
        let read_links = matches!(
            run.job.op,
            Op::List {
                read_links: true,
                ..
            }
        );
        let Some(l) = run.list.as_mut() else { return };
        let handle = l.handle.clone();
        if !failed && !l.too_big && read_links {
            let mut todo: Vec<Vec<u8>> = l
                .entries
                .iter()
                .filter(|(_, st)| st.is_symlink())
                .map(|(n, _)| n.clone())
                .collect();
            todo.reverse();
            l.todo = todo;
        }
        self.request(job, Step::CloseDir, FXP_CLOSE, |m| m.str(&handle));
        for _ in 0..READLINKS_AHEAD {
            self.next_readlink(job);
        }
    }

    /// The next READLINK of listing `job`, if any is left.
    fn next_readlink(&mut self, job: u64) {
        let Some(run) = self.jobs.get_mut(&job) else {
            return;
        };
        let dir = run.job.path.clone();
        let Some(name) = run.list.as_mut().and_then(|l| l.todo.pop()) else {
            return;
        };
        let mut at = dir;
        if !at.ends_with(b"/") {
            at.push(b'/');
        }
        at.extend_from_slice(&name);
        let id = self.next_id;
        self.request(job, Step::ReadLink, FXP_READLINK, |m| m.str(&at));
        if let Some(l) = self.jobs.get_mut(&job).and_then(|r| r.list.as_mut()) {
            l.links.insert(id, name);
        }
    }

    /// Data bytes of a job that left the queue's account.
    fn release(&self, bytes: usize) {
        if bytes > 0 {
            let mut p = self.shared.pending.lock();
            p.1 -= bytes;
            self.shared.changed.notify_all();
        }
    }

    fn maybe_done(&mut self, job: u64) -> std::io::Result<()> {
        if let Some(run) = self.jobs.get_mut(&job)
            && run.waiting > 0
            && run.waiting == run.lingering
            && !run.replied
        {
            Self::reply(run);
        }
        if self.jobs.get(&job).is_some_and(|r| r.waiting == 0)
            && !self.next_upload_step(job)
            && let Some(run) = self.jobs.remove(&job)
        {
            self.done(run);
        }
        Ok(())
    }

    /// Give a listing's or a read's asker its answer (once).
    fn reply(run: &mut Running) {
        if run.replied || !matches!(run.job.op, Op::List { .. } | Op::Read { .. }) {
            return;
        }
        run.replied = true;
        // An error goes to the asker, not to the failures.
        let error = run.error.take().map(|f| f.error);
        if let Op::List { reply, .. } = &run.job.op {
            let result = match (error, run.list.take()) {
                (Some(e), _) => Err(e),
                (None, Some(l)) if l.too_big => Ok(Listed::TooBig),
                (None, Some(l)) => Ok(Listed::Entries {
                    entries: l.entries,
                    targets: l.targets,
                    bytes: l.bytes,
                }),
                (None, None) => Err(protocol("a listing that never started")),
            };
            let _ = reply.send(result);
        } else if let Op::Read { reply, .. } = &run.job.op {
            let result = match (error, run.read.take()) {
                (Some(e), _) => Err(e),
                (None, Some(r)) => {
                    let mut r = *r;
                    if let Some(end) = r.end {
                        r.buf.truncate(end as usize);
                    }
                    Ok((r.buf, r.stat.unwrap_or_default()))
                }
                (None, None) => Err(protocol("a read that never started")),
            };
            let _ = reply.send(result);
        }
    }

    /// Every request of upload `job` so far answered: rename it into place once written,
    /// remove its temporary file once something failed. Did it send another request?
    fn next_upload_step(&mut self, job: u64) -> bool {
        let Some(run) = self.jobs.get_mut(&job) else {
            return false;
        };
        let (Some((stage, created)), Op::Upload { tmp, rename, .. }) = (run.upload, &run.job.op)
        else {
            return false;
        };
        let rename = *rename;
        let tmp = tmp.clone();
        let path = run.job.path.clone();
        let failed = run.error.is_some();
        match stage {
            UpStage::Writing | UpStage::Renaming if failed && created => {
                run.upload = Some((UpStage::Cleaning, created));
                self.request(job, Step::UpClean, FXP_REMOVE, |m| m.str(&tmp));
                true
            }
            UpStage::Writing if !failed && rename => {
                run.upload = Some((UpStage::Renaming, created));
                self.request(job, Step::UpRename, FXP_RENAME, |m| {
                    m.str(&tmp);
                    m.str(&path);
                });
                true
            }
            _ => false,
        }
    }

    fn done(&mut self, mut run: Running) {
        let bytes = run.job.op.bytes();
        // A file's last piece: its metadata goes next.
        if let Op::WriteAt {
            file: Some(file), ..
        } = &run.job.op
            && let Some(meta) = file.finished()
        {
            self.shared.pending.lock().0 += 1;
            self.ready.push_back(Job {
                key: run.job.key.clone(),
                path: run.job.path.clone(),
                op: Op::SetStat { meta },
            });
        }
        if let Op::List { .. } | Op::Read { .. } = &run.job.op {
            // Its answer goes to whoever asked (if it has not already), not to the failures.
            Self::reply(&mut run);
        } else if let Op::Upload { reply, .. } = &run.job.op {
            let _ = reply.send(match run.error {
                Some(f) => Err(f.error),
                None => Ok(()),
            });
        } else if let Op::Remove { reply } | Op::MakeDir { reply } | Op::Rename { reply, .. } =
            &run.job.op
        {
            // Answered through its reply already, unless the connection failed first.
            if let Some(f) = run.error {
                let _ = reply.send(Err(f.error));
            }
        } else if let Op::ReadLink { .. } | Op::Stat { .. } | Op::Room { .. } = &run.job.op {
            // Answered through its reply already (or its reply channel closes with it).
        } else if let Some(f) = run.error {
            self.shared.failures.lock().push(f);
        }
        let mut p = self.shared.pending.lock();
        p.0 -= 1;
        p.1 -= bytes;
        self.shared.changed.notify_all();
    }
}

/// The error a STATUS answer stands for where another answer was expected: the server's
/// error, or (an OK status) a protocol error saying `ok_is`.
fn status_answer(code: u32, msg: String, ok_is: &str) -> std::io::Error {
    if code == FX_OK {
        protocol(ok_is)
    } else {
        super::status_error(code, msg)
    }
}

/// Where attributes go: an open handle, or a path.
#[derive(Clone, Copy)]
enum Target<'a> {
    Handle(&'a [u8]),
    Path(&'a [u8]),
}

/// A whole ATTRS, extended pairs skipped (at most a thousand of them).
fn read_attrs(c: &mut Cursor<'_>) -> std::io::Result<Stat> {
    let flags = c.u32()?;
    let mut st = Stat::default();
    if flags & ATTR_SIZE != 0 {
        st.size = Some(c.u64()?);
    }
    if flags & ATTR_UIDGID != 0 {
        st.uid = Some(c.u32()?);
        st.gid = Some(c.u32()?);
    }
    if flags & ATTR_PERMISSIONS != 0 {
        st.perm = Some(c.u32()?);
    }
    if flags & ATTR_ACMODTIME != 0 {
        c.u32()?;
        st.mtime = Some(c.u32()?);
    }
    if flags & ATTR_EXTENDED != 0 {
        let n = c.u32()?;
        if n > 1000 {
            return Err(protocol(format!("{n} extended attributes")));
        }
        for _ in 0..n {
            c.string(MAX_ANSWER)?;
            c.string(MAX_ANSWER)?;
        }
    }
    Ok(st)
}

/// The permissions field of an ATTRS (mode with the file type), after the fields before it.
fn attrs_perm(c: &mut Cursor<'_>, flags: u32) -> std::io::Result<Option<u32>> {
    if flags & ATTR_SIZE != 0 {
        c.u64()?;
    }
    if flags & ATTR_UIDGID != 0 {
        c.u32()?;
        c.u32()?;
    }
    Ok(if flags & ATTR_PERMISSIONS != 0 {
        Some(c.u32()?)
    } else {
        None
    })
}

fn protocol(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("SFTP protocol error: {}", what.into()),
    )
}

/// Read one packet: its type and what follows it.
fn read_packet(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_ANSWER {
        return Err(protocol(format!("an answer of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let kind = body[0];
    body.remove(0);
    Ok((kind, body))
}

/// A request being built.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u8) -> Msg {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0, 0, 0, 0, kind]);
        Msg(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn str(&mut self, s: &[u8]) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s);
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_be_bytes());
        self.0
    }
}

/// Reading an answer, every length checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(protocol("an answer cut short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, max: usize) -> std::io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(protocol(format!("a string of {n} bytes")));
        }
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_directory_is_listed_with_many_readdirs_at_first() {
        // Unknown, and small directories: two (names and "end of file" in one round trip).
        assert_eq!(first_readdirs(0), 2);
        assert_eq!(first_readdirs(4096), 2);
        // ext4's /usr/share/man/man3 (2,723 names, 28 READDIRs of OpenSSH's 100).
        assert_eq!(first_readdirs(114_688), 14);
        // man1 (17,852 names): as many as one handle is allowed.
        assert_eq!(first_readdirs(1_409_024), READDIRS_AHEAD);
        assert_eq!(first_readdirs(u64::MAX), READDIRS_AHEAD);
    }

    #[test]
    fn attrs_are_laid_out_as_sftp_v3_says() {
        let mut m = Msg::new(FXP_SETSTAT);
        Attrs {
            size: None,
            owner: Some((1, 2)),
            perm: Some(0o644),
            times: Some((3, 4)),
        }
        .put(&mut m);
        let v = m.finish();
        assert_eq!(&v[..5], &[0, 0, 0, 25, FXP_SETSTAT]);
        let mut c = Cursor(&v[5..]);
        assert_eq!(
            c.u32().unwrap(),
            ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME
        );
        assert_eq!(
            (c.u32().unwrap(), c.u32().unwrap(), c.u32().unwrap()),
            (1, 2, 0o644)
        );
        assert_eq!((c.u32().unwrap(), c.u32().unwrap()), (3, 4));
        assert!(c.u32().is_err(), "nothing after the attributes");
    }

    #[test]
    fn attributes_of_a_listing_are_read_whole_extended_pairs_skipped() {
        let mut m = Msg::new(FXP_NAME);
        m.u32(ATTR_SIZE | ATTR_PERMISSIONS | ATTR_ACMODTIME | ATTR_EXTENDED);
        m.u64(7);
        m.u32(S_IFLNK | 0o777);
        m.u32(1);
        m.u32(2);
        m.u32(1);
        m.str(b"name@example.com");
        m.str(b"value");
        m.u32(0xdead_beef);
        let v = m.finish();
        let mut c = Cursor(&v[5..]);
        let st = read_attrs(&mut c).unwrap();
        assert_eq!(st.size, Some(7));
        assert_eq!(st.mtime, Some(2));
        assert_eq!(st.uid, None);
        assert!(st.is_symlink());
        assert_eq!(c.u32().unwrap(), 0xdead_beef, "the next field follows");
        // A count of extended pairs no server sends is refused, not looped over.
        let mut m = Msg::new(FXP_NAME);
        m.u32(ATTR_EXTENDED);
        m.u32(u32::MAX);
        let v = m.finish();
        assert!(read_attrs(&mut Cursor(&v[5..])).is_err());
    }

    #[test]
    fn answers_too_long_or_cut_short_are_refused() {
        let mut big = (MAX_ANSWER as u32 + 1).to_be_bytes().to_vec();
        big.push(FXP_STATUS);
        assert!(read_packet(&mut &big[..]).is_err());
        assert!(read_packet(&mut &[0u8, 0, 0, 0][..]).is_err());
        assert!(read_packet(&mut &[0u8, 0, 0, 9, FXP_STATUS, 0][..]).is_err());
        let mut c = Cursor(&[0, 0, 1, 0, 1]);
        assert!(c.string(MAX_HANDLE).is_err(), "a 256-byte string in 1 byte");
        let mut c = Cursor(&[0xff, 0xff, 0xff, 0xff]);
        assert!(c.string(MAX_ANSWER).is_err());
        let ok = [0u8, 0, 0, 5, FXP_STATUS, 0, 0, 0, 7];
        assert_eq!(
            read_packet(&mut &ok[..]).unwrap(),
            (FXP_STATUS, vec![0, 0, 0, 7])
        );
    }
}
