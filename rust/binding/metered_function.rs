//! `MeteredFunction`: the wrapper a decorated plain function becomes.
//!
//! Written against the C API rather than as a `#[pyclass]` because PyO3's `__call__`
//! goes through `tp_call` (an argument tuple and kwargs dict per call); this type
//! implements vectorcall and forwards the caller's argument vector untouched, so a
//! metered call costs the clock reads and one histogram record over the bare call.
//! It carries a `__dict__` (so `functools.update_wrapper` gives it the function's name,
//! doc, `__wrapped__` and signature), binds as a method like a function does, and is a
//! method descriptor so `obj.method(...)` skips creating a bound method.

use super::spans;
use crate::aggregate::call::{Measured, MeterCore};
use crate::probe::monotonic_ns;
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{c_int, c_void};
use std::mem::offset_of;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

#[repr(C)]
struct MeteredFunctionObject {
    ob_base: ffi::PyObject,
    vectorcall: Option<ffi::vectorcallfunc>,
    function: *mut ffi::PyObject,
    dict: *mut ffi::PyObject,
    weak_references: *mut ffi::PyObject,
    core: *const MeterCore,
}

extern "C" {
    // Part of the stable C API since 3.0; pyo3-ffi does not declare it.
    fn PyMethod_New(
        function: *mut ffi::PyObject,
        instance: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
}

/// `MeteredFunction`: wraps a Python function and binds as a method like one.
static FUNCTION_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(ptr::null_mut());
/// `MeteredCallable`: wraps any other callable (builtins, partials, callable objects,
/// classes), which do not bind `self`, so neither does the wrapper.
static CALLABLE_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(ptr::null_mut());

/// The wrapped function and the meter of a `MeteredFunction`, or `None` (with a Python
/// error set) if the garbage collector already cleared it.
///
/// # Safety
/// `callable` must be a live `MeteredFunction` and the GIL held.
#[inline]
pub unsafe fn parts<'a>(
    callable: *mut ffi::PyObject,
) -> Option<(*mut ffi::PyObject, &'a MeterCore)> {
    let this = &*(callable as *const MeteredFunctionObject);
    if this.function.is_null() {
        ffi::PyErr_SetString(
            ffi::PyExc_RuntimeError,
            c"this metered function was cleared by the garbage collector".as_ptr(),
        );
        return None;
    }
    Some((this.function, &*this.core))
}

unsafe extern "C" fn vectorcall(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let Some((function, core)) = parts(callable) else {
        return ptr::null_mut();
    };
    let start = core.begin();
    let result = ffi::PyObject_Vectorcall(function, args, nargsf, kwnames);
    record(core, result, &core.stop(start));
    result
}

/// Records a finished call: into the meter's series, or under its exception's class.
#[inline(always)]
unsafe fn record(core: &MeterCore, result: *mut ffi::PyObject, measured: &Measured) {
    if result.is_null() {
        record_failure(core, measured);
    } else {
        spans::note(measured, core.series());
        core.record(measured, core.series());
    }
}

/// The call path of a meter without probes: the clock around the call and one record.
unsafe extern "C" fn vectorcall_timer_only(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let Some((function, core)) = parts(callable) else {
        return ptr::null_mut();
    };
    let counted = core.enter_active();
    let started = monotonic_ns();
    let result = ffi::PyObject_Vectorcall(function, args, nargsf, kwnames);
    let duration_ns = monotonic_ns().saturating_sub(started);
    core.leave_active(counted);
    let measured = Measured {
        duration_ns,
        sample: None,
    };
    record(core, result, &measured);
    result
}

/// Records a failed call under `error.type` = the exception's class `__qualname__`. The
/// exception is taken while meterage looks at it and put back as the same object with the
/// same traceback.
#[cold]
unsafe fn record_failure(core: &MeterCore, measured: &Measured) {
    let py = Python::assume_attached();
    let error = PyErr::take(py);
    let series = match &error {
        Some(error) => {
            let class_name = error
                .get_type(py)
                .qualname()
                .map(|name| name.to_string())
                .unwrap_or_else(|_| "Exception".to_owned());
            core.error_series(&class_name)
        }
        None => core.series_for(&[], None),
    };
    spans::note(measured, &series);
    core.record(measured, &series);
    if let Some(error) = error {
        error.restore(py);
    }
}

unsafe extern "C" fn descr_get(
    function: *mut ffi::PyObject,
    instance: *mut ffi::PyObject,
    _owner: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    if instance.is_null() || instance == ffi::Py_None() {
        ffi::Py_INCREF(function);
        return function;
    }
    PyMethod_New(function, instance)
}

unsafe extern "C" fn traverse(
    object: *mut ffi::PyObject,
    visit: ffi::visitproc,
    arg: *mut c_void,
) -> c_int {
    let this = &*(object as *const MeteredFunctionObject);
    for child in [this.function, this.dict, ffi::Py_TYPE(object).cast()] {
        if !child.is_null() {
            let result = visit(child, arg);
            if result != 0 {
                return result;
            }
        }
    }
    0
}

unsafe extern "C" fn clear(object: *mut ffi::PyObject) -> c_int {
    let this = &mut *(object as *mut MeteredFunctionObject);
    for slot in [&mut this.function, &mut this.dict] {
        let old = std::mem::replace(slot, ptr::null_mut());
        if !old.is_null() {
            ffi::Py_DECREF(old);
        }
    }
    0
}

unsafe extern "C" fn dealloc(object: *mut ffi::PyObject) {
    ffi::PyObject_GC_UnTrack(object.cast());
    let this = &mut *(object as *mut MeteredFunctionObject);
    if !this.weak_references.is_null() {
        ffi::PyObject_ClearWeakRefs(object);
    }
    clear(object);
    if !this.core.is_null() {
        drop(Arc::from_raw(std::mem::replace(
            &mut this.core,
            ptr::null(),
        )));
    }
    let owner = ffi::Py_TYPE(object);
    let free = ffi::PyType_GetSlot(owner, ffi::Py_tp_free);
    let free: unsafe extern "C" fn(*mut c_void) = std::mem::transmute(free);
    free(object.cast());
    ffi::Py_DECREF(owner.cast());
}

unsafe extern "C" fn repr(object: *mut ffi::PyObject) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    let this = &*(object as *const MeteredFunctionObject);
    let target = if this.function.is_null() {
        "<cleared>".to_owned()
    } else {
        Bound::from_borrowed_ptr(py, this.function)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_default()
    };
    let text = format!(
        "<meterage.meter({:?}) of {target}>",
        (*this.core).operation_name()
    );
    ffi::PyUnicode_FromStringAndSize(text.as_ptr().cast(), text.len() as ffi::Py_ssize_t)
}

/// Pickles by reference, like a module-level function (`module.qualname`).
unsafe extern "C" fn reduce(
    object: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    ffi::PyObject_GetAttrString(object, c"__qualname__".as_ptr())
}

/// Creates both wrapper types once per process (module init): `MeteredFunction` and
/// `MeteredCallable`.
pub fn create_types(py: Python<'_>) -> PyResult<[Bound<'_, PyAny>; 2]> {
    let function = create_type(py, c"meterage._native.MeteredFunction", true)?;
    FUNCTION_TYPE.store(function.as_ptr().cast(), Ordering::Release);
    let callable = create_type(py, c"meterage._native.MeteredCallable", false)?;
    CALLABLE_TYPE.store(callable.as_ptr().cast(), Ordering::Release);
    Ok([function, callable])
}

fn create_type<'py>(
    py: Python<'py>,
    name: &'static std::ffi::CStr,
    binds_as_method: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let offset = |field: usize| field as ffi::Py_ssize_t;
    let members = Box::leak(Box::new([
        ffi::PyMemberDef {
            name: c"__vectorcalloffset__".as_ptr(),
            type_code: ffi::Py_T_PYSSIZET,
            offset: offset(offset_of!(MeteredFunctionObject, vectorcall)),
            flags: ffi::Py_READONLY,
            doc: ptr::null(),
        },
        ffi::PyMemberDef {
            name: c"__dictoffset__".as_ptr(),
            type_code: ffi::Py_T_PYSSIZET,
            offset: offset(offset_of!(MeteredFunctionObject, dict)),
            flags: ffi::Py_READONLY,
            doc: ptr::null(),
        },
        ffi::PyMemberDef {
            name: c"__weaklistoffset__".as_ptr(),
            type_code: ffi::Py_T_PYSSIZET,
            offset: offset(offset_of!(MeteredFunctionObject, weak_references)),
            flags: ffi::Py_READONLY,
            doc: ptr::null(),
        },
        ffi::PyMemberDef::default(),
    ]));
    let methods = Box::leak(Box::new([
        ffi::PyMethodDef {
            ml_name: c"__reduce__".as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunction: reduce,
            },
            ml_flags: ffi::METH_NOARGS,
            ml_doc: ptr::null(),
        },
        ffi::PyMethodDef::zeroed(),
    ]));
    let getset = Box::leak(Box::new([
        ffi::PyGetSetDef {
            name: c"__dict__".as_ptr(),
            get: Some(ffi::PyObject_GenericGetDict),
            set: Some(ffi::PyObject_GenericSetDict),
            doc: ptr::null(),
            closure: ptr::null_mut(),
        },
        ffi::PyGetSetDef::default(),
    ]));
    let slot = |slot: c_int, pfunc: *mut c_void| ffi::PyType_Slot { slot, pfunc };
    let doc = c"A callable metered by meterage: calls it and records what the call cost.";
    let mut slots = vec![
        slot(ffi::Py_tp_dealloc, dealloc as *mut c_void),
        slot(ffi::Py_tp_traverse, traverse as *mut c_void),
        slot(ffi::Py_tp_clear, clear as *mut c_void),
        slot(ffi::Py_tp_call, ffi::PyVectorcall_Call as *mut c_void),
        slot(ffi::Py_tp_repr, repr as *mut c_void),
        slot(ffi::Py_tp_members, members.as_mut_ptr().cast()),
        slot(ffi::Py_tp_methods, methods.as_mut_ptr().cast()),
        slot(ffi::Py_tp_getset, getset.as_mut_ptr().cast()),
        slot(ffi::Py_tp_doc, doc.as_ptr() as *mut c_void),
    ];
    let mut flags =
        ffi::Py_TPFLAGS_DEFAULT | ffi::Py_TPFLAGS_HAVE_GC | ffi::Py_TPFLAGS_HAVE_VECTORCALL;
    if binds_as_method {
        slots.push(slot(ffi::Py_tp_descr_get, descr_get as *mut c_void));
        flags |= ffi::Py_TPFLAGS_METHOD_DESCRIPTOR;
    }
    slots.push(slot(0, ptr::null_mut()));
    let slots = slots.leak();
    let spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: name.as_ptr(),
        basicsize: std::mem::size_of::<MeteredFunctionObject>() as c_int,
        itemsize: 0,
        flags: flags as _,
        slots: slots.as_mut_ptr(),
    }));
    // SAFETY: the spec and everything it points to are leaked, so they outlive the type.
    unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpec(spec)) }
}

/// Wraps `function` so every call is metered by `core`.
pub fn wrap<'py>(
    py: Python<'py>,
    core: &Arc<MeterCore>,
    function: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let call = if core.probes().is_empty() {
        vectorcall_timer_only
    } else {
        vectorcall
    };
    wrap_with(py, core, function, call)
}

/// Wraps `function` in this type with another call implementation (the benchmark floor).
pub fn wrap_with<'py>(
    py: Python<'py>,
    core: &Arc<MeterCore>,
    function: &Bound<'py, PyAny>,
    call: ffi::vectorcallfunc,
) -> PyResult<Bound<'py, PyAny>> {
    // Only Python functions bind `self` when stored on a class; a wrapper of anything
    // else must not either.
    // SAFETY: `function` is a live object.
    let is_function = unsafe { ffi::PyFunction_Check(function.as_ptr()) } != 0;
    let type_object = if is_function {
        FUNCTION_TYPE.load(Ordering::Acquire)
    } else {
        CALLABLE_TYPE.load(Ordering::Acquire)
    };
    assert!(!type_object.is_null(), "module init creates the types");
    // SAFETY: PyType_GenericAlloc zero-fills the object, counts a reference to the heap
    // type and starts GC tracking; traverse and clear accept the null fields meanwhile.
    unsafe {
        let object = ffi::PyType_GenericAlloc(type_object, 0);
        let object = Bound::from_owned_ptr_or_err(py, object)?;
        let this = &mut *(object.as_ptr() as *mut MeteredFunctionObject);
        this.vectorcall = Some(call);
        this.function = function.clone().into_ptr();
        this.core = Arc::into_raw(Arc::clone(core));
        Ok(object)
    }
}
