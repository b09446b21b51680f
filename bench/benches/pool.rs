//! Benchmarks of the task pool (`charmrs::pool`), inside this process (one OS thread per PE).
//!
//! Groups (criterion ids read `group/function/parameter`):
//! - `pool/fib/{16,18}`: parallel Fibonacci with nested `async` tasks on 4 PEs: every call of
//!   `fib(n)` with `n ≥ 2` starts two tasks and awaits them (fib(16): 3 192 tasks, fib(18):
//!   8 360), each one a job of its own on the pool's master, so this measures the master's
//!   scheduling with many jobs alive at once. Time per `fib(n)`.
//! - `pool/map/{1000,10000}`: `pool().map` of a trivial function over that many items, one item
//!   per chunk, on 4 PEs. Time per map.
//!
//! Each `iter_custom` call starts one job and times its `iters` repetitions with `Instant`
//! (after one untimed repetition); the result leaves the job through a `static`.
//!
//! Run: `cargo bench -p charmrs-bench --bench pool` (about a minute on a 2-core VM).

use charmrs::{pool, MapOptions, Runtime};
use criterion::{criterion_main, BenchmarkId, Criterion};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// PEs of every job.
const PES: usize = 4;

/// How long an idle PE polls before parking (as in `benches/model.rs`).
const IDLE_SPIN: Duration = Duration::from_millis(10);

/// The timed duration of the last job.
static ELAPSED: Mutex<Option<Duration>> = Mutex::new(None);

/// Parallel Fibonacci with nested tasks.
#[charmrs::task]
async fn fib(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    let a = pool().task(fib, n - 1);
    let b = pool().task(fib, n - 2);
    a.await + b.await
}

/// The mapped function.
#[charmrs::task]
fn double(x: u64) -> u64 {
    x * 2
}

/// Runs `work` once untimed, then `iters` times timed, in one job of [`PES`] PEs.
fn timed<W, Fut>(iters: u64, work: W) -> Duration
where
    W: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    *ELAPSED.lock().unwrap() = None;
    let code = Runtime::new(PES)
        .idle_spin(IDLE_SPIN)
        .run(move |_args| async move {
            work().await;
            let start = Instant::now();
            for _ in 0..iters {
                work().await;
            }
            *ELAPSED.lock().unwrap() = Some(start.elapsed());
            charmrs::exit(0);
        })
        .expect("benchmark job failed");
    assert_eq!(code, 0);
    ELAPSED.lock().unwrap().take().expect("no time recorded")
}

fn fib_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    for n in [16u64, 18] {
        g.bench_with_input(BenchmarkId::new("fib", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                timed(iters, move || async move {
                    let expect = (0..n).fold((0u64, 1u64), |(a, b), _| (b, a + b)).0;
                    assert_eq!(pool().task(fib, n).await, expect);
                })
            })
        });
    }
    for items in [1000u64, 10_000] {
        g.bench_with_input(BenchmarkId::new("map", items), &items, |b, &items| {
            b.iter_custom(|iters| {
                timed(iters, move || async move {
                    let out = pool()
                        .map_async(double, (0..items).collect(), MapOptions::default())
                        .await;
                    assert_eq!(out.len(), items as usize);
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
        .sample_size(10)
}

/// Runs every group (what `criterion_group!` would generate, with a doc comment).
fn benches() {
    let mut c = config().configure_from_args();
    fib_bench(&mut c);
}

criterion_main!(benches);
