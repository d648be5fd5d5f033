//! Lock-free, mergeable base-2 exponential histogram (OpenTelemetry exponential-histogram data
//! model) fixed at scale [`SCALE`] = 4, i.e. base `2^(1/16)`: bucket `i` holds the values `v`
//! with `base^i < v <= base^(i+1)`; zeros are counted separately.
//!
//! Recording takes only atomics: one `fetch_add` on the bucket, a CAS loop on the f64 sum and
//! a relaxed load each for min/max (an RMW only when the value moves them). Buckets live in
//! lazily allocated chunks of one octave (power of two) each: a 16-entry table, direct-mapped
//! by octave, finds any 16 consecutive octaves, and a two-level directory, allocated only for
//! a wider spread, the rest; so a histogram only pays for the octaves it has seen.
//! **Allocation happens only the first time a histogram sees a value in a new octave**;
//! steady-state recording never allocates. Chunks are only freed by `Drop`, so `reset` and
//! `snapshot` can run concurrently with `record` without any reclamation scheme. A chunk
//! also counts the values at or below an exported boundary that cuts one of its buckets
//! (see [`boundaries`]), so explicit-bucket export is exact for those boundaries.
//!
//! Ordering: every counter is `Relaxed`. Each RMW is atomic, so no update is lost; the
//! collector only needs each counter's own latest value, not an order between counters, and a
//! snapshot taken during recording is best-effort anyway (its `count` is derived from the
//! buckets it read, so count and buckets always agree). Exact final reads are ordered by
//! whatever synchronisation hands the histogram to the reader (thread join, a lock, ...).
//! Directory pointers use Release/Acquire so a reader of a pointer sees the zeroed chunk.

use super::boundaries;
use super::lazy::LazyBox;
use std::fmt;
use std::sync::atomic::{
    AtomicU32, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};

/// The scale every [`AtomicHistogram`] records at (base `2^(2^-4)`).
pub const SCALE: i32 = 4;

pub(super) const SUB: usize = 1 << SCALE; // buckets per octave
pub(super) const SLOTS: usize = 1 << 15; // covers every f64 index at scale 4
/// slot = bucket index + SLOT_BIAS; indices span -16353 (2^-1022 and subnormals) ..= 16383.
pub(super) const SLOT_BIAS: i32 = 16384;
const MANT_MASK: u64 = (1 << 52) - 1;
const SIGN_BIT: u64 = 1 << 63;
const MIN_NORMAL_BITS: u64 = 1 << 52; // f64::MIN_POSITIVE
const INF_BITS: u64 = 0x7ff0_0000_0000_0000;

/// `THRESH[k]` (k < 16) is the smallest mantissa field `M` with `1 + M/2^52 > 2^(k/16)`, i.e. the
/// first f64 strictly above the (irrational, for k > 0) boundary; so the sub-index is
/// `j = #{k : M >= THRESH[k]}`. Derived with exact integer 16th roots
/// (`floor(2^(52+k/16)) = isqrt^4(2^(832+k))`) and re-verified by a big-integer test.
/// Entries 16.. are a sentinel that no mantissa reaches (32 entries so `& 31` elides the bound check).
const THRESH: [u64; 32] = {
    let mut t = [1u64 << 52; 32];
    let k: [u64; 16] = [
        0x1,
        0xb5586cf98910,
        0x172b83c7d517b,
        0x2387a6e756239,
        0x306fe0a31b716,
        0x3dea64c123423,
        0x4bfdad5362a28,
        0x5ab07dd48542a,
        0x6a09e667f3bcd,
        0x7a11473eb0187,
        0x8ace5422aa0dc,
        0x9c49182a3f091,
        0xae89f995ad3ae,
        0xc199bdd85529d,
        0xd5818dcfba488,
        0xea4afa2a490da,
    ];
    let mut i = 0;
    while i < 16 {
        t[i] = k[i];
        i += 1;
    }
    t
};

/// `CANDIDATE[t]` = number of thresholds `<= t << 44` (t = top 8 mantissa bits). Boundaries are
/// at least 0.044 apart in mantissa space and a cell is 1/256 wide, so at most one more
/// threshold can fall inside a cell: one comparison against `THRESH[candidate]` finishes the job.
const CANDIDATE: [u8; 256] = {
    let mut out = [0u8; 256];
    let mut t = 0;
    while t < 256 {
        let lo = (t as u64) << 44;
        let mut c = 0;
        while c < 16 && THRESH[c] <= lo {
            c += 1;
        }
        out[t] = c as u8;
        t += 1;
    }
    out
};

/// Directory slot (bucket index + SLOT_BIAS) of a positive value's bits.
/// Sign is ignored and the result is masked into range, so precondition violations in release
/// builds record garbage but never panic or touch memory out of bounds.
#[inline(always)]
pub(super) const fn slot_of_bits(bits: u64) -> usize {
    // Subnormals are raised to MIN_POSITIVE: they share the lowest normal bucket.
    let bits = bits & !SIGN_BIT;
    let bits = if bits < MIN_NORMAL_BITS {
        MIN_NORMAL_BITS
    } else {
        bits
    };
    let e = (bits >> 52) as usize; // biased exponent, >= 1
    let m = bits & MANT_MASK;
    let c = CANDIDATE[(m >> 44) as usize] as usize;
    let j = c + (m >= THRESH[c & 31]) as usize;
    // index = 16*(e - 1023) + j - 1  =>  slot = 16*e + j + 15
    (e * SUB + j + 15) & (SLOTS - 1)
}

/// Bucket index at [`SCALE`] of `value > 0`, exact against the real boundaries `2^(k/16)`
/// (no `log2`). Those are irrational for k != 0 mod 16, so no f64 sits on one and the f64
/// nearest a boundary goes to whichever side it actually lies; `ceil(16*log2(v)) - 1` can
/// disagree only for values within a few ulps of a boundary, where log2's rounding decides.
/// Subnormals map to the bucket of `f64::MIN_POSITIVE` (-16353).
#[inline]
pub fn bucket_index(value: f64) -> i32 {
    debug_assert!(value > 0.0 && value.is_finite(), "bucket_index({value})");
    slot_of_bits(value.to_bits()) as i32 - SLOT_BIAS
}

/// `2^e` for `e` in `-1022..=1023`.
#[inline]
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// `x * 2^e` for `x` in `[1, 2]`, without intermediate overflow and with a single rounding when
/// the result is subnormal.
fn ldexp(x: f64, e: i64) -> f64 {
    let e = e.clamp(-1200, 1200) as i32; // beyond this the result is 0 or inf anyway
    if e > 1023 {
        x * pow2(1023) * pow2(e - 1023)
    } else if e < -1022 {
        x * pow2(-969) * pow2(e + 969)
    } else {
        x * pow2(e)
    }
}

fn lower_boundary_i64(index: i64, scale: i32) -> f64 {
    if scale >= 0 {
        let s = scale.min(62) as u32;
        let whole = index >> s;
        let frac = index & ((1i64 << s) - 1);
        let m = if frac == 0 {
            1.0
        } else {
            (frac as f64 / (1u64 << s) as f64).exp2()
        };
        ldexp(m, whole)
    } else {
        let s = (-(scale as i64)).min(62) as u32;
        ldexp(1.0, index.saturating_mul(1i64 << s))
    }
}

/// `base^index` at `scale` (base = `2^(2^-scale)`): the exclusive lower bound of bucket `index`.
/// Split into `2^(index >> scale) * 2^(frac / 2^scale)` so large `|index|` never overflows early;
/// results beyond the f64 range saturate to `inf` / `0`. The result is rounded (exp2), so a
/// value within an ulp or so of a boundary may look outside the bounds of its (exact) bucket.
/// Meant for OTel's scales (-10..=20).
pub fn lower_boundary(index: i32, scale: i32) -> f64 {
    lower_boundary_i64(index as i64, scale)
}

/// `f64` stored as bits: `v += x` via a CAS loop, saturating at `f64::MAX` (two values near
/// the top of the range would otherwise make the sum infinite, which no exporter accepts).
#[inline]
fn add_f64(a: &AtomicU64, x: f64) {
    let mut cur = a.load(Relaxed);
    loop {
        let new = (f64::from_bits(cur) + x).min(f64::MAX).to_bits();
        match a.compare_exchange_weak(cur, new, Relaxed, Relaxed) {
            Ok(_) => return,
            Err(seen) => cur = seen,
        }
    }
}

/// The counters of one octave (16 buckets), and how many of its values fell at or below
/// each explicit boundary that cuts one of its buckets (see [`boundaries`]).
struct Chunk {
    counts: [AtomicU64; SUB],
    below: [AtomicU64; boundaries::CUTS_PER_OCTAVE],
}

impl Chunk {
    fn new() -> Chunk {
        Chunk {
            counts: [const { AtomicU64::new(0) }; SUB],
            below: [const { AtomicU64::new(0) }; boundaries::CUTS_PER_OCTAVE],
        }
    }
}

/// A chunk for the histogram at `owner`: where it lives (a process group's arena, or the
/// heap), so that whoever can read the histogram can read its chunks.
fn new_chunk(owner: *const AtomicHistogram) -> *mut Chunk {
    crate::group::arena::near(owner.cast(), || Box::into_raw(Box::new(Chunk::new())))
}

/// Octaves a histogram finds without the overflow directory: any 16 consecutive ones (a
/// 65536x range of values), since entry `octave % 16` holds one octave for good.
const TABLE: usize = 16;
const OCTAVES: usize = SLOTS / SUB;
const OCTAVES_PER_GROUP: usize = 64;
const GROUPS: usize = OCTAVES / OCTAVES_PER_GROUP;
/// A table entry is `(octave + 1) << KEY_SHIFT | chunk address`; user-space addresses fit
/// below it on x86-64 and AArch64 (a chunk that does not goes to the overflow directory).
const KEY_SHIFT: u32 = 48;
const ADDRESS_MASK: u64 = (1 << KEY_SHIFT) - 1;

/// Octaves whose table entry another octave holds: a two-level directory, allocated the
/// first time a histogram's values spread over more than 16 octaves.
struct Overflow {
    groups: [LazyBox<[LazyBox<Chunk>; OCTAVES_PER_GROUP]>; GROUPS],
}

/// # Safety
/// `pointer` came from `Box::into_raw` and is not used again.
unsafe fn free_box<T>(pointer: *mut T) {
    // SAFETY: guaranteed by the caller.
    drop(unsafe { Box::from_raw(pointer) });
}

/// Lock-free exponential histogram at [`SCALE`]; share it across threads (e.g. in an `Arc`).
///
/// 184 bytes, plus 144 per octave (power of two) that holds values: a histogram of call
/// durations spread over a 1000x range takes under 2 KiB.
pub struct AtomicHistogram {
    zero_count: AtomicU64,
    // f64 fields are stored as bits. Non-negative f64 bits order like the values, so min/max
    // use integer fetch_min/fetch_max; min is +inf and max 0 when empty.
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
    weighted_extra: AtomicU64,
    /// Bit i: table entry i holds a chunk; bit TABLE: the overflow directory exists. Read
    /// first by snapshots, so an empty or zero-only histogram costs one cache line.
    occupied: AtomicU32,
    table: [AtomicU64; TABLE],
    overflow: LazyBox<Overflow>,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl AtomicHistogram {
    pub fn new() -> Self {
        AtomicHistogram {
            zero_count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(INF_BITS),
            max: AtomicU64::new(0),
            weighted_extra: AtomicU64::new(0),
            occupied: AtomicU32::new(0),
            table: [const { AtomicU64::new(0) }; TABLE],
            overflow: LazyBox::new(),
        }
    }

    /// The counters of `octave`, allocated on its first value.
    #[inline(always)]
    fn chunk(&self, octave: usize) -> &Chunk {
        let entry = self.table[octave & (TABLE - 1)].load(Acquire);
        if entry >> KEY_SHIFT == octave as u64 + 1 {
            // SAFETY: a published entry holds a chunk from `new_chunk`, freed only by Drop.
            return unsafe { &*((entry & ADDRESS_MASK) as *const Chunk) };
        }
        self.chunk_slow(octave)
    }

    #[cold]
    #[inline(never)]
    fn chunk_slow(&self, octave: usize) -> &Chunk {
        let key = octave as u64 + 1;
        let entry = &self.table[octave & (TABLE - 1)];
        if entry.load(Acquire) == 0 {
            let fresh = new_chunk(self);
            let address = fresh as u64;
            if address >> KEY_SHIFT == 0 {
                match entry.compare_exchange(0, key << KEY_SHIFT | address, AcqRel, Acquire) {
                    Ok(_) => {
                        self.occupied.fetch_or(1 << (octave & (TABLE - 1)), Release);
                        // SAFETY: just published; lives until Drop.
                        return unsafe { &*fresh };
                    }
                    Err(_) => {
                        // SAFETY: never published.
                        unsafe { free_box(fresh) }
                    }
                }
            } else {
                // SAFETY: never published.
                unsafe { free_box(fresh) }
            }
            let now = entry.load(Acquire);
            if now >> KEY_SHIFT == key {
                // SAFETY: as in `chunk`.
                return unsafe { &*((now & ADDRESS_MASK) as *const Chunk) };
            }
        }
        // Another octave holds the entry for good: this one lives in the directory. (If
        // an octave ever had chunks in both places, snapshots add them up.)
        let overflow = self.overflow.get_or_init(|| Overflow {
            groups: [const { LazyBox::new() }; GROUPS],
        });
        if self.occupied.load(Relaxed) & (1 << TABLE) == 0 {
            self.occupied.fetch_or(1 << TABLE, Release);
        }
        overflow.groups[octave / OCTAVES_PER_GROUP]
            .get_or_init(|| [const { LazyBox::new() }; OCTAVES_PER_GROUP])
            [octave % OCTAVES_PER_GROUP]
            .get_or_init(Chunk::new)
    }

    /// Records one value. Precondition: finite and `>= 0` (checked in debug builds only).
    #[inline]
    pub fn record(&self, value: f64) {
        debug_assert!(
            value.is_finite() && value >= 0.0,
            "histogram value must be finite and >= 0, got {value}"
        );
        if value == 0.0 {
            // also -0.0; its bits would break the min/max bit ordering
            self.record_zero();
            return;
        }
        let bits = value.to_bits();
        let slot = slot_of_bits(bits);
        let chunk = self.chunk(slot / SUB);
        chunk.counts[slot & (SUB - 1)].fetch_add(1, Relaxed);
        if let Some(cut) = boundaries::cut_of_slot(slot) {
            if bits <= cut.bits {
                chunk.below[cut.position].fetch_add(1, Relaxed);
            }
        }
        // Loads first: the RMW is needed only while min/max still move.
        if bits < self.min.load(Relaxed) {
            self.min.fetch_min(bits, Relaxed);
        }
        if bits > self.max.load(Relaxed) {
            self.max.fetch_max(bits, Relaxed);
        }
        add_f64(&self.sum, value);
    }

    #[inline]
    fn record_zero(&self) {
        self.zero_count.fetch_add(1, Relaxed);
        if self.min.load(Relaxed) != 0 {
            self.min.fetch_min(0, Relaxed);
        }
        // max starts at 0 and sum is unchanged by 0.
    }

    /// As [`record`](Self::record); with `weight != 1` (a value sampled with probability
    /// `1/weight`) also adds `(weight - 1) * value` to `weighted_extra`, so that
    /// `sum + weighted_extra` is the Horvitz-Thompson estimate of the unsampled total.
    #[inline]
    pub fn record_weighted(&self, value: f64, weight: f64) {
        debug_assert!(weight >= 1.0 && weight.is_finite(), "weight {weight}");
        self.record(value);
        if weight != 1.0 && value != 0.0 {
            add_f64(&self.weighted_extra, (weight - 1.0) * value);
        }
    }

    /// Calls `f(octave, chunk)` for every allocated chunk, in no particular order.
    fn for_each_chunk(&self, f: impl FnMut(usize, &Chunk)) {
        // SAFETY: shift 0: this process's own chunks.
        unsafe { self.for_each_chunk_shifted(0, f) }
    }

    /// As `for_each_chunk`, the chunks read `shift` bytes from where their pointers say
    /// (see [`LazyBox::get_shifted`]).
    ///
    /// # Safety
    /// As `LazyBox::get_shifted`: every chunk is mapped `shift` bytes away.
    unsafe fn for_each_chunk_shifted(&self, shift: isize, mut f: impl FnMut(usize, &Chunk)) {
        let occupied = self.occupied.load(Acquire);
        let mut entries = occupied & ((1 << TABLE) - 1);
        while entries != 0 {
            let index = entries.trailing_zeros() as usize;
            entries &= entries - 1;
            let entry = self.table[index].load(Acquire);
            let chunk = (entry & ADDRESS_MASK) as usize;
            // As in `LazyBox::get_shifted`: a chunk on the owner's heap is not readable here.
            if entry != 0 && (shift == 0 || crate::group::arena::in_segment(chunk)) {
                // SAFETY: as in `chunk`, `shift` bytes away (the caller's contract).
                f((entry >> KEY_SHIFT) as usize - 1, unsafe {
                    &*(((entry & ADDRESS_MASK) as *const u8).offset(shift) as *const Chunk)
                });
            }
        }
        if occupied & (1 << TABLE) == 0 {
            return;
        }
        // SAFETY: the caller's contract (so too for the two below).
        let overflow = unsafe { self.overflow.get_shifted(shift) };
        let Some(overflow) = overflow else {
            return;
        };
        for (group_index, group) in overflow.groups.iter().enumerate() {
            // SAFETY: as above.
            let Some(group) = (unsafe { group.get_shifted(shift) }) else {
                continue;
            };
            for (index, chunk) in group.iter().enumerate() {
                // SAFETY: as above.
                if let Some(chunk) = unsafe { chunk.get_shifted(shift) } {
                    f(group_index * OCTAVES_PER_GROUP + index, chunk);
                }
            }
        }
    }

    /// Point-in-time copy. Under concurrent writers each counter is read once; `count` is the
    /// sum of what was read, and `sum`/`min`/`max` may be a few records ahead or behind.
    pub fn snapshot(&self) -> HistogramSnapshot {
        // SAFETY: shift 0: this process's own histogram.
        unsafe { self.snapshot_shifted(0) }
    }

    /// As `snapshot`, for a histogram read through another mapping of the memory it lives
    /// in (see [`LazyBox::get_shifted`]).
    ///
    /// # Safety
    /// As `LazyBox::get_shifted`: `self` and its chunks are mapped `shift` bytes away from
    /// where their pointers say.
    pub unsafe fn snapshot_shifted(&self, shift: isize) -> HistogramSnapshot {
        // The chunks with counts: on the stack for the usual few (uninitialised until
        // written; a Vec past TABLE).
        type Read = (usize, [u64; SUB], [u64; boundaries::CUTS_PER_OCTAVE]);
        let mut inline: [std::mem::MaybeUninit<Read>; TABLE] =
            [const { std::mem::MaybeUninit::uninit() }; TABLE];
        let mut spilled: Vec<Read> = Vec::new();
        let mut found = 0;
        let read_chunk = |octave: usize, chunk: &Chunk| {
            let mut counts = [0u64; SUB];
            let mut any = 0;
            for (dst, src) in counts.iter_mut().zip(&chunk.counts) {
                *dst = src.load(Relaxed);
                any |= *dst;
            }
            if any == 0 {
                return;
            }
            let below = std::array::from_fn(|i| chunk.below[i].load(Relaxed));
            if found < TABLE {
                inline[found].write((octave, counts, below));
            } else {
                if spilled.is_empty() {
                    // SAFETY: the TABLE entries are all written (found == TABLE).
                    spilled.extend(inline.iter().map(|read| unsafe { read.assume_init() }));
                }
                spilled.push((octave, counts, below));
            }
            found += 1;
        };
        // SAFETY: the caller's contract.
        unsafe { self.for_each_chunk_shifted(shift, read_chunk) };
        let chunks: &mut [Read] = if found > TABLE {
            &mut spilled
        } else {
            // SAFETY: the first `found` entries were written above (Read is Copy).
            unsafe { std::slice::from_raw_parts_mut(inline.as_mut_ptr().cast(), found) }
        };
        chunks.sort_unstable_by_key(|&(octave, _, _)| octave);
        let zero_count = self.zero_count.load(Relaxed);
        let sum = f64::from_bits(self.sum.load(Relaxed));
        let weighted_extra = f64::from_bits(self.weighted_extra.load(Relaxed));
        let mut min = f64::from_bits(self.min.load(Relaxed));
        let mut max = f64::from_bits(self.max.load(Relaxed));

        let mut count = zero_count;
        let mut snap_offset = 0;
        let mut bucket_counts = Vec::new();
        let mut cuts = Vec::new();
        if let (Some(first), Some(last)) = (chunks.first(), chunks.last()) {
            // Chunks kept above have a non-zero count, so both positions exist.
            let lo = first.0 * SUB + first.1.iter().position(|&c| c != 0).unwrap_or(0);
            let hi = last.0 * SUB + last.1.iter().rposition(|&c| c != 0).unwrap_or(SUB - 1);
            bucket_counts = vec![0u64; hi - lo + 1];
            for (octave, counts, below) in chunks.iter() {
                let cut = boundaries::octave_is_cut(*octave);
                for (i, &n) in counts.iter().enumerate() {
                    let slot = octave * SUB + i;
                    if n == 0 {
                        continue;
                    }
                    bucket_counts[slot - lo] += n;
                    count += n;
                    if !cut {
                        continue;
                    }
                    if let Some(cut) = boundaries::cut_of_slot(slot) {
                        let index = slot as i32 - SLOT_BIAS;
                        let below = below[cut.position];
                        match cuts.last_mut() {
                            Some((last, total)) if *last == index => *total += below,
                            _ => cuts.push((index, below)),
                        }
                    }
                }
            }
            snap_offset = lo as i32 - SLOT_BIAS;
        }

        if count == 0 {
            (min, max) = (0.0, 0.0);
        } else {
            // A racing writer may have counted its bucket before publishing min/max; fall back
            // to what the buckets prove rather than report +inf / 0.
            if min == f64::INFINITY {
                min = if zero_count > 0 {
                    0.0
                } else {
                    lower_boundary(snap_offset + 1, SCALE)
                };
            }
            if max == 0.0 && !bucket_counts.is_empty() {
                max = lower_boundary(snap_offset + bucket_counts.len() as i32 - 1, SCALE);
            }
            // A `reset` racing a writer can clobber one of them after the other moved.
            max = max.max(min);
        }

        HistogramSnapshot {
            scale: SCALE,
            count,
            sum,
            min,
            max,
            zero_count,
            offset: snap_offset,
            bucket_counts,
            weighted_extra,
            cuts,
        }
    }

    /// Whether nothing has been recorded (since creation or the last `reset`).
    pub fn is_empty(&self) -> bool {
        // SAFETY: shift 0: this process's own histogram.
        unsafe { self.is_empty_shifted(0) }
    }

    /// As `is_empty`, read through another mapping (see `snapshot_shifted`).
    ///
    /// # Safety
    /// As `snapshot_shifted`.
    pub unsafe fn is_empty_shifted(&self, shift: isize) -> bool {
        if self.zero_count.load(Relaxed) != 0 {
            return false;
        }
        let mut empty = true;
        // SAFETY: the caller's contract.
        unsafe {
            self.for_each_chunk_shifted(shift, |_, chunk| {
                empty &= chunk.counts.iter().all(|c| c.load(Relaxed) == 0);
            })
        };
        empty
    }

    /// Zeroes everything. Allocated chunks are kept (and zeroed): freeing them would race with
    /// writers. Values recorded concurrently with `reset` may be kept or lost, partially
    /// (e.g. counted but not summed).
    pub fn reset(&self) {
        self.for_each_chunk(|_, chunk| {
            for c in chunk.counts.iter().chain(&chunk.below) {
                c.store(0, Relaxed);
            }
        });
        self.zero_count.store(0, Relaxed);
        self.sum.store(0, Relaxed);
        self.weighted_extra.store(0, Relaxed);
        self.min.store(INF_BITS, Relaxed);
        self.max.store(0, Relaxed);
    }

    /// Bytes held: the struct plus allocated chunks and directory nodes (allocator overhead
    /// excluded).
    pub fn memory_bytes(&self) -> usize {
        let mut chunks = 0;
        self.for_each_chunk(|_, _| chunks += 1);
        let mut total = std::mem::size_of::<Self>() + chunks * std::mem::size_of::<Chunk>();
        if let Some(overflow) = self.overflow.get() {
            total += std::mem::size_of::<Overflow>();
            for group in &overflow.groups {
                if group.get().is_some() {
                    total += std::mem::size_of::<[LazyBox<Chunk>; OCTAVES_PER_GROUP]>();
                }
            }
        }
        total
    }
}

impl Drop for AtomicHistogram {
    fn drop(&mut self) {
        for entry in &mut self.table {
            let entry = *entry.get_mut();
            if entry != 0 {
                // SAFETY: installed from `new_chunk`; `&mut self` means no other users remain.
                unsafe { free_box((entry & ADDRESS_MASK) as *mut Chunk) };
            }
        }
        // The overflow directory frees itself (LazyBox).
    }
}

impl fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.snapshot();
        f.debug_struct("AtomicHistogram")
            .field("count", &s.count)
            .field("sum", &s.sum)
            .field("min", &s.min)
            .field("max", &s.max)
            .field("memory_bytes", &self.memory_bytes())
            .finish()
    }
}

/// Immutable copy of a histogram in the OTel exponential-histogram shape (positive range only).
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub scale: i32,
    /// `zero_count + sum(bucket_counts)`.
    pub count: u64,
    pub sum: f64,
    /// 0.0 when empty.
    pub min: f64,
    /// 0.0 when empty.
    pub max: f64,
    pub zero_count: u64,
    /// Index of `bucket_counts[0]`.
    pub offset: i32,
    /// Contiguous from the lowest to the highest non-empty index; empty when no non-zero values.
    pub bucket_counts: Vec<u64>,
    /// Horvitz-Thompson correction: `estimated_sum = sum + weighted_extra`.
    pub weighted_extra: f64,
    /// For buckets an exported explicit boundary cuts (see [`boundaries`]): (bucket index,
    /// how many of its values are at or below the boundary), ascending by index. Only at
    /// the recording scale; a downscaled snapshot has none.
    pub cuts: Vec<(i32, u64)>,
}

/// 1-based nearest rank: `max(1, ceil(q * n))`, capped at `n`.
fn nearest_rank(q: f64, n: u64) -> u64 {
    ((q * n as f64).ceil() as u64).clamp(1, n)
}

/// A snapshot's fields: scale, count, sum, min, max, zero count, offset, bucket counts,
/// weighted extra, cuts (a pickle's state; the order the group's folded totals are read in).
pub type HistogramParts = (
    i32,
    u64,
    f64,
    f64,
    f64,
    u64,
    i32,
    Vec<u64>,
    f64,
    Vec<(i32, u64)>,
);

impl HistogramSnapshot {
    /// Its fields, in [`HistogramParts`] order.
    pub fn parts(&self) -> HistogramParts {
        (
            self.scale,
            self.count,
            self.sum,
            self.min,
            self.max,
            self.zero_count,
            self.offset,
            self.bucket_counts.clone(),
            self.weighted_extra,
            self.cuts.clone(),
        )
    }

    /// A snapshot from its fields (a pickle's state, a process group's folded totals),
    /// or `None` if they do not describe one: counts that do not add up, a scale out of
    /// range, cuts outside their buckets.
    pub fn from_parts(parts: HistogramParts) -> Option<HistogramSnapshot> {
        let (scale, count, sum, min, max, zero_count, offset, bucket_counts, weighted_extra, cuts) =
            parts;
        let total = bucket_counts
            .iter()
            .try_fold(zero_count, |total, &bucket| total.checked_add(bucket));
        let cuts_fit = cuts.iter().all(|&(index, below)| {
            let position = i64::from(index) - i64::from(offset);
            position >= 0
                && (position as usize) < bucket_counts.len()
                && below <= bucket_counts[position as usize]
        });
        (total == Some(count) && (-10..=20).contains(&scale) && cuts_fit).then_some(
            HistogramSnapshot {
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
            },
        )
    }

    pub fn empty(scale: i32) -> Self {
        HistogramSnapshot {
            scale,
            count: 0,
            sum: 0.0,
            min: 0.0,
            max: 0.0,
            zero_count: 0,
            offset: 0,
            bucket_counts: Vec::new(),
            weighted_extra: 0.0,
            cuts: Vec::new(),
        }
    }

    pub fn estimated_sum(&self) -> f64 {
        self.sum + self.weighted_extra
    }

    /// Nearest-rank quantile estimate: finds the bucket holding rank `max(1, ceil(q*n))` and
    /// returns `2LU/(L+U)` of its bounds (the point minimising the worst relative error,
    /// `(b-1)/(b+1)` ~ 2.17% at scale 4), clamped to `[min, max]`. `q <= 0` gives `min`,
    /// `q >= 1` gives `max`, a rank among the zeros gives 0. NaN when empty or `q` is NaN.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 || q.is_nan() {
            return f64::NAN;
        }
        if q <= 0.0 {
            return self.min;
        }
        if q >= 1.0 {
            return self.max;
        }
        let rank = nearest_rank(q, self.count);
        if rank <= self.zero_count {
            return 0.0;
        }
        let mut seen = self.zero_count;
        for (p, &c) in self.bucket_counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (l, u) = self.bucket_bounds(p);
                // 2LU/(L+U) written so neither 2L nor LU can overflow.
                let est = l / (0.5 + 0.5 * (l / u));
                return est.max(self.min).min(self.max);
            }
        }
        self.max
    }

    /// Merges `other` in; the result is at the smaller of the two scales.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        let scale = self.scale.min(other.scale);
        if self.scale != scale {
            *self = self.downscale(scale);
        }
        let lowered;
        let other = if other.scale != scale {
            lowered = other.downscale(scale);
            &lowered
        } else {
            other
        };

        if !other.bucket_counts.is_empty() {
            if self.bucket_counts.is_empty() {
                self.offset = other.offset;
                self.bucket_counts = other.bucket_counts.clone();
            } else {
                let end = |s: &HistogramSnapshot| s.offset as i64 + s.bucket_counts.len() as i64;
                let lo = (self.offset as i64).min(other.offset as i64);
                let hi = end(self).max(end(other));
                let mut v = vec![0u64; (hi - lo) as usize];
                for s in [&*self, other] {
                    let base = (s.offset as i64 - lo) as usize;
                    for (d, &c) in v[base..].iter_mut().zip(&s.bucket_counts) {
                        *d += c;
                    }
                }
                self.offset = lo as i32;
                self.bucket_counts = v;
            }
        }

        if other.count > 0 {
            if self.count == 0 {
                self.min = other.min;
                self.max = other.max;
            } else {
                self.min = self.min.min(other.min);
                self.max = self.max.max(other.max);
            }
        }
        self.count += other.count;
        self.zero_count += other.zero_count;
        self.sum = (self.sum + other.sum).min(f64::MAX);
        self.weighted_extra = (self.weighted_extra + other.weighted_extra).min(f64::MAX);
        if scale == SCALE {
            let mut cuts = std::mem::take(&mut self.cuts);
            cuts.extend_from_slice(&other.cuts);
            cuts.sort_unstable_by_key(|&(index, _)| index);
            cuts.dedup_by(|later, earlier| {
                let same = later.0 == earlier.0;
                if same {
                    earlier.1 += later.1;
                }
                same
            });
            self.cuts = cuts;
        } else {
            self.cuts.clear();
        }
    }

    /// Same data at `new_scale <= self.scale`: bucket `i` becomes `i >> (scale - new_scale)`
    /// (arithmetic shift, the OTel rule), counts of merged buckets add up.
    ///
    /// # Panics
    /// If `new_scale > self.scale` (upscaling cannot be done from bucket counts).
    pub fn downscale(&self, new_scale: i32) -> HistogramSnapshot {
        assert!(
            new_scale <= self.scale,
            "downscale from {} to higher scale {new_scale}",
            self.scale
        );
        // Shifting an i32-range index by >= 31 already yields 0 or -1; cap to keep i64 shifts valid.
        let shift = (self.scale as i64 - new_scale as i64).min(63) as u32;
        let mut out = HistogramSnapshot {
            scale: new_scale,
            bucket_counts: Vec::new(),
            offset: 0,
            cuts: if shift == 0 {
                self.cuts.clone()
            } else {
                Vec::new()
            },
            ..*self
        };
        if !self.bucket_counts.is_empty() {
            let first = self.offset as i64;
            let new_first = first >> shift;
            let new_last = (first + self.bucket_counts.len() as i64 - 1) >> shift;
            let mut v = vec![0u64; (new_last - new_first + 1) as usize];
            for (p, &c) in self.bucket_counts.iter().enumerate() {
                v[(((first + p as i64) >> shift) - new_first) as usize] += c;
            }
            out.offset = new_first as i32;
            out.bucket_counts = v;
        }
        out
    }

    /// `(lower exclusive, upper inclusive)` bounds of `bucket_counts[position]`.
    pub fn bucket_bounds(&self, position: usize) -> (f64, f64) {
        let i = self.offset as i64 + position as i64;
        (
            lower_boundary_i64(i, self.scale),
            lower_boundary_i64(i + 1, self.scale),
        )
    }

    /// `(lower, upper, count)` for each bucket, lowest first.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, f64, u64)> + '_ {
        self.bucket_counts.iter().enumerate().map(move |(p, &c)| {
            let (l, u) = self.bucket_bounds(p);
            (l, u, c)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    // ---- exact reference: big-integer comparison of (1 + M/2^52)^16 against 2^k ----

    fn big_mul(a: &[u64], b: &[u64]) -> Vec<u64> {
        let mut out = vec![0u64; a.len() + b.len()];
        for (i, &x) in a.iter().enumerate() {
            let mut carry = 0u128;
            for (j, &y) in b.iter().enumerate() {
                let t = x as u128 * y as u128 + out[i + j] as u128 + carry;
                out[i + j] = t as u64;
                carry = t >> 64;
            }
            out[i + b.len()] = carry as u64;
        }
        while out.len() > 1 && *out.last().unwrap() == 0 {
            out.pop();
        }
        out
    }

    /// Exact sub-index: #{k in 0..16 : 1 + m/2^52 > 2^(k/16)}. With X = (2^52 + m)^16 in
    /// [2^832, 2^848): X > 2^(832+k) iff k < floor(log2 X) - 832, or k equals it and X is not a
    /// power of two (i.e. m != 0).
    fn exact_j(m: u64) -> usize {
        let mut x = vec![(1u64 << 52) | m];
        for _ in 0..4 {
            x = big_mul(&x, &x);
        }
        let bitlen = 64 * x.len() - x.last().unwrap().leading_zeros() as usize;
        bitlen - 1 - 832 + (m != 0) as usize
    }

    fn exact_index(v: f64) -> i32 {
        assert!(v > 0.0 && v.is_finite());
        let bits = v.to_bits().max(MIN_NORMAL_BITS);
        let e = (bits >> 52) as i32 - 1023;
        16 * e + exact_j(bits & MANT_MASK) as i32 - 1
    }

    // next/prev f64 for positive finite values (f64::next_up needs Rust 1.86; MSRV is 1.80)
    fn up(v: f64) -> f64 {
        f64::from_bits(v.to_bits() + 1)
    }

    fn down(v: f64) -> f64 {
        f64::from_bits(v.to_bits() - 1)
    }

    fn with_mantissa(e: i32, m: u64) -> f64 {
        f64::from_bits((((e + 1023) as u64) << 52) | m)
    }

    /// Compares with `ceil(log2(v) * 16) - 1` unless log2's own rounding (<= 1 ulp of log2(v),
    /// allowed 2) could put the product on the wrong side of an integer: that happens only for v
    /// within a few ulps of a bucket boundary, where the exact reference above decides.
    /// Returns whether the comparison was made.
    fn check_log2_reference(v: f64) -> bool {
        let l = v.log2();
        let r = l * 16.0;
        let margin = 32.0 * f64::EPSILON * l.abs();
        if (r - r.round()).abs() <= margin {
            return false;
        }
        assert_eq!(
            bucket_index(v),
            r.ceil() as i32 - 1,
            "log2 reference, v={v:e}"
        );
        true
    }

    #[test]
    fn thresholds_are_exact() {
        for (k, &t) in THRESH[..16].iter().enumerate() {
            assert_eq!(exact_j(t), k + 1, "k={k}");
            assert_eq!(exact_j(t - 1), k, "k={k}");
        }
        assert!(THRESH[16..].iter().all(|&t| t > MANT_MASK));
    }

    #[test]
    fn candidate_lookup_needs_one_comparison() {
        for t in 0..256u64 {
            let c = CANDIDATE[t as usize] as usize;
            let (lo, hi) = (t << 44, ((t + 1) << 44) - 1);
            assert!(c == 0 || THRESH[c - 1] <= lo);
            // no second threshold inside the cell
            assert!(THRESH[c + 1] > hi || c + 1 > 16, "t={t}");
            for m in [lo, hi, (lo + hi) / 2] {
                let j = c + (m >= THRESH[c]) as usize;
                assert_eq!(j, exact_j(m), "m={m:#x}");
            }
        }
    }

    #[test]
    fn index_at_and_around_boundaries() {
        let exps = [-1022, -600, -31, -1, 0, 1, 2, 11, 40, 52, 600, 1022];
        let mut log2_checked = 0;
        for &e in &exps {
            for (k, &t) in THRESH[..16].iter().enumerate() {
                let near = ldexp((k as f64 / 16.0).exp2(), e as i64);
                let mut vals = vec![near, up(near), down(near)];
                if k > 0 {
                    // the two f64s bracketing the boundary, and their outer neighbours
                    let above = with_mantissa(e, t);
                    vals.extend([above, up(above), down(above)]);
                    vals.push(down(down(above)));
                    // a little further out (2^20 ulps): log2 resolves these at every exponent
                    vals.push(with_mantissa(e, t + (1 << 20)));
                    vals.push(with_mantissa(e, t - (1 << 20)));
                    assert_eq!(bucket_index(above), 16 * e + k as i32);
                    assert_eq!(bucket_index(down(above)), 16 * e + k as i32 - 1);
                } else {
                    let p = with_mantissa(e, 0);
                    assert_eq!(bucket_index(p), 16 * e - 1, "2^{e}");
                    assert_eq!(bucket_index(up(p)), 16 * e, "2^{e}+");
                    // just below 2^e is still in (2^(e-1/16), 2^e]; for e = -1022 it is subnormal
                    assert_eq!(bucket_index(down(p)), 16 * e - 1, "2^{e}-");
                }
                for v in vals {
                    assert_eq!(bucket_index(v), exact_index(v), "v={v:e} e={e} k={k}");
                    log2_checked += check_log2_reference(v) as usize;
                }
            }
        }
        assert!(log2_checked >= 12 * 15 * 2, "{log2_checked}");
    }

    #[test]
    fn index_special_values() {
        assert_eq!(bucket_index(1.0), -1);
        assert_eq!(bucket_index(2.0), 15);
        assert_eq!(bucket_index(1.5), 9); // 2^(9/16)=1.477 < 1.5 <= 2^(10/16)=1.542
        assert_eq!(bucket_index(0.5), -17);
        assert_eq!(bucket_index(f64::MIN_POSITIVE), -16353);
        assert_eq!(bucket_index(f64::MIN_POSITIVE / 2.0), -16353);
        assert_eq!(bucket_index(f64::from_bits(1)), -16353);
        assert_eq!(bucket_index(up(f64::MIN_POSITIVE)), -16352);
        assert_eq!(bucket_index(f64::MAX), 16383);
        for v in [1e300, 1e-300, 1e-9, 3600.0, 1e12, 0.1, 3.0, 1e-5] {
            assert_eq!(bucket_index(v), exact_index(v), "{v:e}");
            let i = bucket_index(v);
            assert!(lower_boundary(i, SCALE) < v && v <= lower_boundary(i + 1, SCALE));
        }
        let h = AtomicHistogram::new();
        h.record(0.0);
        h.record(-0.0);
        h.record(5e-324);
        let s = h.snapshot();
        assert_eq!((s.zero_count, s.count, s.offset), (2, 3, -16353));
        assert_eq!((s.min, s.max), (0.0, 5e-324));
        assert_eq!(s.bucket_counts, vec![1]);
    }

    #[test]
    fn lower_boundary_values() {
        for e in [-1022, -1, 0, 1, 10, 1023] {
            assert_eq!(lower_boundary(16 * e, 4), with_mantissa(e, 0));
        }
        assert_eq!(lower_boundary(8, 4), std::f64::consts::SQRT_2);
        assert!(lower_boundary(16383, 4).is_finite());
        assert_eq!(lower_boundary(16384, 4), f64::INFINITY);
        assert_eq!(lower_boundary(i32::MAX, 4), f64::INFINITY);
        assert_eq!(lower_boundary(i32::MIN, 4), 0.0);
        assert!(lower_boundary(-16353, 4) > 0.0); // subnormal, not flushed
        assert_eq!(lower_boundary(3, 0), 8.0);
        assert_eq!(lower_boundary(-3, -1), 1.0 / 64.0);
        assert_eq!(lower_boundary(1, -10), f64::INFINITY);
        assert_eq!(lower_boundary(5, 20), (5.0 / 1048576.0f64).exp2());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn index_matches_exact_reference(bits in 1u64..0x7ff0_0000_0000_0000) {
            let v = f64::from_bits(bits);
            prop_assert_eq!(bucket_index(v), exact_index(v));
            if bits >= MIN_NORMAL_BITS {
                check_log2_reference(v);
            }
        }
    }

    // ---- quantiles ----

    const QS: [f64; 10] = [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0];

    fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
        let n = sorted.len() as u64;
        if q <= 0.0 {
            sorted[0]
        } else if q >= 1.0 {
            sorted[sorted.len() - 1]
        } else {
            sorted[nearest_rank(q, n) as usize - 1]
        }
    }

    fn check_against_exact(values: &[f64]) -> Result<(), TestCaseError> {
        let h = AtomicHistogram::new();
        for &v in values {
            h.record(v);
        }
        let s = h.snapshot();
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let sum: f64 = values.iter().sum();
        prop_assert_eq!(s.count, values.len() as u64);
        prop_assert_eq!(s.min, sorted[0]);
        prop_assert_eq!(s.max, *sorted.last().unwrap());
        prop_assert!((s.sum - sum).abs() <= 1e-9 * sum.abs());
        for q in QS {
            let exact = exact_quantile(&sorted, q);
            let est = s.quantile(q);
            prop_assert!(
                (est - exact).abs() <= 0.025 * exact,
                "q={} est={} exact={}",
                q,
                est,
                exact
            );
        }
        Ok(())
    }

    fn log_uniform(lo: f64, hi: f64) -> impl Strategy<Value = f64> {
        (0.0f64..=1.0).prop_map(move |u| (lo.ln() + u * (hi.ln() - lo.ln())).exp())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn quantiles_seconds(values in prop::collection::vec(
            prop_oneof![1 => Just(0.0), 30 => log_uniform(1e-9, 3600.0)], 1..2000)) {
            check_against_exact(&values)?;
        }

        #[test]
        fn quantiles_bytes(values in prop::collection::vec(
            log_uniform(1.0, 1e12).prop_map(f64::round), 1..2000)) {
            check_against_exact(&values)?;
        }

        #[test]
        fn merge_equals_single(values in prop::collection::vec(
            log_uniform(1e-9, 3600.0), 0..500), split in 0usize..500, z in 0usize..3) {
            let split = split.min(values.len());
            let (a, b) = (AtomicHistogram::new(), AtomicHistogram::new());
            let all = AtomicHistogram::new();
            for (i, &v) in values.iter().enumerate() {
                if i < split { a.record(v) } else { b.record(v) }
                all.record(v);
            }
            for _ in 0..z {
                b.record(0.0);
                all.record(0.0);
            }
            let mut m = a.snapshot();
            m.merge(&b.snapshot());
            let mut want = all.snapshot();
            prop_assert!((m.sum - want.sum).abs() <= 1e-9 * want.sum);
            want.sum = m.sum;
            prop_assert_eq!(m, want);
        }
    }

    #[test]
    fn quantile_edges() {
        let s = AtomicHistogram::new().snapshot();
        assert_eq!(s, HistogramSnapshot::empty(SCALE));
        assert!(s.quantile(0.5).is_nan());
        let h = AtomicHistogram::new();
        for _ in 0..3 {
            h.record(0.0);
        }
        h.record(10.0);
        let s = h.snapshot();
        assert_eq!(s.quantile(0.5), 0.0);
        assert_eq!(s.quantile(0.75), 0.0);
        assert_eq!(s.quantile(0.76), 10.0); // single value: clamped to [min, max]
        assert_eq!(s.quantile(0.0), 0.0);
        assert_eq!(s.quantile(1.0), 10.0);
        assert!(s.quantile(f64::NAN).is_nan());
        // huge values: no overflow in 2LU/(L+U)
        let h = AtomicHistogram::new();
        h.record(f64::MAX);
        h.record(1e300);
        let s = h.snapshot();
        let q = s.quantile(0.5);
        assert!((q - 1e300).abs() <= 0.025 * 1e300, "{q}");
        assert_eq!(s.quantile(0.99), f64::MAX);
    }

    // ---- merge / downscale ----

    fn sample_values() -> Vec<f64> {
        let mut v = vec![
            1e-9, 0.3, 0.5, 0.75, 1.0, 1.01, 2.0, 3.0, 1000.0, 3600.0, 1e-4,
        ];
        let mut x = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            v.push((1e-9f64.ln() + u * (3600f64.ln() - 1e-9f64.ln())).exp());
        }
        v
    }

    #[test]
    fn downscale_shift_rule() {
        let h = AtomicHistogram::new();
        let vals = sample_values();
        for &v in &vals {
            h.record(v);
        }
        h.record(0.0);
        let s = h.snapshot();
        for new_scale in [4, 3, 2, 1, 0, -1, -3, -10, -40] {
            let d = s.downscale(new_scale);
            let shift = (SCALE - new_scale).min(63) as u32;
            let mut want: BTreeMap<i64, u64> = BTreeMap::new();
            for &v in &vals {
                *want.entry((bucket_index(v) as i64) >> shift).or_default() += 1;
            }
            let got: BTreeMap<i64, u64> = d
                .bucket_counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(p, &c)| (d.offset as i64 + p as i64, c))
                .collect();
            assert_eq!(got, want, "scale {new_scale}");
            assert_eq!(d.count, s.count);
            assert_eq!(d.zero_count, 1);
            assert_eq!((d.sum, d.min, d.max), (s.sum, s.min, s.max));
            assert_eq!(d.scale, new_scale);
            assert_eq!(d.bucket_counts.iter().sum::<u64>() + 1, d.count);
            assert!(*d.bucket_counts.first().unwrap() > 0 && *d.bucket_counts.last().unwrap() > 0);
            if (-3..=3).contains(&new_scale) {
                // values lie inside their downscaled bucket (away from rounding of the bounds)
                for &v in &vals {
                    let i = bucket_index(v) >> shift;
                    assert!(
                        lower_boundary(i, new_scale) <= v && v <= lower_boundary(i + 1, new_scale)
                    );
                }
            }
        }
        // negative indices shift arithmetically: -1 >> 1 = -1, -3 >> 1 = -2
        let t = HistogramSnapshot {
            offset: -3,
            bucket_counts: vec![1, 2, 3],
            count: 6,
            ..HistogramSnapshot::empty(4)
        };
        let d = t.downscale(3);
        assert_eq!((d.offset, d.bucket_counts), (-2, vec![1, 5]));
    }

    #[test]
    #[should_panic]
    fn upscale_panics() {
        HistogramSnapshot::empty(2).downscale(3);
    }

    #[test]
    fn merge_across_scales() {
        let vals = sample_values();
        let h = AtomicHistogram::new();
        for &v in &vals {
            h.record(v);
        }
        let a = h.snapshot();
        let b = a.downscale(2);
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.scale, 2);
        assert_eq!(ab.count, 2 * a.count);
        assert_eq!(ab.sum, 2.0 * a.sum);
        assert_eq!((ab.min, ab.max), (a.min, a.max));
        let doubled: Vec<u64> = b.bucket_counts.iter().map(|c| 2 * c).collect();
        assert_eq!((ab.offset, ab.bucket_counts.clone()), (b.offset, doubled));

        // disjoint ranges, empty operands
        let (lo, hi) = (AtomicHistogram::new(), AtomicHistogram::new());
        lo.record(1e-6);
        hi.record(1e6);
        let mut m = HistogramSnapshot::empty(SCALE);
        m.merge(&lo.snapshot());
        m.merge(&HistogramSnapshot::empty(SCALE));
        m.merge(&hi.snapshot().downscale(0));
        assert_eq!((m.scale, m.count, m.min, m.max), (0, 2, 1e-6, 1e6));
        assert_eq!(
            m.bucket_counts.len() as i32,
            bucket_index(1e6) / 16 - m.offset + 1
        );
        assert_eq!(m.bucket_counts.iter().sum::<u64>(), 2);
    }

    #[test]
    fn bounds_and_iterator() {
        let h = AtomicHistogram::new();
        for v in [0.001, 0.002, 0.5, 7.0] {
            h.record(v);
        }
        let s = h.snapshot();
        let b: Vec<_> = s.buckets().collect();
        assert_eq!(b.len(), s.bucket_counts.len());
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), 4);
        for w in b.windows(2) {
            // same computation; tolerance only for Miri's deliberately perturbed float math
            assert!((w[0].1 - w[1].0).abs() <= 1e-12 * w[0].1);
        }
        for v in [0.001, 0.002, 0.5, 7.0] {
            let p = (bucket_index(v) - s.offset) as usize;
            let (l, u) = s.bucket_bounds(p);
            assert!(l < v && v <= u && s.bucket_counts[p] == 1);
        }
    }

    // ---- weighting, reset, memory, threads ----

    #[test]
    fn weighted_extra() {
        let h = AtomicHistogram::new();
        h.record_weighted(2.0, 10.0);
        h.record_weighted(3.0, 1.0);
        h.record_weighted(0.0, 5.0);
        let s = h.snapshot();
        assert_eq!((s.count, s.sum, s.weighted_extra), (3, 5.0, 18.0));
        assert_eq!(s.estimated_sum(), 23.0);
        let mut m = s.clone();
        m.merge(&s);
        assert_eq!((m.weighted_extra, m.estimated_sum()), (36.0, 46.0));
    }

    #[test]
    fn reset_zeroes_and_keeps_working() {
        let h = AtomicHistogram::new();
        assert!(h.is_empty());
        for v in [0.0, 1.0, 2.5, 1e-7] {
            h.record_weighted(v, 2.0);
        }
        assert!(!h.is_empty());
        let mem = h.memory_bytes();
        h.reset();
        assert!(h.is_empty());
        assert_eq!(h.snapshot(), HistogramSnapshot::empty(SCALE));
        assert_eq!(h.memory_bytes(), mem);
        h.record(4.0);
        let s = h.snapshot();
        assert_eq!((s.count, s.sum, s.min, s.max), (1, 4.0, 4.0, 4.0));
        assert_eq!(
            (s.offset, s.bucket_counts.clone()),
            (bucket_index(4.0), vec![1])
        );
        h.reset();
        h.record(0.0);
        assert!(!h.is_empty());
    }

    #[test]
    fn reset_concurrent_with_record() {
        let h = Arc::new(AtomicHistogram::new());
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        h.record(((i % 977) as f64 + t as f64) * 1e-3);
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            h.reset();
            let s = h.snapshot();
            assert_eq!(s.count, s.zero_count + s.bucket_counts.iter().sum::<u64>());
            assert!(s.min <= s.max || s.count == 0);
        }
        for w in writers {
            w.join().unwrap();
        }
    }

    #[test]
    fn memory_is_sparse() {
        let h = AtomicHistogram::new();
        let base = h.memory_bytes();
        assert_eq!(base, std::mem::size_of::<AtomicHistogram>());
        for i in 0..=10_000 {
            h.record(1e-6 * (1e6f64).powf(i as f64 / 10_000.0));
        }
        let m = h.memory_bytes();
        assert!(m < 8 * 1024, "{m}");
        for (lo, hi) in [(1e-9f64, 3600.0f64), (1.0, 1e12)] {
            let h = AtomicHistogram::new();
            for i in 0..=10_000 {
                h.record(lo * (hi / lo).powf(i as f64 / 10_000.0));
            }
            assert!(h.memory_bytes() < 8 * 1024, "{}", h.memory_bytes());
        }
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<AtomicHistogram>();
        check::<HistogramSnapshot>();
    }

    fn stress_values(thread: u64) -> impl Iterator<Item = f64> {
        let mut x = 0x2545f4914f6cdd1du64 ^ (thread + 1).wrapping_mul(0x9e3779b97f4a7c15);
        (0..200_000).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 97 == 0 {
                0.0
            } else {
                let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                1e-9 * (3.6e12f64).powf(u)
            }
        })
    }

    #[test]
    fn many_threads_match_reference() {
        const THREADS: u64 = 8;
        let h = Arc::new(AtomicHistogram::new());
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || stress_values(t).for_each(|v| h.record(v)))
            })
            .collect();
        for t in handles {
            t.join().unwrap();
        }
        let reference = AtomicHistogram::new();
        let (mut min, mut max) = (f64::INFINITY, 0.0f64);
        for t in 0..THREADS {
            for v in stress_values(t) {
                reference.record(v);
                min = min.min(v);
                max = max.max(v);
            }
        }
        let (got, want) = (h.snapshot(), reference.snapshot());
        assert_eq!(got.count, 1_600_000);
        assert_eq!(got.count, want.count);
        assert_eq!(got.zero_count, want.zero_count);
        assert_eq!(
            (got.offset, &got.bucket_counts),
            (want.offset, &want.bucket_counts)
        );
        assert_eq!((got.min, got.max), (min, max));
        assert_eq!((want.min, want.max), (min, max));
        assert!((got.sum - want.sum).abs() <= 1e-9 * want.sum);
    }
}
