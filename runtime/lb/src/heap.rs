//! An indexed binary min-heap over slots `0..n` keyed by `f64`, with ties broken by the slot
//! number so that results never depend on insertion history. Supports changing the key of any
//! slot in O(log n), which GreedyRefine needs (an object may stay on a PE that is not the top).

pub(crate) struct IndexedMinHeap {
    /// Heap order of `(key, slot)`: `heap[0]` has the smallest key. Keys live here (not behind
    /// the slot number) so that sifting compares without an extra indirection.
    heap: Vec<(f64, u32)>,
    /// `pos[slot]` is the slot's place in `heap`, or `ABSENT` when it is not in the heap.
    pos: Vec<u32>,
    /// Keys of the slots that are not in the heap (and stale values for those that are).
    key: Vec<f64>,
}

const ABSENT: u32 = u32::MAX;

#[inline]
fn less(a: (f64, u32), b: (f64, u32)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 < b.1)
}

impl IndexedMinHeap {
    /// A heap holding the slots `members` with keys `keys[slot]` (keys of other slots are kept
    /// but those slots are never returned).
    pub(crate) fn new(keys: Vec<f64>, members: impl IntoIterator<Item = usize>) -> Self {
        let n = keys.len();
        assert!(n < ABSENT as usize, "too many heap slots");
        let mut h = IndexedMinHeap {
            heap: Vec::with_capacity(n),
            pos: vec![ABSENT; n],
            key: keys,
        };
        for s in members {
            if h.pos[s] == ABSENT {
                h.pos[s] = h.heap.len() as u32;
                h.heap.push((h.key[s], s as u32));
            }
        }
        for i in (0..h.heap.len() / 2).rev() {
            h.sift_down(i);
        }
        h
    }

    /// The slot with the smallest key.
    pub(crate) fn top(&self) -> Option<usize> {
        self.heap.first().map(|&(_, s)| s as usize)
    }

    pub(crate) fn key(&self, slot: usize) -> f64 {
        match self.pos[slot] {
            ABSENT => self.key[slot],
            p => self.heap[p as usize].0,
        }
    }

    /// The keys of all slots.
    pub(crate) fn into_keys(mut self) -> Vec<f64> {
        for &(k, s) in &self.heap {
            self.key[s as usize] = k;
        }
        self.key
    }

    /// Sets the key of `slot`; if it is in the heap its place is restored.
    pub(crate) fn set(&mut self, slot: usize, key: f64) {
        match self.pos[slot] {
            ABSENT => self.key[slot] = key,
            p => {
                let p = p as usize;
                let old = self.heap[p].0;
                self.heap[p].0 = key;
                if key < old {
                    self.sift_up(p);
                } else {
                    self.sift_down(p);
                }
            }
        }
    }

    /// Removes `slot` from the heap (its key is kept).
    pub(crate) fn remove(&mut self, slot: usize) {
        let p = self.pos[slot];
        if p == ABSENT {
            return;
        }
        let p = p as usize;
        self.key[slot] = self.heap[p].0;
        let last = self.heap.pop().expect("non-empty");
        self.pos[slot] = ABSENT;
        if p < self.heap.len() {
            self.heap[p] = last;
            self.pos[last.1 as usize] = p as u32;
            self.sift_down(p);
            self.sift_up(p);
        }
    }

    fn sift_up(&mut self, mut i: usize) {
        let item = self.heap[i];
        while i > 0 {
            let parent = (i - 1) / 2;
            let pe = self.heap[parent];
            if !less(item, pe) {
                break;
            }
            self.heap[i] = pe;
            self.pos[pe.1 as usize] = i as u32;
            i = parent;
        }
        self.heap[i] = item;
        self.pos[item.1 as usize] = i as u32;
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        let item = self.heap[i];
        loop {
            let l = 2 * i + 1;
            if l >= n {
                break;
            }
            let r = l + 1;
            let c = if r < n && less(self.heap[r], self.heap[l]) {
                r
            } else {
                l
            };
            let child = self.heap[c];
            if !less(child, item) {
                break;
            }
            self.heap[i] = child;
            self.pos[child.1 as usize] = i as u32;
            i = c;
        }
        self.heap[i] = item;
        self.pos[item.1 as usize] = i as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prng::SplitMix64;

    #[test]
    fn behaves_like_sorting() {
        let mut rng = SplitMix64::new(7);
        let n = 200;
        let keys: Vec<f64> = (0..n).map(|_| rng.next_f64()).collect();
        let mut h = IndexedMinHeap::new(keys, 0..n);
        for _ in 0..2000 {
            let s = rng.below(n as u64) as usize;
            h.set(s, rng.next_f64());
            let top = h.top().unwrap();
            let min = (0..n)
                .min_by(|&a, &b| h.key(a).total_cmp(&h.key(b)).then(a.cmp(&b)))
                .unwrap();
            assert_eq!(top, min);
        }
        let mut popped = Vec::new();
        while let Some(t) = h.top() {
            popped.push(h.key(t));
            h.remove(t);
        }
        assert_eq!(popped.len(), n);
        assert!(popped.windows(2).all(|w| w[0] <= w[1]));
        assert!(h.top().is_none());
    }

    #[test]
    fn members_subset_and_remove_middle() {
        let mut h = IndexedMinHeap::new(vec![5.0, 1.0, 3.0, 0.0, 2.0], [0, 1, 2, 4]);
        assert_eq!(h.top(), Some(1));
        h.remove(2);
        h.set(3, -1.0); // not a member: never returned
        let mut order = Vec::new();
        while let Some(t) = h.top() {
            order.push(t);
            h.remove(t);
        }
        assert_eq!(order, vec![1, 4, 0]);
        assert_eq!(h.key(3), -1.0);
        assert_eq!(h.into_keys(), vec![5.0, 1.0, 3.0, -1.0, 2.0]);
    }
}
