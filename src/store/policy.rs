//! Retention: which snapshots a keep policy keeps, and why.
//!
//! The rules and their names are restic's, which sysadmins know: `last N` keeps the N newest
//! snapshots; `hourly`/`daily`/`weekly`/`monthly`/`yearly N` keep the newest snapshot of each
//! of the N most recent hours, days, ISO weeks, months and years that have one (calendar
//! buckets in a given time zone, the local one in the CLI); `within D` keeps everything taken
//! within D of the group's newest snapshot; `tag T` keeps every snapshot tagged T. A snapshot is
//! kept when any rule keeps it, and a group's newest snapshot is always kept, so a policy can
//! never empty a group. Snapshots are grouped (by host and source unless told otherwise) and
//! each group is judged on its own. Everything here is pure: the caller gives the snapshots,
//! the time zone and the rules, and gets back a decision per snapshot, which makes the rules
//! testable on a fake calendar.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;

use super::format::Snapshot;

/// A keep policy. The default keeps nothing by itself (only each group's newest snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: Count0,
    pub hourly: Count0,
    pub daily: Count0,
    pub weekly: Count0,
    pub monthly: Count0,
    pub yearly: Count0,
    /// Keep snapshots taken within this many nanoseconds of the group's newest.
    pub within_ns: Option<i128>,
    pub tags: Vec<String>,
}

/// A rule's count: 0 (the rule is off), N, or unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Count0 {
    #[default]
    Off,
    N(u64),
    Unlimited,
}

impl Count0 {
    /// Parse `N` or `unlimited` (`-1` too, as restic accepts).
    pub fn parse(s: &str) -> Result<Count0, String> {
        match s {
            "unlimited" | "-1" => Ok(Count0::Unlimited),
            _ => s
                .parse::<u64>()
                .map(|n| if n == 0 { Count0::Off } else { Count0::N(n) })
                .map_err(|_| format!("{s:?} is not a count: give a number or `unlimited`")),
        }
    }

    fn budget(self) -> u64 {
        match self {
            Count0::Off => 0,
            Count0::N(n) => n,
            Count0::Unlimited => u64::MAX,
        }
    }
}

impl Policy {
    /// Does the policy have any rule at all?
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// What to group snapshots by before a policy is applied to each group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupBy {
    pub host: bool,
    pub source: bool,
    pub tags: bool,
}

impl Default for GroupBy {
    fn default() -> Self {
        GroupBy {
            host: true,
            source: true,
            tags: false,
        }
    }
}

impl GroupBy {
    /// Parse `host,source,tags` (any subset; empty: one group for everything).
    pub fn parse(s: &str) -> Result<GroupBy, String> {
        let mut g = GroupBy {
            host: false,
            source: false,
            tags: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "host" => g.host = true,
                "source" | "path" | "paths" => g.source = true,
                "tags" | "tag" => g.tags = true,
                other => {
                    return Err(format!(
                        "cannot group by {other:?}: use host, source and/or tags"
                    ));
                }
            }
        }
        Ok(g)
    }

    /// The group key of a snapshot.
    pub fn key(&self, s: &Snapshot) -> (String, String, Vec<String>) {
        let mut tags = if self.tags {
            s.tags.clone()
        } else {
            Vec::new()
        };
        tags.sort();
        (
            if self.host {
                s.host.clone()
            } else {
                String::new()
            },
            if self.source {
                s.source.clone()
            } else {
                String::new()
            },
            tags,
        )
    }
}

/// The verdict on one snapshot: kept or not, and the rules that kept it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// Apply `policy` to `snaps`, group by group; returns one decision per snapshot, in the order
/// given.
pub fn apply(
    policy: &Policy,
    group_by: GroupBy,
    snaps: &[&Snapshot],
    tz: &TimeZone,
) -> Vec<Decision> {
    let mut groups: BTreeMap<(String, String, Vec<String>), Vec<usize>> = BTreeMap::new();
    for (i, s) in snaps.iter().enumerate() {
        groups.entry(group_by.key(s)).or_default().push(i);
    }
    let mut out = vec![Decision::default(); snaps.len()];
    for members in groups.values() {
        for (i, d) in apply_group(policy, members.iter().map(|&i| snaps[i]), tz)
            .into_iter()
            .enumerate()
        {
            out[members[i]] = d;
        }
    }
    out
}

fn ns(s: &Snapshot) -> i128 {
    s.time.sec as i128 * 1_000_000_000 + s.time.nsec as i128
}

/// One group: decisions in the order given.
fn apply_group<'a>(
    policy: &Policy,
    snaps: impl Iterator<Item = &'a Snapshot>,
    tz: &TimeZone,
) -> Vec<Decision> {
    let snaps: Vec<&Snapshot> = snaps.collect();
    let mut order: Vec<usize> = (0..snaps.len()).collect();
    // Newest first; equal times in a fixed order.
    order.sort_by(|&a, &b| ns(snaps[b]).cmp(&ns(snaps[a])).then(a.cmp(&b)));
    let mut out = vec![Decision::default(); snaps.len()];
    let Some(&newest) = order.first() else {
        return out;
    };
    let newest_ns = ns(snaps[newest]);
    type Bucket = fn(&jiff::Zoned) -> (i32, i32, i32, i32);
    let rules: [(&str, Count0, Bucket); 5] = [
        ("hourly", policy.hourly, |z| {
            (
                z.year() as i32,
                z.month() as i32,
                z.day() as i32,
                z.hour() as i32,
            )
        }),
        ("daily", policy.daily, |z| {
            (z.year() as i32, z.month() as i32, z.day() as i32, 0)
        }),
        ("weekly", policy.weekly, |z| {
            let w = z.date().iso_week_date();
            (w.year() as i32, w.week() as i32, 0, 0)
        }),
        ("monthly", policy.monthly, |z| {
            (z.year() as i32, z.month() as i32, 0, 0)
        }),
        ("yearly", policy.yearly, |z| (z.year() as i32, 0, 0, 0)),
    ];
    let mut left: Vec<u64> = rules.iter().map(|r| r.1.budget()).collect();
    let mut last_bucket: Vec<Option<(i32, i32, i32, i32)>> = vec![None; rules.len()];
    let mut last_left = policy.last.budget();
    for (rank, &i) in order.iter().enumerate() {
        let s = snaps[i];
        let d = &mut out[i];
        if rank == 0 {
            d.reasons.push("newest of its group".into());
        }
        if last_left > 0 {
            last_left -= 1;
            d.reasons.push("last".into());
        }
        let zoned = jiff::Timestamp::from_nanosecond(ns(s))
            .map(|t| t.to_zoned(tz.clone()))
            .ok();
        if let Some(z) = &zoned {
            for (r, (name, _, bucket)) in rules.iter().enumerate() {
                if left[r] == 0 {
                    continue;
                }
                let b = bucket(z);
                if last_bucket[r] != Some(b) {
                    last_bucket[r] = Some(b);
                    left[r] -= 1;
                    d.reasons.push((*name).into());
                }
            }
        }
        if let Some(w) = policy.within_ns
            && ns(s) >= newest_ns - w
        {
            d.reasons.push("within".into());
        }
        for t in &policy.tags {
            if s.tags.contains(t) {
                d.reasons.push(format!("tag {t}"));
            }
        }
        d.keep = !d.reasons.is_empty();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::crypto::BlobId;
    use crate::store::format::SnapshotStats;
    use crate::store::tree::Time;

    fn snap(host: &str, source: &str, rfc3339: &str, tags: &[&str]) -> Snapshot {
        let t: jiff::Timestamp = rfc3339.parse().unwrap();
        Snapshot {
            time: Time {
                sec: t.as_second(),
                nsec: t.subsec_nanosecond() as u32,
            },
            host: host.into(),
            user: "root".into(),
            source: source.into(),
            path: source.as_bytes().to_vec(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
            root: BlobId([0; 32]),
            parent: None,
            stats: SnapshotStats::default(),
            errors: Vec::new(),
            duration_ms: 0,
        }
    }

    /// The times of the kept snapshots, newest first.
    fn kept(policy: &Policy, snaps: &[Snapshot], tz: &TimeZone) -> Vec<String> {
        let refs: Vec<&Snapshot> = snaps.iter().collect();
        let d = apply(policy, GroupBy::default(), &refs, tz);
        let mut k: Vec<(i64, String)> = snaps
            .iter()
            .zip(&d)
            .filter(|(_, d)| d.keep)
            .map(|(s, _)| {
                let t = jiff::Timestamp::from_second(s.time.sec).unwrap();
                (
                    s.time.sec,
                    t.to_zoned(tz.clone())
                        .strftime("%Y-%m-%d %H:%M")
                        .to_string(),
                )
            })
            .collect();
        k.sort_by_key(|b| std::cmp::Reverse(b.0));
        k.into_iter().map(|x| x.1).collect()
    }

    /// Two years of nightly snapshots at 02:30 UTC, 2023-01-01 .. 2024-12-31.
    fn nightly() -> Vec<Snapshot> {
        let mut out = Vec::new();
        let mut d = jiff::civil::date(2023, 1, 1);
        while d <= jiff::civil::date(2024, 12, 31) {
            out.push(snap("h1", "/srv", &format!("{d}T02:30:00Z"), &[]));
            d = d.tomorrow().unwrap();
        }
        out
    }

    #[test]
    fn last_and_daily_and_weekly_on_nightly_snapshots() {
        let utc = TimeZone::UTC;
        let s = nightly();
        let p = Policy {
            last: Count0::N(3),
            ..Policy::default()
        };
        assert_eq!(
            kept(&p, &s, &utc),
            ["2024-12-31 02:30", "2024-12-30 02:30", "2024-12-29 02:30"]
        );
        // Weekly: ISO weeks. 2024-12-30 and -31 are in week 1 of 2025; 2024-12-23..29 is week
        // 52 of 2024: the newest of each week is kept.
        let p = Policy {
            weekly: Count0::N(3),
            ..Policy::default()
        };
        assert_eq!(
            kept(&p, &s, &utc),
            ["2024-12-31 02:30", "2024-12-29 02:30", "2024-12-22 02:30"]
        );
        // Monthly across the year boundary, and yearly.
        let p = Policy {
            monthly: Count0::N(2),
            yearly: Count0::N(2),
            ..Policy::default()
        };
        assert_eq!(
            kept(&p, &s, &utc),
            ["2024-12-31 02:30", "2024-11-30 02:30", "2023-12-31 02:30"]
        );
        // Months of different lengths: the last day of each.
        let p = Policy {
            monthly: Count0::N(13),
            ..Policy::default()
        };
        let k = kept(&p, &s, &utc);
        assert_eq!(k.len(), 13);
        assert_eq!(k[9], "2024-03-31 02:30");
        assert_eq!(k[10], "2024-02-29 02:30", "leap year");
        assert_eq!(k[12], "2023-12-31 02:30");
        // Unlimited daily keeps every one.
        let p = Policy {
            daily: Count0::Unlimited,
            ..Policy::default()
        };
        assert_eq!(kept(&p, &s, &utc).len(), s.len());
    }

    #[test]
    fn buckets_follow_the_time_zone() {
        // 23:30 UTC on 2024-03-31 is 01:30 on 2024-04-01 at UTC+2: another day and month.
        let s = vec![
            snap("h", "/s", "2024-03-31T23:30:00Z", &[]),
            snap("h", "/s", "2024-03-31T20:00:00Z", &[]),
            snap("h", "/s", "2024-03-30T20:00:00Z", &[]),
        ];
        let p = Policy {
            monthly: Count0::N(2),
            ..Policy::default()
        };
        let utc = TimeZone::UTC;
        let plus2 = TimeZone::fixed(jiff::tz::offset(2));
        // UTC: all in March: only the newest (and the rule has no older month to take).
        assert_eq!(kept(&p, &s, &utc), ["2024-03-31 23:30"]);
        // UTC+2: April (the newest) and March (20:00 UTC = 22:00 local on the 31st).
        assert_eq!(
            kept(&p, &s, &plus2),
            ["2024-04-01 01:30", "2024-03-31 22:00"]
        );
    }

    #[test]
    fn irregular_snapshots_hourly_within_and_tags() {
        let s = vec![
            snap("h", "/s", "2024-06-10T10:05:00Z", &[]),
            snap("h", "/s", "2024-06-10T10:45:00Z", &[]),
            snap("h", "/s", "2024-06-10T11:10:00Z", &["pre-upgrade"]),
            snap("h", "/s", "2024-06-10T13:59:00Z", &[]),
            snap("h", "/s", "2024-06-09T08:00:00Z", &[]),
            snap("h", "/s", "2024-05-01T08:00:00Z", &["pre-upgrade"]),
        ];
        let utc = TimeZone::UTC;
        let p = Policy {
            hourly: Count0::N(3),
            ..Policy::default()
        };
        // Hours 13, 11 and 10 (the 10:45 one, newest of its hour).
        assert_eq!(
            kept(&p, &s, &utc),
            ["2024-06-10 13:59", "2024-06-10 11:10", "2024-06-10 10:45"]
        );
        let p = Policy {
            within_ns: Some(36 * 3600 * 1_000_000_000),
            tags: vec!["pre-upgrade".into()],
            ..Policy::default()
        };
        assert_eq!(
            kept(&p, &s, &utc),
            [
                "2024-06-10 13:59",
                "2024-06-10 11:10",
                "2024-06-10 10:45",
                "2024-06-10 10:05",
                "2024-06-09 08:00",
                "2024-05-01 08:00"
            ]
        );
        let p = Policy {
            tags: vec!["pre-upgrade".into()],
            ..Policy::default()
        };
        // The tag, plus the newest, which a policy always keeps.
        assert_eq!(
            kept(&p, &s, &utc),
            ["2024-06-10 13:59", "2024-06-10 11:10", "2024-05-01 08:00"]
        );
    }

    #[test]
    fn groups_are_judged_apart_and_each_keeps_its_newest() {
        let s = [
            snap("web1", "/srv", "2024-01-03T00:00:00Z", &[]),
            snap("web1", "/srv", "2024-01-02T00:00:00Z", &[]),
            snap("web1", "/etc", "2024-01-01T00:00:00Z", &[]),
            snap("web2", "/srv", "2023-01-01T00:00:00Z", &[]),
            snap("web2", "/srv", "2022-01-01T00:00:00Z", &[]),
        ];
        let refs: Vec<&Snapshot> = s.iter().collect();
        let p = Policy {
            last: Count0::N(1),
            ..Policy::default()
        };
        let d = apply(&p, GroupBy::default(), &refs, &TimeZone::UTC);
        let keep: Vec<bool> = d.iter().map(|d| d.keep).collect();
        assert_eq!(keep, [true, false, true, true, false]);
        assert_eq!(d[0].reasons, ["newest of its group", "last"]);
        // Grouped by host only: /etc is no longer its own group.
        let by_host = GroupBy::parse("host").unwrap();
        let d = apply(&p, by_host, &refs, &TimeZone::UTC);
        let keep: Vec<bool> = d.iter().map(|d| d.keep).collect();
        assert_eq!(keep, [true, false, false, true, false]);
        // An empty policy keeps the newest of each group only.
        let d = apply(
            &Policy::default(),
            GroupBy::default(),
            &refs,
            &TimeZone::UTC,
        );
        let keep: Vec<bool> = d.iter().map(|d| d.keep).collect();
        assert_eq!(keep, [true, false, true, true, false]);
        assert!(GroupBy::parse("host,bogus").is_err());
    }

    #[test]
    fn counts_parse() {
        assert_eq!(Count0::parse("3"), Ok(Count0::N(3)));
        assert_eq!(Count0::parse("0"), Ok(Count0::Off));
        assert_eq!(Count0::parse("unlimited"), Ok(Count0::Unlimited));
        assert!(Count0::parse("x").is_err());
    }
}
