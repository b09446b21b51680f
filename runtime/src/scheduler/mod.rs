//! The per-PE scheduler: one pinned OS thread per PE, each with a mailbox fed by the other PEs, a
//! local priority queue, a local executor for futures, and a dispatch loop that parks when idle.

mod comm;
mod ending;
mod executor;
mod pe;
mod queue;
mod shared;

pub(crate) use comm::poll_network;
pub(crate) use ending::{finish_job, ENDING_WAIT};
pub(crate) use pe::{
    on_pe, run_pe, with_pe, AbortUnwind, LocalCollection, Mobility, PeState, TimerKey, TASK_SITE,
};
pub(crate) use shared::{Outcome, Shared};
