//! [`UcxLayer`]: the UCX implementation of [`MachineLayer`].

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::spin::{SpinGuard, SpinMutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_transport::kv::KvBootstrap;
use charmrs_transport::{
    Arrival, ArrivalBatch, Bootstrap, Header, MachineLayer, MemRegion, Message, ProcessId,
    RemoteKey, TransportError,
};
use crossbeam_queue::SegQueue;

use crate::context::Context;
use crate::wake::{wait_readable, Armed, EventFd, Watcher};
use crate::worker::{Worker, WorkerConfig};
use charmrs_transport::lanes::{
    decode_address_list, encode_address_list, endpoint_for, process_of,
};
use charmrs_transport::liveness::Identity;
use charmrs_transport::undelivered::Undelivered;

/// Bootstrap key under which each process publishes the addresses of its UCX workers (a count,
/// then each address after its length, all little-endian `u32`s).
pub const ADDR_KEY: &str = "ucx-worker-address";

/// Bootstrap key under which each process publishes where it runs (for the
/// same-host liveness check).
const IDENTITY_KEY: &str = "ucx-identity";

/// `progress` calls between two readings of the clock for the liveness check, and idle ones
/// between two for arming (reading it costs as much as an idle progress).
const CLOCK_EVERY: u32 = 64;

thread_local! {
    /// The worker ("lane") of a per-PE layer this thread drives: set by
    /// [`MachineLayer::bind_lane`]; threads never bound use lane 0. One binding per thread,
    /// whichever layer it was made through: a thread that uses two per-PE layers (tests) has
    /// the same lane in both.
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Per-thread scratch list of the messages one `progress` delivers (moved out of the inbox
    /// under the worker lock, handed to the sink after it is released), kept for its capacity.
    /// Taken out for the delivery and put back after it, so that nothing of it is borrowed while
    /// the sink runs: a sink may progress another layer, or another lane, on this thread (which
    /// then finds the slot empty and uses a batch of its own).
    static SCRATCH: std::cell::Cell<ArrivalBatch> =
        const { std::cell::Cell::new(ArrivalBatch::new()) };
}

/// Clears a flag when dropped (also on unwinding out of the sink).
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Magic opening the `rkey` bytes of a [`RemoteKey`] made by this layer.
const RKEY_MAGIC: &[u8; 4] = b"UCXK";

/// Tunables of a [`UcxLayer`]. UCX's own settings (transports, devices,
/// thresholds) come from the usual `UCX_*` environment variables
/// (`UCX_TLS=shm,self`, `UCX_NET_DEVICES=lo`, ...).
#[derive(Debug, Clone)]
pub struct UcxConfig {
    /// Messages of at least this many bytes are sent with UCX's rendezvous
    /// protocol (`UCP_AM_SEND_FLAG_RNDV`: the receiver pulls the data
    /// straight into the buffer that becomes the message segment). `None`
    /// lets UCX choose (`UCX_RNDV_THRESH`). Default: `None`.
    pub rndv_threshold: Option<usize>,
    /// How long [`UcxLayer::progress_wait`] polls before it arms the worker
    /// and sleeps in the kernel. Default 50 µs.
    pub wait_spin: Duration,
    /// With a wake-up hook installed, how long `progress` must have found
    /// nothing before it arms the worker so that the next arrival calls
    /// the hook. Default 1 ms. A fallback: a poller that parks calls
    /// `before_park`, which arms at once. Each arming costs two wake-ups of
    /// the watcher thread (the arming, then the arrival), on a core busy
    /// with the poller: at 20 µs the sender of a 1 MiB stream, idle between
    /// acknowledgements, armed ~180 times a second.
    pub arm_after: Duration,
    /// How often `progress` checks that the same-host peers this process
    /// exchanged messages with still exist (see the crate docs: UCX does
    /// not report their death on shared memory). Bounds how long a dead
    /// same-host peer goes unnoticed. Default 1 s.
    pub liveness_interval: Duration,
    /// Use UCX's peer error handling (`UCP_ERR_HANDLING_MODE_PEER`) also
    /// for endpoints to processes on this host. UCX 1.13 then cannot use
    /// its zero-copy shared-memory transport (CMA) and moves large messages
    /// through bounce buffers, several times slower; same-host peers are
    /// watched by the liveness check instead. Endpoints to other hosts
    /// always use peer error handling. Default false.
    pub same_host_error_handling: bool,
    /// Create the worker with `UCP_FEATURE_WAKEUP` (needed for sleeping in
    /// [`UcxLayer::progress_wait`] and for [`UcxLayer::set_wakeup`]; without
    /// it they poll). Default true.
    pub wakeup: bool,
    /// How long dropping the layer waits for its last sends to complete. The sends UCX has not
    /// completed then (eager ones, or large ones whose data the receiver never fetched) are given
    /// up on and named in one line on stderr (`charmrs-ucx: process R: N messages sent before
    /// the layer was dropped are not known delivered: ...`, with the peer processes and why: the
    /// linger ran out, the peer left or was lost during the shutdown); nothing is printed when
    /// every send completed, or when the only ones given up on went to peers whose loss was
    /// reported already. Default 1 s.
    pub linger: Duration,
    /// Bytes of idle receive buffers the layer keeps for reuse (see
    /// [`RecvPool`](charmrs_transport::RecvPool)): rendezvous messages, and
    /// eager ones from 4 KiB that UCX does not let it keep in place.
    /// Default 64 MiB.
    pub pool_bytes: usize,
    /// The largest message the layer accepts from a peer (what a rendezvous announces, or a
    /// remote read asks for, is checked before any buffer is allocated for it): a larger one is
    /// a [`TransportError::TooLarge`] naming the peer. Default 1 GiB, as the other layers'.
    pub max_message: usize,
    /// UCX workers in this process: 1 (default), shared by all its threads and polled by one,
    /// or one per PE ([`MachineLayer::lanes`]): the `n` PEs of process `r` are PEs `r·n …
    /// r·n+n-1` of the job, each PE's thread sends from its own worker
    /// ([`MachineLayer::bind_lane`]) to the worker of the message's destination PE
    /// ([`Header::dst_pe`]; a PE number outside that process goes to its first worker), and
    /// polls its own. Every process of the job must have as many. Order is kept per pair of
    /// workers, i.e. per pair of PEs, no longer per pair of processes.
    pub workers: usize,
}

impl Default for UcxConfig {
    fn default() -> UcxConfig {
        UcxConfig {
            rndv_threshold: None,
            wait_spin: Duration::from_micros(50),
            arm_after: Duration::from_millis(1),
            liveness_interval: Duration::from_secs(1),
            same_host_error_handling: false,
            wakeup: true,
            linger: Duration::from_secs(1),
            pool_bytes: 64 << 20,
            max_message: 1 << 30,
            workers: 1,
        }
    }
}

/// An operation another thread asked for, executed by whichever thread
/// holds the worker next (in queue order).
enum Op {
    Send(ProcessId, Message),
    Get {
        src: ProcessId,
        key: RemoteKey,
        header: Header,
    },
}

/// The worker plus the progress-side bookkeeping, behind one mutex.
struct Locked {
    worker: Worker,
    /// Since when `progress` has found nothing (for arming with a hook).
    idle_since: Option<Instant>,
    /// Consecutive idle `progress` calls.
    idle_calls: u32,
    /// `progress` calls since the clock was last read for the liveness check.
    unchecked_calls: u32,
    /// `progress` calls (published to the watcher).
    calls: u64,
    /// Same-host peers whose process can be checked (index = rank).
    identities: Vec<Option<Identity>>,
    /// When the peers' processes were last checked.
    last_check: Instant,
}

/// A UCX memory handle, movable to the thread that drops a region.
struct MemHandle(charmrs_ucx_sys::ucp_mem_h);

// SAFETY: a ucp_mem_h is an opaque handle, used only under the worker lock.
unsafe impl Send for MemHandle {}

/// One worker of the layer ("lane") with its queues and wake-up state. Its peers are the
/// workers of the job, numbered `process · lanes + lane` ("worker ids"; with one worker per
/// process, process ranks).
struct Shared {
    /// First field: dropped (thread stopped) before the worker whose event
    /// fd it polls.
    watcher: OnceLock<Watcher>,
    /// Workers per process.
    lanes: u32,
    /// This worker's id (`rank · lanes + lane`).
    me: u32,
    /// Workers in the job (`processes · lanes`).
    ids: u32,
    cfg: UcxConfig,
    locked: SpinMutex<Locked>,
    /// Operations queued by threads that found the worker busy.
    queue: SegQueue<Op>,
    /// Messages that arrive without UCX, with the worker id they come from: messages to this
    /// process itself, and the completions of reads of nothing (a key of length 0).
    loopback: SegQueue<(u32, Message)>,
    /// Peer workers reported lost (sends to them fail at once).
    lost: Vec<AtomicBool>,
    /// One thread delivers at a time (per-sender order).
    delivering: AtomicBool,
    /// A thread sleeps in `progress_wait` (poke `wake` to interrupt it).
    sleeping: AtomicBool,
    wake: EventFd,
    efd: Option<i32>,
    /// The largest AM header the worker's UCX carries (0 when unknown): bounds a message's
    /// segment count (see `worker::layout`).
    max_am_header: usize,
}

/// Process-to-process transport over UCX's ucp API.
///
/// # Behaviour
///
/// * **Set-up** ([`UcxLayer::new`]): one `ucp_context` (features AM, RMA
///   and WAKEUP) and [`UcxConfig::workers`] workers (one per process, or one
///   per PE); their addresses are published under [`ADDR_KEY`] through the
///   bootstrap, which is fenced, and every peer's addresses are read.
/// * **Workers per PE** ([`MachineLayer::lanes`]): a thread bound to a lane
///   ([`MachineLayer::bind_lane`]) sends from that worker, to the worker of
///   the destination PE, and its `progress` polls it; wake-up hooks are per
///   lane ([`UcxLayer::set_lane_wakeup`]). Order holds per pair of workers.
/// * **Endpoints** are created on the first send (or read) to a peer; with
///   UCX's peer error handling for peers on other hosts (and on this host
///   if [`UcxConfig::same_host_error_handling`]).
/// * **Send** ([`send`](MachineLayer::send), any thread): one active
///   message per [`Message`]: the AM header carries the 32-byte header, a
///   sequence number and the segment lengths; the data part is the
///   segments themselves as a UCX iov (no copy into one buffer), or, for
///   a large message whose segments but the last are small, those inside
///   the AM header and the last as one contiguous buffer (see
///   [`wire`](crate::wire)). The
///   segments' `Bytes` are kept until UCX's completion callback. Large
///   messages use UCX's rendezvous: the receiver takes the message's
///   buffer from a pool of reusable buffers when the announcement arrives
///   and UCX moves the bytes straight into it (`ucp_am_recv_data_nbx`), so
///   the segment the runtime receives is where the data landed. Sends
///   never block: a thread that finds the worker busy queues the message
///   (lock-free), retries once, and otherwise leaves it to the progressing
///   thread, which runs the queue at the start of every `progress` (and is
///   woken for it if it sleeps or is parked).
/// * **Threads**: the worker runs in `UCS_THREAD_MODE_SERIALIZED` behind
///   a mutex; any thread may send (taking the mutex if it is free, which
///   measured faster than always handing sends to the progressing thread:
///   no queue round trip on the latency path);
///   [`progress`](MachineLayer::progress) is meant to be called from one
///   thread (a concurrent second caller returns at once with nothing).
///   Delivery to the sink happens with the worker unlocked, so the sink may
///   send.
/// * **Order**: per-sender sequence numbers restore send order whatever
///   order eager and rendezvous messages complete in; each message is
///   delivered exactly once.
/// * **Waiting**: [`UcxLayer::progress_wait`] polls briefly, then arms the
///   worker (`ucp_worker_arm`) and sleeps on its event fd;
///   [`set_wakeup`](MachineLayer::set_wakeup) is supported with a watcher
///   thread on that fd, armed by [`before_park`](MachineLayer::before_park)
///   (or, as fallbacks, by `progress` after [`UcxConfig::arm_after`] without
///   arrivals, or by the watcher when `progress` stops being called).
/// * **Failures**: a peer whose endpoint fails (the TCP transport sees
///   the connection reset) or, on this host, whose process no longer
///   exists (checked every [`UcxConfig::liveness_interval`] among the
///   peers this process exchanged messages with) is reported once by
///   `progress` as [`TransportError::PeerLost`]; later sends to it (from
///   the worker that saw it) fail with the same error. A peer that dropped its layer cleanly said
///   goodbye first and is not reported.
/// * **Remote reads**: [`register`](MachineLayer::register) maps the
///   buffer with `ucp_mem_map` and packs its rkey into the [`RemoteKey`];
///   [`get`](MachineLayer::get) unpacks it on the endpoint and issues
///   `ucp_get_nbx` into a fresh buffer, which arrives through `progress`
///   as the completion message.
pub struct UcxLayer {
    /// The workers; [`UcxConfig::workers`] of them, all on one context.
    lanes: Box<[Arc<Shared>]>,
    rank: ProcessId,
    size: u32,
    bootstrap: Arc<dyn Bootstrap>,
    /// Set by [`MachineLayer::exit_follows`]: the workers are left for the process's exit.
    exit_follows: AtomicBool,
    /// Set by [`MachineLayer::stopping`]: the runtime ended or aborted the job, so sends given up
    /// on at the drop are expected (what `exit` leaves in flight is discarded, as in Charm++;
    /// an abort is its own report) and not reported.
    job_ending: AtomicBool,
}

impl UcxLayer {
    /// A layer with the default [`UcxConfig`]. Collective: every process of
    /// the job calls it (it fences the bootstrap).
    ///
    /// # Errors
    ///
    /// [`TransportError::Io`] naming the UCX call and status if UCX cannot
    /// be set up; [`TransportError::Bootstrap`] if the address exchange
    /// fails.
    pub fn new(bootstrap: Arc<dyn Bootstrap>) -> Result<UcxLayer, TransportError> {
        UcxLayer::with_config(bootstrap, UcxConfig::default())
    }

    /// The layer of a process started by `charmrun` (a
    /// [`KvBootstrap::from_env`] bootstrap) with the default configuration;
    /// `Ok(None)` when the process was not started by charmrun.
    ///
    /// # Errors
    ///
    /// As [`KvBootstrap::from_env`] and [`UcxLayer::new`].
    pub fn from_env() -> Result<Option<UcxLayer>, TransportError> {
        UcxLayer::from_env_with_config(UcxConfig::default())
    }

    /// [`UcxLayer::from_env`] with explicit tunables.
    ///
    /// # Errors
    ///
    /// As [`UcxLayer::from_env`].
    pub fn from_env_with_config(cfg: UcxConfig) -> Result<Option<UcxLayer>, TransportError> {
        let Some(b) = KvBootstrap::from_env()? else {
            return Ok(None);
        };
        UcxLayer::with_config(Arc::new(b), cfg).map(Some)
    }

    /// A layer with explicit tunables; see [`UcxLayer::new`].
    ///
    /// # Errors
    ///
    /// As [`UcxLayer::new`].
    pub fn with_config(
        bootstrap: Arc<dyn Bootstrap>,
        cfg: UcxConfig,
    ) -> Result<UcxLayer, TransportError> {
        let rank = bootstrap.rank();
        let size = bootstrap.size();
        let lanes = cfg.workers.max(1);
        let lanes32 = u32::try_from(lanes)
            .ok()
            .filter(|l| l.checked_mul(size).is_some())
            .ok_or_else(|| {
                TransportError::Bootstrap(format!("{lanes} UCX workers per process is too many"))
            })?;
        let ids = size * lanes32;
        let wcfg = WorkerConfig {
            rndv_threshold: cfg.rndv_threshold,
            wakeup: cfg.wakeup,
            same_host_error_handling: cfg.same_host_error_handling,
            pool_bytes: cfg.pool_bytes,
            max_message: cfg.max_message,
            lanes: lanes32,
        };
        let context = Arc::new(Context::new(rank, ids as usize, lanes, &wcfg)?);
        if lanes > 1 && !context.shared_by_threads() {
            // Checked before anything is published: every process of the job sees the same
            // UCX build, so all of them fall back alike.
            eprintln!(
                "charmrs-ucx: process {rank}: this UCX was built without multi-thread support; \
                 one worker per process instead of {lanes}"
            );
            drop(context);
            return UcxLayer::with_config(bootstrap, UcxConfig { workers: 1, ..cfg });
        }
        let mut workers = Vec::with_capacity(lanes);
        let mut own = Vec::with_capacity(lanes);
        for lane in 0..lanes32 {
            let (w, address) = Worker::new(context.clone(), rank * lanes32 + lane, ids, &wcfg)?;
            workers.push(w);
            own.push(address);
        }
        let me = Identity::current();
        bootstrap.put(ADDR_KEY, &encode_address_list(&own))?;
        bootstrap.put(IDENTITY_KEY, &me.encode())?;
        bootstrap.fence()?;
        let mut identities = Vec::with_capacity(ids as usize);
        let mut addresses = Vec::with_capacity(ids as usize);
        for r in 0..size {
            let published = if r == rank {
                own.clone()
            } else {
                decode_address_list(&bootstrap.get(r, ADDR_KEY)?).ok_or_else(|| {
                    TransportError::Bootstrap(format!(
                        "process {r} published a malformed list of UCX worker addresses"
                    ))
                })?
            };
            if published.len() != lanes {
                return Err(TransportError::Bootstrap(format!(
                    "process {r} has {} UCX workers, process {rank} {lanes}: per-PE workers \
                     need as many PEs in every process",
                    published.len()
                )));
            }
            let identity = if r == rank {
                None
            } else {
                bootstrap
                    .get(r, IDENTITY_KEY)
                    .ok()
                    .and_then(|b| Identity::decode(&b))
                    .filter(|i| me.comparable(i))
            };
            for a in published {
                if a.is_empty() {
                    return Err(TransportError::Bootstrap(format!(
                        "process {r} published an empty UCX worker address"
                    )));
                }
                addresses.push(a);
                identities.push(identity.clone());
            }
        }
        let ours = |id: usize| process_of(id as u32, lanes32) == rank;
        let peer_mode: Vec<bool> = identities
            .iter()
            .enumerate()
            .map(|(id, i)| !ours(id) && (i.is_none() || cfg.same_host_error_handling))
            .collect();
        let same_host: Vec<bool> = identities
            .iter()
            .enumerate()
            .map(|(id, i)| i.is_some() || ours(id))
            .collect();
        let mut made = Vec::with_capacity(lanes);
        for (lane, mut worker) in (0..lanes32).zip(workers) {
            worker.set_addresses(addresses.clone(), peer_mode.clone(), &same_host);
            let efd = worker.efd();
            let max_am_header = worker.max_am_header();
            made.push(Arc::new(Shared {
                watcher: OnceLock::new(),
                lanes: lanes32,
                me: rank * lanes32 + lane,
                ids,
                cfg: cfg.clone(),
                locked: SpinMutex::new(Locked {
                    worker,
                    idle_since: None,
                    idle_calls: 0,
                    unchecked_calls: 0,
                    calls: 0,
                    identities: identities.clone(),
                    last_check: Instant::now(),
                }),
                queue: SegQueue::new(),
                loopback: SegQueue::new(),
                lost: (0..ids).map(|_| AtomicBool::new(false)).collect(),
                delivering: AtomicBool::new(false),
                sleeping: AtomicBool::new(false),
                wake: EventFd::new()?,
                efd,
                max_am_header,
            }));
        }
        Ok(UcxLayer {
            lanes: made.into_boxed_slice(),
            rank,
            size,
            bootstrap,
            exit_follows: AtomicBool::new(false),
            job_ending: AtomicBool::new(false),
        })
    }

    /// The tunables in force.
    pub fn config(&self) -> &UcxConfig {
        &self.lanes[0].cfg
    }

    /// The worker the calling thread drives ([`MachineLayer::bind_lane`]; lane 0 if none).
    #[inline]
    fn lane(&self) -> &Arc<Shared> {
        if self.lanes.len() == 1 {
            &self.lanes[0]
        } else {
            &self.lanes[LANE.with(std::cell::Cell::get).min(self.lanes.len() - 1)]
        }
    }

    /// The worker id of the worker of process `dst` that takes a message for PE `dst_pe`.
    #[inline]
    fn worker_for(&self, dst: ProcessId, dst_pe: u32) -> u32 {
        endpoint_for(dst, dst_pe, self.lanes.len() as u32)
    }

    /// Installs `hook`, called from a watcher thread whenever the armed
    /// worker's event fd fires (something arrived or completed), and from
    /// `send` for a message to oneself. A poller arms the worker with
    /// [`before_park`](MachineLayer::before_park) before it sleeps; as
    /// fallbacks `progress` arms it after [`UcxConfig::arm_after`] without
    /// arrivals, and the watcher when `progress` stops being called. Can be
    /// set once.
    ///
    /// # Errors
    ///
    /// [`TransportError::Unsupported`] if the worker has no event fd
    /// ([`UcxConfig::wakeup`] off) or a hook is already installed;
    /// [`TransportError::Io`] if the thread cannot start.
    pub fn set_wakeup(
        &self,
        hook: impl Fn() + Send + Sync + 'static,
    ) -> Result<(), TransportError> {
        self.set_lane_wakeup(0, hook)
    }

    /// [`UcxLayer::set_wakeup`] for worker `lane` (see [`UcxConfig::workers`]).
    ///
    /// # Errors
    ///
    /// As [`UcxLayer::set_wakeup`]; [`TransportError::Unsupported`] for a lane this layer does
    /// not have.
    pub fn set_lane_wakeup(
        &self,
        lane: usize,
        hook: impl Fn() + Send + Sync + 'static,
    ) -> Result<(), TransportError> {
        let Some(shared) = self.lanes.get(lane) else {
            return Err(TransportError::Unsupported(
                "a wake-up hook for a worker it does not have",
            ));
        };
        let Some(efd) = shared.efd else {
            return Err(TransportError::Unsupported(
                "a wake-up hook without UCX wake-up support",
            ));
        };
        if shared.watcher.get().is_some() {
            return Err(TransportError::Unsupported("a second wake-up hook"));
        }
        let weak = Arc::downgrade(shared);
        let arm = Box::new(move || match weak.upgrade() {
            Some(s) => s.arm_for_watcher(),
            None => Armed::Busy,
        });
        let w = Watcher::start(efd, Box::new(hook), arm, shared.me)?;
        shared
            .watcher
            .set(w)
            .map_err(|_| TransportError::Unsupported("a second wake-up hook"))
    }

    /// Like [`progress`](MachineLayer::progress), but when nothing has
    /// arrived polls for [`UcxConfig::wait_spin`], then arms the worker and
    /// sleeps on its event fd (and this layer's own, poked by sends from
    /// other threads) until something happens or `timeout` passes.
    ///
    /// # Errors
    ///
    /// As [`progress`](MachineLayer::progress).
    pub fn progress_wait(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        let shared = self.lane();
        let start = Instant::now();
        let deadline = start + timeout;
        let spin_until = start + shared.cfg.wait_spin.min(timeout);
        let mut round = 0u32;
        loop {
            let n = self.progress(sink)?;
            let now = Instant::now();
            if n > 0 || now >= deadline {
                return Ok(n);
            }
            if now < spin_until || shared.efd.is_none() {
                round += 1;
                if round < 16 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            // Arm, then sleep unless something slipped in.
            {
                let mut l = shared.locked.lock();
                if l.worker.inbox.needs_poller() {
                    // UCX holds operations of ours (a send into a full shared-memory FIFO, a
                    // rendezvous): only our own progress moves them, and arming does not watch
                    // them; sleeping could leave a message unsent while its receiver sleeps too.
                    // Or a sending thread's progress left arrivals: deliver them first.
                    drop(l);
                    std::thread::yield_now();
                    continue;
                }
                if !l.worker.arm()? {
                    continue;
                }
                shared.sleeping.store(true, Ordering::SeqCst);
            }
            fence(Ordering::SeqCst);
            if shared.queue.is_empty() && shared.loopback.is_empty() {
                let efd = shared.efd.unwrap_or(-1);
                wait_readable(
                    [efd, shared.wake.fd()],
                    Some(deadline.saturating_duration_since(Instant::now())),
                );
            }
            shared.sleeping.store(false, Ordering::SeqCst);
            shared.wake.clear();
        }
    }

    /// Progresses (without delivering: arrivals stay queued for the next
    /// `progress`) until every queued and in-flight operation of this
    /// process completed, or `timeout` passes. Returns whether everything
    /// completed.
    ///
    /// # Errors
    ///
    /// None today; reserved for failures of the worker.
    pub fn flush(&self, timeout: Duration) -> Result<bool, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut done = true;
            for s in self.lanes.iter() {
                done &= s.progress_for_poller(s.locked.lock());
            }
            if done {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::yield_now();
        }
    }

    /// What the calling thread's lane holds that can keep
    /// [`before_park`](MachineLayer::before_park) from letting it park: UCX
    /// operations of ours in flight, announced messages waiting for a fetch,
    /// arrivals, errors and failed endpoints not handled yet, and whether the
    /// worker is armed. For diagnostics (the check binary prints it when a
    /// thread does not park in time).
    #[doc(hidden)]
    pub fn park_blockers(&self) -> String {
        let s = self.lane();
        let l = s.locked.lock();
        let st = l.worker.inbox.state.borrow();
        format!(
            "in flight {} (sends {}), fetches waiting {}, arrivals ready {}, errors {}, \
             failed endpoints {}, queued sends {}, armed {}",
            st.in_flight,
            st.sends_in_flight,
            st.rndv_waiting.len(),
            !st.ready.is_empty(),
            st.errors.len(),
            st.failed_eps.len(),
            !(s.queue.is_empty() && s.loopback.is_empty()),
            s.watcher
                .get()
                .is_some_and(|w| w.state.armed.load(Ordering::SeqCst)),
        )
    }

    /// Number of UCX endpoints this process has open (they are created on
    /// the first operation towards a peer).
    pub fn open_endpoints(&self) -> usize {
        self.lanes
            .iter()
            .map(|s| s.locked.lock().worker.open_endpoints())
            .sum()
    }

    fn check(&self, p: ProcessId) -> Result<(), TransportError> {
        if p < self.size {
            Ok(())
        } else {
            Err(TransportError::UnknownProcess {
                dst: p,
                size: self.size,
            })
        }
    }
}

impl Shared {
    /// The process of worker `id`.
    #[inline]
    fn process_of(&self, id: u32) -> ProcessId {
        process_of(id, self.lanes)
    }

    /// One round for a thread that is not this worker's poller (flush, barrier): runs the
    /// queue, progresses once without delivering, and lets go, waking the poller for what it
    /// took in. Returns whether nothing of ours is left in flight or queued.
    fn progress_for_poller(&self, mut l: SpinGuard<'_, Locked>) -> bool {
        self.run_queue(&mut l);
        l.worker.progress_once();
        let done = !l.worker.inbox.holds_operations() && self.queue.is_empty();
        self.release(l);
        done
    }

    /// `e`, naming processes where the worker named worker ids.
    fn for_caller(&self, e: TransportError) -> TransportError {
        match e {
            TransportError::PeerLost { process, reason } if self.lanes > 1 => {
                TransportError::PeerLost {
                    process: self.process_of(process),
                    reason: format!("{reason} (UCX worker of PE {process})"),
                }
            }
            e => e,
        }
    }

    fn lost_error(&self, p: u32) -> Result<(), TransportError> {
        if self.lost[p as usize].load(Ordering::Acquire) {
            Err(TransportError::PeerLost {
                process: self.process_of(p),
                reason: "reported lost earlier".to_owned(),
            })
        } else {
            Ok(())
        }
    }

    /// Runs `op` now if the worker is free and nothing is queued before it,
    /// else queues it for the progressing thread (which runs the queue at
    /// the start of every `progress`); wakes that thread if it sleeps or is
    /// parked.
    fn submit(&self, op: Op) {
        let s = self;
        if let Some(mut l) = s.locked.try_lock() {
            if s.queue.is_empty() {
                // Nothing queued before it: send directly (per-pair order is
                // the order of taking the worker).
                s.run_op(&mut l, op);
            } else {
                s.queue.push(op);
            }
            s.release(l);
            return;
        }
        s.queue.push(op);
        fence(Ordering::SeqCst);
        // The holder may have let go meanwhile: then run the queue here.
        if let Some(l) = s.locked.try_lock() {
            s.release(l);
        } else {
            // The holder is (or is about to be) the progressing thread, or a
            // sender that will not look at the queue again: make sure the
            // progressing thread comes back if it sleeps or is parked.
            s.poke();
        }
    }

    /// Lets go of the worker after a send: runs what other threads queued meanwhile first, and
    /// makes the progressing thread come back if UCX now holds operations only its progress
    /// finishes, or the send's own progress left it arrivals (`Inbox::needs_poller`).
    fn release(&self, mut l: SpinGuard<'_, Locked>) {
        let pending = self.run_queue(&mut l);
        drop(l);
        if pending {
            self.poke();
        }
    }

    /// Runs every queued operation on the locked worker. Returns whether the
    /// progressing thread must come back (`Inbox::needs_poller`).
    fn run_queue(&self, l: &mut Locked) -> bool {
        // `is_empty` first: popping an empty SegQueue costs a full fence.
        while !self.queue.is_empty() {
            let Some(op) = self.queue.pop() else { break };
            self.run_op(l, op);
        }
        l.worker.inbox.needs_poller()
    }

    /// Runs one operation on the locked worker; failures go to the inbox
    /// (reported by `progress`).
    fn run_op(&self, l: &mut Locked, op: Op) {
        let (peer, res, send) = match op {
            Op::Send(dst, msg) => (dst, l.worker.send(dst, msg), true),
            Op::Get { src, key, header } => {
                (src, self.run_get(&mut l.worker, src, &key, header), false)
            }
        };
        self.record_failure(l, peer, res, send);
    }

    /// Hands the failure of an operation towards `peer`, if it failed, to the inbox (reported by
    /// `progress`); a failed `send` is also counted for the shutdown's report (when no error will
    /// tell of it: `InboxState::send_failed`).
    fn record_failure(
        &self,
        l: &mut Locked,
        peer: ProcessId,
        res: Result<(), TransportError>,
        send: bool,
    ) {
        if let Err(e) = res {
            if send {
                let peer_failure = matches!(e, TransportError::PeerLost { .. });
                l.worker
                    .inbox
                    .state
                    .borrow_mut()
                    .send_failed(peer, peer_failure);
            }
            match e {
                TransportError::PeerLost { process, reason } => {
                    l.worker.inbox.peer_failed(process, reason);
                }
                other => {
                    let peer = l.worker.inbox.peer(peer);
                    l.worker
                        .inbox
                        .error(TransportError::Io(std::io::Error::other(format!(
                            "operation towards {peer}: {other}"
                        ))))
                }
            }
        }
    }

    fn run_get(
        &self,
        w: &mut Worker,
        src: ProcessId,
        key: &RemoteKey,
        header: Header,
    ) -> Result<(), TransportError> {
        let bad = || TransportError::Malformed("remote key was not made by a ucx layer".to_owned());
        let r = &key.rkey;
        if r.len() < 8 || &r[..4] != RKEY_MAGIC {
            return Err(bad());
        }
        let n = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as usize;
        if r.len() != 8 + n || n == 0 {
            return Err(bad());
        }
        let len = usize::try_from(key.len).map_err(|_| bad())?;
        w.get(src, key.addr, len, &r[8..], header)
    }

    /// The part of `progress` done holding the worker: run queued
    /// operations, progress UCX, collect what is ready into `batch`,
    /// close failed endpoints, check peers, and arm the worker for the
    /// wake-up hook when idle. Returns the first failure to report.
    fn progress_locked(
        &self,
        l: &mut Locked,
        batch: &mut ArrivalBatch,
        call_hook: &mut bool,
    ) -> Option<TransportError> {
        if !self.queue.is_empty() {
            self.run_queue(l);
        }
        {
            let mut rounds = 0;
            let mut busy = l.worker.progress_once();
            // Deliver as soon as something is ready (latency); otherwise
            // keep going while UCX reports progress, a bounded number of
            // rounds.
            while busy && rounds < 8 && l.worker.inbox.state.borrow().ready.is_empty() {
                busy = l.worker.progress_once();
                rounds += 1;
            }
        }
        // The liveness check, every `liveness_interval` whether or not anything arrives: a
        // stream from one peer must not hide another's death. Before the failures are
        // collected, so that a peer found dead is closed and reported by this call.
        l.unchecked_calls += 1;
        if l.unchecked_calls >= CLOCK_EVERY {
            l.unchecked_calls = 0;
            if l.last_check.elapsed() >= self.cfg.liveness_interval {
                self.check_peers(l);
            }
        }
        let (mut error, failures) = {
            let mut st = l.worker.inbox.state.borrow_mut();
            // Usually the batch is empty: the two swap their buffers.
            batch.append(&mut st.ready);
            (st.errors.pop_front(), !st.failed_eps.is_empty())
        };
        if failures {
            l.worker.close_failed();
            for p in 0..self.ids {
                if l.worker.is_lost(p) {
                    self.lost[p as usize].store(true, Ordering::Release);
                }
            }
        }
        // Idle for arming = nothing for the caller (UCX may report internal
        // progress, e.g. an outstanding rendezvous, for a long time: if it
        // has events, arming says so and the hook brings the caller back).
        let idle = batch.is_empty() && error.is_none() && self.loopback.is_empty();
        let watcher = self.watcher.get();
        if let Some(w) = watcher {
            l.calls = l.calls.wrapping_add(1);
            w.state.progress_calls.store(l.calls, Ordering::Relaxed);
        }
        if !idle {
            l.idle_calls = 0;
            l.idle_since = None;
            return error;
        }
        // Idle. The clock is read only every CLOCK_EVERY calls (reading
        // it costs as much as an idle progress, and every cycle of the idle
        // loop is latency added to the next arrival): arming here is a
        // fallback for pollers that park without `before_park`.
        l.idle_calls = l.idle_calls.wrapping_add(1);
        if !l.idle_calls.is_multiple_of(CLOCK_EVERY) {
            return error;
        }
        let now = Instant::now();
        // Not while UCX holds operations of ours (a stream of sends, a
        // rendezvous being fetched): only our own progress completes them,
        // so the caller must keep polling (`before_park` refuses to park),
        // and an armed worker would cost a wake-up of the watcher thread —
        // on a busy core — and a signal from the peer per message.
        let holding = l.worker.inbox.holds_operations();
        if let Some(w) = watcher.filter(|_| !holding) {
            let since = *l.idle_since.get_or_insert(now);
            if now - since >= self.cfg.arm_after && !w.state.armed.load(Ordering::SeqCst) {
                match self.arm_for_hook(l) {
                    Ok((armed, call)) => {
                        *call_hook |= call;
                        if matches!(armed, Armed::Pending) {
                            l.idle_since = None;
                        }
                    }
                    Err(e) => error = Some(e),
                }
            }
        }
        error
    }

    /// Arms the worker for the wake-up hook (with the worker held). On
    /// success the watcher is told. Also says whether the hook must be
    /// called — events are pending, or an operation was queued meanwhile, so
    /// the progressing thread must come back instead of parking — which the
    /// caller does once it has let go of the worker: the hook is the
    /// runtime's code, and may end up dropping this layer, which takes the
    /// worker lock.
    fn arm_for_hook(&self, l: &mut Locked) -> Result<(Armed, bool), TransportError> {
        let Some(w) = self.watcher.get() else {
            return Ok((Armed::Busy, false));
        };
        if l.worker.arm()? {
            w.state.armed.store(true, Ordering::SeqCst);
            w.state.armed_fd.signal();
            // An operation queued by a thread that saw the worker busy and
            // the flag still clear would wait for the next event.
            fence(Ordering::SeqCst);
            let queued = !self.queue.is_empty() || !self.loopback.is_empty();
            Ok((Armed::Yes, queued))
        } else {
            Ok((Armed::Pending, true))
        }
    }

    /// The watcher's fallback arming, for a progressing thread that stopped calling `progress`
    /// without arming (see `wake`): arms the worker for the hook, unless the thread must come
    /// back rather than sleep ([`Inbox::needs_poller`](crate::inbox::Inbox::needs_poller): UCX
    /// holds operations of ours, which only its progress moves, or arrivals or failures wait
    /// for it, whose events are used up), as every other arming path checks first. Then, as
    /// when events are pending or the arming fails (reported by the next `progress`),
    /// [`Armed::Pending`]: the watcher calls the hook. [`Armed::Busy`] if the worker is taken.
    fn arm_for_watcher(&self) -> Armed {
        let Some(mut l) = self.locked.try_lock() else {
            return Armed::Busy;
        };
        if l.worker.inbox.needs_poller() {
            return Armed::Pending;
        }
        let armed = match self.arm_for_hook(&mut l) {
            Ok(armed) => armed,
            Err(e) => {
                l.worker.inbox.error(e);
                (Armed::Pending, false)
            }
        };
        drop(l);
        if armed.1 {
            self.call_hook();
        }
        armed.0
    }

    /// Calls the wake-up hook, if one is installed (never with the worker held).
    fn call_hook(&self) {
        if let Some(w) = self.watcher.get() {
            (w.state.hook)();
        }
    }

    /// Reports the same-host peers this process talked with whose process
    /// is gone (see [`crate::liveness`]).
    fn check_peers(&self, l: &mut Locked) {
        l.last_check = Instant::now();
        for p in 0..self.ids {
            let Some(id) = &l.identities[p as usize] else {
                continue;
            };
            if l.worker.talked_with(p) && !l.worker.is_lost(p) && !id.alive() {
                l.worker.inbox.peer_failed(
                    p,
                    format!("its process (pid {}) no longer exists", id.pid()),
                );
                l.identities[p as usize] = None;
            }
        }
    }

    /// Something is ready for `progress` without UCX (loopback): interrupt
    /// a sleeper and call the hook.
    fn announce(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake.signal();
        }
        if let Some(w) = self.watcher.get() {
            (w.state.hook)();
        }
    }

    fn poke(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake.signal();
        }
        if let Some(w) = self.watcher.get() {
            // Not armed: the progressing thread is polling, no need.
            if w.state.armed.load(Ordering::SeqCst) {
                (w.state.hook)();
            }
        }
    }
}

impl MachineLayer for UcxLayer {
    fn rank(&self) -> ProcessId {
        self.rank
    }

    fn size(&self) -> u32 {
        self.size
    }

    fn lanes(&self) -> usize {
        self.lanes.len()
    }

    fn bind_lane(&self, lane: usize) {
        LANE.with(|l| l.set(lane));
    }

    /// Never blocks: sends at once from the calling thread's worker if it is free, else queues
    /// for the thread holding it, to the worker of `dst` that takes PE `msg.header().dst_pe`.
    /// A message to oneself loops back through that worker's `progress`.
    ///
    /// # Errors
    ///
    /// [`TransportError::UnknownProcess`]; [`TransportError::PeerLost`] if
    /// `dst` was reported lost (failures found while sending are reported
    /// by `progress`); [`TransportError::TooLarge`] (the length of the UCX active-message
    /// header the message needs, the most UCX carries) for a message of more segments than
    /// that header can list: 8 bytes a segment, against UCX's smallest transport segment
    /// (8 KiB by default, enough for [`MAX_SEGMENTS`](charmrs_transport::MAX_SEGMENTS); smaller
    /// with small `UCX_*_SEG_SIZE` settings or small-MTU networks).
    fn send(&self, dst: ProcessId, msg: Message) -> Result<(), TransportError> {
        self.check(dst)?;
        let to = self.worker_for(dst, msg.header().dst_pe);
        if dst == self.rank {
            let s = &self.lanes[(to - dst * self.lanes.len() as u32) as usize];
            s.loopback.push((s.me, msg));
            s.announce();
            return Ok(());
        }
        let s = self.lane();
        s.lost_error(to)?;
        crate::worker::check_header(msg.segments().len(), s.max_am_header)?;
        s.submit(Op::Send(to, msg));
        Ok(())
    }

    /// Sends at once, without an allocation (straight from `data` by UCX's short protocol, or
    /// copied into a send descriptor's kept buffer), when the message is small (1 KiB at most),
    /// the worker free and nothing queued before it; otherwise as [`send`](Self::send).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    fn send_copy(&self, dst: ProcessId, header: Header, data: &[u8]) -> Result<(), TransportError> {
        if data.len() <= crate::worker::SEND_COPY_MAX && dst != self.rank {
            self.check(dst)?;
            let to = self.worker_for(dst, header.dst_pe);
            let s = self.lane();
            s.lost_error(to)?;
            if let Some(mut l) = s.locked.try_lock() {
                if s.queue.is_empty() {
                    let res = l.worker.send_copy(to, &header, data);
                    s.record_failure(&mut l, to, res, true);
                    s.release(l);
                    return Ok(());
                }
            }
        }
        // Looping back, large, or behind queued operations: a message the queue can own.
        self.send(dst, Message::with_copied_segment(header, data))
    }

    /// Runs queued sends, progresses the calling thread's worker, and hands every message
    /// that is ready (in per-sender order) to `sink`, with the worker
    /// unlocked. Reports each failure once, after the messages that arrived
    /// before it were delivered.
    fn progress(&self, sink: &mut dyn FnMut(ProcessId, Message)) -> Result<usize, TransportError> {
        self.progress_arrivals(false, &mut |src, a| sink(src, a.into_message()))
    }

    /// As [`progress`](Self::progress); small messages of one segment that UCX delivered
    /// eagerly are lent ([`Arrival::Borrowed`], out of the batch's buffer of small messages),
    /// the rest handed over owned. `idle` makes no difference.
    fn progress_arrivals(
        &self,
        _idle: bool,
        sink: &mut dyn FnMut(ProcessId, Arrival<'_>),
    ) -> Result<usize, TransportError> {
        let s = self.lane();
        if s.delivering.swap(true, Ordering::Acquire) {
            return Ok(0); // another thread (or the sink) is delivering
        }
        let _delivering = ClearOnDrop(&s.delivering);
        // Out of the thread's slot (see `SCRATCH`): the sink may progress another layer here.
        let mut batch = SCRATCH.with(std::cell::Cell::take);
        let mut call_hook = false;
        let error = {
            let mut l = s.locked.lock();
            s.progress_locked(&mut l, &mut batch, &mut call_hook)
        };
        if call_hook {
            s.call_hook();
        }
        if !s.loopback.is_empty() {
            for _ in 0..s.loopback.len() {
                match s.loopback.pop() {
                    Some((from, m)) => batch.push(from, m),
                    None => break,
                }
            }
        }
        let n = if s.lanes == 1 {
            batch.deliver(sink)
        } else {
            batch.deliver(&mut |id, a| sink(s.process_of(id), a))
        };
        // Emptied by the delivery: back into the slot with its capacity (a nested progress's
        // batch, put there meanwhile, is dropped).
        SCRATCH.with(|scratch| scratch.set(batch));
        match error {
            Some(e) => Err(s.for_caller(e)),
            None => Ok(n),
        }
    }

    fn set_wakeup(&self, hook: Box<dyn Fn() + Send + Sync>) -> bool {
        UcxLayer::set_wakeup(self, hook).is_ok()
    }

    fn set_lane_wakeup(&self, lane: usize, hook: Box<dyn Fn() + Send + Sync>) -> bool {
        UcxLayer::set_lane_wakeup(self, lane, hook).is_ok()
    }

    /// Arms the calling thread's worker now (`ucp_worker_arm`) for its wake-up hook, instead
    /// of [`UcxConfig::arm_after`] into idleness.
    fn before_park(&self) -> bool {
        let s = self.lane();
        let Some(w) = s.watcher.get() else {
            return true;
        };
        let nothing_queued = || s.queue.is_empty() && s.loopback.is_empty();
        let mut l = s.locked.lock();
        if l.worker.inbox.needs_poller() {
            // UCX still holds operations of ours (a send that did not go out
            // at once, e.g. into a full shared-memory FIFO; a rendezvous).
            // Only our own progress moves them, and arming does not watch
            // them: sleeping now could leave a message unsent while its
            // receiver sleeps too. Or a sending thread's progress left
            // arrivals, whose events it used up. Keep polling.
            return false;
        }
        if w.state.armed.load(Ordering::SeqCst) {
            return nothing_queued();
        }
        let (park, call) = match s.arm_for_hook(&mut l) {
            Ok((Armed::Yes, call)) => (
                nothing_queued() && l.worker.inbox.state.borrow().ready.is_empty(),
                call,
            ),
            Ok((_, call)) => (false, call),
            Err(e) => {
                // Reported by the next progress, which the caller runs now.
                l.worker.inbox.error(e);
                (false, false)
            }
        };
        drop(l);
        if call {
            s.call_hook();
        }
        park
    }

    fn progress_wait(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        UcxLayer::progress_wait(self, sink, timeout)
    }

    /// Maps the buffer with `ucp_mem_map` (read access) on the context, which every worker
    /// shares, and ships its packed rkey in the key; unmapped when the region is dropped.
    fn register(&self, buf: Bytes) -> Result<MemRegion, TransportError> {
        if buf.is_empty() {
            let key = RemoteKey {
                addr: 0,
                len: 0,
                rkey: Vec::new(),
            };
            return Ok(MemRegion::new(buf, key));
        }
        // Mapped on the context, shared by all workers: through the calling thread's worker.
        let shared = self.lane();
        let (memh, packed) = shared
            .locked
            .lock()
            .worker
            .mem_map(buf.as_ptr(), buf.len())?;
        let mut rkey = Vec::with_capacity(8 + packed.len());
        rkey.extend_from_slice(RKEY_MAGIC);
        rkey.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        rkey.extend_from_slice(&packed);
        let key = RemoteKey {
            addr: buf.as_ptr() as u64,
            len: buf.len() as u64,
            rkey,
        };
        let shared = Arc::downgrade(shared);
        let memh = MemHandle(memh);
        Ok(MemRegion::with_release(buf, key, move || {
            let memh = memh;
            if let Some(s) = shared.upgrade() {
                s.locked.lock().worker.mem_unmap(memh.0);
            }
        }))
    }

    /// `ucp_get_nbx` through the key's rkey into a pooled buffer, from the worker of `src` in
    /// the calling thread's lane (the region is mapped on `src`'s context, reachable through
    /// all its workers); the completion message arrives through the calling thread's
    /// `progress`, as a message from `src` (at once, without UCX, for a key of length 0, which
    /// reads nothing). A malformed key is refused at once; a failed read arrives as an error from
    /// `progress`. Keys are trusted within the job: UCX checks them against the registration
    /// on RDMA transports, but its shared-memory path (CMA) reads whatever the key's address
    /// and length say in the owner's address space (same user, same job).
    fn get(
        &self,
        src: ProcessId,
        key: &RemoteKey,
        completion_kind: u8,
        completion_tag: u64,
    ) -> Result<(), TransportError> {
        self.check(src)?;
        let s = self.lane();
        let header = Header::new(completion_kind, 0, 0, completion_tag);
        // The region is mapped on `src`'s context: any of its workers serves the read; the one
        // of the same lane spreads the reads of a per-PE layer over them.
        let from = src * s.lanes + (s.me % s.lanes);
        if key.len == 0 {
            // Nothing to read: the completion comes at once, from `src` as a read's would.
            s.loopback
                .push((from, Message::with_segment(header, Bytes::new())));
            s.announce();
            return Ok(());
        }
        let r = &key.rkey;
        if r.len() < 8 || &r[..4] != RKEY_MAGIC {
            return Err(TransportError::Malformed(
                "remote key was not made by a ucx layer".to_owned(),
            ));
        }
        s.lost_error(from)?;
        s.submit(Op::Get {
            src: from,
            key: key.clone(),
            header,
        });
        Ok(())
    }

    /// Completes this process's outstanding sends first (UCX may need this process's progress
    /// for them, e.g. to finish endpoint wire-up), then the bootstrap's fence (all processes),
    /// on a helper thread while this one keeps every worker progressing (without delivering):
    /// a peer's send that is still being wired up (a hello to process 0) may need this
    /// process's replies before the peer can reach the fence.
    fn barrier(&self) -> Result<(), TransportError> {
        self.flush(self.config().linger)?;
        std::thread::scope(|scope| {
            let fence = std::thread::Builder::new()
                .name(format!("charmrs-ucx-fence-{}", self.rank))
                .spawn_scoped(scope, || self.bootstrap.fence())?;
            // Until the fence returns, or its thread panics.
            while !fence.is_finished() {
                for s in self.lanes.iter() {
                    if let Some(l) = s.locked.try_lock() {
                        s.progress_for_poller(l);
                    }
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            fence.join().unwrap_or_else(|_| {
                Err(TransportError::Bootstrap(
                    "the fence thread panicked".to_owned(),
                ))
            })
        })
    }

    /// Tells the launcher through the bootstrap, which brings the job down.
    fn abort(&self, reason: &str) {
        self.bootstrap.abort(reason);
    }

    /// Peers exiting at the end of a job make UCX log connection and flush
    /// errors (on stdout, mixed with the program's output): from here on only
    /// fatal messages are logged, unless the user chose `UCX_LOG_LEVEL`. Sends
    /// given up on when the layer is dropped are not reported either (see
    /// `job_ending`).
    fn stopping(&self) {
        self.job_ending.store(true, Ordering::Relaxed);
        if std::env::var_os("UCX_LOG_LEVEL").is_some() {
            return;
        }
        // SAFETY: both arguments are NUL-terminated static strings; the call
        // only parses them into UCX's global options (log level is read on
        // every log call).
        let _ = unsafe {
            charmrs_ucx_sys::ucs_global_opts_set_value(c"LOG_LEVEL".as_ptr(), c"fatal".as_ptr())
        };
    }

    /// The workers and the context are not destroyed: the process's exit frees them (see
    /// `Worker::drop`).
    fn exit_follows(&self) {
        self.exit_follows.store(true, Ordering::Relaxed);
    }

    fn name(&self) -> &'static str {
        "ucx"
    }
}

impl std::fmt::Debug for UcxLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxLayer")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("workers", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for UcxLayer {
    /// Finishes queued sends, says goodbye to the peers it talked to (so
    /// they do not report it lost), waits up to [`UcxConfig::linger`] for
    /// UCX to finish with every buffer, then closes the endpoints; the
    /// worker and context are destroyed when the last reference goes. The sends UCX did not
    /// complete by then (still held, or cancelled by a forced close) are given up on: one line
    /// on stderr names them (see `charmrs_transport::undelivered`), none when every send
    /// completed or the runtime said the job is ending ([`MachineLayer::stopping`]).
    fn drop(&mut self) {
        let finish = |s: &Shared| {
            let mut l = s.locked.lock();
            let mark = l.worker.shutdown_mark();
            s.run_queue(&mut l);
            l.worker.drain(s.cfg.linger);
            l.worker.say_goodbye();
            l.worker.close_all(s.cfg.linger);
            let mut undelivered = Undelivered::messages_only();
            if !self.job_ending.load(Ordering::Relaxed) {
                l.worker.undelivered(&mark, &l.identities, &mut undelivered);
            }
            if self.exit_follows.load(Ordering::Relaxed) {
                l.worker.leave_to_process_exit();
            }
            undelivered
        };
        let mut undelivered = Undelivered::messages_only();
        if self.lanes.len() == 1 {
            undelivered = finish(&self.lanes[0]);
        } else {
            // Every worker at once (each waits up to `linger` for its peers, which need no
            // progress of this process's other workers meanwhile).
            std::thread::scope(|scope| {
                let mut running = Vec::with_capacity(self.lanes.len());
                for s in self.lanes.iter() {
                    let spawned = std::thread::Builder::new()
                        .name("charmrs-ucx-close".to_owned())
                        .spawn_scoped(scope, || finish(s));
                    match spawned {
                        Ok(handle) => running.push(handle),
                        Err(_) => undelivered.merge(finish(s)),
                    }
                }
                for handle in running {
                    let u = handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    undelivered.merge(u);
                }
            });
        }
        let linger = self.lanes[0].cfg.linger;
        if let Some(line) = undelivered.line("charmrs-ucx", self.rank, linger) {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use charmrs_transport::SingleProcessBootstrap;

    /// A layer of a one-process job (messages to itself loop back through `progress`).
    fn single() -> UcxLayer {
        UcxLayer::new(Arc::new(SingleProcessBootstrap::new())).expect("a one-process UCX layer")
    }

    fn tags(kind: u8, tags: std::ops::Range<u64>) -> Vec<(ProcessId, u8, u64)> {
        tags.map(|t| (0, kind, t)).collect()
    }

    /// Every layer and lane of a thread shares its scratch batch: a sink that progressed
    /// another layer panicked ("already borrowed"), losing the rest of the outer batch.
    #[test]
    fn a_sink_may_progress_another_layer_on_the_same_thread() {
        let (a, b) = (single(), single());
        for k in 0..3 {
            a.send(0, Message::new(Header::new(1, 0, 0, k))).unwrap();
            b.send(0, Message::new(Header::new(2, 0, 0, 10 + k)))
                .unwrap();
        }
        // A small message with bytes too (lent from B's batch while A's is being delivered).
        b.send_copy(0, Header::new(2, 0, 0, 13), b"lent").unwrap();
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        let mut inner = 0;
        let n = a
            .progress(&mut |src, m| {
                got_a.push((src, m.header().kind, m.header().tag));
                inner += b
                    .progress(&mut |src, m| got_b.push((src, m.header().kind, m.header().tag)))
                    .unwrap();
            })
            .unwrap();
        assert_eq!((n, inner), (3, 4));
        assert_eq!(got_a, tags(1, 0..3));
        assert_eq!(got_b, tags(2, 10..14));
        // Both keep working afterwards, each with its own messages.
        a.send(0, Message::new(Header::new(1, 0, 0, 3))).unwrap();
        b.send(0, Message::new(Header::new(2, 0, 0, 14))).unwrap();
        let mut later = Vec::new();
        for layer in [&a, &b] {
            layer
                .progress(&mut |src, m| later.push((src, m.header().kind, m.header().tag)))
                .unwrap();
        }
        assert_eq!(later, [(0, 1, 3), (0, 2, 14)]);
    }

    /// The watcher's fallback arming armed the worker (and reported it armed, so the hook was
    /// not called) while the progressing thread had something waiting for it.
    #[test]
    fn the_watcher_does_not_arm_while_the_poller_is_needed() {
        let layer = single();
        let s = &layer.lanes[0];
        // Something for the poller: a failure to report (or arrivals, or operations UCX holds).
        s.locked
            .lock()
            .worker
            .inbox
            .error(TransportError::Malformed("for the test".into()));
        layer.set_wakeup(|| {}).unwrap();
        let watcher = s.watcher.get().unwrap();
        // Until it is not busy (the watcher thread may be arming at the same time), within 10 s.
        let arm = || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match s.arm_for_watcher() {
                    Armed::Busy if Instant::now() < deadline => std::thread::yield_now(),
                    Armed::Busy => panic!("the worker stayed busy for 10 s"),
                    armed => return armed,
                }
            }
        };
        assert!(matches!(arm(), Armed::Pending), "the hook is to be called");
        assert!(!watcher.state.armed.load(Ordering::SeqCst), "not armed");
        // Once the poller took it, the watcher arms.
        match layer.progress(&mut |_, m| panic!("unexpected {:?}", m.header())) {
            Err(TransportError::Malformed(e)) => assert_eq!(e, "for the test"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(arm(), Armed::Yes));
        assert!(watcher.state.armed.load(Ordering::SeqCst));
    }
}
