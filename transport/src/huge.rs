//! Memory for large message buffers, backed by transparent huge pages.
//!
//! # What this module owns
//!
//! [`HugeRegion`]: an owned, writable, zero-initialised anonymous mapping
//! whose start is aligned to [`HUGE_PAGE`] and which the kernel is asked
//! (`madvise(MADV_HUGEPAGE)`) to back with 2 MiB pages.
//!
//! Why: the shared-memory transports copy a large message with one system
//! call that pins the *sender's* pages (Linux CMA, `process_vm_readv`, which
//! UCX and libfabric's `shm` provider use). Pinning a 2 MiB page costs about
//! what pinning one 4 KiB page does, so a stream of 256 KiB – 1 MiB
//! messages from a huge-page buffer runs 25–45 % faster on our test machine
//! (`docs/performance.md`, session 14). UCX's own `ucx_perftest` gets the
//! same from its allocator (`UCX_ALLOC_PRIO=thp`), MPI programs from
//! `MPI_Alloc_mem`.
//!
//! # Invariants
//!
//! * The mapping is `capacity()` bytes, a multiple of [`HUGE_PAGE`],
//!   starting at a multiple of [`HUGE_PAGE`]; the first `len()` of them are
//!   the region's contents. All of it is zeroed by the kernel at first touch.
//! * The region owns its mapping exclusively and unmaps it exactly once, on
//!   drop; slices handed out borrow from it.
//! * Huge pages are advice: where the kernel has transparent huge pages
//!   switched off (`/sys/kernel/mm/transparent_hugepage/enabled` = `never`)
//!   or cannot find a free 2 MiB page, the region is ordinary 4 KiB pages and
//!   everything still works.

use std::io;
use std::ptr::NonNull;

/// The huge-page size regions are aligned and rounded to: x86-64's, and
/// aarch64's with 4 KiB base pages (with 16 or 64 KiB base pages its huge
/// pages are larger and regions simply get base pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// See the module docs.
///
/// ```
/// use charmrs_transport::huge::{HugeRegion, HUGE_PAGE};
///
/// let mut region = HugeRegion::zeroed(3 << 20).unwrap();
/// assert_eq!(region.len(), 3 << 20);
/// assert_eq!(region.capacity(), 2 * HUGE_PAGE);
/// assert_eq!(region.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
/// region.as_mut_slice()[..5].copy_from_slice(b"hello");
/// assert_eq!(&region.as_slice()[..6], b"hello\0");
/// ```
#[derive(Debug)]
pub struct HugeRegion {
    start: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the region owns its mapping exclusively (no other pointer to it
// escapes except through borrows of `self`), so moving it to another thread
// or sharing `&HugeRegion` (read-only slices) is as safe as for a `Vec<u8>`.
unsafe impl Send for HugeRegion {}
// SAFETY: see `Send`; `&HugeRegion` only hands out `&[u8]`.
unsafe impl Sync for HugeRegion {}

impl HugeRegion {
    /// Maps `len` zeroed bytes (at least one huge page), 2 MiB-aligned and
    /// advised to huge pages. Fails when the system refuses the mapping (the
    /// `mmap` error: address space, or memory under strict overcommit);
    /// under Linux's default overcommit a shortage shows only when the pages
    /// are first touched, as for any large allocation.
    pub fn zeroed(len: usize) -> io::Result<HugeRegion> {
        let capacity = len
            .max(1)
            .checked_next_multiple_of(HUGE_PAGE)
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "region too large"))?;
        // One huge page more than needed, so an aligned start exists inside.
        // A slice may span at most isize::MAX bytes (`as_slice`): refuse larger regions, which a
        // 32-bit process could otherwise get mapped.
        let reserve = capacity
            .checked_add(HUGE_PAGE)
            .filter(|&r| r <= isize::MAX as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "region too large"))?;
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing touches no existing memory; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        let head = (base as usize).next_multiple_of(HUGE_PAGE) - base as usize;
        let tail = reserve - head - capacity;
        // SAFETY: `head < HUGE_PAGE` and `head + capacity <= reserve`, so both
        // offsets stay inside the mapping just made.
        let (start, end) = unsafe { (base.add(head), base.add(head + capacity)) };
        // SAFETY: `[base, start)` and `[end, base + reserve)` lie inside the
        // mapping just made and nothing refers to them; they are whole pages
        // (`base` is page-aligned, `start` and `end` 2 MiB-aligned).
        // Unmapping them leaves exactly `[start, end)`.
        unsafe {
            if head > 0 {
                let r = libc::munmap(base.cast(), head);
                debug_assert_eq!(r, 0, "munmap of the head");
            }
            if tail > 0 {
                let r = libc::munmap(end.cast(), tail);
                debug_assert_eq!(r, 0, "munmap of the tail");
            }
        }
        #[cfg(target_os = "linux")]
        // SAFETY: advice on a range this region owns; it changes how the
        // kernel backs the pages, never their contents. A failure (huge
        // pages compiled out) leaves ordinary pages, which is fine.
        unsafe {
            libc::madvise(start.cast(), capacity, libc::MADV_HUGEPAGE);
        }
        Ok(HugeRegion {
            start: NonNull::new(start).expect("a successful mapping is not at address 0"),
            len,
            capacity,
        })
    }

    /// Makes the content the first `len` bytes of the mapping (which keep
    /// whatever was written there before, or zero).
    ///
    /// # Panics
    ///
    /// If `len` exceeds [`capacity`](HugeRegion::capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "length {len} beyond the capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// Bytes of content (what [`zeroed`](HugeRegion::zeroed) was asked for).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the content is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes mapped: `len()` rounded up to whole huge pages.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The content.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `[start, start + len)` is mapped readable for the region's
        // lifetime, initialised (zero pages or bytes written through
        // `as_mut_slice`), and the borrow ties the slice to `self`.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }

    /// The content, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for HugeRegion {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for HugeRegion {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for HugeRegion {
    fn drop(&mut self) {
        // SAFETY: the region owns `[start, start + capacity)`, mapped in
        // `zeroed` and unmapped only here; no borrow outlives `self`.
        let r = unsafe { libc::munmap(self.start.as_ptr().cast(), self.capacity) };
        debug_assert_eq!(r, 0, "munmap of a region");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_aligned_rounded_zeroed_and_writable() {
        for len in [0, 1, 4096, HUGE_PAGE - 1, HUGE_PAGE, HUGE_PAGE + 1, 5 << 20] {
            let mut r = HugeRegion::zeroed(len).unwrap();
            assert_eq!(r.len(), len);
            assert_eq!(r.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
            assert!(r.capacity() >= len.max(1));
            assert_eq!(r.capacity() % HUGE_PAGE, 0);
            assert!(r.capacity() - len.max(1) < HUGE_PAGE);
            assert!(r.as_slice().iter().all(|&b| b == 0));
            r.as_mut_slice().iter_mut().for_each(|b| *b = 0xa5);
            assert!(r.as_slice().iter().all(|&b| b == 0xa5));
        }
    }

    #[test]
    fn the_length_moves_within_the_capacity_and_keeps_the_bytes() {
        let mut r = HugeRegion::zeroed(100).unwrap();
        r.as_mut_slice()[99] = 3;
        r.set_len(HUGE_PAGE);
        assert_eq!(r.as_slice()[99], 3);
        assert_eq!(r.as_slice()[HUGE_PAGE - 1], 0);
        r.set_len(10);
        assert_eq!(r.len(), 10);
        assert!(std::panic::catch_unwind(move || r.set_len(HUGE_PAGE + 1)).is_err());
    }

    #[test]
    fn regions_move_between_threads() {
        let mut r = HugeRegion::zeroed(1 << 20).unwrap();
        r.as_mut_slice()[12345] = 7;
        let r = std::thread::spawn(move || r).join().unwrap();
        assert_eq!(r.as_slice()[12345], 7);
    }

    #[test]
    fn an_impossible_size_is_an_error() {
        assert!(HugeRegion::zeroed(usize::MAX - 10).is_err());
    }
}
