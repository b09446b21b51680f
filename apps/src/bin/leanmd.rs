//! leanmd (the paper's §V.C mini-app, after Charm++'s LeanMD): Lennard-Jones molecular dynamics
//! in a periodic box. The box is cut into cells (a 3-D array of chares holding the atoms) and
//! every pair of neighbouring cells gets a compute (a 4-D array of chares: the cell and which of
//! its 14 "upper" neighbours, itself included). Every step each cell sends its positions to its
//! 27 computes through a section (one multicast), each compute sends the forces back to its two
//! cells, and a cell that has all 27 integrates; every `--migrate-every` steps cells hand the
//! atoms that left them to their neighbours. Messages for a later phase wait with `when`.
//!
//! ```text
//! cargo run --release --bin leanmd -- +p4 --cells 4 --per-edge 3 --steps 100
//! cargo run --release --bin leanmd -- +p2 --steps 10 --verify     # against the serial reference
//! ```
//!
//! Cells have edge `3 × --cell-scale` (σ = 1, cutoff 2.5) and start with `--per-edge`³ atoms on
//! a jittered lattice, moving at up to `--speed` tenths of σ per unit time along each axis (a
//! decimal, 0 for atoms at rest; a hotter start makes atoms change cells sooner): scale 1 and 3 per edge (27 atoms a cell) is LeanMD's fine grain, scale 2
//! and 6 per edge (216 atoms) coarser chares with 64× the work per compute.
//!
//! Prints the time per step, the energies at the end and, with `--verify`, the largest
//! deviation of any atom from the serial all-pairs reference (the job fails above 1e-9).

use charmrs::prelude::*;
use charmrs::PodVec;
use charmrs_apps::cli::{product, too_large, MAX_ATOMS};
use charmrs_apps::leanmd::{
    drifted, initial_atoms, integrate, max_deviation, pair_forces, serial_reference,
    sorted_wrapped, Atoms, CellIndex, Grid, MIN_CELL, OFFSETS,
};
use std::time::Instant;

/// A compute's index: its cell and which of [`OFFSETS`].
type ComputeIndex = (usize, usize, usize, usize);

/// Computes that send forces to each cell every step: its own 14 and 13 of its neighbours'.
const COMPUTES_PER_CELL: u32 = 27;
/// Neighbours a cell hands atoms to (and hears from) at each re-assignment.
const NEIGHBOURS: u32 = 26;

/// Closest start of two atoms (the lattice spacing `cell edge / per_edge`), in σ.
const MIN_SPACING: f64 = 1.0;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Config {
    grid: Grid,
    per_edge: usize,
    /// Initial speed along each axis, at most.
    speed: f64,
    steps: u64,
    migrate_every: u64,
    /// Sum over the cells of (kinetic energy, potential energy, atoms, atoms handed to another
    /// cell over the run) at the end.
    done: Future<Vec<f64>>,
    /// Every cell's atoms at the end (`--verify`).
    finals: Option<Future<Vec<Atoms>>>,
}

/// One cell of the box and its atoms.
#[derive(Serialize, Deserialize)]
struct Cell {
    cfg: Config,
    me: CellIndex,
    atoms: Atoms,
    /// Steps completed.
    step: u64,
    forces: Vec<[f64; 3]>,
    potential: f64,
    /// Force messages received this step.
    received: u32,
    /// Handing atoms to the neighbours (until all 26 have handed theirs).
    migrating: bool,
    arrived: u32,
    computes: Option<Section<Compute>>,
    neighbours: Vec<CellIndex>,
    /// Atoms this cell handed to a neighbour so far.
    handed: u64,
}

#[chare(migratable)]
impl Cell {
    fn new(ctx: &Ctx<Self>, cfg: Config) -> Self {
        let me: CellIndex = ctx.index();
        let atoms = initial_atoms(&cfg.grid, me, cfg.per_edge, cfg.speed);
        let mut neighbours: Vec<CellIndex> = Vec::new();
        for o in OFFSETS.iter().skip(1) {
            neighbours.push(cfg.grid.neighbour(me, *o).0);
            neighbours.push(cfg.grid.neighbour(me, o.map(|x| -x)).0);
        }
        Cell {
            cfg,
            me,
            atoms,
            step: 0,
            forces: Vec::new(),
            potential: 0.0,
            received: 0,
            migrating: false,
            arrived: 0,
            computes: None,
            neighbours,
            handed: 0,
        }
    }

    /// Makes the section of this cell's 27 computes and starts the first step.
    #[entry]
    fn start(&mut self, computes: Array<Compute, ComputeIndex>) {
        let (x, y, z) = self.me;
        let mut members: Vec<ComputeIndex> = (0..OFFSETS.len()).map(|k| (x, y, z, k)).collect();
        for (k, o) in OFFSETS.iter().enumerate().skip(1) {
            let (owner, _) = self.cfg.grid.neighbour(self.me, o.map(|v| -v));
            members.push((owner.0, owner.1, owner.2, k));
        }
        self.computes = Some(computes.section(members));
        self.send_positions();
    }

    fn send_positions(&mut self) {
        self.forces = vec![[0.0; 3]; self.atoms.len()];
        self.received = 0;
        self.potential = 0.0;
        let section = self.computes.as_ref().expect("started");
        section.positions(
            self.step,
            self.me,
            PodVec::from(self.atoms.flat_positions()),
        );
    }

    /// One compute's forces on this cell's atoms for step `step` (and its pairs' energy, if
    /// this cell owns it).
    #[entry(when = "!self.migrating && self.step == step")]
    fn forces(&mut self, ctx: &Ctx<Self>, step: u64, force: PodVec<f64>, energy: f64) {
        assert_eq!(
            force.len(),
            3 * self.atoms.len(),
            "cell {:?}, step {step}: forces for another set of atoms",
            self.me
        );
        for (f, add) in self.forces.iter_mut().zip(force.chunks_exact(3)) {
            for axis in 0..3 {
                f[axis] += add[axis];
            }
        }
        self.potential += energy;
        self.received += 1;
        if self.received < COMPUTES_PER_CELL {
            return;
        }
        // The energies of the positions the forces were computed at.
        let kinetic = self.atoms.kinetic();
        integrate(&mut self.atoms, &self.forces);
        if let Some((id, out)) = drifted(&self.cfg.grid, self.me, &self.atoms) {
            panic!(
                "atom {id} is {out:.3} out of cell {:?} at step {}, beyond the drift margin: \
                 lower --migrate-every or --speed",
                self.me,
                self.step + 1
            );
        }
        self.step += 1;
        if self.step == self.cfg.steps {
            let totals = vec![
                kinetic,
                self.potential,
                self.atoms.len() as f64,
                self.handed as f64,
            ];
            ctx.contribute(totals, Reducer::Sum, self.cfg.done);
            if let Some(finals) = self.cfg.finals {
                ctx.gather(self.atoms.clone(), finals);
            }
        } else if self.step.is_multiple_of(self.cfg.migrate_every) {
            self.hand_over(ctx);
        } else {
            self.send_positions();
        }
    }

    /// Hands the atoms that left this cell to the neighbours they are in now (an empty set to
    /// the others: each neighbour waits for all 26).
    fn hand_over(&mut self, ctx: &Ctx<Self>) {
        let mut out: Vec<Atoms> = vec![Atoms::default(); self.neighbours.len()];
        for (cell, id, pos, vel) in self.atoms.leaving(&self.cfg.grid, self.me) {
            let Some(k) = self.neighbours.iter().position(|n| *n == cell) else {
                panic!(
                    "atom {id} moved from cell {:?} to {cell:?}, beyond its neighbours, in {} \
                     steps: lower --migrate-every",
                    self.me, self.cfg.migrate_every
                );
            };
            out[k].push(id, pos, vel);
            self.handed += 1;
        }
        self.migrating = true;
        self.arrived = 0;
        let cells = ctx.this_array::<CellIndex>();
        for (n, atoms) in self.neighbours.iter().zip(out) {
            cells.at(*n).atoms_in(self.step, atoms);
        }
    }

    /// A neighbour's atoms that moved into this cell before step `step`.
    #[entry(when = "self.migrating && self.step == step")]
    fn atoms_in(&mut self, step: u64, incoming: Atoms) {
        debug_assert_eq!(step, self.step, "the when condition holds");
        self.atoms.extend(incoming);
        self.arrived += 1;
        if self.arrived == NEIGHBOURS {
            self.migrating = false;
            self.send_positions();
        }
    }
}

/// The forces between the atoms of cell `a` and those of its neighbour `b` (or within `a`).
#[derive(Serialize, Deserialize)]
struct Compute {
    a: CellIndex,
    b: CellIndex,
    /// Brings `b`'s positions next to `a` across the periodic boundary.
    shift: [f64; 3],
    cells: Array<Cell, CellIndex>,
    from_a: Option<(u64, PodVec<f64>)>,
    from_b: Option<(u64, PodVec<f64>)>,
}

fn points(flat: &[f64]) -> Vec<[f64; 3]> {
    flat.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect()
}

#[chare(migratable)]
impl Compute {
    fn new(ctx: &Ctx<Self>, grid: Grid, cells: Array<Cell, CellIndex>) -> Self {
        let (x, y, z, k): ComputeIndex = ctx.index();
        let a = (x, y, z);
        let (b, shift) = grid.neighbour(a, OFFSETS[k]);
        Compute {
            a,
            b,
            shift,
            cells,
            from_a: None,
            from_b: None,
        }
    }

    /// Cell `from`'s positions for step `step`.
    #[entry]
    fn positions(&mut self, step: u64, from: CellIndex, pos: PodVec<f64>) {
        if self.a == self.b {
            let p = points(&pos);
            let (f, _, energy) = pair_forces(&p, &p, [0.0; 3], true);
            let flat: Vec<f64> = f.iter().flatten().copied().collect();
            self.cells
                .at(self.a)
                .forces(step, PodVec::from(flat), energy);
            return;
        }
        if from == self.a {
            self.from_a = Some((step, pos));
        } else {
            self.from_b = Some((step, pos));
        }
        let (Some((sa, _)), Some((sb, _))) = (&self.from_a, &self.from_b) else {
            return;
        };
        assert_eq!(
            sa, sb,
            "compute {:?}-{:?}: positions of two steps",
            self.a, self.b
        );
        let (Some((_, pa)), Some((_, pb))) = (self.from_a.take(), self.from_b.take()) else {
            unreachable!("both checked above");
        };
        let (fa, fb, energy) = pair_forces(&points(&pa), &points(&pb), self.shift, false);
        let flat = |f: Vec<[f64; 3]>| PodVec::from(f.iter().flatten().copied().collect::<Vec<_>>());
        self.cells.at(self.a).forces(step, flat(fa), energy);
        self.cells.at(self.b).forces(step, flat(fb), 0.0);
    }
}

fn usage() -> ! {
    charmrs_apps::cli::usage_exit(
        "leanmd [+pN] [--cells N (3)] [--cell-scale S (1)] [--per-edge N (3)] \
         [--speed TENTHS_OF_SIGMA (1)] [--steps N (100)] [--migrate-every N (10)] [--verify]",
    )
}

fn main() {
    charmrs::start(|args| async move {
        let (mut cells_per_axis, mut per_edge, mut steps, mut migrate_every) = (3, 3, 100, 10);
        let mut cell_scale = 1;
        let mut speed = 0.1;
        let mut verify = false;
        let mut it = args.into_iter().skip(1);
        while let Some(a) = it.next() {
            let mut num = |name: &str| -> u64 {
                match it.next().map(|v| v.parse::<u64>()) {
                    Some(Ok(v)) if v > 0 => v,
                    _ => {
                        eprintln!("leanmd: {name} needs a positive number");
                        usage()
                    }
                }
            };
            match a.as_str() {
                "--cells" => cells_per_axis = num("--cells") as usize,
                "--per-edge" => per_edge = num("--per-edge") as usize,
                "--cell-scale" => cell_scale = num("--cell-scale"),
                "--speed" => {
                    let v = it.next();
                    speed = match v.as_deref().map(str::parse::<f64>) {
                        Some(Ok(tenths)) if tenths.is_finite() && tenths >= 0.0 => tenths / 10.0,
                        _ => {
                            eprintln!(
                                "leanmd: --speed needs a speed in tenths of σ per unit time, a \
                                 number >= 0 such as 1, 0.5 or 0{}",
                                v.map(|v| format!(" (not `{v}`)")).unwrap_or_default()
                            );
                            usage()
                        }
                    }
                }
                "--steps" => steps = num("--steps"),
                "--migrate-every" => migrate_every = num("--migrate-every"),
                "--verify" => verify = true,
                other => {
                    eprintln!("leanmd: unknown argument `{other}`");
                    usage()
                }
            }
        }
        if cells_per_axis < 3 {
            eprintln!("leanmd: --cells must be at least 3 (a cell's 26 neighbours are distinct)");
            usage()
        }
        let cell = MIN_CELL * cell_scale as f64;
        if cell / (per_edge as f64) < MIN_SPACING {
            eprintln!(
                "leanmd: --per-edge must be at most {} for cells of edge {cell}: atoms closer \
                 than σ start with forces that blow them out of their cells",
                (cell / MIN_SPACING) as usize
            );
            usage()
        }
        // Bounded before anything is allocated (the product could wrap around).
        let (cells_u, per_edge_u) = (cells_per_axis as u64, per_edge as u64);
        let total = product(&[
            cells_u, cells_u, cells_u, per_edge_u, per_edge_u, per_edge_u,
        ]);
        let processes = charmrs::num_nodes();
        if too_large(total, MAX_ATOMS, processes) {
            eprintln!(
                "leanmd: --cells {cells_per_axis} and --per-edge {per_edge} make too many atoms: \
                 {cells_per_axis}^3 cells of {per_edge}^3 atoms, at most 2^30 ({MAX_ATOMS}, \
                 about 100 bytes each) per process ({processes} here) are allowed"
            );
            usage()
        }
        let grid = Grid::new([cells_per_axis; 3], cell);
        let atoms = grid.cells() * per_edge.pow(3);
        println!(
            "leanmd: {} PEs, {n}^3 cells of edge {cell}, {atoms} atoms, {} computes, {steps} \
             steps, atoms re-assigned every {migrate_every}",
            charmrs::num_pes(),
            grid.cells() * OFFSETS.len(),
            n = cells_per_axis,
        );
        let done = Future::new();
        let finals = verify.then(Future::new);
        let cfg = Config {
            grid,
            per_edge,
            speed,
            steps,
            migrate_every,
            done,
            finals,
        };
        let start = Instant::now();
        let dims = (cells_per_axis, cells_per_axis, cells_per_axis);
        let cells = Array::<Cell, CellIndex>::new(dims, (cfg,));
        let computes = Array::<Compute, ComputeIndex>::new(
            (dims.0, dims.1, dims.2, OFFSETS.len()),
            (grid, cells),
        );
        cells.start(computes);
        let totals = done.await;
        let took = start.elapsed().as_secs_f64();
        println!("{:.4} ms/step", took * 1e3 / steps as f64);
        println!(
            "energy: kinetic {:.6}, potential {:.6}, total {:.6}; {} atoms, {} changed cells",
            totals[0],
            totals[1],
            totals[0] + totals[1],
            totals[2],
            totals[3]
        );
        if let Some(finals) = finals {
            let mut all = Atoms::default();
            for a in finals.await {
                all.extend(a);
            }
            let ours = sorted_wrapped(&grid, all);
            let reference = serial_reference(&grid, per_edge, speed, steps);
            match max_deviation(&grid, &ours, &reference) {
                Some(d) if d <= 1e-9 => {
                    println!("verified against the serial reference: max deviation {d:.3e}")
                }
                Some(d) => {
                    eprintln!("leanmd: an atom is {d:.3e} away from the serial reference");
                    charmrs::exit(1);
                    return;
                }
                None => {
                    eprintln!("leanmd: the atoms differ from the serial reference's");
                    charmrs::exit(1);
                    return;
                }
            }
        }
        println!("Total time: {took:.3} s");
        charmrs::exit(0);
    })
}
