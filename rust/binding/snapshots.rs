//! Snapshot objects handed to Python: plain data, no OpenTelemetry needed.

use super::convert::attributes_to_dict;
use crate::aggregate::exemplars::Exemplar;
use crate::aggregate::histogram::HistogramSnapshot;
use crate::aggregate::snapshot::SeriesSnapshot;
use crate::bridge;
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

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
}

/// One series: an operation (or instrument) with one attribute set.
#[pyclass(module = "meterage._native", name = "Series", frozen)]
pub struct PySeries {
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    operation: String,
    #[pyo3(get)]
    unit: String,
    #[pyo3(get)]
    description: String,
    #[pyo3(get)]
    count: u64,
    /// Counters: the total.
    #[pyo3(get)]
    value: f64,
    attributes: Py<PyDict>,
    histograms: Py<PyDict>,
    /// How many calls ran the probes (the largest count of any probe measure).
    #[pyo3(get)]
    sampled: u64,
    exemplars: Vec<Exemplar>,
    /// Calls of this series in flight now (None unless an exporter asked to count them).
    #[pyo3(get)]
    active: Option<i64>,
}

impl PySeries {
    pub fn new(py: Python<'_>, series: &SeriesSnapshot) -> PyResult<Self> {
        let histograms = PyDict::new(py);
        let mut sampled = 0;
        for (index, measure) in series.measures.iter().enumerate() {
            if index > 0 || series.kind != crate::aggregate::snapshot::SeriesKind::Call {
                sampled = sampled.max(measure.histogram.count);
            }
            histograms.set_item(
                &*measure.name,
                PyHistogramSnapshot::new(measure.histogram.clone(), &measure.unit),
            )?;
        }
        Ok(PySeries {
            kind: series.kind.name(),
            operation: series.name.to_string(),
            unit: series.unit.to_string(),
            description: series.description.to_string(),
            count: series.count,
            value: series.value,
            attributes: attributes_to_dict(py, series.attributes.iter())?.unbind(),
            histograms: histograms.unbind(),
            sampled,
            exemplars: series.exemplars.clone(),
            active: series.active,
        })
    }
}

#[pymethods]
impl PySeries {
    /// The operation or instrument name (same as `operation`).
    #[getter]
    fn name(&self) -> &str {
        &self.operation
    }

    /// Attributes of this series (a copy).
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.attributes.bind(py).copy()
    }

    /// Measure name -> HistogramSnapshot (a copy of the mapping).
    #[getter]
    fn histograms<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.histograms.bind(py).copy()
    }

    /// Traced calls' durations with their spans: (seconds, unix time ns, trace id, span id),
    /// the most recent per power-of-two range of durations (only while span attributes
    /// are on).
    #[getter]
    fn exemplars(&self) -> Vec<(f64, u64, u128, u64)> {
        self.exemplars
            .iter()
            .map(|e| (e.value, e.time_unix_ns, e.trace_id, e.span_id))
            .collect()
    }

    /// Estimated total of a measure over all calls (sampled probes weighted up).
    fn estimated_total(&self, py: Python<'_>, measure: &str) -> PyResult<f64> {
        let histograms = self.histograms.bind(py);
        let Some(histogram) = histograms.get_item(measure)? else {
            let known: Vec<String> = histograms.keys().extract()?;
            return Err(PyKeyError::new_err(format!(
                "no measure {measure:?} in this series; it has {}",
                known.join(", ")
            )));
        };
        Ok(histogram
            .cast::<PyHistogramSnapshot>()?
            .get()
            .inner
            .estimated_sum())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Series(kind={:?}, operation={:?}, attributes={}, count={})",
            self.kind,
            self.operation,
            self.attributes.bind(py).repr()?,
            self.count
        ))
    }
}

pub fn series_list<'py>(
    py: Python<'py>,
    snapshot: &[SeriesSnapshot],
) -> PyResult<Bound<'py, PyList>> {
    let items = snapshot
        .iter()
        .map(|series| Py::new(py, PySeries::new(py, series)?))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}
