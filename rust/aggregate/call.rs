//! The call wrapper's logic, free of Python: what happens before and after a metered call.
//!
//! A `MeterCore` is built once per decorated function or meter (at decoration time): it
//! resolves its series, so a call only reads clocks and counters and records into a
//! histogram it already holds.

use super::attributes::OVERFLOW_KEY;
use super::attributes::{AttributeSet, AttributeValue, ERROR_TYPE_KEY};
use super::call_key::CallKey;
use super::registry::{registry, Operation};
use super::sampling::{Sampler, SamplingMode};
use super::series::CallSeries;
use super::series_map::SeriesData;
use crate::probe::{fork, monotonic_ns, Delta, ProbeSet, Reading};
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

pub struct MeterCore {
    operation: Arc<Operation>,
    attributes: AttributeSet,
    /// The series of its calls without dynamic attributes: one of `resolved`, which keeps
    /// it alive. It changes only when a meter that got the overflow series (its operation
    /// was full) finds room for its own in a later epoch.
    series: AtomicPtr<CallSeries>,
    resolved: Mutex<Vec<Arc<CallSeries>>>,
    probes: ProbeSet,
    mode: SamplingMode,
    sampler: Arc<Sampler>,
    /// Series of failed calls by exception class name: looked up once per class.
    error_series: ArcSwap<Vec<(Box<str>, Arc<CallSeries>)>>,
    /// Whether a call returned an awaitable that is not a coroutine (warned about once).
    warned_awaitable: AtomicBool,
}

/// The series a call records into: the meter's own (borrowed) or one looked up.
pub enum SeriesRef<'a> {
    Own(&'a CallSeries),
    Found(Arc<CallSeries>),
}

impl std::ops::Deref for SeriesRef<'_> {
    type Target = CallSeries;

    fn deref(&self) -> &CallSeries {
        match self {
            SeriesRef::Own(series) => series,
            SeriesRef::Found(series) => series,
        }
    }
}

/// Where a call was counted in flight (null: it was not).
#[derive(Clone, Copy, Debug)]
pub struct Counted(*const CallSeries);

impl Default for Counted {
    fn default() -> Self {
        Counted(std::ptr::null())
    }
}

// SAFETY: a pointer to a series its meter keeps alive; only its atomics are touched.
unsafe impl Send for Counted {}
// SAFETY: as above.
unsafe impl Sync for Counted {}

/// State taken before a call of a meter without probes.
#[derive(Clone, Copy, Debug)]
pub struct TimerStart {
    wall_ns: u64,
    generation: u64,
    counted: Counted,
}

/// State taken before a call.
#[derive(Clone, Copy, Debug)]
pub struct CallStart {
    wall_ns: u64,
    /// The fork generation the call started in: a call in flight when the process forks is
    /// its parent's, and the child neither records it nor uncounts it.
    generation: u64,
    /// Where this call was counted in flight (and so must be uncounted at its end).
    counted: Counted,
    /// The probe reading and the call's weight, when the call was chosen for probing.
    sample: Option<(Reading, f64)>,
    /// When the probe readings began (adaptive sampling measures what they cost).
    probes_began_ns: u64,
}

/// Whether calls are counted in flight (`meterage.calls.active`): two atomic operations
/// per call, so only while an exporter is attached.
static TRACK_ACTIVE: AtomicBool = AtomicBool::new(false);

pub fn set_active_tracking(on: bool) {
    TRACK_ACTIVE.store(on, Ordering::Relaxed);
}

/// What a finished call measured, not yet recorded.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub duration_ns: u64,
    pub sample: Option<(Delta, f64)>,
}

/// A call that runs in steps (a coroutine or generator): wall time from its first step to
/// its end, probes summed over its own steps only.
#[derive(Clone, Debug, Default)]
pub struct SteppedCall {
    started_ns: Option<u64>,
    generation: u64,
    counted: Counted,
    weight: Option<f64>,
    /// The probed steps' sum, made at the first: an unprobed call (nearly every one) stays
    /// a few cache lines smaller, which is what it costs with the caches cold.
    total: Option<Box<Delta>>,
    /// Set when a step's readings could not be compared (a fork in between).
    broken: bool,
    probe_cost_ns: u64,
    /// Steps in progress now: more than one at a time are steps in several threads.
    running: u32,
    /// Whether steps ever overlapped: then the threads' CPU times add up to more than the
    /// wall time, truthfully, and the total is not capped by it.
    parallel: bool,
    /// Wall time spent in the call's probed steps (adaptive sampling only): its own time,
    /// without the time it waited while other calls ran.
    active_ns: u64,
}

impl SteppedCall {
    /// Whether the call has taken its first step (or was started).
    pub fn is_started(&self) -> bool {
        self.started_ns.is_some()
    }

    /// Whether the call runs its probes (known once it started).
    pub fn is_probed(&self) -> bool {
        self.weight.is_some()
    }

    /// What its probed steps used so far (nothing before the first).
    fn total(&self) -> Delta {
        self.total.as_deref().copied().unwrap_or_default()
    }
}

/// State taken before one step of a stepped call.
#[derive(Clone, Copy, Debug)]
pub struct StepStart {
    reading: Option<Reading>,
    /// What taking `reading` cost (adaptive sampling only).
    reading_cost_ns: u64,
    /// When the step began (adaptive sampling only).
    began_ns: u64,
    /// The call this thread is stepping (its address on this thread's stack of them),
    /// or 0: a step inside a step of the same call in this thread takes no readings.
    stepping: usize,
}

impl StepStart {
    /// Off this thread's stack of calls being stepped.
    fn leave(&self) {
        if self.stepping != 0 {
            STEPPING.with(|stack| {
                let mut stack = stack.borrow_mut();
                if let Some(at) = stack.iter().rposition(|key| *key == self.stepping) {
                    stack.remove(at);
                }
            });
        }
    }

    /// A step whose call cannot take its readings now (it is being ended elsewhere): its
    /// readings are dropped, the probes' per-thread state left as it was.
    pub fn abandon(self) {
        self.leave();
        if let Some(reading) = self.reading {
            reading.abandon();
        }
    }
}

thread_local! {
    /// The stepped calls this thread is in a step of, innermost last.
    static STEPPING: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One thread cannot use more CPU than wall time; the CPU clock's readings sit just
/// outside the wall clock's, so a tiny call could otherwise show a little more.
#[inline]
fn cap_cpu(mut delta: Delta, duration_ns: u64) -> Delta {
    let cpu = &mut delta.values[crate::probe::measure::CPU_TIME];
    *cpu = (*cpu).min(duration_ns);
    delta
}

impl MeterCore {
    /// The meter of `operation` with these settings: one made earlier if the operation kept
    /// it (so an inline `meterage.meter(...)` costs a lookup), else a new one.
    pub fn get(
        operation: &str,
        attributes: AttributeSet,
        probes: ProbeSet,
        mode: SamplingMode,
    ) -> Arc<MeterCore> {
        let operation = registry().operation(operation);
        if let Some(core) = operation.reused_meter(&attributes, probes, mode) {
            return core;
        }
        let core = Arc::new(Self::build(operation, attributes, probes, mode));
        core.operation.keep_meter(&core);
        core
    }

    /// A new meter of `operation` (not kept for reuse).
    pub fn new(
        operation: &str,
        attributes: AttributeSet,
        probes: ProbeSet,
        mode: SamplingMode,
    ) -> MeterCore {
        Self::build(registry().operation(operation), attributes, probes, mode)
    }

    fn build(
        operation: Arc<Operation>,
        attributes: AttributeSet,
        probes: ProbeSet,
        mode: SamplingMode,
    ) -> MeterCore {
        operation.request_probes(probes);
        if probes.contains(ProbeSet::CPU) {
            // One-time calibration, here rather than inside the first probed call.
            crate::probe::clock::thread_cpu_read_cost_ns();
        }
        let series = operation.series.get_or_create_idle(&attributes);
        MeterCore {
            sampler: operation.sampler(mode),
            operation,
            attributes,
            series: AtomicPtr::new(Arc::as_ptr(&series).cast_mut()),
            resolved: Mutex::new(vec![series]),
            probes,
            mode,
            error_series: ArcSwap::from_pointee(Vec::new()),
            warned_awaitable: AtomicBool::new(false),
        }
    }

    /// True the first time only: whether to warn that a call returned a plain awaitable.
    pub fn first_awaitable_warning(&self) -> bool {
        !self.warned_awaitable.swap(true, Ordering::Relaxed)
    }

    /// Gives up a started call that will not be recorded (its work happens later, in the
    /// steps of the object it returned): it is no longer in flight.
    pub fn abandon(&self, start: CallStart) {
        if start.generation == fork::generation() {
            self.leave_active(start.counted, start.generation);
        }
    }

    /// Whether this meter was made with these settings.
    pub fn has_settings(
        &self,
        attributes: &AttributeSet,
        probes: ProbeSet,
        mode: SamplingMode,
    ) -> bool {
        self.probes == probes && self.mode == mode && self.attributes == *attributes
    }

    pub fn operation_name(&self) -> &str {
        &self.operation.name
    }
    pub fn attributes(&self) -> &AttributeSet {
        &self.attributes
    }
    pub fn probes(&self) -> ProbeSet {
        self.probes
    }
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }
    /// Counts a call in flight on this meter's series, when tracking is on; returns the
    /// series it counted in (null: not counted), where the call's end must uncount it.
    #[inline(always)]
    pub fn enter_active(&self, generation: u64) -> Counted {
        if !TRACK_ACTIVE.load(Ordering::Relaxed) {
            return Counted(std::ptr::null());
        }
        let mut series = self.held_series();
        if crate::group::arena::is_foreign(series as *const CallSeries as usize) {
            // A process group's fork child: its calls in flight are counted in its own.
            series = self.series();
        }
        series.active.enter(generation);
        Counted(series)
    }

    #[inline(always)]
    pub fn leave_active(&self, counted: Counted, generation: u64) {
        if !counted.0.is_null() {
            // SAFETY: one of `resolved`, which keeps every series the meter held alive.
            unsafe { &*counted.0 }.active.leave(generation);
        }
    }

    /// The series the meter holds now, as it is (calls in flight are counted there; that
    /// is not data of an epoch, so it neither needs nor makes the series current).
    #[inline(always)]
    fn held_series(&self) -> &CallSeries {
        // SAFETY: the pointer is always one of the Arcs in `resolved`, which only grows.
        unsafe { &*self.series.load(Ordering::Acquire) }
    }

    /// The series successful calls without dynamic attributes record into, made current
    /// (so its record need not check its epoch again).
    #[inline(always)]
    pub fn series(&self) -> &CallSeries {
        // SAFETY: the pointer is always one of the Arcs in `resolved`, which only grows.
        let series = unsafe { &*self.series.load(Ordering::Acquire) };
        if series.liveness().is_current() {
            return series;
        }
        let series = self.resolve_again(series);
        series.liveness().ensure_current(|| series.clear());
        series
    }

    /// The first call of an epoch: the meter's own series if the operation's budget has
    /// room for it (a meter that had the overflow series gets its own back), else the
    /// overflow series, so that meters made with ever new attributes stay within it.
    #[cold]
    #[inline(never)]
    fn resolve_again<'a>(&'a self, series: &'a CallSeries) -> &'a CallSeries {
        let map = &self.operation.series;
        let is_overflow = series.attributes().get(OVERFLOW_KEY).is_some()
            && self.attributes.get(OVERFLOW_KEY).is_none();
        // A process group's fork child (or a process that joined one) records into series
        // of its own arena, not into the ones its meters held before.
        let foreign = crate::group::arena::is_foreign(series as *const CallSeries as usize);
        let wanted = if is_overflow || (foreign && map.has_room()) {
            map.get_or_create_idle(&self.attributes)
        } else if !map.has_room() {
            map.overflow()
        } else {
            return series;
        };
        if std::ptr::eq(Arc::as_ptr(&wanted), series) {
            return series;
        }
        let Ok(mut resolved) = self.resolved.lock() else {
            return series;
        };
        let pointer = Arc::as_ptr(&wanted);
        if !resolved.iter().any(|kept| Arc::ptr_eq(kept, &wanted)) {
            resolved.push(wanted);
        }
        self.series.store(pointer.cast_mut(), Ordering::Release);
        // SAFETY: `pointer` is one of `resolved`, which only grows.
        unsafe { &*pointer }
    }

    #[inline(always)]
    pub fn decide(&self) -> Option<f64> {
        if self.probes.is_empty() {
            None
        } else {
            self.sampler.decide()
        }
    }

    /// Before a call chosen for probing (`weight` from [`decide`](Self::decide)): the
    /// probes, then the clock.
    #[inline(always)]
    pub fn begin_probed(&self, weight: f64) -> CallStart {
        let generation = fork::generation();
        let counted = self.enter_active(generation);
        let probes_began_ns = self.probe_clock();
        let reading = Reading::take_before(self.probes);
        CallStart {
            counted,
            generation,
            wall_ns: monotonic_ns(),
            sample: Some((reading, weight)),
            probes_began_ns,
        }
    }

    #[inline(always)]
    fn probe_clock(&self) -> u64 {
        if self.sampler.is_adaptive() {
            monotonic_ns()
        } else {
            0
        }
    }

    /// Before the call: decide whether to probe it, read the probes if so, start the clock.
    #[inline(always)]
    pub fn begin(&self) -> CallStart {
        match self.decide() {
            Some(weight) => self.begin_probed(weight),
            None => {
                let generation = fork::generation();
                CallStart {
                    counted: self.enter_active(generation),
                    generation,
                    wall_ns: monotonic_ns(),
                    sample: None,
                    probes_began_ns: 0,
                }
            }
        }
    }

    /// Before a call of a meter without probes: the clock only (no `CallStart`, whose
    /// room for probe readings would be copied around for nothing).
    #[inline(always)]
    pub fn begin_timer(&self) -> TimerStart {
        let generation = fork::generation();
        TimerStart {
            counted: self.enter_active(generation),
            generation,
            wall_ns: monotonic_ns(),
        }
    }

    /// After a call of a meter without probes: its duration, or None for a call that
    /// started before this process was forked (the parent records it).
    #[inline(always)]
    pub fn stop_timer(&self, start: TimerStart) -> Option<u64> {
        let duration_ns = monotonic_ns().saturating_sub(start.wall_ns);
        if start.generation != fork::generation() {
            return None;
        }
        self.leave_active(start.counted, start.generation);
        Some(duration_ns)
    }

    /// Gives up a started timer-only call (see [`abandon`](Self::abandon)).
    pub fn abandon_timer(&self, start: TimerStart) {
        if start.generation == fork::generation() {
            self.leave_active(start.counted, start.generation);
        }
    }

    /// After the call: stop the clock and read the probes; None for a call that started
    /// before this process was forked from its parent (the parent records it). Recording is
    /// separate so the series (which can depend on the outcome) is chosen outside the
    /// timed span.
    #[inline(always)]
    pub fn stop(&self, start: CallStart) -> Option<Measured> {
        let wall_end = monotonic_ns();
        if start.generation != fork::generation() {
            return None;
        }
        self.leave_active(start.counted, start.generation);
        let duration_ns = wall_end.saturating_sub(start.wall_ns);
        if start.sample.is_none() {
            return Some(Measured {
                duration_ns,
                sample: None,
            });
        }
        let sample = start.sample.and_then(|(before, weight)| {
            let delta = Reading::take_after(&before).since(&before);
            if self.sampler.is_adaptive() {
                let cost = (start.wall_ns - start.probes_began_ns)
                    + monotonic_ns().saturating_sub(wall_end)
                    + delta.map_or(0, |delta| delta.in_call_ns);
                self.sampler.observe(duration_ns, cost);
            }
            delta.map(|delta| (cap_cpu(delta, duration_ns), weight))
        });
        Some(Measured {
            duration_ns,
            sample,
        })
    }

    #[inline(always)]
    pub fn record(&self, measured: &Measured, series: &CallSeries) {
        series.record(
            measured.duration_ns,
            measured
                .sample
                .as_ref()
                .map(|(delta, weight)| (delta, *weight)),
        );
    }

    /// `stop` then `record`.
    #[inline(always)]
    pub fn end(&self, start: CallStart, series: &CallSeries) {
        if let Some(measured) = self.stop(start) {
            self.record(&measured, series);
        }
    }

    /// Before one step of a stepped call; the first step decides sampling and starts
    /// the wall clock.
    #[inline]
    pub fn step_begin(&self, call: &mut SteppedCall) -> StepStart {
        let first = call.started_ns.is_none();
        if first {
            call.weight = self.decide();
        }
        let mut step = StepStart {
            reading: None,
            reading_cost_ns: 0,
            began_ns: 0,
            stepping: 0,
        };
        if call.weight.is_some() {
            // A step of this call already in progress in this thread (a run() inside its
            // run(), or inside its coroutine's step) has the readings: this one is in them.
            let key = call as *const SteppedCall as usize;
            let nested = STEPPING.with(|stack| {
                let mut stack = stack.borrow_mut();
                let nested = stack.contains(&key);
                stack.push(key);
                nested
            });
            step.stepping = key;
            if nested {
                if first {
                    self.start_clock(call);
                }
                return step;
            }
            let began = self.probe_clock();
            step.reading = Some(Reading::take_before(self.probes));
            step.reading_cost_ns = self.probe_clock().saturating_sub(began);
            step.began_ns = began;
            call.running += 1;
            call.parallel |= call.running > 1;
        }
        if first {
            self.start_clock(call);
        }
        step
    }

    /// Starts a stepped call before its first step (a request or job opened by Python):
    /// decides sampling (`probe`: run the probes whatever the sampler says, for a call that
    /// is traced) and starts the wall clock. Nothing if it already started.
    pub fn start_stepped(&self, call: &mut SteppedCall, probe: bool) {
        if call.started_ns.is_some() {
            return;
        }
        // A call probed because it is traced stands for itself alone (weight 1); the
        // others are sampled as usual, so estimated totals stay unbiased.
        call.weight = if probe && !self.probes.is_empty() {
            Some(1.0)
        } else {
            self.decide()
        };
        self.start_clock(call);
    }

    fn start_clock(&self, call: &mut SteppedCall) {
        call.generation = fork::generation();
        call.counted = self.enter_active(call.generation);
        call.started_ns = Some(monotonic_ns());
    }

    /// After one step: add its probe deltas to the call's.
    #[inline]
    pub fn step_end(&self, call: &mut SteppedCall, step: StepStart) {
        step.leave();
        if let Some(before) = step.reading {
            call.running = call.running.saturating_sub(1);
            let read_at = self.probe_clock();
            match Reading::take_after(&before).since(&before) {
                Some(delta) => call.total.get_or_insert_default().accumulate(&delta),
                None => call.broken = true,
            }
            call.probe_cost_ns += step.reading_cost_ns + self.probe_clock().saturating_sub(read_at);
            call.active_ns += read_at.saturating_sub(step.began_ns);
        }
    }

    /// What a stepped call measured so far, its step in progress on this thread (`open`)
    /// included: for a tracing span that ends before the call does (a framework's server
    /// span, ended once the response is sent). Nothing is recorded or counted.
    pub fn measured_so_far(
        &self,
        call: &SteppedCall,
        open: Option<&StepStart>,
    ) -> Option<Measured> {
        let started = call.started_ns?;
        if call.generation != fork::generation() {
            return None;
        }
        let duration_ns = monotonic_ns().saturating_sub(started);
        let sample = match call.weight {
            Some(weight) if !call.broken => {
                let mut total = call.total();
                if let Some(before) = open.and_then(|step| step.reading.as_ref()) {
                    if let Some(delta) = Reading::peek_since(before) {
                        total.accumulate(&delta);
                    }
                }
                let total = if call.parallel {
                    total
                } else {
                    cap_cpu(total, duration_ns)
                };
                Some((total, weight))
            }
            _ => None,
        };
        Some(Measured {
            duration_ns,
            sample,
        })
    }

    /// Stops the clock of a finished stepped call; `None` if it never took a step, or
    /// started before this process was forked (then there is nothing to record).
    pub fn stop_stepped(&self, call: &SteppedCall) -> Option<Measured> {
        let started = call.started_ns?;
        if call.generation != fork::generation() {
            return None;
        }
        self.leave_active(call.counted, call.generation);
        let duration_ns = monotonic_ns().saturating_sub(started);
        let sample = match call.weight {
            Some(weight) if !call.broken => {
                let total = call.total();
                if self.sampler.is_adaptive() {
                    // The budget is a share of the time the call itself ran: a request that
                    // waits while a hundred others run must not give each of them its
                    // waiting time's budget too (the probes would cost a hundred times it).
                    let own_ns = if call.active_ns > 0 {
                        call.active_ns.min(duration_ns.max(1))
                    } else {
                        duration_ns
                    };
                    self.sampler
                        .observe(own_ns, call.probe_cost_ns + total.in_call_ns);
                }
                let total = if call.parallel {
                    total
                } else {
                    cap_cpu(total, duration_ns)
                };
                Some((total, weight))
            }
            _ => None,
        };
        Some(Measured {
            duration_ns,
            sample,
        })
    }

    /// Ends a stepped call once (`finished` guards against a second end): stops its clock
    /// and records it in the series for its dynamic attributes and outcome. Returns what it
    /// recorded and where (None: already ended, or never started).
    pub fn finish_stepped(
        &self,
        call: &SteppedCall,
        finished: &mut bool,
        dynamic: &[(Arc<str>, AttributeValue)],
        error_type: Option<&str>,
    ) -> Option<(Measured, SeriesRef<'_>)> {
        if std::mem::replace(finished, true) {
            return None;
        }
        let measured = self.stop_stepped(call)?;
        let series = self.series_for(dynamic, error_type);
        self.record(&measured, &series);
        Some((measured, series))
    }

    /// [`finish_stepped`](Self::finish_stepped) in `series`, known to be the one of the
    /// call's attributes and outcome.
    pub fn finish_stepped_in(
        &self,
        call: &SteppedCall,
        finished: &mut bool,
        series: Arc<CallSeries>,
    ) -> Option<(Measured, SeriesRef<'_>)> {
        if std::mem::replace(finished, true) {
            return None;
        }
        let measured = self.stop_stepped(call)?;
        self.record(&measured, &series);
        Some((measured, SeriesRef::Found(series)))
    }

    /// The series for a call with these dynamic attributes and outcome.
    pub fn series_for(
        &self,
        dynamic: &[(Arc<str>, AttributeValue)],
        error_type: Option<&str>,
    ) -> SeriesRef<'_> {
        match (dynamic.is_empty(), error_type) {
            (true, None) => SeriesRef::Own(self.series()),
            (true, Some(error_type)) => SeriesRef::Found(self.error_series(error_type)),
            (false, error_type) => {
                if let Some(key) = CallKey::new(&self.attributes, dynamic, error_type) {
                    return SeriesRef::Found(key.series_in(&self.operation.series));
                }
                let mut attributes = self.attributes.merged(dynamic.iter().cloned());
                if let Some(error_type) = error_type {
                    attributes = attributes.with(ERROR_TYPE_KEY, error_type.into());
                }
                SeriesRef::Found(self.operation.series.get_or_create(&attributes))
            }
        }
    }

    /// The series of calls that failed with `error_type`.
    pub fn error_series(&self, error_type: &str) -> Arc<CallSeries> {
        if let Some((_, series)) = self
            .error_series
            .load()
            .iter()
            .find(|(name, _)| &**name == error_type)
        {
            if !crate::group::arena::is_foreign(Arc::as_ptr(series) as usize) {
                return Arc::clone(series);
            }
        }
        let series = self
            .operation
            .series
            .get_or_create(&self.attributes.with(ERROR_TYPE_KEY, error_type.into()));
        // Do not cache the overflow series under a class name that never got its own.
        if series.attributes().get(ERROR_TYPE_KEY).is_some() {
            self.error_series.rcu(|current| {
                let mut next = Vec::clone(current);
                // A cached series of another process's arena (see above) is replaced.
                next.retain(|(name, cached)| {
                    &**name != error_type
                        || !crate::group::arena::is_foreign(Arc::as_ptr(cached) as usize)
                });
                if !next.iter().any(|(name, _)| &**name == error_type) {
                    next.push((error_type.into(), Arc::clone(&series)));
                }
                next
            });
        }
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::measure;
    use std::io::Write;

    fn unique(name: &str) -> String {
        format!("{name}-{}", monotonic_ns())
    }

    #[test]
    fn a_call_records_once_with_probes() {
        let core = MeterCore::new(
            &unique("call"),
            AttributeSet::empty(),
            ProbeSet::ALL,
            SamplingMode::Fixed(1.0),
        );
        let start = core.begin();
        let path = std::env::temp_dir().join(unique("meterage-call"));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[0u8; 1000])
            .unwrap();
        core.end(start, core.series());
        std::fs::remove_file(path).unwrap();
        assert_eq!(core.series().duration.snapshot().count, 1);
        let written = core
            .series()
            .probe(measure::index("io.write"))
            .unwrap()
            .snapshot();
        assert_eq!((written.count, written.sum), (1, 1000.0));
    }

    #[test]
    fn timer_only_meters_record_no_probes() {
        let core = MeterCore::new(
            &unique("timer"),
            AttributeSet::empty(),
            ProbeSet::NONE,
            SamplingMode::Fixed(1.0),
        );
        for _ in 0..10 {
            let start = core.begin();
            core.end(start, core.series());
        }
        assert_eq!(core.series().duration.snapshot().count, 10);
        assert!(core.series().probes().is_none());
    }

    #[test]
    fn stepped_calls_sum_only_their_own_steps() {
        let core = MeterCore::new(
            &unique("stepped"),
            AttributeSet::empty(),
            ProbeSet::CPU,
            SamplingMode::Fixed(1.0),
        );
        let mut call = SteppedCall::default();
        let busy = |ms: u64| {
            let until = monotonic_ns() + ms * 1_000_000;
            while monotonic_ns() < until {
                std::hint::black_box(0);
            }
        };
        for _ in 0..3 {
            let step = core.step_begin(&mut call);
            busy(2);
            core.step_end(&mut call, step);
            // Work between steps belongs to someone else.
            busy(5);
        }
        core.record(&core.stop_stepped(&call).unwrap(), core.series());
        let cpu = core.series().probe(measure::CPU_TIME).unwrap().snapshot();
        assert_eq!(cpu.count, 1);
        // 6 ms of own steps out of ~21 ms busy; allow scheduling noise but not the 15 ms gap.
        assert!(cpu.sum > 0.003 && cpu.sum < 0.012, "cpu {}", cpu.sum);
        let wall = core.series().duration.snapshot();
        assert!(wall.sum >= 0.019, "wall {}", wall.sum);
    }

    #[test]
    fn many_threads_record_exact_counts() {
        let core = Arc::new(MeterCore::new(
            &unique("threads"),
            AttributeSet::empty(),
            ProbeSet::RUSAGE,
            SamplingMode::Fixed(0.5),
        ));
        let handles: Vec<_> = (0..8)
            .map(|thread| {
                let core = Arc::clone(&core);
                std::thread::spawn(move || {
                    for call in 0..20_000 {
                        let start = core.begin();
                        if (thread + call) % 7 == 0 {
                            core.end(start, &core.error_series("Boom"));
                        } else {
                            core.end(start, core.series());
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        let ok = core.series().duration.snapshot().count;
        let failed = core.error_series("Boom").duration.snapshot().count;
        assert_eq!(ok + failed, 160_000);
        let expected_failed = (0..8)
            .flat_map(|t| (0..20_000).map(move |c| (t + c) % 7 == 0))
            .filter(|&f| f)
            .count() as u64;
        assert_eq!(failed, expected_failed);
        // Probed calls: a fair coin per call; 160k draws have sd ~200.
        let probed = core
            .series()
            .probe(measure::index("paging.faults.minor"))
            .unwrap()
            .snapshot()
            .count
            + core
                .error_series("Boom")
                .probe(measure::index("paging.faults.minor"))
                .unwrap()
                .snapshot()
                .count;
        assert!((probed as i64 - 80_000).abs() < 2_000, "probed {probed}");
    }

    #[test]
    fn a_stepped_call_that_never_ran_records_nothing() {
        let core = MeterCore::new(
            &unique("never"),
            AttributeSet::empty(),
            ProbeSet::CPU,
            SamplingMode::Fixed(1.0),
        );
        assert!(core.stop_stepped(&SteppedCall::default()).is_none());
        assert!(core.series().is_empty());
    }

    #[test]
    fn failures_go_to_an_error_series_per_class() {
        let name = unique("fail");
        let base = AttributeSet::empty().with("tier", "gold".into());
        let core = MeterCore::new(&name, base, ProbeSet::NONE, SamplingMode::Fixed(1.0));
        let a = core.error_series("ValueError");
        let b = core.error_series("ValueError");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(
            a.attributes().get(ERROR_TYPE_KEY),
            Some(&AttributeValue::from("ValueError"))
        );
        assert_eq!(a.attributes().get("tier"), Some(&"gold".into()));
        let dynamic = [(Arc::from("rows"), AttributeValue::Int(3))];
        let with_rows = core.series_for(&dynamic, Some("KeyError"));
        assert_eq!(with_rows.attributes().len(), 3);
    }
}
