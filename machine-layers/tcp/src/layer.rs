//! [`TcpLayer`]: the TCP implementation of [`MachineLayer`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_transport::kv::{random_secret, JobSecret, KvBootstrap};
use charmrs_transport::{
    Bootstrap, Header, MachineLayer, MemRegion, Message, ProcessId, RemoteKey, TransportError,
};
use crossbeam_channel::Receiver;

use crate::shared::{lock, Counters, Event, Peer, Shared};
use crate::wire;

/// Tunables of a [`TcpLayer`]. Every process of a job should use the same
/// `max_frame`.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Address to listen on (port chosen by the OS) and to publish to the
    /// peers. Must be a concrete address, not `0.0.0.0`. Default:
    /// `127.0.0.1` (loopback: single-host jobs only); see
    /// [`interfaces::listen_address`](crate::interfaces::listen_address) for
    /// choosing one by interface name or for a job across hosts.
    pub bind: IpAddr,
    /// Largest frame (header, length table and payload) sent or accepted;
    /// a peer announcing a larger one is treated as hostile. A remote read
    /// whose answer would be larger is refused (see
    /// [`get`](MachineLayer::get)). Default 1 GiB.
    pub max_frame: usize,
    /// Bound on the bytes of messages the layer's watcher thread reads
    /// ahead from the sockets while nobody polls, not yet handed out by
    /// `progress`. Past it the watcher reads nothing more: TCP's window
    /// closes and the sender's `send` blocks until this process calls
    /// `progress` again (end-to-end back-pressure). A single message larger
    /// than the bound is still read when the queue is under it. A `send`
    /// waiting for room reads all its input whatever the bound (two
    /// processes sending each other more than it at once would otherwise
    /// both wait forever). Default 256 MiB.
    pub recv_queue_bytes: usize,
    /// How long connecting to a peer may take before it is declared lost.
    /// Default 5 s.
    pub connect_timeout: Duration,
    /// How long a handshake may take (either side). Default 5 s.
    pub handshake_timeout: Duration,
    /// How long dropping the layer waits for peers to acknowledge its
    /// goodbye (so its last messages are not cut off). Writing the goodbyes
    /// waits at most as long again for room in a full socket (a peer that
    /// reads nothing); that peer then sees the connection close without
    /// goodbye. Default 1 s.
    pub linger: Duration,
    /// How long [`TcpLayer::progress_wait`] polls the sockets (spinning,
    /// then yielding the CPU) before it sleeps in `epoll`. Polling saves the
    /// wake-up of a sleeping thread on a message that arrives soon (lower
    /// latency); sleeping uses no CPU. `Duration::ZERO` sleeps at once.
    /// Default 50 µs.
    pub wait_spin: Duration,
    /// How long a peer's loss found on this process's stream *to* it (a
    /// keepalive timeout, a failed send or connect, the stream closed) may
    /// wait for the end of the peer's stream *to this process*, so that the
    /// peer's last messages are handed out before the loss (see
    /// [`TcpLayer`]'s *Failures*). A peer that died has its stream ended by
    /// its kernel (at once on loopback), which ends the wait; a live one is
    /// told and closes it. A peer that does neither (its host went silent,
    /// or the process is stopped) is given this long: once its stream has
    /// been silent (nothing arrived, nothing unread, no end) for
    /// `loss_wait` since the loss was found (and since its last input), the
    /// layer reports the loss anyway and cuts that stream (shut down both
    /// ways and closed: nothing arriving on it later is read). A stream whose
    /// end has arrived is read to it however long that takes. A duration
    /// too long for the clock (`Duration::MAX`) waits for the end for ever.
    /// Default 5 s, the time keepalive takes to find a silent host.
    pub loss_wait: Duration,
    /// How long data this process sent a peer may wait unacknowledged by the peer's host
    /// before the peer is declared lost: how a host that fell silent is found while data to it
    /// is in flight (keepalive probes only idle connections, and the kernel gives such a
    /// connection up only at its retransmission limit, ~15 minutes). Only the host's silence
    /// counts: a live peer that reads nothing keeps its receive window closed and its kernel
    /// answers the probes of it, however long that lasts (three probes sent and two of them
    /// unanswered are a silent host, found up to three probe intervals late: the kernel's probes
    /// of a window kept closed for minutes back off to two minutes apart). Looked at every
    /// second; declared once two transmissions made after the host's last answer have gone
    /// unanswered for a second each, so about this limit and one retransmission interval after
    /// the host fell silent. At least 2 s (a shorter limit is taken as 2 s:
    /// [`MIN_ACK_TIMEOUT`](crate::MIN_ACK_TIMEOUT)).
    /// `Duration::MAX` never declares it. Default 10 s.
    ///
    /// The price: a network outage of more than this, with data in flight, ends the job, where
    /// the kernel alone would have retransmitted for up to ~15 minutes and gone on.
    pub ack_timeout: Duration,
}

impl Default for TcpConfig {
    fn default() -> TcpConfig {
        TcpConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            max_frame: 1 << 30,
            recv_queue_bytes: 256 << 20,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            linger: Duration::from_secs(1),
            wait_spin: Duration::from_micros(50),
            loss_wait: crate::poll::KEEPALIVE_DETECTION,
            ack_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of a layer's activity since it started
/// ([`TcpLayer::stats`]). Byte counts include framing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Packets written to peers (messages, read requests and answers).
    pub messages_sent: u64,
    /// Bytes of those packets.
    pub bytes_sent: u64,
    /// Messages received from peers' sockets and handed out by `progress`
    /// (remote-read completions included).
    pub messages_received: u64,
    /// Bytes of those messages' frames.
    pub bytes_received: u64,
    /// Outgoing connections established.
    pub connections_opened: u64,
    /// Incoming connections that passed the handshake.
    pub connections_accepted: u64,
    /// Incoming connections refused (bad handshake, wrong secret, ...).
    pub connections_refused: u64,
    /// Connections dropped because of a malformed frame.
    pub frames_rejected: u64,
}

/// Process-to-process transport over TCP, needing no system library.
///
/// # Behaviour
///
/// * **Set-up** ([`TcpLayer::new`]): listens on `cfg.bind` (loopback by
///   default) at an OS-chosen port, publishes `ip:port` under
///   [`wire::ADDR_KEY`] through the bootstrap, fences, and reads every
///   peer's address.
/// * **Connections** are made lazily on the first send to a peer and carry
///   data one way (see [`wire`]); each starts with a handshake proving the
///   job secret both ways. Unauthenticated or malformed connections are
///   refused and logged to stderr with the peer address; the layer keeps
///   working.
/// * **Send** writes the packet on the caller's thread, header and length
///   table first, then each [`Bytes`] segment as its own buffer of one
///   vectored write: no payload copy. It blocks while the socket buffer is
///   full (back-pressure, see [`TcpConfig::recv_queue_bytes`]); there is no
///   unbounded user-space queue.
/// * **Receive**: incoming sockets are non-blocking and read by whichever
///   thread gets there first: [`progress`](MachineLayer::progress), on the
///   caller's thread, straight to its sink, or the layer's watcher thread,
///   which, armed by `before_park`, sleeps in `epoll` and calls the
///   [`TcpLayer::set_wakeup`] hook on the first arrival, and, while nobody
///   polls, reads ahead into a bounded queue that `progress` hands out
///   first. Every frame is checked as
///   hostile input; each is one buffer, its segments views of it.
///   [`TcpLayer::progress_wait`] sleeps in `epoll` until something arrives.
/// * **Failures**: a peer whose connection closes without goodbye, resets,
///   or cannot be reached is reported once by `progress` as
///   [`TransportError::PeerLost`] (on loopback within milliseconds of the
///   process's death) and every later send to it fails with the same
///   error. The report comes after every message the peer sent before: a
///   loss found on the stream to the peer waits until the peer's stream to
///   this process is read to its end (this layer closes its side of that
///   stream for writing, so a peer still alive sees this process lost too,
///   stops sending and closes it). That wait is bounded: a stream that
///   stays open but silent (its host went silent, or the process is
///   stopped) for [`TcpConfig::loss_wait`] (5 s by default) is cut (shut
///   down both ways, nothing read from it afterwards) and the loss reported
///   then, after what was read from it. A malformed frame drops that
///   connection and is reported as [`TransportError::Malformed`] naming the
///   peer.
/// * **Remote reads**: [`register`](MachineLayer::register) keeps the
///   buffer in a table served by this process; [`get`](MachineLayer::get)
///   sends a request over the connection to the owner, whose layer reads
///   it (watcher or poller) and answers from a background thread (no
///   involvement of its scheduler); the bytes arrive through `progress` as
///   the completion message the trait describes. A read whose answer would
///   exceed [`TcpConfig::max_frame`] is refused, by `get` itself or by the
///   owner (a failed read), never sent.
/// * **Shutdown**: dropping the layer says goodbye to every peer (so they
///   do not report it lost; without blocking on a peer that reads nothing,
///   see [`TcpConfig::linger`]), waits up to [`TcpConfig::linger`] for them to
///   close, and stops all its threads.
pub struct TcpLayer {
    shared: Arc<Shared>,
    rx: Receiver<Event>,
    bootstrap: Arc<dyn Bootstrap>,
    accept: Option<JoinHandle<()>>,
}

fn bootstrap_err(m: String) -> TransportError {
    TransportError::Bootstrap(m)
}

impl TcpLayer {
    /// A layer with the default [`TcpConfig`] (loopback). `bootstrap` is
    /// kept for [`barrier`](MachineLayer::barrier) and
    /// [`abort`](MachineLayer::abort); `secret` authenticates connections
    /// and must be the same in every process of the job (with charmrun:
    /// [`KvBootstrap::secret`]).
    ///
    /// Collective: every process of the job must call it.
    ///
    /// # Errors
    ///
    /// [`TransportError::Io`] if the listener cannot be set up,
    /// [`TransportError::Bootstrap`] if the address exchange fails.
    pub fn new(
        bootstrap: Arc<dyn Bootstrap>,
        secret: JobSecret,
    ) -> Result<TcpLayer, TransportError> {
        TcpLayer::with_config(bootstrap, secret, TcpConfig::default())
    }

    /// The layer of a process started by `charmrun`: a
    /// [`KvBootstrap::from_env`] bootstrap, its job secret, and `cfg`.
    /// `Ok(None)` when the process was not started by charmrun.
    ///
    /// # Errors
    ///
    /// As [`KvBootstrap::from_env`] and [`TcpLayer::new`].
    pub fn from_env(cfg: TcpConfig) -> Result<Option<TcpLayer>, TransportError> {
        let Some(b) = KvBootstrap::from_env()? else {
            return Ok(None);
        };
        let secret = *b.secret();
        TcpLayer::with_config(Arc::new(b), secret, cfg).map(Some)
    }

    /// A layer with explicit tunables; see [`TcpLayer::new`].
    ///
    /// # Errors
    ///
    /// As [`TcpLayer::new`]; [`TransportError::Bootstrap`] also for an
    /// unspecified `cfg.bind` (`0.0.0.0`/`::`), which peers could not
    /// connect to.
    pub fn with_config(
        bootstrap: Arc<dyn Bootstrap>,
        secret: JobSecret,
        cfg: TcpConfig,
    ) -> Result<TcpLayer, TransportError> {
        if cfg.bind.is_unspecified() {
            return Err(bootstrap_err(format!(
                "bind address {} cannot be published to peers; give a concrete address",
                cfg.bind
            )));
        }
        let rank = bootstrap.rank();
        let size = bootstrap.size();
        let listener = TcpListener::bind(SocketAddr::new(cfg.bind, 0))
            .map_err(|e| bootstrap_err(format!("cannot listen on {}: {e}", cfg.bind)))?;
        let listen = listener.local_addr()?;
        bootstrap.put(wire::ADDR_KEY, listen.to_string().as_bytes())?;
        bootstrap.fence()?;
        let mut peers = Vec::with_capacity(size as usize);
        for r in 0..size {
            let addr = if r == rank {
                listen
            } else {
                let raw = bootstrap.get(r, wire::ADDR_KEY)?;
                std::str::from_utf8(&raw)
                    .ok()
                    .and_then(|s| s.parse::<SocketAddr>().ok())
                    .ok_or_else(|| {
                        bootstrap_err(format!(
                            "process {r} published an invalid address {:?}",
                            String::from_utf8_lossy(&raw)
                        ))
                    })?
            };
            peers.push(Peer {
                addr,
                out: Mutex::new(None),
                out_ctl: Mutex::new(None),
                lost: Mutex::new(None),
                reported: AtomicBool::new(false),
                departed: AtomicBool::new(false),
                incoming: Mutex::new(crate::shared::Incoming::default()),
            });
        }
        let nonce = random_secret()
            .map(|s| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&s[..8]);
                u64::from_le_bytes(w)
            })
            .unwrap_or_else(|_| {
                u64::from(std::process::id()) << 32
                    ^ std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64)
            });
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            rank,
            size,
            secret,
            cfg,
            listen,
            peers,
            tx,
            recv: crate::recv::Receiver::new()?,
            regions: Mutex::new(HashMap::new()),
            next_region: AtomicU64::new(1),
            nonce,
            closing: AtomicBool::new(false),
            wakeup: OnceLock::new(),
            responder: Mutex::new(None),
            watchers: Mutex::new(0),
            watchers_cv: Condvar::new(),
            next_conn: AtomicU64::new(crate::recv::FIRST_CONN_ID),
            pending: AtomicUsize::new(0),
            counters: Counters::default(),
            held_losses: AtomicUsize::new(0),
            next_cut: crate::shared::NextCut::new(),
        });
        crate::recv::start_watcher(&shared)?;
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name(format!("charmrs-tcp-accept-{rank}"))
            .spawn(move || crate::conn::accept_loop(&s, &listener))
            .inspect_err(|_| crate::recv::close_all(&shared))?;
        Ok(TcpLayer {
            shared,
            rx,
            bootstrap,
            accept: Some(accept),
        })
    }

    /// The address this process listens on (published to its peers).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// The published address of process `p`.
    ///
    /// # Errors
    ///
    /// [`TransportError::UnknownProcess`] if `p >= size()`.
    pub fn peer_addr(&self, p: ProcessId) -> Result<SocketAddr, TransportError> {
        self.check(p)?;
        Ok(self.shared.peers[p as usize].addr)
    }

    /// The tunables in force.
    pub fn config(&self) -> &TcpConfig {
        &self.shared.cfg
    }

    /// Activity counters.
    pub fn stats(&self) -> TcpStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TcpStats {
            messages_sent: get(&c.messages_sent),
            bytes_sent: get(&c.bytes_sent),
            messages_received: get(&c.messages_received),
            bytes_received: get(&c.bytes_received),
            connections_opened: get(&c.connections_opened),
            connections_accepted: get(&c.connections_accepted),
            connections_refused: get(&c.connections_refused),
            frames_rejected: get(&c.frames_rejected),
        }
    }

    /// Installs a hook called when there is something for `progress`: by
    /// the layer's input watcher thread on every arrival of bytes or
    /// hang-up on an incoming connection, and by whichever thread queues an
    /// event (a message to oneself, a lost peer, a malformed frame). A
    /// scheduler that parks the thread polling this layer uses it to unpark
    /// that thread. Keep it short and non-blocking. Can be set once.
    ///
    /// # Errors
    ///
    /// [`TransportError::Unsupported`] if a hook is already installed.
    pub fn set_wakeup(
        &self,
        hook: impl Fn() + Send + Sync + 'static,
    ) -> Result<(), TransportError> {
        self.shared
            .wakeup
            .set(Box::new(hook))
            .map_err(|_| TransportError::Unsupported("a second wake-up hook"))
    }

    /// Like [`progress`](MachineLayer::progress), but if nothing is there
    /// polls for up to [`TcpConfig::wait_spin`], then sleeps in `epoll`
    /// until input or an event arrives or `timeout` passes (then returns
    /// `Ok(0)`; a timeout too long for the clock, such as `Duration::MAX`,
    /// never passes). For a dedicated communication thread or an idle PE.
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
        // `None`: no deadline (a timeout past what the clock can represent,
        // such as `Duration::MAX`, waits for ever).
        let deadline = start.checked_add(timeout);
        let n = self.progress_with(sink, true)?;
        if n > 0 {
            return Ok(n);
        }
        // Poll briefly: a few spins, then yielding the CPU so the sender (on
        // a busy machine) can run.
        let spin = self.shared.cfg.wait_spin.min(timeout);
        let mut round = 0u32;
        while start.elapsed() < spin {
            round += 1;
            if round < 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            let n = self.progress_with(sink, true)?;
            if n > 0 {
                return Ok(n);
            }
        }
        let recv = &self.shared.recv;
        let mut ready = Vec::new();
        loop {
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Ok(0),
                },
                None => None,
            };
            recv.waiting.fetch_add(1, Ordering::SeqCst);
            // Pairs with the fence in `Shared::ring`: an event queued (or
            // input parked by a reader, whose sockets then look empty) from
            // now on rings the doorbell, one queued before is seen here.
            std::sync::atomic::fence(Ordering::SeqCst);
            let idle = self.rx.is_empty() && !crate::recv::input_waiting(recv);
            let slept = if idle {
                recv.data.wait(&mut ready, left)
            } else {
                Ok(())
            };
            recv.waiting.fetch_sub(1, Ordering::SeqCst);
            recv.bell.drain();
            slept?;
            if !idle {
                // Something waits, but the last poll could not take it
                // (another thread held the connections): let it finish.
                std::thread::yield_now();
            }
            let n = self.progress_with(sink, true)?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// `progress`, with `force`: read the sockets even if nothing was seen
    /// arriving (see [`crate::recv::poll`]).
    fn progress_with(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
        force: bool,
    ) -> Result<usize, TransportError> {
        // Errors found on a connection (malformed frame, closed without
        // goodbye) come in line with its messages, from the receive side.
        // Queued events (messages to oneself, a loss seen on our outgoing
        // stream of a peer that has no incoming connection open) come after
        // a poll that could look at the sockets. (A loss seen on our
        // outgoing stream while the peer's incoming connection is open is
        // not queued: it waits for that connection's end and comes in line,
        // see `Shared::report_loss`.)
        let pending = !self.rx.is_empty();
        let polled = crate::recv::poll(&self.shared, sink, force || pending).transpose()?;
        let mut n = polled.unwrap_or(0);
        if pending || !self.rx.is_empty() {
            if polled.is_none() {
                // Another thread holds the connections (it may be parking
                // messages older than the queued error): next call.
                return Ok(n);
            }
            n += self.drain_events(sink)?;
        }
        Ok(n)
    }

    /// Hands out the queued events (not those queued meanwhile), in order;
    /// returns at the first error.
    fn drain_events(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
    ) -> Result<usize, TransportError> {
        let mut n = 0;
        for _ in 0..self.rx.len() {
            match self.rx.try_recv() {
                Ok(Event::Msg(src, msg)) => {
                    sink(src, msg);
                    n += 1;
                }
                Ok(Event::Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
        Ok(n)
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
}

impl MachineLayer for TcpLayer {
    fn rank(&self) -> ProcessId {
        self.shared.rank
    }

    fn progress_wait(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        TcpLayer::progress_wait(self, sink, timeout)
    }

    fn set_wakeup(&self, hook: Box<dyn Fn() + Send + Sync>) -> bool {
        TcpLayer::set_wakeup(self, hook).is_ok()
    }

    /// Reads the sockets on every call (a `recv` per connection, up to
    /// two; else one `epoll_wait`), as a busy-polling socket program does.
    fn progress_idle(
        &self,
        sink: &mut dyn FnMut(ProcessId, Message),
    ) -> Result<usize, TransportError> {
        self.progress_with(sink, true)
    }

    /// Arms the watcher thread, which otherwise sleeps while the poller
    /// polls.
    fn before_park(&self) -> bool {
        crate::recv::before_park(&self.shared) && self.rx.is_empty()
    }

    fn size(&self) -> u32 {
        self.shared.size
    }

    /// Writes the message on the caller's thread (connecting first if this
    /// is the first message to `dst`); blocks only while the peer's socket
    /// buffer is full. A message to oneself is queued without a socket.
    ///
    /// # Errors
    ///
    /// [`TransportError::UnknownProcess`], [`TransportError::TooLarge`] for
    /// a frame over [`TcpConfig::max_frame`], [`TransportError::PeerLost`]
    /// if the peer is gone (the message is dropped).
    fn send(&self, dst: ProcessId, msg: Message) -> Result<(), TransportError> {
        self.check(dst)?;
        let len = msg.frame_len();
        if len > self.shared.cfg.max_frame {
            return Err(TransportError::TooLarge {
                len: len as u64,
                max: self.shared.cfg.max_frame as u64,
            });
        }
        if dst == self.shared.rank {
            self.shared.push(Event::Msg(dst, msg));
            return Ok(());
        }
        self.shared
            .send_packet(dst, wire::PKT_DATA, &msg, true)
            .map(|_| ())
    }

    /// Non-blocking: hands out the queued events (messages to oneself,
    /// errors), then reads the incoming sockets on the calling thread and
    /// hands out every complete message read (up to 8 MiB per call; a
    /// larger frame takes several calls), in arrival order per sender. Returns at the first error (lost peer, malformed frame,
    /// failed remote read); each is reported once, and what is queued
    /// behind it stays for the next call. With a wake-up hook installed
    /// ([`TcpLayer::set_wakeup`]) a call may skip the sockets when nothing
    /// was seen arriving.
    fn progress(&self, sink: &mut dyn FnMut(ProcessId, Message)) -> Result<usize, TransportError> {
        self.progress_with(sink, false)
    }

    fn register(&self, buf: Bytes) -> Result<MemRegion, TransportError> {
        let id = self.shared.next_region.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.regions).insert(id, buf.clone());
        let key = RemoteKey {
            addr: id,
            len: buf.len() as u64,
            rkey: self.shared.nonce.to_le_bytes().to_vec(),
        };
        let shared = Arc::downgrade(&self.shared);
        Ok(MemRegion::with_release(buf, key, move || {
            if let Some(s) = shared.upgrade() {
                lock(&s.regions).remove(&id);
            }
        }))
    }

    /// A real remote read: a request to `src`, answered by `src`'s layer
    /// from its registration table. The completion arrives through
    /// `progress`; a refused read (unknown or deregistered region, key of
    /// another job, an answer over `src`'s [`TcpConfig::max_frame`]) arrives
    /// as [`TransportError::Malformed`].
    ///
    /// # Errors
    ///
    /// [`TransportError::UnknownProcess`]; [`TransportError::TooLarge`] if
    /// the answer (`key.len` bytes and a frame prefix) would exceed
    /// [`TcpConfig::max_frame`]; [`TransportError::Malformed`] for a key not
    /// made by a TCP layer (or, `src` being this process, one it does not
    /// hold); [`TransportError::PeerLost`] as for `send`.
    fn get(
        &self,
        src: ProcessId,
        key: &RemoteKey,
        completion_kind: u8,
        completion_tag: u64,
    ) -> Result<(), TransportError> {
        self.check(src)?;
        let nonce: [u8; 8] = key.rkey.as_slice().try_into().map_err(|_| {
            TransportError::Malformed("remote key was not made by a tcp layer".to_owned())
        })?;
        let nonce = u64::from_le_bytes(nonce);
        // The answer is one frame of one segment: refused here if no peer
        // would accept it (it used to be sent, and the requester dropped the
        // connection as malformed).
        let frame = key
            .len
            .saturating_add(charmrs_transport::single_segment_frame_len(0) as u64);
        let max = self.shared.cfg.max_frame as u64;
        if frame > max {
            return Err(TransportError::TooLarge { len: frame, max });
        }
        let header = Header::new(completion_kind, 0, 0, completion_tag);
        if src == self.shared.rank {
            let bytes = self
                .shared
                .region(key.addr, key.len, nonce)
                .map_err(TransportError::Malformed)?;
            let msg = Message::with_segment(header, bytes);
            self.shared.push(Event::Msg(src, msg));
            return Ok(());
        }
        let mut req = Vec::with_capacity(24);
        req.extend_from_slice(&key.addr.to_le_bytes());
        req.extend_from_slice(&key.len.to_le_bytes());
        req.extend_from_slice(&nonce.to_le_bytes());
        let msg = Message::with_segments(header, vec![Bytes::from(req)])?;
        self.shared
            .send_packet(src, wire::PKT_GET_REQ, &msg, true)
            .map(|_| ())
    }

    /// The bootstrap's fence (all processes).
    fn barrier(&self) -> Result<(), TransportError> {
        self.bootstrap.fence()
    }

    /// Best effort: sends an abort notice to every reachable peer (without
    /// waiting for a busy connection), tells the launcher through the
    /// bootstrap, and returns; the caller then exits.
    fn abort(&self, reason: &str) {
        if let Ok(msg) = Message::with_segments(
            Header::default(),
            vec![Bytes::copy_from_slice(reason.as_bytes())],
        ) {
            // On a thread of its own, waited for at most 2 s: a write to a peer whose socket is
            // full (a silent or stuck peer) must not keep the launcher from hearing of the abort.
            let shared = Arc::clone(&self.shared);
            charmrs_transport::bounded::run_at_most(
                Duration::from_secs(2),
                "charmrs-tcp-abort",
                move || {
                    for p in (0..shared.size).filter(|&p| p != shared.rank) {
                        let _ = shared.send_packet(p, wire::PKT_ABORT, &msg, false);
                    }
                },
            );
        }
        self.bootstrap.abort(reason);
    }

    fn name(&self) -> &'static str {
        "tcp"
    }
}

impl std::fmt::Debug for TcpLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLayer")
            .field("rank", &self.shared.rank)
            .field("size", &self.shared.size)
            .field("listen", &self.shared.listen)
            .finish_non_exhaustive()
    }
}

impl Drop for TcpLayer {
    fn drop(&mut self) {
        self.shared.shutdown();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
