//! Directory handles: act on a local tree relative to open directories, never by joining paths.
//!
//! A [`DirTree`] holds an open handle on a root directory and reaches every directory below it
//! one component at a time with `openat(O_DIRECTORY | O_NOFOLLOW)`, each relative to the handle
//! of its parent. A symlink anywhere below the root (put there before the walk, or swapped in
//! while it runs) therefore ends the lookup with an error instead of leading out of the tree,
//! and every name is checked by [`name_problem`] before it is used, so `..`, `/` and NUL never
//! reach a system call. Recently used directory handles are kept (a walk or a restore works
//! through one directory at a time, so a handful covers it), which makes a lookup one `openat`
//! for a new directory and none for one in use. The local source (backup) and the local
//! destination (restore) both go through it.

use std::ffi::OsStr;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;
use rustix::fs::{AtFlags, Mode, OFlags};

use super::tree::name_problem;

/// Directory handles kept open. A restore or a walk touches one directory (and its parents) at
/// a time per thread; 64 covers a few threads' working sets deep in a tree while staying far
/// below the default limit of 1,024 open files.
const KEPT_HANDLES: usize = 64;

/// Deepest directory reached below a root (and deepest tree a restore or walk goes into).
/// Deeper trees are refused with an error naming them: a path grows with each level, so an
/// unbounded depth taken from a store would cost memory quadratic in it.
pub const MAX_DEPTH: usize = 4096;

/// Stack of a thread that recurses once per directory level, up to [`MAX_DEPTH`] levels
/// (a few KiB a level in a debug build) with a wide margin. Address space only: the pages a
/// shallow tree never touches are never used.
const DEEP_STACK: usize = 64 << 20;

/// Run `f` on a thread with a stack deep enough for [`MAX_DEPTH`] levels of recursion (the
/// backup walk, `sync`'s tree rewrite), and wait for it.
pub fn on_deep_stack<R: Send>(
    what: &str,
    f: impl FnOnce() -> super::error::Result<R> + Send,
) -> super::error::Result<R> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name(what.into())
            .stack_size(DEEP_STACK)
            .spawn_scoped(s, f)
            .map_err(|e| super::error::Error::io(format!("starting the {what}"), e))?
            .join()
            .unwrap_or_else(|_| {
                Err(super::error::Error::Other(format!(
                    "internal error: the {what} panicked"
                )))
            })
    })
}

/// A root directory and the handles of directories below it.
pub struct DirTree {
    root: Arc<OwnedFd>,
    path: PathBuf,
    kept: Mutex<LruCache<Vec<u8>, Arc<OwnedFd>>>,
}

/// An error for a name that must not be used as a directory entry.
fn bad_name(name: &[u8], why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{:?}: {why}; not used", String::from_utf8_lossy(name)),
    )
}

/// Check one component of a relative path.
pub fn check_name(name: &[u8]) -> io::Result<&OsStr> {
    match name_problem(name) {
        Some(why) => Err(bad_name(name, why)),
        None => Ok(OsStr::from_bytes(name)),
    }
}

/// Open the directory `name` in `dir` without following a symlink. Read access is asked for
/// (listing needs it); a directory we may only search is opened as a path handle instead.
pub fn open_dir_at(dir: impl AsFd, name: &[u8]) -> io::Result<OwnedFd> {
    let name = check_name(name)?;
    let base = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(&dir, name, base | OFlags::RDONLY, Mode::empty()) {
        Err(rustix::io::Errno::ACCESS) => Ok(rustix::fs::openat(
            &dir,
            name,
            base | OFlags::PATH,
            Mode::empty(),
        )?),
        Err(rustix::io::Errno::LOOP) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a symbolic link where a directory was expected; not followed",
        )),
        r => Ok(r?),
    }
}

/// The path of an open handle in `/proc`, for the calls that have no form taking a handle
/// (`chmod` and `utimensat` of a path handle, `setxattr` of a node we must not open).
/// The kernel resolves it to the handle's own inode, whatever has since been renamed.
pub fn proc_path(fd: impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl DirTree {
    /// Open `root` (following symlinks in the path the user gave, like any tool) as the root.
    pub fn open(root: &Path) -> io::Result<DirTree> {
        let fd = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(DirTree {
            root: Arc::new(fd),
            path: root.to_path_buf(),
            kept: Mutex::new(LruCache::new(
                NonZeroUsize::new(KEPT_HANDLES).expect("non-zero"),
            )),
        })
    }

    /// The root's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` shown below the root, for messages.
    pub fn show(&self, rel: &[u8]) -> String {
        if rel.is_empty() {
            self.path.display().to_string()
        } else {
            self.path.join(OsStr::from_bytes(rel)).display().to_string()
        }
    }

    /// The handle of the directory at `rel` (`a/b/c`, empty for the root), opened one
    /// component at a time without following symlinks.
    pub fn dir(&self, rel: &[u8]) -> io::Result<Arc<OwnedFd>> {
        if rel.is_empty() {
            return Ok(self.root.clone());
        }
        if let Some(fd) = self.kept.lock().get(rel) {
            return Ok(fd.clone());
        }
        // Ends of each component's prefix: `a/b/c` -> [1, 3, 5].
        let ends: Vec<usize> = rel
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(|(i, _)| i)
            .chain(std::iter::once(rel.len()))
            .collect();
        if ends.len() > MAX_DEPTH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("more than {MAX_DEPTH} directories deep; not followed"),
            ));
        }
        // Start from the deepest directory whose handle is kept.
        let (mut fd, mut start) = (self.root.clone(), 0);
        {
            let mut kept = self.kept.lock();
            for (i, &end) in ends.iter().enumerate().rev().skip(1) {
                if let Some(f) = kept.get(&rel[..end]) {
                    (fd, start) = (f.clone(), i + 1);
                    break;
                }
            }
        }
        for (i, &end) in ends.iter().enumerate().skip(start) {
            let from = if i == 0 { 0 } else { ends[i - 1] + 1 };
            fd = Arc::new(open_dir_at(&*fd, &rel[from..end])?);
            self.kept.lock().put(rel[..end].to_vec(), fd.clone());
        }
        Ok(fd)
    }

    /// The handle of the directory holding `rel`, and `rel`'s last component (checked).
    pub fn parent<'a>(&self, rel: &'a [u8]) -> io::Result<(Arc<OwnedFd>, &'a [u8])> {
        let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&rel[..0], rel),
        };
        check_name(name)?;
        Ok((self.dir(dir)?, name))
    }

    /// Forget the handles of `rel` and everything below it (it was removed or replaced).
    pub fn forget(&self, rel: &[u8]) {
        let mut kept = self.kept.lock();
        let below: Vec<Vec<u8>> = kept
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with(rel) && (k.len() == rel.len() || k[rel.len()] == b'/'))
            .cloned()
            .collect();
        for k in below {
            kept.pop(&k);
        }
    }
}

/// Remove whatever is at `name` in `dir`, without following symlinks: a directory with
/// everything in it, or any other entry. Nothing there is not an error.
///
/// Directories are emptied one level at a time through handles (never by path) and
/// iteratively, so neither a symlink inside nor a very deep tree can take it elsewhere or
/// exhaust the stack; trees deeper than [`MAX_DEPTH`] are refused.
pub fn remove_at(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let os = check_name(name)?;
    match rustix::fs::unlinkat(dir, os, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        // EISDIR on Linux for a directory; EPERM elsewhere.
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    // A directory: empty it level by level. Each stack entry is an open directory and the
    // name it has in the one above.
    let first = rustix::fs::openat(
        dir,
        os,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut stack: Vec<(OwnedFd, Vec<u8>)> = vec![(first, name.to_vec())];
    while let Some((top, _)) = stack.last() {
        let mut sub = None;
        for e in rustix::fs::Dir::read_from(top)? {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            match rustix::fs::unlinkat(top, e.file_name(), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {
                    sub = Some(n.to_vec());
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        match sub {
            Some(n) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("more than {MAX_DEPTH} directories deep; not removed"),
                    ));
                }
                let fd = rustix::fs::openat(
                    &stack.last().expect("non-empty").0,
                    OsStr::from_bytes(&n),
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                stack.push((fd, n));
            }
            None => {
                let (_, n) = stack.pop().expect("non-empty");
                let parent = match stack.last() {
                    Some((p, _)) => p,
                    None => dir,
                };
                match rustix::fs::unlinkat(parent, OsStr::from_bytes(&n), AtFlags::REMOVEDIR) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_stop_at_symlinks_and_bad_names() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("a/link")).unwrap();
        let d = DirTree::open(t.path()).unwrap();
        d.dir(b"a/b").unwrap();
        d.dir(b"a").unwrap();
        for bad in [
            &b"a/link"[..],
            b"a/link/x",
            b"..",
            b"a/../..",
            b"a//b",
            b"/a",
        ] {
            assert!(d.dir(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let (_, name) = d.parent(b"a/b/file").unwrap();
        assert_eq!(name, b"file");
        assert!(d.parent(b"a/..").is_err());

        // A directory swapped for a symlink after its handle was kept: forget, and the next
        // lookup refuses it.
        std::fs::remove_dir(t.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("a/b")).unwrap();
        d.forget(b"a/b");
        assert!(d.dir(b"a/b").is_err());
    }

    #[test]
    fn remove_at_never_follows_and_goes_deep_without_recursion() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let mut p = t.path().join("tree");
        for _ in 0..300 {
            p = p.join("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("f"), b"y").unwrap();
        std::os::unix::fs::symlink(outside.path(), p.join("l")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("tree/l")).unwrap();
        let d = DirTree::open(t.path()).unwrap();
        remove_at(&d.dir(b"").unwrap(), b"tree").unwrap();
        assert!(!t.path().join("tree").exists());
        assert!(outside.path().join("keep").exists());
        // Nothing there: fine.
        remove_at(&d.dir(b"").unwrap(), b"tree").unwrap();
        assert!(remove_at(&d.dir(b"").unwrap(), b"..").is_err());
    }
}
