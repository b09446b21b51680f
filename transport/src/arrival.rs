//! What a machine layer hands the runtime for each arrived message.
//!
//! # What this module owns
//!
//! [`Arrival`]: an arrived message, either owned ([`Message`]) or — for a small message of one
//! segment that a layer copied into a buffer of its own — borrowed from that buffer for the
//! duration of one call of the sink ([`MachineLayer::progress_arrivals`]). A runtime that only
//! decodes such a message never needs a buffer of its own for it: no allocation and no free per
//! small message on the receiving side.
//!
//! # Invariants
//!
//! * A borrowed arrival has exactly one segment, its header's `segment_count` is 1, and its bytes
//!   are valid only during the sink call that received it.
//! * [`Arrival::into_message`] yields the same message either way (copying a borrowed one).
//!
//! [`MachineLayer::progress_arrivals`]: crate::MachineLayer::progress_arrivals

use bytes::Bytes;

use crate::message::{Header, Message};

/// An arrived message, owned or borrowed from the layer (see the module docs).
#[derive(Debug)]
pub enum Arrival<'a> {
    /// A message the runtime now owns.
    Owned(Message),
    /// A message of one segment (`data`), lent for the sink call only.
    Borrowed(Header, &'a [u8]),
}

impl Arrival<'_> {
    /// The message's header (`segment_count` included).
    pub fn header(&self) -> Header {
        match self {
            Arrival::Owned(m) => *m.header(),
            Arrival::Borrowed(h, _) => Header {
                segment_count: 1,
                ..*h
            },
        }
    }

    /// Total payload bytes, all segments together.
    pub fn total_len(&self) -> usize {
        match self {
            Arrival::Owned(m) => m.total_len(),
            Arrival::Borrowed(_, data) => data.len(),
        }
    }

    /// The message, owned: a borrowed one is copied into a segment of its own.
    pub fn into_message(self) -> Message {
        match self {
            Arrival::Owned(m) => m,
            Arrival::Borrowed(h, data) => Message::with_segment(h, Bytes::copy_from_slice(data)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_arrival_is_the_same_message_once_owned() {
        let h = Header::new(4, 1, 2, 99);
        let data = [1u8, 2, 3];
        let borrowed = Arrival::Borrowed(h, &data);
        assert_eq!(borrowed.header().segment_count, 1);
        assert_eq!(borrowed.total_len(), 3);
        let owned = Message::with_segment(h, Bytes::copy_from_slice(&data));
        assert_eq!(borrowed.into_message(), owned);
        let again = Arrival::Owned(owned.clone());
        assert_eq!(again.header(), *owned.header());
        assert_eq!(again.into_message(), owned);
    }
}
