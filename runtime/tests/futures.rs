//! Results of calls (`ret`, `gather`), explicit futures, suspendable entries, `wait` and `sleep`.

mod common;

use charmrs::prelude::*;
use charmrs::Error;
use common::run_job;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A worker with value-returning, failing and suspendable entries.
struct Worker {
    got: u32,
    log: Vec<String>,
}

#[chare]
impl Worker {
    fn new() -> Self {
        Worker {
            got: 0,
            log: Vec::new(),
        }
    }

    #[entry]
    fn square(&mut self, x: u64) -> u64 {
        x * x
    }

    #[entry]
    fn whoami(&mut self, ctx: &Ctx<Self>) -> (usize, usize) {
        (ctx.raw_index().get(0), ctx.my_pe())
    }

    #[entry]
    fn fail_on(&mut self, ctx: &Ctx<Self>, bad: usize) -> u32 {
        if ctx.raw_index().get(0) == bad {
            panic!("element {bad} refuses");
        }
        1
    }

    #[entry]
    fn data(&mut self, tag: String) {
        self.got += 1;
        self.log.push(tag);
    }

    /// Suspends until `n` `data` messages arrived, then reports them.
    #[entry]
    async fn collect(this: Coro<Self>, n: u32) -> Vec<String> {
        this.with(|s, _| s.log.push("collect started".into()));
        this.wait(|s| s.got >= n).await;
        this.with(|s, _| s.log.clone())
    }

    /// Fills the two futures from this PE.
    #[entry]
    fn fill(&mut self, ctx: &Ctx<Self>, f1: Future<u32>, f2: Future<String>) {
        f1.send(1);
        f2.send(format!("two from PE {}", ctx.my_pe()));
    }

    /// Fulfils `f` with `v`.
    #[entry]
    fn fulfil(&mut self, f: Future<u32>, v: u32) {
        f.send(v);
    }

    /// Sleeps without blocking the PE, then answers.
    #[entry]
    async fn nap(_this: Coro<Self>, ms: u64) -> u64 {
        let t = Instant::now();
        charmrs::sleep(Duration::from_millis(ms)).await;
        t.elapsed().as_millis() as u64
    }

    /// Sends its PE and index to `to` (one value of a multi-value future, or a plain one).
    #[entry]
    fn report(&mut self, ctx: &Ctx<Self>, to: Future<(usize, usize)>) {
        to.send((ctx.my_pe(), ctx.index::<usize>()));
    }

    /// Schedules a report of its PE to `to` after `ms` (from a plain entry method).
    #[entry]
    fn report_later(&mut self, ctx: &Ctx<Self>, ms: u64, to: Future<(usize, u64)>) {
        let (pe, start) = (ctx.my_pe(), Instant::now());
        charmrs::schedule_after(Duration::from_millis(ms), move || {
            to.send((pe, start.elapsed().as_millis() as u64));
        });
    }

    #[entry]
    fn ping(&mut self) -> String {
        "pong".into()
    }
}

#[test]
fn ret_on_point_calls_and_broadcasts() {
    run_job(3, |_| async {
        let workers = Array::<Worker, usize>::new(7, ());
        let f = workers.at(5).ret().square(12);
        assert_eq!(f.await, 144);
        // Broadcast completion, then values ordered by index.
        workers.ret().data("hello".into()).await;
        let who = workers.gather().whoami().await;
        assert_eq!(who.len(), 7);
        for (i, (idx, pe)) in who.iter().enumerate() {
            assert_eq!(*idx, i);
            assert_eq!(*pe, i * 3 / 7, "block placement");
        }
        let squares: Vec<u64> =
            wait_all((0..7).map(|i| workers.at(i).ret().square(i as u64))).await;
        assert_eq!(squares, vec![0, 1, 4, 9, 16, 25, 36]);
        let g = Group::<Worker>::new(());
        assert_eq!(g.gather().ping().await, vec!["pong"; 3]);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn a_panicking_remote_entry_reaches_its_future() {
    run_job(4, |_| async {
        let workers = Array::<Worker, usize>::new(8, ());
        let e = workers.at(6).ret().fail_on(6).result().await.unwrap_err();
        match &e {
            Error::Remote {
                pe,
                entry,
                index,
                message,
                ..
            } => {
                assert_eq!(*pe, 3);
                assert_eq!(entry, "Worker::fail_on");
                assert_eq!(index.map(|i| i.to_string()), Some("(6,)".to_owned()));
                assert!(message.contains("element 6 refuses"), "{message}");
            }
            other => panic!("expected a remote error, got {other:?}"),
        }
        // On a broadcast, one failing element fails the gathered result…
        let e = workers.gather().fail_on(2).result().await.unwrap_err();
        assert!(e.to_string().contains("element 2 refuses"), "{e}");
        // The error names the failed element, whatever its panic says.
        assert!(
            e.to_string()
                .contains("`Worker::fail_on` failed at index (2,) on PE 1"),
            "{e}"
        );
        // …and the job is still alive.
        assert_eq!(workers.gather().fail_on(99).await, vec![1; 8]);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn explicit_futures_fulfilled_before_and_after_waiting() {
    run_job(2, |_| async {
        let w = Single::<Worker>::new((), Some(1));
        // After: the fill happens while we wait.
        let (f1, f2) = (Future::<u32>::new(), Future::<String>::new());
        w.fill(f1, f2);
        assert_eq!(f1.await, 1);
        assert_eq!(f2.await, "two from PE 1");
        // Before: the value is there before the await starts.
        let (g1, g2) = (Future::<u32>::new(), Future::<String>::new());
        w.fill(g1, g2);
        w.ret().ping().await; // the fill ran before this reply (FIFO between the two PEs)
        assert!(g1.is_ready() && g2.is_ready());
        assert_eq!(g1.await, 1);
        assert_eq!(g2.await, "two from PE 1");
        // Local fulfilment.
        let h = Future::<u32>::new();
        h.send(5);
        assert_eq!(h.await, 5);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn wait_any_returns_the_first_ready() {
    run_job(2, |_| async {
        let w = Single::<Worker>::new((), Some(1));
        // The slow nap is long enough that no stall of a loaded host lets it finish first; the
        // job ends without waiting for it.
        let slow = w.ret().nap(5000);
        let fast = w.ret().nap(1);
        let futs = [slow, fast];
        assert_eq!(wait_any(&futs).await, 1);
        assert!(fast.await < 5000);
        assert!(!slow.is_ready());
        charmrs::exit(0);
    })
    .unwrap();
}

/// `iwait` yields each value once it is there, whatever the order of the list, and waits while
/// none is: futures fulfilled by another PE one at a time, in the order 1, 2, 0, each only after
/// the previous one came back.
#[test]
fn iwait_yields_values_as_they_are_fulfilled() {
    run_job(2, |_| async {
        let w = Single::<Worker>::new((), Some(1));
        let futures: Vec<Future<u32>> = (0..3).map(|_| Future::new()).collect();
        let mut arrivals = charmrs::iwait(futures.clone());
        assert_eq!(arrivals.remaining(), 3);
        for position in [1, 2, 0] {
            w.fulfil(futures[position], position as u32 * 10);
            assert_eq!(
                arrivals.next().await,
                Some((position, position as u32 * 10))
            );
        }
        assert_eq!(arrivals.remaining(), 0);
        assert_eq!(arrivals.next().await, None);
        charmrs::exit(0);
    })
    .unwrap();
}

/// `wait_any` over a future already awaited (charm4py's `iwait` loop without removing what it
/// consumed) fails naming the future; before, it waited for ever.
#[test]
fn wait_any_over_a_consumed_future_fails_naming_it() {
    let e = run_job(1, |_| async {
        let f = Future::<u32>::new();
        f.send(1);
        assert_eq!(f.await, 1);
        wait_any(&[f]).await;
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("already consumed"), "{e}");
}

#[test]
fn a_condition_that_becomes_true_only_after_several_other_entries() {
    run_job(2, |_| async {
        let w = Single::<Worker>::new((), Some(1));
        let result = w.ret().collect(3);
        w.data("a".into());
        w.data("b".into());
        w.data("c".into());
        let log = result.await;
        assert_eq!(log, vec!["collect started", "a", "b", "c"]);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn sleep_does_not_block_the_pe() {
    run_job(1, |_| async {
        let w = Single::<Worker>::new((), Some(0));
        let nap = w.ret().nap(5000);
        // While the nap sleeps, the same PE (the only one) serves other calls.
        for i in 0..100 {
            assert_eq!(w.ret().square(i).await, i * i);
        }
        assert!(!nap.is_ready(), "the calls waited for the nap");
        charmrs::exit(0);
    })
    .unwrap();
}

static DOUBLE: Mutex<()> = Mutex::new(());

#[test]
fn a_second_fulfilment_is_a_clear_error() {
    let _g = DOUBLE.lock().unwrap();
    let r = run_job(2, |_| async {
        let f = Future::<u32>::new();
        f.send(1);
        f.send(2);
        charmrs::sleep(Duration::from_secs(30)).await;
    });
    match r {
        Err(Error::Aborted(msg)) => assert!(msg.contains("fulfilled twice"), "{msg}"),
        other => panic!("expected an abort, got {other:?}"),
    }
}

/// charm4py's `Future(num_vals=n)`: every element of an array spread over the PEs sends one value
/// to the same future; awaiting it yields all of them (arrival order), and only once all came.
#[test]
fn a_multi_value_future_collects_one_value_from_each_sender() {
    run_job(4, |_| async {
        let workers = Array::<Worker, usize>::new(16, ());
        let all = MultiFuture::<(usize, usize)>::new(16);
        assert!(!all.is_ready());
        workers.report(all.sender());
        let mut got = all.await;
        got.sort_by_key(|&(_, i)| i);
        let indices: Vec<usize> = got.iter().map(|&(_, i)| i).collect();
        assert_eq!(indices, (0..16).collect::<Vec<_>>());
        let pes: std::collections::BTreeSet<usize> = got.iter().map(|&(pe, _)| pe).collect();
        assert_eq!(pes.len(), 4, "the senders were on every PE: {got:?}");

        // Not ready until the last value: 3 of 4 sent, then the fourth.
        let some = MultiFuture::<(usize, usize)>::new(4);
        for i in 0..3 {
            workers.at(i).report(some.sender());
        }
        workers.at(3).ret().ping().await; // after the three (FIFO per pair of PEs)...
        for i in 0..3 {
            workers.at(i).ret().ping().await;
        }
        assert!(!some.is_ready(), "ready with 3 of 4 values");
        some.send((99, 99)); // a local value counts as one
        assert_eq!(some.await.len(), 4);

        // No senders: ready at once, empty.
        let none = MultiFuture::<u8>::new(0);
        assert!(none.is_ready());
        assert!(none.await.is_empty());
        charmrs::exit(0);
    })
    .unwrap();
}

/// One value more than announced aborts the job naming the future and the count.
#[test]
fn a_value_beyond_a_multi_value_futures_count_is_a_clear_error() {
    let _g = DOUBLE.lock().unwrap();
    let r = run_job(2, |_| async {
        let w = Array::<Worker, usize>::new(2, ());
        let f = MultiFuture::<(usize, usize)>::new(2);
        for _ in 0..3 {
            w.at(1).report(f.sender());
        }
        charmrs::sleep(Duration::from_secs(30)).await;
    });
    match r {
        Err(Error::Aborted(msg)) => {
            assert!(msg.contains("takes 2 value(s) and received more"), "{msg}")
        }
        other => panic!("expected an abort, got {other:?}"),
    }
}

/// Awaiting the sending side of a multi-value future, instead of the future, says so.
#[test]
fn awaiting_the_sending_side_of_a_multi_value_future_names_it() {
    let e = run_job(1, |_| async {
        let f = MultiFuture::<u32>::new(1);
        f.send(1);
        f.sender().await;
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("await the MultiFuture"), "{e}");
}

/// A value sent to a multi-value future after its values were taken is a clear error too.
#[test]
fn a_value_after_a_multi_value_future_was_awaited_is_a_clear_error() {
    let _g = DOUBLE.lock().unwrap();
    let r = run_job(1, |_| async {
        let f = MultiFuture::<u32>::new(1);
        f.send(1);
        assert_eq!(f.await, [1]);
        f.send(2);
        charmrs::sleep(Duration::from_secs(30)).await;
    });
    match r {
        Err(Error::Aborted(msg)) => {
            assert!(
                msg.contains("fulfilled again after its value was consumed"),
                "{msg}"
            )
        }
        other => panic!("expected an abort, got {other:?}"),
    }
}

/// charm4py's `scheduleCallableAfter`: a closure scheduled from an entry method runs on that PE
/// after its delay, the PE serving other calls meanwhile; a panic in it aborts naming it.
#[test]
fn a_scheduled_closure_runs_after_its_delay_without_blocking_the_pe() {
    run_job(2, |_| async {
        let w = Single::<Worker>::new((), Some(1));
        let (late, early) = (Future::new(), Future::new());
        w.report_later(60, late);
        w.report_later(10, early);
        assert_eq!(w.ret().square(7).await, 49, "the PE serves calls meanwhile");
        let (pe, waited) = early.await;
        assert_eq!(pe, 1);
        assert!(waited >= 10, "ran after {waited} ms");
        assert!(!late.is_ready(), "the later one ran first");
        assert!(late.await.1 >= 60);
        charmrs::exit(0);
    })
    .unwrap();

    let e = run_job(1, |_| async {
        charmrs::schedule_after(Duration::from_millis(1), || panic!("scheduled boom"));
        charmrs::sleep(Duration::from_secs(30)).await;
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("scheduled boom") && e.contains("charmrs::schedule_after"),
        "{e}"
    );
}
