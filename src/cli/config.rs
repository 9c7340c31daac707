//! Named connectors: the `kloset.toml` file behind `store|source|destination add NAME …` and
//! the `@NAME` syntax.
//!
//! The file is `$XDG_CONFIG_HOME/kloset/kloset.toml` (default `~/.config/kloset/kloset.toml`)
//! with one table per connector kind:
//!
//! ```toml
//! [stores.nas]
//! location = "sftp://backup@nas/backups"
//! passphrase_cmd = "cat /root/.nas-pass"
//!
//! [sources.web]
//! location = "sftp://web1:/srv/data"
//! connections = "8"
//! ```
//!
//! Every value is a string except `identity`, which may be a list. It can hold passphrases, so
//! it is written mode 0600, atomically (a temporary file renamed over it), under an exclusive
//! `flock` on `kloset.toml.lock` so two concurrent edits cannot lose one another. Names and
//! keys are checked when written ([`validate_name`], [`check_pair`], [`check_location`]) and
//! again when read, so a hand-edited file with a typo fails with the file and the key named.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{ExitWith, exit};
use crate::sftp;

/// The three connector kinds, one table each in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Store,
    Source,
    Destination,
}

impl Kind {
    /// The noun of the command line (`kloset store add`).
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Store => "store",
            Kind::Source => "source",
            Kind::Destination => "destination",
        }
    }

    /// Keys a connector of this kind accepts besides `location`.
    pub fn keys(self) -> Vec<&'static str> {
        let mut k: Vec<&str> = sftp::OPTION_KEYS.to_vec();
        if self == Kind::Store {
            k.extend(STORE_KEYS);
        }
        k
    }
}

/// Keys only stores have: where the passphrase comes from when the environment gives none.
pub const STORE_KEYS: [&str; 2] = ["passphrase", "passphrase_cmd"];

/// One connector's keys and values, as stored.
pub type Entry = BTreeMap<String, toml::Value>;

/// The whole file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stores: BTreeMap<String, Entry>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, Entry>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub destinations: BTreeMap<String, Entry>,
}

impl ConfigFile {
    pub fn table(&self, kind: Kind) -> &BTreeMap<String, Entry> {
        match kind {
            Kind::Store => &self.stores,
            Kind::Source => &self.sources,
            Kind::Destination => &self.destinations,
        }
    }

    pub fn table_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, Entry> {
        match kind {
            Kind::Store => &mut self.stores,
            Kind::Source => &mut self.sources,
            Kind::Destination => &mut self.destinations,
        }
    }

    /// The connector `name` of this kind, checked.
    pub fn get(&self, kind: Kind, name: &str) -> anyhow::Result<Connector> {
        let Some(e) = self.table(kind).get(name) else {
            let known: Vec<&str> = self.table(kind).keys().map(String::as_str).collect();
            let hint = if known.is_empty() {
                format!("there are none; add one with `kloset {} add`", kind.noun())
            } else {
                format!("known: {}", known.join(", "))
            };
            return Err(ExitWith(
                exit::ERROR,
                format!("no {} named {name:?} ({hint})", kind.noun()),
            )
            .into());
        };
        Connector::from_entry(kind, name, e).map_err(|e| {
            // Name the file and the entry; keep the exit code of a bad key or value (2).
            let code = e.downcast_ref::<ExitWith>().map_or(exit::ERROR, |x| x.0);
            ExitWith(
                code,
                format!("{}: {} {name:?}: {e:#}", path().display(), kind.noun()),
            )
            .into()
        })
    }
}

/// A resolved named connector.
#[derive(Debug, Clone, Default)]
pub struct Connector {
    pub name: String,
    pub location: String,
    /// SFTP options as `(key, value)`, applied before the command line's `-o` options.
    pub options: Vec<(String, String)>,
    pub passphrase: Option<String>,
    pub passphrase_cmd: Option<String>,
}

impl Connector {
    fn from_entry(kind: Kind, name: &str, e: &Entry) -> anyhow::Result<Connector> {
        let mut c = Connector {
            name: name.to_string(),
            ..Default::default()
        };
        for (k, v) in e {
            for v in values(v).with_context(|| format!("key {k}"))? {
                check_pair(kind, k, &v)?;
                match k.as_str() {
                    "location" => c.location = v,
                    "passphrase" => c.passphrase = Some(v),
                    "passphrase_cmd" => c.passphrase_cmd = Some(v),
                    _ => c.options.push((k.clone(), v)),
                }
            }
        }
        if c.location.is_empty() {
            anyhow::bail!("it has no location");
        }
        Ok(c)
    }

    /// The SFTP options: these, then the command line's (which win).
    pub fn sftp_options(&self, cli: &[String]) -> anyhow::Result<sftp::Options> {
        let mut o = sftp::Options::default();
        for (k, v) in &self.options {
            o.set(k, v)?;
        }
        for p in cli {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| sftp::Error::BadOption(p.to_string(), String::new()))?;
            o.set(k.trim(), v.trim())?;
        }
        Ok(o)
    }

    /// The store passphrase this connector gives (`passphrase`, else the output of
    /// `passphrase_cmd`), or `None`.
    pub fn secret(&self) -> crate::store::Result<Option<Vec<u8>>> {
        use crate::store::Error;
        if let Some(p) = &self.passphrase {
            return Ok(Some(p.as_bytes().to_vec()));
        }
        let Some(cmd) = &self.passphrase_cmd else {
            return Ok(None);
        };
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| Error::io(format!("passphrase_cmd of store {}", self.name), e))?;
        if !out.status.success() {
            return Err(Error::Other(format!(
                "passphrase_cmd of store {} failed ({})",
                self.name, out.status
            )));
        }
        let mut b = out.stdout;
        while b.last() == Some(&b'\n') || b.last() == Some(&b'\r') {
            b.pop();
        }
        if b.is_empty() {
            return Err(Error::Other(format!(
                "passphrase_cmd of store {} printed nothing",
                self.name
            )));
        }
        Ok(Some(b))
    }
}

/// The strings of a stored value: a string, or a list of strings (`identity`).
fn values(v: &toml::Value) -> anyhow::Result<Vec<String>> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| match x {
                toml::Value::String(s) => Ok(s.clone()),
                _ => anyhow::bail!("values must be strings"),
            })
            .collect(),
        // Hand-written numbers and booleans (`port = 2222`) mean what they say.
        toml::Value::Integer(i) => Ok(vec![i.to_string()]),
        toml::Value::Boolean(b) => Ok(vec![b.to_string()]),
        _ => anyhow::bail!("values must be strings"),
    }
}

/// `$XDG_CONFIG_HOME/kloset/kloset.toml`, or `~/.config/kloset/kloset.toml`.
pub fn path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| sftp::conn::home().join(".config"));
    base.join("kloset").join("kloset.toml")
}

/// Read the file; a missing file is an empty configuration.
pub fn load() -> anyhow::Result<ConfigFile> {
    load_from(&path())
}

fn load_from(p: &Path) -> anyhow::Result<ConfigFile> {
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}",
            p.display(),
            e.to_string().lines().next().unwrap_or("cannot parse")
        )
    })
}

/// Read, change and write the file under an exclusive lock. `f`'s error leaves it unchanged.
pub fn update<T>(f: impl FnOnce(&mut ConfigFile) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let p = path();
    let dir = p.parent().expect("the config path has a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let lock_path = p.with_extension("toml.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    let mut cfg = load_from(&p)?;
    let out = f(&mut cfg)?;
    save_to(&p, &cfg)?;
    Ok(out)
}

/// Write atomically, mode 0600: a temporary file in the same directory, synced, renamed.
fn save_to(p: &Path, cfg: &ConfigFile) -> anyhow::Result<()> {
    let text = format!(
        "# kloset named connectors: edit with `kloset store|source|destination add|set|unset|rm`.\n{}",
        toml::to_string(cfg).context("serialising the configuration")?
    );
    let dir = p.parent().expect("the config path has a directory");
    let tmp = dir.join(format!(
        ".kloset.toml.{}.{}",
        std::process::id(),
        crate::store::crypto::random_hex(4)
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, p)?;
        // The rename is durable once the directory is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", p.display()))
}

fn usage(msg: String) -> anyhow::Error {
    ExitWith(exit::USAGE, msg).into()
}

/// Names are what `@NAME` can spell on a command line without quoting.
pub fn validate_name(kind: Kind, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        return Ok(());
    }
    Err(usage(format!(
        "bad {} name {name:?}: use letters, digits, '_', '-' and '.', starting with a letter or digit (at most 64)",
        kind.noun()
    )))
}

/// Check a location and return the form to store: `sftp://…` and `file://…` as given, a local
/// path made absolute (a cron job does not run in the directory `add` was typed in).
pub fn check_location(kind: Kind, loc: &str) -> anyhow::Result<String> {
    let bad = |why: &str| {
        usage(format!(
            "bad {} location {loc:?}: {why}; use a directory path, file:///path or sftp://[user@]host[:port]/path",
            kind.noun()
        ))
    };
    if loc.is_empty() {
        return Err(bad("it is empty"));
    }
    if loc.starts_with('@') {
        return Err(bad("a connector cannot point at another one"));
    }
    if loc.starts_with("sftp://") {
        return match sftp::Location::parse(loc) {
            Ok(_) => Ok(loc.to_string()),
            Err(sftp::Error::Url(_, why)) => Err(bad(&why)),
            Err(e) => Err(bad(&e.to_string())),
        };
    }
    if let Some(p) = loc.strip_prefix("file://") {
        if !p.starts_with('/') {
            return Err(bad("the path after file:// must be absolute"));
        }
        return Ok(loc.to_string());
    }
    if loc.contains("://") {
        return Err(bad("unsupported scheme"));
    }
    let p = Path::new(loc);
    if p.is_absolute() {
        return Ok(loc.to_string());
    }
    let cwd = std::env::current_dir().context("the current directory")?;
    // `./x` → `CWD/x`; `..` is kept, as only the filesystem knows what it means past a symlink.
    let abs: PathBuf = cwd
        .join(p)
        .components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect();
    Ok(abs.to_string_lossy().into_owned())
}

/// Canonical spelling of a key (the SFTP options accept a few aliases).
pub fn canonical_key(key: &str) -> &str {
    match key {
        "user" => "username",
        "identity_file" => "identity",
        k => k,
    }
}

/// Check one `key=value` for a connector of `kind`; returns the canonical key and the value
/// to store.
pub fn check_pair(kind: Kind, key: &str, value: &str) -> anyhow::Result<(String, String)> {
    let key = canonical_key(key);
    if key == "location" {
        return Ok((key.into(), check_location(kind, value)?));
    }
    if !kind.keys().contains(&key) {
        let mut known = vec!["location"];
        known.extend(kind.keys());
        return Err(usage(format!(
            "unknown {} key {key:?}; known keys: {}",
            kind.noun(),
            known.join(", ")
        )));
    }
    if STORE_KEYS.contains(&key) {
        if value.is_empty() {
            return Err(usage(format!("{key} cannot be empty")));
        }
    } else {
        let mut o = sftp::Options::default();
        o.set(key, value).map_err(|e| usage(e.to_string()))?;
    }
    Ok((key.into(), value.to_string()))
}

/// Split `key=value` arguments and check them.
pub fn parse_pairs(kind: Kind, pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| {
            let (k, v) = p.split_once('=').ok_or_else(|| {
                usage(format!(
                    "expected key=value, got {p:?} (keys: location, {})",
                    kind.keys().join(", ")
                ))
            })?;
            check_pair(kind, k.trim(), v)
        })
        .collect()
}

/// Apply checked pairs to an entry: `identity` accumulates, other keys are replaced, and
/// `passphrase` and `passphrase_cmd` replace one another.
pub fn apply(entry: &mut Entry, pairs: Vec<(String, String)>) {
    for (k, v) in pairs {
        match k.as_str() {
            "identity" => {
                let mut all = entry
                    .get(&k)
                    .and_then(|v| values(v).ok())
                    .unwrap_or_default();
                if !all.contains(&v) {
                    all.push(v);
                }
                let val = if all.len() == 1 {
                    toml::Value::String(all.remove(0))
                } else {
                    toml::Value::Array(all.into_iter().map(toml::Value::String).collect())
                };
                entry.insert(k, val);
            }
            "passphrase" | "passphrase_cmd" => {
                entry.remove("passphrase");
                entry.remove("passphrase_cmd");
                entry.insert(k, toml::Value::String(v));
            }
            _ => {
                entry.insert(k, toml::Value::String(v));
            }
        }
    }
}

/// `key = value` lines for `show`, passphrases masked.
pub fn show_lines(entry: &Entry) -> Vec<String> {
    let mut out = Vec::new();
    let loc = entry.get("location").and_then(|v| values(v).ok());
    for v in loc.into_iter().flatten() {
        out.push(format!("location={v}"));
    }
    for (k, v) in entry {
        if k == "location" {
            continue;
        }
        for v in values(v).unwrap_or_default() {
            let v = if k == "passphrase" {
                "********".to_string()
            } else {
                v
            };
            out.push(format!("{k}={v}"));
        }
    }
    out
}

/// The location of an entry, for `ls`.
pub fn location_of(entry: &Entry) -> String {
    entry
        .get("location")
        .and_then(|v| values(v).ok())
        .and_then(|v| v.into_iter().next())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "sftp_store", "nas-2", "x.y", "9"] {
            assert!(validate_name(Kind::Store, ok).is_ok(), "{ok}");
        }
        for bad in ["", "@a", "-a", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(validate_name(Kind::Store, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn locations() {
        let k = Kind::Source;
        assert_eq!(
            check_location(k, "sftp://h:/srv/data").unwrap(),
            "sftp://h:/srv/data"
        );
        assert_eq!(check_location(k, "/abs").unwrap(), "/abs");
        assert!(check_location(k, "rel").unwrap().starts_with('/'));
        for bad in [
            "",
            "@x",
            "sftp://",
            "sftp://h",
            "s3://b/x",
            "file://rel",
            "sftp://h/../x",
        ] {
            assert!(check_location(k, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pairs_and_keys() {
        let p = parse_pairs(
            Kind::Store,
            &["port=2222".into(), "user=bob".into(), "passphrase=x".into()],
        )
        .unwrap();
        assert_eq!(p[1], ("username".into(), "bob".into()));
        assert!(parse_pairs(Kind::Source, &["passphrase=x".into()]).is_err());
        assert!(parse_pairs(Kind::Store, &["port=http".into()]).is_err());
        assert!(parse_pairs(Kind::Store, &["bogus=1".into()]).is_err());
        assert!(parse_pairs(Kind::Store, &["noequals".into()]).is_err());
    }

    #[test]
    fn entries_round_trip_through_toml() {
        let mut e = Entry::new();
        apply(
            &mut e,
            vec![
                ("location".into(), "sftp://h/x".into()),
                ("identity".into(), "/k1".into()),
                ("identity".into(), "/k2".into()),
                ("passphrase".into(), "s".into()),
                ("passphrase_cmd".into(), "echo s".into()),
            ],
        );
        assert!(!e.contains_key("passphrase"), "the command replaced it");
        let mut cfg = ConfigFile::default();
        cfg.stores.insert("n".into(), e);
        let text = toml::to_string(&cfg).unwrap();
        let back: ConfigFile = toml::from_str(&text).unwrap();
        let c = back.get(Kind::Store, "n").unwrap();
        assert_eq!(c.location, "sftp://h/x");
        assert_eq!(c.passphrase_cmd.as_deref(), Some("echo s"));
        assert_eq!(c.secret().unwrap().unwrap(), b"s");
        let o = c.sftp_options(&["port=22".into()]).unwrap();
        assert_eq!(o.identity.len(), 2);
        assert_eq!(o.port, Some(22));
        assert!(back.get(Kind::Store, "other").is_err());
        assert!(back.get(Kind::Source, "n").is_err());
    }

    #[test]
    fn hand_written_typos_are_reported() {
        let cfg: ConfigFile =
            toml::from_str("[stores.a]\nlocation = \"/x\"\nprot = \"22\"\n").unwrap();
        let e = cfg.get(Kind::Store, "a").unwrap_err();
        assert!(format!("{e:#}").contains("prot"), "{e:#}");
        assert!(toml::from_str::<ConfigFile>("[store.a]\n").is_err());
    }
}
