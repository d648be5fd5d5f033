//! Whole-process counters for the OpenTelemetry `process.*` metrics, read at collection
//! time (a few times per second at most), never on the hot path.
//!
//! Sources, the files read through [`procfs::Reader`] and parsed by hand:
//!
//! | values | source | why this one |
//! |---|---|---|
//! | CPU user/system, faults, context switches | `getrusage(RUSAGE_SELF)` | one syscall; summed over all threads, live and exited; CPU in µs, its total from the precise scheduler clock (`/proc/self/stat` truncates to 10 ms ticks) |
//! | threads, resident and virtual memory, start time | `/proc/self/stat` | one small file (`rss` is the same count as `statm`'s resident) |
//! | disk bytes | `/proc/self/io` `read_bytes`/`write_bytes` | storage IO of all threads |
//! | network bytes | `/proc/self/net/dev`, every interface but `lo` | see the caveat on [`ProcessReading::network_receive_bytes`] |
//! | open descriptors | `stat("/proc/self/fd").st_size` (Linux ≥ 6.2), else a count of its entries | one syscall where the kernel has it |
//! | uptime | `CLOCK_BOOTTIME` minus the start time in `/proc/self/stat` | the start time is in clock ticks since boot |
//!
//! `/proc/self/status` also has context-switch counts, but for the main thread only, so it
//! is not used. Every value is an `Option`: a source that is missing or unreadable (no
//! `/proc`, a restricted container) gives `None`, never an error.
//!
//! [`read_process_of`] reads another process (a member of this one's process group, in
//! multiprocess mode) the same way, but all from `/proc/<pid>`: no process can call
//! `getrusage` for another. What differs:
//!
//! | values | source | compared with this process's own reading |
//! |---|---|---|
//! | CPU user/system, faults | `/proc/<pid>/stat` `utime`/`stime`, `minflt`/`majflt` | the whole thread group, exited threads included, as getrusage; CPU in 10 ms ticks (truncated) |
//! | context switches | `voluntary_ctxt_switches`/`nonvoluntary_ctxt_switches` of every `/proc/<pid>/task/*/status`, summed | live threads only: the switches of threads that exited are gone (getrusage of the process itself keeps them) |
//! | open descriptors | `stat("/proc/<pid>/fd").st_size`, else a count of its entries | the same |
//! | threads, memory, start time, disk and network bytes | `/proc/<pid>/{stat,io,net/dev}` | the same |
//!
//! Reading another process's `io` and `fd` needs the permission to trace it (the same user,
//! not made undumpable); without it those values are `None`.

use super::procfs::{self, fields, keyed_values, parse_u64, sysconf, Reader};
use std::ffi::{CStr, CString};

/// One reading of this process's counters. Counters are cumulative since the process
/// started; callers take differences between readings for rates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessReading {
    /// CPU seconds in user mode, all threads (exited ones included).
    pub cpu_user_seconds: Option<f64>,
    /// CPU seconds in kernel mode, all threads (exited ones included).
    pub cpu_system_seconds: Option<f64>,
    /// Resident set size in bytes.
    pub memory_resident_bytes: Option<u64>,
    /// Virtual memory size in bytes.
    pub memory_virtual_bytes: Option<u64>,
    /// Bytes this process caused to be fetched from storage.
    pub disk_read_bytes: Option<u64>,
    /// Bytes this process caused to be sent to storage (page-cache writes count when
    /// dirtied; file systems without a backing device, such as tmpfs, count nothing).
    pub disk_write_bytes: Option<u64>,
    /// Bytes received on every interface but `lo`. Linux keeps no per-process network
    /// counters: this is the traffic of the process's network namespace, which is the
    /// process's own only when it has a namespace to itself (a container); on a host it is
    /// the whole machine's.
    pub network_receive_bytes: Option<u64>,
    /// Bytes transmitted on every interface but `lo` (same caveat as receive).
    pub network_transmit_bytes: Option<u64>,
    pub context_switches_voluntary: Option<u64>,
    pub context_switches_involuntary: Option<u64>,
    pub faults_minor: Option<u64>,
    pub faults_major: Option<u64>,
    pub threads: Option<u64>,
    pub open_file_descriptors: Option<u64>,
    /// Seconds since the process started (clock-tick granular: 10 ms at the usual 100 Hz).
    pub uptime_seconds: Option<f64>,
    /// When the process started, in clock ticks since boot (`/proc/<pid>/stat` field 22):
    /// with the PID, it names one process (PIDs are reused).
    pub start_ticks: Option<u64>,
}

/// Reads every counter of this process. Costs tens of microseconds (three small /proc
/// files, a stat and a getrusage); meant for metric collection, not for every call.
pub fn read_process() -> ProcessReading {
    let mut reading = ProcessReading::default();
    let mut files = Reader::system();
    let stat = files
        .bytes("/proc/self/stat", usize::MAX)
        .and_then(parse_stat);
    if let Some(stat) = &stat {
        apply_stat(&mut reading, stat);
    }
    if !read_rusage(&mut reading) {
        // getrusage(RUSAGE_SELF) does not fail in practice; stat has tick-granular CPU.
        if let Some(stat) = &stat {
            apply_stat_counters(&mut reading, stat);
        }
    }
    read_io_and_network(&mut files, "/proc/self", &mut reading);
    reading.open_file_descriptors = count_open_fds(FD_DIR, true);
    reading
}

/// Reads every counter of the process `pid` (this one's too, by its PID) from
/// `/proc/<pid>`; `None` when there is no such process, or it has exited (a zombie not yet
/// reaped). See the module documentation for how the values differ from [`read_process`]'s.
/// Costs a few tens of microseconds plus one small file per thread.
pub fn read_process_of(pid: u32) -> Option<ProcessReading> {
    let directory = format!("/proc/{pid}");
    let mut files = Reader::system();
    let stat = files
        .bytes(format!("{directory}/stat"), usize::MAX)
        .and_then(parse_stat)?;
    if matches!(stat.state, b'Z' | b'X' | b'x') {
        return None;
    }
    let mut reading = ProcessReading::default();
    apply_stat(&mut reading, &stat);
    apply_stat_counters(&mut reading, &stat);
    read_io_and_network(&mut files, &directory, &mut reading);
    if let Some((voluntary, involuntary)) = sum_thread_switches(&mut files, &directory) {
        reading.context_switches_voluntary = Some(voluntary);
        reading.context_switches_involuntary = Some(involuntary);
    }
    reading.open_file_descriptors = CString::new(format!("{directory}/fd"))
        .ok()
        .and_then(|fd_dir| count_open_fds(&fd_dir, pid == std::process::id()));
    Some(reading)
}

/// Memory, threads, start time and uptime from a stat.
fn apply_stat(reading: &mut ProcessReading, stat: &Stat) {
    let page = sysconf(libc::_SC_PAGESIZE);
    reading.memory_resident_bytes = page.and_then(|page| stat.rss_pages.checked_mul(page));
    reading.memory_virtual_bytes = Some(stat.vsize_bytes);
    reading.threads = Some(stat.num_threads);
    reading.start_ticks = Some(stat.start_ticks);
    reading.uptime_seconds = uptime_seconds(stat.start_ticks);
}

/// CPU times (tick-granular) and page faults from a stat.
fn apply_stat_counters(reading: &mut ProcessReading, stat: &Stat) {
    if let Some(hz) = sysconf(libc::_SC_CLK_TCK) {
        reading.cpu_user_seconds = Some(stat.utime_ticks as f64 / hz as f64);
        reading.cpu_system_seconds = Some(stat.stime_ticks as f64 / hz as f64);
    }
    reading.faults_minor = Some(stat.minflt);
    reading.faults_major = Some(stat.majflt);
}

/// Disk bytes from `<directory>/io`, network bytes from `<directory>/net/dev`.
fn read_io_and_network(files: &mut Reader<'_>, directory: &str, reading: &mut ProcessReading) {
    if let Some((read, write)) = files
        .bytes(format!("{directory}/io"), usize::MAX)
        .and_then(parse_disk_io)
    {
        reading.disk_read_bytes = Some(read);
        reading.disk_write_bytes = Some(write);
    }
    if let Some((receive, transmit)) = files
        .bytes(format!("{directory}/net/dev"), usize::MAX)
        .map(sum_network)
    {
        reading.network_receive_bytes = Some(receive);
        reading.network_transmit_bytes = Some(transmit);
    }
}

// ---- /proc/self/stat ---------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Stat {
    /// Field 3: `R`, `S`, ... `Z` (zombie), `X` (dead).
    state: u8,
    minflt: u64,
    majflt: u64,
    utime_ticks: u64,
    stime_ticks: u64,
    num_threads: u64,
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

/// Parses `pid (comm) state ppid ...` (proc(5)). The command name may hold spaces and
/// parentheses, so the fields are counted from the last `)`.
fn parse_stat(text: &[u8]) -> Option<Stat> {
    let close = text.iter().rposition(|&byte| byte == b')')?;
    // Field 3 (state) is the first after the name; rss (field 24) the last one needed.
    let mut after_name = fields(&text[close + 1..]);
    let mut found: [&[u8]; 22] = [&[]; 22];
    for slot in &mut found {
        *slot = after_name.next()?;
    }
    let field = |number: usize| parse_u64(found[number - 3]);
    Some(Stat {
        state: *found[0].first()?,
        minflt: field(10)?,
        majflt: field(12)?,
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        num_threads: field(20)?,
        start_ticks: field(22)?,
        vsize_bytes: field(23)?,
        rss_pages: field(24)?,
    })
}

#[cfg(target_os = "linux")]
fn uptime_seconds(start_ticks: u64) -> Option<f64> {
    // The start time is CLOCK_BOOTTIME (time-namespace adjusted) in clock ticks.
    let hz = sysconf(libc::_SC_CLK_TCK)?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return None;
    }
    let now = now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9;
    Some((now - start_ticks as f64 / hz as f64).max(0.0))
}

#[cfg(not(target_os = "linux"))]
fn uptime_seconds(_start_ticks: u64) -> Option<f64> {
    None
}

// ---- getrusage -----------------------------------------------------------------------------

fn read_rusage(reading: &mut ProcessReading) -> bool {
    // SAFETY: zeroed rusage is a valid value; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return false;
    }
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 * 1e-6;
    reading.cpu_user_seconds = Some(seconds(usage.ru_utime));
    reading.cpu_system_seconds = Some(seconds(usage.ru_stime));
    reading.faults_minor = Some(usage.ru_minflt as u64);
    reading.faults_major = Some(usage.ru_majflt as u64);
    reading.context_switches_voluntary = Some(usage.ru_nvcsw as u64);
    reading.context_switches_involuntary = Some(usage.ru_nivcsw as u64);
    true
}

// ---- /proc/self/io ---------------------------------------------------------------------------

/// `read_bytes` and `write_bytes` from the `key: value` lines of an io file.
fn parse_disk_io(text: &[u8]) -> Option<(u64, u64)> {
    let [read, write] = keyed_values(text, [b"read_bytes", b"write_bytes"]);
    Some((parse_u64(read?)?, parse_u64(write?)?))
}

// ---- /proc/<pid>/task/*/status ------------------------------------------------------------

/// Voluntary and involuntary context switches summed over the live threads of the process
/// in `directory`; `None` if no thread's status could be read. A thread that ends while
/// they are listed is left out.
fn sum_thread_switches(files: &mut Reader<'_>, directory: &str) -> Option<(u64, u64)> {
    let tasks = std::fs::read_dir(files.path(format!("{directory}/task"))).ok()?;
    let mut total: Option<(u64, u64)> = None;
    for task in tasks.flatten() {
        let Some(switches) = files
            .bytes_at(&task.path().join("status"), usize::MAX)
            .and_then(parse_switches)
        else {
            continue;
        };
        let (voluntary, involuntary) = total.unwrap_or_default();
        total = Some((
            voluntary.wrapping_add(switches.0),
            involuntary.wrapping_add(switches.1),
        ));
    }
    total
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a status file.
fn parse_switches(text: &[u8]) -> Option<(u64, u64)> {
    let [voluntary, involuntary] = keyed_values(
        text,
        [b"voluntary_ctxt_switches", b"nonvoluntary_ctxt_switches"],
    );
    Some((parse_u64(voluntary?)?, parse_u64(involuntary?)?))
}

// ---- /proc/self/net/dev ----------------------------------------------------------------------

/// Received and transmitted bytes summed over every interface but `lo`.
fn sum_network(text: &[u8]) -> (u64, u64) {
    procfs::net_devices(text)
        .filter(|device| device.name != b"lo")
        .fold((0u64, 0u64), |(receive, transmit), device| {
            (
                receive.wrapping_add(device.receive_bytes),
                transmit.wrapping_add(device.transmit_bytes),
            )
        })
}

// ---- /proc/self/fd ---------------------------------------------------------------------------

const FD_DIR: &CStr = c"/proc/self/fd";

/// The open descriptors listed in `fd_dir` (a `/proc/<pid>/fd`); `own`: it is this
/// process's, so listing it opens one more.
fn count_open_fds(fd_dir: &CStr, own: bool) -> Option<u64> {
    // Since Linux 6.2 the directory's size is the number of open descriptors.
    // SAFETY: zeroed stat is a valid value; stat only writes into it.
    let mut status: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated; valid pointer.
    if unsafe { libc::stat(fd_dir.as_ptr(), &mut status) } != 0 {
        return None;
    }
    if status.st_size > 0 {
        return Some(status.st_size as u64);
    }
    count_fd_entries(fd_dir, own)
}

/// Counts the entries of `fd_dir`, less the descriptor that lists them when it is this
/// process's own.
fn count_fd_entries(fd_dir: &CStr, own: bool) -> Option<u64> {
    // SAFETY: path is NUL-terminated.
    let directory = unsafe { libc::opendir(fd_dir.as_ptr()) };
    if directory.is_null() {
        return None;
    }
    let mut entries = 0u64;
    loop {
        // SAFETY: directory is open; the entry is valid until the next readdir.
        let entry = unsafe { libc::readdir(directory) };
        if entry.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if !name.to_bytes().starts_with(b".") {
            entries += 1;
        }
    }
    // SAFETY: opened above, closed once.
    unsafe { libc::closedir(directory) };
    Some(if own {
        entries.saturating_sub(1)
    } else {
        entries
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    #[test]
    fn every_value_is_read_and_sane_on_linux() {
        let reading = read_process();
        let user = reading.cpu_user_seconds.unwrap();
        let system = reading.cpu_system_seconds.unwrap();
        assert!(user >= 0.0 && system >= 0.0 && user + system > 0.0);
        let resident = reading.memory_resident_bytes.unwrap();
        let virtual_ = reading.memory_virtual_bytes.unwrap();
        assert!(resident > 1 << 20, "resident {resident}");
        assert!(
            virtual_ >= resident,
            "virtual {virtual_} < resident {resident}"
        );
        assert!(reading.disk_read_bytes.is_some());
        assert!(reading.disk_write_bytes.is_some());
        if std::path::Path::new("/proc/self/net/dev").exists() {
            assert!(reading.network_receive_bytes.is_some());
            assert!(reading.network_transmit_bytes.is_some());
        }
        assert!(reading.context_switches_voluntary.is_some());
        assert!(reading.context_switches_involuntary.is_some());
        assert!(reading.faults_minor.unwrap() > 0);
        assert!(reading.faults_major.is_some());
        assert!(reading.threads.unwrap() >= 1);
        assert!(reading.open_file_descriptors.unwrap() >= 3);
        let uptime = reading.uptime_seconds.unwrap();
        assert!((0.0..86_400.0 * 365.0).contains(&uptime), "uptime {uptime}");
    }

    #[test]
    fn cpu_time_grows_after_a_busy_loop() {
        let before = read_process();
        let started = crate::probe::thread_cpu_ns();
        let mut spin = 0u64;
        while crate::probe::thread_cpu_ns() - started < 200_000_000 {
            for _ in 0..1000 {
                spin = black_box(spin.wrapping_add(1));
            }
        }
        let after = read_process();
        let total =
            |r: &ProcessReading| r.cpu_user_seconds.unwrap() + r.cpu_system_seconds.unwrap();
        let used = total(&after) - total(&before);
        // This thread alone used 200 ms; getrusage's total is the exact scheduler time.
        assert!(
            used >= 0.199,
            "process CPU grew by {used} s over 200 ms of thread CPU"
        );
        assert!(after.cpu_user_seconds >= before.cpu_user_seconds);
        assert!(after.cpu_system_seconds >= before.cpu_system_seconds);
    }

    #[test]
    fn open_descriptors_are_counted() {
        // Other tests run in parallel threads and open or close a few descriptors too.
        let before = read_process().open_file_descriptors.unwrap();
        let files: Vec<_> = (0..64)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let during = read_process().open_file_descriptors.unwrap();
        drop(files);
        let after = read_process().open_file_descriptors.unwrap();
        assert!(
            during >= before + 56,
            "{before} -> {during} with 64 more open"
        );
        assert!(after + 56 <= during, "{during} -> {after} after closing 64");
    }

    #[test]
    fn stat_size_and_listing_agree() {
        let (Some(by_size), Some(by_listing)) =
            (count_open_fds(FD_DIR, true), count_fd_entries(FD_DIR, true))
        else {
            panic!("/proc/self/fd unreadable");
        };
        // Parallel tests may open or close a descriptor between the two readings.
        assert!(
            by_size.abs_diff(by_listing) <= 4,
            "{by_size} vs {by_listing}"
        );
    }

    #[test]
    fn threads_are_counted() {
        let before = read_process().threads.unwrap();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = std::sync::Arc::new(std::sync::Mutex::new(wait));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let wait = wait.clone();
                let ready = ready_tx.clone();
                std::thread::spawn(move || {
                    ready.send(()).unwrap();
                    let _ = wait.lock().unwrap().recv();
                })
            })
            .collect();
        for _ in 0..16 {
            ready_rx.recv().unwrap();
        }
        let during = read_process().threads.unwrap();
        drop(release);
        for thread in threads {
            thread.join().unwrap();
        }
        // Test-harness threads of other tests may come and go meanwhile.
        assert!(
            during >= before + 12,
            "{before} -> {during} with 16 more threads"
        );
    }

    #[test]
    fn touching_new_memory_faults_and_grows_the_resident_set() {
        const SIZE: usize = 64 << 20;
        // The resident set is the whole process's: the harness's other test threads free
        // memory meanwhile (one such try saw 36 MiB of growth), so one of a few tries must
        // see the 64 MiB.
        let mut grown_seen = Vec::new();
        for _ in 0..5 {
            let before = read_process();
            let mut memory = vec![0u8; SIZE];
            for page in memory.chunks_mut(4096) {
                page[0] = 1;
            }
            black_box(&memory);
            let after = read_process();
            let faults = after.faults_minor.unwrap() - before.faults_minor.unwrap();
            // 16384 pages; transparent huge pages can make that as few as 32 faults.
            assert!(faults >= 32, "{faults} minor faults touching 64 MiB");
            assert!(after.memory_virtual_bytes.unwrap() >= after.memory_resident_bytes.unwrap());
            let grown = after.memory_resident_bytes.unwrap() as i64
                - before.memory_resident_bytes.unwrap() as i64;
            drop(memory);
            if grown >= 48 << 20 {
                return;
            }
            grown_seen.push(grown);
        }
        panic!("resident grew by {grown_seen:?} bytes for 64 MiB in each try");
    }

    #[test]
    fn context_switches_of_other_threads_count() {
        let before = read_process().context_switches_voluntary.unwrap();
        std::thread::spawn(|| {
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .join()
        .unwrap();
        let after = read_process().context_switches_voluntary.unwrap();
        assert!(after >= before + 5, "{before} -> {after}");
    }

    #[test]
    fn disk_writes_are_counted_where_the_file_system_accounts_them() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("meterage-process-{}", std::process::id()));
        let before = read_process().disk_write_bytes.unwrap();
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![3u8; 1 << 20]).unwrap();
        file.sync_all().unwrap();
        let after = read_process().disk_write_bytes.unwrap();
        drop(file);
        std::fs::remove_file(&path).unwrap();
        if after == before {
            eprintln!("{}: no storage write accounting (tmpfs?)", path.display());
            return;
        }
        assert!(after - before >= 1 << 20, "{before} -> {after}");
    }

    #[test]
    fn uptime_grows() {
        let before = read_process().uptime_seconds.unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let after = read_process().uptime_seconds.unwrap();
        assert!(after > before, "{before} -> {after}");
    }

    #[test]
    fn reading_this_process_by_its_pid_agrees_with_reading_itself() {
        let pid = std::process::id();
        let total =
            |r: &ProcessReading| (r.cpu_user_seconds.unwrap(), r.cpu_system_seconds.unwrap());
        // Test threads of the harness come and go: a few tries must see no thread change.
        let mut seen = Vec::new();
        for _ in 0..20 {
            let before = read_process();
            let of = read_process_of(pid).expect("this process by its PID");
            let after = read_process();
            if before.threads != after.threads {
                seen.push((before.threads, of.threads, after.threads));
                continue;
            }
            assert_eq!(of.threads, before.threads);
            // /proc/<pid>/stat has the same split of the same total as getrusage, truncated
            // to clock ticks (10 ms at 100 Hz).
            let tick = 1.0 / sysconf(libc::_SC_CLK_TCK).unwrap() as f64;
            let ((user_before, system_before), (user_of, system_of), (user_after, system_after)) =
                (total(&before), total(&of), total(&after));
            assert!(
                user_of >= user_before - tick - 1e-6 && user_of <= user_after + 1e-6,
                "user {user_before} / {user_of} / {user_after}"
            );
            assert!(
                system_of >= system_before - tick - 1e-6 && system_of <= system_after + 1e-6,
                "system {system_before} / {system_of} / {system_after}"
            );
            // Page faults: the same whole-group counts as getrusage.
            let (minor_before, minor_of, minor_after) = (
                before.faults_minor.unwrap(),
                of.faults_minor.unwrap(),
                after.faults_minor.unwrap(),
            );
            assert!(
                (minor_before..=minor_after).contains(&minor_of),
                "minor faults {minor_before} / {minor_of} / {minor_after}"
            );
            // Live threads only: at most what getrusage counts (exited threads too).
            assert!(
                of.context_switches_voluntary.unwrap() <= after.context_switches_voluntary.unwrap()
            );
            assert!(
                of.context_switches_involuntary.unwrap()
                    <= after.context_switches_involuntary.unwrap()
            );
            assert_eq!(of.start_ticks, before.start_ticks);
            assert!(of.start_ticks.is_some());
            assert!(of.memory_resident_bytes.unwrap() > 1 << 20);
            assert!(of.memory_virtual_bytes.unwrap() >= of.memory_resident_bytes.unwrap());
            assert!(of.disk_read_bytes.is_some() && of.disk_write_bytes.is_some());
            assert_eq!(
                of.network_receive_bytes.is_some(),
                before.network_receive_bytes.is_some()
            );
            // Other tests open and close a few descriptors meanwhile.
            let descriptors = of.open_file_descriptors.unwrap();
            assert!(
                descriptors.abs_diff(before.open_file_descriptors.unwrap()) <= 8,
                "{descriptors} descriptors by PID, {:?} by self",
                before.open_file_descriptors
            );
            return;
        }
        panic!("the thread count changed during each try: {seen:?}");
    }

    #[test]
    fn another_process_is_read_until_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        // Straight after its exec the child may not have touched a page yet.
        let deadline = Instant::now() + Duration::from_secs(10);
        let reading = loop {
            let reading = read_process_of(pid).expect("a live child");
            if reading.memory_resident_bytes.unwrap() > 0 || Instant::now() > deadline {
                break reading;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(reading.threads, Some(1));
        assert!(reading.memory_resident_bytes.unwrap() > 0);
        assert!(reading.cpu_user_seconds.unwrap() >= 0.0);
        assert!(reading.cpu_system_seconds.unwrap() >= 0.0);
        assert!(reading.context_switches_voluntary.is_some());
        assert!(reading.faults_minor.is_some());
        // stdin, stdout and stderr at least (this process's, inherited).
        assert!(reading.open_file_descriptors.unwrap() >= 3);
        assert!(reading.start_ticks.unwrap() >= read_process().start_ticks.unwrap());
        assert!(reading.uptime_seconds.unwrap() < 60.0);
        child.kill().unwrap();
        // Killed but not yet reaped: a zombie, which is not read.
        let deadline = Instant::now() + Duration::from_secs(10);
        while read_process_of(pid).is_some() {
            assert!(
                Instant::now() < deadline,
                "the killed child still reads as live"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert_eq!(read_process_of(pid), None);
        // Beyond the largest PID Linux gives (2^22).
        assert_eq!(read_process_of(4_000_000_000), None);
    }

    #[test]
    fn parses_context_switches_of_a_status() {
        let text = b"Name:\tpython3\nThreads:\t1\nvoluntary_ctxt_switches:\t152\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(text), Some((152, 7)));
        assert_eq!(
            parse_switches(b"Name:\tx\nvoluntary_ctxt_switches:\t1\n"),
            None
        );
    }

    #[test]
    fn parses_stat_with_an_awkward_name() {
        let text = b"4242 (a) b (c) S 1 2 3 0 -1 4194304 100 7 2 9 150 30 1 1 20 0 5 0 12345 1000000 250 18446744073709551615 1 2\n";
        let stat = parse_stat(text).unwrap();
        assert_eq!(
            stat,
            Stat {
                state: b'S',
                minflt: 100,
                majflt: 2,
                utime_ticks: 150,
                stime_ticks: 30,
                num_threads: 5,
                start_ticks: 12345,
                vsize_bytes: 1_000_000,
                rss_pages: 250,
            }
        );
        assert_eq!(parse_stat(b"4242 (x) S 1 2 3 0 -1 4194304 100 7 2 9"), None);
        assert_eq!(parse_stat(b"no name at all"), None);
    }

    #[test]
    fn parses_io() {
        let text = b"rchar: 1948\nwchar: 12\nsyscr: 6\nsyscw: 1\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_disk_io(text), Some((4096, 8192)));
        assert_eq!(parse_disk_io(b"rchar: 1\n"), None);
    }

    #[test]
    fn sums_network_interfaces_but_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:    3193      29    0    0    0     0          0         0     3193      29    0    0    0     0       0          0\n  \
            eth0: 430282498   13052    0    0    0     0          0         0  1018931    9393    0    0    0     0       0          0\n  \
            eth1:1000 1 0 0 0 0 0 0 2000 1 0 0 0 0 0 0";
        assert_eq!(
            sum_network(text.as_bytes()),
            (430_282_498 + 1000, 1_018_931 + 2000)
        );
        // A namespace with only `lo`: a read zero, not a missing value.
        let loopback_only = text.lines().take(3).collect::<Vec<_>>().join("\n");
        assert_eq!(sum_network(loopback_only.as_bytes()), (0, 0));
    }

    #[test]
    fn cost_of_a_reading() {
        read_process();
        const ROUNDS: u32 = 100;
        let started = Instant::now();
        for _ in 0..ROUNDS {
            black_box(read_process());
        }
        let mean = started.elapsed() / ROUNDS;
        println!("read_process(): mean {mean:?} over {ROUNDS} readings");
    }
}
