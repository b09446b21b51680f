//! The packets the layer exchanges over its `FI_EP_RDM` endpoint.
//!
//! Every packet is one libfabric message (`FI_MSG`) that fits one receive
//! buffer, and starts with an 8-byte preamble (little-endian):
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 1    | marker [`MARKER`]                       |
//! | 1      | 1    | packet type (`PKT_*`)                   |
//! | 2      | 2    | reserved, 0                             |
//! | 4      | 4    | sender's endpoint id (its process rank  |
//! |        |      | with one endpoint per process)          |
//!
//! Then, by type:
//!
//! * [`PKT_DATA`] (eager message): a charmrs frame exactly as
//!   [`charmrs_transport::encode_frame_prefix`] lays it out — 32-byte
//!   header, one `u64` length per segment — followed by the segment bytes.
//! * [`PKT_RNDV`] (rendezvous descriptor of a large message): `u64`
//!   transfer id, the frame prefix (header and segment lengths), then per
//!   segment its registered remote address and key (`u64` each; both 0 for
//!   an empty segment; address [`INLINE_ADDR`] and key 0 for a segment
//!   carried inline), then the bytes of the inline segments, in order (at
//!   most [`INLINE_MAX`] in all: a small segment, such as an entry call's
//!   arguments beside its large buffer, is not worth a registration and a
//!   read of its own). The receiver `fi_read`s the other segments and
//!   answers [`PKT_ACK`].
//! * [`PKT_ACK`]: `u64` transfer id of a finished rendezvous; the sender
//!   drops its registrations.
//! * [`PKT_BYE`]: nothing; the sender is shutting down cleanly, so its
//!   disappearance is not a failure.
//!
//! Decoders treat packets as hostile: lengths are checked before any
//! allocation and against the receive length; errors are
//! [`TransportError::Malformed`]/[`TransportError::TooLarge`].

use bytes::Bytes;
use charmrs_transport::{
    decode_frame_bytes, encode_frame_prefix, Header, Message, ProcessId, TransportError,
    MAX_SEGMENTS,
};

/// First byte of every packet.
pub const MARKER: u8 = 0xC7;
/// Eager message.
pub const PKT_DATA: u8 = 1;
/// Rendezvous descriptor.
pub const PKT_RNDV: u8 = 2;
/// Rendezvous finished.
pub const PKT_ACK: u8 = 3;
/// Clean shutdown notice.
pub const PKT_BYE: u8 = 4;

/// Size of the preamble.
pub const PREAMBLE: usize = 8;

/// Most bytes of inline segments in one rendezvous descriptor.
pub const INLINE_MAX: usize = 1024;

/// Remote address that marks a segment carried inside its descriptor.
pub const INLINE_ADDR: u64 = u64::MAX;

/// Largest rendezvous descriptor ([`MAX_SEGMENTS`] segments, [`INLINE_MAX`]
/// inline bytes): receive buffers are at least this large.
pub const MAX_RNDV_LEN: usize =
    PREAMBLE + 8 + Header::SIZE + MAX_SEGMENTS as usize * 24 + INLINE_MAX;

/// The preamble of a packet of type `kind` from endpoint `rank`.
pub fn preamble(kind: u8, rank: ProcessId) -> [u8; PREAMBLE] {
    let mut p = [0u8; PREAMBLE];
    p[0] = MARKER;
    p[1] = kind;
    p[4..8].copy_from_slice(&rank.to_le_bytes());
    p
}

/// Type and sender of the packet `buf`.
pub fn parse_preamble(buf: &[u8]) -> Result<(u8, ProcessId), TransportError> {
    let Some(p) = buf.get(..PREAMBLE) else {
        return Err(TransportError::Malformed(format!(
            "ofi packet of {} bytes is shorter than its preamble",
            buf.len()
        )));
    };
    if p[0] != MARKER || p[2] != 0 || p[3] != 0 {
        return Err(TransportError::Malformed(format!(
            "ofi packet with bad preamble {p:02x?}"
        )));
    }
    Ok((p[1], u32::from_le_bytes([p[4], p[5], p[6], p[7]])))
}

/// The eager packet's first part: preamble and frame prefix (the segments
/// follow as their own iovec entries).
pub fn data_prefix(rank: ProcessId, msg: &Message) -> Vec<u8> {
    let frame = encode_frame_prefix(msg);
    let mut out = Vec::with_capacity(PREAMBLE + frame.len());
    out.extend_from_slice(&preamble(PKT_DATA, rank));
    out.extend_from_slice(&frame);
    out
}

/// Writes into `out` (cleared first) the eager packet of a message of one segment, `data`, with
/// `header`: the same bytes as [`data_prefix`] and the segment of
/// `Message::with_segment(header, data)`, without building the message.
pub fn single_segment_packet(out: &mut Vec<u8>, rank: ProcessId, header: &Header, data: &[u8]) {
    out.clear();
    out.extend_from_slice(&preamble(PKT_DATA, rank));
    charmrs_transport::write_single_segment_frame(out, header, data);
}

/// Length of the eager packet of a message of one segment of `len` bytes.
pub fn single_segment_packet_len(len: usize) -> usize {
    PREAMBLE + charmrs_transport::single_segment_frame_len(len)
}

/// Length of the eager packet carrying `msg`.
pub fn data_len(msg: &Message) -> usize {
    PREAMBLE + msg.frame_len()
}

/// The header of an eager packet (`buf` is the whole packet, in the receive buffer) and where
/// its segment lies in `buf`, if it carries a message of exactly one segment (`None`
/// otherwise: [`decode_data`] decodes it); nothing is copied.
pub fn single_segment_data(
    buf: &[u8],
) -> Result<Option<(Header, std::ops::Range<usize>)>, TransportError> {
    let frame = &buf[PREAMBLE.min(buf.len())..];
    match charmrs_transport::parse_single_segment_frame(frame, frame.len())? {
        Some((_, range)) if range.end != frame.len() => Err(TransportError::Malformed(format!(
            "ofi eager packet has {} bytes after its frame",
            frame.len() - range.end
        ))),
        Some((header, range)) => Ok(Some((header, PREAMBLE + range.start..PREAMBLE + range.end))),
        None => Ok(None),
    }
}

/// Decodes an eager packet (`buf` is the whole packet, copied out of the
/// receive buffer); the segments are views of `buf`.
pub fn decode_data(buf: &Bytes) -> Result<Message, TransportError> {
    let frame = buf.slice(PREAMBLE..);
    let (msg, used) = decode_frame_bytes(&frame, frame.len())?;
    if used != frame.len() {
        return Err(TransportError::Malformed(format!(
            "ofi eager packet has {} bytes after its frame",
            frame.len() - used
        )));
    }
    Ok(msg)
}

/// One segment of a rendezvous message as the receiver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSeg {
    /// Length in bytes.
    pub len: u64,
    /// Remote address of its first byte (as the provider wants it);
    /// [`INLINE_ADDR`] if the bytes came inside the descriptor.
    pub addr: u64,
    /// Registration key.
    pub key: u64,
}

impl RemoteSeg {
    /// Whether the segment's bytes came inside the descriptor.
    pub fn is_inline(&self) -> bool {
        self.addr == INLINE_ADDR
    }
}

/// A decoded rendezvous descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rndv {
    /// The sender's transfer id (echoed in the ACK).
    pub id: u64,
    /// The message header (its `segment_count` is `segs.len()`).
    pub header: Header,
    /// The segments, to read unless inline.
    pub segs: Vec<RemoteSeg>,
    /// The bytes of the inline segments, in segment order.
    pub inline: Vec<u8>,
}

impl Rndv {
    /// Sum of the segment lengths.
    pub fn total(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum()
    }
}

/// Encodes the descriptor of `msg` (transfer `id`), whose segments are
/// registered at `remote` (`(addr, key)` per segment, in order;
/// `(INLINE_ADDR, 0)` for a segment to carry inline, at most [`INLINE_MAX`]
/// bytes of them).
pub fn encode_rndv(rank: ProcessId, id: u64, msg: &Message, remote: &[(u64, u64)]) -> Vec<u8> {
    let frame = encode_frame_prefix(msg);
    let mut out = Vec::with_capacity(PREAMBLE + 8 + frame.len() + remote.len() * 16);
    out.extend_from_slice(&preamble(PKT_RNDV, rank));
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&frame);
    for (addr, key) in remote {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&key.to_le_bytes());
    }
    for (seg, (addr, _)) in msg.segments().iter().zip(remote) {
        if *addr == INLINE_ADDR {
            out.extend_from_slice(seg);
        }
    }
    out
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..at + 8)?;
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    Some(u64::from_le_bytes(w))
}

/// Decodes a rendezvous descriptor; the total length must not exceed
/// `max_total`.
pub fn decode_rndv(buf: &[u8], max_total: u64) -> Result<Rndv, TransportError> {
    let short = || {
        TransportError::Malformed(format!(
            "ofi rendezvous packet of {} bytes is truncated",
            buf.len()
        ))
    };
    let id = u64_at(buf, PREAMBLE).ok_or_else(short)?;
    let hdr_at = PREAMBLE + 8;
    let header = Header::from_bytes(buf.get(hdr_at..).ok_or_else(short)?)?;
    let n = usize::from(header.segment_count);
    let lens_at = hdr_at + Header::SIZE;
    let keys_at = lens_at + 8 * n;
    let inline_at = keys_at + 16 * n;
    let mismatch = || {
        TransportError::Malformed(format!(
            "ofi rendezvous packet of {} bytes does not match its {n} segments",
            buf.len()
        ))
    };
    if buf.len() < inline_at || buf.len() - inline_at > INLINE_MAX {
        return Err(mismatch());
    }
    let mut segs = Vec::with_capacity(n);
    let mut total = 0u64;
    let mut inline_len = 0u64;
    for i in 0..n {
        let len = u64_at(buf, lens_at + 8 * i).ok_or_else(short)?;
        total = total.saturating_add(len);
        if total > max_total {
            return Err(TransportError::TooLarge {
                len: total,
                max: max_total,
            });
        }
        let seg = RemoteSeg {
            len,
            addr: u64_at(buf, keys_at + 16 * i).ok_or_else(short)?,
            key: u64_at(buf, keys_at + 16 * i + 8).ok_or_else(short)?,
        };
        if seg.is_inline() {
            inline_len = inline_len.saturating_add(len);
        } else if seg.addr.checked_add(len).is_none() {
            return Err(TransportError::Malformed(format!(
                "ofi rendezvous segment {i} at {:#x} of {len} bytes runs past the end of the \
                 address space",
                seg.addr
            )));
        }
        segs.push(seg);
    }
    if inline_len != (buf.len() - inline_at) as u64 {
        return Err(mismatch());
    }
    let inline = buf[inline_at..].to_vec();
    Ok(Rndv {
        id,
        header,
        segs,
        inline,
    })
}

/// An ACK for transfer `id`.
pub fn encode_ack(rank: ProcessId, id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREAMBLE + 8);
    out.extend_from_slice(&preamble(PKT_ACK, rank));
    out.extend_from_slice(&id.to_le_bytes());
    out
}

/// The transfer id of an ACK.
pub fn decode_ack(buf: &[u8]) -> Result<u64, TransportError> {
    if buf.len() != PREAMBLE + 8 {
        return Err(TransportError::Malformed(format!(
            "ofi ack packet of {} bytes, expected {}",
            buf.len(),
            PREAMBLE + 8
        )));
    }
    u64_at(buf, PREAMBLE).ok_or_else(|| TransportError::Malformed("short ack".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message::with_segments(
            Header::new(3, 1, 2, 99),
            vec![
                Bytes::from_static(b"args"),
                Bytes::new(),
                Bytes::from(vec![7u8; 1000]),
            ],
        )
        .unwrap()
    }

    #[test]
    fn eager_round_trip() {
        let m = sample();
        let mut pkt = data_prefix(5, &m);
        for s in m.segments() {
            pkt.extend_from_slice(s);
        }
        assert_eq!(pkt.len(), data_len(&m));
        assert_eq!(parse_preamble(&pkt).unwrap(), (PKT_DATA, 5));
        assert_eq!(decode_data(&Bytes::from(pkt)).unwrap(), m);
    }

    #[test]
    fn a_single_segment_packet_is_an_eager_packet_read_in_place() {
        let h = Header::new(3, 1, 2, 99);
        let m = Message::with_segment(h, Bytes::from_static(b"args"));
        let mut pkt = Vec::new();
        single_segment_packet(&mut pkt, 5, &h, b"args");
        let mut expected = data_prefix(5, &m);
        expected.extend_from_slice(b"args");
        assert_eq!(pkt, expected);
        assert_eq!(pkt.len(), single_segment_packet_len(4));
        let (header, range) = single_segment_data(&pkt).unwrap().unwrap();
        assert_eq!(header, *m.header());
        assert_eq!(&pkt[range], b"args");
        // Several segments: decoded the general way; trailing bytes: refused.
        let mut several = data_prefix(5, &sample());
        for s in sample().segments() {
            several.extend_from_slice(s);
        }
        assert_eq!(single_segment_data(&several).unwrap(), None);
        pkt.push(0);
        assert!(matches!(
            single_segment_data(&pkt),
            Err(TransportError::Malformed(_))
        ));
        assert!(single_segment_data(&pkt[..PREAMBLE + 10]).is_err());
    }

    #[test]
    fn rndv_and_ack_round_trip() {
        let m = sample();
        let remote = [(0x1000, 1), (0, 0), (0x2000, 3)];
        let pkt = encode_rndv(4, 77, &m, &remote);
        assert!(pkt.len() <= MAX_RNDV_LEN);
        assert_eq!(parse_preamble(&pkt).unwrap(), (PKT_RNDV, 4));
        let r = decode_rndv(&pkt, 1 << 20).unwrap();
        assert_eq!((r.id, r.header, r.total()), (77, *m.header(), 1004));
        assert_eq!(
            r.segs[2],
            RemoteSeg {
                len: 1000,
                addr: 0x2000,
                key: 3
            }
        );
        assert!(matches!(
            decode_rndv(&pkt, 1000),
            Err(TransportError::TooLarge { .. })
        ));
        assert!(decode_rndv(&pkt[..pkt.len() - 1], 1 << 20).is_err());
        assert!(r.inline.is_empty());
        // The arguments carried inline, the buffer read.
        let pkt = encode_rndv(4, 78, &m, &[(INLINE_ADDR, 0), (0, 0), (0x2000, 3)]);
        let r = decode_rndv(&pkt, 1 << 20).unwrap();
        assert!(r.segs[0].is_inline() && !r.segs[2].is_inline());
        assert_eq!((r.inline.as_slice(), r.total()), (&b"args"[..], 1004));
        // Inline bytes must match the inline segments' lengths exactly.
        assert!(decode_rndv(&pkt[..pkt.len() - 1], 1 << 20).is_err());
        let mut longer = pkt.clone();
        longer.push(0);
        assert!(decode_rndv(&longer, 1 << 20).is_err());
        let ack = encode_ack(4, 77);
        assert_eq!(parse_preamble(&ack).unwrap(), (PKT_ACK, 4));
        assert_eq!(decode_ack(&ack).unwrap(), 77);
    }

    #[test]
    fn hostile_packets_are_rejected_not_panicking() {
        assert!(parse_preamble(b"short").is_err());
        assert!(parse_preamble(&[0u8; 8]).is_err());
        let mut pkt = data_prefix(0, &sample());
        pkt.truncate(pkt.len() - 3);
        assert!(decode_data(&Bytes::from(pkt)).is_err());
        for cut in 0..200 {
            let pkt = encode_rndv(0, 1, &sample(), &[(1, 1), (0, 0), (2, 2)]);
            let _ = decode_rndv(&pkt[..cut.min(pkt.len())], u64::MAX);
            let pkt = encode_rndv(0, 1, &sample(), &[(INLINE_ADDR, 0), (0, 0), (2, 2)]);
            let _ = decode_rndv(&pkt[..cut.min(pkt.len())], u64::MAX);
        }
        // A segment whose address plus length wraps around is refused, naming it.
        let wraps = encode_rndv(0, 1, &sample(), &[(1, 1), (0, 0), (u64::MAX - 10, 2)]);
        let err = decode_rndv(&wraps, u64::MAX).unwrap_err().to_string();
        assert!(
            err.contains("segment 2") && err.contains("address space"),
            "{err}"
        );
        // Claimed inline bytes beyond the limit are refused before they are copied.
        let mut big = encode_rndv(0, 1, &sample(), &[(INLINE_ADDR, 0), (0, 0), (2, 2)]);
        big.resize(big.len() + INLINE_MAX + 1, 0);
        assert!(decode_rndv(&big, u64::MAX).is_err());
    }
}
