//! A fault-injection program for the multi-process tests (not one of the paper's programs):
//! `faults panic` panics in an entry method on the last PE; `faults hang` keeps every PE busy
//! forever (so that a test can kill one process and watch the others abort).

use charmrs::prelude::*;
use std::time::Duration;

/// One element per PE.
struct Victim;

#[chare]
impl Victim {
    fn new() -> Self {
        Victim
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
}

fn main() {
    charmrs::start(|args| async move {
        let group = Group::<Victim>::new(());
        match args.get(1).map(String::as_str) {
            Some("panic") => group.fail(),
            Some("hang") => {
                println!("hanging on {} PEs", charmrs::num_pes());
                group.hang();
            }
            _ => charmrs::abort("usage: faults panic|hang"),
        }
    })
}
