//! What a machine layer hands the runtime for each arrived message.
//!
//! # What this module owns
//!
//! * [`Arrival`]: an arrived message, either owned ([`Message`]) or — for a small message of one
//!   segment that a layer copied into a buffer of its own — borrowed from that buffer for the
//!   duration of one call of the sink ([`MachineLayer::progress_arrivals`]). A runtime that only
//!   decodes such a message never needs a buffer of its own for it: no allocation and no free
//!   per small message on the receiving side.
//! * [`ArrivalBatch`]: the layers' list of arrived messages waiting for the sink, which keeps
//!   the small ones' bytes in one reused buffer and lends them.
//!
//! # Invariants
//!
//! * A borrowed arrival has exactly one segment, its header's `segment_count` is 1, and its bytes
//!   are valid only during the sink call that received it.
//! * [`Arrival::into_message`] yields the same message either way (copying a borrowed one).
//! * A batch left empty by a delivery (or by an append into another) keeps at most
//!   `SMALL_KEEP` bytes of small-message buffer and `ENTRIES_KEEP` entries of capacity: a
//!   burst does not hold its memory for ever.
//!
//! [`MachineLayer::progress_arrivals`]: crate::MachineLayer::progress_arrivals

use crate::layer::ProcessId;
use crate::message::{Header, Message};

/// An arrived message, owned or borrowed from the layer (see the module docs).
#[derive(Debug)]
pub enum Arrival<'a> {
    /// A message the runtime now owns.
    Owned(Message),
    /// A message of one segment, lent for the sink call only.
    Borrowed {
        /// The message's header.
        header: Header,
        /// Its one segment, in the layer's buffer.
        data: &'a [u8],
        /// No other message follows in this delivery: the sink may act on this one at once
        /// (run it, say) without holding back any message behind it.
        last: bool,
    },
}

impl Arrival<'_> {
    /// The message's header (`segment_count` included).
    pub fn header(&self) -> Header {
        match self {
            Arrival::Owned(m) => *m.header(),
            Arrival::Borrowed { header, .. } => Header {
                segment_count: 1,
                ..*header
            },
        }
    }

    /// Total payload bytes, all segments together.
    pub fn total_len(&self) -> usize {
        match self {
            Arrival::Owned(m) => m.total_len(),
            Arrival::Borrowed { data, .. } => data.len(),
        }
    }

    /// The message, owned: a borrowed one is copied into a segment of its own.
    pub fn into_message(self) -> Message {
        match self {
            Arrival::Owned(m) => m,
            Arrival::Borrowed { header, data, .. } => Message::with_copied_segment(header, data),
        }
    }
}

/// Arrived messages waiting for the sink, in delivery order: owned ones, and small ones of one
/// segment whose bytes are copied into one buffer the batch keeps (no allocation per message
/// once the buffer has grown), lent to the sink by [`deliver`](ArrivalBatch::deliver).
#[derive(Debug, Default)]
pub struct ArrivalBatch {
    entries: Vec<(ProcessId, Entry)>,
    /// The bytes of the `Entry::Small` entries, one after the other.
    small: Vec<u8>,
}

#[derive(Debug)]
enum Entry {
    Owned(Message),
    /// `small[start..start + len]` of the batch.
    Small {
        header: Header,
        start: usize,
        len: usize,
    },
}

/// Capacity of a batch's buffer of small messages beyond which [`ArrivalBatch::deliver`] gives it
/// back (a burst of small messages does not keep its memory).
const SMALL_KEEP: usize = 1 << 20;
/// Capacity, in messages, of a batch's list beyond which an emptied batch gives it back down
/// to this many (about a megabyte: a burst of many small messages does not keep its list).
const ENTRIES_KEEP: usize = 16 << 10;

impl ArrivalBatch {
    /// An empty batch (allocates nothing).
    pub const fn new() -> ArrivalBatch {
        ArrivalBatch {
            entries: Vec::new(),
            small: Vec::new(),
        }
    }

    /// Appends a message from `src`, owned.
    pub fn push(&mut self, src: ProcessId, msg: Message) {
        self.entries.push((src, Entry::Owned(msg)));
    }

    /// Appends a message of one segment from `src`, copying `data` into the batch's buffer.
    pub fn push_small(&mut self, src: ProcessId, header: Header, data: &[u8]) {
        let start = self.small.len();
        self.small.extend_from_slice(data);
        let entry = Entry::Small {
            header,
            start,
            len: data.len(),
        };
        self.entries.push((src, entry));
    }

    /// Number of messages in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Moves every message of `other` behind this batch's, leaving `other` empty (cheap when
    /// this batch is empty: the two swap their buffers).
    #[inline]
    pub fn append(&mut self, other: &mut ArrivalBatch) {
        if other.entries.is_empty() {
            // The usual case of an idle poll: nothing to move (checked inline, in the poll).
            return;
        }
        self.append_some(other);
    }

    /// [`append`](Self::append) of a batch that holds something.
    fn append_some(&mut self, other: &mut ArrivalBatch) {
        if self.entries.is_empty() {
            self.small.clear();
            std::mem::swap(self, other);
            return;
        }
        let base = self.small.len();
        self.small.append(&mut other.small);
        self.entries
            .extend(other.entries.drain(..).map(|(src, e)| match e {
                Entry::Small { header, start, len } => (
                    src,
                    Entry::Small {
                        header,
                        start: base + start,
                        len,
                    },
                ),
                owned => (src, owned),
            }));
        other.release_excess_capacity();
    }

    /// Gives back the capacity of an emptied batch beyond `SMALL_KEEP` bytes and
    /// `ENTRIES_KEEP` entries.
    fn release_excess_capacity(&mut self) {
        debug_assert!(self.entries.is_empty() && self.small.is_empty());
        if self.small.capacity() > SMALL_KEEP {
            self.small = Vec::new();
        }
        if self.entries.capacity() > ENTRIES_KEEP {
            self.entries.shrink_to(ENTRIES_KEEP);
        }
    }

    /// Hands every message to `sink` in order (small ones lent, see [`Arrival::Borrowed`]),
    /// leaving the batch empty; returns how many. If the sink panics, the messages not handed
    /// over yet are dropped.
    #[inline]
    pub fn deliver(&mut self, sink: &mut dyn FnMut(ProcessId, Arrival<'_>)) -> usize {
        if self.entries.is_empty() {
            // An idle poll's (checked inline, in the poll).
            return 0;
        }
        self.deliver_some(sink)
    }

    /// [`deliver`](Self::deliver) of a batch that holds something.
    fn deliver_some(&mut self, sink: &mut dyn FnMut(ProcessId, Arrival<'_>)) -> usize {
        let n = self.entries.len();
        for (k, (src, e)) in self.entries.drain(..).enumerate() {
            match e {
                Entry::Owned(m) => sink(src, Arrival::Owned(m)),
                Entry::Small { header, start, len } => {
                    let data = &self.small[start..start + len];
                    let last = k + 1 == n;
                    sink(src, Arrival::Borrowed { header, data, last })
                }
            }
        }
        self.small.clear();
        self.release_excess_capacity();
        n
    }

    /// Empties the batch, returning its owned messages (the small ones are dropped with it):
    /// for a layer that is going away.
    pub fn discard(&mut self) -> Vec<Message> {
        self.small.clear();
        self.entries
            .drain(..)
            .filter_map(|(_, e)| match e {
                Entry::Owned(m) => Some(m),
                Entry::Small { .. } => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Every message delivered, owned, with whether it was lent and if so as the last one.
    fn owned_all(batch: &mut ArrivalBatch) -> Vec<(ProcessId, Message, Option<bool>)> {
        let mut got = Vec::new();
        batch.deliver(&mut |src, a| {
            let lent = match a {
                Arrival::Borrowed { last, .. } => Some(last),
                Arrival::Owned(_) => None,
            };
            got.push((src, a.into_message(), lent));
        });
        got
    }

    #[test]
    fn a_batch_delivers_owned_and_lent_messages_in_order() {
        let h = |tag| Header::new(1, 0, 0, tag);
        let msg = |tag, data: &[u8]| Message::with_segment(h(tag), Bytes::copy_from_slice(data));
        let mut a = ArrivalBatch::new();
        a.push_small(1, h(0), b"zero");
        a.push(2, msg(1, b"one"));
        a.push_small(1, h(2), b"");
        let mut b = ArrivalBatch::new();
        b.push_small(3, h(3), b"three");
        b.push(3, msg(4, b"four"));
        a.append(&mut b);
        assert!(b.is_empty());
        assert_eq!(a.len(), 5);
        let got = owned_all(&mut a);
        assert!(a.is_empty());
        let expected = vec![
            (1, msg(0, b"zero"), Some(false)),
            (2, msg(1, b"one"), None),
            (1, msg(2, b""), Some(false)),
            (3, msg(3, b"three"), Some(false)),
            (3, msg(4, b"four"), None),
        ];
        assert_eq!(got, expected);
        // Appending to an empty batch swaps; the buffers are reused.
        let mut c = ArrivalBatch::new();
        a.push_small(5, h(5), b"five");
        c.append(&mut a);
        assert_eq!(owned_all(&mut c), vec![(5, msg(5, b"five"), Some(true))]);
        // A layer going away keeps only what it owns.
        c.push_small(6, h(6), b"six");
        c.push(7, msg(7, b"seven"));
        assert_eq!(c.discard(), vec![msg(7, b"seven")]);
        assert!(c.is_empty());
    }

    #[test]
    fn a_burst_of_small_messages_does_not_keep_its_memory() {
        const BURST: usize = 100_000;
        let h = Header::new(1, 0, 0, 0);
        let mut batch = ArrivalBatch::new();
        for _ in 0..BURST {
            batch.push_small(0, h, b"0123456789abcdefghijklmnopqrstuvwxyz");
        }
        assert!(batch.entries.capacity() >= BURST && batch.small.capacity() > SMALL_KEEP);
        assert_eq!(batch.deliver(&mut |_, _| {}), BURST);
        assert!(
            batch.entries.capacity() <= ENTRIES_KEEP,
            "{} entries kept",
            batch.entries.capacity()
        );
        assert!(batch.small.capacity() <= SMALL_KEEP);
        // A batch emptied by appending it to a non-empty one gives its burst back too.
        let mut layer_side = ArrivalBatch::new();
        for _ in 0..BURST {
            layer_side.push_small(0, h, b"0123456789abcdefghijklmnopqrstuvwxyz");
        }
        batch.push_small(0, h, b"first");
        batch.append(&mut layer_side);
        assert_eq!(batch.len(), BURST + 1);
        assert!(layer_side.entries.capacity() <= ENTRIES_KEEP);
        assert!(layer_side.small.capacity() <= SMALL_KEEP);
        // Below the limits the buffers are kept for the next burst.
        batch.deliver(&mut |_, _| {});
        for _ in 0..100 {
            batch.push_small(0, h, b"x");
        }
        batch.deliver(&mut |_, _| {});
        assert!(batch.entries.capacity() >= 100 && batch.small.capacity() >= 100);
    }

    #[test]
    fn a_borrowed_arrival_is_the_same_message_once_owned() {
        let h = Header::new(4, 1, 2, 99);
        let data = [1u8, 2, 3];
        let borrowed = Arrival::Borrowed {
            header: h,
            data: &data,
            last: true,
        };
        assert_eq!(borrowed.header().segment_count, 1);
        assert_eq!(borrowed.total_len(), 3);
        let owned = Message::with_segment(h, Bytes::copy_from_slice(&data));
        assert_eq!(borrowed.into_message(), owned);
        let again = Arrival::Owned(owned.clone());
        assert_eq!(again.header(), *owned.header());
        assert_eq!(again.into_message(), owned);
    }
}
