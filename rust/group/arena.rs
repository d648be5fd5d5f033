//! Allocation in this process's arena of the group's segment, through the crate's global
//! allocator ([`SharedFirst`]): inside a [`shared`] scope (making a series, or the parts a
//! series makes later), blocks come from the arena, so the other members can read them;
//! everywhere else, and whenever the arena cannot serve, from the system allocator. A block
//! is freed where it came from, told by its address.
//!
//! Only the owner allocates in its arena, so the bookkeeping (a bump pointer and a free
//! list per size class) is private to the process. Memory is made real (`fallocate`) a
//! megabyte at a time before it is handed out: a full `/dev/shm` makes an allocation fall
//! back to the system allocator, never a write fault.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The segment's address range, and this process's arena in it (0..0: none).
static SEGMENT_START: AtomicUsize = AtomicUsize::new(0);
static SEGMENT_END: AtomicUsize = AtomicUsize::new(0);
static OWN_START: AtomicUsize = AtomicUsize::new(0);
static OWN_END: AtomicUsize = AtomicUsize::new(0);

/// Size classes: powers of two from 16 bytes to 64 KiB; larger blocks are not shared.
const MIN_CLASS: usize = 4;
const CLASSES: usize = 13;
const MAX_BLOCK: usize = 1 << (MIN_CLASS + CLASSES - 1);
/// What is made real at a time.
const BACKING_STEP: usize = 1 << 20;

struct Bookkeeping {
    /// Next unused byte, and the end of what is backed.
    next: usize,
    backed: usize,
    /// Heads of the free lists (each free block holds the address of the next).
    free: [usize; CLASSES],
    /// Makes `bytes` at an address real memory (the segment's `fallocate`).
    back: Option<fn(usize, usize) -> bool>,
}

/// The bookkeeping, behind a spin lock rather than a mutex: a fork child resets it (a
/// thread of the parent may have held it at the fork), which a mutex does not allow.
struct Book {
    locked: AtomicBool,
    book: UnsafeCell<Bookkeeping>,
}

// SAFETY: `book` is only touched while `locked` is held (see `Book::with`).
unsafe impl Sync for Book {}

static BOOKKEEPING: Book = Book {
    locked: AtomicBool::new(false),
    book: UnsafeCell::new(Bookkeeping {
        next: 0,
        backed: 0,
        free: [0; CLASSES],
        back: None,
    }),
};

impl Book {
    fn with<T>(&self, f: impl FnOnce(&mut Bookkeeping) -> T) -> T {
        while self.locked.swap(true, Ordering::Acquire) {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held; nothing inside `f` allocates (no re-entry).
        let result = f(unsafe { &mut *self.book.get() });
        self.locked.store(false, Ordering::Release);
        result
    }
}

thread_local! {
    /// Inside [`shared`]: allocations go to the arena.
    static SHARED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `make` with this thread's allocations in the arena (when there is one).
pub fn shared<T>(make: impl FnOnce() -> T) -> T {
    if OWN_END.load(Ordering::Relaxed) == 0 {
        return make();
    }
    let before = SHARED.with(|flag| flag.replace(true));
    let made = make();
    SHARED.with(|flag| flag.set(before));
    made
}

/// Runs `make` with allocations in the arena if `near` (the owner of what `make` makes)
/// lives there: what a shared series allocates later is shared too.
#[inline]
pub fn near<T>(near: *const u8, make: impl FnOnce() -> T) -> T {
    if owns(near as usize) {
        shared(make)
    } else {
        make()
    }
}

/// Whether `address` lies in this process's arena.
#[inline(always)]
pub fn owns(address: usize) -> bool {
    address >= OWN_START.load(Ordering::Relaxed) && address < OWN_END.load(Ordering::Relaxed)
}

/// Whether this process has an arena (it is a member of a group).
#[inline(always)]
pub fn owns_any() -> bool {
    OWN_END.load(Ordering::Relaxed) != 0
}

/// Whether this process is a group's member and `address` (a series) is not in its arena:
/// a series a fork child inherited from its parent, or one made before the process joined.
/// Always false (one load) outside a group.
#[inline(always)]
pub fn is_foreign(address: usize) -> bool {
    owns_any() && !owns(address)
}

/// Whether `address` lies anywhere in the segment.
#[inline(always)]
pub fn in_segment(address: usize) -> bool {
    address >= SEGMENT_START.load(Ordering::Relaxed)
        && address < SEGMENT_END.load(Ordering::Relaxed)
}

/// Where the segment starts in this process (0: none).
pub fn segment_start() -> usize {
    SEGMENT_START.load(Ordering::Relaxed)
}

/// Where the segment is (set once, when this process maps it).
pub fn set_segment(start: usize, end: usize) {
    SEGMENT_START.store(start, Ordering::Relaxed);
    SEGMENT_END.store(end, Ordering::Relaxed);
}

/// Makes `[start, end)` this process's arena, `back` making its pages real; `used` bytes at
/// its start are taken already. `None`: no arena (a fork child until it joins).
pub fn set_own(arena: Option<(usize, usize)>, back: fn(usize, usize) -> bool) {
    let (start, end) = arena.unwrap_or((0, 0));
    BOOKKEEPING.with(|book| {
        *book = Bookkeeping {
            next: start,
            backed: start,
            free: [0; CLASSES],
            back: Some(back),
        };
    });
    OWN_START.store(start, Ordering::Relaxed);
    OWN_END.store(end, Ordering::Relaxed);
}

/// In a fork child (its atfork handler: atomics only): the arena is the parent's, not
/// ours, and no other thread is left to hold the lock. Returns the parent's arena and
/// where its use of it ended (`None`: it had none).
pub fn forget_own_after_fork() -> Option<(usize, usize, usize)> {
    let (start, end) = (
        OWN_START.swap(0, Ordering::Relaxed),
        OWN_END.swap(0, Ordering::Relaxed),
    );
    BOOKKEEPING.locked.store(false, Ordering::Release);
    // SAFETY: the only thread of a just-forked child, the lock freed above: nothing else
    // reads or writes the bookkeeping.
    let used_end = unsafe { (*BOOKKEEPING.book.get()).next };
    (end != 0).then_some((start, end, used_end))
}

fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS);
    if size > MAX_BLOCK {
        return None;
    }
    Some(size.next_power_of_two().trailing_zeros() as usize - MIN_CLASS)
}

fn allocate(layout: Layout) -> Option<*mut u8> {
    let class = class_of(layout)?;
    if OWN_END.load(Ordering::Relaxed) == 0 {
        return None;
    }
    BOOKKEEPING.with(|book| take(book, class))
}

fn take(book: &mut Bookkeeping, class: usize) -> Option<*mut u8> {
    let size = 1usize << (class + MIN_CLASS);
    let end = OWN_END.load(Ordering::Relaxed);
    if end == 0 {
        return None;
    }
    let head = book.free[class];
    if head != 0 {
        // SAFETY: a free block of this class in our arena holds the next one's address.
        book.free[class] = unsafe { (head as *const usize).read() };
        return Some(head as *mut u8);
    }
    // Blocks are aligned to their size (power of two), so any alignment up to it holds.
    let start = book.next.checked_add(size - 1)? & !(size - 1);
    let stop = start.checked_add(size)?;
    if stop > end {
        return None;
    }
    if stop > book.backed {
        let grow_to = (stop + BACKING_STEP - 1) & !(BACKING_STEP - 1);
        let grow_to = grow_to.min(end);
        let back = book.back?;
        if !back(book.backed, grow_to - book.backed) {
            return None;
        }
        book.backed = grow_to;
    }
    book.next = stop;
    Some(start as *mut u8)
}

fn release(block: *mut u8, layout: Layout) {
    let Some(class) = class_of(layout) else {
        return;
    };
    BOOKKEEPING.with(|book| {
        // SAFETY: the block is ours, free now, and at least a word long.
        unsafe { (block as *mut usize).write(book.free[class]) };
        book.free[class] = block as usize;
    });
}

/// Blocks a shared scope asked for that the arena could not serve (full, or no room in
/// `/dev/shm`): made on the heap, where the group's readers cannot see them.
static UNSERVED: AtomicUsize = AtomicUsize::new(0);

#[cold]
fn unserved() {
    if owns_any() {
        UNSERVED.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn unserved_blocks() -> usize {
    UNSERVED.load(Ordering::Relaxed)
}

/// The crate's global allocator: the arena inside [`shared`] scopes, the system's elsewhere.
pub struct SharedFirst;

// SAFETY: every block is served by exactly one of the two allocators and returned to it,
// told apart by its address; the arena's blocks are aligned to their (power of two) size.
unsafe impl GlobalAlloc for SharedFirst {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if SHARED.try_with(Cell::get).unwrap_or(false) {
            if let Some(block) = allocate(layout) {
                return block;
            }
            unserved();
        }
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if SHARED.try_with(Cell::get).unwrap_or(false) {
            if let Some(block) = allocate(layout) {
                // SAFETY: a block of at least `layout.size()` bytes, ours.
                unsafe { block.write_bytes(0, layout.size()) };
                return block;
            }
            unserved();
        }
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let address = block as usize;
        if in_segment(address) {
            // Ours goes back on a free list; another member's (a fork child's inherited
            // blocks) or a graveyard's is not ours to free.
            if owns(address) {
                release(block, layout);
            }
            return;
        }
        // SAFETY: not in the segment, so the system allocator's.
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_segment(block as usize) {
            // SAFETY: the system allocator's block, resized by it.
            return unsafe { System.realloc(block, layout, new_size) };
        }
        // SAFETY: `new_size` with the block's alignment is a valid layout (the caller's
        // contract for realloc).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: allocate, copy what fits, free the old one.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
            moved
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arena in a private anonymous mapping (the tests of the allocator need no file).
    fn private_arena() -> (usize, usize) {
        const BYTES: usize = 8 << 20;
        // SAFETY: a fresh private anonymous mapping, never unmapped.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        (start, start + BYTES)
    }

    #[test]
    fn blocks_made_in_a_shared_scope_live_in_the_arena_and_come_back() {
        // The arena statics are the whole process's: while they were set here, the other
        // tests' threads made their series in this arena, and freed them into the system
        // allocator once it was unset ("free(): invalid pointer"). A child of its own.
        // SAFETY: the child runs the test and leaves without unwinding.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let passed = std::panic::catch_unwind(the_arena_serves_shared_scopes).is_ok();
            // SAFETY: leave at once.
            unsafe { libc::_exit(if passed { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the test failed in its child: {status:#x}"
        );
    }

    fn the_arena_serves_shared_scopes() {
        let (start, end) = private_arena();
        set_segment(start, end);
        set_own(Some((start, end)), |_, _| true);
        let inside = shared(|| Box::new([7u64; 20]));
        let address = &*inside as *const _ as usize;
        assert!(owns(address), "{address:#x} not in {start:#x}..{end:#x}");
        let outside = Box::new([7u64; 20]);
        assert!(!owns(&*outside as *const _ as usize));
        // A shared block's own later allocations follow it into the arena.
        let later = near(address as *const u8, || Box::new(1u32));
        assert!(owns(&*later as *const _ as usize));
        drop(inside);
        // Freed to its class's list: the next block of that class is the same one.
        let again = shared(|| Box::new([8u64; 20]));
        assert_eq!(&*again as *const _ as usize, address);
        // A block too big for the arena comes from the system allocator.
        let big = shared(|| vec![0u8; MAX_BLOCK + 1]);
        assert!(!owns(big.as_ptr() as usize));
        // Alignment up to the class size holds.
        #[repr(align(4096))]
        struct Page(#[allow(dead_code)] [u8; 4096]);
        let page = shared(|| Box::new(Page([0; 4096])));
        assert_eq!(&*page as *const _ as usize % 4096, 0);
        assert!(owns(&*page as *const _ as usize));
        // Without an arena, everything is the system's.
        set_own(None, |_, _| true);
        let plain = shared(|| Box::new(5u8));
        assert!(!owns(&*plain as *const _ as usize));
        drop((again, later, page));
        set_segment(0, 0);
    }
}
