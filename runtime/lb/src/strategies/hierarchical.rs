//! HierarchicalLB: a two-level strategy for very large PE counts.

use super::greedy::greedy_refine;
use super::{current_placement, Strategy, Task, TaskObj, NOWHERE};
use crate::heap::IndexedMinHeap;
use crate::{migrations_from_placement, LbStats, Migration};

/// `HierarchicalLB`: a scalable strategy for ≥ 10^4 PEs, built from group-local steps the way
/// Charm++'s hierarchical balancers are (a leader per group of PEs, a root over the leaders), with
/// no step that looks at every PE's objects at once.
///
/// The P PEs are seen as a grid of ⌈P/g⌉ rows of `g` consecutive PEs (`group_size`, default
/// ⌈√P⌉). A *pass* over a partition of the PEs into groups does:
///
/// 1. **Top level**, on group totals only: the target of a group is the global average PE load
///    times its number of available PEs. Each group above its target sheds its excess, taking
///    objects from its most loaded PEs first (the largest object not exceeding what is left to
///    shed); the shed objects, heaviest first, go to the group with the largest remaining
///    deficit. Migratable objects on unavailable PEs join the shed objects.
/// 2. **Inside every group**, independently and so in parallel (`threads`): GreedyRefine over the
///    group's PEs and objects; objects that arrived from another group go to its least-loaded PE.
///
/// The first pass uses the rows (PEs that are neighbours, e.g. on one node). When objects are
/// coarse, a row that only received heavy objects cannot pack them well, so a second pass
/// (`column_pass`, on by default) uses the columns (PEs with the same index in every row): each
/// column mixes PEs and objects from all rows, its total is already close to its target, and
/// GreedyRefine inside it repairs the packing while keeping the objects that are fine where they
/// are (this is dimension exchange on a 2-D grid). It runs only when the row pass leaves the max
/// load above `tolerance² × avg`. Migrations are counted from the initial to the final
/// placement, so an object moved by both passes counts once.
///
/// Cost: O(M log M) for M objects in total, the group-local work spread over the threads.
#[derive(Clone, Copy, Debug)]
pub struct HierarchicalLb {
    /// PEs per row (`None`: ⌈√P⌉).
    pub group_size: Option<usize>,
    /// GreedyRefine tolerance inside groups (default 1.03).
    pub tolerance: f64,
    /// Whether to do the second pass over columns (default true).
    pub column_pass: bool,
    /// Worker threads for the group-local steps (`None`: the machine's available parallelism).
    /// The result does not depend on it.
    pub threads: Option<usize>,
}

impl Default for HierarchicalLb {
    fn default() -> Self {
        HierarchicalLb {
            group_size: None,
            tolerance: 1.03,
            column_pass: true,
            threads: None,
        }
    }
}

impl Strategy for HierarchicalLb {
    fn name(&self) -> &'static str {
        "HierarchicalLB"
    }

    fn balance(&self, stats: &LbStats) -> Vec<Migration> {
        let n_pes = stats.pes.len();
        if stats.num_available() == 0 {
            return Vec::new();
        }
        assert!(stats.objects.len() < u32::MAX as usize, "too many objects");
        assert!(n_pes < u32::MAX as usize, "too many PEs");
        let g = self
            .group_size
            .unwrap_or_else(|| (n_pes as f64).sqrt().ceil() as usize)
            .clamp(1, n_pes);
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);

        let mut placement = current_placement(stats);
        let rows = Grouping::new(n_pes, n_pes.div_ceil(g), |p| p / g);
        self.pass(stats, &mut placement, &rows, threads);
        if self.column_pass && g > 1 && n_pes > g && self.rows_left_imbalance(stats, &placement) {
            let columns = Grouping::new(n_pes, g, |p| p % g);
            self.pass(stats, &mut placement, &columns, threads);
        }
        migrations_from_placement(stats, &placement)
    }
}

/// A partition of the PEs into groups.
struct Grouping {
    /// The PEs of every group, in increasing order.
    members: Vec<Vec<u32>>,
    /// Group of every PE.
    group_of: Vec<u32>,
    /// Position of every PE in its group's `members`.
    slot_of: Vec<u32>,
}

impl Grouping {
    fn new(n_pes: usize, n_groups: usize, group_of: impl Fn(usize) -> usize) -> Self {
        let mut members = vec![Vec::new(); n_groups];
        let mut gr = vec![0u32; n_pes];
        let mut slot = vec![0u32; n_pes];
        for p in 0..n_pes {
            let k = group_of(p);
            gr[p] = k as u32;
            slot[p] = members[k].len() as u32;
            members[k].push(p as u32);
        }
        Grouping {
            members,
            group_of: gr,
            slot_of: slot,
        }
    }
}

impl HierarchicalLb {
    /// Whether the max load after the row pass is above `tolerance² × avg`, the most the two
    /// levels of the row pass should leave (group totals, then GreedyRefine inside the group).
    fn rows_left_imbalance(&self, stats: &LbStats, placement: &[usize]) -> bool {
        let mut loads: Vec<f64> = stats.pes.iter().map(|p| p.background_load).collect();
        for (o, &pe) in stats.objects.iter().zip(placement) {
            loads[pe] += o.load;
        }
        let (mut total, mut max, mut n) = (0.0, 0.0f64, 0usize);
        for (l, pe) in loads.iter().zip(&stats.pes) {
            if pe.available {
                total += l;
                max = max.max(*l);
                n += 1;
            }
        }
        let tol = self.tolerance.max(1.0);
        max > tol * tol * total / n as f64
    }

    /// One pass (top level, then inside groups) over `groups`, updating `placement`.
    fn pass(&self, stats: &LbStats, placement: &mut [usize], groups: &Grouping, threads: usize) {
        let n_groups = groups.members.len();
        let group = |pe: usize| groups.group_of[pe] as usize;

        // Per-PE fixed and total load; per-group totals over available PEs.
        let mut base: Vec<f64> = stats.pes.iter().map(|p| p.background_load).collect();
        let mut load = base.clone();
        for (o, &pe) in stats.objects.iter().zip(placement.iter()) {
            load[pe] += o.load;
            if !o.migratable {
                base[pe] += o.load;
            }
        }
        let mut group_load = vec![0.0; n_groups];
        let mut group_avail = vec![0usize; n_groups];
        for (p, pe) in stats.pes.iter().enumerate() {
            if pe.available {
                group_load[group(p)] += load[p];
                group_avail[group(p)] += 1;
            }
        }

        // Migratable objects bucketed by group (counting sort); those on unavailable PEs go
        // straight to the pool.
        let mut pool: Vec<u32> = Vec::new();
        let mut start = vec![0usize; n_groups + 1];
        for (o, &pe) in stats.objects.iter().zip(placement.iter()) {
            if o.migratable && stats.pes[pe].available {
                start[group(pe) + 1] += 1;
            }
        }
        for k in 0..n_groups {
            start[k + 1] += start[k];
        }
        let mut fill = start.clone();
        let mut members = vec![0u32; start[n_groups]];
        for (i, (o, &pe)) in stats.objects.iter().zip(placement.iter()).enumerate() {
            if !o.migratable {
                continue;
            }
            if stats.pes[pe].available {
                let k = group(pe);
                members[fill[k]] = i as u32;
                fill[k] += 1;
            } else {
                pool.push(i as u32);
            }
        }
        let pool_load: f64 = pool.iter().map(|&i| stats.objects[i as usize].load).sum();
        let total: f64 = group_load.iter().sum::<f64>() + pool_load;
        let avg = total / stats.num_available() as f64;

        // Top level, 1: overloaded groups shed objects into the pool.
        let mut shed = vec![false; stats.objects.len()];
        for k in 0..n_groups {
            let excess = group_load[k] - avg * group_avail[k] as f64;
            if excess <= 0.0 || group_avail[k] == 0 {
                continue;
            }
            let objs = &members[start[k]..start[k + 1]];
            for i in shed_excess(stats, placement, &load, groups, k, objs, excess) {
                group_load[k] -= stats.objects[i as usize].load;
                shed[i as usize] = true;
                pool.push(i);
            }
        }

        // Top level, 2: pool objects, heaviest first, to the group with the largest deficit.
        pool.sort_unstable_by(|&a, &b| {
            let (la, lb) = (
                stats.objects[a as usize].load,
                stats.objects[b as usize].load,
            );
            lb.total_cmp(&la).then(a.cmp(&b))
        });
        let surplus: Vec<f64> = (0..n_groups)
            .map(|k| group_load[k] - avg * group_avail[k] as f64)
            .collect();
        let mut receivers =
            IndexedMinHeap::new(surplus, (0..n_groups).filter(|&k| group_avail[k] > 0));
        let mut arrivals: Vec<Vec<u32>> = vec![Vec::new(); n_groups];
        for &i in &pool {
            let k = receivers.top().expect("a group with available PEs");
            receivers.set(k, receivers.key(k) + stats.objects[i as usize].load);
            arrivals[k].push(i);
        }

        // Inside every group: GreedyRefine, groups spread over the threads.
        let placement_now: &[usize] = placement;
        let solve_group = |k: usize| -> Vec<(u32, u32)> {
            let pes = &groups.members[k];
            let mut local = vec![NOWHERE; pes.len()];
            let mut global = Vec::new();
            let mut task = Task {
                base: Vec::new(),
                objs: Vec::new(),
            };
            for (s, &p) in pes.iter().enumerate() {
                if stats.pes[p as usize].available {
                    local[s] = global.len() as u32;
                    global.push(p);
                    task.base.push(base[p as usize]);
                }
            }
            if global.is_empty() {
                return Vec::new();
            }
            let cur_of = |pe: usize| {
                if group(pe) == k {
                    local[groups.slot_of[pe] as usize]
                } else {
                    NOWHERE
                }
            };
            let stay = members[start[k]..start[k + 1]]
                .iter()
                .filter(|&&i| !shed[i as usize]);
            for &i in stay.chain(&arrivals[k]) {
                let o = &stats.objects[i as usize];
                task.objs.push(TaskObj {
                    load: o.load,
                    cur: cur_of(placement_now[i as usize]),
                    idx: i,
                });
            }
            task.sort_decreasing();
            let placed = greedy_refine(&task.base, &task.objs, self.tolerance);
            task.objs
                .iter()
                .zip(placed)
                .map(|(o, l)| (o.idx, global[l as usize]))
                .collect()
        };
        let threads = threads.min(n_groups).max(1);
        let results: Vec<Vec<(u32, u32)>> = if threads == 1 {
            (0..n_groups).map(solve_group).collect()
        } else {
            // Interleaved so that both threads get a similar share of heavy and light groups.
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let solve_group = &solve_group;
                        s.spawn(move || {
                            (t..n_groups)
                                .step_by(threads)
                                .map(solve_group)
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("group worker panicked"))
                    .collect()
            })
        };
        for (i, p) in results.into_iter().flatten() {
            placement[i as usize] = p as usize;
        }
    }
}

/// Picks objects of group `k` (`objs`, all on its available PEs) whose loads add up to at most
/// `excess`, taking each time from the most loaded PE the largest object not exceeding what is
/// left (PEs with nothing small enough are skipped).
fn shed_excess(
    stats: &LbStats,
    placement: &[usize],
    load: &[f64],
    groups: &Grouping,
    k: usize,
    objs: &[u32],
    excess: f64,
) -> Vec<u32> {
    let w = |i: u32| stats.objects[i as usize].load;
    let pes = &groups.members[k];
    // Objects of each PE, sorted by increasing load when the PE is first visited.
    let mut by_slot: Vec<Vec<u32>> = vec![Vec::new(); pes.len()];
    for &i in objs {
        by_slot[groups.slot_of[placement[i as usize]] as usize].push(i);
    }
    let mut sorted = vec![false; pes.len()];
    // Max-heap of PEs by load (negated keys); PEs without objects are left out.
    let neg: Vec<f64> = pes.iter().map(|&p| -load[p as usize]).collect();
    let mut heap = IndexedMinHeap::new(neg, (0..pes.len()).filter(|&s| !by_slot[s].is_empty()));
    let mut left = excess;
    let mut taken = Vec::new();
    let eps = excess * 1e-9;
    while left > eps {
        let Some(s) = heap.top() else { break };
        let list = &mut by_slot[s];
        if !sorted[s] {
            list.sort_unstable_by(|&a, &b| w(a).total_cmp(&w(b)).then(a.cmp(&b)));
            sorted[s] = true;
        }
        let fits = list.partition_point(|&i| w(i) <= left);
        if fits == 0 || w(list[fits - 1]) <= 0.0 {
            heap.remove(s);
            continue;
        }
        let i = list.remove(fits - 1);
        left -= w(i);
        taken.push(i);
        if list.is_empty() {
            heap.remove(s);
        } else {
            heap.set(s, heap.key(s) + w(i));
        }
    }
    taken
}
