//! Oversubscribed all-to-all messaging: every message is delivered exactly once, on the PE of its
//! receiver, with more PEs than cores.

mod common;

use charmrs::prelude::*;
use common::run_job;
use std::sync::atomic::{AtomicU64, Ordering};

const PES: usize = 6;
const ROUNDS: u64 = 20_000;

static RECEIVED: [AtomicU64; PES] = [const { AtomicU64::new(0) }; PES];
static CHECKSUM: [AtomicU64; PES] = [const { AtomicU64::new(0) }; PES];

/// One per PE; sends ROUNDS messages to every other element, counts what it receives.
struct Peer {
    got: u64,
    done_peers: usize,
}

#[chare]
impl Peer {
    fn new() -> Self {
        Peer {
            got: 0,
            done_peers: 0,
        }
    }

    #[entry]
    fn blast(&mut self, ctx: &Ctx<Self>) {
        let me: usize = ctx.index();
        let group = ctx.this_group();
        for r in 0..ROUNDS {
            for other in 0..ctx.num_pes() {
                if other != me {
                    group.at(other).msg(me, r);
                }
            }
        }
        group.sent_all();
    }

    #[entry]
    fn msg(&mut self, ctx: &Ctx<Self>, from: usize, seq: u64) {
        assert_eq!(charmrs::my_pe(), ctx.my_pe());
        self.got += 1;
        let me: usize = ctx.index();
        RECEIVED[me].fetch_add(1, Ordering::Relaxed);
        CHECKSUM[me].fetch_add(from as u64 * 1_000_003 + seq, Ordering::Relaxed);
    }

    /// Point-to-point FIFO from one sender means all of that sender's `msg`s arrived before this.
    #[entry]
    fn sent_all(&mut self, ctx: &Ctx<Self>) {
        self.done_peers += 1;
        if self.done_peers == ctx.num_pes() {
            assert_eq!(self.got, ROUNDS * (ctx.num_pes() as u64 - 1));
            ctx.this_group().at(0).finished();
        }
    }

    #[entry]
    fn finished(&mut self, ctx: &Ctx<Self>) {
        self.done_peers += 1;
        if self.done_peers == 2 * ctx.num_pes() {
            charmrs::exit(0);
        }
    }
}

#[test]
fn all_to_all_exactly_once_oversubscribed() {
    run_job(PES, |_| async {
        Group::<Peer>::new(()).blast();
    })
    .unwrap();
    let per_sender: u64 = (0..ROUNDS).sum();
    for me in 0..PES {
        assert_eq!(
            RECEIVED[me].load(Ordering::Relaxed),
            ROUNDS * (PES as u64 - 1)
        );
        let want: u64 = (0..PES)
            .filter(|&f| f != me)
            .map(|f| f as u64 * 1_000_003 * ROUNDS + per_sender)
            .sum();
        assert_eq!(
            CHECKSUM[me].load(Ordering::Relaxed),
            want,
            "PE {me}: lost or duplicated"
        );
    }
}
