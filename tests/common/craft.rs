//! A test-only builder of snapshots that no backup would write: trees with names that could
//! leave their directory, two entries of one name, nesting deeper than any filesystem, made
//! through the store's own API (`Packer`, `Store::write_snapshot`) exactly as a holder of the
//! store's keys could.

#![allow(dead_code)]

use kloset::store::format::{BlobKind, Snapshot, SnapshotStats};
use kloset::store::repo::Packer;
use kloset::store::tree::{Node, NodeKind, Time, Tree};
use kloset::store::{SnapshotEntry, Store};

pub struct Craft<'a> {
    store: &'a Store,
    packer: Packer<'a>,
}

impl<'a> Craft<'a> {
    pub fn new(store: &'a Store) -> Self {
        Craft {
            store,
            packer: Packer::new(store),
        }
    }

    fn meta(mut n: Node, mode: u32) -> Node {
        n.mode = mode;
        n.mtime = Time {
            sec: 1_600_000_000,
            nsec: 0,
        };
        n.uid = 0;
        n.gid = 0;
        n
    }

    /// A regular file holding `data` (one chunk; callers keep it under the minimum chunk size
    /// unless they want several, see `big_file`).
    pub fn file(&self, name: &[u8], data: &[u8], mode: u32) -> Node {
        let mut n = Self::meta(Node::new(name.to_vec(), NodeKind::File), mode);
        n.size = data.len() as u64;
        if !data.is_empty() {
            n.content = vec![self.blob(BlobKind::Data, data)];
        }
        n
    }

    /// A regular file made of several chunks.
    pub fn big_file(&self, name: &[u8], chunks: &[&[u8]], mode: u32) -> Node {
        let mut n = Self::meta(Node::new(name.to_vec(), NodeKind::File), mode);
        for c in chunks {
            n.size += c.len() as u64;
            n.content.push(self.blob(BlobKind::Data, c));
        }
        n
    }

    pub fn symlink(&self, name: &[u8], target: &[u8]) -> Node {
        let mut n = Self::meta(Node::new(name.to_vec(), NodeKind::Symlink), 0o777);
        n.target = target.to_vec();
        n.size = target.len() as u64;
        n
    }

    /// A directory holding `nodes` exactly as given: in this order, duplicates and all.
    pub fn dir(&self, name: &[u8], nodes: Vec<Node>) -> Node {
        let mut n = Self::meta(Node::new(name.to_vec(), NodeKind::Dir), 0o755);
        n.subtree = Some(self.tree(nodes));
        n
    }

    /// Store a tree blob of `nodes` as given (not sorted, not checked).
    pub fn tree(&self, nodes: Vec<Node>) -> kloset::store::crypto::BlobId {
        let raw = Tree {
            nodes,
            ..Tree::default()
        }
        .encode();
        self.blob(BlobKind::Tree, &raw)
    }

    fn blob(&self, kind: BlobKind, data: &[u8]) -> kloset::store::crypto::BlobId {
        let id = self.store.crypto().blob_id(data);
        if !self.packer.claim(&id) {
            self.packer.add(kind, id, data).expect("add blob");
        }
        id
    }

    /// Commit a snapshot whose root `/` holds `nodes`, backed up from `/` (so a restore of the
    /// whole snapshot restores exactly these entries).
    pub fn snapshot(&self, nodes: Vec<Node>) -> SnapshotEntry {
        let root = self.tree(nodes);
        self.packer.finish().expect("finish packs");
        let snap = Snapshot {
            time: Time {
                sec: 1_700_000_000,
                nsec: 0,
            },
            host: "crafted".into(),
            user: "root".into(),
            source: "/".into(),
            path: b"/".to_vec(),
            tags: Vec::new(),
            root,
            parent: None,
            stats: SnapshotStats::default(),
            errors: Vec::new(),
            duration_ms: 0,
        };
        let id = self.store.write_snapshot(&snap).expect("write snapshot");
        self.store.load_index().expect("reload the index");
        SnapshotEntry { id, snap }
    }
}
