//! Clock readings. The monotonic clock goes through the vDSO (~30 ns, no syscall);
//! the thread CPU clock is a syscall (~700 ns here) but exact to the nanosecond, unlike
//! getrusage's CPU fields, which only move at scheduler ticks.

use super::catalog::{Combine, Measure, Probe, ProbeInfo, Stage};

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

/// The `cpu` probe: the thread CPU clock around the call.
pub struct Cpu;

/// CPU seconds per call: hot paths spend microseconds, so the scale starts lower.
pub const CPU_BOUNDARIES: [f64; 15] = [
    1e-6, 1e-5, 1e-4, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Probe for Cpu {
    const INFO: ProbeInfo = ProbeInfo {
        name: "cpu",
        default: true,
        measures: &[Measure {
            key: "cpu.time",
            unit: "s",
            factor: 1e-9,
            combine: Combine::Sum,
            metric: "meterage.call.cpu.time",
            attributes: &[],
            description: "Thread CPU time of metered calls.",
            boundaries: &CPU_BOUNDARIES,
            source: "`CLOCK_THREAD_CPUTIME_ID` — exact to the ns (getrusage's CPU fields move only at scheduler ticks)",
        }],
    };
    const STAGE: Stage = Stage::Clock;
    const RAW: usize = 1;

    #[inline(always)]
    fn before(raw: &mut [u64]) -> bool {
        raw[0] = thread_cpu_ns();
        true
    }

    /// The difference, less what one reading of the clock charges to the thread.
    #[inline(always)]
    fn delta(end: &[u64], start: &[u64], out: &mut [u64]) -> u32 {
        out[0] = end[0]
            .saturating_sub(start[0])
            .saturating_sub(thread_cpu_read_cost_ns());
        1
    }

    fn availability() -> Option<String> {
        static CHECKED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        CHECKED.get_or_init(clock_availability).clone()
    }

    fn activate() -> Option<String> {
        // One-time calibration, here rather than inside the first probed call.
        thread_cpu_read_cost_ns();
        Self::availability()
    }
}

fn clock_availability() -> Option<String> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc != 0).then(|| {
        format!(
            "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed: {}",
            std::io::Error::last_os_error()
        )
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
