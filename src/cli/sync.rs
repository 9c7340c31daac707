//! `sync [SNAP…] to|from|with OTHER`: copy the snapshots one side lacks to it.
//!
//! `to` copies from this store to OTHER, `from` the other way, `with` both ways. Named
//! snapshots are looked up in the sending store (for `with`, in whichever holds them). OTHER
//! is a path, a URL or `@NAME`; its passphrase is described at [`Ctx::open_other`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;

use super::progress::Bar;
use super::{Ctx, ExitWith, bytes, exit};
use crate::store::sync::{self, SyncOptions, SyncProgress, SyncReport};
use crate::store::{ErrorKind, SnapshotEntry, Store};

#[derive(Parser, Debug)]
pub struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// `[SNAP…] to|from|with OTHER`: snapshots to copy (default: all the other side lacks),
    /// the direction, and the other store (a path, sftp://… or @NAME).
    #[arg(value_name = "[SNAP…] to|from|with OTHER", required = true, num_args = 2..)]
    pub words: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    To,
    From,
    With,
}

fn parse(words: &[String]) -> anyhow::Result<(Vec<String>, Direction, String)> {
    let usage = |msg: String| -> anyhow::Error { ExitWith(exit::USAGE, msg).into() };
    let n = words.len();
    if n < 2 {
        return Err(usage("usage: sync [SNAP…] to|from|with OTHER".into()));
    }
    let dir = match words[n - 2].as_str() {
        "to" => Direction::To,
        "from" => Direction::From,
        "with" => Direction::With,
        w => {
            return Err(usage(format!(
                "sync needs a direction before the other store: to, from or with (got {w:?}); usage: sync [SNAP…] to|from|with OTHER"
            )));
        }
    };
    let snaps = words[..n - 2].to_vec();
    if let Some(w) = snaps
        .iter()
        .find(|w| ["to", "from", "with"].contains(&w.as_str()))
    {
        return Err(usage(format!(
            "{w:?} appears twice; usage: sync [SNAP…] to|from|with OTHER"
        )));
    }
    Ok((snaps, dir, words[n - 1].clone()))
}

fn resolve_all(store: &Store, specs: &[String]) -> anyhow::Result<Vec<SnapshotEntry>> {
    Ok(specs
        .iter()
        .map(|s| store.resolve_snapshot(s))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Split named snapshots between the two stores for `with`: each is looked up here first,
/// then in the other store.
fn split_with(
    this: &Store,
    other: &Store,
    specs: &[String],
) -> anyhow::Result<(Vec<SnapshotEntry>, Vec<SnapshotEntry>)> {
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for s in specs {
        match this.resolve_snapshot(s) {
            Ok(e) => mine.push(e),
            Err(e) if e.kind() == ErrorKind::NoSuchEntry => theirs.push(other.resolve_snapshot(s)?),
            Err(e) => return Err(e.into()),
        }
    }
    Ok((mine, theirs))
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let (specs, dir, other_spec) = parse(&a.words)?;
    let this = ctx.open()?;
    let other = ctx.open_other(&other_spec)?;
    // Packs condemned or deleted between opening the stores and taking the locks are not
    // reused: each store is looked at again with its lock's own listing.
    let _l1 = this.lock_for_writing("sync")?;
    let _l2 = other.lock_for_writing("sync")?;
    let named = !specs.is_empty();
    // (sending store, receiving store, selection) for each direction.
    let mut legs: Vec<(&Store, &Store, Option<Vec<SnapshotEntry>>)> = Vec::new();
    match dir {
        Direction::To => legs.push((
            &this,
            &other,
            named.then(|| resolve_all(&this, &specs)).transpose()?,
        )),
        Direction::From => legs.push((
            &other,
            &this,
            named.then(|| resolve_all(&other, &specs)).transpose()?,
        )),
        Direction::With => {
            let (mine, theirs) = if named {
                let (m, t) = split_with(&this, &other, &specs)?;
                (Some(m), Some(t))
            } else {
                (None, None)
            };
            legs.push((&this, &other, mine));
            legs.push((&other, &this, theirs));
        }
    }
    let progress = Arc::new(SyncProgress::default());
    let bar = {
        let p = progress.clone();
        Bar::bytes(ctx.progress(), "sync", move || {
            (
                p.bytes.load(Ordering::Relaxed),
                p.total_bytes.load(Ordering::Relaxed),
            )
        })
    };
    let mut reports: Vec<(String, String, SyncReport)> = Vec::new();
    for (from, to, sel) in legs {
        let r = sync::run(from, to, sel, &SyncOptions::default(), &progress);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                drop(bar);
                return Err(anyhow::Error::new(e).context(format!(
                    "sync from {} to {}",
                    from.backend().location(),
                    to.backend().location()
                )));
            }
        };
        reports.push((from.backend().location(), to.backend().location(), r));
    }
    drop(bar);
    if a.json {
        let legs: Vec<_> = reports
            .iter()
            .map(|(from, to, r)| {
                serde_json::json!({
                    "from": from,
                    "to": to,
                    "copied": r.copied.iter().map(|(s, d)| serde_json::json!({"source_id": s, "id": d})).collect::<Vec<_>>(),
                    "already_present": r.present,
                    "blobs_read": r.blobs_read,
                    "bytes_read": r.bytes_read,
                    "new_blobs": r.new_blobs,
                    "new_bytes": r.new_bytes,
                    "left_out": r.left_out,
                })
            })
            .collect();
        let mut total = SyncReport::default();
        for (_, _, r) in &reports {
            total.merge(r.clone());
        }
        let v = serde_json::json!({
            "copied": total.copied.len(),
            "already_present": total.present,
            "new_blobs": total.new_blobs,
            "new_bytes": total.new_bytes,
            "directions": legs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !ctx.quiet {
        for (from, to, r) in &reports {
            for (s, d) in &r.copied {
                eprintln!("copied snapshot {} as {}", short(s), short(d));
            }
            eprintln!(
                "sync {from} -> {to}: {} snapshot(s) copied, {} already there; read {} blobs ({}), wrote {} new blobs ({})",
                r.copied.len(),
                r.present,
                r.blobs_read,
                bytes(r.bytes_read),
                r.new_blobs,
                bytes(r.new_bytes),
            );
        }
    }
    // Entries left out of a copy are reported even with -quiet, and the exit code says the
    // copies are not whole.
    let left_out: Vec<&String> = reports.iter().flat_map(|r| &r.2.left_out).collect();
    for l in &left_out {
        eprintln!("kloset: warning: {l}");
    }
    Ok(if left_out.is_empty() {
        exit::OK
    } else {
        exit::PARTIAL
    })
}

/// The first 8 characters of a snapshot id (all of it if shorter).
fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn words() {
        let (s, d, o) = parse(&w(&["to", "@x"])).unwrap();
        assert!(s.is_empty());
        assert_eq!((d, o.as_str()), (Direction::To, "@x"));
        let (s, d, _) = parse(&w(&["ab12", "cd34", "with", "/o"])).unwrap();
        assert_eq!((s.len(), d), (2, Direction::With));
        assert!(parse(&w(&["ab12", "/o"])).is_err());
        assert!(parse(&w(&["to", "to", "/o"])).is_err());
        assert!(parse(&w(&["/o"])).is_err());
    }
}
