//! Section multicast: a call through a [`Section`](crate::Section) travels down a spanning tree
//! over the PEs that hold the section's members (Charm++'s `CkMulticast`), one message per tree
//! edge, instead of one message per member from the caller.
//!
//! # What this module owns
//!
//! * [`Group`]: the members a multicast delivers on one PE.
//! * [`plan`]: the caller's grouping of the members by the PE each lives on (as far as its
//!   location cache knows), and [`subtrees`]: how a PE splits the groups below it among at most
//!   [`BRANCHING`] children.
//! * `PeState::multicast` (the caller's side) and `PeState::multicast_arrived` (every PE of the
//!   tree: forward to the children, then deliver to the members here).
//!
//! # Invariants
//!
//! * A multicast message's first group is the receiving PE's; the groups after it are its
//!   subtree, each PE appearing once, and every member appears in exactly one group: each member
//!   gets the call exactly once.
//! * A member delivered on a PE it has left (the caller's cache was stale, or it migrated while
//!   the call travelled) is forwarded like any point call and still gets the call once; the
//!   PE that finally delivers it corrects the *caller's* location cache (the deliveries carry
//!   the caller as their route's origin), so the caller's next tree places it right.
//! * A PE where the collection does not exist yet keeps one message (its own group) until it
//!   does, not a call per member; every member is checked against the collection's shape
//!   before any call is cloned for it.
//! * Each tree message counts as one message for quiescence detection (sent by its parent,
//!   processed by its PE); the deliveries it makes on its PE are not messages.
//! * A multicast is not ordered with respect to point calls from the same caller to a member
//!   (it may take a longer path), as in Charm++; nor, for a member that migrates, with respect
//!   to the caller's other multicasts (a call chasing the member may overtake an earlier one).

use crate::collection::CollectionId;
use crate::envelope::{Body, Control, Envelope, Invocation, Route};
use crate::index::Index;
use crate::scheduler::PeState;

/// Children per PE in a multicast tree.
pub(crate) const BRANCHING: usize = 4;

/// The members of a section that one PE delivers a multicast to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) pe: u32,
    pub(crate) members: Vec<Index>,
}

/// The members grouped by the PE each is expected on (`dest`), in increasing PE order, except
/// that the group of `first` (the calling PE), if any, comes first.
pub(crate) fn plan(
    members: &[Index],
    first: usize,
    mut dest: impl FnMut(&Index) -> usize,
) -> Vec<Group> {
    let mut by_pe: std::collections::BTreeMap<usize, Vec<Index>> = Default::default();
    for index in members {
        by_pe.entry(dest(index)).or_default().push(*index);
    }
    let mut groups: Vec<Group> = Vec::with_capacity(by_pe.len());
    if let Some(mine) = by_pe.remove(&first) {
        groups.push(Group {
            pe: first as u32,
            members: mine,
        });
    }
    groups.extend(by_pe.into_iter().map(|(pe, members)| Group {
        pe: pe as u32,
        members,
    }));
    groups
}

/// Splits `below` (the groups under one PE of the tree) among at most [`BRANCHING`] children:
/// contiguous runs of nearly equal length, each headed by the child that receives it (PEs of
/// one process are contiguous, so a run stays within few processes).
pub(crate) fn subtrees(mut below: Vec<Group>) -> Vec<Vec<Group>> {
    let n = below.len();
    let parts = n.min(BRANCHING);
    let mut out = Vec::with_capacity(parts);
    for k in (0..parts).rev() {
        // Part k holds the groups [k*n/parts, (k+1)*n/parts): split from the back.
        let start = k * n / parts;
        out.push(below.split_off(start));
    }
    out.reverse();
    out
}

impl PeState {
    /// Sends `call` to every element of `members` (sorted, distinct) of `coll`: down a tree
    /// from this PE, see the module docs.
    pub(crate) fn multicast(
        &self,
        coll: CollectionId,
        members: &[Index],
        home: impl Fn(&Index) -> usize,
        call: Box<dyn Invocation>,
        priority: i32,
    ) {
        let mut groups = plan(members, self.pe, |i| self.point_dest(coll, i, home(i)));
        // This PE's own members are delivered after the caller's entry, like any message to it.
        let own = if groups.first().is_some_and(|g| g.pe as usize == self.pe) {
            Some(groups.remove(0))
        } else {
            None
        };
        let origin = self.pe as u32;
        let mut call = Some(call);
        let mut parts = subtrees(groups);
        if let Some(own) = own {
            parts.push(vec![own]);
        }
        let last = parts.len().saturating_sub(1);
        for (k, part) in parts.into_iter().enumerate() {
            let c = if k == last {
                call.take().expect("moved once, for the last part")
            } else {
                call.as_ref()
                    .expect("present until the last part")
                    .clone_box()
            };
            self.send_multicast(coll, origin, part, c, priority);
        }
    }

    /// Sends the multicast message for `part` (headed by its PE's own group) to that PE.
    fn send_multicast(
        &self,
        coll: CollectionId,
        origin: u32,
        part: Vec<Group>,
        call: Box<dyn Invocation>,
        priority: i32,
    ) {
        let to = part[0].pe as usize;
        self.send_direct(to, multicast_envelope(coll, origin, part, call, priority));
    }

    /// A multicast message arrived: forward the subtrees below this PE, then deliver the call
    /// to the members here (each as a point call from the caller: one that left is forwarded).
    pub(crate) fn multicast_arrived(
        &self,
        coll: CollectionId,
        origin: u32,
        mut groups: Vec<Group>,
        call: Box<dyn Invocation>,
        priority: i32,
    ) {
        let n = self.num_pes();
        let malformed = |why: String| {
            format!(
                "charmrs: PE {}: a malformed section call for `{}` from PE {origin}: {why}",
                self.pe,
                call.entry_name(),
            )
        };
        if origin as usize >= n
            || groups.first().is_none_or(|g| g.pe as usize != self.pe)
            || groups
                .iter()
                .any(|g| g.pe as usize >= n || g.members.is_empty())
        {
            return self.abort_job(malformed(format!(
                "its groups name PEs {:?} (the first must be this PE, all below {n}, none empty)",
                groups.iter().map(|g| g.pe).collect::<Vec<_>>()
            )));
        }
        let below = groups.split_off(1);
        for part in subtrees(below) {
            self.send_multicast(coll, origin, part, call.clone_box(), priority);
        }
        let shape = self.collections.borrow().get(&coll).map(|c| c.shape);
        let Some(shape) = shape else {
            // Not created here yet: the message waits, with this PE's members only.
            let env = multicast_envelope(coll, origin, groups, call, priority);
            return self.buffer_for(coll, env);
        };
        let own = groups.pop().expect("checked: a first group").members;
        if let Some(Err(e)) = own.iter().map(|i| shape.check(i, n)).find(Result::is_err) {
            return self.abort_job(malformed(e.to_string()));
        }
        let route = Route::new(origin as usize, 0);
        let (last, rest) = own.split_last().expect("checked: not empty");
        for index in rest {
            if self.shared.stopping() {
                return;
            }
            self.deliver_point(coll, *index, call.clone_box(), priority, route);
        }
        self.deliver_point(coll, *last, call, priority, route);
    }

    /// Delivers the call to member `index` here, as a point call from the multicast's caller.
    fn deliver_point(
        &self,
        coll: CollectionId,
        index: Index,
        call: Box<dyn Invocation>,
        priority: i32,
        route: Route,
    ) {
        let mut env = Envelope::new(priority, Body::Point { coll, index, call });
        env.route = route;
        self.deliver(env);
    }
}

fn multicast_envelope(
    coll: CollectionId,
    origin: u32,
    groups: Vec<Group>,
    call: Box<dyn Invocation>,
    priority: i32,
) -> Envelope {
    Envelope::new(
        priority,
        Body::Control(Box::new(Control::Multicast {
            coll,
            origin,
            groups,
            call,
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(k: usize) -> Index {
        Index::new(&[k]).unwrap()
    }

    #[test]
    fn members_are_grouped_by_pe_with_the_callers_first() {
        let members: Vec<Index> = (0..10).map(idx).collect();
        let groups = plan(&members, 2, |i| i.get(0) % 4);
        let pes: Vec<u32> = groups.iter().map(|g| g.pe).collect();
        assert_eq!(pes, [2, 0, 1, 3]);
        assert_eq!(groups[0].members, [idx(2), idx(6)]);
        assert_eq!(groups[1].members, [idx(0), idx(4), idx(8)]);
        let total: usize = groups.iter().map(|g| g.members.len()).sum();
        assert_eq!(total, 10);
    }

    /// Walks the tree as the PEs would: every group is reached exactly once, no PE sends more
    /// than BRANCHING messages, and the depth is logarithmic.
    #[test]
    fn the_tree_reaches_every_group_once_with_bounded_fan_out() {
        for n in [1usize, 2, 3, 4, 5, 17, 64, 1000] {
            let groups: Vec<Group> = (0..n)
                .map(|pe| Group {
                    pe: pe as u32,
                    members: vec![idx(pe)],
                })
                .collect();
            let mut reached = vec![0u32; n];
            let mut depth_max = 0;
            let mut stack: Vec<(Vec<Group>, usize)> =
                subtrees(groups).into_iter().map(|p| (p, 1)).collect();
            assert!(stack.len() <= BRANCHING);
            while let Some((mut part, depth)) = stack.pop() {
                depth_max = depth_max.max(depth);
                let below = part.split_off(1);
                reached[part[0].pe as usize] += 1;
                let children = subtrees(below);
                assert!(children.len() <= BRANCHING);
                stack.extend(children.into_iter().map(|p| (p, depth + 1)));
            }
            assert!(reached.iter().all(|&r| r == 1), "n = {n}: {reached:?}");
            let bound = (n as f64).log(BRANCHING as f64).ceil() as usize + 1;
            assert!(depth_max <= bound, "n = {n}: depth {depth_max} > {bound}");
        }
    }
}
