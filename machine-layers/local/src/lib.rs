//! The in-process machine layer of charmrs: the default, needing no system library.
//!
//! A charmrs process runs one OS thread per PE. Inside a process, PEs exchange messages through
//! [`Mailbox`]es: moved Rust values, never serialized. This crate owns those mailboxes and the
//! [`LocalLayer`], the [`MachineLayer`](charmrs_transport::MachineLayer) of a job that is a single
//! process (so it has no peer to talk to; its only traffic is loopback).

mod layer;
mod mailbox;

pub use layer::LocalLayer;
pub use mailbox::Mailbox;
