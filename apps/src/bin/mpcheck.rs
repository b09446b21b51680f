//! Checks used by the multi-process tests (not one of the paper's programs). Modes:
//! - `panic`: an entry method panics on the last PE (the job must abort, naming it);
//! - `hang`: every PE stays busy forever (a test kills one process and watches the rest);
//! - `features`: exercises results, gathers, reductions, allreduce, `when`, quiescence detection
//!   and nested pool tasks across processes, printing one `ok …` line per feature.

use charmrs::prelude::*;
use charmrs::{pool, Reducer};
use std::time::Duration;

/// One element per PE (or of an array).
struct Victim {
    iter: u32,
    hops: u64,
}

#[chare]
impl Victim {
    fn new() -> Self {
        Victim { iter: 0, hops: 0 }
    }

    /// Panics on the last PE.
    #[entry]
    fn fail(&mut self, ctx: &Ctx<Self>) {
        if ctx.my_pe() + 1 == ctx.num_pes() {
            panic!("injected failure");
        }
    }

    /// Never returns (but lets its PE run other messages).
    #[entry]
    async fn hang(_this: Coro<Self>) {
        loop {
            charmrs::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where this element lives.
    #[entry]
    fn where_am_i(&mut self, ctx: &Ctx<Self>) -> (usize, usize) {
        (ctx.my_pe(), charmrs::my_node())
    }

    /// Several allreduces in a row.
    #[entry]
    async fn allreduce_rounds(this: Coro<Self>, rounds: u64) -> u64 {
        let mut last = 0;
        for r in 0..rounds {
            last = this.ctx().allreduce(r + 1, Reducer::Sum).await;
        }
        last
    }

    /// A sum to a future.
    #[entry]
    fn sum_to(&mut self, ctx: &Ctx<Self>, done: Future<Vec<f64>>) {
        ctx.contribute(vec![ctx.my_pe() as f64, 1.0], Reducer::Sum, done);
    }

    /// Steps that must arrive in order.
    #[entry(when = "self.iter == iter")]
    fn step(&mut self, iter: u32) {
        assert_eq!(self.iter, iter, "delivered out of order");
        self.iter += 1;
    }

    #[entry]
    fn iteration(&mut self) -> u32 {
        self.iter
    }

    /// A message cascade hopping across PEs.
    #[entry]
    fn hop(&mut self, ctx: &Ctx<Self>, left: u32) {
        self.hops += 1;
        if left > 0 {
            let next = (ctx.index::<usize>() * 7 + 3) % ctx.num_pes();
            ctx.this_group().at(next).hop(left - 1);
        }
    }

    #[entry]
    fn hops(&mut self) -> u64 {
        self.hops
    }
}

/// Parallel Fibonacci with nested tasks.
#[charmrs::task]
async fn fib(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    let (a, b) = (pool().task(fib, n - 1), pool().task(fib, n - 2));
    a.await + b.await
}

async fn features() {
    let p = charmrs::num_pes();
    let group = Group::<Victim>::new(());
    let places = group.gather().where_am_i().await;
    assert_eq!(places.len(), p);
    assert!(places.iter().enumerate().all(|(i, (pe, _))| *pe == i));
    println!("ok placement over {} processes", charmrs::num_nodes());
    let sum = Future::new();
    group.sum_to(sum);
    let s = sum.await;
    assert_eq!(s, vec![(p * (p - 1) / 2) as f64, p as f64]);
    println!("ok reduction");
    let totals = group.gather().allreduce_rounds(20).await;
    assert!(totals.iter().all(|&t| t == 20 * p as u64));
    println!("ok allreduce");
    let last = group.at(p - 1);
    for i in (0..50).rev() {
        last.step(i);
    }
    assert_eq!(last.ret().iteration().await, 50);
    println!("ok when");
    for i in 0..p {
        group.at(i).hop(40);
    }
    charmrs::wait_qd().await;
    let hops: u64 = group.gather().hops().await.into_iter().sum();
    assert_eq!(hops, 41 * p as u64);
    println!("ok quiescence");
    assert_eq!(pool().task(fib, 12).await, 144);
    println!("ok pool");
    charmrs::exit(0);
}

fn main() {
    charmrs::start(|args| async move {
        match args.get(1).map(String::as_str) {
            Some("panic") => Group::<Victim>::new(()).fail(),
            Some("hang") => {
                println!("hanging on {} PEs", charmrs::num_pes());
                Group::<Victim>::new(()).hang();
            }
            Some("features") => features().await,
            _ => charmrs::abort("usage: mpcheck panic|hang|features"),
        }
    })
}
