//! `kloset at STORE archive` end to end through the built binary, from a local store and from
//! a store on a real loopback OpenSSH server: every format is unpacked (GNU tar for the tar
//! formats, the `zip` crate's reader for zip) and compared entry by entry with a `restore` of
//! the same snapshot (tests/common/tree.rs `scan` + `diff`), on a hard-case tree (odd names,
//! hard links, a sparse file, xattrs where the filesystem has them, symlinks, a fifo, a
//! socket and a device). Also: sub-path archives, `-to FILE` leaving nothing behind on
//! errors, completions and man pages, and Plakar's `pkg`/`login` set-up lines.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::sshd::Sshd;
use common::tree::{self as t, Content, FsTree, Meta, Spec, TreeSpec};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_kloset");
const PASS: &str = "archive test passphrase";

/// One test's world: a HOME, a source tree, and a store location.
struct World {
    tmp: TempDir,
    store: String,
    sshd: Option<Sshd>,
}

impl World {
    fn local() -> World {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir(tmp.path().join("home")).unwrap();
        let store = tmp.path().join("store").display().to_string();
        World {
            tmp,
            store,
            sshd: None,
        }
    }

    fn sftp(sshd: Sshd) -> World {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = sshd.url(sshd.remote_dir("archive-store"));
        World {
            tmp,
            store,
            sshd: Some(sshd),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn cmd(&self) -> Command {
        let mut c = match &self.sshd {
            Some(s) => s.cmd(Path::new(BIN)),
            None => {
                let mut c = Command::new(BIN);
                c.env_clear()
                    .env("HOME", self.p("home"))
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default());
                c
            }
        };
        c.env("KLOSET_PASSPHRASE", PASS).stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).output().expect("run kloset");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "kloset panicked: {err}");
        out
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "kloset {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn at(&self, args: &[&str]) -> Output {
        let mut a = vec!["at", self.store.as_str()];
        a.extend_from_slice(args);
        self.run(&a)
    }

    fn at_ok(&self, args: &[&str]) -> Output {
        let mut a = vec!["at", self.store.as_str()];
        a.extend_from_slice(args);
        self.ok(&a)
    }

    /// Create the store, back `src` up, and return the snapshot's short id.
    fn backup(&self, src: &Path) -> String {
        self.at_ok(&["create"]);
        let out = self.at_ok(&["backup", &src.display().to_string()]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Restore `target` into a new directory and scan it.
    fn restore_scan(&self, target: &str, name: &str) -> FsTree {
        let dir = self.p(name);
        self.at_ok(&["restore", "-to", &dir.display().to_string(), target]);
        t::scan(&dir)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        t::make_removable(self.tmp.path());
    }
}

/// The hard cases: a name that is not UTF-8, a 255-byte name, a setuid file, a multi-chunk
/// file with two more hard links (one in another directory), a sparse file, a read-only
/// directory with a dangling symlink, a sticky directory with a fifo, a long path (past
/// ustar's 100 + 155 bytes), ns mtimes (one before 1970), xattrs, a socket and a device.
fn hard_tree(root: &Path, xattrs: bool) {
    let m = |mode: u32, sec: i64, nsec: u32| Meta {
        mode,
        mtime: (sec, nsec),
        owner: (4242, 4343),
        xattrs: vec![(b"kloset.test".to_vec(), b"value\0\xff".to_vec())],
    };
    let file = |name: &[u8], content: Content, mode: u32| Spec::File {
        name: name.to_vec(),
        content,
        meta: m(mode, 1_700_000_000, 999_999_999),
    };
    let deep = Spec::Dir {
        name: vec![b'd'; 120],
        meta: m(0o755, 1_600_000_000, 5),
        children: vec![Spec::Dir {
            name: vec![b'e'; 120],
            meta: m(0o755, 1_600_000_001, 6),
            children: vec![file(&[b'f'; 200], Content::Bytes(b"deep".to_vec()), 0o644)],
        }],
    };
    let spec = TreeSpec {
        entries: vec![
            file(
                b"\xff\xfe not utf-8\n",
                Content::Bytes(b"x".to_vec()),
                0o644,
            ),
            file(&[b'n'; 255], Content::Bytes(Vec::new()), 0o600),
            file(b"-rf", Content::Bytes(b"dash".to_vec()), 0o4755),
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
                    len: 3 << 20,
                    writes: vec![(0, b"head".to_vec()), (2 << 20, b"middle".to_vec())],
                },
                0o600,
            ),
            Spec::Dir {
                name: b"ro dir".to_vec(),
                meta: m(0o500, -12_345, 1),
                children: vec![
                    file(b"inside", Content::Bytes(b"in".to_vec()), 0o644),
                    Spec::Symlink {
                        name: b"dangling".to_vec(),
                        target: b"../nowhere/\xff".to_vec(),
                        meta: m(0o777, 1, 2),
                    },
                ],
            },
            Spec::Dir {
                name: b"tmp".to_vec(),
                meta: m(0o1777, 1_000_000_000, 500),
                children: vec![Spec::Fifo {
                    name: b"fifo".to_vec(),
                    meta: m(0o620, 42, 43),
                }],
            },
            deep,
        ],
        extras: Vec::new(),
        // "big" is the 4th file created; link it into "ro dir" (2nd directory) and the root.
        links: vec![(3, 1, b"big link".to_vec()), (3, 0, b"big link 2".to_vec())],
        specials: true,
    };
    spec.materialize(root, xattrs);
}

/// Unpack a tar archive with GNU tar as the brief says users do, into a new directory.
fn untar(archive: &Path, into: &Path, flag: Option<&str>) {
    fs::create_dir(into).unwrap();
    let mut c = Command::new("tar");
    c.arg("--xattrs")
        .arg("--xattrs-include=*")
        .arg("-C")
        .arg(into);
    if t::is_root() {
        c.arg("--same-owner");
    }
    if let Some(f) = flag {
        c.arg(f);
    }
    let out = c.arg("-xf").arg(archive).output().expect("run GNU tar");
    assert!(
        out.status.success(),
        "tar -x failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `want` without the entries of kind `kinds` (what a format cannot hold).
fn without(want: &FsTree, kinds: &[char]) -> FsTree {
    want.iter()
        .filter(|(_, e)| !kinds.contains(&e.kind))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn assert_same(want: &FsTree, got: &FsTree, what: &str) {
    let d = t::diff(want, got);
    assert!(
        d.is_empty(),
        "{what}: {} difference(s) from the restore:\n{}",
        d.len(),
        d.join("\n")
    );
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every tar format from `w`'s latest snapshot (or `target`) equals the restore of it, but
/// for sockets, which tar cannot hold (reported, exit 3).
fn check_tar_formats(w: &World, target: &str, restored: &FsTree, tag: &str) {
    let has_socket = restored.values().any(|e| e.kind == 's');
    for (format, flag) in [
        ("tar", None),
        ("tar.gz", Some("-z")),
        ("tar.zst", Some("--zstd")),
    ] {
        let file = w.p(&format!("{tag}.{format}"));
        let out = w.at(&[
            "archive",
            "-format",
            format,
            "-to",
            &file.display().to_string(),
            target,
        ]);
        let want_code = if has_socket { 3 } else { 0 };
        assert_eq!(
            out.status.code(),
            Some(want_code),
            "{format}: {}",
            stderr(&out)
        );
        if has_socket {
            assert!(
                stderr(&out).contains("not in the archive: \\001sock: a socket"),
                "{}",
                stderr(&out)
            );
        }
        let x = w.p(&format!("{tag}-x-{format}"));
        untar(&file, &x, flag);
        assert_same(&without(restored, &['s']), &t::scan(&x), format);
    }
}

/// The zip archive of `target` holds every directory, file and symlink of the restore with
/// its mode, content and target (hard links as copies); the rest is reported, exit 3.
fn check_zip(w: &World, target: &str, restored: &FsTree, tag: &str) {
    let file = w.p(&format!("{tag}.zip"));
    let out = w.at(&[
        "archive",
        "-format",
        "zip",
        "-to",
        &file.display().to_string(),
        target,
    ]);
    // What zip cannot hold: special files, names and link targets that are not UTF-8.
    let unfit = |p: &[u8], e: &t::FsEntry| {
        matches!(e.kind, 'p' | 's' | 'c' | 'b')
            || std::str::from_utf8(p).is_err()
            || e.target
                .as_ref()
                .is_some_and(|t| std::str::from_utf8(t).is_err())
    };
    let unfit_count = restored.iter().filter(|(p, e)| unfit(p, e)).count();
    let leaves_out = unfit_count > 0;
    let warned = stderr(&out)
        .matches("warning: not in the archive: ")
        .count();
    assert_eq!(warned, unfit_count, "{}", stderr(&out));
    assert_eq!(
        out.status.code(),
        Some(if leaves_out { 3 } else { 0 }),
        "{}",
        stderr(&out)
    );
    let mut z = zip::ZipArchive::new(fs::File::open(&file).unwrap()).expect("a valid zip");
    let mut seen = 0;
    for (p, e) in restored {
        if p.is_empty() {
            continue;
        }
        if unfit(p, e) {
            continue;
        }
        let name = std::str::from_utf8(p).unwrap();
        let (name, ifmt) = match e.kind {
            'd' => (format!("{name}/"), libc::S_IFDIR),
            '-' => (name.to_string(), libc::S_IFREG),
            'l' => (name.to_string(), libc::S_IFLNK),
            _ => continue,
        };
        let mut f = z
            .by_name(&name)
            .unwrap_or_else(|e| panic!("{name:?} not in the zip: {e}"));
        assert_eq!(
            f.external_attributes() >> 16,
            ifmt | e.mode,
            "mode of {name:?}"
        );
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        match e.kind {
            '-' => assert_eq!(Some(*blake3::hash(&data).as_bytes()), e.hash, "{name:?}"),
            'l' => assert_eq!(Some(data), e.target, "target of {name:?}"),
            _ => {}
        }
        seen += 1;
    }
    assert_eq!(seen, z.len(), "the zip holds entries the restore does not");
}

#[test]
fn every_format_from_a_local_store_equals_the_restore() {
    let w = World::local();
    let src = w.p("src");
    fs::create_dir(&src).unwrap();
    hard_tree(&src, t::xattrs_supported(w.tmp.path()));
    let id = w.backup(&src);
    let restored = w.restore_scan(&id, "restored");
    assert_eq!(
        t::link_groups(&restored).len(),
        1,
        "the test needs hard links"
    );
    check_tar_formats(&w, &id, &restored, "whole");
    check_zip(&w, &id, &restored, "whole");

    // The default output is stdout, byte for byte the same archive.
    let out = w.at(&["archive", &id]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(out.stdout, fs::read(w.p("whole.tar")).unwrap());
}

#[test]
fn sub_path_archives_hold_the_entry_under_its_own_name() {
    let w = World::local();
    let src = w.p("src");
    fs::create_dir(&src).unwrap();
    hard_tree(&src, t::xattrs_supported(w.tmp.path()));
    let id = w.backup(&src);
    // A directory holding one path of the hard-linked file: written as a plain file there.
    let target = format!("{id}:ro dir");
    let restored = w.restore_scan(&target, "restored-ro");
    assert!(restored.contains_key(&b"ro dir/big link"[..]));
    check_tar_formats(&w, &target, &restored, "ro");
    check_zip(&w, &target, &restored, "ro");
    // A file, by absolute path.
    let target = format!("{id}:{}/-rf", src.display());
    let restored = w.restore_scan(&target, "restored-rf");
    check_tar_formats(&w, &target, &restored, "rf");
}

#[test]
fn sftp_store_archive_equals_the_restore() {
    let Some(sshd) = Sshd::start() else { return };
    let w = World::sftp(sshd);
    let src = w.p("src");
    fs::create_dir(&src).unwrap();
    hard_tree(&src, t::xattrs_supported(w.tmp.path()));
    let id = w.backup(&src);
    let restored = w.restore_scan(&id, "restored");
    check_tar_formats(&w, &id, &restored, "sftp");
    check_zip(&w, &id, &restored, "sftp");
}

#[test]
fn errors_leave_no_file_behind() {
    let w = World::local();
    let src = w.p("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    let id = w.backup(&src);
    let file = w.p("out.tar");
    let to = file.display().to_string();
    let out = w.at(&["archive", "-to", &to, "nosuchsnapshot"]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    let out = w.at(&["archive", "-to", &to, &format!("{id}:/no/such/path")]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    // An older file of that name is kept as it was.
    fs::write(&file, b"older").unwrap();
    let out = w.at(&["archive", "-to", &to, "nosuchsnapshot"]);
    assert_eq!(out.status.code(), Some(8));
    assert_eq!(fs::read(&file).unwrap(), b"older");
    let names: Vec<_> = fs::read_dir(w.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .filter(|n| n.starts_with(b".out.tar"))
        .collect();
    assert!(names.is_empty(), "temporary files left: {names:?}");
    // A directory is not a file name; an unknown format is a usage error.
    let out = w.at(&["archive", "-to", &w.tmp.path().display().to_string(), &id]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = w.at(&["archive", "-format", "rar", &id]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Success replaces the older file, and Plakar's -output spelling works.
    w.at_ok(&["archive", "-output", &to, &id]);
    assert_ne!(fs::read(&file).unwrap(), b"older");
}

#[test]
fn completions_and_man_pages_name_the_verbs() {
    let w = World::local();
    for shell in ["bash", "zsh", "fish"] {
        let out = w.ok(&["completion", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        for verb in ["archive", "backup", "restore", "mount"] {
            assert!(text.contains(verb), "{shell} completion lacks {verb}");
        }
    }
    assert_eq!(w.run(&["completion", "tcsh"]).status.code(), Some(2));
    let out = w.ok(&["man"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(".ie") || text.contains(".TH kloset"),
        "{text}"
    );
    assert!(text.contains("completion") && text.contains("at"), "{text}");
    let dir = w.p("man1");
    w.ok(&["man", &dir.display().to_string()]);
    for page in [
        "kloset.1",
        "kloset-at.1",
        "kloset-archive.1",
        "kloset-backup.1",
        "kloset-pkg.1",
    ] {
        let text = fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    let archive = fs::read_to_string(dir.join("kloset-archive.1")).unwrap();
    assert!(archive.contains("tar.zst") && archive.contains("kloset at STORE archive"));
}

#[test]
fn seed_set_up_lines() {
    let w = World::local();
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    for name in ["sftp", "sftp@v1.0.4", "fs"] {
        let out = w.ok(&["pkg", "add", name]);
        assert!(
            stdout(&out).contains("built into kloset"),
            "{}",
            stdout(&out)
        );
    }
    for verb in ["add", "rm", "show"] {
        let out = w.run(&["pkg", verb, "s3"]);
        assert_eq!(out.status.code(), Some(1), "pkg {verb} s3");
        let err = stderr(&out);
        assert!(err.contains("\"s3\"") && err.contains("fs, sftp"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(stdout(&w.ok(&["pkg", "rm", "sftp"])).contains("nothing to remove"));
    assert!(stdout(&w.ok(&["pkg", "show", "sftp"])).contains("sftp://"));
    assert!(stdout(&w.ok(&["pkg", "list"])).contains("sftp@v"));
    for args in [&["login", "-email", "me@example.com"][..], &["login"][..]] {
        let out = w.ok(args);
        assert!(
            stdout(&out).contains("needs no account"),
            "{}",
            stdout(&out)
        );
    }
}
