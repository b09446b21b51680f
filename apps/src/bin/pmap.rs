//! The paper's distributed parallel map with concurrent jobs (§III), on charmrs' task pool:
//! two map jobs run at the same time, each on at most 2 PEs, in chunks of 2 items.
//!
//! `cargo run --release --bin pmap -- +p4` prints
//! `Final results are [1, 4, 9, 16, 25] [1, 9, 25, 49, 81]`.

use charmrs::{pool, MapOptions};

/// The function applied to every item.
#[charmrs::task]
fn f(x: u64) -> u64 {
    x * x
}

fn main() {
    charmrs::start(|args| async move {
        charmrs_apps::cli::no_arguments("pmap", &args);
        let options = MapOptions {
            chunk: 2,
            max_pes: Some(2),
        };
        let f1 = pool().map_async(f, vec![1, 2, 3, 4, 5], options);
        let f2 = pool().map_async(f, vec![1, 3, 5, 7, 9], options);
        println!("Final results are {:?} {:?}", f1.await, f2.await);
        charmrs::exit(0);
    })
}
