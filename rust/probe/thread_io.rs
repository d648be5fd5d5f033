//! Per-thread IO bytes from /proc/thread-self/io.
//!
//! Opening the file costs ~10 µs, so each thread keeps its own descriptor open and
//! re-reads it with pread (~2 µs). The descriptor is bound to the thread that opened it,
//! so after a fork the child reopens it. Reading the file is itself a read syscall that
//! adds to `rchar`; those bytes are counted per thread and subtracted, so no call (nested
//! ones included) is ever charged for the probe's own reads.

use super::{fork, measure};
use std::cell::Cell;

const PATH: &[u8] = b"/proc/thread-self/io\0";
/// The descriptor could not be opened on this thread; do not retry on every call.
const UNAVAILABLE: i32 = -2;
const CLOSED: i32 = -1;

struct ThreadIoFile {
    fd: Cell<i32>,
    generation: Cell<u64>,
    /// Bytes this thread's probe reads have added to `rchar` since the file was opened.
    own_bytes: Cell<u64>,
}

impl Drop for ThreadIoFile {
    fn drop(&mut self) {
        let fd = self.fd.get();
        if fd >= 0 {
            // SAFETY: the descriptor was opened by this struct and is closed once.
            unsafe { libc::close(fd) };
        }
    }
}

thread_local! {
    static IO_FILE: ThreadIoFile = const {
        ThreadIoFile { fd: Cell::new(CLOSED), generation: Cell::new(0), own_bytes: Cell::new(0) }
    };
}

fn open_thread_file() -> i32 {
    // SAFETY: PATH is NUL-terminated.
    unsafe { libc::open(PATH.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) }
}

impl ThreadIoFile {
    fn descriptor(&self) -> Option<i32> {
        let generation = fork::generation();
        let mut fd = self.fd.get();
        if fd != CLOSED && self.generation.get() != generation {
            // Inherited across a fork: it still points at the parent's thread.
            if fd >= 0 {
                // SAFETY: our own descriptor, closed once before being replaced.
                unsafe { libc::close(fd) };
            }
            fd = CLOSED;
        }
        if fd == CLOSED {
            fork::install();
            let opened = open_thread_file();
            fd = if opened >= 0 { opened } else { UNAVAILABLE };
            self.fd.set(fd);
            self.generation.set(generation);
            self.own_bytes.set(0);
        }
        (fd >= 0).then_some(fd)
    }
}

/// Parses the `key: value` lines of the io file into the measure slots.
fn parse(text: &[u8], values: &mut [u64; measure::COUNT]) -> bool {
    let mut found = 0;
    for line in text.split(|&byte| byte == b'\n') {
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            continue;
        };
        let slot = match &line[..colon] {
            b"rchar" => measure::IO_READ,
            b"wchar" => measure::IO_WRITE,
            b"read_bytes" => measure::DISK_READ,
            b"write_bytes" => measure::DISK_WRITE,
            _ => continue,
        };
        let mut number = 0u64;
        for &byte in &line[colon + 1..] {
            if byte.is_ascii_digit() {
                number = number * 10 + u64::from(byte - b'0');
            }
        }
        values[slot] = number;
        found += 1;
    }
    found == 4
}

#[inline]
pub(super) fn read_thread(values: &mut [u64; measure::COUNT]) -> bool {
    IO_FILE
        .try_with(|file| {
            let Some(fd) = file.descriptor() else {
                return false;
            };
            let mut buffer = [0u8; 256];
            // SAFETY: the buffer is valid for its length; fd is open.
            let read = unsafe { libc::pread(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            if read <= 0 || !parse(&buffer[..read as usize], values) {
                return false;
            }
            // The kernel reports rchar before adding this read's own bytes.
            values[measure::IO_READ] = values[measure::IO_READ].wrapping_sub(file.own_bytes.get());
            file.own_bytes.set(file.own_bytes.get() + read as u64);
            true
        })
        .unwrap_or(false)
}

pub(super) fn availability() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("/proc/thread-self/io exists only on Linux".to_owned());
    }
    let fd = open_thread_file();
    if fd < 0 {
        return Some(format!(
            "cannot open /proc/thread-self/io: {} (needs Linux >= 3.17 with task IO accounting and a readable /proc)",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just opened here.
    unsafe { libc::close(fd) };
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let text = b"rchar: 1948\nwchar: 12\nsyscr: 6\nsyscw: 1\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        let mut values = [0; measure::COUNT];
        assert!(parse(text, &mut values));
        assert_eq!(values[measure::IO_READ], 1948);
        assert_eq!(values[measure::IO_WRITE], 12);
        assert_eq!(values[measure::DISK_READ], 4096);
        assert_eq!(values[measure::DISK_WRITE], 8192);
    }

    #[test]
    fn rejects_a_truncated_file() {
        let mut values = [0; measure::COUNT];
        assert!(!parse(b"rchar: 1\nwchar: 2\n", &mut values));
    }
}
