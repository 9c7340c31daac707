//! The restore pipeline: snapshot (or a path in it) → destination.
//!
//! Restore is planned by pack, not by file: after creating the directories, links and empty
//! files, every needed blob is looked up in the index, the blobs of each pack are sorted by
//! offset and merged into ranges, and workers read each range once, open its blobs and write
//! each one to every file position that needs it. A file's metadata is set when its last chunk
//! lands; hard links are made once their first path is complete; directories get their
//! metadata last, deepest first. A damaged blob fails only the files that contain it: the
//! restore carries on and reports them. A full destination disk is different: it stops the
//! restore at once (`no_space`), removes the files it left unfinished, and keeps the resume
//! marker, so the same command resumes once space is freed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::crypto::BlobId;
use super::destination::Destination;
use super::error::{Error, ErrorKind, Result};
use super::repo::{SnapshotEntry, Store};
use super::tree::{Node, NodeKind, join};

#[derive(Default)]
pub struct RestoreOptions {
    /// Worker threads (0: one per core, at least 4 so reads and writes overlap, and at least
    /// the range reads the store wants in flight, [`super::backend::Backend::ranges_at_once`]).
    pub workers: usize,
    /// Files already there with the snapshot's size and mtime are taken as complete and not
    /// written again (their owner, mode and times are set again unless the destination knows
    /// them to be current). The caller sets it when this restore resumes one kloset started
    /// into the same destination and did not finish (see `cli::restore`'s marker), or when the
    /// user asked for it (`-overwrite if-changed`). Otherwise every file is written anew.
    pub resume: bool,
}

#[derive(Default)]
pub struct RestoreProgress {
    pub total_bytes: AtomicU64,
    pub bytes: AtomicU64,
    pub files: AtomicU64,
}

#[derive(Debug, Default)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    pub bytes: u64,
    /// Files skipped because they were already complete at the destination.
    pub skipped: u64,
    /// Paths that could not be restored, with the reason.
    pub errors: Vec<(Vec<u8>, String)>,
    /// Entries the restore was asked for (hard links included), not counting the directory
    /// whose contents a whole-directory restore puts into the target.
    pub entries: u64,
}

struct Entry {
    rel: Vec<u8>,
    node: Node,
}

/// Largest range read at once, and largest gap between blobs bridged by reading through it.
const MAX_RANGE: u64 = 16 << 20;
const MAX_GAP: u64 = 256 << 10;

/// A byte range of one pack and the blobs in it (also used by `sync`).
pub(crate) struct Range {
    pub pack: u32,
    pub offset: u64,
    pub length: u64,
    /// (blob, offset in range, sealed length, raw length)
    pub blobs: Vec<(BlobId, u64, u32, u32)>,
}

/// The record of a restore that has started and not yet finished, so that running the same
/// restore again resumes it: files it already wrote whole are recognised by their size and
/// mtime and not written again (their owner, mode and times are set again all the same).
///
/// It lives in kloset's own cache directory (`$XDG_CACHE_HOME/kloset/restores/`, default
/// `~/.cache/kloset/restores/`, mode 0700), never in the destination, whose content may be
/// anyone's: a file named by the hash of the destination, the snapshot id and the path
/// restored. It is made before the first entry is written and removed when a restore ends
/// without errors. Without it (a first restore, or a restore over a tree kloset did not
/// leave half-done) every file is written anew, replacing whatever is there.
pub struct ResumeMarker {
    path: std::path::PathBuf,
}

impl ResumeMarker {
    /// The marker of restoring `path` of snapshot `snap_id` into the destination described
    /// as `dest`; `None` without a home or cache directory (restores then never resume).
    pub fn new(dest: &str, snap_id: &str, path: Option<&[u8]>) -> Option<ResumeMarker> {
        let base = super::cache::Cache::base()?;
        let mut h = blake3::Hasher::new();
        for part in [dest.as_bytes(), snap_id.as_bytes(), path.unwrap_or(b"\0")] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Some(ResumeMarker {
            path: base.join("restores").join(h.finalize().to_hex().as_str()),
        })
    }

    /// Did a restore of the same thing start and not finish?
    pub fn exists(&self) -> bool {
        self.path.is_file()
    }

    /// Record that the restore has started (best effort: without it, a re-run rewrites all).
    pub fn create(&self) {
        if let Some(dir) = self.path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        let _ = std::fs::write(&self.path, b"");
    }

    /// The restore finished: a later one starts afresh.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Restore `path` of `snap` (or the whole backed-up tree) into `dest`.
///
/// The whole tree puts the backed-up directory's contents into the destination root; a path
/// puts the entry at that path into the root under its own name.
pub fn run(
    store: &Store,
    snap: &SnapshotEntry,
    path: Option<&[u8]>,
    dest: &dyn Destination,
    opts: &RestoreOptions,
    progress: &RestoreProgress,
) -> Result<RestoreReport> {
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
    let created_root = dest.prepare()?;
    let mut report = RestoreReport::default();

    // The pack reads of step 4 run on several connections: open them while the trees load.
    store.backend().warm_up();
    // 1. Walk the tree to restore.
    let t = crate::trace::span("restore: load the trees");
    let mut entries = Vec::new();
    collect(store, &top, top_rel, &mut entries, &mut report)?;
    report.entries = entries.iter().filter(|e| !e.rel.is_empty()).count() as u64;
    drop(t);
    let t = crate::trace::span("restore: directories, links, special files");

    // 2. Directories, links, special files, empty and complete files.
    let mut hard_primary: HashMap<(u64, u64), usize> = HashMap::new();
    let mut hard_links: Vec<(usize, usize)> = Vec::new();
    let mut files: Vec<usize> = Vec::new();
    // Over an existing destination, the destination may look at its directories ahead of
    // the questions below, on other connections (see `Destination::look_ahead`).
    let look = opts.resume && !created_root;
    let dirs: Vec<Vec<u8>> = if look {
        entries
            .iter()
            .filter(|e| e.node.kind == NodeKind::Dir)
            .map(|e| e.rel.clone())
            .collect()
    } else {
        Vec::new()
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        if look {
            s.spawn(|| dest.look_ahead(&dirs, &done));
        }
        // Set however this loop ends, so the look-ahead stops and the scope can end.
        let _done = SetOnDrop(&done);
        for (i, e) in entries.iter().enumerate() {
            let r = match e.node.kind {
                NodeKind::Dir => {
                    report.dirs += 1;
                    if e.rel.is_empty() {
                        Ok(())
                    } else {
                        dest.mkdir(&e.rel)
                    }
                }
                NodeKind::Symlink => {
                    report.others += 1;
                    dest.symlink(&e.rel, &e.node.target)
                        .and_then(|_| dest.set_metadata(&e.rel, &e.node))
                }
                NodeKind::File => {
                    if e.node.is_hardlink() {
                        if let Some(&p) = hard_primary.get(&(e.node.dev, e.node.inode)) {
                            hard_links.push((p, i));
                            continue;
                        }
                        hard_primary.insert((e.node.dev, e.node.inode), i);
                    }
                    report.files += 1;
                    // Nothing can be complete in a directory this restore just created, and only a
                    // restore resuming its own earlier run (or told to) trusts what it finds.
                    if opts.resume && !created_root && dest.is_complete(&e.rel, &e.node) {
                        report.skipped += 1;
                        progress.files.fetch_add(1, Ordering::Relaxed);
                        // Content as it was left; owner, mode and times set again unless the
                        // destination already knows them to be as in the snapshot.
                        if !dest.metadata_current(&e.rel, &e.node)
                            && let Err(err) = dest.set_metadata(&e.rel, &e.node)
                        {
                            report.errors.push((e.rel.clone(), err.to_string()));
                        }
                        continue;
                    }
                    progress
                        .total_bytes
                        .fetch_add(e.node.size, Ordering::Relaxed);
                    if e.node.content.len() == 1 {
                        // Written whole (create, write, metadata) when its one chunk arrives.
                        files.push(i);
                        Ok(())
                    } else {
                        let r = dest.create_file(&e.rel, e.node.size);
                        if r.is_ok() {
                            files.push(i);
                        }
                        r
                    }
                }
                _ => {
                    report.others += 1;
                    dest.special(&e.rel, &e.node)
                        .and_then(|_| dest.set_metadata(&e.rel, &e.node))
                }
            };
            if let Err(err) = r {
                if e.rel.is_empty() {
                    return Err(err);
                }
                if err.kind() == ErrorKind::NoSpace {
                    let _ = dest.remove_file(&e.rel);
                    return Err(no_space(dest, &err));
                }
                report.errors.push((e.rel.clone(), err.to_string()));
            }
        }
        Ok(())
    })?;
    // What the destination still had under way (directories, links, files created at their
    // size): done before any data goes into them.
    let unsettled = dest.settle();
    if !unsettled.is_empty() {
        let mut failed_paths = HashSet::new();
        for (rel, err) in unsettled {
            if matches!(err.kind(), ErrorKind::NoSpace | ErrorKind::Unreachable) {
                return Err(if err.kind() == ErrorKind::NoSpace {
                    no_space(dest, &err)
                } else {
                    err
                });
            }
            report.errors.push((rel.clone(), err.to_string()));
            failed_paths.insert(rel);
        }
        // A file that could not be created gets no data.
        files.retain(|&i| !failed_paths.contains(&entries[i].rel));
    }

    drop(t);
    // 3. Plan: which blob goes where.
    let t = crate::trace::span("restore: plan");
    let remaining: Vec<AtomicUsize> = (0..entries.len()).map(|_| AtomicUsize::new(0)).collect();
    let failed: Vec<std::sync::atomic::AtomicBool> = (0..entries.len())
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    let mut targets: HashMap<BlobId, Vec<(usize, u64)>> = HashMap::new();
    let mut ready = Vec::new();
    let mut plan_errors = Vec::new();
    {
        let idx = store.index();
        for &i in &files {
            let n = &entries[i].node;
            let mut off = 0u64;
            for id in &n.content {
                match idx.get(id) {
                    Some(loc) => {
                        targets.entry(*id).or_default().push((i, off));
                        remaining[i].fetch_add(1, Ordering::Relaxed);
                        off += loc.raw_length as u64;
                    }
                    None => {
                        failed[i].store(true, Ordering::Relaxed);
                        plan_errors.push((i, Error::MissingBlob(id.hex()).to_string()));
                        break;
                    }
                }
            }
            if n.content.is_empty() {
                ready.push(i);
            }
        }
    }
    for (i, e) in plan_errors {
        report.errors.push((entries[i].rel.clone(), e));
    }
    for i in ready {
        finish_file(dest, &entries[i], progress, &mut report.errors);
    }
    let ranges = plan_ranges(store, targets.keys());

    drop(t);
    // 4. Read each range once, write its blobs everywhere they go.
    let t = crate::trace::span("restore: read packs, write files");
    // As many workers as cores, and onto a local destination as many as the store wants
    // range reads in flight (over a far server, sized by the measured round trip: each waits
    // on the link, not a core). Onto a server the writes set the pace: at 100 ms, 16 workers
    // restored man and a 384 MiB file onto it in 19.2-19.4 s (350 MB), 4 in 18.1-18.6 s
    // (148-153 MB).
    let readers = if dest.is_remote() {
        0
    } else {
        store.backend().ranges_at_once()
    };
    let workers = if opts.workers > 0 {
        opts.workers
    } else {
        std::thread::available_parallelism()
            .map_or(4, |n| n.get())
            .max(readers)
            .max(4)
    };
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    let fatal: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut out = Vec::new();
                // The range buffer is kept from range to range: a fresh one of up to 16 MiB
                // is a page fault per 4 KiB (~100k in a restore of the benchmark tree).
                let mut range_buf = Vec::new();
                let mut single: Vec<u8>;
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = ranges.get(k) else { break };
                    if fatal.lock().is_some() {
                        break;
                    }
                    let pack = store.index().pack_name(r.pack).to_string();
                    let read = |offset: u64, length: u64| {
                        store.backend().read_range(
                            super::backend::FileType::Pack,
                            &pack,
                            offset,
                            length,
                        )
                    };
                    let data = store
                        .backend()
                        .read_range_into(
                            super::backend::FileType::Pack,
                            &pack,
                            r.offset,
                            r.length,
                            &mut range_buf,
                        )
                        .map(|()| &mut range_buf[..]);
                    // The store's server gone (silent past the timeout, or refusing us): no
                    // use reading blob after blob from it; the restore stops, and a re-run
                    // resumes it.
                    let mut data = match data {
                        Err(e) if e.kind() == ErrorKind::Unreachable => {
                            fatal.lock().get_or_insert(e);
                            break;
                        }
                        d => d,
                    };
                    for (id, off, len, raw) in &r.blobs {
                        // A range that cannot be read whole (a truncated pack, a read error)
                        // is read again blob by blob, so only the blobs really lost fail
                        // their files. Blobs are decrypted in place in the range's buffer and
                        // decompressed into one buffer per worker.
                        let plain: Result<&[u8], String> = match &mut data {
                            Ok(d) => store
                                .decode_blob_in_place(
                                    id,
                                    &mut d[*off as usize..(*off + *len as u64) as usize],
                                    *raw,
                                    &pack,
                                    &mut out,
                                )
                                .map_err(|e| e.to_string()),
                            Err(e) if r.blobs.len() == 1 => Err(e.to_string()),
                            Err(_) => match read(r.offset + off, *len as u64) {
                                Ok(s) => {
                                    single = s;
                                    store
                                        .decode_blob_in_place(
                                            id,
                                            &mut single,
                                            *raw,
                                            &pack,
                                            &mut out,
                                        )
                                        .map_err(|e| e.to_string())
                                }
                                Err(e) => Err(e.to_string()),
                            },
                        };
                        for &(i, foff) in &targets[id] {
                            if failed[i].load(Ordering::Relaxed) {
                                continue;
                            }
                            let e = &entries[i];
                            if e.node.content.len() == 1 {
                                let w = plain.as_ref().map_err(|e| e.to_string()).and_then(|p| {
                                    dest.write_whole(&e.rel, p, &e.node)
                                        .map_err(|err| full_or_string(&fatal, err))
                                });
                                match w {
                                    Ok(()) => {
                                        progress.bytes.fetch_add(e.node.size, Ordering::Relaxed);
                                        progress.files.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(msg) => {
                                        failed[i].store(true, Ordering::Relaxed);
                                        errors.lock().push((e.rel.clone(), msg));
                                    }
                                }
                                continue;
                            }
                            let w = plain.as_ref().map_err(|e| e.to_string()).and_then(|p| {
                                dest.write_at(&e.rel, foff, p)
                                    .map_err(|err| full_or_string(&fatal, err))
                            });
                            if let Err(msg) = w {
                                failed[i].store(true, Ordering::Relaxed);
                                errors.lock().push((e.rel.clone(), msg));
                                continue;
                            }
                            if let Ok(p) = &plain {
                                progress.bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                            }
                            if remaining[i].fetch_sub(1, Ordering::AcqRel) == 1 {
                                let mut errs = Vec::new();
                                finish_file(dest, e, progress, &mut errs);
                                errors.lock().extend(errs);
                            }
                        }
                    }
                }
            });
        }
    });
    // The whole files the destination still had under way: their failures fail their files.
    let unsettled = dest.settle();
    if !unsettled.is_empty() {
        let by_path: HashMap<&[u8], usize> = files
            .iter()
            .map(|&i| (entries[i].rel.as_slice(), i))
            .collect();
        let mut errs = errors.lock();
        for (rel, err) in unsettled {
            // A file that failed (a write of one of its pieces, or its metadata) is removed,
            // as when a write fails at once: no file is left with wrong content under its
            // real name, and a re-run restores it.
            if let Some(&i) = by_path.get(rel.as_slice()) {
                failed[i].store(true, Ordering::Relaxed);
            }
            let msg = full_or_string(&fatal, err);
            errs.push((rel, msg));
        }
    }
    if let Some(e) = fatal.into_inner() {
        // Stopped (a full disk): the files begun but not finished go, which frees their space
        // and leaves none with wrong content under its real name; a re-run resumes.
        for &i in &files {
            if failed[i].load(Ordering::Relaxed) || remaining[i].load(Ordering::Relaxed) > 0 {
                let _ = dest.remove_file(&entries[i].rel);
            }
        }
        return Err(match e {
            Error::NoSpace(_) => e,
            e if e.kind() == ErrorKind::NoSpace => no_space(dest, &e),
            e => e,
        });
    }
    report.errors.extend(errors.into_inner());
    // A file whose data could not be restored is removed rather than left full of zeros
    // under its real name; it is listed in the errors.
    for &i in &files {
        if failed[i].load(Ordering::Relaxed) {
            report.files -= 1;
            if let Err(e) = dest.remove_file(&entries[i].rel) {
                report.errors.push((entries[i].rel.clone(), e.to_string()));
            }
        }
    }

    drop(t);
    // 5. Hard links, then directory metadata deepest first.
    let _t = crate::trace::span("restore: hard links, directory metadata");
    for (p, i) in hard_links {
        if failed[p].load(Ordering::Relaxed) {
            report.errors.push((
                entries[i].rel.clone(),
                "its hard-link target could not be restored".into(),
            ));
            continue;
        }
        if let Err(e) = dest.hardlink(&entries[p].rel, &entries[i].rel) {
            report.errors.push((entries[i].rel.clone(), e.to_string()));
        }
    }
    for e in entries.iter().rev() {
        if e.node.kind == NodeKind::Dir
            && (!e.rel.is_empty() || created_root)
            && !dest.metadata_current(&e.rel, &e.node)
            && let Err(err) = dest.set_metadata(&e.rel, &e.node)
        {
            report.errors.push((e.rel.clone(), err.to_string()));
        }
    }
    for (rel, err) in dest.settle() {
        if matches!(err.kind(), ErrorKind::NoSpace | ErrorKind::Unreachable) {
            return Err(err);
        }
        report.errors.push((rel, err.to_string()));
    }
    report.bytes = progress.bytes.load(Ordering::Relaxed);
    Ok(report)
}

/// The error that stops a restore whose destination filled up: it names the destination and
/// says what to do.
fn no_space(dest: &dyn Destination, e: &Error) -> Error {
    let quota = matches!(e, Error::Io { source, .. } if super::error::over_quota(source));
    Error::NoSpace(if quota {
        format!(
            "the restore destination {} refused a write ({e}); free space there or raise the quota, then run the same restore again: it resumes where it stopped",
            dest.describe()
        )
    } else {
        format!(
            "the restore destination {} is full ({e}); free space there, then run the same restore again: it resumes where it stopped",
            dest.describe()
        )
    })
}

/// A write error as the message recorded for its file; a full disk, or a destination server
/// gone, is also recorded as the restore's fatal error, which stops the workers.
fn full_or_string(fatal: &Mutex<Option<Error>>, err: Error) -> String {
    let msg = err.to_string();
    if matches!(err.kind(), ErrorKind::NoSpace | ErrorKind::Unreachable) {
        fatal.lock().get_or_insert(err);
    }
    msg
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn finish_file(
    dest: &dyn Destination,
    e: &Entry,
    progress: &RestoreProgress,
    errors: &mut Vec<(Vec<u8>, String)>,
) {
    progress.files.fetch_add(1, Ordering::Relaxed);
    if let Err(err) = dest.set_metadata(&e.rel, &e.node) {
        errors.push((e.rel.clone(), err.to_string()));
    }
}

/// Every entry to restore, parents before children, in tree order. Iterative, so a tree
/// nested deeper than the stack allows is no danger; directories deeper than
/// [`MAX_DEPTH`](super::dirfd::MAX_DEPTH) below the restored one, and entries a tree rejected
/// ([`Tree::sanitize`](super::tree::Tree::sanitize)), are reported and left out.
fn collect(
    store: &Store,
    node: &Node,
    rel: Vec<u8>,
    out: &mut Vec<Entry>,
    report: &mut RestoreReport,
) -> Result<()> {
    // Directories whose entries are still to be listed: (index in `out`, depth). A directory
    // is always in `out` before its entries, which is all the restore needs (it makes
    // directories in this order and sets their metadata in the reverse one).
    let mut todo: Vec<(usize, usize)> = Vec::new();
    out.push(Entry {
        rel,
        node: node.clone(),
    });
    todo.push((out.len() - 1, 0));
    while let Some((i, depth)) = todo.pop() {
        let sub = match (out[i].node.kind, out[i].node.subtree) {
            (NodeKind::Dir, Some(sub)) => sub,
            _ => continue,
        };
        let rel = out[i].rel.clone();
        let t = match store.load_tree(&sub) {
            Ok(t) => t,
            Err(e) if e.kind() == super::error::ErrorKind::Damaged => {
                report.errors.push((rel, e.to_string()));
                continue;
            }
            Err(e) => return Err(e),
        };
        for r in &t.rejected {
            report.errors.push((
                child_path(&rel, &r.name),
                format!(
                    "{}: not restored (the snapshot's tree is not valid here)",
                    r.why
                ),
            ));
        }
        if depth >= super::dirfd::MAX_DEPTH && !t.nodes.is_empty() {
            report.errors.push((
                rel,
                format!(
                    "more than {} directories deep: its entries are not restored",
                    super::dirfd::MAX_DEPTH
                ),
            ));
            continue;
        }
        let first = out.len();
        for child in &t.nodes {
            out.push(Entry {
                rel: child_path(&rel, &child.name),
                node: child.clone(),
            });
        }
        // Pushed in reverse, so subdirectories are expanded in name order.
        for j in (first..out.len()).rev() {
            if out[j].node.kind == NodeKind::Dir {
                todo.push((j, depth + 1));
            }
        }
    }
    Ok(())
}

/// The relative path of `name` in the directory at `rel` (empty: the root).
fn child_path(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        join(rel, name)
    }
}

/// Group blobs by pack, sort them by offset and merge neighbours into ranges of at most
/// `MAX_RANGE` bytes, bridging gaps up to `MAX_GAP`. Blobs not in the index are left out.
pub(crate) fn plan_ranges<'a>(store: &Store, ids: impl Iterator<Item = &'a BlobId>) -> Vec<Range> {
    let idx = store.index();
    let mut by_pack: HashMap<u32, Vec<(u64, u32, u32, BlobId)>> = HashMap::new();
    for id in ids {
        if let Some(loc) = idx.get(id) {
            by_pack.entry(loc.pack).or_default().push((
                loc.offset as u64,
                loc.length,
                loc.raw_length,
                *id,
            ));
        }
    }
    let mut packs: Vec<_> = by_pack.into_iter().collect();
    packs.sort_by(|a, b| idx.pack_name(a.0).cmp(idx.pack_name(b.0)));
    let mut ranges = Vec::new();
    for (pack, mut blobs) in packs {
        blobs.sort_by_key(|b| b.0);
        let mut cur: Option<Range> = None;
        for (off, len, raw, id) in blobs {
            if let Some(r) = &mut cur {
                let end = r.offset + r.length;
                if off >= end && off - end <= MAX_GAP && off + len as u64 - r.offset <= MAX_RANGE {
                    r.length = off + len as u64 - r.offset;
                    r.blobs.push((id, off - r.offset, len, raw));
                    continue;
                }
                ranges.push(cur.take().expect("current range"));
            }
            cur = Some(Range {
                pack,
                offset: off,
                length: len as u64,
                blobs: vec![(id, 0, len, raw)],
            });
        }
        ranges.extend(cur);
    }
    ranges
}
