//! The `gpu` probe's declaration: a call's GPU energy and this process's GPU memory at its
//! end, from the readings of [`gpu`](super::gpu).

use super::catalog::{Combine, Measure, Probe, ProbeInfo, Stage};
use super::gpu::{self, GpuReading};

pub struct Gpu;

/// Joules per call: a millisecond of a small GPU to minutes of a large one.
pub const ENERGY_BOUNDARIES: [f64; 14] = [
    0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0,
];

/// GPU memory held at the end of a call: 0, then powers of 4 from 1 MiB to 256 GiB.
pub const MEMORY_BOUNDARIES: [f64; 11] = {
    let mut out = [0.0; 11];
    let mut k = 0;
    while k < 10 {
        out[k + 1] = ((1u64 << 20) << (2 * k)) as f64;
        k += 1;
    }
    out
};

/// How a call's energy was found: the device's counter, or power × time.
const SOURCE_KEY: &str = "meterage.gpu.energy.source";
const ENERGY: &str = "Energy the counted GPUs used during metered calls (all work on them).";
const ENERGY_SOURCE: &str =
    "NVML: the GPUs' energy counter across calls of ≥ 100 ms; power × time for shorter ones";

const fn energy(
    key: &'static str,
    attributes: &'static [(&'static str, &'static str)],
    factor: f64,
) -> Measure {
    Measure {
        key,
        unit: "J",
        factor,
        combine: Combine::Sum,
        metric: "meterage.call.gpu.energy",
        attributes,
        description: ENERGY,
        boundaries: &ENERGY_BOUNDARIES,
        source: ENERGY_SOURCE,
    }
}

impl Probe for Gpu {
    const INFO: ProbeInfo = ProbeInfo {
        name: "gpu",
        default: false,
        measures: &[
            energy("gpu.energy", &[(SOURCE_KEY, "counter")], 1e-3), // mJ
            energy("gpu.energy.estimated", &[(SOURCE_KEY, "power_estimate")], 1e-6), // µJ
            Measure {
                key: "gpu.memory",
                unit: "By",
                factor: 1.0,
                combine: Combine::Last,
                metric: "meterage.call.gpu.memory",
                attributes: &[],
                description:
                    "GPU memory of this process on the counted GPUs at the end of metered calls.",
                boundaries: &MEMORY_BOUNDARIES,
                source: "NVML: this process's memory on the counted GPUs when the call ends (a level, not an amount)",
            },
        ],
    };
    // Driver calls, slow next to the thread's counters: read outside them.
    const STAGE: Stage = Stage::Outer;
    const RAW: usize = 6;

    // A reading before may hold nothing (a GPU without an energy counter) while the one
    // after has power for an estimate: what each holds decides, in `delta`.
    fn before(raw: &mut [u64]) -> bool {
        gpu::read_before().to_raw(raw);
        true
    }

    fn after(_start: &[u64], raw: &mut [u64]) -> bool {
        gpu::read_after().to_raw(raw);
        true
    }

    fn delta(end: &[u64], start: &[u64], out: &mut [u64]) -> u32 {
        let delta = GpuReading::from_raw(end).since(&GpuReading::from_raw(start));
        let mut present = 0;
        for (index, value) in [
            delta.energy_mj,
            delta.estimated_energy_uj,
            delta.memory_bytes,
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(value) = value {
                out[index] = value;
                present |= 1 << index;
            }
        }
        present
    }

    fn availability() -> Option<String> {
        gpu::availability()
    }
}
