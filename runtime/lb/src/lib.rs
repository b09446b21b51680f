//! Measurement-based load balancing for charmrs, as pure algorithms.
//!
//! The runtime measures, per PE, a *background load* (time not spent in chare entry methods that
//! still is not idle: runtime overhead, other processes) and, per chare, the wall time spent in its
//! entry methods since the last balancing step. It hands these numbers to a [`Strategy`] as an
//! [`LbStats`] and gets back the list of [`Migration`]s to perform. Nothing here knows about the
//! runtime: the same code runs inside a job, in tests, and in the offline simulator `lbsim`, which
//! replays dumped ([`dump`]) or synthetic ([`synth`]) load data.
//!
//! Rules every strategy follows:
//! - a PE's load is its `background_load` plus the loads of all objects on it;
//! - non-migratable objects never move; they still count toward their PE's load;
//! - unavailable PEs receive nothing, and their migratable objects are moved off them;
//! - only objects that change PE appear in the result, each at most once.
//!
//! ```
//! use charmrs_lb::{strategy_by_name, LbStats, ObjStats, PeStats};
//!
//! let stats = LbStats {
//!     pes: vec![PeStats::new(0.0); 2],
//!     objects: (0..4).map(|i| ObjStats::new(i, 0, 1.0)).collect(),
//! };
//! let lb = strategy_by_name("GreedyRefineLB").unwrap();
//! let migrations = lb.balance(&stats);
//! let (before, after) = stats.evaluate(&migrations).unwrap();
//! assert_eq!(before.max, 4.0);
//! assert_eq!(after.max, 2.0);
//! assert_eq!(after.migrations, 2);
//! ```

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

pub mod dump;
mod heap;
pub mod prng;
pub mod strategies;
pub mod synth;

pub use strategies::{
    strategy_by_name, DummyLb, GreedyLb, GreedyRefineLb, HierarchicalLb, RandomLb, RefineLb,
    RotateLb, Strategy, DEFAULT_STRATEGY, STRATEGY_NAMES,
};

/// Measured data of one PE.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeStats {
    /// Load on this PE that does not belong to any object (same unit as [`ObjStats::load`]).
    pub background_load: f64,
    /// Whether objects may be placed on this PE. Migratable objects on an unavailable PE are
    /// moved off it.
    pub available: bool,
}

impl PeStats {
    /// An available PE with the given background load.
    pub fn new(background_load: f64) -> Self {
        PeStats {
            background_load,
            available: true,
        }
    }
}

/// Measured data of one object (chare).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjStats {
    /// Identifier, unique within one [`LbStats`]; migrations name objects by it.
    pub id: u64,
    /// The PE the object is on now (index into [`LbStats::pes`]).
    pub pe: usize,
    /// Measured load (e.g. seconds of entry-method time since the last balancing step).
    pub load: f64,
    /// Whether the object may be moved.
    pub migratable: bool,
}

impl ObjStats {
    /// A migratable object.
    pub fn new(id: u64, pe: usize, load: f64) -> Self {
        ObjStats {
            id,
            pe,
            load,
            migratable: true,
        }
    }
}

/// The input of a load-balancing step: every PE and every object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LbStats {
    /// One entry per PE, indexed by PE number.
    pub pes: Vec<PeStats>,
    /// Every object, in any order.
    pub objects: Vec<ObjStats>,
}

/// One object moving from one PE to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Migration {
    /// The object's [`ObjStats::id`].
    pub obj: u64,
    /// The PE it is on now.
    pub from: usize,
    /// The PE it goes to (never equal to `from`).
    pub to: usize,
}

/// Load figures of one placement.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadSummary {
    /// Largest PE load (background + objects) over the available PEs and over unavailable PEs
    /// that still hold objects.
    pub max: f64,
    /// The load that can end up on available PEs (their background load, every migratable
    /// object, the non-migratable objects already on them), divided by the number of available
    /// PEs: the lower bound on the max over available PEs that a perfect balance would reach.
    pub avg: f64,
    /// `max / avg` (1 when both are 0).
    pub max_over_avg: f64,
    /// Number of migrations that led to this placement (0 for the initial one).
    pub migrations: usize,
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max {:.4} avg {:.4} max/avg {:.4} migrations {}",
            self.max, self.avg, self.max_over_avg, self.migrations
        )
    }
}

impl LbStats {
    /// Number of PEs.
    pub fn num_pes(&self) -> usize {
        self.pes.len()
    }

    /// Number of available PEs.
    pub fn num_available(&self) -> usize {
        self.pes.iter().filter(|p| p.available).count()
    }

    /// Checks what strategies rely on: every object is on an existing PE, loads are finite and
    /// non-negative and so is their sum, and object ids are unique. Strategies may panic on stats that fail this.
    pub fn validate(&self) -> Result<(), String> {
        for (i, pe) in self.pes.iter().enumerate() {
            if !(pe.background_load.is_finite() && pe.background_load >= 0.0) {
                return Err(format!(
                    "PE {i}: background load {} is not a finite non-negative number",
                    pe.background_load
                ));
            }
        }
        let mut seen = HashMap::with_capacity(self.objects.len());
        for (i, o) in self.objects.iter().enumerate() {
            if o.pe >= self.pes.len() {
                return Err(format!(
                    "object {} (#{i}) is on PE {} but there are only {} PEs",
                    o.id,
                    o.pe,
                    self.pes.len()
                ));
            }
            if !(o.load.is_finite() && o.load >= 0.0) {
                return Err(format!(
                    "object {} (#{i}): load {} is not a finite non-negative number",
                    o.id, o.load
                ));
            }
            if let Some(prev) = seen.insert(o.id, i) {
                return Err(format!(
                    "object id {} appears twice (#{prev} and #{i})",
                    o.id
                ));
            }
        }
        // Finite loads whose sum is not (1e308 twice) would make every average and comparison
        // of the strategies NaN.
        let total = self.pes.iter().map(|p| p.background_load).sum::<f64>()
            + self.objects.iter().map(|o| o.load).sum::<f64>();
        if !total.is_finite() {
            return Err(format!("the loads add up to {total}, not a finite number"));
        }
        Ok(())
    }

    /// Load of every PE: background plus the objects on it.
    pub fn pe_loads(&self) -> Vec<f64> {
        let mut loads: Vec<f64> = self.pes.iter().map(|p| p.background_load).collect();
        for o in &self.objects {
            loads[o.pe] += o.load;
        }
        loads
    }

    /// Load figures of the current placement (`migrations` is 0).
    pub fn summary(&self) -> LoadSummary {
        let loads = self.pe_loads();
        let mut occupied = vec![false; self.pes.len()];
        let mut total = 0.0;
        for o in &self.objects {
            occupied[o.pe] = true;
            if o.migratable || self.pes[o.pe].available {
                total += o.load;
            }
        }
        let mut max = 0.0f64;
        let mut n_avail = 0usize;
        for (i, pe) in self.pes.iter().enumerate() {
            if pe.available {
                n_avail += 1;
                total += pe.background_load;
                max = max.max(loads[i]);
            } else if occupied[i] {
                max = max.max(loads[i]);
            }
        }
        let avg = if n_avail > 0 {
            total / n_avail as f64
        } else {
            0.0
        };
        let max_over_avg = if avg > 0.0 {
            max / avg
        } else if max > 0.0 {
            f64::INFINITY
        } else {
            1.0
        };
        LoadSummary {
            max,
            avg,
            max_over_avg,
            migrations: 0,
        }
    }

    /// Checks that `migrations` is a valid result for these stats: every object named exists
    /// and appears once, `from` is its current PE, it is migratable, `to` differs from `from`,
    /// exists and is available.
    pub fn check_migrations(&self, migrations: &[Migration]) -> Result<(), String> {
        let index = self.index_by_id();
        let mut moved = vec![false; self.objects.len()];
        for (k, m) in migrations.iter().enumerate() {
            let &i = index
                .get(&m.obj)
                .ok_or_else(|| format!("migration #{k}: no object with id {}", m.obj))?;
            let o = &self.objects[i];
            if moved[i] {
                return Err(format!("migration #{k}: object {} moves twice", m.obj));
            }
            moved[i] = true;
            if !o.migratable {
                return Err(format!(
                    "migration #{k}: object {} is not migratable",
                    m.obj
                ));
            }
            if o.pe != m.from {
                return Err(format!(
                    "migration #{k}: object {} is on PE {}, not on PE {}",
                    m.obj, o.pe, m.from
                ));
            }
            if m.to == m.from {
                return Err(format!(
                    "migration #{k}: object {} moves to its own PE",
                    m.obj
                ));
            }
            match self.pes.get(m.to) {
                None => {
                    return Err(format!(
                        "migration #{k}: object {} goes to PE {} but there are only {} PEs",
                        m.obj,
                        m.to,
                        self.pes.len()
                    ))
                }
                Some(pe) if !pe.available => {
                    return Err(format!(
                        "migration #{k}: object {} goes to unavailable PE {}",
                        m.obj, m.to
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Performs `migrations` on these stats (after [`check_migrations`](Self::check_migrations)).
    /// On error nothing changes.
    pub fn apply(&mut self, migrations: &[Migration]) -> Result<(), String> {
        self.check_migrations(migrations)?;
        let index = self.index_by_id();
        for m in migrations {
            self.objects[index[&m.obj]].pe = m.to;
        }
        Ok(())
    }

    /// Load figures before and after `migrations` (which are checked first).
    pub fn evaluate(&self, migrations: &[Migration]) -> Result<(LoadSummary, LoadSummary), String> {
        let before = self.summary();
        let mut moved = self.clone();
        moved.apply(migrations)?;
        let mut after = moved.summary();
        after.migrations = migrations.len();
        Ok((before, after))
    }

    fn index_by_id(&self) -> HashMap<u64, usize> {
        self.objects
            .iter()
            .enumerate()
            .map(|(i, o)| (o.id, i))
            .collect()
    }
}

/// Turns a new placement (`new_pe[i]` for `stats.objects[i]`) into the migrations that reach it.
pub fn migrations_from_placement(stats: &LbStats, new_pe: &[usize]) -> Vec<Migration> {
    assert_eq!(new_pe.len(), stats.objects.len(), "one new PE per object");
    stats
        .objects
        .iter()
        .zip(new_pe)
        .filter(|(o, &to)| o.pe != to)
        .map(|(o, &to)| Migration {
            obj: o.id,
            from: o.pe,
            to,
        })
        .collect()
}
