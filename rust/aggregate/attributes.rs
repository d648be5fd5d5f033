//! Attribute sets: the key that, with the operation or instrument name, identifies a series.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// One attribute value. The same four types OpenTelemetry allows for scalar attributes.
#[derive(Clone, Debug)]
pub enum AttributeValue {
    Str(Arc<str>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl PartialEq for AttributeValue {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Str(a), Self::Str(b)) => a == b,
            (Self::Int(a), Self::Int(b)) => a == b,
            // Bitwise, so that every value (NaN included) equals itself and hashing agrees.
            (Self::Float(a), Self::Float(b)) => a.to_bits() == b.to_bits(),
            (Self::Bool(a), Self::Bool(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for AttributeValue {}

impl Hash for AttributeValue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Self::Str(value) => value.hash(state),
            Self::Int(value) => value.hash(state),
            Self::Float(value) => value.to_bits().hash(state),
            Self::Bool(value) => value.hash(state),
        }
    }
}

impl AttributeValue {
    fn rank(&self) -> u8 {
        match self {
            Self::Str(_) => 0,
            Self::Int(_) => 1,
            Self::Float(_) => 2,
            Self::Bool(_) => 3,
        }
    }
}

/// A total order consistent with `Eq` (floats by `total_cmp`, which is equal exactly when
/// the bits are), so that snapshots can list series in a stable order.
impl Ord for AttributeValue {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Self::Str(a), Self::Str(b)) => a.cmp(b),
            (Self::Int(a), Self::Int(b)) => a.cmp(b),
            (Self::Float(a), Self::Float(b)) => a.total_cmp(b),
            (Self::Bool(a), Self::Bool(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for AttributeValue {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for AttributeValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(value) => f.write_str(value),
            Self::Int(value) => write!(f, "{value}"),
            Self::Float(value) => write!(f, "{value}"),
            Self::Bool(value) => write!(f, "{value}"),
        }
    }
}

impl From<&str> for AttributeValue {
    fn from(value: &str) -> Self {
        Self::Str(value.into())
    }
}

/// An immutable set of attributes, sorted by key with unique keys, cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct AttributeSet(Arc<[(Arc<str>, AttributeValue)]>);

/// The attribute OpenTelemetry puts on the series that absorbs values past the
/// cardinality limit.
pub const OVERFLOW_KEY: &str = "otel.metric.overflow";
/// The semantic-convention attribute of a failed call: the exception's class name.
pub const ERROR_TYPE_KEY: &str = "error.type";

impl AttributeSet {
    /// Builds a set; a key given twice keeps its last value.
    pub fn new(pairs: impl IntoIterator<Item = (Arc<str>, AttributeValue)>) -> Self {
        let mut pairs: Vec<(Arc<str>, AttributeValue)> = pairs.into_iter().collect();
        // A stable sort keeps the given order among equal keys, so the last one wins below.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut unique: Vec<(Arc<str>, AttributeValue)> = Vec::with_capacity(pairs.len());
        for pair in pairs {
            match unique.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => unique.push(pair),
            }
        }
        AttributeSet(unique.into())
    }

    pub fn empty() -> Self {
        Self::default()
    }

    /// This set with `extra` added (its values win over this set's).
    pub fn merged(&self, extra: impl IntoIterator<Item = (Arc<str>, AttributeValue)>) -> Self {
        Self::new(self.0.iter().cloned().chain(extra))
    }

    /// This set with one more attribute.
    pub fn with(&self, key: &str, value: AttributeValue) -> Self {
        self.merged([(Arc::from(key), value)])
    }

    pub fn overflow() -> Self {
        Self::new([(Arc::from(OVERFLOW_KEY), AttributeValue::Bool(true))])
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &AttributeValue)> {
        self.0.iter().map(|(key, value)| (&**key, value))
    }

    pub fn get(&self, key: &str) -> Option<&AttributeValue> {
        self.0
            .binary_search_by(|(probe, _)| (**probe).cmp(key))
            .ok()
            .map(|index| &self.0[index].1)
    }

    /// Where this set's pairs live: equal for clones of one set, so a value derived from a
    /// set can be cached by it while the set is alive.
    pub fn address(&self) -> usize {
        self.0.as_ptr() as usize
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, AttributeValue)]) -> AttributeSet {
        AttributeSet::new(pairs.iter().map(|(k, v)| (Arc::from(*k), v.clone())))
    }

    #[test]
    fn order_does_not_matter_and_last_value_wins() {
        let a = set(&[("b", AttributeValue::Int(1)), ("a", "x".into())]);
        let b = set(&[
            ("a", "x".into()),
            ("b", AttributeValue::Int(0)),
            ("b", AttributeValue::Int(1)),
        ]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert_eq!(a.get("b"), Some(&AttributeValue::Int(1)));
        assert_eq!(a.get("c"), None);
    }

    #[test]
    fn types_are_distinct() {
        assert_ne!(
            set(&[("a", AttributeValue::Int(1))]),
            set(&[("a", AttributeValue::Float(1.0))])
        );
        assert_ne!(
            set(&[("a", AttributeValue::Bool(true))]),
            set(&[("a", AttributeValue::Int(1))])
        );
    }

    #[test]
    fn the_order_agrees_with_equality() {
        let values = [
            AttributeValue::from("a"),
            AttributeValue::Int(-1),
            AttributeValue::Float(f64::NAN),
            AttributeValue::Float(-0.0),
            AttributeValue::Float(0.0),
            AttributeValue::Bool(false),
        ];
        for a in &values {
            for b in &values {
                assert_eq!(a.cmp(b) == std::cmp::Ordering::Equal, a == b, "{a:?} {b:?}");
                assert_eq!(a.cmp(b), b.cmp(a).reverse());
            }
        }
        let short = set(&[("a", "x".into())]);
        let long = set(&[("a", "x".into()), ("b", "y".into())]);
        assert!(short < long);
    }

    #[test]
    fn with_adds_or_replaces() {
        let base = set(&[("tier", "gold".into())]);
        let failed = base.with(ERROR_TYPE_KEY, "ValueError".into());
        assert_eq!(failed.len(), 2);
        assert_eq!(base.len(), 1);
        assert_eq!(
            failed.with("tier", "free".into()).get("tier"),
            Some(&"free".into())
        );
    }
}
