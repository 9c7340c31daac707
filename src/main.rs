//! The `kloset` binary: everything happens in `kloset::cli`.

fn main() {
    kloset::trace::init();
    tune_malloc();
    std::process::exit(kloset::cli::main());
}

/// Serve allocations of 1 MiB and more (chunks, packs, ranges) straight from mmap.
///
/// glibc raises its mmap threshold each time such a buffer is freed, after which chunk-sized
/// buffers come from per-thread arenas that fragment and never shrink: measured on a backup of
/// /usr/share, peak RSS fell from 151 MB to 97 MB and wall time from 6.0 s to 4.2 s with a
/// fixed threshold.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists, and M_MMAP_THRESHOLD with a value below the 32 MiB maximum is always accepted.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
