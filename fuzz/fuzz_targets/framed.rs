//! Framed records as read from a store, whole: `config`, key files and lock files
//! (docs/FORMAT.md §3). Length, magic, BLAKE3 trailer and version are checked before any
//! parsing, so most inputs stop there; `framed_body` fuzzes what lies behind the trailer.
#![no_main]

// Linked for its global allocator, which aborts on an allocation above 64 MiB.
extern crate kloset_fuzz;

use kloset::store::format::{
    Config, LockRecord, MAGIC_CONFIG, MAGIC_LOCK, parse_key_file, unframe,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = unframe::<Config>(MAGIC_CONFIG, data, "config");
    let _ = parse_key_file(data, "k");
    let _ = unframe::<LockRecord>(MAGIC_LOCK, data, "l");
});
