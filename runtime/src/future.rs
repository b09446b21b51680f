//! Futures: [`Future<T>`] (charm4py's `charm.createFuture()` / `ret=True`), fulfilled once from any
//! PE and awaited on the PE that created it; [`wait_any`] and [`wait_all`] over several.
//!
//! A future is a small copyable handle `(owner PE, id)` that can travel inside messages. The value
//! lives in the owner PE's [`FutureTable`]: a fulfilment from another PE is a message to the owner;
//! a local one goes straight to the table. Invariants: ids are never reused on a PE; a slot is
//! fulfilled at most once (a second fulfilment aborts the job naming the future); a slot is removed
//! when its value is taken by an `.await`, so a future is consumed once. Results of broadcasts
//! (`ret`/`gather` on a collection) arrive as one partial per PE, merged in a gather slot, ordered
//! by element index, and then fulfil the future. A multi-value future ([`MultiFuture`]) is a slot
//! with a collector: it turns ready once its announced number of values has arrived, in arrival
//! order; a value beyond that number aborts the job naming the future.
//!
//! Limits: a future never awaited keeps its slot (and its value, once fulfilled) for the job's
//! life. A pending slot keeps the wakers of the tasks waiting on it; those of tasks that ended
//! (a [`wait_any`] that returned through another future) are dropped as the list grows, never
//! one of a live task (which may still await this future elsewhere, e.g. in a `join`).
//!
//! [`MultiFuture`]: crate::MultiFuture

use crate::chare::Payload;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::scheduler::with_pe;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Serializes a type-erased value of a known type (for a future owned by another process).
pub(crate) type EncodeFn = fn(&(dyn Any + Send)) -> Result<Vec<u8>, String>;

/// The [`EncodeFn`] of values of type `T` (used by generated code).
#[doc(hidden)]
pub fn encode_value<T: Payload>(v: &(dyn Any + Send)) -> Result<Vec<u8>, String> {
    match v.downcast_ref::<T>() {
        Some(t) => postcard::to_stdvec(t).map_err(|e| e.to_string()),
        // A value that arrived from another process and is passed on unchanged.
        None => match v.downcast_ref::<WireValue>() {
            Some(w) if w.segments.is_empty() => Ok(w.bytes.to_vec()),
            // Its encoding refers to segments by number: decoded and encoded again, so that it
            // refers to those of the message it goes out with.
            Some(w) => {
                let t: T = WireValue {
                    bytes: w.bytes.clone(),
                    segments: w.segments.clone(),
                }
                .into_value()?;
                postcard::to_stdvec(&t).map_err(|e| e.to_string())
            }
            None => Err(format!(
                "a value that is not a {}",
                std::any::type_name::<T>()
            )),
        },
    }
}

/// Decodes a value of a known type from another process, boxed.
pub(crate) type DecodeFn = fn(&[u8]) -> Result<Box<dyn Any + Send>, String>;

/// The [`DecodeFn`] of values of type `T` (used by generated code).
#[doc(hidden)]
pub fn decode_any<T: Payload>(bytes: &[u8]) -> Result<Box<dyn Any + Send>, String> {
    crate::wire::decoded::<T>(bytes).map(|t| Box::new(t) as Box<dyn Any + Send>)
}

/// A value that arrived from another process, still encoded: the awaiting side knows its type.
pub(crate) struct WireValue {
    /// The encoding.
    pub(crate) bytes: bytes::Bytes,
    /// The out-of-band segments it refers to (large [`PodVec`](crate::PodVec)s and
    /// [`Buffer`](crate::Buffer)s, read in place where they landed).
    pub(crate) segments: Vec<bytes::Bytes>,
}

impl WireValue {
    /// A value whose encoding holds all of it.
    pub(crate) fn inline(bytes: bytes::Bytes) -> WireValue {
        WireValue {
            bytes,
            segments: Vec::new(),
        }
    }

    /// Decodes it as a `T` (its segments offered to the decoder, then dropped with it).
    fn into_value<T: Payload>(self) -> Result<T, String> {
        crate::wire::offering(self.segments, || crate::wire::decoded(&self.bytes))
            .map_err(|e| format!("a value from another process: {e}"))
    }
}

/// Turns a delivered value back into a `T`, decoding it if it came from another process.
pub(crate) fn take_value<T: Payload>(v: Box<dyn Any + Send>) -> Result<T, String> {
    match v.downcast::<T>() {
        Ok(t) => Ok(*t),
        Err(v) => match v.downcast::<WireValue>() {
            Ok(w) => w.into_value(),
            Err(_) => Err(format!(
                "a value of another type than {}",
                std::any::type_name::<T>()
            )),
        },
    }
}

/// A type-erased value (or the error that replaces it) on its way to a future.
pub(crate) type Resolution = Result<Box<dyn Any + Send>, Error>;

/// A value of type `T` that will be available later.
///
/// Created on a PE with [`Future::new`] (or by a `ret` call), fulfilled exactly once with
/// [`send`](Future::send) from any PE, and awaited (`fut.await`) in a suspendable context on the PE
/// that created it. `fut.await` yields `T`; if the value is a remote error (the entry that should
/// produce it panicked) it panics in turn — use [`result`](Future::result) to get the `Error`.
///
/// ```
/// use charmrs::{Future, Runtime};
/// let code = Runtime::new(2).run(|_| async {
///     let f = Future::<u32>::new();
///     f.send(41);                        // from any PE, usually inside a message
///     assert_eq!(f.await + 1, 42);
///     charmrs::exit(0);
/// }).unwrap();
/// assert_eq!(code, 0);
/// ```
#[derive(Serialize)]
#[serde(bound = "")]
#[must_use = "a future does nothing unless fulfilled and awaited"]
pub struct Future<T> {
    pe: u32,
    id: u64,
    #[serde(skip)]
    _value: PhantomData<fn() -> T>,
}

/// [`Future`]'s fields as they travel.
#[derive(Deserialize)]
#[serde(rename = "Future")]
struct FutureFields {
    pe: u32,
    id: u64,
}

impl<'de, T> Deserialize<'de> for Future<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = FutureFields::deserialize(d)?;
        if crate::checkpoint::is_rehoming() {
            // Its id names a wait of the job that saved it; here it could name a new one.
            return Err(crate::wire::custom_error(
                "a Future read back from a checkpoint: futures belong to the job that made \
                 them (keep none in a chare's state or the program's state across a checkpoint)"
                    .to_owned(),
            ));
        }
        Ok(Future {
            pe: f.pe,
            id: f.id,
            _value: PhantomData,
        })
    }
}

impl<T> Clone for Future<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Future<T> {}

impl<T> std::fmt::Debug for Future<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Future(#{} of PE {})", self.id, self.pe)
    }
}

impl<T: Payload> Future<T> {
    /// A new, empty future owned by the calling PE.
    ///
    /// # Panics
    /// Outside a running PE.
    pub fn new() -> Future<T> {
        with_pe("Future::new", |pe| pe.futures.borrow_mut().create())
            .map(Future::from_id)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub(crate) fn from_id((pe, id): (u32, u64)) -> Future<T> {
        Future {
            pe,
            id,
            _value: PhantomData,
        }
    }

    pub(crate) fn parts(&self) -> (u32, u64) {
        (self.pe, self.id)
    }

    /// The PE that owns (and may await) the future.
    pub fn owner(&self) -> usize {
        self.pe as usize
    }

    /// Fulfils the future with `value` (charm4py's `future.send(x)`), from any PE.
    ///
    /// A second fulfilment of the same future aborts the job with a message naming it.
    ///
    /// # Panics
    /// Outside a running PE.
    pub fn send(&self, value: T) {
        self.deliver(Ok(Box::new(value)));
    }

    pub(crate) fn deliver(&self, outcome: Resolution) {
        with_pe("Future::send", |pe| {
            pe.fulfil(self.pe as usize, self.id, outcome, encode_value::<T>)
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Whether the value has arrived (on the owner PE; `false` elsewhere).
    pub fn is_ready(&self) -> bool {
        with_pe("Future::is_ready", |pe| {
            pe.pe == self.pe as usize && pe.futures.borrow().is_ready(self.id)
        })
        .unwrap_or(false)
    }

    /// Awaits the value or the remote error that replaced it.
    pub fn result(self) -> FutureResult<T> {
        FutureResult { future: self }
    }
}

impl<T: Payload> Default for Future<T> {
    fn default() -> Self {
        Future::new()
    }
}

/// Polls slot `(owner, id)` for an await of `future` (named in panics) expecting `expect`: takes
/// its value if ready, else registers the waker.
///
/// # Panics
/// Outside a running PE, on another PE than the owner, or as
/// [`FutureTable::poll_take`].
pub(crate) fn poll_owned(
    future: &dyn std::fmt::Debug,
    (owner, id): (u32, u64),
    cx: &Context<'_>,
    expect: Expect,
) -> Poll<Resolution> {
    with_pe("Future.await", |pe| {
        if pe.pe != owner as usize {
            panic!(
                "{future:?} can only be awaited on PE {owner}, the PE that created it (awaited on \
                 PE {})",
                pe.pe
            );
        }
        let is_live = |task| pe.executor.is_live(task);
        let waiter = (
            cx.waker(),
            pe.executor.current(),
            &is_live as &dyn Fn(TaskId) -> bool,
        );
        pe.futures.borrow_mut().poll_take(id, waiter, expect)
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Awaiting a [`Future`] through [`Future::result`].
#[must_use = "futures do nothing unless awaited"]
pub struct FutureResult<T> {
    future: Future<T>,
}

impl<T: Payload> std::future::Future for FutureResult<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let f = self.future;
        match poll_owned(&f, f.parts(), cx, Expect::One) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(v)) => Poll::Ready(Ok(
                take_value::<T>(v).unwrap_or_else(|e| panic!("{f:?} received {e}"))
            )),
        }
    }
}

/// Awaiting a [`Future`] directly yields its value.
pub struct FutureValue<T> {
    inner: FutureResult<T>,
}

impl<T: Payload> std::future::Future for FutureValue<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match Pin::new(&mut self.inner).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(v)) => Poll::Ready(v),
            Poll::Ready(Err(e)) => panic!("awaited future failed: {e}"),
        }
    }
}

impl<T: Payload> std::future::IntoFuture for Future<T> {
    type Output = T;
    type IntoFuture = FutureValue<T>;
    fn into_future(self) -> FutureValue<T> {
        FutureValue {
            inner: self.result(),
        }
    }
}

/// Waits until at least one of `futures` is ready; returns the position of a ready one
/// (charm4py's `charm.iwait`, one step at a time). Awaiting that future then returns at once.
///
/// # Panics
/// If `futures` is empty, a future belongs to another PE, or one was awaited already (its
/// value is gone: it would never be ready again).
pub async fn wait_any<T: Payload>(futures: &[Future<T>]) -> usize {
    assert!(!futures.is_empty(), "wait_any: no futures to wait for");
    std::future::poll_fn(|cx| {
        with_pe("wait_any", |pe| {
            let mut table = pe.futures.borrow_mut();
            for (i, f) in futures.iter().enumerate() {
                assert_eq!(
                    f.pe as usize, pe.pe,
                    "wait_any: {f:?} belongs to another PE"
                );
                if table.is_ready(f.id) {
                    return Poll::Ready(i);
                }
                assert!(
                    table.is_known(f.id),
                    "wait_any: {f:?} was already consumed (a future is awaited once)"
                );
            }
            let is_live = |task| pe.executor.is_live(task);
            let task = pe.executor.current();
            for f in futures {
                table.register(f.id, cx.waker(), task, &is_live);
            }
            Poll::Pending
        })
        .unwrap_or_else(|e| panic!("{e}"))
    })
    .await
}

/// The values of `futures` as they become ready, each with its position in `futures`
/// (charm4py's `for f in charm.iwait(futures)`): [`Iwait::next`] waits for the next one. Of
/// several ready at once, any may come first.
///
/// ```
/// use charmrs::Future;
///
/// charmrs::Runtime::new(1).run(|_| async {
///     let futures: Vec<Future<u32>> = (0..3).map(|_| Future::new()).collect();
///     futures[2].send(20);
///     futures[0].send(0);
///     let mut arrivals = charmrs::iwait(futures.clone());
///     let (first, v) = arrivals.next().await.unwrap();  // one of the two sent
///     assert_eq!(v, first as u32 * 10);
///     futures[1].send(10);
///     let mut rest = vec![arrivals.next().await.unwrap(), arrivals.next().await.unwrap()];
///     rest.sort();
///     assert!(rest.contains(&(1, 10)) && arrivals.next().await.is_none());
///     charmrs::exit(0);
/// }).unwrap();
/// ```
///
/// # Panics
/// As [`wait_any`]: a future of another PE, or one awaited already; and in [`Iwait::next`], as
/// awaiting a future does, when a value is a remote failure (the entry that was to compute it
/// panicked).
pub fn iwait<T: Payload>(futures: impl IntoIterator<Item = Future<T>>) -> Iwait<T> {
    let futures: Vec<Future<T>> = futures.into_iter().collect();
    Iwait {
        positions: (0..futures.len()).collect(),
        futures,
    }
}

/// The futures [`iwait`] still waits for.
pub struct Iwait<T: Payload> {
    /// The futures not yet yielded ([`wait_any`] takes them as they are)…
    futures: Vec<Future<T>>,
    /// …and, alike, each one's position in the caller's list.
    positions: Vec<usize>,
}

impl<T: Payload> std::fmt::Debug for Iwait<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iwait")
            .field("futures", &self.futures)
            .field("positions", &self.positions)
            .finish()
    }
}

impl<T: Payload> Iwait<T> {
    /// Waits for the next future to be ready and returns its position and value; `None` once
    /// every value was returned.
    pub async fn next(&mut self) -> Option<(usize, T)> {
        if self.futures.is_empty() {
            return None;
        }
        let ready = wait_any(&self.futures).await;
        let future = self.futures.swap_remove(ready);
        let position = self.positions.swap_remove(ready);
        Some((position, future.await))
    }

    /// How many values [`next`](Self::next) has still to return.
    pub fn remaining(&self) -> usize {
        self.futures.len()
    }
}

/// Waits for every future and returns their values in order (charm4py's `charm.wait`).
pub async fn wait_all<T: Payload>(futures: impl IntoIterator<Item = Future<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for f in futures {
        out.push(f.await);
    }
    out
}

/// The tasks waiting for a pending slot: each waker once, with the task it wakes when it was
/// registered from one of the PE's tasks. Wakers of tasks that have ended (a `wait_any` that
/// returned through another future) are dropped when the list has doubled since it was last
/// pruned, so a long-lived future that many short tasks wait on keeps only the live ones.
#[derive(Default)]
struct Waiters {
    wakers: Vec<(Waker, Option<TaskId>)>,
    prune_at: usize,
}

/// A task of the PE's executor: its slot and generation.
pub(crate) type TaskId = (u32, u32);

impl Waiters {
    /// Adds `waker` (of `task`) unless it is there already; `is_live` says whether a task still
    /// runs.
    fn add(&mut self, waker: &Waker, task: Option<TaskId>, is_live: &dyn Fn(TaskId) -> bool) {
        if let Some((_, known)) = self.wakers.iter_mut().find(|(w, _)| w.will_wake(waker)) {
            if *known != task {
                // One waker polled from two tasks (a shared combinator's): it serves whichever
                // still runs, so it is never pruned.
                *known = None;
            }
            return;
        }
        if self.wakers.len() >= self.prune_at.max(8) {
            self.wakers.retain(|(_, t)| t.is_none_or(is_live));
            self.prune_at = 2 * self.wakers.len();
        }
        self.wakers.push((waker.clone(), task));
    }

    fn wake_all(self) {
        self.wakers.into_iter().for_each(|(w, _)| w.wake());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.wakers.len()
    }
}

enum SlotState {
    Empty(Waiters),
    Ready(Resolution),
    /// A multi-value future ([`MultiFuture`](crate::MultiFuture)) still collecting.
    Collecting(Waiters, Collector),
    /// A multi-value future with all its values ([`CollectedValues`]), of which it takes this
    /// many (kept to name an excess value as such until the values are taken).
    Collected(Resolution, usize),
}

/// Which kind of future an await expects of a slot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// One value ([`Future`]).
    One,
    /// Collected values ([`MultiFuture`](crate::MultiFuture)).
    Collected,
}

/// Adds one PE's partial (possibly still encoded) to a gather.
type MergeFn = Box<dyn FnMut(Box<dyn Any + Send>) -> Result<(), String>>;

/// How a partial of a broadcast's result counts towards its gather.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum PartialCount {
    /// One PE's part (the results of the elements whose home it is and that it holds);
    /// `extras` more of its elements were away from home: their results follow as
    /// [`PartialCount::Element`] partials from wherever they are.
    Pe { extras: u32 },
    /// The result of one element that was away from its home PE.
    Element,
}

/// How the partials of a broadcast's result become one value.
struct Gather {
    /// PE partials still to come.
    remaining: usize,
    /// Element partials announced by PE partials, minus those arrived (may be negative for a
    /// while: an element's partial can overtake its home PE's).
    extras: i64,
    merge: MergeFn,
    finish: Box<dyn FnOnce() -> Box<dyn Any + Send>>,
    error: Option<Error>,
}

/// The values of a multi-value future ([`MultiFuture`](crate::MultiFuture)) as they arrive.
struct Collector {
    /// How many values make it ready.
    expected: usize,
    /// Values (and errors) arrived so far.
    arrived: usize,
    /// The values, in arrival order (each possibly still encoded).
    values: Vec<Box<dyn Any + Send>>,
    /// The first error that replaced a value.
    error: Option<Error>,
}

/// What a ready multi-value future holds: its values in arrival order, each possibly still
/// encoded (the awaiting side knows their type).
pub(crate) type CollectedValues = Vec<Box<dyn Any + Send>>;

/// The futures owned by one PE.
#[derive(Default)]
pub(crate) struct FutureTable {
    next: u64,
    me: u32,
    slots: FxHashMap<u64, SlotState>,
    gathers: FxHashMap<u64, Gather>,
}

impl FutureTable {
    pub(crate) fn new(pe: usize) -> FutureTable {
        FutureTable {
            me: pe as u32,
            ..FutureTable::default()
        }
    }

    pub(crate) fn create(&mut self) -> (u32, u64) {
        self.next += 1;
        self.slots
            .insert(self.next, SlotState::Empty(Waiters::default()));
        (self.me, self.next)
    }

    /// A multi-value future: ready once `expected` values have arrived (at once if none is
    /// expected), its value a [`CollectedValues`].
    pub(crate) fn create_multi(&mut self, expected: usize) -> (u32, u64) {
        self.next += 1;
        let slot = if expected == 0 {
            let empty: CollectedValues = Vec::new();
            SlotState::Collected(Ok(Box::new(empty)), 0)
        } else {
            SlotState::Collecting(
                Waiters::default(),
                Collector {
                    expected,
                    arrived: 0,
                    values: Vec::with_capacity(expected.min(1 << 16)),
                    error: None,
                },
            )
        };
        self.slots.insert(self.next, slot);
        (self.me, self.next)
    }

    /// A future that completes when `expected` partials of a broadcast result have arrived; with
    /// `values`, its value is the `Vec<R>` of all elements' results ordered by index, else `()`.
    pub(crate) fn create_gather<R: Payload>(
        &mut self,
        expected: usize,
        values: bool,
    ) -> (u32, u64) {
        let id = self.create();
        let acc: Rc<RefCell<Vec<(Index, R)>>> = Rc::default();
        let merge_into = acc.clone();
        let gather = Gather {
            remaining: expected,
            merge: Box::new(move |part| {
                let part = take_value::<Vec<(Index, R)>>(part)?;
                merge_into.borrow_mut().extend(part);
                Ok(())
            }),
            finish: Box::new(move || {
                if values {
                    let mut all = std::mem::take(&mut *acc.borrow_mut());
                    all.sort_by_key(|e| e.0);
                    Box::new(all.into_iter().map(|(_, v)| v).collect::<Vec<R>>())
                } else {
                    Box::new(())
                }
            }),
            error: None,
            extras: 0,
        };
        self.gathers.insert(id.1, gather);
        if expected == 0 {
            let done = self.partial_done(id.1).expect("just created");
            self.fulfil(id.1, done).expect("just created");
        }
        id
    }

    fn partial_done(&mut self, id: u64) -> Option<Resolution> {
        let g = self.gathers.get(&id)?;
        if g.remaining > 0 || g.extras != 0 {
            return None;
        }
        let g = self.gathers.remove(&id)?;
        Some(match g.error {
            Some(e) => Err(e),
            None => Ok((g.finish)()),
        })
    }

    /// Adds one PE's partial to gather `id`; returns the final outcome once all arrived.
    pub(crate) fn add_partial(
        &mut self,
        id: u64,
        part: Resolution,
        count: PartialCount,
    ) -> Result<Option<Resolution>, String> {
        let g = self.gathers.get_mut(&id).ok_or_else(|| {
            format!(
                "a broadcast result arrived for unknown future #{id} of PE {}",
                self.me
            )
        })?;
        match count {
            PartialCount::Pe { extras } => {
                g.remaining = g.remaining.saturating_sub(1);
                g.extras += i64::from(extras);
            }
            PartialCount::Element => g.extras -= 1,
        }
        match part {
            // Merging may decode a partial from another process: the user's `Deserialize`,
            // which may panic; the job then aborts naming the future.
            Ok(p) => crate::wire::guarded(|| (g.merge)(p))
                .map_err(|e| format!("a broadcast result for future #{id}: {e}"))?,
            Err(e) => {
                g.error.get_or_insert(e);
            }
        }
        Ok(self.partial_done(id))
    }

    /// Stores the value of future `id` and wakes its awaiters; for a multi-value future, adds
    /// one value, and stores them all once the last has arrived.
    pub(crate) fn fulfil(&mut self, id: u64, outcome: Resolution) -> Result<(), String> {
        let me = self.me;
        let Some(slot) = self.slots.get_mut(&id) else {
            return Err(if id <= self.next {
                format!("future #{id} of PE {me} was fulfilled again after its value was consumed")
            } else {
                format!("future #{id} of PE {me} does not exist")
            });
        };
        match slot {
            SlotState::Empty(_) => {
                let SlotState::Empty(wakers) = std::mem::replace(slot, SlotState::Ready(outcome))
                else {
                    unreachable!()
                };
                wakers.wake_all();
                Ok(())
            }
            SlotState::Collecting(_, c) => {
                c.arrived += 1;
                match outcome {
                    Ok(v) => c.values.push(v),
                    Err(e) => {
                        c.error.get_or_insert(e);
                    }
                }
                if c.arrived < c.expected {
                    return Ok(());
                }
                let all = match c.error.take() {
                    Some(e) => Err(e),
                    None => Ok(Box::new(std::mem::take(&mut c.values)) as Box<dyn Any + Send>),
                };
                let expected = c.expected;
                let SlotState::Collecting(wakers, _) =
                    std::mem::replace(slot, SlotState::Collected(all, expected))
                else {
                    unreachable!()
                };
                wakers.wake_all();
                Ok(())
            }
            SlotState::Ready(_) => Err(format!("future #{id} of PE {me} was fulfilled twice")),
            SlotState::Collected(_, n) => Err(format!(
                "future #{id} of PE {me} takes {n} value(s) and received more"
            )),
        }
    }

    pub(crate) fn is_ready(&self, id: u64) -> bool {
        matches!(
            self.slots.get(&id),
            Some(SlotState::Ready(_) | SlotState::Collected(..))
        )
    }

    /// Whether future `id` was made here and not consumed yet.
    pub(crate) fn is_known(&self, id: u64) -> bool {
        self.slots.contains_key(&id)
    }

    /// Registers `waker` (of the executor's task `task`, when polled from one) to be woken when
    /// future `id` is ready; `is_live` says whether a task still runs.
    pub(crate) fn register(
        &mut self,
        id: u64,
        waker: &Waker,
        task: Option<TaskId>,
        is_live: &dyn Fn(TaskId) -> bool,
    ) {
        if let Some(SlotState::Empty(wakers) | SlotState::Collecting(wakers, _)) =
            self.slots.get_mut(&id)
        {
            wakers.add(waker, task, is_live);
        }
    }

    /// Takes the value if ready (removing the slot), else registers `waker` (as
    /// [`register`](Self::register)).
    ///
    /// # Panics
    /// If the value was taken already, or the slot is of another kind than `expect` (the
    /// sending side of a multi-value future awaited as a future, or the reverse).
    pub(crate) fn poll_take(
        &mut self,
        id: u64,
        (waker, task, is_live): (&Waker, Option<TaskId>, &dyn Fn(TaskId) -> bool),
        expect: Expect,
    ) -> Poll<Resolution> {
        let me = self.me;
        let (kind, ready) = match self.slots.get(&id) {
            None => {
                panic!("future #{id} of PE {me} was already consumed (a future is awaited once)")
            }
            Some(SlotState::Empty(_)) => (Expect::One, false),
            Some(SlotState::Ready(_)) => (Expect::One, true),
            Some(SlotState::Collecting(..)) => (Expect::Collected, false),
            Some(SlotState::Collected(..)) => (Expect::Collected, true),
        };
        if kind != expect {
            match kind {
                Expect::Collected => panic!(
                    "future #{id} of PE {me} is the sending side of a multi-value future: await \
                     the MultiFuture it came from"
                ),
                Expect::One => panic!(
                    "future #{id} of PE {me} is a single-value future, not a multi-value one"
                ),
            }
        }
        if ready {
            match self.slots.remove(&id) {
                Some(SlotState::Ready(v) | SlotState::Collected(v, _)) => Poll::Ready(v),
                _ => unreachable!(),
            }
        } else {
            self.register(id, waker, task, is_live);
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod waiters_tests {
    use super::{TaskId, Waiters};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A slot that a stream of short tasks waits on keeps the wakers of the live ones only, and
    /// wakes every live one once when it is fulfilled.
    #[test]
    fn wakers_of_ended_tasks_are_dropped_and_live_ones_kept() {
        let mut waiters = Waiters::default();
        let counters: Vec<Arc<Count>> = (0..1000)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        // Task k (slot k, generation 0) is live while it is one of the last 5 registered, or
        // one of the 3 long-lived ones (0, 1, 2); one waker registered outside any task.
        let outside = Arc::new(Count(AtomicUsize::new(0)));
        waiters.add(&Waker::from(outside.clone()), None, &|_| false);
        for (k, c) in counters.iter().enumerate() {
            let is_live = |(slot, _): TaskId| slot < 3 || slot as usize + 5 > k;
            let waker = Waker::from(c.clone());
            waiters.add(&waker, Some((k as u32, 0)), &is_live);
            waiters.add(&waker, Some((k as u32, 0)), &is_live); // once only
            assert!(waiters.len() <= 64, "{} wakers after {k}", waiters.len());
        }
        // One waker registered first from a task that ends, then from one that stays: kept.
        let shared = Arc::new(Count(AtomicUsize::new(0)));
        let shared_waker = Waker::from(shared.clone());
        waiters.add(&shared_waker, Some((5000, 0)), &|_| true);
        waiters.add(&shared_waker, Some((5001, 0)), &|_| true);
        // More ended tasks after it, so that the list is pruned again.
        let still_live = |(slot, _): TaskId| slot < 3 || (995..1000).contains(&slot);
        for k in 0..100 {
            let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
            waiters.add(&waker, Some((10_000 + k, 0)), &still_live);
        }
        waiters.wake_all();
        assert_eq!(
            shared.0.load(Ordering::Relaxed),
            1,
            "a live task's waker was dropped"
        );
        assert_eq!(outside.0.load(Ordering::Relaxed), 1);
        for k in [0, 1, 2, 995, 996, 997, 998, 999] {
            assert_eq!(counters[k].0.load(Ordering::Relaxed), 1, "task {k}");
        }
        let woken: usize = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
        assert!(woken < 64, "{woken} ended tasks woken");
    }
}
