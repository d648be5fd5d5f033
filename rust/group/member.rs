//! This process as a member of its group: its slot, its arena, and the directory of the
//! series it made, which the other members read.
//!
//! A series made while joined is allocated in the arena ([`arena::shared`]) and named in
//! the directory (its identity as bytes, and its address), so any member can read it. The
//! process keeps every such series alive for good: a directory entry never points at
//! memory that was reused.
//!
//! After a `fork`, the child is another process: its atfork handler (syscalls and copies
//! only) stops it from allocating in the parent's arena and gives it a private copy of it
//! ([`after_fork_in_child`]), so nothing it does to the series it inherited reaches the
//! parent's numbers; [`rejoin_after_fork`] (run by the Python layer's fork hook, before
//! any Python code of the child) gives it a slot and an arena of its own.

use super::arena;
use super::liveness::ProcessId;
use super::segment::{
    back_from_allocator, Member, Segment, ARENA_BYTES, FREE, HEADER_BYTES, LIVE, MAX_MEMBERS,
    SEGMENT_BYTES,
};
use super::wire::{Identity, Writer};
use arc_swap::ArcSwapOption;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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

/// Lock-free, so that a fork child (whose parent's threads may have held a lock) reads it.
static JOINED: ArcSwapOption<Joined> = ArcSwapOption::const_empty();
/// Set once joined: what the registry calls to forget its series in a fork child.
static FORGET_SERIES: OnceLock<fn()> = OnceLock::new();

/// Series this process made while joined that the group cannot see (its arena was full
/// or `/dev/shm` had no room): their values are this process's only.
static UNSHARED: AtomicU64 = AtomicU64::new(0);

/// Series, and parts of shared series (new buckets), that the group cannot see.
pub fn unshared_series() -> u64 {
    UNSHARED.load(Ordering::Relaxed) + arena::unserved_blocks() as u64
}

/// The group, if this process is a member of one.
pub fn joined() -> Option<Arc<Joined>> {
    JOINED.load_full()
}

/// Whether this process records into a group (a fast check for the registry).
pub fn is_joined() -> bool {
    arena::owns_any()
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
    enter(segment, directory, root, me)
}

/// Takes a slot of `segment` (mapped here) for `me` and makes it this process's.
fn enter(
    segment: Segment,
    directory: &Path,
    root: ProcessId,
    me: ProcessId,
) -> Result<Arc<Joined>, String> {
    // First what can fail without a trace: a slot is taken only once the rest is ready
    // (and the segment's range known: claiming may fold, which reads through it).
    segment.open_backing()?;
    arena::set_segment(segment.base(), segment.base() + SEGMENT_BYTES);
    let slot = claim(&segment, me)?;
    let group = Arc::new(Joined {
        segment,
        directory: directory.to_owned(),
        root,
        slot,
        me,
    });
    JOINED.store(Some(Arc::clone(&group)));
    // Series made before joining are not in the arena: the maps make new ones there.
    if let Some(forget) = FORGET_SERIES.get() {
        forget();
    }
    arena::set_own(Some(group.segment.arena(slot)), back_from_allocator);
    crate::aggregate::epoch::set_observer(epoch_advanced);
    // Meters check their series again on their next call (a new epoch): they find the
    // ones of this arena. Nothing was recorded before joining (the binding checks).
    crate::aggregate::epoch::advance();
    Ok(group)
}

/// Takes a free slot for `me` (one whose process is gone is folded first by whoever
/// collects; here only free ones are taken).
fn claim(segment: &Segment, me: ProcessId) -> Result<usize, String> {
    let header = segment.header();
    let _guard = header.lock.lock()?;
    // Not a slot whose arena this process holds a private copy of (an ancestor's): its
    // own allocations there would never reach the shared memory.
    let free_slot = || {
        (0..MAX_MEMBERS).find(|&slot| {
            header.members[slot].state.load(Ordering::Acquire) == FREE && !is_shadowed(slot)
        })
    };
    let slot = match free_slot() {
        Some(slot) => slot,
        None => {
            // Members that are gone and not collected yet: fold them to make room.
            super::collect::fold_gone(segment, MAX_MEMBERS)?;
            free_slot()
                .ok_or_else(|| format!("the group has {MAX_MEMBERS} live members already"))?
        }
    };
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
/// arena; `keep` is a reference to it, leaked here: the series lives for good.
pub fn register<T>(identity: &Identity, series: usize, keep: Arc<T>) {
    let Some(group) = joined() else {
        return;
    };
    if group.me.pid != std::process::id() {
        return;
    }
    if !arena::owns(series) {
        UNSHARED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut writer = Writer::default();
    writer.identity(identity);
    let bytes: &'static [u8] =
        arena::shared(|| Box::leak(Box::<[u8]>::from(writer.bytes.as_slice())));
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
        // The arena is full: the series stays this process's own.
        UNSHARED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Never dropped (a reference count in the arena): a directory entry never names
    // freed memory. A fork child's copy of it is never dropped either.
    std::mem::forget(keep);
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
    if let Some(group) = JOINED.load_full() {
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
    JOINED.store(None);
    // The segment is mapped here already (inherited): a slot of it, the series forgotten.
    enter(parent.segment.clone(), &parent.directory, parent.root, me).map(Some)
}

/// The slots whose arenas this process maps as private copies: its parent's, and what its
/// parent had (a fork copies this with the rest of the memory).
static SHADOWED: [AtomicU64; MAX_MEMBERS / 64] = [const { AtomicU64::new(0) }; MAX_MEMBERS / 64];

fn shadow(arena_start: usize) {
    let Some(offset) = arena_start.checked_sub(arena::segment_start() + HEADER_BYTES) else {
        return;
    };
    let slot = offset / ARENA_BYTES;
    if slot < MAX_MEMBERS {
        SHADOWED[slot / 64].fetch_or(1 << (slot % 64), Ordering::Relaxed);
    }
}

fn is_shadowed(slot: usize) -> bool {
    SHADOWED[slot / 64].load(Ordering::Relaxed) & (1 << (slot % 64)) != 0
}

/// In a fork child, at once (its atfork handler: syscalls and copies only, no allocation,
/// no lock): the parent's arena is replaced by a private copy of what the parent used of
/// it, at the same address. The series the child inherited stay readable whatever becomes
/// of the slot (folded, given to a new member), and nothing the child does to them, joined
/// or not (a fork from C skips Python's fork hooks), reaches the parent's numbers.
pub fn after_fork_in_child() {
    let Some((start, end, used_end)) = arena::forget_own_after_fork() else {
        return;
    };
    shadow(start);
    let used = used_end.clamp(start, end) - start;
    // SAFETY: plain syscalls on this process's own address space; in a just-forked child
    // no other thread runs. The arena's `used` bytes are mapped (shared) until replaced.
    unsafe {
        let saved = if used > 0 {
            let saved = libc::mmap(
                std::ptr::null_mut(),
                used,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if saved == libc::MAP_FAILED {
                // No memory for the copy (only short of memory): the arena stays shared.
                return;
            }
            std::ptr::copy_nonoverlapping(start as *const u8, saved.cast::<u8>(), used);
            saved
        } else {
            std::ptr::null_mut()
        };
        let mapped = libc::mmap(
            start as *mut libc::c_void,
            end - start,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if !saved.is_null() {
            if mapped != libc::MAP_FAILED {
                std::ptr::copy_nonoverlapping(saved.cast::<u8>(), start as *mut u8, used);
            }
            libc::munmap(saved, used);
        }
    }
}

/// The entries of member `member`'s directory, newest first, read `shift` bytes from where
/// their pointers say (through the segment's readers' view, `Segment::view_shift`).
///
/// # Safety
/// The member's arena holds its entries for as long as it is not folded: call with the
/// group's lock held (folding takes it); `shift` is the segment's view shift.
pub unsafe fn entries(member: &Member, shift: isize) -> impl Iterator<Item = &'static Entry> {
    let mut next = member.directory.load(Ordering::Acquire);
    std::iter::from_fn(move || {
        if next == 0 {
            return None;
        }
        // SAFETY: an entry's address, published with Release after it was written, in an
        // arena mapped for good (the caller's contract keeps it from being reused), read
        // through the view.
        let entry = unsafe { &*((next as isize + shift) as *const Entry) };
        next = entry.next;
        Some(entry)
    })
}

impl Entry {
    /// The identity's bytes, read `shift` bytes away (see `entries`).
    ///
    /// # Safety
    /// As `entries`.
    pub unsafe fn identity_bytes(&self, shift: isize) -> &'static [u8] {
        // SAFETY: written once before the entry was published; never freed while the
        // member is (see `entries`).
        unsafe {
            std::slice::from_raw_parts(
                (self.identity as isize + shift) as *const u8,
                self.identity_len as usize,
            )
        }
    }
}
