//! `kloset pkg list|add|rm|show` and `kloset login`: Plakar's package set-up lines, answered
//! for a binary with its connectors built in.
//!
//! Plakar installs connectors on demand (`plakar login -email …`, then `plakar pkg add sftp`).
//! kloset has no plugin packages: both connectors are compiled in and carry kloset's own
//! version, so those lines succeed and say so (`pkg add sftp`, `login` exit 0), and a
//! connector kloset does not have is named as such with the ones it does have (exit 1).

use clap::{Parser, Subcommand};

use super::{ExitWith, exit};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List the built-in connectors and their versions.
    #[command(alias = "ls")]
    List,
    /// Plakar's install step: the connectors are built in, so there is nothing to install.
    Add {
        /// A connector name (`sftp`, `sftp@v1.0.4`, `fs`).
        name: String,
    },
    /// Plakar's uninstall step: built-in connectors cannot be removed.
    #[command(alias = "remove")]
    Rm {
        /// A connector name.
        name: String,
    },
    /// What a built-in connector provides.
    #[command(alias = "info")]
    Show {
        /// A connector name.
        name: String,
    },
}

/// `kloset login [-email ADDR] [-github]`: accepted for Plakar's set-up lines.
#[derive(Parser, Debug)]
pub struct LoginArgs {
    /// Plakar's account e-mail (ignored: kloset needs no account).
    #[arg(long, value_name = "ADDR")]
    pub email: Option<String>,
    /// Plakar's GitHub login (ignored).
    #[arg(long)]
    pub github: bool,
}

/// What each built-in connector serves.
fn describe(c: &str) -> &'static str {
    match c {
        "fs" => "local directories (/path, file:///path) as store, source and destination",
        _ => {
            "SFTP servers (sftp://[user@]host[:port]/path, ~/.ssh/config aliases) as store, source and destination"
        }
    }
}

/// Each built-in connector: local directories (`/path`, `file://`) and SFTP (`sftp://`), each
/// as store, source and destination.
pub const CONNECTORS: [&str; 2] = ["fs", "sftp"];

/// The built-in connector `name` names (`sftp`, `sftp@v1.0.4`), or exit 1 naming the ones
/// there are.
fn builtin(name: &str) -> anyhow::Result<&'static str> {
    let base = name.split('@').next().unwrap_or(name);
    CONNECTORS
        .into_iter()
        .find(|c| *c == base)
        .ok_or_else(|| {
            ExitWith(
                exit::ERROR,
                format!(
                    "there is no connector {name:?}: kloset's connectors are built in, and they are {} (kloset pkg list)",
                    CONNECTORS.join(", ")
                ),
            )
            .into()
        })
}

pub fn run(cmd: Cmd) -> anyhow::Result<i32> {
    let v = env!("CARGO_PKG_VERSION");
    match cmd {
        Cmd::List => {
            for c in CONNECTORS {
                println!("{c}@v{v}");
            }
        }
        Cmd::Add { name } => {
            let c = builtin(&name)?;
            println!("{c}@v{v} is built into kloset: nothing to install, it is ready to use");
        }
        Cmd::Rm { name } => {
            let c = builtin(&name)?;
            println!("{c}@v{v} is built into kloset: nothing to remove, it stays available");
        }
        Cmd::Show { name } => {
            let c = builtin(&name)?;
            println!("{c}@v{v} (built in): {}", describe(c));
        }
    }
    Ok(exit::OK)
}

pub fn login(_a: LoginArgs) -> anyhow::Result<i32> {
    println!(
        "kloset needs no account: its connectors ({}) are built in, so there is nothing to log in to",
        CONNECTORS.join(", ")
    );
    Ok(exit::OK)
}
