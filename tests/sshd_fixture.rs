//! Checks the sshd test fixture itself with OpenSSH's own `sftp` client.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::sshd::{ALIAS, Agent, Flavor, Sshd};

/// `sftp` in batch mode against the `sftp-prod` alias. OpenSSH expands `~` from the passwd
/// database, not $HOME, so the config, known_hosts and identity are passed explicitly.
fn sftp(sshd: &Sshd, identity: &str, agent: Option<&Agent>) -> Command {
    let mut cmd = Command::new("sftp");
    cmd.arg("-F")
        .arg(sshd.ssh_config_path())
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            sshd.known_hosts_path().display()
        ))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!(
            "IdentityFile={}",
            sshd.ssh_file(identity).display()
        ))
        .args(["-b", "-", ALIAS])
        .env("HOME", sshd.home())
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("SSH_ASKPASS")
        .env_remove("DISPLAY");
    if let Some(agent) = agent {
        cmd.env("SSH_AUTH_SOCK", agent.sock());
    }
    cmd
}

fn run(mut cmd: Command, batch: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sftp");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[track_caller]
fn assert_ok(out: &Output, sshd: &Sshd) {
    assert!(
        out.status.success(),
        "sftp failed ({}):\nstdout: {}\nstderr: {}\nsshd log: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
}

#[track_caller]
fn assert_denied(out: &Output) {
    assert!(!out.status.success(), "sftp unexpectedly logged in");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Permission denied"),
        "unexpected failure: {stderr}"
    );
}

#[test]
fn default_key_logs_in_and_uploads() {
    let Some(sshd) = Sshd::start() else { return };
    let dir = sshd.remote_dir("upload");
    fs::create_dir(&dir).unwrap();
    let local = sshd.home().join("hello.txt");
    fs::write(&local, b"hello over sftp\n").unwrap();

    let batch = format!(
        "ls /\nput {} {}/hello.txt\n",
        local.display(),
        dir.display()
    );
    let out = run(sftp(&sshd, "id_ed25519", None), &batch);
    assert_ok(&out, &sshd);
    assert_eq!(
        fs::read(dir.join("hello.txt")).unwrap(),
        b"hello over sftp\n"
    );

    // The unauthorized key is refused; a hashed known_hosts still verifies the host.
    assert_denied(&run(sftp(&sshd, "id_wrong", None), "ls /\n"));
    sshd.known_hosts_hashed();
    let hashed = fs::read_to_string(sshd.known_hosts_path()).unwrap();
    assert!(!hashed.contains("127.0.0.1"), "{hashed}");
    assert_ok(&run(sftp(&sshd, "id_ed25519", None), "ls /\n"), &sshd);

    assert!(
        sshd.url(&dir)
            .starts_with(&format!("sftp://root@127.0.0.1:{}/", sshd.port()))
    );
    assert_eq!(sshd.alias_url("/srv/x"), "sftp://sftp-prod/srv/x");
    assert!(sshd.host_pubkey_line().starts_with("ssh-ed25519 AAAA"));
}

#[test]
fn agent_serves_the_encrypted_key() {
    let Some(sshd) = Sshd::start() else { return };
    // Without the agent: the encrypted key needs a passphrase batch mode cannot give, and the
    // other offered key is not authorized.
    assert_denied(&run(sftp(&sshd, "id_encrypted", None), "ls /\n"));
    assert_denied(&run(sftp(&sshd, "id_wrong", None), "ls /\n"));

    let agent = sshd.agent();
    let out = run(sftp(&sshd, "id_wrong", Some(&agent)), "ls /\n");
    assert_ok(&out, &sshd);

    let sock = agent.sock().to_path_buf();
    drop(agent);
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_err(),
        "agent still answers after drop"
    );
}

#[test]
fn logins_work_after_killed_connections_and_restart() {
    let Some(mut sshd) = Sshd::start() else {
        return;
    };
    let pid = sshd.pid().unwrap();

    // An open session: sftp waits on its stdin between commands.
    let mut session: Child = sftp(&sshd, "id_ed25519", None)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = session.stdin.take().unwrap();
    let stdout = session.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    writeln!(stdin, "pwd").unwrap();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no answer from the sftp session");
        if line.contains("Remote working directory") {
            break;
        }
    }

    sshd.kill_connections();
    // The sftp client notices the dead connection when it next talks to the server (not on
    // `pwd`, which it answers from its cache).
    let _ = writeln!(stdin, "ls /");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "sftp session survived kill_connections"
        );
        sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "killed session exited cleanly");
    drop(stdin);

    assert_eq!(sshd.pid(), Some(pid), "listener was replaced");
    assert_ok(&run(sftp(&sshd, "id_ed25519", None), "ls /\n"), &sshd);

    sshd.stop();
    assert!(
        !run(sftp(&sshd, "id_ed25519", None), "ls /\n")
            .status
            .success()
    );
    sshd.restart();
    assert_ok(&run(sftp(&sshd, "id_ed25519", None), "ls /\n"), &sshd);
}

/// One `sftp -b` command against `sshd`: (succeeded, stdout + stderr).
fn sftp_one(sshd: &Sshd, command: &str) -> (bool, String) {
    let out = run(sftp(sshd, "id_ed25519", None), &format!("{command}\n"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The asyncssh server has none of OpenSSH's extensions and a rename that refuses an existing
/// target; OpenSSH, asked the same by its own client, has them (its client renames with
/// posix-rename@openssh.com, which replaces the target).
#[test]
fn asyncssh_server_lacks_what_openssh_has() {
    for flavor in [Flavor::OpenSsh, Flavor::AsyncSsh] {
        let Some(sshd) = Sshd::start_flavor(flavor) else {
            continue;
        };
        let dir = sshd.remote_dir("ext");
        fs::create_dir(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::write(&a, b"a").unwrap();
        fs::write(&b, b"b").unwrap();
        let openssh = flavor == Flavor::OpenSsh;

        let (ok, text) = sftp_one(&sshd, &format!("df {}", dir.display()));
        assert_eq!(ok, openssh, "{flavor:?}: df (statvfs@openssh.com): {text}");
        let (ok, text) = sftp_one(
            &sshd,
            &format!("ln {} {}", a.display(), dir.join("h").display()),
        );
        assert_eq!(ok, openssh, "{flavor:?}: ln (hardlink@openssh.com): {text}");
        let (ok, text) = sftp_one(&sshd, &format!("rename {} {}", a.display(), b.display()));
        assert_eq!(ok, openssh, "{flavor:?}: rename over a file: {text}");
        let want: &[u8] = if openssh { b"a" } else { b"b" };
        assert_eq!(
            fs::read(&b).unwrap(),
            want,
            "{flavor:?}: the target after rename"
        );
        if !openssh {
            assert!(text.contains("Failure"), "{text}");
            let (ok, text) = sftp_one(
                &sshd,
                &format!("rename {} {}", a.display(), dir.join("c").display()),
            );
            assert!(ok, "rename to a free name: {text}");
            assert_eq!(fs::read(dir.join("c")).unwrap(), b"a");
        }
    }
}

/// The chroot account sees only its chroot, cannot write its root, and owns what it writes.
#[test]
fn chroot_account_is_confined() {
    let Some(sshd) = Sshd::start_flavor(Flavor::Chroot) else {
        return;
    };
    assert_eq!(sshd.user(), common::sshd::CHROOT_USER);
    let (ok, text) = sftp_one(&sshd, "ls /");
    assert!(ok, "{text}\n{}", sshd.log());
    assert!(text.contains("/data") && !text.contains("/etc"), "{text}");
    let local = sshd.home().join("x.txt");
    fs::write(&local, b"x").unwrap();
    let (ok, text) = sftp_one(&sshd, &format!("put {} /x.txt", local.display()));
    assert!(!ok, "wrote into the chroot's root: {text}");
    let dir = sshd.remote_dir("put");
    fs::create_dir(&dir).unwrap();
    sshd.give(&dir);
    let there = sshd.server_path(&dir);
    assert!(there.starts_with("/data"), "{}", there.display());
    let (ok, text) = sftp_one(
        &sshd,
        &format!("put {} {}/x.txt", local.display(), there.display()),
    );
    assert!(ok, "{text}");
    let m = fs::metadata(dir.join("x.txt")).unwrap();
    let user = nix::unistd::User::from_name(common::sshd::CHROOT_USER)
        .unwrap()
        .unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), user.uid.as_raw());
}
