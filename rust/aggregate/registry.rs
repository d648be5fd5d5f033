//! The process-wide registry: operations (metered code) and custom instruments, by name.
//!
//! Like the series maps it is lock-free: lookups load an `ArcSwap`, inserts swap in a
//! copy. After `os.fork()` the child clears every series (`reset`, called by the binding),
//! so it starts with empty state while the parent's data stays untouched; handles held by
//! decorated functions stay valid.

use super::series::{CallSeries, CounterSeries, HistogramSeries};
use super::series_map::{SeriesData, SeriesMap};
use super::snapshot::{MeasureSnapshot, SeriesKind, SeriesSnapshot};
use crate::probe::{fork, ProbeSet, DURATION, MEASURES};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

/// Metered code with one name: its series by attribute set.
pub struct Operation {
    pub name: Arc<str>,
    pub series: SeriesMap<CallSeries>,
    /// Union of the probes any meter of this operation asked for: these measures appear
    /// in snapshots (empty until sampled) and the others do not.
    probes_requested: AtomicU8,
}

impl Operation {
    pub fn request_probes(&self, probes: ProbeSet) {
        self.probes_requested
            .fetch_or(probes.bits(), Ordering::Relaxed);
    }

    pub fn probes_requested(&self) -> ProbeSet {
        ProbeSet::from_bits(self.probes_requested.load(Ordering::Relaxed))
    }
}

/// A custom instrument: a histogram or a counter with its own name, unit and description.
pub struct Instrument<T> {
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub description: Arc<str>,
    pub series: SeriesMap<T>,
}

type Named<T> = ArcSwap<HashMap<Arc<str>, Arc<T>>>;

#[derive(Default)]
pub struct Registry {
    operations: Named<Operation>,
    histograms: Named<Instrument<HistogramSeries>>,
    counters: Named<Instrument<CounterSeries>>,
    /// How many times `reset` ran, and the Unix time (ns) of the latest: exporters start
    /// their cumulative windows again there.
    resets: AtomicU64,
    last_reset_unix_ns: AtomicU64,
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
        let mut next = HashMap::clone(current);
        next.insert(Arc::from(name), Arc::clone(&fresh));
        Arc::new(next)
    });
    chosen
}

fn values<T>(map: &Named<T>) -> Vec<Arc<T>> {
    map.load().values().cloned().collect()
}

/// The global registry, created on first use.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        fork::install();
        Registry::default()
    })
}

fn instrument<T: SeriesData>(name: &str, unit: &str, description: &str) -> Instrument<T> {
    Instrument {
        name: Arc::from(name),
        unit: Arc::from(unit),
        description: Arc::from(description),
        series: SeriesMap::new(),
    }
}

/// The instrument `name` in `own`, unless `other` (the other kind, `kinds.1`) has it.
fn named_instrument<T: SeriesData, U>(
    own: &Named<Instrument<T>>,
    other: &Named<Instrument<U>>,
    kinds: (&str, &str),
    name: &str,
    unit: &str,
    description: &str,
) -> Result<Arc<Instrument<T>>, String> {
    if other.load().contains_key(name) {
        let (kind, other_kind) = kinds;
        return Err(format!(
            "{name:?} is already a {other_kind}; pick another name for the {kind}"
        ));
    }
    Ok(get_or_insert(own, name, || {
        instrument(name, unit, description)
    }))
}

impl Registry {
    pub fn operation(&self, name: &str) -> Arc<Operation> {
        get_or_insert(&self.operations, name, || Operation {
            name: Arc::from(name),
            series: SeriesMap::new(),
            probes_requested: AtomicU8::new(0),
        })
    }

    /// The histogram instrument `name`; an existing one keeps its first unit and description.
    pub fn histogram(
        &self,
        name: &str,
        unit: &str,
        description: &str,
    ) -> Result<Arc<Instrument<HistogramSeries>>, String> {
        let kinds = ("histogram", "counter");
        named_instrument(
            &self.histograms,
            &self.counters,
            kinds,
            name,
            unit,
            description,
        )
    }

    /// The counter instrument `name`; an existing one keeps its first unit and description.
    pub fn counter(
        &self,
        name: &str,
        unit: &str,
        description: &str,
    ) -> Result<Arc<Instrument<CounterSeries>>, String> {
        let kinds = ("counter", "histogram");
        named_instrument(
            &self.counters,
            &self.histograms,
            kinds,
            name,
            unit,
            description,
        )
    }

    /// (number of resets so far, Unix time in ns of the latest).
    pub fn resets(&self) -> (u64, u64) {
        // The time is stored before the count, so a count read here has its time.
        let count = self.resets.load(Ordering::Acquire);
        (count, self.last_reset_unix_ns.load(Ordering::Relaxed))
    }

    /// Clears every recorded value. Handles stay valid and record into the cleared series.
    pub fn reset(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        self.last_reset_unix_ns.store(now, Ordering::Relaxed);
        self.resets.fetch_add(1, Ordering::Release);
        for operation in values(&self.operations) {
            operation.series.all().iter().for_each(|s| s.reset());
        }
        for histogram in values(&self.histograms) {
            histogram
                .series
                .all()
                .iter()
                .for_each(|s| s.histogram.reset());
        }
        for counter in values(&self.counters) {
            counter.series.all().iter().for_each(|s| s.reset());
        }
    }

    /// Plain-data copies of every series that has data.
    pub fn snapshot(&self) -> Vec<SeriesSnapshot> {
        let mut out = Vec::new();
        for operation in values(&self.operations) {
            let requested = operation.probes_requested();
            for series in operation.series.all() {
                let tracks_active = series.tracks_active.load(Ordering::Relaxed);
                if series.is_empty() && !(tracks_active && series.active_calls() > 0) {
                    continue;
                }
                let duration = series.duration.snapshot();
                let mut measures = vec![MeasureSnapshot {
                    name: DURATION.name.into(),
                    unit: DURATION.unit.into(),
                    histogram: duration,
                }];
                for (index, info) in MEASURES.iter().enumerate() {
                    if requested.contains(info.probe) {
                        measures.push(MeasureSnapshot {
                            name: info.name.into(),
                            unit: info.unit.into(),
                            histogram: series.probes[index].snapshot(),
                        });
                    }
                }
                out.push(SeriesSnapshot {
                    kind: SeriesKind::Call,
                    name: Arc::clone(&operation.name),
                    unit: DURATION.unit.into(),
                    description: "".into(),
                    attributes: series.attributes().clone(),
                    count: measures[0].histogram.count,
                    measures,
                    value: 0.0,
                    exemplars: series.exemplars.snapshot(),
                    active: tracks_active.then(|| series.active_calls()),
                });
            }
        }
        for histogram in values(&self.histograms) {
            for series in histogram.series.all() {
                if series.histogram.is_empty() {
                    continue;
                }
                let snapshot = series.histogram.snapshot();
                out.push(SeriesSnapshot {
                    kind: SeriesKind::Histogram,
                    name: Arc::clone(&histogram.name),
                    unit: Arc::clone(&histogram.unit),
                    description: Arc::clone(&histogram.description),
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
            }
        }
        for counter in values(&self.counters) {
            for series in counter.series.all() {
                if series.is_empty() {
                    continue;
                }
                out.push(SeriesSnapshot {
                    kind: SeriesKind::Counter,
                    name: Arc::clone(&counter.name),
                    unit: Arc::clone(&counter.unit),
                    description: Arc::clone(&counter.description),
                    attributes: series.attributes().clone(),
                    count: series.adds(),
                    measures: Vec::new(),
                    value: series.value(),
                    exemplars: Vec::new(),
                    active: None,
                });
            }
        }
        // A stable order for readers and tests.
        out.sort_unstable_by(|a, b| {
            (a.kind, &a.name, &a.attributes).cmp(&(b.kind, &b.name, &b.attributes))
        });
        out
    }

    /// How many bytes the histograms of every series hold (for memory-bound checks).
    pub fn memory_bytes(&self) -> usize {
        let mut total = 0;
        for operation in values(&self.operations) {
            for series in operation.series.all() {
                total += series.duration.memory_bytes();
                total += series
                    .probes
                    .iter()
                    .map(|h| h.memory_bytes())
                    .sum::<usize>();
            }
        }
        for histogram in values(&self.histograms) {
            total += histogram
                .series
                .all()
                .iter()
                .map(|s| s.histogram.memory_bytes())
                .sum::<usize>();
        }
        total
    }
}
