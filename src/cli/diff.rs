//! `diff SNAP1[:PATH] SNAP2[:PATH]`: what changed between two snapshots (or two directories or
//! files of them), one line per entry, in the manner of `restic diff`.
//!
//! The two trees are walked side by side in the merge order of their sorted names. Two
//! directories whose subtree ids are equal hold the same entries (a tree id is the keyed hash
//! of its content), so they are compared by id and never read: a diff costs the directories
//! that changed, not the size of the snapshots. A directory only one side has is listed with
//! everything below it. Each entry gets one code:
//!
//! - `+` added, `-` removed (with everything below a directory);
//! - `M` the content of a file changed (its metadata may have changed too);
//! - `U` only metadata changed: permission bits, owner (uid/gid), mtime, symlink target,
//!   xattrs, device number. The ctime, link count and inode number are not compared: they
//!   change without anything a restore gives back changing;
//! - `T` the entry's type changed (a file became a directory…); what was below the old
//!   directory is listed as removed, what is below the new one as added.
//!
//! Paths are those of the side that has the entry (the new one for `+ M U T`, the old one for
//! `-`), escaped like `ls` shows them, with a `/` after a directory. `-json` prints one JSON
//! object per line (JSON Lines) with exact names (`path_hex` when not UTF-8, as `ls -json`),
//! then a `statistics` object. The walk keeps its directories on an explicit stack, so a deep
//! tree from a store cannot exhaust the call stack.

use std::io::Write;
use std::sync::Arc;

use clap::Parser;

use super::{Ctx, exit};
use crate::store::crypto::BlobId;
use crate::store::tree::{Node, NodeKind, Tree, join};
use crate::store::{SnapshotEntry, Store};

#[derive(Parser, Debug)]
pub struct Args {
    /// Print one JSON object per line (a `change` per entry, then `statistics`).
    #[arg(long)]
    pub json: bool,
    /// The old side: SNAP (its backed-up directory) or SNAP:PATH.
    pub old: std::ffi::OsString,
    /// The new side: SNAP or SNAP:PATH.
    pub new: std::ffi::OsString,
}

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Added,
    Removed,
    /// A file's content changed.
    Content,
    /// Only metadata changed.
    Metadata,
    /// The entry's type changed.
    Type,
}

impl Code {
    /// The letter printed for this change.
    pub fn letter(self) -> char {
        match self {
            Code::Added => '+',
            Code::Removed => '-',
            Code::Content => 'M',
            Code::Metadata => 'U',
            Code::Type => 'T',
        }
    }
}

/// One changed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub code: Code,
    /// The entry's full path in the snapshot that has it (the old one for [`Code::Removed`]).
    pub path: Vec<u8>,
    /// Its type (the old one for [`Code::Removed`]).
    pub kind: NodeKind,
    /// For [`Code::Type`]: the type it had.
    pub old_kind: Option<NodeKind>,
    /// What changed, for [`Code::Content`] and [`Code::Metadata`]: `content`, `mode`,
    /// `owner`, `mtime`, `target`, `xattrs`, `device`.
    pub fields: Vec<&'static str>,
}

/// Reads a directory's tree: its id and its path (for warnings).
pub type LoadTree<'a> = dyn FnMut(&BlobId, &[u8]) -> anyhow::Result<Arc<Tree>> + 'a;

/// A directory being walked. Paths are not kept per directory: the walk's two path buffers
/// (old side, new side) hold the current paths, and a frame knows the length of its own.
enum Frame {
    /// Present on both sides with different trees: merge their entries.
    Both {
        old: Arc<Tree>,
        new: Arc<Tree>,
        i: usize,
        j: usize,
        old_len: usize,
        new_len: usize,
    },
    /// Present on one side only: everything below is `code` (added: the new side's path
    /// buffer, removed: the old side's).
    One {
        code: Code,
        tree: Arc<Tree>,
        i: usize,
        len: usize,
    },
}

/// The metadata fields that differ between two entries of the same type.
fn meta_changes(a: &Node, b: &Node) -> Vec<&'static str> {
    let mut f = Vec::new();
    if a.mode != b.mode {
        f.push("mode");
    }
    if a.uid != b.uid || a.gid != b.gid {
        f.push("owner");
    }
    if a.mtime != b.mtime {
        f.push("mtime");
    }
    if a.target != b.target {
        f.push("target");
    }
    if a.xattrs != b.xattrs {
        f.push("xattrs");
    }
    if a.rdev != b.rdev {
        f.push("device");
    }
    f
}

/// Set `buf` to its first `len` bytes, then `/name`.
fn enter(buf: &mut Vec<u8>, len: usize, name: &[u8]) {
    buf.truncate(len);
    if buf.last() != Some(&b'/') {
        buf.push(b'/');
    }
    buf.extend_from_slice(name);
}

/// The walk's state: the directories being walked and the current paths.
struct Walk<'l, 'e, 'a> {
    load: &'l mut LoadTree<'a>,
    emit: &'e mut dyn FnMut(&Change) -> anyhow::Result<()>,
    stack: Vec<Frame>,
    /// The current path on the old side and on the new side.
    op: Vec<u8>,
    np: Vec<u8>,
}

/// Everything that differs from `old` (at `old_path`) to `new` (at `new_path`), in path order,
/// each passed to `emit`. Directories with equal subtree ids are not read; the trees of the
/// others come from `load`.
///
/// # Errors
///
/// The first error of `load` or `emit`.
pub fn diff_nodes(
    load: &mut LoadTree<'_>,
    old: &Node,
    old_path: &[u8],
    new: &Node,
    new_path: &[u8],
    emit: &mut dyn FnMut(&Change) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut w = Walk {
        load,
        emit,
        stack: Vec::new(),
        op: old_path.to_vec(),
        np: new_path.to_vec(),
    };
    w.compare(old, new)?;
    while let Some(top) = w.stack.last_mut() {
        match top {
            Frame::Both {
                old,
                new,
                i,
                j,
                old_len,
                new_len,
            } => {
                let (old, new) = (old.clone(), new.clone());
                let (old_len, new_len) = (*old_len, *new_len);
                let (a, b) = (old.nodes.get(*i), new.nodes.get(*j));
                match (a, b) {
                    (None, None) => {
                        w.stack.pop();
                    }
                    (Some(a), Some(b)) if a.name == b.name => {
                        *i += 1;
                        *j += 1;
                        enter(&mut w.op, old_len, &a.name);
                        enter(&mut w.np, new_len, &b.name);
                        w.compare(a, b)?;
                    }
                    (Some(a), Some(b)) if a.name > b.name => {
                        *j += 1;
                        enter(&mut w.np, new_len, &b.name);
                        w.one(Code::Added, b)?;
                    }
                    (None, Some(b)) => {
                        *j += 1;
                        enter(&mut w.np, new_len, &b.name);
                        w.one(Code::Added, b)?;
                    }
                    (Some(a), _) => {
                        *i += 1;
                        enter(&mut w.op, old_len, &a.name);
                        w.one(Code::Removed, a)?;
                    }
                }
            }
            Frame::One { code, tree, i, len } => {
                let (code, tree, len) = (*code, tree.clone(), *len);
                let Some(n) = tree.nodes.get(*i) else {
                    w.stack.pop();
                    continue;
                };
                *i += 1;
                enter(w.buf(code), len, &n.name);
                w.one(code, n)?;
            }
        }
    }
    Ok(())
}

impl Walk<'_, '_, '_> {
    /// The path buffer of the side that has the entries of `code`.
    fn buf(&mut self, code: Code) -> &mut Vec<u8> {
        if code == Code::Removed {
            &mut self.op
        } else {
            &mut self.np
        }
    }

    /// Queue the walk of everything below directory `n` as `code`.
    fn push_one(&mut self, code: Code, n: &Node) -> anyhow::Result<()> {
        if let (NodeKind::Dir, Some(sub)) = (n.kind, n.subtree) {
            let path = std::mem::take(self.buf(code));
            let tree = (self.load)(&sub, &path);
            *self.buf(code) = path;
            let len = self.buf(code).len();
            self.stack.push(Frame::One {
                code,
                tree: tree?,
                i: 0,
                len,
            });
        }
        Ok(())
    }

    /// Report `n` (at the current path of its side) as added or removed, and queue what is
    /// below it.
    fn one(&mut self, code: Code, n: &Node) -> anyhow::Result<()> {
        let path = self.buf(code).clone();
        (self.emit)(&Change {
            code,
            path,
            kind: n.kind,
            old_kind: None,
            fields: Vec::new(),
        })?;
        self.push_one(code, n)
    }

    /// Compare an entry both sides have (at the current paths); queue its directories' walk
    /// when they differ.
    fn compare(&mut self, a: &Node, b: &Node) -> anyhow::Result<()> {
        if a.kind != b.kind {
            (self.emit)(&Change {
                code: Code::Type,
                path: self.np.clone(),
                kind: b.kind,
                old_kind: Some(a.kind),
                fields: Vec::new(),
            })?;
            // The frame pushed last is walked first: the old directory's entries, then the new.
            self.push_one(Code::Added, b)?;
            return self.push_one(Code::Removed, a);
        }
        let mut fields = meta_changes(a, b);
        let content = a.kind == NodeKind::File && (a.content != b.content || a.size != b.size);
        if content {
            fields.insert(0, "content");
        }
        if !fields.is_empty() {
            (self.emit)(&Change {
                code: if content {
                    Code::Content
                } else {
                    Code::Metadata
                },
                path: self.np.clone(),
                kind: b.kind,
                old_kind: None,
                fields,
            })?;
        }
        if a.kind != NodeKind::Dir || a.subtree == b.subtree {
            // Equal ids, equal trees: nothing below differs, and nothing is read.
            return Ok(());
        }
        let old = match a.subtree {
            Some(s) => (self.load)(&s, &self.op)?,
            None => Arc::new(Tree::default()),
        };
        let new = match b.subtree {
            Some(s) => (self.load)(&s, &self.np)?,
            None => Arc::new(Tree::default()),
        };
        self.stack.push(Frame::Both {
            old,
            new,
            i: 0,
            j: 0,
            old_len: self.op.len(),
            new_len: self.np.len(),
        });
        Ok(())
    }
}

/// How many entries got each code.
#[derive(Debug, Default)]
struct Counts {
    added: u64,
    removed: u64,
    content: u64,
    metadata: u64,
    kind: u64,
}

impl Counts {
    fn add(&mut self, c: Code) {
        *match c {
            Code::Added => &mut self.added,
            Code::Removed => &mut self.removed,
            Code::Content => &mut self.content,
            Code::Metadata => &mut self.metadata,
            Code::Type => &mut self.kind,
        } += 1;
    }
}

/// `NodeKind` as `ls -json` names it.
fn kind_name(k: NodeKind) -> String {
    format!("{k:?}").to_lowercase()
}

/// Split `SNAP[:PATH]` given as raw bytes: a path may hold any bytes, as names in a
/// snapshot do (a snapshot id or `latest` is ASCII).
pub(crate) fn split_snap_raw(spec: &std::ffi::OsStr) -> (String, Option<&[u8]>) {
    use std::os::unix::ffi::OsStrExt;
    let b = spec.as_bytes();
    match b.iter().position(|&c| c == b':') {
        Some(i) => (
            String::from_utf8_lossy(&b[..i]).into_owned(),
            Some(&b[i + 1..]),
        ),
        None => (String::from_utf8_lossy(b).into_owned(), None),
    }
}

/// `path` in snapshot `s`, absolute: a relative path is below the backed-up directory.
pub(crate) fn full_path(s: &SnapshotEntry, path: &[u8]) -> Vec<u8> {
    if path.first() == Some(&b'/') {
        path.to_vec()
    } else {
        join(&s.snap.path, path)
    }
}

/// A side of the diff: its snapshot, the entry and its full path.
fn side(store: &Store, spec: &std::ffi::OsStr) -> anyhow::Result<(SnapshotEntry, Node, Vec<u8>)> {
    let (snap, path) = split_snap_raw(spec);
    let s = store.resolve_snapshot(&snap)?;
    let path = match path {
        Some(p) if !p.is_empty() => full_path(&s, p),
        _ => s.snap.path.clone(),
    };
    let node = store.lookup(&s, &path)?;
    Ok((s, node, path))
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    let (_, old, old_path) = side(&store, &a.old)?;
    let (_, new, new_path) = side(&store, &a.new)?;
    let mut counts = Counts::default();
    let mut w = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let res = (|| -> anyhow::Result<()> {
        let mut load = |id: &BlobId, dir: &[u8]| super::ls::load_tree(&store, id, dir);
        diff_nodes(
            &mut load,
            &old,
            &old_path,
            &new,
            &new_path,
            &mut |c: &Change| {
                counts.add(c.code);
                if a.json {
                    serde_json::to_writer(&mut w, &change_json(c))?;
                    w.write_all(b"\n")?;
                } else {
                    write!(w, "{} {}", c.code.letter(), escape_path(&c.path))?;
                    if c.kind == NodeKind::Dir && c.path.last() != Some(&b'/') {
                        w.write_all(b"/")?;
                    }
                    w.write_all(b"\n")?;
                }
                Ok(())
            },
        )?;
        if !ctx.quiet {
            if a.json {
                let s = serde_json::json!({
                    "message_type": "statistics",
                    "added": counts.added,
                    "removed": counts.removed,
                    "content": counts.content,
                    "metadata": counts.metadata,
                    "type": counts.kind,
                });
                serde_json::to_writer(&mut w, &s)?;
                w.write_all(b"\n")?;
            } else {
                writeln!(
                    w,
                    "{} added, {} removed, {} modified, {} metadata only, {} type changed",
                    counts.added, counts.removed, counts.content, counts.metadata, counts.kind
                )?;
            }
        }
        w.flush()?;
        Ok(())
    })();
    match res {
        Ok(()) => Ok(exit::OK),
        Err(e) if super::ls::broken_pipe(&e) => Ok(exit::OK),
        Err(e) => Err(e),
    }
}

fn escape_path(p: &[u8]) -> String {
    crate::store::notice::escape(p)
}

/// One `change` line of `diff -json`.
fn change_json(c: &Change) -> serde_json::Value {
    let mut v = serde_json::json!({
        "message_type": "change",
        "code": c.code.letter().to_string(),
        "type": kind_name(c.kind),
    });
    let obj = v.as_object_mut().expect("an object");
    super::ls::exact(obj, "path", &c.path);
    if let Some(k) = c.old_kind {
        obj.insert("old_type".into(), kind_name(k).into());
    }
    if matches!(c.code, Code::Content | Code::Metadata) {
        obj.insert("changes".into(), c.fields.clone().into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Trees by id, as a store would hold them; ids are made up.
    struct Trees {
        map: HashMap<BlobId, Arc<Tree>>,
        next: u64,
    }

    impl Trees {
        fn new() -> Trees {
            Trees {
                map: HashMap::new(),
                next: 1,
            }
        }

        /// A directory node holding `nodes`, its tree stored.
        fn dir(&mut self, name: &str, nodes: Vec<Node>) -> Node {
            let id = self.id();
            let mut t = Tree {
                nodes,
                ..Tree::default()
            };
            t.sort();
            self.map.insert(id, Arc::new(t));
            self.dir_with(name, id)
        }

        /// A directory node whose tree is `id` (which may not be stored).
        fn dir_with(&mut self, name: &str, id: BlobId) -> Node {
            let mut n = Node::new(name.as_bytes().to_vec(), NodeKind::Dir);
            n.mode = 0o755;
            n.subtree = Some(id);
            n
        }

        fn id(&mut self) -> BlobId {
            self.next += 1;
            let mut id = [0xee; 32];
            id[..8].copy_from_slice(&self.next.to_le_bytes());
            BlobId(id)
        }

        /// Diff `a` and `b` at `/r`; the changes and how many trees were read.
        fn diff(&self, a: &Node, b: &Node) -> anyhow::Result<(Vec<String>, usize)> {
            let mut reads = 0;
            let mut out = Vec::new();
            let mut load = |id: &BlobId, _: &[u8]| {
                reads += 1;
                self.map
                    .get(id)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("tree {} was read", id.hex()))
            };
            diff_nodes(&mut load, a, b"/r", b, b"/r", &mut |c| {
                let mut s = format!("{} {}", c.code.letter(), String::from_utf8_lossy(&c.path));
                if !c.fields.is_empty() {
                    s.push_str(&format!(" {}", c.fields.join(",")));
                }
                out.push(s);
                Ok(())
            })?;
            Ok((out, reads))
        }
    }

    fn file(name: &str, chunk: u8) -> Node {
        let mut n = Node::new(name.as_bytes().to_vec(), NodeKind::File);
        n.mode = 0o644;
        n.size = 1;
        n.content = vec![BlobId([chunk; 32])];
        n
    }

    #[test]
    fn identical_subtrees_are_not_read() {
        let mut t = Trees::new();
        // `big` stands for an unchanged subtree of any size: its tree is not in the store at
        // all, so reading it would fail the diff.
        let absent = t.id();
        let big = t.dir_with("big", absent);
        let a = t.dir("r", vec![big.clone(), file("f", 1)]);
        let b = t.dir("r", vec![big, file("f", 2)]);
        let (changes, reads) = t.diff(&a, &b).unwrap();
        assert_eq!(changes, ["M /r/f content"]);
        assert_eq!(reads, 2, "only the two differing root trees are read");
        let (changes, reads) = t.diff(&a, &a).unwrap();
        assert!(changes.is_empty());
        assert_eq!(reads, 0);
    }

    #[test]
    fn every_kind_of_change_in_path_order() {
        let mut t = Trees::new();
        let mut link = Node::new(b"link".to_vec(), NodeKind::Symlink);
        link.target = b"a".to_vec();
        let mut link2 = link.clone();
        link2.target = b"b".to_vec();
        let mut chmod = file("chmod", 3);
        let mut chmod2 = chmod.clone();
        chmod2.mode = 0o600;
        let mut x = file("x", 4);
        let mut x2 = x.clone();
        x2.xattrs = vec![crate::store::tree::Xattr {
            name: b"user.a".to_vec(),
            value: b"1".to_vec(),
        }];
        let mut both = file("both", 5);
        both.mtime.sec = 1;
        let mut both2 = file("both", 6);
        both2.mtime.sec = 2;
        chmod.ctime.sec = 1; // ctime alone is not a change
        x.nlink = 2;
        let gone = t.dir("gone", vec![file("g1", 7)]);
        let sub_new = t.dir("sub", vec![file("s", 8)]);
        let was_dir = t.dir("type", vec![file("old", 9)]);
        let a = t.dir(
            "r",
            vec![
                both,
                chmod,
                gone,
                link,
                x,
                was_dir,
                file("removed", 10),
                file("same", 11),
            ],
        );
        let nested_new = t.dir("new", vec![sub_new]);
        let b = t.dir(
            "r",
            vec![
                file("added", 12),
                both2,
                chmod2,
                link2,
                nested_new,
                x2,
                file("type", 13),
                file("same", 11),
            ],
        );
        let (changes, _) = t.diff(&a, &b).unwrap();
        assert_eq!(
            changes,
            [
                "+ /r/added",
                "M /r/both content,mtime",
                "U /r/chmod mode",
                "- /r/gone",
                "- /r/gone/g1",
                "U /r/link target",
                "+ /r/new",
                "+ /r/new/sub",
                "+ /r/new/sub/s",
                "- /r/removed",
                "T /r/type",
                "- /r/type/old",
                "U /r/x xattrs",
            ]
        );
    }

    #[test]
    fn a_file_turned_directory_lists_the_new_entries() {
        let mut t = Trees::new();
        let a = t.dir("r", vec![file("d", 1)]);
        let d = t.dir("d", vec![file("in", 2)]);
        let b = t.dir("r", vec![d]);
        let (changes, _) = t.diff(&a, &b).unwrap();
        assert_eq!(changes, ["T /r/d", "+ /r/d/in"]);
    }

    #[test]
    fn a_deep_tree_does_not_exhaust_the_stack() {
        let mut t = Trees::new();
        let mut n = file("leaf", 1);
        for _ in 0..20_000 {
            n = t.dir("d", vec![n]);
        }
        let empty = t.dir("r", Vec::new());
        let top = t.dir("r", vec![n]);
        let mut load = |id: &BlobId, _: &[u8]| {
            t.map
                .get(id)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no tree"))
        };
        let (mut count, mut longest) = (0, 0);
        diff_nodes(&mut load, &empty, b"/r", &top, b"/r", &mut |c| {
            count += 1;
            longest = longest.max(c.path.len());
            Ok(())
        })
        .unwrap();
        assert_eq!(count, 20_001);
        assert_eq!(longest, "/r".len() + 20_000 * 2 + "/leaf".len());
    }
}
