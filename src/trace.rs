//! Phase timings for finding where time goes: with `KLOSET_TRACE=1` in the environment, every
//! [`span`] prints its name, when it started (milliseconds since the process started) and how
//! long it took to standard error when it ends. Without the variable a span costs one
//! relaxed atomic load. These are for people measuring (docs/PERFORMANCE.md), not for scripts.

use std::sync::OnceLock;
use std::time::Instant;

fn start() -> Option<Instant> {
    static START: OnceLock<Option<Instant>> = OnceLock::new();
    *START.get_or_init(|| {
        std::env::var_os("KLOSET_TRACE")
            .filter(|v| !v.is_empty() && v != "0")
            .map(|_| Instant::now())
    })
}

/// Start tracing now if `KLOSET_TRACE` is set (so times count from the process start).
pub fn init() {
    let _ = start();
}

/// Print `what()` as a trace line when tracing is on (a count, not a timing).
pub fn note(what: impl FnOnce() -> String) {
    if let Some(t0) = start() {
        eprintln!(
            "trace: {:8.1} ms              {}",
            t0.elapsed().as_secs_f64() * 1000.0,
            what()
        );
    }
}

/// A timed phase; prints on drop when tracing is on.
pub struct Span {
    name: &'static str,
    began: Option<Instant>,
}

/// Time the phase `name` until the returned guard is dropped.
pub fn span(name: &'static str) -> Span {
    Span {
        name,
        began: start().map(|_| Instant::now()),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let (Some(t0), Some(b)) = (start(), self.began) {
            eprintln!(
                "trace: {:>7.1} ms +{:>7.1} ms  {}",
                (b - t0).as_secs_f64() * 1e3,
                b.elapsed().as_secs_f64() * 1e3,
                self.name
            );
        }
    }
}
