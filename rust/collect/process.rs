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

use super::procfs::{self, fields, keyed_values, parse_u64, sysconf, Reader};
use std::ffi::CStr;

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
        let page = sysconf(libc::_SC_PAGESIZE);
        reading.memory_resident_bytes = page.and_then(|page| stat.rss_pages.checked_mul(page));
        reading.memory_virtual_bytes = Some(stat.vsize_bytes);
        reading.threads = Some(stat.num_threads);
        reading.uptime_seconds = uptime_seconds(stat.start_ticks);
    }
    if !read_rusage(&mut reading) {
        // getrusage(RUSAGE_SELF) does not fail in practice; stat has tick-granular CPU.
        if let (Some(stat), Some(hz)) = (&stat, sysconf(libc::_SC_CLK_TCK)) {
            reading.cpu_user_seconds = Some(stat.utime_ticks as f64 / hz as f64);
            reading.cpu_system_seconds = Some(stat.stime_ticks as f64 / hz as f64);
            reading.faults_minor = Some(stat.minflt);
            reading.faults_major = Some(stat.majflt);
        }
    }
    if let Some((read, write)) = files
        .bytes("/proc/self/io", usize::MAX)
        .and_then(parse_disk_io)
    {
        reading.disk_read_bytes = Some(read);
        reading.disk_write_bytes = Some(write);
    }
    if let Some((receive, transmit)) = files
        .bytes("/proc/self/net/dev", usize::MAX)
        .map(sum_network)
    {
        reading.network_receive_bytes = Some(receive);
        reading.network_transmit_bytes = Some(transmit);
    }
    reading.open_file_descriptors = count_open_fds();
    reading
}

// ---- /proc/self/stat ---------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Stat {
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

fn count_open_fds() -> Option<u64> {
    // Since Linux 6.2 the directory's size is the number of open descriptors.
    // SAFETY: zeroed stat is a valid value; stat only writes into it.
    let mut status: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated; valid pointer.
    if unsafe { libc::stat(FD_DIR.as_ptr(), &mut status) } != 0 {
        return None;
    }
    if status.st_size > 0 {
        return Some(status.st_size as u64);
    }
    count_fd_entries()
}

/// Counts the entries of /proc/self/fd, less the descriptor that lists them.
fn count_fd_entries() -> Option<u64> {
    // SAFETY: path is NUL-terminated.
    let directory = unsafe { libc::opendir(FD_DIR.as_ptr()) };
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
    Some(entries.saturating_sub(1))
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
        let (Some(by_size), Some(by_listing)) = (count_open_fds(), count_fd_entries()) else {
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
    fn parses_stat_with_an_awkward_name() {
        let text = b"4242 (a) b (c) S 1 2 3 0 -1 4194304 100 7 2 9 150 30 1 1 20 0 5 0 12345 1000000 250 18446744073709551615 1 2\n";
        let stat = parse_stat(text).unwrap();
        assert_eq!(
            stat,
            Stat {
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
