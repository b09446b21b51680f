//! [`KvServer`]: the launcher's key-value rendezvous (see the module docs of
//! [`crate::kv`] for the contract).

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::{self, Op, Reject, Status};
use super::JobSecret;
use crate::error::TransportError;
use crate::layer::ProcessId;

/// How long an unauthenticated connection may take to send its whole first
/// request (one deadline, not one per read: a client trickling a byte at a
/// time cannot hold its slot longer).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Unauthenticated connections served at once; further ones wait in the
/// listen backlog.
const MAX_PENDING: usize = 64;
/// Total bytes of keys and values the store holds.
const MAX_STORE: usize = 64 << 20;

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
        let shared = Arc::new(Shared {
            nprocs,
            secret,
            state: Mutex::new(State {
                store: HashMap::new(),
                store_bytes: 0,
                claimed: vec![false; nprocs as usize],
                left: None,
                fence_generation: 0,
                fence_arrived: 0,
            }),
            fence_done: Condvar::new(),
            shutdown: AtomicBool::new(false),
            events: tx,
            conns: Mutex::new(HashMap::new()),
            pending: AtomicUsize::new(0),
        });
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
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.fence_done.notify_all();
        for (_, c) in lock(&self.shared.conns).drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
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
        shared.pending.fetch_add(1, Ordering::SeqCst);
        next_id += 1;
        let id = next_id;
        if let Ok(c) = stream.try_clone() {
            lock(&shared.conns).insert(id, c);
        }
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

/// Serves one connection until it closes.
fn serve(shared: &Shared, mut stream: TcpStream, peer: &str) {
    let refuse = |why: &str| eprintln!("charmrs-kv: refused connection from {peer}: {why}");
    let rank = match hello(shared, &mut stream) {
        Ok(rank) => rank,
        Err(why) => {
            shared.pending.fetch_sub(1, Ordering::SeqCst);
            if let Some(why) = why {
                refuse(&why);
            }
            return;
        }
    };
    shared.pending.fetch_sub(1, Ordering::SeqCst);
    loop {
        let body = match proto::read_body(&mut stream, proto::MAX_REQUEST) {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                if !shared.shutdown.load(Ordering::SeqCst) {
                    eprintln!("charmrs-kv: dropping process {rank} ({peer}): {e}");
                }
                break;
            }
        };
        let req = match proto::decode_request(&body, &shared.secret) {
            Ok(r) => r,
            Err(Reject::BadSecret) => {
                eprintln!("charmrs-kv: dropping process {rank} ({peer}): wrong job secret");
                break;
            }
            Err(Reject::Malformed(m)) => {
                eprintln!("charmrs-kv: dropping process {rank} ({peer}): malformed request: {m}");
                break;
            }
        };
        let (status, payload) = handle(shared, rank, &req);
        if proto::write_response(&mut stream, status, &payload).is_err() {
            break;
        }
    }
    {
        let mut st = lock(&shared.state);
        st.left.get_or_insert(rank);
    }
    shared.fence_done.notify_all();
    let _ = shared.events.send(KvEvent::Disconnected { rank });
}

/// Authenticates the first request, which must claim a rank. `Err(None)`:
/// closed silently before sending anything.
fn hello(shared: &Shared, stream: &mut TcpStream) -> Result<ProcessId, Option<String>> {
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
    let claim = {
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
    match claim {
        Ok(rank) => {
            stream
                .set_read_timeout(None)
                .map_err(|e| Some(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let _ = shared.events.send(KvEvent::Joined { rank });
            proto::write_response(stream, Status::Ok, b"").map_err(|e| Some(e.to_string()))?;
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
            let old = st.store.get(&key).map_or(0, |v| v.len() + req.key.len());
            let new_total = st.store_bytes - old + req.key.len() + req.value.len();
            if new_total > MAX_STORE {
                return err(format!(
                    "key-value store full ({MAX_STORE} bytes): cannot add {} bytes",
                    req.value.len()
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
        Op::Fence => match fence(shared) {
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
/// fails once a rank left the job.
fn fence(shared: &Shared) -> Result<(), String> {
    let mut st = lock(&shared.state);
    if let Some(r) = st.left {
        return Err(format!(
            "process {r} left the job; the fence cannot complete"
        ));
    }
    let generation = st.fence_generation;
    st.fence_arrived += 1;
    if st.fence_arrived == shared.nprocs {
        st.fence_arrived = 0;
        st.fence_generation += 1;
        shared.fence_done.notify_all();
        return Ok(());
    }
    loop {
        st = shared
            .fence_done
            .wait_timeout(st, Duration::from_millis(200))
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
        if shared.shutdown.load(Ordering::SeqCst) {
            return Err("the key-value server is shutting down".to_owned());
        }
    }
}

/// Reads from `stream` until `at`: each read waits at most what is left.
struct Deadline<'a> {
    stream: &'a mut TcpStream,
    at: std::time::Instant,
}

impl std::io::Read for Deadline<'_> {
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
