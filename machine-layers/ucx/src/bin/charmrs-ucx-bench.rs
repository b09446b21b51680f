//! Latency and bandwidth of [`UcxLayer`] beside UCX's own `ucx_perftest`
//! (`ucp_am_lat`, `ucp_am_bw`), measured in the same invocation on the same
//! transports, printed side by side.
//!
//! ```text
//! UCX_TLS=shm,self charmrs-ucx-bench [--reps R] [--sizes 8,4096,1048576] [--window-bytes B]
//! ```
//!
//! The driver (this program started by hand) runs, `R` times interleaved:
//! a two-process job of itself (real processes, key-value bootstrap) that
//! measures `UcxLayer` ping-pong (one-way = round trip / 2, per-iteration
//! median) and streaming bandwidth (windows of at most 64 messages and
//! `--window-bytes`, default 8 MiB, one small ack per window) through
//! `send`/`progress`, and for sizes up to 4 KiB the ping-pong again through the path the
//! runtime takes for small calls (`send_copy` from a borrowed slice, arrivals lent by
//! `progress_arrivals`: the "lent" column); then `ucx_perftest` server and client on 127.0.0.1 for
//! the same sizes. It prints the median over the repetitions. For sizes from
//! 64 KiB it also measures the alternative large-message path: `register` on
//! one side, `get` (`ucp_get_nbx` through the packed rkey) on the other,
//! same window. Bandwidth is in MB/s of 2^20 bytes, as `ucx_perftest`
//! reports it. `UCX_TLS` is passed through (default `shm,self`).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use charmrs_transport::kv::{
    random_secret, secret_to_hex, KvServer, ENV_JOB_SECRET, ENV_KV_ADDR, ENV_NPROCS, ENV_RANK,
};
use charmrs_transport::{Header, MachineLayer, Message, ProcessId};
use charmrs_ucx::UcxLayer;

const DEFAULT_SIZES: [usize; 9] = [
    8,
    64,
    512,
    4096,
    32 << 10,
    256 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];

fn die(msg: String) -> ! {
    eprintln!("charmrs-ucx-bench: {msg}");
    std::process::exit(1);
}

/// Bytes in flight per bandwidth window (`--window-bytes`, passed to the
/// measuring processes as CHARMRS_UCX_BENCH_WINDOW; default 8 MiB, at most
/// 64 messages).
fn window_bytes() -> usize {
    std::env::var("CHARMRS_UCX_BENCH_WINDOW")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8 << 20)
}

/// Ping-pong iterations for `size` (both for the layer and ucx_perftest).
fn lat_iters(size: usize) -> usize {
    let n = ((64usize << 20) / size.max(1)).clamp(100, 20_000);
    if size <= 64 {
        n * 10
    } else {
        n
    }
}

fn bw_msgs(size: usize) -> usize {
    ((1usize << 30) / size.max(1)).clamp(64, 100_000)
}

/// Busy-polls `layer` until `n` messages arrived; returns the last one.
fn recv_n(layer: &UcxLayer, n: usize) -> Option<(ProcessId, Message)> {
    let mut got = 0;
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut spins = 0u32;
    while got < n {
        match layer.progress(&mut |s, m| {
            got += 1;
            // Each message is dropped as it arrives (its buffer back to the pool), as a
            // consumer would; only the last is returned.
            if got == n {
                last = Some((s, m));
            }
        }) {
            Ok(_) => {}
            Err(e) => die(format!("progress: {e}")),
        }
        // Reading the clock costs as much as an idle progress: rarely.
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && Instant::now() > deadline {
            die(format!("timed out: {got} of {n} messages"));
        }
    }
    last
}

/// Busy-polls `layer` through the runtime's path (`progress_arrivals`: small messages lent, not
/// handed over owned) until one message arrived.
fn recv_one_lent(layer: &UcxLayer) {
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut spins = 0u32;
    while got == 0 {
        match layer.progress_arrivals(false, &mut |_, a| {
            std::hint::black_box(a.total_len());
            got += 1;
        }) {
            Ok(_) => {}
            Err(e) => die(format!("progress_arrivals: {e}")),
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && Instant::now() > deadline {
            die("timed out waiting for a lent message".into());
        }
    }
}

/// Sends `payload` through the runtime's path for small calls (`send_copy`: copied by the layer
/// from a borrowed slice, no segment allocated).
fn send_lent(layer: &UcxLayer, dst: ProcessId, payload: &[u8], tag: u64) {
    if let Err(e) = layer.send_copy(dst, Header::new(1, 0, 0, tag), payload) {
        die(format!("send_copy: {e}"));
    }
}

fn send(layer: &UcxLayer, dst: ProcessId, payload: &Bytes, tag: u64) {
    let header = Header::new(1, 0, 0, tag);
    let m = if payload.is_empty() {
        Message::new(header)
    } else {
        Message::with_segment(header, payload.clone())
    };
    if let Err(e) = layer.send(dst, m) {
        die(format!("send: {e}"));
    }
}

/// A cheap timestamp for per-iteration timing (the TSC on x86-64, like
/// ucx_perftest's clock; `Instant` elsewhere), converted to µs with
/// [`ticks_per_us`].
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86-64.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Calibrates [`ticks`] against the monotonic clock (20 ms).
fn ticks_per_us() -> f64 {
    let (t0, c0) = (Instant::now(), ticks());
    while t0.elapsed() < Duration::from_millis(20) {
        std::hint::spin_loop();
    }
    (ticks() - c0) as f64 / (t0.elapsed().as_secs_f64() * 1e6)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One process of the measuring job.
fn worker(layer: Arc<UcxLayer>, sizes: &[usize]) {
    let me = layer.rank();
    let peer = 1 - me;
    let ack = Bytes::new();
    let tpu = ticks_per_us();
    for &size in sizes {
        let payload = Bytes::from(vec![0x5au8; size]);
        // Latency: ping-pong.
        let iters = lat_iters(size);
        let warm = iters / 10;
        layer
            .barrier()
            .unwrap_or_else(|e| die(format!("barrier: {e}")));
        let mut rtts = Vec::with_capacity(iters);
        for i in 0..warm + iters {
            if me == 0 {
                let t = ticks();
                send(&layer, peer, &payload, i as u64);
                recv_n(&layer, 1);
                if i >= warm {
                    rtts.push((ticks() - t) as f64 / tpu / 2.0);
                }
            } else {
                recv_n(&layer, 1);
                send(&layer, peer, &payload, i as u64);
            }
        }
        // Latency again, through the runtime's small-message path (`send_copy` and lent
        // arrivals), for the sizes the runtime sends that way.
        let mut lent_rtts = Vec::new();
        if size <= LENT_MAX {
            layer
                .barrier()
                .unwrap_or_else(|e| die(format!("barrier: {e}")));
            lent_rtts.reserve(iters);
            for i in 0..warm + iters {
                if me == 0 {
                    let t = ticks();
                    send_lent(&layer, peer, &payload, i as u64);
                    recv_one_lent(&layer);
                    if i >= warm {
                        lent_rtts.push((ticks() - t) as f64 / tpu / 2.0);
                    }
                } else {
                    recv_one_lent(&layer);
                    send_lent(&layer, peer, &payload, i as u64);
                }
            }
        }
        // Bandwidth: windows of messages, one ack each.
        let total = bw_msgs(size);
        // At most 64 messages and window_bytes() in flight per window.
        let window = (window_bytes() / size.max(1)).clamp(1, 64).min(total);
        let rounds = total / window;
        layer
            .barrier()
            .unwrap_or_else(|e| die(format!("barrier: {e}")));
        let t = Instant::now();
        for r in 0..rounds + 1 {
            let start = Instant::now();
            if me == 0 {
                for k in 0..window {
                    send(&layer, peer, &payload, k as u64);
                }
                let t1 = start.elapsed();
                recv_n(&layer, 1);
                if std::env::var_os("BENCH_DEBUG").is_some() {
                    eprintln!("round {r}: sends {t1:?} total {:?}", start.elapsed());
                }
            } else {
                recv_n(&layer, window);
                send(&layer, peer, &ack, 0);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let get_mbs = if size >= 64 << 10 {
            // Every message of the phase above is consumed before the key.
            layer
                .barrier()
                .unwrap_or_else(|e| die(format!("barrier: {e}")));
            get_bandwidth(&layer, &payload, window, rounds + 1)
        } else {
            f64::NAN
        };
        if me == 0 {
            let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
            let med = median(&mut rtts);
            let mbs = (size * window * (rounds + 1)) as f64 / secs / (1 << 20) as f64;
            let lent = if lent_rtts.is_empty() {
                f64::NAN
            } else {
                median(&mut lent_rtts)
            };
            println!("RESULT {size} {med:.3} {avg:.3} {mbs:.1} {get_mbs:.1} {lent:.3}");
        }
    }
    layer
        .barrier()
        .unwrap_or_else(|e| die(format!("barrier: {e}")));
}

/// The alternative large-message path: rank 1 registers the payload
/// (`register`) and sends its key; rank 0 reads it with `get` (`window`
/// reads in flight, `rounds` times). Returns rank 0's MB/s (NaN on rank 1).
fn get_bandwidth(layer: &UcxLayer, payload: &Bytes, window: usize, rounds: usize) -> f64 {
    const KIND_KEY: u8 = 7;
    const KIND_READ: u8 = 8;
    const KIND_DONE: u8 = 9;
    let me = layer.rank();
    if me == 1 {
        let region = layer
            .register(payload.clone())
            .unwrap_or_else(|e| die(format!("register: {e}")));
        let k = region.key();
        let mut v = Vec::new();
        v.extend_from_slice(&k.addr.to_le_bytes());
        v.extend_from_slice(&k.len.to_le_bytes());
        v.extend_from_slice(&k.rkey);
        let m = Message::with_segments(Header::new(KIND_KEY, 0, 0, 0), vec![v.into()])
            .expect("one segment");
        layer
            .send(0, m)
            .unwrap_or_else(|e| die(format!("send key: {e}")));
        // Serve reads (emulated ones need this side's progress) until done.
        loop {
            if let Some((_, m)) = recv_n(layer, 1) {
                if m.header().kind == KIND_DONE {
                    break;
                }
            }
        }
        drop(region);
        return f64::NAN;
    }
    let Some((_, m)) = recv_n(layer, 1) else {
        die("no key".into())
    };
    let b = &m.segments()[0];
    let key = charmrs_transport::RemoteKey {
        addr: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
        len: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        rkey: b[16..].to_vec(),
    };
    let t = Instant::now();
    for _ in 0..rounds {
        for i in 0..window {
            layer
                .get(1, &key, KIND_READ, i as u64)
                .unwrap_or_else(|e| die(format!("get: {e}")));
        }
        recv_n(layer, window);
    }
    let secs = t.elapsed().as_secs_f64();
    let done = Message::new(Header::new(KIND_DONE, 0, 0, 0));
    layer
        .send(1, done)
        .unwrap_or_else(|e| die(format!("send: {e}")));
    (payload.len() * window * rounds) as f64 / secs / (1 << 20) as f64
}

/// Largest size measured through the runtime's small-message path as well.
const LENT_MAX: usize = 4096;

/// One size's figures from the measuring job.
struct LayerResult {
    size: usize,
    /// Median one-way µs through `send`/`progress`.
    lat: f64,
    /// Streaming MB/s.
    bw: f64,
    /// MB/s reading with `get` (NaN below 64 KiB).
    get_bw: f64,
    /// Median one-way µs through `send_copy`/`progress_arrivals` (NaN above [`LENT_MAX`]).
    lent_lat: f64,
}

/// Runs the two-process job; returns each size's figures.
fn run_layer(sizes: &[usize], tls: &str) -> Vec<LayerResult> {
    let secret = random_secret().unwrap_or_else(|e| die(format!("secret: {e}")));
    let (server, addr) = KvServer::start(2, secret).unwrap_or_else(|e| die(format!("kv: {e}")));
    // CHARMRS_UCX_BENCH_WORKER: a wrapper to start the measuring processes
    // with (a profiler, say), given this binary's arguments.
    let exe = std::env::var_os("CHARMRS_UCX_BENCH_WORKER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe().unwrap_or_else(|e| die(format!("current_exe: {e}")))
        });
    let list = sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let children: Vec<_> = (0..2)
        .map(|r| {
            Command::new(&exe)
                .args(["--sizes", &list])
                .env(ENV_RANK, r.to_string())
                .env(ENV_NPROCS, "2")
                .env(ENV_KV_ADDR, addr.to_string())
                .env(ENV_JOB_SECRET, secret_to_hex(&secret))
                .env("UCX_TLS", tls)
                .env("UCX_NET_DEVICES", "lo")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| die(format!("spawn: {e}")))
        })
        .collect();
    let mut out = Vec::new();
    for c in children {
        let o = c
            .wait_with_output()
            .unwrap_or_else(|e| die(format!("wait: {e}")));
        if !o.status.success() {
            die(format!("a benchmark process failed: {}", o.status));
        }
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 7 && f[0] == "RESULT" {
                let p = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
                out.push(LayerResult {
                    size: p(f[1]) as usize,
                    lat: p(f[2]),
                    bw: p(f[4]),
                    get_bw: p(f[5]),
                    lent_lat: p(f[6]),
                });
            }
        }
    }
    drop(server);
    out
}

/// Runs one `ucx_perftest` test; returns (median latency µs, overall MB/s).
fn perftest(test: &str, size: usize, iters: usize, tls: &str, port: u16) -> (f64, f64) {
    let common = |c: &mut Command| {
        c.args([
            "-t",
            test,
            "-s",
            &size.to_string(),
            "-n",
            &iters.to_string(),
            "-p",
            &port.to_string(),
        ])
        .env("UCX_TLS", tls)
        .env("UCX_NET_DEVICES", "lo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    };
    let mut server = Command::new("ucx_perftest");
    common(&mut server);
    let server = server.spawn().unwrap_or_else(|e| {
        die(format!(
            "cannot run ucx_perftest (apt-get install ucx-utils): {e}"
        ))
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut client = Command::new("ucx_perftest");
    client.arg("127.0.0.1");
    common(&mut client);
    let o = client
        .output()
        .unwrap_or_else(|e| die(format!("ucx_perftest client: {e}")));
    let _ = server.wait_with_output();
    let text = String::from_utf8_lossy(&o.stdout);
    let Some(line) = text.lines().find(|l| l.starts_with("Final:")) else {
        die(format!(
            "ucx_perftest {test} -s {size} printed no Final line:\n{text}"
        ));
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|s| s.parse().unwrap_or(f64::NAN))
        .collect();
    // iterations, lat 50%, lat avg, lat overall, bw avg, bw overall, ...
    (f[1], f[5])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sizes: Vec<usize> = opt("--sizes")
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| DEFAULT_SIZES.to_vec());
    if std::env::var_os(ENV_KV_ADDR).is_some() {
        // CHARMRS_UCX_BENCH_NO_WAKEUP: worker without UCP_FEATURE_WAKEUP.
        let cfg = charmrs_ucx::UcxConfig {
            wakeup: std::env::var_os("CHARMRS_UCX_BENCH_NO_WAKEUP").is_none(),
            ..charmrs_ucx::UcxConfig::default()
        };
        let layer = match UcxLayer::from_env_with_config(cfg) {
            Ok(Some(l)) => Arc::new(l),
            Ok(None) => die("no bootstrap".into()),
            Err(e) => die(format!("UCX layer: {e}")),
        };
        worker(layer, &sizes);
        return;
    }
    let reps: usize = opt("--reps").and_then(|s| s.parse().ok()).unwrap_or(3);
    if let Some(w) = opt("--window-bytes") {
        std::env::set_var("CHARMRS_UCX_BENCH_WINDOW", w);
    }
    let tls = std::env::var("UCX_TLS").unwrap_or_else(|_| "shm,self".to_owned());
    let n = sizes.len();
    let mut ours = vec![(Vec::new(), Vec::new(), Vec::new()); n];
    let mut lent = vec![Vec::new(); n];
    let mut raw = vec![(Vec::new(), Vec::new()); n];
    let mut port = 13_000 + (std::process::id() % 2000) as u16;
    for rep in 0..reps {
        eprintln!("repetition {}/{reps}: UcxLayer", rep + 1);
        for (i, r) in run_layer(&sizes, &tls).into_iter().enumerate() {
            if i < n && sizes[i] == r.size {
                ours[i].0.push(r.lat);
                ours[i].1.push(r.bw);
                ours[i].2.push(r.get_bw);
                lent[i].push(r.lent_lat);
            }
        }
        eprintln!("repetition {}/{reps}: ucx_perftest", rep + 1);
        for (i, &size) in sizes.iter().enumerate() {
            port += 1;
            let (lat, _) = perftest("ucp_am_lat", size, lat_iters(size), &tls, port);
            port += 1;
            let (_, bw) = perftest("ucp_am_bw", size, bw_msgs(size), &tls, port);
            raw[i].0.push(lat);
            raw[i].1.push(bw);
        }
    }
    println!("UCX_TLS={tls}, {reps} repetitions interleaved, medians");
    println!(
        "{:>9} | {:>12} {:>12} {:>6} | {:>11} {:>6} | {:>11} {:>11} {:>6} | {:>11}",
        "size",
        "layer lat µs",
        "am_lat µs",
        "ratio",
        "lent lat µs",
        "ratio",
        "layer MB/s",
        "am_bw MB/s",
        "ratio",
        "get MB/s"
    );
    for (i, &size) in sizes.iter().enumerate() {
        if ours[i].0.is_empty() {
            continue;
        }
        let (l, b) = (median(&mut ours[i].0), median(&mut ours[i].1));
        let g = median(&mut ours[i].2);
        let (rl, rb) = (median(&mut raw[i].0), median(&mut raw[i].1));
        let ll = median(&mut lent[i]);
        println!(
            "{size:>9} | {l:>12.3} {rl:>12.3} {:>6.2} | {ll:>11.3} {:>6.2} | {b:>11.1} {rb:>11.1} \
             {:>6.2} | {g:>11.1}",
            l / rl,
            ll / rl,
            b / rb
        );
    }
}
