//! The TCP machine layer of charmrs: [`TcpLayer`] moves
//! [`Message`](charmrs_transport::Message)s between the processes of a job
//! over TCP, with no system library.
//!
//! # Guarantees
//!
//! * **Authenticated**: every connection starts with a handshake carrying
//!   the job secret (both ways); anything else is refused and logged to
//!   stderr with the peer address, and never disturbs the job.
//! * **Hostile-input safe**: frames are length-checked against
//!   [`TcpConfig::max_frame`] before any allocation and decoded with the
//!   transport's checked codec; a malformed frame drops that connection and
//!   is reported through `progress` as
//!   [`TransportError::Malformed`](charmrs_transport::TransportError::Malformed)
//!   naming the peer.
//! * **Zero-copy**: a send writes the frame prefix and then each `Bytes`
//!   segment with vectored writes; a received frame is one buffer whose
//!   segments are views of it.
//! * **Bounded memory**: no user-space send queue (a send waits while the
//!   socket is full, reading all its own input meanwhile so that two
//!   processes sending to each other cannot deadlock) and a bounded
//!   read-ahead queue for the watcher ([`TcpConfig::recv_queue_bytes`]);
//!   past it, TCP pushes back on the senders.
//! * **Input is read by whoever gets there first**: `progress` reads the
//!   non-blocking sockets on the calling thread when input arrived; the
//!   layer's watcher thread wakes a parked poller (see
//!   [`TcpLayer::set_wakeup`]) and reads ahead what the poller has not
//!   taken, so a busy or descheduled process does not hold its senders up.
//! * **Failure detection**: a peer that dies is reported by `progress` as
//!   [`TransportError::PeerLost`](charmrs_transport::TransportError::PeerLost)
//!   (on loopback, within milliseconds), after every message it sent
//!   before dying; a peer that shuts its layer down cleanly is not. A peer
//!   whose host goes silent (crash, power loss, cut network: no FIN or
//!   RST) is found by TCP keepalive probes on every connection, ~5 s after
//!   its last traffic on an idle connection, and reported at most
//!   [`TcpConfig::loss_wait`] (5 s by default) later: a loss found on the
//!   stream to a peer waits for the end of the peer's stream to this
//!   process (its last messages first), but a stream that stays open and
//!   silent that long is cut and the loss reported without its end (so
//!   ~10 s in all). A connection with data in flight, which keepalive does
//!   not probe (the kernel alone would give it up only at its retransmission
//!   limit, `net.ipv4.tcp_retries2`, ~15 minutes), is watched instead: once
//!   the peer's host has acknowledged nothing for [`TcpConfig::ack_timeout`]
//!   (10 s by default) or, its receive window closed, left two probes of it
//!   unanswered, the peer is lost, and sends waiting for room towards it
//!   fail. A peer that merely reads nothing is never taken for a silent host
//!   (its kernel answers the probes of its closed window).
//! * **Loopback by default**: it listens on `127.0.0.1` unless
//!   [`TcpConfig::bind`] says otherwise.
//!
//! # Use
//!
//! ```no_run
//! use charmrs_tcp::{TcpConfig, TcpLayer};
//! use charmrs_transport::{Header, MachineLayer, Message};
//! use std::time::Duration;
//!
//! // Started by `charmrun +p2 ./app`: bootstrap and secret come from the environment.
//! let layer = TcpLayer::from_env(TcpConfig::default())?.expect("run me under charmrun");
//! let peer = (layer.rank() + 1) % layer.size();
//! layer.send(peer, Message::new(Header::new(1, 0, 0, 42)))?;
//! layer.progress_wait(&mut |src, msg| println!("{src}: tag {}", msg.header().tag), Duration::from_secs(5))?;
//! # Ok::<(), charmrs_transport::TransportError>(())
//! ```
//!
//! [`wire`] documents the protocol.

mod acks;
mod conn;
pub mod interfaces;
mod layer;
mod poll;
mod recv;
mod shared;
pub mod wire;

pub use acks::MIN_ACK_TIMEOUT;
pub use layer::{TcpConfig, TcpLayer, TcpStats};
