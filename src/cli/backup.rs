//! `backup`: a directory (default: the current one) into a new snapshot.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use clap::Parser;

use super::progress::Bar;
use super::{Ctx, bytes, exit};
use crate::store::backup::{self, BackupOptions, Progress};
use crate::store::notice::escape;

#[derive(Parser, Debug)]
pub struct Args {
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Leave out paths matching this glob (repeatable); a pattern with `/` matches the whole
    /// path, one without matches base names.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Read exclude patterns from a file, one per line (`#` starts a comment).
    #[arg(long, value_name = "FILE")]
    pub exclude_file: Vec<PathBuf>,
    /// Read every file, ignoring the previous snapshot of this source.
    #[arg(long)]
    pub force_full: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// What to back up: a local path (default: the current directory),
    /// sftp://[user@]host[:port]/path, or @NAME (a named source).
    pub path: Option<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let mut patterns = a.exclude.clone();
    for f in &a.exclude_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("exclude file {}", f.display()))?;
        patterns.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    let exclude = backup::exclude_set(&patterns)?;
    let path = match a.path {
        Some(p) => p,
        None => std::env::current_dir()
            .context("the current directory")?
            .to_string_lossy()
            .into_owned(),
    };
    // The source is opened first and its listing starts while the store is opened (SSH login,
    // key derivation, index): with a cold page cache, reading the inodes is most of an
    // unchanged backup.
    let source = ctx.source(&path)?;
    let opts = BackupOptions {
        tags: a.tags,
        exclude,
        workers: 0,
        no_parent: a.force_full,
    };
    let progress = Arc::new(Progress::default());
    let res = backup::with_lister(source.as_ref(), opts.exclude.as_ref(), |lister| {
        let (store, early_lock) = ctx.open_for_writing("backup")?;
        crate::store::debug_point("backup-opened");
        let _lock = {
            let _t = crate::trace::span("lock");
            // Packs condemned or deleted between opening the store and taking the lock are
            // not reused: the store is looked at again with the lock's own listing.
            store.lock_for_writing_early(early_lock, "backup")?
        };
        let bar = {
            let p = progress.clone();
            Bar::bytes(ctx.progress(), "backup", move || {
                (
                    p.bytes.load(Ordering::Relaxed),
                    p.total_bytes.load(Ordering::Relaxed),
                )
            })
        };
        let res = backup::run_listed(&store, source.as_ref(), &opts, &progress, lister)?;
        drop(bar);
        anyhow::Ok(res)
    })?;
    let s = &res.snapshot;
    if a.json {
        let v = serde_json::json!({
            "id": res.id,
            "short_id": res.id.get(..8).unwrap_or(&res.id),
            "source": s.source,
            "files": s.stats.files,
            "dirs": s.stats.dirs,
            "bytes": s.stats.bytes,
            "bytes_read": s.stats.bytes_read,
            "new_blobs": s.stats.new_blobs,
            "new_bytes": s.stats.new_bytes,
            "duration_ms": s.duration_ms,
            "errors": s.errors.iter().map(|(p, e)| serde_json::json!({"path": String::from_utf8_lossy(p), "error": e})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", res.id.get(..8).unwrap_or(&res.id));
        if !ctx.quiet {
            eprintln!(
                "snapshot {} of {}: {} files, {} dirs, {} ({} read, {} new in the store) in {:.1}s",
                res.id.get(..8).unwrap_or(&res.id),
                s.source,
                s.stats.files,
                s.stats.dirs,
                bytes(s.stats.bytes),
                bytes(s.stats.bytes_read),
                bytes(s.stats.new_bytes),
                s.duration_ms as f64 / 1000.0
            );
        }
    }
    if !s.errors.is_empty() {
        for (p, e) in &s.errors {
            // Source errors usually name their path already: do not print it twice.
            let p = String::from_utf8_lossy(p);
            // Names from a source are shown escaped, as `ls` shows them.
            if e.starts_with(&*p) {
                eprintln!("kloset: not backed up: {}", escape(e.as_bytes()));
            } else {
                eprintln!(
                    "kloset: not backed up: {}: {}",
                    escape(p.as_bytes()),
                    escape(e.as_bytes())
                );
            }
        }
        eprintln!(
            "kloset: {} file(s) could not be read and are missing from snapshot {}",
            s.errors.len(),
            res.id.get(..8).unwrap_or(&res.id)
        );
        return Ok(exit::PARTIAL);
    }
    Ok(exit::OK)
}
