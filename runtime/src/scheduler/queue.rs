//! A PE's local run queue: FIFO for default-priority messages, a heap for prioritised ones.
//!
//! Invariants: a message with lower `priority` value is delivered before one with a higher value;
//! messages of equal priority are delivered in the order they were pushed. Default priority (0)
//! messages never touch the heap, so the common case is a `VecDeque` push/pop.

use crate::envelope::Envelope;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

struct Prioritised {
    priority: i32,
    seq: u64,
    env: Envelope,
}

impl PartialEq for Prioritised {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Prioritised {}
impl PartialOrd for Prioritised {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Prioritised {
    // `BinaryHeap` is a max-heap: the "greatest" is the lowest priority value, then the oldest.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then(other.seq.cmp(&self.seq))
    }
}

/// The local queue of one PE.
#[derive(Default)]
pub(crate) struct LocalQueue {
    fifo: VecDeque<Envelope>,
    heap: BinaryHeap<Prioritised>,
    seq: u64,
}

impl LocalQueue {
    pub(crate) fn push(&mut self, env: Envelope) {
        if env.priority == 0 {
            self.fifo.push_back(env);
        } else {
            self.seq += 1;
            self.heap.push(Prioritised {
                priority: env.priority,
                seq: self.seq,
                env,
            });
        }
    }

    pub(crate) fn pop(&mut self) -> Option<Envelope> {
        match self.heap.peek() {
            Some(top) if top.priority < 0 || self.fifo.is_empty() => self.heap.pop().map(|p| p.env),
            _ => self.fifo.pop_front(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.fifo.is_empty() && self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Body;

    fn env(priority: i32, tag: u32) -> Envelope {
        Envelope::new(
            priority,
            Body::Resume {
                slot: tag,
                generation: 0,
            },
        )
    }
    fn tag(e: Envelope) -> u32 {
        match e.body {
            Body::Resume { slot, .. } => slot,
            _ => unreachable!(),
        }
    }

    #[test]
    fn priorities_then_fifo() {
        let mut q = LocalQueue::default();
        for (p, t) in [(0, 1), (5, 2), (-3, 3), (0, 4), (-3, 5), (5, 6), (-10, 7)] {
            q.push(env(p, t));
        }
        let order: Vec<u32> = std::iter::from_fn(|| q.pop()).map(tag).collect();
        assert_eq!(order, vec![7, 3, 5, 1, 4, 2, 6]);
        assert!(q.is_empty());
    }
}
