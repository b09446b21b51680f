//! [`Callback`]: an entry method of a particular element or collection, as a value — charm4py's
//! `self.thisProxy[0].method` passed where a function is expected (reduction targets, mostly).
//!
//! A callback is made by the `<entry>_callback()` methods that `#[chare]` adds to proxies; calling
//! [`Callback::send`] invokes the entry with the given arguments (point-to-point for an element's
//! callback, a broadcast for a collection's).

use crate::chare::{Chare, Entry, Payload};
use crate::collection::{CollectionId, Shape};
use crate::envelope::{Body, Call, Envelope, Invocation, Reply};
use crate::index::Index;
use crate::scheduler::{with_pe, PeState};
use std::any::Any;
use std::marker::PhantomData;

/// Where a callback's calls go.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum CallbackDest {
    /// One element.
    Point {
        /// Its collection.
        coll: CollectionId,
        /// Its index.
        index: Index,
        /// Its PE.
        pe: u32,
        /// Message priority.
        priority: i32,
    },
    /// Every element of a collection.
    Broadcast {
        /// The collection.
        coll: CollectionId,
        /// Its shape.
        shape: Shape,
        /// Message priority.
        priority: i32,
    },
}

/// Builds the invocation of one entry from its boxed argument tuple.
pub(crate) type MakeCall = fn(Box<dyn Any + Send>) -> Option<Box<dyn Invocation>>;

fn make_call<C: Chare, E: Entry<C>>(args: Box<dyn Any + Send>) -> Option<Box<dyn Invocation>> {
    let args = args.downcast::<E::Args>().ok()?;
    Some(Call::<C, E>::boxed(*args, Reply::None))
}

/// An entry method of a given element or collection, callable later with arguments `A` (a tuple).
pub struct Callback<A> {
    pub(crate) dest: CallbackDest,
    pub(crate) make: MakeCall,
    pub(crate) entry: &'static str,
    _args: PhantomData<fn(A)>,
}

impl<A> Clone for Callback<A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<A> Copy for Callback<A> {}

impl<A> std::fmt::Debug for Callback<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Callback({} → {:?})", self.entry, self.dest)
    }
}

impl<A: Payload> Callback<A> {
    /// The callback of entry `E` through a proxy whose destination is `dest` (used by the code
    /// `#[chare]` generates).
    #[doc(hidden)]
    pub fn new<C: Chare, E: Entry<C, Args = A>>(dest: CallbackDest) -> Callback<A> {
        Callback {
            dest,
            make: make_call::<C, E>,
            entry: E::NAME,
            _args: PhantomData,
        }
    }

    /// Invokes the entry with `args`.
    ///
    /// # Panics
    /// Outside a running PE.
    pub fn send(&self, args: A) {
        with_pe("Callback::send", |pe| {
            let call =
                (self.make)(Box::new(args)).expect("the argument type is checked by the compiler");
            deliver(pe, self.dest, call);
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A callback's call with where it goes: one PE (`to`), or every PE holding elements of the
/// collection (`to == None`, a broadcast).
pub(crate) struct Routed {
    pub(crate) env: Envelope,
    pub(crate) to: Option<u32>,
}

/// Where `call` goes for `dest`.
pub(crate) fn route(dest: CallbackDest, call: Box<dyn Invocation>) -> Routed {
    match dest {
        CallbackDest::Point {
            coll,
            index,
            pe,
            priority,
        } => Routed {
            env: Envelope::new(priority, Body::Point { coll, index, call }),
            to: Some(pe),
        },
        CallbackDest::Broadcast {
            coll,
            shape,
            priority,
        } => Routed {
            env: Envelope::new(priority, Body::Broadcast { coll, call }),
            to: match shape {
                Shape::Single { pe: home } => Some(home),
                _ => None,
            },
        },
    }
}

/// Sends a routed call from PE `pe`.
pub(crate) fn send_routed(pe: &PeState, routed: Routed) {
    let priority = routed.env.priority;
    match (routed.to, routed.env.body) {
        (Some(to), body) => pe.send(to as usize, Envelope::new(priority, body)),
        (None, Body::Broadcast { coll, call }) => pe.broadcast(coll, call, priority),
        (None, _) => {
            pe.abort_job("charmrs: a routed call for every PE that is no broadcast".into())
        }
    }
}

/// Sends `call` to `dest` from PE `pe`.
pub(crate) fn deliver(pe: &PeState, dest: CallbackDest, call: Box<dyn Invocation>) {
    send_routed(pe, route(dest, call));
}
