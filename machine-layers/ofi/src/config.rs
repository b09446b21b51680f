//! [`OfiConfig`]: the tunables of an [`OfiLayer`](crate::OfiLayer) and the
//! environment variables that override them.

use std::time::Duration;

use charmrs_transport::TransportError;

/// Environment variable naming the libfabric provider (then `FI_PROVIDER`).
pub const ENV_PROVIDER: &str = "CHARMRS_OFI_PROVIDER";

/// Tunables of an [`OfiLayer`](crate::OfiLayer). Every process of a job must use the same
/// `packet_max`.
#[derive(Debug, Clone)]
pub struct OfiConfig {
    /// libfabric provider, e.g. `"shm"` or `"tcp;ofi_rxm"`. `None`: the
    /// [`ENV_PROVIDER`] variable, else `FI_PROVIDER`, else the first
    /// suitable provider libfabric lists (never `sockets` or UDP ones).
    pub provider: Option<String>,
    /// Size of one pre-posted receive buffer, hence of the largest eager
    /// packet (preamble, header, segment lengths and payload); larger
    /// messages use the rendezvous (`fi_read`) path. At least 8 KiB.
    /// Default 16 KiB.
    pub packet_max: usize,
    /// Number of pre-posted receive buffers. Default 128.
    pub recv_buffers: usize,
    /// Largest message (and `get`) accepted from a peer. Default 1 GiB.
    pub max_message: u64,
    /// How long dropping the layer waits for its last sends to complete and
    /// peers to finish reading its large messages. Default 1 s.
    pub linger: Duration,
    /// How long [`OfiLayer::progress_wait`](crate::OfiLayer::progress_wait) keeps polling before it sleeps
    /// on the completion queue's file descriptor; without one (`shm`) it
    /// polls for at least [`NAP_SPIN`](charmrs_transport::NAP_SPIN), then
    /// naps. Default 50 µs.
    pub wait_spin: Duration,
    /// Idle capacity kept for reuse by the pool of rendezvous receive
    /// buffers (recycled when the delivered message is dropped, so large
    /// messages do not pay page faults on fresh memory). Default 64 MiB.
    pub pool_bytes: usize,
    /// Bytes of large (rendezvous) messages this process reads at once from
    /// one sender; that sender's further ones wait in arrival order (one is
    /// always read, whatever its size, so 0 reads one message at a time).
    /// Per sending endpoint and per receiving endpoint, so that a sender whose reads stall holds
    /// up only its own; the memory a burst of large messages takes is bounded by this times the
    /// number of sending endpoints and this process's endpoints, and recycled buffers stay in
    /// use. `None` (the default) chooses by provider:
    /// * `shm`: one message at a time. Its reads are kernel copies (CMA)
    ///   on the receiving core, so concurrent reads only spread the copies
    ///   over more destination buffers, out of cache: a stream of 256 KiB
    ///   entry calls went from 13–15 to 20–22 GB/s with one.
    /// * others: [`DEFAULT_READ_WINDOW`](crate::DEFAULT_READ_WINDOW), reads in flight overlap the
    ///   network's latency (over `tcp;ofi_rxm` a 1 MiB stream reached up to
    ///   7 GB/s with it, 4.2–4.4 with one).
    pub read_window: Option<usize>,
    /// How often peers on this host are checked for having exited without
    /// shutting down (their lost-peer report). Default 100 ms.
    pub liveness_interval: Duration,
    /// Endpoints of the process: 1, or one per PE (the runtime's default, see
    /// [`MachineLayer::lanes`](charmrs_transport::MachineLayer::lanes)), each with its own
    /// domain, completion queue and receive buffers (`recv_buffers` of `packet_max` bytes
    /// each). Every process of a job must have the same number. When they do not all open (the
    /// provider refuses an address vector of every endpoint of the job: libfabric 1.17's `shm`
    /// takes at most 256), the layer falls back to one, saying so on stderr. Default 1.
    pub endpoints: usize,
}

impl Default for OfiConfig {
    fn default() -> OfiConfig {
        OfiConfig {
            provider: None,
            packet_max: 16 << 10,
            recv_buffers: 128,
            max_message: 1 << 30,
            linger: Duration::from_secs(1),
            wait_spin: Duration::from_micros(50),
            liveness_interval: Duration::from_millis(100),
            pool_bytes: 64 << 20,
            read_window: None,
            endpoints: 1,
        }
    }
}

/// [`OfiConfig::read_window`] for providers other than `shm`: 4 MiB, which
/// bounds the receive buffers a burst of large messages from one sender holds (measured over
/// `shm` before it read one message at a time: with 32 MiB, a burst of 4 MiB
/// entry calls streamed at 3 GB/s, every read into a fresh, page-faulting
/// buffer; with 4 MiB at 9 GB/s).
pub const DEFAULT_READ_WINDOW: usize = 4 << 20;

/// Environment variable overriding [`OfiConfig::packet_max`] (bytes).
pub const ENV_PACKET_MAX: &str = "CHARMRS_OFI_PACKET_MAX";
/// Environment variable overriding [`OfiConfig::recv_buffers`].
pub const ENV_RECV_BUFFERS: &str = "CHARMRS_OFI_RECV_BUFFERS";
/// Environment variable overriding [`OfiConfig::pool_bytes`] (bytes; 0
/// disables the recycling of rendezvous buffers).
pub const ENV_POOL_BYTES: &str = "CHARMRS_OFI_POOL_BYTES";

impl OfiConfig {
    /// The defaults, with [`ENV_PACKET_MAX`], [`ENV_RECV_BUFFERS`] and
    /// [`ENV_POOL_BYTES`] applied when set (the provider comes from the environment anyway,
    /// see [`OfiConfig::provider`]).
    ///
    /// # Errors
    ///
    /// [`TransportError::Bootstrap`] naming the variable if one is set but
    /// not a number.
    pub fn from_env() -> Result<OfiConfig, TransportError> {
        let mut cfg = OfiConfig::default();
        let num = |name: &str| -> Result<Option<usize>, TransportError> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map(Some).map_err(|_| {
                    TransportError::Bootstrap(format!("{name}={v:?} is not a number"))
                }),
                Err(_) => Ok(None),
            }
        };
        if let Some(v) = num(ENV_PACKET_MAX)? {
            cfg.packet_max = v;
        }
        if let Some(v) = num(ENV_RECV_BUFFERS)? {
            cfg.recv_buffers = v;
        }
        if let Some(v) = num(ENV_POOL_BYTES)? {
            cfg.pool_bytes = v;
        }
        Ok(cfg)
    }
}
