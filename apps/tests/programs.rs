//! The paper's programs behave as documented with 1, 2 and 4 (oversubscribed) PEs.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

/// Runs program `bin` with `args`, failing (with its output) if it takes longer than 60 s.
fn run(bin: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("CHARMRS_PES");
    common::run(cmd, Duration::from_secs(60), |_| false).into_output()
}

fn lines_ok(bin: &str, args: &[&str]) -> Vec<String> {
    let out = run(bin, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{bin} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

const PES: [usize; 3] = [1, 2, 4];

/// What each program prints on `p` PEs (with its default arguments).
fn hello_lines() -> Vec<String> {
    vec!["Hello".into()]
}

fn group_hello_lines(p: usize) -> Vec<String> {
    (0..p)
        .map(|i| format!("Hi[{}] from element {i}", 17 + i))
        .chain(["All done".into()])
        .collect()
}

/// Block placement of row-major position `pos` among `total` elements on `p` PEs.
fn home(pos: usize, total: usize, p: usize) -> usize {
    pos * p / total
}

fn array_hello_lines(p: usize) -> Vec<String> {
    (0..8)
        .map(|pos| {
            let (i, j, k) = (pos / 4, (pos / 2) % 2, pos % 2);
            format!(
                "Hi[{}] from element ({i}, {j}, {k}) on PE {}",
                17 + pos,
                home(pos, 8, p)
            )
        })
        .chain(["All done".into()])
        .collect()
}

fn reduction_lines() -> Vec<String> {
    let want: Vec<String> = (0..20).map(|x| (x * 100).to_string()).collect();
    vec![format!("Reduction result is [{}]", want.join(", "))]
}

fn futures_lines() -> Vec<String> {
    [
        "Reduction result is 4950",
        "Value of future 1 is 1",
        "Value of future 2 is 2",
    ]
    .map(String::from)
    .to_vec()
}

fn wait_loop_lines() -> Vec<String> {
    vec!["Done after 10 iterations".into()]
}

fn pmap_lines() -> Vec<String> {
    vec!["Final results are [1, 4, 9, 16, 25] [1, 9, 25, 49, 81]".into()]
}

#[test]
fn hello_says_hello() {
    for p in PES {
        assert_eq!(
            lines_ok(env!("CARGO_BIN_EXE_hello"), &[&format!("+p{p}")]),
            hello_lines()
        );
    }
}

#[test]
fn group_hello_rings_the_group() {
    for p in PES {
        let got = lines_ok(env!("CARGO_BIN_EXE_group_hello"), &[&format!("+p{p}")]);
        assert_eq!(got, group_hello_lines(p));
    }
}

#[test]
fn array_hello_rings_the_array_in_row_major_order() {
    for p in PES {
        let got = lines_ok(env!("CARGO_BIN_EXE_array_hello"), &[&format!("+p{p}")]);
        assert_eq!(got, array_hello_lines(p), "+p{p}");
    }
    let got = lines_ok(env!("CARGO_BIN_EXE_array_hello"), &["+p4", "3", "5"]);
    assert_eq!(got.len(), 16);
    assert_eq!(
        got[14],
        format!("Hi[31] from element (2, 4) on PE {}", home(14, 15, 4))
    );
    let got = lines_ok(env!("CARGO_BIN_EXE_array_hello"), &["+p2", "7"]);
    assert_eq!(got[6], "Hi[23] from element (6,) on PE 1");
}

#[test]
fn bad_arguments_are_named() {
    let out = run(env!("CARGO_BIN_EXE_array_hello"), &["+p2", "0"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`0` is not a dimension"));
    let out = run(env!("CARGO_BIN_EXE_hello"), &["+q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown runtime option `+q`"));
}

/// Runs `bin` with `args`, expecting a usage error (status 2) whose message contains `says`.
fn assert_usage_error(bin: &str, args: &[&str], says: &str) {
    let out = run(bin, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{bin} {args:?}: {stderr}");
    assert!(stderr.contains(says), "{bin} {args:?}: {stderr}");
    assert!(stderr.contains("usage: "), "{bin} {args:?}: {stderr}");
}

/// The programs that take no arguments refuse one (they used to ignore it and exit 0), as
/// `wait_loop` refuses a second; runtime options are the runtime's and still accepted.
#[test]
fn programs_refuse_arguments_they_do_not_take() {
    for bin in [
        env!("CARGO_BIN_EXE_hello"),
        env!("CARGO_BIN_EXE_group_hello"),
        env!("CARGO_BIN_EXE_reduction"),
        env!("CARGO_BIN_EXE_futures"),
        env!("CARGO_BIN_EXE_pmap"),
    ] {
        assert_usage_error(
            bin,
            &["+p2", "--bogus", "+wirecheck"],
            "unexpected argument `--bogus`",
        );
    }
    let wait_loop = env!("CARGO_BIN_EXE_wait_loop");
    assert_usage_error(wait_loop, &["+p2", "5", "6"], "unexpected argument `6`");
    assert_usage_error(wait_loop, &["+p2", "2"], "`2` is not a number of elements");
}

/// A size of 0 is refused naming its argument (it used to become 1 silently), and so is a size
/// whose product wraps around or is past what fits in memory (it used to panic with `capacity
/// overflow`, or print a wrapped atom count and hang allocating).
#[test]
fn sizes_that_are_zero_or_too_large_are_usage_errors() {
    let stencil = env!("CARGO_BIN_EXE_stencil3d");
    assert_usage_error(
        stencil,
        &["+p1", "--iters", "0"],
        "--iters must be at least 1",
    );
    assert_usage_error(
        stencil,
        &["+p1", "--edge", "0"],
        "--edge must be at least 1",
    );
    assert_usage_error(
        stencil,
        &["+p1", "--edge", "100000000"],
        "--edge 100000000 is too large",
    );
    assert_usage_error(stencil, &["+p1", "--edge", "2000"], "at most 2^34");
    let heat = env!("CARGO_BIN_EXE_heat2d");
    assert_usage_error(
        heat,
        &["+p1", "--blocks", "0"],
        "--blocks must be at least 1",
    );
    assert_usage_error(heat, &["+p1", "--edge", "0"], "--edge must be at least 1");
    assert_usage_error(
        heat,
        &["+p1", "--blocks", "100000", "--edge", "100000"],
        "at most 2^34",
    );
    let leanmd = env!("CARGO_BIN_EXE_leanmd");
    assert_usage_error(
        leanmd,
        &["+p1", "--cell-scale", "1000000", "--per-edge", "1000000"],
        "--per-edge 1000000 make too many atoms",
    );
    assert_usage_error(
        leanmd,
        &["+p1", "--cells", "5000000"],
        "--cells 5000000 and --per-edge 3 make too many atoms",
    );
    assert_usage_error(
        leanmd,
        &["+p1", "--speed", "-1"],
        "tenths of σ per unit time",
    );
    // Speeds in tenths of σ may be decimals, or 0 (atoms at rest).
    for speed in ["0.5", "0"] {
        let got = lines_ok(
            leanmd,
            &["+p2", "--steps", "4", "--speed", speed, "--verify"],
        );
        assert_leanmd_verified_atoms(&got, 729);
    }
}

/// A process started as one of several by a launcher charmrs cannot join (OpenMPI's `mpirun`
/// with a build without PMIx) refuses to run, naming what it saw; before, every process ran as a
/// job of its own (each one PE 0), printing everything once per process.
#[test]
fn a_process_of_a_launch_it_cannot_join_refuses_to_run() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hello"));
    cmd.env_remove("CHARMRS_PES")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "1");
    let out = common::run(cmd, Duration::from_secs(60), |_| false).into_output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("OMPI_COMM_WORLD_SIZE=2"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// An argument that is not UTF-8 is a usage error (status 2) naming it, not a panic.
#[test]
fn an_argument_that_is_not_utf8_is_a_usage_error() {
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hello"));
    cmd.env_remove("CHARMRS_PES")
        .arg(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    let out = common::run(cmd, Duration::from_secs(60), |_| false).into_output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
}

#[test]
fn reduction_prints_the_sum() {
    for p in PES {
        let got = lines_ok(env!("CARGO_BIN_EXE_reduction"), &[&format!("+p{p}")]);
        assert_eq!(got, reduction_lines());
    }
}

#[test]
fn futures_prints_reduction_and_both_futures() {
    for p in PES {
        let got = lines_ok(env!("CARGO_BIN_EXE_futures"), &[&format!("+p{p}")]);
        assert_eq!(got, futures_lines());
    }
}

#[test]
fn wait_loop_finishes_once() {
    for p in PES {
        let got = lines_ok(env!("CARGO_BIN_EXE_wait_loop"), &[&format!("+p{p}")]);
        assert_eq!(got, wait_loop_lines());
    }
    let got = lines_ok(env!("CARGO_BIN_EXE_wait_loop"), &["+p3", "50"]);
    assert_eq!(got, wait_loop_lines());
}

#[test]
fn pmap_runs_two_jobs() {
    for p in PES {
        let got = lines_ok(env!("CARGO_BIN_EXE_pmap"), &[&format!("+p{p}")]);
        assert_eq!(got, pmap_lines());
    }
}

/// Every program also runs with `+wirecheck` (all messages between PEs are encoded in the
/// inter-process wire format and decoded again), printing exactly what it prints without.
#[test]
fn every_program_survives_the_wire_format() {
    let p = 3;
    let cases: [(&str, Vec<String>); 7] = [
        (env!("CARGO_BIN_EXE_hello"), hello_lines()),
        (env!("CARGO_BIN_EXE_group_hello"), group_hello_lines(p)),
        (env!("CARGO_BIN_EXE_array_hello"), array_hello_lines(p)),
        (env!("CARGO_BIN_EXE_reduction"), reduction_lines()),
        (env!("CARGO_BIN_EXE_futures"), futures_lines()),
        (env!("CARGO_BIN_EXE_wait_loop"), wait_loop_lines()),
        (env!("CARGO_BIN_EXE_pmap"), pmap_lines()),
    ];
    for (bin, want) in cases {
        let got = lines_ok(bin, &[&format!("+p{p}"), "+wirecheck"]);
        assert_eq!(got, want, "{bin}");
    }
}

/// What a `leanmd --verify` run printed: it matched the serial reference and kept `atoms` atoms.
fn assert_leanmd_verified_atoms(got: &[String], atoms: usize) {
    assert!(
        got.iter()
            .any(|l| l.starts_with("verified against the serial reference")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|l| l.starts_with("energy:") && l.contains(&format!("; {atoms} atoms, "))),
        "{got:?}"
    );
}

/// What a `leanmd --verify` run printed: it matched the serial reference, kept `atoms` atoms,
/// and atoms did change cells (so the hand-over between cells was exercised).
fn assert_leanmd_verified(got: &[String], atoms: usize) {
    assert!(got[0].starts_with("leanmd:"), "{got:?}");
    assert!(
        got.iter()
            .any(|l| l.starts_with("verified against the serial reference")),
        "{got:?}"
    );
    let energy = got
        .iter()
        .find(|l| l.starts_with("energy:"))
        .unwrap_or_else(|| panic!("{got:?}"));
    let counts: Vec<&str> = energy.rsplit("; ").next().unwrap().split(' ').collect();
    assert_eq!(
        counts[0],
        atoms.to_string(),
        "no atom lost or doubled: {energy}"
    );
    let changed: u64 = counts[2].parse().unwrap();
    assert!(changed > 0, "atoms changed cells: {energy}");
}

/// leanmd's atoms end where the serial all-pairs reference puts them, with atoms changing cells
/// (a hot start) and handed over every 3 steps: on 1 PE with 4 cells a side, on 4 PEs with 3;
/// then with every chare moving every 5 ms (the diagnostic Rotate strategy in periodic mode)
/// while positions, forces and atoms are in flight.
#[test]
fn leanmd_matches_the_serial_reference() {
    let hot = ["--migrate-every", "3", "--speed", "300", "--verify"];
    for (p, cells, atoms) in [("+p1", "4", 1728), ("+p4", "3", 729)] {
        let mut args = vec![p, "--cells", cells, "--steps", "24"];
        args.extend(hot);
        assert_leanmd_verified(&lines_ok(env!("CARGO_BIN_EXE_leanmd"), &args), atoms);
    }
    let mut args = vec![
        "+p3",
        "--steps",
        "30",
        "+balancer",
        "Rotate",
        "+LBPeriod",
        "0.005",
    ];
    args.extend(hot);
    assert_leanmd_verified(&lines_ok(env!("CARGO_BIN_EXE_leanmd"), &args), 729);
    for (args, says) in [
        (["--cells", "2"], "--cells must be at least 3"),
        (
            ["--per-edge", "5"],
            "--per-edge must be at most 3 for cells of edge 3",
        ),
    ] {
        let out = run(env!("CARGO_BIN_EXE_leanmd"), &["+p2", args[0], args[1]]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}"
        );
    }
}

/// The field stencil3d computes with load balancing (blocks moving between PEs between
/// iterations) is the one it computes on the same grid without (on as many PEs, or fewer): the
/// same `field checksum` line, to the last digit (the blocks' sums are added in index order).
#[test]
fn stencil3d_balances_and_reports_its_total_time() {
    let stencil = env!("CARGO_BIN_EXE_stencil3d");
    let size = ["--iters", "12", "--edge", "6"];
    // The grid has PEs × blocks per PE along x: 1 × 2 × 2 blocks on 1 PE with 4 blocks per PE
    // (the default), 4 × 2 × 2 on 4 PEs with 4 or on 2 PEs with 8. No balancing here.
    let reference = |p: &str, per_pe: &str| -> String {
        let mut args = vec![p, "--blocks-per-pe", per_pe, "--lb-warmup", "0"];
        args.extend(["--lb-period", "0"]);
        args.extend(size);
        common::field_checksum(&lines_ok(stencil, &args)).to_string()
    };
    let want = [
        ("+p1", reference("+p1", "4")),
        ("+p4", reference("+p2", "8")),
    ];
    for (p, want) in &want {
        let mut args = vec![*p, "--imbalance"];
        args.extend(size);
        args.extend([
            "--lb-period",
            "5",
            "--print-every",
            "4",
            "+balancer",
            "GreedyRefine",
            "+LBDebug",
        ]);
        let got = lines_ok(stencil, &args);
        assert_eq!(common::field_checksum(&got), want.as_str(), "{p}: {got:?}");
        assert!(got[0].starts_with("stencil3d:"), "{got:?}");
        let steps = got.iter().filter(|l| l.starts_with("[LB] step")).count();
        assert_eq!(steps, 3, "after iterations 2, 5 and 10: {got:?}");
        assert_eq!(
            got.iter().filter(|l| l.contains("ms/step")).count(),
            3,
            "{got:?}"
        );
        assert!(
            got[got.len() - 3].starts_with("measured load per PE"),
            "{got:?}"
        );
        assert!(got[got.len() - 2].starts_with("idle per PE"), "{got:?}");
        let last = got.last().unwrap();
        let secs: f64 = last
            .strip_prefix("Total time: ")
            .and_then(|s| s.strip_suffix(" s"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("last line: {last}"));
        assert!(secs > 0.0);
    }
    // Every block moves to the next PE after iterations 2, 3, 6 and 9.
    let mut args = vec!["+p4"];
    args.extend(size);
    args.extend(["--lb-period", "3", "+balancer", "Rotate", "+LBDebug"]);
    let got = lines_ok(stencil, &args);
    let moves: Vec<&String> = got.iter().filter(|l| l.starts_with("[LB] step")).collect();
    assert_eq!(moves.len(), 4, "{got:?}");
    assert!(
        moves.iter().all(|l| l.contains(" 16 migrations")),
        "{moves:?}"
    );
    assert_eq!(
        common::field_checksum(&got),
        want[1].1.as_str(),
        "Rotate: {got:?}"
    );
    let out = run(
        env!("CARGO_BIN_EXE_stencil3d"),
        &["+p2", "--blocks-per-pe", "3"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--blocks-per-pe must be 1, 2, 4 or 8"));
}

/// stencil3d computes the grid, not its cut into blocks: 2 × 2 × 2 blocks of 6^3 points and one
/// block of 12^3 (on 1 PE), or 4 × 2 × 2 blocks of 6^3 and 2 × 1 × 1 of 12^3 (on 2 PEs), print
/// the same `field checksum` line. Every point is relaxed by the same arithmetic whatever block
/// holds it; the sums of the blocks could differ in their last bits, but they are a fixed
/// computation, and at this size they agree to the digits printed.
#[test]
fn stencil3d_computes_the_same_field_whatever_the_blocks() {
    let stencil = env!("CARGO_BIN_EXE_stencil3d");
    let checksum = |p: &str, per_pe: &str, edge: &str| -> String {
        let args = [
            p,
            "--blocks-per-pe",
            per_pe,
            "--edge",
            edge,
            "--iters",
            "20",
        ];
        let got = lines_ok(stencil, &args);
        assert!(got[0].starts_with("stencil3d:"), "{args:?}: {got:?}");
        common::field_checksum(&got).to_string()
    };
    for p in ["+p1", "+p2"] {
        let small = checksum(p, "8", "6");
        let large = checksum(p, "1", "12");
        assert_eq!(small, large, "{p}: 8 blocks of 6^3 a PE against 1 of 12^3");
    }
}

/// heat2d prints the same residuals and checksum on any PE count, and after a checkpoint and a
/// restart on another PE count, with every message through the wire format.
#[test]
fn heat2d_prints_the_same_figures_on_any_pe_count_and_after_a_restart() {
    let heat = env!("CARGO_BIN_EXE_heat2d");
    let dir = std::env::temp_dir().join(format!("charmrs-heat-programs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().unwrap();
    let figures = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "--blocks", "3", "--edge", "6", "--steps", "30", "--every", "10",
        ];
        args.extend(extra);
        common::heat_figures(lines_ok(heat, &args))
    };
    let reference = figures(&["+p1"]);
    assert_eq!(reference.len(), 4, "{reference:?}");
    for p in ["+p2", "+p4"] {
        assert_eq!(figures(&[p]), reference, "{p}");
    }
    let first = figures(&[
        "+p4",
        "+wirecheck",
        "--checkpoint",
        dir_arg,
        "--stop-after",
        "10",
    ]);
    assert_eq!(first, reference[..1]);
    let rest = figures(&["+p2", "+wirecheck", "--restart", dir_arg]);
    assert_eq!(rest, reference[1..]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A heat2d restart goes on to the `--steps` of the run that wrote the checkpoint (it used to fall
/// back to the default 200 and print the checkpoint's step-240 checksum as the result of a
/// 300-step run): stopped after step 240, stopped again after 250 (warned that no checkpoint
/// would be written, so the next restart starts at 240 again), then restarted with no other
/// argument, it ends with the figures of an uninterrupted 300-step run. A restart refuses another
/// plate, and `--stop-after` needs somewhere to checkpoint.
#[test]
fn heat2d_restarts_with_the_steps_of_the_run_it_continues() {
    let heat = env!("CARGO_BIN_EXE_heat2d");
    let dir = std::env::temp_dir().join(format!("charmrs-heat-steps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().unwrap();
    let plate = ["+p2", "--blocks", "3", "--edge", "6"];
    let whole = common::heat_figures(lines_ok(heat, &[&plate[..], &["--steps", "300"]].concat()));
    // A residual line every 20 steps (the default), then the checksum.
    assert_eq!(whole.len(), 16, "{whole:?}");

    let first = lines_ok(
        heat,
        &[
            &plate[..],
            &[
                "--steps",
                "300",
                "--checkpoint",
                dir_arg,
                "--stop-after",
                "240",
            ],
        ]
        .concat(),
    );
    assert!(
        first
            .iter()
            .any(|l| l == "heat2d: stopping after step 240 (as if out of time)"),
        "{first:?}"
    );
    assert_eq!(common::heat_figures(first), whole[..12]);

    let out = run(heat, &["+p1", "--restart", dir_arg, "--stop-after", "250"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: --stop-after 250 comes before the next checkpoint"),
        "{stderr}"
    );

    for (args, says) in [
        (
            vec!["+p1", "--restart", dir_arg, "--blocks", "4"],
            "--blocks 4 differs from the checkpoint's 3",
        ),
        (
            vec!["+p1", "--restart", dir_arg, "--edge", "8"],
            "--edge 8 differs from the checkpoint's 6",
        ),
        (
            vec!["+p1", "--restart", dir_arg, "--steps", "100"],
            "--steps 100 is before the checkpoint's step 240",
        ),
        (
            vec!["+p1", "--steps", "300", "--stop-after", "240"],
            "--stop-after needs --checkpoint DIR",
        ),
    ] {
        assert_usage_error(heat, &args, says);
    }

    let rest = lines_ok(heat, &["+p4", "--restart", dir_arg]);
    assert!(
        rest.iter().any(|l| l.starts_with("heat2d: restarted from")
            && l.contains("at step 240 (written by a job of 2 PEs)")),
        "{rest:?}"
    );
    assert!(
        rest.iter().any(|l| l.ends_with("steps 241..300")),
        "{rest:?}"
    );
    assert_eq!(common::heat_figures(rest), whole[12..]);
    // That restart wrote its own checkpoints, the last at step 300: restarted from it (the same
    // plate given again is no change, and is accepted) there is nothing left but the checksum.
    let again = lines_ok(heat, &[&plate[..], &["--restart", dir_arg]].concat());
    assert!(again.iter().any(|l| l.contains("at step 300")), "{again:?}");
    assert_eq!(common::heat_figures(again), whole[15..]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// heat2d's plate cut into 3 × 3 blocks relaxes as the plate in one block: the same residuals
/// (the largest change, exact whatever the cut) and the same checksum up to the order of its
/// additions (one per block, then the blocks').
#[test]
fn heat2d_computes_the_same_plate_in_one_block_and_in_nine() {
    let heat = env!("CARGO_BIN_EXE_heat2d");
    let steps = ["--steps", "30", "--every", "10"];
    let figures = |p: &str, blocks: &str, edge: &str| -> (Vec<String>, f64) {
        let mut args = vec![p, "--blocks", blocks, "--edge", edge];
        args.extend(steps);
        let got = common::heat_figures(lines_ok(heat, &args));
        let (checksum, residuals) = got
            .split_last()
            .unwrap_or_else(|| panic!("{p}: no figures"));
        let value = checksum
            .strip_prefix("field checksum: ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{p} --blocks {blocks}: {got:?}"));
        (residuals.to_vec(), value)
    };
    let (one_residuals, one) = figures("+p1", "1", "18");
    assert_eq!(one_residuals.len(), 3, "{one_residuals:?}");
    let (nine_residuals, nine) = figures("+p3", "3", "6");
    assert_eq!(nine_residuals, one_residuals);
    assert!(
        one > 0.0 && ((nine - one) / one).abs() <= 1e-12,
        "checksums {one:e} (1 block) and {nine:e} (9 blocks)"
    );
}

/// A program run directly in a Slurm batch script (one process) sees the job's
/// `SLURM_TASKS_PER_NODE` and `SLURM_LOCALID=0`: it is still alone on the host and runs a PE per
/// core. Only `srun`'s step variables say that processes share the host.
#[test]
fn a_program_run_in_a_batch_script_is_alone_on_its_host() {
    let cores_of = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_group_hello"));
        cmd.env_remove("CHARMRS_PES")
            .env_remove("SLURM_STEP_TASKS_PER_NODE")
            .envs(extra.iter().copied());
        let out = common::run(cmd, Duration::from_secs(60), |_| false).into_output();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8(out.stdout).unwrap().lines().count() - 1
    };
    let alone = cores_of(&[]);
    let batch = [
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "0"),
        ("SLURM_TASKS_PER_NODE", "16"),
        ("SLURM_NTASKS_PER_NODE", "16"),
    ];
    assert_eq!(cores_of(&batch), alone, "a batch script's variables");
    if alone >= 2 {
        // A task of an `srun` step of 2 tasks on this node: half the cores each.
        let step = [
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "2"),
        ];
        assert_eq!(cores_of(&step), alone / 2, "an srun step's variables");
    }
}
