//! A ring over a group (one element per PE): element i says hi and passes the greeting on to
//! element i+1; the last one ends the program.
//!
//! `cargo run --release --bin group_hello -- +p4` prints `Hi[17] from element 0` …
//! `Hi[20] from element 3`, then `All done`.

use charmrs::prelude::*;

/// One element per PE.
struct Hello;

#[chare]
impl Hello {
    fn new() -> Self {
        Hello
    }

    /// Greets, then passes `hello_num + 1` to the next element (or ends the ring).
    #[entry]
    fn say_hi(&mut self, ctx: &Ctx<Self>, hello_num: u64) {
        let me: usize = ctx.index();
        println!("Hi[{hello_num}] from element {me}");
        if me + 1 == ctx.num_pes() {
            println!("All done");
            charmrs::exit(0);
        } else {
            ctx.this_group().at(me + 1).say_hi(hello_num + 1);
        }
    }
}

fn main() {
    charmrs::start(|args| async move {
        charmrs_apps::cli::no_arguments("group_hello", &args);
        let group = Group::<Hello>::new(());
        group.at(0).say_hi(17);
    })
}
