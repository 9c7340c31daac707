//! What kloset does with a directory listing an SFTP server sends (libssh2 parses the wire
//! format; the rest is ours): the entries of a source's READDIR become nodes
//! (`sftp::source::node_from_stat`) and are screened (`tree::screen`), and the entries of a
//! store's directories are sorted out by name and type (`backend::expected_entry`,
//! `backend::expected_pack_dir`).
//!
//! Input: entries back to back, each `name_len u8 ‖ name ‖ present u8 ‖ fields`, where bit i
//! of `present` says field i of `FileStat` (size u64, uid u32, gid u32, perm u32, atime u64,
//! mtime u64, little-endian) follows.
#![no_main]

// Linked for its global allocator, which aborts on an allocation above 64 MiB.
extern crate kloset_fuzz;

use kloset::sftp::source::node_from_stat;
use kloset::store::backend::{FileType, expected_entry, expected_pack_dir};
use kloset::store::tree::{Tree, name_problem, screen};
use libfuzzer_sys::fuzz_target;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

fn entries(data: &[u8]) -> Vec<(Vec<u8>, ssh2::FileStat)> {
    let mut r = Input(data);
    let mut out = Vec::new();
    while let Some(&[len]) = r.take(1) {
        let Some(name) = r.take(len as usize).map(<[u8]>::to_vec) else {
            break;
        };
        let Some(&[present]) = r.take(1) else { break };
        let bit = |i: u32| present & (1 << i) != 0;
        let field = |i: u32, r: &mut Input, wide: bool| -> Option<Option<u64>> {
            if !bit(i) {
                return Some(None);
            }
            Some(Some(if wide { r.u64()? } else { r.u32()? as u64 }))
        };
        let (Some(size), Some(uid), Some(gid), Some(perm), Some(atime), Some(mtime)) = (
            field(0, &mut r, true),
            field(1, &mut r, false),
            field(2, &mut r, false),
            field(3, &mut r, false),
            field(4, &mut r, true),
            field(5, &mut r, true),
        ) else {
            break;
        };
        let st = ssh2::FileStat {
            size,
            uid: uid.map(|v| v as u32),
            gid: gid.map(|v| v as u32),
            perm: perm.map(|v| v as u32),
            atime,
            mtime,
        };
        out.push((name, st));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let listed = entries(data);
    let mut nodes = Vec::new();
    for (name, st) in &listed {
        if let Some(n) = node_from_stat(name.clone(), st) {
            assert_eq!(&n.name, name);
            assert_eq!(n.mode & !0o7777, 0);
            nodes.push(n);
        }
        for t in FileType::ALL {
            if let Some(good) = expected_entry(t, "packs/ab", name, st.is_file()) {
                assert!(t.expects(&good));
            }
        }
        if let Some(d) = expected_pack_dir(name, st.is_dir()) {
            assert_eq!(d.len(), 2);
        }
    }
    let verdicts = screen(nodes.iter().map(|n| &n.name[..]));
    let mut tree = Tree {
        nodes,
        ..Tree::default()
    };
    let usable = verdicts.iter().filter(|v| v.is_none()).count();
    tree.sanitize();
    assert_eq!(tree.nodes.len(), usable);
    assert!(tree.nodes.iter().all(|n| name_problem(&n.name).is_none()));
    let _ = Tree::decode(&tree.encode()).expect("a sanitized tree round-trips");
});
