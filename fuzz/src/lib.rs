//! What the fuzz targets share: the two real stores checked in under
//! `tests/fixtures/store/` (one encrypted with the passphrase `pw`, one plaintext), opened once
//! per fuzzing process, so the targets decode with a real store's keys; and the selector byte
//! by which one input picks one of several decoders.
//!
//! The seed corpus of each target (`fuzz/seeds/<target>/`) is made from the same stores by
//! `tests/fuzzed_parsers.rs` (`KLOSET_WRITE_SEEDS=1`), which also checks that it still matches.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kloset::store::{Backend, FileType, MemBackend, Store};

/// One of the fixture stores, open, over an in-memory copy of its config and key files.
pub struct Opened {
    pub backend: Arc<MemBackend>,
    pub store: Store,
}

/// Both fixture stores: `[plaintext, encrypted]`.
pub fn stores() -> &'static [Opened; 2] {
    static STORES: OnceLock<[Opened; 2]> = OnceLock::new();
    STORES.get_or_init(|| [open("plain"), open("enc")])
}

/// The fixture store an input's selector byte picks: even plaintext, odd encrypted.
pub fn store_for(selector: u8) -> &'static Opened {
    &stores()[(selector & 1) as usize]
}

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/store")
        .join(name)
}

fn open(name: &str) -> Opened {
    let root = fixture_dir(name);
    let backend = Arc::new(MemBackend::new());
    backend.init().expect("memory backend");
    let config = std::fs::read(root.join("config")).expect("fixture config");
    backend
        .write(FileType::Config, "config", &config)
        .expect("memory backend");
    if let Ok(keys) = std::fs::read_dir(root.join("keys")) {
        for k in keys {
            let k = k.expect("fixture key listing");
            let data = std::fs::read(k.path()).expect("fixture key file");
            let name = k.file_name().into_string().expect("hex name");
            backend
                .write(FileType::Key, &name, &data)
                .expect("memory backend");
        }
    }
    let store = Store::open_no_index(backend.clone(), &|_| Ok(b"pw".to_vec()))
        .expect("the fixture store opens");
    Opened { backend, store }
}

/// The largest single allocation a decoder may make while a target runs: an input of at
/// most a few MiB that makes a decoder ask for more has found a length or count taken on
/// trust (a real store's largest record is far below: packs are 16 MiB of blobs, and every
/// decoder reads those in pieces). libFuzzer's own `-malloc_limit_mb` needs a sanitizer's
/// allocator hooks, which `-s none` builds do not have, so the limit is kept here.
pub const MAX_ALLOCATION: usize = 64 << 20;

/// The system allocator, aborting (a crash libFuzzer records with its input) on any single
/// allocation above [`MAX_ALLOCATION`].
pub struct Bounded;

fn too_large(size: usize) -> bool {
    if size <= MAX_ALLOCATION {
        return false;
    }
    use std::io::Write;
    // No allocation here: a fixed message, then abort.
    let _ = std::io::stderr()
        .write_all(b"kloset-fuzz: a single allocation above MAX_ALLOCATION (64 MiB)\n");
    std::process::abort();
}

// SAFETY: every call is passed on unchanged to the system allocator, which upholds the
// `GlobalAlloc` contract; the only addition is a size check that aborts before allocating.
unsafe impl std::alloc::GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        too_large(layout.size());
        // SAFETY: the caller's `layout` is passed on as it came (non-zero size, per contract).
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        too_large(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` was allocated by `System` with this `layout` (every allocation of
        // this allocator is), as the caller guarantees.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        too_large(new);
        // SAFETY: `ptr` and `layout` come from `System` as in `dealloc`; `new` is the
        // caller's valid new size.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;
