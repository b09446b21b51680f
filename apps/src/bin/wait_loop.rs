//! The paper's `wait` example (§II.H.2): each element of a 1-d ring iterates, sending data to its
//! two neighbours and suspending until it received theirs (`wait` on its own state), while its
//! PE keeps delivering other messages.
//!
//! `cargo run --release --bin wait_loop -- +p4 [elements]` (default 16) prints
//! `Done after 10 iterations`.

use charmrs::prelude::*;
use std::collections::BTreeMap;

const ITERATIONS: u32 = 10;

/// One element of the ring.
struct Cell {
    /// Messages received per iteration (a neighbour may already be one iteration ahead).
    msg_count: BTreeMap<u32, usize>,
    value: f64,
}

#[chare]
impl Cell {
    fn new(ctx: &Ctx<Self>) -> Self {
        Cell {
            msg_count: BTreeMap::new(),
            value: ctx.index::<usize>() as f64,
        }
    }

    /// The threaded loop of the paper.
    #[entry]
    async fn work(this: Coro<Self>, done: Future<()>) {
        let ctx = this.ctx();
        let me: usize = ctx.index();
        let n = ctx.this_array::<usize>().dims();
        let neighbours = [(me + n - 1) % n, (me + 1) % n];
        for iter in 0..ITERATIONS {
            let value = this.with(|s, _| s.value);
            for nb in neighbours {
                ctx.this_proxy().at(nb).recv_data(iter, value);
            }
            this.wait(|s| s.msg_count.get(&iter) == Some(&neighbours.len()))
                .await;
            this.with(|s, _| {
                s.msg_count.remove(&iter);
                s.value *= 0.5; // the "computation"
            });
        }
        ctx.barrier(done);
    }

    /// Data from a neighbour.
    #[entry]
    fn recv_data(&mut self, iter: u32, data: f64) {
        *self.msg_count.entry(iter).or_default() += 1;
        self.value += data * 1e-3;
    }
}

fn usage() -> ! {
    charmrs_apps::cli::usage_exit("wait_loop [+pN] [ELEMENTS (16, at least 3)]")
}

fn main() {
    charmrs::start(|args| async move {
        let n = match args.get(1..).unwrap_or_default() {
            [] => 16,
            [n] => match n.parse::<usize>() {
                Ok(n) if n >= 3 => n,
                _ => {
                    eprintln!("wait_loop: `{n}` is not a number of elements (an integer >= 3)");
                    usage()
                }
            },
            [_, extra, ..] => {
                eprintln!("wait_loop: unexpected argument `{extra}` (it takes one: the number of elements)");
                usage()
            }
        };
        let ring = Array::<Cell, usize>::new(n, ());
        let done = Future::new();
        ring.work(done);
        done.await;
        println!("Done after {ITERATIONS} iterations");
        charmrs::exit(0);
    })
}
