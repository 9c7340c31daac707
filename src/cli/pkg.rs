//! `kloset pkg list`: the connectors built into this binary, as Plakar lists its packages
//! (`sftp@v1.0.4`). kloset has no plugin packages: both connectors are compiled in and carry
//! kloset's own version.

use clap::Subcommand;

use super::exit;

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List the built-in connectors and their versions.
    #[command(alias = "ls")]
    List,
}

/// Each built-in connector: local directories (`/path`, `file://`) and SFTP (`sftp://`), each
/// as store, source and destination.
pub const CONNECTORS: [&str; 2] = ["fs", "sftp"];

pub fn run(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::List => {
            for c in CONNECTORS {
                println!("{c}@v{}", env!("CARGO_PKG_VERSION"));
            }
        }
    }
    Ok(exit::OK)
}
