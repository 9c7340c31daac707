//! Tree blobs once opened and decompressed (docs/FORMAT.md §10): postcard `Tree`, then the
//! one check every reader applies (`Tree::sanitize`). What decodes must encode to bytes that
//! decode to the same tree, and a sanitized tree must hold only usable, unique names, sorted.
#![no_main]

// Linked for its global allocator, which aborts on an allocation above 64 MiB.
extern crate kloset_fuzz;

use kloset::store::tree::{Tree, name_problem};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(mut t) = Tree::decode(data) else {
        return;
    };
    assert_eq!(Tree::decode(&t.encode()).as_ref(), Some(&t));
    let n = t.nodes.len();
    t.sanitize();
    assert_eq!(t.nodes.len() + t.rejected.len(), n);
    assert!(t.nodes.iter().all(|n| name_problem(&n.name).is_none()));
    assert!(t.nodes.windows(2).all(|w| w[0].name < w[1].name));
    for n in &t.nodes {
        assert!(t.find(&n.name).is_some());
    }
});
