//! Plain-data copies of the aggregates, taken at collection time.

use super::attributes::AttributeSet;
use super::boundaries::Boundaries;
use super::exemplars::Exemplar;
use super::histogram::HistogramSnapshot;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SeriesKind {
    /// Metered calls of an operation.
    Call = 0,
    /// A custom histogram instrument.
    Histogram = 1,
    /// A custom counter instrument.
    Counter = 2,
}

impl SeriesKind {
    pub fn name(self) -> &'static str {
        match self {
            SeriesKind::Call => "call",
            SeriesKind::Histogram => "histogram",
            SeriesKind::Counter => "counter",
        }
    }
}

#[derive(Clone, Debug)]
pub struct MeasureSnapshot {
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub histogram: HistogramSnapshot,
}

#[derive(Clone, Debug)]
pub struct SeriesSnapshot {
    pub kind: SeriesKind,
    /// Operation name or instrument name.
    pub name: Arc<str>,
    pub unit: Arc<str>,
    pub description: Arc<str>,
    /// For a custom histogram: the explicit bucket boundaries it asked for (None: the
    /// exporter's default ones).
    pub boundaries: Option<Boundaries>,
    pub attributes: AttributeSet,
    /// Calls, recorded values, or `add` calls.
    pub count: u64,
    /// For calls: `duration` first, then each requested probe measure.
    pub measures: Vec<MeasureSnapshot>,
    /// For counters: the total.
    pub value: f64,
    /// For calls: durations of traced calls with their trace and span.
    pub exemplars: Vec<Exemplar>,
    /// For calls: calls in flight now, if counted here (None: not tracked).
    pub active: Option<i64>,
}
