//! [`sleep`]: suspend a suspendable context for a while without blocking its PE.
//!
//! The deadline goes into the PE's timer heap; the dispatch loop wakes due timers between messages
//! and, when idle, parks no longer than the next deadline.

use crate::scheduler::with_pe;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Suspends the calling coroutine (entry point or `async` entry method) for `duration`; the PE
/// runs other messages meanwhile.
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
    }
}

/// How long a sleep longer than the clock can represent lasts (about a century).
const FOR_EVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Future returned by [`sleep`].
#[must_use = "sleep does nothing unless awaited"]
pub struct Sleep {
    deadline: Instant,
}

impl Future for Sleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        with_pe("sleep", |pe| {
            pe.add_timer(self.deadline, cx.waker().clone())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sleeping_for_ever_does_not_overflow_the_clock() {
        let s = super::sleep(std::time::Duration::MAX);
        assert!(s.deadline > std::time::Instant::now() + std::time::Duration::from_secs(3600));
    }
}
