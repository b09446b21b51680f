//! Sections: a subset of a collection's elements that can be called together and reduce
//! together (charm4py's section proxies, `charm.split`; Charm++'s `CProxySection`).
//!
//! # What this module owns
//!
//! * [`Section`], the proxy to a subset: calls through it go to every member
//!   ([`ProxyTarget`]), down a spanning tree over the members' PEs (the `multicast` module); it is a value (serializable), so members can receive it and reduce over
//!   it with [`Ctx::section`].
//! * [`SectionCtx`], an element's reduction operations over one of its sections.
//!
//! # Invariants
//!
//! * A section has its own job-wide id (a collection id with the section bit set), under which
//!   its reductions run in the ordinary reduction tree: its members counted at their home PEs.
//!   Those counts are computed once when the section is made and sealed on the PEs home to a
//!   member (as a sparse array's are by `done_inserting`); a reduction that reaches such a PE
//!   before them waits there. Other PEs never learn them, and treat the section as a collection
//!   they are not in the tree of (an allreduce contributor there subscribes for the result).
//! * Nothing of a section is freed: its counts and each member's counter stay for the job's
//!   life (sections are meant to be made once and reused).
//! * Each element numbers its contributions to each of its sections separately (the k-th
//!   contribution of every member is reduction k of the section); the numbers travel with the
//!   element when it migrates.
//! * Members are sorted and distinct; an element contributing to a section it is not in panics
//!   naming both (its contribution could never complete a reduction).

use crate::callback::CallbackDest;
use crate::chare::{Chare, Entry, Payload};
use crate::collection::CollectionId;
use crate::ctx::Ctx;
use crate::envelope::{Call, Reply};
use crate::error::{Error, Result};
use crate::future::Future;
use crate::index::{ArrayIndex, Index};
use crate::proxy::{ElementProxy, Proxy, ProxyTarget};
use crate::reduction::{CustomReducer, Kind, Part, Reduce, Reducer, Target};
use crate::scheduler::with_pe;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::sync::Arc;

/// A subset of the elements of a collection: calls through it reach every member, and members
/// reduce over it with [`Ctx::section`].
///
/// Made with [`Proxy::section`] (any collection: the members' indices) or
/// [`Array::section`](crate::Array::section) / [`Group::section`](crate::Group::section).
///
/// ```
/// use charmrs::prelude::*;
///
/// struct Cell;
///
/// #[chare]
/// impl Cell {
///     fn new() -> Self { Cell }
///
///     #[entry]
///     fn step(&mut self, ctx: &Ctx<Self>, evens: Section<Cell>, done: Future<f64>) {
///         let me: usize = ctx.index();
///         ctx.section(&evens).contribute(me as f64, Reducer::Sum, done);
///     }
/// }
///
/// fn main() {
///     charmrs::Runtime::new(2).run(|_| async {
///         let cells = Array::<Cell, usize>::new(10, ());
///         let evens = cells.section((0..10).step_by(2));
///         let done = Future::new();
///         evens.step(evens.clone(), done);      // a call to the 5 members only
///         assert_eq!(done.await, 20.0);         // 0 + 2 + 4 + 6 + 8
///         charmrs::exit(0);
///     }).unwrap();
/// }
/// ```
pub struct Section<C> {
    id: CollectionId,
    parent: Proxy<C>,
    members: Arc<[Index]>,
}

impl<C> Clone for Section<C> {
    fn clone(&self) -> Self {
        Section {
            id: self.id,
            parent: self.parent,
            members: self.members.clone(),
        }
    }
}

impl<C: Chare> std::fmt::Debug for Section<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Section({:?} of {:?}, {} members)",
            self.id,
            self.parent.id(),
            self.members.len()
        )
    }
}

impl<C: Chare> Proxy<C> {
    /// The section of this collection made of the elements at `members` (duplicates count once).
    /// Elements reduce over it with [`Ctx::section`]; calls through it reach every member.
    ///
    /// # Errors
    /// An index out of the collection's range, or no member at all.
    pub fn try_section(&self, members: impl IntoIterator<Item = Index>) -> Result<Section<C>> {
        let mut members: Vec<Index> = members.into_iter().collect();
        members.sort_unstable();
        members.dedup();
        if members.is_empty() {
            return Err(Error::Options(format!(
                "a section of {} {:?} without members",
                self.shape().describe(),
                self.id()
            )));
        }
        let shape = self.shape();
        with_pe("Proxy::section", |pe| {
            let n = pe.num_pes();
            let mut counts = vec![0u32; n];
            for index in &members {
                shape.check_placed(index, n)?;
                counts[shape.home_pe(index, n)] += 1;
            }
            let id = pe.new_collection_id().as_section();
            // Only the PEs in the section's reduction tree need the counts: another PE that
            // gets a contribution from an away member does not know them, which makes it
            // subscribe for an allreduce's result, as a PE outside the tree does.
            let to: Vec<usize> = (0..n).filter(|&p| counts[p] > 0).collect();
            pe.seal_on(id, counts, &to);
            Ok(Section {
                id,
                parent: *self,
                members: members.into(),
            })
        })?
    }

    /// [`try_section`](Self::try_section), panicking on an error.
    ///
    /// # Panics
    /// An index out of range, no member, or outside a running PE.
    pub fn section(&self, members: impl IntoIterator<Item = Index>) -> Section<C> {
        self.try_section(members).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl<C: Chare, I: ArrayIndex> crate::Array<C, I> {
    /// The section made of the elements at `members` (charm4py's `charm.split` or a slice of
    /// an array proxy).
    ///
    /// # Panics
    /// An index out of range, no member, or outside a running PE.
    pub fn section(&self, members: impl IntoIterator<Item = I>) -> Section<C> {
        let members: Vec<Index> = members
            .into_iter()
            .map(|i| {
                i.to_index()
                    .unwrap_or_else(|e| panic!("Array::section: {e}"))
            })
            .collect();
        (**self).section(members)
    }
}

impl<C: Chare> crate::Group<C> {
    /// The section made of the group's elements on PEs `pes`.
    ///
    /// # Panics
    /// A PE that does not exist, no member, or outside a running PE.
    pub fn section(&self, pes: impl IntoIterator<Item = usize>) -> Section<C> {
        let members: Vec<Index> = pes
            .into_iter()
            .map(|p| {
                u32::try_from(p)
                    .ok()
                    .and_then(|p| Index::new(&[p as usize]).ok())
                    .unwrap_or_else(|| panic!("Group::section: PE {p} does not exist"))
            })
            .collect();
        (**self).section(members)
    }
}

impl<C: Chare> Section<C> {
    /// The members' indices, in increasing order.
    pub fn members(&self) -> &[Index] {
        &self.members
    }

    /// Whether the element at `index` is a member.
    pub fn contains(&self, index: &Index) -> bool {
        self.members.binary_search(index).is_ok()
    }

    /// The collection the section is part of.
    pub fn collection(&self) -> &Proxy<C> {
        &self.parent
    }

    /// The same section, with calls through it carrying `priority` (lower runs first).
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.parent = self.parent.with_priority(priority);
        self
    }
}

impl<C: Chare> ProxyTarget<C> for Section<C> {
    type Reply<R: Payload> = ();

    /// Not available: a callback names one element or a whole collection.
    ///
    /// # Panics
    /// Always.
    fn callback_dest(&self) -> CallbackDest {
        panic!(
            "a callback cannot go to a section ({self:?}): pass the section in a call and have \
             the members reduce over it, or call back one element or the whole collection"
        )
    }

    /// A point call for a single member; else one multicast down a spanning tree over the PEs
    /// of the members (see the `multicast` module): the caller sends at most a few messages
    /// however many members there are, and every PE of the tree delivers to its own members.
    ///
    /// # Panics
    /// Outside a running PE, or for a section received from another job's layout (a member
    /// beyond this job's PEs).
    fn send_entry<E: Entry<C>>(&self, args: E::Args) {
        let shape = self.parent.shape();
        let n = crate::num_pes();
        for index in self.members.iter() {
            if let Err(e) = shape.check(index, n) {
                panic!("a call to {self:?}: {e}");
            }
        }
        if let [only] = &*self.members {
            return ElementProxy::<C>::from_parts(self.parent.id(), *only, shape.home_pe(only, n))
                .with_priority(self.parent.priority())
                .send_entry::<E>(args);
        }
        let call = Call::<C, E>::boxed(args, Reply::None);
        with_pe(E::NAME, |pe| {
            pe.multicast(
                self.parent.id(),
                &self.members,
                |i| shape.home_pe(i, n),
                call,
                self.parent.priority(),
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A section travels as (id, parent proxy, members); the members are checked where it arrives.
impl<C> Serialize for Section<C> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (self.id, &self.parent, &*self.members).serialize(s)
    }
}

impl<'de, C: Chare> Deserialize<'de> for Section<C> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (id, parent, members) = <(CollectionId, Proxy<C>, Vec<Index>)>::deserialize(d)?;
        if crate::checkpoint::is_rehoming() {
            // Sections are not saved: this one's bookkeeping is gone with the job that made it.
            return Err(crate::wire::custom_error(format!(
                "a section of {:?} read back from a checkpoint: sections are not saved; make it \
                 again after charmrs::restore (keep none in a chare's state or the program's \
                 state across a checkpoint)",
                parent.id()
            )));
        }
        let sorted = members.windows(2).all(|w| w[0] < w[1]);
        if !id.is_section() || members.is_empty() || !sorted {
            return Err(crate::wire::custom_error(format!(
                "a malformed section of {:?} ({} members)",
                parent.id(),
                members.len()
            )));
        }
        if let Some(bad) = members
            .iter()
            .find(|i| parent.shape().check(i, usize::MAX).is_err())
        {
            return Err(crate::wire::custom_error(format!(
                "a section of {:?} with member {bad} out of its range",
                parent.id()
            )));
        }
        Ok(Section {
            id,
            parent,
            members: members.into(),
        })
    }
}

impl<C: Chare> Ctx<C> {
    /// This element's reductions over `section` (charm4py's `contribute(..., section=s)`).
    ///
    /// # Panics
    /// If this element is not a member of `section`, or the section is of another collection.
    pub fn section<'a>(&'a self, section: &'a Section<C>) -> SectionCtx<'a, C> {
        let index = self.raw_index();
        assert!(
            section.parent.id() == self.collection()
                && section.parent.shape() == self.shape()
                && section.contains(&index),
            "element {index} of {} {:?} is not a member of {section:?}",
            C::NAME,
            self.collection()
        );
        SectionCtx { ctx: self, section }
    }
}

/// An element's reductions over one of its sections (see [`Ctx::section`]): the same
/// operations as on [`Ctx`], over the section's members only. Every member must contribute to
/// each of the section's reductions, in the same order.
pub struct SectionCtx<'a, C> {
    ctx: &'a Ctx<C>,
    section: &'a Section<C>,
}

impl<C: Chare> SectionCtx<'_, C> {
    fn contribute_part(&self, what: &'static str, part: Part) {
        let seq = self.ctx.next_section_seq(self.section.id);
        let shape = self.ctx.shape();
        with_pe(what, |pe| {
            pe.contribute(self.section.id, seq, shape, &self.ctx.raw_index(), part)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Ctx::contribute`] over the section.
    ///
    /// # Panics
    /// If `reducer` does not apply to `T`.
    pub fn contribute<T: Reduce>(&self, data: T, reducer: Reducer, target: impl Into<Target<T>>) {
        assert!(
            T::supports(reducer),
            "contribute: reducer {reducer:?} does not apply to {}",
            std::any::type_name::<T>()
        );
        let part = Part::new(data, Kind::builtin::<T>(reducer), target);
        self.contribute_part("contribute", part);
    }

    /// [`Ctx::contribute_with`] over the section.
    pub fn contribute_with<T: Payload>(
        &self,
        data: T,
        reducer: &CustomReducer<T>,
        target: impl Into<Target<T>>,
    ) {
        let part = Part::new(data, Kind::custom(reducer), target);
        self.contribute_part("contribute_with", part);
    }

    /// [`Ctx::gather`] over the section: the members' values, ordered by index.
    pub fn gather<T: Payload>(&self, data: T, target: impl Into<Target<Vec<T>>>) {
        let target: Target<Vec<T>> = target.into();
        let part = Part::new(
            vec![(self.ctx.raw_index(), data)],
            Kind::gather::<T>(),
            Target::retype(target),
        );
        self.contribute_part("gather", part);
    }

    /// [`Ctx::barrier`] over the section.
    pub fn barrier(&self, target: impl Into<Target<()>>) {
        let part = Part::new((), Kind::builtin::<()>(Reducer::Sum), target);
        self.contribute_part("barrier", part);
    }

    /// [`Ctx::allreduce`] over the section: every member gets the result.
    ///
    /// # Panics
    /// If `reducer` does not apply to `T`.
    pub fn allreduce<T: Reduce>(&self, data: T, reducer: Reducer) -> Future<T> {
        assert!(
            T::supports(reducer),
            "allreduce: reducer {reducer:?} does not apply to {}",
            std::any::type_name::<T>()
        );
        let seq = self.ctx.peek_section_seq(self.section.id);
        let fut = Future::<T>::new();
        let kind = Kind::builtin::<T>(reducer);
        with_pe("allreduce", |pe| {
            pe.reductions
                .borrow_mut()
                .add_allreduce_future(self.section.id, seq, fut.parts(), kind)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        self.contribute_part("allreduce", Part::everyone(data, kind));
        fut
    }
}
