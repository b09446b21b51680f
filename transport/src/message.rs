//! The unit of transfer between processes: a fixed [`Header`] plus zero or
//! more zero-copy payload segments, and the frame codec for stream
//! transports.
//!
//! # What this module owns
//!
//! * [`Header`]: routing and dispatch fields. The transport reads only
//!   `dst_pe`/`src_pe` for diagnostics and `segment_count` for framing;
//!   `kind`, `flags` and `tag` are opaque runtime data carried verbatim.
//! * [`Message`]: a header and its segments. By convention segment 0 holds
//!   the serialized arguments and later segments hold raw out-of-band
//!   buffers, but the transport never looks inside.
//! * The frame codec ([`encode_frame_prefix`], [`decode_frame`],
//!   [`decode_frame_bytes`]) used by byte-stream layers (TCP, pipes).
//!
//! # Invariants
//!
//! * `message.header().segment_count == message.segments().len()` always;
//!   [`Message`] keeps its fields private to guarantee it.
//! * A message never has more than [`MAX_SEGMENTS`] segments.
//! * The decoders treat their input as hostile: they never panic, never
//!   allocate more than the input (or `max_len`) justifies, and report
//!   `Truncated` only when more input could make the frame valid.
//!
//! # Wire format (all integers little-endian)
//!
//! Header, [`Header::SIZE`] = 32 bytes:
//!
//! | offset | size | field                      |
//! |-------:|-----:|----------------------------|
//! | 0      | 4    | magic `b"CHRM"`            |
//! | 4      | 1    | version ([`WIRE_VERSION`]) |
//! | 5      | 1    | `kind`                     |
//! | 6      | 1    | `flags`                    |
//! | 7      | 1    | reserved, must be 0        |
//! | 8      | 4    | `src_pe`                   |
//! | 12     | 4    | `dst_pe`                   |
//! | 16     | 8    | `tag`                      |
//! | 24     | 2    | `segment_count`            |
//! | 26     | 6    | reserved, must be 0        |
//!
//! A frame is the header, then one `u64` length per segment, then the
//! segment bytes back to back.

use crate::segments::Segments;
use bytes::Bytes;

use crate::error::TransportError;

/// Magic bytes opening every encoded header.
pub const MAGIC: [u8; 4] = *b"CHRM";

/// Version of the wire format produced by [`Header::to_bytes`].
pub const WIRE_VERSION: u8 = 1;

/// Maximum number of segments in one message.
pub const MAX_SEGMENTS: u16 = 256;

/// Size in bytes of one encoded segment length in a frame prefix.
const LEN_SIZE: usize = 8;

/// Fixed-size message header. Plain data: the in-memory layout is
/// irrelevant to the wire, which goes through [`Header::to_bytes`] /
/// [`Header::from_bytes`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Header {
    /// What the runtime does with the message (entry method, reduction,
    /// RDMA completion, ...). Opaque to the transport.
    pub kind: u8,
    /// Runtime flag bits. Opaque to the transport.
    pub flags: u8,
    /// Number of payload segments following the header. Maintained by
    /// [`Message`]; at most [`MAX_SEGMENTS`] in any valid header.
    pub segment_count: u16,
    /// Sending PE (global PE number, not process rank).
    pub src_pe: u32,
    /// Destination PE (global PE number, not process rank).
    pub dst_pe: u32,
    /// Runtime data (object id, sequence number, ...). Opaque to the
    /// transport.
    pub tag: u64,
}

impl Header {
    /// Encoded size of a header in bytes.
    pub const SIZE: usize = 32;

    /// A header with the given routing fields and no segments.
    pub fn new(kind: u8, src_pe: u32, dst_pe: u32, tag: u64) -> Header {
        Header {
            kind,
            flags: 0,
            segment_count: 0,
            src_pe,
            dst_pe,
            tag,
        }
    }

    /// Encodes the header in the little-endian wire format (see the
    /// module docs).
    pub fn to_bytes(&self) -> [u8; Header::SIZE] {
        let mut out = [0u8; Header::SIZE];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = WIRE_VERSION;
        out[5] = self.kind;
        out[6] = self.flags;
        out[8..12].copy_from_slice(&self.src_pe.to_le_bytes());
        out[12..16].copy_from_slice(&self.dst_pe.to_le_bytes());
        out[16..24].copy_from_slice(&self.tag.to_le_bytes());
        out[24..26].copy_from_slice(&self.segment_count.to_le_bytes());
        out
    }

    /// Decodes and validates a header from the first [`Header::SIZE`]
    /// bytes of `buf` (trailing bytes are ignored).
    ///
    /// # Errors
    ///
    /// * [`TransportError::Malformed`] on bad magic, unknown version or
    ///   non-zero reserved bytes, as soon as the bytes present show it
    ///   (a short `buf` that already cannot be a header is malformed, not
    ///   truncated);
    /// * [`TransportError::Truncated`] if `buf` is shorter than
    ///   [`Header::SIZE`] and the bytes present could still start a
    ///   valid header;
    /// * [`TransportError::TooLarge`] if `segment_count` exceeds
    ///   [`MAX_SEGMENTS`].
    pub fn from_bytes(buf: &[u8]) -> Result<Header, TransportError> {
        let present = &buf[..buf.len().min(Header::SIZE)];
        check_fixed_header_bytes(present)?;
        let Some(b) = buf.get(..Header::SIZE) else {
            return Err(TransportError::Truncated {
                needed: Header::SIZE,
                got: buf.len(),
            });
        };
        let segment_count = u16::from_le_bytes([b[24], b[25]]);
        if segment_count > MAX_SEGMENTS {
            return Err(TransportError::TooLarge {
                len: u64::from(segment_count),
                max: u64::from(MAX_SEGMENTS),
            });
        }
        Ok(Header {
            kind: b[5],
            flags: b[6],
            segment_count,
            src_pe: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            dst_pe: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            tag: u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
        })
    }
}

/// Checks the header bytes whose value is fixed (magic, version, reserved) among `present`, the
/// first at most [`Header::SIZE`] bytes of a header: those not present yet are not judged. In
/// the order a whole header is checked, so a prefix and the whole header fail alike.
fn check_fixed_header_bytes(present: &[u8]) -> Result<(), TransportError> {
    let magic = &present[..present.len().min(MAGIC.len())];
    if magic != &MAGIC[..magic.len()] {
        return Err(TransportError::Malformed(format!(
            "bad magic {magic:02x?}, expected {MAGIC:02x?}"
        )));
    }
    if let Some(&version) = present.get(4) {
        if version != WIRE_VERSION {
            return Err(TransportError::Malformed(format!(
                "unsupported wire version {version}, expected {WIRE_VERSION}"
            )));
        }
    }
    let mut reserved = present
        .get(7)
        .into_iter()
        .chain(present.get(26..).unwrap_or(&[]));
    if reserved.any(|&x| x != 0) {
        return Err(TransportError::Malformed(
            "non-zero reserved header bytes".to_owned(),
        ));
    }
    Ok(())
}

/// A header plus zero or more zero-copy payload segments.
///
/// Cloning is cheap: segments are reference-counted [`Bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    header: Header,
    segments: Segments,
}

impl Message {
    /// A message with `header` and no segments (`header.segment_count` is
    /// reset to 0).
    pub fn new(header: Header) -> Message {
        Message {
            header: Header {
                segment_count: 0,
                ..header
            },
            segments: Segments::new(),
        }
    }

    /// A message with `header` and the given segments
    /// (`header.segment_count` is set from `segments`).
    ///
    /// # Errors
    ///
    /// [`TransportError::TooLarge`] if there are more than
    /// [`MAX_SEGMENTS`] segments.
    pub fn with_segments(header: Header, segments: Vec<Bytes>) -> Result<Message, TransportError> {
        let segments = Segments::from(segments);
        let count = check_segment_count(segments.len())?;
        Ok(Message {
            header: Header {
                segment_count: count,
                ..header
            },
            segments,
        })
    }

    /// A message with `header` and one segment (`header.segment_count` is
    /// set to 1); kept in place, no vector is allocated.
    pub fn with_segment(header: Header, segment: Bytes) -> Message {
        Message {
            header: Header {
                segment_count: 1,
                ..header
            },
            segments: Segments::from(segment),
        }
    }

    /// A message with `header` and one segment holding a copy of `data`.
    pub fn with_copied_segment(header: Header, data: &[u8]) -> Message {
        Message::with_segment(header, Bytes::copy_from_slice(data))
    }

    /// Appends a segment without copying it.
    ///
    /// # Errors
    ///
    /// [`TransportError::TooLarge`] if the message already has
    /// [`MAX_SEGMENTS`] segments; the message is left unchanged.
    pub fn push_segment(&mut self, segment: Bytes) -> Result<(), TransportError> {
        let count = check_segment_count(self.segments.len() + 1)?;
        self.segments.push(segment);
        self.header.segment_count = count;
        Ok(())
    }

    /// The header; its `segment_count` equals `self.segments().len()`.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Replaces every header field except `segment_count`, which keeps
    /// tracking the segments.
    pub fn set_header(&mut self, header: Header) {
        self.header = Header {
            segment_count: self.header.segment_count,
            ..header
        };
    }

    /// The payload segments, in order.
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// Splits the message into its header and segments.
    pub fn into_parts(self) -> (Header, Segments) {
        (self.header, self.segments)
    }

    /// Total payload length: the sum of the segment lengths (header and
    /// frame prefix excluded).
    pub fn total_len(&self) -> usize {
        self.segments.iter().map(Bytes::len).sum()
    }

    /// Length of this message encoded as a frame: header, segment length
    /// table and payload.
    pub fn frame_len(&self) -> usize {
        prefix_len(self.segments.len()) + self.total_len()
    }
}

/// Converts a segment count to `u16`, enforcing [`MAX_SEGMENTS`].
fn check_segment_count(count: usize) -> Result<u16, TransportError> {
    match u16::try_from(count) {
        Ok(c) if c <= MAX_SEGMENTS => Ok(c),
        _ => Err(TransportError::TooLarge {
            len: count as u64,
            max: u64::from(MAX_SEGMENTS),
        }),
    }
}

/// Length of a frame prefix (header plus length table) for `segments`
/// segments.
fn prefix_len(segments: usize) -> usize {
    Header::SIZE + segments * LEN_SIZE
}

/// Encodes the frame prefix of `msg` for a stream transport: the header
/// bytes followed by the `u64` little-endian length of each segment. The
/// caller writes the segments themselves right after it (ideally with a
/// vectored write), so payload bytes are never copied here.
///
/// ```
/// use bytes::Bytes;
/// use charmrs_transport::{decode_frame, encode_frame_prefix, Header, Message};
///
/// let mut msg = Message::new(Header::new(1, 0, 5, 42));
/// msg.push_segment(Bytes::from_static(b"args"))?;
///
/// let mut wire = encode_frame_prefix(&msg);
/// for seg in msg.segments() {
///     wire.extend_from_slice(seg);
/// }
/// let (decoded, used) = decode_frame(&wire, 1 << 20)?;
/// assert_eq!((decoded, used), (msg, wire.len()));
/// # Ok::<(), charmrs_transport::TransportError>(())
/// ```
pub fn encode_frame_prefix(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix_len(msg.segments.len()));
    out.extend_from_slice(&msg.header.to_bytes());
    for seg in &msg.segments {
        out.extend_from_slice(&(seg.len() as u64).to_le_bytes());
    }
    out
}

/// Appends to `out` the frame of a message of one segment, `data`, with `header`: the bytes of
/// [`encode_frame_prefix`] and the segment for `Message::with_segment(header, data)`, without
/// building the message ([`single_segment_frame_len`] bytes).
pub fn write_single_segment_frame(out: &mut Vec<u8>, header: &Header, data: &[u8]) {
    let header = Header {
        segment_count: 1,
        ..*header
    };
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
}

/// Length of the frame of a message of one segment of `len` bytes.
pub fn single_segment_frame_len(len: usize) -> usize {
    prefix_len(1) + len
}

/// The header of the frame at the start of `buf` and where its segment's bytes lie, if the frame
/// has exactly one segment (`None` for any other count); nothing is allocated or copied. The
/// frame may be followed by other bytes (its end is the range's end). Errors as
/// [`decode_frame`]'s.
pub fn parse_single_segment_frame(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(Header, std::ops::Range<usize>)>, TransportError> {
    let header = Header::from_bytes(buf)?;
    if header.segment_count != 1 {
        return Ok(None);
    }
    let (prefix, consumed) = frame_extent(buf, &header, max_len)?;
    Ok(Some((header, prefix..consumed)))
}

/// The prefix length and the total length of the frame of `header` at the start of `buf`, its
/// length table checked (in `u64`, against overflow and `max_len`: the lengths come from the
/// peer) and the whole frame present. Allocates nothing.
fn frame_extent(
    buf: &[u8],
    header: &Header,
    max_len: usize,
) -> Result<(usize, usize), TransportError> {
    let max = max_len as u64;
    let prefix = prefix_len(usize::from(header.segment_count));
    if prefix as u64 > max {
        return Err(TransportError::TooLarge {
            len: prefix as u64,
            max,
        });
    }
    let Some(table) = buf.get(Header::SIZE..prefix) else {
        return Err(TransportError::Truncated {
            needed: prefix,
            got: buf.len(),
        });
    };
    let mut total = prefix as u64;
    for len in segment_lens(table) {
        total = match total.checked_add(len) {
            Some(t) if t <= max => t,
            _ => {
                return Err(TransportError::TooLarge {
                    len: total.saturating_add(len),
                    max,
                })
            }
        };
    }
    // `total <= max_len`, so it and every partial sum fit in usize.
    let consumed = total as usize;
    if buf.len() < consumed {
        return Err(TransportError::Truncated {
            needed: consumed,
            got: buf.len(),
        });
    }
    Ok((prefix, consumed))
}

/// The segment lengths of a frame's length table.
fn segment_lens(table: &[u8]) -> impl Iterator<Item = u64> + '_ {
    table.chunks_exact(LEN_SIZE).map(|chunk| {
        let mut raw = [0u8; LEN_SIZE];
        raw.copy_from_slice(chunk);
        u64::from_le_bytes(raw)
    })
}

/// Where the pieces of one frame lie in an input buffer.
struct FrameLayout {
    header: Header,
    /// `(start, end)` byte offsets of each segment in the input.
    segments: Vec<(usize, usize)>,
    /// Total frame length (bytes consumed).
    consumed: usize,
}

/// Parses one frame at the start of `buf` without copying anything.
fn parse_frame(buf: &[u8], max_len: usize) -> Result<FrameLayout, TransportError> {
    let header = Header::from_bytes(buf)?;
    let (prefix, consumed) = frame_extent(buf, &header, max_len)?;
    let mut start = prefix;
    let segments = segment_lens(&buf[Header::SIZE..prefix])
        .map(|len| {
            // Within `consumed` (checked by `frame_extent`): fits in usize.
            let end = start + len as usize;
            let range = (start, end);
            start = end;
            range
        })
        .collect();
    Ok(FrameLayout {
        header,
        segments,
        consumed,
    })
}

/// Length of the frame at the start of `buf` (prefix plus payload), found
/// by validating its prefix without decoding or copying the segments. Lets
/// a stream transport split a complete frame off its receive buffer before
/// decoding it with [`decode_frame_bytes`].
///
/// # Errors
///
/// Same as [`decode_frame`]; in particular
/// [`TransportError::Truncated`]`{ needed, .. }` while the prefix or the
/// payload is incomplete. Once the whole prefix is present, `needed` is the
/// exact frame length.
pub fn peek_frame_len(buf: &[u8], max_len: usize) -> Result<usize, TransportError> {
    let header = Header::from_bytes(buf)?;
    frame_extent(buf, &header, max_len).map(|(_, consumed)| consumed)
}

/// Where the largest segment of the frame at the start of `buf` begins, as
/// an offset from the frame's start, once `buf` holds the frame's whole
/// prefix (`None` before that, for a frame without segments, or on a bad
/// header). A stream transport uses it to place a large frame so that its
/// bulk is aligned (numbers in it can then be read in place).
pub fn peek_largest_segment_start(buf: &[u8]) -> Option<usize> {
    let header = Header::from_bytes(buf).ok()?;
    let count = usize::from(header.segment_count);
    let prefix = prefix_len(count);
    let table = buf.get(Header::SIZE..prefix)?;
    let lens = segment_lens(table).map(|len| usize::try_from(len).unwrap_or(usize::MAX));
    (count > 0).then(|| prefix.saturating_add(largest_segment_start(lens)))
}

/// Where the largest of segments of lengths `lens`, laid back to back,
/// starts (the first of equals; 0 for none). Transports place a message's
/// largest segment aligned with it.
pub fn largest_segment_start(lens: impl IntoIterator<Item = usize>) -> usize {
    let (mut best, mut best_len, mut at) = (0, 0, 0usize);
    for len in lens {
        if len > best_len {
            (best, best_len) = (at, len);
        }
        at = at.saturating_add(len);
    }
    best
}

/// Decodes one frame from the start of `buf`, copying the segments into
/// fresh buffers. Returns the message and the number of bytes consumed.
///
/// `max_len` bounds the whole frame (prefix plus payload); it is checked
/// before any payload is touched, so a hostile length cannot cause a large
/// allocation.
///
/// # Errors
///
/// * [`TransportError::Truncated`] if `buf` holds only part of a frame
///   (wait for more input);
/// * [`TransportError::TooLarge`] if the frame would exceed `max_len` or
///   declares more than [`MAX_SEGMENTS`] segments;
/// * [`TransportError::Malformed`] on a bad header.
pub fn decode_frame(buf: &[u8], max_len: usize) -> Result<(Message, usize), TransportError> {
    let layout = parse_frame(buf, max_len)?;
    let segments = layout
        .segments
        .iter()
        .map(|&(s, e)| Bytes::copy_from_slice(&buf[s..e]))
        .collect();
    Ok((
        Message {
            header: layout.header,
            segments,
        },
        layout.consumed,
    ))
}

/// Like [`decode_frame`], but the segments share `buf`'s storage instead of
/// being copied (zero-copy receive for layers that read into a
/// [`bytes::BytesMut`] and freeze it).
///
/// # Errors
///
/// Same as [`decode_frame`].
pub fn decode_frame_bytes(buf: &Bytes, max_len: usize) -> Result<(Message, usize), TransportError> {
    let layout = parse_frame(buf, max_len)?;
    let segments = layout
        .segments
        .iter()
        .map(|&(s, e)| buf.slice(s..e))
        .collect();
    Ok((
        Message {
            header: layout.header,
            segments,
        },
        layout.consumed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        let mut h = Header::new(7, 3, 9, 0xDEAD_BEEF_0123_4567);
        h.flags = 0x5A;
        let mut m = Message::new(h);
        m.push_segment(Bytes::from_static(b"args")).unwrap();
        m.push_segment(Bytes::new()).unwrap();
        m.push_segment(Bytes::from(vec![1u8; 1000])).unwrap();
        m
    }

    fn frame(m: &Message) -> Vec<u8> {
        let mut out = encode_frame_prefix(m);
        for s in m.segments() {
            out.extend_from_slice(s);
        }
        out
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            kind: 1,
            flags: 2,
            segment_count: 3,
            src_pe: u32::MAX,
            dst_pe: 5,
            tag: u64::MAX - 1,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..4], b"CHRM");
        assert_eq!(Header::from_bytes(&b).unwrap(), h);
    }

    #[test]
    fn header_rejects_bad_input() {
        let b = Header::new(1, 2, 3, 4).to_bytes();
        assert!(matches!(
            Header::from_bytes(&b[..31]),
            Err(TransportError::Truncated {
                needed: 32,
                got: 31
            })
        ));
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            Header::from_bytes(&bad),
            Err(TransportError::Malformed(_))
        ));
        let mut bad = b;
        bad[4] = WIRE_VERSION + 1;
        assert!(matches!(
            Header::from_bytes(&bad),
            Err(TransportError::Malformed(_))
        ));
        let mut bad = b;
        bad[30] = 1;
        assert!(matches!(
            Header::from_bytes(&bad),
            Err(TransportError::Malformed(_))
        ));
        let mut bad = b;
        bad[24..26].copy_from_slice(&(MAX_SEGMENTS + 1).to_le_bytes());
        assert!(matches!(
            Header::from_bytes(&bad),
            Err(TransportError::TooLarge { len: 257, max: 256 })
        ));
    }

    /// A short input that already cannot be a header is malformed at once (a stream layer
    /// would otherwise wait for more of it); a short input that can still be one is truncated.
    #[test]
    fn a_short_header_is_malformed_as_soon_as_its_bytes_show_it() {
        let valid = frame(&sample());
        let corruptions: [(usize, u8); 5] =
            [(0, b'X'), (3, b'X'), (4, WIRE_VERSION + 1), (7, 1), (26, 1)];
        for (at, byte) in corruptions {
            let mut bad = valid.clone();
            bad[at] = byte;
            for cut in 1..=Header::SIZE - 1 {
                let got = Header::from_bytes(&bad[..cut]);
                if cut > at {
                    assert!(
                        matches!(got, Err(TransportError::Malformed(_))),
                        "byte {at} bad, cut {cut}: {got:?}"
                    );
                    assert!(
                        matches!(
                            decode_frame(&bad[..cut], 1 << 20),
                            Err(TransportError::Malformed(_))
                        ),
                        "byte {at} bad, cut {cut}: decode_frame"
                    );
                    assert!(matches!(
                        peek_frame_len(&bad[..cut], 1 << 20),
                        Err(TransportError::Malformed(_))
                    ));
                } else {
                    assert!(
                        matches!(got, Err(TransportError::Truncated { needed: 32, got }) if got == cut),
                        "byte {at} bad but not present, cut {cut}: {got:?}"
                    );
                }
            }
        }
        // Noise that is not a frame, at every length under a header.
        let noise: Vec<u8> = (0..Header::SIZE as u8)
            .map(|i| i.wrapping_mul(37) ^ 0xA5)
            .collect();
        for cut in 1..Header::SIZE {
            assert!(
                matches!(
                    Header::from_bytes(&noise[..cut]),
                    Err(TransportError::Malformed(_))
                ),
                "noise cut {cut}"
            );
        }
        // Valid prefixes are still truncated (and the empty input).
        for cut in 0..Header::SIZE {
            assert!(matches!(
                Header::from_bytes(&valid[..cut]),
                Err(TransportError::Truncated { needed: 32, got }) if got == cut
            ));
        }
    }

    #[test]
    fn message_tracks_segments() {
        let m = sample();
        assert_eq!(m.header().segment_count, 3);
        assert_eq!(m.total_len(), 1004);
        assert_eq!(m.frame_len(), 32 + 3 * 8 + 1004);

        // `new` and `set_header` cannot desynchronise the count.
        let mut h = *m.header();
        h.segment_count = 99;
        assert_eq!(Message::new(h).header().segment_count, 0);
        let mut m2 = m.clone();
        h.tag = 42;
        m2.set_header(h);
        assert_eq!(m2.header().segment_count, 3);
        assert_eq!(m2.header().tag, 42);
    }

    #[test]
    fn segment_limit_is_enforced() {
        let mut m = Message::new(Header::default());
        for _ in 0..MAX_SEGMENTS {
            m.push_segment(Bytes::new()).unwrap();
        }
        assert!(matches!(
            m.push_segment(Bytes::new()),
            Err(TransportError::TooLarge { .. })
        ));
        assert_eq!(m.segments().len(), usize::from(MAX_SEGMENTS));
        assert_eq!(m.header().segment_count, MAX_SEGMENTS);
        let too_many = vec![Bytes::new(); usize::from(MAX_SEGMENTS) + 1];
        assert!(Message::with_segments(Header::default(), too_many).is_err());
    }

    #[test]
    fn frame_round_trips_with_trailing_data() {
        let m = sample();
        let mut buf = frame(&m);
        let len = buf.len();
        buf.extend_from_slice(b"next frame...");
        let (got, used) = decode_frame(&buf, 1 << 20).unwrap();
        assert_eq!(used, len);
        assert_eq!(got, m);

        let shared = Bytes::from(buf);
        let (got, used) = decode_frame_bytes(&shared, 1 << 20).unwrap();
        assert_eq!(used, len);
        assert_eq!(got, m);
        // Zero-copy: the segment points into the input buffer.
        let base = shared.as_ptr() as usize;
        let seg = got.segments()[2].as_ptr() as usize;
        assert!(seg >= base && seg < base + shared.len());
    }

    #[test]
    fn the_largest_segment_is_found_from_the_prefix_alone() {
        let m = sample();
        let buf = frame(&m);
        let segs = m.segments();
        let (largest, _) = segs.iter().enumerate().fold((0, 0), |(bi, bl), (i, s)| {
            if s.len() > bl {
                (i, s.len())
            } else {
                (bi, bl)
            }
        });
        let start = prefix_len(segs.len()) + segs[..largest].iter().map(|s| s.len()).sum::<usize>();
        let prefix = prefix_len(segs.len());
        for cut in 0..prefix {
            assert_eq!(peek_largest_segment_start(&buf[..cut]), None, "cut {cut}");
        }
        for cut in prefix..=buf.len() {
            assert_eq!(peek_largest_segment_start(&buf[..cut]), Some(start));
        }
        let empty = frame(&Message::new(Header::new(1, 0, 1, 0)));
        assert_eq!(peek_largest_segment_start(&empty), None);
        let mut first = Message::new(Header::new(1, 0, 1, 0));
        first.push_segment(Bytes::from(vec![0u8; 1000])).unwrap();
        first.push_segment(Bytes::from_static(b"tail")).unwrap();
        assert_eq!(
            peek_largest_segment_start(&frame(&first)),
            Some(prefix_len(2))
        );
    }

    #[test]
    fn the_largest_of_segment_lengths_is_found() {
        assert_eq!(largest_segment_start([]), 0);
        assert_eq!(largest_segment_start([3, 10, 4]), 3);
        assert_eq!(largest_segment_start([10, 3, 10]), 0, "the first of equals");
        assert_eq!(largest_segment_start([0, 0, 7]), 0);
    }

    #[test]
    fn every_prefix_is_truncated() {
        let buf = frame(&sample());
        for cut in 0..buf.len() {
            match decode_frame(&buf[..cut], 1 << 20) {
                Err(TransportError::Truncated { needed, got }) => {
                    assert_eq!(got, cut);
                    assert!(needed > cut && needed <= buf.len());
                }
                other => panic!("cut {cut}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_single_segment_frame_is_parsed_in_place_like_decode_frame() {
        let m = Message::with_segment(Header::new(3, 1, 2, 9), Bytes::from_static(b"payload"));
        let mut written = Vec::new();
        write_single_segment_frame(&mut written, &Header::new(3, 1, 2, 9), b"payload");
        assert_eq!(written, frame(&m));
        assert_eq!(written.len(), single_segment_frame_len(7));
        let mut buf = frame(&m);
        buf.extend_from_slice(b"next frame");
        let (h, range) = parse_single_segment_frame(&buf, 1 << 20).unwrap().unwrap();
        let (decoded, used) = decode_frame(&buf, 1 << 20).unwrap();
        assert_eq!(h, *decoded.header());
        assert_eq!(&buf[range.clone()], &decoded.segments()[0][..]);
        assert_eq!(range.end, used);
        // Other segment counts are not its business.
        assert_eq!(
            parse_single_segment_frame(&frame(&sample()), 1 << 20).unwrap(),
            None
        );
        let none = frame(&Message::new(Header::new(3, 1, 2, 9)));
        assert_eq!(parse_single_segment_frame(&none, 1 << 20).unwrap(), None);
        // Hostile input: every truncation, a limit, a length that would overflow.
        let whole = frame(&m);
        for cut in 0..whole.len() {
            assert!(
                matches!(
                    parse_single_segment_frame(&whole[..cut], 1 << 20),
                    Err(TransportError::Truncated { .. })
                ),
                "cut {cut}"
            );
        }
        assert!(matches!(
            parse_single_segment_frame(&whole, whole.len() - 1),
            Err(TransportError::TooLarge { .. })
        ));
        let mut evil = whole.clone();
        evil[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse_single_segment_frame(&evil, usize::MAX),
            Err(TransportError::TooLarge { .. })
        ));
    }

    #[test]
    fn oversized_frames_are_rejected() {
        let buf = frame(&sample());
        assert!(matches!(
            decode_frame(&buf, buf.len() - 1),
            Err(TransportError::TooLarge { .. })
        ));
        assert!(decode_frame(&buf, buf.len()).is_ok());

        // A hostile length that would overflow u64 arithmetic.
        let mut m = Message::new(Header::default());
        m.push_segment(Bytes::new()).unwrap();
        m.push_segment(Bytes::new()).unwrap();
        let mut evil = encode_frame_prefix(&m);
        evil[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        evil[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&evil, usize::MAX),
            Err(TransportError::TooLarge { .. })
        ));
    }

    #[test]
    fn peek_reports_the_exact_length() {
        let m = sample();
        let buf = frame(&m);
        assert_eq!(peek_frame_len(&buf, 1 << 20).unwrap(), buf.len());
        // Once the prefix is complete, `needed` is exact.
        match peek_frame_len(&buf[..60], 1 << 20) {
            Err(TransportError::Truncated { needed, got: 60 }) => assert_eq!(needed, buf.len()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            peek_frame_len(&buf, 100),
            Err(TransportError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_magic_is_malformed() {
        let mut buf = frame(&sample());
        buf[1] ^= 0xFF;
        assert!(matches!(
            decode_frame(&buf, 1 << 20),
            Err(TransportError::Malformed(_))
        ));
    }

    /// Deterministic xorshift64 generator for the fuzz-like test.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    #[test]
    fn hostile_input_never_panics() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let valid = frame(&sample());
        for i in 0..20_000 {
            // Half pure noise, half mutated valid frames (which get past the
            // magic check and exercise the length-table paths).
            let mut buf: Vec<u8> = if i % 2 == 0 {
                let len = (rng.next() % 256) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                let mut v = valid.clone();
                for _ in 0..(1 + rng.next() % 4) {
                    let pos = (rng.next() % v.len() as u64) as usize;
                    v[pos] = rng.next() as u8;
                }
                let cut = (rng.next() % (v.len() as u64 + 1)) as usize;
                v.truncate(cut);
                v
            };
            if i % 7 == 0 && buf.len() >= 8 {
                // Keep a valid-looking header start on some noise inputs.
                buf[..4].copy_from_slice(&MAGIC);
                buf[4] = WIRE_VERSION;
            }
            let max = (rng.next() % 4096) as usize;
            if let Ok((m, used)) = decode_frame(&buf, max) {
                assert!(used <= buf.len() && used <= max);
                assert_eq!(m.frame_len(), used);
                assert_eq!(usize::from(m.header().segment_count), m.segments().len());
            }
            let shared = Bytes::from(buf);
            let _ = decode_frame_bytes(&shared, max);
        }
    }
}
