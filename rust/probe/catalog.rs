//! What a probe is: one declaration of its measures (snapshot key, unit, exported metric,
//! attributes, description, export boundaries) and the functions that read it. The list
//! of probes in [`super`] is the only other place a probe is named; the core's readings,
//! the bridge's exported names, the docs tables and the command line's tables all follow
//! from these declarations.

/// How the values of one measure combine over the steps of one call (a coroutine's or a
/// generator's) and over the calls of one span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// An amount used during the call: steps add up, spans add up.
    Sum,
    /// A level at the end of the call (GPU memory held): the last step's, a span's largest.
    Last,
    /// A high-water mark during the call: the largest step's, a span's largest.
    Max,
}

impl Combine {
    pub const fn name(self) -> &'static str {
        match self {
            Combine::Sum => "sum",
            Combine::Last => "last",
            Combine::Max => "max",
        }
    }
}

/// One measure of a probe, as recorded and as exported.
#[derive(Clone, Copy, Debug)]
pub struct Measure {
    /// The snapshot key (`Series.histograms[key]`); spans carry it as `meterage.<key>`.
    pub key: &'static str,
    /// UCUM unit of the recorded value.
    pub unit: &'static str,
    /// From the raw integer reading to the unit (nanoseconds to seconds for CPU time).
    pub factor: f64,
    pub combine: Combine,
    /// The exported OpenTelemetry histogram. Measures that share one tell themselves apart
    /// by `attributes`, and share its unit, description and boundaries.
    pub metric: &'static str,
    pub attributes: &'static [(&'static str, &'static str)],
    pub description: &'static str,
    /// Explicit bucket boundaries of the export (the histograms count them exactly).
    pub boundaries: &'static [f64],
    /// Where the numbers come from and what they leave out, for the docs.
    pub source: &'static str,
}

impl Measure {
    /// The same measure, its numbers coming from `source` (for the docs).
    pub const fn with_source(self, source: &'static str) -> Measure {
        Measure { source, ..self }
    }
}

/// One probe: the name users ask for it by, and its measures.
#[derive(Clone, Copy, Debug)]
pub struct ProbeInfo {
    pub name: &'static str,
    /// Read by meters that do not name their probes.
    pub default: bool,
    pub measures: &'static [Measure],
}

/// When a probe is read around a call. Before the call the stages run in this order, after
/// it in the reverse one, so that each probe's own cost lands outside the readings of the
/// probes inner to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Slow driver calls (NVML): outside the thread's own counters.
    Outer,
    /// Syscalls that read the thread's counters.
    Counters,
    /// The thread CPU clock: just around the call, outside nothing but what counts memory.
    Clock,
    /// What counts the call's own allocations: the readings above allocate nothing it sees,
    /// and it must see nothing of theirs.
    Inner,
}

/// How to read a probe. `raw` holds [`RAW`](Probe::RAW) integers of a reading; a delta
/// holds one value per measure of [`INFO`](Probe::INFO), in their order.
pub trait Probe {
    const INFO: ProbeInfo;
    const STAGE: Stage;
    const RAW: usize;

    /// The reading before a call; false when it could not be read.
    fn before(raw: &mut [u64]) -> bool;

    /// The reading after a call whose reading before was `start` (read on this thread
    /// unless the call moved): by default the same reading as before.
    #[inline(always)]
    fn after(_start: &[u64], raw: &mut [u64]) -> bool {
        Self::before(raw)
    }

    /// The call's measures from its two readings, into `out`; returns which of them have a
    /// value (bit i for measure i).
    fn delta(end: &[u64], start: &[u64], out: &mut [u64]) -> u32 {
        for ((out, end), start) in out.iter_mut().zip(end).zip(start) {
            *out = end.saturating_sub(*start);
        }
        all_measures(Self::INFO)
    }

    /// What the probe added to the call while it ran (beyond its readings), from the
    /// call's measures: adaptive sampling counts it as the probes' cost.
    fn in_call_cost_ns(_measures: &[u64]) -> u64 {
        0
    }

    /// A reading before a call that will never be read after it (the call was given up,
    /// or ends on another thread or in a fork child).
    fn abandon(_start: &[u64]) {}

    /// `None` when the probe works here, or a sentence saying why not.
    fn availability() -> Option<String>;

    /// Readies the probe for a meter that asks for it (once per meter made); `None` when
    /// it is ready, or why it cannot be.
    fn activate() -> Option<String> {
        Self::availability()
    }
}

/// The bits of every measure of `info`.
pub const fn all_measures(info: ProbeInfo) -> u32 {
    (1u32 << info.measures.len()) - 1
}

/// Bytes per call: 0, then powers of 4 from 1 KiB to 1 GiB.
pub const BYTE_BOUNDARIES: [f64; 12] = {
    let mut out = [0.0; 12];
    let mut k = 0;
    while k < 11 {
        out[k + 1] = (1024u64 << (2 * k)) as f64;
        k += 1;
    }
    out
};

/// Events per call (faults, context switches).
pub const COUNT_BOUNDARIES: [f64; 11] = [
    0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
];

/// Semantic-convention advisory boundaries for request durations (seconds).
pub const DURATION_BOUNDARIES: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The wall-clock measure every call records (not a probe: every call is timed).
pub const DURATION: Measure = Measure {
    key: "duration",
    unit: "s",
    factor: 1e-9,
    combine: Combine::Sum,
    metric: "meterage.call.duration",
    attributes: &[],
    description: "Wall time of metered calls.",
    boundaries: &DURATION_BOUNDARIES,
    source: "`CLOCK_MONOTONIC` (vDSO) around every call",
};

/// Whether two strings are equal (usable in constants).
pub const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
