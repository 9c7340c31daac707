//! `diff`, `locate` and `digest` through the built binary, on a local store and on a store on
//! a real OpenSSH server on loopback (tests/common/sshd.rs), over hard-case trees
//! (tests/common/tree.rs: names with newlines, control characters and bytes that are not
//! UTF-8, hard links, sparse and multi-chunk files, xattrs, symlinks, fifos).
//!
//! Each scenario backs up a tree, applies a hand-made change set (add, remove, content,
//! chmod, chown as root, symlink retarget, xattr, type change) and backs up again, then checks
//! the verbs' exact output against what was changed and against hashes computed here
//! independently (the `sha2` and `blake3` crates, and the `sha256sum` program).

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::sshd::Sshd;
use common::tree::{self as t, Content, Meta, Spec, TreeSpec};
use serde_json::Value;
use sha2::Digest;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_kloset");
const PASS: &str = "verbs test passphrase";

const OK: i32 = 0;
const ERROR: i32 = 1;
const NOT_FOUND: i32 = 8;

/// One run of the binary.
struct Out {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("text output is UTF-8 (names escaped)")
    }

    fn lines(&self) -> Vec<String> {
        self.text().lines().map(String::from).collect()
    }

    fn json_lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn code(&self, want: i32) -> &Self {
        assert_eq!(
            self.code,
            want,
            "exit {} (want {want})\nstdout:\n{}\nstderr:\n{}",
            self.code,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        );
        self
    }

    /// An error exit with exactly one `kloset: …` line on stderr mentioning each of `words`.
    fn fails(&self, want: i32, words: &[&str]) -> &Self {
        self.code(want);
        let lines: Vec<_> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "want one line, got:\n{}", self.stderr);
        assert!(lines[0].starts_with("kloset: "), "{}", lines[0]);
        for w in words {
            assert!(
                lines[0].contains(w),
                "{:?} does not mention {w:?}",
                lines[0]
            );
        }
        self
    }
}

/// A store (local or on the loopback server), a source tree and a HOME.
struct Env {
    tmp: TempDir,
    store: String,
    sshd: Option<Sshd>,
}

impl Env {
    fn local() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store").to_str().unwrap().to_string();
        fs::create_dir(tmp.path().join("home")).unwrap();
        Env {
            tmp,
            store,
            sshd: None,
        }
    }

    /// `None` (the fixture says why) when sshd is not installed.
    fn sftp() -> Option<Env> {
        let sshd = Sshd::start()?;
        let tmp = tempfile::tempdir().unwrap();
        let store = sshd.url(sshd.remote_dir("verbs-store"));
        Some(Env {
            tmp,
            store,
            sshd: Some(sshd),
        })
    }

    fn src(&self) -> PathBuf {
        self.tmp.path().canonicalize().unwrap().join("src")
    }

    fn cmd(&self) -> Command {
        let mut c = match &self.sshd {
            Some(s) => s.cmd(Path::new(BIN)),
            None => {
                let mut c = Command::new(BIN);
                c.env_clear()
                    .env("HOME", self.tmp.path().join("home"))
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                    .env("KLOSET_PASSPHRASE", PASS);
                c
            }
        };
        c.stdin(Stdio::null());
        c
    }

    /// `kloset [pre…] at STORE args…`.
    fn run_with<S: AsRef<OsStr>>(&self, pre: &[&str], args: &[S]) -> Out {
        let o = self
            .cmd()
            .args(pre)
            .args(["at", &self.store])
            .args(args)
            .output()
            .expect("run kloset");
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "kloset panicked: {stderr}");
        Out {
            code: o.status.code().expect("exited"),
            stdout: o.stdout,
            stderr,
        }
    }

    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        self.run_with(&[], args)
    }

    fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        let o = self.run(args);
        o.code(OK);
        o
    }

    /// Back up the source; the new snapshot's short id.
    fn backup(&self) -> String {
        let src = self.src();
        let o = self.ok(&[OsStr::new("backup"), src.as_os_str()]);
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(id.len(), 8, "short id: {id:?}");
        id
    }
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        mtime: (1_700_000_000, 123_456_789),
        owner: (4242, 4343),
        xattrs: vec![(b"kloset.test".to_vec(), b"value\0\xff".to_vec())],
    }
}

fn file(name: &[u8], content: Content, mode: u32) -> Spec {
    Spec::File {
        name: name.to_vec(),
        content,
        meta: meta(mode),
    }
}

fn bytes(b: &[u8]) -> Content {
    Content::Bytes(b.to_vec())
}

/// The hard-case tree of the first snapshot.
fn first_tree(src: &Path) -> bool {
    fs::create_dir(src).unwrap();
    let spec = TreeSpec {
        entries: vec![
            file(b"\xff\xfe not utf-8\n", bytes(b"x"), 0o644),
            file(b"esc\x1b[31m", bytes(b"red"), 0o644),
            file(
                b"big",
                Content::Random {
                    seed: 7,
                    len: 2_500_000,
                },
                0o640,
            ),
            file(
                b"sparse",
                Content::Sparse {
                    len: 5 << 20,
                    writes: vec![(0, b"head".to_vec()), (3 << 20, b"middle".to_vec())],
                },
                0o600,
            ),
            file(b"content", bytes(b"old content"), 0o644),
            file(b"chmod", bytes(b"mode"), 0o644),
            file(b"owner", bytes(b"owner"), 0o644),
            file(b"xattr", bytes(b"attrs"), 0o644),
            file(b"removed", bytes(b"bye"), 0o644),
            file(b"type", bytes(b"a file, then a directory"), 0o644),
            Spec::Symlink {
                name: b"link".to_vec(),
                target: b"big".to_vec(),
                meta: meta(0o777),
            },
            Spec::Dir {
                name: b"same dir".to_vec(),
                meta: meta(0o755),
                children: vec![
                    file(b"inside.conf", bytes(b"in"), 0o644),
                    Spec::Fifo {
                        name: b"fifo".to_vec(),
                        meta: meta(0o620),
                    },
                ],
            },
            Spec::Dir {
                name: b"gone dir".to_vec(),
                meta: meta(0o755),
                children: vec![file(b"g.conf", bytes(b"g"), 0o644)],
            },
        ],
        extras: Vec::new(),
        // "big" (3rd file) linked into "same dir" (2nd directory) and the root.
        links: vec![(2, 1, b"big link".to_vec()), (2, 0, b"big link 2".to_vec())],
        specials: false,
    };
    let xattrs = t::xattrs_supported(src.parent().unwrap());
    if !xattrs {
        eprintln!("SKIP: this filesystem has no user xattrs; xattr changes are not checked");
    }
    spec.materialize(src, xattrs);
    let scanned = t::scan(src);
    assert!(t::has_sparse_file(&scanned), "the test needs a sparse file");
    assert_eq!(t::link_groups(&scanned).len(), 1, "one hard-link group");
    xattrs
}

/// The change set between the two snapshots; the root's mtime is put back afterwards so that
/// only the changed entries differ.
fn change(src: &Path, xattrs: bool) {
    let root_mtime = fs::symlink_metadata(src).unwrap();
    fs::write(src.join("added\nfile"), b"new").unwrap();
    fs::write(t::child(src, b"new\xff"), b"new too").unwrap();
    fs::remove_file(src.join("removed")).unwrap();
    fs::write(src.join("content"), b"new content").unwrap();
    fs::set_permissions(src.join("chmod"), fs::Permissions::from_mode(0o600)).unwrap();
    if t::is_root() {
        std::os::unix::fs::lchown(src.join("owner"), Some(1), Some(1)).unwrap();
    }
    if xattrs {
        xattr::set(src.join("xattr"), "user.kloset.test", b"changed").unwrap();
    }
    fs::remove_file(src.join("link")).unwrap();
    std::os::unix::fs::symlink("sparse", src.join("link")).unwrap();
    if t::is_root() {
        std::os::unix::fs::lchown(src.join("link"), Some(4242), Some(4343)).unwrap();
    }
    t::set_mtime(&src.join("link"), 1_700_000_000, 123_456_789);
    fs::remove_file(src.join("type")).unwrap();
    fs::create_dir(src.join("type")).unwrap();
    fs::write(src.join("type/child"), b"c").unwrap();
    t::set_mtime(&src.join("type/child"), 1, 0);
    t::set_mtime(&src.join("type"), 1, 0);
    fs::remove_file(src.join("gone dir/g.conf")).unwrap();
    fs::remove_dir(src.join("gone dir")).unwrap();
    use std::os::unix::fs::MetadataExt;
    t::set_mtime(
        src,
        root_mtime.mtime(),
        root_mtime.mtime_nsec().try_into().unwrap(),
    );
}

fn sha256(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

fn scenario(env: &Env) {
    env.ok(&["create", "-plaintext"]);
    let src = env.src();
    let xattrs = first_tree(&src);
    let s1 = env.backup();
    // Hashes of the first tree's files, computed here before they change.
    let big = fs::read(src.join("big")).unwrap();
    let sparse = fs::read(src.join("sparse")).unwrap();
    let odd = fs::read(t::child(&src, b"\xff\xfe not utf-8\n")).unwrap();
    let sha256sum = Command::new("sha256sum")
        .arg(src.join("sparse"))
        .output()
        .expect("run sha256sum");
    let sparse_sha_tool = String::from_utf8(sha256sum.stdout).unwrap();
    change(&src, xattrs);
    let s2 = env.backup();
    let base = src.to_str().unwrap();

    // --- diff, text
    let mut want = vec![
        format!("+ {base}/added\\nfile"),
        format!("U {base}/chmod"),
        format!("M {base}/content"),
        format!("- {base}/gone dir/"),
        format!("- {base}/gone dir/g.conf"),
        format!("U {base}/link"),
        format!("+ {base}/new\\377"),
    ];
    if t::is_root() {
        want.push(format!("U {base}/owner"));
    }
    want.push(format!("- {base}/removed"));
    want.push(format!("T {base}/type/"));
    want.push(format!("+ {base}/type/child"));
    if xattrs {
        want.push(format!("U {base}/xattr"));
    }
    let o = env.ok(&["diff", &s1, &s2]);
    let mut lines = o.lines();
    let summary = lines.pop().expect("a summary line");
    assert_eq!(lines, want, "stderr: {}", o.stderr);
    let metadata = 2 + usize::from(t::is_root()) + usize::from(xattrs);
    assert_eq!(
        summary,
        format!("3 added, 3 removed, 1 modified, {metadata} metadata only, 1 type changed")
    );
    // -quiet: no summary; the same snapshot: nothing at all.
    assert_eq!(env.run_with(&["-quiet"], &["diff", &s1, &s2]).lines(), want);
    assert!(
        env.run_with(&["-quiet"], &["diff", &s1, &s1])
            .stdout
            .is_empty()
    );
    // Sub-paths, relative to the backed-up directory or absolute.
    let o = env.run_with(
        &["-quiet"],
        &["diff", &format!("{s1}:type"), &format!("{s2}:{base}/type")],
    );
    assert_eq!(
        o.lines(),
        [format!("T {base}/type/"), format!("+ {base}/type/child")]
    );
    let o = env.run_with(
        &["-quiet"],
        &["diff", &format!("{s1}:same dir"), &format!("{s2}:same dir")],
    );
    assert!(o.stdout.is_empty(), "{}", o.text());

    // --- diff -json: exact names, what changed, statistics last
    let v = env.ok(&["diff", "-json", &s1, &s2]).json_lines();
    let (stats, changes) = v.split_last().unwrap();
    assert_eq!(stats["message_type"], "statistics");
    assert_eq!(stats["added"], 3);
    assert_eq!(stats["type"], 1);
    assert_eq!(changes.len(), want.len());
    let find = |path: &str| {
        changes
            .iter()
            .find(|c| c["path"] == path)
            .unwrap_or_else(|| panic!("no change for {path}: {changes:?}"))
    };
    assert_eq!(find(&format!("{base}/added\nfile"))["code"], "+");
    let odd_new = changes
        .iter()
        .find(|c| c.get("path_hex").is_some())
        .expect("a name that is not UTF-8 has path_hex");
    assert_eq!(
        hex::decode(odd_new["path_hex"].as_str().unwrap()).unwrap(),
        [base.as_bytes(), b"/new\xff"].concat()
    );
    assert_eq!(
        find(&format!("{base}/content"))["changes"],
        serde_json::json!(["content", "mtime"])
    );
    assert_eq!(
        find(&format!("{base}/chmod"))["changes"],
        serde_json::json!(["mode"])
    );
    assert_eq!(
        find(&format!("{base}/link"))["changes"],
        serde_json::json!(["target"])
    );
    let ty = find(&format!("{base}/type"));
    assert_eq!(
        (ty["code"].clone(), ty["type"].clone()),
        ("T".into(), "dir".into())
    );
    assert_eq!(ty["old_type"], "file");
    if xattrs {
        assert_eq!(
            find(&format!("{base}/xattr"))["changes"],
            serde_json::json!(["xattrs"])
        );
    }
    assert_eq!(find(&format!("{base}/gone dir"))["type"], "dir");

    // --- diff: missing snapshot or path
    env.run(&["diff", "ffffffff", &s2])
        .fails(NOT_FOUND, &["ffffffff"]);
    env.run(&["diff", &s1, &format!("{s2}:/no/such")])
        .fails(NOT_FOUND, &["/no/such"]);

    // --- locate: names in every snapshot, oldest first
    let o = env.ok(&["locate", "*.conf"]);
    assert_eq!(
        o.lines(),
        [
            format!("{s1}:{base}/gone dir/g.conf"),
            format!("{s1}:{base}/same dir/inside.conf"),
            format!("{s2}:{base}/same dir/inside.conf"),
        ]
    );
    // Paths (with `/`), names with control characters escaped, several patterns.
    let o = env.ok(&["locate", "same dir/*", "esc*", "*\n*"]);
    assert_eq!(
        o.lines(),
        [
            format!("{s1}:{base}/esc\\033[31m"),
            format!("{s1}:{base}/same dir/big link"),
            format!("{s1}:{base}/same dir/fifo"),
            format!("{s1}:{base}/same dir/inside.conf"),
            format!("{s1}:{base}/\\377\\376 not utf-8\\n"),
            format!("{s2}:{base}/added\\nfile"),
            format!("{s2}:{base}/esc\\033[31m"),
            format!("{s2}:{base}/same dir/big link"),
            format!("{s2}:{base}/same dir/fifo"),
            format!("{s2}:{base}/same dir/inside.conf"),
            format!("{s2}:{base}/\\377\\376 not utf-8\\n"),
        ]
    );
    let o = env.ok(&["locate", &format!("{base}/type/*")]);
    assert_eq!(o.lines(), [format!("{s2}:{base}/type/child")]);
    let o = env.ok(&["locate", "-snapshot", &s2, "-json", "*not utf-8*"]);
    let v = o.json_lines();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["short_id"], s2.as_str());
    assert!(v[0]["snapshot"].as_str().unwrap().starts_with(&s2));
    assert_eq!(v[0]["type"], "file");
    assert_eq!(
        hex::decode(v[0]["path_hex"].as_str().unwrap()).unwrap(),
        [base.as_bytes(), b"/\xff\xfe not utf-8\n"].concat()
    );
    // Nothing matched: exit 1 and no output, as grep; an unknown snapshot: 8.
    let o = env.run(&["locate", "no-such-name*"]);
    o.code(ERROR);
    assert!(o.stdout.is_empty() && o.stderr.is_empty(), "{}", o.stderr);
    env.run(&["locate", "-snapshot", "ffffffff", "*"])
        .fails(NOT_FOUND, &["ffffffff"]);
    env.run(&["locate", "-snapshot", &s1, "removed"]).code(OK);
    env.run(&["locate", "-snapshot", &s2, "removed"])
        .code(ERROR);

    // --- digest: the files as they were in the first snapshot
    let o = env.ok(&["digest", &format!("{s1}:big"), &format!("{s1}:sparse")]);
    assert_eq!(
        o.lines(),
        [
            format!("{}  {s1}:big", sha256(&big)),
            format!("{}  {s1}:sparse", sha256(&sparse)),
        ]
    );
    assert_eq!(
        sparse_sha_tool.split_whitespace().next().unwrap(),
        sha256(&sparse),
        "sha256sum agrees"
    );
    let o = env.ok(&[
        "digest",
        "-hash",
        "blake3",
        &format!("{s1}:{base}/big link 2"),
    ]);
    assert_eq!(
        o.lines(),
        [format!(
            "{}  {s1}:{base}/big link 2",
            blake3::hash(&big).to_hex()
        )]
    );
    // A name with a newline: given as raw bytes, shown escaped.
    let mut arg = format!("{s1}:").into_bytes();
    arg.extend_from_slice(b"\xff\xfe not utf-8\n");
    let o = env.ok(&[OsStr::new("digest"), OsStr::from_bytes(&arg)]);
    assert_eq!(
        o.lines(),
        [format!("{}  {s1}:\\377\\376 not utf-8\\n", sha256(&odd))]
    );
    // diff takes raw paths too: that file did not change.
    let mut arg2 = format!("{s2}:").into_bytes();
    arg2.extend_from_slice(b"\xff\xfe not utf-8\n");
    let o = env.run_with(
        &["-quiet"],
        &[
            OsStr::new("diff"),
            OsStr::from_bytes(&arg),
            OsStr::from_bytes(&arg2),
        ],
    );
    o.code(OK);
    assert!(o.stdout.is_empty(), "{}", o.text());
    let mut arg = format!("{s2}:").into_bytes();
    arg.extend_from_slice(b"added\nfile");
    let o = env.ok(&[OsStr::new("digest"), OsStr::from_bytes(&arg)]);
    assert_eq!(
        o.lines(),
        [format!("{}  {s2}:added\\nfile", sha256(b"new"))]
    );
    // Not a file: exit 1; missing: exit 8; the other targets are still hashed.
    env.run(&["digest", &format!("{s2}:type")])
        .fails(ERROR, &["type", "not a regular file"]);
    env.run(&["digest", &format!("{s2}:link")])
        .fails(ERROR, &["link", "symlink"]);
    let o = env.run(&["digest", &format!("{s2}:removed"), &format!("{s2}:content")]);
    o.fails(NOT_FOUND, &["removed"]);
    assert_eq!(
        o.lines(),
        [format!("{}  {s2}:content", sha256(b"new content"))]
    );
    env.run(&["digest", "ffffffff:/x"])
        .fails(NOT_FOUND, &["ffffffff"]);
    t::make_removable(&src);
}

#[test]
fn diff_locate_digest_on_a_local_store() {
    scenario(&Env::local());
}

#[test]
fn diff_locate_digest_on_an_sftp_store() {
    if let Some(env) = Env::sftp() {
        scenario(&env);
    }
}
