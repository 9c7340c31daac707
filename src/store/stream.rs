//! A file's content in order, its chunks fetched ahead on several threads: what `cat` writes
//! out. Over a network each chunk read waits a round trip or more (an open, the reads, a
//! close); a few chunks read ahead on the connection pool's connections keep the link busy. The
//! window is fixed ([`AHEAD`] chunks waiting, [`READERS`] being read, each at most the largest
//! chunk), so a file of any size streams in the same memory.

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use super::crypto::BlobId;
use super::error::{Error, Result};
use super::repo::Store;

/// Chunks fetched and waiting for the writer, at most.
pub const AHEAD: usize = 8;
/// Threads fetching chunks: the SFTP connection pool's default size (`connections=4`).
pub const READERS: usize = 4;

/// Pass the content of each chunk of `ids` to `out`, in order, reading ahead. Stops at the first
/// error of a read or of `out`.
pub fn each_chunk(
    store: &Store,
    ids: &[BlobId],
    out: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    if ids.len() <= 1 {
        for id in ids {
            out(&store.read_blob(id)?)?;
        }
        return Ok(());
    }
    type Slot = Sender<Result<Vec<u8>>>;
    let (work_tx, work_rx) = unbounded::<(usize, Slot)>();
    let (order_tx, order_rx) = bounded::<Receiver<Result<Vec<u8>>>>(AHEAD);
    std::thread::scope(move |s| {
        for _ in 0..READERS.min(ids.len()) {
            let work_rx = work_rx.clone();
            s.spawn(move || {
                for (i, slot) in work_rx {
                    // The writer may have stopped: nobody is waiting then.
                    let _ = slot.send(store.read_blob(&ids[i]));
                }
            });
        }
        drop(work_rx);
        // The chunks in order, each with the slot its reader fills; waits while AHEAD are
        // waiting to be written, and stops once the writer has stopped.
        s.spawn(move || {
            for i in 0..ids.len() {
                let (slot, filled) = bounded(1);
                if order_tx.send(filled).is_err() || work_tx.send((i, slot)).is_err() {
                    break;
                }
            }
        });
        let mut done = Ok(());
        for filled in order_rx.iter() {
            let r = match filled.recv() {
                Ok(Ok(data)) => out(&data),
                Ok(Err(e)) => Err(e),
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
