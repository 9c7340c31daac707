//! `kloset store|source|destination add|ls|show|set|unset|rm`: named connectors, kept in
//! `kloset.toml` ([`super::config`]) and used as `@NAME` wherever a store, a source or a
//! destination goes.

use clap::Subcommand;

use super::config::{self, Kind};
use super::{ExitWith, exit};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Name a location: `add NAME LOCATION [key=value…]`.
    Add {
        name: String,
        /// A directory path, file:///path or sftp://[user@]host[:port]/path.
        location: String,
        /// Options: username, port, identity, connections, timeout, insecure_ignore_host_key; for
        /// stores also passphrase or passphrase_cmd.
        #[arg(value_name = "KEY=VALUE")]
        options: Vec<String>,
    },
    /// List the names and their locations.
    Ls,
    /// Print a connector's keys (passphrases masked).
    Show { name: String },
    /// Set keys (`location=…` moves it).
    Set {
        name: String,
        #[arg(value_name = "KEY=VALUE", required = true)]
        options: Vec<String>,
    },
    /// Remove keys.
    Unset {
        name: String,
        #[arg(value_name = "KEY", required = true)]
        keys: Vec<String>,
    },
    /// Forget a connector (nothing at its location is touched).
    Rm { name: String },
}

fn missing(kind: Kind, name: &str) -> anyhow::Error {
    ExitWith(
        exit::ERROR,
        format!(
            "no {} named {name:?} (`kloset {} ls` lists them)",
            kind.noun(),
            kind.noun()
        ),
    )
    .into()
}

pub fn run(kind: Kind, cmd: Cmd, quiet: bool) -> anyhow::Result<i32> {
    let noun = kind.noun();
    match cmd {
        Cmd::Add {
            name,
            location,
            options,
        } => {
            config::validate_name(kind, &name)?;
            let location = config::check_location(kind, &location)?;
            let pairs = config::parse_pairs(kind, &options)?;
            if pairs.iter().any(|(k, _)| k == "location") {
                return Err(ExitWith(
                    exit::USAGE,
                    "the location is the argument after the name; use `set NAME location=…` to change it".into(),
                )
                .into());
            }
            config::update(|cfg| {
                let t = cfg.table_mut(kind);
                if t.contains_key(&name) {
                    return Err(ExitWith(
                        exit::ERROR,
                        format!(
                            "there is already a {noun} named {name:?}; use `kloset {noun} set` to change it or `kloset {noun} rm` first"
                        ),
                    )
                    .into());
                }
                let mut e = config::Entry::new();
                config::apply(&mut e, vec![("location".into(), location.clone())]);
                config::apply(&mut e, pairs);
                t.insert(name.clone(), e);
                Ok(())
            })?;
            if !quiet {
                eprintln!("{noun} {name} added: {location}");
            }
        }
        Cmd::Ls => {
            let cfg = config::load()?;
            let t = cfg.table(kind);
            let width = t.keys().map(|k| k.len()).max().unwrap_or(0);
            for (name, e) in t {
                println!("{name:width$}  {}", config::location_of(e));
            }
        }
        Cmd::Show { name } => {
            let cfg = config::load()?;
            let e = cfg
                .table(kind)
                .get(&name)
                .ok_or_else(|| missing(kind, &name))?;
            for l in config::show_lines(e) {
                println!("{l}");
            }
        }
        Cmd::Set { name, options } => {
            let pairs = config::parse_pairs(kind, &options)?;
            config::update(|cfg| {
                let e = cfg
                    .table_mut(kind)
                    .get_mut(&name)
                    .ok_or_else(|| missing(kind, &name))?;
                config::apply(e, pairs);
                Ok(())
            })?;
        }
        Cmd::Unset { name, keys } => {
            let keys: Vec<String> = keys
                .iter()
                .map(|k| config::canonical_key(k).to_string())
                .collect();
            for k in &keys {
                if k == "location" {
                    return Err(ExitWith(
                        exit::USAGE,
                        format!("a {noun} needs its location; use `kloset {noun} rm` to forget it"),
                    )
                    .into());
                }
                if !kind.keys().contains(&k.as_str()) {
                    return Err(ExitWith(
                        exit::USAGE,
                        format!(
                            "unknown {noun} key {k:?}; known keys: location, {}",
                            kind.keys().join(", ")
                        ),
                    )
                    .into());
                }
            }
            config::update(|cfg| {
                let e = cfg
                    .table_mut(kind)
                    .get_mut(&name)
                    .ok_or_else(|| missing(kind, &name))?;
                for k in &keys {
                    e.remove(k);
                }
                Ok(())
            })?;
        }
        Cmd::Rm { name } => {
            config::update(|cfg| {
                cfg.table_mut(kind)
                    .remove(&name)
                    .map(|_| ())
                    .ok_or_else(|| missing(kind, &name))
            })?;
            if !quiet {
                eprintln!("{noun} {name} removed");
            }
        }
    }
    Ok(exit::OK)
}
