//! Writable buffers for large entry-method arguments, in the memory that transports send from
//! fastest.
//!
//! # What this module owns
//!
//! [`BufferMut`]: a byte buffer to fill, then to turn without a copy into the [`Buffer`] an entry
//! call carries. From [`HUGE_FROM`] bytes its memory is a mapping of 2 MiB transparent huge pages
//! ([`charmrs_transport::HugeRegion`]); smaller ones live on the heap. A mapping whose last
//! `Buffer` view is dropped goes back to a per-process cache of idle mappings (at most
//! [`IDLE_HUGE_BYTES`]), from which the next buffer of the same size in huge pages is made.
//!
//! Why: between processes of one host, UCX and libfabric copy a large argument with one kernel
//! copy that pins the sender's pages one by one (CMA), and a 2 MiB page pins for about the price
//! of a 4 KiB one. Streams of 64 KiB – 1 MiB buffers carved out of huge pages ran 20–45 % faster
//! than from `Vec`s on our test machine (`docs/performance.md`, session 14). It is charmrs's
//! `MPI_Alloc_mem` (UCX's `ucx_perftest` gets huge pages from its allocator when told to,
//! `UCX_ALLOC_PRIO=thp`). The cache is why a program can make a fresh `BufferMut` every step:
//! a new 1 MiB buffer costs a 2 MiB page fault (made, filled and dropped: 92 µs against 16 µs
//! reused, `cargo bench -p charmrs-bench --bench buffers`).
//!
//! # Invariants
//!
//! * [`freeze`](BufferMut::freeze) never copies: the [`Buffer`]'s `Bytes` take the memory over,
//!   and it goes back to the cache (or is unmapped, or freed for a heap buffer) when the last
//!   clone or slice of it is dropped, on any thread.
//! * A huge-page buffer's footprint is its length rounded up to whole 2 MiB pages. Smaller
//!   buffers that should sit on huge pages are slices of one larger buffer ([`Buffer::slice`]).
//! * A mapping is reused only once nothing refers to it any more (no `Buffer`, slice or clone,
//!   including the ones a machine layer holds until its send completed), so a reused buffer never
//!   changes bytes someone can still read. The cache keeps the most recently returned mappings
//!   within its budget and unmaps the oldest.
//! * Huge pages are advice to the kernel: where it has none to give, the same code runs on
//!   ordinary pages.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use charmrs_transport::HugeRegion;

use crate::wire::Buffer;

/// Buffers of at least this many bytes are mapped on huge pages (below it a 2 MiB page would at
/// least double the footprint).
pub const HUGE_FROM: usize = 1 << 20;

/// Bytes of idle huge-page mappings a process keeps for reuse.
pub const IDLE_HUGE_BYTES: usize = 64 << 20;

/// The idle mappings, oldest first.
static IDLE: Mutex<Vec<HugeRegion>> = Mutex::new(Vec::new());

/// An idle mapping of the capacity `len` bytes need, most recently returned first.
fn reuse(len: usize) -> Option<HugeRegion> {
    let capacity = len
        .max(1)
        .checked_next_multiple_of(charmrs_transport::huge::HUGE_PAGE)?;
    let mut idle = IDLE.lock().unwrap_or_else(PoisonError::into_inner);
    let at = idle.iter().rposition(|r| r.capacity() == capacity)?;
    let mut region = idle.remove(at);
    drop(idle);
    region.set_len(len);
    Some(region)
}

/// Keeps `region` for reuse, unmapping the oldest idle ones beyond the budget (outside the lock).
fn give_back(region: HugeRegion) {
    if region.capacity() > IDLE_HUGE_BYTES {
        return;
    }
    let mut idle = IDLE.lock().unwrap_or_else(PoisonError::into_inner);
    let mut held: usize = idle.iter().map(HugeRegion::capacity).sum();
    let mut evicted = Vec::new();
    while held + region.capacity() > IDLE_HUGE_BYTES && !idle.is_empty() {
        let old = idle.remove(0);
        held -= old.capacity();
        evicted.push(old);
    }
    idle.push(region);
    drop(idle);
    drop(evicted);
}

/// The owner of a frozen huge-page buffer's memory: gives the mapping back when the last view of
/// it is dropped.
struct Returning(Option<HugeRegion>);

impl AsRef<[u8]> for Returning {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], HugeRegion::as_slice)
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some(region) = self.0.take() {
            give_back(region);
        }
    }
}

/// A byte buffer to fill and send as a [`Buffer`] (see the module docs).
///
/// ```
/// use charmrs::{Buffer, BufferMut};
///
/// // One 4 MiB buffer on huge pages, filled in place, frozen without a copy...
/// let mut field = BufferMut::for_overwrite(4 << 20);
/// assert!(field.on_huge_pages());
/// field[..4].copy_from_slice(&[1, 2, 3, 4]);
/// let field: Buffer = field.freeze();
/// // ...and cut into the four 1 MiB halo buffers a step sends (slices share the memory).
/// let halos: Vec<Buffer> = (0..4).map(|i| field.slice(i << 20..(i + 1) << 20)).collect();
/// assert_eq!(&halos[0].0[..4], &[1, 2, 3, 4]);
/// assert_eq!(halos[3].0.len(), 1 << 20);
/// // Once every slice is dropped, the next 4 MiB buffer reuses the mapping.
/// let at = halos[0].0.as_ptr();
/// drop((field, halos));
/// assert_eq!(BufferMut::for_overwrite(4 << 20).as_ptr(), at);
/// ```
pub struct BufferMut(Storage);

enum Storage {
    Heap(Vec<u8>),
    Huge(HugeRegion),
}

impl BufferMut {
    /// `len` zero bytes: on huge pages from [`HUGE_FROM`] bytes (an idle mapping zeroed, or a
    /// new one; on the heap if the system refuses the mapping), on the heap below.
    pub fn zeroed(len: usize) -> BufferMut {
        if len >= HUGE_FROM {
            if let Some(mut region) = reuse(len) {
                region.as_mut_slice().fill(0);
                return BufferMut(Storage::Huge(region));
            }
            // A new mapping, not `for_overwrite`: that looks for an idle one again, and one
            // given back meanwhile by another thread holds an earlier buffer's bytes.
            if let Ok(region) = HugeRegion::zeroed(len) {
                return BufferMut(Storage::Huge(region));
            }
        }
        BufferMut(Storage::Heap(vec![0; len]))
    }

    /// `len` bytes that the caller will overwrite: like [`zeroed`](BufferMut::zeroed), but an
    /// idle huge-page mapping is reused as it is, holding an earlier buffer's bytes (initialised
    /// memory, so reading it is safe, only meaningless). The fastest way to make a buffer every
    /// step.
    pub fn for_overwrite(len: usize) -> BufferMut {
        if len >= HUGE_FROM {
            if let Some(region) = reuse(len).or_else(|| HugeRegion::zeroed(len).ok()) {
                return BufferMut(Storage::Huge(region));
            }
        }
        BufferMut(Storage::Heap(vec![0; len]))
    }

    /// A new buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> BufferMut {
        let mut buf = BufferMut::for_overwrite(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Whether the memory is a huge-page mapping (which the kernel backs with huge pages where it
    /// can).
    pub fn on_huge_pages(&self) -> bool {
        matches!(self.0, Storage::Huge(_))
    }

    /// The bytes as a [`Buffer`] to send, without a copy.
    pub fn freeze(self) -> Buffer {
        Buffer(match self.0 {
            Storage::Heap(v) => Bytes::from(v),
            Storage::Huge(region) => Bytes::from_owner(Returning(Some(region))),
        })
    }
}

impl Deref for BufferMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Storage::Heap(v) => v,
            Storage::Huge(r) => r.as_slice(),
        }
    }
}

impl DerefMut for BufferMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Storage::Heap(v) => v,
            Storage::Huge(r) => r.as_mut_slice(),
        }
    }
}

impl AsRef<[u8]> for BufferMut {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for BufferMut {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl From<BufferMut> for Buffer {
    fn from(buf: BufferMut) -> Buffer {
        buf.freeze()
    }
}

impl fmt::Debug for BufferMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferMut")
            .field("len", &self.len())
            .field("on_huge_pages", &self.on_huge_pages())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mapping cache is per process and tests run in parallel: a test that returns large
    /// mappings evicts the ones another test expects back. Every test here holds this lock.
    static CACHE: Mutex<()> = Mutex::new(());

    fn cache_to_myself() -> std::sync::MutexGuard<'static, ()> {
        CACHE.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[test]
    fn small_buffers_use_the_heap_and_large_ones_huge_pages() {
        let _cache = cache_to_myself();
        assert!(!BufferMut::zeroed(HUGE_FROM - 1).on_huge_pages());
        assert!(BufferMut::zeroed(HUGE_FROM).on_huge_pages());
        assert!(!BufferMut::zeroed(0).on_huge_pages());
    }

    #[test]
    fn freezing_keeps_the_bytes_in_place() {
        let _cache = cache_to_myself();
        for len in [0, 100, HUGE_FROM, 3 * HUGE_FROM + 5] {
            let mut buf = BufferMut::zeroed(len);
            assert!(buf.iter().all(|&b| b == 0));
            buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            let at = buf.as_ptr();
            let frozen = buf.freeze();
            assert_eq!(frozen.0.len(), len);
            assert_eq!(frozen.0.as_ptr(), at, "no copy");
            assert!(frozen.0.iter().enumerate().all(|(i, &b)| b == i as u8));
        }
    }

    /// `zeroed` never hands out an idle mapping unzeroed, even when another thread gives one
    /// back between its lookup and its fallback (it used to fall back to `for_overwrite`, which
    /// looked again and returned that mapping as it was).
    #[test]
    fn zeroed_buffers_are_zero_while_another_thread_recycles_mappings() {
        let _cache = cache_to_myself();
        // A size no other test uses (the cache is per process).
        let len = (3 << 20) + 12_345;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let recycler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut dirty = BufferMut::for_overwrite(len);
                    dirty.fill(0xab);
                    drop(dirty.freeze());
                }
            })
        };
        let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while std::time::Instant::now() < until {
            let clean = BufferMut::zeroed(len);
            assert!(
                clean.iter().all(|&b| b == 0),
                "a zeroed buffer held old bytes"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        recycler.join().expect("the recycling thread");
    }

    #[test]
    fn mappings_are_reused_only_once_every_view_is_gone() {
        let _cache = cache_to_myself();
        // A size no other test uses (the cache is per process).
        let len = (7 << 20) + 3;
        let mut a = BufferMut::for_overwrite(len);
        a.fill(9);
        let a = a.freeze();
        let at = a.0.as_ptr();
        let tail = a.slice(len - 1..);
        drop(a);
        let b = BufferMut::zeroed(len);
        assert_ne!(b.as_ptr(), at, "a slice still refers to the first mapping");
        assert!(b.iter().all(|&x| x == 0));
        drop(tail);
        let c = BufferMut::for_overwrite(len);
        assert_eq!(c.as_ptr(), at, "the first mapping, back in the cache");
        assert_eq!(c[len - 1], 9, "for_overwrite keeps the bytes");
        drop(c);
        let d = BufferMut::zeroed(len);
        assert!(d.iter().all(|&x| x == 0), "zeroed clears a reused mapping");
    }

    #[test]
    fn the_cache_keeps_its_budget() {
        let _cache = cache_to_myself();
        let len = (IDLE_HUGE_BYTES / 4) + 1; // more than a quarter of the budget each
        let bufs: Vec<_> = (0..8)
            .map(|_| BufferMut::for_overwrite(len).freeze())
            .collect();
        drop(bufs);
        let held: usize = IDLE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(HugeRegion::capacity)
            .sum();
        assert!((len..=IDLE_HUGE_BYTES).contains(&held), "{held} idle bytes");
    }

    #[test]
    fn slices_outlive_the_buffer_they_were_cut_from() {
        let _cache = cache_to_myself();
        let whole = BufferMut::from_slice(&vec![7u8; 2 * HUGE_FROM]).freeze();
        let tail = whole.slice(HUGE_FROM..);
        drop(whole);
        let tail = std::thread::spawn(move || tail).join().unwrap();
        assert_eq!(tail.0.len(), HUGE_FROM);
        assert!(tail.0.iter().all(|&b| b == 7));
    }
}
