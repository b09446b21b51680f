//! The libfabric machine layer of charmrs: [`OfiLayer`] moves
//! [`Message`](charmrs_transport::Message)s between the processes of a job
//! over libfabric (OpenFabrics Interfaces) reliable datagram endpoints —
//! the `shm` provider within a node, `tcp;ofi_rxm` over TCP, and in
//! principle any provider offering `FI_EP_RDM` with `FI_MSG | FI_RMA`
//! without requiring local memory registration.
//!
//! # Guarantees
//!
//! * Per-pair send order (between two endpoints: with an endpoint per PE, from a PE's thread
//!   to a destination PE), exactly-once delivery, while both processes live.
//! * **Zero-copy large messages**: a message larger than a receive buffer
//!   ([`OfiConfig::packet_max`]) is read by the receiver with `fi_read`
//!   straight from the sender's registered segments into the buffer that
//!   becomes the delivered message. Eager messages are sent from the
//!   `Bytes` segments without a copy and copied once out of the receive
//!   buffer.
//! * **Bounded receive resources**: a fixed pool of pre-posted receive
//!   buffers, re-posted as soon as a packet is decoded; a flood waits in
//!   the provider (back-pressure), it never fails. The pool
//!   ([`OfiConfig::recv_buffers`], `CHARMRS_OFI_RECV_BUFFERS`) must fit the provider's receive
//!   queue (its `rx_attr.size`: 1024 for `shm`, 2048 for `tcp;ofi_rxm` in libfabric 1.17): a
//!   larger value stops the start with an error naming the variable, the value, the limit and
//!   the provider's variable that raises it (`FI_SHM_RX_SIZE`, `FI_OFI_RXM_RX_SIZE`).
//! * **Bounded registrations**: the large messages an endpoint has registered for one peer
//!   endpoint and not seen acknowledged are at most [`OfiConfig::rndv_per_peer`] (64,
//!   `CHARMRS_OFI_RNDV_PER_PEER`) and, beyond one message, [`OfiConfig::rndv_bytes_per_peer`]
//!   (16 MiB, `CHARMRS_OFI_RNDV_BYTES_PER_PEER`). Further large messages to a peer that reads
//!   slowly (or not at all) wait in its send queue, unregistered, with everything sent to it
//!   after them (so per-pair order holds), and go as its acknowledgements free registrations:
//!   `send` still never blocks, nothing fails or is dropped for it, and a peer lost meanwhile is
//!   reported as usual, what waited for it released. [`OfiLayer::rendezvous_usage`] shows
//!   the registrations and the queue towards a process.
//! * **Failure detection**: a peer that cannot be reached, or that exited
//!   on this host without shutting down, is reported as
//!   [`TransportError::PeerLost`](charmrs_transport::TransportError::PeerLost); so is a peer
//!   with which a large message's transfer failed (its read, descriptor or acknowledgement),
//!   even for a reason of this process, since per-pair order cannot be kept past it. Nothing a
//!   lost peer sent is delivered after the report, so no gap goes unnoticed.
//!
//! # Using it from a runtime
//!
//! * Select it with [`OfiLayer::from_env`]`(`[`OfiConfig::from_env`]`()?)`:
//!   `Ok(None)` outside `charmrun`. The provider comes from
//!   `CHARMRS_OFI_PROVIDER` (else `FI_PROVIDER`, else the first suitable one).
//! * [`OfiConfig::endpoints`]: one endpoint per process, or one per PE (a *lane* each, see
//!   [`MachineLayer::lanes`](charmrs_transport::MachineLayer::lanes)): a thread bound to
//!   its lane with `bind_lane` sends from that endpoint and polls it.
//! * `send`, `register` and `get` may be called from any thread. `progress`
//!   should be called by one thread per endpoint (it serializes on the endpoint's engine
//!   mutex anyway), and *regularly*: with manual-progress providers
//!   (`tcp;ofi_rxm`) peers' reads of an endpoint's large messages are
//!   served only while some thread is in its `progress`, `progress_wait` or in
//!   `barrier` (which keeps every endpoint progressing while it waits).
//! * [`set_wakeup`](charmrs_transport::MachineLayer::set_wakeup) succeeds
//!   only when the provider gives the completion queue a file descriptor
//!   (`tcp;ofi_rxm` does, `shm` does not), and calls the hook only after
//!   [`before_park`](charmrs_transport::MachineLayer::before_park) (while
//!   the caller polls, arrivals wake nobody); otherwise poll, or use
//!   [`OfiLayer::progress_wait`], which naps in slices of at most 100 µs.
//! * Drop the layer before the process exits: dropping it says goodbye to
//!   the peers; a process that exits with its layer alive is reported lost
//!   by the peers on its host. A drop that gives up on messages it accepted for sending (its
//!   [`OfiConfig::linger`] ran out, or a peer left or was lost first) says so in one line on
//!   stderr, naming them; a loss is never silent.
//!
//! # Use
//!
//! ```no_run
//! use charmrs_ofi::{OfiConfig, OfiLayer};
//! use charmrs_transport::{Header, MachineLayer, Message};
//! use std::time::Duration;
//!
//! // Started by `CHARMRS_OFI_PROVIDER=shm charmrun +p2 ./app`.
//! let layer = OfiLayer::from_env(OfiConfig::default())?.expect("run me under charmrun");
//! let peer = (layer.rank() + 1) % layer.size();
//! layer.send(peer, Message::new(Header::new(1, 0, 0, 42)))?;
//! layer.progress_wait(&mut |src, msg| println!("{src}: tag {}", msg.header().tag), Duration::from_secs(5))?;
//! # Ok::<(), charmrs_transport::TransportError>(())
//! ```
//!
//! [`wire`] documents the packets; the crate's `engine` module the
//! protocol state and its invariants.

mod config;
mod engine;
mod fabric;
mod layer;
#[cfg(test)]
mod test_support;
pub mod wire;

pub use config::{
    OfiConfig, DEFAULT_READ_WINDOW, DEFAULT_RECV_BUFFERS, DEFAULT_RNDV_BYTES_PER_PEER,
    DEFAULT_RNDV_PER_PEER, ENV_PACKET_MAX, ENV_POOL_BYTES, ENV_PROVIDER, ENV_RECV_BUFFERS,
    ENV_RNDV_BYTES_PER_PEER, ENV_RNDV_PER_PEER, PACKET_MAX_LIMIT, PACKET_MAX_MIN,
};
pub use layer::{OfiLayer, RndvUsage, ADDR_KEY, HOST_KEY, PROVIDER_KEY};
