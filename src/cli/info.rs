//! `info`: what a store is and how big.

use clap::Parser;

use super::{Ctx, bytes, exit};
use crate::store::FileType;

#[derive(Parser, Debug)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    let (snaps, _) = store.snapshots()?;
    let sizes = store.sizes()?;
    let total: u64 = sizes.iter().map(|s| s.2).sum();
    let c = store.config();
    let idx = store.index();
    let raw: u64 = idx.iter().map(|(_, l)| l.raw_length as u64).sum();
    // The store's own version, from its config file (a store made by version 1 stays 1).
    let format_version = store
        .backend()
        .read(FileType::Config, "config")
        .ok()
        .and_then(|b| {
            b.get(8..12)
                .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
        })
        .unwrap_or(0);
    if a.json {
        let files: serde_json::Map<String, serde_json::Value> = sizes
            .iter()
            .map(|(t, n, b)| {
                (
                    format!("{t:?}").to_lowercase(),
                    serde_json::json!({"count": n, "bytes": b}),
                )
            })
            .collect();
        let v = serde_json::json!({
            "id": c.id_hex(),
            "location": store.backend().location(),
            "format_version": format_version,
            "encrypted": c.encrypted,
            "compression": if c.compression_level > 0 { format!("zstd-{}", c.compression_level) } else { "none".into() },
            "snapshots": snaps.len(),
            "blobs": idx.blob_count(),
            "packs": idx.pack_count(),
            "stored_bytes": total,
            "raw_bytes": raw,
            "files": files,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(exit::OK);
    }
    println!("store:       {}", c.id_hex());
    println!("location:    {}", store.backend().location());
    println!("format:      {format_version}");
    println!(
        "encryption:  {}",
        if c.encrypted {
            "AES-256-GCM, Argon2id keys"
        } else {
            "none (plaintext)"
        }
    );
    println!(
        "compression: {}",
        if c.compression_level > 0 {
            format!("zstd level {}", c.compression_level)
        } else {
            "none".into()
        }
    );
    println!("snapshots:   {}", snaps.len());
    println!(
        "blobs:       {} in {} packs",
        idx.blob_count(),
        idx.pack_count()
    );
    println!(
        "size:        {} stored, {} of unique content",
        bytes(total),
        bytes(raw)
    );
    Ok(exit::OK)
}
