//! `restore [-to DIR] SNAP[:PATH]`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;

use super::progress::Bar;
use super::{Ctx, bytes, exit, split_snap};
use crate::store::restore::{self, RestoreOptions, RestoreProgress, ResumeMarker};

#[derive(Parser, Debug)]
pub struct Args {
    /// Where to restore: a directory (created if missing; default: the current directory),
    /// sftp://[user@]host[:port]/path, or @NAME (a named destination).
    #[arg(long, value_name = "DIR")]
    pub to: Option<String>,
    /// SNAP or SNAP:PATH.
    pub target: String,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let (snap, path) = split_snap(&a.target);
    let store = ctx.open()?;
    let s = store.resolve_snapshot(snap)?;
    let to = a.to.unwrap_or_else(|| ".".into());
    let dest = ctx.destination(&to)?;
    let _lock = store.lock(false, "restore")?;
    let progress = Arc::new(RestoreProgress::default());
    let bar = {
        let p = progress.clone();
        Bar::bytes(ctx.progress(), "restore", move || {
            (
                p.bytes.load(Ordering::Relaxed),
                p.total_bytes.load(Ordering::Relaxed),
            )
        })
    };
    // Only a restore that resumes one kloset started (and did not finish) into the same place
    // trusts files it finds there; see `ResumeMarker`.
    let marker = ResumeMarker::new(&dest.describe(), &s.id, path.map(str::as_bytes));
    let resume = marker.as_ref().is_some_and(ResumeMarker::exists);
    if let Some(m) = &marker {
        m.create();
    }
    let rep = restore::run(
        &store,
        &s,
        path.map(str::as_bytes),
        dest.as_ref(),
        &RestoreOptions {
            resume,
            ..RestoreOptions::default()
        },
        &progress,
    )?;
    drop(bar);
    if rep.errors.is_empty()
        && let Some(m) = &marker
    {
        m.remove();
    }
    if !ctx.quiet {
        eprintln!(
            "restored {} files, {} dirs, {} other entries ({}) from snapshot {} to {}{}",
            rep.files - rep.skipped,
            rep.dirs,
            rep.others,
            bytes(rep.bytes),
            s.short(),
            dest.describe(),
            if rep.skipped > 0 {
                format!("; {} files were already complete", rep.skipped)
            } else {
                String::new()
            }
        );
    }
    if !rep.errors.is_empty() {
        for (p, e) in &rep.errors {
            eprintln!("kloset: not restored: {}: {e}", String::from_utf8_lossy(p));
        }
        eprintln!("kloset: {} entries could not be restored", rep.errors.len());
        return Ok(exit::PARTIAL);
    }
    Ok(exit::OK)
}
