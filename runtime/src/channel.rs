//! Channels: ordered streams of values between two chares, used from suspendable entry methods
//! (charm4py's `Channel(self, remote)`, `ch.send(x)`, `ch.recv()`).
//!
//! # What this module owns
//!
//! * [`Channel`], one end of a channel: sends to the remote element, receives what the remote
//!   element sent on the same port.
//! * The per-element channel table ([`ChannelTable`]): for every (remote element, port) the next
//!   sequence number to send, the next one to receive, and the values that arrived ahead of it.
//! * [`ChannelDeliver`], the hidden entry method every chare type has (registered by `#[chare]`):
//!   a channel value travels as an ordinary entry call, so it follows its element wherever it
//!   migrates, crosses processes in the wire format, and counts for quiescence like any call.
//!
//! # Invariants
//!
//! * Values of one channel direction are received in the order they were sent, each exactly
//!   once, whatever order the calls carrying them arrive in (they may overtake each other when
//!   an element migrates): each carries its sequence number, and the receiver hands them out in
//!   sequence.
//! * The sequence numbers, and values that arrived but were not received yet, travel with the
//!   element when it migrates. A [`Channel`] made before a move belongs to the element's old
//!   place: using it afterwards panics, naming the channel (make channels again in the entry
//!   that runs after the move).
//! * A value received as a type other than the one it was sent as is an error, within a process
//!   and across processes alike: encoded values carry a tag of the sent type's name.
//!
//! Limits: the table keeps one entry per (remote element, port) an element ever used, so ports
//! are meant to name channels, not steps; a value sent to another process holds at most
//! [`MAX_VALUE_SEGMENTS`] zero-copy buffers.

use crate::chare::{Chare, Entry, Invoked, Payload};
use crate::collection::CollectionId;
use crate::element::Coro;
use crate::index::Index;
use crate::proxy::{ElementProxy, ProxyTarget};
use bytes::Bytes;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// An element, as a channel end names it.
type Endpoint = (CollectionId, Index);

/// One end of a channel between the element that made it and a remote element (which may be
/// itself). Made with [`Coro::channel`]; both ends must use the same port.
///
/// ```no_run
/// use charmrs::prelude::*;
///
/// struct Cell { left: Option<ElementProxy<Cell>> }
///
/// #[chare]
/// impl Cell {
///     fn new() -> Self { Cell { left: None } }
///
///     /// Passes a value around a ring of `n` elements, `rounds` times.
///     #[entry]
///     async fn ring(this: Coro<Self>, n: usize, rounds: u32) -> u64 {
///         let me: usize = this.ctx().index();
///         let array = this.ctx().this_proxy();
///         let to_right = this.channel(&array.at((me + 1) % n));
///         let from_left = this.channel(&array.at((me + n - 1) % n));
///         let mut value = 0u64;
///         for _ in 0..rounds {
///             if me == 0 {
///                 to_right.send(value + 1);
///                 value = from_left.recv::<u64>().await;
///             } else {
///                 value = from_left.recv::<u64>().await;
///                 to_right.send(value + 1);
///             }
///         }
///         value
///     }
/// }
/// # fn main() {}
/// ```
pub struct Channel<R> {
    table: Rc<RefCell<ChannelTable>>,
    me: Endpoint,
    remote: ElementProxy<R>,
    remote_id: Endpoint,
    port: u32,
    _remote: PhantomData<fn() -> R>,
}

impl<C: Chare> Coro<C> {
    /// A channel between this element and `remote` on port 0 (charm4py's `Channel(self,
    /// remote)`); the remote element makes the other end with a proxy to this one.
    pub fn channel<R: Chare>(&self, remote: &ElementProxy<R>) -> Channel<R> {
        self.channel_on_port(remote, 0)
    }

    /// Like [`channel`](Self::channel), on another port: several channels between the same two
    /// elements are told apart by their port numbers, which both ends choose alike.
    pub fn channel_on_port<R: Chare>(&self, remote: &ElementProxy<R>, port: u32) -> Channel<R> {
        let ctx = self.ctx();
        Channel {
            table: self.element().channel_table().clone(),
            me: (ctx.collection(), ctx.raw_index()),
            remote: *remote,
            remote_id: (remote.collection(), remote.index()),
            port,
            _remote: PhantomData,
        }
    }
}

impl<R: Chare> Channel<R> {
    /// Sends `value` to the remote end (charm4py's `ch.send(x)`); it arrives after everything
    /// sent on this channel before.
    ///
    /// # Panics
    /// Outside a running PE.
    pub fn send<T: Payload>(&self, value: T) {
        let key = (self.remote_id, self.port);
        let seq = {
            let table = self.table.borrow();
            if table.left {
                panic!("{}: used after its element migrated", self.describe());
            }
            table.sent.get(&key).copied().unwrap_or(0)
        };
        let message = ChannelMessage {
            from: self.me,
            port: self.port,
            seq,
            data: ChannelData::new(value),
        };
        ProxyTarget::<R>::send_entry::<ChannelDeliver>(&self.remote, (message,));
        // The number is used once the value is sent: a panic in its `Serialize` (sending to
        // another process) leaves no gap the receiver would wait on for ever.
        *self.table.borrow_mut().sent.entry(key).or_insert(0) += 1;
    }

    /// The next value the remote end sent on this channel (charm4py's `ch.recv()`). Await it in
    /// a suspendable entry method; other messages, of this element too, run meanwhile.
    ///
    /// The value must be of the type it was sent as: anything else panics, naming both types
    /// (within a process) or the decoding error (across processes), which aborts the job.
    pub fn recv<T: Payload>(&self) -> Recv<'_, R, T> {
        Recv {
            channel: self,
            _value: PhantomData,
        }
    }

    /// The remote end's element.
    pub fn remote(&self) -> ElementProxy<R> {
        self.remote
    }

    /// This channel's port.
    pub fn port(&self) -> u32 {
        self.port
    }

    fn describe(&self) -> String {
        format!(
            "channel with element {} of {:?} on port {}",
            self.remote_id.1, self.remote_id.0, self.port
        )
    }
}

/// Future returned by [`Channel::recv`].
#[must_use = "a channel receive does nothing unless awaited"]
pub struct Recv<'a, R, T> {
    channel: &'a Channel<R>,
    _value: PhantomData<fn() -> T>,
}

impl<R: Chare, T: Payload> std::future::Future for Recv<'_, R, T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let ch = self.channel;
        let data = {
            let mut table = ch.table.borrow_mut();
            if table.left {
                panic!("{}: used after its element migrated", ch.describe());
            }
            let inbound = table.received.entry((ch.remote_id, ch.port)).or_default();
            match inbound.arrived.remove(&inbound.next) {
                Some(data) => {
                    inbound.next += 1;
                    data
                }
                None => {
                    if !inbound.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                        inbound.waiters.push(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        };
        match data.into_value::<T>() {
            Ok(value) => Poll::Ready(value),
            Err(e) => panic!("{}: {e}", ch.describe()),
        }
    }
}

/// The channel state of one element; see the module docs.
#[derive(Default)]
pub(crate) struct ChannelTable {
    /// Next sequence number to send, per (remote element, port).
    sent: FxHashMap<(Endpoint, u32), u64>,
    /// Per (remote element, port): what arrived.
    received: FxHashMap<(Endpoint, u32), Inbound>,
    /// The element migrated away: its state went with it ([`leave`](Self::leave)).
    left: bool,
}

/// One incoming channel direction.
#[derive(Default)]
struct Inbound {
    /// Sequence number of the next value to hand out.
    next: u64,
    /// Values that arrived and were not received yet, by sequence number.
    arrived: BTreeMap<u64, ChannelData>,
    /// Coroutines waiting for the next value.
    waiters: Vec<Waker>,
}

/// One (remote element, port) of an element, carried by a migration: its sequence numbers and
/// the values that arrived but were not received yet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChannelEnd {
    pub(crate) remote: Endpoint,
    pub(crate) port: u32,
    pub(crate) next_send: u64,
    pub(crate) next_receive: u64,
    pub(crate) arrived: Vec<(u64, ChannelData)>,
}

/// Encodes the values of `ends` that are still values (for a migration to another process),
/// catching a panic in their `Serialize`.
pub(crate) fn encode_values(ends: &mut [ChannelEnd]) -> Result<(), String> {
    for end in ends {
        for (seq, data) in &mut end.arrived {
            let Repr::Value { value, ops } = &data.0 else {
                continue;
            };
            let encoded =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ops.encode)(&**value)))
                    .unwrap_or_else(|payload| Err(crate::panic::describe(payload)));
            let (bytes, segments) = encoded.map_err(|e| {
                format!(
                    "channel value #{seq} from element {} of {:?} on port {}: {e}",
                    end.remote.1, end.remote.0, end.port
                )
            })?;
            data.0 = Repr::Encoded {
                tag: (ops.tag)(),
                bytes: bytes.into(),
                segments,
                restored: false,
            };
        }
    }
    Ok(())
}

impl ChannelEnd {
    fn empty(remote: Endpoint, port: u32) -> ChannelEnd {
        ChannelEnd {
            remote,
            port,
            next_send: 0,
            next_receive: 0,
            arrived: Vec::new(),
        }
    }
}

/// Channel ends, one per (remote element, port) that was sent to or received from, in a fixed
/// order.
fn channel_ends(
    sent: impl IntoIterator<Item = ((Endpoint, u32), u64)>,
    received: impl IntoIterator<Item = ((Endpoint, u32), u64, Vec<(u64, ChannelData)>)>,
) -> Vec<ChannelEnd> {
    let mut all: BTreeMap<(Endpoint, u32), ChannelEnd> = BTreeMap::new();
    for ((remote, port), next) in sent {
        all.entry((remote, port))
            .or_insert_with(|| ChannelEnd::empty(remote, port))
            .next_send = next;
    }
    for ((remote, port), next, arrived) in received {
        let end = all
            .entry((remote, port))
            .or_insert_with(|| ChannelEnd::empty(remote, port));
        end.next_receive = next;
        end.arrived = arrived;
    }
    all.into_values().collect()
}

impl ChannelTable {
    /// The element is migrating: hands over its channel state (the table is unusable after).
    /// A receive still waiting here (its task let go of the element, which could then move)
    /// is woken, to fail naming the channel instead of waiting for ever.
    pub(crate) fn leave(&mut self) -> Vec<ChannelEnd> {
        self.left = true;
        let received = std::mem::take(&mut self.received)
            .into_iter()
            .map(|(key, inbound)| {
                // Waking only queues the task: it runs after the move, and sees `left`.
                inbound.waiters.into_iter().for_each(Waker::wake);
                (key, inbound.next, inbound.arrived.into_iter().collect())
            });
        channel_ends(std::mem::take(&mut self.sent), received)
    }

    /// The state [`leave`](Self::leave) would hand over, copied, the table still in use (for a
    /// checkpoint: values that arrived and were not received yet are part of the element).
    pub(crate) fn snapshot(&self) -> Vec<ChannelEnd> {
        let received = self.received.iter().map(|(&key, inbound)| {
            let arrived = inbound
                .arrived
                .iter()
                .map(|(&seq, data)| (seq, data.clone()))
                .collect();
            (key, inbound.next, arrived)
        });
        channel_ends(self.sent.clone(), received)
    }

    /// The table of an element that migrated in.
    pub(crate) fn arrived(ends: Vec<ChannelEnd>) -> ChannelTable {
        let mut table = ChannelTable::default();
        for end in ends {
            if end.next_send > 0 {
                table.sent.insert((end.remote, end.port), end.next_send);
            }
            if end.next_receive > 0 || !end.arrived.is_empty() {
                let inbound = Inbound {
                    next: end.next_receive,
                    arrived: end.arrived.into_iter().collect(),
                    waiters: Vec::new(),
                };
                table.received.insert((end.remote, end.port), inbound);
            }
        }
        table
    }

    /// A value arrived; wakes the receivers if it is the next one.
    fn arrive(&mut self, message: ChannelMessage) -> Result<(), String> {
        let inbound = self
            .received
            .entry((message.from, message.port))
            .or_default();
        if message.seq < inbound.next || inbound.arrived.contains_key(&message.seq) {
            return Err(format!(
                "value #{} of the channel with element {} of {:?} on port {} arrived twice",
                message.seq, message.from.1, message.from.0, message.port
            ));
        }
        let next = message.seq == inbound.next;
        inbound.arrived.insert(message.seq, message.data);
        if next {
            for waker in inbound.waiters.drain(..) {
                waker.wake();
            }
        }
        Ok(())
    }
}

/// A value on its way through a channel: the call that [`ChannelDeliver`] runs.
#[derive(Clone, Serialize, Deserialize)]
#[doc(hidden)]
pub struct ChannelMessage {
    from: Endpoint,
    port: u32,
    seq: u64,
    data: ChannelData,
}

/// A channel's value, of a type only the receiver names: the value itself within a process,
/// encoded bytes (and the zero-copy segments of buffers inside it) across processes.
pub(crate) struct ChannelData(Repr);

enum Repr {
    Value {
        value: Box<dyn Any + Send>,
        ops: &'static ValueOps,
    },
    Encoded {
        /// [`type_tag`] of the type it was sent as.
        tag: u64,
        bytes: Bytes,
        segments: Vec<Bytes>,
        /// Read back from a checkpoint: decoded as restored state is (proxies re-homed for
        /// this job, a future refused; see `checkpoint::rehoming`).
        restored: bool,
    },
}

/// A tag of type `T` for encoded values: the hash of its name (every process of a job runs the
/// same binary).
fn type_tag<T>() -> u64 {
    crate::registry::entry_id(std::any::type_name::<T>())
}

impl std::fmt::Debug for ChannelData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Repr::Value { ops, .. } => write!(f, "ChannelData({})", (ops.type_name)()),
            Repr::Encoded {
                bytes, segments, ..
            } => write!(
                f,
                "ChannelData({} bytes, {} segments)",
                bytes.len(),
                segments.len()
            ),
        }
    }
}

/// A value's bytes and the zero-copy segments they refer to.
type Encoded = (Vec<u8>, Vec<Bytes>);

/// What a channel value of one type can do, type-erased.
struct ValueOps {
    type_name: fn() -> &'static str,
    tag: fn() -> u64,
    clone: fn(&(dyn Any + Send)) -> Box<dyn Any + Send>,
    /// Encodes the value with its own segment collector: the bytes refer to the segments by
    /// their position in the returned list.
    encode: fn(&(dyn Any + Send)) -> Result<Encoded, String>,
}

/// The [`ValueOps`] of `T`.
struct OpsOf<T>(PhantomData<T>);

impl<T: Payload> OpsOf<T> {
    const OPS: ValueOps = ValueOps {
        type_name: std::any::type_name::<T>,
        tag: type_tag::<T>,
        clone: |v| Box::new(v.downcast_ref::<T>().expect("a T").clone()),
        encode: |v| {
            let value = v.downcast_ref::<T>().expect("a T");
            let (bytes, segments) =
                crate::wire::collecting(|| crate::wire::encode_onto(value, Vec::new()));
            Ok((bytes?, segments))
        },
    };
}

impl ChannelData {
    pub(crate) fn new<T: Payload>(value: T) -> ChannelData {
        ChannelData(Repr::Value {
            value: Box::new(value),
            ops: &OpsOf::<T>::OPS,
        })
    }

    /// Marks an encoded value read back from a checkpoint (see `Repr::Encoded::restored`).
    pub(crate) fn mark_restored(&mut self) {
        if let Repr::Encoded { restored, .. } = &mut self.0 {
            *restored = true;
        }
    }

    /// The value as a `T`, or why not.
    pub(crate) fn into_value<T: Payload>(self) -> Result<T, String> {
        match self.0 {
            Repr::Value { value, ops } => value.downcast::<T>().map(|v| *v).map_err(|_| {
                format!(
                    "received a {} but the receiver asked for a {}",
                    (ops.type_name)(),
                    std::any::type_name::<T>()
                )
            }),
            Repr::Encoded { tag, .. } if tag != type_tag::<T>() => Err(format!(
                "received a value sent as another type than the {} the receiver asked for",
                std::any::type_name::<T>()
            )),
            Repr::Encoded {
                bytes,
                segments,
                restored,
                ..
            } => {
                let decode =
                    || crate::wire::offering(segments, || crate::wire::decoded::<T>(&bytes));
                if restored {
                    crate::checkpoint::rehoming(decode)
                } else {
                    decode()
                }
            }
            .map_err(|e| format!("decoding it as a {}: {e}", std::any::type_name::<T>())),
        }
    }
}

impl Clone for ChannelData {
    fn clone(&self) -> Self {
        ChannelData(match &self.0 {
            Repr::Value { value, ops } => Repr::Value {
                value: (ops.clone)(&**value),
                ops,
            },
            Repr::Encoded {
                tag,
                bytes,
                segments,
                restored,
            } => Repr::Encoded {
                tag: *tag,
                bytes: bytes.clone(),
                segments: segments.clone(),
                restored: *restored,
            },
        })
    }
}

/// One zero-copy segment of an encoded value, as the enclosing message carries it.
struct Segment(Bytes);

impl Serialize for Segment {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        crate::wire::serialize_segment(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Segment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::wire::deserialize_segment(d).map(Segment)
    }
}

/// The most zero-copy segments one channel value sent to another process may carry (a message
/// has at most 256, shared with the call's arguments and the value's own bytes).
pub(crate) const MAX_VALUE_SEGMENTS: usize = 254;

impl Serialize for ChannelData {
    /// (type tag, the encoded value, its buffers, whether it was read back from a checkpoint):
    /// the value's bytes travel like any buffer (inline when small, as a segment of their own
    /// otherwise).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (tag, bytes, segments, restored) = match &self.0 {
            Repr::Value { value, ops } => {
                let (bytes, segments) =
                    (ops.encode)(&**value).map_err(crate::wire::custom_encode_error::<S::Error>)?;
                ((ops.tag)(), Bytes::from(bytes), segments, false)
            }
            Repr::Encoded {
                tag,
                bytes,
                segments,
                restored,
            } => (*tag, bytes.clone(), segments.clone(), *restored),
        };
        if segments.len() > MAX_VALUE_SEGMENTS {
            return Err(crate::wire::custom_encode_error(format!(
                "a channel value with {} zero-copy buffers (at most {MAX_VALUE_SEGMENTS})",
                segments.len()
            )));
        }
        let segments: Vec<Segment> = segments.into_iter().map(Segment).collect();
        (tag, Segment(bytes), segments, restored).serialize(s)
    }
}

impl<'de> Deserialize<'de> for ChannelData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (tag, bytes, segments, restored): (u64, Segment, Vec<Segment>, bool) =
            Deserialize::deserialize(d)?;
        if segments.len() > MAX_VALUE_SEGMENTS {
            return Err(crate::wire::custom_error(
                "a channel value with too many buffers".into(),
            ));
        }
        Ok(ChannelData(Repr::Encoded {
            tag,
            bytes: bytes.0,
            segments: segments.into_iter().map(|s| s.0).collect(),
            restored,
        }))
    }
}

/// The hidden entry method through which channel values reach an element of any chare type
/// (registered for each type by `#[chare]`).
#[doc(hidden)]
pub struct ChannelDeliver;

impl<C: Chare> Entry<C> for ChannelDeliver {
    type Args = (ChannelMessage,);
    type Output = ();
    const NAME: &'static str = "<channel>";
    const ID: u64 = C::CHANNEL_ID;

    fn call(this: &Coro<C>, (message,): Self::Args) -> Invoked<()> {
        let arrived = this.element().channel_table().borrow_mut().arrive(message);
        if let Err(e) = arrived {
            panic!("{e}");
        }
        Invoked::Done(())
    }
}
