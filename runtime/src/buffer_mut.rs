//! Writable buffers for large entry-method arguments, in the memory that transports send from
//! fastest.
//!
//! # What this module owns
//!
//! [`BufferMut`]: a zero-initialised byte buffer to fill, then to turn without a copy into the
//! [`Buffer`] an entry call carries. From [`HUGE_FROM`] bytes its memory is a mapping of 2 MiB
//! transparent huge pages ([`charmrs_transport::HugeRegion`]); smaller ones live on the heap.
//!
//! Why: between processes of one host, UCX and libfabric copy a large argument with one kernel
//! copy that pins the sender's pages one by one (CMA), and a 2 MiB page pins for about the price
//! of a 4 KiB one. Streams of 64 KiB – 1 MiB buffers carved out of huge pages ran 20–45 % faster
//! than from `Vec`s on our test machine (`docs/performance.md`, session 14). It is charmrs's
//! `MPI_Alloc_mem`; UCX's own benchmarks get the same from `ucp_mem_map`'s allocator.
//!
//! # Invariants
//!
//! * [`freeze`](BufferMut::freeze) never copies: the [`Buffer`]'s `Bytes` take the memory over,
//!   and it is freed (unmapped) when the last clone or slice of it is dropped, on any thread.
//! * A huge-page buffer's footprint is its length rounded up to whole 2 MiB pages. Smaller
//!   buffers that should sit on huge pages are slices of one larger buffer ([`Buffer::slice`]).
//! * Huge pages are advice to the kernel: where it has none to give, the same code runs on
//!   ordinary pages.

use std::fmt;
use std::ops::{Deref, DerefMut};

use bytes::Bytes;
use charmrs_transport::HugeRegion;

use crate::wire::Buffer;

/// Buffers of at least this many bytes are mapped on huge pages (below it a huge page would more
/// than double the footprint).
pub const HUGE_FROM: usize = 1 << 20;

/// A zeroed byte buffer to fill and send as a [`Buffer`] (see the module docs).
///
/// ```
/// use charmrs::{Buffer, BufferMut};
///
/// // One 4 MiB buffer on huge pages, filled in place, frozen without a copy...
/// let mut field = BufferMut::zeroed(4 << 20);
/// assert!(field.on_huge_pages());
/// field[..4].copy_from_slice(&[1, 2, 3, 4]);
/// let field: Buffer = field.freeze();
/// // ...and cut into the four 1 MiB halo buffers a step sends (slices share the memory).
/// let halos: Vec<Buffer> = (0..4).map(|i| field.slice(i << 20..(i + 1) << 20)).collect();
/// assert_eq!(&halos[0].0[..4], &[1, 2, 3, 4]);
/// assert_eq!(halos[3].0.len(), 1 << 20);
/// ```
pub struct BufferMut(Storage);

enum Storage {
    Heap(Vec<u8>),
    Huge(HugeRegion),
}

impl BufferMut {
    /// `len` zero bytes: on huge pages from [`HUGE_FROM`] bytes (on the heap if the system
    /// refuses the mapping), on the heap below.
    pub fn zeroed(len: usize) -> BufferMut {
        if len >= HUGE_FROM {
            if let Ok(region) = HugeRegion::zeroed(len) {
                return BufferMut(Storage::Huge(region));
            }
        }
        BufferMut(Storage::Heap(vec![0; len]))
    }

    /// A copy of `data` in a new buffer (see [`zeroed`](BufferMut::zeroed)).
    pub fn copy_from_slice(data: &[u8]) -> BufferMut {
        let mut buf = BufferMut::zeroed(data.len());
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
            Storage::Huge(region) => Bytes::from_owner(region),
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

    #[test]
    fn small_buffers_use_the_heap_and_large_ones_huge_pages() {
        assert!(!BufferMut::zeroed(HUGE_FROM - 1).on_huge_pages());
        assert!(BufferMut::zeroed(HUGE_FROM).on_huge_pages());
        assert!(!BufferMut::zeroed(0).on_huge_pages());
    }

    #[test]
    fn freezing_keeps_the_bytes_in_place() {
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

    #[test]
    fn slices_outlive_the_buffer_they_were_cut_from() {
        let whole = BufferMut::copy_from_slice(&vec![7u8; 2 * HUGE_FROM]).freeze();
        let tail = whole.slice(HUGE_FROM..);
        drop(whole);
        let tail = std::thread::spawn(move || tail).join().unwrap();
        assert_eq!(tail.0.len(), HUGE_FROM);
        assert!(tail.0.iter().all(|&b| b == 7));
    }
}
