//! The receive side of a layer: incoming connections are read by whichever
//! thread gets to them first — the thread calling `progress` (on that
//! thread, straight to its sink) or the layer's watcher thread (into a
//! parked queue that the next `progress` hands out first).
//!
//! # How input is noticed and read
//!
//! * After its handshake an incoming socket is made non-blocking and
//!   registered twice: level-triggered in the `data` epoll (what
//!   `progress_wait` sleeps in, and what [`poll`] asks "which sockets have
//!   input?" when there are more than [`DIRECT_MAX`]) and edge-triggered in
//!   the `watch` epoll.
//! * The *watcher* thread: while the poller polls it sleeps (*disarmed*),
//!   and every [`BUSY_CHECK`] reads ahead into `parked` ([`relieve`]) if
//!   nobody polled meanwhile; while the poller reads the sockets itself
//!   (idle polling) it looks less often, up to every [`BUSY_CHECK_MAX`], so
//!   a poller that stops polling then may wait up to about twice that. When the poller is about to park
//!   ([`before_park`]) it is *armed*: it blocks in the `watch` epoll, and
//!   on the first arrival (or hang-up) sets `arrived`, disarms and calls
//!   the wake-up hook (`TcpLayer::set_wakeup`).
//! * [`poll`] (called by `progress`) hands out `parked` first, then reads
//!   the sockets itself when forced (`progress_idle`: the poller has
//!   nothing else to do), when `arrived` is set, or on every
//!   [`SAFETY_EVERY`]-th call; otherwise it costs no system call, so a
//!   poller that is busy with other work pays one atomic load per call.
//!
//! Why: a poller spinning on its own core reads on its own thread, as a
//! busy-polling socket program does, and no other thread is woken per
//! arrival (on a machine whose cores all run pollers such a wake-up
//! preempts one of them: it tripled the small-message latency here); a
//! poller that is parked is woken; one busy in a long computation, or not
//! polling at all, finds its messages read ahead within a millisecond (up
//! to about twice [`BUSY_CHECK_MAX`] when it was idle-polling just
//! before), and its senders are not held up. The watcher does not read ahead when it
//! wakes a parked poller: it would only compete with the poller it woke
//! (a 1 MiB stream ran at 0.3× the bare socket in most runs with it, at
//! 1.0–1.7× without; see `docs/performance.md`).
//!
//! # Invariants
//!
//! * Everything read is hostile: frames are length-checked against
//!   `cfg.max_frame` before any allocation and decoded with the transport's
//!   checked codec; a malformed one drops that connection (logged to stderr
//!   with the peer, reported through `progress` as
//!   [`TransportError::Malformed`] naming the peer). Nothing here panics on
//!   input.
//! * Resumable: a connection's partial input (an incomplete frame prefix in
//!   `acc`, or a large frame's partly read payload in `big`) survives
//!   between polls; every *complete* packet read is acted on before a poll
//!   returns, so nothing complete waits in memory for socket readiness that
//!   will not come.
//! * One reader at a time: connection state and `parked` live behind
//!   `state`, taken with `try_lock` (a concurrent poll, or the watcher,
//!   skips the sockets rather than block); `parked` is handed out before
//!   anything read later. So per-connection, and thus per-pair, order is
//!   arrival order, each packet handed out once.
//! * A connection's end is reported in line after its last messages, and
//!   so is a loss of its peer found elsewhere while it was open (held in
//!   `Peer::incoming` until the end, see `Shared::report_loss`). The hold
//!   is bounded: once such a connection has been silent (nothing read,
//!   nothing unread, its end not arrived) for `cfg.loss_wait`, since the
//!   loss was found and since its last input, a read cuts it ([`cut_silent`]:
//!   deregistered and shut down both ways, its partial input dropped) and
//!   hands the report out in its place, so nothing read from it comes
//!   after the loss. The watcher has a read look when a cut comes due
//!   (`Shared::cut_due`, from the cut times the last such read left in
//!   `Shared::next_cut`: input on the held connection moves the next one
//!   later instead of asking for a read every turn). A connection whose end
//!   has arrived is read to it instead, however long that takes.
//! * Bounded memory, back-pressure by TCP: a poll reads at most
//!   [`POLL_BUDGET`] bytes and hands every message read to its sink; input
//!   is read into `parked` only by [`relieve`]: by the watcher only while
//!   `parked` is under `cfg.recv_queue_bytes` (past that, input stays in
//!   the kernel, TCP's window closes and the sender's `send` waits), by a
//!   send waiting for room in a full socket whatever `parked` holds (so that
//!   two processes sending to each other cannot both block forever).
//! * Fair: the connections share a read's budget in turn, each read
//!   starting at the next one, so a connection that always has input (a
//!   peer streaming large messages) cannot take every read's whole budget
//!   and leave another connection's messages unread.
//! * No input is left unread without a reader being told: a read stops
//!   only at "would block", after a short read (anything arriving later
//!   raises a new edge, so `arrived`), or at the budget (which sets
//!   `arrived` itself).
//! * A received frame is one buffer and its segments are [`Bytes`] views of
//!   it. Small frames go through one 64 KiB read buffer (one copy per read,
//!   amortised over the frames in it); the payload of a frame longer than
//!   that is read straight into its final buffer, recycled from the
//!   connection's previous large frame once the application dropped it.
//! * A registration is removed from both epolls before its socket is closed.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use charmrs_transport::pool::COPY_ALIGN;
use charmrs_transport::{
    decode_frame_bytes, peek_frame_len, peek_largest_segment_start, Message, ProcessId,
    TransportError,
};

use crate::poll::{Epoll, EventFd, InputState, Trigger};
use crate::shared::{cut_time, lock, Event, GetJob, Shared};
use crate::wire;

/// Size of a connection's read buffer, and the threshold above which a
/// frame's payload is read straight into its own buffer.
const CHUNK: usize = 64 * 1024;
/// Largest frame whose storage a connection holds until the next large
/// frame (see `Conn::last_large`).
const RECYCLE_MAX: usize = 64 << 20;
/// Up to this many connections, a poll tries each socket instead of asking
/// the `data` epoll which are readable.
pub(crate) const DIRECT_MAX: usize = 2;
/// Every this many calls a poll reads the sockets even if the watcher said
/// nothing (a cheap safety net; normally `arrived` says when to read).
pub(crate) const SAFETY_EVERY: u32 = 64;
/// Most bytes one [`poll`] reads (a larger frame is read over several). Small
/// enough that a stream of large frames is handed out (and its buffers
/// dropped and recycled) frame by frame: with 8 MiB a 1 MiB stream ran at
/// 0.5–1.2× the bare socket, with 2 MiB at 1.0–1.7×.
const POLL_BUDGET: usize = 2 << 20;
/// How often the watcher re-sends the wake-up while input waits untaken
/// (a safety net against a lost wake-up; normally one per arrival).
const SAFETY_WAKE: Duration = Duration::from_millis(5);
/// Token of the doorbell in the `data` epoll.
const BELL: u64 = 0;
/// Token of the stop signal in the `watch` and `standby` epolls.
const STOP: u64 = 0;
/// Token of the arming bell in the `standby` epoll.
const ARM: u64 = 1;
/// While disarmed, how soon the watcher first checks that someone polls (if
/// nobody did for a whole period, it reads ahead itself, and checks again
/// after this long).
const BUSY_CHECK: Duration = Duration::from_millis(1);
/// The longest period between those checks: it doubles each time the
/// poller was found reading the sockets itself. Each check wakes the watcher, on a core busy
/// with a PE; at a fixed 1 ms that preempted a spinning PE ~1 000 times a
/// second (8 B ping-pong, both processes).
const BUSY_CHECK_MAX: Duration = Duration::from_millis(16);

/// How a connection ended.
pub(crate) enum End {
    /// The peer said goodbye.
    Bye,
    /// The connection broke or closed without goodbye.
    Lost(String),
    /// The peer sent something that can never be valid.
    Malformed(String),
}

/// One authenticated incoming connection and its partial input.
pub(crate) struct Conn {
    /// Unique id (also its epoll token and its `Peer::incoming` id).
    id: u64,
    /// The sending process.
    peer: ProcessId,
    addr: SocketAddr,
    stream: TcpStream,
    /// Bytes read but not yet a complete packet.
    acc: BytesMut,
    /// A large packet being read straight into its own buffer: the buffer,
    /// the length it must reach, and the padding before the packet (which
    /// puts the frame's largest segment on a cache line).
    big: Option<(Vec<u8>, usize, usize)>,
    /// The previous large packet's storage, released just before the next
    /// large frame's buffer is allocated (see `pump`).
    last_large: Option<Bytes>,
    /// When input was last read from it, as far as a read that looked for
    /// held losses (`Shared::held_losses`) saw; else its adoption (see
    /// [`cut_silent`]).
    last_input: Instant,
}

/// Connection state, owned by whichever thread polls.
struct RecvState {
    conns: Vec<Conn>,
    /// Messages read by [`relieve`] (a blocked send), oldest first, for the
    /// next [`poll`]; and their frame bytes.
    parked: VecDeque<Event>,
    parked_bytes: usize,
    scratch: Vec<u8>,
    ready: Vec<u64>,
    /// Calls of [`poll`] (wrapping), for [`SAFETY_EVERY`].
    calls: u32,
    /// Reads of the connections (wrapping): where the next one starts
    /// ([`read_all`]).
    turn: usize,
}

/// The receive side's shared part (lives in [`Shared`]).
pub(crate) struct Receiver {
    /// Level-triggered: connections and the doorbell.
    pub(crate) data: Epoll,
    /// Edge-triggered: connections and `stop`.
    watch: Epoll,
    /// What a disarmed watcher sleeps in: `arm_bell` and `stop`.
    standby: Epoll,
    /// Rung by [`before_park`] to arm the watcher.
    arm_bell: EventFd,
    /// The watcher calls the wake-up hook on the next arrival (set by
    /// [`before_park`], cleared when it fires).
    armed: AtomicBool,
    /// Copy of `RecvState::calls` readable without the lock: the watcher
    /// sees whether anyone polls.
    polls: AtomicU32,
    /// Polls that read the sockets (a poll without `arrived` returns
    /// early, reading only every [`SAFETY_EVERY`]-th time): while this
    /// moves the watcher's checks back off, as the poller takes its input
    /// itself.
    reads: AtomicU32,
    /// Rung by `Shared::push` while a `progress_wait` sleeps in `data`.
    pub(crate) bell: EventFd,
    stop: EventFd,
    /// Threads sleeping in `data` (see `Shared::push`).
    pub(crate) waiting: AtomicUsize,
    /// Set by the watcher on input (also by a read stopped by its budget, by
    /// [`relieve`] when it parked something, and by [`adopt`]); cleared by
    /// every poll that reads the sockets, forced or not, before it reads.
    arrived: AtomicBool,
    /// The watcher runs (it tells polls when input came).
    watching: AtomicBool,
    /// Connections past their handshake, not yet taken over by a poll.
    adopt: Mutex<Vec<Conn>>,
    has_new: AtomicBool,
    /// `parked` is not empty (readable without the lock).
    has_parked: AtomicBool,
    state: Mutex<RecvState>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Receiver {
    /// Epolls and eventfds for a new layer.
    pub(crate) fn new() -> io::Result<Receiver> {
        let r = Receiver {
            data: Epoll::new()?,
            watch: Epoll::new()?,
            standby: Epoll::new()?,
            arm_bell: EventFd::new()?,
            armed: AtomicBool::new(false),
            polls: AtomicU32::new(0),
            reads: AtomicU32::new(0),
            bell: EventFd::new()?,
            stop: EventFd::new()?,
            waiting: AtomicUsize::new(0),
            arrived: AtomicBool::new(false),
            watching: AtomicBool::new(false),
            adopt: Mutex::new(Vec::new()),
            has_new: AtomicBool::new(false),
            has_parked: AtomicBool::new(false),
            state: Mutex::new(RecvState {
                conns: Vec::new(),
                parked: VecDeque::new(),
                parked_bytes: 0,
                scratch: vec![0u8; CHUNK],
                ready: Vec::new(),
                calls: 0,
                turn: 0,
            }),
            watcher: Mutex::new(None),
        };
        r.data.add(r.bell.as_fd(), BELL, Trigger::Level)?;
        r.watch.add(r.stop.as_fd(), STOP, Trigger::Level)?;
        r.standby.add(r.stop.as_fd(), STOP, Trigger::Level)?;
        r.standby.add(r.arm_bell.as_fd(), ARM, Trigger::Level)?;
        Ok(r)
    }
}

/// First token of a connection (0 is the doorbell / stop).
pub(crate) const FIRST_CONN_ID: u64 = 1;

/// Hands an authenticated connection from process `p` to the pollers:
/// non-blocking, registered in both epolls, queued for adoption; then wakes
/// whoever polls. On failure the caller refuses the connection.
pub(crate) fn adopt(
    shared: &Shared,
    p: ProcessId,
    id: u64,
    addr: SocketAddr,
    stream: TcpStream,
) -> Result<(), String> {
    let r = &shared.recv;
    stream
        .set_nonblocking(true)
        .map_err(|e| format!("non-blocking mode: {e}"))?;
    r.data
        .add(stream.as_fd(), id, Trigger::Level)
        .map_err(|e| format!("epoll registration: {e}"))?;
    if let Err(e) = r.watch.add(stream.as_fd(), id, Trigger::Edge) {
        let _ = r.data.delete(stream.as_fd());
        return Err(format!("epoll registration: {e}"));
    }
    lock(&r.adopt).push(Conn {
        id,
        peer: p,
        addr,
        stream,
        acc: BytesMut::with_capacity(CHUNK),
        big: None,
        last_large: None,
        last_input: Instant::now(),
    });
    r.has_new.store(true, Ordering::SeqCst);
    r.arrived.store(true, Ordering::SeqCst);
    shared.ring();
    Ok(())
}

/// Starts the watcher thread (once, at layer set-up).
pub(crate) fn start_watcher(shared: &Arc<Shared>) -> io::Result<()> {
    let r = &shared.recv;
    let mut slot = lock(&r.watcher);
    if slot.is_some() || shared.closing.load(Ordering::SeqCst) {
        return Ok(());
    }
    let s = Arc::clone(shared);
    *slot = Some(
        std::thread::Builder::new()
            .name(format!("charmrs-tcp-watch-in-{}", shared.rank))
            .spawn(move || watch(&s))?,
    );
    r.watching.store(true, Ordering::SeqCst);
    Ok(())
}

/// The poller is about to sleep until the wake-up hook is called: arms the
/// watcher. Returns `false` if input or events already wait (poll them
/// instead of sleeping).
pub(crate) fn before_park(shared: &Shared) -> bool {
    let r = &shared.recv;
    if !r.armed.swap(true, Ordering::SeqCst) {
        r.arm_bell.ring();
    }
    !input_waiting(r)
}

/// Whether the receive side knows of input a poll would hand out or should
/// read: parked messages, a new connection, or an arrival not yet read.
/// Each is set before the setter rings (`Shared::ring`), so a sleeper that
/// checks this after announcing itself (`waiting`, then a fence) either
/// sees it or is woken by the doorbell.
pub(crate) fn input_waiting(r: &Receiver) -> bool {
    r.arrived.load(Ordering::SeqCst)
        || r.has_parked.load(Ordering::SeqCst)
        || r.has_new.load(Ordering::SeqCst)
}

/// The watcher. *Disarmed* (while the poller polls) it sleeps in `standby`
/// and costs nothing per arrival: a thread woken on every arrival would take
/// a core from the spinning pollers, the very thing the poller's own reads
/// avoid. Every [`BUSY_CHECK`] (backing off to [`BUSY_CHECK_MAX`] while the
/// poller reads the sockets itself) it looks whether anyone polled; if nobody did
/// (the poller is busy in a long computation, or there is none), it reads
/// ahead into the parked queue ([`relieve`]), so a process that does not
/// poll for a while does not hold its senders up and serves remote reads.
///
/// *Armed* ([`before_park`]: the poller goes to sleep) it waits for input:
/// on the first arrival (or hang-up) it sets `arrived`, disarms and calls
/// the wake-up hook; the woken poller reads.
fn watch(shared: &Arc<Shared>) {
    let r = &shared.recv;
    let mut ready = Vec::new();
    let mut polls_seen = r.polls.load(Ordering::Relaxed);
    let mut reads_seen = r.reads.load(Ordering::Relaxed);
    let mut busy_check = BUSY_CHECK;
    loop {
        if shared.cut_due() {
            // A held loss may be handed out now, by cutting its silent
            // connection (`cut_silent`), which only a read does: have one.
            // (That read says when the next cut may come due; until one
            // reads, this asks again every turn.)
            r.arrived.store(true, Ordering::SeqCst);
            shared.ring();
        }
        if !r.armed.load(Ordering::SeqCst) {
            if let Err(e) = r.standby.wait(&mut ready, Some(busy_check)) {
                return watcher_failed(shared, &e);
            }
            if ready.contains(&STOP) {
                return;
            }
            r.arm_bell.drain();
            if !r.armed.load(Ordering::SeqCst) {
                let polls = r.polls.load(Ordering::Relaxed);
                let reads = r.reads.load(Ordering::Relaxed);
                if polls == polls_seen {
                    // Nobody polled for a whole period (relieve wakes the
                    // poller if it parked anything).
                    relieve(shared, true);
                    busy_check = BUSY_CHECK;
                } else if reads != reads_seen {
                    // The poller reads the sockets itself: look less often.
                    busy_check = (busy_check * 2).min(BUSY_CHECK_MAX);
                } else {
                    // It polls but reads only every SAFETY_EVERY-th time (busy with local
                    // work): keep looking every BUSY_CHECK, so that once its turns grow longer
                    // than that, input is read ahead for it within about that long.
                    busy_check = BUSY_CHECK;
                }
                polls_seen = polls;
                reads_seen = reads;
                continue;
            }
        }
        // After an armed phase the checks start again at BUSY_CHECK: the woken
        // poller may go straight into a long entry method, and its senders
        // should not wait for the backed-off interval. (Keeping the interval
        // across armings saved ~3 % of an 8 B ping-pong whose harness parks the
        // PEs ~100 times a second between repetitions: not worth it.)
        busy_check = BUSY_CHECK;
        if let Err(e) = r.watch.wait(&mut ready, Some(SAFETY_WAKE)) {
            return watcher_failed(shared, &e);
        }
        if ready.contains(&STOP) {
            return;
        }
        if !ready.is_empty() {
            r.arrived.store(true, Ordering::SeqCst);
            r.armed.store(false, Ordering::SeqCst);
            shared.wake();
        } else if r.arrived.load(Ordering::SeqCst) || r.has_parked.load(Ordering::SeqCst) {
            // Input untaken for a while: the poller is busy (then this is
            // harmless) or slept through a wake-up (then this saves it).
            shared.wake();
        }
    }
}

/// An epoll wait of the watcher failed (cannot happen with a valid epoll):
/// degrade to waking the poller every millisecond (which then reads on every
/// call) rather than let it sleep through input, until the layer closes.
fn watcher_failed(shared: &Shared, e: &io::Error) {
    eprintln!(
        "charmrs-tcp[rank {}]: input watcher failed ({e}); polling every millisecond",
        shared.rank
    );
    shared.recv.watching.store(false, Ordering::SeqCst);
    while !shared.closing.load(Ordering::SeqCst) {
        shared.wake();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stops the watcher and closes every connection (layer shutdown).
pub(crate) fn close_all(shared: &Shared) {
    let r = &shared.recv;
    r.stop.ring();
    let handle = lock(&r.watcher).take();
    if let Some(h) = handle {
        if h.thread().id() != std::thread::current().id() {
            let _ = h.join();
        }
    }
    let mut st = lock(&r.state);
    let pending = std::mem::take(&mut *lock(&r.adopt));
    for c in st.conns.drain(..).chain(pending) {
        // Shutting down: no report is due.
        let _ = forget(shared, &c);
    }
}

/// Deregisters and closes `c`, freeing its peer's incoming slot; returns
/// the loss report that waited for the connection's end, if one is due
/// (see `Shared::end_incoming`), for the caller to put in line.
#[must_use]
fn forget(shared: &Shared, c: &Conn) -> Option<Event> {
    let r = &shared.recv;
    let _ = r.data.delete(c.stream.as_fd());
    let _ = r.watch.delete(c.stream.as_fd());
    let held = shared.end_incoming(c.peer, c.id);
    let _ = c.stream.shutdown(Shutdown::Both);
    held
}

/// Takes the connection state if no other thread holds it.
fn try_state(r: &Receiver) -> Option<MutexGuard<'_, RecvState>> {
    match r.state.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Reads the incoming connections on the calling thread and hands every
/// complete message to `sink`, in line with the errors found while reading
/// (first what [`relieve`] parked); returns how many messages, the first
/// error in line (what follows it stays parked for the next call), or
/// `None` if another thread holds the connections.
/// `force` reads even when the watcher saw nothing (`progress_wait`,
/// shutdown, queued events). `sink` runs after the connection state is
/// released, so it may send (and a send that blocks may read, see
/// [`relieve`]).
pub(crate) fn poll(
    shared: &Arc<Shared>,
    sink: &mut dyn FnMut(ProcessId, Message),
    force: bool,
) -> Option<Result<usize, TransportError>> {
    let r = &shared.recv;
    let mut batch = {
        let mut st = try_state(r)?;
        let st = &mut *st;
        st.calls = st.calls.wrapping_add(1);
        r.polls.store(st.calls, Ordering::Relaxed);
        if r.has_new.load(Ordering::Acquire) {
            r.has_new.store(false, Ordering::SeqCst);
            st.conns.append(&mut lock(&r.adopt));
        }
        if st.conns.is_empty() && st.parked.is_empty() {
            // Nothing to read: an arrival flagged for a connection that has
            // ended since must not keep `before_park` and `progress_wait`
            // from sleeping.
            if r.arrived.load(Ordering::Acquire) {
                r.arrived.store(false, Ordering::SeqCst);
            }
            return Some(Ok(0));
        }
        if !force && st.parked.is_empty() && r.watching.load(Ordering::Relaxed) {
            // Load first: no read-modify-write of a line the watcher writes
            // unless it did write.
            let flagged =
                r.arrived.load(Ordering::Acquire) && r.arrived.swap(false, Ordering::AcqRel);
            if !(flagged || st.calls % SAFETY_EVERY == 0) {
                return Some(Ok(0));
            }
        }
        r.reads.store(
            r.reads.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        // This read takes whatever `arrived` announced (a forced read did not
        // clear it, and `before_park` then refused to park for ever while
        // the poller only idle-polled). Cleared before reading: input that
        // comes after the clear raises a new edge (the watcher sets the flag
        // again if armed), input before it is read now.
        if r.arrived.load(Ordering::Acquire) {
            r.arrived.store(false, Ordering::SeqCst);
        }
        // Parked events were read first: they go first.
        let mut batch = std::mem::take(&mut st.parked);
        st.parked_bytes = 0;
        r.has_parked.store(false, Ordering::SeqCst);
        read_all(shared, st, &mut |ev| batch.push_back(ev), POLL_BUDGET);
        batch
    };
    let mut n = 0;
    while let Some(ev) = batch.pop_front() {
        match ev {
            Event::Msg(p, m) => {
                sink(p, m);
                n += 1;
            }
            Event::Err(e) => {
                if !batch.is_empty() {
                    // What follows the error waits, ahead of anything
                    // parked meanwhile.
                    let mut st = lock(&r.state);
                    st.parked_bytes += batch.iter().map(event_bytes).sum::<usize>();
                    while let Some(ev) = batch.pop_back() {
                        st.parked.push_front(ev);
                    }
                    r.has_parked.store(true, Ordering::SeqCst);
                }
                return Some(Err(e));
            }
        }
    }
    Some(Ok(n))
}

/// Bytes an event counts against `cfg.recv_queue_bytes`.
fn event_bytes(ev: &Event) -> usize {
    match ev {
        Event::Msg(_, m) => m.frame_len(),
        Event::Err(_) => 0,
    }
}

/// Reads what the incoming connections have into the parked queue: for the
/// watcher (`bounded`), up to `cfg.recv_queue_bytes` parked; for a send that
/// found its socket full, all of it, so two processes sending to each other
/// at once cannot both block forever with full socket buffers (with a
/// bound, both would wait once both queues were full). Returns whether it
/// read anything; `None` if it could not read (another thread is reading,
/// or, `bounded`, the parked queue is full).
pub(crate) fn relieve(shared: &Arc<Shared>, bounded: bool) -> Option<bool> {
    let r = &shared.recv;
    let (read, any) = {
        let mut st = try_state(r)?;
        let st = &mut *st;
        if r.has_new.load(Ordering::Acquire) {
            r.has_new.store(false, Ordering::SeqCst);
            st.conns.append(&mut lock(&r.adopt));
        }
        let room = if bounded {
            shared.cfg.recv_queue_bytes.saturating_sub(st.parked_bytes)
        } else {
            usize::MAX
        };
        if room == 0 {
            return None;
        }
        if st.conns.is_empty() {
            return Some(false);
        }
        let mut parked = std::mem::take(&mut st.parked);
        let mut bytes = 0;
        let read = read_all(
            shared,
            st,
            &mut |ev| {
                bytes += event_bytes(&ev);
                parked.push_back(ev);
            },
            room,
        );
        let any = !parked.is_empty();
        st.parked = parked;
        st.parked_bytes += bytes;
        if any {
            r.has_parked.store(true, Ordering::SeqCst);
            r.arrived.store(true, Ordering::SeqCst);
        }
        (read, any)
    };
    if any {
        // Only now, with the state released: a poller woken earlier would
        // find it locked, return empty-handed and might go back to sleep
        // for good.
        shared.ring();
    }
    Some(read)
}

/// Reads the readable connections (all of them when there are at most
/// [`DIRECT_MAX`]), at most `budget` bytes, handing complete messages to
/// `out`; closes and reports connections that ended. Each call starts at
/// the next connection (or readable one) in turn: one that always has input
/// spends the whole budget only on the reads it starts. Returns whether any
/// byte was read or any connection ended.
fn read_all(
    shared: &Arc<Shared>,
    st: &mut RecvState,
    out: &mut dyn FnMut(Event),
    budget: usize,
) -> bool {
    let r = &shared.recv;
    let mut left = budget.max(1);
    let mut ended: Vec<(usize, End)> = Vec::new();
    let turn = st.turn;
    st.turn = st.turn.wrapping_add(1);
    // While a loss is held for a connection's end, note when each connection
    // last had input (for `cut_silent`); otherwise this costs one load.
    let now = (shared.held_losses.load(Ordering::Acquire) > 0).then(Instant::now);
    let mut pump = |c: &mut Conn, scratch: &mut [u8], left: &mut usize| {
        let before = *left;
        let res = c.pump(shared, scratch, left, out);
        if let Some(now) = now {
            if *left < before {
                c.last_input = now;
            }
        }
        res
    };
    if st.conns.len() <= DIRECT_MAX {
        let n = st.conns.len();
        for k in 0..n {
            let i = (turn % n + k) % n;
            if let Err(end) = pump(&mut st.conns[i], &mut st.scratch, &mut left) {
                ended.push((i, end));
            }
        }
    } else {
        if let Err(e) = r.data.wait(&mut st.ready, Some(Duration::ZERO)) {
            eprintln!("charmrs-tcp[rank {}]: epoll_wait: {e}", shared.rank);
        }
        let n = st.ready.len();
        for k in 0..n {
            let token = st.ready[(turn % n + k) % n];
            let Some(i) = st.conns.iter().position(|c| c.id == token) else {
                continue; // the doorbell, or a connection not adopted yet
            };
            if let Err(end) = pump(&mut st.conns[i], &mut st.scratch, &mut left) {
                ended.push((i, end));
            }
        }
    }
    let mut any = left < budget.max(1) || !ended.is_empty();
    if left == 0 {
        // Stopped by the budget: input may be left in a socket, and no new
        // arrival may come to say so (the sender may be waiting for room).
        // The next poll must read.
        r.arrived.store(true, Ordering::SeqCst);
    }
    // Remove the highest index first, so the lower ones stay valid.
    ended.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    for (i, end) in ended {
        let c = st.conns.swap_remove(i);
        // Report first, then close: whatever the peer does once it sees
        // the close is queued after this report.
        if !shared.closing.load(Ordering::SeqCst) {
            if let Some(ev) = report_end(shared, c.peer, c.addr, end) {
                out(ev);
            }
        }
        // A loss of the peer found on our stream to it waited for this end:
        // it comes after everything read from the connection.
        if let Some(ev) = forget(shared, &c) {
            out(ev);
        }
    }
    if let Some(now) = now {
        any |= cut_silent(shared, st, now, out);
    }
    any
}

/// Cuts every connection whose peer's loss is held for its end (see
/// `Shared::report_loss`) and that has stayed silent past the hold's bound:
/// `cfg.loss_wait` since the loss was found and since its last input,
/// nothing unread and its end not arrived (a silent host, which never
/// acknowledges our FIN, or a stopped process). Each is deregistered and
/// shut down both ways at this point of its input (a partial packet is
/// dropped, and nothing arriving later is read), and its held report goes
/// to `out`, after everything read from it. A connection whose end has
/// arrived is left to be read to it (the hold then waits for that end);
/// one with unread input is looked at again by a later read. Then tells
/// the watcher when the next cut may come due (`Shared::next_cut`: the
/// earliest cut time of the connections left, already past for one with
/// unread input). Returns whether it cut any.
fn cut_silent(
    shared: &Shared,
    st: &mut RecvState,
    now: Instant,
    out: &mut dyn FnMut(Event),
) -> bool {
    let wait = shared.cfg.loss_wait;
    // Before any `cut_at` is read: a hold made while this looks is not lost.
    let snapshot = shared.next_cut.snapshot();
    let mut next: Option<Instant> = None;
    let mut cut = false;
    // From the end, so `swap_remove` moves only connections already seen.
    for i in (0..st.conns.len()).rev() {
        let c = &st.conns[i];
        let Some(due) = cut_time(shared.cut_at(c.peer, c.id), c.last_input, wait) else {
            continue;
        };
        if now < due {
            next = Some(next.map_or(due, |t| t.min(due)));
            continue;
        }
        match crate::poll::input_state(c.stream.as_fd()) {
            InputState::Ended => shared.await_end(c.peer, c.id),
            // Due still: the next read (which the watcher asks for) takes
            // that input, or finds the connection quiet.
            InputState::Unread => next = Some(next.map_or(due, |t| t.min(due))),
            InputState::Quiet => {
                let c = st.conns.swap_remove(i);
                if let Some(ev) = forget(shared, &c) {
                    out(ev);
                }
                cut = true;
            }
        }
    }
    // (A hold on a connection not adopted yet is not seen here; its
    // adoption has the next read, which sees it.)
    shared.next_cut.set(snapshot, next);
    cut
}

/// What to report about how an incoming connection ended (in line, after
/// the messages read before the end).
fn report_end(shared: &Shared, p: ProcessId, addr: SocketAddr, end: End) -> Option<Event> {
    match end {
        End::Bye => {
            shared.depart(p);
            None
        }
        End::Lost(why) => {
            shared.lose_report(p, format!("connection from process {p} ({addr}): {why}"))
        }
        End::Malformed(why) => {
            shared
                .counters
                .frames_rejected
                .fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "charmrs-tcp[rank {}]: dropped the connection from process {p} ({addr}): malformed frame: {why}",
                shared.rank
            );
            Some(Event::Err(TransportError::Malformed(format!(
                "process {p} ({addr}) sent a malformed frame ({why}); its connection was dropped"
            ))))
        }
    }
}

impl Conn {
    /// Reads what the socket has (while `budget` lasts) and acts on every
    /// complete packet, handing messages to `out`. `Err` when the connection
    /// ended (after the messages before the end were handed out).
    fn pump(
        &mut self,
        shared: &Arc<Shared>,
        scratch: &mut [u8],
        budget: &mut usize,
        out: &mut dyn FnMut(Event),
    ) -> Result<(), End> {
        let mut drained = false;
        loop {
            if let Some((mut buf, needed, pad)) = self.big.take() {
                // Payload of a large frame (its length is exact: the prefix
                // was complete), read straight into the frame's own buffer;
                // `read_to_end` fills spare capacity without zeroing it and
                // keeps what it read when the socket runs dry.
                let before = buf.len();
                let want = ((needed - before).min(*budget)) as u64;
                let res = (&self.stream).take(want).read_to_end(&mut buf);
                *budget = budget.saturating_sub(buf.len() - before);
                match res {
                    Ok(_) if buf.len() == needed => {
                        let whole = Bytes::from(buf);
                        if needed <= RECYCLE_MAX {
                            self.last_large = Some(whole.clone());
                        }
                        let packet = whole.slice(pad..);
                        handle_packet(shared, self.peer, packet[0], &packet.slice(1..), out)?;
                        // It stopped at the frame's end, not at "no more
                        // input": whatever an earlier short read suggested,
                        // the socket may hold more, and its arrival was
                        // already signalled. Read on.
                        drained = false;
                        continue;
                    }
                    Ok(_) if buf.len() - before < want as usize => {
                        return Err(End::Lost(
                            "connection closed in the middle of a frame".to_owned(),
                        ));
                    }
                    Ok(_) => {
                        // Budget spent mid-frame: resume on the next poll.
                        self.big = Some((buf, needed, pad));
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.big = Some((buf, needed, pad));
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        self.big = Some((buf, needed, pad));
                        continue;
                    }
                    Err(e) => return Err(End::Lost(e.to_string())),
                }
            }
            // Act on every complete packet in `acc`; learn how many bytes
            // the next one needs.
            let needed = self.act_on_complete(shared, out)?;
            if needed > self.acc.len() + CHUNK {
                // Release the previous large frame's storage (freed if the
                // application dropped every view of it) right before the
                // allocation, on this thread: the allocator then hands the
                // same memory back. (Taking the storage back explicitly,
                // `Bytes::try_into_mut`, streamed 1 MiB frames at half the
                // speed: docs/performance.md, session 14.)
                drop(self.last_large.take());
                let mut buf = Vec::with_capacity(needed + COPY_ALIGN);
                // `acc` holds the frame's prefix: pad so that the largest
                // segment lands on a cache line (`COPY_ALIGN`, so numbers in it
                // can be read in place: `charmrs::PodVec`) (the packet type byte comes
                // before the frame).
                let pad = peek_largest_segment_start(&self.acc[1..]).map_or(0, |start| {
                    (buf.as_ptr() as usize + 1 + start).wrapping_neg() & (COPY_ALIGN - 1)
                });
                buf.resize(pad, 0);
                buf.extend_from_slice(&self.acc);
                self.acc.clear();
                self.big = Some((buf, pad + needed, pad));
                continue;
            }
            if drained || *budget == 0 {
                return Ok(());
            }
            let take = scratch.len().min(*budget);
            match (&self.stream).read(&mut scratch[..take]) {
                Ok(0) if self.acc.is_empty() => {
                    return Err(End::Lost("connection closed by the peer".to_owned()))
                }
                Ok(0) => {
                    return Err(End::Lost(
                        "connection closed in the middle of a frame".to_owned(),
                    ))
                }
                Ok(k) => {
                    *budget -= k;
                    self.acc.extend_from_slice(&scratch[..k]);
                    // A short read has (most likely) drained the socket: act
                    // on what came, then stop, saving the system call that
                    // would only say "nothing more". Level-triggered
                    // readiness and the next poll pick up anything that raced
                    // in.
                    drained = k < take;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Lost(e.to_string())),
            }
        }
    }

    /// Acts on every complete packet in `acc`, handing messages to `out`;
    /// returns how many bytes the next packet needs (1 when `acc` is empty:
    /// its type byte).
    fn act_on_complete(
        &mut self,
        shared: &Arc<Shared>,
        out: &mut dyn FnMut(Event),
    ) -> Result<usize, End> {
        loop {
            let Some(&ty) = self.acc.first() else {
                return Ok(1);
            };
            if ty == wire::PKT_BYE {
                return Err(End::Bye);
            }
            if ty > wire::PKT_ABORT {
                return Err(End::Malformed(format!("unknown packet type {ty}")));
            }
            match peek_frame_len(&self.acc[1..], shared.cfg.max_frame) {
                Ok(len) => {
                    let packet = self.acc.split_to(1 + len).freeze();
                    handle_packet(shared, self.peer, ty, &packet.slice(1..), out)?;
                }
                Err(TransportError::Truncated { needed, .. }) => return Ok(1 + needed),
                Err(e) => return Err(End::Malformed(e.to_string())),
            }
        }
    }
}

/// Decodes one complete packet (type `ty`, `frame` = its transport frame)
/// and acts on it; a message goes to `out`.
fn handle_packet(
    shared: &Arc<Shared>,
    p: ProcessId,
    ty: u8,
    frame: &Bytes,
    out: &mut dyn FnMut(Event),
) -> Result<(), End> {
    let (msg, _) = decode_frame_bytes(frame, shared.cfg.max_frame)
        .map_err(|e| End::Malformed(e.to_string()))?;
    match ty {
        wire::PKT_DATA | wire::PKT_GET_RESP => {
            shared.count_received(&msg);
            out(Event::Msg(p, msg));
        }
        wire::PKT_GET_REQ => {
            let seg = match msg.segments() {
                [seg] if seg.len() == 24 => seg,
                _ => return Err(End::Malformed("bad remote-read request".to_owned())),
            };
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&seg[i * 8..i * 8 + 8]);
                u64::from_le_bytes(w)
            };
            shared.enqueue_get(GetJob {
                from: p,
                kind: msg.header().kind,
                tag: msg.header().tag,
                region: word(0),
                len: word(1),
                nonce: word(2),
            });
        }
        wire::PKT_GET_ERR => {
            let why = msg
                .segments()
                .first()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .unwrap_or_default();
            out(Event::Err(TransportError::Malformed(format!(
                "remote read from process {p} (completion kind {}, tag {}) failed: {why}",
                msg.header().kind,
                msg.header().tag
            ))));
        }
        wire::PKT_ABORT => {
            let why = msg
                .segments()
                .first()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .unwrap_or_default();
            if let Some(ev) = shared.lose_report(p, format!("process {p} aborted the job: {why}")) {
                out(ev);
            }
        }
        _ => return Err(End::Malformed(format!("unknown packet type {ty}"))),
    }
    Ok(())
}
