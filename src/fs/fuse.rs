//! The thin `fuser` adapter over [`SnapshotFs`]: translate each call, reply, nothing else.
//!
//! Snapshot contents never change, so entries and attributes get long TTLs, opened files keep
//! the kernel's page cache (`FOPEN_KEEP_CACHE`), and readahead is large. The mount is read-only
//! (`MountOption::RO`): the kernel refuses writes with EROFS before they reach us.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use super::{Attr, SnapshotFs};
use crate::store::tree::NodeKind;

pub struct Fuse {
    pub fs: Arc<SnapshotFs>,
    /// The kernel accepted FUSE_NO_OPEN_SUPPORT: files are opened without a request.
    pub no_open: bool,
}

impl Fuse {
    pub fn new(fs: Arc<SnapshotFs>) -> Fuse {
        Fuse { fs, no_open: false }
    }
}

fn kind(k: NodeKind) -> FileType {
    match k {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
        NodeKind::Socket => FileType::Socket,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: kind(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: &super::Error) -> Errno {
    Errno::from_i32(e.errno())
}

/// Largest readahead we ask the kernel for, so a cold sequential read asks for big ranges. The
/// kernel caps it at what it offers in INIT (the FUSE device's readahead, 128 KiB by default:
/// on Linux 6.18 a sequential `cat` then arrives as 256 KiB reads); the chunk prefetcher
/// follows sequential readers either way.
const MAX_READAHEAD: u32 = 4 << 20;

impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Refused above what the kernel offered, which then stays.
        let _ = config.set_max_readahead(MAX_READAHEAD);
        // READDIRPLUS: a listing carries every entry's attributes, so `ls -l`, `tar` or `cp -r`
        // need no LOOKUP round trip per file. Always, not READDIRPLUS_AUTO (plus for a
        // directory's first page only, unless its entries are looked at in between): with it,
        // `find` over a million entries took 1.2 s instead of 4.1-5.1 s (the kernel makes no
        // inode per entry), but `tar` of share/man 1.40-1.59 s instead of 1.14-1.37 s (tar
        // reads a whole directory before it stats any entry: one LOOKUP per file).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        // No OPEN/RELEASE round trips: answering the first OPEN with ENOSYS makes the kernel
        // open files by itself from then on, with FOPEN_KEEP_CACHE (snapshots never change).
        self.no_open = config
            .add_capabilities(fuser::InitFlags::FUSE_NO_OPEN_SUPPORT)
            .is_ok();
        Ok(())
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let (parent, entries) = match self.fs.readdir(ino.0) {
            Ok(x) => x,
            Err(e) => {
                reply.error(errno(&e));
                return;
            }
        };
        let dots = [(ino.0, OsStr::new(".")), (parent, OsStr::new(".."))];
        let all = dots
            .into_iter()
            .chain(entries.iter().map(|e| (e.ino, OsStr::from_bytes(e.name))));
        for (i, (ino, name)) in all.enumerate().skip(offset as usize) {
            let Ok(a) = self.fs.getattr(ino) else {
                continue;
            };
            if reply.add(
                INodeNo(ino),
                (i + 1) as u64,
                name,
                &self.fs.ttl(ino),
                &attr(&a),
                Generation(0),
            ) {
                break;
            }
            // The kernel counts an entry of readdirplus as a lookup, but for `.` and `..`.
            if i >= 2 {
                self.fs.remembered(ino, a.kind);
            }
        }
        reply.ok();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(a) => {
                self.fs.remembered(a.ino, a.kind);
                reply.entry(&self.fs.ttl(a.ino), &attr(&a), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.fs.ttl(ino.0), &attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        if self.no_open {
            match self.fs.openable(ino.0) {
                Ok(()) => reply.error(Errno::ENOSYS),
                Err(e) => reply.error(errno(&e)),
            }
            return;
        }
        match self.fs.open(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Handles start at 1: 0 is a file the kernel opened by itself ("no open").
        let r = if fh.0 == 0 {
            self.fs.read_ino(ino.0, offset, size)
        } else {
            self.fs.read(fh.0, offset, size)
        };
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (parent, entries) = match self.fs.readdir(ino.0) {
            Ok(x) => x,
            Err(e) => {
                reply.error(errno(&e));
                return;
            }
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (parent, FileType::Directory, OsStr::new("..")),
        ];
        let all = dots.into_iter().chain(
            entries
                .iter()
                .map(|e| (e.ino, kind(e.kind), OsStr::from_bytes(e.name))),
        );
        for (i, (ino, k, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, k, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = self.fs.statfs();
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(
        &self,
        _req: &Request,
        _ino: INodeNo,
        mask: fuser::AccessFlags,
        reply: fuser::ReplyEmpty,
    ) {
        if mask.bits() & libc::W_OK != 0 {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }
}

fn xattr_reply(reply: ReplyXattr, v: &[u8], size: u32) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() <= size as usize {
        reply.data(v);
    } else {
        reply.error(Errno::ERANGE);
    }
}

/// Entry and attribute TTL for snapshot contents.
pub const LONG_TTL: Duration = Duration::from_secs(86_400);
