//! Measurement: where a PE's time goes (Charm++'s LB database, per PE).
//!
//! When load balancing is on (`+balancer`, `+LBPeriod` or `+LBDump`), every entry execution is
//! timed with one timestamp read at its end — it is charged the time since the previous mark (the
//! end of the previous entry, or the PE waking up) — and the time goes to the element (its load)
//! and to its PE. Timestamps are the CPU's time-stamp counter where the kernel itself trusts it
//! (clock source `tsc`: invariant and synchronized; ~9 ns a read here, against ~22 ns for
//! `Instant::now`), calibrated once against the monotonic clock; otherwise `Instant`. Without
//! load balancing nothing is read per entry (Charm++ likewise instruments only when a balancer is
//! linked in). Idle time — waiting for messages — is always measured; *background* time is the
//! rest: the scheduler, runtime messages, communication.

use crate::scheduler::with_pe;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Which timestamp source [`ticks`] reads: 0 not chosen yet, 1 the TSC, 2 `Instant`.
static SOURCE: AtomicU8 = AtomicU8::new(0);
/// The `Instant` that tick 0 stands for (the `Instant` source), and seconds per tick.
static CALIBRATION: OnceLock<(Instant, f64)> = OnceLock::new();

/// Chooses and calibrates the timestamp source (once per process; spins ~5 ms for the TSC).
pub(crate) fn init_clock() -> f64 {
    let (_, rate) = *CALIBRATION.get_or_init(|| {
        let anchor = Instant::now();
        let tsc = std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .is_ok_and(|s| s.trim() == "tsc");
        if cfg!(target_arch = "x86_64") && tsc {
            let (t0, c0) = (Instant::now(), read_tsc());
            while t0.elapsed() < Duration::from_millis(5) {
                std::hint::spin_loop();
            }
            let (dt, dc) = (t0.elapsed().as_secs_f64(), read_tsc().wrapping_sub(c0));
            if dc > 0 {
                SOURCE.store(1, Ordering::Relaxed);
                return (anchor, dt / dc as f64);
            }
        }
        SOURCE.store(2, Ordering::Relaxed);
        (anchor, 1e-9)
    });
    rate
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn read_tsc() -> u64 {
    // SAFETY: `rdtsc` exists on every x86-64 CPU, has no preconditions and only reads the
    // time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn read_tsc() -> u64 {
    0
}

/// A timestamp in ticks of the source chosen by [`init_clock`] (which must have run).
#[inline]
pub(crate) fn ticks() -> u64 {
    if SOURCE.load(Ordering::Relaxed) == 1 {
        read_tsc()
    } else {
        CALIBRATION
            .get()
            .map_or(0, |(anchor, _)| anchor.elapsed().as_nanos() as u64)
    }
}

/// How the calling PE has spent its time since it started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeTimes {
    /// Seconds since the PE started.
    pub wall: f64,
    /// Seconds in entry methods (measured only when load balancing is on; else 0).
    pub entry: f64,
    /// Seconds waiting for messages.
    pub idle: f64,
    /// `wall - entry - idle`: the scheduler, runtime traffic and communication.
    pub background: f64,
}

/// How the calling PE has spent its time so far.
///
/// # Panics
/// Outside a running PE.
pub fn pe_times() -> PeTimes {
    with_pe("pe_times", |pe| pe.times()).unwrap_or_else(|e| panic!("{e}"))
}

impl crate::scheduler::PeState {
    /// Reads the clock once: returns the seconds since the last mark and moves the mark here.
    #[inline]
    pub(crate) fn clock_mark(&self) -> f64 {
        let now = ticks();
        let took = now.saturating_sub(self.mark.get());
        self.mark.set(now);
        took as f64 * self.secs_per_tick
    }

    pub(crate) fn times(&self) -> PeTimes {
        let wall = self.started.elapsed().as_secs_f64();
        let entry = self.entry_secs.get();
        let idle = self.idle_secs.get();
        PeTimes {
            wall,
            entry,
            idle,
            background: (wall - entry - idle).max(0.0),
        }
    }
}
