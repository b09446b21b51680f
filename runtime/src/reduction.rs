//! Reductions over the elements of a collection (charm4py's `self.contribute`).
//!
//! Every element contributes once per reduction; its k-th contribution belongs to the collection's
//! reduction number k, so many reductions can be in flight at once. Contributions are combined on
//! each PE first, then up a k-ary tree (branching [`BRANCHING`]) over the PEs that hold elements,
//! rooted at the lowest one, which delivers the result to the target: a [`Future`], an entry
//! [`Callback`] (one element's or a broadcast), or — for [`allreduce`](crate::Ctx::allreduce) —
//! back down the tree to a future of every contributor.
//!
//! Invariants: a PE forwards its partial exactly once, after all its local elements and all its
//! tree children contributed; partial results from one PE to its parent travel in order, so
//! reductions complete in order; a contribution of another type than the first one of its
//! reduction, or a vector of another length, aborts the job naming the collection and the
//! reduction number.

use crate::callback::{deliver, Callback, CallbackDest, MakeCall};
use crate::chare::Payload;
use crate::collection::{CollectionId, Shape};
use crate::envelope::{Control, Envelope};
use crate::future::{encode_value, EncodeFn, Future};
use crate::index::Index;
use crate::scheduler::PeState;
use rustc_hash::FxHashMap;
use std::any::{Any, TypeId};
use std::marker::PhantomData;

/// Branching factor of the reduction tree over PEs.
pub const BRANCHING: usize = 4;

/// A built-in reduction operation (charm4py's `Reducer.sum`, …). On vectors it applies
/// element-wise (all contributions must have the same length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reducer {
    /// Sum (numbers).
    Sum,
    /// Product (numbers).
    Product,
    /// Maximum (numbers).
    Max,
    /// Minimum (numbers).
    Min,
    /// Logical and (`bool`).
    LogicalAnd,
    /// Logical or (`bool`).
    LogicalOr,
    /// Logical exclusive or (`bool`).
    LogicalXor,
    /// Bitwise and (integers).
    BitAnd,
    /// Bitwise or (integers).
    BitOr,
    /// Bitwise exclusive or (integers).
    BitXor,
}

/// A value built-in reducers can combine: every primitive number, `bool`, and vectors of them.
pub trait Reduce: Payload {
    /// Whether `op` applies to this type.
    fn supports(op: Reducer) -> bool;
    /// Combines `other` into `self`.
    ///
    /// # Errors
    /// An unsupported operation, or vectors of different lengths.
    fn reduce(&mut self, other: Self, op: Reducer) -> Result<(), String>;
}

macro_rules! reduce_int {
    ($($t:ty),*) => {$(
        impl Reduce for $t {
            fn supports(op: Reducer) -> bool {
                !matches!(op, Reducer::LogicalAnd | Reducer::LogicalOr | Reducer::LogicalXor)
            }
            fn reduce(&mut self, o: Self, op: Reducer) -> Result<(), String> {
                *self = match op {
                    Reducer::Sum => self.wrapping_add(o),
                    Reducer::Product => self.wrapping_mul(o),
                    Reducer::Max => (*self).max(o),
                    Reducer::Min => (*self).min(o),
                    Reducer::BitAnd => *self & o,
                    Reducer::BitOr => *self | o,
                    Reducer::BitXor => *self ^ o,
                    other => return Err(unsupported::<Self>(other)),
                };
                Ok(())
            }
        }
    )*};
}
reduce_int!(i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize);

macro_rules! reduce_float {
    ($($t:ty),*) => {$(
        impl Reduce for $t {
            fn supports(op: Reducer) -> bool {
                matches!(op, Reducer::Sum | Reducer::Product | Reducer::Max | Reducer::Min)
            }
            fn reduce(&mut self, o: Self, op: Reducer) -> Result<(), String> {
                *self = match op {
                    Reducer::Sum => *self + o,
                    Reducer::Product => *self * o,
                    Reducer::Max => self.max(o),
                    Reducer::Min => self.min(o),
                    other => return Err(unsupported::<Self>(other)),
                };
                Ok(())
            }
        }
    )*};
}
reduce_float!(f32, f64);

impl Reduce for bool {
    fn supports(op: Reducer) -> bool {
        !matches!(op, Reducer::Sum | Reducer::Product)
    }
    fn reduce(&mut self, o: Self, op: Reducer) -> Result<(), String> {
        *self = match op {
            Reducer::LogicalAnd | Reducer::BitAnd | Reducer::Min => *self && o,
            Reducer::LogicalOr | Reducer::BitOr | Reducer::Max => *self || o,
            Reducer::LogicalXor | Reducer::BitXor => *self ^ o,
            other => return Err(unsupported::<Self>(other)),
        };
        Ok(())
    }
}

impl Reduce for () {
    fn supports(_op: Reducer) -> bool {
        true
    }
    fn reduce(&mut self, _other: Self, _op: Reducer) -> Result<(), String> {
        Ok(())
    }
}

impl<T: Reduce> Reduce for Vec<T> {
    fn supports(op: Reducer) -> bool {
        T::supports(op)
    }
    fn reduce(&mut self, o: Self, op: Reducer) -> Result<(), String> {
        if self.len() != o.len() {
            return Err(format!(
                "vector lengths differ ({} and {})",
                self.len(),
                o.len()
            ));
        }
        for (a, b) in self.iter_mut().zip(o) {
            a.reduce(b, op)?;
        }
        Ok(())
    }
}

fn unsupported<T>(op: Reducer) -> String {
    format!(
        "reducer {op:?} does not apply to {}",
        std::any::type_name::<T>()
    )
}

/// A type-erased combining step: folds the second value into the first.
type CombineFn = fn(&mut Box<dyn Any + Send>, Box<dyn Any + Send>, Reducer) -> Result<(), String>;

fn combine_builtin<T: Reduce>(
    acc: &mut Box<dyn Any + Send>,
    next: Box<dyn Any + Send>,
    op: Reducer,
) -> Result<(), String> {
    let next = next
        .downcast::<T>()
        .map_err(|_| "contribution of another type".to_string())?;
    let acc = acc.downcast_mut::<T>().ok_or("partial of another type")?;
    acc.reduce(*next, op)
}

/// Folds with a user function (used by [`reducer!`](crate::reducer)).
#[doc(hidden)]
pub fn combine_custom<T: Send + 'static>(
    acc: &mut Box<dyn Any + Send>,
    next: Box<dyn Any + Send>,
    f: fn(T, T) -> T,
) -> Result<(), String> {
    let next = next
        .downcast::<T>()
        .map_err(|_| "contribution of another type".to_string())?;
    if !acc.is::<T>() {
        return Err("partial of another type".into());
    }
    let current = std::mem::replace(acc, Box::new(()));
    let current = current.downcast::<T>().expect("type checked above");
    *acc = Box::new(f(*current, *next));
    Ok(())
}

fn combine_gather<T: Payload>(
    acc: &mut Box<dyn Any + Send>,
    next: Box<dyn Any + Send>,
    _op: Reducer,
) -> Result<(), String> {
    let next = next
        .downcast::<Vec<(Index, T)>>()
        .map_err(|_| "contribution of another type".to_string())?;
    acc.downcast_mut::<Vec<(Index, T)>>()
        .ok_or("partial of another type")?
        .extend(*next);
    Ok(())
}

fn finish_gather<T: Payload>(v: Box<dyn Any + Send>) -> Box<dyn Any + Send> {
    let mut v = v
        .downcast::<Vec<(Index, T)>>()
        .expect("gather partials are checked");
    v.sort_by_key(|e| e.0);
    Box::new(v.into_iter().map(|(_, t)| t).collect::<Vec<T>>())
}

fn identity(v: Box<dyn Any + Send>) -> Box<dyn Any + Send> {
    v
}

fn clone_any<T: Payload>(v: &(dyn Any + Send)) -> Box<dyn Any + Send> {
    Box::new(
        v.downcast_ref::<T>()
            .expect("result type is checked")
            .clone(),
    )
}

fn wrap_one<T: Payload>(v: Box<dyn Any + Send>) -> Box<dyn Any + Send> {
    Box::new((*v.downcast::<T>().expect("result type is checked"),))
}

/// A user-defined reducer over `T`, declared with [`reducer!`](crate::reducer).
pub struct CustomReducer<T> {
    name: &'static str,
    combine: CombineFn,
    _t: PhantomData<fn(T) -> T>,
}

impl<T> CustomReducer<T> {
    #[doc(hidden)]
    pub const fn new(name: &'static str, combine: CombineFn) -> CustomReducer<T> {
        CustomReducer {
            name,
            combine,
            _t: PhantomData,
        }
    }

    /// The reducer's qualified name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Declares a user-defined reducer: `reducer!(pub NAME: Type = |a, b| …);` (the function must be
/// associative and commutative). Use it with [`Ctx::contribute_with`](crate::Ctx::contribute_with).
///
/// ```
/// charmrs::reducer!(pub LONGEST: String = |a, b| if b.len() > a.len() { b } else { a });
/// assert!(LONGEST.name().ends_with("LONGEST"));
/// ```
#[macro_export]
macro_rules! reducer {
    ($vis:vis $name:ident : $t:ty = $f:expr) => {
        $vis static $name: $crate::CustomReducer<$t> = $crate::CustomReducer::new(
            concat!(module_path!(), "::", stringify!($name)),
            {
                fn erased(
                    acc: &mut ::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>,
                    next: ::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>,
                    _op: $crate::Reducer,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::combine_custom::<$t>(acc, next, $f)
                }
                erased
            },
        );
    };
}

/// Where a reduction's result goes: a [`Future`] or an entry [`Callback`] taking the result.
pub struct Target<T> {
    spec: TargetSpec,
    _t: PhantomData<fn(T)>,
}

impl<T: Payload> From<Future<T>> for Target<T> {
    fn from(f: Future<T>) -> Self {
        let (pe, id) = f.parts();
        Target {
            spec: TargetSpec::Future { pe, id },
            _t: PhantomData,
        }
    }
}

impl<T: Payload> From<Callback<(T,)>> for Target<T> {
    fn from(cb: Callback<(T,)>) -> Self {
        Target {
            spec: TargetSpec::Entry {
                dest: cb.dest,
                make: cb.make,
                wrap: wrap_one::<T>,
            },
            _t: PhantomData,
        }
    }
}

impl From<Callback<()>> for Target<()> {
    fn from(cb: Callback<()>) -> Self {
        Target {
            spec: TargetSpec::Entry {
                dest: cb.dest,
                make: cb.make,
                wrap: |_| Box::new(()),
            },
            _t: PhantomData,
        }
    }
}

impl<T> Target<T> {
    pub(crate) fn spec(self) -> TargetSpec {
        self.spec
    }

    /// The same destination for a value stored as another type (gather partials).
    pub(crate) fn retype<U>(t: Target<T>) -> Target<U> {
        Target {
            spec: t.spec,
            _t: PhantomData,
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum TargetSpec {
    Future {
        pe: u32,
        id: u64,
    },
    Entry {
        dest: CallbackDest,
        make: MakeCall,
        wrap: fn(Box<dyn Any + Send>) -> Box<dyn Any + Send>,
    },
    /// Every contributor has a future of the result (allreduce).
    Everyone,
}

/// How to combine and finish the values of one reduction.
#[derive(Clone, Copy)]
pub(crate) struct Kind {
    type_id: TypeId,
    type_name: &'static str,
    op: Reducer,
    combine: CombineFn,
    finish: fn(Box<dyn Any + Send>) -> Box<dyn Any + Send>,
    clone: fn(&(dyn Any + Send)) -> Box<dyn Any + Send>,
    /// Encodes the finished result for a future in another process.
    encode: EncodeFn,
}

impl Kind {
    pub(crate) fn builtin<T: Reduce>(op: Reducer) -> Kind {
        Kind {
            type_id: TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
            op,
            combine: combine_builtin::<T>,
            finish: identity,
            clone: clone_any::<T>,
            encode: encode_value::<T>,
        }
    }

    pub(crate) fn custom<T: Payload>(r: &CustomReducer<T>) -> Kind {
        Kind {
            type_id: TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
            op: Reducer::Sum,
            combine: r.combine,
            finish: identity,
            clone: clone_any::<T>,
            encode: encode_value::<T>,
        }
    }

    pub(crate) fn gather<T: Payload>() -> Kind {
        Kind {
            type_id: TypeId::of::<Vec<(Index, T)>>(),
            type_name: std::any::type_name::<T>(),
            op: Reducer::Sum,
            combine: combine_gather::<T>,
            finish: finish_gather::<T>,
            clone: clone_any::<Vec<T>>,
            encode: encode_value::<Vec<T>>,
        }
    }
}

/// One contribution or one PE's partial result.
pub(crate) struct Part {
    pub(crate) data: Box<dyn Any + Send>,
    pub(crate) kind: Kind,
    pub(crate) target: TargetSpec,
}

impl Part {
    pub(crate) fn new<T: Payload>(data: T, kind: Kind, target: impl Into<Target<T>>) -> Part {
        Part {
            data: Box::new(data),
            kind,
            target: target.into().spec,
        }
    }

    pub(crate) fn everyone<T: Payload>(data: T, kind: Kind) -> Part {
        Part {
            data: Box::new(data),
            kind,
            target: TargetSpec::Everyone,
        }
    }
}

/// Position of a PE in a collection's reduction tree.
struct TreePlace {
    parent: Option<usize>,
    children: Vec<usize>,
}

fn tree_place(shape: &Shape, pe: usize, num_pes: usize) -> TreePlace {
    let members = shape.member_pes(num_pes);
    let pos = members.iter().position(|&p| p == pe).unwrap_or(0);
    let parent = (pos > 0).then(|| members[(pos - 1) / BRANCHING]);
    let children = (1..=BRANCHING)
        .map(|c| BRANCHING * pos + c)
        .filter_map(|i| members.get(i).copied())
        .collect();
    TreePlace { parent, children }
}

struct Pending {
    got: usize,
    expected: usize,
    place: TreePlace,
    part: Option<Part>,
}

/// The reductions in progress on one PE.
#[derive(Default)]
pub(crate) struct ReductionTable {
    pending: FxHashMap<(CollectionId, u64), Pending>,
    /// Futures of this PE's allreduce contributors, by reduction.
    everyone: FxHashMap<(CollectionId, u64), Vec<(u32, u64)>>,
}

impl ReductionTable {
    pub(crate) fn add_allreduce_future(
        &mut self,
        coll: CollectionId,
        seq: u64,
        future: (u32, u64),
    ) {
        self.everyone.entry((coll, seq)).or_default().push(future);
    }
}

fn describe(coll: CollectionId, seq: u64, shape: &Shape) -> String {
    format!("reduction #{seq} over {} {coll:?}", shape.describe())
}

impl PeState {
    /// Adds a contribution (from a local element, or a child PE's partial) to reduction `seq` of
    /// `coll`; forwards or delivers the result once complete.
    pub(crate) fn reduce(&self, coll: CollectionId, seq: u64, shape: Shape, part: Part) {
        let complete = {
            let mut table = self.reductions.borrow_mut();
            let p = table.pending.entry((coll, seq)).or_insert_with(|| {
                let place = tree_place(&shape, self.pe, self.num_pes());
                let expected = shape.local_count(self.pe, self.num_pes()) + place.children.len();
                Pending {
                    got: 0,
                    expected,
                    place,
                    part: None,
                }
            });
            p.got += 1;
            match p.part.as_mut() {
                None => p.part = Some(part),
                Some(acc) => {
                    if acc.kind.type_id != part.kind.type_id {
                        let msg = format!(
                            "charmrs: {}: a contribution of type {} does not match the earlier {}",
                            describe(coll, seq, &shape),
                            part.kind.type_name,
                            acc.kind.type_name
                        );
                        drop(table);
                        return self.abort_job(msg);
                    }
                    if let Err(e) = (acc.kind.combine)(&mut acc.data, part.data, acc.kind.op) {
                        let msg = format!("charmrs: {}: {e}", describe(coll, seq, &shape));
                        drop(table);
                        return self.abort_job(msg);
                    }
                }
            }
            if p.got == p.expected {
                table.pending.remove(&(coll, seq))
            } else {
                None
            }
        };
        let Some(done) = complete else { return };
        let part = done.part.expect("a complete reduction has a value");
        match done.place.parent {
            Some(parent) => {
                self.send(
                    parent,
                    Envelope::new(
                        0,
                        Control::ReduceUp {
                            coll,
                            seq,
                            shape,
                            part,
                        },
                    ),
                );
            }
            None => self.deliver_result(coll, seq, shape, part),
        }
    }

    fn deliver_result(&self, coll: CollectionId, seq: u64, shape: Shape, part: Part) {
        let kind = part.kind;
        let value = (kind.finish)(part.data);
        match part.target {
            TargetSpec::Everyone => self.reduce_down(coll, seq, shape, value, kind.clone),
            target => self.reach(target, value, kind.encode),
        }
    }

    /// Delivers `value` to a future or entry target.
    pub(crate) fn reach(&self, target: TargetSpec, value: Box<dyn Any + Send>, encode: EncodeFn) {
        match target {
            TargetSpec::Future { pe, id } => self.fulfil(pe as usize, id, Ok(value), encode),
            TargetSpec::Entry { dest, make, wrap } => match make(wrap(value)) {
                Some(call) => deliver(self, dest, call),
                None => self.abort_job(
                    "charmrs: a reduction or quiescence target entry takes another argument type"
                        .into(),
                ),
            },
            TargetSpec::Everyone => unreachable!("allreduce results go down the tree"),
        }
    }

    /// Hands an allreduce result to this PE's contributors and passes it down the tree.
    pub(crate) fn reduce_down(
        &self,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        value: Box<dyn Any + Send>,
        clone: fn(&(dyn Any + Send)) -> Box<dyn Any + Send>,
    ) {
        let place = tree_place(&shape, self.pe, self.num_pes());
        for &child in &place.children {
            let value = clone(&*value);
            self.send(
                child,
                Envelope::new(
                    0,
                    Control::ReduceDown {
                        coll,
                        seq,
                        shape,
                        value,
                        clone,
                    },
                ),
            );
        }
        let futures = self
            .reductions
            .borrow_mut()
            .everyone
            .remove(&(coll, seq))
            .unwrap_or_default();
        for (pe, id) in futures {
            debug_assert_eq!(
                pe as usize, self.pe,
                "allreduce futures belong to their contributor"
            );
            self.fulfil_local(id, Ok(clone(&*value)));
        }
    }
}
