//! Benchmark of [`OfiLayer`] beside libfabric's own `fi_pingpong`, in one
//! invocation, on loopback.
//!
//! ```text
//! charmrs-ofi-bench [--providers shm,tcp;ofi_rxm] [--reps 3] [--sizes 8,64,...]
//! ```
//!
//! For each provider and each of `--reps` rounds (interleaved, so machine
//! noise hits both sides alike) it
//!
//! 1. starts two processes of itself over a key-value bootstrap (as
//!    `charmrun` does) that measure, through `OfiLayer`, the one-way
//!    latency (half the ping-pong round trip, both sides busy-polling
//!    `progress`), the same ping-pong with the reply sent from a second
//!    thread of the receiving process (the runtime's "PE thread sends,
//!    network thread progresses" case: the send goes through the lock-free
//!    queue or the engine's `try_lock`; the figure includes waking that
//!    thread through a channel), the streaming bandwidth (a window of 32
//!    messages, then a small acknowledgement), and the same stream sent by a
//!    second thread while the main thread only progresses;
//! 2. runs `fi_pingpong -e rdm -p PROVIDER -S SIZE` (server and client)
//!    for the same sizes.
//!
//! The last column is the receiver's minor page faults per streamed
//! message (a scheduling-independent cost figure). It prints, per cell, the median and the best value over the rounds
//! (the machine may be shared: the best shows what the code can do, the
//! median what a run typically sees). `FI_TCP_IFACE=lo` is forced, so
//! nothing leaves the host.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_ofi::{OfiConfig, OfiLayer};
use charmrs_transport::kv::{
    random_secret, secret_to_hex, KvServer, ENV_JOB_SECRET, ENV_KV_ADDR, ENV_NPROCS, ENV_RANK,
};
use charmrs_transport::{Header, MachineLayer, Message, ProcessId};

const CHILD_ENV: &str = "CHARMRS_OFI_BENCH_CHILD";
const DEFAULT_SIZES: &[usize] = &[8, 64, 512, 4 << 10, 32 << 10, 256 << 10, 1 << 20, 4 << 20];
const WINDOW: usize = 32;

fn iters_for(size: usize) -> usize {
    (((64 << 20) / size.max(1)).clamp(30, 3000) as f64 * 1.0) as usize
}

/// Receives exactly one message (busy polling).
fn recv_one(layer: &OfiLayer) -> (ProcessId, Message) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = None;
    while got.is_none() {
        assert!(Instant::now() < deadline, "bench: no message within 60 s");
        layer
            .progress(&mut |s, m| {
                assert!(got.is_none(), "bench: two messages in one progress");
                got = Some((s, m));
            })
            .unwrap_or_else(|e| panic!("bench progress: {e}"));
    }
    got.unwrap_or_else(|| unreachable!())
}

/// Receives `n` messages (busy polling).
fn recv_n(layer: &OfiLayer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut c = 0;
    while c < n {
        assert!(Instant::now() < deadline, "bench: only {c} of {n} messages");
        c += layer
            .progress(&mut |_, _| {})
            .unwrap_or_else(|e| panic!("bench progress: {e}"));
    }
}

fn msg(size: usize, payload: &Bytes, tag: u64) -> Message {
    Message::with_segments(Header::new(1, 0, 0, tag), vec![payload.slice(..size)])
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Minor page faults of this process so far.
fn minor_faults() -> i64 {
    // SAFETY: getrusage fills the zero-initialized struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru.ru_minflt
    }
}

/// One process of the pair.
fn child(sizes: &[usize]) {
    let layer = Arc::new(
        OfiLayer::from_env(OfiConfig::from_env().unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("OfiLayer::from_env: {e}"))
            .unwrap_or_else(|| panic!("bench child without bootstrap")),
    );
    let me = layer.rank();
    let peer = 1 - me;
    let max = sizes.iter().copied().max().unwrap_or(8);
    let payload = Bytes::from(vec![0x5Au8; max]);
    for &size in sizes {
        let iters = iters_for(size);
        let warm = iters / 10 + 2;
        layer.barrier().unwrap_or_else(|e| panic!("barrier: {e}"));
        // Ping-pong, sends from the progressing thread.
        let mut t0 = Instant::now();
        for i in 0..iters + warm {
            if i == warm {
                t0 = Instant::now();
            }
            if me == 0 {
                layer
                    .send(peer, msg(size, &payload, i as u64))
                    .unwrap_or_else(|e| panic!("{e}"));
                recv_one(&layer);
            } else {
                recv_one(&layer);
                layer
                    .send(peer, msg(size, &payload, i as u64))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let lat = t0.elapsed().as_secs_f64() * 1e6 / (2.0 * iters as f64);

        // Ping-pong where rank 1 replies from another thread.
        layer.barrier().unwrap_or_else(|e| panic!("barrier: {e}"));
        let lat_mt = if me == 0 {
            let mut t0 = Instant::now();
            for i in 0..iters + warm {
                if i == warm {
                    t0 = Instant::now();
                }
                layer
                    .send(peer, msg(size, &payload, i as u64))
                    .unwrap_or_else(|e| panic!("{e}"));
                recv_one(&layer);
            }
            t0.elapsed().as_secs_f64() * 1e6 / (2.0 * iters as f64)
        } else {
            let (tx, rx) = std::sync::mpsc::channel::<Message>();
            let l2 = Arc::clone(&layer);
            let worker = std::thread::spawn(move || {
                for m in rx {
                    l2.send(peer, m).unwrap_or_else(|e| panic!("{e}"));
                }
            });
            for _ in 0..iters + warm {
                let (_, m) = recv_one(&layer);
                tx.send(m).unwrap_or_else(|e| panic!("{e}"));
            }
            // Flush the last reply's posting before leaving the loop.
            drop(tx);
            worker.join().unwrap_or_else(|_| panic!("worker"));
            0.0
        };

        // Streaming bandwidth: WINDOW messages, then a small ack.
        layer.barrier().unwrap_or_else(|e| panic!("barrier: {e}"));
        let rounds = (iters / WINDOW).max(4);
        let mut faults0 = minor_faults();
        let mut t0 = Instant::now();
        for r in 0..rounds + 1 {
            if r == 1 {
                t0 = Instant::now();
                faults0 = minor_faults();
            }
            if me == 0 {
                for i in 0..WINDOW {
                    layer
                        .send(peer, msg(size, &payload, i as u64))
                        .unwrap_or_else(|e| panic!("{e}"));
                }
                recv_one(&layer);
            } else {
                recv_n(&layer, WINDOW);
                layer
                    .send(peer, msg(8, &payload, 0))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let bw = (rounds * WINDOW * size) as f64 / secs / 1e6;
        if me == 1 {
            let per_msg = (minor_faults() - faults0) as f64 / (rounds * WINDOW) as f64;
            println!("FAULTS {size} {per_msg:.2}");
        }

        // The same stream, sent by a second thread of rank 0 while its main
        // thread only progresses (sends cross the lock-free queue or take
        // the engine with try_lock).
        layer.barrier().unwrap_or_else(|e| panic!("barrier: {e}"));
        let bw_mt = if me == 0 {
            let (go_tx, go_rx) = std::sync::mpsc::channel::<bool>();
            let l2 = Arc::clone(&layer);
            let p2 = payload.clone();
            let sender = std::thread::spawn(move || {
                while let Ok(true) = go_rx.recv() {
                    for i in 0..WINDOW {
                        l2.send(peer, msg(size, &p2, i as u64))
                            .unwrap_or_else(|e| panic!("{e}"));
                    }
                }
            });
            let mut t0 = Instant::now();
            for r in 0..rounds + 1 {
                if r == 1 {
                    t0 = Instant::now();
                }
                go_tx.send(true).unwrap_or_else(|e| panic!("{e}"));
                recv_one(&layer);
            }
            let secs = t0.elapsed().as_secs_f64();
            let _ = go_tx.send(false);
            sender.join().unwrap_or_else(|_| panic!("sender"));
            (rounds * WINDOW * size) as f64 / secs / 1e6
        } else {
            for _ in 0..rounds + 1 {
                recv_n(&layer, WINDOW);
                layer
                    .send(peer, msg(8, &payload, 0))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            0.0
        };
        if me == 0 {
            println!("RESULT {size} {lat:.3} {lat_mt:.3} {bw:.1} {bw_mt:.1}");
        }
    }
    layer.barrier().unwrap_or_else(|e| panic!("barrier: {e}"));
    // Keep progressing briefly so the peer's last ACKs and goodbye flow.
    let end = Instant::now() + Duration::from_millis(100);
    while Instant::now() < end {
        let _ = layer.progress(&mut |_, _| {});
    }
}

/// Runs the two `OfiLayer` processes; returns size -> (lat, lat_mt, bw).
fn run_layer(provider: &str, sizes: &[usize]) -> BTreeMap<usize, [f64; 5]> {
    let secret = random_secret().unwrap_or_else(|e| panic!("{e}"));
    let (server, addr) = KvServer::start(2, secret).unwrap_or_else(|e| panic!("{e}"));
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let sizes_arg = sizes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let children: Vec<_> = (0..2)
        .map(|r| {
            Command::new(&exe)
                .args(["--sizes", &sizes_arg])
                .env(CHILD_ENV, "1")
                .env(ENV_RANK, r.to_string())
                .env(ENV_NPROCS, "2")
                .env(ENV_KV_ADDR, addr.to_string())
                .env(ENV_JOB_SECRET, secret_to_hex(&secret))
                .env("CHARMRS_OFI_PROVIDER", provider)
                .env("FI_TCP_IFACE", "lo")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn bench child: {e}"))
        })
        .collect();
    let mut out: BTreeMap<usize, [f64; 5]> = BTreeMap::new();
    let mut faults = BTreeMap::new();
    for c in children {
        let o = c.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        assert!(o.status.success(), "bench child failed: {:?}", o.status);
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 6 && f[0] == "RESULT" {
                let p = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
                out.insert(
                    f[1].parse().unwrap_or(0),
                    [p(f[2]), p(f[3]), p(f[4]), p(f[5]), f64::NAN],
                );
            }
            if f.len() == 3 && f[0] == "FAULTS" {
                faults.insert(
                    f[1].parse::<usize>().unwrap_or(0),
                    f[2].parse().unwrap_or(f64::NAN),
                );
            }
        }
    }
    drop(server);
    for (s, f) in faults {
        if let Some(r) = out.get_mut(&s) {
            r[4] = f;
        }
    }
    out
}

/// Runs `fi_pingpong` for one size; returns (usec/xfer, MB/sec).
fn run_fi_pingpong(provider: &str, size: usize, port: u16) -> Option<(f64, f64)> {
    let iters = (iters_for(size) * 4).to_string();
    let common = |c: &mut Command| {
        c.args([
            "-e",
            "rdm",
            "-p",
            provider,
            "-I",
            &iters,
            "-S",
            &size.to_string(),
        ])
        .env("FI_TCP_IFACE", "lo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    };
    let mut srv = Command::new("fi_pingpong");
    common(&mut srv);
    let srv = srv.args(["-B", &port.to_string()]).spawn().ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut cli = Command::new("fi_pingpong");
    common(&mut cli);
    let cli = cli
        .args(["-P", &port.to_string(), "127.0.0.1"])
        .output()
        .ok()?;
    let _ = srv.wait_with_output();
    // Last line: bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec
    let text = String::from_utf8_lossy(&cli.stdout).into_owned();
    let line = text.lines().last()?;
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        return None;
    }
    Some((f[6].parse().ok()?, f[5].parse().ok()?))
}

/// Median and best (smallest if `low`, else largest) of the finite values.
fn stats(mut v: Vec<f64>, low: bool) -> (f64, f64) {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let best = if low { v[0] } else { v[v.len() - 1] };
    (v[v.len() / 2], best)
}

/// `median/best` with the given precision.
fn cell(v: (f64, f64), prec: usize) -> String {
    format!("{:.*}/{:.*}", prec, v.0, prec, v.1)
}

fn human(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{}M", size >> 20)
    } else if size >= 1 << 10 {
        format!("{}K", size >> 10)
    } else {
        size.to_string()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let sizes: Vec<usize> = opt("--sizes")
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| DEFAULT_SIZES.to_vec());
    if std::env::var_os(CHILD_ENV).is_some() {
        child(&sizes);
        return;
    }
    let providers: Vec<String> = opt("--providers")
        .unwrap_or_else(|| "shm,tcp;ofi_rxm".to_owned())
        .split(',')
        .map(str::to_owned)
        .collect();
    let reps: usize = opt("--reps").and_then(|s| s.parse().ok()).unwrap_or(3);
    let have_pp = Command::new("fi_pingpong")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    println!(
        "charmrs-ofi-bench: {reps} interleaved rounds, medians; loopback; fi_pingpong {}",
        if have_pp {
            "found"
        } else {
            "NOT FOUND (apt-get install libfabric-bin)"
        }
    );
    let mut port = 47_700u16 + (std::process::id() % 200) as u16;
    for prov in &providers {
        let mut ours: BTreeMap<usize, Vec<[f64; 5]>> = BTreeMap::new();
        let mut theirs: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
        for _ in 0..reps {
            for (s, r) in run_layer(prov, &sizes) {
                ours.entry(s).or_default().push(r);
            }
            if have_pp {
                for &s in &sizes {
                    port = if port > 48_500 { 47_700 } else { port + 1 };
                    if let Some(r) = run_fi_pingpong(prov, s, port) {
                        theirs.entry(s).or_default().push(r);
                    }
                }
            }
        }
        println!("\nprovider {prov} (each cell: median/best of {reps})");
        println!(
            "{:>5} | {:>15} {:>15} {:>15} | {:>17} {:>17} | {:>17} {:>17} | {:>9}",
            "size",
            "ofi lat us",
            "fi_pingpong us",
            "ofi lat-mt us",
            "ofi pp MB/s",
            "fi_pingpong MB/s",
            "ofi stream MB/s",
            "ofi stream-mt",
            "rx flt/msg"
        );
        for &s in &sizes {
            let o = ours.get(&s).cloned().unwrap_or_default();
            let t = theirs.get(&s).cloned().unwrap_or_default();
            let col = |i: usize, low: bool| stats(o.iter().map(|x| x[i]).collect(), low);
            let lat = col(0, true);
            // Ping-pong bandwidth as fi_pingpong computes it: size / one-way time.
            let opp = stats(o.iter().map(|x| s as f64 / x[0]).collect(), false);
            println!(
                "{:>5} | {:>15} {:>15} {:>15} | {:>17} {:>17} | {:>17} {:>17} | {:>9.1}",
                human(s),
                cell(lat, 2),
                cell(stats(t.iter().map(|x| x.0).collect(), true), 2),
                cell(col(1, true), 2),
                cell(opp, 0),
                cell(stats(t.iter().map(|x| x.1).collect(), false), 0),
                cell(col(2, false), 0),
                cell(col(3, false), 0),
                col(4, true).0,
            );
        }
    }
}
