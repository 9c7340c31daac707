//! `digest [-hash sha256|blake3] SNAP:PATH…`: the hash of files as a restore would write them,
//! printed as `sha256sum` and `b3sum` print theirs (`HEX  SNAPID:PATH`), so it can be
//! compared with `sha256sum FILE` run on a server.
//!
//! The content is read chunk by chunk through the store and fed to the hasher; nothing is
//! written and at most one chunk (8 MiB at most) is held. BLAKE3 here is the plain, unkeyed
//! hash `b3sum` computes, not the store's keyed chunk ids. A path that is not a regular file
//! is refused (exit 1) and a missing one reported (exit 8); the other targets are still
//! hashed, and the exit is the first failure's.

use std::io::Write;

use clap::{Parser, ValueEnum};

use super::diff::{full_path, split_snap_raw};
use super::{Ctx, ExitWith, exit, stdout_write};
use crate::store::notice::escape;
use crate::store::tree::NodeKind;
use crate::store::{SnapshotEntry, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Hash {
    Sha256,
    Blake3,
}

#[derive(Parser, Debug)]
pub struct Args {
    /// The hash function: sha256 (as `sha256sum`) or blake3 (as `b3sum`).
    #[arg(long, value_enum, default_value = "sha256")]
    pub hash: Hash,
    /// SNAP:PATH of regular files.
    #[arg(required = true, value_name = "SNAP:PATH")]
    pub targets: Vec<std::ffi::OsString>,
}

/// A hash being computed.
enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    fn new(h: Hash) -> Hasher {
        use sha2::Digest;
        match h {
            Hash::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Hash::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    fn hex(self) -> String {
        use sha2::Digest;
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

/// The hash of the file at `target` (`SNAP:PATH`), with the snapshot it is in.
fn digest(
    store: &Store,
    target: &std::ffi::OsStr,
    hash: Hash,
) -> anyhow::Result<(String, SnapshotEntry)> {
    let (snap, path) = split_snap_raw(target);
    let path = match path {
        Some(p) if !p.is_empty() => p,
        _ => {
            return Err(ExitWith(
                exit::USAGE,
                format!(
                    "digest needs SNAP:PATH, e.g. latest:/etc/hosts (got {})",
                    escape(target.as_encoded_bytes())
                ),
            )
            .into());
        }
    };
    let s = store.resolve_snapshot(&snap)?;
    let node = store.lookup(&s, path)?;
    if node.kind != NodeKind::File {
        let full = full_path(&s, path);
        return Err(ExitWith(
            exit::ERROR,
            format!(
                "{}:{} is a {}, not a regular file: only files have a digest",
                s.short(),
                escape(&full),
                format!("{:?}", node.kind).to_lowercase()
            ),
        )
        .into());
    }
    let mut h = Hasher::new(hash);
    let mut buf = Vec::new();
    for id in &node.content {
        buf = store.read_blob_reusing(id, buf)?;
        h.update(&buf);
    }
    Ok((h.hex(), s))
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    let mut first_failure = None;
    for t in &a.targets {
        match digest(&store, t, a.hash) {
            Ok((hex, s)) => {
                let (_, path) = split_snap_raw(t);
                let mut line = Vec::new();
                writeln!(
                    line,
                    "{hex}  {}:{}",
                    s.short(),
                    escape(path.unwrap_or_default())
                )?;
                stdout_write(&line)?;
            }
            Err(e) => {
                let code = super::exit_code(&e);
                let msg = match e.downcast_ref::<ExitWith>() {
                    Some(ExitWith(_, m)) => m.clone(),
                    None => e.to_string(),
                };
                if targets_share_a_failure(&e) {
                    return Err(e);
                }
                eprintln!("kloset: {}", escape(msg.as_bytes()));
                first_failure.get_or_insert(code);
            }
        }
    }
    Ok(first_failure.unwrap_or(exit::OK))
}

/// Is `e` a failure of the store or its server (unreachable, out of memory…), which every
/// other target would meet too, rather than of this one target (missing, not a file, a
/// damaged chunk)?
fn targets_share_a_failure(e: &anyhow::Error) -> bool {
    !matches!(
        super::exit_code(e),
        exit::ERROR | exit::USAGE | exit::NOT_FOUND | exit::DAMAGED
    )
}
