//! The TCP layer's wire protocol, public so tools and tests can speak it
//! (or deliberately misspeak it).
//!
//! # Connections
//!
//! Connections are *one-way* for data: process `a` sends to `b` only on the
//! connection `a` opened to `b` (made lazily on `a`'s first send), so each
//! ordered pair has exactly one data stream and no connect race exists.
//!
//! 1. The connector sends a [`HELLO_LEN`]-byte hello ([`encode_hello`]):
//!    `b"CHTC"`, version, 3 zero bytes, `u32` rank, `u32` job size, the
//!    32-byte job secret.
//! 2. The acceptor checks magic, version, size, rank (in range, not its
//!    own, not already connected) and the secret (constant time). If any
//!    check fails it logs the refusal with the peer address and closes the
//!    connection. Otherwise it answers with the same layout under
//!    `b"CHTA"` carrying its own rank, so the connector knows it reached
//!    the right process of the right job.
//! 3. The connector then sends *packets*: one type byte ([`PKT_DATA`], ...)
//!    followed by one transport frame
//!    ([`encode_frame_prefix`](charmrs_transport::encode_frame_prefix) +
//!    segments), except [`PKT_BYE`] which is the type byte alone.
//! 4. The acceptor never writes again except a single [`BYE_BYTE`] when its
//!    layer shuts down cleanly.
//!
//! All integers are little-endian.

use charmrs_transport::kv::{JobSecret, SECRET_LEN};
use charmrs_transport::ProcessId;

/// Bootstrap key under which each process publishes its listening address
/// (`ip:port`, UTF-8).
pub const ADDR_KEY: &str = "charmrs-tcp/addr";

/// Magic of a connector's hello.
pub const HELLO_MAGIC: [u8; 4] = *b"CHTC";
/// Magic of an acceptor's answer.
pub const ACK_MAGIC: [u8; 4] = *b"CHTA";
/// Version of this protocol.
pub const PROTOCOL_VERSION: u8 = 1;
/// Length of a hello and of its answer.
pub const HELLO_LEN: usize = 4 + 4 + 4 + 4 + SECRET_LEN;

/// Packet: an application message.
pub const PKT_DATA: u8 = 0;
/// Packet: a remote read request; the frame's header carries the
/// completion kind and tag, its one segment the region id, length and
/// layer nonce (3 × `u64`).
pub const PKT_GET_REQ: u8 = 1;
/// Packet: the answer to a read; header = completion kind and tag, one
/// segment = the bytes read.
pub const PKT_GET_RESP: u8 = 2;
/// Packet: a failed read; header = completion kind and tag, one segment =
/// the reason (UTF-8).
pub const PKT_GET_ERR: u8 = 3;
/// Packet: the sender aborts the job; one segment = the reason (UTF-8).
pub const PKT_ABORT: u8 = 4;
/// Packet: the sender's layer shuts down cleanly; no frame follows.
pub const PKT_BYE: u8 = 5;
/// Byte an acceptor writes back on a connection when its layer shuts down
/// cleanly.
pub const BYE_BYTE: u8 = 0xB7;

/// Encodes a hello (`magic` = [`HELLO_MAGIC`]) or its answer
/// ([`ACK_MAGIC`]).
pub fn encode_hello(
    magic: [u8; 4],
    rank: ProcessId,
    size: u32,
    secret: &JobSecret,
) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[0..4].copy_from_slice(&magic);
    out[4] = PROTOCOL_VERSION;
    out[8..12].copy_from_slice(&rank.to_le_bytes());
    out[12..16].copy_from_slice(&size.to_le_bytes());
    out[16..].copy_from_slice(secret);
    out
}

/// A decoded hello: `(rank, size, secret)`. Checks magic, version and the
/// reserved bytes only; the caller checks the rest.
pub(crate) fn decode_hello(
    buf: &[u8; HELLO_LEN],
    magic: [u8; 4],
) -> Result<(ProcessId, u32, &[u8]), String> {
    if buf[0..4] != magic {
        return Err("not a charmrs-tcp handshake (bad magic)".to_owned());
    }
    if buf[4] != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (expected {PROTOCOL_VERSION})",
            buf[4]
        ));
    }
    if buf[5..8] != [0, 0, 0] {
        return Err("non-zero reserved handshake bytes".to_owned());
    }
    let rank = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    let size = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    Ok((rank, size, &buf[16..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_checks_magic() {
        let s = [9u8; SECRET_LEN];
        let h = encode_hello(HELLO_MAGIC, 3, 8, &s);
        let (r, n, sec) = decode_hello(&h, HELLO_MAGIC).unwrap();
        assert_eq!((r, n, sec), (3, 8, &s[..]));
        assert!(decode_hello(&h, ACK_MAGIC).is_err());
        let mut bad = h;
        bad[4] = 99;
        assert!(decode_hello(&bad, HELLO_MAGIC).is_err());
    }
}
