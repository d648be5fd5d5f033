//! The `gpu` probe, on top of [`nvml`](super::nvml), and the view of the counted devices
//! that it and the collection-time device readings
//! ([`collect::gpu_devices`](crate::collect::gpu_devices)) share.
//!
//! Per probed call: the energy the counted devices used during the call (from the total
//! energy counter, or a power × time estimate for short calls) and this process's GPU
//! memory on them at the end of the call.
//!
//! **Which devices count**: all that NVML lists, or those named by `CUDA_VISIBLE_DEVICES`
//! (indices, taken in NVML's PCI order, or `GPU-` UUID prefixes; as in CUDA, the list
//! stops at the first entry that names no device), or an explicit list ([`select`]).
//!
//! **Energy of short calls.** The energy counter moves only every ~20–100 ms, so the
//! difference of two readings less than [`ENERGY_COUNTER_MIN_NS`] apart is mostly 0 or
//! one whole update: not a measurement of the call. Such calls get `gpu.energy.estimated`
//! instead (power at the end of the call × the time between the readings), and longer
//! calls the counter difference as `gpu.energy`; a call never has both. The energy is the
//! whole device's during the call: other work on the device counts too.
//!
//! **The GIL.** A probed call's NVML queries are short driver calls, and they run with the
//! GIL held: releasing and retaking it around them would hand the GIL to any busy Python
//! thread for up to its switch interval (5 ms), twice per call. Everything that can take
//! long — loading NVML, the device readings, `gpu_info()` — runs with the GIL released
//! (the binding calls it so), and nothing here holds a lock while NVML initialises that a
//! metered call would wait for: the loaded state is read without locks.

use super::nvml::{self, Device, Nvml};
use crate::collect::host_pid::host_pid;
use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Calls shorter than this get a power × time estimate instead of the counter difference.
pub const ENERGY_COUNTER_MIN_NS: u64 = 100_000_000;
pub const VISIBLE_DEVICES_VARIABLE: &str = "CUDA_VISIBLE_DEVICES";

/// Raw GPU values around a call, summed over the counted devices. Kept small (it travels
/// inside every probe reading): a value is present when its bit in `present` is set
/// (absent: not read, or a device failed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuReading {
    /// Monotonic time of the energy reading.
    pub at_ns: u64,
    energy_mj: u64,
    memory_bytes: u64,
    power_mw: u32,
    /// The device selection the sums are over: readings of two selections do not subtract.
    selection: u32,
    present: u8,
}

const ENERGY: u8 = 1;
const POWER: u8 = 2;
const MEMORY: u8 = 4;

impl GpuReading {
    pub fn new(
        at_ns: u64,
        selection: u32,
        energy_mj: Option<u64>,
        power_mw: Option<u32>,
        memory_bytes: Option<u64>,
    ) -> Self {
        let bit = |present: bool, bit: u8| if present { bit } else { 0 };
        GpuReading {
            at_ns,
            selection,
            energy_mj: energy_mj.unwrap_or(0),
            memory_bytes: memory_bytes.unwrap_or(0),
            power_mw: power_mw.unwrap_or(0),
            present: bit(energy_mj.is_some(), ENERGY)
                | bit(power_mw.is_some(), POWER)
                | bit(memory_bytes.is_some(), MEMORY),
        }
    }

    /// Nothing was read (no `gpu` probe, or every query failed).
    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    fn has(&self, bit: u8) -> bool {
        self.present & bit != 0
    }
    pub fn energy_mj(&self) -> Option<u64> {
        self.has(ENERGY).then_some(self.energy_mj)
    }
    pub fn power_mw(&self) -> Option<u32> {
        self.has(POWER).then_some(self.power_mw)
    }
    pub fn memory_bytes(&self) -> Option<u64> {
        self.has(MEMORY).then_some(self.memory_bytes)
    }

    /// As the integers of a probe reading.
    pub(super) fn to_raw(self, raw: &mut [u64]) {
        raw[0] = self.at_ns;
        raw[1] = self.energy_mj;
        raw[2] = self.memory_bytes;
        raw[3] = self.power_mw as u64;
        raw[4] = self.selection as u64;
        raw[5] = self.present as u64;
    }

    pub(super) fn from_raw(raw: &[u64]) -> GpuReading {
        GpuReading {
            at_ns: raw[0],
            energy_mj: raw[1],
            memory_bytes: raw[2],
            power_mw: raw[3] as u32,
            selection: raw[4] as u32,
            present: raw[5] as u8,
        }
    }
}

/// What a call used, from two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuDelta {
    /// Counter difference, mJ (calls of at least [`ENERGY_COUNTER_MIN_NS`]).
    pub energy_mj: Option<u64>,
    /// Power × time, µJ (shorter calls, or devices without the counter).
    pub estimated_energy_uj: Option<u64>,
    /// This process's GPU memory at the end.
    pub memory_bytes: Option<u64>,
}

impl GpuReading {
    pub fn since(&self, before: &GpuReading) -> GpuDelta {
        if self.selection != before.selection {
            return GpuDelta::default(); // the GPUs counted changed during the call
        }
        let elapsed_ns = self.at_ns.saturating_sub(before.at_ns);
        let counter = match (before.energy_mj(), self.energy_mj()) {
            (Some(start), Some(end)) if elapsed_ns >= ENERGY_COUNTER_MIN_NS => {
                Some(end.saturating_sub(start))
            }
            _ => None,
        };
        let estimate = match counter {
            Some(_) => None,
            None => self
                .power_mw()
                .map(|mw| (mw as u128 * elapsed_ns as u128 / 1_000_000) as u64),
        };
        GpuDelta {
            energy_mj: counter,
            estimated_energy_uj: estimate,
            memory_bytes: self.memory_bytes(),
        }
    }
}

/// A device named by the user: an NVML index or a UUID (prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceKey {
    Index(u32),
    Uuid(String),
}

impl DeviceKey {
    fn matches(&self, device: &Device) -> bool {
        match self {
            DeviceKey::Index(index) => device.index == *index,
            DeviceKey::Uuid(prefix) => device.uuid.starts_with(prefix.as_str()),
        }
    }
}

/// `CUDA_VISIBLE_DEVICES` as CUDA reads it: comma-separated indices or `GPU-` UUID
/// prefixes, up to the first entry that is neither (`MIG-` instances included).
pub fn parse_visible_devices(text: &str) -> Vec<DeviceKey> {
    let mut keys = Vec::new();
    for entry in text.split(',').map(str::trim) {
        if let Ok(index) = entry.parse::<u32>() {
            keys.push(DeviceKey::Index(index));
        } else if entry.starts_with("GPU-") && entry.len() > 4 {
            keys.push(DeviceKey::Uuid(entry.to_owned()));
        } else {
            break;
        }
    }
    keys
}

/// Positions in `devices` of the keys, in order; with `strict` an unknown or ambiguous
/// key is an error, otherwise (CUDA's rule) the list stops there.
pub fn resolve(devices: &[Device], keys: &[DeviceKey], strict: bool) -> Result<Vec<usize>, String> {
    let mut chosen = Vec::new();
    for key in keys {
        let found: Vec<usize> = (0..devices.len())
            .filter(|&i| key.matches(&devices[i]))
            .collect();
        match found[..] {
            [one] if !chosen.contains(&one) => chosen.push(one),
            [_] => {
                if strict {
                    return Err(format!("GPU {key:?} is named twice"));
                }
                break;
            }
            _ => {
                if strict {
                    let known: Vec<String> = devices
                        .iter()
                        .map(|d| format!("{} ({})", d.index, d.uuid))
                        .collect();
                    let problem = if found.is_empty() {
                        "no"
                    } else {
                        "more than one"
                    };
                    return Err(format!(
                        "{key:?} names {problem} GPU; the GPUs here are {}",
                        known.join(", ")
                    ));
                }
                break;
            }
        }
    }
    Ok(chosen)
}

/// NVML with the devices that count, as resolved from the current selection.
pub struct Gpus {
    pub nvml: Arc<Nvml>,
    /// Positions in `nvml.devices`.
    pub selected: Vec<usize>,
    /// This process's PID as NVML reports it, or why it is not known.
    pub host_pid: Result<u32, String>,
    /// The selection version this was made for.
    selection: u32,
}

impl Gpus {
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.selected.iter().map(|&i| &self.nvml.devices[i])
    }
}

/// The explicit selection (`None`: from `CUDA_VISIBLE_DEVICES`, else all).
static EXPLICIT: Mutex<Option<Vec<DeviceKey>>> = Mutex::new(None);
/// Bumped by every change of selection (and reload): cached views of an older one rebuild.
static SELECTION: AtomicU32 = AtomicU32::new(0);

/// The counted devices, or why there are none.
type Counted = Result<Arc<Gpus>, String>;

/// The current view, read without a lock; (selection, fork generation, view).
static CACHED: ArcSwapOption<(u32, u64, Counted)> = ArcSwapOption::const_empty();

fn build(status: nvml::Status, selection: u32) -> Counted {
    let nvml = status?;
    let keys = EXPLICIT.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let selected = match keys {
        Some(keys) => resolve(&nvml.devices, &keys, true)?,
        None => match std::env::var(VISIBLE_DEVICES_VARIABLE) {
            Ok(text) => {
                let selected = resolve(&nvml.devices, &parse_visible_devices(&text), false)?;
                if selected.is_empty() {
                    return Err(format!(
                        "{VISIBLE_DEVICES_VARIABLE}={text:?} names none of this machine's GPUs"
                    ));
                }
                selected
            }
            Err(_) => (0..nvml.devices.len()).collect(),
        },
    };
    super::fork::install();
    Ok(Arc::new(Gpus {
        nvml,
        selected,
        host_pid: host_pid(),
        selection,
    }))
}

/// The counted devices, or why the `gpu` probe cannot run here. The first call loads NVML
/// (slow: call it without the GIL); later ones read the cached view without a lock, and a
/// forked child or a new selection builds a new one (fast: NVML is loaded).
pub fn gpus() -> Counted {
    let selection = SELECTION.load(Ordering::Acquire);
    let generation = super::fork::generation();
    if let Some(cached) = CACHED.load().as_ref() {
        let (made_for, made_in, view) = &**cached;
        if *made_for == selection && (*made_in == generation || view.is_err()) {
            return view.clone();
        }
    }
    let view = build(nvml::status(), selection);
    CACHED.store(Some(Arc::new((selection, generation, view.clone()))));
    view
}

/// `None` when the `gpu` probe works here, else why not.
pub fn availability() -> Option<String> {
    gpus().err()
}

/// Counts the devices `keys` names from now on (`None`: back to `CUDA_VISIBLE_DEVICES` or
/// all). Fails, changing nothing, when a key names no device or NVML is not available.
pub fn select(keys: Option<Vec<DeviceKey>>) -> Result<(), String> {
    if let Some(keys) = &keys {
        if keys.is_empty() {
            return Err("the list of GPUs is empty; pass None to count every GPU".to_owned());
        }
        resolve(&nvml::status()?.devices, keys, true)?;
    }
    *EXPLICIT.lock().unwrap_or_else(|p| p.into_inner()) = keys;
    SELECTION.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// Loads NVML again (for tests of the fake library); keeps an explicit selection only if
/// it still resolves. Returns why the `gpu` probe is unavailable, or `None`.
pub fn reload() -> Option<String> {
    let status = nvml::reload();
    let mut explicit = EXPLICIT.lock().unwrap_or_else(|p| p.into_inner());
    let stale = matches!((&status, &*explicit),
        (Ok(nvml), Some(keys)) if resolve(&nvml.devices, keys, true).is_err());
    if stale {
        *explicit = None;
    }
    drop(explicit);
    SELECTION.fetch_add(1, Ordering::AcqRel);
    gpus().err()
}

/// Sums `read` over the counted devices; `None` if any device fails.
fn sum_devices(gpus: &Gpus, read: impl Fn(&Device) -> Option<u64>) -> Option<u64> {
    gpus.devices()
        .try_fold(0u64, |total, device| Some(total + read(device)?))
}

/// This process's GPU memory among a device's processes (0 when it has no context there;
/// `None` when the driver does not say how much).
pub(crate) fn memory_of(processes: &[nvml::ProcessUse], pid: u32) -> Option<u64> {
    processes
        .iter()
        .filter(|p| p.pid == pid)
        .try_fold(0u64, |total, p| Some(total + p.memory_bytes?))
}

/// The reading before a call: the energy counters.
pub fn read_before() -> GpuReading {
    let Ok(gpus) = gpus() else {
        return GpuReading::default();
    };
    let energy_mj = sum_devices(&gpus, |d| gpus.nvml.total_energy_mj(d).ok());
    GpuReading::new(super::monotonic_ns(), gpus.selection, energy_mj, None, None)
}

/// The reading after a call: energy counters, power, and this process's memory.
pub fn read_after() -> GpuReading {
    let Ok(gpus) = gpus() else {
        return GpuReading::default();
    };
    let at_ns = super::monotonic_ns();
    let energy_mj = sum_devices(&gpus, |d| gpus.nvml.total_energy_mj(d).ok());
    let power_mw = sum_devices(&gpus, |d| gpus.nvml.power_mw(d).ok().map(u64::from))
        .map(|mw| mw.min(u32::MAX as u64) as u32);
    let memory_bytes = match gpus.host_pid {
        Ok(pid) => sum_devices(&gpus, |d| {
            memory_of(&gpus.nvml.compute_processes(d).ok()?, pid)
        }),
        Err(_) => None,
    };
    GpuReading::new(at_ns, gpus.selection, energy_mj, power_mw, memory_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(index: u32, uuid: &str) -> Device {
        Device::for_tests(index, uuid)
    }

    #[test]
    fn visible_devices_stop_at_the_first_invalid_entry() {
        use DeviceKey::*;
        assert_eq!(
            parse_visible_devices("1, 0,GPU-ab12"),
            [Index(1), Index(0), Uuid("GPU-ab12".into())]
        );
        assert_eq!(parse_visible_devices("0,-1,1"), [Index(0)]);
        assert_eq!(parse_visible_devices(""), []);
        assert_eq!(parse_visible_devices("MIG-abc,0"), []);
    }

    #[test]
    fn keys_resolve_by_index_or_uuid_prefix() {
        let devices = [device(0, "GPU-aaaa-1111"), device(1, "GPU-bbbb-2222")];
        let keys = parse_visible_devices("GPU-bbbb,0");
        assert_eq!(resolve(&devices, &keys, true), Ok(vec![1, 0]));
        // CUDA's rule: an unknown entry ends the list.
        let keys = parse_visible_devices("1,7,0");
        assert_eq!(resolve(&devices, &keys, false), Ok(vec![1]));
        let error = resolve(&devices, &keys, true).unwrap_err();
        assert!(
            error.contains("Index(7)") && error.contains("GPU-aaaa-1111"),
            "{error}"
        );
        // An ambiguous prefix names more than one GPU.
        let error = resolve(&devices, &[DeviceKey::Uuid("GPU-".into())], true).unwrap_err();
        assert!(error.contains("more than one"), "{error}");
        let twice = [DeviceKey::Index(0), DeviceKey::Index(0)];
        assert!(resolve(&devices, &twice, true).is_err());
        assert_eq!(resolve(&devices, &twice, false), Ok(vec![0]));
    }

    #[test]
    fn long_calls_use_the_counter_and_short_ones_an_estimate() {
        let before = GpuReading::new(1_000, 0, Some(10_000), None, None);
        let at = |elapsed_ns: u64| 1_000 + elapsed_ns;
        let long_after = GpuReading::new(
            at(ENERGY_COUNTER_MIN_NS),
            0,
            Some(12_500),
            Some(300_000),
            Some(1 << 20),
        );
        assert_eq!(
            long_after.since(&before),
            GpuDelta {
                energy_mj: Some(2_500),
                estimated_energy_uj: None,
                memory_bytes: Some(1 << 20),
            }
        );
        // 2 ms at 300 W: 0.6 J = 600,000 µJ, whatever the counter did.
        let short_after = GpuReading::new(at(2_000_000), 0, Some(12_500), Some(300_000), None);
        let delta = short_after.since(&before);
        assert_eq!(delta.energy_mj, None);
        assert_eq!(delta.estimated_energy_uj, Some(600_000));
        assert_eq!(delta.memory_bytes, None);
        // No counter on this device: always the estimate (100 ms at 300 W: 30 J).
        let no_counter = GpuReading::new(at(ENERGY_COUNTER_MIN_NS), 0, None, Some(300_000), None);
        let delta = no_counter.since(&before);
        assert_eq!(
            (delta.energy_mj, delta.estimated_energy_uj),
            (None, Some(30_000_000))
        );
        // Neither: nothing rather than a number that is not one.
        let nothing = GpuReading::new(at(5), 0, None, None, None);
        assert_eq!(nothing.since(&before), GpuDelta::default());
        assert_eq!(
            GpuReading::default().since(&GpuReading::default()),
            GpuDelta::default()
        );
    }
}
