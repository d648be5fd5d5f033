//! Span attributes: what metered calls cost, set on the tracing span they ran in.
//!
//! Off (one relaxed load per call) until `meterage.otel` enables it for an SDK tracer
//! provider. On, each metered call ending inside an SDK span adds its measures to that
//! span's running totals here — a context-variable read, a dict lookup and a short locked
//! map update, no Python call — and the span processor moves the totals onto the span's
//! attributes when the span ends (`take`). Setting attributes through the SDK on every call
//! would cost microseconds; this costs well under 300 ns.
//!
//! The table holds spans weakly: an entry is keyed by the span's address and keeps a weak
//! reference to it (made on the span's first call, with a callback that drops the entry
//! when the span dies), and counts only while that reference still resolves to the span in
//! hand — a dead span's address reused by a new one is a new span. Spans that never end, or
//! end on a provider without meterage's processor, so cost a slot only while alive; when
//! more live spans than the table holds have totals, the oldest is evicted and remembered
//! as lost (it gets no totals rather than a partial count).
//!
//! The lock is never held while Python code can run (attribute reads, allocations that may
//! collect garbage, the release of a Python object): a finalizer or a weak-reference
//! callback may make a metered call or drop an entry at any of those points.

use crate::aggregate::call::Measured;
use crate::aggregate::exemplars::Exemplar;
use crate::aggregate::series::CallSeries;
use crate::probe::{measure, Combine, DURATION, MEASURES};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Live spans with totals waiting for their end; past this the oldest is evicted.
const MAX_PENDING_SPANS: usize = 8192;
/// Evicted spans still alive, remembered so that they get no totals rather than a partial
/// count; past this the oldest is forgotten.
const MAX_LOST_SPANS: usize = MAX_PENDING_SPANS;
/// A full table looks for dead entries (whose callback never came) at most once per this
/// many insertions, so that a table full of live spans costs O(1) per new span, not O(n).
const SWEEP_EVERY: u64 = (MAX_PENDING_SPANS / 8) as u64;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Where OpenTelemetry keeps the current span: a ContextVar holding a Context (a dict),
/// the key of the span in it, and the SDK span class.
struct Hook {
    context_var: Py<PyAny>,
    span_key: Py<PyAny>,
    span_type: Py<PyAny>,
}

static HOOK: OnceLock<Hook> = OnceLock::new();

#[derive(Default)]
struct Totals {
    calls: u64,
    probed: u64,
    duration_ns: u64,
    values: [u64; measure::COUNT],
    /// Bit i: some call had a value of measure i.
    present: u32,
}

impl Totals {
    fn add(&mut self, measured: &Measured) {
        self.calls += 1;
        self.duration_ns += measured.duration_ns;
        if let Some((delta, _)) = &measured.sample {
            self.probed += 1;
            for (index, info) in MEASURES.iter().enumerate() {
                if !delta.has(index) {
                    continue;
                }
                let value = delta.values[index];
                self.values[index] = match info.combine {
                    Combine::Sum => self.values[index].saturating_add(value),
                    // A level or a high-water mark of each call: the span's largest.
                    Combine::Last | Combine::Max => self.values[index].max(value),
                };
            }
            self.present |= delta.present;
        }
    }
}

/// A weak reference to a span, owned by the table.
struct Weak(Py<PyAny>);

impl Weak {
    /// Whether this still refers to `span`, a live object whose address keys this entry.
    /// The strong reference taken to look is released at once, which never runs code: the
    /// referent, if alive, is `span` (no other live object has its address), held here.
    fn refers_to(&self, span: &Bound<'_, PyAny>) -> bool {
        self.target(span.py()).is_some_and(|target| target.is(span))
    }

    /// Whether the referent has died. A live one is handed to `released` rather than let go
    /// here: its last other reference may be dropped meanwhile on a free-threaded build.
    fn is_dead(&self, py: Python<'_>, released: &mut Released) -> bool {
        match self.target(py) {
            Some(target) => {
                released.push(target.unbind());
                false
            }
            None => true,
        }
    }

    /// The referent while it is alive (a new reference).
    fn target<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        let mut target: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: `self.0` is a weakref object (made by `PyWeakref_NewRef`) and the thread
        // is attached (`py`); `target` comes back a new reference or null.
        unsafe {
            if ffi::compat::PyWeakref_GetRef(self.0.as_ptr(), &mut target) < 0 {
                ffi::PyErr_Clear();
                return None;
            }
            Bound::from_owned_ptr_or_opt(py, target)
        }
    }
}

struct Pending {
    weak: Weak,
    totals: Totals,
    /// (trace id, span id) when the span is sampled: read once per span, for exemplars.
    ids: Option<(u128, u64)>,
}

/// Hashes span addresses: a folded multiply of the address, much cheaper than SipHash and
/// spreading aligned addresses over both the low (bucket) and high (tag) bits.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_usize(&mut self, address: usize) {
        self.write_u64(address as u64);
    }

    fn write_u64(&mut self, value: u64) {
        let product = u128::from(self.0 ^ value) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map by span address that remembers insertion order, for evicting the oldest.
struct Fifo<V> {
    entries: HashMap<usize, (u64, V), BuildHasherDefault<AddressHasher>>,
    /// (address, insertion number), oldest first; pairs whose entry was removed or replaced
    /// since are skipped when popping and dropped when this grows to twice the entries.
    order: VecDeque<(usize, u64)>,
    inserted: u64,
}

impl<V> Fifo<V> {
    fn new() -> Self {
        Fifo {
            entries: HashMap::default(),
            order: VecDeque::new(),
            inserted: 0,
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, key: usize) -> Option<&V> {
        self.entries.get(&key).map(|(_, value)| value)
    }

    fn get_mut(&mut self, key: usize) -> Option<&mut V> {
        self.entries.get_mut(&key).map(|(_, value)| value)
    }

    fn remove(&mut self, key: usize) -> Option<V> {
        self.entries.remove(&key).map(|(_, value)| value)
    }

    /// Inserts (or replaces, returning the old value) as the newest entry.
    fn insert(&mut self, key: usize, value: V) -> Option<V> {
        if self.order.len() >= 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order
                .retain(|(key, number)| entries.get(key).is_some_and(|(n, _)| n == number));
        }
        self.inserted += 1;
        self.order.push_back((key, self.inserted));
        self.entries
            .insert(key, (self.inserted, value))
            .map(|(_, old)| old)
    }

    fn pop_oldest(&mut self) -> Option<(usize, V)> {
        while let Some((key, number)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|(n, _)| *n == number) {
                return self.remove(key).map(|value| (key, value));
            }
        }
        None
    }

    /// Removes the entries `dead` picks, handing them to `removed`.
    fn remove_where(&mut self, mut dead: impl FnMut(&V) -> bool, removed: &mut Vec<V>) {
        let keys: Vec<usize> = (self.entries.iter())
            .filter(|(_, (_, value))| dead(value))
            .map(|(key, _)| *key)
            .collect();
        removed.extend(keys.into_iter().filter_map(|key| self.remove(key)));
    }
}

struct Table {
    pending: Fifo<Pending>,
    lost: Fifo<Weak>,
    inserted_since_sweep: u64,
}

/// What the table knows of a span.
enum Known<'a> {
    Pending(&'a mut Pending),
    /// Evicted while alive: its totals are incomplete, so it gets none.
    Lost,
    Unknown,
}

/// Python objects taken out of the table, released once its lock is let go: releasing an
/// object can run code (a finalizer, a weak reference's callback) that may use the table.
type Released = Vec<Py<PyAny>>;

impl Table {
    fn find(&mut self, key: usize, span: &Bound<'_, PyAny>) -> Known<'_> {
        match self.pending.get_mut(key) {
            Some(entry) if entry.weak.refers_to(span) => Known::Pending(entry),
            _ if self.lost.get(key).is_some_and(|weak| weak.refers_to(span)) => Known::Lost,
            _ => Known::Unknown,
        }
    }

    /// Adds the first entry of a span (replacing a dead span's at the same address), making
    /// room when the table is full.
    fn insert(
        &mut self,
        py: Python<'_>,
        key: usize,
        entry: Pending,
        released: &mut Released,
    ) -> &mut Pending {
        if self.pending.get(key).is_none() {
            while self.pending.len() >= MAX_PENDING_SPANS && self.make_room(py, released) {}
        }
        if let Some(old) = self.pending.insert(key, entry) {
            released.push(old.weak.0);
        }
        self.inserted_since_sweep += 1;
        self.pending
            .get_mut(key)
            .expect("the entry was just inserted")
    }

    /// Frees at least one slot (false: nothing left to free): first the entries of dead
    /// spans (whose callbacks never came), then the oldest, remembered as lost if alive.
    fn make_room(&mut self, py: Python<'_>, released: &mut Released) -> bool {
        if self.inserted_since_sweep >= SWEEP_EVERY {
            self.inserted_since_sweep = 0;
            let mut alive = Released::new();
            let mut dead = Vec::new();
            (self.pending).remove_where(|entry| entry.weak.is_dead(py, &mut alive), &mut dead);
            released.extend(dead.into_iter().map(|entry| entry.weak.0));
            let mut dead = Vec::new();
            (self.lost).remove_where(|weak| weak.is_dead(py, &mut alive), &mut dead);
            released.extend(dead.into_iter().map(|weak| weak.0));
            released.append(&mut alive);
            if self.pending.len() < MAX_PENDING_SPANS {
                return true;
            }
        }
        let Some((key, oldest)) = self.pending.pop_oldest() else {
            return false;
        };
        if oldest.weak.is_dead(py, released) {
            released.push(oldest.weak.0);
            return true;
        }
        if self.lost.len() >= MAX_LOST_SPANS {
            released.extend(self.lost.pop_oldest().map(|(_, weak)| weak.0));
        }
        released.extend(self.lost.insert(key, oldest.weak).map(|weak| weak.0));
        true
    }

    /// Drops what the table holds for the span that `weak` referred to, if still that.
    fn forget(&mut self, key: usize, weak: *mut ffi::PyObject, released: &mut Released) {
        let owns = |held: &Weak| held.0.as_ptr() == weak;
        if self.pending.get(key).is_some_and(|entry| owns(&entry.weak)) {
            released.extend(self.pending.remove(key).map(|entry| entry.weak.0));
        }
        if self.lost.get(key).is_some_and(owns) {
            released.extend(self.lost.remove(key).map(|weak| weak.0));
        }
    }
}

fn table() -> MutexGuard<'static, Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        Mutex::new(Table {
            pending: Fifo::new(),
            lost: Fifo::new(),
            inserted_since_sweep: 0,
        })
    });
    // Nothing leaves the table half-updated across a panic: keep using it.
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The callback of a span's weak reference: drops the span's entry as the span dies.
#[pyclass(module = "meterage._native", name = "_SpanGone", frozen)]
struct SpanGone {
    key: usize,
}

#[pymethods]
impl SpanGone {
    fn __call__(&self, weak: &Bound<'_, PyAny>) {
        let mut released = Released::new();
        table().forget(self.key, weak.as_ptr(), &mut released);
        drop(released);
    }
}

/// A weak reference to `span` that forgets its entry when the span dies (None: the span
/// type takes no weak references).
fn weak_reference(span: &Bound<'_, PyAny>) -> Option<Weak> {
    let py = span.py();
    let callback = Bound::new(
        py,
        SpanGone {
            key: span.as_ptr() as usize,
        },
    )
    .ok()?;
    // SAFETY: both pointers are live objects held by `Bound`s and the thread is attached
    // (`py`); the result is a new reference, or null with an exception set (cleared).
    unsafe {
        let weak = ffi::PyWeakref_NewRef(span.as_ptr(), callback.as_ptr());
        if weak.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        Some(Weak(Bound::from_owned_ptr(py, weak).unbind()))
    }
}

/// The trace and span ids of a sampled SDK span (None: not sampled, or unreadable).
fn sampled_ids(span: &Bound<'_, PyAny>) -> Option<(u128, u64)> {
    let context = span.getattr("_context").ok()?;
    let flags: u8 = context.getattr("trace_flags").ok()?.extract().ok()?;
    if flags & 1 == 0 {
        return None;
    }
    let trace_id: u128 = context.getattr("trace_id").ok()?.extract().ok()?;
    let span_id: u64 = context.getattr("span_id").ok()?.extract().ok()?;
    Some((trace_id, span_id))
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

/// Adds a finished call to the current span's totals, and its duration as an exemplar of
/// `series` when the span is sampled, if span attributes are on. Must not be called while
/// a Python exception is set.
#[inline(always)]
pub fn note(measured: &Measured, series: &CallSeries) {
    if ENABLED.load(Ordering::Relaxed) {
        note_current(measured, series);
    }
}

/// [`note`] for a call that ran no probes, building its `Measured` only when it is needed.
#[inline(always)]
pub fn note_duration(duration_ns: u64, series: &CallSeries) {
    if ENABLED.load(Ordering::Relaxed) {
        note_current(
            &Measured {
                duration_ns,
                sample: None,
            },
            series,
        );
    }
}

fn add_call(entry: &mut Pending, measured: &Measured, series: Option<&CallSeries>) {
    if let (Some((trace_id, span_id)), Some(series)) = (entry.ids, series) {
        offer(series, measured, trace_id, span_id);
    }
    entry.totals.add(measured);
}

fn offer(series: &CallSeries, measured: &Measured, trace_id: u128, span_id: u64) {
    series.exemplars.offer(Exemplar {
        value: measured.duration_ns as f64 * DURATION.factor,
        time_unix_ns: unix_now_ns(),
        trace_id,
        span_id,
    });
}

/// The current SDK span if it is sampled and has not ended (span attributes on): where a
/// request or job that starts now will put its cost.
pub fn recording_span(py: Python<'_>) -> Option<Py<PyAny>> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let span = current_span(py)?;
    sampled_ids(&span)?;
    is_recording(&span).then(|| span.unbind())
}

fn is_recording(span: &Bound<'_, PyAny>) -> bool {
    span.call_method0(pyo3::intern!(span.py(), "is_recording"))
        .and_then(|recording| recording.is_truthy())
        .unwrap_or(false)
}

/// Adds a call's cost to `span`'s totals if it is still recording (the call's series gets
/// its exemplar: None for a part of a call whose series is not known yet); false if it
/// ended (nothing added).
pub fn note_on(span: &Bound<'_, PyAny>, measured: &Measured, series: Option<&CallSeries>) -> bool {
    if !ENABLED.load(Ordering::Relaxed) || !is_recording(span) {
        return false;
    }
    note_span(span.clone(), measured, series);
    true
}

/// The exemplar of a call whose cost went onto `span` earlier, in the call's series.
pub fn offer_exemplar(span: &Bound<'_, PyAny>, measured: &Measured, series: &CallSeries) {
    if let Some((trace_id, span_id)) = sampled_ids(span) {
        offer(series, measured, trace_id, span_id);
    }
}

#[inline(never)]
/// The current SDK span (None: no tracing, no current span, or a non-recording one).
fn current_span(py: Python<'_>) -> Option<Bound<'_, PyAny>> {
    let hook = HOOK.get()?;
    // SAFETY: called attached to the interpreter; every pointer below is checked, and each
    // reference taken is owned by a `Bound`.
    unsafe {
        let mut context: *mut ffi::PyObject = std::ptr::null_mut();
        if ffi::PyContextVar_Get(
            hook.context_var.as_ptr(),
            std::ptr::null_mut(),
            &mut context,
        ) < 0
        {
            ffi::PyErr_Clear();
            return None;
        }
        if context.is_null() {
            return None;
        }
        let context = Bound::from_owned_ptr(py, context);
        if ffi::PyDict_Check(context.as_ptr()) == 0 {
            return None;
        }
        let mut span: *mut ffi::PyObject = std::ptr::null_mut();
        match ffi::compat::PyDict_GetItemRef(context.as_ptr(), hook.span_key.as_ptr(), &mut span) {
            1 => {}
            0 => return None, // no current span
            _ => {
                ffi::PyErr_Clear();
                return None;
            }
        }
        // Strong: the span outlives the Python code its caller may run for it.
        let span = Bound::from_owned_ptr(py, span);
        if ffi::PyObject_TypeCheck(span.as_ptr(), hook.span_type.as_ptr().cast()) == 0 {
            return None; // not an SDK span (no tracing, or a non-recording span)
        }
        Some(span)
    }
}

/// Whether a sampled SDK span is current (span attributes on): a request traced in full
/// runs its probes.
#[pyfunction]
pub fn traced_now(py: Python<'_>) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && current_span(py).is_some_and(|span| sampled_ids(&span).is_some())
}

fn note_current(measured: &Measured, series: &CallSeries) {
    // SAFETY: metered calls end attached to the interpreter.
    let py = unsafe { Python::assume_attached() };
    if let Some(span) = current_span(py) {
        note_span(span, measured, Some(series));
    }
}

fn note_span(span: Bound<'_, PyAny>, measured: &Measured, series: Option<&CallSeries>) {
    let key = span.as_ptr() as usize;
    match table().find(key, &span) {
        Known::Pending(entry) => return add_call(entry, measured, series),
        Known::Lost => return,
        Known::Unknown => {}
    }
    // The span's first call: reading its ids and making its weak reference run Python code
    // (and so maybe the collector, a metered finalizer, a dying span's callback), so not
    // under the lock; such a call may even add this span meanwhile.
    let ids = sampled_ids(&span);
    let Some(weak) = weak_reference(&span) else {
        return;
    };
    let mut released = Released::new();
    {
        let mut table = table();
        match table.find(key, &span) {
            Known::Pending(entry) => {
                add_call(entry, measured, series);
                released.push(weak.0);
            }
            Known::Lost => released.push(weak.0),
            Known::Unknown => {
                let entry = Pending {
                    weak,
                    totals: Totals::default(),
                    ids,
                };
                let entry = table.insert(span.py(), key, entry, &mut released);
                add_call(entry, measured, series);
            }
        }
    }
    drop(released);
}

/// Turns span attributes on for the SDK span class `span_type`, with OpenTelemetry's
/// current-context variable and span key (or off).
#[pyfunction]
#[pyo3(signature = (enabled, context_var = None, span_key = None, span_type = None))]
pub fn set_span_attributes(
    enabled: bool,
    context_var: Option<Py<PyAny>>,
    span_key: Option<Py<PyAny>>,
    span_type: Option<Py<PyAny>>,
) -> PyResult<()> {
    if enabled {
        let (Some(context_var), Some(span_key), Some(span_type)) =
            (context_var, span_key, span_type)
        else {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "enabling span attributes needs the context variable, span key and span type",
            ));
        };
        let _ = HOOK.set(Hook {
            context_var,
            span_key,
            span_type,
        });
    }
    ENABLED.store(enabled, Ordering::Relaxed);
    Ok(())
}

/// Removes the totals of `span` and returns them as attributes (None if it ran no call, or
/// its totals were evicted).
#[pyfunction]
pub fn take_span_attributes<'py>(
    py: Python<'py>,
    span: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let key = span.as_ptr() as usize;
    let (entry, lost) = {
        let mut table = table();
        let entry = match table.pending.get(key) {
            Some(entry) if entry.weak.refers_to(span) => table.pending.remove(key),
            _ => None,
        };
        let lost = match table.lost.get(key) {
            Some(lost) if lost.refers_to(span) => table.lost.remove(key),
            _ => None,
        };
        (entry, lost)
    };
    drop(lost);
    let Some(entry) = entry else {
        return Ok(None);
    };
    let totals = entry.totals;
    let attributes = PyDict::new(py);
    attributes.set_item("meterage.calls", totals.calls)?;
    attributes.set_item(
        "meterage.duration",
        totals.duration_ns as f64 * DURATION.factor,
    )?;
    attributes.set_item("meterage.probed_calls", totals.probed)?;
    for (index, info) in MEASURES.iter().enumerate() {
        if totals.present & (1 << index) != 0 {
            let key = format!("meterage.{}", info.key);
            if info.factor == 1.0 {
                attributes.set_item(key, totals.values[index])?;
            } else {
                attributes.set_item(key, totals.values[index] as f64 * info.factor)?;
            }
        }
    }
    Ok(Some(attributes))
}

/// Live spans holding totals now (for tests: bounded, and emptied as spans end or die).
#[pyfunction]
pub fn pending_span_count() -> usize {
    table().pending.len()
}
