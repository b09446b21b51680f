//! The task pool: concurrent map jobs, chunks and PE caps, single and fire-and-forget tasks,
//! nested tasks, failures.

mod common;

use charmrs::{pool, Error, MapOptions};
use common::run_job;
use std::sync::atomic::{AtomicU64, Ordering};

#[charmrs::task]
fn square(x: u64) -> u64 {
    x * x
}

#[charmrs::task]
fn which_pe(_x: u32) -> usize {
    charmrs::my_pe()
}

#[charmrs::task]
fn fragile(x: u32) -> u32 {
    if x == 7 {
        panic!("task 7 breaks");
    }
    x
}

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

static SPAWNED: AtomicU64 = AtomicU64::new(0);

#[charmrs::task]
fn count(by: u64) {
    SPAWNED.fetch_add(by, Ordering::SeqCst);
}

fn not_a_task(x: u64) -> u64 {
    x
}

#[test]
fn two_concurrent_map_jobs_in_input_order() {
    run_job(4, |_| async {
        let opts = MapOptions {
            chunk: 2,
            max_pes: Some(2),
        };
        let f1 = pool().map_async(square, vec![1, 2, 3, 4, 5], opts);
        let f2 = pool().map_async(square, vec![1, 3, 5, 7, 9], opts);
        assert_eq!(f2.await, vec![1, 9, 25, 49, 81]);
        assert_eq!(f1.await, vec![1, 4, 9, 16, 25]);
        let many: Vec<u64> = (0..500).collect();
        let want: Vec<u64> = many.iter().map(|x| x * x).collect();
        assert_eq!(pool().map(square, many).await, want);
        assert_eq!(pool().map(square, Vec::new()).await, Vec::<u64>::new());
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn the_pe_cap_limits_a_job() {
    run_job(4, |_| async {
        let opts = MapOptions {
            chunk: 1,
            max_pes: Some(1),
        };
        let pes = pool().map_async(which_pe, (0..40).collect(), opts).await;
        let distinct: std::collections::BTreeSet<usize> = pes.iter().copied().collect();
        assert_eq!(distinct.len(), 1, "one PE at a time: {distinct:?}");
        let pes = pool().map(which_pe, (0..400).collect()).await;
        let distinct: std::collections::BTreeSet<usize> = pes.iter().copied().collect();
        assert!(distinct.len() > 1, "an uncapped job spreads: {distinct:?}");
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn a_panicking_task_fails_its_job_only() {
    run_job(3, |_| async {
        let e = pool()
            .map_async(fragile, (0..20).rev().collect(), MapOptions::default())
            .result()
            .await;
        match e {
            Err(Error::Remote { entry, message, .. }) => {
                assert!(entry.ends_with("::fragile"), "{entry}");
                // 7 is the 13th item: the error names its place in the input.
                assert!(message.contains("item 12: task 7 breaks"), "{message}");
            }
            other => panic!("expected the task's error, got {other:?}"),
        }
        assert_eq!(pool().map(fragile, vec![1, 2, 3]).await, vec![1, 2, 3]);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn nested_tasks_from_inside_tasks() {
    run_job(4, |_| async {
        assert_eq!(pool().task(fib, 15).await, 610);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn fire_and_forget_spawns() {
    run_job(2, |_| async {
        for _ in 0..10 {
            pool().spawn(count, 3);
        }
        charmrs::wait_qd().await;
        assert_eq!(SPAWNED.load(Ordering::SeqCst), 30);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn an_unregistered_function_is_named() {
    let r = run_job(1, |_| async {
        let _ = pool().task(not_a_task, 1);
    });
    match r {
        Err(Error::Aborted(msg)) => {
            assert!(
                msg.contains("not_a_task") && msg.contains("#[charmrs::task]"),
                "{msg}"
            )
        }
        other => panic!("expected an abort, got {other:?}"),
    }
}

#[test]
fn a_task_declared_inside_a_function_body() {
    #[charmrs::task]
    fn triple(x: u32) -> u32 {
        3 * x
    }
    run_job(2, |_| async {
        assert_eq!(pool().map(triple, vec![1, 2]).await, vec![3, 6]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// Maps with a task function `twin` of its own.
fn map_twin_plus_one(items: Vec<u32>) -> charmrs::Future<Vec<u32>> {
    #[charmrs::task]
    fn twin(x: u32) -> u32 {
        x + 1
    }
    pool().map_async(twin, items, MapOptions::default())
}

/// Maps with another task function `twin` of the same module.
fn map_twin_plus_hundred(items: Vec<u32>) -> charmrs::Future<Vec<u32>> {
    #[charmrs::task]
    fn twin(x: u32) -> u32 {
        x + 100
    }
    pool().map_async(twin, items, MapOptions::default())
}

/// Two task functions of one name in one module (declared in different functions) are two
/// tasks: each map runs its own. Before, both registered as `pool::twin` and one of them ran
/// the other's body.
#[test]
fn task_functions_of_one_name_in_different_functions_are_told_apart() {
    run_job(2, |_| async {
        assert_eq!(map_twin_plus_one(vec![1, 2]).await, vec![2, 3]);
        assert_eq!(map_twin_plus_hundred(vec![1, 2]).await, vec![101, 102]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// The master's PE (0) takes a chunk only when no other PE is free: a synchronous chunk there
/// delays every other PE's next one.
#[test]
fn the_masters_pe_works_last() {
    run_job(4, |_| async {
        let opts = MapOptions {
            chunk: 1,
            max_pes: None,
        };
        let mut pes = pool().map_async(which_pe, vec![0, 1, 2], opts).await;
        pes.sort_unstable();
        assert_eq!(pes, vec![1, 2, 3]);
        charmrs::exit(0);
    })
    .unwrap();
}

static RUNNING: AtomicU64 = AtomicU64::new(0);
static MOST_RUNNING: AtomicU64 = AtomicU64::new(0);

/// An async task that waits a little while it runs, noting how many run at once.
#[charmrs::task]
async fn slow(x: u64) -> u64 {
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    MOST_RUNNING.fetch_max(now, Ordering::SeqCst);
    charmrs::sleep(std::time::Duration::from_millis(5)).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    x * 2
}

#[test]
fn an_async_job_keeps_to_its_pe_cap() {
    // An async chunk frees its PE while it waits, but the job's cap still bounds how many of
    // its tasks run at once (before: every PE took one).
    run_job(4, |_| async {
        let opts = MapOptions {
            chunk: 1,
            max_pes: Some(2),
        };
        let out = pool().map_async(slow, (0..12).collect(), opts).await;
        assert_eq!(out, (0..12).map(|x| x * 2).collect::<Vec<_>>());
        assert_eq!(MOST_RUNNING.load(Ordering::SeqCst), 2);
        charmrs::exit(0);
    })
    .unwrap();
}

static SLEPT: AtomicU64 = AtomicU64::new(0);

/// Sleeps, then counts itself: no message of it is in flight while it sleeps.
#[charmrs::task]
async fn sleeper(ms: u64) -> u64 {
    charmrs::sleep(std::time::Duration::from_millis(ms)).await;
    SLEPT.fetch_add(1, Ordering::SeqCst);
    ms
}

/// Quiescence waits for a pool job's suspended tasks: their results are sure to come although
/// nothing is in flight while they sleep.
#[test]
fn quiescence_waits_for_suspended_pool_tasks() {
    run_job(3, |_| async {
        let opts = MapOptions {
            chunk: 1,
            max_pes: None,
        };
        let job = pool().map_async(sleeper, vec![150, 200, 100], opts);
        charmrs::wait_qd().await;
        assert_eq!(
            SLEPT.load(Ordering::SeqCst),
            3,
            "quiescence before the tasks ended"
        );
        assert_eq!(job.await, vec![150, 200, 100]);
        charmrs::exit(0);
    })
    .unwrap();
}
