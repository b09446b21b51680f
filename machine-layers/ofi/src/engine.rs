//! The protocol engine of one endpoint: everything that touches its libfabric objects, run
//! under that endpoint's engine mutex (its domain is `FI_THREAD_DOMAIN`). Peers are endpoint
//! ids (`process · lanes + lane`, see [`charmrs_transport::lanes`]).
//!
//! # What this module owns
//!
//! * The pre-posted receive pool: `recv_buffers` buffers of `packet_max`
//!   bytes, each with a permanent operation context. A completed receive is
//!   decoded (an eager message is copied out once into a fresh buffer) and
//!   the buffer is re-posted at once, so the pool never drains while the
//!   progress thread runs; a flood beyond it waits in the provider (its
//!   unexpected-message queue, then back-pressure: `-FI_EAGAIN` at the
//!   sender), never fails. A buffer the provider does not take back is retried while it
//!   answers `-FI_EAGAIN`; any other failure is reported ([`TransportError::Io`] naming
//!   `fi_recv`) and the buffer left out. So is an error entry of the completion queue that
//!   `fi_cq_readerr` cannot read (naming it and what it returned).
//! * Per-peer send queues of work not yet accepted by the provider
//!   (`-FI_EAGAIN`), posted in FIFO order, so per-pair order holds.
//! * Small packets (up to the provider's `inject_size`) go with
//!   `fi_inject`, assembled in a reused buffer (no context, no completion).
//! * Eager sends: one `fi_sendmsg` whose iovec is the packet prefix and
//!   the message's `Bytes` segments (no copy), kept alive in the operation
//!   context until the send completion; messages with more segments than
//!   the provider's iovec limit are coalesced into one buffer.
//! * Rendezvous for messages larger than a receive buffer: the sender
//!   registers its segments (`fi_mr_reg`, `FI_REMOTE_READ`) and sends a
//!   descriptor; the receiver `fi_read`s every segment into one freshly
//!   allocated buffer whose slices become the message's segments (zero
//!   copies; the buffer comes from a [`RecvPool`]), then
//!   sends an ACK, on which the sender drops registrations
//!   and segments. An ACK from another peer than the transfer's destination, for a transfer
//!   never issued, or (from a live peer) for one no longer outstanding is
//!   [`TransportError::Malformed`] naming its sender; a late one from a peer that left or was
//!   lost (its transfers were dropped with it) is ignored.
//! * The rendezvous bound: per peer, the messages in `rndv_out` (registered, not acknowledged)
//!   are counted with their bytes ([`RndvCount`]). A large message at the head of a peer's
//!   queue that would exceed [`Sizes::rndv_per_peer`] or [`Sizes::rndv_bytes_per_peer`] (one
//!   always goes when none is outstanding) is handed back unregistered and the queue is *held*:
//!   skipped by `post_pending`, and not counted against `quiet` (only an ACK, a completion that
//!   wakes a sleeping thread, moves it), until an ACK from that peer frees a registration. The
//!   queue is FIFO, so what was sent to the peer after the held message (eager ones too, and
//!   `send_copy`'s injections, which go only when the queue is empty) stays behind it. Reads
//!   and ACKs (`urgent`) are never held, so two processes sending each other large messages
//!   cannot wait for each other. A lost or departed peer's held queue is dropped with the rest
//!   of its work; at shutdown, once the linger ran out, the bound is lifted
//!   (`goodbye_anyway`).
//! * Per-source delivery order: a rendezvous message holds back later
//!   messages from its source until its reads complete.
//! * Failure bookkeeping: a `get` the target refused (unknown key, range,
//!   access) is reported as [`TransportError::Malformed`] — except over the
//!   `tcp` provider, which drops the connection over it, so the peer is
//!   lost. Any other failed
//!   operation towards a peer, or a local peer process that died without
//!   saying goodbye, makes the peer lost:
//!   reported once as [`TransportError::PeerLost`], its queue dropped, and
//!   later sends to it refused. A post the provider refuses for an argument or resource error
//!   of this process is this process's failure ([`TransportError::Io`] naming the call): the
//!   operation is dropped, the peer stays — except a post for a large message's transfer (a
//!   read, its descriptor, its ACK): per-pair order cannot be kept past that message, so the
//!   peer is lost, the reason naming the call and saying it failed in this process. A sender
//!   one of whose large messages cannot be read is reported lost even if it said goodbye
//!   (what it sent before its goodbye is lost with it).
//! * A lost peer's messages are not delivered any more: neither those held back in its order
//!   nor those that still arrive (its order keeps only a `Slot::Broken` mark, which keeps its
//!   packets off the in-order fast path). Its large messages being read are marked failed and
//!   end, their buffers back in the pool, once their reads in flight complete (the reads not
//!   posted yet are counted down when dropped).
//! * Goodbyes: at shutdown an endpoint says goodbye (BYE) to a peer only once nothing is queued
//!   for it and it read every large message this endpoint sent it (or the linger ran out), so
//!   the goodbye is the last thing the peer gets from it. A peer that said goodbye is
//!   [`DEPARTED`]: what this endpoint would still send it is dropped and later sends are
//!   refused, but what it sent this endpoint is still read and delivered in order (another
//!   endpoint of its process may say goodbye before this one's peer is done).
//! * The shutdown's report: what an endpoint accepted for sending and does not know delivered
//!   at the end — queued messages, large ones not acknowledged (`rndv_count`), eager sends the
//!   provider did not complete (`eager_inflight`, counted when posted with a context), and
//!   what was dropped for a peer that left or was lost (`dropped`, counted where it is dropped)
//!   — per peer and why ([`Engine::undelivered`]), for the layer's one line on stderr.
//!
//! # Invariants
//!
//! * Every posted operation's context is a `Box<Op>` leaked with
//!   `Box::into_raw` (receive contexts are permanent and owned by the
//!   engine); it is reclaimed exactly once, from its completion or error
//!   entry, so the buffers it holds outlive the provider's use of them.
//! * A rendezvous receive buffer is written only by the provider, and only
//!   exposed as a message once every read into it completed successfully.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_ofi_sys as sys;
use charmrs_transport::lanes::{process_of, EndpointName};
use charmrs_transport::liveness::Identity;
use charmrs_transport::{ArrivalBatch, Header, Message, ProcessId, TransportError};

use crate::fabric::{ofi_error, strerror, Fabric, Mr};
use crate::wire;
use charmrs_transport::pool::COPY_ALIGN;
use charmrs_transport::undelivered::{Tally, Undelivered, Why};
use charmrs_transport::{PoolBuf, RecvPool};

/// Peer status values shared with the layer's lock-free `send` check.
pub(crate) const ALIVE: u8 = 0;
/// The peer was lost (reported once).
pub(crate) const LOST: u8 = 1;
/// The peer said goodbye.
pub(crate) const DEPARTED: u8 = 2;

/// Why a peer whose process is [`DEPARTED`] or [`LOST`] (as this process's endpoints share it,
/// see `Engine::processes`) is refused.
pub(crate) fn gone_reason(fate: u8) -> &'static str {
    if fate == DEPARTED {
        "the process shut its ofi layer down"
    } else {
        "its process exited without shutting down"
    }
}

/// Work for the provider, queued per peer until it accepts it.
pub(crate) enum Out {
    /// An application message (eager or rendezvous decided when posted).
    Msg(Message),
    /// A control packet (rendezvous descriptor, ACK, BYE).
    Ctl(Vec<u8>),
    /// One chunk of a rendezvous read.
    Read {
        in_id: u64,
        offset: usize,
        len: usize,
        addr: u64,
        key: u64,
    },
    /// A one-sided read for [`MachineLayer::get`](charmrs_transport::MachineLayer::get).
    Get {
        addr: u64,
        key: u64,
        len: usize,
        kind: u8,
        tag: u64,
    },
}

/// An operation context handed to libfabric.
#[repr(C)]
struct Op {
    /// Provider scratch space (FI_CONTEXT/FI_CONTEXT2); first, so the
    /// context pointer is the Op pointer.
    ctx: sys::fi_context2,
    kind: OpKind,
}

enum OpKind {
    Recv(usize),
    Send {
        dst: ProcessId,
        msg: Message,
        _prefix: Vec<u8>,
        _iov: Vec<sys::iovec>,
    },
    Ctl {
        dst: ProcessId,
        buf: Vec<u8>,
    },
    Read {
        src: ProcessId,
        in_id: u64,
    },
    Get {
        src: ProcessId,
        buf: Vec<u8>,
        /// Bytes read (the buffer's capacity may be larger).
        len: usize,
        kind: u8,
        tag: u64,
    },
}

/// A registered large message waiting for the receiver's ACK.
struct OutRndv {
    dst: ProcessId,
    /// The message's bytes, counted in its peer's [`RndvCount`].
    bytes: usize,
    /// Declared before the segments, so closed before they are freed (fields drop in order): a
    /// registration must not outlive its memory (`fabric::Mr`).
    _mrs: Vec<Mr>,
    _segs: Vec<Bytes>,
}

/// A large message being read.
struct InRndv {
    src: ProcessId,
    remote_id: u64,
    header: Header,
    lens: Vec<usize>,
    segs: Vec<wire::RemoteSeg>,
    /// The inline segments' bytes (copied into `buf` when it is taken).
    inline: Vec<u8>,
    /// Filled by the reads from `start` on (`total` bytes); `None` until admitted.
    buf: Option<PoolBuf>,
    /// Where in `buf` the message begins (see [`InRndv::take_buffer`]).
    start: usize,
    /// Its bytes count in the read window (`Engine::reading`); a message
    /// with nothing to read completes without.
    admitted: bool,
    total: usize,
    remaining: usize,
    failed: bool,
}

impl InRndv {
    /// Takes the message's buffer from `pool` and copies the inline segments' bytes to their
    /// offsets (the reads fill the rest). The message starts where its largest read segment
    /// lands at the same offset within a cache line as in the sender (when the provider
    /// addresses memory by virtual address): the copy between co-aligned buffers is faster
    /// (as in the UCX layer's split messages).
    fn take_buffer(&mut self, pool: &Arc<RecvPool>) {
        let mut buf = pool.take(self.total);
        let mut largest = None::<(u64, usize, u64)>; // (len, offset in the message, remote addr)
        let mut offset = 0usize;
        for s in &self.segs {
            if !s.is_inline() && largest.is_none_or(|(len, _, _)| s.len > len) {
                largest = Some((s.len, offset, s.addr));
            }
            offset += s.len as usize;
        }
        // The message starts where its largest segment, `at` bytes in, lands at `addr`'s
        // alignment.
        self.start = largest.map_or(0, |(_, at, addr)| {
            buf.aligned_offset(self.total, (addr as usize).wrapping_sub(at), COPY_ALIGN)
        });
        let bytes = &mut buf.as_mut_slice()[self.start..];
        let (mut offset, mut from) = (0usize, 0usize);
        for s in &self.segs {
            let len = s.len as usize;
            if s.is_inline() {
                bytes[offset..offset + len].copy_from_slice(&self.inline[from..from + len]);
                from += len;
            }
            offset += len;
        }
        self.buf = Some(buf);
    }
}

/// A message slot in a source's delivery order.
enum Slot {
    Ready(Message),
    Waiting(u64),
    /// The source is lost (`drop_work`): the only slot left, nothing it sends is delivered any
    /// more. Keeping its order non-empty keeps its packets off the in-order fast path, which
    /// checks nothing else.
    Broken,
}

/// A registration made through `MachineLayer::register`, kept until its
/// region is dropped.
pub(crate) struct Registered {
    /// Closed when the entry is removed. (An empty buffer is not registered, nor kept here.)
    pub(crate) _mr: Mr,
    pub(crate) buf: Bytes,
}

/// The large messages an endpoint has registered for one peer and not seen acknowledged yet
/// (`Engine::rndv_out`), bounded by [`Sizes::rndv_per_peer`] and [`Sizes::rndv_bytes_per_peer`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RndvCount {
    /// Messages outstanding.
    pub(crate) messages: usize,
    /// Their bytes.
    pub(crate) bytes: usize,
    /// The most messages outstanding at once, since the start.
    pub(crate) peak_messages: usize,
    /// The most bytes outstanding at once, since the start.
    pub(crate) peak_bytes: usize,
    /// Items queued for the peer, not handed to the provider yet.
    pub(crate) queued: usize,
}

/// Smallest receive-pool class (rendezvous messages are larger than a packet, 16 KiB by
/// default).
pub(crate) const RNDV_POOL_MIN: usize = 64 << 10;

/// Sizes the engine works with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// Size of one receive buffer = largest packet.
    pub(crate) packet_max: usize,
    /// Number of receive buffers.
    pub(crate) recv_buffers: usize,
    /// Largest message (or `get`) accepted.
    pub(crate) max_message: u64,
    /// How long a local peer found dead is given to deliver its goodbye.
    pub(crate) grace: Duration,
    /// How often local peers' liveness is checked.
    pub(crate) liveness_interval: Duration,
    /// Bytes of rendezvous messages read at once from one sender.
    pub(crate) read_window: usize,
    /// Large messages registered for one peer and not acknowledged yet, at most.
    pub(crate) rndv_per_peer: usize,
    /// Their bytes, at most (one message always goes).
    pub(crate) rndv_bytes_per_peer: usize,
}

/// See the module docs.
pub(crate) struct Engine {
    pub(crate) fab: ManuallyDrop<Fabric>,
    /// This endpoint's id in the job (`process · lanes + lane`, see
    /// [`charmrs_transport::lanes`]); peers are named by theirs.
    me: u32,
    /// Endpoints per process.
    lanes: u32,
    addrs: Vec<sys::fi_addr_t>,
    /// Per peer: something was sent to it or received from it. See [`Engine::watches`].
    talked: Vec<bool>,
    /// Peers owed a goodbye at shutdown, not sent yet ([`Engine::send_goodbyes`]).
    owed_goodbyes: Vec<ProcessId>,
    /// Per process, shared by the endpoints of this process: [`ALIVE`], [`DEPARTED`] (it said
    /// goodbye to one of them) or [`LOST`] (the first endpoint found it gone, see
    /// [`Engine::check_liveness`]). Each engine applies it to that process's endpoints
    /// ([`Engine::catch_up`]).
    processes: Arc<Vec<AtomicU8>>,
    sizes: Sizes,
    recv_bufs: Vec<Box<[u8]>>,
    recv_ops: Vec<*mut Op>,
    /// Receives that could not be re-posted yet.
    repost: Vec<usize>,
    pending: Vec<VecDeque<Out>>,
    queued: usize,
    /// Reads and ACKs, posted before the peer queues, each peer's in order (a peer whose
    /// item the provider cannot take yet holds up only its own: [`post_per_peer`]).
    urgent: VecDeque<(ProcessId, Out)>,
    next_out: u64,
    rndv_out: HashMap<u64, OutRndv>,
    /// Per peer: its entries in `rndv_out` (their number and bytes, kept with the map).
    rndv_count: Vec<RndvCount>,
    /// Per peer: its send queue waits for an acknowledgement to free a registration (the
    /// large message at its head would exceed the bound): not posted again until one comes.
    held: Vec<bool>,
    /// The peers whose `held` is set.
    held_peers: Vec<ProcessId>,
    /// The rendezvous bound no longer applies (the linger of a dropped layer ran out).
    unbounded: bool,
    next_in: u64,
    rndv_in: HashMap<u64, InRndv>,
    /// Rendezvous messages whose reads have not started, per sender, oldest first.
    admit_queue: Vec<VecDeque<u64>>,
    /// The senders with messages in `admit_queue`.
    admit_sources: Vec<ProcessId>,
    /// Bytes of admitted rendezvous messages not yet completed, per sender: the read window
    /// applies to each sender apart, so a sender whose reads stall (its process busy in a long
    /// entry method cannot serve them over a network) holds up only its own.
    reading: Vec<usize>,
    order: Vec<VecDeque<Slot>>,
    /// Messages ready for the sink, in delivery order.
    pub(crate) ready: ArrivalBatch,
    /// Errors to report from `progress`, oldest first.
    pub(crate) errors: VecDeque<TransportError>,
    /// Operations given to the provider and not completed yet (not
    /// counting receives).
    inflight: usize,
    /// Per peer: the eager messages among them (`fi_sendmsg` with a context; injected ones
    /// complete at once), for the shutdown's report ([`Engine::undelivered`]).
    eager_inflight: Vec<Tally>,
    /// Per peer: application messages dropped unsent or unread — the peer was lost or said
    /// goodbye first, or their send failed with it — for the shutdown's report. Only counted
    /// where they are dropped, never on the send path.
    dropped: Vec<Tally>,
    /// Set when the shutdown begins ([`Engine::say_goodbye`]): per peer, whether its loss was
    /// reported to the runtime before (the shutdown's report only mentions those).
    reported_lost: Option<Vec<bool>>,
    pub(crate) status: Arc<Vec<AtomicU8>>,
    pub(crate) reasons: Vec<Option<String>>,
    /// Per process: its pid if it runs on this host (liveness checks).
    local_peers: Vec<Option<Identity>>,
    /// When peers were last checked ([`coarse_now`]).
    last_liveness: Duration,
    next_key: u64,
    /// Registrations of `MachineLayer::register`, by their key (the provider's, or the one
    /// asked for, which [`next_key`](Self::next_key) gave; only non-empty buffers).
    pub(crate) regions: HashMap<u64, Registered>,
    /// Reused buffer for injected packets.
    scratch: Vec<u8>,
    /// Recycled buffers for rendezvous reads.
    pool: Arc<RecvPool>,
    /// Unit tests only: posts made to fail (see [`Engine::fault`]).
    #[cfg(test)]
    faults: Vec<(u8, usize, isize)>,
}

/// What [`Engine::fault`] calls a rendezvous read (control packets go by their type).
const FAULT_READ: u8 = 0;

// SAFETY: the raw pointers are operation contexts owned by the engine
// (module invariants) and libfabric handles (see Fabric's Send impl); the
// engine is only used behind the layer's mutex.
unsafe impl Send for Engine {}

impl Engine {
    /// The engine of endpoint `me` (of `lanes` per process) over `fab`, whose address vector
    /// holds the peer endpoints at `addrs` (index = endpoint id); `processes` is shared by the
    /// engines of this process, and `local_peers` identifies the processes whose liveness it
    /// can check (same host and PID namespace; both index = process); rendezvous messages are
    /// read into buffers of `pool`. Posts the receive pool.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        fab: Fabric,
        me: u32,
        lanes: u32,
        addrs: Vec<sys::fi_addr_t>,
        sizes: Sizes,
        status: Arc<Vec<AtomicU8>>,
        processes: Arc<Vec<AtomicU8>>,
        local_peers: Vec<Option<Identity>>,
        pool: Arc<RecvPool>,
    ) -> Result<Engine, TransportError> {
        let n = addrs.len();
        let mut e = Engine {
            fab: ManuallyDrop::new(fab),
            me,
            lanes,
            talked: vec![false; n],
            owed_goodbyes: Vec::new(),
            processes,
            addrs,
            sizes,
            recv_bufs: Vec::with_capacity(sizes.recv_buffers),
            recv_ops: Vec::with_capacity(sizes.recv_buffers),
            repost: Vec::new(),
            pending: (0..n).map(|_| VecDeque::new()).collect(),
            queued: 0,
            urgent: VecDeque::new(),
            next_out: 1,
            rndv_out: HashMap::new(),
            rndv_count: vec![RndvCount::default(); n],
            held: vec![false; n],
            held_peers: Vec::new(),
            unbounded: false,
            next_in: 1,
            rndv_in: HashMap::new(),
            admit_queue: (0..n).map(|_| VecDeque::new()).collect(),
            admit_sources: Vec::new(),
            reading: vec![0; n],
            order: (0..n).map(|_| VecDeque::new()).collect(),
            ready: ArrivalBatch::new(),
            errors: VecDeque::new(),
            inflight: 0,
            eager_inflight: vec![Tally::default(); n],
            dropped: vec![Tally::default(); n],
            reported_lost: None,
            status,
            reasons: vec![None; n],
            local_peers,
            last_liveness: coarse_now(),
            next_key: 1,
            regions: HashMap::new(),
            scratch: Vec::new(),
            pool,
            #[cfg(test)]
            faults: Vec::new(),
        };
        for i in 0..sizes.recv_buffers {
            e.recv_bufs
                .push(vec![0u8; sizes.packet_max].into_boxed_slice());
            e.recv_ops.push(Box::into_raw(Box::new(Op {
                ctx: sys::fi_context2::default(),
                kind: OpKind::Recv(i),
            })));
            let ret = e.post_recv(i);
            if ret < 0 {
                return Err(ofi_error(
                    "fi_recv (pre-posting the receive pool)",
                    ret as i64,
                ));
            }
        }
        Ok(e)
    }

    /// Peer endpoint `id` as a user knows it, for errors: its process, and with an endpoint per
    /// PE also its PE.
    pub(crate) fn peer(&self, id: ProcessId) -> EndpointName {
        EndpointName {
            id,
            lanes: self.lanes,
        }
    }

    /// Whether this engine says goodbye to peer `p` at shutdown: peers it talked with, and —
    /// for the first endpoint of a process — the first endpoint of every process. So every
    /// process's first endpoint hears of every other's going (and, with the shared
    /// `processes`, so do the endpoints of its process), while a job with an endpoint per PE
    /// does not send `lanes²` goodbyes per pair of processes.
    fn watches(&self, p: usize) -> bool {
        self.talked[p] || (self.first() && (p as u32).is_multiple_of(self.lanes))
    }

    /// Whether this is the first endpoint of its process (the one that checks whether the
    /// processes on its host still run).
    fn first(&self) -> bool {
        self.me.is_multiple_of(self.lanes)
    }

    /// A fresh registration key (used when the provider does not choose).
    pub(crate) fn next_key(&mut self) -> u64 {
        let k = self.next_key;
        self.next_key += 1;
        k
    }

    /// Unit tests only: the next [`next_key`](Self::next_key) is `key` (as a provider choosing its
    /// keys could hand out a number the counter gave already).
    #[cfg(test)]
    pub(crate) fn rewind_keys(&mut self, key: u64) {
        self.next_key = key;
    }

    fn post_recv(&mut self, i: usize) -> isize {
        let buf = &mut self.recv_bufs[i];
        // SAFETY: the endpoint is open; buffer i and its permanent context
        // live in the engine until after the endpoint is closed (Drop), and
        // buffer i is not posted twice (it is only re-posted after its
        // completion was handled).
        unsafe {
            sys::fi_recv(
                self.fab.ep,
                buf.as_mut_ptr().cast::<c_void>(),
                buf.len(),
                std::ptr::null_mut(),
                sys::FI_ADDR_UNSPEC,
                self.recv_ops[i].cast::<c_void>(),
            )
        }
    }

    /// Posts receive buffer `i` again after its completion (or failure). One the provider cannot
    /// take yet (`-FI_EAGAIN`) is retried by `post_pending`; any other failure is reported
    /// ([`repost_failure`]).
    fn repost_recv(&mut self, i: usize) {
        let ret = self.post_recv(i);
        if ret < 0 {
            self.recv_not_reposted(i, ret);
        }
    }

    #[cold]
    fn recv_not_reposted(&mut self, i: usize, ret: isize) {
        match repost_failure(i, ret) {
            None => self.repost.push(i),
            Some(e) => self.errors.push_back(e),
        }
    }

    /// Queues `out` for peer `dst`; dropped if `dst` is lost or said goodbye (the layer refuses
    /// sends to such a peer: this is a command that raced with the news, which the provider
    /// might never take — over `shm`, a departed peer's full queue answers `-FI_EAGAIN` for
    /// ever).
    pub(crate) fn queue(&mut self, dst: ProcessId, out: Out) {
        if self.status[dst as usize].load(Ordering::Relaxed) != ALIVE {
            if let Out::Msg(msg) = &out {
                self.dropped[dst as usize].add(msg.total_len());
            }
            return;
        }
        self.pending[dst as usize].push_back(out);
        self.queued += 1;
        self.talked[dst as usize] = true;
    }

    /// A message sent to this very process: no network.
    pub(crate) fn loopback(&mut self, msg: Message) {
        self.arrived(self.me, Slot::Ready(msg));
    }

    /// A completed read of this process's own registration.
    pub(crate) fn deliver_now(&mut self, src: ProcessId, msg: Message) {
        self.ready.push(src, msg);
    }

    /// Hands as much queued work to the provider as it accepts.
    pub(crate) fn post_pending(&mut self) {
        if self.repost.is_empty() && self.urgent.is_empty() && self.queued == 0 {
            return; // the usual case, on every poll
        }
        if self.repost.is_empty() && self.urgent.is_empty() && self.queued == self.held_queued() {
            return; // only queues that wait for acknowledgements
        }
        for r in self.repost.split_off(0) {
            self.repost_recv(r);
        }
        if !self.urgent.is_empty() {
            let mut urgent = std::mem::take(&mut self.urgent);
            let failed = post_per_peer(&mut urgent, |p, out| self.post(p, out));
            // What was queued meanwhile (a read that failed here lets the next message's reads
            // in) goes behind what was there.
            urgent.append(&mut self.urgent);
            self.urgent = urgent;
            for (p, reason) in failed {
                self.lose(p, reason);
            }
        }
        if self.queued == self.held_queued() {
            return;
        }
        for p in 0..self.pending.len() {
            if self.held[p] {
                continue;
            }
            while let Some(out) = self.pending[p].pop_front() {
                self.queued -= 1;
                match self.post(p as ProcessId, out) {
                    Ok(None) => {}
                    Ok(Some(back)) => {
                        self.pending[p].push_front(back);
                        self.queued += 1;
                        break;
                    }
                    Err(e) => {
                        self.lose(p as ProcessId, e);
                        break;
                    }
                }
            }
        }
    }

    /// Posts one item; `Ok(Some(item))` if the provider is busy
    /// (`-FI_EAGAIN`) or registrations must be freed first, `Err(reason)` if
    /// the peer cannot be reached (a local failure is queued in `errors`).
    fn post(&mut self, p: ProcessId, out: Out) -> Result<Option<Out>, String> {
        let addr = self.addrs[p as usize];
        match out {
            Out::Msg(msg) => {
                if wire::data_len(&msg) <= self.sizes.packet_max {
                    self.post_eager(p, addr, msg)
                } else {
                    if !self.rndv_fits(p, msg.total_len()) {
                        // Waits, with everything queued for `p` behind it, for `p`'s
                        // acknowledgements to free registrations (`rndv_acked`).
                        self.hold(p);
                        return Ok(Some(Out::Msg(msg)));
                    }
                    let desc = match self.register_rndv(p, &msg) {
                        Ok(desc) => desc,
                        // A failed registration is this process's limit (locked memory, the
                        // provider's count of registrations), not the peer's fault: wait while
                        // earlier large messages hold registrations their readers will free;
                        // else end the job with what failed.
                        Err(_) if !self.rndv_out.is_empty() => return Ok(Some(Out::Msg(msg))),
                        Err(why) => {
                            self.errors
                                .push_back(TransportError::Io(std::io::Error::other(format!(
                                    "a message to process {p}: {why}"
                                ))));
                            return Ok(None);
                        }
                    };
                    self.post(p, Out::Ctl(desc))
                }
            }
            Out::Ctl(buf) => {
                let fault = self.fault(|| buf.get(1).copied().unwrap_or(0));
                let op = Box::into_raw(Box::new(Op {
                    ctx: sys::fi_context2::default(),
                    kind: OpKind::Ctl { dst: p, buf },
                }));
                // SAFETY: `op` is a live Box pointer; its buffer stays alive
                // (inside the op) until the completion reclaims the op.
                let ret = fault.unwrap_or_else(|| unsafe {
                    let OpKind::Ctl { buf, .. } = &(*op).kind else {
                        unreachable!()
                    };
                    sys::fi_send(
                        self.fab.ep,
                        buf.as_ptr().cast::<c_void>(),
                        buf.len(),
                        std::ptr::null_mut(),
                        addr,
                        op.cast::<c_void>(),
                    )
                });
                self.posted(ret, op, ("fi_send", p), |kind| match kind {
                    OpKind::Ctl { buf, .. } => Out::Ctl(buf),
                    _ => unreachable!(),
                })
            }
            Out::Read {
                in_id,
                offset,
                len,
                addr: raddr,
                key,
            } => {
                let Some(inr) = self.rndv_in.get_mut(&in_id) else {
                    return Ok(None);
                };
                let start = inr.start;
                let Some(buf) = inr.buf.as_mut() else {
                    return Ok(None);
                };
                // Earlier reads may still be writing other ranges: no reference to the bytes.
                // SAFETY: start + offset + len <= start + total <= the buffer's length (chunks
                // are cut from the descriptor's lengths, whose sum is `total`; `aligned_offset`
                // chose `start` so that the message fits after it), so the pointer stays inside.
                let dst = unsafe { buf.as_mut_ptr().add(start + offset) };
                let fault = self.fault(|| FAULT_READ);
                let op = Box::into_raw(Box::new(Op {
                    ctx: sys::fi_context2::default(),
                    kind: OpKind::Read { src: p, in_id },
                }));
                // SAFETY: `dst..dst+len` is owned by the InRndv entry, which
                // is kept until all its reads completed; the op is a live Box.
                let ret = fault.unwrap_or_else(|| unsafe {
                    sys::fi_read(
                        self.fab.ep,
                        dst.cast::<c_void>(),
                        len,
                        std::ptr::null_mut(),
                        addr,
                        raddr,
                        key,
                        op.cast::<c_void>(),
                    )
                });
                self.posted(ret, op, ("fi_read", p), |_| Out::Read {
                    in_id,
                    offset,
                    len,
                    addr: raddr,
                    key,
                })
            }
            Out::Get {
                addr: raddr,
                key,
                len,
                kind,
                tag,
            } => {
                let op = Box::into_raw(Box::new(Op {
                    ctx: sys::fi_context2::default(),
                    kind: OpKind::Get {
                        src: p,
                        buf: Vec::with_capacity(len),
                        len,
                        kind,
                        tag,
                    },
                }));
                // SAFETY: the op is a live Box owning a buffer of capacity
                // `len`, kept until the completion reclaims the op.
                let ret = unsafe {
                    let OpKind::Get { buf, .. } = &mut (*op).kind else {
                        unreachable!()
                    };
                    sys::fi_read(
                        self.fab.ep,
                        buf.as_mut_ptr().cast::<c_void>(),
                        len,
                        std::ptr::null_mut(),
                        addr,
                        raddr,
                        key,
                        op.cast::<c_void>(),
                    )
                };
                self.posted(ret, op, ("fi_read", p), |_| Out::Get {
                    addr: raddr,
                    key,
                    len,
                    kind,
                    tag,
                })
            }
        }
    }

    /// Unit tests only: the number the post of what `post` names (a control packet's type, or
    /// [`FAULT_READ`]) fails with instead of reaching the provider, if a test asked for that
    /// (`faults`: the post's name, how many such posts go through first, the number).
    #[cfg(test)]
    fn fault(&mut self, post: impl FnOnce() -> u8) -> Option<isize> {
        let post = post();
        let i = self.faults.iter().position(|f| f.0 == post)?;
        if self.faults[i].1 > 0 {
            self.faults[i].1 -= 1;
            return None;
        }
        Some(self.faults.remove(i).2)
    }

    /// Outside unit tests every post reaches the provider.
    #[cfg(not(test))]
    #[inline(always)]
    fn fault(&mut self, _post: impl FnOnce() -> u8) -> Option<isize> {
        None
    }

    /// Outcome of posting `op` to `p` with libfabric call `what`: counted in flight on success;
    /// reclaimed and turned back into work with `back` on `-FI_EAGAIN`; an error text if the
    /// peer cannot be reached; dropped with an error of this process in `errors` on an argument
    /// or resource error ([`post_failure`]) — except a post for a large message's transfer (a
    /// read, a descriptor, an ACK): however it failed, the pair's order cannot be kept past that
    /// message, so `p` is lost (an error text; a read's sender is reported at once, also if it
    /// said goodbye, see [`set_lost`](Self::set_lost), and its message marked failed).
    fn posted(
        &mut self,
        ret: isize,
        op: *mut Op,
        (what, p): (&str, ProcessId),
        back: impl FnOnce(OpKind) -> Out,
    ) -> Result<Option<Out>, String> {
        if ret == 0 {
            self.inflight += 1;
            return Ok(None);
        }
        // SAFETY: the provider refused the operation, so it holds no
        // reference to the context: reclaim it (once).
        let op = unsafe { Box::from_raw(op) };
        if ret == -(sys::FI_EAGAIN as isize) {
            return Ok(Some(back(op.kind)));
        }
        let failure = post_failure(what, self.peer(p), ret);
        match op.kind {
            OpKind::Read { in_id, .. } => {
                let reason = rndv_broken("fi_read of a large message from it", &failure, ret);
                if self.set_lost(p, &reason, true) {
                    self.errors.push_back(TransportError::PeerLost {
                        process: p,
                        reason: reason.clone(),
                    });
                }
                // Counted down, so the message is done (failed) once its reads in flight are.
                self.read_done(in_id, true);
                Err(reason)
            }
            OpKind::Ctl { buf, .. } => match (failure, rndv_ctl(&buf)) {
                (failure @ PostFailure::Local(_), Some(carried)) => {
                    Err(rndv_broken(carried, &failure, ret))
                }
                (PostFailure::Local(e), None) => {
                    self.errors.push_back(e);
                    Ok(None)
                }
                (PostFailure::Peer(reason), _) => Err(reason),
            },
            kind => match failure {
                PostFailure::Peer(reason) => {
                    if let OpKind::Send { msg, .. } = &kind {
                        self.dropped[p as usize].add(msg.total_len());
                    }
                    Err(reason)
                }
                PostFailure::Local(e) => {
                    self.errors.push_back(e);
                    Ok(None)
                }
            },
        }
    }

    fn post_eager(
        &mut self,
        p: ProcessId,
        addr: sys::fi_addr_t,
        msg: Message,
    ) -> Result<Option<Out>, String> {
        if wire::data_len(&msg) <= self.fab.limits.inject_size {
            return self.inject(p, addr, msg);
        }
        let mut prefix = wire::data_prefix(self.me, &msg);
        let nonempty = msg.segments().iter().filter(|s| !s.is_empty()).count();
        let coalesce = 1 + nonempty > self.fab.limits.iov_limit;
        if coalesce {
            for s in msg.segments() {
                prefix.extend_from_slice(s);
            }
        }
        let mut iov = Vec::with_capacity(if coalesce { 1 } else { 1 + nonempty });
        iov.push(sys::iovec {
            iov_base: prefix.as_ptr() as *mut c_void,
            iov_len: prefix.len(),
        });
        if !coalesce {
            for s in msg.segments().iter().filter(|s| !s.is_empty()) {
                iov.push(sys::iovec {
                    iov_base: s.as_ptr() as *mut c_void,
                    iov_len: s.len(),
                });
            }
        }
        let bytes = msg.total_len();
        let op = Box::into_raw(Box::new(Op {
            ctx: sys::fi_context2::default(),
            kind: OpKind::Send {
                dst: p,
                msg,
                _prefix: prefix,
                _iov: iov,
            },
        }));
        // SAFETY: the iovec entries point into the prefix and the message's
        // segments, all owned by the op (moving a Vec or Bytes into the Box
        // does not move their heap data), which lives until the completion
        // reclaims it; `fmsg` lives across the call.
        let ret = unsafe {
            let OpKind::Send { _iov: iov, .. } = &(*op).kind else {
                unreachable!()
            };
            let fmsg = sys::fi_msg {
                msg_iov: iov.as_ptr(),
                desc: std::ptr::null_mut(),
                iov_count: iov.len(),
                addr,
                context: op.cast::<c_void>(),
                data: 0,
            };
            sys::fi_sendmsg(self.fab.ep, &fmsg, 0)
        };
        if ret == 0 {
            self.eager_inflight[p as usize].add(bytes);
        }
        self.posted(ret, op, ("fi_sendmsg", p), |kind| match kind {
            OpKind::Send { msg, .. } => Out::Msg(msg),
            _ => unreachable!(),
        })
    }

    /// Sends a small message with `fi_inject`: the packet is assembled in
    /// a reused buffer, which the provider copies before returning, so no
    /// context is kept and no completion is generated.
    fn inject(
        &mut self,
        p: ProcessId,
        addr: sys::fi_addr_t,
        msg: Message,
    ) -> Result<Option<Out>, String> {
        self.scratch.clear();
        self.scratch
            .extend_from_slice(&wire::preamble(wire::PKT_DATA, self.me));
        self.scratch
            .extend_from_slice(&charmrs_transport::encode_frame_prefix(&msg));
        for s in msg.segments() {
            self.scratch.extend_from_slice(s);
        }
        match self.inject_scratch(p, addr) {
            // Busy: handed back, to be posted again later.
            Ok(sent) => Ok((!sent).then_some(Out::Msg(msg))),
            Err(reason) => {
                self.dropped[p as usize].add(msg.total_len());
                Err(reason)
            }
        }
    }

    /// `fi_inject`s the packet in `scratch` to `p` at `addr`: `Ok(true)` sent (or dropped with an
    /// error of this process in `errors`, see [`post_failure`]), `Ok(false)` the provider is busy
    /// (`-FI_EAGAIN`), `Err` the peer cannot be reached.
    fn inject_scratch(&mut self, p: ProcessId, addr: sys::fi_addr_t) -> Result<bool, String> {
        // SAFETY: the endpoint is open; `scratch` holds `len` initialized bytes, which
        // fi_inject copies before it returns.
        let ret = unsafe {
            sys::fi_inject(
                self.fab.ep,
                self.scratch.as_ptr().cast::<c_void>(),
                self.scratch.len(),
                addr,
            )
        };
        if ret == 0 {
            Ok(true)
        } else if ret == -(sys::FI_EAGAIN as isize) {
            Ok(false)
        } else {
            match post_failure("fi_inject", self.peer(p), ret) {
                PostFailure::Peer(reason) => Err(reason),
                PostFailure::Local(e) => {
                    self.errors.push_back(e);
                    Ok(true)
                }
            }
        }
    }

    /// Sends a message of one segment (`header`, `data`) to `p` at once with `fi_inject`, from
    /// the engine's reused packet buffer, when nothing is queued for `p` before it and the
    /// packet fits the provider's inject size. Returns whether the message was taken care of:
    /// sent, or dropped with a peer found unreachable (which is then reported like any failed
    /// post); `false` — queued work for `p`, too large, or the provider busy — means the caller
    /// must queue it.
    pub(crate) fn inject_now(&mut self, p: ProcessId, header: &Header, data: &[u8]) -> bool {
        let len = wire::single_segment_packet_len(data.len());
        if len > self.fab.limits.inject_size
            || len > self.sizes.packet_max
            || !self.pending[p as usize].is_empty()
            || self.urgent.iter().any(|(q, _)| *q == p)
            || self.status[p as usize].load(Ordering::Relaxed) != ALIVE
        {
            return false;
        }
        wire::single_segment_packet(&mut self.scratch, self.me, header, data);
        self.talked[p as usize] = true;
        let addr = self.addrs[p as usize];
        match self.inject_scratch(p, addr) {
            Ok(sent) => sent,
            Err(reason) => {
                self.dropped[p as usize].add(data.len());
                self.lose(p, reason);
                true
            }
        }
    }

    /// Registers the segments of a large message for `p` to read and
    /// returns its descriptor.
    fn register_rndv(&mut self, p: ProcessId, msg: &Message) -> Result<Vec<u8>, String> {
        let id = self.next_out;
        self.next_out += 1;
        let mut remote = Vec::with_capacity(msg.segments().len());
        let mut mrs = Vec::with_capacity(msg.segments().len());
        let mut inline = 0;
        for s in msg.segments() {
            if s.is_empty() {
                remote.push((0, 0));
                continue;
            }
            // Small segments (an entry call's arguments) travel inside the descriptor: no
            // registration, no read of their own (~1 µs per message over shm).
            if inline + s.len() <= wire::INLINE_MAX {
                inline += s.len();
                remote.push((wire::INLINE_ADDR, 0));
                continue;
            }
            let key = self.next_key();
            let mr = self
                .fab
                .register(s.as_ptr(), s.len(), key)
                .map_err(|e| format!("registering a {}-byte segment: {e}", s.len()))?;
            remote.push((self.fab.remote_addr(s.as_ptr()), mr.key));
            mrs.push(mr);
        }
        let bytes = msg.total_len();
        self.rndv_out.insert(
            id,
            OutRndv {
                dst: p,
                bytes,
                _segs: msg.segments().to_vec(),
                _mrs: mrs,
            },
        );
        let c = &mut self.rndv_count[p as usize];
        c.messages += 1;
        c.bytes += bytes;
        c.peak_messages = c.peak_messages.max(c.messages);
        c.peak_bytes = c.peak_bytes.max(c.bytes);
        Ok(wire::encode_rndv(self.me, id, msg, &remote))
    }

    /// Ends rendezvous `id` (acknowledged by its reader): its registrations are closed and its
    /// segments released, and its peer's queue, if it waited for that, is posted again.
    fn rndv_acked(&mut self, id: u64) {
        let Some(out) = self.rndv_out.remove(&id) else {
            return;
        };
        let p = out.dst as usize;
        let c = &mut self.rndv_count[p];
        c.messages -= 1;
        c.bytes -= out.bytes;
        self.unhold(out.dst);
    }

    /// Whether a large message of `bytes` bytes to `p` may be registered now: the bound
    /// ([`Sizes::rndv_per_peer`], [`Sizes::rndv_bytes_per_peer`]) leaves room for it, or
    /// nothing to `p` is outstanding (one always goes, whatever its size), or the bound was
    /// lifted.
    fn rndv_fits(&self, p: ProcessId, bytes: usize) -> bool {
        let c = &self.rndv_count[p as usize];
        c.messages == 0
            || self.unbounded
            || (c.messages < self.sizes.rndv_per_peer
                && c.bytes.saturating_add(bytes) <= self.sizes.rndv_bytes_per_peer)
    }

    /// `p`'s queue waits for an acknowledgement ([`Engine::held`]).
    fn hold(&mut self, p: ProcessId) {
        if !self.held[p as usize] {
            self.held[p as usize] = true;
            self.held_peers.push(p);
        }
    }

    /// `p`'s queue is posted again.
    fn unhold(&mut self, p: ProcessId) {
        if self.held[p as usize] {
            self.held[p as usize] = false;
            self.held_peers.retain(|&q| q != p);
        }
    }

    /// Items queued for peers whose queue waits for an acknowledgement: `post_pending` has
    /// nothing to do for them, and the progressing thread may sleep until one arrives.
    fn held_queued(&self) -> usize {
        self.held_peers
            .iter()
            .map(|&p| self.pending[p as usize].len())
            .sum()
    }

    /// The rendezvous registrations for peer `p` and what is queued for it (see
    /// [`RndvCount`]).
    pub(crate) fn rndv_usage(&self, p: ProcessId) -> RndvCount {
        RndvCount {
            queued: self.pending[p as usize].len(),
            ..self.rndv_count[p as usize]
        }
    }

    /// Reads and handles completions; returns how many were handled.
    pub(crate) fn poll_cq(&mut self) -> usize {
        const BATCH: usize = 32;
        // Not zeroed: the provider writes the entries it returns, and only those are read (a
        // zeroed batch cost a 1 KiB memset on every poll, a tenth of an idle poll).
        let mut entries =
            [const { std::mem::MaybeUninit::<sys::fi_cq_msg_entry>::uninit() }; BATCH];
        let mut handled = 0;
        for _ in 0..64 {
            // SAFETY: the CQ is open and has FI_CQ_FORMAT_MSG; `entries`
            // has room for BATCH such entries.
            let ret = unsafe {
                sys::fi_cq_read(self.fab.cq, entries.as_mut_ptr().cast::<c_void>(), BATCH)
            };
            if ret > 0 {
                let n = (ret as usize).min(BATCH);
                for e in &entries[..n] {
                    // SAFETY: fi_cq_read wrote its first `ret` entries (at most BATCH).
                    let e = unsafe { e.assume_init_ref() };
                    self.completed(e.op_context.cast::<Op>(), e.len);
                }
                handled += n;
                if n < BATCH {
                    break;
                }
            } else if ret == -(sys::FI_EAGAIN as isize) {
                break;
            } else if ret == -(sys::FI_EAVAIL as isize) {
                if !self.read_error() {
                    break;
                }
                handled += 1;
            } else {
                self.errors.push_back(ofi_error("fi_cq_read", ret as i64));
                break;
            }
        }
        handled
    }

    fn completed(&mut self, op: *mut Op, len: usize) {
        if op.is_null() {
            return;
        }
        // SAFETY: every context we post is an Op (module invariants); a
        // receive's is permanent, so only look at it.
        if let OpKind::Recv(i) = unsafe { &(*op).kind } {
            let i = *i;
            let n = len.min(self.recv_bufs[i].len());
            if let Err(e) = self.packet(i, n) {
                self.errors.push_back(e);
            }
            self.repost_recv(i);
            return;
        }
        self.inflight = self.inflight.saturating_sub(1);
        // SAFETY: a non-receive context was leaked from a Box when posted
        // and its completion is reported once: reclaim it.
        let op = unsafe { Box::from_raw(op) };
        match op.kind {
            OpKind::Send { dst, msg, .. } => self.eager_inflight[dst as usize].sub(msg.total_len()),
            OpKind::Recv(_) | OpKind::Ctl { .. } => {}
            OpKind::Read { in_id, .. } => self.read_done(in_id, false),
            OpKind::Get {
                src,
                mut buf,
                len,
                kind,
                tag,
            } => {
                // SAFETY: the read of `len` bytes (at most the capacity) completed
                // successfully, so the provider wrote all of them.
                unsafe { buf.set_len(len) };
                match Message::with_segments(Header::new(kind, 0, 0, tag), vec![Bytes::from(buf)]) {
                    Ok(m) => self.ready.push(src, m),
                    Err(e) => self.errors.push_back(e),
                }
            }
        }
    }

    /// Reads and handles the error entry `fi_cq_read` announced (`-FI_EAVAIL`); whether it
    /// could be read. One that cannot is reported as [`TransportError::Io`] naming
    /// `fi_cq_readerr` and what it returned (the caller stops draining the queue: the same
    /// announcement would come again at once).
    fn read_error(&mut self) -> bool {
        let mut err = sys::fi_cq_err_entry::default();
        // SAFETY: the CQ is open and reported an error entry; `err` is a
        // valid fi_cq_err_entry with err_data_size 0 (provider owns it).
        let ret = unsafe { sys::fi_cq_readerr(self.fab.cq, &mut err, 0) };
        if ret < 1 {
            self.errors
                .push_back(TransportError::Io(std::io::Error::other(format!(
                "libfabric fi_cq_readerr returned {ret} ({}) after fi_cq_read announced an error \
                 entry (-FI_EAVAIL): the failed operation cannot be known",
                strerror(ret as i64)
            ))));
            return false;
        }
        self.error_entry(&err);
        true
    }

    /// Handles the completion queue's error entry `err`.
    fn error_entry(&mut self, err: &sys::fi_cq_err_entry) {
        let mut text = [0 as std::ffi::c_char; 256];
        // SAFETY: fi_cq_strerror writes at most `len` bytes into `text` and
        // returns a NUL-terminated string (ours or a static one).
        let detail = unsafe {
            let p = sys::fi_cq_strerror(
                self.fab.cq,
                err.prov_errno,
                err.err_data,
                text.as_mut_ptr(),
                text.len(),
            );
            if p.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let reason = format!(
            "libfabric reported {} ({}){}",
            strerror(i64::from(err.err)),
            err.err,
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        );
        let op = err.op_context.cast::<Op>();
        if op.is_null() {
            // Not tied to one of our operations (`shm` 1.17 reports a read
            // through an unknown key this way): reported as is; the
            // operation it belonged to, if any, never completes.
            self.errors
                .push_back(TransportError::Io(std::io::Error::other(format!(
                    "{reason} (not tied to an operation)"
                ))));
            return;
        }
        // SAFETY: as in `completed`: receive contexts are permanent.
        if let OpKind::Recv(i) = unsafe { &(*op).kind } {
            let i = *i;
            if err.err != sys::FI_ECANCELED {
                self.errors.push_back(TransportError::Malformed(format!(
                    "a receive failed: {reason}"
                )));
                self.repost_recv(i);
            }
            return;
        }
        self.inflight = self.inflight.saturating_sub(1);
        // SAFETY: as in `completed`: reclaimed once, from its error entry.
        let op = unsafe { Box::from_raw(op) };
        let peer = match op.kind {
            OpKind::Recv(_) => return,
            OpKind::Send { dst, msg, .. } => {
                let bytes = msg.total_len();
                self.eager_inflight[dst as usize].sub(bytes);
                self.dropped[dst as usize].add(bytes);
                dst
            }
            OpKind::Ctl { dst, .. } => dst,
            OpKind::Read { src, in_id } => {
                self.read_done(in_id, true);
                self.lose_sender(src, reason);
                return;
            }
            OpKind::Get { src, buf, .. } if refused(err.err) => {
                let what = format!(
                    "remote read of {} bytes from {} was refused: {reason}",
                    buf.capacity(),
                    self.peer(src)
                );
                if self.fab.limits.provider.split(';').any(|p| p == "tcp") {
                    // The tcp provider (1.17) closes the connection on an
                    // invalid read request, and messages injected on it
                    // afterwards vanish without an error: the pair can no
                    // longer guarantee delivery.
                    self.lose(
                        src,
                        format!("{what}; the tcp provider dropped the connection over it"),
                    );
                } else {
                    // The peer answered that the key or range is not (or
                    // no longer) valid: a failed `get`, not a lost peer.
                    self.errors.push_back(TransportError::Malformed(what));
                }
                return;
            }
            OpKind::Get { src, .. } => src,
        };
        self.lose(peer, reason);
    }

    /// Marks peer `p` lost (once) with `reason`.
    pub(crate) fn lose(&mut self, p: ProcessId, reason: String) {
        if self.mark_lost(p, &reason) {
            self.errors
                .push_back(TransportError::PeerLost { process: p, reason });
        }
    }

    /// [`lose`](Self::lose) for a sender one of whose large messages cannot be read: reported
    /// also if it said goodbye ([`DEPARTED`]) — what it sent before its goodbye is lost with it,
    /// and only this report says so.
    fn lose_sender(&mut self, p: ProcessId, reason: String) {
        if self.set_lost(p, &reason, true) {
            self.errors.push_back(TransportError::PeerLost {
                process: p,
                reason: reason.clone(),
            });
        }
        self.lose(p, reason);
    }

    /// [`lose`](Self::lose) without the report; whether `p` was alive until now. What was
    /// queued for it is dropped either way (a peer already gone whose post failed included).
    fn mark_lost(&mut self, p: ProcessId, reason: &str) -> bool {
        let news = self.set_lost(p, reason, false);
        self.drop_work(p, true);
        news
    }

    /// Marks `p` [`LOST`] with `reason` if it is [`ALIVE`] (or, with `departed_too`,
    /// [`DEPARTED`]); whether it did (the caller reports it). Drops nothing.
    fn set_lost(&mut self, p: ProcessId, reason: &str, departed_too: bool) -> bool {
        let st = &self.status[p as usize];
        let was = st.load(Ordering::Relaxed);
        let news = was == ALIVE || (departed_too && was == DEPARTED);
        if news {
            st.store(LOST, Ordering::Release);
            self.reasons[p as usize] = Some(reason.to_owned());
        }
        news
    }

    /// What this endpoint still owes peer `p`: its queued messages and its large ones not
    /// acknowledged by their reader (one whose descriptor waits in the queue is among those).
    fn owed(&self, p: usize) -> Tally {
        let mut owed = Tally::default();
        for out in &self.pending[p] {
            if let Out::Msg(msg) = out {
                owed.add(msg.total_len());
            }
        }
        let c = &self.rndv_count[p];
        owed.merge(Tally {
            messages: c.messages,
            bytes: c.bytes,
        });
        owed
    }

    /// Drops the work queued for peer `p`, which will never take part in it: what this endpoint
    /// was to send it and its large messages waiting for it to read them. With `inbound` (the
    /// peer cannot be reached, as opposed to having said goodbye, after which what it sent is
    /// still read and delivered) also what it sent this endpoint that is not complete yet.
    fn drop_work(&mut self, p: ProcessId, inbound: bool) {
        // Counted for the shutdown's report.
        let owed = self.owed(p as usize);
        self.dropped[p as usize].merge(owed);
        self.queued -= self.pending[p as usize].len();
        self.pending[p as usize].clear();
        self.rndv_out.retain(|_, r| r.dst != p);
        let c = &mut self.rndv_count[p as usize];
        (c.messages, c.bytes) = (0, 0);
        self.unhold(p);
        if !inbound {
            return;
        }
        // Nothing it sent is delivered from now on, not even what is held back in its order
        // (a gap would go unnoticed): its order keeps only the mark that says so.
        let order = &mut self.order[p as usize];
        order.clear();
        order.push_back(Slot::Broken);
        // Its messages waiting for a read slot will never be read (none of their reads is
        // posted, so nothing of theirs is in the provider's hands).
        self.admit_queue[p as usize].clear();
        self.admit_sources.retain(|&s| s != p);
        self.rndv_in.retain(|_, r| r.src != p || r.admitted);
        // Those being read fail: each is done, its buffer back in the pool, once its reads in
        // flight are. The reads not posted yet never will be: counted down here.
        for r in self.rndv_in.values_mut().filter(|r| r.src == p) {
            r.failed = true;
        }
        let mut unposted = Vec::new();
        self.urgent.retain(|(q, out)| {
            if *q != p {
                return true;
            }
            if let Out::Read { in_id, .. } = out {
                unposted.push(*in_id);
            }
            false
        });
        for in_id in unposted {
            self.read_done(in_id, true);
        }
    }

    /// Process `process` is [`DEPARTED`] or [`LOST`] (`fate`; `why` says how): recorded for the
    /// endpoints of this process (unless it was already), and applied to this engine's view of
    /// every endpoint of it, whose work is dropped (only what would go to it if it departed:
    /// see [`drop_work`](Self::drop_work)).
    fn mark_process(&mut self, process: ProcessId, fate: u8, why: &str) {
        let _ = self.processes[process as usize].compare_exchange(
            ALIVE,
            fate,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        for p in process * self.lanes..(process + 1) * self.lanes {
            let st = &self.status[p as usize];
            if st.load(Ordering::Relaxed) == ALIVE {
                st.store(fate, Ordering::Release);
                self.reasons[p as usize] = Some(why.to_owned());
            }
            self.drop_work(p, fate == LOST);
        }
    }

    /// Whether no endpoint of this process has learnt of `process`'s going.
    fn process_alive(&self, process: ProcessId) -> bool {
        self.processes[process as usize].load(Ordering::Acquire) == ALIVE
    }

    /// Applies to this engine what another endpoint of this process learnt of a process's
    /// going ([`Engine::processes`]).
    fn catch_up(&mut self) {
        for process in 0..self.processes.len() as ProcessId {
            let fate = self.processes[process as usize].load(Ordering::Acquire);
            if fate == ALIVE {
                continue;
            }
            let ids = process * self.lanes..(process + 1) * self.lanes;
            if ids
                .clone()
                .any(|p| self.status[p as usize].load(Ordering::Relaxed) == ALIVE)
            {
                self.mark_process(process, fate, gone_reason(fate));
            }
        }
    }

    /// Handles the packet in receive buffer `i` (`n` bytes).
    fn packet(&mut self, i: usize, n: usize) -> Result<(), TransportError> {
        let buf = &self.recv_bufs[i][..n];
        let (kind, src) = wire::parse_preamble(buf)?;
        if src as usize >= self.addrs.len() {
            return Err(TransportError::Malformed(format!(
                "ofi packet claims to come from endpoint {src} of {}",
                self.addrs.len()
            )));
        }
        self.talked[src as usize] = true;
        // The sender, named in every error about what it sent.
        let sender = self.peer(src);
        let from = |e: TransportError| match e {
            TransportError::Malformed(m) => {
                TransportError::Malformed(format!("from {sender}: {m}"))
            }
            other => other,
        };
        match kind {
            wire::PKT_DATA => {
                if self.order[src as usize].is_empty() {
                    // In order, one segment (an entry call's arguments): its bytes are copied
                    // into the batch of ready messages and lent to the sink from there.
                    if let Some((header, data)) = wire::single_segment_data(buf).map_err(from)? {
                        self.ready.push_small(src, header, &buf[data]);
                        return Ok(());
                    }
                }
                let b = Bytes::copy_from_slice(buf);
                let msg = wire::decode_data(&b).map_err(from)?;
                self.arrived(src, Slot::Ready(msg));
            }
            wire::PKT_RNDV => {
                let r = wire::decode_rndv(buf, self.sizes.max_message).map_err(from)?;
                self.start_rndv(src, r);
            }
            wire::PKT_ACK => {
                let id = wire::decode_ack(buf).map_err(from)?;
                match self.rndv_out.get(&id) {
                    // Only the destination of a transfer may end it.
                    Some(out) if out.dst != src => {
                        return Err(TransportError::Malformed(format!(
                            "{sender} acknowledged transfer {id}, which went to {}",
                            self.peer(out.dst)
                        )));
                    }
                    Some(_) => self.rndv_acked(id),
                    None if id == 0 || id >= self.next_out => {
                        return Err(TransportError::Malformed(format!(
                            "{sender} acknowledged transfer {id}, which this endpoint never \
                             issued (it issued {} so far)",
                            self.next_out - 1
                        )));
                    }
                    // Issued and ended. A transfer ends by its ACK or when its destination
                    // leaves or is lost (`drop_work`, after its status changed): a late ACK
                    // from a peer that went is ignored, one from a live peer is a second ACK
                    // (or one for another peer's transfer).
                    None if self.status[src as usize].load(Ordering::Relaxed) == ALIVE => {
                        return Err(TransportError::Malformed(format!(
                            "{sender} acknowledged transfer {id}, which is not outstanding (it \
                             was acknowledged before, or went to another peer)"
                        )));
                    }
                    None => {}
                }
            }
            wire::PKT_BYE => {
                // Its process is going: every endpoint of it, as every endpoint of this process
                // will see (`catch_up`).
                self.mark_process(process_of(src, self.lanes), DEPARTED, gone_reason(DEPARTED));
            }
            other => {
                return Err(TransportError::Malformed(format!(
                    "ofi packet of unknown type {other} from {sender}"
                )))
            }
        }
        Ok(())
    }

    fn arrived(&mut self, src: ProcessId, slot: Slot) {
        let q = &mut self.order[src as usize];
        match slot {
            Slot::Ready(m) if q.is_empty() => self.ready.push(src, m),
            // A lost source: dropped (its loss was reported).
            _ if matches!(q.front(), Some(Slot::Broken)) => {}
            s => q.push_back(s),
        }
    }

    fn start_rndv(&mut self, src: ProcessId, r: wire::Rndv) {
        if matches!(self.order[src as usize].front(), Some(Slot::Broken)) {
            return; // a lost source: not read (its loss was reported)
        }
        let total = r.total() as usize;
        let in_id = self.next_in;
        self.next_in += 1;
        let chunk = self.read_chunk();
        let reads = r
            .segs
            .iter()
            .filter(|s| !s.is_inline())
            .map(|s| (s.len as usize).div_ceil(chunk))
            .sum();
        self.rndv_in.insert(
            in_id,
            InRndv {
                src,
                remote_id: r.id,
                header: r.header,
                lens: r.segs.iter().map(|s| s.len as usize).collect(),
                segs: r.segs,
                inline: r.inline,
                total,
                buf: None,
                start: 0,
                admitted: false,
                remaining: reads,
                failed: false,
            },
        );
        self.order[src as usize].push_back(Slot::Waiting(in_id));
        if reads == 0 {
            // Nothing to read (empty or inline segments only).
            if let Some(inr) = self.rndv_in.get_mut(&in_id) {
                inr.take_buffer(&self.pool);
            }
            self.read_done_final(in_id);
        } else {
            let queue = &mut self.admit_queue[src as usize];
            if queue.is_empty() {
                self.admit_sources.push(src);
            }
            queue.push_back(in_id);
            self.admit();
        }
    }

    /// Largest single `fi_read`.
    fn read_chunk(&self) -> usize {
        self.fab.limits.max_msg_size.clamp(1, 1 << 30)
    }

    /// Starts the reads of waiting rendezvous messages, each sender's in arrival order, while
    /// the bytes being read from that sender stay within `read_window` (one message is always
    /// admitted when none of the sender's is being read).
    fn admit(&mut self) {
        let chunk = self.read_chunk();
        let mut at = 0;
        while let Some(&from) = self.admit_sources.get(at) {
            while let Some(&in_id) = self.admit_queue[from as usize].front() {
                let Some(inr) = self.rndv_in.get_mut(&in_id) else {
                    self.admit_queue[from as usize].pop_front();
                    continue;
                };
                let total = inr.total;
                let reading = &mut self.reading[from as usize];
                if *reading > 0 && *reading + total > self.sizes.read_window {
                    break;
                }
                self.admit_queue[from as usize].pop_front();
                *reading += total;
                inr.admitted = true;
                inr.take_buffer(&self.pool);
                let src = inr.src;
                let mut offset = 0usize;
                for s in &inr.segs {
                    let len = s.len as usize;
                    if s.is_inline() {
                        offset += len;
                        continue;
                    }
                    let mut done = 0usize;
                    while done < len {
                        let n = chunk.min(len - done);
                        self.urgent.push_back((
                            src,
                            Out::Read {
                                in_id,
                                offset: offset + done,
                                len: n,
                                addr: s.addr + done as u64,
                                key: s.key,
                            },
                        ));
                        done += n;
                    }
                    offset += len;
                }
            }
            if self.admit_queue[from as usize].is_empty() {
                self.admit_sources.remove(at);
            } else {
                at += 1;
            }
        }
    }

    fn read_done(&mut self, in_id: u64, failed: bool) {
        let Some(inr) = self.rndv_in.get_mut(&in_id) else {
            return;
        };
        inr.failed |= failed;
        inr.remaining -= 1;
        if inr.remaining == 0 {
            self.read_done_final(in_id);
        }
    }

    fn read_done_final(&mut self, in_id: u64) {
        let Some(inr) = self.rndv_in.remove(&in_id) else {
            return;
        };
        let src = inr.src;
        let Some(buf) = inr.buf else {
            return;
        };
        if inr.admitted {
            let reading = &mut self.reading[src as usize];
            *reading = reading.saturating_sub(inr.total);
        }
        self.admit();
        if inr.failed {
            // Its sender is lost (by what failed the read: `posted`, `read_error`, `drop_work`),
            // and what it sent after this message is dropped with it. The buffer goes back to the
            // pool here.
            return;
        }
        // Every read completed and the inline segments were copied in: they tile [0, total).
        let whole = buf.into_bytes_at(inr.start, inr.total);
        let mut segs = Vec::with_capacity(inr.lens.len());
        let mut at = 0;
        for len in inr.lens {
            segs.push(whole.slice(at..at + len));
            at += len;
        }
        match Message::with_segments(inr.header, segs) {
            Ok(msg) => {
                let q = &mut self.order[src as usize];
                if let Some(slot) = q
                    .iter_mut()
                    .find(|s| matches!(s, Slot::Waiting(id) if *id == in_id))
                {
                    *slot = Slot::Ready(msg);
                }
                while matches!(q.front(), Some(Slot::Ready(_))) {
                    if let Some(Slot::Ready(m)) = q.pop_front() {
                        self.ready.push(src, m);
                    }
                }
            }
            Err(e) => self.errors.push_back(e),
        }
        // Also to a peer that said goodbye: another endpoint of its process may have said it
        // first, while its endpoint that sent this message waits for the ACK.
        if self.status[src as usize].load(Ordering::Relaxed) != LOST {
            self.urgent
                .push_back((src, Out::Ctl(wire::encode_ack(self.me, inr.remote_id))));
        }
    }

    /// At most every `liveness_interval`: applies what the other endpoints of this process
    /// learnt ([`catch_up`](Self::catch_up)), and — the first endpoint of a process only —
    /// checks whether the processes on this host still run. One that exited without saying
    /// goodbye (which every process's first endpoint gets, see [`watches`](Self::watches)) is
    /// lost: reported once, by that first endpoint, and every endpoint of this process stops
    /// talking to it.
    pub(crate) fn check_liveness(&mut self) {
        let now = coarse_now();
        if now.saturating_sub(self.last_liveness) < self.sizes.liveness_interval {
            return;
        }
        self.last_liveness = now;
        self.catch_up();
        if !self.first() {
            return;
        }
        let dead: Vec<(ProcessId, i32)> = (0..self.processes.len() as ProcessId)
            .filter(|&process| self.process_alive(process))
            .filter_map(|process| {
                let peer = self.local_peers[process as usize].as_ref()?;
                (!peer.alive()).then_some((process, peer.pid()))
            })
            .collect();
        if dead.is_empty() {
            return;
        }
        // Its goodbye may still be in flight: give it a moment.
        let until = Instant::now() + self.sizes.grace;
        while Instant::now() < until {
            self.post_pending();
            self.poll_cq();
            std::thread::sleep(Duration::from_millis(1));
        }
        for (process, pid) in dead {
            if !self.process_alive(process) {
                continue; // it said goodbye meanwhile
            }
            let reason =
                format!("its process (pid {pid} on this host) exited without shutting down");
            self.mark_process(process, LOST, &reason);
            self.errors.push_back(TransportError::PeerLost {
                process: process * self.lanes,
                reason,
            });
        }
    }

    /// Clean shutdown, first step: every live peer it watches is owed a goodbye, sent by
    /// [`linger_once`](Self::linger_once) when the peer has all this endpoint sent it. Then
    /// `linger_once` until it returns `true` or the caller's patience ends, and then
    /// [`goodbye_anyway`](Self::goodbye_anyway).
    ///
    /// `unreported[q]`: process `q`'s loss, if it is lost, was never returned to the runtime
    /// (a `PeerLost` naming it still waits in some endpoint's errors): what this endpoint gave
    /// up on towards it is not reported as known ([`Engine::undelivered`]).
    pub(crate) fn say_goodbye(&mut self, unreported: &[bool]) {
        self.catch_up();
        let reported = (0..self.addrs.len())
            .map(|p| {
                self.status[p].load(Ordering::Relaxed) == LOST
                    && !unreported
                        .get(process_of(p as ProcessId, self.lanes) as usize)
                        .copied()
                        .unwrap_or(false)
            })
            .collect();
        self.reported_lost = Some(reported);
        self.owed_goodbyes = (0..self.addrs.len() as ProcessId)
            .filter(|&p| {
                p != self.me
                    && self.watches(p as usize)
                    && self.status[p as usize].load(Ordering::Relaxed) == ALIVE
            })
            .collect();
        self.send_goodbyes(false);
    }

    /// Clean shutdown, second step: moves queued sends on, serves peers' reads of this
    /// endpoint's large messages and says goodbye to the peers done with them, discarding
    /// arrivals; whether nothing is left to wait for.
    pub(crate) fn linger_once(&mut self) -> bool {
        self.post_pending();
        self.poll_cq();
        self.catch_up();
        self.send_goodbyes(false);
        self.post_pending();
        self.ready.discard();
        self.errors.clear();
        self.owed_goodbyes.is_empty()
            && self.queued == 0
            && self.urgent.is_empty()
            && self.inflight == 0
            && self.rndv_out.is_empty()
    }

    /// Clean shutdown, when the caller's patience ended: queues the goodbyes still owed, to
    /// peers that did not read this endpoint's large messages too (so they do not take this
    /// process's exit for a crash). Then [`linger_once`](Self::linger_once) a little more,
    /// until [`all_posted`](Self::all_posted).
    pub(crate) fn goodbye_anyway(&mut self) {
        // The peers did not read in time: what waits for the rendezvous bound goes now (as it
        // went before there was a bound), so the goodbyes behind it leave too.
        self.unbounded = true;
        for p in std::mem::take(&mut self.held_peers) {
            self.held[p as usize] = false;
        }
        self.send_goodbyes(true);
    }

    /// Whether the provider took everything queued.
    pub(crate) fn all_posted(&self) -> bool {
        self.queued == 0
    }

    /// The processes whose loss waits in this endpoint's errors, not returned to the runtime
    /// yet (marked in `unreported`, indexed by process).
    pub(crate) fn unreported_losses(&self, unreported: &mut [bool]) {
        for e in &self.errors {
            if let TransportError::PeerLost { process, .. } = e {
                if let Some(u) = unreported.get_mut(process_of(*process, self.lanes) as usize) {
                    *u = true;
                }
            }
        }
    }

    /// At the end of the shutdown: adds to `into` the application messages this endpoint
    /// accepted for sending and does not know delivered, per peer process and why — still
    /// queued, large ones not acknowledged by their reader, eager ones the provider did not
    /// complete, and those dropped because the peer left or was lost. Nothing when everything
    /// went.
    pub(crate) fn undelivered(&mut self, into: &mut Undelivered) {
        // What another endpoint of this process learnt of a peer's fate (its goodbye, its loss)
        // first, so that a peer that left is not named lost.
        self.catch_up();
        for p in 0..self.addrs.len() {
            let mut tally = self.dropped[p];
            tally.merge(self.owed(p));
            tally.merge(self.eager_inflight[p]);
            if tally.messages == 0 {
                continue;
            }
            let process = process_of(p as ProcessId, self.lanes);
            let why = match self.status[p].load(Ordering::Relaxed) {
                DEPARTED => Why::Left,
                LOST if self.reported_lost.as_ref().is_some_and(|r| r[p]) => Why::Reported,
                LOST => Why::Lost(
                    self.reasons[p]
                        .clone()
                        .unwrap_or_else(|| gone_reason(LOST).to_owned()),
                ),
                // Alive as far as this endpoint knows; a process on this host may have died
                // meanwhile (nothing checks while the layer lingers).
                _ => match &self.local_peers[process as usize] {
                    Some(peer) if !peer.alive() => Why::Lost(format!(
                        "its process (pid {} on this host) exited without shutting down",
                        peer.pid()
                    )),
                    _ => Why::Linger,
                },
            };
            into.add(process, why, tally);
        }
    }

    /// Queues the goodbyes owed to peers that wait for nothing more from this endpoint: nothing
    /// is queued for them, and they read (acknowledged) every large message it sent them, so
    /// the goodbye is the last thing they get from it — a peer drops what is still to come from
    /// an endpoint of a process that said goodbye. With `force`, to every peer owed one. A
    /// peer that went meanwhile is owed nothing.
    fn send_goodbyes(&mut self, force: bool) {
        if self.owed_goodbyes.is_empty() {
            return;
        }
        let unread: std::collections::HashSet<ProcessId> =
            self.rndv_out.values().map(|r| r.dst).collect();
        for p in std::mem::take(&mut self.owed_goodbyes) {
            if self.status[p as usize].load(Ordering::Relaxed) != ALIVE {
                continue;
            }
            let waits = !self.pending[p as usize].is_empty()
                || unread.contains(&p)
                || self.urgent.iter().any(|(q, _)| *q == p);
            if waits && !force {
                self.owed_goodbyes.push(p);
            } else {
                self.queue(p, Out::Ctl(wire::preamble(wire::PKT_BYE, self.me).to_vec()));
            }
        }
    }

    /// Whether nothing is queued that this endpoint's progress could post now (for the wait
    /// logic): work queued for a peer whose queue waits for an acknowledgement (the rendezvous
    /// bound) does not count, since only a completion, which wakes a sleeping thread, moves it.
    pub(crate) fn quiet(&self) -> bool {
        self.urgent.is_empty() && self.repost.is_empty() && self.queued == self.held_queued()
    }
}

/// Posts the items of `queue`, oldest first, with `post` (`Ok(None)` posted, `Ok(Some(item))` the
/// provider cannot take it yet, `Err(reason)` the peer cannot be reached), each peer's in their
/// order: a peer whose item was handed back keeps it, and every later item of its, in the queue
/// in the same order, while the other peers' items go on (a busy peer must not hold up the
/// reads and ACKs of the others, as it holds up only its own sends). A peer whose post failed
/// has its later items left in the queue, not posted (its loss drops them, counting down the
/// reads among them: `drop_work`); returns those peers, each with why.
fn post_per_peer<T>(
    queue: &mut VecDeque<(ProcessId, T)>,
    mut post: impl FnMut(ProcessId, T) -> Result<Option<T>, String>,
) -> Vec<(ProcessId, String)> {
    let mut kept = VecDeque::new();
    let mut busy: Vec<ProcessId> = Vec::new();
    let mut failed: Vec<(ProcessId, String)> = Vec::new();
    while let Some((p, item)) = queue.pop_front() {
        if busy.contains(&p) || failed.iter().any(|(q, _)| *q == p) {
            kept.push_back((p, item));
            continue;
        }
        match post(p, item) {
            Ok(None) => {}
            Ok(Some(back)) => {
                busy.push(p);
                kept.push_back((p, back));
            }
            Err(reason) => failed.push((p, reason)),
        }
    }
    *queue = kept;
    failed
}

/// What a failed post means.
#[derive(Debug)]
enum PostFailure {
    /// The peer cannot be reached (why).
    Peer(String),
    /// This process's own failure, to report as it is; the peer is not lost.
    Local(TransportError),
}

/// What libfabric call `what` towards `peer` failing with `ret` (negative, not `-FI_EAGAIN`)
/// means: an argument or resource error of this process (invalid argument, no memory, message
/// too large for the provider, unsupported, bad flags or descriptor, bad address, no space) is
/// this process's failure, reported as [`TransportError::Io`] naming the call, and the peer is
/// not lost; anything else (a refused, reset or closed connection, an unreachable or vanished
/// peer, and numbers not listed) means the peer cannot be reached.
fn post_failure(what: &str, peer: EndpointName, ret: isize) -> PostFailure {
    let local = [
        sys::FI_EINVAL,
        sys::FI_ENOMEM,
        sys::FI_EMSGSIZE,
        sys::FI_ENOSYS,
        sys::FI_EOPNOTSUPP,
        sys::FI_EBADF,
        sys::FI_EBADFLAGS as i32,
        sys::FI_ETOOSMALL as i32,
        sys::FI_EFAULT,
        sys::FI_ENOSPC,
    ];
    let text = strerror(ret as i64);
    if local.contains(&i32::try_from(ret.unsigned_abs()).unwrap_or(i32::MAX)) {
        PostFailure::Local(TransportError::Io(std::io::Error::other(format!(
            "libfabric {what} towards {peer} failed in this process: {text} ({ret}); what it \
             carried was dropped"
        ))))
    } else {
        PostFailure::Peer(format!(
            "libfabric {what} towards it failed: {text} ({ret})"
        ))
    }
}

/// What `fi_recv` failing with `ret` when receive buffer `i` was posted again means: `None` the
/// provider cannot take it yet (`-FI_EAGAIN`), to try again; any other error is reported as
/// [`TransportError::Io`] naming `fi_recv`, and the buffer is left out of the pool (retried, it
/// failed again at every poll and nobody heard of it).
fn repost_failure(i: usize, ret: isize) -> Option<TransportError> {
    (ret != -(sys::FI_EAGAIN as isize)).then(|| {
        TransportError::Io(std::io::Error::other(format!(
            "libfabric fi_recv (posting receive buffer {i} again) failed: {} ({ret}); the \
             endpoint receives with one buffer fewer",
            strerror(ret as i64)
        )))
    })
}

/// Why a peer is lost whose large-message transfer with this endpoint failed to post (`what`:
/// the call and what it carried, `failure` as [`post_failure`] classed error `ret`). The pair's
/// order cannot be kept past that message, even when the failure was this process's own, so
/// nothing more is exchanged with it.
fn rndv_broken(what: &str, failure: &PostFailure, ret: isize) -> String {
    let text = strerror(ret as i64);
    match failure {
        PostFailure::Peer(_) => format!("libfabric {what} failed: {text} ({ret})"),
        PostFailure::Local(_) => format!(
            "libfabric {what} failed in this process: {text} ({ret}); the large message's \
             transfer cannot go on and per-pair order cannot be kept past it, so nothing more \
             is sent to it or delivered from it"
        ),
    }
}

/// What the control packet `buf` carries, if it is part of a large message's transfer: its
/// descriptor or its acknowledgement (`None` for a goodbye).
fn rndv_ctl(buf: &[u8]) -> Option<&'static str> {
    match wire::parse_preamble(buf).map(|(kind, _)| kind) {
        Ok(wire::PKT_RNDV) => Some("fi_send of a large message's descriptor to it"),
        Ok(wire::PKT_ACK) => Some("fi_send of the acknowledgement of a large message from it"),
        _ => None,
    }
}

/// Whether a failed operation's error number means the target refused the
/// access (bad key, range or permission) rather than being unreachable.
/// `FI_ECANCELED` is how `tcp;ofi_rxm` 1.17 reports an unknown key
/// (`prov_errno` `ENOENT`). Some providers (`shm` 1.17) report errors with
/// a negative number: the sign is ignored.
fn refused(err: i32) -> bool {
    [
        sys::FI_ECANCELED,
        sys::FI_EINVAL,
        sys::FI_EACCES,
        sys::FI_EFAULT,
        sys::FI_EPERM,
        sys::FI_EKEYREJECTED,
    ]
    .contains(&err.saturating_abs())
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Registrations before the domain.
        self.rndv_out.clear();
        self.regions.clear();
        // SAFETY: the fabric is dropped exactly once, here; afterwards the
        // endpoint is closed, so the provider no longer uses any receive
        // buffer or context, and they can be freed.
        unsafe {
            ManuallyDrop::drop(&mut self.fab);
            for op in self.recv_ops.drain(..) {
                drop(Box::from_raw(op));
            }
        }
        // In-flight non-receive contexts (only if `linger` expired) are
        // deliberately leaked: the provider may have held them to the end. So are the
        // destinations of reads still posted then: a provider that serves a read by writing
        // into this process (`shm` without its fast path) could still do so after the close.
        if self.inflight > 0 {
            for (_, r) in self.rndv_in.drain() {
                std::mem::forget(r);
            }
        }
    }
}

/// The time on the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`: the last timer
/// tick, a few milliseconds old at most). Every `progress` asks whether a liveness check is
/// due; reading the precise clock there (`Instant::now`, ~22 ns on the VM of
/// docs/performance.md) was a tenth of the samples of an 8 B ping-pong over `shm`, the coarse one
/// costs a few nanoseconds, and a 100 ms interval needs no better.
fn coarse_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one `timespec` we own; CLOCK_MONOTONIC_COARSE exists on every Linux the
    // layer runs on (since 2.6.32), and a failure leaves zero, which only delays a check.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::per_provider;

    /// Two engines of this process over `provider` (run by `per_provider`: loopback only),
    /// endpoints 0 and 1 of a job of two processes with an endpoint each, addressing each other.
    fn pair(provider: &str) -> [Engine; 2] {
        let sizes = Sizes {
            packet_max: 16 << 10,
            recv_buffers: 16,
            max_message: 1 << 30,
            grace: Duration::from_millis(20),
            liveness_interval: Duration::from_secs(3600),
            read_window: 0,
            rndv_per_peer: 64,
            rndv_bytes_per_peer: 16 << 20,
        };
        let fabs = [0, 1].map(|_| Fabric::open(Some(provider), 2).expect("open an endpoint"));
        let names: Vec<Vec<u8>> = fabs.iter().map(|f| f.name().expect("name")).collect();
        let pool = RecvPool::new(RNDV_POOL_MIN, 64 << 20);
        let mut me = 0;
        fabs.map(|mut fab| {
            let addrs = fab.insert_peers(&names).expect("insert the peers");
            let e = Engine::new(
                fab,
                me,
                1,
                addrs,
                sizes,
                Arc::new((0..2).map(|_| AtomicU8::new(ALIVE)).collect()),
                Arc::new((0..2).map(|_| AtomicU8::new(ALIVE)).collect()),
                vec![None, None],
                Arc::clone(&pool),
            )
            .expect("engine");
            me += 1;
            e
        })
    }

    /// One round of what `progress` does to an engine (without its liveness checks).
    fn pump(e: &mut Engine) {
        e.post_pending();
        if e.poll_cq() > 0 {
            e.post_pending();
        }
    }

    /// Pumps both engines until `done`; fails after 20 s.
    fn pump_until(
        engines: &mut [Engine; 2],
        what: &str,
        mut done: impl FnMut(&[Engine; 2]) -> bool,
    ) {
        let t0 = Instant::now();
        while !done(engines) {
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
            for e in engines.iter_mut() {
                pump(e);
            }
            std::thread::yield_now();
        }
    }

    /// A message from process 0 tagged `tag` with one segment of `len` bytes (larger than
    /// 16 KiB: a rendezvous, read with `fi_read`), and `segs` such segments.
    fn msg(tag: u64, len: usize, segs: usize) -> Out {
        let data = (0..segs)
            .map(|i| Bytes::from(vec![tag as u8 ^ i as u8; len]))
            .collect();
        Out::Msg(Message::with_segments(Header::new(1, 0, 0, tag), data).expect("message"))
    }

    /// The tags of the messages `e` has ready, taken.
    fn take_ready(e: &mut Engine) -> Vec<u64> {
        let mut tags = Vec::new();
        e.ready.deliver(&mut |_, a| tags.push(a.header().tag));
        tags
    }

    /// The errors `e` reported, taken, as text.
    fn take_errors(e: &mut Engine) -> Vec<String> {
        e.errors.drain(..).map(|e| e.to_string()).collect()
    }

    /// Endpoint 0 sends 1 a small message, a large one of two read segments, two small ones;
    /// endpoint 1 takes them in without posting its reads. Returns the pair.
    fn large_between_small(provider: &str) -> [Engine; 2] {
        let mut engines = pair(provider);
        let [a, _] = &mut engines;
        for out in [
            msg(1, 100, 1),
            msg(2, 100 << 10, 2),
            msg(3, 100, 1),
            msg(4, 100, 1),
        ] {
            a.queue(1, out);
        }
        pump(a);
        // Endpoint 1 takes everything in (its reads wait in `urgent`) and delivers the first.
        let t0 = Instant::now();
        let mut got = Vec::new();
        while got.is_empty() || engines[1].order[0].len() < 3 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "endpoint 1 got {got:?}"
            );
            pump(&mut engines[0]);
            engines[1].poll_cq();
            got.extend(take_ready(&mut engines[1]));
        }
        assert_eq!(got, [1]);
        engines
    }

    /// Whether `e` reported exactly one loss, of process 0, with all of `words` in it.
    fn lost_once(errors: &[String], words: &[&str]) -> bool {
        errors.len() == 1
            && errors[0].starts_with("lost contact with process 0: ")
            && words.iter().all(|w| errors[0].contains(w))
    }

    #[test]
    fn a_read_failing_in_this_process_loses_its_sender_and_delivers_nothing_after_it() {
        per_provider(
            "engine::tests::a_read_failing_in_this_process_loses_its_sender_and_delivers_nothing_after_it",
            |provider| {
                let mut engines = large_between_small(provider);
                // The first of the large message's two reads fails in this process (no memory).
                engines[1].faults.push((FAULT_READ, 0, -(sys::FI_ENOMEM as isize)));
                pump(&mut engines[1]);
                let errors = take_errors(&mut engines[1]);
                assert!(
                    lost_once(&errors, &["fi_read", "failed in this process", "nothing more"]),
                    "{errors:?}"
                );
                // Another message from it: not delivered either.
                engines[0].queue(1, msg(5, 100, 1));
                engines[0].queue(1, msg(6, 100 << 10, 1));
                pump_until(&mut engines, "the sender's queue posted", |e| e[0].queued == 0);
                for _ in 0..200 {
                    for e in engines.iter_mut() {
                        pump(e);
                    }
                }
                let b = &mut engines[1];
                assert_eq!(take_ready(b), Vec::<u64>::new(), "delivered after a gap");
                assert!(b.errors.is_empty());
                // The failed message's buffer went back, its second read was never posted.
                assert!(b.rndv_in.is_empty() && b.urgent.is_empty() && b.inflight == 0);
                assert_eq!(b.reading[0], 0);
            },
        );
    }

    #[test]
    fn a_read_failing_with_its_peer_ends_once_the_reads_in_flight_do() {
        per_provider(
            "engine::tests::a_read_failing_with_its_peer_ends_once_the_reads_in_flight_do",
            |provider| {
                let mut engines = large_between_small(provider);
                // The first read goes, the second fails as a peer failure: the message is done
                // (failed, its buffer back in the pool) once the first completes.
                let refused = -(sys::FI_ECONNREFUSED as isize);
                engines[1].faults.push((FAULT_READ, 1, refused));
                pump(&mut engines[1]);
                assert!(engines[1].faults.is_empty(), "the second read was posted");
                pump_until(&mut engines, "the read in flight completes", |e| {
                    e[1].inflight == 0
                });
                let b = &mut engines[1];
                assert!(b.rndv_in.is_empty(), "the failed message's entry was kept");
                assert_eq!(b.reading[0], 0);
                let errors = take_errors(b);
                assert!(
                    lost_once(&errors, &["fi_read of a large message from it failed"]),
                    "{errors:?}"
                );
                assert_eq!(take_ready(b), Vec::<u64>::new());
            },
        );
    }

    #[test]
    fn a_read_failing_from_a_sender_that_said_goodbye_is_reported() {
        per_provider(
            "engine::tests::a_read_failing_from_a_sender_that_said_goodbye_is_reported",
            |provider| {
                let mut engines = large_between_small(provider);
                let b = &mut engines[1];
                // Its process said goodbye (through another endpoint, say): what it sent before
                // is still read and delivered, and a read that fails loses it, not silently.
                b.mark_process(0, DEPARTED, gone_reason(DEPARTED));
                b.faults
                    .push((FAULT_READ, 0, -(sys::FI_ECONNREFUSED as isize)));
                pump(b);
                let errors = take_errors(b);
                assert!(lost_once(&errors, &["fi_read", "failed"]), "{errors:?}");
                assert_eq!(b.status[0].load(Ordering::Relaxed), LOST);
                assert!(b.rndv_in.is_empty() && b.urgent.is_empty());
                assert_eq!(take_ready(b), Vec::<u64>::new());
            },
        );
    }

    #[test]
    fn a_lost_sender_releases_the_messages_it_was_being_read() {
        per_provider(
            "engine::tests::a_lost_sender_releases_the_messages_it_was_being_read",
            |provider| {
                let mut engines = large_between_small(provider);
                let b = &mut engines[1];
                assert_eq!(b.urgent.len(), 2, "the large message's two reads wait");
                // Lost before its reads were posted (say by a liveness check).
                b.lose(0, "gone".to_owned());
                assert!(b.rndv_in.is_empty(), "the admitted message was kept");
                assert_eq!(b.reading[0], 0);
                assert!(lost_once(&take_errors(b), &["gone"]));
            },
        );
    }

    #[test]
    fn a_rendezvous_descriptor_failing_in_this_process_loses_its_destination() {
        per_provider(
            "engine::tests::a_rendezvous_descriptor_failing_in_this_process_loses_its_destination",
            |provider| {
                let mut engines = pair(provider);
                let a = &mut engines[0];
                a.faults
                    .push((wire::PKT_RNDV, 0, -(sys::FI_ENOMEM as isize)));
                for out in [msg(1, 100, 1), msg(2, 100 << 10, 1), msg(3, 100, 1)] {
                    a.queue(1, out);
                }
                // (`shm` refuses the first sends to a peer until it has mapped its region.)
                pump_until(&mut engines, "the sends posted", |e| e[0].queued == 0);
                let a = &mut engines[0];
                let errors: Vec<String> = take_errors(a);
                assert!(
                    errors.len() == 1
                        && errors[0].starts_with("lost contact with process 1: ")
                        && errors[0].contains("descriptor")
                        && errors[0].contains("failed in this process"),
                    "{errors:?}"
                );
                // Its registration was released, nothing more goes.
                assert!(a.rndv_out.is_empty() && a.rndv_count[1].messages == 0);
                assert_eq!(a.queued, 0);
                pump_until(&mut engines, "the first message", |e| {
                    !e[1].ready.is_empty()
                });
                for _ in 0..200 {
                    for e in engines.iter_mut() {
                        pump(e);
                    }
                }
                assert_eq!(take_ready(&mut engines[1]), [1], "only what went before");
            },
        );
    }

    #[test]
    fn an_ack_failing_in_this_process_loses_its_peer() {
        per_provider(
            "engine::tests::an_ack_failing_in_this_process_loses_its_peer",
            |provider| {
                let mut engines = large_between_small(provider);
                engines[1]
                    .faults
                    .push((wire::PKT_ACK, 0, -(sys::FI_ENOMEM as isize)));
                let mut got = Vec::new();
                pump_until(&mut engines, "the large message read", |e| {
                    e[1].rndv_in.is_empty()
                });
                got.extend(take_ready(&mut engines[1]));
                // The large message and the two behind it were delivered before the ACK failed.
                assert_eq!(got, [2, 3, 4]);
                let errors = take_errors(&mut engines[1]);
                assert!(
                    lost_once(&errors, &["acknowledgement", "failed in this process"]),
                    "{errors:?}"
                );
                engines[0].queue(1, msg(5, 100, 1));
                for _ in 0..200 {
                    for e in engines.iter_mut() {
                        pump(e);
                    }
                }
                assert_eq!(take_ready(&mut engines[1]), Vec::<u64>::new());
            },
        );
    }

    /// Posts `queue` (items named by number) once, with the peers in `busy` handing back
    /// everything and those in `broken` failing; returns what was posted, in order, what is
    /// left, and the failed peers.
    #[allow(clippy::type_complexity)]
    fn run(
        queue: &[(ProcessId, u32)],
        busy: &[ProcessId],
        broken: &[ProcessId],
    ) -> (Vec<u32>, Vec<(ProcessId, u32)>, Vec<ProcessId>) {
        let mut q: VecDeque<_> = queue.iter().copied().collect();
        let mut posted = Vec::new();
        let failed = post_per_peer(&mut q, |p, item| {
            if busy.contains(&p) {
                Ok(Some(item))
            } else if broken.contains(&p) {
                Err(format!("peer {p} is gone"))
            } else {
                posted.push(item);
                Ok(None)
            }
        });
        (
            posted,
            q.into_iter().collect(),
            failed.into_iter().map(|(p, _)| p).collect(),
        )
    }

    #[test]
    fn a_busy_peer_holds_up_only_its_own_reads_and_acks() {
        // Peer 1 (first in the queue) is busy: 2's and 3's items still go, in order.
        let queue = [(1, 10), (1, 11), (2, 20), (3, 30), (1, 12), (2, 21)];
        let (posted, left, failed) = run(&queue, &[1], &[]);
        assert_eq!(posted, [20, 30, 21]);
        assert_eq!(
            left,
            [(1, 10), (1, 11), (1, 12)],
            "peer 1's items, in order"
        );
        assert!(failed.is_empty());
        // Nobody busy: everything goes, in order.
        let (posted, left, _) = run(&queue, &[], &[]);
        assert_eq!(posted, [10, 11, 20, 30, 12, 21]);
        assert!(left.is_empty());
    }

    #[test]
    fn a_peer_taking_items_again_gets_them_in_order() {
        // Peer 1 hands back its second item only: the rest of its items stay behind it.
        let mut q: VecDeque<(ProcessId, u32)> = [(1, 10), (2, 20), (1, 11), (1, 12), (2, 21)]
            .into_iter()
            .collect();
        let mut posted = Vec::new();
        let mut refused_once = false;
        post_per_peer(&mut q, |p, item| {
            if item == 11 && !refused_once {
                refused_once = true;
                return Ok(Some(item));
            }
            posted.push((p, item));
            Ok(None)
        });
        assert_eq!(posted, [(1, 10), (2, 20), (2, 21)]);
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), [(1, 11), (1, 12)]);
        post_per_peer(&mut q, |p, item| {
            posted.push((p, item));
            Ok(None)
        });
        assert_eq!(posted[3..], [(1, 11), (1, 12)]);
        assert!(q.is_empty());
    }

    #[test]
    fn an_ack_for_a_transfer_never_issued_or_not_outstanding_is_malformed() {
        per_provider(
            "engine::tests::an_ack_for_a_transfer_never_issued_or_not_outstanding_is_malformed",
            |provider| {
                let mut engines = pair(provider);
                // A real transfer first (transfer 1, acknowledged by endpoint 1).
                engines[0].queue(1, msg(1, 100 << 10, 1));
                pump_until(
                    &mut engines,
                    "the large message read and acknowledged",
                    |e| !e[1].ready.is_empty() && e[0].rndv_out.is_empty() && e[0].queued == 0,
                );
                assert_eq!(take_ready(&mut engines[1]), [1]);
                let acks = |engines: &mut [Engine; 2], ids: &[u64], errors: usize| {
                    for &id in ids {
                        engines[1].queue(0, Out::Ctl(wire::encode_ack(1, id)));
                    }
                    pump_until(engines, "the ACKs handled", |e| {
                        e[0].errors.len() >= errors && e[1].queued == 0
                    });
                    for _ in 0..100 {
                        for e in engines.iter_mut() {
                            pump(e);
                        }
                    }
                    take_errors(&mut engines[0])
                };
                let errors = acks(&mut engines, &[0, 2, 99, 1], 4);
                let want = [
                    "transfer 0, which this endpoint never issued (it issued 1 so far)",
                    "transfer 2, which this endpoint never issued",
                    "transfer 99, which this endpoint never issued",
                    "transfer 1, which is not outstanding",
                ];
                assert_eq!(errors.len(), want.len(), "{errors:?}");
                for (e, w) in errors.iter().zip(want) {
                    assert!(
                        e.starts_with("malformed input: process 1 acknowledged ") && e.contains(w),
                        "{e}"
                    );
                }
                // A late ACK from a peer that said goodbye is ignored.
                engines[0].mark_process(1, DEPARTED, gone_reason(DEPARTED));
                assert_eq!(acks(&mut engines, &[1], 0), Vec::<String>::new());
            },
        );
    }

    #[test]
    fn a_receive_buffer_is_posted_again_only_while_the_provider_is_busy() {
        assert!(repost_failure(3, -(sys::FI_EAGAIN as isize)).is_none());
        for code in [sys::FI_EINVAL, sys::FI_ENOMEM, sys::FI_EIO] {
            match repost_failure(3, -(code as isize)) {
                Some(TransportError::Io(e)) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("fi_recv")
                            && text.contains("buffer 3")
                            && text.contains(&format!("({})", -(code as isize))),
                        "{text}"
                    );
                }
                other => panic!("error {code}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_error_entry_that_cannot_be_read_is_reported() {
        per_provider(
            "engine::tests::an_error_entry_that_cannot_be_read_is_reported",
            |provider| {
                let [mut e, _] = pair(provider);
                // No error entry waits: fi_cq_readerr fails (-FI_EAGAIN), as a provider whose
                // announced entry cannot be read would, every time.
                assert!(!e.read_error());
                let errors = take_errors(&mut e);
                assert!(
                    errors.len() == 1
                        && errors[0].contains("fi_cq_readerr returned -")
                        && errors[0].contains("-FI_EAVAIL"),
                    "{errors:?}"
                );
            },
        );
    }

    #[test]
    fn a_post_failing_on_a_local_error_is_not_a_lost_peer() {
        let peer = EndpointName { id: 3, lanes: 1 };
        for code in [sys::FI_EINVAL, sys::FI_ENOMEM, sys::FI_EMSGSIZE] {
            match post_failure("fi_sendmsg", peer, -(code as isize)) {
                PostFailure::Local(TransportError::Io(e)) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("fi_sendmsg") && text.contains("process 3"),
                        "{text}"
                    );
                }
                other => panic!("error {code}: {other:?}"),
            }
        }
        for code in [
            sys::FI_ECONNREFUSED,
            sys::FI_ECONNRESET,
            sys::FI_ENOTCONN,
            sys::FI_EIO,
        ] {
            match post_failure("fi_read", peer, -(code as isize)) {
                PostFailure::Peer(reason) => assert!(reason.contains("fi_read"), "{reason}"),
                other => panic!("error {code}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_failed_peer_keeps_its_later_items_unposted_and_is_reported_once() {
        // Its later items stay for its loss to drop (counting down the reads among them).
        let queue = [(1, 10), (2, 20), (1, 11), (3, 30), (1, 12)];
        let (posted, left, failed) = run(&queue, &[3], &[1]);
        assert_eq!(posted, [20]);
        assert_eq!(left, [(1, 11), (3, 30), (1, 12)]);
        assert_eq!(failed, [1]);
    }
}
