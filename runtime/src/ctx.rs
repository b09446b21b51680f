//! [`Ctx`]: what an element knows about itself — its index, its collection, its PE.
//!
//! Every entry method and constructor may take `ctx: &Ctx<Self>` (charm4py's `thisIndex`,
//! `thisProxy`, `charm.myPe()`). The same chare type can be a single chare, a group element or an
//! array element of any dimension, so index and proxy accessors check the kind at run time and
//! name the mismatch if the program asks for the wrong one.

use crate::chare::Chare;
use crate::collection::{CollectionId, Shape};
use crate::envelope::CtxParts;
use crate::index::{ArrayIndex, Index};
use crate::proxy::{Array, ElementProxy, Group, Proxy};
use std::marker::PhantomData;

/// The context of one element of chare type `C`.
pub struct Ctx<C> {
    parts: CtxParts,
    _chare: PhantomData<fn() -> C>,
}

impl<C: Chare> Ctx<C> {
    pub(crate) fn from_parts(parts: CtxParts) -> Ctx<C> {
        Ctx {
            parts,
            _chare: PhantomData,
        }
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

    /// Id of the collection this element belongs to.
    pub fn collection(&self) -> CollectionId {
        self.parts.coll
    }
}
