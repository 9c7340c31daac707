//! `check [-fast] [SNAP…]` (alias `verify`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;

use super::progress::Bar;
use super::{Ctx, exit};
use crate::store::check::{self, CheckProgress};
use crate::store::notice::escape;

#[derive(Parser, Debug)]
pub struct Args {
    /// Check structure and presence only; do not read pack contents.
    #[arg(long)]
    pub fast: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Snapshots to check (default: the whole store).
    pub snapshots: Vec<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    let _lock = store.lock(false, "check")?;
    let selected = if a.snapshots.is_empty() {
        None
    } else {
        Some(
            a.snapshots
                .iter()
                .map(|s| store.resolve_snapshot(s))
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    let progress = Arc::new(CheckProgress::default());
    let bar = {
        let p = progress.clone();
        Bar::items(ctx.progress(), "check", move || {
            (
                p.packs.load(Ordering::Relaxed),
                p.total_packs.load(Ordering::Relaxed),
            )
        })
    };
    let rep = check::run(&store, selected, a.fast, &progress)?;
    drop(bar);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        // Messages and paths may hold names from the snapshots: shown escaped, as `ls` does.
        for n in &rep.notes {
            eprintln!("note: {}", escape(n.as_bytes()));
        }
        for e in &rep.errors {
            println!("damaged: {}", escape(e.as_bytes()));
        }
        for (snap, paths) in &rep.damaged {
            println!(
                "snapshot {snap}: {} path(s) cannot be restored:",
                paths.len()
            );
            for p in paths {
                println!("  {}", escape(p.as_bytes()));
            }
        }
        if !ctx.quiet || !rep.ok() {
            eprintln!(
                "{}: {} snapshots, {} trees, {} blobs in {} packs {}",
                if rep.ok() { "ok" } else { "DAMAGED" },
                rep.snapshots,
                rep.trees,
                rep.blobs,
                rep.packs,
                if a.fast {
                    "checked for presence"
                } else {
                    "read and authenticated"
                }
            );
        }
    }
    Ok(if rep.ok() { exit::OK } else { exit::DAMAGED })
}
