//! Reusable receive buffers for the large messages of a machine layer.
//!
//! # What this module owns
//!
//! [`RecvPool`]: buffers that a layer receives large messages into (a
//! rendezvous read, or a copy out of the transport's own receive buffer),
//! handed to the runtime as [`Bytes`] that give the buffer back to the pool
//! when the last view of it is dropped, on whatever thread.
//!
//! Why: a fresh multi-megabyte allocation is page-faulted (and zeroed by
//! the kernel) on first touch, which costs more than moving the bytes; so
//! do smaller ones when the allocator gives a burst of them back to the
//! kernel and takes them again for the next burst. A reused buffer is
//! mapped already, and stays registered in the transport's registration
//! cache where there is one.
//!
//! # Invariants
//!
//! * Size classes are the powers of two from the pool's smallest class to
//!   [`MAX_CLASS`]; classes from [`SLACK_FROM`] have [`SLACK`] bytes more,
//!   so a large buffer sent beside a call's arguments (1 MiB and 40 bytes,
//!   say) takes a buffer of 1 MiB + 4 KiB, not one of 2 MiB. Larger
//!   requests are plain allocations (with [`COPY_ALIGN`] bytes of room), never kept.
//! * A buffer is lent to one message at a time: it comes back only from
//!   the drop of the last `Bytes` view, and only that message's length of
//!   it is ever exposed; the rest holds whatever earlier messages left.
//! * At most the pool's budget of idle bytes is kept, and at most
//!   [`CLASS_BUFFERS`] idle buffers per class. A returned buffer that would
//!   exceed the budget first evicts idle buffers of *other* classes,
//!   largest first: the class coming back is the one in use, and a stream
//!   of one size must not find the budget held by the sizes before it (every
//!   buffer of its own would then be freed and faulted in anew). It is
//!   freed only when its own class fills the budget.
//! * The pool never blocks and never fails: an empty class allocates.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::Bytes;

/// The granule a transport aligns a receive buffer to its source by
/// ([`PoolBuf::aligned_offset`]): a cache line, within which the kernel's
/// copy between co-aligned buffers is ~10 % faster than between others.
pub const COPY_ALIGN: usize = 64;

/// Largest power of two with a class; larger buffers are not kept.
pub const MAX_CLASS: usize = 64 << 20;
/// Classes from this power of two have [`SLACK`] bytes more.
pub const SLACK_FROM: usize = 64 << 10;
/// See [`SLACK_FROM`].
pub const SLACK: usize = 4 << 10;
/// Idle buffers kept per class at most (bounds the small classes: 4 MiB of
/// 4 KiB buffers).
pub const CLASS_BUFFERS: usize = 1024;

/// Bytes of the buffers of the class whose power of two is `pow`.
fn class_len(pow: usize) -> usize {
    if pow >= SLACK_FROM {
        pow + SLACK
    } else {
        pow
    }
}

/// See the module docs.
///
/// ```
/// use charmrs_transport::pool::RecvPool;
///
/// let pool = RecvPool::new(4096, 64 << 20);
/// let mut buf = pool.take(100_000);
/// buf.as_mut_slice()[..5].copy_from_slice(b"hello");
/// let message = buf.into_bytes(100_000);
/// assert_eq!(&message[..5], b"hello");
/// drop(message); // the buffer goes back to the pool
/// assert!(pool.idle_bytes() >= 100_000);
/// ```
pub struct RecvPool {
    min_class: usize,
    max_idle: usize,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// `classes[i]`: idle buffers of the class of power `min_class << i`.
    classes: Vec<Vec<Vec<u8>>>,
    bytes: usize,
}

/// A buffer lent by a [`RecvPool`]: fill it, then turn it into the
/// message's [`Bytes`] with [`into_bytes`](PoolBuf::into_bytes). Dropped
/// unused, it goes back to the pool.
pub struct PoolBuf {
    buf: Vec<u8>,
    /// The pool and class it returns to (none for a plain allocation).
    home: Option<(Weak<RecvPool>, usize)>,
}

impl RecvPool {
    /// A pool whose smallest class is `min_class` bytes (rounded up to a
    /// power of two, at most [`MAX_CLASS`]; smaller requests get a buffer of
    /// that size) and which keeps at most `max_idle_bytes` of idle buffers.
    pub fn new(min_class: usize, max_idle_bytes: usize) -> Arc<RecvPool> {
        Arc::new(RecvPool {
            // Clamped first: `next_power_of_two` of a value above 2^63 wraps to 0 in release
            // builds, and a class of 0 bytes would never grow.
            min_class: min_class.clamp(1, MAX_CLASS).next_power_of_two(),
            max_idle: max_idle_bytes,
            idle: Mutex::new(Idle::default()),
        })
    }

    /// The class for `len` bytes and the size of its buffers.
    fn class_for(&self, len: usize) -> Option<(usize, usize)> {
        let mut pow = self.min_class;
        let mut class = 0;
        while pow <= MAX_CLASS {
            if len <= class_len(pow) {
                return Some((class, class_len(pow)));
            }
            pow *= 2;
            class += 1;
        }
        None
    }

    /// A buffer of at least `len` bytes, all initialised.
    pub fn take(self: &Arc<Self>, len: usize) -> PoolBuf {
        let Some((class, size)) = self.class_for(len) else {
            // Room to place the data at any offset within a cache line, as the classes
            // from SLACK_FROM have (`aligned_offset`).
            return PoolBuf {
                buf: vec![0u8; len.saturating_add(COPY_ALIGN)],
                home: None,
            };
        };
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let got = idle.classes.get_mut(class).and_then(Vec::pop);
            if got.is_some() {
                idle.bytes -= size;
            }
            got
        };
        PoolBuf {
            buf: reused.unwrap_or_else(|| vec![0u8; size]),
            home: Some((Arc::downgrade(self), class)),
        }
    }

    /// Bytes of the idle buffers the pool keeps.
    pub fn idle_bytes(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
    }

    fn give_back(&self, class: usize, buf: Vec<u8>) {
        let size = buf.len();
        if size > self.max_idle {
            return;
        }
        // Freed once the lock is released.
        let mut evicted = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.classes.len() <= class {
            idle.classes.resize_with(class + 1, Vec::new);
        }
        let own = idle.classes[class].len();
        if own >= CLASS_BUFFERS || (own + 1) * size > self.max_idle {
            return; // its own class is full, or would fill the budget
        }
        while idle.bytes + size > self.max_idle {
            let Some(other) = (0..idle.classes.len())
                .rev()
                .find(|&c| c != class && !idle.classes[c].is_empty())
            else {
                return; // not reached: its own class leaves room for it (checked above)
            };
            if let Some(b) = idle.classes[other].pop() {
                idle.bytes -= b.len();
                evicted.push(b);
            }
        }
        idle.bytes += size;
        idle.classes[class].push(buf);
        drop(idle);
        drop(evicted);
    }
}

impl PoolBuf {
    /// The whole buffer (at least the length asked for), to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The buffer's start, for a transport to write into (a remote read)
    /// without forming a reference to its bytes; valid while the `PoolBuf`
    /// lives and is not moved out of by [`into_bytes`](PoolBuf::into_bytes).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr()
    }

    /// The buffer's size in bytes (at least the length asked for).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the buffer has no bytes (only when 0 bytes were asked for
    /// and the pool has no class).
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Where in this buffer `len` bytes should start to sit at the same
    /// address modulo `align` as `addr` (a transport's source: a kernel copy
    /// between co-aligned buffers is faster), or 0 when they would not fit
    /// there. `align` is a power of two.
    pub fn aligned_offset(&self, len: usize, addr: usize, align: usize) -> usize {
        debug_assert!(align.is_power_of_two());
        let here = self.buf.as_ptr() as usize;
        let offset = addr.wrapping_sub(here) & (align - 1);
        match offset.checked_add(len) {
            Some(end) if end <= self.buf.len() => offset,
            _ => 0,
        }
    }

    /// The first `len` bytes as shared [`Bytes`]; the buffer returns to the
    /// pool when the last view is dropped.
    ///
    /// # Panics
    ///
    /// If `len` exceeds [`len`](PoolBuf::len).
    pub fn into_bytes(self, len: usize) -> Bytes {
        self.into_bytes_at(0, len)
    }

    /// The `len` bytes from `offset` as shared [`Bytes`] (for data a
    /// transport placed at an offset, e.g. aligned like its source); the
    /// buffer returns to the pool when the last view is dropped.
    ///
    /// # Panics
    ///
    /// If `offset + len` exceeds [`len`](PoolBuf::len).
    pub fn into_bytes_at(self, offset: usize, len: usize) -> Bytes {
        Bytes::from_owner(self).slice(offset..offset + len)
    }
}

// The Debug impls show sizes and counts only: a pool keeps up to its budget of idle bytes (and
// a buffer holds a message), which a derived impl would print byte by byte.

impl std::fmt::Debug for RecvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("RecvPool");
        d.field("min_class", &self.min_class)
            .field("max_idle", &self.max_idle);
        // `try_lock`: formatting must not wait for (or deadlock with) a thread giving a buffer
        // back.
        match self.idle.try_lock() {
            Ok(idle) => d.field("idle", &*idle),
            Err(std::sync::TryLockError::Poisoned(p)) => d.field("idle", &*p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => d.field("idle", &"<locked>"),
        };
        d.finish()
    }
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_class: Vec<usize> = self.classes.iter().map(Vec::len).collect();
        f.debug_struct("Idle")
            .field("bytes", &self.bytes)
            .field("buffers_per_class", &per_class)
            .finish()
    }
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuf")
            .field("len", &self.buf.len())
            .field("class", &self.home.as_ref().map(|(_, class)| *class))
            .finish()
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some((pool, class)) = self.home.take() {
            if let Some(pool) = pool.upgrade() {
                pool.give_back(class, std::mem::take(&mut self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_smallest_classes_are_clamped() {
        for min in [0, usize::MAX, (1 << 63) + 1, MAX_CLASS + 1] {
            let pool = RecvPool::new(min, 64 << 20);
            assert!(pool.take(10).len() >= 10, "min_class {min}");
            assert!(
                pool.take(MAX_CLASS + 1).len() > MAX_CLASS,
                "min_class {min}"
            );
        }
    }

    #[test]
    fn buffers_come_back_after_the_last_view_and_are_reused() {
        let pool = RecvPool::new(4096, 64 << 20);
        let mut a = pool.take(100_000);
        assert_eq!(a.len(), (128 << 10) + SLACK);
        let p = a.as_mut_slice().as_mut_ptr();
        a.as_mut_slice()[0] = 7;
        let b = a.into_bytes(100_000);
        assert_eq!((b.len(), b[0]), (100_000, 7));
        let tail = b.slice(10..);
        drop(b);
        let c = pool.take(90_000);
        assert_ne!(c.buf.as_ptr(), p as *const u8, "still in use by `tail`");
        drop(tail);
        let mut d = pool.take(70_000);
        assert_eq!(
            d.as_mut_slice().as_mut_ptr(),
            p,
            "reused once the last view dropped"
        );
    }

    #[test]
    fn aligned_offsets_match_the_source_and_fit() {
        let pool = RecvPool::new(4096, 64 << 20);
        let buf = pool.take(100_000); // a class with 4 KiB of slack
        let base = buf.buf.as_ptr() as usize;
        for addr in 0..256usize {
            for align in [1, 8, 64, 4096] {
                let off = buf.aligned_offset(100_000, addr, align);
                assert!(off < align && off + 100_000 <= buf.len());
                assert_eq!(
                    (base + off) % align,
                    addr % align,
                    "addr {addr} align {align}"
                );
            }
        }
        // No room: the start of the buffer.
        let exact = pool.take(4096);
        assert_eq!(exact.len(), 4096);
        let base = exact.buf.as_ptr() as usize;
        assert_eq!(exact.aligned_offset(4096, base + 1, 64), 0);
        assert_eq!(exact.aligned_offset(4000, base + 1, 64), 1);
        assert_eq!(exact.aligned_offset(usize::MAX, base + 1, 64), 0);
        assert_eq!(exact.aligned_offset(0, base + 63, 64), 63);
    }

    #[test]
    fn bytes_at_an_offset_view_the_right_range() {
        let pool = RecvPool::new(4096, 64 << 20);
        let mut buf = pool.take(4096);
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = i as u8;
        }
        let p = buf.buf.as_ptr() as usize;
        let b = buf.into_bytes_at(63, 100);
        assert_eq!(
            (b.as_ptr() as usize - p, b.len(), b[0], b[99]),
            (63, 100, 63, 162)
        );
        let empty = pool.take(4096).into_bytes_at(4096, 0);
        assert!(empty.is_empty());
        let past = std::panic::catch_unwind(|| pool.take(4096).into_bytes_at(4000, 97));
        assert!(past.is_err(), "a range past the buffer panics");
    }

    #[test]
    fn classes_are_powers_of_two_with_slack_from_64_kib() {
        let pool = RecvPool::new(4096, 64 << 20);
        assert_eq!(pool.take(10).len(), 4096);
        assert_eq!(pool.take(5000).len(), 8 << 10);
        assert_eq!(pool.take((32 << 10) + 1).len(), (64 << 10) + SLACK);
        assert_eq!(pool.take((1 << 20) + 40).len(), (1 << 20) + SLACK);
        assert_eq!(pool.take((1 << 20) + SLACK + 1).len(), (2 << 20) + SLACK);
        assert_eq!(pool.take(MAX_CLASS + SLACK).len(), MAX_CLASS + SLACK);
        // Beyond the classes: room for an offset within a cache line, and not kept.
        let before = pool.idle_bytes();
        let beyond = pool.take(MAX_CLASS + SLACK + 1);
        assert_eq!(beyond.len(), MAX_CLASS + SLACK + 1 + COPY_ALIGN);
        drop(beyond);
        assert_eq!(pool.idle_bytes(), before);
        assert_eq!(
            RecvPool::new(60_000, 1 << 20).take(1).len(),
            (64 << 10) + SLACK
        );
    }

    #[test]
    fn buffers_in_use_evict_idle_ones_of_other_sizes() {
        let small = (64 << 10) + SLACK;
        let pool = RecvPool::new(64 << 10, 4 * small);
        let bufs: Vec<_> = (0..4).map(|_| pool.take(10)).collect();
        drop(bufs);
        assert_eq!(pool.idle_bytes(), 4 * small);
        // A buffer of the next class evicts two small ones to come back.
        let big = pool.take(128 << 10);
        let big_len = big.len();
        drop(big);
        assert_eq!(pool.idle_bytes(), 2 * small + big_len);
        let idle = pool.idle.lock().unwrap();
        assert_eq!((idle.classes[0].len(), idle.classes[1].len()), (2, 1));
    }

    #[test]
    fn idle_buffers_are_bounded_per_class_and_by_the_budget() {
        let pool = RecvPool::new(4096, usize::MAX);
        let bufs: Vec<_> = (0..CLASS_BUFFERS + 10).map(|_| pool.take(1)).collect();
        drop(bufs);
        assert_eq!(pool.idle_bytes(), CLASS_BUFFERS * 4096);
        let pool = RecvPool::new(4096, 10_000);
        let bufs: Vec<_> = (0..5).map(|_| pool.take(1)).collect();
        drop(bufs);
        assert_eq!(pool.idle_bytes(), 8192, "its own class fills the budget");
    }

    #[test]
    fn debug_output_shows_sizes_not_bytes() {
        let pool = RecvPool::new(4096, 64 << 20);
        let mut buf = pool.take(5000);
        buf.as_mut_slice().fill(0xAB);
        let shown = format!("{buf:?}");
        assert_eq!(shown, "PoolBuf { len: 8192, class: Some(1) }");
        drop(buf);
        let shown = format!("{pool:?}");
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.contains("bytes: 8192"), "{shown}");
        assert!(shown.contains("buffers_per_class: [0, 1]"), "{shown}");
        let held = pool.idle.lock().unwrap();
        assert!(
            format!("{pool:?}").contains("<locked>"),
            "never waits for the lock"
        );
        drop(held);
    }

    #[test]
    fn a_buffer_outliving_its_pool_is_simply_freed() {
        let pool = RecvPool::new(4096, 1 << 20);
        let b = pool.take(5000).into_bytes(5000);
        drop(pool);
        assert_eq!(b.len(), 5000);
        drop(b);
    }
}
