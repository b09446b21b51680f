//! Callbacks are values: passed as entry arguments (in the wire format too), used as reduction
//! targets and called where they arrive; one received as another argument type is an error
//! naming the entry (checked across processes by `mpcheck`).

mod common;

use charmrs::prelude::*;
use common::run_job_with;

/// Records what it hears.
struct Counter {
    got: Vec<u64>,
}

#[chare]
impl Counter {
    fn new() -> Self {
        Counter { got: Vec::new() }
    }

    #[entry]
    fn hear(&mut self, x: u64) {
        self.got.push(x);
    }

    #[entry]
    fn heard(&mut self) -> Vec<u64> {
        let mut got = self.got.clone();
        got.sort_unstable();
        got
    }
}

/// Calls back.
struct Worker;

#[chare]
impl Worker {
    fn new() -> Self {
        Worker
    }

    #[entry]
    fn report(&mut self, ctx: &Ctx<Self>, to: Callback<(u64,)>) {
        to.send((ctx.my_pe() as u64,));
    }

    #[entry]
    fn count_to(&mut self, ctx: &Ctx<Self>, to: Callback<(u64,)>) {
        ctx.contribute(100u64, Reducer::Sum, to);
    }
}

#[test]
fn callbacks_travel_as_arguments_and_serve_as_reduction_targets() {
    for wire in [false, true] {
        let rt = charmrs::Runtime::new(3).affinity(false).wire_check(wire);
        run_job_with(rt, |_| async {
            let counter = Single::<Counter>::new((), Some(0));
            let workers = Group::<Worker>::new(());
            workers.report(counter.hear_callback());
            charmrs::wait_qd().await;
            assert_eq!(counter.ret().heard().await, vec![0, 1, 2]);
            workers.count_to(counter.hear_callback());
            charmrs::wait_qd().await;
            assert_eq!(counter.ret().heard().await, vec![0, 1, 2, 300]);
            charmrs::exit(0);
        })
        .unwrap();
    }
}

#[test]
fn a_callback_received_as_another_type_names_the_entry() {
    let rt = charmrs::Runtime::new(1).affinity(false);
    run_job_with(rt, |_| async {
        let counter = Single::<Counter>::new((), Some(0));
        let bytes = postcard::to_stdvec(&counter.hear_callback()).unwrap();
        let same: Callback<(u64,)> = postcard::from_bytes(&bytes).unwrap();
        same.send((7,));
        assert!(postcard::from_bytes::<Callback<(String,)>>(&bytes).is_err());
        charmrs::wait_qd().await;
        assert_eq!(counter.ret().heard().await, vec![7]);
        charmrs::exit(0);
    })
    .unwrap();
}
