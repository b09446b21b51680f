//! Cross-process comparison harness, run under the launcher:
//!
//! ```text
//! cargo build --release -p charmrs-launcher -p charmrs-xproc-bench
//! target/release/charmrun ++quiet +p2 ++ppn 1 target/release/xproc
//! ```
//!
//! In one job of two processes it measures, side by side:
//! - one-way latency (ping-pong / 2) of an entry call carrying a [`Buffer`] of 8 B … 4 MiB (each
//!   side sends a buffer of its own, like `ucp_am_lat` and `osu_latency`, made with
//!   [`BufferMut`], i.e. on huge pages, unless `XPROC_HEAP_BUFFERS=1`), and of a bare
//!   `TcpStream` ping-pong of the same sizes between the same two processes;
//! - bandwidth: a window of 16 messages of each size streamed to the other process, then one
//!   acknowledgement, for charmrs and for the bare socket;
//! - a reduction (empty, to a callback, back to back) and a broadcast with completion, over the
//!   PEs of all processes;
//! - with `XPROC_REPLY=1`, instead of all the above: the round trip of a call whose reply (a
//!   future's value) is a `PodVec<f64>` of each size, kept by the answering side (a clone shares
//!   it), awaited by the main task.
//!
//! Figures are medians of several repetitions (per size: all latency repetitions, then all
//! bandwidth ones); the machine is a shared VM, so compare columns of the same run, not runs.
//!
//! Placement: the processes of a host take distinct cores (`++ppn 1`: one PE per core); the bare
//! echo threads are unpinned. Two bare baselines: blocking sockets (a cross-core wake-up per
//! message, ~25 µs on this VM when the reader sleeps) and busy-polling ones (the floor for
//! polling PEs).
//!
//! Environment: `XPROC_SIZES=8,1048576` (sizes), `XPROC_REPEATS=n`, `XPROC_NO_BARE=1` (no bare
//! columns), `XPROC_CHARMRS_ONLY=1` (charmrs latency only, for profiling), `XPROC_ECHO_DATA=1`
//! (the charmrs ping-pong sends back the buffer it received instead of its own; see
//! `echo_data`), `XPROC_HEAP_BUFFERS=1` (send `Vec`s, not huge pages), `XPROC_CONSUME=1` (the
//! stream's receiver reads every buffer through, as an application would; a transport that
//! leaves the data in the sender's cache then pays for it), `XPROC_PODVEC=1` (the stream sends a
//! `PodVec<f64>` of the same byte size instead of a `Buffer`), `XPROC_STREAM_MUL=n` (streams `n`
//! times as long), `XPROC_PING_PE=a`, `XPROC_PONG_PE=b` (the two sides' PEs; default the first
//! and the last), `XPROC_REPLY=1` (replies only, see above), `XPROC_SUMS=1` (instead of all the
//! above: a sum of a vector of each size over every PE, to a future on PE 0, contributed as a
//! `Vec<f64>` and as a `PodVec<f64>`, interleaved, each member keeping its vector: the time per
//! reduction; `XPROC_SUMS=vec` or `podvec` times that one only), `XPROC_BARE_PEER=addr` (the
//! pong side's host address, when the sides are on different hosts: the bare sockets then go
//! between the hosts too; default loopback).

use bytes::Bytes;
use charmrs::prelude::*;
use charmrs::{Buffer, BufferMut, PodVec, Reducer};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

const SIZES: [usize; 7] = [8, 1 << 10, 8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];
const WINDOW: usize = 16;
const REPEATS: usize = 5;

/// A PE from the environment variable `var` (checked against the job's `pes`), else `default`.
fn pe_from_env(var: &str, default: usize, pes: usize) -> usize {
    let pe = std::env::var(var)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default);
    assert!(pe < pes, "{var}={pe}: the job has {pes} PEs");
    pe
}

/// Repetitions per size: [`REPEATS`], or `XPROC_REPEATS` (more for profiling).
fn repeats() -> usize {
    std::env::var("XPROC_REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(REPEATS)
}

fn iterations(size: usize) -> u32 {
    match size {
        s if s <= 1024 => 2000,
        s if s <= 64 << 10 => 500,
        s if s <= 1 << 20 => 60,
        _ => 20,
    }
}

/// Whether each side of the ping-pong sends back the buffer it received (`XPROC_ECHO_DATA=1`)
/// rather than a buffer of its own of the same size, as `ucp_am_lat`, `fi_pingpong` and
/// `osu_latency` do. Echoing the received buffer sends bytes just written on this core, which
/// the peer then reads out of this core's cache: from 16 KiB on, that costs more than the
/// transfer of a buffer at rest.
fn echo_data() -> bool {
    std::env::var_os("XPROC_ECHO_DATA").is_some_and(|v| v == "1")
}

/// A buffer of `size` bytes this side sends, kept across calls (allocated on a size change).
fn own_buffer(own: &mut Buffer, size: usize, fill: u8) -> Buffer {
    if own.0.len() != size {
        *own = if heap_buffers() {
            Buffer(Bytes::from(vec![fill; size]))
        } else {
            // As the user guide recommends: large buffers on huge pages, smaller ones cut out of
            // a huge-page buffer (like `ucp_mem_map`-allocated buffers with UCX_ALLOC_PRIO=thp).
            let mut buf = BufferMut::zeroed(size.max(charmrs::HUGE_FROM));
            buf.fill(fill);
            buf.freeze().slice(..size)
        };
    }
    own.clone()
}

/// `XPROC_STREAM_MUL=n`: each stream is `n` times as long (to check that a figure is a steady
/// state, or for profiling the streaming path). Default 1.
fn stream_scale() -> usize {
    std::env::var("XPROC_STREAM_MUL")
        .ok()
        .map(|v| {
            v.parse()
                .ok()
                .filter(|&n: &usize| n > 0)
                .expect("XPROC_STREAM_MUL: a positive whole number")
        })
        .unwrap_or(1)
}

/// The address at which the bare-socket side reaches the pong side's echo servers:
/// `XPROC_BARE_PEER` (the pong process's host, when the two sides are on different hosts; the
/// servers then listen on every address), else loopback.
fn bare_peer_address() -> String {
    std::env::var("XPROC_BARE_PEER").unwrap_or_else(|_| "127.0.0.1".into())
}

/// `XPROC_HEAP_BUFFERS=1`: the buffers sent are `Vec`s, not [`BufferMut`]s (huge pages).
fn heap_buffers() -> bool {
    std::env::var_os("XPROC_HEAP_BUFFERS").is_some()
}

/// The remote side: answers ping-pong buffers, counts streamed ones, runs the bare-socket echo
/// server.
struct Pong {
    streamed: usize,
    /// `XPROC_CONSUME=1`: streamed buffers are read through.
    consume: bool,
    /// The buffer it answers with (see [`echo_data`]).
    own: Buffer,
    echo_data: bool,
    /// What [`give`](Pong::give) answers with.
    reply: PodVec<f64>,
    /// Whom [`word`](Pong::word) answers (set by [`first_word`](Pong::first_word)).
    word_peer: Option<ElementProxy<Ping>>,
}

#[chare]
impl Pong {
    fn new() -> Self {
        Pong {
            streamed: 0,
            consume: std::env::var_os("XPROC_CONSUME").is_some(),
            own: Buffer(Bytes::new()),
            echo_data: echo_data(),
            reply: PodVec::from(Vec::new()),
            word_peer: None,
        }
    }

    /// The first call of a word ping-pong: keeps `back` for [`word`](Pong::word), then answers.
    #[entry]
    fn first_word(&mut self, w: u64, back: ElementProxy<Ping>) {
        self.word_peer = Some(back);
        back.word_back(w + 1);
    }

    /// Answers a word (one `u64` argument: 8 bytes of arguments, no buffer, no proxy) with the
    /// next one.
    #[entry]
    fn word(&mut self, w: u64) {
        self.word_peer
            .expect("first_word came first")
            .word_back(w + 1);
    }

    /// Answers with a buffer of the same size: its own, or the one received.
    #[entry]
    fn echo(&mut self, data: Buffer, back: ElementProxy<Ping>) {
        if self.echo_data {
            back.echoed(data);
        } else {
            back.echoed(own_buffer(&mut self.own, data.0.len(), 3));
        }
    }

    /// Counts a streamed buffer (with `XPROC_CONSUME=1` also reads all of it, as an application
    /// would); acknowledges every `window`-th.
    #[entry]
    fn stream(&mut self, data: Buffer, window: usize, back: ElementProxy<Ping>) {
        if self.consume {
            let words = data.0.chunks_exact(8);
            let tail: u64 = words.remainder().iter().map(|&b| u64::from(b)).sum();
            let sum = words.fold(tail, |acc, w| {
                acc.wrapping_add(u64::from_ne_bytes(w.try_into().expect("8 bytes")))
            });
            std::hint::black_box(sum);
        }
        self.streamed += 1;
        if self.streamed.is_multiple_of(window) {
            back.acked();
        }
    }

    /// [`stream`](Pong::stream) for a vector of numbers (`XPROC_PODVEC=1`).
    #[entry]
    fn stream_floats(&mut self, data: PodVec<f64>, window: usize, back: ElementProxy<Ping>) {
        if self.consume {
            std::hint::black_box(data.iter().sum::<f64>());
        }
        self.streamed += 1;
        if self.streamed.is_multiple_of(window) {
            back.acked();
        }
    }

    /// A vector of `size` bytes of numbers, as the reply (`XPROC_REPLY=1`): the same one each
    /// time (a clone shares it), like a buffer at rest.
    #[entry]
    fn give(&mut self, size: usize) -> PodVec<f64> {
        if self.reply.len() * 8 != size {
            self.reply = PodVec::from(vec![0.5f64; size / 8]);
        }
        self.reply.clone()
    }

    /// Starts a bare TCP echo server on loopback in a thread of this process; returns its port.
    /// With `spin` its socket is non-blocking and it busy-polls (as the PEs do), else it blocks.
    #[entry]
    fn listen(&mut self, spin: bool) -> u16 {
        let listener = TcpListener::bind(if bare_peer_address() == "127.0.0.1" {
            "127.0.0.1:0"
        } else {
            "0.0.0.0:0"
        })
        .expect("bind the bare echo server");
        let port = listener.local_addr().expect("bound").port();
        std::thread::spawn(move || {
            unpin_current_thread();
            let (mut s, _) = listener.accept().expect("accept");
            s.set_nodelay(true).expect("nodelay");
            s.set_nonblocking(spin).expect("blocking mode");
            let mut header = [0u8; 9];
            let mut buf = vec![0u8; 4 << 20];
            // Each request: 8-byte length + 1 mode byte (0 echo, 1 stream-ack-after-window).
            while read_full(&mut s, &mut header).is_ok() {
                let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
                let mode = header[8];
                if read_full(&mut s, &mut buf[..len]).is_err() {
                    return;
                }
                match mode {
                    0 => {
                        write_full(&mut s, &header).expect("echo header");
                        write_full(&mut s, &buf[..len]).expect("echo body");
                    }
                    m => {
                        // Stream mode: `m` is how many more to read before acknowledging.
                        for _ in 1..m {
                            if read_full(&mut s, &mut header).is_err()
                                || read_full(&mut s, &mut buf[..len]).is_err()
                            {
                                return;
                            }
                        }
                        write_full(&mut s, &[1]).expect("ack");
                    }
                }
            }
        });
        port
    }
}

/// Lets the calling thread run on any CPU: a thread spawned by a pinned PE inherits its core, and
/// the bare echo server must not share a core with the spinning PE it is compared against.
fn unpin_current_thread() {
    // SAFETY: `set` is a zeroed, then filled, cpu_set_t owned by this frame; sched_setaffinity
    // only reads it (pid 0: the calling thread).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The local side of the ping-pong.
struct Ping {
    left: u32,
    pong: Option<ElementProxy<Pong>>,
    done: Option<Future<f64>>,
    start: Option<Instant>,
    acks: usize,
    /// The buffer it sends (see [`echo_data`]).
    own: Buffer,
    echo_data: bool,
}

/// `XPROC_WORD=1`: the ping-pong of an entry call whose only argument is a `u64` — 8 bytes of
/// arguments, as `ucp_am_lat -s 8` sends 8 bytes — each side's peer known in advance (kept from
/// the first call), interleaved with the 8 B `Buffer` ping-pong of the main table, which also
/// sends the peer's proxy in every call and allocates the received buffer.
/// `XPROC_WORD=only`: the one-word ping-pong alone (for profiling its path).
fn word_mode() -> bool {
    std::env::var_os("XPROC_WORD").is_some_and(|v| v == "1" || v == "only")
}

#[chare]
impl Ping {
    fn new() -> Self {
        Ping {
            left: 0,
            pong: None,
            done: None,
            start: None,
            acks: 0,
            own: Buffer(Bytes::new()),
            echo_data: echo_data(),
        }
    }

    /// `iters` round trips of a one-word call ([`Pong::word`]); the future gets seconds per
    /// one-way trip.
    #[entry]
    fn words(&mut self, ctx: &Ctx<Self>, pong: ElementProxy<Pong>, iters: u32, done: Future<f64>) {
        self.left = iters;
        self.pong = Some(pong);
        self.done = Some(done);
        self.start = Some(Instant::now());
        pong.first_word(0, ctx.this_element());
    }

    #[entry]
    fn word_back(&mut self, w: u64) {
        self.left -= 1;
        if self.left == 0 {
            let secs = self.start.take().expect("started").elapsed().as_secs_f64();
            assert_eq!(w % 2, 1, "a word answered with the next one");
            self.done.take().expect("a future").send(secs);
        } else {
            self.pong.expect("a peer").word(w + 1);
        }
    }

    /// `iters` round trips of a `size`-byte buffer; the future gets seconds per one-way trip.
    #[entry]
    fn pingpong(
        &mut self,
        ctx: &Ctx<Self>,
        pong: ElementProxy<Pong>,
        size: usize,
        iters: u32,
        done: Future<f64>,
    ) {
        self.left = iters;
        self.pong = Some(pong);
        self.done = Some(done);
        self.start = Some(Instant::now());
        pong.echo(own_buffer(&mut self.own, size, 7), ctx.this_element());
    }

    #[entry]
    fn echoed(&mut self, ctx: &Ctx<Self>, data: Buffer) {
        self.left -= 1;
        if self.left == 0 {
            let secs = self.start.take().expect("started").elapsed().as_secs_f64();
            self.done.take().expect("a future").send(secs);
        } else if self.echo_data {
            self.pong.expect("a peer").echo(data, ctx.this_element());
        } else {
            let own = own_buffer(&mut self.own, data.0.len(), 7);
            drop(data);
            self.pong.expect("a peer").echo(own, ctx.this_element());
        }
    }

    /// Streams `count` buffers (in windows of [`WINDOW`]); the future gets the seconds taken.
    #[entry]
    fn stream(
        &mut self,
        ctx: &Ctx<Self>,
        pong: ElementProxy<Pong>,
        size: usize,
        count: usize,
        done: Future<f64>,
    ) {
        // The buffer exists before the clock starts and is the same in every repetition, as
        // `ucp_am_bw`'s and `fi_rma_bw`'s are.
        let data = own_buffer(&mut self.own, size, 7);
        let floats = std::env::var_os("XPROC_PODVEC")
            .is_some()
            .then(|| PodVec::from(vec![0.5f64; size / 8]));
        self.acks = count / WINDOW;
        self.done = Some(done);
        self.start = Some(Instant::now());
        for _ in 0..count {
            match &floats {
                Some(v) => pong.stream_floats(v.clone(), WINDOW, ctx.this_element()),
                None => pong.stream(data.clone(), WINDOW, ctx.this_element()),
            }
        }
    }

    #[entry]
    fn acked(&mut self) {
        self.acks -= 1;
        if self.acks == 0 {
            let secs = self.start.take().expect("started").elapsed().as_secs_f64();
            self.done.take().expect("a future").send(secs);
        }
    }
}

/// One element per PE, for the collective figures.
struct Member;

#[chare]
impl Member {
    fn new() -> Self {
        Member
    }

    #[entry]
    fn noop(&mut self) {}

    #[entry]
    fn reduce(&mut self, ctx: &Ctx<Self>, done: Future<()>) {
        ctx.barrier(done);
    }
}

/// The sizes to measure: [`SIZES`], or the comma-separated list in `XPROC_SIZES` (for profiling
/// one size).
fn sizes() -> Vec<usize> {
    match std::env::var("XPROC_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("XPROC_SIZES: comma-separated byte counts")
            })
            .collect(),
        Err(_) => SIZES.to_vec(),
    }
}

/// The median of `v` (NaN for none: a column the environment switched off).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `read_exact` that also works on a non-blocking socket: busy-polls on `WouldBlock`, and after
/// a millisecond without data blocks for it (so an idle spinning server does not take a core
/// from the other measurements).
fn read_full(s: &mut TcpStream, mut buf: &mut [u8]) -> std::io::Result<()> {
    let mut since: Option<Instant> = None;
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let start = *since.get_or_insert_with(Instant::now);
                if start.elapsed() > std::time::Duration::from_millis(1) {
                    s.set_nonblocking(false)?;
                    let r = s.read(buf);
                    s.set_nonblocking(true)?;
                    match r? {
                        0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        n => buf = &mut buf[n..],
                    }
                    since = None;
                } else {
                    std::hint::spin_loop();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that also works on a non-blocking socket (busy-polls on `WouldBlock`).
fn write_full(s: &mut TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn raw_pingpong(s: &mut TcpStream, size: usize, iters: u32) -> f64 {
    let mut header = [0u8; 9];
    header[..8].copy_from_slice(&(size as u64).to_le_bytes());
    let body = vec![7u8; size];
    let mut back = vec![0u8; size];
    let start = Instant::now();
    for _ in 0..iters {
        write_full(s, &header).expect("send header");
        write_full(s, &body).expect("send body");
        let mut h = [0u8; 9];
        read_full(s, &mut h).expect("echo header");
        read_full(s, &mut back).expect("echo body");
    }
    start.elapsed().as_secs_f64() / iters as f64 / 2.0
}

fn raw_stream(s: &mut TcpStream, size: usize, count: usize) -> f64 {
    let mut header = [0u8; 9];
    header[..8].copy_from_slice(&(size as u64).to_le_bytes());
    header[8] = WINDOW as u8;
    let body = vec![9u8; size];
    let start = Instant::now();
    for _ in 0..count / WINDOW {
        for _ in 0..WINDOW {
            s.write_all(&header).expect("send header");
            s.write_all(&body).expect("send body");
        }
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).expect("ack");
    }
    start.elapsed().as_secs_f64()
}

async fn run() {
    let p = charmrs::num_pes();
    // `XPROC_PING_PE`, `XPROC_PONG_PE`: where the two sides run (with `++ppn 2`, PEs 0 and 2
    // are the PEs that poll for their process when it has one UCX worker; 1 and 3 are not).
    let near = pe_from_env("XPROC_PING_PE", 0, p);
    let far = pe_from_env("XPROC_PONG_PE", p - 1, p);
    println!(
        "# charmrs cross-process harness: {p} PEs in {} processes; one-way = round trip / 2",
        charmrs::num_nodes()
    );
    let ping = Single::<Ping>::new((), Some(near));
    let pong = Single::<Pong>::new((), Some(far));
    if std::env::var_os("XPROC_REPLY").is_some() {
        return replies(pong).await;
    }
    if std::env::var_os("XPROC_SUMS").is_some() {
        return sums().await;
    }
    if word_mode() {
        return words(ping, pong).await;
    }
    // `XPROC_NO_BARE=1`: no bare-socket columns (when comparing with another transport's tools,
    // e.g. bench/scripts/ucx-vs-perftest.sh, and between hosts: the bare sockets use loopback).
    let bare = std::env::var_os("XPROC_NO_BARE").is_none();
    // Two bare baselines: blocking sockets (a sleeping reader is woken by the kernel), and
    // busy-polling non-blocking ones (like the PEs, which never sleep while spinning). The client
    // side runs on this PE's thread (pinned to this PE's core, like the charmrs side).
    let mut sockets = None;
    if bare {
        let port = pong.ret().listen(false).await;
        let raw = TcpStream::connect((bare_peer_address(), port))
            .expect("connect to the bare echo server");
        raw.set_nodelay(true).expect("nodelay");
        let port = pong.ret().listen(true).await;
        let spin = TcpStream::connect((bare_peer_address(), port))
            .expect("connect to the spinning server");
        spin.set_nodelay(true).expect("nodelay");
        spin.set_nonblocking(true).expect("non-blocking");
        sockets = Some((raw, spin));
    }
    println!(
        "{:>9} {:>12} {:>12} {:>7} {:>12} {:>7} {:>13} {:>13} {:>7}",
        "size",
        "charmrs µs",
        "bare µs",
        "ratio",
        "bare spin µs",
        "ratio",
        "charmrs MB/s",
        "bare MB/s",
        "ratio"
    );
    // `XPROC_CHARMRS_ONLY=1`: only the charmrs ping-pong (for profiling its path).
    let charmrs_only = std::env::var_os("XPROC_CHARMRS_ONLY").is_some();
    // `XPROC_BW_ONLY=1`: only the bandwidth repetitions, no reduction or broadcast rounds (for
    // profiling the streaming path).
    let bw_only = std::env::var_os("XPROC_BW_ONLY").is_some();
    for size in sizes() {
        let iters = iterations(size);
        let count = stream_scale() * (WINDOW * (iterations(size) as usize / 8).max(2)).max(WINDOW);
        let (mut lat_c, mut lat_r, mut bw_c, mut bw_r) = (vec![], vec![], vec![], vec![]);
        let mut lat_s = vec![];
        for _ in 0..repeats() {
            if bw_only {
                break;
            }
            let f = Future::new();
            ping.pingpong(*pong, size, iters, f);
            lat_c.push(f.await / iters as f64 / 2.0);
            if charmrs_only {
                continue;
            }
            if let Some((raw, spin)) = sockets.as_mut() {
                lat_r.push(raw_pingpong(raw, size, iters));
                lat_s.push(raw_pingpong(spin, size, iters));
            } else {
                lat_r.push(f64::NAN);
                lat_s.push(f64::NAN);
            }
        }
        // Bandwidth after all latency repetitions (a stream leaves the allocator and caches in
        // another state than a ping-pong does).
        for _ in 0..repeats() {
            if charmrs_only {
                break;
            }
            let f = Future::new();
            ping.stream(*pong, size, count, f);
            bw_c.push((size * count) as f64 / f.await / 1e6);
            bw_r.push(match sockets.as_mut() {
                Some((raw, _)) => (size * count) as f64 / raw_stream(raw, size, count) / 1e6,
                None => f64::NAN,
            });
        }
        if charmrs_only {
            println!("{size:>9} {:>12.2}", median(lat_c) * 1e6);
            continue;
        }
        let (lc, lr, ls, bc, br) = (
            median(lat_c) * 1e6,
            median(lat_r) * 1e6,
            median(lat_s) * 1e6,
            median(bw_c),
            median(bw_r),
        );
        println!(
            "{size:>9} {lc:>12.2} {lr:>12.2} {:>7.2} {ls:>12.2} {:>7.2} {bc:>13.0} {br:>13.0} {:>7.2}",
            lc / lr,
            lc / ls,
            bc / br
        );
    }
    if charmrs_only || bw_only {
        charmrs::exit(0);
        return;
    }
    let group = Group::<Member>::new(());
    let rounds = 2000u32;
    let mut red = vec![];
    let mut bcast = vec![];
    for _ in 0..repeats() {
        let t = Instant::now();
        for _ in 0..rounds {
            let f = Future::new();
            group.reduce(f);
            f.await;
        }
        red.push(t.elapsed().as_secs_f64() / rounds as f64);
        let t = Instant::now();
        for _ in 0..rounds {
            group.ret().noop().await;
        }
        bcast.push(t.elapsed().as_secs_f64() / rounds as f64);
    }
    println!(
        "# empty reduction to a future (broadcast trigger + barrier), {p} PEs: {:.2} µs per round",
        median(red) * 1e6
    );
    println!(
        "# broadcast with completion (ret), {p} PEs: {:.2} µs per round",
        median(bcast) * 1e6
    );
    charmrs::exit(0);
}

/// `XPROC_WORD=1`: one-way latency of the one-word call and of the 8 B `Buffer` call, interleaved
/// repetitions, medians; prints `word <µs> buffer8 <µs>`.
async fn words(ping: Single<Ping>, pong: Single<Pong>) {
    let iters = iterations(8);
    let (mut word, mut buffer) = (vec![], vec![]);
    for _ in 0..repeats() {
        let f = Future::new();
        ping.words(*pong, iters, f);
        word.push(f.await / iters as f64 / 2.0);
        if std::env::var_os("XPROC_WORD").is_some_and(|v| v == "only") {
            buffer.push(f64::NAN);
            continue;
        }
        let f = Future::new();
        ping.pingpong(*pong, 8, iters, f);
        buffer.push(f.await / iters as f64 / 2.0);
    }
    println!(
        "word {:.3} buffer8 {:.3}",
        median(word) * 1e6,
        median(buffer) * 1e6
    );
    charmrs::exit(0);
}

/// A group member that contributes a vector of numbers kept across reductions (`XPROC_SUMS=1`).
struct Summand {
    as_vec: Vec<f64>,
    as_podvec: PodVec<f64>,
}

#[chare]
impl Summand {
    fn new() -> Self {
        Summand {
            as_vec: Vec::new(),
            as_podvec: PodVec::from(Vec::new()),
        }
    }

    /// Contributes `len` numbers as a `Vec` (a clone: the member keeps its own, as it would an
    /// application's state).
    #[entry]
    fn sum_vec(&mut self, ctx: &Ctx<Self>, len: usize, done: Future<Vec<f64>>) {
        if self.as_vec.len() != len {
            self.as_vec = vec![1.0; len];
        }
        ctx.contribute(self.as_vec.clone(), Reducer::Sum, done);
    }

    /// The same as a `PodVec` (a clone shares the elements; the reduction copies them once it
    /// changes them).
    #[entry]
    fn sum_podvec(&mut self, ctx: &Ctx<Self>, len: usize, done: Future<PodVec<f64>>) {
        if self.as_podvec.len() != len {
            self.as_podvec = PodVec::from(vec![1.0; len]);
        }
        ctx.contribute(self.as_podvec.clone(), Reducer::Sum, done);
    }
}

/// `XPROC_SUMS=1`: the time of one sum of a vector of each size over every PE, as a `Vec<f64>`
/// and as a `PodVec<f64>`, repetitions interleaved; each result is checked. (`XPROC_SUMS=vec` or
/// `podvec` times only that one, for profiling.)
async fn sums() {
    // `XPROC_SUMS=vec` or `podvec`: that one only (for profiling).
    let which = std::env::var("XPROC_SUMS").unwrap_or_default();
    let p = charmrs::num_pes() as f64;
    let members = Group::<Summand>::new(());
    println!(
        "{:>9} {:>12} {:>15}",
        "size", "Vec<f64> µs", "PodVec<f64> µs"
    );
    for size in sizes().into_iter().filter(|&s| s >= 8) {
        let len = size / 8;
        let iters = iterations(size).min(500);
        let (mut vec_times, mut podvec_times) = (vec![], vec![]);
        for _ in 0..repeats() {
            let t = Instant::now();
            for _ in 0..iters * u32::from(which != "podvec") {
                let done = Future::new();
                members.sum_vec(len, done);
                let total = done.await;
                assert!(total.len() == len && total[len - 1] == p, "wrong Vec sum");
            }
            vec_times.push(t.elapsed().as_secs_f64() / f64::from(iters));
            let t = Instant::now();
            for _ in 0..iters * u32::from(which != "vec") {
                let done = Future::new();
                members.sum_podvec(len, done);
                let total = done.await;
                assert!(
                    total.len() == len && total[len - 1] == p,
                    "wrong PodVec sum"
                );
            }
            podvec_times.push(t.elapsed().as_secs_f64() / f64::from(iters));
        }
        // A representation not timed (`XPROC_SUMS=vec` or `podvec`) shows as "-".
        let shown = |times: Vec<f64>, timed: bool| {
            if timed {
                format!("{:.2}", median(times) * 1e6)
            } else {
                "-".to_owned()
            }
        };
        println!(
            "{size:>9} {:>12} {:>15}",
            shown(vec_times, which != "podvec"),
            shown(podvec_times, which != "vec")
        );
    }
    charmrs::exit(0);
}

/// `XPROC_REPLY=1`: round trips of a call answered with a vector of each size (8-byte sizes and
/// up), from the main task on PE 0 to `pong`.
async fn replies(pong: Single<Pong>) {
    println!("{:>9} {:>15} {:>10}", "size", "reply trip µs", "MB/s");
    for size in sizes().into_iter().filter(|&s| s >= 8) {
        let iters = iterations(size);
        let mut trips = vec![];
        for _ in 0..repeats() {
            let t = Instant::now();
            for _ in 0..iters {
                let v = pong.ret().give(size).await;
                std::hint::black_box(v.len());
            }
            trips.push(t.elapsed().as_secs_f64() / f64::from(iters));
        }
        let trip = median(trips);
        println!(
            "{size:>9} {:>15.2} {:>10.0}",
            trip * 1e6,
            size as f64 / trip / 1e6
        );
    }
    charmrs::exit(0);
}

fn main() {
    charmrs::start(|_| run())
}
