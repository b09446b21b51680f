//! The active-message protocol between [`UcxLayer`](crate::UcxLayer)s.
//!
//! # What this module owns
//!
//! The active-message ids and the layout of the UCX AM *header* of a data
//! message (the *data* part of the active message is the message's
//! segments, back to back). All integers are little-endian:
//!
//! | offset | size    | field                                             |
//! |-------:|--------:|---------------------------------------------------|
//! | 0      | 4       | sending process rank                              |
//! | 4      | 4       | reserved, 0                                       |
//! | 8      | 8       | per (sender, receiver) sequence number, from 0    |
//! | 16     | 32      | the [`Header`] in its wire format                 |
//! | 48     | 8 × n   | the length of each of the header's n segments     |
//!
//! A goodbye ([`AM_BYE`]) carries only the sender's rank (4 bytes of header,
//! no data): the sender shut its layer down cleanly, so the loss of its
//! endpoint afterwards is not a failure.
//!
//! # Invariants
//!
//! * [`decode`] treats its input as hostile: it checks the rank against the
//!   job size, the header with [`Header::from_bytes`], the header length
//!   against the segment count, and that the segment lengths add up to the
//!   data length without overflow, before anything is allocated.
//! * Sequence numbers let the receiver deliver in send order exactly once
//!   whatever order UCX completes eager and rendezvous messages in.

use charmrs_transport::{Header, ProcessId, TransportError};

/// Active-message id of data messages.
pub const AM_DATA: u32 = 0x6368;
/// Active-message id of the goodbye notice.
pub const AM_BYE: u32 = 0x6369;

/// Bytes of the fixed part of a data header (before the segment lengths).
pub const FIXED: usize = 16 + Header::SIZE;

/// Bytes of the header of a message with `segments` segments.
pub fn header_len(segments: usize) -> usize {
    FIXED + 8 * segments
}

/// Writes the AM header of a data message into `out` (cleared first).
pub fn encode(out: &mut Vec<u8>, src: ProcessId, seq: u64, header: &Header, lens: &[usize]) {
    out.clear();
    out.reserve(header_len(lens.len()));
    out.extend_from_slice(&src.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&header.to_bytes());
    for &l in lens {
        out.extend_from_slice(&(l as u64).to_le_bytes());
    }
}

/// A decoded data-message header (borrowing the segment-length table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Sending process.
    pub src: ProcessId,
    /// Sequence number of the message from `src`.
    pub seq: u64,
    /// The message header.
    pub header: Header,
    /// The validated segment-length table (8 bytes per segment).
    lens: &'a [u8],
}

impl Decoded<'_> {
    /// The length of each segment, in order.
    pub fn lens(&self) -> impl Iterator<Item = usize> + '_ {
        // Each length was checked to fit a usize by `decode`.
        self.lens.chunks_exact(8).map(|c| u64_at(c, 0) as usize)
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes and validates the AM header `b` of a data message whose data
/// part is `data_len` bytes, in a job of `size` processes.
///
/// # Errors
///
/// [`TransportError::Malformed`] (or the header's own errors) for anything
/// inconsistent.
pub fn decode(b: &[u8], data_len: usize, size: u32) -> Result<Decoded<'_>, TransportError> {
    if b.len() < FIXED {
        return Err(TransportError::Malformed(format!(
            "active-message header of {} bytes, expected at least {FIXED}",
            b.len()
        )));
    }
    let src = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if src >= size {
        return Err(TransportError::Malformed(format!(
            "active message claims to come from process {src} of a job of {size}"
        )));
    }
    if b[4..8] != [0; 4] {
        return Err(TransportError::Malformed(format!(
            "active message from process {src} has non-zero reserved bytes"
        )));
    }
    let seq = u64_at(b, 8);
    let header = Header::from_bytes(&b[16..FIXED])?;
    let n = usize::from(header.segment_count);
    if b.len() != header_len(n) {
        return Err(TransportError::Malformed(format!(
            "active message from process {src}: header of {} bytes for {n} segments (expected {})",
            b.len(),
            header_len(n)
        )));
    }
    let mut total: u64 = 0;
    for i in 0..n {
        let l = u64_at(b, FIXED + 8 * i);
        total = total.checked_add(l).ok_or_else(|| {
            TransportError::Malformed(format!(
                "active message from process {src}: segment lengths overflow"
            ))
        })?;
        usize::try_from(l).map_err(|_| {
            TransportError::Malformed(format!("segment of {l} bytes from process {src}"))
        })?;
    }
    if total != data_len as u64 {
        return Err(TransportError::Malformed(format!(
            "active message from process {src}: segments add up to {total} bytes but {data_len} arrived"
        )));
    }
    Ok(Decoded {
        src,
        seq,
        header,
        lens: &b[FIXED..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(segs: u16) -> Header {
        Header {
            segment_count: segs,
            ..Header::new(5, 10, 20, 0xfeed)
        }
    }

    #[test]
    fn round_trips() {
        let mut b = Vec::new();
        encode(&mut b, 3, 77, &header(3), &[1, 0, 4096]);
        assert_eq!(b.len(), header_len(3));
        let d = decode(&b, 4097, 4).unwrap();
        assert_eq!((d.src, d.seq, d.header), (3, 77, header(3)));
        assert_eq!(d.lens().collect::<Vec<_>>(), vec![1, 0, 4096]);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut b = Vec::new();
        encode(&mut b, 3, 0, &header(2), &[10, 20]);
        assert!(decode(&b, 30, 3).is_err(), "rank out of range");
        assert!(decode(&b, 31, 4).is_err(), "length mismatch");
        assert!(decode(&b[..b.len() - 1], 30, 4).is_err(), "short");
        assert!(decode(&b[..10], 30, 4).is_err(), "truncated");
        let mut bad = b.clone();
        bad[5] = 1;
        assert!(decode(&bad, 30, 4).is_err(), "reserved");
        let mut bad = b.clone();
        bad[16] = b'X';
        assert!(decode(&bad, 30, 4).is_err(), "magic");
        let mut huge = Vec::new();
        encode(&mut huge, 0, 0, &header(2), &[usize::MAX, 2]);
        assert!(decode(&huge, 1, 4).is_err(), "overflow");
    }
}
