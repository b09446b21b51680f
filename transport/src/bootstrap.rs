//! Job bootstrap: how processes learn their rank and exchange connection
//! details before the machine layer is up (the PMI/PMIx role).
//!
//! # What this module owns
//!
//! * [`Bootstrap`]: a rank-scoped key-value store with a collective fence.
//! * [`SingleProcessBootstrap`]: the trivial job of one process.
//!
//! # Invariants
//!
//! * Each process writes only its own keys ([`Bootstrap::put`]); other
//!   processes read them with [`Bootstrap::get`] naming the writer's rank.
//! * A value written before a [`Bootstrap::fence`] is visible to every
//!   process after that fence. Reading before the fence may fail.
//! * `rank() < size()` and both are fixed for the life of the job.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::TransportError;
use crate::layer::ProcessId;

/// Out-of-band coordination used to wire up a machine layer: rank and size
/// discovery plus a fenced key-value exchange.
pub trait Bootstrap: Send + Sync {
    /// This process's rank in the job.
    fn rank(&self) -> ProcessId;
    /// Number of processes in the job.
    fn size(&self) -> u32;
    /// Publishes `value` under `key` for this process.
    fn put(&self, key: &str, value: &[u8]) -> Result<(), TransportError>;
    /// Reads the value process `rank` published under `key`.
    fn get(&self, rank: ProcessId, key: &str) -> Result<Vec<u8>, TransportError>;
    /// Collective: returns once every process called it, after which all
    /// values put before the fence are readable everywhere.
    fn fence(&self) -> Result<(), TransportError>;
    /// Best effort: tells whoever launched the job that this process is
    /// bringing it down with `reason` (a launcher then stops the other
    /// processes). Returns once the notice was sent or could not be; the
    /// caller exits afterwards. The default does nothing (no launcher).
    fn abort(&self, reason: &str) {
        let _ = reason;
    }
}

/// Bootstrap of a one-process job: rank 0, size 1, values kept in memory,
/// and a fence that returns immediately.
#[derive(Debug, Default)]
pub struct SingleProcessBootstrap {
    store: Mutex<HashMap<String, Vec<u8>>>,
}

impl SingleProcessBootstrap {
    /// An empty single-process bootstrap.
    pub fn new() -> SingleProcessBootstrap {
        SingleProcessBootstrap::default()
    }

    fn store(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // The map holds plain data; a panic while holding the lock cannot
        // leave it logically inconsistent.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Bootstrap for SingleProcessBootstrap {
    fn rank(&self) -> ProcessId {
        0
    }

    fn size(&self) -> u32 {
        1
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<(), TransportError> {
        self.store().insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn get(&self, rank: ProcessId, key: &str) -> Result<Vec<u8>, TransportError> {
        if rank != 0 {
            return Err(TransportError::UnknownProcess { dst: rank, size: 1 });
        }
        self.store().get(key).cloned().ok_or_else(|| {
            TransportError::Bootstrap(format!("no value for key {key:?} from rank 0"))
        })
    }

    fn fence(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_kv_and_fence() {
        let b = SingleProcessBootstrap::new();
        assert_eq!(b.rank(), 0);
        assert_eq!(b.size(), 1);
        b.put("addr", b"127.0.0.1:4000").unwrap();
        b.fence().unwrap();
        assert_eq!(b.get(0, "addr").unwrap(), b"127.0.0.1:4000");
        b.put("addr", b"overwritten").unwrap();
        assert_eq!(b.get(0, "addr").unwrap(), b"overwritten");
    }

    #[test]
    fn missing_key_and_bad_rank_are_errors() {
        let b = SingleProcessBootstrap::new();
        assert!(matches!(
            b.get(0, "nope"),
            Err(TransportError::Bootstrap(_))
        ));
        b.put("k", b"v").unwrap();
        assert!(matches!(
            b.get(1, "k"),
            Err(TransportError::UnknownProcess { dst: 1, size: 1 })
        ));
    }

    #[test]
    fn usable_as_trait_object_across_threads() {
        let b: std::sync::Arc<dyn Bootstrap> = std::sync::Arc::new(SingleProcessBootstrap::new());
        let b2 = std::sync::Arc::clone(&b);
        std::thread::spawn(move || b2.put("from-thread", &[7]).unwrap())
            .join()
            .unwrap();
        assert_eq!(b.get(0, "from-thread").unwrap(), vec![7]);
    }
}
