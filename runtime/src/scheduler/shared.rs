//! [`Shared`]: the job state every PE thread of a process sees — which PEs live here, their
//! mailboxes, the machine layer to the other processes, the stop flag and the job's outcome.
//!
//! PE numbers are job-wide: process `r` of a job of `n` processes with `k` PEs each holds PEs
//! `r·k .. (r+1)·k` (Charm++'s SMP numbering). Invariant: the outcome is set once (the first
//! `exit` or abort wins); setting it raises `stop`, wakes every PE, and — when it started in this
//! process — tells the other processes, so no PE anywhere sleeps through the end of the job.

use crate::envelope::Envelope;
use crate::registry::EntryTable;
use charmrs_local::Mailbox;
use charmrs_transport::MachineLayer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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
    /// PEs in the whole job.
    pub(crate) num_pes: usize,
    /// Job-wide number of this process's first PE.
    pub(crate) first_pe: usize,
    /// The mailboxes of this process's PEs.
    mailboxes: Box<[Mailbox<Envelope>]>,
    /// How long an idle PE polls before parking.
    pub(crate) idle_spin: Duration,
    /// Every PE of this host has a core of its own: an idle PE polls without ever yielding its
    /// core (a `sched_yield` costs about a microsecond, all of it added to the latency of a
    /// message arriving meanwhile). Otherwise idle PEs yield between polls so that oversubscribed
    /// PEs all run.
    pub(crate) own_cores: AtomicBool,
    /// `+wirecheck`: messages between PEs go through the inter-process wire format.
    pub(crate) wire_check: bool,
    /// The entry table of this binary (checked at start-up).
    pub(crate) entries: &'static EntryTable,
    /// Load-balancing settings (`+balancer`, `+LBDebug`, `+LBDump`).
    pub(crate) balance: crate::balance::BalanceConfig,
    /// How many PEs of this process poll the machine layer, from `first_pe` on: 1 (the first PE
    /// polls for the process), or every PE when the layer has a lane per PE
    /// (`MachineLayer::lanes`: UCX's per-PE workers, libfabric's per-PE endpoints). Unset: no
    /// network, a single-process job.
    pub(crate) network_pes: std::sync::OnceLock<usize>,
    /// Whether the machine layer wakes a parked network PE when something arrives for it (else
    /// network PEs only nap: see `PeState::idle`); set once, with `network_pes`, before the PEs
    /// start.
    pub(crate) network_wakes: std::sync::OnceLock<bool>,
    /// The process-level transport (a single-process job uses the local layer).
    pub(crate) layer: Arc<dyn MachineLayer>,
    /// `+trace`: where the PEs' trace records go when they stop (`None`: tracing is off).
    pub(crate) trace: Option<crate::trace::TraceSink>,
    stop: AtomicBool,
    /// This job's number among the jobs this process has run (`Runtime::run` may be called more
    /// than once, even at once from several threads): what tells one job's process-wide state
    /// from another's (`crate::readonly`).
    pub(crate) job: u64,
    /// The host of each process of the job (`crate::hosts`).
    pub(crate) hosts: Vec<u32>,
    /// The end-of-job handshake (see `ending`).
    end: Mutex<super::ending::EndState>,
    outcome: Mutex<Option<Outcome>>,
    outcome_set: Condvar,
}

impl Shared {
    pub(crate) fn new(
        local_pes: usize,
        idle_spin: Duration,
        wire_check: bool,
        machine: crate::machine::Machine,
        entries: &'static EntryTable,
        balance: crate::balance::BalanceConfig,
        trace: Option<crate::trace::TraceSink>,
    ) -> Shared {
        let crate::machine::Machine { layer, hosts } = machine;
        let nprocs = layer.size() as usize;
        let first_pe = layer.rank() as usize * local_pes;
        Shared {
            num_pes: local_pes * nprocs,
            first_pe,
            mailboxes: (0..local_pes).map(|_| Mailbox::new()).collect(),
            idle_spin,
            own_cores: AtomicBool::new(false),
            wire_check,
            entries,
            balance,
            network_pes: std::sync::OnceLock::new(),
            network_wakes: std::sync::OnceLock::new(),
            layer: Arc::from(layer),
            trace,
            stop: AtomicBool::new(false),
            job: {
                static JOBS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                JOBS.fetch_add(1, Ordering::Relaxed) + 1
            },
            hosts,
            end: Mutex::default(),
            outcome: Mutex::new(None),
            outcome_set: Condvar::new(),
        }
    }

    /// Whether PE `pe` polls the machine layer (its lane: `pe - first_pe`).
    #[inline]
    pub(crate) fn polls_network(&self, pe: usize) -> bool {
        self.network_pes
            .get()
            .is_some_and(|n| pe.wrapping_sub(self.first_pe) < *n)
    }

    /// The end-of-job handshake state.
    pub(crate) fn end_state(&self) -> std::sync::MutexGuard<'_, super::ending::EndState> {
        self.end.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mailbox of PE `pe` if it lives in this process.
    #[inline]
    pub(crate) fn mailbox(&self, pe: usize) -> Option<&Mailbox<Envelope>> {
        self.mailboxes.get(pe.wrapping_sub(self.first_pe))
    }

    /// Number of PEs in this process.
    pub(crate) fn local_pes(&self) -> usize {
        self.mailboxes.len()
    }

    /// The process that holds PE `pe`.
    pub(crate) fn process_of(&self, pe: usize) -> u32 {
        (pe / self.local_pes()) as u32
    }

    /// Whether the job is ending; PEs stop dispatching once this is true.
    #[inline]
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the job with `outcome` unless it already ended; wakes everything and tells the other
    /// processes.
    pub(crate) fn finish(&self, outcome: Outcome) {
        self.end(outcome, true)
    }

    /// Ends the job because another process said so (nothing is sent back).
    pub(crate) fn finish_from_peer(&self, outcome: Outcome) {
        self.end(outcome, false)
    }

    fn end(&self, outcome: Outcome, tell_peers: bool) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(Outcome::Exit(code)), Outcome::Abort(msg), true) =
            (&*slot, &outcome, tell_peers)
        {
            // A failure in this process after `exit` (an entry still running on another PE, or
            // the rest of the entry that called `exit`, panicked): the job's status stays the
            // one `exit` chose, but the failure is not silent.
            eprintln!("charmrs: after exit({code}): {msg}");
        }
        if slot.is_none() {
            self.layer.stopping();
            if tell_peers {
                self.end_state().initiated = true;
                let me = self.layer.rank();
                let layer = Arc::clone(&self.layer);
                let ends: Vec<_> = (0..self.layer.size())
                    .filter(|&p| p != me)
                    .map(|p| (p, crate::wire::end_message(&outcome, self.first_pe as u32)))
                    .collect();
                let tell = move || {
                    for (p, msg) in ends {
                        // Best effort: a peer that is gone cannot be told.
                        let _ = layer.send(p, msg);
                    }
                };
                if matches!(outcome, Outcome::Abort(_)) {
                    // A send may wait for room a stuck peer never makes: the launcher, told by
                    // `abort` below, must hear of the abort whatever the peers do.
                    charmrs_transport::bounded::run_at_most(
                        ABORT_NOTICE,
                        "charmrs-abort-notice",
                        tell,
                    );
                } else {
                    tell();
                }
            }
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

/// How long an aborting process waits for its abort notices to leave before it tells the
/// launcher.
const ABORT_NOTICE: Duration = Duration::from_secs(2);
