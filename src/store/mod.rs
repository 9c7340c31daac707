//! The store engine: a library that knows no clap and no FUSE.
//!
//! A store is a directory of files reached through a [`Backend`] (local here, SFTP in
//! `crate::sftp`). [`Store`] opens it (config, keys, index) and reads and writes blobs;
//! the pipelines [`backup`], [`restore`], [`check`] and [`sync`] are written once against the
//! [`Backend`], [`Source`] and [`Destination`] traits, so every connector gets all of them.
//! docs/FORMAT.md describes the files byte by byte.

pub mod archive;
pub mod backend;
pub mod backup;
pub mod cache;
pub mod check;
pub mod crypto;
pub mod destination;
pub mod dirfd;
pub mod early;
pub mod error;
pub mod format;
pub mod index;
pub mod interrupt;
pub mod lock;
pub mod maintenance;
pub mod notice;
pub mod packer;
pub mod policy;
pub mod repo;
pub mod restore;
pub mod source;
pub mod stream;
pub mod sync;
pub mod tree;

pub use backend::{Backend, FileType, LocalBackend, MemBackend};
pub use destination::{Destination, LocalDestination};
pub use error::{Error, ErrorKind, Result};
pub use lock::LockGuard;
pub use repo::{CreateOptions, SnapshotEntry, Store, write_early_lock};
pub use source::{LocalSource, Source};

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// This machine's host name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The name of the user running kloset.
pub fn username() -> String {
    source::user_name(nix::unistd::geteuid().as_raw())
}

/// A named point in a command where tests stop or kill the process: with
/// `KLOSET_DEBUG_STOP_AT=NAME` it stops itself (SIGSTOP) there the first time, with `KLOSET_DEBUG_KILL_AT=NAME`
/// it is killed (SIGKILL). The crash and suspension tests of maintenance and backup use them to
/// reach each step of the write order exactly; unset, this costs one environment lookup.
pub fn debug_point(name: &str) {
    use nix::sys::signal::{Signal, raise};
    let hit = |var: &str| std::env::var(var).is_ok_and(|v| v.split(',').any(|p| p == name));
    if hit("KLOSET_DEBUG_KILL_AT") {
        let _ = raise(Signal::SIGKILL);
    }
    // Stopped once per point: a step run again (a backup's second walk) goes on.
    static STOPPED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if hit("KLOSET_DEBUG_STOP_AT") {
        let mut seen = STOPPED.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.iter().any(|s| s == name) {
            seen.push(name.to_string());
            drop(seen);
            let _ = raise(Signal::SIGSTOP);
        }
    }
}
