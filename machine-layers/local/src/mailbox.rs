//! The per-PE inbox: a multi-producer queue plus a doorbell that lets an idle PE sleep.
//!
//! Every PE owns one [`Mailbox`]. Any thread may [`push`](Mailbox::push) into it; only the owning PE
//! pops from it and parks on it. The queue is crossbeam's lock-free `SegQueue` (unbounded, FIFO per
//! producer); the doorbell is a `sleeping` flag plus `std::thread` park/unpark.
//!
//! # Invariant: no lost wake-up
//! The producer writes the item and then reads `sleeping`; the consumer writes `sleeping` and then reads
//! the queue. Both sides put a `SeqCst` fence between their write and their read (a Dekker handshake),
//! so at least one of them sees the other's write: either the producer sees `sleeping == true` and
//! unparks, or the consumer sees the item and does not park. `unpark` before `park` leaves a token, so
//! the order of those two calls does not matter either.

use std::sync::OnceLock;
use std::time::Duration;
use sync::{fence, park, park_timeout, AtomicBool, Ordering, Queue, Thread};

/// The primitives the handshake is built from: the real ones, or under `--cfg loom` the model
/// checker's, so that `loom` explores every interleaving of [`Mailbox::push`] and
/// [`Mailbox::park`] (see the `loom_model` tests; `ci/test` runs them).
#[cfg(not(loom))]
mod sync {
    pub(super) use crossbeam_queue::SegQueue as Queue;
    pub(super) use std::sync::atomic::{fence, AtomicBool, Ordering};
    pub(super) use std::thread::{current, park, park_timeout, Thread};
}

#[cfg(loom)]
mod sync {
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::AtomicUsize;
    pub(super) use loom::sync::atomic::{fence, AtomicBool, Ordering};
    pub(super) use loom::thread::{current, park, Thread};

    /// Under loom a timed park must be ended by a wake-up too: the model then checks that
    /// none is lost (a lost one is a deadlock loom reports).
    pub(super) fn park_timeout(_: std::time::Duration) {
        park();
    }

    /// Items a model run may push at most.
    const CAPACITY: usize = 8;

    /// A model of `SegQueue` for loom, built the same way: a producer claims a slot by
    /// advancing `tail`, writes it, then marks it written; the (single) consumer compares
    /// `head` with `tail` for emptiness and waits for a claimed slot to be written, as
    /// `SegQueue` does. No lock: only the handshake's fences make a push visible to a parking
    /// owner.
    pub(super) struct Queue<T> {
        slots: Vec<(AtomicBool, UnsafeCell<Option<T>>)>,
        tail: AtomicUsize,
        head: AtomicUsize,
    }

    impl<T> Queue<T> {
        pub(super) fn new() -> Self {
            Queue {
                slots: (0..CAPACITY)
                    .map(|_| (AtomicBool::new(false), UnsafeCell::new(None)))
                    .collect(),
                tail: AtomicUsize::new(0),
                head: AtomicUsize::new(0),
            }
        }

        pub(super) fn push(&self, item: T) {
            let i = self.tail.fetch_add(1, Ordering::AcqRel);
            assert!(i < CAPACITY, "the loom model queue holds {CAPACITY} items");
            let (written, cell) = &self.slots[i];
            // SAFETY: slot `i` was claimed by this push alone, and the consumer reads it only
            // after `written` (Release below, Acquire there).
            cell.with_mut(|p| unsafe { *p = Some(item) });
            written.store(true, Ordering::Release);
        }

        /// Only the owner pops (as in `Mailbox`).
        pub(super) fn pop(&self) -> Option<T> {
            let h = self.head.load(Ordering::Relaxed);
            if h == self.tail.load(Ordering::Acquire) {
                return None;
            }
            let (written, cell) = &self.slots[h];
            while !written.load(Ordering::Acquire) {
                loom::thread::yield_now();
            }
            // SAFETY: the slot was written (Acquire above) and only this consumer takes it.
            let item = cell.with_mut(|p| unsafe { (*p).take() });
            self.head.store(h + 1, Ordering::Release);
            item
        }

        pub(super) fn is_empty(&self) -> bool {
            self.head.load(Ordering::Acquire) == self.tail.load(Ordering::Acquire)
        }

        pub(super) fn len(&self) -> usize {
            self.tail.load(Ordering::Acquire) - self.head.load(Ordering::Acquire)
        }
    }
}

/// A multi-producer, single-consumer inbox with park/wake support for its owning thread.
pub struct Mailbox<T> {
    queue: Queue<T>,
    sleeping: AtomicBool,
    owner: OnceLock<Thread>,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Mailbox<T> {
    /// An empty mailbox with no owner yet.
    pub fn new() -> Self {
        Self {
            queue: Queue::new(),
            sleeping: AtomicBool::new(false),
            owner: OnceLock::new(),
        }
    }

    /// Records the calling thread as the one that consumes and parks. Call once, from the owner.
    ///
    /// Returns `false` if an owner was already bound (the first binding stays).
    pub fn bind_owner(&self) -> bool {
        self.owner.set(sync::current()).is_ok()
    }

    /// Appends `item`; wakes the owner if it is parked. Callable from any thread.
    pub fn push(&self, item: T) {
        self.queue.push(item);
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            self.wake();
        }
    }

    /// Takes the oldest item, if any. Meant for the owner; safe (but pointless) from other threads.
    #[inline]
    pub fn pop(&self) -> Option<T> {
        self.queue.pop()
    }

    /// Whether the queue currently looks empty (a snapshot; producers may be pushing).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Number of queued items (a snapshot).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Parks the owner until an item arrives, [`wake`](Self::wake) is called, or `timeout` passes.
    ///
    /// Returns immediately if the queue is not empty. Spurious returns are possible; callers loop.
    /// `keep_sleeping` is re-checked after the handshake so that other wake-up reasons (an exit
    /// flag, say) set before a `wake` are not missed.
    ///
    /// Only the bound owner ([`bind_owner`](Self::bind_owner)) may park: a push wakes that
    /// thread, so any other would sleep through it (checked in debug builds).
    pub fn park(&self, timeout: Option<Duration>, keep_sleeping: impl Fn() -> bool) {
        debug_assert!(
            self.owner
                .get()
                .is_some_and(|owner| owner.id() == sync::current().id()),
            "Mailbox::park called from a thread that is not the mailbox's bound owner \
             (call bind_owner first, from the thread that consumes)"
        );
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.queue.is_empty() && keep_sleeping() {
            match timeout {
                Some(t) => park_timeout(t),
                None => park(),
            }
        }
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// Unparks the owner unconditionally (used for exit and other out-of-band signals).
    ///
    /// Callers set their signal (an exit flag, say) before calling it. The fence pairs with
    /// the one in [`park`](Self::park): either this call sees the owner bound (and unparks it),
    /// or the owner, binding and parking after it, sees the signal in `keep_sleeping`. Without
    /// it the signal's store and the owner's load could both read old values (store buffering)
    /// and an owner bound just after the signal would park for ever.
    pub fn wake(&self) {
        fence(Ordering::SeqCst);
        if let Some(t) = self.owner.get() {
            t.unpark();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn fifo_per_producer() {
        let m = Mailbox::new();
        for i in 0..100 {
            m.push(i);
        }
        for i in 0..100 {
            assert_eq!(m.pop(), Some(i));
        }
        assert!(m.pop().is_none());
    }

    /// Many producers, one parking consumer: every item arrives exactly once and the consumer
    /// never sleeps through a push (the test would time out).
    #[test]
    fn stress_no_lost_items_or_wakeups() {
        const PRODUCERS: usize = 4;
        const PER: usize = 50_000;
        let m = Arc::new(Mailbox::<(usize, usize)>::new());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let consumer = {
            let m = m.clone();
            std::thread::spawn(move || {
                m.bind_owner();
                let mut next = [0usize; PRODUCERS];
                let mut got = 0;
                while got < PRODUCERS * PER {
                    match m.pop() {
                        Some((p, i)) => {
                            assert_eq!(next[p], i, "producer {p}: out of order or duplicate");
                            next[p] += 1;
                            got += 1;
                        }
                        // No timeout: a lost wake-up hangs here and the watchdog fails the test.
                        None => m.park(None, || true),
                    }
                }
                done_tx.send(got).unwrap();
            })
        };
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..PER {
                        m.push((p, i));
                        if i % 1024 == 0 {
                            // Let the consumer drain and park, to exercise the sleep path.
                            std::thread::sleep(Duration::from_micros(50));
                        }
                    }
                })
            })
            .collect();
        let start = Instant::now();
        let got = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("consumer hung: lost wake-up or lost item");
        assert_eq!(got, PRODUCERS * PER);
        for p in producers {
            p.join().unwrap();
        }
        consumer.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(60));
    }

    /// A thread other than the bound owner parking would sleep through pushes: debug builds
    /// refuse it.
    #[cfg(debug_assertions)]
    #[test]
    fn only_the_bound_owner_may_park() {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        let m = Arc::new(Mailbox::<u8>::new());
        let park_here =
            || catch_unwind(AssertUnwindSafe(|| m.park(Some(Duration::ZERO), || false)));
        assert!(park_here().is_err(), "a mailbox with no owner");
        let owner = {
            let m = m.clone();
            std::thread::spawn(move || {
                assert!(m.bind_owner());
                m.park(Some(Duration::ZERO), || false);
            })
        };
        owner.join().expect("the bound owner parks");
        assert!(park_here().is_err(), "a thread that is not the owner");
    }

    #[test]
    fn wake_interrupts_park() {
        let m = Arc::new(Mailbox::<u8>::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                m.bind_owner();
                while !stop.load(Ordering::Acquire) {
                    m.park(None, || !stop.load(Ordering::Acquire));
                }
                tx.send(()).unwrap();
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Release);
        m.wake();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("wake did not interrupt park");
        t.join().unwrap();
    }
}

/// Model checks of the no-lost-wake-up handshake: `RUSTFLAGS="--cfg loom" cargo test -p
/// charmrs-local --release --lib loom_model` (with its own `CARGO_TARGET_DIR`, as `ci/test`
/// does). Removing either `SeqCst` fence makes `loom` report a deadlock: a producer that saw
/// the owner awake while the owner saw an empty queue and parked for good.
#[cfg(all(test, loom))]
mod loom_model {
    use super::Mailbox;
    use loom::sync::Arc;
    use loom::thread;

    /// Runs `f` under loom with at most 3 preemptions per execution (bounded search, as tokio
    /// runs its models: the lost wake-up these tests look for needs one or two; the unbounded
    /// search of the two-producer model took 6 minutes here).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(f);
    }

    /// The owner takes `expected` items, parking whenever the queue looks empty (without a
    /// timeout: only a push or a wake ends the park).
    fn consume(m: &Mailbox<u32>, expected: usize) -> Vec<u32> {
        m.bind_owner();
        let mut got = Vec::new();
        while got.len() < expected {
            match m.pop() {
                Some(v) => got.push(v),
                None => m.park(None, || true),
            }
        }
        got
    }

    #[test]
    fn loom_model_one_producer_never_loses_the_wake_up_and_keeps_its_order() {
        model(|| {
            let m = Arc::new(Mailbox::new());
            let owner = {
                let m = m.clone();
                thread::spawn(move || consume(&m, 2))
            };
            m.push(1);
            m.push(2);
            assert_eq!(owner.join().unwrap(), vec![1, 2]);
        });
    }

    #[test]
    fn loom_model_two_producers_every_item_exactly_once() {
        model(|| {
            let m = Arc::new(Mailbox::new());
            let owner = {
                let m = m.clone();
                thread::spawn(move || consume(&m, 2))
            };
            let other = {
                let m = m.clone();
                thread::spawn(move || m.push(10))
            };
            m.push(1);
            other.join().unwrap();
            let mut got = owner.join().unwrap();
            got.sort_unstable();
            assert_eq!(got, vec![1, 10]);
        });
    }

    /// `wake` (the runtime's exit signal, after setting its stop flag) ends a park even with
    /// the queue empty. The owner is bound before the wake here: `owner` is a std `OnceLock`,
    /// which loom does not track, so a bind racing the wake is not modelled (the fence at the
    /// start of `wake` covers that case; see its docs).
    #[test]
    fn loom_model_wake_ends_a_park() {
        use loom::sync::atomic::{AtomicBool, Ordering};
        model(|| {
            let m = Arc::new(Mailbox::<u32>::new());
            let bound = Arc::new(AtomicBool::new(false));
            let stop = Arc::new(AtomicBool::new(false));
            let owner = {
                let (m, bound, stop) = (m.clone(), bound.clone(), stop.clone());
                thread::spawn(move || {
                    m.bind_owner();
                    bound.store(true, Ordering::Release);
                    while !stop.load(Ordering::Acquire) {
                        m.park(None, || !stop.load(Ordering::Acquire));
                    }
                })
            };
            while !bound.load(Ordering::Acquire) {
                thread::yield_now();
            }
            stop.store(true, Ordering::Release);
            m.wake();
            owner.join().unwrap();
        });
    }
}
