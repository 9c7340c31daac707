//! The source connector: a tree to back up.
//!
//! A [`Source`] answers "what is at this path" ([`Source::stat`]), "what is in this directory"
//! ([`Source::read_dir`], entries with their metadata; extended attributes on request through
//! [`Source::load_xattrs`]) and "give me this file's bytes" ([`Source::open`]). Paths are
//! absolute raw bytes. [`LocalSource`] reads the local filesystem with `lstat`, never following
//! symlinks; the SFTP source lives in `crate::sftp`.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::error::{Error, IoContext, Result};
use super::tree::{Node, NodeKind, Time, Xattr};

pub trait Source: Send + Sync {
    /// What the user named, as recorded in the snapshot (`/var/www`, `sftp://host/srv`).
    fn describe(&self) -> String;
    /// The absolute path of the tree to back up.
    fn root(&self) -> Vec<u8>;
    /// Does the source report inode numbers and ctimes (so they can be compared with the parent
    /// snapshot)? Sources that do not are compared on size and mtime only.
    fn has_inodes(&self) -> bool;
    /// Metadata of one path, not following a final symlink. The node's name is the last
    /// component of `path`.
    fn stat(&self, path: &[u8]) -> Result<Node>;
    /// The entries of a directory with their metadata, in any order. Extended attributes may
    /// be left unread: the walk reuses the parent snapshot's for entries whose ctime and inode
    /// have not moved (every change to an attribute moves the ctime) and asks
    /// [`Source::load_xattrs`] for the others.
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>>;
    /// Read the extended attributes of `path` into `node` (replacing what it has). Best effort,
    /// like the rest of the attribute reading: a filesystem without them leaves `node` without.
    /// Sources whose `read_dir` already fills them in keep this default, which does nothing.
    fn load_xattrs(&self, _path: &[u8], _node: &mut Node) {}
    /// The contents of a regular file; `size` is its size as the walk saw it (a remote source
    /// reads no more than that, so it requests nothing past the end).
    fn open(&self, path: &[u8], size: u64) -> Result<Box<dyn Read + Send>>;
    /// Start reading the first `len` bytes of a file that [`Source::open`] will be asked for
    /// soon, without waiting for them. Only a hint: sources without a cheap way to do it, and
    /// any error, do nothing.
    fn prefetch(&self, _path: &[u8], _len: u64) {}
}

pub fn os(path: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(path))
}

/// The local filesystem.
pub struct LocalSource {
    root: Vec<u8>,
}

impl LocalSource {
    /// A source rooted at `path`, made absolute against the current directory.
    pub fn new(path: &Path) -> Result<LocalSource> {
        let abs = std::path::absolute(path).at(path)?;
        // Normalise `.` and `..` lexically, like `realpath -s`.
        let mut out: Vec<&[u8]> = Vec::new();
        for c in abs.as_os_str().as_bytes().split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        let mut root = Vec::new();
        for c in out {
            root.push(b'/');
            root.extend_from_slice(c);
        }
        if root.is_empty() {
            root.push(b'/');
        }
        Ok(LocalSource { root })
    }
}

fn time(sec: i64, nsec: i64) -> Time {
    Time {
        sec,
        nsec: nsec as u32,
    }
}

thread_local! {
    static NAMES: std::cell::RefCell<(std::collections::HashMap<u32, String>, std::collections::HashMap<u32, String>)> =
        Default::default();
}

/// The user name of a uid (cached per thread).
pub fn user_name(uid: u32) -> String {
    NAMES.with(|n| {
        n.borrow_mut()
            .0
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_default()
            })
            .clone()
    })
}

/// The group name of a gid (cached per thread).
pub fn group_name(gid: u32) -> String {
    NAMES.with(|n| {
        n.borrow_mut()
            .1
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
                    .unwrap_or_default()
            })
            .clone()
    })
}

/// Metadata of a local path as a node (lstat, symlink target, xattrs).
pub fn local_node(path: &Path, name: Vec<u8>) -> Result<Node> {
    let mut n = local_node_bare(path, name)?;
    read_xattrs(path, &mut n);
    Ok(n)
}

/// [`local_node`] without the extended attributes (one `listxattr` per path saved: 15% of an
/// unchanged backup's CPU).
fn local_node_bare(path: &Path, name: Vec<u8>) -> Result<Node> {
    node_of(path, name, fs::symlink_metadata(path).at(path)?)
}

/// The node for `path`, named `name`, from its `lstat` metadata `m` (without attributes).
fn node_of(path: &Path, name: Vec<u8>, m: fs::Metadata) -> Result<Node> {
    let kind = NodeKind::from_mode(m.mode())
        .ok_or_else(|| Error::Other(format!("{}: unknown file type", path.display())))?;
    let mut n = Node::new(name, kind);
    n.mode = m.mode() & 0o7777;
    n.uid = m.uid();
    n.gid = m.gid();
    n.user = user_name(n.uid);
    n.group = group_name(n.gid);
    n.mtime = time(m.mtime(), m.mtime_nsec());
    n.ctime = time(m.ctime(), m.ctime_nsec());
    n.dev = m.dev();
    n.inode = m.ino();
    n.nlink = m.nlink();
    n.rdev = m.rdev();
    n.blocks = m.blocks();
    n.size = if kind == NodeKind::Dir { 0 } else { m.size() };
    if kind == NodeKind::Symlink {
        n.target = fs::read_link(path).at(path)?.into_os_string().into_vec();
        n.size = n.target.len() as u64;
    }
    Ok(n)
}

/// Extended attributes of a local path into `n`: a filesystem without them is not an error.
fn read_xattrs(path: &Path, n: &mut Node) {
    n.xattrs.clear();
    if (n.kind != NodeKind::Symlink || cfg!(target_os = "linux"))
        && let Ok(names) = xattr::list(path)
    {
        for name in names {
            if let Ok(Some(value)) = xattr::get(path, &name) {
                n.xattrs.push(Xattr {
                    name: name.into_vec(),
                    value,
                });
            }
        }
        n.xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

use std::os::unix::ffi::OsStringExt;

/// Open a file that the walk saw as a regular file, for reading. If it has since been replaced
/// by something else, fail instead of blocking (opening a fifo waits for a writer) or following
/// it (a symlink).
fn open_regular(p: &Path) -> std::io::Result<fs::File> {
    let f = open_nonblocking(p)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is no longer a regular file (it changed during the backup)",
        ));
    }
    // Back to blocking reads, whatever the filesystem makes of O_NONBLOCK on a file.
    rustix::fs::fcntl_setfl(&f, rustix::fs::OFlags::empty())?;
    Ok(f)
}

/// Open `p` for reading without waiting (a fifo) and without following a symlink.
fn open_nonblocking(p: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(p)
}

impl Source for LocalSource {
    fn describe(&self) -> String {
        String::from_utf8_lossy(&self.root).into_owned()
    }
    fn root(&self) -> Vec<u8> {
        self.root.clone()
    }
    fn has_inodes(&self) -> bool {
        true
    }
    fn stat(&self, path: &[u8]) -> Result<Node> {
        let name = path
            .rsplit(|&b| b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b"/")
            .to_vec();
        local_node(os(path), name)
    }
    fn read_dir(&self, path: &[u8]) -> Result<Vec<Node>> {
        let p = os(path);
        let mut entries = fs::read_dir(p)
            .at(p)?
            .collect::<std::io::Result<Vec<_>>>()
            .at(p)?;
        // Inodes are read in inode-number order: neighbours share inode-table blocks, so a
        // cold cache reads them in runs rather than in the directory's hash order (cold
        // unchanged backup of /usr/share, alternating runs: median 0.95 -> 0.90 s).
        entries.sort_unstable_by_key(std::os::unix::fs::DirEntryExt::ino);
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let name = e.file_name().into_vec();
            let full = super::tree::join(path, &name);
            // `DirEntry::metadata` is an `lstat` relative to the open directory: the kernel
            // looks up one name instead of walking the whole path again.
            match e
                .metadata()
                .at(os(&full))
                .and_then(|m| node_of(os(&full), name, m))
            {
                Ok(n) => out.push(n),
                // Vanished between readdir and lstat: it is simply not in the snapshot.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    fn load_xattrs(&self, path: &[u8], node: &mut Node) {
        read_xattrs(os(path), node);
    }
    fn open(&self, path: &[u8], _size: u64) -> Result<Box<dyn Read + Send>> {
        let p = os(path);
        Ok(Box::new(open_regular(p).at(p)?))
    }
    /// `posix_fadvise(WILLNEED)`: the kernel queues the reads and returns (on anything but a
    /// regular file it fails, which is as good as nothing).
    fn prefetch(&self, path: &[u8], len: u64) {
        if let (Ok(f), Some(len)) = (open_nonblocking(os(path)), std::num::NonZeroU64::new(len)) {
            let _ = rustix::fs::fadvise(&f, 0, Some(len), rustix::fs::Advice::WillNeed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_replaced_by_a_fifo_or_a_symlink_is_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let src = LocalSource::new(t.path()).unwrap();
        let path = |name: &str| t.path().join(name).as_os_str().as_bytes().to_vec();
        std::fs::write(t.path().join("file"), b"data").unwrap();
        let mut got = Vec::new();
        src.open(&path("file"), 4)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, b"data");

        // What the walk saw as files, replaced since: open must fail at once.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink(t.path().join("file"), t.path().join("link")).unwrap();
        for name in ["fifo", "link"] {
            let e = src.open(&path(name), 4).err().expect(name);
            assert!(e.to_string().contains(name), "{e}");
            // A hint only: returns, does nothing.
            src.prefetch(&path(name), 4);
        }
    }
}
