//! The paper's first program (§II.B): one chare, created on a PE the runtime picks, says hello.
//!
//! `cargo run --release --bin hello -- +p2` prints `Hello` and exits 0.

use charmrs::prelude::*;

/// A chare that prints what it is told.
struct MyChare;

#[chare]
impl MyChare {
    fn new() -> Self {
        MyChare
    }

    /// Prints `msg` and ends the program.
    #[entry]
    fn say_hi(&mut self, msg: String) {
        println!("{msg}");
        charmrs::exit(0);
    }
}

fn main() {
    charmrs::start(|args| async move {
        charmrs_apps::cli::no_arguments("hello", &args);
        let proxy = Single::<MyChare>::new((), None);
        proxy.say_hi("Hello".to_string());
    })
}
