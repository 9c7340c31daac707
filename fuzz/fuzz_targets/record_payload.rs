//! The decoders of sealed records once they are opened (docs/FORMAT.md §5, §8, §9, §11):
//! byte 0 picks the record (0 index file, 1 snapshot, 2 pack header), the rest is the opened
//! payload: codec byte, zstd frame or raw bytes, postcard. A decoded index is loaded into an
//! in-memory index as the engine does (`Index::add_pack`).
#![no_main]

// Linked for its global allocator, which aborts on an allocation above 64 MiB.
extern crate kloset_fuzz;

use kloset::store::format::{IndexFile, PackHeader, Snapshot, decode_record};
use kloset::store::repo::Index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(f) = decode_record::<IndexFile>(payload, "i") {
                let mut idx = Index::default();
                for p in &f.packs {
                    idx.add_pack(p);
                }
                assert!(idx.pack_count() <= f.packs.len());
            }
        }
        1 => drop(decode_record::<Snapshot>(payload, "s")),
        _ => drop(decode_record::<PackHeader>(payload, "p")),
    }
});
