//! Each counted GPU's utilization, memory, power, energy and temperature, and this
//! process's memory and share of its work, read at collection time through the `gpu`
//! probe's view of the counted devices ([`gpus`]).

use crate::probe::gpu::{gpus, memory_of, Gpus};
use crate::probe::nvml::{self, Device};

/// This process's share of a device's work since the previous reading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessShare {
    /// Fractions (0–1) of the time the SMs, encoder and decoder worked for this process.
    pub sm: f64,
    pub encoder: f64,
    pub decoder: f64,
}

/// One device at collection time. Values the device does not support are `None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceReading {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Fractions (0–1) of time busy: any kernel, the encoder, the decoder.
    pub utilization: Option<f64>,
    pub encoder_utilization: Option<f64>,
    pub decoder_utilization: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_watts: Option<f64>,
    pub energy_joules: Option<f64>,
    pub temperature_celsius: Option<f64>,
    /// This process's memory and work on the device (`None` when its host PID is unknown).
    pub process_memory_bytes: Option<u64>,
    pub process_share: Option<ProcessShare>,
    /// Queries that failed for another reason than "not supported".
    pub errors: Vec<String>,
}

/// The driver version and every counted device's reading, or why there are none.
pub fn read_devices() -> Result<(String, Vec<DeviceReading>), String> {
    let gpus = gpus()?;
    let devices = gpus.devices().map(|d| read_device(&gpus, d)).collect();
    Ok((gpus.nvml.driver_version.clone(), devices))
}

/// `result`'s value; a failure other than "not supported" is noted in `errors`.
fn keep<T>(errors: &mut Vec<String>, what: &str, result: Result<T, nvml::Error>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(error) => {
            if error.code != nvml::ERROR_NOT_SUPPORTED {
                errors.push(format!("{what}: {error}"));
            }
            None
        }
    }
}

fn fraction(percent: u32) -> f64 {
    f64::from(percent.min(100)) / 100.0
}

fn read_device(gpus: &Gpus, device: &Device) -> DeviceReading {
    let nvml = &gpus.nvml;
    let mut errors = Vec::new();
    let utilization = keep(&mut errors, "utilization", nvml.utilization(device));
    let (encoder, decoder) = nvml.codec_utilization(device);
    let encoder = keep(&mut errors, "encoder utilization", encoder);
    let decoder = keep(&mut errors, "decoder utilization", decoder);
    let memory = keep(&mut errors, "memory", nvml.memory(device));
    let power = keep(&mut errors, "power", nvml.power_mw(device));
    let energy = keep(&mut errors, "energy", nvml.total_energy_mj(device));
    let temperature = keep(&mut errors, "temperature", nvml.temperature_celsius(device));
    let (process_memory_bytes, process_share) = match gpus.host_pid {
        Ok(pid) => {
            let processes = keep(&mut errors, "processes", nvml.compute_processes(device));
            let memory = processes.and_then(|all| memory_of(&all, pid));
            (memory, process_share(gpus, device, pid, &mut errors))
        }
        Err(_) => (None, None),
    };
    DeviceReading {
        index: device.index,
        uuid: device.uuid.clone(),
        name: device.name.clone(),
        utilization: utilization.map(|(gpu, _)| fraction(gpu)),
        encoder_utilization: encoder.map(fraction),
        decoder_utilization: decoder.map(fraction),
        memory_used_bytes: memory.map(|(used, _)| used),
        memory_total_bytes: memory.map(|(_, total)| total),
        power_watts: power.map(|mw| f64::from(mw) / 1000.0),
        energy_joules: energy.map(|mj| mj as f64 / 1000.0),
        temperature_celsius: temperature.map(f64::from),
        process_memory_bytes,
        process_share,
        errors,
    }
}

/// How far back a device reading looks for this process's utilization samples.
const PROCESS_SAMPLE_WINDOW_US: u64 = 1_000_000;

/// This process's newest utilization sample from the last second (NVML keeps one per
/// driver sample period, 1/6 s to 1 s; none: the process did no work on the device in
/// that time, so 0). Stateless, so every reader of every provider sees the same value.
fn process_share(
    gpus: &Gpus,
    device: &Device,
    pid: u32,
    errors: &mut Vec<String>,
) -> Option<ProcessShare> {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64);
    let since = now_us.saturating_sub(PROCESS_SAMPLE_WINDOW_US);
    let samples = keep(
        errors,
        "process utilization",
        gpus.nvml.process_utilization(device, since),
    )?;
    let own = samples
        .iter()
        .filter(|s| s.pid == pid)
        .max_by_key(|s| s.timestamp_us);
    Some(own.map_or(ProcessShare::default(), |s| ProcessShare {
        sm: fraction(s.sm_percent),
        encoder: fraction(s.encoder_percent),
        decoder: fraction(s.decoder_percent),
    }))
}
