//! `with_local` (Charm++'s `ckLocalBranch` / `ckLocal`): synchronous access to an element on the
//! calling PE; `None` for one elsewhere; a borrowed element is a panic naming it.

mod common;

use charmrs::prelude::*;
use common::run_job;

/// One per PE: counts what the PE's workers report to it directly.
struct Tally {
    hits: u64,
    waiting_for: u64,
}

#[chare]
impl Tally {
    fn new() -> Self {
        Tally {
            hits: 0,
            waiting_for: 0,
        }
    }

    #[entry]
    fn hits(&mut self) -> u64 {
        self.hits
    }

    /// Suspends until `n` hits were counted (woken by `with_local` from other entries).
    #[entry]
    async fn wait_for(this: Coro<Self>, n: u64) -> u64 {
        this.with(|s, _| s.waiting_for = n);
        this.wait(move |s| s.hits >= n).await;
        this.with(|s, _| s.hits)
    }

    /// Tries to reach itself through `with_local` from its own entry.
    #[entry]
    fn reenter(&mut self, ctx: &Ctx<Self>) {
        ctx.this_element().with_local(|_, _| ());
    }
}

struct Worker;

#[chare]
impl Worker {
    fn new() -> Self {
        Worker
    }

    /// Counts a hit in this PE's tally; reports whether `other` is on this PE.
    #[entry]
    fn work(&mut self, tallies: Group<Tally>, other: ElementProxy<Tally>) -> bool {
        tallies.with_local(|t, ctx| {
            assert_eq!(ctx.my_pe(), charmrs::my_pe());
            t.hits += 1;
        });
        other.with_local(|_, _| ()).is_some()
    }
}

#[test]
fn with_local_reaches_this_pes_element_only() {
    run_job(3, |_| async {
        let tallies = Group::<Tally>::new(());
        let waiting = tallies.at(1).ret().wait_for(2);
        let workers = Array::<Worker, usize>::new(6, ()); // two per PE
        let local: Vec<bool> = workers.gather().work(tallies, tallies.at(0)).await;
        // Tally 0 lives on PE 0 with workers 0 and 1.
        assert_eq!(local, vec![true, true, false, false, false, false]);
        let hits: Vec<u64> = tallies.gather().hits().await;
        assert_eq!(hits, vec![2, 2, 2]);
        assert_eq!(
            waiting.await,
            2,
            "a waiting coroutine re-checked after with_local"
        );
        charmrs::exit(0);
    })
    .unwrap();
    let e = run_job(1, |_| async {
        let tallies = Group::<Tally>::new(());
        tallies.at(0).ret().reenter().await;
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("borrowed already"), "{e}");
}
