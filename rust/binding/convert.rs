//! Conversions between Python values and the core's attribute and probe types, with the
//! error messages users see for bad input.

use crate::aggregate::attributes::{AttributeSet, AttributeValue};
use crate::probe::ProbeSet;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyMapping, PyString};
use std::sync::Arc;

pub type Pairs = Vec<(Arc<str>, AttributeValue)>;

/// One attribute value: str, int, float or bool, nothing else.
pub fn attribute_value(key: &str, value: &Bound<'_, PyAny>) -> PyResult<AttributeValue> {
    if value.is_instance_of::<PyBool>() {
        return Ok(AttributeValue::Bool(value.extract()?));
    }
    if value.is_instance_of::<PyString>() {
        return Ok(AttributeValue::Str(Arc::from(value.extract::<&str>()?)));
    }
    if value.is_instance_of::<PyInt>() {
        return value
            .extract::<i64>()
            .map(AttributeValue::Int)
            .map_err(|_| {
                PyValueError::new_err(format!(
                    "attribute {key:?}: int {value} does not fit in 64 bits; pass it as a str"
                ))
            });
    }
    if value.is_instance_of::<PyFloat>() {
        return Ok(AttributeValue::Float(value.extract()?));
    }
    Err(PyTypeError::new_err(format!(
        "attribute {key:?} has a value of type {}; allowed types are str, int, float and bool",
        value.get_type().name()?
    )))
}

pub fn attribute_key(key: &Bound<'_, PyAny>) -> PyResult<Arc<str>> {
    let Ok(key) = key.cast::<PyString>() else {
        return Err(PyTypeError::new_err(format!(
            "attribute keys must be str, not {}",
            key.get_type().name()?
        )));
    };
    let key = key.to_str()?;
    if key.is_empty() {
        return Err(PyValueError::new_err("attribute keys must not be empty"));
    }
    Ok(Arc::from(key))
}

/// A mapping of attributes (or None) as key/value pairs.
pub fn attribute_pairs(attributes: Option<&Bound<'_, PyAny>>) -> PyResult<Pairs> {
    let Some(attributes) = attributes.filter(|a| !a.is_none()) else {
        return Ok(Vec::new());
    };
    let mut pairs = Vec::new();
    let mut push = |key: Bound<'_, PyAny>, value: Bound<'_, PyAny>| -> PyResult<()> {
        let key = attribute_key(&key)?;
        let value = attribute_value(&key, &value)?;
        pairs.push((key, value));
        Ok(())
    };
    if let Ok(dict) = attributes.cast::<PyDict>() {
        for (key, value) in dict.iter() {
            push(key, value)?;
        }
    } else if let Ok(mapping) = attributes.cast::<PyMapping>() {
        for item in mapping.items()?.iter() {
            let (key, value) = item.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>()?;
            push(key, value)?;
        }
    } else {
        return Err(PyTypeError::new_err(format!(
            "attributes must be a mapping of str to str/int/float/bool, not {}",
            attributes.get_type().name()?
        )));
    }
    Ok(pairs)
}

pub fn attribute_set(attributes: Option<&Bound<'_, PyAny>>) -> PyResult<AttributeSet> {
    Ok(AttributeSet::new(attribute_pairs(attributes)?))
}

pub fn value_to_python<'py>(
    py: Python<'py>,
    value: &AttributeValue,
) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        AttributeValue::Str(text) => PyString::new(py, text).into_any(),
        AttributeValue::Int(number) => number.into_pyobject(py)?.into_any(),
        AttributeValue::Float(number) => PyFloat::new(py, *number).into_any(),
        AttributeValue::Bool(flag) => PyBool::new(py, *flag).to_owned().into_any(),
    })
}

pub fn attributes_to_dict<'py>(
    py: Python<'py>,
    attributes: impl IntoIterator<Item = (impl AsRef<str>, impl std::borrow::Borrow<AttributeValue>)>,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (key, value) in attributes {
        dict.set_item(key.as_ref(), value_to_python(py, value.borrow())?)?;
    }
    Ok(dict)
}

/// Probe names (an iterable of str) as a probe set.
pub fn probe_set(probes: &Bound<'_, PyAny>) -> PyResult<ProbeSet> {
    if probes.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "probes must be a tuple of probe names such as (\"cpu\", \"io\"), not the str {probes}"
        )));
    }
    let valid = || {
        ProbeSet::NAMES
            .iter()
            .map(|(name, _)| format!("{name:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut set = ProbeSet::NONE;
    for name in probes.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "probes must be an iterable of probe names, not {}",
            probes
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })? {
        let name = name?;
        let Ok(text) = name.extract::<&str>() else {
            return Err(PyTypeError::new_err(format!(
                "probe names must be str, got {name:?}; valid probes: {}",
                valid()
            )));
        };
        match ProbeSet::from_name(text) {
            Some(probe) => set = set.union(probe),
            None => {
                return Err(PyValueError::new_err(format!(
                    "unknown probe {text:?}; valid probes: {}",
                    valid()
                )))
            }
        }
    }
    Ok(set)
}
