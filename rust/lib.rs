//! meterage core: per-call probes, collection-time readers, lock-free histograms and the
//! series registry.
//!
//! Data flows `probe`/`collect` -> `aggregate` -> `bridge` (export shapes, at collection time); the `binding` module (feature `python`) is the only
//! place that knows about Python. Everything else is plain Rust covered by `cargo test`.

// Linux only: the probes read Linux's per-thread counters (getrusage(RUSAGE_THREAD),
// /proc/thread-self/io) and the process group's shared segment uses Linux's memory calls
// (fallocate, MADV_REMOVE, MAP_FIXED_NOREPLACE, robust process-shared mutexes). Elsewhere
// the build stops at this one error instead of a page of unresolved names; everything
// below is left out so that nothing else is reported.
#[cfg(not(target_os = "linux"))]
compile_error!(
    "meterage builds on Linux only: its probes read Linux's per-thread counters \
     (getrusage(RUSAGE_THREAD), /proc/thread-self/io) and its multiprocess mode needs \
     Linux's memory calls. macOS and Windows are not supported; see docs/platforms.md."
);

#[cfg(target_os = "linux")]
pub mod aggregate;
#[cfg(target_os = "linux")]
pub mod bridge;
#[cfg(target_os = "linux")]
pub mod collect;
#[cfg(target_os = "linux")]
pub mod group;
#[cfg(target_os = "linux")]
pub mod probe;

#[cfg(all(feature = "python", target_os = "linux"))]
mod binding;

/// Blocks made in a shared scope come from the process group's segment (multiprocess
/// mode); all others from the system allocator.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: group::arena::SharedFirst = group::arena::SharedFirst;
