//! `locate [-snapshot SNAP…] PATTERN…`: every path of the snapshots that a glob matches, as
//! `SNAPID:PATH`.
//!
//! A pattern without `/` matches an entry's name; one with `/` matches its whole path, from
//! the root when it starts with `/` (`/etc/*.conf`) and otherwise at any depth (`www/*.html`
//! is taken as `**/www/*.html`); `*` and `?` do not cross a `/` there, `**` does. Snapshots
//! are searched oldest first (all of them, or those named with `-snapshot`), each depth first
//! in name order.
//!
//! Snapshots of one source share most of their directories, and a directory's tree id names
//! its whole content. So each directory searched is summarised once, by tree id (and, when a
//! pattern holds `/`, by its path too, since the matches then depend on where it is), as a
//! small DAG of the entries that match or lead to a match; a later snapshot holding the same
//! directory reuses the summary and reads nothing below it. The trees come through the
//! store's tree cache and, for remote stores, its local copy of the tree packs. Walks use an
//! explicit stack, so a deep tree from a store cannot exhaust the call stack.
//!
//! Exit status as `grep`'s: 0 when something matched, 1 when nothing did.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use clap::Parser;

use super::{Ctx, ExitWith, exit};
use crate::store::SnapshotEntry;
use crate::store::crypto::BlobId;
use crate::store::notice::escape;
use crate::store::tree::{NodeKind, Tree};

#[derive(Parser, Debug)]
pub struct Args {
    /// Search only this snapshot (repeatable; default: every snapshot).
    #[arg(long = "snapshot", value_name = "SNAP")]
    pub snapshots: Vec<String>,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Glob patterns: a name (`*.conf`), or a path when it holds `/` (`/etc/*.conf`,
    /// `www/*.html`).
    #[arg(required = true, value_name = "PATTERN")]
    pub patterns: Vec<String>,
}

/// The compiled patterns.
pub struct Matcher {
    names: globset::GlobSet,
    paths: globset::GlobSet,
}

impl Matcher {
    /// Compile `patterns` (see the module documentation).
    ///
    /// # Errors
    ///
    /// A pattern globset refuses (exit 2, naming it).
    pub fn new(patterns: &[String]) -> anyhow::Result<Matcher> {
        let bad = |p: &str, e: globset::Error| {
            anyhow::Error::new(ExitWith(exit::USAGE, format!("bad pattern {p:?}: {e}")))
        };
        let (mut names, mut paths) = (
            globset::GlobSetBuilder::new(),
            globset::GlobSetBuilder::new(),
        );
        for p in patterns {
            if p.contains('/') {
                let full = if p.starts_with('/') || p.starts_with("**/") {
                    p.clone()
                } else {
                    format!("**/{p}")
                };
                let g = globset::GlobBuilder::new(&full)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| bad(p, e))?;
                paths.add(g);
            } else {
                names.add(globset::Glob::new(p).map_err(|e| bad(p, e))?);
            }
        }
        let build = |b: globset::GlobSetBuilder| {
            b.build()
                .map_err(|e| anyhow::Error::new(ExitWith(exit::USAGE, e.to_string())))
        };
        Ok(Matcher {
            names: build(names)?,
            paths: build(paths)?,
        })
    }

    /// Do the matches depend on where a directory is (some pattern holds `/`)?
    fn by_path(&self) -> bool {
        !self.paths.is_empty()
    }

    fn is_match(&self, name: &[u8], path: &[u8]) -> bool {
        self.names.is_match(OsStr::from_bytes(name))
            || (self.by_path() && self.paths.is_match(OsStr::from_bytes(path)))
    }
}

/// An entry of a directory that matched, or that holds matches below it.
struct Item {
    name: Vec<u8>,
    kind: NodeKind,
    matched: bool,
    below: Option<Arc<Found>>,
}

/// What a directory holds that matched, in name order; shared by every snapshot that has the
/// directory.
struct Found {
    items: Vec<Item>,
}

/// A directory's tree id, and its path when the matches depend on it.
type Key = (BlobId, Vec<u8>);

/// Reads a directory's tree: its id and its path (for warnings).
pub type LoadTree<'a> = dyn FnMut(&BlobId, &[u8]) -> anyhow::Result<Arc<Tree>> + 'a;

/// Searches snapshots, remembering each directory's matches.
pub struct Finder<'m> {
    matcher: &'m Matcher,
    memo: HashMap<Key, Option<Arc<Found>>>,
}

/// A directory being searched.
struct Frame {
    tree: Arc<Tree>,
    key: Key,
    next: usize,
    /// The length of its path in the walk's path buffer.
    len: usize,
    items: Vec<Item>,
    /// The subdirectory being searched, to be added to `items` once done.
    pending: Option<Item>,
}

/// Set `buf` to its first `len` bytes, then `/name`.
fn enter(buf: &mut Vec<u8>, len: usize, name: &[u8]) {
    buf.truncate(len);
    if buf.last() != Some(&b'/') {
        buf.push(b'/');
    }
    buf.extend_from_slice(name);
}

impl<'m> Finder<'m> {
    pub fn new(matcher: &'m Matcher) -> Finder<'m> {
        Finder {
            matcher,
            memo: HashMap::new(),
        }
    }

    fn key(&self, id: BlobId, path: &[u8]) -> Key {
        (
            id,
            if self.matcher.by_path() {
                path.to_vec()
            } else {
                Vec::new()
            },
        )
    }

    /// Call `emit` with the full path and type of every entry below the root tree `root` that
    /// matches, in depth-first name order. Directories searched before (in this or an earlier
    /// call) are not read again.
    ///
    /// # Errors
    ///
    /// The first error of `load` or `emit`.
    pub fn search(
        &mut self,
        load: &mut LoadTree<'_>,
        root: BlobId,
        emit: &mut dyn FnMut(&[u8], NodeKind) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let Some(found) = self.summarise(load, root)? else {
            return Ok(());
        };
        let mut path = b"/".to_vec();
        let mut stack = vec![(found, 0usize, path.len())];
        while let Some((f, next, len)) = stack.last_mut() {
            let (f, len) = (f.clone(), *len);
            let Some(it) = f.items.get(*next) else {
                stack.pop();
                continue;
            };
            *next += 1;
            enter(&mut path, len, &it.name);
            if it.matched {
                emit(&path, it.kind)?;
            }
            if let Some(b) = &it.below {
                stack.push((b.clone(), 0, path.len()));
            }
        }
        Ok(())
    }

    /// The matches below the root tree `root` (`None`: there are none).
    fn summarise(
        &mut self,
        load: &mut LoadTree<'_>,
        root: BlobId,
    ) -> anyhow::Result<Option<Arc<Found>>> {
        let mut path = b"/".to_vec();
        let key = self.key(root, &path);
        if let Some(f) = self.memo.get(&key) {
            return Ok(f.clone());
        }
        let mut stack = vec![Frame {
            tree: load(&root, &path)?,
            key,
            next: 0,
            len: path.len(),
            items: Vec::new(),
            pending: None,
        }];
        while let Some(top) = stack.last_mut() {
            let tree = top.tree.clone();
            if let Some(n) = tree.nodes.get(top.next) {
                top.next += 1;
                enter(&mut path, top.len, &n.name);
                let item = Item {
                    name: n.name.clone(),
                    kind: n.kind,
                    matched: self.matcher.is_match(&n.name, &path),
                    below: None,
                };
                let sub = match (n.kind, n.subtree) {
                    (NodeKind::Dir, Some(sub)) => sub,
                    _ => {
                        if item.matched {
                            top.items.push(item);
                        }
                        continue;
                    }
                };
                let key = self.key(sub, &path);
                if let Some(f) = self.memo.get(&key) {
                    if item.matched || f.is_some() {
                        top.items.push(Item {
                            below: f.clone(),
                            ..item
                        });
                    }
                    continue;
                }
                top.pending = Some(item);
                let tree = load(&sub, &path)?;
                stack.push(Frame {
                    tree,
                    key,
                    next: 0,
                    len: path.len(),
                    items: Vec::new(),
                    pending: None,
                });
                continue;
            }
            let Some(done) = stack.pop() else { break };
            let found = (!done.items.is_empty()).then(|| Arc::new(Found { items: done.items }));
            self.memo.insert(done.key, found.clone());
            match stack.last_mut() {
                None => return Ok(found),
                Some(parent) => {
                    if let Some(mut it) = parent.pending.take() {
                        it.below = found;
                        if it.matched || it.below.is_some() {
                            parent.items.push(it);
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let matcher = Matcher::new(&a.patterns)?;
    let store = ctx.open()?;
    let snaps: Vec<SnapshotEntry> = if a.snapshots.is_empty() {
        let (snaps, bad) = store.snapshots()?;
        for e in &bad {
            eprintln!("kloset: {}", escape(e.to_string().as_bytes()));
        }
        snaps
    } else {
        let mut seen = std::collections::HashSet::new();
        let mut v = Vec::new();
        for s in &a.snapshots {
            let s = store.resolve_snapshot(s)?;
            if seen.insert(s.id.clone()) {
                v.push(s);
            }
        }
        v
    };
    let mut finder = Finder::new(&matcher);
    let mut found = 0u64;
    let mut w = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let res = (|| -> anyhow::Result<()> {
        let mut load = |id: &BlobId, dir: &[u8]| super::ls::load_tree(&store, id, dir);
        for s in &snaps {
            finder.search(&mut load, s.snap.root, &mut |path, kind| {
                found += 1;
                if a.json {
                    let mut v = serde_json::json!({
                        "snapshot": s.id,
                        "short_id": s.short(),
                        "type": format!("{kind:?}").to_lowercase(),
                    });
                    let obj = v.as_object_mut().expect("an object");
                    super::ls::exact(obj, "path", path);
                    serde_json::to_writer(&mut w, &v)?;
                    w.write_all(b"\n")?;
                } else {
                    writeln!(w, "{}:{}", s.short(), escape(path))?;
                }
                Ok(())
            })?;
        }
        w.flush()?;
        Ok(())
    })();
    match res {
        Ok(()) if found > 0 => Ok(exit::OK),
        Ok(()) => Ok(exit::ERROR),
        Err(e) if super::ls::broken_pipe(&e) => Ok(exit::OK),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tree::Node;

    struct Trees {
        map: HashMap<BlobId, Arc<Tree>>,
        next: u64,
    }

    impl Trees {
        fn dir(&mut self, name: &str, nodes: Vec<Node>) -> Node {
            self.next += 1;
            let mut id = [0xdd; 32];
            id[..8].copy_from_slice(&self.next.to_le_bytes());
            let id = BlobId(id);
            let mut t = Tree {
                nodes,
                ..Tree::default()
            };
            t.sort();
            self.map.insert(id, Arc::new(t));
            let mut n = Node::new(name.as_bytes().to_vec(), NodeKind::Dir);
            n.subtree = Some(id);
            n
        }
    }

    fn file(name: &str) -> Node {
        Node::new(name.as_bytes().to_vec(), NodeKind::File)
    }

    /// Search `roots` in turn: each one's matches, and how many trees were read in all.
    fn search(t: &Trees, patterns: &[&str], roots: &[&Node]) -> (Vec<Vec<String>>, usize) {
        let pats: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        let m = Matcher::new(&pats).unwrap();
        let mut f = Finder::new(&m);
        let mut reads = 0;
        let mut out = Vec::new();
        for r in roots {
            let mut load = |id: &BlobId, _: &[u8]| {
                reads += 1;
                Ok(t.map[id].clone())
            };
            let mut got = Vec::new();
            f.search(&mut load, r.subtree.unwrap(), &mut |p, _| {
                got.push(String::from_utf8_lossy(p).into_owned());
                Ok(())
            })
            .unwrap();
            out.push(got);
        }
        (out, reads)
    }

    #[test]
    fn names_and_paths_match_and_shared_directories_are_read_once() {
        let mut t = Trees {
            map: HashMap::new(),
            next: 0,
        };
        let www = t.dir("www", vec![file("index.html"), file("a.css")]);
        let srv = t.dir("srv", vec![www.clone(), file("x.html")]);
        let r1 = t.dir("/", vec![srv.clone()]);
        let other = t.dir("other", vec![www, file("y.html")]);
        let r2 = t.dir("/", vec![srv, other]);
        let (got, reads) = search(&t, &["*.html"], &[&r1, &r2]);
        assert_eq!(
            got,
            [
                vec!["/srv/www/index.html", "/srv/x.html"],
                vec![
                    "/other/www/index.html",
                    "/other/y.html",
                    "/srv/www/index.html",
                    "/srv/x.html"
                ]
            ]
        );
        // r1, srv, www; then r2 and other: www (under `other`) and srv come from the memo.
        assert_eq!(reads, 5);
        let (got, reads) = search(&t, &["www/*.html", "/srv"], &[&r1, &r2]);
        assert_eq!(
            got,
            [
                vec!["/srv", "/srv/www/index.html"],
                vec!["/other/www/index.html", "/srv", "/srv/www/index.html"]
            ]
        );
        // By path: `www` under `other` is a new place, so read again; `srv` at `/srv` is not.
        assert_eq!(reads, 6);
        let (got, _) = search(&t, &["nothing"], &[&r1, &r2]);
        assert_eq!(got, [Vec::<String>::new(), Vec::new()]);
    }

    #[test]
    fn bad_patterns_are_usage_errors() {
        let e = Matcher::new(&["a[".to_string()]).err().unwrap();
        assert_eq!(super::super::exit_code(&e), exit::USAGE);
    }
}
