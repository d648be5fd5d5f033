//! `Call`: the call of one `with` or `async with` block of a meter, which the block owns.
//!
//! The interpreter looks a context manager's `__enter__` and `__exit__` up (binding them)
//! before it calls `__enter__`, and keeps what the lookups gave until the block ends.
//! meterage's four methods are descriptors ([`BlockMethod`]): the first lookup makes the
//! block's `Call` and the second takes the same object, so the block holds its call as
//! both its `__enter__` and its `__exit__`. The block's end then ends exactly that call,
//! whatever ran in between: its generator resumed in another thread or context, an async
//! generator stepped by a new task per step, other blocks of the same meter ending in
//! another order. One object per block, no bound-method objects, and calls by vectorcall.
//!
//! The two lookups of one block run back to back, with the GIL held and no Python code in
//! between, so one process-wide slot ([`PENDING`]) passes the call from the first lookup
//! to the second. A call entered in any other way (`ExitStack.enter_context(meter)` looks
//! the methods up on the class; a direct `meter.__enter__()`) falls back to a stack of the
//! meter's calls per context (a ContextVar), ended by the meter's `__exit__`.

use super::convert::{attribute_key, attribute_pairs, attribute_value, attributes_to_dict, Pairs};
use super::guard::{panic_if_asked, quietly};
use super::meter::{error_type_name, PyMeterCore};
use super::spans;
use crate::aggregate::call::{CallStart, MeterCore};
use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{c_int, c_void};
use std::mem::offset_of;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;

/// Where a block's call is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Made by a lookup of one of the block's two methods (`enter` says which).
    LookedUp {
        enter: bool,
    },
    /// Both methods looked up: a `with` statement's call, not entered yet.
    Bound,
    /// Entered by its `with` statement: its own exit ends it.
    Entered,
    /// Entered another way: on the meter's stack of calls in this context.
    EnteredOnStack,
    Ended,
}

struct CallState {
    core: Arc<MeterCore>,
    /// The meter (a strong reference): its stack, for calls entered another way.
    meter: *mut ffi::PyObject,
    /// For a call on the meter's stack: the call below it (a strong reference, or null).
    below: *mut ffi::PyObject,
    start: Option<CallStart>,
    dynamic: Pairs,
    stage: Stage,
    /// Whether this is an `async with` block's call (its exit is awaited).
    asynchronous: bool,
    /// Set while attributes are converted (Python code may run and re-enter).
    updating: bool,
}

#[repr(C)]
struct CallObject {
    ob_base: ffi::PyObject,
    vectorcall: Option<ffi::vectorcallfunc>,
    state: CallState,
}

/// `__enter__`, `__exit__`, `__aenter__` or `__aexit__` of meters.
#[repr(C)]
struct BlockMethodObject {
    ob_base: ffi::PyObject,
    vectorcall: Option<ffi::vectorcallfunc>,
    enter: bool,
    asynchronous: bool,
}

static CALL_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(ptr::null_mut());
static METHOD_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(ptr::null_mut());
static METER_TYPE: AtomicPtr<ffi::PyTypeObject> = AtomicPtr::new(ptr::null_mut());
/// What an `async with` block's exit returns: awaiting it gives False.
static DONE: AtomicPtr<ffi::PyObject> = AtomicPtr::new(ptr::null_mut());

/// The call made by the first of a block's two lookups, for the second. Only touched with
/// the GIL held, so relaxed atomics are enough; the thread is checked all the same.
struct Pending {
    thread: AtomicUsize,
    meter: AtomicUsize,
    call: AtomicPtr<ffi::PyObject>,
}

static PENDING: Pending = Pending {
    thread: AtomicUsize::new(0),
    meter: AtomicUsize::new(0),
    call: AtomicPtr::new(ptr::null_mut()),
};

fn this_thread() -> usize {
    // SAFETY: pthread_self has no preconditions (and reads a register: no TLS lookup).
    unsafe { libc::pthread_self() as usize }
}

/// # Safety
/// `call` is a live `Call`.
#[inline(always)]
unsafe fn state<'a>(call: *mut ffi::PyObject) -> &'a mut CallState {
    // SAFETY: guaranteed by the caller; the GIL serialises every use.
    unsafe { &mut (*(call as *mut CallObject)).state }
}

fn set_error(kind: *mut ffi::PyObject, message: &std::ffi::CStr) -> *mut ffi::PyObject {
    // SAFETY: the GIL is held by every caller; both pointers are valid.
    unsafe { ffi::PyErr_SetString(kind, message.as_ptr()) };
    ptr::null_mut()
}

/// A new block call of `meter` (a PyMeterCore), null with an exception set on failure.
///
/// # Safety
/// `meter` is a live PyMeterCore and the GIL is held.
unsafe fn new_call(
    meter: *mut ffi::PyObject,
    stage: Stage,
    asynchronous: bool,
) -> *mut ffi::PyObject {
    let call_type = CALL_TYPE.load(Ordering::Relaxed);
    // SAFETY: guaranteed by the caller; the object is fully initialised below before use.
    unsafe {
        let py = Python::assume_attached();
        let meter_object = Bound::from_borrowed_ptr(py, meter);
        let core = Arc::clone(&meter_object.cast_unchecked::<PyMeterCore>().get().core);
        let object = ffi::PyObject_Malloc(std::mem::size_of::<CallObject>()) as *mut ffi::PyObject;
        if object.is_null() {
            return ffi::PyErr_NoMemory();
        }
        ffi::PyObject_Init(object, call_type);
        let this = object as *mut CallObject;
        ptr::addr_of_mut!((*this).vectorcall).write(Some(call_vectorcall));
        ffi::Py_INCREF(meter);
        ptr::addr_of_mut!((*this).state).write(CallState {
            core,
            meter,
            below: ptr::null_mut(),
            start: None,
            dynamic: Vec::new(),
            stage,
            asynchronous,
            updating: false,
        });
        object
    }
}

/// A lookup of a block method on `meter`: the second lookup of a block takes the call
/// the first made; anything else makes a new call and leaves it for a second lookup.
///
/// # Safety
/// `meter` is a live PyMeterCore and the GIL is held.
unsafe fn look_up(
    meter: *mut ffi::PyObject,
    enter: bool,
    asynchronous: bool,
) -> *mut ffi::PyObject {
    let pending = PENDING.call.swap(ptr::null_mut(), Ordering::Relaxed);
    if !pending.is_null() {
        let same_block = PENDING.meter.load(Ordering::Relaxed) == meter as usize
            && PENDING.thread.load(Ordering::Relaxed) == this_thread()
            // SAFETY: the slot holds a strong reference to a live Call.
            && unsafe { state(pending) }.stage == Stage::LookedUp { enter: !enter }
            // Held by the first lookup's caller as well as the slot: a with statement's.
            // SAFETY: as above.
            && unsafe { ffi::Py_REFCNT(pending) } > 1;
        if same_block {
            // SAFETY: as above; the slot's reference goes to our caller.
            unsafe { state(pending) }.stage = Stage::Bound;
            return pending;
        }
        // SAFETY: the slot's strong reference, no longer wanted.
        unsafe { ffi::Py_DECREF(pending) };
    }
    // SAFETY: guaranteed by the caller.
    let call = unsafe { new_call(meter, Stage::LookedUp { enter }, asynchronous) };
    if !call.is_null() {
        // SAFETY: one reference for the slot, one for the caller.
        unsafe { ffi::Py_INCREF(call) };
        PENDING.thread.store(this_thread(), Ordering::Relaxed);
        PENDING.meter.store(meter as usize, Ordering::Relaxed);
        PENDING.call.store(call, Ordering::Relaxed);
    }
    call
}

/// Drops the slot's call if it is `call` (a call entered or ended in another way).
fn forget_pending(call: *mut ffi::PyObject) {
    if PENDING
        .call
        .compare_exchange(call, ptr::null_mut(), Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        // SAFETY: the slot's strong reference (the caller holds another).
        unsafe { ffi::Py_DECREF(call) };
    }
}

/// Starts `call`; returns it (a new reference) or null with an exception set.
///
/// # Safety
/// `call` is a live Call and the GIL is held.
unsafe fn enter(call: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: guaranteed by the caller.
    let this = unsafe { state(call) };
    match this.stage {
        Stage::Bound => this.stage = Stage::Entered,
        Stage::LookedUp { .. } => {
            // Not a with statement's call (only one method was looked up): it goes on the
            // meter's stack, for the meter's exit.
            forget_pending(call);
            // SAFETY: a live meter; the GIL is held.
            if unsafe { push(this.meter, call) } < 0 {
                return ptr::null_mut();
            }
            this.stage = Stage::EnteredOnStack;
        }
        Stage::Entered | Stage::EnteredOnStack | Stage::Ended => {
            return set_error(
                // SAFETY: a static exception type.
                unsafe { ffi::PyExc_RuntimeError },
                c"this meter's call was entered already",
            );
        }
    }
    // Last, so that none of meterage's own work is timed.
    this.start = Some(this.core.begin());
    // SAFETY: a new reference to a live object.
    unsafe { ffi::Py_INCREF(call) };
    call
}

/// Ends an entered call and records it (`exception_type`: what ended the block, or null or
/// None).
///
/// # Safety
/// `call` is a live Call and the GIL is held.
unsafe fn finish(call: *mut ffi::PyObject, exception_type: *mut ffi::PyObject) -> PyResult<()> {
    // SAFETY: guaranteed by the caller.
    let this = unsafe { state(call) };
    if this.updating {
        return Err(PyRuntimeError::new_err(
            "this metered call is already being updated",
        ));
    }
    let Some(start) = this.start.take() else {
        return Err(PyRuntimeError::new_err(
            "this meter's call has already ended",
        ));
    };
    this.stage = Stage::Ended;
    let Some(measured) = this.core.stop(start) else {
        return Ok(()); // entered before this process was forked: the parent's call
    };
    // SAFETY: the GIL is held.
    let py = unsafe { Python::assume_attached() };
    let exception_type = (!exception_type.is_null())
        // SAFETY: a live object passed by the interpreter.
        .then(|| unsafe { Bound::from_borrowed_ptr(py, exception_type) });
    let error_type = error_type_name(exception_type.as_ref())?;
    quietly(|| {
        panic_if_asked();
        let series = this.core.series_for(&this.dynamic, error_type.as_deref());
        // Recorded first: a series' first record of an epoch clears its exemplars.
        this.core.record(&measured, &series);
        spans::note(&measured, &series);
    });
    Ok(())
}

/// What a block's exit returns: False (exceptions are never suppressed), awaitable for an
/// `async with` block.
fn exit_result(asynchronous: bool) -> *mut ffi::PyObject {
    let result = if asynchronous {
        DONE.load(Ordering::Relaxed)
    } else {
        // SAFETY: the False singleton.
        unsafe { ffi::Py_False() }
    };
    // SAFETY: a new reference to a live object.
    unsafe { ffi::Py_INCREF(result) };
    result
}

fn restore(error: PyErr) -> *mut ffi::PyObject {
    // SAFETY: the GIL is held by every caller.
    error.restore(unsafe { Python::assume_attached() });
    ptr::null_mut()
}

/// Ends a block: its own call if its with statement entered it, else the meter's latest
/// call in this context.
///
/// # Safety
/// `call` is a live Call and the GIL is held.
unsafe fn exit(call: *mut ffi::PyObject, exception_type: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: guaranteed by the caller.
    let this = unsafe { state(call) };
    let asynchronous = this.asynchronous;
    let ended = match this.stage {
        // SAFETY: as above.
        Stage::Entered => unsafe { finish(call, exception_type) },
        Stage::Ended => Err(PyRuntimeError::new_err(
            "this meter's call has already ended",
        )),
        _ => {
            forget_pending(call);
            let meter = this.meter;
            // SAFETY: a live meter (this call holds a reference).
            unsafe { pop(meter, exception_type) }
        }
    };
    match ended {
        Ok(()) => exit_result(asynchronous),
        Err(error) => restore(error),
    }
}

/// Puts `call` on top of `meter`'s stack in this context. 0, or -1 with an exception set.
///
/// # Safety
/// Both are live (a PyMeterCore and a Call) and the GIL is held.
unsafe fn push(meter: *mut ffi::PyObject, call: *mut ffi::PyObject) -> c_int {
    // SAFETY: guaranteed by the caller.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: as above.
    let meter = unsafe { Bound::from_borrowed_ptr(py, meter) };
    // SAFETY: the caller passes a PyMeterCore.
    let core = unsafe { meter.cast_unchecked::<PyMeterCore>() };
    let var = match core.get().stack(py) {
        Ok(var) => var.as_ptr(),
        Err(error) => {
            error.restore(py);
            return -1;
        }
    };
    let mut below: *mut ffi::PyObject = ptr::null_mut();
    // SAFETY: a ContextVar; with a null default a missing value leaves `below` null.
    unsafe {
        if ffi::PyContextVar_Get(var, ptr::null_mut(), &mut below) < 0 {
            return -1;
        }
        if below == ffi::Py_None() {
            ffi::Py_DECREF(below);
            below = ptr::null_mut();
        }
        let token = ffi::PyContextVar_Set(var, call);
        if token.is_null() {
            if !below.is_null() {
                ffi::Py_DECREF(below);
            }
            return -1;
        }
        ffi::Py_DECREF(token);
        // The stack keeps the call below (a new reference from PyContextVar_Get).
        state(call).below = below;
    }
    0
}

/// Ends the top call of `meter`'s stack in this context.
///
/// # Safety
/// `meter` is a live PyMeterCore and the GIL is held.
unsafe fn pop(meter: *mut ffi::PyObject, exception_type: *mut ffi::PyObject) -> PyResult<()> {
    // SAFETY: guaranteed by the caller.
    let py = unsafe { Python::assume_attached() };
    let unmatched =
        || PyRuntimeError::new_err("meter exited without a matching __enter__ in this context");
    // SAFETY: as above.
    let meter = unsafe { Bound::from_borrowed_ptr(py, meter) };
    // SAFETY: the caller passes a PyMeterCore.
    let core = unsafe { meter.cast_unchecked::<PyMeterCore>() };
    let Some(var) = core.get().existing_stack(py) else {
        return Err(unmatched());
    };
    let mut top: *mut ffi::PyObject = ptr::null_mut();
    // SAFETY: a ContextVar and a valid out-pointer.
    if unsafe { ffi::PyContextVar_Get(var.as_ptr(), ptr::null_mut(), &mut top) } < 0 {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference (or null).
    let top = unsafe { Bound::from_owned_ptr_or_opt(py, top) };
    let Some(top) = top.filter(|top| is_call(top.as_ptr())) else {
        return Err(unmatched());
    };
    // SAFETY: a live Call (checked above).
    let below = std::mem::replace(&mut unsafe { state(top.as_ptr()) }.below, ptr::null_mut());
    let below = if below.is_null() {
        py.None()
    } else {
        // SAFETY: the reference the call held.
        unsafe { Bound::from_owned_ptr(py, below).unbind() }
    };
    // SAFETY: a ContextVar and a live object; the token is not needed.
    unsafe {
        let token = ffi::PyContextVar_Set(var.as_ptr(), below.as_ptr());
        if token.is_null() {
            return Err(PyErr::fetch(py));
        }
        ffi::Py_DECREF(token);
        finish(top.as_ptr(), exception_type)
    }
}

fn is_call(object: *mut ffi::PyObject) -> bool {
    // SAFETY: reading the type of a live object.
    unsafe { ffi::Py_TYPE(object) == CALL_TYPE.load(Ordering::Relaxed) }
}

/// A call's own vectorcall: no arguments enters it (as `__enter__`/`__aenter__`), up to
/// three (the exception type, value and traceback) end it.
unsafe extern "C" fn call_vectorcall(
    call: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter passes a live Call and its arguments, with the GIL.
    unsafe {
        let nargs = ffi::PyVectorcall_NARGS(nargsf);
        if !kwnames.is_null() && ffi::PyTuple_GET_SIZE(kwnames) > 0 {
            return set_error(
                ffi::PyExc_TypeError,
                c"a meter's call takes no keyword arguments",
            );
        }
        match nargs {
            0 => enter(call),
            1..=3 => exit(call, *args),
            _ => set_error(
                ffi::PyExc_TypeError,
                c"a meter's call is entered with no arguments and exited with (exception_type, exception, traceback)",
            ),
        }
    }
}

unsafe extern "C" fn call_dealloc(object: *mut ffi::PyObject) {
    // SAFETY: the interpreter deallocates a live Call once, with the GIL.
    unsafe {
        let this = object as *mut CallObject;
        let state = ptr::addr_of_mut!((*this).state);
        if let Some(start) = (*state).start.take() {
            // A call never ended (its block was dropped without running its exit).
            (*state).core.abandon(start);
        }
        ffi::Py_DECREF((*state).meter);
        if !(*state).below.is_null() {
            ffi::Py_DECREF((*state).below);
        }
        ptr::drop_in_place(state);
        let owner = ffi::Py_TYPE(object);
        ffi::PyObject_Free(object.cast());
        ffi::Py_DECREF(owner.cast());
    }
}

/// `await call` (for `async with meter as call`) gives the call itself.
unsafe extern "C" fn call_await(call: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: a live object: its own iterator.
    unsafe { ffi::Py_INCREF(call) };
    call
}

unsafe extern "C" fn call_next(call: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: a live object as StopIteration's value.
    unsafe { ffi::PyErr_SetObject(ffi::PyExc_StopIteration, call) };
    ptr::null_mut()
}

unsafe extern "C" fn call_repr(call: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: a live Call.
    let this = unsafe { state(call) };
    let text = format!(
        "<meterage call of {:?} ({:?})>",
        this.core.operation_name(),
        this.stage
    );
    // SAFETY: a valid UTF-8 buffer of this length.
    unsafe { ffi::PyUnicode_FromStringAndSize(text.as_ptr().cast(), text.len() as ffi::Py_ssize_t) }
}

/// Runs `update` on the call's dynamic attributes, converting with Python code first
/// (which may re-enter the call: its exit then refuses while `updating` is set).
///
/// # Safety
/// `call` is a live Call and the GIL is held.
unsafe fn update(
    call: *mut ffi::PyObject,
    convert: impl FnOnce() -> PyResult<Pairs>,
) -> *mut ffi::PyObject {
    // SAFETY: guaranteed by the caller; no reference into the state is held across Python
    // code.
    unsafe {
        if state(call).updating {
            return restore(PyRuntimeError::new_err(
                "this metered call is already being updated",
            ));
        }
        state(call).updating = true;
        let converted = convert();
        state(call).updating = false;
        match converted {
            Ok(pairs) => {
                state(call).dynamic.extend(pairs);
                ffi::Py_INCREF(ffi::Py_None());
                ffi::Py_None()
            }
            Err(error) => restore(error),
        }
    }
}

unsafe extern "C" fn set_attribute(
    call: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if nargs != 2 {
        // SAFETY: a static exception type.
        return set_error(
            unsafe { ffi::PyExc_TypeError },
            c"set_attribute(key, value) takes 2 arguments",
        );
    }
    // SAFETY: the interpreter passes a live Call, two live arguments and the GIL.
    unsafe {
        let py = Python::assume_attached();
        let (key, value) = (
            Bound::from_borrowed_ptr(py, *args),
            Bound::from_borrowed_ptr(py, *args.add(1)),
        );
        update(call, || {
            let key = attribute_key(&key)?;
            let value = attribute_value(&key, &value)?;
            Ok(vec![(key, value)])
        })
    }
}

unsafe extern "C" fn set_attributes(
    call: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    if nargs != 1 {
        // SAFETY: a static exception type.
        return set_error(
            unsafe { ffi::PyExc_TypeError },
            c"set_attributes(attributes) takes 1 argument",
        );
    }
    // SAFETY: the interpreter passes a live Call, a live argument and the GIL.
    unsafe {
        let py = Python::assume_attached();
        let attributes = Bound::from_borrowed_ptr(py, *args);
        update(call, || attribute_pairs(Some(&attributes)))
    }
}

unsafe extern "C" fn get_attributes(
    call: *mut ffi::PyObject,
    _: *mut c_void,
) -> *mut ffi::PyObject {
    // SAFETY: a live Call and the GIL.
    unsafe {
        let py = Python::assume_attached();
        let this = state(call);
        let merged = this.core.attributes().merged(this.dynamic.iter().cloned());
        match attributes_to_dict(py, merged.iter()) {
            Ok(dict) => dict.into_ptr(),
            Err(error) => restore(error),
        }
    }
}

unsafe extern "C" fn get_operation(call: *mut ffi::PyObject, _: *mut c_void) -> *mut ffi::PyObject {
    // SAFETY: a live Call and the GIL.
    unsafe {
        let name = state(call).core.operation_name();
        ffi::PyUnicode_FromStringAndSize(name.as_ptr().cast(), name.len() as ffi::Py_ssize_t)
    }
}

unsafe extern "C" fn method_descr_get(
    method: *mut ffi::PyObject,
    instance: *mut ffi::PyObject,
    _owner: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter passes live objects and holds the GIL.
    unsafe {
        if instance.is_null() || instance == ffi::Py_None() {
            ffi::Py_INCREF(method);
            return method;
        }
        if ffi::PyObject_TypeCheck(instance, METER_TYPE.load(Ordering::Relaxed)) == 0 {
            return set_error(
                ffi::PyExc_TypeError,
                c"a meter's block methods bind to meters only",
            );
        }
        let this = &*(method as *const BlockMethodObject);
        look_up(instance, this.enter, this.asynchronous)
    }
}

/// A block method called on the class (`type(meter).__exit__(meter, *exc_info)`, as
/// `contextlib.ExitStack` does): the meter's stack in this context.
unsafe extern "C" fn method_vectorcall(
    method: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    _kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter passes a live method, its arguments and the GIL.
    unsafe {
        let this = &*(method as *const BlockMethodObject);
        let nargs = ffi::PyVectorcall_NARGS(nargsf);
        if nargs < 1 || ffi::PyObject_TypeCheck(*args, METER_TYPE.load(Ordering::Relaxed)) == 0 {
            return set_error(
                ffi::PyExc_TypeError,
                c"a meter's block method needs the meter as its first argument",
            );
        }
        let meter = *args;
        if this.enter {
            let call = new_call(meter, Stage::LookedUp { enter: true }, this.asynchronous);
            if call.is_null() {
                return call;
            }
            let entered = enter(call);
            ffi::Py_DECREF(call);
            return entered;
        }
        let exception_type = if nargs >= 2 {
            *args.add(1)
        } else {
            ptr::null_mut()
        };
        match pop(meter, exception_type) {
            Ok(()) => exit_result(this.asynchronous),
            Err(error) => restore(error),
        }
    }
}

unsafe extern "C" fn done_await(done: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: a live object: its own iterator.
    unsafe { ffi::Py_INCREF(done) };
    done
}

unsafe extern "C" fn done_next(_: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the False singleton as StopIteration's value.
    unsafe { ffi::PyErr_SetObject(ffi::PyExc_StopIteration, ffi::Py_False()) };
    ptr::null_mut()
}

fn slot(slot: c_int, pfunc: *mut c_void) -> ffi::PyType_Slot {
    ffi::PyType_Slot { slot, pfunc }
}

fn make_type<'py>(
    py: Python<'py>,
    name: &'static std::ffi::CStr,
    basicsize: usize,
    vectorcall_offset: Option<usize>,
    mut slots: Vec<ffi::PyType_Slot>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut flags = ffi::Py_TPFLAGS_DEFAULT | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION;
    if let Some(offset) = vectorcall_offset {
        let members = Box::leak(Box::new([
            ffi::PyMemberDef {
                name: c"__vectorcalloffset__".as_ptr(),
                type_code: ffi::Py_T_PYSSIZET,
                offset: offset as ffi::Py_ssize_t,
                flags: ffi::Py_READONLY,
                doc: ptr::null(),
            },
            ffi::PyMemberDef::default(),
        ]));
        slots.push(slot(ffi::Py_tp_members, members.as_mut_ptr().cast()));
        slots.push(slot(ffi::Py_tp_call, ffi::PyVectorcall_Call as *mut c_void));
        flags |= ffi::Py_TPFLAGS_HAVE_VECTORCALL;
    }
    slots.push(slot(0, ptr::null_mut()));
    let spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: name.as_ptr(),
        basicsize: basicsize as c_int,
        itemsize: 0,
        flags: flags as _,
        slots: slots.leak().as_mut_ptr(),
    }));
    // SAFETY: the spec and everything it points to are leaked, so they outlive the type.
    unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpec(spec)) }
}

/// Creates the types, installs the four block methods on `meter_type` and returns the
/// `Call` type (module init).
pub fn install<'py>(
    py: Python<'py>,
    meter_type: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    METER_TYPE.store(meter_type.as_ptr().cast(), Ordering::Relaxed);
    let methods = Box::leak(Box::new([
        ffi::PyMethodDef {
            ml_name: c"set_attribute".as_ptr(),
            ml_meth: ffi::PyMethodDefPointer { PyCFunctionFast: set_attribute },
            ml_flags: ffi::METH_FASTCALL,
            ml_doc: c"set_attribute($self, key, value, /)\n--\n\nAdds an attribute to this call's series (before the call ends).".as_ptr(),
        },
        ffi::PyMethodDef {
            ml_name: c"set_attributes".as_ptr(),
            ml_meth: ffi::PyMethodDefPointer { PyCFunctionFast: set_attributes },
            ml_flags: ffi::METH_FASTCALL,
            ml_doc: c"set_attributes($self, attributes, /)\n--\n\nAdds several attributes (a mapping) to this call's series.".as_ptr(),
        },
        ffi::PyMethodDef::zeroed(),
    ]));
    let getset = Box::leak(Box::new([
        ffi::PyGetSetDef {
            name: c"attributes".as_ptr(),
            get: Some(get_attributes),
            set: None,
            doc: c"Static and dynamic attributes of this call so far.".as_ptr(),
            closure: ptr::null_mut(),
        },
        ffi::PyGetSetDef {
            name: c"operation".as_ptr(),
            get: Some(get_operation),
            set: None,
            doc: c"The operation name.".as_ptr(),
            closure: ptr::null_mut(),
        },
        ffi::PyGetSetDef::default(),
    ]));
    let call = make_type(
        py,
        c"meterage._native.Call",
        std::mem::size_of::<CallObject>(),
        Some(offset_of!(CallObject, vectorcall)),
        vec![
            slot(ffi::Py_tp_dealloc, call_dealloc as *mut c_void),
            slot(ffi::Py_tp_repr, call_repr as *mut c_void),
            slot(ffi::Py_tp_methods, methods.as_mut_ptr().cast()),
            slot(ffi::Py_tp_getset, getset.as_mut_ptr().cast()),
            slot(ffi::Py_am_await, call_await as *mut c_void),
            slot(ffi::Py_tp_iter, call_await as *mut c_void),
            slot(ffi::Py_tp_iternext, call_next as *mut c_void),
            slot(
                ffi::Py_tp_doc,
                c"One metered call of a with block: what `with meter as call` gets. Made by the block, not directly."
                    .as_ptr() as *mut c_void,
            ),
        ],
    )?;
    CALL_TYPE.store(call.as_ptr().cast(), Ordering::Relaxed);
    let method = make_type(
        py,
        c"meterage._native.BlockMethod",
        std::mem::size_of::<BlockMethodObject>(),
        Some(offset_of!(BlockMethodObject, vectorcall)),
        vec![
            slot(ffi::Py_tp_descr_get, method_descr_get as *mut c_void),
            slot(
                ffi::Py_tp_doc,
                c"__enter__, __exit__, __aenter__ or __aexit__ of meters (see meterage.meter)."
                    .as_ptr() as *mut c_void,
            ),
        ],
    )?;
    METHOD_TYPE.store(method.as_ptr().cast(), Ordering::Relaxed);
    let done = make_type(
        py,
        c"meterage._native.BlockDone",
        std::mem::size_of::<ffi::PyObject>(),
        None,
        vec![
            slot(ffi::Py_am_await, done_await as *mut c_void),
            slot(ffi::Py_tp_iter, done_await as *mut c_void),
            slot(ffi::Py_tp_iternext, done_next as *mut c_void),
        ],
    )?;
    // SAFETY: types made above; objects are fully initialised before they are published.
    unsafe {
        let done_object =
            ffi::PyObject_Malloc(std::mem::size_of::<ffi::PyObject>()) as *mut ffi::PyObject;
        if done_object.is_null() {
            return Err(PyErr::fetch(py));
        }
        ffi::PyObject_Init(done_object, done.as_ptr().cast());
        // Kept for the life of the process.
        DONE.store(done_object, Ordering::Relaxed);
        std::mem::forget(done);
        for (name, enter, asynchronous) in [
            (c"__enter__", true, false),
            (c"__exit__", false, false),
            (c"__aenter__", true, true),
            (c"__aexit__", false, true),
        ] {
            let object = ffi::PyObject_Malloc(std::mem::size_of::<BlockMethodObject>())
                as *mut ffi::PyObject;
            if object.is_null() {
                return Err(PyErr::fetch(py));
            }
            ffi::PyObject_Init(object, method.as_ptr().cast());
            let this = object as *mut BlockMethodObject;
            (*this).vectorcall = Some(method_vectorcall);
            (*this).enter = enter;
            (*this).asynchronous = asynchronous;
            let object = Bound::from_owned_ptr(py, object);
            if ffi::PyObject_SetAttrString(meter_type.as_ptr(), name.as_ptr(), object.as_ptr()) < 0
            {
                return Err(PyErr::fetch(py));
            }
        }
    }
    std::mem::forget(method);
    Ok(call)
}
