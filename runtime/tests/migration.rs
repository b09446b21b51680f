//! Migration and location management: random migrations under heavy messaging (every message
//! counted once at its receiver), broadcasts and reductions in flight during migrations, the
//! `migrated` hook, AtSync load balancing, and the errors.

mod common;

use charmrs::prelude::*;
use charmrs::{Error, Runtime};
use common::{run_job, run_job_with};
use std::sync::atomic::{AtomicUsize, Ordering};

/// SplitMix64: deterministic pseudo-random numbers from a seed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const ELEMENTS: usize = 32;
const PER_SENDER: u64 = 3125; // 32 x 3125 = 100 000 messages

fn target_of(sender: usize, k: u64) -> usize {
    (mix((sender as u64) << 32 | k) % ELEMENTS as u64) as usize
}

fn message_id(sender: usize, k: u64) -> u64 {
    (sender as u64) << 32 | k
}

/// Constructions of elements created with `counted` (only the heavy-messaging test's: the other
/// tests of this binary run at the same time and build their own).
static CONSTRUCTED: AtomicUsize = AtomicUsize::new(0);
static MIGRATED: AtomicUsize = AtomicUsize::new(0);

/// An element that counts what it receives and wanders between PEs.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wanderer {
    received: u64,
    id_sum: u64,
    bumps: u32,
    moves: u32,
    resumed: u32,
    /// Whether this element did the busy work of `work_then_sync` (it started on PE 0).
    heavy: bool,
}

#[chare(migratable)]
impl Wanderer {
    fn new(counted: bool) -> Self {
        if counted {
            CONSTRUCTED.fetch_add(1, Ordering::Relaxed);
        }
        Wanderer {
            received: 0,
            id_sum: 0,
            bumps: 0,
            moves: 0,
            resumed: 0,
            heavy: false,
        }
    }

    fn migrated(&mut self, _ctx: &Ctx<Self>) {
        self.moves += 1;
        MIGRATED.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends this element's share of the traffic.
    #[entry]
    fn start(&mut self, ctx: &Ctx<Self>) {
        let me: usize = ctx.index();
        let array = ctx.this_array::<usize>();
        for k in 0..PER_SENDER {
            array.at(target_of(me, k)).take(message_id(me, k));
        }
    }

    /// One message; now and then the element moves to a pseudo-random PE.
    #[entry]
    fn take(&mut self, ctx: &Ctx<Self>, id: u64) {
        self.received += 1;
        self.id_sum = self.id_sum.wrapping_add(id);
        let r = mix(id ^ 0x5eed);
        if r.is_multiple_of(97) {
            ctx.migrate((r >> 8) as usize % ctx.num_pes()).unwrap();
        }
    }

    #[entry]
    fn report(&mut self, ctx: &Ctx<Self>, to: Future<Vec<(u64, u64)>>) {
        ctx.gather((self.received, self.id_sum), to);
    }

    /// Moves to the next PE and, in the same breath, contributes to a reduction.
    #[entry]
    fn hop(&mut self, ctx: &Ctx<Self>, total: Future<u32>) {
        ctx.migrate((ctx.my_pe() + 1) % ctx.num_pes()).unwrap();
        ctx.contribute(1u32, Reducer::Sum, total);
    }

    #[entry]
    fn bump(&mut self) {
        self.bumps += 1;
    }

    /// This element's bumps and the PE it runs on.
    #[entry]
    fn bumps_here(&mut self, ctx: &Ctx<Self>) -> (u32, usize) {
        (self.bumps, ctx.my_pe())
    }

    #[entry]
    fn bumps_and_moves(&mut self, ctx: &Ctx<Self>, to: Future<Vec<(u32, u32)>>) {
        ctx.gather((self.bumps, self.moves), to);
    }

    /// Busy work proportional to where the element starts (heavy on PE 0), then AtSync.
    #[entry]
    fn work_then_sync(&mut self, ctx: &Ctx<Self>) {
        self.heavy = ctx.my_pe() == 0;
        if self.heavy {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(3);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        ctx.at_sync(ctx.this_proxy().resume_from_sync_callback());
    }

    #[entry]
    fn resume_from_sync(&mut self, ctx: &Ctx<Self>) {
        self.resumed += 1;
        ctx.contribute(
            vec![(self.heavy && ctx.my_pe() == 0) as u32, 1u32],
            Reducer::Sum,
            ctx.this_proxy().at(0usize).resumed_all_callback(),
        );
    }

    #[entry]
    fn resumed_all(&mut self, counts: Vec<u32>) {
        // Four PEs, 16 elements: the four that started on PE 0 were heavy; the others measure
        // next to nothing, so the balancer may pile any number of them anywhere. What must
        // change is where the load is: Greedy gives each PE one heavy element; at most two may
        // stay on PE 0 (its load at least halved), leaving room for noisy measurements.
        assert_eq!(counts[1], 16, "every element resumed once");
        assert!(
            counts[0] <= 2,
            "the balancer moved load off PE 0 (heavy elements still there, elements): {counts:?}"
        );
        charmrs::exit(0);
    }
}

/// Not migratable.
struct Fixed;

#[chare]
impl Fixed {
    fn new() -> Self {
        Fixed
    }

    #[entry]
    fn try_move(&mut self, ctx: &Ctx<Self>, to: usize) -> String {
        ctx.migrate(to).unwrap_err().to_string()
    }
}

#[test]
fn random_migrations_under_heavy_messaging_deliver_every_message_once() {
    CONSTRUCTED.store(0, Ordering::Relaxed);
    MIGRATED.store(0, Ordering::Relaxed);
    run_job(4, |_| async {
        let a = Array::<Wanderer, usize>::new(ELEMENTS, (true,));
        a.start();
        charmrs::wait_qd().await;
        let got = Future::new();
        a.report(got);
        let got = got.await;
        let mut want = vec![(0u64, 0u64); ELEMENTS];
        for s in 0..ELEMENTS {
            for k in 0..PER_SENDER {
                let t = target_of(s, k);
                want[t].0 += 1;
                want[t].1 = want[t].1.wrapping_add(message_id(s, k));
            }
        }
        assert_eq!(got, want);
        charmrs::exit(0);
    })
    .unwrap();
    assert_eq!(
        CONSTRUCTED.load(Ordering::Relaxed),
        ELEMENTS,
        "constructors ran once"
    );
    assert!(
        MIGRATED.load(Ordering::Relaxed) > 100,
        "elements migrated: {}",
        MIGRATED.load(Ordering::Relaxed)
    );
}

#[test]
fn broadcasts_and_a_reduction_in_flight_during_migrations() {
    run_job(4, |_| async {
        let a = Array::<Wanderer, usize>::new(16, (false,));
        for round in 0..3 {
            let total = Future::new();
            a.hop(total);
            for _ in 0..10 {
                a.bump(); // races with the migrations
            }
            assert_eq!(total.await, 16, "round {round}");
        }
        charmrs::wait_qd().await;
        let seen = Future::new();
        a.bumps_and_moves(seen);
        assert_eq!(seen.await, vec![(30u32, 3u32); 16]);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn broadcast_results_come_back_from_elements_away_from_home() {
    // `ret` and `gather` broadcasts raced against migrations (every element moves one PE on per
    // round) and issued while every element is away from its home PE: each element's result
    // arrives exactly once, from wherever it is.
    run_job(4, |_| async {
        let a = Array::<Wanderer, usize>::new(16, (false,));
        let homes: Vec<usize> = a.gather().bumps_here().await.iter().map(|e| e.1).collect();
        for round in 1..=3u32 {
            let total = Future::new();
            a.hop(total);
            a.ret().bump().await;
            let got = a.gather().bumps_here().await;
            assert_eq!(got.len(), 16, "round {round}");
            for (i, &(bumps, pe)) in got.iter().enumerate() {
                assert_eq!(bumps, round, "round {round}, element {i}");
                assert_eq!(
                    pe,
                    (homes[i] + round as usize) % 4,
                    "round {round}: element {i} is {round} PEs from home"
                );
            }
            assert_eq!(total.await, 16, "round {round}");
        }
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn at_sync_balances_load_off_an_overloaded_pe_and_resumes_everyone() {
    let rt = Runtime::new(4)
        .affinity(false)
        .balancer("Greedy")
        .lb_debug(true);
    let code = run_job_with(rt, |_| async {
        Array::<Wanderer, usize>::new(16, (false,)).work_then_sync();
    })
    .unwrap();
    assert_eq!(code, 0);
}

#[test]
fn at_sync_without_a_balancer_just_resumes() {
    let code = run_job(2, |_| async {
        Array::<Wanderer, usize>::new(16, (false,)).work_then_sync();
    });
    // Without a strategy nobody moves: the four heavy elements of PE 0 (of 2 PEs: eight) stay,
    // and `resumed_all` asserts that load moved — so it panics, which aborts the job.
    let e = code.unwrap_err().to_string();
    assert!(e.contains("the balancer moved load off PE 0"), "{e}");
}

#[test]
fn migration_errors_name_the_problem() {
    run_job(2, |_| async {
        let f = Array::<Fixed, usize>::new(2, ());
        let e = f.at(0usize).ret().try_move(1).await;
        assert!(e.contains("not migratable"), "{e}");
        let w = Array::<Wanderer, usize>::new(2, (false,));
        let _ = w;
        charmrs::exit(0);
    })
    .unwrap();
    let e = Error::NotMigratable { chare: "X" }.to_string();
    assert!(e.contains("#[chare(migratable)]"), "{e}");
}

/// Works in rounds of self-sends; heavy if it started on PE 0.
#[derive(serde::Serialize, serde::Deserialize)]
struct Spinner {
    heavy: bool,
}

#[chare(migratable)]
impl Spinner {
    fn new(ctx: &Ctx<Self>) -> Self {
        Spinner {
            heavy: ctx.my_pe() == 0,
        }
    }

    #[entry]
    fn spin(&mut self, ctx: &Ctx<Self>, rounds: u32) {
        let until = std::time::Instant::now()
            + std::time::Duration::from_micros(if self.heavy { 1000 } else { 50 });
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        if rounds > 0 {
            ctx.this_element().spin(rounds - 1);
        }
    }

    #[entry]
    fn place(&mut self, ctx: &Ctx<Self>, to: Future<Vec<(bool, usize)>>) {
        ctx.gather((self.heavy, ctx.my_pe()), to);
    }
}

#[test]
fn periodic_balancing_moves_load_without_at_sync() {
    let rt = Runtime::new(2)
        .affinity(false)
        .balancer("Greedy")
        .lb_period(std::time::Duration::from_millis(40));
    run_job_with(rt, |_| async {
        let a = Array::<Spinner, usize>::new(8, ());
        // Bursts of ~0.24 s of work on PE 0 (4 heavy elements × 60 rounds of 1 ms), ~6
        // balancing periods each, until a heavy element has moved: one burst normally; on a
        // machine busy with other jobs (a period's measurement disturbed) more, up to 20 (the
        // test's bound is the count of bursts, not a time).
        let mut placed = Vec::new();
        for _burst in 0..20 {
            a.spin(60);
            charmrs::wait_qd().await;
            let where_now = Future::new();
            a.place(where_now);
            placed = where_now.await;
            if placed.iter().any(|(h, pe)| *h && *pe == 1) {
                break;
            }
        }
        let heavy_on_1 = placed.iter().filter(|(h, pe)| *h && *pe == 1).count();
        assert!(heavy_on_1 >= 1, "a heavy element moved to PE 1: {placed:?}");
        let t = charmrs::pe_times();
        assert!(t.entry > 0.0 && t.wall >= t.entry + t.idle - 1e-6, "{t:?}");
        charmrs::exit(0);
    })
    .unwrap();
}

/// Moves to the next PE on every call, as the user guide's `step` example does.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hopper {
    steps: u64,
}

#[chare(migratable)]
impl Hopper {
    fn new() -> Self {
        Hopper { steps: 0 }
    }

    #[entry]
    fn step(&mut self, ctx: &Ctx<Self>) {
        self.steps += 1;
        ctx.migrate((ctx.my_pe() + 1) % ctx.num_pes()).unwrap();
    }

    #[entry]
    fn steps(&mut self) -> u64 {
        self.steps
    }
}

/// 1000 calls queued at once to an element that moves on every call: call k chases it through
/// k - 1 moves (each a forward from the PE it just left, which is progress, not a loop), and
/// calls sent at a negative priority must not overtake the element's own arrival and bounce.
#[test]
fn calls_chasing_an_element_that_moves_on_every_call_all_arrive() {
    run_job(2, |_| async {
        let a = Array::<Hopper, usize>::new(1, ());
        for k in 0..1000 {
            if k % 3 == 0 {
                a.at(0usize).with_priority(-1).step();
            } else {
                a.at(0usize).step();
            }
        }
        // Quiescence: every step ran (none is still being forwarded).
        charmrs::wait_qd().await;
        assert_eq!(a.at(0usize).ret().steps().await, 1000);
        charmrs::exit(0);
    })
    .unwrap();
}

/// Its `migrated` hook panics.
#[derive(serde::Serialize, serde::Deserialize)]
struct Grumpy;

#[chare(migratable)]
impl Grumpy {
    fn new() -> Self {
        Grumpy
    }

    fn migrated(&mut self, _ctx: &Ctx<Self>) {
        panic!("Grumpy does not want to move");
    }

    #[entry]
    fn go(&mut self, ctx: &Ctx<Self>) {
        ctx.migrate((ctx.my_pe() + 1) % ctx.num_pes()).unwrap();
    }
}

/// A panic in a `migrated` hook (user code outside any entry method) aborts the job naming the
/// element and the panic, instead of losing the PE.
#[test]
fn a_panicking_migrated_hook_aborts_the_job_naming_the_element() {
    let r = run_job(2, |_| async {
        let a = Array::<Grumpy, usize>::new(1, ());
        a.at(0usize).go();
        charmrs::wait_qd().await;
        charmrs::exit(0);
    });
    match r {
        Err(Error::Aborted(msg)) => {
            for needle in ["element (0,) of Grumpy", "Grumpy does not want to move"] {
                assert!(msg.contains(needle), "`{needle}` missing: {msg}");
            }
        }
        other => panic!("the job must abort: {other:?}"),
    }
}

/// Sums with `allreduce` from wherever it is.
#[derive(serde::Serialize, serde::Deserialize)]
struct Summer;

#[chare(migratable)]
impl Summer {
    fn new() -> Self {
        Summer
    }

    #[entry]
    fn go_to(&mut self, ctx: &Ctx<Self>, pe: usize) {
        ctx.migrate(pe).unwrap();
    }

    #[entry]
    fn pe_now(&mut self, ctx: &Ctx<Self>) -> usize {
        ctx.my_pe()
    }

    #[entry]
    async fn total(this: Coro<Self>) -> u64 {
        let me: usize = this.ctx().index();
        this.ctx().allreduce(me as u64 + 1, Reducer::Sum).await
    }
}

/// An allreduce contributor on a PE that is home to none of the array's elements (outside its
/// reduction tree) gets the result too.
#[test]
fn allreduce_reaches_a_contributor_on_a_pe_outside_the_reduction_tree() {
    run_job(8, |_| async {
        // 4 elements on 8 PEs: homes 0 (the reduction tree's root), 2, 4 and 6.
        let a = Array::<Summer, usize>::new(4, ());
        a.at(0usize).go_to(5);
        a.at(1usize).go_to(3);
        a.at(2usize).go_to(7);
        charmrs::wait_qd().await;
        assert_eq!(a.at(1usize).ret().pe_now().await, 3);
        assert_eq!(a.at(0usize).ret().pe_now().await, 5);
        let totals: Vec<u64> = a.gather().total().await;
        assert_eq!(totals, vec![10; 4]);
        charmrs::exit(0);
    })
    .unwrap();
}

fn spin(d: std::time::Duration) {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Calls `at_sync` from an async entry method, after an `.await` (charm4py's AtSync in a
/// coroutine loop).
#[derive(serde::Serialize, serde::Deserialize)]
struct Looper {
    resumed: u32,
}

#[chare(migratable)]
impl Looper {
    fn new() -> Self {
        Looper { resumed: 0 }
    }

    #[entry]
    async fn run(this: Coro<Self>, iters: u32, done: Future<f64>) {
        for i in 0..iters {
            charmrs::sleep(std::time::Duration::from_millis(1)).await;
            this.with(|_, ctx| {
                spin(std::time::Duration::from_millis(if i == 0 {
                    30
                } else {
                    1
                }));
                ctx.at_sync(ctx.this_proxy().resume_from_sync_callback());
            });
            this.wait(move |s| s.resumed > i).await;
        }
        this.with(|_, ctx| ctx.contribute(charmrs::pe_times().entry, Reducer::Max, done));
    }

    #[entry]
    fn resume_from_sync(&mut self) {
        self.resumed += 1;
    }
}

/// The time of a suspended entry's later polls is charged to its element, and `at_sync` called
/// in one of them reports what ran so far: before, the step after it saw a negative load and
/// aborted the job ("bad measurements").
#[test]
fn at_sync_from_an_async_entry_after_an_await_measures_its_time() {
    let rt = Runtime::new(2).affinity(false).balancer("Greedy");
    let r = run_job_with(rt, |_| async {
        let done = Future::new();
        Array::<Looper, usize>::new(4, ()).run(4, done);
        // Two elements per PE, each spinning 30 + 3 ms in later polls of its entry.
        let entry = done.await;
        assert!(entry >= 0.06, "entry seconds on the busiest PE: {entry}");
        charmrs::exit(0);
    });
    assert_eq!(r.expect("the job runs"), 0);
}

/// Reports the PE's entry-method seconds.
struct Probe;

#[chare]
impl Probe {
    fn new() -> Self {
        Probe
    }

    #[entry]
    fn noop(&mut self) {}

    #[entry]
    fn entry_secs(&mut self) -> f64 {
        charmrs::pe_times().entry
    }
}

/// Work outside entry methods (here the entry point's own, between two awaits) counts as the
/// PE's background, not towards the next element to run: before, the balancer saw a "heavy"
/// element and moved it.
#[test]
fn work_outside_entry_methods_is_not_charged_to_the_next_element() {
    let rt = Runtime::new(1).affinity(false).balancer("Greedy");
    let r = run_job_with(rt, |_| async {
        let probe = Single::<Probe>::new((), Some(0));
        probe.ret().noop().await;
        spin(std::time::Duration::from_millis(100));
        probe.ret().noop().await;
        let entry = probe.ret().entry_secs().await;
        assert!(entry < 0.05, "entry seconds: {entry}");
        charmrs::exit(0);
    });
    assert_eq!(r.expect("the job runs"), 0);
}

/// A group whose element on PE 0 is busy: load that cannot move.
struct Burner;

#[chare]
impl Burner {
    fn new() -> Self {
        Burner
    }

    #[entry]
    fn burn(&mut self, ctx: &Ctx<Self>, rounds: u32) {
        if ctx.my_pe() == 0 {
            spin(std::time::Duration::from_micros(1500));
            if rounds > 0 {
                ctx.this_element().burn(rounds - 1);
            }
        }
    }
}

/// Movable, with next to no load of its own.
#[derive(serde::Serialize, serde::Deserialize)]
struct Light;

#[chare(migratable)]
impl Light {
    fn new() -> Self {
        Light
    }

    #[entry]
    fn gather_pes(&mut self, ctx: &Ctx<Self>, to: Future<Vec<usize>>) {
        ctx.gather(ctx.my_pe(), to);
    }
}

/// Periodic balancing counts the load of what cannot move (a busy group element on PE 0) in
/// its PE's load: the movable elements leave PE 0. Before, that load was in no report, the PEs
/// looked even, and PE 0 stayed the busiest.
#[test]
fn periodic_balancing_counts_the_load_that_cannot_move() {
    let rt = Runtime::new(2)
        .affinity(false)
        .balancer("Greedy")
        .lb_period(std::time::Duration::from_millis(40));
    run_job_with(rt, |_| async {
        let fixed = Group::<Burner>::new(());
        let a = Array::<Light, usize>::new(8, ());
        // PE 0 busy for ~0.6 s; looked at after several 40 ms periods, while it still is.
        fixed.burn(400);
        charmrs::sleep(std::time::Duration::from_millis(250)).await;
        let where_now = Future::new();
        a.gather_pes(where_now);
        let placed = where_now.await;
        let on_1 = placed.iter().filter(|&&pe| pe == 1).count();
        assert!(
            on_1 >= 7,
            "the movable elements left the busy PE 0: {placed:?}"
        );
        charmrs::exit(0);
    })
    .unwrap();
}

/// Movable, with a small even load of its own, balanced by `at_sync`.
#[derive(serde::Serialize, serde::Deserialize)]
struct LightSyncing;

#[chare(migratable)]
impl LightSyncing {
    fn new() -> Self {
        LightSyncing
    }

    #[entry]
    fn sync(&mut self, ctx: &Ctx<Self>, resume: Future<()>) {
        spin(std::time::Duration::from_millis(2));
        ctx.at_sync(resume);
    }

    #[entry]
    fn gather_pes(&mut self, ctx: &Ctx<Self>, to: Future<Vec<usize>>) {
        ctx.gather(ctx.my_pe(), to);
    }
}

/// An AtSync step counts each PE's load outside the syncing collection (a busy group element
/// on PE 0) as that PE's background: the movable elements leave PE 0. Before, the step saw
/// only the collection's own even loads and every PE's background as zero, and kept 4 per PE.
#[test]
fn at_sync_balancing_counts_the_load_outside_the_collection() {
    let rt = Runtime::new(2).affinity(false).balancer("Greedy");
    run_job_with(rt, |_| async {
        let fixed = Group::<Burner>::new(());
        let a = Array::<LightSyncing, usize>::new(8, ());
        // PE 0 busy for ~0.6 s; the step is taken while it still is.
        fixed.burn(400);
        charmrs::sleep(std::time::Duration::from_millis(250)).await;
        let resumed = Future::new();
        a.sync(resumed);
        resumed.await;
        let where_now = Future::new();
        a.gather_pes(where_now);
        let placed = where_now.await;
        let on_1 = placed.iter().filter(|&&pe| pe == 1).count();
        assert!(
            on_1 >= 7,
            "the movable elements left the busy PE 0: {placed:?}"
        );
        charmrs::exit(0);
    })
    .unwrap();
}

/// Keeps a copy of its `Ctx` in a timer, then moves away.
#[derive(serde::Serialize, serde::Deserialize)]
struct Leaver;

#[chare(migratable)]
impl Leaver {
    fn new() -> Self {
        Leaver
    }

    /// Contributes later through a copy of its `Ctx`, and moves to PE 1 now.
    #[entry]
    fn arm(&mut self, ctx: &Ctx<Self>, sum: Future<u64>) {
        let later = ctx.clone();
        charmrs::schedule_after(std::time::Duration::from_millis(20), move || {
            later.contribute(1u64, Reducer::Sum, sum);
        });
        ctx.migrate(1).unwrap();
    }
}

/// A copy of an element's `Ctx` kept on the PE it left cannot contribute for it: the element's
/// reduction numbers went with it, and the copy would reuse one (two contributions of the
/// element in one reduction, none of another element). The job aborts naming the element.
#[test]
fn a_ctx_copy_left_behind_by_a_migration_cannot_contribute() {
    let r = run_job(2, |_| async {
        let a = Array::<Leaver, usize>::new(2, ());
        let sum = Future::<u64>::new();
        a.at(0usize).arm(sum);
        sum.await;
        charmrs::exit(0);
    });
    match r {
        Err(Error::Aborted(msg)) => {
            for needle in [
                "element (0,) of Leaver",
                "migrated away from PE 0",
                "cannot contribute",
            ] {
                assert!(msg.contains(needle), "`{needle}` missing: {msg}");
            }
        }
        other => panic!("the job must abort: {other:?}"),
    }
}
