//! The chare model in one process: single chares, groups, N-d arrays, broadcasts, element sends,
//! `Ctx` accessors, proxies as arguments, and arguments moved (not copied) between PEs.

mod common;

use charmrs::prelude::*;
use common::run_job;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Records (collection kind, index, PE, thread name) for every `visit`.
static VISITS: Mutex<Vec<(String, String, usize, String)>> = Mutex::new(Vec::new());
/// How many `visit`s a test expects before it ends the job.
static EXPECTED: AtomicUsize = AtomicUsize::new(0);

/// One chare type used as a single chare, a group and arrays of every dimension.
struct Probe {
    tag: String,
}

#[chare]
impl Probe {
    fn new(ctx: &Ctx<Self>, tag: String) -> Self {
        assert_eq!(
            ctx.my_pe(),
            charmrs::my_pe(),
            "constructor runs on the element's PE"
        );
        Probe { tag }
    }

    #[entry]
    fn visit(&mut self, ctx: &Ctx<Self>, done: ElementProxy<Collector>) {
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        VISITS.lock().unwrap().push((
            self.tag.clone(),
            ctx.raw_index().to_string(),
            ctx.my_pe(),
            thread,
        ));
        done.arrived();
    }
}

/// Counts arrivals and ends the job once the expected number arrived.
struct Collector {
    seen: usize,
}

#[chare]
impl Collector {
    fn new() -> Self {
        Collector { seen: 0 }
    }

    #[entry]
    fn arrived(&mut self) {
        self.seen += 1;
        if self.seen == EXPECTED.load(Ordering::SeqCst) {
            charmrs::exit(0);
        }
    }
}

#[test]
fn one_chare_type_as_single_group_and_arrays_of_1_to_6_dims() {
    let pes = 4;
    // group: 4; arrays: 5 + 2*3 + 2*2*2 + 2^4 + 2^5 + 2^6; single chares: 2
    let arrays: Vec<Vec<usize>> = vec![
        vec![5],
        vec![2, 3],
        vec![2, 2, 2],
        vec![2, 2, 2, 2],
        vec![2, 2, 2, 2, 2],
        vec![2, 2, 2, 2, 2, 2],
    ];
    let array_total: usize = arrays.iter().map(|d| d.iter().product::<usize>()).sum();
    EXPECTED.store(pes + array_total + 2, Ordering::SeqCst);
    let code = run_job(pes, move |_| async move {
        let done = Single::<Collector>::new((), Some(0));
        Group::<Probe>::new(("group".into(),)).visit(*done);
        for dims in &arrays {
            let a = Array::<Probe, Index>::new(
                Index::new(dims).unwrap(),
                (format!("{}d", dims.len()),),
            );
            a.visit(*done);
        }
        Single::<Probe>::new(("single-pe3".into(),), Some(3)).visit(*done);
        Single::<Probe>::new(("single-any".into(),), None).visit(*done);
    })
    .unwrap();
    assert_eq!(code, 0);
    let visits = VISITS.lock().unwrap().clone();
    assert_eq!(visits.len(), EXPECTED.load(Ordering::SeqCst));
    // Every element ran on a PE thread whose name matches its PE.
    for (_, _, pe, thread) in &visits {
        assert_eq!(thread, &format!("pe-{pe}"));
    }
    // Group: element i on PE i, each once.
    let group: BTreeSet<(String, usize)> = visits
        .iter()
        .filter(|v| v.0 == "group")
        .map(|v| (v.1.clone(), v.2))
        .collect();
    let want: BTreeSet<(String, usize)> = (0..pes).map(|p| (format!("({p},)"), p)).collect();
    assert_eq!(group, want);
    // Arrays: every index exactly once, on its block-placement PE.
    for dims in [vec![5usize], vec![2, 3], vec![2, 2, 2, 2, 2, 2]] {
        let d = Index::new(&dims).unwrap();
        let tag = format!("{}d", dims.len());
        let mine: Vec<_> = visits.iter().filter(|v| v.0 == tag).collect();
        assert_eq!(mine.len() as u64, d.volume(), "{tag}");
        let distinct: BTreeSet<_> = mine.iter().map(|v| v.1.clone()).collect();
        assert_eq!(distinct.len() as u64, d.volume(), "{tag}: duplicates");
        for v in mine {
            let pos = (0..d.volume())
                .find(|&k| Index::from_linear(k, &d).to_string() == v.1)
                .unwrap();
            assert_eq!(
                v.2 as u64,
                pos * pes as u64 / d.volume(),
                "{tag} {} block placement",
                v.1
            );
        }
    }
    assert!(visits
        .iter()
        .any(|v| v.0 == "single-pe3" && v.2 == 3 && v.1 == "()"));
    assert!(visits.iter().any(|v| v.0 == "single-any"));
}

static RING: Mutex<Vec<(usize, usize, usize)>> = Mutex::new(Vec::new());

/// A 2-d ring using `this_proxy`, typed `index` and `this_array`.
struct Ringer;

#[chare]
impl Ringer {
    fn new() -> Self {
        Ringer
    }

    #[entry]
    fn token(&mut self, ctx: &Ctx<Self>, hops: usize) {
        let (i, j): (usize, usize) = ctx.index();
        RING.lock().unwrap().push((i, j, hops));
        let dims = ctx.this_array::<(usize, usize)>().dims();
        let (ni, nj) = if j + 1 < dims.1 {
            (i, j + 1)
        } else {
            (i + 1, 0)
        };
        if ni == dims.0 {
            charmrs::exit(hops as i32);
        } else {
            ctx.this_proxy().at((ni, nj)).token(hops + 1);
        }
    }
}

#[test]
fn ring_over_2d_array_with_this_proxy() {
    let code = run_job(3, |_| async {
        let a = Array::<Ringer, (usize, usize)>::new((3, 4), ());
        assert_eq!(a.dims(), (3, 4));
        a.at((0, 0)).token(0);
    })
    .unwrap();
    assert_eq!(code, 11);
    let ring = RING.lock().unwrap().clone();
    let order: Vec<(usize, usize)> = ring.iter().map(|&(i, j, _)| (i, j)).collect();
    let want: Vec<(usize, usize)> = (0..3).flat_map(|i| (0..4).map(move |j| (i, j))).collect();
    assert_eq!(order, want);
}

static MOVED: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// Receives a buffer and records where its bytes are.
struct Sink;

#[chare]
impl Sink {
    fn new() -> Self {
        Sink
    }

    #[entry]
    fn take(&mut self, ctx: &Ctx<Self>, data: Vec<u8>, sent_from: usize) {
        assert_ne!(ctx.my_pe(), 0);
        MOVED
            .lock()
            .unwrap()
            .push((sent_from, data.as_ptr() as usize));
        charmrs::exit(0);
    }
}

#[test]
fn same_process_sends_move_arguments_without_copy() {
    run_job(2, |_| async {
        let sink = Single::<Sink>::new((), Some(1));
        let data = vec![7u8; 1 << 20];
        let addr = data.as_ptr() as usize;
        sink.take(data, addr);
        // `data` is moved: the compiler rejects any further use here.
    })
    .unwrap();
    let (sent, received) = MOVED.lock().unwrap()[0];
    assert_eq!(
        sent, received,
        "the receiver got the very same heap buffer: no copy"
    );
}

static BCAST: Mutex<Vec<(usize, u32)>> = Mutex::new(Vec::new());

/// Counts broadcasts per element.
struct Member {
    got: u32,
}

#[chare]
impl Member {
    fn new() -> Self {
        Member { got: 0 }
    }

    #[entry]
    fn ping(&mut self, ctx: &Ctx<Self>, round: u32, back: ElementProxy<Counter>) {
        self.got += 1;
        assert_eq!(
            self.got, round,
            "broadcast rounds arrive in order, once each"
        );
        BCAST.lock().unwrap().push((ctx.index::<usize>(), round));
        back.tick(round);
    }
}

/// Starts the next broadcast round after every member answered.
struct Counter {
    members: Proxy<Member>,
    size: usize,
    answers: usize,
    rounds: u32,
}

#[chare]
impl Counter {
    fn new(members: Proxy<Member>, size: usize, rounds: u32) -> Self {
        Counter {
            members,
            size,
            answers: 0,
            rounds,
        }
    }

    #[entry]
    fn start(&mut self, ctx: &Ctx<Self>) {
        self.members.ping(1, ctx.this_element());
    }

    #[entry]
    fn tick(&mut self, ctx: &Ctx<Self>, round: u32) {
        self.answers += 1;
        if self.answers as u32 == self.size as u32 * round {
            if round == self.rounds {
                charmrs::exit(0);
            } else {
                self.members.ping(round + 1, ctx.this_element());
            }
        }
    }
}

#[test]
fn repeated_broadcasts_to_an_array_with_proxy_in_chare_state() {
    run_job(4, |_| async {
        let members = Array::<Member, usize>::new(10, ());
        let counter = Single::<Counter>::new((*members, 10, 50), None);
        counter.start();
    })
    .unwrap();
    let b = BCAST.lock().unwrap();
    assert_eq!(b.len(), 500);
    for i in 0..10 {
        assert_eq!(b.iter().filter(|(e, _)| *e == i).count(), 50);
    }
}

static PRIO: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Records the priorities of the messages it gets, in delivery order.
struct Prio;

#[chare]
impl Prio {
    fn new() -> Self {
        Prio
    }

    #[entry]
    fn fill(&mut self, ctx: &Ctx<Self>) {
        // All sent before any is delivered (this entry is still running).
        for p in [5, 0, -7, 3, -7, 0, -100, 9] {
            ctx.this_element().with_priority(p).record(p);
        }
        ctx.this_element().with_priority(1000).finish();
    }

    #[entry]
    fn record(&mut self, p: i32) {
        PRIO.lock().unwrap().push(p);
    }

    #[entry]
    fn finish(&mut self) {
        charmrs::exit(0);
    }
}

#[test]
fn integer_priorities_order_delivery() {
    run_job(1, |_| async {
        Single::<Prio>::new((), Some(0)).fill();
    })
    .unwrap();
    assert_eq!(*PRIO.lock().unwrap(), vec![-100, -7, -7, 0, 0, 3, 5, 9]);
}

static CROSS_PRIO: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static SENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// On PE 0: blocks its PE until `Sender` on PE 1 sent everything, then records delivery order.
struct Receiver;

#[chare]
impl Receiver {
    fn new() -> Self {
        Receiver
    }

    #[entry]
    fn block(&mut self) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !SENT.load(std::sync::atomic::Ordering::Acquire) && std::time::Instant::now() < until
        {
            std::hint::spin_loop();
        }
    }

    #[entry]
    fn record(&mut self, p: i32) {
        CROSS_PRIO.lock().unwrap().push(p);
    }

    #[entry]
    fn finish(&mut self) {
        charmrs::exit(0);
    }
}

struct PrioSender;

#[chare]
impl PrioSender {
    fn new() -> Self {
        PrioSender
    }

    #[entry]
    fn send_all(&mut self, to: ElementProxy<Receiver>) {
        for p in [5, 0, -7, 3, -100] {
            to.with_priority(p).record(p);
        }
        to.with_priority(1000).finish();
        SENT.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Priorities order messages from another PE too (waiting in the PE's mailbox while it was
/// busy). Before, a PE took one mailbox arrival per turn and ran it: arrival order.
#[test]
fn priorities_order_messages_from_another_pe() {
    run_job(2, |_| async {
        let receiver = Single::<Receiver>::new((), Some(0));
        let sender = Single::<PrioSender>::new((), Some(1));
        receiver.block();
        sender.send_all(*receiver);
    })
    .unwrap();
    assert_eq!(*CROSS_PRIO.lock().unwrap(), vec![-100, -7, 0, 3, 5]);
}

#[test]
fn runtime_info_inside_a_job() {
    let code = run_job(3, |args| async move {
        assert_eq!(args, vec!["charmrs".to_string()]);
        assert_eq!(charmrs::my_pe(), 0);
        assert_eq!(charmrs::num_pes(), 3);
        assert_eq!(charmrs::my_node(), 0);
        assert_eq!(charmrs::num_nodes(), 1);
        assert!(charmrs::in_runtime());
        charmrs::exit(42);
    })
    .unwrap();
    assert_eq!(code, 42);
}

/// Arguments named like the names the generated code uses for itself.
struct Namesake {
    seen: Vec<u64>,
}

#[chare]
impl Namesake {
    fn new(init: u64, ctx: u64, args: u64) -> Self {
        Namesake {
            seen: vec![init, ctx, args],
        }
    }

    #[entry]
    fn plain(&mut self, chare: u64, this: u64, ctx: u64, args: u64) {
        self.seen.extend([chare, this, ctx, args]);
    }

    #[entry]
    fn with_ctx(&mut self, ctx: &Ctx<Self>, chare: u64) -> (usize, u64) {
        (ctx.my_pe(), chare)
    }

    #[entry]
    async fn suspending(this: Coro<Self>, chare: u64, ctx: u64) -> Vec<u64> {
        charmrs::sleep(std::time::Duration::from_millis(1)).await;
        this.with(|s, _| {
            s.seen.extend([chare, ctx]);
            s.seen.clone()
        })
    }
}

#[test]
fn arguments_may_be_named_like_the_generated_codes_own_names() {
    run_job(2, |_| async {
        let n = Single::<Namesake>::new((1, 2, 3), Some(1));
        n.plain(4, 5, 6, 7);
        assert_eq!(n.ret().with_ctx(8).await, (1, 8));
        assert_eq!(
            n.ret().suspending(9, 10).await,
            [1, 2, 3, 4, 5, 6, 7, 9, 10]
        );
        charmrs::exit(0);
    })
    .unwrap();
}
