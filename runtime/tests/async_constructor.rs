//! Suspendable constructors: `async fn new` may await; messages for the element wait until it is
//! built, and arrive once, in order.

mod common;

use charmrs::prelude::*;
use charmrs::Error;
use common::run_job;
use std::time::Duration;

/// Built only after a nap and a value from a future.
struct Slow {
    log: Vec<String>,
}

#[chare]
impl Slow {
    async fn new(ctx: Ctx<Self>, base: Future<u32>, explode: bool) -> Self {
        let me: usize = ctx.index();
        charmrs::sleep(Duration::from_millis(5 * (me as u64 % 3))).await;
        if explode && me == 2 {
            panic!("constructor of 2 gives up");
        }
        // Only element 0 owns the future; the others start from 0.
        let start = if ctx.my_pe() == base.owner() && me == 0 {
            base.await
        } else {
            0
        };
        Slow {
            log: vec![format!("built {me} from {start}")],
        }
    }

    #[entry]
    fn push(&mut self, what: String) {
        self.log.push(what);
    }

    #[entry]
    fn log(&mut self) -> Vec<String> {
        self.log.clone()
    }
}

#[test]
fn messages_wait_for_suspended_constructors() {
    run_job(2, |_| async {
        let base = Future::<u32>::new();
        let a = Array::<Slow, usize>::new(6, (base, false));
        a.at(0).push("first".into());
        a.push("everyone".into());
        a.at(0).push("second".into());
        base.send(41);
        let logs = a.gather().log().await;
        // Point messages keep their order; the broadcast waits until every element of this PE
        // is built (Charm++ does not order a broadcast against point messages either).
        assert_eq!(logs[0][0], "built 0 from 41");
        let mut rest = logs[0][1..].to_vec();
        assert_eq!(rest.iter().filter(|m| *m == "everyone").count(), 1);
        rest.retain(|m| m != "everyone");
        assert_eq!(rest, vec!["first", "second"]);
        for (i, log) in logs.iter().enumerate().skip(1) {
            assert_eq!(
                log,
                &vec![format!("built {i} from 0"), "everyone".to_string()]
            );
        }
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn a_panicking_async_constructor_aborts_naming_it() {
    let r = run_job(2, |_| async {
        let base = Future::<u32>::new();
        let a = Array::<Slow, usize>::new(4, (base, true));
        a.push("x".into());
        charmrs::sleep(Duration::from_secs(30)).await;
    });
    match r {
        Err(Error::Aborted(msg)) => {
            assert!(
                msg.contains("`new`") && msg.contains("Slow") && msg.contains("(2,)"),
                "{msg}"
            );
            assert!(msg.contains("constructor of 2 gives up"), "{msg}");
        }
        other => panic!("expected an abort, got {other:?}"),
    }
}

/// Tries to migrate from inside its suspendable constructor.
#[derive(serde::Serialize, serde::Deserialize)]
struct Restless {
    refused: String,
}

#[chare(migratable)]
impl Restless {
    async fn new(ctx: Ctx<Self>) -> Self {
        charmrs::sleep(Duration::from_millis(1)).await;
        let refused = match ctx.migrate(1) {
            Err(e) => e.to_string(),
            Ok(()) => "accepted".into(),
        };
        Restless { refused }
    }

    #[entry]
    fn refused(&mut self) -> String {
        self.refused.clone()
    }
}

/// `migrate` inside an `async fn new` is refused with an error (it used to be accepted and then
/// silently dropped: the element is not in its PE's table until the constructor returns).
#[test]
fn migrating_from_inside_a_suspendable_constructor_is_an_error() {
    run_job(2, |_| async {
        let a = Array::<Restless, usize>::new(1, ());
        let why = a.at(0usize).ret().refused().await;
        assert!(
            why.contains("cannot migrate from inside its constructor"),
            "{why}"
        );
        charmrs::exit(0);
    })
    .unwrap();
}

// Every element's home is PE 1.
charmrs::array_map!(HOME_ON_1 = |_index, _pes| 1);

/// An element inserted away from its home, whose `async fn new` waits for something sent only
/// after `done_inserting`, is counted by the census while it is built: `done_inserting`
/// completes, and calls sent through the home wait for the constructor. Before, the home heard
/// of the element only once it was built, and `done_inserting` waited for ever.
#[test]
fn done_inserting_counts_an_element_still_being_built_away_from_home() {
    run_job(2, |_| async {
        let base = Future::<u32>::new();
        let a = Array::<Slow, usize>::new_sparse(Some(&HOME_ON_1));
        a.insert(0, (base, false), Some(0));
        a.done_inserting().await;
        a.at(0).push("after".into());
        base.send(41);
        assert_eq!(
            a.at(0).ret().log().await,
            vec!["built 0 from 41".to_string(), "after".to_string()]
        );
        charmrs::exit(0);
    })
    .unwrap();
}

/// Calls sent before an element's insertion (waiting at its home) run before calls sent after
/// it (waiting for its `async fn new`), in the order sent. Before, the later ones ran first.
#[test]
fn calls_from_before_an_insertion_run_first_once_the_element_is_built() {
    run_job(2, |_| async {
        let base = Future::<u32>::new();
        let a = Array::<Slow, usize>::new_sparse(Some(&HOME_ON_1));
        a.at(1).push("m1".into());
        a.insert(1, (base, false), None);
        a.at(1).push("m2".into());
        a.done_inserting().await;
        assert_eq!(
            a.at(1).ret().log().await,
            vec!["built 1 from 0".to_string(), "m1".into(), "m2".into()]
        );
        charmrs::exit(0);
    })
    .unwrap();
}
