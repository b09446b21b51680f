//! `lbsim`: runs load-balancing strategies offline on synthetic or dumped load data.
//!
//! ```text
//! lbsim [--pes N] [--objects M] [--dist uniform|normal|exponential|stencil-imbalance|pareto]
//!       [--seed S] [--initial block|random] [--iter K] [--background B]
//!       [--non-migratable F] [--unavailable K] [--load FILE] [--dump FILE]
//!       [--strategy NAME|all] [--threads T] [--stencil-run ITERS [--lb-period K]]
//! ```
//!
//! `--stencil-run` replays the CharmPy paper's whole imbalanced stencil3d run (§V.B): loads of
//! iteration t follow the stencil-imbalance formula with iter = t, the strategy runs every
//! `--lb-period` iterations on the loads just measured, and the run's time is the sum over
//! iterations of the max PE load; the speedup is relative to the same run without balancing.

use charmrs_lb::dump::{load_dump, save_dump};
use charmrs_lb::synth::{Dist, Initial, SynthConfig};
use charmrs_lb::{strategy_by_name, HierarchicalLb, LbStats, Strategy, STRATEGY_NAMES};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "\
usage: lbsim [options]
  --pes N                PEs (default 64)
  --objects M            objects (default 16 per PE)
  --dist D               uniform | normal | exponential | stencil-imbalance | pareto (default uniform)
  --seed S               seed of the synthetic data (default 1)
  --initial I            block | random initial placement (default block)
  --iter K               iteration number for stencil-imbalance (default 30)
  --background B         per-PE background load uniform in [0, B) (default 0)
  --non-migratable F     fraction of non-migratable objects (default 0)
  --unavailable K        make the last K PEs unavailable (default 0)
  --load FILE            read an LB dump instead of generating data
  --dump FILE            write the input data as an LB dump
  --strategy NAME|all    strategy, or several separated by commas (default GreedyRefineLB);
                         'all' compares every one
  --threads T            worker threads of HierarchicalLB (default: all cores)
  --stencil-run ITERS    simulate a whole stencil-imbalance run of ITERS iterations, balancing
                         every --lb-period iterations (default 30); reports time and speedup
  --lb-first K           with --stencil-run: also balance after iteration K (stencil3d's
                         --lb-warmup; default 0: no early step)
  -h, --help             this text";

struct Options {
    synth: SynthConfig,
    objects_set: bool,
    load: Option<String>,
    dump: Option<String>,
    strategy: String,
    threads: Option<usize>,
    stencil_run: Option<u32>,
    lb_period: u32,
    lb_first: u32,
}

fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        synth: SynthConfig::new(64, 0, Dist::Uniform, 1),
        objects_set: false,
        load: None,
        dump: None,
        strategy: charmrs_lb::DEFAULT_STRATEGY.to_string(),
        threads: None,
        stencil_run: None,
        lb_period: 30,
        lb_first: 0,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{name}: '{v}' is not a valid number"))
        }
        match name {
            "--pes" => o.synth.pes = num(name, value()?)?,
            "--objects" => {
                o.synth.objects = num(name, value()?)?;
                o.objects_set = true;
            }
            "--dist" => o.synth.dist = value()?.parse()?,
            "--seed" => o.synth.seed = num(name, value()?)?,
            "--initial" => o.synth.initial = value()?.parse::<Initial>()?,
            "--iter" => o.synth.iter = num(name, value()?)?,
            "--background" => o.synth.background = num(name, value()?)?,
            "--non-migratable" => o.synth.non_migratable = num(name, value()?)?,
            "--unavailable" => o.synth.unavailable = num(name, value()?)?,
            "--load" => o.load = Some(value()?),
            "--dump" => o.dump = Some(value()?),
            "--strategy" => o.strategy = value()?,
            "--threads" => o.threads = Some(num(name, value()?)?),
            "--stencil-run" => o.stencil_run = Some(num(name, value()?)?),
            "--lb-period" => o.lb_period = num(name, value()?)?,
            "--lb-first" => o.lb_first = num(name, value()?)?,
            _ => return Err(format!("unknown option '{flag}'")),
        }
    }
    if o.synth.pes == 0 {
        return Err("--pes must be at least 1".into());
    }
    if !o.objects_set {
        o.synth.objects = 16 * o.synth.pes;
    }
    if !(o.synth.background.is_finite() && o.synth.background >= 0.0) {
        return Err(format!(
            "--background must be a load of at least 0, not {}",
            o.synth.background
        ));
    }
    if !(0.0..=1.0).contains(&o.synth.non_migratable) {
        return Err(format!(
            "--non-migratable is a fraction between 0 and 1, not {}",
            o.synth.non_migratable
        ));
    }
    if o.synth.objects == 0 {
        return Err("--objects must be at least 1".into());
    }
    if o.stencil_run.is_some() {
        if o.load.is_some() {
            return Err("--stencil-run generates its data; it cannot be used with --load".into());
        }
        if o.lb_period == 0 {
            return Err("--lb-period must be at least 1".into());
        }
        o.synth.dist = Dist::StencilImbalance;
    }
    Ok(Some(o))
}

fn strategies(o: &Options) -> Result<Vec<Box<dyn Strategy>>, String> {
    let names: Vec<&str> = if o.strategy.eq_ignore_ascii_case("all") {
        STRATEGY_NAMES.to_vec()
    } else {
        o.strategy.split(',').collect()
    };
    names
        .into_iter()
        .map(|n| {
            let s = strategy_by_name(n).map_err(|e| format!("{e}, or 'all'"))?;
            Ok(match (s.name(), o.threads) {
                ("HierarchicalLB", Some(t)) => Box::new(HierarchicalLb {
                    threads: Some(t),
                    ..Default::default()
                }),
                _ => s,
            })
        })
        .collect()
}

/// The whole-run stencil simulation of `--stencil-run`.
fn stencil_run(o: &Options, iters: u32) -> Result<(), String> {
    let list = strategies(o)?;
    let at = |t: u32| {
        SynthConfig {
            iter: t,
            ..o.synth.clone()
        }
        .generate()
    };
    let first = at(1);
    first.validate()?;
    println!(
        "stencil-imbalance run: {} PEs, {} objects ({} per PE), {iters} iterations, balancing \
         every {} iterations{}; time = sum over iterations of the max PE load",
        first.pes.len(),
        first.objects.len(),
        first.objects.len() as f64 / first.pes.len() as f64,
        o.lb_period,
        if o.lb_first > 0 {
            format!(" and after iteration {}", o.lb_first)
        } else {
            String::new()
        }
    );
    let run = |s: Option<&dyn Strategy>| -> Result<(f64, usize, f64), String> {
        let mut placement: Vec<usize> = first.objects.iter().map(|o| o.pe).collect();
        let (mut time, mut moved, mut lb_secs) = (0.0, 0usize, 0.0);
        let mut stats = first.clone();
        for t in 1..=iters {
            if t == 1 || (t - 1) % 30 == 0 {
                // Loads change when ⌈t/30⌉ does.
                stats = at(t);
                for (obj, &pe) in stats.objects.iter_mut().zip(&placement) {
                    obj.pe = pe;
                }
            }
            time += stats.summary().max;
            let due = t % o.lb_period == 0 || (o.lb_first > 0 && t == o.lb_first);
            if let Some(s) = s.filter(|_| due && t < iters) {
                let clock = Instant::now();
                let m = s.balance(&stats);
                lb_secs += clock.elapsed().as_secs_f64();
                stats.apply(&m).map_err(|e| format!("{}: {e}", s.name()))?;
                moved += m.len();
                placement = stats.objects.iter().map(|o| o.pe).collect();
            }
        }
        Ok((time, moved, lb_secs))
    };
    let (base, _, _) = run(None)?;
    let mut ideal = 0.0;
    let mut stats = first.clone();
    for t in 1..=iters {
        if (t - 1) % 30 == 0 {
            stats = at(t);
        }
        ideal += stats.summary().avg;
    }
    println!(
        "perfect balance (max = avg every iteration) would take {ideal:.1}: a speedup of {:.4} at most",
        base / ideal
    );
    println!(
        "{:<16} {:>14} {:>14} {:>9} {:>11} {:>10}",
        "strategy", "time_no_lb", "time", "speedup", "migrations", "lb_time_s"
    );
    for s in &list {
        let (time, moved, secs) = run(Some(s.as_ref()))?;
        println!(
            "{:<16} {:>14.1} {:>14.1} {:>9.4} {:>11} {:>10.4}",
            s.name(),
            base,
            time,
            base / time,
            moved,
            secs
        );
    }
    Ok(())
}

fn run(o: &Options) -> Result<(), String> {
    if let Some(iters) = o.stencil_run {
        return stencil_run(o, iters);
    }
    let list = strategies(o)?;
    let t0 = Instant::now();
    let (stats, source): (LbStats, String) = match &o.load {
        Some(path) => (
            load_dump(path).map_err(|e| e.to_string())?,
            format!("dump {path}"),
        ),
        None => {
            let s = &o.synth;
            let dist = Dist::ALL
                .iter()
                .find(|(_, d)| *d == s.dist)
                .map_or("?", |(n, _)| *n);
            (
                s.generate(),
                format!(
                    "synthetic dist={dist} seed={} initial={:?}{}",
                    s.seed,
                    s.initial,
                    if s.dist == Dist::StencilImbalance {
                        format!(" iter={}", s.iter)
                    } else {
                        String::new()
                    }
                ),
            )
        }
    };
    stats.validate()?;
    let prep = t0.elapsed();
    if let Some(path) = &o.dump {
        save_dump(&stats, path).map_err(|e| e.to_string())?;
        println!("wrote {path}");
    }
    let non_mig = stats.objects.iter().filter(|o| !o.migratable).count();
    println!(
        "input: {source}; {} PEs ({} available), {} objects ({} non-migratable); prepared in {:.3} s",
        stats.pes.len(),
        stats.num_available(),
        stats.objects.len(),
        non_mig,
        prep.as_secs_f64()
    );
    println!(
        "{:<16} {:>12} {:>12} {:>10} {:>12} {:>10} {:>10} {:>11} {:>10}",
        "strategy",
        "max_before",
        "avg",
        "max/avg_0",
        "max_after",
        "max/avg",
        "max_0/max",
        "migrations",
        "time_s"
    );
    for s in list {
        let t = Instant::now();
        let migrations = s.balance(&stats);
        let elapsed = t.elapsed().as_secs_f64();
        let (before, after) = stats
            .evaluate(&migrations)
            .map_err(|e| format!("{} produced invalid migrations: {e}", s.name()))?;
        println!(
            "{:<16} {:>12.4} {:>12.4} {:>10.4} {:>12.4} {:>10.4} {:>10.4} {:>11} {:>10.4}",
            s.name(),
            before.max,
            before.avg,
            before.max_over_avg,
            after.max,
            after.max_over_avg,
            if after.max > 0.0 {
                before.max / after.max
            } else {
                1.0
            },
            after.migrations,
            elapsed
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}\nstrategies: {}", STRATEGY_NAMES.join(", "));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("lbsim: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbsim: {e}");
            ExitCode::FAILURE
        }
    }
}
