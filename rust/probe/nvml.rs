//! NVIDIA's management library (NVML), loaded at run time.
//!
//! The wheel must import and work on machines with no GPU and no driver, so nothing links
//! against `libnvidia-ml`: the library is opened with `dlopen` the first time something
//! asks for a GPU reading, and every entry point is looked up by name. A missing library,
//! a failed `nvmlInit` or a machine without devices is not an error: it is a reason,
//! reported by [`status`], and GPU readings are then simply absent.
//!
//! `METERAGE_NVML_LIBRARY` names a library file to load instead of `libnvidia-ml.so.1`
//! (non-standard driver installs; the test suite's fake NVML).

use arc_swap::ArcSwapOption;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};
use std::sync::{Arc, Mutex};

/// NVML's return code (`nvmlReturn_t`).
pub type Code = c_int;
pub const SUCCESS: Code = 0;
pub const ERROR_NOT_SUPPORTED: Code = 3;
pub const ERROR_NOT_FOUND: Code = 6;
pub const ERROR_INSUFFICIENT_SIZE: Code = 7;
/// `usedGpuMemory` when the driver cannot say (`NVML_VALUE_NOT_AVAILABLE`).
const VALUE_NOT_AVAILABLE: u64 = u64::MAX;
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";
pub const LIBRARY_VARIABLE: &str = "METERAGE_NVML_LIBRARY";

type DeviceHandle = *mut c_void;

#[repr(C)]
#[derive(Default)]
struct Memory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlMemory_v2_t`: `used` leaves out the memory the driver reserves (as nvidia-smi).
#[repr(C)]
#[derive(Default)]
struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlMemory_v2` of nvml.h: the struct's size with the version in the top byte.
const MEMORY_V2_VERSION: c_uint = std::mem::size_of::<MemoryV2>() as c_uint | (2 << 24);

#[repr(C)]
#[derive(Default)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// Bytes per entry of the process queries: `nvmlProcessInfo_t` of `_v2` and `_v3` (pid,
/// usedGpuMemory, gpuInstanceId, computeInstanceId) is 24, but drivers 535.43–535.86 export
/// a `_v3` that writes 32 (an extra usedGpuCcProtectedMemory) without a new version.
/// Buffers always have room for the larger entry, so no driver can write past them.
const PROCESS_ENTRY_BYTES: usize = 24;
const R535_PROCESS_ENTRY_BYTES: usize = 32;

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ProcessUtilizationSample {
    pid: c_uint,
    time_stamp: c_ulonglong,
    sm_util: c_uint,
    mem_util: c_uint,
    enc_util: c_uint,
    dec_util: c_uint,
}

type InitFn = unsafe extern "C" fn() -> Code;
type ErrorStringFn = unsafe extern "C" fn(Code) -> *const c_char;
type CountFn = unsafe extern "C" fn(*mut c_uint) -> Code;
type HandleFn = unsafe extern "C" fn(c_uint, *mut DeviceHandle) -> Code;
type TextFn = unsafe extern "C" fn(DeviceHandle, *mut c_char, c_uint) -> Code;
type SystemTextFn = unsafe extern "C" fn(*mut c_char, c_uint) -> Code;
type U64Fn = unsafe extern "C" fn(DeviceHandle, *mut c_ulonglong) -> Code;
type U32Fn = unsafe extern "C" fn(DeviceHandle, *mut c_uint) -> Code;
type MemoryFn = unsafe extern "C" fn(DeviceHandle, *mut Memory) -> Code;
type MemoryV2Fn = unsafe extern "C" fn(DeviceHandle, *mut MemoryV2) -> Code;
type UtilizationFn = unsafe extern "C" fn(DeviceHandle, *mut Utilization) -> Code;
type CodecUtilizationFn = unsafe extern "C" fn(DeviceHandle, *mut c_uint, *mut c_uint) -> Code;
type TemperatureFn = unsafe extern "C" fn(DeviceHandle, c_int, *mut c_uint) -> Code;
type ProcessesFn = unsafe extern "C" fn(DeviceHandle, *mut c_uint, *mut c_void) -> Code;
type ProcessUtilizationFn = unsafe extern "C" fn(
    DeviceHandle,
    *mut ProcessUtilizationSample,
    *mut c_uint,
    c_ulonglong,
) -> Code;

/// The entry points meterage uses; the optional ones may be missing from old drivers.
struct Functions {
    shutdown: Option<InitFn>,
    error_string: Option<ErrorStringFn>,
    driver_version: Option<SystemTextFn>,
    name: Option<TextFn>,
    uuid: Option<TextFn>,
    total_energy: Option<U64Fn>,
    power: Option<U32Fn>,
    memory: Option<MemoryFn>,
    memory_v2: Option<MemoryV2Fn>,
    utilization: Option<UtilizationFn>,
    encoder_utilization: Option<CodecUtilizationFn>,
    decoder_utilization: Option<CodecUtilizationFn>,
    temperature: Option<TemperatureFn>,
    compute_processes: Option<ProcessesFn>,
    /// The size of one entry `compute_processes` writes.
    process_entry_bytes: usize,
    process_utilization: Option<ProcessUtilizationFn>,
}

/// One GPU as NVML listed it when the library was loaded.
pub struct Device {
    /// NVML's index (PCI bus order).
    pub index: u32,
    pub uuid: String,
    pub name: String,
    handle: DeviceHandle,
}

#[cfg(test)]
impl Device {
    pub fn for_tests(index: u32, uuid: &str) -> Device {
        Device {
            index,
            uuid: uuid.to_owned(),
            name: "test GPU".to_owned(),
            handle: std::ptr::null_mut(),
        }
    }
}

/// A loaded and initialised NVML with its devices.
pub struct Nvml {
    functions: Functions,
    pub devices: Vec<Device>,
    pub driver_version: String,
    /// The library file that was loaded.
    pub library: String,
}

// SAFETY: NVML device handles are process-wide and NVML is thread-safe (documented);
// the handles are only passed back to NVML.
unsafe impl Send for Nvml {}
// SAFETY: as above.
unsafe impl Sync for Nvml {}

/// A failed NVML query: the code and NVML's text for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub text: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (NVML error {})", self.text, self.code)
    }
}

/// The outcome of loading: NVML, or why there is none.
pub type Status = Result<Arc<Nvml>, String>;

/// The loaded NVML: read without a lock (a metered call may read it while another thread
/// is loading), written only under `LOADING`.
static STATE: ArcSwapOption<Status> = ArcSwapOption::const_empty();
static LOADING: Mutex<()> = Mutex::new(());

/// NVML, loaded on first use, or the reason it is not available.
pub fn status() -> Status {
    if let Some(status) = STATE.load_full() {
        return (*status).clone();
    }
    let _loading = LOADING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(status) = STATE.load_full() {
        return (*status).clone(); // another thread loaded it meanwhile
    }
    let status = load();
    STATE.store(Some(Arc::new(status.clone())));
    status
}

/// Shuts NVML down and loads it again (reading `METERAGE_NVML_LIBRARY` again): for tests.
/// The old library stays mapped, since another thread may still be inside it.
pub fn reload() -> Status {
    let _loading = LOADING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(old) = STATE.swap(None) {
        if let Ok(old) = &*old {
            old.shutdown();
        }
    }
    let status = load();
    STATE.store(Some(Arc::new(status.clone())));
    status
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a valid C string owned by libc.
    let text = unsafe { libc::dlerror() };
    if text.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: non-null, NUL-terminated (checked above).
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Looks `name` up in `library` as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the C signature of the symbol `name`.
unsafe fn symbol<F: Copy>(library: *mut c_void, name: &str) -> Option<F> {
    let name = CString::new(name).ok()?;
    // SAFETY: `library` is a handle from dlopen and `name` is NUL-terminated.
    let address = unsafe { libc::dlsym(library, name.as_ptr()) };
    if address.is_null() {
        return None;
    }
    // SAFETY: F is a function pointer type (guaranteed by the caller), pointer-sized.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&address) })
}

/// The first of `names` the library exports (newer versions first).
///
/// # Safety
/// Each name must have the C signature `F`.
unsafe fn first_symbol<F: Copy>(library: *mut c_void, names: &[&str]) -> Option<F> {
    // SAFETY: guaranteed by the caller, name by name.
    names
        .iter()
        .find_map(|name| unsafe { symbol(library, name) })
}

fn load() -> Status {
    let library_name = std::env::var(LIBRARY_VARIABLE)
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| DEFAULT_LIBRARY.to_owned());
    let c_name = CString::new(library_name.as_str())
        .map_err(|_| format!("{LIBRARY_VARIABLE} contains a NUL byte"))?;
    // SAFETY: a valid C string; RTLD_LOCAL keeps NVML's symbols out of the global scope.
    let library = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if library.is_null() {
        return Err(format!(
            "the NVIDIA management library could not be loaded ({}): no NVIDIA driver here, \
             or set {LIBRARY_VARIABLE} to its path",
            dl_error()
        ));
    }
    // SAFETY: each name is looked up with its nvml.h signature (here and below).
    let init: Option<InitFn> = unsafe { first_symbol(library, &["nvmlInit_v2", "nvmlInit"]) };
    // SAFETY: as above.
    let count: Option<CountFn> =
        unsafe { first_symbol(library, &["nvmlDeviceGetCount_v2", "nvmlDeviceGetCount"]) };
    // SAFETY: as above.
    let handle: Option<HandleFn> = unsafe {
        first_symbol(
            library,
            &[
                "nvmlDeviceGetHandleByIndex_v2",
                "nvmlDeviceGetHandleByIndex",
            ],
        )
    };
    let (Some(init), Some(count), Some(handle)) = (init, count, handle) else {
        return Err(format!(
            "{library_name} is not a usable NVML library (nvmlInit, nvmlDeviceGetCount or \
             nvmlDeviceGetHandleByIndex is missing)"
        ));
    };
    // SAFETY: as above, for every symbol.
    let functions = unsafe {
        Functions {
            shutdown: symbol(library, "nvmlShutdown"),
            error_string: symbol(library, "nvmlErrorString"),
            driver_version: symbol(library, "nvmlSystemGetDriverVersion"),
            name: symbol(library, "nvmlDeviceGetName"),
            uuid: symbol(library, "nvmlDeviceGetUUID"),
            total_energy: symbol(library, "nvmlDeviceGetTotalEnergyConsumption"),
            power: symbol(library, "nvmlDeviceGetPowerUsage"),
            memory: symbol(library, "nvmlDeviceGetMemoryInfo"),
            memory_v2: symbol(library, "nvmlDeviceGetMemoryInfo_v2"),
            utilization: symbol(library, "nvmlDeviceGetUtilizationRates"),
            encoder_utilization: symbol(library, "nvmlDeviceGetEncoderUtilization"),
            decoder_utilization: symbol(library, "nvmlDeviceGetDecoderUtilization"),
            temperature: symbol(library, "nvmlDeviceGetTemperature"),
            compute_processes: first_symbol(
                library,
                &[
                    "nvmlDeviceGetComputeRunningProcesses_v3",
                    "nvmlDeviceGetComputeRunningProcesses_v2",
                ],
            ),
            process_entry_bytes: process_entry_bytes(library),
            process_utilization: symbol(library, "nvmlDeviceGetProcessUtilization"),
        }
    };
    let mut nvml = Nvml {
        functions,
        devices: Vec::new(),
        driver_version: String::new(),
        library: library_name,
    };
    // SAFETY: nvmlInit takes no arguments.
    let code = unsafe { init() };
    if code != SUCCESS {
        return Err(format!("NVML did not initialise: {}", nvml.error(code)));
    }
    // From here on a failure shuts NVML down again (its initialisation is counted).
    let failed = |nvml: &Nvml, reason: String| {
        nvml.shutdown();
        Err(reason)
    };
    let mut devices: c_uint = 0;
    // SAFETY: a valid pointer to a c_uint.
    let code = unsafe { count(&mut devices) };
    if code != SUCCESS {
        let reason = format!("NVML could not count GPUs: {}", nvml.error(code));
        return failed(&nvml, reason);
    }
    if devices == 0 {
        return failed(&nvml, "NVML found no GPUs on this machine".to_owned());
    }
    nvml.driver_version = nvml
        .functions
        .driver_version
        // SAFETY: the buffer and its length come from read_text.
        .and_then(|f| read_text(|buffer, length| unsafe { f(buffer, length) }))
        .unwrap_or_default();
    let mut skipped = Vec::new();
    for index in 0..devices {
        let mut device: DeviceHandle = std::ptr::null_mut();
        // SAFETY: a valid pointer to a handle.
        let code = unsafe { handle(index, &mut device) };
        if code != SUCCESS {
            skipped.push(format!("GPU {index}: {}", nvml.error(code)));
            continue;
        }
        let text = |f: Option<TextFn>| {
            // SAFETY: a handle NVML gave, and a buffer and length from read_text.
            f.and_then(|f| read_text(|buffer, length| unsafe { f(device, buffer, length) }))
        };
        nvml.devices.push(Device {
            index,
            uuid: text(nvml.functions.uuid).unwrap_or_else(|| format!("GPU-index-{index}")),
            name: text(nvml.functions.name).unwrap_or_else(|| "NVIDIA GPU".to_owned()),
            handle: device,
        });
    }
    if nvml.devices.is_empty() {
        let reason = format!("NVML could not open any GPU: {}", skipped.join("; "));
        return failed(&nvml, reason);
    }
    Ok(Arc::new(nvml))
}

/// The entry size of the process query: the R535 drivers with the 32-byte `_v3` are those
/// with confidential-computing memory queries but not yet the process detail list.
fn process_entry_bytes(library: *mut c_void) -> usize {
    let has = |name: &str| {
        let name = CString::new(name).expect("no NUL");
        // SAFETY: only the address is looked at.
        !unsafe { libc::dlsym(library, name.as_ptr()) }.is_null()
    };
    if has("nvmlDeviceGetComputeRunningProcesses_v3")
        && has("nvmlDeviceGetConfComputeMemSizeInfo")
        && !has("nvmlDeviceGetRunningProcessDetailList")
    {
        R535_PROCESS_ENTRY_BYTES
    } else {
        PROCESS_ENTRY_BYTES
    }
}

/// Text from an NVML call that fills a buffer.
fn read_text(fill: impl FnOnce(*mut c_char, c_uint) -> Code) -> Option<String> {
    let mut buffer = [0 as c_char; 96];
    if fill(buffer.as_mut_ptr(), buffer.len() as c_uint) != SUCCESS {
        return None;
    }
    buffer[buffer.len() - 1] = 0;
    // SAFETY: NUL-terminated (the last byte is forced to NUL).
    let text = unsafe { CStr::from_ptr(buffer.as_ptr()) };
    Some(text.to_string_lossy().into_owned())
}

/// What NVML said about a device's process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessUse {
    pub pid: u32,
    /// Bytes of GPU memory, `None` where the driver does not say.
    pub memory_bytes: Option<u64>,
}

/// One process's utilization sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessSample {
    pub pid: u32,
    /// The sample's time, µs since the epoch (NVML's clock).
    pub timestamp_us: u64,
    /// Percent of time the SMs, the encoder and the decoder worked for it.
    pub sm_percent: u32,
    pub encoder_percent: u32,
    pub decoder_percent: u32,
}

impl Nvml {
    fn shutdown(&self) {
        if let Some(shutdown) = self.functions.shutdown {
            // SAFETY: a symbol of the loaded library with nvmlShutdown's signature.
            unsafe { shutdown() };
        }
    }

    fn error(&self, code: Code) -> Error {
        let text = self
            .functions
            .error_string
            .map(|f| {
                // SAFETY: nvmlErrorString returns a static string for any code.
                let text = unsafe { f(code) };
                if text.is_null() {
                    String::new()
                } else {
                    // SAFETY: non-null, static and NUL-terminated.
                    unsafe { CStr::from_ptr(text) }
                        .to_string_lossy()
                        .into_owned()
                }
            })
            .filter(|text| !text.is_empty())
            .unwrap_or_else(|| "unknown NVML error".to_owned());
        Error { code, text }
    }

    fn check(&self, code: Code) -> Result<(), Error> {
        if code == SUCCESS {
            Ok(())
        } else {
            Err(self.error(code))
        }
    }

    fn missing() -> Error {
        Error {
            code: -1,
            text: "this NVML library does not have the function".to_owned(),
        }
    }

    /// Energy the device used since the driver loaded, mJ (Volta and newer).
    pub fn total_energy_mj(&self, device: &Device) -> Result<u64, Error> {
        let f = self.functions.total_energy.ok_or_else(Self::missing)?;
        let mut value: c_ulonglong = 0;
        // SAFETY: a valid handle and out pointer.
        self.check(unsafe { f(device.handle, &mut value) })?;
        Ok(value)
    }

    /// Power draw, mW (averaged over a second on Ampere and newer, except GA100).
    pub fn power_mw(&self, device: &Device) -> Result<u32, Error> {
        let f = self.functions.power.ok_or_else(Self::missing)?;
        let mut value: c_uint = 0;
        // SAFETY: a valid handle and out pointer.
        self.check(unsafe { f(device.handle, &mut value) })?;
        Ok(value)
    }

    /// (used, total) bytes of device memory; with drivers that have `_v2`, "used" leaves
    /// out what the driver reserves for itself (as nvidia-smi shows it).
    pub fn memory(&self, device: &Device) -> Result<(u64, u64), Error> {
        if let Some(f) = self.functions.memory_v2 {
            let mut value = MemoryV2 {
                version: MEMORY_V2_VERSION,
                ..MemoryV2::default()
            };
            // SAFETY: a valid handle and out pointer, with the version nvml.h asks for.
            if self.check(unsafe { f(device.handle, &mut value) }).is_ok() {
                return Ok((value.used, value.total));
            }
        }
        let f = self.functions.memory.ok_or_else(Self::missing)?;
        let mut value = Memory::default();
        // SAFETY: a valid handle and out pointer.
        self.check(unsafe { f(device.handle, &mut value) })?;
        Ok((value.used, value.total))
    }

    /// (gpu, memory) percent busy over the driver's last sample period.
    pub fn utilization(&self, device: &Device) -> Result<(u32, u32), Error> {
        let f = self.functions.utilization.ok_or_else(Self::missing)?;
        let mut value = Utilization::default();
        // SAFETY: a valid handle and out pointer.
        self.check(unsafe { f(device.handle, &mut value) })?;
        Ok((value.gpu, value.memory))
    }

    /// Percent busy of the video encoder and decoder.
    pub fn codec_utilization(&self, device: &Device) -> (Result<u32, Error>, Result<u32, Error>) {
        let read = |f: Option<CodecUtilizationFn>| {
            let f = f.ok_or_else(Self::missing)?;
            let (mut value, mut period_us): (c_uint, c_uint) = (0, 0);
            // SAFETY: a valid handle and out pointers.
            self.check(unsafe { f(device.handle, &mut value, &mut period_us) })?;
            Ok(value)
        };
        (
            read(self.functions.encoder_utilization),
            read(self.functions.decoder_utilization),
        )
    }

    /// GPU die temperature, °C.
    pub fn temperature_celsius(&self, device: &Device) -> Result<u32, Error> {
        let f = self.functions.temperature.ok_or_else(Self::missing)?;
        let mut value: c_uint = 0;
        const GPU_SENSOR: c_int = 0;
        // SAFETY: a valid handle and out pointer.
        self.check(unsafe { f(device.handle, GPU_SENSOR, &mut value) })?;
        Ok(value)
    }

    /// The compute processes on the device (their PIDs as the host sees them).
    pub fn compute_processes(&self, device: &Device) -> Result<Vec<ProcessUse>, Error> {
        let f = self.functions.compute_processes.ok_or_else(Self::missing)?;
        let stride = self.functions.process_entry_bytes;
        let mut capacity: usize = 32;
        for _ in 0..4 {
            // u64 words: 8-byte aligned, room for the larger entry size whatever `stride` is.
            let mut buffer = vec![0u64; capacity * R535_PROCESS_ENTRY_BYTES / 8];
            let mut count = capacity as c_uint;
            // SAFETY: the buffer has room for `count` entries of up to 32 bytes.
            let code = unsafe { f(device.handle, &mut count, buffer.as_mut_ptr().cast()) };
            if code == ERROR_INSUFFICIENT_SIZE {
                // More processes than room: NVML said how many; they may grow meanwhile.
                capacity = (count as usize).max(capacity) * 2;
                continue;
            }
            self.check(code)?;
            let count = (count as usize).min(capacity);
            let words_per_entry = stride / 8;
            return Ok((0..count)
                .map(|index| {
                    let entry = &buffer[index * words_per_entry..];
                    // pid: the first 4 bytes (little-endian or not, the low address);
                    // usedGpuMemory: the next 8-byte word.
                    let pid = entry[0].to_ne_bytes();
                    let pid = u32::from_ne_bytes([pid[0], pid[1], pid[2], pid[3]]);
                    let used = entry[1];
                    ProcessUse {
                        pid,
                        memory_bytes: (used != VALUE_NOT_AVAILABLE).then_some(used),
                    }
                })
                .collect());
        }
        Err(self.error(ERROR_INSUFFICIENT_SIZE))
    }

    /// Per-process utilization samples newer than `since_us` (NVML's timestamps, µs since
    /// the epoch). No sample since then is an empty list, not an error.
    pub fn process_utilization(
        &self,
        device: &Device,
        since_us: u64,
    ) -> Result<Vec<ProcessSample>, Error> {
        let f = self
            .functions
            .process_utilization
            .ok_or_else(Self::missing)?;
        let mut capacity: usize = 0;
        for _ in 0..4 {
            let mut samples = vec![ProcessUtilizationSample::default(); capacity];
            let mut count = capacity as c_uint;
            let buffer = if capacity == 0 {
                std::ptr::null_mut() // asks for the number of samples
            } else {
                samples.as_mut_ptr()
            };
            // SAFETY: `buffer` is null or has room for `count` samples.
            let code = unsafe { f(device.handle, buffer, &mut count, since_us) };
            match code {
                ERROR_NOT_FOUND => return Ok(Vec::new()),
                SUCCESS if capacity == 0 && count == 0 => return Ok(Vec::new()),
                ERROR_INSUFFICIENT_SIZE | SUCCESS if capacity == 0 || count as usize > capacity => {
                    // Samples may arrive between the calls: room for some more.
                    capacity = count as usize + 8;
                    continue;
                }
                SUCCESS => {}
                _ => return Err(self.error(code)),
            }
            samples.truncate(count as usize);
            return Ok(samples
                .iter()
                .map(|s| ProcessSample {
                    pid: s.pid,
                    timestamp_us: s.time_stamp,
                    sm_percent: s.sm_util,
                    encoder_percent: s.enc_util,
                    decoder_percent: s.dec_util,
                })
                .collect());
        }
        Err(self.error(ERROR_INSUFFICIENT_SIZE))
    }
}
