//! Which calls run the probes.
//!
//! Every call is counted and timed; the probes (microseconds of syscalls) run on every
//! call at `sample = 1.0`, on a fixed random fraction at `sample = p`, or by default on an
//! adaptive fraction that keeps their cost under a budget: a share of the operation's own
//! wall time (the readings' measured cost times [`PROBE_COST_FACTOR`] for the cache misses
//! they cause). The decision is a coin flip made before the call, independent of the call's
//! own cost, so the probed calls are an unbiased sample; each records the weight 1/p it
//! was drawn with, so sampled totals can be estimated without bias (Horvitz-Thompson)
//! even while p adapts.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Share of an operation's wall time the probes may cost by default.
pub const DEFAULT_BUDGET: f64 = 0.01;
/// The adaptive rate never drops below this, so probes keep reporting on very cheap
/// operations (at 2^-16 a 5 µs probe costs under 0.1 ns per call).
pub const MIN_RATE: f64 = 1.0 / 65536.0;
/// The smallest fixed probing rate or budget a meter takes: a call probed at rate p weighs
/// 1/p in estimated totals, and below one in a million a few probed calls would stand for
/// more calls than a process makes.
pub const MIN_SAMPLE: f64 = 1e-6;
/// Weight of each new observation in the moving averages of wall time and probe cost.
const SMOOTHING: f64 = 1.0 / 8.0;
const ALWAYS: u64 = u64::MAX;
/// The probe readings leave caches cold, so a probed call costs more than the readings
/// themselves, and the calls after it run slower too: on a ~8 µs pure-Python function
/// probed at a fixed 5%, each probed call cost the application 4.9 µs against 1.95 µs of
/// readings (2.5x; 1.2-1.5x on the same machines a month before). The budget is charged
/// three times the readings, so the probes stay inside it.
pub const PROBE_COST_FACTOR: f64 = 3.0;
const OUTLIER_LIMIT: f64 = 4.0;

static GLOBAL_BUDGET_BITS: AtomicU64 = AtomicU64::new(0x3F84_7AE1_47AE_147B); // 0.01

pub fn set_global_budget(budget: f64) {
    GLOBAL_BUDGET_BITS.store(budget.to_bits(), Ordering::Relaxed);
}

pub fn global_budget() -> f64 {
    f64::from_bits(GLOBAL_BUDGET_BITS.load(Ordering::Relaxed))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplingMode {
    /// Probe each call with this fixed probability in (0, 1].
    Fixed(f64),
    /// Adapt the probability to stay within this share of wall time (`None`: the global
    /// budget, read each time the rate is recomputed).
    Budget(Option<f64>),
}

pub struct Sampler {
    mode: SamplingMode,
    /// Probability scaled to 2^64; `u64::MAX` means every call.
    threshold: AtomicU64,
    mean_wall_ns: AtomicU64,
    mean_probe_cost_ns: AtomicU64,
    warmed_up: AtomicBool,
}

thread_local! {
    static RNG_STATE: Cell<u64> = const { Cell::new(0) };
}

/// xorshift64*: a few ns, statistically fine for coin flips, per thread so no sharing.
#[inline]
fn next_random() -> u64 {
    RNG_STATE
        .try_with(|state| {
            let mut x = state.get();
            if x == 0 {
                x = seed();
            }
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            state.set(x);
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        })
        .unwrap_or(0)
}

/// Gives the calling thread a new random stream: after a fork, so that sibling workers do
/// not all probe the same calls.
pub fn reseed_thread() {
    let _ = RNG_STATE.try_with(|state| state.set(seed()));
}

fn seed() -> u64 {
    let local = 0u8;
    // SAFETY: getpid has no preconditions.
    let pid = u64::from(unsafe { libc::getpid() }.unsigned_abs());
    let mixed = (&local as *const u8 as u64)
        ^ crate::probe::monotonic_ns().rotate_left(32)
        ^ pid.rotate_left(17);
    // splitmix64 finaliser, so nearby seeds give unrelated streams; never zero.
    let mut z = mixed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

fn rate_to_threshold(rate: f64) -> u64 {
    if rate >= 1.0 {
        ALWAYS
    } else {
        (rate * 18_446_744_073_709_551_616.0) as u64
    }
}

impl Sampler {
    pub fn new(mode: SamplingMode) -> Self {
        let initial = match mode {
            SamplingMode::Fixed(rate) => rate,
            SamplingMode::Budget(_) => 1.0,
        };
        Sampler {
            mode,
            threshold: AtomicU64::new(rate_to_threshold(initial)),
            mean_wall_ns: AtomicU64::new(0f64.to_bits()),
            mean_probe_cost_ns: AtomicU64::new(0f64.to_bits()),
            warmed_up: AtomicBool::new(false),
        }
    }

    pub fn mode(&self) -> SamplingMode {
        self.mode
    }

    /// The current probability of probing a call.
    pub fn rate(&self) -> f64 {
        match self.threshold.load(Ordering::Relaxed) {
            ALWAYS => 1.0,
            threshold => threshold as f64 / 18_446_744_073_709_551_616.0,
        }
    }

    /// Decides, before the call, whether to probe it. Returns the call's weight (1/p).
    #[inline]
    pub fn decide(&self) -> Option<f64> {
        let threshold = self.threshold.load(Ordering::Relaxed);
        if threshold == ALWAYS {
            return Some(1.0);
        }
        (next_random() < threshold).then(|| 18_446_744_073_709_551_616.0 / threshold.max(1) as f64)
    }

    /// Whether `observe` has any use: only the adaptive mode learns from sampled calls.
    #[inline]
    pub fn is_adaptive(&self) -> bool {
        matches!(self.mode, SamplingMode::Budget(_))
    }

    /// Feeds one probed call (its wall time and what its probe readings cost) into the
    /// adaptive rate. Probed calls are a random sample, so their mean wall time is an
    /// unbiased estimate of all calls'. Races between threads only drop an update.
    pub fn observe(&self, wall_ns: u64, probe_cost_ns: u64) {
        let SamplingMode::Budget(budget) = self.mode else {
            return;
        };
        if !self.warmed_up.load(Ordering::Relaxed) {
            // A meter's first probed call pays one-time setup (a thread opening its
            // /proc descriptor): not what probing costs from then on.
            self.warmed_up.store(true, Ordering::Relaxed);
            return;
        }
        let wall = smooth(&self.mean_wall_ns, wall_ns as f64);
        let cost = smooth(&self.mean_probe_cost_ns, probe_cost_ns as f64);
        let budget = budget.unwrap_or_else(global_budget);
        let rate = if cost <= 0.0 {
            1.0
        } else {
            (budget * wall / (cost * PROBE_COST_FACTOR)).clamp(MIN_RATE, 1.0)
        };
        // Store only a change: every call reads this cache line.
        let threshold = rate_to_threshold(rate);
        if self.threshold.load(Ordering::Relaxed) != threshold {
            self.threshold.store(threshold, Ordering::Relaxed);
        }
    }

    /// Mean wall time and probe cost of recent probed calls (nanoseconds).
    pub fn means(&self) -> (f64, f64) {
        (
            f64::from_bits(self.mean_wall_ns.load(Ordering::Relaxed)),
            f64::from_bits(self.mean_probe_cost_ns.load(Ordering::Relaxed)),
        )
    }
}

/// Moving average; one observation can move it at most to `OUTLIER_LIMIT` times its value,
/// so a rare stall (a new thread's first reading, a preemption) does not swing the rate.
fn smooth(slot: &AtomicU64, sample: f64) -> f64 {
    let previous = f64::from_bits(slot.load(Ordering::Relaxed));
    let next = if previous == 0.0 {
        sample
    } else {
        let sample = sample.min(previous * OUTLIER_LIMIT);
        previous + SMOOTHING * (sample - previous)
    };
    slot.store(next.to_bits(), Ordering::Relaxed);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_sampling_probes_every_call_with_weight_one() {
        let sampler = Sampler::new(SamplingMode::Fixed(1.0));
        assert!((0..1000).all(|_| sampler.decide() == Some(1.0)));
    }

    #[test]
    fn fixed_rate_probes_that_share_of_calls() {
        let sampler = Sampler::new(SamplingMode::Fixed(0.25));
        let draws = 200_000;
        let hits = (0..draws)
            .filter_map(|_| sampler.decide())
            .collect::<Vec<_>>();
        let share = hits.len() as f64 / draws as f64;
        // Binomial sd is ~0.001 here; 0.01 is ten of them.
        assert!((share - 0.25).abs() < 0.01, "share {share}");
        assert!(hits.iter().all(|&w| (w - 4.0).abs() < 1e-9));
    }

    #[test]
    fn budget_mode_converges_to_budget_times_wall_over_cost() {
        let sampler = Sampler::new(SamplingMode::Budget(Some(0.01)));
        assert_eq!(sampler.rate(), 1.0);
        for _ in 0..100 {
            // 1 ms calls, 3 µs of probes (charged 9 µs): 1% of 1 ms is 10 µs, every call fits.
            sampler.observe(1_000_000, 3_000);
        }
        assert_eq!(sampler.rate(), 1.0);
        for _ in 0..100 {
            // 10 µs calls: the budget is 100 ns per call; 5 µs readings count 15 µs.
            sampler.observe(10_000, 5_000);
        }
        let expected = 0.01 * 10_000.0 / (5_000.0 * PROBE_COST_FACTOR);
        assert!(
            (sampler.rate() - expected).abs() < 1e-4,
            "{}",
            sampler.rate()
        );
        for _ in 0..200 {
            sampler.observe(1, 5_000);
        }
        assert_eq!(sampler.rate(), MIN_RATE);
    }

    #[test]
    fn one_stall_does_not_swing_the_rate() {
        let sampler = Sampler::new(SamplingMode::Budget(Some(0.01)));
        for _ in 0..50 {
            sampler.observe(10_000, 5_000);
        }
        sampler.observe(10_000, 500_000);
        // The stall counts as at most 4x the usual cost: the rate drops by < 30%.
        let steady = 0.01 * 2.0 / PROBE_COST_FACTOR;
        assert!(sampler.rate() > steady * 0.7, "{}", sampler.rate());
    }

    #[test]
    fn global_budget_is_followed_when_none_is_set() {
        let sampler = Sampler::new(SamplingMode::Budget(None));
        sampler.observe(10_000_000, 5_000_000); // the first, setup-laden call is ignored
        assert_eq!(sampler.rate(), 1.0);
        sampler.observe(10_000, 5_000);
        let expected = global_budget() * 2.0 / PROBE_COST_FACTOR;
        assert!((sampler.rate() - expected).abs() < 1e-9);
    }
}
