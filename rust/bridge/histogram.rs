//! Histogram conversions for export.

use crate::aggregate::boundaries;
use crate::aggregate::histogram::{HistogramSnapshot, SCALE};

/// Counts per explicit bucket for `boundaries` (ascending): `len + 1` buckets,
/// (-inf, b0], (b0, b1], ..., (b_last, +inf), as in OpenTelemetry's explicit histogram.
///
/// An exponential bucket (at scale 4 about 4.4% wide) that lies between two boundaries goes
/// where it belongs exactly. One that a boundary cuts is split exactly when the histogram
/// counted its values at or below that boundary (every boundary of meterage's own sets,
/// [`boundaries::SETS`]); for any other boundary it goes by its geometric midpoint, so a
/// value is at most one exponential bucket width away from the side it really fell on.
pub fn explicit_counts(histogram: &HistogramSnapshot, boundaries: &[f64]) -> Vec<u64> {
    let mut counts = vec![0u64; boundaries.len() + 1];
    let slot = |value: f64| boundaries.partition_point(|&bound| bound < value);
    if histogram.zero_count > 0 {
        counts[slot(0.0)] += histogram.zero_count;
    }
    let mut cuts = histogram.cuts.iter().peekable();
    for (position, (lower, upper, count)) in histogram.buckets().enumerate() {
        if count == 0 {
            continue;
        }
        // Boundaries strictly inside (lower, upper) are first_inside..high_slot.
        let first_inside = boundaries.partition_point(|&bound| bound <= lower);
        let high_slot = slot(upper);
        if first_inside == high_slot {
            counts[high_slot] += count;
            continue;
        }
        let index = histogram.offset + position as i32;
        while cuts.next_if(|&&(cut, _)| cut < index).is_some() {}
        let below = cuts
            .next_if(|&&(cut, _)| cut == index)
            .and_then(|&(_, below)| {
                let cut = boundaries::cut_of_index(index)?;
                let exact = histogram.scale == SCALE
                    && first_inside + 1 == high_slot
                    && boundaries[first_inside].to_bits() == cut.bits;
                exact.then_some(below)
            });
        match below {
            // Values at or below the one boundary inside go to its bucket, the rest above.
            Some(below) => {
                let below = below.min(count);
                counts[first_inside] += below;
                counts[high_slot] += count - below;
            }
            None => counts[slot((lower * upper).sqrt())] += count,
        }
    }
    counts
}

/// The histogram at a scale of at most `max_scale` and with at most `max_buckets` buckets:
/// downscaled (halving resolution each step) until its non-empty range fits, as
/// OpenTelemetry's exponential aggregation does.
pub fn fit_buckets(
    histogram: &HistogramSnapshot,
    max_buckets: usize,
    max_scale: i32,
) -> HistogramSnapshot {
    let max_buckets = max_buckets.max(2) as i64;
    let mut scale = histogram.scale.min(max_scale.max(-10));
    if histogram.bucket_counts.is_empty() {
        return HistogramSnapshot {
            scale,
            ..histogram.clone()
        };
    }
    let first = histogram.offset as i64;
    let last = first + histogram.bucket_counts.len() as i64 - 1;
    while scale > -10 {
        let shift = (histogram.scale - scale) as u32;
        if (last >> shift) - (first >> shift) < max_buckets {
            break;
        }
        scale -= 1;
    }
    if scale == histogram.scale {
        histogram.clone()
    } else {
        histogram.downscale(scale)
    }
}

/// What was recorded between `earlier` and `current` (two snapshots of one histogram), or
/// `None` if the histogram was reset in between (then `current` starts afresh).
///
/// Counts, sums and bucket counts subtract exactly. Min and max of the interval are not
/// kept by a cumulative histogram: they are the bounds of the lowest and highest non-empty
/// delta bucket, clamped to the cumulative min and max (so within one bucket width).
pub fn delta_since(
    current: &HistogramSnapshot,
    earlier: &HistogramSnapshot,
) -> Option<HistogramSnapshot> {
    if earlier.count > current.count || earlier.scale != current.scale {
        return None;
    }
    let mut delta = HistogramSnapshot::empty(current.scale);
    delta.count = current.count - earlier.count;
    delta.sum = current.sum - earlier.sum;
    delta.zero_count = current.zero_count.saturating_sub(earlier.zero_count);
    delta.weighted_extra = current.weighted_extra - earlier.weighted_extra;
    if delta.count == 0 {
        return Some(delta);
    }
    delta.cuts = current.cuts.clone();
    for &(index, below) in &earlier.cuts {
        let Some(at) = delta.cuts.iter().position(|&(cut, _)| cut == index) else {
            return None; // a cut bucket the current snapshot no longer has: reset
        };
        let now = &mut delta.cuts[at].1;
        if *now < below {
            return None;
        }
        *now -= below;
    }
    delta.cuts.retain(|&(_, below)| below > 0);
    let mut counts = current.bucket_counts.clone();
    let shift = earlier.offset as i64 - current.offset as i64;
    for (position, &count) in earlier.bucket_counts.iter().enumerate() {
        let index = position as i64 + shift;
        if index < 0 || index as usize >= counts.len() {
            return None; // a bucket the current snapshot no longer has: reset
        }
        let slot = &mut counts[index as usize];
        if *slot < count {
            return None;
        }
        *slot -= count;
    }
    let first = counts.iter().position(|&count| count > 0);
    let last = counts.iter().rposition(|&count| count > 0);
    if let (Some(first), Some(last)) = (first, last) {
        delta.offset = current.offset + first as i32;
        delta.bucket_counts = counts[first..=last].to_vec();
        let (low, _) = current.bucket_bounds(first);
        let (_, high) = current.bucket_bounds(last);
        delta.min = if delta.zero_count > 0 {
            0.0
        } else {
            low.max(current.min)
        };
        delta.max = high.min(current.max);
    }
    Some(delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::histogram::AtomicHistogram;

    fn recorded(values: &[f64]) -> HistogramSnapshot {
        let histogram = AtomicHistogram::new();
        values.iter().for_each(|&value| histogram.record(value));
        histogram.snapshot()
    }

    #[test]
    fn explicit_counts_match_the_values_away_from_boundaries() {
        let values = [0.0, 0.001, 0.004, 0.006, 0.02, 0.02, 0.3, 7.0, 12.0];
        let bounds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0];
        let counts = explicit_counts(&recorded(&values), &bounds);
        let mut expected = vec![0u64; bounds.len() + 1];
        for value in values {
            expected[bounds.partition_point(|&b| b < value)] += 1;
        }
        assert_eq!(counts, expected);
        assert_eq!(counts.iter().sum::<u64>(), values.len() as u64);
    }

    #[test]
    fn a_value_on_a_power_of_two_boundary_stays_in_the_lower_bucket() {
        // 1.0 is a bucket upper bound at every scale, and (b0, b1] is upper-inclusive.
        let counts = explicit_counts(&recorded(&[1.0, 2.0]), &[1.0, 2.0]);
        assert_eq!(counts, vec![1, 1, 0]);
    }

    #[test]
    fn values_exactly_on_a_boundary_are_counted_below_it() {
        // Integer values on the SDK's default boundaries, and a reader of those boundaries.
        let values = [
            5.0, 50.0, 100.0, 1000.0, 2500.0, 5.0, 4.9, 5.1, 999.0, 1001.0,
        ];
        let bounds = boundaries::SDK_DEFAULT;
        let counts = explicit_counts(&recorded(&values), &bounds);
        let mut expected = vec![0u64; bounds.len() + 1];
        for value in values {
            expected[bounds.partition_point(|&b| b < value)] += 1;
        }
        assert_eq!(counts, expected);
        // Durations on the semantic-convention boundaries (5 ms is 5_000_000 ns * 1e-9).
        let durations: Vec<f64> = [
            5_000_000u64,
            4_999_999,
            5_000_001,
            75_000_000,
            2_500_000_000,
        ]
        .iter()
        .map(|&ns| ns as f64 * 1e-9)
        .collect();
        let bounds = crate::probe::DURATION.boundaries;
        let counts = explicit_counts(&recorded(&durations), bounds);
        let mut expected = vec![0u64; bounds.len() + 1];
        for value in &durations {
            expected[bounds.partition_point(|&b| b < *value)] += 1;
        }
        assert_eq!(counts, expected);
    }

    #[test]
    fn deltas_keep_the_split_exact() {
        let histogram = AtomicHistogram::new();
        histogram.record(5.0);
        histogram.record(5.1);
        let earlier = histogram.snapshot();
        histogram.record(5.0);
        histogram.record(5.0);
        histogram.record(5.2);
        let delta = delta_since(&histogram.snapshot(), &earlier).unwrap();
        let counts = explicit_counts(&delta, &boundaries::SDK_DEFAULT);
        assert_eq!(&counts[1..3], &[2, 1]); // (0, 5]: the two 5.0s; (5, 10]: 5.2
    }

    #[test]
    fn fitting_keeps_the_count_and_respects_the_limit() {
        let values: Vec<f64> = (0..60).map(|e| 2f64.powi(e - 30)).collect();
        let snapshot = recorded(&values);
        assert!(snapshot.bucket_counts.len() > 160);
        let fitted = fit_buckets(&snapshot, 160, 20);
        assert!(fitted.bucket_counts.len() <= 160);
        assert_eq!(fitted.count, snapshot.count);
        assert_eq!(fitted.bucket_counts.iter().sum::<u64>(), 60);
        assert!(fitted.scale < snapshot.scale);
        assert_eq!(fit_buckets(&snapshot, 10_000, 20), snapshot);
        let coarse = fit_buckets(&snapshot, 10_000, 1);
        assert_eq!(coarse.scale, 1);
        assert_eq!(coarse.count, snapshot.count);
    }

    #[test]
    fn deltas_subtract_exactly() {
        let histogram = AtomicHistogram::new();
        for value in [0.5, 0.25, 3.0] {
            histogram.record(value);
        }
        let earlier = histogram.snapshot();
        for value in [0.25, 9.0, 0.0] {
            histogram.record(value);
        }
        let delta = delta_since(&histogram.snapshot(), &earlier).unwrap();
        assert_eq!(delta.count, 3);
        assert!((delta.sum - 9.25).abs() < 1e-12);
        assert_eq!(delta.zero_count, 1);
        assert_eq!(delta.bucket_counts.iter().sum::<u64>(), 2);
        assert_eq!(delta.min, 0.0);
        assert_eq!(delta.max, 9.0);
        let empty = delta_since(&histogram.snapshot(), &histogram.snapshot()).unwrap();
        assert_eq!(empty.count, 0);
    }

    #[test]
    fn a_reset_in_between_is_not_a_delta() {
        let later = recorded(&[1.0]);
        let earlier = recorded(&[1.0, 2.0]);
        assert!(delta_since(&later, &earlier).is_none());
    }
}
