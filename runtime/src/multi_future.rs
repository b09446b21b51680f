//! [`MultiFuture<T>`]: a future that takes a given number of values from any PEs and yields them
//! together (charm4py's `Future(num_vals=n)` / `charm.createFuture(senders=n)`).
//!
//! It is a [`Future`] slot of the owner PE's table with a collector (see `future.rs`): each
//! [`send`](MultiFuture::send), local or from another process, adds one value; the slot turns
//! ready when the announced number has arrived. Invariants: the values come out in arrival order;
//! a value beyond the announced number aborts the job naming the future; the sending side is an
//! ordinary [`Future<T>`] handle ([`MultiFuture::sender`]), so an entry that takes a `Future<T>`
//! serves both kinds, and awaiting that handle instead of the `MultiFuture` panics naming it.

use crate::chare::Payload;
use crate::error::Result;
use crate::future::{poll_owned, take_value, CollectedValues, Expect, Future};
use crate::scheduler::with_pe;
use serde::{Deserialize, Serialize};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A future that collects `n` values of type `T`, sent from any PEs, and yields them as a
/// `Vec<T>` in arrival order: charm4py's `Future(num_vals=n)`.
///
/// Made on a PE with [`MultiFuture::new`], awaited there (`.await` yields `Vec<T>`, once all `n`
/// values have arrived). The senders get its sending side, [`sender`](MultiFuture::sender): a
/// plain [`Future<T>`] whose every [`send`](Future::send) adds one value, so an entry that takes a
/// `Future<T>` works with either kind. A `MultiFuture` is itself an ordinary argument too.
/// Sending more than `n` values aborts the job with a message naming the future.
///
/// ```
/// use charmrs::prelude::*;
///
/// struct Worker;
///
/// #[chare]
/// impl Worker {
///     fn new() -> Self { Worker }
///
///     #[entry]
///     fn report(&mut self, ctx: &Ctx<Self>, to: Future<usize>) {
///         to.send(ctx.index::<usize>() * 10);
///     }
/// }
///
/// let code = charmrs::Runtime::new(2).run(|_| async {
///     let workers = Array::<Worker, usize>::new(4, ());
///     let all = MultiFuture::<usize>::new(4);
///     workers.report(all.sender());                  // every element sends one value
///     let mut got = all.await;                       // arrival order
///     got.sort();
///     assert_eq!(got, [0, 10, 20, 30]);
///     charmrs::exit(0);
/// }).unwrap();
/// assert_eq!(code, 0);
/// ```
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
#[must_use = "a multi-value future does nothing unless its values are sent and it is awaited"]
pub struct MultiFuture<T> {
    /// The slot, as its sending side travels.
    sender: Future<T>,
}

impl<T> Clone for MultiFuture<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for MultiFuture<T> {}

impl<T> std::fmt::Debug for MultiFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Multi{:?}", self.sender)
    }
}

impl<T: Payload> MultiFuture<T> {
    /// A new multi-value future owned by the calling PE, ready once `senders` values have
    /// arrived (at once for 0).
    ///
    /// # Panics
    /// Outside a running PE.
    pub fn new(senders: usize) -> MultiFuture<T> {
        let id = with_pe("MultiFuture::new", |pe| {
            pe.futures.borrow_mut().create_multi(senders)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        MultiFuture {
            sender: Future::from_id(id),
        }
    }

    /// Its sending side: a [`Future<T>`] to pass to the senders, whose every `send` adds one
    /// value. Await the `MultiFuture`, not this handle.
    pub fn sender(&self) -> Future<T> {
        self.sender
    }

    /// Adds one value, from any PE (the same as `self.sender().send(value)`).
    ///
    /// # Panics
    /// Outside a running PE.
    pub fn send(&self, value: T) {
        self.sender.send(value);
    }

    /// The PE that owns (and may await) the future.
    pub fn owner(&self) -> usize {
        self.sender.owner()
    }

    /// Whether all its values have arrived (on the owner PE; `false` elsewhere).
    pub fn is_ready(&self) -> bool {
        self.sender.is_ready()
    }

    /// Awaits the values, or the first remote error that replaced one of them.
    pub fn result(self) -> MultiFutureResult<T> {
        MultiFutureResult { future: self }
    }
}

/// Awaiting a [`MultiFuture`] through [`MultiFuture::result`].
#[must_use = "futures do nothing unless awaited"]
pub struct MultiFutureResult<T> {
    future: MultiFuture<T>,
}

impl<T: Payload> std::future::Future for MultiFutureResult<T> {
    type Output = Result<Vec<T>>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<T>>> {
        let f = self.future;
        match poll_owned(&f, f.sender.parts(), cx, Expect::Collected) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(all)) => {
                let all = all
                    .downcast::<CollectedValues>()
                    .unwrap_or_else(|_| panic!("{f:?}: its slot holds no collected values"));
                Poll::Ready(Ok(all
                    .into_iter()
                    .map(|v| take_value::<T>(v).unwrap_or_else(|e| panic!("{f:?} received {e}")))
                    .collect()))
            }
        }
    }
}

/// Awaiting a [`MultiFuture`] directly yields its values.
pub struct MultiFutureValues<T> {
    inner: MultiFutureResult<T>,
}

impl<T: Payload> std::future::Future for MultiFutureValues<T> {
    type Output = Vec<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<T>> {
        match Pin::new(&mut self.inner).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(v)) => Poll::Ready(v),
            Poll::Ready(Err(e)) => panic!("awaited multi-value future failed: {e}"),
        }
    }
}

impl<T: Payload> std::future::IntoFuture for MultiFuture<T> {
    type Output = Vec<T>;
    type IntoFuture = MultiFutureValues<T>;
    fn into_future(self) -> MultiFutureValues<T> {
        MultiFutureValues {
            inner: self.result(),
        }
    }
}
