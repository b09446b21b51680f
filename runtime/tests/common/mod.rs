//! Shared helpers of the runtime's integration tests: run a job with a watchdog.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

/// Default watchdog for a test job.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a job of `pes` PEs (unpinned, so parallel tests do not fight over cores) and fails the
/// test if it does not end within `TIMEOUT`.
pub(crate) fn run_job<F, Fut>(pes: usize, main: F) -> charmrs::Result<i32>
where
    F: FnOnce(Vec<String>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    run_job_with(charmrs::Runtime::new(pes).affinity(false), main)
}

/// Like [`run_job`] with a configured runtime.
pub(crate) fn run_job_with<F, Fut>(rt: charmrs::Runtime, main: F) -> charmrs::Result<i32>
where
    F: FnOnce(Vec<String>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(rt.run(main));
    });
    rx.recv_timeout(TIMEOUT)
        .expect("job did not finish within the watchdog timeout (hang)")
}
