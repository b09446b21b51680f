//! The end of a multi-process job: no process leaves before every process knows the job ended.
//!
//! A process that ends the job (`exit`) tells every peer; a peer that learns it stops its PEs.
//! Without more, the first process to exit could vanish while another has not yet read the
//! end-of-job message — which arrives on another connection than the one that closes, or is
//! overtaken by the transport's own failure report (a UCX endpoint timeout) — and that process
//! would take the departure for a crash and abort a job that succeeded. So after its PEs stopped,
//! every process acknowledges each end-of-job message it received (`KIND_END_ACK`); a process
//! that ended the job waits for the acknowledgements of all peers and then releases them
//! (`KIND_END_GO`); a process leaves once released by every process whose end-of-job it received.
//! Every wait is bounded ([`WAIT`]): a peer that is gone or silent only delays the exit.
//!
//! When several processes end the job at once, a process may be released by the ones it heard
//! from before another's end-of-job message reaches it (that message left on another lane, whose
//! connection was still being made): it would leave unaware, and that other process wait for its
//! acknowledgement until the bound. So a release names every process its sender knows ended the
//! job — which is all of them, as each acknowledged it first, saying whether it ended the job
//! too — and its receiver treats each as if its end-of-job message had arrived.
//!
//! Invariant: this runs on the main thread after the PE threads left, so it is the layer's only
//! poller, of every lane ([`poll_every_lane`]: with a lane per PE, a PE's last sends wait in its
//! lane); messages of these kinds that a network PE already read are recorded in [`EndState`].

use super::shared::Shared;
use crate::wire;
use bytes::Bytes;
use charmrs_transport::{Header, Message, ProcessId};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How long each phase waits for peers that are alive (a peer that is gone ends the wait at
/// once): long enough for a starved process of an oversubscribed host to read its messages.
const WAIT: Duration = Duration::from_secs(10);

/// How long a process waits for its PE threads (an entry method still running) before the
/// handshake: as long as each of the handshake's phases.
pub(crate) const ENDING_WAIT: Duration = WAIT;

/// What this process knows about the end of the job.
#[derive(Default)]
pub(crate) struct EndState {
    /// This process ended the job (and told the peers).
    pub(crate) initiated: bool,
    /// Processes whose end-of-job message arrived here.
    pub(crate) sources: BTreeSet<ProcessId>,
    /// Processes that acknowledged this process's end-of-job message.
    pub(crate) acks: BTreeSet<ProcessId>,
    /// Processes that released this process.
    pub(crate) released_by: BTreeSet<ProcessId>,
}

/// An acknowledgement's tag when its sender ended the job too.
const ACK_FROM_INITIATOR: u64 = 1;

/// Records an end-of-job handshake message from `src` (wherever it was read).
pub(crate) fn record(shared: &Shared, msg: &Message, src: ProcessId) {
    let header = msg.header();
    let mut end = shared.end_state();
    match header.kind {
        wire::KIND_EXIT => {
            end.sources.insert(src);
        }
        wire::KIND_END_ACK => {
            end.acks.insert(src);
            // The acknowledgement of a process that ended the job too may overtake its own
            // end-of-job message (they leave on different lanes): it counts as that message,
            // else this process could leave before it, unacknowledged, and the other wait for
            // the acknowledgement until its bound.
            if header.tag == ACK_FROM_INITIATOR {
                end.sources.insert(src);
            }
        }
        wire::KIND_END_GO => {
            end.released_by.insert(src);
            // The processes the releaser knows ended the job (see the module docs). Ids that
            // name no other process of the job are ignored: the job is over either way.
            let (me, n) = (shared.layer.rank(), shared.layer.size());
            let named = msg.segments().first().map_or(&[][..], |s| &s[..]);
            for id in named.chunks_exact(4) {
                let p = ProcessId::from_le_bytes(id.try_into().expect("4 bytes"));
                if p < n && p != me {
                    end.sources.insert(p);
                }
            }
        }
        _ => {}
    }
}

fn signal(shared: &Shared, kind: u8, to: ProcessId) {
    let me = shared.first_pe as u32;
    let (tag, enders) = {
        let end = shared.end_state();
        let tag = if kind == wire::KIND_END_ACK && end.initiated {
            ACK_FROM_INITIATOR
        } else {
            0
        };
        // A release names the processes that ended the job (this one among them).
        let enders: Vec<u8> = if kind == wire::KIND_END_GO {
            end.sources
                .iter()
                .copied()
                .chain(end.initiated.then(|| shared.layer.rank()))
                .flat_map(ProcessId::to_le_bytes)
                .collect()
        } else {
            Vec::new()
        };
        (tag, enders)
    };
    let mut msg = Message::new(Header::new(kind, me, 0, tag));
    if !enders.is_empty() && msg.push_segment(Bytes::from(enders)).is_err() {
        // More ids than a segment holds: released all the same, knowing less.
        msg = Message::new(Header::new(kind, me, 0, tag));
    }
    // Best effort: a peer that is gone is not waited for.
    let _ = shared.layer.send(to, msg);
}

/// Polls every lane of the layer once, recording handshake messages; whether all polls went
/// well (an error: a peer is gone, nothing more will come from it).
fn poll_every_lane(shared: &Shared) -> bool {
    let layer = &shared.layer;
    let mut ok = true;
    for lane in 0..layer.lanes() {
        layer.bind_lane(lane);
        ok &= layer
            .progress(&mut |src, msg| record(shared, &msg, src))
            .is_ok();
    }
    layer.bind_lane(0);
    ok
}

/// Acknowledges the end-of-job messages recorded since the last call (`acked`: the sources
/// already acknowledged).
fn acknowledge_new(shared: &Shared, acked: &mut BTreeSet<ProcessId>) {
    let new: Vec<ProcessId> = shared
        .end_state()
        .sources
        .difference(acked)
        .copied()
        .collect();
    for src in new {
        signal(shared, wire::KIND_END_ACK, src);
        acked.insert(src);
    }
}

/// Polls the layer (recording handshake messages, acknowledging every end-of-job message as it
/// arrives) until `done` holds or [`WAIT`] passes. Acknowledging while waiting matters when two
/// processes end the job at once: each waits for the other's acknowledgement.
fn wait_until(shared: &Shared, acked: &mut BTreeSet<ProcessId>, done: impl Fn(&EndState) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        acknowledge_new(shared, acked);
        if done(&shared.end_state()) || Instant::now() >= deadline {
            return;
        }
        if !poll_every_lane(shared) {
            return;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The handshake, once this process's PEs have left a job that ended with `exit`.
pub(crate) fn finish_job(shared: &Shared) {
    let (me, n) = (shared.layer.rank(), shared.layer.size());
    let peers: Vec<ProcessId> = (0..n).filter(|&p| p != me).collect();
    let initiated = shared.end_state().initiated;
    let mut acked = BTreeSet::new();
    if initiated {
        wait_until(shared, &mut acked, |e| {
            peers.iter().all(|p| e.acks.contains(p))
        });
        for &p in &peers {
            signal(shared, wire::KIND_END_GO, p);
        }
    }
    wait_until(shared, &mut acked, |e| {
        e.sources.iter().all(|s| e.released_by.contains(s))
    });
}
