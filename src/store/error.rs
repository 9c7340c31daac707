//! The store engine's error type.
//!
//! Rules: every error names the thing it is about (a store file, a path in a snapshot, a path on
//! the source or destination) and, where the user can act, what to do. Errors are created where
//! the context is known; callers above only propagate. The CLI maps each variant to an exit code
//! through [`Error::kind`], so scripts can tell a wrong passphrase from a damaged store.

use std::path::PathBuf;

/// What kind of failure an [`Error`] is, for exit codes and for callers that must react
/// differently (for example `check`, which keeps going after damage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Anything else: I/O failures, bad arguments to the engine.
    Other,
    /// The passphrase does not open any key file of the store.
    WrongPassphrase,
    /// There is no store at the location, or it is not a kloset store.
    NotFound,
    /// A store file failed authentication or could not be parsed.
    Damaged,
    /// Another process holds a conflicting lock.
    Locked,
    /// A snapshot or a path inside a snapshot does not exist.
    NoSuchEntry,
    /// The server could not be reached or refused our credentials.
    Unreachable,
    /// The server's host key is unknown or has changed.
    HostKey,
    /// A disk is full, or a disk quota is exceeded: the store's (local, or the SFTP server's)
    /// or a restore destination's.
    NoSpace,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store file {0} is damaged: {1}; run `kloset at STORE check` to list what it affects")]
    Damaged(String, String),
    #[error(
        "wrong passphrase: it opens none of the {0} key file(s) of this store (check KLOSET_PASSPHRASE or KLOSET_PASSPHRASE_FILE)"
    )]
    WrongPassphrase(usize),
    #[error("no kloset store at {0}: create one with `kloset at {0} create`")]
    NoStore(String),
    #[error("{0} is not empty and is not a kloset store; choose an empty or new directory")]
    NotEmpty(String),
    #[error("a store already exists at {0}")]
    AlreadyExists(String),
    #[error(
        "store is locked by {0}; wait for it to finish, or remove the stale lock file {1} if that process is gone"
    )]
    Locked(String, String),
    #[error("no snapshot matches {0:?}: `kloset at STORE ls` lists them")]
    NoSnapshot(String),
    #[error("{0:?} matches several snapshots ({1}); give more characters of the id")]
    AmbiguousSnapshot(String, String),
    #[error("no such file or directory in snapshot {0}: {1}")]
    NoSuchPath(String, String),
    #[error("{0} is not a directory in snapshot {1}")]
    NotADirectory(String, String),
    #[error("{0} is not a regular file in snapshot {1}")]
    NotAFile(String, String),
    #[error("blob {0} is not in the store's index: the store is missing data; run `check`")]
    MissingBlob(String),
    #[error("unsupported store format version {0} (this kloset reads version {1}); upgrade kloset")]
    Version(u32, u32),
    /// A disk filled up; the message names which one and says what to do.
    #[error("{0}")]
    NoSpace(String),
    /// An error from a connector (e.g. SFTP), already worded, with its class.
    #[error("{0}")]
    Connector(String, ErrorKind),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// [`Error::io`], unless the I/O error carries an error of another class (a connector's
    /// reader reports a lost server this way): then that error, so it keeps its exit code.
    pub fn from_io(what: impl Into<String>, source: std::io::Error) -> Self {
        match source.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
            Some(inner) if inner.kind() != ErrorKind::Other => {
                Error::Connector(inner.to_string(), inner.kind())
            }
            _ => Error::io(what, source),
        }
    }

    pub fn io_path(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::io(path.display().to_string(), source)
    }

    pub fn damaged(file: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Damaged(file.into(), why.into())
    }

    /// The class of this error, for exit codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::WrongPassphrase(_) => ErrorKind::WrongPassphrase,
            Error::NoStore(_) => ErrorKind::NotFound,
            Error::Damaged(..) | Error::MissingBlob(_) => ErrorKind::Damaged,
            Error::Locked(..) => ErrorKind::Locked,
            Error::NoSnapshot(_)
            | Error::AmbiguousSnapshot(..)
            | Error::NoSuchPath(..)
            | Error::NotADirectory(..)
            | Error::NotAFile(..) => ErrorKind::NoSuchEntry,
            Error::Connector(_, k) => *k,
            Error::NoSpace(_) => ErrorKind::NoSpace,
            Error::Io { source, .. } if no_room(source) => ErrorKind::NoSpace,
            Error::Io { .. }
            | Error::NotEmpty(_)
            | Error::AlreadyExists(_)
            | Error::Version(..)
            | Error::Other(_) => ErrorKind::Other,
        }
    }

    /// Is this an I/O error meaning "not found"?
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Is this I/O error a full disk (ENOSPC, or SFTP's "no space on filesystem") or an exceeded
/// disk quota (EDQUOT)? Both stop what writes the same way: exit 11, and the same command
/// completes once there is room.
pub fn no_room(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Is this I/O error an exceeded disk quota (EDQUOT), as opposed to a full disk?
pub fn over_quota(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::QuotaExceeded
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to an I/O result.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path.into().display().to_string(), e))
    }
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ENOSPC and EDQUOT from the OS stop a command the same way (exit 11).
    #[test]
    fn a_full_disk_and_an_exceeded_quota_are_no_space() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = Error::io("/store/x", std::io::Error::from_raw_os_error(errno));
            assert_eq!(e.kind(), ErrorKind::NoSpace, "errno {errno}");
        }
        let edquot = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert!(over_quota(&edquot) && no_room(&edquot));
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(!over_quota(&enospc) && no_room(&enospc));
        let eio = Error::io("/store/x", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(eio.kind(), ErrorKind::Other);
    }
}
