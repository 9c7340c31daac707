//! Many writers at once (issue 14): four kloset processes with different host names (root:
//! `unshare -u` and `hostname`) back up overlapping trees (the same 1,000 small files, copied
//! for each, plus data of their own) into one SFTP store at the same moment, for several
//! rounds. Then `check` passes with no pack left out of every index, every snapshot restores
//! exactly, and the test prints how many times the shared data ended up stored.
//!
//! `KLOSET_WRITER_ROUNDS=N` runs more rounds.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sshd::{REPO_PASSPHRASE, Sshd};
use common::tree::is_root;
use kloset::store::format::BlobKind;
use kloset::store::{Backend, FileType, LocalBackend, Store};

const HOSTS: usize = 4;
const COMMON_FILES: usize = 1000;
/// Longest one round of concurrent backups may take.
const BOUND: Duration = Duration::from_secs(180);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kloset"))
}

fn rounds() -> usize {
    std::env::var("KLOSET_WRITER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

fn ok(sshd: &Sshd, args: &[&str]) -> String {
    let out = sshd.cmd(bin()).args(args).output().expect("run kloset");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "kloset panicked: {err}");
    assert!(
        out.status.success(),
        "kloset {args:?} failed ({:?}): {err}",
        out.status.code()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The shared files: `common/dNN/fNNNN`, 100 B to ~3 KiB each, all different.
fn common_files() -> Vec<(PathBuf, Vec<u8>)> {
    (0..COMMON_FILES)
        .map(|i| {
            let mut data = format!("shared file {i}\n").into_bytes();
            data.extend(noise(i as u64 + 7, 100 + (i * 37) % 3000));
            (
                PathBuf::from(format!("common/d{:02}/f{i:04}", i % 20)),
                data,
            )
        })
        .collect()
}

/// What `host`'s snapshot of `round` must hold: relative path → content.
fn expected(
    common: &[(PathBuf, Vec<u8>)],
    host: usize,
    round: usize,
) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m: BTreeMap<PathBuf, Vec<u8>> = common.iter().cloned().collect();
    for r in 0..=round {
        m.insert(PathBuf::from(format!("own/r{r}.bin")), own_data(host, r));
    }
    m
}

fn own_data(host: usize, round: usize) -> Vec<u8> {
    noise(1_000_000 + (host * 1000 + round) as u64, 2 << 20)
}

/// Every regular file under `root`: relative path → content.
fn read_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// Start `kloset … backup src` as host `name` (its own UTS namespace).
fn spawn_as(sshd: &Sshd, name: &str, store: &str, src: &Path, cache: Option<&Path>) -> Child {
    let mut cmd = sshd.cmd(Path::new("unshare"));
    cmd.args([
        "-u",
        "sh",
        "-c",
        "hostname \"$1\" && shift && exec \"$@\"",
        "sh",
        name,
    ])
    .arg(bin())
    .args(["-quiet", "at", store, "backup"])
    .arg(src)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(c) = cache {
        cmd.env("XDG_CACHE_HOME", c);
    }
    cmd.spawn().expect("spawn unshare")
}

/// Wait for every child within [`BOUND`]; their (exit code, stdout, stderr).
fn wait_all(children: Vec<Child>) -> Vec<(Option<i32>, String, String)> {
    let started = Instant::now();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    loop {
        let done = children
            .iter_mut()
            .all(|c| c.as_mut().is_none_or(|c| c.try_wait().unwrap().is_some()));
        if done {
            break;
        }
        if started.elapsed() > BOUND {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
            }
            panic!("concurrent backups still running after {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    children
        .iter_mut()
        .map(|c| {
            let out = c.take().unwrap().wait_with_output().unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .collect()
}

fn many_writers(plaintext: bool) {
    if !is_root() {
        eprintln!("SKIP: host names per process need root (unshare -u)");
        return;
    }
    let probe = Command::new("unshare")
        .args(["-u", "sh", "-c", "hostname probe-h && hostname"])
        .output();
    if !probe.is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"probe-h")) {
        eprintln!("SKIP: unshare -u / hostname does not work here");
        return;
    }
    let Some(sshd) = Sshd::start() else { return };
    let top = tempfile::tempdir().unwrap();
    let repo = sshd.remote_dir("shared");
    let store = sshd.url(&repo);
    if plaintext {
        ok(&sshd, &["at", &store, "create", "-plaintext"]);
    } else {
        ok(&sshd, &["at", &store, "create"]);
    }
    let common = common_files();
    let srcs: Vec<PathBuf> = (0..HOSTS)
        .map(|h| {
            let s = top.path().join(format!("src{h}"));
            for (p, d) in &common {
                fs::create_dir_all(s.join(p).parent().unwrap()).unwrap();
                fs::write(s.join(p), d).unwrap();
            }
            fs::create_dir_all(s.join("own")).unwrap();
            s
        })
        .collect();
    // Hosts 0 and 1 share the fixture's cache (one HOME), 2 and 3 have their own.
    let caches: Vec<Option<PathBuf>> = (0..HOSTS)
        .map(|h| (h >= 2).then(|| top.path().join(format!("cache{h}"))))
        .collect();

    // (host, round) → snapshot id
    let mut snaps: Vec<(usize, usize, String)> = Vec::new();
    for round in 0..rounds() {
        for (h, s) in srcs.iter().enumerate() {
            fs::write(s.join(format!("own/r{round}.bin")), own_data(h, round)).unwrap();
        }
        let children: Vec<Child> = (0..HOSTS)
            .map(|h| {
                spawn_as(
                    &sshd,
                    &format!("h{}", h + 1),
                    &store,
                    &srcs[h],
                    caches[h].as_deref(),
                )
            })
            .collect();
        for (h, (code, out, err)) in wait_all(children).into_iter().enumerate() {
            assert!(!err.contains("panicked"), "h{} panicked: {err}", h + 1);
            assert_eq!(code, Some(0), "round {round}, h{}: {err}", h + 1);
            let id = out.trim().to_string();
            assert!(!id.is_empty(), "round {round}, h{}: no snapshot id", h + 1);
            snaps.push((h, round, id));
        }
    }

    // The store is whole: check passes, and no pack is left out of every index.
    let out = sshd
        .cmd(bin())
        .args(["at", &store, "check"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "check after concurrent backups: {text}"
    );
    assert!(
        !text.contains("not in any index"),
        "a writer left a pack no index lists: {text}"
    );

    // Every snapshot restores exactly, and is the right host's.
    let ls = ok(&sshd, &["at", &store, "ls", "-json"]);
    let listed: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let host_of: HashMap<String, String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap_or_default().to_string(),
                s["host"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(host_of.len(), snaps.len(), "ls: {ls}");
    for (h, round, id) in &snaps {
        let host = host_of
            .iter()
            .find(|(full, _)| full.starts_with(id.as_str()))
            .map(|(_, host)| host.as_str());
        assert_eq!(host, Some(format!("h{}", h + 1).as_str()), "snapshot {id}");
        let dst = top.path().join(format!("restore-{h}-{round}"));
        ok(
            &sshd,
            &[
                "-quiet",
                "at",
                &store,
                "restore",
                "-to",
                dst.to_str().unwrap(),
                id,
            ],
        );
        let got = read_tree(&dst);
        let want = expected(&common, *h, *round);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "snapshot {id} of h{} round {round}: different files",
            h + 1
        );
        for (p, d) in &want {
            assert!(&got[p] == d, "snapshot {id}: {} differs", p.display());
        }
        fs::remove_dir_all(&dst).unwrap();
    }

    // How often the shared data is stored: blob entries in all pack headers vs distinct ids.
    let passphrase = REPO_PASSPHRASE.as_bytes().to_vec();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&repo));
    let st = Store::open(backend.clone(), &move |_| Ok(passphrase.clone())).unwrap();
    let mut per_id: HashMap<(bool, [u8; 32]), usize> = HashMap::new();
    let mut packs = 0;
    for p in backend.list(FileType::Pack).unwrap() {
        packs += 1;
        let h = st.read_pack_header(&p.name, p.size).unwrap();
        for e in h.entries {
            *per_id
                .entry((h.kind == BlobKind::Data, e.id.0))
                .or_default() += 1;
        }
    }
    let count = |data: bool| {
        let v: Vec<usize> = per_id
            .iter()
            .filter(|((d, _), _)| *d == data)
            .map(|(_, n)| *n)
            .collect();
        (
            v.iter().sum::<usize>(),
            v.len(),
            v.iter().copied().max().unwrap_or(0),
        )
    };
    let ((data_n, data_ids, data_max), (tree_n, tree_ids, _)) = (count(true), count(false));
    let expected_data = COMMON_FILES + HOSTS * rounds() * 2; // 2 MiB own files: 1-2 chunks each
    eprintln!(
        "{} writers x {} rounds ({}): {packs} packs; data blobs: {data_n} stored for {data_ids} distinct \
         (at most {data_max} copies of one; about {expected_data} distinct expected), tree blobs: \
         {tree_n} stored for {tree_ids} distinct; {} snapshots",
        HOSTS,
        rounds(),
        if plaintext { "plaintext" } else { "encrypted" },
        snaps.len()
    );
    let distinct_ids: BTreeSet<_> = per_id.keys().collect();
    assert!(!distinct_ids.is_empty());
    // Dedup works across writers: writers that start together on an empty store each store
    // the shared files once (none sees the others' packs, not indexed yet when it loaded the
    // index), and later rounds store nothing of them again.
    assert!(data_max <= HOSTS, "a blob stored {data_max} times");
    assert!(
        data_n <= data_ids + (HOSTS - 1) * (COMMON_FILES + HOSTS * 2),
        "shared data stored too often: {data_n} data blobs for {data_ids} distinct"
    );
}

#[test]
fn four_writers_at_once_encrypted() {
    many_writers(false);
}

#[test]
fn four_writers_at_once_plaintext() {
    many_writers(true);
}

// ---------------------------------------------------------------------------------------------
// The design rule behind the reported loss ("a snapshot's root tree blob is not in the store's
// index", "1 pack(s) are not in any index file"): a writer that deduplicates against a blob in
// a pack no index file lists (another writer's, uploaded but not yet indexed, or left by one
// that was killed) must list that pack in its own index before its snapshot is committed.
// Otherwise the snapshot depends on a pack whose only record is its header, which a clean-up
// of an interrupted backup's leftovers may remove. Tested the deterministic way: the other
// writer's index files are removed (it was killed between its packs and its index), then the
// packs no index lists are removed after the second writer's backup, as a clean-up of
// leftovers would; the second writer's snapshot must still check and restore.

fn local(home: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin())
        .env("HOME", home)
        .env_remove("XDG_CACHE_HOME")
        .env("KLOSET_PASSPHRASE", REPO_PASSPHRASE)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "kloset panicked: {err}");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

fn local_ok(home: &Path, args: &[&str]) -> String {
    let (code, out, err) = local(home, args);
    assert_eq!(code, Some(0), "kloset {args:?}: {err}");
    out
}

/// Remove every file of `store/<dir>` (recursively).
fn remove_all_files(dir: &Path) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            remove_all_files(&e.path());
        } else {
            fs::remove_file(e.path()).unwrap();
        }
    }
}

/// Remove the packs no index file lists (what a clean-up of interrupted backups would do);
/// how many.
fn remove_unindexed_packs(store: &Path) -> usize {
    let passphrase = REPO_PASSPHRASE.as_bytes().to_vec();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(store));
    let st = Store::open(backend.clone(), &move |_| Ok(passphrase.clone())).unwrap();
    let orphans = st.index_report().recovered_packs.clone();
    for p in &orphans {
        backend.remove(FileType::Pack, p).unwrap();
    }
    orphans.len()
}

fn small_tree(root: &Path) {
    for i in 0..50 {
        let p = root.join(format!("d{}/f{i}", i % 5));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, noise(i + 1, 1000 + i as usize * 300)).unwrap();
    }
}

/// A second writer's new snapshot deduplicates against packs no index lists.
#[test]
fn dedup_against_an_unindexed_pack_indexes_it() {
    let top = tempfile::tempdir().unwrap();
    let home = top.path().join("home");
    fs::create_dir(&home).unwrap();
    let store = top.path().join("store");
    let store_s = store.to_str().unwrap();
    let (a, b) = (top.path().join("a"), top.path().join("b"));
    small_tree(&a);
    small_tree(&b);
    local_ok(&home, &["at", store_s, "create"]);
    // Writer A uploads its packs, then dies before its index and snapshot.
    local_ok(
        &home,
        &["-quiet", "at", store_s, "backup", a.to_str().unwrap()],
    );
    remove_all_files(&store.join("index"));
    remove_all_files(&store.join("snapshots"));
    // Writer B backs up the same contents: every data blob is in A's packs.
    let id = local_ok(
        &home,
        &["-quiet", "at", store_s, "backup", b.to_str().unwrap()],
    );
    let removed = remove_unindexed_packs(&store);
    let (code, out, err) = local(&home, &["at", store_s, "check"]);
    assert_eq!(
        code,
        Some(0),
        "B's snapshot lost data when {removed} unindexed pack(s) were removed: {out}{err}"
    );
    let dst = top.path().join("restored");
    local_ok(
        &home,
        &[
            "-quiet",
            "at",
            store_s,
            "restore",
            "-to",
            dst.to_str().unwrap(),
            id.trim(),
        ],
    );
    assert_eq!(read_tree(&dst), read_tree(&b));
}

/// A backup that reuses an unchanged file's chunks from a snapshot whose packs no index lists
/// (a store left so by an earlier kloset) lists those packs in its own index.
#[test]
fn unchanged_files_from_unindexed_packs_are_indexed() {
    let top = tempfile::tempdir().unwrap();
    let home = top.path().join("home");
    fs::create_dir(&home).unwrap();
    let store = top.path().join("store");
    let store_s = store.to_str().unwrap();
    let a = top.path().join("a");
    small_tree(&a);
    local_ok(&home, &["at", store_s, "create"]);
    local_ok(
        &home,
        &["-quiet", "at", store_s, "backup", a.to_str().unwrap()],
    );
    remove_all_files(&store.join("index"));
    fs::write(a.join("new"), b"one new file").unwrap();
    let id = local_ok(
        &home,
        &["-quiet", "at", store_s, "backup", a.to_str().unwrap()],
    );
    // Only the newest snapshot is kept (the older one depends on the unindexed packs).
    for e in fs::read_dir(store.join("snapshots")).unwrap().flatten() {
        if !e.file_name().to_string_lossy().starts_with(id.trim()) {
            fs::remove_file(e.path()).unwrap();
        }
    }
    let removed = remove_unindexed_packs(&store);
    let (code, out, err) = local(&home, &["at", store_s, "check"]);
    assert_eq!(
        code,
        Some(0),
        "the snapshot lost data when {removed} unindexed pack(s) were removed: {out}{err}"
    );
    let dst = top.path().join("restored");
    local_ok(
        &home,
        &[
            "-quiet",
            "at",
            store_s,
            "restore",
            "-to",
            dst.to_str().unwrap(),
            id.trim(),
        ],
    );
    assert_eq!(read_tree(&dst), read_tree(&a));
}

// ---------------------------------------------------------------------------------------------
// sshd turns connections away, closing them before its banner, while more than its MaxStartups
// logins are under way at once (by default 30% of them beyond 10, all beyond 100): what many
// hosts whose cron jobs start in the same minute run into. OpenSSH's client gives up at once;
// kloset's first connection tries again, with growing and jittered waits, for up to the
// connection timeout, and its later connections are retried as any other.

/// Hold one login open (a TCP connection that never sends its banner), taking a slot of
/// sshd's MaxStartups; it is counted once sshd has answered with its own banner (until then,
/// another login may still hold the slot, e.g. the fixture's probe of the port: tried again).
fn hold_a_login(sshd: &Sshd) -> std::net::TcpStream {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", sshd.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).expect("sshd's first bytes");
        if &b == b"SSH-" {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "sshd turned every connection away for 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A backup that starts while the server turns every new connection away waits, then runs
/// (it used to exit 9 at once: "SSH handshake failed: Failed getting banner"); one turned away
/// for longer than ConnectTimeout says so in one line, exit 9.
#[test]
fn a_backup_waits_while_sshd_turns_logins_away() {
    let Some(mut sshd) = Sshd::start() else {
        return;
    };
    let top = tempfile::tempdir().unwrap();
    let src = top.path().join("src");
    small_tree(&src);
    let store = sshd.url(sshd.remote_dir("turned-away"));
    ok(&sshd, &["at", &store, "create"]);
    sshd.set_max_startups("1:100:1");

    let hog = hold_a_login(&sshd);
    let started = Instant::now();
    let child = sshd
        .cmd(bin())
        .args(["-quiet", "at", &store, "backup"])
        .arg(&src)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    drop(hog);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the backup failed ({:?}) while sshd turned logins away: {err}",
        out.status.code()
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "took {took:?}");
    eprintln!("backup begun while turned away: done after {took:?}");
    ok(&sshd, &["at", &store, "check"]);
    let dst = top.path().join("dst");
    ok(
        &sshd,
        &[
            "at",
            &store,
            "restore",
            "-to",
            dst.to_str().unwrap(),
            "latest",
        ],
    );
    assert!(read_tree(&dst) == read_tree(&src), "restore differs");

    // Turned away for longer than the connection timeout (2 s here).
    let config = sshd.ssh_config_path();
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains("ConnectTimeout 10"), "{text}");
    fs::write(
        &config,
        text.replace("ConnectTimeout 10", "ConnectTimeout 2"),
    )
    .unwrap();
    let hog = hold_a_login(&sshd);
    let started = Instant::now();
    let out = sshd.cmd(bin()).args(["at", &store, "ls"]).output().unwrap();
    let took = started.elapsed();
    drop(hog);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("closed the connection before the SSH handshake")
            && err.contains("MaxStartups"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(6),
        "gave up after {took:?}"
    );
    eprintln!(
        "turned away for good: exit 9 after {took:?}: {}",
        err.trim()
    );
}

/// Four backups started at the same moment against a server that lets one login through at a
/// time: every one of them succeeds, and the store checks.
#[test]
fn backups_started_together_all_get_through_max_startups() {
    let Some(mut sshd) = Sshd::start() else {
        return;
    };
    let top = tempfile::tempdir().unwrap();
    let store = sshd.url(sshd.remote_dir("herd"));
    ok(&sshd, &["at", &store, "create"]);
    sshd.set_max_startups("1:100:1");
    let srcs: Vec<PathBuf> = (0..HOSTS)
        .map(|h| {
            let s = top.path().join(format!("src{h}"));
            small_tree(&s);
            fs::write(s.join("own.bin"), own_data(h, 0)).unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let children: Vec<Child> = srcs
        .iter()
        .enumerate()
        .map(|(h, s)| {
            sshd.cmd(bin())
                .env("XDG_CACHE_HOME", top.path().join(format!("cache{h}")))
                .args(["-quiet", "at", &store, "backup"])
                .arg(s)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (h, (code, _, err)) in wait_all(children).into_iter().enumerate() {
        assert_eq!(code, Some(0), "backup {h} failed: {err}");
    }
    eprintln!(
        "{HOSTS} backups at once: all done after {:?}",
        started.elapsed()
    );
    ok(&sshd, &["at", &store, "check"]);
    let ls = ok(&sshd, &["at", &store, "ls"]);
    assert_eq!(ls.lines().count(), HOSTS, "{ls}");
}

/// `ConnectionAttempts N` in ~/.ssh/config: as OpenSSH, a refused TCP connection is tried again
/// a second apart, N times in all; without it, a command fails at once.
#[test]
fn connection_attempts_wait_for_a_server_coming_up() {
    let Some(mut sshd) = Sshd::start() else {
        return;
    };
    let store = sshd.url(sshd.remote_dir("coming-up"));
    ok(&sshd, &["at", &store, "create"]);
    sshd.stop();
    let started = Instant::now();
    let out = sshd.cmd(bin()).args(["at", &store, "ls"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");

    let config = sshd.ssh_config_path();
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace(
            "ConnectTimeout 10",
            "ConnectTimeout 10\n    ConnectionAttempts 5",
        ),
    )
    .unwrap();
    let started = Instant::now();
    let child = sshd
        .cmd(bin())
        .args(["at", &store, "ls"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    sshd.restart();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status.code());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "took {took:?}");
    eprintln!("ConnectionAttempts 5: connected after {took:?}");
}
