//! Per-thread IO bytes from /proc/thread-self/io.
//!
//! What the kernel counts (verified on Linux 6.18 by tests/test_io_accounting.py, and in
//! fs/read_write.c): `rchar`/`wchar` grow by the bytes returned by read, write, pread64,
//! pwrite64, readv, writev, preadv(2), pwritev(2), sendfile (both counters) and
//! copy_file_range (both), on any descriptor. Socket send/recv/sendto/recvfrom/sendmsg/
//! recvmsg (Python's `socket.send`, `recv`, `sendall`, `recv_into`, asyncio streams),
//! splice, and loads and stores to mmap'ed memory are not counted. `read_bytes`/
//! `write_bytes` are bytes the thread caused to be fetched from or sent to storage.
//!
//! Opening the file costs ~10 µs, so each thread keeps its own descriptor open and
//! re-reads it with pread (~2 µs). Reading the file is itself a read syscall that adds to
//! `rchar`; those bytes are counted per thread and subtracted, so no call (nested ones
//! included) is ever charged for the probe's own reads.
//!
//! # The descriptors are never the application's
//!
//! The application can close our descriptor behind our back (`os.closerange` in a daemon,
//! `dup2` over the number) and the number then names one of its files. So nothing here
//! closes or trusts a number it has not verified:
//!
//! * A **registry** (never-freed blocks of slots, claimed by CAS, no locks) holds each
//!   open probe descriptor with the (st_dev, st_ino) `fstat` gave right after `open`.
//! * **Reads** (the hot path: one pread, no other syscall) accept only the exact io-file
//!   layout, and only an `rchar` that grew by at least the bytes of this thread's previous
//!   probe read (true of our own thread's file, seldom of another thread's). Anything else
//!   and the number is dropped and the file reopened.
//! * **Closes** happen only after `fstat` shows the number still names the (st_dev,
//!   st_ino) recorded at open; otherwise the number is forgotten, never closed.
//! * **fork**: the `pthread_atfork` child handler ([`close_all_in_child`]) closes every
//!   registered descriptor that `fstat` still matches and empties the registry, so a child
//!   carries none of the parent threads' descriptors and the forking thread forgets its
//!   own. The one window the registry cannot see, between `open` returning and the slot
//!   store, is waited out by the prepare handler ([`before_fork`]).

use super::catalog::{Combine, Measure, Probe, ProbeInfo, Stage, BYTE_BOUNDARIES};
use super::{clock, fork};
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

const PATH: &[u8] = b"/proc/thread-self/io\0";
/// The descriptor could not be opened (or read) on this thread; do not retry on every call.
const UNAVAILABLE: i32 = -2;
const CLOSED: i32 = -1;
/// A full io file is at most ~230 bytes (seven keys, 20-digit values).
const BUFFER: usize = 256;

// ---- the registry -------------------------------------------------------------------------

/// One thread's registered descriptor. Only the owning thread writes it, except the fork
/// child handler (single-threaded then) and [`invalidate_others`] (which only clears `fd`).
struct Slot {
    /// Held by one thread from its first probe read to its exit.
    owned: AtomicBool,
    /// The open descriptor, or `CLOSED`. Stored last, after `dev` and `ino`.
    fd: AtomicI32,
    dev: AtomicU64,
    ino: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            owned: AtomicBool::new(false),
            fd: AtomicI32::new(CLOSED),
            dev: AtomicU64::new(0),
            ino: AtomicU64::new(0),
        }
    }
}

const SLOTS_PER_BLOCK: usize = 64;

/// Blocks are appended, never freed, so a `&'static Slot` stays valid and the fork child
/// handler can walk them without locks.
struct Block {
    slots: [Slot; SLOTS_PER_BLOCK],
    next: AtomicPtr<Block>,
}

impl Block {
    const fn new() -> Block {
        Block {
            slots: [const { Slot::new() }; SLOTS_PER_BLOCK],
            next: AtomicPtr::new(ptr::null_mut()),
        }
    }
}

static FIRST_BLOCK: Block = Block::new();

fn blocks() -> impl Iterator<Item = &'static Block> {
    std::iter::successors(Some(&FIRST_BLOCK), |block| {
        // SAFETY: `next` is null or a leaked Box<Block>, published once and never freed.
        unsafe { block.next.load(Ordering::Acquire).as_ref() }
    })
}

fn slots() -> impl Iterator<Item = &'static Slot> {
    blocks().flat_map(|block| block.slots.iter())
}

/// A free slot for the calling thread; appends a block when all are held.
fn claim_slot() -> &'static Slot {
    loop {
        if let Some(slot) = slots().find(|slot| {
            slot.owned
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        }) {
            return slot;
        }
        let last = blocks().last().expect("the first block always exists");
        let fresh = Box::into_raw(Box::new(Block::new()));
        if last
            .next
            .compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // SAFETY: `fresh` lost the race, so it was never published: still only ours.
            drop(unsafe { Box::from_raw(fresh) });
        }
    }
}

/// A descriptor number can only be handed out again once it was closed: when our thread
/// gets `fd`, any other slot still holding `fd` lost its descriptor (the application closed
/// it). Clearing it makes that thread's next read reopen instead of reading our file.
fn invalidate_others(mine: &Slot, fd: i32) {
    for slot in slots().filter(|slot| !ptr::eq(*slot, mine)) {
        let _ = slot
            .fd
            .compare_exchange(fd, CLOSED, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// (st_dev, st_ino) of an open descriptor, `None` when it is not open.
fn identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat writes into the zeroed stat buffer it is given; it is async-signal-safe
    // (the fork child handler calls this).
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; a closed or foreign fd only makes fstat fail or describe that file.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return None;
    }
    // dev_t and ino_t are u64 on Linux, not on every target.
    #[allow(clippy::unnecessary_cast)]
    Some((stat.st_dev as u64, stat.st_ino as u64))
}

impl Slot {
    /// Whether `fd` still names the file this slot recorded at open.
    fn still_names(&self, fd: i32) -> bool {
        identity(fd)
            == Some((
                self.dev.load(Ordering::Relaxed),
                self.ino.load(Ordering::Relaxed),
            ))
    }
}

// ---- fork ---------------------------------------------------------------------------------

/// Threads between `open` returning and the slot store (the one moment an open probe
/// descriptor is not in the registry).
static OPENING: AtomicUsize = AtomicUsize::new(0);
/// Forks in progress (prepare handler run, parent handler not yet).
static FORKING: AtomicUsize = AtomicUsize::new(0);
/// How long the prepare handler waits for a thread to leave the open window, and a thread
/// waits for a fork to end before opening. Both are far longer than the windows (one open
/// and one fstat, ~10 µs) unless a thread is descheduled; past them a child may inherit one
/// unregistered descriptor (O_CLOEXEC, so only a child that never execs keeps it).
const FORK_WAIT_NS: u64 = 1_000_000;

/// Marks the open window; a fork waits until every thread has left it.
struct OpenWindow;

impl OpenWindow {
    fn enter() -> OpenWindow {
        let deadline = clock::monotonic_ns() + 10 * FORK_WAIT_NS;
        loop {
            // SeqCst on both sides (here and in `before_fork`): either this thread sees the
            // fork and backs off, or the fork sees this thread and waits for it.
            OPENING.fetch_add(1, Ordering::SeqCst);
            if FORKING.load(Ordering::SeqCst) == 0 || clock::monotonic_ns() > deadline {
                return OpenWindow;
            }
            OPENING.fetch_sub(1, Ordering::SeqCst);
            while FORKING.load(Ordering::SeqCst) != 0 && clock::monotonic_ns() <= deadline {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for OpenWindow {
    fn drop(&mut self) {
        OPENING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The `pthread_atfork` prepare handler: waits (bounded) until no thread holds an open,
/// not yet registered descriptor. No lock: a fork cannot leave anything held.
pub(super) fn before_fork() {
    FORKING.fetch_add(1, Ordering::SeqCst);
    let deadline = clock::monotonic_ns() + FORK_WAIT_NS;
    while OPENING.load(Ordering::SeqCst) != 0 && clock::monotonic_ns() <= deadline {
        std::thread::yield_now();
    }
}

/// The `pthread_atfork` parent handler.
pub(super) fn after_fork_in_parent() {
    FORKING.fetch_sub(1, Ordering::SeqCst);
}

/// The `pthread_atfork` child handler: only the forking thread exists, and only
/// async-signal-safe calls are made (fstat, close). Every registered descriptor that still
/// names its recorded file is ours (and points at a thread of the parent): close it.
/// Then every slot is free again, the forking thread's included; its thread-local sees the
/// new fork generation and forgets the number instead of closing it.
pub(super) fn close_all_in_child() {
    for slot in slots() {
        let fd = slot.fd.load(Ordering::Relaxed);
        if fd >= 0 {
            if slot.still_names(fd) {
                // SAFETY: fstat just showed fd is the io file this slot opened.
                unsafe { libc::close(fd) };
            }
            slot.fd.store(CLOSED, Ordering::Relaxed);
        }
        // Write only what changed: untouched registry pages stay shared with the parent.
        if slot.owned.load(Ordering::Relaxed) {
            slot.owned.store(false, Ordering::Relaxed);
        }
    }
    OPENING.store(0, Ordering::SeqCst);
    FORKING.store(0, Ordering::SeqCst);
}

// ---- the thread's file ------------------------------------------------------------------

struct ThreadIoFile {
    fd: Cell<i32>,
    /// This thread's registry slot (of the current fork generation).
    slot: Cell<Option<&'static Slot>>,
    generation: Cell<u64>,
    /// Bytes this thread's probe reads have added to `rchar` in this fork generation.
    own_bytes: Cell<u64>,
    /// The least `rchar` our own file can show next: the last one plus the bytes that read
    /// returned (0 right after opening).
    next_rchar: Cell<u64>,
}

impl Drop for ThreadIoFile {
    /// Thread exit.
    fn drop(&mut self) {
        if self.generation.get() != fork::generation() {
            // A fork child's forking thread that never read again: the child handler
            // closed its descriptor and freed its slot (which may be another thread's now).
            return;
        }
        let fd = self.fd.get();
        if fd >= 0 {
            self.release(fd);
        }
        if let Some(slot) = self.slot.get() {
            slot.owned.store(false, Ordering::Release);
        }
    }
}

thread_local! {
    static IO_FILE: ThreadIoFile = const {
        ThreadIoFile {
            fd: Cell::new(CLOSED),
            slot: Cell::new(None),
            generation: Cell::new(0),
            own_bytes: Cell::new(0),
            next_rchar: Cell::new(0),
        }
    };
}

fn open_thread_file() -> i32 {
    // SAFETY: PATH is NUL-terminated.
    unsafe { libc::open(PATH.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) }
}

/// The four counters the probe uses, from one io file.
#[derive(Debug, PartialEq, Eq)]
struct Counters {
    rchar: u64,
    wchar: u64,
    read_bytes: u64,
    write_bytes: u64,
}

/// The io file's keys in the kernel's order (fs/proc/base.c, `do_io_accounting`).
const KEYS: [&[u8]; 7] = [
    b"rchar",
    b"wchar",
    b"syscr",
    b"syscw",
    b"read_bytes",
    b"write_bytes",
    b"cancelled_write_bytes",
];

/// Parses an io file strictly: exactly the seven `key: <decimal>\n` lines in the kernel's
/// order and nothing else. This is how a read tells our file from whatever the application
/// put at our descriptor number, so anything short of the exact layout is rejected.
fn parse(text: &[u8]) -> Option<Counters> {
    let mut values = [0u64; KEYS.len()];
    let mut at = 0;
    // Plain indexing: this runs twice per probed call, and stays cheap in debug builds too.
    for (key, value) in KEYS.iter().zip(values.iter_mut()) {
        let digits_at = at + key.len() + 2;
        if text.get(at..at + key.len()) != Some(key)
            || text.get(at + key.len()..digits_at)? != b": "
        {
            return None;
        }
        at = digits_at;
        // At most 20 digits (u64::MAX); u128 holds any 20 without overflow.
        let mut number = 0u128;
        while at < text.len() && text[at].is_ascii_digit() && at - digits_at < 20 {
            number = number * 10 + u128::from(text[at] - b'0');
            at += 1;
        }
        if at == digits_at || text.get(at) != Some(&b'\n') {
            return None;
        }
        *value = u64::try_from(number).ok()?;
        at += 1;
    }
    (at == text.len()).then_some(Counters {
        rchar: values[0],
        wchar: values[1],
        read_bytes: values[4],
        write_bytes: values[5],
    })
}

impl ThreadIoFile {
    #[inline]
    fn read(&self, raw: &mut [u64]) -> bool {
        let fd = self.fd.get();
        // Two relaxed loads on top of the pread: same fork generation, and no other thread
        // of ours was given this number since we opened it.
        if fd >= 0
            && self.generation.get() == fork::generation()
            && self
                .slot
                .get()
                .is_some_and(|slot| slot.fd.load(Ordering::Relaxed) == fd)
            && self.read_fd(fd, raw)
        {
            return true;
        }
        self.recover(raw)
    }

    /// One pread of `fd`, accepted only if it reads as this thread's io file.
    #[inline]
    fn read_fd(&self, fd: i32, raw: &mut [u64]) -> bool {
        let mut buffer = [0u8; BUFFER];
        // SAFETY: the buffer is valid for its length. Reading a number that is not ours
        // (closed, or the application's) fails or returns foreign bytes, rejected below; it
        // never consumes the application's data, since pread keeps the file offset and
        // pipes, sockets and ttys refuse it (ESPIPE).
        let read = unsafe { libc::pread(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if read <= 0 {
            return false;
        }
        let read = read as u64;
        // Whatever it was, this read added its bytes to our rchar; the kernel reports rchar
        // before adding them.
        let own = self.own_bytes.get();
        self.own_bytes.set(own + read);
        let counters = match parse(&buffer[..read as usize]) {
            Some(counters) if read < BUFFER as u64 && counters.rchar >= self.next_rchar.get() => {
                counters
            }
            _ => return false,
        };
        self.next_rchar.set(counters.rchar + read);
        raw[0] = counters.rchar.wrapping_sub(own);
        raw[1] = counters.wchar;
        raw[2] = counters.read_bytes;
        raw[3] = counters.write_bytes;
        true
    }

    /// The slow path: first use, a new fork generation, or a number that failed to read as
    /// ours. Drops the old number (closing it only if verified ours), opens a new one.
    #[cold]
    #[inline(never)]
    fn recover(&self, raw: &mut [u64]) -> bool {
        let generation = fork::generation();
        if self.generation.get() != generation {
            // First use or a fork child: in a child the handler already closed the
            // parent's descriptor and freed the slot, so both are forgotten, not released.
            self.fd.set(CLOSED);
            self.slot.set(None);
            self.own_bytes.set(0);
            self.generation.set(generation);
        }
        match self.fd.get() {
            UNAVAILABLE => return false,
            CLOSED => {}
            fd => self.release(fd),
        }
        let Some(fd) = self.open() else {
            self.fd.set(UNAVAILABLE);
            return false;
        };
        if self.read_fd(fd, raw) {
            return true;
        }
        // Our own fresh descriptor does not read as an io file (an unknown layout, or
        // access refused): stop trying on this thread.
        self.release(fd);
        self.fd.set(UNAVAILABLE);
        false
    }

    /// Opens and registers this thread's descriptor.
    fn open(&self) -> Option<i32> {
        fork::install();
        let slot = self.slot.get().unwrap_or_else(|| {
            let slot = claim_slot();
            self.slot.set(Some(slot));
            slot
        });
        let window = OpenWindow::enter();
        let fd = open_thread_file();
        if fd < 0 {
            return None;
        }
        let Some((dev, ino)) = identity(fd) else {
            // SAFETY: opened just above and never published.
            unsafe { libc::close(fd) };
            return None;
        };
        slot.dev.store(dev, Ordering::Relaxed);
        slot.ino.store(ino, Ordering::Relaxed);
        slot.fd.store(fd, Ordering::Release);
        drop(window);
        invalidate_others(slot, fd);
        self.fd.set(fd);
        self.next_rchar.set(0);
        Some(fd)
    }

    /// Gives up `fd`: closes it if it still names the file we opened, else only forgets it
    /// (the application closed ours and the number is now someone else's).
    fn release(&self, fd: i32) {
        if let Some(slot) = self.slot.get() {
            if slot.still_names(fd) {
                // SAFETY: fstat just showed fd is our io file. A fork between here and the
                // slot store below is harmless: the child handler checks fstat first.
                unsafe { libc::close(fd) };
            }
            let _ = slot
                .fd
                .compare_exchange(fd, CLOSED, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.fd.set(CLOSED);
    }
}

/// rchar, wchar, read_bytes and write_bytes into `raw[..4]` (rchar less the probe's own).
#[inline]
fn read_thread(raw: &mut [u64]) -> bool {
    IO_FILE.try_with(|file| file.read(raw)).unwrap_or(false)
}

/// The `io` probe.
pub struct Io;

const SYSCALL_BYTES: &str =
    "Bytes moved by read/write-family syscalls (read, write, pread, pwrite, readv, writev, \
sendfile, copy_file_range) of metered calls; socket send/recv and mmap are not counted.";
const SYSCALL_SOURCE: &str = "`/proc/thread-self/io` rchar/wchar: bytes moved by the read/write family of syscalls on any descriptor — read, write, pread, pwrite, readv, writev, preadv, pwritev (Python's `open()` files, `os.read`/`os.write` on files, pipes and sockets); sendfile and copy_file_range count in both. **Not counted**: socket send/recv/sendmsg/recvmsg (so `socket.send`, `sendall`, `recv`, `recv_into` and asyncio socket streams read as 0), splice, mmap'ed memory";
const STORAGE_BYTES: &str = "Storage bytes read and written by metered calls.";
const STORAGE_SOURCE: &str = "`/proc/thread-self/io` read_bytes/write_bytes: storage IO";

const fn bytes(
    key: &'static str,
    metric: &'static str,
    attributes: &'static [(&'static str, &'static str)],
    description: &'static str,
    source: &'static str,
) -> Measure {
    Measure {
        key,
        unit: "By",
        factor: 1.0,
        combine: Combine::Sum,
        metric,
        attributes,
        description,
        boundaries: &BYTE_BOUNDARIES,
        source,
    }
}

impl Probe for Io {
    const INFO: ProbeInfo = ProbeInfo {
        name: "io",
        default: true,
        measures: &[
            bytes(
                "io.read",
                "meterage.call.io",
                &[("io.direction", "read")],
                SYSCALL_BYTES,
                SYSCALL_SOURCE,
            ),
            bytes(
                "io.write",
                "meterage.call.io",
                &[("io.direction", "write")],
                SYSCALL_BYTES,
                SYSCALL_SOURCE,
            ),
            bytes(
                "disk.io.read",
                "meterage.call.disk.io",
                &[("disk.io.direction", "read")],
                STORAGE_BYTES,
                STORAGE_SOURCE,
            ),
            bytes(
                "disk.io.write",
                "meterage.call.disk.io",
                &[("disk.io.direction", "write")],
                STORAGE_BYTES,
                STORAGE_SOURCE,
            ),
        ],
    };
    const STAGE: Stage = Stage::Counters;
    const RAW: usize = 4;

    #[inline(always)]
    fn before(raw: &mut [u64]) -> bool {
        read_thread(raw)
    }

    fn availability() -> Option<String> {
        // Found out once per process: the check opens a file (~10 us), which making a
        // meter must not pay every time.
        static CHECKED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        CHECKED.get_or_init(availability).clone()
    }
}

fn availability() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("/proc/thread-self/io exists only on Linux".to_owned());
    }
    fork::install();
    // Opened and closed inside the open window, so a fork in between cannot leak it.
    let _window = OpenWindow::enter();
    let fd = open_thread_file();
    if fd < 0 {
        return Some(format!(
            "cannot open /proc/thread-self/io: {} (needs Linux >= 3.17 with task IO accounting and a readable /proc)",
            std::io::Error::last_os_error()
        ));
    }
    let mut buffer = [0u8; BUFFER];
    // SAFETY: fd was just opened here; the buffer is valid for its length.
    let read = unsafe { libc::pread(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    let error = std::io::Error::last_os_error();
    // SAFETY: fd was opened here and is closed once.
    unsafe { libc::close(fd) };
    if read < 0 {
        return Some(format!("cannot read /proc/thread-self/io: {error}"));
    }
    let text = &buffer[..read as usize];
    parse(text).is_none().then(|| {
        format!(
            "/proc/thread-self/io has an unexpected layout: {:?}",
            String::from_utf8_lossy(text)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KERNEL: &[u8] = b"rchar: 1948\nwchar: 12\nsyscr: 6\nsyscw: 1\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";

    #[test]
    fn parses_the_kernel_format() {
        assert_eq!(
            parse(KERNEL),
            Some(Counters {
                rchar: 1948,
                wchar: 12,
                read_bytes: 4096,
                write_bytes: 8192
            })
        );
        let max = format!(
            "rchar: {m}\nwchar: {m}\nsyscr: {m}\nsyscw: {m}\nread_bytes: {m}\nwrite_bytes: {m}\ncancelled_write_bytes: {m}\n",
            m = u64::MAX
        );
        assert!(max.len() < BUFFER);
        assert_eq!(parse(max.as_bytes()).unwrap().write_bytes, u64::MAX);
    }

    #[test]
    fn parses_this_threads_file() {
        let text = std::fs::read("/proc/thread-self/io").unwrap();
        assert!(text.len() < BUFFER);
        assert!(
            parse(&text).is_some(),
            "{:?}",
            String::from_utf8_lossy(&text)
        );
    }

    #[test]
    fn rejects_a_truncated_file() {
        for end in 0..KERNEL.len() {
            assert_eq!(parse(&KERNEL[..end]), None, "{end} bytes");
        }
    }

    #[test]
    fn rejects_reordered_or_renamed_keys() {
        let swapped = b"wchar: 12\nrchar: 1948\nsyscr: 6\nsyscw: 1\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse(swapped), None);
        let without_syscr = b"rchar: 1948\nwchar: 12\nsyscw: 1\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse(without_syscr), None);
        let renamed = b"rchar: 1948\nwchar: 12\nsyscr: 6\nsyscw: 1\nread_bytez: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse(renamed), None);
    }

    #[test]
    fn rejects_foreign_content() {
        let extra_line = [KERNEL, b"rchar: 1\n"].concat();
        let cases: [&[u8]; 8] = [
            b"application data\n",
            b"",
            &extra_line,
            // Older parsers took any line with a colon and skipped non-digits.
            b"rchar: 1\nwchar: 2\nread_bytes: 3\nwrite_bytes: 4\n",
            b"rchar: 1x\nwchar: 2\nsyscr: 6\nsyscw: 1\nread_bytes: 3\nwrite_bytes: 4\ncancelled_write_bytes: 0\n",
            b"rchar:  1\nwchar: 2\nsyscr: 6\nsyscw: 1\nread_bytes: 3\nwrite_bytes: 4\ncancelled_write_bytes: 0\n",
            b"rchar: 1\r\nwchar: 2\nsyscr: 6\nsyscw: 1\nread_bytes: 3\nwrite_bytes: 4\ncancelled_write_bytes: 0\n",
            // One more than u64::MAX.
            b"rchar: 18446744073709551616\nwchar: 2\nsyscr: 6\nsyscw: 1\nread_bytes: 3\nwrite_bytes: 4\ncancelled_write_bytes: 0\n",
        ];
        for case in cases {
            assert_eq!(parse(case), None, "{:?}", String::from_utf8_lossy(case));
        }
    }

    fn own_io_descriptors() -> Vec<i32> {
        let me = format!(
            "/proc/{}/task/{}/io",
            std::process::id(),
            // The raw syscall (glibc's gettid() wrapper is glibc >= 2.30).
            // SAFETY: gettid has no preconditions.
            unsafe { libc::syscall(libc::SYS_gettid) }
        );
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let target = std::fs::read_link(entry.path()).ok()?;
                (target.to_str()? == me).then(|| entry.file_name().to_str()?.parse().ok())?
            })
            .collect()
    }

    #[test]
    fn a_reused_number_is_forgotten_not_closed_and_the_probe_recovers() {
        let mut values = [0; 4];
        std::thread::spawn(move || {
            assert!(read_thread(&mut values));
            let [fd] = own_io_descriptors()[..] else {
                panic!("expected one descriptor")
            };
            // The application's file takes our number.
            let path = std::env::temp_dir().join(format!("meterage-reuse-{}", std::process::id()));
            std::fs::write(&path, b"application data\n").unwrap();
            let theirs = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: both descriptors are open; dup2 replaces ours with theirs.
            assert_eq!(unsafe { libc::dup2(theirs.as_raw_fd(), fd) }, fd);
            assert!(read_thread(&mut values));
            // Still open, still their file; ours is on another number.
            assert_eq!(
                std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap(),
                path
            );
            let mine = own_io_descriptors();
            assert_eq!(mine.len(), 1);
            assert_ne!(mine[0], fd);
            // SAFETY: the dup2 copy is the test's to close.
            unsafe { libc::close(fd) };
            std::fs::remove_file(&path).unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_fork_child_closes_every_registered_descriptor() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let parked = std::thread::spawn(move || {
            let mut values = [0; 4];
            assert!(read_thread(&mut values));
            ready_tx.send(own_io_descriptors()[0]).unwrap();
            done_rx.recv().unwrap();
        });
        let theirs = ready_rx.recv().unwrap();
        let mut values = [0; 4];
        assert!(read_thread(&mut values));
        let mine = own_io_descriptors()[0];
        // SAFETY: the child makes only async-signal-safe calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: fcntl on any number is harmless; F_GETFD fails on a closed one.
            let closed = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1;
            let code = if closed(theirs) && closed(mine) { 0 } else { 1 };
            // SAFETY: _exit skips the test harness's atexit handlers in the child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
        // The parent keeps both.
        assert!(read_thread(&mut values));
        assert_eq!(own_io_descriptors(), [mine]);
        done_tx.send(()).unwrap();
        parked.join().unwrap();
    }
}
