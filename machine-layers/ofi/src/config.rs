//! [`OfiConfig`]: the tunables of an [`OfiLayer`](crate::OfiLayer) and the
//! environment variables that override them.

use std::time::Duration;

use charmrs_transport::TransportError;

use crate::wire;

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
    /// messages use the rendezvous (`fi_read`) path. At least
    /// [`PACKET_MAX_MIN`], at most [`PACKET_MAX_LIMIT`], and over `ofi_rxm` (`tcp;ofi_rxm`) at
    /// most its eager limit, `FI_OFI_RXM_BUFFER_SIZE` (16 KiB unless set): per-pair order rests
    /// on the provider completing eager packets in the order they were sent, which `ofi_rxm`
    /// does not do for larger ones (it sends them by its own segmentation or rendezvous: a
    /// flood of 64 B messages with one of 16 337 B every thousand, eager in a packet of
    /// 16 385 B, had the next 64 B one delivered before it). Default 16 KiB.
    pub packet_max: usize,
    /// Number of pre-posted receive buffers, per endpoint ([`ENV_RECV_BUFFERS`]). At least 1,
    /// and at most the depth of the provider's receive queue (its `fi_info` `rx_attr.size`:
    /// 1024 for libfabric 1.17's `shm`, 2048 for `tcp;ofi_rxm`), which is all the endpoint
    /// can have posted: [`OfiLayer::new`](crate::OfiLayer::new) refuses a larger value with an
    /// error naming [`ENV_RECV_BUFFERS`], the value and the provider's limit (and the
    /// provider's variable that raises it, e.g. `FI_SHM_RX_SIZE` or `FI_OFI_RXM_RX_SIZE`),
    /// before any process of the job published anything — rather than running with fewer
    /// buffers than asked for. Only the default is lowered to the limit silently, for a
    /// provider whose queue is shallower. Default [`DEFAULT_RECV_BUFFERS`] (128).
    pub recv_buffers: usize,
    /// Largest message (and `get`) accepted from a peer. Default 1 GiB.
    pub max_message: u64,
    /// How long dropping the layer waits for its last sends to complete and
    /// peers to finish reading its large messages. What it then gives up on — messages still
    /// queued, not completed by the provider, or large ones a peer never read, and those a peer
    /// that left or was lost during the shutdown never took — is named in one line on stderr
    /// (`charmrs-ofi: process R: N messages (B bytes) sent before the layer was dropped are not
    /// known delivered: ...`, with the peer processes and why); nothing is printed when every
    /// message went. Default 1 s.
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
    /// Large (rendezvous) messages an endpoint may have registered (`fi_mr_reg`) for one peer
    /// endpoint and not yet seen acknowledged by it ([`ENV_RNDV_PER_PEER`]). A sender
    /// registers a large message's segments when it hands the message's descriptor to the
    /// provider and deregisters them when the reader's acknowledgement arrives; a peer that is
    /// slow to read (or stalled) would otherwise make it register, and pin, everything sent to
    /// it. At the bound (or at [`rndv_bytes_per_peer`](Self::rndv_bytes_per_peer)), further
    /// large messages to that peer wait, unregistered, in its send queue, and so does
    /// everything sent to it after them (small messages too: per-pair order holds), until
    /// acknowledgements free registrations; the waiting never fails or drops anything, and
    /// `send` still never blocks. A peer lost or gone meanwhile is reported as usual and what
    /// waited for it is dropped. Per pair of endpoints (per destination process with one
    /// endpoint per process, per pair of PEs with one per PE), so the registrations of a
    /// process are bounded by this times its endpoints times the job's endpoints it sends large
    /// messages to. At least 1. When a dropped layer's [`linger`](Self::linger) runs out the
    /// bound is lifted, so that what waits still goes before the goodbye. Default
    /// [`DEFAULT_RNDV_PER_PEER`] (64).
    pub rndv_per_peer: usize,
    /// Bytes of the large messages an endpoint may have registered for one peer endpoint and
    /// not yet seen acknowledged ([`ENV_RNDV_BYTES_PER_PEER`]; see
    /// [`rndv_per_peer`](Self::rndv_per_peer), whichever is reached first applies). One message
    /// always goes when none to that peer is outstanding, whatever its size, so 0 sends one at
    /// a time. Default [`DEFAULT_RNDV_BYTES_PER_PEER`] (16 MiB).
    pub rndv_bytes_per_peer: usize,
}

impl Default for OfiConfig {
    fn default() -> OfiConfig {
        OfiConfig {
            provider: None,
            packet_max: 16 << 10,
            recv_buffers: DEFAULT_RECV_BUFFERS,
            max_message: 1 << 30,
            linger: Duration::from_secs(1),
            wait_spin: Duration::from_micros(50),
            liveness_interval: Duration::from_millis(100),
            pool_bytes: 64 << 20,
            read_window: None,
            endpoints: 1,
            rndv_per_peer: DEFAULT_RNDV_PER_PEER,
            rndv_bytes_per_peer: DEFAULT_RNDV_BYTES_PER_PEER,
        }
    }
}

/// Default [`OfiConfig::recv_buffers`]: 128 buffers (of 16 KiB by default, 2 MiB per
/// endpoint).
pub const DEFAULT_RECV_BUFFERS: usize = 128;

/// Default [`OfiConfig::rndv_per_peer`]: 64 large messages per pair of endpoints. With
/// [`DEFAULT_RNDV_BYTES_PER_PEER`] it is the 64 × 256 KiB of the entry-call streams measured in
/// docs/performance.md, and leaves a receiver that reads one message at a time (`shm`) or
/// [`DEFAULT_READ_WINDOW`] at once (others) many descriptors ahead of its reads, so the bound
/// only bites when a peer falls behind; it keeps a process's registrations to tens of
/// thousands in a job of a thousand endpoints.
pub const DEFAULT_RNDV_PER_PEER: usize = 64;

/// Default [`OfiConfig::rndv_bytes_per_peer`]: 16 MiB per pair of endpoints, four times
/// [`DEFAULT_READ_WINDOW`], so the receiver's read window stays full while the sender waits
/// for acknowledgements, and pinned memory towards a stalled peer stays bounded.
pub const DEFAULT_RNDV_BYTES_PER_PEER: usize = 16 << 20;

/// [`OfiConfig::read_window`] for providers other than `shm`: 4 MiB, which
/// bounds the receive buffers a burst of large messages from one sender holds (measured over
/// `shm` before it read one message at a time: with 32 MiB, a burst of 4 MiB
/// entry calls streamed at 3 GB/s, every read into a fresh, page-faulting
/// buffer; with 4 MiB at 9 GB/s).
pub const DEFAULT_READ_WINDOW: usize = 4 << 20;

/// Environment variable overriding [`OfiConfig::packet_max`] (bytes).
pub const ENV_PACKET_MAX: &str = "CHARMRS_OFI_PACKET_MAX";

/// Smallest [`OfiConfig::packet_max`]: a rendezvous descriptor of the most segments must fit.
pub const PACKET_MAX_MIN: usize = if wire::MAX_RNDV_LEN > 8 << 10 {
    wire::MAX_RNDV_LEN
} else {
    8 << 10
};

/// Largest [`OfiConfig::packet_max`] with any provider: 64 KiB of payload and its packet's
/// header. Larger messages go by the layer's rendezvous, which keeps them in order whatever the
/// provider does; `shm` kept eager packets of up to 100 kB in order, but an eager packet only
/// stays in order as long as the provider completes it as one message (see
/// [`OfiConfig::packet_max`] for `ofi_rxm`, whose limit is lower).
pub const PACKET_MAX_LIMIT: usize = 65 << 10;

/// The variable that sets `ofi_rxm`'s eager limit (its buffer size).
const ENV_RXM_BUFFER_SIZE: &str = "FI_OFI_RXM_BUFFER_SIZE";

/// `ofi_rxm`'s eager limit when [`ENV_RXM_BUFFER_SIZE`] is not set (libfabric 1.17).
const RXM_BUFFER_SIZE: usize = 16 << 10;

/// Why `packet_max` (set through `what`) is unusable with any provider: outside
/// [`PACKET_MAX_MIN`]..=[`PACKET_MAX_LIMIT`].
fn packet_max_error(what: &str, packet_max: usize) -> Option<String> {
    if packet_max < PACKET_MAX_MIN {
        Some(format!(
            "{what} {packet_max} is below {PACKET_MAX_MIN}, the size of the largest rendezvous \
             descriptor"
        ))
    } else if packet_max > PACKET_MAX_LIMIT {
        Some(format!(
            "{what} {packet_max} is above {PACKET_MAX_LIMIT}: eager packets that large may \
             complete out of order, which breaks per-pair message order (larger messages go by \
             the rendezvous anyway)"
        ))
    } else {
        None
    }
}

/// Why `packet_max` is unusable with libfabric provider `provider` (e.g. `"tcp;ofi_rxm"`), if
/// it is: besides the bounds of [`packet_max_error`], over `ofi_rxm` it must not exceed the
/// eager limit, which `env` (the environment) may set. Names [`ENV_PACKET_MAX`] and the
/// provider's variable.
pub(crate) fn check_packet_max(
    packet_max: usize,
    provider: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), String> {
    let what = format!("packet_max ({ENV_PACKET_MAX})");
    if let Some(why) = packet_max_error(&what, packet_max) {
        return Err(why);
    }
    if provider.split(';').any(|p| p == "ofi_rxm") {
        let set = env(ENV_RXM_BUFFER_SIZE).and_then(|v| v.trim().parse::<usize>().ok());
        let limit = set.unwrap_or(RXM_BUFFER_SIZE);
        if packet_max > limit {
            return Err(format!(
                "{what} {packet_max} is above the eager limit of libfabric's ofi_rxm provider \
                 ({provider}): {limit} bytes ({ENV_RXM_BUFFER_SIZE}{}). ofi_rxm sends larger \
                 packets by segmentation or its own rendezvous and may complete them after \
                 later small ones, which breaks per-pair message order: lower {ENV_PACKET_MAX} \
                 (larger messages go by the layer's rendezvous) or raise {ENV_RXM_BUFFER_SIZE}",
                if set.is_some() { "" } else { " unset" }
            ));
        }
    }
    Ok(())
}
/// Environment variable overriding [`OfiConfig::recv_buffers`] (at most the provider's
/// receive queue depth, checked when the layer starts).
pub const ENV_RECV_BUFFERS: &str = "CHARMRS_OFI_RECV_BUFFERS";
/// Environment variable overriding [`OfiConfig::rndv_per_peer`] (at least 1).
pub const ENV_RNDV_PER_PEER: &str = "CHARMRS_OFI_RNDV_PER_PEER";
/// Environment variable overriding [`OfiConfig::rndv_bytes_per_peer`] (bytes).
pub const ENV_RNDV_BYTES_PER_PEER: &str = "CHARMRS_OFI_RNDV_BYTES_PER_PEER";

/// Why `recv_buffers` receive buffers cannot be posted by provider `provider`, whose receive
/// queue holds `rx_size` (0: the provider did not say, nothing to check); else the number to
/// post: `recv_buffers`, or — for [`DEFAULT_RECV_BUFFERS`], which nobody asked for — the
/// provider's limit if lower. The error names [`ENV_RECV_BUFFERS`], the value, the limit and the
/// variable that sets the limit of the provider whose endpoint takes the receives (the last of
/// a layered name: `ofi_rxm` in `tcp;ofi_rxm`).
pub(crate) fn check_recv_buffers(
    recv_buffers: usize,
    rx_size: usize,
    provider: &str,
) -> Result<usize, String> {
    if recv_buffers == 0 {
        return Err(format!(
            "recv_buffers ({ENV_RECV_BUFFERS}) 0: at least one receive buffer is needed"
        ));
    }
    if rx_size == 0 || recv_buffers <= rx_size {
        return Ok(recv_buffers);
    }
    if recv_buffers == DEFAULT_RECV_BUFFERS {
        return Ok(rx_size);
    }
    let top = provider.rsplit(';').next().unwrap_or(provider);
    let var = format!("FI_{}_RX_SIZE", top.to_ascii_uppercase());
    Err(format!(
        "recv_buffers ({ENV_RECV_BUFFERS}) {recv_buffers} is above the receive queue depth of \
         libfabric provider {provider}: {rx_size} (its rx_attr.size), the most receive buffers \
         an endpoint can have posted. Set {ENV_RECV_BUFFERS} to at most {rx_size}, or raise the \
         provider's queue ({var}, where the provider has it: `fi_info -e` lists its variables)"
    ))
}

/// Environment variable overriding [`OfiConfig::pool_bytes`] (bytes; 0
/// disables the recycling of rendezvous buffers).
pub const ENV_POOL_BYTES: &str = "CHARMRS_OFI_POOL_BYTES";

impl OfiConfig {
    /// The defaults, with [`ENV_PACKET_MAX`], [`ENV_RECV_BUFFERS`], [`ENV_POOL_BYTES`],
    /// [`ENV_RNDV_PER_PEER`] and [`ENV_RNDV_BYTES_PER_PEER`] applied when set (the provider
    /// comes from the environment anyway, see [`OfiConfig::provider`]).
    ///
    /// # Errors
    ///
    /// [`TransportError::Bootstrap`] naming the variable if one is set but
    /// not a number, [`ENV_PACKET_MAX`] outside
    /// [`PACKET_MAX_MIN`]..=[`PACKET_MAX_LIMIT`], or [`ENV_RECV_BUFFERS`] or
    /// [`ENV_RNDV_PER_PEER`] 0. ([`ENV_RECV_BUFFERS`] above what the provider can post is
    /// refused by [`OfiLayer::new`](crate::OfiLayer::new), which knows the provider.)
    pub fn from_env() -> Result<OfiConfig, TransportError> {
        OfiConfig::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with the variables `env` gives.
    fn from_lookup(env: impl Fn(&str) -> Option<String>) -> Result<OfiConfig, TransportError> {
        let mut cfg = OfiConfig::default();
        let num = |name: &str| -> Result<Option<usize>, TransportError> {
            match env(name) {
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    TransportError::Bootstrap(format!("{name}={v:?} is not a number"))
                }),
                None => Ok(None),
            }
        };
        if let Some(v) = num(ENV_PACKET_MAX)? {
            if let Some(why) = packet_max_error(ENV_PACKET_MAX, v) {
                return Err(TransportError::Bootstrap(why));
            }
            cfg.packet_max = v;
        }
        if let Some(v) = num(ENV_RECV_BUFFERS)? {
            if v == 0 {
                return Err(TransportError::Bootstrap(format!(
                    "{ENV_RECV_BUFFERS}=0: at least one receive buffer is needed"
                )));
            }
            cfg.recv_buffers = v;
        }
        if let Some(v) = num(ENV_POOL_BYTES)? {
            cfg.pool_bytes = v;
        }
        if let Some(v) = num(ENV_RNDV_PER_PEER)? {
            if v == 0 {
                return Err(TransportError::Bootstrap(format!(
                    "{ENV_RNDV_PER_PEER}=0: at least one large message per peer must be \
                     allowed (larger values wait less for acknowledgements)"
                )));
            }
            cfg.rndv_per_peer = v;
        }
        if let Some(v) = num(ENV_RNDV_BYTES_PER_PEER)? {
            cfg.rndv_bytes_per_peer = v;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_packet_max_beyond_what_keeps_order_is_refused_naming_the_variable() {
        let err = OfiConfig::from_lookup(with(&[(ENV_PACKET_MAX, "262144")]))
            .expect_err("a 256 KiB packet_max");
        let text = err.to_string();
        assert!(
            text.contains("CHARMRS_OFI_PACKET_MAX")
                && text.contains("262144")
                && text.contains("out of order"),
            "{text}"
        );
        let err = OfiConfig::from_lookup(with(&[(ENV_PACKET_MAX, "4096")]))
            .expect_err("a 4 KiB packet_max");
        assert!(
            err.to_string().contains("CHARMRS_OFI_PACKET_MAX 4096"),
            "{err}"
        );
        // The bounds themselves, the default, and the value docs/performance.md tried.
        for ok in [PACKET_MAX_MIN, 16384, 65600, PACKET_MAX_LIMIT] {
            let cfg = OfiConfig::from_lookup(with(&[(ENV_PACKET_MAX, &ok.to_string())]))
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(cfg.packet_max, ok);
        }
        assert_eq!(
            OfiConfig::from_lookup(with(&[]))
                .expect("defaults")
                .packet_max,
            OfiConfig::default().packet_max
        );
    }

    #[test]
    fn the_rendezvous_bound_comes_from_the_environment() {
        let cfg = OfiConfig::from_lookup(with(&[])).expect("defaults");
        assert_eq!(
            (cfg.rndv_per_peer, cfg.rndv_bytes_per_peer),
            (DEFAULT_RNDV_PER_PEER, DEFAULT_RNDV_BYTES_PER_PEER)
        );
        let cfg = OfiConfig::from_lookup(with(&[
            (ENV_RNDV_PER_PEER, "3"),
            (ENV_RNDV_BYTES_PER_PEER, " 0 "),
        ]))
        .expect("a bound of 3 messages, one at a time by bytes");
        assert_eq!((cfg.rndv_per_peer, cfg.rndv_bytes_per_peer), (3, 0));
        let err = OfiConfig::from_lookup(with(&[(ENV_RNDV_PER_PEER, "0")])).expect_err("0");
        assert!(
            err.to_string().contains("CHARMRS_OFI_RNDV_PER_PEER=0"),
            "{err}"
        );
        let err = OfiConfig::from_lookup(with(&[(ENV_RNDV_BYTES_PER_PEER, "16M")]))
            .expect_err("not a number");
        assert!(
            err.to_string()
                .contains("CHARMRS_OFI_RNDV_BYTES_PER_PEER=\"16M\" is not a number"),
            "{err}"
        );
    }

    #[test]
    fn recv_buffers_are_at_most_what_the_provider_can_post() {
        let err = OfiConfig::from_lookup(with(&[(ENV_RECV_BUFFERS, "0")])).expect_err("0");
        assert!(
            err.to_string().contains("CHARMRS_OFI_RECV_BUFFERS=0"),
            "{err}"
        );
        assert_eq!(check_recv_buffers(1024, 1024, "shm"), Ok(1024));
        assert_eq!(check_recv_buffers(7, 0, "x"), Ok(7), "no limit known");
        let err = check_recv_buffers(1025, 1024, "shm").expect_err("1025 over shm");
        assert!(
            err.contains("CHARMRS_OFI_RECV_BUFFERS) 1025 ")
                && err.contains("at most 1024")
                && err.contains("FI_SHM_RX_SIZE"),
            "{err}"
        );
        // The provider whose endpoint takes the receives is the last of a layered name.
        let err = check_recv_buffers(4096, 2048, "tcp;ofi_rxm").expect_err("over rxm");
        assert!(
            err.contains("FI_OFI_RXM_RX_SIZE") && err.contains("2048"),
            "{err}"
        );
        // Only the default, which nobody asked for, is lowered to a shallower queue.
        assert_eq!(check_recv_buffers(DEFAULT_RECV_BUFFERS, 64, "x"), Ok(64));
        assert!(check_recv_buffers(DEFAULT_RECV_BUFFERS + 1, 64, "x").is_err());
        assert!(check_recv_buffers(0, 64, "x").is_err());
    }

    #[test]
    fn over_ofi_rxm_packet_max_is_at_most_its_eager_limit() {
        let none = with(&[]);
        let default = OfiConfig::default().packet_max;
        assert_eq!(check_packet_max(default, "tcp;ofi_rxm", &none), Ok(()));
        let err = check_packet_max(16385, "tcp;ofi_rxm", &none).expect_err("16385 over rxm");
        assert!(
            err.contains("CHARMRS_OFI_PACKET_MAX")
                && err.contains("FI_OFI_RXM_BUFFER_SIZE unset")
                && err.contains("16384"),
            "{err}"
        );
        // A larger rxm buffer raises the limit (tested: 30 kB eager messages in order with
        // FI_OFI_RXM_BUFFER_SIZE=32768), a smaller one lowers it.
        let big = with(&[("FI_OFI_RXM_BUFFER_SIZE", "32768")]);
        assert_eq!(check_packet_max(32768, "tcp;ofi_rxm", &big), Ok(()));
        let small = with(&[("FI_OFI_RXM_BUFFER_SIZE", "8192")]);
        assert!(check_packet_max(default, "verbs;ofi_rxm", &small).is_err());
        // Other providers: the general bounds only.
        assert_eq!(check_packet_max(PACKET_MAX_LIMIT, "shm", &none), Ok(()));
        assert!(check_packet_max(PACKET_MAX_LIMIT + 1, "shm", &none).is_err());
        assert!(check_packet_max(PACKET_MAX_MIN - 1, "shm", &none).is_err());
    }
}
