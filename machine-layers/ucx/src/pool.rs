//! Reusable receive buffers for rendezvous messages and larger eager ones.
//!
//! # What this module owns
//!
//! [`BufPool`]: size classes (powers of two from [`MIN_CLASS`] to
//! [`MAX_CLASS`], those from [`SLACK_FROM`] plus [`SLACK`] bytes: a large
//! buffer sent with a call's arguments beside it, say 1 MiB and 40 bytes,
//! takes a class of 1 MiB + 4 KiB rather than one of 2 MiB) of byte
//! buffers into which UCX's rendezvous protocol
//! writes large messages, and into which eager messages from [`MIN_CLASS`]
//! bytes are copied out of UCX's receive descriptors. The buffer becomes the
//! delivered message's segments through [`Bytes::from_owner`]; when the last
//! view of it is dropped — on whatever thread — it goes back to its class.
//!
//! Why: a fresh multi-megabyte allocation per message is page-faulted (and
//! zeroed by the kernel) on first touch, which costs more than moving the
//! bytes (so are smaller ones when the allocator gives a burst of them back
//! to the kernel and takes them again for the next burst); reused buffers
//! are already mapped (and, on RDMA transports, stay registered in UCX's
//! registration cache).
//!
//! # Invariants
//!
//! * Each class keeps at most [`CLASS_BYTES`] bytes and [`CLASS_BUFFERS`]
//!   buffers idle; a buffer that finds its class full is freed. Classes are
//!   stacks: the most recently returned buffer, likeliest still in cache,
//!   goes out first. Buffers outside the
//!   classes are plain allocations. The pool never blocks and never fails:
//!   when a class is empty a new buffer is allocated.
//! * A buffer is handed out to one message at a time; its contents are
//!   whatever the previous user left until UCX overwrites the message's
//!   length of it, and only that length is ever exposed.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// Smallest pooled class (smaller messages are copied into exact-size
/// allocations).
pub(crate) const MIN_CLASS: usize = 4 << 10;
/// Largest pooled class.
pub(crate) const MAX_CLASS: usize = 64 << 20;
/// Bytes of idle buffers each class may keep.
pub(crate) const CLASS_BYTES: usize = 64 << 20;
/// Idle buffers each class may keep (bounds the small classes: 4 MiB of
/// 4 KiB buffers).
pub(crate) const CLASS_BUFFERS: usize = 1024;
/// Classes of at least this many bytes have [`SLACK`] bytes more than
/// their power of two.
pub(crate) const SLACK_FROM: usize = 64 << 10;
/// See [`SLACK_FROM`].
pub(crate) const SLACK: usize = 4 << 10;

/// Bytes of the buffers of the class whose power of two is `pow`.
fn class_len(pow: usize) -> usize {
    if pow >= SLACK_FROM {
        pow + SLACK
    } else {
        pow
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct BufPool {
    /// Idle buffers per class (class `i` has power of two `MIN_CLASS << i`),
    /// with the class's capacity in buffers.
    classes: Vec<(Mutex<Vec<Vec<u8>>>, usize)>,
}

/// A buffer on loan from the pool; returns to it on drop.
pub(crate) struct Loan {
    buf: Vec<u8>,
    /// The class it returns to (none for a plain allocation).
    home: Option<(Arc<BufPool>, usize)>,
}

impl AsRef<[u8]> for Loan {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if let Some((pool, class)) = self.home.take() {
            let (stack, cap) = &pool.classes[class];
            let mut stack = stack.lock().unwrap_or_else(PoisonError::into_inner);
            if stack.len() < *cap {
                stack.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

impl BufPool {
    pub(crate) fn new() -> Arc<BufPool> {
        let mut classes = Vec::new();
        let mut pow = MIN_CLASS;
        while pow <= MAX_CLASS {
            let cap = (CLASS_BYTES / class_len(pow)).clamp(1, CLASS_BUFFERS);
            classes.push((Mutex::new(Vec::with_capacity(cap)), cap));
            pow *= 2;
        }
        Arc::new(BufPool { classes })
    }

    /// The smallest class whose buffers hold `len` bytes, with their size.
    fn class_for(len: usize) -> Option<(usize, usize)> {
        let mut pow = MIN_CLASS;
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

    /// A buffer of at least `len` bytes (all initialised).
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> Loan {
        match Self::class_for(len) {
            Some((class, class_len)) => {
                let idle = self.classes[class]
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop();
                Loan {
                    buf: idle.unwrap_or_else(|| vec![0u8; class_len]),
                    home: Some((Arc::clone(self), class)),
                }
            }
            None => Loan {
                buf: vec![0u8; len],
                home: None,
            },
        }
    }
}

impl Loan {
    /// Pointer UCX writes the message into.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr()
    }

    /// The buffer's bytes (its whole capacity), to copy a message into.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The buffer's capacity in bytes.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// The first `len` bytes as shared [`Bytes`] (returned to the pool when
    /// the last view drops).
    pub(crate) fn into_bytes(self, len: usize) -> Bytes {
        Bytes::from_owner(self).slice(..len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_are_reused() {
        let pool = BufPool::new();
        let mut a = pool.take(100_000);
        assert_eq!(a.len(), (128 << 10) + SLACK);
        assert_eq!(pool.take(5000).len(), 8 << 10);
        // A power of two and a few bytes: the class just above it.
        assert_eq!(pool.take((1 << 20) + 40).len(), (1 << 20) + SLACK);
        assert_eq!(pool.take((1 << 20) + SLACK + 1).len(), (2 << 20) + SLACK);
        assert_eq!(pool.take(64 << 10).len(), (64 << 10) + SLACK);
        assert_eq!(pool.take((32 << 10) + 1).len(), (64 << 10) + SLACK);
        let p = a.as_mut_ptr();
        // SAFETY: the loan has 128 KiB of initialised bytes.
        unsafe { p.write(7) };
        let b = a.into_bytes(100_000);
        assert_eq!(b.len(), 100_000);
        assert_eq!(b[0], 7);
        let tail = b.slice(10..);
        drop(b);
        let c = pool.take(90_000);
        assert_ne!(c.buf.as_ptr(), p as *const u8, "still in use by `tail`");
        drop(tail);
        let mut d = pool.take(70_000);
        assert_eq!(d.as_mut_ptr(), p, "reused once the last view dropped");
        drop((c, d));
        assert_eq!(pool.take(1 << 30).len(), 1 << 30);
        assert_eq!(pool.take(MAX_CLASS + SLACK).len(), MAX_CLASS + SLACK);
        assert_eq!(
            pool.take(MAX_CLASS + SLACK + 1).len(),
            MAX_CLASS + SLACK + 1
        );
        assert_eq!(pool.take(10).len(), MIN_CLASS);
    }
}
