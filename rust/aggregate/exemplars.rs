//! Exemplars: for each range of durations, the trace and span of a recent call in it, so a
//! latency bucket links to a trace. Recorded only when span attributes are on (tracing
//! configured), never on the plain hot path; a contended slot skips the exemplar rather
//! than wait.

use super::lazy::LazyBox;
use std::sync::atomic::{fence, AtomicU64, Ordering};

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

/// One exemplar under a sequence number: even and non-zero when it holds one, odd while a
/// writer fills it. No lock, so a fork can never leave one held in the child.
#[derive(Default)]
struct Slot {
    sequence: AtomicU64,
    value: AtomicU64,
    time_unix_ns: AtomicU64,
    trace_high: AtomicU64,
    trace_low: AtomicU64,
    span_id: AtomicU64,
}

/// A series' exemplar slots: a pointer until tracing offers the first one (then 3 KiB).
#[derive(Default)]
pub struct ExemplarSlots {
    slots: LazyBox<[Slot; SLOTS]>,
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
    fn slots(&self) -> Option<&[Slot; SLOTS]> {
        self.slots.get()
    }

    /// Keeps `exemplar` as its range's most recent (skipped if another thread is writing
    /// that range's slot).
    pub fn offer(&self, exemplar: Exemplar) {
        let slots = self
            .slots
            .get_or_init(|| std::array::from_fn(|_| Slot::default()));
        let slot = &slots[slot_of(exemplar.value)];
        let sequence = slot.sequence.load(Ordering::Relaxed);
        if sequence % 2 == 1
            || slot
                .sequence
                .compare_exchange(sequence, sequence + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        slot.value
            .store(exemplar.value.to_bits(), Ordering::Relaxed);
        slot.time_unix_ns
            .store(exemplar.time_unix_ns, Ordering::Relaxed);
        slot.trace_high
            .store((exemplar.trace_id >> 64) as u64, Ordering::Relaxed);
        slot.trace_low
            .store(exemplar.trace_id as u64, Ordering::Relaxed);
        slot.span_id.store(exemplar.span_id, Ordering::Relaxed);
        slot.sequence.store(sequence + 2, Ordering::Release);
    }

    /// The exemplars held, lowest range first (a slot being written is left out).
    pub fn snapshot(&self) -> Vec<Exemplar> {
        // SAFETY: shift 0: this process's own slots.
        unsafe { self.snapshot_shifted(0) }
    }

    /// As `snapshot`, read through another mapping (see `LazyBox::get_shifted`).
    ///
    /// # Safety
    /// As `LazyBox::get_shifted`.
    pub unsafe fn snapshot_shifted(&self, shift: isize) -> Vec<Exemplar> {
        // SAFETY: the caller's contract.
        let Some(slots) = (unsafe { self.slots.get_shifted(shift) }) else {
            return Vec::new();
        };
        slots
            .iter()
            .filter_map(|slot| {
                let before = slot.sequence.load(Ordering::Acquire);
                if before == 0 || before % 2 == 1 {
                    return None;
                }
                let exemplar = Exemplar {
                    value: f64::from_bits(slot.value.load(Ordering::Relaxed)),
                    time_unix_ns: slot.time_unix_ns.load(Ordering::Relaxed),
                    trace_id: (u128::from(slot.trace_high.load(Ordering::Relaxed)) << 64)
                        | u128::from(slot.trace_low.load(Ordering::Relaxed)),
                    span_id: slot.span_id.load(Ordering::Relaxed),
                };
                fence(Ordering::Acquire);
                (slot.sequence.load(Ordering::Relaxed) == before).then_some(exemplar)
            })
            .collect()
    }

    /// Forgets every exemplar (a writer racing with it may keep its own).
    pub fn reset(&self) {
        if let Some(slots) = self.slots() {
            for slot in slots {
                slot.sequence.store(0, Ordering::Release);
            }
        }
    }

    pub fn memory_bytes(&self) -> usize {
        self.slots()
            .map_or(0, |_| std::mem::size_of::<[Slot; SLOTS]>())
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
