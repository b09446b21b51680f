//! Direct, synchronous access to an element on the calling PE (Charm++'s `ckLocalBranch` for a
//! group, `ckLocal` for an array element; charm4py's `proxy.ckLocalBranch()`).
//!
//! # What this module owns
//!
//! [`ElementProxy::with_local`] and [`Group::with_local`]: run a closure on the chare itself when
//! it lives on this PE, without a message.
//!
//! # Invariants
//!
//! * The chare is borrowed mutably for the closure only, as in an entry method; an element
//!   whose chare is borrowed already (the caller is one of its own entries, or a `Coro::with`
//!   of it is running) is reported as a panic naming it, never a second `&mut`.
//! * After the closure, the element's waiting coroutines and buffered `when` calls re-check
//!   their conditions, as after an entry method.
//! * Nothing here waits or sends: the answer is `None` when the element is not on this PE (not
//!   built yet, or migrated away).

use crate::chare::Chare;
use crate::ctx::Ctx;
use crate::element::{ChangedOnExit, Element};
use crate::proxy::{ElementProxy, Group};
use crate::scheduler::with_pe;
use std::any::Any;
use std::rc::Rc;

impl<C: Chare> ElementProxy<C> {
    /// Runs `f` on the element if it lives on the calling PE (Charm++'s `ckLocal`), with its
    /// context; `None` if it does not (not built yet, or elsewhere).
    ///
    /// ```no_run
    /// use charmrs::prelude::*;
    ///
    /// struct Cache { hits: u64 }
    ///
    /// #[chare]
    /// impl Cache {
    ///     fn new() -> Self { Cache { hits: 0 } }
    /// }
    ///
    /// struct Worker;
    ///
    /// #[chare]
    /// impl Worker {
    ///     fn new() -> Self { Worker }
    ///
    ///     /// Counts a hit in this PE's branch of the cache group, without a message.
    ///     #[entry]
    ///     fn work(&mut self, caches: Group<Cache>) {
    ///         caches.with_local(|cache, _| cache.hits += 1);
    ///     }
    /// }
    /// # fn main() {}
    /// ```
    ///
    /// # Panics
    /// Outside a running PE, or if the element's chare is borrowed already (called from one of
    /// its own entry methods).
    pub fn with_local<R>(&self, f: impl FnOnce(&mut C, &Ctx<C>) -> R) -> Option<R> {
        let element = with_pe("ElementProxy::with_local", |pe| {
            let cols = pe.collections.borrow();
            let found = cols.get(&self.collection())?.find(&self.index())?;
            let any: Rc<dyn Any> = found;
            any.downcast::<Element<C>>().ok()
        })
        .unwrap_or_else(|e| panic!("{e}"))?;
        let _changed = ChangedOnExit(&element);
        let mut chare = element.chare.try_borrow_mut().unwrap_or_else(|_| {
            panic!(
                "with_local: element {} of {} is borrowed already (called from one of its \
                 own entry methods?)",
                self.index(),
                C::NAME
            )
        });
        Some(f(&mut chare, &element.ctx))
    }
}

impl<C: Chare> Group<C> {
    /// Runs `f` on this PE's element of the group (Charm++'s and charm4py's `ckLocalBranch`).
    ///
    /// # Panics
    /// Outside a running PE, if this PE's element is not built yet (a group created by a message
    /// that has not reached this PE), or if it is borrowed already (see
    /// [`ElementProxy::with_local`]).
    pub fn with_local<R>(&self, f: impl FnOnce(&mut C, &Ctx<C>) -> R) -> R {
        let pe = crate::my_pe();
        self.at(pe).with_local(f).unwrap_or_else(|| {
            panic!(
                "with_local: the {} group's element on PE {pe} is not built yet",
                C::NAME
            )
        })
    }
}
