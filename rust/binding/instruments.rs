//! Custom instruments on the same native fast path: `Histogram.record` and `Counter.add`.

use super::convert::attribute_set;
use super::snapshots::PyHistogramSnapshot;
use crate::aggregate::attributes::AttributeSet;
use crate::aggregate::histogram::HistogramSnapshot;
use crate::aggregate::histogram::SCALE;
use crate::aggregate::registry::{registry, Instrument};
use crate::aggregate::series::{CounterSeries, HistogramSeries};
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

fn series_of<T: crate::aggregate::series_map::SeriesData>(
    instrument: &Instrument<T>,
    default: &Arc<T>,
    attributes: Option<&Bound<'_, PyAny>>,
) -> PyResult<Arc<T>> {
    match attributes {
        Some(attributes) if !attributes.is_none() => Ok(instrument
            .series
            .get_or_create(&attribute_set(Some(attributes))?)),
        _ => Ok(Arc::clone(default)),
    }
}

fn check_name(name: &str) -> PyResult<()> {
    if name.is_empty() {
        return Err(PyValueError::new_err("instrument names must not be empty"));
    }
    Ok(())
}

#[pyclass(module = "meterage._native", name = "Histogram", frozen)]
pub struct PyHistogram {
    instrument: Arc<Instrument<HistogramSeries>>,
    default: Arc<HistogramSeries>,
}

#[pymethods]
impl PyHistogram {
    #[new]
    #[pyo3(signature = (name, unit = "", description = ""))]
    fn new(name: &str, unit: &str, description: &str) -> PyResult<Self> {
        check_name(name)?;
        let instrument = registry()
            .histogram(name, unit, description)
            .map_err(PyValueError::new_err)?;
        let default = instrument.series.get_or_create(&AttributeSet::empty());
        Ok(PyHistogram {
            instrument,
            default,
        })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.instrument.name
    }
    #[getter]
    fn unit(&self) -> &str {
        &self.instrument.unit
    }
    #[getter]
    fn description(&self) -> &str {
        &self.instrument.description
    }

    /// Records one value (int or float, finite, not negative).
    #[pyo3(signature = (value, attributes = None))]
    fn record(
        &self,
        value: &Bound<'_, PyAny>,
        attributes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let value = measurement("histogram values", value)?;
        series_of(&self.instrument, &self.default, attributes)?
            .histogram
            .record(value);
        Ok(())
    }

    /// The histogram of one attribute set (empty if nothing was recorded there).
    #[pyo3(signature = (attributes = None))]
    fn snapshot(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<PyHistogramSnapshot> {
        let series = match attributes {
            Some(attributes) if !attributes.is_none() => self
                .instrument
                .series
                .get(&attribute_set(Some(attributes))?),
            _ => Some(Arc::clone(&self.default)),
        };
        let snapshot = series.map_or_else(
            || HistogramSnapshot::empty(SCALE),
            |series| series.histogram.snapshot(),
        );
        Ok(PyHistogramSnapshot::new(snapshot, &self.instrument.unit))
    }

    fn __repr__(&self) -> String {
        format!(
            "<meterage.histogram {:?} unit={:?}>",
            &*self.instrument.name, &*self.instrument.unit
        )
    }
}

#[pyclass(module = "meterage._native", name = "Counter", frozen)]
pub struct PyCounter {
    instrument: Arc<Instrument<CounterSeries>>,
    default: Arc<CounterSeries>,
}

#[pymethods]
impl PyCounter {
    #[new]
    #[pyo3(signature = (name, unit = "", description = ""))]
    fn new(name: &str, unit: &str, description: &str) -> PyResult<Self> {
        check_name(name)?;
        let instrument = registry()
            .counter(name, unit, description)
            .map_err(PyValueError::new_err)?;
        let default = instrument.series.get_or_create(&AttributeSet::empty());
        Ok(PyCounter {
            instrument,
            default,
        })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.instrument.name
    }
    #[getter]
    fn unit(&self) -> &str {
        &self.instrument.unit
    }
    #[getter]
    fn description(&self) -> &str {
        &self.instrument.description
    }

    /// Adds a non-negative amount (counters only go up).
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
        series_of(&self.instrument, &self.default, attributes)?.add(amount);
        Ok(())
    }

    /// The total of one attribute set.
    #[pyo3(signature = (attributes = None))]
    fn value(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
        match attributes {
            Some(attributes) if !attributes.is_none() => Ok(self
                .instrument
                .series
                .get(&attribute_set(Some(attributes))?)
                .map_or(0.0, |series| series.value())),
            _ => Ok(self.default.value()),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<meterage.counter {:?} unit={:?}>",
            &*self.instrument.name, &*self.instrument.unit
        )
    }
}
