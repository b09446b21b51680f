//! [`Ctx`]: what an element knows about itself — its index, its collection, its PE.
//!
//! Every entry method and constructor may take `ctx: &Ctx<Self>` (charm4py's `thisIndex`,
//! `thisProxy`, `charm.myPe()`). The same chare type can be a single chare, a group element or an
//! array element of any dimension, so index and proxy accessors check the kind at run time and
//! name the mismatch if the program asks for the wrong one.

use crate::chare::Chare;
use crate::chare::Payload;
use crate::collection::{CollectionId, Shape};
use crate::envelope::CtxParts;
use crate::future::Future;
use crate::index::{ArrayIndex, Index};
use crate::proxy::{Array, ElementProxy, Group, Proxy};
use crate::reduction::{CustomReducer, Kind, Part, Reduce, Reducer, Target};
use crate::scheduler::with_pe;
use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::rc::Rc;

/// The context of one element of chare type `C`.
pub struct Ctx<C> {
    parts: CtxParts,
    /// Numbers of this element's next reduction contributions.
    counts: Rc<Counts>,
    _chare: PhantomData<fn() -> C>,
}

/// Numbers of an element's next reduction contributions (shared by the copies of its `Ctx`).
struct Counts {
    /// To its collection's reductions.
    reductions: Cell<u64>,
    /// To each of its sections' reductions.
    sections: RefCell<FxHashMap<CollectionId, u64>>,
    /// Set when the element migrates away: the numbers went with it, so a copy of its `Ctx`
    /// kept here (in a timer's closure, say) must not number a contribution any more — it
    /// would reuse a number the element will use where it is now.
    left: Cell<bool>,
}

/// A copy names the same element (an `async fn new` receives one by value); they share the
/// element's reduction counters.
impl<C> Clone for Ctx<C> {
    fn clone(&self) -> Self {
        Ctx {
            parts: self.parts,
            counts: self.counts.clone(),
            _chare: PhantomData,
        }
    }
}

impl<C: Chare> Ctx<C> {
    pub(crate) fn from_parts(parts: CtxParts) -> Ctx<C> {
        Self::arrived(parts, 0, &[])
    }

    /// The context of an element that migrated in, with its reduction counts so far (of its
    /// collection, and of each of its sections).
    pub(crate) fn arrived(
        parts: CtxParts,
        reductions: u64,
        sections: &[(CollectionId, u64)],
    ) -> Ctx<C> {
        Ctx {
            parts,
            counts: Rc::new(Counts {
                reductions: Cell::new(reductions),
                sections: RefCell::new(sections.iter().copied().collect()),
                left: Cell::new(false),
            }),
            _chare: PhantomData,
        }
    }

    /// The shape of the element's collection.
    pub(crate) fn shape(&self) -> Shape {
        self.parts.shape
    }

    /// For a migration: the element's next contribution numbers (to its collection, and to each
    /// of its sections), which travel with it; the copies of this `Ctx` left here can no longer
    /// contribute.
    pub(crate) fn leave(&self) -> (u64, Vec<(CollectionId, u64)>) {
        self.counts.left.set(true);
        let mut sections: Vec<_> = self
            .counts
            .sections
            .borrow()
            .iter()
            .map(|(&c, &n)| (c, n))
            .collect();
        sections.sort_unstable();
        (self.counts.reductions.get(), sections)
    }

    /// Panics if the element has migrated away from this `Ctx` (see [`Counts::left`]).
    fn check_here(&self, what: &str) {
        if self.counts.left.get() {
            panic!(
                "{what}: element {} of {} {:?} migrated away from PE {}; a copy of its Ctx kept \
                 there cannot contribute for it (contribute from the element's entry methods)",
                self.parts.index,
                C::NAME,
                self.parts.coll,
                self.parts.pe
            );
        }
    }

    /// The number of this element's next contribution to section `section`.
    pub(crate) fn peek_section_seq(&self, section: CollectionId) -> u64 {
        self.check_here("allreduce");
        self.counts
            .sections
            .borrow()
            .get(&section)
            .copied()
            .unwrap_or(0)
    }

    /// Takes the number of this element's next contribution to section `section`.
    pub(crate) fn next_section_seq(&self, section: CollectionId) -> u64 {
        self.check_here("contribute");
        let mut sections = self.counts.sections.borrow_mut();
        let next = sections.entry(section).or_insert(0);
        let seq = *next;
        *next += 1;
        seq
    }

    /// The PE this element runs on.
    pub fn my_pe(&self) -> usize {
        self.parts.pe
    }

    /// Number of PEs in the job.
    pub fn num_pes(&self) -> usize {
        crate::num_pes()
    }

    /// The element's index in the runtime's representation (group elements: the PE, 1-d;
    /// single chares: zero dimensions).
    pub fn raw_index(&self) -> Index {
        self.parts.index
    }

    /// The element's index as `I` (`usize` for groups and 1-d arrays, tuples for N-d arrays).
    ///
    /// # Panics
    /// If `I` has the wrong number of dimensions for this element's collection (the message names
    /// both); use [`try_index`](Self::try_index) to get `None` instead.
    pub fn index<I: ArrayIndex>(&self) -> I {
        self.try_index().unwrap_or_else(|| {
            panic!(
                "Ctx::index: element {} of a {} cannot be read as a {}",
                self.parts.index,
                self.parts.shape.describe(),
                std::any::type_name::<I>()
            )
        })
    }

    /// The element's index as `I`, or `None` if the dimensions do not match.
    pub fn try_index<I: ArrayIndex>(&self) -> Option<I> {
        I::from_index(&self.parts.index)
    }

    /// The collection this element belongs to (a broadcast proxy; `at` reaches siblings).
    pub fn this_proxy(&self) -> Proxy<C> {
        Proxy::from_parts(self.parts.coll, self.parts.shape)
    }

    /// A proxy to this very element.
    pub fn this_element(&self) -> ElementProxy<C> {
        ElementProxy::from_parts(self.parts.coll, self.parts.index, self.parts.pe)
    }

    /// This element's array, typed by index.
    ///
    /// # Panics
    /// If the element is not in an array indexed by `I` (the message names what it is).
    pub fn this_array<I: ArrayIndex>(&self) -> Array<C, I> {
        Array::from_proxy(self.this_proxy()).unwrap_or_else(|e| panic!("Ctx::this_array: {e}"))
    }

    /// This element's group.
    ///
    /// # Panics
    /// If the element is not a group element.
    pub fn this_group(&self) -> Group<C> {
        match self.parts.shape {
            Shape::Group => Group::from_proxy(self.this_proxy()),
            other => panic!(
                "Ctx::this_group: this element belongs to a {}",
                other.describe()
            ),
        }
    }

    fn contribute_part(&self, what: &'static str, part: Part) {
        self.check_here(what);
        let seq = self.counts.reductions.get();
        self.counts.reductions.set(seq + 1);
        with_pe(what, |pe| {
            pe.contribute(
                self.parts.coll,
                seq,
                self.parts.shape,
                &self.parts.index,
                part,
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Moves this element to PE `to` once the current entry method returns (charm4py's
    /// `migrate`). The state travels serialized; `migrated` runs on arrival; the constructor does
    /// not run again. Messages sent to the element meanwhile follow it. If a suspended entry of
    /// the element is still waiting, or `when` calls wait at it, the move waits until neither is
    /// the case.
    ///
    /// # Errors
    /// An unknown PE, or a chare type that is not `#[chare(migratable)]`, or an element that is
    /// not in an array (single chares and group elements stay where they were placed).
    pub fn migrate(&self, to: usize) -> crate::Result<()> {
        if !C::MIGRATABLE {
            return Err(crate::Error::NotMigratable { chare: C::NAME });
        }
        if !matches!(self.parts.shape, Shape::Array { .. } | Shape::Sparse { .. }) {
            return Err(crate::Error::Options(format!(
                "element {} of {} is in a {}: only array elements migrate",
                self.parts.index,
                C::NAME,
                self.parts.shape.describe()
            )));
        }
        with_pe("migrate", |pe| {
            pe.check_pe(to)?;
            if pe.under_construction(self.parts.coll, self.parts.index) {
                // The element is not in the PE's table until `async fn new` returns: a request
                // now would be taken for one of an element that left already, and dropped.
                return Err(crate::Error::Options(format!(
                    "element {} of {} cannot migrate from inside its constructor (call \
                     `migrate` from an entry method once it is built)",
                    self.parts.index,
                    C::NAME
                )));
            }
            pe.request_migration(crate::migration::Request {
                coll: self.parts.coll,
                index: self.parts.index,
                to,
                balance: None,
                periodic: false,
            });
            Ok(())
        })?
    }

    /// Ready for load balancing (Charm++'s `AtSync`): once every element of the collection called
    /// it, the runtime balances the measured loads with the strategy chosen by `+balancer` (none:
    /// no migration), migrates elements, and then reaches `resume` — typically a broadcast
    /// callback to a `resume_from_sync` entry, or a future. Collective, like a reduction: every
    /// element calls it, in the same order as its other contributions.
    ///
    /// ```
    /// use charmrs::prelude::*;
    ///
    /// struct Block;
    ///
    /// #[chare]
    /// impl Block {
    ///     fn new() -> Self { Block }
    ///
    ///     #[entry]
    ///     fn step(&mut self, ctx: &Ctx<Self>, balanced: Future<()>) {
    ///         // … the step's work, timed for the strategy …
    ///         ctx.at_sync(balanced);  // usually `ctx.this_proxy().resume_from_sync_callback()`
    ///     }
    /// }
    ///
    /// fn main() {
    ///     charmrs::Runtime::new(2).balancer("GreedyRefine").run(|_| async {
    ///         let blocks = Array::<Block, usize>::new(8, ());
    ///         let balanced = Future::new();
    ///         blocks.step(balanced);
    ///         balanced.await;         // every element called at_sync, the strategy ran
    ///         charmrs::exit(0);
    ///     }).unwrap();
    /// }
    /// ```
    ///
    /// An element with a suspended entry method (an `async` entry that calls `at_sync` and then
    /// awaits its resumption, for one) counts in the strategy's picture but stays where it is:
    /// a coroutine cannot move. To let the strategy move elements, call `at_sync` from a plain
    /// entry method, or at the end of an async one.
    pub fn at_sync(&self, resume: impl Into<Target<()>>) {
        let element = crate::balance::LbRecord {
            index: self.parts.index,
            pe: self.parts.pe as u32,
            load: 0.0,
            migratable: C::MIGRATABLE
                && matches!(self.parts.shape, Shape::Array { .. } | Shape::Sparse { .. }),
        };
        let part = crate::balance::at_sync_part(self.parts.coll, element, resume.into().spec());
        self.contribute_part("at_sync", part);
    }

    /// Contributes `data` to the collection's next reduction with `reducer`; the result goes to
    /// `target` (a [`Future`] or an entry callback such as `proxy.at(0).done_callback()`).
    /// Every element of the collection must contribute, in the same order of reductions.
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
    ///     fn work(&mut self, ctx: &Ctx<Self>, total: Future<u64>) {
    ///         let me: usize = ctx.index();
    ///         ctx.contribute(me as u64, Reducer::Sum, total);
    ///     }
    /// }
    ///
    /// fn main() {
    ///     charmrs::Runtime::new(2).run(|_| async {
    ///         let workers = Array::<Worker, usize>::new(4, ());
    ///         let total = Future::new();
    ///         workers.work(total);                 // a broadcast
    ///         assert_eq!(total.await, 0 + 1 + 2 + 3);
    ///         charmrs::exit(0);
    ///     }).unwrap();
    /// }
    /// ```
    ///
    /// # Panics
    /// If `reducer` does not apply to `T` (e.g. a bitwise reducer on floats).
    pub fn contribute<T: Reduce>(&self, data: T, reducer: Reducer, target: impl Into<Target<T>>) {
        assert!(
            T::supports(reducer),
            "contribute: reducer {reducer:?} does not apply to {}",
            std::any::type_name::<T>()
        );
        self.contribute_part(
            "contribute",
            Part::new(data, Kind::builtin::<T>(reducer), target),
        );
    }

    /// Contributes `data` to a reduction with a user-defined reducer (see [`crate::reducer!`]).
    pub fn contribute_with<T: Payload>(
        &self,
        data: T,
        reducer: &CustomReducer<T>,
        target: impl Into<Target<T>>,
    ) {
        self.contribute_part(
            "contribute_with",
            Part::new(data, Kind::custom(reducer), target),
        );
    }

    /// Contributes `data` to a gather: the target receives every element's value, ordered by index
    /// (charm4py's `Reducer.gather`).
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
    ///     fn work(&mut self, ctx: &Ctx<Self>, all: Future<Vec<String>>) {
    ///         ctx.gather(format!("element {} on PE {}", ctx.index::<usize>(), ctx.my_pe()), all);
    ///     }
    /// }
    ///
    /// fn main() {
    ///     charmrs::Runtime::new(2).run(|_| async {
    ///         let workers = Array::<Worker, usize>::new(3, ());
    ///         let all = Future::new();
    ///         workers.work(all);
    ///         let all = all.await;
    ///         assert_eq!(all.len(), 3);
    ///         assert!(all[2].starts_with("element 2 "));
    ///         charmrs::exit(0);
    ///     }).unwrap();
    /// }
    /// ```
    pub fn gather<T: Payload>(&self, data: T, target: impl Into<Target<Vec<T>>>) {
        let target: Target<Vec<T>> = target.into();
        let part = Part::new(
            vec![(self.parts.index, data)],
            Kind::gather::<T>(),
            Target::retype(target),
        );
        self.contribute_part("gather", part);
    }

    /// An empty reduction (a barrier): `target` is reached once every element called this.
    pub fn barrier(&self, target: impl Into<Target<()>>) {
        self.contribute_part(
            "barrier",
            Part::new((), Kind::builtin::<()>(Reducer::Sum), target),
        );
    }

    /// Contributes to a reduction whose result every contributor receives: returns this element's
    /// future of it (await it in a suspendable entry).
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
    ///     async fn run(this: Coro<Self>, done: Future<()>) {
    ///         let me: usize = this.ctx().index();
    ///         let largest = this.ctx().allreduce(me, Reducer::Max).await;
    ///         assert_eq!(largest, 3);              // every element gets the result
    ///         this.ctx().barrier(done);
    ///     }
    /// }
    ///
    /// fn main() {
    ///     charmrs::Runtime::new(2).run(|_| async {
    ///         let workers = Array::<Worker, usize>::new(4, ());
    ///         let done = Future::new();
    ///         workers.run(done);
    ///         done.await;
    ///         charmrs::exit(0);
    ///     }).unwrap();
    /// }
    /// ```
    pub fn allreduce<T: Reduce>(&self, data: T, reducer: Reducer) -> Future<T> {
        assert!(
            T::supports(reducer),
            "allreduce: reducer {reducer:?} does not apply to {}",
            std::any::type_name::<T>()
        );
        self.check_here("allreduce");
        let seq = self.counts.reductions.get();
        let fut = Future::<T>::new();
        let kind = Kind::builtin::<T>(reducer);
        with_pe("allreduce", |pe| {
            pe.reductions
                .borrow_mut()
                .add_allreduce_future(self.parts.coll, seq, fut.parts(), kind)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        self.contribute_part("allreduce", Part::everyone(data, kind));
        fut
    }

    /// Id of the collection this element belongs to.
    pub fn collection(&self) -> CollectionId {
        self.parts.coll
    }
}
