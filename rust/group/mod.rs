//! A process group's shared state (multiprocess mode): the series of every process of a
//! service (its workers, the children it forks per job) in one shared memory segment, so
//! any of them can read the whole group's numbers and none is lost when a process exits or
//! is killed.
//!
//! * [`segment`]: the file in `/dev/shm` and its mapping, at the same address in every
//!   member, so the pointers inside the members' histograms mean the same in each;
//! * [`lock`]: the group's robust, process-shared mutex (a holder that dies leaves it
//!   recoverable, never stuck);
//! * [`arena`]: where the members' series are allocated (the crate's global allocator
//!   serves shared scopes from this process's arena);
//! * [`member`]: this process's slot, and the directory naming its series;
//! * [`collect`]: the group's numbers, summed, with the totals of members that are gone;
//! * [`wire`]: identities and snapshots as bytes;
//! * [`liveness`]: whether a process is the one a member slot names (PIDs are reused).

pub mod arena;
pub mod collect;
pub mod liveness;
pub mod lock;
pub mod member;
pub mod segment;
pub mod wire;
