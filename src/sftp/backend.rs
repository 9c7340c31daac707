//! The storage connector over SFTP: a store's files in a directory on an SSH server.
//!
//! Uploads go to a temporary name in the target directory and are renamed into place with
//! the plain SFTP rename, which refuses to replace an existing file (OpenSSH's, asyncssh's);
//! no extension is needed (`posix-rename@openssh.com`, which would replace, is never used).
//! A name already taken means the upload was already done only when the file there is the
//! same: same size for content-addressed names, same bytes for the others ([`Named`]). Reads use buffers of at least 1 MiB; ranged reads size each
//! `read()` to at most a quarter of what remains, because libssh2 reads ahead about four times
//! each call and throws that away on the next seek (DESIGN.md, "Transport facts").

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ssh2::{OpenFlags, OpenType};

use super::conn::{Conn, Pool, io};
use super::pipe::{self, Pipe};
use super::{Location, Options};
use crate::store::backend::{
    Backend, FileType, Listed, MAX_STORE_FILE, TemporariesSeen, Temporary, check_temporary_path,
    expected_entry, expected_pack_dir,
};
use crate::store::error::Result;
use crate::store::stream::{READERS, RUN_BYTES};

pub struct SftpBackend {
    loc: Location,
    pool: Arc<Pool>,
    /// The pipe ([`super::pipe`]) that carries a command's small requests (listings, the
    /// config, keys, locks, snapshots, index files), started at the first and kept until the
    /// store is closed: over a link of 20 ms round trips each new pipe costs three of them.
    kept: parking_lot::Mutex<Option<Arc<Pipe>>>,
    /// The server refused the pipe's channel once: the pool does everything.
    no_pipe: std::sync::atomic::AtomicBool,
    /// A round trip to the server, in microseconds, as the last pipe's start took it (three
    /// of them: the channel, the subsystem, SFTP's INIT).
    round_trip_us: std::sync::atomic::AtomicU64,
    /// Pack ranges read through the pipe (for the trace).
    piped_ranges: std::sync::atomic::AtomicU64,
    /// Bytes of pack ranges asked for through the pipe and not answered yet
    /// ([`PIPED_RANGE_BYTES`]), and a signal when some were.
    piped_bytes: parking_lot::Mutex<u64>,
    piped_freed: parking_lot::Condvar,
    /// Upload temporaries the listings came across.
    temporaries: TemporariesSeen,
}

/// Bytes of pack ranges in flight through the pipe, at most: half its 128 MiB receive window,
/// so that the answers of reads can never fill the window while an upload's writes fill the
/// server's (each side would then wait on the other). A range waits two round trips, so at
/// 100 ms this is 335 MB/s at most; at 32 MiB (a 64 MiB window) it held `kloset cat` of a
/// 384 MiB file at 100 ms to 4.77 s with 14 readers, 3.85 s now. A longer range is read over
/// the pool's connections.
const PIPED_RANGE_BYTES: u64 = 64 << 20;

/// From this round trip on, ranges of packs are read through the kept pipe: its OPEN, then
/// every READ of the range at once in one more round trip, the CLOSE not waited for, and as
/// many ranges in flight as readers ask for. Over the pool's connections libssh2 waits for
/// the OPEN, reads at most its 2 MiB channel window per round trip and waits for the CLOSE:
/// three round trips or more a range, on at most `connections` ranges at once. Nearer (on
/// loopback), the pool's connections spread the server's work over several processes.
const FAR: std::time::Duration = std::time::Duration::from_millis(2);

/// Round trips a range read through the pipe waits before its data comes: the OPEN's, then
/// the READs' (the CLOSE is not waited for).
const RANGE_ROUND_TRIPS: u32 = 2;

/// What a run costs besides those round trips: its bytes coming over the link and its chunks
/// checked, decrypted and decompressed, on a machine also writing out the runs before it.
/// Fitted to what measured best here (2 cores, `kloset cat` of a 384 MiB file): at 20 ms,
/// 8 readers 1.79-1.83 s, 6 1.89-2.06 s, 4 2.05-2.27 s (4 readers moved 175 MB/s: 96 ms a
/// run, 40 ms of it round trips); at 100 ms 16 readers 3.82 s, 14 3.85 s, 8 4.73 s.
const RUN_WORK: std::time::Duration = std::time::Duration::from_millis(80);

/// Readers at most (each holds up to two runs, 8 MiB each at most): 16 is 256 MiB at worst.
const MAX_RANGE_READERS: usize = 16;

/// Range reads to keep in flight through the pipe at round trip `rtt`: a run of
/// [`RUN_BYTES`] takes [`RANGE_ROUND_TRIPS`] round trips and [`RUN_WORK`], and enough runs
/// must be under way to carry [`super::SIZED_RATE`] meanwhile (the bandwidth-delay product
/// in runs); [`READERS`] at least, [`MAX_RANGE_READERS`] at most: 6 at 2 ms, 8 at 20 ms, 11 at
/// 50 ms, 16 at 100 ms (docs/PERFORMANCE.md has the measurements). `KLOSET_SFTP_READERS=N`
/// sets it (to measure).
fn readers_for(rtt: std::time::Duration) -> usize {
    if let Some(n) = std::env::var("KLOSET_SFTP_READERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return n.clamp(1, MAX_RANGE_READERS);
    }
    let run = rtt
        .saturating_mul(RANGE_ROUND_TRIPS)
        .saturating_add(RUN_WORK);
    let runs = (run.as_secs_f64() * super::SIZED_RATE / RUN_BYTES as f64).ceil();
    // `as` saturates: a round trip of hours is still MAX_RANGE_READERS.
    (runs as usize).clamp(READERS, MAX_RANGE_READERS)
}

/// A small store file is read whole through the pipe when it is shorter than this (one OPEN,
/// then this many bytes of READs at once); a longer one is read again by the pool.
const PIPED_READ: usize = 256 << 10;

/// A pack shorter than this is written through the pipe too (three round trips), like the
/// other store files; a longer one over the pool's connections, many at once. An unchanged
/// backup with a few new trees wrote its one small pack over a pool connection opened for it
/// at the end: 2.65 s of 5.6 s at 100 ms round trips (docs/PERFORMANCE.md).
const PIPED_PACK: usize = 1 << 20;

/// Entries, and bytes of names, accepted from one directory of `packs/` listed through the
/// pipe (a store of a billion packs would have 4M in each).
const PACKS_LISTED: usize = 4_000_000;
const PACKS_LISTED_BYTES: usize = 512 << 20;

/// A directory's names and attributes, as the pipe lists them.
type Entries = Vec<(Vec<u8>, pipe::Stat)>;

/// Listing `packs/` goes on over all of the pool's connections once it has taken this long.
const FAN_OUT_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Size of each sequential read or write call.
pub const IO_BUF: usize = 4 << 20;
/// Smallest ranged read call (libssh2 asks in packets of 32 KiB).
const MIN_RANGE_READ: usize = 32 << 10;

impl SftpBackend {
    /// Connect (checking host key and authentication now) to the store at `loc`.
    pub fn open(loc: Location, opts: &Options) -> Result<SftpBackend> {
        let pool = Pool::open(&loc, opts)?;
        Ok(SftpBackend {
            loc,
            pool,
            kept: parking_lot::Mutex::new(None),
            no_pipe: std::sync::atomic::AtomicBool::new(false),
            round_trip_us: std::sync::atomic::AtomicU64::new(0),
            piped_ranges: std::sync::atomic::AtomicU64::new(0),
            piped_bytes: parking_lot::Mutex::new(0),
            piped_freed: parking_lot::Condvar::new(),
            temporaries: TemporariesSeen::default(),
        })
    }

    /// The kept pipe, started now on an idle connection if there is none (or it stopped).
    /// That connection leaves the pool, which may open another in its place. `None`: pipes
    /// are turned off (`KLOSET_SFTP_PIPE=0`), no connection is idle, or the server refused.
    fn pipe(&self) -> Option<Arc<Pipe>> {
        use std::sync::atomic::Ordering;
        if self.no_pipe.load(Ordering::Relaxed)
            || std::env::var_os("KLOSET_SFTP_PIPE").is_some_and(|v| v == "0")
        {
            return None;
        }
        let mut kept = self.kept.lock();
        if let Some(p) = kept.as_ref() {
            if p.dead().is_none() {
                return Some(p.clone());
            }
            *kept = None;
        }
        let c = self.pool.take_idle()?;
        let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _t = crate::trace::span("sftp store: pipe start");
        let began = std::time::Instant::now();
        match Pipe::start(c, refused) {
            Ok(p) => {
                let rtt = began.elapsed() / 3;
                crate::trace::note(|| {
                    let how = if rtt >= FAR {
                        "pack ranges through the pipe"
                    } else {
                        "pack ranges over the pool's connections"
                    };
                    format!("sftp store: round trip about {rtt:?}: {how}")
                });
                self.round_trip_us.store(
                    u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                self.pool.detach();
                let p = Arc::new(p);
                *kept = Some(p.clone());
                Some(p)
            }
            Err((c, _)) => {
                if let Some(c) = c {
                    self.pool.give_back(c);
                }
                self.no_pipe.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// Is a pipe kept now (and not stopped)?
    pub fn has_kept_pipe(&self) -> bool {
        self.kept
            .lock()
            .as_ref()
            .is_some_and(|p| p.dead().is_none())
    }

    /// The kept pipe (started now if need be) if its start measured the server [`FAR`].
    fn far_pipe(&self) -> Option<Arc<Pipe>> {
        let pipe = self.pipe()?;
        let rtt = self
            .round_trip_us
            .load(std::sync::atomic::Ordering::Relaxed);
        (std::time::Duration::from_micros(rtt) >= FAR).then_some(pipe)
    }

    /// `len` bytes of `path` from `offset` read through the kept pipe when the server is
    /// [`FAR`]; `None` to read them the usual way (near, no pipe, the pipe stopped, a failure
    /// other than a missing file, or a file that ends before the range does, which the usual
    /// way reports).
    fn read_range_piped(
        &self,
        what: &str,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Option<Result<Vec<u8>>> {
        let len32 = u32::try_from(len).ok()?;
        if len > PIPED_RANGE_BYTES {
            return None;
        }
        let pipe = self.far_pipe()?;
        let _in_flight = self.piped_range_room(len);
        let answer = pipe
            .read_at(path.as_os_str().as_bytes().to_vec(), offset, len32)
            .ok()?
            .recv()
            .ok()?;
        match answer {
            Ok((data, _)) if data.len() as u64 == len => {
                self.piped_ranges
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(Ok(data))
            }
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(Err(crate::store::Error::io(what.to_string(), e)))
            }
            Err(_) => None,
        }
    }

    /// Wait until `len` more bytes of ranges fit in [`PIPED_RANGE_BYTES`] (always, when none
    /// are in flight); they count until the returned guard goes.
    fn piped_range_room(&self, len: u64) -> impl Drop + '_ {
        let mut b = self.piped_bytes.lock();
        while *b > 0 && *b + len > PIPED_RANGE_BYTES {
            self.piped_freed.wait(&mut b);
        }
        *b += len;
        PipedRange { backend: self, len }
    }

    /// `path` read whole through the kept pipe; `None` to read it the usual way (no pipe,
    /// the pipe stopped, a failure other than a missing file, or a file of [`PIPED_READ`] or
    /// more).
    fn read_piped(&self, what: &str, path: &Path) -> Option<Result<Vec<u8>>> {
        let pipe = self.pipe()?;
        let answer = pipe
            .read(path.as_os_str().as_bytes().to_vec(), PIPED_READ as u32)
            .ok()?
            .recv()
            .ok()?;
        match answer {
            Ok((data, st))
                if data.len() < PIPED_READ && st.size.is_none_or(|n| n == data.len() as u64) =>
            {
                Some(Ok(data))
            }
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(Err(crate::store::Error::io(what.to_string(), e)))
            }
            Err(_) => None,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    fn path(&self, t: FileType, name: &str) -> PathBuf {
        Path::new(&self.loc.path).join(t.path(name))
    }

    /// A pack upload's failed WRITE (or fsync) of `need` bytes, its connection cut
    /// ([`upload_conn_via`]): a full disk, or a write refused with room to spare, told apart
    /// by the room on the store's filesystem ([`refused_write`]) asked over another
    /// connection: the kept pipe, else one made for it ([`Pool::aside`]).
    fn write_failed(&self, need: u64, e: std::io::Error) -> std::io::Error {
        if super::transient(&e) || no_room(&e) {
            return e;
        }
        let root = Path::new(&self.loc.path);
        let through_pipe = self
            .pipe()
            .and_then(|p| p.room(root.as_os_str().as_bytes().to_vec()).ok()?.ok());
        let room = through_pipe.or_else(|| {
            let config = self.path(FileType::Config, "config");
            self.pool
                .aside(|c| room(&mut c.sftp().ok()?.open(&config).ok()?))
                .flatten()
        });
        refused_write(room, root, need, e, Server::Store)
    }

    /// [`disk_full_or`] for a failure before the upload had a file open (creating the
    /// temporary file or a `packs/XX` directory, out of inodes or blocks): the store's `config`
    /// is opened for the `statvfs@openssh.com` query instead.
    fn disk_full_or_probe(&self, c: &Conn, need: u64, e: std::io::Error) -> std::io::Error {
        if super::transient(&e) || no_room(&e) {
            return e;
        }
        let Some(mut f) = c
            .sftp()
            .ok()
            .and_then(|s| s.open(self.path(FileType::Config, "config")).ok())
        else {
            return e;
        };
        refused_write(
            room(&mut f),
            Path::new(&self.loc.path),
            need,
            e,
            Server::Store,
        )
    }

    fn dir(&self, sub: &str) -> PathBuf {
        if sub.is_empty() {
            PathBuf::from(&self.loc.path)
        } else {
            Path::new(&self.loc.path).join(sub)
        }
    }

    /// The files of type `t` among `entries` of the store directory `rel` (`index`,
    /// `packs/d0`): dot files (uploads in progress) are skipped silently, anything not of the
    /// type's shape with a warning ([`expected_entry`]). Upload temporaries are noted for
    /// [`Backend::temporaries_seen`].
    fn files_of(
        &self,
        t: FileType,
        rel: &str,
        entries: Vec<(PathBuf, ssh2::FileStat)>,
    ) -> Vec<Listed> {
        entries
            .into_iter()
            .filter_map(|(p, st)| {
                let raw = p.file_name()?.as_bytes();
                self.temporaries.note(
                    rel,
                    raw,
                    st.is_file(),
                    st.size.unwrap_or(0),
                    st.mtime.map_or(i64::MAX, |m| m as i64),
                );
                let name = expected_entry(t, rel, raw, st.is_file())?;
                Some(Listed {
                    name,
                    size: st.size.unwrap_or(0),
                })
            })
            .collect()
    }

    /// [`SftpBackend::list_packs`] through a pipe ([`SftpBackend::with_pipe`]): `packs/`,
    /// then all its subdirectories at once, a few round trips in all instead of about four
    /// per directory.
    fn list_packs_piped(&self, what: &str) -> Option<Result<Vec<Listed>>> {
        self.with_pipe(|pipe| self.list_packs_through(pipe, what))
    }

    /// Run `f` with a pipe ([`super::pipe`]) on a pooled connection idle now. `None`: no
    /// connection idle, the server refused the pipe's channel, or the connection was lost on
    /// the way (the caller does the work the usual way, which retries on new connections).
    fn with_pipe<T>(&self, f: impl FnOnce(&Pipe) -> T) -> Option<T> {
        let pipe = self.pipe()?;
        let r = f(&pipe);
        crate::trace::note(|| {
            format!(
                "sftp store: listed through the pipe, at most {} requests in flight",
                pipe.most_in_flight()
            )
        });
        pipe.dead().is_none().then_some(r)
    }

    /// Remove the file at `p` (called `what`): through the pipe, else the pool's way.
    fn remove_path(&self, what: &str, p: &Path) -> Result<()> {
        if let Some(pipe) = self.pipe() {
            match pipe.remove(p.as_os_str().as_bytes().to_vec()) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                _ => {}
            }
        }
        self.pool.run(what, |c| match c.sftp()?.unlink(p) {
            Ok(()) => Ok(()),
            Err(e) => missing_is(e, ()),
        })
    }

    /// [`Backend::write`]; a missing directory is made only with `make_dirs`.
    fn write_with(&self, t: FileType, name: &str, data: &[u8], make_dirs: bool) -> Result<()> {
        let p = self.path(t, name);
        // Every attempt's temporary name (a retry on a new connection takes a fresh one), for
        // an interruption to remove (over any free connection).
        let tmps = Arc::new(parking_lot::Mutex::new(Vec::<PathBuf>::new()));
        // Those that failed uploads may have left on the server, to remove at the end.
        let left = parking_lot::Mutex::new(Vec::<PathBuf>::new());
        let _job = {
            let (pool, tmps) = (self.pool.clone(), tmps.clone());
            crate::store::interrupt::on_interrupt(move || {
                for tmp in tmps.lock().iter() {
                    let _ = pool.run("removing a temporary upload", |c| {
                        match c.sftp()?.unlink(tmp) {
                            Ok(()) => Ok(()),
                            Err(e) => missing_is(e, ()),
                        }
                    });
                }
            })
        };
        // Through the kept pipe (three round trips, where libssh2 waits five); packs but
        // small ones ([`PIPED_PACK`]) go over the pool's connections, many at once. Any
        // failure is left to the usual way, which also tells a name already taken by this
        // very upload, a full disk, a missing directory, and retries on new connections.
        if (t != FileType::Pack || data.len() < PIPED_PACK)
            && let Some(pipe) = self.pipe()
        {
            let upload = || {
                let tmp = temp_name(&p);
                tmps.lock().push(tmp.clone());
                let done = crate::store::interrupt::creating(|| {
                    pipe.upload(
                        p.as_os_str().as_bytes().to_vec(),
                        tmp.as_os_str().as_bytes().to_vec(),
                        data.to_vec(),
                    )
                });
                // A failed upload's temporary file may be left: the pipe removes it when the
                // server answers the write with an error, but not if the pipe stopped, and a
                // server may fall silent after the error (then the removal is never
                // answered). Only a missing directory (answered at OPEN) leaves none.
                let failed = match &done {
                    Ok(Ok(())) => false,
                    Ok(Err(e)) => e.kind() != std::io::ErrorKind::NotFound,
                    Err(_) => true,
                };
                if failed {
                    left.lock().push(tmp);
                }
                done
            };
            let mut done = upload();
            // A pack's `packs/XX` not made yet (a young store has few of the 256): made
            // through the pipe too, then the upload once more.
            if t == FileType::Pack
                && make_dirs
                && matches!(&done, Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound)
                && let Some(dir) = p.parent()
                && matches!(
                    pipe.make_dir(dir.as_os_str().as_bytes().to_vec()),
                    Ok(Ok(()))
                )
            {
                done = upload();
            }
            if matches!(done, Ok(Ok(()))) {
                return Ok(());
            }
        }
        let res = self.pool.run(&t.path(name), |c| {
            let tmp = temp_name(&p);
            tmps.lock().push(tmp.clone());
            let named = Named::of(t);
            let upload = || {
                upload_conn_via(c, &p, &tmp, data, 0o600, named).map_err(|f| {
                    if f.tmp_left {
                        left.lock().push(tmp.clone());
                        return self.write_failed(data.len() as u64, f.error);
                    }
                    f.error
                })
            };
            match upload() {
                Err(e) if make_dirs && e.kind() == std::io::ErrorKind::NotFound => {
                    // The directory is missing (e.g. a new packs/XX): make it and try again.
                    mkdir_p(c, p.parent().unwrap_or(Path::new("/")), 0o700).and_then(|()| upload())
                }
                r => r,
            }
            .map_err(|e| {
                if c.is_broken() {
                    e
                } else {
                    self.disk_full_or_probe(c, data.len() as u64, e)
                }
            })
        });
        self.remove_left(&left.lock(), &res);
        res
    }

    /// Remove the temporary files failed uploads left ([`Failed::tmp_left`]), over other
    /// connections than the ones that failed; not when the upload gave up on the server
    /// (unreachable, or silent for the whole timeout), where each attempt would wait as long
    /// again.
    fn remove_left(&self, left: &[PathBuf], res: &Result<()>) {
        if matches!(res, Err(e) if e.kind() == crate::store::ErrorKind::Unreachable) {
            return;
        }
        for tmp in left {
            let _ = self.remove_path("removing a temporary upload", tmp);
        }
    }

    /// [`Backend::list_several`] through one pipe: every type's directory at once, then the
    /// subdirectories of `packs/` at once.
    fn list_several_through(&self, pipe: &Pipe, types: &[FileType]) -> Vec<Result<Vec<Listed>>> {
        let url = self.loc.url();
        let flat: Vec<FileType> = types
            .iter()
            .copied()
            .filter(|t| !matches!(t, FileType::Config | FileType::Pack))
            .collect();
        let dirs: Vec<PathBuf> = flat.iter().map(|t| self.dir(t.dir())).collect();
        // `packs/` and each of its possible subdirectories go with the others (one round).
        let packs = if types.contains(&FileType::Pack) {
            self.packs_paths()
        } else {
            Vec::new()
        };
        let answers = pipe.list_many(
            dirs.iter()
                .chain(packs.iter())
                .map(|d| d.as_os_str().as_bytes().to_vec())
                .collect(),
            PACKS_LISTED,
            PACKS_LISTED_BYTES,
            false,
        );
        let mut flat_lists: Vec<(FileType, Result<Vec<Listed>>)> = Vec::new();
        let mut packs_listed = None;
        match answers {
            Ok(mut answers) => {
                if !packs.is_empty() {
                    packs_listed = Some(answers.split_off(dirs.len()));
                }
                for ((t, d), a) in flat.iter().zip(&dirs).zip(answers) {
                    let what = format!("{url}/{}", t.dir());
                    let r = self.piped_names(&what, d, a).map(|entries| {
                        let entries = entries
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(n, st)| {
                                (d.join(std::ffi::OsStr::from_bytes(&n)), st.file_stat())
                            })
                            .collect();
                        let mut v = self.files_of(*t, t.dir(), entries);
                        v.sort_by(|a, b| a.name.cmp(&b.name));
                        v
                    });
                    flat_lists.push((*t, r));
                }
            }
            Err(why) => {
                for t in &flat {
                    flat_lists.push((*t, Err(self.lost(&format!("{url}/{}", t.dir()), &why))));
                }
            }
        }
        types
            .iter()
            .map(|t| match t {
                FileType::Config => self.list(*t),
                FileType::Pack => {
                    let what = format!("{url}/packs");
                    match packs_listed.take() {
                        Some(listed) => self.packs_from(&what, listed),
                        None => self.list_packs_through(pipe, &what),
                    }
                    .map(|mut v| {
                        v.sort_by(|a, b| a.name.cmp(&b.name));
                        v
                    })
                }
                t => match flat_lists.iter().position(|(f, _)| f == t) {
                    Some(i) => flat_lists.swap_remove(i).1,
                    None => self.list(*t),
                },
            })
            .collect()
    }

    /// The pipe stopped while doing `what`.
    fn lost(&self, what: &str, why: &str) -> crate::store::Error {
        super::Error::Connect(self.pool.target().display(), format!("{what}: {why}")).into()
    }

    /// A directory's names and attributes from the pipe's answer, or `None` for one that is
    /// not there.
    fn piped_names(
        &self,
        what: &str,
        d: &Path,
        a: std::io::Result<pipe::Listed>,
    ) -> Result<Option<Entries>> {
        match a {
            Ok(pipe::Listed::Entries { entries, .. }) => Ok(Some(entries)),
            Ok(pipe::Listed::TooBig) => Err(crate::store::Error::Other(format!(
                "{what}: {} lists more than {PACKS_LISTED} entries or {} MiB of names; refusing it",
                d.display(),
                PACKS_LISTED_BYTES >> 20
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(crate::store::Error::io(what.to_string(), e)),
        }
    }

    fn list_packs_through(&self, pipe: &Pipe, what: &str) -> Result<Vec<Listed>> {
        let listed = pipe
            .list_many(
                self.packs_paths()
                    .iter()
                    .map(|d| d.as_os_str().as_bytes().to_vec())
                    .collect(),
                PACKS_LISTED,
                PACKS_LISTED_BYTES,
                false,
            )
            .map_err(|why| self.lost(what, &why))?;
        self.packs_from(what, listed)
    }

    /// `packs/`, then each directory it may hold (`packs/00` to `packs/ff`): listed all at
    /// once, those missing answer "no such file" in the same round, where listing `packs/`
    /// first and then what it holds took two rounds. The server lists whatever stands at
    /// those names, a symlink's target too; only the answers of names that `packs/`'s own
    /// listing shows as real directories are used ([`SftpBackend::packs_from`]), the rest
    /// are dropped unread.
    fn packs_paths(&self) -> Vec<PathBuf> {
        let top = self.dir("packs");
        std::iter::once(top.clone())
            .chain((0..=255u8).map(|i| top.join(format!("{i:02x}"))))
            .collect()
    }

    /// The packs from the answers to listing [`SftpBackend::packs_paths`]: the directories
    /// `packs/` lists (others are warned of, once), each from its own answer.
    fn packs_from(
        &self,
        what: &str,
        mut listed: Vec<std::io::Result<pipe::Listed>>,
    ) -> Result<Vec<Listed>> {
        let names = |d: &Path, a| self.piped_names(what, d, a);
        let top = self.dir("packs");
        if listed.len() != 1 + 256 {
            return Err(self.lost(what, "a listing went missing"));
        }
        let below = listed.split_off(1);
        let Some(top_listed) = listed.pop() else {
            return Err(self.lost(what, "a listing went missing"));
        };
        let Some(entries) = names(&top, top_listed)? else {
            return Ok(Vec::new());
        };
        let wanted: std::collections::BTreeSet<String> = entries
            .into_iter()
            .filter_map(|(name, st)| expected_pack_dir(&name, st.file_stat().is_dir()))
            .collect();
        let mut out = Vec::new();
        for (i, a) in below.into_iter().enumerate() {
            let sub = format!("{i:02x}");
            if !wanted.contains(&sub) {
                continue;
            }
            let d = top.join(&sub);
            // Made after `packs/` was read, or gone since: nothing to list.
            let Some(entries) = names(&d, a)? else {
                continue;
            };
            let entries = entries
                .into_iter()
                .map(|(n, st)| (d.join(std::ffi::OsStr::from_bytes(&n)), st.file_stat()))
                .collect();
            out.extend(self.files_of(FileType::Pack, &format!("packs/{sub}"), entries));
        }
        Ok(out)
    }

    /// The packs, from up to 256 subdirectories of `packs/`. Each directory costs about four
    /// round trips (open, read, read to the end, close): over a 10 ms round trip one
    /// connection took 1.2 s for 30 directories, and a large store has all 256. So once
    /// listing has taken [`FAN_OUT_AFTER`], the rest is spread over all of the pool's
    /// connections. (On loopback the 30 take ~30 ms, less than opening more connections.)
    fn list_packs(&self, what: &str) -> Result<Vec<Listed>> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        if let Some(r) = self.list_packs_piped(what) {
            return r;
        }
        let top = self.dir("packs");
        let started = std::time::Instant::now();
        let dirs: Vec<(PathBuf, String)> = self.pool.run(what, |c| {
            Ok(dir_entries(c, &top)?
                .into_iter()
                .filter_map(|(d, st)| {
                    let sub = expected_pack_dir(d.file_name()?.as_bytes(), st.is_dir())?;
                    Some((d, format!("packs/{sub}")))
                })
                .collect())
        })?;
        let next = AtomicUsize::new(0);
        let lists = parking_lot::Mutex::new(Vec::with_capacity(dirs.len()));
        // Take directories off `next` until none are left (or one fails, or `until` says stop).
        let work = |until: &dyn Fn() -> bool| {
            while until() {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((d, rel)) = dirs.get(i) else { break };
                let r = self.pool.run(what, |c| {
                    Ok(self.files_of(FileType::Pack, rel, dir_entries(c, d)?))
                });
                let failed = r.is_err();
                lists.lock().push(r);
                if failed {
                    // The others stop too: the listing fails as a whole.
                    next.store(dirs.len(), Ordering::Relaxed);
                    break;
                }
            }
        };
        work(&|| started.elapsed() < FAN_OUT_AFTER);
        if next.load(Ordering::Relaxed) < dirs.len() {
            let workers = self.pool.target().connections.clamp(1, dirs.len());
            std::thread::scope(|s| {
                for _ in 0..workers {
                    s.spawn(|| work(&|| true));
                }
            });
        }
        let mut out = Vec::new();
        for l in lists.into_inner() {
            out.extend(l?);
        }
        Ok(out)
    }
}

/// The entries of a directory with their attributes; a missing directory is empty.
fn dir_entries(c: &Conn, d: &Path) -> std::io::Result<Vec<(PathBuf, ssh2::FileStat)>> {
    match c.sftp()?.readdir(d) {
        Ok(v) => Ok(v),
        Err(e) => missing_is(e, Vec::new()),
    }
}

/// An SFTP error as an I/O error, except "no such file", which means `missing`.
fn missing_is<T>(e: ssh2::Error, missing: T) -> std::io::Result<T> {
    let e = io(e);
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(missing)
    } else {
        Err(e)
    }
}

/// Read exactly `len` bytes from `offset` into `buf` (reusing its memory: a fresh megabyte
/// buffer per read is a page fault per 4 KiB), without making libssh2 fetch past the range.
pub fn read_range_conn_into(
    c: &Conn,
    path: &Path,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut f = c.sftp()?.open(path).map_err(io)?;
    if offset > 0 {
        f.seek(SeekFrom::Start(offset))?;
    }
    buf.clear();
    buf.resize(len as usize, 0);
    let mut done = 0usize;
    while done < buf.len() {
        let remaining = buf.len() - done;
        let want = (remaining / 4).max(MIN_RANGE_READ).min(remaining);
        let n = f.read(&mut buf[done..done + want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("file ends before byte {}", offset + len),
            ));
        }
        done += n;
    }
    Ok(())
}

/// Read a whole remote file with large read calls.
pub fn read_all_conn(c: &Conn, path: &Path) -> std::io::Result<Vec<u8>> {
    read_all_conn_max(c, path, u64::MAX)
}

/// Memory reserved up front for a whole-file read, whatever size the server claims.
const MAX_PREALLOC: u64 = 64 << 20;

/// [`read_all_conn`], failing once the file has turned out larger than `max` bytes: the size
/// a server reports only sizes the first allocation (at most [`MAX_PREALLOC`]), and a server
/// that sends more than it said cannot make kloset hold more than `max`.
fn read_all_conn_max(c: &Conn, path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = c.sftp()?.open(path).map_err(io)?;
    let size = f.stat().ok().and_then(|s| s.size).unwrap_or(0);
    if size > max {
        return Err(too_large(path, max));
    }
    let mut out = Vec::with_capacity(size.min(MAX_PREALLOC) as usize);
    let mut buf = vec![0u8; IO_BUF.min((size as usize).max(MIN_RANGE_READ))];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if out.len() as u64 + n as u64 > max {
            return Err(too_large(path, max));
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

fn too_large(path: &Path, max: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{} is larger than {} MiB, more than any store file",
            path.display(),
            max >> 20
        ),
    )
}

/// Create the directory `path` and its missing parents (the last with `mode`).
pub fn mkdir_p(c: &Conn, path: &Path, mode: i32) -> std::io::Result<()> {
    let sftp = c.sftp()?;
    if sftp.stat(path).is_ok_and(|s| s.is_dir()) {
        return Ok(());
    }
    let mut cur = PathBuf::from("/");
    let comps: Vec<_> = path.components().skip(1).collect();
    for (i, comp) in comps.iter().enumerate() {
        cur.push(comp);
        if sftp.stat(&cur).is_ok_and(|s| s.is_dir()) {
            continue;
        }
        let m = if i + 1 == comps.len() { mode } else { 0o755 };
        if let Err(e) = sftp.mkdir(&cur, m) {
            // Another connection may have made it meanwhile.
            if !sftp.stat(&cur).is_ok_and(|s| s.is_dir()) {
                return Err(std::io::Error::new(
                    io(e).kind(),
                    format!("cannot create directory {}", cur.display()),
                ));
            }
        }
    }
    Ok(())
}

/// How a file already at an upload's name is told apart from the upload itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    /// The name is a keyed hash of the content (packs, index files, snapshots): a file of the
    /// same size under it is the same upload, done before.
    ByContent,
    /// The name says nothing of the content (`config`; key and lock files, whose names are
    /// random): only the same bytes are the same upload (a retry whose first rename went
    /// through before the connection was lost).
    Chosen,
}

impl Named {
    fn of(t: FileType) -> Named {
        match t {
            FileType::Pack | FileType::Index | FileType::Snapshot | FileType::Condemned => {
                Named::ByContent
            }
            FileType::Config | FileType::Key | FileType::Lock => Named::Chosen,
        }
    }
}

/// An upload through one connection that failed ([`upload_conn_via`]).
struct Failed {
    error: std::io::Error,
    /// The temporary file was made and may still be on the server: the write failed, and the
    /// connection was cut (it may be out of step, or its server silent), so removing the file
    /// is left to another connection.
    tmp_left: bool,
}

impl Failed {
    /// No temporary file is left: none was made, or it was removed here.
    fn nothing_left(error: std::io::Error) -> Self {
        Failed {
            error,
            tmp_left: false,
        }
    }
}

/// A fresh temporary name next to `path`: `.tmp-<16 hex>`.
fn temp_name(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("/"));
    dir.join(format!(".tmp-{}", crate::store::crypto::random_hex(8)))
}

/// Upload `data` to `path` over `c` through the temporary name `tmp` (created inside
/// [`crate::store::interrupt::creating`], so an interruption removes it or keeps it from
/// being created). Store files are never replaced: if the name exists (the plain SFTP rename
/// refuses to replace a file, on OpenSSH as on asyncssh), the upload counts as done only if
/// that file is this upload ([`Named`]); otherwise it fails with kind `AlreadyExists`, the
/// file there untouched.
///
/// A failed WRITE or fsync may leave the connection out of step (libssh2 gives up on a WRITE
/// it has half sent, and the server reads the next request as the rest of it) or its server
/// silent: nothing more is asked on it. The connection is cut, and the room on the server (to
/// tell a full disk) and the removal of the temporary file are left to the caller, over
/// another connection ([`Failed::tmp_left`]). (The room asked on the failed handle, even
/// bounded, waited the whole timeout in one CI run of a full disk out of three.) Other
/// failures (the server answered) remove it here.
fn upload_conn_via(
    c: &Conn,
    path: &Path,
    tmp: &Path,
    data: &[u8],
    mode: i32,
    named: Named,
) -> Result<(), Failed> {
    let sftp = c.sftp().map_err(Failed::nothing_left)?;
    let mut f = crate::store::interrupt::creating(|| {
        sftp.open_mode(
            tmp,
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
            mode,
            OpenType::File,
        )
    })
    .map_err(|e| Failed::nothing_left(io(e)))?;
    let written = (|| -> std::io::Result<()> {
        for chunk in data.chunks(IO_BUF) {
            f.write_all(chunk)?;
        }
        // fsync@openssh.com: the data is on the server's disk before the name appears. A
        // server without the extension answers "unsupported" (SSH_FX_OP_UNSUPPORTED), which is
        // no reason to fail; any other error (a full disk or quota noticed at flush time) is:
        // the name must never appear on a file that is not whole.
        match f.fsync() {
            Err(e) if e.code() != ssh2::ErrorCode::SFTP(8) => Err(io(e)),
            _ => Ok(()),
        }
    })();
    if let Err(error) = written {
        c.kill();
        drop(f);
        return Err(Failed {
            error,
            tmp_left: true,
        });
    }
    let res = (|| -> std::io::Result<()> {
        // Closed explicitly, so that an error the server reports only at close (NFS, quotas)
        // is seen too; dropping the handle would ignore it.
        f.close().map_err(io)?;
        match sftp.rename(tmp, path, None) {
            Ok(()) => Ok(()),
            Err(e) => match sftp.stat(path) {
                Ok(st) => {
                    let _ = sftp.unlink(tmp);
                    already_there(c, path, st.size, data, named)
                }
                Err(_) => Err(io(e)),
            },
        }
    })();
    res.map_err(|error| {
        let _ = sftp.unlink(tmp);
        Failed::nothing_left(error)
    })
}

/// Does the server's plain SFTP rename refuse to replace an existing file, as every store
/// write needs ([`upload_conn_via`]: an upload is renamed into place and must never replace a
/// file of another writer)? Asked once, when a store is created: two files
/// `.kloset-rename-probe-<hex>.{a,b}` in `dir`, a rename of the first onto the second, both
/// removed. A server whose rename replaces (the SFTPv3 draft says it must not; some servers
/// call rename(2) anyway) is refused with an error of kind `Unsupported` saying so.
fn rename_keeps_targets(c: &Conn, dir: &Path) -> std::io::Result<()> {
    let stem = format!(
        ".kloset-rename-probe-{}",
        crate::store::crypto::random_hex(8)
    );
    let (a, b) = (dir.join(format!("{stem}.a")), dir.join(format!("{stem}.b")));
    let sftp = c.sftp()?;
    let probe = || -> std::io::Result<bool> {
        for (p, data) in [(&a, b"a"), (&b, b"b")] {
            let mut f = crate::store::interrupt::creating(|| {
                sftp.open_mode(
                    p,
                    OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
                    0o600,
                    OpenType::File,
                )
            })
            .map_err(io)?;
            f.write_all(data)?;
            f.close().map_err(io)?;
        }
        let renamed = sftp.rename(&a, &b, None).is_ok();
        Ok(renamed || read_all_conn_max(c, &b, 1)? != b"b")
    };
    let replaced = probe();
    for p in [&a, &b] {
        let _ = sftp.unlink(p);
    }
    if replaced? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this SFTP server's rename replaces an existing file; kloset commits every store file by a rename that must not (so that nothing in a store is ever overwritten), so it makes no store here: use a server whose plain SFTP rename refuses an existing name (OpenSSH's does)",
        ));
    }
    Ok(())
}

/// The rename of an upload to `path` failed and a file of `size` bytes is there: `Ok` if that
/// file is this upload ([`Named`]), else an `AlreadyExists` error naming it. Before, any file
/// there counted as "already uploaded", so a `create` that lost a race with another reported
/// success for a config (and keys) that were not its own.
fn already_there(
    c: &Conn,
    path: &Path,
    size: Option<u64>,
    data: &[u8],
    named: Named,
) -> std::io::Result<()> {
    let len = data.len() as u64;
    let refused = |what: String| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} is already on the server, {what}: another command wrote it meanwhile, or it is damaged; it was not replaced",
                path.display()
            ),
        )
    };
    if size.is_some_and(|n| n != len) {
        return Err(refused(format!(
            "with {} bytes where this write has {len}",
            size.unwrap_or(0)
        )));
    }
    if named == Named::Chosen {
        let there = read_all_conn_max(c, path, len)?;
        if there != data {
            return Err(refused("with other content".to_string()));
        }
    }
    Ok(())
}

/// Whose disk a failed write was on, for the words of [`refused_write`]'s errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    /// The store's server: the message ends with what to do.
    Store,
    /// A restore destination's server: the restore's own error says what to do.
    Destination,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Store => "the server",
            Server::Destination => "the destination server",
        }
    }

    fn advice(self, quota: bool) -> &'static str {
        match (self, quota) {
            (Server::Destination, _) => "",
            (Server::Store, false) => "; free space on the server, then run the command again",
            (Server::Store, true) => {
                "; free space or raise the quota on the server, then run the command again"
            }
        }
    }
}

/// [`refused_write`] for a failed write on the open file `f` (the `statvfs@openssh.com`
/// extension works on open handles only) in the directory `dir`.
pub(crate) fn disk_full_or(
    f: &mut ssh2::File,
    dir: &Path,
    need: u64,
    e: std::io::Error,
    server: Server,
) -> std::io::Error {
    if super::transient(&e) || no_room(&e) {
        return e;
    }
    refused_write(room(f), dir, need, e, server)
}

/// Is this already a "full" or "quota" error?
fn no_room(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// A failed write (or create) as the error to report. OpenSSH answers ENOSPC and EDQUOT alike
/// with SSH_FX_FAILURE ("failure"), as it does most errors, so the filesystem's room
/// (`room`: free bytes and inodes from `statvfs@openssh.com`, `None` if the server does not
/// answer it) tells them apart:
/// - less room than the write needs (or no free inodes): "disk full", of kind `StorageFull`;
/// - room enough, and the server said "failure": it refused the write for a reason of its
///   own, most likely an exceeded disk quota (which statvfs does not show); said so, of kind
///   `QuotaExceeded`;
/// - anything else: `e` unchanged.
pub(crate) fn refused_write(
    room: Option<(u64, Option<u64>)>,
    dir: &Path,
    need: u64,
    e: std::io::Error,
    server: Server,
) -> std::io::Error {
    if super::transient(&e) || no_room(&e) {
        return e;
    }
    let Some(r) = room else { return e };
    if let Some(full) = disk_full(r, dir, need, server) {
        return full;
    }
    if !super::fx_failure(&e) {
        return e;
    }
    std::io::Error::new(
        std::io::ErrorKind::QuotaExceeded,
        format!(
            "{} refused the write of {need} bytes (disk quota exceeded, or an error on the server: it said only \"failure\", with {} bytes free on the filesystem of {}){}",
            server.name(),
            r.0,
            dir.display(),
            server.advice(true)
        ),
    )
}

/// Free bytes and free inodes (`None` for a filesystem without an inode count) on the
/// filesystem of the open file (or directory) `f`, by the `statvfs@openssh.com` extension;
/// `None` if the server does not answer it.
pub(crate) fn room(f: &mut ssh2::File) -> Option<(u64, Option<u64>)> {
    let vfs = f.statvfs().ok()?;
    let block = if vfs.f_frsize > 0 {
        vfs.f_frsize
    } else {
        vfs.f_bsize
    };
    Some((
        vfs.f_bavail.saturating_mul(block),
        (vfs.f_files > 0).then_some(vfs.f_favail),
    ))
}

/// Room that other uploads of this command may have freed (removing their temporary files
/// after the same failure) between a failure and the `statvfs` query: a few packs' worth of
/// bytes, a few inodes. A server that fails a write with less room than the upload needs plus
/// this is taken as full.
const FREED_BYTES: u64 = 128 << 20;
const FREED_INODES: u64 = 64;

/// The "server's disk is full" error, if the filesystem of `dir` ([`room`]: free bytes, free
/// inodes) has less than `need` bytes or no inodes free, give or take what other uploads of
/// this command freed meanwhile ([`FREED_BYTES`], [`FREED_INODES`]).
pub(crate) fn disk_full(
    (free, inodes): (u64, Option<u64>),
    dir: &Path,
    need: u64,
    server: Server,
) -> Option<std::io::Error> {
    let no_inodes = inodes.is_some_and(|n| n < FREED_INODES);
    if free >= need.saturating_add(FREED_BYTES) && !no_inodes {
        return None;
    }
    let what = match inodes {
        Some(n) if no_inodes => format!("{n} inodes free"),
        _ => format!("{free} bytes free"),
    };
    Some(std::io::Error::new(
        std::io::ErrorKind::StorageFull,
        format!(
            "{}'s disk is full (a write of {need} bytes failed with {what} on the filesystem of {}){}",
            server.name(),
            dir.display(),
            server.advice(false)
        ),
    ))
}

/// Bytes of one range read through the pipe, counted in flight until it is dropped.
struct PipedRange<'a> {
    backend: &'a SftpBackend,
    len: u64,
}

impl Drop for PipedRange<'_> {
    fn drop(&mut self) {
        *self.backend.piped_bytes.lock() -= self.len;
        self.backend.piped_freed.notify_all();
    }
}

impl Drop for SftpBackend {
    fn drop(&mut self) {
        let piped = *self.piped_ranges.get_mut();
        if piped > 0 {
            crate::trace::note(|| format!("sftp store: {piped} pack ranges read through the pipe"));
        }
        // The kept pipe's connection closes at once when the pipe stops (the last user lets
        // go of it), without a round trip for each channel.
        if let Some(p) = self.kept.get_mut().take() {
            p.quit_when_stopped();
        }
    }
}

impl Backend for SftpBackend {
    fn temporaries_seen(&self) -> Vec<Temporary> {
        self.temporaries.take()
    }

    fn remove_temporary(&self, path: &str) -> Result<()> {
        check_temporary_path(path)?;
        self.remove_path(
            &format!("{}/{path}", self.loc.url()),
            &self.dir("").join(path),
        )
    }

    fn location(&self) -> String {
        self.loc.url()
    }

    /// `readers_for` the round trip the kept pipe's start measured, where ranges go through
    /// the pipe (a server `FAR`); [`READERS`] nearer, one range per pool connection.
    fn ranges_at_once(&self) -> usize {
        match self.far_pipe() {
            Some(_) => readers_for(std::time::Duration::from_micros(
                self.round_trip_us
                    .load(std::sync::atomic::Ordering::Relaxed),
            )),
            None => READERS,
        }
    }

    fn is_remote(&self) -> bool {
        true
    }
    fn warm_up(&self) {
        // The kept pipe takes the connection the pool has: started first (the open needs it
        // anyway), so that the pool opens all of its own beside it.
        let _ = self.pipe();
        self.pool.warm();
    }

    fn root_exists(&self) -> Result<bool> {
        let p = self.dir("");
        self.pool
            .run(&self.loc.url(), |c| match c.sftp()?.stat(&p) {
                Ok(s) => Ok(s.is_dir()),
                Err(e) => missing_is(e, false),
            })
    }

    fn root_entries(&self) -> Result<Vec<String>> {
        let p = self.dir("");
        self.pool
            .run(&self.loc.url(), |c| match c.sftp()?.readdir(&p) {
                Ok(v) => Ok(v
                    .into_iter()
                    .filter_map(|(p, _)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect()),
                Err(e) => missing_is(e, Vec::new()),
            })
    }

    fn init(&self) -> Result<()> {
        let root = self.dir("");
        self.pool.run(&self.loc.url(), |c| {
            mkdir_p(c, &root, 0o700)?;
            rename_keeps_targets(c, &root)?;
            for t in FileType::ALL {
                if t != FileType::Config {
                    mkdir_p(c, &root.join(t.dir()), 0o700)?;
                }
            }
            Ok(())
        })
    }

    fn list_several(&self, types: &[FileType]) -> Vec<Result<Vec<Listed>>> {
        self.with_pipe(|p| self.list_several_through(p, types))
            .unwrap_or_else(|| types.iter().map(|t| self.list(*t)).collect())
    }

    fn list(&self, t: FileType) -> Result<Vec<Listed>> {
        if t != FileType::Config
            && let Some(mut one) = self.with_pipe(|p| self.list_several_through(p, &[t]))
            && let Some(r) = one.pop()
        {
            return r;
        }
        let what = format!("{}/{}", self.loc.url(), t.dir());
        let mut out = match t {
            FileType::Config => self.pool.run(&what, |c| {
                Ok(match c.sftp()?.stat(&self.path(t, "config")) {
                    Ok(st) => vec![Listed {
                        name: "config".into(),
                        size: st.size.unwrap_or(0),
                    }],
                    Err(_) => Vec::new(),
                })
            })?,
            FileType::Pack => self.list_packs(&what)?,
            _ => {
                let d = self.dir(t.dir());
                self.pool.run(&what, |c| {
                    Ok(self.files_of(t, t.dir(), dir_entries(c, &d)?))
                })?
            }
        };
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>> {
        let p = self.path(t, name);
        // Files that are small (an index file may not be; the local cache has most of them).
        if !matches!(t, FileType::Pack | FileType::Index)
            && let Some(r) = self.read_piped(&t.path(name), &p)
        {
            return r;
        }
        self.pool
            .run(&t.path(name), |c| read_all_conn_max(c, &p, MAX_STORE_FILE))
    }

    fn read_range_into(
        &self,
        t: FileType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let p = self.path(t, name);
        if let Some(r) = self.read_range_piped(&t.path(name), &p, offset, len) {
            *buf = r?;
            return Ok(());
        }
        self.pool.run(&t.path(name), |c| {
            read_range_conn_into(c, &p, offset, len, buf)
        })
    }

    fn write(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        self.write_with(t, name, data, true)
    }

    fn write_where_there(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        self.write_with(t, name, data, false)
    }

    fn write_if(
        &self,
        t: FileType,
        name: &str,
        data: &[u8],
        check: &mut (dyn FnMut() -> Result<bool> + Send),
    ) -> Result<bool> {
        let pipe = self.pipe().filter(|_| t != FileType::Pack);
        let Some(pipe) = pipe else {
            if !check()? {
                return Ok(false);
            }
            return self.write(t, name, data).map(|()| true);
        };
        let p = self.path(t, name);
        let tmp = temp_name(&p);
        let (path_b, tmp_b) = (
            p.as_os_str().as_bytes().to_vec(),
            tmp.as_os_str().as_bytes().to_vec(),
        );
        // Removed if the process is interrupted before it is renamed into place.
        let _job = {
            let (pool, tmp) = (self.pool.clone(), tmp.clone());
            crate::store::interrupt::on_interrupt(move || {
                let _ = pool.run("removing a temporary upload", |c| {
                    match c.sftp()?.unlink(&tmp) {
                        Ok(()) => Ok(()),
                        Err(e) => missing_is(e, ()),
                    }
                });
            })
        };
        // The data goes to its temporary name (OPEN, then WRITE, fsync and CLOSE: two round
        // trips) while `check` runs; the RENAME only if it says yes.
        let (staged, checked) = std::thread::scope(|s| {
            let checked = s.spawn(check);
            let staged = crate::store::interrupt::creating(|| {
                pipe.stage(path_b.clone(), tmp_b.clone(), data.to_vec())
            });
            let checked = checked
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (matches!(staged, Ok(Ok(()))), checked)
        });
        let placed = staged
            && matches!(checked, Ok(true))
            && matches!(pipe.rename(tmp_b.clone(), path_b), Ok(Ok(())));
        if placed {
            return Ok(true);
        }
        if staged {
            let _ = self.remove_path(&t.path(name), &tmp);
        }
        // No, or the check's error; else any failure of the pipe's way is left to the usual
        // one, which tells it.
        if !checked? {
            return Ok(false);
        }
        self.write(t, name, data).map(|()| true)
    }

    fn remove(&self, t: FileType, name: &str) -> Result<()> {
        self.remove_path(&t.path(name), &self.path(t, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    /// Readers follow the round trip: more the longer each range waits, never fewer than
    /// [`READERS`] nor more than [`MAX_RANGE_READERS`].
    #[test]
    fn readers_follow_the_round_trip() {
        if std::env::var_os("KLOSET_SFTP_READERS").is_some() {
            eprintln!("skipped: KLOSET_SFTP_READERS is set");
            return;
        }
        let ms = |n| readers_for(std::time::Duration::from_millis(n));
        assert_eq!(ms(0), 5);
        assert_eq!(ms(2), 6);
        assert_eq!(ms(20), 8);
        assert_eq!(ms(50), 11);
        assert_eq!(ms(100), 16);
        assert_eq!(ms(1000), MAX_RANGE_READERS);
        assert_eq!(readers_for(std::time::Duration::MAX), MAX_RANGE_READERS);
        let mut last = 0;
        for n in 0..400 {
            let r = ms(n);
            assert!(r >= last, "fewer readers at {n} ms than before");
            last = r;
        }
    }

    /// What OpenSSH's sftp-server answers for ENOSPC, EDQUOT and most other errors, as a
    /// request's error ([`io`]) or as `ssh2::File`'s `Write` impl returns it (the message
    /// only).
    fn fx_failures() -> [std::io::Error; 2] {
        let e = || ssh2::Error::from_errno(ssh2::ErrorCode::SFTP(4));
        [io(e()), std::io::Error::from(e())]
    }

    fn fx_failure() -> std::io::Error {
        let [a, _] = fx_failures();
        a
    }

    const DIR: &str = "/srv/store";
    const MIB: u64 = 1 << 20;

    #[test]
    fn a_failure_with_no_room_left_is_a_full_disk() {
        for server in [Server::Store, Server::Destination] {
            let e = refused_write(
                Some((4096, Some(1000))),
                Path::new(DIR),
                16 * MIB,
                fx_failure(),
                server,
            );
            assert_eq!(e.kind(), ErrorKind::StorageFull, "{e}");
            let msg = e.to_string();
            assert!(msg.contains("disk is full"), "{msg}");
            assert!(
                msg.contains("4096 bytes free") && msg.contains(DIR),
                "{msg}"
            );
            assert_eq!(
                msg.contains("destination server's disk is full"),
                server == Server::Destination,
                "{msg}"
            );
        }
        // Out of inodes, plenty of bytes.
        let e = refused_write(
            Some((1 << 40, Some(0))),
            Path::new(DIR),
            MIB,
            fx_failure(),
            Server::Store,
        );
        assert_eq!(e.kind(), ErrorKind::StorageFull, "{e}");
        assert!(e.to_string().contains("0 inodes free"), "{e}");
    }

    #[test]
    fn a_failure_with_room_to_spare_is_a_refused_write_probably_a_quota() {
        for f in fx_failures() {
            let e = refused_write(
                Some((1 << 40, Some(1 << 20))),
                Path::new(DIR),
                MIB,
                f,
                Server::Destination,
            );
            assert_eq!(e.kind(), ErrorKind::QuotaExceeded, "{e}");
            assert!(
                e.to_string()
                    .starts_with("the destination server refused the write of 1048576 bytes"),
                "{e}"
            );
        }
        let e = refused_write(
            Some((1 << 40, Some(1 << 20))),
            Path::new(DIR),
            16 * MIB,
            fx_failure(),
            Server::Store,
        );
        assert_eq!(e.kind(), ErrorKind::QuotaExceeded, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("the server refused the write of 16777216 bytes")
                && msg.contains("disk quota exceeded")
                && msg.contains("raise the quota"),
            "{msg}"
        );
        // Exit 11, like a full disk.
        let se = crate::store::Error::io("packs/d0/x", e);
        assert_eq!(se.kind(), crate::store::ErrorKind::NoSpace);
    }

    #[test]
    fn other_failures_are_left_as_they_are() {
        let room = Some((1 << 40, Some(1 << 20)));
        // Not SSH_FX_FAILURE: permission denied says what it is.
        let denied = io(ssh2::Error::from_errno(ssh2::ErrorCode::SFTP(3)));
        let e = refused_write(room, Path::new(DIR), MIB, denied, Server::Store);
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        // A lost connection is retried, not reported as a full disk.
        let lost = io(ssh2::Error::from_errno(ssh2::ErrorCode::SFTP(7)));
        let e = refused_write(Some((0, Some(0))), Path::new(DIR), MIB, lost, Server::Store);
        assert_eq!(e.kind(), ErrorKind::ConnectionReset);
        // A server without statvfs@openssh.com: nothing to tell them apart by.
        let e = refused_write(None, Path::new(DIR), MIB, fx_failure(), Server::Store);
        assert_eq!(
            (e.kind(), e.to_string()),
            (ErrorKind::Other, "failure".into())
        );
    }
}
