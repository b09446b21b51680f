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
//! tree children contributed. The results of a collection's reductions leave the tree's root in
//! reduction order: one that completes there before an earlier one (an element contributed,
//! moved to a third PE and contributed again, so its two contributions travelled on different
//! channels) waits for it. A reduction the root cannot decode (every contribution came encoded
//! from other processes) is finished at once by the PE that encoded its first partial, which
//! reports back to the root; for an entry target the report carries the result's call, which
//! the root sends on in its turn, so results reach an entry target in reduction order (except a
//! call with so many zero-copy buffers that the report cannot nest it: it goes directly). (A future
//! or `at_sync` target of a reduction finished elsewhere is served from there directly: each
//! has its own future, or waits for its step.) An element's contribution travels at the
//! migration message's priority, so one sent to the home just before the element moves there
//! stays ahead of it. A contribution of another type than the first one of its reduction, or a
//! vector of another length, aborts the job naming the collection and the reduction number.

use crate::callback::{deliver, Callback, CallbackDest, MakeCall};
use crate::chare::Payload;
use crate::collection::{CollectionId, Shape};
use crate::envelope::{Control, Envelope};
use crate::future::{decode_any, encode_value, DecodeFn, EncodeFn, Future};
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

    /// Combines `other`'s values into `acc`'s, pairwise, as far as the shorter goes (the vector
    /// reducers check the lengths first). The default calls [`reduce`](Reduce::reduce) per
    /// pair; the numbers choose the operation once, so the loop over a vector's
    /// elements is a plain one the compiler vectorises.
    ///
    /// # Errors
    /// As [`reduce`](Reduce::reduce).
    fn reduce_all<I: IntoIterator<Item = Self>>(
        acc: &mut [Self],
        other: I,
        op: Reducer,
    ) -> Result<(), String> {
        for (a, b) in acc.iter_mut().zip(other) {
            a.reduce(b, op)?;
        }
        Ok(())
    }
}

/// Implements [`Reduce`] for each number type listed, from one table of its reducers (the
/// reducers a type `supports` are the table's): `reduce_all` picks the operation once for a
/// whole vector, and `reduce` is `reduce_all` on one value.
macro_rules! reduce_numbers {
    ([$($t:ty),*], $table:tt) => {$( reduce_number!($t, $table); )*};
}

macro_rules! reduce_number {
    ($t:ty, { $($r:ident => $f:expr),* $(,)? }) => {
        impl Reduce for $t {
            fn supports(op: Reducer) -> bool {
                matches!(op, $(Reducer::$r)|*)
            }
            fn reduce(&mut self, o: Self, op: Reducer) -> Result<(), String> {
                Self::reduce_all(std::slice::from_mut(self), [o], op)
            }
            fn reduce_all<I: IntoIterator<Item = Self>>(
                acc: &mut [Self],
                other: I,
                op: Reducer,
            ) -> Result<(), String> {
                let pairs = acc.iter_mut().zip(other);
                match op {
                    $(Reducer::$r => pairs.for_each(|(a, b)| *a = ($f)(*a, b)),)*
                    other => return Err(unsupported::<Self>(other)),
                }
                Ok(())
            }
        }
    };
}

reduce_numbers!([i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize], {
    Sum => |a: Self, b| a.wrapping_add(b),
    Product => |a: Self, b| a.wrapping_mul(b),
    Max => |a: Self, b| a.max(b),
    Min => |a: Self, b| a.min(b),
    BitAnd => |a: Self, b| a & b,
    BitOr => |a: Self, b| a | b,
    BitXor => |a: Self, b| a ^ b,
});

reduce_numbers!([f32, f64], {
    Sum => |a: Self, b| a + b,
    Product => |a: Self, b| a * b,
    Max => |a: Self, b: Self| a.max(b),
    Min => |a: Self, b: Self| a.min(b),
});

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
        T::reduce_all(self, o, op)
    }
}

/// Element-wise, like `Vec<T>`: the partial is changed in place (copied once first only if its
/// elements are received bytes read in place, or shared with a clone or a message being sent), so a
/// large vector contributed by every element of a PE is combined without a vector per step. Over
/// the network a `PodVec` partial travels as one byte string (one copy each way) where a `Vec` is
/// encoded element by element.
///
/// ```
/// use charmrs::prelude::*;
/// use charmrs::PodVec;
///
/// struct Part;
///
/// #[chare]
/// impl Part {
///     fn new() -> Self { Part }
///
///     #[entry]
///     fn add(&mut self, ctx: &Ctx<Self>, done: Future<PodVec<f64>>) {
///         let me: usize = ctx.index();
///         let mine: PodVec<f64> = (0..4).map(|i| (me * i) as f64).collect();
///         ctx.contribute(mine, Reducer::Sum, done);
///     }
/// }
///
/// charmrs::Runtime::new(2).run(|_| async {
///     let parts = Array::<Part, usize>::new(3, ());
///     let done = Future::new();
///     parts.add(done);
///     assert_eq!(done.await.as_slice(), &[0.0, 3.0, 6.0, 9.0]);
///     charmrs::exit(0);
/// }).unwrap();
/// ```
impl<T: crate::Pod + Reduce> Reduce for crate::PodVec<T> {
    fn supports(op: Reducer) -> bool {
        T::supports(op)
    }
    fn reduce(&mut self, mut o: Self, op: Reducer) -> Result<(), String> {
        if self.len() != o.len() {
            return Err(format!(
                "vector lengths differ ({} and {})",
                self.len(),
                o.len()
            ));
        }
        // Every built-in reducer is commutative: combine into whichever of the two can be
        // written without a copy (the partial is often an element's kept vector, shared).
        if self.writing_copies() && !o.writing_copies() {
            std::mem::swap(self, &mut o);
        }
        T::reduce_all(self.as_mut_vec(), o.as_slice().iter().copied(), op)
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
/// associative and commutative: contributions are combined in no fixed order — the example
/// breaks ties between equally long strings, or its result would depend on that order). Use it
/// with [`Ctx::contribute_with`](crate::Ctx::contribute_with). A reducer that panics aborts the
/// job, naming the reduction.
///
/// ```
/// charmrs::reducer!(pub LONGEST: String = |a, b| if (b.len(), &b) > (a.len(), &a) { b } else { a });
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
    /// The result feeds a load-balancing step ([`crate::Ctx::at_sync`]).
    Balance,
}

impl TargetSpec {
    /// Tells targets apart: every contribution to one reduction must name the same target
    /// (checked where contributions meet, encoded ones from other processes included). An
    /// entry callback is told apart by its destination (the entry is not compared).
    pub(crate) fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        match self {
            TargetSpec::Future { pe, id } => (0u8, pe, id).hash(&mut h),
            TargetSpec::Entry { dest, .. } => match dest {
                CallbackDest::Point { coll, index, .. } => (1u8, coll, index).hash(&mut h),
                CallbackDest::Broadcast { coll, .. } => (2u8, coll).hash(&mut h),
            },
            TargetSpec::Everyone => 3u8.hash(&mut h),
            TargetSpec::Balance => 4u8.hash(&mut h),
        }
        h.finish()
    }

    /// The target, for an error message.
    fn describe(&self) -> String {
        match self {
            TargetSpec::Future { pe, id } => format!("future {id} of PE {pe}"),
            TargetSpec::Entry { dest, .. } => format!("a callback to {dest:?}"),
            TargetSpec::Everyone => "every contributor (an allreduce)".to_string(),
            TargetSpec::Balance => "a load-balancing step (at_sync)".to_string(),
        }
    }
}

/// How to combine and finish the values of one reduction.
#[derive(Clone, Copy)]
pub(crate) struct Kind {
    type_id: TypeId,
    type_name: &'static str,
    /// Which reduction this is: every contribution to one reduction must name the same.
    operation: Operation,
    combine: CombineFn,
    finish: fn(Box<dyn Any + Send>) -> Box<dyn Any + Send>,
    clone: fn(&(dyn Any + Send)) -> Box<dyn Any + Send>,
    /// Encodes the finished result for a future in another process.
    encode: EncodeFn,
    /// Encodes / decodes a partial value for a parent PE in another process.
    encode_part: EncodeFn,
    decode_part: DecodeFn,
    /// Decodes a finished result that arrived from another process (allreduce).
    decode_result: DecodeFn,
}

/// The operation of a reduction, as contributions name it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Operation {
    Builtin(Reducer),
    Custom(&'static str),
    AtSync,
    Gather,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::Builtin(op) => write!(f, "Reducer::{op:?}"),
            Operation::Custom(name) => write!(f, "the custom reducer {name}"),
            Operation::AtSync => f.write_str("at_sync"),
            Operation::Gather => f.write_str("a gather"),
        }
    }
}

impl Kind {
    /// The built-in operation the combining step applies (other kinds ignore it).
    fn op(&self) -> Reducer {
        match self.operation {
            Operation::Builtin(op) => op,
            _ => Reducer::Sum,
        }
    }

    pub(crate) fn builtin<T: Reduce>(op: Reducer) -> Kind {
        Kind {
            type_id: TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
            operation: Operation::Builtin(op),
            combine: combine_builtin::<T>,
            finish: identity,
            clone: clone_any::<T>,
            encode: encode_value::<T>,
            encode_part: encode_value::<T>,
            decode_part: decode_any::<T>,
            decode_result: decode_any::<T>,
        }
    }

    pub(crate) fn custom<T: Payload>(r: &CustomReducer<T>) -> Kind {
        Kind {
            type_id: TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
            operation: Operation::Custom(r.name),
            combine: r.combine,
            finish: identity,
            clone: clone_any::<T>,
            encode: encode_value::<T>,
            encode_part: encode_value::<T>,
            decode_part: decode_any::<T>,
            decode_result: decode_any::<T>,
        }
    }

    pub(crate) fn at_sync() -> Kind {
        Kind {
            type_id: TypeId::of::<crate::balance::AtSyncData>(),
            type_name: "at_sync",
            operation: Operation::AtSync,
            combine: crate::balance::combine,
            finish: identity,
            clone: crate::balance::clone,
            encode: crate::balance::encode,
            encode_part: crate::balance::encode,
            decode_part: crate::balance::decode,
            decode_result: crate::balance::decode,
        }
    }

    pub(crate) fn gather<T: Payload>() -> Kind {
        Kind {
            type_id: TypeId::of::<Vec<(Index, T)>>(),
            type_name: std::any::type_name::<T>(),
            operation: Operation::Gather,
            combine: combine_gather::<T>,
            finish: finish_gather::<T>,
            clone: clone_any::<Vec<T>>,
            encode: encode_value::<Vec<T>>,
            encode_part: encode_value::<Vec<(Index, T)>>,
            decode_part: decode_any::<Vec<(Index, T)>>,
            decode_result: decode_any::<Vec<T>>,
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

/// Where `pe` sits in the reduction tree of a collection: inside a process, every member PE
/// reports to the process's lowest member PE (its leader); the leaders form a
/// [`BRANCHING`]-ary tree over the member processes, rooted at the lowest one. So contributions
/// are combined inside a process first and only one partial per process crosses the network.
fn tree_place(members: &[usize], pe: usize, pes_per_process: usize) -> TreePlace {
    let process = |p: usize| p / pes_per_process;
    // Leaders in increasing order, one per member process.
    let mut leaders: Vec<usize> = Vec::new();
    for &m in members {
        if leaders.last().is_none_or(|&l| process(l) != process(m)) {
            leaders.push(m);
        }
    }
    let leader = |p: usize| leaders.iter().copied().find(|&l| process(l) == process(p));
    let Some(my_leader) = leader(pe) else {
        return TreePlace {
            parent: None,
            children: Vec::new(),
        };
    };
    if my_leader != pe {
        return TreePlace {
            parent: Some(my_leader),
            children: Vec::new(),
        };
    }
    let pos = leaders
        .iter()
        .position(|&l| l == pe)
        .expect("a leader is in the list");
    let parent = (pos > 0).then(|| leaders[(pos - 1) / BRANCHING]);
    let mut children: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&m| m != pe && process(m) == process(pe))
        .collect();
    children.extend(
        (1..=BRANCHING)
            .map(|c| BRANCHING * pos + c)
            .filter_map(|i| leaders.get(i).copied()),
    );
    TreePlace { parent, children }
}

struct Pending {
    got: usize,
    expected: usize,
    place: TreePlace,
    part: Option<Part>,
    /// Partials from other processes, still encoded until a typed contribution here says how to
    /// decode them. A PE that completes without one passes them on as they are.
    raw: Vec<Raw>,
}

/// An encoded partial and the PE that encoded it. That PE keeps how to decode and deliver it
/// (see [`ReductionTable::foreign`]) in case no PE on the way up can.
#[derive(Clone)]
pub(crate) struct Raw {
    pub(crate) origin: u32,
    pub(crate) bytes: bytes::Bytes,
    /// The [`TargetSpec::digest`] of the contributions it combines.
    pub(crate) target: u64,
}

/// The runtime message carrying encoded partials to a PE: up the tree (`finish == false`), or
/// from the tree's root `from` to the PE that encoded one of them, to finish the reduction there
/// (`finish`).
pub(crate) fn encoded_partials(
    finish: bool,
    coll: CollectionId,
    seq: u64,
    shape: Shape,
    raws: Vec<Raw>,
    from: u32,
) -> Control {
    if finish {
        Control::ReduceFinish {
            coll,
            seq,
            shape,
            raws,
            root: from,
        }
    } else {
        Control::ReduceUp {
            coll,
            seq,
            shape,
            incoming: Incoming::Encoded(raws),
        }
    }
}

/// How many reductions back a PE remembers how to finish a reduction it sent encoded data for.
const FOREIGN_WINDOW: u64 = 1024;

/// An allreduce's futures on this PE, their kind, and (at a home PE) the PEs outside the
/// reduction tree, or not sure yet whether they are in it, that want a copy of the result
/// (`Control::AllreduceSubscribe`).
type AllreduceWaiters = (Vec<(u32, u64)>, Option<Kind>, Vec<usize>);

/// The reductions in progress on one PE.
#[derive(Default)]
pub(crate) struct ReductionTable {
    pending: FxHashMap<(CollectionId, u64), Pending>,
    /// Futures of this PE's allreduce contributors (and how to decode the result), by reduction.
    everyone: FxHashMap<(CollectionId, u64), AllreduceWaiters>,
    /// Reductions this PE sent encoded data for to another process: how to decode and where to
    /// deliver, should the root have no typed contribution (elements that all migrated away from
    /// their home process). Kept for the last [`FOREIGN_WINDOW`] reductions of a collection.
    /// For each: the kind, the target, and (an `at_sync`) where to resume, which does not travel
    /// with the encoded records.
    foreign: FxHashMap<(CollectionId, u64), (Kind, TargetSpec, Option<TargetSpec>)>,
    /// The latest reduction of each collection in `foreign`.
    foreign_latest: FxHashMap<CollectionId, u64>,
    /// Size of `foreign` at which it is next pruned (twice what a pruning left: amortised).
    foreign_prune_at: usize,
    /// At the root of a collection's tree: the next reduction whose result may leave.
    next_at_root: FxHashMap<CollectionId, u64>,
    /// At the root: results ready to leave, held until every earlier one has left.
    ready_at_root: std::collections::BTreeMap<(CollectionId, u64), AtRoot>,
    /// At the root: reductions another PE was asked to finish (`Control::ReduceFinish`), and
    /// which PE.
    finishing_elsewhere: FxHashMap<(CollectionId, u64), u32>,
}

/// A result ready to leave the root of its reduction tree.
enum AtRoot {
    /// Complete here, with a typed contribution to deliver it with.
    Complete(Shape, Box<Pending>),
    /// Finished by another PE, which sent back the result's call for an entry target.
    FinishedElsewhere(Option<Box<crate::callback::Routed>>),
}

impl ReductionTable {
    fn remember_foreign(
        &mut self,
        coll: CollectionId,
        seq: u64,
        kind: Kind,
        target: TargetSpec,
        resume: Option<TargetSpec>,
    ) {
        self.foreign.insert((coll, seq), (kind, target, resume));
        let latest = self.foreign_latest.entry(coll).or_insert(seq);
        *latest = (*latest).max(seq);
        if self.foreign.len() > self.foreign_prune_at.max(2 * FOREIGN_WINDOW as usize) {
            // Every collection's entries older than its window go (not only this one's, which
            // left other collections' entries to be scanned on every insertion).
            let latest = &self.foreign_latest;
            self.foreign
                .retain(|(c, s), _| s + FOREIGN_WINDOW >= latest.get(c).copied().unwrap_or(0));
            self.foreign_prune_at = 2 * self.foreign.len();
        }
    }
}

impl ReductionTable {
    pub(crate) fn add_allreduce_future(
        &mut self,
        coll: CollectionId,
        seq: u64,
        future: (u32, u64),
        kind: Kind,
    ) {
        let slot = self.everyone.entry((coll, seq)).or_default();
        slot.0.push(future);
        slot.1 = Some(kind);
    }
}

/// A reduction, for error messages. A section's is named as a section: its contributions come
/// with their own collection's shape, which differs between a combined section's collections.
fn describe(coll: CollectionId, seq: u64, shape: &Shape) -> String {
    if coll.is_section() {
        format!("reduction #{seq} over section {coll:?}")
    } else {
        format!("reduction #{seq} over {} {coll:?}", shape.describe())
    }
}

/// Where one more contribution to a reduction comes from.
pub(crate) enum Incoming {
    /// A local element's contribution or a child PE's partial from this process.
    Typed(Part),
    /// A child PE's partial from another process (or an element's contribution), still encoded.
    Encoded(Vec<Raw>),
}

impl PeState {
    /// An element's contribution: counted at the element's home PE, wherever it lives now, so
    /// every PE expects a fixed number of contributions however elements migrate.
    pub(crate) fn contribute(
        &self,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        index: &Index,
        part: Part,
    ) {
        let home = shape.home_pe(index, self.num_pes());
        if home == self.pe {
            self.reduce(coll, seq, shape, Incoming::Typed(part));
        } else {
            // An allreduce contributor away from home, on a PE outside the collection's
            // reduction tree (home to none of its elements) or not knowing yet whether it is in
            // it (a sparse array whose seal has not reached this PE): the result comes down the
            // tree only, so ask the home to send a copy here too — before the contribution, on
            // the same channel, so the home knows by the time the result reaches it.
            if matches!(part.target, TargetSpec::Everyone)
                && matches!(self.homes_here(coll, &shape), None | Some(0))
            {
                let body = Control::AllreduceSubscribe {
                    coll,
                    seq,
                    pe: self.pe as u32,
                };
                // At the contribution's priority, so that it stays ahead of it at the home.
                self.send(home, Envelope::new(crate::envelope::MIGRATION_ORDER, body));
            }
            self.send_part_up(coll, seq, shape, home, part);
        }
    }

    /// At an element's home: PE `pe` wants allreduce `seq`'s result too.
    pub(crate) fn allreduce_subscribe(&self, coll: CollectionId, seq: u64, pe: u32) {
        if pe as usize >= self.num_pes() {
            return self.abort_job(format!(
                "charmrs: an allreduce subscription from unknown PE {pe} (the job has {} PEs)",
                self.num_pes()
            ));
        }
        let mut r = self.reductions.borrow_mut();
        let extras = &mut r.everyone.entry((coll, seq)).or_default().2;
        if !extras.contains(&(pe as usize)) {
            extras.push(pe as usize);
        }
    }

    /// The subscribers of allreduce `seq` at this PE (see `allreduce_subscribe`).
    fn allreduce_extras(&self, coll: CollectionId, seq: u64) -> Vec<usize> {
        self.reductions
            .borrow()
            .everyone
            .get(&(coll, seq))
            .map(|e| e.2.clone())
            .unwrap_or_default()
    }

    /// Sends a typed partial up to PE `to`: moved within this process, encoded to another.
    fn send_part_up(&self, coll: CollectionId, seq: u64, shape: Shape, to: usize, part: Part) {
        if self.shared.mailbox(to).is_some() {
            let body = Control::ReduceUp {
                coll,
                seq,
                shape,
                incoming: Incoming::Typed(part),
            };
            self.send(to, Envelope::new(crate::envelope::MIGRATION_ORDER, body));
        } else {
            self.send_up_encoded(coll, seq, shape, to, part);
        }
    }

    /// Sends `part` encoded to PE `to` of another process, remembering how to finish the
    /// reduction in case nobody there can decode it.
    fn send_up_encoded(&self, coll: CollectionId, seq: u64, shape: Shape, to: usize, part: Part) {
        let target = part.target.digest();
        self.reductions.borrow_mut().remember_foreign(
            coll,
            seq,
            part.kind,
            part.target,
            crate::balance::resume_of(&*part.data),
        );
        let raws = (part.kind.encode_part)(&*part.data).map(|bytes| {
            vec![Raw {
                origin: self.pe as u32,
                bytes: bytes.into(),
                target,
            }]
        });
        self.send_raws_remote(false, coll, seq, shape, to, raws);
    }

    /// Sends encoded partials up to PE `to` of another process (or, with `finish`, to the PE that
    /// can decode them, to deliver the result).
    fn send_raws_remote(
        &self,
        finish: bool,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        to: usize,
        raws: Result<Vec<Raw>, String>,
    ) {
        let msg = raws.and_then(|raws| {
            crate::wire::raw_reduction_message(
                finish,
                coll,
                seq,
                shape,
                self.pe as u32,
                to as u32,
                raws,
            )
        });
        self.send_reduction_message(to, msg, || describe(coll, seq, &shape));
    }

    /// Sends a reduction message to PE `to` of another process (counted for quiescence); on
    /// failure aborts the job naming `what` and returns `false`.
    fn send_reduction_message(
        &self,
        to: usize,
        msg: Result<charmrs_transport::Message, String>,
        what: impl FnOnce() -> String,
    ) -> bool {
        self.count_sent();
        let sent = msg.and_then(|msg| {
            self.trace_sent(&msg);
            self.shared
                .layer
                .send(self.shared.process_of(to), msg)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = sent {
            self.abort_job(format!("charmrs: {}: sending to PE {to}: {e}", what()));
            return false;
        }
        true
    }

    /// At the PE that encoded one of a reduction's partials: the root had nothing typed to decode
    /// the partials with, so this PE combines them and delivers the result.
    pub(crate) fn finish_foreign(
        &self,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        raws: Vec<Raw>,
        root: u32,
    ) {
        let found = self.reductions.borrow_mut().foreign.remove(&(coll, seq));
        let Some((kind, target, resume)) = found else {
            return self.abort_job(format!(
                "charmrs: {}: PE {} was asked to finish it but no longer knows how (more than {FOREIGN_WINDOW} reductions ago?)",
                describe(coll, seq, &shape),
                self.pe
            ));
        };
        let digest = target.digest();
        // The partials' `Deserialize` and the reducer are user code: a panic in them ends the
        // job naming the reduction, as it does where typed contributions are combined.
        let combined = crate::panic::catching("combining the partials", || {
            let mut data: Option<Box<dyn Any + Send>> = None;
            for raw in raws {
                if raw.target != digest {
                    return Err(format!(
                        "a partial from PE {} names another target than {}: every \
                         contribution to one reduction must name the same target",
                        raw.origin,
                        target.describe()
                    ));
                }
                let value = (kind.decode_part)(&raw.bytes)
                    .map_err(|e| format!("a partial from PE {}: {e}", raw.origin))?;
                match data.as_mut() {
                    None => data = Some(value),
                    Some(acc) => (kind.combine)(acc, value, kind.op())?,
                }
            }
            Ok(data)
        });
        let data = match combined {
            Ok(data) => data,
            Err(e) => {
                return self.abort_job(format!("charmrs: {}: {e}", describe(coll, seq, &shape)))
            }
        };
        let Some(mut data) = data else {
            return self.abort_job(format!(
                "charmrs: {}: PE {} was asked to finish it without any partial",
                describe(coll, seq, &shape),
                self.pe
            ));
        };
        if let Some(resume) = resume {
            // An `at_sync` finished here: its resume target stayed in this process.
            crate::balance::set_resume(&mut *data, resume);
        }
        let call = match target {
            TargetSpec::Everyone => {
                // An allreduce: the result goes down the tree from its root, which could not
                // decode it (no contributor of its own) but can pass it on as bytes.
                self.send_down_from_root(
                    root as usize,
                    coll,
                    seq,
                    shape,
                    (kind.finish)(data),
                    kind,
                );
                None
            }
            TargetSpec::Entry { dest, make, wrap } => match make(wrap((kind.finish)(data))) {
                // Sent on by the root, in order with the collection's other results.
                Some(call) => Some(Box::new(crate::callback::route(dest, call))),
                None => {
                    return self.abort_job(
                        "charmrs: a reduction target entry takes another argument type".into(),
                    )
                }
            },
            target => {
                self.deliver_result(coll, seq, shape, Part { data, kind, target });
                None
            }
        };
        self.report_finished(root as usize, coll, seq, call);
    }

    /// Tells the tree's root that this PE finished reduction `seq` for it (with the result's call
    /// for an entry target, for the root to send on).
    fn report_finished(
        &self,
        root: usize,
        coll: CollectionId,
        seq: u64,
        call: Option<Box<crate::callback::Routed>>,
    ) {
        // At priority 0, behind an allreduce result sent to the root just before.
        if self.shared.mailbox(root).is_some() {
            let from = self.pe as u32;
            let body = Control::ReduceFinished {
                coll,
                seq,
                from,
                call,
            };
            return self.send(root, Envelope::new(0, body));
        }
        let table = self.shared.entries;
        let (me, to) = (self.pe as u32, root as u32);
        let message = match crate::wire::finished_message(table, coll, seq, call.as_deref(), me, to)
        {
            Ok(Some(m)) => Ok(m),
            Ok(None) => {
                // The call does not fit inside a report (it has the most segments a message may
                // have): it goes from here, out of the root's order, the report without it.
                crate::callback::send_routed(self, *call.expect("only a call can be too large"));
                crate::wire::finished_message(table, coll, seq, None, me, to)
                    .map(|m| m.expect("a report without a call fits"))
            }
            Err(e) => Err(e),
        };
        self.send_reduction_message(root, message, || {
            format!("reporting reduction #{seq} over {coll:?} finished")
        });
    }

    /// Sends an allreduce result finished away from the tree's root to the root (this PE need
    /// not know the tree: it may not even have a sparse array's seal yet).
    fn send_down_from_root(
        &self,
        root: usize,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        value: Box<dyn Any + Send>,
        kind: Kind,
    ) {
        if root == self.pe {
            self.reduce_down(coll, seq, shape, value, kind);
        } else if self.shared.mailbox(root).is_some() {
            let body = Control::ReduceDown {
                coll,
                seq,
                shape,
                value,
                kind,
                for_subscriber: false,
            };
            self.send(root, Envelope::new(0, body));
        } else {
            let encoded = (kind.encode)(&*value);
            self.send_result_remote(false, coll, seq, shape, root, encoded);
        }
    }

    /// Adds a contribution (from a local element, or a child PE's partial) to reduction `seq` of
    /// `coll`; forwards or delivers the result once complete.
    pub(crate) fn reduce(&self, coll: CollectionId, seq: u64, shape: Shape, incoming: Incoming) {
        let complete = {
            let mut table = self.reductions.borrow_mut();
            let p = match table.pending.entry((coll, seq)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    // `membership` reads other tables than this one.
                    let Some((local, members)) = self.membership(coll, &shape) else {
                        // A sparse array before `done_inserting`: counts are not known yet.
                        return self.wait_for_seal(coll, seq, shape, incoming);
                    };
                    let place = tree_place(&members, self.pe, self.shared.local_pes());
                    let expected = local + place.children.len();
                    v.insert(Pending {
                        got: 0,
                        expected,
                        place,
                        part: None,
                        raw: Vec::new(),
                    })
                }
            };
            p.got += 1;
            // A user's reducer, or `Deserialize` of a partial, that panics must end the job with
            // a message (not unwind through this table and leave the reduction hanging).
            let merged = crate::panic::catching("combining a contribution", || {
                match incoming {
                    Incoming::Typed(part) => merge(p, part),
                    Incoming::Encoded(raws) => {
                        p.raw.extend(raws);
                        Ok(())
                    }
                }
                .and_then(|()| decode_raw(p))
            });
            if let Err(e) = merged {
                drop(table);
                return self.abort_job(format!("charmrs: {}: {e}", describe(coll, seq, &shape)));
            }
            if p.got == p.expected {
                table.pending.remove(&(coll, seq))
            } else {
                None
            }
        };
        let Some(done) = complete else { return };
        if done.place.parent.is_some() {
            self.finish_here(coll, seq, shape, done);
            return;
        }
        // At the root: results leave in reduction order. (Reduction k + 1 can complete first
        // when an element contributes, moves to a third PE and contributes again: its two
        // contributions then travel on different channels.) One this PE cannot decode goes to
        // be finished elsewhere at once; its report takes its place in the order.
        if done.part.is_none() {
            if let Some(asked) = self.finish_here(coll, seq, shape, done) {
                self.reductions
                    .borrow_mut()
                    .finishing_elsewhere
                    .insert((coll, seq), asked as u32);
            }
            return;
        }
        self.reductions
            .borrow_mut()
            .ready_at_root
            .insert((coll, seq), AtRoot::Complete(shape, Box::new(done)));
        self.release_at_root(coll);
    }

    /// At the root of `coll`'s tree: delivers the results that are next in order.
    fn release_at_root(&self, coll: CollectionId) {
        loop {
            let (seq, ready) = {
                let mut table = self.reductions.borrow_mut();
                let next = *table.next_at_root.entry(coll).or_insert(0);
                let Some(ready) = table.ready_at_root.remove(&(coll, next)) else {
                    return;
                };
                table.next_at_root.insert(coll, next + 1);
                (next, ready)
            };
            match ready {
                AtRoot::Complete(shape, done) => {
                    self.finish_here(coll, seq, shape, *done);
                }
                AtRoot::FinishedElsewhere(Some(routed)) => {
                    crate::callback::send_routed(self, *routed)
                }
                AtRoot::FinishedElsewhere(None) => {}
            }
        }
    }

    /// At the root: PE `from` finished reduction `seq`, which this PE asked it to with
    /// `Control::ReduceFinish`; `call`: its result's call for an entry target, sent from here
    /// in order with the collection's other results.
    pub(crate) fn finished_elsewhere(
        &self,
        coll: CollectionId,
        seq: u64,
        from: u32,
        call: Option<Box<crate::callback::Routed>>,
    ) {
        let asked = self
            .reductions
            .borrow_mut()
            .finishing_elsewhere
            .remove(&(coll, seq));
        if asked != Some(from) {
            return self.abort_job(format!(
                "charmrs: PE {from} told PE {} that it finished reduction #{seq} over {coll:?}, \
                 which PE {} had not asked it to",
                self.pe, self.pe
            ));
        }
        if let Some(to) = call.as_ref().and_then(|c| c.to) {
            if to as usize >= self.num_pes() {
                return self.abort_job(format!(
                    "charmrs: PE {from} finished reduction #{seq} over {coll:?} with a call for \
                     unknown PE {to} (the job has {} PEs)",
                    self.num_pes()
                ));
            }
        }
        self.reductions
            .borrow_mut()
            .ready_at_root
            .insert((coll, seq), AtRoot::FinishedElsewhere(call));
        self.release_at_root(coll);
    }

    /// A reduction complete on this PE: its partial goes up the tree, or (at the root) its result
    /// is delivered. Returns the PE asked to finish it when, at the root, this PE could not
    /// decode it; that PE reports back with `Control::ReduceFinished`.
    fn finish_here(
        &self,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        done: Pending,
    ) -> Option<usize> {
        let Some(part) = done.part else {
            // Everything here came encoded from other processes (this PE's elements all live
            // elsewhere): pass it on as it is.
            let raws = done.raw;
            let Some(first) = raws.first().map(|r| r.origin as usize) else {
                self.abort_job(format!(
                    "charmrs: {}: PE {} completed without any contribution",
                    describe(coll, seq, &shape),
                    self.pe
                ));
                return None;
            };
            let (to, finish) = match done.place.parent {
                Some(parent) => (parent, false),
                None => (first, true),
            };
            if self.shared.mailbox(to).is_some() {
                let body = encoded_partials(finish, coll, seq, shape, raws, self.pe as u32);
                self.send(to, Envelope::new(crate::envelope::MIGRATION_ORDER, body));
            } else {
                self.send_raws_remote(finish, coll, seq, shape, to, Ok(raws));
            }
            return finish.then_some(to);
        };
        match done.place.parent {
            Some(parent) => self.send_part_up(coll, seq, shape, parent, part),
            None => self.deliver_result(coll, seq, shape, part),
        }
        None
    }

    /// Sends an encoded allreduce result (`for_subscriber`: a subscriber's copy) to PE `to` of
    /// another process; on failure aborts the job and returns `false`.
    fn send_result_remote(
        &self,
        for_subscriber: bool,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        to: usize,
        encoded: Result<Vec<u8>, String>,
    ) -> bool {
        let msg = encoded.and_then(|bytes| {
            crate::wire::allreduce_result_message(
                for_subscriber,
                coll,
                seq,
                shape,
                self.pe as u32,
                to as u32,
                bytes,
            )
        });
        self.send_reduction_message(to, msg, || describe(coll, seq, &shape))
    }

    fn deliver_result(&self, coll: CollectionId, seq: u64, shape: Shape, part: Part) {
        let kind = part.kind;
        let value = (kind.finish)(part.data);
        match part.target {
            TargetSpec::Everyone => self.reduce_down(coll, seq, shape, value, kind),
            TargetSpec::Balance => self.start_balancing(coll, value),
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
            TargetSpec::Everyone | TargetSpec::Balance => {
                unreachable!("allreduce and at_sync results are handled at the root")
            }
        }
    }

    /// An allreduce result that arrived encoded from the parent PE in another process.
    pub(crate) fn reduce_down_encoded(
        &self,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        bytes: bytes::Bytes,
    ) {
        let kind = self
            .reductions
            .borrow()
            .everyone
            .get(&(coll, seq))
            .and_then(|e| e.1);
        let Some(kind) = kind else {
            // No contributor here (the tree's root when every element of its process left):
            // pass the result on as it came.
            return self.pass_down_encoded(coll, seq, shape, bytes);
        };
        let decoded =
            crate::panic::catching("decoding the result", || (kind.decode_result)(&bytes))
                .map(|v| (v, kind));
        match decoded {
            Ok((value, kind)) => self.reduce_down(coll, seq, shape, value, kind),
            Err(e) => self.abort_job(format!("charmrs: {}: {e}", describe(coll, seq, &shape))),
        }
    }

    /// This PE's children in the reduction tree, for a result on its way down (`None`, after
    /// aborting the job, if the collection's membership is not known).
    fn down_children(&self, coll: CollectionId, seq: u64, shape: &Shape) -> Option<Vec<usize>> {
        let Some((_, members)) = self.membership(coll, shape) else {
            self.abort_job(format!(
                "charmrs: {}: a result came down before the array was sealed",
                describe(coll, seq, shape)
            ));
            return None;
        };
        Some(tree_place(&members, self.pe, self.shared.local_pes()).children)
    }

    /// Passes an encoded allreduce result down the tree from a PE that has no contributors.
    fn pass_down_encoded(&self, coll: CollectionId, seq: u64, shape: Shape, bytes: bytes::Bytes) {
        let Some(children) = self.down_children(coll, seq, &shape) else {
            return;
        };
        let extras = self.allreduce_extras(coll, seq);
        self.reductions.borrow_mut().everyone.remove(&(coll, seq));
        let subscribers = extras.into_iter().map(|pe| (pe, true));
        for (to, for_subscriber) in children
            .into_iter()
            .map(|pe| (pe, false))
            .chain(subscribers)
        {
            if self.shared.mailbox(to).is_some() {
                let body = Control::ReduceDownEncoded {
                    coll,
                    seq,
                    shape,
                    bytes: bytes.clone(),
                    for_subscriber,
                };
                self.send(to, Envelope::new(0, body));
            } else if !self.send_result_remote(
                for_subscriber,
                coll,
                seq,
                shape,
                to,
                Ok(bytes.to_vec()),
            ) {
                return;
            }
        }
    }

    /// Hands an allreduce result to this PE's contributors and passes it down the tree (and to
    /// the subscribers registered here).
    pub(crate) fn reduce_down(
        &self,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        value: Box<dyn Any + Send>,
        kind: Kind,
    ) {
        let Some(children) = self.down_children(coll, seq, &shape) else {
            return;
        };
        let extras = self.allreduce_extras(coll, seq);
        let subscribers = extras.into_iter().map(|pe| (pe, true));
        // Encoded once, for however many children in other processes.
        let mut encoded: Option<Result<Vec<u8>, String>> = None;
        for (to, for_subscriber) in children
            .into_iter()
            .map(|pe| (pe, false))
            .chain(subscribers)
        {
            if self.shared.mailbox(to).is_some() {
                let value = (kind.clone)(&*value);
                let body = Control::ReduceDown {
                    coll,
                    seq,
                    shape,
                    value,
                    kind,
                    for_subscriber,
                };
                self.send(to, Envelope::new(0, body));
                continue;
            }
            let bytes = encoded
                .get_or_insert_with(|| (kind.encode)(&*value))
                .clone();
            if !self.send_result_remote(for_subscriber, coll, seq, shape, to, bytes) {
                return;
            }
        }
        let futures = self
            .reductions
            .borrow_mut()
            .everyone
            .remove(&(coll, seq))
            .unwrap_or_default()
            .0;
        self.fulfil_allreduce_futures(futures, &*value, kind);
    }

    /// A subscriber's copy of allreduce `seq`'s result (typed, or still encoded): fulfils this
    /// PE's contributors' futures and goes no further.
    ///
    /// A PE that is in the reduction tree may get both this copy and the tree's (it subscribed
    /// before it knew it was a member): whichever comes first fulfils the futures; this copy
    /// leaves the tree's work (its children, the subscribers registered here) to the tree's. A
    /// PE that does not know its membership yet is outside the tree: a member's partial cannot
    /// have gone up, nor the result come down, before it knew.
    pub(crate) fn subscribed_result(
        &self,
        coll: CollectionId,
        seq: u64,
        shape: Shape,
        value: Result<(Box<dyn Any + Send>, Kind), bytes::Bytes>,
    ) {
        let member = matches!(self.homes_here(coll, &shape), Some(n) if n > 0);
        let waiting = {
            let mut r = self.reductions.borrow_mut();
            if member {
                r.everyone
                    .get_mut(&(coll, seq))
                    .map(|e| (std::mem::take(&mut e.0), e.1))
            } else {
                r.everyone.remove(&(coll, seq)).map(|e| (e.0, e.1))
            }
        };
        let Some((futures, Some(kind))) = waiting else {
            return; // the tree's copy came first, or this PE has no contributor
        };
        if futures.is_empty() {
            return;
        }
        let (value, kind) = match value {
            Ok(typed) => typed,
            Err(bytes) => {
                match crate::panic::catching("decoding the result", || (kind.decode_result)(&bytes))
                {
                    Ok(value) => (value, kind),
                    Err(e) => {
                        return self
                            .abort_job(format!("charmrs: {}: {e}", describe(coll, seq, &shape)))
                    }
                }
            }
        };
        self.fulfil_allreduce_futures(futures, &*value, kind);
    }

    fn fulfil_allreduce_futures(
        &self,
        futures: Vec<(u32, u64)>,
        value: &(dyn Any + Send),
        kind: Kind,
    ) {
        for (pe, id) in futures {
            debug_assert_eq!(
                pe as usize, self.pe,
                "allreduce futures belong to their contributor"
            );
            self.fulfil_local(id, Ok((kind.clone)(value)));
        }
    }
}

/// Folds a typed contribution into the pending reduction.
fn merge(p: &mut Pending, part: Part) -> Result<(), String> {
    match p.part.as_mut() {
        None => {
            p.part = Some(part);
            Ok(())
        }
        Some(acc) if acc.kind.type_id != part.kind.type_id => Err(format!(
            "a contribution of type {} does not match the earlier {}",
            part.kind.type_name, acc.kind.type_name
        )),
        Some(acc) if acc.kind.operation != part.kind.operation => Err(format!(
            "a contribution with {} does not match the earlier one with {}",
            part.kind.operation, acc.kind.operation
        )),
        Some(acc) if acc.target.digest() != part.target.digest() => Err(format!(
            "a contribution for {} does not match the earlier one for {}: every contribution \
             to one reduction must name the same target",
            part.target.describe(),
            acc.target.describe()
        )),
        Some(acc) => (acc.kind.combine)(&mut acc.data, part.data, acc.kind.op()),
    }
}

/// Decodes and folds the encoded partials once a typed contribution says how.
fn decode_raw(p: &mut Pending) -> Result<(), String> {
    let Some(acc) = p.part.as_mut() else {
        return Ok(());
    };
    let target = acc.target.digest();
    for raw in p.raw.drain(..) {
        if raw.target != target {
            return Err(format!(
                "a partial from PE {} names another target than {}: every contribution to one \
                 reduction must name the same target",
                raw.origin,
                acc.target.describe()
            ));
        }
        let value = (acc.kind.decode_part)(&raw.bytes)
            .map_err(|e| format!("a partial from PE {}: {e}", raw.origin))?;
        (acc.kind.combine)(&mut acc.data, value, acc.kind.op())?;
    }
    Ok(())
}

#[cfg(test)]
mod tree_tests {
    use super::*;
    use crate::index::Index;

    /// Every member reaches the root exactly once, and each process sends one partial up.
    #[test]
    fn the_tree_combines_inside_processes_first() {
        for (num_pes, ppn, elements) in [(8, 2, 8), (12, 3, 5), (16, 1, 16), (6, 6, 4), (9, 3, 20)]
        {
            let shape = Shape::Array {
                dims: Index::new(&[elements]).unwrap(),
                map: None,
            };
            let members = shape.member_pes(num_pes);
            let places: Vec<(usize, TreePlace)> = members
                .iter()
                .map(|&m| (m, tree_place(&members, m, ppn)))
                .collect();
            let roots: Vec<usize> = places
                .iter()
                .filter(|(_, p)| p.parent.is_none())
                .map(|(m, _)| *m)
                .collect();
            assert_eq!(roots, vec![members[0]]);
            for (m, place) in &places {
                if let Some(parent) = place.parent {
                    let (_, pp) = places.iter().find(|(x, _)| *x == parent).unwrap();
                    assert!(pp.children.contains(m), "{m} → {parent}");
                    if parent / ppn != m / ppn {
                        // Only leaders talk across processes.
                        assert!(places.iter().all(|(o, _)| *o / ppn != m / ppn || *o >= *m));
                    }
                }
            }
            let edges: usize = places.iter().map(|(_, p)| p.children.len()).sum();
            assert_eq!(edges, members.len() - 1, "a tree");
        }
    }
}

#[cfg(test)]
mod podvec_tests {
    use super::*;
    use crate::PodVec;

    /// A kept (shared) vector is never written: the sum goes into the other operand when that
    /// one can be written in place, else into a copy.
    #[test]
    fn a_shared_operand_is_left_as_it_was() {
        let kept = PodVec::from(vec![1.0f64, 2.0, 3.0]);
        let mut acc = kept.clone();
        acc.reduce(PodVec::from(vec![10.0, 20.0, 30.0]), Reducer::Sum)
            .unwrap();
        assert_eq!(acc.as_slice(), &[11.0, 22.0, 33.0]);
        assert_eq!(kept.as_slice(), &[1.0, 2.0, 3.0]);
        let other = kept.clone();
        acc.reduce(other, Reducer::Max).unwrap();
        assert_eq!(acc.as_slice(), &[11.0, 22.0, 33.0]);
        let mut both_shared = kept.clone();
        both_shared.reduce(kept.clone(), Reducer::Product).unwrap();
        assert_eq!(both_shared.as_slice(), &[1.0, 4.0, 9.0]);
        assert_eq!(kept.as_slice(), &[1.0, 2.0, 3.0]);
        let e = acc
            .reduce(PodVec::from(vec![1.0]), Reducer::Sum)
            .unwrap_err();
        assert!(e.contains("lengths differ (3 and 1)"), "{e}");
        let mut bits = PodVec::from(vec![0b1100u32]);
        bits.reduce(PodVec::from(vec![0b1010u32]), Reducer::BitXor)
            .unwrap();
        assert_eq!(bits.as_slice(), &[0b0110]);
        assert!(!<PodVec<f64> as Reduce>::supports(Reducer::BitOr));
    }

    /// Every reducer over vectors of numbers matches the same reducer element by element, and
    /// one that does not apply is named.
    #[test]
    fn vector_reducers_match_the_scalar_ones() {
        let a: Vec<i32> = vec![3, -7, 12, 0, i32::MAX];
        let b: Vec<i32> = vec![5, 2, -12, 9, 1];
        for op in [
            Reducer::Sum,
            Reducer::Product,
            Reducer::Max,
            Reducer::Min,
            Reducer::BitAnd,
            Reducer::BitOr,
            Reducer::BitXor,
        ] {
            let mut v = a.clone();
            v.reduce(b.clone(), op).unwrap();
            let mut p = PodVec::from(a.clone());
            p.reduce(PodVec::from(b.clone()), op).unwrap();
            let want: Vec<i32> = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| {
                    let mut x = x;
                    x.reduce(y, op).unwrap();
                    x
                })
                .collect();
            assert_eq!((&v, p.as_slice()), (&want, &want[..]), "{op:?}");
        }
        let mut f = vec![1.5f64, f64::NAN, -0.5];
        f.reduce(vec![2.0, 1.0, -3.0], Reducer::Min).unwrap();
        assert_eq!(f, vec![1.5, 1.0, -3.0]);
        let e = f.reduce(vec![0.0; 3], Reducer::BitOr).unwrap_err();
        assert!(e.contains("BitOr") && e.contains("f64"), "{e}");
        let e = PodVec::from(vec![1u8])
            .reduce(PodVec::from(vec![1u8]), Reducer::LogicalAnd)
            .unwrap_err();
        assert!(e.contains("LogicalAnd") && e.contains("u8"), "{e}");
    }
}
