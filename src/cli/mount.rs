//! `mount [SNAP[:PATH]] MOUNTPOINT` (or `-to MOUNTPOINT`): snapshots as a read-only filesystem.
//!
//! Runs in the foreground until the filesystem is unmounted (`umount`, `fusermount3 -u`) or
//! the process gets SIGINT or SIGTERM, which unmount cleanly and exit 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

use super::{Ctx, exit, split_snap};
use crate::fs::{MountConfig, SnapshotFs, fuse::Fuse};

#[derive(Parser, Debug)]
pub struct Args {
    /// Where to mount (Plakar's spelling; or give it as the last argument).
    #[arg(long, value_name = "MOUNTPOINT")]
    pub to: Option<PathBuf>,
    /// Memory for decrypted chunks, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub cache_size: usize,
    /// Let other users see the mount (file modes are then enforced by the kernel).
    #[arg(long)]
    pub allow_other: bool,
    /// `[SNAP[:PATH]] MOUNTPOINT`.
    #[arg(num_args = 0..=2)]
    pub args: Vec<String>,
}

/// Parse `512M`, `2G`, `1048576`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m: usize = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M or G)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    let bytes = (n * mult as f64) as usize;
    if bytes < (1 << 20) {
        return Err(format!("cache size {s:?} is too small (at least 1M)"));
    }
    Ok(bytes)
}

fn is_mountpoint(p: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(p) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    // SIGINT, SIGTERM and SIGHUP are taken by a thread of ours, so they unmount instead of
    // killing. They are blocked before any thread exists, so every thread inherits the mask.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGHUP);
    sigs.thread_block()?;
    let (snap, mountpoint) = match (a.to, a.args.as_slice()) {
        (Some(to), []) => (None, to),
        (Some(to), [s]) => (Some(s.clone()), to),
        (None, [m]) => (None, PathBuf::from(m)),
        (None, [s, m]) => (Some(s.clone()), PathBuf::from(m)),
        (None, []) => anyhow::bail!(
            "mount needs a mountpoint: kloset at STORE mount [SNAP[:PATH]] MOUNTPOINT"
        ),
        _ => anyhow::bail!("too many arguments: kloset at STORE mount [SNAP[:PATH]] MOUNTPOINT"),
    };
    if !Path::new("/dev/fuse").exists() {
        anyhow::bail!(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3"
        );
    }
    match std::fs::metadata(&mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => anyhow::bail!("mountpoint {} is not a directory", mountpoint.display()),
        Err(_) => anyhow::bail!(
            "mountpoint {} does not exist: create it with mkdir",
            mountpoint.display()
        ),
    }
    if is_mountpoint(&mountpoint) {
        anyhow::bail!(
            "mountpoint {} is busy: something is already mounted there (umount it first)",
            mountpoint.display()
        );
    }
    // A lease for as long as the mount serves: maintenance does not delete packs condemned
    // after it began (the index in memory may point at them). Its lock file is written while
    // the store opens (a remote store's round trips overlap).
    // A store this user cannot write to is still mounted, without one.
    let (store, early_lock) = ctx.open_leased("mount")?;
    let store = Arc::new(store);
    let _lease = match store.lock_early(early_lock, "mount") {
        Ok(l) => Some(l),
        Err(e @ crate::store::Error::Locked(..)) => return Err(e.into()),
        Err(e) => {
            eprintln!(
                "kloset: warning: mounting without a lease on the store ({e}): a maintenance run elsewhere may delete packs this mount reads"
            );
            None
        }
    };
    let root = match snap {
        None => None,
        Some(spec) => {
            let (s, p) = split_snap(&spec);
            let e = store.resolve_snapshot(s)?;
            let path = p
                .map(|p| p.as_bytes().to_vec())
                .unwrap_or_else(|| e.snap.path.clone());
            let node = store.lookup(&e, &path)?;
            if node.kind != crate::store::tree::NodeKind::Dir {
                anyhow::bail!(
                    "{spec} is not a directory: mount a directory, or use cat or restore for a file"
                );
            }
            Some((e, path))
        }
    };
    let t = crate::trace::span("mount: snapshots");
    let fs = SnapshotFs::new(
        store.clone(),
        MountConfig {
            cache_bytes: a.cache_size,
            root,
        },
    )
    .map_err(|e| anyhow::anyhow!("cannot mount: {e}"))?;
    drop(t);
    let t = crate::trace::span("mount: the kernel's mount");

    let mut cfg = fuser::Config::default();
    cfg.mount_options.extend([
        fuser::MountOption::RO,
        fuser::MountOption::FSName(format!("kloset:{}", store.backend().location())),
        fuser::MountOption::Subtype("kloset".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ]);
    if a.allow_other {
        cfg.acl = fuser::SessionACL::All;
        cfg.mount_options
            .push(fuser::MountOption::DefaultPermissions);
    }
    // Two request threads: measured on a 2-core machine, `tar` of 21k small files took 2.4 s
    // with one thread, 2.8 s with two and 3.3–4.3 s with four (each request woke another
    // thread); a second thread keeps the mount responsive while one waits on a slow fetch.
    // Chunk fetches themselves run on the prefetch threads.
    cfg.n_threads = Some(2);
    cfg.clone_fd = true;

    let session = fuser::Session::new(Fuse::new(fs.clone()), &mountpoint, &cfg).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (no permission: run as root, or install fuse3 for fusermount3)"
            }
            _ => "",
        };
        anyhow::anyhow!("cannot mount on {}: {e}{hint}", mountpoint.display())
    })?;
    let bg = session.spawn()?;
    drop(t);
    // The pool's other connections log in now, in the background, for the reads to come.
    store.backend().warm_up();
    if !ctx.quiet {
        eprintln!(
            "kloset: mounted {} on {} (read-only); unmount with `umount {}` or Ctrl-C",
            store.backend().location(),
            mountpoint.display(),
            mountpoint.display()
        );
    }
    let (tx, rx) = crossbeam_channel::bounded::<Signal>(1);
    std::thread::spawn(move || {
        if let Ok(s) = sigs.wait() {
            let _ = tx.send(s);
        }
    });
    loop {
        if let Ok(sig) = rx.recv_timeout(Duration::from_millis(100)) {
            if !ctx.quiet {
                eprintln!("kloset: {sig}: unmounting {}", mountpoint.display());
            }
            bg.umount_and_join()?;
            trace_records(&fs);
            return Ok(exit::OK);
        }
        if bg.guard.is_finished() {
            // Unmounted from outside (umount, fusermount3 -u).
            bg.join()?;
            trace_records(&fs);
            return Ok(exit::OK);
        }
    }
}

/// With `KLOSET_TRACE=1`: how many directory records the mount kept, and dropped on the
/// kernel's forgets.
fn trace_records(fs: &SnapshotFs) {
    crate::trace::note(|| {
        let (kept, dropped) = fs.dir_records();
        format!("mount: {kept} directory records kept at the end, {dropped} dropped on forgets")
    });
}
