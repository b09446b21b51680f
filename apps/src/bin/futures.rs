//! The paper's futures examples (§II.H.3): a future as a reduction target, and two explicit
//! futures filled by a remote chare.
//!
//! `cargo run --release --bin futures -- +p4` prints `Reduction result is 4950`,
//! `Value of future 1 is 1` and `Value of future 2 is 2`.

use charmrs::prelude::*;

/// One of 100 workers; also fills futures on request.
struct Worker;

#[chare]
impl Worker {
    fn new() -> Self {
        Worker
    }

    /// Contributes the element's index to a sum whose result fulfils `done`.
    #[entry]
    fn do_work(&mut self, ctx: &Ctx<Self>, done: Future<u64>) {
        let x = ctx.index::<usize>() as u64;
        ctx.contribute(x, Reducer::Sum, done);
    }

    /// Sends a value to each future (from wherever this element lives).
    #[entry]
    fn fill(&mut self, f1: Future<u32>, f2: Future<u32>) {
        f1.send(1);
        f2.send(2);
    }
}

fn main() {
    charmrs::start(|args| async move {
        charmrs_apps::cli::no_arguments("futures", &args);
        let workers = Array::<Worker, usize>::new(100, ());
        let result = Future::<u64>::new();
        workers.do_work(result);
        println!("Reduction result is {}", result.await);

        let (f1, f2) = (Future::new(), Future::new());
        let last = charmrs::num_pes() - 1;
        Single::<Worker>::new((), Some(last)).fill(f1, f2);
        println!("Value of future 1 is {}", f1.await);
        println!("Value of future 2 is {}", f2.await);
        charmrs::exit(0);
    })
}
