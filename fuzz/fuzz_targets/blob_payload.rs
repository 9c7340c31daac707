//! The decoder of a blob once it is opened (docs/FORMAT.md §5): bytes 0..4 are the blob's
//! `raw_length` as an index gives it (u32 LE), the rest the opened payload (codec byte, then
//! raw bytes or a zstd frame). Both decoders the engine uses run (`decode_payload`, and
//! `decode_payload_ref` into a reused buffer); a blob that decodes is parsed as a tree too,
//! as `Store::load_tree` would.
#![no_main]

// Linked for its global allocator, which aborts on an allocation above 64 MiB.
extern crate kloset_fuzz;

use kloset::store::format::{CODEC_ZSTD, decode_payload, decode_payload_ref};
use kloset::store::tree::Tree;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (len, payload) = data.split_at(4);
    let raw_len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
    let owned = decode_payload(payload, raw_len);
    let mut buf = Vec::new();
    let reused = decode_payload_ref(payload, raw_len, &mut buf).map(<[u8]>::to_vec);
    assert_eq!(owned, reused, "the two payload decoders disagree");
    if let Some(plain) = owned {
        // A raw body is what it is (the blob id check catches a wrong one); a decompressed
        // one never exceeds the size the index gives.
        if payload[0] == CODEC_ZSTD {
            assert!(raw_len == 0 || plain.len() <= raw_len);
        }
        if let Some(mut t) = Tree::decode(&plain) {
            t.sanitize();
        }
    }
});
