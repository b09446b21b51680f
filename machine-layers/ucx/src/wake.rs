//! Sleeping until the network has something: the worker's event fd, this
//! layer's own wake-up eventfd, and the watcher thread behind
//! [`set_wakeup`](charmrs_transport::MachineLayer::set_wakeup).
//!
//! # What this module owns
//!
//! * [`EventFd`]: a Linux eventfd used to interrupt a sleeping poller (a
//!   send queued by another thread, a message to oneself, shutdown).
//! * [`wait_readable`]: `ppoll` on a set of descriptors with a timeout.
//! * [`Watcher`]: the thread that turns "the armed worker's event fd became
//!   readable" into a call of the runtime's wake-up hook.
//!
//! # Invariants
//!
//! * Arming (`ucp_worker_arm`) is normally done by the progressing thread
//!   when it has found nothing for a while; it then notifies the watcher
//!   through [`EventFd::signal`]. The watcher calls the hook once per
//!   arming, so a level-triggered event fd cannot make it spin.
//! * Fallback: if the progressing thread stopped calling `progress` without
//!   arming (it parked sooner than the layer's `arm_after`), the watcher
//!   notices that the call counter stands still and arms the worker itself
//!   through [`WatchState::arm`] (which takes the worker lock), or calls
//!   the hook at once if events are already pending or the thread must come
//!   back rather than sleep (operations only its progress moves, arrivals or
//!   failures waiting for it: the layer's `Inbox::needs_poller`). It looks every
//!   [`FALLBACK`] at first and backs off to [`FALLBACK_MAX`] while the
//!   counter keeps moving (each look is a wake-up of this thread, and on a
//!   core busy with a PE a preemption of it). A wake-up is thus never lost,
//!   at worst late by about twice `FALLBACK_MAX` (the first look after the
//!   stall still sees the counter moved, and waits once more).
//!   With `CHARMRS_UCX_DEBUG_WAKE` set, each such arming is logged to
//!   stderr (harmless while the thread is busy elsewhere; frequent ones
//!   while it parks mean arming comes too late).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A non-blocking Linux eventfd, closed on drop.
#[derive(Debug)]
pub(crate) struct EventFd(RawFd);

impl EventFd {
    pub(crate) fn new() -> std::io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EventFd(fd))
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0
    }

    /// Makes the descriptor readable (wakes a poller).
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd; a full
        // counter (EAGAIN) still leaves it readable, so the result is moot.
        let _ = unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }

    /// Consumes pending signals.
    pub(crate) fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking
        // eventfd; EAGAIN (nothing pending) is fine.
        let _ = unsafe { libc::read(self.0, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { libc::close(self.0) };
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`:
/// forever). Returns which were readable.
pub(crate) fn wait_readable<const N: usize>(
    fds: [RawFd; N],
    timeout: Option<Duration>,
) -> [bool; N] {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: pfds is a live array of N pollfd; tsp is null or points to a
    // live timespec; no signal mask.
    let n = unsafe { libc::ppoll(pfds.as_mut_ptr(), N as libc::nfds_t, tsp, std::ptr::null()) };
    if n <= 0 {
        return [false; N];
    }
    pfds.map(|p| p.revents != 0)
}

/// How soon an unarmed watcher first checks that `progress` is still being
/// called (at the start, and after a stall it noticed).
pub(crate) const FALLBACK: Duration = Duration::from_millis(1);
/// The longest interval between those checks: the interval doubles each
/// time the progressing thread was found busy. The runtime's network PE
/// arms before it parks (`before_park`) and never needs this fallback; at
/// a fixed 1 ms the checks woke the watcher a thousand times a second on
/// cores busy with PEs (each an involuntary switch of a PE: `xproc`'s
/// 1 MiB stream, ~2 000 a second on the sending PE's core).
pub(crate) const FALLBACK_MAX: Duration = Duration::from_millis(32);

/// Outcome of an arming attempt by the watcher.
pub(crate) enum Armed {
    /// Armed: the event fd will signal the next event.
    Yes,
    /// Events are pending: the progressing thread must come back.
    Pending,
    /// Could not try (worker busy: someone is using it).
    Busy,
}

/// Shared between the layer and its watcher thread.
pub(crate) struct WatchState {
    /// Readable when the progressing thread armed the worker, or on
    /// shutdown.
    pub(crate) armed_fd: EventFd,
    /// The worker is armed and the watcher has not fired since.
    pub(crate) armed: AtomicBool,
    pub(crate) closing: AtomicBool,
    pub(crate) hook: Box<dyn Fn() + Send + Sync>,
    /// Count of `progress` calls (written by the progressing thread).
    pub(crate) progress_calls: AtomicU64,
    /// Arms the worker from the watcher thread (takes the worker lock).
    pub(crate) arm: Box<dyn Fn() -> Armed + Send + Sync>,
}

/// The watcher thread; stopped and joined on drop.
pub(crate) struct Watcher {
    pub(crate) state: Arc<WatchState>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching the worker's event fd `efd` for `hook`.
    pub(crate) fn start(
        efd: RawFd,
        hook: Box<dyn Fn() + Send + Sync>,
        arm: Box<dyn Fn() -> Armed + Send + Sync>,
        rank: u32,
    ) -> std::io::Result<Watcher> {
        let state = Arc::new(WatchState {
            armed_fd: EventFd::new()?,
            armed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            hook,
            progress_calls: AtomicU64::new(0),
            arm,
        });
        let s = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name(format!("charmrs-ucx-wake-{rank}"))
            .spawn(move || watch(&s, efd))?;
        Ok(Watcher {
            state,
            thread: Some(thread),
        })
    }
}

fn watch(s: &WatchState, efd: RawFd) {
    let mut seen = u64::MAX;
    let mut interval = FALLBACK;
    loop {
        // Wait for an arming (or shutdown); check now and then that the
        // progressing thread did not stop without arming.
        let [notified] = wait_readable([s.armed_fd.fd()], Some(interval));
        if s.closing.load(Ordering::Acquire) {
            return;
        }
        if notified {
            s.armed_fd.clear();
        } else if !s.armed.load(Ordering::SeqCst) {
            let calls = s.progress_calls.load(Ordering::Relaxed);
            if calls != seen {
                seen = calls;
                // Still progressing: look again later, and later each time.
                interval = (interval * 2).min(FALLBACK_MAX);
                continue;
            }
            // A stall: look again soon after this one.
            interval = FALLBACK;
            if std::env::var_os("CHARMRS_UCX_DEBUG_WAKE").is_some() {
                eprintln!("charmrs-ucx: watcher arms for a stalled progress loop");
            }
            match (s.arm)() {
                Armed::Yes => {}
                Armed::Pending => {
                    (s.hook)();
                    continue;
                }
                Armed::Busy => continue,
            }
        }
        // Armed: wait for the worker's event fd.
        loop {
            let [ev, again] = wait_readable([efd, s.armed_fd.fd()], None);
            if s.closing.load(Ordering::Acquire) {
                return;
            }
            if ev {
                s.armed.store(false, Ordering::Release);
                (s.hook)();
                break;
            }
            if again {
                s.armed_fd.clear();
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.state.closing.store(true, Ordering::Release);
        self.state.armed_fd.signal();
        if let Some(t) = self.thread.take() {
            // The watcher itself may hold the last reference to the layer
            // (inside its arming call): then it must not join itself; it
            // sees `closing` and ends on its own.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn eventfd_wakes_a_poller_and_timeouts_expire() {
        let e = EventFd::new().unwrap();
        let t = Instant::now();
        assert_eq!(
            wait_readable([e.fd()], Some(Duration::from_millis(20))),
            [false]
        );
        assert!(t.elapsed() >= Duration::from_millis(15));
        e.signal();
        assert_eq!(
            wait_readable([e.fd()], Some(Duration::from_secs(5))),
            [true]
        );
        e.clear();
        assert_eq!(wait_readable([e.fd()], Some(Duration::ZERO)), [false]);
    }
}
