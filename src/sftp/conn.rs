//! SSH connections: `~/.ssh/config`, host keys, authentication, and the connection pool.
//!
//! [`Target::resolve`] merges, in order of precedence, the `-o`/connector options, the URL and
//! `~/.ssh/config` (HostName, User, Port, IdentityFile, IdentitiesOnly, UserKnownHostsFile,
//! StrictHostKeyChecking, ConnectTimeout, ConnectionAttempts, ServerAliveInterval, ProxyJump,
//! ProxyCommand, with `Host` patterns and `Host *` defaults). [`connect`] opens TCP (or starts
//! the proxy command on a socket pair), does the SSH handshake, checks the
//! host key against known_hosts before anything is sent, authenticates (ssh-agent, the
//! identity files, then the default keys) and opens the SFTP channel. [`Pool`] hands out connections to one
//! thread at a time and retries transient failures with a fresh connection and backoff.

use std::io::IsTerminal;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use ssh2::{CheckResult, HashType, KnownHostFileKind, MethodType, Session, Sftp};

use super::{Error, Location, Options, io_error, timed_out, transient};

/// How strictly unknown host keys are treated (OpenSSH's StrictHostKeyChecking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strict {
    /// Refuse unknown keys (`yes`, `ask`: there is no one to ask in a backup).
    Yes,
    /// Record unknown keys in the first known_hosts file and go on (`accept-new`).
    AcceptNew,
    /// Accept unknown keys without recording them (`no`, `off`). Changed keys are still refused.
    No,
}

/// Everything needed to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// What the user wrote (alias or host name), for messages.
    pub alias: String,
    pub hostname: String,
    pub port: u16,
    pub user: String,
    pub identities: Vec<PathBuf>,
    pub identities_only: bool,
    pub known_hosts: Vec<PathBuf>,
    pub strict: Strict,
    pub insecure: bool,
    pub connect_timeout: Duration,
    /// TCP connections tried, a second apart, before giving up (OpenSSH's ConnectionAttempts,
    /// default 1).
    pub connection_attempts: u32,
    /// The command whose standard input and output carry the connection instead of a TCP
    /// connection of ours (ProxyCommand, or the `ssh -W` of ProxyJump), as argv.
    pub proxy: Option<Vec<String>>,
    pub keepalive: Option<Duration>,
    pub connections: usize,
    /// How long any blocking call on an open connection (a request, a close, the SFTP
    /// shutdown) may wait for the server (`timeout=`, default [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
}

/// How long a blocking call waits for a silent server unless `timeout=` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections per pool unless `connections=N` says otherwise: enough to overlap round trips
/// of parallel workers over a real network, few enough to stay under OpenSSH's default
/// MaxStartups (10) and MaxSessions.
pub const DEFAULT_CONNECTIONS: usize = 4;

pub fn home() -> PathBuf {
    dirs::home_dir().unwrap_or_else(|| PathBuf::from("/"))
}

fn expand(p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home().join(rest),
        None if p == "~" => home(),
        None => PathBuf::from(p),
    }
}

/// The command to reach the server through, as OpenSSH builds it: ProxyCommand (run by
/// `sh -c`, with `%h` the host name, `%p` the port, `%r` the user, `%n` the name as given and
/// `%%` a `%`) first, else ProxyJump's hops (`ssh [-F CONFIG] [-J HOP,…] -W [%h]:%p LAST`, the
/// same ~/.ssh/config given to that ssh); `none` is none.
fn proxy_argv(
    command: Option<String>,
    jump: Option<Vec<String>>,
    config: &Path,
    (host, port, user, alias): (&str, u16, &str, &str),
) -> Option<Vec<String>> {
    if let Some(cmd) =
        command.filter(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("none"))
    {
        let mut out = String::new();
        let mut chars = cmd.trim().chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('h') => out.push_str(host),
                Some('p') => out.push_str(&port.to_string()),
                Some('r') => out.push_str(user),
                Some('n') => out.push_str(alias),
                Some('%') => out.push('%'),
                Some(o) => {
                    out.push('%');
                    out.push(o);
                }
                None => out.push('%'),
            }
        }
        let run = if out.starts_with("exec ") {
            out
        } else {
            format!("exec {out}")
        };
        return Some(vec!["/bin/sh".into(), "-c".into(), run]);
    }
    let hops: Vec<String> = jump?
        .into_iter()
        .flat_map(|h| {
            h.split(',')
                .map(|s| s.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|h| !h.is_empty())
        .collect();
    let (last, rest) = hops.split_last()?;
    if last.eq_ignore_ascii_case("none") {
        return None;
    }
    let mut argv = vec!["ssh".to_string()];
    if config.is_file() {
        argv.push("-F".into());
        argv.push(config.display().to_string());
    }
    if !rest.is_empty() {
        argv.push("-J".into());
        argv.push(rest.join(","));
    }
    argv.push("-W".into());
    argv.push(format!("[{host}]:{port}"));
    argv.push(last.clone());
    Some(argv)
}

impl Target {
    pub fn resolve(loc: &Location, opts: &Options) -> Result<Target, Error> {
        let home = home();
        let cfg_path = home.join(".ssh/config");
        let params = match std::fs::File::open(&cfg_path) {
            Ok(f) => {
                let mut r = std::io::BufReader::new(f);
                let cfg = ssh2_config::SshConfig::default()
                    .home_dir(&home)
                    .parse(
                        &mut r,
                        ssh2_config::ParseRule::ALLOW_UNKNOWN_FIELDS
                            | ssh2_config::ParseRule::ALLOW_UNSUPPORTED_FIELDS,
                    )
                    .map_err(|e| {
                        Error::Connect(loc.host.clone(), format!("{}: {e}", cfg_path.display()))
                    })?;
                Some(cfg.query(&loc.host))
            }
            Err(_) => None,
        };
        let unsup = |k: &str| -> Option<String> {
            params
                .as_ref()
                .and_then(|p| {
                    p.unsupported_fields
                        .get(k)
                        .or_else(|| p.ignored_fields.get(k))
                })
                .and_then(|v| v.first().cloned())
        };
        let hostname = params
            .as_ref()
            .and_then(|p| p.host_name.clone())
            .unwrap_or_else(|| loc.host.clone());
        let port = opts
            .port
            .or(loc.port)
            .or(params.as_ref().and_then(|p| p.port))
            .unwrap_or(22);
        let user = opts
            .username
            .clone()
            .or_else(|| loc.user.clone())
            .or_else(|| params.as_ref().and_then(|p| p.user.clone()))
            .unwrap_or_else(crate::store::username);
        let mut identities: Vec<PathBuf> = opts
            .identity
            .iter()
            .map(|p| expand(&p.to_string_lossy()))
            .collect();
        if let Some(ids) = params.as_ref().and_then(|p| p.identity_file.clone()) {
            identities.extend(ids.into_iter().map(|p| expand(&p.to_string_lossy())));
        }
        let identities_only =
            unsup("identitiesonly").is_some_and(|v| v.eq_ignore_ascii_case("yes"));
        let mut known_hosts: Vec<PathBuf> = match unsup("userknownhostsfile") {
            Some(v) => v.split_whitespace().map(expand).collect(),
            None => vec![
                home.join(".ssh/known_hosts"),
                home.join(".ssh/known_hosts2"),
            ],
        };
        known_hosts.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
        let strict = match unsup("stricthostkeychecking")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            Some("no") | Some("off") => Strict::No,
            Some("accept-new") => Strict::AcceptNew,
            _ => Strict::Yes,
        };
        let proxy = proxy_argv(
            unsup("proxycommand").is_some().then(|| {
                params
                    .as_ref()
                    .and_then(|p| {
                        p.unsupported_fields
                            .get("proxycommand")
                            .or_else(|| p.ignored_fields.get("proxycommand"))
                    })
                    .map(|v| v.join(" "))
                    .unwrap_or_default()
            }),
            params.as_ref().and_then(|p| p.proxy_jump.clone()),
            &cfg_path,
            (&hostname, port, &user, &loc.host),
        );
        Ok(Target {
            alias: loc.host.clone(),
            hostname,
            port,
            user,
            identities,
            identities_only,
            known_hosts,
            strict,
            insecure: opts.insecure_ignore_host_key,
            connect_timeout: params
                .as_ref()
                .and_then(|p| p.connect_timeout)
                .unwrap_or(Duration::from_secs(30)),
            connection_attempts: params
                .as_ref()
                .and_then(|p| p.connection_attempts)
                .unwrap_or(1)
                .clamp(1, 1000) as u32,
            proxy,
            keepalive: params.as_ref().and_then(|p| p.server_alive_interval),
            connections: opts.connections.unwrap_or(DEFAULT_CONNECTIONS),
            timeout: opts.timeout.unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    /// `user@host:port` for messages.
    pub fn display(&self) -> String {
        let host = if self.alias != self.hostname {
            format!("{} ({})", self.alias, self.hostname)
        } else {
            self.hostname.clone()
        };
        format!("{}@{}:{}", self.user, host, self.port)
    }

    fn known_hosts_entry(&self) -> String {
        if self.port == 22 {
            self.hostname.clone()
        } else {
            format!("[{}]:{}", self.hostname, self.port)
        }
    }
}

/// One SSH connection, and its SFTP channel once started ([`Conn::start_sftp`]): the pool
/// starts it on every connection it hands out; a connection taken for a pipe
/// ([`Pool::take_idle`]) opens its own channel instead and never pays the three round trips.
pub struct Conn {
    pub sess: Session,
    sftp: std::sync::OnceLock<Sftp>,
    /// The session's socket (a second handle to it), to cut it when the connection is known
    /// broken.
    tcp: Option<Sock>,
    broken: AtomicBool,
    /// The ProxyCommand carrying the connection, if any: dropped last, after the session.
    _proxy: Option<ProxyChild>,
}

/// A connection's socket: TCP, or our end of the socket pair a ProxyCommand talks through.
enum Sock {
    Tcp(TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Sock {
    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(t) => t.shutdown(std::net::Shutdown::Both),
            Sock::Unix(u) => u.shutdown(std::net::Shutdown::Both),
        };
    }

    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Sock::Tcp(t) => t.as_fd(),
            Sock::Unix(u) => u.as_fd(),
        }
    }

    /// Has the other end gone (closed or reset)? Asked without waiting and without taking
    /// anything from the socket.
    fn gone(&self) -> bool {
        use rustix::net::{RecvFlags, recv};
        let mut b = [0u8; 1];
        match recv(self.as_fd(), &mut b, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Ok((0, _)) => true,
            Ok(_) => false,
            Err(e) => !matches!(e, rustix::io::Errno::AGAIN | rustix::io::Errno::INTR),
        }
    }
}

/// A ProxyCommand's process: stopped and waited for when the connection goes.
struct ProxyChild(std::process::Child);

impl Drop for ProxyChild {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Conn {
    /// The connection's socket, to wait on (`None` when its second handle could not be made).
    pub fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.tcp.as_ref().map(|t| t.as_fd())
    }

    /// The connection's SFTP session.
    ///
    /// # Errors
    /// None was started ([`Conn::start_sftp`]; the pool starts one on every connection it
    /// hands out).
    pub fn sftp(&self) -> std::io::Result<&Sftp> {
        self.sftp.get().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no SFTP session was started on this connection",
            )
        })
    }

    /// Start the SFTP subsystem on the connection to `t`, if not yet (three round trips: the
    /// channel, the subsystem request, SFTP's INIT).
    pub fn start_sftp(&self, t: &Target) -> Result<(), Error> {
        if self.sftp.get().is_some() {
            return Ok(());
        }
        let _t = crate::trace::span("sftp start");
        let sftp = self.sess.sftp().map_err(|e| {
            if e.code() == ssh2::ErrorCode::Session(-9) {
                Error::Timeout(t.display(), "starting the SFTP subsystem".into(), t.timeout)
            } else if self.tcp.as_ref().is_some_and(Sock::gone) {
                Error::Connect(
                    t.display(),
                    format!("the connection was lost while starting the SFTP subsystem: {e}"),
                )
            } else {
                Error::NoSftp(t.display(), e.to_string())
            }
        })?;
        let _ = self.sftp.set(sftp);
        Ok(())
    }

    /// Mark the connection broken and shut its socket down at once, so whatever libssh2 still
    /// does with it (closing handles and the channel, the SFTP shutdown when it is dropped)
    /// fails at once instead of waiting for a server that may never answer.
    pub fn kill(&self) {
        if !self.broken.swap(true, Ordering::Relaxed)
            && let Some(t) = &self.tcp
        {
            t.shutdown();
        }
    }

    /// Pass an error on, cutting the connection first if the server did not answer in time:
    /// the caller's open handles are closed as it returns, and on a silent server each close
    /// would wait the whole timeout again.
    pub fn fail(&self, e: std::io::Error) -> std::io::Error {
        if timed_out(&e) {
            self.kill();
        }
        e
    }

    /// Close at once, as an SSH client does: a DISCONNECT, then the socket shut, waiting for
    /// nothing (libssh2 closing each channel politely waits a round trip for each). Only for
    /// a connection with nothing under way.
    pub fn quit(&self) {
        if !self.is_broken() {
            let _ = self.sess.disconnect(
                Some(ssh2::DisconnectCode::ByApplication),
                "kloset is done",
                None,
            );
        }
        self.kill();
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Run `f`, a short exchange with this connection's server (one request and its answer),
    /// cutting the connection ([`Conn::kill`]) if `f` has not returned five seconds after
    /// the session's timeout. libssh2 bounds each of its waits by that timeout, but one of its
    /// calls on a connection a failed write had left behind was once seen waiting on the
    /// socket for good (docs/RELIABILITY.md); cut, the socket fails whatever still waits on
    /// it at once. For the rare paths after a failure only: it starts a thread.
    pub fn bounded<T>(&self, f: impl FnOnce() -> T) -> T {
        let limit = Duration::from_millis(u64::from(self.sess.timeout())) + BOUND_SLACK;
        let (done, wait) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            s.spawn(move || {
                if wait.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    self.kill();
                }
            });
            let r = f();
            drop(done);
            r
        })
    }
}

/// How much longer than the session's timeout [`Conn::bounded`] lets a call run.
const BOUND_SLACK: Duration = Duration::from_secs(5);

impl Drop for Conn {
    fn drop(&mut self) {
        // Runs before the fields are dropped: a healthy connection is closed politely (each
        // step bounded by the session timeout), a broken one never waits.
        if self.is_broken()
            && let Some(t) = &self.tcp
        {
            t.shutdown();
        }
    }
}

fn keytype_name(t: ssh2::HostKeyType) -> &'static str {
    use ssh2::HostKeyType::*;
    match t {
        Rsa => "ssh-rsa",
        Dss => "ssh-dss",
        Ecdsa256 => "ecdsa-sha2-nistp256",
        Ecdsa384 => "ecdsa-sha2-nistp384",
        Ecdsa521 => "ecdsa-sha2-nistp521",
        Ed25519 => "ssh-ed25519",
        Unknown => "unknown",
    }
}

fn key_format(t: ssh2::HostKeyType) -> ssh2::KnownHostKeyFormat {
    use ssh2::HostKeyType as H;
    use ssh2::KnownHostKeyFormat as F;
    match t {
        H::Rsa => F::SshRsa,
        H::Dss => F::SshDss,
        H::Ecdsa256 => F::Ecdsa256,
        H::Ecdsa384 => F::Ecdsa384,
        H::Ecdsa521 => F::Ecdsa521,
        H::Ed25519 => F::Ed25519,
        H::Unknown => F::Unknown,
    }
}

/// Host key algorithms to offer, those already in the known_hosts files first, so the server
/// presents a key we can check instead of one of another type.
fn hostkey_prefs(files: &[PathBuf]) -> String {
    let all = [
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "rsa-sha2-512",
        "rsa-sha2-256",
        "ssh-rsa",
    ];
    let mut seen = std::collections::HashSet::new();
    for f in files {
        if let Ok(text) = std::fs::read_to_string(f) {
            for line in text.lines() {
                let mut it = line.split_whitespace();
                let first = it.next().unwrap_or("");
                let t = if first.starts_with('@') {
                    it.nth(1)
                } else {
                    it.next()
                };
                if let Some(t) = t {
                    seen.insert(t.to_string());
                }
            }
        }
    }
    let known =
        |a: &str| seen.contains(a) || (a.starts_with("rsa-sha2") && seen.contains("ssh-rsa"));
    let mut prefs: Vec<&str> = all.iter().copied().filter(|a| known(a)).collect();
    prefs.extend(all.iter().copied().filter(|a| !known(a)));
    prefs.join(",")
}

fn check_host_key(sess: &Session, t: &Target) -> Result<(), Error> {
    let (key, ktype) = sess
        .host_key()
        .ok_or_else(|| Error::Connect(t.display(), "the server sent no host key".into()))?;
    let fp = sess
        .host_key_hash(HashType::Sha256)
        .map(|h| {
            use base64::Engine;
            format!(
                "SHA256:{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(h)
            )
        })
        .unwrap_or_default();
    if t.insecure {
        return Ok(());
    }
    let mut kh = sess
        .known_hosts()
        .map_err(|e| Error::Connect(t.display(), e.to_string()))?;
    for f in &t.known_hosts {
        if f.exists() {
            // Unreadable or partly malformed files are skipped, as OpenSSH does.
            let _ = kh.read_file(f, KnownHostFileKind::OpenSSH);
        }
    }
    let entry = t.known_hosts_entry();
    let info = || {
        Box::new(super::HostKeyInfo {
            host: entry.clone(),
            keytype: keytype_name(ktype).into(),
            fingerprint: fp.clone(),
            keyscan: if t.port == 22 {
                t.hostname.clone()
            } else {
                format!("-p {} {}", t.port, t.hostname)
            },
            known_hosts: t.known_hosts[0]
                .display()
                .to_string()
                .replace(&home().display().to_string(), "~"),
            sftp: if t.port == 22 {
                format!("{}@{}", t.user, t.alias)
            } else {
                format!("-P {} {}@{}", t.port, t.user, t.alias)
            },
        })
    };
    match kh.check_port(&t.hostname, t.port, key) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch => Err(Error::ChangedHostKey(info())),
        CheckResult::NotFound | CheckResult::Failure => match t.strict {
            Strict::No => Ok(()),
            Strict::AcceptNew => {
                let file = t.known_hosts[0].clone();
                let _ = kh.add(&entry, key, "added by kloset", key_format(ktype));
                if let Some(d) = file.parent() {
                    let _ = std::fs::create_dir_all(d);
                }
                let mut all = ssh2::Session::new()
                    .and_then(|s| s.known_hosts())
                    .map_err(|e| Error::Connect(t.display(), e.to_string()))?;
                if file.exists() {
                    let _ = all.read_file(&file, KnownHostFileKind::OpenSSH);
                }
                let _ = all.add(&entry, key, "added by kloset", key_format(ktype));
                all.write_file(&file, KnownHostFileKind::OpenSSH)
                    .map_err(|e| {
                        Error::Connect(
                            t.display(),
                            format!("cannot record the host key in {}: {e}", file.display()),
                        )
                    })?;
                Ok(())
            }
            Strict::Yes => Err(Error::UnknownHostKey(info())),
        },
    }
}

/// Is this private key file protected by a passphrase? (OpenSSH format: the cipher name in
/// the binary header is not `none`; PEM: an ENCRYPTED marker.)
fn key_is_encrypted(path: &Path) -> bool {
    use base64::Engine;
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    if text.contains("ENCRYPTED") {
        return true;
    }
    if !text.contains("BEGIN OPENSSH PRIVATE KEY") {
        return false;
    }
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(body.trim()) else {
        return false;
    };
    let magic = b"openssh-key-v1\0";
    let Some(rest) = raw.strip_prefix(&magic[..]) else {
        return false;
    };
    if rest.len() < 4 {
        return false;
    }
    let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    rest.get(4..4 + n).is_some_and(|c| c != b"none")
}

/// The public key blob of an identity file's `.pub`, to match agent keys with IdentitiesOnly.
fn pub_blob(identity: &Path) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = std::fs::read_to_string(format!("{}.pub", identity.display())).ok()?;
    let b64 = text.split_whitespace().nth(1)?;
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

fn authenticate(sess: &Session, t: &Target) -> Result<(), Error> {
    let mut tried = Vec::new();
    // 1. ssh-agent.
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        match sess.agent() {
            Ok(mut agent) => {
                if agent.connect().is_ok() && agent.list_identities().is_ok() {
                    let wanted: Vec<Vec<u8>> =
                        t.identities.iter().filter_map(|p| pub_blob(p)).collect();
                    for id in agent.identities().unwrap_or_default() {
                        if t.identities_only && !wanted.iter().any(|w| w == id.blob()) {
                            continue;
                        }
                        if agent.userauth(&t.user, &id).is_ok() && sess.authenticated() {
                            return Ok(());
                        }
                        tried.push(format!("agent key {}", id.comment()));
                    }
                    let _ = agent.disconnect();
                } else {
                    tried.push("ssh-agent (not reachable)".into());
                }
            }
            Err(_) => tried.push("ssh-agent (not reachable)".into()),
        }
    }
    // 2. The identity files, then 3. the default keys.
    let mut keys: Vec<PathBuf> = t.identities.clone();
    if !t.identities_only || keys.is_empty() {
        for d in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            let p = home().join(".ssh").join(d);
            if !keys.contains(&p) {
                keys.push(p);
            }
        }
    }
    let key_pass = std::env::var("KLOSET_SSH_KEY_PASSPHRASE").ok();
    for k in &keys {
        if !k.exists() {
            continue;
        }
        let pubfile = PathBuf::from(format!("{}.pub", k.display()));
        let pubk = pubfile.exists().then_some(pubfile.as_path());
        let shown = k
            .display()
            .to_string()
            .replace(&home().display().to_string(), "~");
        if key_is_encrypted(k) {
            let pass = match &key_pass {
                Some(p) => Some(p.clone()),
                None if std::io::stdin().is_terminal() => {
                    rpassword::prompt_password(format!("passphrase for key {shown}: ")).ok()
                }
                None => None,
            };
            match pass {
                Some(p) => {
                    if sess
                        .userauth_pubkey_file(&t.user, pubk, k, Some(&p))
                        .is_ok()
                        && sess.authenticated()
                    {
                        return Ok(());
                    }
                    tried.push(format!("{shown} (rejected, or wrong key passphrase)"));
                }
                None => tried.push(format!(
                    "{shown} (encrypted: load it into ssh-agent or set KLOSET_SSH_KEY_PASSPHRASE)"
                )),
            }
            continue;
        }
        if sess.userauth_pubkey_file(&t.user, pubk, k, None).is_ok() && sess.authenticated() {
            return Ok(());
        }
        tried.push(format!("{shown} (rejected)"));
    }
    if tried.is_empty() {
        tried.push("no ssh-agent and no key in ~/.ssh (id_ed25519, id_ecdsa, id_rsa)".into());
    }
    Err(Error::Auth(
        t.display(),
        format!(
            "tried {}; add the key to the server's authorized_keys, or name one with identity=PATH",
            tried.join(", ")
        ),
    ))
}

/// Did the last login attempt wait the whole timeout for the server?
fn login_timed_out(sess: &Session) -> bool {
    ssh2::Error::last_session_error(sess).is_some_and(|e| e.code() == ssh2::ErrorCode::Session(-9))
}

/// Open one connection: TCP, handshake, host key check, authentication, SFTP.
pub fn connect(t: &Target) -> Result<Conn, Error> {
    connect_attempt(t).map_err(|(e, _)| e)
}

/// The first connection of a command: [`connect`], tried again while the server closes the
/// connection before the SSH handshake, for up to the connection timeout (ConnectTimeout,
/// default 30 s). That is how OpenSSH's sshd turns a connection away when more than its
/// MaxStartups are logging in at once (by default it drops 30% of them beyond 10, all beyond
/// 100), which many hosts backing up to one server from the same cron minute make happen:
/// OpenSSH's own client gives up at once ("kex_exchange_identification: Connection closed by
/// remote host"). The waits grow from 100 ms to 2 s, each a random 75-125% of its step so that
/// the clients turned away together do not come back together. Everything else (a refused or
/// unreachable port, a host key, a login) fails at once as before; the connections a command
/// makes later are retried by [`Pool::run`] and [`Pool::take`].
pub fn connect_first(t: &Target) -> Result<Conn, Error> {
    let start = Instant::now();
    let mut step = Duration::from_millis(100);
    let mut turned_away = 0u32;
    loop {
        match connect_attempt(t) {
            Ok(c) => return Ok(c),
            Err((e, false)) => return Err(e),
            Err((_, true)) => {
                turned_away += 1;
                let wait = jittered(step);
                if start.elapsed() + wait >= t.connect_timeout {
                    let times = if turned_away == 1 { "once" } else { "times" };
                    let n = if turned_away == 1 {
                        String::new()
                    } else {
                        format!("{turned_away} ")
                    };
                    return Err(Error::Connect(
                        t.display(),
                        format!(
                            "the server closed the connection before the SSH handshake, {n}{times} in {:.1} s (sshd does that beyond its MaxStartups logins at once, and to clients its configuration refuses); try again later, or see the server's log",
                            start.elapsed().as_secs_f64()
                        ),
                    ));
                }
                std::thread::sleep(wait);
                step = (step * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// `d` scaled by a random factor in [0.75, 1.25): backoff that does not line up the clients
/// that failed together (and a schedule of them still takes about its sum).
pub fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    crate::store::crypto::fill_random(&mut b);
    let r = u16::from_le_bytes(b) as f64 / 65536.0;
    d.mul_f64(0.75 + r / 2.0)
}

/// Did the handshake fail because the server closed or reset the connection before it
/// finished (not because it said something we could not use)?
fn closed_at_handshake(e: &ssh2::Error) -> bool {
    // LIBSSH2_ERROR_SOCKET_DISCONNECT (the peer closed it: "Failed getting banner" when sshd
    // drops a connection beyond MaxStartups) and LIBSSH2_ERROR_SOCKET_RECV (reset).
    matches!(
        e.code(),
        ssh2::ErrorCode::Session(-13) | ssh2::ErrorCode::Session(-43)
    )
}

/// A TCP connection to the target: every address in turn, the whole round ConnectionAttempts
/// times, a second apart, as OpenSSH does.
fn open_tcp(t: &Target) -> Result<TcpStream, Error> {
    let addrs: Vec<_> = (t.hostname.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| Error::Connect(t.display(), format!("cannot resolve host name: {e}")))?
        .collect();
    let mut last = None;
    for attempt in 0..t.connection_attempts.max(1) {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        for a in &addrs {
            match TcpStream::connect_timeout(a, t.connect_timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(Error::Connect(
        t.display(),
        last.map(|e| e.to_string())
            .unwrap_or_else(|| "no address".into()),
    ))
}

/// Start the proxy command `argv` with one end of a socket pair as its standard input and
/// output (its standard error stays ours, as with OpenSSH); the other end is the connection.
fn spawn_proxy(
    t: &Target,
    argv: &[String],
) -> Result<(std::os::unix::net::UnixStream, ProxyChild), Error> {
    use std::process::{Command, Stdio};
    let failed = |e: std::io::Error| {
        Error::Connect(
            t.display(),
            format!("cannot start the proxy command `{}`: {e}", shown(argv)),
        )
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(failed)?;
    let out = theirs.try_clone().map_err(failed)?;
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| failed(std::io::ErrorKind::InvalidInput.into()))?;
    let child = Command::new(prog)
        .args(args)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(out)))
        .spawn()
        .map_err(failed)?;
    Ok((ours, ProxyChild(child)))
}

/// A proxy command as the user wrote it (without our `/bin/sh -c exec`).
fn shown(argv: &[String]) -> String {
    match argv {
        [sh, c, cmd] if sh == "/bin/sh" && c == "-c" => {
            cmd.strip_prefix("exec ").unwrap_or(cmd).to_string()
        }
        _ => argv.join(" "),
    }
}

/// The proxy command's exit, if it ended (waiting up to half a second for it): a connection
/// closed because its proxy failed is not a server turning us away.
fn proxy_ended(p: &mut Option<ProxyChild>) -> Option<std::process::ExitStatus> {
    let child = &mut p.as_mut()?.0;
    let until = Instant::now() + Duration::from_millis(500);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// One attempt of [`connect`]; the flag says the server closed the connection before the SSH
/// handshake finished (see [`connect_first`]).
fn connect_attempt(t: &Target) -> Result<Conn, (Error, bool)> {
    let plain = |e| (e, false);
    let _t = crate::trace::span("ssh connect");
    let mut sess = Session::new()
        .map_err(|e| Error::Connect(t.display(), e.to_string()))
        .map_err(plain)?;
    let (cut, mut proxy) = match &t.proxy {
        Some(argv) => {
            let (ours, child) = spawn_proxy(t, argv).map_err(plain)?;
            let cut = ours.try_clone().ok().map(Sock::Unix);
            sess.set_tcp_stream(ours);
            (cut, Some(child))
        }
        None => {
            let tcp = open_tcp(t).map_err(plain)?;
            let _ = tcp.set_nodelay(true);
            let cut = tcp.try_clone().ok().map(Sock::Tcp);
            sess.set_tcp_stream(tcp);
            (cut, None)
        }
    };
    // The handshake and login wait at most the connection timeout, and never longer than the
    // silence allowed to any call (`-o timeout=`): a server that accepts the TCP connection and
    // then says nothing is a silent server like any other.
    sess.set_timeout(
        t.connect_timeout
            .min(t.timeout)
            .as_millis()
            .min(u32::MAX as u128) as u32,
    );
    // chacha20-poly1305 costs libssh2 less CPU per byte than AES-GCM here (DESIGN.md).
    let ciphers = "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr";
    let _ = sess.method_pref(MethodType::CryptCs, ciphers);
    let _ = sess.method_pref(MethodType::CryptSc, ciphers);
    let _ = sess.method_pref(MethodType::HostKey, &hostkey_prefs(&t.known_hosts));
    sess.handshake().map_err(|e| {
        if e.code() == ssh2::ErrorCode::Session(-9) {
            // Accepted the connection, then said nothing: a silent server, not one to retry
            // at once (each attempt would wait as long again).
            plain(Error::Timeout(
                t.display(),
                "the SSH handshake".into(),
                t.connect_timeout.min(t.timeout),
            ))
        } else if closed_at_handshake(&e)
            && let Some(st) = proxy_ended(&mut proxy)
        {
            plain(Error::Connect(
                t.display(),
                format!(
                    "the proxy command `{}` ended ({st}) before the SSH handshake; see its messages above, or try it by hand",
                    shown(t.proxy.as_deref().unwrap_or_default())
                ),
            ))
        } else {
            (
                Error::Connect(t.display(), format!("SSH handshake failed: {e}")),
                closed_at_handshake(&e),
            )
        }
    })?;
    check_host_key(&sess, t).map_err(plain)?;
    let login_timeout = t.connect_timeout.min(t.timeout);
    authenticate(&sess, t)
        .map_err(|e| match e {
            // A key "rejected" because the connection was cut under it, or because the server
            // went silent, was not rejected: the connection failed (retried like any other).
            Error::Auth(..) if login_timed_out(&sess) => {
                Error::Timeout(t.display(), "the SSH login".into(), login_timeout)
            }
            Error::Auth(..) if cut.as_ref().is_some_and(Sock::gone) => Error::Connect(
                t.display(),
                "the connection was lost during the SSH login".into(),
            ),
            e => e,
        })
        .map_err(plain)?;
    // Every blocking libssh2 call (requests, reads, writes, closing a handle, the SFTP
    // shutdown when a connection is dropped) fails with LIBSSH2_ERROR_TIMEOUT once the
    // server has not let it finish for `timeout`. libssh2 checks that time only while the next
    // keepalive is further away than the timeout (`ssh2_wait_socket`): with keepalives more
    // frequent, a wait times out at the next keepalive instead, however slow or silent the
    // server. So keepalives (ServerAliveInterval, default 60 s) go out no more often than
    // once per timeout plus a second; they keep idle pooled connections through NAT, and
    // a silent server is noticed by the timeout itself.
    let keepalive = t.keepalive.unwrap_or(Duration::from_secs(60)).as_secs();
    let keepalive = keepalive.max(t.timeout.as_secs() + 1).min(u32::MAX as u64) as u32;
    sess.set_keepalive(false, keepalive);
    sess.set_timeout(t.timeout.as_millis().min(u32::MAX as u128) as u32);
    Ok(Conn {
        sess,
        sftp: std::sync::OnceLock::new(),
        tcp: cut,
        broken: AtomicBool::new(false),
        _proxy: proxy,
    })
}

/// Does this connection still answer? ssh2's `Read`/`Write` impls turn libssh2 errors into
/// plain `io::Error`s that hide whether the connection died, so after a failure we ask.
pub fn alive(c: &Conn) -> bool {
    c.sftp().is_ok_and(|s| s.stat(Path::new("/")).is_ok())
}

/// A pool of connections to one target.
pub struct Pool {
    target: Target,
    idle: Mutex<Vec<Conn>>,
    /// A connection failed: the server may be stuck, so the idle ones are not closed politely
    /// when the pool goes (each close could wait the whole timeout).
    failed: AtomicBool,
    /// Connections in existence (idle or checked out).
    count: Mutex<usize>,
    freed: Condvar,
    /// When an operation last gave up because no connection could be made; cleared by the
    /// next connection made. See [`STILL_DOWN`].
    unreachable_since: Mutex<Option<Instant>>,
    /// Connections made so far (for `KLOSET_TRACE`).
    made: std::sync::atomic::AtomicUsize,
}

/// Attempts of one operation, and the first backoff delay (doubling).
const ATTEMPTS: u32 = 6;
const BACKOFF: Duration = Duration::from_millis(250);

/// For this long after an operation gave up because the server could not be reached (a whole
/// schedule of [`ATTEMPTS`], 7.75 s give or take a quarter), an operation that cannot connect
/// gives up at once instead of waiting through the schedule again: a mount's reads while the
/// server is down each fail in moments, not one schedule per chunk or per retry of the kernel's, and the first connection
/// made ends it. A connection that was made and then fails is still retried as usual.
const STILL_DOWN: Duration = Duration::from_secs(60);

impl Pool {
    pub fn new(target: Target) -> Arc<Pool> {
        Arc::new(Pool {
            target,
            idle: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            count: Mutex::new(0),
            freed: Condvar::new(),
            unreachable_since: Mutex::new(None),
            made: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// A new connection, counted already in `count`; the server is reachable again if made.
    fn connect_counted(&self) -> Result<Conn, Error> {
        self.connect_counted_with(connect)
    }

    /// [`Pool::connect_counted`] with `how` to connect.
    fn connect_counted_with(&self, how: fn(&Target) -> Result<Conn, Error>) -> Result<Conn, Error> {
        match how(&self.target) {
            Ok(c) => {
                *self.unreachable_since.lock() = None;
                self.made.fetch_add(1, Ordering::Relaxed);
                Ok(c)
            }
            Err(e) => {
                *self.count.lock() -= 1;
                self.freed.notify_one();
                Err(e)
            }
        }
    }

    /// Did an operation give up on reaching the server less than [`STILL_DOWN`] ago, with no
    /// connection made since?
    fn still_down(&self) -> bool {
        self.unreachable_since
            .lock()
            .is_some_and(|t| t.elapsed() < STILL_DOWN)
    }

    /// An operation gave up because no connection could be made: the window of
    /// [`STILL_DOWN`] starts again from now.
    fn gave_up_unreachable(&self) {
        *self.unreachable_since.lock() = Some(Instant::now());
    }

    /// Connect once now, so that host key and authentication errors surface before any work.
    /// That connection's SFTP session is not started yet: the first to take it for a pipe
    /// ([`Pool::take_idle`]) never needs one, anyone else checking it out starts it.
    pub fn open(loc: &Location, opts: &Options) -> Result<Arc<Pool>, Error> {
        let p = Pool::new(Target::resolve(loc, opts)?);
        *p.count.lock() += 1;
        let c = p.connect_counted_with(connect_first)?;
        p.checkin(c);
        Ok(p)
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A connection with its SFTP session started: an idle one, or a new one.
    fn checkout(&self) -> Result<Conn, Error> {
        let c = self.checkout_any()?;
        match c.start_sftp(&self.target) {
            Ok(()) => Ok(c),
            Err(e) => {
                self.discard(c);
                Err(e)
            }
        }
    }

    /// An idle connection or a new one, its SFTP session started or not.
    fn checkout_any(&self) -> Result<Conn, Error> {
        loop {
            if let Some(c) = self.idle.lock().pop() {
                return Ok(c);
            }
            {
                let mut n = self.count.lock();
                if *n < self.target.connections.max(1) {
                    *n += 1;
                    drop(n);
                    return self.connect_counted();
                }
                self.freed.wait_for(&mut n, Duration::from_millis(50));
            }
        }
    }

    /// Run `f` on a connection of its own, made now beside the pool's (not counted, so it
    /// never waits for one of them to come free) and closed after: for a question that must
    /// not go over a connection that failed, asked while the pool's may all be in use.
    /// Bounded by [`Conn::bounded`]; `None` if no connection could be made.
    pub fn aside<T>(&self, f: impl FnOnce(&Conn) -> T) -> Option<T> {
        let c = connect(&self.target).ok()?;
        self.made.fetch_add(1, Ordering::Relaxed);
        c.start_sftp(&self.target).ok()?;
        let r = c.bounded(|| f(&c));
        c.quit();
        Some(r)
    }

    /// Connections made so far.
    pub fn connections_made(&self) -> usize {
        self.made.load(Ordering::Relaxed)
    }

    /// Connections open (idle or in use), and of those idle.
    pub fn connections(&self) -> (usize, usize) {
        (*self.count.lock(), self.idle.lock().len())
    }

    /// Open the rest of the pool's connections on background threads, so work that is about
    /// to fan out over them does not wait for SSH handshakes when it starts.
    pub fn warm(self: &Arc<Self>) {
        let want = self.target.connections.max(1);
        let have = *self.count.lock();
        for _ in have..want {
            let p = self.clone();
            std::thread::spawn(move || {
                {
                    let mut n = p.count.lock();
                    if *n >= p.target.connections.max(1) {
                        return;
                    }
                    *n += 1;
                }
                // On failure, whoever needs a connection will try again and report the error.
                if let Ok(c) = p.connect_counted() {
                    match c.start_sftp(&p.target) {
                        Ok(()) => p.checkin(c),
                        Err(_) => p.discard(c),
                    }
                }
            });
        }
    }

    fn checkin(&self, c: Conn) {
        self.idle.lock().push(c);
        self.freed.notify_one();
    }

    /// Drop a connection that failed: its socket is cut first, so nothing waits on it.
    fn discard(&self, c: Conn) {
        self.failed.store(true, Ordering::Relaxed);
        c.kill();
        drop(c);
        *self.count.lock() -= 1;
        self.freed.notify_one();
    }

    /// Run `f` on a connection; on a transient failure, drop the connection and retry on a new
    /// one with backoff. `f` must be safe to repeat.
    pub fn run<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&Conn) -> std::io::Result<T>,
    ) -> crate::store::Result<T> {
        let mut delay = BACKOFF;
        let mut last_err = String::new();
        let mut tried = 0;
        let mut unreachable = false;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(jittered(delay));
                delay *= 2;
            }
            tried += 1;
            let c = match self.checkout() {
                Ok(c) => c,
                Err(Error::Connect(_, why)) => {
                    // The server is named once, by the error below.
                    last_err = why;
                    unreachable = true;
                    if self.still_down() {
                        break;
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let _ = c.sess.keepalive_send();
            match f(&c) {
                Ok(v) => {
                    self.checkin(c);
                    return Ok(v);
                }
                // The server said nothing for the whole timeout: waiting that long again on
                // a new connection would only multiply the wait.
                Err(e) if timed_out(&e) => {
                    self.discard(c);
                    return Err(self.timeout_error(what).into());
                }
                // A full disk (or quota) stays full on another connection: not retried. The
                // connection goes, cut: a write libssh2 gave up on may have left its stream
                // out of step (`SftpDestination::write_failed`), and a polite close would wait.
                Err(e) if crate::store::error::no_room(&e) => {
                    c.kill();
                    self.discard(c);
                    return Err(crate::store::Error::io(what.to_string(), e));
                }
                Err(e) if transient(&e) || !alive(&c) => {
                    last_err = e.to_string();
                    unreachable = false;
                    self.discard(c);
                }
                Err(e) => {
                    self.checkin(c);
                    return Err(crate::store::Error::io(what.to_string(), e));
                }
            }
        }
        if unreachable {
            self.gave_up_unreachable();
        }
        let attempts = if tried == 1 { "attempt" } else { "attempts" };
        Err(Error::Connect(
            self.target.display(),
            format!("{what}: gave up after {tried} {attempts}: {last_err}"),
        )
        .into())
    }

    /// Check out a connection for a long operation (e.g. reading a whole file); give it back
    /// with [`Pool::give_back`] or drop it with [`Pool::give_up`].
    pub fn take(&self) -> crate::store::Result<Conn> {
        self.take_with(true)
    }

    /// [`Pool::take`] for a pipe ([`super::pipe::Pipe::start`]), which opens a channel of its
    /// own: the connection's SFTP session is not started if it was not (three round trips).
    pub fn take_for_pipe(&self) -> crate::store::Result<Conn> {
        self.take_with(false)
    }

    fn take_with(&self, sftp: bool) -> crate::store::Result<Conn> {
        let mut delay = BACKOFF;
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(jittered(delay));
                delay *= 2;
            }
            let c = if sftp {
                self.checkout()
            } else {
                self.checkout_any()
            };
            match c {
                Ok(c) => return Ok(c),
                Err(e @ Error::Connect(..)) => {
                    last = Some(e);
                    if self.still_down() {
                        break;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.gave_up_unreachable();
        Err(last.expect("at least one attempt").into())
    }

    /// An idle connection, if one is (never a new one: work that gains from a connection of
    /// its own only when one is free at once).
    pub fn take_idle(&self) -> Option<Conn> {
        self.idle.lock().pop()
    }

    /// A connection taken with [`Pool::take_idle`] no longer counts as the pool's (another
    /// user keeps it, and drops it): the pool may open another in its place.
    pub fn detach(&self) {
        let mut n = self.count.lock();
        *n = n.saturating_sub(1);
        self.freed.notify_one();
    }

    pub fn give_back(&self, c: Conn) {
        if c.is_broken() {
            self.discard(c)
        } else {
            self.checkin(c)
        }
    }

    /// The error for an operation that got no answer within the timeout.
    pub fn timeout_error(&self, what: &str) -> Error {
        Error::Timeout(self.target.display(), what.to_string(), self.target.timeout)
    }

    pub fn give_up(&self, c: Conn) {
        self.discard(c)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Idle connections have nothing under way: closed at once (and those of a pool that
        // saw a failure are not even told, the server may be stuck).
        let failed = self.failed.load(Ordering::Relaxed);
        for c in self.idle.get_mut().iter() {
            if failed {
                c.kill();
            } else {
                c.quit();
            }
        }
    }
}

/// Turn an ssh2 error into an I/O error (for `Pool::run` closures).
pub fn io(e: ssh2::Error) -> std::io::Error {
    io_error(e)
}
