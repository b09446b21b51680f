//! One element as stored on its PE, and [`Coro`], the handle a suspendable entry method holds.
//!
//! An element is the chare in a `RefCell` plus its [`Ctx`] and the wakers of coroutines waiting for
//! a condition on its state. Invariants: the chare is mutably borrowed only for the length of one
//! synchronous call (an entry method, or the closure given to [`Coro::with`]), never across an
//! `.await` — `with` takes a non-async closure, so the compiler rules that out; after every such
//! borrow ends, waiting coroutines are woken to re-check their conditions (charm4py's `wait`).

use crate::chare::Chare;
use crate::ctx::Ctx;
use crate::scheduler::{with_pe, PeState};
use crate::when::WhenBuffer;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A chare with its context, as stored in its PE's collection table.
pub(crate) struct Element<C> {
    pub(crate) chare: RefCell<C>,
    pub(crate) ctx: Ctx<C>,
    waiters: RefCell<Vec<Waker>>,
    pub(crate) whens: RefCell<WhenBuffer<C>>,
    /// Queued on the PE's list of elements whose `when` buffer needs a re-check.
    pub(crate) dirty: Cell<bool>,
    /// Seconds spent in this element's entry methods since the last load-balancing step.
    load: Cell<f64>,
    /// The element's channel ends (shared with the [`Channel`](crate::Channel)s made from it).
    /// Made on first use (most elements never use a channel).
    channels: std::cell::OnceCell<Rc<RefCell<crate::channel::ChannelTable>>>,
}

/// Type-erased element: what the PE's tables hold.
pub(crate) trait ElementObj: Any {
    /// Delivers the buffered `when` calls whose condition now holds, earliest first, until none
    /// does.
    fn recheck_whens(self: Rc<Self>, pe: &PeState);
    /// Whether the element must stay for now: a `when` message waits at it.
    fn pinned(&self) -> bool;
    /// Hands over its channels' state, for a migration (its channels here are unusable after).
    fn leave_channels(&self) -> Vec<crate::channel::ChannelEnd>;
    /// A copy of its channels' state, the channels still in use (for a checkpoint).
    fn channel_snapshot(&self) -> Vec<crate::channel::ChannelEnd>;
    /// Its next contribution numbers (to its collection's reductions, to each of its
    /// sections'), for a migration: copies of its `Ctx` left behind can no longer contribute.
    fn leave_counts(&self) -> (u64, Vec<(crate::CollectionId, u64)>);
    /// The chare's state, serialized for a migration.
    fn pack(&self) -> Result<Vec<u8>, String>;
    /// Seconds of entry-method time measured since the last reset.
    fn load(&self) -> f64;
    /// Sets the measured load (reset after a balancing step; carried by a migration).
    fn set_load(&self, secs: f64);
}

impl<C: Chare> Element<C> {
    pub(crate) fn new(chare: C, ctx: Ctx<C>) -> Element<C> {
        Element {
            chare: RefCell::new(chare),
            ctx,
            waiters: RefCell::new(Vec::new()),
            whens: RefCell::default(),
            dirty: Cell::new(false),
            load: Cell::new(0.0),
            channels: std::cell::OnceCell::new(),
        }
    }

    /// The element's channel table (made on first use).
    pub(crate) fn channel_table(&self) -> &Rc<RefCell<crate::channel::ChannelTable>> {
        self.channels.get_or_init(Rc::default)
    }

    /// The channel state of an element that migrated in.
    pub(crate) fn set_channels(&self, ends: Vec<crate::channel::ChannelEnd>) {
        if !ends.is_empty() {
            let table = Rc::new(RefCell::new(crate::channel::ChannelTable::arrived(ends)));
            let _ = self.channels.set(table);
        }
    }

    /// Adds `secs` of entry-method time to the element's measured load.
    #[inline]
    pub(crate) fn add_load(&self, secs: f64) {
        self.load.set(self.load.get() + secs);
    }
}

/// The chare's state may have changed: wake `wait`ing coroutines and schedule a re-check of
/// buffered `when` calls (run by the PE after the current message, never nested in it).
pub(crate) fn state_changed<C: Chare>(element: &Rc<Element<C>>) {
    let waiters = std::mem::take(&mut *element.waiters.borrow_mut());
    for w in waiters {
        w.wake();
    }
    if !element.dirty.get() && !element.whens.borrow().is_empty() {
        element.dirty.set(true);
        let el: Rc<dyn ElementObj> = element.clone();
        // `with` only runs on PEs, so there always is one.
        let _ = with_pe("when re-check", |pe| pe.mark_dirty(el));
    }
}

/// Runs [`state_changed`] when dropped: after a borrow of the chare made after it ends, whether
/// the code that held the borrow returned or panicked (a panicking entry may have changed the
/// state before it panicked, and `when` calls or `wait`ing coroutines may now be ready).
pub(crate) struct ChangedOnExit<'a, C: Chare>(pub(crate) &'a Rc<Element<C>>);

impl<C: Chare> Drop for ChangedOnExit<'_, C> {
    fn drop(&mut self) {
        state_changed(self.0);
    }
}

impl<C: Chare> ElementObj for Element<C> {
    fn recheck_whens(self: Rc<Self>, pe: &PeState) {
        self.dirty.set(false);
        loop {
            let ready = {
                let chare = self.chare.borrow();
                self.whens.borrow_mut().take_ready(&chare)
            };
            match ready {
                Some(call) => call.run(pe, self.clone()),
                None => break,
            }
        }
    }
    fn pinned(&self) -> bool {
        !self.whens.borrow().is_empty()
    }
    fn leave_channels(&self) -> Vec<crate::channel::ChannelEnd> {
        self.channels
            .get()
            .map(|table| table.borrow_mut().leave())
            .unwrap_or_default()
    }
    fn channel_snapshot(&self) -> Vec<crate::channel::ChannelEnd> {
        self.channels
            .get()
            .map(|table| table.borrow().snapshot())
            .unwrap_or_default()
    }
    fn leave_counts(&self) -> (u64, Vec<(crate::CollectionId, u64)>) {
        self.ctx.leave()
    }
    fn pack(&self) -> Result<Vec<u8>, String> {
        let chare = self
            .chare
            .try_borrow()
            .map_err(|_| "the chare is borrowed".to_string())?;
        // The user's `Serialize` runs here, outside any entry method: a panic in it becomes an
        // error the caller reports naming the element (not a PE lost to the unwind).
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| chare.pack())).unwrap_or_else(
            |payload| {
                Err(format!(
                    "packing its state panicked: {}",
                    crate::panic::describe(payload)
                ))
            },
        )
    }
    fn load(&self) -> f64 {
        self.load.get()
    }
    fn set_load(&self, secs: f64) {
        self.load.set(secs);
    }
}

/// The handle of a suspendable (`async`) entry method on its own element (charm4py's `self` in a
/// `@coro`/`@threaded` method).
///
/// The chare is reached only through [`with`](Coro::with), whose closure cannot await, so no
/// borrow of the chare survives a suspension; meanwhile the PE runs other messages, including
/// other entries of the same chare.
///
/// ```no_run
/// use charmrs::prelude::*;
/// struct Worker { got: usize }
/// #[chare]
/// impl Worker {
///     fn new() -> Self { Worker { got: 0 } }
///     #[entry]
///     fn data(&mut self, _x: f64) { self.got += 1; }
///     #[entry]
///     async fn run(this: Coro<Self>, expected: usize) {
///         this.wait(|s| s.got >= expected).await;      // other entries run meanwhile
///         this.with(|s, ctx| println!("element {} got {}", ctx.raw_index(), s.got));
///     }
/// }
/// # fn main() {}
/// ```
pub struct Coro<C> {
    element: Rc<Element<C>>,
}

impl<C> Clone for Coro<C> {
    fn clone(&self) -> Self {
        Coro {
            element: self.element.clone(),
        }
    }
}

impl<C: Chare> Coro<C> {
    pub(crate) fn new(element: Rc<Element<C>>) -> Coro<C> {
        Coro { element }
    }

    /// Runs `f` with the chare borrowed mutably; the borrow ends when `f` returns.
    ///
    /// # Panics
    /// If the chare is already borrowed (a `with` nested inside another `with` of the same element).
    pub fn with<R>(&self, f: impl FnOnce(&mut C, &Ctx<C>) -> R) -> R {
        let _changed = ChangedOnExit(&self.element);
        let mut chare = self.element.chare.try_borrow_mut().unwrap_or_else(|_| {
            panic!(
                "Coro::with: element {} of {} is already borrowed (nested `with`)",
                self.element.ctx.raw_index(),
                C::NAME
            )
        });
        f(&mut chare, &self.element.ctx)
    }

    /// The element's context (index, proxies, PE).
    pub fn ctx(&self) -> &Ctx<C> {
        &self.element.ctx
    }

    pub(crate) fn element(&self) -> &Rc<Element<C>> {
        &self.element
    }

    /// Suspends until `condition` holds on the chare's state; re-checked after every entry method
    /// (and every [`with`](Coro::with)) on this element. Returns at once if it already holds.
    pub fn wait<F: Fn(&C) -> bool>(&self, condition: F) -> WaitFor<'_, C, F> {
        WaitFor {
            element: &self.element,
            condition,
        }
    }
}

/// Future returned by [`Coro::wait`].
#[must_use = "a condition wait does nothing unless awaited"]
pub struct WaitFor<'a, C, F> {
    element: &'a Element<C>,
    condition: F,
}

impl<C: Chare, F: Fn(&C) -> bool> Future for WaitFor<'_, C, F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let holds = {
            let chare = self.element.chare.borrow();
            (self.condition)(&chare)
        };
        if holds {
            Poll::Ready(())
        } else {
            let mut waiters = self.element.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        }
    }
}
