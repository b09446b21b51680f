//! stencil3d as an MPI program: the MPI side of the comparison with charmrs's `stencil3d`
//! (`bench/scripts/stencil3d-vs-mpi.sh`). Each rank holds one block of the same grid that
//! `stencil3d --blocks-per-pe 1` builds (`P × 1 × 1` blocks of `edge³` points, cut along x), runs
//! the same kernel (`charmrs_apps::stencil::Block`) from the same initial field, and exchanges
//! its x faces with its neighbours every iteration (non-blocking sends and receives, then wait),
//! as the charmrs program's chares do with entry calls.
//!
//! ```text
//! mpirun -np 2 stencil3d-mpi --edge 64 --iters 200
//! ```
//!
//! Prints the time per step every `--print-every` iterations, the sum of the final field's
//! values (`field checksum`: the ranks' sums added in rank order, as the charmrs program adds
//! its blocks' sums, so both print the same number for the same grid and iterations) and
//! `Total time: <seconds> s`.

use charmrs_apps::stencil::Block;
use mpi::traits::*;

/// Faces along x: `-x` (to the rank before) and `+x` (to the rank after).
const LOWER_X: usize = 0;
const UPPER_X: usize = 1;

fn usage() -> ! {
    eprintln!("usage: stencil3d-mpi [--edge N (32)] [--iters N (100)] [--print-every N (10)]");
    std::process::exit(2)
}

fn main() {
    let mut edge = 32usize;
    let mut iters = 100u64;
    let mut print_every = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            match args.next().map(|v| v.parse::<u64>()) {
                Some(Ok(v)) => v,
                _ => {
                    eprintln!("stencil3d-mpi: {name} needs a number");
                    usage()
                }
            }
        };
        match a.as_str() {
            "--edge" => edge = num("--edge").max(1) as usize,
            "--iters" => iters = num("--iters").max(1),
            "--print-every" => print_every = num("--print-every").max(1),
            other => {
                eprintln!("stencil3d-mpi: unknown argument `{other}`");
                usage()
            }
        }
    }
    let Some(universe) = mpi::initialize() else {
        eprintln!("stencil3d-mpi: MPI was initialized already");
        std::process::exit(1)
    };
    let world = universe.world();
    let (rank, ranks) = (world.rank(), world.size());
    let lower = (rank > 0).then(|| world.process_at_rank(rank - 1));
    let upper = (rank + 1 < ranks).then(|| world.process_at_rank(rank + 1));
    if rank == 0 {
        println!(
            "stencil3d-mpi: {ranks} ranks, {ranks} x 1 x 1 blocks of {edge}^3 points, {iters} \
             iterations"
        );
    }
    let mut block = Block::initial(edge, (rank as usize, 0, 0));
    let face_len = edge * edge;
    let (mut from_lower, mut from_upper) = (vec![0.0; face_len], vec![0.0; face_len]);
    world.barrier();
    let start = mpi::time();
    let mut last = start;
    for iter in 1..=iters {
        let (to_lower, to_upper) = (block.face(LOWER_X), block.face(UPPER_X));
        mpi::request::scope(|scope| {
            // A face travels tagged with the face it fills at the receiver.
            let mut pending = Vec::with_capacity(4);
            if let Some(p) = &lower {
                pending.push(p.immediate_receive_into_with_tag(
                    scope,
                    &mut from_lower[..],
                    LOWER_X as i32,
                ));
                pending.push(p.immediate_send_with_tag(scope, &to_lower[..], UPPER_X as i32));
            }
            if let Some(p) = &upper {
                pending.push(p.immediate_receive_into_with_tag(
                    scope,
                    &mut from_upper[..],
                    UPPER_X as i32,
                ));
                pending.push(p.immediate_send_with_tag(scope, &to_upper[..], LOWER_X as i32));
            }
            for request in pending {
                request.wait();
            }
        });
        if lower.is_some() {
            block.set_ghost(LOWER_X, &from_lower);
        }
        if upper.is_some() {
            block.set_ghost(UPPER_X, &from_upper);
        }
        block.kernel();
        if iter % print_every == 0 {
            world.barrier();
            let now = mpi::time();
            if rank == 0 {
                println!(
                    "iterations {:>4}..{:<4} {:9.4} ms/step",
                    iter + 1 - print_every,
                    iter,
                    (now - last) * 1e3 / print_every as f64
                );
            }
            last = now;
        }
    }
    // Every rank's sum, gathered to rank 0 and added there in rank order: the order in which
    // stencil3d adds its blocks' sums (by block index, here the rank), so both print the same
    // figure (an MPI_SUM reduction may add in any order, and differ in the last digits).
    let root = world.process_at_rank(0);
    let sum = block.interior_sum();
    if rank == 0 {
        let mut sums = vec![0.0f64; ranks as usize];
        root.gather_into_root(&sum, &mut sums[..]);
        let total = mpi::time() - start;
        let checksum: f64 = sums.iter().sum();
        println!("field checksum: {checksum:.12e}");
        println!("Total time: {total:.3} s");
    } else {
        root.gather_into(&sum);
    }
}
