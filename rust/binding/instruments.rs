//! Custom instruments on the same native fast path: `Histogram.record` and `Counter.add`,
//! and their bound forms for one attribute set.
//!
//! A record with an attributes dict of plain values looks its series up in place: the
//! dict's hash is computed from its keys and values as they are (the same hash as the
//! attribute set's), and compared pair by pair with the series found, so a record into an
//! existing series allocates nothing. Anything else (another mapping, other value types)
//! takes the slow path, which converts the attributes and says what is wrong with them.

use super::convert::{attribute_set, checked_str, BorrowedPairs};
use super::snapshots::PyHistogramSnapshot;
use crate::aggregate::attributes::AttributeSet;
use crate::aggregate::boundaries::{Boundaries, MAX_BOUNDARIES};
use crate::aggregate::call_key::CallKey;
use crate::aggregate::histogram::HistogramSnapshot;
use crate::aggregate::histogram::SCALE;
use crate::aggregate::registry::{registry, Instrument};
use crate::aggregate::series::{CounterSeries, HistogramSeries};
use crate::aggregate::series_map::SeriesData;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PySequence, PyString, PyTuple,
};
use std::sync::Arc;

/// A measurement: an int or float that is finite and not negative.
#[inline]
pub fn measurement(what: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    let number = if let Ok(float) = value.cast_exact::<PyFloat>() {
        float.value()
    } else if value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>() {
        value.extract::<f64>().map_err(|_| {
            PyValueError::new_err(format!(
                "{what} must be finite, got an int too large for a float"
            ))
        })?
    } else if value.is_instance_of::<PyFloat>() {
        value.extract::<f64>()?
    } else {
        return Err(PyTypeError::new_err(format!(
            "{what} must be an int or float, not {}",
            value.get_type().name()?
        )));
    };
    if !number.is_finite() || number < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{what} must be finite and not negative, got {number}"
        )));
    }
    Ok(number)
}

/// `boundaries=`: None, or a sequence of 1 to [`MAX_BOUNDARIES`] numbers that
/// [`Boundaries::new`] accepts (finite, not negative, strictly increasing).
fn boundaries_of(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Boundaries>> {
    let Some(value) = value.filter(|value| !value.is_none()) else {
        return Ok(None);
    };
    let text = value.is_instance_of::<PyString>()
        || value.is_instance_of::<PyBytes>()
        || value.is_instance_of::<PyByteArray>();
    if text || value.cast::<PySequence>().is_err() {
        return Err(PyTypeError::new_err(format!(
            "boundaries must be a sequence of numbers such as (0.005, 0.01, 0.1), or None; \
             not {}",
            value.get_type().name()?
        )));
    }
    let mut values = Vec::new();
    // One more than allowed is enough to say there are too many.
    for (index, item) in value.try_iter()?.take(MAX_BOUNDARIES + 1).enumerate() {
        let item = item?;
        let number = if item.is_instance_of::<PyBool>() {
            None
        } else if item.is_instance_of::<PyInt>() {
            Some(item.extract::<f64>().map_err(|_| {
                PyValueError::new_err(format!(
                    "boundaries must be finite numbers; boundaries[{index}] is an int too \
                     large for a float"
                ))
            })?)
        } else {
            item.extract::<f64>().ok()
        };
        let Some(number) = number else {
            return Err(PyTypeError::new_err(format!(
                "boundaries[{index}] must be an int or float, not {}",
                item.get_type().name()?
            )));
        };
        values.push(number);
    }
    Boundaries::new(values)
        .map(Some)
        .map_err(PyValueError::new_err)
}

/// An instrument and its attribute-less series, resolved once when the handle is made.
struct Handle<T> {
    instrument: Arc<Instrument<T>>,
    default: Arc<T>,
}

impl<T: SeriesData> Handle<T> {
    fn open(
        kind: &str,
        name: &Bound<'_, PyAny>,
        unit: Option<&Bound<'_, PyAny>>,
        description: Option<&Bound<'_, PyAny>>,
        lookup: impl FnOnce(&str, &str, &str) -> Result<Arc<Instrument<T>>, String>,
    ) -> PyResult<Self> {
        let name = checked_str(&format!("the {kind} name"), name)?;
        if name.is_empty() {
            return Err(PyValueError::new_err(format!(
                "the {kind} name must not be empty"
            )));
        }
        // Absent means empty, as OpenTelemetry's own instruments default them.
        let unit = unit.map_or(Ok(""), |unit| checked_str("unit", unit))?;
        let description = description.map_or(Ok(""), |text| checked_str("description", text))?;
        let instrument = lookup(name, unit, description).map_err(PyValueError::new_err)?;
        let default = instrument.series.get_or_create_idle(&AttributeSet::empty());
        Ok(Handle {
            instrument,
            default,
        })
    }

    /// The series to record into, created if needed.
    fn series(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<Arc<T>> {
        let Some(attributes) = attributes.filter(|a| !a.is_none()) else {
            return Ok(self
                .instrument
                .series
                .own(&self.default)
                .unwrap_or_else(|| Arc::clone(&self.default)));
        };
        let series = &self.instrument.series;
        if let Ok(dict) = attributes.cast_exact::<PyDict>() {
            let mut pairs = BorrowedPairs::new();
            if pairs.read(dict) {
                return Ok(series.get_or_create_with(
                    pairs.hash,
                    |set| pairs.matches(set),
                    || pairs.to_set(),
                ));
            }
        }
        Ok(series.get_or_create(&attribute_set(Some(attributes))?))
    }

    /// Runs `record` on the series for `attributes`: an existing series of a plain dict is
    /// found and used in place, with no allocation and no reference count taken.
    #[inline]
    fn record_into(
        &self,
        attributes: Option<&Bound<'_, PyAny>>,
        record: impl Fn(&T),
    ) -> PyResult<()> {
        let Some(attributes) = attributes.filter(|a| !a.is_none()) else {
            match self.instrument.series.own(&self.default) {
                Some(own) => record(&own),
                None => record(&self.default),
            }
            return Ok(());
        };
        if let Ok(dict) = attributes.cast_exact::<PyDict>() {
            let mut pairs = BorrowedPairs::new();
            if pairs.read(dict) {
                let series = &self.instrument.series;
                if series
                    .with_current(pairs.hash, |set| pairs.matches(set), &record)
                    .is_none()
                {
                    record(&*series.get_or_create_with(
                        pairs.hash,
                        |set| pairs.matches(set),
                        || pairs.to_set(),
                    ));
                }
                return Ok(());
            }
        }
        record(&*self.series(Some(attributes))?);
        Ok(())
    }

    /// The series to read, if it holds values now.
    fn existing(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Arc<T>>> {
        match attributes {
            Some(attributes) if !attributes.is_none() => Ok(self
                .instrument
                .series
                .get(&attribute_set(Some(attributes))?)),
            _ => Ok(Some(Arc::clone(&self.default))),
        }
    }

    fn repr(&self, kind: &str, attributes: Option<&AttributeSet>) -> String {
        let instrument = &self.instrument;
        let bound = attributes.map_or_else(String::new, |set| {
            let pairs: Vec<String> = set
                .iter()
                .map(|(key, value)| format!("{key:?}: {}", python_repr(value)))
                .collect();
            format!(" bound to {{{}}}", pairs.join(", "))
        });
        format!(
            "<meterage.{kind} {:?} unit={:?}{bound}>",
            &*instrument.name, &*instrument.unit
        )
    }
}

/// An attribute value as Python writes it.
fn python_repr(value: &crate::aggregate::attributes::AttributeValue) -> String {
    use crate::aggregate::attributes::AttributeValue;
    match value {
        AttributeValue::Str(text) => format!("{text:?}"),
        AttributeValue::Int(number) => number.to_string(),
        AttributeValue::Float(number) if number.is_nan() => "nan".to_owned(),
        AttributeValue::Float(number) if number.is_infinite() => {
            if *number > 0.0 { "inf" } else { "-inf" }.to_owned()
        }
        AttributeValue::Float(number) => format!("{number:?}"),
        AttributeValue::Bool(flag) => if *flag { "True" } else { "False" }.to_owned(),
    }
}

fn histogram_snapshot(series: Option<&HistogramSeries>, unit: &str) -> PyHistogramSnapshot {
    let snapshot = series.filter(|series| !series.is_empty()).map_or_else(
        || HistogramSnapshot::empty(SCALE),
        |s| s.histogram.snapshot(),
    );
    PyHistogramSnapshot::new(snapshot, unit)
}

#[pyclass(module = "meterage._native", name = "Histogram", frozen)]
pub struct PyHistogram(Handle<HistogramSeries>);

impl PyHistogram {
    /// Records a checked value into the series of an attribute set made natively (a
    /// finished call's, for values measured alongside it).
    pub fn record_in(&self, attributes: &CallKey<'_>, value: f64) {
        self.series_in(attributes).record(value);
    }

    /// The series of an attribute set made natively.
    pub fn series_in(&self, attributes: &CallKey<'_>) -> Arc<HistogramSeries> {
        attributes.series_in(&self.0.instrument.series)
    }
}

#[pymethods]
impl PyHistogram {
    #[new]
    #[pyo3(signature = (name, unit = None, description = None, boundaries = None))]
    fn new(
        name: &Bound<'_, PyAny>,
        unit: Option<&Bound<'_, PyAny>>,
        description: Option<&Bound<'_, PyAny>>,
        boundaries: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let boundaries = boundaries_of(boundaries)?;
        Handle::open(
            "histogram",
            name,
            unit,
            description,
            |name, unit, description| registry().histogram(name, unit, description, boundaries),
        )
        .map(PyHistogram)
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
    /// The explicit bucket boundaries exporters give this histogram (None: their default).
    #[getter]
    fn boundaries<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        self.0
            .instrument
            .boundaries
            .as_deref()
            .map(|values| PyTuple::new(py, values.iter()))
            .transpose()
    }

    /// Records one value (int or float, finite, not negative).
    #[pyo3(signature = (value, attributes = None))]
    fn record(
        &self,
        value: &Bound<'_, PyAny>,
        attributes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let value = measurement("histogram values", value)?;
        self.0
            .record_into(attributes, |series| series.record(value))
    }

    /// This histogram for one attribute set, resolved once: its `record` skips the lookup.
    fn bind(&self, attributes: &Bound<'_, PyAny>) -> PyResult<BoundHistogram> {
        let series = self.0.series(Some(attributes))?;
        Ok(BoundHistogram {
            instrument: Arc::clone(&self.0.instrument),
            series,
        })
    }

    /// The histogram of one attribute set (empty if nothing was recorded there).
    #[pyo3(signature = (attributes = None))]
    fn snapshot(&self, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<PyHistogramSnapshot> {
        let series = self.0.existing(attributes)?;
        Ok(histogram_snapshot(
            series.as_deref(),
            &self.0.instrument.unit,
        ))
    }

    fn __repr__(&self) -> String {
        self.0.repr("histogram", None)
    }
}

/// A histogram bound to one attribute set (`Histogram.bind(attributes)`).
#[pyclass(module = "meterage._native", name = "BoundHistogram", frozen)]
pub struct BoundHistogram {
    instrument: Arc<Instrument<HistogramSeries>>,
    series: Arc<HistogramSeries>,
}

#[pymethods]
impl BoundHistogram {
    /// Records one value (int or float, finite, not negative) in the bound series.
    fn record(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let value = measurement("histogram values", value)?;
        match self.instrument.series.own(&self.series) {
            Some(own) => own.record(value),
            None => self.series.record(value),
        }
        Ok(())
    }

    #[getter]
    fn name(&self) -> &str {
        &self.instrument.name
    }

    /// The bound attributes.
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        super::convert::attributes_to_dict(py, self.series.attributes().iter())
    }

    /// The bound series' histogram.
    fn snapshot(&self) -> PyHistogramSnapshot {
        histogram_snapshot(Some(&self.series), &self.instrument.unit)
    }

    fn __repr__(&self) -> String {
        Handle {
            instrument: Arc::clone(&self.instrument),
            default: Arc::clone(&self.series),
        }
        .repr("histogram", Some(self.series.attributes()))
    }
}

/// A counter amount: an int or float, finite and not negative (1 when not given).
pub struct Amount(f64);

impl<'a, 'py> FromPyObject<'a, 'py> for Amount {
    type Error = PyErr;

    fn extract(amount: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        measurement("counter amounts", &amount.to_owned()).map(Amount)
    }
}

#[pyclass(module = "meterage._native", name = "Counter", frozen)]
pub struct PyCounter(Handle<CounterSeries>);

#[pymethods]
impl PyCounter {
    #[new]
    #[pyo3(signature = (name, unit = None, description = None))]
    fn new(
        name: &Bound<'_, PyAny>,
        unit: Option<&Bound<'_, PyAny>>,
        description: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        Handle::open(
            "counter",
            name,
            unit,
            description,
            |name, unit, description| registry().counter(name, unit, description),
        )
        .map(PyCounter)
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
    #[pyo3(signature = (amount = Amount(1.0), attributes = None))]
    fn add(&self, amount: Amount, attributes: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.0
            .record_into(attributes, |series| series.add(amount.0))
    }

    /// This counter for one attribute set, resolved once: its `add` skips the lookup.
    fn bind(&self, attributes: &Bound<'_, PyAny>) -> PyResult<BoundCounter> {
        let series = self.0.series(Some(attributes))?;
        Ok(BoundCounter {
            instrument: Arc::clone(&self.0.instrument),
            series,
        })
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
        self.0.repr("counter", None)
    }
}

/// A counter bound to one attribute set (`Counter.bind(attributes)`).
#[pyclass(module = "meterage._native", name = "BoundCounter", frozen)]
pub struct BoundCounter {
    instrument: Arc<Instrument<CounterSeries>>,
    series: Arc<CounterSeries>,
}

#[pymethods]
impl BoundCounter {
    /// Adds a non-negative amount (default 1) to the bound series.
    #[pyo3(signature = (amount = Amount(1.0)))]
    fn add(&self, amount: Amount) {
        match self.instrument.series.own(&self.series) {
            Some(own) => own.add(amount.0),
            None => self.series.add(amount.0),
        }
    }

    #[getter]
    fn name(&self) -> &str {
        &self.instrument.name
    }

    /// The bound attributes.
    #[getter]
    fn attributes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        super::convert::attributes_to_dict(py, self.series.attributes().iter())
    }

    /// The bound series' total.
    fn value(&self) -> f64 {
        self.series.value()
    }

    fn __repr__(&self) -> String {
        Handle {
            instrument: Arc::clone(&self.instrument),
            default: Arc::clone(&self.series),
        }
        .repr("counter", Some(self.series.attributes()))
    }
}
