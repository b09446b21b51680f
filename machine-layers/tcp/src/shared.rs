//! State shared by a [`TcpLayer`](crate::TcpLayer) and its background
//! threads, and the operations they all use: writing packets (with lazy
//! connection set-up), queueing arrivals, reporting lost peers.
//!
//! # Invariants
//!
//! * `peers[p].out` holds the only data stream to `p`; it is written under
//!   its mutex only, whole packets at a time, so packets never interleave
//!   and per-pair order is the order of `send` calls.
//! * A failure to connect or write marks the peer lost while its `out` is
//!   still held (the report is queued after), so no other sender finds the
//!   stream gone and the peer not yet lost, and connects again.
//! * A peer's `lost` reason is set at most once and never cleared: every
//!   later send to it fails with that reason. A `PeerLost` event is made
//!   for it at most once (`reported`), and never for a peer that said
//!   goodbye (`departed`) or while this layer shuts down (`closing`). It
//!   comes after the peer's last messages: in line with its incoming
//!   connection's input when found there, else queued, but only once that
//!   connection (if one is open) has ended (`Incoming::held_loss`). That
//!   wait is bounded: a held loss whose connection stays open and silent
//!   for `cfg.loss_wait` is handed out by the receive side, which cuts the
//!   connection at that point of its input (`Incoming::cut_at`), so a host
//!   that went silent is reported within `cfg.loss_wait` of the loss being
//!   found, not at the kernel's retransmission limit. `held_losses` counts
//!   the held reports (so the receive side and the watcher look for due
//!   cuts only while there are any), and `next_cut` says when the earliest
//!   cut may come due: never later than any held loss's real cut time
//!   ([`cut_time`]), so the watcher, which has a read look once it has
//!   passed, misses none; set exactly by every read that looks for cuts,
//!   it is earlier only until the next such read (after a new hold, or one
//!   that ended meanwhile).
//! * The event queue (`tx`) carries only what does not come off a socket
//!   in order: messages to oneself, local remote-read completions, and
//!   errors to report. Socket input is read and handed out by
//!   [`crate::recv::poll`] on the polling thread.
//! * `push` rings the receive side's doorbell whenever a `progress_wait`
//!   may be sleeping (`recv.waiting`, checked after the push with a full
//!   fence), so a sleeper never misses an event.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_transport::kv::{ct_eq, JobSecret};
use charmrs_transport::{encode_frame_prefix, Header, Message, ProcessId, TransportError};
use crossbeam_channel::Sender;

use crate::wire::{self, ACK_MAGIC, HELLO_LEN, HELLO_MAGIC, PKT_GET_ERR, PKT_GET_RESP};
use crate::TcpConfig;

/// Locks a mutex, ignoring poisoning: everything behind these locks is
/// plain data or a socket, valid whatever a panicking holder was doing.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the event queue (and the receive side's parked queue) carries to
/// `progress`.
pub(crate) enum Event {
    /// A message from a process (oneself, or a local read completion).
    Msg(ProcessId, Message),
    /// An error to report once through `progress`.
    Err(TransportError),
}

/// Per-peer connection state.
pub(crate) struct Peer {
    /// The peer's published listening address.
    pub(crate) addr: SocketAddr,
    /// Our data stream to the peer, made on first use.
    pub(crate) out: Mutex<Option<TcpStream>>,
    /// A clone of `out`'s socket, to shut it down without taking `out`
    /// (which a blocked writer may hold), with the id of that connection
    /// (its watcher shuts down only its own).
    pub(crate) out_ctl: Mutex<Option<(u64, TcpStream)>>,
    /// Why the peer is unusable, once it is.
    pub(crate) lost: Mutex<Option<String>>,
    /// A `PeerLost` event was made (queued, held, or put in line).
    pub(crate) reported: AtomicBool,
    /// The peer shut its layer down cleanly.
    pub(crate) departed: AtomicBool,
    /// The live incoming connection from the peer, and a loss report
    /// waiting for its end.
    pub(crate) incoming: Mutex<Incoming>,
}

/// A peer's incoming connection (see [`Peer::incoming`]).
#[derive(Default)]
pub(crate) struct Incoming {
    /// The live connection: `(id, socket clone)`.
    pub(crate) conn: Option<(u64, TcpStream)>,
    /// The peer's loss, found elsewhere (on our stream to it) while this
    /// connection was open: reported when the connection ends, after
    /// everything read from it ([`Shared::end_incoming`]).
    pub(crate) held_loss: Option<Event>,
    /// With `held_loss`: from when the receive side may cut the connection
    /// (if it has been silent for `cfg.loss_wait`) and hand the report out
    /// without waiting for the end any longer; `None` once the end is known
    /// to have arrived (then the connection is read to it).
    pub(crate) cut_at: Option<Instant>,
}

/// A remote read to serve (see `wire::PKT_GET_REQ`).
pub(crate) struct GetJob {
    pub(crate) from: ProcessId,
    pub(crate) kind: u8,
    pub(crate) tag: u64,
    pub(crate) region: u64,
    pub(crate) len: u64,
    pub(crate) nonce: u64,
}

/// Counters behind [`TcpStats`](crate::TcpStats).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) messages_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) messages_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) connections_opened: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) frames_rejected: AtomicU64,
}

/// Everything a layer's threads share.
pub(crate) struct Shared {
    pub(crate) rank: ProcessId,
    pub(crate) size: u32,
    pub(crate) secret: JobSecret,
    pub(crate) cfg: TcpConfig,
    pub(crate) listen: SocketAddr,
    pub(crate) peers: Vec<Peer>,
    pub(crate) tx: Sender<Event>,
    /// The receive side: incoming connections and their readiness.
    pub(crate) recv: crate::recv::Receiver,
    pub(crate) regions: Mutex<HashMap<u64, Bytes>>,
    pub(crate) next_region: AtomicU64,
    /// Random per-layer value in every remote key, so keys of another
    /// layer instance (or job) are refused.
    pub(crate) nonce: u64,
    pub(crate) closing: AtomicBool,
    pub(crate) wakeup: OnceLock<Box<dyn Fn() + Send + Sync>>,
    pub(crate) responder: Mutex<Option<Sender<GetJob>>>,
    /// Live outgoing-connection watcher threads (Drop waits for them to
    /// see the peer close, up to `cfg.linger`).
    pub(crate) watchers: Mutex<usize>,
    pub(crate) watchers_cv: Condvar,
    /// Ids of connections: incoming ones (also their epoll tokens) and
    /// outgoing ones (`Peer::out_ctl`).
    pub(crate) next_conn: AtomicU64,
    pub(crate) pending: AtomicUsize,
    pub(crate) counters: Counters,
    /// Loss reports held in `Peer::incoming` (see `Incoming::cut_at`).
    pub(crate) held_losses: AtomicUsize,
    /// When the earliest of those may be handed out by a cut (see
    /// [`Shared::cut_due`]).
    pub(crate) next_cut: NextCut,
}

/// When a held loss's silent connection may be cut: `loss_wait` after the
/// loss was found (`cut_at`, `None` once the connection's end is known to
/// have arrived) and after its last input; `None` for never (no cut is
/// planned, or a `loss_wait` too long for the clock).
pub(crate) fn cut_time(
    cut_at: Option<Instant>,
    last_input: Instant,
    loss_wait: Duration,
) -> Option<Instant> {
    Some(cut_at?.max(last_input.checked_add(loss_wait)?))
}

/// The earliest time a held loss may be handed out by a cut, readable
/// without a lock (for the watcher, which looks every turn). A lower bound:
/// a new hold lowers it to its `cut_at` ([`NextCut::lower`]); each read
/// that looks for due cuts sets it to the exact earliest [`cut_time`] of
/// its connections ([`NextCut::set`]), which only input moves later. So
/// the watcher has a read look once when a cut may be due, and again only
/// when one is due indeed (or a connection with a held loss still waits to
/// be read), not on every turn while a held connection has input.
pub(crate) struct NextCut {
    /// What the nanosecond counts are counted from.
    epoch: Instant,
    /// Nanoseconds from `epoch`; `u64::MAX` for never.
    at: AtomicU64,
    /// Bumped by every [`NextCut::lower`], so that a [`NextCut::set`]
    /// computed without seeing that hold does not undo it.
    lowered: AtomicU64,
}

impl NextCut {
    pub(crate) fn new() -> NextCut {
        NextCut {
            epoch: Instant::now(),
            at: AtomicU64::new(u64::MAX),
            lowered: AtomicU64::new(0),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        let n = t.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(n).map_or(u64::MAX - 1, |n| n.min(u64::MAX - 1))
    }

    /// A loss is held from now on, its cut planned for `t` (called after
    /// `Incoming::cut_at` is set).
    pub(crate) fn lower(&self, t: Instant) {
        self.lowered.fetch_add(1, Ordering::SeqCst);
        self.at.fetch_min(self.nanos(t), Ordering::SeqCst);
    }

    /// Taken before a read reads the held losses' `cut_at`s, for
    /// [`NextCut::set`].
    pub(crate) fn snapshot(&self) -> u64 {
        self.lowered.load(Ordering::SeqCst)
    }

    /// The earliest cut time of the held losses, as a read computed it
    /// (`None`: none planned) after taking `snapshot`. A hold made meanwhile
    /// that it may have missed makes it "due now" instead (one read more,
    /// which computes it again).
    pub(crate) fn set(&self, snapshot: u64, earliest: Option<Instant>) {
        self.at.store(
            earliest.map_or(u64::MAX, |t| self.nanos(t)),
            Ordering::SeqCst,
        );
        if self.lowered.load(Ordering::SeqCst) != snapshot {
            self.at.store(0, Ordering::SeqCst);
        }
    }

    /// Whether a cut may be due at `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        let at = self.at.load(Ordering::SeqCst);
        at != u64::MAX && self.nanos(now) >= at
    }
}

/// Largest number of buffers handed to one vectored write.
const IOV_BATCH: usize = 64;

/// Writes `bufs` completely to `s` with non-blocking vectored writes (no
/// concatenation), resuming after short writes. While the socket is full it
/// reads the incoming connections ([`crate::recv::relieve`]) so that two
/// processes sending to each other at once always progress, then sleeps
/// until the socket drains (or input arrives).
pub(crate) fn write_all_vectored(
    shared: &Arc<Shared>,
    s: &TcpStream,
    bufs: &[&[u8]],
) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < bufs.len() {
        let mut iov = [IoSlice::new(&[]); IOV_BATCH];
        let mut n_iov = 0;
        for (k, b) in bufs[idx..].iter().take(IOV_BATCH).enumerate() {
            iov[k] = IoSlice::new(if k == 0 { &b[off..] } else { b });
            n_iov += 1;
        }
        let mut n = match crate::poll::send_nowait(s.as_fd(), &iov[..n_iov]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match crate::recv::relieve(shared, false) {
                    // Could read: also wake when more input comes.
                    Some(_) => crate::poll::wait_writable(
                        s.as_fd(),
                        Some(shared.recv.data.as_fd()),
                        Duration::from_millis(10),
                    )?,
                    // Another thread reads: wait for room, looking again
                    // every millisecond.
                    None => crate::poll::wait_writable(s.as_fd(), None, Duration::from_millis(1))?,
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        while n > 0 {
            let rest = bufs[idx].len() - off;
            if n >= rest {
                n -= rest;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        // Skip empty buffers so the loop ends.
        while idx < bufs.len() && bufs[idx].len() == off {
            idx += 1;
            off = 0;
        }
    }
    Ok(())
}

/// Writes one packet: type byte, frame prefix, then each segment as its own
/// buffer (zero-copy).
pub(crate) fn write_packet(
    shared: &Arc<Shared>,
    s: &TcpStream,
    ty: u8,
    msg: &Message,
) -> io::Result<()> {
    let prefix = encode_frame_prefix(msg);
    let ty = [ty];
    let segs = msg.segments();
    // The usual few segments: the buffer list on the stack (no allocation).
    const ON_STACK: usize = 16;
    if segs.len() + 2 <= ON_STACK {
        let mut bufs: [&[u8]; ON_STACK] = [&[]; ON_STACK];
        bufs[0] = &ty;
        bufs[1] = &prefix;
        for (slot, seg) in bufs[2..].iter_mut().zip(segs) {
            *slot = seg;
        }
        return write_all_vectored(shared, s, &bufs[..segs.len() + 2]);
    }
    let mut bufs: Vec<&[u8]> = Vec::with_capacity(2 + segs.len());
    bufs.push(&ty);
    bufs.push(&prefix);
    bufs.extend(segs.iter().map(|b| &b[..]));
    write_all_vectored(shared, s, &bufs)
}

/// Writes the one-byte goodbye `byte` to `s` without blocking in the write
/// (the `out` streams are blocking sockets): waits for room until
/// `deadline` if the socket is full, then gives up. Returns whether the
/// byte was written.
pub(crate) fn say_goodbye(s: &TcpStream, byte: u8, deadline: std::time::Instant) -> bool {
    let buf = [byte];
    loop {
        match crate::poll::send_nowait(s.as_fd(), &[IoSlice::new(&buf)]) {
            Ok(n) => return n == 1,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = std::time::Instant::now();
                if now >= deadline
                    || crate::poll::wait_writable(s.as_fd(), None, deadline - now).is_err()
                {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

impl Shared {
    /// Calls the wake-up hook, if any.
    pub(crate) fn wake(&self) {
        if let Some(w) = self.wakeup.get() {
            w();
        }
    }

    /// Tells whoever polls that there is something to pick up: rings the
    /// doorbell if a `progress_wait` sleeps, and calls the wake-up hook.
    pub(crate) fn ring(&self) {
        // Pairs with the fence in `progress_wait` between raising `waiting`
        // and checking the queue: one of the two sides sees the other.
        fence(Ordering::SeqCst);
        if self.recv.waiting.load(Ordering::SeqCst) > 0 {
            self.recv.bell.ring();
        }
        self.wake();
    }

    /// Queues an event for `progress`.
    pub(crate) fn push(&self, ev: Event) {
        // The receiver lives in the layer; once it is gone nobody listens.
        let _ = self.tx.send(ev);
        self.ring();
    }

    /// Counts a message received from a socket.
    pub(crate) fn count_received(&self, msg: &Message) {
        self.counters
            .messages_received
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_received
            .fetch_add(msg.frame_len() as u64, Ordering::Relaxed);
    }

    /// The reason `p` is unusable, if it is.
    pub(crate) fn lost_reason(&self, p: ProcessId) -> Option<String> {
        lock(&self.peers[p as usize].lost).clone()
    }

    /// Marks `p` lost (first reason wins) and reports it once through
    /// `progress`, unless it departed cleanly or we are shutting down:
    /// behind `p`'s last messages (see [`Shared::report_loss`]).
    pub(crate) fn lose(&self, p: ProcessId, reason: String) {
        self.report_loss(p, self.lose_report(p, reason));
    }

    /// Queues a loss report of `p` made by [`Shared::lose_report`], if one
    /// is due. While `p`'s incoming connection is open the report waits
    /// for its end instead (the receive side then hands it out in line,
    /// after everything read from it: a peer found dead on our stream to it
    /// may still have megabytes of its last messages in the other one), and
    /// our side of that connection is shut for writing, so that a peer
    /// still alive finds its stream to us closed, stops sending and closes
    /// it, which ends the wait.
    ///
    /// A peer that does neither (its host went silent: our FIN is never
    /// acknowledged, and Linux sends no keepalive probe behind it, so the
    /// connection would end only at the retransmission limit, ~15 minutes;
    /// or the process is stopped) must not hold the report that long: past
    /// `cut_at` (`cfg.loss_wait` from now) the receive side cuts the
    /// connection once it has been silent that long and hands the report
    /// out (`recv::read_all`).
    fn report_loss(&self, p: ProcessId, report: Option<Event>) {
        let Some(ev) = report else {
            return;
        };
        {
            let mut inc = lock(&self.peers[p as usize].incoming);
            if let Some((_, s)) = &inc.conn {
                let _ = s.shutdown(Shutdown::Write);
                if inc.held_loss.replace(ev).is_none() {
                    self.held_losses.fetch_add(1, Ordering::SeqCst);
                }
                // (A `loss_wait` too long for the clock waits for the end.)
                inc.cut_at = Instant::now().checked_add(self.cfg.loss_wait);
                if let Some(t) = inc.cut_at {
                    self.next_cut.lower(t);
                }
                return;
            }
        }
        self.push(ev);
    }

    /// When the loss held for `p`'s incoming connection `id` may be handed
    /// out without waiting for the connection's end (see
    /// [`Shared::report_loss`]); `None` if none is held for it, or its end
    /// is known to have arrived.
    pub(crate) fn cut_at(&self, p: ProcessId, id: u64) -> Option<Instant> {
        let inc = lock(&self.peers[p as usize].incoming);
        match &inc.conn {
            Some((cid, _)) if *cid == id && inc.held_loss.is_some() => inc.cut_at,
            _ => None,
        }
    }

    /// The end of `p`'s incoming connection `id` has arrived: the loss held
    /// for it waits for that end (it is read to it) rather than cut it.
    pub(crate) fn await_end(&self, p: ProcessId, id: u64) {
        let mut inc = lock(&self.peers[p as usize].incoming);
        if matches!(&inc.conn, Some((cid, _)) if *cid == id) {
            inc.cut_at = None;
        }
    }

    /// Whether a held loss may be handed out by a cut now (for the watcher,
    /// which then has a read look): its [`cut_time`], past `loss_wait`
    /// since the loss was found and since its connection's last input, has
    /// come (see [`NextCut`]). Two atomic loads, no lock.
    pub(crate) fn cut_due(&self) -> bool {
        self.held_losses.load(Ordering::SeqCst) > 0 && self.next_cut.due(Instant::now())
    }

    /// Frees `p`'s incoming slot if it still holds connection `id`, which
    /// ended (or never got going); returns the loss report held for that
    /// end, if one is still due (not if `p` departed cleanly since, nor
    /// while this layer shuts down). The caller puts it in line after the
    /// connection's last messages (or queues it).
    pub(crate) fn end_incoming(&self, p: ProcessId, id: u64) -> Option<Event> {
        let peer = &self.peers[p as usize];
        let held = {
            let mut inc = lock(&peer.incoming);
            if !matches!(&inc.conn, Some((cid, _)) if *cid == id) {
                return None;
            }
            inc.conn = None;
            inc.cut_at = None;
            let held = inc.held_loss.take();
            if held.is_some() {
                self.held_losses.fetch_sub(1, Ordering::SeqCst);
            }
            held
        };
        held.filter(|_| {
            !self.closing.load(Ordering::SeqCst) && !peer.departed.load(Ordering::SeqCst)
        })
    }

    /// Marks `p` lost like [`Shared::lose`], but returns the report (if one
    /// is due) instead of queueing it, for the receive side to put in line
    /// behind the messages read before the loss. The first time, our stream
    /// to `p` is shut down too: a send to `p` waiting for room in it (its host
    /// silent, nothing drains it) fails now, whichever connection the loss
    /// was found on, not when the kernel gives that stream up.
    pub(crate) fn lose_report(&self, p: ProcessId, reason: String) -> Option<Event> {
        let peer = &self.peers[p as usize];
        let reason = {
            let mut l = lock(&peer.lost);
            l.get_or_insert(reason).clone()
        };
        if self.closing.load(Ordering::SeqCst) || peer.departed.load(Ordering::SeqCst) {
            return None;
        }
        if peer.reported.swap(true, Ordering::SeqCst) {
            return None;
        }
        if let Some((_, out)) = lock(&peer.out_ctl).as_ref() {
            let _ = out.shutdown(Shutdown::Both);
        }
        Some(Event::Err(TransportError::PeerLost { process: p, reason }))
    }

    /// Records that `p` shut its layer down cleanly: later sends to it fail,
    /// but nothing is reported.
    pub(crate) fn depart(&self, p: ProcessId) {
        let peer = &self.peers[p as usize];
        peer.departed.store(true, Ordering::SeqCst);
        lock(&peer.lost).get_or_insert_with(|| format!("process {p} shut its machine layer down"));
    }

    /// Sends one packet to `dst` (not ourselves), connecting first if
    /// needed. With `wait == false` gives up (`Ok(false)`) instead of
    /// waiting for a busy connection. Failures mark the peer lost.
    pub(crate) fn send_packet(
        self: &Arc<Self>,
        dst: ProcessId,
        ty: u8,
        msg: &Message,
        wait: bool,
    ) -> Result<bool, TransportError> {
        let peer = &self.peers[dst as usize];
        let lost = |reason: String| TransportError::PeerLost {
            process: dst,
            reason,
        };
        if let Some(r) = self.lost_reason(dst) {
            return Err(lost(r));
        }
        let mut out = if wait {
            lock(&peer.out)
        } else {
            match peer.out.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            }
        };
        if out.is_none() {
            if let Some(r) = self.lost_reason(dst) {
                return Err(lost(r));
            }
            match self.connect(dst) {
                Ok(s) => *out = Some(s),
                Err(why) => {
                    // Marked lost before the stream is released: another
                    // sender must not find it free, the peer not yet lost,
                    // and connect again. Reported once it is released.
                    let report = self.lose_report(dst, why);
                    drop(out);
                    self.report_loss(dst, report);
                    return Err(lost(self.lost_reason(dst).unwrap_or_default()));
                }
            }
        }
        let Some(stream) = out.as_mut() else {
            return Err(lost("not connected".to_owned()));
        };
        match write_packet(self, stream, ty, msg) {
            Ok(()) => {
                self.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_sent
                    .fetch_add(msg.frame_len() as u64 + 1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                // Marked lost before the stream is closed and released (as
                // above; and so this reason, not the one the watcher finds
                // once the stream is shut, is the one reported).
                let report = self.lose_report(
                    dst,
                    format!("write to process {dst} ({}) failed: {e}", peer.addr),
                );
                let _ = stream.shutdown(Shutdown::Both);
                *out = None;
                drop(out);
                self.report_loss(dst, report);
                Err(lost(self.lost_reason(dst).unwrap_or_default()))
            }
        }
    }

    /// Opens and authenticates our data stream to `dst`, and starts the
    /// thread that watches it for the peer's death.
    fn connect(self: &Arc<Self>, dst: ProcessId) -> Result<TcpStream, String> {
        let addr = self.peers[dst as usize].addr;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!("cannot connect to process {dst} at {addr}: {what}: {e}")
        };
        let mut s = TcpStream::connect_timeout(&addr, self.cfg.connect_timeout)
            .map_err(|e| fail("connect", &e))?;
        s.set_nodelay(true).map_err(|e| fail("nodelay", &e))?;
        crate::poll::keep_alive(&s).map_err(|e| fail("keepalive", &e))?;
        s.write_all(&wire::encode_hello(
            HELLO_MAGIC,
            self.rank,
            self.size,
            &self.secret,
        ))
        .map_err(|e| fail("hello", &e))?;
        s.set_read_timeout(Some(self.cfg.handshake_timeout))
            .map_err(|e| fail("timeout", &e))?;
        let mut ack = [0u8; HELLO_LEN];
        s.read_exact(&mut ack)
            .map_err(|e| fail("handshake refused or timed out", &e))?;
        let (rank, size, secret) =
            wire::decode_hello(&ack, ACK_MAGIC).map_err(|e| fail("bad handshake answer", &e))?;
        if rank != dst || size != self.size || !ct_eq(secret, &self.secret) {
            return Err(fail(
                "handshake answer",
                &format!("answered as rank {rank} of {size} (or with another secret)"),
            ));
        }
        s.set_read_timeout(None).map_err(|e| fail("timeout", &e))?;
        let watch = s.try_clone().map_err(|e| fail("clone", &e))?;
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        *lock(&self.peers[dst as usize].out_ctl) = s.try_clone().ok().map(|c| (id, c));
        *lock(&self.watchers) += 1;
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("charmrs-tcp-watch-{dst}"))
            .spawn(move || {
                crate::conn::watch_outgoing(&shared, dst, id, watch);
                *lock(&shared.watchers) -= 1;
                shared.watchers_cv.notify_all();
            });
        if let Err(e) = spawned {
            *lock(&self.watchers) -= 1;
            return Err(fail("spawn watcher", &e));
        }
        self.counters
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        Ok(s)
    }

    /// Hands a remote read to the responder thread (started on first use),
    /// so reader threads never block on writes.
    pub(crate) fn enqueue_get(self: &Arc<Self>, job: GetJob) {
        let mut slot = lock(&self.responder);
        if slot.is_none() {
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            let (tx, rx) = crossbeam_channel::unbounded::<GetJob>();
            let shared = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("charmrs-tcp-get".to_owned())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        shared.serve_get(job);
                    }
                });
            if let Err(e) = spawned {
                // Answered here instead, with the reason: the requester must not wait for ever.
                drop(slot);
                let why = format!("the responder thread could not start: {e}");
                return self.answer_get(&job, Err(why), false);
            }
            *slot = Some(tx);
        }
        if let Some(tx) = slot.as_ref() {
            let _ = tx.send(job);
        }
    }

    /// Looks a registered region up for a read of `len` bytes under
    /// `nonce`.
    pub(crate) fn region(&self, region: u64, len: u64, nonce: u64) -> Result<Bytes, String> {
        if nonce != self.nonce {
            return Err("remote key from another layer instance".to_owned());
        }
        let regions = lock(&self.regions);
        let buf = regions
            .get(&region)
            .ok_or_else(|| format!("no registered region {region} (deregistered?)"))?;
        if len > buf.len() as u64 {
            return Err(format!(
                "read of {len} bytes from a region of {} bytes",
                buf.len()
            ));
        }
        Ok(buf.slice(..len as usize))
    }

    /// Answers one remote read on our stream to the requester: the bytes,
    /// or why not (a refusal, never a frame over `cfg.max_frame`, which the
    /// requester would take for a malformed one and drop the connection).
    fn serve_get(self: &Arc<Self>, job: GetJob) {
        let answer = self.region(job.region, job.len, job.nonce).and_then(|bytes| {
            let frame = charmrs_transport::single_segment_frame_len(bytes.len());
            if frame > self.cfg.max_frame {
                return Err(format!(
                    "region exceeds the frame limit: a read of {} bytes makes a frame of {frame} bytes, over the limit of {}",
                    bytes.len(),
                    self.cfg.max_frame
                ));
            }
            Ok(bytes)
        });
        self.answer_get(&job, answer, true);
    }

    /// Sends the requester of `job` the bytes it asked for, or why it cannot have them.
    /// `wait`: whether to wait for the outgoing stream (the responder thread does); a reader
    /// thread, which must not block on writes, gives up if it is busy and marks the requester
    /// lost, so it learns of the failure either way.
    fn answer_get(self: &Arc<Self>, job: &GetJob, answer: Result<Bytes, String>, wait: bool) {
        let (ty, seg) = match answer {
            Ok(bytes) => (PKT_GET_RESP, bytes),
            Err(why) => (PKT_GET_ERR, Bytes::from(why.into_bytes())),
        };
        let msg = Message::with_segment(Header::new(job.kind, 0, 0, job.tag), seg);
        // Failures mark the requester lost, which `progress` reports.
        if let Ok(false) = self.send_packet(job.from, ty, &msg, wait) {
            let why = "a remote read could not be answered (no responder thread, and the \
                       stream to the requester was busy)";
            self.lose(job.from, why.to_owned());
        }
    }

    /// Stops everything: says goodbye to every connected peer, waits up to
    /// `cfg.linger` for them to close our streams (reading their goodbyes
    /// meanwhile), then closes every socket and stops the input watcher, so
    /// all background threads end.
    pub(crate) fn shutdown(self: &Arc<Self>) {
        if self.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        // A goodbye waits for room in a full socket (a peer that reads
        // nothing) until this deadline, shared by all of them, and is then
        // given up: that peer sees the connection close without goodbye.
        let bye_deadline = std::time::Instant::now() + self.cfg.linger;
        for peer in &self.peers {
            // A send in progress holds the stream briefly: wait for it (bounded, since a send
            // blocked by back-pressure may hold it for good) rather than skip the goodbye, which
            // the peer would take for this process's death.
            let deadline = std::time::Instant::now() + Duration::from_millis(200);
            let out = loop {
                match peer.out.try_lock() {
                    Ok(out) => break Some(out),
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_micros(100))
                    }
                    Err(_) => break None,
                }
            };
            if let Some(out) = out {
                if let Some(s) = out.as_ref() {
                    say_goodbye(s, wire::PKT_BYE, bye_deadline);
                    let _ = s.shutdown(Shutdown::Write);
                }
            }
            if let Some((_, s)) = lock(&peer.incoming).conn.as_ref() {
                say_goodbye(s, wire::BYE_BYTE, bye_deadline);
            }
        }
        // Linger: wait for the peers to close our streams, reading (and
        // dropping) what they send meanwhile, so that a peer shutting down at
        // the same time sees our goodbye too and neither waits out the
        // linger.
        {
            let deadline = std::time::Instant::now() + self.cfg.linger;
            let mut ready = Vec::new();
            while *lock(&self.watchers) > 0 {
                crate::recv::poll(self, &mut |_, _| {}, true);
                let now = std::time::Instant::now();
                if now >= deadline {
                    break;
                }
                let nap = (deadline - now).min(Duration::from_millis(2));
                let _ = self.recv.data.wait(&mut ready, Some(nap));
                self.recv.bell.drain();
            }
        }
        for peer in &self.peers {
            if let Some((_, s)) = lock(&peer.out_ctl).take() {
                let _ = s.shutdown(Shutdown::Both);
            }
            if let Some((_, s)) = lock(&peer.incoming).conn.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        crate::recv::close_all(self);
        lock(&self.responder).take();
        // Wake the blocking accept so its thread sees `closing`.
        let _ = TcpStream::connect_timeout(&self.listen, Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    /// A goodbye to a peer that reads nothing, on a blocking socket whose
    /// buffers are full, is given up at its deadline (a blocking write of it
    /// hung the layer's drop for ever).
    #[test]
    fn a_goodbye_to_a_full_socket_gives_up_at_its_deadline() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let out = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (_silent, _) = listener.accept().unwrap();
            // Fill both sides' buffers until even one byte finds no room. (The
            // kernel may free a little room later, by compacting the unread
            // input: then the goodbye is written, and the test fills again.)
            let chunk = vec![0u8; 64 << 10];
            loop {
                while crate::poll::send_nowait(out.as_fd(), &[IoSlice::new(&chunk)]).is_ok() {}
                std::thread::sleep(Duration::from_millis(20));
                while crate::poll::send_nowait(out.as_fd(), &[IoSlice::new(&[1])]).is_ok() {}
                let t = Instant::now();
                if !say_goodbye(&out, wire::PKT_BYE, t + Duration::from_millis(50)) {
                    let _ = tx.send(t.elapsed());
                    return;
                }
            }
        });
        let took = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the goodbye blocked (watchdog)");
        assert!(
            took >= Duration::from_millis(50),
            "gave up before its deadline"
        );

        // With room, it is written.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        assert!(say_goodbye(&out, wire::PKT_BYE, Instant::now()));
        let mut b = [0u8; 1];
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        peer.read_exact(&mut b).unwrap();
        assert_eq!(b, [wire::PKT_BYE]);
    }

    /// A held loss's connection may be cut `loss_wait` after the loss was
    /// found and after its last input, whichever is later; never without a
    /// planned cut or with a `loss_wait` too long for the clock.
    #[test]
    fn a_cut_comes_loss_wait_after_the_loss_and_after_the_last_input() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(5);
        let cut_at = t0 + wait;
        // Silent since before the loss: the loss's bound.
        assert_eq!(cut_time(Some(cut_at), t0, wait), Some(cut_at));
        assert_eq!(
            cut_time(
                Some(cut_at),
                t0.checked_sub(Duration::from_secs(60)).unwrap_or(t0),
                wait
            ),
            Some(cut_at)
        );
        // Input after the loss moves it: silent for `loss_wait` since then.
        let heard = t0 + Duration::from_secs(3);
        assert_eq!(cut_time(Some(cut_at), heard, wait), Some(heard + wait));
        // No cut planned (its end has arrived), or never.
        assert_eq!(cut_time(None, heard, wait), None);
        assert_eq!(cut_time(Some(cut_at), heard, Duration::MAX), None);
    }

    /// The watcher's "earliest cut" follows the holds and the reads: a new
    /// hold lowers it, a read sets it to what it found (later, after input
    /// on the held connection: no read look is asked for until then), and a
    /// hold a read may have missed makes it due at once.
    #[test]
    fn the_earliest_cut_is_never_later_than_a_held_loss_s() {
        let n = NextCut::new();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert!(!n.due(t0 + 1000 * s), "nothing held");

        n.lower(t0 + 5 * s);
        assert!(!n.due(t0 + 4 * s));
        assert!(n.due(t0 + 5 * s));
        // A later hold does not move it later.
        n.lower(t0 + 7 * s);
        assert!(n.due(t0 + 5 * s));

        // A read found the held connection heard from at t0 + 3 s.
        let snap = n.snapshot();
        n.set(snap, cut_time(Some(t0 + 5 * s), t0 + 3 * s, 5 * s));
        assert!(!n.due(t0 + 7 * s), "input after the loss moves the cut");
        assert!(n.due(t0 + 8 * s));

        // Nothing left to cut (handed out, or its end arrived).
        n.set(n.snapshot(), None);
        assert!(!n.due(t0 + 1000 * s));

        // A hold made while a read looked (it may not have seen it): due at
        // once, for one read more.
        let snap = n.snapshot();
        n.lower(t0 + 20 * s);
        n.set(snap, Some(t0 + 30 * s));
        assert!(n.due(t0));
        // The next read sees it.
        n.set(n.snapshot(), Some(t0 + 20 * s));
        assert!(!n.due(t0 + 19 * s));
        assert!(n.due(t0 + 20 * s));
    }
}
