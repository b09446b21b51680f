//! What UCX's callbacks produce: arrived messages in per-sender order,
//! failures, and the recycled send descriptors.
//!
//! # What this module owns
//!
//! [`Inbox`]: the state the active-message, completion and endpoint-error
//! callbacks write into, and that `progress` drains.
//!
//! # Invariants
//!
//! * The inbox is touched only by the thread holding the layer's worker
//!   lock (UCX calls the callbacks from inside `ucp_worker_progress` and
//!   the other worker calls made under that lock), so a `RefCell` suffices;
//!   no borrow is held across a call into UCX.
//! * Messages from one sender become ready strictly in sequence order, each
//!   sequence number exactly once: a rendezvous message reserves its place
//!   when its header arrives and later messages wait behind it until its
//!   data has landed.
//! * A failure of a peer is reported once (a clean goodbye suppresses it, unless a message of
//!   the peer's is lost with it: announced, its data not fetched).
//! * Operations towards a peer whose endpoint failed are not waited for
//!   ([`Inbox::holds_operations`], [`Inbox::needs_poller`]): UCX may never complete them (an
//!   endpoint without peer error handling to a dead process), and the layer must not poll,
//!   flush or linger for them. They stay counted per peer until UCX gives their buffers back.
//! * A gap in a sender's sequence (a message that never arrived, though later ones did: a
//!   forged or lost message; a rendezvous whose data is in flight is no gap) is reported as
//!   malformed input once it has lasted [`GAP_LIMIT`] (checked while the layer is progressed),
//!   not waited on for ever; the sender's later messages are dropped from then on. A sender
//!   lost or gone is not checked.
//! * Likewise a rendezvous message whose data cannot be received (its fetch failed, not for the
//!   sender's loss: UCX refused it, completed it short or failed it; or its segments did not
//!   fit the data) is reported once, naming the sender and the message
//!   ([`Inbox::fetch_failed`]), and the sender's stream is broken: the messages held back behind
//!   it and all its later ones are dropped (its place would otherwise stall the stream for
//!   ever, unreported).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};

use charmrs_transport::lanes::EndpointName;
use charmrs_transport::{ArrivalBatch, Header, Message, ProcessId, TransportError};

/// Per-sender reordering state.
#[derive(Debug, Default)]
struct Source {
    /// Next sequence number to hand out.
    next: u64,
    /// Messages ahead of `next`: `None` while a rendezvous is in flight.
    waiting: BTreeMap<u64, Option<Message>>,
    /// The sender said goodbye.
    departed: bool,
    /// The sender was reported lost.
    lost: bool,
    /// Its endpoint failed: operations towards it are not waited for (see the module docs).
    abandoned: bool,
    /// Operations towards it UCX holds buffers of (sends, rendezvous receives, reads).
    ops: usize,
    /// The sends among them.
    sends: usize,
    /// Sends towards it that failed, and those of them that no error returned by `progress`
    /// tells of (see [`InboxState::send_failed`]): counted on the failure path only, for the
    /// shutdown's report.
    sends_failed: usize,
    sends_failed_untold: usize,
    /// Since when the sender's next message is missing while later ones wait.
    gap_since: Option<std::time::Instant>,
    /// A gap was reported: the sender's stream is broken, its messages are dropped.
    broken: bool,
}

/// How long a gap in a sender's sequence may last before it is reported (UCX delivers each
/// endpoint's messages reliably; later ones overtake an earlier one by moments at most).
pub(crate) const GAP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The mutable part of the inbox.
#[derive(Debug, Default)]
pub(crate) struct InboxState {
    sources: Vec<Source>,
    /// Messages ready for the sink, in delivery order.
    pub(crate) ready: ArrivalBatch,
    /// Failures to report from `progress`, oldest first.
    pub(crate) errors: VecDeque<TransportError>,
    /// Peers whose endpoint failed since the last `progress` (their
    /// endpoints must be closed outside the callback).
    pub(crate) failed_eps: Vec<ProcessId>,
    /// Operations UCX still holds buffers of (sends, rendezvous receives, reads) towards peers
    /// whose endpoint did not fail: the ones waited for.
    pub(crate) in_flight: usize,
    /// The sends among them (`Worker::launch`, `PROGRESS_ON_SEND_FROM`).
    pub(crate) sends_in_flight: usize,
    /// Send descriptors given back by completion callbacks, for reuse
    /// (boxed: their address is handed to UCX).
    #[allow(clippy::vec_box)]
    pub(crate) spare: Vec<Box<crate::worker::SendOp>>,
    /// Rendezvous receives whose data is being fetched, per sender: the fetch limit applies to
    /// each sender apart, so a sender whose fetches stall (its process busy in a long entry
    /// method cannot serve them over a network) holds up only its own.
    pub(crate) rndv_active: Vec<usize>,
    /// Announced rendezvous messages waiting for a fetch slot, oldest first
    /// (see `PendingRndv::fetch_limit`); their UCX descriptors are held.
    pub(crate) rndv_waiting: VecDeque<crate::worker::PendingRndv>,
    /// How many of `rndv_waiting` each sender has (kept with it).
    pub(crate) rndv_waiting_from: Vec<usize>,
    /// Scratch list of senders at their fetch limit, reused by each scan of `rndv_waiting`.
    pub(crate) rndv_blocked: Vec<ProcessId>,
    /// Per peer: its rendezvous data may be copied by this core (same host,
    /// CMA possible); set with the peers' addresses.
    pub(crate) copied_here: Vec<bool>,
    /// Senders with a gap in their sequence (see `Source::gap_since`).
    pub(crate) gaps: usize,
    /// The layer is being dropped: `progress` returns no error any more.
    pub(crate) closing: bool,
}

/// Sends towards a peer ([`InboxState::sends_towards`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendCounts {
    /// UCX holds them (not completed).
    pub(crate) held: usize,
    /// They failed (refused, or given back failed or cancelled).
    pub(crate) failed: usize,
    /// Those of the failed that no error returned by `progress` tells of.
    pub(crate) failed_untold: usize,
}

/// What an operation UCX holds buffers of is, for the counts of [`InboxState::op_started`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// A send (`ucp_am_send_nbx`).
    Send,
    /// A rendezvous receive or a remote read.
    Fetch,
}

impl InboxState {
    /// UCX took an operation of `kind` towards `peer`.
    pub(crate) fn op_started(&mut self, peer: ProcessId, kind: OpKind) {
        let s = &mut self.sources[peer as usize];
        s.ops += 1;
        let send = kind == OpKind::Send;
        s.sends += usize::from(send);
        if !s.abandoned {
            self.in_flight += 1;
            self.sends_in_flight += usize::from(send);
        }
    }

    /// UCX gave back an operation of `kind` towards `peer` (or never took it).
    pub(crate) fn op_ended(&mut self, peer: ProcessId, kind: OpKind) {
        let s = &mut self.sources[peer as usize];
        s.ops = s.ops.saturating_sub(1);
        let send = kind == OpKind::Send;
        if send {
            s.sends = s.sends.saturating_sub(1);
        }
        if !s.abandoned {
            self.in_flight = self.in_flight.saturating_sub(1);
            if send {
                self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
            }
        }
    }

    /// A send towards `peer` failed (UCX refused it or gave it back failed or cancelled; with
    /// `peer_failure`, for the peer's failure or a cancellation). Counted for the shutdown's
    /// report, and as *untold* when no error returned by `progress` tells of it: during the
    /// shutdown (`closing`), or, before, when its peer had said goodbye and was not reported
    /// lost (a peer failure is then not reported). Otherwise the failure of the send itself, or
    /// the peer's loss, is reported (if `progress` is called again: see `Worker::undelivered`).
    pub(crate) fn send_failed(&mut self, peer: ProcessId, peer_failure: bool) {
        let s = &mut self.sources[peer as usize];
        s.sends_failed += 1;
        if self.closing || (peer_failure && s.departed && !s.lost) {
            s.sends_failed_untold += 1;
        }
    }

    /// Sends towards `peer`: those UCX holds (not completed), those that failed, and those of
    /// them that failed untold (see [`send_failed`](Self::send_failed)).
    pub(crate) fn sends_towards(&self, peer: ProcessId) -> SendCounts {
        let s = &self.sources[peer as usize];
        SendCounts {
            held: s.sends,
            failed: s.sends_failed,
            failed_untold: s.sends_failed_untold,
        }
    }

    /// Why `peer` was lost, if its loss waits among the failures to report (`progress` did not
    /// return it yet).
    pub(crate) fn unreported_loss(&self, peer: ProcessId) -> Option<&str> {
        self.errors.iter().find_map(|e| match e {
            TransportError::PeerLost { process, reason } if *process == peer => {
                Some(reason.as_str())
            }
            _ => None,
        })
    }

    /// Operations UCX holds buffers of, waited for or not.
    pub(crate) fn ops_held(&self) -> usize {
        self.sources.iter().map(|s| s.ops).sum()
    }

    /// Operations UCX holds buffers of towards `peer`.
    pub(crate) fn ops_towards(&self, peer: ProcessId) -> usize {
        self.sources[peer as usize].ops
    }

    /// `peer`'s endpoint failed: its operations are no longer waited for. Whether this is new.
    fn abandon(&mut self, peer: ProcessId) -> bool {
        let s = &mut self.sources[peer as usize];
        if s.abandoned {
            return false;
        }
        s.abandoned = true;
        self.in_flight = self.in_flight.saturating_sub(s.ops);
        self.sends_in_flight = self.sends_in_flight.saturating_sub(s.sends);
        true
    }
}

/// Rendezvous receives fetched at once from one sender. A sender streaming large messages
/// announces them all at once; fetching every one concurrently spreads the
/// copy over as many destination buffers (a working set far beyond the
/// cache, fresh buffers page-faulted) and is ~5× slower than fetching them
/// a few at a time into buffers the pool hands out again warm (split
/// messages one at a time: `PendingRndv::fetch_limit`).
pub(crate) const MAX_RNDV_ACTIVE: usize = 2;

/// Callback-side state of a layer; see the module docs.
#[derive(Debug)]
pub(crate) struct Inbox {
    pub(crate) size: u32,
    /// Workers per process (`UcxConfig::workers`): how worker ids are named in errors.
    pub(crate) lanes: u32,
    /// The largest message accepted from a peer (`UcxConfig::max_message`).
    pub(crate) max_message: usize,
    /// The worker the callbacks run on (they need it for
    /// `ucp_am_recv_data_nbx`; UCX does not pass it). Set once created.
    pub(crate) worker: std::cell::Cell<charmrs_ucx_sys::ucp_worker_h>,
    /// Receive buffers of rendezvous messages.
    pub(crate) pool: std::sync::Arc<charmrs_transport::RecvPool>,
    /// Eager messages delivered in UCX's own descriptors.
    pub(crate) lender: std::sync::Arc<crate::held::Lender>,
    pub(crate) state: RefCell<InboxState>,
}

impl Inbox {
    /// The inbox of a job of `size` processes, whose receive pool keeps at
    /// most `pool_bytes` idle.
    pub(crate) fn new(size: u32, pool_bytes: usize) -> Inbox {
        Inbox {
            size,
            lanes: 1,
            max_message: 1 << 30,
            worker: std::cell::Cell::new(std::ptr::null_mut()),
            pool: charmrs_transport::RecvPool::new(crate::worker::EAGER_POOL_MIN, pool_bytes),
            lender: std::sync::Arc::default(),
            state: RefCell::new(InboxState {
                sources: (0..size).map(|_| Source::default()).collect(),
                rndv_active: vec![0; size as usize],
                rndv_waiting_from: vec![0; size as usize],
                ..InboxState::default()
            }),
        }
    }

    /// Worker `id` as a user knows it, for error messages: its process, and with a worker per
    /// PE also its PE.
    pub(crate) fn peer(&self, id: ProcessId) -> EndpointName {
        EndpointName {
            id,
            lanes: self.lanes,
        }
    }

    /// Message `seq32` (the low 32 bits of its sequence number) from `src`
    /// arrived: complete (`Some`) or with its data still in flight (`None`,
    /// to be [`complete`](Inbox::complete)d with the full sequence number
    /// returned here). Returns `None` when the message is not taken: a duplicate (reported),
    /// or its sender's stream broke (reported before); its data, if in flight, must then not
    /// be fetched (it would fill the place of the message it duplicates).
    pub(crate) fn arrive(&self, src: ProcessId, seq32: u32, msg: Option<Message>) -> Option<u64> {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        let s = &mut st.sources[src as usize];
        if s.broken {
            return None; // its stream broke (reported): nothing of it is delivered any more
        }
        // Fewer than 2^31 messages are ever ahead of `next`: anything
        // "behind" it is a duplicate.
        let ahead = seq32.wrapping_sub(s.next as u32);
        let seq = s.next + u64::from(ahead);
        if ahead == 0 && s.waiting.is_empty() {
            if let Some(m) = msg {
                s.next += 1;
                st.ready.push(src, m);
                return Some(seq);
            }
        }
        if ahead >= 1 << 31 || s.waiting.contains_key(&seq) {
            st.errors.push_back(TransportError::Malformed(format!(
                "{} sent message number {seq32} twice",
                self.peer(src)
            )));
            return None;
        }
        s.waiting.insert(seq, msg);
        Self::flush(&mut st.sources[src as usize], src, &mut st.ready);
        Self::track_gap(&mut st.sources[src as usize], &mut st.gaps);
        Some(seq)
    }

    /// Small message `seq32` of one segment, `data`, from `src` arrived (UCX's buffer: valid
    /// during the callback only). In sequence — the usual case — its bytes are appended to the
    /// state's buffer of small messages, to be lent to the sink; otherwise it is held back, as
    /// an owned message, like any other.
    pub(crate) fn arrive_small(&self, src: ProcessId, seq32: u32, header: Header, data: &[u8]) {
        {
            let mut st = self.state.borrow_mut();
            let st = &mut *st;
            let s = &mut st.sources[src as usize];
            if !s.broken && seq32 == s.next as u32 && s.waiting.is_empty() {
                s.next += 1;
                st.ready.push_small(src, header, data);
                return;
            }
        }
        let msg = Message::with_copied_segment(header, data);
        self.arrive(src, seq32, Some(msg));
    }

    /// The data of rendezvous message `seq` from `src` landed.
    pub(crate) fn complete(&self, src: ProcessId, seq: u64, msg: Message) {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        let s = &mut st.sources[src as usize];
        if s.broken {
            return;
        }
        match s.waiting.get_mut(&seq) {
            Some(slot @ None) => *slot = Some(msg),
            _ => {
                st.errors.push_back(TransportError::Malformed(format!(
                    "data of message {seq} from {} arrived unannounced",
                    self.peer(src)
                )));
                return;
            }
        }
        Self::flush(s, src, &mut st.ready);
        Self::track_gap(s, &mut st.gaps);
    }

    /// Notes when a gap in `s`'s sequence opens or closes.
    fn track_gap(s: &mut Source, gaps: &mut usize) {
        let gap = s
            .waiting
            .first_key_value()
            .is_some_and(|(&k, _)| k != s.next);
        match (gap, s.gap_since.is_some()) {
            (true, false) => {
                s.gap_since = Some(std::time::Instant::now());
                *gaps += 1;
            }
            (false, true) => {
                s.gap_since = None;
                *gaps -= 1;
            }
            _ => {}
        }
    }

    /// Reports each sender whose sequence has had a gap for `limit` by `now` (once: the
    /// messages held back for it are dropped).
    pub(crate) fn check_gaps(&self, now: std::time::Instant, limit: std::time::Duration) {
        let mut st = self.state.borrow_mut();
        if st.gaps == 0 {
            return;
        }
        let st = &mut *st;
        for (p, s) in st.sources.iter_mut().enumerate() {
            let Some(since) = s.gap_since else { continue };
            if s.lost || s.departed {
                s.gap_since = None;
                st.gaps -= 1;
                continue;
            }
            if now.saturating_duration_since(since) < limit {
                continue;
            }
            st.errors.push_back(TransportError::Malformed(format!(
                "{}: message #{} never arrived, though {} later ones did (for {} s): \
                 a lost or forged message",
                self.peer(p as ProcessId),
                s.next,
                s.waiting.len(),
                limit.as_secs()
            )));
            s.waiting.clear();
            s.broken = true;
            s.gap_since = None;
            st.gaps -= 1;
        }
    }

    /// The data of rendezvous message `seq` (`len` bytes) from `src`, whose place in the order
    /// is reserved, will never land: its fetch failed, `why` (not for `src`'s loss: that is
    /// [`message_lost`](Self::message_lost)). Nothing of `src`'s after it can be delivered in
    /// order, so its stream is broken, as for a gap that lasts ([`check_gaps`](Self::check_gaps)):
    /// the messages held back (and the places reserved) are dropped, so are all its later
    /// ones, and one error says so, naming the sender and the message: malformed input if
    /// `malformed`, else an I/O error. Nothing if its stream broke already (reported).
    pub(crate) fn fetch_failed(
        &self,
        src: ProcessId,
        seq: u64,
        len: usize,
        why: &str,
        malformed: bool,
    ) {
        let dropped = {
            let mut st = self.state.borrow_mut();
            let st = &mut *st;
            let s = &mut st.sources[src as usize];
            if s.broken {
                return;
            }
            s.broken = true;
            if s.gap_since.take().is_some() {
                st.gaps -= 1;
            }
            // Dropped below, once the borrow is released (lent descriptors go back to the
            // lender, pooled buffers to the pool).
            let dropped = std::mem::take(&mut s.waiting);
            let others = dropped.keys().filter(|&&k| k != seq).count();
            let text = format!(
                "{}: message #{seq} ({len} bytes) could not be received: {why}; its stream is \
                 broken: {others} other messages of its not delivered yet and all its later \
                 ones are dropped",
                self.peer(src)
            );
            st.errors.push_back(if malformed {
                TransportError::Malformed(text)
            } else {
                TransportError::Io(std::io::Error::other(text))
            });
            dropped
        };
        drop(dropped);
    }

    /// Whether `src`'s stream broke (a gap that lasted, or a fetch that failed: reported; its
    /// messages are dropped).
    pub(crate) fn broken(&self, src: ProcessId) -> bool {
        self.state.borrow().sources[src as usize].broken
    }

    /// Whether some sender's sequence has a gap (cheap: for the progress loop).
    pub(crate) fn has_gaps(&self) -> bool {
        self.state.borrow().gaps > 0
    }

    fn flush(s: &mut Source, src: ProcessId, ready: &mut ArrivalBatch) {
        while let Some(entry) = s.waiting.first_entry() {
            if *entry.key() != s.next || entry.get().is_none() {
                break;
            }
            if let Some(m) = entry.remove() {
                ready.push(src, m);
            }
            s.next += 1;
        }
    }

    /// A message that is not ordered with a sender's stream (a read
    /// completion) is ready.
    pub(crate) fn push_ready(&self, src: ProcessId, msg: Message) {
        self.state.borrow_mut().ready.push(src, msg);
    }

    /// Drops every arrived message nobody will take any more (the worker is
    /// going): ready ones and those held back for order. Returns them,
    /// to be dropped by the caller once the borrow is released.
    pub(crate) fn discard_messages(&self) -> Vec<Message> {
        let mut st = self.state.borrow_mut();
        let mut gone = st.ready.discard();
        for s in &mut st.sources {
            gone.extend(std::mem::take(&mut s.waiting).into_values().flatten());
        }
        gone
    }

    /// Records a failure to report from `progress`.
    pub(crate) fn error(&self, e: TransportError) {
        self.state.borrow_mut().errors.push_back(e);
    }

    /// `src` said goodbye: losing it from now on is not a failure.
    pub(crate) fn depart(&self, src: ProcessId) {
        if let Some(s) = self.state.borrow_mut().sources.get_mut(src as usize) {
            s.departed = true;
        }
    }

    /// Whether `p` said goodbye.
    pub(crate) fn departed(&self, p: ProcessId) -> bool {
        self.state.borrow().sources[p as usize].departed
    }

    /// The endpoint to `p` failed with `reason`: its endpoint is to be closed and its
    /// operations are no longer waited for; [`TransportError::PeerLost`] is reported once,
    /// unless `p` said goodbye.
    pub(crate) fn peer_failed(&self, p: ProcessId, reason: String) {
        self.fail_peer(p, reason, false);
    }

    /// As [`peer_failed`](Self::peer_failed), for a failure that loses a message of `p`'s (its
    /// data announced, not fetched; a read's): reported even if `p` said goodbye, as it left
    /// before that message was delivered (once per peer all the same). (`peer_failed` too
    /// reports a peer that said goodbye while messages of its are announced, not fetched.)
    pub(crate) fn message_lost(&self, p: ProcessId, reason: String) {
        self.fail_peer(p, reason, true);
    }

    fn fail_peer(&self, p: ProcessId, reason: String, message_lost: bool) {
        let mut st = self.state.borrow_mut();
        if st.abandon(p) {
            st.failed_eps.push(p);
        }
        let s = &mut st.sources[p as usize];
        // Messages whose place in the order is reserved, their data not fetched: lost with the
        // endpoint (without peer error handling UCX may never complete their fetch at all).
        let reserved = s.waiting.values().filter(|m| m.is_none()).count();
        if s.lost || (s.departed && !message_lost && reserved == 0) {
            return;
        }
        s.lost = true;
        let reason = if s.departed {
            format!(
                "{reason}, after it said goodbye with a message to this process not delivered \
                 ({reserved} announced, their data not fetched)"
            )
        } else {
            reason
        };
        st.errors
            .push_back(TransportError::PeerLost { process: p, reason });
    }

    /// Whether `p`'s endpoint failed (its operations are not waited for).
    pub(crate) fn abandoned(&self, p: ProcessId) -> bool {
        self.state.borrow().sources[p as usize].abandoned
    }

    /// Whether a message from `p` arrived.
    pub(crate) fn heard_from(&self, p: ProcessId) -> bool {
        let st = self.state.borrow();
        let s = &st.sources[p as usize];
        s.next > 0 || !s.waiting.is_empty()
    }

    /// Whether `p` was reported lost.
    pub(crate) fn lost(&self, p: ProcessId) -> bool {
        self.state.borrow().sources[p as usize].lost
    }

    /// UCX took an operation of `kind` towards `peer`.
    pub(crate) fn op_started(&self, peer: ProcessId, kind: OpKind) {
        self.state.borrow_mut().op_started(peer, kind);
    }

    /// UCX gave back an operation of `kind` towards `peer` (or never took it).
    pub(crate) fn op_ended(&self, peer: ProcessId, kind: OpKind) {
        self.state.borrow_mut().op_ended(peer, kind);
    }

    /// Whether UCX holds operations of ours (sends or reads not completed) towards peers
    /// whose endpoint did not fail, or announced messages wait for a fetch slot (the next
    /// `progress` starts them).
    pub(crate) fn holds_operations(&self) -> bool {
        let st = self.state.borrow();
        st.in_flight > 0 || !st.rndv_waiting.is_empty()
    }

    /// Whether the progressing thread must come back rather than sleep: UCX holds operations
    /// of ours ([`holds_operations`](Self::holds_operations)), or a progress made by a sending
    /// thread (`Worker::launch`) left arrivals, failures or failed endpoints here, whose UCX
    /// events it used up (so an armed worker may not signal them).
    pub(crate) fn needs_poller(&self) -> bool {
        let st = self.state.borrow();
        st.in_flight > 0
            || !st.rndv_waiting.is_empty()
            || !st.ready.is_empty()
            || !st.errors.is_empty()
            || !st.failed_eps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use charmrs_transport::Header;

    fn m(tag: u64) -> Message {
        Message::new(Header::new(1, 0, 0, tag))
    }

    /// The ready messages (source, tag, whether lent, payload), taken out of the inbox.
    fn take_ready(i: &Inbox) -> Vec<(u32, u64, bool, Vec<u8>)> {
        let mut got = Vec::new();
        i.state.borrow_mut().ready.deliver(&mut |src, a| {
            let lent = matches!(a, charmrs_transport::Arrival::Borrowed { .. });
            let m = a.into_message();
            let data = m.segments().first().map(|b| b.to_vec()).unwrap_or_default();
            got.push((src, m.header().tag, lent, data));
        });
        got
    }

    fn ready_tags(i: &Inbox) -> Vec<(u32, u64)> {
        take_ready(i)
            .into_iter()
            .map(|(s, t, _, _)| (s, t))
            .collect()
    }

    #[test]
    fn small_messages_are_lent_in_order_and_held_back_behind_a_rendezvous() {
        let i = Inbox::new(2, 1 << 20);
        let h = |tag| Header::new(1, 0, 0, tag);
        i.arrive_small(1, 0, h(0), b"zero");
        i.arrive(1, 1, None); // a rendezvous whose data is in flight
        i.arrive_small(1, 2, h(2), b"two"); // behind it: held back, owned
        i.arrive_small(0, 0, h(100), b"other sender");
        assert_eq!(
            take_ready(&i),
            vec![
                (1, 0, true, b"zero".to_vec()),
                (0, 100, true, b"other sender".to_vec())
            ]
        );
        i.complete(1, 1, m(1));
        assert_eq!(
            take_ready(&i),
            vec![(1, 1, false, vec![]), (1, 2, false, b"two".to_vec())]
        );
        i.arrive_small(1, 2, h(2), b"two"); // a duplicate
        assert_eq!(i.state.borrow().errors.len(), 1);
    }

    #[test]
    fn the_poller_is_needed_while_anything_waits_for_it() {
        let i = Inbox::new(2, 1 << 20);
        assert!(!i.needs_poller());
        // An arrival a sending thread's progress left behind.
        i.arrive(1, 0, Some(m(0)));
        assert!(i.needs_poller() && !i.holds_operations());
        assert_eq!(ready_tags(&i), vec![(1, 0)]);
        assert!(!i.needs_poller());
        i.op_started(1, OpKind::Send);
        assert!(i.needs_poller() && i.holds_operations());
        i.op_ended(1, OpKind::Send);
        i.error(TransportError::Malformed("test".into()));
        assert!(i.needs_poller());
        i.state.borrow_mut().errors.clear();
        i.peer_failed(1, "gone".into());
        assert!(i.needs_poller());
    }

    #[test]
    fn rendezvous_holds_later_messages_back() {
        let i = Inbox::new(2, 1 << 20);
        i.arrive(1, 0, Some(m(0)));
        i.arrive(1, 1, None);
        i.arrive(1, 2, Some(m(2)));
        i.arrive(0, 0, Some(m(100)));
        assert_eq!(ready_tags(&i), vec![(1, 0), (0, 100)]);
        i.complete(1, 1, m(1));
        i.arrive(1, 3, Some(m(3)));
        assert_eq!(ready_tags(&i), vec![(1, 1), (1, 2), (1, 3)]);
    }

    #[test]
    fn a_going_worker_discards_ready_and_held_back_messages() {
        let i = Inbox::new(2, 1 << 20);
        i.arrive(1, 0, Some(m(0)));
        i.arrive(1, 1, None);
        i.arrive(1, 2, Some(m(2)));
        i.arrive(0, 1, Some(m(101)));
        let mut gone: Vec<u64> = i
            .discard_messages()
            .iter()
            .map(|m| m.header().tag)
            .collect();
        gone.sort_unstable();
        assert_eq!(gone, vec![0, 2, 101]);
        assert!(ready_tags(&i).is_empty());
        assert!(i.discard_messages().is_empty());
    }

    #[test]
    fn out_of_order_and_duplicates() {
        let i = Inbox::new(1, 1 << 20);
        i.arrive(0, 1, Some(m(1)));
        assert!(ready_tags(&i).is_empty());
        i.arrive(0, 0, Some(m(0)));
        assert_eq!(ready_tags(&i), vec![(0, 0), (0, 1)]);
        i.arrive(0, 1, Some(m(1)));
        i.complete(0, 9, m(9));
        assert_eq!(i.state.borrow().errors.len(), 2);
    }

    /// A failed fetch left its reserved place empty for ever: the sender's later messages
    /// waited behind it, unreported (the place was no gap).
    #[test]
    fn a_failed_fetch_breaks_its_senders_stream_reported_once() {
        let i = Inbox::new(2, 1 << 20);
        i.arrive(1, 0, Some(m(0)));
        i.arrive(1, 1, None); // its fetch fails
        i.arrive(1, 2, None); // in flight behind it
        i.arrive(1, 3, Some(m(3)));
        i.arrive(1, 5, Some(m(5))); // #4 missing: a gap
        i.arrive(0, 0, None);
        assert_eq!(ready_tags(&i), vec![(1, 0)]);
        assert!(!i.has_gaps(), "behind the places reserved");
        i.fetch_failed(1, 1, 4096, "the test says so", false);
        let e = i.state.borrow_mut().errors.pop_front().unwrap();
        assert!(matches!(e, TransportError::Io(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains(
                "process 1: message #1 (4096 bytes) could not be received: the test says so; its \
                 stream is broken: 3 other messages of its not delivered yet and all its later \
                 ones are dropped"
            ),
            "{e}"
        );
        assert!(i.broken(1) && !i.has_gaps());
        // The fetch in flight completes: dropped. Later messages and announcements are refused,
        // a second failure is not reported again.
        i.complete(1, 2, m(2));
        assert_eq!(i.arrive(1, 4, Some(m(4))), None);
        assert_eq!(i.arrive(1, 6, None), None);
        i.fetch_failed(1, 2, 1, "again", true);
        assert!(i.state.borrow().errors.is_empty());
        assert!(ready_tags(&i).is_empty());
        // The other sender's stream goes on.
        i.complete(0, 0, m(100));
        i.arrive(0, 1, Some(m(101)));
        assert_eq!(ready_tags(&i), vec![(0, 100), (0, 101)]);
        assert!(!i.broken(0));
    }

    #[test]
    fn a_duplicate_announcement_is_refused_and_the_original_keeps_its_place() {
        let i = Inbox::new(2, 1 << 20);
        assert_eq!(i.arrive(1, 0, None), Some(0));
        assert_eq!(i.arrive(1, 0, None), None, "a duplicate of one in flight");
        assert_eq!(i.arrive(1, 1, Some(m(1))), Some(1));
        assert_eq!(i.arrive(1, 1, None), None, "a duplicate of one held back");
        i.complete(1, 0, m(0));
        assert_eq!(i.arrive(1, 0, None), None, "a duplicate of one delivered");
        assert_eq!(ready_tags(&i), vec![(1, 0), (1, 1)]);
        let st = i.state.borrow();
        assert_eq!(st.errors.len(), 3, "{:?}", st.errors);
        assert!(st
            .errors
            .iter()
            .all(|e| e.to_string().contains("process 1 sent message number")));
    }

    #[test]
    fn sequence_numbers_wrap_at_32_bits() {
        let i = Inbox::new(1, 1 << 20);
        i.state.borrow_mut().sources[0].next = u64::from(u32::MAX);
        assert_eq!(i.arrive(0, 0, None), Some(1 << 32), "after the wrap");
        assert_eq!(i.arrive(0, u32::MAX, Some(m(1))), Some(u64::from(u32::MAX)));
        i.complete(0, 1 << 32, m(2));
        assert_eq!(ready_tags(&i), vec![(0, 1), (0, 2)]);
    }

    #[test]
    fn a_gap_that_lasts_is_reported_and_a_rendezvous_in_flight_is_none() {
        let i = Inbox::new(2, 1 << 20);
        i.arrive(0, 0, None); // data in flight: no gap
        i.arrive(0, 1, Some(m(1)));
        assert!(!i.has_gaps());
        i.arrive(1, 1, Some(m(11))); // #0 from process 1 missing
        assert!(i.has_gaps());
        let now = std::time::Instant::now();
        i.check_gaps(now, GAP_LIMIT);
        assert!(i.state.borrow().errors.is_empty(), "not yet");
        i.check_gaps(
            now + GAP_LIMIT + std::time::Duration::from_secs(1),
            GAP_LIMIT,
        );
        let e = i.state.borrow_mut().errors.pop_front().unwrap().to_string();
        assert!(
            e.contains("process 1") && e.contains("#0 never arrived"),
            "{e}"
        );
        assert!(!i.has_gaps());
        // Reported once: the broken sender's later messages are dropped, with no new gap and
        // no second error.
        i.arrive(1, 2, Some(m(12)));
        i.arrive(1, 0, Some(m(10)));
        assert!(!i.has_gaps());
        assert!(i.state.borrow().errors.is_empty());
        assert!(ready_tags(&i).iter().all(|&(s, _)| s == 0));
        // A gap that closes in time is no error (#2 is missing behind the rendezvous #0; it
        // counts once #0 and #1 are out).
        i.arrive(0, 3, Some(m(3)));
        assert!(!i.has_gaps(), "held back by the rendezvous in flight");
        i.complete(0, 0, m(0));
        assert!(i.has_gaps());
        i.arrive(0, 2, Some(m(2)));
        assert!(!i.has_gaps());
        assert_eq!(
            ready_tags(&i),
            vec![(0, 0), (0, 1), (0, 2), (0, 3)],
            "in order once the gap closed"
        );
    }

    #[test]
    fn loss_is_reported_once_and_not_after_goodbye() {
        let i = Inbox::new(3, 1 << 20);
        i.peer_failed(1, "x".into());
        i.peer_failed(1, "y".into());
        i.depart(2);
        i.peer_failed(2, "z".into());
        let st = i.state.borrow();
        assert_eq!(st.errors.len(), 1);
        assert_eq!(st.failed_eps, vec![1, 2], "each endpoint closed once");
        drop(st);
        assert!(i.lost(1) && !i.lost(2) && i.departed(2));
    }

    #[test]
    fn a_message_lost_with_a_peer_is_reported_though_it_said_goodbye() {
        let i = Inbox::new(4, 1 << 20);
        // 1 said goodbye with a rendezvous announced, its data not fetched: its loss loses the
        // message, and is reported.
        i.arrive(1, 0, None);
        i.depart(1);
        i.peer_failed(1, "gone".into());
        // 2 said goodbye, then a fetch from it failed (or a read did): reported.
        i.depart(2);
        i.message_lost(2, "receiving failed".into());
        i.message_lost(2, "again".into());
        // 3 said goodbye with nothing pending: not reported.
        i.depart(3);
        i.peer_failed(3, "gone".into());
        let st = i.state.borrow();
        let lost: Vec<String> = st.errors.iter().map(ToString::to_string).collect();
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert!(
            lost[0].contains("process 1") && lost[0].contains("said goodbye"),
            "{lost:?}"
        );
        assert!(lost[1].contains("process 2"), "{lost:?}");
        assert_eq!(st.failed_eps, vec![1, 2, 3]);
    }

    #[test]
    fn operations_towards_a_failed_peer_are_not_waited_for() {
        let i = Inbox::new(3, 1 << 20);
        i.op_started(1, OpKind::Send);
        i.op_started(1, OpKind::Fetch);
        i.op_started(2, OpKind::Send);
        assert_eq!(i.state.borrow().sends_in_flight, 2);
        i.peer_failed(1, "dead".into());
        i.state.borrow_mut().errors.clear();
        i.state.borrow_mut().failed_eps.clear();
        {
            let st = i.state.borrow();
            assert_eq!((st.in_flight, st.sends_in_flight), (1, 1), "2's send only");
            assert_eq!(
                (st.ops_towards(1), st.ops_held()),
                (2, 3),
                "still held by UCX"
            );
        }
        assert!(i.holds_operations() && i.needs_poller());
        i.op_ended(2, OpKind::Send);
        assert!(!i.holds_operations() && !i.needs_poller());
        // A later operation towards the failed peer, and the completions of its operations (if
        // UCX ever gives them back), leave the counts of the others alone.
        i.op_started(1, OpKind::Send);
        assert!(!i.holds_operations());
        for kind in [OpKind::Send, OpKind::Fetch, OpKind::Send, OpKind::Send] {
            i.op_ended(1, kind);
        }
        let st = i.state.borrow();
        assert_eq!((st.in_flight, st.sends_in_flight, st.ops_held()), (0, 0, 0));
    }
}
