//! Archives: a snapshot, or a path in it, as one tar, tar.gz, tar.zst or zip stream.
//!
//! Data flow, with bounded memory whatever the size of the snapshot: a walker thread goes
//! through the trees depth-first (one tree per directory level in memory, as a restore's walk
//! holds them) and sends each entry, then each of a file's chunks, down one channel in archive
//! order; a few reader threads fetch those chunks from the store ahead of the writer, and the
//! writer (the calling thread) turns entries into archive headers and copies the chunks out as
//! they arrive. What is fetched but not yet written is bounded ([`MAX_AHEAD_BYTES`],
//! [`MAX_AHEAD_BLOBS`]), so a huge file streams through a small window.
//!
//! Entry names are the relative paths a restore would write (the whole snapshot gives the
//! backed-up directory's *contents*; `SNAP:PATH` gives that entry under its own name), built
//! only from names that passed [`name_problem`]: never absolute, never `..`. A tar archive is
//! POSIX pax (GNU tar and bsdtar read it): ustar headers, and pax records for what ustar cannot
//! hold (nanosecond mtimes, long or non-fitting names and link targets, large ids and sizes,
//! owner names, xattrs as `SCHILY.xattr.NAME`); a second path of a hard link is a tar hard-link
//! entry to the first; sparse files are written as plain data; sockets (which tar cannot
//! hold) are left out and reported. A zip archive (Info-ZIP conventions: Unix modes, the
//! extended timestamp and the Unix uid/gid extra fields) holds directories, files and
//! symlinks; hard links become copies, xattrs are dropped, and fifos, devices, sockets and
//! names that are not UTF-8 are left out and reported.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use parking_lot::{Condvar, Mutex};

use super::crypto::BlobId;
use super::dirfd::MAX_DEPTH;
use super::error::{Error, Result};
use super::repo::{SnapshotEntry, Store};
use super::tree::{Node, NodeKind, Tree, join, name_problem};

/// The archive formats `archive` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tar,
    TarGz,
    TarZst,
    Zip,
}

impl Format {
    /// The name on the command line (`tar`, `tar.gz`, `tar.zst`, `zip`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::TarGz => "tar.gz",
            Format::TarZst => "tar.zst",
            Format::Zip => "zip",
        }
    }
}

/// What an archive holds, and what it had to leave out.
#[derive(Debug, Default)]
pub struct ArchiveReport {
    pub files: u64,
    pub dirs: u64,
    /// Symlinks, hard-link entries, fifos and devices.
    pub others: u64,
    /// Bytes of file content written (before compression).
    pub bytes: u64,
    /// Entries left out of the archive, each with the reason.
    pub skipped: Vec<(Vec<u8>, String)>,
    /// Entries whose xattrs the format cannot hold (zip).
    pub xattrs_dropped: u64,
}

/// Chunks read ahead of the writer, at most: enough to keep the reader threads busy on
/// small files and a few 1 MiB chunks of a big one in flight, little enough that an archive
/// of any size runs in a small, fixed amount of memory (chunks are at most 8 MiB).
pub const MAX_AHEAD_BYTES: u64 = 64 << 20;
/// Chunk count bound of the same window (small files are one small chunk each).
pub const MAX_AHEAD_BLOBS: usize = 256;
/// Reader threads: the SFTP connection pool's default size (`connections=4`).
const READERS: usize = 4;

/// What the walker sends the writer, in archive order.
enum Msg {
    /// An entry; a file's is followed by one [`Msg::Blob`] per content chunk unless it is
    /// written as a hard link.
    Entry(Box<Item>),
    /// A content chunk being fetched, and its raw length (for the window).
    Blob(Receiver<Result<Vec<u8>>>, u64),
    /// An entry left out, and why.
    Skipped(Vec<u8>, String),
    /// The walk stopped (a tree could not be read).
    Failed(Error),
}

struct Item {
    rel: Vec<u8>,
    node: Node,
    /// A hard link to this earlier entry of the archive.
    link_to: Option<Vec<u8>>,
}

/// The read-ahead window: bytes and chunks fetched or being fetched, not yet written.
#[derive(Default)]
struct Window {
    state: Mutex<(u64, usize, bool)>,
    cv: Condvar,
}

impl Window {
    /// Wait for room for a chunk of `n` bytes (one chunk is always let through when the
    /// window is empty); false once the writer gave up.
    fn acquire(&self, n: u64) -> bool {
        let mut s = self.state.lock();
        while !s.2 && s.1 > 0 && (s.0 + n > MAX_AHEAD_BYTES || s.1 >= MAX_AHEAD_BLOBS) {
            self.cv.wait(&mut s);
        }
        if s.2 {
            return false;
        }
        s.0 += n;
        s.1 += 1;
        true
    }

    fn release(&self, n: u64) {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(n);
        s.1 = s.1.saturating_sub(1);
        self.cv.notify_all();
    }

    fn abort(&self) {
        self.state.lock().2 = true;
        self.cv.notify_all();
    }
}

/// Write `path` of `snap` (or the whole backed-up tree) to `out` as an archive of `format`,
/// returning `out` (flushed) and what was written and left out.
///
/// # Errors
///
/// A snapshot path that does not exist ([`Error::NoSuchPath`]), a tree or chunk that cannot be
/// read or fails authentication, a write error on `out`. The archive is then incomplete: the
/// caller must not keep it.
pub fn write<W: Write>(
    store: &Store,
    snap: &SnapshotEntry,
    path: Option<&[u8]>,
    format: Format,
    out: W,
) -> Result<(W, ArchiveReport)> {
    let (top, top_rel) = match path {
        Some(p) => {
            let n = store.lookup(snap, p)?;
            let rel = if n.name == b"/" {
                Vec::new()
            } else {
                n.name.clone()
            };
            (n, rel)
        }
        None => {
            let n = store.lookup(snap, &snap.snap.path)?;
            let rel = if n.kind == NodeKind::Dir {
                Vec::new()
            } else {
                n.name.clone()
            };
            (n, rel)
        }
    };
    let mut sink = Sink::new(format, out)?;
    let mut report = ArchiveReport::default();
    let window = Window::default();
    let (tx, rx) = bounded::<Msg>(1024);
    let (jobs_tx, jobs_rx) = unbounded::<(BlobId, Sender<Result<Vec<u8>>>)>();
    let links_as_copies = format == Format::Zip;
    let r = std::thread::scope(|s| {
        for _ in 0..READERS {
            let jobs = jobs_rx.clone();
            s.spawn(move || {
                for (id, done) in jobs.iter() {
                    // The writer may have stopped: nobody wants the chunk then.
                    let _ = done.send(store.read_blob(&id));
                }
            });
        }
        drop(jobs_rx);
        let window = &window;
        s.spawn(move || {
            let w = Walker {
                store,
                out: tx,
                jobs: jobs_tx,
                window,
                links_as_copies,
                primaries: HashMap::new(),
            };
            w.run(top, top_rel);
        });
        let r = write_all(&rx, &mut sink, window, &mut report);
        // Whatever happened, let the walker and readers finish.
        window.abort();
        drop(rx);
        r
    });
    r?;
    let out = sink.finish()?;
    Ok((out, report))
}

/// The writer's loop: every message, in order, into the archive.
fn write_all<W: Write>(
    rx: &Receiver<Msg>,
    sink: &mut Sink<W>,
    window: &Window,
    report: &mut ArchiveReport,
) -> Result<()> {
    while let Ok(msg) = rx.recv() {
        let item = match msg {
            Msg::Entry(item) => item,
            Msg::Skipped(p, why) => {
                report.skipped.push((p, why));
                continue;
            }
            Msg::Failed(e) => return Err(e),
            Msg::Blob(..) => return Err(Error::Other("archive: a chunk out of order".into())),
        };
        let node = &item.node;
        let written = match (&item.link_to, node.kind) {
            (Some(first), _) => sink.hardlink(&item.rel, node, first),
            (None, NodeKind::File) => {
                let skipped = sink.begin_file(&item.rel, node)?;
                let mut left = node.size;
                for _ in 0..node.content.len() {
                    let Ok(Msg::Blob(chunk, raw)) = rx.recv() else {
                        return Err(Error::Other("archive: a chunk is missing".into()));
                    };
                    let data = chunk
                        .recv()
                        .map_err(|_| Error::Other("archive: a reader thread stopped".into()))?;
                    window.release(raw);
                    let data = data?;
                    if data.len() as u64 > left {
                        return Err(size_mismatch(&item.rel));
                    }
                    left -= data.len() as u64;
                    if skipped.is_none() {
                        sink.data(&data)?;
                    }
                }
                if left != 0 {
                    return Err(size_mismatch(&item.rel));
                }
                match skipped {
                    Some(why) => Ok(Some(why)),
                    None => {
                        sink.end_file(node)?;
                        report.bytes += node.size;
                        Ok(None)
                    }
                }
            }
            (None, NodeKind::Dir) => sink.dir(&item.rel, node),
            (None, NodeKind::Symlink) => sink.symlink(&item.rel, node),
            (None, _) => sink.special(&item.rel, node),
        }?;
        match written {
            Some(why) => report.skipped.push((item.rel, why)),
            None => {
                match (&item.link_to, node.kind) {
                    (None, NodeKind::File) => report.files += 1,
                    (None, NodeKind::Dir) => report.dirs += 1,
                    _ => report.others += 1,
                }
                if sink.drops_xattrs() && !node.xattrs.is_empty() {
                    report.xattrs_dropped += 1;
                }
            }
        }
    }
    Ok(())
}

fn size_mismatch(rel: &[u8]) -> Error {
    Error::Other(format!(
        "{}: the content in the store is not as long as the snapshot records",
        String::from_utf8_lossy(rel)
    ))
}

/// The walk: entries depth-first in name order, with their chunks queued for the readers.
struct Walker<'a> {
    store: &'a Store,
    out: Sender<Msg>,
    jobs: Sender<(BlobId, Sender<Result<Vec<u8>>>)>,
    window: &'a Window,
    links_as_copies: bool,
    /// (dev, inode) of each hard-linked file written so far → its path in the archive.
    primaries: HashMap<(u64, u64), Vec<u8>>,
}

/// A directory being walked: its path, its tree, the next entry, its depth.
struct Level {
    rel: Vec<u8>,
    tree: Arc<Tree>,
    next: usize,
    depth: usize,
}

impl Walker<'_> {
    fn run(mut self, top: Node, top_rel: Vec<u8>) {
        if let Err(e) = self.walk(top, top_rel) {
            let _ = self.out.send(Msg::Failed(e));
        }
    }

    /// `Ok(false)` when the writer has stopped.
    fn walk(&mut self, top: Node, top_rel: Vec<u8>) -> Result<bool> {
        let mut stack: Vec<Level> = Vec::new();
        if !top_rel.is_empty() && !self.emit(&top_rel, &top)? {
            return Ok(false);
        }
        if !self.enter(&mut stack, top_rel, &top, 0)? {
            return Ok(false);
        }
        while let Some(level) = stack.last_mut() {
            let Some(node) = level.tree.nodes.get(level.next).cloned() else {
                stack.pop();
                continue;
            };
            level.next += 1;
            let depth = level.depth;
            let rel = child_path(&level.rel, &node.name);
            if !self.emit(&rel, &node)? || !self.enter(&mut stack, rel, &node, depth + 1)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Push a directory's tree (nothing for other kinds); report what its tree left out.
    fn enter(
        &mut self,
        stack: &mut Vec<Level>,
        rel: Vec<u8>,
        node: &Node,
        depth: usize,
    ) -> Result<bool> {
        let Some(sub) = node.subtree.filter(|_| node.kind == NodeKind::Dir) else {
            return Ok(true);
        };
        let tree = self.store.load_tree(&sub)?;
        for r in &tree.rejected {
            let why = format!(
                "{}: left out (the snapshot's tree is not valid here)",
                r.why
            );
            if !self.send(Msg::Skipped(child_path(&rel, &r.name), why)) {
                return Ok(false);
            }
        }
        if depth >= MAX_DEPTH && !tree.nodes.is_empty() {
            let why = format!("more than {MAX_DEPTH} directories deep: its entries are left out");
            return Ok(self.send(Msg::Skipped(rel, why)));
        }
        stack.push(Level {
            rel,
            tree,
            next: 0,
            depth,
        });
        Ok(true)
    }

    fn send(&self, m: Msg) -> bool {
        self.out.send(m).is_ok()
    }

    /// Send one entry, and queue a file's chunks.
    fn emit(&mut self, rel: &[u8], node: &Node) -> Result<bool> {
        // Names are checked once more where they become archive paths: nothing absolute,
        // nothing that climbs.
        if let Some(why) = rel.split(|&b| b == b'/').find_map(name_problem) {
            return Ok(self.send(Msg::Skipped(rel.to_vec(), why.into())));
        }
        let mut link_to = None;
        if node.is_hardlink() {
            match self.primaries.get(&(node.dev, node.inode)) {
                Some(first) if !self.links_as_copies => link_to = Some(first.clone()),
                Some(_) => {}
                None => {
                    // Recorded once its content is known to be there (below).
                }
            }
        }
        if node.kind != NodeKind::File || link_to.is_some() {
            return Ok(self.send(Msg::Entry(Box::new(Item {
                rel: rel.to_vec(),
                node: node.clone(),
                link_to,
            }))));
        }
        // A file whose chunks are not all in the index is left out rather than written with a
        // hole in the middle of the archive.
        let raws: Option<Vec<u64>> = {
            let idx = self.store.index();
            node.content
                .iter()
                .map(|id| idx.get(id).map(|l| l.raw_length as u64))
                .collect()
        };
        let Some(raws) = raws else {
            let why = "its content is missing from the store; run `check`".to_string();
            return Ok(self.send(Msg::Skipped(rel.to_vec(), why)));
        };
        if node.is_hardlink() {
            self.primaries
                .entry((node.dev, node.inode))
                .or_insert_with(|| rel.to_vec());
        }
        if !self.send(Msg::Entry(Box::new(Item {
            rel: rel.to_vec(),
            node: node.clone(),
            link_to: None,
        }))) {
            return Ok(false);
        }
        for (id, raw) in node.content.iter().zip(raws) {
            if !self.window.acquire(raw) {
                return Ok(false);
            }
            let (done, chunk) = bounded(1);
            if self.jobs.send((*id, done)).is_err() || !self.send(Msg::Blob(chunk, raw)) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn child_path(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        join(rel, name)
    }
}

// ---------------------------------------------------------------------------------------------
// Output: compression, tar, zip

/// The byte stream under a tar archive: plain, gzip or zstd.
enum Compressor<W: Write> {
    Plain(W),
    Gz(flate2::write::GzEncoder<W>),
    Zst(zstd::stream::write::Encoder<'static, W>),
}

/// zstd's default level: about gzip's ratio at several times its speed.
const ZSTD_LEVEL: i32 = 3;

impl<W: Write> Compressor<W> {
    fn new(format: Format, out: W) -> io::Result<Self> {
        Ok(match format {
            Format::TarGz => Compressor::Gz(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::default(),
            )),
            Format::TarZst => Compressor::Zst(zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?),
            _ => Compressor::Plain(out),
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Plain(w) => Ok(w),
            Compressor::Gz(g) => g.finish(),
            Compressor::Zst(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Plain(w) => w.write(buf),
            Compressor::Gz(g) => g.write(buf),
            Compressor::Zst(z) => z.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Plain(w) => w.flush(),
            Compressor::Gz(g) => g.flush(),
            Compressor::Zst(z) => z.flush(),
        }
    }
}

/// Where entries go. A method returning `Ok(Some(why))` left the entry out.
enum Sink<W: Write> {
    /// The tar builder writes the end-of-archive blocks; headers and data are written to
    /// its stream directly, in tar's 512-byte blocks.
    Tar {
        b: Box<tar::Builder<Compressor<W>>>,
        /// Bytes of the current file written so far (for the padding).
        written: u64,
    },
    Zip(Box<zip::ZipWriter<zip::write::StreamWriter<W>>>),
}

fn io_err(e: io::Error) -> Error {
    Error::io("writing the archive", e)
}

fn zip_err(e: zip::result::ZipError) -> Error {
    match e {
        zip::result::ZipError::Io(e) => io_err(e),
        e => Error::Other(format!("writing the zip archive: {e}")),
    }
}

/// Tar's block size.
const BLOCK: u64 = 512;

impl<W: Write> Sink<W> {
    /// # Errors
    ///
    /// A zstd encoder that cannot be set up (out of memory) is the only failure.
    fn new(format: Format, out: W) -> Result<Self> {
        if format == Format::Zip {
            return Ok(Sink::Zip(Box::new(zip::ZipWriter::new_stream(out))));
        }
        let c = Compressor::new(format, out).map_err(io_err)?;
        Ok(Sink::Tar {
            b: Box::new(tar::Builder::new(c)),
            written: 0,
        })
    }

    fn drops_xattrs(&self) -> bool {
        matches!(self, Sink::Zip(_))
    }

    fn tar_out(&mut self) -> Result<&mut Compressor<W>> {
        match self {
            Sink::Tar { b, .. } => Ok(b.get_mut()),
            Sink::Zip(_) => Err(Error::Other("archive: not a tar archive".into())),
        }
    }

    /// A pax header (when needed) and the ustar header of an entry.
    fn tar_entry(
        &mut self,
        rel: &[u8],
        node: &Node,
        kind: tar::EntryType,
        size: u64,
        link: Option<&[u8]>,
    ) -> Result<Option<String>> {
        let mut name = rel.to_vec();
        if kind == tar::EntryType::Directory {
            name.push(b'/');
        }
        let (header, pax, dropped) = match tar_header(&name, node, kind, size, link) {
            Ok(h) => h,
            Err(why) => return Ok(Some(why)),
        };
        let out = self.tar_out()?;
        if !pax.is_empty() {
            let mut x = tar::Header::new_ustar();
            x.set_entry_type(tar::EntryType::XHeader);
            x.set_mode(0o644);
            x.set_size(pax.len() as u64);
            x.set_mtime(header.mtime().unwrap_or(0));
            let mut xname = b"PaxHeaders/".to_vec();
            let base = name.rsplit(|&b| b == b'/').find(|c| !c.is_empty());
            xname.extend_from_slice(base.unwrap_or(b"entry"));
            set_field(&mut x.as_mut_bytes()[NAME], &xname);
            x.set_cksum();
            out.write_all(x.as_bytes()).map_err(io_err)?;
            out.write_all(&pax).map_err(io_err)?;
            pad(out, pax.len() as u64)?;
        }
        out.write_all(header.as_bytes()).map_err(io_err)?;
        if let Sink::Tar { written, .. } = self {
            *written = 0;
        }
        Ok(dropped)
    }

    fn dir(&mut self, rel: &[u8], node: &Node) -> Result<Option<String>> {
        match self {
            Sink::Tar { .. } => self.tar_entry(rel, node, tar::EntryType::Directory, 0, None),
            Sink::Zip(z) => {
                let Some(name) = zip_name(rel) else {
                    return Ok(Some(NOT_UTF8.into()));
                };
                let o = zip_options(node, libc::S_IFDIR)?;
                z.add_directory(name, o).map_err(zip_err)?;
                Ok(None)
            }
        }
    }

    fn symlink(&mut self, rel: &[u8], node: &Node) -> Result<Option<String>> {
        match self {
            Sink::Tar { .. } => {
                self.tar_entry(rel, node, tar::EntryType::Symlink, 0, Some(&node.target))
            }
            Sink::Zip(z) => {
                let (Some(name), Ok(target)) = (zip_name(rel), std::str::from_utf8(&node.target))
                else {
                    return Ok(Some(
                        "its name or link target is not UTF-8, which zip cannot hold".into(),
                    ));
                };
                let o = zip_options(node, libc::S_IFLNK)?;
                z.add_symlink(name, target, o).map_err(zip_err)?;
                Ok(None)
            }
        }
    }

    fn hardlink(&mut self, rel: &[u8], node: &Node, first: &[u8]) -> Result<Option<String>> {
        self.tar_entry(rel, node, tar::EntryType::Link, 0, Some(first))
    }

    fn special(&mut self, rel: &[u8], node: &Node) -> Result<Option<String>> {
        let kind = match node.kind {
            NodeKind::Fifo => tar::EntryType::Fifo,
            NodeKind::CharDevice => tar::EntryType::Char,
            NodeKind::BlockDevice => tar::EntryType::Block,
            _ => {
                return Ok(Some(format!(
                    "a {} cannot be held in a {} archive",
                    kind_name(node.kind),
                    if self.drops_xattrs() { "zip" } else { "tar" }
                )));
            }
        };
        match self {
            Sink::Tar { .. } => self.tar_entry(rel, node, kind, 0, None),
            Sink::Zip(_) => Ok(Some(format!(
                "a {} cannot be held in a zip archive",
                kind_name(node.kind)
            ))),
        }
    }

    /// Start a file of `node.size` bytes; its data follows through [`Sink::data`].
    fn begin_file(&mut self, rel: &[u8], node: &Node) -> Result<Option<String>> {
        match self {
            Sink::Tar { .. } => self.tar_entry(rel, node, tar::EntryType::Regular, node.size, None),
            Sink::Zip(z) => {
                let Some(name) = zip_name(rel) else {
                    return Ok(Some(NOT_UTF8.into()));
                };
                let o = zip_options(node, libc::S_IFREG)?
                    .compression_method(zip::CompressionMethod::Deflated)
                    .large_file(node.size >= u32::MAX as u64);
                z.start_file(name, o).map_err(zip_err)?;
                Ok(None)
            }
        }
    }

    fn data(&mut self, d: &[u8]) -> Result<()> {
        match self {
            Sink::Tar { b, written, .. } => {
                b.get_mut().write_all(d).map_err(io_err)?;
                *written += d.len() as u64;
                Ok(())
            }
            Sink::Zip(z) => z.write_all(d).map_err(io_err),
        }
    }

    fn end_file(&mut self, _node: &Node) -> Result<()> {
        match self {
            Sink::Tar { b, written, .. } => pad(b.get_mut(), *written),
            Sink::Zip(_) => Ok(()),
        }
    }

    /// End the archive (tar's end blocks, zip's central directory), finish the compression
    /// and return the output, flushed.
    fn finish(self) -> Result<W> {
        let mut w = match self {
            Sink::Tar { b, .. } => b
                .into_inner()
                .and_then(Compressor::finish)
                .map_err(io_err)?,
            Sink::Zip(z) => z.finish().map_err(zip_err)?.into_inner(),
        };
        w.flush().map_err(io_err)?;
        Ok(w)
    }
}

const NOT_UTF8: &str = "its name is not UTF-8, which zip cannot hold";

fn kind_name(k: NodeKind) -> &'static str {
    match k {
        NodeKind::File => "file",
        NodeKind::Dir => "directory",
        NodeKind::Symlink => "symlink",
        NodeKind::Fifo => "fifo",
        NodeKind::CharDevice => "character device",
        NodeKind::BlockDevice => "block device",
        NodeKind::Socket => "socket",
    }
}

/// Zeros up to the next 512-byte block.
fn pad(w: &mut impl Write, len: u64) -> Result<()> {
    let rem = len % BLOCK;
    if rem != 0 {
        w.write_all(&[0u8; BLOCK as usize][..(BLOCK - rem) as usize])
            .map_err(io_err)?;
    }
    Ok(())
}

/// Byte ranges of ustar's name fields in a header block (POSIX.1-1988).
const NAME: std::ops::Range<usize> = 0..100;
const LINKNAME: std::ops::Range<usize> = 157..257;
const PREFIX: std::ops::Range<usize> = 345..500;

/// Copy `v` into a NUL-padded header field (the caller checked it fits, or truncates).
fn set_field(field: &mut [u8], v: &[u8]) {
    let n = v.len().min(field.len());
    field[..n].copy_from_slice(&v[..n]);
    for b in &mut field[n..] {
        *b = 0;
    }
}

/// Largest value of an 8-byte octal ustar field (uid, gid, device numbers).
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal ustar field (size, mtime).
const MAX_OCTAL_12: u64 = 0o77777777777;

/// The ustar header of an entry, the pax records it needs, and (rarely) a note of what it
/// could not carry; `Err(why)` leaves the entry out.
#[allow(clippy::type_complexity)]
fn tar_header(
    name: &[u8],
    node: &Node,
    kind: tar::EntryType,
    size: u64,
    link: Option<&[u8]>,
) -> std::result::Result<(tar::Header, Vec<u8>, Option<String>), String> {
    let mut h = tar::Header::new_ustar();
    let mut pax = Vec::new();
    h.set_entry_type(kind);
    h.set_mode(node.mode & 0o7777);
    // Name: in `name`, or split into `prefix` and `name` at a slash, or a pax `path`.
    {
        let u = h.as_mut_bytes();
        match split_ustar_name(name) {
            Some((prefix, rest)) => {
                set_field(&mut u[PREFIX], prefix);
                set_field(&mut u[NAME], rest);
            }
            None => {
                set_field(&mut u[NAME], name);
                pax_record(&mut pax, b"path", name);
            }
        }
        if let Some(l) = link {
            set_field(&mut u[LINKNAME], l);
            if l.len() > LINKNAME.len() {
                pax_record(&mut pax, b"linkpath", l);
            }
        }
    }
    for (id, key, set) in [
        (node.uid as u64, &b"uid"[..], 0),
        (node.gid as u64, &b"gid"[..], 1),
    ] {
        let v = if id > MAX_OCTAL_8 {
            pax_record(&mut pax, key, id.to_string().as_bytes());
            0
        } else {
            id
        };
        if set == 0 {
            h.set_uid(v);
        } else {
            h.set_gid(v);
        }
    }
    for (owner, key, set) in [
        (&node.user, &b"uname"[..], 0),
        (&node.group, &b"gname"[..], 1),
    ] {
        if owner.is_empty() {
            continue;
        }
        let fits = owner.len() < 32 && owner.is_ascii();
        if !fits {
            pax_record(&mut pax, key, owner.as_bytes());
            continue;
        }
        let r = if set == 0 {
            h.set_username(owner)
        } else {
            h.set_groupname(owner)
        };
        if r.is_err() {
            pax_record(&mut pax, key, owner.as_bytes());
        }
    }
    let sec = node.mtime.sec;
    h.set_mtime((sec.max(0) as u64).min(MAX_OCTAL_12));
    if node.mtime.nsec != 0 || sec < 0 || sec as u64 > MAX_OCTAL_12 {
        pax_record(
            &mut pax,
            b"mtime",
            pax_time(sec, node.mtime.nsec).as_bytes(),
        );
    }
    h.set_size(size);
    if size > MAX_OCTAL_12 {
        pax_record(&mut pax, b"size", size.to_string().as_bytes());
    }
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        let (ma, mi) = (
            nix::sys::stat::major(node.rdev),
            nix::sys::stat::minor(node.rdev),
        );
        if ma > MAX_OCTAL_8 || mi > MAX_OCTAL_8 {
            return Err(format!(
                "its device number {ma}:{mi} does not fit in a tar header"
            ));
        }
        h.set_device_major(ma as u32)
            .and_then(|()| h.set_device_minor(mi as u32))
            .map_err(|e| format!("its device number does not fit in a tar header: {e}"))?;
    }
    let mut dropped = Vec::new();
    for x in &node.xattrs {
        // A pax keyword ends at the first `=`; such a name cannot be written.
        if x.name.contains(&b'=') || x.name.is_empty() {
            dropped.push(String::from_utf8_lossy(&x.name).into_owned());
            continue;
        }
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(&x.name);
        pax_record(&mut pax, &key, &x.value);
    }
    h.set_cksum();
    let note = (!dropped.is_empty()).then(|| {
        format!(
            "written without its xattr(s) {} (a name holding `=` cannot be a pax keyword)",
            dropped.join(", ")
        )
    });
    Ok((h, pax, note))
}

/// `name` as ustar's (prefix, name): whole in the 100-byte name, or split at a `/` with at
/// most 155 bytes before it; `None` when neither fits.
fn split_ustar_name(name: &[u8]) -> Option<(&[u8], &[u8])> {
    if name.len() <= 100 {
        return Some((&[], name));
    }
    // The last possible split point leaves the shortest name.
    let trimmed = name.strip_suffix(b"/").unwrap_or(name);
    let cut = trimmed.len().min(156);
    let i = trimmed[..cut].iter().rposition(|&b| b == b'/')?;
    let (prefix, rest) = (&name[..i], &name[i + 1..]);
    (prefix.len() <= 155 && rest.len() <= 100 && !rest.is_empty() && !prefix.is_empty())
        .then_some((prefix, rest))
}

/// A time as pax writes it: seconds, then `.` and nine digits of nanoseconds when not zero;
/// a time before the epoch counts down (-1.5 s is `-1.500000000`).
fn pax_time(sec: i64, nsec: u32) -> String {
    if nsec == 0 {
        return sec.to_string();
    }
    if sec >= 0 {
        format!("{sec}.{nsec:09}")
    } else {
        // sec + nsec/1e9 with sec < 0: -(|sec| - 1) - (1e9 - nsec)/1e9.
        let whole = -(sec + 1);
        let frac = 1_000_000_000 - nsec;
        format!("-{whole}.{frac:09}")
    }
}

/// Append one pax record, `LEN KEY=VALUE\n`, LEN counting the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    loop {
        let l = rest + len.to_string().len();
        if l == len {
            break;
        }
        len = l;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn zip_name(rel: &[u8]) -> Option<String> {
    String::from_utf8(rel.to_vec()).ok()
}

/// Zip entry options: Unix mode with its file type, the mtime (DOS time in the local time
/// zone, and exactly as the Info-ZIP extended timestamp), and owner ids (Info-ZIP `ux`).
fn zip_options(node: &Node, ifmt: u32) -> Result<zip::write::FullFileOptions<'static, 'static>> {
    let mode = ifmt | (node.mode & 0o7777);
    let dos_dir = if ifmt == libc::S_IFDIR { 0x10 } else { 0 };
    let mut o = zip::write::SimpleFileOptions::default()
        .system(zip::System::Unix)
        .external_attributes((mode << 16) | dos_dir)
        .last_modified_time(dos_time(node.mtime.sec))
        .into_full_options();
    if let Ok(t) = u32::try_from(node.mtime.sec) {
        o = o
            .with_extended_timestamp(Some(t), None, None)
            .map_err(zip_err)?;
    }
    let mut ux = vec![1u8, 4];
    ux.extend_from_slice(&node.uid.to_le_bytes());
    ux.push(4);
    ux.extend_from_slice(&node.gid.to_le_bytes());
    o.add_extra_field(0x7875, ux, false).map_err(zip_err)?;
    Ok(o)
}

/// Seconds since the epoch as a zip (DOS) time in the local time zone, which is how unzip
/// reads it; times a DOS time cannot hold (before 1980, after 2107) become 1980-01-01.
fn dos_time(sec: i64) -> zip::DateTime {
    let local = jiff::Timestamp::from_second(sec)
        .ok()
        .map(|t| t.to_zoned(jiff::tz::TimeZone::system()).datetime());
    local
        .and_then(|d| {
            zip::DateTime::from_date_and_time(
                u16::try_from(d.year()).ok()?,
                d.month() as u8,
                d.day() as u8,
                d.hour() as u8,
                d.minute() as u8,
                d.second() as u8,
            )
            .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"a");
        assert_eq!(v, b"9 path=a\n");
        // Around the lengths where the count gains a digit (9/10, 99/100, 999/1000).
        for n in 0..1100 {
            let mut v = Vec::new();
            pax_record(&mut v, b"path", &vec![b'x'; n]);
            let sp = v.iter().position(|&b| b == b' ').unwrap();
            let said: usize = std::str::from_utf8(&v[..sp]).unwrap().parse().unwrap();
            assert_eq!(said, v.len(), "value of {n} bytes");
        }
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(5, 0), "5");
        assert_eq!(pax_time(1_700_000_000, 999_999_999), "1700000000.999999999");
        assert_eq!(pax_time(-12_345, 1), "-12344.999999999");
        assert_eq!(pax_time(-1, 500_000_000), "-0.500000000");
    }

    #[test]
    fn ustar_names_split_at_a_slash() {
        assert_eq!(split_ustar_name(b"a/b"), Some((&b""[..], &b"a/b"[..])));
        let long = [vec![b'd'; 120], b"/".to_vec(), vec![b'f'; 50]].concat();
        assert_eq!(split_ustar_name(&long), Some((&long[..120], &long[121..])));
        let long_dir = [
            vec![b'd'; 120],
            b"/".to_vec(),
            vec![b'f'; 50],
            b"/".to_vec(),
        ]
        .concat();
        assert_eq!(
            split_ustar_name(&long_dir),
            Some((&long_dir[..120], &long_dir[121..]))
        );
        assert_eq!(split_ustar_name(&[b'n'; 101]), None);
        let no_fit = [vec![b'd'; 200], b"/".to_vec(), vec![b'f'; 50]].concat();
        assert_eq!(split_ustar_name(&no_fit), None);
    }
}
