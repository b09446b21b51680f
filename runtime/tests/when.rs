//! `when`-buffered entries: out-of-order messages wait for their condition and are delivered in
//! arrival order among the eligible ones.

mod common;

use charmrs::prelude::*;
use common::run_job;

/// Steps through iterations; each `step` must match the current one.
struct Stepper {
    iter: u32,
    log: Vec<(u32, String)>,
    budget: u32,
}

#[chare]
impl Stepper {
    fn new() -> Self {
        Stepper {
            iter: 0,
            log: Vec::new(),
            budget: 0,
        }
    }

    #[entry(when = "self.iter == iter")]
    fn step(&mut self, iter: u32, tag: String) {
        assert_eq!(self.iter, iter);
        self.log.push((iter, tag));
    }

    #[entry]
    fn advance(&mut self) {
        self.iter += 1;
    }

    /// Advances by itself once the step arrived: a chain of conditions.
    #[entry(when = "self.iter == iter")]
    fn step_and_advance(&mut self, iter: u32) {
        self.log.push((iter, String::new()));
        self.iter += 1;
    }

    /// A non-equality condition on state and argument.
    #[entry(when = "self.budget >= cost && !label.is_empty()")]
    fn spend(&mut self, cost: u32, label: String) {
        self.budget -= cost;
        self.log.push((cost, label));
    }

    #[entry]
    fn fund(&mut self, amount: u32) {
        self.budget += amount;
    }

    #[entry]
    fn log(&mut self) -> Vec<(u32, String)> {
        self.log.clone()
    }

    #[entry]
    fn iteration(&mut self) -> u32 {
        self.iter
    }
}

#[test]
fn out_of_order_messages_are_delivered_in_the_right_order() {
    run_job(2, |_| async {
        let s = Single::<Stepper>::new((), Some(1));
        for i in [5u32, 3, 0, 4, 1, 2] {
            s.step_and_advance(i);
        }
        assert_eq!(s.ret().iteration().await, 6);
        let order: Vec<u32> = s.ret().log().await.into_iter().map(|(i, _)| i).collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4, 5]);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn eligible_messages_keep_arrival_order_and_wait_for_other_entries() {
    run_job(2, |_| async {
        let s = Single::<Stepper>::new((), Some(1));
        s.step(1, "first for 1".into());
        s.step(0, "only for 0".into());
        s.step(1, "second for 1".into());
        s.step(2, "for 2".into());
        // Only the step for iteration 0 can run so far.
        assert_eq!(s.ret().log().await.len(), 1);
        s.advance();
        s.advance();
        let log = s.ret().log().await;
        let tags: Vec<&str> = log.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(
            tags,
            vec!["only for 0", "first for 1", "second for 1", "for 2"]
        );
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn general_conditions_on_state_and_arguments() {
    run_job(1, |_| async {
        let s = Single::<Stepper>::new((), Some(0));
        s.spend(5, "five".into());
        s.spend(1, String::new()); // never eligible: empty label
        s.spend(2, "two".into());
        s.fund(2); // only "two" fits
        assert_eq!(s.ret().log().await, vec![(2, "two".to_string())]);
        s.fund(6); // now "five"
        let log = s.ret().log().await;
        assert_eq!(log.len(), 2);
        assert_eq!(log[1], (5, "five".to_string()));
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn ten_thousand_reversed_messages_are_matched_by_lookup() {
    const N: u32 = 10_000;
    run_job(2, |_| async {
        let s = Single::<Stepper>::new((), Some(1));
        for i in (0..N).rev() {
            s.step_and_advance(i);
        }
        assert_eq!(s.ret().iteration().await, N);
        let log = s.ret().log().await;
        assert!(log.iter().enumerate().all(|(k, (i, _))| k as u32 == *i));
        charmrs::exit(0);
    })
    .unwrap();
}

/// A chare whose constructor may take a while (its first messages then wait for it together).
struct Phased {
    phase: u32,
    log: Vec<String>,
    v: Vec<u32>,
}

#[chare]
impl Phased {
    async fn new(_ctx: Ctx<Self>, nap_ms: u64) -> Self {
        if nap_ms > 0 {
            charmrs::sleep(std::time::Duration::from_millis(nap_ms)).await;
        }
        Phased {
            phase: 0,
            log: Vec::new(),
            v: vec![0],
        }
    }

    #[entry]
    fn set_phase(&mut self, p: u32) {
        self.phase = p;
    }

    #[entry(when = "self.phase >= p")]
    fn work(&mut self, p: u32, tag: String) {
        let _ = p;
        self.log.push(tag);
    }

    #[entry]
    fn log(&mut self) -> Vec<String> {
        self.log.clone()
    }

    #[entry]
    fn bump_then_panic(&mut self) {
        self.phase += 1;
        panic!("after the bump");
    }

    #[entry(when = "self.v[i] > 0")]
    fn pick(&mut self, i: usize) -> u32 {
        self.v[i]
    }

    #[entry]
    fn clear(&mut self) {
        self.v.clear();
    }
}

/// `work(a)` waits; `set_phase` makes it eligible; `work(b)` and `log` come after it. However
/// the messages reach the element (one by one, or together after a slow constructor), `a` runs
/// before `b`, and both before `log`.
#[test]
fn a_call_made_eligible_runs_before_later_messages_delivered_in_the_same_turn() {
    for nap_ms in [0u64, 50] {
        let (tx, rx) = std::sync::mpsc::channel();
        run_job(2, move |_| async move {
            let s = Single::<Phased>::new((nap_ms,), Some(1));
            s.work(1, "a".into());
            s.set_phase(1);
            s.work(1, "b".into());
            tx.send(s.ret().log().await).unwrap();
            charmrs::exit(0);
        })
        .unwrap();
        assert_eq!(
            rx.recv().unwrap(),
            ["a", "b"],
            "constructor napping {nap_ms} ms"
        );
    }
}

/// An entry that changes the state and then panics (its caller gets the error, the job goes on)
/// still releases the calls its change made eligible.
#[test]
fn a_panicking_entrys_state_change_releases_waiting_calls() {
    run_job(2, |_| async {
        let s = Single::<Phased>::new((0,), Some(1));
        let waiting = s.ret().work(1, "w".into());
        let e = s.ret().bump_then_panic().result().await;
        assert!(e.is_err(), "{e:?}");
        waiting.await;
        assert_eq!(s.ret().log().await, ["w"]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// A `when` condition that panics on a re-check fails its own call, as one that panics on
/// arrival does: the caller's future gets the error naming the entry, and the job goes on.
#[test]
fn a_condition_panicking_on_a_recheck_fails_its_call_naming_the_entry() {
    run_job(2, |_| async {
        let s = Single::<Phased>::new((0,), Some(1));
        let at_arrival = s.ret().pick(5).result().await;
        let text = format!("{:?}", at_arrival.unwrap_err());
        assert!(text.contains("pick"), "{text}");
        let later = s.ret().pick(0);
        s.clear(); // the re-check after it indexes an empty vector
        let text = format!("{:?}", later.result().await.unwrap_err());
        assert!(
            text.contains("pick") && text.contains("index out of bounds"),
            "{text}"
        );
        assert_eq!(s.ret().log().await, Vec::<String>::new());
        charmrs::exit(0);
    })
    .unwrap();
}

/// An equality condition on a type without `Hash`, in parentheses: tested message by message.
struct Level {
    level: f64,
    seen: Vec<f64>,
}

#[chare]
impl Level {
    fn new() -> Self {
        Level {
            level: 0.0,
            seen: Vec::new(),
        }
    }

    #[entry(when = "(self.level == level)")]
    fn at_level(&mut self, level: f64) -> Vec<f64> {
        self.seen.push(level);
        self.level += 0.5;
        self.seen.clone()
    }
}

#[test]
fn a_parenthesized_equality_on_floats_is_tested_message_by_message() {
    run_job(1, |_| async {
        let l = Single::<Level>::new((), None);
        let late = l.ret().at_level(1.0);
        let early = l.ret().at_level(0.5);
        l.at_level(0.0);
        assert_eq!(early.await, [0.0, 0.5]);
        assert_eq!(late.await, [0.0, 0.5, 1.0]);
        charmrs::exit(0);
    })
    .unwrap();
}
