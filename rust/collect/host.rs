//! Host-wide counters for the OpenTelemetry `system.*` metrics, and the cgroup v2 counters
//! for `container.*`, read at collection time (seconds apart), never on the hot path.
//!
//! | values | source |
//! |---|---|
//! | CPU seconds per mode | the aggregate `cpu` line of `/proc/stat` (USER_HZ ticks) |
//! | memory | `/proc/meminfo` |
//! | disk bytes and operations | `/proc/diskstats` (512-byte sectors) |
//! | network bytes, packets and errors | `/proc/net/dev` (the process's network namespace) |
//! | file system usage | `statvfs` of each mount in `/proc/self/mounts` |
//! | container CPU and memory | cgroup v2: `/proc/self/cgroup` and the cgroup's directory |
//!
//! The parsers are pure functions of a file's text, tested on fixed samples; the files are
//! read through [`procfs::Reader`], below a root that tests point at a fixed tree.

use super::procfs::{self, keyed_values, leading_numbers, parse_kib, parse_u64, Reader};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The `cpu.mode` values, in the order of [`CpuTimes::seconds`].
pub const CPU_MODES: [&str; 7] = [
    "user",
    "nice",
    "system",
    "idle",
    "iowait",
    "interrupt",
    "steal",
];

/// File systems without storage of their own (kernel interfaces, memory-backed ones):
/// their mounts are not reported. tmpfs is memory, counted in the memory metrics already.
pub const PSEUDO_FILESYSTEMS: [&str; 23] = [
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// Network file systems are not reported either: `statvfs` asks their server, and blocks
/// for as long as the server does not answer, which would stall the collection.
pub const NETWORK_FILESYSTEMS: [&str; 9] = [
    "afs",
    "ceph",
    "cifs",
    "fuse.sshfs",
    "glusterfs",
    "nfs",
    "nfs4",
    "smb3",
    "smbfs",
];

/// Block devices left out of the disk counters: file-backed and memory-backed ones.
const VIRTUAL_DISK_PREFIXES: [&str; 3] = ["loop", "ram", "zram"];

/// `/proc/diskstats` counts 512-byte sectors whatever the device's own sector size.
const SECTOR_BYTES: u64 = 512;

/// One reading of the host. Counters are cumulative since boot (the interfaces': since
/// each was created); callers take differences between readings for rates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostReading {
    pub cpu: Option<CpuTimes>,
    pub memory: Option<Memory>,
    /// Block devices, without [`VIRTUAL_DISK_PREFIXES`] and without ones that never did IO.
    pub disks: Vec<DiskCounters>,
    /// Every interface of this process's network namespace, `lo` included.
    pub interfaces: Vec<InterfaceCounters>,
    /// One entry per mounted file system with storage (bind mounts counted once).
    pub filesystems: Vec<FilesystemUsage>,
    pub container: ContainerReading,
}

/// CPU time of the whole machine, summed over every CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuTimes {
    /// Seconds since boot in each mode of [`CPU_MODES`]; `interrupt` is hard and soft
    /// interrupts together. The modes add up to all the CPU time there was.
    pub seconds: [f64; 7],
}

/// Physical memory in bytes. The four states add up to `total`, as in procps `free` and
/// psutil: `cached` is the page cache plus reclaimable slab, `used` is what remains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub total: u64,
    pub used: u64,
    pub free: u64,
    pub buffers: u64,
    pub cached: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskCounters {
    pub device: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Completed read requests (after merging).
    pub read_operations: u64,
    pub write_operations: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub interface: String,
    pub receive_bytes: u64,
    pub transmit_bytes: u64,
    pub receive_packets: u64,
    pub transmit_packets: u64,
    pub receive_errors: u64,
    pub transmit_errors: u64,
}

/// One file system's space in bytes; `used + free + reserved` is its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesystemUsage {
    /// The mount's source as `/proc/self/mounts` gives it (`/dev/sda1`, `overlay`, ...).
    pub device: String,
    pub filesystem_type: String,
    pub mountpoint: String,
    pub used_bytes: u64,
    /// Free for unprivileged users (`f_bavail`).
    pub free_bytes: u64,
    /// Free, but reserved for the superuser (`f_bfree - f_bavail`).
    pub reserved_bytes: u64,
}

/// The cgroup v2 counters of this process's cgroup; all `None` outside one (cgroup v1, or
/// the root of the hierarchy, whose counters would be the whole machine's).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ContainerReading {
    /// CPUs the cgroup may use (`cpu.max` quota over period); `None` when unlimited.
    pub cpu_limit: Option<f64>,
    /// CPU seconds the cgroup used (`cpu.stat` `usage_usec`).
    pub cpu_seconds: Option<f64>,
    /// `memory.current`, bytes.
    pub memory_usage_bytes: Option<u64>,
    /// `memory.max`, bytes; `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
}

/// One mount from `/proc/self/mounts`, its octal escapes decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub source: Vec<u8>,
    pub mountpoint: Vec<u8>,
    pub filesystem_type: String,
}

/// Reads everything about this machine. Costs tens of microseconds plus two syscalls per
/// mounted file system; meant for metric collection, not for every call.
pub fn read_host() -> HostReading {
    read_host_at(Path::new("/"))
}

/// [`read_host`] with every absolute path taken below `root` (tests use a fixed tree).
pub fn read_host_at(root: &Path) -> HostReading {
    let mut files = Reader::new(root);
    let mounts = files
        .bytes("/proc/self/mounts", usize::MAX)
        .map(parse_mounts)
        .unwrap_or_default();
    HostReading {
        // Only the first line is needed; the kernel makes the whole file but copies out
        // what is asked for.
        cpu: files
            .bytes("/proc/stat", 4096)
            .and_then(|text| parse_cpu_ticks(std::str::from_utf8(text).ok()?))
            .zip(procfs::sysconf(libc::_SC_CLK_TCK))
            .map(|(ticks, hz)| CpuTimes {
                seconds: ticks.map(|count| count as f64 / hz as f64),
            }),
        memory: files.text("/proc/meminfo").and_then(parse_meminfo),
        disks: files
            .text("/proc/diskstats")
            .map(parse_diskstats)
            .unwrap_or_default(),
        interfaces: files
            .text("/proc/net/dev")
            .map(parse_net_dev)
            .unwrap_or_default(),
        filesystems: filesystem_usage(&files, &mounts),
        container: cgroup_directory(&mut files, &mounts)
            .map(|directory| read_cgroup(&mut files, &directory))
            .unwrap_or_default(),
    }
}

// ---- /proc/stat ----------------------------------------------------------------------------

/// Ticks in each of [`CPU_MODES`] from the aggregate `cpu` line (proc(5)): user, nice,
/// system, idle, iowait, irq, softirq, steal, then guest and guest_nice, which the kernel
/// also counts in user and nice, so they are not added again.
pub fn parse_cpu_ticks(stat: &str) -> Option<[u64; 7]> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] =
        leading_numbers(line.split_ascii_whitespace().skip(1))?;
    Some([
        user,
        nice,
        system,
        idle,
        iowait,
        irq.checked_add(softirq)?,
        steal,
    ])
}

// ---- /proc/meminfo -------------------------------------------------------------------------

/// `MemTotal`, `MemFree`, `Buffers`, `Cached` and `SReclaimable` (`Key:   123 kB` lines);
/// `None` unless all five are there.
pub fn parse_meminfo(text: &str) -> Option<Memory> {
    let keys: [&[u8]; 5] = [
        b"MemTotal",
        b"MemFree",
        b"Buffers",
        b"Cached",
        b"SReclaimable",
    ];
    let [total, free, buffers, cached, reclaimable] =
        keyed_values(text.as_bytes(), keys).map(|value| value.and_then(parse_kib));
    let (total, free, buffers) = (total?, free?, buffers?);
    let cached = cached?.checked_add(reclaimable?)?;
    // Never negative; with the usual numbers the four states add up to the total exactly.
    let used = total.saturating_sub(free.saturating_add(buffers).saturating_add(cached));
    Some(Memory {
        total,
        used,
        free,
        buffers,
        cached,
    })
}

// ---- /proc/diskstats -----------------------------------------------------------------------

/// `major minor name reads merged sectors ms writes merged sectors ms ...` lines
/// (Documentation/admin-guide/iostats.rst), without virtual devices and idle ones.
pub fn parse_diskstats(text: &str) -> Vec<DiskCounters> {
    text.lines().filter_map(parse_diskstats_line).collect()
}

fn parse_diskstats_line(line: &str) -> Option<DiskCounters> {
    let mut fields = line.split_ascii_whitespace();
    let device = fields.nth(2)?;
    if VIRTUAL_DISK_PREFIXES
        .iter()
        .any(|prefix| device.starts_with(prefix))
    {
        return None;
    }
    let [reads, _, sectors_read, _, writes, _, sectors_written] = leading_numbers(fields)?;
    if reads == 0 && writes == 0 && sectors_read == 0 && sectors_written == 0 {
        return None;
    }
    Some(DiskCounters {
        device: device.to_owned(),
        read_bytes: sectors_read.checked_mul(SECTOR_BYTES)?,
        write_bytes: sectors_written.checked_mul(SECTOR_BYTES)?,
        read_operations: reads,
        write_operations: writes,
    })
}

// ---- /proc/net/dev -------------------------------------------------------------------------

/// Every interface line (see [`procfs::net_devices`]). The text is UTF-8, so the names are
/// too.
pub fn parse_net_dev(text: &str) -> Vec<InterfaceCounters> {
    procfs::net_devices(text.as_bytes())
        .map(|device| InterfaceCounters {
            interface: String::from_utf8_lossy(device.name).into_owned(),
            receive_bytes: device.receive_bytes,
            transmit_bytes: device.transmit_bytes,
            receive_packets: device.receive_packets,
            transmit_packets: device.transmit_packets,
            receive_errors: device.receive_errors,
            transmit_errors: device.transmit_errors,
        })
        .collect()
}

// ---- /proc/self/mounts and statvfs ---------------------------------------------------------

/// `source mountpoint type options dump pass` lines (fstab(5) layout). The kernel writes
/// space, tab, newline and backslash in names as `\ooo` octal escapes.
pub fn parse_mounts(text: &[u8]) -> Vec<Mount> {
    text.split(|&byte| byte == b'\n')
        .filter_map(|line| {
            let mut fields = line.split(|&byte| byte == b' ').filter(|f| !f.is_empty());
            let source = unescape_octal(fields.next()?);
            let mountpoint = unescape_octal(fields.next()?);
            let filesystem_type = String::from_utf8_lossy(fields.next()?).into_owned();
            Some(Mount {
                source,
                mountpoint,
                filesystem_type,
            })
        })
        .collect()
}

fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(field.len());
    let mut rest = field;
    while let Some((&byte, tail)) = rest.split_first() {
        if let (b'\\', [a, b, c, after @ ..]) = (byte, tail) {
            let digits = [*a, *b, *c];
            if digits.iter().all(|digit| (b'0'..=b'7').contains(digit)) {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    decoded.push(value);
                    rest = after;
                    continue;
                }
            }
        }
        decoded.push(byte);
        rest = tail;
    }
    decoded
}

/// Whether mounts of this type are left out of the file system usage.
pub fn is_skipped_filesystem(filesystem_type: &str) -> bool {
    PSEUDO_FILESYSTEMS.contains(&filesystem_type) || NETWORK_FILESYSTEMS.contains(&filesystem_type)
}

/// Usage of every mounted file system with storage, each counted once: bind mounts of one
/// file system share a device number (`st_dev`), and the first mount listed is reported.
fn filesystem_usage(files: &Reader, mounts: &[Mount]) -> Vec<FilesystemUsage> {
    let mut reported_devices = Vec::new();
    let mut usages = Vec::new();
    for mount in mounts {
        if is_skipped_filesystem(&mount.filesystem_type) {
            continue;
        }
        let path = files.path(&mount.mountpoint);
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if reported_devices.contains(&metadata.dev()) {
            continue;
        }
        let Some((used_bytes, free_bytes, reserved_bytes)) = statvfs_bytes(&path) else {
            continue;
        };
        reported_devices.push(metadata.dev());
        usages.push(FilesystemUsage {
            device: String::from_utf8_lossy(&mount.source).into_owned(),
            filesystem_type: mount.filesystem_type.clone(),
            mountpoint: String::from_utf8_lossy(&mount.mountpoint).into_owned(),
            used_bytes,
            free_bytes,
            reserved_bytes,
        });
    }
    usages
}

fn statvfs_bytes(path: &Path) -> Option<(u64, u64, u64)> {
    let path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid value; statvfs only writes into it.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated; valid pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    let fragment = if stats.f_frsize > 0 {
        stats.f_frsize
    } else {
        stats.f_bsize
    };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    filesystem_bytes(
        stats.f_blocks as u64,
        stats.f_bfree as u64,
        stats.f_bavail as u64,
        fragment as u64,
    )
}

/// (used, free, reserved) bytes from `statvfs` block counts, as `df` computes them; `None`
/// for a file system with no blocks (one without storage that the type list missed).
pub fn filesystem_bytes(
    blocks: u64,
    free_blocks: u64,
    available_blocks: u64,
    block_bytes: u64,
) -> Option<(u64, u64, u64)> {
    if blocks == 0 {
        return None;
    }
    let bytes = |count: u64| count.checked_mul(block_bytes);
    Some((
        bytes(blocks.saturating_sub(free_blocks))?,
        bytes(available_blocks)?,
        bytes(free_blocks.saturating_sub(available_blocks))?,
    ))
}

// ---- cgroup v2 -----------------------------------------------------------------------------

/// The path of this process's cgroup in the v2 hierarchy: the `0::/path` line of
/// `/proc/self/cgroup` (there is none on a cgroup v1-only machine).
pub fn parse_cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// The directory of this process's cgroup v2, where the cgroup2 file system is mounted
/// (`/sys/fs/cgroup` on a unified machine, `/sys/fs/cgroup/unified` on a hybrid one). `None`
/// for the root cgroup: it has no `cgroup.type`, and its counters are the whole machine's.
fn cgroup_directory(files: &mut Reader, mounts: &[Mount]) -> Option<PathBuf> {
    let cgroup = parse_cgroup_v2_path(files.text("/proc/self/cgroup")?)?;
    let relative = cgroup.trim_start_matches('/').trim_end().to_owned();
    let mount = mounts
        .iter()
        .find(|mount| mount.filesystem_type == "cgroup2")?;
    let directory = files.path(&mount.mountpoint).join(relative);
    directory.join("cgroup.type").exists().then_some(directory)
}

fn read_cgroup(files: &mut Reader, directory: &Path) -> ContainerReading {
    let file = |name: &str| directory.join(name);
    ContainerReading {
        cpu_limit: files.text_at(&file("cpu.max")).and_then(parse_cpu_max),
        cpu_seconds: files
            .text_at(&file("cpu.stat"))
            .and_then(parse_cpu_stat_usage),
        memory_usage_bytes: files
            .text_at(&file("memory.current"))
            .and_then(|text| parse_u64(text.trim().as_bytes())),
        memory_limit_bytes: files
            .text_at(&file("memory.max"))
            .and_then(parse_memory_max),
    }
}

/// `cpu.max` is `quota period` in µs, or `max period` when unlimited: the CPUs the cgroup
/// may use, `None` when unlimited.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_ascii_whitespace();
    let quota = fields.next()?;
    let period = parse_u64(fields.next()?.as_bytes())?;
    if quota == "max" || period == 0 {
        return None;
    }
    Some(parse_u64(quota.as_bytes())? as f64 / period as f64)
}

/// Seconds from the `usage_usec` line of `cpu.stat`.
pub fn parse_cpu_stat_usage(text: &str) -> Option<f64> {
    let [microseconds] = keyed_values(text.as_bytes(), [b"usage_usec"]);
    Some(parse_u64(microseconds?)? as f64 * 1e-6)
}

/// `memory.max` in bytes, `None` when it is `max` (unlimited).
pub fn parse_memory_max(text: &str) -> Option<u64> {
    parse_u64(text.trim().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::procfs::tests::NET_DEV;
    use super::*;

    // ---- parsers, on fixed samples -----------------------------------------------------------

    const STAT: &str = "\
cpu  53946 7 6582 194851 693 11 99 18 5 2
cpu0 11433 0 2289 114167 99 0 32 4 0 0
cpu1 42513 7 4292 80683 594 11 67 14 5 2
intr 1234 0 9
ctxt 987654
btime 1700000000
";

    #[test]
    fn cpu_ticks_come_from_the_aggregate_line() {
        // interrupt = irq + softirq; guest and guest_nice (already in user and nice) ignored.
        assert_eq!(
            parse_cpu_ticks(STAT),
            Some([53946, 7, 6582, 194851, 693, 110, 18])
        );
    }

    #[test]
    fn cpu_ticks_need_the_eight_modes() {
        assert_eq!(parse_cpu_ticks("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_cpu_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(parse_cpu_ticks("cpu  1 2 3 x 5 6 7 8\n"), None);
        assert_eq!(parse_cpu_ticks(""), None);
        assert_eq!(
            parse_cpu_ticks("cpu 1 2 3 4 5 6 7 8\n"),
            Some([1, 2, 3, 4, 5, 13, 8])
        );
    }

    const MEMINFO: &str = "\
MemTotal:       24668920 kB
MemFree:         1234568 kB
MemAvailable:   20000000 kB
Buffers:          345676 kB
Cached:         15000000 kB
SwapCached:            0 kB
Shmem:             12345 kB
SReclaimable:     600000 kB
SUnreclaim:       100000 kB
HugePages_Total:       0
";

    #[test]
    fn memory_states_add_up_to_the_total() {
        let memory = parse_meminfo(MEMINFO).unwrap();
        let kib = 1024;
        assert_eq!(memory.total, 24668920 * kib);
        assert_eq!(memory.free, 1234568 * kib);
        assert_eq!(memory.buffers, 345676 * kib);
        assert_eq!(memory.cached, (15000000 + 600000) * kib);
        assert_eq!(
            memory.used,
            (24668920 - 1234568 - 345676 - 15000000 - 600000) * kib
        );
        assert_eq!(
            memory.used + memory.free + memory.buffers + memory.cached,
            memory.total
        );
    }

    #[test]
    fn memory_needs_every_field() {
        let without_reclaimable: String = MEMINFO
            .lines()
            .filter(|line| !line.starts_with("SReclaimable"))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(parse_meminfo(&without_reclaimable), None);
        assert_eq!(
            parse_meminfo(&MEMINFO.replace("Buffers:          345676 kB", "Buffers: lots kB")),
            None
        );
        assert_eq!(parse_meminfo(""), None);
    }

    #[test]
    fn used_memory_is_never_negative() {
        let odd =
            "MemTotal: 10 kB\nMemFree: 8 kB\nBuffers: 1 kB\nCached: 2 kB\nSReclaimable: 1 kB\n";
        assert_eq!(parse_meminfo(odd).unwrap().used, 0);
    }

    const DISKSTATS: &str = "\
   7       0 loop0 12 0 24 0 0 0 0 0 0 4 0 0 0 0 0 0 0
 254       0 vda 104901 8555 6418258 123476 12979 44099 5453888 15061 0 13032 139251 4225 0 817408 598 1835 114
 254       1 vda1 100 0 800 10 3 0 24 1 0 10 11 0 0 0 0
 253       0 zram0 5 0 40 0 0 0 0 0 0 0 0 0 0 0 0 0 0
   1       0 ram0 3 0 24 0 0 0 0 0 0 0 0
   8       0 sdb 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 259       0 nvme0n1 7 0 56 1 9 2 72 3 0 4 4
";

    #[test]
    fn disks_count_sectors_of_512_bytes_and_completed_requests() {
        let disks = parse_diskstats(DISKSTATS);
        let names: Vec<_> = disks.iter().map(|disk| disk.device.as_str()).collect();
        // loop, zram and ram devices and the idle sdb are left out; partitions stay.
        assert_eq!(names, ["vda", "vda1", "nvme0n1"]);
        assert_eq!(
            disks[0],
            DiskCounters {
                device: "vda".into(),
                read_bytes: 6418258 * 512,
                write_bytes: 5453888 * 512,
                read_operations: 104901,
                write_operations: 12979,
            }
        );
        // An old kernel's 11 fields (no discard or flush counters) are enough.
        assert_eq!(disks[2].write_bytes, 72 * 512);
        assert_eq!(disks[2].write_operations, 9);
    }

    #[test]
    fn a_short_diskstats_line_is_skipped() {
        assert_eq!(parse_diskstats(" 8 0 sda 1 2 3\n"), []);
    }

    #[test]
    fn every_interface_with_its_bytes_packets_and_errors() {
        // The line format is procfs's (tested there); this is the mapping to the counters.
        let interfaces = parse_net_dev(NET_DEV);
        let names: Vec<_> = interfaces.iter().map(|i| i.interface.as_str()).collect();
        assert_eq!(names, ["lo", "eth0", "wlan0"]);
        assert_eq!(
            interfaces[1],
            InterfaceCounters {
                interface: "eth0".into(),
                receive_bytes: 362647773,
                transmit_bytes: 741552,
                receive_packets: 10195,
                transmit_packets: 6565,
                receive_errors: 3,
                transmit_errors: 2,
            }
        );
    }

    const MOUNTS: &[u8] = b"\
proc /proc proc rw,relatime 0 0
/dev/vda / ext4 rw,relatime,discard 0 0
tmpfs /dev/shm tmpfs rw,relatime 0 0
/dev/sdb1 /mnt/my\\040disk xfs rw 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0
/dev/vda /srv/bound ext4 rw,relatime 0 0
";

    #[test]
    fn mounts_are_read_with_their_escapes_decoded() {
        let mounts = parse_mounts(MOUNTS);
        assert_eq!(mounts.len(), 6);
        assert_eq!(
            mounts[1],
            Mount {
                source: b"/dev/vda".to_vec(),
                mountpoint: b"/".to_vec(),
                filesystem_type: "ext4".into(),
            }
        );
        assert_eq!(mounts[3].mountpoint, b"/mnt/my disk");
        assert_eq!(mounts[4].filesystem_type, "cgroup2");
    }

    #[test]
    fn octal_escapes() {
        assert_eq!(unescape_octal(br"a\011b\012c\134d"), b"a\tb\nc\\d");
        // Not an escape: kept as it is.
        assert_eq!(unescape_octal(br"a\9bc\04"), br"a\9bc\04");
        assert_eq!(unescape_octal(br"\777"), br"\777");
    }

    #[test]
    fn pseudo_and_network_file_systems_are_skipped() {
        for skipped in ["proc", "tmpfs", "cgroup2", "devtmpfs", "nfs4", "cifs"] {
            assert!(is_skipped_filesystem(skipped), "{skipped}");
        }
        for kept in ["ext4", "xfs", "btrfs", "overlay", "vfat", "zfs"] {
            assert!(!is_skipped_filesystem(kept), "{kept}");
        }
    }

    #[test]
    fn filesystem_bytes_as_df_computes_them() {
        // 1000 blocks of 4 KiB, 300 free of which 250 available to everyone.
        assert_eq!(
            filesystem_bytes(1000, 300, 250, 4096),
            Some((700 * 4096, 250 * 4096, 50 * 4096))
        );
        assert_eq!(filesystem_bytes(0, 0, 0, 4096), None);
        assert_eq!(filesystem_bytes(u64::MAX, 0, 0, 2), None);
    }

    #[test]
    fn cgroup_v2_path() {
        let hybrid = "4:memory:/process_api/12c9\n1:cpu:/\n0::/user.slice/session-2.scope\n";
        assert_eq!(
            parse_cgroup_v2_path(hybrid),
            Some("/user.slice/session-2.scope")
        );
        assert_eq!(parse_cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(
            parse_cgroup_v2_path("4:memory:/docker/abc\n1:cpu:/\n"),
            None
        );
    }

    #[test]
    fn cgroup_cpu_and_memory_files() {
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("50000\n"), None);
        assert_eq!(
            parse_cpu_stat_usage("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"),
            Some(2.5)
        );
        assert_eq!(parse_cpu_stat_usage("user_usec 2\n"), None);
        assert_eq!(parse_memory_max("536870912\n"), Some(536870912));
        assert_eq!(parse_memory_max("max\n"), None);
    }

    // ---- a whole reading from a fixed tree -------------------------------------------------

    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let root =
                std::env::temp_dir().join(format!("meterage-host-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            Tree(root)
        }

        fn write(&self, absolute: &str, text: &str) {
            let path = self.0.join(absolute.trim_start_matches('/'));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }

        fn directory(&self, absolute: &str) {
            std::fs::create_dir_all(self.0.join(absolute.trim_start_matches('/'))).unwrap();
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CGROUP_DIRECTORY: &str = "/sys/fs/cgroup/app.slice/app.service";

    fn container_tree(name: &str, mounts: &str) -> Tree {
        let tree = Tree::new(name);
        tree.write("/proc/self/mounts", mounts);
        tree.write("/proc/self/cgroup", "0::/app.slice/app.service\n");
        tree.write(&format!("{CGROUP_DIRECTORY}/cgroup.type"), "domain\n");
        tree.write(&format!("{CGROUP_DIRECTORY}/cpu.max"), "200000 100000\n");
        tree.write(
            &format!("{CGROUP_DIRECTORY}/cpu.stat"),
            "usage_usec 1234567\nuser_usec 1000000\n",
        );
        tree.write(&format!("{CGROUP_DIRECTORY}/memory.current"), "104857600\n");
        tree.write(&format!("{CGROUP_DIRECTORY}/memory.max"), "max\n");
        tree
    }

    #[test]
    fn a_fixed_tree_reads_into_every_value() {
        let tree = container_tree(
            "all",
            "/dev/vda / ext4 rw 0 0\n\
             /dev/vda /data ext4 rw 0 0\n\
             tmpfs /run tmpfs rw 0 0\n\
             cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
        );
        tree.write("/proc/stat", STAT);
        tree.write("/proc/meminfo", MEMINFO);
        tree.write("/proc/diskstats", DISKSTATS);
        tree.write("/proc/net/dev", NET_DEV);
        tree.directory("/data");
        tree.directory("/run");
        let reading = read_host_at(&tree.0);

        let hz = procfs::sysconf(libc::_SC_CLK_TCK).unwrap() as f64;
        assert_eq!(reading.cpu.unwrap().seconds[0], 53946.0 / hz);
        assert_eq!(reading.memory, parse_meminfo(MEMINFO));
        assert_eq!(reading.disks, parse_diskstats(DISKSTATS));
        assert_eq!(reading.interfaces, parse_net_dev(NET_DEV));
        // "/" and "/data" are one file system here (one st_dev): reported once, as the
        // first mount; tmpfs and cgroup2 are not file systems with storage.
        assert_eq!(reading.filesystems.len(), 1, "{:?}", reading.filesystems);
        let filesystem = &reading.filesystems[0];
        assert_eq!(
            (filesystem.device.as_str(), filesystem.mountpoint.as_str()),
            ("/dev/vda", "/")
        );
        assert_eq!(filesystem.filesystem_type, "ext4");
        assert!(filesystem.used_bytes + filesystem.free_bytes > 0);
        assert_eq!(
            reading.container,
            ContainerReading {
                cpu_limit: Some(2.0),
                cpu_seconds: Some(1.234567),
                memory_usage_bytes: Some(104857600),
                memory_limit_bytes: None,
            }
        );
    }

    #[test]
    fn a_hybrid_machine_finds_the_unified_hierarchy() {
        let tree = container_tree("hybrid", "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n");
        // The cgroup files are under /sys/fs/cgroup, where the hybrid machine has v1: none.
        assert_eq!(read_host_at(&tree.0).container, ContainerReading::default());
        let unified = "/sys/fs/cgroup/unified/app.slice/app.service";
        tree.write(&format!("{unified}/cgroup.type"), "domain\n");
        tree.write(&format!("{unified}/memory.current"), "4096\n");
        let container = read_host_at(&tree.0).container;
        assert_eq!(container.memory_usage_bytes, Some(4096));
        assert_eq!(container.cpu_limit, None); // no cpu.max there
    }

    #[test]
    fn the_root_cgroup_is_not_a_container() {
        let tree = container_tree("root", "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n");
        tree.write("/proc/self/cgroup", "0::/\n");
        tree.write("/sys/fs/cgroup/cpu.stat", "usage_usec 99\n");
        assert_eq!(read_host_at(&tree.0).container, ContainerReading::default());
    }

    #[test]
    fn cgroup_v1_only_has_no_container_values() {
        let tree = container_tree("v1", "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n");
        tree.write("/proc/self/cgroup", "4:memory:/docker/abc\n1:cpu:/\n");
        assert_eq!(read_host_at(&tree.0).container, ContainerReading::default());
    }

    #[test]
    fn an_empty_tree_reads_nothing() {
        let tree = Tree::new("empty");
        assert_eq!(read_host_at(&tree.0), HostReading::default());
    }

    // ---- this machine ------------------------------------------------------------------------

    fn proc_text(path: &str) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn this_machine_cpu_memory_and_interfaces() {
        // The aggregate line's first eight modes, summed here by a plain split: the reading
        // lies between one taken before and one taken after it. (Not against the uptime:
        // CI's machine counted 22082 CPU seconds against 764 s of uptime on 2 CPUs.)
        let stat_ticks = || -> u64 {
            let text = proc_text("/proc/stat");
            let line = text.lines().next().unwrap();
            assert!(line.starts_with("cpu "), "{line}");
            line.split_ascii_whitespace()
                .skip(1)
                .take(8)
                .map(|field| field.parse::<u64>().unwrap())
                .sum()
        };
        let before = stat_ticks();
        let reading = read_host();
        let after = stat_ticks();
        let seconds = reading.cpu.unwrap().seconds;
        assert!(seconds.iter().all(|&mode| mode >= 0.0));
        let hz = procfs::sysconf(libc::_SC_CLK_TCK).unwrap() as f64;
        let ticks = (seconds.iter().sum::<f64>() * hz).round() as u64;
        assert!(
            before <= ticks && ticks <= after,
            "{before} <= {ticks} <= {after}"
        );

        let memory = reading.memory.unwrap();
        let total_kib: u64 = proc_text("/proc/meminfo").lines().next().unwrap()
            ["MemTotal:".len()..]
            .trim()
            .trim_end_matches(" kB")
            .parse()
            .unwrap();
        assert_eq!(memory.total, total_kib * 1024);
        assert!(memory.used > 0 && memory.free > 0);

        if std::path::Path::new("/proc/net/dev").exists() {
            let lo = reading.interfaces.iter().find(|i| i.interface == "lo");
            assert!(lo.is_some(), "{:?}", reading.interfaces);
        }
        for disk in &reading.disks {
            assert!(!disk.device.starts_with("loop") && !disk.device.starts_with("zram"));
            assert!(disk.read_operations + disk.write_operations > 0, "{disk:?}");
        }
    }

    #[test]
    fn this_machine_file_systems_are_real_and_distinct() {
        let reading = read_host();
        let mut devices = Vec::new();
        for filesystem in &reading.filesystems {
            assert!(!is_skipped_filesystem(&filesystem.filesystem_type));
            assert!(filesystem.used_bytes + filesystem.free_bytes + filesystem.reserved_bytes > 0);
            let device = std::fs::metadata(&filesystem.mountpoint).unwrap().dev();
            assert!(!devices.contains(&device), "{filesystem:?} twice");
            devices.push(device);
        }
        let root = parse_mounts(&std::fs::read("/proc/self/mounts").unwrap())
            .into_iter()
            .find(|mount| mount.mountpoint == b"/")
            .unwrap();
        if !is_skipped_filesystem(&root.filesystem_type) {
            assert!(reading.filesystems.iter().any(|fs| fs.mountpoint == "/"));
        }
    }

    #[test]
    fn this_machine_container_values_match_the_cgroup_files() {
        let mounts = parse_mounts(&std::fs::read("/proc/self/mounts").unwrap());
        let container = read_host().container;
        let Some(directory) = cgroup_directory(&mut Reader::system(), &mounts) else {
            // Not in a cgroup v2 below the root (v1, hybrid at the root, or no cgroups).
            assert_eq!(container, ContainerReading::default());
            return;
        };
        let file = |name: &str| std::fs::read_to_string(directory.join(name)).ok();
        assert_eq!(
            container.cpu_limit,
            file("cpu.max").and_then(|text| parse_cpu_max(&text))
        );
        assert_eq!(
            container.memory_limit_bytes,
            file("memory.max").and_then(|text| parse_memory_max(&text))
        );
        if let Some(usage) = container.memory_usage_bytes {
            assert!(usage > 0);
        }
    }
}
