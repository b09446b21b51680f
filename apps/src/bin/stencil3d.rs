//! stencil3d (the paper's §V.A/B mini-app): a 7-point Jacobi stencil on a 3-D grid decomposed
//! into blocks, one chare per block, exchanging ghost faces with their neighbours every
//! iteration. With `--imbalance` every block waits `t_k × α_i` after its kernel (the paper's
//! synthetic load, by sleeping, so it is real even with more PEs than cores), where `α_i` depends
//! on the *MPI block* `i` the chare belongs to: the grid is first cut into one slab per PE (the
//! MPI decomposition) and each slab into `--blocks-per-pe` chares, as in the paper.
//!
//! Load balancing is Charm++'s AtSync mode: after iteration `--lb-warmup` (once loads are
//! measured) and then every `--lb-period` iterations, every block calls `at_sync` and continues in
//! `resume_from_sync`; the strategy is the runtime's `+balancer` (none: the same barrier, no
//! migration).
//!
//! ```text
//! cargo run --release --bin stencil3d -- +p8 --imbalance +balancer GreedyRefine +LBDebug
//! ```
//!
//! Prints the time per step every `--print-every` iterations, the sum of the final field's values
//! (`field checksum`: the blocks' sums added in index order, so the same figure on any run of the
//! same grid, with or without load balancing; `stencil3d-mpi` in `bench/stencil-mpi` prints it
//! too, for `--blocks-per-pe 1`), the measured max/avg load over the PEs at the end, and as its
//! last line `Total time: <seconds> s`.

use charmrs::prelude::*;
use charmrs::PodVec;
use charmrs_apps::cli::{product, too_large, MAX_POINTS};
use charmrs_apps::stencil::{load_factor, thread_cpu_seconds, Block, FACES};
use std::time::Instant;

/// The run's parameters, as every block gets them.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Config {
    /// Interior points per block edge.
    edge: usize,
    iters: u64,
    imbalance: bool,
    lb_warmup: u64,
    lb_period: u64,
    print_every: u64,
    /// How each PE's slab (MPI block) is cut: chares per slab along x, y, z.
    split: (usize, usize, usize),
    /// One barrier per `print_every` iterations, for the time per step.
    reports: Vec<Future<()>>,
    /// Busy seconds per PE, summed over blocks.
    done: Future<Vec<f64>>,
    /// Each block's sum of its final values, in index order (summed in that order by the main
    /// task: the same figure on every run, whatever the PE count or where the blocks went).
    checksum: Future<Vec<f64>>,
}

impl Config {
    fn balances_after(&self, iter: u64) -> bool {
        iter < self.iters
            && ((self.lb_warmup > 0 && iter == self.lb_warmup)
                || (self.lb_period > 0 && iter.is_multiple_of(self.lb_period)))
    }
}

/// One block of the grid.
#[derive(Serialize, Deserialize)]
struct Chunk {
    cfg: Config,
    pos: (usize, usize, usize),
    dims: (usize, usize, usize),
    block: Block,
    /// Iterations completed.
    iter: u64,
    /// Ghost faces received for the next two iterations (by parity), not applied yet.
    ghosts: [Vec<Option<PodVec<f64>>>; 2],
    /// Waiting for `resume_from_sync`.
    in_sync: bool,
    /// Seconds spent computing (kernel + synthetic load), by the PE it was spent on.
    busy_by_pe: Vec<f64>,
}

#[chare(migratable)]
impl Chunk {
    fn new(ctx: &Ctx<Self>, cfg: Config, dims: (usize, usize, usize)) -> Self {
        let pos: (usize, usize, usize) = ctx.index();
        let block = Block::initial(cfg.edge, pos);
        Chunk {
            cfg,
            pos,
            dims,
            block,
            iter: 0,
            ghosts: [vec![None; FACES], vec![None; FACES]],
            in_sync: false,
            busy_by_pe: vec![0.0; ctx.num_pes()],
        }
    }

    /// The neighbour across `face`, if any (the grid is not periodic).
    fn neighbour(&self, face: usize) -> Option<(usize, usize, usize)> {
        let (mut p, d) = (
            [self.pos.0, self.pos.1, self.pos.2],
            [self.dims.0, self.dims.1, self.dims.2],
        );
        let axis = face / 2;
        if face.is_multiple_of(2) {
            p[axis] = p[axis].checked_sub(1)?;
        } else {
            p[axis] += 1;
            if p[axis] >= d[axis] {
                return None;
            }
        }
        Some((p[0], p[1], p[2]))
    }

    fn expected(&self) -> usize {
        (0..FACES).filter(|&f| self.neighbour(f).is_some()).count()
    }

    /// Sends this block's faces for the next iteration to its neighbours.
    fn send_ghosts(&self, ctx: &Ctx<Self>) {
        let array = ctx.this_array::<(usize, usize, usize)>();
        for face in 0..FACES {
            if let Some(nb) = self.neighbour(face) {
                // My +x face is the neighbour's -x ghost, and so on.
                // Older iterations first: a lagging block catches up before others run ahead.
                array
                    .at(nb)
                    .with_priority(self.iter.min(i32::MAX as u64) as i32)
                    .ghost(
                        self.iter,
                        (face ^ 1) as u8,
                        PodVec::from(self.block.face(face)),
                    );
            }
        }
    }

    /// The MPI block (PE slab) this chare belongs to, which sets its load factor.
    fn mpi_block(&self) -> usize {
        self.pos.0 / self.cfg.split.0
    }

    /// Runs every iteration whose ghosts are all here.
    fn advance(&mut self, ctx: &Ctx<Self>) {
        let expected = self.expected();
        while !self.in_sync && self.iter < self.cfg.iters {
            let slot = (self.iter % 2) as usize;
            if self.ghosts[slot].iter().filter(|g| g.is_some()).count() < expected {
                return;
            }
            for face in 0..FACES {
                if let Some(values) = self.ghosts[slot][face].take() {
                    self.block.set_ghost(face, &values);
                }
            }
            let start = Instant::now();
            let cpu = thread_cpu_seconds();
            self.block.kernel();
            if self.cfg.imbalance {
                let t_k = thread_cpu_seconds() - cpu;
                let alpha = load_factor(self.mpi_block(), ctx.num_pes(), self.iter + 1);
                std::thread::sleep(std::time::Duration::from_secs_f64(t_k * alpha));
            }
            self.busy_by_pe[ctx.my_pe()] += start.elapsed().as_secs_f64();
            self.iter += 1;
            if self.iter.is_multiple_of(self.cfg.print_every) {
                let k = (self.iter / self.cfg.print_every - 1) as usize;
                if let Some(&f) = self.cfg.reports.get(k) {
                    ctx.barrier(f);
                }
            }
            if self.iter == self.cfg.iters {
                ctx.contribute(self.busy_by_pe.clone(), Reducer::Sum, self.cfg.done);
                ctx.gather(self.block.interior_sum(), self.cfg.checksum);
                return;
            }
            if self.cfg.balances_after(self.iter) {
                self.in_sync = true;
                ctx.at_sync(ctx.this_proxy().resume_from_sync_callback());
                return;
            }
            self.send_ghosts(ctx);
        }
    }

    /// Starts the iterations.
    #[entry]
    fn start(&mut self, ctx: &Ctx<Self>) {
        self.send_ghosts(ctx);
        self.advance(ctx);
    }

    /// A neighbour's face for iteration `iter` (at most one iteration ahead of this block); a
    /// `PodVec` crosses processes without copies.
    #[entry]
    fn ghost(&mut self, ctx: &Ctx<Self>, iter: u64, face: u8, values: PodVec<f64>) {
        assert!(
            iter == self.iter || iter == self.iter + 1,
            "ghost for iteration {iter} at iteration {}",
            self.iter
        );
        self.ghosts[(iter % 2) as usize][face as usize] = Some(values);
        self.advance(ctx);
    }

    /// Load balancing is over: go on.
    #[entry]
    fn resume_from_sync(&mut self, ctx: &Ctx<Self>) {
        self.in_sync = false;
        self.send_ghosts(ctx);
        self.advance(ctx);
    }
}

/// One per PE: reports how long its PE was idle.
struct Probe;

#[chare]
impl Probe {
    fn new() -> Self {
        Probe
    }

    #[entry]
    fn idle(&mut self) -> f64 {
        charmrs::pe_times().idle
    }
}

fn usage() -> ! {
    charmrs_apps::cli::usage_exit(
        "stencil3d [+pN] [+balancer NAME] [+LBDebug] [--imbalance] [--iters N (100)] \
         [--edge N (32)] [--blocks-per-pe 1|2|4|8 (4)] [--lb-warmup N (2)] [--lb-period N (30)] \
         [--print-every N (10)]",
    )
}

fn main() {
    charmrs::start(|args| async move {
        let mut edge = 32u64;
        let mut iters = 100u64;
        let mut imbalance = false;
        let mut per_pe = 4usize;
        let mut lb_warmup = 2u64;
        let mut lb_period = 30u64;
        let mut print_every = 10u64;
        let mut it = args.into_iter().skip(1);
        while let Some(a) = it.next() {
            let mut num = |name: &str| -> u64 {
                match it.next().map(|v| v.parse::<u64>()) {
                    Some(Ok(v)) => v,
                    _ => {
                        eprintln!("stencil3d: {name} needs a number");
                        usage()
                    }
                }
            };
            let positive = |name: &str, v: u64| -> u64 {
                if v == 0 {
                    eprintln!("stencil3d: {name} must be at least 1");
                    usage()
                }
                v
            };
            match a.as_str() {
                "--imbalance" => imbalance = true,
                "--iters" => iters = positive("--iters", num("--iters")),
                "--edge" => edge = positive("--edge", num("--edge")),
                "--blocks-per-pe" => per_pe = num("--blocks-per-pe") as usize,
                "--lb-warmup" => lb_warmup = num("--lb-warmup"),
                "--lb-period" => lb_period = num("--lb-period"),
                "--print-every" => print_every = positive("--print-every", num("--print-every")),
                other => {
                    eprintln!("stencil3d: unknown argument `{other}`");
                    usage()
                }
            }
        }
        let split = match per_pe {
            1 => (1, 1, 1),
            2 => (1, 1, 2),
            4 => (1, 2, 2),
            8 => (2, 2, 2),
            _ => {
                eprintln!("stencil3d: --blocks-per-pe must be 1, 2, 4 or 8");
                usage()
            }
        };
        let pes = charmrs::num_pes();
        // Bounded before anything is allocated: (edge + 2)^3 values a block, twice.
        let points = product(&[pes as u64, per_pe as u64, edge, edge, edge]);
        let processes = charmrs::num_nodes();
        if too_large(points, MAX_POINTS, processes) {
            eprintln!(
                "stencil3d: --edge {edge} is too large for {pes} PEs of {per_pe} blocks: \
                 {pes} × {per_pe} × {edge}^3 grid points, at most 2^34 ({MAX_POINTS}, 128 GiB \
                 per copy of the field) per process ({processes} here) are allowed"
            );
            usage()
        }
        let edge = edge as usize;
        let dims = (pes * split.0, split.1, split.2);
        let reports: Vec<Future<()>> = (0..iters / print_every).map(|_| Future::new()).collect();
        let done = Future::new();
        let checksum = Future::new();
        let cfg = Config {
            edge,
            iters,
            imbalance,
            lb_warmup,
            lb_period,
            print_every,
            split,
            reports: reports.clone(),
            done,
            checksum,
        };
        println!(
            "stencil3d: {pes} PEs, {} x {} x {} blocks of {edge}^3 points ({per_pe} per PE), {iters} \
             iterations, imbalance {}, load balancing after iteration {lb_warmup} and every {lb_period}",
            dims.0,
            dims.1,
            dims.2,
            if imbalance { "on" } else { "off" }
        );
        let start = Instant::now();
        let blocks = Array::<Chunk, (usize, usize, usize)>::new(dims, (cfg, dims));
        blocks.start();
        let mut last = start;
        for (k, r) in reports.into_iter().enumerate() {
            r.await;
            let now = Instant::now();
            println!(
                "iterations {:>4}..{:<4} {:9.4} ms/step",
                k as u64 * print_every + 1,
                (k as u64 + 1) * print_every,
                (now - last).as_secs_f64() * 1e3 / print_every as f64
            );
            last = now;
        }
        let busy = done.await;
        let total = start.elapsed();
        // Added in block index order (x slowest): a floating-point sum in arrival order could
        // change its last digits from run to run. With one block per PE this is rank order, as in
        // stencil3d-mpi, which prints the same figure.
        let checksum: f64 = checksum.await.iter().sum();
        println!("field checksum: {checksum:.12e}");
        let max = busy.iter().cloned().fold(0.0, f64::max);
        let avg = busy.iter().sum::<f64>() / busy.len() as f64;
        println!(
            "measured load per PE: max {max:.3} s, avg {avg:.3} s, max/avg {:.3}",
            if avg > 0.0 { max / avg } else { 1.0 }
        );
        let idle = Group::<Probe>::new(()).gather().idle().await;
        println!(
            "idle per PE (s): {}",
            idle.iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("Total time: {:.3} s", total.as_secs_f64());
        charmrs::exit(0);
    })
}
