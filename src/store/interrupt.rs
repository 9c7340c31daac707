//! What to remove if the process is interrupted (SIGINT, SIGTERM).
//!
//! A writer registers a clean-up job before it creates something that must not outlive an
//! interrupted run (a temporary upload, a lock file) and drops the returned [`Job`] once the
//! thing is gone or finished. The CLI's signal thread calls [`run_all`], which closes the
//! registry (a writer that registers afterwards waits for the exit instead of creating
//! anything), waits for creations in flight ([`creating`]), and runs the jobs newest first: a
//! temporary file is removed before the lock of the command that was writing it, so a rename
//! racing with the clean-up either fails or leaves a name that a later job removes.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

type Task = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Registry {
    closed: bool,
    next: u64,
    jobs: BTreeMap<u64, Task>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    closed: false,
    next: 0,
    jobs: BTreeMap::new(),
});

/// Held (shared) while a registered file is being created; [`run_all`] takes it exclusively.
static CREATING: RwLock<()> = RwLock::new(());

/// A registered clean-up job; dropping it unregisters the job without running it.
#[must_use = "the job is unregistered when this is dropped"]
pub struct Job(u64);

impl Drop for Job {
    fn drop(&mut self) {
        REGISTRY.lock().jobs.remove(&self.0);
    }
}

/// Wait here for ever: the process is being interrupted and exits soon.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Register `f` to run if the process is interrupted before the returned [`Job`] is dropped.
/// Once an interruption has begun this does not return (the process is about to exit).
pub fn on_interrupt(f: impl Fn() + Send + Sync + 'static) -> Job {
    let mut r = REGISTRY.lock();
    if r.closed {
        drop(r);
        park_forever();
    }
    r.next += 1;
    let id = r.next;
    r.jobs.insert(id, Arc::new(f));
    Job(id)
}

/// Run `f`, which creates a file that a registered job removes, so that an interruption either
/// waits for it to be created (and then removes it) or keeps it from being created at all.
pub fn creating<T>(f: impl FnOnce() -> T) -> T {
    let _g = CREATING.read();
    if REGISTRY.lock().closed {
        drop(_g);
        park_forever();
    }
    f()
}

/// Has an interruption begun?
pub fn interrupted() -> bool {
    REGISTRY.lock().closed
}

/// Close the registry and run every registered job, newest first. Called once, by the thread
/// that received the signal; creations still in flight are waited for first.
pub fn run_all() {
    let jobs: Vec<Task> = {
        let mut r = REGISTRY.lock();
        r.closed = true;
        std::mem::take(&mut r.jobs).into_values().rev().collect()
    };
    // Never released: nothing is created after this.
    let g = CREATING.write();
    std::mem::forget(g);
    for j in jobs {
        j();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn dropped_jobs_do_not_run() {
        // This test does not call run_all (that closes the registry for the whole process).
        static RAN: AtomicUsize = AtomicUsize::new(0);
        let j = on_interrupt(|| {
            RAN.fetch_add(1, Ordering::Relaxed);
        });
        assert!(REGISTRY.lock().jobs.contains_key(&j.0));
        let id = j.0;
        drop(j);
        assert!(!REGISTRY.lock().jobs.contains_key(&id));
        assert_eq!(creating(|| 7), 7);
        assert_eq!(RAN.load(Ordering::Relaxed), 0);
    }
}
