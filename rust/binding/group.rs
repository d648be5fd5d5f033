//! Multiprocess mode's native side: joining a process group, rejoining after a fork, and
//! reading the group's numbers (`meterage.multiprocess` is the Python side).

use crate::aggregate::registry::registry;
use crate::aggregate::snapshot::SeriesSnapshot;
use crate::group::liveness::{self, ProcessId};
use crate::group::{collect, member};
use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;
use std::path::Path;

fn forget_series() {
    registry().forget_series();
}

/// Joins the group whose root process is (`root_pid`, `root_start`), its segment in
/// `directory`; returns the slot taken. Idempotent in one process.
#[pyfunction]
pub fn group_join(
    py: Python<'_>,
    directory: &str,
    root_pid: u32,
    root_start: u64,
) -> PyResult<usize> {
    if !member::is_joined() && !registry().snapshot().is_empty() {
        return Err(PyRuntimeError::new_err(
            "multiprocess mode must be enabled before the first metered call or instrument \
             record (set METERAGE_MULTIPROCESS=1, or call meterage.multiprocess.enable() first)",
        ));
    }
    let root = ProcessId {
        pid: root_pid,
        start: root_start,
    };
    py.detach(|| member::join(Path::new(directory), root, forget_series))
        .map(|group| group.slot)
        .map_err(PyOSError::new_err)
}

/// In a fork child of a member: a slot of its own (the series it inherited are its
/// parent's). Returns whether this process is a member.
#[pyfunction]
pub fn group_rejoin_after_fork() -> PyResult<bool> {
    member::rejoin_after_fork()
        .map(|group| group.is_some())
        .map_err(PyOSError::new_err)
}

/// The group's segment path, root PID and this process's slot; None outside a group.
#[pyfunction]
pub fn group_info() -> Option<(String, u32, usize)> {
    let group = member::joined()?;
    (group.me.pid == std::process::id()).then(|| {
        (
            group.segment.path.display().to_string(),
            group.root.pid,
            group.slot,
        )
    })
}

/// The PIDs of the group's live members (empty outside a group).
#[pyfunction]
pub fn group_members(py: Python<'_>) -> Vec<u32> {
    match member::joined() {
        Some(group) => py.detach(|| collect::live_members(&group.segment)),
        None => Vec::new(),
    }
}

/// A process's start time (clock ticks since boot), None if there is no such process.
#[pyfunction]
pub fn process_start_time(pid: u32) -> Option<u64> {
    liveness::state(pid).map(|(_, start)| start)
}

/// The parent PID of `pid`, None if there is no such process.
#[pyfunction]
pub fn parent_pid(pid: u32) -> Option<u32> {
    liveness::parent(pid)
}

/// Every series with data: this process's, or in a group the whole group's.
pub fn series_now() -> PyResult<Vec<SeriesSnapshot>> {
    match member::joined().filter(|group| group.me.pid == std::process::id()) {
        Some(group) => collect::snapshot(&group.segment, group.slot).map_err(PyOSError::new_err),
        None => Ok(registry().snapshot()),
    }
}

/// Whether this process reads its numbers from a group.
pub fn in_group() -> bool {
    member::is_joined()
}
