//! The paper's reduction example (§II.F): 100 workers each contribute `[0, 1, …, 19]` with a sum
//! reducer to element 0, which prints the result and ends the program.
//!
//! `cargo run --release --bin reduction -- +p4` prints
//! `Reduction result is [0, 100, 200, …, 1900]`.

use charmrs::prelude::*;

/// One of the 100 workers.
struct Worker;

#[chare]
impl Worker {
    fn new() -> Self {
        Worker
    }

    /// Contributes `[0, 20)` to a sum whose result goes to element 0's `get_result`.
    #[entry]
    fn work(&mut self, ctx: &Ctx<Self>) {
        let data: Vec<i64> = (0..20).collect();
        ctx.contribute(
            data,
            Reducer::Sum,
            ctx.this_proxy().at(0usize).get_result_callback(),
        );
    }

    /// Receives the reduction result.
    #[entry]
    fn get_result(&mut self, result: Vec<i64>) {
        println!("Reduction result is {result:?}");
        charmrs::exit(0);
    }
}

fn main() {
    charmrs::start(|args| async move {
        charmrs_apps::cli::no_arguments("reduction", &args);
        let array = Array::<Worker, usize>::new(100, ());
        array.work();
    })
}
