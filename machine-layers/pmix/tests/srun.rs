//! `pmix_check` under Slurm's `srun --mpi=pmix`: the bootstrap, and `PMIx_Abort` ending a job
//! step on its own. Runs where a Slurm cluster answers (`ci/local-slurm start DIR` makes a
//! one-node one on this host), skipped with a note elsewhere.

mod common;

use common::{run, Done};
use std::process::Command;
use std::time::Duration;

const CHECK: &str = env!("CARGO_BIN_EXE_pmix_check");

/// Whether a Slurm controller answers; a note if not.
fn have_slurm(test: &str) -> bool {
    let answers = Command::new("sinfo")
        .args(["-h", "-o", "%t"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !answers {
        eprintln!("SKIPPED {test}: no Slurm cluster answers (ci/local-slurm start DIR makes one)");
    }
    answers
}

/// `srun --mpi=pmix --ntasks=n pmix_check args` under [`common::run`]'s watchdog. No
/// `--kill-on-bad-exit`: a task that fails does not end the step by itself.
fn srun(n: u32, args: &[&str]) -> Done {
    let mut cmd = Command::new("srun");
    cmd.args(["--mpi=pmix", "--overcommit", "--time=2"])
        .arg(format!("--ntasks={n}"))
        .arg(CHECK)
        .args(args);
    run(cmd, |_| false)
}

#[test]
fn srun_bootstrap_exchanges_among_all_ranks() {
    if !have_slurm("srun_bootstrap_exchanges_among_all_ranks") {
        return;
    }
    let done = srun(3, &[]);
    assert!(
        done.status.is_some_and(|s| s.success()),
        "{}",
        done.report()
    );
    for r in 0..3 {
        let line = format!("ok rank {r} of 3");
        assert!(done.stdout.contains(&line), "{}", done.report());
    }
}

#[test]
fn srun_ends_the_step_on_pmix_abort() {
    if !have_slurm("srun_ends_the_step_on_pmix_abort") {
        return;
    }
    // Two ranks wait in a fence; the third aborts and then sleeps 30 s: only Slurm acting on
    // PMIx_Abort ends the step within seconds.
    let done = srun(3, &["abort-linger"]);
    let report = done.report();
    assert!(
        !done.status.is_some_and(|s| s.success()),
        "the step succeeded\n{report}"
    );
    assert!(
        done.stderr.contains("rank 2 aborts the job on purpose"),
        "{report}"
    );
    assert!(!done.stderr.contains("despite the abort"), "{report}");
    assert!(done.took < Duration::from_secs(20), "{report}");
}
