//! End-to-end tests of the `kloset` command line: the built binary is run against local stores
//! in temporary directories, and its stdout, stderr and exit codes are checked.
//!
//! Every command runs with a cleared environment, `HOME` in a temporary directory and stdin
//! from /dev/null (never a terminal). Every run also asserts that nothing panicked.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_kloset");
const PASS: &str = "correct horse battery staple";
/// The longest any one command may take; every command here handles a few hundred KiB, so
/// anything near this is a hang (such as a lock thread keeping a finished command alive).
const TIMEOUT: Duration = Duration::from_secs(120);

// Exit codes (src/cli/mod.rs `exit`).
const OK: i32 = 0;
const ERROR: i32 = 1;
const USAGE: i32 = 2;
const PARTIAL: i32 = 3;
const WRONG_PASSPHRASE: i32 = 4;
const NO_STORE: i32 = 5;
const DAMAGED: i32 = 6;
const LOCKED: i32 = 7;
const NOT_FOUND: i32 = 8;

// ---------------------------------------------------------------------------------------------
// Harness

/// The result of one run of the binary.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
    raw_stdout: Vec<u8>,
}

impl Out {
    fn code(&self, want: i32) -> &Self {
        assert_eq!(
            self.code, want,
            "exit code {} (want {want})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    fn ok(&self) -> &Self {
        self.code(OK)
    }

    /// An error exit with exactly one line on stderr, `kloset: …`, containing each of `words`.
    fn fails(&self, want: i32, words: &[&str]) -> &Self {
        self.code(want);
        let lines: Vec<_> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "want a one-line error, got:\n{}",
            self.stderr
        );
        assert!(
            lines[0].starts_with("kloset: "),
            "error not prefixed: {}",
            lines[0]
        );
        for w in words {
            assert!(
                lines[0].contains(w),
                "error {:?} does not mention {w:?}",
                lines[0]
            );
        }
        self
    }

    /// A usage error from the parser: exit 2, the first stderr line says what is wrong.
    fn usage(&self, words: &[&str]) -> &Self {
        self.code(USAGE);
        let first = self.stderr.lines().next().unwrap_or("");
        assert!(first.starts_with("error: "), "usage error: {}", self.stderr);
        for w in words {
            assert!(first.contains(w), "{first:?} does not mention {w:?}");
        }
        assert!(self.stdout.is_empty(), "stdout: {}", self.stdout);
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// A command of the binary with a clean, terminal-free environment.
struct Cmd {
    cmd: Command,
}

impl Cmd {
    fn new(home: &Path) -> Cmd {
        Cmd::program(BIN, home)
    }

    /// Another program (e.g. `setpriv`) with the same environment.
    fn program(program: &str, home: &Path) -> Cmd {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("HOME", home)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Cmd { cmd }
    }

    fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Cmd {
        self.cmd.env(k, v);
        self
    }

    fn cwd(mut self, dir: &Path) -> Cmd {
        self.cmd.current_dir(dir);
        self
    }

    /// Run to completion (at most [`TIMEOUT`]: a command that hangs fails the test).
    fn run(mut self) -> Out {
        let mut child = self.cmd.spawn().expect("run kloset");
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut b = Vec::new();
                r.read_to_end(&mut b).expect("read output");
                b
            })
        };
        let out_t = drain(Box::new(child.stdout.take().unwrap()));
        let err_t = drain(Box::new(child.stderr.take().unwrap()));
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for kloset") {
                break st;
            }
            if start.elapsed() > TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kloset took more than {TIMEOUT:?}: {:?}", self.cmd);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let o = std::process::Output {
            status,
            stdout: out_t.join().unwrap(),
            stderr: err_t.join().unwrap(),
        };
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !stderr.contains("panicked"),
            "kloset panicked ({:?}):\n{stderr}",
            self.cmd
        );
        assert!(
            !stderr.contains("RUST_BACKTRACE"),
            "kloset panicked ({:?}):\n{stderr}",
            self.cmd
        );
        let code = o
            .status
            .code()
            .unwrap_or_else(|| panic!("kloset killed by a signal: {:?}\n{stderr}", o.status));
        Out {
            code,
            stdout,
            stderr,
            raw_stdout: o.stdout,
        }
    }
}

/// A test's world: a temporary directory holding `home/`, `store/`, a source tree `src/www`
/// and a working directory `work/`.
struct World {
    tmp: TempDir,
    home: PathBuf,
    store: PathBuf,
    src: PathBuf,
    work: PathBuf,
}

/// Deterministic, poorly compressible bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const INDEX_HTML: &str = "<h1>hello</h1>\n";
const SITE_CSS: &str = "body { color: black }\n";
const PRINT_CSS: &str = "body { color: grey }\n";

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonical tempdir");
        let home = root.join("home");
        let src = root.join("src").join("www");
        let work = root.join("work");
        fs::create_dir_all(&home).unwrap();
        fs::create_dir_all(&work).unwrap();
        fs::create_dir_all(src.join("css")).unwrap();
        fs::create_dir_all(src.join("img")).unwrap();
        fs::write(src.join("index.html"), INDEX_HTML).unwrap();
        fs::write(src.join("css/site.css"), SITE_CSS).unwrap();
        fs::write(src.join("css/print.css"), PRINT_CSS).unwrap();
        fs::write(src.join("img/logo.bin"), noise(300_000, 1)).unwrap();
        World {
            store: root.join("store"),
            tmp,
            home,
            src,
            work,
        }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().canonicalize().unwrap()
    }

    fn store_s(&self) -> String {
        self.store.to_str().unwrap().to_string()
    }

    fn src_s(&self) -> String {
        self.src.to_str().unwrap().to_string()
    }

    /// `kloset ARGS…` with the passphrase in KLOSET_PASSPHRASE, in `work/`.
    fn kloset<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Cmd {
        Cmd::new(&self.home)
            .env("KLOSET_PASSPHRASE", PASS)
            .cwd(&self.work)
            .args(args)
    }

    /// `kloset at STORE ARGS…`.
    fn at<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Cmd {
        Cmd::new(&self.home)
            .env("KLOSET_PASSPHRASE", PASS)
            .cwd(&self.work)
            .args(["at", &self.store_s()])
            .args(args)
    }

    /// Run `kloset at STORE ARGS…` and require success.
    fn ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Out {
        let o = self.at(args).run();
        o.ok();
        o
    }

    /// Create an encrypted store (each command that opens it derives a key: slow).
    fn create_encrypted(&self) {
        let o = self.ok(&["create"]);
        assert!(o.stdout.is_empty(), "create prints nothing on stdout");
        assert!(o.stderr.contains("created encrypted store"), "{}", o.stderr);
        assert!(self.store.join("config").is_file());
    }

    /// Create a plaintext store: no key derivation, so the tests stay fast.
    fn create(&self) {
        let o = self.ok(&["create", "-plaintext"]);
        assert!(o.stdout.is_empty(), "create prints nothing on stdout");
        assert!(o.stderr.contains("created plaintext store"), "{}", o.stderr);
        assert!(self.store.join("config").is_file());
    }

    /// Back up `src/www`; returns the short id printed on stdout.
    fn backup(&self, extra: &[&str]) -> String {
        let mut args = vec!["backup"];
        args.extend_from_slice(extra);
        let src = self.src_s();
        args.push(&src);
        let o = self.ok(&args);
        short_id(&o.stdout)
    }

    /// Full ids of the snapshots, oldest first, from `ls -json`.
    fn snapshot_ids(&self) -> Vec<String> {
        let v = self.ok(&["ls", "-json"]).json();
        v.as_array()
            .expect("ls -json is an array")
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// All files of the store and their contents.
    fn store_files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        files_under(&self.store)
    }
}

/// Every regular file below `dir` (relative path → contents).
fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(base, &p, out);
            } else if t.is_file() {
                out.insert(
                    p.strip_prefix(base).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// The stdout of `backup`: exactly one line, the 8-hex-digit short id.
fn short_id(stdout: &str) -> String {
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "backup stdout: {stdout:?}");
    let id = lines[0];
    assert!(is_hex(id, 8), "short id {id:?}");
    id.to_string()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Flip one bit of a file at `offset`.
fn flip(path: &Path, offset: usize) {
    let mut b = fs::read(path).unwrap();
    b[offset] ^= 0x10;
    fs::write(path, b).unwrap();
}

/// The pack files of a store, largest first.
fn packs(store: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = files_under(&store.join("packs"))
        .into_iter()
        .map(|(p, b)| (b.len(), store.join("packs").join(p)))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v.into_iter().map(|(_, p)| p).collect()
}

fn rel(store: &Path, p: &Path) -> String {
    p.strip_prefix(store).unwrap().to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// version, help, usage errors

/// A backup under a low open-file limit (`ulimit -n 48`) reads every file: the files the
/// local source keeps open between their prefetch and their read (up to 256 by default)
/// stay within a quarter of the limit, and never take the descriptors the workers, the
/// store's writes and the restore need.
#[test]
fn a_backup_under_a_low_open_file_limit_reads_every_file() {
    let w = World::new();
    w.create();
    let many = w.src.join("many");
    fs::create_dir_all(&many).unwrap();
    for i in 0..2000 {
        fs::write(many.join(format!("f{i:04}")), format!("file {i}\n")).unwrap();
    }
    let limited = |args: &[&str]| {
        Cmd::program("sh", &w.home)
            .env("KLOSET_PASSPHRASE", PASS)
            .cwd(&w.work)
            .args(["-c", "ulimit -n 48 && exec \"$@\"", "sh", BIN])
            .args(args)
            .run()
    };
    let store = w.store_s();
    let src = w.src_s();
    // Cold, the files are slow to read and the prefetcher gets ahead of the workers (as root;
    // warm, the test still checks the backup, less hard).
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    let o = limited(&["at", &store, "backup", &src]);
    o.ok();
    let id = short_id(&o.stdout);
    let dst = w.root().join("restored");
    w.ok(&["restore", "-to", dst.to_str().unwrap(), &id]);
    assert_eq!(files_under(&dst), files_under(&w.src));
}

#[test]
fn version_verb_and_flag() {
    let w = World::new();
    let o = w.kloset(&["version"]).run();
    o.ok();
    assert!(
        o.stdout
            .starts_with(&format!("kloset {}", env!("CARGO_PKG_VERSION"))),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("store format 2"), "{}", o.stdout);
    for flag in ["--version", "-version", "-V"] {
        let o = w.kloset(&[flag]).run();
        o.ok();
        assert!(o.stdout.contains(env!("CARGO_PKG_VERSION")), "{flag}");
    }
}

#[test]
fn help_exits_zero() {
    let w = World::new();
    for args in [
        &["--help"][..],
        &["-help"],
        &["at", "s", "restore", "--help"],
        &["at", "s", "backup", "-help"],
    ] {
        let o = w.kloset(args).run();
        o.ok();
        assert!(o.stdout.contains("Usage"), "{args:?}: {}", o.stdout);
    }
    // The restore help documents -to.
    let o = w.kloset(&["at", "s", "restore", "--help"]).run();
    assert!(o.stdout.contains("--to"), "{}", o.stdout);
}

#[test]
fn usage_errors_exit_2() {
    let w = World::new();
    w.create();
    w.at(&["frobnicate"]).run().usage(&["frobnicate"]);
    w.kloset(&["frobnicate"]).run().usage(&["frobnicate"]);
    w.at(&["ls", "-bogus"]).run().usage(&[]);
    w.at(&["ls", "--bogus"]).run().usage(&["--bogus"]);
    w.at(&["backup", "-tag"]).run().usage(&["--tag"]);
    w.at(&["restore"]).run().usage(&[]);
    w.at(&["cat"]).run().usage(&[]);
    // Without a verb (or anything) the help goes to stderr, with exit 2.
    for args in [&["at"][..], &["at", "store"], &[]] {
        let o = w.kloset(args).run();
        o.code(USAGE);
        assert!(o.stderr.contains("Usage"), "{}", o.stderr);
        assert!(o.stdout.is_empty(), "{}", o.stdout);
    }
    w.at(&["create", "extra"]).run().usage(&["extra"]);
    // Nothing was written by any of them.
    assert!(
        w.store
            .join("snapshots")
            .read_dir()
            .unwrap()
            .next()
            .is_none()
    );
}

// ---------------------------------------------------------------------------------------------
// Happy paths

#[test]
fn create_backup_ls_cat_restore_check_info() {
    let w = World::new();
    w.create_encrypted();
    let id = w.backup(&[]);

    // ls: one line, short id first, then time, host, source, size, file count.
    let o = w.ok(&["ls"]);
    let lines: Vec<_> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", o.stdout);
    let cols: Vec<_> = lines[0].split_whitespace().collect();
    assert_eq!(cols[0], id);
    assert!(
        humantime::parse_rfc3339(cols[1]).is_ok(),
        "time column {:?}",
        cols[1]
    );
    assert_eq!(cols[2], kloset::store::hostname());
    assert_eq!(cols[3], w.src_s());
    assert!(lines[0].contains("4 files"), "{}", lines[0]);

    // cat by relative and absolute path, text and binary.
    let o = w.ok(&["cat", &format!("{id}:index.html")]);
    assert_eq!(o.stdout, INDEX_HTML);
    let o = w.ok(&["cat", &format!("{id}:{}/css/site.css", w.src_s())]);
    assert_eq!(o.stdout, SITE_CSS);
    let o = w.ok(&["cat", "latest:img/logo.bin"]);
    assert_eq!(o.raw_stdout, noise(300_000, 1));

    // restore and compare.
    let dest = w.root().join("restored");
    w.ok(&["restore", "-to", dest.to_str().unwrap(), &id]);
    assert_eq!(files_under(&dest), files_under(&w.src));

    // check and info.
    let o = w.ok(&["check"]);
    assert!(o.stderr.contains("ok:"), "{}", o.stderr);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    let o = w.ok(&["info"]);
    let cfg_id = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("store:"))
        .expect("store: line")
        .trim()
        .to_string();
    assert!(is_hex(&cfg_id, 32), "{cfg_id}");
    assert!(o.stdout.contains("AES-256-GCM"), "{}", o.stdout);
    assert!(o.stdout.contains("zstd"), "{}", o.stdout);
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("snapshots:") && l.trim_end().ends_with(" 1")),
        "{}",
        o.stdout
    );
}

#[test]
fn ls_snapshot_contents() {
    let w = World::new();
    w.create();
    let id = w.backup(&[]);

    // Top level of the backed-up directory, names only, sorted.
    let o = w.ok(&["ls", &id]);
    let names: Vec<_> = o
        .stdout
        .lines()
        .map(|l| l.split_whitespace().last().unwrap())
        .collect();
    assert_eq!(names, ["css", "img", "index.html"], "{}", o.stdout);
    assert!(o.stdout.lines().next().unwrap().starts_with('d'));

    // A subdirectory, relative and absolute.
    for spec in [
        format!("{id}:css"),
        format!("{id}:{}/css", w.src_s()),
        "latest:css".to_string(),
    ] {
        let o = w.ok(&["ls", &spec]);
        let names: Vec<_> = o
            .stdout
            .lines()
            .map(|l| l.split_whitespace().last().unwrap())
            .collect();
        assert_eq!(names, ["print.css", "site.css"], "{spec}: {}", o.stdout);
    }

    // A single file: one line with its size.
    let o = w.ok(&["ls", &format!("{id}:index.html")]);
    assert_eq!(o.stdout.lines().count(), 1);
    assert!(o.stdout.starts_with("-rw"), "{}", o.stdout);
    assert!(
        o.stdout
            .split_whitespace()
            .any(|c| c == INDEX_HTML.len().to_string()),
        "{}",
        o.stdout
    );

    // Recursive, with both dash forms and -r: full paths of everything.
    for flag in ["-recursive", "--recursive", "-r"] {
        let o = w.ok(&["ls", flag, &id]);
        let paths: Vec<_> = o
            .stdout
            .lines()
            .map(|l| l.split_whitespace().last().unwrap().to_string())
            .collect();
        let s = w.src_s();
        assert_eq!(
            paths,
            [
                format!("{s}/css"),
                format!("{s}/css/print.css"),
                format!("{s}/css/site.css"),
                format!("{s}/img"),
                format!("{s}/img/logo.bin"),
                format!("{s}/index.html"),
            ],
            "{flag}"
        );
    }

    // The snapshot root is a directory holding the absolute path.
    let o = w.ok(&["ls", &format!("{id}:/")]);
    let first = w.src.components().nth(1).unwrap();
    assert!(
        o.stdout.contains(first.as_os_str().to_str().unwrap()),
        "{}",
        o.stdout
    );

    // A missing path in ls.
    w.at(&["ls", &format!("{id}:nope")])
        .run()
        .fails(NOT_FOUND, &["nope"]);
}

#[test]
fn ls_lists_oldest_first_with_tags() {
    let w = World::new();
    w.create();
    let a = w.backup(&["-tag", "daily", "--tag", "web"]);
    fs::write(w.src.join("index.html"), "v2\n").unwrap();
    let b = w.backup(&["--tag=weekly"]);
    let c = w.backup(&[]);

    let o = w.ok(&["ls"]);
    let lines: Vec<_> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", o.stdout);
    let ids: Vec<_> = lines
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids, [&a, &b, &c]);
    assert!(lines[0].contains("daily"), "{}", lines[0]);
    assert!(lines[0].contains("web"), "{}", lines[0]);
    assert!(lines[1].contains("weekly"), "{}", lines[1]);
    assert!(!lines[2].contains("tags"), "{}", lines[2]);

    // Filtering by tag.
    for flag in ["-tag", "--tag"] {
        let o = w.ok(&["ls", flag, "web"]);
        assert_eq!(o.stdout.lines().count(), 1, "{}", o.stdout);
        assert!(o.stdout.starts_with(&a));
    }
    let o = w.ok(&["ls", "-tag", "none-such"]);
    assert!(o.stdout.is_empty());

    let v = w.ok(&["ls", "-json"]).json();
    assert_eq!(v[0]["tags"], serde_json::json!(["daily", "web"]));
    assert_eq!(v[1]["tags"], serde_json::json!(["weekly"]));
    assert_eq!(v[2]["tags"], serde_json::json!([]));
}

#[test]
fn backup_defaults_to_cwd_and_quiet() {
    let w = World::new();
    w.create();
    let o = w.at(&["backup"]).cwd(&w.src).run();
    o.ok();
    let id = short_id(&o.stdout);
    assert!(o.stderr.contains(&id), "summary on stderr: {}", o.stderr);
    let v = w.ok(&["ls", "-json"]).json();
    assert_eq!(v[0]["source"], w.src_s());
    assert_eq!(v[0]["files"], 4);

    // Quiet: the id and nothing else.
    for q in ["-q", "-quiet", "--quiet"] {
        let o = Cmd::new(&w.home)
            .env("KLOSET_PASSPHRASE", PASS)
            .args([q, "at", &w.store_s(), "backup", &w.src_s()])
            .run();
        o.ok();
        short_id(&o.stdout);
        assert!(o.stderr.is_empty(), "{q}: {}", o.stderr);
    }
}

#[test]
fn store_as_file_url() {
    let w = World::new();
    let url = format!("file://{}", w.store_s());
    let run = |args: &[&str]| {
        Cmd::new(&w.home)
            .env("KLOSET_PASSPHRASE", PASS)
            .args(["at", &url])
            .args(args)
            .run()
    };
    run(&["create"]).ok();
    let id = short_id(&run(&["backup", &w.src_s()]).ok().stdout);
    assert!(run(&["ls"]).ok().stdout.starts_with(&id));
    assert_eq!(run(&["cat", "latest:index.html"]).ok().stdout, INDEX_HTML);
    // The same store by plain path.
    assert!(w.ok(&["ls"]).stdout.starts_with(&id));
    run(&["check"]).ok();
    run(&["info"]).ok();
}

#[test]
fn plaintext_and_no_compression_stores() {
    for flag in [
        "-plaintext",
        "--plaintext",
        "-no-encryption",
        "--no-encryption",
    ] {
        let w = World::new();
        w.ok(&["create", flag]);
        // A plaintext store needs no passphrase.
        let o = Cmd::new(&w.home)
            .args(["at", &w.store_s(), "backup", &w.src_s()])
            .run();
        o.ok();
        let o = w.ok(&["info"]);
        assert!(
            o.stdout.contains("none (plaintext)"),
            "{flag}: {}",
            o.stdout
        );
        let v = w.ok(&["info", "-json"]).json();
        assert_eq!(v["encrypted"], false, "{flag}");
        assert_eq!(v["snapshots"], 1);
    }
    for flag in ["-no-compression", "--no-compression"] {
        let w = World::new();
        w.ok(&["create", flag]);
        w.backup(&[]);
        let v = w.ok(&["info", "--json"]).json();
        assert_eq!(v["encrypted"], true);
        assert_eq!(v["compression"], "none");
        let o = w.ok(&["info"]);
        assert!(
            o.stdout
                .lines()
                .any(|l| l.starts_with("compression:") && l.ends_with("none")),
            "{}",
            o.stdout
        );
        assert_eq!(w.ok(&["cat", "latest:css/site.css"]).stdout, SITE_CSS);
    }
}

// ---------------------------------------------------------------------------------------------
// JSON outputs

#[test]
fn json_outputs() {
    let w = World::new();
    w.create();

    // backup -json: the id, the stats, no errors; both dash forms.
    let o = w.ok(&["backup", "-json", &w.src_s()]);
    let v = o.json();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(is_hex(&id, 64), "{id}");
    assert_eq!(v["short_id"], &id[..8]);
    assert_eq!(v["source"], w.src_s());
    assert_eq!(v["files"], 4);
    assert_eq!(v["dirs"], 2);
    assert_eq!(
        v["bytes"],
        (INDEX_HTML.len() + SITE_CSS.len() + PRINT_CSS.len() + 300_000) as u64
    );
    assert_eq!(v["errors"], serde_json::json!([]));
    let v2 = w.ok(&["backup", "--json", &w.src_s()]).json();
    assert!(v2["id"].is_string());
    assert_ne!(v2["id"], v["id"]);

    // ls -json: both snapshots, oldest first.
    for flag in ["-json", "--json"] {
        let v = w.ok(&["ls", flag]).json();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0]["id"], id);
        assert_eq!(a[0]["short_id"], &id[..8]);
        assert_eq!(a[0]["source"], w.src_s());
        assert_eq!(a[0]["host"], kloset::store::hostname());
        assert_eq!(a[0]["files"], 4);
        assert_eq!(a[0]["errors"], 0);
        assert!(humantime::parse_rfc3339(a[0]["time"].as_str().unwrap()).is_ok());
        assert_eq!(a[1]["id"], v2["id"]);
    }

    // ls -json SNAP[:PATH]: the entries.
    let v = w.ok(&["ls", "-json", &id]).json();
    let a = v.as_array().expect("array of entries");
    let names: Vec<_> = a.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["css", "img", "index.html"]);
    assert_eq!(a[0]["type"], "dir");
    assert_eq!(a[2]["type"], "file");
    assert_eq!(a[2]["size"], INDEX_HTML.len());
    assert_eq!(a[2]["path"], format!("{}/index.html", w.src_s()));
    let v = w.ok(&["ls", "--json", "-recursive", &id]).json();
    assert_eq!(v.as_array().unwrap().len(), 6);
    let v = w.ok(&["ls", "-json", &format!("{id}:img/logo.bin")]).json();
    assert_eq!(v[0]["size"], 300_000);

    // check -json.
    for flag in ["-json", "--json"] {
        let v = w.ok(&["check", flag]).json();
        assert_eq!(v["snapshots"], 2);
        assert_eq!(v["errors"], serde_json::json!([]));
        assert!(v["damaged"].as_object().unwrap().is_empty());
        assert!(v["packs"].as_u64().unwrap() >= 2);
    }

    // info -json.
    let v = w.ok(&["info", "-json"]).json();
    assert_eq!(v["encrypted"], false);
    assert_eq!(v["format_version"], 2);
    assert_eq!(v["snapshots"], 2);
    assert!(is_hex(v["id"].as_str().unwrap(), 32));
    assert!(v["packs"].as_u64().unwrap() >= 2);
    assert!(v["stored_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["files"]["config"]["count"], 1);
    assert_eq!(v["files"]["snapshot"]["count"], 2);
}

// ---------------------------------------------------------------------------------------------
// restore

#[test]
fn restore_whole_snapshot_into_new_dir() {
    let w = World::new();
    w.create();
    let id = w.backup(&[]);
    for (i, flag) in ["-to", "--to"].iter().enumerate() {
        let dest = w.root().join(format!("out{i}/deep/er"));
        let o = w.ok(&["restore", flag, dest.to_str().unwrap(), &id]);
        assert!(o.stdout.is_empty(), "{}", o.stdout);
        assert!(o.stderr.contains("restored 4 files"), "{}", o.stderr);
        assert_eq!(files_under(&dest), files_under(&w.src), "{flag}");
    }
    // -to=DIR and --to=DIR.
    for (i, flag) in ["-to", "--to"].iter().enumerate() {
        let dest = w.root().join(format!("eq{i}"));
        w.ok(&["restore", &format!("{flag}={}", dest.display()), "latest"]);
        assert_eq!(files_under(&dest), files_under(&w.src), "{flag}=");
    }
    // A relative -to is taken from the working directory.
    w.ok(&["restore", "-to", "rel", &id]);
    assert_eq!(files_under(&w.work.join("rel")), files_under(&w.src));
}

#[test]
fn restore_path_puts_entry_under_its_own_name() {
    let w = World::new();
    w.create();
    let id = w.backup(&[]);
    let s = w.src_s();

    // A file, by absolute path: DIR/index.html.
    let d = w.root().join("f");
    w.ok(&[
        "restore",
        "-to",
        d.to_str().unwrap(),
        &format!("{id}:{s}/index.html"),
    ]);
    assert_eq!(
        files_under(&d).keys().collect::<Vec<_>>(),
        [Path::new("index.html")]
    );
    assert_eq!(
        fs::read_to_string(d.join("index.html")).unwrap(),
        INDEX_HTML
    );

    // A subdirectory: DIR/css/….
    let d = w.root().join("d");
    w.ok(&[
        "restore",
        "--to",
        d.to_str().unwrap(),
        &format!("{id}:{s}/css"),
    ]);
    assert_eq!(
        files_under(&d).keys().collect::<Vec<_>>(),
        [Path::new("css/print.css"), Path::new("css/site.css")]
    );
    assert_eq!(
        fs::read_to_string(d.join("css/site.css")).unwrap(),
        SITE_CSS
    );

    // Relative paths are taken from the backed-up directory.
    let d = w.root().join("r");
    w.ok(&["restore", "-to", d.to_str().unwrap(), "latest:img/logo.bin"]);
    assert_eq!(fs::read(d.join("logo.bin")).unwrap(), noise(300_000, 1));

    // A missing path.
    let d = w.root().join("missing");
    w.at(&[
        "restore",
        "-to",
        d.to_str().unwrap(),
        &format!("{id}:nope.txt"),
    ])
    .run()
    .fails(NOT_FOUND, &["nope.txt"]);
}

#[test]
fn restore_defaults_to_cwd() {
    let w = World::new();
    w.create();
    let id = w.backup(&[]);
    let s = w.src_s();

    let cwd = w.root().join("cwd1");
    fs::create_dir(&cwd).unwrap();
    w.at(&["restore", &format!("{id}:{s}/index.html")])
        .cwd(&cwd)
        .run()
        .ok();
    assert_eq!(
        files_under(&cwd).keys().collect::<Vec<_>>(),
        [Path::new("index.html")]
    );

    let cwd = w.root().join("cwd2");
    fs::create_dir(&cwd).unwrap();
    w.at(&["restore", &format!("{id}:{s}/css")])
        .cwd(&cwd)
        .run()
        .ok();
    assert!(cwd.join("css/site.css").is_file());
    assert!(!cwd.join("site.css").exists());

    let cwd = w.root().join("cwd3");
    fs::create_dir(&cwd).unwrap();
    w.at(&["restore", "latest"]).cwd(&cwd).run().ok();
    assert_eq!(files_under(&cwd), files_under(&w.src));
}

// ---------------------------------------------------------------------------------------------
// Snapshot resolution

#[test]
fn latest_full_id_and_prefixes() {
    let w = World::new();
    w.create();
    let old = w.backup(&[]);
    fs::write(w.src.join("index.html"), "new\n").unwrap();
    let new = w.backup(&[]);
    let ids = w.snapshot_ids();
    assert_eq!(ids.len(), 2);
    assert!(ids[0].starts_with(&old) && ids[1].starts_with(&new));

    let cat = |spec: &str| w.ok(&["cat", &format!("{spec}:index.html")]).stdout;
    assert_eq!(cat("latest"), "new\n");
    assert_eq!(cat(&old), INDEX_HTML);
    assert_eq!(cat(&new), "new\n");
    assert_eq!(cat(&ids[0]), INDEX_HTML);
    assert_eq!(cat(&old.to_uppercase()), INDEX_HTML);
    // The shortest unique prefix.
    let n = (1..=8).find(|&n| ids[0][..n] != ids[1][..n]).unwrap();
    assert_eq!(cat(&ids[0][..n]), INDEX_HTML);
    assert_eq!(cat(&ids[1][..n]), "new\n");

    // latest works for ls, restore and check too.
    let o = w.ok(&["ls", "latest"]);
    assert!(o.stdout.contains("index.html"));
    let d = w.root().join("l");
    w.ok(&["restore", "-to", d.to_str().unwrap(), "latest:index.html"]);
    assert_eq!(fs::read_to_string(d.join("index.html")).unwrap(), "new\n");
    w.ok(&["check", "latest"]);
    w.ok(&["check", &old, &new]);
}

#[test]
fn unknown_and_ambiguous_prefixes_exit_8() {
    let w = World::new();
    w.ok(&["create", "-plaintext"]);
    // No snapshot at all: latest matches nothing.
    w.at(&["cat", "latest:index.html"])
        .run()
        .fails(NOT_FOUND, &["latest"]);
    w.at(&["ls", "latest"]).run().fails(NOT_FOUND, &[]);

    // Back up until two ids share their first hex digit (at most 17 backups).
    let mut ids: Vec<String> = Vec::new();
    let prefix = loop {
        let id = w.backup(&[]);
        if let Some(p) = ids.iter().find(|p| p[..1] == id[..1]) {
            break p[..1].to_string();
        }
        ids.push(id);
        assert!(ids.len() <= 16);
    };
    for verb in [
        &["cat", &format!("{prefix}:index.html")][..],
        &["ls", &prefix],
    ] {
        w.at(verb)
            .run()
            .fails(NOT_FOUND, &["several snapshots", &prefix]);
    }
    w.at(&["restore", "-to", "x", &prefix])
        .run()
        .fails(NOT_FOUND, &["several"]);
    w.at(&["check", &prefix])
        .run()
        .fails(NOT_FOUND, &["several"]);

    // Unknown: a hex prefix no id has, and something that is not an id at all.
    let all = w.snapshot_ids();
    let unused = (0..=0xffffu32)
        .map(|n| format!("{n:04x}"))
        .find(|p| !all.iter().any(|id| id.starts_with(p.as_str())))
        .unwrap();
    for spec in [unused.as_str(), "zzzz", "latest-ish"] {
        w.at(&["cat", &format!("{spec}:index.html")])
            .run()
            .fails(NOT_FOUND, &[spec]);
        w.at(&["ls", spec]).run().fails(NOT_FOUND, &[spec]);
        w.at(&["restore", "-to", "x", spec])
            .run()
            .fails(NOT_FOUND, &[spec]);
        w.at(&["check", spec]).run().fails(NOT_FOUND, &[spec]);
    }
    assert!(!w.work.join("x").exists(), "nothing restored");
}

// ---------------------------------------------------------------------------------------------
// cat errors

#[test]
fn cat_errors() {
    let w = World::new();
    w.create();
    let id = w.backup(&[]);
    // A directory.
    let o = w.at(&["cat", &format!("{id}:css")]).run();
    o.fails(NOT_FOUND, &["css", "not a regular file"]);
    assert!(o.stdout.is_empty());
    // A missing path.
    w.at(&["cat", &format!("{id}:css/none.css")])
        .run()
        .fails(NOT_FOUND, &["none.css"]);
    w.at(&["cat", &format!("{id}:/no/such/file")])
        .run()
        .fails(NOT_FOUND, &["/no/such/file"]);
    // No path at all.
    let o = w.at(&["cat", &id]).run();
    assert_ne!(o.code, OK);
    o.fails(o.code, &["SNAP:PATH"]);
}

// ---------------------------------------------------------------------------------------------
// exclude

#[test]
fn exclude_and_exclude_file() {
    let w = World::new();
    w.create();
    fs::write(w.src.join("debug.log"), "log").unwrap();
    fs::write(w.src.join("css/old.log"), "log").unwrap();
    fs::create_dir(w.src.join("cache")).unwrap();
    fs::write(w.src.join("cache/blob"), "cached").unwrap();
    fs::write(w.src.join("img/skip.png"), "png").unwrap();
    let exfile = w.root().join("excludes");
    fs::write(
        &exfile,
        "# caches are rebuilt\n\ncache\n  **/img/skip.png  \n",
    )
    .unwrap();

    let listing = |id: &str| -> Vec<String> {
        let v = w.ok(&["ls", "-json", "-recursive", id]).json();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["path"]
                    .as_str()
                    .unwrap()
                    .strip_prefix(&format!("{}/", w.src_s()))
                    .unwrap()
                    .to_string()
            })
            .collect()
    };

    let id = w.backup(&[
        "-exclude",
        "*.log",
        "-exclude-file",
        exfile.to_str().unwrap(),
    ]);
    assert_eq!(
        listing(&id),
        [
            "css",
            "css/print.css",
            "css/site.css",
            "img",
            "img/logo.bin",
            "index.html"
        ]
    );
    let id = w.backup(&[
        "--exclude=*.log",
        "--exclude",
        "*.css",
        &format!("--exclude-file={}", exfile.display()),
    ]);
    assert_eq!(listing(&id), ["css", "img", "img/logo.bin", "index.html"]);
    // A pattern with a slash matches the whole path.
    let abs = format!("{}/css", w.src_s());
    let id = w.backup(&["-exclude", &abs]);
    assert!(!listing(&id).iter().any(|p| p.starts_with("css")));
    assert!(listing(&id).contains(&"cache/blob".to_string()));
    // Without excludes everything is there.
    let id = w.backup(&[]);
    assert_eq!(listing(&id).len(), 11);

    // A missing exclude file is an error and makes no snapshot.
    let before = w.snapshot_ids().len();
    let missing = w.root().join("no-such-excludes");
    w.at(&[
        "backup",
        "-exclude-file",
        missing.to_str().unwrap(),
        &w.src_s(),
    ])
    .run()
    .fails(ERROR, &["no-such-excludes"]);
    assert_eq!(w.snapshot_ids().len(), before);
}

// ---------------------------------------------------------------------------------------------
// Passphrases

#[test]
fn wrong_passphrase_exit_4() {
    let w = World::new();
    w.create_encrypted();
    w.backup(&[]);
    for args in [
        &["ls"][..],
        &["info"],
        &["check"],
        &["cat", "latest:index.html"],
        &["restore", "-to", "x", "latest"],
    ] {
        let o = w
            .at(args)
            .env("KLOSET_PASSPHRASE", "not the passphrase")
            .run();
        o.fails(WRONG_PASSPHRASE, &["wrong passphrase"]);
        assert!(o.stdout.is_empty());
    }
    let o = w
        .at(&["backup", &w.src_s()])
        .env("KLOSET_PASSPHRASE", "nope")
        .run();
    o.fails(WRONG_PASSPHRASE, &["wrong passphrase"]);
    assert_eq!(w.snapshot_ids().len(), 1);
}

#[test]
fn no_passphrase_and_no_terminal() {
    let w = World::new();
    // create: refused, nothing created.
    let o = Cmd::new(&w.home).args(["at", &w.store_s(), "create"]).run();
    assert_ne!(o.code, OK);
    o.fails(o.code, &["KLOSET_PASSPHRASE"]);
    assert!(!w.store.join("config").exists());

    w.create_encrypted();
    w.backup(&[]);
    for args in [&["ls"][..], &["backup", &w.src_s()], &["info"]] {
        let o = Cmd::new(&w.home)
            .args(["at", &w.store_s()])
            .args(args)
            .run();
        assert_ne!(o.code, OK);
        o.fails(o.code, &["KLOSET_PASSPHRASE"]);
    }
}

#[test]
fn passphrase_file() {
    let w = World::new();
    let pf = w.root().join("pass");
    // A trailing newline is not part of the passphrase.
    fs::write(&pf, format!("{PASS}\n")).unwrap();
    let with_file = |args: &[&str]| {
        Cmd::new(&w.home)
            .env("KLOSET_PASSPHRASE_FILE", &pf)
            .args(["at", &w.store_s()])
            .args(args)
            .run()
    };
    with_file(&["create"]).ok();
    let id = short_id(&with_file(&["backup", &w.src_s()]).ok().stdout);
    assert!(with_file(&["ls"]).ok().stdout.starts_with(&id));
    // The same passphrase through KLOSET_PASSPHRASE.
    assert!(w.ok(&["ls"]).stdout.starts_with(&id));

    // A file with another passphrase.
    let bad = w.root().join("bad");
    fs::write(&bad, "other\n").unwrap();
    Cmd::new(&w.home)
        .env("KLOSET_PASSPHRASE_FILE", &bad)
        .args(["at", &w.store_s(), "ls"])
        .run()
        .fails(WRONG_PASSPHRASE, &[]);

    // A missing file.
    let missing = w.root().join("missing-pass");
    let o = Cmd::new(&w.home)
        .env("KLOSET_PASSPHRASE_FILE", &missing)
        .args(["at", &w.store_s(), "ls"])
        .run();
    assert_ne!(o.code, OK);
    o.fails(o.code, &["missing-pass", "KLOSET_PASSPHRASE_FILE"]);
    // …also for create, which then creates nothing.
    let store2 = w.root().join("store2");
    let o = Cmd::new(&w.home)
        .env("KLOSET_PASSPHRASE_FILE", &missing)
        .args(["at", store2.to_str().unwrap(), "create"])
        .run();
    assert_ne!(o.code, OK);
    o.fails(o.code, &["missing-pass"]);
    assert!(!store2.join("config").exists());
}

// ---------------------------------------------------------------------------------------------
// Missing, existing and damaged stores

#[test]
fn missing_store_exit_5() {
    let w = World::new();
    let store = w.store_s();
    for args in [
        &["ls"][..],
        &["ls", "latest"],
        &["info"],
        &["check"],
        &["verify"],
        &["cat", "latest:index.html"],
        &["restore", "-to", "x", "latest"],
        &["backup", &w.src_s()],
    ] {
        let o = w.at(args).run();
        o.fails(NO_STORE, &["no kloset store", &store]);
        assert!(o.stdout.is_empty());
    }
    assert!(!w.store.exists(), "nothing was created");
    // An existing empty directory is not a store either.
    fs::create_dir(&w.store).unwrap();
    w.at(&["ls"]).run().fails(NO_STORE, &["no kloset store"]);
    // Nor is a file URL to nowhere.
    Cmd::new(&w.home)
        .env("KLOSET_PASSPHRASE", PASS)
        .args(["at", "file:///nonexistent/kloset-store", "info"])
        .run()
        .fails(NO_STORE, &["/nonexistent/kloset-store"]);
}

#[test]
fn create_refuses_existing_store_and_nonempty_dir() {
    let w = World::new();
    w.create_encrypted();
    w.backup(&[]);
    let before = w.store_files();
    for args in [&["create"][..], &["create", "-plaintext"]] {
        let o = w.at(args).run();
        assert_ne!(o.code, OK);
        o.fails(o.code, &["already exists"]);
        assert_eq!(w.store_files(), before, "store untouched");
    }
    // Still opens with the old passphrase.
    assert_eq!(w.snapshot_ids().len(), 1);

    // A non-empty directory that is not a store.
    let before = files_under(&w.src);
    let o = w.kloset(&["at", &w.src_s(), "create"]).run();
    assert_ne!(o.code, OK);
    o.fails(o.code, &["not empty"]);
    assert_eq!(files_under(&w.src), before, "directory untouched");
    assert!(!w.src.join("config").exists());
    assert!(!w.src.join("keys").exists());

    // An empty existing directory is fine.
    let empty = w.root().join("empty");
    fs::create_dir(&empty).unwrap();
    w.kloset(&["at", empty.to_str().unwrap(), "create"])
        .run()
        .ok();
    assert!(empty.join("config").is_file());
}

#[test]
fn damaged_pack_check_exit_6() {
    let w = World::new();
    // Plaintext without compression, so the file's bytes can be found in its pack.
    w.ok(&["create", "-plaintext", "-no-compression"]);
    let marker = b"MARKER-0123456789-MARKER-0123456789";
    fs::write(w.src.join("marked.txt"), marker).unwrap();
    let id = w.backup(&[]);
    w.ok(&["check"]);

    let (pack, off) = packs(&w.store)
        .into_iter()
        .find_map(|p| {
            let b = fs::read(&p).unwrap();
            b.windows(marker.len())
                .position(|x| x == marker)
                .map(|o| (p, o))
        })
        .expect("a pack holds the marker");
    flip(&pack, off + 3);
    let pack_rel = rel(&w.store, &pack);

    for verb in ["check", "verify"] {
        let o = w.at(&[verb]).run();
        o.code(DAMAGED);
        assert!(
            o.stdout.contains(&pack_rel),
            "{verb} names the pack:\n{}",
            o.stdout
        );
        assert!(
            o.stdout.contains(&id),
            "{verb} names the snapshot:\n{}",
            o.stdout
        );
        assert!(
            o.stdout.contains(&format!("{}/marked.txt", w.src_s())),
            "{verb} names the path:\n{}",
            o.stdout
        );
        assert!(!o.stdout.contains("index.html"), "{}", o.stdout);
        assert!(o.stderr.contains("DAMAGED"), "{}", o.stderr);
    }
    w.at(&["check", &id]).run().code(DAMAGED);
    // -fast only checks presence.
    w.at(&["check", "-fast"]).run().ok();
    w.at(&["check", "--fast"]).run().ok();

    let v = {
        let o = w.at(&["check", "-json"]).run();
        o.code(DAMAGED);
        o.json()
    };
    let errors = v["errors"].as_array().unwrap();
    assert!(!errors.is_empty());
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains(&pack_rel))
    );
    let damaged = v["damaged"][&id]
        .as_array()
        .expect("damaged paths by snapshot");
    assert_eq!(damaged.len(), 1, "{v}");
    assert!(damaged[0].as_str().unwrap().contains("marked.txt"));

    // Reading the damaged file fails with exit 6; other files still read.
    w.at(&["cat", "latest:marked.txt"])
        .run()
        .fails(DAMAGED, &["damaged", &pack_rel]);
    assert_eq!(w.ok(&["cat", "latest:index.html"]).stdout, INDEX_HTML);
    // A restore restores the rest and reports the damaged file. A file already there with the
    // snapshot's size and mtime but other content is not trusted: this restore did not leave it.
    let d = w.root().join("partial");
    fs::create_dir_all(&d).unwrap();
    let planted = d.join("index.html");
    fs::write(&planted, INDEX_HTML.replace("hello", "HELLO")).unwrap();
    let m = fs::metadata(w.src.join("index.html")).unwrap();
    fs::File::options()
        .write(true)
        .open(&planted)
        .unwrap()
        .set_modified(m.modified().unwrap())
        .unwrap();
    let o = w
        .at(&["restore", "-to", d.to_str().unwrap(), "latest"])
        .run();
    o.code(PARTIAL);
    assert!(o.stderr.contains("marked.txt"), "{}", o.stderr);
    assert!(!o.stderr.contains("already there"), "{}", o.stderr);
    assert_eq!(
        fs::read_to_string(d.join("index.html")).unwrap(),
        INDEX_HTML
    );
    assert_eq!(fs::read(d.join("img/logo.bin")).unwrap(), noise(300_000, 1));
    // That restore did not finish: run again, it resumes, taking the files it wrote as done.
    let o = w
        .at(&["restore", "-to", d.to_str().unwrap(), "latest"])
        .run();
    o.code(PARTIAL);
    assert!(
        o.stderr
            .contains("files were already there as in the snapshot (this restore resumed"),
        "{}",
        o.stderr
    );
    assert_eq!(fs::read(d.join("img/logo.bin")).unwrap(), noise(300_000, 1));
}

#[test]
fn damaged_encrypted_pack_check_exit_6() {
    let w = World::new();
    w.create_encrypted();
    let id = w.backup(&[]);
    // The biggest pack holds the incompressible logo.
    let pack = packs(&w.store).remove(0);
    let len = fs::metadata(&pack).unwrap().len() as usize;
    flip(&pack, len / 3);
    let pack_rel = rel(&w.store, &pack);
    let o = w.at(&["check"]).run();
    o.code(DAMAGED);
    assert!(o.stdout.contains(&pack_rel), "{}", o.stdout);
    assert!(o.stdout.contains(&id), "{}", o.stdout);
    assert!(o.stdout.contains("logo.bin"), "{}", o.stdout);
    w.at(&["cat", "latest:img/logo.bin"])
        .run()
        .fails(DAMAGED, &["damaged"]);
}

#[test]
fn damaged_config_is_a_clear_error() {
    let w = World::new();
    w.create_encrypted();
    w.backup(&[]);
    let config = w.store.join("config");
    let good = fs::read(&config).unwrap();
    let verbs: [&[&str]; 6] = [
        &["ls"],
        &["info"],
        &["check"],
        &["cat", "latest:index.html"],
        &["restore", "-to", "x", "latest"],
        &["backup", &w.src_s()],
    ];
    // A flipped byte anywhere: in the magic, the body, the checksum.
    for off in [0, 9, good.len() / 2, good.len() - 1] {
        let mut b = good.clone();
        b[off] ^= 0x01;
        fs::write(&config, &b).unwrap();
        for args in verbs {
            w.at(args).run().fails(DAMAGED, &["damaged", "config"]);
        }
    }
    // Truncated and empty.
    for b in [&good[..20], &[][..]] {
        fs::write(&config, b).unwrap();
        w.at(&["ls"]).run().fails(DAMAGED, &["damaged", "config"]);
    }
    // create refuses to overwrite it.
    let before = w.store_files();
    assert_ne!(w.at(&["create"]).run().code, OK);
    assert_eq!(w.store_files(), before);
    // Repaired, all is well again.
    fs::write(&config, &good).unwrap();
    w.ok(&["check"]);
}

#[test]
fn damaged_snapshot_file_is_reported() {
    let w = World::new();
    w.create();
    let a = w.backup(&[]);
    let b = w.backup(&[]);
    let ids = w.snapshot_ids();
    let snap = w.store.join("snapshots").join(&ids[0]);
    let len = fs::metadata(&snap).unwrap().len() as usize;
    flip(&snap, len / 2);
    // ls still lists the good snapshot and reports the bad one.
    let o = w.at(&["ls"]).run();
    assert!(o.stdout.contains(&b), "{}", o.stdout);
    assert!(!o.stdout.contains(&a), "{}", o.stdout);
    assert!(
        o.stderr.contains(&ids[0]) || o.stderr.contains(&a),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("damaged"), "{}", o.stderr);
    assert_ne!(w.at(&["check"]).run().code, OK);
    w.at(&["cat", &format!("{a}:index.html")])
        .run()
        .fails(DAMAGED, &["damaged"]);
    assert_eq!(
        w.ok(&["cat", &format!("{b}:index.html")]).stdout,
        INDEX_HTML
    );
}

// ---------------------------------------------------------------------------------------------
// Unreadable source files

/// Run kloset as `nobody` (uid/gid 65534) through util-linux `setpriv`.
fn as_nobody(w: &World, args: &[&str]) -> Out {
    Cmd::program("setpriv", &w.home)
        .env("KLOSET_PASSPHRASE", PASS)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            BIN,
            "at",
            &w.store_s(),
        ])
        .args(args)
        .run()
}

#[test]
fn unreadable_source_file_is_partial_exit_3() {
    let root_user = nix::unistd::geteuid().is_root();
    let have_setpriv = Command::new("setpriv")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let w = World::new();
    let secret = w.src.join("css/secret.css");
    fs::write(&secret, "top secret").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    if root_user {
        if !have_setpriv {
            eprintln!("skipped: running as root without setpriv, cannot make a file unreadable");
            return;
        }
        // Root reads mode 000 files: back up as nobody, who may write the store and home.
        for d in [w.root(), w.home.clone()] {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        }
        for d in [
            w.root().join("src"),
            w.src.clone(),
            w.src.join("css"),
            w.src.join("img"),
        ] {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        for f in [
            "index.html",
            "css/site.css",
            "css/print.css",
            "img/logo.bin",
        ] {
            fs::set_permissions(w.src.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let run = |args: &[&str]| {
        if root_user {
            as_nobody(&w, args)
        } else {
            w.at(args).run()
        }
    };
    run(&["create", "-plaintext"]).ok();
    let o = run(&["backup", &w.src_s()]);
    o.code(PARTIAL);
    let id = short_id(&o.stdout);
    let secret_s = secret.to_str().unwrap();
    assert!(
        o.stderr.contains(secret_s),
        "stderr names the file:\n{}",
        o.stderr
    );
    assert!(
        o.stderr
            .lines()
            .any(|l| l.contains("not backed up") && l.matches(secret_s).count() == 1),
        "one line per file, naming it once:\n{}",
        o.stderr
    );
    assert!(o.stderr.contains(&id), "{}", o.stderr);

    // -json carries the error too, and exits 3 as well.
    let o = run(&["backup", "-json", &w.src_s()]);
    o.code(PARTIAL);
    let v = o.json();
    let errs = v["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 1, "{v}");
    assert_eq!(errs[0]["path"], secret_s);
    assert_eq!(v["files"], 4);

    // The snapshot was saved, without the file; everything else restores.
    let v = w.ok(&["ls", "-json"]).json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["short_id"], id);
    assert_eq!(v[0]["errors"], 1);
    w.at(&["cat", &format!("{id}:css/secret.css")])
        .run()
        .fails(NOT_FOUND, &["secret.css"]);
    let d = w.root().join("restored");
    w.ok(&["restore", "-to", d.to_str().unwrap(), &id]);
    let mut want = files_under(&w.src);
    want.remove(Path::new("css/secret.css"));
    assert_eq!(files_under(&d), want);
    w.ok(&["check"]);

    // A directory nobody may list but may go through (0711): reported as not readable.
    let private = w.src.join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o711)).unwrap();
    if !root_user {
        // Its owner can list it: nothing to see here.
        return;
    }
    let o = run(&["backup", &w.src_s()]);
    o.code(PARTIAL);
    assert!(
        o.stderr
            .lines()
            .any(|l| l.contains("/private") && l.contains("ermission denied")),
        "{}",
        o.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Locks

/// Write a lock file into the store as another process would.
fn write_lock(store: &Path, exclusive: bool, host: &str, pid: u32, age_s: i64) -> PathBuf {
    use kloset::store::format::{LockRecord, MAGIC_LOCK, frame};
    let t = kloset::store::now_ns() - age_s * 1_000_000_000;
    let rec = LockRecord {
        exclusive,
        host: host.into(),
        user: "someone".into(),
        pid,
        created_ns: t,
        refreshed_ns: t,
        command: "prune".into(),
    };
    let p = store
        .join("locks")
        .join(format!("{:032x}", u128::from(pid) + 7));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, frame(MAGIC_LOCK, &rec)).unwrap();
    p
}

#[test]
fn locked_store_exit_7() {
    let w = World::new();
    w.create();
    w.backup(&[]);
    let lock = write_lock(&w.store, true, "elsewhere.example", 4242, 5);
    let lock_rel = rel(&w.store, &lock);
    for args in [
        &["backup", &w.src_s()][..],
        &["check"],
        &["restore", "-to", "x", "latest"],
    ] {
        let o = w.at(args).run();
        o.fails(LOCKED, &["locked", "elsewhere.example", &lock_rel]);
        assert!(o.stdout.is_empty(), "{}", o.stdout);
    }
    assert_eq!(w.snapshot_ids().len(), 1, "no snapshot while locked");
    assert!(!w.work.join("x").exists());
    // Reading commands do not need the lock.
    w.ok(&["ls"]);
    w.ok(&["info"]);
    w.ok(&["cat", "latest:index.html"]);
    // The lock file is left alone.
    assert!(lock.is_file());

    // A shared lock of another process does not stop a backup.
    fs::remove_file(&lock).unwrap();
    write_lock(&w.store, false, "elsewhere.example", 4243, 5);
    w.backup(&[]);

    // A stale exclusive lock (not refreshed for two hours) is ignored.
    write_lock(&w.store, true, "elsewhere.example", 4244, 7200);
    w.backup(&[]);
    w.ok(&["check"]);

    // So is an exclusive lock of a process of this host that is gone.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    write_lock(&w.store, true, &kloset::store::hostname(), dead, 5);
    w.backup(&[]);
    assert_eq!(w.snapshot_ids().len(), 4);
}

#[test]
fn cat_of_a_many_chunk_file_is_in_order_and_ends_quietly_at_a_closed_pipe() {
    let w = World::new();
    w.create();
    // Tens of chunks, read ahead on several threads: the bytes must come out in file order.
    let big = noise(24 << 20, 7);
    fs::write(w.src.join("big.bin"), &big).unwrap();
    w.backup(&[]);
    let o = w.ok(&["cat", "latest:big.bin"]);
    assert!(o.raw_stdout == big, "cat gave other bytes than the file");
    // A reader that stops early (`| head -c`): exit 0, nothing on stderr.
    let mut child = w.at(&["cat", "latest:big.bin"]).cmd.spawn().unwrap();
    let mut first = [0u8; 1000];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first[..], &big[..1000]);
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
