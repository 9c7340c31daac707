//! What lies behind the trailer check of a framed record: the first byte picks the record
//! (0 `Config`, 1 `KeyFile`, 2 `LockRecord`, 3 the `MasterKeys` a key file wraps, as its
//! AES-GCM opens them), the rest is its postcard body. The target frames it with a valid
//! magic, version and BLAKE3 trailer, so every input reaches the real parser
//! (`format::unframe`, `format::parse_key_file` with its key-derivation bounds).
#![no_main]

// Linked for its global allocator, which aborts on an allocation above 64 MiB.
extern crate kloset_fuzz;

use kloset::store::crypto::{Crypto, MasterKeys};
use kloset::store::format::{
    Config, FORMAT_VERSION, LockRecord, MAGIC_CONFIG, MAGIC_KEY, MAGIC_LOCK, parse_key_file,
    unframe,
};
use libfuzzer_sys::fuzz_target;

fn framed(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 44);
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(body);
    let h = blake3::hash(&out);
    out.extend_from_slice(h.as_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(c) = unframe::<Config>(MAGIC_CONFIG, &framed(MAGIC_CONFIG, body), "config") {
                let _ = c.compute_auth(&[7; 32]);
                let _ = c.id_hex();
            }
        }
        1 => {
            let _ = parse_key_file(&framed(MAGIC_KEY, body), "k");
        }
        2 => {
            let _ = unframe::<LockRecord>(MAGIC_LOCK, &framed(MAGIC_LOCK, body), "l");
        }
        _ => {
            if let Ok(k) = postcard::from_bytes::<MasterKeys>(body) {
                let c = Crypto::new(k, true);
                let _ = c.blob_id(body);
            }
        }
    }
});
