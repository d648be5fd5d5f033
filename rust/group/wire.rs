//! Series identities and snapshots as bytes, for the segment: a member's directory names
//! its series this way, and a graveyard holds the folded totals of exited members so.
//! Little-endian, length-prefixed; a decoder given bytes it cannot read returns `None`.

use crate::aggregate::attributes::{AttributeSet, AttributeValue};
use crate::aggregate::boundaries::{Boundaries, MAX_BOUNDARIES};
use crate::aggregate::histogram::HistogramSnapshot;
use crate::aggregate::snapshot::{MeasureSnapshot, SeriesKind, SeriesSnapshot};
use std::sync::Arc;

/// The version of these bytes (part of the segment's layout): 2 added a custom histogram's
/// boundaries to its identity.
pub const FORMAT: u64 = 2;

/// What identifies a series across the group, and what its exports need besides values.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub kind: SeriesKind,
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub description: Arc<str>,
    /// A custom histogram's explicit bucket boundaries (how it is exported, not which
    /// series it is: the group sums series whatever boundaries their members gave).
    pub boundaries: Option<Boundaries>,
    pub attributes: AttributeSet,
}

#[derive(Default)]
pub struct Writer {
    pub bytes: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }
    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    fn i64(&mut self, value: i64) {
        self.u64(value as u64);
    }
    fn f64(&mut self, value: f64) {
        self.u64(value.to_bits());
    }
    fn str(&mut self, value: &str) {
        self.u64(value.len() as u64);
        self.bytes.extend_from_slice(value.as_bytes());
    }

    pub fn identity(&mut self, identity: &Identity) {
        self.u8(identity.kind as u8);
        self.str(&identity.name);
        self.str(&identity.unit);
        self.str(&identity.description);
        // The count, then the values; 0: none (a set holds at least one).
        let boundaries = identity.boundaries.as_deref().unwrap_or(&[]);
        self.u64(boundaries.len() as u64);
        for &value in boundaries {
            self.f64(value);
        }
        self.u64(identity.attributes.len() as u64);
        for (key, value) in identity.attributes.iter() {
            self.str(key);
            match value {
                AttributeValue::Str(text) => {
                    self.u8(0);
                    self.str(text);
                }
                AttributeValue::Int(number) => {
                    self.u8(1);
                    self.i64(*number);
                }
                AttributeValue::Float(number) => {
                    self.u8(2);
                    self.f64(*number);
                }
                AttributeValue::Bool(flag) => {
                    self.u8(3);
                    self.u8(u8::from(*flag));
                }
            }
        }
    }

    fn histogram(&mut self, histogram: &HistogramSnapshot) {
        self.i64(histogram.scale as i64);
        self.u64(histogram.count);
        self.f64(histogram.sum);
        self.f64(histogram.min);
        self.f64(histogram.max);
        self.u64(histogram.zero_count);
        self.i64(histogram.offset as i64);
        self.u64(histogram.bucket_counts.len() as u64);
        for &count in &histogram.bucket_counts {
            self.u64(count);
        }
        self.f64(histogram.weighted_extra);
        self.u64(histogram.cuts.len() as u64);
        for &(index, below) in &histogram.cuts {
            self.i64(index as i64);
            self.u64(below);
        }
    }

    /// A series' values (exemplars and calls in flight stay with live processes).
    pub fn series(&mut self, series: &SeriesSnapshot) {
        self.identity(&identity_of(series));
        self.u64(series.count);
        self.f64(series.value);
        self.u64(series.measures.len() as u64);
        for measure in &series.measures {
            self.str(&measure.name);
            self.str(&measure.unit);
            self.histogram(&measure.histogram);
        }
    }
}

pub fn identity_of(series: &SeriesSnapshot) -> Identity {
    Identity {
        kind: series.kind,
        name: Arc::clone(&series.name),
        unit: Arc::clone(&series.unit),
        description: Arc::clone(&series.description),
        boundaries: series.boundaries.clone(),
        attributes: series.attributes.clone(),
    }
}

pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < count {
            return None;
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Some(taken)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn len(&mut self) -> Option<usize> {
        let length = usize::try_from(self.u64()?).ok()?;
        // Never more items than bytes left: a corrupt length cannot allocate wildly.
        (length <= self.bytes.len()).then_some(length)
    }
    fn i64(&mut self) -> Option<i64> {
        Some(self.u64()? as i64)
    }
    fn f64(&mut self) -> Option<f64> {
        Some(f64::from_bits(self.u64()?))
    }
    fn str(&mut self) -> Option<Arc<str>> {
        let length = self.len()?;
        std::str::from_utf8(self.take(length)?).ok().map(Arc::from)
    }

    pub fn identity(&mut self) -> Option<Identity> {
        let kind = match self.u8()? {
            0 => SeriesKind::Call,
            1 => SeriesKind::Histogram,
            2 => SeriesKind::Counter,
            _ => return None,
        };
        let (name, unit, description) = (self.str()?, self.str()?, self.str()?);
        let boundaries = match self.len()? {
            0 => None,
            count if count <= MAX_BOUNDARIES => {
                let values = (0..count).map(|_| self.f64()).collect::<Option<Vec<_>>>()?;
                // Checked as a new instrument's are: bytes that are no such set are none.
                Some(Boundaries::new(values).ok()?)
            }
            _ => return None,
        };
        let pairs = self.len()?;
        let mut attributes = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            let key = self.str()?;
            let value = match self.u8()? {
                0 => AttributeValue::Str(self.str()?),
                1 => AttributeValue::Int(self.i64()?),
                2 => AttributeValue::Float(self.f64()?),
                3 => AttributeValue::Bool(self.u8()? != 0),
                _ => return None,
            };
            attributes.push((key, value));
        }
        Some(Identity {
            kind,
            name,
            unit,
            description,
            boundaries,
            attributes: AttributeSet::new(attributes),
        })
    }

    fn histogram(&mut self) -> Option<HistogramSnapshot> {
        let scale = i32::try_from(self.i64()?).ok()?;
        let (count, sum, min, max, zero_count) = (
            self.u64()?,
            self.f64()?,
            self.f64()?,
            self.f64()?,
            self.u64()?,
        );
        let offset = i32::try_from(self.i64()?).ok()?;
        let buckets = self.len()?;
        let bucket_counts = (0..buckets)
            .map(|_| self.u64())
            .collect::<Option<Vec<_>>>()?;
        let weighted_extra = self.f64()?;
        let cut_count = self.len()?;
        let cuts = (0..cut_count)
            .map(|_| Some((i32::try_from(self.i64()?).ok()?, self.u64()?)))
            .collect::<Option<Vec<_>>>()?;
        // Checked as a pickle's state is: bytes that do not add up are no snapshot.
        HistogramSnapshot::from_parts((
            scale,
            count,
            sum,
            min,
            max,
            zero_count,
            offset,
            bucket_counts,
            weighted_extra,
            cuts,
        ))
    }

    pub fn series(&mut self) -> Option<SeriesSnapshot> {
        let identity = self.identity()?;
        let (count, value) = (self.u64()?, self.f64()?);
        let measure_count = self.len()?;
        let measures = (0..measure_count)
            .map(|_| {
                Some(MeasureSnapshot {
                    name: self.str()?,
                    unit: self.str()?,
                    histogram: self.histogram()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(SeriesSnapshot {
            kind: identity.kind,
            name: identity.name,
            unit: identity.unit,
            description: identity.description,
            boundaries: identity.boundaries,
            attributes: identity.attributes,
            count,
            measures,
            value,
            exemplars: Vec::new(),
            active: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::histogram::AtomicHistogram;

    fn series() -> SeriesSnapshot {
        let histogram = AtomicHistogram::new();
        for value in [0.0, 0.001, 0.005, 2.5, 1e6] {
            histogram.record(value);
        }
        SeriesSnapshot {
            kind: SeriesKind::Call,
            name: "db.query".into(),
            unit: "s".into(),
            description: "".into(),
            boundaries: None,
            attributes: AttributeSet::new([
                ("route".into(), AttributeValue::Str("/a b".into())),
                ("rows".into(), AttributeValue::Int(-3)),
                ("ratio".into(), AttributeValue::Float(0.25)),
                ("cached".into(), AttributeValue::Bool(true)),
            ]),
            count: 5,
            measures: vec![MeasureSnapshot {
                name: "duration".into(),
                unit: "s".into(),
                histogram: histogram.snapshot(),
            }],
            value: 0.0,
            exemplars: Vec::new(),
            active: None,
        }
    }

    #[test]
    fn series_round_trip() {
        let original = series();
        let mut writer = Writer::default();
        writer.series(&original);
        writer.series(&original);
        let mut reader = Reader::new(&writer.bytes);
        for _ in 0..2 {
            let read = reader.series().unwrap();
            assert_eq!(identity_of(&read), identity_of(&original));
            assert_eq!(read.count, original.count);
            assert_eq!(read.measures[0].histogram, original.measures[0].histogram);
        }
        assert!(reader.is_empty());
    }

    #[test]
    fn truncated_or_corrupt_bytes_read_as_nothing() {
        let mut writer = Writer::default();
        writer.series(&series());
        for cut in 0..writer.bytes.len() {
            assert!(
                Reader::new(&writer.bytes[..cut]).series().is_none(),
                "{cut}"
            );
        }
        let mut huge = writer.bytes.clone();
        huge[1..9].copy_from_slice(&u64::MAX.to_le_bytes()); // the name's length
        assert!(Reader::new(&huge).series().is_none());
    }

    #[test]
    fn a_histograms_boundaries_travel_with_its_identity() {
        let mut original = series();
        original.kind = SeriesKind::Histogram;
        original.boundaries = Some(Boundaries::new([0.0, 0.005, 1024.0]).unwrap());
        let mut writer = Writer::default();
        writer.series(&original);
        let read = Reader::new(&writer.bytes).series().unwrap();
        assert_eq!(read.boundaries, original.boundaries);
        assert_eq!(read.boundaries.as_deref(), Some(&[0.0, 0.005, 1024.0][..]));
        // Bytes that are no set of boundaries (not increasing, too many) read as nothing.
        let at = writer
            .bytes
            .windows(8)
            .position(|word| word == 0.005f64.to_bits().to_le_bytes())
            .unwrap();
        let mut unsorted = writer.bytes.clone();
        unsorted[at..at + 8].copy_from_slice(&2048f64.to_bits().to_le_bytes());
        assert!(Reader::new(&unsorted).series().is_none());
        let count_at = at - 16; // the count, then 0.0, then 0.005
        assert_eq!(writer.bytes[count_at..count_at + 8], 3u64.to_le_bytes());
        let mut many = writer.bytes.clone();
        many[count_at..count_at + 8].copy_from_slice(&65u64.to_le_bytes());
        assert!(Reader::new(&many).series().is_none());
    }
}
