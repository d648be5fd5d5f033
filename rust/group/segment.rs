//! The group's segment: one file per process group in `/dev/shm` (tmpfs: memory, not
//! disk), named after the group's root process, readable and writable by its user only,
//! and mapped by every member at the **same address** (chosen by its creator, recorded in
//! its header): the pointers the members' series hold are then valid in all of them.
//!
//! The file is sparse and fixed in size: a header, an arena per member slot, and two
//! graveyards (the folded totals of members that exited, one current and one being
//! rebuilt). Only the pages that hold data take memory. A file whose root process is gone
//! belongs to a group that crashed: the next group to start removes it.

use super::liveness::ProcessId;
use super::lock::RobustMutex;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// Members at once (live processes, and exited ones not yet folded).
pub const MAX_MEMBERS: usize = 256;
/// Address space of one member's arena (virtual: only what holds data takes memory).
pub const ARENA_BYTES: usize = 1 << 30;
/// Address space of each of the two graveyards.
pub const GRAVEYARD_BYTES: usize = 1 << 30;
/// Room for the header, rounded to a huge page.
pub const HEADER_BYTES: usize = 2 << 20;
pub const SEGMENT_BYTES: usize = HEADER_BYTES + MAX_MEMBERS * ARENA_BYTES + 2 * GRAVEYARD_BYTES;

const MAGIC: u64 = u64::from_le_bytes(*b"METERAGE");
/// Which build made the segment: members must share the layout of what they read.
pub const LAYOUT: u64 = {
    // FNV-1a over the version and what the members' shared structures depend on.
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < version.len() {
        hash = (hash ^ version[i] as u64).wrapping_mul(0x100_0000_01b3);
        i += 1;
    }
    // The cut table gives a chunk's at-or-below counters their meaning, and the wire
    // format the directory's and graveyard's bytes theirs.
    let sizes = [
        std::mem::size_of::<Header>(),
        std::mem::size_of::<crate::aggregate::histogram::AtomicHistogram>(),
        std::mem::size_of::<crate::aggregate::series::CallSeries>(),
        SEGMENT_BYTES,
        crate::aggregate::boundaries::FINGERPRINT as usize,
        super::wire::FORMAT as usize,
    ];
    let mut j = 0;
    while j < sizes.len() {
        hash = (hash ^ sizes[j] as u64).wrapping_mul(0x100_0000_01b3);
        j += 1;
    }
    hash
};

/// Member slot states.
pub const FREE: u32 = 0;
pub const LIVE: u32 = 1;

/// One member slot: the process that owns the arena of the same index.
#[repr(C)]
pub struct Member {
    pub state: AtomicU32,
    pub pid: AtomicU32,
    pub start: AtomicU64,
    /// The member's epoch: its series of another epoch hold nothing of now.
    pub epoch: AtomicU64,
    /// The address of its newest directory entry (0: none); each names the next older.
    pub directory: AtomicU64,
}

/// The start of the segment.
#[repr(C)]
pub struct Header {
    /// [`MAGIC`], stored last by the creator: a joiner reads nothing before it.
    magic: AtomicU64,
    layout: u64,
    base: u64,
    size: u64,
    root_pid: u32,
    uid: u32,
    root_start: u64,
    pub lock: RobustMutex,
    /// Which graveyard holds the folded totals (0 or 1).
    pub graveyard: AtomicU32,
    pub members: [Member; MAX_MEMBERS],
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);

/// A mapped segment. Never unmapped: the members' series point into it for good.
#[derive(Clone, Debug)]
pub struct Segment {
    base: usize,
    /// A second, read-only mapping of the whole file: what readers of other members read
    /// through. A fork child's view of its parent's arena at `base` is a private copy (the
    /// series it inherited); this one always shows the file.
    view: usize,
    pub path: PathBuf,
}

fn error(what: &str, path: &Path) -> String {
    format!(
        "{what} {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    )
}

/// The file of the group whose root is `root`, in `directory`.
pub fn path_of(directory: &Path, root: ProcessId) -> PathBuf {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    directory.join(format!("meterage-{uid}-{}-{}", root.pid, root.start))
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("bad path {}", path.display()))
}

/// A base address for a new segment: random, 1 GiB aligned, in a part of the address space
/// that neither the heap nor the kernel's mmap placement reaches on x86-64 and AArch64.
fn random_base(attempt: u64) -> usize {
    let mut seed = [0u8; 8];
    // The raw syscall, not glibc's getrandom(): that wrapper is glibc >= 2.25, and the
    // release wheels link against glibc 2.17 (manylinux2014). A kernel older than 3.17
    // answers ENOSYS, and the fallback below is used.
    // SAFETY: getrandom writes at most 8 bytes into `seed`.
    let got = unsafe { libc::syscall(libc::SYS_getrandom, seed.as_mut_ptr(), 8usize, 0u32) };
    let noise = if got == 8 {
        u64::from_ne_bytes(seed)
    } else {
        (std::process::id() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ attempt
    };
    const LOW: u64 = 0x1000_0000_0000;
    const SPAN_GIB: u64 = (0x3000_0000_0000 - LOW) >> 30;
    (LOW + ((noise.wrapping_add(attempt) % SPAN_GIB) << 30)) as usize
}

/// Maps the whole of `fd` read-only wherever there is room (the readers' view).
fn map_view(fd: i32, path: &Path) -> Result<usize, String> {
    // SAFETY: a new read-only shared mapping of our file, placed by the kernel.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SEGMENT_BYTES,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(error("cannot map a view of the group's segment", path));
    }
    Ok(mapped as usize)
}

/// Maps `length` bytes of `fd` at exactly `base`; false if any of that range is in use.
fn map_at(fd: i32, base: usize, length: usize) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping: it fails instead.
    let mapped = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            length,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
            fd,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return false;
    }
    if mapped as usize != base {
        // A kernel older than 4.17 takes the flag as a hint: not where we need it.
        // SAFETY: the mapping just made, unused.
        unsafe { libc::munmap(mapped, length) };
        return false;
    }
    true
}

impl Segment {
    /// The group's segment in `directory`, made if the group has none yet.
    pub fn open(directory: &Path, root: ProcessId) -> Result<Segment, String> {
        let path = path_of(directory, root);
        let c = c_path(&path)?;
        // SAFETY: a NUL-terminated path; O_EXCL makes exactly one process the creator.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        let result = if fd >= 0 {
            sweep(directory, root);
            Self::create(fd, &path, root)
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
            // SAFETY: as above, without creating.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(error("cannot open the group's segment", &path));
            }
            let joined = Self::join(fd, &path, root);
            // SAFETY: ours; the mapping (if any) keeps the file.
            unsafe { libc::close(fd) };
            return joined;
        } else {
            return Err(error("cannot create the group's segment", &path));
        };
        // SAFETY: ours; the mapping (if any) keeps the file.
        unsafe { libc::close(fd) };
        if result.is_err() {
            // A half-made segment must not be joined: take it away.
            // SAFETY: a NUL-terminated path.
            unsafe { libc::unlink(c.as_ptr()) };
        }
        result
    }

    fn create(fd: i32, path: &Path, root: ProcessId) -> Result<Segment, String> {
        // SAFETY: ftruncate on our new file (sparse: no memory until written).
        if unsafe { libc::ftruncate(fd, SEGMENT_BYTES as libc::off_t) } != 0 {
            return Err(error("cannot size the group's segment", path));
        }
        // SAFETY: the header's pages are written at once: make them real memory now.
        // The graveyards' first pages too: they are read before anything is written there,
        // and reading a hole of a full tmpfs is a SIGBUS.
        let graveyards = (HEADER_BYTES + MAX_MEMBERS * ARENA_BYTES) as libc::off_t;
        let page = 4096;
        // SAFETY: fallocate on our new file, inside its size.
        let graveyards_backed = unsafe {
            libc::fallocate(fd, 0, graveyards, page) == 0
                && libc::fallocate(fd, 0, graveyards + GRAVEYARD_BYTES as libc::off_t, page) == 0
        };
        if !graveyards_backed
            // SAFETY: as above.
            || unsafe { libc::fallocate(fd, 0, 0, HEADER_BYTES as libc::off_t) } != 0
        {
            return Err(error("no room for the group's segment in", path));
        }
        let base = (0..32)
            .map(random_base)
            .find(|&base| map_at(fd, base, SEGMENT_BYTES))
            .ok_or_else(|| {
                format!(
                    "no free address range for the group's segment {}",
                    path.display()
                )
            })?;
        let header = base as *mut Header;
        // SAFETY: the header lies in the fresh mapping, which no other process reads before
        // `magic` is stored (Release) below.
        unsafe {
            std::ptr::addr_of_mut!((*header).layout).write(LAYOUT);
            std::ptr::addr_of_mut!((*header).base).write(base as u64);
            std::ptr::addr_of_mut!((*header).size).write(SEGMENT_BYTES as u64);
            std::ptr::addr_of_mut!((*header).root_pid).write(root.pid);
            std::ptr::addr_of_mut!((*header).uid).write(libc::getuid());
            std::ptr::addr_of_mut!((*header).root_start).write(root.start);
            RobustMutex::init(std::ptr::addr_of_mut!((*header).lock))?;
            (*header).magic.store(MAGIC, Ordering::Release);
        }
        Ok(Segment {
            base,
            view: map_view(fd, path)?,
            path: path.to_owned(),
        })
    }

    fn join(fd: i32, path: &Path, root: ProcessId) -> Result<Segment, String> {
        // The creator may still be writing it: wait a moment for its size, then its magic.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        // Only our own user's regular file: anything else is not our group's.
        // SAFETY: a zeroed stat is filled by fstat.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: fd is open; `stat` is writable.
            if unsafe { libc::fstat(fd, &mut stat) } != 0 {
                return Err(error("cannot stat the group's segment", path));
            }
            // Empty: made by O_EXCL, not sized yet (the creator sweeps the directory first).
            if stat.st_size != 0 || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG
            || stat.st_uid != uid
            || stat.st_mode & 0o077 != 0
            || stat.st_size as usize != SEGMENT_BYTES
        {
            return Err(format!(
                "{} is not a segment of this user's group (owner, mode or size)",
                path.display()
            ));
        }
        // Read the header where it lands, then map the whole at its base.
        // SAFETY: a read-only look at the first page of a file of at least that size.
        let peek = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if peek == libc::MAP_FAILED {
            return Err(error("cannot read the group's segment", path));
        }
        let header = peek.cast::<Header>();
        let (magic, layout, base, same_root) = loop {
            // SAFETY: the first page is mapped; the fields are read after the magic.
            let magic = unsafe { (*header).magic.load(Ordering::Acquire) };
            if magic == MAGIC || std::time::Instant::now() > deadline {
                // SAFETY: as above.
                break unsafe {
                    (
                        magic,
                        (*header).layout,
                        (*header).base as usize,
                        (*header).root_pid == root.pid && (*header).root_start == root.start,
                    )
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        // SAFETY: the temporary look, unmapped once.
        unsafe { libc::munmap(peek, 4096) };
        if magic != MAGIC || !same_root {
            return Err(format!(
                "{} is not a finished segment of this group",
                path.display()
            ));
        }
        if layout != LAYOUT {
            return Err(format!(
                "{} was made by another build of meterage (all processes of a group must run the same one)",
                path.display()
            ));
        }
        if !map_at(fd, base, SEGMENT_BYTES) {
            return Err(format!(
                "the address range of the group's segment is in use in this process ({base:#x})"
            ));
        }
        Ok(Segment {
            base,
            view: map_view(fd, path)?,
            path: path.to_owned(),
        })
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the header is at the base of a mapping that is never unmapped.
        unsafe { &*(self.base as *const Header) }
    }

    /// How far the readers' view is from the mapping the members' pointers are into.
    pub fn view_shift(&self) -> isize {
        self.view as isize - self.base as isize
    }

    pub fn base(&self) -> usize {
        self.base
    }

    /// The address range of member `slot`'s arena.
    pub fn arena(&self, slot: usize) -> (usize, usize) {
        let start = self.base + HEADER_BYTES + slot * ARENA_BYTES;
        (start, start + ARENA_BYTES)
    }

    /// The address range of graveyard `which` (0 or 1).
    pub fn graveyard(&self, which: usize) -> (usize, usize) {
        let start = self.base + HEADER_BYTES + MAX_MEMBERS * ARENA_BYTES + which * GRAVEYARD_BYTES;
        (start, start + GRAVEYARD_BYTES)
    }

    /// Makes `bytes` at `address` (inside the segment) real memory, so that writing them
    /// can never fault for want of room in the file system; false when there is none.
    pub fn back(&self, address: usize, bytes: usize) -> bool {
        // This process's segment: through the descriptor it holds (no descriptor to open
        // when the application has used them all up).
        if BACKING.base.load(Ordering::Relaxed) == self.base && back_from_allocator(address, bytes)
        {
            return true;
        }
        let Ok(c) = c_path(&self.path) else {
            return false;
        };
        // SAFETY: a NUL-terminated path of our own file.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return false;
        }
        let offset = (address - self.base) as libc::off_t;
        // SAFETY: fd is open; the range lies within the file's size.
        let backed = unsafe { libc::fallocate(fd, 0, offset, bytes as libc::off_t) } == 0;
        // SAFETY: ours.
        unsafe { libc::close(fd) };
        backed
    }

    /// Gives the memory of `bytes` at `address` back (a folded member's arena): its pages
    /// read as zeros again.
    pub fn release(&self, address: usize, bytes: usize) {
        // SAFETY: a range inside our shared file mapping; MADV_REMOVE frees its tmpfs pages
        // for every process that maps it.
        unsafe { libc::madvise(address as *mut libc::c_void, bytes, libc::MADV_REMOVE) };
    }
}

/// A descriptor of this process's segment file for the arena's allocator, which must
/// make memory real without allocating (it runs inside the allocator). Checked by `fstat`
/// before each use: an application that closed descriptors (`closerange` in a child) may
/// have given the number to a file of its own.
struct Backing {
    fd: AtomicI32,
    device: AtomicU64,
    inode: AtomicU64,
    base: AtomicUsize,
    /// The file's path, NUL-terminated, to open it again without allocating.
    path: [AtomicU8; PATH_BYTES],
}

const PATH_BYTES: usize = 256;
/// Descriptors the allocator opens are moved this high where the limit allows: an application that
/// closed everything and opens its standard streams again must get the numbers it expects.
const HIGH_FD: i32 = 1000;

#[allow(clippy::declare_interior_mutable_const)]
const NUL: AtomicU8 = AtomicU8::new(0);

static BACKING: Backing = Backing {
    fd: AtomicI32::new(-1),
    device: AtomicU64::new(0),
    inode: AtomicU64::new(0),
    base: AtomicUsize::new(0),
    path: [NUL; PATH_BYTES],
};

/// `(device, inode)` of an open descriptor, without allocating.
fn file_of(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: a zeroed stat is filled by fstat; a closed fd fails cleanly.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::fstat(fd, &mut stat) } == 0).then_some((stat.st_dev, stat.st_ino))
}

fn is_backing(fd: i32) -> bool {
    fd >= 0
        && file_of(fd)
            == Some((
                BACKING.device.load(Ordering::Relaxed),
                BACKING.inode.load(Ordering::Relaxed),
            ))
}

/// Opens the segment file from the stored path, high above the application's descriptors;
/// -1 if it cannot (or it is not the segment any more). Never allocates.
fn open_stored_path() -> i32 {
    let mut path = [0u8; PATH_BYTES];
    for (byte, stored) in path.iter_mut().zip(&BACKING.path) {
        *byte = stored.load(Ordering::Relaxed);
    }
    if path[0] == 0 || path[PATH_BYTES - 1] != 0 {
        return -1;
    }
    // SAFETY: a NUL-terminated path on the stack.
    let low = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDWR | libc::O_CLOEXEC) };
    if low < 0 {
        return -1;
    }
    // As high as the descriptor limit allows (a low limit refuses the higher floors).
    let fd = [HIGH_FD, 256, 64, 16, 3]
        .iter()
        // SAFETY: `low` is ours; the duplicate is too.
        .map(|&floor| unsafe { libc::fcntl(low, libc::F_DUPFD_CLOEXEC, floor) })
        .find(|&fd| fd >= 0)
        .unwrap_or(-1);
    // SAFETY: ours (the duplicate, if any, stays open).
    unsafe { libc::close(low) };
    if fd >= 0 && is_backing(fd) {
        fd
    } else {
        if fd >= 0 {
            // SAFETY: ours.
            unsafe { libc::close(fd) };
        }
        -1
    }
}

impl Segment {
    /// Sets up what [`back_from_allocator`] uses (again, in a fork child).
    pub fn open_backing(&self) -> Result<(), String> {
        let bytes = self.path.as_os_str().as_bytes();
        if bytes.len() >= PATH_BYTES || bytes.contains(&0) {
            return Err(format!(
                "the segment's path is too long: {}",
                self.path.display()
            ));
        }
        let c = c_path(&self.path)?;
        // SAFETY: a NUL-terminated path of our own file.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        let Some((device, inode)) = (fd >= 0).then(|| file_of(fd)).flatten() else {
            return Err(error("cannot open the group's segment", &self.path));
        };
        // SAFETY: ours, only opened to learn the file's identity.
        unsafe { libc::close(fd) };
        let old = BACKING.fd.swap(-1, Ordering::AcqRel);
        if is_backing(old) {
            // SAFETY: still our descriptor of the segment file (checked just now).
            unsafe { libc::close(old) };
        }
        for (index, stored) in BACKING.path.iter().enumerate() {
            stored.store(bytes.get(index).copied().unwrap_or(0), Ordering::Relaxed);
        }
        BACKING.device.store(device, Ordering::Relaxed);
        BACKING.inode.store(inode, Ordering::Relaxed);
        BACKING.base.store(self.base, Ordering::Relaxed);
        let fd = open_stored_path();
        if fd < 0 {
            return Err(error("cannot open the group's segment", &self.path));
        }
        BACKING.fd.store(fd, Ordering::Release);
        Ok(())
    }
}

/// Makes `bytes` at `address` of this process's segment real memory; false when there is
/// no room. Never allocates; opens the file again if the application closed the
/// descriptor.
pub fn back_from_allocator(address: usize, bytes: usize) -> bool {
    let mut fd = BACKING.fd.load(Ordering::Acquire);
    if !is_backing(fd) {
        // Closed (and maybe reused) by the application: never touch it, open our own.
        fd = open_stored_path();
        if fd < 0 {
            return false;
        }
        BACKING.fd.store(fd, Ordering::Release);
    }
    let Some(offset) = address.checked_sub(BACKING.base.load(Ordering::Relaxed)) else {
        return false;
    };
    // SAFETY: the segment file (checked above); the range lies within its size.
    unsafe { libc::fallocate(fd, 0, offset as libc::off_t, bytes as libc::off_t) == 0 }
}

/// Removes the files of groups that are gone (a crashed server's): whose root process is
/// gone and, where the segment's header can be read, every member too (a worker that
/// outlived its master still uses its group). A group's other files (its exporters'
/// leases, `<segment>.<role>`) go with it.
pub fn sweep(directory: &Path, keep: ProcessId) {
    // SAFETY: getuid has no preconditions.
    let prefix = format!("meterage-{}-", unsafe { libc::getuid() });
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    let mut files: Vec<(ProcessId, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|name| name.strip_prefix(&prefix)) else {
            continue;
        };
        let segment_name = rest.split('.').next().unwrap_or(rest);
        let mut parts = segment_name.split('-');
        let (Some(pid), Some(start), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(pid), Ok(start)) = (pid.parse(), start.parse()) else {
            continue;
        };
        files.push((ProcessId { pid, start }, entry.path()));
    }
    let mut gone: Vec<ProcessId> = Vec::new();
    for (root, _) in &files {
        if *root == keep || gone.contains(root) || root.is_alive() {
            continue;
        }
        if !has_live_member(&path_of(directory, *root)) {
            gone.push(*root);
        }
    }
    for (root, path) in files {
        if gone.contains(&root) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether the segment at `path` names a live member (false if it cannot be read as a
/// segment of this build: then its root alone decides).
fn has_live_member(path: &Path) -> bool {
    let Ok(c) = c_path(path) else {
        return false;
    };
    // SAFETY: a NUL-terminated path, opened read-only.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return false;
    }
    let length = std::mem::size_of::<Header>();
    // SAFETY: a read-only look at the header of a file at least that long (a shorter one
    // makes mmap or the first read fail: checked by its size first).
    let live = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        let long_enough = libc::fstat(fd, &mut stat) == 0 && stat.st_size as usize >= length;
        let mapped = if long_enough {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        } else {
            libc::MAP_FAILED
        };
        libc::close(fd);
        if mapped == libc::MAP_FAILED {
            false
        } else {
            let header = &*mapped.cast::<Header>();
            let live = header.magic.load(Ordering::Acquire) == MAGIC
                && header.layout == LAYOUT
                && header.members.iter().any(|member| {
                    member.state.load(Ordering::Acquire) == LIVE
                        && ProcessId {
                            pid: member.pid.load(Ordering::Relaxed),
                            start: member.start.load(Ordering::Relaxed),
                        }
                        .is_alive()
                });
            libc::munmap(mapped, length);
            live
        }
    };
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "meterage-segment-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_forked_member_joins_at_the_same_address_and_sees_the_creators_writes() {
        let dir = scratch();
        let me = ProcessId::current().unwrap();
        let segment = Segment::open(&dir, me).unwrap();
        let (arena, _) = segment.arena(3);
        assert!(segment.back(arena, 4096));
        // SAFETY: backed memory inside our mapping.
        unsafe { (arena as *mut u64).write_volatile(0x5eed) };
        let mode = std::fs::metadata(&segment.path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        // SAFETY: the child reads, writes one word and exits without unwinding.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as the parent; inherited mapping at the same address.
            let seen = unsafe { (arena as *const u64).read_volatile() };
            // SAFETY: as above.
            unsafe { ((arena + 8) as *mut u64).write_volatile(seen + 1) };
            // SAFETY: leave at once.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        // SAFETY: backed memory inside our mapping, written by the child.
        let written = unsafe { ((arena + 8) as *const u64).read_volatile() };
        assert_eq!(written, 0x5eee);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_process_maps_it_by_name_at_the_recorded_address() {
        let dir = scratch();
        let me = ProcessId::current().unwrap();
        let segment = Segment::open(&dir, me).unwrap();
        // A process that did not inherit the mapping (exec'd, or forked before it): here
        // an unmapped view of the same file through a second open, as a joiner does.
        let path = segment.path.clone();
        // SAFETY: the child maps, checks and exits without unwinding.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // Forget the inherited mapping, as a process that never had it.
            // SAFETY: unmapping our own inherited copy; nothing else uses it in the child.
            unsafe { libc::munmap(segment.base() as *mut libc::c_void, SEGMENT_BYTES) };
            let code = match Segment::open(&dir, me) {
                Ok(joined) if joined.base() == segment.base() && joined.path == path => 0,
                _ => 1,
            };
            // SAFETY: leave at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_crashed_groups_segment_is_removed_and_never_joined() {
        let dir = scratch();
        let gone = ProcessId {
            pid: std::process::id(),
            start: 1,
        }; // not this process
        std::fs::write(path_of(&dir, gone), b"left by a crash").unwrap();
        let foreign = dir.join("meterage-0-1-2");
        std::fs::write(&foreign, b"another user's name").unwrap();
        let me = ProcessId::current().unwrap();
        let segment = Segment::open(&dir, me).unwrap();
        assert!(!path_of(&dir, gone).exists());
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            assert!(foreign.exists());
        }
        assert!(segment.path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_joiner_that_finds_the_file_before_it_is_sized_waits_for_its_creator() {
        // Between the creator's O_EXCL open and its ftruncate (a sweep of the directory
        // runs in between) the file is empty: gunicorn's workers, booted at once, found it
        // so and went on alone.
        let dir = scratch();
        let me = ProcessId::current().unwrap();
        let path = path_of(&dir, me);
        let c = c_path(&path).unwrap();
        // SAFETY: a NUL-terminated path; as `open` makes it.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600,
            )
        };
        assert!(fd >= 0);
        // SAFETY: the child joins and exits without unwinding.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = match Segment::open(&dir, me) {
                Ok(joined) if joined.header().root_pid == me.pid => 0,
                Ok(_) => 2,
                Err(_) => 1,
            };
            // SAFETY: leave at once.
            unsafe { libc::_exit(code) };
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let made = Segment::create(fd, &path, me);
        // SAFETY: ours; the mapping keeps the file.
        unsafe { libc::close(fd) };
        assert!(made.is_ok());
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_finished_segment_is_refused() {
        let dir = scratch();
        let me = ProcessId::current().unwrap();
        let path = path_of(&dir, me);
        std::fs::write(&path, b"short").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Segment::open(&dir, me)
            .unwrap_err()
            .contains("not a segment"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
