//! heat2d: heat diffusion on a square plate (Jacobi relaxation, 5-point stencil), one chare per
//! block of the plate, checkpointed to disk and restartable on another number of PEs or
//! processes — a job that runs into its time limit goes on in the next one.
//!
//! The plate's top edge is held at 1.0, its other edges at 0.0. The entry point drives the
//! steps: each step every block sends its edges to its neighbours, relaxes once they have
//! arrived, and contributes its largest change; the entry point waits for that residual. With
//! `--checkpoint DIR` it writes a checkpoint every `--every` steps (`charmrs::checkpoint`); with
//! `--stop-after N` the job ends after step `N` as if its time were up (it needs a checkpoint
//! directory, and warns when steps after the last checkpoint will be lost); `--restart DIR` goes
//! on from the checkpoint in `DIR` (`charmrs::restore`), under any PE count, to the `--steps`
//! and with the `--every` of the run that wrote it unless given again (`--blocks` and `--edge`
//! are the checkpoint's: others are refused). Every figure it prints is independent of the PE
//! count, so a restarted job prints what an uninterrupted one does.
//!
//! ```text
//! cargo run --release -p charmrs-apps --bin heat2d -- +p4 --steps 300 --checkpoint /tmp/heat --stop-after 120
//! cargo run --release -p charmrs-apps --bin heat2d -- +p2 --restart /tmp/heat
//! ```
//!
//! Prints the residual every `--every` steps, a line per checkpoint written, the sum of the final
//! field (`field checksum`) and, last, `Total time: <seconds> s`.

use charmrs::prelude::*;
use charmrs_apps::cli::{product, too_large, MAX_POINTS};
use std::path::PathBuf;
use std::time::Instant;

/// Sides of a block, as indices into its ghost slots.
const UP: usize = 0;
const DOWN: usize = 1;
const LEFT: usize = 2;
const RIGHT: usize = 3;

/// The side of the neighbour that faces `side`.
fn facing(side: usize) -> usize {
    [DOWN, UP, RIGHT, LEFT][side]
}

/// One block of the plate: `edge × edge` points inside a frame of ghost points.
#[derive(Serialize, Deserialize)]
struct Plate {
    edge: usize,
    /// Temperatures, row-major, `(edge + 2)²` with the frame.
    t: Vec<f64>,
    /// Scratch for the relaxed field being built (same layout): not part of the state (a
    /// checkpoint or a migration does not carry it), rebuilt on the first step after either.
    #[serde(skip)]
    next: Vec<f64>,
    /// The neighbour on each side, if any (proxies kept in the state: a restart re-homes them).
    neighbours: [Option<ElementProxy<Plate>>; 4],
    /// Edges received for the coming step, by side.
    ghosts: [Option<Vec<f64>>; 4],
    /// The step asked for, with where its residual goes, until the ghosts are in.
    pending: Option<(u32, Future<f64>)>,
}

#[chare(migratable)]
impl Plate {
    fn new(ctx: &Ctx<Self>, blocks: usize, edge: usize) -> Self {
        let (bx, by): (usize, usize) = ctx.index();
        let plates = ctx.this_array::<(usize, usize)>();
        let at = |x: Option<usize>, y: Option<usize>| match (x, y) {
            (Some(x), Some(y)) if x < blocks && y < blocks => Some(plates.at((x, y))),
            _ => None,
        };
        let neighbours = [
            at(Some(bx), by.checked_sub(1)),
            at(Some(bx), Some(by + 1)),
            at(bx.checked_sub(1), Some(by)),
            at(Some(bx + 1), Some(by)),
        ];
        let w = edge + 2;
        let mut t = vec![0.0; w * w];
        if by == 0 {
            // The plate's top edge, held hot.
            t[..w].fill(1.0);
        }
        Plate {
            edge,
            next: Vec::new(),
            t,
            neighbours,
            ghosts: Default::default(),
            pending: None,
        }
    }

    /// Step `k`: send the edges, relax once the neighbours' have arrived, contribute the largest
    /// change to `residual`.
    #[entry]
    fn step(&mut self, ctx: &Ctx<Self>, k: u32, residual: Future<f64>) {
        let (w, e) = (self.edge + 2, self.edge);
        for (side, n) in self.neighbours.iter().enumerate() {
            let Some(n) = n else { continue };
            let edge: Vec<f64> = match side {
                UP => self.t[w + 1..w + 1 + e].to_vec(),
                DOWN => self.t[e * w + 1..e * w + 1 + e].to_vec(),
                LEFT => (1..=e).map(|i| self.t[i * w + 1]).collect(),
                _ => (1..=e).map(|i| self.t[i * w + e]).collect(),
            };
            n.ghost(k, facing(side), edge);
        }
        self.pending = Some((k, residual));
        self.relax_if_ready(ctx);
    }

    /// A neighbour's edge for step `k`, for the ghost points on `side`.
    #[entry]
    fn ghost(&mut self, ctx: &Ctx<Self>, k: u32, side: usize, values: Vec<f64>) {
        let _ = k;
        self.ghosts[side] = Some(values);
        self.relax_if_ready(ctx);
    }

    /// Contributes the block's sum to the field checksum (gathered in index order).
    #[entry]
    fn report(&mut self, ctx: &Ctx<Self>, sums: Future<Vec<f64>>) {
        let (w, e) = (self.edge + 2, self.edge);
        let sum: f64 = (1..=e)
            .flat_map(|i| self.t[i * w + 1..i * w + 1 + e].iter())
            .sum();
        ctx.gather(sum, sums);
    }
}

impl Plate {
    fn relax_if_ready(&mut self, ctx: &Ctx<Self>) {
        let expected = self.neighbours.iter().filter(|n| n.is_some()).count();
        let arrived = self.ghosts.iter().filter(|g| g.is_some()).count();
        if self.pending.is_none() || arrived < expected {
            return;
        }
        let (_, residual) = self.pending.take().expect("checked");
        let (w, e) = (self.edge + 2, self.edge);
        for (side, ghost) in self.ghosts.iter_mut().enumerate() {
            let Some(g) = ghost.take() else { continue };
            for (i, v) in g.into_iter().enumerate() {
                let at = match side {
                    UP => i + 1,
                    DOWN => (e + 1) * w + i + 1,
                    LEFT => (i + 1) * w,
                    _ => (i + 1) * w + e + 1,
                };
                self.t[at] = v;
            }
        }
        if self.next.len() != self.t.len() {
            self.next = self.t.clone();
        }
        let mut change = 0.0f64;
        for i in 1..=e {
            for j in 1..=e {
                let c = i * w + j;
                let v = 0.25 * (self.t[c - w] + self.t[c + w] + self.t[c - 1] + self.t[c + 1]);
                change = change.max((v - self.t[c]).abs());
                self.next[c] = v;
            }
        }
        for i in 1..=e {
            let row = i * w + 1..i * w + 1 + e;
            self.t[row.clone()].copy_from_slice(&self.next[row]);
        }
        ctx.contribute(change, Reducer::Max, residual);
    }
}

/// What the entry point carries over a restart: the state of the run and its parameters (a
/// restart goes on to the same `steps`, unless told otherwise).
#[derive(Serialize, Deserialize)]
struct Run {
    /// Steps done.
    step: u32,
    /// Steps the run is to do in all.
    steps: u32,
    /// Steps between residual lines (and checkpoints).
    every: u32,
    plates: Array<Plate, (usize, usize)>,
    blocks: usize,
    edge: usize,
    /// PEs of the job that wrote the checkpoint.
    pes: usize,
}

const USAGE: &str = "heat2d [+pN] [--blocks N (4)] [--edge N (32)] [--steps N (200)] \
                     [--every N (20)] [--checkpoint DIR] [--stop-after N] [--restart DIR] \
                     (a restart keeps the checkpoint's --blocks, --edge, --steps and --every \
                     unless --steps or --every is given)";

fn usage() -> ! {
    charmrs_apps::cli::usage_exit(USAGE)
}

fn main() {
    charmrs::start(|args| async move {
        let (mut blocks, mut edge, mut steps, mut every) = (None, None, None, None);
        let (mut checkpoint, mut restart, mut stop_after) = (None, None, None::<u32>);
        let mut it = args.into_iter().skip(1);
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> String {
                it.next().unwrap_or_else(|| {
                    eprintln!("heat2d: {name} needs a value");
                    usage()
                })
            };
            let mut num = |name: &str| -> u32 {
                value(name).parse().unwrap_or_else(|_| {
                    eprintln!("heat2d: {name} needs a number");
                    usage()
                })
            };
            let positive = |name: &str, v: u32| -> u32 {
                if v == 0 {
                    eprintln!("heat2d: {name} must be at least 1");
                    usage()
                }
                v
            };
            match a.as_str() {
                "--blocks" => blocks = Some(positive("--blocks", num("--blocks")) as usize),
                "--edge" => edge = Some(positive("--edge", num("--edge")) as usize),
                "--steps" => steps = Some(num("--steps")),
                "--every" => every = Some(positive("--every", num("--every"))),
                "--stop-after" => stop_after = Some(positive("--stop-after", num("--stop-after"))),
                "--checkpoint" => checkpoint = Some(PathBuf::from(value("--checkpoint"))),
                "--restart" => restart = Some(PathBuf::from(value("--restart"))),
                other => {
                    eprintln!("heat2d: unknown argument `{other}`");
                    usage()
                }
            }
        }
        if stop_after.is_some() && checkpoint.is_none() && restart.is_none() {
            eprintln!(
                "heat2d: --stop-after needs --checkpoint DIR (or --restart DIR): without a \
                 checkpoint the steps done would be lost"
            );
            usage()
        }
        if restart.is_none() {
            let (b, e) = (blocks.unwrap_or(4) as u64, edge.unwrap_or(32) as u64);
            let processes = charmrs::num_nodes();
            if too_large(product(&[b, b, e, e]), MAX_POINTS, processes) {
                eprintln!(
                    "heat2d: --blocks {b} and --edge {e} make {b}^2 blocks of {e}^2 points: at \
                     most 2^34 ({MAX_POINTS}, 128 GiB per copy of the field) per process \
                     ({processes} here) are allowed"
                );
                usage()
            }
        }
        let pes = charmrs::num_pes();
        let start = Instant::now();
        let mut run = match &restart {
            Some(dir) => match charmrs::restore::<Run>(dir).await {
                Ok(Some(run)) => {
                    println!(
                        "heat2d: restarted from {} at step {} (written by a job of {} PEs), now \
                         {pes} PEs, in {:.1} ms",
                        dir.display(),
                        run.step,
                        run.pes,
                        start.elapsed().as_secs_f64() * 1e3
                    );
                    run
                }
                Ok(None) => {
                    eprintln!("heat2d: no checkpoint in {}", dir.display());
                    charmrs::exit(1);
                    return;
                }
                Err(e) => {
                    eprintln!("heat2d: {e}");
                    charmrs::exit(1);
                    return;
                }
            },
            None => {
                let (blocks, edge) = (blocks.unwrap_or(4), edge.unwrap_or(32));
                Run {
                    step: 0,
                    steps: 200,
                    every: 20,
                    plates: Array::new((blocks, blocks), (blocks, edge)),
                    blocks,
                    edge,
                    pes,
                }
            }
        };
        // What the command line says against what the checkpoint holds (a fresh run holds the
        // defaults): the plate cannot change over a restart, the steps can. The job is running
        // (and on a restart holds the restored blocks) so it ends by `charmrs::exit`.
        let refused = |what: String| {
            eprintln!("heat2d: {what}");
            eprintln!("usage: {USAGE}");
            charmrs::exit(2);
        };
        for (name, given, saved) in [("--blocks", blocks, run.blocks), ("--edge", edge, run.edge)] {
            if let Some(given) = given.filter(|g| *g != saved) {
                return refused(format!(
                    "{name} {given} differs from the checkpoint's {saved}: a restart goes on \
                     with the plate it saved (leave {name} out)"
                ));
            }
        }
        if let Some(steps) = steps {
            if steps < run.step {
                return refused(format!(
                    "--steps {steps} is before the checkpoint's step {}",
                    run.step
                ));
            }
            run.steps = steps;
        }
        if let Some(every) = every {
            run.every = every;
        }
        if let Some(stop) = stop_after {
            if stop <= run.step {
                return refused(format!(
                    "--stop-after {stop} is not after the checkpoint's step {}",
                    run.step
                ));
            }
            if stop < run.steps && stop % run.every != 0 {
                let last = stop - stop % run.every;
                if last > run.step {
                    eprintln!(
                        "heat2d: warning: --stop-after {stop} is not a multiple of --every {}: \
                         the last checkpoint will be of step {last}, steps {}..{stop} will be \
                         lost",
                        run.every,
                        last + 1
                    );
                } else {
                    eprintln!(
                        "heat2d: warning: --stop-after {stop} comes before the next checkpoint \
                         (every {} steps): no checkpoint will be written, steps {}..{stop} will \
                         be lost",
                        run.every,
                        run.step + 1
                    );
                }
            }
        }
        // A restart writes its checkpoints where it read one, unless told otherwise.
        let checkpoint = checkpoint.or(restart);
        println!(
            "heat2d: {pes} PEs, {b} x {b} blocks of {e}^2 points, steps {}..{}",
            run.step + 1,
            run.steps,
            b = run.blocks,
            e = run.edge
        );
        while run.step < run.steps {
            let residual = Future::new();
            run.plates.step(run.step, residual);
            let r = residual.await;
            run.step += 1;
            if run.step % run.every == 0 {
                println!("step {:>5}: residual {r:.9e}", run.step);
                if let Some(dir) = &checkpoint {
                    let began = Instant::now();
                    run.pes = pes;
                    match charmrs::checkpoint(dir, &run).await {
                        Ok(saved) => println!(
                            "checkpoint at step {}: {} elements, {} bytes, {:.1} ms",
                            run.step,
                            saved.elements,
                            saved.bytes,
                            began.elapsed().as_secs_f64() * 1e3
                        ),
                        Err(e) => {
                            eprintln!("heat2d: {e}");
                            charmrs::exit(1);
                            return;
                        }
                    }
                }
            }
            if stop_after == Some(run.step) {
                println!(
                    "heat2d: stopping after step {} (as if out of time)",
                    run.step
                );
                charmrs::exit(0);
                return;
            }
        }
        let sums = Future::new();
        run.plates.report(sums);
        let checksum: f64 = sums.await.iter().sum();
        println!("field checksum: {checksum:.12e}");
        println!("Total time: {:.3} s", start.elapsed().as_secs_f64());
        charmrs::exit(0);
    })
}
