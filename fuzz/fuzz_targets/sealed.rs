//! Sealed records as read from a store, whole: index files, snapshots and pack headers,
//! opened with the keys of a real store (docs/FORMAT.md §5). Byte 0 picks the store (even:
//! plaintext, odd: encrypted) and, divided by 2, the record (0 index, 1 snapshot, 2 pack
//! header). The envelope's length checks and authentication run on every input; a fuzzer
//! cannot forge the tag, so `record_payload` fuzzes the decoders behind it.
#![no_main]

// Linked for its global allocator, which aborts on an allocation above 64 MiB.
extern crate kloset_fuzz;

use kloset::store::format::{
    AAD_INDEX, AAD_PACK_HEADER, AAD_SNAPSHOT, IndexFile, PackHeader, Snapshot, open_record,
};
use kloset_fuzz::store_for;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, sealed)) = data.split_first() else {
        return;
    };
    let c = store_for(which).store.crypto();
    match (which >> 1) % 3 {
        0 => drop(open_record::<IndexFile>(c, AAD_INDEX, sealed, "i")),
        1 => drop(open_record::<Snapshot>(c, AAD_SNAPSHOT, sealed, "s")),
        _ => drop(open_record::<PackHeader>(c, AAD_PACK_HEADER, sealed, "p")),
    }
});
