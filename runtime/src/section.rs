//! Sections: a subset of a collection's elements that can be called together and reduce
//! together (charm4py's section proxies, `charm.split`; Charm++'s `CProxySection`).
//!
//! # What this module owns
//!
//! * [`Section`], the proxy to a subset: calls through it go to every member
//!   ([`ProxyTarget`]), down a spanning tree over the members' PEs (the `multicast` module); it
//!   is a value (serializable), so members can receive it and reduce over it with
//!   [`Ctx::section`]. A section made by [`Section::combine`] (charm4py's `charm.combine`)
//!   spans several collections of one chare type: one tree per collection, one reduction over
//!   all of them.
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
//! * A section holds one or more parts, each a collection (distinct ones, in the order they were
//!   combined) with its members, sorted and distinct; an element contributing to a section it is
//!   not in panics naming both (its contribution could never complete a reduction).
//! * A gather over a section of one collection orders the values by index; over a combined
//!   section, by the member's position in the section (its part's place, then its index), so
//!   members of two collections with equal indices never tie.

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

/// A subset of the elements of a collection, or of several collections of one chare type: calls
/// through it reach every member, and members reduce over it with [`Ctx::section`].
///
/// Made with [`Proxy::section`] (any collection: the members' indices) or
/// [`Array::section`](crate::Array::section) / [`Group::section`](crate::Group::section), and
/// over several collections with [`Section::combine`].
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
    parts: Arc<[Members<C>]>,
}

/// One collection of a section and its members there (sorted, distinct, at least one).
struct Members<C> {
    collection: Proxy<C>,
    indices: Arc<[Index]>,
}

impl<C> Clone for Section<C> {
    fn clone(&self) -> Self {
        Section {
            id: self.id,
            parts: self.parts.clone(),
        }
    }
}

impl<C: Chare> std::fmt::Debug for Section<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.parts {
            [one] => write!(f, "Section({:?} of {:?}", self.id, one.collection.id())?,
            parts => {
                let ids: Vec<CollectionId> = parts.iter().map(|p| p.collection.id()).collect();
                write!(f, "Section({:?} of {ids:?}", self.id)?
            }
        }
        write!(f, ", {} members)", self.len())
    }
}

impl<C: Chare> Section<C> {
    /// A new section of `parts` (distinct collections, each with its members sorted and
    /// distinct, none empty), sealed on the PEs home to a member: its reductions count them there.
    fn seal(parts: Vec<Members<C>>) -> Result<Section<C>> {
        with_pe("Section", |pe| {
            let n = pe.num_pes();
            let mut counts = vec![0u32; n];
            for part in &parts {
                let shape = part.collection.shape();
                for index in part.indices.iter() {
                    shape.check_placed(index, n)?;
                    counts[shape.home_pe(index, n)] += 1;
                }
            }
            let id = pe.new_collection_id().as_section();
            // Only the PEs in the section's reduction tree need the counts: another PE that
            // gets a contribution from an away member does not know them, which makes it
            // subscribe for an allreduce's result, as a PE outside the tree does.
            let to: Vec<usize> = (0..n).filter(|&p| counts[p] > 0).collect();
            pe.seal_on(id, counts, &to);
            Ok(Section {
                id,
                parts: parts.into(),
            })
        })?
    }

    /// One section over the members of all of `sections` (charm4py's `charm.combine`): its
    /// collections are theirs, in the order they first appear; a collection in several of them
    /// has the union of their members. Calls through it reach each member once; its reductions
    /// (with [`Ctx::section`]) count every member once.
    ///
    /// It is a section of its own: the sections it was made of keep their reductions apart.
    /// Calls to each collection carry the priority of the first of `sections` in that collection
    /// (see [`with_priority`](Self::with_priority)); call `with_priority` on the result for one
    /// priority throughout.
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
    ///     fn add(&mut self, ctx: &Ctx<Self>, all: Section<Cell>, weight: u64, done: Future<u64>) {
    ///         ctx.section(&all).contribute(weight, Reducer::Sum, done);
    ///     }
    /// }
    ///
    /// fn main() {
    ///     charmrs::Runtime::new(2).run(|_| async {
    ///         let a = Array::<Cell, usize>::new(4, ());
    ///         let b = Array::<Cell, usize>::new(6, ());
    ///         let both = Section::combine([a.section([0, 1]), b.section([3, 4, 5])]);
    ///         let done = Future::new();
    ///         both.add(both.clone(), 10, done); // two multicasts, one per array
    ///         assert_eq!(done.await, 50);       // 5 members
    ///         charmrs::exit(0);
    ///     }).unwrap();
    /// }
    /// ```
    ///
    /// # Errors
    /// No section at all, or outside a running PE.
    pub fn try_combine(sections: impl IntoIterator<Item = Section<C>>) -> Result<Section<C>> {
        let mut merged: Vec<(Proxy<C>, Vec<Index>)> = Vec::new();
        for section in sections {
            for part in section.parts.iter() {
                let id = part.collection.id();
                match merged.iter_mut().find(|(c, _)| c.id() == id) {
                    Some((_, members)) => members.extend_from_slice(&part.indices),
                    None => merged.push((part.collection, part.indices.to_vec())),
                }
            }
        }
        if merged.is_empty() {
            return Err(Error::Options(
                "Section::combine: no section to combine".to_string(),
            ));
        }
        let parts = merged
            .into_iter()
            .map(|(collection, mut members)| {
                members.sort_unstable();
                members.dedup();
                Members {
                    collection,
                    indices: members.into(),
                }
            })
            .collect();
        Self::seal(parts)
    }

    /// [`try_combine`](Self::try_combine), panicking on an error.
    ///
    /// # Panics
    /// No section at all, or outside a running PE.
    pub fn combine(sections: impl IntoIterator<Item = Section<C>>) -> Section<C> {
        Self::try_combine(sections).unwrap_or_else(|e| panic!("{e}"))
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
        Section::seal(vec![Members {
            collection: *self,
            indices: members.into(),
        }])
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
    /// Its collections, each with its members' indices in increasing order: one for a section
    /// made by [`Proxy::section`], those combined for one made by [`combine`](Self::combine).
    pub fn parts(&self) -> impl ExactSizeIterator<Item = (&Proxy<C>, &[Index])> + '_ {
        self.parts.iter().map(|p| (&p.collection, &*p.indices))
    }

    /// How many members it has (in all its collections).
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.indices.len()).sum()
    }

    /// Always false: a section has at least one member.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the element at `index` of collection `collection` is a member.
    pub fn contains(&self, collection: CollectionId, index: &Index) -> bool {
        self.position(collection, index).is_some()
    }

    /// The member's place in the section: its part's members before it, then its rank in its
    /// part.
    fn position(&self, collection: CollectionId, index: &Index) -> Option<usize> {
        let mut before = 0;
        for part in self.parts.iter() {
            if part.collection.id() == collection {
                return part.indices.binary_search(index).ok().map(|k| before + k);
            }
            before += part.indices.len();
        }
        None
    }

    /// The same section, with calls through it carrying `priority` (lower runs first), to every
    /// collection of it.
    pub fn with_priority(self, priority: i32) -> Self {
        let parts = self
            .parts
            .iter()
            .map(|p| Members {
                collection: p.collection.with_priority(priority),
                indices: p.indices.clone(),
            })
            .collect();
        Section { id: self.id, parts }
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

    /// A point call for a single member; else, for each collection, one multicast down a
    /// spanning tree over the PEs of its members (see the `multicast` module): the caller sends
    /// at most a few messages per collection however many members there are, and every PE of a
    /// tree delivers to its own members.
    ///
    /// # Panics
    /// Outside a running PE, or for a section received from another job's layout (a member
    /// beyond this job's PEs).
    fn send_entry<E: Entry<C>>(&self, args: E::Args) {
        let n = crate::num_pes();
        for part in self.parts.iter() {
            let shape = part.collection.shape();
            for index in part.indices.iter() {
                if let Err(e) = shape.check(index, n) {
                    panic!("a call to {self:?}: {e}");
                }
            }
        }
        if let [part] = &*self.parts {
            if let [only] = &*part.indices {
                let (coll, shape) = (part.collection.id(), part.collection.shape());
                return ElementProxy::<C>::from_parts(coll, *only, shape.home_pe(only, n))
                    .with_priority(part.collection.priority())
                    .send_entry::<E>(args);
            }
        }
        let mut call = Some(Call::<C, E>::boxed(args, Reply::None));
        with_pe(E::NAME, |pe| {
            let last = self.parts.len() - 1;
            for (k, part) in self.parts.iter().enumerate() {
                let this = if k == last {
                    call.take().expect("moved once, for the last part")
                } else {
                    call.as_ref()
                        .expect("present until the last part")
                        .clone_box()
                };
                let shape = part.collection.shape();
                pe.multicast(
                    part.collection.id(),
                    &part.indices,
                    |i| shape.home_pe(i, n),
                    this,
                    part.collection.priority(),
                );
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A section travels as its id and its parts (collection proxy, members); the parts are checked
/// where it arrives.
impl<C> Serialize for Section<C> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (self.id, &*self.parts).serialize(s)
    }
}

/// A part travels as (collection proxy, members): what `Section`'s `Deserialize` reads.
impl<C> Serialize for Members<C> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (&self.collection, &*self.indices).serialize(s)
    }
}

impl<'de, C: Chare> Deserialize<'de> for Section<C> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (id, parts) = <(CollectionId, Vec<(Proxy<C>, Vec<Index>)>)>::deserialize(d)?;
        let names = || {
            let ids: Vec<CollectionId> = parts.iter().map(|(c, _)| c.id()).collect();
            format!("{ids:?}")
        };
        if crate::checkpoint::is_rehoming() {
            // Sections are not saved: this one's bookkeeping is gone with the job that made it.
            return Err(crate::wire::custom_error(format!(
                "a section of {} read back from a checkpoint: sections are not saved; make it \
                 again after charmrs::restore (keep none in a chare's state or the program's \
                 state across a checkpoint)",
                names()
            )));
        }
        let well_formed = id.is_section()
            && !parts.is_empty()
            && parts.iter().enumerate().all(|(k, (c, members))| {
                !members.is_empty()
                    && members.windows(2).all(|w| w[0] < w[1])
                    && parts[..k].iter().all(|(other, _)| other.id() != c.id())
            });
        if !well_formed {
            return Err(crate::wire::custom_error(format!(
                "a malformed section of {} ({} members)",
                names(),
                parts.iter().map(|(_, m)| m.len()).sum::<usize>()
            )));
        }
        for (collection, members) in &parts {
            if let Some(bad) = members
                .iter()
                .find(|i| collection.shape().check(i, usize::MAX).is_err())
            {
                return Err(crate::wire::custom_error(format!(
                    "a section of {:?} with member {bad} out of its range",
                    collection.id()
                )));
            }
        }
        let parts = parts
            .into_iter()
            .map(|(collection, members)| Members {
                collection,
                indices: members.into(),
            })
            .collect();
        Ok(Section { id, parts })
    }
}

impl<C: Chare> Ctx<C> {
    /// This element's reductions over `section` (charm4py's `contribute(..., section=s)`).
    ///
    /// # Panics
    /// If this element is not a member of `section`.
    pub fn section<'a>(&'a self, section: &'a Section<C>) -> SectionCtx<'a, C> {
        let index = self.raw_index();
        let (coll, shape) = (self.collection(), self.shape());
        let position = section.position(coll, &index).filter(|_| {
            section
                .parts
                .iter()
                .any(|p| p.collection.id() == coll && p.collection.shape() == shape)
        });
        let Some(position) = position else {
            panic!(
                "element {index} of {} {:?} is not a member of {section:?}",
                C::NAME,
                self.collection()
            )
        };
        SectionCtx {
            ctx: self,
            section,
            position,
        }
    }
}

/// An element's reductions over one of its sections (see [`Ctx::section`]): the same
/// operations as on [`Ctx`], over the section's members only. Every member must contribute to
/// each of the section's reductions, in the same order.
pub struct SectionCtx<'a, C> {
    ctx: &'a Ctx<C>,
    section: &'a Section<C>,
    /// The element's place in the section (see `Section::position`).
    position: usize,
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

    /// [`Ctx::gather`] over the section: the members' values, ordered by index (over a combined
    /// section: by collection, in the section's order, then by index).
    pub fn gather<T: Payload>(&self, data: T, target: impl Into<Target<Vec<T>>>) {
        let target: Target<Vec<T>> = target.into();
        // By index over one collection; by place in the section over several (indices of
        // different collections may be equal).
        let key = if self.section.parts.len() == 1 {
            self.ctx.raw_index()
        } else {
            Index::new(&[self.position]).unwrap_or_else(|e| panic!("gather: {e}"))
        };
        let part = Part::new(
            vec![(key, data)],
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
