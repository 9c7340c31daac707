//! A latency proxy for `scripts/bench -rtt MS`: the tests' fault-injecting TCP proxy
//! (tests/common/faultproxy.rs) run on its own, forwarding every connection to an upstream
//! (the benchmark's sshd) with half the round trip added in each direction, so that kloset,
//! restic, rsync and OpenSSH's own tools are measured as if the server were across a network.
//! The machine has no `tc netem`, and the Python `scripts/latency-proxy` tops out near the
//! speeds being measured; this one's own ceiling is measured by `-ceiling`.
//!
//! ```text
//! cargo run --release --example latency-proxy -- 20 127.0.0.1:2222   # prints its port
//! cargo run --release --example latency-proxy -- -ceiling 2048        # MB/s, no delay
//! ```

#[path = "../tests/common/faultproxy.rs"]
mod faultproxy;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use faultproxy::{Proxy, Rules};

fn usage() -> ! {
    eprintln!(
        "usage: latency-proxy RTT_MS HOST:PORT   (listens on 127.0.0.1, prints its port)\n       latency-proxy -ceiling MIB            (throughput with no delay, direct and through the proxy)"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, mib] if flag == "-ceiling" => ceiling(mib.parse().unwrap_or_else(|_| usage())),
        [rtt, upstream] => {
            let rtt: f64 = rtt.parse().unwrap_or_else(|_| usage());
            let upstream: SocketAddr = upstream.parse().unwrap_or_else(|_| usage());
            if !(0.0..=10_000.0).contains(&rtt) {
                usage()
            }
            serve(Duration::from_secs_f64(rtt / 2000.0), upstream)
        }
        _ => usage(),
    }
}

fn serve(one_way: Duration, upstream: SocketAddr) -> ! {
    let p = Proxy::start(upstream);
    p.plan().all = (Rules::latency(one_way), Rules::latency(one_way));
    println!("{}", p.port());
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Push `mib` MiB through a TCP sink, directly and through a proxy with no delay, and print
/// both rates: the proxy must be far above what the benchmark moves through it.
fn ceiling(mib: u64) {
    let sink = TcpListener::bind("127.0.0.1:0").expect("bind a sink");
    let sink_addr = sink.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 1 << 16];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                let _ = s.write_all(b"k");
            });
        }
    });
    let proxy = Proxy::start(sink_addr);
    for (label, to) in [("direct", sink_addr), ("through the proxy", proxy.addr())] {
        let mut s = TcpStream::connect(to).expect("connect");
        let chunk = vec![0x5au8; 256 << 10];
        let t0 = Instant::now();
        for _ in 0..mib * 4 {
            s.write_all(&chunk).expect("write");
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).expect("the sink's answer");
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{label}: {mib} MiB in {secs:.2} s, {:.0} MB/s",
            (mib << 20) as f64 / secs / 1e6
        );
    }
}
