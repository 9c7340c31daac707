//! A throwaway OpenSSH server on loopback for one test, with generated keys and a temporary HOME.
//!
//! ```ignore
//! mod common;
//! let Some(sshd) = common::sshd::Sshd::start() else { return };
//! let repo = sshd.remote_dir("repo");
//! let out = sshd.cmd(kloset).args(["at", &sshd.url(&repo), "create"]).output().unwrap();
//! ```
//!
//! `Sshd::start` returns `None` (printing `SKIP: sshd not available: …`) only when `/usr/sbin/sshd`
//! or `ssh-keygen` is missing; every other failure panics with sshd's own log in the message.
//!
//! The temporary HOME holds `.ssh/{id_ed25519,id_ed25519.pub,id_encrypted,id_wrong,known_hosts,config}`.
//! `id_ed25519` (no passphrase) and `id_encrypted` (passphrase [`KEY_PASSPHRASE`]) are authorized,
//! `id_wrong` is not. The alias `sftp-prod` in `.ssh/config` points at the server as `root`.
//!
//! OpenSSH's own clients (`ssh`, `sftp`) look up `~` in the passwd database, not `$HOME`: when
//! driving them, pass `-F`, `-o UserKnownHostsFile=` and `-o IdentityFile=` explicitly.
//!
//! Besides plain OpenSSH ([`Flavor::OpenSsh`]) the same fixture starts the other servers the
//! suite runs against (`Sshd::start_flavor`): asyncssh's SFTP server cut down to bare SFTPv3
//! (tests/common/asyncssh_sftp.py, [`Flavor::AsyncSsh`]) and an OpenSSH account restricted to
//! `ForceCommand internal-sftp` in a `ChrootDirectory` ([`Flavor::Chroot`]). Tests write
//! through [`Sshd::remote_dir`] paths as ever; [`Sshd::url`] turns them into what the server
//! sees, and [`Sshd::give`] hands what a test made there to the server's user.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

pub const SSHD: &str = "/usr/sbin/sshd";
/// Passphrase of `~/.ssh/id_encrypted`.
pub const KEY_PASSPHRASE: &str = "keypass";
/// `KLOSET_PASSPHRASE` set by [`Sshd::cmd`].
pub const REPO_PASSPHRASE: &str = "test-pass";
/// The `Host` alias defined in the temporary `~/.ssh/config`.
pub const ALIAS: &str = "sftp-prod";

const START_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: usize = 5;

/// Which SFTP server a fixture runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenSSH's sshd with internal-sftp, logged in as root.
    OpenSsh,
    /// OpenSSH's sftp-server behind the lying relay of tests/common/hostile_sftp.py.
    Hostile,
    /// asyncssh's SFTP server (tests/common/asyncssh_sftp.py): no OpenSSH extensions, a plain
    /// rename that refuses an existing target, SFTP-draft SYMLINK argument order.
    AsyncSsh,
    /// OpenSSH, as the unprivileged [`CHROOT_USER`] under `ForceCommand internal-sftp` and
    /// `ChrootDirectory` (no shell, no exec, no chown, only its own files).
    Chroot,
    /// [`Flavor::AsyncSsh`] with a plain rename that replaces an existing target (as some
    /// servers do), which kloset must refuse to make a store on.
    AsyncSshRenameReplaces,
}

impl Flavor {
    /// Every server the parametric suite runs against.
    pub const SERVERS: [Flavor; 3] = [Flavor::OpenSsh, Flavor::AsyncSsh, Flavor::Chroot];
}

/// The account [`Flavor::Chroot`] logs in as (created by the fixture when missing).
pub const CHROOT_USER: &str = "kloset-sftp";
/// asyncssh's server (tests/common/asyncssh_sftp.py).
pub const ASYNCSSH_SFTP: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/asyncssh_sftp.py");
/// Debian's python3, where scripts/deps installs python3-asyncssh (a python3 earlier on PATH,
/// e.g. pyenv's, does not see Debian's packages).
pub const PYTHON3: &str = "/usr/bin/python3";

pub struct Sshd {
    flavor: Flavor,
    /// The user name kloset logs in as.
    user: String,
    /// [`Flavor::Chroot`]: the chroot directory (what the server shows as `/`), and the uid and
    /// gid of [`CHROOT_USER`].
    chroot: Option<(PathBuf, u32, u32)>,
    /// Host key, user keys, authorized_keys, sshd_config, pid file and sshd's log.
    dir: TempDir,
    home: TempDir,
    /// Parent of every `remote_dir`.
    remote: TempDir,
    port: u16,
    host_pubkey: String,
    child: Option<Child>,
    next_dir: AtomicUsize,
    /// The `Subsystem sftp` command.
    subsystem: String,
    /// sshd's `MaxStartups` (logins under way at once before it turns connections away).
    max_startups: String,
}

/// OpenSSH's sftp-server, which [`Sshd::start_hostile`] wraps.
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// The relay that can lie (tests/common/hostile_sftp.py).
pub const HOSTILE_SFTP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/hostile_sftp.py");

impl Sshd {
    /// Starts a server, or returns `None` when sshd or ssh-keygen is not installed.
    pub fn start() -> Option<Sshd> {
        Sshd::start_flavor(Flavor::OpenSsh)
    }

    /// A server of `flavor`, or `None` (with a `SKIP:` line saying why) when it truly cannot
    /// run here: sshd or ssh-keygen missing, for [`Flavor::AsyncSsh`] python3's asyncssh
    /// module missing (scripts/deps installs python3-asyncssh), for [`Flavor::Chroot`] not
    /// root or no `useradd`.
    pub fn start_flavor(flavor: Flavor) -> Option<Sshd> {
        match flavor {
            Flavor::Hostile => Sshd::start_hostile(),
            Flavor::AsyncSsh | Flavor::AsyncSshRenameReplaces => {
                let ok = Command::new(PYTHON3)
                    .args(["-c", "import asyncssh"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    eprintln!(
                        "SKIP: asyncssh sftp server not available: {PYTHON3} cannot import asyncssh (scripts/deps installs python3-asyncssh)"
                    );
                    return None;
                }
                Sshd::start_with(flavor)
            }
            Flavor::OpenSsh | Flavor::Chroot => Sshd::start_with(flavor),
        }
    }

    /// A server whose SFTP subsystem is OpenSSH's sftp-server behind the relay of
    /// tests/common/hostile_sftp.py, steered with [`Sshd::hostile_mode`]; `None` (with a SKIP
    /// line) when sshd, python3 or sftp-server is missing.
    pub fn start_hostile() -> Option<Sshd> {
        for need in ["/usr/bin/python3", SFTP_SERVER] {
            if !Path::new(need).is_file() {
                eprintln!("SKIP: hostile sftp server not available: {need} does not exist");
                return None;
            }
        }
        Sshd::start_with(Flavor::Hostile)
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    fn is_asyncssh(&self) -> bool {
        matches!(
            self.flavor,
            Flavor::AsyncSsh | Flavor::AsyncSshRenameReplaces
        )
    }

    /// The user name kloset logs in as (`root`, or [`CHROOT_USER`]).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Makes everything under `path` (a [`Sshd::remote_dir`] path) the server user's, as files
    /// that user had written would be: a no-op but for [`Flavor::Chroot`].
    pub fn give(&self, path: &Path) {
        if let Some((_, uid, gid)) = self.chroot {
            chown_tree(path, uid, gid);
        }
    }

    /// The hostile relay's control directory (see hostile_sftp.py).
    pub fn hostile_ctl(&self) -> PathBuf {
        self.dir.path().join("ctl")
    }

    /// Set what the hostile relay does from its next request on (`""`, `inject DIR TARGET`,
    /// `drop`, `silent`), forgetting any earlier `drop` or `silent` state.
    pub fn hostile_mode(&self, mode: &str) {
        let ctl = self.hostile_ctl();
        let _ = fs::remove_file(ctl.join("state"));
        write(&ctl.join("mode"), mode, 0o644);
    }

    fn start_with(flavor: Flavor) -> Option<Sshd> {
        if !Path::new(SSHD).is_file() {
            eprintln!("SKIP: sshd not available: {SSHD} does not exist");
            return None;
        }
        if find_in_path("ssh-keygen").is_none() {
            eprintln!("SKIP: sshd not available: ssh-keygen is not on PATH");
            return None;
        }
        fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd (sshd's privilege separation dir)");

        let dir = tempdir("sshd");
        let home = tempdir("home");
        let (remote, chroot) = if flavor == Flavor::Chroot {
            let (uid, gid) = chroot_user()?;
            // sshd wants every component of the chroot root-owned and not group or world
            // writable: not under /tmp (1777).
            let remote = tempfile::Builder::new()
                .prefix("kloset-chroot-")
                .tempdir_in("/run")
                .expect("create a chroot directory in /run");
            fs::set_permissions(remote.path(), fs::Permissions::from_mode(0o755)).unwrap();
            let data = remote.path().join("data");
            fs::create_dir(&data).unwrap();
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
            let root = remote.path().to_path_buf();
            (remote, Some((root, uid, gid)))
        } else {
            (tempdir("remote"), None)
        };
        let d = dir.path();
        keygen(&[
            (&d.join("host_ed25519"), ""),
            (&d.join("id_ed25519"), ""),
            (&d.join("id_encrypted"), KEY_PASSPHRASE),
            (&d.join("id_wrong"), ""),
        ]);
        let host_pubkey = pubkey_line(&d.join("host_ed25519.pub"));
        let subsystem = if flavor == Flavor::Hostile {
            let ctl = d.join("ctl");
            fs::create_dir(&ctl).unwrap();
            format!("/usr/bin/python3 {HOSTILE_SFTP} {}", ctl.display())
        } else {
            "internal-sftp".to_string()
        };
        let authorized = format!(
            "{}\n{}\n",
            pubkey_line(&d.join("id_ed25519.pub")),
            pubkey_line(&d.join("id_encrypted.pub"))
        );
        write(&d.join("authorized_keys"), &authorized, 0o600);
        if let Some((root, ..)) = &chroot {
            // sshd reads it as the user: the fixture's own directory is root's alone.
            write(&root.join("authorized_keys"), &authorized, 0o644);
        }

        let ssh = home.path().join(".ssh");
        fs::create_dir(&ssh).unwrap();
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700)).unwrap();
        for name in [
            "id_ed25519",
            "id_ed25519.pub",
            "id_encrypted",
            "id_encrypted.pub",
            "id_wrong",
            "id_wrong.pub",
        ] {
            fs::copy(d.join(name), ssh.join(name)).unwrap();
        }

        let mut sshd = Sshd {
            flavor,
            user: if chroot.is_some() {
                CHROOT_USER
            } else {
                "root"
            }
            .to_string(),
            chroot,
            dir,
            home,
            remote,
            port: 0,
            host_pubkey,
            child: None,
            next_dir: AtomicUsize::new(0),
            subsystem,
            max_startups: "64".into(),
        };
        // Another test may take the port between our probe and sshd's bind: pick a new one then.
        let mut started = false;
        for _ in 0..PORT_ATTEMPTS {
            sshd.port = free_port();
            if !sshd.is_asyncssh() {
                sshd.write_sshd_config();
            }
            if sshd.spawn() {
                started = true;
                break;
            }
        }
        assert!(
            started,
            "sshd could not bind a free loopback port in {PORT_ATTEMPTS} attempts\n{}",
            sshd.log()
        );
        sshd.write_client_files();
        Some(sshd)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary HOME (with `.ssh/`); [`Sshd::cmd`] sets it.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// `HOME/.ssh/<name>`, e.g. `ssh_file("id_encrypted")`, `ssh_file("config")`.
    pub fn ssh_file(&self, name: &str) -> PathBuf {
        self.home.path().join(".ssh").join(name)
    }

    pub fn known_hosts_path(&self) -> PathBuf {
        self.ssh_file("known_hosts")
    }

    pub fn ssh_config_path(&self) -> PathBuf {
        self.ssh_file("config")
    }

    /// `sftp://USER@127.0.0.1:PORT/<path>`. The URL path is the absolute path on the server
    /// (a leading `/` of `path` is not doubled); a [`Sshd::remote_dir`] path of a
    /// [`Flavor::Chroot`] server is given as the server shows it, inside the chroot.
    pub fn url(&self, path: impl AsRef<Path>) -> String {
        format!(
            "sftp://{}@127.0.0.1:{}/{}",
            self.user,
            self.port,
            url_path(&self.server_path(path.as_ref()))
        )
    }

    /// `sftp://sftp-prod/<path>`, resolved through the temporary `~/.ssh/config`.
    pub fn alias_url(&self, path: impl AsRef<Path>) -> String {
        format!(
            "sftp://{ALIAS}/{}",
            url_path(&self.server_path(path.as_ref()))
        )
    }

    /// `path` (on this machine) as the server shows it: the same but inside a chroot.
    pub fn server_path(&self, path: &Path) -> PathBuf {
        match &self.chroot {
            Some((root, ..)) => match path.strip_prefix(root) {
                Ok(rel) => Path::new("/").join(rel),
                Err(_) => panic!(
                    "{} is outside the chroot {} of this server",
                    path.display(),
                    root.display()
                ),
            },
            None => path.to_path_buf(),
        }
    }

    /// A fresh, unique, absolute path on the server (= this machine) for one test's data:
    /// `<fixture tempdir>/<name>-<n>`. Its parent exists; the directory itself does NOT, so
    /// the code under test (or the test, with `fs::create_dir`) creates it.
    pub fn remote_dir(&self, name: &str) -> PathBuf {
        let n = self.next_dir.fetch_add(1, Ordering::Relaxed);
        let parent = match &self.chroot {
            Some((root, ..)) => root.join("data"),
            None => self.remote.path().to_path_buf(),
        };
        parent.join(format!("{name}-{n}"))
    }

    /// The host's public key as `ssh-ed25519 AAAA…` (no comment).
    pub fn host_pubkey_line(&self) -> &str {
        &self.host_pubkey
    }

    /// Rewrites `~/.ssh/known_hosts` with hashed host names (`ssh-keygen -H`): `|1|salt|hash …`.
    pub fn known_hosts_hashed(&self) {
        let path = self.known_hosts_path();
        let out = Command::new("ssh-keygen")
            .arg("-H")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh-keygen -H");
        assert!(
            out.status.success(),
            "ssh-keygen -H failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = fs::remove_file(path.with_extension("old"));
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("|1|"),
            "known_hosts was not hashed:\n{text}"
        );
    }

    /// Replaces `~/.ssh/known_hosts` with `text` (e.g. to plant a wrong or missing host key).
    pub fn write_known_hosts(&self, text: &str) {
        write(&self.known_hosts_path(), text, 0o600);
    }

    /// A command for `bin` with HOME = the temporary home, no `SSH_AUTH_SOCK`, and
    /// `KLOSET_PASSPHRASE` = [`REPO_PASSPHRASE`].
    pub fn cmd(&self, bin: &Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.env("HOME", self.home.path())
            .env_remove("SSH_AUTH_SOCK")
            .env("KLOSET_PASSPHRASE", REPO_PASSPHRASE);
        cmd
    }

    /// Starts an ssh-agent holding the passphrase-protected `id_encrypted` key.
    pub fn agent(&self) -> Agent {
        Agent::start(&self.ssh_file("id_encrypted"))
    }

    /// The listener's pid, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills every live connection (sshd's per-connection processes, their session children and
    /// internal-sftp with them) and waits until they are gone. The listener keeps accepting.
    ///
    /// asyncssh's server serves every connection in its one process: there, the whole server
    /// is killed and started again on the same port (a short refusal to connect besides).
    pub fn kill_connections(&mut self) {
        if self.is_asyncssh() {
            self.restart();
        } else if let Some(pid) = self.pid() {
            kill_tree(pid);
        }
    }

    /// Takes the whole server down: the listener and every live connection. `restart` brings it
    /// back on the same port with the same keys.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            let _ = child.kill();
            let _ = child.wait();
            wait_port_closed(self.port);
        }
    }

    /// Restart OpenSSH's sshd with `MaxStartups spec` (`start:rate:full`): beyond `start`
    /// logins under way at once it drops `rate`% of new connections, all beyond `full`,
    /// closing them before the SSH banner.
    pub fn set_max_startups(&mut self, spec: &str) {
        assert!(!self.is_asyncssh(), "MaxStartups is OpenSSH's");
        self.max_startups = spec.to_string();
        self.write_sshd_config();
        self.restart();
    }

    /// `stop` if running, then start again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        // The port is ours by convention but not reserved; a bind failure is retried briefly.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "sshd could not re-bind 127.0.0.1:{} on restart\n{}",
                self.port,
                self.log()
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// Everything sshd wrote to stderr so far (LogLevel ERROR), for assertion messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("sshd_config")
    }

    fn write_sshd_config(&self) {
        let d = self.dir.path();
        let base = format!(
            "ListenAddress 127.0.0.1\n\
             Port {port}\n\
             HostKey {host}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {auth}\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             StrictModes no\n\
             UsePAM no\n\
             UseDNS no\n\
             Subsystem sftp {subsystem}\n\
             LogLevel ERROR\n\
             MaxStartups {max_startups}\n\
             MaxSessions 64\n\
             LoginGraceTime 30\n",
            port = self.port,
            host = d.join("host_ed25519").display(),
            pid = d.join("sshd.pid").display(),
            auth = d.join("authorized_keys").display(),
            subsystem = self.subsystem,
            max_startups = self.max_startups,
        );
        // OpenSSH >= 9.8 penalises (refuses for a while) source addresses whose connections fail
        // or are killed, which killed-connection and wrong-key tests do on purpose. Older sshd
        // rejects the option, so it is kept only if `sshd -t` accepts it.
        // The restricted account of a chroot server: SFTP only, inside its chroot. A Match
        // block ends the file (everything after one belongs to it).
        let restricted = match &self.chroot {
            Some((root, ..)) => format!(
                "Match User {CHROOT_USER}\n\
                 \x20   ChrootDirectory {root}\n\
                 \x20   ForceCommand internal-sftp\n\
                 \x20   AuthorizedKeysFile {root}/authorized_keys\n\
                 \x20   AllowTcpForwarding no\n\
                 \x20   X11Forwarding no\n\
                 \x20   PermitTTY no\n",
                root = root.display()
            ),
            None => String::new(),
        };
        let with_penalties = format!("{base}PerSourcePenalties no\n{restricted}");
        write(&self.config_path(), &with_penalties, 0o600);
        let check = self.config_check();
        if check.status.success() {
            return;
        }
        let base = format!("{base}{restricted}");
        write(&self.config_path(), &base, 0o600);
        let check = self.config_check();
        assert!(
            check.status.success(),
            "sshd -t rejected the generated config {}:\n{}\n{base}",
            self.config_path().display(),
            String::from_utf8_lossy(&check.stderr)
        );
    }

    fn config_check(&self) -> std::process::Output {
        Command::new(SSHD)
            .arg("-t")
            .arg("-f")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {SSHD} -t: {e}"))
    }

    fn write_client_files(&self) {
        let port = self.port;
        write(
            &self.known_hosts_path(),
            &format!("[127.0.0.1]:{port} {}\n", self.host_pubkey),
            0o600,
        );
        write(
            &self.ssh_config_path(),
            &format!(
                "Host {ALIAS}\n    HostName 127.0.0.1\n    Port {port}\n    User {user}\n    \
                 IdentityFile ~/.ssh/id_ed25519\n\nHost *\n    ConnectTimeout 10\n",
                user = self.user
            ),
            0o600,
        );
    }

    /// Spawns sshd on `self.port` and waits until it listens. Returns false if sshd exited
    /// because the port was taken; panics on any other failure.
    fn spawn(&mut self) -> bool {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sshd.log"))
            .unwrap();
        let mut cmd = if self.is_asyncssh() {
            let d = self.dir.path();
            let mut c = Command::new(PYTHON3);
            c.arg(ASYNCSSH_SFTP)
                .arg(d.join("host_ed25519"))
                .arg(d.join("authorized_keys"))
                .arg(self.port.to_string());
            if self.flavor == Flavor::AsyncSshRenameReplaces {
                c.arg("rename-replaces");
            }
            c
        } else {
            let mut c = Command::new(SSHD);
            c.arg("-D").arg("-e").arg("-f").arg(self.config_path());
            c
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.flavor));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let log = self.log();
                if log.contains("Address already in use") || log.contains("Cannot bind any address")
                {
                    return false;
                }
                panic!(
                    "{:?} server exited during startup ({status}) on port {}:\n{log}",
                    self.flavor, self.port
                );
            }
            if listens(child.id(), self.port)
                && TcpStream::connect_timeout(&loopback(self.port), Duration::from_secs(1)).is_ok()
            {
                self.child = Some(child);
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sshd did not accept connections on 127.0.0.1:{} within {START_TIMEOUT:?}:\n{}",
                    self.port,
                    self.log()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An ssh-agent on a private socket, killed on drop.
pub struct Agent {
    dir: TempDir,
    sock: PathBuf,
    child: Child,
}

impl Agent {
    /// Starts `ssh-agent -D -a SOCK` and adds `key` (protected by [`KEY_PASSPHRASE`]) through
    /// an `SSH_ASKPASS` script.
    pub fn start(key: &Path) -> Agent {
        let dir = tempdir("agent");
        let sock = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ssh-agent: {e}"));
        let mut agent = Agent { dir, sock, child };
        let deadline = Instant::now() + START_TIMEOUT;
        // The socket file appears at bind(), before the agent listens: a connect in between
        // is refused (ssh-add failed so in one full run), so wait until one is taken.
        while std::os::unix::net::UnixStream::connect(&agent.sock).is_err() {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!("ssh-agent exited during startup: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "ssh-agent socket {} did not take a connection",
                agent.sock.display()
            );
            sleep(Duration::from_millis(10));
        }

        let askpass = agent.dir.path().join("askpass.sh");
        write(
            &askpass,
            &format!("#!/bin/sh\necho {KEY_PASSPHRASE}\n"),
            0o700,
        );
        let out = Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &agent.sock)
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run ssh-add: {e}"));
        assert!(
            out.status.success(),
            "ssh-add {} failed: {}",
            key.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        agent
    }

    /// The value for `SSH_AUTH_SOCK`.
    pub fn sock(&self) -> &Path {
        &self.sock
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// uid and gid of [`CHROOT_USER`], created (no password, no shell, home `/`) if missing;
/// `None` with a SKIP line when that is impossible here.
fn chroot_user() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: chroot sftp account not available: the tests do not run as root");
        return None;
    }
    let lookup = || {
        nix::unistd::User::from_name(CHROOT_USER)
            .ok()
            .flatten()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
    };
    if let Some(ids) = lookup() {
        return Some(ids);
    }
    // `*` (not useradd's default `!`): sshd without PAM refuses accounts locked with `!`.
    let out = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/",
            "--shell",
            "/usr/sbin/nologin",
            "--password",
            "*",
            CHROOT_USER,
        ])
        .stdin(Stdio::null())
        .output();
    // Another test binary may have created it meanwhile: look again either way.
    match (lookup(), out) {
        (Some(ids), _) => Some(ids),
        (None, Ok(out)) => panic!(
            "useradd {CHROOT_USER} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        (None, Err(e)) => {
            eprintln!("SKIP: chroot sftp account not available: cannot run useradd: {e}");
            None
        }
    }
}

/// `lchown -R`.
fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        for e in fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

fn tempdir(what: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("kloset-{what}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("create {what} tempdir: {e}"))
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Generates ed25519 key pairs `(path, passphrase)`, all at once.
fn keygen(keys: &[(&Path, &str)]) {
    let children: Vec<Child> = keys
        .iter()
        .map(|(path, passphrase)| {
            Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    passphrase,
                    "-C",
                    "kloset-test",
                    "-f",
                ])
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("run ssh-keygen: {e}"))
        })
        .collect();
    for ((path, _), child) in keys.iter().zip(children) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ssh-keygen -f {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `type base64` from a `.pub` file, without the comment.
fn pubkey_line(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let fields: Vec<&str> = text.split_whitespace().take(2).collect();
    assert_eq!(
        fields.len(),
        2,
        "bad public key in {}: {text:?}",
        path.display()
    );
    fields.join(" ")
}

fn write(path: &Path, text: &str, mode: u32) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(text.as_bytes()).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn url_path(path: &Path) -> String {
    let s = path.to_str().expect("test paths are UTF-8");
    s.trim_start_matches('/').to_string()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind(loopback(0)).expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

fn wait_port_closed(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect_timeout(&loopback(port), Duration::from_millis(200)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "port {port} still accepts connections after stop"
        );
        sleep(Duration::from_millis(20));
    }
}

/// True if a LISTEN socket on 127.0.0.1:`port` is one of `pid`'s open files: the port answers
/// for *our* sshd, not another test's server that happened to get the same port.
fn listens(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return true; // no procfs: trust the connect probe alone
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: HashSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .ok()
            .and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')
                    .map(str::to_string)
            })
            .is_some_and(|inode| inodes.contains(&inode))
    })
}

/// (pid, ppid, state) of every process, from /proc/*/stat.
fn processes() -> Vec<(u32, u32, char)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) S ppid ...": comm may contain spaces and parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut f = rest.split_whitespace();
            let state = f.next()?.chars().next()?;
            let ppid = f.next()?.parse().ok()?;
            Some((pid, ppid, state))
        })
        .collect()
}

/// Live (non-zombie) descendants of `root`.
fn descendants(root: u32) -> Vec<u32> {
    let procs = processes();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(pid, ppid, state) in &procs {
        if state != 'Z' {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].chars().next())
            .is_some_and(|s| s != 'Z'),
        Err(_) => false,
    }
}

/// SIGKILLs every descendant of `root`, then waits until they are dead. The tree is frozen with SIGSTOP first so that nothing forks away unseen.
fn kill_tree(root: u32) {
    let mut seen: Vec<u32> = Vec::new();
    loop {
        let new: Vec<u32> = descendants(root)
            .into_iter()
            .filter(|p| !seen.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        for &p in &new {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGSTOP);
        }
        seen.extend(new);
    }
    for &p in &seen {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "sshd processes {seen:?} survived SIGKILL"
        );
        sleep(Duration::from_millis(10));
    }
}
