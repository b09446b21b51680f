//! Hosts: which machine each process of the job runs on (charm4py's `charm.myHost()`,
//! `numHosts()`, `getHostPes(host)`, `getPeHost(pe)`, `getPeHostRank(pe)`; Charm++'s physical
//! nodes). A process is a Charm++ "node" ([`my_node`](crate::my_node)); a host holds one or more
//! of them.
//!
//! Each process publishes its host's name through the job's bootstrap before the machine layer
//! starts ([`exchange`]), and every process numbers the hosts the same way: in the order of the
//! first process on each. Invariants: host numbers are `0..num_hosts()`, host 0 holds process 0,
//! a host's PEs are consecutive in each of its processes and listed in PE order; the name is the
//! kernel's host name, or `CHARMRS_HOSTNAME` where set (tests use it to make one machine look
//! like several).

use crate::error::{Error, Result};
use crate::scheduler::with_pe;
use charmrs_transport::Bootstrap;

/// The bootstrap key under which each process publishes its host's name.
const HOST_KEY: &str = "charmrs.host";

/// This process's host name: `CHARMRS_HOSTNAME`, else the kernel's, else one of its own
/// (`process <rank>`: a host per process, when nothing names the machine).
fn host_name(rank: u32) -> String {
    std::env::var("CHARMRS_HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("process {rank}"))
}

/// Publishes this process's host name and, once every process has, numbers the hosts: the host
/// of each process, in the order of the first process on each.
pub(crate) fn exchange(bootstrap: &dyn Bootstrap) -> Result<Vec<u32>> {
    let failed = |e: charmrs_transport::TransportError| Error::Options(format!("host names: {e}"));
    bootstrap
        .put(HOST_KEY, host_name(bootstrap.rank()).as_bytes())
        .map_err(failed)?;
    bootstrap.fence().map_err(failed)?;
    let names = (0..bootstrap.size())
        .map(|r| bootstrap.get(r, HOST_KEY).map_err(failed))
        .collect::<Result<Vec<Vec<u8>>>>()?;
    Ok(number(&names))
}

/// The host number of each name: the order of first appearance.
fn number(names: &[Vec<u8>]) -> Vec<u32> {
    let mut seen: Vec<&[u8]> = Vec::new();
    names
        .iter()
        .map(|n| match seen.iter().position(|s| *s == n.as_slice()) {
            Some(h) => h as u32,
            None => {
                seen.push(n);
                (seen.len() - 1) as u32
            }
        })
        .collect()
}

/// The host table of the calling PE's job: the host of each process, and PEs per process.
fn table<R>(what: &'static str, f: impl FnOnce(&[u32], usize) -> R) -> R {
    with_pe(what, |pe| f(&pe.shared.hosts, pe.shared.local_pes())).unwrap_or_else(|e| panic!("{e}"))
}

/// The host the caller runs on (charm4py's `charm.myHost()`).
///
/// # Panics
/// Outside a running PE.
pub fn my_host() -> usize {
    with_pe("charmrs::my_host", |pe| {
        pe.shared.hosts[pe.shared.layer.rank() as usize] as usize
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// How many hosts the job runs on (charm4py's `charm.numHosts()`).
///
/// # Panics
/// Outside a running PE.
pub fn num_hosts() -> usize {
    table("charmrs::num_hosts", |hosts, _| count(hosts))
}

/// How many hosts a host table names (numbered densely from 0).
fn count(hosts: &[u32]) -> usize {
    hosts.iter().max().map_or(1, |&h| h as usize + 1)
}

/// The PEs on `host`, in order (charm4py's `charm.getHostPes(host)`; its first is
/// `getHostFirstPe`, their number `getHostNumPes`).
///
/// ```
/// let code = charmrs::Runtime::new(3).run(|_| async {
///     assert_eq!(charmrs::num_hosts(), 1);                  // one process: one host
///     assert_eq!(charmrs::host_pes(0).unwrap(), [0, 1, 2]);
///     assert_eq!(charmrs::pe_host(2).unwrap(), (0, 2));     // host 0, its third PE
///     assert!(charmrs::host_pes(1).is_err());
///     charmrs::exit(0);
/// }).unwrap();
/// assert_eq!(code, 0);
/// ```
///
/// # Errors
/// A host the job does not have.
///
/// # Panics
/// Outside a running PE.
pub fn host_pes(host: usize) -> Result<Vec<usize>> {
    table("charmrs::host_pes", |hosts, per_process| {
        let pes: Vec<usize> = hosts
            .iter()
            .enumerate()
            .filter(|&(_, &h)| h as usize == host)
            .flat_map(|(p, _)| p * per_process..(p + 1) * per_process)
            .collect();
        if pes.is_empty() {
            let n = count(hosts);
            return Err(Error::Options(format!(
                "unknown host {host}: this job runs on {n} host(s) (0..={})",
                n - 1
            )));
        }
        Ok(pes)
    })
}

/// The host of PE `pe` and its rank among that host's PEs (charm4py's `charm.getPeHost(pe)`
/// and `getPeHostRank(pe)`).
///
/// # Errors
/// A PE the job does not have.
///
/// # Panics
/// Outside a running PE.
pub fn pe_host(pe: usize) -> Result<(usize, usize)> {
    table("charmrs::pe_host", |hosts, per_process| {
        let num_pes = hosts.len() * per_process;
        if pe >= num_pes {
            return Err(Error::PeOutOfRange { pe, num_pes });
        }
        let host = hosts[pe / per_process];
        let before = hosts[..pe / per_process]
            .iter()
            .filter(|&&h| h == host)
            .count();
        Ok((host as usize, before * per_process + pe % per_process))
    })
}

#[cfg(test)]
mod tests {
    use super::number;

    #[test]
    fn hosts_are_numbered_in_the_order_of_their_first_process() {
        let names: Vec<Vec<u8>> = ["b", "a", "b", "c", "a"]
            .iter()
            .map(|n| n.as_bytes().to_vec())
            .collect();
        assert_eq!(number(&names), [0, 1, 0, 2, 1]);
        assert_eq!(number(&[]), Vec::<u32>::new());
    }
}
