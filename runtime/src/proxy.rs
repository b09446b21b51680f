//! Proxies: handles through which entry methods are invoked, and the creation of collections.
//!
//! - [`ElementProxy`] names one element (of any collection): calls are point-to-point.
//! - [`Proxy`] names a whole collection: calls broadcast to every element; [`Proxy::at`] reaches one.
//! - [`Group`], [`Array`] and [`Single`] are the typed faces of the same thing, with the creation
//!   functions (charm4py's `Group(C)`, `Array(C, dims)`, `Chare(C, onPE=…)`).
//!
//! All proxies are small `Copy` values that can be sent inside messages. The methods a proxy offers
//! come from the `<Type>Proxy` trait that `#[chare]` generates, implemented for every
//! [`ProxyTarget`]. Invariant: a proxy only ever holds a valid PE and an in-range index (checked when
//! it is made), so sending never fails later for a bad address.

use crate::array_map::ArrayMap;
use crate::callback::CallbackDest;
use crate::chare::{Chare, Entry, Payload};
use crate::collection::{CollectionId, Shape};
use crate::envelope::{Body, Call, Construct, Control, Envelope, Reply};
use crate::error::{Error, Result};
use crate::future::Future;
use crate::index::{ArrayIndex, Index};
use crate::scheduler::with_pe;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use std::ops::Deref;

/// Something entry methods of `C` can be invoked on: an element or a whole collection, possibly
/// asking for the result ([`ElementProxy::ret`], [`Proxy::ret`], [`Proxy::gather`]).
pub trait ProxyTarget<C: Chare> {
    /// What a call returns to the caller: `()` for a plain call, a [`Future`] when a result was
    /// asked for.
    type Reply<R: Payload>;

    /// Sends a call of entry `E` with `args` (moved, never serialized within a process).
    ///
    /// # Panics
    /// When called on a thread that is not a running PE (see [`Error::NotInRuntime`]).
    fn send_entry<E: Entry<C>>(&self, args: E::Args) -> Self::Reply<E::Output>;

    /// Where a [`Callback`](crate::Callback) made from this proxy sends its calls.
    #[doc(hidden)]
    fn callback_dest(&self) -> CallbackDest;
}

fn or_panic<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A proxy to one element of a collection (or to a single chare).
#[derive(Serialize)]
#[serde(bound = "")]
pub struct ElementProxy<C> {
    coll: CollectionId,
    index: Index,
    pe: u32,
    priority: i32,
    #[serde(skip)]
    _chare: PhantomData<fn() -> C>,
}

/// [`ElementProxy`]'s fields as they travel.
#[derive(Deserialize)]
#[serde(rename = "ElementProxy")]
struct ElementProxyFields {
    coll: CollectionId,
    index: Index,
    pe: u32,
    priority: i32,
}

impl<'de, C> Deserialize<'de> for ElementProxy<C> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let f = ElementProxyFields::deserialize(d)?;
        // Read back from a checkpoint, the element's home is where the new job places it; a
        // proxy to a collection the restart did not bring back (a group saved by a job of
        // another PE count) keeps its old PE if this job has it.
        let pe = if crate::checkpoint::is_rehoming() {
            crate::checkpoint::rehomed_proxy(f.coll, &f.index, f.pe)
        } else {
            crate::collection::known_pe(f.pe, || format!("a proxy to element {}", f.index))
                .map_err(crate::wire::custom_error)?;
            f.pe
        };
        Ok(ElementProxy {
            coll: f.coll,
            index: f.index,
            pe,
            priority: f.priority,
            _chare: PhantomData,
        })
    }
}

impl<C> Clone for ElementProxy<C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C> Copy for ElementProxy<C> {}

impl<C> std::fmt::Debug for ElementProxy<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ElementProxy({:?}{} on PE {})",
            self.coll, self.index, self.pe
        )
    }
}

impl<C: Chare> ElementProxy<C> {
    pub(crate) fn from_parts(coll: CollectionId, index: Index, pe: usize) -> Self {
        ElementProxy {
            coll,
            index,
            pe: pe as u32,
            priority: 0,
            _chare: PhantomData,
        }
    }

    /// The element's collection.
    pub(crate) fn collection(&self) -> CollectionId {
        self.coll
    }

    /// The element's index.
    pub fn index(&self) -> Index {
        self.index
    }

    /// The PE the element lives on.
    pub fn pe(&self) -> usize {
        self.pe as usize
    }

    /// The same proxy, but messages sent through it carry `priority` (lower runs first; 0 is the
    /// default, as in Charm++).
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
}

impl<C: Chare> ElementProxy<C> {
    fn point<E: Entry<C>>(&self, args: E::Args, reply: Reply) {
        or_panic(with_pe(E::NAME, |pe| {
            let dst = pe.point_dest(self.coll, &self.index, self.pe as usize);
            if pe.is_remote(dst) {
                // Another process: encoded straight from the arguments, never boxed.
                return Call::<C, E>::unboxed(args, reply, |call| {
                    pe.send_point_remote(dst, self.coll, self.index, call, self.priority)
                });
            }
            let call = Call::<C, E>::boxed(args, reply);
            let body = Body::Point {
                coll: self.coll,
                index: self.index,
                call,
            };
            pe.send_located(dst, Envelope::new(self.priority, body));
        }))
    }

    /// This proxy, asking for results: each call returns a [`Future`] of the entry's return value
    /// (charm4py's `ret=True`). If the entry panics, the future holds the error instead.
    pub fn ret(&self) -> Ret<ElementProxy<C>> {
        Ret(*self)
    }
}

impl<C: Chare> ProxyTarget<C> for ElementProxy<C> {
    type Reply<R: Payload> = ();

    fn callback_dest(&self) -> CallbackDest {
        CallbackDest::Point {
            coll: self.coll,
            index: self.index,
            pe: self.pe,
            priority: self.priority,
        }
    }

    #[inline]
    fn send_entry<E: Entry<C>>(&self, args: E::Args) {
        self.point::<E>(args, Reply::None)
    }
}

/// A proxy that asks for the results of the calls made through it (see [`ElementProxy::ret`],
/// [`Proxy::ret`]).
#[derive(Clone, Copy, Debug)]
pub struct Ret<P>(P);

/// A collection proxy whose calls gather every element's return value, ordered by index
/// (see [`Proxy::gather`]).
#[derive(Clone, Copy, Debug)]
pub struct Gather<P>(P);

impl<C: Chare> ProxyTarget<C> for Ret<ElementProxy<C>> {
    type Reply<R: Payload> = Future<R>;

    fn callback_dest(&self) -> CallbackDest {
        self.0.callback_dest()
    }

    fn send_entry<E: Entry<C>>(&self, args: E::Args) -> Future<E::Output> {
        let id = or_panic(with_pe(E::NAME, |pe| pe.futures.borrow_mut().create()));
        self.0
            .point::<E>(args, Reply::Future { pe: id.0, id: id.1 });
        Future::from_id(id)
    }
}

impl<C: Chare> ProxyTarget<C> for Ret<Proxy<C>> {
    type Reply<R: Payload> = Future<()>;

    fn callback_dest(&self) -> CallbackDest {
        self.0.callback_dest()
    }

    fn send_entry<E: Entry<C>>(&self, args: E::Args) -> Future<()> {
        Future::from_id(self.0.broadcast::<E>(args, false))
    }
}

impl<C: Chare> ProxyTarget<C> for Gather<Proxy<C>> {
    type Reply<R: Payload> = Future<Vec<R>>;

    fn callback_dest(&self) -> CallbackDest {
        self.0.callback_dest()
    }

    fn send_entry<E: Entry<C>>(&self, args: E::Args) -> Future<Vec<E::Output>> {
        Future::from_id(self.0.broadcast::<E>(args, true))
    }
}

/// A proxy to a whole collection: calls broadcast to every element.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Proxy<C> {
    coll: CollectionId,
    shape: Shape,
    priority: i32,
    #[serde(skip)]
    _chare: PhantomData<fn() -> C>,
}

impl<C> Clone for Proxy<C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C> Copy for Proxy<C> {}

impl<C> std::fmt::Debug for Proxy<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({:?}, {})", self.coll, self.shape.describe())
    }
}

impl<C: Chare> Proxy<C> {
    pub(crate) fn from_parts(coll: CollectionId, shape: Shape) -> Self {
        Proxy {
            coll,
            shape,
            priority: 0,
            _chare: PhantomData,
        }
    }

    /// The collection's shape (single chare, group, or array with its dimensions).
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The priority calls through this proxy carry.
    pub(crate) fn priority(&self) -> i32 {
        self.priority
    }

    /// The collection's id.
    pub fn id(&self) -> CollectionId {
        self.coll
    }

    /// The same proxy with messages carrying `priority` (lower runs first).
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// A proxy to the element at `index`.
    ///
    /// # Errors
    /// An index of the wrong dimension or out of range, or a PE that does not exist (groups).
    pub fn try_at(&self, index: impl ArrayIndex) -> Result<ElementProxy<C>> {
        // `to_index` checks coordinates as it checks extents; here they are an element's.
        let index = index.to_index().map_err(|e| match e {
            Error::DimensionTooLarge { extent, max } => Error::CoordinateTooLarge {
                coordinate: extent,
                max,
            },
            other => other,
        })?;
        with_pe("Proxy::at", |pe| {
            self.shape.check_placed(&index, pe.num_pes())?;
            let home = self.shape.home_pe(&index, pe.num_pes());
            Ok(ElementProxy::from_parts(self.coll, index, home).with_priority(self.priority))
        })?
    }

    /// A proxy to the element at `index` (charm4py's `proxy[index]`).
    ///
    /// # Panics
    /// On a bad index; the message names it and the valid range. See [`try_at`](Self::try_at).
    pub fn at(&self, index: impl ArrayIndex) -> ElementProxy<C> {
        or_panic(self.try_at(index))
    }
}

impl<C: Chare> Proxy<C> {
    /// The PEs a broadcast goes to.
    fn targets(&self, num_pes: usize) -> std::ops::Range<usize> {
        match self.shape {
            Shape::Single { pe: home } => home as usize..home as usize + 1,
            _ => 0..num_pes,
        }
    }

    /// Broadcasts `E` asking for its results; returns the gather future's id.
    fn broadcast<E: Entry<C>>(&self, args: E::Args, values: bool) -> (u32, u64) {
        or_panic(with_pe(E::NAME, |pe| {
            let targets = self.targets(pe.num_pes());
            let id = pe
                .futures
                .borrow_mut()
                .create_gather::<E::Output>(targets.len(), values);
            self.fan_out::<E>(
                pe,
                targets,
                args,
                Reply::Gather {
                    pe: id.0,
                    id: id.1,
                    values,
                },
            );
            id
        }))
    }

    fn fan_out<E: Entry<C>>(
        &self,
        pe: &crate::scheduler::PeState,
        targets: std::ops::Range<usize>,
        args: E::Args,
        reply: Reply,
    ) {
        let call = Call::<C, E>::boxed(args, reply);
        if targets.len() == pe.num_pes() {
            pe.broadcast(self.coll, call, self.priority);
        } else {
            // A single chare's "collection": one PE.
            let body = Body::Broadcast {
                coll: self.coll,
                call,
            };
            pe.send(targets.start, Envelope::new(self.priority, body));
        }
    }

    /// This proxy, asking for completion: each broadcast through it returns a `Future<()>` that is
    /// ready once every element has run the entry (charm4py's `ret=True` on a broadcast).
    pub fn ret(&self) -> Ret<Proxy<C>> {
        Ret(*self)
    }

    /// This proxy, asking for values: each broadcast returns a `Future<Vec<R>>` of every element's
    /// return value, ordered by element index.
    pub fn gather(&self) -> Gather<Proxy<C>> {
        Gather(*self)
    }
}

impl<C: Chare> ProxyTarget<C> for Proxy<C> {
    type Reply<R: Payload> = ();

    fn callback_dest(&self) -> CallbackDest {
        CallbackDest::Broadcast {
            coll: self.coll,
            shape: self.shape,
            priority: self.priority,
        }
    }

    fn send_entry<E: Entry<C>>(&self, args: E::Args) {
        or_panic(with_pe(E::NAME, |pe| {
            self.fan_out::<E>(pe, self.targets(pe.num_pes()), args, Reply::None);
        }))
    }
}

/// Creates a collection of `C` with `shape`: posts its construction to `targets`.
fn create<C: Chare>(
    what: &'static str,
    shape: impl FnOnce(&crate::scheduler::PeState) -> Result<Shape>,
    build: Box<dyn crate::envelope::Construction>,
) -> Result<Proxy<C>> {
    with_pe(what, |pe| {
        let shape = shape(pe)?;
        let coll = pe.new_collection_id();
        match shape {
            Shape::Single { pe: home } => {
                pe.send(
                    home as usize,
                    Envelope::new(0, Control::Create { coll, shape, build }),
                );
            }
            Shape::Group | Shape::Array { .. } | Shape::Sparse { .. } => {
                // Every PE learns of the collection, even one without elements, so that a
                // broadcast finds it everywhere.
                for dst in 0..pe.num_pes() {
                    let build = build.clone_box();
                    pe.send(
                        dst,
                        Envelope::new(0, Control::Create { coll, shape, build }),
                    );
                }
            }
        }
        Ok(Proxy::from_parts(coll, shape))
    })?
}

/// A group: one element of `C` on every PE (charm4py's `Group(C)`).
///
/// ```no_run
/// # use charmrs::prelude::*;
/// # #[derive(Clone)] struct Hello;
/// # #[chare] impl Hello { fn new() -> Self { Hello } #[entry] fn hi(&mut self) {} }
/// # fn main() { charmrs::start(|_args| async move {
/// let group = Group::<Hello>::new(());
/// group.hi();          // broadcast to every PE
/// group.at(0).hi();    // the element on PE 0
/// # }); }
/// ```
pub struct Group<C>(Proxy<C>);

impl<C: Chare> Group<C> {
    /// Creates the group; every element is built with a clone of `init`.
    ///
    /// # Panics
    /// Outside a running PE.
    pub fn new(init: C::Init) -> Self {
        or_panic(Self::try_new(init))
    }

    /// Like [`new`](Self::new), reporting errors instead of panicking.
    pub fn try_new(init: C::Init) -> Result<Self> {
        create::<C>(
            "Group::new",
            |_| Ok(Shape::Group),
            Construct::<C>::boxed(init),
        )
        .map(Group)
    }

    pub(crate) fn from_proxy(p: Proxy<C>) -> Self {
        Group(p)
    }

    /// The element on PE `pe`.
    ///
    /// # Errors
    /// `pe` ≥ number of PEs.
    pub fn try_at(&self, pe: usize) -> Result<ElementProxy<C>> {
        if u32::try_from(pe).is_err() {
            // Beyond what an index holds: no job has that PE.
            let num_pes = with_pe("Group::at", |p| p.num_pes())?;
            return Err(Error::PeOutOfRange { pe, num_pes });
        }
        self.0.try_at(pe)
    }

    /// The element on PE `pe`.
    ///
    /// # Panics
    /// If `pe` does not exist; the message names it and the valid range.
    pub fn at(&self, pe: usize) -> ElementProxy<C> {
        or_panic(self.try_at(pe))
    }
}

/// A dense array of `C` indexed by `I` (`usize` or tuples up to 6-d), block-placed in row-major
/// order (charm4py's `Array(C, dims)`).
pub struct Array<C, I> {
    proxy: Proxy<C>,
    _index: PhantomData<fn() -> I>,
}

impl<C: Chare, I: ArrayIndex> Array<C, I> {
    /// Creates an array of extents `dims`; every element is built with a clone of `init`.
    ///
    /// # Panics
    /// Outside a running PE, or if an extent is too large.
    pub fn new(dims: I, init: C::Init) -> Self {
        or_panic(Self::try_new(dims, init))
    }

    /// Like [`new`](Self::new), reporting errors instead of panicking.
    pub fn try_new(dims: I, init: C::Init) -> Result<Self> {
        Self::create_dense("Array::new", dims, None, init)
    }

    /// A dense array of extents `dims`, placed by `map` or in blocks.
    fn create_dense(
        what: &'static str,
        dims: I,
        map: Option<crate::MapId>,
        init: C::Init,
    ) -> Result<Self> {
        let dims = dims.to_index()?;
        if dims.dims() == 0 {
            return Err(Error::Options(
                "an array needs at least one dimension".into(),
            ));
        }
        Shape::Array { dims, map }
            .check_size()
            .map_err(Error::Options)?;
        let proxy = create::<C>(
            what,
            |_| Ok(Shape::Array { dims, map }),
            Construct::<C>::boxed(init),
        )?;
        Ok(Array {
            proxy,
            _index: PhantomData,
        })
    }

    /// Creates an array of extents `dims` whose elements are placed by `map` (Charm++'s
    /// `CkArrayMap`) instead of in blocks.
    ///
    /// # Panics
    /// Outside a running PE, if an extent is too large, or (when the collection is created) if
    /// the map places an element on a PE that does not exist — the abort names the map.
    pub fn new_mapped(dims: I, map: &ArrayMap, init: C::Init) -> Self {
        or_panic(Self::try_new_mapped(dims, map, init))
    }

    /// Like [`new_mapped`](Self::new_mapped), reporting errors instead of panicking.
    pub fn try_new_mapped(dims: I, map: &ArrayMap, init: C::Init) -> Result<Self> {
        Self::create_dense("Array::new_mapped", dims, Some(map.id()), init)
    }

    /// Creates an empty sparse array (charm4py's `Array(C, ndims=n)`): elements are added with
    /// [`insert`](Self::insert) from any PE, then [`done_inserting`](Self::done_inserting) is
    /// awaited once before reductions and broadcasts. Homes come from `map`, or from a hash of
    /// the index. `I` fixes the number of dimensions (use
    /// [`new_sparse_dims`](Self::new_sparse_dims) with [`Index`]).
    ///
    /// ```no_run
    /// use charmrs::prelude::*;
    /// # #[derive(Clone)] struct Leaf;
    /// # #[chare] impl Leaf { fn new() -> Self { Leaf } #[entry] fn hi(&mut self) {} }
    /// # fn main() { charmrs::start(|_| async move {
    /// let tree = Array::<Leaf, (usize, usize, usize)>::new_sparse(None);
    /// tree.insert((1, 20, 300), (), None);      // at its home PE
    /// tree.insert((7, 0, 2), (), Some(1));      // on PE 1
    /// tree.done_inserting().await;
    /// tree.hi();                                // reaches both
    /// # }); }
    /// ```
    ///
    /// # Panics
    /// Outside a running PE, or if `I` has no fixed number of dimensions.
    pub fn new_sparse(map: Option<&ArrayMap>) -> Self {
        let dims = I::fixed_dims().unwrap_or_else(|| {
            panic!("Array::new_sparse: the index type does not fix the number of dimensions; use new_sparse_dims")
        });
        or_panic(Self::new_sparse_dims(dims, map))
    }

    /// A sparse array of `ndims` dimensions (1 to 6, or [`KEY_DIMS`](crate::KEY_DIMS) for user keys).
    ///
    /// # Errors
    /// `ndims` out of range or not the dimension count of `I`, or outside a running PE.
    pub fn new_sparse_dims(ndims: usize, map: Option<&ArrayMap>) -> Result<Self> {
        if !(1..=crate::index::KEY_DIMS).contains(&ndims)
            || I::fixed_dims().is_some_and(|d| d != ndims)
        {
            return Err(Error::Options(format!(
                "a sparse array indexed by {} cannot have {ndims} dimensions",
                std::any::type_name::<I>()
            )));
        }
        let map = map.map(ArrayMap::id);
        let shape = Shape::Sparse {
            dims: ndims as u8,
            map,
        };
        let proxy = create::<C>("Array::new_sparse", |_| Ok(shape), Construct::<C>::empty())?;
        Ok(Array {
            proxy,
            _index: PhantomData,
        })
    }

    /// Types a collection proxy as an array indexed by `I`.
    ///
    /// # Errors
    /// The collection is not an array, or has a different number of dimensions than `I`.
    pub fn from_proxy(proxy: Proxy<C>) -> Result<Self> {
        let ndims = match proxy.shape {
            Shape::Array { dims, .. } => Some(dims.dims()),
            Shape::Sparse { dims, .. } => Some(dims as usize),
            _ => None,
        };
        match proxy.shape {
            _ if ndims.is_some_and(|n| I::fixed_dims().is_none_or(|d| d == n)) => Ok(Array {
                proxy,
                _index: PhantomData,
            }),
            other => Err(Error::Options(format!(
                "a {} cannot be used as an array indexed by {}",
                other.describe(),
                std::any::type_name::<I>()
            ))),
        }
    }

    /// The extents of the array.
    ///
    /// # Panics
    /// For a sparse array, which has no extents.
    pub fn dims(&self) -> I {
        match self.proxy.shape {
            Shape::Array { dims, .. } => I::from_index(&dims).expect("checked at construction"),
            _ => panic!("Array::dims: a sparse array has no extents"),
        }
    }

    /// Adds element `index` to a sparse array, built with `init` on PE `on_pe` or, if `None`, on
    /// its home (the map's choice, or a hash of the index). Any PE may insert, in any order;
    /// messages sent to the element before it exists wait at its home.
    ///
    /// # Panics
    /// See [`try_insert`](Self::try_insert).
    pub fn insert(&self, index: I, init: C::Init, on_pe: Option<usize>) {
        or_panic(self.try_insert(index, init, on_pe))
    }

    /// Like [`insert`](Self::insert), reporting errors instead of panicking.
    ///
    /// # Errors
    /// A dense array, an index of the wrong dimension, an unknown PE, a map that places the
    /// element on a PE that does not exist, an insertion after
    /// [`done_inserting`](Self::done_inserting), or outside a running PE.
    pub fn try_insert(&self, index: I, init: C::Init, on_pe: Option<usize>) -> Result<()> {
        let Shape::Sparse { .. } = self.proxy.shape else {
            return Err(Error::Options(format!(
                "insert: a {} is dense; only sparse arrays (Array::new_sparse) take insertions",
                self.proxy.shape.describe()
            )));
        };
        let index = index.to_index()?;
        with_pe("Array::insert", |pe| {
            let n = pe.num_pes();
            self.proxy.shape.check_placed(&index, n)?;
            let target = match on_pe {
                Some(p) => {
                    pe.check_pe(p)?;
                    p
                }
                None => self.proxy.shape.home_pe(&index, n),
            };
            pe.count_insert(self.proxy.coll)?;
            pe.send(
                target,
                Envelope::new(
                    0,
                    Control::Insert {
                        coll: self.proxy.coll,
                        shape: self.proxy.shape,
                        index,
                        build: Construct::<C>::boxed(init),
                    },
                ),
            );
            Ok(())
        })?
    }

    /// Waits until every insertion issued so far (from any PE) is in place, and seals the sparse
    /// array: reductions over it can complete and broadcasts reach every element from then on
    /// (charm4py's `ckDoneInserting`). Call it once, after the last insertion.
    ///
    /// # Panics
    /// Outside a running PE, or on a dense array.
    pub async fn done_inserting(&self) {
        assert!(
            matches!(self.proxy.shape, Shape::Sparse { .. }),
            "done_inserting: a {} is not a sparse array",
            self.proxy.shape.describe()
        );
        let coll = self.proxy.coll;
        // Sealed already (here: a seal is final, later insertions are refused), by an earlier
        // `done_inserting` or by `charmrs::restore`.
        if or_panic(with_pe("done_inserting", |pe| {
            pe.home_counts.borrow().contains_key(&coll)
        })) {
            return;
        }
        // Broadcasts and reductions that reach a PE before the seal wait there, already counted
        // as processed: quiescence must not be reported before the seal releases them.
        let _hold = crate::quiescence::QdHold::new("done_inserting");
        loop {
            let replies: Vec<Future<(u64, u64)>> =
                (0..crate::num_pes()).map(|_| Future::new()).collect();
            or_panic(with_pe("done_inserting", |pe| {
                for (dst, f) in replies.iter().enumerate() {
                    pe.send(
                        dst,
                        Envelope::new(
                            0,
                            Control::Census {
                                coll,
                                reply: f.parts(),
                            },
                        ),
                    );
                }
            }));
            let mut issued = 0u64;
            let mut counts = Vec::with_capacity(replies.len());
            for f in replies {
                let (i, homed) = f.await;
                issued += i;
                counts.push(homed as u32);
            }
            if counts.iter().map(|&c| c as u64).sum::<u64>() == issued {
                or_panic(with_pe("done_inserting", |pe| {
                    pe.broadcast_seal(coll, counts)
                }));
                return;
            }
            crate::sleep(std::time::Duration::from_micros(200)).await;
        }
    }

    /// The element at `index`.
    ///
    /// # Errors
    /// `index` out of range (the error names it and the dimensions).
    pub fn try_at(&self, index: I) -> Result<ElementProxy<C>> {
        self.proxy.try_at(index)
    }

    /// The element at `index` (charm4py's `proxy[index]`).
    ///
    /// # Panics
    /// If `index` is out of range; the message names it and the dimensions.
    pub fn at(&self, index: I) -> ElementProxy<C> {
        self.proxy.at(index)
    }
}

/// A single chare (charm4py's `Chare(C, onPE=…)`): a proxy to its one element.
pub struct Single<C>(ElementProxy<C>);

impl<C: Chare> Single<C> {
    /// Creates a chare on PE `on_pe`, or on a PE the runtime picks if `None`.
    ///
    /// # Panics
    /// If `on_pe` does not exist (the message names it and the valid range), or outside a PE.
    pub fn new(init: C::Init, on_pe: Option<usize>) -> Self {
        or_panic(Self::try_new(init, on_pe))
    }

    /// Like [`new`](Self::new), reporting errors instead of panicking.
    pub fn try_new(init: C::Init, on_pe: Option<usize>) -> Result<Self> {
        let proxy = create::<C>(
            "Single::new",
            |pe| {
                let home = match on_pe {
                    Some(p) => {
                        pe.check_pe(p)?;
                        p
                    }
                    None => pe.pick_pe(),
                };
                Ok(Shape::Single { pe: home as u32 })
            },
            Construct::<C>::boxed(init),
        )?;
        let Shape::Single { pe } = proxy.shape else {
            unreachable!("created as a single chare")
        };
        Ok(Single(ElementProxy::from_parts(
            proxy.coll,
            Index::SCALAR,
            pe as usize,
        )))
    }
}

impl<C> Deref for Group<C> {
    type Target = Proxy<C>;
    fn deref(&self) -> &Proxy<C> {
        &self.0
    }
}

impl<C, I> Deref for Array<C, I> {
    type Target = Proxy<C>;
    fn deref(&self) -> &Proxy<C> {
        &self.proxy
    }
}

impl<C> Deref for Single<C> {
    type Target = ElementProxy<C>;
    fn deref(&self) -> &ElementProxy<C> {
        &self.0
    }
}

impl<C> Clone for Group<C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C> Copy for Group<C> {}
impl<C, I> Clone for Array<C, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C, I> Copy for Array<C, I> {}
impl<C> Clone for Single<C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C> Copy for Single<C> {}

// The typed faces travel as the proxy they wrap (a group's or an array's shape checked where
// they arrive), so they can be entry arguments like any proxy.
impl<C> Serialize for Group<C> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, C> Deserialize<'de> for Group<C> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let proxy = Proxy::<C>::deserialize(d)?;
        if proxy.shape != Shape::Group {
            return Err(crate::wire::custom_error(format!(
                "a group proxy that names a {}",
                proxy.shape.describe()
            )));
        }
        Ok(Group(proxy))
    }
}

impl<C, I> Serialize for Array<C, I> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.proxy.serialize(s)
    }
}

impl<'de, C: Chare, I: ArrayIndex> Deserialize<'de> for Array<C, I> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let proxy = Proxy::<C>::deserialize(d)?;
        Array::from_proxy(proxy).map_err(|e| crate::wire::custom_error(e.to_string()))
    }
}

impl<C> Serialize for Single<C> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, C> Deserialize<'de> for Single<C> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        ElementProxy::<C>::deserialize(d).map(Single)
    }
}

impl<C: Chare> ProxyTarget<C> for Group<C> {
    type Reply<R: Payload> = ();

    fn callback_dest(&self) -> CallbackDest {
        self.0.callback_dest()
    }
    fn send_entry<E: Entry<C>>(&self, args: E::Args) {
        self.0.send_entry::<E>(args)
    }
}
impl<C: Chare, I> ProxyTarget<C> for Array<C, I> {
    type Reply<R: Payload> = ();

    fn callback_dest(&self) -> CallbackDest {
        self.proxy.callback_dest()
    }
    fn send_entry<E: Entry<C>>(&self, args: E::Args) {
        self.proxy.send_entry::<E>(args)
    }
}
impl<C: Chare> ProxyTarget<C> for Single<C> {
    type Reply<R: Payload> = ();

    fn callback_dest(&self) -> CallbackDest {
        self.0.callback_dest()
    }
    fn send_entry<E: Entry<C>>(&self, args: E::Args) {
        self.0.send_entry::<E>(args)
    }
}
