//! The attributes of a finished call's series as borrowed parts — the meter's, the call's
//! own, its `error.type` — hashed and compared without building the merged set, so that
//! finding an existing series for a call with dynamic attributes allocates nothing.

use super::attributes::{AttributeSet, AttributeValue, ValueRef, ERROR_TYPE_KEY};
use super::series_map::{SeriesData, SeriesMap};
use std::sync::Arc;

/// A call's series key. Only made when no key repeats across the parts (then the merged
/// set is just their union); otherwise the merge decides which value wins.
pub struct CallKey<'a> {
    meter: &'a AttributeSet,
    dynamic: &'a [(Arc<str>, AttributeValue)],
    error_type: Option<&'a str>,
    hash: u64,
    len: usize,
}

impl<'a> CallKey<'a> {
    pub fn new(
        meter: &'a AttributeSet,
        dynamic: &'a [(Arc<str>, AttributeValue)],
        error_type: Option<&'a str>,
    ) -> Option<Self> {
        let mut hasher = meter.hasher();
        for (index, (key, value)) in dynamic.iter().enumerate() {
            let repeated = meter.get(key).is_some()
                || dynamic[..index].iter().any(|(earlier, _)| earlier == key)
                || (error_type.is_some() && &**key == ERROR_TYPE_KEY);
            if repeated {
                return None;
            }
            hasher.add(key, value.as_ref());
        }
        if let Some(error_type) = error_type {
            if meter.get(ERROR_TYPE_KEY).is_some() {
                return None;
            }
            hasher.add(ERROR_TYPE_KEY, ValueRef::Str(error_type));
        }
        let len = meter.len() + dynamic.len() + usize::from(error_type.is_some());
        Some(CallKey {
            meter,
            dynamic,
            error_type,
            hash: hasher.finish(),
            len,
        })
    }

    /// The key of a whole attribute set.
    pub fn whole(set: &'a AttributeSet) -> Self {
        CallKey {
            meter: set,
            dynamic: &[],
            error_type: None,
            hash: set.hash_value(),
            len: set.len(),
        }
    }

    fn pairs(&self) -> impl Iterator<Item = (&str, ValueRef<'_>)> {
        self.meter
            .iter()
            .map(|(key, value)| (key, value.as_ref()))
            .chain(
                self.dynamic
                    .iter()
                    .map(|(key, value)| (&**key, value.as_ref())),
            )
            .chain(
                self.error_type
                    .map(|error_type| (ERROR_TYPE_KEY, ValueRef::Str(error_type))),
            )
    }

    /// Whether `set` is exactly this key's attributes.
    pub fn matches(&self, set: &AttributeSet) -> bool {
        set.matches(self.len, self.pairs())
    }

    /// The merged set (for a series made new).
    pub fn to_set(&self) -> AttributeSet {
        let mut set = self.meter.merged(self.dynamic.iter().cloned());
        if let Some(error_type) = self.error_type {
            set = set.with(ERROR_TYPE_KEY, error_type.into());
        }
        set
    }

    /// The series of `map` with these attributes, made if needed.
    pub fn series_in<T: SeriesData>(&self, map: &SeriesMap<T>) -> Arc<T> {
        map.get_or_create_with(self.hash, |set| self.matches(set), || self.to_set())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(Arc<str>, AttributeValue)> {
        items
            .iter()
            .map(|(key, value)| (Arc::from(*key), AttributeValue::Str(Arc::from(*value))))
            .collect()
    }

    #[test]
    fn a_key_hashes_and_matches_as_the_merged_set() {
        let meter = AttributeSet::new(pairs(&[("http.request.method", "GET")]));
        let dynamic = pairs(&[("http.route", "/items/{id}"), ("tenant", "acme")]);
        for error_type in [None, Some("RuntimeError")] {
            let key = CallKey::new(&meter, &dynamic, error_type).expect("disjoint");
            let merged = key.to_set();
            assert_eq!(key.hash, merged.hash_value());
            assert!(key.matches(&merged));
            assert_eq!(merged.get(ERROR_TYPE_KEY).is_some(), error_type.is_some());
            assert!(!key.matches(&meter));
        }
        let other = pairs(&[("http.route", "/items/{id}"), ("tenant", "globex")]);
        let key = CallKey::new(&meter, &dynamic, None).unwrap();
        let other_key = CallKey::new(&meter, &other, None).unwrap();
        assert!(!key.matches(&other_key.to_set()));
    }

    #[test]
    fn repeated_keys_leave_it_to_the_merge() {
        let meter = AttributeSet::new(pairs(&[("tenant", "a")]));
        assert!(CallKey::new(&meter, &pairs(&[("tenant", "b")]), None).is_none());
        let twice = pairs(&[("route", "a"), ("route", "b")]);
        assert!(CallKey::new(&AttributeSet::empty(), &twice, None).is_none());
        let error = pairs(&[("error.type", "x")]);
        assert!(CallKey::new(&AttributeSet::empty(), &error, Some("y")).is_none());
    }
}
