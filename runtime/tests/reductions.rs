//! Reductions: built-in reducers on every kind of value, gather, barrier, custom reducers, entry
//! and future targets, many in flight at once, allreduce, and the errors.

mod common;

use charmrs::prelude::*;
use charmrs::Error;
use common::run_job;
use std::sync::Mutex;

charmrs::reducer!(EXPLODES: u32 = |_a, _b| panic!("the reducer exploded"));
charmrs::reducer!(LONGEST: String = |a, b| if b.len() > a.len() || (b.len() == a.len() && b > a) { b } else { a });

static ORDER: Mutex<Vec<(u32, i64)>> = Mutex::new(Vec::new());

/// An array element that contributes in many ways.
struct Elem {
    got: u32,
}

#[chare]
impl Elem {
    fn new() -> Self {
        Elem { got: 0 }
    }

    /// The paper's program: contribute [0..20) with sum to element 0's `collect`.
    #[entry]
    fn work(&mut self, ctx: &Ctx<Self>) {
        let data: Vec<i64> = (0..20).collect();
        ctx.contribute(
            data,
            Reducer::Sum,
            ctx.this_proxy().at(0usize).collect_callback(),
        );
    }

    #[entry]
    fn collect(&mut self, result: Vec<i64>) {
        let want: Vec<i64> = (0..20).map(|x| x * 100).collect();
        assert_eq!(result, want);
        charmrs::exit(0);
    }

    #[entry]
    fn all_kinds(&mut self, ctx: &Ctx<Self>, fs: Kinds) {
        let i = ctx.raw_index().get(0);
        ctx.contribute(i as i32, Reducer::Sum, fs.sum);
        ctx.contribute(i as u64 + 1, Reducer::Product, fs.product);
        ctx.contribute(i as f64 * 0.5, Reducer::Max, fs.max);
        ctx.contribute(-(i as i16), Reducer::Min, fs.min);
        ctx.contribute(i != 3, Reducer::LogicalAnd, fs.and);
        ctx.contribute(i == 3, Reducer::LogicalOr, fs.or);
        ctx.contribute(i < 3, Reducer::LogicalXor, fs.xor);
        ctx.contribute(1u8 << (i % 8), Reducer::BitOr, fs.bor);
        ctx.contribute(0xffu32 ^ (1 << i), Reducer::BitAnd, fs.band);
        ctx.contribute(i as u16, Reducer::BitXor, fs.bxor);
        ctx.contribute(vec![i as f32, 1.0, -(i as f32)], Reducer::Sum, fs.vsum);
        ctx.gather(format!("e{i}"), fs.gather);
        ctx.barrier(fs.barrier);
        ctx.contribute_with("x".repeat(i % 4) + &i.to_string(), &LONGEST, fs.custom);
    }

    /// Many reductions in flight: 50 contributions right away, results to element 0.
    #[entry]
    fn burst(&mut self, ctx: &Ctx<Self>) {
        for k in 0..50i64 {
            ctx.contribute(
                k,
                Reducer::Sum,
                ctx.this_proxy().at(0usize).record_callback(),
            );
        }
    }

    #[entry]
    fn record(&mut self, total: i64) {
        self.got += 1;
        ORDER.lock().unwrap().push((self.got, total));
    }

    /// Result broadcast to every element.
    #[entry]
    fn for_all(&mut self, ctx: &Ctx<Self>, done: Future<()>) {
        ctx.contribute(1u32, Reducer::Sum, ctx.this_proxy().hear_callback());
        ctx.barrier(done);
    }

    #[entry]
    fn hear(&mut self, total: u32) {
        self.got = total;
    }

    #[entry]
    fn heard(&mut self) -> u32 {
        self.got
    }

    #[entry]
    async fn allreduce_loop(this: Coro<Self>, rounds: u64, done: Future<u64>) {
        let n = this.ctx().this_proxy().shape();
        let size = match n {
            charmrs::Shape::Array { dims, .. } => dims.volume(),
            _ => charmrs::num_pes() as u64,
        };
        let me = this.ctx().raw_index().get(0) as u64;
        let mut last = 0;
        for r in 0..rounds {
            let total = this.ctx().allreduce(r + me, Reducer::Sum).await;
            assert_eq!(total, r * size + size * (size - 1) / 2, "round {r}");
            last = total;
        }
        this.ctx().contribute(last, Reducer::Max, done);
    }

    /// Contributes to a reduction whose reducer panics.
    #[entry]
    fn explode(&mut self, ctx: &Ctx<Self>, f: Future<u32>) {
        ctx.contribute_with(1u32, &EXPLODES, f);
    }

    #[entry]
    fn wrong_type(&mut self, ctx: &Ctx<Self>, f: Future<i32>) {
        if ctx.raw_index().get(0) == 2 {
            let f64_future: Future<f64> = Future::new();
            let _ = f;
            ctx.contribute(1.5f64, Reducer::Sum, f64_future);
        } else {
            ctx.contribute(1i32, Reducer::Sum, f);
        }
    }

    #[entry]
    fn wrong_reducer(&mut self, ctx: &Ctx<Self>, f: Future<i32>) {
        let op = if ctx.raw_index().get(0) == 1 {
            Reducer::Max
        } else {
            Reducer::Sum
        };
        ctx.contribute(1i32, op, f);
    }

    /// Element `odd_one` contributes to its own future; the others to `f`.
    #[entry]
    fn wrong_target(&mut self, ctx: &Ctx<Self>, f: Future<i32>, odd_one: usize) {
        let target = if ctx.raw_index().get(0) == odd_one {
            Future::new()
        } else {
            f
        };
        ctx.contribute(1i32, Reducer::Sum, target);
    }

    /// Element 0 allreduces; the others contribute to `f`.
    #[entry]
    async fn allreduce_or_not(this: Coro<Self>, f: Future<i32>) {
        if this.ctx().raw_index().get(0) == 0 {
            this.ctx().allreduce(1i32, Reducer::Sum).await;
        } else {
            this.ctx().contribute(1i32, Reducer::Sum, f);
        }
    }

    #[entry]
    fn wrong_length(&mut self, ctx: &Ctx<Self>, f: Future<Vec<i32>>) {
        let n = 3 + usize::from(ctx.raw_index().get(0) == 1);
        ctx.contribute(vec![1i32; n], Reducer::Sum, f);
    }
}

/// One future per kind of reduction.
#[derive(Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Kinds {
    sum: Future<i32>,
    product: Future<u64>,
    max: Future<f64>,
    min: Future<i16>,
    and: Future<bool>,
    or: Future<bool>,
    xor: Future<bool>,
    bor: Future<u8>,
    band: Future<u32>,
    bxor: Future<u16>,
    vsum: Future<Vec<f32>>,
    gather: Future<Vec<String>>,
    barrier: Future<()>,
    custom: Future<String>,
}

#[test]
fn papers_reduction_to_element_zero() {
    assert_eq!(
        run_job(4, |_| async {
            Array::<Elem, usize>::new(100, ()).work();
        })
        .unwrap(),
        0
    );
}

#[test]
fn every_built_in_reducer_gather_barrier_and_custom() {
    run_job(3, |_| async {
        let a = Array::<Elem, usize>::new(6, ());
        let fs = Kinds {
            sum: Future::new(),
            product: Future::new(),
            max: Future::new(),
            min: Future::new(),
            and: Future::new(),
            or: Future::new(),
            xor: Future::new(),
            bor: Future::new(),
            band: Future::new(),
            bxor: Future::new(),
            vsum: Future::new(),
            gather: Future::new(),
            barrier: Future::new(),
            custom: Future::new(),
        };
        a.all_kinds(fs);
        assert_eq!(fs.sum.await, 15);
        assert_eq!(fs.product.await, 720);
        assert_eq!(fs.max.await, 2.5);
        assert_eq!(fs.min.await, -5);
        assert!(!fs.and.await);
        assert!(fs.or.await);
        assert!(fs.xor.await); // three `true`s
        assert_eq!(fs.bor.await, 0b11_1111);
        assert_eq!(fs.band.await, 0xff ^ 0b11_1111);
        assert_eq!(
            fs.bxor.await,
            [1u16, 2, 3, 4, 5].iter().fold(0, |a, b| a ^ b)
        );
        assert_eq!(fs.vsum.await, vec![15.0, 6.0, -15.0]);
        assert_eq!(fs.gather.await, vec!["e0", "e1", "e2", "e3", "e4", "e5"]);
        fs.barrier.await;
        assert_eq!(fs.custom.await, "xxx3");
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn many_reductions_in_flight_complete_in_order() {
    run_job(4, |_| async {
        let a = Array::<Elem, usize>::new(13, ());
        a.burst();
        // Wait until all 50 arrived at element 0.
        while a.at(0).ret().heard().await < 50 {
            let n = ORDER.lock().unwrap().len();
            if n == 50 {
                break;
            }
            charmrs::sleep(std::time::Duration::from_millis(1)).await;
        }
        charmrs::exit(0);
    })
    .unwrap();
    let order = ORDER.lock().unwrap().clone();
    let want: Vec<(u32, i64)> = (0..50).map(|k| (k as u32 + 1, k * 13)).collect();
    assert_eq!(order, want);
}

#[test]
fn result_broadcast_to_every_element_including_sparse_member_pes() {
    run_job(4, |_| async {
        // 3 elements on 4 PEs: PEs 0, 1, 2 hold one each, PE 3 none.
        let a = Array::<Elem, usize>::new(3, ());
        let done = Future::new();
        a.for_all(done);
        done.await;
        assert_eq!(a.gather().heard().await, vec![3, 3, 3]);
        let g = Group::<Elem>::new(());
        let done = Future::new();
        g.for_all(done);
        done.await;
        assert_eq!(g.gather().heard().await, vec![4; 4]);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn thousand_back_to_back_allreduces_on_two_collections_at_once() {
    run_job(4, |_| async {
        let a = Array::<Elem, usize>::new(10, ());
        let g = Group::<Elem>::new(());
        let (fa, fg) = (Future::new(), Future::new());
        a.allreduce_loop(1000, fa);
        g.allreduce_loop(1000, fg);
        assert_eq!(fa.await, 999 * 10 + 45);
        assert_eq!(fg.await, 999 * 4 + 6);
        charmrs::exit(0);
    })
    .unwrap();
}

fn aborted(r: charmrs::Result<i32>) -> String {
    match r {
        Err(Error::Aborted(msg)) => msg,
        other => panic!("expected an abort, got {other:?}"),
    }
}

#[test]
fn a_contribution_of_the_wrong_type_reducer_or_length_names_the_reduction() {
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Elem, usize>::new(4, ());
        a.wrong_type(Future::new());
        charmrs::sleep(std::time::Duration::from_secs(30)).await;
    }));
    assert!(msg.contains("reduction #0 over 1-d array"), "{msg}");
    assert!(msg.contains("f64") && msg.contains("i32"), "{msg}");
    // Elements 0 and 1 share PE 0: element 1's `Max` meets element 0's `Sum` there.
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Elem, usize>::new(4, ());
        a.wrong_reducer(Future::new());
        charmrs::sleep(std::time::Duration::from_secs(30)).await;
    }));
    assert!(
        msg.contains("reduction #0")
            && msg.contains("Reducer::Max")
            && msg.contains("Reducer::Sum"),
        "{msg}"
    );
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Elem, usize>::new(4, ());
        a.wrong_length(Future::new());
        charmrs::sleep(std::time::Duration::from_secs(30)).await;
    }));
    assert!(
        msg.contains("reduction #0") && msg.contains("vector lengths differ"),
        "{msg}"
    );
}

/// Contributions to one reduction that name different targets abort the job naming both where
/// they meet (here in one process; `mpcheck badtarget` in the multi-process suite has them meet
/// encoded, from another process). Before, the first target got the result and the others
/// waited for ever.
#[test]
fn contributions_naming_different_targets_abort_naming_both() {
    // Element 1 (PE 0, with element 0) names its own future.
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Elem, usize>::new(4, ());
        let f = Future::new();
        a.wrong_target(f, 1);
        f.await;
    }));
    assert!(msg.contains("reduction #0 over 1-d array"), "{msg}");
    assert!(
        msg.contains("must name the same target") && msg.contains("future"),
        "{msg}"
    );
    // An allreduce meets a contribution to a future.
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Elem, usize>::new(4, ());
        let f = Future::new();
        a.allreduce_or_not(f);
        f.await;
    }));
    assert!(
        msg.contains("must name the same target") && msg.contains("every contributor"),
        "{msg}"
    );
}

#[test]
fn a_panicking_reducer_aborts_the_job_naming_the_reduction() {
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Elem, usize>::new(4, ());
        a.explode(Future::new());
        charmrs::sleep(std::time::Duration::from_secs(30)).await;
    }));
    assert!(msg.contains("reduction #0 over 1-d array"), "{msg}");
    assert!(msg.contains("the reducer exploded"), "{msg}");
}
