//! Eager messages delivered in place: UCX's receive descriptors lent to the
//! runtime as [`Bytes`].
//!
//! # What this module owns
//!
//! [`Lender`]: turns the data of an eager active message, which UCX lets a
//! handler keep (`UCP_AM_FLAG_PERSISTENT_DATA`; the handler returns
//! `UCS_INPROGRESS`), into `Bytes` that view UCX's descriptor directly, and
//! gives each descriptor back (`ucp_am_data_release`) once the last view of
//! it is dropped. On shared memory UCX then hands its FIFO slot a fresh
//! descriptor; the message is never copied on receipt, and whoever reads it
//! reads it once, where it landed.
//!
//! Why: copying a 4 KiB message out of the descriptor read every line of it
//! out of the sender's cache before anyone needed it. Delivered in place, a
//! 4 KiB entry call went from 1.94 to 1.23 µs one-way over shared memory
//! (`docs/performance.md`, session 12).
//!
//! # Invariants
//!
//! * A view may be dropped on any thread; the descriptor is only queued
//!   then ([`Lender::returned`]), and released by the thread holding the
//!   worker lock ([`Lender::release_returned`], called by every progress),
//!   since UCX calls on the worker are serialised.
//! * A descriptor is valid until released, and released exactly once, after
//!   its last view is gone. The worker must outlive every view: while any
//!   is out ([`Lender::out`]), the worker is not destroyed (see the
//!   worker's `Drop`: at the end of a job, views still held by the
//!   application keep the worker, and the process's exit frees it).

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use charmrs_ucx_sys as sys;
use crossbeam_queue::SegQueue;

/// Lends descriptors and collects them back; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Lender {
    /// Descriptors whose last view was dropped, to release.
    returned: SegQueue<usize>,
    /// Descriptors lent and not yet returned.
    out: AtomicUsize,
}

/// A lent descriptor inside `Bytes`.
struct Lent {
    data: *const u8,
    len: usize,
    lender: Arc<Lender>,
}

// SAFETY: the descriptor's bytes are only read, and stay valid and unmoved
// until the descriptor is released, which happens only after this owner is
// dropped (see the module invariants); the pointer is not tied to a thread.
unsafe impl Send for Lent {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for Lent {}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: UCX passed `len` readable bytes at `data`, valid until the
        // descriptor is released, which waits for this owner's drop.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.lender.returned.push(self.data as usize);
        self.lender.out.fetch_sub(1, Ordering::Release);
    }
}

impl Lender {
    /// The `len` bytes at `data` of an eager message whose handler returns
    /// `UCS_INPROGRESS`, as `Bytes` that return the descriptor when the
    /// last view drops.
    ///
    /// # Safety
    ///
    /// `data` is the data pointer UCX passed to an active-message handler
    /// with `UCP_AM_RECV_ATTR_FLAG_DATA` set, with `len` readable bytes, and
    /// that handler returns `UCS_INPROGRESS`.
    pub(crate) unsafe fn lend(self: &Arc<Self>, data: *mut c_void, len: usize) -> Bytes {
        self.out.fetch_add(1, Ordering::Relaxed);
        Bytes::from_owner(Lent {
            data: data as *const u8,
            len,
            lender: Arc::clone(self),
        })
    }

    /// Gives UCX back every descriptor whose views are all gone.
    ///
    /// # Safety
    ///
    /// The caller holds the worker lock, and `worker` is the worker whose
    /// handlers lent the descriptors.
    pub(crate) unsafe fn release_returned(&self, worker: sys::ucp_worker_h) {
        while let Some(desc) = self.returned.pop() {
            // SAFETY: a descriptor this worker lent, whose last view is gone;
            // each is queued once, so released once.
            unsafe { sys::ucp_am_data_release(worker, desc as *mut c_void) };
        }
    }

    /// Whether any descriptor was returned and awaits release.
    pub(crate) fn has_returned(&self) -> bool {
        !self.returned.is_empty()
    }

    /// Descriptors lent whose views are not all dropped yet.
    pub(crate) fn out(&self) -> usize {
        self.out.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_comes_back_once_after_its_last_view() {
        let lender = Arc::new(Lender::default());
        let mut storage = *b"hello world";
        // SAFETY: `storage` outlives every view; nothing is released
        // to UCX here (the queue is inspected instead).
        let bytes = unsafe { lender.lend(storage.as_mut_ptr().cast(), storage.len()) };
        let word = bytes.slice(6..);
        assert_eq!(lender.out(), 1);
        drop(bytes);
        assert!(!lender.has_returned(), "still viewed by `word`");
        assert_eq!(&word[..], b"world");
        let other = std::thread::spawn(move || drop(word));
        other.join().unwrap();
        assert_eq!(lender.out(), 0);
        assert_eq!(lender.returned.pop(), Some(storage.as_ptr() as usize));
        assert_eq!(lender.returned.pop(), None);
    }
}
