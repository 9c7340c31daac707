//! A file's content in order, its chunks fetched ahead on several threads: what `cat` writes
//! out, and what the mount reads ahead of a sequential reader. Over a network each read of a
//! pack waits a few round trips (an open, the reads, a close) whatever its size, so a file's
//! chunks are taken in runs of consecutive chunks ([`plan_runs`], at most [`RUN_BYTES`]), and
//! each run is read with one range read per pack region it lies in ([`read_run`]), as a
//! restore merges its ranges: backup writes a file's chunks near each other in a pack, though
//! not always in file order (chunks are compressed on several threads). `cat` keeps a fixed
//! window (as many runs waiting as being read, [`READERS`] or what the backend asks for), so
//! a file of any size streams in the same memory.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use super::backend::FileType;
use super::crypto::BlobId;
use super::error::{Error, ErrorKind, Result};
use super::format::BlobKind;
use super::index::{Index, Loc};
use super::repo::Store;

/// Threads fetching runs: the SFTP connection pool's default size (`connections=4`); a
/// backend may ask for more ([`super::backend::Backend::ranges_at_once`]). Runs read and
/// waiting for the writer: as many, at most.
pub const READERS: usize = 4;
/// Readers at most, whatever a backend asks for (memory: two runs of up to 16 MiB each).
const MAX_READERS: usize = 16;
/// A run's decoded chunks, at least (where the layout allows; at most twice this).
pub const RUN_BYTES: u64 = 4 << 20;
/// Largest gap between two chunks read through in one range (other data, dropped): about what
/// a link moves in a round trip, which a second read would cost.
const MAX_GAP: u64 = 1 << 20;
/// Largest range read at once.
const MAX_RANGE: u64 = 4 * RUN_BYTES;

/// Consecutive chunks of a file, read together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Which of the planned ids.
    pub ids: Range<usize>,
    reads: Vec<Read>,
}

impl Run {
    /// Bytes of packs its range reads ask for (chunks not in the index not counted).
    pub fn range_bytes(&self) -> u64 {
        self.reads
            .iter()
            .map(|r| match r {
                Read::Range { length, .. } => *length,
                Read::Lone(_) => 0,
            })
            .sum()
    }
}

/// One read of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    /// A range of a pack and the chunks in it: (position in the run, offset in the range,
    /// sealed length, raw length).
    Range {
        pack: String,
        offset: u64,
        length: u64,
        blobs: Vec<(usize, u64, u32, u32)>,
    },
    /// A chunk read as any blob is ([`Store::read_blob`]): one not in the index, or not a
    /// data blob, left for that read to report.
    Lone(usize),
}

/// Split `ids` (in file order) into runs of consecutive chunks, no chunk twice in a run, and
/// plan each run's reads: its chunks grouped by pack, sorted by offset and merged into ranges
/// bridging gaps of at most `MAX_GAP` (1 MiB).
///
/// A run ends, once its chunks decode to `max` bytes or more, where it leaves no hole: where
/// every chunk of the file stored before the last one it took in each pack has been taken,
/// so the next run starts where this one's ranges end and no range skips over chunks a later
/// run will read again (backup compresses on several threads, so a file's chunks sit in its
/// packs a few places out of order). At `4 * max` it ends anyway.
pub fn plan_runs(store: &Store, ids: &[BlobId], max: u64) -> Vec<Run> {
    let idx = store.index();
    let locs: Vec<Option<Loc>> = ids
        .iter()
        .map(|id| idx.get(id).filter(|l| l.kind == BlobKind::Data))
        .collect();
    // Each located chunk's place among the file's chunks in pack order (one place per stored
    // chunk: a chunk repeated in the file has one), and where each pack's places start.
    let mut order: Vec<usize> = (0..ids.len()).filter(|&i| locs[i].is_some()).collect();
    order.sort_by_key(|&i| locs[i].map(|l| (l.pack, l.offset)));
    let mut place = vec![0usize; ids.len()];
    let mut pack_first: HashMap<u32, usize> = HashMap::new();
    let mut places = 0;
    let mut prev: Option<(u32, u32)> = None;
    for &i in &order {
        let Some(l) = locs[i] else { continue };
        if prev != Some((l.pack, l.offset)) {
            pack_first.entry(l.pack).or_insert(places);
            places += 1;
            prev = Some((l.pack, l.offset));
        }
        place[i] = places - 1;
    }
    // Places taken, and per pack: how many taken and the end of the furthest; a pack is
    // "holed" while that end is beyond the count (a place before it not yet taken).
    let mut taken = vec![false; places];
    let mut per_pack: HashMap<u32, (usize, usize)> = HashMap::new();
    let mut holed = 0usize;

    let mut runs = Vec::new();
    let mut start = 0;
    while start < ids.len() {
        let mut seen = HashSet::new();
        let mut total = 0u64;
        let mut end = start;
        while end < ids.len() {
            let id = &ids[end];
            let raw = locs[end].map_or(0, |l| l.raw_length as u64);
            if end > start
                && (seen.contains(id) || (total >= max && holed == 0) || total + raw > 4 * max)
            {
                break;
            }
            seen.insert(*id);
            total += raw;
            if let Some(l) = locs[end]
                && !std::mem::replace(&mut taken[place[end]], true)
            {
                let first = pack_first[&l.pack];
                let (count, reach) = per_pack.entry(l.pack).or_insert((0, first));
                let was = *reach > first + *count;
                *count += 1;
                *reach = (*reach).max(place[end] + 1);
                let is = *reach > first + *count;
                match (was, is) {
                    (false, true) => holed += 1,
                    (true, false) => holed -= 1,
                    _ => {}
                }
            }
            end += 1;
        }
        runs.push(plan_reads(&idx, ids, &locs, start..end));
        start = end;
    }
    runs
}

/// The reads of the run of `ids[run]`.
fn plan_reads(idx: &Index, ids: &[BlobId], locs: &[Option<Loc>], run: Range<usize>) -> Run {
    let mut located = Vec::new();
    let mut reads = Vec::new();
    for i in run.clone() {
        match locs[i] {
            Some(l) => located.push((
                l.pack,
                l.offset as u64,
                l.length,
                l.raw_length,
                i - run.start,
            )),
            None => reads.push(Read::Lone(i - run.start)),
        }
    }
    debug_assert!(run.len() == located.len() + reads.len() && run.end <= ids.len());
    located.sort_by_key(|b| (b.0, b.1));
    let mut cur: Option<(u32, Read)> = None;
    for (pack, off, len, raw, pos) in located {
        if let Some((
            p,
            Read::Range {
                offset,
                length,
                blobs,
                ..
            },
        )) = &mut cur
        {
            let e = *offset + *length;
            if *p == pack
                && off >= e
                && off - e <= MAX_GAP
                && off + len as u64 - *offset <= MAX_RANGE
            {
                blobs.push((pos, off - *offset, len, raw));
                *length = off + len as u64 - *offset;
                continue;
            }
        }
        reads.extend(cur.take().map(|c| c.1));
        cur = Some((
            pack,
            Read::Range {
                pack: idx.pack_name(pack).to_string(),
                offset: off,
                length: len as u64,
                blobs: vec![(pos, 0, len, raw)],
            },
        ));
    }
    reads.extend(cur.map(|c| c.1));
    Run { ids: run, reads }
}

/// Where [`read_run`] passes each chunk: its position in the run, its id, its content.
pub type ChunkRead<'a> = dyn FnMut(usize, &BlobId, Result<Vec<u8>>) + 'a;

/// Read the chunks of `run` (of `ids`, as planned), passing each one's position in the run,
/// id and content or error to `each` (in pack order, not file order), each into the buffer
/// `buf_for(raw length)` gives. `range_buf` holds a range and is kept between calls. A range
/// that cannot be read whole (a truncated pack, a read error) is read again chunk by chunk,
/// so only the chunks really lost fail; a server out of reach fails them all at once.
pub fn read_run(
    store: &Store,
    ids: &[BlobId],
    run: &Run,
    range_buf: &mut Vec<u8>,
    buf_for: &mut dyn FnMut(usize) -> Vec<u8>,
    each: &mut ChunkRead<'_>,
) {
    let ids = &ids[run.ids.clone()];
    for read in &run.reads {
        let (pack, offset, length, blobs) = match read {
            Read::Lone(pos) => {
                each(*pos, &ids[*pos], store.read_blob(&ids[*pos]));
                continue;
            }
            Read::Range {
                pack,
                offset,
                length,
                blobs,
            } => (pack, *offset, *length, blobs),
        };
        if let [(pos, _, _, raw)] = blobs[..] {
            let id = &ids[pos];
            each(pos, id, store.read_blob_reusing(id, buf_for(raw as usize)));
            continue;
        }
        match store
            .backend()
            .read_range_into(FileType::Pack, pack, offset, length, range_buf)
        {
            Ok(()) if range_buf.len() as u64 >= length => {
                for &(pos, off, len, raw) in blobs {
                    let id = &ids[pos];
                    let sealed = &mut range_buf[off as usize..(off + len as u64) as usize];
                    let out = buf_for(raw as usize);
                    each(pos, id, store.decode_blob_into(id, sealed, raw, pack, out));
                }
            }
            Err(e) if e.kind() == ErrorKind::Unreachable => {
                for &(pos, ..) in blobs {
                    let e = Error::Connector(e.to_string(), ErrorKind::Unreachable);
                    each(pos, &ids[pos], Err(e));
                }
            }
            _ => {
                for &(pos, _, _, raw) in blobs {
                    let id = &ids[pos];
                    each(pos, id, store.read_blob_reusing(id, buf_for(raw as usize)));
                }
            }
        }
    }
}

/// The chunks of run `k` read (those before a failure) and the failure, if any.
type RunRead = (Vec<Vec<u8>>, Option<Error>);

fn read_whole_run(store: &Store, ids: &[BlobId], run: &Run, range_buf: &mut Vec<u8>) -> RunRead {
    let mut slots: Vec<Option<Result<Vec<u8>>>> = (0..run.ids.len()).map(|_| None).collect();
    read_run(
        store,
        ids,
        run,
        range_buf,
        &mut |_| Vec::new(),
        &mut |pos, _, r| {
            slots[pos] = Some(r);
        },
    );
    let mut got = Vec::with_capacity(slots.len());
    for slot in slots {
        match slot {
            Some(Ok(d)) => got.push(d),
            Some(Err(e)) => return (got, Some(e)),
            None => {
                return (
                    got,
                    Some(Error::Other("a chunk of the run was not read".into())),
                );
            }
        }
    }
    (got, None)
}

/// Pass the content of each chunk of `ids` to `out`, in order, reading runs ahead on
/// [`Backend::ranges_at_once`](super::backend::Backend::ranges_at_once) threads. Stops at the first error of a read or of `out`, after passing every
/// chunk before it.
pub fn each_chunk(
    store: &Store,
    ids: &[BlobId],
    out: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let runs = plan_runs(store, ids, RUN_BYTES);
    let mut emit = |(got, failed): RunRead| -> Result<()> {
        for d in got {
            out(&d)?;
        }
        failed.map_or(Ok(()), Err)
    };
    if runs.len() <= 1 {
        let mut range_buf = Vec::new();
        for run in &runs {
            emit(read_whole_run(store, ids, run, &mut range_buf))?;
        }
        return Ok(());
    }
    type Slot = Sender<RunRead>;
    let (work_tx, work_rx) = unbounded::<(usize, Slot)>();
    let readers = store.backend().ranges_at_once().clamp(1, MAX_READERS);
    let (order_tx, order_rx) = bounded::<Receiver<RunRead>>(readers);
    let runs = &runs;
    std::thread::scope(move |s| {
        for _ in 0..readers.min(runs.len()) {
            let work_rx = work_rx.clone();
            s.spawn(move || {
                let mut range_buf = Vec::new();
                for (k, slot) in work_rx {
                    // The writer may have stopped: nobody is waiting then.
                    let _ = slot.send(read_whole_run(store, ids, &runs[k], &mut range_buf));
                }
            });
        }
        drop(work_rx);
        // The runs in order, each with the slot its reader fills; waits while `readers` are
        // waiting to be written, and stops once the writer has stopped.
        s.spawn(move || {
            for k in 0..runs.len() {
                let (slot, filled) = bounded(1);
                if order_tx.send(filled).is_err() || work_tx.send((k, slot)).is_err() {
                    break;
                }
            }
        });
        let mut done = Ok(());
        for filled in order_rx.iter() {
            let r = match filled.recv() {
                Ok(read) => emit(read),
                Err(_) => Err(Error::Other("a chunk reader stopped".into())),
            };
            if r.is_err() {
                done = r;
                break;
            }
        }
        drop(order_rx);
        done
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::MemBackend;
    use std::sync::Arc;

    /// A store in memory holding one incompressible file of `mib` MiB (about a chunk per MiB),
    /// with the file's chunk ids and content.
    fn store_with_file(mib: usize) -> (Arc<Store>, Arc<MemBackend>, Vec<BlobId>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let data = crate::fs::tests::noise(mib << 20, 0x2545_f491_4f6c_dd1d);
        std::fs::write(dir.path().join("big"), &data).unwrap();
        let (store, mem) = crate::fs::tests::memory_store(dir.path(), Vec::new());
        let snap = store.resolve_snapshot("latest").unwrap();
        let node = store.lookup(&snap, b"big").unwrap();
        (store, mem, node.content, data)
    }

    fn cat(store: &Store, ids: &[BlobId]) -> (Vec<u8>, Result<()>) {
        let mut out = Vec::new();
        let r = each_chunk(store, ids, &mut |d| {
            out.extend_from_slice(d);
            Ok(())
        });
        (out, r)
    }

    #[test]
    fn a_files_chunks_are_read_a_run_at_a_time_in_order() {
        let (store, mem, ids, data) = store_with_file(40);
        assert!(ids.len() >= 20, "{} chunks", ids.len());
        let runs = plan_runs(&store, &ids, RUN_BYTES);
        // Runs cover the ids in order, each read once, none decoding to more than RUN_BYTES.
        let idx = store.index();
        let mut next = 0;
        let mut reads = 0;
        for r in &runs {
            assert_eq!(r.ids.start, next);
            next = r.ids.end;
            let raw: u64 = ids[r.ids.clone()]
                .iter()
                .map(|id| idx.get(id).unwrap().raw_length as u64)
                .sum();
            assert!(raw <= 4 * RUN_BYTES);
            let mut read: Vec<usize> = Vec::new();
            for rd in &r.reads {
                let Read::Range { length, blobs, .. } = rd else {
                    panic!("every chunk is a data blob in the index")
                };
                assert!(*length <= MAX_RANGE);
                read.extend(blobs.iter().map(|b| b.0));
            }
            read.sort();
            assert_eq!(read, (0..r.ids.len()).collect::<Vec<_>>());
            reads += r.reads.len();
        }
        drop(idx);
        assert_eq!(next, ids.len());
        // Backup writes a file's chunks near each other: a few reads, not one per chunk.
        assert!(
            reads * 2 <= ids.len(),
            "{reads} reads for {} chunks",
            ids.len()
        );
        let before = mem.range_reads();
        let (out, r) = cat(&store, &ids);
        r.unwrap();
        assert!(out == data, "cat's output differs from the file");
        // As planned: before runs, cat read chunk by chunk.
        assert_eq!(mem.range_reads() - before, reads as u64);
    }

    #[test]
    fn a_chunk_twice_in_a_file_is_read_for_each_run_it_is_in() {
        let (store, _mem, ids, data) = store_with_file(8);
        // The same chunks again, as a file of repeated content has them.
        let twice: Vec<BlobId> = ids.iter().chain(&ids).copied().collect();
        let runs = plan_runs(&store, &twice, RUN_BYTES);
        assert!(runs.iter().all(|r| {
            let set: HashSet<_> = twice[r.ids.clone()].iter().collect();
            set.len() == r.ids.len()
        }));
        let (out, r) = cat(&store, &twice);
        r.unwrap();
        assert!(out[..data.len()] == data[..] && out[data.len()..] == data[..]);
    }

    #[test]
    fn a_damaged_chunk_ends_the_output_after_every_chunk_before_it() {
        let (store, mem, ids, data) = store_with_file(24);
        let bad = ids.len() / 2;
        let (pack, offset) = {
            let idx = store.index();
            let loc = idx.get(&ids[bad]).unwrap();
            (idx.pack_name(loc.pack).to_string(), loc.offset as usize)
        };
        mem.tamper(FileType::Pack, &pack, |v| v[offset + 40] ^= 1);
        let (out, r) = cat(&store, &ids);
        let e = r.expect_err("a damaged chunk must fail cat");
        assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
        let good: usize = {
            let idx = store.index();
            ids[..bad]
                .iter()
                .map(|id| idx.get(id).unwrap().raw_length as usize)
                .sum()
        };
        assert_eq!(
            out.len(),
            good,
            "every chunk before the damaged one is written"
        );
        assert!(out == data[..good]);
    }

    #[test]
    fn a_missing_chunk_is_a_run_of_its_own() {
        let (store, _mem, mut ids, _) = store_with_file(8);
        let missing = BlobId([7; 32]);
        ids.insert(1, missing);
        let runs = plan_runs(&store, &ids, RUN_BYTES);
        assert!(runs[0].reads.contains(&Read::Lone(1)), "{:?}", runs[0]);
        let (_, r) = cat(&store, &ids);
        assert!(matches!(r, Err(Error::MissingBlob(_))), "{r:?}");
    }
}
