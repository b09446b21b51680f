//! Benchmarks of the charmrs programming-model features, all inside this process
//! (`charmrs::Runtime::run`, one OS thread per PE): reductions, broadcasts with completion,
//! futures and `when`-buffered entries.
//!
//! Groups (criterion ids read `group/function/parameter`; `P{p}` = p PEs with one element each,
//! `P{p}x8` = p PEs with 8 array elements each):
//! - `reduction_callback/{barrier,sum_1KiB}/{P2,P4,P2x8,P4x8}`: Charm++'s "array reduction"
//!   loop. Every element of an array contributes — an empty reduction (`ctx.barrier`) or a
//!   `Vec<f64>` of 128 values (1 KiB) with `Reducer::Sum` — to a callback on element 0, which
//!   broadcasts the next round to the whole array. Time per completed round (contribute →
//!   callback → broadcast).
//! - `allreduce/{empty,sum_1KiB}/{P2,P4,P2x8,P4x8}`: every element runs a suspendable entry
//!   looping on `this.ctx().allreduce(x, Reducer::Sum).await` (`x` = `()` or the 1 KiB vector);
//!   the result comes back down the reduction tree to every contributor. Time per round, on
//!   element 0.
//! - `broadcast_ret/charmrs/{P2,P4}`: main (on PE 0) broadcasts an empty entry to a group and
//!   awaits its completion future (`group.ret().ping().await`). Time per broadcast + completion.
//! - `future_round_trip/charmrs/{pe0_to_pe1,same_pe}`: main (on PE 0) awaits
//!   `element.ret().ping()` on a group element on PE 1 (on PE 0 for `same_pe`). Time per round
//!   trip.
//! - `when_delivery/{same_pe,cross_pe}/{plain,when_in_order,when_reversed64}` (throughput in
//!   messages/s): a source sends batches of 64 messages carrying an iteration number `u64` to a
//!   sink; `plain` calls an ordinary `#[entry]`, the `when_*` variants an
//!   `#[entry(when = "self.iter == iter")]`, either in order (the condition already holds on
//!   arrival: the check cost) or each batch in reverse (63 of 64 messages are buffered and
//!   matched later, by hash lookup). Every entry advances `iter`; after the 64th message of a
//!   batch the sink asks the source for the next batch. `same_pe`: source and sink on one PE
//!   (`Runtime::new(1)`); `cross_pe`: source on PE 0, sink on PE 1. Time per message.
//! - `collect_values/{multi_future,futures_wait_all,gather}/P4x16`: main collects one `u64` from
//!   each of the 64 elements of an array on 4 PEs. `multi_future`: a broadcast carries a
//!   `MultiFuture`'s sending side, each element sends its value to it (one message per element to
//!   main's PE); `futures_wait_all`: 64 point calls each carry a future of their own, awaited with
//!   `wait_all`; `gather`: the broadcast's results gathered by PE (`array.gather().value()`: one
//!   message per PE). Time per round.
//! - `channel_round_trip/{channel,entry_future}/pe0_to_pe1`: two group elements on PEs 0 and 1
//!   exchange a `u64` back and forth; `channel`: through a [`Channel`] in suspendable entries on
//!   both sides (`send`, then `recv().await`); `entry_future`: the same exchange as the entry call
//!   `element.ret().bounce(x).await` from a suspendable entry on PE 0. Time per round trip.
//! - `section_call/{multicast,point_calls}/{P2,P4}`: a section of 256 of the 512 elements of an
//!   array (every other one) is called, and each member reaches the section's barrier, which
//!   main awaits. `multicast`: one call through the section (down its multicast tree: one
//!   message per PE of the tree); `point_calls`: the same call sent by main to each member, one
//!   message per member (how sections were called before the tree). Time per round.
//!
//! Each `iter_custom` call starts a fresh job and times only the steady-state loop (after a
//! warm-up inside the job) with `Instant`; the result leaves the job through a `static`, because
//! entry and constructor arguments must be serializable.
//!
//! Run: `cargo bench -p charmrs-bench --bench model` (about 2 minutes on a 2-core VM).

use charmrs::prelude::*;
use charmrs::Runtime;
use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an idle PE polls before parking. Longer than any gap inside a timed loop, so a PE
/// never parks mid-measurement (the same setting as `benches/local.rs`).
const IDLE_SPIN: Duration = Duration::from_millis(10);

/// Rounds (reductions, broadcasts, round trips) run inside each job before the clock starts.
const WARMUP_ROUNDS: u64 = 200;

/// Batches of `when_delivery` run inside each job before the clock starts.
const WARMUP_BATCHES: u64 = 50;

/// Messages per batch in `when_delivery` (the reversed variant reverses each batch).
const BATCH: u64 = 64;

/// Values in the vector of the `sum_1KiB` reductions (128 × 8 B = 1 KiB).
const SUM_LEN: usize = 128;

/// (PEs, elements per PE) of the reduction benchmarks.
const LAYOUTS: [(usize, usize); 4] = [(2, 1), (4, 1), (2, 8), (4, 8)];

/// The timed duration of the last job, written by the job just before it calls `charmrs::exit`.
static ELAPSED: Mutex<Option<Duration>> = Mutex::new(None);

/// Records the timed duration of the running job.
fn record(elapsed: Duration) {
    *ELAPSED.lock().unwrap() = Some(elapsed);
}

/// Runs a job of `pes` PEs that records its timed duration, and returns that duration.
fn run_job<Fut>(pes: usize, main: impl FnOnce() -> Fut + Send + 'static) -> Duration
where
    Fut: std::future::Future<Output = ()> + 'static,
{
    *ELAPSED.lock().unwrap() = None;
    let code = Runtime::new(pes)
        .idle_spin(IDLE_SPIN)
        .run(move |_args| main())
        .expect("benchmark job failed");
    assert_eq!(code, 0, "benchmark job exited with {code}");
    ELAPSED
        .lock()
        .unwrap()
        .take()
        .expect("the job did not record a time")
}

/// Benchmark id parameter of a layout: `P2`, or `P2x8` with 8 elements per PE.
fn layout_name(pes: usize, per_pe: usize) -> String {
    if per_pe == 1 {
        format!("P{pes}")
    } else {
        format!("P{pes}x{per_pe}")
    }
}

/// Counts the rounds of a timed loop: `warmup` untimed, then `rounds` timed ones.
struct RoundClock {
    warmup: u64,
    rounds: u64,
    done: u64,
    start: Option<Instant>,
}

impl RoundClock {
    fn new(warmup: u64, rounds: u64) -> Self {
        RoundClock {
            warmup,
            rounds,
            done: 0,
            start: None,
        }
    }

    /// Called before each round starts. Returns `true` when all rounds are done: the time has
    /// been recorded and the job told to exit, so the caller must not start another round.
    fn next_round(&mut self) -> bool {
        if self.done == self.warmup {
            self.start = Some(Instant::now());
        }
        if self.done == self.warmup + self.rounds {
            record(self.start.expect("started").elapsed());
            charmrs::exit(0);
            return true;
        }
        self.done += 1;
        false
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Reductions.

/// An array element that takes part in back-to-back reductions.
struct Contributor {
    /// Number of elements in the array (the expected sum of every vector entry).
    elements: u64,
    /// Contribute the 1 KiB vector (`true`) or nothing (a barrier).
    sum: bool,
    /// Rounds of the callback loop; only element 0's clock is used.
    clock: RoundClock,
    /// Element 0's `reached` entry, the barrier's target.
    reached: Callback<()>,
    /// Element 0's `summed` entry, the sum's target.
    summed: Callback<(Vec<f64>,)>,
}

#[chare]
impl Contributor {
    fn new(ctx: &Ctx<Self>, rounds: u64, elements: u64, sum: bool) -> Self {
        let root = ctx.this_proxy().at(0usize);
        Contributor {
            elements,
            sum,
            clock: RoundClock::new(WARMUP_ROUNDS, rounds),
            reached: root.reached_callback(),
            summed: root.summed_callback(),
        }
    }

    /// On element 0: starts the next round of the callback loop, unless all are done.
    fn next_round(&mut self, ctx: &Ctx<Self>) {
        if !self.clock.next_round() {
            ctx.this_proxy().go();
        }
    }

    /// Starts the callback loop (sent to element 0 by main).
    #[entry]
    fn begin(&mut self, ctx: &Ctx<Self>) {
        self.next_round(ctx);
    }

    /// One round, broadcast to every element: contribute to element 0's callback.
    #[entry]
    fn go(&mut self, ctx: &Ctx<Self>) {
        if self.sum {
            ctx.contribute(vec![1.0f64; SUM_LEN], Reducer::Sum, self.summed);
        } else {
            ctx.barrier(self.reached);
        }
    }

    /// The barrier's callback (element 0).
    #[entry]
    fn reached(&mut self, ctx: &Ctx<Self>) {
        self.next_round(ctx);
    }

    /// The sum's callback (element 0).
    #[entry]
    fn summed(&mut self, ctx: &Ctx<Self>, total: Vec<f64>) {
        assert_eq!(total[SUM_LEN - 1], self.elements as f64, "wrong sum");
        self.next_round(ctx);
    }

    /// Runs `WARMUP_ROUNDS + rounds` allreduces back to back on every element; element 0 times
    /// the last `rounds` and ends the job.
    #[entry]
    async fn allreduce_loop(this: Coro<Self>, rounds: u64) {
        let (elements, sum) = this.with(|s, _| (s.elements, s.sum));
        let timer = this.ctx().raw_index().get(0) == 0;
        let mut start = Instant::now();
        for round in 0..WARMUP_ROUNDS + rounds {
            if round == WARMUP_ROUNDS {
                start = Instant::now();
            }
            if sum {
                let total = this
                    .ctx()
                    .allreduce(vec![1.0f64; SUM_LEN], Reducer::Sum)
                    .await;
                assert_eq!(total[SUM_LEN - 1], elements as f64, "wrong sum");
            } else {
                this.ctx().allreduce((), Reducer::Sum).await;
            }
        }
        if timer {
            record(start.elapsed());
            charmrs::exit(0);
        }
    }
}

/// `rounds` reductions over an array of `per_pe` elements on each of `pes` PEs: the callback
/// loop, or the allreduce loop.
fn reductions(pes: usize, per_pe: usize, sum: bool, allreduce: bool, rounds: u64) -> Duration {
    run_job(pes, move || async move {
        let n = pes * per_pe;
        let array = Array::<Contributor, usize>::new(n, (rounds, n as u64, sum));
        if allreduce {
            array.allreduce_loop(rounds);
        } else {
            array.at(0).begin();
        }
    })
}

/// Benchmark groups `reduction_callback` and `allreduce`.
fn reduction(c: &mut Criterion) {
    for (group, allreduce) in [("reduction_callback", false), ("allreduce", true)] {
        let mut g = c.benchmark_group(group);
        let kinds = [
            (if allreduce { "empty" } else { "barrier" }, false),
            ("sum_1KiB", true),
        ];
        for (kind, sum) in kinds {
            for (pes, per_pe) in LAYOUTS {
                g.bench_function(BenchmarkId::new(kind, layout_name(pes, per_pe)), |b| {
                    b.iter_custom(|iters| reductions(pes, per_pe, sum, allreduce, iters))
                });
            }
        }
        g.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Broadcast with completion, and future round trips.

/// A group element with an empty entry.
struct Echo;

#[chare]
impl Echo {
    fn new() -> Self {
        Echo
    }

    /// Does nothing; called through `ret()` so that its completion is awaited.
    #[entry]
    fn ping(&mut self) {}
}

/// Benchmark groups `broadcast_ret` and `future_round_trip`.
fn broadcast_and_futures(c: &mut Criterion) {
    let mut g = c.benchmark_group("broadcast_ret");
    for pes in [2usize, 4] {
        g.bench_function(BenchmarkId::new("charmrs", format!("P{pes}")), |b| {
            b.iter_custom(|iters| {
                run_job(pes, move || async move {
                    let group = Group::<Echo>::new(());
                    for _ in 0..WARMUP_ROUNDS {
                        group.ret().ping().await;
                    }
                    let start = Instant::now();
                    for _ in 0..iters {
                        group.ret().ping().await;
                    }
                    record(start.elapsed());
                    charmrs::exit(0);
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("future_round_trip");
    for (name, target_pe) in [("pe0_to_pe1", 1usize), ("same_pe", 0)] {
        g.bench_function(BenchmarkId::new("charmrs", name), |b| {
            b.iter_custom(|iters| {
                run_job(2, move || async move {
                    let element = Group::<Echo>::new(()).at(target_pe);
                    for _ in 0..WARMUP_ROUNDS {
                        element.ret().ping().await;
                    }
                    let start = Instant::now();
                    for _ in 0..iters {
                        element.ret().ping().await;
                    }
                    record(start.elapsed());
                    charmrs::exit(0);
                })
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// 2a. Collecting one value from every element: a multi-value future, futures, a gather.

/// An array element that hands out its index.
struct Giver;

#[chare]
impl Giver {
    fn new() -> Self {
        Giver
    }

    /// Sends its index to `to` (one value of a multi-value future, or a future of its own).
    #[entry]
    fn send_to(&mut self, ctx: &Ctx<Self>, to: Future<u64>) {
        to.send(ctx.index::<usize>() as u64);
    }

    /// Its index, as the call's result.
    #[entry]
    fn value(&mut self, ctx: &Ctx<Self>) -> u64 {
        ctx.index::<usize>() as u64
    }
}

/// Elements of `collect_values`.
const GIVERS: usize = 64;

/// One round of `collect_values` by `how`; checks the sum of the values.
async fn collect_round(givers: Array<Giver, usize>, how: &str) {
    let values: Vec<u64> = match how {
        "multi_future" => {
            let all = MultiFuture::<u64>::new(GIVERS);
            givers.send_to(all.sender());
            all.await
        }
        "futures_wait_all" => {
            let futures: Vec<Future<u64>> = (0..GIVERS)
                .map(|i| {
                    let f = Future::new();
                    givers.at(i).send_to(f);
                    f
                })
                .collect();
            wait_all(futures).await
        }
        _ => givers.gather().value().await,
    };
    assert_eq!(
        values.iter().sum::<u64>(),
        (GIVERS * (GIVERS - 1) / 2) as u64
    );
}

/// Benchmark group `collect_values`.
fn collect_values(c: &mut Criterion) {
    let mut g = c.benchmark_group("collect_values");
    for how in ["multi_future", "futures_wait_all", "gather"] {
        g.bench_function(BenchmarkId::new(how, "P4x16"), |b| {
            b.iter_custom(|iters| {
                run_job(4, move || async move {
                    let givers = Array::<Giver, usize>::new(GIVERS, ());
                    for _ in 0..WARMUP_ROUNDS {
                        collect_round(givers, how).await;
                    }
                    let start = Instant::now();
                    for _ in 0..iters {
                        collect_round(givers, how).await;
                    }
                    record(start.elapsed());
                    charmrs::exit(0);
                })
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// 2b. Channels against entry calls with a future.

/// A group element that exchanges values with another, by channel or by entry call.
struct Bouncer;

#[chare]
impl Bouncer {
    fn new() -> Self {
        Bouncer
    }

    /// Returns `x + 1` (the entry-call side of `entry_future`).
    #[entry]
    fn bounce(&mut self, x: u64) -> u64 {
        x + 1
    }

    /// PE 0's side: `warmup + rounds` round trips with `other`, by channel or by entry call;
    /// records the time of the last `rounds`, then ends the job.
    #[entry]
    async fn lead(
        this: Coro<Self>,
        other: ElementProxy<Bouncer>,
        warmup: u64,
        rounds: u64,
        channel: bool,
    ) {
        let ch = this.channel(&other);
        let mut x = 0u64;
        let mut start = Instant::now();
        for r in 0..warmup + rounds {
            if r == warmup {
                start = Instant::now();
            }
            x = if channel {
                ch.send(x);
                ch.recv::<u64>().await
            } else {
                other.ret().bounce(x).await
            };
        }
        assert_eq!(x, warmup + rounds);
        record(start.elapsed());
        charmrs::exit(0);
    }

    /// PE 1's side of the channel exchange: answers `count` values with `x + 1`.
    #[entry]
    async fn follow(this: Coro<Self>, other: ElementProxy<Bouncer>, count: u64) {
        let ch = this.channel(&other);
        for _ in 0..count {
            let x = ch.recv::<u64>().await;
            ch.send(x + 1);
        }
    }
}

/// Benchmark group `channel_round_trip`.
fn channels(c: &mut Criterion) {
    let mut g = c.benchmark_group("channel_round_trip");
    for (name, channel) in [("channel", true), ("entry_future", false)] {
        g.bench_function(BenchmarkId::new(name, "pe0_to_pe1"), |b| {
            b.iter_custom(|iters| {
                run_job(2, move || async move {
                    let group = Group::<Bouncer>::new(());
                    let (lead, follow) = (group.at(0), group.at(1));
                    if channel {
                        follow.follow(lead, WARMUP_ROUNDS + iters);
                    }
                    lead.lead(follow, WARMUP_ROUNDS, iters, channel);
                })
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// 3. `when`-buffered entries against plain entries.

/// How the source sends its batches.
const PLAIN: u8 = 0;
/// `when` entry, each batch in order.
const WHEN_IN_ORDER: u8 = 1;
/// `when` entry, each batch in reverse.
const WHEN_REVERSED: u8 = 2;

/// Sends batches of `BATCH` numbered messages to a [`Sink`].
struct Source {
    sink: ElementProxy<Sink>,
    mode: u8,
    next: u64,
    clock: RoundClock,
}

#[chare]
impl Source {
    fn new(sink: ElementProxy<Sink>, mode: u8, batches: u64) -> Self {
        Source {
            sink,
            mode,
            next: 0,
            clock: RoundClock::new(WARMUP_BATCHES, batches),
        }
    }

    /// Sends the next batch (started by main, then requested by the sink after each batch).
    #[entry]
    fn more(&mut self) {
        if self.clock.next_round() {
            return;
        }
        let batch = self.next..self.next + BATCH;
        self.next += BATCH;
        match self.mode {
            PLAIN => batch.for_each(|i| self.sink.plain(i)),
            WHEN_IN_ORDER => batch.for_each(|i| self.sink.step(i)),
            _ => batch.rev().for_each(|i| self.sink.step(i)),
        }
    }
}

/// Receives numbered messages; every delivered one advances `iter`.
struct Sink {
    iter: u64,
    /// Messages delivered in the current batch.
    in_batch: u64,
    source: Option<ElementProxy<Source>>,
}

#[chare]
impl Sink {
    fn new() -> Self {
        Sink {
            iter: 0,
            in_batch: 0,
            source: None,
        }
    }

    /// Learns where to ask for more batches.
    #[entry]
    fn bind(&mut self, source: ElementProxy<Source>) {
        self.source = Some(source);
    }

    fn advance(&mut self) {
        self.iter += 1;
        self.in_batch += 1;
        if self.in_batch == BATCH {
            self.in_batch = 0;
            self.source.expect("bound").more();
        }
    }

    /// A message that waits until the sink reaches its iteration.
    #[entry(when = "self.iter == iter")]
    fn step(&mut self, iter: u64) {
        debug_assert_eq!(iter, self.iter);
        self.advance();
    }

    /// The same without a condition (messages arrive in order; checked).
    #[entry]
    fn plain(&mut self, iter: u64) {
        assert_eq!(iter, self.iter, "plain message out of order");
        self.advance();
    }
}

/// Time for `iters` messages of mode `mode` from a source on PE 0 to a sink on `sink_pe`.
fn when_delivery_job(sink_pe: usize, mode: u8, iters: u64) -> Duration {
    let batches = iters.div_ceil(BATCH).max(1);
    let elapsed = run_job(sink_pe + 1, move || async move {
        let sink = Single::<Sink>::new((), Some(sink_pe));
        let source = Single::<Source>::new((*sink, mode, batches), Some(0));
        sink.bind(*source);
        source.more();
    });
    elapsed.mul_f64(iters as f64 / (batches * BATCH) as f64)
}

/// Benchmark group `when_delivery`.
fn when_delivery(c: &mut Criterion) {
    let mut g = c.benchmark_group("when_delivery");
    g.throughput(Throughput::Elements(1));
    for (placement, sink_pe) in [("same_pe", 0usize), ("cross_pe", 1)] {
        for (name, mode) in [
            ("plain", PLAIN),
            ("when_in_order", WHEN_IN_ORDER),
            ("when_reversed64", WHEN_REVERSED),
        ] {
            g.bench_function(BenchmarkId::new(placement, name), |b| {
                b.iter_custom(|iters| when_delivery_job(sink_pe, mode, iters))
            });
        }
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// 5. Calls through a section: the multicast tree against a point call per member.

/// An array element that, called through a section, reaches the section's barrier.
struct Member;

#[chare]
impl Member {
    fn new() -> Self {
        Member
    }

    #[entry]
    fn hit(&mut self, ctx: &Ctx<Self>, section: Section<Member>, done: Future<()>) {
        ctx.section(&section).barrier(done);
    }
}

/// Benchmark group `section_call`.
fn section_calls(c: &mut Criterion) {
    let mut g = c.benchmark_group("section_call");
    for pes in [2usize, 4] {
        for (name, multicast) in [("multicast", true), ("point_calls", false)] {
            g.bench_function(BenchmarkId::new(name, format!("P{pes}")), |b| {
                b.iter_custom(|iters| {
                    run_job(pes, move || async move {
                        let cells = Array::<Member, usize>::new(512, ());
                        let section = cells.section((0..512).step_by(2));
                        let round = || {
                            let done = Future::new();
                            if multicast {
                                section.hit(section.clone(), done);
                            } else {
                                for k in (0..512).step_by(2) {
                                    cells.at(k).hit(section.clone(), done);
                                }
                            }
                            done
                        };
                        for _ in 0..WARMUP_ROUNDS / 10 {
                            round().await;
                        }
                        let start = Instant::now();
                        for _ in 0..iters {
                            round().await;
                        }
                        record(start.elapsed());
                        charmrs::exit(0);
                    })
                })
            });
        }
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
    reduction(&mut c);
    broadcast_and_futures(&mut c);
    collect_values(&mut c);
    channels(&mut c);
    when_delivery(&mut c);
    section_calls(&mut c);
}

criterion_main!(benches);
