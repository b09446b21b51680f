//! [`Shared`]: the job state every PE thread of a process sees — mailboxes, the stop flag and the
//! job's outcome.
//!
//! Invariant: the outcome is set once (the first `exit` or abort wins); setting it raises `stop`
//! and wakes every PE, so no PE sleeps through the end of the job.

use crate::envelope::Envelope;
use charmrs_local::Mailbox;
use charmrs_transport::MachineLayer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// `exit(code)` was called.
    Exit(i32),
    /// The job was aborted; the message names the cause.
    Abort(String),
}

pub(crate) struct Shared {
    pub(crate) num_pes: usize,
    pub(crate) mailboxes: Box<[Mailbox<Envelope>]>,
    /// How long an idle PE polls before parking.
    pub(crate) idle_spin: Duration,
    /// `+wirecheck`: messages between PEs go through the inter-process wire format.
    pub(crate) wire_check: bool,
    /// The process-level transport (a single-process job uses the local layer).
    pub(crate) layer: Box<dyn MachineLayer>,
    stop: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    outcome_set: Condvar,
}

impl Shared {
    pub(crate) fn new(
        num_pes: usize,
        idle_spin: Duration,
        wire_check: bool,
        layer: Box<dyn MachineLayer>,
    ) -> Shared {
        Shared {
            num_pes,
            mailboxes: (0..num_pes).map(|_| Mailbox::new()).collect(),
            idle_spin,
            wire_check,
            layer,
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            outcome_set: Condvar::new(),
        }
    }

    /// Whether the job is ending; PEs stop dispatching once this is true.
    #[inline]
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the job with `outcome` unless it already ended; wakes everything.
    pub(crate) fn finish(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            if let Outcome::Abort(msg) = &outcome {
                self.layer.abort(msg);
            }
            *slot = Some(outcome);
        }
        self.stop.store(true, Ordering::Release);
        drop(slot);
        self.outcome_set.notify_all();
        for m in self.mailboxes.iter() {
            m.wake();
        }
    }

    /// Blocks until the job has an outcome.
    pub(crate) fn wait_outcome(&self) -> Outcome {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(o) = slot.as_ref() {
                return o.clone();
            }
            slot = self
                .outcome_set
                .wait(slot)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}
