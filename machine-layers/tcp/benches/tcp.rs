//! Cross-process latency and bandwidth of [`TcpLayer`], with a bare
//! `std::net::TcpStream` ping-pong of the same sizes (TCP_NODELAY, reused
//! buffers, vectored writes) as the floor, measured in the same run.
//!
//! The bench process is rank 0; it runs the bootstrap key-value server and
//! re-executes itself as rank 1 (the peer: an echo / sink for both
//! transports). Both processes wait for messages with
//! [`TcpLayer::progress_wait`] (no spinning), so on a 2-core machine the
//! reader threads are not starved.
//!
//! * `latency/{tcp_layer,raw_tcp}/SIZE`: one-way latency, reported as half
//!   of a measured round trip (the peer echoes the message back; the layer
//!   echo re-sends the received segments without copying).
//! * `bandwidth/{tcp_layer,raw_tcp}/SIZE`: a stream of SIZE-byte messages
//!   to the peer, ended by a marker the peer acknowledges; throughput is
//!   bytes of payload per second.
//!
//! `cargo bench -p charmrs-tcp --bench tcp` (set `CHARMRS_TCP_BENCH_SPIN_US`
//! to override `TcpConfig::wait_spin`).

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_tcp::{TcpConfig, TcpLayer};
use charmrs_transport::kv::{
    random_secret, secret_to_hex, ENV_JOB_SECRET, ENV_KV_ADDR, ENV_NPROCS, ENV_RANK,
};
use charmrs_transport::{Bootstrap, Header, KvBootstrap, KvServer, MachineLayer, Message};
use criterion::{BenchmarkId, Criterion, Throughput};

/// Set in the peer's environment.
const PEER_ENV: &str = "CHARMRS_TCP_BENCH_PEER";
/// Overrides [`TcpConfig::wait_spin`] (µs) in both processes, for A/B runs.
const SPIN_ENV: &str = "CHARMRS_TCP_BENCH_SPIN_US";
/// Bootstrap key of the peer's raw TCP listener.
const RAW_KEY: &str = "bench/raw-addr";

const SIZES: [usize; 5] = [8, 1024, 64 << 10, 1 << 20, 4 << 20];

// Layer message kinds.
const PING: u8 = 1;
const STREAM: u8 = 2;
const STREAM_END: u8 = 3;
const ACK: u8 = 4;
const QUIT: u8 = 5;

// Raw frames: a u64 header = payload length | mode << 56.
const RAW_PING: u64 = 0;
const RAW_STREAM: u64 = 1;
const RAW_END: u64 = 2;
const LEN_MASK: u64 = (1 << 56) - 1;

fn write_raw(s: &mut TcpStream, mode: u64, payload: &[u8]) {
    let hdr = (payload.len() as u64 | mode << 56).to_le_bytes();
    let total = 8 + payload.len();
    let mut done = 0;
    // A vectored write_all (IoSlice::advance_slices is newer than the MSRV).
    while done < total {
        let n = if done < 8 {
            s.write_vectored(&[IoSlice::new(&hdr[done..]), IoSlice::new(payload)])
        } else {
            s.write(&payload[done - 8..])
        }
        .expect("raw write");
        assert!(n > 0, "raw write returned 0");
        done += n;
    }
}

/// Reads one raw frame into `buf` (reused); returns `(mode, len)`.
fn read_raw(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u64, usize)> {
    let mut hdr = [0u8; 8];
    s.read_exact(&mut hdr).ok()?;
    let h = u64::from_le_bytes(hdr);
    let len = (h & LEN_MASK) as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    s.read_exact(&mut buf[..len]).ok()?;
    Some((h >> 56, len))
}

/// The layer configuration of both processes.
fn config() -> TcpConfig {
    let mut cfg = TcpConfig::default();
    if let Some(us) = std::env::var(SPIN_ENV).ok().and_then(|v| v.parse().ok()) {
        cfg.wait_spin = Duration::from_micros(us);
    }
    cfg
}

/// Rank 1: echo/sink for both transports until told to quit.
fn peer() {
    let boot = Arc::new(
        KvBootstrap::from_env()
            .expect("peer bootstrap")
            .expect("peer started without bootstrap"),
    );
    let secret = *boot.secret();
    let raw = TcpListener::bind("127.0.0.1:0").expect("raw listener");
    boot.put(RAW_KEY, raw.local_addr().unwrap().to_string().as_bytes())
        .unwrap();
    let dynboot: Arc<dyn Bootstrap> = boot.clone();
    let layer = TcpLayer::with_config(dynboot, secret, config()).expect("peer layer");
    std::thread::spawn(move || {
        let (mut s, _) = raw.accept().expect("raw accept");
        s.set_nodelay(true).unwrap();
        let mut buf = Vec::new();
        while let Some((mode, len)) = read_raw(&mut s, &mut buf) {
            match mode {
                RAW_PING => write_raw(&mut s, RAW_PING, &buf[..len]),
                RAW_END => s.write_all(&[1]).unwrap(),
                _ => {}
            }
        }
    });
    let mut quit = false;
    while !quit {
        let mut replies = Vec::new();
        layer
            .progress_wait(
                &mut |_, m| match m.header().kind {
                    PING => replies.push(m),
                    STREAM_END => replies.push(Message::new(Header::new(ACK, 1, 0, 0))),
                    QUIT => quit = true,
                    _ => {}
                },
                Duration::from_secs(1),
            )
            .expect("peer progress");
        for r in replies {
            layer.send(0, r).expect("peer send");
        }
    }
}

/// Waits for one message on `layer`.
fn recv_one(layer: &TcpLayer) -> Message {
    let mut got = None;
    while got.is_none() {
        layer
            .progress_wait(&mut |_, m| got = Some(m), Duration::from_secs(10))
            .expect("progress");
    }
    got.unwrap_or_else(|| unreachable!())
}

fn label(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{}MiB", s >> 20),
        s if s >= 1 << 10 => format!("{}KiB", s >> 10),
        s => format!("{s}B"),
    }
}

fn main() {
    if std::env::var_os(PEER_ENV).is_some() {
        peer();
        return;
    }
    let secret = random_secret().expect("secret");
    let (server, addr) = KvServer::start(2, secret).expect("kv server");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .env(PEER_ENV, "1")
        .env(ENV_RANK, "1")
        .env(ENV_NPROCS, "2")
        .env(ENV_KV_ADDR, addr.to_string())
        .env(ENV_JOB_SECRET, secret_to_hex(&secret))
        .stdin(Stdio::null())
        .spawn()
        .expect("start the peer process");
    let boot = Arc::new(KvBootstrap::connect(addr, 0, 2, secret).expect("bootstrap"));
    let dynboot: Arc<dyn Bootstrap> = boot.clone();
    let layer = TcpLayer::with_config(dynboot, secret, config()).expect("layer");
    let raw_addr: std::net::SocketAddr = String::from_utf8(boot.get(1, RAW_KEY).unwrap())
        .unwrap()
        .parse()
        .unwrap();
    let mut raw = TcpStream::connect(raw_addr).expect("raw connect");
    raw.set_nodelay(true).unwrap();

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    let mut g = c.benchmark_group("latency");
    for size in SIZES {
        let payload = Bytes::from(vec![0x5Au8; size]);
        g.bench_with_input(BenchmarkId::new("tcp_layer", label(size)), &size, |b, _| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for i in 0..iters {
                    let m =
                        Message::with_segments(Header::new(PING, 0, 1, i), vec![payload.clone()])
                            .unwrap();
                    layer.send(1, m).unwrap();
                    let back = recv_one(&layer);
                    debug_assert_eq!(back.total_len(), size);
                }
                t.elapsed() / 2
            });
        });
        let mut buf = Vec::new();
        g.bench_with_input(BenchmarkId::new("raw_tcp", label(size)), &size, |b, _| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    write_raw(&mut raw, RAW_PING, &payload);
                    let (_, len) = read_raw(&mut raw, &mut buf).expect("raw echo");
                    debug_assert_eq!(len, size);
                }
                t.elapsed() / 2
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("bandwidth");
    for size in SIZES {
        let payload = Bytes::from(vec![0xA5u8; size]);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("tcp_layer", label(size)), &size, |b, _| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for i in 0..iters {
                    let m =
                        Message::with_segments(Header::new(STREAM, 0, 1, i), vec![payload.clone()])
                            .unwrap();
                    layer.send(1, m).unwrap();
                }
                layer
                    .send(1, Message::new(Header::new(STREAM_END, 0, 1, 0)))
                    .unwrap();
                let ack = recv_one(&layer);
                assert_eq!(ack.header().kind, ACK);
                t.elapsed()
            });
        });
        g.bench_with_input(BenchmarkId::new("raw_tcp", label(size)), &size, |b, _| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    write_raw(&mut raw, RAW_STREAM, &payload);
                }
                write_raw(&mut raw, RAW_END, &[]);
                let mut ack = [0u8; 1];
                raw.read_exact(&mut ack).expect("raw ack");
                t.elapsed()
            });
        });
    }
    g.finish();
    c.final_summary();

    layer
        .send(1, Message::new(Header::new(QUIT, 0, 1, 0)))
        .unwrap();
    drop(raw);
    let _ = child.wait();
    drop(layer);
    drop(server);
}
