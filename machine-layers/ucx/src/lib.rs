//! The UCX machine layer of charmrs: [`UcxLayer`] moves
//! [`Message`](charmrs_transport::Message)s between the processes of a job
//! with UCX's ucp active messages, over whatever transports UCX picks
//! (shared memory and CMA on one host, TCP, InfiniBand/RoCE verbs, ...).
//!
//! # Design
//!
//! * **One context; one worker per process, or one per PE**
//!   ([`UcxConfig::workers`]), each created in
//!   `UCS_THREAD_MODE_SERIALIZED` behind a spin lock (one compare-and-swap
//!   and one plain store per `progress`; see `spin.rs`). The runtime progresses
//!   each worker from one thread (with one worker, its network PE; with one per
//!   PE, each PE its own, bound with `MachineLayer::bind_lane`); any
//!   thread may send: it sends directly when the worker is free, otherwise
//!   the message goes on a lock-free queue that the progressing thread
//!   empties at the start of each `progress` (and is woken for, if it
//!   sleeps), so `send` never blocks on the progress loop.
//! * **Addresses** (a list per process, one per worker) are exchanged through the job's
//!   [`Bootstrap`](charmrs_transport::Bootstrap) (put, fence, get);
//!   **endpoints** are created lazily, with peer failure detection.
//! * **Eager messages** are one `ucp_am_send_nbx` each: a compact 28-byte
//!   AM header carries the message header's fields, the sender's rank, a
//!   sequence number and all segment lengths but the last ([`wire`]); the
//!   data part is the segments as an iov, except that a message of several
//!   segments totalling at most 512 bytes is gathered into one buffer, which
//!   lets UCX use its fastest ("short") shared-memory protocol, and that a
//!   message of 16 KiB or more whose segments but the last total at most
//!   1 KiB (an entry call's arguments before its buffer) travels *split*:
//!   the small segments inside the AM header, the last one as the whole,
//!   contiguous data part, which UCX's rendezvous reads with one zero-copy
//!   get (CMA on shared memory) instead of copying an iov through its
//!   bounce buffers on both sides ([`wire`] has the layout;
//!   `docs/performance.md`, session 12, the measurements behind the
//!   bounds).
//! * **Eager messages from 1 KiB are delivered in place**: the receive
//!   callback keeps UCX's descriptor and hands the runtime `Bytes` that
//!   view it; the descriptor goes back to UCX after the last view is
//!   dropped (`held`). Smaller ones are copied out.
//! * **Large messages** use UCX's active-message rendezvous: the receive
//!   callback takes a buffer from a pool of reusable ones (a fresh
//!   multi-megabyte allocation per message costs more in page faults than
//!   the copy) and calls `ucp_am_recv_data_nbx`, so the bytes land
//!   directly in the `Bytes` that becomes the delivered segment; the
//!   buffer returns to the pool when the runtime drops the last view of
//!   it. At most two announced messages are fetched at once, one when its
//!   data is a single buffer a same-host peer's CMA copies on this core;
//!   the others keep their UCX descriptor until a fetch completes, in
//!   arrival order (fetching a whole stream at once spread the copies over
//!   as many cold buffers: 5× slower). A split message's data lands at the
//!   sender's offset within a cache line.
//!   Measured against the alternative (`register` + `get` through a packed
//!   rkey, see the benchmark), the rendezvous is kept: it needs no extra
//!   round trip for the key and the completion.
//! * **Order and exactly-once** delivery per sender come from the sequence
//!   numbers, independent of how UCX completes eager and rendezvous
//!   messages.
//! * **Wake-up**: `progress_wait` sleeps on the worker's event fd after
//!   `ucp_worker_arm`; `set_wakeup` is supported through a watcher thread
//!   on the same fd: the poller arms the worker when it is about to sleep
//!   (`before_park`); as a fallback `progress` arms it after
//!   [`UcxConfig::arm_after`] without arrivals, and if the progressing
//!   thread stops calling `progress` without having armed, the watcher arms
//!   it within 1–64 ms (it checks every millisecond at first, less often
//!   while the thread keeps progressing), or calls the hook instead when
//!   the thread must come back (UCX holds operations of ours, arrivals or
//!   failures wait for it).
//! * **Lost peers**: endpoints to other hosts use UCX's peer error
//!   handling. Endpoints to processes on the same host do not by default
//!   (UCX 1.13 cannot use its zero-copy shared-memory transport, CMA, on
//!   such endpoints: large messages would go through bounce buffers at a
//!   fraction of the bandwidth); instead the layer checks those peers'
//!   `/proc` entries every [`UcxConfig::liveness_interval`] (busy or idle).
//!   Either way a dead peer becomes one `PeerLost`, and operations towards
//!   it are no longer waited for (flush, parking, the linger of a drop). A
//!   peer that said goodbye is not reported, unless a message of its is lost
//!   with it (announced, its data never fetched).
//! * **Shutdown**: dropping the layer finishes queued sends, waits up to
//!   [`UcxConfig::linger`] for UCX to complete them, says goodbye and closes the endpoints.
//!   The sends it then gives up on (not completed: still held, or cancelled by a forced close)
//!   are named in one line on stderr — rank, count, peer processes, why — unless they all went
//!   to peers whose loss was reported already; a loss is never silent.
//! * **Remote reads**: `register` = `ucp_mem_map` + packed rkey;
//!   `get` = `ucp_get_nbx`.
//!
//! # Use
//!
//! ```no_run
//! use charmrs_transport::{Header, MachineLayer, Message};
//! use charmrs_ucx::UcxLayer;
//! use std::time::Duration;
//!
//! // Started by `charmrun +p2 ./app` (UCX_TLS=shm,self for shared memory).
//! let layer = UcxLayer::from_env()?.expect("run me under charmrun");
//! let peer = (layer.rank() + 1) % layer.size();
//! layer.send(peer, Message::new(Header::new(1, 0, 0, 42)))?;
//! layer.progress_wait(&mut |src, msg| println!("{src}: tag {}", msg.header().tag), Duration::from_secs(5))?;
//! # Ok::<(), charmrs_transport::TransportError>(())
//! ```

mod context;
mod held;
mod inbox;
mod layer;
mod spin;
mod status;
mod wake;
pub mod wire;
mod worker;

pub use layer::{UcxConfig, UcxLayer, ADDR_KEY};
