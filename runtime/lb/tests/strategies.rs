//! Properties every strategy must have, and the quality each one promises.

use charmrs_lb::synth::{Dist, Initial, SynthConfig};
use charmrs_lb::{
    strategy_by_name, GreedyLb, GreedyRefineLb, HierarchicalLb, LbStats, Migration, ObjStats,
    PeStats, RandomLb, RefineLb, RotateLb, Strategy, STRATEGY_NAMES,
};
use std::collections::HashMap;

fn all_strategies() -> Vec<Box<dyn Strategy>> {
    STRATEGY_NAMES
        .iter()
        .map(|n| strategy_by_name(n).unwrap())
        .collect()
}

/// Checks the invariants and returns the stats after the migrations.
fn check(stats: &LbStats, s: &dyn Strategy, migrations: &[Migration]) -> LbStats {
    let name = s.name();
    stats.validate().unwrap();
    stats
        .check_migrations(migrations)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut after = stats.clone();
    after.apply(migrations).unwrap();
    // Every object assigned exactly once, loads unchanged.
    assert_eq!(after.objects.len(), stats.objects.len(), "{name}");
    let mut seen = HashMap::new();
    for o in &after.objects {
        assert!(
            seen.insert(o.id, ()).is_none(),
            "{name}: object {} twice",
            o.id
        );
    }
    for (a, b) in stats.objects.iter().zip(&after.objects) {
        assert_eq!(
            (a.id, a.load, a.migratable),
            (b.id, b.load, b.migratable),
            "{name}"
        );
        if !a.migratable {
            assert_eq!(a.pe, b.pe, "{name} moved non-migratable object {}", a.id);
        }
        if a.pe != b.pe {
            assert!(
                stats.pes[b.pe].available,
                "{name} sent object {} to unavailable PE",
                a.id
            );
        }
    }
    after
}

fn scenarios() -> Vec<(String, LbStats)> {
    let mut out = Vec::new();
    for (i, &(dname, dist)) in Dist::ALL.iter().enumerate() {
        for initial in [Initial::Block, Initial::Random] {
            let mut c = SynthConfig::new(37, 1500, dist, 100 + i as u64);
            c.initial = initial;
            out.push((format!("{dname}/{initial:?}"), c.generate()));
            c.non_migratable = 0.2;
            c.unavailable = 5;
            c.background = 3.0;
            out.push((format!("{dname}/{initial:?}/constrained"), c.generate()));
        }
    }
    out
}

#[test]
fn invariants_hold_for_every_strategy_and_scenario() {
    for (what, stats) in scenarios() {
        for s in all_strategies() {
            let m = s.balance(&stats);
            let after = check(&stats, s.as_ref(), &m);
            if s.name() != "DummyLB" {
                // Unavailable PEs are emptied of migratable objects.
                for o in after.objects.iter().filter(|o| o.migratable) {
                    assert!(
                        after.pes[o.pe].available,
                        "{what} {}: object {} left",
                        s.name(),
                        o.id
                    );
                }
            }
            assert_eq!(
                m,
                s.balance(&stats),
                "{what} {}: not deterministic",
                s.name()
            );
        }
    }
}

#[test]
fn balancing_strategies_improve_constrained_cases() {
    // (With unavailable PEs the initial max may be below the average, as the objects that must
    // leave them are not yet counted on available PEs.)
    for (what, mut stats) in scenarios() {
        for p in &mut stats.pes {
            p.available = true;
        }
        let before = stats.summary();
        for name in ["Greedy", "GreedyRefine", "Refine", "Hierarchical"] {
            let s = strategy_by_name(name).unwrap();
            let (_, after) = stats.evaluate(&s.balance(&stats)).unwrap();
            assert!(
                after.max <= before.max + 1e-9,
                "{what} {name}: {before} -> {after}"
            );
        }
    }
}

fn fine_grained(dist: Dist, initial: Initial, seed: u64) -> LbStats {
    let mut c = SynthConfig::new(64, 6400, dist, seed);
    c.initial = initial;
    c.generate()
}

#[test]
fn greedy_and_greedy_refine_reach_1_05_on_uniform_and_normal() {
    for dist in [Dist::Uniform, Dist::Normal] {
        for initial in [Initial::Block, Initial::Random] {
            let stats = fine_grained(dist, initial, 7);
            for s in [&GreedyLb as &dyn Strategy, &GreedyRefineLb::default()] {
                let (before, after) = stats.evaluate(&s.balance(&stats)).unwrap();
                assert!(
                    after.max_over_avg <= 1.05,
                    "{dist:?} {initial:?} {}: {before} -> {after}",
                    s.name()
                );
            }
        }
    }
}

#[test]
fn greedy_refine_migrates_far_less_than_greedy_with_similar_quality() {
    for dist in [Dist::Uniform, Dist::Normal, Dist::Exponential] {
        let stats = fine_grained(dist, Initial::Random, 11);
        let greedy = GreedyLb.balance(&stats);
        let refine = GreedyRefineLb::default().balance(&stats);
        let (_, g) = stats.evaluate(&greedy).unwrap();
        let (_, r) = stats.evaluate(&refine).unwrap();
        assert!(r.max <= g.max * 1.03 + 1e-9, "{dist:?}: {g} vs {r}");
        assert!(refine.len() * 2 < greedy.len(), "{dist:?}: {g} vs {r}");
    }
}

#[test]
fn greedy_refine_keeps_a_balanced_placement() {
    // Already perfectly balanced: nothing to do.
    let stats = LbStats {
        pes: vec![PeStats::new(0.0); 4],
        objects: (0..40)
            .map(|i| ObjStats::new(i, i as usize / 10, 1.0))
            .collect(),
    };
    assert!(GreedyRefineLb::default().balance(&stats).is_empty());
    assert!(RefineLb::default().balance(&stats).is_empty());
    assert!(HierarchicalLb::default().balance(&stats).is_empty());
    assert!(
        GreedyLb.balance(&stats).len() >= 20,
        "Greedy ignores the placement"
    );
}

/// Objects of no measured load (elements that ran nothing in the period) go to the least loaded
/// PEs without all ending up on one: Greedy used to put every one on the heap's top, whose load
/// they never raise.
#[test]
fn greedy_does_not_pile_unloaded_objects_on_one_pe() {
    let stats = LbStats {
        pes: vec![PeStats::new(0.0); 4],
        objects: (0..8)
            .map(|i| ObjStats::new(i, i as usize / 2, 0.0))
            .collect(),
    };
    let after = check(&stats, &GreedyLb, &GreedyLb.balance(&stats));
    let mut per_pe = [0; 4];
    for o in &after.objects {
        per_pe[o.pe] += 1;
    }
    assert_eq!(per_pe, [2; 4], "{:?}", after.objects);
    // Off an unavailable PE, they are spread too.
    let mut evacuate = stats.clone();
    evacuate.pes[0].available = false;
    evacuate.objects = (0..9).map(|i| ObjStats::new(i, 0, 0.0)).collect();
    let after = check(&evacuate, &GreedyLb, &GreedyLb.balance(&evacuate));
    let mut per_pe = [0; 4];
    for o in &after.objects {
        per_pe[o.pe] += 1;
    }
    assert_eq!(per_pe, [0, 3, 3, 3], "{:?}", after.objects);
    // Off a busy PE (background load), to the least loaded ones.
    let mut busy = stats.clone();
    busy.pes[0].background_load = 1.0;
    let after = check(&busy, &GreedyLb, &GreedyLb.balance(&busy));
    let mut per_pe = [0; 4];
    for o in &after.objects {
        per_pe[o.pe] += 1;
    }
    assert_eq!(per_pe, [0, 3, 3, 2], "{:?}", after.objects);
}

#[test]
fn refine_moves_fewer_objects_than_greedy_and_reaches_its_tolerance() {
    for dist in [
        Dist::Uniform,
        Dist::Normal,
        Dist::Exponential,
        Dist::StencilImbalance,
    ] {
        let stats = fine_grained(dist, Initial::Block, 5);
        let greedy = GreedyLb.balance(&stats);
        let refine = RefineLb::default().balance(&stats);
        assert!(
            refine.len() < greedy.len(),
            "{dist:?}: {} vs {}",
            refine.len(),
            greedy.len()
        );
        let (before, after) = stats.evaluate(&refine).unwrap();
        assert!(after.max < before.max, "{dist:?}: {before} -> {after}");
        if dist != Dist::StencilImbalance {
            assert!(
                after.max_over_avg <= 1.03 + 1e-9,
                "{dist:?}: {before} -> {after}"
            );
        }
    }
}

#[test]
fn refine_only_moves_from_overloaded_to_underloaded() {
    let stats = fine_grained(Dist::Exponential, Initial::Random, 3);
    let loads = stats.pe_loads();
    let avg = stats.summary().avg;
    for m in RefineLb::default().balance(&stats) {
        assert!(
            loads[m.from] > 1.03 * avg,
            "{m:?} from a PE that was not overloaded"
        );
        assert!(loads[m.to] < avg, "{m:?} to a PE that was not underloaded");
    }
}

#[test]
fn hierarchical_balances_and_does_not_depend_on_threads() {
    for dist in [Dist::Uniform, Dist::Normal] {
        let mut c = SynthConfig::new(400, 20_000, dist, 21);
        c.initial = Initial::Random;
        let stats = c.generate();
        let one = HierarchicalLb {
            threads: Some(1),
            ..Default::default()
        }
        .balance(&stats);
        let three = HierarchicalLb {
            threads: Some(3),
            ..Default::default()
        }
        .balance(&stats);
        assert_eq!(one, three);
        let (before, after) = stats.evaluate(&one).unwrap();
        assert!(after.max_over_avg <= 1.05, "{dist:?}: {before} -> {after}");
        assert!(
            one.len() < stats.objects.len() / 2,
            "{dist:?}: {} migrations",
            one.len()
        );
    }
    // Odd group sizes, a single row, one PE per group.
    let stats = fine_grained(Dist::Exponential, Initial::Random, 2);
    for g in [1, 5, 63, 64, 1000] {
        let s = HierarchicalLb {
            group_size: Some(g),
            ..Default::default()
        };
        let m = s.balance(&stats);
        let (_, after) = stats.evaluate(&m).unwrap();
        assert!(after.max_over_avg <= 1.1, "group size {g}: {after}");
    }
}

#[test]
fn stencil_imbalance_speedup_is_in_the_papers_range() {
    let stats = SynthConfig::new(1000, 4000, Dist::StencilImbalance, 1).generate();
    for name in ["GreedyRefine", "Greedy", "Hierarchical"] {
        let s = strategy_by_name(name).unwrap();
        let (before, after) = stats.evaluate(&s.balance(&stats)).unwrap();
        let speedup = before.max / after.max;
        assert!(
            (1.9..=2.3).contains(&speedup),
            "{name}: {before} -> {after}: {speedup}"
        );
    }
}

#[test]
fn rotate_moves_every_migratable_object_to_the_next_pe() {
    let mut c = SynthConfig::new(9, 200, Dist::Uniform, 4);
    c.initial = Initial::Random;
    c.non_migratable = 0.3;
    let stats = c.generate();
    let m = RotateLb.balance(&stats);
    let migratable: Vec<&ObjStats> = stats.objects.iter().filter(|o| o.migratable).collect();
    assert_eq!(m.len(), migratable.len());
    for (mig, o) in m.iter().zip(migratable) {
        assert_eq!(
            *mig,
            Migration {
                obj: o.id,
                from: o.pe,
                to: (o.pe + 1) % 9
            }
        );
    }
    // With unavailable PEs, the next available one; a single PE rotates to itself.
    let mut stats = stats;
    stats.pes[3].available = false;
    for mig in RotateLb.balance(&stats) {
        assert_eq!(mig.to, if mig.from == 2 { 4 } else { (mig.from + 1) % 9 });
    }
    let single = LbStats {
        pes: vec![PeStats::new(0.0)],
        objects: vec![ObjStats::new(1, 0, 1.0)],
    };
    assert!(RotateLb.balance(&single).is_empty());
}

#[test]
fn random_is_seeded() {
    let stats = fine_grained(Dist::Uniform, Initial::Block, 1);
    let a = RandomLb { seed: 1 }.balance(&stats);
    assert_eq!(a, RandomLb { seed: 1 }.balance(&stats));
    assert_ne!(a, RandomLb { seed: 2 }.balance(&stats));
    assert!(a.len() > stats.objects.len() * 9 / 10);
}

#[test]
fn degenerate_inputs() {
    let empty = LbStats::default();
    let no_objects = LbStats {
        pes: vec![PeStats::new(1.0); 3],
        objects: vec![],
    };
    let mut none_available = fine_grained(Dist::Uniform, Initial::Block, 1);
    for p in &mut none_available.pes {
        p.available = false;
    }
    let zero_loads = LbStats {
        pes: vec![PeStats::new(0.0); 3],
        objects: (0..10).map(|i| ObjStats::new(i, 0, 0.0)).collect(),
    };
    let mut one_available = fine_grained(Dist::Normal, Initial::Random, 1);
    for p in &mut one_available.pes[1..] {
        p.available = false;
    }
    for stats in [empty, no_objects, none_available, zero_loads, one_available] {
        for s in all_strategies() {
            let m = s.balance(&stats);
            check(&stats, s.as_ref(), &m);
        }
    }
}

#[test]
fn names_and_aliases() {
    for (alias, name) in [
        ("Greedy", "GreedyLB"),
        ("GreedyLB", "GreedyLB"),
        ("GreedyRefine", "GreedyRefineLB"),
        ("greedyrefinelb", "GreedyRefineLB"),
        ("Refine", "RefineLB"),
        ("RotateLB", "RotateLB"),
        ("Random", "RandomLB"),
        ("Hierarchical", "HierarchicalLB"),
        ("HierarchicalLB", "HierarchicalLB"),
        ("Dummy", "DummyLB"),
    ] {
        assert_eq!(strategy_by_name(alias).unwrap().name(), name);
    }
    assert_eq!(
        strategy_by_name(charmrs_lb::DEFAULT_STRATEGY)
            .unwrap()
            .name(),
        "GreedyRefineLB"
    );
    for n in STRATEGY_NAMES {
        assert_eq!(strategy_by_name(n).unwrap().name(), *n);
    }
    let e = strategy_by_name("MetisLB").err().unwrap();
    assert!(e.contains("'MetisLB'"), "{e}");
    for n in STRATEGY_NAMES {
        assert!(e.contains(n), "{e}");
    }
}

#[test]
fn summary_and_apply() {
    let mut stats = LbStats {
        pes: vec![
            PeStats::new(1.0),
            PeStats::new(0.0),
            PeStats {
                background_load: 5.0,
                available: false,
            },
        ],
        objects: vec![ObjStats::new(10, 0, 2.0), ObjStats::new(11, 2, 1.0)],
    };
    let s = stats.summary();
    // Loads 3, 0 and 6 (unavailable, but holding an object); avg = (3 + 0 + 1) / 2.
    assert_eq!((s.max, s.avg), (6.0, 2.0));
    let bad = [
        (
            Migration {
                obj: 99,
                from: 0,
                to: 1,
            },
            "no object with id 99",
        ),
        (
            Migration {
                obj: 10,
                from: 1,
                to: 0,
            },
            "is on PE 0",
        ),
        (
            Migration {
                obj: 10,
                from: 0,
                to: 2,
            },
            "unavailable PE 2",
        ),
        (
            Migration {
                obj: 10,
                from: 0,
                to: 7,
            },
            "only 3 PEs",
        ),
        (
            Migration {
                obj: 10,
                from: 0,
                to: 0,
            },
            "its own PE",
        ),
    ];
    for (m, want) in bad {
        let e = stats.apply(&[m]).unwrap_err();
        assert!(e.contains(want), "{e}");
    }
    let twice = [
        Migration {
            obj: 10,
            from: 0,
            to: 1,
        },
        Migration {
            obj: 10,
            from: 0,
            to: 1,
        },
    ];
    assert!(stats.apply(&twice).unwrap_err().contains("twice"));
    stats.objects[0].migratable = false;
    assert!(stats
        .apply(&twice[..1])
        .unwrap_err()
        .contains("not migratable"));
    stats.objects[0].migratable = true;
    stats
        .apply(&[Migration {
            obj: 11,
            from: 2,
            to: 1,
        }])
        .unwrap();
    let s = stats.summary();
    assert_eq!((s.max, s.avg), (3.0, 2.0));
    stats.objects.push(ObjStats::new(10, 1, 1.0));
    assert!(stats.validate().unwrap_err().contains("appears twice"));
    // Finite loads whose sum is not.
    let huge = LbStats {
        pes: vec![PeStats::new(0.0); 2],
        objects: vec![ObjStats::new(0, 0, 1e308), ObjStats::new(1, 1, 1e308)],
    };
    assert!(huge.validate().unwrap_err().contains("not a finite number"));
}
