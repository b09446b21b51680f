//! Bad input and failures: every error names the bad value and the valid range; a panic in user
//! code aborts the job naming chare, index, entry method and PE.

mod common;

use charmrs::prelude::*;
use charmrs::Error;
use common::run_job;

/// A chare whose entries misbehave on request.
struct Faulty;

#[chare]
impl Faulty {
    fn new(ctx: &Ctx<Self>, explode_in_constructor: bool) -> Self {
        if explode_in_constructor && ctx.raw_index() == Index::new(&[1, 2]).unwrap() {
            panic!("constructor refused");
        }
        Faulty
    }

    #[entry]
    fn explode(&mut self, ctx: &Ctx<Self>, why: String) {
        if ctx.raw_index() == Index::new(&[2, 1]).unwrap() {
            panic!("{why}");
        }
    }

    #[entry]
    fn bad_send(&mut self, ctx: &Ctx<Self>) {
        // Out of range: the abort message must name the index and the dimensions.
        ctx.this_array::<(usize, usize)>()
            .at((7, 0))
            .explode(String::new());
    }

    #[entry]
    fn give_up(&mut self) {
        charmrs::abort("giving up on purpose");
    }
}

fn aborted(r: charmrs::Result<i32>) -> String {
    match r {
        Err(Error::Aborted(msg)) => msg,
        other => panic!("expected an abort, got {other:?}"),
    }
}

#[test]
fn panic_in_entry_names_chare_index_entry_and_pe() {
    let msg = aborted(run_job(4, |_| async {
        let a = Array::<Faulty, (usize, usize)>::new((3, 3), (false,));
        a.explode("boom at 2,1".into());
    }));
    for needle in [
        "Faulty::explode",
        "Faulty",
        "(2, 1)",
        "PE 3",
        "boom at 2,1",
        "errors.rs",
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
}

#[test]
fn panic_in_constructor_is_named() {
    let msg = aborted(run_job(2, |_| async {
        Array::<Faulty, (usize, usize)>::new((3, 3), (true,));
    }));
    for needle in ["`new`", "Faulty", "(1, 2)", "PE 1", "constructor refused"] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
}

#[test]
fn panic_in_entry_point_is_named() {
    let msg = aborted(run_job(2, |_| async {
        panic!("main failed");
    }));
    assert!(
        msg.contains("entry point on PE 0") && msg.contains("main failed"),
        "{msg}"
    );
}

#[test]
fn out_of_range_send_inside_entry_aborts_with_the_index() {
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Faulty, (usize, usize)>::new((3, 3), (false,));
        a.at((0, 0)).bad_send();
    }));
    assert!(
        msg.contains("index (7, 0) is out of range for an array of dimensions (3, 3)"),
        "{msg}"
    );
    assert!(msg.contains("Faulty::bad_send"), "{msg}");
}

#[test]
fn abort_call_ends_the_job_with_its_message() {
    let msg = aborted(run_job(2, |_| async {
        Single::<Faulty>::new((false,), Some(1)).give_up();
    }));
    assert!(msg.contains("abort on PE 1: giving up on purpose"), "{msg}");
}

#[test]
fn bad_pe_and_bad_index_are_errors_naming_the_range() {
    run_job(3, |_| async {
        let e = Single::<Faulty>::try_new((false,), Some(3)).err().unwrap();
        assert_eq!(e, Error::PeOutOfRange { pe: 3, num_pes: 3 });
        assert!(
            e.to_string().contains("unknown PE 3") && e.to_string().contains("0..=2"),
            "{e}"
        );
        let g = Group::<Faulty>::new((false,));
        let e = g.try_at(5).unwrap_err();
        assert!(e.to_string().contains("unknown PE 5"), "{e}");
        // A PE beyond what an index can hold is still an unknown PE, not a "dimension".
        let e = g.try_at(1 << 40).unwrap_err();
        assert_eq!(
            e,
            Error::PeOutOfRange {
                pe: 1 << 40,
                num_pes: 3
            }
        );
        let a = Array::<Faulty, usize>::new(4, (false,));
        let e = a.try_at(4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "index (4,) is out of range for an array of dimensions (4,)"
        );
        let e = a
            .try_at((1usize, 1usize).to_index().map(|_| 9).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("(9,)"), "{e}");
        let e = a.try_at(1 << 33).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("index coordinate 8589934592 is out of range"),
            "{e}"
        );
        let e = a.try_at_dims_mismatch();
        assert!(e.contains("2 dimension(s) but the 1-d array"), "{e}");
        charmrs::exit(0);
    })
    .unwrap();
}

/// `Group::at` with a PE beyond what an index holds panics naming the PE, as `try_at` reports
/// it (it used to name an index coordinate).
#[test]
fn group_at_a_huge_pe_names_the_pe() {
    let msg = aborted(run_job(2, |_| async {
        Group::<Faulty>::new((false,)).at(1 << 40).give_up();
    }));
    assert!(
        msg.contains("unknown PE 1099511627776") && msg.contains("0..=1"),
        "{msg}"
    );
}

/// Helper: reach a 1-d array through its untyped proxy with a 2-d index.
trait DimsMismatch {
    fn try_at_dims_mismatch(&self) -> String;
}
impl DimsMismatch for Array<Faulty, usize> {
    fn try_at_dims_mismatch(&self) -> String {
        (**self).try_at((1usize, 1usize)).unwrap_err().to_string()
    }
}

#[test]
fn runtime_calls_outside_a_pe_are_named_errors() {
    let e = Single::<Faulty>::try_new((false,), None).err().unwrap();
    assert!(
        matches!(
            e,
            Error::NotInRuntime {
                what: "Single::new"
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("outside a running PE"), "{e}");
    let p = std::panic::catch_unwind(charmrs::my_pe).unwrap_err();
    let msg = p.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("`my_pe` was called outside a running PE"),
        "{msg}"
    );
    assert!(!charmrs::in_runtime());
}

/// A value whose `Drop` panics.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("the bomb went off when dropped");
    }
}

struct BombMaker;

#[chare]
impl BombMaker {
    fn new() -> Self {
        BombMaker
    }

    #[entry]
    fn make(&mut self) -> Bomb {
        Bomb
    }

    #[entry]
    async fn make_later(_this: Coro<Self>) -> Bomb {
        charmrs::sleep(std::time::Duration::from_millis(1)).await;
        Bomb
    }
}

/// A result nobody asked for is dropped; a panic in its `Drop` aborts the job naming the entry
/// and the PE, as a panic in the entry would, for a plain and a suspended entry alike.
#[test]
fn a_panic_dropping_an_entrys_result_names_the_entry() {
    for suspended in [false, true] {
        let msg = aborted(run_job(2, move |_| async move {
            let m = Single::<BombMaker>::new((), Some(1));
            if suspended {
                m.make_later();
            } else {
                m.make();
            }
            charmrs::sleep(std::time::Duration::from_secs(30)).await;
        }));
        let entry = if suspended { "make_later" } else { "make" };
        assert!(
            msg.contains(&format!("BombMaker::{entry}"))
                && msg.contains("PE 1")
                && msg.contains("the bomb went off"),
            "{msg}"
        );
    }
}

/// An argument whose `Clone` and `Hash` panic.
#[derive(PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Touchy(u32);

impl Clone for Touchy {
    fn clone(&self) -> Self {
        panic!("Touchy refuses to be cloned")
    }
}

impl std::hash::Hash for Touchy {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {
        panic!("Touchy refuses to be hashed")
    }
}

struct Receiver {
    want: Touchy,
}

#[chare]
impl Receiver {
    fn new() -> Self {
        Receiver { want: Touchy(1) }
    }

    #[entry]
    fn take(&mut self, _t: Touchy) {}

    #[entry(when = "self.want == t")]
    fn wait_for(&mut self, t: Touchy) {
        let _ = t;
    }
}

/// User code the runtime runs around a call, outside the entry itself: a broadcast's argument
/// `Clone` (one copy per element on a PE) aborts the job naming the entry; the `Hash` of a
/// `when` argument fails the call, whose caller gets the error.
#[test]
fn a_panic_cloning_or_hashing_arguments_names_the_entry() {
    let msg = aborted(run_job(1, |_| async {
        let a = Array::<Receiver, usize>::new(3, ());
        a.take(Touchy(0));
        charmrs::sleep(std::time::Duration::from_secs(30)).await;
    }));
    assert!(
        msg.contains("Receiver::take") && msg.contains("refuses to be cloned"),
        "{msg}"
    );
    run_job(1, |_| async {
        let r = Single::<Receiver>::new((), None);
        let e = r.ret().wait_for(Touchy(2)).result().await.unwrap_err();
        let text = format!("{e:?}");
        assert!(
            text.contains("wait_for") && text.contains("refuses to be hashed"),
            "{text}"
        );
        charmrs::exit(0);
    })
    .unwrap();
}

/// A chare whose state panics when dropped (a user's `Drop` with an `assert!` or an `unwrap`
/// that fails at the end of the job), several of them on each PE.
struct Holder {
    _bomb: Bomb,
}

#[chare]
impl Holder {
    fn new() -> Self {
        Holder { _bomb: Bomb }
    }

    #[entry]
    fn ping(&mut self) -> u32 {
        1
    }

    #[entry]
    fn fail(&mut self, ctx: &Ctx<Self>) {
        if ctx.index::<usize>() == 3 {
            panic!("deliberate failure");
        }
    }
}

/// Chares are dropped one at a time at the end of the job: a second panicking `Drop` is not a
/// panic while unwinding (which would abort the process with none of the job's messages out).
#[test]
fn chares_whose_drop_panics_do_not_abort_the_process_at_the_end() {
    // After `exit(0)`: the status stays (the failure is printed).
    let code = run_job(2, |_| async {
        let a = Array::<Holder, usize>::new(8, ());
        for i in 0..8usize {
            assert_eq!(a.at(i).ret().ping().await, 1);
        }
        charmrs::exit(0);
    })
    .expect("the job ends with its exit status");
    assert_eq!(code, 0);
    // After an entry's panic: that panic is the job's message, naming the element.
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Holder, usize>::new(8, ());
        for i in 0..8usize {
            assert_eq!(a.at(i).ret().ping().await, 1);
        }
        a.fail();
    }));
    for needle in ["Holder::fail", "(3,)", "deliberate failure"] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
}

/// A migratable chare whose `Drop` panics.
#[derive(serde::Serialize, serde::Deserialize)]
struct Mover {
    armed: bool,
}

impl Drop for Mover {
    fn drop(&mut self) {
        if self.armed {
            panic!("the mover refuses to be dropped");
        }
    }
}

#[chare(migratable)]
impl Mover {
    fn new() -> Self {
        Mover { armed: true }
    }

    #[entry]
    fn go(&mut self, ctx: &Ctx<Self>) {
        ctx.migrate(1).unwrap();
    }
}

/// The copy a migration leaves behind is dropped: a panic in its `Drop` aborts the job naming
/// the element and both PEs, not as a failure outside any entry method.
#[test]
fn a_panicking_drop_of_a_migrated_elements_old_copy_is_named() {
    let msg = aborted(run_job(2, |_| async {
        let a = Array::<Mover, usize>::new(1, ());
        a.at(0).go();
        charmrs::sleep(std::time::Duration::from_secs(30)).await;
    }));
    assert!(
        msg.contains("dropping element (0,) of Mover on PE 0 after it migrated to PE 1 panicked")
            && msg.contains("the mover refuses to be dropped"),
        "{msg}"
    );
}
