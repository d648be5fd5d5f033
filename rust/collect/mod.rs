//! Collection-time readers: this process's, the host's and the GPU devices' metrics, read
//! when an exporter collects (seconds apart), never on the hot path of a metered call.
//!
//! Every source is optional: one that is missing or unreadable (no `/proc`, a restricted
//! container, no NVML) leaves its values out — never an error, and never a zero that was
//! not read. All `/proc` and cgroup files are read through [`procfs`], which also holds the
//! parsers of the layouts several files share.

pub mod gpu_devices;
pub mod host;
pub(crate) mod host_pid;
pub mod process;
pub mod procfs;
