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

/// A float attribute value as Python compares them: -0.0 is 0.0, and every NaN is one
/// value (so that a NaN equals itself and hashing agrees).
#[inline]
pub fn canonical_float(value: f64) -> f64 {
    if value.is_nan() {
        f64::NAN
    } else if value == 0.0 {
        0.0
    } else {
        value
    }
}

impl PartialEq for AttributeValue {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Str(a), Self::Str(b)) => a == b,
            (Self::Int(a), Self::Int(b)) => a == b,
            (Self::Float(a), Self::Float(b)) => {
                canonical_float(*a).to_bits() == canonical_float(*b).to_bits()
            }
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
            Self::Float(value) => canonical_float(*value).to_bits().hash(state),
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
            (Self::Float(a), Self::Float(b)) => canonical_float(*a).total_cmp(&canonical_float(*b)),
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

/// A borrowed attribute value: what a lookup compares and hashes without allocating.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// Equal texts; short ones (attribute keys and most values) compared in place, without a
/// call to memcmp.
#[inline(always)]
fn same_text(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len()
        && if a.len() <= 16 {
            a.iter().zip(b).all(|(x, y)| x == y)
        } else {
            a == b
        }
}

impl AttributeValue {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Self::Str(value) => ValueRef::Str(value),
            Self::Int(value) => ValueRef::Int(*value),
            Self::Float(value) => ValueRef::Float(*value),
            Self::Bool(value) => ValueRef::Bool(*value),
        }
    }

    /// Whether this value is `other` (floats bitwise, types distinct).
    pub fn is(&self, other: ValueRef<'_>) -> bool {
        match (self, other) {
            (Self::Str(a), ValueRef::Str(b)) => same_text(a, b),
            (Self::Int(a), ValueRef::Int(b)) => *a == b,
            (Self::Float(a), ValueRef::Float(b)) => {
                canonical_float(*a).to_bits() == canonical_float(b).to_bits()
            }
            (Self::Bool(a), ValueRef::Bool(b)) => *a == b,
            _ => false,
        }
    }
}

fn hasher_seed() -> &'static foldhash::fast::RandomState {
    static SEED: std::sync::OnceLock<foldhash::fast::RandomState> = std::sync::OnceLock::new();
    SEED.get_or_init(foldhash::fast::RandomState::default)
}

/// The hash of one key/value pair. A set's hash adds its pairs' hashes, so it does not
/// depend on their order: a lookup can hash a Python dict as it iterates, with no sorting
/// and no allocation, and get the hash of the sorted set. Seeded per process, so attribute
/// values chosen by an attacker cannot be made to collide.
pub fn pair_hash(key: &str, value: ValueRef<'_>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = hasher_seed().build_hasher();
    hasher.write(key.as_bytes());
    hasher.write_u8(0xff); // no key is a prefix of another key's bytes plus a value
    match value {
        ValueRef::Str(text) => {
            hasher.write_u8(0);
            hasher.write(text.as_bytes());
        }
        ValueRef::Int(number) => {
            hasher.write_u8(1);
            hasher.write_u64(number as u64);
        }
        ValueRef::Float(number) => {
            hasher.write_u8(2);
            hasher.write_u64(canonical_float(number).to_bits());
        }
        ValueRef::Bool(flag) => {
            hasher.write_u8(3);
            hasher.write_u8(flag.into());
        }
    }
    hasher.finish()
}

/// Combines pair hashes (in any order) and the number of pairs into a set's hash.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetHasher {
    sum: u64,
    len: u64,
}

impl SetHasher {
    #[inline]
    pub fn add(&mut self, key: &str, value: ValueRef<'_>) {
        self.sum = self.sum.wrapping_add(pair_hash(key, value));
        self.len += 1;
    }

    #[inline]
    pub fn finish(self) -> u64 {
        // splitmix64's finaliser over the sum and the length.
        let mut z = self.sum ^ self.len.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// An immutable set of attributes, sorted by key with unique keys, cheap to clone. Its
/// hash is computed once, when it is built.
#[derive(Clone, Debug)]
pub struct AttributeSet {
    pairs: Arc<[(Arc<str>, AttributeValue)]>,
    hash: u64,
    /// The pairs' hashes summed: a key with more pairs than these hashes from it without
    /// hashing these again (a request's series, from its meter's).
    hasher: SetHasher,
}

impl Default for AttributeSet {
    fn default() -> Self {
        AttributeSet {
            pairs: Arc::from([]),
            hash: SetHasher::default().finish(),
            hasher: SetHasher::default(),
        }
    }
}

impl PartialEq for AttributeSet {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.pairs == other.pairs
    }
}

impl Eq for AttributeSet {}

impl Hash for AttributeSet {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for AttributeSet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AttributeSet {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.pairs, &other.pairs) {
            return std::cmp::Ordering::Equal;
        }
        for ((key, value), (other_key, other_value)) in self.pairs.iter().zip(other.pairs.iter()) {
            let order = if Arc::ptr_eq(key, other_key) {
                std::cmp::Ordering::Equal
            } else {
                key.as_bytes().cmp(other_key.as_bytes())
            }
            .then_with(|| value.cmp(other_value));
            if order.is_ne() {
                return order;
            }
        }
        self.pairs.len().cmp(&other.pairs.len())
    }
}

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
        let mut hasher = SetHasher::default();
        for (key, value) in &unique {
            hasher.add(key, value.as_ref());
        }
        AttributeSet {
            pairs: unique.into(),
            hash: hasher.finish(),
            hasher,
        }
    }

    /// The hasher state over this set's pairs, to add more pairs to.
    pub fn hasher(&self) -> SetHasher {
        self.hasher
    }

    /// The set's hash: equal to [`SetHasher`] over the same pairs in any order.
    pub fn hash_value(&self) -> u64 {
        self.hash
    }

    /// Whether this set holds exactly `len` pairs and `pair(key)` is each key's value here
    /// (a lookup from borrowed data, e.g. a Python dict, with no set built).
    pub fn matches<'a>(
        &self,
        len: usize,
        mut pairs: impl Iterator<Item = (&'a str, ValueRef<'a>)>,
    ) -> bool {
        len == self.pairs.len()
            && pairs.all(|(key, value)| self.get(key).is_some_and(|mine| mine.is(value)))
    }

    pub fn empty() -> Self {
        Self::default()
    }

    /// This set with `extra` added (its values win over this set's).
    pub fn merged(&self, extra: impl IntoIterator<Item = (Arc<str>, AttributeValue)>) -> Self {
        Self::new(self.pairs.iter().cloned().chain(extra))
    }

    /// This set with one more attribute.
    pub fn with(&self, key: &str, value: AttributeValue) -> Self {
        self.merged([(Arc::from(key), value)])
    }

    pub fn overflow() -> Self {
        Self::new([(Arc::from(OVERFLOW_KEY), AttributeValue::Bool(true))])
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &AttributeValue)> {
        self.pairs.iter().map(|(key, value)| (&**key, value))
    }

    pub fn get(&self, key: &str) -> Option<&AttributeValue> {
        // A key made natively is mostly the very text this set holds (the same Arc): found
        // by address first, with no text compared.
        if let Some((_, value)) = self
            .pairs
            .iter()
            .find(|(mine, _)| std::ptr::eq(mine.as_ptr(), key.as_ptr()) && mine.len() == key.len())
        {
            return Some(value);
        }
        if self.pairs.len() <= 8 {
            // Few keys (a request's meter has three): their lengths first, so a key that is
            // not here (a request's route, looked for in its meter's) reads no other text.
            return self
                .pairs
                .iter()
                .find(|(mine, _)| mine.len() == key.len() && **mine == *key)
                .map(|(_, value)| value);
        }
        self.pairs
            .binary_search_by(|(probe, _)| (**probe).cmp(key))
            .ok()
            .map(|index| &self.pairs[index].1)
    }

    /// A key that orders like the set (its first pair's key and value), for sorting many
    /// sets: when two keys differ they order the sets; when they are equal the sets must be
    /// compared in full.
    pub fn sort_prefix(&self) -> (u64, u128) {
        let Some((key, value)) = self.pairs.first() else {
            return (0, 0);
        };
        // The key's first 7 bytes, then its length (capped): orders like the key, since a
        // key that is a prefix of another has zeros where the other has bytes, or, when
        // those bytes are zeros too, is shorter.
        let mut key_bytes = [0u8; 8];
        let head = &key.as_bytes()[..key.len().min(7)];
        key_bytes[..head.len()].copy_from_slice(head);
        key_bytes[7] = key.len().min(8) as u8;
        if key.len() > 7 {
            // Keys equal in their first 7 bytes may still differ: the value says nothing.
            return (u64::from_be_bytes(key_bytes), 0);
        }
        let order_bits = match value {
            AttributeValue::Str(text) => {
                let mut bytes = [0u8; 8];
                let head = &text.as_bytes()[..text.len().min(8)];
                bytes[..head.len()].copy_from_slice(head);
                u64::from_be_bytes(bytes)
            }
            AttributeValue::Int(number) => (*number as u64) ^ (1 << 63),
            AttributeValue::Float(number) => {
                let bits = canonical_float(*number).to_bits();
                // total_cmp's order as unsigned bits
                if bits >> 63 == 1 {
                    !bits
                } else {
                    bits | (1 << 63)
                }
            }
            AttributeValue::Bool(flag) => u64::from(*flag),
        };
        (
            u64::from_be_bytes(key_bytes),
            (u128::from(value.rank()) << 64) | u128::from(order_bits),
        )
    }

    /// Where this set's pairs live: equal for clones of one set, so a value derived from a
    /// set can be cached by it while the set is alive.
    pub fn address(&self) -> usize {
        self.pairs.as_ptr() as usize
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
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
    fn the_hash_does_not_depend_on_the_order_and_matches_borrowed_pairs() {
        let a = set(&[("b", AttributeValue::Int(1)), ("a", "x".into())]);
        let mut hasher = SetHasher::default();
        hasher.add("b", ValueRef::Int(1));
        hasher.add("a", ValueRef::Str("x"));
        assert_eq!(a.hash_value(), hasher.finish());
        assert!(a.matches(
            2,
            [("b", ValueRef::Int(1)), ("a", ValueRef::Str("x"))].into_iter()
        ));
        assert!(!a.matches(
            2,
            [("b", ValueRef::Bool(true)), ("a", ValueRef::Str("x"))].into_iter()
        ));
        assert!(!a.matches(1, [("a", ValueRef::Str("x"))].into_iter()));
        // Types and values that Python calls equal are distinct attributes here.
        let one = set(&[("n", AttributeValue::Int(1))]);
        let yes = set(&[("n", AttributeValue::Bool(true))]);
        let float = set(&[("n", AttributeValue::Float(1.0))]);
        assert_ne!(one.hash_value(), yes.hash_value());
        assert_ne!(one.hash_value(), float.hash_value());
        assert_ne!(
            set(&[("ab", "c".into())]).hash_value(),
            set(&[("a", "bc".into())]).hash_value()
        );
        assert_eq!(
            AttributeSet::empty().hash_value(),
            AttributeSet::new([]).hash_value()
        );
    }

    #[test]
    fn the_sort_prefix_never_contradicts_the_order() {
        let sets = [
            set(&[]),
            set(&[("a", "x".into())]),
            set(&[("a", "xyzxyzxyz1".into())]),
            set(&[("a", "xyzxyzxyz2".into())]),
            set(&[("a", AttributeValue::Int(-5))]),
            set(&[("a", AttributeValue::Int(3))]),
            set(&[("a", AttributeValue::Float(-1.5))]),
            set(&[("a", AttributeValue::Float(2.0))]),
            set(&[("a", AttributeValue::Bool(false))]),
            set(&[("a", AttributeValue::Bool(true)), ("b", "z".into())]),
            set(&[("abcdefghij", AttributeValue::Int(1))]),
            set(&[("abcdefghik", AttributeValue::Int(0))]),
            set(&[("b", "a".into())]),
            set(&[("ab", AttributeValue::Int(9))]),
            set(&[("ab\0", AttributeValue::Int(1))]),
        ];
        for a in &sets {
            for b in &sets {
                let prefix = a.sort_prefix().cmp(&b.sort_prefix());
                if prefix.is_ne() {
                    assert_eq!(prefix, a.cmp(b), "{a:?} {b:?}");
                }
            }
        }
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
