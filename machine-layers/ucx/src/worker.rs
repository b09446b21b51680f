//! A UCX worker, and every call made on it.
//!
//! # What this module owns
//!
//! [`Worker`]: one `ucp_worker` (of the process, or of one PE) on the layer's shared
//! [`Context`], its lazily created endpoints, the active-message handlers and the completion
//! callbacks of sends, rendezvous receives and remote reads.
//!
//! # Invariants
//!
//! * A [`Worker`] lives behind the layer's mutex: every UCX call on it is
//!   serialised (the worker is created in `UCS_THREAD_MODE_SERIALIZED`),
//!   and the callbacks, which UCX runs only inside those calls, may use the
//!   [`Inbox`] without further locking.
//! * Every buffer UCX reads from or writes into stays alive and unmoved
//!   until UCX reports the operation complete: send descriptors
//!   ([`SendOp`]: header, iov table and the message's `Bytes`) and receive
//!   buffers are heap objects whose ownership passes to UCX (as the
//!   request's user data) and comes back in the completion callback. If
//!   UCX never completes one, it is leaked, never freed under UCX's feet: a
//!   worker that still has such operations when dropped (towards a dead peer
//!   without peer error handling) is not destroyed but left to the process's
//!   exit, with its inbox.
//! * An endpoint is created on the first operation towards a peer, with
//!   `UCP_ERR_HANDLING_MODE_PEER` unless the peer is on this host (see
//!   `UcxConfig::same_host_error_handling`); its failure (or the peer's death,
//!   found by the layer's liveness check) becomes one
//!   [`TransportError::PeerLost`] and the endpoint is closed on the next
//!   progress, outside the callback: forced with peer error handling (its
//!   operations complete, cancelled), else flushed (UCX refuses to force
//!   it). Its operations are no longer waited for from then on (see `inbox`).
//! * A message's AM header, which lists its segment lengths, never exceeds
//!   the worker's `max_am_header` (such a message is refused, see [`layout`]).

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_transport::{Header, Message, ProcessId, TransportError};
use charmrs_ucx_sys as sys;

use crate::context::Context;
use crate::inbox::{Inbox, OpKind};
use crate::status::{check, describe, is_peer_failure};
use crate::wire;
use charmrs_transport::lanes::process_of;
use charmrs_transport::undelivered::{Tally, Undelivered, Why};
use charmrs_transport::PoolBuf;

/// UCX's C parameter structs: plain integers, pointers and optional function pointers, valid
/// when all zero (unused fields are ignored through each struct's field mask).
///
/// # Safety
///
/// Only for types whose all-zero bit pattern is a valid value.
pub(crate) unsafe trait ZeroedParam: Sized {}

// SAFETY: each is a bindgen-generated C struct of integers, raw pointers and `Option`s of
// function pointers (all valid as zero), or unions of such.
unsafe impl ZeroedParam for sys::ucp_params_t {}
// SAFETY: as above.
unsafe impl ZeroedParam for sys::ucp_worker_params_t {}
// SAFETY: as above.
unsafe impl ZeroedParam for sys::ucp_worker_attr_t {}
// SAFETY: as above.
unsafe impl ZeroedParam for sys::ucp_context_attr_t {}
// SAFETY: as above.
unsafe impl ZeroedParam for sys::ucp_am_handler_param_t {}
// SAFETY: as above.
unsafe impl ZeroedParam for sys::ucp_request_param_t {}
// SAFETY: as above.
unsafe impl ZeroedParam for sys::ucp_ep_params_t {}
// SAFETY: as above.
unsafe impl ZeroedParam for sys::ucp_mem_map_params_t {}

/// A zero-initialised UCX parameter struct.
pub(crate) fn zeroed<T: ZeroedParam>() -> T {
    // SAFETY: `ZeroedParam` is only implemented for types valid as all zeros.
    unsafe { MaybeUninit::<T>::zeroed().assume_init() }
}

/// State of the endpoint to one peer.
#[derive(Debug, Clone, Copy)]
enum Ep {
    /// Not created yet.
    None,
    /// Open.
    Open(sys::ucp_ep_h),
    /// Failed and closed; the peer is lost.
    Failed,
}

/// Argument of an endpoint's error callback.
struct ErrArg {
    inbox: *const Inbox,
    peer: ProcessId,
}

/// A send UCX holds the buffers of: the AM header, the iov table and the
/// segments, kept alive until the completion callback.
pub(crate) struct SendOp {
    header: Vec<u8>,
    iov: Vec<sys::ucp_dt_iov_t>,
    segments: charmrs_transport::Segments,
    /// A small message's segments copied into one buffer (see
    /// [`GATHER_MAX`]).
    gathered: Vec<u8>,
    inbox: *const Inbox,
    /// The destination (set by `launch`).
    dst: ProcessId,
}

impl std::fmt::Debug for SendOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendOp")
            .field("header_len", &self.header.len())
            .field("segments", &self.segments.len())
            .finish_non_exhaustive()
    }
}

/// Messages of several segments up to this many bytes are copied into one
/// buffer: UCX's short protocol (the fastest on shared memory) takes a
/// contiguous buffer only, and an iov sends through its slower copying
/// protocol. A typical small entry call is two segments (arguments and a
/// byte buffer).
const GATHER_MAX: usize = 512;

/// Largest message [`Worker::send_copy`] takes: well inside UCX's eager protocols on every
/// transport, and small enough that the copy into the descriptor's kept buffer costs less than
/// allocating and freeing a buffer of its own.
pub(crate) const SEND_COPY_MAX: usize = 1024;

/// Idle send descriptors kept for reuse, in each of the two lists (the
/// worker's, and the completion callbacks' in the inbox): a burst of sends
/// in flight reuses the descriptors of the burst before instead of
/// allocating three buffers per message (each kept descriptor holds its
/// header, iov table and gathered copy: a few hundred bytes to ~1 KiB).
const SPARE_SEND_OPS: usize = 1024;

/// Messages of several segments from [`SPLIT_MIN`] bytes on travel split
/// when their leading segments are small (see `wire`): the data part, the
/// last segment alone, is then contiguous, and UCX's rendezvous reads it
/// with one zero-copy get (CMA on shared memory), where an iov goes through
/// its copying pipeline (sender and receiver each copy every byte through
/// the shared-memory FIFO).
///
/// Measured on shared memory with a buffer at rest (`xproc`, 2 cores):
/// split is faster from 16 KiB (one-way 64 KiB 10.6 → 7.3 µs, 256 KiB
/// 28 → 14.5 µs; streams 64 KiB 8.9 → 13.3 GB/s, 256 KiB 9.6 → 18 GB/s);
/// below 16 KiB it is 3–7 % slower (an extra allocation on receipt, for a
/// message UCX sends eagerly anyway). There is no upper bound: from 2 MiB
/// the pipeline was bimodal from one run to the next (2 MiB one-way ~200 or
/// ~1 100 µs; streams 1.7–10 GB/s), the split path steady and faster (2 MiB
/// streams 8.3–10.7 GB/s from `Vec`s, 15–24 GB/s from huge pages; 8
/// interleaved rounds, docs/performance.md, session 19). The price: a
/// ping-pong of 2–4 MiB buffers on 4 KiB pages is slower split (4 MiB
/// one-way ~700 against ~430 µs), as the kernel copy pins every page.
const SPLIT_MIN: usize = 16 << 10;

/// How a data message travels (see `wire`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Its segment lengths in the AM header, its segments as the data part ([`wire::AM_DATA`]).
    Plain,
    /// Its segments but the last inside the AM header too, the last one alone as the data part
    /// ([`wire::AM_DATA_SPLIT`]).
    Split,
}

/// How a message whose segments have lengths `lens` travels, given the largest AM header UCX
/// carries (`max_am_header`; 0 when unknown: no split messages, and plain ones unchecked).
/// Split from [`SPLIT_MIN`] bytes when it has two non-empty segments or more, the last one not
/// empty, the others small ([`wire::SPLIT_LEADING_MAX`]) and its header within the limit; else
/// plain.
///
/// # Errors
///
/// [`TransportError::TooLarge`] (the header's length, the limit) when even the plain header,
/// which grows with the segment count, exceeds the limit: UCX would end the process
/// (`ucs_fatal`, "RTS is too big", for a rendezvous) or overrun a fragment. The worker's
/// limit is that of its transports' smallest segment (8 KiB by default, enough for any segment
/// count; smaller `UCX_*_SEG_SIZE` settings or small-MTU networks lower it).
fn layout(lens: &[usize], max_am_header: usize) -> Result<Layout, TransportError> {
    let header = wire::header_len(lens.len());
    if let Some((&last, leading)) = lens.split_last() {
        let leading_len: usize = leading.iter().sum();
        let total = leading_len.saturating_add(last);
        if total >= SPLIT_MIN
            && last > 0
            && leading.iter().any(|&l| l > 0)
            && leading_len <= wire::SPLIT_LEADING_MAX
            && header + wire::SPLIT_EXTRA + leading_len <= max_am_header
        {
            return Ok(Layout::Split);
        }
    }
    check_header(lens.len(), max_am_header)?;
    Ok(Layout::Plain)
}

/// Whether the plain AM header of a message of `segments` segments fits in `max_am_header`
/// bytes (0: unknown, not checked); see [`layout`].
///
/// # Errors
///
/// [`TransportError::TooLarge`] (the header's length, the limit) when it does not.
pub(crate) fn check_header(segments: usize, max_am_header: usize) -> Result<(), TransportError> {
    let header = wire::header_len(segments);
    if max_am_header != 0 && header > max_am_header {
        return Err(TransportError::TooLarge {
            len: header as u64,
            max: max_am_header as u64,
        });
    }
    Ok(())
}

/// Sends UCX holds (not completed at once; rendezvous reads and gets not counted) beyond which
/// every further such send also progresses the worker once. A burst of calls from one entry
/// method (a stream) otherwise leaves all but the first few dozen in UCX's pending queue, each
/// with its request and our descriptor, until the entry returns and the scheduler polls;
/// progressing on the way lets UCX hand them to the transport as the receiver frees room, and
/// reuses descriptors. Not waiting, so never a deadlock between two processes sending to each
/// other. Measured (`xproc` stream, `shm`, 6 interleaved pairs): 8 B 9 → 18.5 MB/s (message
/// rate ×2), 4 KiB 5.0 → 5.6 GB/s; the latency path has nothing in flight and does not get here.
const PROGRESS_ON_SEND_FROM: usize = 64;

/// A rendezvous receive in flight: the destination buffer and where its
/// message goes.
struct RecvOp {
    inbox: *const Inbox,
    src: ProcessId,
    seq: u64,
    header: Header,
    lens: Vec<usize>,
    /// A split message's leading segments (the buffer gets the last).
    leading: Option<Bytes>,
    len: usize,
    buf: PoolBuf,
    /// Where in `buf` the data lands (see [`start_rndv`]).
    offset: usize,
}

/// A remote read in flight.
struct GetOp {
    inbox: *const Inbox,
    src: ProcessId,
    header: Header,
    len: usize,
    buf: PoolBuf,
    rkey: sys::ucp_rkey_h,
}

/// Tunables the worker needs (a subset of the layer's configuration).
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub(crate) rndv_threshold: Option<usize>,
    pub(crate) wakeup: bool,
    pub(crate) same_host_error_handling: bool,
    pub(crate) pool_bytes: usize,
    pub(crate) max_message: usize,
    /// Workers per process (`UcxConfig::workers`), for naming peers in errors.
    pub(crate) lanes: u32,
}

/// The UCX context, worker and endpoints of the process; see the module
/// docs.
pub(crate) struct Worker {
    context: Arc<Context>,
    worker: sys::ucp_worker_h,
    rank: ProcessId,
    addresses: Vec<Vec<u8>>,
    eps: Vec<Ep>,
    /// Boxed: UCX keeps a pointer to each.
    #[allow(clippy::vec_box)]
    err_args: Vec<Box<ErrArg>>,
    /// Next sequence number per destination.
    seq: Vec<u64>,
    /// Peers this process exchanged data with (they get a goodbye).
    talked: Vec<bool>,
    /// Recycled send descriptors (boxed: UCX holds a pointer to one in
    /// flight, so it must not move).
    #[allow(clippy::vec_box)]
    spare: Vec<Box<SendOp>>,
    rndv_threshold: Option<usize>,
    /// Largest AM header UCX carries (`max_am_header`; 0 when unknown: no
    /// split messages).
    max_am_header: usize,
    /// Per peer: endpoint with `UCP_ERR_HANDLING_MODE_PEER`.
    peer_mode: Vec<bool>,
    efd: Option<i32>,
    /// Callback state; boxed so its address, handed to UCX, never changes.
    pub(crate) inbox: Box<Inbox>,
    /// Whether `UCX_TLS` lets UCX use CMA (see `PendingRndv::fetch_limit`).
    cma_possible: bool,
    /// An endpoint's close did not complete in time (its peer left mid-handshake, say): UCX
    /// 1.13 then aborts the process in `ucp_worker_destroy` (an assertion on the endpoint's
    /// pending wire-up messages), so the worker is left for the process's exit instead.
    unclosed: bool,
    /// The process exits right after this worker is dropped (see `leave_to_process_exit`).
    exit_follows: bool,
}

// SAFETY: the raw UCX handles and the pointers into `inbox` are only used
// by the thread holding the layer's mutex around this value (the worker is
// created SERIALIZED, which allows any one thread at a time); nothing here
// is tied to the creating thread.
unsafe impl Send for Worker {}

impl Worker {
    /// The process exits right after this worker is dropped: the drop still closes the
    /// endpoints (after the layer finished its sends) but leaves the worker and context for
    /// the exit to free instead of destroying them.
    pub(crate) fn leave_to_process_exit(&mut self) {
        self.exit_follows = true;
    }

    /// Creates a worker on `context`, with the active-message handlers installed, for a job
    /// of `size` workers in which it is number `rank` (processes, or with per-PE workers PEs:
    /// see `layer`). Returns it and the worker's address (to publish).
    pub(crate) fn new(
        context: Arc<Context>,
        rank: ProcessId,
        size: u32,
        cfg: &WorkerConfig,
    ) -> Result<(Worker, Vec<u8>), TransportError> {
        let cma_possible = context.cma_possible;
        let mut wparams: sys::ucp_worker_params_t = zeroed();
        wparams.field_mask = sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
        wparams.thread_mode = sys::UCS_THREAD_MODE_SERIALIZED;
        let mut worker: sys::ucp_worker_h = ptr::null_mut();
        // SAFETY: context is live; wparams initialised per its mask.
        let st = unsafe { sys::ucp_worker_create(context.handle, &wparams, &mut worker) };
        check(st, "ucp_worker_create")?;
        let mut w = Worker {
            context,
            worker,
            rank,
            addresses: Vec::new(),
            eps: vec![Ep::None; size as usize],
            err_args: Vec::new(),
            unclosed: false,
            exit_follows: false,
            seq: vec![0; size as usize],
            talked: vec![false; size as usize],
            spare: Vec::new(),
            rndv_threshold: cfg.rndv_threshold,
            max_am_header: 0,
            peer_mode: Vec::new(),
            efd: None,
            inbox: Box::new(Inbox {
                max_message: cfg.max_message,
                lanes: cfg.lanes,
                ..Inbox::new(size, cfg.pool_bytes)
            }),
            cma_possible,
        };
        w.inbox.worker.set(worker);
        let inbox: *const Inbox = &*w.inbox;
        w.err_args = (0..size)
            .map(|peer| Box::new(ErrArg { inbox, peer }))
            .collect();
        w.set_handler(wire::AM_DATA, Some(am_data_cb::<false>))?;
        w.set_handler(wire::AM_DATA_SPLIT, Some(am_data_cb::<true>))?;
        w.set_handler(wire::AM_BYE, Some(am_bye_cb))?;
        let mut attr: sys::ucp_worker_attr_t = zeroed();
        attr.field_mask = sys::UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER as u64;
        // SAFETY: worker is live; attr is a valid out-struct with its mask set.
        if unsafe { sys::ucp_worker_query(worker, &mut attr) } == sys::UCS_OK {
            w.max_am_header = attr.max_am_header;
        }
        if cfg.wakeup {
            let mut fd = -1;
            // SAFETY: worker is live (created with the WAKEUP feature).
            let st = unsafe { sys::ucp_worker_get_efd(worker, &mut fd) };
            check(st, "ucp_worker_get_efd")?;
            w.efd = Some(fd);
        }
        let mut addr: *mut sys::ucp_address_t = ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: worker is live; out-pointers are valid.
        let st = unsafe { sys::ucp_worker_get_address(worker, &mut addr, &mut len) };
        check(st, "ucp_worker_get_address")?;
        // SAFETY: UCX returned `len` readable bytes at `addr`, released
        // right after the copy.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        // SAFETY: addr came from ucp_worker_get_address on this worker.
        unsafe { sys::ucp_worker_release_address(worker, addr) };
        Ok((w, bytes))
    }

    fn set_handler(
        &mut self,
        id: u32,
        cb: sys::ucp_am_recv_callback_t,
    ) -> Result<(), TransportError> {
        let mut p: sys::ucp_am_handler_param_t = zeroed();
        p.field_mask = (sys::UCP_AM_HANDLER_PARAM_FIELD_ID
            | sys::UCP_AM_HANDLER_PARAM_FIELD_CB
            | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG
            | sys::UCP_AM_HANDLER_PARAM_FIELD_FLAGS) as u64;
        p.id = id;
        // PERSISTENT_DATA: a handler may keep an eager message's descriptor (see `held`).
        p.flags = sys::UCP_AM_FLAG_WHOLE_MSG | sys::UCP_AM_FLAG_PERSISTENT_DATA;
        p.cb = cb;
        p.arg = &*self.inbox as *const Inbox as *mut c_void;
        // SAFETY: worker is live; the inbox outlives the worker (dropped
        // after it, see Drop).
        let st = unsafe { sys::ucp_worker_set_am_recv_handler(self.worker, &p) };
        check(st, "ucp_worker_set_am_recv_handler")
    }

    /// Stores the peers' published worker addresses (index = rank), whether
    /// each peer's endpoint uses peer error handling, and whether each peer
    /// runs on this host.
    pub(crate) fn set_addresses(
        &mut self,
        addresses: Vec<Vec<u8>>,
        peer_mode: Vec<bool>,
        same_host: &[bool],
    ) {
        self.addresses = addresses;
        self.peer_mode = peer_mode;
        self.inbox.state.borrow_mut().copied_here = same_host
            .iter()
            .map(|&local| local && self.cma_possible)
            .collect();
    }

    /// The largest AM header UCX carries on this worker (0 when unknown).
    pub(crate) fn max_am_header(&self) -> usize {
        self.max_am_header
    }

    /// The worker's event file descriptor, when created with wake-up
    /// support.
    pub(crate) fn efd(&self) -> Option<i32> {
        self.efd
    }

    /// One round of `ucp_worker_progress`; whether anything happened.
    pub(crate) fn progress_once(&mut self) -> bool {
        // Fetches freed by completions in the previous call start now, after their messages
        // were delivered (and, typically, their buffers given back to the pool: the next fetch
        // then lands in a buffer still in cache).
        if self.inbox.lender.has_returned() {
            // SAFETY: the caller holds the worker lock; the descriptors are this worker's.
            unsafe { self.inbox.lender.release_returned(self.worker) };
        }
        let started = self.start_waiting_rndv();
        // SAFETY: worker is live; callbacks only touch the inbox.
        let busy = unsafe { sys::ucp_worker_progress(self.worker) != 0 };
        if self.inbox.has_gaps() {
            self.inbox
                .check_gaps(std::time::Instant::now(), crate::inbox::GAP_LIMIT);
        }
        busy | started
    }

    /// Starts fetching announced rendezvous messages while slots are free;
    /// whether any started.
    fn start_waiting_rndv(&mut self) -> bool {
        let mut started = false;
        loop {
            let next = {
                let mut st = self.inbox.state.borrow_mut();
                // The oldest announcement whose sender has a free slot (each sender's own in
                // order). This runs on every poll: the common cases (the oldest can start, or
                // every waiting one is from the oldest's busy sender) allocate nothing.
                let st = &mut *st;
                let (active, copied) = (&st.rndv_active, &st.copied_here);
                let free = |p: &PendingRndv| active[p.src as usize] < p.fetch_limit(copied);
                let found = match st.rndv_waiting.front() {
                    None => None,
                    Some(p) if free(p) => Some(0),
                    Some(front)
                        if st.rndv_waiting_from[front.src as usize] == st.rndv_waiting.len() =>
                    {
                        None
                    }
                    Some(front) => {
                        // Several senders wait: the oldest announcement of one not at its
                        // limit, skipping the rest of each blocked sender's (a reused list;
                        // the scan ends once the blocked senders account for all that is left).
                        let blocked = &mut st.rndv_blocked;
                        blocked.clear();
                        blocked.push(front.src);
                        let mut unaccounted =
                            st.rndv_waiting.len() - st.rndv_waiting_from[front.src as usize];
                        let mut found = None;
                        for (i, p) in st.rndv_waiting.iter().enumerate() {
                            if unaccounted == 0 {
                                break;
                            }
                            if blocked.contains(&p.src) {
                                continue;
                            }
                            if free(p) {
                                found = Some(i);
                                break;
                            }
                            blocked.push(p.src);
                            unaccounted -= st.rndv_waiting_from[p.src as usize];
                        }
                        found
                    }
                };
                let taken = found.and_then(|i| st.rndv_waiting.remove(i));
                if let Some(p) = &taken {
                    st.rndv_waiting_from[p.src as usize] -= 1;
                }
                taken
            };
            let Some(pending) = next else { break };
            start_rndv(&self.inbox, pending);
            started = true;
        }
        started
    }

    /// `ucp_worker_arm`: `Ok(true)` when armed (the event fd will signal the
    /// next event), `Ok(false)` when events are pending (progress first).
    pub(crate) fn arm(&mut self) -> Result<bool, TransportError> {
        // SAFETY: worker is live and has the WAKEUP feature (callers check
        // efd() first).
        match unsafe { sys::ucp_worker_arm(self.worker) } {
            sys::UCS_OK => Ok(true),
            sys::UCS_ERR_BUSY => Ok(false),
            st => check(st, "ucp_worker_arm").map(|()| false),
        }
    }

    /// Closes the endpoints whose peers failed (reported by the error
    /// callback, the liveness check or a failed operation since the last call), after giving
    /// back the descriptors of their announced messages not fetched yet (reported lost).
    ///
    /// An endpoint with peer error handling is closed forced: UCX completes its operations at
    /// once, cancelled. Without it, UCX refuses a forced close (`UCS_ERR_INVALID_PARAM`: the
    /// endpoint would stay open) and the close flushes instead; an operation towards a dead
    /// peer may then never complete, which is why the inbox no longer waits for a failed peer's
    /// operations.
    pub(crate) fn close_failed(&mut self) {
        let failed = std::mem::take(&mut self.inbox.state.borrow_mut().failed_eps);
        for p in failed {
            self.release_waiting_from(p);
            if let Ep::Open(ep) = self.eps[p as usize] {
                self.eps[p as usize] = Ep::Failed;
                let flags = close_flags(self.peer_mode(p));
                let mut param: sys::ucp_request_param_t = zeroed();
                param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
                param.flags = flags;
                // SAFETY: ep is open and not used after this (its state is Failed now).
                let req = unsafe { sys::ucp_ep_close_nbx(ep, &param) };
                if sys::UCS_PTR_IS_PTR(req) {
                    // SAFETY: a request of this worker, freed once (UCX releases it when it
                    // completes).
                    unsafe { sys::ucp_request_free(req) };
                } else if sys::UCS_PTR_IS_ERR(req) && !is_peer_failure(sys::UCS_PTR_STATUS(req)) {
                    // A peer failure is the endpoint's known state (UCX closed it at once). Any
                    // other refusal is a bug of ours, or a UCX that does not close it.
                    self.inbox
                        .error(TransportError::Io(std::io::Error::other(format!(
                            "closing the UCX endpoint to {} (lost) failed: {}",
                            self.inbox.peer(p),
                            describe(sys::UCS_PTR_STATUS(req))
                        ))));
                }
            }
        }
    }

    /// Gives back the held descriptors of `p`'s announced messages waiting for a fetch slot
    /// (`p`'s endpoint failed: their data cannot be fetched), reporting them lost.
    fn release_waiting_from(&mut self, p: ProcessId) {
        let dropped = {
            let mut st = self.inbox.state.borrow_mut();
            if st.rndv_waiting_from[p as usize] == 0 {
                return;
            }
            st.rndv_waiting_from[p as usize] = 0;
            let (gone, kept): (std::collections::VecDeque<_>, _) =
                std::mem::take(&mut st.rndv_waiting)
                    .into_iter()
                    .partition(|w| w.src == p);
            st.rndv_waiting = kept;
            gone
        };
        for w in dropped {
            // SAFETY: a held rendezvous descriptor of this worker whose fetch never started;
            // its endpoint is not closed yet (the caller closes it after this).
            unsafe { sys::ucp_am_data_release(self.worker, w.desc) };
            self.inbox.message_lost(
                p,
                format!(
                    "message #{} ({} bytes) was announced, its data not fetched",
                    w.seq, w.len
                ),
            );
        }
    }

    /// Whether the endpoint to `p` uses (or will use) `UCP_ERR_HANDLING_MODE_PEER`.
    fn peer_mode(&self, p: ProcessId) -> bool {
        self.peer_mode.get(p as usize).copied().unwrap_or(true)
    }

    /// Number of open endpoints.
    pub(crate) fn open_endpoints(&self) -> usize {
        self.eps.iter().filter(|e| matches!(e, Ep::Open(_))).count()
    }

    /// Whether this process sent to or received from `p`.
    pub(crate) fn talked_with(&self, p: ProcessId) -> bool {
        self.talked[p as usize] || self.inbox.heard_from(p)
    }

    /// Whether `p` was lost (endpoint failed or reported lost).
    pub(crate) fn is_lost(&self, p: ProcessId) -> bool {
        matches!(self.eps[p as usize], Ep::Failed) || self.inbox.lost(p)
    }

    /// The endpoint to `p`, created on first use.
    fn ep(&mut self, p: ProcessId) -> Result<sys::ucp_ep_h, TransportError> {
        match self.eps[p as usize] {
            Ep::Open(ep) => return Ok(ep),
            Ep::Failed => {
                return Err(TransportError::PeerLost {
                    process: p,
                    reason: if self.inbox.departed(p) {
                        "it shut its UCX layer down".to_owned()
                    } else {
                        "its UCX endpoint failed".to_owned()
                    },
                })
            }
            Ep::None => {}
        }
        let addr = self.addresses.get(p as usize).ok_or_else(|| {
            TransportError::Bootstrap(format!("no UCX worker address for {}", self.inbox.peer(p)))
        })?;
        let mut params: sys::ucp_ep_params_t = zeroed();
        params.field_mask = (sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
            | sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
            | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64;
        params.address = addr.as_ptr() as *const sys::ucp_address_t;
        params.err_mode = if self.peer_mode(p) {
            sys::UCP_ERR_HANDLING_MODE_PEER
        } else {
            sys::UCP_ERR_HANDLING_MODE_NONE
        };
        params.err_handler.cb = Some(ep_error_cb);
        params.err_handler.arg = &*self.err_args[p as usize] as *const ErrArg as *mut c_void;
        let mut ep: sys::ucp_ep_h = ptr::null_mut();
        // SAFETY: worker is live; the address bytes and the error argument
        // outlive the call (the argument lives as long as the worker).
        let st = unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) };
        if st != sys::UCS_OK {
            self.eps[p as usize] = Ep::Failed;
            let reason = format!("cannot create a UCX endpoint: {}", describe(st));
            self.inbox.peer_failed(p, reason.clone());
            return Err(TransportError::PeerLost { process: p, reason });
        }
        self.eps[p as usize] = Ep::Open(ep);
        Ok(ep)
    }

    /// Sends `msg` to `dst` as one active message: header plus segment
    /// lengths in the AM header, the segments as an iov (no copy).
    ///
    /// # Errors
    ///
    /// [`TransportError::TooLarge`] (header length, limit) for a message whose AM header would
    /// exceed the largest UCX carries (see [`layout`]); as [`ep`](Self::ep); a send UCX refuses
    /// at once.
    pub(crate) fn send(&mut self, dst: ProcessId, msg: Message) -> Result<(), TransportError> {
        let (header, segments) = msg.into_parts();
        let mut lens = [0usize; 8];
        let lens_vec;
        let lens: &[usize] = if segments.len() <= lens.len() {
            for (l, s) in lens.iter_mut().zip(&segments) {
                *l = s.len();
            }
            &lens[..segments.len()]
        } else {
            lens_vec = segments.iter().map(Bytes::len).collect::<Vec<_>>();
            &lens_vec
        };
        let layout = layout(lens, self.max_am_header)?;
        let ep = self.ep(dst)?;
        self.talked[dst as usize] = true;
        let seq = self.next_seq(dst);
        let mut op = self.take_op();
        let mut total = 0usize;
        op.iov.clear();
        // The low 32 bits travel (see `wire`).
        wire::encode(&mut op.header, self.rank, seq as u32, &header, lens);
        for s in &segments {
            total += s.len();
            if !s.is_empty() {
                op.iov.push(sys::ucp_dt_iov_t {
                    buffer: s.as_ptr() as *mut c_void,
                    length: s.len(),
                });
            }
        }
        // A large message whose segments but the last are small: those go in the header and the
        // data part is the last segment alone, contiguous (see `wire`'s split messages).
        let mut am_id = wire::AM_DATA;
        if layout == Layout::Split {
            let (last, leading) = segments.split_last().expect("two segments or more");
            let data = last.as_ptr();
            wire::push_split(&mut op.header, data as usize, leading);
            op.iov.clear();
            op.iov.push(sys::ucp_dt_iov_t {
                buffer: data as *mut c_void,
                length: last.len(),
            });
            am_id = wire::AM_DATA_SPLIT;
        }
        op.segments = segments;
        let mut param: sys::ucp_request_param_t = zeroed();
        // One (non-empty) segment: a plain contiguous buffer, which lets UCX
        // use its short protocol; several: the iov table.
        param.datatype = sys::ucp_dt_make_contig(1);
        let (buffer, count) = match op.iov.len() {
            0 => (ptr::null_mut(), 0),
            1 => (op.iov[0].buffer, op.iov[0].length),
            _ if total <= GATHER_MAX => {
                op.gathered.clear();
                for s in &op.segments {
                    op.gathered.extend_from_slice(s);
                }
                (op.gathered.as_mut_ptr() as *mut c_void, total)
            }
            n => {
                param.datatype = sys::ucp_dt_make_iov();
                (op.iov.as_mut_ptr() as *mut c_void, n)
            }
        };
        param.flags = 0;
        if self.rndv_threshold.is_some_and(|t| total >= t) {
            param.flags |= sys::UCP_AM_SEND_FLAG_RNDV;
        }
        self.launch(dst, ep, op, am_id, buffer, count, param, total)
    }

    /// Sends `data` to `dst` as a message of one segment with `header`, without an allocation
    /// per message (the caller keeps `data`). For small messages ([`SEND_COPY_MAX`] bytes at
    /// most), which UCX sends eagerly: first offered to UCX's short protocol with immediate
    /// completion forced (UCX reads the bytes before returning, or refuses); when refused, copied
    /// into a reused buffer of a send descriptor and sent from there, with the same sequence
    /// number. (UCX 1.13 sends a short message with both an AM header and data; a release that
    /// refused that would cost one refused call per message, not a failure.)
    pub(crate) fn send_copy(
        &mut self,
        dst: ProcessId,
        header: &Header,
        data: &[u8],
    ) -> Result<(), TransportError> {
        debug_assert!(data.len() <= SEND_COPY_MAX);
        let ep = self.ep(dst)?;
        self.talked[dst as usize] = true;
        let seq = self.next_seq(dst);
        // One segment, whatever `header.segment_count` says.
        let mut fixed = [0u8; wire::FIXED];
        wire::encode_fixed(&mut fixed, self.rank, seq as u32, header, 1);
        // First the short protocol with the caller's bytes, if UCX can send them before
        // returning: no descriptor, no copy, no completion to handle. When it cannot (the
        // FIFO is full, UCX holds earlier sends on this endpoint, the message needs more than
        // a short send), the descriptor path below sends the same bytes with the same
        // sequence number, UCX keeping its per-endpoint order.
        let mut param: sys::ucp_request_param_t = zeroed();
        param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_DATATYPE
            | sys::UCP_OP_ATTR_FIELD_FLAGS
            | sys::UCP_OP_ATTR_FLAG_FORCE_IMM_CMPL;
        param.datatype = sys::ucp_dt_make_contig(1);
        param.flags = 0;
        // SAFETY: ep is open; the header and `data` are read before the call returns (forced
        // immediate completion: a send UCX cannot finish at once is refused, not kept).
        let req = unsafe {
            sys::ucp_am_send_nbx(
                ep,
                wire::AM_DATA,
                fixed.as_ptr() as *const c_void,
                fixed.len(),
                data.as_ptr() as *mut c_void,
                data.len(),
                &param,
            )
        };
        if req.is_null() {
            return Ok(());
        }
        // Forced immediate completion never hands out a request (UCX would still own the message
        // then, and its sequence number could not be given back).
        debug_assert!(
            !sys::UCS_PTR_IS_PTR(req),
            "a request from a forced immediate send"
        );
        if !(sys::UCS_PTR_IS_ERR(req) && sys::UCS_PTR_STATUS(req) == sys::UCS_ERR_NO_RESOURCE) {
            // A failure (not a lack of resources, which the descriptor path below waits out).
            self.seq[dst as usize] -= 1;
            return self.send_failed(dst, sys::UCS_PTR_STATUS(req), data.len());
        }
        let mut op = self.take_op();
        op.header.clear();
        op.header.extend_from_slice(&fixed);
        op.gathered.clear();
        op.gathered.extend_from_slice(data);
        let buffer = op.gathered.as_mut_ptr() as *mut c_void;
        let mut param: sys::ucp_request_param_t = zeroed();
        param.datatype = sys::ucp_dt_make_contig(1);
        self.launch(
            dst,
            ep,
            op,
            wire::AM_DATA,
            buffer,
            data.len(),
            param,
            data.len(),
        )
    }

    /// The next sequence number towards `dst` (given back by whoever fails to send the message:
    /// [`launch`](Self::launch), or `send_copy` when UCX refuses its immediate send for another
    /// reason than a lack of resources).
    fn next_seq(&mut self, dst: ProcessId) -> u64 {
        let seq = self.seq[dst as usize];
        self.seq[dst as usize] += 1;
        seq
    }

    /// A send descriptor: a spare one, one a completion gave back, or a new one.
    fn take_op(&mut self) -> Box<SendOp> {
        self.spare
            .pop()
            .or_else(|| self.take_completed_op())
            .unwrap_or_else(|| {
                Box::new(SendOp {
                    header: Vec::with_capacity(wire::header_len(4)),
                    iov: Vec::with_capacity(4),
                    segments: charmrs_transport::Segments::new(),
                    gathered: Vec::new(),
                    inbox: &*self.inbox,
                    dst: 0,
                })
            })
    }

    /// Hands `op` (whose header, and whose buffers `buffer` points into, are filled in) to
    /// `ucp_am_send_nbx`; `param` holds the datatype and flags, the rest is set here. The
    /// descriptor comes back through the completion callback, or at once if UCX is done.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &mut self,
        dst: ProcessId,
        ep: sys::ucp_ep_h,
        mut op: Box<SendOp>,
        am_id: u32,
        buffer: *mut c_void,
        count: usize,
        mut param: sys::ucp_request_param_t,
        total: usize,
    ) -> Result<(), TransportError> {
        op.dst = dst;
        param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK
            | sys::UCP_OP_ATTR_FIELD_USER_DATA
            | sys::UCP_OP_ATTR_FIELD_DATATYPE
            | sys::UCP_OP_ATTR_FIELD_FLAGS;
        param.cb.send = Some(send_done_cb);
        let raw = Box::into_raw(op);
        param.user_data = raw as *mut c_void;
        // SAFETY: `raw` owns the header, iov table, segments and gathered
        // copy, which stay
        // put until the callback (or the immediate completion below) takes
        // the box back; ep is open.
        let req = unsafe {
            sys::ucp_am_send_nbx(
                ep,
                am_id,
                (*raw).header.as_ptr() as *const c_void,
                (*raw).header.len(),
                buffer,
                count,
                &param,
            )
        };
        if sys::UCS_PTR_IS_PTR(req) {
            let sends = {
                let mut st = self.inbox.state.borrow_mut();
                st.op_started(dst, OpKind::Send);
                st.sends_in_flight
            };
            if sends > PROGRESS_ON_SEND_FROM {
                // A burst: let UCX move its queue now (see `PROGRESS_ON_SEND_FROM`). What this
                // progress delivers waits in the inbox for the next `progress`: the layer's
                // `release` wakes the progressing thread for it, and neither `before_park` nor
                // `progress_wait` sleeps while it waits (`Inbox::needs_poller`).
                // SAFETY: worker is live and held by this thread (the layer's lock), not inside
                // one of its callbacks; the callbacks only touch the inbox.
                unsafe { sys::ucp_worker_progress(self.worker) };
            }
            return Ok(());
        }
        // Completed (or failed) at once: UCX does not call the callback.
        // SAFETY: UCX is done with the descriptor; take it back.
        let op = unsafe { Box::from_raw(raw) };
        self.recycle(op);
        let st = sys::UCS_PTR_STATUS(req);
        if st == sys::UCS_OK {
            return Ok(());
        }
        // Not sent: give the sequence number back, or the receiver would
        // wait for it forever.
        self.seq[dst as usize] -= 1;
        self.send_failed(dst, st, total)
    }

    /// The error for a send of `total` bytes to `dst` that UCX refused with `st`.
    fn send_failed(
        &self,
        dst: ProcessId,
        st: sys::ucs_status_t,
        total: usize,
    ) -> Result<(), TransportError> {
        if is_peer_failure(st) {
            Err(TransportError::PeerLost {
                process: dst,
                reason: describe(st),
            })
        } else {
            check(
                st,
                &format!(
                    "ucp_am_send_nbx to {} ({total} bytes)",
                    self.inbox.peer(dst)
                ),
            )
        }
    }

    fn recycle(&mut self, mut op: Box<SendOp>) {
        op.segments.clear();
        if self.spare.len() < SPARE_SEND_OPS {
            self.spare.push(op);
        }
    }

    /// A descriptor that a completion callback gave back, if any (with a
    /// burst of sends in flight, most complete there, not at once).
    fn take_completed_op(&mut self) -> Option<Box<SendOp>> {
        let mut st = self.inbox.state.borrow_mut();
        let op = st.spare.pop()?;
        // Move the rest over while the state is borrowed anyway.
        let room = SPARE_SEND_OPS.saturating_sub(self.spare.len());
        let from = st.spare.len().saturating_sub(room);
        self.spare.extend(st.spare.drain(from..));
        Some(op)
    }

    /// Sends the goodbye notice to every peer this process exchanged data
    /// with.
    pub(crate) fn say_goodbye(&mut self) {
        // UCX reads the AM header until the send completes, which may be after a timed-out wait
        // below (the request is then freed but can still go out with the final flush): the 4
        // bytes live for the rest of the process (once per layer, at its end).
        let rank: &'static [u8; 4] = Box::leak(Box::new(self.rank.to_le_bytes()));
        for p in 0..self.eps.len() as ProcessId {
            if p == self.rank || !self.talked_with(p) || self.is_lost(p) {
                continue;
            }
            let Ok(ep) = self.ep(p) else { continue };
            let mut param: sys::ucp_request_param_t = zeroed();
            param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = sys::UCP_AM_SEND_FLAG_EAGER;
            // SAFETY: ep is open; the 4-byte header is never freed.
            let req = unsafe {
                sys::ucp_am_send_nbx(
                    ep,
                    wire::AM_BYE,
                    rank.as_ptr() as *const c_void,
                    rank.len(),
                    ptr::null_mut(),
                    0,
                    &param,
                )
            };
            self.wait_request(req, Duration::from_millis(500));
        }
    }

    /// Progresses until `req` (a value returned by a `_nbx` call) completes
    /// or `timeout` passes, then frees it; whether it completed in time.
    fn wait_request(&mut self, req: sys::ucs_status_ptr_t, timeout: Duration) -> bool {
        if !sys::UCS_PTR_IS_PTR(req) {
            return true;
        }
        let deadline = Instant::now() + timeout;
        // SAFETY: req is a live request of this worker until freed below.
        unsafe {
            while sys::ucp_request_check_status(req) == sys::UCS_INPROGRESS
                && Instant::now() < deadline
            {
                sys::ucp_worker_progress(self.worker);
            }
            let completed = sys::ucp_request_check_status(req) != sys::UCS_INPROGRESS;
            if !completed {
                sys::ucp_request_cancel(self.worker, req);
            }
            sys::ucp_request_free(req);
            completed
        }
    }

    /// The shutdown starts (no error reaches the runtime from now on: failed sends are counted
    /// as untold, see `InboxState::send_failed`); returns, for
    /// [`undelivered`](Self::undelivered), per peer, whether its loss was reported to the
    /// runtime (returned by `progress`).
    pub(crate) fn shutdown_mark(&self) -> ShutdownMark {
        self.inbox.state.borrow_mut().closing = true;
        let st = self.inbox.state.borrow();
        let reported = (0..self.eps.len() as ProcessId)
            // (`lost` borrows the state again, shared.)
            .map(|p| self.inbox.lost(p) && st.unreported_loss(p).is_none())
            .collect();
        ShutdownMark { reported }
    }

    /// At the end of the shutdown (the endpoints closed): adds to `into` the sends towards each
    /// peer process that UCX did not complete — still held, or failed (refused, given back
    /// failed or cancelled) — and why: the peer's loss was reported before the shutdown (`mark`;
    /// every failed send counts, gone with it), it was lost during the shutdown or its loss never
    /// reached the runtime (every failed send counts: no error did; the same if its process on
    /// this host is gone: `identities`, by worker id), it said goodbye, or else the linger ran
    /// out (for these two, the failed sends no error told of). Nothing when every send
    /// completed.
    pub(crate) fn undelivered(
        &self,
        mark: &ShutdownMark,
        identities: &[Option<charmrs_transport::liveness::Identity>],
        into: &mut Undelivered,
    ) {
        let st = self.inbox.state.borrow();
        for p in 0..self.eps.len() as ProcessId {
            let n = st.sends_towards(p);
            if n.held + n.failed == 0 {
                continue;
            }
            let (why, failed) = if mark.reported[p as usize] {
                (Why::Reported, n.failed)
            } else if self.inbox.lost(p) {
                let why = st.unreported_loss(p).unwrap_or("its UCX endpoint failed");
                (Why::Lost(why.to_owned()), n.failed)
            } else if self.inbox.departed(p) {
                (Why::Left, n.failed_untold)
            } else if matches!(self.eps[p as usize], Ep::Failed) {
                (Why::Lost("its UCX endpoint failed".to_owned()), n.failed)
            } else {
                match identities.get(p as usize) {
                    Some(Some(id)) if !id.alive() => (
                        Why::Lost(format!("its process (pid {}) no longer exists", id.pid())),
                        n.failed,
                    ),
                    _ => (Why::Linger, n.failed_untold),
                }
            };
            into.add(
                process_of(p, self.inbox.lanes),
                why,
                Tally::messages(n.held + failed),
            );
        }
    }

    /// Progresses until no operation holds buffers or `timeout` passes.
    pub(crate) fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.inbox.holds_operations() && Instant::now() < deadline {
            self.progress_once();
        }
    }

    /// Closes every open endpoint, flushing it first (up to `timeout`). One with peer error
    /// handling towards which UCX still holds operations of ours (the caller waited for them
    /// already: a receiver that did not fetch its data) is closed forced instead, which hands
    /// them back cancelled: UCX 1.13 cannot destroy the worker while such an endpoint has
    /// requests (a fatal assertion), and a flushing close would wait for them in vain.
    pub(crate) fn close_all(&mut self, timeout: Duration) {
        let mut reqs = Vec::new();
        for p in 0..self.eps.len() as ProcessId {
            if let Ep::Open(ep) = self.eps[p as usize] {
                self.eps[p as usize] = Ep::None;
                let held = self.inbox.state.borrow().ops_towards(p) > 0;
                let mut param: sys::ucp_request_param_t = zeroed();
                param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
                param.flags = if held {
                    close_flags(self.peer_mode(p))
                } else {
                    0
                };
                // SAFETY: ep is open and not used after this. A forced close completes the
                // endpoint's requests before it returns: their callbacks borrow the inbox, which
                // nothing here holds.
                let req = unsafe { sys::ucp_ep_close_nbx(ep, &param) };
                if sys::UCS_PTR_IS_PTR(req) {
                    reqs.push(req);
                }
            }
        }
        let deadline = Instant::now() + timeout;
        for req in reqs {
            if !self.wait_request(req, deadline.saturating_duration_since(Instant::now())) {
                self.unclosed = true;
            }
        }
    }

    /// Registers `len` bytes at `addr` for remote reads; returns the memory
    /// handle and the packed remote key.
    pub(crate) fn mem_map(
        &mut self,
        addr: *const u8,
        len: usize,
    ) -> Result<(sys::ucp_mem_h, Vec<u8>), TransportError> {
        let mut p: sys::ucp_mem_map_params_t = zeroed();
        p.field_mask = (sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | sys::UCP_MEM_MAP_PARAM_FIELD_PROT) as u64;
        p.address = addr as *mut c_void;
        p.length = len;
        p.prot = sys::UCP_MEM_MAP_PROT_LOCAL_READ | sys::UCP_MEM_MAP_PROT_REMOTE_READ;
        let mut memh: sys::ucp_mem_h = ptr::null_mut();
        // SAFETY: context is live; addr..addr+len is memory the caller keeps
        // alive while mapped.
        let st = unsafe { sys::ucp_mem_map(self.context.handle, &p, &mut memh) };
        check(st, &format!("ucp_mem_map of {len} bytes"))?;
        let mut buf: *mut c_void = ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: memh was just mapped on this context.
        let st = unsafe { sys::ucp_rkey_pack(self.context.handle, memh, &mut buf, &mut size) };
        if let Err(e) = check(st, "ucp_rkey_pack") {
            self.mem_unmap(memh);
            return Err(e);
        }
        // SAFETY: UCX returned `size` readable bytes at `buf`, released right
        // after the copy.
        let packed = unsafe { std::slice::from_raw_parts(buf as *const u8, size) }.to_vec();
        // SAFETY: buf came from ucp_rkey_pack.
        unsafe { sys::ucp_rkey_buffer_release(buf) };
        Ok((memh, packed))
    }

    /// Undoes a [`mem_map`](Worker::mem_map).
    pub(crate) fn mem_unmap(&mut self, memh: sys::ucp_mem_h) {
        // SAFETY: memh was mapped on this context and is unmapped once.
        let st = unsafe { sys::ucp_mem_unmap(self.context.handle, memh) };
        if st != sys::UCS_OK {
            eprintln!("charmrs-ucx: ucp_mem_unmap failed: {}", describe(st));
        }
    }

    /// Reads `len` bytes at remote address `addr` of `src` through the packed
    /// remote key `rkey`; the bytes arrive through the inbox as a message
    /// with `header` and one segment.
    pub(crate) fn get(
        &mut self,
        src: ProcessId,
        addr: u64,
        len: usize,
        packed: &[u8],
        header: Header,
    ) -> Result<(), TransportError> {
        if len > self.inbox.max_message {
            return Err(TransportError::TooLarge {
                len: len as u64,
                max: self.inbox.max_message as u64,
            });
        }
        let ep = self.ep(src)?;
        // `ucp_ep_rkey_unpack` takes no length: it walks the key's own layout (a map of memory
        // domains, then a length byte and that many bytes per domain), so a damaged key would
        // make it read past our buffer. Zero padding past the end bounds what it can read:
        // zero bytes end the walk (an empty map, empty domain keys).
        let mut padded = Vec::with_capacity(packed.len() + RKEY_READ_MAX);
        padded.extend_from_slice(packed);
        padded.resize(packed.len() + RKEY_READ_MAX, 0);
        let mut rkey: sys::ucp_rkey_h = ptr::null_mut();
        // SAFETY: ep is open; `padded` is only read, and is followed by RKEY_READ_MAX zero bytes,
        // more than the most a packed key's layout can make UCX read past its start.
        let st =
            unsafe { sys::ucp_ep_rkey_unpack(ep, padded.as_ptr() as *const c_void, &mut rkey) };
        check(
            st,
            &format!("ucp_ep_rkey_unpack of a key from {}", self.inbox.peer(src)),
        )?;
        let op = Box::new(GetOp {
            inbox: &*self.inbox,
            src,
            header,
            len,
            buf: self.inbox.pool.take(len),
            rkey,
        });
        let raw = Box::into_raw(op);
        let mut param: sys::ucp_request_param_t = zeroed();
        param.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK
            | sys::UCP_OP_ATTR_FIELD_USER_DATA
            | sys::UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        param.cb.send = Some(get_done_cb);
        param.user_data = raw as *mut c_void;
        // Counted before the call: the callback may run before it returns, and undoes this.
        self.inbox.op_started(src, OpKind::Fetch);
        // SAFETY: the destination buffer (capacity len) is owned by the
        // descriptor, which UCX gives back in the callback (NO_IMM_CMPL: the
        // callback runs exactly once unless the call fails outright, possibly
        // before the call returns).
        let req = unsafe {
            sys::ucp_get_nbx(
                ep,
                (*raw).buf.as_mut_ptr() as *mut c_void,
                len,
                addr,
                rkey,
                &param,
            )
        };
        if sys::UCS_PTR_IS_ERR(req) {
            self.inbox.op_ended(src, OpKind::Fetch);
            // SAFETY: UCX did not keep the descriptor.
            let op = unsafe { Box::from_raw(raw) };
            // SAFETY: rkey was unpacked above and is destroyed once.
            unsafe { sys::ucp_rkey_destroy(op.rkey) };
            let st = sys::UCS_PTR_STATUS(req);
            return check(
                st,
                &format!("ucp_get_nbx of {len} bytes from {}", self.inbox.peer(src)),
            );
        }
        Ok(())
    }
}

/// Where a worker's shutdown starts from (see [`Worker::shutdown_mark`]).
pub(crate) struct ShutdownMark {
    /// Per peer: its loss was reported to the runtime before the shutdown.
    reported: Vec<bool>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Announced messages nobody will fetch: give their descriptors back.
        let waiting = {
            let mut st = self.inbox.state.borrow_mut();
            st.rndv_waiting_from.fill(0);
            std::mem::take(&mut st.rndv_waiting)
        };
        for pending in waiting {
            // SAFETY: a held, unused rendezvous descriptor of this worker.
            unsafe { sys::ucp_am_data_release(self.worker, pending.desc) };
        }
        self.close_all(Duration::from_millis(500));
        // Arrived messages never handed on hold lent descriptors too: they go first.
        drop(self.inbox.discard_messages());
        if self.inbox.lender.out() > 0
            || self.inbox.state.borrow().ops_held() > 0
            || self.unclosed
            || self.exit_follows
        {
            // Messages delivered in place are still viewed (the application kept them past the
            // layer): their bytes live in the worker's descriptors. Or UCX still holds
            // operations of ours, towards a peer whose endpoint could not be closed forced (no
            // peer error handling: a dead same-host peer's): UCX 1.13 would not complete them
            // when the worker is destroyed (their buffers are ours, their requests its own).
            // Or an endpoint's close did not complete (see `unclosed`). Or the process exits
            // next (`exit_follows`): UCX 1.13 can still abort in `ucp_worker_destroy` on a
            // wire-up message left pending towards a peer that already left (seen once over
            // TCP after the settling below), and the exit frees everything anyway. Either way
            // the worker, its context and what UCX points to (the inbox, the endpoints' error
            // arguments) stay, for the process's exit to free. Nothing calls into the worker
            // any more.
            std::mem::forget(self.context.clone());
            std::mem::forget(std::mem::replace(
                &mut self.inbox,
                Box::new(Inbox::new(0, 0)),
            ));
            std::mem::forget(std::mem::take(&mut self.err_args));
            return;
        }
        // No view is left, so none can be returned concurrently: every lent descriptor is
        // queued now.
        // SAFETY: this thread owns the worker (dropping it); the descriptors are its own.
        unsafe { self.inbox.lender.release_returned(self.worker) };
        // Endpoints UCX made for peers that connected to this worker may still hold wire-up
        // messages (a peer that left while its connection was being set up: over TCP the
        // reconnection fails at once on this host). UCX 1.13 aborts the process if
        // `ucp_worker_destroy` finds one pending, so the worker is progressed until it has
        // been quiet for a while (at most `SETTLE_MAX`).
        let deadline = Instant::now() + SETTLE_MAX;
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline && quiet_since.elapsed() < SETTLE_QUIET {
            // SAFETY: this thread owns the worker; its callbacks' state (the inbox) is live.
            if unsafe { sys::ucp_worker_progress(self.worker) } != 0 {
                quiet_since = Instant::now();
            }
        }
        // SAFETY: the endpoints are closed and no lent descriptor is viewed; the worker is
        // destroyed once, before its `Arc` of the context (a field) is dropped. The inbox
        // (callback argument) is a field dropped after this body runs.
        unsafe { sys::ucp_worker_destroy(self.worker) };
    }
}

/// How long a worker being destroyed must have had nothing to progress (see `Worker::drop`).
const SETTLE_QUIET: Duration = Duration::from_millis(5);

/// The longest a worker being destroyed is progressed first.
const SETTLE_MAX: Duration = Duration::from_millis(100);

/// Eager messages from this size are received into pooled buffers.
pub(crate) const EAGER_POOL_MIN: usize = 4 << 10;

/// Eager messages from this size are delivered in UCX's own descriptor
/// (see `held`); smaller ones are copied out. Measured (`xproc`, shared
/// memory): from 1 KiB lending is faster (one-way 1 KiB 1.57 → 1.29 µs,
/// 2 KiB 1.74 → 1.38 µs, 4 KiB 1.91 → 1.29 µs); a 256-byte call is slower
/// lent (1.25 → 1.36 µs, its stream 321 → 204 MB/s: UCX replaces the kept
/// descriptor from its pool and we release it later, which costs more than
/// copying a few cache lines).
const LEND_MIN: usize = 1 << 10;

/// The message of `header.segment_count` segments of lengths `lens` from
/// its received bytes (views, no copy): `data` holds every segment back to
/// back, or, for a split message (`leading` given), the last one while
/// `leading` holds the others. The lengths were validated against both by
/// `wire`'s decoder.
fn assemble(
    leading: Option<Bytes>,
    data: Bytes,
    header: Header,
    lens: impl IntoIterator<Item = usize>,
) -> Result<Message, TransportError> {
    let n = usize::from(header.segment_count);
    let mut segs = Vec::with_capacity(n);
    let (buf, last) = match leading {
        Some(leading) => (leading, Some(data)),
        None => (data, None),
    };
    let from_buf = if last.is_some() {
        n.saturating_sub(1)
    } else {
        n
    };
    let mut at = 0;
    for l in lens.into_iter().take(from_buf) {
        segs.push(buf.slice(at..at + l));
        at += l;
    }
    segs.extend(last);
    Message::with_segments(header, segs)
}

/// Active-message handler of data messages (UCX calls it inside progress):
/// plain ones (`SPLIT` false, [`wire::AM_DATA`]) or split ones
/// ([`wire::AM_DATA_SPLIT`]). Delivers an eager message at once, and starts
/// fetching (or queues) one announced by rendezvous.
unsafe extern "C" fn am_data_cb<const SPLIT: bool>(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: arg is the worker's boxed inbox, alive while the worker is.
    let inbox = unsafe { &*(arg as *const Inbox) };
    let hdr: &[u8] = if header_length == 0 {
        &[]
    } else {
        // SAFETY: UCX passes header_length readable bytes.
        unsafe { std::slice::from_raw_parts(header as *const u8, header_length) }
    };
    let decoded = if SPLIT {
        wire::decode_split(hdr, length, inbox.size)
    } else {
        wire::decode(hdr, length, inbox.size)
    };
    let d = match decoded {
        Ok(d) => d,
        Err(e) => {
            inbox.error(e);
            return sys::UCS_OK;
        }
    };
    if length > inbox.max_message {
        // Refused before a buffer is allocated for it (the length is the sender's word).
        inbox.error(TransportError::Malformed(format!(
            "{} sent a message of {length} bytes, over the limit of {} \
             (UcxConfig::max_message)",
            inbox.peer(d.src),
            inbox.max_message
        )));
        return sys::UCS_OK;
    }
    // The header lives only during this call: a split message's leading segments are copied.
    let leading = SPLIT.then(|| Bytes::copy_from_slice(d.leading));
    let data_align = d.data_align;
    // SAFETY: param is valid for the duration of the callback.
    let attr = unsafe { (*param).recv_attr };
    if attr & sys::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 && length > 0 {
        if inbox.abandoned(d.src) {
            // Its endpoint failed (closed, or about to be): the data cannot be fetched. UCX
            // gives the descriptor back itself (UCS_OK without a receive started).
            inbox.message_lost(
                d.src,
                format!(
                    "a message of {length} bytes was announced after its endpoint failed, \
                     its data not fetched"
                ),
            );
            return sys::UCS_OK;
        }
        let Some(seq) = inbox.arrive(d.src, d.seq, None) else {
            // A duplicate (reported), or its sender's stream broke: not fetched (its data
            // would fill the place of the message it duplicates). UCX gives the descriptor
            // back itself (UCS_OK without a receive started).
            return sys::UCS_OK;
        };
        let pending = PendingRndv {
            desc: data,
            src: d.src,
            seq,
            header: d.header,
            lens: d.lens().collect(),
            leading,
            data_align,
            len: length,
        };
        let mut st = inbox.state.borrow_mut();
        let src = pending.src as usize;
        if st.rndv_active[src] < pending.fetch_limit(&st.copied_here)
            && st.rndv_waiting_from[src] == 0
        {
            drop(st);
            start_rndv(inbox, pending);
            return sys::UCS_OK;
        }
        // Keep the descriptor (UCS_INPROGRESS); fetched by `progress_once`
        // when a slot frees.
        st.rndv_waiting_from[src] += 1;
        st.rndv_waiting.push_back(pending);
        return sys::UCS_INPROGRESS;
    }
    let bytes: &[u8] = if length == 0 {
        &[]
    } else {
        // SAFETY: UCX passes `length` readable bytes (the whole message:
        // the handler is registered with UCP_AM_FLAG_WHOLE_MSG).
        unsafe { std::slice::from_raw_parts(data as *const u8, length) }
    };
    // From LEND_MIN bytes the message is delivered in UCX's descriptor, kept (see `held`).
    // Otherwise its data lives there only during this call and is copied out: into a pooled
    // buffer from EAGER_POOL_MIN bytes (fresh allocations of that size, freed in bursts, have
    // the allocator give their pages back and fault them in again: a stream of 4 KiB entry
    // calls ran 1.3× faster from the pool), else into an exact-size allocation.
    let lendable = attr & sys::UCP_AM_RECV_ATTR_FLAG_DATA as u64 != 0 && length >= LEND_MIN;
    if !SPLIT && !lendable && length < EAGER_POOL_MIN && d.header.segment_count == 1 {
        // Small, one segment: copied into the inbox's buffer of small messages and lent to the
        // sink from there (no allocation per message; see `Inbox::arrive_small`).
        inbox.arrive_small(d.src, d.seq, d.header, bytes);
        return sys::UCS_OK;
    }
    let (data, status) = if lendable {
        // SAFETY: UCX flagged the data as keepable, `length` bytes, and this handler returns
        // UCS_INPROGRESS for it.
        let lent = unsafe { inbox.lender.lend(data, length) };
        (lent, sys::UCS_INPROGRESS)
    } else if length >= EAGER_POOL_MIN {
        let mut loan = inbox.pool.take(length);
        loan.as_mut_slice()[..length].copy_from_slice(bytes);
        (loan.into_bytes(length), sys::UCS_OK)
    } else {
        (Bytes::copy_from_slice(bytes), sys::UCS_OK)
    };
    let msg = if d.header.segment_count == 1 {
        // One segment: its own buffer (no shared-buffer promotion).
        Ok(Message::with_segment(d.header, data))
    } else {
        assemble(leading, data, d.header, d.lens())
    };
    match msg {
        Ok(m) => {
            inbox.arrive(d.src, d.seq, Some(m));
        }
        Err(e) => inbox.error(e),
    }
    status
}

/// An announced rendezvous message whose data is not fetched yet.
#[derive(Debug)]
pub(crate) struct PendingRndv {
    /// UCX's data descriptor (held: the callback returned `UCS_INPROGRESS`
    /// or is starting the fetch now).
    desc: *mut c_void,
    src: ProcessId,
    /// Full sequence number, reserved in the inbox.
    seq: u64,
    header: Header,
    lens: Vec<usize>,
    /// A split message's leading segments.
    leading: Option<Bytes>,
    /// A split message's data address in the sender modulo
    /// [`wire::SPLIT_ALIGN`].
    data_align: usize,
    len: usize,
}

impl PendingRndv {
    /// How many rendezvous fetches from its sender may be active when this one starts;
    /// `copied_here[p]`: whether rendezvous data from process `p` may be
    /// copied by this core (a same-host peer, CMA among the transports).
    /// A split message's data from such a peer is one contiguous buffer,
    /// which UCX reads with a single kernel copy on the receiving core
    /// (CMA): a second fetch at the same time only spreads the copies over
    /// two destination buffers (a 1 MiB stream 12.5–14.4 → 15.6–16.2 GB/s
    /// with one: the pool then hands out the same, cached buffer each
    /// time). Other messages go through UCX's pipeline, whose fragments the
    /// sender copies while the receiver copies earlier ones, or over a
    /// network, whose latency fetches in flight overlap: two at once (over
    /// shared memory 2–4 MiB streams 5–8 % faster than one; over UCX's
    /// `tcp` 64 KiB 2.6–2.9 against 1.7 GB/s, 1 MiB 4.7–5.2 against
    /// 4.0–4.3).
    fn fetch_limit(&self, copied_here: &[bool]) -> usize {
        if self.leading.is_some() && copied_here.get(self.src as usize) == Some(&true) {
            1
        } else {
            crate::inbox::MAX_RNDV_ACTIVE
        }
    }
}

/// Starts fetching a rendezvous message's data into a pooled buffer
/// (inside progress, with the worker lock held).
fn start_rndv(inbox: &Inbox, pending: PendingRndv) {
    if inbox.abandoned(pending.src) {
        // Taken from the waiting list after its sender's endpoint failed, before `close_failed`
        // released it (never from a handler: that one refuses such announcements).
        // SAFETY: a held, unused rendezvous descriptor of this worker (outside its callbacks);
        // the sender's endpoint is closed only after `close_failed` emptied the list of its
        // announcements.
        unsafe { sys::ucp_am_data_release(inbox.worker.get(), pending.desc) };
        inbox.message_lost(
            pending.src,
            format!(
                "message #{} ({} bytes) was announced, its data not fetched",
                pending.seq, pending.len
            ),
        );
        return;
    }
    if inbox.broken(pending.src) {
        // Queued for a fetch slot before its sender's stream broke (reported): nothing of the
        // sender's is delivered any more, its data is not fetched.
        // SAFETY: a held, unused rendezvous descriptor of this worker, from the waiting list
        // (never from a handler: its `arrive` refuses a broken sender's announcements).
        unsafe { sys::ucp_am_data_release(inbox.worker.get(), pending.desc) };
        return;
    }
    let PendingRndv {
        desc,
        src,
        seq,
        header,
        lens,
        leading,
        data_align,
        len,
    } = pending;
    // A split message's data lands at the same offset within a cache line as it has in the
    // sender (`wire::SPLIT_ALIGN`), where the pooled buffer has room for that: the kernel's
    // copy between co-aligned buffers is faster. Another one arrives as all its segments back
    // to back; its largest starts on a cache line, so that numbers in it are aligned for
    // reading in place (`PodVec`).
    let mut buf = inbox.pool.take(len);
    let offset = if leading.is_some() {
        buf.aligned_offset(len, data_align, wire::SPLIT_ALIGN)
    } else {
        let largest = charmrs_transport::largest_segment_start(lens.iter().copied());
        buf.aligned_offset(len, largest.wrapping_neg(), wire::SPLIT_ALIGN)
    };
    // SAFETY: `take(len)` returns a buffer of at least `len` bytes, and `aligned_offset` returns
    // an offset with `offset + len` within it (0 when there is no room to move the data).
    let dst = unsafe { buf.as_mut_ptr().add(offset) };
    let op = Box::new(RecvOp {
        inbox,
        src,
        seq,
        header,
        lens,
        leading,
        len,
        buf,
        offset,
    });
    let raw = Box::into_raw(op);
    let mut p: sys::ucp_request_param_t = zeroed();
    p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK
        | sys::UCP_OP_ATTR_FIELD_USER_DATA
        | sys::UCP_OP_ATTR_FIELD_DATATYPE
        | sys::UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    p.cb.recv_am = Some(rndv_done_cb);
    p.datatype = sys::ucp_dt_make_contig(1);
    p.user_data = raw as *mut c_void;
    // Counted before the call: with NO_IMM_CMPL the callback may still run before the call
    // returns (an operation that completes at once), and it undoes these.
    {
        let mut st = inbox.state.borrow_mut();
        st.op_started(src, OpKind::Fetch);
        st.rndv_active[src as usize] += 1;
    }
    // SAFETY: `desc` is a rendezvous descriptor UCX handed us and nobody
    // has used yet; the destination (capacity `len`) belongs to the
    // descriptor box, returned to us in the callback (NO_IMM_CMPL: the
    // callback runs exactly once unless the call fails outright, possibly
    // before it returns).
    let req =
        unsafe { sys::ucp_am_recv_data_nbx(inbox.worker.get(), desc, dst as *mut c_void, len, &p) };
    if sys::UCS_PTR_IS_ERR(req) {
        {
            let mut st = inbox.state.borrow_mut();
            st.op_ended(src, OpKind::Fetch);
            st.rndv_active[src as usize] -= 1;
        }
        // SAFETY: UCX did not keep the descriptor box.
        drop(unsafe { Box::from_raw(raw) });
        let status = sys::UCS_PTR_STATUS(req);
        if is_peer_failure(status) {
            // Lost with the peer (reported even if it said goodbye), as in `rndv_done`.
            lost_with_peer(inbox, src, seq, len, status);
        } else {
            // Its reserved place would stall the sender's stream for ever.
            let why = format!("ucp_am_recv_data_nbx failed: {}", describe(status));
            inbox.fetch_failed(src, seq, len, &why, false);
        }
    }
}

/// Reports message `seq` (`len` bytes) of `src`, whose receive failed with the peer's failure
/// `status`, lost with its sender.
fn lost_with_peer(inbox: &Inbox, src: ProcessId, seq: u64, len: usize, status: sys::ucs_status_t) {
    inbox.message_lost(
        src,
        format!(
            "receiving message #{seq} ({len} bytes) failed: {}",
            describe(status)
        ),
    );
}

/// Active-message handler of goodbyes.
unsafe extern "C" fn am_bye_cb(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    _data: *mut c_void,
    _length: usize,
    _param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: arg is the worker's boxed inbox.
    let inbox = unsafe { &*(arg as *const Inbox) };
    // The header is the sender's rank (worker id), 4 bytes (see `wire`).
    let claimed = (header_length >= 4).then(|| {
        // SAFETY: UCX passes `header_length` (at least 4) readable bytes.
        let b = unsafe { std::slice::from_raw_parts(header as *const u8, 4) };
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    });
    let malformed = match claimed {
        Some(src) if src >= inbox.size => format!(
            "a goodbye claims to come from UCX worker {src} (its sender field) of a job of {}",
            inbox.size
        ),
        Some(src) if header_length != 4 => format!(
            "a goodbye from {} has a header of {header_length} bytes (expected 4: its sender \
             field)",
            inbox.peer(src)
        ),
        Some(src) => {
            inbox.depart(src);
            return sys::UCS_OK;
        }
        None => format!(
            "a goodbye with a header of {header_length} bytes, too short for its sender field \
             (4 bytes)"
        ),
    };
    // Not taken as a goodbye: the loss of its sender, if any, is still reported.
    inbox.error(TransportError::Malformed(malformed));
    sys::UCS_OK
}

/// Completion of a send: the descriptor comes back.
unsafe extern "C" fn send_done_cb(req: *mut c_void, status: sys::ucs_status_t, user: *mut c_void) {
    // SAFETY: user is the descriptor box handed to ucp_am_send_nbx, given
    // back exactly once.
    let mut op = unsafe { Box::from_raw(user as *mut SendOp) };
    // SAFETY: the descriptor's inbox is the worker's, alive while it is.
    let inbox = unsafe { &*op.inbox };
    if status != sys::UCS_OK && !is_peer_failure(status) {
        inbox.error(TransportError::Io(std::io::Error::other(format!(
            "active-message send failed: {}",
            describe(status)
        ))));
    }
    op.segments.clear();
    {
        let mut st = inbox.state.borrow_mut();
        st.op_ended(op.dst, OpKind::Send);
        if status != sys::UCS_OK {
            st.send_failed(op.dst, is_peer_failure(status));
        }
        if st.spare.len() < SPARE_SEND_OPS {
            st.spare.push(op);
        }
    }
    // SAFETY: req is the completed request of this send.
    unsafe { sys::ucp_request_free(req) };
}

/// Completion of a rendezvous receive: the bytes are in the buffer.
unsafe extern "C" fn rndv_done_cb(
    req: *mut c_void,
    status: sys::ucs_status_t,
    length: usize,
    user: *mut c_void,
) {
    // SAFETY: user is the descriptor box handed to ucp_am_recv_data_nbx.
    let op = unsafe { Box::from_raw(user as *mut RecvOp) };
    // SAFETY: the inbox outlives the worker's requests.
    let inbox = unsafe { &*op.inbox };
    rndv_done(inbox, *op, status, length);
    // SAFETY: req is the completed request.
    unsafe { sys::ucp_request_free(req) };
}

/// What [`rndv_done_cb`] does with a rendezvous receive UCX completed with `status`, `length`
/// bytes received: the message takes its reserved place in its sender's order, or is lost with
/// its sender, or (any other failure) breaks its sender's stream, reported.
fn rndv_done(inbox: &Inbox, op: RecvOp, status: sys::ucs_status_t, length: usize) {
    let (src, seq, len) = (op.src, op.seq, op.len);
    {
        let mut st = inbox.state.borrow_mut();
        st.op_ended(src, OpKind::Fetch);
        st.rndv_active[src as usize] -= 1;
    }
    if status == sys::UCS_OK && length == len {
        let buf = op.buf.into_bytes_at(op.offset, length);
        match assemble(op.leading, buf, op.header, op.lens) {
            Ok(m) => inbox.complete(src, seq, m),
            Err(e) => {
                let why = format!("its segments do not make a message: {e}");
                inbox.fetch_failed(src, seq, len, &why, true);
            }
        }
    } else if is_peer_failure(status) {
        // The message's place in its sender's order was reserved: it is lost with the peer, which
        // is reported even if the peer said goodbye (it left before the message was delivered).
        lost_with_peer(inbox, src, seq, len, status);
    } else {
        // Its reserved place would stall the sender's stream for ever.
        let why = if status == sys::UCS_OK {
            format!("UCX completed its receive with {length} bytes")
        } else {
            format!("{} ({length} bytes arrived)", describe(status))
        };
        inbox.fetch_failed(src, seq, len, &why, false);
    }
}

/// Completion of a remote read.
unsafe extern "C" fn get_done_cb(req: *mut c_void, status: sys::ucs_status_t, user: *mut c_void) {
    // SAFETY: user is the descriptor box handed to ucp_get_nbx.
    let op = unsafe { Box::from_raw(user as *mut GetOp) };
    // SAFETY: the inbox outlives the worker's requests.
    let inbox = unsafe { &*op.inbox };
    inbox.op_ended(op.src, OpKind::Fetch);
    // SAFETY: the rkey was unpacked for this read and is destroyed once.
    unsafe { sys::ucp_rkey_destroy(op.rkey) };
    if status == sys::UCS_OK {
        let GetOp {
            src,
            header,
            len,
            buf,
            ..
        } = *op;
        inbox.push_ready(src, Message::with_segment(header, buf.into_bytes(len)));
    } else if is_peer_failure(status) {
        // The read's completion message will never come: reported even after a goodbye.
        inbox.message_lost(
            op.src,
            format!(
                "remote read of {} bytes failed: {}",
                op.len,
                describe(status)
            ),
        );
    } else {
        inbox.error(TransportError::Io(std::io::Error::other(format!(
            "remote read of {} bytes from {} failed: {}",
            op.len,
            inbox.peer(op.src),
            describe(status)
        ))));
    }
    // SAFETY: req is the completed request.
    unsafe { sys::ucp_request_free(req) };
}

/// How to close an endpoint: forced (`UCP_EP_CLOSE_FLAG_FORCE`: UCX completes its operations at
/// once, cancelled, without the peer) only when it uses peer error handling, which UCX requires
/// for that (it refuses a forced close otherwise); else flushed (0).
fn close_flags(peer_mode: bool) -> u32 {
    if peer_mode {
        sys::UCP_EP_CLOSE_FLAG_FORCE
    } else {
        0
    }
}

/// Error callback of an endpoint (`UCP_ERR_HANDLING_MODE_PEER`).
unsafe extern "C" fn ep_error_cb(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: arg is the endpoint's ErrArg box, alive while the worker is.
    let a = unsafe { &*(arg as *const ErrArg) };
    // SAFETY: as above, for the inbox it points to.
    let inbox = unsafe { &*a.inbox };
    inbox.peer_failed(a.peer, describe(status));
}

/// The most bytes `ucp_ep_rkey_unpack` can read of a packed key: its memory-domain map and
/// memory type, then for each of at most 64 domains a length byte, up to 255 bytes of key and
/// its device information; 32 KiB bounds all of it.
const RKEY_READ_MAX: usize = 32 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_travels_split_plain_or_not_at_all_by_its_header_length() {
        let max = 8101; // UCX 1.13's limit over shared memory or TCP with default segment sizes
        assert_eq!(layout(&[64 << 10], max).unwrap(), Layout::Plain);
        assert_eq!(layout(&[], max).unwrap(), Layout::Plain);
        // Small leading segments before a large last one: split.
        assert_eq!(layout(&[100, 0, 7, 1 << 20], max).unwrap(), Layout::Split);
        // Not when small, the last is empty, no leading segment has bytes, the leading ones are
        // large, or the header with the leading bytes would not fit.
        assert_eq!(layout(&[100, 1000], max).unwrap(), Layout::Plain);
        assert_eq!(layout(&[1 << 20, 0], max).unwrap(), Layout::Plain);
        assert_eq!(layout(&[0, 1 << 20], max).unwrap(), Layout::Plain);
        assert_eq!(layout(&[5000, 1 << 20], max).unwrap(), Layout::Plain);
        assert_eq!(layout(&[1000, 1 << 20], 1000).unwrap(), Layout::Plain);
        // Unknown limit (0): never split, never refused.
        assert_eq!(layout(&[100, 1 << 20], 0).unwrap(), Layout::Plain);
        let many = vec![1usize; usize::from(charmrs_transport::MAX_SEGMENTS)];
        assert_eq!(layout(&many, 0).unwrap(), Layout::Plain);
        // The most segments a message may have fit the default limit...
        assert_eq!(layout(&many, max).unwrap(), Layout::Plain);
        // ...not one of 1 KiB segments (UCX_MM_SEG_SIZE=1024 UCX_SELF_SEG_SIZE=1024: 933 bytes):
        // refused, small and large messages alike, where UCX would end the process.
        let header = wire::header_len(many.len());
        assert!(header > 933);
        for lens in [
            many.clone(),
            [many.clone(), vec![1 << 20]].concat()[1..].to_vec(),
        ] {
            match layout(&lens, 933) {
                Err(TransportError::TooLarge { len, max: 933 }) => assert_eq!(len, header as u64),
                other => panic!("{other:?}"),
            }
        }
        // As many segments as fit: plain.
        let fit = (933 - wire::FIXED) / 8 + 1;
        assert_eq!(layout(&vec![1; fit], 933).unwrap(), Layout::Plain);
        assert!(layout(&vec![1; fit + 1], 933).is_err());
        assert!(check_header(fit, 933).is_ok() && check_header(fit + 1, 933).is_err());
    }

    /// A rendezvous announcement that duplicates one whose data is in flight was fetched all the
    /// same, and its data could fill the original's place.
    #[test]
    fn a_duplicate_rendezvous_announcement_is_not_fetched() {
        let inbox = Inbox::new(2, 1 << 20);
        let len = 1 << 20;
        assert_eq!(inbox.arrive(1, 0, None), Some(0), "the original, in flight");
        // Process 1's fetch slots are taken: an announcement that were to be fetched would be
        // kept (UCS_INPROGRESS) and queued for a slot.
        inbox.state.borrow_mut().rndv_active[1] = crate::inbox::MAX_RNDV_ACTIVE;
        let header = Header {
            segment_count: 1,
            ..Header::new(1, 0, 0, 7)
        };
        let mut am_header = Vec::new();
        wire::encode(&mut am_header, 1, 0, &header, &[len]);
        let param = sys::ucp_am_recv_param_t {
            recv_attr: u64::from(sys::UCP_AM_RECV_ATTR_FLAG_RNDV),
            reply_ep: ptr::null_mut(),
        };
        // SAFETY: what UCX passes a handler: the handler's argument (a live inbox), a header of
        // `am_header.len()` readable bytes, a rendezvous data descriptor (only ever held, never
        // read: null is never dereferenced) and a valid parameter struct.
        let status = unsafe {
            am_data_cb::<false>(
                &inbox as *const Inbox as *mut c_void,
                am_header.as_ptr().cast(),
                am_header.len(),
                ptr::null_mut(),
                len,
                &param,
            )
        };
        assert_eq!(
            status,
            sys::UCS_OK,
            "given back to UCX, not kept for a fetch"
        );
        {
            let st = inbox.state.borrow();
            assert!(st.rndv_waiting.is_empty() && st.rndv_waiting_from[1] == 0);
            let errors: Vec<String> = st.errors.iter().map(ToString::to_string).collect();
            assert!(
                errors.len() == 1 && errors[0].contains("process 1 sent message number 0 twice"),
                "{errors:?}"
            );
        }
        // The original's data fills its place, once.
        inbox.complete(1, 0, Message::new(header));
        let st = inbox.state.borrow();
        assert_eq!((st.ready.len(), st.errors.len()), (1, 1));
    }

    /// A rendezvous receive of `len` bytes from `src`, its fetch started (counted as
    /// `start_rndv` does), the message of one segment (or of `segments`).
    fn fetching(inbox: &Inbox, src: ProcessId, seq: u64, len: usize, segments: u16) -> RecvOp {
        {
            let mut st = inbox.state.borrow_mut();
            st.op_started(src, OpKind::Fetch);
            st.rndv_active[src as usize] += 1;
        }
        let mut lens = vec![0; usize::from(segments) - 1];
        lens.push(len);
        RecvOp {
            inbox,
            src,
            seq,
            header: Header {
                segment_count: segments,
                ..Header::new(1, 0, 0, seq)
            },
            lens,
            leading: None,
            len,
            buf: inbox.pool.take(len),
            offset: 0,
        }
    }

    /// A rendezvous receive that failed (not for its sender's loss) or came back short left its
    /// reserved place empty: the sender's later messages waited for ever, unreported.
    #[test]
    fn a_failed_rendezvous_receive_breaks_its_senders_stream() {
        let inbox = Inbox::new(4, 1 << 20);
        let len = 64 << 10;
        for src in 1..4 {
            assert_eq!(inbox.arrive(src, 0, None), Some(0));
            inbox.arrive(src, 1, Some(Message::new(Header::new(1, 0, 0, 1))));
        }
        // Process 1's comes back short, process 2's fails, process 3's data does not make a
        // message (more segments than a message may have: `wire` refuses such a header, the
        // completion checks all the same).
        rndv_done(&inbox, fetching(&inbox, 1, 0, len, 1), sys::UCS_OK, len - 1);
        rndv_done(
            &inbox,
            fetching(&inbox, 2, 0, len, 1),
            sys::UCS_ERR_NO_MEMORY,
            0,
        );
        let too_many = charmrs_transport::MAX_SEGMENTS + 1;
        rndv_done(
            &inbox,
            fetching(&inbox, 3, 0, len, too_many),
            sys::UCS_OK,
            len,
        );
        let st = inbox.state.borrow();
        assert!(st.ready.is_empty(), "nothing delivered out of order");
        assert_eq!((st.in_flight, st.rndv_active.iter().sum::<usize>()), (0, 0));
        let errors: Vec<String> = st.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        for (src, e) in (1..4).zip(&errors) {
            assert!(
                e.contains(&format!(
                    "process {src}: message #0 ({len} bytes) could not be received: "
                )) && e.contains("1 other messages of its not delivered yet and all its later"),
                "{e}"
            );
        }
        assert!(errors[0].contains("with 65535 bytes"), "{errors:?}");
        assert!(errors[1].contains("(0 bytes arrived)"), "{errors:?}");
        assert!(errors[2].contains("do not make a message"), "{errors:?}");
        assert!(matches!(st.errors[2], TransportError::Malformed(_)));
        drop(st);
        assert!((1..4).all(|src| inbox.broken(src)));
        // A message of the first fetch that does complete takes its place.
        assert_eq!(inbox.arrive(0, 0, None), Some(0));
        rndv_done(&inbox, fetching(&inbox, 0, 0, len, 1), sys::UCS_OK, len);
        let st = inbox.state.borrow();
        assert_eq!((st.ready.len(), st.errors.len()), (1, 3));
    }

    /// A malformed goodbye was dropped without a word.
    #[test]
    fn a_malformed_goodbye_is_reported_naming_its_claimed_sender() {
        let inbox = Inbox::new(3, 1 << 20);
        let bye = |header: &[u8]| {
            // SAFETY: what UCX passes a handler: its argument (a live inbox), a header of
            // `header.len()` readable bytes, no data; the parameters are not read.
            let status = unsafe {
                am_bye_cb(
                    &inbox as *const Inbox as *mut c_void,
                    header.as_ptr().cast(),
                    header.len(),
                    ptr::null_mut(),
                    0,
                    ptr::null(),
                )
            };
            assert_eq!(status, sys::UCS_OK);
            let e = inbox.state.borrow_mut().errors.pop_front();
            e.map(|e| {
                assert!(matches!(e, TransportError::Malformed(_)), "{e:?}");
                e.to_string()
            })
        };
        assert_eq!(bye(&2u32.to_le_bytes()), None);
        assert!(inbox.departed(2));
        let e = bye(&7u32.to_le_bytes()).unwrap();
        assert!(
            e.contains(
                "a goodbye claims to come from UCX worker 7 (its sender field) of a job of 3"
            ),
            "{e}"
        );
        let e = bye(&[1, 0, 0, 0, 0]).unwrap();
        assert!(
            e.contains(
                "a goodbye from process 1 has a header of 5 bytes (expected 4: its sender field)"
            ),
            "{e}"
        );
        let e = bye(&[1, 0]).unwrap();
        assert!(
            e.contains("a goodbye with a header of 2 bytes, too short for its sender field"),
            "{e}"
        );
        assert!(
            !inbox.departed(0) && !inbox.departed(1),
            "not taken as goodbyes"
        );
        assert!(inbox.state.borrow().errors.is_empty(), "one error each");
    }

    #[test]
    fn only_an_endpoint_with_peer_error_handling_is_closed_forced() {
        // UCX refuses a forced close without peer error handling (UCS_ERR_INVALID_PARAM), which
        // left the endpoint of a dead same-host peer open and its operations pending for ever.
        assert_eq!(close_flags(true), sys::UCP_EP_CLOSE_FLAG_FORCE);
        assert_eq!(close_flags(false), 0);
    }
}
