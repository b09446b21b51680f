//! The [`Strategy`] trait, the strategies, and lookup by Charm++ name.
//!
//! | name (alias) | what it does |
//! | --- | --- |
//! | `GreedyLB` (`Greedy`) | objects by decreasing load, each to the least-loaded PE; ignores the current placement |
//! | `GreedyRefineLB` (`GreedyRefine`, the default) | Greedy's quality, but an object stays on its PE when that keeps the PE within a tolerance of Greedy's max load |
//! | `RefineLB` (`Refine`) | fewest migrations: moves objects from PEs above `tolerance × avg` to the least-loaded PEs |
//! | `RotateLB` (`Rotate`) | diagnostic: every migratable object to the next available PE |
//! | `RandomLB` (`Random`) | diagnostic: every migratable object to a random available PE (seeded) |
//! | `HierarchicalLB` (`Hierarchical`) | for ≥ 10^4 PEs: balances groups of ~√P PEs, then GreedyRefine inside each group, in parallel |
//! | `DummyLB` (`Dummy`, `NoLB`) | no migrations (baseline) |

mod greedy;
mod hierarchical;
mod refine;
mod simple;

pub use greedy::{GreedyLb, GreedyRefineLb};
pub use hierarchical::HierarchicalLb;
pub use refine::RefineLb;
pub use simple::{DummyLb, RandomLb, RotateLb};

use crate::{LbStats, Migration};

/// A load-balancing strategy: from measured loads to migrations.
///
/// Implementations are pure and deterministic: the same stats give the same migrations. They
/// expect stats that pass [`LbStats::validate`] and may panic otherwise.
pub trait Strategy: Send + Sync {
    /// The Charm++ name, e.g. `"GreedyRefineLB"`.
    fn name(&self) -> &'static str;
    /// The migrations that balance `stats` (only objects that change PE, each once).
    fn balance(&self, stats: &LbStats) -> Vec<Migration>;
}

/// The canonical names, in the order `lbsim --strategy all` runs them.
pub const STRATEGY_NAMES: &[&str] = &[
    "DummyLB",
    "GreedyLB",
    "GreedyRefineLB",
    "RefineLB",
    "HierarchicalLB",
    "RotateLB",
    "RandomLB",
];

/// The strategy used when none is named.
pub const DEFAULT_STRATEGY: &str = "GreedyRefineLB";

/// The strategy called `name`: a name of [`STRATEGY_NAMES`] or the same without the `LB` suffix
/// (`Greedy`, `GreedyRefine`, …); case does not matter. Strategies come with their default
/// parameters and seeds. The error lists the valid names.
pub fn strategy_by_name(name: &str) -> Result<Box<dyn Strategy>, String> {
    let key = name.trim().to_ascii_lowercase();
    let key = key.strip_suffix("lb").unwrap_or(&key);
    Ok(match key {
        "greedy" => Box::new(GreedyLb),
        "greedyrefine" => Box::new(GreedyRefineLb::default()),
        "refine" => Box::new(RefineLb::default()),
        "rotate" => Box::new(RotateLb),
        "random" => Box::new(RandomLb::default()),
        "hierarchical" | "hier" => Box::new(HierarchicalLb::default()),
        "dummy" | "no" | "none" => Box::new(DummyLb),
        _ => {
            return Err(format!(
                "unknown load balancer '{name}'; valid names: {} (the 'LB' suffix is optional, \
                 case does not matter)",
                STRATEGY_NAMES.join(", ")
            ))
        }
    })
}

/// Marks "not on any PE of this task" in [`TaskObj::cur`].
pub(crate) const NOWHERE: u32 = u32::MAX;

/// A migratable object inside a balancing task.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TaskObj {
    pub(crate) load: f64,
    /// Its current PE as a task-local index, or [`NOWHERE`] (unavailable PE, other group).
    pub(crate) cur: u32,
    /// Index into `LbStats::objects`.
    pub(crate) idx: u32,
}

/// A balancing problem over task-local PEs `0..base.len()` (all available).
pub(crate) struct Task {
    /// Load each PE has whatever happens: background plus its non-migratable objects.
    pub(crate) base: Vec<f64>,
    /// The objects to place.
    pub(crate) objs: Vec<TaskObj>,
}

impl Task {
    /// The whole machine as one task. Returns it and the global PE of every task-local PE.
    pub(crate) fn whole(stats: &LbStats) -> (Task, Vec<usize>) {
        assert!(stats.objects.len() < u32::MAX as usize, "too many objects");
        let mut local = vec![NOWHERE; stats.pes.len()];
        let mut global = Vec::new();
        let mut base = Vec::new();
        for (p, pe) in stats.pes.iter().enumerate() {
            if pe.available {
                local[p] = global.len() as u32;
                global.push(p);
                base.push(pe.background_load);
            }
        }
        let mut objs = Vec::with_capacity(stats.objects.len());
        for (i, o) in stats.objects.iter().enumerate() {
            let l = local[o.pe];
            if o.migratable {
                objs.push(TaskObj {
                    load: o.load,
                    cur: l,
                    idx: i as u32,
                });
            } else if l != NOWHERE {
                base[l as usize] += o.load;
            }
        }
        (Task { base, objs }, global)
    }

    /// Sorts the objects by decreasing load (ties: by index, so results are deterministic).
    pub(crate) fn sort_decreasing(&mut self) {
        self.objs
            .sort_unstable_by(|a, b| b.load.total_cmp(&a.load).then(a.idx.cmp(&b.idx)));
    }
}

/// Writes a task's result (task-local PE per object, in `task.objs` order) into `new_pe`.
pub(crate) fn write_back(task: &Task, placed: &[u32], global: &[usize], new_pe: &mut [usize]) {
    for (o, &l) in task.objs.iter().zip(placed) {
        new_pe[o.idx as usize] = global[l as usize];
    }
}

/// The current placement, to be modified by a strategy.
pub(crate) fn current_placement(stats: &LbStats) -> Vec<usize> {
    stats.objects.iter().map(|o| o.pe).collect()
}
