//! What one series holds: a call series (operation + attributes) keeps a duration
//! histogram and one histogram per probe measure; custom instruments keep one histogram
//! or one counter.

use super::attributes::AttributeSet;
use super::exemplars::ExemplarSlots;
use super::histogram::AtomicHistogram;
use super::series_map::SeriesData;
use crate::probe::{measure, Reading, DURATION, MEASURES};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

pub struct CallSeries {
    attributes: AttributeSet,
    pub duration: AtomicHistogram,
    pub probes: [AtomicHistogram; measure::COUNT],
    /// Traced calls' durations with their trace and span (only while tracing is on).
    pub exemplars: ExemplarSlots,
    /// Calls in flight (counted only while an exporter wants `meterage.calls.active`).
    pub active: AtomicI64,
    /// Whether in-flight calls were ever counted here (only such series export them).
    pub tracks_active: AtomicBool,
}

impl SeriesData for CallSeries {
    fn new(attributes: AttributeSet) -> Self {
        CallSeries {
            attributes,
            duration: AtomicHistogram::new(),
            probes: std::array::from_fn(|_| AtomicHistogram::new()),
            exemplars: ExemplarSlots::default(),
            active: AtomicI64::new(0),
            tracks_active: AtomicBool::new(false),
        }
    }
    fn attributes(&self) -> &AttributeSet {
        &self.attributes
    }
}

impl CallSeries {
    /// Records one call: its wall time, and the probe deltas when the call was sampled.
    /// `weight` is 1 / (the probability the call had of being sampled).
    #[inline]
    pub fn record(&self, duration_ns: u64, sample: Option<(&Reading, f64)>) {
        self.duration.record(duration_ns as f64 * DURATION.factor);
        if let Some((delta, weight)) = sample {
            for (index, info) in MEASURES.iter().enumerate() {
                if delta.probes.contains(info.probe) {
                    self.probes[index]
                        .record_weighted(delta.values[index] as f64 * info.factor, weight);
                }
            }
        }
    }

    pub fn reset(&self) {
        self.duration.reset();
        self.probes.iter().for_each(AtomicHistogram::reset);
        self.exemplars.reset();
        self.active.store(0, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.duration.is_empty()
    }

    /// Calls in flight now (never below zero: a reset or fork can race with ending calls).
    pub fn active_calls(&self) -> i64 {
        self.active.load(Ordering::Relaxed).max(0)
    }
}

pub struct HistogramSeries {
    attributes: AttributeSet,
    pub histogram: AtomicHistogram,
}

impl SeriesData for HistogramSeries {
    fn new(attributes: AttributeSet) -> Self {
        HistogramSeries {
            attributes,
            histogram: AtomicHistogram::new(),
        }
    }
    fn attributes(&self) -> &AttributeSet {
        &self.attributes
    }
}

/// A monotonic sum. f64 so that fractional amounts add up; integers stay exact to 2^53.
pub struct CounterSeries {
    attributes: AttributeSet,
    total_bits: AtomicU64,
    /// Whether anything was ever added (a counter at 0 after `add(0)` still exists).
    touched: AtomicU64,
}

impl SeriesData for CounterSeries {
    fn new(attributes: AttributeSet) -> Self {
        CounterSeries {
            attributes,
            total_bits: AtomicU64::new(0f64.to_bits()),
            touched: AtomicU64::new(0),
        }
    }
    fn attributes(&self) -> &AttributeSet {
        &self.attributes
    }
}

impl CounterSeries {
    #[inline]
    pub fn add(&self, amount: f64) {
        let mut current = self.total_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + amount).to_bits();
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

    pub fn value(&self) -> f64 {
        f64::from_bits(self.total_bits.load(Ordering::Relaxed))
    }

    /// How many times `add` was called.
    pub fn adds(&self) -> u64 {
        self.touched.load(Ordering::Relaxed)
    }

    pub fn reset(&self) {
        self.total_bits.store(0f64.to_bits(), Ordering::Relaxed);
        self.touched.store(0, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.adds() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProbeSet;
    use std::sync::Arc;

    #[test]
    fn a_call_records_duration_and_sampled_probes() {
        let series = CallSeries::new(AttributeSet::empty());
        let mut delta = Reading {
            probes: ProbeSet::CPU.union(ProbeSet::IO),
            ..Reading::default()
        };
        delta.values[measure::CPU_TIME] = 2_000_000;
        delta.values[measure::IO_READ] = 4096;
        series.record(5_000_000, Some((&delta, 1.0)));
        series.record(7_000_000, None);

        let duration = series.duration.snapshot();
        assert_eq!(duration.count, 2);
        assert!((duration.sum - 0.012).abs() < 1e-12);
        let cpu = series.probes[measure::CPU_TIME].snapshot();
        assert_eq!(cpu.count, 1);
        assert!((cpu.sum - 0.002).abs() < 1e-12);
        assert_eq!(series.probes[measure::IO_READ].snapshot().sum, 4096.0);
        // Probes not read are not recorded, not even as zero.
        assert_eq!(series.probes[measure::FAULTS_MINOR].snapshot().count, 0);
    }

    #[test]
    fn weights_give_an_estimated_total() {
        let series = CallSeries::new(AttributeSet::empty());
        let mut delta = Reading {
            probes: ProbeSet::IO,
            ..Reading::default()
        };
        delta.values[measure::IO_WRITE] = 100;
        series.record(1, Some((&delta, 4.0)));
        let write = series.probes[measure::IO_WRITE].snapshot();
        assert_eq!(write.sum, 100.0);
        assert_eq!(write.estimated_sum(), 400.0);
    }

    #[test]
    fn counters_add_exactly_across_threads() {
        let counter = Arc::new(CounterSeries::new(AttributeSet::empty()));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || (0..50_000).for_each(|_| counter.add(1.0)))
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(counter.value(), 200_000.0);
        assert_eq!(counter.adds(), 200_000);
        counter.reset();
        assert!(counter.is_empty());
    }
}
