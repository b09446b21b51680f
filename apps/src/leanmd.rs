//! The numerical core of `leanmd` (the paper's §V.C mini-app, after Charm++'s LeanMD):
//! Lennard-Jones particles in a periodic box cut into cubic cells at least as wide as the cutoff,
//! forces computed per pair of neighbouring cells, and a serial reference for checking.
//!
//! Units are reduced (σ = ε = mass = 1). Invariants:
//! * A [`Grid`] has at least 3 cells along each axis, so a cell's 26 neighbours are distinct
//!   cells and a pair of atoms closer than the cutoff has exactly one periodic image that close.
//! * The cell edge is the cutoff plus a margin: an atom may drift up to half the margin out of
//!   its cell between two re-assignments (`leanmd` re-assigns every few steps) and every pair
//!   within the cutoff is still found in the same or a neighbouring cell.

use serde::{Deserialize, Serialize};

/// Interaction cutoff.
pub const CUTOFF: f64 = 2.5;
/// The smallest cell edge: the cutoff plus the drift margin.
pub const MIN_CELL: f64 = 3.0;
/// Time step.
pub const DT: f64 = 0.001;

/// The offsets from a cell to the neighbours whose pair computations it owns: itself and the 13
/// neighbours in the "upper" half (the other 13 pairs belong to those neighbours).
pub const OFFSETS: [[i64; 3]; 14] = [
    [0, 0, 0],
    [1, 0, 0],
    [-1, 1, 0],
    [0, 1, 0],
    [1, 1, 0],
    [-1, -1, 1],
    [0, -1, 1],
    [1, -1, 1],
    [-1, 0, 1],
    [0, 0, 1],
    [1, 0, 1],
    [-1, 1, 1],
    [0, 1, 1],
    [1, 1, 1],
];

/// The box: `dims` cells of edge `cell` along each axis, periodic.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    /// Cells along x, y and z.
    pub dims: [usize; 3],
    /// Cell edge ([`MIN_CELL`] or more: larger cells hold more atoms, for coarser chares).
    pub cell: f64,
}

/// A cell's coordinates in the grid.
pub type CellIndex = (usize, usize, usize);

impl Grid {
    /// A grid of `dims` cells of edge `cell`.
    ///
    /// # Panics
    /// Fewer than 3 cells along an axis, or cells smaller than [`MIN_CELL`].
    pub fn new(dims: [usize; 3], cell: f64) -> Grid {
        assert!(dims.iter().all(|&d| d >= 3), "at least 3 cells per axis");
        assert!(cell >= MIN_CELL, "cells of edge {MIN_CELL} at least");
        Grid { dims, cell }
    }

    /// Edge lengths of the box.
    pub fn lengths(&self) -> [f64; 3] {
        self.dims.map(|d| d as f64 * self.cell)
    }

    /// Number of cells.
    pub fn cells(&self) -> usize {
        self.dims.iter().product()
    }

    /// The cell at `cell + offset`, across the periodic boundary if need be, and the shift that
    /// brings that cell's positions next to `cell`.
    pub fn neighbour(&self, cell: CellIndex, offset: [i64; 3]) -> (CellIndex, [f64; 3]) {
        let c = [cell.0, cell.1, cell.2];
        let mut out = [0usize; 3];
        let mut shift = [0.0; 3];
        for axis in 0..3 {
            let d = self.dims[axis] as i64;
            let raw = c[axis] as i64 + offset[axis];
            let wrapped = raw.rem_euclid(d);
            out[axis] = wrapped as usize;
            shift[axis] = (raw - wrapped) as f64 * self.cell;
        }
        ((out[0], out[1], out[2]), shift)
    }

    /// The cell holding position `p` (taken modulo the box), and `p` wrapped into the box.
    pub fn locate(&self, p: [f64; 3]) -> (CellIndex, [f64; 3]) {
        let len = self.lengths();
        let mut q = [0.0; 3];
        let mut c = [0usize; 3];
        for axis in 0..3 {
            q[axis] = p[axis].rem_euclid(len[axis]);
            c[axis] = ((q[axis] / self.cell) as usize).min(self.dims[axis] - 1);
        }
        ((c[0], c[1], c[2]), q)
    }
}

/// The atoms of one cell: ids, positions and velocities, index for index.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Atoms {
    /// Unique over the grid.
    pub ids: Vec<u64>,
    /// Positions (not wrapped into the box between re-assignments).
    pub pos: Vec<[f64; 3]>,
    /// Velocities.
    pub vel: Vec<[f64; 3]>,
}

impl Atoms {
    /// Number of atoms.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Adds one atom.
    pub fn push(&mut self, id: u64, pos: [f64; 3], vel: [f64; 3]) {
        self.ids.push(id);
        self.pos.push(pos);
        self.vel.push(vel);
    }

    /// Moves the other atoms in.
    pub fn extend(&mut self, other: Atoms) {
        self.ids.extend(other.ids);
        self.pos.extend(other.pos);
        self.vel.extend(other.vel);
    }

    /// Positions as a flat `x, y, z, x, …` vector (a message's payload).
    pub fn flat_positions(&self) -> Vec<f64> {
        self.pos.iter().flatten().copied().collect()
    }

    /// Kinetic energy.
    pub fn kinetic(&self) -> f64 {
        self.vel
            .iter()
            .map(|v| 0.5 * (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]))
            .sum()
    }

    /// Takes out the atoms that now belong to another cell than `cell` (wrapping every position
    /// into the box), with the cell each belongs to.
    pub fn leaving(
        &mut self,
        grid: &Grid,
        cell: CellIndex,
    ) -> Vec<(CellIndex, u64, [f64; 3], [f64; 3])> {
        let mut out = Vec::new();
        let mut k = 0;
        while k < self.len() {
            let (home, wrapped) = grid.locate(self.pos[k]);
            self.pos[k] = wrapped;
            if home == cell {
                k += 1;
            } else {
                out.push((
                    home,
                    self.ids.swap_remove(k),
                    self.pos.swap_remove(k),
                    self.vel.swap_remove(k),
                ));
            }
        }
        out
    }
}

/// A deterministic pseudo-random number in [0, 1) from `seed` (splitmix64).
fn unit(seed: u64) -> f64 {
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The initial atoms of `cell`: `per_edge`³ atoms on a lattice inside it, each moved by a small
/// deterministic jitter, with deterministic velocities of up to `speed` along each axis. Ids are
/// unique over the grid.
pub fn initial_atoms(grid: &Grid, cell: CellIndex, per_edge: usize, speed: f64) -> Atoms {
    let mut atoms = Atoms::default();
    let linear = (cell.2 * grid.dims[1] + cell.1) * grid.dims[0] + cell.0;
    let per_cell = per_edge.pow(3) as u64;
    let spacing = grid.cell / per_edge as f64;
    let origin = [cell.0, cell.1, cell.2].map(|c| c as f64 * grid.cell);
    for k in 0..per_cell {
        let id = linear as u64 * per_cell + k;
        let lattice = [
            (k as usize) % per_edge,
            (k as usize / per_edge) % per_edge,
            k as usize / (per_edge * per_edge),
        ];
        let mut pos = [0.0; 3];
        let mut vel = [0.0; 3];
        for axis in 0..3 {
            let jitter = (unit(id * 6 + axis as u64) - 0.5) * 0.1 * spacing;
            pos[axis] = origin[axis] + (lattice[axis] as f64 + 0.5) * spacing + jitter;
            vel[axis] = (unit(id * 6 + 3 + axis as u64) - 0.5) * 2.0 * speed;
        }
        atoms.push(id, pos, vel);
    }
    atoms
}

/// The Lennard-Jones force on an atom at `d` from another (`d` = own position − other's) and the
/// pair's potential energy, or nothing beyond the cutoff.
#[inline]
fn lj(d: [f64; 3]) -> Option<([f64; 3], f64)> {
    let r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    if r2 >= CUTOFF * CUTOFF || r2 == 0.0 {
        return None;
    }
    let inv2 = 1.0 / r2;
    let inv6 = inv2 * inv2 * inv2;
    let scale = 24.0 * inv2 * inv6 * (2.0 * inv6 - 1.0);
    Some((d.map(|x| x * scale), 4.0 * inv6 * (inv6 - 1.0)))
}

/// Forces between the atoms at `a` and those at `b` (moved by `shift`), within the cutoff:
/// returns the force on each atom of `a`, on each of `b`, and the pairs' potential energy. With
/// `same` (`a` and `b` are one cell's atoms), each pair counts once and `b`'s forces are `a`'s.
pub fn pair_forces(
    a: &[[f64; 3]],
    b: &[[f64; 3]],
    shift: [f64; 3],
    same: bool,
) -> (Vec<[f64; 3]>, Vec<[f64; 3]>, f64) {
    let mut fa = vec![[0.0; 3]; a.len()];
    let mut fb = vec![[0.0; 3]; b.len()];
    let mut energy = 0.0;
    for (i, pa) in a.iter().enumerate() {
        let start = if same { i + 1 } else { 0 };
        for (j, pb) in b.iter().enumerate().skip(start) {
            let d = [
                pa[0] - (pb[0] + shift[0]),
                pa[1] - (pb[1] + shift[1]),
                pa[2] - (pb[2] + shift[2]),
            ];
            if let Some((f, e)) = lj(d) {
                energy += e;
                for axis in 0..3 {
                    fa[i][axis] += f[axis];
                    if same {
                        fa[j][axis] -= f[axis];
                    } else {
                        fb[j][axis] -= f[axis];
                    }
                }
            }
        }
    }
    if same {
        fb = fa.clone();
    }
    (fa, fb, energy)
}

/// One time step for `atoms` under `forces` (unit masses): velocities, then positions
/// (semi-implicit Euler).
pub fn integrate(atoms: &mut Atoms, forces: &[[f64; 3]]) {
    for ((p, v), f) in atoms.pos.iter_mut().zip(&mut atoms.vel).zip(forces) {
        for axis in 0..3 {
            v[axis] += f[axis] * DT;
            p[axis] += v[axis] * DT;
        }
    }
}

/// The serial reference: `steps` steps of every atom of the grid, all pairs by the minimum image
/// convention. Returns the final atoms (positions wrapped into the box), sorted by id.
pub fn serial_reference(grid: &Grid, per_edge: usize, speed: f64, steps: u64) -> Atoms {
    let mut atoms = Atoms::default();
    for z in 0..grid.dims[2] {
        for y in 0..grid.dims[1] {
            for x in 0..grid.dims[0] {
                atoms.extend(initial_atoms(grid, (x, y, z), per_edge, speed));
            }
        }
    }
    let len = grid.lengths();
    for _ in 0..steps {
        let mut forces = vec![[0.0; 3]; atoms.len()];
        for i in 0..atoms.len() {
            for j in i + 1..atoms.len() {
                let mut d = [0.0; 3];
                for axis in 0..3 {
                    let raw = atoms.pos[i][axis] - atoms.pos[j][axis];
                    d[axis] = raw - len[axis] * (raw / len[axis]).round();
                }
                if let Some((f, _)) = lj(d) {
                    for axis in 0..3 {
                        forces[i][axis] += f[axis];
                        forces[j][axis] -= f[axis];
                    }
                }
            }
        }
        integrate(&mut atoms, &forces);
    }
    sorted_wrapped(grid, atoms)
}

/// The first atom of `cell` that is further out of the cell than the drift margin allows (half
/// of `grid.cell - CUTOFF`: beyond it a pair within the cutoff could be two cells apart), with
/// how far out it is.
pub fn drifted(grid: &Grid, cell: CellIndex, atoms: &Atoms) -> Option<(u64, f64)> {
    let allowed = (grid.cell - CUTOFF) / 2.0;
    let lo = [cell.0, cell.1, cell.2].map(|c| c as f64 * grid.cell);
    for (id, p) in atoms.ids.iter().zip(&atoms.pos) {
        let out = (0..3)
            .map(|a| (lo[a] - p[a]).max(p[a] - (lo[a] + grid.cell)).max(0.0))
            .fold(0.0, f64::max);
        if out > allowed {
            return Some((*id, out));
        }
    }
    None
}

/// `atoms` sorted by id, positions wrapped into the box.
pub fn sorted_wrapped(grid: &Grid, atoms: Atoms) -> Atoms {
    let mut order: Vec<usize> = (0..atoms.len()).collect();
    order.sort_by_key(|&k| atoms.ids[k]);
    let mut out = Atoms::default();
    for k in order {
        out.push(atoms.ids[k], grid.locate(atoms.pos[k]).1, atoms.vel[k]);
    }
    out
}

/// The largest distance between the positions of the same atom in `a` and `b` (both sorted by
/// id, wrapped into the box), by the minimum image; `None` if they hold different atoms.
pub fn max_deviation(grid: &Grid, a: &Atoms, b: &Atoms) -> Option<f64> {
    if a.ids != b.ids {
        return None;
    }
    let len = grid.lengths();
    let mut worst: f64 = 0.0;
    for (p, q) in a.pos.iter().zip(&b.pos) {
        for axis in 0..3 {
            let raw = p[axis] - q[axis];
            let d = raw - len[axis] * (raw / len[axis]).round();
            worst = worst.max(d.abs());
        }
    }
    Some(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offsets_and_their_opposites_cover_every_neighbour_once() {
        let mut seen = std::collections::BTreeSet::new();
        for o in OFFSETS {
            assert!(seen.insert(o));
            if o != [0, 0, 0] {
                assert!(seen.insert([-o[0], -o[1], -o[2]]), "{o:?}");
            }
        }
        assert_eq!(seen.len(), 27);
    }

    #[test]
    fn neighbours_wrap_with_the_shift_that_keeps_them_adjacent() {
        let g = Grid::new([3, 4, 5], MIN_CELL);
        assert_eq!(
            g.neighbour((0, 0, 0), [-1, 0, 0]),
            ((2, 0, 0), [-9.0, 0.0, 0.0])
        );
        assert_eq!(
            g.neighbour((2, 3, 4), [1, 1, 1]),
            ((0, 0, 0), [9.0, 12.0, 15.0])
        );
        assert_eq!(g.neighbour((1, 1, 1), [1, -1, 0]), ((2, 0, 1), [0.0; 3]));
        assert_eq!(g.locate([-0.5, 12.5, 3.0]).0, (2, 0, 1));
    }

    #[test]
    fn the_deviation_sees_a_step_and_a_lost_atom() {
        let g = Grid::new([3, 3, 3], MIN_CELL);
        let (a, b) = (
            serial_reference(&g, 2, 0.1, 0),
            serial_reference(&g, 2, 0.1, 3),
        );
        assert_eq!(max_deviation(&g, &a, &a), Some(0.0));
        assert!(max_deviation(&g, &a, &b).unwrap() > 1e-6);
        let mut fewer = b.clone();
        fewer.ids.pop();
        assert_eq!(max_deviation(&g, &fewer, &b), None);
    }

    #[test]
    fn an_atom_beyond_the_margin_is_found() {
        let g = Grid::new([3, 3, 3], MIN_CELL);
        let mut atoms = initial_atoms(&g, (1, 1, 1), 2, 0.1);
        assert_eq!(drifted(&g, (1, 1, 1), &atoms), None);
        atoms.pos[1][2] = 3.0 - 0.2;
        assert_eq!(drifted(&g, (1, 1, 1), &atoms), None, "0.2 out: within 0.25");
        atoms.pos[1][2] = 6.0 + 0.3;
        let (id, out) = drifted(&g, (1, 1, 1), &atoms).unwrap();
        assert_eq!(id, atoms.ids[1]);
        assert!((out - 0.3).abs() < 1e-12);
    }

    #[test]
    fn pair_forces_are_equal_and_opposite() {
        let a = [[0.0, 0.0, 0.0], [1.2, 0.0, 0.0]];
        let b = [[0.0, 1.1, 0.0]];
        let (fa, fb, _) = pair_forces(&a, &b, [0.0; 3], false);
        for axis in 0..3 {
            let total = fa[0][axis] + fa[1][axis] + fb[0][axis];
            assert!(total.abs() < 1e-12, "{fa:?} {fb:?}");
        }
        let (fs, _, e) = pair_forces(&a, &a, [0.0; 3], true);
        assert!((fs[0][0] + fs[1][0]).abs() < 1e-12 && e != 0.0);
    }
}
