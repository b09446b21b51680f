//! Network progress of a multi-process job: what arrives from other processes becomes envelopes
//! in the destination PEs' mailboxes. The lowest PE of each process polls the machine layer
//! between messages and while idle ([`poll_network`], reconverse style: no extra thread hop on
//! the latency path), so messages from one process are handed on in the order they arrived; a
//! layer with a lane per PE (UCX's per-PE workers, libfabric's per-PE endpoints,
//! `MachineLayer::lanes`) is polled by every PE,
//! each its own lane, where the calls for it arrive in order per sending PE.
//! When the layer can wake that PE it parks while idle; otherwise (libfabric's `shm`: nothing to
//! wait on) it polls longer and then naps (see `PeState::idle`). A communication thread blocking
//! in the layer (Charm++'s SMP design) was used for such layers until it measured 4× slower for
//! an 8 B entry call over `shm` than the napping PE (docs/performance.md, "Session 11").
//!
//! Small calls the layer lends (`Arrival::Borrowed`) are decoded straight from its buffer; the
//! last of a poll, a plain point call for this PE to an element that is here while nothing waits
//! in its queue, runs at once (`pe::run_lent_now`: no boxed call, no queue turn). Any other
//! arrival is handled as an owned message.
//!
//! Invariants: every arrived message is decoded as hostile input — an undecodable message, a
//! message for a PE of another process, or a lost peer ends the job with an abort naming the
//! process it came from, never a panic or a silent drop; an end-of-job message from a peer ends
//! this process's part of the job with the same outcome.

use super::shared::{Outcome, Shared};
use crate::registry::EntryTable;
use crate::wire;
use charmrs_transport::{Arrival, Message, ProcessId};

/// Polls the machine layer once without blocking (from the network PE); returns whether anything
/// arrived. `idle`: the PE has nothing else to do (the layer may look harder, see
/// `MachineLayer::progress_idle`).
pub(crate) fn poll_network(shared: &Shared, table: &EntryTable, idle: bool) -> bool {
    let result = shared.layer.progress_arrivals(idle, &mut |src, arrival| {
        on_arrival(shared, table, src, arrival)
    });
    match result {
        Ok(n) => n > 0,
        Err(e) => {
            if !shared.stopping() {
                let me = shared.layer.rank();
                shared.finish_from_peer(Outcome::Abort(format!("charmrs: process {me}: {e}")));
            }
            false
        }
    }
}

/// Queues `env`, arrived for PE `dst`: straight into the local queue when the calling thread is
/// that PE (a network PE, polling), which saves the mailbox's atomics on the latency path; else
/// into its mailbox. Either way it is delivered after what arrived before it on the same lane
/// (one poller per lane hands arrivals on in order).
#[inline]
fn post(
    shared: &Shared,
    dst: usize,
    mailbox: &charmrs_local::Mailbox<crate::envelope::Envelope>,
    env: crate::envelope::Envelope,
) {
    let env = if shared.polls_network(dst) {
        match super::pe::queue_if_current(dst, env) {
            Some(env) => env,
            None => return,
        }
    } else {
        env
    };
    mailbox.push(env);
}

/// A broadcast travelling down the tree of processes rooted at `root`: forwarded as it is to this
/// process's children, then decoded once and delivered to every local PE.
fn on_tree_broadcast(shared: &Shared, table: &EntryTable, src: ProcessId, msg: Message, root: u32) {
    let me = shared.layer.rank();
    let abort =
        |why: String| shared.finish(Outcome::Abort(format!("charmrs: process {me}: {why}")));
    let n = shared.layer.size();
    if root >= n {
        return abort(format!(
            "process {src} sent a broadcast rooted at unknown process {root}"
        ));
    }
    for child in wire::tree_children(me, root, n) {
        let mut m = msg.clone();
        let mut h = *m.header();
        h.dst_pe = child * shared.local_pes() as u32;
        m.set_header(h);
        let _ = super::pe::with_pe("tracing", |pe| pe.trace_sent(&m));
        if let Err(e) = shared.layer.send(child, m) {
            return abort(format!("forwarding a broadcast to process {child}: {e}"));
        }
    }
    match decode_guarded(msg, table) {
        Ok(env) => {
            let priority = env.priority;
            let crate::envelope::Body::Broadcast { coll, call } = env.body else {
                return abort(format!(
                    "process {src} sent a tree broadcast that is not one"
                ));
            };
            let first = shared.first_pe;
            for pe in first..first + shared.local_pes() {
                let body = crate::envelope::Body::Broadcast {
                    coll,
                    call: call.clone_box(),
                };
                // Through `post`, as every arrival: the polling PE's part goes behind what
                // arrived before it on its lane, not into the mailbox where later point calls
                // (queued locally) would overtake it.
                let mailbox = shared.mailbox(pe).expect("a local PE");
                post(
                    shared,
                    pe,
                    mailbox,
                    crate::envelope::Envelope::new(priority, body),
                );
            }
        }
        Err(e) => malformed(shared, src, e),
    }
}

/// [`wire::decode`], a panic inside it made an error ([`wire::guarded`]).
fn decode_guarded(msg: Message, table: &EntryTable) -> Result<crate::envelope::Envelope, String> {
    wire::guarded(|| wire::decode(msg, table))
}

/// An arrival from process `src`: a call lent by the layer (small, one segment) is decoded from
/// the layer's buffer; anything else is handled as an owned message ([`on_message`]).
fn on_arrival(shared: &Shared, table: &EntryTable, src: ProcessId, arrival: Arrival<'_>) {
    let header = arrival.header();
    if shared.trace.is_some() && !wire::is_job_control(header.kind) {
        let _ = super::pe::with_pe("tracing", |pe| {
            if let Some(t) = &pe.tracer {
                t.received(arrival.total_len());
            }
        });
    }
    match arrival {
        Arrival::Borrowed {
            header,
            data: seg0,
            last,
        } if header.kind == wire::KIND_CALL && !wire::is_tree(&header) => {
            let dst = header.dst_pe as usize;
            let Some(mailbox) = shared.mailbox(dst) else {
                return not_here(shared, src, dst);
            };
            // The last arrival of a poll may run at once: nothing behind it waits to be handed
            // on (to this PE's queue, or to another PE of this process).
            if last {
                match super::pe::run_lent_now(shared, dst, seg0, table) {
                    Some(Ok(())) => return,
                    Some(Err(e)) => return malformed(shared, src, e),
                    None => {}
                }
            }
            let decoded =
                wire::guarded(|| wire::decode_call_message(header, seg0, Vec::new(), table));
            match decoded {
                Ok(env) => post(shared, dst, mailbox, env),
                Err(e) => malformed(shared, src, e),
            }
        }
        other => on_message(shared, table, src, other.into_message()),
    }
}

/// Ends the job: process `src` sent a message for PE `dst`, which is not in this process.
#[cold]
fn not_here(shared: &Shared, src: ProcessId, dst: usize) {
    let me = shared.layer.rank();
    shared.finish(Outcome::Abort(format!(
        "charmrs: process {me}: process {src} sent a message for PE {dst}, which is not in this \
         process"
    )));
}

/// Ends the job: process `src` sent a message this process cannot decode (`why`).
#[cold]
fn malformed(shared: &Shared, src: ProcessId, why: String) {
    let me = shared.layer.rank();
    shared.finish(Outcome::Abort(format!(
        "charmrs: process {me}: malformed message from process {src}: {why}"
    )));
}

fn on_message(shared: &Shared, table: &EntryTable, src: ProcessId, msg: Message) {
    let header = *msg.header();
    let me = shared.layer.rank();
    let abort =
        |why: String| shared.finish(Outcome::Abort(format!("charmrs: process {me}: {why}")));
    if let Some(root) = wire::tree_root(&msg) {
        return on_tree_broadcast(shared, table, src, msg, root);
    }
    match header.kind {
        wire::KIND_CALL | wire::KIND_CREATE => {
            let dst = header.dst_pe as usize;
            let Some(mailbox) = shared.mailbox(dst) else {
                return not_here(shared, src, dst);
            };
            match decode_guarded(msg, table) {
                Ok(env) => post(shared, dst, mailbox, env),
                Err(e) => malformed(shared, src, e),
            }
        }
        wire::KIND_REDUCE_FINISHED => {
            let dst = header.dst_pe as usize;
            let Some(mailbox) = shared.mailbox(dst) else {
                return not_here(shared, src, dst);
            };
            let decoded = wire::guarded(|| wire::decode_finished(&msg, table));
            match decoded {
                Ok(env) => post(shared, dst, mailbox, env),
                Err(e) => malformed(shared, src, e),
            }
        }
        wire::KIND_FULFIL
        | wire::KIND_PARTIAL
        | wire::KIND_REDUCE_UP
        | wire::KIND_REDUCE_DOWN
        | wire::KIND_QD
        | wire::KIND_POOL
        | wire::KIND_MOBILITY => {
            let dst = header.dst_pe as usize;
            let Some(mailbox) = shared.mailbox(dst) else {
                return not_here(shared, src, dst);
            };
            // Guarded: a pool message's task arguments decode with the user's `Deserialize`.
            let decoded = wire::guarded(|| match header.kind {
                wire::KIND_FULFIL | wire::KIND_PARTIAL => wire::decode_value(&msg),
                wire::KIND_QD => wire::decode_qd(&msg),
                wire::KIND_POOL => wire::decode_pool(&msg),
                wire::KIND_MOBILITY => wire::decode_mobility(&msg),
                _ => wire::decode_reduction(&msg),
            });
            match decoded {
                Ok(env) => post(shared, dst, mailbox, env),
                Err(e) => malformed(shared, src, e),
            }
        }
        wire::KIND_EXIT => {
            super::ending::record(shared, &msg, src);
            shared.finish_from_peer(Outcome::Exit(header.tag as u32 as i32))
        }
        wire::KIND_END_ACK | wire::KIND_END_GO => super::ending::record(shared, &msg, src),
        wire::KIND_ABORT => {
            let text = msg
                .segments()
                .first()
                .map(|s| String::from_utf8_lossy(s).into_owned());
            shared.finish_from_peer(Outcome::Abort(
                text.unwrap_or_else(|| format!("charmrs: process {src} aborted")),
            ));
        }
        // Read by process 0 before the job starts (`runtime::check_hellos`), never after.
        wire::KIND_HELLO => abort(format!("process {src} said hello after the job started")),
        other => abort(format!(
            "process {src} sent a message of unknown kind {other}"
        )),
    }
}
