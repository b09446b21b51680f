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

use crate::liveness::Identity;
use crate::wake::{wait_readable, Armed, EventFd, Watcher};
use crate::worker::{Worker, WorkerConfig};

/// Bootstrap key under which each process publishes its UCX worker address.
pub const ADDR_KEY: &str = "ucx-worker-address";

/// Bootstrap key under which each process publishes where it runs (for the
/// same-host liveness check).
const IDENTITY_KEY: &str = "ucx-identity";

/// Idle `progress` calls between two readings of the clock (for the
/// liveness check and arming).
const IDLE_CLOCK_EVERY: u32 = 64;

thread_local! {
    /// Per-thread scratch list of the messages one `progress` delivers (moved out of the inbox
    /// under the worker lock, handed to the sink after it is released).
    static SCRATCH: std::cell::RefCell<ArrivalBatch> =
        const { std::cell::RefCell::new(ArrivalBatch::new()) };
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
    /// How long dropping the layer waits for its last sends to complete.
    /// Default 1 s.
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

struct Shared {
    /// First field: dropped (thread stopped) before the worker whose event
    /// fd it polls.
    watcher: OnceLock<Watcher>,
    rank: ProcessId,
    size: u32,
    cfg: UcxConfig,
    locked: SpinMutex<Locked>,
    /// Operations queued by threads that found the worker busy.
    queue: SegQueue<Op>,
    /// Messages to this process itself.
    loopback: SegQueue<Message>,
    /// Peers reported lost (sends to them fail at once).
    lost: Vec<AtomicBool>,
    /// One thread delivers at a time (per-sender order).
    delivering: AtomicBool,
    /// A thread sleeps in `progress_wait` (poke `wake` to interrupt it).
    sleeping: AtomicBool,
    wake: EventFd,
    efd: Option<i32>,
}

/// Process-to-process transport over UCX's ucp API.
///
/// # Behaviour
///
/// * **Set-up** ([`UcxLayer::new`]): one `ucp_context` (features AM, RMA
///   and WAKEUP) and one worker per process; the worker's address is
///   published under [`ADDR_KEY`] through the bootstrap, which is fenced,
///   and every peer's address is read.
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
///   `progress` as [`TransportError::PeerLost`]; later sends to it fail
///   with the same error. A peer that dropped its layer cleanly said
///   goodbye first and is not reported.
/// * **Remote reads**: [`register`](MachineLayer::register) maps the
///   buffer with `ucp_mem_map` and packs its rkey into the [`RemoteKey`];
///   [`get`](MachineLayer::get) unpacks it on the endpoint and issues
///   `ucp_get_nbx` into a fresh buffer, which arrives through `progress`
///   as the completion message.
pub struct UcxLayer {
    shared: Arc<Shared>,
    bootstrap: Arc<dyn Bootstrap>,
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
        let wcfg = WorkerConfig {
            rndv_threshold: cfg.rndv_threshold,
            wakeup: cfg.wakeup,
            same_host_error_handling: cfg.same_host_error_handling,
            pool_bytes: cfg.pool_bytes,
            max_message: cfg.max_message,
        };
        let (mut worker, address) = Worker::new(rank, size, &wcfg)?;
        let me = Identity::current();
        bootstrap.put(ADDR_KEY, &address)?;
        bootstrap.put(IDENTITY_KEY, &me.encode())?;
        bootstrap.fence()?;
        let mut identities = Vec::with_capacity(size as usize);
        let mut addresses = Vec::with_capacity(size as usize);
        for r in 0..size {
            let a = if r == rank {
                address.clone()
            } else {
                bootstrap.get(r, ADDR_KEY)?
            };
            identities.push(if r == rank {
                None
            } else {
                bootstrap
                    .get(r, IDENTITY_KEY)
                    .ok()
                    .and_then(|b| Identity::decode(&b))
                    .filter(|i| me.comparable(i))
            });
            if a.is_empty() {
                return Err(TransportError::Bootstrap(format!(
                    "process {r} published an empty UCX worker address"
                )));
            }
            addresses.push(a);
        }
        let peer_mode = identities
            .iter()
            .enumerate()
            .map(|(r, id)| r as u32 != rank && (id.is_none() || cfg.same_host_error_handling))
            .collect();
        let same_host: Vec<bool> = identities.iter().map(Option::is_some).collect();
        worker.set_addresses(addresses, peer_mode, &same_host);
        let efd = worker.efd();
        let shared = Arc::new(Shared {
            watcher: OnceLock::new(),
            rank,
            size,
            cfg,
            locked: SpinMutex::new(Locked {
                worker,
                idle_since: None,
                idle_calls: 0,
                calls: 0,
                identities,
                last_check: Instant::now(),
            }),
            queue: SegQueue::new(),
            loopback: SegQueue::new(),
            lost: (0..size).map(|_| AtomicBool::new(false)).collect(),
            delivering: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            wake: EventFd::new()?,
            efd,
        });
        Ok(UcxLayer { shared, bootstrap })
    }

    /// The tunables in force.
    pub fn config(&self) -> &UcxConfig {
        &self.shared.cfg
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
        let Some(efd) = self.shared.efd else {
            return Err(TransportError::Unsupported(
                "a wake-up hook without UCX wake-up support",
            ));
        };
        if self.shared.watcher.get().is_some() {
            return Err(TransportError::Unsupported("a second wake-up hook"));
        }
        let weak = Arc::downgrade(&self.shared);
        let arm = Box::new(move || {
            let Some(s) = weak.upgrade() else {
                return Armed::Busy;
            };
            let Some(mut l) = s.locked.try_lock() else {
                return Armed::Busy;
            };
            let armed = s.arm_for_hook(&mut l);
            drop(l);
            match armed {
                Ok((armed, call)) => {
                    if call {
                        s.call_hook();
                    }
                    armed
                }
                Err(_) => Armed::Pending,
            }
        });
        let w = Watcher::start(efd, Box::new(hook), arm, self.shared.rank)?;
        self.shared
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
        let start = Instant::now();
        let deadline = start + timeout;
        let spin_until = start + self.shared.cfg.wait_spin.min(timeout);
        let mut round = 0u32;
        loop {
            let n = self.progress(sink)?;
            let now = Instant::now();
            if n > 0 || now >= deadline {
                return Ok(n);
            }
            if now < spin_until || self.shared.efd.is_none() {
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
                let mut l = self.shared.locked.lock();
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
                self.shared.sleeping.store(true, Ordering::SeqCst);
            }
            fence(Ordering::SeqCst);
            if self.shared.queue.is_empty() && self.shared.loopback.is_empty() {
                let efd = self.shared.efd.unwrap_or(-1);
                wait_readable(
                    [efd, self.shared.wake.fd()],
                    Some(deadline.saturating_duration_since(Instant::now())),
                );
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.shared.wake.clear();
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
        let s = &*self.shared;
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut l = s.locked.lock();
                s.run_queue(&mut l);
                l.worker.progress_once();
                if !l.worker.inbox.holds_operations() && s.queue.is_empty() {
                    return Ok(true);
                }
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::yield_now();
        }
    }

    /// Number of UCX endpoints this process has open (they are created on
    /// the first operation towards a peer).
    pub fn open_endpoints(&self) -> usize {
        self.shared.locked.lock().worker.open_endpoints()
    }

    fn check(&self, p: ProcessId) -> Result<(), TransportError> {
        if p < self.shared.size {
            Ok(())
        } else {
            Err(TransportError::UnknownProcess {
                dst: p,
                size: self.shared.size,
            })
        }
    }

    fn lost_error(&self, p: ProcessId) -> Result<(), TransportError> {
        if self.shared.lost[p as usize].load(Ordering::Acquire) {
            Err(TransportError::PeerLost {
                process: p,
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
        let s = &*self.shared;
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
}

impl Shared {
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
        let (peer, res) = match op {
            Op::Send(dst, msg) => (dst, l.worker.send(dst, msg)),
            Op::Get { src, key, header } => (src, self.run_get(&mut l.worker, src, &key, header)),
        };
        self.record_failure(l, peer, res);
    }

    /// Hands the failure of an operation towards `peer`, if it failed, to the inbox (reported by
    /// `progress`).
    fn record_failure(&self, l: &mut Locked, peer: ProcessId, res: Result<(), TransportError>) {
        if let Err(e) = res {
            match e {
                TransportError::PeerLost { process, reason } => {
                    l.worker.inbox.peer_failed(process, reason);
                }
                other => l
                    .worker
                    .inbox
                    .error(TransportError::Io(std::io::Error::other(format!(
                        "operation towards process {peer}: {other}"
                    )))),
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
        let busy = {
            let mut rounds = 0;
            let mut busy = l.worker.progress_once();
            // Deliver as soon as something is ready (latency); otherwise
            // keep going while UCX reports progress, a bounded number of
            // rounds.
            while busy && rounds < 8 && l.worker.inbox.state.borrow().ready.is_empty() {
                busy = l.worker.progress_once();
                rounds += 1;
            }
            busy
        };
        let (mut error, failures) = {
            let mut st = l.worker.inbox.state.borrow_mut();
            // Usually the batch is empty: the two swap their buffers.
            batch.append(&mut st.ready);
            (st.errors.pop_front(), !st.failed_eps.is_empty())
        };
        if failures {
            l.worker.close_failed();
            for p in 0..self.size {
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
        // Idle. The clock is read only every IDLE_CLOCK_EVERY calls (reading
        // it costs as much as an idle progress, and every cycle of the idle
        // loop is latency added to the next arrival): arming here is a
        // fallback for pollers that park without `before_park`.
        l.idle_calls = l.idle_calls.wrapping_add(1);
        if !l.idle_calls.is_multiple_of(IDLE_CLOCK_EVERY) {
            return error;
        }
        let now = Instant::now();
        if !busy && now - l.last_check >= self.cfg.liveness_interval {
            self.check_peers(l);
        }
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
        for p in 0..self.size {
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
        self.shared.rank
    }

    fn size(&self) -> u32 {
        self.shared.size
    }

    /// Never blocks: sends at once if the worker is free, else queues for
    /// the thread holding it. A message to oneself loops back through
    /// `progress`.
    ///
    /// # Errors
    ///
    /// [`TransportError::UnknownProcess`]; [`TransportError::PeerLost`] if
    /// `dst` was reported lost (failures found while sending are reported
    /// by `progress`).
    fn send(&self, dst: ProcessId, msg: Message) -> Result<(), TransportError> {
        self.check(dst)?;
        if dst == self.shared.rank {
            self.shared.loopback.push(msg);
            self.shared.announce();
            return Ok(());
        }
        self.lost_error(dst)?;
        self.submit(Op::Send(dst, msg));
        Ok(())
    }

    /// Sends at once, copying `data` into a send descriptor's kept buffer (no allocation), when
    /// the message is small (1 KiB at most), the worker free and nothing queued before it;
    /// otherwise as [`send`](Self::send).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    fn send_copy(&self, dst: ProcessId, header: Header, data: &[u8]) -> Result<(), TransportError> {
        let s = &*self.shared;
        if data.len() <= crate::worker::SEND_COPY_MAX && dst != s.rank {
            self.check(dst)?;
            self.lost_error(dst)?;
            if let Some(mut l) = s.locked.try_lock() {
                if s.queue.is_empty() {
                    let res = l.worker.send_copy(dst, &header, data);
                    s.record_failure(&mut l, dst, res);
                    s.release(l);
                    return Ok(());
                }
            }
        }
        // Looping back, large, or behind queued operations: a message the queue can own.
        self.send(dst, Message::with_copied_segment(header, data))
    }

    /// Runs queued sends, progresses the worker, and hands every message
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
        let s = &*self.shared;
        if s.delivering.swap(true, Ordering::Acquire) {
            return Ok(0); // another thread (or the sink) is delivering
        }
        let _delivering = ClearOnDrop(&s.delivering);
        SCRATCH.with(|scratch| {
            let mut batch = scratch.borrow_mut();
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
                        Some(m) => batch.push(s.rank, m),
                        None => break,
                    }
                }
            }
            let n = batch.deliver(sink);
            match error {
                Some(e) => Err(e),
                None => Ok(n),
            }
        })
    }

    fn set_wakeup(&self, hook: Box<dyn Fn() + Send + Sync>) -> bool {
        UcxLayer::set_wakeup(self, hook).is_ok()
    }

    /// Arms the worker now (`ucp_worker_arm`) for the wake-up hook, instead
    /// of [`UcxConfig::arm_after`] into idleness.
    fn before_park(&self) -> bool {
        let s = &*self.shared;
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

    /// Maps the buffer with `ucp_mem_map` (read access) and ships its packed
    /// rkey in the key; unmapped when the region is dropped.
    fn register(&self, buf: Bytes) -> Result<MemRegion, TransportError> {
        if buf.is_empty() {
            let key = RemoteKey {
                addr: 0,
                len: 0,
                rkey: Vec::new(),
            };
            return Ok(MemRegion::new(buf, key));
        }
        let (memh, packed) = self
            .shared
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
        let shared = Arc::downgrade(&self.shared);
        let memh = MemHandle(memh);
        Ok(MemRegion::with_release(buf, key, move || {
            let memh = memh;
            if let Some(s) = shared.upgrade() {
                s.locked.lock().worker.mem_unmap(memh.0);
            }
        }))
    }

    /// `ucp_get_nbx` through the key's rkey into a pooled buffer; the
    /// completion message arrives through `progress`. A malformed key is
    /// refused at once; a failed read arrives as an error from `progress`.
    /// Keys are trusted within the job: UCX checks them against the
    /// registration on RDMA transports, but its shared-memory path (CMA)
    /// reads whatever the key's address and length say in the owner's
    /// address space (same user, same job).
    fn get(
        &self,
        src: ProcessId,
        key: &RemoteKey,
        completion_kind: u8,
        completion_tag: u64,
    ) -> Result<(), TransportError> {
        self.check(src)?;
        let header = Header::new(completion_kind, 0, 0, completion_tag);
        if key.len == 0 {
            let msg = Message::with_segments(header, vec![Bytes::new()])?;
            self.shared.loopback.push(msg);
            self.shared.announce();
            return Ok(());
        }
        let r = &key.rkey;
        if r.len() < 8 || &r[..4] != RKEY_MAGIC {
            return Err(TransportError::Malformed(
                "remote key was not made by a ucx layer".to_owned(),
            ));
        }
        self.lost_error(src)?;
        self.submit(Op::Get {
            src,
            key: key.clone(),
            header,
        });
        Ok(())
    }

    /// Completes this process's outstanding sends first (UCX may need this
    /// process's progress for them, e.g. to finish endpoint wire-up), then
    /// the bootstrap's fence (all processes).
    fn barrier(&self) -> Result<(), TransportError> {
        self.flush(self.shared.cfg.linger)?;
        self.bootstrap.fence()
    }

    /// Tells the launcher through the bootstrap, which brings the job down.
    fn abort(&self, reason: &str) {
        self.bootstrap.abort(reason);
    }

    /// Peers exiting at the end of a job make UCX log connection and flush
    /// errors (on stdout, mixed with the program's output): from here on only
    /// fatal messages are logged, unless the user chose `UCX_LOG_LEVEL`.
    fn stopping(&self) {
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

    fn name(&self) -> &'static str {
        "ucx"
    }
}

impl std::fmt::Debug for UcxLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxLayer")
            .field("rank", &self.shared.rank)
            .field("size", &self.shared.size)
            .finish_non_exhaustive()
    }
}

impl Drop for UcxLayer {
    /// Finishes queued sends, says goodbye to the peers it talked to (so
    /// they do not report it lost), waits up to [`UcxConfig::linger`] for
    /// UCX to finish with every buffer, then closes the endpoints; the
    /// worker and context are destroyed when the last reference goes.
    fn drop(&mut self) {
        let s = &*self.shared;
        let mut l = s.locked.lock();
        s.run_queue(&mut l);
        l.worker.drain(s.cfg.linger);
        l.worker.say_goodbye();
        l.worker.close_all(s.cfg.linger);
    }
}
