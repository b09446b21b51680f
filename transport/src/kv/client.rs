//! [`KvBootstrap`]: the process side of the launcher bootstrap.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use super::proto::{self, Op, Status};
use super::{
    fence_timeout_from_env, parse_secret_hex, JobSecret, DEFAULT_FENCE_TIMEOUT, ENV_JOB_SECRET,
    ENV_KV_ADDR, ENV_NPROCS, ENV_PPN, ENV_RANK, ENV_TOTAL_PES, FENCE_CLIENT_GRACE,
};
use crate::bootstrap::Bootstrap;
use crate::error::TransportError;
use crate::layer::ProcessId;

/// How long connecting to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Bootstrap::abort`] waits for the server to acknowledge.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

type Response = Result<(Status, Vec<u8>), String>;

/// [`Bootstrap`] backed by the key-value server of `charmrun`
/// ([`KvServer`](super::KvServer)), over one persistent TCP connection.
///
/// Requests are serialized (one in flight per process); `fence` blocks the
/// connection until every process arrived. All methods are thread-safe.
///
/// A bootstrap made by [`KvBootstrap::from_env`] is the process's
/// *lifeline* to the launcher: if the server's connection closes while the
/// bootstrap is alive (charmrun died or was killed), the process prints a
/// message on stderr and exits with status 1, so no orphan outlives its
/// job. [`KvBootstrap::connect`] does not do that.
///
/// Every request waits for its answer at most
/// [`fence_timeout`](KvBootstrap::fence_timeout) plus
/// [`FENCE_CLIENT_GRACE`](super::FENCE_CLIENT_GRACE) (the server fails a
/// fence at its own timeout first); after a request ran out of time the
/// connection is out of step with the server, and every later request fails
/// at once.
pub struct KvBootstrap {
    rank: ProcessId,
    size: u32,
    ppn: Option<u32>,
    total_pes: Option<u32>,
    secret: JobSecret,
    addr: SocketAddr,
    fence_timeout: Duration,
    conn: Mutex<Conn>,
    closing: Arc<AtomicBool>,
}

struct Conn {
    stream: TcpStream,
    responses: mpsc::Receiver<Response>,
    /// Why the connection can serve no more requests (an answer never came in time).
    broken: Option<String>,
}

fn bootstrap_err(m: impl Into<String>) -> TransportError {
    TransportError::Bootstrap(m.into())
}

fn env_u32(name: &str) -> Result<u32, TransportError> {
    let v = std::env::var(name).map_err(|_| {
        bootstrap_err(format!(
            "{ENV_KV_ADDR} is set (launched by charmrun) but {name} is missing or not UTF-8"
        ))
    })?;
    v.trim()
        .parse()
        .map_err(|_| bootstrap_err(format!("{name}={v:?} is not a non-negative integer")))
}

fn env_opt_u32(name: &str) -> Result<Option<u32>, TransportError> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| bootstrap_err(format!("{name}={v:?} is not a non-negative integer"))),
    }
}

impl KvBootstrap {
    /// The bootstrap of a process started by `charmrun`, configured from
    /// [`ENV_RANK`], [`ENV_NPROCS`], [`ENV_KV_ADDR`], [`ENV_JOB_SECRET`]
    /// (and, if present, [`ENV_PPN`], [`ENV_TOTAL_PES`] and
    /// [`ENV_KV_FENCE_TIMEOUT`](super::ENV_KV_FENCE_TIMEOUT)). `Ok(None)` when
    /// [`ENV_KV_ADDR`] is unset: the process was not started by charmrun.
    ///
    /// The returned bootstrap is the process's lifeline (see the type docs).
    ///
    /// # Errors
    ///
    /// [`TransportError::Bootstrap`] if a variable is missing or invalid, or
    /// the server refuses the connection; [`TransportError::Io`] if it
    /// cannot be reached.
    pub fn from_env() -> Result<Option<KvBootstrap>, TransportError> {
        let Ok(addr) = std::env::var(ENV_KV_ADDR) else {
            return Ok(None);
        };
        let rank = env_u32(ENV_RANK)?;
        let size = env_u32(ENV_NPROCS)?;
        let secret = std::env::var(ENV_JOB_SECRET)
            .map_err(|_| {
                bootstrap_err(format!(
                    "{ENV_KV_ADDR} is set but {ENV_JOB_SECRET} is missing"
                ))
            })
            .and_then(|s| parse_secret_hex(s.trim()))?;
        let ppn = env_opt_u32(ENV_PPN)?;
        let total_pes = env_opt_u32(ENV_TOTAL_PES)?;
        let fence_timeout = fence_timeout_from_env()?;
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| bootstrap_err(format!("{ENV_KV_ADDR}={addr:?}: {e}")))?
            .next()
            .ok_or_else(|| bootstrap_err(format!("{ENV_KV_ADDR}={addr:?} resolves to nothing")))?;
        let mut b = KvBootstrap::open(sock, rank, size, secret, true)?;
        b.ppn = ppn;
        b.total_pes = total_pes;
        b.fence_timeout = fence_timeout;
        Ok(Some(b))
    }

    /// Connects to the server at `addr` as process `rank` of `size`,
    /// authenticated by `secret`. Not a lifeline (see the type docs); its
    /// fence timeout is [`DEFAULT_FENCE_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// [`TransportError::UnknownProcess`] if `rank >= size`;
    /// [`TransportError::Bootstrap`] if the server refuses (wrong secret,
    /// rank already connected); [`TransportError::Io`] if it cannot be
    /// reached.
    pub fn connect(
        addr: SocketAddr,
        rank: ProcessId,
        size: u32,
        secret: JobSecret,
    ) -> Result<KvBootstrap, TransportError> {
        KvBootstrap::open(addr, rank, size, secret, false)
    }

    fn open(
        addr: SocketAddr,
        rank: ProcessId,
        size: u32,
        secret: JobSecret,
        lifeline: bool,
    ) -> Result<KvBootstrap, TransportError> {
        if rank >= size {
            return Err(TransportError::UnknownProcess { dst: rank, size });
        }
        let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
            bootstrap_err(format!("cannot reach the key-value server at {addr}: {e}"))
        })?;
        stream.set_nodelay(true)?;
        stream.write_all(&proto::encode_request(Op::Hello, &secret, rank, "", b"")?)?;
        stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
        let reply = proto::read_body(&mut stream, proto::MAX_RESPONSE)
            .map_err(|e| bootstrap_err(format!("key-value server at {addr}: {e}")))?
            .ok_or_else(|| {
                bootstrap_err(format!(
                    "key-value server at {addr} closed the connection (wrong job secret?)"
                ))
            })?;
        match proto::decode_response(reply)? {
            (Status::Ok, _) => {}
            (_, why) => {
                return Err(bootstrap_err(format!(
                    "key-value server at {addr} refused rank {rank}: {}",
                    String::from_utf8_lossy(&why)
                )))
            }
        }
        stream.set_read_timeout(None)?;
        let (tx, rx) = mpsc::channel();
        let closing = Arc::new(AtomicBool::new(false));
        let mut reader = stream.try_clone()?;
        let reader_closing = Arc::clone(&closing);
        std::thread::Builder::new()
            .name("charmrs-kv-client".to_owned())
            .spawn(move || loop {
                let outcome = match proto::read_body(&mut reader, proto::MAX_RESPONSE) {
                    Ok(Some(body)) => proto::decode_response(body).map_err(|e| e.to_string()),
                    Ok(None) => Err("connection closed".to_owned()),
                    Err(e) => Err(e.to_string()),
                };
                let failed = outcome.is_err();
                if failed && lifeline && !reader_closing.load(Ordering::SeqCst) {
                    eprintln!(
                        "charmrs: rank {rank}: lost the launcher (key-value server at {addr}: {}); exiting",
                        outcome.as_ref().err().map_or("", String::as_str)
                    );
                    std::process::exit(1);
                }
                if tx.send(outcome).is_err() || failed {
                    break;
                }
            })?;
        Ok(KvBootstrap {
            rank,
            size,
            ppn: None,
            total_pes: None,
            secret,
            addr,
            fence_timeout: DEFAULT_FENCE_TIMEOUT,
            conn: Mutex::new(Conn {
                stream,
                responses: rx,
                broken: None,
            }),
            closing,
        })
    }

    /// The job secret (also used to authenticate machine-layer
    /// connections).
    pub fn secret(&self) -> &JobSecret {
        &self.secret
    }

    /// PEs per process ([`ENV_PPN`]) when started by charmrun.
    pub fn ppn(&self) -> Option<u32> {
        self.ppn
    }

    /// PEs of the whole job ([`ENV_TOTAL_PES`]) when started by charmrun.
    pub fn total_pes(&self) -> Option<u32> {
        self.total_pes
    }

    /// Address of the key-value server.
    pub fn server_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The fence timeout this process assumes the server uses:
    /// [`ENV_KV_FENCE_TIMEOUT`](super::ENV_KV_FENCE_TIMEOUT) for
    /// [`KvBootstrap::from_env`], else [`DEFAULT_FENCE_TIMEOUT`]. A request
    /// waits for its answer at most this plus
    /// [`FENCE_CLIENT_GRACE`](super::FENCE_CLIENT_GRACE).
    pub fn fence_timeout(&self) -> Duration {
        self.fence_timeout
    }

    /// Sets [`KvBootstrap::fence_timeout`].
    pub fn set_fence_timeout(&mut self, timeout: Duration) {
        self.fence_timeout = timeout;
    }

    /// Sends one request and waits for its response.
    fn request(
        &self,
        op: Op,
        rank: ProcessId,
        key: &str,
        value: &[u8],
    ) -> Result<(Status, Vec<u8>), TransportError> {
        let wire = proto::encode_request(op, &self.secret, rank, key, value)
            .map_err(|e| bootstrap_err(e.to_string()))?;
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let lost = |why: String| {
            bootstrap_err(format!("lost the key-value server at {}: {why}", self.addr))
        };
        if let Some(why) = &conn.broken {
            return Err(lost(why.clone()));
        }
        conn.stream
            .write_all(&wire)
            .map_err(|e| lost(e.to_string()))?;
        let limit = self.fence_timeout.saturating_add(FENCE_CLIENT_GRACE);
        match conn.responses.recv_timeout(limit) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(why)) => Err(lost(why)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(lost("connection closed".to_owned())),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // A late answer would be taken for the next request's: no more requests.
                let why = format!("no answer to a {op:?} request within {limit:?}");
                conn.broken = Some(why.clone());
                Err(lost(why))
            }
        }
    }
}

impl Bootstrap for KvBootstrap {
    fn rank(&self) -> ProcessId {
        self.rank
    }

    fn size(&self) -> u32 {
        self.size
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<(), TransportError> {
        match self.request(Op::Put, self.rank, key, value)? {
            (Status::Ok, _) => Ok(()),
            (_, why) => Err(bootstrap_err(format!(
                "put {key:?}: {}",
                String::from_utf8_lossy(&why)
            ))),
        }
    }

    fn get(&self, rank: ProcessId, key: &str) -> Result<Vec<u8>, TransportError> {
        if rank >= self.size {
            return Err(TransportError::UnknownProcess {
                dst: rank,
                size: self.size,
            });
        }
        match self.request(Op::Get, rank, key, b"")? {
            (Status::Ok, v) => Ok(v),
            (Status::NotFound, _) => Err(bootstrap_err(format!(
                "no value for key {key:?} from rank {rank}"
            ))),
            (Status::Error, why) => Err(bootstrap_err(format!(
                "get {key:?} from rank {rank}: {}",
                String::from_utf8_lossy(&why)
            ))),
        }
    }

    fn fence(&self) -> Result<(), TransportError> {
        match self.request(Op::Fence, self.rank, "", b"")? {
            (Status::Ok, _) => Ok(()),
            (_, why) => Err(bootstrap_err(format!(
                "fence: {}",
                String::from_utf8_lossy(&why)
            ))),
        }
    }

    /// Tells the launcher over a fresh connection (so it works even while
    /// another thread sits in a fence); waits at most 2 s for the
    /// acknowledgement.
    fn abort(&self, reason: &str) {
        let reason = &reason.as_bytes()[..reason.len().min(proto::MAX_VALUE)];
        let Ok(wire) = proto::encode_request(Op::Abort, &self.secret, self.rank, "", reason) else {
            return;
        };
        if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, ABORT_TIMEOUT) {
            let _ = s.set_read_timeout(Some(ABORT_TIMEOUT));
            if s.write_all(&wire).is_ok() {
                let _ = proto::read_body(&mut s, proto::MAX_RESPONSE);
            }
        }
    }
}

impl std::fmt::Debug for KvBootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("KvBootstrap")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("server", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for KvBootstrap {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _ = conn.stream.shutdown(Shutdown::Both);
    }
}
