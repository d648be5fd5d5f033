//! This process's PID as the host sees it, for matching NVML's process lists.
//!
//! NVML reports host PIDs. In a container with its own PID namespace `getpid()` is the
//! container's number, which NVML never shows. The host's number is knowable only where
//! this process can see a PID namespace outside its own:
//!
//! * in the host's (initial) PID namespace, `getpid()` is the host PID;
//! * where `/proc` belongs to the host's namespace (a container given the host's `/proc`),
//!   the first `NSpid` entry of `/proc/self/status` is the host PID;
//! * otherwise (the usual container) it is not knowable, and `None` says so.
//!
//! Read when the `gpu` probe's device view is built (once per selection and fork), not per
//! call.

use super::procfs::{fields, keyed_values, parse_u64, Reader};

/// The inode number of the initial PID namespace (`PROC_PID_INIT_INO` in the kernel).
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

fn namespace_inode(path: &str) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .map(|meta| std::os::unix::fs::MetadataExt::ino(&meta))
}

/// The `NSpid` entries of a `/proc/<pid>/status` text: this process's PID in each PID
/// namespace from the one `/proc` belongs to down to its own.
pub fn namespace_pids(status: &[u8]) -> Vec<u32> {
    let [pids] = keyed_values(status, [b"NSpid"]);
    fields(pids.unwrap_or_default())
        .filter_map(|pid| u32::try_from(parse_u64(pid)?).ok())
        .collect()
}

/// The host PID, or why it cannot be known here.
pub fn host_pid() -> Result<u32, String> {
    let own = std::process::id();
    if namespace_inode("/proc/self/ns/pid") == Some(INITIAL_PID_NAMESPACE) {
        return Ok(own);
    }
    let mut files = Reader::system();
    // As text, as it always was: a status that is not UTF-8 (a command name of other
    // bytes) gives no PIDs.
    let status = files.text("/proc/self/status").unwrap_or_default();
    let pids = namespace_pids(status.as_bytes());
    // More than one entry: /proc shows an outer namespace; the first is its number, which
    // is the host's when that outer namespace is the initial one.
    if pids.len() > 1 && namespace_inode("/proc/1/ns/pid") == Some(INITIAL_PID_NAMESPACE) {
        return Ok(pids[0]);
    }
    Err(
        "this process runs in its own PID namespace (a container) and NVML reports host \
         PIDs, which are not visible from here; run the container with the host's PID \
         namespace (docker --pid=host, Kubernetes hostPID) to match its GPU memory"
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nspid_lists_every_namespace() {
        let status = b"Name:\tpython\nPid:\t7\nNSpid:\t41235\t7\nVmRSS:\t1 kB\n";
        assert_eq!(namespace_pids(status), [41235, 7]);
        assert_eq!(namespace_pids(b"Name:\tx\n"), Vec::<u32>::new());
        // Entries that are not PIDs are skipped, as before.
        assert_eq!(namespace_pids(b"NSpid:\t12 x 4294967296 3\n"), [12, 3]);
    }

    #[test]
    fn the_host_pid_follows_the_namespace() {
        let in_initial = namespace_inode("/proc/self/ns/pid") == Some(INITIAL_PID_NAMESPACE);
        match host_pid() {
            Ok(pid) if in_initial => assert_eq!(pid, std::process::id()),
            Ok(pid) => {
                // Through an outer /proc only: its first NSpid entry.
                let status = std::fs::read("/proc/self/status").unwrap();
                assert_eq!(namespace_pids(&status).first(), Some(&pid));
                assert_ne!(pid, std::process::id());
            }
            Err(reason) => {
                assert!(!in_initial, "the initial namespace always knows: {reason}");
                assert!(reason.contains("PID namespace"), "{reason}");
            }
        }
    }
}
