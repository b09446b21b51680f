//! Checks used by the multi-process tests (not one of the paper's programs). Modes:
//! - `panic`: an entry method panics on the last PE (the job must abort, naming it);
//! - `hang`: every PE stays busy forever (a test kills one process and watches the rest);
//! - `features`: exercises results, gathers, reductions, a multi-value future, a readonly,
//!   allreduce, `when`, quiescence detection, nested pool tasks and large buffers (heap and
//!   huge-page ones, sliced at odd offsets) across processes, printing one `ok …` line per
//!   feature;
//! - `hosts`: prints the job's hosts and their PEs (`host 0: [0, 1]`), checked against what
//!   every PE says of itself;
//! - `mobility` (run with `+balancer Rotate`): random migrations under heavy messaging, a sparse
//!   array with a map inserted from every PE, an AtSync step that moves every element to the
//!   next PE, and broadcast results from elements away from home — all across processes;
//! - `idle`: prints the CPU time (clock ticks) the last PE's process uses while every PE of the
//!   job has nothing to do for 600 ms (the last PE awaits a timer);
//! - `baddecode`: sends the last PE an argument whose `Deserialize` panics (it runs on the
//!   receiving process's network PE, outside any entry method: the job must abort, naming the
//!   sending process, not hang);
//! - `badtarget`: the PEs of the first process contribute to one future, those of the others
//!   to another, in one reduction: the job must abort naming both targets, not hang (the
//!   partials meet encoded, from another process).

use charmrs::prelude::*;
use charmrs::{pool, Buffer, BufferMut, PodVec, Reducer};
use std::time::Duration;

/// An argument that serializes fine and panics when deserialized.
#[derive(Clone)]
struct Fragile;

impl serde::Serialize for Fragile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(0)
    }
}

impl<'de> serde::Deserialize<'de> for Fragile {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("Fragile refuses to be deserialized")
    }
}

/// One element per PE (or of an array).
struct Victim {
    iter: u32,
    hops: u64,
}

#[chare]
impl Victim {
    fn new() -> Self {
        Victim { iter: 0, hops: 0 }
    }

    /// Contributes 1 for `first` on the first half of the PEs, for `second` on the others (a
    /// misuse: see `badtarget`).
    #[entry]
    fn split_targets(&mut self, ctx: &Ctx<Self>, first: Future<u64>, second: Future<u64>) {
        let target = if ctx.my_pe() < ctx.num_pes() / 2 {
            first
        } else {
            second
        };
        ctx.contribute(1u64, Reducer::Sum, target);
    }

    /// Panics on the last PE.
    #[entry]
    fn fail(&mut self, ctx: &Ctx<Self>) {
        if ctx.my_pe() + 1 == ctx.num_pes() {
            panic!("injected failure");
        }
    }

    /// Keeps its PE busy for `ms` milliseconds.
    #[entry]
    fn busy(&mut self, ms: u64) {
        let until = std::time::Instant::now() + Duration::from_millis(ms);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    /// Says it started (to `started`), then keeps its PE busy for `ms` milliseconds.
    #[entry]
    fn busy_announced(&mut self, ms: u64, started: Future<()>) {
        started.send(());
        self.busy(ms);
    }

    /// Ends the job (called on every PE at once: every process ends it together).
    #[entry]
    fn exit_now(&mut self) {
        charmrs::exit(0);
    }

    /// Never returns (but lets its PE run other messages). With `MPCHECK_RUNNING_DIR` set, it
    /// first creates `pe<n>` there, so a test can tell the job is past its start-up.
    #[entry]
    async fn hang(_this: Coro<Self>) {
        mark_running();
        loop {
            charmrs::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The PEs of the first half of the job send 256 KiB buffers to their mirror in the second
    /// half ([`absorb`](Victim::absorb)), for ever, faster than any network carries them: data
    /// to the second half is always in flight. Each PE first marks it runs, as
    /// [`hang`](Victim::hang) does.
    #[entry]
    async fn flood(this: Coro<Self>) {
        let (me, half) = (charmrs::my_pe(), charmrs::num_pes() / 2);
        mark_running();
        if me >= half {
            return;
        }
        let mirror = this.ctx().this_proxy().at(me + half);
        let buffer = Buffer::from(vec![me as u8; 256 << 10]);
        loop {
            for _ in 0..16 {
                mirror.absorb(buffer.clone());
            }
            charmrs::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Takes a buffer of [`flood`](Victim::flood).
    #[entry]
    fn absorb(&mut self, data: Buffer) {
        self.hops += data.0.len() as u64;
    }

    /// CPU time (clock ticks) this process uses while this PE awaits a timer for `ms`.
    #[entry]
    async fn idle_cpu(_this: Coro<Self>, ms: u64) -> u64 {
        let before = process_cpu_ticks();
        charmrs::sleep(Duration::from_millis(ms)).await;
        process_cpu_ticks() - before
    }

    /// Where this element lives.
    #[entry]
    fn where_am_i(&mut self, ctx: &Ctx<Self>) -> (usize, usize, usize) {
        (ctx.my_pe(), charmrs::my_node(), charmrs::my_rank())
    }

    /// Several allreduces in a row.
    #[entry]
    async fn allreduce_rounds(this: Coro<Self>, rounds: u64) -> u64 {
        let mut last = 0;
        for r in 0..rounds {
            last = this.ctx().allreduce(r + 1, Reducer::Sum).await;
        }
        last
    }

    /// A sum to a future.
    #[entry]
    fn sum_to(&mut self, ctx: &Ctx<Self>, done: Future<Vec<f64>>) {
        ctx.contribute(vec![ctx.my_pe() as f64, 1.0], Reducer::Sum, done);
    }

    /// A large vector summed over every PE with `PodVec`'s built-in reduction (one byte string a
    /// partial between processes): each PE checks the allreduced result; also a sum to `done`.
    #[entry]
    async fn podvec_sums(this: Coro<Self>, len: usize, done: Future<PodVec<u64>>) -> bool {
        let (me, p) = (this.ctx().my_pe(), this.ctx().num_pes());
        let mine: PodVec<f64> = (0..len).map(|i| (i * (me + 1)) as f64).collect();
        let total = this.ctx().allreduce(mine, Reducer::Sum).await;
        let weight = p * (p + 1) / 2;
        let right = total.len() == len
            && total
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i * weight) as f64);
        let ids: PodVec<u64> = (0..len as u64).map(|i| i ^ me as u64).collect();
        this.ctx().contribute(ids, Reducer::BitXor, done);
        right
    }

    /// One value of a multi-value future: this PE, and a vector above every layer's eager limit
    /// (256 KiB) that travels as a segment of its own.
    #[entry]
    fn send_place(&mut self, ctx: &Ctx<Self>, to: Future<(usize, PodVec<f64>)>) {
        let me = ctx.my_pe();
        to.send((me, (0..1 << 15).map(|i| (i + me) as f64).collect()));
    }

    /// This PE, its host as it sees it, and its host and host rank as `pe_host` says.
    #[entry]
    fn my_host(&mut self, ctx: &Ctx<Self>) -> (usize, usize, (usize, usize)) {
        let me = ctx.my_pe();
        (me, charmrs::my_host(), charmrs::pe_host(me).expect("a PE"))
    }

    /// The readonly [`TAG`] as this PE's process has it.
    #[entry]
    fn read_tag(&mut self) -> (u64, String) {
        TAG.get().clone()
    }

    /// Steps that must arrive in order.
    #[entry(when = "self.iter == iter")]
    fn step(&mut self, iter: u32) {
        assert_eq!(self.iter, iter, "delivered out of order");
        self.iter += 1;
    }

    #[entry]
    fn iteration(&mut self) -> u32 {
        self.iter
    }

    /// A message cascade hopping across PEs.
    #[entry]
    fn hop(&mut self, ctx: &Ctx<Self>, left: u32) {
        self.hops += 1;
        if left > 0 {
            let next = (ctx.index::<usize>() * 7 + 3) % ctx.num_pes();
            ctx.this_group().at(next).hop(left - 1);
        }
    }

    #[entry]
    fn hops(&mut self) -> u64 {
        self.hops
    }

    /// Never runs: its argument cannot be deserialized (see `baddecode`).
    #[entry]
    fn take_fragile(&mut self, _data: Fragile) {
        unreachable!("a Fragile was deserialized");
    }

    /// Checks that `data` holds [`pattern`]`(seed, …)`; returns its length.
    #[entry]
    fn take_buffer(&mut self, ctx: &Ctx<Self>, data: Buffer, seed: u64) -> usize {
        if let Some(i) = (0..data.0.len()).find(|&i| data.0[i] != pattern(seed, i)) {
            panic!(
                "PE {}: buffer {seed} of {} bytes differs at byte {i}",
                ctx.my_pe(),
                data.0.len()
            );
        }
        data.0.len()
    }

    /// Checks that `data` holds [`float_pattern`]`(seed, …)`, and was read in place from the
    /// received message if `in_place`; returns its length.
    #[entry]
    fn take_floats(
        &mut self,
        ctx: &Ctx<Self>,
        data: PodVec<f64>,
        seed: u64,
        in_place: bool,
    ) -> usize {
        assert!(
            !in_place || data.is_received_in_place(),
            "PE {}: vector {seed} of {} numbers was copied on receipt",
            ctx.my_pe(),
            data.len()
        );
        if let Some(i) = (0..data.len()).find(|&i| data[i] != float_pattern(seed, i)) {
            panic!(
                "PE {}: vector {seed} of {} numbers differs at element {i}",
                ctx.my_pe(),
                data.len()
            );
        }
        data.len()
    }

    /// Test vector `seed + this PE` of `len` numbers, as a reply (a future's value).
    #[entry]
    fn give_floats(&mut self, ctx: &Ctx<Self>, seed: u64, len: usize) -> PodVec<f64> {
        let seed = seed + ctx.my_pe() as u64;
        PodVec::from((0..len).map(|i| float_pattern(seed, i)).collect::<Vec<_>>())
    }

    /// Test vectors `seed + k` (`k < count`) of `len` numbers each, in one reply.
    #[entry]
    fn give_many(&mut self, seed: u64, count: usize, len: usize) -> Vec<PodVec<f64>> {
        let one = |k: u64| {
            PodVec::from(
                (0..len)
                    .map(|i| float_pattern(seed + k, i))
                    .collect::<Vec<_>>(),
            )
        };
        (0..count as u64).map(one).collect()
    }
}

/// Checks that `v` is [`float_pattern`]`(seed, …)` of `len` numbers, read in place from the
/// received message if `in_place`.
fn check_floats(v: &PodVec<f64>, seed: u64, len: usize, in_place: bool, what: &str) {
    assert_eq!(v.len(), len, "{what}: length");
    assert!(
        !in_place || v.is_received_in_place(),
        "{what}: {len} numbers were copied on receipt"
    );
    if let Some(i) = (0..len).find(|&i| v[i] != float_pattern(seed, i)) {
        panic!("{what}: differs at element {i}");
    }
}

/// Element `i` of test vector `seed`.
fn float_pattern(seed: u64, i: usize) -> f64 {
    (mix(seed ^ i as u64) >> 11) as f64 * 0.5
}

/// Byte `i` of test buffer `seed`.
fn pattern(seed: u64, i: usize) -> u8 {
    (mix(seed ^ (i as u64 / 8)) >> (8 * (i % 8))) as u8
}

/// Sends every PE buffers of sizes that take each path of the layers (inline in the arguments,
/// eager, split rendezvous, pipelined rendezvous), made on the heap and with `BufferMut` (huge
/// pages from 1 MiB), each a slice starting at an odd offset, and `PodVec<f64>`s of such sizes;
/// every PE checks every byte and number.
async fn large_buffers(group: &Group<Victim>) {
    let sizes = [200, 300, 65_536 + 13, 1 << 20, (3 << 20) + 7];
    let mut replies = Vec::new();
    for pe in 0..charmrs::num_pes() {
        for (k, &len) in sizes.iter().enumerate() {
            for huge in [false, true] {
                let seed = (pe * 100 + k * 10 + usize::from(huge)) as u64;
                let fill = |bytes: &mut [u8]| {
                    for (i, b) in bytes[5..].iter_mut().enumerate() {
                        *b = pattern(seed, i);
                    }
                };
                let whole = if huge {
                    let mut buf = BufferMut::for_overwrite(len + 5);
                    assert_eq!(buf.on_huge_pages(), len + 5 >= charmrs::HUGE_FROM);
                    fill(&mut buf);
                    buf.freeze()
                } else {
                    let mut v = vec![0; len + 5];
                    fill(&mut v);
                    Buffer::from(v)
                };
                let data = whole.slice(5..);
                replies.push((len, group.at(pe).ret().take_buffer(data, seed)));
            }
        }
    }
    for (len, reply) in replies {
        assert_eq!(reply.await, len);
    }
    // Vectors of numbers: inline, eager, split and pipelined rendezvous sizes. From 1 MiB every
    // layer lands them aligned, so a PE of another process reads them in place.
    let mut replies = Vec::new();
    let per_process = charmrs::num_pes() / charmrs::num_nodes();
    for pe in 0..charmrs::num_pes() {
        let remote = pe / per_process != charmrs::my_node();
        for (k, len) in [20, 8_193, (1 << 17) + 3, (3 << 17) + 1]
            .into_iter()
            .enumerate()
        {
            let seed = (pe * 100 + k) as u64;
            let v: Vec<f64> = (0..len).map(|i| float_pattern(seed, i)).collect();
            let in_place = remote && len >= 1 << 17;
            let reply = group
                .at(pe)
                .ret()
                .take_floats(PodVec::from(v), seed, in_place);
            replies.push((len, reply));
        }
    }
    for (len, reply) in replies {
        assert_eq!(reply.await, len);
    }
    // The same vectors the other way, as futures' values: large ones from another process are
    // read in place too (their bytes are segments of the reply, not copied into it).
    let mut replies = Vec::new();
    for pe in 0..charmrs::num_pes() {
        let remote = pe / per_process != charmrs::my_node();
        for len in [20, 8_193, (1 << 17) + 3, (3 << 17) + 1] {
            let seed = (pe * 1000 + len) as u64;
            let reply = group.at(pe).ret().give_floats(seed, len);
            replies.push((pe, seed + pe as u64, len, remote && len >= 1 << 17, reply));
        }
    }
    for (pe, seed, len, in_place, reply) in replies {
        check_floats(
            &reply.await,
            seed,
            len,
            in_place,
            &format!("reply from PE {pe}"),
        );
    }
    // Gathered from every PE (a partial result per PE of another process), each PE's its own.
    let len = (1 << 17) + 3;
    let gathered = group.gather().give_floats(7, len).await;
    assert_eq!(gathered.len(), charmrs::num_pes());
    for (pe, v) in gathered.iter().enumerate() {
        let remote = pe / per_process != charmrs::my_node();
        let what = format!("gathered from PE {pe}");
        check_floats(v, 7 + pe as u64, len, remote, &what);
    }
    // More large vectors in one value than a message has segments: still delivered (encoded
    // whole).
    let last = charmrs::num_pes() - 1;
    let many = group.at(last).ret().give_many(11, 300, 64).await;
    assert_eq!(many.len(), 300);
    for (k, v) in many.iter().enumerate() {
        check_floats(v, 11 + k as u64, 64, false, &format!("vector {k} of 300"));
    }
}

/// `x + 1` for `x` in `0..3 * pes`, one item a chunk, so that chunks run on every PE.
async fn plus_one_everywhere(pes: usize) -> Vec<u64> {
    #[charmrs::task]
    fn plus_one(x: u64) -> u64 {
        x + 1
    }
    let opts = charmrs::MapOptions {
        chunk: 1,
        max_pes: None,
    };
    pool()
        .map_async(plus_one, (0..3 * pes as u64).collect(), opts)
        .await
}

/// Parallel Fibonacci with nested tasks.
#[charmrs::task]
async fn fib(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    let (a, b) = (pool().task(fib, n - 1), pool().task(fib, n - 2));
    a.await + b.await
}

/// Prints the job's hosts and their PEs, after checking that every PE agrees on its own.
async fn hosts() {
    let n = charmrs::num_hosts();
    println!("hosts {n}");
    for h in 0..n {
        println!("host {h}: {:?}", charmrs::host_pes(h).expect("a host"));
    }
    for (pe, seen, (host, rank)) in Group::<Victim>::new(()).gather().my_host().await {
        assert_eq!(
            seen, host,
            "PE {pe} sees itself on host {seen}, pe_host says {host}"
        );
        assert_eq!(charmrs::host_pes(host).expect("a host")[rank], pe);
    }
    assert!(charmrs::host_pes(n).is_err());
    println!("ok hosts");
    charmrs::exit(0);
}

charmrs::readonly! {
    /// Set by `features`' entry point, read by every PE.
    static TAG: (u64, String);
}

async fn features() {
    let p = charmrs::num_pes();
    let group = Group::<Victim>::new(());
    let places = group.gather().where_am_i().await;
    assert_eq!(places.len(), p);
    assert!(places.iter().enumerate().all(|(i, (pe, _, _))| *pe == i));
    // Every PE's node and rank, as it sees them, are what `pe_node` and `node_pes` say here.
    for &(pe, node, rank) in &places {
        assert_eq!(charmrs::pe_node(pe).expect("a PE"), (node, rank), "PE {pe}");
        assert_eq!(charmrs::node_pes(node).expect("a node").nth(rank), Some(pe));
    }
    println!("ok placement over {} processes", charmrs::num_nodes());
    let sum = Future::new();
    group.sum_to(sum);
    let s = sum.await;
    assert_eq!(s, vec![(p * (p - 1) / 2) as f64, p as f64]);
    // 64 Ki elements: 512 KiB partials, above every layer's eager limit.
    let len = 1 << 16;
    let xored = Future::new();
    let rights = group.gather().podvec_sums(len, xored).await;
    assert!(
        rights.iter().all(|r| *r),
        "PodVec allreduce wrong on some PE: {rights:?}"
    );
    let pes_xor = (0..p as u64).fold(0, |a, b| a ^ b);
    let expected_xor = (0..len as u64).map(|i| {
        if p.is_multiple_of(2) {
            pes_xor
        } else {
            i ^ pes_xor
        }
    });
    assert!(
        xored.await.iter().copied().eq(expected_xor),
        "PodVec xor wrong"
    );
    println!("ok reduction");
    // charm4py's Future(num_vals=n): one value from every PE, most from other processes.
    let places = MultiFuture::<(usize, PodVec<f64>)>::new(p);
    group.send_place(places.sender());
    let mut places = places.await;
    places.sort_by_key(|(pe, _)| *pe);
    assert!(
        places.iter().enumerate().all(|(i, (pe, v))| *pe == i
            && v.len() == 1 << 15
            && v.iter().enumerate().all(|(j, &x)| x == (j + i) as f64)),
        "multi-value future: wrong values from {:?}",
        places
            .iter()
            .map(|(pe, v)| (*pe, v.len()))
            .collect::<Vec<_>>()
    );
    println!("ok multi-value future");
    // Set twice: the second value replaces the first in every process.
    for round in 1..=2u64 {
        let want = (7 * p as u64 + round, format!("set on PE 0, round {round}"));
        TAG.set(want.clone()).await;
        let tags = group.gather().read_tag().await;
        assert!(
            tags.iter().all(|t| *t == want),
            "readonly round {round}: {tags:?}"
        );
    }
    println!("ok readonly");
    let totals = group.gather().allreduce_rounds(20).await;
    assert!(totals.iter().all(|&t| t == 20 * p as u64));
    println!("ok allreduce");
    let last = group.at(p - 1);
    for i in (0..50).rev() {
        last.step(i);
    }
    assert_eq!(last.ret().iteration().await, 50);
    println!("ok when");
    for i in 0..p {
        group.at(i).hop(40);
    }
    charmrs::wait_qd().await;
    let hops: u64 = group.gather().hops().await.into_iter().sum();
    assert_eq!(hops, 41 * p as u64);
    println!("ok quiescence");
    assert_eq!(pool().task(fib, 12).await, 144);
    // A task function declared inside a function (its registration is told apart from others
    // of its name by its full path, which every message of the job names it by).
    assert_eq!(
        plus_one_everywhere(p).await,
        (1..=p as u64 * 3).collect::<Vec<_>>()
    );
    println!("ok pool");
    large_buffers(&group).await;
    println!("ok large buffers");
    charmrs::exit(0);
}

/// SplitMix64.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const WANDERERS: usize = 24;
const MESSAGES_EACH: u64 = 400;

// Sparse homes: the last coordinate, modulo the PEs.
charmrs::array_map!(BY_LAST = |index, pes| index.get(index.dims() - 1) % pes);

/// Talks to its neighbours through channels, across processes, moving as it goes.
#[derive(serde::Serialize, serde::Deserialize)]
struct Relay;

#[chare(migratable)]
impl Relay {
    fn new() -> Self {
        Relay
    }

    /// Passes a counter around the ring of `n` elements `rounds` times; element 0 returns it.
    #[entry]
    async fn ring(this: Coro<Self>, n: usize, rounds: u64) -> u64 {
        let me: usize = this.ctx().index();
        let array = this.ctx().this_proxy();
        let right = this.channel(&array.at((me + 1) % n));
        let left = this.channel(&array.at((me + n - 1) % n));
        let mut value = 0u64;
        for _ in 0..rounds {
            if me == 0 {
                right.send(value + 1);
                value = left.recv::<u64>().await;
            } else {
                value = left.recv::<u64>().await;
                right.send(value + 1);
            }
        }
        value
    }

    /// Sends values `from..count` to element `to`, then a vector of floats, moving to the next
    /// PE (another process, every other time) after every 5 values.
    #[entry]
    async fn stream(this: Coro<Self>, to: usize, from: u64, count: u64) {
        let out = this.channel(&this.ctx().this_proxy().at(to));
        for k in from..count {
            out.send(k);
            if k % 5 == 4 && k + 1 < count {
                let next = (this.ctx().my_pe() + 1) % charmrs::num_pes();
                this.ctx().migrate(next).unwrap();
                this.ctx().this_element().stream(to, k + 1, count);
                return;
            }
        }
        out.send(PodVec::from(vec![0.25f64; 100_000]));
    }

    /// Sends values `0..count` to element `to`, then a vector of floats, without moving.
    #[entry]
    async fn push(this: Coro<Self>, to: usize, count: u64) {
        let out = this.channel(&this.ctx().this_proxy().at(to));
        for k in 0..count {
            out.send(k);
        }
        out.send(PodVec::from(vec![0.25f64; 100_000]));
    }

    #[entry]
    fn go_to(&mut self, ctx: &Ctx<Self>, pe: usize) {
        ctx.migrate(pe).unwrap();
    }

    /// Receives what [`stream`](Relay::stream) sends, checking the order; returns the sum of
    /// the floats.
    #[entry]
    async fn drain(this: Coro<Self>, from: usize, count: u64) -> f64 {
        let input = this.channel(&this.ctx().this_proxy().at(from));
        for k in 0..count {
            assert_eq!(input.recv::<u64>().await, k, "channel values in order");
        }
        input.recv::<PodVec<f64>>().await.iter().sum()
    }
}

/// Hears reduction results, which must come in reduction order.
struct Tally {
    next: u64,
    rounds: u64,
    elements: u64,
    done: Option<Future<u64>>,
}

#[chare]
impl Tally {
    fn new(rounds: u64, elements: u64, done: Future<u64>) -> Self {
        Tally {
            next: 0,
            rounds,
            elements,
            done: Some(done),
        }
    }

    /// Result of reduction `self.next`: every element contributed its round number.
    #[entry]
    fn heard(&mut self, sum: u64) {
        assert_eq!(
            sum,
            self.next * self.elements,
            "reduction {} delivered out of order",
            self.next
        );
        self.next += 1;
        if self.next == self.rounds {
            self.done.take().expect("one completion").send(self.next);
        }
    }
}

/// A migratable element that moves when asked and says where it arrived.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hopper {
    arrived: Option<Future<usize>>,
}

#[chare(migratable)]
impl Hopper {
    fn new() -> Self {
        Hopper { arrived: None }
    }

    fn migrated(&mut self, ctx: &Ctx<Self>) {
        if let Some(told) = self.arrived.take() {
            told.send(ctx.my_pe());
        }
    }

    /// Moves to PE `pe` once this call returns, then sends its new PE to `arrived`.
    #[entry]
    fn hop(&mut self, ctx: &Ctx<Self>, pe: usize, arrived: Future<usize>) {
        self.arrived = Some(arrived);
        ctx.migrate(pe).unwrap();
    }
}

/// A migratable element that counts what it receives and moves now and then.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wanderer {
    received: u64,
    id_sum: u64,
    built_on: usize,
    synced_on: usize,
}

#[chare(migratable)]
impl Wanderer {
    fn new(ctx: &Ctx<Self>) -> Self {
        Wanderer {
            received: 0,
            id_sum: 0,
            built_on: ctx.my_pe(),
            synced_on: usize::MAX,
        }
    }

    #[entry]
    fn start(&mut self, ctx: &Ctx<Self>) {
        let me = ctx.raw_index().get(0) as u64;
        let array = ctx.this_proxy();
        for k in 0..MESSAGES_EACH {
            let id = me << 32 | k;
            let to = (mix(id) % WANDERERS as u64) as usize;
            array.at(to).take(id);
        }
    }

    #[entry]
    fn take(&mut self, ctx: &Ctx<Self>, id: u64) {
        self.received += 1;
        self.id_sum = self.id_sum.wrapping_add(id);
        let r = mix(id ^ 0xabc);
        if r.is_multiple_of(53) {
            ctx.migrate((r >> 8) as usize % ctx.num_pes()).unwrap();
        }
    }

    #[entry]
    fn report(&mut self, ctx: &Ctx<Self>, to: Future<Vec<(u64, u64)>>) {
        ctx.gather((self.received, self.id_sum), to);
    }

    #[entry]
    fn sync(&mut self, ctx: &Ctx<Self>, resumed: Future<()>) {
        self.synced_on = ctx.my_pe();
        ctx.at_sync(resumed);
    }

    /// Counts the elements with an allreduce; gathers what each element got.
    #[entry]
    async fn count_everyone(this: Coro<Self>, to: Future<Vec<u64>>) {
        let n = this.ctx().allreduce(1u64, Reducer::Sum).await;
        this.ctx().gather(n, to);
    }

    /// Moves to PE `pe`.
    #[entry]
    fn go_to(&mut self, ctx: &Ctx<Self>, pe: usize) {
        ctx.migrate(pe).unwrap();
    }

    /// Sums the members' indices over `section`, `rounds` times by allreduce, then once into
    /// `sum`.
    #[entry]
    async fn sum_section(
        this: Coro<Self>,
        section: Section<Wanderer>,
        rounds: u32,
        sum: Future<u64>,
    ) {
        let me: usize = this.ctx().index();
        for _ in 0..rounds {
            this.ctx()
                .section(&section)
                .allreduce(me as u64, Reducer::Sum)
                .await;
        }
        this.ctx()
            .section(&section)
            .contribute(me as u64, Reducer::Sum, sum);
    }

    /// Contributes `round` to `to` (a callback that came in the call), moves on to the next PE and contributes the next round from
    /// there, `rounds` times: an element's consecutive contributions leave from different PEs,
    /// over different channels, and may reach the reduction's root in either order.
    #[entry]
    fn contribute_and_hop(
        &mut self,
        ctx: &Ctx<Self>,
        round: u64,
        rounds: u64,
        to: charmrs::Callback<(u64,)>,
    ) {
        ctx.contribute(round, Reducer::Sum, to);
        if round + 1 < rounds {
            ctx.this_element().contribute_and_hop(round + 1, rounds, to);
            ctx.migrate((ctx.my_pe() + 1) % charmrs::num_pes()).unwrap();
        }
    }

    /// The PE this element runs on (a broadcast's result).
    #[entry]
    fn pe_now(&mut self, ctx: &Ctx<Self>) -> usize {
        ctx.my_pe()
    }

    #[entry]
    fn moved(&mut self, ctx: &Ctx<Self>, to: Future<Vec<(usize, usize)>>) {
        ctx.gather((self.synced_on, ctx.my_pe()), to);
    }

    #[entry]
    fn built(&mut self, ctx: &Ctx<Self>, to: Future<Vec<(usize, usize)>>) {
        ctx.gather((self.built_on, ctx.raw_index().get(1)), to);
    }
}

/// One AtSync step of every element of `a`; returns each element's (PE before, PE after).
async fn balance_step(a: &Array<Wanderer, usize>) -> Vec<(usize, usize)> {
    let resumed = Future::new();
    a.sync(resumed);
    resumed.await;
    let moved = Future::new();
    a.moved(moved);
    moved.await
}

async fn mobility() {
    let p = charmrs::num_pes();
    let a = Array::<Wanderer, usize>::new(WANDERERS, ());
    a.start();
    charmrs::wait_qd().await;
    let got = Future::new();
    a.report(got);
    let got = got.await;
    let mut want = vec![(0u64, 0u64); WANDERERS];
    for s in 0..WANDERERS as u64 {
        for k in 0..MESSAGES_EACH {
            let id = s << 32 | k;
            let t = (mix(id) % WANDERERS as u64) as usize;
            want[t].0 += 1;
            want[t].1 = want[t].1.wrapping_add(id);
        }
    }
    assert_eq!(got, want);
    println!("ok migration");

    let sparse = Array::<Wanderer, (usize, usize)>::new_sparse(Some(&BY_LAST));
    for k in 0..40usize {
        sparse.insert((k % 7, k), (), None);
    }
    sparse.done_inserting().await;
    let built = Future::new();
    sparse.built(built);
    let built = built.await;
    assert_eq!(built.len(), 40);
    assert!(built.iter().all(|&(pe, last)| pe == last % p), "{built:?}");
    println!("ok sparse");

    let moved = balance_step(&a).await;
    assert!(
        moved.iter().all(|&(before, now)| now == (before + 1) % p),
        "Rotate moves every element to the next PE: {moved:?}"
    );
    let got = Future::new();
    a.report(got);
    assert_eq!(got.await, want, "state survived the moves");
    println!("ok load balancing");
    // Every element is away from its home PE now: a broadcast's results come back from where
    // the elements are (through their homes' forwards, across processes).
    let now = a.gather().pe_now().await;
    let want_now: Vec<usize> = moved.iter().map(|&(_, now)| now).collect();
    assert_eq!(now, want_now, "one result per element, from where it is");
    a.ret().pe_now().await;
    println!("ok results from away");

    // Every element leaves for the last PE: the processes of the reduction's root hold none of
    // them, so the load-balancing step is finished where the contributions came from.
    a.go_to(p - 1);
    charmrs::wait_qd().await;
    // An allreduce whose tree root (PE 0's process) has no contributor left: finished where the
    // contributions came from, passed down from the root as bytes.
    let counts = Future::new();
    a.count_everyone(counts);
    assert_eq!(counts.await, vec![WANDERERS as u64; WANDERERS]);
    println!("ok allreduce from elsewhere");
    let moved = balance_step(&a).await;
    assert!(
        moved
            .iter()
            .all(|&(before, now)| before == p - 1 && now == 0),
        "Rotate moves every element from the last PE to PE 0: {moved:?}"
    );
    println!("ok load balancing from elsewhere");
    // An allreduce contributor on a PE that is home to none of the array's elements, in another
    // process: outside the reduction tree, it gets the result through its home.
    let lone = Array::<Wanderer, usize>::new(1, ());
    lone.go_to(p - 1);
    charmrs::wait_qd().await;
    let counts = Future::new();
    lone.count_everyone(counts);
    assert_eq!(counts.await, vec![1u64]);
    println!("ok allreduce outside the tree");
    // Reductions reach their target in order, however an element's contributions travel.
    const ROUNDS: u64 = 60;
    let done = Future::new();
    let tally = Single::<Tally>::new((ROUNDS, WANDERERS as u64, done), Some(0));
    a.contribute_and_hop(0, ROUNDS, tally.heard_callback());
    assert_eq!(done.await, ROUNDS);
    println!("ok reductions in order");
    // Channels between elements in different processes, one of them moving across processes.
    let relays = Array::<Relay, usize>::new(p, ());
    let counts = relays.gather().ring(p, 40).await;
    assert_eq!(counts[0], 40 * p as u64);
    let sum = relays.at(p - 1).ret().drain(0, 60);
    relays.at(0usize).stream(p - 1, 0, 60);
    assert_eq!(sum.await, 25_000.0);
    // Values wait, unreceived, at an element that then moves to another process: they travel
    // with it (the vector's buffer too) and are received there.
    relays.at(1usize).push(p - 1, 30);
    charmrs::wait_qd().await;
    relays.at(p - 1).go_to(0);
    charmrs::wait_qd().await;
    assert_eq!(relays.at(p - 1).ret().drain(1, 30).await, 25_000.0);
    println!("ok channels");
    // A section of the wanderers (spread over the processes by the moves above): a call reaches
    // its members only; their reductions count them only.
    let thirds = a.section((0..WANDERERS).step_by(3));
    let sum = Future::new();
    thirds.sum_section(thirds.clone(), 5, sum);
    let want: u64 = (0..WANDERERS as u64).step_by(3).sum();
    assert_eq!(sum.await, want);
    println!("ok sections");
    // Calls through the section travel down its multicast tree, across processes; members
    // that move meanwhile (`take` moves some) still get every call exactly once.
    let report = || async {
        let f = Future::new();
        a.report(f);
        f.await
    };
    let before = report().await;
    for k in 0..40u64 {
        thirds.take(1 << 40 | k);
    }
    charmrs::wait_qd().await;
    let after = report().await;
    for (i, (b, n)) in before.iter().zip(&after).enumerate() {
        let want = if i % 3 == 0 { 40 } else { 0 };
        assert_eq!(n.0 - b.0, want, "element {i}");
    }
    println!("ok section multicast");
    // A section over two arrays (`Section::combine`), passed in the call across processes: one
    // multicast tree per array, one reduction over the members of both.
    let few = Array::<Wanderer, usize>::new(5, ());
    let both = Section::combine([thirds.clone(), few.section([1usize, 4])]);
    let sum = Future::new();
    both.sum_section(both.clone(), 3, sum);
    assert_eq!(sum.await, want + 1 + 4);
    println!("ok combined section");
    // More elements away from their homes than a message has segments (256): every element of
    // this array lives on the last PE, so the processes home to the others forward one encoded
    // contribution per element up the tree.
    const CROWD: usize = 600;
    let crowd = Array::<Wanderer, usize>::new(CROWD, ());
    crowd.go_to(p - 1);
    charmrs::wait_qd().await;
    let counts = Future::new();
    crowd.count_everyone(counts);
    assert_eq!(counts.await, vec![CROWD as u64; CROWD]);
    println!("ok reductions of {CROWD} elements away from home");
    // A move asked for inside a small call that the element's PE ran straight from the machine
    // layer's receive buffer (UCX and libfabric lend such calls), with nothing else coming: it
    // runs when that call returns. Before, the PE still held the element there, took it for
    // busy, and the move waited for a next message that never came.
    let hoppers = Array::<Hopper, usize>::new(p, ());
    for i in 1..p {
        let arrived = Future::new();
        hoppers.at(i).hop(0, arrived);
        assert_eq!(arrived.await, 0, "element {i} moved to PE 0");
    }
    println!("ok a move asked for inside a lent call");
    charmrs::exit(0);
}

/// With `MPCHECK_RUNNING_DIR` set, creates `pe<n>` there for the calling PE, so a test can tell
/// the job is past its start-up ([`Victim::hang`], [`Victim::flood`]).
fn mark_running() {
    if let Some(dir) = std::env::var_os("MPCHECK_RUNNING_DIR") {
        let marker = std::path::Path::new(&dir).join(format!("pe{}", charmrs::my_pe()));
        if let Err(e) = std::fs::write(&marker, b"") {
            panic!("cannot create {}: {e}", marker.display());
        }
    }
}

/// User + system CPU time of this process, in clock ticks (`/proc/self/stat`).
fn process_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    // utime and stime are fields 14 and 15, the 12th and 13th after the command name.
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

fn main() {
    charmrs::start(|args| async move {
        match args.get(1).map(String::as_str) {
            Some("panic") => Group::<Victim>::new(()).fail(),
            Some("hang") => {
                println!("hanging on {} PEs", charmrs::num_pes());
                Group::<Victim>::new(()).hang();
            }
            Some("flood") => {
                println!("flooding on {} PEs", charmrs::num_pes());
                Group::<Victim>::new(()).flood();
            }
            Some("features") => features().await,
            Some("hosts") => hosts().await,
            Some("badtarget") => {
                let (first, second) = (Future::<u64>::new(), Future::<u64>::new());
                Group::<Victim>::new(()).split_targets(first, second);
                first.await;
            }
            Some("baddecode") => {
                let group = Group::<Victim>::new(());
                group.at(charmrs::num_pes() - 1).take_fragile(Fragile);
            }
            Some("mobility") => mobility().await,
            Some("exit-everywhere") => Group::<Victim>::new(()).exit_now(),
            Some("exit-while-busy") => {
                // The job ends while the last PE is still in a 3 s entry method.
                let group = Group::<Victim>::new(());
                let last = group.at(charmrs::num_pes() - 1);
                // A round trip first connects the two PEs both ways (UCX and libfabric make
                // connections on first use: a slow one could let the end of the job overtake
                // the call, which would then never run); then the entry says it started.
                last.ret().where_am_i().await;
                let started = Future::new();
                last.busy_announced(3000, started);
                started.await;
                println!("exiting");
                charmrs::exit(0);
            }
            Some("idle") => {
                let last = charmrs::num_pes() - 1;
                let group = Group::<Victim>::new(());
                let ticks = group.at(last).ret().idle_cpu(600).await;
                println!("idle cpu {ticks} ticks");
                charmrs::exit(0);
            }
            _ => charmrs::abort("usage: mpcheck panic|hang|features|hosts|mobility|idle|baddecode"),
        }
    })
}
