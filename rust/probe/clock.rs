//! Clock readings. The monotonic clock goes through the vDSO (~30 ns, no syscall);
//! the thread CPU clock is a syscall (~700 ns here) but exact to the nanosecond, unlike
//! getrusage's CPU fields, which only move at scheduler ticks.

#[inline]
fn read_clock(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; both clocks exist on every supported kernel.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// Nanoseconds on the monotonic clock (arbitrary origin).
#[inline]
pub fn monotonic_ns() -> u64 {
    read_clock(libc::CLOCK_MONOTONIC)
}

/// CPU nanoseconds consumed by the calling thread (user + system), exact.
#[inline]
pub fn thread_cpu_ns() -> u64 {
    read_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time one thread-CPU-clock reading charges to the thread itself: the smallest
/// difference seen between two back-to-back readings. A call's CPU delta spans about one
/// such reading, so it is subtracted from every delta; taking the minimum of many tries
/// never removes more than the reading really costs.
pub fn thread_cpu_read_cost_ns() -> u64 {
    static COST: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *COST.get_or_init(|| {
        (0..200)
            .map(|_| {
                let first = thread_cpu_ns();
                thread_cpu_ns().saturating_sub(first)
            })
            .min()
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_never_goes_back() {
        let mut last = monotonic_ns();
        for _ in 0..10_000 {
            let now = monotonic_ns();
            assert!(now >= last);
            last = now;
        }
    }

    #[test]
    fn thread_cpu_tracks_a_busy_loop_and_not_a_sleep() {
        let start = thread_cpu_ns();
        let wall = monotonic_ns();
        let mut x = 0u64;
        while monotonic_ns() - wall < 20_000_000 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let busy = thread_cpu_ns() - start;
        let elapsed = monotonic_ns() - wall;
        // A 20 ms busy loop is mostly on-CPU, but other processes may share the cores:
        // require a clear share of it, and never more CPU than wall time.
        assert!(busy >= 2_000_000, "busy loop got {busy} ns of CPU");
        assert!(
            busy <= elapsed + 1_000_000,
            "{busy} ns of CPU in {elapsed} ns"
        );

        let before_sleep = thread_cpu_ns();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let slept = thread_cpu_ns() - before_sleep;
        assert!(slept < 2_000_000, "a 30 ms sleep used {slept} ns of CPU");
    }
}
