//! Wire format of the launcher key-value protocol, shared by
//! [`KvServer`](super::KvServer) and [`KvBootstrap`](super::KvBootstrap).
//!
//! # Invariants
//!
//! * Every request carries the job secret; the server compares it in
//!   constant time before looking at anything else but the length and
//!   magic.
//! * Every length is checked against a fixed limit *before* anything is
//!   allocated, so a hostile peer cannot make either side allocate more than
//!   [`MAX_REQUEST`] / [`MAX_RESPONSE`] bytes per message.
//!
//! # Format (all integers little-endian)
//!
//! Request: `u32 body_len`, then the body:
//!
//! | size | field                              |
//! |-----:|------------------------------------|
//! | 4    | magic `b"CKV1"`                    |
//! | 1    | op ([`Op`])                        |
//! | 32   | job secret                         |
//! | 4    | rank (meaning depends on the op)   |
//! | 2    | key length `k` (≤ [`MAX_KEY`])     |
//! | k    | key bytes (UTF-8)                  |
//! | 4    | value length `v` (≤ [`MAX_VALUE`]) |
//! | v    | value bytes                        |
//!
//! Response: `u32 body_len`, then `u8 status` ([`Status`]) and the payload
//! (the value for a successful `Get`, an UTF-8 reason for `Error`).

use std::io::{self, Read, Write};

use super::{JobSecret, SECRET_LEN};

/// Magic opening every request body.
pub(crate) const MAGIC: [u8; 4] = *b"CKV1";
/// Longest key accepted, in bytes.
pub(crate) const MAX_KEY: usize = 1024;
/// Longest value accepted, in bytes.
pub(crate) const MAX_VALUE: usize = 1 << 20;
/// Fixed part of a request body: magic, op, secret, rank, key and value
/// lengths.
const FIXED: usize = 4 + 1 + SECRET_LEN + 4 + 2 + 4;
/// Largest request body accepted.
pub(crate) const MAX_REQUEST: usize = FIXED + MAX_KEY + MAX_VALUE;
/// Largest response body accepted (status byte plus a value or reason).
pub(crate) const MAX_RESPONSE: usize = 1 + MAX_VALUE;

/// Request operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// First request on a connection: claims `rank`.
    Hello = 1,
    /// Store `value` under `key` for the connection's rank (`rank` must be
    /// the connection's rank).
    Put = 2,
    /// Read `key` as published by `rank`.
    Get = 3,
    /// Barrier over all ranks.
    Fence = 4,
    /// The process gives up; `value` is the reason.
    Abort = 5,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Hello,
            2 => Op::Put,
            3 => Op::Get,
            4 => Op::Fence,
            5 => Op::Abort,
            _ => return None,
        })
    }
}

/// Response statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Success; the payload is the value for `Get`, empty otherwise.
    Ok = 0,
    /// `Get` of a key that was never put.
    NotFound = 1,
    /// The request failed; the payload says why.
    Error = 2,
}

/// A decoded request borrowing its body.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub(crate) op: Op,
    pub(crate) rank: u32,
    pub(crate) key: &'a str,
    pub(crate) value: &'a [u8],
}

/// Encodes a complete request (length prefix included).
pub(crate) fn encode_request(
    op: Op,
    secret: &JobSecret,
    rank: u32,
    key: &str,
    value: &[u8],
) -> io::Result<Vec<u8>> {
    if key.len() > MAX_KEY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("key of {} bytes exceeds the limit of {MAX_KEY}", key.len()),
        ));
    }
    if value.len() > MAX_VALUE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "value of {} bytes exceeds the limit of {MAX_VALUE}",
                value.len()
            ),
        ));
    }
    let body = FIXED + key.len() + value.len();
    let mut out = Vec::with_capacity(4 + body);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.extend_from_slice(&MAGIC);
    out.push(op as u8);
    out.extend_from_slice(secret);
    out.extend_from_slice(&rank.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
    Ok(out)
}

/// Reads one length-prefixed body of at most `max` bytes. `Ok(None)` on a
/// clean end of stream before the first byte.
pub(crate) fn read_body(r: &mut impl Read, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Why a request body was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Not a request of this protocol (bad magic, lengths, op, UTF-8).
    Malformed(String),
    /// Well-formed but the secret does not match.
    BadSecret,
}

/// Decodes and authenticates a request body. Never panics on any input.
pub(crate) fn decode_request<'a>(
    body: &'a [u8],
    secret: &JobSecret,
) -> Result<Request<'a>, Reject> {
    let bad = |what: &str| Reject::Malformed(what.to_owned());
    if body.len() < FIXED {
        return Err(bad("request shorter than its fixed part"));
    }
    if body[0..4] != MAGIC {
        return Err(bad("bad magic"));
    }
    if !super::ct_eq(&body[5..5 + SECRET_LEN], secret) {
        return Err(Reject::BadSecret);
    }
    let op = Op::from_u8(body[4]).ok_or_else(|| bad("unknown op"))?;
    let mut pos = 5 + SECRET_LEN;
    let rank = u32::from_le_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]);
    pos += 4;
    let key_len = usize::from(u16::from_le_bytes([body[pos], body[pos + 1]]));
    pos += 2;
    if key_len > MAX_KEY {
        return Err(bad("key too long"));
    }
    let key = body
        .get(pos..pos + key_len)
        .ok_or_else(|| bad("key runs past the end"))?;
    pos += key_len;
    let vlen = body
        .get(pos..pos + 4)
        .ok_or_else(|| bad("value length runs past the end"))?;
    let value_len = u32::from_le_bytes([vlen[0], vlen[1], vlen[2], vlen[3]]) as usize;
    pos += 4;
    if value_len > MAX_VALUE {
        return Err(bad("value too long"));
    }
    if body.len() != pos.saturating_add(value_len) {
        return Err(bad("value length disagrees with the request length"));
    }
    let key = std::str::from_utf8(key).map_err(|_| bad("key is not UTF-8"))?;
    Ok(Request {
        op,
        rank,
        key,
        value: &body[pos..],
    })
}

/// Writes one response.
pub(crate) fn write_response(w: &mut impl Write, status: Status, payload: &[u8]) -> io::Result<()> {
    let payload = &payload[..payload.len().min(MAX_VALUE)];
    let mut out = Vec::with_capacity(5 + payload.len());
    out.extend_from_slice(&((1 + payload.len()) as u32).to_le_bytes());
    out.push(status as u8);
    out.extend_from_slice(payload);
    w.write_all(&out)
}

/// Splits a response body into status and payload.
pub(crate) fn decode_response(body: Vec<u8>) -> io::Result<(Status, Vec<u8>)> {
    let status = match body.first() {
        Some(0) => Status::Ok,
        Some(1) => Status::NotFound,
        Some(2) => Status::Error,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed response from the key-value server",
            ))
        }
    };
    let mut body = body;
    body.remove(0);
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: JobSecret = [7u8; SECRET_LEN];

    #[test]
    fn request_round_trips() {
        let wire = encode_request(Op::Put, &S, 3, "addr", b"127.0.0.1:1").unwrap();
        let body = read_body(&mut &wire[..], MAX_REQUEST).unwrap().unwrap();
        let req = decode_request(&body, &S).unwrap();
        assert_eq!(req.op, Op::Put);
        assert_eq!(req.rank, 3);
        assert_eq!(req.key, "addr");
        assert_eq!(req.value, b"127.0.0.1:1");
    }

    #[test]
    fn wrong_secret_and_garbage_are_rejected() {
        let wire = encode_request(Op::Get, &[8u8; SECRET_LEN], 0, "k", b"").unwrap();
        assert_eq!(
            decode_request(&wire[4..], &S).unwrap_err(),
            Reject::BadSecret
        );
        assert!(matches!(
            decode_request(b"short", &S),
            Err(Reject::Malformed(_))
        ));
        let mut wire = encode_request(Op::Get, &S, 0, "k", b"v").unwrap();
        wire.push(0); // trailing byte: lengths disagree
        assert!(matches!(
            decode_request(&wire[4..], &S),
            Err(Reject::Malformed(_))
        ));
        // A hostile length prefix is refused before allocating.
        let huge = (u32::MAX).to_le_bytes();
        assert!(read_body(&mut &huge[..], MAX_REQUEST).is_err());
        assert!(encode_request(Op::Put, &S, 0, "k", &vec![0; MAX_VALUE + 1]).is_err());
    }

    #[test]
    fn mutated_requests_never_panic() {
        let valid = encode_request(Op::Put, &S, 1, "key", b"value").unwrap();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            let mut v = valid[4..].to_vec();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let pos = (x % v.len() as u64) as usize;
                v[pos] = (x >> 32) as u8;
            }
            v.truncate((x % (v.len() as u64 + 1)) as usize);
            let _ = decode_request(&v, &S);
        }
    }
}
