//! A bounded run of `scripts/torture` (kill -9 and SIGSTOP/SIGCONT schedules for backup,
//! restore, sync and rm, each round followed by `check` and an exact restore of every
//! snapshot): 30 rounds on local stores, and 10 on stores on a loopback OpenSSH server when
//! sshd is installed. Fixed seeds, so the commands and source changes repeat; the moment
//! each signal lands does not. The script runs thousands of rounds by hand.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kloset");

fn torture(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/torture");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .env("KLOSET", BIN)
        .output()
        .expect("run python3 scripts/torture");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/torture {args:?} failed ({:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
    assert!(
        stdout.contains("torture summary:") && !stdout.contains("FAIL"),
        "scripts/torture {args:?} printed no clean summary:\n{stdout}\n{stderr}"
    );
    // The figures, for `cargo test -- --nocapture`.
    println!("{}", stdout.lines().last().unwrap_or_default());
}

#[test]
fn kill_and_pause_schedules_on_local_stores() {
    torture(&["-n", "30", "-seed", "20261202", "-max-snapshots", "5"]);
}

#[test]
fn kill_and_pause_schedules_on_sftp_stores() {
    for tool in ["/usr/sbin/sshd", "/usr/bin/ssh-keygen"] {
        if !Path::new(tool).exists() {
            println!("SKIP: sshd not available: {tool} is missing");
            return;
        }
    }
    torture(&[
        "-sftp",
        "-n",
        "10",
        "-seed",
        "20261203",
        "-max-snapshots",
        "4",
    ]);
}
