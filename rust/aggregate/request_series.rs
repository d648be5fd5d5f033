//! The series a request ends in, remembered by its meter, route and status, with the
//! series of the values recorded alongside it (its body sizes).
//!
//! A request whose only attributes are its route and status (no error, none set by its
//! handler) ends where the last such request of that meter, route and status ended. One
//! slot, picked by them, gives that series and the body-size series, so the request's end
//! makes no key, hashes no attribute set and searches no map: with a server's caches cold
//! those are a good part of what a request costs (see docs/benchmarks.md). A remembered
//! series is used under [`Alongside`](super::alongside)'s rules: this epoch's, this
//! process's, never an overflow series. A miss is the full lookup, remembered after.

use super::alongside::{rememberable, still_usable};
use super::call::MeterCore;
use super::series::CallSeries;
use super::series_map::SeriesData;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

/// Slots; more (meter, route, status) triples than this share slots and take turns.
const SLOTS: usize = 64;

struct Slot<T, const N: usize> {
    /// Kept alive here, so that no other meter can have its address while it is remembered.
    meter: Arc<MeterCore>,
    route: Option<Arc<str>>,
    status: i64,
    call: Arc<CallSeries>,
    found: [Arc<T>; N],
}

/// What a request ends in: its call series and the series of the values recorded
/// alongside.
pub struct Remembered<T, const N: usize> {
    pub call: Arc<CallSeries>,
    pub found: [Arc<T>; N],
}

pub struct RequestSeries<T, const N: usize> {
    slots: Mutex<Vec<Option<Slot<T, N>>>>,
}

impl<T: SeriesData, const N: usize> Default for RequestSeries<T, N> {
    fn default() -> Self {
        RequestSeries {
            slots: Mutex::new((0..SLOTS).map(|_| None).collect()),
        }
    }
}

fn slot_of(meter: &Arc<MeterCore>, route: Option<&str>, status: i64) -> usize {
    const SEED: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0);
    (SEED.hash_one((Arc::as_ptr(meter) as usize, route, status)) as usize) % SLOTS
}

impl<T: SeriesData, const N: usize> RequestSeries<T, N> {
    /// What the last request of `meter` with this route and status ended in, if it can
    /// still be used.
    pub fn get(
        &self,
        meter: &Arc<MeterCore>,
        route: Option<&str>,
        status: i64,
    ) -> Option<Remembered<T, N>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots[slot_of(meter, route, status)].as_ref()?;
        if !Arc::ptr_eq(&slot.meter, meter)
            || slot.status != status
            || slot.route.as_deref() != route
            || !still_usable(&*slot.call)
            || !slot.found.iter().all(|series| still_usable(&**series))
        {
            return None;
        }
        Some(Remembered {
            call: Arc::clone(&slot.call),
            found: slot.found.clone(),
        })
    }

    /// Remembers what a request of `meter` with this route and status ended in (unless a
    /// series of it is an overflow series or no longer current).
    pub fn put(
        &self,
        meter: &Arc<MeterCore>,
        route: Option<Arc<str>>,
        status: i64,
        call: &Arc<CallSeries>,
        found: &[Arc<T>; N],
    ) {
        if !rememberable(&**call) || !found.iter().all(|series| rememberable(&**series)) {
            return;
        }
        let index = slot_of(meter, route.as_deref(), status);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots[index] = Some(Slot {
            meter: Arc::clone(meter),
            route,
            status,
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
    use crate::aggregate::sampling::SamplingMode;
    use crate::aggregate::series::HistogramSeries;
    use crate::probe::ProbeSet;

    fn meter(name: &str) -> Arc<MeterCore> {
        Arc::new(MeterCore::new(
            &format!(
                "request-series-{name}-{}",
                crate::probe::clock::monotonic_ns()
            ),
            AttributeSet::empty(),
            ProbeSet::NONE,
            SamplingMode::Fixed(1.0),
        ))
    }

    fn series<T: SeriesData>(route: &str, current: bool) -> Arc<T> {
        let set = AttributeSet::new([(Arc::from("http.route"), AttributeValue::Str(route.into()))]);
        let series = Arc::new(T::new(set, Liveness::standalone()));
        if current {
            series.liveness().ensure_current(|| {});
        }
        series
    }

    #[test]
    fn what_was_put_comes_back_only_for_its_meter_route_and_status() {
        let recent: RequestSeries<HistogramSeries, 2> = RequestSeries::default();
        let (one, other) = (meter("one"), meter("other"));
        let call = series::<CallSeries>("/a", true);
        let found = [series("/a", true), series("/a", true)];
        assert!(recent.get(&one, Some("/a"), 200).is_none());
        recent.put(&one, Some(Arc::from("/a")), 200, &call, &found);
        let got = recent.get(&one, Some("/a"), 200).expect("remembered");
        assert!(Arc::ptr_eq(&got.call, &call));
        assert!(Arc::ptr_eq(&got.found[0], &found[0]) && Arc::ptr_eq(&got.found[1], &found[1]));
        for (meter, route, status) in [
            (&other, Some("/a"), 200),
            (&one, Some("/b"), 200),
            (&one, None, 200),
            (&one, Some("/a"), 404),
            (&one, Some("/a"), -1),
        ] {
            assert!(
                recent.get(meter, route, status).is_none(),
                "{route:?} {status}"
            );
        }
    }

    #[test]
    fn series_not_current_or_overflow_series_are_not_used() {
        let recent: RequestSeries<HistogramSeries, 1> = RequestSeries::default();
        let one = meter("rules");
        // A call series of an earlier epoch (as after a reset): the lookup decides again.
        let idle = series::<CallSeries>("/a", false);
        recent.put(&one, None, 200, &idle, &[series("/a", true)]);
        assert!(recent.get(&one, None, 200).is_none());

        let overflow = Arc::new(HistogramSeries::new(
            AttributeSet::overflow(),
            Liveness::standalone(),
        ));
        overflow.liveness().ensure_current(|| {});
        recent.put(&one, None, 201, &series("/a", true), &[overflow]);
        assert!(recent.get(&one, None, 201).is_none());
    }
}
