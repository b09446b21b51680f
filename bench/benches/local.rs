//! Local shared-memory benchmarks of charmrs: every job runs inside this process
//! (`charmrs::Runtime::run`), one OS thread per PE, messages moved through in-process mailboxes.
//!
//! Groups (criterion ids read `group/function/parameter`):
//! - `one_way_latency/{charmrs,crossbeam_floor}/{empty,8B,1KiB,1MiB}`: PE 0 ↔ PE 1 ping-pong;
//!   the time shown is one way (round trip / 2). The payload is a `Vec<u8>` built once and moved
//!   back and forth (never copied: the benchmark checks that its buffer address never changes).
//!   The floor is the same ping-pong over a pair of bare `crossbeam-channel` unbounded channels
//!   between two plain threads whose receivers spin on `try_recv`. `charmrs_parked/empty` is the
//!   empty ping-pong with `idle_spin` 0: the receiving PE is always parked (wake-up latency).
//! - `entry_rate/...`: entry invocations per second (`thrpt`, in elements/s): on one PE a chain of
//!   self-sends (`one_pe_self_chain`: every entry sends the next one; `..._u64arg`: the same with
//!   a `u64` argument) and bursts of self-sends (`one_pe_self_burst`); across two PEs a producer
//!   on PE 0 streaming to a consumer on PE 1 (`two_pe_stream`), and the same stream over a bare
//!   channel (`two_pe_stream_crossbeam_floor`).
//! - `group_broadcast_gather/charmrs/{P2,P4}`: main broadcasts an entry to a group; every element
//!   replies to a collector on PE 0, which starts the next broadcast after P replies. The time is
//!   per broadcast + gather.
//!
//! Each `iter_custom` call starts a fresh job and times only the steady-state loop (after a short
//! warm-up inside the job) with `Instant`; the result leaves the job through a `static`, because
//! entry and constructor arguments must be serializable and cannot carry channels.
//!
//! Run: `cargo bench -p charmrs-bench --bench local` (about 70 s on a 2-core VM, plus the build);
//! `cargo bench -p charmrs-bench` also runs `benches/model.rs` (about 2 minutes more).

use charmrs::prelude::*;
use charmrs::Runtime;
use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an idle PE polls before parking. Longer than any gap inside a timed loop, so a PE
/// never parks mid-measurement; the measured path is the spin path of the idle loop.
const IDLE_SPIN: Duration = Duration::from_millis(10);

/// Round trips (or broadcast rounds) run inside each job before the clock starts.
const WARMUP_ROUNDS: u64 = 200;

/// Self-sends posted per burst in `one_pe_self_burst`.
const BURST: u64 = 1024;

/// Payload sizes of the ping-pong, with the names used in benchmark ids (`None` = empty entry).
const PAYLOADS: [(Option<usize>, &str); 4] = [
    (None, "empty"),
    (Some(8), "8B"),
    (Some(1024), "1KiB"),
    (Some(1 << 20), "1MiB"),
];

/// The timed duration of the last job, written by the job just before it calls `charmrs::exit`.
static ELAPSED: Mutex<Option<Duration>> = Mutex::new(None);

/// When the producer of `two_pe_stream` started sending (read by the consumer on another PE).
static STREAM_START: Mutex<Option<Instant>> = Mutex::new(None);

/// Records the timed duration of the running job.
fn record(elapsed: Duration) {
    *ELAPSED.lock().unwrap() = Some(elapsed);
}

/// Runs a job of `pes` PEs that records its timed duration, and returns that duration.
fn run_job<Fut>(pes: usize, main: impl FnOnce() -> Fut + Send + 'static) -> Duration
where
    Fut: std::future::Future<Output = ()> + 'static,
{
    run_job_spinning(pes, IDLE_SPIN, main)
}

/// [`run_job`] with PEs that poll for `idle_spin` when idle before parking.
fn run_job_spinning<Fut>(
    pes: usize,
    idle_spin: Duration,
    main: impl FnOnce() -> Fut + Send + 'static,
) -> Duration
where
    Fut: std::future::Future<Output = ()> + 'static,
{
    *ELAPSED.lock().unwrap() = None;
    let code = Runtime::new(pes)
        .idle_spin(idle_spin)
        .run(move |_args| main())
        .expect("benchmark job failed");
    assert_eq!(code, 0, "benchmark job exited with {code}");
    ELAPSED
        .lock()
        .unwrap()
        .take()
        .expect("the job did not record a time")
}

/// Counts the round trips (or rounds) of a timed loop: `WARMUP_ROUNDS` untimed, then `rounds`
/// timed ones.
struct RoundClock {
    rounds: u64,
    done: u64,
    start: Option<Instant>,
}

impl RoundClock {
    fn new(rounds: u64) -> Self {
        RoundClock {
            rounds,
            done: 0,
            start: None,
        }
    }

    /// Called before each round starts. Returns `true` when all rounds are done: the time has
    /// been recorded and the job told to exit, so the caller must not start another round.
    fn next_round(&mut self) -> bool {
        if self.done == WARMUP_ROUNDS {
            self.start = Some(Instant::now());
        }
        if self.done == WARMUP_ROUNDS + self.rounds {
            record(self.start.expect("started").elapsed());
            charmrs::exit(0);
            return true;
        }
        self.done += 1;
        false
    }
}

// ---------------------------------------------------------------------------------------------
// 1. PE -> PE ping-pong.

/// One end of the ping-pong: a group element (element 0 on PE 0 serves, element 1 on PE 1
/// returns every ball).
struct Paddle {
    peer: ElementProxy<Paddle>,
    clock: RoundClock,
    /// Address of the payload buffer, to check that it is moved and never copied.
    buffer: usize,
}

#[chare]
impl Paddle {
    fn new(ctx: &Ctx<Self>, rounds: u64) -> Self {
        let me: usize = ctx.index();
        Paddle {
            peer: ctx.this_group().at(1 - me),
            clock: RoundClock::new(rounds),
            buffer: 0,
        }
    }

    /// Starts the ping-pong (on PE 0): empty entries if `size` is `None`, else a `size`-byte
    /// payload built here once.
    #[entry]
    fn serve(&mut self, size: Option<usize>) {
        if self.clock.next_round() {
            return;
        }
        match size {
            None => self.peer.empty(),
            Some(n) => {
                let payload = vec![1u8; n];
                self.buffer = payload.as_ptr() as usize;
                self.peer.data(payload);
            }
        }
    }

    /// The ball without payload.
    #[entry]
    fn empty(&mut self, ctx: &Ctx<Self>) {
        if ctx.my_pe() == 0 && self.clock.next_round() {
            return;
        }
        self.peer.empty();
    }

    /// The ball with a payload.
    #[entry]
    fn data(&mut self, ctx: &Ctx<Self>, payload: Vec<u8>) {
        if ctx.my_pe() == 0 {
            assert_eq!(
                payload.as_ptr() as usize,
                self.buffer,
                "the payload was copied"
            );
            if self.clock.next_round() {
                return;
            }
        }
        self.peer.data(payload);
    }
}

/// One-way latency of `iters` round trips between PE 0 and PE 1 (elapsed / 2), with PEs that
/// poll for `idle_spin` before parking.
fn charmrs_ping_pong(iters: u64, size: Option<usize>, idle_spin: Duration) -> Duration {
    run_job_spinning(2, idle_spin, move || async move {
        let paddles = Group::<Paddle>::new((iters,));
        paddles.at(0).serve(size);
    }) / 2
}

/// Spins on `try_recv` until a value arrives; `None` once the sender is gone.
fn spin_recv<T>(rx: &Receiver<T>) -> Option<T> {
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(TryRecvError::Empty) => std::hint::spin_loop(),
            Err(TryRecvError::Disconnected) => return None,
        }
    }
}

/// One-way latency of `iters` round trips of `ball` between this thread and an echo thread over
/// bare crossbeam channels (elapsed / 2): the floor for `charmrs_ping_pong`.
fn crossbeam_ping_pong<T: Send + 'static>(iters: u64, ball: T) -> Duration {
    let (to_echo, echo_rx): (Sender<T>, Receiver<T>) = crossbeam_channel::unbounded();
    let (echo_tx, from_echo) = crossbeam_channel::unbounded::<T>();
    let echo = std::thread::spawn(move || {
        while let Some(v) = spin_recv(&echo_rx) {
            if echo_tx.send(v).is_err() {
                break;
            }
        }
    });
    let mut ball = ball;
    for _ in 0..WARMUP_ROUNDS {
        to_echo.send(ball).unwrap();
        ball = spin_recv(&from_echo).unwrap();
    }
    let start = Instant::now();
    for _ in 0..iters {
        to_echo.send(ball).unwrap();
        ball = spin_recv(&from_echo).unwrap();
    }
    let elapsed = start.elapsed();
    drop(to_echo);
    echo.join().unwrap();
    elapsed / 2
}

/// Benchmark group `one_way_latency`.
fn one_way_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("one_way_latency");
    for (size, name) in PAYLOADS {
        g.bench_function(BenchmarkId::new("charmrs", name), |b| {
            b.iter_custom(|iters| charmrs_ping_pong(iters, size, IDLE_SPIN))
        });
        g.bench_function(BenchmarkId::new("crossbeam_floor", name), |b| {
            b.iter_custom(|iters| match size {
                None => crossbeam_ping_pong(iters, ()),
                Some(n) => crossbeam_ping_pong(iters, vec![1u8; n]),
            })
        });
    }
    // The same with `idle_spin` 0: every message finds its receiver parked, so this is the cost of
    // waking a sleeping PE (what a message pays after more than `idle_spin` of silence).
    g.bench_function(BenchmarkId::new("charmrs_parked", "empty"), |b| {
        b.iter_custom(|iters| charmrs_ping_pong(iters, None, Duration::ZERO))
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// 2. Entry invocations per second.

/// A chare that sends messages to itself, on one PE.
struct SelfSender {
    me: ElementProxy<SelfSender>,
    total: u64,
    sent: u64,
    received: u64,
    start: Instant,
}

#[chare]
impl SelfSender {
    fn new(ctx: &Ctx<Self>, total: u64) -> Self {
        SelfSender {
            me: ctx.this_element(),
            total,
            sent: 0,
            received: 0,
            start: Instant::now(),
        }
    }

    fn done(&mut self) -> bool {
        self.received += 1;
        if self.received == self.total {
            record(self.start.elapsed());
            charmrs::exit(0);
            return true;
        }
        false
    }

    /// Starts a chain: each `chain` entry sends the next one (one message in flight).
    #[entry]
    fn start_chain(&mut self) {
        self.start = Instant::now();
        self.me.chain();
    }

    /// One link of the chain.
    #[entry]
    fn chain(&mut self) {
        if !self.done() {
            self.me.chain();
        }
    }

    /// Starts a chain of entries that carry a `u64` argument.
    #[entry]
    fn start_chain_u64(&mut self) {
        self.start = Instant::now();
        self.me.chain_u64(0);
    }

    /// One link of the `u64` chain (the argument is the link's number).
    #[entry]
    fn chain_u64(&mut self, link: u64) {
        if !self.done() {
            self.me.chain_u64(link + 1);
        }
    }

    /// Starts bursts: `BURST` self-sends at a time; the last of a burst posts the next burst.
    #[entry]
    fn start_bursts(&mut self) {
        self.start = Instant::now();
        self.burst();
    }

    fn burst(&mut self) {
        let n = BURST.min(self.total - self.sent);
        for _ in 0..n {
            self.me.hit();
        }
        self.sent += n;
    }

    /// One message of a burst.
    #[entry]
    fn hit(&mut self) {
        if !self.done() && self.received == self.sent {
            self.burst();
        }
    }
}

/// Streams empty entries to a [`Consumer`] on another PE.
struct Producer;

#[chare]
impl Producer {
    fn new() -> Self {
        Producer
    }

    /// Sent by the consumer once it exists: starts the clock and sends `total` entries.
    #[entry]
    fn ready(&mut self, consumer: ElementProxy<Consumer>, total: u64) {
        *STREAM_START.lock().unwrap() = Some(Instant::now());
        for _ in 0..total {
            consumer.item();
        }
    }
}

/// Receives the stream; records the time and ends the job after the last entry.
struct Consumer {
    total: u64,
    received: u64,
}

#[chare]
impl Consumer {
    fn new(ctx: &Ctx<Self>, total: u64, producer: ElementProxy<Producer>) -> Self {
        producer.ready(ctx.this_element(), total);
        Consumer { total, received: 0 }
    }

    /// One streamed entry.
    #[entry]
    fn item(&mut self) {
        self.received += 1;
        if self.received == self.total {
            let start = STREAM_START.lock().unwrap().take().expect("started");
            record(start.elapsed());
            charmrs::exit(0);
        }
    }
}

/// `iters` empty messages from this thread to a spinning consumer thread over a bare channel.
fn crossbeam_stream(iters: u64) -> Duration {
    let (tx, rx) = crossbeam_channel::unbounded::<()>();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<()>(1);
    let consumer = std::thread::spawn(move || {
        ready_tx.send(()).unwrap();
        let mut received = 0;
        while received < iters {
            spin_recv(&rx).unwrap();
            received += 1;
        }
        Instant::now()
    });
    ready_rx.recv().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        tx.send(()).unwrap();
    }
    let end = consumer.join().unwrap();
    end - start
}

/// Benchmark group `entry_rate`.
fn entry_rate(c: &mut Criterion) {
    let mut g = c.benchmark_group("entry_rate");
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_pe_self_chain", |b| {
        b.iter_custom(|iters| {
            run_job(1, move || async move {
                Single::<SelfSender>::new((iters,), Some(0)).start_chain();
            })
        })
    });
    g.bench_function("one_pe_self_chain_u64arg", |b| {
        b.iter_custom(|iters| {
            run_job(1, move || async move {
                Single::<SelfSender>::new((iters,), Some(0)).start_chain_u64();
            })
        })
    });
    g.bench_function("one_pe_self_burst", |b| {
        b.iter_custom(|iters| {
            run_job(1, move || async move {
                Single::<SelfSender>::new((iters,), Some(0)).start_bursts();
            })
        })
    });
    g.bench_function("two_pe_stream", |b| {
        b.iter_custom(|iters| {
            run_job(2, move || async move {
                let producer = Single::<Producer>::new((), Some(0));
                Single::<Consumer>::new((iters, *producer), Some(1));
            })
        })
    });
    g.bench_function("two_pe_stream_crossbeam_floor", |b| {
        b.iter_custom(crossbeam_stream)
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// 3. Group broadcast + gather.

/// Gathers one reply per PE and starts the next broadcast.
struct Collector {
    members: Option<Proxy<Member>>,
    replies: usize,
    clock: RoundClock,
}

#[chare]
impl Collector {
    fn new(rounds: u64) -> Self {
        Collector {
            members: None,
            replies: 0,
            clock: RoundClock::new(rounds),
        }
    }

    fn broadcast(&mut self) {
        if !self.clock.next_round() {
            self.members.expect("started").ping();
        }
    }

    /// Starts the rounds.
    #[entry]
    fn start(&mut self, members: Proxy<Member>) {
        self.members = Some(members);
        self.broadcast();
    }

    /// One element's reply.
    #[entry]
    fn pong(&mut self, ctx: &Ctx<Self>) {
        self.replies += 1;
        if self.replies == ctx.num_pes() {
            self.replies = 0;
            self.broadcast();
        }
    }
}

/// A group element: answers every broadcast to the collector.
struct Member {
    collector: ElementProxy<Collector>,
}

#[chare]
impl Member {
    fn new(collector: ElementProxy<Collector>) -> Self {
        Member { collector }
    }

    /// The broadcast entry.
    #[entry]
    fn ping(&mut self) {
        self.collector.pong();
    }
}

/// Benchmark group `group_broadcast_gather`.
fn group_broadcast(c: &mut Criterion) {
    let mut g = c.benchmark_group("group_broadcast_gather");
    for pes in [2usize, 4] {
        g.bench_function(BenchmarkId::new("charmrs", format!("P{pes}")), |b| {
            b.iter_custom(|iters| {
                run_job(pes, move || async move {
                    let collector = Single::<Collector>::new((iters,), Some(0));
                    let members = Group::<Member>::new((*collector,));
                    collector.start(*members);
                })
            })
        });
    }
    g.finish();
}

/// Short runs: the reference machine is a 2-core shared VM.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

/// Runs every group (what `criterion_group!` would generate, with a doc comment).
fn benches() {
    let mut c = config().configure_from_args();
    one_way_latency(&mut c);
    entry_rate(&mut c);
    group_broadcast(&mut c);
}

criterion_main!(benches);
