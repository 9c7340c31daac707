//! `ls`: snapshots (one per line, oldest first), or `ls SNAP[:PATH]`: a directory's entries.
//!
//! Text output shows every name, symlink target, host, source and tag through
//! [`escape`] (GNU `ls -b` style), so a name from a snapshot can neither split a line nor send
//! escape sequences to a terminal. `-json` keeps exact values: a name, path or target that is
//! not UTF-8 is given lossily (U+FFFD for each bad sequence) and exactly, as hex, in a second
//! field (`name_hex`, `path_hex`, `target_hex`). Entries a tree had to leave out (bad or
//! repeated names) are warned about. `-recursive` walks with an explicit stack, so a deep
//! tree cannot exhaust the call stack, and goes at most [`MAX_DEPTH`] directories down.

use std::io::Write;
use std::sync::Arc;

use clap::Parser;
use serde::ser::{SerializeSeq, Serializer};

use super::{Ctx, ExitWith, bytes, exit, split_snap, stdout_write, time};
use crate::store::Store;
use crate::store::crypto::BlobId;
use crate::store::notice::{escape, warn_once};
use crate::store::repo::SnapshotEntry;
use crate::store::tree::{Node, NodeKind, Tree, join};

/// How many directories below the listed one `ls -recursive` goes; deeper ones are reported
/// (a real filesystem's 4096-byte `PATH_MAX` allows about half as many).
pub const MAX_DEPTH: usize = 4096;

#[derive(Parser, Debug)]
pub struct Args {
    /// List everything below the directory.
    #[arg(long, short = 'r')]
    pub recursive: bool,
    /// Only snapshots with this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// SNAP or SNAP:PATH to list the files of.
    pub target: Option<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    match &a.target {
        None => list_snapshots(&store, &a),
        Some(t) => list_files(&store, t, &a),
    }
}

fn list_snapshots(store: &Store, a: &Args) -> anyhow::Result<i32> {
    let (snaps, bad) = store.snapshots()?;
    for e in &bad {
        eprintln!("kloset: {e}");
    }
    let snaps: Vec<_> = snaps
        .into_iter()
        .filter(|s| a.tag.as_ref().is_none_or(|t| s.snap.tags.contains(t)))
        .collect();
    if a.json {
        let v: Vec<_> = snaps.iter().map(snapshot_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(exit::OK);
    }
    let mut out = Vec::new();
    for s in &snaps {
        let tags = if s.snap.tags.is_empty() {
            String::new()
        } else {
            let tags: Vec<String> = s.snap.tags.iter().map(|t| escape(t.as_bytes())).collect();
            format!("  tags={}", tags.join(","))
        };
        writeln!(
            out,
            "{}  {}  {}  {}  {}  {} files{}",
            s.short(),
            time(s.snap.time),
            escape(s.snap.host.as_bytes()),
            escape(s.snap.source.as_bytes()),
            bytes(s.snap.stats.bytes),
            s.snap.stats.files,
            tags
        )?;
    }
    stdout_write(&out)?;
    Ok(exit::OK)
}

fn snapshot_json(s: &SnapshotEntry) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "short_id": s.short(),
        "time": time(s.snap.time),
        "host": s.snap.host,
        "user": s.snap.user,
        "source": s.snap.source,
        "tags": s.snap.tags,
        "parent": s.snap.parent,
        "files": s.snap.stats.files,
        "dirs": s.snap.stats.dirs,
        "bytes": s.snap.stats.bytes,
        "errors": s.snap.errors.len(),
    })
}

fn line(out: &mut Vec<u8>, n: &Node, shown: &[u8]) {
    let owner = |name: &str, id: u32| {
        if name.is_empty() {
            id.to_string()
        } else {
            name.to_string()
        }
    };
    let size = match n.kind {
        NodeKind::CharDevice | NodeKind::BlockDevice => {
            format!("{},{}", n.rdev >> 8, n.rdev & 0xff)
        }
        _ => n.size.to_string(),
    };
    let _ = write!(
        out,
        "{} {:>8} {:>8} {:>12} {} ",
        n.mode_string(),
        owner(&n.user, n.uid),
        owner(&n.group, n.gid),
        size,
        time(n.mtime),
    );
    out.extend_from_slice(escape(shown).as_bytes());
    if n.kind == NodeKind::Symlink {
        out.extend_from_slice(b" -> ");
        out.extend_from_slice(escape(&n.target).as_bytes());
    }
    out.push(b'\n');
}

fn list_files(store: &Store, target: &str, a: &Args) -> anyhow::Result<i32> {
    let (snap, path) = split_snap(target);
    let s = store.resolve_snapshot(snap)?;
    let path = path
        .map(|p| p.as_bytes().to_vec())
        .unwrap_or_else(|| s.snap.path.clone());
    let node = store.lookup(&s, &path)?;
    let base = if path.first() == Some(&b'/') {
        path.clone()
    } else {
        join(&s.snap.path, &path)
    };
    if a.json {
        // Streamed, not collected: a listing may be as large as the snapshot.
        let mut w = std::io::BufWriter::new(std::io::stdout().lock());
        let res = (|| -> anyhow::Result<u64> {
            let mut ser = serde_json::Serializer::pretty(&mut w);
            let mut seq = ser.serialize_seq(None)?;
            let mut too_deep = 0;
            if node.kind != NodeKind::Dir {
                seq.serialize_element(&entry_json(&node, &base))?;
            } else {
                too_deep = walk(store, &node, &base, a.recursive, &mut |n, full| {
                    seq.serialize_element(&entry_json(n, full))?;
                    Ok(())
                })?;
            }
            seq.end()?;
            w.write_all(b"\n")?;
            w.flush()?;
            Ok(too_deep)
        })();
        return finish(res);
    }
    let mut out = Vec::new();
    if node.kind != NodeKind::Dir {
        line(&mut out, &node, &path);
        stdout_write(&out)?;
        return Ok(exit::OK);
    }
    let too_deep = walk(store, &node, &base, a.recursive, &mut |n, full| {
        line(&mut out, n, if a.recursive { full } else { &n.name });
        if out.len() > 1 << 20 {
            stdout_write(&out)?;
            out.clear();
        }
        Ok(())
    })?;
    stdout_write(&out)?;
    finish(Ok(too_deep))
}

/// The exit of a listing that found `too_deep` directories it could not descend into (each
/// already reported), or failed writing (a closed pipe is success, as for `stdout_write`).
fn finish(res: anyhow::Result<u64>) -> anyhow::Result<i32> {
    match res {
        Ok(0) => Ok(exit::OK),
        Ok(n) => Err(ExitWith(
            exit::ERROR,
            format!(
                "{n} director{} nested more than {MAX_DEPTH} levels deep were not listed",
                if n == 1 { "y" } else { "ies" }
            ),
        )
        .into()),
        Err(e) if broken_pipe(&e) => Ok(exit::OK),
        Err(e) => Err(e),
    }
}

/// Did writing to stdout fail because the reader went away?
pub(crate) fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .map(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            .or_else(|| {
                c.downcast_ref::<serde_json::Error>()
                    .and_then(|e| e.io_error_kind())
                    .map(|k| k == std::io::ErrorKind::BrokenPipe)
            })
            .unwrap_or(false)
    })
}

/// One entry of `ls -json SNAP[:PATH]`.
fn entry_json(n: &Node, full: &[u8]) -> serde_json::Value {
    let mut v = serde_json::json!({
        "type": format!("{:?}", n.kind).to_lowercase(),
        "mode": n.mode_string(),
        "uid": n.uid,
        "gid": n.gid,
        "user": n.user,
        "group": n.group,
        "size": n.size,
        "mtime": time(n.mtime),
        "target": null,
    });
    let obj = v.as_object_mut().expect("an object");
    exact(obj, "path", full);
    exact(obj, "name", &n.name);
    if n.kind == NodeKind::Symlink {
        exact(obj, "target", &n.target);
    }
    v
}

/// `key`: the bytes as a string when they are UTF-8; otherwise lossily, with the exact bytes
/// in hex under `key_hex`.
pub(crate) fn exact(obj: &mut serde_json::Map<String, serde_json::Value>, key: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => {
            obj.insert(key.into(), s.into());
        }
        Err(_) => {
            obj.insert(key.into(), String::from_utf8_lossy(b).into());
            obj.insert(format!("{key}_hex"), hex::encode(b).into());
        }
    }
}

/// A directory's tree, with a warning for each entry it had to leave out.
pub(crate) fn load_tree(store: &Store, id: &BlobId, dir: &[u8]) -> anyhow::Result<Arc<Tree>> {
    let t = store.load_tree(id)?;
    for r in &t.rejected {
        warn_once(format!(
            "left out {}: {} (the snapshot holds a bad entry; `check` reports it)",
            escape(&join(dir, &r.name)),
            r.why
        ));
    }
    Ok(t)
}

/// One directory being listed: its tree, the next entry, and the length of its path in the
/// walk's path buffer.
struct Frame {
    tree: Arc<Tree>,
    next: usize,
    base_len: usize,
}

/// Call `emit` with each entry below `dir` and its full path, in order (depth first with
/// `recursive`). No recursion: the directories being listed are on an explicit stack of at
/// most [`MAX_DEPTH`], and one path buffer holds the current path. Returns how many directories
/// were too deep to list (each reported on stderr).
fn walk(
    store: &Store,
    dir: &Node,
    base: &[u8],
    recursive: bool,
    emit: &mut dyn FnMut(&Node, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let Some(sub) = dir.subtree else {
        return Ok(0);
    };
    let mut path = base.to_vec();
    let mut too_deep = 0;
    let mut stack = vec![Frame {
        tree: load_tree(store, &sub, &path)?,
        next: 0,
        base_len: path.len(),
    }];
    while let Some(top) = stack.last_mut() {
        let tree = top.tree.clone();
        let Some(n) = tree.nodes.get(top.next) else {
            stack.pop();
            continue;
        };
        top.next += 1;
        path.truncate(top.base_len);
        if path.last() != Some(&b'/') {
            path.push(b'/');
        }
        path.extend_from_slice(&n.name);
        emit(n, &path)?;
        if let (true, NodeKind::Dir, Some(sub)) = (recursive, n.kind, n.subtree) {
            if stack.len() >= MAX_DEPTH {
                eprintln!(
                    "kloset: {}: nested more than {MAX_DEPTH} directories deep; not listed below it",
                    escape(&path)
                );
                too_deep += 1;
                continue;
            }
            let t = load_tree(store, &sub, &path)?;
            stack.push(Frame {
                tree: t,
                next: 0,
                base_len: path.len(),
            });
        }
    }
    Ok(too_deep)
}
