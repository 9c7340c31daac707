//! The command line: Plakar's syntax (`kloset at STORE VERB [flags] [args]`), parsed with clap.
//!
//! Long flags are accepted with one dash (`-to`, as Plakar spells them) and with two (`--to`):
//! [`normalise_args`] rewrites `-name` to `--name` for every long flag clap knows before
//! parsing. Each verb lives in its own file with an `Args` struct and a `run` function; this
//! module holds what they share: opening stores, the passphrase, output helpers and the map
//! from errors to exit codes.

// The doc comments of the verbs' `Args` are their `--help` text, printed as written: URL
// syntax there (`sftp://[user@]host[:port]/path`) is not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod archive;
pub mod backup;
pub mod cat;
pub mod check;
pub mod completion;
pub mod config;
pub mod connector;
pub mod create;
pub mod diff;
pub mod digest;
pub mod info;
pub mod locate;
pub mod ls;
pub mod maintenance;
pub mod mount;
pub mod pkg;
pub mod progress;
pub mod restore;
pub mod rm;
pub mod sync;

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

use crate::sftp;
use crate::store::notice::escape;
use crate::store::{self, Backend, ErrorKind, LocalBackend, Store};

/// Exit codes, documented in the README.
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const USAGE: i32 = 2;
    /// The command did its work but some entries failed (unreadable source files in a
    /// backup, entries a restore could not write).
    pub const PARTIAL: i32 = 3;
    pub const WRONG_PASSPHRASE: i32 = 4;
    pub const NO_STORE: i32 = 5;
    /// The store is damaged (`check` found damage, or a read failed authentication).
    pub const DAMAGED: i32 = 6;
    pub const LOCKED: i32 = 7;
    /// No such snapshot or path in a snapshot.
    pub const NOT_FOUND: i32 = 8;
    /// The SSH server cannot be reached, or refused authentication.
    pub const UNREACHABLE: i32 = 9;
    /// The SSH server's host key is unknown or has changed.
    pub const HOST_KEY: i32 = 10;
    /// A disk is full or a disk quota exceeded: the store's, the SFTP server's, or a restore
    /// destination's.
    pub const NO_SPACE: i32 = 11;
}

#[derive(Parser, Debug)]
#[command(
    name = "kloset",
    version,
    about = "Encrypted, deduplicated backups over SSH",
    after_help = "Long flags take one dash or two: `-to DIR` and `--to DIR` are the same.\nThe passphrase comes from KLOSET_PASSPHRASE, KLOSET_PASSPHRASE_FILE, or a prompt."
)]
pub struct Cli {
    /// Print nothing but results and errors.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// SFTP option for every location of this command: username, port, identity,
    /// connections, timeout, insecure_ignore_host_key (repeatable).
    #[arg(short = 'o', global = true, value_name = "KEY=VALUE")]
    pub options: Vec<String>,
    #[command(subcommand)]
    pub cmd: Top,
}

#[derive(Subcommand, Debug)]
pub enum Top {
    /// Work on the store at STORE (a path, file://PATH, sftp://[user@]host[:port]/path, @NAME).
    At {
        /// The store: a directory path, file://PATH, sftp://[user@]host[:port]/path, or @NAME
        /// (a store named with `kloset store add`).
        store: String,
        #[command(subcommand)]
        verb: Verb,
    },
    /// Print kloset's version and store format version.
    Version,
    /// Named stores: `kloset store add NAME LOCATION [key=value…]`, then `at @NAME`.
    #[command(subcommand)]
    Store(connector::Cmd),
    /// Named sources: `kloset source add NAME LOCATION [key=value…]`, then `backup @NAME`.
    #[command(subcommand)]
    Source(connector::Cmd),
    /// Named destinations: `kloset destination add NAME LOCATION [key=value…]`, then
    /// `restore -to @NAME`.
    #[command(subcommand)]
    Destination(connector::Cmd),
    /// The built-in connectors: `kloset pkg list`.
    #[command(subcommand)]
    Pkg(pkg::Cmd),
    /// Plakar's `login`: kloset needs no account (accepted and ignored).
    Login(pkg::LoginArgs),
    /// Print a shell completion script: `kloset completion bash|zsh|fish`.
    Completion(completion::CompletionArgs),
    /// Write the man pages to DIR, or print kloset(1) to stdout.
    Man(completion::ManArgs),
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Create a new store.
    Create(create::Args),
    /// Back up a directory into a new snapshot.
    Backup(backup::Args),
    /// List snapshots, or the files of a snapshot.
    Ls(ls::Args),
    /// Write a file of a snapshot to stdout.
    Cat(cat::Args),
    /// Restore a snapshot, or a path in it.
    Restore(restore::Args),
    /// Write a snapshot, or a path in it, as a tar, tar.gz, tar.zst or zip archive.
    Archive(archive::Args),
    /// Read and authenticate everything the snapshots need.
    #[command(alias = "verify")]
    Check(check::Args),
    /// Show the store's id, format, encryption and sizes.
    Info(info::Args),
    /// Copy snapshots to, from or with another store: `sync [SNAP…] to|from|with OTHER`.
    Sync(sync::Args),
    /// Mount snapshots as a read-only filesystem.
    Mount(mount::Args),
    /// Remove snapshots: named ones, those a filter selects, or those a keep policy does not keep.
    #[command(alias = "forget")]
    Rm(Box<rm::Args>),
    /// Give back the space of data no snapshot references (two phases: condemn, then delete in
    /// a later run); safe while other hosts back up.
    #[command(alias = "prune")]
    Maintenance(maintenance::Args),
    /// What changed between two snapshots, or two paths of them: `diff SNAP1[:PATH] SNAP2[:PATH]`.
    Diff(diff::Args),
    /// Every snapshot path whose name (or path, with `/`) a glob matches, as SNAPID:PATH.
    Locate(locate::Args),
    /// The sha256 (or blake3) of files as restored, printed as `sha256sum` does.
    Digest(digest::Args),
}

/// What every verb gets.
pub struct Ctx {
    pub store_url: String,
    pub quiet: bool,
    /// `-o key=value` options.
    pub options: Vec<String>,
}

impl Ctx {
    /// The backend for the store location (`@NAME` resolved).
    pub fn backend(&self) -> anyhow::Result<Arc<dyn Backend>> {
        let r = self.resolve(config::Kind::Store, &self.store_url)?;
        backend_for(&r.location, &r.options)
    }

    /// A location as given on the command line, with `@NAME` looked up among the named
    /// connectors of `kind`; the connector's SFTP options come before the `-o` ones.
    pub fn resolve(&self, kind: config::Kind, given: &str) -> anyhow::Result<Resolved> {
        match given.strip_prefix('@') {
            Some(name) => {
                let c = config::load()?.get(kind, name)?;
                Ok(Resolved {
                    location: c.location.clone(),
                    options: c.sftp_options(&self.options)?,
                    connector: Some(c),
                })
            }
            None => Ok(Resolved {
                location: given.to_string(),
                options: self.sftp_options()?,
                connector: None,
            }),
        }
    }

    /// The store's backend and where its passphrase comes from: `KLOSET_PASSPHRASE`,
    /// `KLOSET_PASSPHRASE_FILE`, the named store's `passphrase`/`passphrase_cmd`, a prompt.
    pub fn store_access(&self) -> anyhow::Result<(Arc<dyn Backend>, PassphraseSource)> {
        let r = self.resolve(config::Kind::Store, &self.store_url)?;
        let b = backend_for(&r.location, &r.options)?;
        Ok((b, PassphraseSource::of_store(r.connector)))
    }

    /// Open a second store (`sync`'s other side). Its passphrase: `KLOSET_OTHER_PASSPHRASE`
    /// (or `_FILE`), its named store's `passphrase`/`passphrase_cmd`, then the first store's
    /// `KLOSET_PASSPHRASE` (or `_FILE`), then a prompt.
    pub fn open_other(&self, given: &str) -> anyhow::Result<Store> {
        let r = self.resolve(config::Kind::Store, given)?;
        let b = backend_for(&r.location, &r.options)?;
        let p = PassphraseSource {
            env: "KLOSET_OTHER_PASSPHRASE",
            connector: r.connector,
            fallback_env: Some("KLOSET_PASSPHRASE"),
            label: format!("passphrase of {given}"),
            found: parking_lot::Mutex::new(None),
        };
        Store::open(b, &|c| p.get(c)).map_err(|e| match e {
            store::Error::WrongPassphrase(_) => ExitWith(
                exit::WRONG_PASSPHRASE,
                format!(
                    "wrong passphrase for {given}: check KLOSET_OTHER_PASSPHRASE or KLOSET_OTHER_PASSPHRASE_FILE, the passphrase or passphrase_cmd of its named store, or KLOSET_PASSPHRASE"
                ),
            )
            .into(),
            e => e.into(),
        })
    }

    pub fn sftp_options(&self) -> anyhow::Result<sftp::Options> {
        Ok(sftp::Options::parse(
            self.options.iter().map(String::as_str),
        )?)
    }

    /// The backup source at `loc`: a local path, an `sftp://` URL or `@NAME`.
    pub fn source(&self, loc: &str) -> anyhow::Result<Box<dyn store::Source>> {
        let r = self.resolve(config::Kind::Source, loc)?;
        let loc = r.location.as_str();
        if loc.starts_with("sftp://") {
            let l = sftp::Location::parse(loc)?;
            return Ok(Box::new(sftp::SftpSource::open(l, &r.options)?));
        }
        let p = loc.strip_prefix("file://").unwrap_or(loc);
        Ok(Box::new(store::LocalSource::new(std::path::Path::new(p))?))
    }

    /// The restore destination at `loc`: a local path, an `sftp://` URL or `@NAME`.
    pub fn destination(&self, loc: &str) -> anyhow::Result<Box<dyn store::Destination>> {
        let r = self.resolve(config::Kind::Destination, loc)?;
        let loc = r.location.as_str();
        if loc.starts_with("sftp://") {
            let l = sftp::Location::parse(loc)?;
            return Ok(Box::new(sftp::SftpDestination::open(l, &r.options)?));
        }
        let p = loc.strip_prefix("file://").unwrap_or(loc);
        Ok(Box::new(store::LocalDestination::new(PathBuf::from(p))))
    }

    /// Open the store and load its index. For a store on an SFTP server whose passphrase
    /// comes without a prompt, Argon2id starts from the key file remembered for its URL
    /// while SSH logs in ([`store::early`]).
    pub fn open(&self) -> anyhow::Result<Store> {
        self.open_warm(false)
    }

    /// [`Ctx::open`] for a command that reads data (`cat`, `restore`): the pool's other
    /// connections log in while the store opens, not when the first read needs one (over a
    /// link of 20 ms round trips, a login is about 0.2 s).
    pub fn open_for_reading(&self) -> anyhow::Result<Store> {
        self.open_warm(true)
    }

    fn open_warm(&self, warm: bool) -> anyhow::Result<Store> {
        let (b, p, early) = self.connect_store()?;
        if warm {
            b.warm_up();
        }
        Ok(Store::open_early(b, &|c| p.get(c), early)?)
    }

    /// [`Ctx::open`] for a writer (`backup`): a remote store gets its lock file written while
    /// it opens (three round trips that overlap the opening's instead of following them),
    /// for [`Store::lock_for_writing_early`] to check. An opening that fails removes it.
    pub fn open_for_writing(
        &self,
        command: &str,
    ) -> anyhow::Result<(Store, Option<store::Result<store::LockGuard>>)> {
        self.open_locked(command, false)
    }

    /// [`Ctx::open_for_reading`] with the lock written as [`Ctx::open_for_writing`] does,
    /// for [`Store::lock_early`].
    pub fn open_for_reading_locked(
        &self,
        command: &str,
    ) -> anyhow::Result<(Store, Option<store::Result<store::LockGuard>>)> {
        self.open_locked(command, true)
    }

    /// [`Ctx::open_for_writing`] for a reader that holds a lease while it runs (`mount`):
    /// the pool's other connections are not logged in while the store opens (their key
    /// exchanges would take the CPU the key derivation and the index need; the mount warms
    /// the pool once it is up).
    pub fn open_leased(
        &self,
        command: &str,
    ) -> anyhow::Result<(Store, Option<store::Result<store::LockGuard>>)> {
        self.open_locked(command, false)
    }

    fn open_locked(
        &self,
        command: &str,
        warm: bool,
    ) -> anyhow::Result<(Store, Option<store::Result<store::LockGuard>>)> {
        let (b, p, early) = self.connect_store()?;
        if warm {
            b.warm_up();
        }
        if !b.is_remote() || std::env::var_os("KLOSET_DEBUG_LATE_LOCK").is_some() {
            return Ok((Store::open_early(b, &|c| p.get(c), early)?, None));
        }
        let (store, lock) = std::thread::scope(|s| {
            let lock = s.spawn(|| store::write_early_lock(b.clone(), command));
            let store = Store::open_early(b.clone(), &|c| p.get(c), early);
            let lock = lock.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (store, lock)
        });
        Ok((store?, Some(lock)))
    }

    /// The store's backend (logged in), where its passphrase comes from, and the key
    /// derivation started before the login.
    fn connect_store(
        &self,
    ) -> anyhow::Result<(
        Arc<dyn Backend>,
        PassphraseSource,
        Option<store::early::EarlyKeys>,
    )> {
        let r = self.resolve(config::Kind::Store, &self.store_url)?;
        let p = PassphraseSource::of_store(r.connector);
        let early = r
            .location
            .starts_with("sftp://")
            .then(|| sftp::Location::parse(&r.location).ok())
            .flatten()
            .and_then(|l| store::early::EarlyKeys::start(&l.url(), p.unprompted()?));
        let b = backend_for(&r.location, &r.options)?;
        Ok((b, p, early))
    }

    pub fn progress(&self) -> bool {
        !self.quiet && std::io::stderr().is_terminal()
    }
}

/// A location with its named connector resolved ([`Ctx::resolve`]).
pub struct Resolved {
    /// A path, `file://` or `sftp://` URL.
    pub location: String,
    pub options: sftp::Options,
    pub connector: Option<config::Connector>,
}

/// Where a store's passphrase comes from, in order: an environment variable (or its `_FILE`
/// twin), the named store's `passphrase` or `passphrase_cmd`, a fallback variable, a prompt.
pub struct PassphraseSource {
    env: &'static str,
    connector: Option<config::Connector>,
    fallback_env: Option<&'static str>,
    label: String,
    /// What [`PassphraseSource::unprompted`] found, so a `passphrase_cmd` runs once.
    found: parking_lot::Mutex<Option<Vec<u8>>>,
}

impl PassphraseSource {
    /// The passphrase of the store given with `at` (`KLOSET_PASSPHRASE`), with its named
    /// store's connector.
    fn of_store(connector: Option<config::Connector>) -> PassphraseSource {
        PassphraseSource {
            env: "KLOSET_PASSPHRASE",
            connector,
            fallback_env: None,
            label: "passphrase".into(),
            found: parking_lot::Mutex::new(None),
        }
    }

    /// The passphrase if it comes without asking anyone (environment, file, the named
    /// store's `passphrase` or `passphrase_cmd`); `None` if it would be a prompt or fails
    /// (then [`PassphraseSource::get`] says why, in its turn).
    pub fn unprompted(&self) -> Option<Vec<u8>> {
        let p = match env_passphrase(self.env) {
            Some(p) => p.ok()?,
            None => match self.connector.as_ref().map(|c| c.secret()) {
                Some(Ok(Some(p))) => p,
                Some(Err(_)) => return None,
                _ => self.fallback_env.and_then(env_passphrase)?.ok()?,
            },
        };
        *self.found.lock() = Some(p.clone());
        Some(p)
    }

    /// The passphrase (asked twice on a terminal when `confirm`).
    pub fn get(&self, confirm: bool) -> store::Result<Vec<u8>> {
        if !confirm && let Some(p) = self.found.lock().clone() {
            return Ok(p);
        }
        if let Some(p) = env_passphrase(self.env) {
            return p;
        }
        if let Some(c) = &self.connector
            && let Some(p) = c.secret()?
        {
            return Ok(p);
        }
        if let Some(p) = self.fallback_env.and_then(env_passphrase) {
            return p;
        }
        let mut hint = format!("set {0} or {0}_FILE", self.env);
        match &self.connector {
            Some(c) => hint.push_str(&format!(", or passphrase_cmd on store {}", c.name)),
            None => hint.push_str(", or use a named store with passphrase_cmd"),
        }
        prompt_passphrase(&self.label, confirm, &hint)
    }
}

/// Parse a store location.
pub fn backend_for(url: &str, opts: &sftp::Options) -> anyhow::Result<Arc<dyn Backend>> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Ok(Arc::new(LocalBackend::new(PathBuf::from(rest))));
    }
    if url.starts_with("sftp://") {
        let l = sftp::Location::parse(url)?;
        return Ok(Arc::new(sftp::SftpBackend::open(l, opts)?));
    }
    if url.contains("://") {
        return Err(ExitWith(
            exit::USAGE,
            format!(
                "unsupported store location {url:?}: use a directory path, file://PATH or sftp://host/path"
            ),
        )
        .into());
    }
    if url.is_empty() {
        return Err(ExitWith(
            exit::USAGE,
            "empty store location: give a directory path".into(),
        )
        .into());
    }
    Ok(Arc::new(LocalBackend::new(PathBuf::from(url))))
}

/// The passphrase: `KLOSET_PASSPHRASE`, `KLOSET_PASSPHRASE_FILE`, or a prompt on a terminal
/// (asked twice when `confirm`).
pub fn passphrase(confirm: bool) -> store::Result<Vec<u8>> {
    if let Some(p) = env_passphrase("KLOSET_PASSPHRASE") {
        return p;
    }
    prompt_passphrase(
        "passphrase",
        confirm,
        "set KLOSET_PASSPHRASE or KLOSET_PASSPHRASE_FILE",
    )
}

/// The passphrase in `var`, or in the file named by `var`_FILE (trailing newlines removed).
fn env_passphrase(var: &str) -> Option<store::Result<Vec<u8>>> {
    if let Some(p) = std::env::var_os(var) {
        use std::os::unix::ffi::OsStringExt;
        return Some(Ok(p.into_vec()));
    }
    let file_var = format!("{var}_FILE");
    let f = std::env::var_os(&file_var)?;
    Some(
        std::fs::read(&f)
            .map_err(|e| {
                store::Error::io(
                    format!(
                        "passphrase file {} ({file_var})",
                        PathBuf::from(&f).display()
                    ),
                    e,
                )
            })
            .map(|mut b| {
                while b.last() == Some(&b'\n') || b.last() == Some(&b'\r') {
                    b.pop();
                }
                b
            }),
    )
}

/// Ask on the terminal (twice when `confirm`); without one, fail with `hint`.
fn prompt_passphrase(label: &str, confirm: bool, hint: &str) -> store::Result<Vec<u8>> {
    if !std::io::stdin().is_terminal() && !std::io::stderr().is_terminal() {
        return Err(store::Error::Other(format!(
            "no {label}: {hint} (there is no terminal to ask on)"
        )));
    }
    let p = rpassword::prompt_password(format!("{label}: "))
        .map_err(|e| store::Error::io("reading the passphrase", e))?;
    if confirm {
        let again = rpassword::prompt_password(format!("{label} (again): "))
            .map_err(|e| store::Error::io("reading the passphrase", e))?;
        if again != p {
            return Err(store::Error::Other(
                "the passphrases differ; nothing was created".into(),
            ));
        }
        if p.is_empty() {
            return Err(store::Error::Other(
                "empty passphrase; use -plaintext for a store without encryption".into(),
            ));
        }
    }
    Ok(p.into_bytes())
}

/// Every long flag name clap knows, for [`normalise_args`].
fn long_flags(cmd: &clap::Command, out: &mut HashSet<String>) {
    for a in cmd.get_arguments() {
        if let Some(l) = a.get_long() {
            out.insert(l.to_string());
        }
        if let Some(al) = a.get_all_aliases() {
            out.extend(al.into_iter().map(String::from));
        }
    }
    for s in cmd.get_subcommands() {
        long_flags(s, out);
    }
}

/// Rewrite Plakar-style single-dash long flags (`-to`, `-exclude=x`) to `--to`.
pub fn normalise_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut longs = HashSet::new();
    long_flags(&Cli::command(), &mut longs);
    longs.insert("help".into());
    longs.insert("version".into());
    let mut out = Vec::with_capacity(args.len());
    let mut rest = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 || rest {
            out.push(a);
            continue;
        }
        if a == "--" {
            rest = true;
            out.push(a);
            continue;
        }
        if let Some(s) = a.to_str()
            && let Some(body) = s.strip_prefix('-')
            && !body.starts_with('-')
            && body.len() > 1
        {
            let name = body.split('=').next().unwrap_or("");
            if longs.contains(name) {
                out.push(format!("-{s}").into());
                continue;
            }
        }
        out.push(a);
    }
    out
}

/// Exit code for an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(se) = cause.downcast_ref::<store::Error>() {
            return match se.kind() {
                ErrorKind::WrongPassphrase => exit::WRONG_PASSPHRASE,
                ErrorKind::NotFound => exit::NO_STORE,
                ErrorKind::Damaged => exit::DAMAGED,
                ErrorKind::Locked => exit::LOCKED,
                ErrorKind::NoSuchEntry => exit::NOT_FOUND,
                ErrorKind::Unreachable => exit::UNREACHABLE,
                ErrorKind::HostKey => exit::HOST_KEY,
                ErrorKind::NoSpace => exit::NO_SPACE,
                ErrorKind::Other => exit::ERROR,
            };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && store::error::no_room(io)
        {
            return exit::NO_SPACE;
        }
        if let Some(code) = cause.downcast_ref::<ExitWith>() {
            return code.0;
        }
    }
    exit::ERROR
}

fn connector_kind(e: &sftp::Error) -> ErrorKind {
    match e {
        sftp::Error::UnknownHostKey(_) | sftp::Error::ChangedHostKey(_) => ErrorKind::HostKey,
        sftp::Error::Connect(..) | sftp::Error::Auth(..) => ErrorKind::Unreachable,
        _ => ErrorKind::Other,
    }
}

/// An error that carries its exit code, for commands that already printed their report.
#[derive(Debug)]
pub struct ExitWith(pub i32, pub String);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for ExitWith {}

/// Split `SNAP[:PATH]`.
pub fn split_snap(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once(':') {
        Some((s, p)) => (s, Some(p)),
        None => (spec, None),
    }
}

/// Write bytes to stdout, treating a closed pipe as success.
pub fn stdout_write(data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match o.write_all(data).and_then(|_| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(ExitWith(exit::OK, String::new()).into())
        }
        r => r.context("writing to stdout"),
    }
}

/// Run the command line; returns the exit code.
pub fn main() -> i32 {
    let args = normalise_args(std::env::args_os().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return code;
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(se) = e.chain().find_map(|c| c.downcast_ref::<sftp::Error>()) {
                // A malformed location or `-o` option is a bad command line.
                let usage = matches!(
                    se,
                    sftp::Error::Url(..)
                        | sftp::Error::UnknownOption(_)
                        | sftp::Error::BadOption(..)
                );
                let se: store::Error = match se {
                    sftp::Error::Url(a, b) => sftp::Error::Url(a.clone(), b.clone()).into(),
                    other => store::Error::Connector(other.to_string(), connector_kind(other)),
                };
                eprintln!("kloset: {}", escape(se.to_string().as_bytes()));
                if usage {
                    return exit::USAGE;
                }
                return exit_code(&anyhow::Error::new(se));
            }
            if let Some(ExitWith(code, msg)) = e.downcast_ref::<ExitWith>() {
                if !msg.is_empty() {
                    eprintln!("kloset: {}", escape(msg.as_bytes()));
                }
                return *code;
            }
            // Errors may name things from a store or a server: one line, nothing a terminal
            // would obey.
            eprintln!("kloset: {}", escape(one_line(&e).as_bytes()));
            exit_code(&e)
        }
    }
}

/// An error and its causes on one line, without repeating a cause the message already holds.
fn one_line(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for c in e.chain().skip(1) {
        let c = c.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Top::Version => {
            println!(
                "kloset {} (store format {})",
                env!("CARGO_PKG_VERSION"),
                store::format::FORMAT_VERSION
            );
            Ok(exit::OK)
        }
        Top::Store(c) => connector::run(config::Kind::Store, c, cli.quiet),
        Top::Source(c) => connector::run(config::Kind::Source, c, cli.quiet),
        Top::Destination(c) => connector::run(config::Kind::Destination, c, cli.quiet),
        Top::Pkg(c) => pkg::run(c),
        Top::Login(a) => pkg::login(a),
        Top::Completion(a) => completion::completion(a),
        Top::Man(a) => completion::man(a),
        Top::At { store, verb } => {
            // The mount handles its signals itself (they unmount).
            if !matches!(verb, Verb::Mount(_)) {
                clean_up_on_signals()?;
            }
            let ctx = Ctx {
                store_url: store,
                quiet: cli.quiet,
                options: cli.options,
            };
            match verb {
                Verb::Create(a) => create::run(&ctx, a),
                Verb::Backup(a) => backup::run(&ctx, a),
                Verb::Ls(a) => ls::run(&ctx, a),
                Verb::Cat(a) => cat::run(&ctx, a),
                Verb::Restore(a) => restore::run(&ctx, a),
                Verb::Archive(a) => archive::run(&ctx, a),
                Verb::Check(a) => check::run(&ctx, a),
                Verb::Info(a) => info::run(&ctx, a),
                Verb::Rm(a) => rm::run(&ctx, *a),
                Verb::Maintenance(a) => maintenance::run(&ctx, a),
                Verb::Mount(a) => mount::run(&ctx, a),
                Verb::Sync(a) => sync::run(&ctx, a),
                Verb::Diff(a) => diff::run(&ctx, a),
                Verb::Locate(a) => locate::run(&ctx, a),
                Verb::Digest(a) => digest::run(&ctx, a),
            }
        }
    }
}

/// Longest wait for the clean-up after SIGINT or SIGTERM (removing a lock or a temporary
/// upload from a server that stopped answering must not keep the process alive).
const CLEAN_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// On SIGINT or SIGTERM, remove this command's lock and temporary files
/// ([`store::interrupt::run_all`]) and exit 130 or 143 (128 + the signal), as a shell reports a
/// process killed by it. The signals are blocked here, before any other thread exists, so
/// every thread inherits the mask and only the waiting thread receives them (child processes
/// start with an empty mask: std resets it).
fn clean_up_on_signals() -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()
        .context("blocking SIGINT and SIGTERM for the clean-up thread")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(sig) = sigs.wait() else { return };
            eprintln!(
                "kloset: interrupted by {sig}; removing this command's lock and temporary files"
            );
            let (tx, rx) = crossbeam_channel::bounded(1);
            std::thread::spawn(move || {
                store::interrupt::run_all();
                let _ = tx.send(());
            });
            if rx.recv_timeout(CLEAN_UP_TIMEOUT).is_err() {
                eprintln!(
                    "kloset: the clean-up took longer than {}s; some temporary files may remain",
                    CLEAN_UP_TIMEOUT.as_secs()
                );
            }
            std::process::exit(128 + sig as i32);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Human-readable size.
pub fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// RFC 3339 time, seconds precision, UTC.
pub fn time(t: store::tree::Time) -> String {
    let st = std::time::UNIX_EPOCH + std::time::Duration::new(t.sec.max(0) as u64, t.nsec);
    humantime::format_rfc3339_seconds(st).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: &[&str]) -> Vec<String> {
        normalise_args(v.iter().map(|s| s.into()).collect())
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn single_dash_long_flags() {
        assert_eq!(
            n(&["kloset", "at", "/s", "restore", "-to", "/d", "x"]),
            ["kloset", "at", "/s", "restore", "--to", "/d", "x"]
        );
        assert_eq!(n(&["k", "-exclude=*.o"]), ["k", "--exclude=*.o"]);
        assert_eq!(
            n(&["k", "-q", "-x", "--", "-to"]),
            ["k", "-q", "-x", "--", "-to"]
        );
        assert_eq!(n(&["k", "-plaintext"]), ["k", "--plaintext"]);
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
