//! `create`: make a new store.

use clap::Parser;

use super::{Ctx, exit};
use crate::store::{CreateOptions, Store};

#[derive(Parser, Debug)]
pub struct Args {
    /// Do not encrypt (blobs are still authenticated by their ids).
    #[arg(long, alias = "no-encryption")]
    pub plaintext: bool,
    /// Do not compress blobs.
    #[arg(long)]
    pub no_compression: bool,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let opts = CreateOptions {
        encrypted: !a.plaintext,
        compression: !a.no_compression,
        ..Default::default()
    };
    let (backend, pass) = ctx.store_access()?;
    let store = Store::create(backend, &opts, &|c| pass.get(c))?;
    if !ctx.quiet {
        eprintln!(
            "created {} store {} at {}",
            if opts.encrypted {
                "encrypted"
            } else {
                "plaintext"
            },
            store.config().id_hex(),
            store.backend().location()
        );
    }
    Ok(exit::OK)
}
