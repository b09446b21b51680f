//! Quiescence detection fires only once every message of an irregular cascade has been processed,
//! and not while a sparse array's broadcast waits for `done_inserting`'s seal.

mod common;

use charmrs::prelude::*;
use common::run_job;
use std::sync::atomic::{AtomicU64, Ordering};

static PROCESSED: AtomicU64 = AtomicU64::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);

/// Spreads a cascade of messages with a deterministic pseudo-random fan-out.
struct Spreader;

#[chare]
impl Spreader {
    fn new() -> Self {
        Spreader
    }

    #[entry]
    fn hop(&mut self, ctx: &Ctx<Self>, seed: u64, depth: u32) {
        PROCESSED.fetch_add(1, Ordering::SeqCst);
        if depth == 0 {
            return;
        }
        // xorshift: deterministic fan-out of 0..=3 messages per hop.
        let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = ctx.this_array::<usize>().dims();
        for k in 0..(x % 4) {
            SENT.fetch_add(1, Ordering::SeqCst);
            let to = ((x >> (8 + k)) as usize) % n;
            ctx.this_proxy().at(to).hop(x.wrapping_add(k), depth - 1);
        }
    }

    #[entry]
    fn quiet(&mut self) {
        assert_eq!(
            PROCESSED.load(Ordering::SeqCst),
            SENT.load(Ordering::SeqCst)
        );
        charmrs::exit(3);
    }
}

#[test]
fn quiescence_after_an_irregular_cascade() {
    let code = run_job(4, |_| async {
        let a = Array::<Spreader, usize>::new(16, ());
        for i in 0..16u64 {
            SENT.fetch_add(1, Ordering::SeqCst);
            a.at(i as usize).hop(i * 7919, 12);
        }
        charmrs::wait_qd().await;
        let (p, s) = (
            PROCESSED.load(Ordering::SeqCst),
            SENT.load(Ordering::SeqCst),
        );
        assert_eq!(p, s, "quiescence declared with messages in flight");
        assert!(p > 100, "the cascade was too small to test anything ({p})");
        // Again, with an entry callback as the target; nothing is happening now.
        charmrs::start_qd(a.at(3).quiet_callback());
    })
    .unwrap();
    assert_eq!(code, 3);
}

static HELLOS: AtomicU64 = AtomicU64::new(0);
static HELLOS_AT_QUIESCENCE: AtomicU64 = AtomicU64::new(u64::MAX);

/// An element of a sparse array that counts the broadcasts it gets.
struct Inserted;

#[chare]
impl Inserted {
    fn new() -> Self {
        Inserted
    }

    #[entry]
    fn hello(&mut self) {
        HELLOS.fetch_add(1, Ordering::SeqCst);
    }
}

/// Records how many broadcasts had run when quiescence was reported.
struct Witness;

#[chare]
impl Witness {
    fn new() -> Self {
        Witness
    }

    #[entry]
    fn quiet(&mut self) {
        HELLOS_AT_QUIESCENCE.store(HELLOS.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// A broadcast to a sparse array waits for the seal on every PE, counted as processed there;
/// `done_inserting` may take several census rounds (elements inserted away from their home are
/// reported to it late), with timer pauses between them. Quiescence asked for meanwhile comes
/// only after the seal released the broadcast and every element ran it.
#[test]
fn quiescence_waits_for_a_sparse_arrays_seal() {
    for round in 0..3 {
        HELLOS.store(0, Ordering::SeqCst);
        HELLOS_AT_QUIESCENCE.store(u64::MAX, Ordering::SeqCst);
        run_job(2, |_| async {
            let witness = Single::<Witness>::new((), Some(0));
            let array = Array::<Inserted, usize>::new_sparse(None);
            for i in 0..8usize {
                array.insert(i, (), Some(1)); // away from home for the even ones
            }
            array.hello();
            charmrs::start_qd(witness.quiet_callback());
            array.done_inserting().await;
            charmrs::wait_qd().await;
            charmrs::exit(0);
        })
        .unwrap();
        assert_eq!(HELLOS.load(Ordering::SeqCst), 8, "round {round}");
        assert_eq!(
            HELLOS_AT_QUIESCENCE.load(Ordering::SeqCst),
            8,
            "round {round}: quiescence reported before the sealed broadcast ran"
        );
    }
}
