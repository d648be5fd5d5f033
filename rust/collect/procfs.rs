//! The one way the collection-time readers read `/proc` (and cgroup) files, and the parsers
//! of the layouts several of those files share.
//!
//! A [`Reader`] reads files below a root directory (`/` in production, a fixture tree in
//! tests) into one buffer it keeps between files: an open, reads until the end, a close.
//! `std::fs::read` would also stat the file and, as /proc files report no size, grow its
//! buffer in small steps; this reads a whole small file in one or two reads.
//!
//! The parsers take bytes: /proc text is ASCII but for names (commands, interfaces,
//! mountpoints), which the kernel does not require to be UTF-8.

use std::ffi::OsStr;
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The first buffer: most /proc files read here (stat, io, meminfo, net/dev) fit.
const FIRST_BUFFER: usize = 4096;

/// Reads files below a root into a buffer reused from one file to the next.
pub struct Reader<'a> {
    root: &'a Path,
    /// Initialized up to its length, which only grows: the bytes of one read are a prefix.
    buffer: Vec<u8>,
}

impl<'a> Reader<'a> {
    pub fn new(root: &'a Path) -> Reader<'a> {
        Reader {
            root,
            buffer: Vec::new(),
        }
    }

    /// The files of this machine.
    pub fn system() -> Reader<'static> {
        Reader::new(Path::new("/"))
    }

    /// An absolute path (as bytes: mountpoints need not be UTF-8) taken below the root.
    pub fn path(&self, absolute: impl AsRef<[u8]>) -> PathBuf {
        let absolute = absolute.as_ref();
        let relative = absolute.strip_prefix(b"/").unwrap_or(absolute);
        self.root.join(OsStr::from_bytes(relative))
    }

    /// A whole file below the root, or its first `limit` bytes; `None` if it cannot be
    /// opened or read.
    pub fn bytes(&mut self, absolute: impl AsRef<[u8]>, limit: usize) -> Option<&[u8]> {
        self.bytes_at(&self.path(absolute), limit)
    }

    /// [`Reader::bytes`] of a path already below the root.
    pub fn bytes_at(&mut self, path: &Path, limit: usize) -> Option<&[u8]> {
        // File::open retries an open interrupted by a signal; the file closes when dropped.
        let file = std::fs::File::open(path).ok()?;
        let filled = fill(&mut self.buffer, limit, file)?;
        Some(&self.buffer[..filled])
    }

    /// A whole text file below the root; `None` if it cannot be read or is not UTF-8.
    pub fn text(&mut self, absolute: impl AsRef<[u8]>) -> Option<&str> {
        std::str::from_utf8(self.bytes(absolute, usize::MAX)?).ok()
    }

    /// [`Reader::text`] of a path already below the root.
    pub fn text_at(&mut self, path: &Path) -> Option<&str> {
        std::str::from_utf8(self.bytes_at(path, usize::MAX)?).ok()
    }
}

/// Reads `source` to its end, or to `limit` bytes, into the front of `buffer`, growing it
/// as needed; the count read, or `None` on a read error. A read interrupted by a signal
/// (EINTR) is retried; a short read is followed by another until one returns 0.
fn fill(buffer: &mut Vec<u8>, limit: usize, mut source: impl Read) -> Option<usize> {
    let mut filled = 0;
    while filled < limit {
        if filled == buffer.len() {
            let grown = (buffer.len() * 2).max(FIRST_BUFFER);
            buffer.resize(grown.min(limit), 0);
        }
        let end = buffer.len().min(limit);
        match source.read(&mut buffer[filled..end]) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(filled)
}

// ---- numbers and fields --------------------------------------------------------------------

/// A decimal number made only of ASCII digits; `None` for anything else (a sign, spaces,
/// nothing) or on overflow.
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |number, &byte| {
        if !byte.is_ascii_digit() {
            return None;
        }
        number.checked_mul(10)?.checked_add(u64::from(byte - b'0'))
    })
}

/// `123 kB` as bytes (meminfo's "kB" is KiB), or a bare `123`; `None` for anything else.
pub fn parse_kib(value: &[u8]) -> Option<u64> {
    let mut parts = fields(value);
    let number = parse_u64(parts.next()?)?;
    match (parts.next(), parts.next()) {
        (Some(b"kB"), None) => number.checked_mul(1024),
        (None, None) => Some(number),
        _ => None,
    }
}

/// The fields of a line, split at runs of ASCII whitespace.
pub fn fields(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(u8::is_ascii_whitespace)
        .filter(|field| !field.is_empty())
}

/// The first `N` fields as numbers; `None` if there are fewer or one is not a number.
pub fn leading_numbers<const N: usize>(
    mut fields: impl Iterator<Item = impl AsRef<[u8]>>,
) -> Option<[u64; N]> {
    let mut numbers = [0u64; N];
    for number in &mut numbers {
        *number = parse_u64(fields.next()?.as_ref())?;
    }
    Some(numbers)
}

// ---- `key: value` and `key value` lines ----------------------------------------------------

/// The values of `keys` in a file of `key: value` lines (`/proc/<pid>/io`, `meminfo`) or
/// `key value` lines (cgroup `cpu.stat`), in the order of `keys`, trimmed; `None` for a
/// key no line has. The key ends at the first `:` or whitespace; a later line of the same
/// key wins. The values are left unparsed: the files differ in their units.
pub fn keyed_values<'t, const N: usize>(text: &'t [u8], keys: [&[u8]; N]) -> [Option<&'t [u8]>; N] {
    let mut values = [None; N];
    for line in text.split(|&byte| byte == b'\n') {
        let key_end = line
            .iter()
            .position(|&byte| byte == b':' || byte.is_ascii_whitespace())
            .unwrap_or(line.len());
        let Some(slot) = keys.iter().position(|&key| key == &line[..key_end]) else {
            continue;
        };
        let rest = &line[key_end..];
        values[slot] = Some(rest.strip_prefix(b":").unwrap_or(rest).trim_ascii());
    }
    values
}

// ---- /proc/net/dev -------------------------------------------------------------------------

/// One interface's line of `/proc/net/dev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetDevice<'t> {
    pub name: &'t [u8],
    pub receive_bytes: u64,
    pub receive_packets: u64,
    pub receive_errors: u64,
    pub transmit_bytes: u64,
    pub transmit_packets: u64,
    pub transmit_errors: u64,
}

/// `iface: rx bytes packets errs drop fifo frame compressed multicast tx bytes packets errs
/// ...` lines; the two header lines have no colon, and interface names cannot hold one.
/// Old kernels print no space after the colon. A line with fewer than the 11 numbers up to
/// the transmit errors is skipped.
pub fn net_devices(text: &[u8]) -> impl Iterator<Item = NetDevice<'_>> {
    text.split(|&byte| byte == b'\n').filter_map(|line| {
        let colon = line.iter().position(|&byte| byte == b':')?;
        let [receive_bytes, receive_packets, receive_errors, _, _, _, _, _, transmit_bytes, transmit_packets, transmit_errors] =
            leading_numbers(fields(&line[colon + 1..]))?;
        Some(NetDevice {
            name: line[..colon].trim_ascii(),
            receive_bytes,
            receive_packets,
            receive_errors,
            transmit_bytes,
            transmit_packets,
            transmit_errors,
        })
    })
}

// ---- sysconf -------------------------------------------------------------------------------

/// A `sysconf` value (`_SC_CLK_TCK`, `_SC_PAGESIZE`, ...); `None` when it is not positive
/// (unknown, or not supported here).
pub fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf only reads its argument.
    let value = unsafe { libc::sysconf(name) };
    (value > 0).then_some(value as u64)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::collections::VecDeque;

    // ---- the reader ------------------------------------------------------------------------

    /// A source that hands out its chunks one read at a time, an `Err` for each `None`.
    struct Chunks(VecDeque<Option<&'static [u8]>>, ErrorKind);

    impl Read for Chunks {
        fn read(&mut self, into: &mut [u8]) -> std::io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(None) => Err(self.1.into()),
                Some(Some(chunk)) => {
                    // Never more than asked: the rest of the chunk comes next time.
                    let count = chunk.len().min(into.len());
                    into[..count].copy_from_slice(&chunk[..count]);
                    if count < chunk.len() {
                        self.0.push_front(Some(&chunk[count..]));
                    }
                    Ok(count)
                }
            }
        }
    }

    fn fill_all(
        chunks: &[Option<&'static [u8]>],
        error: ErrorKind,
        limit: usize,
    ) -> Option<Vec<u8>> {
        let mut buffer = Vec::new();
        let source = Chunks(chunks.iter().copied().collect(), error);
        let filled = fill(&mut buffer, limit, source)?;
        Some(buffer[..filled].to_vec())
    }

    #[test]
    fn short_and_interrupted_reads_are_read_on() {
        let chunks = [
            Some(&b"rchar: "[..]),
            None,
            Some(b"12"),
            None,
            None,
            Some(b"\n"),
        ];
        assert_eq!(
            fill_all(&chunks, ErrorKind::Interrupted, usize::MAX),
            Some(b"rchar: 12\n".to_vec())
        );
    }

    #[test]
    fn a_failed_read_is_none_not_a_partial_file() {
        let chunks = [Some(&b"rchar: 12\n"[..]), None, Some(b"wchar: 3\n")];
        assert_eq!(
            fill_all(&chunks, ErrorKind::PermissionDenied, usize::MAX),
            None
        );
    }

    #[test]
    fn a_limit_reads_only_the_start() {
        let chunks = [Some(&b"cpu  1 2 3\n"[..]), Some(b"cpu0 1 2 3\n")];
        assert_eq!(
            fill_all(&chunks, ErrorKind::Interrupted, 5),
            Some(b"cpu  ".to_vec())
        );
        assert_eq!(fill_all(&chunks, ErrorKind::Interrupted, 0), Some(vec![]));
    }

    #[test]
    fn a_file_larger_than_the_buffer_is_read_whole() {
        let big: &'static [u8] = Box::leak(vec![b'x'; 3 * FIRST_BUFFER + 7].into_boxed_slice());
        let read = fill_all(&[Some(big)], ErrorKind::Interrupted, usize::MAX).unwrap();
        assert_eq!(read.len(), big.len());
        // This process's memory map is usually several KiB.
        let mut reader = Reader::system();
        let maps = reader
            .bytes("/proc/self/maps", usize::MAX)
            .unwrap()
            .to_vec();
        assert!(maps.len() > 1000 && maps.ends_with(b"\n"));
        assert!(maps
            .split(|&b| b == b'\n')
            .all(|line| line.is_empty() || line.contains(&b'-')));
    }

    #[test]
    fn the_buffer_is_reused_and_each_file_read_alone() {
        let root = std::env::temp_dir().join(format!("meterage-procfs-{}", std::process::id()));
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(root.join("proc/long"), "a much longer file\n").unwrap();
        std::fs::write(root.join("proc/short"), "short\n").unwrap();
        let mut reader = Reader::new(&root);
        assert_eq!(reader.text("/proc/long"), Some("a much longer file\n"));
        assert_eq!(reader.text("proc/short"), Some("short\n"));
        assert_eq!(reader.bytes("/proc/long", 6), Some(&b"a much"[..]));
        assert_eq!(reader.text_at(&reader.path("/proc/short")), Some("short\n"));
        std::fs::write(root.join("proc/binary"), b"\xff\xfe\n").unwrap();
        assert_eq!(reader.text("/proc/binary"), None);
        assert_eq!(reader.bytes("/proc/binary", 64), Some(&b"\xff\xfe\n"[..]));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_or_unreadable_file_is_none() {
        let mut reader = Reader::system();
        assert_eq!(reader.bytes("/nonexistent/meterage", 64), None);
        assert_eq!(reader.text("/nonexistent/meterage"), None);
        // A directory opens but does not read.
        assert_eq!(reader.bytes("/proc/self", 64), None);
        let mut fixture = Reader::new(Path::new("/nonexistent/root"));
        assert_eq!(fixture.text("/proc/self/stat"), None);
    }

    #[test]
    fn paths_are_taken_below_the_root() {
        let reader = Reader::new(Path::new("/tmp/tree"));
        assert_eq!(reader.path("/proc/stat"), Path::new("/tmp/tree/proc/stat"));
        assert_eq!(
            reader.path(b"/mnt/\xff"),
            Path::new("/tmp/tree/mnt").join(OsStr::from_bytes(b"\xff"))
        );
        assert_eq!(Reader::system().path("/proc/stat"), Path::new("/proc/stat"));
    }

    // ---- numbers and fields ----------------------------------------------------------------

    #[test]
    fn u64_is_plain_ascii_digits() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        for malformed in [&b""[..], b"+1", b"-1", b" 1", b"1 ", b"1x", b"0x10"] {
            assert_eq!(parse_u64(malformed), None, "{malformed:?}");
        }
    }

    #[test]
    fn kib_values() {
        assert_eq!(parse_kib(b"24668920 kB"), Some(24668920 * 1024));
        assert_eq!(parse_kib(b"0"), Some(0));
        assert_eq!(parse_kib(b"12 MB"), None);
        assert_eq!(parse_kib(b"12 kB extra"), None);
        assert_eq!(parse_kib(b"lots kB"), None);
        assert_eq!(parse_kib(b""), None);
        assert_eq!(parse_kib(b"18014398509481984 kB"), None); // overflows as bytes
    }

    #[test]
    fn fields_and_leading_numbers() {
        let line = b"  cpu \t1 2\n3  ";
        assert_eq!(
            fields(line).collect::<Vec<_>>(),
            [&b"cpu"[..], b"1", b"2", b"3"]
        );
        assert_eq!(fields(b" \n ").count(), 0);
        assert_eq!(leading_numbers(fields(b"1 2 3 x")), Some([1, 2, 3]));
        assert_eq!(leading_numbers::<4>(fields(b"1 2 3 x")), None);
        assert_eq!(leading_numbers::<4>(fields(b"1 2 3")), None);
        assert_eq!(leading_numbers("7 8".split(' ')), Some([7, 8]));
    }

    // ---- keyed lines -----------------------------------------------------------------------

    const IO: &[u8] = b"rchar: 1948\nwchar: 12\nsyscr: 6\nsyscw: 1\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";

    #[test]
    fn keyed_values_of_an_io_file() {
        assert_eq!(
            keyed_values(IO, [b"write_bytes", b"read_bytes", b"rchar"]),
            [Some(&b"8192"[..]), Some(b"4096"), Some(b"1948")]
        );
        // `cancelled_write_bytes` is not `write_bytes`, nor is a prefix a key.
        assert_eq!(
            keyed_values(b"cancelled_write_bytes: 9\n", [b"write_bytes"]),
            [None]
        );
        assert_eq!(
            keyed_values(b"write_bytes_x: 9\n", [b"write_bytes"]),
            [None]
        );
        assert_eq!(keyed_values(b"", [b"rchar"]), [None]);
    }

    #[test]
    fn keyed_values_of_meminfo_and_cpu_stat() {
        let meminfo =
            b"MemTotal:       24668920 kB\nHugePages_Total:       0\nActive(anon):  12 kB\n";
        assert_eq!(
            keyed_values(meminfo, [b"MemTotal", b"HugePages_Total", b"Active(anon)"]),
            [Some(&b"24668920 kB"[..]), Some(b"0"), Some(b"12 kB")]
        );
        let cpu_stat = b"usage_usec 2500000\nuser_usec 2000000\nsystem_usec\t500000\n";
        assert_eq!(
            keyed_values(cpu_stat, [b"system_usec", b"usage_usec", b"nr_periods"]),
            [Some(&b"500000"[..]), Some(b"2500000"), None]
        );
    }

    #[test]
    fn keyed_values_of_malformed_lines() {
        // A line with only a key has an empty value; a later line of a key wins.
        assert_eq!(keyed_values(b"rchar\n", [b"rchar"]), [Some(&b""[..])]);
        assert_eq!(
            keyed_values(b"rchar: 1\nrchar: 2\n", [b"rchar"]),
            [Some(&b"2"[..])]
        );
        // A space before the colon leaves it in the value, which no number parser takes.
        assert_eq!(
            keyed_values(b"rchar : 1\n", [b"rchar"]),
            [Some(&b": 1"[..])]
        );
        assert_eq!(keyed_values(b": 1\n\n \n", [b"rchar"]), [None]);
        // No final newline, and CR LF.
        assert_eq!(
            keyed_values(b"rchar: 5\r\nwchar: 6", [b"rchar", b"wchar"]),
            [Some(&b"5"[..]), Some(b"6")]
        );
    }

    #[test]
    #[ignore = "a timing loop, run by hand: cargo test --release -- --ignored --nocapture"]
    fn cost_of_the_io_parse() {
        use std::hint::black_box;
        const ROUNDS: u32 = 10_000_000;
        let started = std::time::Instant::now();
        for _ in 0..ROUNDS {
            let [read, write] = keyed_values(black_box(IO), [b"read_bytes", b"write_bytes"]);
            black_box((read.and_then(parse_u64), write.and_then(parse_u64)));
        }
        let each = started.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
        println!("keyed_values of an io file, two keys: {each:.1} ns");
    }

    // ---- /proc/net/dev ---------------------------------------------------------------------

    /// Also the host readers' fixture.
    pub(in crate::collect) const NET_DEV: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 2813168    9275    0    0    0     0          0         0  2813168    9275    0    0    0     0       0          0
  eth0: 362647773   10195    3    1    0     0          0         0   741552    6565    2    0    0     0       0          0
wlan0:17 2 0 0 0 0 0 0 19 3 1 0 0 0 0 0
";

    #[test]
    fn every_interface_line() {
        let devices: Vec<_> = net_devices(NET_DEV.as_bytes()).collect();
        assert_eq!(devices.len(), 3);
        assert_eq!(devices[0].name, b"lo");
        assert_eq!(
            devices[1],
            NetDevice {
                name: b"eth0",
                receive_bytes: 362647773,
                receive_packets: 10195,
                receive_errors: 3,
                transmit_bytes: 741552,
                transmit_packets: 6565,
                transmit_errors: 2,
            }
        );
        // Old kernels print no space after the colon.
        assert_eq!(
            (devices[2].name, devices[2].receive_bytes),
            (&b"wlan0"[..], 17)
        );
        assert_eq!(
            (devices[2].transmit_bytes, devices[2].transmit_errors),
            (19, 1)
        );
    }

    #[test]
    fn malformed_interface_lines_are_skipped() {
        let text = b"eth0: 1 2 3 4 5 6 7 8 9 10\n\
                     eth1: 1 2 3 4 5 6 7 x 9 10 11\n\
                     eth2 1 2 3 4 5 6 7 8 9 10 11\n\
                     \xff: 1 2 3 4 5 6 7 8 9 10 11";
        let names: Vec<_> = net_devices(text).map(|device| device.name).collect();
        assert_eq!(names, [&b"\xff"[..]]);
        assert_eq!(net_devices(b"").count(), 0);
    }

    #[test]
    fn sysconf_values() {
        assert!(sysconf(libc::_SC_CLK_TCK).is_some_and(|hz| hz > 0));
        assert!(sysconf(libc::_SC_PAGESIZE).is_some_and(|page| page.is_power_of_two()));
        assert_eq!(sysconf(-1), None);
    }
}
