//! [`sleep`]: suspend a suspendable context for a while without blocking its PE;
//! [`schedule_after`]: run a closure on this PE once a delay has passed.
//!
//! The deadline goes into the PE's timers (taken out again if the sleep is dropped first); the dispatch loop wakes due timers between messages
//! and, when idle, parks no longer than the next deadline.

use crate::scheduler::{with_pe, TimerKey};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Suspends the calling coroutine (entry point or `async` entry method) for `duration`; the PE
/// runs other messages meanwhile. A sleeping entry method does not hold off quiescence (as in
/// Charm++, only messages count): quiescence may be reported while it sleeps. A task of the pool
/// does hold it off until its chunk's result is sent.
///
/// ```
/// use std::time::{Duration, Instant};
/// charmrs::Runtime::new(1).run(|_| async {
///     let t = Instant::now();
///     charmrs::sleep(Duration::from_millis(20)).await;
///     assert!(t.elapsed() >= Duration::from_millis(20));
///     charmrs::exit(0);
/// }).unwrap();
/// ```
pub fn sleep(duration: Duration) -> Sleep {
    let now = Instant::now();
    Sleep {
        // A duration past what the clock can represent (`Duration::MAX`: "for ever") sleeps
        // about a century instead of overflowing.
        deadline: now
            .checked_add(duration)
            .or_else(|| now.checked_add(FOR_EVER))
            .unwrap_or(now),
        registered: None,
    }
}

/// Runs `f` on the calling PE once `delay` has passed, between its messages (charm4py's
/// `charm.scheduleCallableAfter(f, secs)`): it is called no earlier than that, later if the
/// PE is busy. Use it from a plain (non-`async`) entry method to act later without blocking the
/// PE: `f` may send messages, fulfil futures, call [`exit`](crate::exit). It is called outside
/// any element: reach one through a proxy. A pending `f` does not hold off quiescence
/// detection, and does not run if the job ends first. A panic in `f` aborts the job, naming
/// it.
///
/// ```
/// use std::time::{Duration, Instant};
/// let code = charmrs::Runtime::new(2).run(|_| async {
///     let done = charmrs::Future::<u64>::new();
///     let start = Instant::now();
///     charmrs::schedule_after(Duration::from_millis(20), move || {
///         done.send(start.elapsed().as_millis() as u64)
///     });
///     assert!(done.await >= 20);
///     charmrs::exit(0);
/// }).unwrap();
/// assert_eq!(code, 0);
/// ```
///
/// # Panics
/// Outside a running PE.
pub fn schedule_after(delay: Duration, f: impl FnOnce() + 'static) {
    let task: crate::envelope::LocalTask = Box::pin(async move {
        sleep(delay).await;
        f();
    });
    with_pe("charmrs::schedule_after", |pe| {
        pe.spawn_labelled(task, "a closure scheduled with charmrs::schedule_after")
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// How long a sleep longer than the clock can represent lasts (about a century).
const FOR_EVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Future returned by [`sleep`].
#[must_use = "sleep does nothing unless awaited"]
pub struct Sleep {
    deadline: Instant,
    /// The timer this sleep put in its PE's timers, if any, with the waker it wakes: polled
    /// again by the same task (woken by something else meanwhile), it adds no second timer;
    /// dropped before its deadline (the losing side of a `select`), it takes its timer out.
    registered: Option<(std::task::Waker, TimerKey)>,
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((_, key)) = self.registered.take() {
            // Outside a running PE (the job ended) there is nothing left to cancel.
            let _ = with_pe("sleep", |pe| pe.cancel_timer(key));
        }
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|(w, _)| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let waker = cx.waker().clone();
        let deadline = self.deadline;
        let replaced = self.registered.take().map(|(_, key)| key);
        let key = with_pe("sleep", |pe| {
            if let Some(old) = replaced {
                pe.cancel_timer(old);
            }
            pe.add_timer(deadline, waker.clone())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        self.registered = Some((waker, key));
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Polls a sleep `left` more times, waking itself after each (as a `select` over it and a
    /// busy channel would).
    struct Repoll {
        sleep: super::Sleep,
        left: u32,
    }

    impl Future for Repoll {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            let _ = Pin::new(&mut self.sleep).poll(cx);
            if self.left == 0 {
                let timers = crate::scheduler::with_pe("test", |pe| pe.pending_timers()).unwrap();
                return Poll::Ready(timers);
            }
            self.left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn a_sleep_polled_again_by_its_task_adds_no_second_timer() {
        let (tx, rx) = std::sync::mpsc::channel();
        crate::Runtime::new(1)
            .run(move |_| async move {
                let timers = Repoll {
                    sleep: super::sleep(std::time::Duration::from_secs(60)),
                    left: 100,
                }
                .await;
                tx.send(timers).unwrap();
                crate::exit(0);
            })
            .unwrap();
        assert_eq!(rx.recv().unwrap(), 1);
    }

    /// Polls a sleep once, then drops it (the losing side of a `select`).
    struct PollOnce(Option<super::Sleep>);

    impl Future for PollOnce {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if let Some(sleep) = self.0.as_mut() {
                let _ = Pin::new(sleep).poll(cx);
            }
            self.0 = None;
            Poll::Ready(())
        }
    }

    /// A sleep dropped before its deadline takes its timer out: a loop selecting over a long
    /// sleep and something else does not pile up timers (each held its task's waker).
    #[test]
    fn a_dropped_sleep_leaves_no_timer_behind() {
        let (tx, rx) = std::sync::mpsc::channel();
        crate::Runtime::new(1)
            .run(move |_| async move {
                for _ in 0..100 {
                    PollOnce(Some(super::sleep(std::time::Duration::MAX))).await;
                }
                let timers = crate::scheduler::with_pe("test", |pe| pe.pending_timers()).unwrap();
                tx.send(timers).unwrap();
                crate::exit(0);
            })
            .unwrap();
        assert_eq!(rx.recv().unwrap(), 0);
    }

    #[test]
    fn sleeping_for_ever_does_not_overflow_the_clock() {
        let s = super::sleep(std::time::Duration::MAX);
        assert!(s.deadline > std::time::Instant::now() + std::time::Duration::from_secs(3600));
    }
}
