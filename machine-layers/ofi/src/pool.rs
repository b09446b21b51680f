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
//! * Buffers are kept in power-of-two capacity classes; a buffer taken for
//!   `len` bytes has capacity `>= len` and length 0.
//! * The pool keeps at most `max_bytes` of idle capacity; beyond that,
//!   returned buffers are freed.
//! * The pool never hands out a buffer that a live `Bytes` still views: a
//!   buffer returns only from the owner's `Drop`, i.e. after the last view.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Smallest class (smaller requests are rounded up to it).
const MIN_CLASS: usize = 64 << 10;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct BufPool {
    idle: Mutex<Idle>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Idle {
    /// `classes[i]` holds buffers of capacity `MIN_CLASS << i`.
    classes: Vec<Vec<Vec<u8>>>,
    bytes: usize,
}

fn class_of(len: usize) -> (usize, usize) {
    let cap = len.max(MIN_CLASS).next_power_of_two();
    ((cap / MIN_CLASS).trailing_zeros() as usize, cap)
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
        if !cap.is_power_of_two() || cap < MIN_CLASS {
            return;
        }
        buf.clear();
        let (class, _) = class_of(cap);
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.bytes + cap > self.max_bytes {
            return;
        }
        if idle.classes.len() <= class {
            idle.classes.resize_with(class + 1, Vec::new);
        }
        idle.bytes += cap;
        idle.classes[class].push(buf);
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
        let pool = BufPool::new(MIN_CLASS);
        let a = pool.take(10);
        let b = pool.take(10);
        drop(pool.wrap(a));
        drop(pool.wrap(b));
        assert_eq!(pool.idle.lock().unwrap().bytes, MIN_CLASS);
    }
}
