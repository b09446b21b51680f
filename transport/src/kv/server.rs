//! [`KvServer`]: the launcher's key-value rendezvous (see the module docs of
//! [`crate::kv`] for the contract).
//!
//! # Invariants
//!
//! * Once a connection has claimed a rank, every way its thread ends goes
//!   through [`depart`]: the rank is recorded as having left (pending and
//!   future fences fail instead of waiting for it) and
//!   [`KvEvent::Disconnected`] follows the [`KvEvent::Joined`] sent at the
//!   claim.
//! * `shutdown` is set, and checked before registering a connection, under
//!   the `conns` lock: a connection accepted while the server is dropped is
//!   either closed by the drop or never served.
//! * A fence generation starts at its first arrival; once the fence timeout
//!   has passed since then with ranks missing, the first waiter to notice
//!   records the failure (`fence_failed`, naming the missing ranks), sends
//!   [`KvEvent::FenceTimedOut`] before any waiter answers, and wakes the
//!   others: every waiting and every later fence fails with that message.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{self, Op, Reject, Status};
use super::{JobSecret, DEFAULT_FENCE_TIMEOUT};
use crate::error::TransportError;
use crate::layer::ProcessId;

/// How long an unauthenticated connection may take to send its whole first
/// request (one deadline, not one per read: a client trickling a byte at a
/// time cannot hold its slot longer).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Unauthenticated connections served at once; further ones wait in the
/// listen backlog.
const MAX_PENDING: usize = 64;
/// Total bytes the store holds: its keys and values, plus [`ENTRY_OVERHEAD`] per entry.
const MAX_STORE: usize = 64 << 20;
/// What an entry costs the store besides its key and value bytes, charged against
/// [`MAX_STORE`]: the map's slot (rank, `String` and `Vec` headers), the key's and value's own
/// allocations and the hash table's spare room take about this much. Without it a flood of
/// empty values under tiny keys would fit millions of entries (gigabytes) in the 64 MiB.
const ENTRY_OVERHEAD: usize = 64;

/// Something the launcher must know about, reported by
/// [`KvServer::next_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// A process called [`Bootstrap::abort`](crate::Bootstrap::abort): the
    /// job must come down.
    Abort {
        /// The aborting process.
        rank: ProcessId,
        /// Its reason.
        reason: String,
    },
    /// A process authenticated and claimed its rank (sent before it is
    /// answered, so before anything it does after joining).
    Joined {
        /// The process that joined.
        rank: ProcessId,
    },
    /// The connection of an authenticated process closed (it exited, or
    /// dropped its bootstrap).
    Disconnected {
        /// The process whose connection closed.
        rank: ProcessId,
    },
    /// A fence waited [`KvServer::fence_timeout`] after its first arrival
    /// without every process arriving: it failed, and so will every later
    /// one (sent before any waiting process hears of it).
    FenceTimedOut {
        /// The processes that had not arrived, in rank order.
        missing: Vec<ProcessId>,
        /// The fence timeout that passed.
        after: Duration,
    },
}

/// The launcher's key-value server: a TCP listener serving
/// [`KvBootstrap`](super::KvBootstrap) clients of one job. Dropping it stops
/// the listener and closes every connection.
pub struct KvServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    events: mpsc::Receiver<KvEvent>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    nprocs: u32,
    secret: JobSecret,
    state: Mutex<State>,
    fence_done: Condvar,
    shutdown: AtomicBool,
    events: mpsc::Sender<KvEvent>,
    /// Clones of every open connection, to close them on shutdown.
    conns: Mutex<HashMap<u64, TcpStream>>,
    pending: AtomicUsize,
}

struct State {
    store: HashMap<(ProcessId, String), Vec<u8>>,
    store_bytes: usize,
    claimed: Vec<bool>,
    /// First rank whose connection closed, if any: no fence can complete
    /// after that.
    left: Option<ProcessId>,
    fence_generation: u64,
    fence_arrived: u32,
    /// Which ranks arrived at the current fence generation.
    fence_arrivals: Vec<bool>,
    /// When the first rank arrived at the current generation.
    fence_started: Option<Instant>,
    /// How long a fence waits for every rank after its first arrival.
    fence_timeout: Duration,
    /// Why fences fail since one timed out: no fence can complete after that.
    fence_failed: Option<String>,
}

impl Shared {
    fn new(nprocs: u32, secret: JobSecret, events: mpsc::Sender<KvEvent>) -> Shared {
        Shared {
            nprocs,
            secret,
            state: Mutex::new(State {
                store: HashMap::new(),
                store_bytes: 0,
                claimed: vec![false; nprocs as usize],
                left: None,
                fence_generation: 0,
                fence_arrived: 0,
                fence_arrivals: vec![false; nprocs as usize],
                fence_started: None,
                fence_timeout: DEFAULT_FENCE_TIMEOUT,
                fence_failed: None,
            }),
            fence_done: Condvar::new(),
            shutdown: AtomicBool::new(false),
            events,
            conns: Mutex::new(HashMap::new()),
            pending: AtomicUsize::new(0),
        }
    }

    /// Keeps a clone of the accepted `stream` under `id` so that shutdown can
    /// close it. `false` (the connection must not be served) if the server is
    /// shutting down or the clone fails: the connection could then outlive
    /// the server.
    fn register(&self, id: u64, stream: &TcpStream) -> bool {
        let mut conns = lock(&self.conns);
        // Checked under the lock that `close_all` sets it under: either this
        // insert comes first and `close_all` closes the connection, or it
        // sees the flag.
        if self.shutdown.load(Ordering::SeqCst) {
            return false;
        }
        match stream.try_clone() {
            Ok(c) => {
                conns.insert(id, c);
                true
            }
            Err(e) => {
                eprintln!("charmrs-kv: cannot keep a handle on a connection: {e}");
                false
            }
        }
    }

    /// Starts the shutdown: sets the flag and closes every registered
    /// connection (their threads then see their reads fail and depart).
    fn close_all(&self) {
        {
            let mut conns = lock(&self.conns);
            self.shutdown.store(true, Ordering::SeqCst);
            for (_, c) in conns.drain() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        self.fence_done.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind the locks; a panicking holder cannot leave it
    // inconsistent in a way that matters more than the panic itself.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KvServer {
    /// Starts a server for a job of `nprocs` processes authenticated by
    /// `secret`, listening on `127.0.0.1` at a port the OS picks. Returns the
    /// server and the address to hand to the processes
    /// ([`ENV_KV_ADDR`](super::ENV_KV_ADDR)).
    ///
    /// # Errors
    ///
    /// [`TransportError::Bootstrap`] if `nprocs` is 0, [`TransportError::Io`]
    /// if the listener cannot be set up.
    pub fn start(nprocs: u32, secret: JobSecret) -> Result<(KvServer, SocketAddr), TransportError> {
        KvServer::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), nprocs, secret)
    }

    /// Like [`KvServer::start`] but listening on `bind` (use a loopback
    /// address unless the job spans hosts).
    ///
    /// # Errors
    ///
    /// As [`KvServer::start`].
    pub fn start_on(
        bind: SocketAddr,
        nprocs: u32,
        secret: JobSecret,
    ) -> Result<(KvServer, SocketAddr), TransportError> {
        if nprocs == 0 {
            return Err(TransportError::Bootstrap(
                "a job needs at least one process".to_owned(),
            ));
        }
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::new(nprocs, secret, tx));
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("charmrs-kv-accept".to_owned())
            .spawn(move || accept_loop(&s, &listener))?;
        Ok((
            KvServer {
                addr,
                shared,
                events: rx,
                accept: Some(accept),
            },
            addr,
        ))
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How long a fence waits for every process after the first one arrived
    /// (default [`DEFAULT_FENCE_TIMEOUT`]).
    pub fn fence_timeout(&self) -> Duration {
        lock(&self.shared.state).fence_timeout
    }

    /// Sets [`KvServer::fence_timeout`] (charmrun: from
    /// [`ENV_KV_FENCE_TIMEOUT`](super::ENV_KV_FENCE_TIMEOUT)). A fence that
    /// began already keeps its start but uses the new timeout.
    pub fn set_fence_timeout(&self, timeout: Duration) {
        lock(&self.shared.state).fence_timeout = timeout;
        self.shared.fence_done.notify_all();
    }

    /// Waits up to `timeout` for the next event; `None` if none came.
    pub fn next_event(&self, timeout: Duration) -> Option<KvEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// The next event if one is pending, without waiting.
    pub fn try_event(&self) -> Option<KvEvent> {
        self.events.try_recv().ok()
    }
}

impl std::fmt::Debug for KvServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvServer")
            .field("addr", &self.addr)
            .field("nprocs", &self.shared.nprocs)
            .finish_non_exhaustive()
    }
}

impl Drop for KvServer {
    fn drop(&mut self) {
        self.shared.close_all();
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("charmrs-kv: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "<unknown>".to_owned(), |a| a.to_string());
        // At the cap, wait rather than refuse: all processes of a big job
        // connect at once. An unauthenticated connection is dropped
        // `HELLO_TIMEOUT` after it was accepted, so a slot always frees up.
        while shared.pending.load(Ordering::SeqCst) >= MAX_PENDING {
            if shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        next_id += 1;
        let id = next_id;
        if !shared.register(id, &stream) {
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        shared.pending.fetch_add(1, Ordering::SeqCst);
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("charmrs-kv-conn-{id}"))
            .spawn(move || {
                serve(&s, stream, &peer);
                lock(&s.conns).remove(&id);
            });
        if let Err(e) = spawned {
            shared.pending.fetch_sub(1, Ordering::SeqCst);
            lock(&shared.conns).remove(&id);
            eprintln!("charmrs-kv: cannot serve a connection: {e}");
        }
    }
}

/// What the server needs of a connection: the accepted [`TcpStream`], or a
/// test double.
trait Conn: Read + Write {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_nodelay(&self, on: bool) -> io::Result<()>;
}

impl Conn for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }

    fn set_nodelay(&self, on: bool) -> io::Result<()> {
        TcpStream::set_nodelay(self, on)
    }
}

/// Serves one connection until it closes.
fn serve(shared: &Shared, mut stream: impl Conn, peer: &str) {
    let claimed = claim(shared, &mut stream);
    shared.pending.fetch_sub(1, Ordering::SeqCst);
    let rank = match claimed {
        Ok(rank) => rank,
        Err(why) => {
            if let Some(why) = why {
                eprintln!("charmrs-kv: refused connection from {peer}: {why}");
            }
            return;
        }
    };
    // The rank is claimed: whatever happens now, the connection ends in
    // `depart`, or other ranks' fences would wait for this one for ever.
    match welcome(&mut stream) {
        Ok(()) => serve_requests(shared, rank, &mut stream, peer),
        Err(e) => {
            if !shared.shutdown.load(Ordering::SeqCst) {
                eprintln!(
                    "charmrs-kv: dropping process {rank} ({peer}): cannot answer its hello: {e}"
                );
            }
        }
    }
    depart(shared, rank);
}

/// Answers the hello of a connection that claimed its rank, leaving the
/// hello's deadline behind.
fn welcome(stream: &mut impl Conn) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    let _ = stream.set_nodelay(true);
    proto::write_response(stream, Status::Ok, b"")
}

/// Serves the requests of process `rank` until its connection closes or
/// misbehaves.
fn serve_requests(shared: &Shared, rank: ProcessId, stream: &mut impl Conn, peer: &str) {
    loop {
        let body = match proto::read_body(stream, proto::MAX_REQUEST) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                if !shared.shutdown.load(Ordering::SeqCst) {
                    eprintln!("charmrs-kv: dropping process {rank} ({peer}): {e}");
                }
                return;
            }
        };
        let req = match proto::decode_request(&body, &shared.secret) {
            Ok(r) => r,
            Err(Reject::BadSecret) => {
                eprintln!("charmrs-kv: dropping process {rank} ({peer}): wrong job secret");
                return;
            }
            Err(Reject::Malformed(m)) => {
                eprintln!("charmrs-kv: dropping process {rank} ({peer}): malformed request: {m}");
                return;
            }
        };
        let (status, payload) = handle(shared, rank, &req);
        if proto::write_response(stream, status, &payload).is_err() {
            return;
        }
    }
}

/// Process `rank` left the job (its connection ended, for whatever reason):
/// no fence can complete any more, and the launcher hears of it.
fn depart(shared: &Shared, rank: ProcessId) {
    {
        let mut st = lock(&shared.state);
        st.left.get_or_insert(rank);
    }
    shared.fence_done.notify_all();
    let _ = shared.events.send(KvEvent::Disconnected { rank });
}

/// Authenticates the first request, which must claim a rank, and claims it
/// (announcing [`KvEvent::Joined`]); the caller answers it. `Err(None)`:
/// closed silently before sending anything, or a one-shot abort notice.
fn claim(shared: &Shared, stream: &mut impl Conn) -> Result<ProcessId, Option<String>> {
    let mut until_deadline = Deadline {
        stream: &mut *stream,
        at: std::time::Instant::now() + HELLO_TIMEOUT,
    };
    let body = match proto::read_body(&mut until_deadline, proto::MAX_REQUEST) {
        Ok(Some(b)) => b,
        Ok(None) => return Err(None),
        Err(e) => return Err(Some(format!("bad first request: {e}"))),
    };
    let req = match proto::decode_request(&body, &shared.secret) {
        Ok(r) => r,
        Err(Reject::BadSecret) => return Err(Some("wrong job secret".to_owned())),
        Err(Reject::Malformed(m)) => return Err(Some(format!("malformed request: {m}"))),
    };
    if req.op == Op::Abort {
        // A one-shot abort notice on its own connection (see
        // `KvBootstrap::abort`): authenticated by the secret, claims nothing.
        if req.rank < shared.nprocs {
            let reason = String::from_utf8_lossy(req.value).into_owned();
            let _ = shared.events.send(KvEvent::Abort {
                rank: req.rank,
                reason,
            });
        }
        let _ = proto::write_response(stream, Status::Ok, b"");
        return Err(None);
    }
    if req.op != Op::Hello {
        return Err(Some("first request is not a hello".to_owned()));
    }
    let claimed = {
        let mut st = lock(&shared.state);
        match st.claimed.get_mut(req.rank as usize) {
            None => Err(format!(
                "rank {} out of range: the job has {} processes",
                req.rank, shared.nprocs
            )),
            Some(true) => Err(format!("rank {} is already connected", req.rank)),
            Some(slot) => {
                *slot = true;
                Ok(req.rank)
            }
        }
    };
    match claimed {
        Ok(rank) => {
            let _ = shared.events.send(KvEvent::Joined { rank });
            Ok(rank)
        }
        Err(why) => {
            let _ = proto::write_response(stream, Status::Error, why.as_bytes());
            let _ = stream.flush();
            Err(Some(why))
        }
    }
}

/// Executes one authenticated request of process `rank`.
fn handle(shared: &Shared, rank: ProcessId, req: &proto::Request<'_>) -> (Status, Vec<u8>) {
    let err = |m: String| (Status::Error, m.into_bytes());
    match req.op {
        Op::Hello => err(format!("process {rank} already said hello")),
        Op::Put => {
            if req.rank != rank {
                return err(format!(
                    "process {rank} cannot put keys of process {}",
                    req.rank
                ));
            }
            let mut st = lock(&shared.state);
            let key = (rank, req.key.to_owned());
            let cost = |value_len: usize| ENTRY_OVERHEAD + req.key.len() + value_len;
            let old = st.store.get(&key).map_or(0, |v| cost(v.len()));
            let new_total = st.store_bytes - old + cost(req.value.len());
            if new_total > MAX_STORE {
                return err(format!(
                    "key-value store full: process {rank} cannot store key {:?} ({} bytes of \
                     value); the store holds at most {MAX_STORE} bytes, counting {ENTRY_OVERHEAD} \
                     per entry besides its key and value, and {} are in use",
                    req.key,
                    req.value.len(),
                    st.store_bytes
                ));
            }
            st.store_bytes = new_total;
            st.store.insert(key, req.value.to_vec());
            (Status::Ok, Vec::new())
        }
        Op::Get => {
            if req.rank >= shared.nprocs {
                return err(format!(
                    "rank {} out of range: the job has {} processes",
                    req.rank, shared.nprocs
                ));
            }
            let st = lock(&shared.state);
            match st.store.get(&(req.rank, req.key.to_owned())) {
                Some(v) => (Status::Ok, v.clone()),
                None => (Status::NotFound, Vec::new()),
            }
        }
        Op::Fence => match fence(shared, rank) {
            Ok(()) => (Status::Ok, Vec::new()),
            Err(m) => err(m),
        },
        Op::Abort => {
            let reason = String::from_utf8_lossy(req.value).into_owned();
            let _ = shared.events.send(KvEvent::Abort { rank, reason });
            (Status::Ok, Vec::new())
        }
    }
}

/// Blocks until every rank arrived at the current fence generation, or
/// fails once a rank left the job or the fence timed out.
fn fence(shared: &Shared, rank: ProcessId) -> Result<(), String> {
    let mut st = lock(&shared.state);
    if let Some(r) = st.left {
        return Err(format!(
            "process {r} left the job; the fence cannot complete"
        ));
    }
    if let Some(why) = &st.fence_failed {
        return Err(why.clone());
    }
    let generation = st.fence_generation;
    let started = *st.fence_started.get_or_insert_with(Instant::now);
    if let Some(arrived) = st.fence_arrivals.get_mut(rank as usize) {
        *arrived = true;
    }
    st.fence_arrived += 1;
    if st.fence_arrived == shared.nprocs {
        st.fence_arrived = 0;
        st.fence_arrivals.fill(false);
        st.fence_started = None;
        st.fence_generation += 1;
        shared.fence_done.notify_all();
        return Ok(());
    }
    loop {
        let left = (started + st.fence_timeout).saturating_duration_since(Instant::now());
        st = shared
            .fence_done
            .wait_timeout(st, left.min(Duration::from_millis(200)))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if st.fence_generation != generation {
            return Ok(());
        }
        if let Some(r) = st.left {
            return Err(format!(
                "process {r} left the job; the fence cannot complete"
            ));
        }
        if let Some(why) = &st.fence_failed {
            return Err(why.clone());
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            return Err("the key-value server is shutting down".to_owned());
        }
        if started.elapsed() >= st.fence_timeout {
            let missing: Vec<ProcessId> = (0..shared.nprocs)
                .filter(|&r| !st.fence_arrivals[r as usize])
                .collect();
            let why = format!(
                "the fence timed out after {:?} waiting for {}",
                st.fence_timeout,
                describe_missing(&st.claimed, &missing)
            );
            st.fence_failed = Some(why.clone());
            // Before any waiter answers: the launcher hears of the timeout before the
            // processes it fails can exit.
            let _ = shared.events.send(KvEvent::FenceTimedOut {
                missing,
                after: st.fence_timeout,
            });
            shared.fence_done.notify_all();
            return Err(why);
        }
    }
}

/// The ranks that did not arrive at a fence, for its timeout's message: whether each joined the
/// job at all (`claimed`). At most 16 are named.
fn describe_missing(claimed: &[bool], missing: &[ProcessId]) -> String {
    const NAMED: usize = 16;
    let mut parts: Vec<String> = missing
        .iter()
        .take(NAMED)
        .map(|&r| {
            if claimed.get(r as usize).copied().unwrap_or(false) {
                format!("rank {r} (joined the job but did not reach the fence)")
            } else {
                format!("rank {r} (never joined the job)")
            }
        })
        .collect();
    if missing.len() > NAMED {
        parts.push(format!("{} more ranks", missing.len() - NAMED));
    }
    parts.join(", ")
}

/// Reads from `stream` until `at`: each read waits at most what is left.
struct Deadline<'a, C> {
    stream: &'a mut C,
    at: std::time::Instant,
}

impl<C: Conn> std::io::Read for Deadline<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .at
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "first request too slow")
            })?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

#[cfg(test)]
mod tests {
    //! The server's logic without sockets: a connection double that fails
    //! where a real one can.

    use super::*;
    use std::io::Cursor;

    const SECRET: JobSecret = [3u8; crate::kv::SECRET_LEN];

    /// Where a [`FailingConn`] fails.
    #[derive(Clone, Copy, Debug)]
    enum FailAt {
        /// Clearing the hello's read timeout.
        ClearTimeout,
        /// Writing the hello's answer.
        Answer,
    }

    /// A connection whose input is `input` and which fails at `fail_at`.
    struct FailingConn {
        input: Cursor<Vec<u8>>,
        fail_at: FailAt,
    }

    impl Read for FailingConn {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for FailingConn {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.fail_at {
                FailAt::Answer => Err(io::ErrorKind::BrokenPipe.into()),
                FailAt::ClearTimeout => Ok(buf.len()),
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Conn for FailingConn {
        fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
            match (self.fail_at, timeout) {
                (FailAt::ClearTimeout, None) => Err(io::ErrorKind::Other.into()),
                _ => Ok(()),
            }
        }

        fn set_nodelay(&self, _on: bool) -> io::Result<()> {
            Ok(())
        }
    }

    /// A rank whose hello cannot be answered after it was claimed has left
    /// the job: another rank's fence fails at once instead of waiting for it
    /// for ever, and the launcher hears of the departure.
    #[test]
    fn a_rank_failing_after_its_claim_departs() {
        for fail_at in [FailAt::ClearTimeout, FailAt::Answer] {
            let (tx, events) = mpsc::channel();
            let shared = Shared::new(2, SECRET, tx);
            shared.pending.store(1, Ordering::SeqCst); // as `accept_loop` counts it
            let hello = proto::encode_request(Op::Hello, &SECRET, 0, "", b"").unwrap();
            let conn = FailingConn {
                input: Cursor::new(hello),
                fail_at,
            };
            serve(&shared, conn, "test peer");
            {
                let st = lock(&shared.state);
                assert!(st.claimed[0], "{fail_at:?}: the rank was claimed");
                assert_eq!(st.left, Some(0), "{fail_at:?}: the rank departed");
            }
            assert_eq!(shared.pending.load(Ordering::SeqCst), 0, "{fail_at:?}");
            let seen: Vec<KvEvent> = events.try_iter().collect();
            assert_eq!(
                seen,
                [
                    KvEvent::Joined { rank: 0 },
                    KvEvent::Disconnected { rank: 0 }
                ],
                "{fail_at:?}"
            );
            // (Checked after `left`, so that without the departure this fails
            // rather than waits.)
            let err = fence(&shared, 1).unwrap_err();
            assert!(err.contains("process 0 left"), "{fail_at:?}: {err}");
        }
    }

    /// Empty values under tiny keys are charged [`ENTRY_OVERHEAD`] each: the store refuses
    /// them once that reaches [`MAX_STORE`], long before their real cost could (without the
    /// overhead, ~16 million of them fitted, gigabytes of map entries); replacing an entry
    /// frees its old charge.
    #[test]
    fn many_empty_values_fill_the_store_at_their_per_entry_cost() {
        let (tx, _events) = mpsc::channel();
        let shared = Shared::new(2, SECRET, tx);
        let put = |rank: ProcessId, key: &str, value: &[u8]| {
            let req = proto::Request {
                op: Op::Put,
                rank,
                key,
                value,
            };
            handle(&shared, rank, &req)
        };
        let mut stored = 0usize;
        let refusal = loop {
            let key = format!("{stored:x}");
            match put(1, &key, b"") {
                (Status::Ok, _) => stored += 1,
                (_, why) => break String::from_utf8(why).unwrap(),
            }
            assert!(stored <= MAX_STORE / ENTRY_OVERHEAD, "no refusal yet");
        };
        // Keys of 1 to 5 hex digits: each entry costs 65 to 69 bytes.
        assert!(
            stored > MAX_STORE / (ENTRY_OVERHEAD + 5) && stored <= MAX_STORE / (ENTRY_OVERHEAD + 1),
            "{stored} entries stored"
        );
        assert!(
            refusal.contains("key-value store full")
                && refusal.contains("process 1")
                && refusal.contains(&format!("{MAX_STORE} bytes"))
                && refusal.contains(&format!("{ENTRY_OVERHEAD} per entry")),
            "{refusal}"
        );
        {
            let st = lock(&shared.state);
            assert_eq!(st.store.len(), stored);
            assert!(st.store_bytes <= MAX_STORE);
        }
        // Replacing an entry by one of the same size still fits; a larger one does not once
        // the store is full; other ranks' puts are refused too.
        assert_eq!(put(1, "0", b"").0, Status::Ok);
        let free = MAX_STORE - lock(&shared.state).store_bytes;
        assert_eq!(put(1, "0", &vec![0; free + 1]).0, Status::Error);
        assert_eq!(put(1, "0", &vec![0; free]).0, Status::Ok);
        assert_eq!(put(0, "x", b"").0, Status::Error);
        assert_eq!(lock(&shared.state).store_bytes, MAX_STORE);
    }

    /// A connection accepted once the shutdown began is not registered (the
    /// shutdown could not close it) and so not served.
    #[test]
    fn no_connection_is_registered_once_the_shutdown_began() {
        let (tx, _events) = mpsc::channel();
        let shared = Shared::new(1, SECRET, tx);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client_a = TcpStream::connect(addr).unwrap();
        let (a, _) = listener.accept().unwrap();
        let _client_b = TcpStream::connect(addr).unwrap();
        let (b, _) = listener.accept().unwrap();
        assert!(shared.register(1, &a));
        shared.close_all();
        assert!(shared.shutdown.load(Ordering::SeqCst));
        assert!(lock(&shared.conns).is_empty(), "the shutdown closed a");
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!((&a).read(&mut buf), Ok(0)), "a is closed");
        assert!(!shared.register(2, &b));
        assert!(lock(&shared.conns).is_empty());
    }
}
