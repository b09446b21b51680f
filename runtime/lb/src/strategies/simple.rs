//! The diagnostic strategies: RotateLB, RandomLB, DummyLB.

use super::Strategy;
use crate::prng::SplitMix64;
use crate::{LbStats, Migration};

/// `RotateLB` (diagnostic): every migratable object moves from PE `p` to the next available PE
/// after `p` (cyclically), i.e. to `p + 1 mod P` when all PEs are available. Exercises migration
/// of every object; does not balance anything.
#[derive(Clone, Copy, Debug, Default)]
pub struct RotateLb;

impl Strategy for RotateLb {
    fn name(&self) -> &'static str {
        "RotateLB"
    }

    fn balance(&self, stats: &LbStats) -> Vec<Migration> {
        let n = stats.pes.len();
        // next[p]: the first available PE after p, cyclically (None when there is none).
        let Some(first) = stats.pes.iter().position(|p| p.available) else {
            return Vec::new();
        };
        let mut next = vec![first; n];
        let mut after = first;
        for p in (0..n).rev() {
            next[p] = after;
            if stats.pes[p].available {
                after = p;
            }
        }
        stats
            .objects
            .iter()
            .filter(|o| o.migratable && next[o.pe] != o.pe)
            .map(|o| Migration {
                obj: o.id,
                from: o.pe,
                to: next[o.pe],
            })
            .collect()
    }
}

/// `RandomLB` (diagnostic): every migratable object goes to a uniformly random available PE
/// (objects that draw their own PE stay). Deterministic: the generator starts from `seed` mixed
/// with a hash of the placement, so the same input gives the same result, while successive
/// balancing steps of a run (whose placements differ) draw different targets.
#[derive(Clone, Copy, Debug)]
pub struct RandomLb {
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for RandomLb {
    fn default() -> Self {
        RandomLb { seed: 0x005E_ED1B }
    }
}

impl Strategy for RandomLb {
    fn name(&self) -> &'static str {
        "RandomLB"
    }

    fn balance(&self, stats: &LbStats) -> Vec<Migration> {
        let avail: Vec<usize> = (0..stats.pes.len())
            .filter(|&p| stats.pes[p].available)
            .collect();
        if avail.is_empty() {
            return Vec::new();
        }
        let mut h = SplitMix64::new(self.seed).next();
        for o in &stats.objects {
            h = (h.rotate_left(5) ^ o.id ^ (o.pe as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_mul(0x0100_0000_01B3);
        }
        let mut rng = SplitMix64::new(h);
        let mut out = Vec::new();
        for o in stats.objects.iter().filter(|o| o.migratable) {
            let to = avail[rng.below(avail.len() as u64) as usize];
            if to != o.pe {
                out.push(Migration {
                    obj: o.id,
                    from: o.pe,
                    to,
                });
            }
        }
        out
    }
}

/// `DummyLB`: never migrates anything (the "no load balancing" baseline).
#[derive(Clone, Copy, Debug, Default)]
pub struct DummyLb;

impl Strategy for DummyLb {
    fn name(&self) -> &'static str {
        "DummyLB"
    }

    fn balance(&self, _stats: &LbStats) -> Vec<Migration> {
        Vec::new()
    }
}
