//! Store locks (leases): small files under `locks/` that say who is using a store since when.
//!
//! Every command that reads or writes a store holds one while it runs ([`LockGuard`]); it is
//! refreshed in the background by writing a new file before removing the old one, and is
//! stale when not refreshed for a while or when its process is gone. Maintenance reads them
//! ([`live_leases`]) to know which processes may still depend on packs it condemned, and two
//! maintenance runs exclude each other through them (docs/FORMAT.md §12). A process that was
//! suspended past its lease's timeout knows it ([`LockGuard::lapsed`]), so a backup checks
//! what it reused before committing.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::backend::{Backend, FileType};
use super::error::{Error, Result};
use super::format::{LockRecord, MAGIC_LOCK, frame, unframe};

/// The command name of maintenance's lock: two such locks exclude each other, and exclude
/// nothing else.
pub const MAINTENANCE: &str = "maintenance";

/// After how long without refresh a lock is stale (30 min; `KLOSET_LEASE_TIMEOUT=SECONDS`
/// changes it, for tests and for stores whose hosts agree on another value). A held lock is
/// refreshed six times per timeout.
pub fn lease_timeout() -> Duration {
    std::env::var("KLOSET_LEASE_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.5)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(1800))
}

fn refresh_every() -> Duration {
    lease_timeout() / 6
}

/// A held store lock.
pub struct LockGuard {
    lease: Arc<Lease>,
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Removes the lock file if the process is interrupted.
    _job: super::interrupt::Job,
}

/// What a held lock's refreshes share with its guard.
pub(super) struct Lease {
    backend: Arc<dyn Backend>,
    rec: Mutex<LockRecord>,
    /// The current lock file's name (each refresh writes a new file, then removes the old).
    name: Mutex<String>,
    /// A file being written by a refresh (removed too if the process is interrupted).
    fresh: Mutex<Option<String>>,
    /// `refreshed_ns` of the last lock file written.
    last_ns: AtomicI64,
    /// A refresh came later than half the timeout: others may have taken the lock as stale.
    lapsed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lease {
    /// Has the lock gone unrefreshed for more than half its timeout (the process was
    /// suspended, or the store unreachable)? Remembered once seen.
    pub(super) fn check_lapsed(&self) -> bool {
        let gap = super::now_ns().saturating_sub(self.last_ns.load(Ordering::Acquire));
        if gap > (lease_timeout() / 2).as_nanos() as i64 {
            self.lapsed.store(true, Ordering::Release);
        }
        self.lapsed.load(Ordering::Acquire)
    }

    /// Write a new lock file, then remove the old one: the lock is never absent, and no
    /// backend has to overwrite a file.
    pub(super) fn refresh(&self) -> Result<()> {
        self.check_lapsed();
        let now = super::now_ns();
        let bytes = {
            let mut rec = lock(&self.rec);
            rec.refreshed_ns = now;
            frame(MAGIC_LOCK, &*rec)
        };
        let fresh = super::crypto::random_hex(16);
        *lock(&self.fresh) = Some(fresh.clone());
        let r = self.backend.write(FileType::Lock, &fresh, &bytes);
        if r.is_ok() {
            self.last_ns.store(now, Ordering::Release);
            let mut cur = lock(&self.name);
            let _ = self.backend.remove(FileType::Lock, &cur);
            *cur = fresh;
        }
        *lock(&self.fresh) = None;
        r
    }
}

/// Is a lock record live (refreshed within the timeout, and not left by a dead process of
/// this host)?
fn lock_is_live(rec: &LockRecord) -> bool {
    let age_ns = super::now_ns().saturating_sub(rec.refreshed_ns);
    if age_ns > lease_timeout().as_nanos() as i64 {
        return false;
    }
    if rec.host == super::hostname() && rec.pid != std::process::id() {
        // A lock from a process of this host that no longer exists is stale.
        return std::path::Path::new(&format!("/proc/{}", rec.pid)).exists();
    }
    true
}

/// A lock that a process of this host, now gone (killed, crashed), left behind.
fn left_by_a_dead_process(rec: &LockRecord) -> bool {
    rec.host == super::hostname()
        && rec.pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{}", rec.pid)).exists()
}

/// Does a live lock `rec` stand in the way of a wanted lock?
fn conflicts_with(rec: &LockRecord, exclusive: bool, command: &str) -> bool {
    exclusive || rec.exclusive || (command == MAINTENANCE && rec.command == MAINTENANCE)
}

/// The live locks of a store but `mine` (a lock file name), with their file names. Lock files
/// that cannot be read or parsed are ignored.
pub fn live_leases(backend: &dyn Backend, mine: Option<&str>) -> Result<Vec<(String, LockRecord)>> {
    live_leases_of(backend, backend.list(FileType::Lock)?, mine)
}

/// [`live_leases`] from a listing of `locks/` already made.
fn live_leases_of(
    backend: &dyn Backend,
    listed: Vec<super::backend::Listed>,
    mine: Option<&str>,
) -> Result<Vec<(String, LockRecord)>> {
    let mut out = Vec::new();
    for f in listed {
        if Some(f.name.as_str()) == mine {
            continue;
        }
        let Ok(b) = backend.read(FileType::Lock, &f.name) else {
            continue;
        };
        let Ok(rec) = unframe::<LockRecord>(MAGIC_LOCK, &b, &f.name) else {
            continue;
        };
        if left_by_a_dead_process(&rec) {
            // Nothing else would ever remove it, and every command reads every lock.
            let _ = backend.remove(FileType::Lock, &f.name);
            continue;
        }
        if lock_is_live(&rec) {
            out.push((f.name, rec));
        }
    }
    Ok(out)
}

/// The first live lock of `listed` (a listing of `locks/`) but `mine` that stands in the way
/// of a wanted lock: who holds it, and its file.
fn conflict_in(
    backend: &dyn Backend,
    listed: Vec<super::backend::Listed>,
    mine: Option<&str>,
    exclusive: bool,
    command: &str,
) -> Result<Option<(String, String)>> {
    for (name, rec) in live_leases_of(backend, listed, mine)? {
        if conflicts_with(&rec, exclusive, command) {
            return Ok(Some((
                format!(
                    "{} (pid {} on {}, {})",
                    rec.command,
                    rec.pid,
                    rec.host,
                    if rec.exclusive { "exclusive" } else { "shared" }
                ),
                FileType::Lock.path(&name),
            )));
        }
    }
    Ok(None)
}

impl LockGuard {
    pub(super) fn take(
        backend: Arc<dyn Backend>,
        exclusive: bool,
        command: &str,
    ) -> Result<LockGuard> {
        Self::take_listing(backend, exclusive, command, &[]).map(|(g, _)| g)
    }

    /// [`LockGuard::take`], listing the directories of `also` together with `locks/` once
    /// the lock file is written (one round over a network instead of two); their listings.
    pub(super) fn take_listing(
        backend: Arc<dyn Backend>,
        exclusive: bool,
        command: &str,
        also: &[FileType],
    ) -> Result<(LockGuard, Vec<Result<Vec<super::backend::Listed>>>)> {
        // Looked for before writing only where other locks are likely to stop this one
        // (exclusive locks and maintenance's): a shared lock, which only an exclusive lock
        // stops, is written first and checked once, as the protocol needs, which spares a
        // backup a listing and a read per lock over the network (docs/FORMAT.md §12).
        let wary = exclusive || command == MAINTENANCE;
        if wary
            && let Some((who, file)) = conflict_in(
                backend.as_ref(),
                backend.list(FileType::Lock)?,
                None,
                exclusive,
                command,
            )?
        {
            return Err(Error::Locked(who, file));
        }
        Self::write(backend, exclusive, command, true)?.confirm(also)
    }

    /// Write a lock file and start refreshing it, before anything is known of the other
    /// locks: [`LockGuard::confirm`] must follow before the lock is relied on. Without
    /// `make_dirs`, a missing `locks/` fails the write rather than being made (for a lock
    /// written while the store is opened, before it is known to be there).
    pub(super) fn write(
        backend: Arc<dyn Backend>,
        exclusive: bool,
        command: &str,
        make_dirs: bool,
    ) -> Result<LockGuard> {
        let name = super::crypto::random_hex(16);
        let now = super::now_ns();
        let rec = LockRecord {
            exclusive,
            host: super::hostname(),
            user: super::username(),
            pid: std::process::id(),
            created_ns: now,
            refreshed_ns: now,
            command: command.to_string(),
        };
        let bytes = frame(MAGIC_LOCK, &rec);
        let lease = Arc::new(Lease {
            backend: backend.clone(),
            rec: Mutex::new(rec),
            name: Mutex::new(name.clone()),
            fresh: Mutex::new(None),
            last_ns: AtomicI64::new(now),
            lapsed: AtomicBool::new(false),
        });
        // The lock file (and one being written by a refresh) is removed if the process is
        // interrupted; registered before it is written, so none is left behind.
        let job = {
            let lease = lease.clone();
            super::interrupt::on_interrupt(move || {
                let fresh = lock(&lease.fresh).clone();
                let cur = lock(&lease.name).clone();
                for n in fresh.into_iter().chain([cur]) {
                    let _ = lease.backend.remove(FileType::Lock, &n);
                }
            })
        };
        if make_dirs {
            backend.write(FileType::Lock, &name, &bytes)?;
        } else {
            backend.write_where_there(FileType::Lock, &name, &bytes)?;
        }
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let thread = {
            let lease = lease.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (m, cv) = &*stop;
                let mut stopped = lock(m);
                loop {
                    // The flag is checked before waiting: a guard dropped before this thread
                    // first ran must not leave it (and the dropping thread) waiting a period.
                    if *stopped {
                        return;
                    }
                    let (g, _) = cv
                        .wait_timeout(stopped, refresh_every())
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = g;
                    if *stopped {
                        return;
                    }
                    let _ = lease.refresh();
                }
            })
        };
        Ok(LockGuard {
            lease,
            stop,
            thread: Some(thread),
            _job: job,
        })
    }

    /// The check a written lock needs ([`LockGuard::write`]): `locks/` listed (with the
    /// directories of `also`, in the same round) once the lock file is there; a live lock
    /// this one conflicts with removes it and fails. The guard and the listings of `also`.
    pub(super) fn confirm(
        self,
        also: &[FileType],
    ) -> Result<(LockGuard, Vec<Result<Vec<super::backend::Listed>>>)> {
        let (exclusive, command) = {
            let rec = lock(&self.lease.rec);
            (rec.exclusive, rec.command.clone())
        };
        let backend = self.lease.backend.clone();
        let types: Vec<FileType> = std::iter::once(FileType::Lock)
            .chain(also.iter().copied())
            .collect();
        let mut listings = backend.list_several(&types).into_iter();
        let locks = listings
            .next()
            .unwrap_or_else(|| Err(Error::Other("a listing went missing".into())));
        let mine = self.file_name();
        let found =
            locks.and_then(|l| conflict_in(backend.as_ref(), l, Some(&mine), exclusive, &command));
        // On any failure the guard goes, and with it the lock file.
        if let Some((who, file)) = found? {
            return Err(Error::Locked(who, file));
        }
        Ok((self, listings.collect()))
    }

    /// What the store keeps of this lock, to check it before a commit.
    pub(super) fn lease(&self) -> Arc<Lease> {
        self.lease.clone()
    }

    /// The name of this lock's current file.
    pub fn file_name(&self) -> String {
        lock(&self.lease.name).clone()
    }

    /// When this lock was taken (ns since the epoch, this host's clock).
    pub fn created_ns(&self) -> i64 {
        lock(&self.lease.rec).created_ns
    }

    /// Did this lock go unrefreshed for more than half its timeout since it was taken (the
    /// process was suspended, or the store out of reach), so that maintenance elsewhere may
    /// have taken it as stale?
    pub fn lapsed(&self) -> bool {
        self.lease.check_lapsed()
    }

    /// Refresh the lock now (it keeps its start time).
    pub fn renew(&self) -> Result<()> {
        self.lease.refresh()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.stop;
            *lock(m) = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let name = lock(&self.lease.name).clone();
        let _ = self.lease.backend.remove(FileType::Lock, &name);
    }
}
