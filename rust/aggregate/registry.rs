//! The process-wide registry: operations (metered code) and custom instruments, by name.
//!
//! Lock-free like the series maps: lookups load an `ArcSwap`, inserts swap in a new
//! persistent trie. A reset, and the child side of `fork()`, start a new epoch in O(1)
//! (see [`epoch`]): every series reads as empty until it records again, handles held by
//! decorated functions stay valid, and a forked child writes to no series it does not use.

use super::attributes::AttributeSet;
use super::boundaries::Boundaries;
use super::call::MeterCore;
use super::epoch;
use super::histogram::{HistogramSnapshot, SCALE};
use super::sampling::{Sampler, SamplingMode};
use super::series::{CallSeries, CounterSeries, HistogramSeries};
use super::series_map::{Label, SeriesData, SeriesMap};
use super::snapshot::{MeasureSnapshot, SeriesKind, SeriesSnapshot};
use crate::probe::{ProbeSet, DURATION, MEASURES, MEASURE_PROBES};
use arc_swap::ArcSwap;
use rpds::HashTrieMapSync;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Once, OnceLock};

/// Meters of one operation kept for reuse, so that a meter made inline (`with
/// meterage.meter("db.query"):`) finds its core, series and sampler instead of building
/// them, and its sampling adapts across uses. Beyond this many distinct settings, new
/// meters are built afresh.
const REUSED_METERS: usize = 32;

/// Metered code with one name: its series by attribute set.
pub struct Operation {
    pub name: Arc<str>,
    pub series: SeriesMap<CallSeries>,
    /// Union of the probes any meter of this operation asked for: these measures appear
    /// in snapshots (empty until sampled) and the others do not.
    probes_requested: AtomicU8,
    meters: ArcSwap<Vec<Arc<MeterCore>>>,
    /// One adaptive sampler per budget setting, shared by this operation's meters.
    samplers: ArcSwap<Vec<Arc<Sampler>>>,
}

impl Operation {
    pub fn request_probes(&self, probes: ProbeSet) {
        self.probes_requested
            .fetch_or(probes.bits(), Ordering::Relaxed);
    }

    pub fn probes_requested(&self) -> ProbeSet {
        ProbeSet::from_bits_truncate(self.probes_requested.load(Ordering::Relaxed))
    }

    /// A meter of this operation made earlier with these settings, if kept.
    pub fn reused_meter(
        &self,
        attributes: &AttributeSet,
        probes: ProbeSet,
        mode: SamplingMode,
    ) -> Option<Arc<MeterCore>> {
        self.meters
            .load()
            .iter()
            .find(|core| core.has_settings(attributes, probes, mode))
            .cloned()
    }

    /// Keeps `core` for reuse (up to [`REUSED_METERS`] per operation).
    pub fn keep_meter(&self, core: &Arc<MeterCore>) {
        self.meters.rcu(|current| {
            if current.len() >= REUSED_METERS {
                return Arc::clone(current);
            }
            let mut next = Vec::clone(current);
            next.push(Arc::clone(core));
            Arc::new(next)
        });
    }

    /// The sampler meters of this operation with `mode` share.
    pub fn sampler(&self, mode: SamplingMode) -> Arc<Sampler> {
        if let Some(found) = self.samplers.load().iter().find(|s| s.mode() == mode) {
            return Arc::clone(found);
        }
        let fresh = Arc::new(Sampler::new(mode));
        let mut chosen = Arc::clone(&fresh);
        self.samplers.rcu(|current| {
            if let Some(found) = current.iter().find(|s| s.mode() == mode) {
                chosen = Arc::clone(found);
                return Arc::clone(current);
            }
            chosen = Arc::clone(&fresh);
            let mut next = Vec::clone(current);
            next.push(Arc::clone(&fresh));
            Arc::new(next)
        });
        chosen
    }
}

/// A custom instrument: a histogram or a counter with its own name, unit and description
/// (and, for a histogram, the explicit bucket boundaries it asked to be exported with).
pub struct Instrument<T> {
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub description: Arc<str>,
    /// None: the exporter's default boundaries (always None for a counter).
    pub boundaries: Option<Boundaries>,
    pub series: SeriesMap<T>,
}

type Named<T> = ArcSwap<HashTrieMapSync<Arc<str>, Arc<T>, foldhash::fast::RandomState>>;

fn named<T>() -> Named<T> {
    ArcSwap::from_pointee(HashTrieMapSync::new_with_hasher_and_ptr_kind(
        foldhash::fast::RandomState::default(),
    ))
}

pub struct Registry {
    operations: Named<Operation>,
    histograms: Named<Instrument<HistogramSeries>>,
    counters: Named<Instrument<CounterSeries>>,
}

/// How many times the values were cleared (resets and forks), and the Unix time (ns) of
/// the latest: exporters start their cumulative windows again there. Statics, so a fork
/// child handler can update them with atomics only.
static RESETS: AtomicU64 = AtomicU64::new(0);
static LAST_RESET_UNIX_NS: AtomicU64 = AtomicU64::new(0);

fn unix_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; clock_gettime is async-signal-safe (this runs in a fork
    // child handler too).
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// The names and units of call measures, made once: a snapshot shares them.
pub(crate) struct MeasureNames {
    pub(crate) duration: (Arc<str>, Arc<str>),
    pub(crate) probes: Vec<(Arc<str>, Arc<str>)>,
    pub(crate) empty: Arc<str>,
}

pub(crate) fn measure_names() -> &'static MeasureNames {
    static NAMES: OnceLock<MeasureNames> = OnceLock::new();
    NAMES.get_or_init(|| MeasureNames {
        duration: (DURATION.key.into(), DURATION.unit.into()),
        probes: MEASURES
            .iter()
            .map(|info| (info.key.into(), info.unit.into()))
            .collect(),
        empty: "".into(),
    })
}

/// Every value recorded so far belongs to the past: a new epoch, noted for exporters.
fn start_epoch() {
    epoch::advance();
    // The time is stored before the count, so a count read in `resets` has its time.
    LAST_RESET_UNIX_NS.store(unix_now_ns(), Ordering::Relaxed);
    RESETS.fetch_add(1, Ordering::Release);
}

/// In a child right after `fork()`: its values start empty, in O(1) (nothing but atomics,
/// as a fork handler must; no series page is written, so the parent's stay shared).
extern "C" fn after_fork_in_child() {
    start_epoch();
    super::sampling::reseed_thread();
}

/// The entry for `name`, inserting `make()` if there is none (the first insert wins).
fn get_or_insert<T>(map: &Named<T>, name: &str, make: impl FnOnce() -> T) -> Arc<T> {
    if let Some(found) = map.load().get(name) {
        return Arc::clone(found);
    }
    let fresh = Arc::new(make());
    let mut chosen = Arc::clone(&fresh);
    map.rcu(|current| {
        if let Some(found) = current.get(name) {
            chosen = Arc::clone(found);
            return Arc::clone(current);
        }
        chosen = Arc::clone(&fresh);
        Arc::new(current.insert(Arc::from(name), Arc::clone(&fresh)))
    });
    chosen
}

/// Calls `f` on every entry, taking no reference (so no page of an entry is written).
fn for_each<T>(map: &Named<T>, mut f: impl FnMut(&T)) {
    map.load().values().for_each(|entry| f(entry));
}

/// The global registry, created on first use.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        crate::probe::fork::install();
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            // SAFETY: a plain extern "C" function that lives forever.
            unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        });
        Registry {
            operations: named(),
            histograms: named(),
            counters: named(),
        }
    })
}

fn instrument<T: SeriesData>(
    kind: SeriesKind,
    name: &str,
    unit: &str,
    description: &str,
    boundaries: Option<Boundaries>,
) -> Instrument<T> {
    Instrument {
        name: Arc::from(name),
        unit: Arc::from(unit),
        description: Arc::from(description),
        boundaries: boundaries.clone(),
        series: SeriesMap::labelled(Label {
            kind,
            name: Arc::from(name),
            unit: Arc::from(unit),
            description: Arc::from(description),
            boundaries,
        }),
    }
}

/// Why `name` cannot be a new instrument of kind `kind`, if it cannot.
fn refused(registry: &Registry, kind: &str, name: &str) -> Option<String> {
    if let Some(owner) = crate::bridge::names::reserved_by(name) {
        return Some(format!(
            "{name:?} is reserved: it would be exported as, or in place of, {owner}; pick \
             another name for the {kind}"
        ));
    }
    // Exporters spell names their own way (Prometheus: `.` becomes `_`, a unit suffix and
    // `_total` are added): two instruments that end up with one name break every scrape.
    let family = crate::bridge::names::family(name);
    let clash = |names: Vec<Arc<str>>, other_kind: &str| {
        names
            .into_iter()
            .find(|other| **other == *name || crate::bridge::names::family(other) == family)
            .map(|other| (other, other_kind.to_owned()))
    };
    let histograms = registry.histograms.load().keys().cloned().collect();
    let counters = registry.counters.load().keys().cloned().collect();
    let found = clash(histograms, "histogram").or_else(|| clash(counters, "counter"));
    match found {
        Some((other, other_kind)) if *other == *name && other_kind == kind => None,
        Some((other, other_kind)) if *other == *name => Some(format!(
            "{name:?} is already a {other_kind}; pick another name for the {kind}"
        )),
        Some((other, other_kind)) => Some(format!(
            "{name:?} would be exported under the same name as the {other_kind} {other:?}; \
             pick another name for the {kind}"
        )),
        None => None,
    }
}

impl Registry {
    pub fn operation(&self, name: &str) -> Arc<Operation> {
        get_or_insert(&self.operations, name, || Operation {
            name: Arc::from(name),
            series: SeriesMap::labelled(Label {
                kind: SeriesKind::Call,
                name: Arc::from(name),
                unit: Arc::from(DURATION.unit),
                description: Arc::from(""),
                boundaries: None,
            }),
            probes_requested: AtomicU8::new(0),
            meters: ArcSwap::from_pointee(Vec::new()),
            samplers: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// The histogram instrument `name`; an existing one keeps its first unit, description
    /// and boundaries.
    pub fn histogram(
        &self,
        name: &str,
        unit: &str,
        description: &str,
        boundaries: Option<Boundaries>,
    ) -> Result<Arc<Instrument<HistogramSeries>>, String> {
        if let Some(found) = self.histograms.load().get(name) {
            return Ok(Arc::clone(found));
        }
        if let Some(why) = refused(self, "histogram", name) {
            return Err(why);
        }
        Ok(get_or_insert(&self.histograms, name, || {
            instrument(SeriesKind::Histogram, name, unit, description, boundaries)
        }))
    }

    /// The counter instrument `name`; an existing one keeps its first unit and description.
    pub fn counter(
        &self,
        name: &str,
        unit: &str,
        description: &str,
    ) -> Result<Arc<Instrument<CounterSeries>>, String> {
        if let Some(found) = self.counters.load().get(name) {
            return Ok(Arc::clone(found));
        }
        if let Some(why) = refused(self, "counter", name) {
            return Err(why);
        }
        Ok(get_or_insert(&self.counters, name, || {
            instrument(SeriesKind::Counter, name, unit, description, None)
        }))
    }

    /// (number of resets so far, Unix time in ns of the latest). Forks count as resets.
    pub fn resets(&self) -> (u64, u64) {
        let count = RESETS.load(Ordering::Acquire);
        (count, LAST_RESET_UNIX_NS.load(Ordering::Relaxed))
    }

    /// Forgets every series (a fork child of a process group's member: the series it
    /// inherited are its parent's, and it makes its own).
    pub fn forget_series(&self) {
        for_each(&self.operations, |operation| operation.series.forget());
        for_each(&self.histograms, |histogram| histogram.series.forget());
        for_each(&self.counters, |counter| counter.series.forget());
    }

    /// Clears every recorded value in O(1), and drops the series nothing else holds.
    /// Handles stay valid and record into their (cleared) series; calls in flight stay
    /// counted in flight. Values recorded by other threads at the same instant (only
    /// possible without the GIL) may be kept or lost.
    pub fn reset(&self) {
        start_epoch();
        for_each(&self.operations, |operation| operation.series.prune());
        for_each(&self.histograms, |histogram| histogram.series.prune());
        for_each(&self.counters, |counter| counter.series.prune());
    }

    /// Plain-data copies of every series that has data.
    pub fn snapshot(&self) -> Vec<SeriesSnapshot> {
        let names = measure_names();
        let mut out = Vec::new();
        // Series are only read here, never referenced: a forked child that takes a
        // snapshot leaves its parent's series pages shared.
        for_each(&self.operations, |operation| {
            let requested = operation.probes_requested();
            operation.series.for_each(|series| {
                let active = series.active.now();
                let in_flight = active.is_some_and(|calls| calls > 0);
                let current = series.liveness().is_current();
                if !current && !in_flight {
                    return;
                }
                let read = |histogram: Option<&super::histogram::AtomicHistogram>| match histogram {
                    Some(histogram) if current => histogram.snapshot(),
                    _ => HistogramSnapshot::empty(SCALE),
                };
                let duration = read(Some(&series.duration));
                if duration.count == 0 && !in_flight {
                    return;
                }
                let mut measures = Vec::with_capacity(1 + MEASURES.len());
                measures.push(MeasureSnapshot {
                    name: Arc::clone(&names.duration.0),
                    unit: Arc::clone(&names.duration.1),
                    histogram: duration,
                });
                for (index, probe) in MEASURE_PROBES.iter().enumerate() {
                    if requested.contains(*probe) {
                        let (name, unit) = &names.probes[index];
                        measures.push(MeasureSnapshot {
                            name: Arc::clone(name),
                            unit: Arc::clone(unit),
                            histogram: read(series.probe(index)),
                        });
                    }
                }
                out.push(SeriesSnapshot {
                    kind: SeriesKind::Call,
                    name: Arc::clone(&operation.name),
                    unit: Arc::clone(&names.duration.1),
                    description: Arc::clone(&names.empty),
                    boundaries: None,
                    attributes: series.attributes().clone(),
                    count: measures[0].histogram.count,
                    measures,
                    value: 0.0,
                    exemplars: if current {
                        series.exemplars.snapshot()
                    } else {
                        Vec::new()
                    },
                    active,
                });
            });
        });
        for_each(&self.histograms, |histogram| {
            histogram.series.for_each(|series| {
                if series.is_empty() {
                    return;
                }
                let snapshot = series.histogram.snapshot();
                out.push(SeriesSnapshot {
                    kind: SeriesKind::Histogram,
                    name: Arc::clone(&histogram.name),
                    unit: Arc::clone(&histogram.unit),
                    description: Arc::clone(&histogram.description),
                    boundaries: histogram.boundaries.clone(),
                    attributes: series.attributes().clone(),
                    count: snapshot.count,
                    measures: vec![MeasureSnapshot {
                        name: Arc::clone(&histogram.name),
                        unit: Arc::clone(&histogram.unit),
                        histogram: snapshot,
                    }],
                    value: 0.0,
                    exemplars: Vec::new(),
                    active: None,
                });
            });
        });
        for_each(&self.counters, |counter| {
            counter.series.for_each(|series| {
                if series.is_empty() {
                    return;
                }
                out.push(SeriesSnapshot {
                    kind: SeriesKind::Counter,
                    name: Arc::clone(&counter.name),
                    unit: Arc::clone(&counter.unit),
                    description: Arc::clone(&counter.description),
                    boundaries: None,
                    attributes: series.attributes().clone(),
                    count: series.adds(),
                    measures: Vec::new(),
                    value: series.value(),
                    exemplars: Vec::new(),
                    active: None,
                });
            });
        });
        sorted(out)
    }

    /// Bytes held by every series' histograms and counters (for checking that memory stays
    /// bounded; the maps' own nodes and the attribute sets are not counted).
    pub fn memory_bytes(&self) -> usize {
        let mut total = 0;
        for_each(&self.operations, |operation| {
            operation
                .series
                .for_each(|series| total += series.memory_bytes());
        });
        for_each(&self.histograms, |histogram| {
            histogram
                .series
                .for_each(|series| total += series.histogram.memory_bytes());
        });
        total
    }
}

/// Snapshots in a stable order for readers and tests.
pub fn sorted(out: Vec<SeriesSnapshot>) -> Vec<SeriesSnapshot> {
    // A stable order for readers and tests: sorted by index, then moved into place
    // once (a snapshot is a few hundred bytes; sorting them in place moves each many
    // times).
    // Each is given an integer key first (its kind, the rank of its name, its attributes'
    // prefix), so most comparisons are of integers; ties are compared in full.
    let mut names: Vec<&Arc<str>> = out.iter().map(|series| &series.name).collect();
    names.sort_unstable();
    names.dedup();
    let mut order: Vec<([u64; 4], usize)> = out
        .iter()
        .enumerate()
        .map(|(index, series)| {
            let rank = names.binary_search(&&series.name).unwrap_or(0) as u64;
            let (key, value) = series.attributes.sort_prefix();
            let kind_and_name = (series.kind as u64) << 56 | rank;
            (
                [kind_and_name, key, (value >> 64) as u64, value as u64],
                index,
            )
        })
        .collect();
    order.sort_unstable_by(|(a_key, a), (b_key, b)| {
        a_key
            .cmp(b_key)
            .then_with(|| out[*a].attributes.cmp(&out[*b].attributes))
    });
    let mut taken: Vec<Option<SeriesSnapshot>> = out.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|(_, index)| taken[index].take())
        .collect()
}
