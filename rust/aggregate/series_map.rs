//! The series of one operation or instrument, keyed by attribute set.
//!
//! A persistent hash trie behind an `ArcSwap`: a lookup is one load and a walk of a few
//! trie nodes (no lock); an insert builds the O(log n) nodes on its path and swaps the new
//! root in with compare-and-swap, sharing everything else with the old trie. So a new
//! series costs the same at 100,000 series as at 10, and there is no mutex anywhere, so a
//! fork can never leave one locked in the child.
//!
//! Keys are the attribute sets' hashes (see [`AttributeSet::hash_value`]), which a lookup
//! can compute from borrowed data (a Python dict) without building a set first.
//!
//! The cardinality limit counts the series in use in the current epoch: a reset or a fork
//! child starts with the whole budget, although the earlier series are still in the trie
//! (a reset drops those that nothing else holds; a fork child keeps its parent's, shared).

use super::attributes::{AttributeSet, ValueRef};
use super::epoch::{InUse, Liveness};
use super::snapshot::SeriesKind;
use crate::group::{arena, member, wire};
use arc_swap::{ArcSwap, ArcSwapOption};
use rpds::HashTrieMapSync;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Series count per operation before new attribute sets go to the overflow series.
pub const DEFAULT_CARDINALITY_LIMIT: usize = 2000;
/// The largest limit `configure` accepts: memory per operation stays bounded.
pub const MAX_CARDINALITY_LIMIT: usize = 1_000_000;
static GLOBAL_CARDINALITY_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_CARDINALITY_LIMIT);

pub fn set_global_cardinality_limit(limit: usize) {
    GLOBAL_CARDINALITY_LIMIT.store(limit.clamp(1, MAX_CARDINALITY_LIMIT), Ordering::Relaxed);
}

pub fn global_cardinality_limit() -> usize {
    GLOBAL_CARDINALITY_LIMIT.load(Ordering::Relaxed)
}

/// Something that lives in a series map: built from its attributes, able to clear itself.
pub trait SeriesData: Send + Sync + 'static {
    /// A series that has not recorded yet (it counts against the limit once it does).
    fn new(attributes: AttributeSet, liveness: Liveness) -> Self;
    fn attributes(&self) -> &AttributeSet;
    /// The epoch its values belong to.
    fn liveness(&self) -> &Liveness;
    /// Forgets every recorded value (called once, by the first record of a new epoch).
    fn clear(&self);
}

/// The keys are already hashes.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in anyway.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// The series whose attribute sets share one hash (almost always one).
enum Bucket<T> {
    One(Arc<T>),
    Many(Arc<[Arc<T>]>),
}

impl<T> Bucket<T> {
    fn as_slice(&self) -> &[Arc<T>] {
        match self {
            Bucket::One(one) => std::slice::from_ref(one),
            Bucket::Many(many) => many,
        }
    }
}

type Trie<T> = HashTrieMapSync<u64, Bucket<T>, BuildHasherDefault<Identity>>;

pub struct SeriesMap<T> {
    trie: ArcSwap<Trie<T>>,
    /// 0: follow the global limit.
    limit: AtomicUsize,
    in_use: Arc<InUse>,
    /// The series past the limit (also in the trie, for iteration; never counted).
    overflow: ArcSwapOption<T>,
    /// What names this map's series in a process group's directory.
    label: OnceLock<Label>,
}

/// The operation or instrument a map's series belong to.
pub struct Label {
    pub kind: SeriesKind,
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub description: Arc<str>,
    /// A custom histogram's explicit bucket boundaries, for members that never made it.
    pub boundaries: Option<super::boundaries::Boundaries>,
}

impl<T: SeriesData> Default for SeriesMap<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: SeriesData> SeriesMap<T> {
    pub fn new() -> Self {
        SeriesMap {
            trie: ArcSwap::from_pointee(Trie::new_with_hasher_and_ptr_kind(
                BuildHasherDefault::default(),
            )),
            limit: AtomicUsize::new(0),
            in_use: Arc::new(InUse::default()),
            overflow: ArcSwapOption::empty(),
            label: OnceLock::new(),
        }
    }

    /// A map whose series a process group's members can find by `label`.
    pub fn labelled(label: Label) -> Self {
        let map = Self::new();
        let _ = map.label.set(label);
        map
    }

    /// `series`, unless this is the fork child of a process group's member and `series`
    /// its parent's (copied, and not the group's any more): then this process's own
    /// series of the same attributes. One load when not in a group.
    #[inline(always)]
    pub fn own(&self, series: &Arc<T>) -> Option<Arc<T>> {
        if !arena::is_foreign(Arc::as_ptr(series) as usize) {
            return None;
        }
        Some(self.get_or_create(series.attributes()))
    }

    /// Forgets every series (a fork child of a group's member: they are its parent's).
    pub fn forget(&self) {
        self.trie.store(Arc::new(Trie::new_with_hasher_and_ptr_kind(
            BuildHasherDefault::default(),
        )));
        self.overflow.store(None);
    }

    pub fn set_limit(&self, limit: Option<usize>) {
        self.limit.store(
            limit.map_or(0, |limit| limit.clamp(1, MAX_CARDINALITY_LIMIT)),
            Ordering::Relaxed,
        );
    }

    pub fn limit(&self) -> usize {
        match self.limit.load(Ordering::Relaxed) {
            0 => global_cardinality_limit(),
            limit => limit,
        }
    }

    fn find(&self, hash: u64, matches: impl Fn(&AttributeSet) -> bool) -> Option<Arc<T>> {
        let trie = self.trie.load();
        trie.get(&hash)?
            .as_slice()
            .iter()
            .find(|series| matches(series.attributes()))
            .cloned()
    }

    /// The series for `attributes`, created if needed; past the cardinality limit, the
    /// overflow series (which does not count toward the limit).
    pub fn get_or_create(&self, attributes: &AttributeSet) -> Arc<T> {
        self.get_or_create_with(
            attributes.hash_value(),
            |candidate| candidate == attributes,
            || attributes.clone(),
        )
    }

    /// The series of the attribute set with this `hash` that `matches`, created with
    /// `make()` if there is none (so a lookup of an existing series allocates nothing).
    pub fn get_or_create_with(
        &self,
        hash: u64,
        matches: impl Fn(&AttributeSet) -> bool,
        make: impl FnOnce() -> AttributeSet,
    ) -> Arc<T> {
        let series = self.find_or_insert(hash, matches, make);
        // Counted now, if not yet in this epoch (a lookup is for a record, or a handle).
        series.liveness().ensure_current(|| series.clear());
        series
    }

    /// The series for `attributes` as [`get_or_create`](Self::get_or_create) gives it,
    /// but counted against the limit only from its first record: the attribute-less series
    /// an instrument or a meter holds from the start takes no slot until it is used.
    pub fn get_or_create_idle(&self, attributes: &AttributeSet) -> Arc<T> {
        self.find_or_insert(
            attributes.hash_value(),
            |candidate| candidate == attributes,
            || attributes.clone(),
        )
    }

    fn find_or_insert(
        &self,
        hash: u64,
        matches: impl Fn(&AttributeSet) -> bool,
        make: impl FnOnce() -> AttributeSet,
    ) -> Arc<T> {
        if let Some(series) = self.find(hash, &matches) {
            // One of an earlier epoch (or never used) counts again if the budget has room.
            if series.liveness().is_current() || self.in_use.now() < self.limit() {
                return series;
            }
            return self.overflow();
        }
        if self.in_use.now() >= self.limit() {
            return self.overflow();
        }
        self.insert(
            hash,
            &matches,
            make(),
            Liveness::new(Arc::clone(&self.in_use)),
        )
    }

    /// Inserts a series for `attributes` unless one that `matches` is there already.
    fn insert(
        &self,
        hash: u64,
        matches: &impl Fn(&AttributeSet) -> bool,
        attributes: AttributeSet,
        liveness: Liveness,
    ) -> Arc<T> {
        let in_group = member::is_joined();
        let fresh = if in_group {
            let identity = self.label.get().map(|label| wire::Identity {
                kind: label.kind,
                name: Arc::clone(&label.name),
                unit: Arc::clone(&label.unit),
                description: Arc::clone(&label.description),
                boundaries: label.boundaries.clone(),
                attributes: attributes.clone(),
            });
            let fresh = arena::shared(|| Arc::new(T::new(attributes, liveness)));
            (fresh, identity)
        } else {
            (Arc::new(T::new(attributes, liveness)), None)
        };
        let (fresh, identity) = fresh;
        let mut chosen = Arc::clone(&fresh);
        self.trie.rcu(|current| {
            let existing = current.get(&hash).map(Bucket::as_slice).unwrap_or(&[]);
            if let Some(found) = existing.iter().find(|s| matches(s.attributes())) {
                chosen = Arc::clone(found);
                return Arc::clone(current);
            }
            chosen = Arc::clone(&fresh);
            let bucket = if existing.is_empty() {
                Bucket::One(Arc::clone(&fresh))
            } else {
                Bucket::Many(
                    existing
                        .iter()
                        .cloned()
                        .chain([Arc::clone(&fresh)])
                        .collect(),
                )
            };
            Arc::new(current.insert(hash, bucket))
        });
        if let Some(identity) = identity {
            if Arc::ptr_eq(&chosen, &fresh) {
                member::register(&identity, Arc::as_ptr(&fresh) as usize, Arc::clone(&fresh));
            }
        }
        chosen
    }

    /// Whether a series not yet counted in this epoch may count now.
    pub fn has_room(&self) -> bool {
        self.in_use.now() < self.limit()
    }

    /// The overflow series, created on first use.
    pub fn overflow(&self) -> Arc<T> {
        if let Some(overflow) = self.overflow.load_full() {
            return overflow;
        }
        let attributes = AttributeSet::overflow();
        let made = self.insert(
            attributes.hash_value(),
            &|candidate| *candidate == attributes,
            attributes.clone(),
            Liveness::standalone(), // past the limit by design: never counted
        );
        // The trie holds one overflow series: whoever inserted first, all store the same.
        self.overflow.store(Some(Arc::clone(&made)));
        made
    }

    /// `f` of the series of the attribute set with this `hash` that `matches`, if it
    /// exists and belongs to the current epoch: used in place (no reference count taken).
    #[inline]
    pub fn with_current<R>(
        &self,
        hash: u64,
        matches: impl Fn(&AttributeSet) -> bool,
        f: impl FnOnce(&T) -> R,
    ) -> Option<R> {
        let trie = self.trie.load();
        let series = trie
            .get(&hash)?
            .as_slice()
            .iter()
            .find(|series| matches(series.attributes()))?;
        series.liveness().is_current().then(|| f(series))
    }

    /// The series for `attributes` if it holds values of the current epoch (never creates
    /// one).
    pub fn get(&self, attributes: &AttributeSet) -> Option<Arc<T>> {
        self.find_current(attributes.hash_value(), |candidate| candidate == attributes)
    }

    /// As [`get`](Self::get), by hash and a match on borrowed pairs.
    pub fn find_current(
        &self,
        hash: u64,
        matches: impl Fn(&AttributeSet) -> bool,
    ) -> Option<Arc<T>> {
        self.find(hash, matches)
            .filter(|series| series.liveness().is_current())
    }

    /// Calls `f` on every series (those of earlier epochs too), in no particular order,
    /// taking no reference: a forked child reading its snapshot writes to no series page.
    pub fn for_each(&self, mut f: impl FnMut(&T)) {
        let trie = self.trie.load();
        for bucket in trie.values() {
            bucket.as_slice().iter().for_each(|series| f(series));
        }
    }

    /// Every series (those of earlier epochs too), in no particular order.
    pub fn all(&self) -> Vec<Arc<T>> {
        let trie = self.trie.load();
        let mut out = Vec::with_capacity(trie.size());
        for bucket in trie.values() {
            out.extend(bucket.as_slice().iter().cloned());
        }
        out
    }

    /// Drops the series of earlier epochs that nothing but this map holds (at a reset:
    /// their values are gone, and memory must not grow with every reset).
    pub fn prune(&self) {
        self.trie.rcu(|current| {
            let mut next = Trie::clone(current);
            for (&hash, bucket) in current.iter() {
                let kept: Vec<Arc<T>> = bucket
                    .as_slice()
                    .iter()
                    .filter(|s| s.liveness().is_current() || Arc::strong_count(s) > 1)
                    .cloned()
                    .collect();
                if kept.len() == bucket.as_slice().len() {
                    continue;
                }
                next = match kept.len() {
                    0 => next.remove(&hash),
                    1 => next.insert(hash, Bucket::One(Arc::clone(&kept[0]))),
                    _ => next.insert(hash, Bucket::Many(kept.into())),
                };
            }
            Arc::new(next)
        });
    }

    /// Series in the trie (those of earlier epochs too).
    pub fn len(&self) -> usize {
        self.trie.load().size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Series counted against the limit in the current epoch.
    pub fn in_use(&self) -> usize {
        self.in_use.now()
    }
}

/// Looks up by borrowed pairs: the hash of `pairs` and a match against them.
pub fn hash_of<'a>(pairs: impl Iterator<Item = (&'a str, ValueRef<'a>)>) -> u64 {
    let mut hasher = super::attributes::SetHasher::default();
    for (key, value) in pairs {
        hasher.add(key, value);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::super::attributes::AttributeValue;
    use super::*;

    struct Dummy(AttributeSet, Liveness);
    impl SeriesData for Dummy {
        fn new(attributes: AttributeSet, liveness: Liveness) -> Self {
            Dummy(attributes, liveness)
        }
        fn attributes(&self) -> &AttributeSet {
            &self.0
        }
        fn liveness(&self) -> &Liveness {
            &self.1
        }
        fn clear(&self) {}
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
        let hash = hash_of([("n", ValueRef::Int(1))].into_iter());
        let c = map.get_or_create_with(hash, |s| *s == attrs(1), || unreachable!());
        assert!(Arc::ptr_eq(&a, &c));
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
    fn colliding_hashes_keep_their_series_apart() {
        let map = SeriesMap::<Dummy>::new();
        let a = map.get_or_create_with(7, |s| *s == attrs(1), || attrs(1));
        let b = map.get_or_create_with(7, |s| *s == attrs(2), || attrs(2));
        assert!(!Arc::ptr_eq(&a, &b));
        let again = map.get_or_create_with(7, |s| *s == attrs(2), || unreachable!());
        assert!(Arc::ptr_eq(&b, &again));
        assert_eq!(map.all().len(), 2);
    }

    #[test]
    fn a_hundred_thousand_series_are_all_reachable() {
        let map = SeriesMap::<Dummy>::new();
        map.set_limit(Some(MAX_CARDINALITY_LIMIT));
        let made: Vec<_> = (0..100_000).map(|n| map.get_or_create(&attrs(n))).collect();
        assert_eq!(map.len(), 100_000);
        assert_eq!(map.in_use(), 100_000);
        for (n, series) in made.iter().enumerate().step_by(997) {
            assert!(Arc::ptr_eq(series, &map.get(&attrs(n as i64)).unwrap()));
        }
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
