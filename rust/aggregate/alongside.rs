//! The series that values recorded alongside a call go to (a request's body sizes, in
//! the series of the request's own attributes), remembered per call series.
//!
//! Finding them costs a hash of the call's attributes and a lookup in each instrument's
//! map on every call; with a server's caches cold that is most of a request's recording.
//! A call series found again (the same route and status) is a pointer: one slot, picked
//! by it, gives the instruments' series, as long as none of them belongs to an earlier
//! epoch or to another process's arena. A miss is the full lookup, remembered after.

use super::attributes::OVERFLOW_KEY;
use super::series::CallSeries;
use super::series_map::SeriesData;
use std::sync::{Arc, Mutex};

/// Slots; a service with more (route, status, error) series than this misses more often
/// (two series sharing a slot take turns), and records the same values either way.
const SLOTS: usize = 64;

struct Slot<T, const N: usize> {
    call: Arc<CallSeries>,
    found: [Arc<T>; N],
}

pub struct Alongside<T, const N: usize> {
    slots: Mutex<Vec<Option<Slot<T, N>>>>,
}

/// Whether a series may be remembered: current, this process's, and not an overflow series
/// (a later epoch may give the attributes their own).
pub(crate) fn rememberable<S: SeriesData>(series: &S) -> bool {
    still_usable(series) && series.attributes().get(OVERFLOW_KEY).is_none()
}

/// Whether a remembered series can be used again: it still belongs to this epoch (a reset
/// or a fork starts another) and to this process's arena.
pub(crate) fn still_usable<S: SeriesData>(series: &S) -> bool {
    series.liveness().is_current() && !crate::group::arena::is_foreign(series as *const S as usize)
}

fn slot_of(call: &Arc<CallSeries>) -> usize {
    // Series are allocated at least 64 bytes apart: the low bits say nothing.
    (Arc::as_ptr(call) as usize >> 6) % SLOTS
}

impl<T: SeriesData, const N: usize> Default for Alongside<T, N> {
    fn default() -> Self {
        Alongside {
            slots: Mutex::new((0..SLOTS).map(|_| None).collect()),
        }
    }
}

impl<T: SeriesData, const N: usize> Alongside<T, N> {
    /// The series remembered for `call`, if they can still be used.
    pub fn get(&self, call: &Arc<CallSeries>) -> Option<[Arc<T>; N]> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots[slot_of(call)].as_ref()?;
        // The call series was remembered (so it is no overflow series), and the call just
        // recorded into it: it is current.
        if !Arc::ptr_eq(&slot.call, call)
            || !slot.found.iter().all(|series| still_usable(&**series))
        {
            return None;
        }
        Some(slot.found.clone())
    }

    /// Remembers the series found for `call` (unless one of them is an overflow series).
    pub fn put(&self, call: &Arc<CallSeries>, found: &[Arc<T>; N]) {
        if !rememberable(&**call) || !found.iter().all(|series| rememberable(&**series)) {
            return;
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots[slot_of(call)] = Some(Slot {
            call: Arc::clone(call),
            found: found.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::attributes::{AttributeSet, AttributeValue};
    use crate::aggregate::epoch::Liveness;
    use crate::aggregate::series::HistogramSeries;

    fn series<T: SeriesData>(name: &str) -> Arc<T> {
        let set = AttributeSet::new([(Arc::from("http.route"), AttributeValue::Str(name.into()))]);
        let series = Arc::new(T::new(set, Liveness::standalone()));
        series.liveness().ensure_current(|| {});
        series
    }

    #[test]
    fn a_call_series_gives_back_what_was_put_for_it_only() {
        let cache: Alongside<HistogramSeries, 2> = Alongside::default();
        let call = series::<CallSeries>("/a");
        let other = series::<CallSeries>("/b");
        let found = [
            series::<HistogramSeries>("/a"),
            series::<HistogramSeries>("/a"),
        ];
        assert!(cache.get(&call).is_none());
        cache.put(&call, &found);
        let got = cache.get(&call).expect("remembered");
        assert!(Arc::ptr_eq(&got[0], &found[0]) && Arc::ptr_eq(&got[1], &found[1]));
        assert!(cache.get(&other).is_none());
    }

    #[test]
    fn series_not_current_or_overflow_series_are_not_remembered() {
        let cache: Alongside<HistogramSeries, 1> = Alongside::default();
        let call = series::<CallSeries>("/a");
        // Never recorded in this epoch (as after a reset): the lookup decides again.
        let idle = Arc::new(HistogramSeries::new(
            AttributeSet::new([(Arc::from("http.route"), AttributeValue::Str("/a".into()))]),
            Liveness::standalone(),
        ));
        cache.put(&call, &[idle]);
        assert!(cache.get(&call).is_none());

        let overflow = Arc::new(HistogramSeries::new(
            AttributeSet::overflow(),
            Liveness::standalone(),
        ));
        overflow.liveness().ensure_current(|| {});
        cache.put(&call, &[overflow]);
        assert!(
            cache.get(&call).is_none(),
            "an overflow series is never remembered"
        );
    }
}
