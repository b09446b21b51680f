//! A PE's local run queue: FIFO for default-priority messages, a heap for prioritised ones.
//!
//! Invariants: a message with lower `priority` value is delivered before one with a higher value;
//! messages of equal priority are delivered in the order they were pushed. Default priority (0)
//! messages never touch the heap, so the common case is a `VecDeque` push/pop.
//! [`LocalQueue::network_waiting`] is exactly the number of messages pushed with
//! [`LocalQueue::push_network`] and not popped yet (the scheduler's network back-pressure);
//! other messages never change it.

use crate::envelope::Envelope;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

struct Prioritised {
    priority: i32,
    /// Came from the network (see [`LocalQueue::network_waiting`]).
    from_network: bool,
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
    /// Messages pushed to and popped from `fifo` so far: a message's position is the number
    /// pushed before it.
    fifo_pushed: u64,
    fifo_popped: u64,
    /// Positions in `fifo` of the network arrivals still in it, ascending.
    network_in_fifo: VecDeque<u64>,
    /// Network arrivals in the heap.
    network_in_heap: usize,
}

impl LocalQueue {
    /// Queues a message made on this PE or sent by another PE of this process.
    pub(crate) fn push(&mut self, env: Envelope) {
        self.push_from(env, false);
    }

    /// Queues a message that arrived from the network, counted by
    /// [`network_waiting`](Self::network_waiting) until it is popped.
    pub(crate) fn push_network(&mut self, env: Envelope) {
        self.push_from(env, true);
    }

    fn push_from(&mut self, env: Envelope, from_network: bool) {
        if env.priority == 0 {
            if from_network {
                self.network_in_fifo.push_back(self.fifo_pushed);
            }
            self.fifo_pushed += 1;
            self.fifo.push_back(env);
        } else {
            self.seq += 1;
            self.network_in_heap += usize::from(from_network);
            self.heap.push(Prioritised {
                priority: env.priority,
                from_network,
                seq: self.seq,
                env,
            });
        }
    }

    pub(crate) fn pop(&mut self) -> Option<Envelope> {
        match self.heap.peek() {
            Some(top) if top.priority < 0 || self.fifo.is_empty() => {
                let p = self.heap.pop()?;
                self.network_in_heap -= usize::from(p.from_network);
                Some(p.env)
            }
            _ => {
                let env = self.fifo.pop_front()?;
                if self.network_in_fifo.front() == Some(&self.fifo_popped) {
                    self.network_in_fifo.pop_front();
                }
                self.fifo_popped += 1;
                Some(env)
            }
        }
    }

    /// Messages that came from the network and wait here.
    pub(crate) fn network_waiting(&self) -> usize {
        self.network_in_fifo.len() + self.network_in_heap
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

    #[test]
    fn network_arrivals_are_counted_until_they_run_and_local_work_never_counts() {
        let mut q = LocalQueue::default();
        // Local work first, then network arrivals among more local work, both priorities.
        q.push(env(0, 1));
        q.push(env(0, 2));
        q.push_network(env(0, 3));
        q.push(env(0, 4));
        q.push_network(env(-1, 5));
        q.push_network(env(0, 6));
        q.push(env(2, 7));
        assert_eq!(q.network_waiting(), 3);
        let mut seen = Vec::new();
        while let Some(e) = q.pop() {
            seen.push((tag(e), q.network_waiting()));
        }
        assert_eq!(
            seen,
            [(5, 2), (1, 2), (2, 2), (3, 1), (4, 1), (6, 0), (7, 0)],
            "running local work leaves the count alone"
        );
        // Positions keep counting across an emptied queue.
        q.push_network(env(0, 8));
        q.push(env(0, 9));
        assert_eq!(q.pop().map(tag), Some(8));
        assert_eq!(q.network_waiting(), 0);
        assert_eq!(q.pop().map(tag), Some(9));
        assert_eq!(q.network_waiting(), 0);
    }
}
