//! Synthetic load distributions for tests and `lbsim`.
//!
//! | [`Dist`] | object load |
//! | --- | --- |
//! | `uniform` | uniform in [0.5, 1.5) |
//! | `normal` | normal, mean 1, standard deviation 0.25, clamped to ≥ 0.01 |
//! | `exponential` | exponential, mean 1 |
//! | `pareto` | Pareto, scale 1, shape 2 (mean 2, heavy tail) |
//! | `stencil-imbalance` | the CharmPy paper's synthetic stencil3d load (§V.B), see below |
//!
//! `stencil-imbalance`: the N = P blocks of the MPI version each split into M/P chares (the paper
//! uses 4 per PE); chare j belongs to block i = ⌊j·P/M⌋ and has load t_k·(1 + α_i) with t_k = 1:
//! α_i = 10 if i ≤ 0.2N or i ≥ 0.8N, else 100·i/N + 5·⌈iter/30⌉. It always starts from the block
//! placement (chares of block i on PE i), as in the paper, whatever [`Initial`] says.
//!
//! Initial placement: [`Initial::Block`] puts object j on PE ⌊j·P/M⌋, [`Initial::Random`] on a
//! uniformly random PE. Object ids are 0..M.

use crate::prng::SplitMix64;
use crate::{LbStats, ObjStats, PeStats};
use std::str::FromStr;

/// A synthetic object-load distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dist {
    /// Uniform in [0.5, 1.5).
    Uniform,
    /// Normal(1, 0.25), clamped to ≥ 0.01.
    Normal,
    /// Exponential with mean 1.
    Exponential,
    /// The CharmPy paper's stencil3d imbalance.
    StencilImbalance,
    /// Pareto(scale 1, shape 2).
    Pareto,
}

impl Dist {
    /// All distributions with their command-line names.
    pub const ALL: &'static [(&'static str, Dist)] = &[
        ("uniform", Dist::Uniform),
        ("normal", Dist::Normal),
        ("exponential", Dist::Exponential),
        ("stencil-imbalance", Dist::StencilImbalance),
        ("pareto", Dist::Pareto),
    ];
}

impl FromStr for Dist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Dist::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|&(_, d)| d)
            .ok_or_else(|| {
                let names: Vec<_> = Dist::ALL.iter().map(|(n, _)| *n).collect();
                format!("unknown distribution '{s}'; valid: {}", names.join(", "))
            })
    }
}

/// Initial placement of synthetic objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initial {
    /// Object j on PE ⌊j·P/M⌋ (contiguous blocks, as a chare array's default map).
    Block,
    /// Each object on a uniformly random PE.
    Random,
}

impl FromStr for Initial {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "block" => Ok(Initial::Block),
            "random" => Ok(Initial::Random),
            _ => Err(format!(
                "unknown initial placement '{s}'; valid: block, random"
            )),
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    /// Number of PEs (> 0).
    pub pes: usize,
    /// Number of objects.
    pub objects: usize,
    /// Load distribution.
    pub dist: Dist,
    /// Seed of every random choice.
    pub seed: u64,
    /// Initial placement.
    pub initial: Initial,
    /// Iteration number for `stencil-imbalance` (the paper balances every 30 iterations).
    pub iter: u32,
    /// Every PE gets a background load uniform in [0, background) (0: none).
    pub background: f64,
    /// Fraction of objects that are not migratable (chosen at random).
    pub non_migratable: f64,
    /// Number of unavailable PEs (the last ones).
    pub unavailable: usize,
}

impl SynthConfig {
    /// `objects` objects over `pes` PEs with loads from `dist`, block placement, nothing else.
    pub fn new(pes: usize, objects: usize, dist: Dist, seed: u64) -> Self {
        SynthConfig {
            pes,
            objects,
            dist,
            seed,
            initial: Initial::Block,
            iter: 30,
            background: 0.0,
            non_migratable: 0.0,
            unavailable: 0,
        }
    }

    /// Generates the stats.
    pub fn generate(&self) -> LbStats {
        assert!(self.pes > 0, "at least one PE");
        let (p, m) = (self.pes, self.objects);
        let mut rng = SplitMix64::new(self.seed);
        let block_pe = |j: usize| ((j as u128 * p as u128) / m as u128) as usize;
        let stencil_extra = 5.0 * (self.iter as f64 / 30.0).ceil();
        let objects = (0..m)
            .map(|j| {
                let load = match self.dist {
                    Dist::Uniform => 0.5 + rng.next_f64(),
                    Dist::Normal => (1.0 + 0.25 * rng.normal()).max(0.01),
                    Dist::Exponential => rng.exponential(),
                    Dist::Pareto => rng.pareto(2.0),
                    Dist::StencilImbalance => {
                        let (i, n) = (block_pe(j) as f64, p as f64);
                        let alpha = if i <= 0.2 * n || i >= 0.8 * n {
                            10.0
                        } else {
                            100.0 * i / n + stencil_extra
                        };
                        1.0 + alpha
                    }
                };
                let pe = match (self.initial, self.dist) {
                    (_, Dist::StencilImbalance) | (Initial::Block, _) => block_pe(j),
                    (Initial::Random, _) => rng.below(p as u64) as usize,
                };
                let migratable =
                    !(self.non_migratable > 0.0 && rng.next_f64() < self.non_migratable);
                ObjStats {
                    id: j as u64,
                    pe,
                    load,
                    migratable,
                }
            })
            .collect();
        let pes = (0..p)
            .map(|i| PeStats {
                background_load: if self.background > 0.0 {
                    self.background * rng.next_f64()
                } else {
                    0.0
                },
                available: i < p.saturating_sub(self.unavailable),
            })
            .collect();
        LbStats { pes, objects }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stencil_matches_the_paper() {
        // 10 blocks, 4 chares each; iteration 30: middle blocks 100·i/10 + 5.
        let s = SynthConfig::new(10, 40, Dist::StencilImbalance, 1).generate();
        let loads: Vec<f64> = s.objects.iter().step_by(4).map(|o| o.load).collect();
        assert_eq!(
            loads,
            vec![11.0, 11.0, 11.0, 36.0, 46.0, 56.0, 66.0, 76.0, 11.0, 11.0]
        );
        assert!(s.objects.iter().all(|o| o.pe == o.id as usize / 4));
        let sum = s.summary();
        assert!((sum.max_over_avg - 76.0 / 33.5).abs() < 1e-12, "{sum}");
    }

    #[test]
    fn deterministic_and_shaped() {
        let mut c = SynthConfig::new(16, 1000, Dist::Normal, 9);
        c.initial = Initial::Random;
        c.non_migratable = 0.1;
        c.unavailable = 2;
        c.background = 0.5;
        let a = c.generate();
        assert_eq!(a, c.generate());
        a.validate().unwrap();
        assert_eq!(a.num_available(), 14);
        let nm = a.objects.iter().filter(|o| !o.migratable).count();
        assert!((50..150).contains(&nm), "{nm}");
        assert!("Stencil-Imbalance".parse::<Dist>().is_ok());
        assert!("gauss".parse::<Dist>().unwrap_err().contains("uniform"));
    }
}
