//! What travels between PEs of one process: an [`Envelope`] holding moved Rust values.
//!
//! Same-process sends never serialize: the arguments are moved into a boxed [`Invocation`] that
//! the destination PE runs against the element. Invariant: an envelope is consumed exactly once
//! — delivered, buffered until its target exists, or reported in an abort — never dropped silently.

use crate::chare::{Chare, Entry};
use crate::collection::{CollectionId, Shape};
use crate::ctx::Ctx;
use crate::index::Index;
use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

/// A future run by a PE's local executor (the entry point, later suspendable entries).
pub(crate) type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

/// A message between PEs of one process.
pub(crate) struct Envelope {
    /// Lower runs earlier; 0 is the default (Charm++ convention).
    pub(crate) priority: i32,
    pub(crate) body: Body,
}

pub(crate) enum Body {
    /// Run an entry on one element.
    Point {
        coll: CollectionId,
        index: Index,
        call: Box<dyn Invocation>,
    },
    /// Run an entry on every element of the collection on the receiving PE.
    Broadcast {
        coll: CollectionId,
        call: Box<dyn Invocation>,
    },
    /// Construct this PE's elements of a new collection.
    Create {
        coll: CollectionId,
        shape: Shape,
        build: Box<dyn Construction>,
    },
    /// Poll local task `slot` again (sent by its waker).
    Resume { slot: u32, generation: u32 },
    /// Start a local task on the receiving PE (the program's entry point).
    Spawn(Box<dyn FnOnce() -> LocalTask + Send>),
}

impl Envelope {
    pub(crate) fn new(priority: i32, body: Body) -> Envelope {
        Envelope { priority, body }
    }
}

/// One element as stored on its PE: the chare and its context.
pub(crate) struct Element<C> {
    pub(crate) chare: RefCell<C>,
    pub(crate) ctx: Ctx<C>,
}

/// A type-erased entry call with its moved arguments.
pub(crate) trait Invocation: Send {
    fn entry_name(&self) -> &'static str;
    /// Runs the entry on `element`, moving the arguments.
    fn invoke(self: Box<Self>, element: &dyn Any) -> Result<(), String>;
    /// Runs the entry on `element` with a clone of the arguments (broadcast to several elements).
    fn invoke_cloned(&self, element: &dyn Any) -> Result<(), String>;
    /// A copy for another PE (broadcast fan-out).
    fn clone_box(&self) -> Box<dyn Invocation>;
}

/// The concrete invocation of entry `E` of chare `C`.
pub(crate) struct Call<C, E: Entry<C>>
where
    C: Chare,
{
    args: E::Args,
    _marker: PhantomData<fn() -> (C, E)>,
}

impl<C: Chare, E: Entry<C>> Call<C, E> {
    pub(crate) fn boxed(args: E::Args) -> Box<dyn Invocation> {
        Box::new(Call::<C, E> {
            args,
            _marker: PhantomData,
        })
    }
}

fn element_of<'a, C: Chare>(element: &'a dyn Any, entry: &str) -> Result<&'a Element<C>, String> {
    element.downcast_ref::<Element<C>>().ok_or_else(|| {
        format!(
            "message for entry `{entry}` reached an element that is not a `{}`",
            C::NAME
        )
    })
}

fn run<C: Chare, E: Entry<C>>(element: &dyn Any, args: E::Args) -> Result<(), String> {
    let el = element_of::<C>(element, E::NAME)?;
    let mut chare = el.chare.try_borrow_mut().map_err(|_| {
        format!(
            "entry `{}` re-entered element {} while it was running",
            E::NAME,
            el.ctx.raw_index()
        )
    })?;
    let _output = E::invoke(&mut chare, &el.ctx, args);
    Ok(())
}

impl<C: Chare, E: Entry<C>> Invocation for Call<C, E> {
    fn entry_name(&self) -> &'static str {
        E::NAME
    }
    fn invoke(self: Box<Self>, element: &dyn Any) -> Result<(), String> {
        run::<C, E>(element, self.args)
    }
    fn invoke_cloned(&self, element: &dyn Any) -> Result<(), String> {
        run::<C, E>(element, self.args.clone())
    }
    fn clone_box(&self) -> Box<dyn Invocation> {
        Call::<C, E>::boxed(self.args.clone())
    }
}

/// A type-erased constructor call with its arguments.
pub(crate) trait Construction: Send {
    fn chare_name(&self) -> &'static str;
    /// Builds the element at `index` (cloning the constructor arguments).
    fn construct(&self, ctx_parts: CtxParts) -> Box<dyn Any>;
    fn clone_box(&self) -> Box<dyn Construction>;
}

/// Where an element lives: everything its [`Ctx`] knows.
#[derive(Clone, Copy)]
pub(crate) struct CtxParts {
    pub(crate) coll: CollectionId,
    pub(crate) index: Index,
    pub(crate) shape: Shape,
    pub(crate) pe: usize,
}

pub(crate) struct Construct<C: Chare> {
    init: C::Init,
}

impl<C: Chare> Construct<C> {
    pub(crate) fn boxed(init: C::Init) -> Box<dyn Construction> {
        Box::new(Construct::<C> { init })
    }
}

impl<C: Chare> Construction for Construct<C> {
    fn chare_name(&self) -> &'static str {
        C::NAME
    }
    fn construct(&self, parts: CtxParts) -> Box<dyn Any> {
        let ctx = Ctx::<C>::from_parts(parts);
        let chare = C::construct(&ctx, self.init.clone());
        Box::new(Element {
            chare: RefCell::new(chare),
            ctx,
        })
    }
    fn clone_box(&self) -> Box<dyn Construction> {
        Construct::<C>::boxed(self.init.clone())
    }
}
