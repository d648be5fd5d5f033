//! The explicit bucket boundaries meterage exports with, and which exponential buckets they
//! cut.
//!
//! An exponential bucket (`base^i`, `base^(i+1)`] at scale 4 is ~4.4% wide. An explicit
//! boundary that falls inside one cuts it, and the bucket's count alone cannot say how
//! many of its values were at or below the boundary. So the histograms keep, for each cut
//! bucket, that number too ([`cut_of_slot`]): explicit counts are then exact for these
//! boundaries, whatever the values (integer sizes and token counts landing exactly on a
//! boundary included). Powers of two are bucket edges at every scale and need nothing.
//!
//! The table is built at compile time, so recording checks it with one byte load. It is the
//! same in every process of a group (the build's [`FINGERPRINT`] is part of the segment's
//! layout): a chunk's at-or-below counters mean the same boundaries to every reader.
//!
//! Custom histograms may ask for boundaries of their own ([`Boundaries`], OpenTelemetry's
//! advisory explicit bucket boundaries). Those are exported as asked, and exact wherever
//! [`is_exact`] says so: for the sets of [`NAMED`] always.

use crate::probe::catalog::same;
use crate::probe::{DURATION, MEASURES};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The OpenTelemetry SDK's default explicit boundaries, for custom histograms.
pub const SDK_DEFAULT: [f64; 15] = [
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 7500.0,
    10000.0,
];

/// Seconds a job waits in its queue (`job.queue.wait`): from a millisecond to an hour. The
/// request-duration boundaries (5 ms to 10 s) with 1 ms below them and 20 s, 1 min, 5 min,
/// 20 min and 1 h above: a backlog's waits are minutes, where 10 s would leave them all in
/// the last bucket. The longer steps are the round numbers that fit the cut table without
/// growing the chunks (at most [`CUTS_PER_OCTAVE`] cuts per octave: 30 s, 2 and 10 min
/// share octaves with two boundaries each already).
pub const QUEUE_WAIT: [f64; 20] = {
    let mut out = [0.0; 20];
    out[0] = 0.001;
    let duration = DURATION.boundaries;
    let mut i = 0;
    while i < duration.len() {
        out[i + 1] = duration[i];
        i += 1;
    }
    let longer = [20.0, 60.0, 300.0, 1200.0, 3600.0];
    let mut j = 0;
    while j < longer.len() {
        out[duration.len() + 1 + j] = longer[j];
        j += 1;
    }
    assert!(duration.len() + 1 + longer.len() == out.len());
    out
};

/// Every boundary set meterage exports with: the call duration's, each probe measure's
/// (as its declaration gives them; sets shared by measures appear more than once), the SDK
/// default of custom histograms and the queue wait's.
pub const SETS: [&[f64]; MEASURES.len() + 3] = {
    let mut out: [&[f64]; MEASURES.len() + 3] = [&SDK_DEFAULT; MEASURES.len() + 3];
    out[1] = DURATION.boundaries;
    out[2] = &QUEUE_WAIT;
    let mut index = 0;
    while index < MEASURES.len() {
        out[index + 3] = MEASURES[index].boundaries;
        index += 1;
    }
    out
};

/// The boundaries of the probe measure `key`.
const fn of_measure(key: &str) -> &'static [f64] {
    let mut index = 0;
    while index < MEASURES.len() {
        if same(MEASURES[index].key, key) {
            return MEASURES[index].boundaries;
        }
        index += 1;
    }
    panic!("no such measure")
}

/// meterage's boundary sets by name (`meterage.BOUNDARIES`), each counted exactly by every
/// histogram. A test checks that every set of [`SETS`] has a name here.
pub const NAMED: [(&str, &[f64]); 9] = [
    ("duration", DURATION.boundaries),
    ("cpu.time", of_measure("cpu.time")),
    ("queue.wait", &QUEUE_WAIT),
    ("bytes", of_measure("io.read")),
    ("events", of_measure("paging.faults.minor")),
    ("allocations", of_measure("memory.allocations")),
    ("energy", of_measure("gpu.energy")),
    ("gpu.memory", of_measure("gpu.memory")),
    ("default", &SDK_DEFAULT),
];

/// Cut buckets per octave that keep an at-or-below count (each octave's chunk has room
/// for this many).
pub const CUTS_PER_OCTAVE: usize = 2;
/// At most this many distinct cutting boundaries (ids fit in a byte, 0 meaning none).
const MAX_CUTS: usize = 255;

/// One boundary that cuts an exponential bucket.
#[derive(Clone, Copy, Debug)]
pub struct Cut {
    /// The boundary, as f64 bits (positive values order like their bits).
    pub bits: u64,
    /// Which of its octave's at-or-below counters it uses.
    pub position: usize,
}

struct CutTable {
    /// By directory slot (bucket index + bias): 0, or 1 + an index into `cuts`.
    of_slot: [u8; super::histogram::SLOTS],
    cuts: [Cut; MAX_CUTS],
}

const fn is_power_of_two(value: f64) -> bool {
    value.to_bits() & ((1 << 52) - 1) == 0
}

const TABLE: CutTable = {
    let mut table = CutTable {
        of_slot: [0; super::histogram::SLOTS],
        cuts: [Cut {
            bits: 0,
            position: 0,
        }; MAX_CUTS],
    };
    let mut used = 0;
    let mut set = 0;
    while set < SETS.len() {
        let values = SETS[set];
        let mut i = 0;
        while i < values.len() {
            let value = values[i];
            i += 1;
            if value <= 0.0 || is_power_of_two(value) {
                continue;
            }
            let bits = value.to_bits();
            let slot = super::histogram::slot_of_bits(bits);
            let existing = table.of_slot[slot];
            if existing != 0 {
                // The same value from another set; two different ones in one bucket
                // would need a second counter there.
                assert!(table.cuts[existing as usize - 1].bits == bits);
                continue;
            }
            // The octave's other cuts come before it in slot order or were added earlier.
            let first = slot & !(super::histogram::SUB - 1);
            let mut position = 0;
            let mut other = first;
            while other < first + super::histogram::SUB {
                if table.of_slot[other] != 0 {
                    position += 1;
                }
                other += 1;
            }
            assert!(position < CUTS_PER_OCTAVE);
            assert!(used < MAX_CUTS);
            table.cuts[used] = Cut { bits, position };
            used += 1;
            table.of_slot[slot] = used as u8;
        }
        set += 1;
    }
    table
};

static CUTS: CutTable = TABLE;

/// Whether any bucket of an octave (a power of two) is cut: snapshots skip the others.
static OCTAVE_CUT: [bool; super::histogram::SLOTS / super::histogram::SUB] = {
    let mut out = [false; super::histogram::SLOTS / super::histogram::SUB];
    let mut slot = 0;
    while slot < super::histogram::SLOTS {
        if TABLE.of_slot[slot] != 0 {
            out[slot / super::histogram::SUB] = true;
        }
        slot += 1;
    }
    out
};

/// Whether a bucket of `octave` is cut by one of the boundaries.
#[inline(always)]
pub fn octave_is_cut(octave: usize) -> bool {
    OCTAVE_CUT[octave % OCTAVE_CUT.len()]
}

/// The boundary that cuts the bucket at directory `slot`, if any.
#[inline(always)]
pub fn cut_of_slot(slot: usize) -> Option<&'static Cut> {
    match CUTS.of_slot[slot & (super::histogram::SLOTS - 1)] {
        0 => None,
        id => Some(&CUTS.cuts[id as usize - 1]),
    }
}

/// The boundary that cuts the bucket `index` (at the recording scale), if any.
pub fn cut_of_index(index: i32) -> Option<&'static Cut> {
    let slot = index.checked_add(super::histogram::SLOT_BIAS)?;
    (0..super::histogram::SLOTS as i32)
        .contains(&slot)
        .then(|| cut_of_slot(slot as usize))
        .flatten()
}

/// A fingerprint of the cut table: which bucket each cutting boundary cuts and which
/// at-or-below counter it uses. Builds whose tables differ cannot share a process group.
pub const FINGERPRINT: u64 = {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut slot = 0;
    while slot < super::histogram::SLOTS {
        let id = TABLE.of_slot[slot];
        if id != 0 {
            let cut = TABLE.cuts[id as usize - 1];
            let words = [slot as u64, cut.bits, cut.position as u64];
            let mut i = 0;
            while i < words.len() {
                hash = (hash ^ words[i]).wrapping_mul(0x100_0000_01b3);
                i += 1;
            }
        }
        slot += 1;
    }
    hash
};

/// Whether explicit counts for `values` (ascending) are exact whatever was recorded: every
/// boundary is 0, a power of two (a bucket edge at every scale), or a boundary of the cut
/// table that is alone in the exponential bucket it cuts. True for every set of [`SETS`];
/// for other boundaries a cut bucket is split by its geometric midpoint (a value at most
/// one bucket width, 4.4%, from its true side).
pub fn is_exact(values: &[f64]) -> bool {
    let mut previous_slot = None;
    for &value in values {
        if value <= 0.0 || is_power_of_two(value) {
            continue;
        }
        let bits = value.to_bits();
        let slot = super::histogram::slot_of_bits(bits);
        let counted = cut_of_slot(slot).is_some_and(|cut| cut.bits == bits);
        if !counted || previous_slot == Some(slot) {
            return false;
        }
        previous_slot = Some(slot);
    }
    true
}

/// The most boundaries a custom histogram may ask for.
pub const MAX_BOUNDARIES: usize = 64;

/// Explicit bucket boundaries a custom histogram asks to be exported with (OpenTelemetry's
/// advisory `explicit_bucket_boundaries`): 1 to [`MAX_BOUNDARIES`] finite, non-negative
/// numbers in strictly increasing order. Compared and hashed by value (no NaN, and -0.0 is
/// stored as 0.0, so that is the values' bits).
#[derive(Clone, Debug)]
pub struct Boundaries(Arc<[f64]>);

impl Boundaries {
    /// The boundaries, or why `values` cannot be (a sentence naming `boundaries`).
    pub fn new(values: impl IntoIterator<Item = f64>) -> Result<Self, String> {
        let mut checked: Vec<f64> = Vec::new();
        for (index, value) in values.into_iter().enumerate() {
            if index == MAX_BOUNDARIES {
                return Err(refused(format_args!("got more than {MAX_BOUNDARIES}")));
            }
            // -0.0 is 0.0 (its bits would compare apart).
            let value = if value == 0.0 { 0.0 } else { value };
            if !value.is_finite() {
                return Err(refused(format_args!("boundaries[{index}] is {value}")));
            }
            if value < 0.0 {
                return Err(refused(format_args!(
                    "boundaries[{index}] is {value:?} (histogram values are never negative)"
                )));
            }
            if let Some(&before) = checked.last() {
                if value <= before {
                    return Err(refused(format_args!(
                        "boundaries[{index}] ({value:?}) does not exceed boundaries[{}] \
                         ({before:?})",
                        index - 1
                    )));
                }
            }
            checked.push(value);
        }
        if checked.is_empty() {
            return Err(refused(format_args!("got no values")));
        }
        Ok(Boundaries(checked.into()))
    }

    /// The values, ascending.
    pub fn values(&self) -> &Arc<[f64]> {
        &self.0
    }
}

fn refused(problem: std::fmt::Arguments<'_>) -> String {
    format!(
        "boundaries must be 1 to {MAX_BOUNDARIES} finite, non-negative numbers in strictly \
         increasing order (or None for the default ones); {problem}"
    )
}

impl std::ops::Deref for Boundaries {
    type Target = [f64];

    fn deref(&self) -> &[f64] {
        &self.0
    }
}

impl PartialEq for Boundaries {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || self.0.len() == other.0.len()
                && self
                    .0
                    .iter()
                    .zip(other.0.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl Eq for Boundaries {}

impl Hash for Boundaries {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.0.len());
        for value in self.0.iter() {
            state.write_u64(value.to_bits());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::histogram::bucket_index;

    #[test]
    fn every_boundary_that_is_not_an_edge_has_its_cut() {
        for values in SETS {
            for &value in values {
                if value == 0.0 || is_power_of_two(value) {
                    continue; // a bucket edge (its bucket may still be cut by another value)
                }
                let slot = (bucket_index(value) + crate::aggregate::histogram::SLOT_BIAS) as usize;
                let cut = cut_of_slot(slot).expect("a cut");
                assert_eq!(f64::from_bits(cut.bits), value);
            }
        }
    }

    #[test]
    fn the_sets_are_ascending() {
        for values in SETS {
            assert!(
                values.windows(2).all(|pair| pair[0] < pair[1]),
                "{values:?}"
            );
        }
    }

    #[test]
    fn every_set_has_a_name_and_every_named_set_is_exact() {
        for values in SETS {
            assert!(
                NAMED.iter().any(|(_, named)| named == &values),
                "{values:?} has no name in NAMED"
            );
        }
        for (name, values) in NAMED {
            assert!(is_exact(values), "{name}");
            assert!(Boundaries::new(values.iter().copied()).is_ok(), "{name}");
        }
        let names: std::collections::HashSet<_> = NAMED.iter().map(|(name, _)| name).collect();
        assert_eq!(names.len(), NAMED.len());
    }

    #[test]
    fn the_queue_wait_set_runs_from_a_millisecond_to_an_hour() {
        assert_eq!(QUEUE_WAIT[0], 0.001);
        assert_eq!(&QUEUE_WAIT[1..15], DURATION.boundaries);
        assert_eq!(&QUEUE_WAIT[15..], &[20.0, 60.0, 300.0, 1200.0, 3600.0]);
    }

    #[test]
    fn exactness_of_other_boundaries() {
        // Values of the sets, 0 and powers of two, in any combination.
        assert!(is_exact(&[0.0, 0.5, 1.0, 5.0, 1024.0, 3600.0]));
        assert!(is_exact(&[1e-6, 0.25, 2.0f64.powi(40)]));
        // 5.1 is in no set; 5.0 is, but 5.1 shares its exponential bucket.
        assert!(!is_exact(&[5.1]));
        assert!(!is_exact(&[5.0, 5.1]));
        assert!(!is_exact(&[0.3]));
        // Two values of the sets never share a bucket, but a value and its neighbour do.
        assert!(!is_exact(&[0.075, 0.0751]));
    }

    #[test]
    fn boundaries_are_checked_and_say_what_is_allowed() {
        let ok = Boundaries::new([0.0, 0.5, 2.0]).unwrap();
        assert_eq!(&ok[..], &[0.0, 0.5, 2.0]);
        assert_eq!(ok, Boundaries::new(vec![0.0, 0.5, 2.0]).unwrap());
        assert_ne!(ok, Boundaries::new([0.0, 0.5]).unwrap());
        let minus_zero = Boundaries::new([-0.0, 1.0]).unwrap();
        assert_eq!(minus_zero[0].to_bits(), 0);
        assert_eq!(minus_zero, Boundaries::new([0.0, 1.0]).unwrap());
        let cases: [(&[f64], &str); 7] = [
            (&[], "got no values"),
            (&[1.0, f64::NAN], "boundaries[1] is NaN"),
            (&[f64::INFINITY], "boundaries[0] is inf"),
            (
                &[-1.0, 1.0],
                "boundaries[0] is -1.0 (histogram values are never negative)",
            ),
            (
                &[1.0, 1.0],
                "boundaries[1] (1.0) does not exceed boundaries[0] (1.0)",
            ),
            (
                &[2.0, 1.0],
                "boundaries[1] (1.0) does not exceed boundaries[0] (2.0)",
            ),
            (
                &[0.0, -0.0],
                "boundaries[1] (0.0) does not exceed boundaries[0] (0.0)",
            ),
        ];
        for (values, problem) in cases {
            let error = Boundaries::new(values.iter().copied()).unwrap_err();
            assert!(
                error.starts_with("boundaries must be 1 to 64 finite, non-negative numbers"),
                "{error}"
            );
            assert!(error.ends_with(problem), "{error}");
        }
        assert!(Boundaries::new((0..64).map(f64::from)).is_ok());
        let error = Boundaries::new((0..).map(f64::from)).unwrap_err();
        assert!(error.ends_with("got more than 64"), "{error}");
    }
}
