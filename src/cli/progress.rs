//! Progress bars on stderr (indicatif), fed by polling the engine's atomic counters.
//!
//! The engine only counts; a [`Bar`] samples the counters ten times a second from its own
//! thread, so no pipeline ever waits on the terminal. Bars are drawn only when stderr is a
//! terminal and `-quiet` is not given.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bar {
    /// Start a byte-counting bar; `sample` returns (done, total) and is called from the bar's
    /// thread. Returns an inert bar when `show` is false.
    pub fn bytes<F>(show: bool, label: &'static str, sample: F) -> Bar
    where
        F: Fn() -> (u64, u64) + Send + 'static,
    {
        Self::start(
            show,
            label,
            "{msg:>9} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}",
            sample,
        )
    }

    /// A bar counting items.
    pub fn items<F>(show: bool, label: &'static str, sample: F) -> Bar
    where
        F: Fn() -> (u64, u64) + Send + 'static,
    {
        Self::start(
            show,
            label,
            "{msg:>9} [{elapsed_precise}] {wide_bar} {pos}/{len}",
            sample,
        )
    }

    fn start<F>(show: bool, label: &'static str, template: &str, sample: F) -> Bar
    where
        F: Fn() -> (u64, u64) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        if !show {
            return Bar { stop, thread: None };
        }
        let pb = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style);
        }
        pb.set_message(label);
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (done, total) = sample();
                pb.set_length(total.max(done));
                pb.set_position(done);
                std::thread::sleep(Duration::from_millis(100));
            }
            pb.finish_and_clear();
        });
        Bar {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
