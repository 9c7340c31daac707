//! SFTP connectors: a store hosted on an SFTP server, a remote tree backed up over SFTP, and a
//! restore straight onto an SFTP server.
//!
//! Everything goes through libssh2 (the `ssh2` crate), in-process. [`Location`] parses
//! `sftp://[user@]host[:port]/abs/path` (and the scp-like `sftp://host:/abs/path`); [`conn`]
//! resolves it against `~/.ssh/config`, checks the host key against known_hosts, authenticates
//! (agent, identity files, default keys) and keeps a [`conn::Pool`] of connections, each used by
//! one thread at a time, reconnecting and retrying transient failures. [`backend`], [`source`]
//! and [`destination`] implement the engine's three connector traits on top of the pool.

pub mod backend;
pub mod conn;
pub mod destination;
pub mod pipe;
pub mod source;

use std::collections::BTreeMap;

/// The rate a far server's pipes and readers are sized for (the bandwidth-delay product is
/// this times the measured round trip): about what a restore decodes on a small machine.
pub(crate) const SIZED_RATE: f64 = 256e6;

pub use backend::SftpBackend;
pub use conn::Pool;
pub use destination::SftpDestination;
pub use source::SftpSource;

/// The SFTP layer's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad sftp location {0:?}: {1}; the form is sftp://[user@]host[:port]/absolute/path")]
    Url(String, String),
    #[error(
        "unknown option {0:?}; known options: username, port, identity, connections, timeout, insecure_ignore_host_key"
    )]
    UnknownOption(String),
    #[error("bad value for option {0}: {1:?}")]
    BadOption(String, String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error(
        "the host key of {} is not known (it is {} {}); if that fingerprint is right, record it with `ssh-keyscan {} >> {}` or connect once with `sftp {}`; nothing was sent",
        .0.host, .0.keytype, .0.fingerprint, .0.keyscan, .0.known_hosts, .0.sftp
    )]
    UnknownHostKey(Box<HostKeyInfo>),
    #[error(
        "WARNING: THE HOST KEY OF {} HAS CHANGED (it is now {} {}): someone may be intercepting the connection, or the server was reinstalled; refusing to connect. If the change is expected, remove the old key with `ssh-keygen -R '{}'` and record the new one",
        .0.host, .0.keytype, .0.fingerprint, .0.host
    )]
    ChangedHostKey(Box<HostKeyInfo>),
    #[error("authentication to {0} failed: {1}")]
    Auth(String, String),
    #[error(
        "cannot start the SFTP subsystem on {0} (is it enabled on the server? `Subsystem sftp` in sshd_config): {1}"
    )]
    NoSftp(String, String),
    #[error(
        "{} did not answer for {} ({}); the server or the network is stuck (if it is only slow, raise -o timeout=DURATION)",
        .0, humantime::format_duration(*.2), .1
    )]
    Timeout(String, String, std::time::Duration),
    #[error("{0}: {1}")]
    Remote(String, String),
}

impl From<Error> for crate::store::Error {
    fn from(e: Error) -> Self {
        use crate::store::ErrorKind;
        let kind = match &e {
            Error::UnknownHostKey(_) | Error::ChangedHostKey(_) => ErrorKind::HostKey,
            Error::Connect(..) | Error::Auth(..) | Error::Timeout(..) | Error::NoSftp(..) => {
                ErrorKind::Unreachable
            }
            _ => ErrorKind::Other,
        };
        crate::store::Error::Connector(e.to_string(), kind)
    }
}

/// What a host key error reports.
#[derive(Debug)]
pub struct HostKeyInfo {
    /// The known_hosts entry name: `host` or `[host]:port`.
    pub host: String,
    pub keytype: String,
    pub fingerprint: String,
    /// Arguments for ssh-keyscan, e.g. `-p 2222 host`.
    pub keyscan: String,
    pub known_hosts: String,
    /// Arguments for sftp, e.g. `-P 2222 user@host`.
    pub sftp: String,
}

/// A parsed `sftp://` location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub user: Option<String>,
    /// Host name or `~/.ssh/config` alias.
    pub host: String,
    pub port: Option<u16>,
    /// Absolute path on the server.
    pub path: String,
}

impl Location {
    pub fn parse(url: &str) -> Result<Location, Error> {
        let bad = |why: &str| Error::Url(url.to_string(), why.to_string());
        let rest = url
            .strip_prefix("sftp://")
            .ok_or_else(|| bad("it does not start with sftp://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => return Err(bad("the path is missing")),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, authority),
        };
        if user.as_deref() == Some("") {
            return Err(bad("the user name is empty"));
        }
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, after) = h.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (h.to_string(), after.strip_prefix(':').unwrap_or(after))
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (hostport.to_string(), ""),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        let port = if port.is_empty() {
            None
        } else {
            Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
            )
        };
        let mut clean = String::new();
        for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if c == ".." {
                return Err(bad("the path contains .."));
            }
            clean.push('/');
            clean.push_str(c);
        }
        if clean.is_empty() {
            clean.push('/');
        }
        Ok(Location {
            user,
            host,
            port,
            path: clean,
        })
    }

    /// The canonical form, e.g. `sftp://user@host:2222/srv/data`.
    pub fn url(&self) -> String {
        let mut s = String::from("sftp://");
        if let Some(u) = &self.user {
            s.push_str(u);
            s.push('@');
        }
        if self.host.contains(':') {
            s.push_str(&format!("[{}]", self.host));
        } else {
            s.push_str(&self.host);
        }
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s.push_str(&self.path);
        s
    }
}

/// Connection options given as `key=value` (`-o`, or stored with a named connector).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub username: Option<String>,
    pub port: Option<u16>,
    pub identity: Vec<std::path::PathBuf>,
    pub connections: Option<usize>,
    /// How long a blocking transport call may go without an answer (`timeout=`).
    pub timeout: Option<std::time::Duration>,
    pub insecure_ignore_host_key: bool,
}

/// The option keys [`Options::set`] accepts.
pub const OPTION_KEYS: [&str; 6] = [
    "username",
    "port",
    "identity",
    "connections",
    "timeout",
    "insecure_ignore_host_key",
];

/// Longest `timeout=` accepted: a day (libssh2 counts milliseconds in a C long; a longer wait
/// is no timeout at all).
pub const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(86_400);

/// Parse a `timeout=` value: `30s`, `2m`, `1m30s`, or plain seconds; from 1 s to a day.
pub fn parse_timeout(value: &str) -> Option<std::time::Duration> {
    let d = match value.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(value).ok()?,
    };
    (d >= std::time::Duration::from_secs(1) && d <= MAX_TIMEOUT).then_some(d)
}

impl Options {
    /// Apply one `key=value`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        let bad = || Error::BadOption(key.to_string(), value.to_string());
        match key {
            "username" | "user" => self.username = Some(value.to_string()),
            "port" => self.port = Some(value.parse().ok().filter(|&p| p > 0).ok_or_else(bad)?),
            "identity" | "identity_file" => self.identity.push(value.into()),
            "connections" => {
                self.connections = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|&n| (1..=64).contains(&n))
                        .ok_or_else(bad)?,
                )
            }
            "timeout" => self.timeout = Some(parse_timeout(value).ok_or_else(bad)?),
            "insecure_ignore_host_key" => {
                self.insecure_ignore_host_key = match value {
                    "true" | "yes" | "1" => true,
                    "false" | "no" | "0" => false,
                    _ => return Err(bad()),
                }
            }
            _ => return Err(Error::UnknownOption(key.to_string())),
        }
        Ok(())
    }

    /// Parse a list of `key=value` strings.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = &'a str>) -> Result<Options, Error> {
        let mut o = Options::default();
        for p in pairs {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| Error::BadOption(p.to_string(), String::new()))?;
            o.set(k.trim(), v.trim())?;
        }
        Ok(o)
    }

    pub fn from_map(m: &BTreeMap<String, String>) -> Result<Options, Error> {
        let mut o = Options::default();
        for (k, v) in m {
            o.set(k, v)?;
        }
        Ok(o)
    }
}

/// An ssh2 error inside an I/O error: it prints as libssh2's message (`failure`, `no such
/// file`) and keeps the code, so that [`fx_failure`] can tell SSH_FX_FAILURE apart.
#[derive(Debug)]
struct Status {
    code: ssh2::ErrorCode,
    message: String,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Status {}

/// SSH_FX_FAILURE: what OpenSSH's sftp-server answers for any errno it has no status for,
/// ENOSPC and EDQUOT among them.
const FX_FAILURE: ssh2::ErrorCode = ssh2::ErrorCode::SFTP(4);

/// Map an ssh2 error to an I/O error so "no such file" stays recognisable.
pub(crate) fn io_error(e: ssh2::Error) -> std::io::Error {
    use ssh2::ErrorCode;
    let kind = match e.code() {
        ErrorCode::SFTP(2) | ErrorCode::SFTP(10) => std::io::ErrorKind::NotFound,
        ErrorCode::SFTP(3) => std::io::ErrorKind::PermissionDenied,
        ErrorCode::SFTP(11) => std::io::ErrorKind::AlreadyExists,
        ErrorCode::SFTP(14) => std::io::ErrorKind::StorageFull,
        // SSH_FX_QUOTA_EXCEEDED (SFTP v5 and later; OpenSSH says "failure" instead).
        ErrorCode::SFTP(15) => std::io::ErrorKind::QuotaExceeded,
        ErrorCode::SFTP(6) | ErrorCode::SFTP(7) => std::io::ErrorKind::ConnectionReset,
        ErrorCode::Session(-9) => std::io::ErrorKind::TimedOut,
        c if transient_code(c) => std::io::ErrorKind::ConnectionReset,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(
        kind,
        Status {
            code: e.code(),
            message: e.message().to_string(),
        },
    )
}

/// An SFTP status the server answered (for requests made without libssh2's SFTP API, see
/// [`pipe`]) as the same I/O error [`io_error`] makes of libssh2's.
pub(crate) fn status_error(code: u32, message: String) -> std::io::Error {
    let code = ssh2::ErrorCode::SFTP(code.min(i32::MAX as u32) as i32);
    let message = if message.is_empty() {
        ssh2::Error::from_errno(code).message().to_string()
    } else {
        message
    };
    let kind = io_error(ssh2::Error::from_errno(code)).kind();
    std::io::Error::new(kind, Status { code, message })
}

/// Did the server answer this request with SSH_FX_FAILURE, its status for errors it has no
/// better word for (a full disk, an exceeded quota, an I/O error on its side)? Errors of
/// [`io_error`] and ssh2 errors carry the code; the `Read`/`Write` impls of `ssh2::File` keep
/// only libssh2's message (an `Other` error whose text is the status's message), so that is
/// compared too.
pub(crate) fn fx_failure(e: &std::io::Error) -> bool {
    let Some(inner) = e.get_ref() else {
        return false;
    };
    if let Some(code) = inner
        .downcast_ref::<ssh2::Error>()
        .map(|se| se.code())
        .or_else(|| inner.downcast_ref::<Status>().map(|s| s.code))
    {
        return code == FX_FAILURE;
    }
    e.kind() == std::io::ErrorKind::Other
        && inner.to_string() == ssh2::Error::from_errno(FX_FAILURE).message()
}

/// libssh2 codes of a lost connection: socket send/receive/disconnect, timeout, protocol
/// breakdown, and SFTP's "no connection" / "connection lost".
fn transient_code(c: ssh2::ErrorCode) -> bool {
    use ssh2::ErrorCode::*;
    matches!(
        c,
        Session(-1)
            | Session(-2)
            | Session(-7)
            | Session(-9)
            | Session(-13)
            | Session(-31)
            | Session(-43)
            | SFTP(6)
            | SFTP(7)
    )
}

/// Did this call wait the whole session timeout for the server?
pub(crate) fn timed_out(e: &std::io::Error) -> bool {
    if let Some(se) = e.get_ref().and_then(|i| i.downcast_ref::<ssh2::Error>())
        && se.code() == ssh2::ErrorCode::Session(-9)
    {
        return true;
    }
    e.kind() == std::io::ErrorKind::TimedOut
}

/// Is this failure worth a reconnect and a retry?
pub(crate) fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    if let Some(se) = e.get_ref().and_then(|i| i.downcast_ref::<ssh2::Error>())
        && transient_code(se.code())
    {
        return true;
    }
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut | UnexpectedEof | NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn locations() {
        let l = Location::parse("sftp://sftpuser@host.example.com/backups").unwrap();
        assert_eq!(l.user.as_deref(), Some("sftpuser"));
        assert_eq!(l.host, "host.example.com");
        assert_eq!(l.port, None);
        assert_eq!(l.path, "/backups");
        let l = Location::parse("sftp://host.example.com:/srv/data").unwrap();
        assert_eq!(
            (l.host.as_str(), l.port, l.path.as_str()),
            ("host.example.com", None, "/srv/data")
        );
        let l = Location::parse("sftp://u@h:2222/a/b/").unwrap();
        assert_eq!((l.port, l.path.as_str()), (Some(2222), "/a/b"));
        assert_eq!(l.url(), "sftp://u@h:2222/a/b");
        let l = Location::parse("sftp://[::1]:22/x").unwrap();
        assert_eq!(l.host, "::1");
        for bad in [
            "sftp://",
            "sftp://host",
            "sftp:///x",
            "sftp://h:0/x",
            "sftp://h:99999/x",
            "sftp://h/../x",
            "http://h/x",
            "sftp://@h/x",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options() {
        let o = Options::parse([
            "port=2222",
            "connections=8",
            "insecure_ignore_host_key=true",
            "identity=/k",
        ])
        .unwrap();
        assert_eq!(o.port, Some(2222));
        assert_eq!(o.connections, Some(8));
        assert!(o.insecure_ignore_host_key);
        assert!(Options::parse(["bogus=1"]).is_err());
        assert!(Options::parse(["port=x"]).is_err());
        assert!(Options::parse(["connections=0"]).is_err());
        let t = |v: &str| Options::parse([format!("timeout={v}").as_str()]).map(|o| o.timeout);
        assert_eq!(t("30s").unwrap(), Some(Duration::from_secs(30)));
        assert_eq!(t("2m").unwrap(), Some(Duration::from_secs(120)));
        assert_eq!(t("45").unwrap(), Some(Duration::from_secs(45)));
        assert_eq!(t("1m 30s").unwrap(), Some(Duration::from_secs(90)));
        for bad in [
            "0",
            "0s",
            "500ms",
            "x",
            "",
            "-3",
            "2d",
            "99999999999999999999",
        ] {
            assert!(t(bad).is_err(), "timeout={bad}");
        }
    }
}
