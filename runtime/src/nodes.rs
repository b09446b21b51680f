//! Nodes: the processes of the job and the PEs each holds (Charm++'s `CkMyNode`, `CkNumNodes`,
//! `CkMyRank`, `CkNodeFirst`, `CkNodeSize`, `CkNodeOf`, `CkRankOf`). A node is one process: one
//! address space, its PEs the threads that share it. Which machine a node runs on is
//! [`crate::hosts`]'s concern.
//!
//! Invariants: nodes are numbered `0..num_nodes()` by the machine layer's process rank; every
//! node holds the same number of PEs, consecutive: node `n` holds PEs `n * k .. (n + 1) * k`
//! (`k` = [`node_pes`]`(n).len()`), and a PE's rank is its position among them. The runtime
//! routes messages by the same rule (`Shared::process_of`).

use crate::error::{Error, Result};
use crate::runtime::in_pe;
use std::ops::Range;

/// Number of nodes and PEs per node of the calling PE's job.
fn layout<R>(what: &'static str, f: impl FnOnce(usize, usize) -> R) -> R {
    in_pe(what, |pe| {
        f(pe.shared.layer.size() as usize, pe.shared.local_pes())
    })
}

/// The node (process) the caller runs in (Charm++'s `CkMyNode`).
///
/// # Panics
/// Outside a running PE.
pub fn my_node() -> usize {
    in_pe("charmrs::my_node", |pe| pe.shared.layer.rank() as usize)
}

/// Number of nodes (processes) in the job (Charm++'s `CkNumNodes`).
///
/// # Panics
/// Outside a running PE.
pub fn num_nodes() -> usize {
    layout("charmrs::num_nodes", |nodes, _| nodes)
}

/// The caller's rank among its node's PEs, `0..node_pes(my_node()).len()` (Charm++'s
/// `CkMyRank`).
///
/// # Panics
/// Outside a running PE.
pub fn my_rank() -> usize {
    in_pe("charmrs::my_rank", |pe| pe.pe - pe.shared.first_pe)
}

/// The PEs of node `node`, consecutive (Charm++'s `CkNodeFirst(node)` is its `start`,
/// `CkNodeSize(node)` its `len()`).
///
/// ```
/// let code = charmrs::Runtime::new(3).run(|_| async {
///     assert_eq!(charmrs::num_nodes(), 1);                // one process: one node
///     assert_eq!(charmrs::node_pes(0).unwrap(), 0..3);
///     assert_eq!(charmrs::pe_node(2).unwrap(), (0, 2));   // node 0, its third PE
///     assert_eq!(charmrs::my_rank(), 0);                  // the entry point runs on PE 0
///     assert!(charmrs::node_pes(1).is_err());
///     charmrs::exit(0);
/// }).unwrap();
/// assert_eq!(code, 0);
/// ```
///
/// # Errors
/// A node the job does not have.
///
/// # Panics
/// Outside a running PE.
pub fn node_pes(node: usize) -> Result<Range<usize>> {
    layout("charmrs::node_pes", |nodes, per_node| {
        pes_of(node, nodes, per_node)
    })
}

/// The node of PE `pe` and its rank among that node's PEs (Charm++'s `CkNodeOf(pe)` and
/// `CkRankOf(pe)`).
///
/// # Errors
/// A PE the job does not have.
///
/// # Panics
/// Outside a running PE.
pub fn pe_node(pe: usize) -> Result<(usize, usize)> {
    layout("charmrs::pe_node", |nodes, per_node| {
        node_of(pe, nodes, per_node)
    })
}

/// [`node_pes`] for a job of `nodes` nodes of `per_node` PEs.
fn pes_of(node: usize, nodes: usize, per_node: usize) -> Result<Range<usize>> {
    if node >= nodes {
        return Err(Error::Options(format!(
            "unknown node {node}: this job has {nodes} node(s) (processes; valid nodes are \
             0..={})",
            nodes - 1
        )));
    }
    Ok(node * per_node..(node + 1) * per_node)
}

/// [`pe_node`] for a job of `nodes` nodes of `per_node` PEs.
fn node_of(pe: usize, nodes: usize, per_node: usize) -> Result<(usize, usize)> {
    let num_pes = nodes * per_node;
    if pe >= num_pes {
        return Err(Error::PeOutOfRange { pe, num_pes });
    }
    Ok((pe / per_node, pe % per_node))
}

#[cfg(test)]
mod tests {
    use super::{node_of, pes_of};
    use crate::error::Error;

    #[test]
    fn nodes_hold_consecutive_pes_and_bad_numbers_are_named() {
        // 3 processes of 2 PEs each.
        assert_eq!(pes_of(0, 3, 2).unwrap(), 0..2);
        assert_eq!(pes_of(2, 3, 2).unwrap(), 4..6);
        let e = pes_of(3, 3, 2).unwrap_err().to_string();
        assert!(e.contains("unknown node 3") && e.contains("0..=2"), "{e}");
        assert_eq!(node_of(0, 3, 2).unwrap(), (0, 0));
        assert_eq!(node_of(3, 3, 2).unwrap(), (1, 1));
        assert_eq!(node_of(5, 3, 2).unwrap(), (2, 1));
        assert_eq!(
            node_of(6, 3, 2).unwrap_err(),
            Error::PeOutOfRange { pe: 6, num_pes: 6 }
        );
    }
}
