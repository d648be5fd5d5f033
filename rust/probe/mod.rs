//! Probes: the OS counters read around each metered call.
//!
//! A call reads its probes once before and once after; the difference is the call's cost.
//! The OS readings are per thread, so a call is charged only for its own thread's work;
//! the GPU readings are per device (see [`gpu`]).

pub mod clock;
pub mod fork;
pub mod gpu;
pub mod nvml;
mod rusage;
mod thread_io;

pub use clock::{monotonic_ns, thread_cpu_ns};

/// A set of probes, as bits. The wall clock is not a probe: every call is timed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProbeSet(u8);

impl ProbeSet {
    pub const NONE: ProbeSet = ProbeSet(0);
    /// Exact thread CPU time (CLOCK_THREAD_CPUTIME_ID).
    pub const CPU: ProbeSet = ProbeSet(1);
    /// Page faults and context switches (getrusage(RUSAGE_THREAD)).
    pub const RUSAGE: ProbeSet = ProbeSet(2);
    /// Bytes of the read/write syscall family and of storage IO (/proc/thread-self/io);
    /// socket send/recv, splice and mmap are not counted (see `thread_io`).
    pub const IO: ProbeSet = ProbeSet(4);
    /// The GPU energy counter difference of a call (long enough for the counter).
    pub const GPU_ENERGY: ProbeSet = ProbeSet(8);
    /// A power × time estimate of a call's GPU energy (calls too short for the counter).
    pub const GPU_ENERGY_ESTIMATE: ProbeSet = ProbeSet(16);
    /// This process's GPU memory at the end of a call.
    pub const GPU_MEMORY: ProbeSet = ProbeSet(32);
    /// The `gpu` probe (NVML): its three measures.
    pub const GPU: ProbeSet = ProbeSet(8 | 16 | 32);
    pub const ALL: ProbeSet = ProbeSet(63);
    /// What a meter reads unless told otherwise: the OS probes (GPU is opt-in).
    pub const DEFAULT: ProbeSet = ProbeSet(7);

    /// Probe names in a fixed order, as the Python API spells them.
    pub const NAMES: [(&'static str, ProbeSet); 4] = [
        ("cpu", ProbeSet::CPU),
        ("rusage", ProbeSet::RUSAGE),
        ("io", ProbeSet::IO),
        ("gpu", ProbeSet::GPU),
    ];

    pub fn from_name(name: &str) -> Option<ProbeSet> {
        Self::NAMES
            .iter()
            .find(|(probe_name, _)| *probe_name == name)
            .map(|(_, probe)| *probe)
    }

    /// The set with these bits; unknown bits are dropped.
    pub const fn from_bits(bits: u8) -> ProbeSet {
        ProbeSet(bits & ProbeSet::ALL.0)
    }
    pub const fn bits(self) -> u8 {
        self.0
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub const fn contains(self, other: ProbeSet) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn intersects(self, other: ProbeSet) -> bool {
        self.0 & other.0 != 0
    }
    pub const fn union(self, other: ProbeSet) -> ProbeSet {
        ProbeSet(self.0 | other.0)
    }
    pub const fn without(self, other: ProbeSet) -> ProbeSet {
        ProbeSet(self.0 & !other.0)
    }
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .filter(move |(_, probe)| self.contains(*probe))
            .map(|(name, _)| *name)
    }
}

/// What one probe measure is: its snapshot key, unit, the probe that reads it and the
/// factor from the raw integer reading to the unit (nanoseconds to seconds for CPU time).
#[derive(Clone, Copy, Debug)]
pub struct MeasureInfo {
    pub name: &'static str,
    pub unit: &'static str,
    pub probe: ProbeSet,
    pub factor: f64,
    /// A level at the end of the call (GPU memory), not an amount used during it: steps
    /// of a call keep the last, and totals over calls take the largest.
    pub level: bool,
}

/// Index of each probe measure in a [`Reading`].
pub mod measure {
    pub const CPU_TIME: usize = 0;
    pub const FAULTS_MINOR: usize = 1;
    pub const FAULTS_MAJOR: usize = 2;
    pub const SWITCHES_VOLUNTARY: usize = 3;
    pub const SWITCHES_INVOLUNTARY: usize = 4;
    pub const IO_READ: usize = 5;
    pub const IO_WRITE: usize = 6;
    pub const DISK_READ: usize = 7;
    pub const DISK_WRITE: usize = 8;
    pub const GPU_ENERGY: usize = 9;
    pub const GPU_ENERGY_ESTIMATED: usize = 10;
    pub const GPU_MEMORY: usize = 11;
    pub const COUNT: usize = 12;
}

/// The wall-clock measure every call records.
pub const DURATION: MeasureInfo = MeasureInfo {
    name: "duration",
    unit: "s",
    probe: ProbeSet::NONE,
    factor: 1e-9,
    level: false,
};

/// The probe measures, indexed by [`measure`].
pub const MEASURES: [MeasureInfo; measure::COUNT] = [
    MeasureInfo {
        name: "cpu.time",
        unit: "s",
        probe: ProbeSet::CPU,
        factor: 1e-9,
        level: false,
    },
    MeasureInfo {
        name: "paging.faults.minor",
        unit: "{fault}",
        probe: ProbeSet::RUSAGE,
        factor: 1.0,
        level: false,
    },
    MeasureInfo {
        name: "paging.faults.major",
        unit: "{fault}",
        probe: ProbeSet::RUSAGE,
        factor: 1.0,
        level: false,
    },
    MeasureInfo {
        name: "context_switches.voluntary",
        unit: "{context_switch}",
        probe: ProbeSet::RUSAGE,
        factor: 1.0,
        level: false,
    },
    MeasureInfo {
        name: "context_switches.involuntary",
        unit: "{context_switch}",
        probe: ProbeSet::RUSAGE,
        factor: 1.0,
        level: false,
    },
    MeasureInfo {
        name: "io.read",
        unit: "By",
        probe: ProbeSet::IO,
        factor: 1.0,
        level: false,
    },
    MeasureInfo {
        name: "io.write",
        unit: "By",
        probe: ProbeSet::IO,
        factor: 1.0,
        level: false,
    },
    MeasureInfo {
        name: "disk.io.read",
        unit: "By",
        probe: ProbeSet::IO,
        factor: 1.0,
        level: false,
    },
    MeasureInfo {
        name: "disk.io.write",
        unit: "By",
        probe: ProbeSet::IO,
        factor: 1.0,
        level: false,
    },
    MeasureInfo {
        name: "gpu.energy",
        unit: "J",
        probe: ProbeSet::GPU_ENERGY,
        factor: 1e-3, // mJ
        level: false,
    },
    MeasureInfo {
        name: "gpu.energy.estimated",
        unit: "J",
        probe: ProbeSet::GPU_ENERGY_ESTIMATE,
        factor: 1e-6, // µJ
        level: false,
    },
    MeasureInfo {
        name: "gpu.memory",
        unit: "By",
        probe: ProbeSet::GPU_MEMORY,
        factor: 1.0,
        level: true,
    },
];

/// Raw counter values of one thread at one instant, indexed by [`measure`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub values: [u64; measure::COUNT],
    /// The probes that were actually read (IO can fail where /proc is not readable).
    pub probes: ProbeSet,
    /// Fork generation at the time of reading: a delta across a fork is meaningless.
    pub generation: u64,
    /// The thread that read it: the counters are per thread, so readings of two threads
    /// (a `with` block resumed in another thread) do not subtract.
    pub thread: usize,
    /// The GPU readings (raw readings only; a delta has its GPU values in `values`).
    pub gpu: gpu::GpuReading,
}

impl Reading {
    /// The reading before a call: the CPU clock last, so the other probes' own cost
    /// (the IO pread is ~2 µs) is not charged to the call's CPU time; the GPU first, so
    /// its driver calls are not charged to the call's context switches either.
    #[inline]
    pub fn take_before(probes: ProbeSet) -> Reading {
        let gpu = if probes.intersects(ProbeSet::GPU) {
            gpu::read_before()
        } else {
            gpu::GpuReading::default()
        };
        let mut reading = Self::counters(probes);
        reading.gpu = gpu;
        if probes.contains(ProbeSet::CPU) {
            reading.values[measure::CPU_TIME] = thread_cpu_ns();
            reading.probes = reading.probes.union(ProbeSet::CPU);
        }
        reading
    }

    /// The reading after a call: the CPU clock first, for the same reason.
    #[inline]
    pub fn take_after(probes: ProbeSet) -> Reading {
        let cpu = probes.contains(ProbeSet::CPU).then(thread_cpu_ns);
        let mut reading = Self::counters(probes);
        if let Some(cpu) = cpu {
            reading.values[measure::CPU_TIME] = cpu;
            reading.probes = reading.probes.union(ProbeSet::CPU);
        }
        if probes.intersects(ProbeSet::GPU) {
            reading.gpu = gpu::read_after();
        }
        reading
    }

    /// Everything but the CPU clock.
    #[inline]
    fn counters(probes: ProbeSet) -> Reading {
        let mut reading = Reading {
            generation: fork::generation(),
            // SAFETY: pthread_self has no preconditions (it reads a register).
            thread: unsafe { libc::pthread_self() } as usize,
            ..Reading::default()
        };
        let values = &mut reading.values;
        let mut read = ProbeSet::NONE;
        if probes.contains(ProbeSet::RUSAGE) && rusage::read_thread(values) {
            read = read.union(ProbeSet::RUSAGE);
        }
        if probes.contains(ProbeSet::IO) && thread_io::read_thread(values) {
            read = read.union(ProbeSet::IO);
        }
        reading.probes = read;
        reading
    }

    /// The change from `start` to `self`, or `None` when the two readings are not
    /// comparable (taken on either side of a fork, or by two threads). Only probes read
    /// both times count.
    #[inline]
    pub fn since(&self, start: &Reading) -> Option<Reading> {
        if self.generation != start.generation || self.thread != start.thread {
            return None;
        }
        let mut delta = Reading {
            probes: ProbeSet(self.probes.0 & start.probes.0),
            generation: self.generation,
            ..Reading::default()
        };
        for index in 0..measure::COUNT {
            delta.values[index] = self.values[index].saturating_sub(start.values[index]);
        }
        if delta.probes.contains(ProbeSet::CPU) {
            delta.values[measure::CPU_TIME] =
                delta.values[measure::CPU_TIME].saturating_sub(clock::thread_cpu_read_cost_ns());
        }
        if !self.gpu.is_empty() {
            // Probed calls of meters without `gpu` skip this (their readings are empty).
            delta.add_gpu(self.gpu.since(&start.gpu));
        }
        Some(delta)
    }

    /// Puts a call's GPU measures into this delta.
    fn add_gpu(&mut self, gpu: gpu::GpuDelta) {
        for (value, index, probe) in [
            (gpu.energy_mj, measure::GPU_ENERGY, ProbeSet::GPU_ENERGY),
            (
                gpu.estimated_energy_uj,
                measure::GPU_ENERGY_ESTIMATED,
                ProbeSet::GPU_ENERGY_ESTIMATE,
            ),
            (gpu.memory_bytes, measure::GPU_MEMORY, ProbeSet::GPU_MEMORY),
        ] {
            if let Some(value) = value {
                self.values[index] = value;
                self.probes = self.probes.union(probe);
            }
        }
    }

    /// Adds another delta into this one (steps of a coroutine or generator).
    #[inline]
    pub fn accumulate(&mut self, other: &Reading) {
        for (index, info) in MEASURES.iter().enumerate() {
            if !info.level {
                self.values[index] += other.values[index];
            } else if other.probes.contains(info.probe) {
                self.values[index] = other.values[index];
            }
        }
        self.probes = self.probes.union(other.probes);
    }
}

/// Each probe name with `None` when it works here, or a sentence saying why not.
pub fn availability() -> Vec<(&'static str, Option<String>)> {
    ProbeSet::NAMES
        .iter()
        .map(|&(name, probe)| (name, availability_of(probe)))
        .collect()
}

/// `None` when `probe` (one of [`ProbeSet::NAMES`]) works here, or why not. Asking about
/// the GPU loads NVML.
pub fn availability_of(probe: ProbeSet) -> Option<String> {
    // The OS probes either work on this kernel or not: found out once per process (an IO
    // check opens a file, ~10 us, which making a meter must not pay every time).
    static OS: std::sync::OnceLock<[Option<String>; 3]> = std::sync::OnceLock::new();
    let os = || {
        OS.get_or_init(|| {
            [
                clock_availability(),
                rusage::availability(),
                thread_io::availability(),
            ]
        })
    };
    match probe {
        ProbeSet::CPU => os()[0].clone(),
        ProbeSet::RUSAGE => os()[1].clone(),
        ProbeSet::IO => os()[2].clone(),
        ProbeSet::GPU => gpu::availability(),
        _ => Some(format!("{probe:?} is not a single probe")),
    }
}

fn clock_availability() -> Option<String> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc != 0).then(|| {
        format!(
            "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed: {}",
            std::io::Error::last_os_error()
        )
    })
}

/// Probes from `requested` that do not work on this machine (only those asked about are
/// checked: a meter without `gpu` never loads NVML).
pub fn unavailable(requested: ProbeSet) -> ProbeSet {
    ProbeSet::NAMES
        .iter()
        .filter(|&&(_, probe)| requested.intersects(probe))
        .filter(|&&(_, probe)| availability_of(probe).is_some())
        .fold(ProbeSet::NONE, |missing, &(_, probe)| missing.union(probe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn delta_of(probes: ProbeSet, work: impl FnOnce()) -> Reading {
        let start = Reading::take_before(probes);
        work();
        Reading::take_after(probes).since(&start).unwrap()
    }

    #[test]
    fn names_round_trip() {
        for (name, probe) in ProbeSet::NAMES {
            assert_eq!(ProbeSet::from_name(name), Some(probe));
        }
        assert_eq!(ProbeSet::from_name("tpu"), None);
        assert_eq!(
            ProbeSet::DEFAULT.names().collect::<Vec<_>>(),
            ["cpu", "rusage", "io"]
        );
        assert_eq!(
            ProbeSet::ALL.names().collect::<Vec<_>>(),
            ["cpu", "rusage", "io", "gpu"]
        );
    }

    #[test]
    fn the_os_probes_are_available_on_linux() {
        for (name, probe) in ProbeSet::NAMES {
            if probe != ProbeSet::GPU {
                assert_eq!(availability_of(probe), None, "probe {name}");
            }
        }
    }

    #[test]
    fn an_empty_call_reads_no_io_bytes_of_its_own() {
        // The probe's own pread of /proc/thread-self/io must not be charged to the call.
        for _ in 0..100 {
            let delta = delta_of(ProbeSet::DEFAULT, || {});
            assert_eq!(delta.probes, ProbeSet::DEFAULT);
            assert_eq!(delta.values[measure::IO_READ], 0);
            assert_eq!(delta.values[measure::IO_WRITE], 0);
        }
    }

    #[test]
    fn nested_readings_do_not_leak_probe_bytes_into_the_outer_call() {
        let outer = delta_of(ProbeSet::IO, || {
            for _ in 0..10 {
                delta_of(ProbeSet::IO, || {});
            }
        });
        assert_eq!(outer.values[measure::IO_READ], 0);
    }

    #[test]
    fn io_bytes_are_exact_for_known_reads_and_writes() {
        let dir = std::env::temp_dir().join(format!("meterage-probe-{}", std::process::id()));
        let payload = vec![7u8; 12_345];
        let delta = delta_of(ProbeSet::IO, || {
            let mut file = std::fs::File::create(&dir).unwrap();
            file.write_all(&payload).unwrap();
        });
        assert_eq!(delta.values[measure::IO_WRITE], 12_345);
        assert_eq!(delta.values[measure::IO_READ], 0);

        let delta = delta_of(ProbeSet::IO, || {
            let mut buf = Vec::new();
            std::fs::File::open(&dir)
                .unwrap()
                .read_to_end(&mut buf)
                .unwrap();
            assert_eq!(buf.len(), 12_345);
        });
        // read_to_end also issues a final zero-byte read, which adds nothing.
        assert_eq!(delta.values[measure::IO_READ], 12_345);
        assert_eq!(delta.values[measure::IO_WRITE], 0);
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
        assert_eq!(delta.values[measure::IO_WRITE], 0);
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
        assert!(delta.values[measure::FAULTS_MINOR] >= 1);
        assert_eq!(delta.values[measure::FAULTS_MAJOR], 0);
    }

    #[test]
    fn sleeping_is_a_voluntary_context_switch() {
        let delta = delta_of(ProbeSet::RUSAGE, || {
            std::thread::sleep(std::time::Duration::from_millis(2));
        });
        assert!(delta.values[measure::SWITCHES_VOLUNTARY] >= 1);
    }

    #[test]
    fn levels_keep_the_last_step_and_amounts_add_up() {
        let mut total = Reading::default();
        for (energy, memory) in [(100, 5_000), (50, 7_000)] {
            let mut step = Reading::default();
            step.values[measure::GPU_ENERGY] = energy;
            step.values[measure::GPU_MEMORY] = memory;
            step.probes = ProbeSet::GPU_ENERGY.union(ProbeSet::GPU_MEMORY);
            total.accumulate(&step);
        }
        assert_eq!(total.values[measure::GPU_ENERGY], 150);
        assert_eq!(total.values[measure::GPU_MEMORY], 7_000);
        // A step without the reading keeps the level it had.
        total.accumulate(&Reading::default());
        assert_eq!(total.values[measure::GPU_MEMORY], 7_000);
    }

    #[test]
    fn accumulate_sums_steps() {
        let mut total = Reading::default();
        let mut step = Reading::default();
        step.values[measure::IO_READ] = 5;
        step.probes = ProbeSet::IO;
        total.accumulate(&step);
        total.accumulate(&step);
        assert_eq!(total.values[measure::IO_READ], 10);
        assert_eq!(total.probes, ProbeSet::IO);
    }

    #[test]
    fn readings_of_two_threads_are_not_comparable() {
        let start = Reading::take_before(ProbeSet::IO);
        let elsewhere = std::thread::spawn(|| Reading::take_after(ProbeSet::IO))
            .join()
            .unwrap();
        assert!(elsewhere.since(&start).is_none());
        assert!(Reading::take_after(ProbeSet::IO).since(&start).is_some());
    }

    #[test]
    fn readings_across_a_fork_are_not_comparable() {
        let start = Reading::take_before(ProbeSet::CPU);
        let mut later = Reading::take_before(ProbeSet::CPU);
        later.generation += 1;
        assert!(later.since(&start).is_none());
    }
}
