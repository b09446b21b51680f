//! # charmrs — distributed migratable objects for Rust
//!
//! charmrs implements the programming model of CharmPy / Charm++: a program is a set of *chares*
//! (distributed objects) that interact only through asynchronous remote method invocation on
//! *proxies*. Chares live in collections — single chares, [`Group`]s (one per PE) and N-d
//! [`Array`]s — and a chare type is usable in any of them. Each PE is an OS thread with its own
//! message-driven scheduler; a chare's entry methods always run on the PE that holds it, one at a
//! time, so chare state needs no locks.
//!
//! ```no_run
//! use charmrs::prelude::*;
//!
//! struct Hello;
//!
//! #[chare]
//! impl Hello {
//!     fn new() -> Self {
//!         Hello
//!     }
//!
//!     #[entry]
//!     fn say_hi(&mut self, ctx: &Ctx<Self>, msg: String) {
//!         println!("{msg} from PE {}", ctx.my_pe());
//!         charmrs::exit(0);
//!     }
//! }
//!
//! fn main() {
//!     charmrs::start(|_args| async move {
//!         let proxy = Single::<Hello>::new((), None); // created on a PE the runtime picks
//!         proxy.say_hi("Hello".to_string());          // asynchronous remote invocation
//!     })
//! }
//! ```
//!
//! `#[chare]` also generates a trait `HelloProxy` whose methods (`say_hi`, `say_hi_callback`)
//! every proxy to `Hello` has; like any trait, it must be in scope where they are called (it is in
//! the module of the `#[chare]` block; elsewhere, `use path::to::HelloProxy;`).
//!
//! # The forms of a chare
//!
//! Besides `fn new` and `#[entry] fn m(&mut self, …)`, a `#[chare]` block may have: a suspendable
//! constructor `async fn new(ctx: Ctx<Self>, …)` (calls wait until it returns); `&self` entries;
//! entries that return a value (read with `ret()` / `gather()`); `#[entry(when = "…")]`
//! conditions; suspendable entries `async fn m(this: Coro<Self>, …)`; and, in a
//! `#[chare(migratable)]` block (state `Serialize + Deserialize`), a `fn migrated` hook. Each
//! entry `m` also gets `m_callback()` on proxies: the entry as a [`Callback`] value.
//!
//! ```
//! use charmrs::prelude::*;
//!
//! #[derive(Serialize, Deserialize)]       // a migratable chare's state travels serialized
//! struct Cell { iter: u32, sum: u64 }
//!
//! #[chare(migratable)]
//! impl Cell {
//!     // Suspendable constructor: the context by value; calls wait until it returns.
//!     async fn new(ctx: Ctx<Self>, start: u64) -> Self {
//!         charmrs::sleep(std::time::Duration::from_millis(1)).await;
//!         Cell { iter: 0, sum: start + ctx.index::<usize>() as u64 }
//!     }
//!
//!     // Runs on the new PE after a move, before any call is delivered there.
//!     fn migrated(&mut self, ctx: &Ctx<Self>) {
//!         let me = ctx.index::<usize>() as u64;
//!         assert_eq!(self.sum, 10 + me + self.iter as u64); // the state came along
//!     }
//!
//!     #[entry]
//!     fn hop(&mut self, ctx: &Ctx<Self>) {
//!         ctx.migrate((ctx.my_pe() + 1) % ctx.num_pes()).unwrap(); // once this entry returns
//!     }
//!
//!     // Delivered only once the condition holds: in iteration order, however they arrive.
//!     #[entry(when = "self.iter == iter")]
//!     fn step(&mut self, iter: u32, x: u64) {
//!         self.sum += x;
//!         self.iter += 1;
//!     }
//!
//!     // `&self`, and a value for a caller that asks for it.
//!     #[entry]
//!     fn sum(&self) -> u64 {
//!         self.sum
//!     }
//!
//!     // Suspendable: the element's other entries run while it waits.
//!     #[entry]
//!     async fn finish(this: Coro<Self>, steps: u32, report: Callback<(u64,)>) {
//!         this.wait(|s| s.iter == steps).await;
//!         let sum = this.with(|s, _ctx| s.sum);
//!         this.ctx().contribute(sum, Reducer::Sum, report);
//!     }
//!
//!     #[entry]
//!     fn report(&mut self, total: u64) {
//!         assert_eq!(total, 4 * 13 + (1 + 2 + 3));
//!         charmrs::exit(0);
//!     }
//! }
//!
//! fn main() {
//!     charmrs::Runtime::new(2).run(|_| async {
//!         let cells = Array::<Cell, usize>::new(4, (10,));
//!         cells.hop();                                     // a broadcast: every element moves
//!         for iter in [2, 1, 0] {
//!             cells.step(iter, 1);                         // `when` delivers 0, 1, 2
//!         }
//!         let one: u64 = cells.at(1).ret().sum().await;    // one element's return value
//!         assert!(one >= 11);
//!         let all: Vec<u64> = cells.gather().sum().await;  // every element's, by index
//!         assert_eq!(all.len(), 4);
//!         cells.finish(3, cells.at(0).report_callback());  // entry `report` of element 0
//!     }).unwrap();
//! }
//! ```
//!
//! Coming from charm4py: `Chare(C, onPE=p)` is [`Single::new`], `Group(C)` is [`Group::new`],
//! `Array(C, dims)` is [`Array::new`], `proxy[i]` is `proxy.at(i)`, `self.thisIndex` is
//! [`Ctx::index`], `self.thisProxy` is [`Ctx::this_proxy`], `charm.myPe()` is [`my_pe`],
//! `charm.exit()` is [`exit`], `charm.iwait` is [`iwait`], `charm.pool` is [`pool`],
//! `charm.waitQD()` is [`wait_qd`]. Arguments are moved to the receiver when it is in the same
//! process (charm4py's "give up ownership" rule, enforced by the compiler) and serialized
//! otherwise. The user guide (`docs/user-guide.md` in the repository, "Coming from charm4py") maps
//! every charm4py concept, and says which have no counterpart.

// `#[chare]` writes `::charmrs::…` paths; the runtime's own chare (the checkpoint group) uses them.
extern crate self as charmrs;

mod array_map;
mod balance;
mod buffer_mut;
mod build_id;
mod callback;
mod channel;
mod chare;
mod checkpoint;
mod collection;
mod ctx;
mod element;
mod envelope;
mod error;
mod future;
mod group_on_pes;
mod hosts;
mod index;
mod local_branch;
mod machine;
mod measure;
mod migration;
mod multi_future;
mod multicast;
mod nodes;
mod options;
mod panic;
mod pod_vec;
mod pool;
mod proxy;
mod quiescence;
mod readonly;
mod reduction;
pub mod registry;
mod runtime;
mod scheduler;
mod section;
mod sleep;
mod sparse;
mod trace;
mod when;
mod wire;

pub use array_map::{ArrayMap, MapId, PlaceFn};
pub use buffer_mut::{BufferMut, HUGE_FROM, IDLE_HUGE_BYTES};
pub use callback::{Callback, CallbackDest};
pub use channel::{Channel, Recv};
pub use chare::{Chare, Constructed, Entry, Invoked, Payload};
pub use charmrs_macros::{chare, task};
pub use checkpoint::{checkpoint, restore, Saved};
pub use collection::{CollectionId, Shape, MAX_DENSE_ELEMENTS};
pub use ctx::Ctx;
pub use element::{Coro, WaitFor};
pub use error::{Error, Result};
pub use future::{iwait, wait_all, wait_any, Future, FutureResult, FutureValue, Iwait};
pub use hosts::{host_pes, my_host, num_hosts, pe_host};
pub use index::{ArrayIndex, Index, KEY_DIMS, MAX_DIMS, MAX_KEY_BYTES};
pub use measure::{pe_times, PeTimes};
pub use multi_future::{MultiFuture, MultiFutureResult, MultiFutureValues};
pub use nodes::{my_node, my_rank, node_pes, num_nodes, pe_node};
pub use options::{Options, OPTIONS};
pub use pod_vec::{Pod, PodVec, IN_PLACE_MIN};
pub use pool::{pool, AsyncTask, MapOptions, Pool, SyncTask, TaskFn};
pub use proxy::{Array, ElementProxy, Gather, Group, Proxy, ProxyTarget, Ret, Single};
pub use quiescence::{start_qd, wait_qd, WAVE_GAP};
pub use readonly::Readonly;
pub use reduction::{CustomReducer, Reduce, Reducer, Target, BRANCHING};
pub use runtime::{abort, exit, in_runtime, my_pe, num_pes, start, Runtime, MAX_PES};
pub use section::{Section, SectionCtx};
pub use sleep::{schedule_after, sleep, Sleep};
pub use wire::Buffer;

/// The names most programs need: `use charmrs::prelude::*;`.
pub mod prelude {
    pub use crate::{
        chare, reducer, wait_all, wait_any, Array, ArrayIndex, Callback, Channel, Chare, Coro, Ctx,
        ElementProxy, Future, Group, Index, MultiFuture, Proxy, ProxyTarget, Reducer, Section,
        Single,
    };
    pub use serde::{Deserialize, Serialize};
}

/// Items used by code that `#[chare]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::array_map::MapRegistration;
    pub use crate::callback::CallbackMaker;
    pub use crate::channel::ChannelDeliver;
    pub use crate::chare::{pack_state, unpack_state};
    pub use crate::envelope::Reply;
    pub use crate::future::{decode_any, encode_value};
    pub use crate::pool::{TaskInfo, TaskRun};
    pub use crate::readonly::{ReadonlyInfo, ReadonlyStore};
    pub use crate::reduction::combine_custom;
    pub use crate::registry::{entry_id, Decoder, EntryInfo};
    pub use crate::when::hash_key;
    pub use crate::wire::{
        decode_call, decode_untrusted_frame, ConstructorCodec, EntryCodec, WireCall, WireConstruct,
    };
    pub use inventory;
}
