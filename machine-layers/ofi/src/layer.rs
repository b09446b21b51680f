//! [`OfiLayer`]: the libfabric implementation of [`MachineLayer`].

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_transport::kv::KvBootstrap;
use charmrs_transport::lanes::{
    decode_address_list, encode_address_list, endpoint_for, process_of,
};
use charmrs_transport::liveness::Identity;
use charmrs_transport::{
    Arrival, ArrivalBatch, Bootstrap, Header, MachineLayer, MemRegion, Message, ProcessId,
    RecvPool, RemoteKey, TransportError, NAP_MAX, NAP_SPIN,
};
use crossbeam_queue::SegQueue;

use crate::config::{check_packet_max, check_recv_buffers, OfiConfig, ENV_PROVIDER};
use crate::engine::{
    gone_reason, Engine, Out, Registered, Sizes, ALIVE, DEPARTED, LOST, RNDV_POOL_MIN,
};
use crate::fabric::Fabric;
use charmrs_transport::undelivered::Undelivered;

/// Bootstrap key of a process's endpoint addresses (a list, one per endpoint, see
/// [`charmrs_transport::lanes::encode_address_list`]).
pub const ADDR_KEY: &str = "ofi-addr";
/// Bootstrap key of a process's provider name (must match everywhere).
pub const PROVIDER_KEY: &str = "ofi-provider";
/// Bootstrap key of a process's host identity and pid (liveness checks).
pub const HOST_KEY: &str = "ofi-host";

/// What a thread asks the thread progressing an endpoint to do. Peers are endpoint ids.
enum Cmd {
    Send(u32, Message),
    Get(u32, Out),
    /// Deregister the region with this key (its `MemRegion` was dropped).
    Release(u64),
}

/// One endpoint of the layer (a *lane*: one per PE, or one for the process) and what the
/// threads using it share: its engine, the work queued for it, and its wake-up machinery.
struct Inner {
    /// This endpoint's id, `process · lanes + lane` ([`charmrs_transport::lanes`]).
    me: u32,
    /// Endpoints per process.
    lanes: u32,
    engine: Mutex<Engine>,
    /// Work from threads that did not get the engine lock, in order.
    cmds: SegQueue<Cmd>,
    /// Per peer endpoint, as this endpoint's engine knows it.
    status: Arc<Vec<AtomicU8>>,
    /// Per process, shared by the endpoints of this process: `ALIVE`, `DEPARTED` or `LOST`
    /// (see `Engine::processes`).
    processes: Arc<Vec<AtomicU8>>,
    /// `eventfd` that wakes a thread sleeping in `progress_wait`.
    event_fd: c_int,
    /// Number of threads sleeping in `progress_wait`.
    sleeping: AtomicUsize,
    wakeup: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The progressing thread is about to park (`before_park`): the
    /// watcher waits on the completion queue's descriptor only while this
    /// is set, and calls the hook (once) when it becomes readable. While
    /// the thread polls, arrivals wake nobody.
    armed: AtomicBool,
    /// The watcher thread (unparked when armed and when closing).
    watcher_thread: OnceLock<std::thread::Thread>,
    closing: AtomicBool,
    wait_fd: Option<c_int>,
}

thread_local! {
    /// Per-thread batch of the messages one `progress` delivers (moved out of the engine under
    /// its lock, handed to the sink after it is released).
    static SCRATCH: std::cell::RefCell<ArrivalBatch> =
        const { std::cell::RefCell::new(ArrivalBatch::new()) };
    /// The lane the calling thread is bound to (`bind_lane`; 0 until bound).
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn lock(m: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    // A panic in the engine leaves libfabric objects in a state we cannot
    // check; carrying on is still better than poisoning every thread.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    /// Moves queued commands into the engine (under its lock).
    fn absorb(&self, eng: &mut Engine) {
        // `is_empty` first: popping an empty `SegQueue` costs a full fence, on every poll.
        while !self.cmds.is_empty() {
            let Some(cmd) = self.cmds.pop() else { break };
            match cmd {
                Cmd::Send(dst, msg) if dst == self.me => eng.loopback(msg),
                Cmd::Send(dst, msg) => eng.queue(dst, Out::Msg(msg)),
                Cmd::Get(src, out) => eng.queue(src, out),
                Cmd::Release(key) => {
                    eng.regions.remove(&key);
                }
            }
        }
    }

    /// Queues `cmd` and posts it now if no other thread holds the engine;
    /// otherwise wakes whoever progresses the layer.
    fn submit(&self, cmd: Cmd, needs_progress: bool) {
        self.cmds.push(cmd);
        if let Ok(mut eng) = self.engine.try_lock() {
            self.absorb(&mut eng);
            eng.post_pending();
            // Posted, nothing left for the progressing thread (the provider took it all).
            if !needs_progress && eng.quiet() {
                return;
            }
        }
        self.notify();
    }

    /// Wakes a thread sleeping in `progress_wait` and calls the wake-up
    /// hook.
    fn notify(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) > 0 {
            let one: u64 = 1;
            // SAFETY: event_fd is an open eventfd; writing 8 bytes adds to
            // its counter (a full counter only makes the write fail).
            unsafe {
                libc::write(self.event_fd, (&one as *const u64).cast(), 8);
            }
        }
        if let Some(hook) = self.wakeup.get() {
            hook();
        }
    }

    /// Whether the progressing thread may sleep until the completion queue's descriptor says
    /// otherwise: nothing queued or in flight that only its progress moves, and `fi_trywait`
    /// succeeded (after which the descriptor signals every new completion).
    fn may_sleep(&self, eng: &Engine) -> bool {
        self.cmds.is_empty() && eng.quiet() && eng.ready.is_empty() && eng.fab.trywait()
    }

    fn drain_event_fd(&self) {
        let mut v: u64 = 0;
        // SAFETY: event_fd is an open non-blocking eventfd; reading 8 bytes
        // resets its counter (EAGAIN when it is zero).
        unsafe {
            libc::read(self.event_fd, (&mut v as *mut u64).cast(), 8);
        }
    }

    /// `Err(PeerLost)` if peer endpoint `id` is known lost or gone, naming its process.
    fn check(&self, id: u32) -> Result<(), TransportError> {
        let reason = match self.status[id as usize].load(Ordering::Acquire) {
            LOST | DEPARTED => lock(&self.engine).reasons[id as usize]
                .clone()
                .unwrap_or_else(|| "lost".to_owned()),
            // Another endpoint of this process may have learnt of its process's going.
            _ => {
                match self.processes[process_of(id, self.lanes) as usize].load(Ordering::Acquire) {
                    ALIVE => return Ok(()),
                    fate => gone_reason(fate).to_owned(),
                }
            }
        };
        Err(self.for_caller(TransportError::PeerLost {
            process: id,
            reason,
        }))
    }

    /// `e`, naming processes where the engine named endpoints.
    fn for_caller(&self, e: TransportError) -> TransportError {
        match e {
            TransportError::PeerLost { process, reason } if self.lanes > 1 => {
                TransportError::PeerLost {
                    process: process_of(process, self.lanes),
                    reason: format!("{reason} (libfabric endpoint of PE {process})"),
                }
            }
            e => e,
        }
    }

    /// Moves queued commands in, posts what waits, and drains the completion queue (posting
    /// again what its completions made ready to go): the engine's part of every poll.
    fn pump(&self, eng: &mut Engine) {
        self.absorb(eng);
        eng.post_pending();
        if eng.poll_cq() > 0 {
            eng.post_pending();
        }
    }

    /// Posts queued work, drains the completion queue and hands every message that became
    /// deliverable to `sink` (naming the sending process), outside the engine lock; then the
    /// first error, if any.
    fn progress_arrivals(
        &self,
        sink: &mut dyn FnMut(ProcessId, Arrival<'_>),
    ) -> Result<usize, TransportError> {
        if self.armed.load(Ordering::Relaxed) {
            // Polling again: arrivals need not wake anybody.
            self.armed.store(false, Ordering::Relaxed);
        }
        // A thread's own batch, reused (a sink that progresses again gets a fresh one).
        SCRATCH.with(|scratch| {
            let mut own = scratch.try_borrow_mut();
            let mut fresh;
            let batch = match own.as_deref_mut() {
                Ok(b) => b,
                Err(_) => {
                    fresh = ArrivalBatch::new();
                    &mut fresh
                }
            };
            let err = {
                let mut eng = lock(&self.engine);
                self.pump(&mut eng);
                eng.check_liveness();
                batch.append(&mut eng.ready);
                eng.errors.pop_front()
            };
            let n = if self.lanes == 1 {
                batch.deliver(sink)
            } else {
                batch.deliver(&mut |id, a| sink(process_of(id, self.lanes), a))
            };
            match err {
                Some(e) => Err(self.for_caller(e)),
                None => Ok(n),
            }
        })
    }

    /// Posts queued work and completes operations without delivering anything (arrivals wait
    /// for the next `progress`, whose thread is woken for them): for a thread that waits for
    /// something else meanwhile.
    fn keep_going(&self) {
        let arrived = {
            let mut eng = lock(&self.engine);
            self.pump(&mut eng);
            !eng.ready.is_empty()
        };
        if arrived {
            self.notify();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: the eventfd was opened for this endpoint and is closed once, here, when no
        // thread can use it any more (the layer and its watcher held the last references).
        unsafe {
            libc::close(self.event_fd);
        }
    }
}

/// Process-to-process transport over libfabric reliable datagram
/// endpoints (`FI_EP_RDM`), e.g. the `shm` provider within a node or
/// `tcp;ofi_rxm` across nodes.
///
/// # Behaviour
///
/// * **Set-up** ([`OfiLayer::new`]): opens, for each of its [`OfiConfig::endpoints`], a fabric,
///   domain (`FI_THREAD_DOMAIN`), completion queue, address vector and endpoint; publishes the
///   endpoints' names (and provider, host and pid) through the bootstrap, fences, and inserts
///   every peer endpoint's name into each address vector.
/// * **Endpoints per PE** ([`lanes`](MachineLayer::lanes)): with one endpoint per PE, each PE's
///   thread binds to its own ([`bind_lane`](MachineLayer::bind_lane)), sends from it to the
///   endpoint of the message's destination PE (`Header::dst_pe`), and polls it: no arrival is
///   handed from one thread to another and no lock is shared between PEs. Each endpoint has its
///   own domain, as a process per core would under MPI, so a registration belongs to the
///   endpoint that made it and a [`RemoteKey`] names that endpoint. Peers are named by
///   endpoint id (`process · endpoints + lane`); the sink and errors name processes.
/// * **Sending** ([`send`](MachineLayer::send), any thread): the message
///   goes into a lock-free queue; if no other thread holds the engine lock,
///   the caller posts it at once, otherwise the thread that holds it (the
///   one in `progress`) does. Small messages go eagerly (`fi_sendmsg` over
///   the header and the `Bytes` segments, no copy); larger ones by
///   rendezvous (the receiver `fi_read`s the registered segments straight
///   into the buffer that becomes the message: no copy at all). `send`
///   never blocks: what the provider cannot take yet stays queued, and so do large messages
///   to a peer that has [`OfiConfig::rndv_per_peer`] (or [`OfiConfig::rndv_bytes_per_peer`])
///   registered and not acknowledged, with what was sent to it after them, until its
///   acknowledgements free registrations ([`OfiLayer::rendezvous_usage`]).
/// * **Receiving**: only in [`progress`](MachineLayer::progress), which
///   drains the completion queue, re-posts receive buffers, drives
///   rendezvous reads and hands arrived messages to the sink in per-source
///   send order, after releasing the engine lock (so the sink may call
///   `send`, `register` or `get`).
/// * **Waiting**: [`OfiLayer::progress_wait`] polls briefly, then sleeps
///   on the completion queue's wait object (`FI_WAIT_FD`) if the provider
///   has one, else naps in short slices. [`set_wakeup`](MachineLayer::set_wakeup)
///   is supported with a wait object: a watcher thread per endpoint, armed by
///   [`before_park`](MachineLayer::before_park), calls the hook.
/// * **Failures**: a failed operation towards a peer (the provider's CQ
///   error, e.g. a refused or reset connection under `tcp;ofi_rxm`) is reported once by its
///   endpoint's `progress`, a peer process on this host that exited without shutting its layer
///   down (checked every [`OfiConfig::liveness_interval`]) once by the first endpoint's, as
///   [`TransportError::PeerLost`]; later sends to it, from any endpoint, fail with the same
///   error.
/// * **Shutdown**: dropping the layer sends a goodbye to the peers (every endpoint to those it
///   talked with, the first endpoint also to every process's first, so they do not report it
///   lost) and waits up to [`OfiConfig::linger`] for its last sends to complete and peers to
///   read its large messages. A peer's goodbye goes once it read them all (or the linger ran
///   out), so it is the last thing the peer gets; a process that got a goodbye still reads and
///   delivers, in order, everything the leaving process sent before it. The messages it
///   accepted for sending and does not know delivered at the end (the linger ran out; or the
///   peer left or was lost first, unless that loss was reported to the runtime already) are
///   named in one line on stderr: this process's rank, how many and their bytes, to which
///   processes (the first 8) and why. None when everything went.
pub struct OfiLayer {
    rank: ProcessId,
    size: u32,
    /// One per endpoint, in lane order.
    lanes: Vec<Arc<Inner>>,
    bootstrap: Arc<dyn Bootstrap>,
    /// Each endpoint's wake-up watcher thread, once started.
    watchers: Vec<Mutex<Option<JoinHandle<()>>>>,
    provider: String,
    cfg: OfiConfig,
    /// Set by [`MachineLayer::stopping`]: the runtime ended or aborted the job, so messages
    /// given up on at the drop are expected (what `exit` leaves in flight is discarded, as in
    /// Charm++; an abort is its own report) and not reported.
    job_ending: AtomicBool,
}

/// What [`OfiLayer::rendezvous_usage`] reports about the large messages to one process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RndvUsage {
    /// Large messages registered and not acknowledged yet (their descriptors went; the reader
    /// has not finished reading them).
    pub messages: usize,
    /// Their bytes.
    pub bytes: usize,
    /// Items queued for the process and not handed to the provider yet: large messages waiting
    /// for registrations to be freed ([`OfiConfig::rndv_per_peer`]), what was sent after them,
    /// and what the provider could not take yet.
    pub queued: usize,
    /// The most large messages outstanding at once between one endpoint of this process and
    /// one of `dst` since the layer started: at most [`OfiConfig::rndv_per_peer`].
    pub peak_messages: usize,
    /// The most bytes outstanding at once between one endpoint of this process and one of
    /// `dst` since the layer started: at most [`OfiConfig::rndv_bytes_per_peer`], or one
    /// message's if larger.
    pub peak_bytes: usize,
}

fn bootstrap_err(m: String) -> TransportError {
    TransportError::Bootstrap(m)
}

/// How long dropping the layer, once its linger ran out, tries to hand the provider the
/// goodbyes that were waiting for peers to read its large messages.
const GOODBYE_GRACE: Duration = Duration::from_millis(100);

/// Bytes of a [`RemoteKey`]'s `rkey` made by this layer: the registration's key, then the lane
/// (endpoint) that registered it, both little-endian.
const RKEY_LEN: usize = 12;

impl OfiLayer {
    /// A layer over `bootstrap` with tunables `cfg`.
    ///
    /// Collective: every process of the job must call it, with the same
    /// provider and number of endpoints.
    ///
    /// # Errors
    ///
    /// [`TransportError::Io`] naming the libfabric call and its error if
    /// the provider is missing or an object cannot be opened;
    /// [`TransportError::Bootstrap`] if the exchange fails, a peer uses
    /// another provider or another number of endpoints, or `cfg` is unusable.
    pub fn new(
        bootstrap: Arc<dyn Bootstrap>,
        mut cfg: OfiConfig,
    ) -> Result<OfiLayer, TransportError> {
        // The provider's limit is checked once it is known (below).
        check_recv_buffers(cfg.recv_buffers, 0, "")
            .map_err(|why| bootstrap_err(format!("ofi config: {why}")))?;
        if cfg.rndv_per_peer == 0 {
            return Err(bootstrap_err(
                "ofi config: rndv_per_peer must be at least 1".to_owned(),
            ));
        }
        // The provider's own limit is checked once it is known (below).
        check_packet_max(cfg.packet_max, "", |_| None)
            .map_err(|why| bootstrap_err(format!("ofi config: {why}")))?;
        let rank = bootstrap.rank();
        let size = bootstrap.size();
        let lanes = u32::try_from(cfg.endpoints)
            .ok()
            .filter(|&l| l >= 1 && u64::from(l) * u64::from(size) <= u64::from(u32::MAX))
            .ok_or_else(|| {
                bootstrap_err(format!(
                    "ofi config: {} endpoints per process (at least 1, and at most 2^32 in the \
                     job of {size} processes)",
                    cfg.endpoints
                ))
            })?;
        let ids = size * lanes;
        let provider = cfg
            .provider
            .clone()
            .or_else(|| std::env::var(ENV_PROVIDER).ok())
            .or_else(|| std::env::var("FI_PROVIDER").ok())
            .filter(|p| !p.is_empty());
        let open_all = || -> Result<(Vec<Fabric>, Vec<Vec<u8>>), TransportError> {
            let mut fabs = Vec::with_capacity(lanes as usize);
            let mut own = Vec::with_capacity(lanes as usize);
            for _ in 0..lanes {
                let fab = Fabric::open(provider.as_deref(), ids as usize)?;
                own.push(fab.name()?);
                fabs.push(fab);
            }
            Ok((fabs, own))
        };
        let (fabs, own) = match open_all() {
            Ok(opened) => opened,
            Err(e) if lanes > 1 => {
                // The provider cannot give every PE an endpoint that addresses every endpoint of
                // the job (libfabric 1.17's `shm` refuses address vectors of more than 256
                // peers). Nothing was published yet: one endpoint per process instead, as every
                // process of the job finds when the cause is such a limit (a process that does
                // not is named at the exchange: its list of endpoints differs).
                let layer = OfiLayer::new(
                    bootstrap,
                    OfiConfig {
                        endpoints: 1,
                        ..cfg
                    },
                )?;
                eprintln!(
                    "charmrs-ofi: process {rank}: {lanes} endpoints ({ids} in the job) do not \
                     open ({e}); one endpoint per process instead"
                );
                return Ok(layer);
            }
            Err(e) => return Err(e),
        };
        let prov = fabs[0].limits.provider.clone();
        // Before anything is published: every process of the job finds the same.
        check_packet_max(cfg.packet_max, &prov, |name| std::env::var(name).ok())
            .map_err(|why| bootstrap_err(format!("ofi config: {why}")))?;
        // Every endpoint has the same provider, hence the same receive queue depth.
        cfg.recv_buffers = check_recv_buffers(cfg.recv_buffers, fabs[0].limits.rx_size, &prov)
            .map_err(|why| bootstrap_err(format!("ofi config: {why}")))?;
        let me = Identity::current();
        bootstrap.put(ADDR_KEY, &encode_address_list(&own))?;
        bootstrap.put(PROVIDER_KEY, prov.as_bytes())?;
        bootstrap.put(HOST_KEY, &me.encode())?;
        bootstrap.fence()?;
        let mut names = Vec::with_capacity(ids as usize);
        let mut local_peers = Vec::with_capacity(size as usize);
        for r in 0..size {
            if r == rank {
                names.extend(own.iter().cloned());
                local_peers.push(None);
                continue;
            }
            let their = bootstrap.get(r, PROVIDER_KEY)?;
            if their != prov.as_bytes() {
                return Err(bootstrap_err(format!(
                    "process {r} uses libfabric provider {:?}, this process {prov:?}; set \
                     {ENV_PROVIDER} the same everywhere",
                    String::from_utf8_lossy(&their)
                )));
            }
            let published = decode_address_list(&bootstrap.get(r, ADDR_KEY)?).ok_or_else(|| {
                bootstrap_err(format!(
                    "process {r} published a malformed list of libfabric endpoint addresses"
                ))
            })?;
            if published.len() != lanes as usize {
                return Err(bootstrap_err(format!(
                    "process {r} has {} libfabric endpoints, process {rank} {lanes}: an \
                     endpoint per PE needs as many PEs in every process (or a process fell back \
                     to one endpoint: see its standard error)",
                    published.len()
                )));
            }
            names.extend(published);
            // Checked for liveness only if its PID means the same here: same kernel boot and
            // PID namespace (containers on one host share the boot id).
            let theirs = Identity::decode(&bootstrap.get(r, HOST_KEY)?);
            local_peers.push(theirs.filter(|them| me.comparable(them)));
        }
        let sizes = Sizes {
            packet_max: cfg.packet_max,
            recv_buffers: cfg.recv_buffers,
            max_message: cfg.max_message,
            grace: Duration::from_millis(20),
            read_window: cfg.read_window.unwrap_or(if prov == "shm" {
                0
            } else {
                crate::config::DEFAULT_READ_WINDOW
            }),
            liveness_interval: cfg.liveness_interval,
            rndv_per_peer: cfg.rndv_per_peer,
            rndv_bytes_per_peer: cfg.rndv_bytes_per_peer,
        };
        // One pool for the process: its idle capacity is the process's, whatever the lanes.
        let pool = RecvPool::new(RNDV_POOL_MIN, cfg.pool_bytes);
        let processes: Arc<Vec<AtomicU8>> =
            Arc::new((0..size).map(|_| AtomicU8::new(ALIVE)).collect());
        let mut inners = Vec::with_capacity(lanes as usize);
        for (lane, mut fab) in (0..lanes).zip(fabs) {
            let addrs = fab.insert_peers(&names).map_err(|e| match e {
                // A provider may cap its address vectors (libfabric 1.17's `shm`: 256 peers)
                // or run out of connections: every endpoint addresses every endpoint.
                TransportError::Io(io) if lanes > 1 => {
                    TransportError::Io(std::io::Error::other(format!(
                        "{io}; with an endpoint per PE every endpoint addresses all {ids} of \
                         the job: CHARMRS_OFI_ENDPOINTS=process gives each process one"
                    )))
                }
                e => e,
            })?;
            let wait_fd = fab.wait_fd;
            let status: Arc<Vec<AtomicU8>> =
                Arc::new((0..ids).map(|_| AtomicU8::new(ALIVE)).collect());
            let me = rank * lanes + lane;
            let engine = Engine::new(
                fab,
                me,
                lanes,
                addrs,
                sizes,
                Arc::clone(&status),
                Arc::clone(&processes),
                local_peers.clone(),
                Arc::clone(&pool),
            )?;
            // SAFETY: eventfd takes no pointers; the result is checked.
            let event_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if event_fd < 0 {
                return Err(TransportError::Io(std::io::Error::last_os_error()));
            }
            inners.push(Arc::new(Inner {
                me,
                lanes,
                engine: Mutex::new(engine),
                cmds: SegQueue::new(),
                status,
                processes: Arc::clone(&processes),
                event_fd,
                sleeping: AtomicUsize::new(0),
                wakeup: OnceLock::new(),
                armed: AtomicBool::new(false),
                watcher_thread: OnceLock::new(),
                closing: AtomicBool::new(false),
                wait_fd,
            }));
        }
        // Everyone's receive pool is posted before anyone sends.
        bootstrap.fence()?;
        Ok(OfiLayer {
            rank,
            size,
            watchers: (0..lanes).map(|_| Mutex::new(None)).collect(),
            lanes: inners,
            bootstrap,
            provider: prov,
            cfg,
            job_ending: AtomicBool::new(false),
        })
    }

    /// The layer of a process started by `charmrun`: a
    /// [`KvBootstrap::from_env`] bootstrap and `cfg` (provider from
    /// [`ENV_PROVIDER`]/`FI_PROVIDER` unless `cfg` names one). `Ok(None)`
    /// when the process was not started by charmrun.
    ///
    /// # Errors
    ///
    /// As [`KvBootstrap::from_env`] and [`OfiLayer::new`].
    pub fn from_env(cfg: OfiConfig) -> Result<Option<OfiLayer>, TransportError> {
        let Some(b) = KvBootstrap::from_env()? else {
            return Ok(None);
        };
        OfiLayer::new(Arc::new(b), cfg).map(Some)
    }

    /// The libfabric provider in use (e.g. `"shm"`, `"tcp;ofi_rxm"`).
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The tunables in force ([`OfiConfig::recv_buffers`] as lowered to the provider's limit,
    /// if it was the default and above it).
    pub fn config(&self) -> &OfiConfig {
        &self.cfg
    }

    /// The large (rendezvous) messages this process has registered for process `dst` and not
    /// seen acknowledged yet, and what waits to be sent to it (see
    /// [`OfiConfig::rndv_per_peer`]): summed over the pairs of endpoints between the two
    /// processes, except the peaks, the highest of any one pair (the bound is per pair).
    /// For tests and diagnostics; it takes every endpoint's engine lock in turn. A process
    /// out of range, or this one, has none.
    pub fn rendezvous_usage(&self, dst: ProcessId) -> RndvUsage {
        let mut u = RndvUsage::default();
        if dst >= self.size || dst == self.rank {
            return u;
        }
        let lanes = self.lanes.len() as u32;
        for s in &self.lanes {
            let eng = lock(&s.engine);
            for p in dst * lanes..(dst + 1) * lanes {
                let c = eng.rndv_usage(p);
                u.messages += c.messages;
                u.bytes += c.bytes;
                u.queued += c.queued;
                u.peak_messages = u.peak_messages.max(c.peak_messages);
                u.peak_bytes = u.peak_bytes.max(c.peak_bytes);
            }
        }
        u
    }

    /// Whether the provider gave the completion queue a file-descriptor
    /// wait object (then idle waits sleep in the kernel and
    /// [`set_wakeup`](MachineLayer::set_wakeup) is supported).
    pub fn has_wait_fd(&self) -> bool {
        self.lanes[0].wait_fd.is_some()
    }

    /// The endpoint of the calling thread ([`bind_lane`](MachineLayer::bind_lane)).
    fn lane(&self) -> &Arc<Inner> {
        if self.lanes.len() == 1 {
            &self.lanes[0]
        } else {
            &self.lanes[LANE.with(std::cell::Cell::get).min(self.lanes.len() - 1)]
        }
    }

    /// The endpoint id of the endpoint of process `dst` that takes a message for PE `dst_pe`.
    fn endpoint_for(&self, dst: ProcessId, dst_pe: u32) -> u32 {
        endpoint_for(dst, dst_pe, self.lanes.len() as u32)
    }

    fn check(&self, p: ProcessId) -> Result<(), TransportError> {
        if p >= self.size {
            return Err(TransportError::UnknownProcess {
                dst: p,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Like [`progress`](MachineLayer::progress), but if nothing arrives
    /// waits up to `timeout`: polls for [`OfiConfig::wait_spin`], then
    /// sleeps on the completion queue's file descriptor, woken by the
    /// network, by `send` from another thread, or after at most
    /// [`OfiConfig::liveness_interval`] to check peers. A provider without
    /// such a descriptor (`shm`) cannot wake the caller: it polls for at
    /// least [`NAP_SPIN`], then sleeps in naps of at most [`NAP_MAX`].
    /// Waits on the calling thread's endpoint.
    ///
    /// # Errors
    ///
    /// As [`progress`](MachineLayer::progress).
    pub fn progress_wait(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        let s = self.lane();
        let start = Instant::now();
        let deadline = start + timeout;
        let spin = match s.wait_fd {
            Some(_) => self.cfg.wait_spin,
            None => self.cfg.wait_spin.max(NAP_SPIN),
        };
        let spin_until = start + spin;
        let mut nap = Duration::from_micros(5);
        loop {
            let n = self.progress(sink)?;
            if n > 0 {
                return Ok(n);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(0);
            }
            if now < spin_until {
                std::thread::yield_now();
                continue;
            }
            let slice = (deadline - now).min(self.cfg.liveness_interval);
            match s.wait_fd {
                Some(fd) => Self::sleep_on(s, fd, slice),
                None => {
                    nap = (nap * 2).min(NAP_MAX).min(slice);
                    Self::sleep_on(s, -1, nap);
                }
            }
        }
    }

    /// Sleeps up to `slice` until `fd` (if any) or `inner`'s event fd is
    /// readable; does not sleep if the CQ has events or work is queued.
    fn sleep_on(inner: &Inner, fd: c_int, slice: Duration) {
        if Self::prepare_sleep(inner, fd) {
            Self::sleep_prepared(inner, fd, slice);
        }
    }

    /// Whether the caller may sleep on `fd` (if any) and `inner`'s event fd: nothing is
    /// queued, nothing arrived and (with `fd`) the completion queue is quiet. If so the caller
    /// is counted in `sleeping` and must call [`sleep_prepared`](Self::sleep_prepared).
    ///
    /// It is counted *before* the check, under the engine lock: a thread that queues work or
    /// changes the engine (posts what then waits, delivers to itself) after the check finds it
    /// sleeping and writes the event fd (`notify`). Counted after the check (and the lock), a
    /// thread could do all that in between, see nobody sleeping, and the caller would sleep on
    /// that work for up to its slice.
    fn prepare_sleep(inner: &Inner, fd: c_int) -> bool {
        let eng = lock(&inner.engine);
        inner.sleeping.fetch_add(1, Ordering::SeqCst);
        // Pairs with `notify`'s fence: either it sees this thread counted, or this thread sees
        // the command it queued before.
        std::sync::atomic::fence(Ordering::SeqCst);
        let may = if fd >= 0 {
            inner.may_sleep(&eng)
        } else {
            inner.cmds.is_empty() && eng.ready.is_empty()
        };
        if !may {
            inner.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
        may
    }

    /// The sleep of a caller [`prepare_sleep`](Self::prepare_sleep) counted: up to `slice`,
    /// until `fd` (if any) or the event fd is readable.
    fn sleep_prepared(inner: &Inner, fd: c_int, slice: Duration) {
        if inner.cmds.is_empty() {
            let mut fds = [
                libc::pollfd {
                    fd: inner.event_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let nfds = if fd >= 0 { 2 } else { 1 };
            let ms = slice.as_micros().div_ceil(1000).min(i32::MAX as u128) as c_int;
            if fd < 0 && slice < Duration::from_millis(1) {
                // poll(2) has millisecond resolution: nap instead.
                std::thread::sleep(slice);
            } else {
                // SAFETY: `fds` holds `nfds` valid pollfd entries.
                unsafe {
                    libc::poll(fds.as_mut_ptr(), nfds, ms);
                }
            }
        }
        inner.sleeping.fetch_sub(1, Ordering::SeqCst);
        inner.drain_event_fd();
    }

    /// The wake-up watcher of an endpoint: while its progressing thread is parked
    /// (armed by `before_park`), sleeps on the CQ's file descriptor and
    /// calls the hook when it becomes readable (or at once if completions
    /// or queued work wait), disarming; otherwise sleeps until armed.
    fn watch(inner: &Inner, fd: c_int) {
        while !inner.closing.load(Ordering::Acquire) {
            if !inner.armed.load(Ordering::SeqCst) {
                // Unparked by `before_park` and by the layer's drop; the timeout is a safety net.
                std::thread::park_timeout(Duration::from_millis(50));
                continue;
            }
            let may_sleep = inner.may_sleep(&lock(&inner.engine));
            let mut ready = !may_sleep;
            if may_sleep {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let r = unsafe { libc::poll(&mut pfd, 1, 50) };
                ready = r > 0;
            }
            if ready
                && !inner.closing.load(Ordering::Acquire)
                && inner.armed.swap(false, Ordering::SeqCst)
            {
                if let Some(hook) = inner.wakeup.get() {
                    hook();
                }
            }
        }
    }
}

impl MachineLayer for OfiLayer {
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

    /// Queues the message and posts it at once if no other thread holds the
    /// calling thread's endpoint (see the type docs); never blocks. It goes to the endpoint of
    /// `dst` that takes PE `msg.header().dst_pe`; a message to this process loops back through
    /// that endpoint's `progress`.
    ///
    /// # Errors
    ///
    /// [`TransportError::UnknownProcess`], [`TransportError::TooLarge`]
    /// over [`OfiConfig::max_message`], [`TransportError::PeerLost`] for a
    /// peer known lost or shut down.
    fn send(&self, dst: ProcessId, msg: Message) -> Result<(), TransportError> {
        self.check(dst)?;
        let len = msg.total_len() as u64;
        if len > self.cfg.max_message {
            return Err(TransportError::TooLarge {
                len,
                max: self.cfg.max_message,
            });
        }
        let to = self.endpoint_for(dst, msg.header().dst_pe);
        if dst == self.rank {
            let lane = (to - dst * self.lanes.len() as u32) as usize;
            self.lanes[lane].submit(Cmd::Send(to, msg), true);
            return Ok(());
        }
        let s = self.lane();
        s.check(to)?;
        s.submit(Cmd::Send(to, msg), false);
        Ok(())
    }

    /// Sends at once with `fi_inject` from a reused buffer (no allocation) when the packet fits
    /// the provider's inject size, no other thread holds the endpoint and nothing is queued
    /// before it; otherwise as [`send`](Self::send).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    fn send_copy(&self, dst: ProcessId, header: Header, data: &[u8]) -> Result<(), TransportError> {
        let s = self.lane();
        if dst != self.rank && dst < self.size && s.cmds.is_empty() {
            let to = self.endpoint_for(dst, header.dst_pe);
            s.check(to)?;
            if let Ok(mut eng) = s.engine.try_lock() {
                // Anything this thread sent before went through the queue of commands, now
                // empty: it was absorbed into the engine, whose queue for `to` is checked.
                if s.cmds.is_empty() && eng.inject_now(to, &header, data) {
                    return Ok(());
                }
            }
        }
        self.send(dst, Message::with_copied_segment(header, data))
    }

    /// Non-blocking: posts queued work, drains the calling thread's endpoint's completion
    /// queue and hands every message that became deliverable to `sink`, in
    /// per-source order, outside the engine lock. An error (lost peer,
    /// malformed packet) is returned after the messages were delivered;
    /// each is reported once.
    fn progress(&self, sink: &mut dyn FnMut(ProcessId, Message)) -> Result<usize, TransportError> {
        self.progress_arrivals(false, &mut |src, a| sink(src, a.into_message()))
    }

    /// As [`progress`](Self::progress); eager messages of one segment that arrived in order are
    /// lent ([`Arrival::Borrowed`]) out of the batch they were copied into from the receive
    /// buffer, the rest handed over owned. `idle` makes no difference.
    fn progress_arrivals(
        &self,
        _idle: bool,
        sink: &mut dyn FnMut(ProcessId, Arrival<'_>),
    ) -> Result<usize, TransportError> {
        self.lane().progress_arrivals(sink)
    }

    fn progress_wait(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        OfiLayer::progress_wait(self, sink, timeout)
    }

    /// [`set_lane_wakeup`](MachineLayer::set_lane_wakeup) of the first endpoint.
    fn set_wakeup(&self, hook: Box<dyn Fn() + Send + Sync>) -> bool {
        self.set_lane_wakeup(0, hook)
    }

    /// Supported when the provider's completion queue has a file-descriptor
    /// wait object: after [`before_park`](MachineLayer::before_park), a
    /// watcher thread calls `hook` when completions arrive at endpoint `lane`; `send` from
    /// another thread and sends to oneself call it too. Returns `false`
    /// without a wait object, for an endpoint the layer does not have, or if the endpoint has
    /// a hook already.
    fn set_lane_wakeup(&self, lane: usize, hook: Box<dyn Fn() + Send + Sync>) -> bool {
        let Some(s) = self.lanes.get(lane) else {
            return false;
        };
        let Some(fd) = s.wait_fd else {
            return false;
        };
        if s.wakeup.set(hook).is_err() {
            return false;
        }
        let inner = Arc::clone(s);
        match std::thread::Builder::new()
            .name(format!("charmrs-ofi-wake-{}", s.me))
            .spawn(move || OfiLayer::watch(&inner, fd))
        {
            Ok(h) => {
                let _ = s.watcher_thread.set(h.thread().clone());
                *self.watchers[lane]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(h);
                true
            }
            Err(_) => false,
        }
    }

    /// Arms the calling thread's endpoint's watcher (see
    /// [`set_wakeup`](MachineLayer::set_wakeup)): from now on an arrival calls the hook.
    /// Refuses (`false`: keep polling) while work is queued or operations are in flight, which
    /// only this endpoint's progress moves on, or while messages wait for the next `progress`
    /// to deliver them.
    fn before_park(&self) -> bool {
        let s = self.lane();
        let Some(watcher) = s.watcher_thread.get() else {
            // No wake-up: the caller only naps, unless work waits for its progress or messages
            // wait for its sink (taken in by a `barrier`, or sent to this process).
            let eng = lock(&s.engine);
            return s.cmds.is_empty() && eng.quiet() && eng.ready.is_empty();
        };
        // Completions waiting (say beyond one `progress` call's batch): poll them first.
        if !s.may_sleep(&lock(&s.engine)) {
            return false;
        }
        s.armed.store(true, Ordering::SeqCst);
        watcher.unpark();
        true
    }

    /// `fi_mr_reg` of the buffer for remote reads (`FI_REMOTE_READ`) in the calling thread's
    /// endpoint's domain; the key is the registration's address, key and endpoint. Dropping the
    /// region deregisters it (at that endpoint's next `progress`, or at once if its engine is
    /// free); the buffer is kept alive until then. An empty buffer is not registered, nor kept:
    /// a `get` of it reads nothing, from its key alone.
    fn register(&self, buf: Bytes) -> Result<MemRegion, TransportError> {
        let s = self.lane();
        let lane = s.me % s.lanes;
        let remote_key = |key: u64, addr: u64| {
            let mut rkey = Vec::with_capacity(RKEY_LEN);
            rkey.extend_from_slice(&key.to_le_bytes());
            rkey.extend_from_slice(&lane.to_le_bytes());
            RemoteKey {
                addr,
                len: buf.len() as u64,
                rkey,
            }
        };
        if buf.is_empty() {
            // Kept out of `regions`, whose keys are the provider's: one chosen here could be a
            // key the provider gives a registration (with `FI_MR_PROV_KEY` it picks them), and
            // the empty region's release would then deregister that one.
            let rk = remote_key(0, 0);
            return Ok(MemRegion::new(buf, rk));
        }
        let mut eng = lock(&s.engine);
        let wanted = eng.next_key();
        let mr = eng.fab.register(buf.as_ptr(), buf.len(), wanted)?;
        let key = mr.key;
        let addr = eng.fab.remote_addr(buf.as_ptr());
        eng.regions.insert(
            key,
            Registered {
                _mr: mr,
                buf: buf.clone(),
            },
        );
        drop(eng);
        let rk = remote_key(key, addr);
        let weak = Arc::downgrade(s);
        Ok(MemRegion::with_release(buf, rk, move || {
            if let Some(inner) = weak.upgrade() {
                inner.submit(Cmd::Release(key), false);
            }
        }))
    }

    /// `fi_read` of the remote region into a fresh buffer, from the calling thread's endpoint
    /// to the endpoint that registered it; the completion arrives through the calling thread's
    /// `progress`. A read the owner refuses (region dropped, key of another job) comes out of
    /// `progress` as [`TransportError::Malformed`] (`shm` 1.17 reports it without naming
    /// the read: [`TransportError::Io`]); over `tcp;ofi_rxm`, whose `tcp`
    /// provider drops the connection over a refused read (losing messages
    /// silently), and after any other failure, `src` is lost. A
    /// read of one's own region is served from the registration table.
    fn get(
        &self,
        src: ProcessId,
        key: &RemoteKey,
        completion_kind: u8,
        completion_tag: u64,
    ) -> Result<(), TransportError> {
        self.check(src)?;
        if key.len > self.cfg.max_message {
            return Err(TransportError::TooLarge {
                len: key.len,
                max: self.cfg.max_message,
            });
        }
        let bad =
            || TransportError::Malformed("remote key was not made by an ofi layer".to_owned());
        let raw: &[u8; RKEY_LEN] = key.rkey.as_slice().try_into().map_err(|_| bad())?;
        let (k, l) = raw.split_at(8);
        let rkey = u64::from_le_bytes(k.try_into().map_err(|_| bad())?);
        let lane = u32::from_le_bytes(l.try_into().map_err(|_| bad())?);
        let lanes = self.lanes.len() as u32;
        if lane >= lanes {
            return Err(TransportError::Malformed(format!(
                "remote key of endpoint {lane}, but processes have {lanes}"
            )));
        }
        let header = Header::new(completion_kind, 0, 0, completion_tag);
        let s = self.lane();
        if src == self.rank || key.len == 0 {
            let bytes = if key.len == 0 {
                Bytes::new()
            } else {
                let eng = lock(&self.lanes[lane as usize].engine);
                let reg = eng.regions.get(&rkey).ok_or_else(|| {
                    TransportError::Malformed(format!(
                        "no live registration with key {rkey} on endpoint {lane} of this process"
                    ))
                })?;
                let base = eng.fab.remote_addr(reg.buf.as_ptr());
                let off = key.addr.checked_sub(base).unwrap_or(u64::MAX);
                let end = off.saturating_add(key.len);
                if end > reg.buf.len() as u64 {
                    return Err(TransportError::Malformed(format!(
                        "get of {} bytes at {:#x} is outside registration {rkey}",
                        key.len, key.addr
                    )));
                }
                reg.buf.slice(off as usize..end as usize)
            };
            // From the endpoint that registered the region, as a read would be.
            let from = src * lanes + lane;
            lock(&s.engine).deliver_now(from, Message::with_segment(header, bytes));
            s.notify();
            return Ok(());
        }
        let from = src * lanes + lane;
        s.check(from)?;
        s.submit(
            Cmd::Get(
                from,
                Out::Get {
                    addr: key.addr,
                    key: rkey,
                    len: key.len as usize,
                    kind: completion_kind,
                    tag: completion_tag,
                },
            ),
            false,
        );
        Ok(())
    }

    /// The bootstrap's fence (all processes). While it waits, the calling
    /// thread keeps every endpoint's provider progressing (posting queued sends, serving
    /// peers' reads, completing operations) without delivering anything:
    /// with manual-progress providers such as `tcp;ofi_rxm`, a process
    /// blocked in a fence would otherwise stall the very messages its peers
    /// need to reach the fence. Arrivals are delivered by the next
    /// `progress`.
    fn barrier(&self) -> Result<(), TransportError> {
        let b = Arc::clone(&self.bootstrap);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("charmrs-ofi-fence-{}", self.rank))
            .spawn(move || {
                let _ = tx.send(b.fence());
            })?;
        loop {
            match rx.recv_timeout(Duration::from_micros(200)) {
                Ok(r) => return r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    for s in &self.lanes {
                        s.keep_going();
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(bootstrap_err(
                        "the fence thread ended without a result".into(),
                    ))
                }
            }
        }
    }

    /// Tells the launcher through the bootstrap (which brings the other
    /// processes down) and returns; the caller then exits.
    fn abort(&self, reason: &str) {
        self.bootstrap.abort(reason);
    }

    /// Messages given up on when the layer is dropped are not reported from here on (see
    /// `job_ending`).
    fn stopping(&self) {
        self.job_ending.store(true, Ordering::Relaxed);
    }

    fn name(&self) -> &'static str {
        "ofi"
    }
}

impl std::fmt::Debug for OfiLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfiLayer")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("provider", &self.provider)
            .field("endpoints", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for OfiLayer {
    fn drop(&mut self) {
        for s in &self.lanes {
            s.closing.store(true, Ordering::Release);
            if let Some(t) = s.watcher_thread.get() {
                t.unpark();
            }
        }
        for watcher in &self.watchers {
            if let Some(h) = watcher
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                // The hook runs on the watcher thread and may drop the last reference to this
                // layer: it must not join itself (it sees `closing` and ends on its own).
                if h.thread().id() != std::thread::current().id() {
                    let _ = h.join();
                }
            }
        }
        // Losses still waiting in some endpoint's errors were never returned to the runtime:
        // what is given up on towards those processes is reported as lost during the shutdown.
        let mut unreported = vec![false; self.size as usize];
        for s in &self.lanes {
            let mut eng = lock(&s.engine);
            s.absorb(&mut eng);
            eng.unreported_losses(&mut unreported);
        }
        // Every endpoint says goodbye, then all of them linger together (a peer's read of one
        // endpoint's large message must not wait for another endpoint's linger to end).
        for s in &self.lanes {
            let mut eng = lock(&s.engine);
            s.absorb(&mut eng);
            eng.say_goodbye(&unreported);
        }
        if !self.linger() {
            // The linger ran out (a peer did not read every large message, or the provider did
            // not take everything): the peers still owed a goodbye get it all the same (so they
            // do not report this process lost), given a moment to leave.
            for s in &self.lanes {
                lock(&s.engine).goodbye_anyway();
            }
            let until = Instant::now() + GOODBYE_GRACE;
            loop {
                let mut posted = true;
                for s in &self.lanes {
                    let mut eng = lock(&s.engine);
                    eng.linger_once();
                    posted &= eng.all_posted();
                }
                if posted || Instant::now() >= until {
                    break;
                }
                std::thread::yield_now();
            }
        }
        // What it accepted for sending and gives up on (the linger ran out, or the peer left or
        // was lost first) is never silent: one line on stderr, none when everything went, or
        // when the runtime ended the job (see `job_ending`).
        if self.job_ending.load(Ordering::Relaxed) {
            return;
        }
        let mut undelivered = Undelivered::default();
        for s in &self.lanes {
            lock(&s.engine).undelivered(&mut undelivered);
        }
        if let Some(line) = undelivered.line("charmrs-ofi", self.rank, self.cfg.linger) {
            eprintln!("{line}");
        }
    }
}

impl OfiLayer {
    /// The shutdown's linger: every endpoint moves its last sends on and serves its peers'
    /// reads, up to [`OfiConfig::linger`]; whether all of them finished.
    fn linger(&self) -> bool {
        let until = Instant::now() + self.cfg.linger;
        let mut done = vec![false; self.lanes.len()];
        loop {
            for (s, done) in self.lanes.iter().zip(done.iter_mut()) {
                if !*done {
                    *done = lock(&s.engine).linger_once();
                }
            }
            if done.iter().all(|d| *d) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::per_provider;
    use charmrs_transport::SingleProcessBootstrap;

    /// A layer of a one-process job over `provider` (run by `per_provider`: loopback only).
    fn one_process_layer(provider: &str) -> OfiLayer {
        let cfg = OfiConfig {
            provider: Some(provider.to_owned()),
            recv_buffers: 8,
            ..OfiConfig::default()
        };
        OfiLayer::new(Arc::new(SingleProcessBootstrap::new()), cfg).expect("one-process layer")
    }

    /// The tags of what one `progress` delivers.
    fn delivered(layer: &OfiLayer) -> Vec<u64> {
        let mut tags = Vec::new();
        layer
            .progress(&mut |_, m| tags.push(m.header().tag))
            .expect("progress");
        tags
    }

    #[test]
    fn a_message_taken_in_between_the_sleep_check_and_the_sleep_wakes_the_sleeper() {
        per_provider(
            "layer::tests::a_message_taken_in_between_the_sleep_check_and_the_sleep_wakes_the_sleeper",
            wakes_the_sleeper,
        );
    }

    fn wakes_the_sleeper(provider: &str) {
        let layer = one_process_layer(provider);
        let s = &layer.lanes[0];
        // The completion queue's descriptor, if the provider has one (`tcp;ofi_rxm`).
        let fd = s.wait_fd.unwrap_or(-1);
        // Nothing waits: the caller may sleep (and counts as sleeping from the check on).
        assert!(OfiLayer::prepare_sleep(s, fd));
        // Another thread's send to this process lands in the engine (it got the lock) before
        // the caller sleeps: it must find the caller counted and wake it.
        layer
            .send(0, Message::new(Header::new(1, 0, 0, 7)))
            .expect("send");
        let t0 = Instant::now();
        OfiLayer::sleep_prepared(s, fd, Duration::from_secs(30));
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "slept {:?} on a message that had arrived",
            t0.elapsed()
        );
        assert_eq!(s.sleeping.load(Ordering::SeqCst), 0);
        assert_eq!(delivered(&layer), [7]);
        // A check that finds work does not count the caller.
        layer
            .send(0, Message::new(Header::new(1, 0, 0, 8)))
            .expect("send");
        assert!(!OfiLayer::prepare_sleep(s, fd));
        assert_eq!(s.sleeping.load(Ordering::SeqCst), 0);
        assert_eq!(delivered(&layer), [8]);
    }

    #[test]
    fn dropping_an_empty_region_leaves_the_other_registrations_alone() {
        per_provider(
            "layer::tests::dropping_an_empty_region_leaves_the_other_registrations_alone",
            |provider| {
                let layer = one_process_layer(provider);
                let engine = &layer.lanes[0].engine;
                let next = lock(engine).next_key();
                lock(engine).rewind_keys(next);
                let empty = layer.register(Bytes::new()).expect("register nothing");
                // A provider that picks its keys (`FI_MR_PROV_KEY`) may give a registration the
                // number the engine's counter gave the empty region before: here the first one
                // asks for it (libfabric 1.17's shm and tcp honour the key asked for).
                lock(engine).rewind_keys(next);
                let regions: Vec<MemRegion> = (0..4u8)
                    .map(|i| layer.register(Bytes::from(vec![i; 64])).expect("register"))
                    .collect();
                assert_eq!(
                    lock(engine).regions.len(),
                    4,
                    "only the non-empty ones are kept"
                );
                drop(empty);
                for (i, r) in regions.iter().enumerate() {
                    layer
                        .get(0, r.key(), 2, i as u64)
                        .unwrap_or_else(|e| panic!("get of region {i}: {e}"));
                }
                let mut got = Vec::new();
                layer
                    .progress(&mut |_, m| {
                        let bytes: Vec<u8> = m.segments().iter().flat_map(|s| s.to_vec()).collect();
                        got.push((m.header().tag, bytes));
                    })
                    .expect("progress");
                let want: Vec<(u64, Vec<u8>)> =
                    (0..4u8).map(|i| (u64::from(i), vec![i; 64])).collect();
                assert_eq!(got, want);
                // An empty region reads as nothing, from its key alone.
                let empty = layer.register(Bytes::new()).expect("register nothing");
                layer.get(0, empty.key(), 2, 9).expect("get of nothing");
                let mut got = Vec::new();
                layer
                    .progress(&mut |_, m| got.push((m.header().tag, m.total_len())))
                    .expect("progress");
                assert_eq!(got, [(9, 0)]);
            },
        );
    }

    #[test]
    fn before_park_refuses_while_messages_wait_for_the_sink() {
        per_provider(
            "layer::tests::before_park_refuses_while_messages_wait_for_the_sink",
            |provider| {
                let layer = one_process_layer(provider);
                refuses_to_park(&layer);
                // With a wake-up hook (a watcher thread: `tcp;ofi_rxm` only) as well.
                if layer.set_wakeup(Box::new(|| {})) {
                    refuses_to_park(&layer);
                }
            },
        );
    }

    fn refuses_to_park(layer: &OfiLayer) {
        assert!(layer.before_park(), "nothing waits");
        // Sent to this process: taken into the engine at once, delivered by the next progress.
        layer
            .send(0, Message::new(Header::new(1, 0, 0, 9)))
            .expect("send");
        assert!(
            !layer.before_park(),
            "a message waits for the sink: the caller must not park"
        );
        assert_eq!(delivered(layer), [9]);
        assert!(layer.before_park());
    }
}
