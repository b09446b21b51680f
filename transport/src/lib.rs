//! Machine-layer interface of charmrs: the small contract between the
//! message-driven runtime and whatever moves bytes between processes, in the
//! spirit of Converse's LRTS.
//!
//! # Layer model
//!
//! A charmrs job is a set of *processes* (ranks `0..size`), each running one
//! or more *PEs* (processing elements, one worker thread each). This crate
//! deals only with processes:
//!
//! * A [`MachineLayer`] delivers [`Message`]s from one process to another
//!   (small ones possibly lent as an [`Arrival`] instead of owned),
//!   offers one-sided reads of registered memory ([`MachineLayer::register`],
//!   [`MachineLayer::get`]), a barrier and job abort. Implementations live in
//!   their own crates (`machine-layers/local`, future TCP/UCX/OFI layers).
//! * PEs inside one process never talk through this trait: the runtime owns
//!   in-memory mailboxes for them. A message crosses a machine layer only
//!   when its destination PE lives in another process; the header's
//!   `src_pe`/`dst_pe` then tell the receiving runtime which mailbox gets it.
//! * A [`Bootstrap`] wires the job up before the layer exists (rank, size,
//!   exchange of addresses), like PMI.
//! * [`Topology`] tells the runtime which cores its PEs may be pinned to.
//! * [`pool`] lends machine layers reusable receive buffers for large
//!   messages ([`RecvPool`]); [`huge`] maps the huge-page memory that large
//!   buffers are best sent from and received into ([`HugeRegion`]);
//!   [`allocator`] keeps freed message-sized heap memory in the process for
//!   reuse (one glibc setting made when a job starts).
//! * [`undelivered`] words the one line a dropped layer prints about messages
//!   it gave up on.
//! * [`kv`] is the launcher bootstrap: the key-value server `charmrun` runs
//!   ([`KvServer`]) and the [`Bootstrap`] its processes use ([`KvBootstrap`]),
//!   with the environment-variable contract between them.
//! * [`lanes`] names the endpoints of a layer with one endpoint per PE (a *lane*;
//!   [`MachineLayer::lanes`]) and encodes the address lists their processes publish.
//!
//! Messages are a fixed [`Header`] plus zero-copy [`bytes::Bytes`]
//! segments; stream transports frame them with [`encode_frame_prefix`] and
//! [`decode_frame`], which treat input as hostile. Every fallible operation
//! reports a [`TransportError`].
//!
//! # Cargo features
//!
//! * `hwloc` (off by default): use the hwloc system library for
//!   [`Topology::detect`] so physical cores are preferred over hyperthreads.

pub mod allocator;
pub mod arrival;
pub mod bootstrap;
pub mod bounded;
pub mod error;
pub mod huge;
pub mod kv;
pub mod lanes;
pub mod layer;
pub mod liveness;
pub mod memory;
pub mod message;
pub mod pool;
pub mod segments;
pub mod topology;
pub mod undelivered;

pub use arrival::{Arrival, ArrivalBatch};
pub use bootstrap::{Bootstrap, SingleProcessBootstrap};
pub use error::TransportError;
pub use huge::HugeRegion;
pub use kv::{KvBootstrap, KvEvent, KvServer};
pub use layer::{MachineLayer, ProcessId, NAP_MAX, NAP_SPIN};
pub use memory::{MemRegion, RemoteKey};
pub use message::{
    decode_frame, decode_frame_bytes, encode_frame_prefix, largest_segment_start,
    parse_single_segment_frame, peek_frame_len, peek_largest_segment_start,
    single_segment_frame_len, write_single_segment_frame, Header, Message, MAGIC, MAX_SEGMENTS,
    WIRE_VERSION,
};
pub use pool::{PoolBuf, RecvPool};
pub use segments::Segments;
pub use topology::{CoreId, Topology};
