//! `archive [-format tar|tar.gz|tar.zst|zip] [-to FILE|-] SNAP[:PATH]`: a snapshot, or a path
//! in it, as one archive on stdout or in a file.
//!
//! The engine (`store::archive`) streams the archive; this verb picks the output. To stdout,
//! it refuses a terminal unless `-to -` was given explicitly (as gzip does). To a file, it
//! writes a temporary file next to it (`.NAME.kloset-tmp-…`) and renames it into place only
//! once the archive is complete, so a failed or interrupted run leaves no partial archive and
//! keeps an older file of that name untouched. Entries the format cannot hold are named on
//! stderr and the exit is 3.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, ValueEnum};

use super::{Ctx, ExitWith, bytes, exit, split_snap};
use crate::store::archive::{self, Format};
use crate::store::interrupt;
use crate::store::notice::escape;

#[derive(Parser, Debug)]
pub struct Args {
    /// Archive format.
    #[arg(long, value_enum, default_value = "tar")]
    pub format: FormatArg,
    /// Where to write the archive: a file (written under a temporary name, then renamed), or
    /// `-` for stdout (the default; refused on a terminal unless given explicitly). Plakar's
    /// spelling `-output` is accepted too.
    #[arg(long, alias = "output", value_name = "FILE|-")]
    pub to: Option<String>,
    /// SNAP or SNAP:PATH.
    pub target: String,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    /// POSIX pax tar: modes, owners, ns mtimes, symlinks, hard links, xattrs, fifos, devices.
    Tar,
    /// pax tar, gzip-compressed.
    #[value(name = "tar.gz", alias = "tgz")]
    TarGz,
    /// pax tar, zstd-compressed.
    #[value(name = "tar.zst", alias = "tzst")]
    TarZst,
    /// zip: directories, files (hard links as copies) and symlinks, modes, owners, mtimes.
    Zip,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Tar => Format::Tar,
            FormatArg::TarGz => Format::TarGz,
            FormatArg::TarZst => Format::TarZst,
            FormatArg::Zip => Format::Zip,
        }
    }
}

/// Output buffer: large writes, as the SFTP and file layers like them.
const BUF: usize = 1 << 20;

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let format = Format::from(a.format);
    let to = a.to.as_deref().unwrap_or("-");
    if to.is_empty() {
        return Err(ExitWith(exit::USAGE, "-to needs a file name, or - for stdout".into()).into());
    }
    if to == "-" && a.to.is_none() && std::io::stdout().is_terminal() {
        return Err(ExitWith(
            exit::USAGE,
            format!(
                "refusing to write a {} archive to a terminal: redirect stdout, give -to FILE, or -to - to write it here anyway",
                format.name()
            ),
        )
        .into());
    }
    let (snap, path) = split_snap(&a.target);
    let store = ctx.open()?;
    let s = store.resolve_snapshot(snap)?;
    let _lock = store.lock(false, "archive")?;
    // A path that does not exist fails here, before any file is made.
    if let Some(p) = path {
        store.lookup(&s, p.as_bytes())?;
    }
    let path = path.map(str::as_bytes);
    let (report, shown) = if to == "-" {
        let out = std::io::BufWriter::with_capacity(BUF, std::io::stdout().lock());
        match archive::write(&store, &s, path, format, out) {
            Ok((_, r)) => (r, "stdout".to_string()),
            Err(e) if broken_pipe(&e) => return Ok(exit::OK),
            Err(e) => return Err(e.into()),
        }
    } else {
        let target = PathBuf::from(to);
        let r = to_file(&target, |f| {
            let out = std::io::BufWriter::with_capacity(BUF, f);
            let (out, r) = archive::write(&store, &s, path, format, out)?;
            let f = out
                .into_inner()
                .map_err(|e| crate::store::Error::io("writing the archive", e.into_error()))?;
            f.sync_all()
                .map_err(|e| crate::store::Error::io("writing the archive", e))?;
            Ok(r)
        })?;
        (r, target.display().to_string())
    };
    for (p, why) in &report.skipped {
        let shown = if p.is_empty() {
            ".".to_string()
        } else {
            escape(p)
        };
        eprintln!(
            "kloset: warning: not in the archive: {shown}: {}",
            escape(why.as_bytes())
        );
    }
    if report.xattrs_dropped > 0 {
        eprintln!(
            "kloset: warning: the xattrs of {} entries are not in the archive (zip cannot hold them; use -format tar)",
            report.xattrs_dropped
        );
    }
    if !ctx.quiet {
        eprintln!(
            "archived {} files, {} dirs, {} other entries ({}) of snapshot {} as {} to {}",
            report.files,
            report.dirs,
            report.others,
            bytes(report.bytes),
            s.short(),
            format.name(),
            escape(shown.as_bytes())
        );
    }
    Ok(if report.skipped.is_empty() {
        exit::OK
    } else {
        exit::PARTIAL
    })
}

/// Did the archive stop because stdout's reader went away (`kloset … archive | head`)?
fn broken_pipe(e: &crate::store::Error) -> bool {
    matches!(e, crate::store::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Run `write` on a new temporary file next to `target`, then rename it to `target`; on any
/// error, or SIGINT/SIGTERM, the temporary file is removed.
fn to_file<T>(
    target: &Path,
    write: impl FnOnce(std::fs::File) -> crate::store::Result<T>,
) -> anyhow::Result<T> {
    let name = target
        .file_name()
        .filter(|n| !n.is_empty())
        .with_context(|| format!("-to {}: not a file name", target.display()))?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if target.is_dir() {
        anyhow::bail!("-to {}: is a directory", target.display());
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".kloset-tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let cleanup = {
        let tmp = tmp.clone();
        move || {
            let _ = std::fs::remove_file(&tmp);
        }
    };
    let _job = interrupt::on_interrupt(cleanup.clone());
    let f = interrupt::creating(|| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
    })
    .map_err(|e| crate::store::Error::io(format!("creating {}", tmp.display()), e))?;
    let r = write(f).map_err(anyhow::Error::from).and_then(|t| {
        std::fs::rename(&tmp, target)
            .map_err(|e| crate::store::Error::io(format!("renaming to {}", target.display()), e))?;
        Ok(t)
    });
    if r.is_err() {
        cleanup();
    }
    r
}
