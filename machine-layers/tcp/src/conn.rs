//! Background threads of a layer: the accept loop (one short-lived thread
//! per incoming connection runs its handshake, then hands the socket to the
//! receive side, [`crate::recv`]) and one watcher per outgoing connection, which finds the
//! peer's death (the stream's end, an error, or its host's silence: [`crate::acks`]).
//!
//! # Invariants
//!
//! * Everything read from a socket here is hostile: the handshake must
//!   prove the job secret (constant-time comparison) and name a valid,
//!   not-yet-connected rank of a job of our size before a connection is
//!   adopted; anything else is refused and logged with the peer address.
//!   Nothing here panics on input.
//! * At most [`MAX_PENDING`] handshakes run at once; each is bounded by
//!   `cfg.handshake_timeout`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use charmrs_transport::kv::ct_eq;
use charmrs_transport::ProcessId;

use crate::acks::{AckState, SilenceWatch};
use crate::shared::{lock, Shared};
use crate::wire::{self, ACK_MAGIC, HELLO_LEN, HELLO_MAGIC};

/// Handshakes in progress at once; further connections wait in the
/// listen backlog.
const MAX_PENDING: usize = 128;

/// Accepts connections until the layer shuts down; each gets a thread that
/// runs the handshake and then hands the socket to the receive side.
pub(crate) fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for conn in listener.incoming() {
        if shared.closing.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("charmrs-tcp[rank {}]: accept failed: {e}", shared.rank);
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let Ok(addr) = stream.peer_addr() else {
            continue;
        };
        // At the cap, wait rather than refuse: a burst of legitimate peers
        // must not be turned away (slow handshakes time out after
        // `cfg.handshake_timeout`, so a slot always frees up).
        while shared.pending.load(Ordering::SeqCst) >= MAX_PENDING {
            if shared.closing.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        shared.pending.fetch_add(1, Ordering::SeqCst);
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("charmrs-tcp-reader".to_owned())
            .spawn(move || serve_incoming(&s, stream, addr));
        if spawned.is_err() {
            shared.pending.fetch_sub(1, Ordering::SeqCst);
            refuse(shared, addr, "cannot start a reader thread");
        }
    }
}

/// Logs a refused connection (never fatal).
fn refuse(shared: &Shared, addr: SocketAddr, why: &str) {
    shared
        .counters
        .connections_refused
        .fetch_add(1, Ordering::Relaxed);
    eprintln!(
        "charmrs-tcp[rank {}]: refused connection from {addr}: {why}",
        shared.rank
    );
}

/// Handshake, then hand-over to the receive side (or refusal).
fn serve_incoming(shared: &Shared, mut stream: TcpStream, addr: SocketAddr) {
    let accepted = accept_handshake(shared, &mut stream, addr);
    shared.pending.fetch_sub(1, Ordering::SeqCst);
    let (p, conn_id) = match accepted {
        Ok(x) => x,
        Err(why) => {
            refuse(shared, addr, &why);
            return;
        }
    };
    if let Err(why) = crate::recv::adopt(shared, p, conn_id, addr, stream) {
        if let Some(ev) = shared.end_incoming(p, conn_id) {
            shared.push(ev);
        }
        refuse(shared, addr, &why);
    }
}

/// Checks the hello; on success claims the peer's incoming slot and
/// answers. Returns the peer's rank and the connection id.
fn accept_handshake(
    shared: &Shared,
    stream: &mut TcpStream,
    _addr: SocketAddr,
) -> Result<(ProcessId, u64), String> {
    stream
        .set_read_timeout(Some(shared.cfg.handshake_timeout))
        .map_err(|e| e.to_string())?;
    let mut hello = [0u8; HELLO_LEN];
    stream
        .read_exact(&mut hello)
        .map_err(|e| format!("no complete handshake: {e}"))?;
    let (rank, size, secret) = wire::decode_hello(&hello, HELLO_MAGIC)?;
    if !ct_eq(secret, &shared.secret) {
        return Err("wrong job secret".to_owned());
    }
    if size != shared.size {
        return Err(format!(
            "peer believes the job has {size} processes, it has {}",
            shared.size
        ));
    }
    if rank >= shared.size || rank == shared.rank {
        return Err(format!("peer claims rank {rank}"));
    }
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    {
        let mut slot = lock(&shared.peers[rank as usize].incoming);
        if slot.conn.is_some() {
            return Err(format!("process {rank} is already connected"));
        }
        slot.conn = Some((id, stream.try_clone().map_err(|e| e.to_string())?));
    }
    let mut answer = || -> io::Result<()> {
        stream.write_all(&wire::encode_hello(
            ACK_MAGIC,
            shared.rank,
            shared.size,
            &shared.secret,
        ))?;
        stream.set_read_timeout(None)?;
        stream.set_nodelay(true)?;
        crate::poll::keep_alive(&stream)
    };
    if let Err(e) = answer() {
        if let Some(ev) = shared.end_incoming(rank, id) {
            shared.push(ev);
        }
        return Err(format!("answering the handshake: {e}"));
    }
    shared
        .counters
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    Ok((rank, id))
}

/// How often the watcher of an outgoing stream asks the kernel whether the peer's host still
/// acknowledges what was sent (see [`SilenceWatch`]: successive looks decide, never one).
const ACK_LOOK_EVERY: Duration = Duration::from_secs(1);

/// Watches our stream to `dst` (connection `id`): the peer writes nothing
/// on it but a goodbye byte, so end-of-stream or an error means the peer
/// died (or departed, after the goodbye). Every second it also looks whether data in flight to
/// the peer has gone unacknowledged by its host for `cfg.ack_timeout`, and declares the peer
/// lost once its [`SilenceWatch`] decides so.
pub(crate) fn watch_outgoing(shared: &Shared, dst: ProcessId, id: u64, mut s: TcpStream) {
    let addr = shared.peers[dst as usize].addr;
    let limit = shared.cfg.ack_timeout;
    // The timeout only bounds this thread's reads: the peer writes nothing else on the stream,
    // and every write to it waits without a read (`poll::send_nowait`, `wait_writable`).
    let looking = limit != Duration::MAX && s.set_read_timeout(Some(ACK_LOOK_EVERY)).is_ok();
    let mut buf = [0u8; 16];
    let mut bye = false;
    let mut silence = SilenceWatch::new(limit);
    let why = loop {
        match s.read(&mut buf) {
            Ok(0) => break "connection closed by the peer".to_owned(),
            Ok(n) if buf[..n].iter().all(|&b| b == wire::BYE_BYTE) => bye = true,
            Ok(_) => break "unexpected bytes from the peer".to_owned(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if looking
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                let silent = AckState::of(s.as_fd())
                    .ok()
                    .and_then(|state| silence.look(&state, Instant::now()));
                if let Some(why) = silent {
                    break why;
                }
            }
            Err(e) => break e.to_string(),
        }
    };
    if bye {
        shared.depart(dst);
    } else if !shared.closing.load(Ordering::SeqCst) {
        shared.lose(dst, format!("connection to process {dst} ({addr}): {why}"));
    }
    // Shut down this connection only: never one made since.
    let mine = {
        let mut ctl = lock(&shared.peers[dst as usize].out_ctl);
        match &*ctl {
            Some((cid, _)) if *cid == id => ctl.take(),
            _ => None,
        }
    };
    if let Some((_, c)) = mine {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}
