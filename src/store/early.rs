//! Key derivation started before the login: the config and the key file that opened a remote
//! store last time are remembered on this host (`$XDG_CACHE_HOME/kloset/locations/<BLAKE3 of
//! the store's URL>`, mode 0600 in a 0700 directory), so the next command against the same URL
//! can run Argon2id (about a third of a second) while SSH connects and the store's files are
//! listed, instead of after. Over a link of 20 ms round trips that takes the key derivation
//! off the critical path of every command.
//!
//! Nothing remembered is trusted: the remembered key file must still be listed by the store
//! (same name and size: a key removed from the store stops opening it) and the remembered
//! config must be byte for byte the one the server serves; the master keys come out of the
//! key file only if it authenticates under the passphrase, and the config is then
//! authenticated with them as on every open. A remembered file that is missing, too large,
//! a symlink, unparsable or stale only means the derivation waits for the server's files, as
//! before. The passphrase is only taken here when it comes without a prompt (environment,
//! file, command): nobody is asked before the host key is checked.

use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::backend::Listed;
use super::cache::Cache;
use super::crypto::{KeyFile, MasterKeys};
use super::format::{Config, MAGIC_CONFIG, parse_key_file, unframe};

/// A remembered file larger than this is not read (a config and a key file are a few hundred
/// bytes).
const MAX_REMEMBERED: u64 = 64 << 10;

#[derive(Serialize, Deserialize)]
struct Remembered {
    /// The config as the server stored it (framed).
    config: Vec<u8>,
    /// The name of the key file in `keys/`, and its bytes.
    key_name: String,
    key: Vec<u8>,
}

/// Where the files of the store at `location` (its URL) are remembered; `None` without a
/// cache directory or with `KLOSET_NO_CACHE` set.
fn path(location: &str) -> Option<PathBuf> {
    if std::env::var_os("KLOSET_NO_CACHE").is_some() {
        return None;
    }
    let name = blake3::hash(location.as_bytes()).to_hex();
    Some(Cache::base()?.join("locations").join(name.as_str()))
}

/// Remember the config and the key file that opened the store at `location`. Failures (a
/// read-only or full home) only cost the head start next time.
pub(crate) fn remember(location: &str, config: &[u8], key_name: &str, key: &[u8]) {
    use std::os::unix::fs::DirBuilderExt;
    let Some(p) = path(location) else { return };
    let Ok(bytes) = postcard::to_allocvec(&Remembered {
        config: config.to_vec(),
        key_name: key_name.to_string(),
        key: key.to_vec(),
    }) else {
        return;
    };
    if read_bounded(&p).is_some_and(|had| had == bytes) {
        return;
    }
    let Some(dir) = p.parent() else { return };
    if std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .is_err()
    {
        return;
    }
    let _ = super::backend::write_atomic(&p, &bytes, 0o600);
}

/// The bytes of the regular file `p`, never through a symlink, at most [`MAX_REMEMBERED`].
fn read_bounded(p: &std::path::Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
        .ok()?;
    let m = f.metadata().ok()?;
    if !m.is_file() || m.len() > MAX_REMEMBERED {
        return None;
    }
    let mut out = Vec::new();
    f.take(MAX_REMEMBERED + 1).read_to_end(&mut out).ok()?;
    (out.len() as u64 <= MAX_REMEMBERED).then_some(out)
}

/// A key derivation under way on its own thread, from a remembered key file.
pub struct EarlyKeys {
    config: Vec<u8>,
    key_name: String,
    key_size: u64,
    derive: std::thread::JoinHandle<Option<MasterKeys>>,
}

impl EarlyKeys {
    /// Start deriving the keys of the store at `location` (its URL) from the key file
    /// remembered for it, with `passphrase`; `None` when nothing usable is remembered.
    pub fn start(location: &str, passphrase: Vec<u8>) -> Option<EarlyKeys> {
        let r: Remembered = postcard::from_bytes(&read_bounded(&path(location)?)?).ok()?;
        let config: Config = unframe(MAGIC_CONFIG, &r.config, "config").ok()?;
        if !config.encrypted || !plain_name(&r.key_name) {
            return None;
        }
        let key: KeyFile = parse_key_file(&r.key, &r.key_name).ok()?;
        let id = config.id;
        let derive = std::thread::Builder::new()
            .name("early-kdf".into())
            .spawn(move || {
                let _t = crate::trace::span("key derivation (during the login)");
                key.unwrap(&passphrase, &id).ok().flatten()
            })
            .ok()?;
        Some(EarlyKeys {
            config: r.config,
            key_name: r.key_name,
            key_size: r.key.len() as u64,
            derive,
        })
    }

    /// Does the store still serve the remembered config (`config`, as read) and list the
    /// remembered key file (`keys`)?
    pub(crate) fn still_valid(&self, config: &[u8], keys: &[Listed]) -> bool {
        self.config == config
            && keys
                .iter()
                .any(|k| k.name == self.key_name && k.size == self.key_size)
    }

    /// The key file the derivation is from.
    pub(crate) fn key_name(&self) -> &str {
        &self.key_name
    }

    /// Wait for the derivation: the master keys, or `None` if the key file did not open with
    /// the passphrase.
    pub(crate) fn join(self) -> Option<MasterKeys> {
        self.derive.join().ok().flatten()
    }
}

/// A name fit for a file in `keys/`: no separator, not `.` or `..`, not empty.
fn plain_name(n: &str) -> bool {
    !n.is_empty()
        && n != "."
        && n != ".."
        && !n.contains('/')
        && !n.contains('\0')
        && n.len() <= 255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_plain_file_names_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(!plain_name(bad), "{bad:?}");
        }
        assert!(plain_name("0123abcd"));
    }
}
