//! The series of one operation or instrument, keyed by attribute set.
//!
//! Lookups are lock-free (one `ArcSwap` load and a hash probe); inserts copy the map and
//! swap it in with compare-and-swap. There is no mutex anywhere, so a fork can never
//! leave one locked in the child. Inserts are rare (a new attribute combination), so the
//! copy is cheap next to the lookups it keeps lock-free.

use super::attributes::AttributeSet;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Series count per operation before new attribute sets go to the overflow series.
pub const DEFAULT_CARDINALITY_LIMIT: usize = 2000;
static GLOBAL_CARDINALITY_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_CARDINALITY_LIMIT);

pub fn set_global_cardinality_limit(limit: usize) {
    GLOBAL_CARDINALITY_LIMIT.store(limit.max(1), Ordering::Relaxed);
}

pub fn global_cardinality_limit() -> usize {
    GLOBAL_CARDINALITY_LIMIT.load(Ordering::Relaxed)
}

/// Something that lives in a series map: built from its attributes, able to clear itself.
pub trait SeriesData: Send + Sync {
    fn new(attributes: AttributeSet) -> Self;
    fn attributes(&self) -> &AttributeSet;
}

pub struct SeriesMap<T> {
    map: ArcSwap<HashMap<AttributeSet, Arc<T>>>,
    /// 0: follow the global limit.
    limit: AtomicUsize,
}

impl<T: SeriesData> Default for SeriesMap<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: SeriesData> SeriesMap<T> {
    pub fn new() -> Self {
        SeriesMap {
            map: ArcSwap::from_pointee(HashMap::new()),
            limit: AtomicUsize::new(0),
        }
    }

    pub fn set_limit(&self, limit: Option<usize>) {
        self.limit
            .store(limit.map_or(0, |limit| limit.max(1)), Ordering::Relaxed);
    }

    pub fn limit(&self) -> usize {
        match self.limit.load(Ordering::Relaxed) {
            0 => global_cardinality_limit(),
            limit => limit,
        }
    }

    /// The series for `attributes`, created if needed; past the cardinality limit, the
    /// overflow series (which does not count toward the limit).
    pub fn get_or_create(&self, attributes: &AttributeSet) -> Arc<T> {
        let overflow = AttributeSet::overflow();
        let limit = self.limit();
        {
            let current = self.map.load();
            if let Some(series) = current.get(attributes) {
                return Arc::clone(series);
            }
            // Already full: the overflow series, without an insert attempt each time.
            if current.len() > limit {
                if let Some(series) = current.get(&overflow) {
                    return Arc::clone(series);
                }
            }
        }
        let mut chosen: Option<Arc<T>> = None;
        self.map.rcu(|current| {
            chosen = None;
            if let Some(series) = current.get(attributes) {
                chosen = Some(Arc::clone(series));
                return Arc::clone(current);
            }
            let regular = current.len() - usize::from(current.contains_key(&overflow));
            let key = if regular < limit {
                attributes
            } else {
                &overflow
            };
            if let Some(series) = current.get(key) {
                chosen = Some(Arc::clone(series));
                return Arc::clone(current);
            }
            let series = Arc::new(T::new(key.clone()));
            chosen = Some(Arc::clone(&series));
            let mut next = HashMap::clone(current);
            next.insert(key.clone(), series);
            Arc::new(next)
        });
        chosen.expect("rcu ran the update at least once")
    }

    /// The series for `attributes` if it exists (never creates one).
    pub fn get(&self, attributes: &AttributeSet) -> Option<Arc<T>> {
        self.map.load().get(attributes).cloned()
    }

    /// Every series, in no particular order.
    pub fn all(&self) -> Vec<Arc<T>> {
        self.map.load().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.load().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::attributes::AttributeValue;
    use super::*;

    struct Dummy(AttributeSet);
    impl SeriesData for Dummy {
        fn new(attributes: AttributeSet) -> Self {
            Dummy(attributes)
        }
        fn attributes(&self) -> &AttributeSet {
            &self.0
        }
    }

    fn attrs(n: i64) -> AttributeSet {
        AttributeSet::new([(Arc::from("n"), AttributeValue::Int(n))])
    }

    #[test]
    fn same_attributes_same_series() {
        let map = SeriesMap::<Dummy>::new();
        let a = map.get_or_create(&attrs(1));
        let b = map.get_or_create(&attrs(1));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn past_the_limit_values_go_to_one_overflow_series() {
        let map = SeriesMap::<Dummy>::new();
        map.set_limit(Some(3));
        for n in 0..3 {
            assert_eq!(map.get_or_create(&attrs(n)).attributes(), &attrs(n));
        }
        let first = map.get_or_create(&attrs(100));
        let second = map.get_or_create(&attrs(101));
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.attributes(), &AttributeSet::overflow());
        assert_eq!(map.len(), 4);
        // Existing series stay reachable.
        assert_eq!(map.get_or_create(&attrs(2)).attributes(), &attrs(2));
    }

    #[test]
    fn concurrent_inserts_agree_on_one_series_per_key() {
        let map = Arc::new(SeriesMap::<Dummy>::new());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let map = Arc::clone(&map);
                std::thread::spawn(move || {
                    (0..200)
                        .map(|n| Arc::as_ptr(&map.get_or_create(&attrs(n))) as usize)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<usize>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for other in &results[1..] {
            assert_eq!(other, &results[0]);
        }
        assert_eq!(map.len(), 200);
    }
}
