//! The local metadata cache of a remote store.
//!
//! Index files, snapshot files and tree packs are immutable and named by their content hash,
//! so a copy kept on local disk never goes stale: it is either right or gone. The cache lives
//! in `$XDG_CACHE_HOME/kloset/<store id>/` (default `~/.cache/kloset/…`), holds the files as
//! stored (still encrypted), and lets a second command or a mount fetch only what is new.
//! Files the store no longer lists are dropped from the cache. Any cache failure (full disk,
//! permissions) only costs a download: the cache is never needed for correctness, and a copy
//! that fails its checks is dropped and fetched again (`Store::accept`). Every directory kloset
//! creates for it is mode 0700, like the store's own: the copies are encrypted, but their
//! names and sizes are the store's business.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::backend::{FileType, write_atomic};

pub struct Cache {
    /// `<base>/kloset/<store id>`.
    dir: PathBuf,
    /// Have the directories been made (or made private) yet?
    ready: std::sync::atomic::AtomicBool,
}

impl Cache {
    /// kloset's cache directory, `$XDG_CACHE_HOME/kloset` (default `~/.cache/kloset`), if a
    /// home or cache directory can be found.
    pub fn base() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| dirs::home_dir().map(|h| h.join(".cache")))?;
        Some(base.join("kloset"))
    }

    /// The cache of the store with this id, if a cache directory can be found.
    pub fn for_store(store_id: &str) -> Option<Cache> {
        Some(Cache {
            dir: Cache::base()?.join(store_id),
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Where the copy of a file is kept.
    pub fn path(&self, t: FileType, name: &str) -> PathBuf {
        self.dir.join(t.dir()).join(name)
    }

    pub fn get(&self, t: FileType, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.path(t, name)).ok()
    }

    pub fn has(&self, t: FileType, name: &str) -> bool {
        self.path(t, name).exists()
    }

    pub fn read_range(&self, t: FileType, name: &str, offset: u64, len: u64) -> Option<Vec<u8>> {
        let mut f = std::fs::File::open(self.path(t, name)).ok()?;
        f.seek(SeekFrom::Start(offset)).ok()?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).ok()?;
        Some(buf)
    }

    pub fn put(&self, t: FileType, name: &str, data: &[u8]) {
        let p = self.path(t, name);
        if let Some(d) = p.parent()
            && self.make_dirs(d).is_err()
        {
            return;
        }
        let _ = write_atomic(&p, data, 0o600);
    }

    /// Create `d` (a type directory of this cache) and its missing parents 0700. The first
    /// time, `kloset/` and `kloset/<store id>/` are also made 0700 if an older kloset left
    /// them open.
    fn make_dirs(&self, d: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        use std::sync::atomic::Ordering;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)?;
        if !self.ready.swap(true, Ordering::Relaxed) {
            let ours = [self.dir.parent(), Some(self.dir.as_path()), Some(d)];
            for dir in ours.into_iter().flatten() {
                if let Ok(m) = std::fs::symlink_metadata(dir)
                    && m.is_dir()
                    && m.permissions().mode() & 0o077 != 0
                {
                    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
                }
            }
        }
        Ok(())
    }

    pub fn remove(&self, t: FileType, name: &str) {
        let _ = std::fs::remove_file(self.path(t, name));
    }

    /// Drop cached files of type `t` that are not in `keep`.
    pub fn retain(&self, t: FileType, keep: &HashSet<String>) {
        let Ok(rd) = std::fs::read_dir(self.dir.join(t.dir())) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
