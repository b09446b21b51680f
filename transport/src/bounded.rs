//! [`run_at_most`]: runs a piece of best-effort work (an abort notice to peers that may never
//! read it) on a thread of its own and waits for it a bounded time.
//!
//! Invariant: the caller never waits longer than the limit; the work may go on after, on its
//! thread, until it finishes or the process exits.

use std::time::Duration;

/// Runs `work` on a new thread named `name` and waits for it at most `limit`; runs nothing if
/// the thread cannot be started.
///
/// ```
/// use std::time::{Duration, Instant};
/// let t = Instant::now();
/// charmrs_transport::bounded::run_at_most(Duration::from_millis(50), "stuck", || {
///     std::thread::sleep(Duration::from_secs(5))
/// });
/// assert!(t.elapsed() < Duration::from_secs(5));
/// ```
pub fn run_at_most(limit: Duration, name: &str, work: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let started = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            work();
            let _ = done.send(());
        });
    if started.is_ok() {
        let _ = finished.recv_timeout(limit);
    }
}
