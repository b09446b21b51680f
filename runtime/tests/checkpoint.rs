//! Checkpoint and restart (`charmrs::checkpoint`, `charmrs::restore`): a job stopped after a
//! checkpoint and restarted on another number of PEs ends exactly as the job that never stopped;
//! and the errors (no checkpoint, a chare that cannot be saved, damaged or missing files).

mod common;

use charmrs::prelude::*;
use charmrs::{Error, PodVec};
use common::run_job;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

const STEPS: u32 = 12;
const STOP_AT: u32 = 5;

/// SplitMix64 finalizer: deterministic mixing.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// An element of a 2-d array that keeps a proxy to its right neighbour in its state (set once,
/// before the checkpoint) and exchanges with it every step.
#[derive(Serialize, Deserialize)]
struct Cell {
    value: u64,
    right: Option<ElementProxy<Cell>>,
    /// What arrived from the left neighbour, by step parity (a neighbour's value of step `k`
    /// may arrive before this element's own step `k` runs).
    received: [u64; 2],
}

#[chare(migratable)]
impl Cell {
    fn new(seed: u64) -> Self {
        Cell {
            value: seed,
            right: None,
            received: [0; 2],
        }
    }

    #[entry]
    fn wire(&mut self, ctx: &Ctx<Self>, rows: usize, cols: usize) {
        let (r, c): (usize, usize) = ctx.index();
        let array = ctx.this_array::<(usize, usize)>();
        self.right = Some(array.at((r, (c + 1) % cols)));
        let _ = rows;
    }

    /// One step: mix the value with what arrived, pass it right, and contribute it.
    #[entry]
    fn step(&mut self, ctx: &Ctx<Self>, k: u32, done: Future<u64>) {
        let (r, c): (usize, usize) = ctx.index();
        let previous = (k as usize + 1) % 2;
        let received = std::mem::take(&mut self.received[previous]);
        self.value = mix(self.value ^ received ^ ((r * 100 + c) as u64) ^ u64::from(k));
        self.right.expect("wired").take(k, self.value);
        ctx.contribute(self.value % 1_000_003, Reducer::Sum, done);
    }

    #[entry]
    fn take(&mut self, k: u32, v: u64) {
        self.received[k as usize % 2] ^= v;
    }
}

/// An element of a sparse array: counts its steps.
#[derive(Serialize, Deserialize)]
struct Tag {
    count: u64,
}

#[chare(migratable)]
impl Tag {
    fn new(start: u64) -> Self {
        Tag { count: start }
    }

    #[entry]
    fn tick(&mut self, ctx: &Ctx<Self>, k: u32, done: Future<u64>) {
        let key: usize = ctx.index();
        self.count = self.count * 3 + key as u64 + u64::from(k);
        ctx.contribute(self.count % 65_521, Reducer::Sum, done);
    }
}

/// A single chare that totals what it is told.
#[derive(Serialize, Deserialize)]
struct Tally {
    total: u64,
}

#[chare(migratable)]
impl Tally {
    fn new() -> Self {
        Tally { total: 0 }
    }

    #[entry]
    fn add(&mut self, x: u64) -> u64 {
        self.total = mix(self.total ^ x);
        self.total
    }
}

/// What the entry point carries over a restart.
#[derive(Serialize, Deserialize)]
struct Progress {
    step: u32,
    cells: Array<Cell, (usize, usize)>,
    tags: Array<Tag, usize>,
    tally: Single<Tally>,
    trace: Vec<u64>,
}

const ROWS: usize = 5;
const COLS: usize = 7;
const TAGS: [usize; 6] = [3, 17, 40, 41, 99, 1000];

/// Runs the steps from `progress.step` up to `until`, checkpointing into `dir` after step
/// `checkpoint_at`; returns the trace of per-step results.
async fn run_steps(
    mut progress: Progress,
    until: u32,
    checkpoint_at: Option<(u32, PathBuf)>,
) -> Vec<u64> {
    while progress.step < until {
        let k = progress.step;
        let cells = Future::<u64>::new();
        progress.cells.step(k, cells);
        let tags = Future::<u64>::new();
        progress.tags.tick(k, tags);
        let (a, b) = (cells.await, tags.await);
        let t = progress.tally.ret().add(a ^ (b << 20)).await;
        progress.trace.push(t);
        progress.step += 1;
        // The neighbours' messages of this step must be in before the next one (and before a
        // checkpoint, which waits for quiescence itself).
        charmrs::wait_qd().await;
        if let Some((at, dir)) = &checkpoint_at {
            if progress.step == *at {
                let saved = charmrs::checkpoint(dir, &progress)
                    .await
                    .expect("checkpoint");
                assert_eq!(saved.elements, (ROWS * COLS + TAGS.len() + 1) as u64);
                assert_eq!(saved.collections, 3);
                assert_eq!(saved.pes, charmrs::num_pes());
                return progress.trace;
            }
        }
    }
    progress.trace
}

/// A new job's collections, built and wired.
async fn fresh() -> Progress {
    let cells = Array::<Cell, (usize, usize)>::new((ROWS, COLS), (7,));
    cells.wire(ROWS, COLS);
    let tags = Array::<Tag, usize>::new_sparse(None);
    for (i, &key) in TAGS.iter().enumerate() {
        tags.insert(key, (i as u64,), Some(i % charmrs::num_pes()));
    }
    tags.done_inserting().await;
    let tally = Single::<Tally>::new((), Some(1.min(charmrs::num_pes() - 1)));
    charmrs::wait_qd().await;
    Progress {
        step: 0,
        cells,
        tags,
        tally,
        trace: Vec::new(),
    }
}

/// Runs a job of `pes` PEs whose entry point returns a value through the channel.
fn job<T: Send + 'static, Fut: std::future::Future<Output = T> + 'static>(
    pes: usize,
    main: impl FnOnce() -> Fut + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let code = run_job(pes, move |_| async move {
        let _ = tx.send(main().await);
        charmrs::exit(0);
    })
    .expect("the job runs");
    assert_eq!(code, 0);
    rx.try_recv().expect("the entry point finished")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("charmrs-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

charmrs::readonly! {
    /// The PE count of a restarted job, set before its restore.
    static RESTARTED_ON: usize;
}

#[test]
fn a_job_restarted_from_a_checkpoint_on_other_pe_counts_ends_as_the_uninterrupted_one() {
    let whole = job(3, || async { run_steps(fresh().await, STEPS, None).await });
    assert_eq!(whole.len(), STEPS as usize);

    let dir = scratch("restart");
    let d = dir.clone();
    let first = job(3, move || async move {
        assert!(charmrs::restore::<Progress>(&d).await.unwrap().is_none());
        run_steps(fresh().await, STEPS, Some((STOP_AT, d))).await
    });
    assert_eq!(first[..], whole[..STOP_AT as usize]);
    assert!(dir.join("checkpoint.meta").exists());

    for pes in [2, 4] {
        let d = dir.clone();
        let trace = job(pes, move || async move {
            // A readonly set before the restore takes no collection id a restored one needs.
            RESTARTED_ON.set(pes).await;
            let progress = charmrs::restore::<Progress>(&d)
                .await
                .expect("restore")
                .expect("a checkpoint");
            assert_eq!(progress.step, STOP_AT);
            // New collections made after a restart get ids of their own.
            let extra = Array::<Tag, usize>::new(4, (5,));
            let f = Future::<u64>::new();
            extra.tick(0, f);
            let extra_sum = f.await;
            assert_eq!(extra_sum, (0..4u64).map(|i| 15 + i).sum::<u64>());
            assert_eq!(*RESTARTED_ON.get(), pes);
            run_steps(progress, STEPS, None).await
        });
        assert_eq!(trace, whole, "restarted on {pes} PEs");
    }
    // The single chare lived on PE 1: a one-PE job cannot hold it where its proxies look.
    let text = restore_error(&dir, 1);
    assert!(
        text.contains("Tally") && text.contains("PE 1") && text.contains("1 PEs"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chare type that cannot move cannot be saved.
struct Fixed;

#[chare]
impl Fixed {
    fn new() -> Self {
        Fixed
    }
}

#[test]
fn a_checkpoint_names_a_chare_that_cannot_be_saved() {
    let dir = scratch("fixed");
    let d = dir.clone();
    let err = job(2, move || async move {
        let _fixed = Array::<Fixed, usize>::new(4, ());
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &0u32).await.unwrap_err()
    });
    let text = err.to_string();
    assert!(matches!(err, Error::Checkpoint(_)), "{text}");
    assert!(
        text.contains("Fixed") && text.contains("not migratable"),
        "{text}"
    );
    assert!(!dir.join("checkpoint.meta").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

fn save_small(dir: &Path) {
    let d = dir.to_path_buf();
    job(2, move || async move {
        let progress = fresh().await;
        charmrs::checkpoint(&d, &progress)
            .await
            .expect("checkpoint");
    });
}

/// The PE file of `pe` of the checkpoint in `dir` (named with the checkpoint's number).
fn pe_file(dir: &Path, pe: usize) -> PathBuf {
    let prefix = format!("pe-{pe}-");
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with(&prefix) && name.ends_with(".ckpt")
        })
        .collect();
    assert_eq!(found.len(), 1, "one file of PE {pe}: {found:?}");
    found[0].clone()
}

fn restore_error(dir: &Path, pes: usize) -> String {
    let d = dir.to_path_buf();
    job(pes, move || async move {
        match charmrs::restore::<Progress>(&d).await {
            Ok(_) => panic!("restored a damaged checkpoint"),
            Err(e) => e.to_string(),
        }
    })
}

#[test]
fn damaged_or_missing_checkpoint_files_are_named() {
    let dir = scratch("damaged");
    save_small(&dir);

    // A PE file gone.
    let pe1 = pe_file(&dir, 1);
    let kept = std::fs::read(&pe1).unwrap();
    std::fs::remove_file(&pe1).unwrap();
    let text = restore_error(&dir, 2);
    assert!(text.contains(pe1.to_str().unwrap()), "{text}");

    // A PE file cut short.
    std::fs::write(&pe1, &kept[..kept.len() / 2]).unwrap();
    let text = restore_error(&dir, 3);
    assert!(
        text.contains(pe1.to_str().unwrap()) && text.contains("truncated"),
        "{text}"
    );

    // A collection made before the restore would take an id back.
    let d = dir.clone();
    let text = job(2, move || async move {
        let _early = Array::<Tag, usize>::new(2, (0,));
        match charmrs::restore::<Progress>(&d).await {
            Ok(_) => panic!("restored over a collection made before"),
            Err(e) => e.to_string(),
        }
    });
    assert!(text.contains("before making any collection"), "{text}");

    // Metadata that is not a checkpoint's.
    std::fs::write(&pe1, &kept).unwrap();
    std::fs::write(dir.join("checkpoint.meta"), b"hello").unwrap();
    let text = restore_error(&dir, 2);
    assert!(
        text.contains("checkpoint.meta") && text.contains("not a charmrs checkpoint"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An element that can be left suspended in an entry method.
#[derive(Serialize, Deserialize)]
struct Sleeper {
    alarm: bool,
}

#[chare(migratable)]
impl Sleeper {
    fn new() -> Self {
        Sleeper { alarm: false }
    }

    /// Suspends until `alarm` is set, which nothing here does.
    #[entry]
    async fn doze(this: Coro<Self>) {
        this.wait(|s| s.alarm).await;
    }
}

#[test]
fn a_checkpoint_names_an_element_suspended_in_an_entry_method() {
    let dir = scratch("busy");
    let d = dir.clone();
    let text = job(3, move || async move {
        let sleepers = Array::<Sleeper, usize>::new(3, ());
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &1u32).await.expect("checkpoint");
        sleepers.at(2).doze();
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &2u32)
            .await
            .unwrap_err()
            .to_string()
    });
    assert!(
        text.contains("element (2,) of Sleeper on PE 2") && text.contains("suspended"),
        "{text}"
    );
    // The failed checkpoint left the first one whole.
    let d = dir.clone();
    let state = job(2, move || async move {
        charmrs::restore::<u32>(&d)
            .await
            .expect("restore")
            .expect("a checkpoint")
    });
    assert_eq!(state, 1);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1 + 3,
        "the metadata and the first checkpoint's three PE files"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A group, not saved by a checkpoint.
struct Helper;

#[chare]
impl Helper {
    fn new() -> Self {
        Helper
    }

    #[entry]
    fn poke(&mut self) {}
}

/// A group whose elements are saved, and restored to a job of as many PEs.
#[derive(Serialize, Deserialize)]
struct Counter {
    value: u64,
}

#[chare(migratable)]
impl Counter {
    fn new() -> Self {
        Counter { value: 0 }
    }

    #[entry]
    fn set(&mut self, ctx: &Ctx<Self>) {
        self.value = ctx.my_pe() as u64 * 10 + 1;
    }

    #[entry]
    fn value(&mut self) -> u64 {
        self.value
    }
}

#[derive(Serialize, Deserialize)]
struct WithGroups {
    helpers: Group<Helper>,
    counters: Group<Counter>,
}

#[test]
fn groups_come_back_to_as_many_pes_and_a_call_to_any_other_aborts_naming_it() {
    let dir = scratch("group");
    let d = dir.clone();
    job(2, move || async move {
        let state = WithGroups {
            helpers: Group::<Helper>::new(()),
            counters: Group::<Counter>::new(()),
        };
        state.counters.set();
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &state).await.expect("checkpoint");
    });

    // As many PEs: the migratable group is back; the other one is not.
    let (tx, rx) = mpsc::channel();
    let d = dir.clone();
    let result = run_job(2, move |_| async move {
        let state = charmrs::restore::<WithGroups>(&d).await.unwrap().unwrap();
        // A collection made after the restart does not take an old group's id.
        let fresh = Group::<Helper>::new(());
        fresh.poke();
        let _ = tx.send(state.counters.gather().value().await);
        charmrs::wait_qd().await;
        state.helpers.poke();
        charmrs::wait_qd().await;
        charmrs::exit(0);
    });
    assert_eq!(rx.try_recv().expect("the counters' values"), [1, 11]);
    let text = format!("{result:?}");
    assert!(
        text.contains("before the restart") && text.contains("a group or a section"),
        "{text}"
    );

    // Another PE count: no group comes back.
    let d = dir.clone();
    let result = run_job(3, move |_| async move {
        let state = charmrs::restore::<WithGroups>(&d).await.unwrap().unwrap();
        let _ = state.counters.gather().value().await;
        charmrs::exit(0);
    });
    let text = format!("{result:?}");
    assert!(text.contains("before the restart"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy to a group's element on a PE the restarted job lacks (saved by 3 PEs, restored on 1)
/// is restored, and a call through it aborts naming the group as made before the restart (not
/// a send to a PE that does not exist).
#[test]
fn a_proxy_to_a_group_element_beyond_the_restarted_job_names_the_group() {
    let dir = scratch("group-element");
    let d = dir.clone();
    job(3, move || async move {
        let counters = Group::<Counter>::new(());
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &counters.at(2))
            .await
            .expect("checkpoint");
    });
    let d = dir.clone();
    let result = run_job(1, move |_| async move {
        let last = charmrs::restore::<ElementProxy<Counter>>(&d)
            .await
            .expect("restored")
            .expect("a checkpoint");
        let _ = last.ret().value().await;
        charmrs::exit(0);
    });
    let text = format!("{result:?}");
    assert!(text.contains("before the restart"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Serialize, Deserialize)]
struct WithSection {
    cells: Array<Tag, usize>,
    some: charmrs::Section<Tag>,
}

#[test]
fn a_section_in_saved_state_fails_the_restore_naming_it() {
    let dir = scratch("section");
    let d = dir.clone();
    job(2, move || async move {
        let cells = Array::<Tag, usize>::new(4, (0,));
        let some = cells.section([1usize, 3]);
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &WithSection { cells, some })
            .await
            .expect("checkpoint");
    });
    let d = dir.clone();
    let text = job(3, move || async move {
        match charmrs::restore::<WithSection>(&d).await {
            Ok(_) => panic!("restored a section"),
            Err(e) => e.to_string(),
        }
    });
    assert!(text.contains("sections are not saved"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends values down channels, and receives them, across a checkpoint.
#[derive(serde::Serialize, serde::Deserialize)]
struct Piper;

#[chare(migratable)]
impl Piper {
    fn new() -> Self {
        Piper
    }

    #[entry]
    async fn send_values(this: Coro<Self>, to: usize, values: Vec<u64>) {
        let out = this.channel(&this.ctx().this_proxy().at(to));
        for v in values {
            out.send(v);
            out.send(PodVec::from(vec![v as f64; 100]));
        }
    }

    #[entry]
    async fn send_proxy(this: Coro<Self>, to: usize, which: usize) {
        let out = this.channel(&this.ctx().this_proxy().at(to));
        out.send(this.ctx().this_proxy().at(which));
    }

    /// Receives a proxy from `from` and asks the element it names for its PE.
    #[entry]
    async fn call_received(this: Coro<Self>, from: usize) -> usize {
        let input = this.channel(&this.ctx().this_proxy().at(from));
        let proxy = input.recv::<ElementProxy<Piper>>().await;
        proxy.ret().my_pe().await
    }

    #[entry]
    fn my_pe(&mut self, ctx: &Ctx<Self>) -> usize {
        ctx.my_pe()
    }

    #[entry]
    async fn receive(this: Coro<Self>, from: usize, count: usize) -> Vec<u64> {
        let input = this.channel(&this.ctx().this_proxy().at(from));
        let mut got = Vec::new();
        for _ in 0..count {
            let v = input.recv::<u64>().await;
            let floats = input.recv::<PodVec<f64>>().await;
            assert_eq!(&floats[..], &[v as f64; 100][..]);
            got.push(v);
        }
        got
    }
}

/// Values that arrived at an element and were not received when the checkpoint was taken are
/// part of it: after a restart on another PE count they are received, in order, and the channel
/// goes on with the next sequence numbers.
#[test]
fn channel_values_not_received_yet_survive_a_restart() {
    let dir = scratch("channels");
    let d = dir.clone();
    job(2, move || async move {
        let pipes = Array::<Piper, usize>::new(4, ());
        pipes.at(0usize).send_values(3, vec![10, 11, 12]);
        pipes.at(3usize).send_values(0, vec![7]);
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &pipes).await.expect("checkpoint");
    });
    let d = dir.clone();
    let (first, second, back) = job(3, move || async move {
        let pipes = charmrs::restore::<Array<Piper, usize>>(&d)
            .await
            .expect("restore")
            .expect("a checkpoint");
        let first = pipes.at(3usize).ret().receive(0, 3).await;
        pipes.at(0usize).send_values(3, vec![13, 14]);
        let second = pipes.at(3usize).ret().receive(0, 2).await;
        let back = pipes.at(0usize).ret().receive(3, 1).await;
        (first, second, back)
    });
    assert_eq!(first, [10, 11, 12]);
    assert_eq!(second, [13, 14]);
    assert_eq!(back, [7]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy inside a channel value saved unreceived is re-homed when received after a restart
/// on fewer PEs (it named PE 3 of 4; the new job has 2).
#[test]
fn a_proxy_in_a_saved_channel_value_is_rehomed_for_the_new_job() {
    let dir = scratch("channel-proxy");
    let d = dir.clone();
    job(4, move || async move {
        let pipes = Array::<Piper, usize>::new(4, ());
        pipes.at(2usize).send_proxy(0, 3);
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &pipes).await.expect("checkpoint");
    });
    let d = dir.clone();
    let pe = job(2, move || async move {
        let pipes = charmrs::restore::<Array<Piper, usize>>(&d)
            .await
            .expect("restore")
            .expect("a checkpoint");
        pipes.at(0usize).ret().call_received(2).await
    });
    assert_eq!(pe, 1, "element 3 of 4 lives on PE 1 of 2");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An element of a sparse array that counts its calls.
#[derive(Serialize, Deserialize)]
struct Mark {
    hits: u32,
}

#[chare(migratable)]
impl Mark {
    fn new() -> Self {
        Mark { hits: 0 }
    }

    #[entry]
    fn poke(&mut self) {
        self.hits += 1;
    }

    #[entry]
    fn hits(&mut self) -> u32 {
        self.hits
    }
}

#[test]
fn a_checkpoint_names_what_waits_for_a_sparse_arrays_insertions() {
    // A call to an element not inserted yet, and a broadcast before done_inserting, wait on
    // their PEs; a checkpoint would not save them (the restarted job would never run them), so
    // it refuses, naming them, until nothing waits.
    let dir = scratch("unsealed");
    let d = dir.clone();
    let (call, broadcast, hits) = job(3, move || async move {
        let marks = Array::<Mark, usize>::new_sparse(None);
        marks.insert(1, (), Some(1));
        marks.at(5).poke();
        charmrs::wait_qd().await;
        let call = charmrs::checkpoint(&d, &0u32)
            .await
            .unwrap_err()
            .to_string();
        marks.insert(5, (), Some(2));
        marks.poke();
        charmrs::wait_qd().await;
        let broadcast = charmrs::checkpoint(&d, &0u32)
            .await
            .unwrap_err()
            .to_string();
        marks.done_inserting().await;
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &0u32).await.expect("nothing waits");
        let hits = (
            marks.at(1).ret().hits().await,
            marks.at(5).ret().hits().await,
        );
        (call, broadcast, hits)
    });
    assert!(
        call.contains("a call to Mark::poke of element (5,) waits on PE")
            && call.contains("insertion"),
        "{call}"
    );
    assert!(
        broadcast.contains("a broadcast to sparse array Mark waits on PE")
            && broadcast.contains("done_inserting"),
        "{broadcast}"
    );
    assert_eq!(
        hits,
        (1, 2),
        "the waiting call and the broadcast ran once each"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a job saving a sparse array carries over the restart.
#[derive(Serialize, Deserialize)]
struct Tags {
    tags: Array<Tag, usize>,
}

#[test]
fn done_inserting_after_a_restore_returns_and_a_second_one_is_harmless() {
    let dir = scratch("sparse-seal");
    let d = dir.clone();
    // Saved before `done_inserting`: the restore seals it; the program then seals it as it
    // would in a fresh job.
    job(3, move || async move {
        let tags = Array::<Tag, usize>::new_sparse(None);
        for i in [3usize, 17, 40, 41, 99] {
            tags.insert(i, (i as u64,), None);
        }
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &Tags { tags })
            .await
            .expect("checkpoint");
    });
    let d = dir.clone();
    let sum = job(2, move || async move {
        let s = charmrs::restore::<Tags>(&d)
            .await
            .expect("restore")
            .expect("a checkpoint");
        s.tags.done_inserting().await;
        s.tags.done_inserting().await;
        let done = Future::<u64>::new();
        s.tags.tick(1, done);
        done.await
    });
    let expected: u64 = [3u64, 17, 40, 41, 99]
        .iter()
        .map(|&i| (i * 3 + i + 1) % 65_521)
        .sum();
    assert_eq!(sum, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An element that, when element 0 is restored, broadcasts `mark` to its whole array from its
/// `migrated` hook, and counts the marks it got.
#[derive(Serialize, Deserialize)]
struct Marked {
    marks: u32,
}

#[chare(migratable)]
impl Marked {
    fn new() -> Self {
        Marked { marks: 0 }
    }

    fn migrated(&mut self, ctx: &Ctx<Self>) {
        if ctx.index::<usize>() == 0 {
            ctx.this_array::<usize>().mark();
        }
    }

    #[entry]
    fn mark(&mut self) {
        self.marks += 1;
    }

    #[entry]
    fn marks(&mut self) -> u32 {
        self.marks
    }
}

/// A broadcast made while `restore` runs (from a `migrated` hook, while other elements are
/// still on their way home) reaches every element exactly once: it waits on each PE until
/// `restore` has them all in place. Before, the elements not arrived yet missed it.
#[test]
fn a_broadcast_from_a_migrated_hook_during_restore_reaches_every_element_once() {
    const ELEMENTS: usize = 96;
    let dir = scratch("hook-broadcast");
    let d = dir.clone();
    job(4, move || async move {
        let marked = Array::<Marked, usize>::new(ELEMENTS, ());
        charmrs::wait_qd().await;
        charmrs::checkpoint(&d, &marked).await.expect("checkpoint");
    });
    for pes in [3, 4] {
        let d = dir.clone();
        let marks = job(pes, move || async move {
            let marked = charmrs::restore::<Array<Marked, usize>>(&d)
                .await
                .expect("restored")
                .expect("a checkpoint");
            charmrs::wait_qd().await;
            marked.gather().marks().await
        });
        assert_eq!(marks, vec![1; ELEMENTS], "restored on {pes} PEs");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
