//! Custom instruments on the same native fast path: `Histogram.record` and `Counter.add`.

use super::convert::attribute_set;
use super::snapshots::PyHistogramSnapshot;
use crate::aggregate::attributes::AttributeSet;
use crate::aggregate::histogram::HistogramSnapshot;
use crate::aggregate::histogram::SCALE;
use crate::aggregate::registry::{registry, Instrument};
use crate::aggregate::series::{CounterSeries, HistogramSeries};
use crate::aggregate::series_map::SeriesData;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};
use std::sync::Arc;

/// A measurement: an int or float that is finite and not negative.
fn measurement(what: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    let is_number = value.is_instance_of::<PyFloat>()
        || (value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>());
    if !is_number {
        return Err(PyTypeError::new_err(format!(
            "{what} must be an int or float, not {}",
            value.get_type().name()?
        )));
    }
    let number = value.extract::<f64>()?;
    if !number.is_finite() || number < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{what} must be finite and not negative, got {number}"
        )));
    }
    Ok(number)
}

/// An instrument and its attribute-less series, resolved once when the handle is made.
struct Handle<T> {
    instrument: Arc<Instrument<T>>,
    default: Arc<T>,
}

impl<T: SeriesData> Handle<T> {
    fn open(
        name: &str,
        lookup: impl FnOnce(&str) -> Result<Arc<Instrument<T>>, String>,
    ) -> PyResult<Self> {
        if name.is_empty() {
            return Err(PyValueError::new_err("instrument names must not be empty"));
        }
        let instrument = lookup(name).map_err(PyValueError::new_err)?;
        let default = instrument.series.get_or_create(&AttributeSet::empty());
        Ok(Handle {
            instrument,
            default,
        })
    }

    /// The series to record into, created if needed.
    fn series(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<Arc<T>> {
        match attributes {
            Some(attributes) if !attributes.is_none() => Ok(self
                .instrument
                .series
                .get_or_create(&attribute_set(Some(attributes))?)),
            _ => Ok(Arc::clone(&self.default)),
        }
    }

    /// The series to read, if it exists.
    fn existing(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Arc<T>>> {
        match attributes {
            Some(attributes) if !attributes.is_none() => Ok(self
                .instrument
                .series
                .get(&attribute_set(Some(attributes))?)),
            _ => Ok(Some(Arc::clone(&self.default))),
        }
    }
}

#[pyclass(module = "meterage._native", name = "Histogram", frozen)]
pub struct PyHistogram(Handle<HistogramSeries>);

#[pymethods]
impl PyHistogram {
    #[new]
    #[pyo3(signature = (name, unit = "", description = ""))]
    fn new(name: &str, unit: &str, description: &str) -> PyResult<Self> {
        Handle::open(name, |name| registry().histogram(name, unit, description)).map(PyHistogram)
    }

    #[getter]
    fn name(&self) -> &str {
        &self.0.instrument.name
    }
    #[getter]
    fn unit(&self) -> &str {
        &self.0.instrument.unit
    }
    #[getter]
    fn description(&self) -> &str {
        &self.0.instrument.description
    }

    /// Records one value (int or float, finite, not negative).
    #[pyo3(signature = (value, attributes = None))]
    fn record(
        &self,
        value: &Bound<'_, PyAny>,
        attributes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let value = measurement("histogram values", value)?;
        self.0.series(attributes)?.histogram.record(value);
        Ok(())
    }

    /// The histogram of one attribute set (empty if nothing was recorded there).
    #[pyo3(signature = (attributes = None))]
    fn snapshot(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<PyHistogramSnapshot> {
        let snapshot = self.0.existing(attributes)?.map_or_else(
            || HistogramSnapshot::empty(SCALE),
            |series| series.histogram.snapshot(),
        );
        Ok(PyHistogramSnapshot::new(snapshot, &self.0.instrument.unit))
    }

    fn __repr__(&self) -> String {
        let instrument = &self.0.instrument;
        format!(
            "<meterage.histogram {:?} unit={:?}>",
            &*instrument.name, &*instrument.unit
        )
    }
}

#[pyclass(module = "meterage._native", name = "Counter", frozen)]
pub struct PyCounter(Handle<CounterSeries>);

#[pymethods]
impl PyCounter {
    #[new]
    #[pyo3(signature = (name, unit = "", description = ""))]
    fn new(name: &str, unit: &str, description: &str) -> PyResult<Self> {
        Handle::open(name, |name| registry().counter(name, unit, description)).map(PyCounter)
    }

    #[getter]
    fn name(&self) -> &str {
        &self.0.instrument.name
    }
    #[getter]
    fn unit(&self) -> &str {
        &self.0.instrument.unit
    }
    #[getter]
    fn description(&self) -> &str {
        &self.0.instrument.description
    }

    /// Adds a non-negative amount (default 1; counters only go up).
    #[pyo3(signature = (amount = None, attributes = None))]
    fn add(
        &self,
        amount: Option<&Bound<'_, PyAny>>,
        attributes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let amount = match amount {
            Some(amount) => measurement("counter amounts", amount)?,
            None => 1.0,
        };
        self.0.series(attributes)?.add(amount);
        Ok(())
    }

    /// The total of one attribute set (0 if nothing was added there).
    #[pyo3(signature = (attributes = None))]
    fn value(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
        Ok(self
            .0
            .existing(attributes)?
            .map_or(0.0, |series| series.value()))
    }

    fn __repr__(&self) -> String {
        let instrument = &self.0.instrument;
        format!(
            "<meterage.counter {:?} unit={:?}>",
            &*instrument.name, &*instrument.unit
        )
    }
}
