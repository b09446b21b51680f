//! Lanes: a machine layer with one endpoint per PE instead of one per process.
//!
//! # What this module owns
//!
//! * The naming of endpoints in a job of `lanes` endpoints per process: endpoint ids are
//!   `process · lanes + lane` (with one endpoint per PE, an endpoint's id is its PE's number).
//!   [`endpoint_for`] says which endpoint of a process takes a message for a PE;
//!   [`process_of`] names the process of an endpoint.
//! * [`EndpointName`]: an endpoint named for a user in errors (`process 3`, or with lanes
//!   `process 1 (PE 3)`).
//! * The bootstrap value a process publishes with its endpoints' addresses
//!   ([`encode_address_list`], [`decode_address_list`]).
//!
//! # Invariants
//!
//! * Every process of a job has the same number of lanes (layers refuse a job whose processes
//!   published address lists of different lengths).
//! * With one lane, endpoint ids are process ranks: `endpoint_for(p, _, 1) == p` and
//!   `process_of(p, 1) == p`.

use crate::layer::ProcessId;

/// The endpoint of process `dst` that takes a message for PE `dst_pe`, in a job of `lanes`
/// endpoints per process: the PE's own endpoint if `dst_pe` is one of `dst`'s PEs, else the
/// process's first (a message addressed to a process, not to one of its PEs).
#[inline]
pub fn endpoint_for(dst: ProcessId, dst_pe: u32, lanes: u32) -> u32 {
    if lanes <= 1 {
        return dst;
    }
    let first = dst * lanes;
    first
        + dst_pe
            .checked_sub(first)
            .filter(|l| *l < lanes)
            .unwrap_or(0)
}

/// The process of endpoint `id` in a job of `lanes` endpoints per process.
#[inline]
pub fn process_of(id: u32, lanes: u32) -> ProcessId {
    if lanes <= 1 {
        id
    } else {
        id / lanes
    }
}

/// Endpoint `id` of a job of `lanes` endpoints per process, named for a user: `process 3`, or
/// with several lanes `process 1 (PE 3)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointName {
    /// The endpoint's id.
    pub id: u32,
    /// Endpoints per process in the job.
    pub lanes: u32,
}

impl std::fmt::Display for EndpointName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lanes <= 1 {
            write!(f, "process {}", self.id)
        } else {
            write!(
                f,
                "process {} (PE {})",
                process_of(self.id, self.lanes),
                self.id
            )
        }
    }
}

/// The bootstrap value listing a process's endpoint addresses: the count, then each address
/// after its length (`u32`, little-endian).
pub fn encode_address_list(addresses: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(addresses.len() as u32).to_le_bytes());
    for a in addresses {
        out.extend_from_slice(&(a.len() as u32).to_le_bytes());
        out.extend_from_slice(a);
    }
    out
}

/// The addresses in a value [`encode_address_list`] made; `None` if it is malformed (cut
/// short, trailing bytes, or a count larger than the bytes could hold).
pub fn decode_address_list(mut raw: &[u8]) -> Option<Vec<Vec<u8>>> {
    fn next_u32(raw: &mut &[u8]) -> Option<usize> {
        let (n, rest) = raw.split_first_chunk::<4>()?;
        *raw = rest;
        usize::try_from(u32::from_le_bytes(*n)).ok()
    }
    let count = next_u32(&mut raw)?;
    if count > raw.len() / 4 {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = next_u32(&mut raw)?;
        if len > raw.len() {
            return None;
        }
        let (a, rest) = raw.split_at(len);
        out.push(a.to_vec());
        raw = rest;
    }
    raw.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_round_trip_and_malformed_ones_are_refused() {
        let list = vec![vec![1u8, 2, 3], vec![], vec![9; 300]];
        let raw = encode_address_list(&list);
        assert_eq!(decode_address_list(&raw), Some(list));
        assert_eq!(decode_address_list(&encode_address_list(&[])), Some(vec![]));
        for cut in 0..raw.len() {
            assert_eq!(decode_address_list(&raw[..cut]), None, "cut at {cut}");
        }
        let mut long = raw.clone();
        long.push(0);
        assert_eq!(decode_address_list(&long), None, "trailing bytes");
        let mut huge = raw;
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_address_list(&huge), None, "a count beyond the bytes");
    }

    #[test]
    fn endpoints_are_named_by_pe_and_others_go_to_the_first() {
        // 3 lanes: process 1 has endpoints 3, 4, 5 (PEs 3, 4, 5).
        assert_eq!(endpoint_for(1, 4, 3), 4);
        assert_eq!(endpoint_for(1, 3, 3), 3);
        assert_eq!(endpoint_for(1, 0, 3), 3, "a PE of another process");
        assert_eq!(endpoint_for(1, 6, 3), 3, "a PE past the process");
        assert_eq!(endpoint_for(1, u32::MAX, 3), 3);
        assert_eq!(
            (3..6).map(|id| process_of(id, 3)).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        // One lane: endpoints are processes.
        assert_eq!(endpoint_for(7, 2, 1), 7);
        assert_eq!(process_of(7, 1), 7);
        let name = |id, lanes| EndpointName { id, lanes }.to_string();
        assert_eq!(name(7, 1), "process 7");
        assert_eq!(name(4, 3), "process 1 (PE 4)");
    }
}
