//! `maintenance [-dry-run] [-max-unused 5%] [-grace 24h] [-now] [-json]` (alias `prune`):
//! give back the space of data no snapshot references.
//!
//! Takes the maintenance lock (two runs exclude each other; backups, syncs, restores and
//! mounts go on), runs [`crate::store::maintenance`], and prints its plan and summary: packs
//! kept, condemned, repacked and deleted, bytes freed, bytes moved over the transport, and
//! when the packs condemned now can go.

use clap::Parser;

use super::{Ctx, ExitWith, bytes, exit, stdout_write};
use crate::store::lock::MAINTENANCE;
use crate::store::maintenance::{self, Options, Report};
use crate::store::notice::escape;
use crate::store::{Store, now_ns};

#[derive(Parser, Debug)]
pub struct Args {
    /// Print the plan; write and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Repack partly used packs while their unused bytes exceed this share of the packs
    /// (`5%`, `0.05`, `0` to repack all).
    #[arg(long, value_name = "PERCENT", default_value = MAX_UNUSED)]
    pub max_unused: String,
    /// Delete a condemned pack only once it was condemned this long ago, by an earlier run
    /// (`24h`, `30m`, `0`).
    #[arg(long, value_name = "DURATION", default_value = GRACE)]
    pub grace: String,
    /// Delete unreferenced data at once, in this run. Refused while any other process holds a
    /// lease on the store: for a store one host uses.
    #[arg(long)]
    pub now: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `-max-unused`'s default.
pub const MAX_UNUSED: &str = "5%";
/// `-grace`'s default.
pub const GRACE: &str = "24h";

fn usage(msg: String) -> anyhow::Error {
    ExitWith(exit::USAGE, msg).into()
}

/// `5%` or `0.05` as a fraction.
fn fraction(s: &str) -> anyhow::Result<f64> {
    let bad = || {
        usage(format!(
            "-max-unused {s:?}: give a percentage such as 5% or 0"
        ))
    };
    let v = match s.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
        None => s.trim().parse::<f64>().map_err(|_| bad())?,
    };
    if !(0.0..=1.0).contains(&v) || !v.is_finite() {
        return Err(bad());
    }
    Ok(v)
}

fn duration(s: &str) -> anyhow::Result<std::time::Duration> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| usage(format!("-grace {s:?}: {e}")))
}

/// Maintenance's options from its command-line values (also `rm -prune`'s).
pub fn options(dry_run: bool, max_unused: &str, grace: &str, now: bool) -> anyhow::Result<Options> {
    Ok(Options {
        dry_run,
        max_unused: fraction(max_unused)?,
        grace: duration(grace)?,
        now,
    })
}

/// Take the maintenance lock on an open store and run maintenance.
pub fn run_on(store: &Store, opts: &Options) -> anyhow::Result<Report> {
    let lock = store.lock(false, MAINTENANCE)?;
    Ok(maintenance::run(store, &lock, opts)?)
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let opts = options(a.dry_run, &a.max_unused, &a.grace, a.now)?;
    let (b, p) = ctx.store_access()?;
    let store = Store::open_no_index(b, &|c| p.get(c))?;
    let r = run_on(&store, &opts)?;
    if a.json {
        let mut v = serde_json::to_string_pretty(&r)?;
        v.push('\n');
        stdout_write(v.as_bytes())?;
    } else if !ctx.quiet {
        stdout_write(summary(&r).as_bytes())?;
    }
    Ok(if warn_not_removed(&r) {
        exit::PARTIAL
    } else {
        exit::OK
    })
}

/// Lines printed for temporaries not removed, at most; then how many more.
const NOT_REMOVED_LINES: usize = 10;

/// Say which upload temporaries the store would not let go (on stderr, one line each, the
/// first ten); whether there were any (the run then exits 3).
pub fn warn_not_removed(r: &Report) -> bool {
    let all = &r.temporaries_not_removed;
    for (path, why) in all.iter().take(NOT_REMOVED_LINES) {
        eprintln!(
            "kloset: {}: left a temporary file of an unfinished upload that could not be removed ({}); nothing refers to it: remove it on the server by hand",
            escape(path.as_bytes()),
            escape(why.as_bytes())
        );
    }
    if all.len() > NOT_REMOVED_LINES {
        eprintln!(
            "kloset: and {} more temporary files that could not be removed (`maintenance -json` lists them all)",
            all.len() - NOT_REMOVED_LINES
        );
    }
    !all.is_empty()
}

/// The plan (with `-dry-run`) or what was done, for people.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let verb = |done: &str, would: &str| if r.dry_run { would } else { done }.to_string();
    s += &format!(
        "{} snapshots, {} trees, {} referenced blobs; {} packs, {} ({} unused)\n",
        r.snapshots,
        r.trees,
        r.referenced_blobs,
        r.packs,
        bytes(r.pack_bytes),
        bytes(r.unused_bytes)
    );
    if !r.live_leases.is_empty() {
        s += &format!("in use by: {}\n", r.live_leases.join(", "));
    }
    s += &format!("kept:        {} packs\n", r.kept);
    s += &format!(
        "{} {} packs, {} (unused)\n",
        verb("condemned:  ", "to condemn: "),
        r.condemned,
        bytes(r.condemned_bytes)
    );
    s += &format!(
        "{} {} packs, {} (their used blobs into {} new packs, {})\n",
        verb("repacked:   ", "to repack:  "),
        r.repacked,
        bytes(r.repacked_bytes),
        if r.dry_run {
            "some".to_string()
        } else {
            r.new_packs.to_string()
        },
        bytes(r.new_pack_bytes)
    );
    if r.uncondemned > 0 {
        s += &format!(
            "{} {} packs (referenced again)\n",
            verb("restored:   ", "to restore: "),
            r.uncondemned
        );
    }
    s += &format!(
        "{} {} packs, {} freed\n",
        verb("deleted:    ", "to delete:  "),
        r.deleted,
        bytes(r.deleted_bytes)
    );
    if r.temporaries > 0 {
        s += &format!(
            "{} {} temporary files of unfinished uploads, {}\n",
            verb("removed:    ", "to remove:  "),
            r.temporaries,
            bytes(r.temporary_bytes)
        );
    }
    if r.waiting > 0 {
        let when = r
            .earliest_delete_ns
            .map(|t| {
                let left = (t - now_ns()).max(0) as u64;
                format!(
                    "the first can go in a run from {} on",
                    super::time(crate::store::tree::Time {
                        sec: t.div_euclid(1_000_000_000),
                        nsec: 0,
                    })
                ) + &if left > 0 {
                    format!(
                        " (in {})",
                        humantime::format_duration(std::time::Duration::from_secs(
                            left / 1_000_000_000
                        ))
                    )
                } else {
                    String::new()
                }
            })
            .unwrap_or_default();
        s += &format!(
            "waiting:     {} condemned packs, {}: {when}, and once every process using the store now has finished\n",
            r.waiting,
            bytes(r.waiting_bytes)
        );
    }
    s += &format!(
        "transport:   {} read, {} written; {} index files written, {} removed; {:.1} s\n",
        bytes(r.bytes_read),
        bytes(r.bytes_written),
        r.index_files_written,
        r.index_files_removed,
        r.duration_ms as f64 / 1000.0
    );
    s
}
