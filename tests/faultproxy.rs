//! The fault-injecting proxy of tests/common/faultproxy.rs against a trivial echo server:
//! plain forwarding, latency, bandwidth, cuts, stalls, refusals, per-connection rules, seeds.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::faultproxy::{Dir, Plan, Proxy, Rng, Rules};

/// An echo server on 127.0.0.1:0 (one thread per connection), for the life of the test.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Send `data` (from another thread) and read everything back until the end.
fn echo(s: &TcpStream, data: Vec<u8>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let t = thread::spawn(move || {
        let _ = w.write_all(&data);
        let _ = w.shutdown(Shutdown::Write);
    });
    let mut out = Vec::new();
    let mut r = s.try_clone().unwrap();
    let _ = r.read_to_end(&mut out);
    t.join().unwrap();
    out
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn forwards_both_ways() {
    let p = Proxy::start(echo_server());
    let d = data(3 << 20);
    assert!(echo(&connect(&p), d.clone()) == d);
    assert_eq!(p.stats().bytes(Dir::Up), 3 << 20);
    assert_eq!(p.stats().bytes(Dir::Down), 3 << 20);
    assert_eq!((p.stats().accepted(), p.stats().cuts()), (1, 0));
}

#[test]
fn latency_is_added_each_way() {
    let p = Proxy::start(echo_server());
    p.plan().all = (
        Rules::latency(Duration::from_millis(150)),
        Rules::latency(Duration::from_millis(100)),
    );
    let mut s = connect(&p);
    let t = Instant::now();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    let rtt = t.elapsed();
    assert_eq!(&b, b"ping");
    assert!(rtt >= Duration::from_millis(250), "{rtt:?}");
    assert!(rtt < Duration::from_secs(3), "{rtt:?}");
}

#[test]
fn bandwidth_is_capped() {
    let p = Proxy::start(echo_server());
    p.plan().all.1 = Rules {
        bytes_per_sec: Some(1 << 20),
        ..Rules::default()
    };
    let t = Instant::now();
    let d = data(512 << 10);
    assert!(echo(&connect(&p), d.clone()) == d);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(450), "{took:?}");
}

#[test]
fn cut_after_exactly_n_bytes() {
    let p = Proxy::start(echo_server());
    // Down: what the client receives is exactly the first 10,000 bytes. (Cut up, the echo's
    // reply would come after the cut and never arrive.)
    p.plan().all.1 = Rules::cut_after(10_000);
    let out = echo(&connect(&p), data(100_000));
    assert_eq!(out.len(), 10_000);
    assert!(out == data(10_000));
    assert_eq!(p.stats().cuts(), 1);
    // Only that connection: the rule holds for the next too, each cut at its own 10,000.
    assert_eq!(echo(&connect(&p), data(50_000)).len(), 10_000);
    assert_eq!(p.stats().cuts(), 2);
    p.plan().all = (Rules::cut_after(10_000), Rules::default());
    assert!(echo(&connect(&p), data(100_000)).len() <= 10_000);
    // Up, the first two connections carry what the client wrote before the cut down closed
    // them (all of it, or less when the close came first: it varied under load in CI), the
    // third exactly its 10,000 bytes.
    let up = p.stats().bytes(Dir::Up);
    assert!(
        (10_000 + 10_000..=100_000 + 50_000 + 10_000).contains(&up),
        "{up} bytes up"
    );
}

#[test]
fn stall_holds_data_without_closing() {
    let p = Proxy::start(echo_server());
    p.plan().all.1 = Rules::stall_after(3, Duration::from_millis(1200));
    let mut s = connect(&p);
    let t = Instant::now();
    s.write_all(b"abcdef").unwrap();
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"abc");
    assert!(t.elapsed() < Duration::from_millis(800));
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"def");
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    // Still open, and no second stall.
    let t = Instant::now();
    s.write_all(b"xyz").unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"xyz");
    assert!(t.elapsed() < Duration::from_millis(800));
    assert_eq!((p.stats().stalls(), p.stats().cuts()), (1, 0));
}

#[test]
fn a_silent_link_for_all_connections_then_back() {
    let p = Proxy::start(echo_server());
    let mut s = connect(&p);
    s.write_all(b"1").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    p.plan().stall_until = Some(Instant::now() + Duration::from_secs(1));
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.write_all(b"2").unwrap();
    assert!(s.read_exact(&mut b).is_err(), "data passed a silent link");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"2");
}

#[test]
fn refuses_then_accepts_again() {
    let p = Proxy::start(echo_server());
    p.plan().refuse = true;
    let mut s = connect(&p);
    let _ = s.write_all(b"x");
    let mut b = Vec::new();
    let _ = s.read_to_end(&mut b);
    assert!(b.is_empty());
    assert_eq!(p.stats().refused(), 1);
    p.plan().refuse = false;
    assert_eq!(echo(&connect(&p), b"ok".to_vec()), b"ok");
}

#[test]
fn rules_per_connection_and_cut_all() {
    let p = Proxy::start(echo_server());
    p.plan()
        .per_conn
        .insert(1, (Rules::default(), Rules::cut_after(100)));
    let a = connect(&p);
    // Connections are numbered in accept order: make sure `a` is number 0.
    assert_eq!(echo(&a, data(1000)).len(), 1000);
    assert_eq!(echo(&connect(&p), data(1000)).len(), 100);
    assert_eq!(echo(&connect(&p), data(1000)).len(), 1000);
    let mut s = connect(&p);
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    // The links of the finished echoes close as their threads see the ends: under load that
    // can come after this point, and `cut_all` would count them too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while p.live() > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(p.live(), 1, "only the last connection is still open");
    p.cut_all();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert_eq!(p.stats().cuts(), 2);
}

#[test]
fn cuts_counted_over_all_connections() {
    let p = Proxy::start(echo_server());
    p.cut_at_totals(Dir::Down, vec![1500, 2600]);
    // 1000 bytes each, counted as they pass: the second connection carries byte 1500 (and
    // stops there), the fourth byte 2600.
    let got: Vec<usize> = (0..4)
        .map(|_| echo(&connect(&p), data(1000)).len())
        .collect();
    assert_eq!(got, vec![1000, 500, 1000, 100]);
    assert_eq!(p.stats().cuts(), 2);
}

#[test]
fn stalls_counted_over_all_connections() {
    let p = Proxy::start(echo_server());
    p.stall_at_totals(Dir::Down, vec![(1500, Duration::from_millis(800))]);
    let t = Instant::now();
    assert_eq!(echo(&connect(&p), data(1000)).len(), 1000);
    assert!(t.elapsed() < Duration::from_millis(600));
    // The second connection carries byte 1500: it waits, then everything arrives.
    let t = Instant::now();
    assert!(echo(&connect(&p), data(1000)) == data(1000));
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    assert_eq!((p.stats().stalls(), p.stats().cuts()), (1, 0));
}

#[test]
fn seeds_repeat() {
    let a: Vec<u64> = {
        let mut r = Rng::new(42);
        (0..5).map(|_| r.range(1000, 2000)).collect()
    };
    let mut r = Rng::new(42);
    assert_eq!(a, (0..5).map(|_| r.range(1000, 2000)).collect::<Vec<_>>());
    assert!(a.iter().all(|&x| (1000..2000).contains(&x)));
    assert_ne!(a, {
        let mut r = Rng::new(43);
        (0..5).map(|_| r.range(1000, 2000)).collect::<Vec<_>>()
    });
    let _ = Plan::default();
}
