//! `cat SNAP:PATH`: a file's contents to stdout, chunk by chunk.

use clap::Parser;

use super::{Ctx, exit, split_snap, stdout_write};
use crate::store::Error;
use crate::store::tree::NodeKind;

#[derive(Parser, Debug)]
pub struct Args {
    /// SNAP:PATH of a regular file.
    pub target: String,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<i32> {
    let (snap, path) = split_snap(&a.target);
    let Some(path) = path else {
        anyhow::bail!("cat needs SNAP:PATH, e.g. latest:/etc/hosts");
    };
    let store = ctx.open_for_reading()?;
    let s = store.resolve_snapshot(snap)?;
    let node = store.lookup(&s, path.as_bytes())?;
    if node.kind != NodeKind::File {
        return Err(Error::NotAFile(path.to_string(), s.short().to_string()).into());
    }
    // Chunks read ahead on several connections: over a network each read waits its round
    // trips, and one at a time left the link idle most of the time.
    let mut write_failed = None;
    let read = crate::store::stream::each_chunk(&store, &node.content, &mut |data| {
        stdout_write(data).map_err(|e| {
            write_failed = Some(e);
            Error::Other("writing to stdout".into())
        })
    });
    // A closed pipe (`| head`) ends the command quietly, as before.
    if let Some(e) = write_failed {
        return Err(e);
    }
    read?;
    Ok(exit::OK)
}
