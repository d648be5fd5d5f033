//! Conversions between Python values and the core's attribute and probe types, with the
//! error messages users see for bad input.

use crate::aggregate::attributes::{
    canonical_float, AttributeSet, AttributeValue, SetHasher, ValueRef,
};
use crate::probe::ProbeSet;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyMapping, PyString};
use std::sync::Arc;

pub type Pairs = Vec<(Arc<str>, AttributeValue)>;

/// The text of `value`, the argument `what`: a TypeError for anything but a str, and a
/// ValueError for a str that is not valid Unicode (a lone surrogate cannot be exported).
pub fn checked_str<'a>(what: &str, value: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    let Ok(text) = value.cast::<PyString>() else {
        return Err(PyTypeError::new_err(format!(
            "{what} must be a str, not {}",
            value.get_type().name()?
        )));
    };
    let mut size: ffi::Py_ssize_t = 0;
    // SAFETY: a live str; the UTF-8 buffer is cached on the object and lives as long as it.
    let data = unsafe { ffi::PyUnicode_AsUTF8AndSize(text.as_ptr(), &mut size) };
    if data.is_null() {
        let error = PyErr::fetch(value.py());
        let at = error
            .value(value.py())
            .getattr("start")
            .and_then(|start| start.extract::<usize>())
            .unwrap_or(0);
        return Err(PyValueError::new_err(format!(
            "{what} is not valid Unicode text: it has a lone surrogate at index {at}; only \
             text that can be encoded as UTF-8 can be exported"
        )));
    }
    // SAFETY: `size` UTF-8 bytes at `data`, owned by `value`, which outlives the result.
    Ok(unsafe {
        std::str::from_utf8_unchecked(std::slice::from_raw_parts(data.cast(), size as usize))
    })
}

/// One attribute value: str, int, float or bool, nothing else.
pub fn attribute_value(key: &str, value: &Bound<'_, PyAny>) -> PyResult<AttributeValue> {
    if value.is_instance_of::<PyBool>() {
        return Ok(AttributeValue::Bool(value.extract()?));
    }
    if value.is_instance_of::<PyString>() {
        let text = checked_str(&format!("the value of attribute {key:?}"), value)?;
        return Ok(AttributeValue::Str(Arc::from(text)));
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
        return Ok(AttributeValue::Float(canonical_float(value.extract()?)));
    }
    Err(PyTypeError::new_err(format!(
        "attribute {key:?} has a value of type {}; allowed types are str, int, float and bool",
        value.get_type().name()?
    )))
}

pub fn attribute_key(key: &Bound<'_, PyAny>) -> PyResult<Arc<str>> {
    if !key.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "attribute keys must be str, not {}",
            key.get_type().name()?
        )));
    }
    let key = checked_str("an attribute key", key)?;
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

/// A borrowed view of one str object's UTF-8 text, None for anything else (or text that is
/// not valid Unicode; a Python error that raised is cleared).
///
/// # Safety
/// `object` is live and the GIL held; the text lives as long as the object.
#[inline]
unsafe fn borrowed_str<'a>(object: *mut ffi::PyObject) -> Option<&'a str> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        if ffi::PyUnicode_CheckExact(object) == 0 {
            return None;
        }
        // A compact ASCII str (nearly every key and short value) is its own UTF-8, right
        // after its header: no call needed.
        #[cfg(not(any(Py_3_14, PyPy, GraalPy)))]
        if ffi::PyUnicode_IS_COMPACT_ASCII(object) != 0 {
            let data = (object as *const ffi::PyASCIIObject).add(1) as *const u8;
            let length = ffi::PyUnicode_GET_LENGTH(object) as usize;
            return Some(std::str::from_utf8_unchecked(std::slice::from_raw_parts(
                data, length,
            )));
        }
        let mut size: ffi::Py_ssize_t = 0;
        let data = ffi::PyUnicode_AsUTF8AndSize(object, &mut size);
        if data.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        Some(std::str::from_utf8_unchecked(std::slice::from_raw_parts(
            data.cast(),
            size as usize,
        )))
    }
}

/// A borrowed view of one attribute value of the plain types, None for anything else.
///
/// # Safety
/// As for [`borrowed_str`].
#[inline]
unsafe fn borrowed_value<'a>(object: *mut ffi::PyObject) -> Option<ValueRef<'a>> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        if object == ffi::Py_True() {
            return Some(ValueRef::Bool(true));
        }
        if object == ffi::Py_False() {
            return Some(ValueRef::Bool(false));
        }
        if ffi::PyLong_CheckExact(object) != 0 {
            let mut overflow = 0;
            let number = ffi::PyLong_AsLongLongAndOverflow(object, &mut overflow);
            if overflow != 0 || (number == -1 && !ffi::PyErr_Occurred().is_null()) {
                ffi::PyErr_Clear();
                return None;
            }
            return Some(ValueRef::Int(number));
        }
        if ffi::PyFloat_CheckExact(object) != 0 {
            return Some(ValueRef::Float(canonical_float(ffi::PyFloat_AS_DOUBLE(
                object,
            ))));
        }
        borrowed_str(object).map(ValueRef::Str)
    }
}

/// The pairs of a dict of plain attributes (str keys that are not empty; str, int, float or
/// bool values) read in place, with their set's hash: a lookup of an existing series
/// from them allocates nothing (up to [`INLINE_PAIRS`] pairs are kept on the stack).
pub struct BorrowedPairs<'a> {
    inline: [std::mem::MaybeUninit<(&'a str, ValueRef<'a>)>; INLINE_PAIRS],
    spilled: Vec<(&'a str, ValueRef<'a>)>,
    len: usize,
    pub hash: u64,
}

pub const INLINE_PAIRS: usize = 8;

impl<'a> BorrowedPairs<'a> {
    pub fn new() -> Self {
        BorrowedPairs {
            inline: [const { std::mem::MaybeUninit::uninit() }; INLINE_PAIRS],
            spilled: Vec::new(),
            len: 0,
            hash: 0,
        }
    }

    /// Reads the dict's pairs; false if one is not plain (the caller then converts the
    /// dict the slow way, with its error messages).
    pub fn read(&mut self, dict: &'a Bound<'_, PyDict>) -> bool {
        let mut hasher = SetHasher::default();
        let mut position: ffi::Py_ssize_t = 0;
        let mut key: *mut ffi::PyObject = std::ptr::null_mut();
        let mut value: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: the dict is alive and not changed while iterated (no Python code runs
        // here); the borrowed keys and values live as long as the dict holds them, and
        // the dict outlives 'a.
        unsafe {
            while ffi::PyDict_Next(dict.as_ptr(), &mut position, &mut key, &mut value) != 0 {
                let (Some(key), Some(value)) = (borrowed_str(key), borrowed_value(value)) else {
                    return false;
                };
                if key.is_empty() {
                    return false;
                }
                hasher.add(key, value);
                if self.len < INLINE_PAIRS {
                    self.inline[self.len].write((key, value));
                } else {
                    if self.spilled.is_empty() {
                        let inline = self.as_slice().to_vec();
                        self.spilled = inline;
                    }
                    self.spilled.push((key, value));
                }
                self.len += 1;
            }
        }
        self.hash = hasher.finish();
        true
    }

    fn as_slice(&self) -> &[(&'a str, ValueRef<'a>)] {
        if self.len > INLINE_PAIRS {
            &self.spilled
        } else {
            // SAFETY: the first `len` entries were written by `read`.
            unsafe { std::slice::from_raw_parts(self.inline.as_ptr().cast(), self.len) }
        }
    }

    /// Whether `set` holds exactly these pairs.
    #[inline]
    pub fn matches(&self, set: &AttributeSet) -> bool {
        set.matches(self.len, self.as_slice().iter().copied())
    }

    /// The attribute set of these pairs.
    pub fn to_set(&self) -> AttributeSet {
        AttributeSet::new(self.as_slice().iter().map(|&(key, value)| {
            let value = match value {
                ValueRef::Str(text) => AttributeValue::Str(Arc::from(text)),
                ValueRef::Int(number) => AttributeValue::Int(number),
                ValueRef::Float(number) => AttributeValue::Float(number),
                ValueRef::Bool(flag) => AttributeValue::Bool(flag),
            };
            (Arc::from(key), value)
        }))
    }
}

impl Default for BorrowedPairs<'_> {
    fn default() -> Self {
        Self::new()
    }
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
    probe_names("probes", probes)
}

/// Probe names (an iterable of str), the argument `what`, as a probe set.
pub fn probe_names(what: &str, probes: &Bound<'_, PyAny>) -> PyResult<ProbeSet> {
    if probes.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be a tuple of probe names such as (\"cpu\", \"io\"), not the str {probes}"
        )));
    }
    let valid = || {
        ProbeSet::ALL
            .names()
            .map(|name| format!("{name:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut set = ProbeSet::NONE;
    for name in probes.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be a tuple of probe names such as (\"cpu\", \"io\"), not {}; valid \
             probes: {}",
            probes
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default(),
            valid()
        ))
    })? {
        let name = name?;
        if !name.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(format!(
                "probe names must be str, got {}; valid probes: {}",
                name.repr()?,
                valid()
            )));
        }
        let text = checked_str("a probe name", &name)?;
        match ProbeSet::by_name(text) {
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
