//! Coroutines, generators and async generators that metered callables return.
//!
//! Calling a coroutine or generator function does no work: it binds the arguments and
//! makes the object, and the work happens as the object is stepped. So the object is
//! metered step by step ([`Steps`]), through a small Python driver of the same kind (a
//! real coroutine, generator or async generator, so asyncio, `inspect` and `yield from`
//! see what they expect). The same holds for a plain callable that returns such an object
//! (an `async def` behind a decorator, an object with `async def __call__`). Any other
//! awaitable a call returns is only created by the call: that gets a warning, once per
//! meter, since the number recorded is not the awaited work.

use super::open_call::OpenCall;
use super::steps::Steps;
use crate::aggregate::call::MeterCore;
use pyo3::exceptions::PyRuntimeWarning;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use std::sync::Arc;

/// Code flags (CPython's `inspect.CO_*`).
const CO_GENERATOR: i64 = 0x20;
const CO_COROUTINE: i64 = 0x80;
const CO_ITERABLE_COROUTINE: i64 = 0x100;
const CO_ASYNC_GENERATOR: i64 = 0x200;

/// The Python drivers, one per kind (set by `meterage._decorate` at import).
struct Drivers {
    coroutine: Py<PyAny>,
    generator: Py<PyAny>,
    iterable_coroutine: Py<PyAny>,
    async_generator: Py<PyAny>,
}

static DRIVERS: PyOnceLock<Drivers> = PyOnceLock::new();

/// Registers the drivers: `coroutine(steps)`, `generator(steps)`,
/// `iterable_coroutine(steps)` (a `types.coroutine` generator) and
/// `async_generator(call, inner)`.
#[pyfunction]
pub fn _set_drivers(
    py: Python<'_>,
    coroutine: Py<PyAny>,
    generator: Py<PyAny>,
    iterable_coroutine: Py<PyAny>,
    async_generator: Py<PyAny>,
) {
    let _ = DRIVERS.set(
        py,
        Drivers {
            coroutine,
            generator,
            iterable_coroutine,
            async_generator,
        },
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Coroutine,
    Generator,
    /// A generator that is also awaitable (from a `@types.coroutine` function).
    IterableCoroutine,
    AsyncGenerator,
}

fn code_flags(object: &Bound<'_, PyAny>, code_attribute: &str) -> i64 {
    object
        .getattr(code_attribute)
        .and_then(|code| code.getattr("co_flags"))
        .and_then(|flags| flags.extract())
        .unwrap_or(0)
}

/// Whether calling `function` makes an object that is metered by its steps (a coroutine,
/// generator or async generator function).
pub fn makes_steps(function: &Bound<'_, PyAny>) -> bool {
    kind_made_by(function).is_some()
}

/// The kind of object calling `function` makes, if it is a coroutine, generator or async
/// generator function.
pub fn kind_made_by(function: &Bound<'_, PyAny>) -> Option<Kind> {
    // SAFETY: a type check of a live object.
    if unsafe { ffi::PyFunction_Check(function.as_ptr()) } == 0 {
        return None;
    }
    let flags = code_flags(function, "__code__");
    if flags & CO_ASYNC_GENERATOR != 0 {
        Some(Kind::AsyncGenerator)
    } else if flags & CO_COROUTINE != 0 {
        Some(Kind::Coroutine)
    } else if flags & CO_ITERABLE_COROUTINE != 0 {
        Some(Kind::IterableCoroutine)
    } else if flags & CO_GENERATOR != 0 {
        Some(Kind::Generator)
    } else {
        None
    }
}

/// What kind of steppable object `result` is, if any. A plain awaitable (neither a
/// coroutine nor a generator) gets the once-per-meter warning.
///
/// # Safety
/// `result` is a live object and the GIL is held.
#[inline(always)]
pub unsafe fn kind_of(core: &MeterCore, result: *mut ffi::PyObject) -> Option<Kind> {
    // SAFETY: type checks of a live object.
    unsafe {
        // Most results (numbers, strings, containers, None) are not asynchronous at all:
        // coroutines, generators (am_send), async generators and awaitables all are.
        if (*ffi::Py_TYPE(result)).tp_as_async.is_null() {
            return None;
        }
        kind_of_asynchronous(core, result)
    }
}

#[cold]
#[inline(never)]
unsafe fn kind_of_asynchronous(core: &MeterCore, result: *mut ffi::PyObject) -> Option<Kind> {
    // SAFETY: type checks of a live object (guaranteed by the caller).
    unsafe {
        if ffi::PyCoro_CheckExact(result) != 0 {
            return Some(Kind::Coroutine);
        }
        if ffi::PyGen_CheckExact(result) != 0 {
            return Some(generator_kind(result));
        }
        if ffi::PyAsyncGen_CheckExact(result) != 0 {
            return Some(Kind::AsyncGenerator);
        }
        let awaitable = (*ffi::Py_TYPE(result)).tp_as_async;
        if !awaitable.is_null() && (*awaitable).am_await.is_some() {
            warn_awaitable(core, result);
        }
    }
    None
}

#[cold]
unsafe fn generator_kind(generator: *mut ffi::PyObject) -> Kind {
    // SAFETY: guaranteed by the caller.
    let generator = unsafe { Bound::from_borrowed_ptr(Python::assume_attached(), generator) };
    if code_flags(&generator, "gi_code") & CO_ITERABLE_COROUTINE != 0 {
        Kind::IterableCoroutine
    } else {
        Kind::Generator
    }
}

#[cold]
unsafe fn warn_awaitable(core: &MeterCore, result: *mut ffi::PyObject) {
    if !core.first_awaitable_warning() {
        return;
    }
    // SAFETY: guaranteed by the caller.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: as above.
    let result = unsafe { Bound::from_borrowed_ptr(py, result) };
    let type_name = result
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_default();
    let message = format!(
        "meterage: {:?} returned an awaitable ({type_name}), not a coroutine: only the call \
         that created it is timed, not the work awaited; meter the coroutine function that \
         does the work instead",
        core.operation_name()
    );
    // The warning must not change the call: under an "error" filter it is dropped.
    let warned = PyErr::warn(
        py,
        &py.get_type::<PyRuntimeWarning>(),
        &std::ffi::CString::new(message).unwrap_or_default(),
        1,
    );
    drop(warned);
}

/// `result` (a steppable object of `kind`, whose reference this takes) wrapped in its
/// driver; null with an exception set if that fails.
///
/// # Safety
/// `core` is the data of a live `Arc<MeterCore>` (a wrapper's), `result` a new reference
/// to a live object of `kind`, and the GIL is held.
#[cold]
pub unsafe fn drive(
    core: &MeterCore,
    result: *mut ffi::PyObject,
    kind: Kind,
) -> *mut ffi::PyObject {
    // SAFETY: guaranteed by the caller.
    unsafe { drive_with(core, result, kind, std::ptr::null_mut()) }
}

/// As [`drive`], through `driver` (a function's own, named like it) when it is not null
/// and of the result's kind.
///
/// # Safety
/// As for [`drive`]; `driver` is null or a live object.
pub unsafe fn drive_with(
    core: &MeterCore,
    result: *mut ffi::PyObject,
    kind: Kind,
    driver: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: guaranteed by the caller.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: as above: the reference is ours to hand on.
    let result = unsafe { Bound::from_owned_ptr(py, result) };
    let driven = || -> PyResult<Bound<'_, PyAny>> {
        let Some(drivers) = DRIVERS.get(py) else {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "meterage._decorate did not register its drivers",
            ));
        };
        let core = core as *const MeterCore;
        // SAFETY: guaranteed by the caller: one more reference to the wrapper's Arc.
        let core = unsafe {
            Arc::increment_strong_count(core);
            Arc::from_raw(core)
        };
        let generic = match kind {
            Kind::Coroutine => &drivers.coroutine,
            Kind::IterableCoroutine => &drivers.iterable_coroutine,
            Kind::AsyncGenerator => &drivers.async_generator,
            Kind::Generator => &drivers.generator,
        };
        let driver = if driver.is_null() {
            generic.bind(py).clone()
        } else {
            // SAFETY: a live object held by the wrapper for the call's length.
            unsafe { Bound::from_borrowed_ptr(py, driver) }
        };
        match kind {
            Kind::AsyncGenerator => {
                let call = Py::new(py, OpenCall::new(core))?;
                driver.call1((call, result))
            }
            _ => {
                let steps = Py::new(py, Steps::owning(core, &result)?)?;
                driver.call1((steps,))
            }
        }
    };
    match driven() {
        Ok(driven) => driven.into_ptr(),
        Err(error) => {
            error.restore(py);
            std::ptr::null_mut()
        }
    }
}
