//! What one series holds: a call series (operation + attributes) keeps a duration
//! histogram and, once a call of it is probed, one histogram per probe measure; custom
//! instruments keep one histogram or one counter.
//!
//! Every series carries the epoch its values belong to ([`Liveness`]): after a reset or a
//! fork its values read as empty, and its first record clears them.

use super::attributes::AttributeSet;
use super::epoch::Liveness;
use super::exemplars::ExemplarSlots;
use super::histogram::AtomicHistogram;
use super::lazy::LazyBox;
use super::series_map::SeriesData;
use crate::probe::{fork, measure, Delta, DURATION, MEASURES};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

type ProbeHistograms = [AtomicHistogram; measure::COUNT];

pub struct CallSeries {
    attributes: AttributeSet,
    liveness: Liveness,
    pub duration: AtomicHistogram,
    /// The probe measures' histograms, allocated by the first probed call: a timer-only
    /// series never pays for them.
    probes: LazyBox<ProbeHistograms>,
    /// Traced calls' durations with their trace and span (only while tracing is on).
    pub exemplars: ExemplarSlots,
    pub active: ActiveCalls,
}

/// Calls of a series in flight in this process (counted only while an exporter wants
/// `meterage.calls.active`). Not data of an epoch: a reset leaves calls in flight as they
/// are. A forked child starts counting from zero (its parent's calls are not its own),
/// without writing to the series until it counts a call of its own.
#[derive(Default)]
pub struct ActiveCalls {
    count: AtomicI64,
    /// The fork generation `count` belongs to.
    generation: AtomicU64,
    /// Whether in-flight calls were ever counted here (only such series export them).
    tracked: AtomicBool,
}

impl ActiveCalls {
    /// A call starts.
    #[inline(always)]
    pub fn enter(&self, generation: u64) {
        if self.generation.load(Ordering::Relaxed) != generation {
            self.restart(generation);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        if !self.tracked.load(Ordering::Relaxed) {
            self.tracked.store(true, Ordering::Relaxed);
        }
    }

    #[cold]
    fn restart(&self, generation: u64) {
        // A child's first call: the count it inherited is its parent's.
        self.count.store(0, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
    }

    /// A call that started in fork `generation` ends (one that started before a fork is
    /// the parent's, and the parent counts its end).
    #[inline(always)]
    pub fn leave(&self, generation: u64) {
        if self.generation.load(Ordering::Relaxed) == generation {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Calls in flight as the owner counted them, or None if never counted (a process
    /// group's reader of another member's series, which has no fork generation to check).
    pub fn counted(&self) -> Option<i64> {
        self.tracked
            .load(Ordering::Relaxed)
            .then(|| self.count.load(Ordering::Relaxed).max(0))
    }

    /// Calls in flight now, or None if they were never counted here.
    pub fn now(&self) -> Option<i64> {
        if !self.tracked.load(Ordering::Relaxed) {
            return None;
        }
        if self.generation.load(Ordering::Relaxed) != fork::generation() {
            return Some(0);
        }
        Some(self.count.load(Ordering::Relaxed).max(0))
    }
}

impl SeriesData for CallSeries {
    fn new(attributes: AttributeSet, liveness: Liveness) -> Self {
        CallSeries {
            attributes,
            liveness,
            duration: AtomicHistogram::new(),
            probes: LazyBox::new(),
            exemplars: ExemplarSlots::default(),
            active: ActiveCalls {
                generation: AtomicU64::new(fork::generation()),
                ..ActiveCalls::default()
            },
        }
    }
    fn attributes(&self) -> &AttributeSet {
        &self.attributes
    }
    fn liveness(&self) -> &Liveness {
        &self.liveness
    }
    fn clear(&self) {
        self.duration.reset();
        if let Some(probes) = self.probes() {
            probes.iter().for_each(AtomicHistogram::reset);
        }
        self.exemplars.reset();
    }
}

impl CallSeries {
    /// The probe histograms, if a call was ever probed here.
    pub fn probes(&self) -> Option<&ProbeHistograms> {
        self.probes.get()
    }

    /// The probe histograms read through another mapping (see `LazyBox::get_shifted`).
    ///
    /// # Safety
    /// As `LazyBox::get_shifted`.
    pub unsafe fn probes_shifted(&self, shift: isize) -> Option<&ProbeHistograms> {
        // SAFETY: the caller's contract.
        unsafe { self.probes.get_shifted(shift) }
    }

    /// One probe measure's histogram, if a call was ever probed here.
    pub fn probe(&self, index: usize) -> Option<&AtomicHistogram> {
        self.probes().map(|probes| &probes[index])
    }

    /// Records one call: its wall time, and the probe deltas when the call was sampled.
    /// `weight` is 1 / (the probability the call had of being sampled).
    #[inline]
    pub fn record(&self, duration_ns: u64, sample: Option<(&Delta, f64)>) {
        self.liveness.ensure_current(|| self.clear());
        self.record_current(duration_ns, sample);
    }

    /// As [`record`](Self::record), into a series known to belong to the current epoch
    /// (`MeterCore::series` gives one).
    #[inline]
    pub fn record_current(&self, duration_ns: u64, sample: Option<(&Delta, f64)>) {
        self.duration.record(duration_ns as f64 * DURATION.factor);
        if let Some((delta, weight)) = sample {
            let probes = self
                .probes
                .get_or_init(|| std::array::from_fn(|_| AtomicHistogram::new()));
            for (index, info) in MEASURES.iter().enumerate() {
                if delta.has(index) {
                    probes[index].record_weighted(delta.values[index] as f64 * info.factor, weight);
                }
            }
        }
    }

    /// Whether the series holds no call of the current epoch.
    pub fn is_empty(&self) -> bool {
        !self.liveness.is_current() || self.duration.is_empty()
    }

    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>() - std::mem::size_of::<AtomicHistogram>()
            + self.duration.memory_bytes()
            + self.exemplars.memory_bytes()
            + self.probes().map_or(0, |probes| {
                probes
                    .iter()
                    .map(AtomicHistogram::memory_bytes)
                    .sum::<usize>()
            })
    }
}

pub struct HistogramSeries {
    attributes: AttributeSet,
    liveness: Liveness,
    pub histogram: AtomicHistogram,
}

impl SeriesData for HistogramSeries {
    fn new(attributes: AttributeSet, liveness: Liveness) -> Self {
        HistogramSeries {
            attributes,
            liveness,
            histogram: AtomicHistogram::new(),
        }
    }
    fn attributes(&self) -> &AttributeSet {
        &self.attributes
    }
    fn liveness(&self) -> &Liveness {
        &self.liveness
    }
    fn clear(&self) {
        self.histogram.reset();
    }
}

impl HistogramSeries {
    #[inline]
    pub fn record(&self, value: f64) {
        self.liveness.ensure_current(|| self.clear());
        self.histogram.record(value);
    }

    /// Whether the series holds no value of the current epoch.
    pub fn is_empty(&self) -> bool {
        !self.liveness.is_current() || self.histogram.is_empty()
    }
}

/// A monotonic sum. f64 so that fractional amounts add up; integers stay exact to 2^53;
/// the total saturates at `f64::MAX` rather than become infinite.
pub struct CounterSeries {
    attributes: AttributeSet,
    liveness: Liveness,
    total_bits: AtomicU64,
    /// How many times `add` was called (a counter at 0 after `add(0)` still exists).
    touched: AtomicU64,
}

impl SeriesData for CounterSeries {
    fn new(attributes: AttributeSet, liveness: Liveness) -> Self {
        CounterSeries {
            attributes,
            liveness,
            total_bits: AtomicU64::new(0f64.to_bits()),
            touched: AtomicU64::new(0),
        }
    }
    fn attributes(&self) -> &AttributeSet {
        &self.attributes
    }
    fn liveness(&self) -> &Liveness {
        &self.liveness
    }
    fn clear(&self) {
        self.total_bits.store(0f64.to_bits(), Ordering::Relaxed);
        self.touched.store(0, Ordering::Relaxed);
    }
}

impl CounterSeries {
    #[inline]
    pub fn add(&self, amount: f64) {
        self.liveness.ensure_current(|| self.clear());
        let mut current = self.total_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + amount).min(f64::MAX).to_bits();
            match self.total_bits.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.touched.fetch_add(1, Ordering::Relaxed);
    }

    /// The total and the number of adds, whatever their epoch (a process group's reader
    /// checks the epoch itself).
    pub fn raw(&self) -> (f64, u64) {
        (
            f64::from_bits(self.total_bits.load(Ordering::Relaxed)),
            self.touched.load(Ordering::Relaxed),
        )
    }

    /// The total of the current epoch.
    pub fn value(&self) -> f64 {
        if !self.liveness.is_current() {
            return 0.0;
        }
        f64::from_bits(self.total_bits.load(Ordering::Relaxed))
    }

    /// How many times `add` was called in the current epoch.
    pub fn adds(&self) -> u64 {
        if !self.liveness.is_current() {
            return 0;
        }
        self.touched.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.adds() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_call_records_duration_and_sampled_probes() {
        let series = CallSeries::new(AttributeSet::empty(), Liveness::standalone());
        let mut delta = Delta::default();
        delta.set(measure::CPU_TIME, 2_000_000);
        delta.set(measure::index("io.read"), 4096);
        series.record(5_000_000, Some((&delta, 1.0)));
        series.record(7_000_000, None);

        let duration = series.duration.snapshot();
        assert_eq!(duration.count, 2);
        assert!((duration.sum - 0.012).abs() < 1e-12);
        let cpu = series.probe(measure::CPU_TIME).unwrap().snapshot();
        assert_eq!(cpu.count, 1);
        assert!((cpu.sum - 0.002).abs() < 1e-12);
        assert_eq!(
            series
                .probe(measure::index("io.read"))
                .unwrap()
                .snapshot()
                .sum,
            4096.0
        );
        // Probes not read are not recorded, not even as zero.
        assert_eq!(
            series
                .probe(measure::index("paging.faults.minor"))
                .unwrap()
                .snapshot()
                .count,
            0
        );
    }

    #[test]
    fn a_timer_only_series_has_no_probe_histograms_and_stays_small() {
        let series = CallSeries::new(AttributeSet::empty(), Liveness::standalone());
        for i in 0..1000u64 {
            series.record(20_000 + i * 20, None); // 20-40 us: a typical spread
        }
        assert!(series.probes().is_none());
        assert!(series.memory_bytes() <= 2048, "{}", series.memory_bytes());
    }

    #[test]
    fn sums_saturate_rather_than_become_infinite() {
        let counter = CounterSeries::new(AttributeSet::empty(), Liveness::standalone());
        counter.add(1.7e308);
        counter.add(1.7e308);
        assert_eq!(counter.value(), f64::MAX);
        let histogram = HistogramSeries::new(AttributeSet::empty(), Liveness::standalone());
        histogram.record(1.7e308);
        histogram.record(1.7e308);
        assert_eq!(histogram.histogram.snapshot().sum, f64::MAX);
    }

    #[test]
    fn weights_give_an_estimated_total() {
        let series = CallSeries::new(AttributeSet::empty(), Liveness::standalone());
        let mut delta = Delta::default();
        delta.set(measure::index("io.write"), 100);
        series.record(1, Some((&delta, 4.0)));
        let write = series.probe(measure::index("io.write")).unwrap().snapshot();
        assert_eq!(write.sum, 100.0);
        assert_eq!(write.estimated_sum(), 400.0);
    }

    #[test]
    fn counters_add_exactly_across_threads() {
        let counter = Arc::new(CounterSeries::new(
            AttributeSet::empty(),
            Liveness::standalone(),
        ));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || (0..50_000).for_each(|_| counter.add(1.0)))
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(counter.value(), 200_000.0);
        assert_eq!(counter.adds(), 200_000);
        counter.clear();
        assert!(counter.is_empty());
    }
}
