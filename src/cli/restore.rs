//! `restore [-to DIR] SNAP[:PATH]`.
//!
//! On success one summary line; when entries fail, each is named (escaped as `ls` does) and the
//! summary says how many of how many were restored (or that nothing was), with exit 3.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::Parser;

use super::progress::Bar;
use super::{Ctx, bytes, exit, split_snap};
use crate::store::notice::escape;
use crate::store::restore::{self, RestoreOptions, RestoreProgress, ResumeMarker};

#[derive(Parser, Debug)]
pub struct Args {
    /// Where to restore: a directory (created if missing; default: the current directory),
    /// sftp://[user@]host[:port]/path, or @NAME (a named destination).
    #[arg(long, value_name = "DIR")]
    pub to: Option<String>,
    /// What to do with a file already at the destination: `always` writes it anew (the
    /// default: what is there is not trusted, unless this is a restore kloset started there and
    /// did not finish, which resumes); `if-changed` leaves a regular file whose size and
    /// modification time are the snapshot's, as `rsync -a` does, and sets only its owner, mode
    /// and times where they differ.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "always")]
    pub overwrite: Overwrite,
    /// SNAP or SNAP:PATH.
    pub target: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    Always,
    IfChanged,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let (snap, path) = split_snap(&a.target);
    // The pack reads run on several connections: they log in while the store opens, the
    // snapshot is read, the lock taken and the trees loaded, not after (a login is ~10 round
    // trips).
    let to = a.to.unwrap_or_else(|| ".".into());
    // A remote destination logs in and gets ready (without changing anything) meanwhile,
    // and the restore's lock is written while the store opens.
    let (opened, dest) = std::thread::scope(|sc| {
        let dest = sc.spawn(|| {
            let d = ctx.destination(&to)?;
            d.warm_up();
            anyhow::Ok(d)
        });
        let opened = ctx.open_for_reading_locked("restore");
        let dest = dest.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (opened, dest)
    });
    let (store, early_lock) = opened?;
    let s = store.resolve_snapshot(snap)?;
    let dest = dest?;
    let _lock = store.lock_early(early_lock, "restore")?;
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
    let resumed = marker.as_ref().is_some_and(ResumeMarker::exists);
    let resume = resumed || a.overwrite == Overwrite::IfChanged;
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
    if rep.errors.is_empty() {
        // Finished: a later restore starts afresh.
        if let Some(m) = &marker {
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
                    format!(
                        "; {} files were already there as in the snapshot",
                        rep.skipped
                    )
                } else {
                    String::new()
                }
            );
        }
        return Ok(exit::OK);
    }
    // Some entries failed: each is named, then a summary that counts them (an entry with
    // several errors counts once) and never claims more than was restored.
    for (p, e) in &rep.errors {
        let shown = if p.is_empty() {
            ".".to_string()
        } else {
            escape(p)
        };
        eprintln!("kloset: not restored: {shown}: {}", escape(e.as_bytes()));
    }
    let failed = rep
        .errors
        .iter()
        .map(|(p, _)| p.as_slice())
        .filter(|p| !p.is_empty())
        .collect::<HashSet<_>>()
        .len() as u64;
    let total = rep.entries.max(failed);
    if failed == total {
        eprintln!(
            "kloset: nothing was restored from snapshot {} to {}: {}",
            s.short(),
            dest.describe(),
            if total == 0 {
                "the target directory's metadata could not be set".to_string()
            } else {
                format!("all {total} entries failed")
            }
        );
    } else {
        eprintln!(
            "kloset: restored {} of {total} entries ({}) from snapshot {} to {}; {failed} could not be restored{}",
            total - failed,
            bytes(rep.bytes),
            s.short(),
            dest.describe(),
            if rep.skipped > 0 {
                format!(
                    "; {} files were already there as in the snapshot{}",
                    rep.skipped,
                    if resumed {
                        " (this restore resumed an unfinished one)"
                    } else {
                        ""
                    }
                )
            } else {
                String::new()
            }
        );
    }
    Ok(exit::PARTIAL)
}
