//! Probes: the OS counters read around each metered call.
//!
//! A call reads its probes once before and once after; the difference is the call's cost.
//! The OS readings are per thread, so a call is charged only for its own thread's work;
//! the GPU readings are per device (see [`gpu`]).
//!
//! Each probe is one declaration ([`catalog::Probe`]) in its own file, named once in the
//! list below: the probe set, the measure indices, the readings and their deltas follow.

pub mod alloc;
pub mod catalog;
pub mod clock;
pub mod fork;
pub mod gpu;
mod gpu_probe;
pub mod nvml;
mod rusage;
mod thread_io;

pub use catalog::{Combine, Measure, ProbeInfo, DURATION};
use catalog::{Probe, Stage};
pub use clock::{monotonic_ns, thread_cpu_ns};

/// Declares the probes, in the order users see them (names, snapshot keys, exports).
macro_rules! probes {
    ($($flag:ident: $probe:ty),+ $(,)?) => {
        /// Every probe, in the order users see them.
        pub const PROBES: &[ProbeInfo] = &[$(<$probe as Probe>::INFO),+];
        const RAW_SIZES: &[usize] = &[$(<$probe as Probe>::RAW),+];

        bitflags::bitflags! {
            /// A set of probes, one bit each. The wall clock is not a probe: every call is
            /// timed.
            #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
            pub struct ProbeSet: u8 {
                $(const $flag = 1 << position(<$probe as Probe>::INFO.name);)+
            }
        }

        /// Reads the probes of `wanted` that run at `stage`: before the call, or after it
        /// when `start` is the reading before.
        #[inline(always)]
        fn read_stage(stage: Stage, wanted: ProbeSet, start: Option<&Reading>, reading: &mut Reading) {
            $(
                if <$probe as Probe>::STAGE == stage && wanted.contains(ProbeSet::$flag) {
                    let at = RAW_OFFSETS[position(<$probe as Probe>::INFO.name)];
                    let range = at..at + <$probe as Probe>::RAW;
                    let read = match start {
                        None => <$probe as Probe>::before(&mut reading.raw[range]),
                        Some(start) => <$probe as Probe>::after(
                            &start.raw[range.clone()],
                            &mut reading.raw[range],
                        ),
                    };
                    if read {
                        reading.probes |= ProbeSet::$flag;
                    }
                }
            )+
        }

        /// The measures of the probes read in both `end` and `start`.
        #[inline(always)]
        fn delta_of(end: &Reading, start: &Reading, delta: &mut Delta) {
            let both = end.probes & start.probes;
            $(
                if both.contains(ProbeSet::$flag) {
                    let index = position(<$probe as Probe>::INFO.name);
                    let raw = RAW_OFFSETS[index]..RAW_OFFSETS[index] + <$probe as Probe>::RAW;
                    let first = MEASURE_OFFSETS[index];
                    let values = first..first + <$probe as Probe>::INFO.measures.len();
                    let present = <$probe as Probe>::delta(
                        &end.raw[raw.clone()],
                        &start.raw[raw],
                        &mut delta.values[values.clone()],
                    );
                    delta.present |= present << first;
                    delta.in_call_ns += <$probe as Probe>::in_call_cost_ns(&delta.values[values]);
                }
            )+
        }

        fn abandon_all(start: &Reading) {
            $(
                if start.probes.contains(ProbeSet::$flag) {
                    let at = RAW_OFFSETS[position(<$probe as Probe>::INFO.name)];
                    <$probe as Probe>::abandon(&start.raw[at..at + <$probe as Probe>::RAW]);
                }
            )+
        }

        /// `None` when the single probe `probe` works here, or why not.
        pub fn availability_of(probe: ProbeSet) -> Option<String> {
            $(
                if probe == ProbeSet::$flag {
                    return <$probe as Probe>::availability();
                }
            )+
            Some(format!("{probe:?} is not a single probe"))
        }

        /// Readies the single probe `probe` for a meter; `None`, or why it cannot run.
        fn activate_one(probe: ProbeSet) -> Option<String> {
            $(
                if probe == ProbeSet::$flag {
                    return <$probe as Probe>::activate();
                }
            )+
            Some(format!("{probe:?} is not a single probe"))
        }
    };
}

probes! {
    CPU: clock::Cpu,
    RUSAGE: rusage::Rusage,
    IO: thread_io::Io,
    GPU: gpu_probe::Gpu,
    ALLOC: alloc::Alloc,
}

/// The index of the probe called `name` in [`PROBES`] (a compile-time error if none is).
const fn position(name: &str) -> usize {
    let mut index = 0;
    while index < PROBES.len() {
        if catalog::same(PROBES[index].name, name) {
            return index;
        }
        index += 1;
    }
    panic!("no such probe");
}

/// Where each probe's integers start in a reading, and how many there are.
const RAW_OFFSETS: [usize; PROBES.len()] = prefix_sums(RAW_SIZES);
pub const RAW_COUNT: usize = RAW_OFFSETS[PROBES.len() - 1] + RAW_SIZES[PROBES.len() - 1];

/// Where each probe's measures start in [`MEASURES`].
const MEASURE_OFFSETS: [usize; PROBES.len()] = {
    let mut sizes = [0; PROBES.len()];
    let mut index = 0;
    while index < PROBES.len() {
        sizes[index] = PROBES[index].measures.len();
        index += 1;
    }
    prefix_sums(&sizes)
};

const fn prefix_sums<const N: usize>(sizes: &[usize]) -> [usize; N] {
    let mut out = [0; N];
    let mut index = 1;
    while index < N {
        out[index] = out[index - 1] + sizes[index - 1];
        index += 1;
    }
    out
}

impl ProbeSet {
    pub const NONE: ProbeSet = ProbeSet::empty();
    pub const ALL: ProbeSet = ProbeSet::all();
    /// What a meter reads unless told otherwise (the probes declared `default`).
    pub const DEFAULT: ProbeSet = {
        let mut bits = 0;
        let mut index = 0;
        while index < PROBES.len() {
            if PROBES[index].default {
                bits |= 1 << index;
            }
            index += 1;
        }
        ProbeSet::from_bits_truncate(bits)
    };

    /// The probe users call `name` (bitflags' own `from_name` takes the flag's name).
    pub fn by_name(name: &str) -> Option<ProbeSet> {
        PROBES
            .iter()
            .position(|probe| probe.name == name)
            .map(|index| ProbeSet::from_bits_truncate(1 << index))
    }

    /// Each probe of the set, with its declaration, in [`PROBES`] order.
    pub fn each(self) -> impl Iterator<Item = (ProbeSet, &'static ProbeInfo)> {
        PROBES
            .iter()
            .enumerate()
            .map(|(index, info)| (ProbeSet::from_bits_truncate(1 << index), info))
            .filter(move |(probe, _)| self.contains(*probe))
    }

    pub fn names(self) -> impl Iterator<Item = &'static str> {
        self.each().map(|(_, info)| info.name)
    }

    pub const fn without(self, other: ProbeSet) -> ProbeSet {
        ProbeSet::from_bits_truncate(self.bits() & !other.bits())
    }
}

/// Index of each probe measure in a [`Delta`] and in [`MEASURES`].
pub mod measure {
    use super::{catalog, MEASURE_OFFSETS, PROBES};

    /// Every probe measure, in [`PROBES`](super::PROBES) order.
    pub const COUNT: usize = {
        let last = PROBES.len() - 1;
        MEASURE_OFFSETS[last] + PROBES[last].measures.len()
    };

    /// The index of the measure whose snapshot key is `key` (a compile-time error if none
    /// is, where used in a constant).
    pub const fn index(key: &str) -> usize {
        let mut index = 0;
        while index < COUNT {
            if catalog::same(super::MEASURES[index].key, key) {
                return index;
            }
            index += 1;
        }
        panic!("no such measure");
    }

    pub const CPU_TIME: usize = index("cpu.time");
}

/// Every probe measure, flat, indexed by [`measure`].
pub const MEASURES: [Measure; measure::COUNT] = {
    let mut out = [DURATION; measure::COUNT];
    let mut probe = 0;
    while probe < PROBES.len() {
        let measures = PROBES[probe].measures;
        let mut index = 0;
        while index < measures.len() {
            out[MEASURE_OFFSETS[probe] + index] = measures[index];
            index += 1;
        }
        probe += 1;
    }
    out
};

/// The probe each measure belongs to, indexed by [`measure`].
pub const MEASURE_PROBES: [ProbeSet; measure::COUNT] = {
    let mut out = [ProbeSet::NONE; measure::COUNT];
    let mut probe = 0;
    while probe < PROBES.len() {
        let mut index = 0;
        while index < PROBES[probe].measures.len() {
            out[MEASURE_OFFSETS[probe] + index] = ProbeSet::from_bits_truncate(1 << probe);
            index += 1;
        }
        probe += 1;
    }
    out
};

/// The raw integers of one thread's probes at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    raw: [u64; RAW_COUNT],
    /// The probes that were actually read (IO can fail where /proc is not readable).
    pub probes: ProbeSet,
    /// Fork generation at the time of reading: a delta across a fork is meaningless.
    pub generation: u64,
    /// The thread that read it: the counters are per thread, so readings of two threads
    /// (a `with` block resumed in another thread) do not subtract.
    pub thread: usize,
}

/// What one call (or one step of it) used: a value per measure, and which have one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub values: [u64; measure::COUNT],
    /// Bit i: measure i has a value.
    pub present: u32,
    /// What the probes added inside the call (the allocation probe's per-allocation work).
    pub in_call_ns: u64,
}

impl Delta {
    pub const fn has(&self, index: usize) -> bool {
        self.present & (1 << index) != 0
    }

    /// Sets measure `index` (tests, and the GPU's per-device values).
    pub fn set(&mut self, index: usize, value: u64) {
        self.values[index] = value;
        self.present |= 1 << index;
    }

    /// Adds the next step of the same call.
    #[inline]
    pub fn accumulate(&mut self, step: &Delta) {
        for (index, info) in MEASURES.iter().enumerate() {
            if !step.has(index) {
                continue;
            }
            let value = step.values[index];
            self.values[index] = match info.combine {
                Combine::Sum => self.values[index].saturating_add(value),
                Combine::Last => value,
                Combine::Max if self.has(index) => self.values[index].max(value),
                Combine::Max => value,
            };
        }
        self.present |= step.present;
        self.in_call_ns += step.in_call_ns;
    }
}

/// This thread's number, never another's for the life of the process: `pthread_self` is
/// not (a thread started after another ended often gets its handle), and two threads'
/// counters must never subtract.
#[inline]
fn thread_number() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    thread_local! {
        static NUMBER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    NUMBER
        .try_with(|number| match number.get() {
            0 => {
                let new = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                number.set(new);
                new
            }
            known => known,
        })
        .unwrap_or(0)
}

const STAGES: [Stage; 4] = [Stage::Outer, Stage::Counters, Stage::Clock, Stage::Inner];

impl Reading {
    /// The reading before a call, the stages outside in.
    #[inline]
    pub fn take_before(probes: ProbeSet) -> Reading {
        let mut reading = Reading {
            raw: [0; RAW_COUNT],
            probes: ProbeSet::NONE,
            generation: fork::generation(),
            thread: thread_number(),
        };
        for stage in STAGES {
            read_stage(stage, probes, None, &mut reading);
        }
        reading
    }

    /// The reading after the call whose reading before was `start`: the probes it read,
    /// the stages inside out.
    #[inline]
    pub fn take_after(start: &Reading) -> Reading {
        let mut reading = Reading {
            raw: [0; RAW_COUNT],
            probes: ProbeSet::NONE,
            generation: fork::generation(),
            thread: thread_number(),
        };
        for stage in STAGES.into_iter().rev() {
            read_stage(stage, start.probes, Some(start), &mut reading);
        }
        reading
    }

    /// The change since `start` so far, mid-call, from the probes whose reading after has
    /// no side effect (the clock and the counters: not the allocation or GPU probes, whose
    /// reading after ends their scope); `None` as for [`since`](Self::since).
    pub fn peek_since(start: &Reading) -> Option<Delta> {
        let mut pure = *start;
        pure.probes = start.probes.without(ProbeSet::ALLOC.union(ProbeSet::GPU));
        Reading::take_after(&pure).since(&pure)
    }

    /// A reading before a call that will not be read after it.
    pub fn abandon(&self) {
        abandon_all(self);
    }

    /// The change from `start` to `self`, or `None` when the two readings are not
    /// comparable (taken on either side of a fork, or by two threads). Only probes read
    /// both times count.
    #[inline]
    pub fn since(&self, start: &Reading) -> Option<Delta> {
        if self.generation != start.generation || self.thread != start.thread {
            return None;
        }
        let mut delta = Delta::default();
        delta_of(self, start, &mut delta);
        Some(delta)
    }

    /// The raw integers (the benchmark floor sums their differences).
    pub fn raw(&self) -> &[u64] {
        &self.raw
    }
}

/// Each probe name with `None` when it works here, or a sentence saying why not.
pub fn availability() -> Vec<(&'static str, Option<String>)> {
    ProbeSet::ALL
        .each()
        .map(|(probe, info)| (info.name, availability_of(probe)))
        .collect()
}

/// Readies the probes of `requested` for a meter; returns those that cannot run here
/// (only those asked for are checked: a meter without `gpu` never loads NVML).
pub fn activate(requested: ProbeSet) -> ProbeSet {
    requested
        .each()
        .filter(|&(probe, _)| activate_one(probe).is_some())
        .fold(ProbeSet::NONE, |missing, (probe, _)| missing.union(probe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const IO_READ: usize = measure::index("io.read");
    const IO_WRITE: usize = measure::index("io.write");
    const FAULTS_MINOR: usize = measure::index("paging.faults.minor");
    const FAULTS_MAJOR: usize = measure::index("paging.faults.major");
    const SWITCHES_VOLUNTARY: usize = measure::index("context_switches.voluntary");
    const GPU_ENERGY: usize = measure::index("gpu.energy");
    const GPU_MEMORY: usize = measure::index("gpu.memory");

    fn delta_of(probes: ProbeSet, work: impl FnOnce()) -> Delta {
        let start = Reading::take_before(probes);
        work();
        Reading::take_after(&start).since(&start).unwrap()
    }

    /// The bits of every measure of `probes`.
    fn measures_of(probes: ProbeSet) -> u32 {
        MEASURE_PROBES
            .iter()
            .enumerate()
            .filter(|(_, probe)| probes.contains(**probe))
            .fold(0, |bits, (index, _)| bits | 1 << index)
    }

    #[test]
    fn names_round_trip() {
        for (probe, info) in ProbeSet::ALL.each() {
            assert_eq!(ProbeSet::by_name(info.name), Some(probe));
        }
        assert_eq!(ProbeSet::by_name("tpu"), None);
        assert_eq!(
            ProbeSet::DEFAULT.names().collect::<Vec<_>>(),
            ["cpu", "rusage", "io"]
        );
        assert_eq!(
            ProbeSet::ALL.names().collect::<Vec<_>>(),
            PROBES.iter().map(|probe| probe.name).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_os_probes_are_available_on_linux() {
        for (probe, info) in ProbeSet::DEFAULT.each() {
            assert_eq!(availability_of(probe), None, "probe {}", info.name);
        }
    }

    #[test]
    fn an_empty_call_reads_no_io_bytes_of_its_own() {
        // The probe's own pread of /proc/thread-self/io must not be charged to the call.
        for _ in 0..100 {
            let delta = delta_of(ProbeSet::DEFAULT, || {});
            assert_eq!(delta.present, measures_of(ProbeSet::DEFAULT));
            assert_eq!(delta.values[IO_READ], 0);
            assert_eq!(delta.values[IO_WRITE], 0);
        }
    }

    #[test]
    fn nested_readings_do_not_leak_probe_bytes_into_the_outer_call() {
        let outer = delta_of(ProbeSet::IO, || {
            for _ in 0..10 {
                delta_of(ProbeSet::IO, || {});
            }
        });
        assert_eq!(outer.values[IO_READ], 0);
    }

    #[test]
    fn io_bytes_are_exact_for_known_reads_and_writes() {
        let dir = std::env::temp_dir().join(format!("meterage-probe-{}", std::process::id()));
        let payload = vec![7u8; 12_345];
        let delta = delta_of(ProbeSet::IO, || {
            let mut file = std::fs::File::create(&dir).unwrap();
            file.write_all(&payload).unwrap();
        });
        assert_eq!(delta.values[IO_WRITE], 12_345);
        assert_eq!(delta.values[IO_READ], 0);

        let delta = delta_of(ProbeSet::IO, || {
            let mut buf = Vec::new();
            std::fs::File::open(&dir)
                .unwrap()
                .read_to_end(&mut buf)
                .unwrap();
            assert_eq!(buf.len(), 12_345);
        });
        // read_to_end also issues a final zero-byte read, which adds nothing.
        assert_eq!(delta.values[IO_READ], 12_345);
        assert_eq!(delta.values[IO_WRITE], 0);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn readings_are_per_thread() {
        let delta = delta_of(ProbeSet::IO, || {
            std::thread::spawn(|| {
                let mut sink = std::io::sink();
                let path = std::env::temp_dir().join(format!("meterage-t-{}", std::process::id()));
                std::fs::write(&path, [1u8; 4096]).unwrap();
                std::fs::remove_file(&path).unwrap();
                sink.write_all(b"x").unwrap();
            })
            .join()
            .unwrap();
        });
        assert_eq!(delta.values[IO_WRITE], 0);
    }

    #[test]
    fn fresh_pages_count_as_minor_faults() {
        const SIZE: usize = 64 * 4096;
        let delta = delta_of(ProbeSet::RUSAGE, || {
            // An anonymous mapping: fresh pages, whatever the heap holds already.
            // SAFETY: a private anonymous mapping of SIZE bytes, written within its
            // bounds and unmapped once.
            unsafe {
                let pages = libc::mmap(
                    std::ptr::null_mut(),
                    SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(pages, libc::MAP_FAILED);
                for offset in (0..SIZE).step_by(4096) {
                    pages.cast::<u8>().add(offset).write_volatile(1);
                }
                libc::munmap(pages, SIZE);
            }
        });
        // 64 fresh pages: at least most of them fault once (THP may merge some).
        assert!(delta.values[FAULTS_MINOR] >= 1);
        assert_eq!(delta.values[FAULTS_MAJOR], 0);
    }

    #[test]
    fn sleeping_is_a_voluntary_context_switch() {
        let delta = delta_of(ProbeSet::RUSAGE, || {
            std::thread::sleep(std::time::Duration::from_millis(2));
        });
        assert!(delta.values[SWITCHES_VOLUNTARY] >= 1);
    }

    #[test]
    fn levels_keep_the_last_step_and_amounts_add_up() {
        let mut total = Delta::default();
        for (energy, memory) in [(100, 5_000), (50, 7_000)] {
            let mut step = Delta::default();
            step.set(GPU_ENERGY, energy);
            step.set(GPU_MEMORY, memory);
            total.accumulate(&step);
        }
        assert_eq!(total.values[GPU_ENERGY], 150);
        assert_eq!(total.values[GPU_MEMORY], 7_000);
        // A step without the reading keeps the level it had.
        total.accumulate(&Delta::default());
        assert_eq!(total.values[GPU_MEMORY], 7_000);
    }

    #[test]
    fn accumulate_sums_steps() {
        let mut total = Delta::default();
        let mut step = Delta::default();
        step.set(IO_READ, 5);
        total.accumulate(&step);
        total.accumulate(&step);
        assert_eq!(total.values[IO_READ], 10);
        assert_eq!(total.present, 1 << IO_READ);
    }

    #[test]
    fn readings_of_two_threads_are_not_comparable() {
        let start = Reading::take_before(ProbeSet::IO);
        let elsewhere = std::thread::spawn(move || Reading::take_after(&start))
            .join()
            .unwrap();
        assert!(elsewhere.since(&start).is_none());
        assert!(Reading::take_after(&start).since(&start).is_some());
    }

    #[test]
    fn readings_of_a_thread_and_a_later_one_with_its_handle_are_not_comparable() {
        let (handle, start) = std::thread::spawn(|| {
            // SAFETY: no preconditions.
            let handle = unsafe { libc::pthread_self() } as usize;
            (handle, Reading::take_before(ProbeSet::CPU))
        })
        .join()
        .unwrap();
        // Threads started one after another: glibc hands a later one the earlier handle
        // (and stack) from its cache, most of the time.
        let mut reused = false;
        for _ in 0..20 {
            let (same_handle, comparable) = std::thread::spawn(move || {
                // SAFETY: no preconditions.
                let mine = unsafe { libc::pthread_self() } as usize;
                (
                    mine == handle,
                    Reading::take_after(&start).since(&start).is_some(),
                )
            })
            .join()
            .unwrap();
            reused |= same_handle;
            assert!(!comparable);
        }
        assert!(
            reused,
            "no later thread got the handle: the case was not tried"
        );
    }

    #[test]
    fn readings_across_a_fork_are_not_comparable() {
        let start = Reading::take_before(ProbeSet::CPU);
        let mut later = Reading::take_before(ProbeSet::CPU);
        later.generation += 1;
        assert!(later.since(&start).is_none());
    }
}
