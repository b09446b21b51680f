//! Sections (charm4py's section proxies): calls reach the members only; reductions, gathers,
//! barriers and allreduces over a section count its members only, overlapping sections keep
//! separate reduction numbers, members may migrate between reductions, sections of several
//! collections (`Section::combine`) call and reduce over all of them, and misuse is an error
//! naming the problem.

mod common;

use charmrs::prelude::*;
use charmrs::Index;
use common::{run_job, run_job_with};

#[derive(serde::Serialize, serde::Deserialize)]
struct Cell {
    calls: u32,
}

#[chare(migratable)]
impl Cell {
    fn new() -> Self {
        Cell { calls: 0 }
    }

    /// Counts the call, then sums the index over `section` into `sum`, gathers it into
    /// `all` and reaches the barrier `done`.
    #[entry]
    fn step(
        &mut self,
        ctx: &Ctx<Self>,
        section: Section<Cell>,
        sum: Future<u64>,
        all: Future<Vec<u64>>,
        done: Future<()>,
    ) {
        self.calls += 1;
        let me: usize = ctx.index();
        let s = ctx.section(&section);
        s.contribute(me as u64, Reducer::Sum, sum);
        s.gather(me as u64, all);
        s.barrier(done);
    }

    /// `rounds` allreduces of 1 over `section`, each answered before the next.
    #[entry]
    async fn count(this: Coro<Self>, section: Section<Cell>, rounds: u32) -> u64 {
        let mut last = 0;
        for _ in 0..rounds {
            last = this
                .ctx()
                .section(&section)
                .allreduce(1u64, Reducer::Sum)
                .await;
        }
        last
    }

    #[entry]
    fn go_to(&mut self, ctx: &Ctx<Self>, pe: usize) {
        ctx.migrate(pe).unwrap();
    }

    #[entry]
    fn calls(&mut self) -> u32 {
        self.calls
    }

    /// Counts the call, then pokes every member of `section` (a multicast from this PE).
    #[entry]
    fn relay(&mut self, section: Section<Cell>) {
        self.calls += 1;
        section.poke(None);
    }

    /// Counts the call; moves to PE `to` if one is given.
    #[entry]
    fn poke(&mut self, ctx: &Ctx<Self>, to: Option<usize>) {
        self.calls += 1;
        if let Some(pe) = to {
            ctx.migrate(pe).unwrap();
        }
    }

    /// Contributes over a section it may not be in.
    #[entry]
    fn stray(&mut self, ctx: &Ctx<Self>, section: Section<Cell>, sum: Future<u64>) {
        ctx.section(&section).contribute(1u64, Reducer::Sum, sum);
    }
}

/// A section of 150 of 200 elements on 4 PEs: each call through it reaches every member exactly
/// once (down the multicast tree), also while members migrate — between calls, and during them
/// (every call makes each member that gets it move on, so the callers' location caches are
/// always behind and calls chase their members).
#[test]
fn a_large_section_reaches_every_member_once_while_members_migrate() {
    run_job(4, |_| async {
        let cells = Array::<Cell, usize>::new(200, ());
        let member = |k: usize| k % 4 != 1;
        let section = cells.section((0..200).filter(|&k| member(k)));
        for round in 0..10usize {
            for k in (0..200).step_by(7) {
                cells.at(k).go_to((k + round) % 4);
            }
            let to = (round % 2 == 1).then_some(round % 4);
            section.poke(to);
        }
        charmrs::wait_qd().await;
        for k in 0..200usize {
            let want = if member(k) { 10 } else { 0 };
            assert_eq!(cells.at(k).ret().calls().await, want, "element {k}");
        }
        charmrs::exit(0);
    })
    .unwrap();
}

/// The same section called from inside an entry method on every PE at once: the trees of
/// different callers overlap and each still delivers once per member.
#[test]
fn sections_called_from_every_pe_at_once_deliver_once_per_call() {
    run_job(3, |_| async {
        let cells = Array::<Cell, usize>::new(60, ());
        let section = cells.section((0..60).step_by(2));
        let callers = cells.section([0usize, 1, 2, 3, 4, 5]);
        callers.relay(section.clone());
        charmrs::wait_qd().await;
        for k in 0..60usize {
            // 6 relayed calls per member, plus the relay itself for callers 0, 2 and 4.
            let want = match k {
                _ if k % 2 == 1 => u32::from(k < 6),
                _ if k < 6 => 7,
                _ => 6,
            };
            assert_eq!(cells.at(k).ret().calls().await, want, "element {k}");
        }
        charmrs::exit(0);
    })
    .unwrap();
}

/// One section's round: multicast `step`, then its sum, gather and barrier.
async fn round(section: &Section<Cell>) -> (u64, Vec<u64>) {
    let (sum, all, done) = (Future::new(), Future::new(), Future::new());
    section.step(section.clone(), sum, all, done);
    done.await;
    (sum.await, all.await)
}

#[test]
fn calls_and_reductions_over_overlapping_sections_count_their_members_only() {
    for wire in [false, true] {
        let rt = charmrs::Runtime::new(4).affinity(false).wire_check(wire);
        run_job_with(rt, |_| async {
            let cells = Array::<Cell, usize>::new(12, ());
            let evens = cells.section((0..12).step_by(2));
            let threes = cells.section((0..12).step_by(3));
            assert_eq!(evens.len(), 6);
            assert!(evens.contains(cells.id(), &Index::new(&[4]).unwrap()));
            assert!(!evens.contains(cells.id(), &Index::new(&[5]).unwrap()));
            for _ in 0..3 {
                // The two sections' rounds interleave; elements 0 and 6 are in both.
                let (e, t) = futures_both(round(&evens), round(&threes)).await;
                assert_eq!(e, (30, vec![0, 2, 4, 6, 8, 10]));
                assert_eq!(t, (18, vec![0, 3, 6, 9]));
            }
            let calls: Vec<u32> = cells.gather().calls().await;
            for (k, c) in calls.iter().enumerate() {
                let want = 3 * (u32::from(k % 2 == 0) + u32::from(k % 3 == 0));
                assert_eq!(
                    *c, want,
                    "element {k} was called once per round of its sections"
                );
            }
            charmrs::exit(0);
        })
        .unwrap();
    }
}

/// Both futures, polled together.
async fn futures_both<A, B>(
    a: impl std::future::Future<Output = A>,
    b: impl std::future::Future<Output = B>,
) -> (A, B) {
    let (mut a, mut b) = (Box::pin(a), Box::pin(b));
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if ra.is_some() && rb.is_some() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    (ra.unwrap(), rb.unwrap())
}

/// Members migrate between a section's reductions: their reduction numbers go with them.
#[test]
fn members_keep_their_section_reductions_through_migrations() {
    run_job(4, |_| async {
        let cells = Array::<Cell, usize>::new(8, ());
        let odds = cells.section((1..8).step_by(2));
        let counts: Vec<u64> = odds_gather(&cells, &odds, 5).await;
        assert_eq!(counts, vec![4; 4]);
        for k in (1..8).step_by(2) {
            cells.at(k).go_to((k + 1) % 4);
        }
        charmrs::wait_qd().await;
        assert_eq!(round(&odds).await, (16, vec![1, 3, 5, 7]));
        let counts = odds_gather(&cells, &odds, 5).await;
        assert_eq!(counts, vec![4; 4]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// Every member of `section` runs `count` (`rounds` allreduces); their answers by index.
async fn odds_gather(cells: &Array<Cell, usize>, section: &Section<Cell>, rounds: u32) -> Vec<u64> {
    let mut out = Vec::new();
    let (_, members) = section.parts().next().expect("one part");
    let pending: Vec<_> = members
        .iter()
        .map(|i| cells.at(i.get(0)).ret().count(section.clone(), rounds))
        .collect();
    for f in pending {
        out.push(f.await);
    }
    out
}

#[test]
fn a_group_section_reaches_its_pes() {
    run_job(4, |_| async {
        let group = Group::<Cell>::new(());
        let section = group.section([1, 3]);
        assert_eq!(round(&section).await, (4, vec![1, 3]));
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn section_misuse_is_an_error_naming_it() {
    run_job(2, |_| async {
        let cells = Array::<Cell, usize>::new(4, ());
        let e = cells
            .try_section([Index::new(&[9]).unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains('9'), "{e}");
        let e = cells.try_section([]).unwrap_err().to_string();
        assert!(e.contains("without members"), "{e}");
        charmrs::exit(0);
    })
    .unwrap();
    let e = run_job(2, |_| async {
        let cells = Array::<Cell, usize>::new(4, ());
        let low = cells.section([0, 1]);
        let sum = Future::new();
        cells.at(3usize).stray(low, sum);
        sum.await;
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a member of Section"), "{e}");
}

/// A member away on a PE that is home to no member (which never gets the section's counts)
/// still gets its allreduce result, and its contributions count.
#[test]
fn a_member_away_from_the_sections_pes_takes_part() {
    run_job(4, |_| async {
        let cells = Array::<Cell, usize>::new(8, ());
        let first = cells.section([0, 1]); // both homed on PE 0
        cells.at(1usize).go_to(3);
        charmrs::wait_qd().await;
        let counts = odds_gather(&cells, &first, 3).await;
        assert_eq!(counts, vec![2, 2]);
        assert_eq!(round(&first).await, (1, vec![0, 1]));
        charmrs::exit(0);
    })
    .unwrap();
}

/// `Section::combine` (charm4py's `charm.combine`): a section over two arrays and a group of one
/// chare type, with overlapping inputs. Each member gets each call once; its sum, gather (by
/// collection, then index), barrier and allreduces count every member once, also while members
/// migrate; the sections it was made of keep their own reductions.
#[test]
fn a_combined_section_calls_and_reduces_over_all_its_collections() {
    run_job(4, |_| async {
        let a = Array::<Cell, usize>::new(10, ());
        let b = Array::<Cell, usize>::new(7, ());
        let g = Group::<Cell>::new(());
        let a_low = a.section([0usize, 1, 2, 3]);
        let a_odd = a.section((1..10).step_by(2));
        let b_some = b.section([2usize, 6]);
        let g_two = g.section([1, 3]);
        let all = Section::combine([a_low.clone(), b_some.clone(), a_odd.clone(), g_two]);
        // a: {0, 1, 2, 3, 5, 7, 9}; b: {2, 6}; g: {1, 3}.
        assert_eq!(all.len(), 11);
        let ids: Vec<_> = all.parts().map(|(c, _)| c.id()).collect();
        assert_eq!(ids, [a.id(), b.id(), g.id()]);
        assert!(all.contains(b.id(), &Index::new(&[6]).unwrap()));
        assert!(!all.contains(b.id(), &Index::new(&[1]).unwrap()));
        let sum_a = 1 + 2 + 3 + 5 + 7 + 9;
        let want_gather = vec![0, 1, 2, 3, 5, 7, 9, 2, 6, 1, 3];
        for _ in 0..2 {
            assert_eq!(
                round(&all).await,
                (sum_a + 2 + 6 + 1 + 3, want_gather.clone())
            );
        }
        // Members move between rounds; the combined section and one it was made of interleave.
        for k in [1usize, 5, 9] {
            a.at(k).go_to((k + 1) % 4);
        }
        b.at(6usize).go_to(0);
        charmrs::wait_qd().await;
        let (both, low) = futures_both(round(&all), round(&a_low)).await;
        assert_eq!(both, (sum_a + 12, want_gather));
        assert_eq!(low, (6, vec![0, 1, 2, 3]));
        // An allreduce over the combined section, from every member.
        let answers: Vec<_> = [(&a, 9usize), (&b, 2), (&a, 0)]
            .into_iter()
            .map(|(arr, k)| arr.at(k).ret().count(all.clone(), 3))
            .chain(
                [
                    a.at(1usize),
                    a.at(2usize),
                    a.at(3usize),
                    a.at(5usize),
                    a.at(7usize),
                ]
                .map(|e| e.ret().count(all.clone(), 3)),
            )
            .chain([b.at(6usize).ret().count(all.clone(), 3)])
            .chain([
                g.at(1).ret().count(all.clone(), 3),
                g.at(3).ret().count(all.clone(), 3),
            ])
            .collect();
        for f in answers {
            assert_eq!(f.await, 11);
        }
        // Calls: 3 rounds of `step` for every member, 1 more for a's low members.
        let calls_a: Vec<u32> = a.gather().calls().await;
        assert_eq!(calls_a, [4, 4, 4, 4, 0, 3, 0, 3, 0, 3]);
        let calls_b: Vec<u32> = b.gather().calls().await;
        assert_eq!(calls_b, [0, 0, 3, 0, 0, 0, 3]);
        let calls_g: Vec<u32> = g.gather().calls().await;
        assert_eq!(calls_g, [0, 3, 0, 3]);
        charmrs::exit(0);
    })
    .unwrap();
}

/// A combined section passed in a call (serialized) still reaches, and reduces over, every
/// collection; combining nothing is an error naming it; an element of another collection is not
/// a member.
#[test]
fn a_combined_section_travels_and_misuse_is_named() {
    run_job(3, |_| async {
        let a = Array::<Cell, usize>::new(6, ());
        let b = Array::<Cell, usize>::new(6, ());
        let all = Section::combine([a.section([4usize]), b.section([0usize, 5])]);
        // A single element relays a call to the combined section (it travels in the call).
        a.section([0usize]).relay(all.clone());
        charmrs::wait_qd().await;
        let calls_a: Vec<u32> = a.gather().calls().await;
        assert_eq!(calls_a, [1, 0, 0, 0, 1, 0]);
        let calls_b: Vec<u32> = b.gather().calls().await;
        assert_eq!(calls_b, [1, 0, 0, 0, 0, 1]);
        let e = Section::<Cell>::try_combine([]).unwrap_err().to_string();
        assert!(e.contains("no section to combine"), "{e}");
        charmrs::exit(0);
    })
    .unwrap();
    let e = run_job(2, |_| async {
        let a = Array::<Cell, usize>::new(4, ());
        let b = Array::<Cell, usize>::new(4, ());
        let all = Section::combine([a.section([0usize, 1]), b.section([3usize])]);
        let sum = Future::new();
        b.at(1usize).stray(all, sum);
        sum.await;
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("not a member of Section") && e.contains("3 members"),
        "{e}"
    );
}
