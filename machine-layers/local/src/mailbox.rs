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

use crossbeam_queue::SegQueue;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::Duration;

/// A multi-producer, single-consumer inbox with park/wake support for its owning thread.
pub struct Mailbox<T> {
    queue: SegQueue<T>,
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
            queue: SegQueue::new(),
            sleeping: AtomicBool::new(false),
            owner: OnceLock::new(),
        }
    }

    /// Records the calling thread as the one that consumes and parks. Call once, from the owner.
    ///
    /// Returns `false` if an owner was already bound (the first binding stays).
    pub fn bind_owner(&self) -> bool {
        self.owner.set(std::thread::current()).is_ok()
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
    pub fn park(&self, timeout: Option<Duration>, keep_sleeping: impl Fn() -> bool) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.queue.is_empty() && keep_sleeping() {
            match timeout {
                Some(t) => std::thread::park_timeout(t),
                None => std::thread::park(),
            }
        }
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// Unparks the owner unconditionally (used for exit and other out-of-band signals).
    pub fn wake(&self) {
        if let Some(t) = self.owner.get() {
            t.unpark();
        }
    }
}

#[cfg(test)]
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
