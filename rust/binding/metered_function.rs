//! `MeteredFunction`: the wrapper a decorated plain function becomes.
//!
//! Written against the C API rather than as a `#[pyclass]` because PyO3's `__call__`
//! goes through `tp_call` (an argument tuple and kwargs dict per call); this type
//! implements vectorcall and forwards the caller's argument vector untouched, so a
//! metered call costs the clock reads and one histogram record over the bare call.
//! It carries a `__dict__` (so `functools.update_wrapper` gives it the function's name,
//! doc, `__wrapped__` and signature), binds as a method like a function does, and is a
//! method descriptor so `obj.method(...)` skips creating a bound method.

use super::drivers;
use super::guard::{panic_if_asked, quietly, stack_has_room};
use super::spans;
use crate::aggregate::call::{Measured, MeterCore};
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
    /// For a coroutine, generator or async generator function: its driver, named like it
    /// (so the objects it makes carry the function's name); null for the generic ones.
    driver: *mut ffi::PyObject,
    /// 1 + the kind of object `driver` drives (a byte: the allocator zero-fills objects,
    /// and 0 means none).
    driver_kind: u8,
}

extern "C" {
    // The C API's bound methods; pyo3-ffi does not declare them.
    fn PyMethod_New(
        function: *mut ffi::PyObject,
        instance: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
    fn PyMethod_Function(method: *mut ffi::PyObject) -> *mut ffi::PyObject;
    fn PyMethod_Self(method: *mut ffi::PyObject) -> *mut ffi::PyObject;
    static mut PyMethod_Type: ffi::PyTypeObject;
}

/// `MeteredFunction`: wraps a Python function and binds as a method like one.
static FUNCTION_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(ptr::null_mut());
/// `MeteredCallable`: wraps any other callable (builtins, partials, callable objects,
/// descriptors such as `functools.lru_cache` wrappers), binding exactly as it does.
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
    // SAFETY: guaranteed by the caller.
    let this = unsafe { &*(callable as *const MeteredFunctionObject) };
    if this.function.is_null() || this.core.is_null() {
        // SAFETY: the GIL is held.
        unsafe {
            ffi::PyErr_SetString(
                ffi::PyExc_RuntimeError,
                c"this metered function was cleared by the garbage collector".as_ptr(),
            )
        };
        return None;
    }
    // SAFETY: a non-null core is an `Arc::into_raw` kept until dealloc.
    Some((this.function, unsafe { &*this.core }))
}

/// [`parts`], and room on the C stack for the call; `None` with a Python error set if not.
///
/// # Safety
/// As for [`parts`].
#[inline(always)]
unsafe fn checked_parts<'a>(
    callable: *mut ffi::PyObject,
) -> Option<(*mut ffi::PyObject, &'a MeterCore)> {
    // SAFETY: guaranteed by the caller.
    let parts = unsafe { parts(callable) }?;
    stack_has_room().then_some(parts)
}

/// The call path of a meter with probes.
unsafe extern "C" fn vectorcall(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls this slot with a live MeteredFunction and the GIL.
    let Some((function, core)) = (unsafe { checked_parts(callable) }) else {
        return ptr::null_mut();
    };
    // The coin first: a call that is not probed takes the timer's path (no room for probe
    // readings copied around), a probed one pays for its readings anyway.
    let Some(Some(weight)) = quietly(|| core.decide()) else {
        // SAFETY: as for this function.
        return unsafe { timed(core, function, args, nargsf, kwnames) };
    };
    let start = quietly(|| core.begin_probed(weight));
    // SAFETY: the caller's arguments, forwarded unchanged.
    let result = unsafe { ffi::PyObject_Vectorcall(function, args, nargsf, kwnames) };
    if let Some(start) = start {
        if let Some(stepped) = result_to_step(core, result) {
            quietly(|| core.abandon(start));
            return stepped;
        }
        if let Some(Some(measured)) = quietly(|| core.stop(start)) {
            // SAFETY: the GIL is held; `result` is the call's own result or null.
            unsafe { record(core, result, &measured) };
        }
    }
    result
}

/// The call path of a meter without probes: the clock around the call and one record.
unsafe extern "C" fn vectorcall_timer_only(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls this slot with a live MeteredFunction and the GIL.
    let Some((function, core)) = (unsafe { checked_parts(callable) }) else {
        return ptr::null_mut();
    };
    // SAFETY: as for this function.
    unsafe { timed(core, function, args, nargsf, kwnames) }
}

/// Calls `function` with the caller's arguments, timing it and recording it into `core`.
///
/// # Safety
/// The arguments are a vectorcall's, `function` is live and the GIL is held.
#[inline(always)]
unsafe fn timed(
    core: &MeterCore,
    function: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let start = core.begin_timer();
    // SAFETY: the caller's arguments, forwarded unchanged.
    let result = unsafe { ffi::PyObject_Vectorcall(function, args, nargsf, kwnames) };
    if let Some(stepped) = result_to_step(core, result) {
        quietly(|| core.abandon_timer(start));
        return stepped;
    }
    let Some(duration_ns) = core.stop_timer(start) else {
        return result;
    };
    if result.is_null() {
        let measured = Measured {
            duration_ns,
            sample: None,
        };
        // SAFETY: the GIL is held and the call's exception is set.
        unsafe { record_failure(core, &measured) };
    } else {
        quietly(|| {
            panic_if_asked();
            let series = core.series();
            series.record_current(duration_ns, None);
            spans::note_duration(duration_ns, series);
        });
    }
    result
}

/// The call path of a coroutine, generator or async generator function: the call only
/// makes the object (binding the arguments, so a wrong call raises right here), and the
/// object is metered step by step, like any such object a metered callable returns.
unsafe extern "C" fn vectorcall_stepped(
    callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls this slot with a live MeteredFunction and the GIL.
    let Some((function, core)) = (unsafe { parts(callable) }) else {
        return ptr::null_mut();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let result = unsafe { ffi::PyObject_Vectorcall(function, args, nargsf, kwnames) };
    if result.is_null() {
        return result;
    }
    // SAFETY: a live MeteredFunction (above) and a live result, with the GIL.
    unsafe {
        let this = &*(callable as *const MeteredFunctionObject);
        match drivers::kind_of(core, result) {
            Some(kind) if this.driver_kind == kind as u8 + 1 => {
                drivers::drive_with(core, result, kind, this.driver)
            }
            Some(kind) => drivers::drive(core, result, kind),
            None => result,
        }
    }
}

/// A coroutine, generator or async generator that a metered call returned, wrapped so that
/// its steps are metered (the call itself only made it); None for any other result. Other
/// awaitables get a warning, once per meter: only their creation is timed.
#[inline(always)]
fn result_to_step(core: &MeterCore, result: *mut ffi::PyObject) -> Option<*mut ffi::PyObject> {
    if result.is_null() {
        return None;
    }
    // SAFETY: `result` is a live object and the GIL is held.
    let kind = unsafe { drivers::kind_of(core, result) }?;
    // SAFETY: as above; `core` is a wrapper's Arc; takes over the reference to `result`.
    Some(unsafe { drivers::drive(core, result, kind) })
}

/// Records a finished call: into the meter's series, or under its exception's class.
///
/// # Safety
/// The GIL is held; an exception is set exactly when `result` is null.
#[inline(always)]
unsafe fn record(core: &MeterCore, result: *mut ffi::PyObject, measured: &Measured) {
    if result.is_null() {
        // SAFETY: guaranteed by the caller.
        unsafe { record_failure(core, measured) };
    } else {
        quietly(|| {
            panic_if_asked();
            // Recorded first: a series' first record of an epoch clears its exemplars.
            core.record(measured, core.series());
            spans::note(measured, core.series());
        });
    }
}

/// Records a failed call under `error.type` = the exception's class `__qualname__`. The
/// exception is taken while meterage looks at it and put back as the same object with the
/// same traceback.
///
/// # Safety
/// The GIL is held and an exception is set.
#[cold]
unsafe fn record_failure(core: &MeterCore, measured: &Measured) {
    // SAFETY: guaranteed by the caller.
    let py = unsafe { Python::assume_attached() };
    let error = PyErr::take(py);
    quietly(|| {
        panic_if_asked();
        let series = match &error {
            Some(error) => {
                let class_name = error
                    .get_type(py)
                    .qualname()
                    .map(|name| name.to_string())
                    .unwrap_or_else(|_| "Exception".to_owned());
                core.series_for(&[], Some(&class_name))
            }
            None => core.series_for(&[], None),
        };
        core.record(measured, &series);
        spans::note(measured, &series);
    });
    if let Some(error) = error {
        error.restore(py);
    }
}

/// Binding a wrapped Python function as a method: like a function does.
unsafe extern "C" fn descr_get(
    function: *mut ffi::PyObject,
    instance: *mut ffi::PyObject,
    _owner: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the None singleton is always alive.
    if instance.is_null() || instance == unsafe { ffi::Py_None() } {
        // SAFETY: a live object, returned as a new reference.
        unsafe { ffi::Py_INCREF(function) };
        return function;
    }
    // SAFETY: both objects are alive and the GIL is held.
    unsafe { PyMethod_New(function, instance) }
}

/// Binding any other wrapped callable: exactly as the callable binds itself. One that is
/// a descriptor (an `lru_cache` wrapper, a method descriptor, another metered function)
/// gives its bound form, which is metered by a new wrapper with the same meter; one that
/// is not (a builtin, a callable object) is returned as is, as it would be unwrapped.
unsafe extern "C" fn callable_descr_get(
    wrapper: *mut ffi::PyObject,
    instance: *mut ffi::PyObject,
    owner: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter passes a live wrapper and holds the GIL.
    let this = unsafe { &*(wrapper as *const MeteredFunctionObject) };
    let inner = this.function;
    let get = if inner.is_null() {
        None
    } else {
        // SAFETY: `inner` is a live object; its type's slot is read, not written.
        unsafe { (*ffi::Py_TYPE(inner)).tp_descr_get }
    };
    let Some(get) = get else {
        // SAFETY: a live object, returned as a new reference.
        unsafe { ffi::Py_INCREF(wrapper) };
        return wrapper;
    };
    // SAFETY: the inner callable's own binding, with the arguments we were given.
    let bound = unsafe { get(inner, instance, owner) };
    if bound.is_null() || bound == inner {
        if bound == inner {
            // SAFETY: `bound` is a new reference to `inner`; the wrapper stands for it.
            unsafe {
                ffi::Py_DECREF(bound);
                ffi::Py_INCREF(wrapper);
            }
            return wrapper;
        }
        return ptr::null_mut();
    }
    // A binding that puts the instance first (an lru_cache wrapper, a method descriptor,
    // another metered function) is the wrapper's own, as a bound method: with its
    // `__self__`, equal for equal accesses, weakly referable, signature without `self`.
    // SAFETY: type checks and field reads of a live object.
    let binds_first = unsafe {
        (ffi::Py_TYPE(bound) == std::ptr::addr_of_mut!(PyMethod_Type)
            && PyMethod_Function(bound) == inner
            && PyMethod_Self(bound) == instance)
            || (ffi::PyCFunction_Check(bound) != 0 && ffi::PyCFunction_GET_SELF(bound) == instance)
    };
    if binds_first {
        // SAFETY: `bound` is a new reference no longer needed; both objects are alive.
        unsafe {
            ffi::Py_DECREF(bound);
            return PyMethod_New(wrapper, instance);
        }
    }
    // SAFETY: `bound` is a new reference, handed to the new wrapper (or released). The
    // wrapper's core is a live `Arc` (its reference stays with the wrapper).
    unsafe {
        let py = Python::assume_attached();
        let bound = Bound::from_owned_ptr(py, bound);
        let (Some(call), false) = (this.vectorcall, this.core.is_null()) else {
            return ptr::null_mut();
        };
        let core = std::mem::ManuallyDrop::new(Arc::from_raw(this.core));
        match wrap_with(py, &core, &bound, call, true) {
            Ok(wrapped) => {
                // The bound form shares the wrapper's __dict__: its name, doc, `__wrapped__`.
                let made = &mut *(wrapped.as_ptr() as *mut MeteredFunctionObject);
                if !this.dict.is_null() {
                    ffi::Py_INCREF(this.dict);
                    made.dict = this.dict;
                }
                wrapped.into_ptr()
            }
            Err(error) => {
                error.restore(py);
                ptr::null_mut()
            }
        }
    }
}

/// Attributes the wrapper lacks are the wrapped callable's (an lru_cache wrapper's
/// `cache_info`, a function's `__globals__`): the wrapper stands for it.
unsafe extern "C" fn getattro(
    object: *mut ffi::PyObject,
    name: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter passes a live wrapper and name, with the GIL.
    unsafe {
        let found = ffi::PyObject_GenericGetAttr(object, name);
        if !found.is_null() || ffi::PyErr_ExceptionMatches(ffi::PyExc_AttributeError) == 0 {
            return found;
        }
        let inner = (*(object as *const MeteredFunctionObject)).function;
        if inner.is_null() {
            return found;
        }
        ffi::PyErr_Clear();
        ffi::PyObject_GetAttr(inner, name)
    }
}

unsafe extern "C" fn traverse(
    object: *mut ffi::PyObject,
    visit: ffi::visitproc,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: the collector passes a live object of this type.
    let this = unsafe { &*(object as *const MeteredFunctionObject) };
    // SAFETY: reading the type of a live object.
    let owner = unsafe { ffi::Py_TYPE(object) };
    for child in [this.function, this.dict, owner.cast()] {
        if !child.is_null() {
            // SAFETY: visiting live references, as the collector asks.
            let result = unsafe { visit(child, arg) };
            if result != 0 {
                return result;
            }
        }
    }
    0
}

unsafe extern "C" fn clear(object: *mut ffi::PyObject) -> c_int {
    // SAFETY: the collector (or dealloc) passes a live object of this type.
    let this = unsafe { &mut *(object as *mut MeteredFunctionObject) };
    for slot in [&mut this.function, &mut this.dict, &mut this.driver] {
        let old = std::mem::replace(slot, ptr::null_mut());
        if !old.is_null() {
            // SAFETY: the reference this object held.
            unsafe { ffi::Py_DECREF(old) };
        }
    }
    0
}

unsafe extern "C" fn dealloc(object: *mut ffi::PyObject) {
    // SAFETY: the interpreter deallocates a live object of this type, once, with the GIL.
    unsafe {
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
}

unsafe extern "C" fn repr(object: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the interpreter passes a live object and holds the GIL.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: as above.
    let this = unsafe { &*(object as *const MeteredFunctionObject) };
    let target = if this.function.is_null() {
        "<cleared>".to_owned()
    } else {
        // SAFETY: a live reference held by this object.
        unsafe { Bound::from_borrowed_ptr(py, this.function) }
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_default()
    };
    let operation = if this.core.is_null() {
        "<none>".to_owned()
    } else {
        // SAFETY: a non-null core lives until dealloc.
        format!("{:?}", unsafe { (*this.core).operation_name() })
    };
    let text = format!("<meterage.meter({operation}) of {target}>");
    // SAFETY: a valid UTF-8 buffer of this length.
    unsafe { ffi::PyUnicode_FromStringAndSize(text.as_ptr().cast(), text.len() as ffi::Py_ssize_t) }
}

/// Pickles by reference, like a module-level function (`module.qualname`).
unsafe extern "C" fn reduce(
    object: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: a live object and the GIL.
    unsafe { ffi::PyObject_GetAttrString(object, c"__qualname__".as_ptr()) }
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
    let doc = c"A callable metered by meterage: calls it and records what the call cost. Made by meterage.meter, not directly.";
    let mut slots = vec![
        slot(ffi::Py_tp_dealloc, dealloc as *mut c_void),
        slot(ffi::Py_tp_traverse, traverse as *mut c_void),
        slot(ffi::Py_tp_clear, clear as *mut c_void),
        slot(ffi::Py_tp_call, ffi::PyVectorcall_Call as *mut c_void),
        slot(ffi::Py_tp_repr, repr as *mut c_void),
        slot(ffi::Py_tp_getattro, getattro as *mut c_void),
        slot(ffi::Py_tp_members, members.as_mut_ptr().cast()),
        slot(ffi::Py_tp_methods, methods.as_mut_ptr().cast()),
        slot(ffi::Py_tp_getset, getset.as_mut_ptr().cast()),
        slot(ffi::Py_tp_doc, doc.as_ptr() as *mut c_void),
    ];
    // Only `meterage.meter` makes these: an instance without a function and a meter
    // would have nothing to call.
    let mut flags = ffi::Py_TPFLAGS_DEFAULT
        | ffi::Py_TPFLAGS_HAVE_GC
        | ffi::Py_TPFLAGS_HAVE_VECTORCALL
        | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION;
    if binds_as_method {
        slots.push(slot(ffi::Py_tp_descr_get, descr_get as *mut c_void));
        flags |= ffi::Py_TPFLAGS_METHOD_DESCRIPTOR;
    } else {
        slots.push(slot(
            ffi::Py_tp_descr_get,
            callable_descr_get as *mut c_void,
        ));
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

/// How a wrapper calls: what the wrapped callable is decides it, once, when it is wrapped.
fn call_path(core: &MeterCore, function: &Bound<'_, PyAny>) -> ffi::vectorcallfunc {
    if drivers::makes_steps(function) {
        vectorcall_stepped
    } else if core.probes().is_empty() {
        vectorcall_timer_only
    } else {
        vectorcall
    }
}

/// Wraps `function` so every call is metered by `core` (a coroutine, generator or async
/// generator function through `driver`, when given).
pub fn wrap<'py>(
    py: Python<'py>,
    core: &Arc<MeterCore>,
    function: &Bound<'py, PyAny>,
    driver: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    // Only Python functions bind `self` like a function; anything else binds as it does.
    // SAFETY: `function` is a live object.
    let is_function = unsafe { ffi::PyFunction_Check(function.as_ptr()) } != 0;
    let wrapped = wrap_with(py, core, function, call_path(core, function), !is_function)?;
    if let (Some(driver), Some(kind)) = (
        driver.filter(|driver| !driver.is_none()),
        drivers::kind_made_by(function),
    ) {
        // SAFETY: the wrapper was just made (its driver is null); the reference is its own.
        unsafe {
            let this = &mut *(wrapped.as_ptr() as *mut MeteredFunctionObject);
            this.driver = driver.clone().into_ptr();
            this.driver_kind = kind as u8 + 1;
        }
    }
    Ok(wrapped)
}

/// Wraps `function` in one of the wrapper types with this call implementation (also used
/// by the benchmark floor).
pub fn wrap_with<'py>(
    py: Python<'py>,
    core: &Arc<MeterCore>,
    function: &Bound<'py, PyAny>,
    call: ffi::vectorcallfunc,
    as_callable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let type_object = if as_callable {
        CALLABLE_TYPE.load(Ordering::Acquire)
    } else {
        FUNCTION_TYPE.load(Ordering::Acquire)
    };
    if type_object.is_null() {
        return Err(pyo3::exceptions::PyRuntimeError::new_err(
            "meterage._native was not initialised",
        ));
    }
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
