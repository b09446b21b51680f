//! Memory registered for one-sided (RDMA) access.
//!
//! # What this module owns
//!
//! * [`RemoteKey`]: the serializable description of a registered buffer that
//!   the runtime ships to a peer inside an ordinary message, so the peer can
//!   fetch the bytes with [`MachineLayer::get`](crate::MachineLayer::get).
//! * [`MemRegion`]: the owner-side handle of a registration, produced by
//!   [`MachineLayer::register`](crate::MachineLayer::register).
//!
//! # Lifetime invariants
//!
//! * A region is valid — peers may `get` through its key — from the moment
//!   `register` returns until the [`MemRegion`] is dropped. The runtime must
//!   keep the region alive until it knows every peer's `get` completed
//!   (typically the peer sends an acknowledgement message).
//! * Dropping the region runs the layer's release action (deregistration)
//!   exactly once. A `get` racing with the drop may fail with a
//!   [`TransportError`](crate::TransportError); on RDMA transports it never
//!   reads freed memory (the region holds a reference to its [`Bytes`],
//!   which are immutable, and the NIC checks the deregistered key). A
//!   shared-memory path that copies with the kernel (UCX's CMA) reads
//!   whatever the key's address names in the owner's process, so the
//!   runtime's rule above (keep the region until every `get` completed) is
//!   what keeps such a read valid.
//! * A key is only meaningful to the layer (and job) that produced it.

use std::fmt;
use std::sync::Mutex;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Serializable description of a registered buffer, sent to peers so they
/// can read it remotely.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteKey {
    /// Layer-defined address of the first byte: a virtual address for
    /// hardware RDMA, a region identifier for in-memory or emulated layers.
    pub addr: u64,
    /// Number of bytes a `get` through this key reads.
    pub len: u64,
    /// Opaque layer-specific access token (packed UCX/OFI rkey, ...); may be
    /// empty.
    pub rkey: Vec<u8>,
}

/// Deregistration action run when a [`MemRegion`] is dropped.
type Release = Box<dyn FnOnce() + Send>;

/// Owner-side handle of a registered buffer. The registration lasts until
/// this value is dropped (see the module docs).
pub struct MemRegion {
    buf: Bytes,
    key: RemoteKey,
    /// Taken exactly once, in `Drop`. Behind a mutex only so the region is
    /// `Sync`; it is never contended.
    release: Mutex<Option<Release>>,
}

impl MemRegion {
    /// A region that needs no deregistration (the layer keeps nothing per
    /// registration, or keeps it alive by other means).
    pub fn new(buf: Bytes, key: RemoteKey) -> MemRegion {
        MemRegion {
            buf,
            key,
            release: Mutex::new(None),
        }
    }

    /// A region whose registration is undone by `release` when the region is
    /// dropped (e.g. remove it from the layer's table, unpin the memory).
    pub fn with_release(
        buf: Bytes,
        key: RemoteKey,
        release: impl FnOnce() + Send + 'static,
    ) -> MemRegion {
        MemRegion {
            buf,
            key,
            release: Mutex::new(Some(Box::new(release))),
        }
    }

    /// The registered bytes.
    pub fn buf(&self) -> &Bytes {
        &self.buf
    }

    /// The key to ship to peers.
    pub fn key(&self) -> &RemoteKey {
        &self.key
    }
}

impl Drop for MemRegion {
    fn drop(&mut self) {
        let release = match self.release.get_mut() {
            Ok(slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(release) = release {
            release();
        }
    }
}

impl fmt::Debug for MemRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemRegion")
            .field("len", &self.buf.len())
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn key() -> RemoteKey {
        RemoteKey {
            addr: 0x1000,
            len: 5,
            rkey: vec![1, 2, 3],
        }
    }

    #[test]
    fn release_runs_once_on_drop() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let region = MemRegion::with_release(Bytes::from_static(b"hello"), key(), move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(region.buf().as_ref(), b"hello");
        assert_eq!(region.key(), &key());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        drop(region);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn region_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<MemRegion>();
        let region = MemRegion::new(Bytes::new(), key());
        assert!(format!("{region:?}").contains("MemRegion"));
    }
}
