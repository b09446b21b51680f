//! Readonly globals (`charmrs::readonly!`): set in the entry point, read on every PE; replaced by
//! a later `set`; read before any set is an error naming it.

mod common;

use charmrs::prelude::*;
use common::run_job;

charmrs::readonly! {
    /// Set once, read by every element.
    static GRID: (u32, String);
    /// Set twice: the second value replaces the first everywhere.
    static ROUND: u64;
    /// Never set.
    static NEVER: u8;
    /// Set from the wrong PE.
    static MISPLACED: u8;
    /// Set by one job, read by the next.
    static PER_JOB: u32;
}

/// Reads the readonlies on its PE.
struct Reader;

#[chare]
impl Reader {
    fn new() -> Self {
        Reader
    }

    #[entry]
    fn grid(&mut self, ctx: &Ctx<Self>) -> (usize, u32, String) {
        let (n, name) = GRID.get().clone();
        (ctx.my_pe(), n, name)
    }

    #[entry]
    fn round(&mut self) -> u64 {
        *ROUND.get()
    }

    #[entry]
    fn never(&mut self) -> u8 {
        *NEVER.get()
    }

    #[entry]
    fn per_job(&mut self) -> u32 {
        *PER_JOB.get()
    }

    #[entry]
    async fn set_misplaced(_this: Coro<Self>) {
        MISPLACED.set(1).await;
    }
}

#[test]
fn a_readonly_set_in_the_entry_point_is_read_on_every_pe() {
    run_job(4, |_| async {
        GRID.set((64, "coarse".to_owned())).await;
        let readers = Group::<Reader>::new(());
        let got = readers.gather().grid().await;
        assert_eq!(got.len(), 4);
        for (pe, (on, n, name)) in got.into_iter().enumerate() {
            assert_eq!((on, n, name.as_str()), (pe, 64, "coarse"));
        }
        assert_eq!(GRID.get().0, 64);

        // A later set replaces the value on every PE by the time it returns.
        ROUND.set(1).await;
        assert_eq!(readers.gather().round().await, vec![1; 4]);
        ROUND.set(2).await;
        assert_eq!(readers.gather().round().await, vec![2; 4]);
        assert_eq!(ROUND.try_get(), Some(&2));
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn reading_a_readonly_never_set_is_an_error_naming_it() {
    let e = run_job(2, |_| async {
        let reader = Single::<Reader>::new((), Some(1));
        reader.ret().never().await;
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("readonly `readonly::NEVER` was read before it was set")
            && e.contains("NEVER.set(value).await"),
        "{e}"
    );
    assert!(NEVER.try_get().is_none());
}

#[test]
fn a_readonly_set_on_another_pe_than_0_is_an_error_naming_it() {
    let e = run_job(2, |_| async {
        let reader = Single::<Reader>::new((), Some(1));
        reader.ret().set_misplaced().await;
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("readonly `readonly::MISPLACED` was set on PE 1")
            && e.contains("from the entry point (PE 0)"),
        "{e}"
    );
}

/// A readonly's value belongs to the job that set it: the next job in the same process does not
/// see it (reading it there is the usual error), and sets its own.
#[test]
fn a_readonly_set_by_one_job_is_not_seen_by_the_next_in_the_same_process() {
    run_job(2, |_| async {
        PER_JOB.set(5).await;
        let readers = Group::<Reader>::new(());
        assert_eq!(readers.gather().per_job().await, vec![5, 5]);
        charmrs::exit(0);
    })
    .unwrap();
    let e = run_job(2, |_| async {
        let reader = Single::<Reader>::new((), Some(1));
        reader.ret().per_job().await;
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`readonly::PER_JOB` was read before it was set in this job"),
        "{e}"
    );
    run_job(2, |_| async {
        PER_JOB.set(6).await;
        let readers = Group::<Reader>::new(());
        assert_eq!(readers.gather().per_job().await, vec![6, 6]);
        charmrs::exit(0);
    })
    .unwrap();
}
