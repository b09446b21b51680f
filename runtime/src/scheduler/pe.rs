//! One PE: its thread-local state and its Converse-style dispatch loop.
//!
//! Each turn the loop takes one arrived message from the mailbox (through the local queue when that
//! is not empty, so priorities order them), runs the most urgent message, and when there is
//! nothing to do spins briefly and then parks on the mailbox (no CPU burnt while idle; a network
//! PE whose layer cannot wake it naps instead). A network PE (the first PE of each process, or
//! every PE when the layer has a lane per PE) also polls the machine layer each
//! turn, unless network arrivals pile up in its queue (back-pressure). A chare's entries only
//! ever run on the PE that holds it.
//!
//! Invariants:
//! - `CURRENT` points at this thread's `PeState` exactly while `run_pe` is on the stack;
//! - no `RefCell` of the state is borrowed while user code (an entry, a constructor, a task) runs,
//!   so user code may send, create chares and spawn tasks freely;
//! - a message whose collection is not yet known here is buffered, and delivered when the
//!   collection's creation message arrives — never dropped.

use super::executor::Executor;
use super::queue::LocalQueue;
use super::shared::{Outcome, Shared};
use crate::collection::{CollectionId, Shape};
use crate::element::ElementObj;
use crate::envelope::{
    catch_panic, Body, Built, Construction, Control, CtxParts, Envelope, Invocation, LocalTask,
    Site,
};
use crate::error::{Error, Result};
use crate::future::{EncodeFn, FutureTable, PartialCount, Resolution};
use crate::index::Index;
use crate::pool::PoolState;
use crate::quiescence::QdState;
use crate::reduction::ReductionTable;
use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use charmrs_transport::{NAP_MAX, NAP_SPIN};

/// The elements of one collection that live on this PE.
pub(crate) struct LocalCollection {
    pub(crate) chare: &'static str,
    /// Entry-table id of the chare type's constructor (names the type in a checkpoint).
    pub(crate) ctor: u64,
    pub(crate) shape: Shape,
    /// Whether the chare type can migrate, and how to rebuild a migrated element.
    pub(crate) mobility: Mobility,
    /// In creation (then arrival) order: broadcasts visit them in this order.
    /// Shared with the broadcasts being delivered (cloning the `Rc` costs no allocation; a
    /// change while a broadcast holds it copies the list).
    pub(crate) elements: Rc<Vec<(Index, Rc<dyn ElementObj>)>>,
    position: FxHashMap<Index, usize>,
    /// Elements whose `async fn new` is still running, with the messages waiting for them.
    constructing: FxHashMap<Index, Vec<Envelope>>,
    /// Broadcasts that wait until no local element is under construction.
    waiting_broadcasts: Vec<Envelope>,
    /// A sparse array's broadcasts that wait for `done_inserting`'s seal here, in arrival order:
    /// before it, an element inserted away from its home may be known neither to its home nor
    /// as a home resident where it lives, and would miss the broadcast. Also any restored
    /// collection's while `restoring`.
    pub(crate) unsealed_broadcasts: Vec<Envelope>,
    /// A collection brought back by `restore` whose elements may still be on their way home:
    /// its broadcasts wait (in `unsealed_broadcasts`) until `restore` has them all in place
    /// ([`PeState::restored`]).
    pub(crate) restoring: bool,
    /// Elements whose home is this PE but which live elsewhere: last known PE and epoch.
    pub(crate) away: FxHashMap<Index, (u32, u32)>,
    /// Residents whose home is another PE.
    pub(crate) guests: usize,
    /// Migration count of each resident that has migrated at least once.
    pub(crate) epochs: FxHashMap<Index, u32>,
    /// At the home PE: messages for elements whose location is not known yet.
    pub(crate) lost: FxHashMap<Index, Vec<Envelope>>,
    /// Elements that left this PE and have not come back: a call forwarded from here follows
    /// the element's own departure, which is progress, and does not count as a hop (see
    /// `migration::MAX_HOPS`). Cleared when the element returns.
    pub(crate) departed: rustc_hash::FxHashSet<Index>,
    /// Sparse arrays, at the home PE: the PE each element homed here was inserted on (a second
    /// insertion of an index is caught here, wherever the two happened). Empty otherwise.
    pub(crate) inserted_on: FxHashMap<Index, u32>,
}

/// What a PE needs to receive migrating elements of a collection.
#[derive(Clone, Copy)]
pub(crate) struct Mobility {
    pub(crate) migratable: bool,
    pub(crate) unpack: crate::migration::UnpackFn,
}

impl LocalCollection {
    /// An element of this PE whose `async fn new` has not finished, if any.
    pub(crate) fn under_construction(&self) -> Option<Index> {
        self.constructing.keys().next().copied()
    }

    /// A collection of `shape` with no element here yet, built by `build`'s chare type.
    fn empty(shape: Shape, build: &dyn Construction) -> LocalCollection {
        LocalCollection {
            chare: build.chare_name(),
            ctor: build.ctor_id(),
            shape,
            mobility: build.mobility(),
            elements: Rc::default(),
            position: FxHashMap::default(),
            constructing: FxHashMap::default(),
            waiting_broadcasts: Vec::new(),
            unsealed_broadcasts: Vec::new(),
            restoring: false,
            away: FxHashMap::default(),
            guests: 0,
            epochs: FxHashMap::default(),
            lost: FxHashMap::default(),
            departed: rustc_hash::FxHashSet::default(),
            inserted_on: FxHashMap::default(),
        }
    }

    pub(crate) fn find(&self, index: &Index) -> Option<Rc<dyn ElementObj>> {
        self.position
            .get(index)
            .map(|&i| self.elements[i].1.clone())
    }

    /// Adds a resident element.
    pub(crate) fn insert(&mut self, index: Index, element: Rc<dyn ElementObj>, home: bool) {
        self.position.insert(index, self.elements.len());
        Rc::make_mut(&mut self.elements).push((index, element));
        if !home {
            self.guests += 1;
        }
    }

    /// Removes a resident element (the last one takes its place in broadcast order).
    pub(crate) fn remove(&mut self, index: &Index, home: bool) -> Option<Rc<dyn ElementObj>> {
        let pos = self.position.remove(index)?;
        let (_, element) = Rc::make_mut(&mut self.elements).swap_remove(pos);
        if let Some((moved, _)) = self.elements.get(pos) {
            self.position.insert(*moved, pos);
        }
        if !home {
            self.guests -= 1;
        }
        Some(element)
    }

    /// At the home of `index`, in a sparse array sealed by `done_inserting` (every element
    /// inserted then is known to its home: here, being built here, or away): whether `index`
    /// was never inserted, so a call for it has no element to wait for.
    pub(crate) fn never_inserted(&self, index: &Index) -> bool {
        matches!(self.shape, Shape::Sparse { .. })
            && !self.position.contains_key(index)
            && !self.constructing.contains_key(index)
            && !self.away.contains_key(index)
    }

    /// Whether every resident is at home and none is away (broadcasts take the fast path).
    pub(crate) fn settled(&self) -> bool {
        self.guests == 0 && self.away.is_empty()
    }
}

/// Thrown (with `resume_unwind`) by [`crate::abort`] to leave the running entry; not a panic.
pub(crate) struct AbortUnwind;

/// Everything a PE owns.
pub(crate) struct PeState {
    pub(crate) pe: usize,
    pub(crate) shared: Arc<Shared>,
    queue: RefCell<LocalQueue>,
    pub(crate) collections: RefCell<FxHashMap<CollectionId, LocalCollection>>,
    /// Messages for collections whose creation has not arrived yet.
    pending: RefCell<FxHashMap<CollectionId, Vec<Envelope>>>,
    next_collection: Cell<u64>,
    /// The runtime's hidden groups this PE made (`hidden_group`; PE 0 only).
    hidden_made: RefCell<Vec<CollectionId>>,
    /// After a restore (`crate::checkpoint`): every collection id of the job before the restart
    /// has a serial below this, and the restored ones are listed; a message for any other such
    /// id is for a group or section that was not restored, and will never find it.
    restored: RefCell<(u64, Vec<CollectionId>)>,
    next_placement: Cell<usize>,
    pub(crate) executor: Executor,
    pub(crate) futures: RefCell<FutureTable>,
    pub(crate) reductions: RefCell<ReductionTable>,
    pub(crate) qd: RefCell<QdState>,
    pub(crate) pool: RefCell<PoolState>,
    /// Application messages sent / processed by this PE (for quiescence detection).
    sent: Cell<u64>,
    processed: Cell<u64>,
    /// Elements whose `when` buffers need a re-check after the current message.
    dirty: RefCell<Vec<Rc<dyn ElementObj>>>,
    /// Timers in deadline order, each with the waker it wakes.
    timers: RefCell<std::collections::BTreeMap<TimerKey, Waker>>,
    next_timer: Cell<u64>,
    has_timers: Cell<bool>,
    /// Since when this PE (a network PE) has parked or napped without input: it then parks or
    /// naps again at once, without first spinning.
    quiet_since: Cell<Option<Instant>>,
    /// The PE is in `idle` (polling or parked).
    idling: Cell<bool>,
    /// Set when a call the network lent ran inside `idle` (`run_lent`): when the idle period
    /// ended (measurement clock).
    idle_end: Cell<Option<u64>>,
    /// Last known PE and epoch of migrated elements whose home is another PE (forwarding
    /// pointers left by departures, and the location cache for sends).
    pub(crate) locations: RefCell<FxHashMap<(CollectionId, Index), (u32, u32)>>,
    /// Migrations asked for during the current message, or waiting until their element is free.
    pub(crate) migrations: RefCell<Vec<crate::migration::Request>>,
    /// Load measurement and balancing state of this PE.
    pub(crate) lb: RefCell<crate::balance::PeLb>,
    /// The last measurement boundary: the end of the previous entry, or the PE waking up (the
    /// running entry is charged the time since).
    pub(crate) mark: Cell<u64>,
    /// Whether entries are timed (load balancing is on), and the timestamp unit.
    pub(crate) measuring: bool,
    pub(crate) secs_per_tick: f64,
    /// Seconds spent in entry methods, idle, and since the PE started (measurement).
    pub(crate) entry_secs: Cell<f64>,
    pub(crate) idle_secs: Cell<f64>,
    pub(crate) started: Instant,
    /// Elements per home PE of mapped and (once sealed) sparse arrays.
    pub(crate) home_counts: RefCell<FxHashMap<CollectionId, Rc<[u32]>>>,
    /// Reduction traffic for sparse arrays that are not sealed yet on this PE.
    pub(crate) unsealed: RefCell<FxHashMap<CollectionId, Vec<crate::sparse::Deferred>>>,
    /// Insertions into sparse arrays issued by this PE.
    pub(crate) inserts_issued: RefCell<FxHashMap<CollectionId, u64>>,
    /// `+trace`: this PE's timeline and counts (`None`: tracing is off).
    pub(crate) tracer: Option<Box<crate::trace::Tracer>>,
}

/// A timer of a PE: its wake-up time and a number unique on the PE (so that equal deadlines
/// coexist); given back by [`PeState::add_timer`] to cancel it.
pub(crate) type TimerKey = (Instant, u64);

/// The `chare` of the [`Site`] of a PE task other than the entry point (its `entry` is the
/// task's label).
pub(crate) const TASK_SITE: &str = "task";

const MAIN_SITE: Site = Site {
    chare: "entry point",
    index: Index::SCALAR,
    entry: "main",
};

thread_local! {
    static CURRENT: Cell<*const PeState> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with this thread's PE, or reports that the thread is not a running PE.
#[inline]
pub(crate) fn with_pe<R>(what: &'static str, f: impl FnOnce(&PeState) -> R) -> Result<R> {
    let p = CURRENT.with(Cell::get);
    if p.is_null() {
        return Err(Error::NotInRuntime { what });
    }
    // SAFETY: `run_pe` sets `CURRENT` to a `PeState` on its own stack frame and resets it to null
    // before that frame ends; `CURRENT` is thread-local, so `p` is valid here and only this thread
    // can reach it. Only shared references are handed out (mutation goes through `RefCell`/`Cell`).
    Ok(f(unsafe { &*p }))
}

/// Longest sleep of a parked network PE between looks at the network (a safety net: the layer's
/// wake-up hook normally ends the sleep at once). A look that finds nothing parks again at once:
/// when it went through a whole idle spin first, the idle PEs' looks (with a UCX worker per PE,
/// every idle PE looks) preempted the busy ones and made an 8 B ping-pong beside them bimodal
/// (0.6 or 7–25 µs per run on 2 cores; docs/performance.md, "Session 20").
const NETWORK_PARK_MAX: std::time::Duration = std::time::Duration::from_millis(5);

/// Backlog of network arrivals in its local queue from which the network PE skips polls of the
/// network, at most this many turns in a row (see `run_pe`).
const NETWORK_BACKLOG: usize = 16;

/// After napping this long without input, a network PE that its layer cannot wake naps
/// [`NAP_LONG`] at a time instead of [`NAP_MAX`] (local messages still wake it at once).
const NAP_LONG_AFTER: Duration = Duration::from_millis(100);

/// Most envelopes a turn moves from the mailbox into the local queue (where priorities order
/// them).
const MAILBOX_BATCH: usize = 64;

/// Nap of a network PE that its layer cannot wake, long without input.
const NAP_LONG: Duration = Duration::from_millis(1);

/// Runs `f` on the state of PE `pe` if the calling thread runs that PE; else `None`.
fn on_current<R>(pe: usize, f: impl FnOnce(&PeState) -> R) -> Option<R> {
    let p = CURRENT.with(Cell::get);
    if p.is_null() {
        return None;
    }
    // SAFETY: as in `with_pe`: a non-null `CURRENT` points to this thread's live `PeState`, and
    // the reference does not outlive this call.
    let state = unsafe { &*p };
    (state.pe == pe).then(|| f(state))
}

/// Most out-of-band segments a future's value takes into its message: a message holds
/// [`MAX_SEGMENTS`](charmrs_transport::MAX_SEGMENTS), of which the outcome, a partial's count
/// and the encoded value take three.
const VALUE_SEGMENTS_MAX: usize = charmrs_transport::MAX_SEGMENTS as usize - 3;

/// Queues `env` in the local queue of PE `dst` if the calling thread is that PE; else gives it
/// back.
pub(crate) fn queue_if_current(dst: usize, env: Envelope) -> Option<Envelope> {
    let mut env = Some(env);
    on_current(dst, |state| {
        if let Some(env) = env.take() {
            state.queue.borrow_mut().push_network(env);
        }
    });
    env
}

/// Queues a task's resumption in the local queue of PE `pe` if the calling thread is that PE
/// (and the queue is not in use); else gives it back for the mailbox. A network PE queues what
/// it polls there, quiescence probes included: a resumption queued in the mailbox could be
/// overtaken by a probe that arrived after it, which would then see a runnable task's PE as
/// quiet.
pub(crate) fn queue_resume_if_current(pe: usize, env: Envelope) -> Option<Envelope> {
    let mut env = Some(env);
    on_current(pe, |state| {
        // The queue in use (a wake-up from inside it): the mailbox takes the resumption.
        if let Ok(mut queue) = state.queue.try_borrow_mut() {
            if let Some(resume) = env.take() {
                queue.push(resume);
            }
        }
    });
    env
}

/// Runs a call the machine layer lent (`seg0`, a call for PE `dst`) at once, without boxing or
/// queueing it, if the calling thread is PE `dst`, nothing waits in its local queue (so nothing
/// that arrived before is overtaken), the job is not stopping, and the call is a plain point
/// call to an element that is here and built. `None` when that does not apply (the caller queues
/// the call as usual); `Some(Err)` if its arguments do not decode.
pub(crate) fn run_lent_now(
    shared: &Shared,
    dst: usize,
    seg0: &[u8],
    table: &crate::registry::EntryTable,
) -> Option<std::result::Result<(), String>> {
    on_current(dst, |state| {
        if !state.queue.borrow().is_empty() || shared.stopping() {
            return None;
        }
        state.run_lent(seg0, table)
    })
    .flatten()
}

/// Whether the calling thread is a running PE.
pub(crate) fn on_pe() -> bool {
    !CURRENT.with(Cell::get).is_null()
}

impl PeState {
    fn new(pe: usize, shared: Arc<Shared>) -> PeState {
        let measuring = shared.balance.measuring();
        // Calibrates the timestamp source (once per process) before the first timestamp.
        let secs_per_tick = crate::measure::init_clock();
        let shared_trace = shared.trace.is_some();
        PeState {
            pe,
            shared,
            queue: RefCell::default(),
            collections: RefCell::default(),
            pending: RefCell::default(),
            next_collection: Cell::new(0),
            hidden_made: RefCell::default(),
            restored: RefCell::new((0, Vec::new())),
            next_placement: Cell::new(pe),
            executor: Executor::default(),
            futures: RefCell::new(FutureTable::new(pe)),
            reductions: RefCell::default(),
            qd: RefCell::default(),
            pool: RefCell::default(),
            sent: Cell::new(0),
            processed: Cell::new(0),
            dirty: RefCell::default(),
            timers: RefCell::default(),
            next_timer: Cell::new(0),
            has_timers: Cell::new(false),
            quiet_since: Cell::new(None),
            idling: Cell::new(false),
            idle_end: Cell::new(None),
            locations: RefCell::default(),
            migrations: RefCell::default(),
            lb: RefCell::default(),
            mark: Cell::new(crate::measure::ticks()),
            measuring,
            secs_per_tick,
            entry_secs: Cell::new(0.0),
            idle_secs: Cell::new(0.0),
            started: Instant::now(),
            home_counts: RefCell::default(),
            unsealed: RefCell::default(),
            inserts_issued: RefCell::default(),
            tracer: shared_trace.then(|| Box::new(crate::trace::Tracer::new(pe, secs_per_tick))),
        }
    }

    /// Number of PEs in the job.
    #[inline]
    pub(crate) fn num_pes(&self) -> usize {
        self.shared.num_pes
    }

    /// Checks a PE number.
    pub(crate) fn check_pe(&self, pe: usize) -> Result<()> {
        if pe < self.num_pes() {
            Ok(())
        } else {
            Err(Error::PeOutOfRange {
                pe,
                num_pes: self.num_pes(),
            })
        }
    }

    /// Posts `env` to PE `dst` (which must be valid): the local queue for self-sends, the
    /// destination's mailbox otherwise.
    #[inline]
    pub(crate) fn send(&self, dst: usize, env: Envelope) {
        let dst = match &env.body {
            Body::Point { coll, index, .. } => self.point_dest(*coll, index, dst),
            _ => dst,
        };
        self.send_located(dst, env);
    }

    /// Where a point call to element `index` of `coll`, addressed to PE `addressed`, goes: the
    /// element's cached location, else the address.
    #[inline(always)]
    pub(crate) fn point_dest(&self, coll: CollectionId, index: &Index, addressed: usize) -> usize {
        self.cached_location(coll, index).unwrap_or(addressed)
    }

    /// Whether PE `dst` is in another process (calls to it are encoded, see
    /// [`send_point_remote`](Self::send_point_remote)).
    #[inline]
    pub(crate) fn is_remote(&self, dst: usize) -> bool {
        dst != self.pe && self.shared.mailbox(dst).is_none()
    }

    /// [`send`](Self::send) of an envelope whose destination was already looked up
    /// ([`point_dest`](Self::point_dest)).
    pub(crate) fn send_located(&self, dst: usize, mut env: Envelope) {
        if matches!(env.body, Body::Point { .. }) && !env.route.is_set() {
            env.route = crate::envelope::Route::new(self.pe, 0);
        }
        self.send_direct(dst, env);
    }

    /// Posts `env` to PE `dst` as addressed (no location-cache lookup).
    #[inline]
    pub(crate) fn send_direct(&self, dst: usize, env: Envelope) {
        // Counted once handed over: encoding for another process runs the arguments' (user)
        // `Serialize`, and a panic there sends nothing. Counting first would leave a message
        // in flight for ever, and quiescence undetectable. (Probes are answered between turns,
        // so counting after the hand-over is never seen early.)
        let counted = env.counted();
        if dst == self.pe {
            self.queue.borrow_mut().push(env);
        } else if let Some(mailbox) = self.shared.mailbox(dst) {
            if self.shared.wire_check && env.crosses_processes() {
                self.send_through_wire(dst, env);
            } else {
                mailbox.push(env);
            }
        } else {
            self.send_remote(dst, env);
        }
        if counted {
            self.sent.set(self.sent.get() + 1);
        }
    }

    /// (sent, processed) application messages of this PE.
    pub(crate) fn message_counts(&self) -> (u64, u64) {
        (self.sent.get(), self.processed.get())
    }

    /// `+wirecheck`: encodes `env` as for another process and decodes it again, so that every
    /// argument type is proven to survive the trip.
    #[cold]
    fn send_through_wire(&self, dst: usize, env: Envelope) {
        let table = self.shared.entries;
        let decoded = crate::wire::encode(&env, table, self.pe as u32, dst as u32)
            .and_then(|msg| crate::wire::decode(msg, table));
        match decoded {
            Ok(env) => self.shared.mailbox(dst).expect("a local PE").push(env),
            Err(e) => self.abort_job(format!("charmrs: +wirecheck: a message from PE {} to PE {dst} does not survive the wire: {e}", self.pe)),
        }
    }

    /// Sends a point call to PE `dst` of another process ([`is_remote`](Self::is_remote)): what
    /// [`send`](Self::send) does with an envelope for another process, without building one.
    pub(crate) fn send_point_remote(
        &self,
        dst: usize,
        coll: CollectionId,
        index: Index,
        call: &dyn Invocation,
        priority: i32,
    ) {
        let table = self.shared.entries;
        let process = self.shared.process_of(dst);
        let layer = &self.shared.layer;
        let sent = crate::wire::encode_point_with(
            table,
            coll,
            index,
            call,
            priority,
            crate::envelope::Route::UNSET,
            self.pe,
            dst,
            |header, seg0, segs| {
                if segs.is_empty() {
                    // One segment: the layer copies it from the encoding buffer.
                    if let Some(t) = &self.tracer {
                        t.sent(seg0.len());
                    }
                    layer
                        .send_copy(process, header, seg0)
                        .map_err(|e| e.to_string())
                } else {
                    let msg = crate::wire::owned_call_message(header, seg0, segs)?;
                    self.trace_sent(&msg);
                    layer.send(process, msg).map_err(|e| e.to_string())
                }
            },
        )
        .and_then(|sent| sent);
        // Counted once encoded (see `send_direct`).
        self.sent.set(self.sent.get() + 1);
        if let Err(e) = sent {
            self.send_failed(dst, process, &e);
        }
    }

    /// Ends the job: a message for PE `dst` in process `process` could not be encoded or sent.
    #[cold]
    fn send_failed(&self, dst: usize, process: u32, why: &str) {
        self.abort_job(format!(
            "charmrs: PE {} could not send to PE {dst} in process {process}: {why}",
            self.pe
        ));
    }

    /// Hands an encoded message for PE `dst` of another process to the machine layer; an
    /// encoding or sending failure aborts the job.
    fn send_encoded(
        &self,
        dst: usize,
        encoded: std::result::Result<charmrs_transport::Message, String>,
    ) {
        let process = self.shared.process_of(dst);
        let sent = encoded.and_then(|msg| {
            self.trace_sent(&msg);
            self.shared
                .layer
                .send(process, msg)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = sent {
            self.send_failed(dst, process, &e);
        }
    }

    /// `+trace`: counts `msg`, about to leave through the machine layer.
    #[inline]
    pub(crate) fn trace_sent(&self, msg: &charmrs_transport::Message) {
        #[cold]
        #[inline(never)]
        fn count(t: &crate::trace::Tracer, msg: &charmrs_transport::Message) {
            t.sent(msg.total_len());
        }
        if let Some(t) = &self.tracer {
            count(t, msg);
        }
    }

    /// Sends `env` to PE `dst` of another process through the machine layer.
    #[cold]
    fn send_remote(&self, dst: usize, env: Envelope) {
        let process = self.shared.process_of(dst);
        let control = crate::wire::qd_message(&env, self.pe as u32, dst as u32)
            .or_else(|| crate::wire::pool_message(&env, self.pe as u32, dst as u32))
            .or_else(|| crate::wire::mobility_message(&env, self.pe as u32, dst as u32));
        if let Some(msg) = control {
            return self.send_encoded(dst, msg);
        }
        if !env.crosses_processes() {
            return self.abort_job(format!(
                "charmrs: PE {} tried to send a runtime message ({}) to PE {dst} in process {process}: \
                 this kind of message does not cross processes yet (entry calls and creations do)",
                self.pe,
                env.kind_name()
            ));
        }
        let table = self.shared.entries;
        self.send_encoded(
            dst,
            crate::wire::encode(&env, table, self.pe as u32, dst as u32),
        );
    }

    /// Delivers `call` to every element of `coll`: down the spanning tree of processes (one
    /// message per child process, encoded once), and to each PE of this process.
    pub(crate) fn broadcast(&self, coll: CollectionId, call: Box<dyn Invocation>, priority: i32) {
        let layer = &self.shared.layer;
        let (me, n) = (layer.rank(), layer.size());
        if n > 1 {
            let table = self.shared.entries;
            let sent = crate::wire::encode_tree_broadcast(
                table,
                coll,
                &*call,
                priority,
                me,
                self.pe as u32,
            )
            .and_then(|msg| {
                for child in crate::wire::tree_children(me, me, n) {
                    let mut m = msg.clone();
                    let mut h = *m.header();
                    h.dst_pe = child * self.shared.local_pes() as u32;
                    m.set_header(h);
                    self.trace_sent(&m);
                    layer
                        .send(child, m)
                        .map_err(|e| format!("to process {child}: {e}"))?;
                }
                Ok(())
            });
            if let Err(e) = sent {
                return self.abort_job(format!("charmrs: PE {}: a broadcast failed: {e}", self.pe));
            }
            // Every PE of the other processes will process one delivery.
            for _ in 0..self.num_pes() - self.shared.local_pes() {
                self.count_sent();
            }
        }
        let first = self.shared.first_pe;
        let last = first + self.shared.local_pes() - 1;
        for dst in first..last {
            self.send(
                dst,
                Envelope::new(
                    priority,
                    Body::Broadcast {
                        coll,
                        call: call.clone_box(),
                    },
                ),
            );
        }
        self.send(
            last,
            Envelope::new(priority, Body::Broadcast { coll, call }),
        );
    }

    /// How many collection ids this PE has made.
    pub(crate) fn collections_made(&self) -> u64 {
        self.next_collection.get()
    }

    /// A fresh job-wide collection id.
    pub(crate) fn new_collection_id(&self) -> CollectionId {
        let serial = self.next_collection.get();
        self.next_collection.set(serial + 1);
        CollectionId::new(self.pe, serial)
    }

    /// A PE for a chare whose placement the program left to the runtime (round robin).
    pub(crate) fn pick_pe(&self) -> usize {
        let pe = self.next_placement.get() % self.num_pes();
        self.next_placement.set(pe + 1);
        pe
    }

    /// Ends the job with an abort (first cause wins).
    pub(crate) fn abort_job(&self, msg: String) {
        self.shared.finish(Outcome::Abort(msg));
    }

    /// Queues `element` for a `when` re-check after the current message.
    pub(crate) fn mark_dirty(&self, element: Rc<dyn ElementObj>) {
        self.dirty.borrow_mut().push(element);
    }

    /// Delivers buffered `when` calls that became eligible, until none is.
    fn recheck_dirty(&self) {
        loop {
            let batch = std::mem::take(&mut *self.dirty.borrow_mut());
            if batch.is_empty() {
                return;
            }
            for element in batch {
                // A panic here comes from a `when` condition (entries catch their own).
                if let Err(payload) = catch_unwind(AssertUnwindSafe(|| element.recheck_whens(self)))
                {
                    if !payload.is::<AbortUnwind>() {
                        let what = crate::panic::describe(payload);
                        self.abort_job(format!(
                            "charmrs: job aborted: panic in a `when` condition on PE {}: {what}",
                            self.pe
                        ));
                    }
                }
            }
        }
    }

    /// Stores a task on this PE's executor and polls it once.
    pub(crate) fn spawn(&self, task: LocalTask) {
        self.spawn_labelled(task, "runtime task");
    }

    /// [`spawn`](Self::spawn), naming the task by chare and entry in traces.
    pub(crate) fn spawn_labelled(&self, task: LocalTask, label: super::executor::TaskLabel) {
        self.executor.spawn(&self.shared, self.pe, task, label);
    }

    /// Sends `outcome` to future `id` of PE `owner`: directly if that is this PE, moved to another
    /// PE of this process, or encoded with `encode` for a PE of another process.
    pub(crate) fn fulfil(&self, owner: usize, id: u64, outcome: Resolution, encode: EncodeFn) {
        self.route_value(None, owner, id, outcome, encode);
    }

    /// Sends a future's value (`partial`: one PE's part of a gather) to PE `owner`: applied here,
    /// moved to another PE of this process, or encoded for another process.
    fn route_value(
        &self,
        partial: Option<PartialCount>,
        owner: usize,
        id: u64,
        outcome: Resolution,
        encode: EncodeFn,
    ) {
        if owner == self.pe {
            match partial {
                Some(count) => self.partial_local(id, outcome, count),
                None => self.fulfil_local(id, outcome),
            }
        } else if self.shared.mailbox(owner).is_some() {
            let outcome = outcome.map_err(Box::new);
            let body = match partial {
                Some(count) => Body::Partial { id, outcome, count },
                None => Body::Fulfil { id, outcome },
            };
            self.send(owner, Envelope::new(0, body));
        } else {
            self.send_value(partial, owner, id, outcome, encode);
        }
    }

    /// A proxy to the runtime's hidden group of `C` under reserved id `coll` (the checkpoint's
    /// and the readonlies' helpers), made on every PE on first use. PE 0 only, so it is made
    /// once: its creation reaches each PE before any call PE 0 sends it after.
    pub(crate) fn hidden_group<C: crate::chare::Chare>(
        &self,
        coll: CollectionId,
        build: impl Fn() -> Box<dyn crate::envelope::Construction>,
    ) -> crate::proxy::Proxy<C> {
        debug_assert_eq!(self.pe, 0, "hidden groups are made by PE 0");
        if !self.hidden_made.borrow().contains(&coll) {
            self.hidden_made.borrow_mut().push(coll);
            for dst in 0..self.num_pes() {
                self.send(
                    dst,
                    Envelope::new(
                        0,
                        Control::Create {
                            coll,
                            shape: Shape::Group,
                            build: build(),
                        },
                    ),
                );
            }
        }
        crate::proxy::Proxy::from_parts(coll, Shape::Group)
    }

    /// Stores the value of this PE's future `id`.
    pub(crate) fn fulfil_local(&self, id: u64, outcome: Resolution) {
        let result = self.futures.borrow_mut().fulfil(id, outcome);
        if let Err(problem) = result {
            self.abort_job(format!("charmrs: {problem} (detected on PE {})", self.pe));
        }
    }

    /// Sends one PE's (or one away element's) part of a broadcast result to gather future `id`
    /// of PE `owner`.
    pub(crate) fn partial(
        &self,
        owner: usize,
        id: u64,
        outcome: Resolution,
        encode: EncodeFn,
        count: PartialCount,
    ) {
        self.route_value(Some(count), owner, id, outcome, encode);
    }

    /// Adds a partial to this PE's gather future `id`.
    pub(crate) fn partial_local(&self, id: u64, outcome: Resolution, count: PartialCount) {
        let done = self.futures.borrow_mut().add_partial(id, outcome, count);
        match done {
            Ok(Some(outcome)) => self.fulfil_local(id, outcome),
            Ok(None) => {}
            Err(problem) => self.abort_job(format!("charmrs: {problem}")),
        }
    }

    /// Counts an application message sent around [`send`](Self::send) (quiescence detection).
    pub(crate) fn count_sent(&self) {
        self.sent.set(self.sent.get() + 1);
    }

    /// Counts an application message processed outside the queue's path (quiescence detection:
    /// the end of a [`QdHold`](crate::quiescence::QdHold)).
    pub(crate) fn count_processed(&self) {
        self.processed.set(self.processed.get() + 1);
    }

    /// Encodes a future's value (or error) for PE `owner` of another process and sends it.
    #[cold]
    fn send_value(
        &self,
        partial: Option<PartialCount>,
        owner: usize,
        id: u64,
        outcome: Resolution,
        encode: EncodeFn,
    ) {
        // Large `PodVec`s and `Buffer`s in the value go out as segments of their own (no copy),
        // unless there are more than a message holds: then the value is encoded whole.
        let encoded = match outcome {
            Ok(v) => match crate::wire::collecting(|| encode(&*v)) {
                (Ok(bytes), segments) if segments.len() <= VALUE_SEGMENTS_MAX => {
                    Ok(Ok((bytes, segments)))
                }
                (Ok(_), _) => encode(&*v).map(|bytes| Ok((bytes, Vec::new()))),
                (Err(e), _) => Err(e),
            },
            Err(e) => Ok(Err(e)),
        };
        // Counted once encoded (see `send_direct`).
        self.count_sent();
        let msg = encoded
            .and_then(|value| {
                crate::wire::value_message(partial, id, self.pe as u32, owner as u32, value)
            })
            .map_err(|e| format!("a future's value: {e}"));
        self.send_encoded(owner, msg);
    }

    /// Timers in the heap (for tests).
    #[cfg(test)]
    pub(crate) fn pending_timers(&self) -> usize {
        self.timers.borrow().len()
    }

    /// Wakes `waker` at `deadline` (for [`crate::sleep`]); the key cancels it.
    pub(crate) fn add_timer(&self, deadline: Instant, waker: Waker) -> TimerKey {
        let key = (deadline, self.next_timer.get());
        self.next_timer.set(key.1 + 1);
        self.timers.borrow_mut().insert(key, waker);
        self.has_timers.set(true);
        key
    }

    /// Forgets a timer that has not fired (a [`crate::sleep`] dropped before its deadline).
    pub(crate) fn cancel_timer(&self, key: TimerKey) {
        self.timers.borrow_mut().remove(&key);
    }

    /// Wakes every timer that is due; returns the next deadline, if any.
    fn fire_timers(&self) -> Option<Instant> {
        let mut timers = self.timers.borrow_mut();
        if timers.is_empty() {
            self.has_timers.set(false);
            return None;
        }
        let now = Instant::now();
        while let Some(due) = timers.first_entry() {
            if due.key().0 > now {
                return Some(due.key().0);
            }
            due.remove().wake();
        }
        None
    }

    /// See [`run_lent_now`]: runs the call in `seg0` if it is a plain point call to an element
    /// that is here and built, with a turn's bookkeeping around it (the message counted for
    /// quiescence; `when` buffers, migrations and timers after). Inside `idle` the idle period
    /// ends where the entry starts, and the entry is timed from there.
    fn run_lent(
        &self,
        seg0: &[u8],
        table: &crate::registry::EntryTable,
    ) -> Option<std::result::Result<(), String>> {
        let call = crate::wire::lent_point_call(seg0, table)?;
        let (chare, element) = {
            let cols = self.collections.borrow();
            let c = cols.get(&call.coll)?;
            (c.chare, c.find(&call.index)?)
        };
        let site = Site {
            chare,
            index: call.index,
            entry: call.name,
        };
        let mut before = || {
            if self.idling.get() && self.idle_end.get().is_none() {
                let now = crate::measure::ticks();
                self.idle_end.set(Some(now));
                if self.measuring {
                    self.mark.set(now);
                }
            }
            self.processed.set(self.processed.get() + 1);
        };
        let ran = (call.codec.run_lent)(self, &element, call.args, call.reply, site, &mut before)
            .map_err(|e| format!("`{}`: {e}", call.name));
        // Before the turn's end: a migration the call asked for runs there, and counts the
        // element's references to see whether anything still uses it.
        drop(element);
        if ran.is_ok() {
            self.end_turn();
        }
        Some(ran)
    }

    /// What follows every delivered message: `when` buffers whose element changed are looked at
    /// again, requested migrations run, due timers fire.
    fn end_turn(&self) {
        self.recheck_dirty();
        if !self.migrations.borrow().is_empty() {
            self.run_migrations();
        }
        if self.has_timers.get() {
            self.fire_timers();
        }
    }

    pub(crate) fn deliver(&self, env: Envelope) {
        let priority = env.priority;
        let route = env.route;
        match env.body {
            Body::Point { coll, index, call } => {
                let found = self
                    .collections
                    .borrow()
                    .get(&coll)
                    .map(|c| (c.chare, c.find(&index)));
                match found {
                    None => {
                        let mut env = Envelope::new(priority, Body::Point { coll, index, call });
                        env.route = route;
                        self.buffer(coll, env);
                    }
                    Some((chare, Some(element))) => {
                        if route.hops() > 0 {
                            self.correct_origin(coll, index, route.origin());
                        }
                        let site = Site {
                            chare,
                            index,
                            entry: call.entry_name(),
                        };
                        call.invoke(self, &element, site);
                    }
                    Some((_, None)) if self.under_construction(coll, index) => {
                        // Its `async fn new` is still running: the message waits for it.
                        let mut env = Envelope::new(priority, Body::Point { coll, index, call });
                        env.route = route;
                        let mut cols = self.collections.borrow_mut();
                        let c = cols.get_mut(&coll).expect("looked up above");
                        c.constructing
                            .get_mut(&index)
                            .expect("checked above")
                            .push(env);
                    }
                    Some(_) => {
                        let mut env = Envelope::new(priority, Body::Point { coll, index, call });
                        env.route = route;
                        self.not_here(coll, index, env);
                    }
                }
            }
            Body::Broadcast { coll, call } => {
                // One look at the collection: whether the broadcast must wait here (a sparse
                // array before its seal: an element inserted away from its home may be known
                // nowhere yet; an element still being built: each must get it once), else
                // whom it reaches.
                let found = self.collections.borrow().get(&coll).map(|c| {
                    let unsealed = (matches!(c.shape, Shape::Sparse { .. })
                        && !self.home_counts.borrow().contains_key(&coll))
                        || c.restoring;
                    let waits = unsealed || !c.constructing.is_empty();
                    let settled = (!waits && c.settled()).then(|| c.elements.clone());
                    (c.chare, waits.then_some(unsealed), settled)
                });
                match found {
                    None => self.buffer(
                        coll,
                        Envelope::new(priority, Body::Broadcast { coll, call }),
                    ),
                    Some((_, Some(unsealed), _)) => {
                        let env = Envelope::new(priority, Body::Broadcast { coll, call });
                        let mut cols = self.collections.borrow_mut();
                        let c = cols.get_mut(&coll).expect("looked up above");
                        if unsealed {
                            c.unsealed_broadcasts.push(env);
                        } else {
                            c.waiting_broadcasts.push(env);
                        }
                    }
                    Some((chare, None, None)) => {
                        self.broadcast_unsettled(coll, chare, priority, call)
                    }
                    Some((chare, None, Some(elements))) => {
                        call.invoke_all(self, &elements, chare, 0)
                    }
                }
            }
            Body::Resume { slot, generation } => {
                let start = self.tracer.as_ref().map(|t| t.begin());
                let mut label = None;
                // A panic is named after the task (looked up only then): the entry point, or
                // what else it runs.
                self.guarded_at(
                    || match self.executor.label(slot, generation) {
                        Some(task) if task != MAIN_SITE.entry => Site {
                            chare: TASK_SITE,
                            index: Index::SCALAR,
                            entry: task,
                        },
                        _ => MAIN_SITE,
                    },
                    || {
                        label = self.executor.resume(slot, generation);
                        Ok(())
                    },
                );
                // An element's suspended entry charged its poll to the element itself.
                self.unmeasured_work_done();
                if let (Some(t), Some(start)) = (&self.tracer, start) {
                    match label {
                        Some(name) => t.resumed(name, start),
                        None => t.abandon(),
                    }
                }
            }
            Body::Fulfil { id, outcome } => self.fulfil_local(id, outcome.map_err(|e| *e)),
            Body::Partial { id, outcome, count } => {
                self.partial_local(id, outcome.map_err(|e| *e), count)
            }
            Body::Control(c) => self.control(*c, priority),
        }
    }

    fn control(&self, c: Control, priority: i32) {
        match c {
            Control::Multicast {
                coll,
                origin,
                groups,
                call,
            } => self.multicast_arrived(coll, origin, groups, call, priority),
            Control::Create { coll, shape, build } => self.create(coll, shape, build),
            Control::Insert {
                coll,
                shape,
                index,
                build,
            } => self.insert_element(coll, shape, index, build),
            Control::Census { coll, reply } => self.census(coll, reply),
            Control::Seal { coll, counts } => self.seal(coll, counts),
            Control::Spawn(make) => {
                let start = self.tracer.as_ref().map(|t| t.begin());
                self.guarded(MAIN_SITE, || {
                    self.spawn_labelled(make(), MAIN_SITE.entry);
                    Ok(())
                });
                if let (Some(t), Some(start)) = (&self.tracer, start) {
                    t.entry(MAIN_SITE.entry, MAIN_SITE.index, start);
                }
            }
            Control::Migrate(m) => self.arrive(*m),
            Control::Located {
                coll,
                index,
                pe,
                epoch,
                inserted,
            } => self.located(coll, index, pe, epoch, inserted),
            Control::Balance(msg) => self.balance_message(msg),
            Control::PoolSubmit(spec) => self.pool_submit(*spec),
            Control::Pool(msg) => self.pool_message(msg),
            c @ (Control::QdStart { .. }
            | Control::QdDone { .. }
            | Control::QdWave
            | Control::QdProbe
            | Control::QdCounts { .. }) => self.quiescence(c),
            Control::ReduceUp {
                coll,
                seq,
                shape,
                incoming,
            } => self.reduce(coll, seq, shape, incoming),
            Control::ReduceFinish {
                coll,
                seq,
                shape,
                raws,
                root,
            } => self.finish_foreign(coll, seq, shape, raws, root),
            Control::ReduceFinished {
                coll,
                seq,
                from,
                call,
            } => self.finished_elsewhere(coll, seq, from, call),
            Control::ReduceDown {
                coll,
                seq,
                shape,
                value,
                kind,
                for_subscriber,
            } => {
                if for_subscriber {
                    self.subscribed_result(coll, seq, shape, Ok((value, kind)))
                } else {
                    self.reduce_down(coll, seq, shape, value, kind)
                }
            }
            Control::ReduceDownEncoded {
                coll,
                seq,
                shape,
                bytes,
                for_subscriber,
            } => {
                if for_subscriber {
                    self.subscribed_result(coll, seq, shape, Err(bytes))
                } else {
                    self.reduce_down_encoded(coll, seq, shape, bytes)
                }
            }
            Control::AllreduceSubscribe { coll, seq, pe } => {
                self.allreduce_subscribe(coll, seq, pe)
            }
        }
    }

    fn buffer(&self, coll: CollectionId, env: Envelope) {
        let stale = {
            let restored = self.restored.borrow();
            coll.serial() < restored.0 && !restored.1.contains(&coll)
        };
        if stale {
            return self.abort_job(format!(
                "charmrs: PE {}: a message for {coll:?}, a collection of the job before the \
                 restart that the checkpoint does not hold (a group or a section: make those \
                 again after charmrs::restore, and do not use proxies to the old ones)",
                self.pe
            ));
        }
        self.pending.borrow_mut().entry(coll).or_default().push(env);
    }

    /// Keeps `env` until collection `coll` is created on this PE.
    pub(crate) fn buffer_for(&self, coll: CollectionId, env: Envelope) {
        self.buffer(coll, env);
    }

    /// Delivers `env` again from this PE (through the local queue, so after the current message).
    pub(crate) fn redeliver(&self, env: Envelope) {
        self.send_direct(self.pe, env);
    }

    /// An empty collection `coll` for this PE, after the checks every new one passes: its id
    /// is not taken here, and a mapped array's map places every element on a PE that exists.
    fn new_local(
        &self,
        coll: CollectionId,
        shape: Shape,
        build: &dyn Construction,
    ) -> std::result::Result<LocalCollection, String> {
        let chare = build.chare_name();
        if self.collections.borrow().contains_key(&coll) {
            // Ids are unique by construction; a restore that missed one would land here.
            return Err(format!(
                "PE {}: a second collection with id {coll:?} (a {chare} {})",
                self.pe,
                shape.describe()
            ));
        }
        if let Shape::Array { map: Some(m), .. } = shape {
            crate::array_map::check_all(m, &shape, self.num_pes())
                .map_err(|e| format!("creating a {chare} array: {e}"))?;
        }
        Ok(LocalCollection::empty(shape, build))
    }

    fn create(&self, coll: CollectionId, shape: Shape, build: Box<dyn Construction>) {
        let mut local = match self.new_local(coll, shape, &*build) {
            Ok(local) => local,
            Err(e) => return self.abort_job(format!("charmrs: {e}")),
        };
        let mut suspended = Vec::new();
        for index in shape.local_elements(self.pe, self.num_pes()) {
            match self.construct_one(coll, index, shape, &*build) {
                None => return, // the constructor panicked: the job is aborting
                Some(Built::Ready(element)) => local.insert(index, element, true),
                Some(Built::Pending(fut)) => {
                    local.constructing.insert(index, Vec::new());
                    suspended.push((index, fut));
                }
            }
        }
        self.collections.borrow_mut().insert(coll, local);
        self.start_balancing_window(coll);
        for (index, fut) in suspended {
            self.finish_construction(coll, index, &*build, fut);
        }
        self.release_pending(coll);
    }

    /// Before collections are restored (`crate::checkpoint`): every collection id of the job
    /// that wrote the checkpoint has a serial below `serial_floor`, and `restored` are the ones
    /// coming back. New ids of this PE are made from the floor up, so none repeats an old one.
    pub(crate) fn prepare_restore(&self, serial_floor: u64, restored: Vec<CollectionId>) {
        if self.next_collection.get() < serial_floor {
            self.next_collection.set(serial_floor);
        }
        *self.restored.borrow_mut() = (serial_floor, restored);
    }

    /// Registers collection `coll` here without building any element: a collection restored
    /// from a checkpoint, whose elements arrive as migrants (`crate::checkpoint`).
    pub(crate) fn adopt(
        &self,
        coll: CollectionId,
        shape: Shape,
        build: &dyn Construction,
    ) -> std::result::Result<(), String> {
        let local = self.new_local(coll, shape, build)?;
        self.collections.borrow_mut().insert(coll, local);
        self.start_balancing_window(coll);
        self.release_pending(coll);
        Ok(())
    }

    /// Delivers what waited for collection `coll` to exist here.
    fn release_pending(&self, coll: CollectionId) {
        let waiting = self.pending.borrow_mut().remove(&coll);
        for env in waiting.into_iter().flatten() {
            self.deliver(env);
        }
    }

    /// Runs the constructor of element `index` (a panic aborts the job: `None`).
    fn construct_one(
        &self,
        coll: CollectionId,
        index: Index,
        shape: Shape,
        build: &dyn Construction,
    ) -> Option<Built> {
        let parts = CtxParts {
            coll,
            index,
            shape,
            pe: self.pe,
        };
        let mut made = None;
        let start = self.tracer.as_ref().map(|t| t.begin());
        self.guarded(
            Site {
                chare: build.chare_name(),
                index,
                entry: "new",
            },
            || {
                made = Some(build.construct(parts));
                Ok(())
            },
        );
        if let (Some(t), Some(start)) = (&self.tracer, start) {
            t.entry(self.constructor_name(build), index, start);
        }
        self.unmeasured_work_done();
        made
    }

    /// Work that is no element's entry method just ran (a constructor, a pool task, the entry
    /// point or another runtime task resumed): with load balancing on, the clock is marked so
    /// that its time counts as the PE's background, not towards the next element to run.
    #[inline]
    pub(crate) fn unmeasured_work_done(&self) {
        if self.measuring {
            self.clock_mark();
        }
    }

    /// `Chare::new` of `build`, as the entry table names it (traces).
    #[cold]
    fn constructor_name(&self, build: &dyn Construction) -> &'static str {
        let table = self.shared.entries;
        table
            .wire_id(build.ctor_id())
            .and_then(|wire| table.by_wire_id(wire))
            .map_or("new", |e| e.name)
    }

    /// Runs a suspended (`async fn new`) constructor as a task; installs the element when done.
    fn finish_construction(
        &self,
        coll: CollectionId,
        index: Index,
        build: &dyn Construction,
        fut: std::pin::Pin<Box<dyn std::future::Future<Output = Rc<dyn ElementObj>>>>,
    ) {
        let chare = build.chare_name();
        let label = if self.tracer.is_some() {
            self.constructor_name(build)
        } else {
            "new"
        };
        self.spawn_labelled(
            Box::pin(async move {
                let built = catch_panic(fut).await;
                let _ = with_pe("constructor", |pe| match built {
                    Ok(element) => pe.constructed(coll, index, element),
                    Err(payload) => {
                        let site = Site {
                            chare,
                            index,
                            entry: "new",
                        };
                        pe.abort_job(site.panic_message(pe.pe, &crate::panic::describe(payload)))
                    }
                });
            }),
            label,
        );
    }

    /// Builds element `index` of sparse array `coll` on this PE (`Array::insert`).
    fn insert_element(
        &self,
        coll: CollectionId,
        shape: Shape,
        index: Index,
        build: Box<dyn Construction>,
    ) {
        // Only a message from another process can ask for an insertion the collection cannot
        // take: into a dense array, under another shape, or at an index it cannot have.
        let fits = self.collections.borrow().get(&coll).map(|c| {
            if !matches!(c.shape, Shape::Sparse { .. }) || c.shape != shape {
                Err(format!(
                    "{} is not a sparse array of that shape",
                    c.shape.describe()
                ))
            } else {
                c.shape
                    .check(&index, self.num_pes())
                    .map_err(|e| e.to_string())
            }
        });
        if let Some(Err(e)) = fits {
            let chare = build.chare_name();
            return self.abort_job(format!(
                "charmrs: PE {}: an insertion of element {index} of {chare}: {e}",
                self.pe
            ));
        }
        let state = self.collections.borrow().get(&coll).map(|c| {
            // Here, being built here, or known to live elsewhere (away from this home, or
            // gone from this PE): an insert of it again is a second element of one index.
            c.find(&index).is_some()
                || c.constructing.contains_key(&index)
                || c.away.contains_key(&index)
                || c.departed.contains(&index)
        });
        match state {
            None => {
                let env = Envelope::new(
                    0,
                    Control::Insert {
                        coll,
                        shape,
                        index,
                        build,
                    },
                );
                return self.buffer(coll, env);
            }
            Some(true) => {
                // At the home, the first insertion's PE is known.
                let first = self
                    .collections
                    .borrow()
                    .get(&coll)
                    .and_then(|c| c.inserted_on.get(&index).copied());
                let (chare, me) = (build.chare_name(), self.pe);
                return self.abort_job(match first {
                    Some(first) => format!(
                        "charmrs: element {index} of {chare} was inserted twice: on PE {first} \
                         and on PE {me} (seen at its home, PE {me})"
                    ),
                    None => format!(
                        "charmrs: element {index} of {chare} was inserted twice: PE {me} holds \
                         or held it already"
                    ),
                });
            }
            Some(false) => {}
        }
        let home = shape.home_pe(&index, self.num_pes()) == self.pe;
        if home {
            if let Err(e) = self.record_insertion(coll, index, self.pe as u32) {
                return self.abort_job(e);
            }
        }
        match self.construct_one(coll, index, shape, &*build) {
            None => {}
            Some(Built::Ready(element)) => {
                self.collections
                    .borrow_mut()
                    .get_mut(&coll)
                    .expect("checked above")
                    .insert(index, element, home);
                self.element_placed(coll, index, shape);
            }
            Some(Built::Pending(fut)) => {
                self.collections
                    .borrow_mut()
                    .get_mut(&coll)
                    .expect("checked above")
                    .constructing
                    .insert(index, Vec::new());
                let home = shape.home_pe(&index, self.num_pes());
                if home != self.pe {
                    self.announce_to_home(coll, index, shape, home);
                }
                self.finish_construction(coll, index, &*build, fut);
            }
        }
    }

    /// A new element is in place here: its home learns where it is (or delivers what waited).
    fn element_placed(&self, coll: CollectionId, index: Index, shape: Shape) {
        let home = shape.home_pe(&index, self.num_pes());
        if home == self.pe {
            self.release_lost(coll, index);
        } else {
            self.announce_to_home(coll, index, shape, home);
        }
    }

    /// Tells PE `home` that new element `index` lives here (for a sparse array: that it was
    /// inserted here). Sent when the element's construction starts, suspendable or not: the
    /// home then forwards its calls here (where they wait for an `async fn new` to finish), and
    /// `done_inserting`'s census counts it even while it is being built.
    fn announce_to_home(&self, coll: CollectionId, index: Index, shape: Shape, home: usize) {
        self.send(
            home,
            Envelope::new(
                0,
                Control::Located {
                    coll,
                    index,
                    pe: self.pe as u32,
                    epoch: 0,
                    inserted: matches!(shape, Shape::Sparse { .. }),
                },
            ),
        );
    }

    pub(crate) fn under_construction(&self, coll: CollectionId, index: Index) -> bool {
        self.collections
            .borrow()
            .get(&coll)
            .is_some_and(|c| c.constructing.contains_key(&index))
    }

    /// A suspendable constructor finished: install the element, then deliver what waited for it.
    fn constructed(&self, coll: CollectionId, index: Index, element: Rc<dyn ElementObj>) {
        let (waited_at_home, points, broadcasts) = {
            let mut cols = self.collections.borrow_mut();
            let c = cols
                .get_mut(&coll)
                .expect("the collection exists while it is being built");
            let points = c.constructing.remove(&index).unwrap_or_default();
            let home = c.shape.home_pe(&index, self.num_pes()) == self.pe;
            c.insert(index, element, home);
            // At its home, calls that came before the insertion waited in `lost`: they run
            // first. (Away from its home, the home heard of it when its construction started,
            // and forwarded its calls here, into `points`.)
            let waited_at_home = if home {
                c.lost.remove(&index).unwrap_or_default()
            } else {
                Vec::new()
            };
            let broadcasts = if c.constructing.is_empty() {
                std::mem::take(&mut c.waiting_broadcasts)
            } else {
                Vec::new()
            };
            (waited_at_home, points, broadcasts)
        };
        for env in waited_at_home.into_iter().chain(points).chain(broadcasts) {
            self.deliver(env);
        }
    }

    /// Runs user code; a panic or a delivery error aborts the job naming chare, index, entry, PE.
    fn guarded(&self, site: Site, f: impl FnOnce() -> std::result::Result<(), String>) {
        self.guarded_at(|| site, f);
    }

    /// [`guarded`](Self::guarded), with the site worked out only if `f` fails.
    fn guarded_at(
        &self,
        site: impl FnOnce() -> Site,
        f: impl FnOnce() -> std::result::Result<(), String>,
    ) {
        let msg = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => return,
            Ok(Err(problem)) => {
                let site = site();
                format!(
                    "charmrs: {problem} (chare {}, index {}, PE {})",
                    site.chare, site.index, self.pe
                )
            }
            Err(payload) if payload.is::<AbortUnwind>() => return,
            Err(payload) => site().panic_message(self.pe, &crate::panic::describe(payload)),
        };
        self.abort_job(msg);
    }

    /// Parks until a message arrives or the job stops, after polling for `idle_spin`. A network
    /// PE looks at the network after at most [`NETWORK_PARK_MAX`] parked, and parks again at
    /// once if it finds nothing. A network PE whose layer cannot wake it instead polls for
    /// [`NAP_SPIN`] after its last input, then naps (at most [`NAP_MAX`], [`NAP_LONG`] once it
    /// napped [`NAP_LONG_AFTER`] without input); every nap ends with a poll.
    fn idle(&self, next_timer: Option<Instant>) {
        let mailbox = self.shared.mailbox(self.pe).expect("a PE's own mailbox");
        let network = self
            .shared
            .polls_network(self.pe)
            .then_some(self.shared.entries);
        let start = Instant::now();
        let own_core = self.shared.own_cores.load(Ordering::Relaxed);
        // A network PE that the layer cannot wake polls longer after input, then only naps (see
        // NAP_SPIN); once napping, it naps at once (an idle job costs no core).
        let naps = network.is_some() && self.shared.network_wakes.get() == Some(&false);
        let mut spins = 0u32;
        while mailbox.is_empty() && !self.shared.stopping() {
            if let Some(table) = network {
                if crate::scheduler::poll_network(&self.shared, table, true) {
                    // Arrivals for this PE went to its local queue.
                    self.quiet_since.set(None);
                    return;
                }
            }
            spins = spins.wrapping_add(1);
            if own_core {
                // A PE with a core of its own only polls; the clock (for timers and the switch
                // to parking) is read every 16 rounds. A network PE's poll is its pause: a
                // `pause` instruction (~40 ns on recent x86) would only delay noticing arrivals.
                if network.is_none() {
                    std::hint::spin_loop();
                }
                if !spins.is_multiple_of(16) {
                    continue;
                }
            }
            let now = Instant::now();
            if next_timer.is_some_and(|t| now >= t) {
                self.quiet_since.set(None);
                return;
            }
            let quiet_since = self.quiet_since.get().filter(|_| network.is_some());
            let spin = match (naps, quiet_since) {
                (_, Some(_)) => Duration::ZERO,
                (false, None) => self.shared.idle_spin,
                (true, None) => self.shared.idle_spin.max(NAP_SPIN),
            };
            if now - start >= spin {
                if network.is_some() && !self.shared.layer.before_park() {
                    // Input came meanwhile: poll it instead of sleeping.
                    continue;
                }
                let mut timeout = next_timer.map(|t| t.saturating_duration_since(now));
                // Never rely on the layer's wake-up alone: a lost one would otherwise hang the
                // job (a parked network PE looks at the network every few ms).
                let max = match quiet_since {
                    _ if !naps => NETWORK_PARK_MAX,
                    Some(t) if now - t >= NAP_LONG_AFTER => NAP_LONG,
                    _ => NAP_MAX,
                };
                if network.is_some() {
                    timeout = Some(timeout.map_or(max, |t| t.min(max)));
                }
                mailbox.park(timeout, || !self.shared.stopping());
                if let Some(table) = network {
                    // Input from another PE, or a timer due, ends the quiet period; the network
                    // is polled next.
                    let mut idle_on =
                        mailbox.is_empty() && next_timer.is_none_or(|t| Instant::now() < t);
                    if !naps {
                        // Quiet only if the park ran its course: the layer's wake-up (which
                        // leaves the mailbox empty) means input, and the PE spins again first
                        // next time.
                        idle_on &= Instant::now() - now >= max;
                    }
                    // A park the layer's wake-up should have ended: look now (a napping PE
                    // polls next anyway).
                    if idle_on && !naps && crate::scheduler::poll_network(&self.shared, table, true)
                    {
                        idle_on = false;
                        if std::env::var_os("CHARMRS_DEBUG_WAKE").is_some() {
                            eprintln!(
                                "charmrs: PE {}: network input found after a {max:?} park: the \
                                 {} layer's wake-up came late or not at all",
                                self.pe,
                                self.shared.layer.name()
                            );
                        }
                    }
                    self.quiet_since
                        .set(idle_on.then(|| quiet_since.unwrap_or(now)));
                }
                return;
            }
            if own_core || spins < 64 {
                std::hint::spin_loop();
            } else {
                // Oversubscribed PEs (more PEs than cores) must let the others run.
                std::thread::yield_now();
            }
        }
        // A message from another PE came in (or the job stops).
        self.quiet_since.set(None);
    }
}

/// The body of a PE thread: dispatch until the job stops.
/// Clears `CURRENT` when dropped (see `run_pe`).
struct UnsetCurrent;

impl Drop for UnsetCurrent {
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|c| c.set(std::ptr::null()));
    }
}

/// If the runtime panics on a PE (see `run_pe`), drops the PE's chares and tasks while `CURRENT`
/// is still valid and inside `catch_unwind`, as the normal teardown does: a destructor that
/// calls the runtime, or panics, must not turn the unwind into a process abort before the job's
/// abort message is out.
struct TeardownOnPanic<'a>(&'a PeState);

impl Drop for TeardownOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        teardown(self.0);
    }
}

/// Drops the PE's chares, the messages waiting here and its tasks (at the end of the job, while
/// `CURRENT` is still valid: their destructors may call the runtime), each on its own under
/// `catch_unwind`, and the rest are still dropped after one panics — dropping them all in one go
/// would turn a second panicking `Drop` into a panic during unwinding, which aborts the process
/// before the job's message is out. A `Drop` that panics at the end of the job is reported
/// naming the element (through [`Shared::finish`]: after `exit` it is printed and the status
/// stays, otherwise it is the job's abort). While the PE's thread unwinds from a failure of its
/// own (`TeardownOnPanic`), it is only printed: that failure stays the job's message, with its
/// location.
fn teardown(state: &PeState) {
    let pe = state.pe;
    let unwinding = std::thread::panicking();
    // A `Drop` that panicked (`why`), dropping `what`. Reporting must not unwind either (a
    // failing `eprintln!`, the layer's abort).
    let report = |what: String, why: String| {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            if unwinding {
                eprintln!("charmrs: PE {pe}: also, dropping {what} panicked: {why}");
            } else {
                state.shared.finish(Outcome::Abort(format!(
                    "charmrs: job aborted: dropping {what} on PE {pe} at the end of the job \
                     panicked: {why}"
                )));
            }
        }));
    };
    let collections = state
        .collections
        .try_borrow_mut()
        .map(|mut c| std::mem::take(&mut *c))
        .unwrap_or_default();
    for (_, mut collection) in collections {
        let chare = collection.chare;
        let elements = std::mem::take(&mut collection.elements);
        match Rc::try_unwrap(elements) {
            Ok(elements) => {
                for (index, element) in elements {
                    if let Err(why) = crate::panic::drop_caught(element) {
                        report(format!("element {index} of chare {chare}"), why);
                    }
                }
            }
            // Shared with a broadcast still queued: dropped with it.
            Err(shared) => drop(shared),
        }
        if let Err(why) = crate::panic::drop_caught(collection) {
            report(format!("what waited for chare {chare}"), why);
        }
    }
    let pending = state
        .pending
        .try_borrow_mut()
        .map(|mut p| std::mem::take(&mut *p))
        .unwrap_or_default();
    for (_, envelopes) in pending {
        for envelope in envelopes {
            if let Err(why) = crate::panic::drop_caught(envelope) {
                report("a call waiting on this PE".to_owned(), why);
            }
        }
    }
    state
        .executor
        .clear_each(|label, why| report(format!("a suspended task ({label})"), why));
}

pub(crate) fn run_pe(shared: Arc<Shared>, pe: usize, first: Option<Envelope>) {
    let mailbox = shared.mailbox(pe).expect("a PE runs in its own process");
    mailbox.bind_owner();
    let state = PeState::new(pe, shared.clone());
    CURRENT.with(|c| c.set(&state));
    // Declared after `state`, so dropped before it: if the runtime panics (the thread's caller
    // then aborts the job), `CURRENT` must not point at the dropped state while its chares'
    // and tasks' destructors run.
    let _unset = UnsetCurrent;
    // Dropped before `_unset` (declared after it).
    let _teardown = TeardownOnPanic(&state);
    crate::panic::enter_pe();
    if let Some(env) = first {
        state.send(pe, env);
    }
    if pe == 0 {
        if let Some(period) = shared.balance.period() {
            state.spawn(crate::balance::periodic(period));
        }
    }
    let network = shared.polls_network(pe).then_some(shared.entries);
    if network.is_some() {
        // Its sends leave from, and its polls look at, its own lane of the layer.
        shared.layer.bind_lane(pe - shared.first_pe);
    }
    // Set when `idle` just polled the network (and returned because something arrived): the
    // next turn runs it without polling again first.
    let mut just_polled = false;
    // Turns in a row without a poll of the network because of back-pressure.
    let mut skipped = 0usize;
    while !shared.stopping() {
        if let Some(table) = network {
            // Back-pressure: while NETWORK_BACKLOG network arrivals or more wait in the local
            // queue (counted exactly: in when queued, out when run), the network is polled only
            // after NETWORK_BACKLOG turns without. A poll may deliver several messages and a
            // turn runs one, so a fast sender could otherwise have this PE take in messages (and
            // receive buffers) faster than it runs them: a burst of 1 MiB messages over libfabric
            // held 70 receive buffers of 2 MiB, most of them freshly page-faulted. A backlog of
            // local work does not hold the network back.
            let throttled = state.queue.borrow().network_waiting() >= NETWORK_BACKLOG
                && skipped < NETWORK_BACKLOG;
            if just_polled {
                // `idle` just polled and found something: run it first.
            } else if throttled {
                skipped += 1;
            } else {
                if crate::scheduler::poll_network(&shared, table, false) {
                    // Input: the next idle period spins before it parks.
                    state.quiet_since.set(None);
                }
                skipped = 0;
            }
        }
        just_polled = false;
        // Arrivals join the local queue, so the most urgent message runs first: one per turn
        // when it is alone (the common case, run at once), else up to MAILBOX_BATCH, so that
        // priorities order what other PEs sent too, while a backlog in the mailbox piles up in
        // the local queue by at most a batch a turn and neither starves the other. (`is_empty`
        // first: popping an empty `SegQueue` costs a full fence.)
        let arrived = if mailbox.is_empty() {
            None
        } else {
            mailbox.pop()
        };
        let next = {
            let mut queue = state.queue.borrow_mut();
            match arrived {
                Some(env) if queue.is_empty() && env.priority == 0 && mailbox.is_empty() => {
                    Some(env)
                }
                Some(env) => {
                    queue.push(env);
                    for _ in 1..MAILBOX_BATCH {
                        match (!mailbox.is_empty()).then(|| mailbox.pop()).flatten() {
                            Some(more) => queue.push(more),
                            None => break,
                        }
                    }
                    queue.pop()
                }
                None => queue.pop(),
            }
        };
        match next {
            Some(env) => {
                if env.counted() {
                    state.processed.set(state.processed.get() + 1);
                }
                state.deliver(env);
                state.end_turn();
            }
            None => {
                let next_timer = state.fire_timers();
                // Timers may have queued resumptions; only sleep if nothing is runnable.
                if state.queue.borrow().is_empty() && mailbox.is_empty() {
                    // Timestamps of the measurement clock (the TSC where the kernel trusts
                    // it: a third of `Instant::now`'s cost, and the read after waking is on the
                    // latency path of the message that woke this PE).
                    let since = crate::measure::ticks();
                    state.idling.set(true);
                    state.idle(next_timer);
                    state.idling.set(false);
                    just_polled = true;
                    // A call run during the poll that ended the idle period (`run_lent`) ended
                    // it where it started, and was timed from there.
                    let ran = state.idle_end.take();
                    let woke = ran.unwrap_or_else(crate::measure::ticks);
                    if let Some(t) = &state.tracer {
                        t.idle(since, woke);
                    }
                    let idle = woke.saturating_sub(since) as f64 * state.secs_per_tick;
                    state.idle_secs.set(state.idle_secs.get() + idle);
                    if state.measuring && ran.is_none() {
                        state.mark.set(woke);
                    }
                }
            }
        }
    }
    // Tear down while `CURRENT` is still valid: destructors of chares and tasks may call the runtime.
    teardown(&state);
    if let (Some(sink), Some(t)) = (&shared.trace, &state.tracer) {
        sink.hand_in(t.take(), state.started.elapsed().as_secs_f64());
    }
    CURRENT.with(|c| c.set(std::ptr::null()));
}
