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
//! The table is built at compile time, so recording checks it with one byte load.

use crate::probe::{DURATION, MEASURES};

/// The OpenTelemetry SDK's default explicit boundaries, for custom histograms.
pub const SDK_DEFAULT: [f64; 15] = [
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 7500.0,
    10000.0,
];

/// Every boundary set meterage exports with: the call duration's, each probe measure's
/// (as its declaration gives them; sets shared by measures appear more than once), and the
/// SDK default of custom histograms.
pub const SETS: [&[f64]; MEASURES.len() + 2] = {
    let mut out: [&[f64]; MEASURES.len() + 2] = [&SDK_DEFAULT; MEASURES.len() + 2];
    out[1] = DURATION.boundaries;
    let mut index = 0;
    while index < MEASURES.len() {
        out[index + 2] = MEASURES[index].boundaries;
        index += 1;
    }
    out
};

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
}
