//! The `alloc` probe: the memory a call allocates through CPython's allocator API, exact
//! and per thread.
//!
//! **How it hooks.** `PyMem_GetAllocator`/`PyMem_SetAllocator` (found with `dlsym`, so the
//! core needs no Python to build or test) wrap the allocators installed in the three
//! domains (raw, mem, object), as tracemalloc does. Each wrapper passes every call to the
//! allocator it replaced; it is installed when the first meter that asks for `alloc` is
//! made, never otherwise, and never removed (a wrapper may sit on top of ours).
//!
//! **What a thread pays.** While no thread has a probed call in flight, one atomic load
//! per allocation and per free; while another thread has, a thread-local load too. Inside
//! one, each allocation also goes into the thread's table of the blocks
//! its calls allocated (address → size), and each free of a block found there is credited
//! to the calls that allocated it: that is what makes `memory.retained` exact. Nested
//! allocations (pymalloc handing a large request to the raw domain) count once, at the
//! outermost domain.
//!
//! **Staying on top.** Another tool's wrapper installed above ours (tracemalloc started
//! after meterage) would have its own bookkeeping allocations counted as the call's, so a
//! probed call that finds a foreign wrapper on top of the object domain installs a new
//! wrapper above it; the old one then sees only calls made from inside the new one and
//! passes them through. When that tool stops and restores the wrapper it found, ours is on
//! top again.
//!
//! **Measures.** `memory.allocated`: bytes requested (a realloc counts its new size, as a
//! free and an allocation); `memory.allocations`: malloc, calloc and realloc calls;
//! `memory.retained`: bytes of the call's own blocks still allocated at its end;
//! `memory.peak`: the most the call's own blocks held at once. Not seen: frees of the
//! call's blocks by other threads during the call (they count as retained), memory that
//! native code takes from malloc or mmap directly.

use super::catalog::{all_measures, Combine, Measure, Probe, ProbeInfo, Stage, BYTE_BOUNDARIES};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

pub struct Alloc;

/// Allocations per call: one to millions.
pub const ALLOCATION_BOUNDARIES: [f64; 11] =
    [0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

const SOURCE: &str = "CPython's allocator API (`PyMem_RawMalloc`, `PyMem_Malloc`, `PyObject_Malloc` and their calloc/realloc), wrapped with `PyMem_SetAllocator` while a meter asks for `alloc`; exact, per thread. **Not seen**: memory native code takes from malloc/mmap directly (numpy data buffers, PyTorch's caching allocator; the `gpu` probe has GPU memory)";

const fn measure(
    key: &'static str,
    unit: &'static str,
    combine: Combine,
    metric: &'static str,
    boundaries: &'static [f64],
    description: &'static str,
) -> Measure {
    Measure {
        key,
        unit,
        factor: 1.0,
        combine,
        metric,
        attributes: &[],
        description,
        boundaries,
        source: SOURCE,
    }
}

/// The allocation count's source, next to the bytes' in the docs.
const COUNT_SOURCE: &str = "the same hooks: each malloc, calloc and realloc call is one";

impl Probe for Alloc {
    const INFO: ProbeInfo = ProbeInfo {
        name: "alloc",
        default: false,
        measures: &[
            measure(
                "memory.allocated",
                "By",
                Combine::Sum,
                "meterage.call.memory.allocated",
                &BYTE_BOUNDARIES,
                "Bytes metered calls allocated through CPython's allocators.",
            ),
            measure(
                "memory.allocations",
                "{allocation}",
                Combine::Sum,
                "meterage.call.memory.allocations",
                &ALLOCATION_BOUNDARIES,
                "Allocations (malloc, calloc, realloc) metered calls made through CPython's allocators.",
            )
            .with_source(COUNT_SOURCE),
            measure(
                "memory.retained",
                "By",
                Combine::Sum,
                "meterage.call.memory.retained",
                &BYTE_BOUNDARIES,
                "Bytes metered calls allocated and had not freed when they ended.",
            ),
            measure(
                "memory.peak",
                "By",
                Combine::Max,
                "meterage.call.memory.peak",
                &BYTE_BOUNDARIES,
                "The most bytes of their own allocations metered calls held at once.",
            ),
        ],
    };
    // Innermost: the other probes' readings allocate nothing through CPython, and this one
    // must count nothing of theirs.
    const STAGE: Stage = Stage::Inner;
    /// allocated, allocations, then (before) the call's level id or (after) retained,
    /// peak, and whether retained and peak are known.
    const RAW: usize = 5;

    #[inline]
    fn before(raw: &mut [u64]) -> bool {
        if !hooks::ready_for_call() {
            return false;
        }
        with_thread(|thread| {
            raw[0] = thread.allocated;
            raw[1] = thread.allocations;
            raw[2] = thread.push();
        })
        .is_some()
    }

    #[inline]
    fn after(start: &[u64], raw: &mut [u64]) -> bool {
        with_thread(|thread| {
            raw[0] = thread.allocated;
            raw[1] = thread.allocations;
            if let Some(level) = thread.end(start[2]) {
                raw[2] = level.live.max(0) as u64;
                raw[3] = level.peak.max(0) as u64;
                raw[4] = u64::from(!level.broken);
            }
        })
        .is_some()
    }

    fn delta(end: &[u64], start: &[u64], out: &mut [u64]) -> u32 {
        out[0] = end[0].saturating_sub(start[0]);
        out[1] = end[1].saturating_sub(start[1]);
        out[2] = end[2];
        out[3] = end[3];
        if end[4] == 1 {
            all_measures(Self::INFO)
        } else {
            0b0011
        }
    }

    /// Each allocation and free of a probed call goes through the thread's table.
    fn in_call_cost_ns(measures: &[u64]) -> u64 {
        measures[1].saturating_mul(hooks::tracked_allocation_cost_ps()) / 1000
    }

    fn abandon(start: &[u64]) {
        with_thread(|thread| thread.end(start[2]));
    }

    fn availability() -> Option<String> {
        hooks::availability()
    }

    fn activate() -> Option<String> {
        hooks::install().err()
    }
}

// ---- the thread's calls and their blocks -----------------------------------------------

/// Nested probed calls a thread tracks at once; a deeper one evicts the oldest (whose
/// retained and peak are then unknown).
const MAX_LEVELS: usize = 8;
/// The table of a thread's tracked blocks starts this big and grows to at most
/// [`MAX_TABLE`] entries; past that the calls in flight lose retained and peak.
const FIRST_TABLE: usize = 1 << 10;
const MAX_TABLE: usize = 1 << 17;

/// One probed call in flight on this thread.
#[derive(Clone, Copy, Debug, Default)]
struct Level {
    id: u64,
    /// Blocks with a larger serial were allocated during the call.
    start_serial: u64,
    /// Bytes of the call's own blocks still allocated.
    live: i64,
    peak: i64,
    /// Some of its blocks could not be tracked.
    broken: bool,
}

/// A tracked block. `tag` is the table generation (high 24 bits) and the block's serial;
/// an entry of an older generation is empty.
#[derive(Clone, Copy, Default)]
struct Entry {
    address: usize,
    size: u64,
    tag: u64,
}

const SERIAL_BITS: u32 = 40;
const SERIAL_MASK: u64 = (1 << SERIAL_BITS) - 1;

/// Open addressing with linear probing; emptied in O(1) by a new generation.
struct Table {
    entries: Vec<Entry>,
    len: usize,
    generation: u64,
}

impl Table {
    const fn new() -> Table {
        Table {
            entries: Vec::new(),
            len: 0,
            generation: 1,
        }
    }

    fn home(&self, address: usize) -> usize {
        let bits = self.entries.len().trailing_zeros();
        // Blocks are 16-byte aligned: the low bits say nothing.
        (((address as u64) >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    fn occupied(&self, entry: &Entry) -> bool {
        entry.address != 0 && entry.tag >> SERIAL_BITS == self.generation
    }

    /// Forgets every block.
    fn clear(&mut self) {
        self.len = 0;
        self.generation += 1;
        if self.generation >= 1 << (64 - SERIAL_BITS) {
            self.generation = 1;
            self.entries.fill(Entry::default());
        }
    }

    /// Tracks a block; false when the table is full.
    fn insert(&mut self, address: usize, size: u64, serial: u64) -> bool {
        if (self.len + 1) * 2 > self.entries.len() && !self.grow() {
            return false;
        }
        let mask = self.entries.len() - 1;
        let tag = self.generation << SERIAL_BITS | (serial & SERIAL_MASK);
        let mut at = self.home(address);
        loop {
            let entry = self.entries[at];
            if !self.occupied(&entry) {
                self.len += 1;
                self.entries[at] = Entry { address, size, tag };
                return true;
            }
            if entry.address == address {
                // Freed by another thread and handed back to this one: the newer block.
                self.entries[at] = Entry { address, size, tag };
                return true;
            }
            at = (at + 1) & mask;
        }
    }

    /// Stops tracking a block: its size and serial, if it was tracked.
    fn remove(&mut self, address: usize) -> Option<(u64, u64)> {
        if self.len == 0 {
            return None;
        }
        let mask = self.entries.len() - 1;
        let mut at = self.home(address);
        loop {
            let entry = self.entries[at];
            if !self.occupied(&entry) {
                return None;
            }
            if entry.address == address {
                break;
            }
            at = (at + 1) & mask;
        }
        let found = self.entries[at];
        // Backward shift: move later entries of the same run into the gap.
        let mut gap = at;
        let mut next = (gap + 1) & mask;
        loop {
            let entry = self.entries[next];
            if !self.occupied(&entry) {
                break;
            }
            let home = self.home(entry.address);
            // Whether `home` lies cyclically in (gap, next]: then the entry stays.
            let stays = if gap <= next {
                gap < home && home <= next
            } else {
                gap < home || home <= next
            };
            if !stays {
                self.entries[gap] = entry;
                gap = next;
            }
            next = (next + 1) & mask;
        }
        self.entries[gap] = Entry::default();
        self.len -= 1;
        Some((found.size, found.tag & SERIAL_MASK))
    }

    fn grow(&mut self) -> bool {
        let capacity = (self.entries.len() * 2).max(FIRST_TABLE);
        if capacity > MAX_TABLE {
            return false;
        }
        let mut entries = Vec::new();
        // Never abort inside an allocator: no memory means no tracking.
        if entries.try_reserve_exact(capacity).is_err() {
            return false;
        }
        entries.resize(capacity, Entry::default());
        let old = std::mem::replace(&mut self.entries, entries);
        self.len = 0;
        for entry in old {
            if self.occupied(&entry) {
                let mask = self.entries.len() - 1;
                let mut at = self.home(entry.address);
                while self.occupied(&self.entries[at]) {
                    at = (at + 1) & mask;
                }
                self.entries[at] = entry;
                self.len += 1;
            }
        }
        true
    }
}

/// What one thread's probed calls allocated.
struct Thread {
    /// Bytes and allocations while a probed call is in flight on this thread.
    allocated: u64,
    allocations: u64,
    /// Allocations tracked in the table's current generation.
    serial: u64,
    levels: [Level; MAX_LEVELS],
    depth: usize,
    /// Level ids are this thread's number (high 32 bits) and a count.
    number: u64,
    next_id: u64,
    table: Table,
}

/// Level ids of calls that began on one thread and ended (or were given up) on another:
/// the thread they began on drops those levels at its next probed call. A level whose id
/// finds no free slot stays until it is evicted.
static RETIRED: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static RETIRED_COUNT: AtomicUsize = AtomicUsize::new(0);
static THREAD_NUMBERS: AtomicU64 = AtomicU64::new(1);

fn retire(id: u64) {
    for slot in &RETIRED {
        if slot
            .compare_exchange(0, id, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            RETIRED_COUNT.fetch_add(1, Ordering::Release);
            return;
        }
    }
}

/// What the wrappers read of a thread: one thread-local without a destructor, so reading
/// it is a plain load.
struct Fast {
    /// [`COUNTING`] while a probed call is in flight, [`IN_HOOK`] while a wrapper runs the
    /// allocator below it: all that an allocation outside probed calls looks at.
    state: Cell<u8>,
    /// The thread's [`Thread`], made by its first probed call (null before, and after the
    /// thread's exit freed it).
    thread: Cell<*mut Thread>,
}

/// Frees the thread's [`Thread`] when the thread exits.
struct Owner(Cell<*mut Thread>);

impl Drop for Owner {
    fn drop(&mut self) {
        let thread = self.0.replace(std::ptr::null_mut());
        if thread.is_null() {
            return;
        }
        set_counting(false);
        let _ = FAST.try_with(|fast| {
            fast.thread.set(std::ptr::null_mut());
            fast.state.set(0);
        });
        // SAFETY: as below; read before it is freed.
        unsafe { (*thread).release_retired() };
        // SAFETY: made by Box::into_raw in `with_thread`, freed once, here; the wrappers
        // no longer see it (FAST's pointer is null).
        drop(unsafe { Box::from_raw(thread) });
    }
}

thread_local! {
    static FAST: Fast = const {
        Fast {
            state: Cell::new(0),
            thread: Cell::new(std::ptr::null_mut()),
        }
    };
    static OWNER: Owner = const { Owner(Cell::new(std::ptr::null_mut())) };
}

const COUNTING: u8 = 1;
const IN_HOOK: u8 = 2;

/// Runs `f` on this thread's state, made on first use; `None` while the thread exits.
fn with_thread<T>(f: impl FnOnce(&mut Thread) -> T) -> Option<T> {
    let mut thread = FAST.try_with(|fast| fast.thread.get()).ok()?;
    if thread.is_null() {
        thread = Box::into_raw(Box::new(Thread::new()));
        if OWNER.try_with(|owner| owner.0.set(thread)).is_err() {
            // SAFETY: just made, and handed to nobody.
            drop(unsafe { Box::from_raw(thread) });
            return None;
        }
        let _ = FAST.try_with(|fast| fast.thread.set(thread));
    }
    // SAFETY: this thread's own state, freed only by its Owner at its exit. Nothing that
    // holds it allocates through CPython (the table grows with Rust's allocator), so no
    // wrapper runs while it is borrowed here.
    Some(f(unsafe { &mut *thread }))
}

/// Threads with a probed call in flight: while none has, an allocation costs the wrappers
/// one load of this (no thread-local at all).
static COUNTING_THREADS: AtomicUsize = AtomicUsize::new(0);
/// The fork generation [`COUNTING_THREADS`] counts in: a fork child has only the thread
/// that forked, and recounts on its first change.
static COUNTED_GENERATION: AtomicU64 = AtomicU64::new(0);

fn set_counting(on: bool) {
    let _ = FAST.try_with(|fast| {
        let state = fast.state.get();
        let generation = super::fork::generation();
        if COUNTED_GENERATION.load(Ordering::Relaxed) != generation {
            COUNTED_GENERATION.store(generation, Ordering::Relaxed);
            COUNTING_THREADS.store(usize::from(state & COUNTING != 0), Ordering::Relaxed);
        }
        if on && state & COUNTING == 0 {
            COUNTING_THREADS.fetch_add(1, Ordering::Relaxed);
        } else if !on && state & COUNTING != 0 {
            COUNTING_THREADS.fetch_sub(1, Ordering::Relaxed);
        }
        fast.state.set(if on {
            state | COUNTING
        } else {
            state & !COUNTING
        });
    });
}

impl Thread {
    fn new() -> Thread {
        Thread {
            allocated: 0,
            allocations: 0,
            serial: 0,
            levels: [Level::default(); MAX_LEVELS],
            depth: 0,
            number: THREAD_NUMBERS.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF,
            next_id: 1,
            table: Table::new(),
        }
    }

    fn owns(&self, id: u64) -> bool {
        id >> 32 == self.number
    }

    /// Drops the levels that other threads retired, and frees their slots.
    #[cold]
    fn reap(&mut self) {
        for slot in &RETIRED {
            let id = slot.load(Ordering::Acquire);
            if id != 0
                && self.owns(id)
                && slot
                    .compare_exchange(id, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                RETIRED_COUNT.fetch_sub(1, Ordering::Relaxed);
                self.pop(id);
            }
        }
    }

    /// Ends the call with level `id`: its level, if this thread has it. A call that began
    /// on another thread is retired for that thread to drop.
    fn end(&mut self, id: u64) -> Option<Level> {
        if !self.owns(id) {
            retire(id);
            return None;
        }
        self.pop(id)
    }

    /// At the thread's exit: the slots of its retired levels are nobody's any more.
    fn release_retired(&self) {
        if RETIRED_COUNT.load(Ordering::Acquire) == 0 {
            return;
        }
        for slot in &RETIRED {
            let id = slot.load(Ordering::Acquire);
            if id != 0
                && self.owns(id)
                && slot
                    .compare_exchange(id, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                RETIRED_COUNT.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Starts tracking a call; its level's id.
    fn push(&mut self) -> u64 {
        if RETIRED_COUNT.load(Ordering::Acquire) != 0 {
            self.reap();
        }
        if self.depth == MAX_LEVELS {
            self.levels.copy_within(1.., 0);
            self.depth -= 1;
        }
        let id = self.number << 32 | (self.next_id & 0xFFFF_FFFF);
        self.next_id += 1;
        self.levels[self.depth] = Level {
            id,
            start_serial: self.serial,
            ..Level::default()
        };
        self.depth += 1;
        set_counting(true);
        id
    }

    /// Stops tracking the call with level `id` (wherever it is: blocks of one meter can
    /// end out of order); `None` if it was evicted.
    fn pop(&mut self, id: u64) -> Option<Level> {
        let at = self.levels[..self.depth]
            .iter()
            .rposition(|level| level.id == id)?;
        let level = self.levels[at];
        self.levels.copy_within(at + 1..self.depth, at);
        self.depth -= 1;
        if self.depth == 0 {
            set_counting(false);
        }
        if self.levels[..self.depth].iter().all(|level| level.broken) {
            // No call in flight needs its blocks any more.
            self.table.clear();
            self.serial = 0;
            for level in &mut self.levels[..self.depth] {
                level.start_serial = 0;
            }
        }
        Some(level)
    }

    fn allocated_block(&mut self, address: usize, size: u64) {
        self.allocated = self.allocated.wrapping_add(size);
        self.allocations += 1;
        let levels = &mut self.levels[..self.depth];
        if levels.iter().all(|level| level.broken) {
            return; // nobody needs the block tracked
        }
        self.serial += 1;
        if self.serial > SERIAL_MASK || !self.table.insert(address, size, self.serial) {
            // Full: the calls in flight lose retained and peak, later ones start afresh.
            for level in levels.iter_mut() {
                level.broken = true;
            }
            self.table.clear();
            self.serial = 0;
            return;
        }
        let size = size.min(i64::MAX as u64) as i64;
        for level in levels {
            level.live = level.live.saturating_add(size);
            level.peak = level.peak.max(level.live);
        }
    }

    fn freed_block(&mut self, address: usize) {
        let Some((size, serial)) = self.table.remove(address) else {
            return;
        };
        let size = size.min(i64::MAX as u64) as i64;
        for level in &mut self.levels[..self.depth] {
            if level.start_serial >= serial {
                break; // this call and the later ones started after the block
            }
            level.live -= size;
        }
    }
}

// ---- the wrappers ------------------------------------------------------------------------

mod hooks {
    use super::*;

    /// `PyMemAllocatorEx`, the same in CPython 3.10 to 3.13.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(super) struct Allocator {
        pub ctx: *mut c_void,
        pub malloc: Option<unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void>,
        pub calloc: Option<unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void>,
        pub realloc: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void>,
        pub free: Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
    }

    // SAFETY: the context pointer is the allocator's own; it is only handed back to it.
    unsafe impl Send for Allocator {}

    /// The domains, as `PyMemAllocatorDomain` numbers them.
    const DOMAINS: [i32; 3] = [0, 1, 2];
    const OBJECT_DOMAIN: usize = 2;
    /// Fresh wrappers installed on top of foreign ones before giving up.
    const MAX_INSTALLS: usize = 64;

    type GetAllocator = unsafe extern "C" fn(i32, *mut Allocator);
    type SetAllocator = unsafe extern "C" fn(i32, *const Allocator);

    struct Api {
        get: GetAllocator,
        set: SetAllocator,
    }

    /// A wrapper's state: the allocator it passes calls to. Never freed (an allocator
    /// above it may keep calling it).
    pub(super) struct Layer {
        pub inner: Allocator,
    }

    fn api() -> Option<&'static Api> {
        static API: std::sync::OnceLock<Option<Api>> = std::sync::OnceLock::new();
        API.get_or_init(|| {
            let symbol = |name: &std::ffi::CStr| {
                // SAFETY: dlsym with RTLD_DEFAULT looks a symbol up; a null result is handled.
                let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                (!found.is_null()).then_some(found)
            };
            let get = symbol(c"PyMem_GetAllocator")?;
            let set = symbol(c"PyMem_SetAllocator")?;
            // SAFETY: CPython's own functions, with these signatures since 3.4.
            unsafe {
                Some(Api {
                    get: std::mem::transmute::<*mut c_void, GetAllocator>(get),
                    set: std::mem::transmute::<*mut c_void, SetAllocator>(set),
                })
            }
        })
        .as_ref()
    }

    struct Installed {
        /// Wrappers installed so far.
        installs: usize,
        failure: Option<String>,
    }

    static STATE_LOCK: Mutex<Installed> = Mutex::new(Installed {
        installs: 0,
        failure: None,
    });
    /// The context the object domain's top allocator had when last found to be ours.
    static VERIFIED_TOP: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    /// Set by the tests' `_refuse_alloc_hooks`: the next install fails with this reason.
    static REFUSE_NEXT: AtomicU32 = AtomicU32::new(0);

    pub(super) fn refuse_next_install() {
        REFUSE_NEXT.store(1, Ordering::Relaxed);
    }

    fn top(api: &Api, domain: i32) -> Allocator {
        let mut current = Allocator {
            ctx: std::ptr::null_mut(),
            malloc: None,
            calloc: None,
            realloc: None,
            free: None,
        };
        // SAFETY: PyMem_GetAllocator writes one PyMemAllocatorEx into `current`.
        unsafe { (api.get)(domain, &mut current) };
        current
    }

    fn is_ours(allocator: &Allocator) -> bool {
        allocator.malloc.map(|f| f as *const () as usize) == Some(hook_malloc as *const () as usize)
    }

    pub(super) fn availability() -> Option<String> {
        if api().is_none() {
            return Some(
                "CPython's allocator API (PyMem_SetAllocator) is not in this process".to_owned(),
            );
        }
        STATE_LOCK
            .lock()
            .map_or(None, |state| state.failure.clone())
    }

    /// Puts a wrapper on top of each domain unless ours is there. Called with the GIL
    /// held (making a meter; a probed call finding a foreign wrapper on top).
    pub(super) fn install() -> Result<(), String> {
        let api = api().ok_or_else(|| availability().unwrap_or_default())?;
        // Fork children recount the threads that count (see COUNTED_GENERATION).
        super::super::fork::install();
        let mut state = STATE_LOCK.lock().map_err(|_| "poisoned".to_owned())?;
        if let Some(failure) = &state.failure {
            return Err(failure.clone());
        }
        if REFUSE_NEXT.swap(0, Ordering::Relaxed) != 0 {
            let reason = "the allocator hooks were refused (meterage's tests asked for it)";
            state.failure = Some(reason.to_owned());
            return Err(reason.to_owned());
        }
        let tops = DOMAINS.map(|domain| top(api, domain));
        if tops.iter().all(is_ours) {
            VERIFIED_TOP.store(tops[OBJECT_DOMAIN].ctx, Ordering::Release);
            return Ok(());
        }
        if state.installs == MAX_INSTALLS {
            let reason = format!(
                "another allocator replaced meterage's hooks {MAX_INSTALLS} times; not installing again"
            );
            state.failure = Some(reason.clone());
            return Err(reason);
        }
        state.installs += 1;
        for (domain, below) in DOMAINS.into_iter().zip(tops) {
            let layer: &'static Layer = Box::leak(Box::new(Layer { inner: below }));
            let wrapper = Allocator {
                ctx: (layer as *const Layer).cast_mut().cast(),
                malloc: Some(hook_malloc),
                calloc: Some(hook_calloc),
                realloc: Some(hook_realloc),
                free: Some(hook_free),
            };
            // SAFETY: the wrapper passes every call on to the allocator it replaces, which
            // CPython allows at run time (tracemalloc does the same); the GIL is held.
            unsafe { (api.set)(domain, &wrapper) };
        }
        let now = DOMAINS.map(|domain| top(api, domain));
        if !now.iter().all(is_ours) {
            let reason = "PyMem_SetAllocator did not install meterage's hooks".to_owned();
            state.failure = Some(reason.clone());
            return Err(reason);
        }
        VERIFIED_TOP.store(now[OBJECT_DOMAIN].ctx, Ordering::Release);
        tracked_allocation_cost_ps();
        Ok(())
    }

    /// What tracking one allocation and its free costs inside a probed call, in
    /// picoseconds: measured once, on a wrapper over libc's allocator, as the difference
    /// between tracked and untracked allocations.
    pub(super) fn tracked_allocation_cost_ps() -> u64 {
        static COST_PS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        // On a thread of its own: none of this thread's calls in flight may see it.
        *COST_PS.get_or_init(|| std::thread::spawn(calibrate).join().unwrap_or(0))
    }

    fn calibrate() -> u64 {
        const PAIRS: usize = 2048;
        let wrapper = wrapper_over_libc();
        let (Some(malloc), Some(free)) = (wrapper.malloc, wrapper.free) else {
            return 0;
        };
        let mut blocks = [std::ptr::null_mut(); 64];
        let mut run = || {
            let began = super::super::clock::monotonic_ns();
            for _ in 0..PAIRS / blocks.len() {
                for block in blocks.iter_mut() {
                    // SAFETY: our wrapper over libc's allocator; each block freed below.
                    *block = unsafe { malloc(wrapper.ctx, 48) };
                }
                for block in blocks.iter() {
                    // SAFETY: as above.
                    unsafe { free(wrapper.ctx, *block) };
                }
            }
            super::super::clock::monotonic_ns().saturating_sub(began)
        };
        let untracked = (0..5).map(|_| run()).min().unwrap_or(0);
        let tracked = with_thread(|thread| thread.push())
            .map(|level| {
                let best = (0..5).map(|_| run()).min().unwrap_or(0);
                with_thread(|thread| thread.pop(level));
                best
            })
            .unwrap_or(untracked);
        tracked.saturating_sub(untracked) * 1000 / PAIRS as u64
    }

    /// Before a probed call: whether ours is the object domain's top allocator, installing
    /// a new wrapper when another tool's sits above it.
    #[inline]
    pub(super) fn ready_for_call() -> bool {
        let Some(api) = api() else {
            return false;
        };
        let current = top(api, DOMAINS[OBJECT_DOMAIN]);
        let verified = VERIFIED_TOP.load(Ordering::Acquire);
        // (Null until installed: CPython's own allocators have a null context.)
        if !verified.is_null() && current.ctx == verified {
            return true;
        }
        verify_slowly(current)
    }

    #[cold]
    fn verify_slowly(current: Allocator) -> bool {
        if is_ours(&current) {
            // One of ours on top again (a tool that was above it stopped).
            VERIFIED_TOP.store(current.ctx, Ordering::Release);
            return true;
        }
        install().is_ok()
    }

    /// This thread's state when it counts this allocation (marked inside the wrapper
    /// then); `None` outside probed calls and inside another wrapper of ours.
    #[inline(always)]
    fn enter() -> Option<*mut Thread> {
        if COUNTING_THREADS.load(Ordering::Relaxed) == 0 {
            return None;
        }
        FAST.try_with(|fast| {
            if fast.state.get() != COUNTING {
                return None;
            }
            let thread = fast.thread.get();
            if thread.is_null() {
                return None;
            }
            fast.state.set(COUNTING | IN_HOOK);
            Some(thread)
        })
        .ok()
        .flatten()
    }

    #[inline(always)]
    fn leave() {
        let _ = FAST.try_with(|fast| fast.state.set(fast.state.get() & !IN_HOOK));
    }

    /// # Safety
    /// `thread` came from [`enter`] on this thread, which has not exited since.
    #[inline(always)]
    unsafe fn update(thread: *mut Thread, f: impl FnOnce(&mut Thread)) {
        // SAFETY: the caller's contract; see `with_thread` for why nothing else borrows it.
        f(unsafe { &mut *thread });
    }

    /// # Safety
    /// `ctx` is a [`Layer`] installed by [`install`].
    unsafe fn inner(ctx: *mut c_void) -> Allocator {
        // SAFETY: the caller's contract: a leaked, never-freed Layer.
        unsafe { (*ctx.cast::<Layer>()).inner }
    }

    /// Runs `allocate` (the allocator below) and, when this thread counts, `record`s the
    /// block it gave.
    #[inline(always)]
    fn counted(
        allocate: impl FnOnce() -> *mut c_void,
        record: impl FnOnce(&mut Thread, *mut c_void),
    ) -> *mut c_void {
        let Some(thread) = enter() else {
            return allocate();
        };
        let block = allocate();
        if !block.is_null() {
            // SAFETY: from enter(), on this thread.
            unsafe { update(thread, |t| record(t, block)) };
        }
        leave();
        block
    }

    unsafe extern "C" fn hook_malloc(ctx: *mut c_void, size: usize) -> *mut c_void {
        // SAFETY: CPython calls this with the context it was installed with.
        let below = unsafe { inner(ctx) };
        let Some(malloc) = below.malloc else {
            return std::ptr::null_mut();
        };
        counted(
            // SAFETY: the replaced allocator, with its own context.
            || unsafe { malloc(below.ctx, size) },
            |thread, block| thread.allocated_block(block as usize, size as u64),
        )
    }

    unsafe extern "C" fn hook_calloc(ctx: *mut c_void, count: usize, each: usize) -> *mut c_void {
        // SAFETY: CPython calls this with the context it was installed with.
        let below = unsafe { inner(ctx) };
        let Some(calloc) = below.calloc else {
            return std::ptr::null_mut();
        };
        let size = (count as u64).saturating_mul(each as u64);
        counted(
            // SAFETY: the replaced allocator, with its own context.
            || unsafe { calloc(below.ctx, count, each) },
            |thread, block| thread.allocated_block(block as usize, size),
        )
    }

    unsafe extern "C" fn hook_realloc(
        ctx: *mut c_void,
        old: *mut c_void,
        size: usize,
    ) -> *mut c_void {
        // SAFETY: CPython calls this with the context it was installed with.
        let below = unsafe { inner(ctx) };
        let Some(realloc) = below.realloc else {
            return std::ptr::null_mut();
        };
        counted(
            // SAFETY: the replaced allocator, with its own context.
            || unsafe { realloc(below.ctx, old, size) },
            // The old block is gone (or is this one, resized): a free and an allocation.
            |thread, block| {
                if !old.is_null() {
                    thread.freed_block(old as usize);
                }
                thread.allocated_block(block as usize, size as u64);
            },
        )
    }

    unsafe extern "C" fn hook_free(ctx: *mut c_void, block: *mut c_void) {
        // SAFETY: CPython calls this with the context it was installed with.
        let below = unsafe { inner(ctx) };
        let Some(free) = below.free else {
            return;
        };
        if let Some(thread) = enter() {
            if !block.is_null() {
                // Before the free: after it the address may be handed out again.
                // SAFETY: from enter(), on this thread.
                unsafe { update(thread, |t| t.freed_block(block as usize)) };
            }
            // SAFETY: the replaced allocator, with its own context.
            unsafe { free(below.ctx, block) };
            leave();
        } else {
            // SAFETY: as above.
            unsafe { free(below.ctx, block) };
        }
    }

    unsafe extern "C" fn system_malloc(_: *mut c_void, size: usize) -> *mut c_void {
        // SAFETY: libc malloc.
        unsafe { libc::malloc(size.max(1)) }
    }
    unsafe extern "C" fn system_calloc(_: *mut c_void, n: usize, each: usize) -> *mut c_void {
        // SAFETY: libc calloc.
        unsafe { libc::calloc(n.max(1), each.max(1)) }
    }
    unsafe extern "C" fn system_realloc(
        _: *mut c_void,
        old: *mut c_void,
        size: usize,
    ) -> *mut c_void {
        // SAFETY: libc realloc of a block from system_malloc.
        unsafe { libc::realloc(old, size.max(1)) }
    }
    unsafe extern "C" fn system_free(_: *mut c_void, block: *mut c_void) {
        // SAFETY: libc free of a block from system_malloc.
        unsafe { libc::free(block) }
    }

    /// A wrapper over libc's allocator, as `install` would make one (for calibration and
    /// tests).
    pub(super) fn wrapper_over_libc() -> Allocator {
        let layer: &'static Layer = Box::leak(Box::new(Layer {
            inner: Allocator {
                ctx: std::ptr::null_mut(),
                malloc: Some(system_malloc),
                calloc: Some(system_calloc),
                realloc: Some(system_realloc),
                free: Some(system_free),
            },
        }));
        Allocator {
            ctx: (layer as *const Layer).cast_mut().cast(),
            malloc: Some(hook_malloc),
            calloc: Some(hook_calloc),
            realloc: Some(hook_realloc),
            free: Some(hook_free),
        }
    }
}

/// Makes the next installation of the hooks fail (tests of the warning path).
pub fn refuse_next_install() {
    hooks::refuse_next_install();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probed call's readings around `work`, which allocates through `wrapper`.
    fn measured(work: impl FnOnce()) -> ([u64; 4], u32) {
        let mut start = [0; 5];
        with_thread(|thread| {
            start[0] = thread.allocated;
            start[1] = thread.allocations;
            start[2] = thread.push();
        });
        work();
        let mut end = [0; 5];
        assert!(Alloc::after(&start, &mut end));
        let mut out = [0; 4];
        let present = Alloc::delta(&end, &start, &mut out);
        (out, present)
    }

    fn call(
        f: unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
        a: &hooks::Allocator,
        n: usize,
    ) -> usize {
        // SAFETY: a wrapper over libc's allocator.
        unsafe { f(a.ctx, n) as usize }
    }

    fn free(a: &hooks::Allocator, block: usize) {
        // SAFETY: a block from the same wrapper.
        unsafe { (a.free.unwrap())(a.ctx, block as *mut c_void) }
    }

    #[test]
    fn a_call_is_charged_what_it_allocates_and_retains() {
        let a = hooks::wrapper_over_libc();
        let mut kept = Vec::new();
        let (values, present) = measured(|| {
            for size in [100, 200, 300] {
                kept.push(call(a.malloc.unwrap(), &a, size));
            }
            let gone = call(a.malloc.unwrap(), &a, 1000);
            free(&a, gone);
        });
        assert_eq!(present, 0b1111);
        assert_eq!(values, [1600, 4, 600, 1600]);
        for block in kept {
            free(&a, block);
        }
    }

    #[test]
    fn outside_probed_calls_nothing_is_counted() {
        let a = hooks::wrapper_over_libc();
        let before = with_thread(|t| t.allocations);
        let block = call(a.malloc.unwrap(), &a, 64);
        free(&a, block);
        assert_eq!(with_thread(|t| t.allocations), before);
    }

    #[test]
    fn freeing_older_memory_is_not_credited_to_a_call() {
        let a = hooks::wrapper_over_libc();
        let old = call(a.malloc.unwrap(), &a, 500);
        let (values, _) = measured(|| free(&a, old));
        assert_eq!(values, [0, 0, 0, 0]);
    }

    #[test]
    fn nested_calls_each_see_their_own_blocks() {
        let a = hooks::wrapper_over_libc();
        let mut inner_values = [0; 4];
        let mut outer_block = 0;
        let (outer, _) = measured(|| {
            outer_block = call(a.malloc.unwrap(), &a, 1000);
            let (inner, present) = measured(|| {
                // Freed inside the inner call, allocated before it: the outer's.
                free(&a, outer_block);
                let b = call(a.malloc.unwrap(), &a, 10);
                free(&a, b);
                call(a.malloc.unwrap(), &a, 20);
            });
            assert_eq!(present, 0b1111);
            inner_values = inner;
        });
        assert_eq!(inner_values, [30, 2, 20, 20]);
        assert_eq!(outer, [1030, 3, 20, 1000]);
    }

    #[test]
    fn realloc_is_a_free_and_an_allocation() {
        let a = hooks::wrapper_over_libc();
        let (values, _) = measured(|| {
            let block = call(a.malloc.unwrap(), &a, 100);
            // SAFETY: a block from the same wrapper.
            let grown = unsafe { (a.realloc.unwrap())(a.ctx, block as *mut c_void, 5000) };
            assert!(!grown.is_null());
        });
        assert_eq!(values, [5100, 2, 5000, 5000]);
    }

    #[test]
    fn the_table_survives_many_blocks_and_removals_in_any_order() {
        let mut table = Table::new();
        let addresses: Vec<usize> = (1..=20_000).map(|i| i * 48).collect();
        for (serial, &address) in addresses.iter().enumerate() {
            assert!(table.insert(address, address as u64, serial as u64 + 1));
        }
        for &address in addresses.iter().step_by(3) {
            assert_eq!(
                table.remove(address).map(|(size, _)| size),
                Some(address as u64)
            );
        }
        for (index, &address) in addresses.iter().enumerate() {
            let expected = (index % 3 != 0).then_some(address as u64);
            assert_eq!(
                table.remove(address).map(|(size, _)| size),
                expected,
                "{index}"
            );
        }
        assert_eq!(table.len, 0);
        table.insert(96, 1, 1);
        table.clear();
        assert_eq!(table.remove(96), None);
    }

    #[test]
    fn a_full_table_leaves_retained_unknown_not_wrong() {
        let a = hooks::wrapper_over_libc();
        let mut blocks = Vec::new();
        let (values, present) = measured(|| {
            for _ in 0..MAX_TABLE {
                blocks.push(call(a.malloc.unwrap(), &a, 8));
            }
        });
        assert_eq!(present, 0b0011);
        assert_eq!(values[..2], [8 * MAX_TABLE as u64, MAX_TABLE as u64]);
        for block in blocks {
            free(&a, block);
        }
    }

    #[test]
    fn too_many_nested_calls_evict_the_oldest() {
        let mut ids = Vec::new();
        with_thread(|thread| {
            for _ in 0..MAX_LEVELS + 1 {
                ids.push(thread.push());
            }
            assert!(thread.pop(ids[0]).is_none());
            for &id in ids[1..].iter().rev() {
                assert!(thread.pop(id).is_some());
            }
            assert_eq!(thread.depth, 0);
        });
        assert_eq!(FAST.with(|fast| fast.state.get()), 0);
    }

    #[test]
    fn adaptive_sampling_is_told_what_tracking_cost_inside_the_call() {
        let per_allocation_ps = hooks::tracked_allocation_cost_ps();
        assert!(per_allocation_ps > 0);
        let measures = [48_000, 1000, 0, 0];
        assert_eq!(
            Alloc::in_call_cost_ns(&measures),
            per_allocation_ps * 1000 / 1000
        );
        assert_eq!(Alloc::in_call_cost_ns(&[0, 0, 0, 0]), 0);
    }

    #[test]
    fn a_call_ended_on_another_thread_is_dropped_by_its_own() {
        let id = with_thread(|thread| thread.push()).unwrap();
        let depth = || with_thread(|thread| thread.depth).unwrap();
        assert_eq!(depth(), 1);
        std::thread::spawn(move || {
            // Its reading after: on this thread, which does not have the level.
            assert!(with_thread(|thread| thread.end(id)).unwrap().is_none());
        })
        .join()
        .unwrap();
        // The next probed call of the first thread drops it.
        let next = with_thread(|thread| thread.push()).unwrap();
        assert_eq!(depth(), 1);
        assert!(with_thread(|thread| thread.end(next)).unwrap().is_some());
        assert_eq!(depth(), 0);
        assert_eq!(FAST.with(|fast| fast.state.get()), 0);
    }

    #[test]
    fn a_stale_call_that_filled_the_table_leaves_later_calls_exact() {
        let a = hooks::wrapper_over_libc();
        // A call that never ends on this thread (its block moved elsewhere and was lost).
        let stale = with_thread(|thread| thread.push()).unwrap();
        let mut blocks = Vec::new();
        for _ in 0..MAX_TABLE {
            blocks.push(call(a.malloc.unwrap(), &a, 8));
        }
        let (values, present) = measured(|| {
            let kept = call(a.malloc.unwrap(), &a, 300);
            let gone = call(a.malloc.unwrap(), &a, 700);
            free(&a, gone);
            blocks.push(kept);
        });
        assert_eq!(present, 0b1111);
        assert_eq!(values, [1000, 2, 300, 1000]);
        with_thread(|thread| thread.end(stale));
        for block in blocks {
            free(&a, block);
        }
    }
}
