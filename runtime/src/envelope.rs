//! What travels between PEs of one process: an [`Envelope`] holding moved Rust values.
//!
//! Same-process sends never serialize: the arguments are moved into a boxed [`Invocation`] that
//! the destination PE runs against the element. Invariant: an envelope is consumed exactly once
//! — delivered, buffered until its target exists, or reported in an abort — never dropped silently;
//! a call that asked for a result always fulfils its future, with the value or with the error.

use crate::chare::{Chare, Constructed, Entry, Invoked, Payload};
use crate::collection::{CollectionId, Shape};
use crate::ctx::Ctx;
use crate::element::{Coro, Element, ElementObj};
use crate::error::Error;
use crate::future::{encode_value, PartialCount, Resolution};
use crate::index::Index;
use crate::pool::{JobSpec, PoolMsg};
use crate::reduction::{Incoming, Kind};
use crate::scheduler::{AbortUnwind, PeState};
use crate::when::PendingWhen;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// A [`Resolution`] with the (rare, large) error boxed, so that it travels inline in an
/// envelope.
pub(crate) type InlineResolution = Result<Box<dyn Any + Send>, Box<Error>>;

/// A future run by a PE's local executor (the entry point, suspended entry methods).
pub(crate) type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

/// A message between PEs of one process.
pub(crate) struct Envelope {
    /// Lower runs earlier; 0 is the default (Charm++ convention).
    pub(crate) priority: i32,
    /// For entry calls: the PE that first sent it and how often it was forwarded since (see
    /// [`Route`]); lives in what would otherwise be padding.
    pub(crate) route: Route,
    pub(crate) body: Body,
}

/// The queue priority (the most urgent there is) of the runtime messages that must keep their
/// order with an element's migration: the `Migrate` itself, reduction contributions and
/// partials, and allreduce subscriptions.
///
/// Calls that followed an element are forwarded behind its `Migrate` on the same channel; at
/// the default priority they also leave the destination's queue behind it, but a call sent with
/// a negative priority would overtake it there, find no element, and bounce between the PE and
/// the element's home until the `Migrate` finally ran. Equal priorities keep their order, so a
/// call at `i32::MIN` still runs after the `Migrate` it followed. A contribution sent to the
/// element's home just before the element moves there must stay ahead of it (the element could
/// otherwise contribute to the next reduction first), and an allreduce subscription ahead of the
/// contribution that follows it.
pub(crate) const MIGRATION_ORDER: i32 = i32::MIN;

/// Origin PE (low 24 bits) and forwarding count (high 8 bits) of an entry call, so that the PE
/// that finally delivers a forwarded call can correct the origin's location cache.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Route(u32);

impl Route {
    /// Not sent by any PE yet.
    pub(crate) const UNSET: Route = Route(u32::MAX);

    pub(crate) fn new(origin: usize, hops: u32) -> Route {
        debug_assert!(origin < crate::MAX_PES, "PE {origin} beyond MAX_PES");
        Route(((hops.min(0xfe)) << 24) | (origin as u32 & 0x00ff_ffff))
    }

    pub(crate) fn is_set(self) -> bool {
        self != Route::UNSET
    }

    /// The wire form.
    pub(crate) fn raw(self) -> u32 {
        self.0
    }

    /// From the wire form: `None` unless it is a set route (hops at most what `new` makes).
    pub(crate) fn from_raw(raw: u32) -> Option<Route> {
        let r = Route(raw);
        (r.is_set() && raw >> 24 <= 0xfe).then_some(r)
    }

    pub(crate) fn origin(self) -> usize {
        (self.0 & 0x00ff_ffff) as usize
    }

    pub(crate) fn hops(self) -> u32 {
        if self.is_set() {
            self.0 >> 24
        } else {
            0
        }
    }
}

pub(crate) enum Body {
    /// Run an entry on one element.
    Point {
        coll: CollectionId,
        index: Index,
        call: Box<dyn Invocation>,
    },
    /// Run an entry on every element of the collection on the receiving PE.
    Broadcast {
        coll: CollectionId,
        call: Box<dyn Invocation>,
    },
    /// Poll local task `slot` again (sent by its waker).
    Resume { slot: u32, generation: u32 },
    /// The value of future `id`, owned by the receiving PE (inline: every `ret` reply is one).
    Fulfil { id: u64, outcome: InlineResolution },
    /// One PE's (or one away element's) part of a broadcast's result, for gather future `id` of
    /// the receiving PE.
    Partial {
        id: u64,
        outcome: InlineResolution,
        count: PartialCount,
    },
    /// Everything else: rarer messages, boxed so that an envelope stays one cache line.
    Control(Box<Control>),
}

/// The rarer messages between PEs.
pub(crate) enum Control {
    /// Construct this PE's elements of a new collection.
    Create {
        coll: CollectionId,
        shape: Shape,
        build: Box<dyn Construction>,
    },
    /// Start a local task on the receiving PE (the program's entry point).
    Spawn(Box<dyn FnOnce() -> LocalTask + Send>),
    /// A new task-pool job (sent to PE 0, the pool's master).
    PoolSubmit(Box<JobSpec>),
    /// Task-pool traffic between the master and the workers.
    Pool(PoolMsg),
    /// PE `from` waits for quiescence (request `token`; sent to PE 0).
    QdStart { from: u32, token: u64 },
    /// Quiescence was reached: reach the target of request `token` (sent to its PE).
    QdDone { token: u64 },
    /// Start the next quiescence wave (PE 0, after a pause).
    QdWave,
    /// Report your message counters to PE 0.
    QdProbe,
    /// One PE's message counters.
    QdCounts { sent: u64, processed: u64 },
    /// A call through a section made on PE `origin`, travelling down its multicast tree (see
    /// `multicast`): the first group is the receiving PE's members, the rest its subtree.
    Multicast {
        coll: CollectionId,
        origin: u32,
        groups: Vec<crate::multicast::Group>,
        call: Box<dyn Invocation>,
    },
    /// Build one element of a sparse array here.
    Insert {
        coll: CollectionId,
        shape: Shape,
        index: Index,
        build: Box<dyn Construction>,
    },
    /// Report (inserts issued here, elements whose home is here) of sparse array `coll` to
    /// future `reply` (`done_inserting`).
    Census {
        coll: CollectionId,
        reply: (u32, u64),
    },
    /// Every insertion into `coll` is in place: elements per home PE.
    Seal {
        coll: CollectionId,
        counts: Vec<u32>,
    },
    /// An element moving in (its state and bookkeeping).
    Migrate(Box<crate::migration::Migrant>),
    /// Element `index` of `coll` lives on `pe` since its `epoch`-th migration: update the
    /// location cache (or, at its home, the record of where it is). `inserted`: sent to the
    /// home by the PE a sparse element was just inserted on (the home catches a second
    /// insertion of one index, wherever the two happened).
    Located {
        coll: CollectionId,
        index: Index,
        pe: u32,
        epoch: u32,
        inserted: bool,
    },
    /// Load balancing traffic.
    Balance(crate::balance::LbMsg),
    /// A child PE's partial result of reduction `seq` over `coll`.
    ReduceUp {
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        incoming: Incoming,
    },
    /// Partials nobody on the way up could decode, for the PE that encoded the first of them;
    /// `root`: the reduction tree's root, which waits for its [`Control::ReduceFinished`].
    ReduceFinish {
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        raws: Vec<crate::reduction::Raw>,
        root: u32,
    },
    /// To the reduction tree's root, from PE `from`, which finished reduction `seq` for it
    /// ([`Control::ReduceFinish`]): done, and, for an entry target, the call to send on — from
    /// the root, so that the collection's results reach their target in reduction order.
    ReduceFinished {
        coll: CollectionId,
        seq: u64,
        from: u32,
        call: Option<Box<crate::callback::Routed>>,
    },
    /// An allreduce result on its way down the tree (or, `for_subscriber`, a copy for a PE
    /// that subscribed: see [`Control::AllreduceSubscribe`]).
    ReduceDown {
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        value: Box<dyn Any + Send>,
        kind: Kind,
        for_subscriber: bool,
    },
    /// An allreduce result from the parent PE in another process, still encoded.
    ReduceDownEncoded {
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        bytes: bytes::Bytes,
        for_subscriber: bool,
    },
    /// To an element's home: PE `pe`, which is not in the collection's reduction tree (or does
    /// not know yet whether it is), has a contributor waiting for allreduce `seq`; send it a
    /// copy of the result too. The copy only fulfils the contributors' futures there: it never
    /// travels on down a tree.
    AllreduceSubscribe {
        coll: CollectionId,
        seq: u64,
        pe: u32,
    },
}

impl From<Control> for Body {
    fn from(c: Control) -> Body {
        Body::Control(Box::new(c))
    }
}

impl Envelope {
    pub(crate) fn new(priority: i32, body: impl Into<Body>) -> Envelope {
        Envelope {
            priority,
            route: Route::UNSET,
            body: body.into(),
        }
    }

    /// Short name of the message's kind, for diagnostics.
    pub(crate) fn kind_name(&self) -> &'static str {
        match &self.body {
            Body::Point { .. } => "entry call",
            Body::Broadcast { .. } => "broadcast",
            Body::Resume { .. } => "task wake-up",
            Body::Fulfil { .. } => "future value",
            Body::Partial { .. } => "broadcast result",
            Body::Control(c) => match **c {
                Control::Create { .. } => "creation",
                Control::Multicast { .. } => "section call",
                Control::Spawn(_) => "entry point",
                Control::PoolSubmit(_) | Control::Pool(_) => "task pool",
                Control::QdStart { .. }
                | Control::QdDone { .. }
                | Control::QdWave
                | Control::QdProbe
                | Control::QdCounts { .. } => "quiescence detection",
                Control::ReduceUp { .. }
                | Control::ReduceFinish { .. }
                | Control::ReduceFinished { .. }
                | Control::ReduceDown { .. }
                | Control::ReduceDownEncoded { .. }
                | Control::AllreduceSubscribe { .. } => "reduction",
                Control::Migrate(_) => "migration",
                Control::Insert { .. } => "insertion",
                Control::Census { .. } | Control::Seal { .. } => "done_inserting",
                Control::Located { .. } => "location update",
                Control::Balance(_) => "load balancing",
            },
        }
    }

    /// Whether this message has a wire format (entry calls and creations).
    pub(crate) fn crosses_processes(&self) -> bool {
        match &self.body {
            Body::Point { .. } | Body::Broadcast { .. } => true,
            Body::Control(c) => matches!(
                **c,
                Control::Create { .. } | Control::Insert { .. } | Control::Multicast { .. }
            ),
            Body::Resume { .. } | Body::Fulfil { .. } | Body::Partial { .. } => false,
        }
    }

    /// Whether quiescence detection counts this message (application traffic) — runtime control
    /// messages (task wake-ups, quiescence probes) are not counted.
    #[inline]
    pub(crate) fn counted(&self) -> bool {
        match &self.body {
            Body::Point { .. } | Body::Broadcast { .. } => true,
            Body::Fulfil { .. } | Body::Partial { .. } => true,
            Body::Resume { .. } => false,
            Body::Control(c) => !matches!(
                **c,
                Control::QdStart { .. }
                    | Control::QdDone { .. }
                    | Control::QdWave
                    | Control::QdProbe
                    | Control::QdCounts { .. }
                    | Control::Balance(
                        crate::balance::LbMsg::Collect { .. }
                            | crate::balance::LbMsg::Report { .. }
                    )
            ),
        }
    }
}

/// Where user code runs, for abort messages.
#[derive(Clone, Copy)]
pub(crate) struct Site {
    pub(crate) chare: &'static str,
    pub(crate) index: Index,
    pub(crate) entry: &'static str,
}

impl Site {
    pub(crate) fn panic_message(&self, pe: usize, what: &str) -> String {
        if self.chare == "entry point" {
            format!("charmrs: job aborted: panic in the entry point on PE {pe}: {what}")
        } else if self.chare == crate::scheduler::TASK_SITE {
            format!(
                "charmrs: job aborted: panic in {} on PE {pe}: {what}",
                self.entry
            )
        } else {
            format!(
                "charmrs: job aborted: panic in entry method `{}` of chare {} index {} on PE {pe}: {what}",
                self.entry, self.chare, self.index
            )
        }
    }
}

/// Who wants the result of a call.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub enum Reply {
    /// Nobody: the result is dropped, a panic aborts the job.
    None,
    /// Future `id` of PE `pe` gets the value (or the error).
    Future {
        /// Owner PE of the future.
        pe: u32,
        /// The future's id on that PE.
        id: u64,
    },
    /// Gather future `id` of PE `pe` gets one partial per PE: the elements' values if `values`,
    /// otherwise just their completion.
    Gather {
        /// Owner PE of the future.
        pe: u32,
        /// The future's id on that PE.
        id: u64,
        /// Whether the elements' values are gathered (else only completion).
        values: bool,
    },
}

/// A type-erased entry call with its moved arguments.
pub(crate) trait Invocation: Send {
    fn entry_name(&self) -> &'static str;
    /// Runs the entry on one element, moving the arguments.
    fn invoke(self: Box<Self>, pe: &PeState, element: &Rc<dyn ElementObj>, site: Site);
    /// Runs the entry on every local element of a broadcast, in order (arguments cloned for all
    /// but the last), then reports this PE's part of the result if one was asked for, announcing
    /// `away` results more from its elements away from home (forwarded to them).
    fn invoke_all(
        self: Box<Self>,
        pe: &PeState,
        elements: &[(Index, Rc<dyn ElementObj>)],
        chare: &'static str,
        away: u32,
    );
    /// A copy for another PE (broadcast fan-out).
    fn clone_box(&self) -> Box<dyn Invocation>;
    /// Compile-time id of the entry.
    fn entry_id(&self) -> u64;
    /// Who wants the result.
    fn reply(&self) -> Reply;
    /// Appends the arguments, postcard-encoded (zero-copy buffers go out of band).
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String>;
}

/// The concrete invocation of entry `E` of chare `C`.
///
/// `R` is [`Reply`] when a result was asked for and the zero-sized [`NoReply`] otherwise, so a
/// call without arguments that asks for nothing is a zero-sized box: no allocation.
pub(crate) struct Call<C: Chare, E: Entry<C>, R = NoReply> {
    args: E::Args,
    reply: R,
    _marker: PhantomData<fn() -> (C, E)>,
}

/// Where a call's result goes, as stored in the call.
pub(crate) trait ReplySlot: Copy + Send + 'static {
    fn get(self) -> Reply;
}

/// Nobody asked for the result.
#[derive(Clone, Copy)]
pub(crate) struct NoReply;

impl ReplySlot for NoReply {
    fn get(self) -> Reply {
        Reply::None
    }
}

impl ReplySlot for Reply {
    fn get(self) -> Reply {
        self
    }
}

impl<C: Chare, E: Entry<C>> Call<C, E> {
    /// Runs `f` on the call built in place (no box): for a call that is encoded for another
    /// process at once and never runs here.
    pub(crate) fn unboxed<T>(
        args: E::Args,
        reply: Reply,
        f: impl FnOnce(&dyn Invocation) -> T,
    ) -> T {
        match reply {
            Reply::None => f(&Call::<C, E, NoReply> {
                args,
                reply: NoReply,
                _marker: PhantomData,
            }),
            reply => f(&Call::<C, E, Reply> {
                args,
                reply,
                _marker: PhantomData,
            }),
        }
    }

    pub(crate) fn boxed(args: E::Args, reply: Reply) -> Box<dyn Invocation> {
        match reply {
            Reply::None => Box::new(Call::<C, E, NoReply> {
                args,
                reply: NoReply,
                _marker: PhantomData,
            }),
            reply => Box::new(Call::<C, E, Reply> {
                args,
                reply,
                _marker: PhantomData,
            }),
        }
    }
}

/// Collects a broadcast's results from the elements of one PE (or from one element away from its
/// home PE).
struct PartialAcc<T> {
    count: PartialCount,
    remaining: Cell<usize>,
    values: RefCell<Vec<(Index, T)>>,
    error: RefCell<Option<Error>>,
    owner: u32,
    id: u64,
    keep_values: bool,
}

impl<T: Payload> PartialAcc<T> {
    fn add(&self, pe: &PeState, index: Index, outcome: Result<T, Error>) {
        match outcome {
            Ok(v) if self.keep_values => self.values.borrow_mut().push((index, v)),
            Ok(_) => {}
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
            }
        }
        self.remaining.set(self.remaining.get() - 1);
        if self.remaining.get() == 0 {
            self.send(pe);
        }
    }

    fn send(&self, pe: &PeState) {
        let outcome: Resolution = match self.error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(Box::new(std::mem::take(&mut *self.values.borrow_mut()))),
        };
        pe.partial(
            self.owner as usize,
            self.id,
            outcome,
            encode_value::<Vec<(Index, T)>>,
            self.count,
        );
    }
}

/// Where one element's result goes.
enum Sink<T> {
    Discard,
    Future {
        pe: u32,
        id: u64,
    },
    Partial {
        acc: Rc<PartialAcc<T>>,
        index: Index,
    },
}

impl<T: Payload> Sink<T> {
    fn ok(self, pe: &PeState, value: T) {
        match self {
            Sink::Discard => {}
            Sink::Future { pe: owner, id } => {
                pe.fulfil(owner as usize, id, Ok(Box::new(value)), encode_value::<T>)
            }
            Sink::Partial { acc, index } => acc.add(pe, index, Ok(value)),
        }
    }

    /// [`ok`](Self::ok), where user code may run (the result's `Drop` for no one, its
    /// `Serialize` for a caller in another process): a panic there aborts the job naming the
    /// entry, as a panic in the entry would, instead of unwinding through the PE's loop.
    #[inline(always)]
    fn deliver(self, pe: &PeState, value: T, site: &Site) {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.ok(pe, value))) {
            result_panicked(pe, site, payload);
        }
    }

    fn panicked(self, pe: &PeState, site: &Site, payload: Box<dyn Any + Send>) {
        if payload.is::<AbortUnwind>() {
            return; // `abort` was called: the job is ending already.
        }
        let what = crate::panic::describe(payload);
        let remote = || Error::Remote {
            pe: pe.pe,
            entry: site.entry.to_string(),
            index: Some(site.index),
            message: what.clone(),
        };
        match self {
            Sink::Discard => pe.abort_job(site.panic_message(pe.pe, &what)),
            Sink::Future { pe: owner, id } => {
                pe.fulfil(owner as usize, id, Err(remote()), encode_value::<T>)
            }
            Sink::Partial { acc, index } => acc.add(pe, index, Err(remote())),
        }
    }
}

/// Ends the job: user code the runtime runs for an entry outside it panicked — handing its
/// result on (the result's `Drop` or `Serialize`, see [`Sink::deliver`]) or copying a
/// broadcast's arguments for it (their `Clone`).
#[cold]
#[inline(never)]
fn result_panicked(pe: &PeState, site: &Site, payload: Box<dyn Any + Send>) {
    if payload.is::<AbortUnwind>() {
        return;
    }
    let what = crate::panic::describe(payload);
    pe.abort_job(site.panic_message(
        pe.pe,
        &format!(
            "{what} (around the call: its arguments' Clone, or its result's Drop or Serialize)"
        ),
    ));
}

/// Runs one call of `E` on `element` — or buffers it there if its `when` condition does not hold.
fn run_entry<C: Chare, E: Entry<C>>(
    pe: &PeState,
    element: Rc<Element<C>>,
    args: E::Args,
    sink: Sink<E::Output>,
    site: Site,
) {
    // Buffered calls that an earlier message of this turn made eligible go first: they arrived
    // before this one (several messages reach an element in one turn when they waited for it
    // to be built or for its collection to exist here).
    if element.dirty.get() {
        element.clone().recheck_whens(pe);
    }
    if E::CONDITIONAL {
        match catch_unwind(AssertUnwindSafe(|| {
            E::ready(&element.chare.borrow(), &args)
        })) {
            Ok(true) => {}
            Ok(false) => {
                // The key hashes an argument with the user's `Hash`: a panic there fails the call.
                let key = match catch_unwind(AssertUnwindSafe(|| E::arg_key(&args))) {
                    Ok(key) => key,
                    Err(payload) => return sink.panicked(pe, &site, payload),
                };
                let call = Box::new(Buffered::<C, E> {
                    args,
                    sink,
                    site,
                    key,
                    failed: std::cell::Cell::new(None),
                });
                element.whens.borrow_mut().push::<E>(key, call);
                return;
            }
            Err(payload) => return sink.panicked(pe, &site, payload),
        }
    }
    call_entry::<C, E>(pe, element, args, sink, site);
}

/// A call waiting at its element for its `when` condition.
struct Buffered<C: Chare, E: Entry<C>> {
    args: E::Args,
    sink: Sink<E::Output>,
    site: Site,
    key: Option<u64>,
    /// A panic of its condition, on a re-check: the call is then taken as ready and fails like
    /// an entry that panicked, naming its entry (the caller's future gets the error).
    failed: std::cell::Cell<Option<Box<dyn Any + Send>>>,
}

impl<C: Chare, E: Entry<C>> PendingWhen<C> for Buffered<C, E> {
    fn entry_id(&self) -> u64 {
        E::ID
    }
    fn key(&self) -> Option<u64> {
        self.key
    }
    fn ready(&self, chare: &C) -> bool {
        match catch_unwind(AssertUnwindSafe(|| E::ready(chare, &self.args))) {
            Ok(ready) => ready,
            Err(payload) => {
                self.failed.set(Some(payload));
                true
            }
        }
    }
    fn run(self: Box<Self>, pe: &PeState, element: Rc<Element<C>>) {
        match self.failed.into_inner() {
            None => call_entry::<C, E>(pe, element, self.args, self.sink, self.site),
            Some(payload) => self.sink.panicked(pe, &self.site, payload),
        }
    }
}

/// Runs one call of `E` on `element`, sending its result to `sink`; a suspended entry becomes a
/// task of this PE. With `+trace` the call is recorded (out of line: the untraced call is
/// exactly what it would be without tracing).
#[inline]
fn call_entry<C: Chare, E: Entry<C>>(
    pe: &PeState,
    element: Rc<Element<C>>,
    args: E::Args,
    sink: Sink<E::Output>,
    site: Site,
) {
    match &pe.tracer {
        None => run_call::<C, E>(pe, element, args, sink, site),
        Some(tracer) => traced_call::<C, E>(pe, tracer, element, args, sink, site),
    }
}

/// [`call_entry`] with `+trace`.
#[inline(never)]
#[cold]
fn traced_call<C: Chare, E: Entry<C>>(
    pe: &PeState,
    tracer: &crate::trace::Tracer,
    element: Rc<Element<C>>,
    args: E::Args,
    sink: Sink<E::Output>,
    site: Site,
) {
    let (start, index) = (tracer.begin(), site.index);
    run_call::<C, E>(pe, element, args, sink, site);
    tracer.entry(E::NAME, index, start);
}

/// The body of [`call_entry`].
#[inline(always)]
fn run_call<C: Chare, E: Entry<C>>(
    pe: &PeState,
    element: Rc<Element<C>>,
    args: E::Args,
    sink: Sink<E::Output>,
    site: Site,
) {
    let coro = Coro::new(element);
    let called = catch_unwind(AssertUnwindSafe(|| E::call(&coro, args)));
    // One clock read per entry: it is charged the time since the previous mark (the end of the
    // previous entry, or the PE waking up), so runtime work between two entries counts towards
    // the second.
    if pe.measuring {
        let took = pe.clock_mark();
        coro.element().add_load(took);
        pe.entry_secs.set(pe.entry_secs.get() + took);
    }
    match called {
        Ok(Invoked::Done(v)) => sink.deliver(pe, v, &site),
        Ok(Invoked::Suspended(fut)) => {
            // Its later polls are charged to the element as its first was.
            let charged = pe.measuring.then(|| {
                let element = Rc::downgrade(coro.element());
                element as std::rc::Weak<dyn crate::element::ElementObj>
            });
            pe.spawn_labelled(
                Box::pin(async move {
                    let outcome = Charged {
                        inner: CatchPanic { inner: fut },
                        element: charged,
                    }
                    .await;
                    crate::scheduler::with_pe("entry completion", |pe| match outcome {
                        Ok(v) => sink.deliver(pe, v, &site),
                        Err(payload) => sink.panicked(pe, &site, payload),
                    })
                    .expect("tasks run on their PE");
                }),
                E::NAME,
            )
        }
        Err(payload) => sink.panicked(pe, &site, payload),
    }
}

/// Runs a point call of `E` with `args` on `element` (which must be a `C`), its result going
/// where `reply` says: what a boxed call's `invoke` does, for a call that was never boxed.
pub(crate) fn invoke_point<C: Chare, E: Entry<C>>(
    pe: &PeState,
    element: &Rc<dyn ElementObj>,
    args: E::Args,
    reply: Reply,
    site: Site,
) {
    let Some(el) = element_of::<C>(element) else {
        return pe.abort_job(format!(
            "charmrs: a message for `{}` reached element {} of a {}, not a {}",
            E::NAME,
            site.index,
            site.chare,
            C::NAME
        ));
    };
    let sink = match reply {
        Reply::None => Sink::Discard,
        Reply::Future { pe, id } => Sink::Future { pe, id },
        Reply::Gather {
            pe: owner,
            id,
            values,
        } => Sink::Partial {
            // A broadcast forwarded to an element away from its home PE.
            acc: Rc::new(PartialAcc {
                count: PartialCount::Element,
                remaining: Cell::new(1),
                values: RefCell::default(),
                error: RefCell::default(),
                owner,
                id,
                keep_values: values,
            }),
            index: site.index,
        },
    };
    run_entry::<C, E>(pe, el, args, sink, site);
}

fn element_of<C: Chare>(element: &Rc<dyn ElementObj>) -> Option<Rc<Element<C>>> {
    let any: Rc<dyn Any> = element.clone();
    any.downcast::<Element<C>>().ok()
}

impl<C: Chare, E: Entry<C>, R: ReplySlot> Invocation for Call<C, E, R> {
    fn entry_name(&self) -> &'static str {
        E::NAME
    }

    fn invoke(self: Box<Self>, pe: &PeState, element: &Rc<dyn ElementObj>, site: Site) {
        invoke_point::<C, E>(pe, element, self.args, self.reply.get(), site);
    }

    fn invoke_all(
        self: Box<Self>,
        pe: &PeState,
        elements: &[(Index, Rc<dyn ElementObj>)],
        chare: &'static str,
        away: u32,
    ) {
        let acc = match self.reply.get() {
            Reply::Gather {
                pe: owner,
                id,
                values,
            } => Some(Rc::new(PartialAcc::<E::Output> {
                count: PartialCount::Pe { extras: away },
                remaining: Cell::new(elements.len()),
                values: RefCell::default(),
                error: RefCell::default(),
                owner,
                id,
                keep_values: values,
            })),
            _ => None,
        };
        if elements.is_empty() {
            if let Some(acc) = acc {
                acc.send(pe);
            }
            return;
        }
        let mut args = Some(self.args);
        for (k, (index, element)) in elements.iter().enumerate() {
            let site = Site {
                chare,
                index: *index,
                entry: E::NAME,
            };
            let Some(el) = element_of::<C>(element) else {
                return pe.abort_job(format!(
                    "charmrs: a broadcast of `{}` reached element {index} of a {chare}, not a {}",
                    E::NAME,
                    C::NAME
                ));
            };
            let a = if k + 1 == elements.len() {
                args.take().expect("moved once, for the last element")
            } else {
                // The arguments' `Clone` is user code: a panic in it is the entry's failure.
                let source = args.as_ref().expect("present until the last element");
                match catch_unwind(AssertUnwindSafe(|| source.clone())) {
                    Ok(a) => a,
                    Err(payload) => return result_panicked(pe, &site, payload),
                }
            };
            let sink = match &acc {
                Some(acc) => Sink::Partial {
                    acc: acc.clone(),
                    index: *index,
                },
                None => Sink::Discard,
            };
            run_entry::<C, E>(pe, el, a, sink, site);
        }
    }

    fn clone_box(&self) -> Box<dyn Invocation> {
        Call::<C, E>::boxed(self.args.clone(), self.reply.get())
    }
    fn entry_id(&self) -> u64 {
        E::ID
    }
    fn reply(&self) -> Reply {
        self.reply.get()
    }
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let buf = std::mem::take(out);
        *out = crate::wire::encode_onto(&self.args, buf)
            .map_err(|e| format!("encoding `{}`: {e}", E::NAME))?;
        Ok(())
    }
}

/// Polls a suspended entry method's task, charging each poll's time to its element (measured
/// for load balancing): the clock is read after every poll, as after an entry's first one.
struct Charged<F> {
    inner: F,
    /// `None` when nothing is measured.
    element: Option<std::rc::Weak<dyn crate::element::ElementObj>>,
}

impl<F: Future + Unpin> Future for Charged<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let polled = Pin::new(&mut self.inner).poll(cx);
        if let Some(element) = &self.element {
            let _ = crate::scheduler::with_pe("load measurement", |pe| {
                let took = pe.clock_mark();
                if let Some(element) = element.upgrade() {
                    element.set_load(element.load() + took);
                }
                pe.entry_secs.set(pe.entry_secs.get() + took);
            });
        }
        polled
    }
}

/// Awaits `fut`, turning a panic inside it into an `Err` with its payload.
pub(crate) fn catch_panic<T>(
    fut: Pin<Box<dyn Future<Output = T>>>,
) -> impl Future<Output = Result<T, Box<dyn Any + Send>>> {
    CatchPanic { inner: fut }
}

/// Polls a future, turning a panic into an `Err` with its payload.
struct CatchPanic<T> {
    inner: Pin<Box<dyn Future<Output = T>>>,
}

impl<T> Future for CatchPanic<T> {
    type Output = Result<T, Box<dyn Any + Send>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

/// A built element, or the task that will build it (suspendable constructor).
pub(crate) enum Built {
    Ready(Rc<dyn ElementObj>),
    Pending(Pin<Box<dyn Future<Output = Rc<dyn ElementObj>>>>),
}

/// A type-erased constructor call with its arguments.
pub(crate) trait Construction: Send {
    fn chare_name(&self) -> &'static str;
    /// Builds the element at `parts.index` (cloning the constructor arguments).
    fn construct(&self, parts: CtxParts) -> Built;
    fn clone_box(&self) -> Box<dyn Construction>;
    /// Compile-time id of the constructor (its entry-table id).
    fn ctor_id(&self) -> u64;
    /// Appends the constructor arguments, postcard-encoded.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String>;
    /// Whether the elements can migrate, and how to rebuild one that arrives.
    fn mobility(&self) -> crate::scheduler::Mobility;
}

/// Where an element lives: everything its [`Ctx`] knows.
#[derive(Clone, Copy)]
pub(crate) struct CtxParts {
    pub(crate) coll: CollectionId,
    pub(crate) index: Index,
    pub(crate) shape: Shape,
    pub(crate) pe: usize,
}

/// The constructor call of chare `C` with its arguments — none for the creation of an empty
/// sparse array, whose elements each come with their own.
pub(crate) struct Construct<C: Chare> {
    init: Option<C::Init>,
}

impl<C: Chare> Construct<C> {
    pub(crate) fn boxed(init: C::Init) -> Box<dyn Construction> {
        Box::new(Construct::<C> { init: Some(init) })
    }

    /// For a collection created without elements (a sparse array).
    pub(crate) fn empty() -> Box<dyn Construction> {
        Box::new(Construct::<C> { init: None })
    }

    pub(crate) fn from_wire(init: Option<C::Init>) -> Box<dyn Construction> {
        Box::new(Construct::<C> { init })
    }
}

impl<C: Chare> Construction for Construct<C> {
    fn chare_name(&self) -> &'static str {
        C::NAME
    }
    fn construct(&self, parts: CtxParts) -> Built {
        let ctx = Ctx::<C>::from_parts(parts);
        let init = self.init.clone().unwrap_or_else(|| {
            panic!(
                "element {} of {} has no constructor arguments (an empty sparse array builds none)",
                parts.index,
                C::NAME
            )
        });
        match C::construct(&ctx, init) {
            Constructed::Ready(chare) => Built::Ready(Rc::new(Element::new(chare, ctx))),
            Constructed::Pending(fut) => Built::Pending(Box::pin(async move {
                let chare = fut.await;
                Rc::new(Element::new(chare, ctx)) as Rc<dyn ElementObj>
            })),
        }
    }
    fn clone_box(&self) -> Box<dyn Construction> {
        Box::new(Construct::<C> {
            init: self.init.clone(),
        })
    }
    fn ctor_id(&self) -> u64 {
        C::CTOR_ID
    }
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let buf = std::mem::take(out);
        *out = crate::wire::encode_onto(&self.init, buf)
            .map_err(|e| format!("encoding `{}::new`: {e}", C::NAME))?;
        Ok(())
    }
    fn mobility(&self) -> crate::scheduler::Mobility {
        crate::scheduler::Mobility {
            migratable: C::MIGRATABLE,
            unpack: crate::migration::unpack_element::<C>,
        }
    }
}

// An envelope travels through mailboxes and queues by value: keep it within one cache line.
const _: () = assert!(std::mem::size_of::<Envelope>() <= 64);
