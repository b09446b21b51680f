//! Measurement: where a PE's time goes (Charm++'s LB database, per PE).
//!
//! Every entry execution is timed (one clock read before and one after dispatch); the time goes
//! to the element (its load, used by load balancing) and to its PE. Idle time is what the PE
//! spent waiting for messages; *background* time is the rest — the scheduler itself, runtime
//! messages, communication — and is what load balancing counts as a PE's load that no object can
//! take away.

use crate::scheduler::with_pe;

/// How the calling PE has spent its time since it started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeTimes {
    /// Seconds since the PE started.
    pub wall: f64,
    /// Seconds in entry methods and constructors run as entries.
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
