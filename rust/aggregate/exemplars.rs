//! Exemplars: for each range of durations, the trace and span of a recent call in it, so a
//! latency bucket links to a trace. Recorded only when span attributes are on (tracing
//! configured), never on the plain hot path; a contended slot skips the exemplar rather
//! than wait.

use std::sync::Mutex;

/// One call that landed in a histogram range, with the span it ran in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exemplar {
    pub value: f64,
    pub time_unix_ns: u64,
    pub trace_id: u128,
    pub span_id: u64,
}

/// Slots by power of two of the value (2^-31 .. 2^32 s), allocated on first use.
const SLOTS: usize = 64;
const LOWEST_EXPONENT: i32 = -31;

#[derive(Default)]
pub struct ExemplarSlots {
    slots: Mutex<Vec<Option<Exemplar>>>,
}

fn slot_of(value: f64) -> usize {
    let exponent = if value > 0.0 {
        value.log2().floor() as i32
    } else {
        LOWEST_EXPONENT
    };
    (exponent - LOWEST_EXPONENT).clamp(0, SLOTS as i32 - 1) as usize
}

impl ExemplarSlots {
    /// Keeps `exemplar` as its range's most recent (skipped if another thread holds the slots).
    pub fn offer(&self, exemplar: Exemplar) {
        if let Ok(mut slots) = self.slots.try_lock() {
            if slots.is_empty() {
                slots.resize(SLOTS, None);
            }
            slots[slot_of(exemplar.value)] = Some(exemplar);
        }
    }

    /// The exemplars held, lowest range first.
    pub fn snapshot(&self) -> Vec<Exemplar> {
        self.slots
            .lock()
            .map(|slots| slots.iter().flatten().copied().collect())
            .unwrap_or_default()
    }

    pub fn reset(&self) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(value: f64, span_id: u64) -> Exemplar {
        Exemplar {
            value,
            time_unix_ns: span_id,
            trace_id: 7,
            span_id,
        }
    }

    #[test]
    fn the_latest_call_of_each_range_is_kept() {
        let slots = ExemplarSlots::default();
        assert!(slots.snapshot().is_empty());
        slots.offer(at(0.003, 1));
        slots.offer(at(0.0031, 2)); // same power of two: replaces the first
        slots.offer(at(1.5, 3));
        let held = slots.snapshot();
        assert_eq!(held, vec![at(0.0031, 2), at(1.5, 3)]);
        slots.reset();
        assert!(slots.snapshot().is_empty());
    }

    #[test]
    fn extreme_values_are_clamped_into_the_slots() {
        let slots = ExemplarSlots::default();
        slots.offer(at(0.0, 1));
        slots.offer(at(1e-12, 2));
        slots.offer(at(1e12, 3));
        assert_eq!(slots.snapshot().len(), 2); // 0 and 1e-12 share the lowest slot
    }
}
