//! The process's heap policy for message-sized allocations.
//!
//! # What this module owns
//!
//! [`keep_freed_message_memory`]: one process-wide setting of glibc's allocator, made by the
//! runtime when a job starts, so that buffers of up to [`MMAP_THRESHOLD`] bytes freed by one
//! message are reused by the next instead of going back to the kernel.
//!
//! # Why
//!
//! A job that receives, combines and drops large messages in a loop allocates and frees the
//! same sizes over and over, each on the PE thread that handles them, so in that thread's
//! glibc arena. glibc hands a freed block at the top of an arena back to the kernel
//! (`madvise(MADV_DONTNEED)`) once the free space there exceeds its trim threshold, 128 KiB
//! unless a large block was once `mmap`ped and freed (glibc then raises both thresholds, but
//! only then: whether that happens depends on the order of earlier allocations). Every reuse
//! then faults the pages in again, zeroed by the kernel: a 1 MiB sum of vectors between two
//! processes over TCP took 2.0 ms instead of 0.4–0.5 ms, a 4 MiB one 9.5 ms instead of 2.6–3.0
//! (`docs/performance.md`, session 28). MPI libraries make the same choice for their
//! registration caches (OpenMPI's `leave_pinned` turns trimming off altogether).
//!
//! # Invariants
//!
//! * Applied at most once per process, before any PE starts, and never when the user set
//!   glibc's own variables for these thresholds (`MALLOC_TRIM_THRESHOLD_`,
//!   `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`, `MALLOC_MMAP_MAX_`, a `glibc.malloc.` setting
//!   in `GLIBC_TUNABLES`) or `CHARMRS_MALLOC_TUNING=0`: the user's choice wins.
//! * It governs glibc's allocator only: a program with another `#[global_allocator]`
//!   (jemalloc, mimalloc) keeps that allocator's own policy (the setting is then made and
//!   unused).
//! * Only glibc on Linux; elsewhere nothing is done.
//! * The cost is memory the process keeps: up to [`TRIM_THRESHOLD`] bytes of free heap per
//!   arena (glibc keeps a few arenas per core) instead of returning it at once.

use std::sync::OnceLock;

/// Allocations from this size are `mmap`ped (and unmapped when freed), as before; smaller ones
/// come from the arenas. The largest value glibc accepts (half the heap size of an arena that is
/// not the main one): 32 MiB on 64-bit targets, 16 MiB on 32-bit ones.
pub const MMAP_THRESHOLD: usize = (4 << 20) * std::mem::size_of::<usize>();

/// Free space at the top of an arena up to this size is kept for reuse (twice
/// [`MMAP_THRESHOLD`], the ratio glibc itself uses when it raises the two).
pub const TRIM_THRESHOLD: usize = 2 * MMAP_THRESHOLD;

/// What [`keep_freed_message_memory`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocatorPolicy {
    /// The thresholds were set to [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`].
    Applied,
    /// The user tuned glibc's thresholds (see [`keep_freed_message_memory`]) or set
    /// `CHARMRS_MALLOC_TUNING=0`.
    LeftToUser,
    /// Not glibc on Linux, or glibc refused a setting.
    Unavailable,
}

/// glibc's variables for what this module sets, or that change how freed memory is returned:
/// any of them set means the user chose the allocator's policy.
const GLIBC_TUNING: [&str; 4] = [
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
];

/// Whether the user chose the allocator's policy: one of [`GLIBC_TUNING`], a `glibc.malloc.`
/// setting in `GLIBC_TUNABLES` (others, such as `glibc.pthread.rseq`, do not count), or
/// `CHARMRS_MALLOC_TUNING=0`.
fn user_tuned() -> bool {
    GLIBC_TUNING.iter().any(|v| std::env::var_os(v).is_some())
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
        || std::env::var_os("CHARMRS_MALLOC_TUNING").is_some_and(|v| v == "0")
}

/// Keeps freed message-sized memory in the process for reuse (see the module docs); the
/// first call decides, later calls return the same answer.
///
/// ```
/// use charmrs_transport::allocator::{keep_freed_message_memory, AllocatorPolicy};
///
/// let policy = keep_freed_message_memory();
/// assert_eq!(policy, keep_freed_message_memory()); // decided once
/// if cfg!(all(target_os = "linux", target_env = "gnu")) {
///     assert_ne!(policy, AllocatorPolicy::Unavailable);
/// }
/// ```
pub fn keep_freed_message_memory() -> AllocatorPolicy {
    static DONE: OnceLock<AllocatorPolicy> = OnceLock::new();
    *DONE.get_or_init(|| {
        if user_tuned() {
            AllocatorPolicy::LeftToUser
        } else {
            apply()
        }
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> AllocatorPolicy {
    // SAFETY: `mallopt` only changes the allocator's parameters (under its own lock); both
    // values are in the ranges glibc documents (the mmap threshold at most half an arena's heap).
    let set = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    };
    if set {
        AllocatorPolicy::Applied
    } else {
        AllocatorPolicy::Unavailable
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> AllocatorPolicy {
    AllocatorPolicy::Unavailable
}
