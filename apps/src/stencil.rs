//! The numerical core of `stencil3d`: one block of a 3-D grid with one layer of ghost cells, its
//! 7-point Jacobi kernel, its faces, and the paper's synthetic load factor.
//!
//! Invariant: a [`Block`] of edge `n` stores `(n + 2)^3` values, x fastest; the interior is
//! `1..=n` in every dimension and the ghost layer is refreshed from the neighbours' faces before
//! every kernel.

use serde::{Deserialize, Serialize};

/// The six faces of a block, in the order `-x, +x, -y, +y, -z, +z`.
pub const FACES: usize = 6;

/// One block of the grid, with its ghost layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Block {
    n: usize,
    cur: Vec<f64>,
    /// Scratch for the sweep: not part of the state (a migration does not carry it).
    #[serde(skip)]
    next: Vec<f64>,
}

impl Block {
    /// A block of `n^3` interior points, every value `value` (ghosts too).
    pub fn new(n: usize, value: f64) -> Block {
        let len = (n + 2).pow(3);
        Block {
            n,
            cur: vec![value; len],
            next: vec![value; len],
        }
    }

    /// Edge length (interior points per dimension).
    pub fn edge(&self) -> usize {
        self.n
    }

    #[inline]
    fn at(&self, x: usize, y: usize, z: usize) -> usize {
        let m = self.n + 2;
        (z * m + y) * m + x
    }

    /// Value at interior-relative coordinates `0..n` (no ghosts).
    pub fn get(&self, x: usize, y: usize, z: usize) -> f64 {
        self.cur[self.at(x + 1, y + 1, z + 1)]
    }

    /// Sets an interior value.
    pub fn set(&mut self, x: usize, y: usize, z: usize, v: f64) {
        let i = self.at(x + 1, y + 1, z + 1);
        self.cur[i] = v;
    }

    /// The sum of the interior values (a checksum of the field: two programs that run the same
    /// iterations on the same grid agree on it, up to the order of the additions).
    pub fn interior_sum(&self) -> f64 {
        let n = self.n;
        let mut sum = 0.0;
        for z in 1..=n {
            for y in 1..=n {
                let row = self.at(1, y, z);
                sum += self.cur[row..row + n].iter().sum::<f64>();
            }
        }
        sum
    }

    /// The initial field of the block at block coordinates `pos` of the grid: a smooth function
    /// of the global coordinates, different in every block (shared by `stencil3d` and its MPI
    /// version, so their results can be compared).
    pub fn initial(n: usize, pos: (usize, usize, usize)) -> Block {
        let mut block = Block::new(n, 0.0);
        for z in 0..n {
            for y in 0..n {
                for x in 0..n {
                    let gx = (pos.0 * n + x) as f64;
                    let gy = (pos.1 * n + y) as f64;
                    let gz = (pos.2 * n + z) as f64;
                    block.set(x, y, z, (gx * 0.01).sin() + (gy * 0.02).cos() + gz * 0.001);
                }
            }
        }
        block
    }

    /// Walks the `n × n` cells of `face` at layer `layer` (0 = ghost, 1 = first interior).
    fn face_cells(&self, face: usize, layer: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.n;
        let fixed = if face.is_multiple_of(2) {
            layer
        } else {
            n + 1 - layer
        };
        (1..=n).flat_map(move |b| {
            (1..=n).map(move |a| match face / 2 {
                0 => self.at(fixed, a, b),
                1 => self.at(a, fixed, b),
                _ => self.at(a, b, fixed),
            })
        })
    }

    /// The interior values next to `face` (what the neighbour on that side needs).
    pub fn face(&self, face: usize) -> Vec<f64> {
        self.face_cells(face, 1).map(|i| self.cur[i]).collect()
    }

    /// Fills the ghost layer of `face` with the neighbour's face values.
    ///
    /// # Panics
    /// If `values` does not hold `n^2` values.
    pub fn set_ghost(&mut self, face: usize, values: &[f64]) {
        assert_eq!(values.len(), self.n * self.n, "a face has n^2 values");
        let cells: Vec<usize> = self.face_cells(face, 0).collect();
        for (i, v) in cells.into_iter().zip(values) {
            self.cur[i] = *v;
        }
    }

    /// One Jacobi sweep of the 7-point stencil over the interior: every point becomes the mean
    /// of itself and its six neighbours.
    pub fn kernel(&mut self) {
        let n = self.n;
        let m = n + 2;
        if self.next.len() != self.cur.len() {
            self.next = self.cur.clone();
        }
        let (sx, sy, sz) = (1, m, m * m);
        for z in 1..=n {
            for y in 1..=n {
                let row = self.at(0, y, z);
                for x in 1..=n {
                    let i = row + x;
                    let c = &self.cur;
                    self.next[i] = (c[i]
                        + c[i - sx]
                        + c[i + sx]
                        + c[i - sy]
                        + c[i + sy]
                        + c[i - sz]
                        + c[i + sz])
                        * (1.0 / 7.0);
                }
            }
        }
        // Interior of `next` is new; ghosts keep the old values until refreshed.
        for z in 1..=n {
            for y in 1..=n {
                let row = self.at(1, y, z);
                self.cur[row..row + n].copy_from_slice(&self.next[row..row + n]);
            }
        }
    }
}

/// CPU time consumed by the calling thread, in seconds.
///
/// `stencil3d` measures its kernel with it: with more PEs than cores the wall time of a kernel
/// includes the time its thread waited for a core, and the synthetic load (`t_k × α`, up to 80×)
/// would amplify that noise; the thread's CPU time is what the kernel costs on a dedicated core.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_THREAD_CPUTIME_ID is supported by
    // Linux for the calling thread; the call writes only into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The paper's synthetic load factor (§V.B) of MPI block `i` of `n_blocks` at iteration `iter`
/// (1-based): 10 for the outer fifths, otherwise `100 i / N + 5 ⌈iter / 30⌉`.
pub fn load_factor(i: usize, n_blocks: usize, iter: u64) -> f64 {
    let (i, n) = (i as f64, n_blocks as f64);
    if i <= 0.2 * n || i >= 0.8 * n {
        10.0
    } else {
        100.0 * i / n + 5.0 * iter.div_ceil(30) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_field_is_a_fixed_point() {
        let mut b = Block::new(4, 2.5);
        b.kernel();
        for z in 0..4 {
            for y in 0..4 {
                for x in 0..4 {
                    assert!((b.get(x, y, z) - 2.5).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn faces_and_ghosts_line_up() {
        let mut a = Block::new(3, 0.0);
        for z in 0..3 {
            for y in 0..3 {
                for x in 0..3 {
                    a.set(x, y, z, (x + 10 * y + 100 * z) as f64);
                }
            }
        }
        // a's +x face goes into b's -x ghost: b's kernel then sees a's x = 2 values.
        let plus_x = a.face(1);
        assert_eq!(plus_x.len(), 9);
        assert!(plus_x.iter().all(|v| (*v as usize) % 10 == 2));
        let mut b = Block::new(3, 0.0);
        b.set_ghost(0, &plus_x);
        b.kernel();
        // Point (0, 1, 1) of b: neighbours are zero except the ghost a(2, 1, 1) = 112.
        assert!((b.get(0, 1, 1) - 112.0 / 7.0).abs() < 1e-12);
    }

    #[test]
    fn the_papers_load_factors() {
        assert_eq!(load_factor(0, 8, 1), 10.0);
        assert_eq!(load_factor(1, 8, 1), 10.0);
        assert_eq!(load_factor(7, 8, 90), 10.0);
        assert_eq!(load_factor(4, 8, 1), 55.0);
        assert_eq!(load_factor(4, 8, 31), 60.0);
        assert_eq!(load_factor(6, 8, 30), 80.0);
    }
}
