//! The active-message protocol between [`UcxLayer`](crate::UcxLayer)s.
//!
//! # What this module owns
//!
//! The active-message ids and the layout of the UCX AM *header* of a data
//! message (the *data* part of the active message is the message's
//! segments, back to back). It is kept small on purpose: UCX sends header
//! and data in one shared-memory slot with its fastest ("short") protocol
//! only while both fit in about 90 bytes. All integers are little-endian:
//!
//! | offset | size        | field                                           |
//! |-------:|------------:|-------------------------------------------------|
//! | 0      | 4           | sending process rank                            |
//! | 4      | 4           | sequence number (low 32 bits; per sender → receiver) |
//! | 8      | 1           | [`Header::kind`]                                |
//! | 9      | 1           | [`Header::flags`]                               |
//! | 10     | 2           | [`Header::segment_count`] n                     |
//! | 12     | 4           | [`Header::src_pe`]                              |
//! | 16     | 4           | [`Header::dst_pe`]                              |
//! | 20     | 8           | [`Header::tag`]                                 |
//! | 28     | 8 × (n − 1) | lengths of all segments but the last            |
//!
//! The last segment's length is what remains of the data part.
//!
//! A *split* data message ([`AM_DATA_SPLIT`]) has the same header followed
//! by one byte, the data part's address in the sender modulo
//! [`SPLIT_ALIGN`], then the bytes of all segments but the last, back to
//! back; its data part is the last segment alone. The sender uses it for a large message whose
//! leading segments are small (an entry call's arguments before its
//! buffer): the data part is then one contiguous buffer, which UCX's
//! rendezvous protocol moves with a single zero-copy read (on shared
//! memory, one kernel copy by CMA), where a list of buffers (an iov) goes
//! through its copying pipeline (two copies through the shared-memory
//! FIFO). The receiver fetches that data part straight into its own buffer,
//! placed at the same offset within a cache line as the sender's (the
//! kernel's copy is ~10 % faster between co-aligned buffers, measured).
//!
//! A goodbye
//! ([`AM_BYE`]) carries only the sender's rank (4 bytes of header, no
//! data): the sender shut its layer down cleanly, so the loss of its
//! endpoint afterwards is not a failure.
//!
//! # Invariants
//!
//! * [`decode`] treats its input as hostile: it checks the rank against the
//!   job size, the segment count against [`MAX_SEGMENTS`], the header
//!   length against the segment count, and that the given segment lengths
//!   fit in the data part without overflow, before anything is allocated.
//! * Sequence numbers let the receiver deliver in send order exactly once
//!   whatever order UCX completes eager and rendezvous messages in; 32 bits
//!   suffice because fewer than 2³¹ messages from one sender are ever in
//!   flight.

use charmrs_transport::{Header, ProcessId, TransportError, MAX_SEGMENTS};

/// Active-message id of data messages.
pub const AM_DATA: u32 = 0x6368;
/// Active-message id of the goodbye notice.
pub const AM_BYE: u32 = 0x6369;
/// Active-message id of split data messages (see the module docs).
pub const AM_DATA_SPLIT: u32 = 0x636A;

/// Largest total of leading segments a split message carries in its
/// header.
pub const SPLIT_LEADING_MAX: usize = 1024;

/// The granule a split message's receiver matches the sender's data
/// alignment to (a cache line; part of the wire format).
pub const SPLIT_ALIGN: usize = charmrs_transport::pool::COPY_ALIGN;

/// Bytes of the fixed part of a data header (before the segment lengths).
pub const FIXED: usize = 28;

/// Bytes of the header of a message with `segments` segments.
pub fn header_len(segments: usize) -> usize {
    FIXED + 8 * segments.saturating_sub(1)
}

/// Writes the AM header of a data message into `out` (cleared first);
/// `lens` are the segment lengths (`header.segment_count` of them).
pub fn encode(out: &mut Vec<u8>, src: ProcessId, seq: u32, header: &Header, lens: &[usize]) {
    out.clear();
    out.reserve(header_len(lens.len()));
    // The fixed part assembled in place, then appended at once.
    let mut fixed = [0u8; FIXED];
    encode_fixed(&mut fixed, src, seq, header, lens.len());
    out.extend_from_slice(&fixed);
    if let Some((_, init)) = lens.split_last() {
        for &l in init {
            out.extend_from_slice(&(l as u64).to_le_bytes());
        }
    }
}

/// Writes the fixed part of a data header (all of it for a message of one segment) into
/// `fixed`: `segments` is the message's segment count.
#[inline]
pub fn encode_fixed(
    fixed: &mut [u8; FIXED],
    src: ProcessId,
    seq: u32,
    header: &Header,
    segments: usize,
) {
    fixed[0..4].copy_from_slice(&src.to_le_bytes());
    fixed[4..8].copy_from_slice(&seq.to_le_bytes());
    fixed[8] = header.kind;
    fixed[9] = header.flags;
    fixed[10..12].copy_from_slice(&(segments as u16).to_le_bytes());
    fixed[12..16].copy_from_slice(&header.src_pe.to_le_bytes());
    fixed[16..20].copy_from_slice(&header.dst_pe.to_le_bytes());
    fixed[20..28].copy_from_slice(&header.tag.to_le_bytes());
}

/// Bytes a split header adds to a data header besides the leading
/// segments (the alignment byte).
pub const SPLIT_EXTRA: usize = 1;

/// Turns the header [`encode`] wrote into `out` into the header of a split
/// data message: appends the data part's alignment ([`SPLIT_EXTRA`] byte: its address in the
/// sender; only the offset modulo [`SPLIT_ALIGN`] is kept) and the bytes of
/// every segment but the last (`leading`, whose lengths the header's table
/// holds).
pub fn push_split<B: AsRef<[u8]>>(out: &mut Vec<u8>, data_addr: usize, leading: &[B]) {
    out.push((data_addr % SPLIT_ALIGN) as u8);
    for s in leading {
        out.extend_from_slice(s.as_ref());
    }
}

/// A decoded data-message header (borrowing the segment-length table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Sending process.
    pub src: ProcessId,
    /// Sequence number of the message from `src` (low 32 bits).
    pub seq: u32,
    /// The message header.
    pub header: Header,
    /// The validated lengths of all segments but the last (8 bytes each).
    lens: &'a [u8],
    /// Length of the last segment.
    last: usize,
    /// A split message's leading segments (all but the last), back to
    /// back; empty for a plain data message.
    pub leading: &'a [u8],
    /// A split message's data address in the sender modulo
    /// [`SPLIT_ALIGN`] (0 for a plain data message).
    pub data_align: usize,
}

impl Decoded<'_> {
    /// The length of each segment, in order.
    pub fn lens(&self) -> impl Iterator<Item = usize> + '_ {
        let n = usize::from(self.header.segment_count);
        // Each length was checked to fit in the data part by `decode`.
        self.lens
            .chunks_exact(8)
            .map(|c| u64_at(c, 0) as usize)
            .chain((n > 0).then_some(self.last))
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes and validates the AM header `b` of a data message whose data
/// part is `data_len` bytes, in a job of `size` workers (ids: process ranks
/// with one worker per process, PE numbers with one per PE).
///
/// # Errors
///
/// [`TransportError::Malformed`] for anything inconsistent, naming the
/// claimed sender (once its rank is known to be in range) and the field.
pub fn decode(b: &[u8], data_len: usize, size: u32) -> Result<Decoded<'_>, TransportError> {
    decode_as(b, data_len, size, false)
}

/// [`decode`] for a split data message ([`AM_DATA_SPLIT`]): the leading
/// segments follow the length table in `b`, the data part is the last
/// segment.
///
/// # Errors
///
/// As [`decode`]; also when the header's bytes after the length table are
/// not exactly the leading segments, or the message has no segment.
pub fn decode_split(b: &[u8], data_len: usize, size: u32) -> Result<Decoded<'_>, TransportError> {
    decode_as(b, data_len, size, true)
}

fn decode_as(
    b: &[u8],
    data_len: usize,
    size: u32,
    split: bool,
) -> Result<Decoded<'_>, TransportError> {
    if b.len() < FIXED {
        return Err(TransportError::Malformed(format!(
            "active-message header of {} bytes, expected at least {FIXED}",
            b.len()
        )));
    }
    let src = u32_at(b, 0);
    if src >= size {
        return Err(TransportError::Malformed(format!(
            "active message claims to come from UCX worker {src} of a job of {size}"
        )));
    }
    let segment_count = u16::from_le_bytes([b[10], b[11]]);
    if segment_count > MAX_SEGMENTS {
        return Err(TransportError::Malformed(format!(
            "active message from UCX worker {src}: segment count {segment_count}, over the \
             limit of {MAX_SEGMENTS}"
        )));
    }
    let n = usize::from(segment_count);
    if split && n == 0 {
        return Err(TransportError::Malformed(format!(
            "split active message from UCX worker {src} without segments"
        )));
    }
    let table_end = header_len(n);
    if b.len() < table_end || (!split && b.len() != table_end) {
        return Err(TransportError::Malformed(format!(
            "active message from UCX worker {src}: header of {} bytes for {n} segments (expected {})",
            b.len(),
            header_len(n)
        )));
    }
    let mut used: u64 = 0;
    for i in 0..n.saturating_sub(1) {
        used = used.checked_add(u64_at(b, FIXED + 8 * i)).ok_or_else(|| {
            TransportError::Malformed(format!(
                "active message from UCX worker {src}: segment lengths overflow"
            ))
        })?;
    }
    let (data_align, leading) = match (split, &b[table_end..]) {
        (false, rest) => (0, rest),
        (true, [align, rest @ ..]) if usize::from(*align) < SPLIT_ALIGN => {
            (usize::from(*align), rest)
        }
        (true, rest) => {
            return Err(TransportError::Malformed(format!(
                "split active message from UCX worker {src}: alignment byte {:?} (expected below {SPLIT_ALIGN})",
                rest.first()
            )))
        }
    };
    if split {
        if used != leading.len() as u64 {
            return Err(TransportError::Malformed(format!(
                "split active message from UCX worker {src}: leading segments of {used} bytes, {} bytes carried",
                leading.len()
            )));
        }
    } else if used > data_len as u64 || (n == 0 && data_len != 0) {
        return Err(TransportError::Malformed(format!(
            "active message from UCX worker {src}: {n} segments of at least {used} bytes in {data_len} bytes of data"
        )));
    }
    let header = Header {
        kind: b[8],
        flags: b[9],
        segment_count,
        src_pe: u32_at(b, 12),
        dst_pe: u32_at(b, 16),
        tag: u64_at(b, 20),
    };
    Ok(Decoded {
        src,
        seq: u32_at(b, 4),
        header,
        lens: &b[FIXED..table_end],
        last: if split {
            data_len
        } else {
            data_len - used as usize
        },
        leading,
        data_align,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(segs: u16) -> Header {
        Header {
            segment_count: segs,
            flags: 3,
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
        // One segment: no length table at all.
        encode(&mut b, 0, 1, &header(1), &[8]);
        assert_eq!(b.len(), FIXED);
        let d = decode(&b, 8, 1).unwrap();
        assert_eq!(d.lens().collect::<Vec<_>>(), vec![8]);
        // No segment.
        encode(&mut b, 0, 2, &header(0), &[]);
        let d = decode(&b, 0, 1).unwrap();
        assert_eq!(d.lens().count(), 0);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut b = Vec::new();
        encode(&mut b, 3, 0, &header(3), &[10, 20, 5]);
        assert!(decode(&b, 35, 4).is_ok());
        assert!(decode(&b, 35, 3).is_err(), "rank out of range");
        assert!(decode(&b, 29, 4).is_err(), "lengths exceed the data");
        assert!(decode(&b[..b.len() - 1], 35, 4).is_err(), "short");
        assert!(decode(&b[..10], 35, 4).is_err(), "truncated");
        let mut bad = b.clone();
        bad[10..12].copy_from_slice(&(MAX_SEGMENTS + 1).to_le_bytes());
        match decode(&bad, 35, 4) {
            Err(TransportError::Malformed(e)) => assert_eq!(
                e,
                format!(
                    "active message from UCX worker 3: segment count {}, over the limit of \
                     {MAX_SEGMENTS}",
                    MAX_SEGMENTS + 1
                )
            ),
            other => panic!("too many segments: {other:?}"),
        }
        let mut huge = Vec::new();
        encode(&mut huge, 0, 0, &header(3), &[usize::MAX, 2, 0]);
        assert!(decode(&huge, 1, 4).is_err(), "overflow");
        encode(&mut b, 0, 0, &header(0), &[]);
        assert!(decode(&b, 1, 4).is_err(), "data without segments");
    }

    #[test]
    fn split_messages_round_trip() {
        let mut b = Vec::new();
        encode(&mut b, 2, 9, &header(3), &[3, 0, 1 << 20]);
        push_split(&mut b, 0x7f00_1230, &[&b"abc"[..], &[]]);
        assert_eq!(b.len(), header_len(3) + SPLIT_EXTRA + 3);
        let d = decode_split(&b, 1 << 20, 4).unwrap();
        assert_eq!((d.src, d.seq, d.header), (2, 9, header(3)));
        assert_eq!(d.lens().collect::<Vec<_>>(), vec![3, 0, 1 << 20]);
        assert_eq!(d.leading, b"abc");
        assert_eq!(d.data_align, 0x30);
        // One segment: nothing leads.
        encode(&mut b, 0, 1, &header(1), &[5]);
        push_split::<&[u8]>(&mut b, 4096, &[]);
        let d = decode_split(&b, 5, 1).unwrap();
        assert_eq!(d.lens().collect::<Vec<_>>(), vec![5]);
        assert!(d.leading.is_empty());
        assert_eq!(d.data_align, 0);
        // A plain message has no alignment byte.
        encode(&mut b, 0, 1, &header(1), &[5]);
        assert_eq!(decode(&b, 5, 1).unwrap().data_align, 0);
    }

    #[test]
    fn hostile_split_headers_are_refused() {
        let mut b = Vec::new();
        encode(&mut b, 1, 0, &header(2), &[4, 100]);
        push_split(&mut b, 8, &[&b"wxyz"[..]]);
        assert!(decode_split(&b, 100, 2).is_ok());
        let mut misaligned = b.clone();
        misaligned[header_len(2)] = SPLIT_ALIGN as u8;
        assert!(
            decode_split(&misaligned, 100, 2).is_err(),
            "alignment beyond the granule"
        );
        assert!(
            decode_split(&b[..header_len(2)], 100, 2).is_err(),
            "alignment byte missing"
        );
        assert!(
            decode(&b, 104, 2).is_err(),
            "a split header is not a plain one"
        );
        assert!(
            decode_split(&b[..b.len() - 1], 100, 2).is_err(),
            "leading bytes missing"
        );
        let mut long = b.clone();
        long.push(0);
        assert!(
            decode_split(&long, 100, 2).is_err(),
            "bytes beyond the leading segments"
        );
        encode(&mut b, 0, 0, &header(0), &[]);
        assert!(decode_split(&b, 0, 2).is_err(), "no segment");
        let mut huge = Vec::new();
        encode(&mut huge, 0, 0, &header(3), &[usize::MAX, 2, 0]);
        assert!(decode_split(&huge, 1, 4).is_err(), "overflow");
    }
}
