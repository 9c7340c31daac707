//! `ls`: snapshots (one per line, oldest first), or `ls SNAP[:PATH]`: a directory's entries.

use std::io::Write;

use clap::Parser;

use super::{Ctx, bytes, exit, split_snap, stdout_write, time};
use crate::store::Store;
use crate::store::repo::SnapshotEntry;
use crate::store::tree::{Node, NodeKind, join};

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
            format!("  tags={}", s.snap.tags.join(","))
        };
        writeln!(
            out,
            "{}  {}  {}  {}  {}  {} files{}",
            s.short(),
            time(s.snap.time),
            s.snap.host,
            s.snap.source,
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
    out.extend_from_slice(shown);
    if n.kind == NodeKind::Symlink {
        out.extend_from_slice(b" -> ");
        out.extend_from_slice(&n.target);
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
        let mut v = Vec::new();
        if node.kind != NodeKind::Dir {
            v.push(entry_json(&node, &base));
        } else {
            walk(store, &node, &base, a.recursive, &mut |n, full| {
                v.push(entry_json(n, full));
                Ok(())
            })?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(exit::OK);
    }
    let mut out = Vec::new();
    if node.kind != NodeKind::Dir {
        line(&mut out, &node, &path);
        stdout_write(&out)?;
        return Ok(exit::OK);
    }
    walk(store, &node, &base, a.recursive, &mut |n, full| {
        line(&mut out, n, if a.recursive { full } else { &n.name });
        if out.len() > 1 << 20 {
            stdout_write(&out)?;
            out.clear();
        }
        Ok(())
    })?;
    stdout_write(&out)?;
    Ok(exit::OK)
}

/// One entry of `ls -json SNAP[:PATH]`.
fn entry_json(n: &Node, full: &[u8]) -> serde_json::Value {
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    serde_json::json!({
        "path": lossy(full),
        "name": lossy(&n.name),
        "type": format!("{:?}", n.kind).to_lowercase(),
        "mode": n.mode_string(),
        "uid": n.uid,
        "gid": n.gid,
        "user": n.user,
        "group": n.group,
        "size": n.size,
        "mtime": time(n.mtime),
        "target": (n.kind == NodeKind::Symlink).then(|| lossy(&n.target)),
    })
}

/// Call `emit` with each entry below `dir` and its full path, in order.
fn walk(
    store: &Store,
    dir: &Node,
    base: &[u8],
    recursive: bool,
    emit: &mut dyn FnMut(&Node, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let Some(sub) = dir.subtree else {
        return Ok(());
    };
    let t = store.load_tree(&sub)?;
    for n in &t.nodes {
        let full = join(base, &n.name);
        emit(n, &full)?;
        if recursive && n.kind == NodeKind::Dir {
            walk(store, n, &full, true, emit)?;
        }
    }
    Ok(())
}
