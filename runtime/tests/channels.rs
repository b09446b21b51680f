//! Channels (charm4py's `Channel`): values arrive in order, exactly once, between elements of
//! any chare types, through migrations, in the wire format (`+wirecheck`), and a value received as
//! the wrong type aborts the job naming the channel.

mod common;

use charmrs::prelude::*;
use charmrs::PodVec;
use common::{run_job, run_job_with};

/// A ring of elements passing counters through channels.
#[derive(serde::Serialize, serde::Deserialize)]
struct Cell {
    moves: u32,
}

#[chare(migratable)]
impl Cell {
    fn new() -> Self {
        Cell { moves: 0 }
    }

    /// Passes a counter around the ring of `n` elements `rounds` times; element 0 returns the
    /// final count, the others the last value they saw.
    /// Receives from `from` after letting go of the element (which may then move).
    #[entry]
    async fn recv_after_letting_go(this: Coro<Self>, from: ElementProxy<Cell>) -> u64 {
        let ch = this.channel(&from);
        drop(this);
        ch.recv::<u64>().await
    }

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

    /// Sends values `from..count`, numbered, to `to` on port `port`, moving to the next PE
    /// every `move_every` values (0: never) and going on from the new PE in a new call.
    #[entry]
    async fn stream(
        this: Coro<Self>,
        to: ElementProxy<Sink>,
        port: u32,
        from: u64,
        count: u64,
        move_every: u64,
    ) {
        let out = this.channel_on_port(&to, port);
        for k in from..count {
            out.send((port, k));
            if move_every > 0 && k % move_every == move_every - 1 && k + 1 < count {
                let next = (this.ctx().my_pe() + 1) % charmrs::num_pes();
                this.with(|s, _| s.moves += 1);
                this.ctx().migrate(next).unwrap();
                // The move happens once this entry ends: go on in a new one.
                this.ctx()
                    .this_element()
                    .stream(to, port, k + 1, count, move_every);
                return;
            }
        }
    }

    #[entry]
    fn moves(&mut self) -> u32 {
        self.moves
    }

    /// Sends `count` numbered values to element `to` of this array.
    #[entry]
    async fn send_numbers(this: Coro<Self>, to: usize, count: u64) {
        let out = this.channel(&this.ctx().this_proxy().at(to));
        for k in 0..count {
            out.send(k);
        }
    }

    /// Receives `count` numbered values from element `from`, in order; returns their sum.
    #[entry]
    async fn receive_numbers(this: Coro<Self>, from: usize, count: u64) -> u64 {
        let input = this.channel(&this.ctx().this_proxy().at(from));
        let mut sum = 0;
        for k in 0..count {
            assert_eq!(input.recv::<u64>().await, k, "in order");
            sum += k;
        }
        sum
    }

    #[entry]
    fn go_to(&mut self, ctx: &Ctx<Self>, pe: usize) {
        self.moves += 1;
        ctx.migrate(pe).unwrap();
    }

    /// Sends itself a value through a channel to itself and receives it.
    #[entry]
    async fn talk_to_self(this: Coro<Self>) -> String {
        let me = this.ctx().this_element();
        let ch = this.channel(&me);
        ch.send(String::from("self ping"));
        ch.recv::<String>().await
    }
}

/// Receives streams from cells.
struct Sink;

#[chare]
impl Sink {
    fn new() -> Self {
        Sink
    }

    /// Receives `count` values from `from` on each of `ports`, checking their order; returns
    /// how many it received.
    #[entry]
    async fn drain(this: Coro<Self>, from: ElementProxy<Cell>, ports: Vec<u32>, count: u64) -> u64 {
        let channels: Vec<_> = ports
            .iter()
            .map(|&p| this.channel_on_port(&from, p))
            .collect();
        let mut got = 0;
        for k in 0..count {
            for ch in &channels {
                let (port, seq) = ch.recv::<(u32, u64)>().await;
                assert_eq!((port, seq), (ch.port(), k), "in order, on its own port");
                got += 1;
            }
        }
        got
    }

    /// Receives a vector of numbers sent as a `PodVec` (zero-copy segments across processes).
    #[entry]
    async fn sum_floats(this: Coro<Self>, from: ElementProxy<Sender>) -> f64 {
        let ch = this.channel(&from);
        let v = ch.recv::<PodVec<f64>>().await;
        v.iter().sum()
    }

    /// Receives a value as a `u64` whatever was sent.
    #[entry]
    async fn wrong_type(this: Coro<Self>, from: ElementProxy<Sender>) -> u64 {
        this.channel(&from).recv::<u64>().await
    }

    #[entry]
    async fn fuse(this: Coro<Self>, from: ElementProxy<Sender>) -> bool {
        this.channel(&from).recv::<Fuse>().await.0
    }
}

/// A value whose encoding panics when it is `Fuse(true)`.
#[derive(Clone, serde::Deserialize)]
struct Fuse(bool);

impl serde::Serialize for Fuse {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        assert!(!self.0, "a lit fuse cannot be encoded");
        s.serialize_bool(self.0)
    }
}

/// Sends to a sink.
struct Sender;

#[chare]
impl Sender {
    fn new() -> Self {
        Sender
    }

    #[entry]
    async fn floats(this: Coro<Self>, to: ElementProxy<Sink>, n: usize) {
        this.channel(&to).send(PodVec::from(vec![0.5f64; n]));
    }

    #[entry]
    async fn text(this: Coro<Self>, to: ElementProxy<Sink>) {
        this.channel(&to).send(String::from("not a number"));
    }

    /// A `u32`, which postcard encodes as a `u64` would be.
    #[entry]
    async fn small_number(this: Coro<Self>, to: ElementProxy<Sink>) {
        this.channel(&to).send(5u32);
    }

    #[entry]
    async fn fuse(this: Coro<Self>, to: ElementProxy<Sink>, lit: bool) {
        this.channel(&to).send(Fuse(lit));
    }
}

/// A send whose value's encoding panics (to another process) fails its entry without using up
/// a sequence number: the next value on the channel is received. Before, the receiver waited
/// for the number of the value never sent, for ever.
#[test]
fn a_channel_send_whose_encoding_panics_leaves_no_gap() {
    let rt = charmrs::Runtime::new(2).affinity(false).wire_check(true);
    run_job_with(rt, |_| async {
        let sink = Single::<Sink>::new((), Some(1));
        let sender = Single::<Sender>::new((), Some(0));
        let got = sink.ret().fuse(*sender);
        let failed = sender.ret().fuse(*sink, true).result().await;
        assert!(failed.is_err(), "the send of a lit fuse fails");
        sender.fuse(*sink, false);
        assert!(!got.await, "the unlit fuse arrives");
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn a_ring_of_channels_passes_values_in_order() {
    run_job(4, |_| async {
        let n = 6;
        let cells = Array::<Cell, usize>::new(n, ());
        let got: Vec<u64> = cells.gather().ring(n, 50).await;
        // Element 0 sees the counter after it went round 50 times; element k the value before
        // its own increment in the last round.
        assert_eq!(got[0], 50 * n as u64);
        for (k, &v) in got.iter().enumerate().skip(1) {
            assert_eq!(v, 49 * n as u64 + k as u64);
        }
        let cell = cells.at(0usize);
        assert_eq!(cell.ret().talk_to_self().await, "self ping");
        charmrs::exit(0);
    })
    .unwrap();
}

/// Values sent while the sender migrates on every 7th value arrive in order, once each, on
/// three ports at once (the counters travel with the element); in the wire format as well.
#[test]
fn channels_keep_their_order_through_migrations_and_the_wire_format() {
    for wire in [false, true] {
        let rt = charmrs::Runtime::new(4).affinity(false).wire_check(wire);
        run_job_with(rt, |_| async {
            let cells = Array::<Cell, usize>::new(1, ());
            let sink = Single::<Sink>::new((), Some(3));
            let cell = cells.at(0usize);
            let count = 60;
            let drained = sink.ret().drain(cell, vec![0, 1, 2], count);
            for port in 0..3 {
                cell.stream(*sink, port, 0, count, 7);
            }
            assert_eq!(drained.await, 3 * count);
            assert!(cell.ret().moves().await >= 3, "the sender moved");
            charmrs::exit(0);
        })
        .unwrap();
    }
}

#[test]
fn large_vectors_travel_through_channels() {
    let rt = charmrs::Runtime::new(2).affinity(false).wire_check(true);
    run_job_with(rt, |_| async {
        let sink = Single::<Sink>::new((), Some(1));
        let sender = Single::<Sender>::new((), Some(0));
        let sum = sink.ret().sum_floats(*sender);
        sender.floats(*sink, 10_000);
        assert_eq!(sum.await, 5_000.0);
        charmrs::exit(0);
    })
    .unwrap();
}

#[test]
fn a_value_received_as_another_type_aborts_naming_the_channel() {
    for wire in [false, true] {
        let rt = charmrs::Runtime::new(2).affinity(false).wire_check(wire);
        let e = run_job_with(rt, |_| async {
            let sink = Single::<Sink>::new((), Some(1));
            let sender = Single::<Sender>::new((), Some(0));
            let got = sink.ret().wrong_type(*sender);
            sender.text(*sink);
            got.await;
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("channel with element"), "{e}");
        assert!(e.contains("u64"), "{e}");
        if !wire {
            assert!(e.contains("String"), "{e}");
        }
    }
}

/// The receiver migrates while values wait for it, unreceived: they travel with it, and a
/// receive after the move gets them all, in order.
#[test]
fn unreceived_values_travel_with_a_migrating_receiver() {
    for wire in [false, true] {
        let rt = charmrs::Runtime::new(3).affinity(false).wire_check(wire);
        run_job_with(rt, |_| async {
            let cells = Array::<Cell, usize>::new(2, ());
            cells.at(0usize).send_numbers(1, 40);
            charmrs::wait_qd().await; // all 40 wait at element 1, unreceived
            cells.at(1usize).go_to(2);
            charmrs::wait_qd().await;
            assert_eq!(cells.at(1usize).ret().moves().await, 1);
            let sum = cells.at(1usize).ret().receive_numbers(0, 40).await;
            assert_eq!(sum, 40 * 39 / 2);
            charmrs::exit(0);
        })
        .unwrap();
    }
}

/// A receive waiting while its element migrates (its task let go of the element) fails naming
/// the channel; before, it was never woken and waited for ever.
#[test]
fn a_receive_waiting_while_its_element_migrates_fails_naming_the_channel() {
    let e = run_job(2, |_| async {
        let cells = Array::<Cell, usize>::new(2, ());
        let got = cells
            .at(1usize)
            .ret()
            .recv_after_letting_go(cells.at(0usize));
        charmrs::wait_qd().await;
        cells.at(1usize).go_to(0);
        got.await;
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("used after its element migrated"), "{e}");
}

/// A `u32` received as a `u64` decodes without error byte-wise; the type tag still catches it.
#[test]
fn a_value_of_a_compatible_encoding_but_another_type_is_caught() {
    let rt = charmrs::Runtime::new(2).affinity(false).wire_check(true);
    let e = run_job_with(rt, |_| async {
        let sink = Single::<Sink>::new((), Some(1));
        let sender = Single::<Sender>::new((), Some(0));
        let got = sink.ret().wrong_type(*sender);
        sender.small_number(*sink);
        got.await;
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("another type") && e.contains("u64"), "{e}");
}
