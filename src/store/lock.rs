//! Store locks (leases): small files under `locks/` that say who is using a store since when.
//!
//! Every command that reads or writes a store holds one while it runs ([`LockGuard`]); it is
//! refreshed in the background by writing a new file before removing the old one, and is
//! stale when not refreshed for a while or when its process is gone. Maintenance reads them to
//! know which processes may still depend on data it condemned (docs/FORMAT.md §12).

use std::sync::Arc;
use std::time::Duration;

use super::backend::{Backend, FileType};
use super::error::{Error, Result};
use super::format::{LockRecord, MAGIC_LOCK, frame, unframe};

/// How often a held lock is rewritten, and after how long without refresh it is stale.
const LOCK_REFRESH: Duration = Duration::from_secs(300);
const LOCK_STALE: Duration = Duration::from_secs(1800);

/// A held store lock.
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    /// The current lock file's name (each refresh writes a new file, then removes the old).
    name: Arc<std::sync::Mutex<String>>,
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Removes the lock file if the process is interrupted.
    _job: super::interrupt::Job,
}

fn lock_is_live(rec: &LockRecord) -> bool {
    let age_ns = super::now_ns().saturating_sub(rec.refreshed_ns);
    if age_ns > LOCK_STALE.as_nanos() as i64 {
        return false;
    }
    if rec.host == super::hostname() && rec.pid != std::process::id() {
        // A lock from a process of this host that no longer exists is stale.
        return std::path::Path::new(&format!("/proc/{}", rec.pid)).exists();
    }
    true
}

impl LockGuard {
    pub(super) fn take(
        backend: Arc<dyn Backend>,
        exclusive: bool,
        command: &str,
    ) -> Result<LockGuard> {
        let conflicts = |mine: Option<&str>| -> Result<Option<(String, String)>> {
            for f in backend.list(FileType::Lock)? {
                if Some(f.name.as_str()) == mine {
                    continue;
                }
                let Ok(b) = backend.read(FileType::Lock, &f.name) else {
                    continue;
                };
                let Ok(rec) = unframe::<LockRecord>(MAGIC_LOCK, &b, &f.name) else {
                    continue;
                };
                if lock_is_live(&rec) && (exclusive || rec.exclusive) {
                    return Ok(Some((
                        format!(
                            "{} (pid {} on {}, {})",
                            rec.command,
                            rec.pid,
                            rec.host,
                            if rec.exclusive { "exclusive" } else { "shared" }
                        ),
                        FileType::Lock.path(&f.name),
                    )));
                }
            }
            Ok(None)
        };
        if let Some((who, file)) = conflicts(None)? {
            return Err(Error::Locked(who, file));
        }
        let name = super::crypto::random_hex(16);
        // The lock file (and one being written by a refresh) is removed if the process is
        // interrupted; registered before it is written, so none is left behind.
        let current = Arc::new(std::sync::Mutex::new(name.clone()));
        let fresh_name: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let job = {
            let (backend, current, fresh_name) =
                (backend.clone(), current.clone(), fresh_name.clone());
            super::interrupt::on_interrupt(move || {
                let fresh = fresh_name.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let cur = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for n in fresh.into_iter().chain([cur]) {
                    let _ = backend.remove(FileType::Lock, &n);
                }
            })
        };
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
        backend.write(FileType::Lock, &name, &frame(MAGIC_LOCK, &rec))?;
        if let Some((who, file)) = conflicts(Some(&name))? {
            let _ = backend.remove(FileType::Lock, &name);
            return Err(Error::Locked(who, file));
        }
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let name = current;
        let thread = {
            let fresh_name = fresh_name.clone();
            let backend = backend.clone();
            let stop = stop.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                let mut rec = rec;
                let (m, cv) = &*stop;
                let mut stopped = m.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    // The flag is checked before waiting: a guard dropped before this thread
                    // first ran must not leave it (and the dropping thread) waiting a period.
                    if *stopped {
                        return;
                    }
                    let (g, _) = cv
                        .wait_timeout(stopped, LOCK_REFRESH)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = g;
                    if *stopped {
                        return;
                    }
                    // A new file, then the old one removed: the lock is never absent, and no
                    // backend has to overwrite a file.
                    rec.refreshed_ns = super::now_ns();
                    let fresh = super::crypto::random_hex(16);
                    *fresh_name.lock().unwrap_or_else(|e| e.into_inner()) = Some(fresh.clone());
                    if backend
                        .write(FileType::Lock, &fresh, &frame(MAGIC_LOCK, &rec))
                        .is_ok()
                    {
                        let mut cur = name.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = backend.remove(FileType::Lock, &cur);
                        *cur = fresh;
                    }
                    *fresh_name.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            })
        };
        Ok(LockGuard {
            backend,
            name,
            stop,
            thread: Some(thread),
            _job: job,
        })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.stop;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let name = self.name.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = self.backend.remove(FileType::Lock, &name);
    }
}
