//! meterage core: per-call probes, collection-time readers, lock-free histograms and the
//! series registry.
//!
//! Data flows `probe`/`collect` -> `aggregate` -> `bridge` (export shapes, at collection time); the `binding` module (feature `python`) is the only
//! place that knows about Python. Everything else is plain Rust covered by `cargo test`.

pub mod aggregate;
pub mod bridge;
pub mod collect;
pub mod group;
pub mod probe;

#[cfg(feature = "python")]
mod binding;

/// Blocks made in a shared scope come from the process group's segment (multiprocess
/// mode); all others from the system allocator.
#[global_allocator]
static ALLOCATOR: group::arena::SharedFirst = group::arena::SharedFirst;
