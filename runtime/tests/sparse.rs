//! Sparse arrays, insertion from any PE, done_inserting, ArrayMap placement (dense and sparse),
//! and the errors.

mod common;

use charmrs::prelude::*;
use charmrs::Index;
use common::run_job;

type I6 = (usize, usize, usize, usize, usize, usize);

// Home PE: the sum of the coordinates, modulo the PEs.
charmrs::array_map!(
    BY_SUM = |index, pes| index.coords().iter().map(|&c| c as usize).sum::<usize>() % pes
);
// Always PE 7: out of range in a 3-PE job.
charmrs::array_map!(TOO_FAR = |_index, _pes| 7);

fn by_sum(i: &I6) -> usize {
    i.0 + i.1 + i.2 + i.3 + i.4 + i.5
}

/// (index, PE built on, PE now, early messages, pings).
type Report = (Index, usize, usize, u32, u32);

/// An element that knows where it was built.
#[derive(serde::Serialize, serde::Deserialize)]
struct Leaf {
    built_on: usize,
    early: u32,
    pings: u32,
}

#[chare(migratable)]
impl Leaf {
    fn new(ctx: &Ctx<Self>, tag: u32) -> Self {
        let _ = tag;
        Leaf {
            built_on: ctx.my_pe(),
            early: 0,
            pings: 0,
        }
    }

    #[entry]
    fn early(&mut self) {
        self.early += 1;
    }

    #[entry]
    fn ping(&mut self) {
        self.pings += 1;
    }

    /// Reports (index, PE built on, PE now, early messages, pings) to a gather.
    #[entry]
    fn report(&mut self, ctx: &Ctx<Self>, to: Future<Vec<Report>>) {
        ctx.gather(
            (
                ctx.raw_index(),
                self.built_on,
                ctx.my_pe(),
                self.early,
                self.pings,
            ),
            to,
        );
    }

    #[entry]
    fn where_am_i(&mut self, ctx: &Ctx<Self>) -> usize {
        ctx.my_pe()
    }
}

/// Inserts elements into a sparse array from another PE.
struct Inserter;

#[chare]
impl Inserter {
    fn new() -> Self {
        Inserter
    }

    #[entry]
    fn insert_some(&mut self, ctx: &Ctx<Self>, array: Proxy<Leaf>, from: usize, count: usize) {
        let array = Array::<Leaf, I6>::from_proxy(array).unwrap();
        for k in from..from + count {
            let i = (k % 3, k % 5, k % 7, k, 1, 2);
            // Every third on an explicit PE; the rest at its home.
            let on = (k % 3 == 0).then_some(k % ctx.num_pes());
            array.insert(i, (k as u32,), on);
        }
    }
}

#[test]
fn sparse_6d_array_with_a_map_inserted_from_several_pes() {
    run_job(4, |_| async {
        let leaves = Array::<Leaf, I6>::new_sparse(Some(&BY_SUM));
        // Messages to elements that do not exist yet wait at their homes.
        for k in 0..60usize {
            leaves.at((k % 3, k % 5, k % 7, k, 1, 2)).early();
        }
        let inserters = Group::<Inserter>::new(());
        for pe in 0..4 {
            inserters.at(pe).insert_some(*leaves, pe * 15, 15);
        }
        charmrs::wait_qd().await; // the inserters ran
        leaves.done_inserting().await;
        leaves.ping();
        leaves.ping();
        charmrs::wait_qd().await;
        let got = Future::new();
        leaves.report(got);
        let got = got.await;
        assert_eq!(got.len(), 60, "every element reported once");
        for (index, built_on, now, early, pings) in got {
            let k = index.get(3);
            let i: I6 = (k % 3, k % 5, k % 7, k, 1, 2);
            let want = if k % 3 == 0 { k % 4 } else { by_sum(&i) % 4 };
            assert_eq!(
                built_on, want,
                "element {index} built on the PE the map (or insert) chose"
            );
            assert_eq!(now, want);
            assert_eq!((early, pings), (1, 2), "element {index}");
        }
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn dense_array_placed_by_a_map() {
    run_job(3, |_| async {
        let a = Array::<Leaf, (usize, usize)>::new_mapped((4, 5), &BY_SUM, (0,));
        for x in 0..4 {
            for y in 0..5 {
                let pe = a.at((x, y)).ret().where_am_i().await;
                assert_eq!(pe, (x + y) % 3, "element ({x}, {y})");
            }
        }
        let got = Future::new();
        a.report(got);
        assert_eq!(got.await.len(), 20);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn insertion_errors_name_the_problem() {
    run_job(2, |_| async {
        let dense = Array::<Leaf, usize>::new(4, (0,));
        let e = dense.try_insert(9, (0,), None).unwrap_err().to_string();
        assert!(e.contains("only sparse arrays"), "{e}");
        let sparse = Array::<Leaf, (usize, usize)>::new_sparse(None);
        let e = sparse
            .try_insert((1, 2), (0,), Some(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown PE 5"), "{e}");
        sparse.insert((1, 2), (0,), None);
        sparse.done_inserting().await;
        let e = sparse
            .try_insert((3, 4), (0,), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("after done_inserting"), "{e}");
        let e = Array::<Leaf, usize>::new_sparse_dims(2, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot have 2 dimensions"), "{e}");
        charmrs::exit(0);
    })
    .unwrap();
    let e = run_job(3, |_| async {
        let _ = Array::<Leaf, usize>::new_mapped(4, &TOO_FAR, (0,));
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("TOO_FAR") && e.contains("PE 7"), "{e}");
    // Each inserted on one PE, then again on the other (for some, their home, which knows the
    // element lives elsewhere): two elements of one index.
    let e = run_job(2, |_| async {
        let sparse = Array::<Pinned, usize>::new_sparse(None);
        for k in 0..8usize {
            sparse.insert(k, (), Some(k % 2));
        }
        charmrs::wait_qd().await;
        for k in 0..8usize {
            sparse.insert(k, (), Some((k + 1) % 2));
        }
        charmrs::wait_qd().await;
        charmrs::exit(0);
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("was inserted twice"), "{e}");
    // Inserted on PE 1, then on PE 2: neither is the home (PE 0) and neither knows of the
    // other's element; the home catches the second announcement, in whichever order the two
    // arrive.
    let e = run_job(3, |_| async {
        let sparse = Array::<Pinned, usize>::new_sparse(Some(&ALL_AT_ZERO));
        sparse.insert(5, (), Some(1));
        charmrs::wait_qd().await;
        sparse.insert(5, (), Some(2));
        charmrs::wait_qd().await;
        charmrs::exit(0);
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("element (5,) of Pinned was inserted twice: on PE 1 and on PE 2")
            && e.contains("its home, PE 0"),
        "{e}"
    );
}

/// A user-defined index type.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Octant {
    level: u8,
    code: u64,
}
charmrs::index_key!(Octant);

/// Knows its key.
struct Node;

#[chare]
impl Node {
    fn new() -> Self {
        Node
    }

    #[entry]
    fn echo(&mut self, ctx: &Ctx<Self>) -> (u8, u64) {
        let k: Octant = ctx.index();
        (k.level, k.code)
    }

    #[entry]
    fn count(&mut self, ctx: &Ctx<Self>, total: Future<u64>) {
        let k: Octant = ctx.index();
        ctx.contribute(k.code, Reducer::Sum, total);
    }
}

#[test]
fn user_key_indices_in_a_sparse_array() {
    run_job(3, |_| async {
        let tree = Array::<Node, Octant>::new_sparse(None);
        let keys: Vec<Octant> = (0..20u64)
            .map(|c| Octant {
                level: (c % 4) as u8,
                code: c * 1_000_003,
            })
            .collect();
        for k in &keys {
            tree.insert(*k, (), None);
        }
        tree.done_inserting().await;
        for k in &keys {
            assert_eq!(tree.at(*k).ret().echo().await, (k.level, k.code));
        }
        let total = Future::new();
        tree.count(total);
        assert_eq!(total.await, keys.iter().map(|k| k.code).sum::<u64>());
        let too_big = Index::from_key(&[u64::MAX; 4]).unwrap_err().to_string();
        assert!(too_big.contains("does not fit"), "{too_big}");
        charmrs::exit(0);
    })
    .unwrap();
}

/// A chare that cannot migrate, in a sparse array.
struct Pinned {
    calls: u32,
}

#[chare]
impl Pinned {
    fn new() -> Self {
        Pinned { calls: 0 }
    }

    #[entry]
    fn call(&mut self) {
        self.calls += 1;
    }

    #[entry]
    fn calls(&mut self, ctx: &Ctx<Self>) -> (usize, u32) {
        (ctx.my_pe(), self.calls)
    }
}

/// Elements of a non-migratable chare inserted away from their homes are reached there (calls
/// go through the home, which forwards them), before and after `done_inserting`, point calls
/// and broadcasts alike.
#[test]
fn a_non_migratable_sparse_array_inserted_away_from_home() {
    run_job(3, |_| async {
        let a = Array::<Pinned, usize>::new_sparse(None);
        for k in 0..12usize {
            // A call sent before its element exists waits at the home.
            a.at(k).call();
            a.insert(k, (), Some(k % 3));
        }
        a.done_inserting().await;
        a.call();
        for k in 0..12usize {
            a.at(k).call();
        }
        charmrs::wait_qd().await;
        for k in 0..12usize {
            assert_eq!(a.at(k).ret().calls().await, (k % 3, 3), "element {k}");
        }
        charmrs::exit(0);
    })
    .unwrap();
}

// Every element's home is PE 0.
charmrs::array_map!(ALL_AT_ZERO = |_index, _pes| 0);

/// A sparse array's element that sums its index over the array.
struct Adder;

#[chare]
impl Adder {
    fn new() -> Self {
        Adder
    }

    #[entry]
    async fn total(this: Coro<Self>) -> u64 {
        let me: usize = this.ctx().index();
        this.ctx().allreduce(me as u64, Reducer::Sum).await
    }
}

/// Keeps its PE busy, with a message always waiting in its local queue.
struct Ticker;

#[chare]
impl Ticker {
    fn new() -> Self {
        Ticker
    }

    /// Sleeps 1 ms and sends itself the next tick, `left` times.
    #[entry]
    fn tick(&mut self, ctx: &Ctx<Self>, left: u32) {
        std::thread::sleep(std::time::Duration::from_millis(1));
        if left > 0 {
            ctx.this_element().tick(left - 1);
        }
    }
}

/// An allreduce contributor on a PE that has not yet received the array's seal and is home to
/// none of its elements gets the result: it cannot know whether it is in the reduction tree, so
/// it subscribes. (PE 3 keeps a tick in its local queue; the seal waits behind it there, and the
/// call, sent at a negative priority right after the seal, overtakes it.)
#[test]
fn allreduce_reaches_a_contributor_that_has_not_seen_the_seal() {
    run_job(4, |_| async {
        let sparse = Array::<Adder, usize>::new_sparse(Some(&ALL_AT_ZERO));
        for k in 0..6usize {
            sparse.insert(k, (), Some(1 + k % 3));
        }
        Group::<Ticker>::new(()).at(3).tick(200);
        sparse.done_inserting().await;
        let totals: Vec<u64> = sparse.with_priority(-100).gather().total().await;
        assert_eq!(totals, vec![15; 6]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// Keeps its PE busy, and inserts into a sparse array when asked.
struct LateInserter;

#[chare]
impl LateInserter {
    fn new() -> Self {
        LateInserter
    }

    #[entry]
    fn busy(&mut self) {
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(50) {}
    }

    #[entry]
    fn insert_one(&mut self, array: Array<Pinned, usize>, key: usize) {
        array.insert(key, (), None);
    }
}

/// An insertion that PE 1 issues after it answered `done_inserting`'s census but before the
/// seal reaches it is a program error that the array's counts cannot absorb (its home would
/// hold one element more than the sealed count): the job aborts naming it, whether the home
/// learns of the element before its seal (home PE 1) or after it (home PE 0).
#[test]
fn an_insertion_racing_done_inserting_aborts_the_job() {
    for late_home in [0usize, 1] {
        let e = run_job(2, move |_| async move {
            let array = Array::<Pinned, usize>::new_sparse(None);
            let helpers = Group::<LateInserter>::new(());
            let home = |k: usize| array.at(k).pe();
            let first = (0..100).find(|&k| home(k) == 0).unwrap();
            let late = (0..100)
                .find(|&k| k != first && home(k) == late_home)
                .unwrap();
            array.insert(first, (), None);
            charmrs::wait_qd().await;
            helpers.at(1).busy();
            let mut sealed = std::pin::pin!(array.done_inserting());
            // Polled once: the census goes out, reaching PE 1 behind `busy`.
            let ready = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(std::future::Future::poll(sealed.as_mut(), cx).is_ready())
            })
            .await;
            assert!(!ready, "the census needs PE 1's answer");
            helpers.at(1).insert_one(array, late); // behind the census at PE 1
            sealed.await;
            charmrs::wait_qd().await;
            charmrs::exit(0);
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("after done_inserting") && e.contains("Pinned"),
            "home {late_home}: {e}"
        );
    }
}

/// A proxy to an element the array's map places on a PE the job does not have is an error
/// naming the map (it used to be sent to PE 0, where it waited for ever).
#[test]
fn a_proxy_the_map_places_out_of_range_is_an_error() {
    run_job(3, |_| async {
        let sparse = Array::<Pinned, usize>::new_sparse(Some(&TOO_FAR));
        let e = sparse.try_at(4usize).unwrap_err().to_string();
        assert!(e.contains("TOO_FAR") && e.contains("PE 7"), "{e}");
        charmrs::exit(0);
    })
    .unwrap();
}

/// A call to an index that was never inserted ends the job naming it, whether it reaches the
/// index's home after `done_inserting` sealed the array or waits there from before the seal.
/// Before, it waited at the home for ever (and quiescence was still detected).
#[test]
fn a_call_to_an_index_never_inserted_aborts_once_the_array_is_sealed() {
    for before_the_seal in [false, true] {
        let e = run_job(3, move |_| async move {
            let s = Array::<Leaf, usize>::new_sparse(None);
            for k in 0..4usize {
                s.insert(k, (k as u32,), None);
            }
            if before_the_seal {
                s.at(99usize).ping();
            }
            s.done_inserting().await;
            s.at(99usize).ret().ping().await;
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("never inserted") && e.contains("99") && e.contains("ping"),
            "{e}"
        );
    }
}

// Every element's home is PE 0.
charmrs::array_map!(HOME_ON_0 = |_index, _pes| 0);

/// A broadcast to a sparse array before `done_inserting` waits for it, like a reduction, and
/// then reaches every element once, wherever it was inserted. Before, an element inserted away
/// from its home whose home had not heard of it yet missed the broadcast.
#[test]
fn a_broadcast_before_done_inserting_reaches_every_element_once() {
    run_job(3, |_| async {
        let s = Array::<Leaf, usize>::new_sparse(Some(&HOME_ON_0));
        s.insert(5, (0,), Some(1));
        s.insert(6, (0,), Some(2));
        s.insert(7, (0,), None);
        let pinged = s.ret().ping();
        s.done_inserting().await;
        pinged.await;
        let got = Future::new();
        s.report(got);
        let pings: Vec<u32> = got.await.iter().map(|r| r.4).collect();
        assert_eq!(pings, vec![1, 1, 1]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// A member of a group on some PEs.
struct Member;

#[chare]
impl Member {
    fn new() -> Self {
        Member
    }

    /// (its index, its PE).
    #[entry]
    fn place(&mut self, ctx: &Ctx<Self>) -> (usize, usize) {
        (ctx.index::<usize>(), ctx.my_pe())
    }

    /// Sums the members' PEs into `to`.
    #[entry]
    fn sum_pes(&mut self, ctx: &Ctx<Self>, to: Future<u64>) {
        ctx.contribute(ctx.my_pe() as u64, Reducer::Sum, to);
    }
}

/// charm4py's `Group(C, onPEs=pes)`: one element on each listed PE, indexed by it; broadcasts,
/// point calls and reductions see exactly those.
#[test]
fn a_group_on_some_pes_has_one_element_on_each_listed_pe() {
    run_job(5, |_| async {
        let members = Array::<Member, usize>::on_pes(&[4, 0, 2], ()).await;
        assert_eq!(
            members.gather().place().await,
            [(0, 0), (2, 2), (4, 4)],
            "one element per listed PE, indexed by it"
        );
        assert_eq!(members.at(2).ret().place().await, (2, 2));
        let sum = Future::new();
        members.sum_pes(sum);
        assert_eq!(sum.await, 6, "a reduction counts the listed PEs only");
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn a_group_on_no_pe_or_an_unknown_or_repeated_pe_is_an_error_naming_it() {
    let outside = poll_once(Array::<Member, usize>::try_on_pes(&[0], ()));
    assert!(outside
        .err()
        .expect("outside a PE")
        .to_string()
        .contains("outside a running PE"));
    run_job(3, |_| async {
        let e = Array::<Member, usize>::try_on_pes(&[], ())
            .await
            .err()
            .expect("no PEs");
        assert!(e.to_string().contains("no PEs given"), "{e}");
        let e = Array::<Member, usize>::try_on_pes(&[1, 3], ())
            .await
            .err()
            .expect("PE 3 of 3");
        assert!(e.to_string().contains("unknown PE 3"), "{e}");
        let e = Array::<Member, usize>::try_on_pes(&[1, 2, 1], ())
            .await
            .err()
            .expect("PE 1 twice");
        assert!(
            e.to_string()
                .contains("Array::on_pes: PE 1 is listed twice"),
            "{e}"
        );
        charmrs::exit(0);
    })
    .unwrap();
}

/// Polls `f` once on this (non-PE) thread: enough for a future that fails before it awaits.
fn poll_once<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::noop();
    match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the future did not finish at once"),
    }
}
