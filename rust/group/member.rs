//! This process as a member of its group: its slot, its arena, and the directory of the
//! series it made, which the other members read.
//!
//! A series made while joined is allocated in the arena ([`arena::shared`]) and named in
//! the directory (its identity as bytes, and its address), so any member can read it. The
//! process keeps every such series alive for good: a directory entry never points at
//! memory that was reused.
//!
//! After a `fork`, the child is another process: the atfork handler (atomics only) stops
//! it from allocating in the parent's arena, and [`rejoin_after_fork`] (run by the Python
//! layer's fork hook, before any Python code of the child) gives it its own slot. The
//! parent's arena stays mapped in the child, but copy-on-write: nothing the child does to
//! the series it inherited reaches the parent's numbers.

use super::arena;
use super::liveness::ProcessId;
use super::segment::{Member, Segment, ARENA_BYTES, FREE, LIVE, MAX_MEMBERS, SEGMENT_BYTES};
use super::wire::{Identity, Writer};
use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

/// A directory entry, in the owner's arena.
#[repr(C)]
pub struct Entry {
    /// The next older entry's address (0: the last).
    pub next: u64,
    /// The series (a `CallSeries`, `HistogramSeries` or `CounterSeries`, as its identity's
    /// kind says).
    pub series: u64,
    /// The series' identity, as bytes ([`super::wire`]).
    pub identity: u64,
    pub identity_len: u64,
}

/// The group this process belongs to.
pub struct Joined {
    pub segment: Segment,
    pub directory: PathBuf,
    pub root: ProcessId,
    pub slot: usize,
    pub me: ProcessId,
}

static JOINED: Mutex<Option<Arc<Joined>>> = Mutex::new(None);
/// The series this process named in its directory, kept alive for good.
static KEPT: Mutex<Vec<Arc<dyn Any + Send + Sync>>> = Mutex::new(Vec::new());
/// Set once joined: what the registry calls to forget its series in a fork child.
static FORGET_SERIES: OnceLock<fn()> = OnceLock::new();

/// The group, if this process is a member of one.
pub fn joined() -> Option<Arc<Joined>> {
    JOINED.lock().ok()?.clone()
}

/// Whether this process records into a group (a fast check for the registry).
pub fn is_joined() -> bool {
    arena::owns_any()
}

fn back(address: usize, bytes: usize) -> bool {
    joined().is_some_and(|group| group.segment.back(address, bytes))
}

impl Joined {
    pub fn member(&self, slot: usize) -> &Member {
        &self.segment.header().members[slot]
    }

    pub fn own(&self) -> &Member {
        self.member(self.slot)
    }
}

/// Joins the group whose root is `root`, its segment in `directory`; `forget_series` is
/// what a fork child calls to drop the series it inherited.
pub fn join(directory: &Path, root: ProcessId, forget_series: fn()) -> Result<Arc<Joined>, String> {
    let me = ProcessId::current().ok_or("cannot read this process's start time")?;
    if let Some(group) = joined() {
        if group.me == me {
            return Ok(group);
        }
    }
    let _ = FORGET_SERIES.set(forget_series);
    // A fork child must stop allocating in its parent's arena at once (atfork handler).
    crate::probe::fork::install();
    let segment = Segment::open(directory, root)?;
    let slot = claim(&segment, me)?;
    let group = Arc::new(Joined {
        segment,
        directory: directory.to_owned(),
        root,
        slot,
        me,
    });
    arena::set_segment(group.segment.base(), group.segment.base() + SEGMENT_BYTES);
    *JOINED.lock().map_err(|_| "poisoned")? = Some(Arc::clone(&group));
    arena::set_own(Some(group.segment.arena(slot)), back);
    crate::aggregate::epoch::set_observer(epoch_advanced);
    Ok(group)
}

/// Takes a free slot for `me` (one whose process is gone is folded first by whoever
/// collects; here only free ones are taken).
fn claim(segment: &Segment, me: ProcessId) -> Result<usize, String> {
    let header = segment.header();
    let _guard = header.lock.lock()?;
    let slot = (0..MAX_MEMBERS)
        .find(|&slot| header.members[slot].state.load(Ordering::Acquire) == FREE)
        .ok_or_else(|| {
            format!("the group has {MAX_MEMBERS} members already (live, or exited and not yet collected)")
        })?;
    let member = &header.members[slot];
    // Its arena may hold a folded member's leftovers: nothing of it is read again.
    let (start, _) = segment.arena(slot);
    segment.release(start, ARENA_BYTES);
    member.pid.store(me.pid, Ordering::Relaxed);
    member.start.store(me.start, Ordering::Relaxed);
    member
        .epoch
        .store(crate::aggregate::epoch::current(), Ordering::Relaxed);
    member.directory.store(0, Ordering::Relaxed);
    member.state.store(LIVE, Ordering::Release);
    Ok(slot)
}

/// Names a new series in this process's directory. `series` is its address in the
/// arena; `keep` holds it alive for good.
pub fn register(identity: &Identity, series: usize, keep: Arc<dyn Any + Send + Sync>) {
    let Some(group) = joined() else {
        return;
    };
    if !arena::owns(series) || group.me.pid != std::process::id() {
        return;
    }
    let mut writer = Writer::default();
    writer.identity(identity);
    let bytes: &'static [u8] = arena::shared(|| Box::leak(writer.bytes.into_boxed_slice()));
    let member = group.own();
    let entry: &'static mut Entry = arena::shared(|| {
        Box::leak(Box::new(Entry {
            next: 0,
            series: series as u64,
            identity: bytes.as_ptr() as u64,
            identity_len: bytes.len() as u64,
        }))
    });
    if !arena::owns(entry as *const Entry as usize) || !arena::owns(bytes.as_ptr() as usize) {
        return; // the arena is full: the series stays this process's own
    }
    if let Ok(mut kept) = KEPT.lock() {
        kept.push(keep);
    }
    let mut head = member.directory.load(Ordering::Acquire);
    loop {
        entry.next = head;
        match member.directory.compare_exchange(
            head,
            entry as *const Entry as u64,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return,
            Err(newer) => head = newer,
        }
    }
}

/// The process's epoch moved on (a reset): its member slot says so, for the readers.
fn epoch_advanced(epoch: u64) {
    if let Some(group) = JOINED.try_lock().ok().and_then(|joined| joined.clone()) {
        // A fork child's handler runs this before the child has a slot: never the parent's.
        if group.me.pid == std::process::id() {
            group.own().epoch.store(epoch, Ordering::Release);
        }
    }
}

/// In a fork child, before any of its Python code: a slot of its own, the parent's arena
/// made copy-on-write, the inherited series forgotten.
pub fn rejoin_after_fork() -> Result<Option<Arc<Joined>>, String> {
    let Some(parent) = joined() else {
        return Ok(None);
    };
    let me = ProcessId::current().ok_or("cannot read this process's start time")?;
    if parent.me == me {
        return Ok(Some(parent));
    }
    private_copy(&parent.segment, parent.slot)?;
    if let Ok(mut kept) = KEPT.lock() {
        // Not ours to keep (their memory is the parent's, now copied): dropping an
        // inherited block frees nothing (see arena's dealloc).
        kept.clear();
    }
    if let Ok(mut joined) = JOINED.lock() {
        *joined = None;
    }
    if let Some(forget) = FORGET_SERIES.get() {
        forget();
    }
    join(
        &parent.directory,
        parent.root,
        *FORGET_SERIES.get().unwrap_or(&(noop as fn())),
    )
    .map(Some)
}

fn noop() {}

/// Maps arena `slot` of `segment` again at the same address, private and copy-on-write.
fn private_copy(segment: &Segment, slot: usize) -> Result<(), String> {
    let (start, _) = segment.arena(slot);
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
        segment.path.as_os_str(),
    ))
    .map_err(|_| "bad segment path")?;
    // SAFETY: a NUL-terminated path of our own segment file.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "cannot reopen the group's segment: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: replaces exactly the parent's arena in this (single-threaded, just forked)
    // process with a private view of the same file range: reads see the file, writes stay
    // here.
    let mapped = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            ARENA_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            fd,
            (start - segment.base()) as libc::off_t,
        )
    };
    // SAFETY: ours; the mapping keeps what it needs.
    unsafe { libc::close(fd) };
    if mapped == libc::MAP_FAILED {
        return Err(format!(
            "cannot make the parent's arena private: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Every member slot, with whether it is live.
pub fn members(group: &Joined) -> impl Iterator<Item = (usize, &Member)> {
    (0..MAX_MEMBERS).map(move |slot| (slot, group.member(slot)))
}

/// The entries of member `member`'s directory, newest first.
///
/// # Safety
/// The member's arena holds its entries for as long as it is not folded: call with the
/// group's lock held (folding takes it).
pub unsafe fn entries(member: &Member) -> impl Iterator<Item = &'static Entry> {
    let mut next = member.directory.load(Ordering::Acquire);
    std::iter::from_fn(move || {
        if next == 0 {
            return None;
        }
        // SAFETY: an entry's address, published with Release after it was written, in an
        // arena mapped for good (the caller's contract keeps it from being reused).
        let entry = unsafe { &*(next as *const Entry) };
        next = entry.next;
        Some(entry)
    })
}

impl Entry {
    pub fn identity_bytes(&self) -> &'static [u8] {
        // SAFETY: written once before the entry was published; never freed while the
        // member is (see `entries`).
        unsafe {
            std::slice::from_raw_parts(self.identity as *const u8, self.identity_len as usize)
        }
    }
}

/// For tests: the epoch a member slot shows.
pub fn epoch_of(member: &Member) -> u64 {
    member.epoch.load(Ordering::Acquire)
}

/// Not a member any more (tests; a process leaves its group by exiting).
pub fn leave_for_tests() {
    arena::set_own(None, back);
    if let Ok(mut joined) = JOINED.lock() {
        if let Some(group) = joined.take() {
            group.own().state.store(FREE, Ordering::Release);
        }
    }
}
