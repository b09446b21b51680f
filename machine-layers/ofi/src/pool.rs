//! Recycled receive buffers for rendezvous messages.
//!
//! # What this module owns
//!
//! [`BufPool`]: buffers that large messages are `fi_read` into. A fresh
//! multi-megabyte allocation costs a page fault per 4 KiB page on first
//! touch (and glibc may return freed memory to the kernel), which showed as
//! a large share of the time of streaming big messages. Buffers handed out
//! by the pool come back when the last `Bytes` view of the delivered
//! message is dropped (on whatever thread), already faulted in.
//!
//! # Invariants
//!
//! * Buffers are kept in capacity classes of a power of two plus
//!   [`SLACK`] bytes; a buffer taken for `len` bytes has capacity `>= len`
//!   and length 0.
//! * The pool keeps at most `max_bytes` of idle capacity. A returned
//!   buffer that would exceed it first evicts idle buffers of other classes
//!   (largest first: a stream of one size must not find the budget held by
//!   buffers of the sizes before it, or every buffer of its own would be
//!   freed and faulted in anew); it is freed only when its own class fills
//!   the budget.
//! * The pool never hands out a buffer that a live `Bytes` still views: a
//!   buffer returns only from the owner's `Drop`, i.e. after the last view.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Smallest class (smaller requests are rounded up to it).
const MIN_CLASS: usize = 64 << 10;
/// Bytes each class has beyond its power of two: a large buffer sent with
/// a call's arguments beside it (1 MiB and 40 bytes, say) takes a class of
/// 1 MiB + 4 KiB, not one of 2 MiB.
const SLACK: usize = 4 << 10;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct BufPool {
    idle: Mutex<Idle>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Idle {
    /// `classes[i]` holds buffers of capacity `(MIN_CLASS << i) + SLACK`.
    classes: Vec<Vec<Vec<u8>>>,
    bytes: usize,
}

/// The class of a buffer for `len` bytes, and that class's capacity.
fn class_of(len: usize) -> (usize, usize) {
    let mut pow = MIN_CLASS;
    let mut class = 0;
    while len > pow + SLACK {
        match pow.checked_mul(2) {
            Some(p) if p <= usize::MAX - SLACK => pow = p,
            // Beyond any class (never reached: rendezvous lengths are bounded).
            _ => return (usize::MAX, len),
        }
        class += 1;
    }
    (class, pow + SLACK)
}

impl BufPool {
    /// A pool keeping at most `max_bytes` of idle buffers.
    pub(crate) fn new(max_bytes: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            idle: Mutex::new(Idle::default()),
            max_bytes,
        })
    }

    /// An empty buffer with capacity for at least `len` bytes.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let (class, cap) = class_of(len);
        let reused = {
            let mut idle = self
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let got = idle.classes.get_mut(class).and_then(Vec::pop);
            if got.is_some() {
                idle.bytes -= cap;
            }
            got
        };
        reused.unwrap_or_else(|| Vec::with_capacity(cap))
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        let (class, class_cap) = class_of(cap);
        if cap != class_cap || cap > self.max_bytes {
            return;
        }
        buf.clear();
        // Freed after the lock is released.
        let mut evicted = Vec::new();
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The class of the buffer coming back is the one in use: idle buffers of other classes
        // (left by an earlier phase of other sizes) make room for it, largest first.
        while idle.bytes + cap > self.max_bytes {
            let Some(other) = (0..idle.classes.len())
                .rev()
                .find(|&c| c != class && !idle.classes[c].is_empty())
            else {
                return; // its own class fills the budget
            };
            if let Some(b) = idle.classes[other].pop() {
                idle.bytes -= b.capacity();
                evicted.push(b);
            }
        }
        if idle.classes.len() <= class {
            idle.classes.resize_with(class + 1, Vec::new);
        }
        idle.bytes += cap;
        idle.classes[class].push(buf);
        drop(idle);
        drop(evicted);
    }

    /// Wraps a filled buffer (taken from this pool) as `Bytes` that return
    /// it to the pool when the last view is dropped.
    pub(crate) fn wrap(self: &Arc<BufPool>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf: Some(buf),
            pool: Arc::downgrade(self),
        })
    }
}

/// Owner of a pooled buffer inside `Bytes`.
struct Pooled {
    buf: Option<Vec<u8>>,
    pool: std::sync::Weak<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(buf), Some(pool)) = (self.buf.take(), self.pool.upgrade()) {
            pool.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_after_the_last_view() {
        let pool = BufPool::new(16 << 20);
        let mut b = pool.take(100_000);
        assert!(b.capacity() >= 100_000 && b.is_empty());
        let ptr = b.as_ptr();
        b.resize(100_000, 7);
        let bytes = pool.wrap(b);
        let view = bytes.slice(10..20);
        drop(bytes);
        // Still viewed: not reusable yet.
        let other = pool.take(100_000);
        assert_ne!(other.as_ptr(), ptr);
        assert_eq!(&view[..], &[7u8; 10]);
        drop(view);
        let again = pool.take(120_000);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
    }

    #[test]
    fn idle_capacity_is_bounded() {
        let pool = BufPool::new(MIN_CLASS + SLACK);
        let a = pool.take(10);
        let b = pool.take(10);
        drop(pool.wrap(a));
        drop(pool.wrap(b));
        assert_eq!(pool.idle.lock().unwrap().bytes, MIN_CLASS + SLACK);
    }

    #[test]
    fn buffers_in_use_evict_idle_ones_of_other_sizes() {
        let small = MIN_CLASS + SLACK;
        let pool = BufPool::new(4 * small);
        let bufs: Vec<_> = (0..4).map(|_| pool.take(10)).collect();
        for b in bufs {
            drop(pool.wrap(b));
        }
        assert_eq!(pool.idle.lock().unwrap().bytes, 4 * small);
        // A buffer of the next class evicts two small ones to come back.
        let big = pool.take(2 * MIN_CLASS);
        let big_cap = big.capacity();
        drop(pool.wrap(big));
        let idle = pool.idle.lock().unwrap();
        assert_eq!(idle.bytes, 2 * small + big_cap);
        assert_eq!((idle.classes[0].len(), idle.classes[1].len()), (2, 1));
    }

    #[test]
    fn a_power_of_two_and_a_few_bytes_take_the_class_just_above() {
        let pool = BufPool::new(64 << 20);
        assert_eq!(pool.take((1 << 20) + 40).capacity(), (1 << 20) + SLACK);
        assert_eq!(
            pool.take((1 << 20) + SLACK + 1).capacity(),
            (2 << 20) + SLACK
        );
        assert_eq!(pool.take(MIN_CLASS).capacity(), MIN_CLASS + SLACK);
        assert_eq!(class_of(usize::MAX).1, usize::MAX);
        // A buffer of a foreign capacity is not kept.
        drop(pool.wrap(Vec::with_capacity(3 << 20)));
        assert_eq!(pool.idle.lock().unwrap().bytes, 0);
    }
}
