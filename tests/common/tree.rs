//! Build file trees on disk from a description, and compare two trees entry by entry.
//!
//! [`TreeSpec::materialize`] creates every kind of entry kloset must carry (hostile names,
//! hard links, sparse and multi-chunk files, fifos, sockets, devices, odd modes, owners,
//! nanosecond mtimes, xattrs); [`scan`] reads a tree back with `lstat` and [`diff`] lists every
//! difference between two scans, so a round-trip test reports all of them at once.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
/// `cp -a from to`: a copy of a directory (a store's directory on the loopback server is a local
/// one), with modes and times.
pub fn copy_all(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Does the filesystem of `dir` accept `user.*` extended attributes?
pub fn xattrs_supported(dir: &Path) -> bool {
    let p = dir.join(".xattr-probe");
    let ok = fs::write(&p, b"").is_ok() && xattr::set(&p, "user.kloset.probe", b"1").is_ok();
    let _ = fs::remove_file(&p);
    ok
}

/// Deterministic bytes: 64 KiB blocks alternating (by `seed`) between pseudo-random data and
/// compressible text, so both the raw and the zstd paths of the store see them.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = (seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    let mut block = 0u32;
    while out.len() < len {
        let compressible = (seed.rotate_left(block) & 1) == 0 && !block.is_multiple_of(3);
        let end = (out.len() + (64 << 10)).min(len);
        if compressible {
            let line = format!("block {block} of seed {seed:x}: some text that compresses\n");
            while out.len() < end {
                let n = (end - out.len()).min(line.len());
                out.extend_from_slice(&line.as_bytes()[..n]);
            }
        } else {
            while out.len() < end {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.extend_from_slice(&x.to_le_bytes());
            }
            out.truncate(end);
        }
        block += 1;
    }
    out
}

/// Set the mtime (and atime) of `p` without following a final symlink.
pub fn set_mtime(p: &Path, sec: i64, nsec: u32) {
    let ts = TimeSpec::new(sec as _, nsec as _);
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// Join raw name bytes to a path.
pub fn child(dir: &Path, name: &[u8]) -> PathBuf {
    dir.join(OsStr::from_bytes(name))
}

/// Make every directory under `root` writable again (for non-root test runs, so that a
/// `TempDir` holding 0500 directories can be removed).
pub fn make_removable(root: &Path) {
    let Ok(m) = fs::symlink_metadata(root) else {
        return;
    };
    if m.is_dir() {
        let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o700));
        if let Ok(rd) = fs::read_dir(root) {
            for e in rd.flatten() {
                make_removable(&e.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tree descriptions

#[derive(Debug, Clone)]
pub enum Content {
    Bytes(Vec<u8>),
    /// [`pseudo_random`] bytes.
    Random {
        seed: u64,
        len: usize,
    },
    /// A file of `len` bytes that is all holes except these writes.
    Sparse {
        len: u64,
        writes: Vec<(u64, Vec<u8>)>,
    },
}

#[derive(Debug, Clone)]
pub struct Meta {
    /// Permission bits (`& 0o7777`); ignored for symlinks.
    pub mode: u32,
    pub mtime: (i64, u32),
    /// uid, gid: applied only when running as root.
    pub owner: (u32, u32),
    /// `user.<name>` attributes; applied to files and directories only.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub enum Spec {
    File {
        name: Vec<u8>,
        content: Content,
        meta: Meta,
    },
    Dir {
        name: Vec<u8>,
        meta: Meta,
        children: Vec<Spec>,
    },
    Symlink {
        name: Vec<u8>,
        target: Vec<u8>,
        meta: Meta,
    },
    Fifo {
        name: Vec<u8>,
        meta: Meta,
    },
}

impl Spec {
    fn name(&self) -> &[u8] {
        match self {
            Spec::File { name, .. }
            | Spec::Dir { name, .. }
            | Spec::Symlink { name, .. }
            | Spec::Fifo { name, .. } => name,
        }
    }
}

/// A whole tree: `entries` at the root, `extras` placed into the n-th directory created
/// (modulo; 0 is the root), and hard links `(n-th regular file, n-th directory, name)`.
#[derive(Debug, Clone, Default)]
pub struct TreeSpec {
    pub entries: Vec<Spec>,
    pub extras: Vec<(usize, Spec)>,
    pub links: Vec<(usize, usize, Vec<u8>)>,
    /// Also create a socket and (when permitted) a character device at the root.
    pub specials: bool,
}

#[derive(Default)]
struct Built {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    /// Entries other than directories, with the metadata to apply.
    leaves: Vec<(PathBuf, Meta, bool)>,
    /// Directories (pre-order) with their metadata.
    dir_meta: Vec<(PathBuf, Meta)>,
}

impl TreeSpec {
    /// Create the tree under `root` (an existing, empty directory). Names that already exist
    /// in their directory are skipped. Metadata is applied last, directories deepest first,
    /// so the mtimes set are the mtimes on disk.
    pub fn materialize(&self, root: &Path, with_xattrs: bool) {
        let mut b = Built {
            dirs: vec![root.to_path_buf()],
            ..Built::default()
        };
        for s in &self.entries {
            create(root, s, &mut b);
        }
        for (i, s) in &self.extras {
            let dir = b.dirs[i % b.dirs.len()].clone();
            create(&dir, s, &mut b);
        }
        if !b.files.is_empty() {
            for (f, d, name) in &self.links {
                let file = &b.files[f % b.files.len()];
                let p = child(&b.dirs[d % b.dirs.len()], name);
                if fs::symlink_metadata(&p).is_err() {
                    fs::hard_link(file, &p).unwrap_or_else(|e| panic!("link {}: {e}", p.display()));
                }
            }
        }
        if self.specials {
            let sock = root.join("\x01sock");
            if fs::symlink_metadata(&sock).is_err() {
                // The listener is dropped at once: the socket file stays.
                drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind a socket"));
                b.leaves.push((sock, default_meta(0o755), false));
            }
            let dev = root.join("\x01chr");
            let null = fs::metadata("/dev/null").map(|m| m.rdev()).unwrap_or(0);
            if fs::symlink_metadata(&dev).is_err()
                && null != 0
                && nix::sys::stat::mknod(
                    &dev,
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(0o600),
                    null,
                )
                .is_ok()
            {
                b.leaves.push((dev, default_meta(0o640), false));
            }
        }
        let root_user = is_root();
        for (p, meta, is_link) in &b.leaves {
            apply(p, meta, *is_link, root_user, with_xattrs, false);
        }
        for (p, meta) in b.dir_meta.iter().rev() {
            apply(p, meta, false, root_user, with_xattrs, true);
        }
    }
}

fn default_meta(mode: u32) -> Meta {
    Meta {
        mode,
        mtime: (1_600_000_000, 123_456_789),
        owner: (0, 0),
        xattrs: Vec::new(),
    }
}

fn create(dir: &Path, s: &Spec, b: &mut Built) {
    let p = child(dir, s.name());
    if fs::symlink_metadata(&p).is_ok() {
        return;
    }
    let fail = |e: std::io::Error| -> ! { panic!("create {}: {e}", p.display()) };
    match s {
        Spec::File { content, meta, .. } => {
            match content {
                Content::Bytes(v) => fs::write(&p, v).unwrap_or_else(|e| fail(e)),
                Content::Random { seed, len } => {
                    fs::write(&p, pseudo_random(*seed, *len)).unwrap_or_else(|e| fail(e))
                }
                Content::Sparse { len, writes } => {
                    let mut f = fs::File::create(&p).unwrap_or_else(|e| fail(e));
                    for (off, data) in writes {
                        let off = off % len.saturating_sub(data.len() as u64).max(1);
                        f.write_all_at(data, off).unwrap_or_else(|e| fail(e));
                    }
                    f.set_len(*len).unwrap_or_else(|e| fail(e));
                    f.flush().unwrap_or_else(|e| fail(e));
                }
            }
            b.files.push(p.clone());
            b.leaves.push((p, meta.clone(), false));
        }
        Spec::Dir { meta, children, .. } => {
            fs::create_dir(&p).unwrap_or_else(|e| fail(e));
            b.dirs.push(p.clone());
            b.dir_meta.push((p.clone(), meta.clone()));
            for c in children {
                create(&p, c, b);
            }
        }
        Spec::Symlink { target, meta, .. } => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), &p).unwrap_or_else(|e| fail(e));
            b.leaves.push((p, meta.clone(), true));
        }
        Spec::Fifo { meta, .. } => {
            nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o644))
                .unwrap_or_else(|e| fail(e.into()));
            b.leaves.push((p, meta.clone(), false));
        }
    }
}

/// Owner, xattrs, mode, mtime, in the order that keeps setuid bits (chown clears them).
fn apply(p: &Path, meta: &Meta, is_link: bool, root_user: bool, xattrs: bool, is_dir: bool) {
    if root_user {
        std::os::unix::fs::lchown(p, Some(meta.owner.0), Some(meta.owner.1))
            .unwrap_or_else(|e| panic!("lchown {}: {e}", p.display()));
    }
    let is_file = fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
    if xattrs && (is_file || is_dir) {
        for (name, value) in &meta.xattrs {
            let mut n = b"user.".to_vec();
            n.extend_from_slice(name);
            xattr::set(p, OsStr::from_bytes(&n), value)
                .unwrap_or_else(|e| panic!("setxattr {}: {e}", p.display()));
        }
    }
    if !is_link {
        let mut mode = meta.mode & 0o7777;
        if !root_user {
            // Without CAP_DAC_OVERRIDE the backup could not read the tree otherwise.
            mode |= if is_dir { 0o700 } else { 0o600 };
        }
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
    }
    set_mtime(p, meta.mtime.0, meta.mtime.1);
}

// ---------------------------------------------------------------------------------------------
// Scanning and comparing

/// One entry of a scanned tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEntry {
    /// `ls -l` type letter.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub target: Option<Vec<u8>>,
    /// BLAKE3 of a regular file's content.
    pub hash: Option<[u8; 32]>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub rdev: u64,
    pub dev_ino: (u64, u64),
    pub nlink: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
}

/// Entries by path relative to the scanned root (the root itself is `""`).
pub type FsTree = BTreeMap<Vec<u8>, FsEntry>;

pub fn scan(root: &Path) -> FsTree {
    let mut out = BTreeMap::new();
    scan_into(root, Vec::new(), &mut out);
    out
}

fn scan_into(p: &Path, rel: Vec<u8>, out: &mut FsTree) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        '-'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else if ft.is_char_device() {
        'c'
    } else {
        'b'
    };
    let mut xattrs = BTreeMap::new();
    if let Ok(names) = xattr::list(p) {
        for n in names {
            if let Ok(Some(v)) = xattr::get(p, &n) {
                xattrs.insert(n.as_bytes().to_vec(), v);
            }
        }
    }
    let e = FsEntry {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: if kind == 'd' { 0 } else { m.size() },
        mtime: (m.mtime(), m.mtime_nsec()),
        target: (kind == 'l').then(|| {
            fs::read_link(p)
                .expect("readlink")
                .as_os_str()
                .as_bytes()
                .to_vec()
        }),
        hash: (kind == '-').then(|| {
            let data = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            *blake3::hash(&data).as_bytes()
        }),
        xattrs,
        rdev: m.rdev(),
        dev_ino: (m.dev(), m.ino()),
        nlink: m.nlink(),
        blocks: m.blocks(),
    };
    out.insert(rel.clone(), e);
    if kind == 'd' {
        let mut names: Vec<Vec<u8>> = fs::read_dir(p)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
            .map(|e| e.expect("readdir entry").file_name().as_bytes().to_vec())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() {
                n.clone()
            } else {
                [&rel[..], b"/", &n[..]].concat()
            };
            scan_into(&child(p, &n), r, out);
        }
    }
}

pub fn show(p: &[u8]) -> String {
    if p.is_empty() {
        "<root>".into()
    } else {
        p.escape_ascii().to_string()
    }
}

fn show_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let items: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{}={}", k.escape_ascii(), v.escape_ascii()))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Groups of paths that are hard links to one inode (regular files with `nlink > 1`).
pub fn link_groups(t: &FsTree) -> BTreeSet<Vec<Vec<u8>>> {
    let mut by_inode: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    for (p, e) in t {
        if e.kind == '-' && e.nlink > 1 {
            by_inode.entry(e.dev_ino).or_default().push(p.clone());
        }
    }
    by_inode
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect()
}

/// Every difference between a source tree and its restored copy: entries missing or extra,
/// kind, mode, owner, size, content, mtime (ns), symlink target, xattrs, device numbers and
/// hard-link groups. The root entry is skipped.
pub fn diff(src: &FsTree, dst: &FsTree) -> Vec<String> {
    let mut out = Vec::new();
    for (p, a) in src {
        if p.is_empty() {
            continue;
        }
        let Some(b) = dst.get(p) else {
            out.push(format!("{}: missing from the restored tree", show(p)));
            continue;
        };
        let mut d = |what: &str, x: String, y: String| {
            out.push(format!("{}: {what} {x} != restored {y}", show(p)));
        };
        if a.kind != b.kind {
            d("kind", a.kind.to_string(), b.kind.to_string());
            continue;
        }
        if a.mode != b.mode {
            d("mode", format!("{:o}", a.mode), format!("{:o}", b.mode));
        }
        if (a.uid, a.gid) != (b.uid, b.gid) {
            d(
                "owner",
                format!("{}:{}", a.uid, a.gid),
                format!("{}:{}", b.uid, b.gid),
            );
        }
        if a.size != b.size {
            d("size", a.size.to_string(), b.size.to_string());
        }
        if a.hash != b.hash {
            d("content", "(source)".into(), "(differs)".into());
        }
        if a.mtime != b.mtime {
            d(
                "mtime",
                format!("{}.{:09}", a.mtime.0, a.mtime.1),
                format!("{}.{:09}", b.mtime.0, b.mtime.1),
            );
        }
        if a.target != b.target {
            d(
                "target",
                show(a.target.as_deref().unwrap_or_default()),
                show(b.target.as_deref().unwrap_or_default()),
            );
        }
        if a.xattrs != b.xattrs {
            d("xattrs", show_xattrs(&a.xattrs), show_xattrs(&b.xattrs));
        }
        if matches!(a.kind, 'c' | 'b') && a.rdev != b.rdev {
            d("rdev", a.rdev.to_string(), b.rdev.to_string());
        }
    }
    for p in dst.keys() {
        if !p.is_empty() && !src.contains_key(p) {
            out.push(format!("{}: not in the source tree", show(p)));
        }
    }
    let (ga, gb) = (link_groups(src), link_groups(dst));
    if ga != gb {
        let f = |g: &BTreeSet<Vec<Vec<u8>>>| {
            g.iter()
                .map(|g| g.iter().map(|p| show(p)).collect::<Vec<_>>().join(" = "))
                .collect::<Vec<_>>()
        };
        out.push(format!(
            "hard-link groups differ: source {:?}, restored {:?}",
            f(&ga),
            f(&gb)
        ));
    }
    out
}

/// Sparse source files (at least 1 MiB, at most a quarter allocated) whose restored copy is
/// not sparse (allocates more than the source plus `slack` bytes).
pub fn lost_sparseness(src: &FsTree, dst: &FsTree, slack: u64) -> Vec<String> {
    let mut out = Vec::new();
    for (p, a) in src {
        if a.kind != '-' || a.size < (1 << 20) || a.blocks * 512 > a.size / 4 {
            continue;
        }
        if let Some(b) = dst.get(p)
            && b.blocks * 512 > a.blocks * 512 + slack
        {
            out.push(format!(
                "{}: sparse file of {} bytes with {} allocated was restored with {} allocated",
                show(p),
                a.size,
                a.blocks * 512,
                b.blocks * 512
            ));
        }
    }
    out
}

/// Is any file of `t` sparse in the sense of [`lost_sparseness`]?
pub fn has_sparse_file(t: &FsTree) -> bool {
    t.values()
        .any(|a| a.kind == '-' && a.size >= (1 << 20) && a.blocks * 512 <= a.size / 4)
}
