//! RefineLB.

use super::{current_placement, Strategy};
use crate::heap::IndexedMinHeap;
use crate::{migrations_from_placement, LbStats, Migration};

/// `RefineLB`: the fewest migrations. Only objects on overloaded PEs (load above
/// `tolerance × avg`) move, and only to PEs that stay at or below that threshold; it stops as soon
/// as no PE is above it (or no move can help any more).
///
/// The heaviest overloaded PE gives to the least-loaded PE: the smallest of its objects that
/// alone brings it under the threshold, else its largest object that fits on the receiver, else
/// (objects too coarse to fit anywhere under the threshold) the object that best evens out the
/// two PEs, if that lowers the max load; when nothing helps the heaviest PE, it stops. Each object
/// moves at most once. Migratable objects on unavailable PEs are first placed greedily.
#[derive(Clone, Copy, Debug)]
pub struct RefineLb {
    /// Allowed max load relative to the average (≥ 1; default 1.03).
    pub tolerance: f64,
}

impl Default for RefineLb {
    fn default() -> Self {
        RefineLb { tolerance: 1.03 }
    }
}

impl Strategy for RefineLb {
    fn name(&self) -> &'static str {
        "RefineLB"
    }

    fn balance(&self, stats: &LbStats) -> Vec<Migration> {
        let avail: Vec<usize> = (0..stats.pes.len())
            .filter(|&p| stats.pes[p].available)
            .collect();
        if avail.is_empty() {
            return Vec::new();
        }
        let mut new_pe = current_placement(stats);
        let mut loads = stats.pe_loads();

        // Evacuate unavailable PEs: their migratable objects, heaviest first, to the least loaded.
        let mut evacuees: Vec<usize> = (0..stats.objects.len())
            .filter(|&i| {
                let o = &stats.objects[i];
                o.migratable && !stats.pes[o.pe].available
            })
            .collect();
        let mut receivers = IndexedMinHeap::new(loads.clone(), avail.iter().copied());
        if !evacuees.is_empty() {
            evacuees.sort_unstable_by(|&a, &b| {
                stats.objects[b]
                    .load
                    .total_cmp(&stats.objects[a].load)
                    .then(a.cmp(&b))
            });
            for &i in &evacuees {
                let o = &stats.objects[i];
                let to = receivers.top().expect("an available PE");
                receivers.set(to, receivers.key(to) + o.load);
                loads[o.pe] -= o.load;
                loads[to] += o.load;
                new_pe[i] = to;
            }
        }

        let total: f64 = avail.iter().map(|&p| loads[p]).sum();
        let threshold = self.tolerance.max(1.0) * total / avail.len() as f64;

        // Candidate objects of every overloaded PE, by increasing load.
        let mut donors_of: Vec<Vec<usize>> = vec![Vec::new(); stats.pes.len()];
        for (i, o) in stats.objects.iter().enumerate() {
            if o.migratable && stats.pes[o.pe].available && loads[o.pe] > threshold {
                donors_of[o.pe].push(i);
            }
        }
        for list in donors_of.iter_mut().filter(|l| !l.is_empty()) {
            list.sort_unstable_by(|&a, &b| {
                stats.objects[a]
                    .load
                    .total_cmp(&stats.objects[b].load)
                    .then(a.cmp(&b))
            });
        }
        // Max-heap of overloaded PEs (keys negated).
        let neg: Vec<f64> = loads.iter().map(|l| -l).collect();
        let mut donors =
            IndexedMinHeap::new(neg, avail.iter().copied().filter(|&p| loads[p] > threshold));

        // Highest load of a receiver that had to go above the threshold (rule 3 below): once
        // no donor is above it, moving more cannot lower the max load.
        let mut ceiling = 0.0f64;
        while let Some(d) = donors.top() {
            let load_d = loads[d];
            if load_d <= threshold {
                donors.remove(d);
                continue;
            }
            if load_d <= ceiling {
                break;
            }
            let r = receivers.top().expect("an available PE");
            if r == d {
                break;
            }
            let room = threshold - loads[r];
            let need = load_d - threshold;
            let gap = load_d - loads[r];
            let list = &mut donors_of[d];
            let w = |k: usize| stats.objects[list[k]].load;
            let first_at_least = |x: f64| list.partition_point(|&i| stats.objects[i].load < x);
            // 1. The smallest object that alone fixes the donor, if it fits on the receiver.
            let enough = first_at_least(need);
            let mut pick = (enough < list.len() && w(enough) <= room).then_some(enough);
            // 2. Else the largest object that fits on the receiver.
            if pick.is_none() {
                let fits = list.partition_point(|&i| stats.objects[i].load <= room);
                pick = (fits > 0 && w(fits - 1) > 0.0).then(|| fits - 1);
            }
            // 3. Else (coarse objects) the object that best evens out donor and receiver, as long
            //    as both end below the donor's current load, i.e. the max load decreases.
            if pick.is_none() {
                let mid = first_at_least(gap / 2.0);
                let worse = |k: usize| (load_d - w(k)).max(loads[r] + w(k));
                pick = [mid.checked_sub(1), (mid < list.len()).then_some(mid)]
                    .into_iter()
                    .flatten()
                    .filter(|&k| w(k) > 0.0 && w(k) < gap)
                    .min_by(|&a, &b| worse(a).total_cmp(&worse(b)).then(a.cmp(&b)));
            }
            let Some(k) = pick else {
                // Nothing can lower this PE's load below its current value by moving one object
                // to the least-loaded PE; it bounds the max load.
                break;
            };
            let i = list.remove(k);
            let load = stats.objects[i].load;
            loads[d] -= load;
            loads[r] += load;
            if loads[r] > threshold {
                ceiling = ceiling.max(loads[r]);
            }
            new_pe[i] = r;
            donors.set(d, -loads[d]);
            receivers.set(d, loads[d]);
            receivers.set(r, loads[r]);
        }
        migrations_from_placement(stats, &new_pe)
    }
}
