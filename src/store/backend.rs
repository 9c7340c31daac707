//! The storage connector: where a store's files live.
//!
//! A store is a handful of file types ([`FileType`]) each in its own directory. The engine only
//! ever creates whole files atomically (write to a temporary name, then rename) and never
//! overwrites one, so every backend only needs list, read, ranged read, atomic create and remove.
//! [`LocalBackend`] keeps the files in a local directory; the SFTP backend lives in `crate::sftp`;
//! [`MemBackend`] keeps them in memory for unit tests of the engine.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::error::{Error, ErrorKind, IoContext, Result};

/// The kinds of files in a store, each kept under its own directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileType {
    /// The single `config` file at the store's root.
    Config,
    /// `keys/<name>`: the master keys wrapped by a passphrase.
    Key,
    /// `packs/<first two hex digits>/<name>`: blob containers.
    Pack,
    /// `index/<name>`: blob locations.
    Index,
    /// `snapshots/<name>`.
    Snapshot,
    /// `locks/<name>`.
    Lock,
    /// `condemned/<name>`: packs maintenance condemned, deleted by a later run (format 2).
    Condemned,
}

impl FileType {
    pub const ALL: [FileType; 7] = [
        FileType::Config,
        FileType::Key,
        FileType::Pack,
        FileType::Index,
        FileType::Snapshot,
        FileType::Lock,
        FileType::Condemned,
    ];

    /// Directory of this file type inside the store.
    pub fn dir(self) -> &'static str {
        match self {
            FileType::Config => "",
            FileType::Key => "keys",
            FileType::Pack => "packs",
            FileType::Index => "index",
            FileType::Snapshot => "snapshots",
            FileType::Lock => "locks",
            FileType::Condemned => "condemned",
        }
    }

    /// Path of a file relative to the store root, e.g. `packs/ab/ab12…`. Names that are not
    /// of the expected shape ([`FileType::expects`]) never come out of a listing; one that is
    /// passed anyway gets a path that cannot exist rather than a panic.
    pub fn path(self, name: &str) -> String {
        match self {
            FileType::Config => "config".to_string(),
            FileType::Pack => format!("packs/{}/{}", name.get(..2).unwrap_or("--"), name),
            _ => format!("{}/{}", self.dir(), name),
        }
    }

    /// Does `name` have the exact shape the writers give files of this type (docs/FORMAT.md
    /// §2)? Packs, index files and snapshots: 64 lowercase hex digits (a keyed hash of the
    /// content); key and lock files: 32 (16 random bytes); the config: `config`.
    pub fn expects(self, name: &str) -> bool {
        let hex = |len: usize| {
            name.len() == len
                && name
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        match self {
            FileType::Config => name == "config",
            FileType::Key | FileType::Lock => hex(32),
            FileType::Pack | FileType::Index | FileType::Snapshot | FileType::Condemned => hex(64),
        }
    }
}

/// Is `name` (as listed in a store directory) the temporary file of an unfinished write, or
/// another dot file? Those are skipped silently, as they always were: a write in progress
/// (`.tmp-…`) is normal.
pub fn is_hidden(name: &[u8]) -> bool {
    name.first() == Some(&b'.')
}

/// Sort out one entry of a store directory being listed: `dir` is its directory relative to
/// the store root (`index`, `packs/d0`), `name` its raw name, `is_file` whether it is a regular
/// file. Returns the name if it is a file this directory should hold; anything else (a name
/// of another shape, a subdirectory, a symlink, a pack in the wrong `packs/xx/`) is reported
/// once as a warning and skipped. Dot files are skipped silently ([`is_hidden`]).
pub fn expected_entry(t: FileType, dir: &str, name: &[u8], is_file: bool) -> Option<String> {
    if is_hidden(name) {
        return None;
    }
    let shown = || format!("{dir}/{}", super::notice::escape(name));
    let good = std::str::from_utf8(name).ok().filter(|n| {
        t.expects(n) && (t != FileType::Pack || dir.strip_prefix("packs/") == n.get(..2))
    });
    match good {
        Some(n) if is_file => Some(n.to_string()),
        Some(_) => {
            super::notice::warn_once(format!(
                "ignoring {} in the store: it is not a regular file",
                shown()
            ));
            None
        }
        None => {
            super::notice::warn_once(format!("ignoring unexpected file {} in the store", shown()));
            None
        }
    }
}

/// Sort out one entry of `packs/`: the name of a `packs/xx/` directory (two lowercase hex
/// digits) to list, or `None` (reported once, as [`expected_entry`] does).
pub fn expected_pack_dir(name: &[u8], is_dir: bool) -> Option<String> {
    if is_hidden(name) {
        return None;
    }
    let good = name.len() == 2
        && name
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    if good && is_dir {
        return Some(String::from_utf8_lossy(name).into_owned());
    }
    super::notice::warn_once(format!(
        "ignoring unexpected file packs/{} in the store",
        super::notice::escape(name)
    ));
    None
}

/// No store file is read whole beyond this size (packs are about `pack_size`, 16 MiB, plus
/// one blob; a record decompresses to at most 1 GiB): a larger file is damage, not a reason
/// to allocate without bound.
pub const MAX_STORE_FILE: u64 = 2 << 30;

/// A file listed by [`Backend::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub size: u64,
}

/// The temporary file of an upload (`.tmp-…`, renamed to its name once whole) that a listing
/// of a store directory came across ([`Backend::temporaries_seen`]). One left by an upload
/// that never finished (a writer killed, a connection lost) is removed by maintenance once
/// no live writer can still be writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Temporary {
    /// Its path from the store's root: `packs/ab/.tmp-…`.
    pub path: String,
    pub size: u64,
    /// Its last modification, in seconds since the epoch.
    pub mtime: i64,
}

/// Is `name` (as listed in a store directory) an upload's temporary file?
pub fn is_temporary(name: &[u8]) -> bool {
    name.starts_with(b".tmp-") && !name.contains(&b'/') && name.len() <= 64
}

/// The temporaries a backend's listings have seen, kept for [`Backend::temporaries_seen`]
/// (at most [`TEMPORARIES_KEPT`]).
#[derive(Default)]
pub struct TemporariesSeen(parking_lot::Mutex<Vec<Temporary>>);

/// Temporaries remembered from listings, at most: more are left for a later maintenance run.
pub const TEMPORARIES_KEPT: usize = 4096;

impl TemporariesSeen {
    /// Remember the regular file `name` of the store directory `rel` if it is a temporary.
    pub fn note(&self, rel: &str, name: &[u8], is_file: bool, size: u64, mtime: i64) {
        if !is_file || !is_temporary(name) {
            return;
        }
        let Ok(name) = std::str::from_utf8(name) else {
            return;
        };
        let mut seen = self.0.lock();
        if seen.len() < TEMPORARIES_KEPT {
            seen.push(Temporary {
                path: format!("{rel}/{name}"),
                size,
                mtime,
            });
        }
    }

    /// What was noted, each path once (the last listing's view of it), and forget it.
    pub fn take(&self) -> Vec<Temporary> {
        let mut seen = std::mem::take(&mut *self.0.lock());
        seen.reverse();
        seen.sort_by(|a, b| a.path.cmp(&b.path));
        seen.dedup_by(|a, b| a.path == b.path);
        seen
    }
}

/// Is `path` one that [`TemporariesSeen::note`] makes: a temporary's name in a store
/// directory (`index`, `snapshots`, `condemned`, `packs/xx`)? Checked before removing one.
pub fn temporary_path_ok(path: &str) -> bool {
    let Some((dir, name)) = path.rsplit_once('/') else {
        return false;
    };
    let dir_ok = match dir.strip_prefix("packs/") {
        Some(sub) => {
            sub.len() == 2
                && sub
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        None => FileType::ALL
            .iter()
            .any(|t| *t != FileType::Config && *t != FileType::Pack && t.dir() == dir),
    };
    dir_ok && is_temporary(name.as_bytes())
}

/// [`temporary_path_ok`] as the error a backend's `remove_temporary` refuses a path with.
pub fn check_temporary_path(path: &str) -> Result<()> {
    if temporary_path_ok(path) {
        Ok(())
    } else {
        Err(Error::Other(format!("{path}: not a temporary file's path")))
    }
}

/// Where a store's files are kept.
///
/// Contract: `write` creates the file atomically (readers see nothing or all of it) and never
/// replaces an existing file of different content; writing a name that already exists is
/// accepted as "already done" because file names are content hashes. All methods may be called
/// from many threads at once.
pub trait Backend: Send + Sync {
    /// A human-readable location, e.g. `/srv/backups` or `sftp://host/backups`.
    fn location(&self) -> String;
    /// Is every access a network round trip? Remote stores get a local metadata cache.
    fn is_remote(&self) -> bool {
        false
    }
    /// Range reads worth having in flight at once for one reader streaming a file (`cat`):
    /// [`super::stream::READERS`], or more where each read waits long round trips for no
    /// connection of its own.
    fn ranges_at_once(&self) -> usize {
        super::stream::READERS
    }
    /// Many reads are about to run in parallel: open what they need (connections) now, in
    /// the background, so they do not all wait for it then.
    fn warm_up(&self) {}
    /// Does the store's root directory exist?
    fn root_exists(&self) -> Result<bool>;
    /// Is the root directory empty (or missing)?
    /// Names in the root directory (empty when it is missing).
    fn root_entries(&self) -> Result<Vec<String>>;
    /// Create the root and the per-type directories (0700).
    fn init(&self) -> Result<()>;
    /// Names and sizes of all files of a type. Only names of the shape this type has
    /// ([`FileType::expects`]) are listed; the temporary files of unfinished writes are skipped
    /// silently, anything else with a warning ([`expected_entry`]).
    ///
    /// # Errors
    /// I/O errors; a missing type directory is an empty list.
    fn list(&self, t: FileType) -> Result<Vec<Listed>>;
    /// [`Backend::list`] of each of `types`, in the same order: a remote store lists them
    /// all at once.
    fn list_several(&self, types: &[FileType]) -> Vec<Result<Vec<Listed>>> {
        types.iter().map(|t| self.list(*t)).collect()
    }
    /// The whole file.
    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>>;
    /// `len` bytes from `offset` into `buf` (replacing its content), reusing its memory. Fails
    /// if the file is shorter.
    fn read_range_into(
        &self,
        t: FileType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<()>;
    /// [`Backend::read_range_into`] a new buffer.
    fn read_range(&self, t: FileType, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_range_into(t, name, offset, len, &mut buf)?;
        Ok(buf)
    }
    /// Create a file atomically with this content.
    fn write(&self, t: FileType, name: &str, data: &[u8]) -> Result<()>;
    /// [`Backend::write`] that never makes a missing directory (it fails instead): for a
    /// file written while the store is opened, before it is known to be there. Only a
    /// pack's directory is ever made by [`Backend::write`] here, so the same but for packs.
    fn write_where_there(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        debug_assert!(t != FileType::Pack);
        self.write(t, name, data)
    }
    /// [`Backend::write`] of a file that must appear only if `check` says so: `Ok(false)`,
    /// and nothing written, when it says no. A remote store runs `check` while it sends the
    /// data under a temporary name, so their round trips overlap.
    fn write_if(
        &self,
        t: FileType,
        name: &str,
        data: &[u8],
        check: &mut (dyn FnMut() -> Result<bool> + Send),
    ) -> Result<bool> {
        if !check()? {
            return Ok(false);
        }
        self.write(t, name, data)?;
        Ok(true)
    }
    /// Remove a file; removing a missing file is not an error.
    fn remove(&self, t: FileType, name: &str) -> Result<()>;
    /// The upload temporaries (`.tmp-…` regular files) that listings of this backend came
    /// across since the last call, with their size and modification time; forgotten once
    /// returned. Backends that keep none return nothing.
    fn temporaries_seen(&self) -> Vec<Temporary> {
        Vec::new()
    }
    /// Remove a temporary [`Backend::temporaries_seen`] returned (`path` from the store's
    /// root; one of another shape is refused). Gone already is done.
    fn remove_temporary(&self, path: &str) -> Result<()> {
        Err(Error::Other(format!(
            "{path}: this store cannot remove temporary files"
        )))
    }
}

/// A store in a local directory.
pub struct LocalBackend {
    root: PathBuf,
    temporaries: TemporariesSeen,
}

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend {
            root: root.into(),
            temporaries: TemporariesSeen::default(),
        }
    }

    fn file(&self, t: FileType, name: &str) -> PathBuf {
        self.root.join(t.path(name))
    }
}

/// Write `data` to `path` through a temporary file in the same directory, fsync it, and rename
/// it into place. Used by the local backend and by the local cache.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        super::crypto::random_hex(8)
    ));
    // Removed if the process is interrupted before it is renamed into place.
    let _job = {
        let tmp = tmp.clone();
        super::interrupt::on_interrupt(move || {
            let _ = fs::remove_file(&tmp);
        })
    };
    let res = (|| -> std::io::Result<()> {
        let mut f = super::interrupt::creating(|| {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
        })?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.at(path)
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn root_exists(&self) -> Result<bool> {
        match fs::metadata(&self.root) {
            Ok(m) => Ok(m.is_dir()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io_path(&self.root, e)),
        }
    }

    fn root_entries(&self) -> Result<Vec<String>> {
        match fs::read_dir(&self.root) {
            Ok(d) => Ok(d
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io_path(&self.root, e)),
        }
    }

    fn init(&self) -> Result<()> {
        let mut b = fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b.create(&self.root).at(&self.root)?;
        for t in FileType::ALL {
            if t != FileType::Config {
                let d = self.root.join(t.dir());
                b.create(&d).at(&d)?;
            }
        }
        Ok(())
    }

    fn list(&self, t: FileType) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        if t == FileType::Config {
            if let Ok(m) = fs::metadata(self.root.join("config")) {
                out.push(Listed {
                    name: "config".into(),
                    size: m.len(),
                });
            }
            return Ok(out);
        }
        let dir = self.root.join(t.dir());
        // (directory, its path relative to the store root)
        let mut dirs = vec![(dir.clone(), t.dir().to_string())];
        if t == FileType::Pack {
            dirs.clear();
            match fs::read_dir(&dir) {
                Ok(rd) => {
                    for e in rd {
                        let e = e.at(&dir)?;
                        let is_dir = e.file_type().at(e.path())?.is_dir();
                        if let Some(sub) = expected_pack_dir(e.file_name().as_bytes(), is_dir) {
                            dirs.push((e.path(), format!("packs/{sub}")));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io_path(&dir, e)),
            }
        }
        for (d, rel) in dirs {
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io_path(&d, e)),
            };
            for e in rd {
                let e = e.at(&d)?;
                let raw = e.file_name();
                if is_hidden(raw.as_bytes()) {
                    if is_temporary(raw.as_bytes())
                        && let Ok(m) = e.metadata()
                    {
                        use std::os::unix::fs::MetadataExt;
                        self.temporaries.note(
                            &rel,
                            raw.as_bytes(),
                            m.is_file(),
                            m.len(),
                            m.mtime(),
                        );
                    }
                    continue;
                }
                // Not followed: a symlink is not a store file.
                let m = e.metadata().at(e.path())?;
                if let Some(name) = expected_entry(t, &rel, raw.as_bytes(), m.is_file()) {
                    out.push(Listed {
                        name,
                        size: m.len(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>> {
        use std::io::Read;
        let p = self.file(t, name);
        let f = fs::File::open(&p).at(&p)?;
        let size = f.metadata().at(&p)?.len();
        let too_large = || {
            Error::damaged(
                t.path(name),
                format!(
                    "it is larger than {} MiB, more than any store file",
                    MAX_STORE_FILE >> 20
                ),
            )
        };
        if size > MAX_STORE_FILE {
            return Err(too_large());
        }
        let mut out = Vec::with_capacity(size as usize);
        f.take(MAX_STORE_FILE + 1).read_to_end(&mut out).at(&p)?;
        if out.len() as u64 > MAX_STORE_FILE {
            return Err(too_large());
        }
        Ok(out)
    }

    fn read_range_into(
        &self,
        t: FileType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let p = self.file(t, name);
        let f = fs::File::open(&p).at(&p)?;
        buf.clear();
        buf.resize(len as usize, 0);
        f.read_exact_at(buf, offset).at(&p)
    }

    fn write(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        let p = self.file(t, name);
        let res = (|| {
            if t == FileType::Pack {
                let d = p.parent().expect("pack path has a parent");
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .at(d)?;
            }
            if p.exists() {
                return Ok(());
            }
            write_atomic(&p, data, 0o600)
        })();
        res.map_err(|e| match &e {
            Error::Io { source, .. } if super::error::over_quota(source) => {
                Error::NoSpace(format!(
                    "{}: the disk quota for the store {} is exceeded (disk quota exceeded); free space there or raise the quota, then run the command again",
                    t.path(name),
                    self.root.display(),
                ))
            }
            _ if e.kind() == ErrorKind::NoSpace => Error::NoSpace(format!(
                "{}: the disk of the store {} is full (no space left on device); free space there, then run the command again",
                t.path(name),
                self.root.display(),
            )),
            _ => e,
        })
    }

    fn remove(&self, t: FileType, name: &str) -> Result<()> {
        let p = self.file(t, name);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io_path(&p, e)),
        }
    }

    fn temporaries_seen(&self) -> Vec<Temporary> {
        self.temporaries.take()
    }

    fn remove_temporary(&self, path: &str) -> Result<()> {
        check_temporary_path(path)?;
        let p = self.root.join(path);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io_path(&p, e)),
        }
    }
}

/// A store kept in memory, for unit tests of the engine.
#[derive(Default)]
pub struct MemBackend {
    files: Mutex<BTreeMap<(FileType, String), Vec<u8>>>,
    initialised: Mutex<bool>,
    /// Range reads served (of any file), for tests that count requests.
    range_reads: std::sync::atomic::AtomicU64,
    /// Bytes those range reads asked for.
    range_bytes: std::sync::atomic::AtomicU64,
    /// Pack writes wait while this is `Hold` and fail while it is `Fail` (tests of writers).
    pack_writes: Mutex<PackWrites>,
    pack_writes_changed: parking_lot::Condvar,
}

/// What [`MemBackend`] does with pack writes.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub enum PackWrites {
    #[default]
    Store,
    Hold,
    Fail,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Change a stored file in place (for tamper tests).
    pub fn tamper(&self, t: FileType, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let mut files = self.files.lock();
        if let Some(v) = files.get_mut(&(t, name.to_string())) {
            f(v)
        }
    }

    /// Range reads served so far.
    pub fn range_reads(&self) -> u64 {
        self.range_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Store, hold (wait) or fail the pack writes from now on.
    pub fn pack_writes(&self, w: PackWrites) {
        *self.pack_writes.lock() = w;
        self.pack_writes_changed.notify_all();
    }

    /// Bytes asked for by the range reads served so far.
    pub fn range_bytes(&self) -> u64 {
        self.range_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Backend for MemBackend {
    fn location(&self) -> String {
        "memory".into()
    }
    fn root_exists(&self) -> Result<bool> {
        Ok(*self.initialised.lock())
    }
    fn root_entries(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = self
            .files
            .lock()
            .keys()
            .map(|(t, n)| match t {
                FileType::Config => n.clone(),
                _ => t.dir().to_string(),
            })
            .collect();
        v.dedup();
        Ok(v)
    }
    fn init(&self) -> Result<()> {
        *self.initialised.lock() = true;
        Ok(())
    }
    fn list(&self, t: FileType) -> Result<Vec<Listed>> {
        Ok(self
            .files
            .lock()
            .iter()
            .filter(|((ft, _), _)| *ft == t)
            .map(|((_, n), v)| Listed {
                name: n.clone(),
                size: v.len() as u64,
            })
            .collect())
    }
    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>> {
        self.files
            .lock()
            .get(&(t, name.to_string()))
            .cloned()
            .ok_or_else(|| {
                Error::io(
                    t.path(name),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
            })
    }
    fn read_range_into(
        &self,
        t: FileType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        self.range_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.range_bytes
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        let all = self.read(t, name)?;
        let end = offset.saturating_add(len);
        if end > all.len() as u64 {
            return Err(Error::io(
                t.path(name),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        buf.clear();
        buf.extend_from_slice(&all[offset as usize..end as usize]);
        Ok(())
    }
    fn write(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        if t == FileType::Pack {
            let mut w = self.pack_writes.lock();
            while *w == PackWrites::Hold {
                self.pack_writes_changed.wait(&mut w);
            }
            if *w == PackWrites::Fail {
                return Err(Error::io(
                    t.path(name),
                    std::io::Error::from(std::io::ErrorKind::StorageFull),
                ));
            }
        }
        self.files
            .lock()
            .entry((t, name.to_string()))
            .or_insert_with(|| data.to_vec());
        Ok(())
    }
    fn remove(&self, t: FileType, name: &str) -> Result<()> {
        self.files.lock().remove(&(t, name.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only an upload temporary's name in a store directory can be removed as one; what the
    /// listings note is a temporary's, each path once.
    #[test]
    fn temporaries_are_told_by_name_and_place() {
        for ok in [
            "packs/ab/.tmp-0123456789abcdef",
            "index/.tmp-42-00aa",
            "snapshots/.tmp-1",
            "condemned/.tmp-1",
            "locks/.tmp-1",
        ] {
            assert!(temporary_path_ok(ok), "{ok}");
        }
        for bad in [
            "packs/ab/0123",
            "packs/zz/.tmp-1",
            "packs/.tmp-1",
            "../index/.tmp-1",
            "index/../../etc/.tmp-1",
            ".tmp-1",
            "config/.tmp-1",
            "index/.tmpfoo",
            "index/.hidden",
        ] {
            assert!(!temporary_path_ok(bad), "{bad}");
        }
        let seen = TemporariesSeen::default();
        seen.note("index", b".tmp-1", true, 5, 10);
        seen.note("index", b".tmp-1", true, 7, 20);
        seen.note("index", b".tmp-2", false, 5, 10);
        seen.note("index", b".other", true, 5, 10);
        seen.note("packs/ab", b".tmp-3", true, 1, 1);
        assert_eq!(
            seen.take(),
            vec![
                Temporary {
                    path: "index/.tmp-1".into(),
                    size: 7,
                    mtime: 20
                },
                Temporary {
                    path: "packs/ab/.tmp-3".into(),
                    size: 1,
                    mtime: 1
                },
            ]
        );
        assert!(seen.take().is_empty());
    }

    #[test]
    fn names_of_each_type_have_one_shape() {
        let h64 = "0123456789abcdef".repeat(4);
        let h32 = "0123456789abcdef".repeat(2);
        for t in [FileType::Pack, FileType::Index, FileType::Snapshot] {
            assert!(t.expects(&h64));
            assert!(!t.expects(&h32));
            assert!(!t.expects(&h64.to_uppercase()));
            assert!(!t.expects(&format!("{}ü", &h64[..62])));
        }
        for t in [FileType::Key, FileType::Lock] {
            assert!(t.expects(&h32));
            assert!(!t.expects(&h64));
            assert!(!t.expects("x"));
        }
        assert!(FileType::Config.expects("config"));
        // No name makes a path panic.
        for n in ["", "ü", "xü", "\u{fffd}", "a"] {
            let _ = FileType::Pack.path(n);
        }
    }

    #[test]
    fn listing_entries_are_sorted_out() {
        let h64 = "ab".repeat(32);
        assert_eq!(
            expected_entry(FileType::Pack, "packs/ab", h64.as_bytes(), true),
            Some(h64.clone())
        );
        // In the wrong directory, not a file, not UTF-8, a temporary file.
        assert_eq!(
            expected_entry(FileType::Pack, "packs/d0", h64.as_bytes(), true),
            None
        );
        assert_eq!(
            expected_entry(FileType::Pack, "packs/ab", h64.as_bytes(), false),
            None
        );
        assert_eq!(
            expected_entry(FileType::Index, "index", b"\xff\xfe", true),
            None
        );
        assert_eq!(
            expected_entry(FileType::Index, "index", b".tmp-1-00", true),
            None
        );
        assert_eq!(expected_pack_dir(b"d0", true), Some("d0".into()));
        for (name, is_dir) in [
            (&b"d0"[..], false),
            (b"zz", true),
            (b"d", true),
            (b"\xff\xfe", true),
        ] {
            assert_eq!(expected_pack_dir(name, is_dir), None);
        }
        let warned = super::super::notice::warnings();
        assert!(
            warned
                .iter()
                .any(|w| w == "ignoring unexpected file index/\\377\\376 in the store"),
            "{warned:?}"
        );
        assert!(!warned.iter().any(|w| w.contains(".tmp-")), "{warned:?}");
    }

    #[test]
    fn a_local_store_file_larger_than_any_store_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.init().unwrap();
        let f = fs::File::create(dir.path().join("index").join("ab".repeat(32))).unwrap();
        f.set_len(MAX_STORE_FILE + 1).unwrap();
        let e = b.read(FileType::Index, &"ab".repeat(32)).unwrap_err();
        assert_eq!(e.kind(), super::super::ErrorKind::Damaged, "{e}");
    }
}
