//! `rm [SNAP…] [filters] [keep policy] [-dry-run] [-json]` (alias `forget`): remove snapshots.
//!
//! Parse the selection (snapshots named, filters) and the keep policy, decide with
//! [`crate::store::policy`], print every considered snapshot with keep/remove and the rules
//! that kept it, then remove the snapshot files (not with `-dry-run`). Only snapshot files are
//! removed: the data they alone referenced stays in the store, unless `-prune` runs
//! `maintenance` right after in the same process (restic's `forget --prune`: one key
//! derivation, one connection), with `-max-unused`, `-grace` and `-now` passed on to it.

use std::collections::HashSet;

use clap::Parser;
use jiff::tz::TimeZone;

use super::{Ctx, ExitWith, exit, maintenance, stdout_write, time};
use crate::store::backend::FileType;
use crate::store::error::ErrorKind;
use crate::store::notice::escape;
use crate::store::policy::{self, Count0, GroupBy, Policy};
use crate::store::{SnapshotEntry, now_ns};

#[derive(Parser, Debug)]
pub struct Args {
    /// Snapshots to remove: full ids, unique prefixes or `latest`. With filters or a keep
    /// policy, only these are considered.
    pub snapshots: Vec<String>,
    /// Only snapshots with this tag (repeatable: any of them).
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,
    /// Only snapshots of this host (repeatable).
    #[arg(long, value_name = "HOST")]
    pub host: Vec<String>,
    /// Only snapshots of this source, as `ls` shows it (repeatable).
    #[arg(long, value_name = "PATH")]
    pub source: Vec<String>,
    /// Only snapshots taken before WHEN: RFC 3339 time, a date (local midnight), or a duration
    /// ago such as `30d` or `12h`.
    #[arg(long, value_name = "WHEN")]
    pub before: Option<String>,
    /// Only snapshots taken at or after WHEN (as for -before).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Keep the N newest snapshots of each group (`unlimited` allowed).
    #[arg(long, value_name = "N")]
    pub keep_last: Option<String>,
    /// Keep the newest snapshot of each of the N latest hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<String>,
    /// ... of the N latest days (local time).
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<String>,
    /// ... of the N latest ISO weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<String>,
    /// ... of the N latest months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<String>,
    /// ... of the N latest years.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<String>,
    /// Keep every snapshot taken within DURATION (e.g. `30d`) of its group's newest.
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep every snapshot with this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// Apply the policy to each group of snapshots with the same values of these
    /// (comma-separated: host, source, tags).
    #[arg(long, value_name = "FIELDS", default_value = "host,source")]
    pub group_by: String,
    /// Print what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Then give back the space the removed snapshots alone used: run `maintenance` in the same
    /// process (its lock taken once rm's is released), as `kloset maintenance` would.
    #[arg(long)]
    pub prune: bool,
    /// With `-prune`: maintenance's `-max-unused`.
    #[arg(long, value_name = "PERCENT", requires = "prune")]
    pub max_unused: Option<String>,
    /// With `-prune`: maintenance's `-grace`.
    #[arg(long, value_name = "DURATION", requires = "prune")]
    pub grace: Option<String>,
    /// With `-prune`: maintenance's `-now`.
    #[arg(long, requires = "prune")]
    pub now: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn usage(msg: String) -> anyhow::Error {
    ExitWith(exit::USAGE, msg).into()
}

/// A point in time given on the command line, in ns since the epoch: an RFC 3339 time, a civil
/// date-time or date in `tz`, or a duration before `now_ns`.
pub fn parse_when(s: &str, now_ns: i128, tz: &TimeZone) -> Result<i128, String> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t.as_nanosecond());
    }
    if let Ok(dt) = s.parse::<jiff::civil::DateTime>()
        && let Ok(z) = dt.to_zoned(tz.clone())
    {
        return Ok(z.timestamp().as_nanosecond());
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>()
        && let Ok(z) = d.to_zoned(tz.clone())
    {
        return Ok(z.timestamp().as_nanosecond());
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_ns - d.as_nanos() as i128);
    }
    Err(format!(
        "{s:?} is not a time: give an RFC 3339 time (2024-05-01T00:00:00Z), a date (2024-05-01) or a duration ago (30d, 12h)"
    ))
}

fn count(flag: &str, v: &Option<String>) -> anyhow::Result<Count0> {
    match v {
        None => Ok(Count0::Off),
        Some(s) => Count0::parse(s).map_err(|e| usage(format!("-{flag}: {e}"))),
    }
}

fn ns(s: &SnapshotEntry) -> i128 {
    s.snap.time.sec as i128 * 1_000_000_000 + s.snap.time.nsec as i128
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let tz = TimeZone::system();
    let now = now_ns() as i128;
    let policy = Policy {
        last: count("keep-last", &a.keep_last)?,
        hourly: count("keep-hourly", &a.keep_hourly)?,
        daily: count("keep-daily", &a.keep_daily)?,
        weekly: count("keep-weekly", &a.keep_weekly)?,
        monthly: count("keep-monthly", &a.keep_monthly)?,
        yearly: count("keep-yearly", &a.keep_yearly)?,
        within_ns: a
            .keep_within
            .as_deref()
            .map(|s| {
                humantime::parse_duration(s)
                    .map(|d| d.as_nanos() as i128)
                    .map_err(|e| usage(format!("-keep-within {s:?}: {e}")))
            })
            .transpose()?,
        tags: a.keep_tag.clone(),
    };
    let group_by = GroupBy::parse(&a.group_by).map_err(usage)?;
    let prune = a
        .prune
        .then(|| {
            maintenance::options(
                a.dry_run,
                a.max_unused.as_deref().unwrap_or(maintenance::MAX_UNUSED),
                a.grace.as_deref().unwrap_or(maintenance::GRACE),
                a.now,
            )
        })
        .transpose()?;
    let before = a
        .before
        .as_deref()
        .map(|s| parse_when(s, now, &tz).map_err(|e| usage(format!("-before: {e}"))))
        .transpose()?;
    let since = a
        .since
        .as_deref()
        .map(|s| parse_when(s, now, &tz).map_err(|e| usage(format!("-since: {e}"))))
        .transpose()?;
    let filtered = !a.tag.is_empty()
        || !a.host.is_empty()
        || !a.source.is_empty()
        || before.is_some()
        || since.is_some();
    if a.snapshots.is_empty() && !filtered && policy.is_empty() {
        return Err(usage(
            "rm needs snapshots, a filter (-tag, -host, -source, -before, -since) or a keep policy (-keep-last N, -keep-daily N, …); it never removes everything by default".into(),
        ));
    }

    // Snapshot files only: the index (every index file, every pack directory listed) is not
    // needed.
    let store = {
        let (b, p) = ctx.store_access()?;
        crate::store::Store::open_no_index(b, &|c| p.get(c))?
    };
    let lock = store.lock(false, "rm")?;
    let (all, _) = store.snapshots()?;
    let mut considered: Vec<SnapshotEntry> = if a.snapshots.is_empty() {
        all
    } else {
        let mut seen = HashSet::new();
        let mut v = Vec::new();
        for spec in &a.snapshots {
            let s = store.resolve_snapshot(spec)?;
            if seen.insert(s.id.clone()) {
                v.push(s);
            }
        }
        v
    };
    considered.retain(|s| {
        (a.tag.is_empty() || a.tag.iter().any(|t| s.snap.tags.contains(t)))
            && (a.host.is_empty() || a.host.contains(&s.snap.host))
            && (a.source.is_empty() || a.source.contains(&s.snap.source))
            && before.is_none_or(|b| ns(s) < b)
            && since.is_none_or(|b| ns(s) >= b)
    });
    considered.sort_by(|x, y| (ns(x), &x.id).cmp(&(ns(y), &y.id)));

    // Without a policy, everything selected goes; with one, what it does not keep.
    let decisions: Vec<policy::Decision> = if policy.is_empty() {
        considered
            .iter()
            .map(|_| policy::Decision::default())
            .collect()
    } else {
        let refs: Vec<_> = considered.iter().map(|s| &s.snap).collect();
        policy::apply(&policy, group_by, &refs, &tz)
    };

    let removing: Vec<&SnapshotEntry> = considered
        .iter()
        .zip(&decisions)
        .filter(|(_, d)| !d.keep)
        .map(|(s, _)| s)
        .collect();
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    // With the server lost (or a reconnect refused for its host key), every removal left would
    // wait as long and fail the same way: rm stops and says so in one line, with its exit code.
    let mut lost = None;
    if !a.dry_run {
        for s in &removing {
            match store.backend().remove(FileType::Snapshot, &s.id) {
                Ok(()) => {
                    removed.push(s.id.clone());
                    crate::store::debug_point("rm-removed");
                }
                Err(e) if matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::HostKey) => {
                    lost = Some(e);
                    break;
                }
                Err(e) => failed.push(format!("snapshot {}: {e}", s.short())),
            }
        }
    }

    if a.json {
        let rows: Vec<_> = considered
            .iter()
            .zip(&decisions)
            .map(|(s, d)| {
                serde_json::json!({
                    "id": s.id,
                    "time": time(s.snap.time),
                    "host": s.snap.host,
                    "source": s.snap.source,
                    "tags": s.snap.tags,
                    "action": if d.keep { "keep" } else { "remove" },
                    "reasons": d.reasons,
                    "removed": removed.contains(&s.id),
                })
            })
            .collect();
        let mut v = serde_json::json!({
            "dry_run": a.dry_run,
            "snapshots": rows,
            "removed": removed.len(),
            "kept": considered.len() - removing.len(),
            "errors": failed,
        });
        if let Some(opts) = &prune
            && lost.is_none()
        {
            drop(lock);
            let r = maintenance::run_on(&store, opts)?;
            v["maintenance"] = serde_json::to_value(&r)?;
            stdout_write(format!("{}\n", serde_json::to_string_pretty(&v)?).as_bytes())?;
            let warned = maintenance::warn_not_removed(&r);
            return finish(&failed, None, &removed, &removing).map(|c| partial_if(c, warned));
        }
        stdout_write(format!("{}\n", serde_json::to_string_pretty(&v)?).as_bytes())?;
    } else {
        let mut out = String::new();
        for (s, d) in considered.iter().zip(&decisions) {
            out.push_str(&format!(
                "{}  {}  {}  {}  {:<6}  {}\n",
                s.short(),
                time(s.snap.time),
                escape(s.snap.host.as_bytes()),
                escape(s.snap.source.as_bytes()),
                if d.keep { "keep" } else { "remove" },
                d.reasons.join(", ")
            ));
        }
        stdout_write(out.as_bytes())?;
        if !ctx.quiet && lost.is_none() {
            let verb = if a.dry_run { "would remove" } else { "removed" };
            let n = if a.dry_run {
                removing.len()
            } else {
                removed.len()
            };
            eprintln!(
                "{verb} {n} snapshot(s), kept {}; {}",
                considered.len() - removing.len(),
                if prune.is_some() {
                    "maintenance follows (-prune)"
                } else {
                    "rm removes snapshot files only: the data they alone used stays in the store (run maintenance, or rm -prune)"
                }
            );
        }
    }
    if let Some(opts) = &prune
        && lost.is_none()
    {
        drop(lock);
        let r = maintenance::run_on(&store, opts)?;
        if !ctx.quiet {
            stdout_write(maintenance::summary(&r).as_bytes())?;
        }
        let warned = maintenance::warn_not_removed(&r);
        return finish(&failed, None, &removed, &removing).map(|c| partial_if(c, warned));
    }
    finish(&failed, lost, &removed, &removing)
}

/// Exit 3 instead of 0 when maintenance left something it says it could not remove.
fn partial_if(code: i32, warned: bool) -> i32 {
    if code == exit::OK && warned {
        exit::PARTIAL
    } else {
        code
    }
}

/// Report what `rm` could not remove and choose its exit.
fn finish(
    failed: &[String],
    lost: Option<crate::store::Error>,
    removed: &[String],
    removing: &[&SnapshotEntry],
) -> anyhow::Result<i32> {
    for f in failed {
        eprintln!("kloset: not removed: {f}");
    }
    if let Some(e) = lost {
        let kind = e.kind();
        return Err(crate::store::Error::Connector(
            format!(
                "{e}; rm removed {} of the {} snapshot(s) to remove before that: run it again for the rest",
                removed.len(),
                removing.len()
            ),
            kind,
        )
        .into());
    }
    Ok(if failed.is_empty() {
        exit::OK
    } else {
        exit::ERROR
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_on_the_command_line() {
        let utc = TimeZone::UTC;
        let now = 1_700_000_000 * 1_000_000_000i128;
        assert_eq!(
            parse_when("2024-05-01T00:00:00Z", now, &utc),
            Ok(1_714_521_600 * 1_000_000_000)
        );
        assert_eq!(
            parse_when("2024-05-01", now, &utc),
            Ok(1_714_521_600 * 1_000_000_000)
        );
        let plus2 = TimeZone::fixed(jiff::tz::offset(2));
        assert_eq!(
            parse_when("2024-05-01", now, &plus2),
            Ok((1_714_521_600 - 7200) * 1_000_000_000)
        );
        assert_eq!(
            parse_when("30d", now, &utc),
            Ok(now - 30 * 86_400 * 1_000_000_000)
        );
        assert_eq!(
            parse_when("12h", now, &utc),
            Ok(now - 12 * 3600 * 1_000_000_000)
        );
        assert!(parse_when("yesterday-ish", now, &utc).is_err());
    }
}
