//! `pmix_check` under Slurm's `srun --mpi=pmix`: the bootstrap, `PMIx_Abort` ending a job
//! step on its own, and fences that time out (then abort) when a task died before its fence. Runs where a Slurm cluster answers (`ci/local-slurm start DIR` makes a
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

/// `srun --mpi=pmix --kill-on-bad-exit=0 --ntasks=n` of a shell that kills itself (SIGKILL) in
/// task `victim` and runs `pmix_check args` in the others, with a fence timeout of
/// `fence_timeout` seconds. Slurm does not end the step when the victim dies: the others wait in
/// their first fence, up to the step's time limit (2 minutes) if nothing else bounds it.
fn srun_with_a_dead_task(n: u32, victim: u32, fence_timeout: u32, args: &[&str]) -> Done {
    let script =
        format!("if [ \"$SLURM_PROCID\" = {victim} ]; then kill -9 $$; fi; exec \"$0\" \"$@\"");
    let mut cmd = Command::new("srun");
    cmd.args([
        "--mpi=pmix",
        "--overcommit",
        "--time=2",
        "--kill-on-bad-exit=0",
    ])
    .arg(format!("--ntasks={n}"))
    .env("CHARMRS_PMIX_FENCE_TIMEOUT", fence_timeout.to_string())
    .args(["sh", "-c", &script, CHECK])
    .args(args);
    run(cmd, |_| false)
}

#[test]
fn srun_fence_times_out_when_a_task_dies_before_it() {
    if !have_slurm("srun_fence_times_out_when_a_task_dies_before_it") {
        return;
    }
    // Ranks 0 and 1 put their values and enter the first fence; rank 2 is gone.
    let done = srun_with_a_dead_task(3, 2, 3, &[]);
    let report = done.report();
    assert!(
        !done.status.is_some_and(|s| s.success()),
        "the step succeeded\n{report}"
    );
    for r in 0..2 {
        let line = format!(
            "pmix_check: rank {r}: fence: bootstrap failed: PMIx_Fence (fence 1 of rank {r}, \
             all ranks, PMIX_COLLECT_DATA, PMIX_TIMEOUT 3 s) timed out"
        );
        assert!(done.stderr.contains(&line), "no {line:?}\n{report}");
    }
    assert!(
        done.stderr.contains("CHARMRS_PMIX_FENCE_TIMEOUT"),
        "{report}"
    );
    // 3 s of fence timeout, then the tasks exit: well within the time limit (and the watchdog).
    assert!(done.took < Duration::from_secs(20), "{report}");
}

#[test]
fn srun_aborts_the_step_after_a_fence_timed_out() {
    if !have_slurm("srun_aborts_the_step_after_a_fence_timed_out") {
        return;
    }
    // Ranks 0 and 1 time out in their fence, abort through the bootstrap (as the runtime does
    // when its start-up fails) and sleep 30 s: only Slurm acting on PMIx_Abort ends the step
    // quickly, so the abort works after a failed fence.
    let done = srun_with_a_dead_task(3, 2, 3, &["fence-abort"]);
    let report = done.report();
    assert!(
        !done.status.is_some_and(|s| s.success()),
        "the step succeeded\n{report}"
    );
    assert!(
        done.stderr.contains("the fence failed after") && done.stderr.contains("timed out"),
        "{report}"
    );
    assert!(
        done.stderr.contains("aborts after its fence failed"),
        "{report}"
    );
    assert!(done.took < Duration::from_secs(20), "{report}");
}
