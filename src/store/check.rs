//! `check`: prove that snapshots can be restored.
//!
//! The check reads every store file the snapshots need and authenticates it: key files, index
//! files, snapshot files, tree blobs (by walking every snapshot), and, unless `fast`, every
//! pack in full (each blob is opened and its id recomputed; each pack's name must be the keyed
//! hash of its bytes). `fast` only checks that every referenced blob is indexed and that its
//! pack exists and is long enough. Damage is then traced back to the snapshots and paths that
//! contain it, so the user knows exactly what a broken file costs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::backend::FileType;
use super::crypto::BlobId;
use super::dirfd::MAX_DEPTH;
use super::error::{Error, ErrorKind, Result};
use super::format::{LockRecord, MAGIC_LOCK, parse_key_file, unframe};
use super::repo::{SnapshotEntry, Store};
use super::tree::{NodeKind, join};

#[derive(Default)]
pub struct CheckProgress {
    pub total_packs: AtomicU64,
    pub packs: AtomicU64,
}

/// What a check found.
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    pub snapshots: usize,
    pub trees: usize,
    pub blobs: usize,
    pub packs: usize,
    /// Damaged or missing store files, one line each.
    pub errors: Vec<String>,
    /// Things worth knowing that lose nothing (e.g. packs recovered from their headers).
    pub notes: Vec<String>,
    /// For each damaged snapshot (short id), the paths inside it that cannot be restored.
    pub damaged: BTreeMap<String, Vec<String>>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.damaged.is_empty()
    }
}

pub fn run(
    store: &Store,
    selected: Option<Vec<SnapshotEntry>>,
    fast: bool,
    progress: &CheckProgress,
) -> Result<CheckReport> {
    let mut rep = CheckReport::default();
    let backend = store.backend().clone();

    {
        let ir = store.index_report();
        for (f, e) in &ir.damaged_index_files {
            rep.errors.push(format!("{f}: {e}"));
        }
        for (p, e) in &ir.damaged_pack_headers {
            rep.errors.push(format!("{}: {e}", FileType::Pack.path(p)));
        }
        if !ir.recovered_packs.is_empty() {
            rep.notes.push(format!(
                "{} pack(s) are not in any index file (an interrupted backup); their blobs were recovered from the pack headers",
                ir.recovered_packs.len()
            ));
        }
    }
    for k in backend.list(FileType::Key)? {
        if let Err(e) = backend
            .read(FileType::Key, &k.name)
            .and_then(|b| parse_key_file(&b, &k.name))
        {
            rep.errors.push(e.to_string());
        }
    }
    for l in backend.list(FileType::Lock)? {
        if let Ok(b) = backend.read(FileType::Lock, &l.name)
            && let Err(e) = unframe::<LockRecord>(MAGIC_LOCK, &b, &FileType::Lock.path(&l.name))
        {
            rep.errors.push(e.to_string());
        }
    }

    let all = selected.is_none();
    let snaps = match selected {
        Some(s) => s,
        None => {
            let (s, bad) = store.snapshots()?;
            rep.errors.extend(bad.iter().map(|e| e.to_string()));
            s
        }
    };
    rep.snapshots = snaps.len();

    // Walk every snapshot's trees, collecting the data blobs they need.
    let mut trees_seen: HashSet<BlobId> = HashSet::new();
    let mut bad_trees: HashMap<BlobId, String> = HashMap::new();
    let mut needed: HashSet<BlobId> = HashSet::new();
    // Does some tree hold entries that cannot be restored (see `Tree::sanitize`), or sit deeper
    // than a restore goes? Then the paths are traced below.
    let mut invalid = false;
    for s in &snaps {
        let mut stack = vec![(s.snap.root, 0)];
        while let Some((t, depth)) = stack.pop() {
            if !trees_seen.insert(t) {
                continue;
            }
            needed.insert(t);
            match store.load_tree(&t) {
                Ok(tree) => {
                    invalid |= !tree.rejected.is_empty() || depth > MAX_DEPTH;
                    for n in &tree.nodes {
                        if let Some(sub) = n.subtree {
                            stack.push((sub, depth + 1));
                        }
                        needed.extend(n.content.iter().copied());
                    }
                }
                Err(e) if e.kind() == ErrorKind::Unreachable => return Err(e),
                Err(e) => {
                    bad_trees.insert(t, e.to_string());
                }
            }
        }
    }
    rep.trees = trees_seen.len();
    rep.blobs = needed.len();

    // Which blobs are bad: missing from the index, in a missing or short pack, or (full check)
    // failing authentication.
    let mut bad: HashMap<BlobId, String> = bad_trees.clone();
    let listed: HashMap<String, u64> = backend
        .list(FileType::Pack)?
        .into_iter()
        .map(|l| (l.name, l.size))
        .collect();
    let mut per_pack: HashMap<u32, Vec<BlobId>> = HashMap::new();
    {
        let idx = store.index();
        for id in &needed {
            match idx.get(id) {
                None => {
                    bad.entry(*id)
                        .or_insert_with(|| format!("blob {} is in no index or pack", id.short()));
                }
                Some(loc) => per_pack.entry(loc.pack).or_default().push(*id),
            }
        }
        if all {
            // A full check of the store reads every pack, needed or not.
            for (id, loc) in idx.iter() {
                // A condemned pack that is gone was deleted by maintenance: not damage unless
                // a snapshot needs it (then it is among the needed ones above).
                if idx.is_condemned(loc.pack)
                    && !needed.contains(id)
                    && !listed.contains_key(idx.pack_name(loc.pack))
                {
                    continue;
                }
                let v = per_pack.entry(loc.pack).or_default();
                if !needed.contains(id) && !fast {
                    v.push(*id);
                }
            }
        }
    }
    let mut packs: Vec<(String, Vec<BlobId>)> = {
        let idx = store.index();
        let condemned = (0..idx.pack_count() as u32)
            .filter(|&p| idx.is_condemned(p))
            .count();
        if condemned > 0 {
            rep.notes.push(format!(
                "{condemned} pack(s) are condemned by maintenance (unused; a later maintenance run deletes them)"
            ));
        }
        per_pack
            .into_iter()
            .map(|(p, ids)| (idx.pack_name(p).to_string(), ids))
            .collect()
    };
    packs.sort_by(|a, b| a.0.cmp(&b.0));
    rep.packs = packs.len();
    progress
        .total_packs
        .store(packs.len() as u64, Ordering::Relaxed);

    let found = Found {
        bad: Mutex::new(bad),
        errors: Mutex::new(Vec::new()),
        lost: Mutex::new(None),
    };
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some((name, ids)) = packs.get(k) else {
                        break;
                    };
                    if found.lost.lock().is_some() {
                        break;
                    }
                    check_pack(store, name, ids, &listed, fast, &found);
                    progress.packs.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    if let Some(e) = found.lost.into_inner() {
        return Err(e);
    }
    let bad = found.bad.into_inner();
    let mut errs = found.errors.into_inner();
    errs.sort();
    rep.errors.extend(errs);

    // Name the damage: which paths of which snapshots.
    if !bad.is_empty() || invalid {
        for s in &snaps {
            let mut paths = Vec::new();
            if let Some(why) = bad.get(&s.snap.root) {
                paths.push(format!("/ (tree unreadable: {why})"));
            } else {
                trace(store, s.snap.root, b"/".to_vec(), &bad, &mut paths);
            }
            if !paths.is_empty() {
                rep.damaged.insert(s.short().to_string(), paths);
            }
        }
    }
    Ok(rep)
}

/// What the pack checks find, shared by the checking threads.
struct Found {
    /// Blobs that cannot be used, and why.
    bad: Mutex<HashMap<BlobId, String>>,
    /// Damaged or missing store files, one line each.
    errors: Mutex<Vec<String>>,
    /// A transport failure (the server silent past the timeout, or unreachable): it ends the
    /// check with that error. It is not damage, and reporting it as such would send the user
    /// looking for a broken store.
    lost: Mutex<Option<Error>>,
}

fn check_pack(
    store: &Store,
    name: &str,
    ids: &[BlobId],
    listed: &HashMap<String, u64>,
    fast: bool,
    found: &Found,
) {
    let (bad, errors, lost) = (&found.bad, &found.errors, &found.lost);
    let file = FileType::Pack.path(name);
    let idx = store.index();
    let locs: Vec<_> = ids
        .iter()
        .filter_map(|id| idx.get(id).map(|l| (*id, l)))
        .collect();
    drop(idx);
    let mark_all = |why: &str| {
        let mut b = bad.lock();
        for (id, _) in &locs {
            b.entry(*id).or_insert_with(|| format!("{file}: {why}"));
        }
    };
    let Some(&size) = listed.get(name) else {
        errors.lock().push(format!("{file}: missing"));
        mark_all("missing");
        return;
    };
    if fast {
        for (id, l) in &locs {
            if l.offset as u64 + l.length as u64 > size {
                bad.lock().insert(*id, format!("{file}: truncated"));
                errors
                    .lock()
                    .push(format!("{file}: shorter than its index says"));
            }
        }
        return;
    }
    let data = match store.backend().read(FileType::Pack, name) {
        Ok(d) => d,
        // The server is gone: that says nothing about the pack (see `lost`).
        Err(e) if e.kind() == ErrorKind::Unreachable => {
            lost.lock().get_or_insert(e);
            return;
        }
        Err(e) => {
            errors.lock().push(format!("{file}: cannot be read: {e}"));
            mark_all("cannot be read");
            return;
        }
    };
    let mut damaged = false;
    if store.crypto().file_id(&data) != name {
        damaged = true;
    }
    if let Err(e) = store.parse_pack(name, &data) {
        errors.lock().push(e.to_string());
        damaged = false;
    }
    let mut bad_here = 0;
    for (id, l) in &locs {
        let end = l.offset as u64 + l.length as u64;
        let r = if end > data.len() as u64 {
            Err("is past the end of the pack".to_string())
        } else {
            store
                .decode_blob(
                    id,
                    &data[l.offset as usize..end as usize],
                    l.raw_length,
                    name,
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if let Err(why) = r {
            bad_here += 1;
            bad.lock().insert(*id, why);
        }
    }
    if bad_here > 0 {
        errors
            .lock()
            .push(format!("{file}: {bad_here} blob(s) fail authentication"));
    } else if damaged {
        errors.lock().push(format!(
            "{file}: damaged (its content does not match its name)"
        ));
    }
}

/// Add to `out` every path of the tree below `root` (shown as `path`) that cannot be restored:
/// files with a bad blob, unreadable directories, entries a tree rejected (names that could
/// leave their directory, or a second entry of one name). Iterative, and bounded to
/// [`MAX_DEPTH`] levels, which are reported, so no tree from the store can exhaust the stack.
fn trace(
    store: &Store,
    root: BlobId,
    path: Vec<u8>,
    bad: &HashMap<BlobId, String>,
    out: &mut Vec<String>,
) {
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let mut stack: Vec<(BlobId, Vec<u8>, usize)> = vec![(root, path, 0)];
    while let Some((sub, path, depth)) = stack.pop() {
        if let Some(why) = bad.get(&sub) {
            out.push(format!("{} (directory unreadable: {why})", show(&path)));
            continue;
        }
        let Ok(t) = store.load_tree(&sub) else {
            continue;
        };
        for r in &t.rejected {
            out.push(format!(
                "{} (invalid entry: {}; a restore leaves it out)",
                show(&join(&path, &r.name)),
                r.why
            ));
        }
        if depth >= MAX_DEPTH && t.nodes.iter().any(|n| n.subtree.is_some()) {
            out.push(format!(
                "{} (more than {MAX_DEPTH} directories deep: a restore leaves out what is below)",
                show(&path)
            ));
            continue;
        }
        for c in t.nodes.iter().rev() {
            match (c.kind, c.subtree) {
                (NodeKind::Dir, Some(s)) => stack.push((s, join(&path, &c.name), depth + 1)),
                _ => {
                    if let Some(why) = c.content.iter().find_map(|b| bad.get(b)) {
                        out.push(format!("{} ({why})", show(&join(&path, &c.name))));
                    }
                }
            }
        }
    }
}
