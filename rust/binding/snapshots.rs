//! Snapshot objects handed to Python: plain data, no OpenTelemetry needed.

use super::convert::{attribute_set, attributes_to_dict};
use crate::aggregate::exemplars::Exemplar;
use crate::aggregate::histogram::{HistogramParts, HistogramSnapshot};
use crate::aggregate::snapshot::{MeasureSnapshot, SeriesKind, SeriesSnapshot};
use crate::bridge;
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

/// One histogram: count, sum, min, max, quantiles, and its base-2 exponential buckets
/// (OpenTelemetry data model: bucket `offset + i` holds values in (base^(offset+i), base^(offset+i+1)]).
#[pyclass(module = "meterage._native", name = "HistogramSnapshot", frozen)]
pub struct PyHistogramSnapshot {
    pub inner: HistogramSnapshot,
    unit: String,
}

impl PyHistogramSnapshot {
    pub fn new(inner: HistogramSnapshot, unit: &str) -> Self {
        PyHistogramSnapshot {
            inner,
            unit: unit.to_owned(),
        }
    }
}

#[pymethods]
impl PyHistogramSnapshot {
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count
    }
    #[getter]
    fn sum(&self) -> f64 {
        self.inner.sum
    }
    #[getter]
    fn min(&self) -> f64 {
        self.inner.min
    }
    #[getter]
    fn max(&self) -> f64 {
        self.inner.max
    }
    #[getter]
    fn mean(&self) -> f64 {
        if self.inner.count == 0 {
            f64::NAN
        } else {
            self.inner.sum / self.inner.count as f64
        }
    }
    #[getter]
    fn unit(&self) -> &str {
        &self.unit
    }
    #[getter]
    fn scale(&self) -> i32 {
        self.inner.scale
    }
    #[getter]
    fn offset(&self) -> i32 {
        self.inner.offset
    }
    #[getter]
    fn zero_count(&self) -> u64 {
        self.inner.zero_count
    }
    #[getter]
    fn bucket_counts(&self) -> Vec<u64> {
        self.inner.bucket_counts.clone()
    }
    /// For sampled probe measures: the estimated total over all calls, each probed call
    /// weighted by 1 / (its probability of being probed). Equals `sum` at sample=1.0.
    #[getter]
    fn estimated_sum(&self) -> f64 {
        self.inner.estimated_sum()
    }

    /// The q-quantile (0 <= q <= 1), within 2.2% of the exact nearest-rank value.
    fn quantile(&self, q: f64) -> PyResult<f64> {
        if !(0.0..=1.0).contains(&q) {
            return Err(PyValueError::new_err(format!(
                "q must be in [0, 1], got {q}"
            )));
        }
        Ok(self.inner.quantile(q))
    }

    /// A new snapshot holding the values of both (at the coarser scale of the two): e.g.
    /// the overall latency of an operation across its series.
    fn merge(&self, other: &PyHistogramSnapshot) -> PyResult<PyHistogramSnapshot> {
        if !self.unit.is_empty() && !other.unit.is_empty() && self.unit != other.unit {
            return Err(PyValueError::new_err(format!(
                "cannot merge histograms of different units ({:?} and {:?})",
                self.unit, other.unit
            )));
        }
        let mut merged = self.inner.clone();
        merged.merge(&other.inner);
        let unit = if self.unit.is_empty() {
            &other.unit
        } else {
            &self.unit
        };
        Ok(PyHistogramSnapshot::new(merged, unit))
    }

    /// Counts per explicit bucket for ascending `boundaries` (len + 1 counts, the
    /// OpenTelemetry explicit-bucket layout), for exporters that want fixed buckets.
    fn explicit_bucket_counts(&self, boundaries: Vec<f64>) -> PyResult<Vec<u64>> {
        let increasing = boundaries.iter().all(|bound| bound.is_finite())
            && boundaries.windows(2).all(|pair| pair[0] < pair[1]);
        if !increasing {
            return Err(PyValueError::new_err(
                "boundaries must be finite and strictly increasing",
            ));
        }
        Ok(bridge::histogram::explicit_counts(&self.inner, &boundaries))
    }

    /// This histogram with at most `max_buckets` buckets and a scale of at most
    /// `max_scale` (downscaled as needed).
    #[pyo3(signature = (max_buckets, max_scale = 20))]
    fn fit_buckets(&self, max_buckets: usize, max_scale: i32) -> PyHistogramSnapshot {
        PyHistogramSnapshot::new(
            bridge::histogram::fit_buckets(&self.inner, max_buckets, max_scale),
            &self.unit,
        )
    }

    /// What was recorded since `earlier` (a snapshot of the same histogram), or None if it
    /// was reset in between. Min and max of the interval are within one bucket width.
    fn delta_since(&self, earlier: &PyHistogramSnapshot) -> Option<PyHistogramSnapshot> {
        bridge::histogram::delta_since(&self.inner, &earlier.inner)
            .map(|delta| PyHistogramSnapshot::new(delta, &self.unit))
    }

    /// (lower, upper, count) for each bucket, zero bucket excluded.
    fn buckets(&self) -> Vec<(f64, f64, u64)> {
        self.inner.buckets().collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "HistogramSnapshot(count={}, sum={}, min={}, max={}, unit={:?})",
            self.inner.count, self.inner.sum, self.inner.min, self.inner.max, self.unit
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyHistogramSnapshot>()
            .is_ok_and(|other| other.get().inner == self.inner && other.get().unit == self.unit)
    }

    /// Immutable: a copy is the same object.
    fn __copy__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __deepcopy__(slf: Py<Self>, _memo: &Bound<'_, PyAny>) -> Py<Self> {
        slf
    }

    /// Pickles as its plain data.
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let restore = py
            .import("meterage._native")?
            .getattr("_restore_histogram")?;
        let arguments = (histogram_state(py, &self.inner)?, self.unit.as_str());
        PyTuple::new(py, [restore, arguments.into_pyobject(py)?.into_any()])
    }
}

/// One series: an operation (or instrument) with one attribute set. Plain data: it holds
/// the native copy and builds Python objects only when they are asked for.
#[pyclass(module = "meterage._native", name = "Series", frozen)]
pub struct PySeries {
    inner: SeriesSnapshot,
}

impl PySeries {
    pub fn new(inner: SeriesSnapshot) -> Self {
        PySeries { inner }
    }

    fn measure(&self, name: &str) -> Option<&crate::aggregate::snapshot::MeasureSnapshot> {
        self.inner.measures.iter().find(|m| &*m.name == name)
    }
}

#[pymethods]
impl PySeries {
    /// "call" (a metered operation), "histogram" or "counter".
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind.name()
    }

    /// The operation or instrument name.
    #[getter]
    fn operation(&self) -> &str {
        &self.inner.name
    }

    /// The operation or instrument name (same as `operation`).
    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    #[getter]
    fn unit(&self) -> &str {
        &self.inner.unit
    }

    #[getter]
    fn description(&self) -> &str {
        &self.inner.description
    }

    /// Calls, recorded values, or `add` calls.
    #[getter]
    fn count(&self) -> u64 {
        self.inner.count
    }

    /// Counters: the total.
    #[getter]
    fn value(&self) -> f64 {
        self.inner.value
    }

    /// How many calls ran the probes (the largest count of any probe measure).
    #[getter]
    fn sampled(&self) -> u64 {
        let skip = usize::from(self.inner.kind == SeriesKind::Call);
        self.inner
            .measures
            .iter()
            .skip(skip)
            .map(|m| m.histogram.count)
            .max()
            .unwrap_or(0)
    }

    /// Calls of this series in flight now (None unless an exporter asked to count them).
    #[getter]
    fn active(&self) -> Option<i64> {
        self.inner.active
    }

    /// Attributes of this series (a new dict each time).
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        attributes_to_dict(py, self.inner.attributes.iter())
    }

    /// Measure name -> HistogramSnapshot (a new dict each time).
    #[getter]
    fn histograms<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let histograms = PyDict::new(py);
        for measure in &self.inner.measures {
            histograms.set_item(
                &*measure.name,
                PyHistogramSnapshot::new(measure.histogram.clone(), &measure.unit),
            )?;
        }
        Ok(histograms)
    }

    /// Traced calls' durations with their spans: (seconds, unix time ns, trace id, span id),
    /// the most recent per power-of-two range of durations (only while span attributes
    /// are on).
    #[getter]
    fn exemplars(&self) -> Vec<(f64, u64, u128, u64)> {
        self.inner
            .exemplars
            .iter()
            .map(|e| (e.value, e.time_unix_ns, e.trace_id, e.span_id))
            .collect()
    }

    /// Estimated total of a measure over all calls (sampled probes weighted up).
    fn estimated_total(&self, measure: &str) -> PyResult<f64> {
        let Some(found) = self.measure(measure) else {
            let known: Vec<&str> = self.inner.measures.iter().map(|m| &*m.name).collect();
            return Err(PyKeyError::new_err(format!(
                "no measure {measure:?} in this series; it has {}",
                known.join(", ")
            )));
        };
        Ok(found.histogram.estimated_sum())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Series(kind={:?}, operation={:?}, attributes={}, count={})",
            self.inner.kind.name(),
            &*self.inner.name,
            self.attributes(py)?.repr()?,
            self.inner.count
        ))
    }

    /// Immutable: a copy is the same object.
    fn __copy__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __deepcopy__(slf: Py<Self>, _memo: &Bound<'_, PyAny>) -> Py<Self> {
        slf
    }

    /// Pickles as its plain data.
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let restore = py.import("meterage._native")?.getattr("_restore_series")?;
        let measures = self
            .inner
            .measures
            .iter()
            .map(|m| {
                Ok((
                    m.name.to_string(),
                    m.unit.to_string(),
                    histogram_state(py, &m.histogram)?,
                ))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let state = (
            self.inner.kind.name(),
            &*self.inner.name,
            &*self.inner.unit,
            &*self.inner.description,
            self.attributes(py)?,
            self.inner.count,
            measures,
            self.inner.value,
            self.exemplars(),
            self.inner.active,
        );
        PyTuple::new(py, [restore, (state,).into_pyobject(py)?.into_any()])
    }
}

fn histogram_state<'py>(
    py: Python<'py>,
    histogram: &HistogramSnapshot,
) -> PyResult<Bound<'py, PyTuple>> {
    histogram.parts().into_pyobject(py)
}

fn histogram_from_state(state: HistogramParts) -> PyResult<HistogramSnapshot> {
    HistogramSnapshot::from_parts(state).ok_or_else(|| {
        PyValueError::new_err("not the state of a HistogramSnapshot: its counts do not add up")
    })
}

/// Rebuilds a pickled `HistogramSnapshot`.
#[pyfunction]
pub fn _restore_histogram(state: HistogramParts, unit: String) -> PyResult<PyHistogramSnapshot> {
    Ok(PyHistogramSnapshot::new(
        histogram_from_state(state)?,
        &unit,
    ))
}

type SeriesState = (
    String,
    String,
    String,
    String,
    Py<PyDict>,
    u64,
    Vec<(String, String, HistogramParts)>,
    f64,
    Vec<(f64, u64, u128, u64)>,
    Option<i64>,
);

/// Rebuilds a pickled `Series`.
#[pyfunction]
pub fn _restore_series(py: Python<'_>, state: SeriesState) -> PyResult<PySeries> {
    let (kind, name, unit, description, attributes, count, measures, value, exemplars, active) =
        state;
    if active.is_some_and(|calls| calls < 0) {
        return Err(PyValueError::new_err(
            "not the state of a Series: a negative number of calls in flight",
        ));
    }
    let kind = match kind.as_str() {
        "call" => SeriesKind::Call,
        "histogram" => SeriesKind::Histogram,
        "counter" => SeriesKind::Counter,
        other => {
            return Err(PyValueError::new_err(format!(
                "not the state of a Series: kind {other:?}"
            )))
        }
    };
    let measures = measures
        .into_iter()
        .map(|(name, unit, histogram)| {
            Ok(MeasureSnapshot {
                name: name.into(),
                unit: unit.into(),
                histogram: histogram_from_state(histogram)?,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let counted = match kind {
        SeriesKind::Call | SeriesKind::Histogram => measures.first().map(|m| m.histogram.count),
        SeriesKind::Counter => Some(count),
    };
    if counted != Some(count) {
        return Err(PyValueError::new_err(
            "not the state of a Series: its count is not its histogram's",
        ));
    }
    Ok(PySeries::new(SeriesSnapshot {
        kind,
        name: name.into(),
        unit: unit.into(),
        description: description.into(),
        // A `Series` is values, not how they are exported.
        boundaries: None,
        attributes: attribute_set(Some(attributes.bind(py).as_any()))?,
        count,
        measures,
        value,
        exemplars: exemplars
            .into_iter()
            .map(|(value, time_unix_ns, trace_id, span_id)| Exemplar {
                value,
                time_unix_ns,
                trace_id,
                span_id,
            })
            .collect(),
        active,
    }))
}

pub fn series_list<'py>(
    py: Python<'py>,
    snapshot: Vec<SeriesSnapshot>,
) -> PyResult<Bound<'py, PyList>> {
    let items = snapshot
        .into_iter()
        .map(|series| Py::new(py, PySeries::new(series)))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}
