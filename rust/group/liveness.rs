//! Which process a PID names now: its start time (in clock ticks since boot, field 22 of
//! `/proc/<pid>/stat`) tells a process from a later one that got its PID.

/// A process: its PID and start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: u32,
    pub start: u64,
}

impl ProcessId {
    /// This process.
    pub fn current() -> Option<ProcessId> {
        let pid = std::process::id();
        Some(ProcessId {
            pid,
            start: state(pid)?.1,
        })
    }

    /// Whether this process still runs (a zombie, dead but not yet reaped, does not).
    pub fn is_alive(&self) -> bool {
        matches!(state(self.pid), Some((running, start)) if running && start == self.start)
    }
}

/// Whether `pid` runs (not a zombie) and its start time; `None` when there is no such
/// process (or its stat cannot be read).
pub fn state(pid: u32) -> Option<(bool, u64)> {
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The parent PID of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let fields = after_command(&text)?;
    // After the command: state (3), ppid (4).
    std::str::from_utf8(fields.split(|&b| b == b' ').nth(1)?)
        .ok()?
        .parse()
        .ok()
}

/// The fields after the command name, which is in parentheses and may hold anything.
fn after_command(text: &[u8]) -> Option<&[u8]> {
    let close = text.iter().rposition(|&b| b == b')')?;
    text.get(close + 2..)
}

fn parse_stat(text: &[u8]) -> Option<(bool, u64)> {
    let mut fields = after_command(text)?.split(|&b| b == b' ');
    let state = *fields.next()?.first()?;
    // Fields 4 to 21 (ppid ... itrealvalue), then 22: starttime.
    let start = std::str::from_utf8(fields.nth(18)?).ok()?.parse().ok()?;
    Some((!matches!(state, b'Z' | b'X' | b'x'), start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stat_line_is_read_past_a_command_with_spaces_and_parentheses() {
        let line = b"4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615\n";
        assert_eq!(parse_stat(line), Some((true, 987654)));
        let zombie = b"7 (w) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0 0\n";
        assert_eq!(parse_stat(zombie), Some((false, 55)));
        assert_eq!(parse_stat(b"garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        let me = ProcessId::current().unwrap();
        assert!(me.is_alive());
        assert_eq!(parent(me.pid), Some(std::os::unix::process::parent_id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId {
            pid: child.id(),
            start: state(child.id()).map_or(0, |(_, start)| start),
        };
        child.wait().unwrap();
        assert!(!id.is_alive());
        // The same PID with another start time is another process.
        assert!(!ProcessId {
            start: me.start + 1,
            ..me
        }
        .is_alive());
    }
}
