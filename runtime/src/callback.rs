//! [`Callback`]: an entry method of a particular element or collection, as a value — charm4py's
//! `self.thisProxy[0].method` passed where a function is expected (reduction targets, mostly).
//!
//! A callback is made by the `<entry>_callback()` methods that `#[chare]` adds to proxies; calling
//! [`Callback::send`] invokes the entry with the given arguments (point-to-point for an element's
//! callback, a broadcast for a collection's). A callback is a value like a proxy: it can be an
//! argument of an entry method, in any process of the job (Charm++'s `CkCallback` parameter); it
//! travels as its destination and the entry's id, and the receiving process checks that the
//! entry takes the callback's argument types.

use crate::chare::{Chare, Entry, Payload};
use crate::collection::{CollectionId, Shape};
use crate::envelope::{Body, Call, Envelope, Invocation, Reply};
use crate::index::Index;
use crate::registry::EntryTable;
use crate::scheduler::{with_pe, PeState};
use std::any::{Any, TypeId};
use std::marker::PhantomData;

/// Where a callback's calls go.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
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

/// How to call one entry method from a type-erased argument tuple, registered with the entry
/// (see [`EntryInfo`](crate::registry::EntryInfo)) so that a callback that arrived from another
/// process can be rebuilt.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct CallbackMaker {
    make: MakeCall,
    args: fn() -> TypeId,
}

impl CallbackMaker {
    /// The maker of entry `E` of chare `C` (used by the code `#[chare]` generates).
    pub const fn of<C: Chare, E: Entry<C>>() -> CallbackMaker {
        CallbackMaker {
            make: make_call::<C, E>,
            args: TypeId::of::<E::Args>,
        }
    }
}

/// An entry method of a given element or collection, callable later with arguments `A` (a tuple).
///
/// Serializable: pass it to another element, in any process, as an entry argument. Made by the
/// `<entry>_callback()` method `#[chare]` adds to proxies; a `Callback<(T,)>` (and a
/// `Callback<()>` for `()`) is a reduction target.
///
/// ```
/// use charmrs::prelude::*;
///
/// struct Worker;
///
/// #[chare]
/// impl Worker {
///     fn new() -> Self { Worker }
///
///     #[entry]
///     fn work(&mut self, ctx: &Ctx<Self>, report: Callback<(u64,)>) {
///         ctx.contribute(1u64, Reducer::Sum, report);    // a callback as reduction target
///     }
///
///     #[entry]
///     fn report(&mut self, total: u64) {
///         assert_eq!(total, 4);
///         charmrs::exit(0);
///     }
/// }
///
/// fn main() {
///     charmrs::Runtime::new(2).run(|_| async {
///         let workers = Array::<Worker, usize>::new(4, ());
///         let report = workers.at(0).report_callback(); // entry `report` of element 0
///         workers.work(report);                         // passed like any argument
///     }).unwrap();
/// }
/// ```
pub struct Callback<A> {
    pub(crate) dest: CallbackDest,
    pub(crate) make: MakeCall,
    pub(crate) entry: &'static str,
    /// The entry's compile-time id (its identity on the wire).
    id: u64,
    _args: PhantomData<fn(A)>,
}

/// A callback's wire form.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireCallback {
    dest: CallbackDest,
    entry: u64,
}

impl<A> serde::Serialize for Callback<A> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireCallback {
            dest: self.dest,
            entry: self.id,
        }
        .serialize(s)
    }
}

impl<'de, A: 'static> serde::Deserialize<'de> for Callback<A> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use crate::wire::custom_error;
        let wire = WireCallback::deserialize(d)?;
        let table = EntryTable::get().map_err(|e| custom_error(e.to_string()))?;
        let info = table
            .wire_id(wire.entry)
            .and_then(|w| table.by_wire_id(w))
            .ok_or_else(|| {
                custom_error(format!("a callback to unknown entry id {:#x}", wire.entry))
            })?;
        let maker = info.callback.ok_or_else(|| {
            custom_error(format!(
                "a callback to `{}`, which is no entry method",
                info.name
            ))
        })?;
        if (maker.args)() != TypeId::of::<A>() {
            return Err(custom_error(format!(
                "a callback to `{}` received as one taking {}, which that entry does not",
                info.name,
                std::any::type_name::<A>()
            )));
        }
        let mut dest = wire.dest;
        if let CallbackDest::Point {
            coll,
            ref index,
            ref mut pe,
            ..
        } = dest
        {
            // Read back from a checkpoint: the element's home in this job.
            if let Some(home) = crate::checkpoint::rehomed(coll, index) {
                *pe = home;
            }
        }
        Ok(Callback {
            dest,
            make: maker.make,
            entry: info.name,
            id: wire.entry,
            _args: PhantomData,
        })
    }
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
            id: E::ID,
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
