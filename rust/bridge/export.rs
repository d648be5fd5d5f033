//! One exporter's view of the registry: which points a collection reports, with which
//! start times, in which histogram layout, and what to subtract for delta temporality.
//!
//! Each OpenTelemetry reader gets its own `ExportState`, because readers differ in
//! temporality and histogram aggregation and each needs "the change since *my* previous
//! collection". All of it runs at collection time, never on the hot path: one hash lookup
//! per series, then plain arithmetic per measure.

use super::histogram::{delta_since, explicit_counts, fit_buckets};
use crate::aggregate::attributes::{AttributeSet, AttributeValue};
use crate::aggregate::exemplars::Exemplar;
use crate::aggregate::histogram::HistogramSnapshot;
use crate::aggregate::snapshot::{SeriesKind, SeriesSnapshot};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// Attribute pairs a metric adds to its points (e.g. `io.direction`).
pub type ExtraAttributes = Arc<[(Arc<str>, AttributeValue)]>;

/// How one measure (or one kind of series) is exported: metric name, unit, description,
/// attributes added to the series' own, and the default explicit bucket boundaries.
#[derive(Clone, Debug)]
pub struct MetricSpec {
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub description: Arc<str>,
    pub attributes: ExtraAttributes,
    pub boundaries: Arc<[f64]>,
}

/// How one call measure is exported: as a histogram and, for a probe measure, also as a
/// monotonic counter of its estimated total over all calls.
#[derive(Clone, Debug)]
pub struct CallMetric {
    pub histogram: Arc<MetricSpec>,
    /// The counter of the measure's Horvitz–Thompson total (each probed value weighted by
    /// 1/p, so it sums over every call, probed or not). None for the duration: every call
    /// is timed, so its histogram's sum is already the total.
    pub estimated: Option<Arc<MetricSpec>>,
}

/// What an alias metric reports of a call series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AliasSource {
    /// The histogram of this measure (`duration`): the same counts as the measure's own
    /// metric, in the alias's boundaries.
    Measure(Arc<str>),
    /// The calls in flight, as an up-down counter.
    Active,
}

/// One more name a call series of an operation is exported under (a semantic-convention
/// metric such as `http.server.request.duration`), with the series' own attributes: the
/// operation is the metric's name, so no operation attribute.
#[derive(Clone, Debug)]
pub struct Alias {
    pub spec: Arc<MetricSpec>,
    pub source: AliasSource,
}

/// The histogram shape a reader asked for.
#[derive(Clone, Debug)]
pub enum HistogramLayout {
    /// Explicit buckets: the spec's boundaries, or these for every histogram.
    Explicit { boundaries: Option<Arc<[f64]>> },
    /// Base-2 exponential buckets, at most `max_buckets` of them, scale at most `max_scale`.
    Exponential { max_buckets: usize, max_scale: i32 },
}

/// What a reader wants.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub delta_histograms: bool,
    pub delta_counters: bool,
    pub layout: HistogramLayout,
    /// Call measures by snapshot measure name (`duration`, `cpu.time`, ...); a measure
    /// not in here is not exported.
    pub call_metrics: HashMap<String, CallMetric>,
    /// The in-flight gauge of call series (an up-down counter).
    pub active_calls: Arc<MetricSpec>,
    /// Operation name -> the metrics its call series are also exported as.
    pub aliases: HashMap<String, Arc<[Alias]>>,
    /// The attribute key naming a call's operation.
    pub operation_key: Arc<str>,
    /// Boundaries of custom histogram instruments.
    pub default_boundaries: Arc<[f64]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// A monotonic sum in the reader's counter temporality.
    Counter,
    /// A non-monotonic sum, always cumulative (OpenTelemetry keeps up-down counters so).
    UpDownCounter,
    Histogram,
    ExponentialHistogram,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PointData {
    Number(f64),
    Integer(i64),
    Explicit {
        count: u64,
        sum: f64,
        min: f64,
        max: f64,
        bucket_counts: Vec<u64>,
        boundaries: Arc<[f64]>,
    },
    Exponential(HistogramSnapshot),
}

#[derive(Clone, Debug)]
pub struct Point {
    /// The series' attributes (with the operation, for calls). Points of one series share
    /// this set, so an exporter can convert it once.
    pub attributes: AttributeSet,
    /// The metric's own attributes, over `attributes` (shared by the metric's points).
    pub extra_attributes: ExtraAttributes,
    pub start_ns: u64,
    pub data: PointData,
    pub exemplars: Vec<Exemplar>,
}

impl Point {
    /// Every attribute of the point.
    pub fn all_attributes(&self) -> AttributeSet {
        self.attributes
            .merged(self.extra_attributes.iter().cloned())
    }
}

/// One metric of a collection with its points, in the order first seen.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub description: Arc<str>,
    pub kind: MetricKind,
    pub points: Vec<Point>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    kind: SeriesKind,
    name: Arc<str>,
    attributes: AttributeSet,
}

/// What the previous collection reported for a measure: cumulative readers only need the
/// count (a drop means a reset), delta readers the whole value to subtract.
#[derive(Clone, Debug)]
enum Previous {
    Nothing,
    Count(u64),
    Histogram(HistogramSnapshot),
    Value(f64),
}

#[derive(Debug)]
struct MeasureMemory {
    name: Arc<str>,
    /// Start of the cumulative window.
    start_ns: u64,
    previous: Previous,
    /// The measure's estimated-total counter, in the reader's counter temporality (which
    /// may differ from its histogram temporality).
    estimate: EstimateMemory,
}

/// What the previous collection reported of an estimated total.
#[derive(Debug)]
struct EstimateMemory {
    /// Start of the cumulative window.
    start_ns: u64,
    /// The probed calls and the estimated total then.
    previous: Option<(u64, f64)>,
}

/// What this reader keeps of one series between collections.
#[derive(Debug)]
struct SeriesMemory {
    /// The attributes of every point of the series, made once (for calls, with the
    /// operation).
    attributes: AttributeSet,
    /// The series' own attributes (for calls, without the operation): the aliases'.
    own_attributes: AttributeSet,
    /// The aliases of the series' operation, looked up once.
    aliases: Option<Arc<[Alias]>>,
    measures: Vec<MeasureMemory>,
}

/// The memory of measure `name` (a short list: a series has at most a few dozen).
fn measure_memory<'a>(
    measures: &'a mut Vec<MeasureMemory>,
    name: &Arc<str>,
    origin_ns: u64,
) -> &'a mut MeasureMemory {
    let found = measures
        .iter()
        .position(|m| Arc::ptr_eq(&m.name, name) || m.name == *name);
    let index = found.unwrap_or_else(|| {
        measures.push(MeasureMemory {
            name: Arc::clone(name),
            start_ns: origin_ns,
            previous: Previous::Nothing,
            estimate: EstimateMemory {
                start_ns: origin_ns,
                previous: None,
            },
        });
        measures.len() - 1
    });
    &mut measures[index]
}

/// The value to report for one measure and the start of its window.
enum Window<'a, T: Clone> {
    Skip,
    Report(Cow<'a, T>, u64),
}

/// The times and temporalities a window is worked out with.
#[derive(Clone, Copy)]
struct Clock {
    delta: bool,
    /// Start of cumulative windows of series first seen now.
    origin_ns: u64,
    last_collection_ns: u64,
    now_ns: u64,
}

impl Clock {
    /// Cumulative: the whole histogram since its start (a count that dropped means a
    /// reset, so a new start). Delta: the change since this reader's previous collection.
    fn histogram<'a>(
        self,
        memory: &mut MeasureMemory,
        current: &'a HistogramSnapshot,
    ) -> Window<'a, HistogramSnapshot> {
        if !self.delta {
            if matches!(memory.previous, Previous::Count(previous) if current.count < previous) {
                memory.start_ns = self.now_ns;
            }
            memory.previous = Previous::Count(current.count);
            return Window::Report(Cow::Borrowed(current), memory.start_ns);
        }
        let since = self.last_collection_ns;
        let previous =
            std::mem::replace(&mut memory.previous, Previous::Histogram(current.clone()));
        let Previous::Histogram(previous) = previous else {
            return Window::Report(Cow::Borrowed(current), since);
        };
        match delta_since(current, &previous) {
            None => Window::Report(Cow::Borrowed(current), since), // reset in between
            Some(delta) if delta.count == 0 => Window::Skip,
            Some(delta) => Window::Report(Cow::Owned(delta), since),
        }
    }

    fn value(self, memory: &mut MeasureMemory, current: f64) -> Window<'static, f64> {
        let previous = std::mem::replace(&mut memory.previous, Previous::Value(current));
        let previous = match previous {
            Previous::Value(previous) => Some(previous),
            _ => None,
        };
        if !self.delta {
            if previous.is_some_and(|previous| current < previous) {
                memory.start_ns = self.now_ns;
            }
            return Window::Report(Cow::Owned(current), memory.start_ns);
        }
        let since = self.last_collection_ns;
        match previous {
            Some(previous) if current == previous => Window::Skip,
            Some(previous) if current > previous => {
                Window::Report(Cow::Owned(current - previous), since)
            }
            _ => Window::Report(Cow::Owned(current), since), // first seen, or reset in between
        }
    }

    /// The estimated total of a measure's histogram, as a monotonic counter. Cumulative: the
    /// total since the window's start, which starts again when the probed calls or the
    /// total dropped (a reset). Delta: the change since this reader's previous collection
    /// (nothing when the total did not change).
    fn estimate(
        self,
        memory: &mut EstimateMemory,
        current: &HistogramSnapshot,
    ) -> Window<'static, f64> {
        let total = current.estimated_sum();
        let previous = memory.previous.replace((current.count, total));
        let reset = previous.is_some_and(|(count, before)| current.count < count || total < before);
        if !self.delta {
            if reset {
                memory.start_ns = self.now_ns;
            }
            return Window::Report(Cow::Owned(total), memory.start_ns);
        }
        let since = self.last_collection_ns;
        match previous {
            Some((_, before)) if !reset && total == before => Window::Skip,
            Some((_, before)) if !reset => Window::Report(Cow::Owned(total - before), since),
            _ => Window::Report(Cow::Owned(total), since), // first seen, or reset in between
        }
    }
}

pub struct ExportState {
    options: ExportOptions,
    /// Start of cumulative windows: the attach time, or the latest registry reset.
    origin_ns: u64,
    last_collection_ns: u64,
    memory: HashMap<SeriesKey, SeriesMemory>,
    series_count: usize,
    /// A counter's one value, remembered under this measure name.
    counter_measure: Arc<str>,
}

impl ExportState {
    pub fn new(options: ExportOptions, attached_ns: u64) -> Self {
        ExportState {
            options,
            origin_ns: attached_ns,
            last_collection_ns: attached_ns,
            memory: HashMap::new(),
            series_count: 0,
            counter_measure: Arc::from("value"),
        }
    }

    /// Series in the latest collection.
    pub fn series_count(&self) -> usize {
        self.series_count
    }

    /// Measures remembered for the next collection (bounded by the series seen since the
    /// attach or the latest reset).
    pub fn remembered(&self) -> usize {
        self.memory.values().map(|m| m.measures.len()).sum()
    }

    /// Every value was cleared at `reset_ns`: cumulative windows start again there, and
    /// nothing recorded before it is subtracted from what comes after.
    pub fn restart(&mut self, reset_ns: u64) {
        self.memory.clear();
        self.origin_ns = reset_ns;
    }

    /// The metrics of every series, as of `now_ns`.
    pub fn collect(&mut self, series: &[SeriesSnapshot], now_ns: u64) -> Vec<Metric> {
        let mut metrics = Metrics::default();
        let options = &self.options;
        for one in series {
            let key = SeriesKey {
                kind: one.kind,
                name: Arc::clone(&one.name),
                attributes: one.attributes.clone(),
            };
            let memory = self.memory.entry(key).or_insert_with(|| SeriesMemory {
                attributes: match one.kind {
                    SeriesKind::Call => one.attributes.with(
                        &options.operation_key,
                        AttributeValue::Str(Arc::clone(&one.name)),
                    ),
                    _ => one.attributes.clone(),
                },
                own_attributes: one.attributes.clone(),
                aliases: match one.kind {
                    SeriesKind::Call => options.aliases.get(&*one.name).cloned(),
                    _ => None,
                },
                measures: Vec::new(),
            });
            let clock = |delta| Clock {
                delta,
                origin_ns: self.origin_ns,
                last_collection_ns: self.last_collection_ns,
                now_ns,
            };
            let SeriesMemory {
                attributes,
                own_attributes,
                aliases,
                measures,
            } = memory;
            let aliases: &[Alias] = aliases.as_deref().unwrap_or(&[]);
            match one.kind {
                SeriesKind::Counter => {
                    let clock = clock(options.delta_counters);
                    let measure = measure_memory(measures, &self.counter_measure, clock.origin_ns);
                    if let Window::Report(value, start_ns) = clock.value(measure, one.value) {
                        let spec = instrument_spec(one, &options.default_boundaries);
                        metrics.push(
                            &spec,
                            MetricKind::Counter,
                            number_point(attributes, &spec, start_ns, PointData::Number(*value)),
                        );
                    }
                }
                SeriesKind::Histogram => {
                    let spec = instrument_spec(one, &options.default_boundaries);
                    let clock = clock(options.delta_histograms);
                    for measure in &one.measures {
                        let window = clock.histogram(
                            measure_memory(measures, &measure.name, clock.origin_ns),
                            &measure.histogram,
                        );
                        if let Window::Report(data, start_ns) = window {
                            let point = histogram_point(
                                &options.layout,
                                &data,
                                start_ns,
                                attributes,
                                &spec,
                                &[],
                            );
                            metrics.push(&spec, histogram_kind(&options.layout), point);
                        }
                    }
                }
                SeriesKind::Call => {
                    if let Some(active) = one.active {
                        let spec = &options.active_calls;
                        let data = PointData::Integer(active);
                        let point = number_point(attributes, spec, self.origin_ns, data.clone());
                        metrics.push(spec, MetricKind::UpDownCounter, point);
                        for alias in aliases.iter().filter(|a| a.source == AliasSource::Active) {
                            let point = number_point(
                                own_attributes,
                                &alias.spec,
                                self.origin_ns,
                                data.clone(),
                            );
                            metrics.push(&alias.spec, MetricKind::UpDownCounter, point);
                        }
                    }
                    let histograms = clock(options.delta_histograms);
                    let counters = clock(options.delta_counters);
                    for (index, measure) in one.measures.iter().enumerate() {
                        let Some(exported) = options.call_metrics.get(&*measure.name) else {
                            continue; // a measure this version does not export
                        };
                        let memory = measure_memory(measures, &measure.name, histograms.origin_ns);
                        let window = histograms.histogram(memory, &measure.histogram);
                        if let Window::Report(data, start_ns) = window {
                            // Traced calls link to the duration buckets only.
                            let exemplars: &[Exemplar] =
                                if index == 0 { &one.exemplars } else { &[] };
                            let spec = &exported.histogram;
                            let layout = &options.layout;
                            let point = histogram_point(
                                layout, &data, start_ns, attributes, spec, exemplars,
                            );
                            let of_measure = aliases.iter().filter(|alias| {
                                matches!(&alias.source, AliasSource::Measure(m) if *m == measure.name)
                            });
                            let again: Vec<(&Alias, Point)> = of_measure
                                .map(|alias| {
                                    let made = alias_point(
                                        &point,
                                        layout,
                                        &data,
                                        own_attributes,
                                        spec,
                                        &alias.spec,
                                        exemplars,
                                    );
                                    (alias, made)
                                })
                                .collect();
                            metrics.push(spec, histogram_kind(layout), point);
                            for (alias, made) in again {
                                metrics.push(&alias.spec, histogram_kind(layout), made);
                            }
                        }
                        if let Some(spec) = &exported.estimated {
                            let window =
                                counters.estimate(&mut memory.estimate, &measure.histogram);
                            if let Window::Report(total, start_ns) = window {
                                let point = number_point(
                                    attributes,
                                    spec,
                                    start_ns,
                                    PointData::Number(*total),
                                );
                                metrics.push(spec, MetricKind::Counter, point);
                            }
                        }
                    }
                }
            }
        }
        self.series_count = series.len();
        self.last_collection_ns = now_ns;
        metrics.list
    }
}

fn histogram_kind(layout: &HistogramLayout) -> MetricKind {
    match layout {
        HistogramLayout::Explicit { .. } => MetricKind::Histogram,
        HistogramLayout::Exponential { .. } => MetricKind::ExponentialHistogram,
    }
}

/// A point of a sum (a counter or an up-down counter).
fn number_point(
    attributes: &AttributeSet,
    spec: &MetricSpec,
    start_ns: u64,
    data: PointData,
) -> Point {
    Point {
        attributes: attributes.clone(),
        extra_attributes: spec.attributes.clone(),
        start_ns,
        data,
        exemplars: Vec::new(),
    }
}

/// The buckets a histogram of `spec` gets from a reader with `layout`.
#[derive(Clone, Copy)]
enum Buckets<'a> {
    Explicit(&'a Arc<[f64]>),
    Exponential { max_buckets: usize, max_scale: i32 },
}

impl<'a> Buckets<'a> {
    fn of(layout: &'a HistogramLayout, spec: &'a MetricSpec) -> Self {
        match layout {
            HistogramLayout::Explicit { boundaries } => {
                Buckets::Explicit(boundaries.as_ref().unwrap_or(&spec.boundaries))
            }
            HistogramLayout::Exponential {
                max_buckets,
                max_scale,
            } => Buckets::Exponential {
                max_buckets: *max_buckets,
                max_scale: *max_scale,
            },
        }
    }

    fn same_as(self, other: Buckets<'_>) -> bool {
        match (self, other) {
            (Buckets::Explicit(ours), Buckets::Explicit(theirs)) => {
                Arc::ptr_eq(ours, theirs) || ours[..] == theirs[..]
            }
            (Buckets::Exponential { .. }, Buckets::Exponential { .. }) => true,
            _ => false,
        }
    }
}

fn histogram_point(
    layout: &HistogramLayout,
    data: &HistogramSnapshot,
    start_ns: u64,
    attributes: &AttributeSet,
    spec: &MetricSpec,
    exemplars: &[Exemplar],
) -> Point {
    let (data, boundaries) = match Buckets::of(layout, spec) {
        Buckets::Explicit(boundaries) => {
            let data = PointData::Explicit {
                count: data.count,
                sum: data.sum,
                min: data.min,
                max: data.max,
                bucket_counts: explicit_counts(data, boundaries),
                boundaries: Arc::clone(boundaries),
            };
            (data, Some(&**boundaries))
        }
        Buckets::Exponential {
            max_buckets,
            max_scale,
        } => (
            PointData::Exponential(fit_buckets(data, max_buckets, max_scale)),
            None,
        ),
    };
    Point {
        attributes: attributes.clone(),
        extra_attributes: spec.attributes.clone(),
        start_ns,
        exemplars: exemplars_in_window(exemplars, start_ns, boundaries),
        data,
    }
}

/// `point` (a histogram of `spec`) again as a point of `alias`, with the series' own
/// attributes: its data and exemplars reused where the buckets are the same (always for
/// exponential buckets), made afresh from `data` where the alias has boundaries of its own.
fn alias_point(
    point: &Point,
    layout: &HistogramLayout,
    data: &HistogramSnapshot,
    own_attributes: &AttributeSet,
    spec: &MetricSpec,
    alias: &MetricSpec,
    exemplars: &[Exemplar],
) -> Point {
    if !Buckets::of(layout, spec).same_as(Buckets::of(layout, alias)) {
        return histogram_point(
            layout,
            data,
            point.start_ns,
            own_attributes,
            alias,
            exemplars,
        );
    }
    Point {
        attributes: own_attributes.clone(),
        extra_attributes: alias.attributes.clone(),
        start_ns: point.start_ns,
        data: point.data.clone(),
        exemplars: point.exemplars.clone(),
    }
}

/// How a custom instrument's series is exported: under its name and unit, a histogram with
/// the boundaries it asked for or else the reader's default ones (a reader's own explicit
/// boundaries override both, in [`Buckets::of`]).
fn instrument_spec(series: &SeriesSnapshot, default_boundaries: &Arc<[f64]>) -> MetricSpec {
    MetricSpec {
        name: Arc::clone(&series.name),
        unit: Arc::clone(&series.unit),
        description: Arc::clone(&series.description),
        attributes: Arc::from([]),
        boundaries: Arc::clone(
            series
                .boundaries
                .as_ref()
                .map_or(default_boundaries, |own| own.values()),
        ),
    }
}

/// The traced calls recorded since `start_ns`: with explicit buckets the most recent one
/// per bucket, with exponential buckets all of them (the slots are already one per power
/// of two, finer than any bucket limit would merge them to).
fn exemplars_in_window(
    exemplars: &[Exemplar],
    start_ns: u64,
    boundaries: Option<&[f64]>,
) -> Vec<Exemplar> {
    let in_window = exemplars.iter().filter(|e| e.time_unix_ns >= start_ns);
    let Some(boundaries) = boundaries else {
        return in_window.copied().collect();
    };
    let mut latest: Vec<(usize, Exemplar)> = Vec::new();
    for exemplar in in_window {
        let bucket = boundaries.partition_point(|&bound| bound < exemplar.value);
        match latest.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, kept)) if kept.time_unix_ns < exemplar.time_unix_ns => *kept = *exemplar,
            Some(_) => {}
            None => latest.push((bucket, *exemplar)),
        }
    }
    latest.into_iter().map(|(_, exemplar)| exemplar).collect()
}

/// Metrics by name in first-seen order.
#[derive(Default)]
struct Metrics {
    list: Vec<Metric>,
    index: HashMap<Arc<str>, usize>,
}

impl Metrics {
    fn push(&mut self, spec: &MetricSpec, kind: MetricKind, point: Point) {
        // A run of points of one metric (an instrument's series) skips the lookup.
        let position = match self.list.last() {
            Some(last) if Arc::ptr_eq(&last.name, &spec.name) => self.list.len() - 1,
            _ => *self.index.entry(Arc::clone(&spec.name)).or_insert_with(|| {
                self.list.push(Metric {
                    name: Arc::clone(&spec.name),
                    unit: Arc::clone(&spec.unit),
                    description: Arc::clone(&spec.description),
                    kind,
                    points: Vec::new(),
                });
                self.list.len() - 1
            }),
        };
        self.list[position].points.push(point);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::boundaries::Boundaries;
    use crate::aggregate::histogram::AtomicHistogram;
    use crate::aggregate::snapshot::MeasureSnapshot;

    const ATTACHED: u64 = 1_000;
    const BOUNDS: [f64; 3] = [0.01, 0.1, 1.0];

    fn spec(name: &str, extra: &[(&str, &str)]) -> Arc<MetricSpec> {
        Arc::new(MetricSpec {
            name: name.into(),
            unit: "s".into(),
            description: "".into(),
            attributes: extra
                .iter()
                .map(|(k, v)| (Arc::from(*k), AttributeValue::from(*v)))
                .collect::<Vec<_>>()
                .into(),
            boundaries: Arc::from(BOUNDS),
        })
    }

    fn exported(histogram: Arc<MetricSpec>, estimated: Option<Arc<MetricSpec>>) -> CallMetric {
        CallMetric {
            histogram,
            estimated,
        }
    }

    fn options(delta: bool, layout: HistogramLayout) -> ExportOptions {
        ExportOptions {
            delta_histograms: delta,
            delta_counters: delta,
            layout,
            call_metrics: HashMap::from([
                (
                    "duration".to_string(),
                    exported(spec("call.duration", &[]), None),
                ),
                (
                    "io.read".to_string(),
                    exported(spec("call.io", &[("dir", "read")]), None),
                ),
                (
                    "io.write".to_string(),
                    exported(spec("call.io", &[("dir", "write")]), None),
                ),
            ]),
            active_calls: spec("calls.active", &[]),
            aliases: HashMap::new(),
            operation_key: "op".into(),
            default_boundaries: Arc::from([10.0, 100.0]),
        }
    }

    /// `options` with estimated-total counters of the io measures and the aliases of
    /// operation "request" (duration and calls in flight) and "job" (duration).
    fn options_with_extras(
        delta_histograms: bool,
        delta_counters: bool,
        layout: HistogramLayout,
    ) -> ExportOptions {
        let mut options = options(delta_histograms, layout);
        options.delta_counters = delta_counters;
        for (measure, direction) in [("io.read", "read"), ("io.write", "write")] {
            let estimated = spec("call.io.estimated", &[("dir", direction)]);
            options.call_metrics.get_mut(measure).unwrap().estimated = Some(estimated);
        }
        let alias = |name: &str, source: AliasSource, boundaries: &[f64]| {
            let mut made = spec(name, &[]);
            Arc::make_mut(&mut made).boundaries = boundaries.into();
            Alias { spec: made, source }
        };
        let duration = || AliasSource::Measure(Arc::from("duration"));
        options.aliases = HashMap::from([
            (
                "request".to_string(),
                Arc::from([
                    alias("request.duration", duration(), &BOUNDS),
                    alias("request.active", AliasSource::Active, &[]),
                ]),
            ),
            (
                "job".to_string(),
                Arc::from([alias("job.duration", duration(), &[0.1])]),
            ),
        ]);
        options
    }

    /// A call series whose `measure` histogram holds `values`, each recorded with its weight.
    fn sampled_call(
        name: &str,
        calls: &[f64],
        measure: &str,
        values: &[(f64, f64)],
    ) -> SeriesSnapshot {
        let mut series = call(name, &[("duration", calls)]);
        let histogram = AtomicHistogram::new();
        values
            .iter()
            .for_each(|&(value, weight)| histogram.record_weighted(value, weight));
        series.measures.push(MeasureSnapshot {
            name: Arc::from(measure),
            unit: "By".into(),
            histogram: histogram.snapshot(),
        });
        series
    }

    /// (value, start) of each point of metric `name`, in order.
    fn numbers(metrics: &[Metric], name: &str) -> Vec<(f64, u64)> {
        let Some(found) = metrics.iter().find(|m| &*m.name == name) else {
            return Vec::new();
        };
        found
            .points
            .iter()
            .map(|point| match point.data {
                PointData::Number(value) => (value, point.start_ns),
                ref other => panic!("not a number: {other:?}"),
            })
            .collect()
    }

    fn explicit() -> HistogramLayout {
        HistogramLayout::Explicit { boundaries: None }
    }

    fn histogram(values: &[f64]) -> HistogramSnapshot {
        let histogram = AtomicHistogram::new();
        values.iter().for_each(|&v| histogram.record(v));
        histogram.snapshot()
    }

    fn call(name: &str, measures: &[(&str, &[f64])]) -> SeriesSnapshot {
        let measures: Vec<MeasureSnapshot> = measures
            .iter()
            .map(|(measure, values)| MeasureSnapshot {
                name: Arc::from(*measure),
                unit: "s".into(),
                histogram: histogram(values),
            })
            .collect();
        SeriesSnapshot {
            kind: SeriesKind::Call,
            name: name.into(),
            unit: "s".into(),
            description: "".into(),
            boundaries: None,
            attributes: AttributeSet::new([(Arc::from("tier"), AttributeValue::from("gold"))]),
            count: measures[0].histogram.count,
            measures,
            value: 0.0,
            exemplars: Vec::new(),
            active: None,
        }
    }

    fn counter(name: &str, value: f64) -> SeriesSnapshot {
        SeriesSnapshot {
            kind: SeriesKind::Counter,
            name: name.into(),
            unit: "{hit}".into(),
            description: "hits".into(),
            boundaries: None,
            attributes: AttributeSet::empty(),
            count: 1,
            measures: Vec::new(),
            value,
            exemplars: Vec::new(),
            active: None,
        }
    }

    fn metric<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
        metrics
            .iter()
            .find(|m| &*m.name == name)
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    fn count_of(point: &Point) -> u64 {
        match &point.data {
            PointData::Explicit { count, .. } => *count,
            PointData::Exponential(histogram) => histogram.count,
            other => panic!("not a histogram: {other:?}"),
        }
    }

    #[test]
    fn call_measures_become_metrics_with_the_operation_and_their_own_attributes() {
        let mut state = ExportState::new(options(false, explicit()), ATTACHED);
        let series = [call(
            "checkout",
            &[
                ("duration", &[0.005, 0.05, 2.0]),
                ("io.read", &[100.0, 0.0, 5.0]),
                ("io.write", &[0.0, 0.0, 1.0]),
                ("not.exported", &[1.0, 1.0, 1.0]),
            ],
        )];
        let metrics = state.collect(&series, 2_000);
        let names: Vec<&str> = metrics.iter().map(|m| &*m.name).collect();
        assert_eq!(names, ["call.duration", "call.io"]);

        let duration = metric(&metrics, "call.duration");
        assert_eq!(duration.kind, MetricKind::Histogram);
        let [point] = &duration.points[..] else {
            panic!("one duration point")
        };
        let PointData::Explicit {
            count,
            bucket_counts,
            boundaries,
            min,
            max,
            ..
        } = &point.data
        else {
            panic!("explicit buckets")
        };
        assert_eq!((*count, &bucket_counts[..]), (3, &[1, 1, 0, 1][..]));
        assert_eq!(&boundaries[..], &BOUNDS[..]);
        assert_eq!((*min, *max), (0.005, 2.0));
        assert_eq!(point.start_ns, ATTACHED);
        let attributes = point.all_attributes();
        assert_eq!(attributes.get("op"), Some(&"checkout".into()));
        assert_eq!(attributes.get("tier"), Some(&"gold".into()));
        assert_eq!(attributes.len(), 2);

        let io = metric(&metrics, "call.io");
        let directions: Vec<_> = io
            .points
            .iter()
            .map(|p| (p.all_attributes().get("dir").cloned(), count_of(p)))
            .collect();
        assert_eq!(
            directions,
            [(Some("read".into()), 3), (Some("write".into()), 3)]
        );
        // Points of one series share the series' attribute set.
        assert_eq!(
            io.points[0].attributes.address(),
            point.attributes.address()
        );
    }

    #[test]
    fn cumulative_keeps_its_start_until_a_count_drops() {
        let mut state = ExportState::new(options(false, explicit()), ATTACHED);
        let first = state.collect(&[call("op", &[("duration", &[0.5])])], 2_000);
        let second = state.collect(&[call("op", &[("duration", &[0.5, 0.5])])], 3_000);
        let third = state.collect(&[call("op", &[("duration", &[0.5])])], 4_000);
        let points: Vec<(u64, u64)> = [first, second, third]
            .iter()
            .map(|m| {
                let point = &metric(m, "call.duration").points[0];
                (count_of(point), point.start_ns)
            })
            .collect();
        assert_eq!(points, [(1, ATTACHED), (2, ATTACHED), (1, 4_000)]);
    }

    #[test]
    fn a_restart_starts_every_window_at_the_reset() {
        let mut state = ExportState::new(options(false, explicit()), ATTACHED);
        state.collect(&[call("op", &[("duration", &[0.5, 0.5])])], 2_000);
        assert_eq!(state.remembered(), 1);
        state.restart(2_500);
        assert_eq!(state.remembered(), 0);
        // More calls after the reset than before it: no count drop, the restart tells.
        let metrics = state.collect(&[call("op", &[("duration", &[0.5, 0.5, 0.5])])], 3_000);
        let point = &metric(&metrics, "call.duration").points[0];
        assert_eq!((count_of(point), point.start_ns), (3, 2_500));
    }

    #[test]
    fn delta_reports_the_change_since_the_previous_collection() {
        let mut state = ExportState::new(options(true, explicit()), ATTACHED);
        let first = state.collect(&[call("op", &[("duration", &[0.5])])], 2_000);
        let point = &metric(&first, "call.duration").points[0];
        assert_eq!((count_of(point), point.start_ns), (1, ATTACHED));

        let second = state.collect(&[call("op", &[("duration", &[0.5, 0.05, 0.05])])], 3_000);
        let point = &metric(&second, "call.duration").points[0];
        assert_eq!((count_of(point), point.start_ns), (2, 2_000));
        let PointData::Explicit { bucket_counts, .. } = &point.data else {
            panic!("explicit buckets")
        };
        assert_eq!(bucket_counts, &[0, 2, 0, 0]);

        // Nothing new: no point at all.
        let third = state.collect(&[call("op", &[("duration", &[0.5, 0.05, 0.05])])], 4_000);
        assert!(third.is_empty());
        // A reset in between (fewer values than before): the whole current value.
        let fourth = state.collect(&[call("op", &[("duration", &[0.5])])], 5_000);
        let point = &metric(&fourth, "call.duration").points[0];
        assert_eq!((count_of(point), point.start_ns), (1, 4_000));
    }

    #[test]
    fn counters_in_both_temporalities() {
        let mut cumulative = ExportState::new(options(false, explicit()), ATTACHED);
        let mut delta = ExportState::new(options(true, explicit()), ATTACHED);
        let mut seen = Vec::new();
        for (now, value) in [(2_000, 3.0), (3_000, 3.0), (4_000, 10.0), (5_000, 4.0)] {
            let series = [counter("hits", value)];
            let reported = |metrics: Vec<Metric>| {
                metrics.first().map(|m| {
                    assert_eq!(
                        (&*m.name, &*m.unit, m.kind),
                        ("hits", "{hit}", MetricKind::Counter)
                    );
                    let point = &m.points[0];
                    (point.data.clone(), point.start_ns)
                })
            };
            seen.push((
                reported(cumulative.collect(&series, now)),
                reported(delta.collect(&series, now)),
            ));
        }
        use PointData::Number;
        assert_eq!(
            seen,
            [
                (Some((Number(3.0), ATTACHED)), Some((Number(3.0), ATTACHED))),
                (Some((Number(3.0), ATTACHED)), None),
                (Some((Number(10.0), ATTACHED)), Some((Number(7.0), 3_000))),
                // Dropped: a reset. Cumulative starts again, delta reports all of it.
                (Some((Number(4.0), 5_000)), Some((Number(4.0), 4_000))),
            ]
        );
    }

    #[test]
    fn exponential_layout_limits_the_buckets_and_keeps_the_count() {
        let layout = HistogramLayout::Exponential {
            max_buckets: 8,
            max_scale: 20,
        };
        let mut state = ExportState::new(options(false, layout), ATTACHED);
        let values: Vec<f64> = (0..40).map(|e| 2f64.powi(e - 20)).collect();
        let metrics = state.collect(&[call("op", &[("duration", &values)])], 2_000);
        let duration = metric(&metrics, "call.duration");
        assert_eq!(duration.kind, MetricKind::ExponentialHistogram);
        let PointData::Exponential(fitted) = &duration.points[0].data else {
            panic!("exponential")
        };
        assert!(fitted.bucket_counts.len() <= 8);
        assert_eq!(fitted.count, 40);
        assert_eq!(
            fitted.bucket_counts.iter().sum::<u64>() + fitted.zero_count,
            40
        );
    }

    #[test]
    fn active_calls_and_exemplars_of_the_duration_only() {
        let mut state = ExportState::new(options(false, explicit()), ATTACHED);
        let mut series = call(
            "op",
            &[("duration", &[0.005, 0.006, 0.5]), ("io.read", &[1.0])],
        );
        series.active = Some(2);
        let exemplar = |value, time_unix_ns| Exemplar {
            value,
            time_unix_ns,
            trace_id: 1,
            span_id: time_unix_ns,
        };
        // Two in the first bucket (the later one is kept), one before the window.
        series.exemplars = vec![
            exemplar(0.005, 1_500),
            exemplar(0.006, 1_600),
            exemplar(0.5, 500),
        ];
        let metrics = state.collect(&[series], 2_000);
        let active = metric(&metrics, "calls.active");
        assert_eq!(active.kind, MetricKind::UpDownCounter);
        assert_eq!(active.points[0].data, PointData::Integer(2));
        let duration = &metric(&metrics, "call.duration").points[0];
        assert_eq!(duration.exemplars, [exemplar(0.006, 1_600)]);
        assert!(metric(&metrics, "call.io").points[0].exemplars.is_empty());
    }

    #[test]
    fn a_reader_boundary_override_applies_to_every_histogram() {
        let layout = HistogramLayout::Explicit {
            boundaries: Some(Arc::from([1.0])),
        };
        let mut state = ExportState::new(options(false, layout), ATTACHED);
        let metrics = state.collect(&[call("op", &[("duration", &[0.5, 2.0, 3.0])])], 2_000);
        let PointData::Explicit { bucket_counts, .. } =
            &metric(&metrics, "call.duration").points[0].data
        else {
            panic!("explicit buckets")
        };
        assert_eq!(bucket_counts, &[1, 2]);
    }

    /// A custom histogram's series holding `values`, with the boundaries it asked for.
    fn custom(boundaries: Option<&[f64]>, values: &[f64]) -> SeriesSnapshot {
        let histogram = histogram(values);
        SeriesSnapshot {
            kind: SeriesKind::Histogram,
            name: "body.size".into(),
            unit: "By".into(),
            description: "".into(),
            boundaries: boundaries.map(|b| Boundaries::new(b.iter().copied()).unwrap()),
            attributes: AttributeSet::empty(),
            count: histogram.count,
            measures: vec![MeasureSnapshot {
                name: "body.size".into(),
                unit: "By".into(),
                histogram,
            }],
            value: 0.0,
            exemplars: Vec::new(),
            active: None,
        }
    }

    fn explicit_of(metrics: &[Metric]) -> (Vec<f64>, Vec<u64>) {
        let PointData::Explicit {
            bucket_counts,
            boundaries,
            ..
        } = &metric(metrics, "body.size").points[0].data
        else {
            panic!("explicit buckets")
        };
        (boundaries.to_vec(), bucket_counts.clone())
    }

    #[test]
    fn a_custom_histogram_is_exported_with_its_own_boundaries_exactly() {
        let bytes = crate::probe::catalog::BYTE_BOUNDARIES;
        // On, just below and just above 0, 1 KiB and 4 KiB, and far above the last.
        let values = [0.0, 1.0, 1023.0, 1024.0, 1025.0, 4096.0, 4097.0, 1e12];
        let mut state = ExportState::new(options(false, explicit()), ATTACHED);
        let (bounds, counts) = explicit_of(&state.collect(&[custom(Some(&bytes), &values)], 2_000));
        assert_eq!(bounds, bytes);
        assert_eq!(&counts[..4], &[1, 3, 2, 1]);
        assert_eq!(counts[counts.len() - 1], 1);
        assert_eq!(counts.iter().sum::<u64>(), values.len() as u64);
        // Without boundaries of its own: the reader's default ones.
        let (bounds, _) = explicit_of(&state.collect(&[custom(None, &values)], 3_000));
        assert_eq!(bounds, [10.0, 100.0]);
        // The queue wait's cut boundaries, with values on and one ulp either side of each.
        let waits = crate::aggregate::boundaries::QUEUE_WAIT;
        let mut values = Vec::new();
        let mut expected = vec![0u64; waits.len() + 1];
        for &bound in &waits {
            for value in [
                bound,
                f64::from_bits(bound.to_bits() - 1),
                f64::from_bits(bound.to_bits() + 1),
            ] {
                values.push(value);
                expected[waits.partition_point(|&b| b < value)] += 1;
            }
        }
        let mut state = ExportState::new(options(false, explicit()), ATTACHED);
        let (_, counts) = explicit_of(&state.collect(&[custom(Some(&waits), &values)], 2_000));
        assert_eq!(counts, expected);
    }

    #[test]
    fn a_reader_override_wins_over_a_custom_histograms_boundaries_and_deltas_stay_exact() {
        let layout = HistogramLayout::Explicit {
            boundaries: Some(Arc::from([1.0])),
        };
        let mut state = ExportState::new(options(false, layout), ATTACHED);
        let series = custom(Some(&[0.005, 10.0]), &[0.5, 2.0, 3.0]);
        let (bounds, counts) = explicit_of(&state.collect(&[series], 2_000));
        assert_eq!((bounds, counts), (vec![1.0], vec![1, 2]));

        let durations = crate::probe::DURATION.boundaries;
        let mut state = ExportState::new(options(true, explicit()), ATTACHED);
        let first = custom(Some(durations), &[0.005, 0.0051]);
        explicit_of(&state.collect(&[first], 2_000));
        let second = custom(
            Some(durations),
            &[0.005, 0.0051, 0.005, 0.005, 0.0049, 0.0051],
        );
        let (bounds, counts) = explicit_of(&state.collect(&[second], 3_000));
        assert_eq!(bounds, durations);
        assert_eq!(
            &counts[..2],
            &[3, 1],
            "the delta's values on 5 ms stay at or below it"
        );
    }

    #[test]
    fn estimated_totals_are_counters_of_the_weighted_sums() {
        // Delta counters with cumulative histograms and the other way round: each metric
        // follows its own kind's temporality.
        let mut delta = ExportState::new(options_with_extras(false, true, explicit()), ATTACHED);
        let mut cumulative =
            ExportState::new(options_with_extras(true, false, explicit()), ATTACHED);
        // Probed at p = 1/4 and 1/2: the estimate is 100 * 4 + 10 * 2.
        let first = [sampled_call(
            "op",
            &[0.5; 5],
            "io.read",
            &[(100.0, 4.0), (10.0, 2.0)],
        )];
        let second = [sampled_call(
            "op",
            &[0.5; 6],
            "io.read",
            &[(100.0, 4.0), (10.0, 2.0), (1.0, 1.0)],
        )];
        // A new probed call of value 0: the total does not change.
        let third = [sampled_call(
            "op",
            &[0.5; 7],
            "io.read",
            &[(100.0, 4.0), (10.0, 2.0), (1.0, 1.0), (0.0, 4.0)],
        )];
        // Fewer probed calls than before: a reset.
        let fourth = [sampled_call("op", &[0.5], "io.read", &[(5.0, 2.0)])];
        let mut seen = Vec::new();
        for (now, series) in [
            (2_000, &first),
            (3_000, &second),
            (4_000, &third),
            (5_000, &fourth),
        ] {
            seen.push((
                numbers(&delta.collect(series, now), "call.io.estimated"),
                numbers(&cumulative.collect(series, now), "call.io.estimated"),
            ));
        }
        assert_eq!(
            seen,
            [
                (vec![(420.0, ATTACHED)], vec![(420.0, ATTACHED)]),
                (vec![(1.0, 2_000)], vec![(421.0, ATTACHED)]),
                (vec![], vec![(421.0, ATTACHED)]),
                (vec![(10.0, 4_000)], vec![(10.0, 5_000)]),
            ]
        );

        let mut fresh = ExportState::new(options_with_extras(false, false, explicit()), ATTACHED);
        let metrics = fresh.collect(&fourth, 6_000);
        let estimated = metric(&metrics, "call.io.estimated");
        assert_eq!(
            (estimated.kind, &*estimated.unit),
            (MetricKind::Counter, "s")
        );
        let attributes = estimated.points[0].all_attributes();
        assert_eq!(attributes.get("op"), Some(&"op".into()));
        assert_eq!(attributes.get("dir"), Some(&"read".into()));
        assert_eq!(attributes.get("tier"), Some(&"gold".into()));
        assert_eq!(attributes.len(), 3);
        // The histogram is as it was: the probed calls, unweighted.
        let PointData::Explicit { count, sum, .. } = metric(&metrics, "call.io").points[0].data
        else {
            panic!("explicit buckets")
        };
        assert_eq!((count, sum), (1, 5.0));
        // Nothing for the duration (every call is timed).
        let names: Vec<&str> = metrics.iter().map(|m| &*m.name).collect();
        assert_eq!(names, ["call.duration", "call.io", "call.io.estimated"]);

        // A registry reset restarts the cumulative window; delta subtracts nothing before it.
        cumulative.restart(6_500);
        delta.restart(6_500);
        let more = [sampled_call(
            "op",
            &[0.5; 3],
            "io.read",
            &[(5.0, 2.0), (7.0, 1.0), (1.0, 1.0)],
        )];
        assert_eq!(
            numbers(&cumulative.collect(&more, 7_000), "call.io.estimated"),
            [(18.0, 6_500)]
        );
        assert_eq!(
            numbers(&delta.collect(&more, 7_000), "call.io.estimated"),
            [(18.0, 5_000)]
        );
    }

    #[test]
    fn aliases_repeat_an_operations_duration_and_calls_in_flight_without_the_operation() {
        let mut state = ExportState::new(options_with_extras(false, false, explicit()), ATTACHED);
        let mut request = call(
            "request",
            &[("duration", &[0.005, 0.05, 2.0]), ("io.read", &[1.0])],
        );
        request.active = Some(3);
        let exemplar = Exemplar {
            value: 0.05,
            time_unix_ns: 1_500,
            trace_id: 7,
            span_id: 8,
        };
        request.exemplars = vec![exemplar];
        let job = call("job", &[("duration", &[0.05, 0.5])]);
        let mut other = call("other", &[("duration", &[0.05])]);
        other.active = Some(1);
        let metrics = state.collect(&[request, job, other], 2_000);

        let own = |point: &Point| {
            let attributes = point.all_attributes();
            assert_eq!(attributes.get("op"), None);
            assert_eq!(attributes.get("tier"), Some(&"gold".into()));
            attributes.len()
        };
        let duration = metric(&metrics, "call.duration");
        let of = |op: &str| {
            duration
                .points
                .iter()
                .find(|p| p.all_attributes().get("op") == Some(&op.into()))
                .unwrap()
        };
        let alias = metric(&metrics, "request.duration");
        assert_eq!((alias.kind, &*alias.unit), (MetricKind::Histogram, "s"));
        let [point] = &alias.points[..] else {
            panic!("one request.duration point")
        };
        assert_eq!(own(point), 1);
        assert_eq!(point.data, of("request").data);
        assert_eq!(point.start_ns, of("request").start_ns);
        assert_eq!(point.exemplars, [exemplar]);
        assert_eq!(of("request").exemplars, [exemplar]);

        let active = metric(&metrics, "request.active");
        assert_eq!(active.kind, MetricKind::UpDownCounter);
        let [point] = &active.points[..] else {
            panic!("one request.active point")
        };
        assert_eq!((own(point), &point.data), (1, &PointData::Integer(3)));
        // meterage's own metrics are unchanged: the in-flight count of both operations.
        assert_eq!(metric(&metrics, "calls.active").points.len(), 2);

        // An alias with boundaries of its own gets its own buckets, from the same window.
        let [point] = &metric(&metrics, "job.duration").points[..] else {
            panic!("one job.duration point")
        };
        assert_eq!(own(point), 1);
        let PointData::Explicit {
            count,
            bucket_counts,
            boundaries,
            ..
        } = &point.data
        else {
            panic!("explicit buckets")
        };
        assert_eq!(
            (*count, &bucket_counts[..], &boundaries[..]),
            (2, &[1, 1][..], &[0.1][..])
        );
        // No alias for other operations, no alias of measures other than the source.
        let names: Vec<&str> = metrics.iter().map(|m| &*m.name).collect();
        assert_eq!(
            names,
            [
                "calls.active",
                "request.active",
                "call.duration",
                "request.duration",
                "call.io",
                "call.io.estimated",
                "job.duration"
            ]
        );
    }

    #[test]
    fn alias_windows_follow_the_readers_temporality_and_layout() {
        let layout = HistogramLayout::Exponential {
            max_buckets: 8,
            max_scale: 20,
        };
        let mut state = ExportState::new(options_with_extras(true, true, layout), ATTACHED);
        let first = state.collect(&[call("request", &[("duration", &[0.5])])], 2_000);
        let second = state.collect(
            &[call("request", &[("duration", &[0.5, 0.05, 0.05])])],
            3_000,
        );
        for metrics in [&first, &second] {
            let own = &metric(metrics, "call.duration").points[0];
            let alias = &metric(metrics, "request.duration");
            assert_eq!(alias.kind, MetricKind::ExponentialHistogram);
            assert_eq!(alias.points[0].data, own.data);
            assert_eq!(alias.points[0].start_ns, own.start_ns);
        }
        assert_eq!(count_of(&metric(&second, "request.duration").points[0]), 2);
        // Nothing new: neither has a point.
        assert!(state
            .collect(
                &[call("request", &[("duration", &[0.5, 0.05, 0.05])])],
                4_000
            )
            .is_empty());
        // An alias of a job with other boundaries: exponential buckets need none.
        let job = state.collect(&[call("job", &[("duration", &[0.5])])], 5_000);
        assert_eq!(
            metric(&job, "job.duration").points[0].data,
            metric(&job, "call.duration").points[0].data
        );
    }
}
