//! Pack files as read from a store (docs/FORMAT.md §8): byte 0 picks the store (even:
//! plaintext, odd: encrypted), the rest is a whole pack. The header is found from the length
//! at the end both ways the engine does it: from the whole file (`Store::parse_pack`, check
//! and recovery) and by ranged reads of a stored file (`Store::read_pack_header`, index
//! load); every blob the header lists is then decoded (`Store::decode_blob`).
#![no_main]

// Linked for its global allocator, which aborts on an allocation above 64 MiB.
extern crate kloset_fuzz;

use kloset::store::{Backend, FileType};
use kloset_fuzz::store_for;
use libfuzzer_sys::fuzz_target;

const NAME: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fuzz_target!(|data: &[u8]| {
    let Some((&which, pack)) = data.split_first() else {
        return;
    };
    let s = store_for(which);
    let parsed = s.store.parse_pack(NAME, pack);
    s.backend.write(FileType::Pack, NAME, pack).unwrap();
    let ranged = s.store.read_pack_header(NAME, pack.len() as u64);
    s.backend.remove(FileType::Pack, NAME).unwrap();
    assert_eq!(
        parsed.is_ok(),
        ranged.is_ok(),
        "the two header readers disagree"
    );
    if let Ok(h) = parsed {
        for e in &h.entries {
            let end = e.offset as usize + e.length as usize;
            if let Some(sealed) = pack.get(e.offset as usize..end) {
                let _ = s.store.decode_blob(&e.id, sealed, e.raw_length, NAME);
            }
        }
    }
});
