//! Reading a process group's numbers: every member's series, summed by identity, plus the
//! totals of the members that are gone.
//!
//! A member that is gone (exited, killed) is *folded*: its series are added into the
//! graveyard (a blob of series snapshots in the segment) and its slot and arena freed for
//! a new member, so the space used depends on the number of series and of live members,
//! never on how many came and went. Folding runs under the group's lock and commits by one
//! store: the new blob is written into the graveyard buffer not in use, names the members
//! it folded, and is made current by storing its index. A folder that dies before that
//! store leaves the old blob current (its work is redone); one that dies after it leaves
//! members that the current blob names as folded, which the next folder only frees.

use super::liveness::ProcessId;
use super::member::{entries, Entry};
use super::segment::{Member, Segment, ARENA_BYTES, FREE, GRAVEYARD_BYTES, LIVE, MAX_MEMBERS};
use super::wire::{identity_of, Identity, Reader, Writer};
use crate::aggregate::boundaries::Boundaries;
use crate::aggregate::histogram::{AtomicHistogram, HistogramSnapshot, SCALE};
use crate::aggregate::registry::{measure_names, sorted};
use crate::aggregate::series::{CallSeries, CounterSeries, HistogramSeries};
use crate::aggregate::series_map::SeriesData;
use crate::aggregate::snapshot::{MeasureSnapshot, SeriesKind, SeriesSnapshot};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

const BLOB_MAGIC: u64 = u64::from_le_bytes(*b"GRAVEYRD");
/// Magic, sequence, payload length.
const BLOB_HEADER: usize = 24;

/// The folded totals: what the current graveyard blob holds.
#[derive(Clone, Default)]
pub struct Graveyard {
    /// Counts the blobs written (a cache of the decoded blob is keyed by it).
    sequence: u64,
    /// The members the blob folded in last (slot and process).
    folded: Vec<(usize, ProcessId)>,
    series: Arc<Vec<SeriesSnapshot>>,
}

/// The graveyard last decoded by this process, by segment and sequence.
static DECODED: Mutex<Option<(usize, Graveyard)>> = Mutex::new(None);

/// The group's series: the live members' and the folded totals, summed by identity. Folds
/// the members that are gone first.
pub fn snapshot(segment: &Segment, me: usize) -> Result<Vec<SeriesSnapshot>, String> {
    let header = segment.header();
    let _guard = header.lock.lock()?;
    let graveyard = fold_gone(segment, me)?;
    let mut merged = Merged::default();
    for series in graveyard.series.iter() {
        merged.add(series.clone());
    }
    for slot in 0..MAX_MEMBERS {
        let member = &header.members[slot];
        if member.state.load(Ordering::Acquire) == LIVE {
            // Gone but not folded (no room for the folded totals): its calls count, its
            // calls in flight do not.
            let live = slot == me || process_of(member).is_alive();
            // SAFETY: the lock is held: no member is folded (its arena freed) meanwhile.
            for series in unsafe { read_member(member, live, segment.view_shift()) } {
                merged.add(series);
            }
        }
    }
    Ok(sorted(merged.into_series()))
}

/// The PIDs of the live members.
pub fn live_members(segment: &Segment) -> Vec<u32> {
    segment
        .header()
        .members
        .iter()
        .filter(|member| member.state.load(Ordering::Acquire) == LIVE)
        .filter(|member| process_of(member).is_alive())
        .map(|member| member.pid.load(Ordering::Relaxed))
        .collect()
}

fn process_of(member: &Member) -> ProcessId {
    ProcessId {
        pid: member.pid.load(Ordering::Relaxed),
        start: member.start.load(Ordering::Relaxed),
    }
}

/// Folds every member whose process is gone into the graveyard and frees its slot; returns
/// the graveyard. The caller holds the group's lock; `me` (the caller's slot, or
/// `MAX_MEMBERS`) is live by definition.
pub(super) fn fold_gone(segment: &Segment, me: usize) -> Result<Graveyard, String> {
    let header = segment.header();
    let mut graveyard = current_graveyard(segment);
    // A folder that died after its commit: the members its blob names are folded already.
    for &(slot, process) in &graveyard.folded {
        let member = &header.members[slot];
        if member.state.load(Ordering::Acquire) == LIVE && process_of(member) == process {
            free(segment, slot);
        }
    }
    let gone: Vec<usize> = (0..MAX_MEMBERS)
        .filter(|&slot| slot != me)
        .filter(|&slot| {
            let member = &header.members[slot];
            member.state.load(Ordering::Acquire) == LIVE && !process_of(member).is_alive()
        })
        .collect();
    if gone.is_empty() {
        return Ok(graveyard);
    }
    let mut merged = Merged::default();
    for series in graveyard.series.iter() {
        merged.add(series.clone());
    }
    for &slot in &gone {
        // SAFETY: the lock is held, and the member's process is gone: nothing writes its
        // arena, and nothing frees it before this fold commits.
        for series in unsafe { read_member(&header.members[slot], false, segment.view_shift()) } {
            merged.add(series);
        }
    }
    let folded = Graveyard {
        sequence: graveyard.sequence + 1,
        folded: gone
            .iter()
            .map(|&slot| (slot, process_of(&header.members[slot])))
            .collect(),
        series: Arc::new(merged.into_series()),
    };
    let old = header.graveyard.load(Ordering::Acquire) as usize & 1;
    if write_blob(segment, 1 - old, &folded).is_err() {
        // No room to write the totals (a full /dev/shm): the gone stay unfolded, and are
        // read where they are until there is.
        return Ok(graveyard);
    }
    // The commit.
    header.graveyard.store((1 - old) as u32, Ordering::Release);
    for &slot in &gone {
        free(segment, slot);
    }
    let (start, _) = segment.graveyard(old);
    segment.release(start, GRAVEYARD_BYTES);
    remember(segment, &folded);
    graveyard = folded;
    Ok(graveyard)
}

/// Frees a folded member's slot and gives its arena's memory back.
fn free(segment: &Segment, slot: usize) {
    let member = &segment.header().members[slot];
    member.directory.store(0, Ordering::Relaxed);
    member.state.store(FREE, Ordering::Release);
    let (start, _) = segment.arena(slot);
    segment.release(start, ARENA_BYTES);
}

fn remember(segment: &Segment, graveyard: &Graveyard) {
    if let Ok(mut decoded) = DECODED.lock() {
        *decoded = Some((segment.base(), graveyard.clone()));
    }
}

/// The current blob, decoded (or this process's copy of it, if it is the same sequence).
fn current_graveyard(segment: &Segment) -> Graveyard {
    let which = segment.header().graveyard.load(Ordering::Acquire) as usize & 1;
    let (start, _) = segment.graveyard(which);
    // SAFETY: the blob's header lies in the segment, mapped for good; the lock is held, so
    // no folder writes it meanwhile.
    let head = unsafe { std::slice::from_raw_parts(start as *const u8, BLOB_HEADER) };
    let word =
        |index: usize| u64::from_le_bytes(head[index * 8..index * 8 + 8].try_into().unwrap());
    if word(0) != BLOB_MAGIC {
        return Graveyard::default(); // no member folded yet
    }
    let (sequence, length) = (word(1), word(2) as usize);
    if let Ok(decoded) = DECODED.lock() {
        if let Some((base, graveyard)) = decoded.as_ref() {
            if *base == segment.base() && graveyard.sequence == sequence {
                return graveyard.clone();
            }
        }
    }
    if length > GRAVEYARD_BYTES - BLOB_HEADER {
        return Graveyard::default();
    }
    // SAFETY: as above, `length` bytes after the header, inside the buffer.
    let payload = unsafe { std::slice::from_raw_parts((start + BLOB_HEADER) as *const u8, length) };
    let graveyard = decode(sequence, payload).unwrap_or_default();
    remember(segment, &graveyard);
    graveyard
}

fn decode(sequence: u64, payload: &[u8]) -> Option<Graveyard> {
    let mut reader = Reader::new(payload);
    let folded = (0..reader.u64()?)
        .map(|_| {
            let slot = reader.u64()? as usize;
            let pid = reader.u64()? as u32;
            let start = reader.u64()?;
            (slot < MAX_MEMBERS).then_some((slot, ProcessId { pid, start }))
        })
        .collect::<Option<Vec<_>>>()?;
    let series = (0..reader.u64()?)
        .map(|_| reader.series())
        .collect::<Option<Vec<_>>>()?;
    Some(Graveyard {
        sequence,
        folded,
        series: Arc::new(series),
    })
}

fn write_blob(segment: &Segment, which: usize, graveyard: &Graveyard) -> Result<(), String> {
    let mut writer = Writer::default();
    writer.u64(graveyard.folded.len() as u64);
    for (slot, process) in &graveyard.folded {
        writer.u64(*slot as u64);
        writer.u64(process.pid as u64);
        writer.u64(process.start);
    }
    writer.u64(graveyard.series.len() as u64);
    for series in graveyard.series.iter() {
        writer.series(series);
    }
    let payload = writer.bytes;
    if payload.len() > GRAVEYARD_BYTES - BLOB_HEADER {
        return Err(format!(
            "the group's folded series take {} bytes, more than the graveyard's {GRAVEYARD_BYTES}",
            payload.len()
        ));
    }
    let (start, _) = segment.graveyard(which);
    if !segment.back(start, BLOB_HEADER + payload.len()) {
        return Err("no room in /dev/shm for the group's folded series".into());
    }
    // SAFETY: the buffer not in use, inside the segment and now backed; the lock is held.
    unsafe {
        let out = start as *mut u8;
        for (index, word) in [BLOB_MAGIC, graveyard.sequence, payload.len() as u64]
            .iter()
            .enumerate()
        {
            std::ptr::copy_nonoverlapping(word.to_le_bytes().as_ptr(), out.add(index * 8), 8);
        }
        std::ptr::copy_nonoverlapping(payload.as_ptr(), out.add(BLOB_HEADER), payload.len());
    }
    Ok(())
}

/// A member's series, from its directory, read through the segment's readers' view
/// (`shift`): what the shared memory holds, whatever this process's own mapping of that
/// member's arena shows (a fork child's is a private copy). `live`: its calls in flight
/// count.
///
/// # Safety
/// The group's lock is held, the member is live or gone but not yet freed, and `shift` is
/// the segment's view shift.
unsafe fn read_member(member: &Member, live: bool, shift: isize) -> Vec<SeriesSnapshot> {
    let epoch = member.epoch.load(Ordering::Acquire);
    // SAFETY: the caller's contract.
    unsafe { entries(member, shift) }
        .filter_map(|entry| {
            // SAFETY: the caller's contract.
            let identity = Reader::new(unsafe { entry.identity_bytes(shift) }).identity()?;
            // SAFETY: an entry names a series of its identity's kind, alive for good in the
            // member's arena (the member keeps it; the caller keeps the arena).
            unsafe { read_series(entry, identity, epoch, live, shift) }
        })
        .collect()
}

/// # Safety
/// `entry.series` is a live series of `identity.kind`, mapped `shift` bytes away.
unsafe fn read_series(
    entry: &Entry,
    identity: Identity,
    epoch: u64,
    live: bool,
    shift: isize,
) -> Option<SeriesSnapshot> {
    let names = measure_names();
    let address = (entry.series as isize + shift) as usize;
    let mut snapshot = SeriesSnapshot {
        kind: identity.kind,
        name: identity.name,
        unit: identity.unit,
        description: identity.description,
        boundaries: identity.boundaries,
        attributes: identity.attributes,
        count: 0,
        measures: Vec::new(),
        value: 0.0,
        exemplars: Vec::new(),
        active: None,
    };
    match snapshot.kind {
        SeriesKind::Call => {
            // SAFETY: the caller's contract; only loads of atomics (the view is read-only).
            let series = unsafe { &*(address as *const CallSeries) };
            let current = series.liveness().epoch() == epoch;
            let active = if live { series.active.counted() } else { None };
            let in_flight = active.is_some_and(|calls| calls > 0);
            if !current && !in_flight {
                return None;
            }
            let read = |histogram: &AtomicHistogram| {
                if current {
                    // SAFETY: as above.
                    unsafe { histogram.snapshot_shifted(shift) }
                } else {
                    HistogramSnapshot::empty(SCALE)
                }
            };
            let duration = read(&series.duration);
            snapshot.count = duration.count;
            snapshot.measures.push(MeasureSnapshot {
                name: Arc::clone(&names.duration.0),
                unit: Arc::clone(&names.duration.1),
                histogram: duration,
            });
            // SAFETY: as above.
            if let Some(probes) = unsafe { series.probes_shifted(shift) }.filter(|_| current) {
                for (index, histogram) in probes.iter().enumerate() {
                    // SAFETY: as above.
                    if !unsafe { histogram.is_empty_shifted(shift) } {
                        let (name, unit) = &names.probes[index];
                        snapshot.measures.push(MeasureSnapshot {
                            name: Arc::clone(name),
                            unit: Arc::clone(unit),
                            histogram: read(histogram),
                        });
                    }
                }
            }
            snapshot.active = active;
            // Exemplars are atomics in the owner's arena too; a gone member's are not kept.
            if current && live {
                // SAFETY: as above.
                snapshot.exemplars = unsafe { series.exemplars.snapshot_shifted(shift) };
            }
            if snapshot.count == 0 && !in_flight {
                return None;
            }
        }
        SeriesKind::Histogram => {
            // SAFETY: as above.
            let series = unsafe { &*(address as *const HistogramSeries) };
            // SAFETY: as above.
            let empty = unsafe { series.histogram.is_empty_shifted(shift) };
            if series.liveness().epoch() != epoch || empty {
                return None;
            }
            // SAFETY: as above.
            let histogram = unsafe { series.histogram.snapshot_shifted(shift) };
            snapshot.count = histogram.count;
            snapshot.measures.push(MeasureSnapshot {
                name: Arc::clone(&snapshot.name),
                unit: Arc::clone(&snapshot.unit),
                histogram,
            });
        }
        SeriesKind::Counter => {
            // SAFETY: as above.
            let series = unsafe { &*(address as *const CounterSeries) };
            let (value, adds) = series.raw();
            if series.liveness().epoch() != epoch || adds == 0 {
                return None;
            }
            snapshot.count = adds;
            snapshot.value = value;
        }
    }
    Some(snapshot)
}

/// Series summed by identity, whatever boundaries their members gave them.
#[derive(Default)]
struct Merged {
    index: HashMap<Identity, usize>,
    series: Vec<SeriesSnapshot>,
}

impl Merged {
    fn add(&mut self, series: SeriesSnapshot) {
        let mut identity = identity_of(&series);
        identity.boundaries = None;
        match self.index.get(&identity) {
            None => {
                self.index.insert(identity, self.series.len());
                self.series.push(series);
            }
            Some(&at) => add_into(&mut self.series[at], series),
        }
    }

    /// The sums. Every series of one custom histogram has the boundaries first seen for it
    /// (the folded totals first, then the members by slot), so that an export gives one
    /// instrument one set of buckets even if the group's processes disagree about it.
    fn into_series(mut self) -> Vec<SeriesSnapshot> {
        let mut first: HashMap<Arc<str>, Boundaries> = HashMap::new();
        for series in &self.series {
            if let (SeriesKind::Histogram, Some(boundaries)) = (series.kind, &series.boundaries) {
                first
                    .entry(Arc::clone(&series.name))
                    .or_insert_with(|| boundaries.clone());
            }
        }
        if !first.is_empty() {
            for series in self.series.iter_mut() {
                if series.kind == SeriesKind::Histogram {
                    series.boundaries = first.get(&series.name).cloned();
                }
            }
        }
        self.series
    }
}

/// `into` += `more`, two snapshots of one identity.
fn add_into(into: &mut SeriesSnapshot, more: SeriesSnapshot) {
    if into.boundaries.is_none() {
        into.boundaries = more.boundaries;
    }
    into.count = into.count.saturating_add(more.count);
    into.value = (into.value + more.value).min(f64::MAX);
    for measure in more.measures {
        match into
            .measures
            .iter_mut()
            .find(|have| have.name == measure.name)
        {
            Some(have) => have.histogram.merge(&measure.histogram),
            None => into.measures.push(measure),
        }
    }
    into.exemplars.extend(more.exemplars);
    into.active = match (into.active, more.active) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::attributes::{AttributeSet, AttributeValue};

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("meterage-collect-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A process that has exited (its PID and start time, as a member slot names it).
    fn gone_process() -> ProcessId {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (_, start) = super::super::liveness::state(child.id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        ProcessId {
            pid: child.id(),
            start,
        }
    }

    fn counter(value: f64) -> SeriesSnapshot {
        SeriesSnapshot {
            kind: SeriesKind::Counter,
            name: "jobs".into(),
            unit: "1".into(),
            description: "".into(),
            boundaries: None,
            attributes: AttributeSet::new([("queue".into(), AttributeValue::Str("a".into()))]),
            count: 1,
            measures: Vec::new(),
            value,
            exemplars: Vec::new(),
            active: None,
        }
    }

    fn make_live(segment: &Segment, slot: usize, process: ProcessId) {
        let member = &segment.header().members[slot];
        member.pid.store(process.pid, Ordering::Relaxed);
        member.start.store(process.start, Ordering::Relaxed);
        member.state.store(LIVE, Ordering::Release);
    }

    #[test]
    fn a_gone_member_is_folded_once_even_if_the_folder_died_after_committing() {
        let dir = scratch("commit");
        let me = ProcessId::current().unwrap();
        let segment = Segment::open(&dir, me).unwrap();
        // Totals folded earlier: one counter at 5.
        let earlier = Graveyard {
            sequence: 1,
            folded: Vec::new(),
            series: Arc::new(vec![counter(5.0)]),
        };
        write_blob(&segment, 0, &earlier).unwrap();
        let gone = gone_process();
        make_live(&segment, 7, gone);
        let _guard = segment.header().lock.lock().unwrap();
        let folded = fold_gone(&segment, MAX_MEMBERS).unwrap();
        assert_eq!(folded.sequence, 2);
        assert_eq!(folded.folded, vec![(7, gone)]);
        assert_eq!(folded.series[0].value, 5.0);
        assert_eq!(
            segment.header().members[7].state.load(Ordering::Acquire),
            FREE
        );
        // A folder that died right after its commit: the slot still reads LIVE. The next
        // folder frees it without folding it again (no new blob).
        make_live(&segment, 7, gone);
        *DECODED.lock().unwrap() = None; // another process: no cached copy
        let again = fold_gone(&segment, MAX_MEMBERS).unwrap();
        assert_eq!(again.sequence, 2);
        assert_eq!(
            segment.header().members[7].state.load(Ordering::Acquire),
            FREE
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_that_died_before_committing_leaves_the_old_totals_current() {
        let dir = scratch("uncommitted");
        let me = ProcessId::current().unwrap();
        let segment = Segment::open(&dir, me).unwrap();
        let current = Graveyard {
            sequence: 4,
            folded: Vec::new(),
            series: Arc::new(vec![counter(2.0)]),
        };
        write_blob(&segment, 0, &current).unwrap();
        // Half the work of a folder that died: the other buffer written, never made current.
        let unfinished = Graveyard {
            sequence: 5,
            folded: Vec::new(),
            series: Arc::new(vec![counter(99.0)]),
        };
        write_blob(&segment, 1, &unfinished).unwrap();
        *DECODED.lock().unwrap() = None;
        let _guard = segment.header().lock.lock().unwrap();
        let read = current_graveyard(&segment);
        assert_eq!((read.sequence, read.series[0].value), (4, 2.0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshots_of_one_identity_add_up_and_calls_in_flight_only_where_counted() {
        let mut merged = Merged::default();
        let mut first = counter(1.5);
        first.active = Some(2);
        merged.add(first);
        merged.add(counter(2.5));
        let mut other = counter(1.0);
        other.attributes = AttributeSet::empty();
        merged.add(other);
        let series = merged.into_series();
        assert_eq!(series.len(), 2);
        assert_eq!(
            (series[0].value, series[0].count, series[0].active),
            (4.0, 2, Some(2))
        );
    }

    #[test]
    fn a_corrupt_blob_reads_as_no_totals() {
        let mut writer = Writer::default();
        writer.u64(1);
        writer.u64(MAX_MEMBERS as u64 + 3); // a slot that does not exist
        writer.u64(1);
        writer.u64(1);
        writer.u64(0);
        assert!(decode(1, &writer.bytes).is_none());
        assert!(decode(1, &[1, 2, 3]).is_none());
    }

    #[test]
    fn one_histogram_is_summed_and_exported_with_one_set_of_boundaries() {
        let histogram = |boundaries: Option<&[f64]>, route: &str, value: f64| {
            let recorded = AtomicHistogram::new();
            recorded.record(value);
            let histogram = recorded.snapshot();
            SeriesSnapshot {
                kind: SeriesKind::Histogram,
                name: "job.output.size".into(),
                unit: "By".into(),
                description: "".into(),
                boundaries: boundaries
                    .map(|values| Boundaries::new(values.iter().copied()).unwrap()),
                attributes: AttributeSet::new([(
                    "route".into(),
                    AttributeValue::Str(route.into()),
                )]),
                count: 1,
                measures: vec![MeasureSnapshot {
                    name: "job.output.size".into(),
                    unit: "By".into(),
                    histogram,
                }],
                value: 0.0,
                exemplars: Vec::new(),
                active: None,
            }
        };
        let bytes: &[f64] = &[0.0, 1024.0, 4096.0];
        let other: &[f64] = &[10.0, 100.0];
        let mut merged = Merged::default();
        // A member that made the instrument without boundaries, then two that gave some.
        merged.add(histogram(None, "/a", 1.0));
        merged.add(histogram(Some(bytes), "/a", 2.0));
        merged.add(histogram(Some(other), "/b", 3.0));
        merged.add(histogram(None, "/c", 4.0));
        let series = merged.into_series();
        assert_eq!(series.len(), 3, "/a summed whatever its boundaries");
        assert_eq!(series[0].measures[0].histogram.count, 2);
        for one in &series {
            assert_eq!(one.boundaries.as_deref(), Some(bytes));
        }
    }
}
