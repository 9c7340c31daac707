//! A fault-injecting TCP proxy for tests: it listens on `127.0.0.1:0` and forwards each
//! connection to an upstream address (the loopback sshd), applying a [`Plan`] that the test
//! changes at run time through [`Proxy::plan`].
//!
//! Per connection (by accept order, [`Plan::per_conn`]) and per direction ([`Dir::Up`]: client
//! to server, [`Dir::Down`]: server to client) it can add latency, cap bandwidth, cut the
//! connection after N bytes, and stall (stop forwarding without closing) for a while once N
//! bytes have passed; [`Plan::refuse`] closes new connections at once, [`Plan::stall_until`]
//! silences every connection until then, and [`Proxy::cut_all`] cuts every live one now.
//! [`Rng`] is a seeded generator for picking cut points, so that a failing schedule reruns
//! from its seed.
//!
//! Each connection has a reader and a writer thread per direction: the reader timestamps what
//! it reads (now + latency) and queues it; the writer sends each piece when it is due, then
//! sleeps as long as the bandwidth cap says. Plain std threads, no dependencies.
//!
//! ```ignore
//! let proxy = Proxy::start(sshd_addr);
//! proxy.plan().per_conn.insert(1, (Rules::cut_after(70_000), Rules::default()));
//! // … point the client at proxy.port() …
//! assert_eq!(proxy.stats().cuts(), 1);
//! ```
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// A direction of traffic through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// What happens to one direction of a connection.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Added to every byte's trip.
    pub latency: Duration,
    /// At most this many bytes per second.
    pub bytes_per_sec: Option<u64>,
    /// Once this many bytes have gone through in this direction, cut the connection (both
    /// directions, both sides shut down).
    pub cut_after: Option<u64>,
    /// Once this many bytes have gone through, forward nothing more for this long, without
    /// closing anything (once per connection and direction).
    pub stall_after: Option<(u64, Duration)>,
}

impl Rules {
    pub fn cut_after(n: u64) -> Rules {
        Rules {
            cut_after: Some(n),
            ..Rules::default()
        }
    }

    pub fn stall_after(n: u64, t: Duration) -> Rules {
        Rules {
            stall_after: Some((n, t)),
            ..Rules::default()
        }
    }

    pub fn latency(t: Duration) -> Rules {
        Rules {
            latency: t,
            ..Rules::default()
        }
    }
}

/// The proxy's behaviour; read by every connection at each piece of data, so a change applies
/// at once (a connection's `per_conn` entry is read by number, so it may be set before the
/// connection exists).
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Close new connections as soon as they are accepted.
    pub refuse: bool,
    /// Rules of every connection without a `per_conn` entry: (up, down).
    pub all: (Rules, Rules),
    /// Rules for connection number n (0-based, in accept order) instead of `all`.
    pub per_conn: HashMap<usize, (Rules, Rules)>,
    /// Until then no connection forwards anything (a link gone silent).
    pub stall_until: Option<Instant>,
    /// Cut points counted over all connections together, per direction (see
    /// [`Proxy::cut_at_totals`]): when the traffic in that direction passes one, the connection
    /// that carried that byte is cut right after it. Each point fires once.
    pub total_cuts: [Vec<u64>; 2],
    /// Stall points counted the same way (see [`Proxy::stall_at_totals`]): the connection that
    /// carries that byte forwards nothing more for the duration, then goes on.
    pub total_stalls: [Vec<(u64, Duration)>; 2],
    /// Bytes read in each direction since the last [`Proxy::cut_at_totals`].
    pub total_seen: [u64; 2],
}

/// What happens at a total point.
#[derive(Clone, Copy, Debug)]
enum Event {
    Cut,
    Stall(Duration),
}

impl Dir {
    fn ix(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
}

impl Plan {
    /// The first total cut or stall point in direction `d` within the next `len` bytes: how
    /// many of them to forward before it, and what it is. Counts the bytes (up to the point)
    /// as seen.
    fn take_total_event(&mut self, d: Dir, len: usize) -> Option<(usize, Event)> {
        let i = d.ix();
        let start = self.total_seen[i];
        let end = start + len as u64;
        let within = |p: u64| p > start && p <= end;
        let cut = self.total_cuts[i]
            .iter()
            .copied()
            .filter(|&p| within(p))
            .min();
        let stall = self.total_stalls[i]
            .iter()
            .copied()
            .filter(|&(p, _)| within(p))
            .min_by_key(|&(p, _)| p);
        let (p, ev) = match (cut, stall) {
            (Some(c), Some((s, t))) if s < c => (s, Event::Stall(t)),
            (Some(c), _) => (c, Event::Cut),
            (None, Some((s, t))) => (s, Event::Stall(t)),
            (None, None) => {
                self.total_seen[i] = end;
                return None;
            }
        };
        match ev {
            Event::Cut => self.total_cuts[i].retain(|&q| q != p),
            Event::Stall(_) => self.total_stalls[i].retain(|&(q, _)| q != p),
        }
        self.total_seen[i] = p;
        Some(((p - start) as usize, ev))
    }

    pub fn rules(&self, conn: usize, d: Dir) -> &Rules {
        let (up, down) = self.per_conn.get(&conn).unwrap_or(&self.all);
        match d {
            Dir::Up => up,
            Dir::Down => down,
        }
    }
}

/// Counters, for the test to see what was injected.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicUsize,
    refused: AtomicUsize,
    cuts: AtomicUsize,
    stalls: AtomicUsize,
    up: AtomicU64,
    down: AtomicU64,
}

impl Stats {
    /// Connections accepted and forwarded.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
    /// Connections cut by a `cut_after` rule or [`Proxy::cut_all`].
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::Relaxed)
    }
    /// `stall_after` rules that fired.
    pub fn stalls(&self) -> usize {
        self.stalls.load(Ordering::Relaxed)
    }
    /// Bytes forwarded in a direction, over all connections.
    pub fn bytes(&self, d: Dir) -> u64 {
        match d {
            Dir::Up => self.up.load(Ordering::Relaxed),
            Dir::Down => self.down.load(Ordering::Relaxed),
        }
    }
}

/// SplitMix64: a seeded generator for schedules (cut points, which connection, …).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }
}

/// One live connection: both sockets, to cut it from anywhere.
struct Live {
    client: TcpStream,
    server: TcpStream,
    cut: AtomicBool,
}

impl Live {
    /// Shut both sockets down (the peers see the connection end); counted once.
    fn cut(&self, stats: &Stats) {
        if !self.cut.swap(true, Ordering::SeqCst) {
            stats.cuts.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

struct Shared {
    plan: Mutex<Plan>,
    stats: Stats,
    live: Mutex<Vec<Arc<Live>>>,
    stop: AtomicBool,
    /// The number the next accepted connection gets.
    next: AtomicUsize,
}

impl Shared {
    fn plan(&self) -> MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The proxy; stops accepting and cuts every live connection when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listen on `127.0.0.1:0`, forwarding to `upstream`, with an empty plan (plain forwarding).
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy's port");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            plan: Mutex::new(Plan::default()),
            stats: Stats::default(),
            live: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            next: AtomicUsize::new(0),
        });
        let sh = shared.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if sh.plan().refuse {
                    sh.stats.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let k = sh.next.fetch_add(1, Ordering::SeqCst);
                let sh = sh.clone();
                thread::spawn(move || serve(client, upstream, k, sh));
            }
        });
        Proxy { addr, shared }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The plan, to change (the lock is held while the guard lives: keep it short).
    pub fn plan(&self) -> MutexGuard<'_, Plan> {
        self.shared.plan()
    }

    /// Replace the whole plan.
    pub fn set_plan(&self, p: Plan) {
        *self.shared.plan() = p;
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The number ([`Plan::per_conn`]) the next connection will get: schedules for the next
    /// command count from it.
    pub fn next_conn(&self) -> usize {
        self.shared.next.load(Ordering::SeqCst)
    }

    /// Cut whichever connection carries byte number `p` (counted from now, over all
    /// connections) in direction `d`, for each `p` of `points`: a schedule that lands whatever
    /// connection the client happens to use for what.
    pub fn cut_at_totals(&self, d: Dir, points: Vec<u64>) {
        let mut plan = self.shared.plan();
        plan.total_seen[d.ix()] = 0;
        plan.total_cuts[d.ix()] = points;
    }

    /// Stall whichever connection carries byte number `p` (counted from now, over all
    /// connections, like [`Proxy::cut_at_totals`], whose count it shares) in direction `d`
    /// for `t`, for each `(p, t)` of `points`: a link that goes silent for a while.
    pub fn stall_at_totals(&self, d: Dir, points: Vec<(u64, Duration)>) {
        let mut plan = self.shared.plan();
        plan.total_seen[d.ix()] = 0;
        plan.total_stalls[d.ix()] = points;
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.shared.live.lock().unwrap().len()
    }

    /// Cut every live connection now.
    pub fn cut_all(&self) {
        for l in self.shared.live.lock().unwrap().iter() {
            l.cut(&self.shared.stats);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        self.cut_all();
    }
}

/// Wait while the plan says every link is silent (`Plan::stall_until`), or until `live` is cut.
fn silent_until_over(sh: &Shared, live: &Live) {
    loop {
        let until = sh.plan().stall_until;
        match until {
            Some(t) if t > Instant::now() && !live.is_cut() => {
                nap((t - Instant::now()).min(Duration::from_millis(50)), live)
            }
            _ => break,
        }
    }
}

fn serve(client: TcpStream, upstream: SocketAddr, n: usize, sh: Arc<Shared>) {
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(10)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    sh.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let live = Arc::new(Live {
        client: c2,
        server: s2,
        cut: AtomicBool::new(false),
    });
    sh.live.lock().unwrap().push(live.clone());
    let pumps = [
        (Dir::Up, client.try_clone(), server.try_clone()),
        (Dir::Down, server.try_clone(), client.try_clone()),
    ];
    let mut threads = Vec::new();
    for (d, from, to) in pumps {
        let (Ok(from), Ok(to)) = (from, to) else {
            live.cut(&sh.stats);
            continue;
        };
        let (sh, live) = (sh.clone(), live.clone());
        threads.push(thread::spawn(move || pump(d, from, to, n, &sh, &live)));
    }
    for t in threads {
        let _ = t.join();
    }
    sh.live.lock().unwrap().retain(|l| !Arc::ptr_eq(l, &live));
}

enum Msg {
    /// Bytes to send when due.
    Data(Instant, Vec<u8>),
    /// Cut the connection once what came before is sent.
    Cut,
}

/// Sleep `t`, in slices, returning early once the connection is cut.
fn nap(t: Duration, live: &Live) {
    let end = Instant::now() + t;
    while !live.is_cut() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Forward one direction: read from `from`, queue with a due time, write to `to` in a second
/// thread.
fn pump(
    d: Dir,
    mut from: TcpStream,
    mut to: TcpStream,
    n: usize,
    sh: &Arc<Shared>,
    live: &Arc<Live>,
) {
    let (tx, rx) = mpsc::channel::<Msg>();
    let writer = {
        let (sh, live) = (sh.clone(), live.clone());
        thread::spawn(move || {
            for m in rx {
                match m {
                    Msg::Data(due, buf) => {
                        let now = Instant::now();
                        if due > now {
                            nap(due - now, &live);
                        }
                        // A silent link holds what is already queued too, not only what is
                        // read from now on.
                        silent_until_over(&sh, &live);
                        if live.is_cut() || to.write_all(&buf).is_err() {
                            break;
                        }
                        let counter = match d {
                            Dir::Up => &sh.stats.up,
                            Dir::Down => &sh.stats.down,
                        };
                        counter.fetch_add(buf.len() as u64, Ordering::Relaxed);
                        let bps = sh.plan().rules(n, d).bytes_per_sec;
                        if let Some(bps) = bps.filter(|&b| b > 0) {
                            nap(
                                Duration::from_nanos(buf.len() as u64 * 1_000_000_000 / bps),
                                &live,
                            );
                        }
                    }
                    Msg::Cut => {
                        live.cut(&sh.stats);
                        break;
                    }
                }
            }
            // The reader saw the end of its side: pass the half-close on.
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    let mut passed = 0u64;
    let mut stalled = false;
    let mut buf = vec![0u8; 16 << 10];
    'read: loop {
        let k = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        let mut chunk = &buf[..k];
        // A silent link: hold everything until the stall ends.
        silent_until_over(sh, live);
        let rules = sh.plan().rules(n, d).clone();
        // Points counted over all connections: forward up to each, then cut or stall there.
        loop {
            let ev = sh.plan().take_total_event(d, chunk.len());
            let Some((first, ev)) = ev else { break };
            if first > 0 {
                let _ = tx.send(Msg::Data(
                    Instant::now() + rules.latency,
                    chunk[..first].to_vec(),
                ));
            }
            passed += first as u64;
            chunk = &chunk[first..];
            match ev {
                Event::Cut => {
                    let _ = tx.send(Msg::Cut);
                    break 'read;
                }
                Event::Stall(t) => {
                    sh.stats.stalls.fetch_add(1, Ordering::Relaxed);
                    nap(t, live);
                }
            }
        }
        let due = || Instant::now() + rules.latency;
        if let Some((at, t)) = rules.stall_after
            && !stalled
            && passed + chunk.len() as u64 >= at
        {
            let first = (at.saturating_sub(passed) as usize).min(chunk.len());
            if first > 0 && tx.send(Msg::Data(due(), chunk[..first].to_vec())).is_err() {
                break;
            }
            passed += first as u64;
            chunk = &chunk[first..];
            stalled = true;
            sh.stats.stalls.fetch_add(1, Ordering::Relaxed);
            nap(t, live);
        }
        if let Some(cut) = rules.cut_after
            && passed + chunk.len() as u64 >= cut
        {
            let first = (cut.saturating_sub(passed) as usize).min(chunk.len());
            if first > 0 {
                let _ = tx.send(Msg::Data(due(), chunk[..first].to_vec()));
            }
            let _ = tx.send(Msg::Cut);
            break 'read;
        }
        if !chunk.is_empty() {
            passed += chunk.len() as u64;
            if tx.send(Msg::Data(due(), chunk.to_vec())).is_err() {
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}
