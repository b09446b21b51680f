//! GreedyLB and GreedyRefineLB.

use super::{current_placement, write_back, Strategy, Task, TaskObj, NOWHERE};
use crate::heap::IndexedMinHeap;
use crate::{migrations_from_placement, LbStats, Migration};

/// `GreedyLB`: objects by decreasing load, each to the currently least-loaded available PE
/// (longest-processing-time-first list scheduling, a 4/3-approximation of the optimal max load).
/// Ignores where objects are, so it migrates almost everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct GreedyLb;

impl Strategy for GreedyLb {
    fn name(&self) -> &'static str {
        "GreedyLB"
    }

    fn balance(&self, stats: &LbStats) -> Vec<Migration> {
        let (mut task, global) = Task::whole(stats);
        if global.is_empty() {
            return Vec::new();
        }
        task.sort_decreasing();
        let (placed, _) = greedy(&task.base, &task.objs);
        let mut new_pe = current_placement(stats);
        write_back(&task, &placed, &global, &mut new_pe);
        migrations_from_placement(stats, &new_pe)
    }
}

/// `GreedyRefineLB` (the default): first computes Greedy's max load `M`, then places objects by
/// decreasing load again, keeping each on its current PE when that PE's load stays within
/// `tolerance × M`, and otherwise sending it to the least-loaded PE. The max load stays within
/// `tolerance × M` (if the second pass does worse, Greedy's placement is used), with far fewer
/// migrations than Greedy.
#[derive(Clone, Copy, Debug)]
pub struct GreedyRefineLb {
    /// Allowed max load relative to Greedy's (≥ 1; default 1.03).
    pub tolerance: f64,
}

impl Default for GreedyRefineLb {
    fn default() -> Self {
        GreedyRefineLb { tolerance: 1.03 }
    }
}

impl Strategy for GreedyRefineLb {
    fn name(&self) -> &'static str {
        "GreedyRefineLB"
    }

    fn balance(&self, stats: &LbStats) -> Vec<Migration> {
        let (mut task, global) = Task::whole(stats);
        if global.is_empty() {
            return Vec::new();
        }
        task.sort_decreasing();
        let placed = greedy_refine(&task.base, &task.objs, self.tolerance);
        let mut new_pe = current_placement(stats);
        write_back(&task, &placed, &global, &mut new_pe);
        migrations_from_placement(stats, &new_pe)
    }
}

/// Greedy placement of `objs` (sorted by decreasing load) onto PEs with fixed loads `base`
/// (non-empty). Returns the PE of each object and the resulting max load.
///
/// An object of no measured load goes, like any other, to a least loaded PE; but
/// it changes no PE's load, so the heap's top would take every one of them. Among the PEs of
/// least load it stays where it is if its PE is one of them, else the others take turns.
pub(crate) fn greedy(base: &[f64], objs: &[TaskObj]) -> (Vec<u32>, f64) {
    let mut heap = IndexedMinHeap::new(base.to_vec(), 0..base.len());
    let mut placed = Vec::with_capacity(objs.len());
    // The PEs of least load for the unloaded objects (recomputed after a loaded one), and
    // whose turn is next.
    let mut least: Option<(Vec<usize>, usize)> = None;
    for o in objs {
        if o.load == 0.0 {
            let (pes, turn) = least.get_or_insert_with(|| {
                let min = heap.key(heap.top().expect("at least one PE"));
                ((0..base.len()).filter(|&p| heap.key(p) == min).collect(), 0)
            });
            let stays = o.cur != NOWHERE && pes.binary_search(&(o.cur as usize)).is_ok();
            let p = if stays {
                o.cur as usize
            } else {
                *turn += 1;
                pes[(*turn - 1) % pes.len()]
            };
            placed.push(p as u32);
            continue;
        }
        let p = heap.top().expect("at least one PE");
        heap.set(p, heap.key(p) + o.load);
        placed.push(p as u32);
        least = None;
    }
    let max = heap.into_keys().into_iter().fold(0.0, f64::max);
    (placed, max)
}

/// GreedyRefine placement (see [`GreedyRefineLb`]) of `objs` sorted by decreasing load.
pub(crate) fn greedy_refine(base: &[f64], objs: &[TaskObj], tolerance: f64) -> Vec<u32> {
    let (greedy_placed, greedy_max) = greedy(base, objs);
    let bound = greedy_max * tolerance.max(1.0);
    let mut heap = IndexedMinHeap::new(base.to_vec(), 0..base.len());
    let mut placed = Vec::with_capacity(objs.len());
    for o in objs {
        let p = if o.cur != NOWHERE && heap.key(o.cur as usize) + o.load <= bound {
            o.cur as usize
        } else {
            heap.top().expect("at least one PE")
        };
        heap.set(p, heap.key(p) + o.load);
        placed.push(p as u32);
    }
    let max = heap.into_keys().into_iter().fold(0.0, f64::max);
    if max <= bound {
        placed
    } else {
        greedy_placed
    }
}
