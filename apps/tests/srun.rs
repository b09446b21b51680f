//! The programs under Slurm's `srun --mpi=pmix` (PMIx bootstrap, the machine layer
//! `CHARMRS_MACHINE` names, else the automatic choice). Built only with `--features pmix`; run
//! where a Slurm cluster answers (`ci/local-slurm start DIR` makes a one-node one on this host
//! and prints the `SLURM_CONF` to export), skipped with a note elsewhere.

#![cfg(feature = "pmix")]

mod common;

use common::Finished;
use std::process::Command;
use std::time::Duration;

/// Whether a Slurm controller answers; a note if not.
fn have_slurm() -> bool {
    let idle = Command::new("sinfo")
        .args(["-h", "-o", "%t"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !idle {
        eprintln!("SKIPPED: no Slurm cluster answers (ci/local-slurm start DIR makes one)");
    }
    idle
}

/// `srun --mpi=pmix -n n` of `bin args` with `pes` PEs per process; the test fails after 60 s.
fn srun(n: usize, pes: usize, bin: &str, args: &[&str]) -> Finished {
    srun_with(true, n, pes, bin, args)
}

/// [`srun`]; `kill_on_bad_exit`: Slurm ends the step when a task exits non-zero (else only
/// `PMIx_Abort` does).
fn srun_with(kill_on_bad_exit: bool, n: usize, pes: usize, bin: &str, args: &[&str]) -> Finished {
    let mut cmd = Command::new("srun");
    // --time: Slurm itself ends a step that hangs (killing srun would leave it running).
    cmd.args([
        "--mpi=pmix",
        "--overcommit",
        if kill_on_bad_exit {
            "--kill-on-bad-exit=1"
        } else {
            "--kill-on-bad-exit=0"
        },
        "--time=2",
    ])
    .arg(format!("--ntasks={n}"))
    .arg(format!("--export=ALL,CHARMRS_PES={pes}"))
    .arg(bin)
    .args(args);
    common::run(cmd, Duration::from_secs(60), |_| false)
}

/// Under `srun --mpi=none` (no PMI at all: Slurm's default `MpiDefault`) each task would run
/// the whole job as PE 0 of a job of its own; it refuses instead, naming the step's task count
/// and how to launch.
#[test]
fn tasks_of_an_srun_without_pmix_refuse_to_run() {
    if !have_slurm() {
        return;
    }
    let mut cmd = Command::new("srun");
    cmd.args([
        "--mpi=none",
        "--overcommit",
        "--kill-on-bad-exit=0",
        "--time=2",
        "--ntasks=2",
        "--export=ALL,CHARMRS_PES=1",
        env!("CARGO_BIN_EXE_hello"),
    ]);
    let out = common::run(cmd, Duration::from_secs(60), |_| false);
    assert!(!out.success(), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "a task ran the job: {}", out.stdout);
    assert!(
        out.stderr.contains("SLURM_STEP_NUM_TASKS=2") && out.stderr.contains("srun --mpi=pmix"),
        "{}",
        out.stderr
    );
}

#[test]
fn programs_run_under_srun() {
    if !have_slurm() {
        return;
    }
    let out = srun(2, 2, env!("CARGO_BIN_EXE_reduction"), &[]);
    assert!(out.success(), "reduction: {}", out.stderr);
    let sums: Vec<String> = (0..20).map(|x| (x * 100).to_string()).collect();
    assert_eq!(
        out.lines(),
        vec![format!("Reduction result is [{}]", sums.join(", "))]
    );
    let out = srun(3, 2, env!("CARGO_BIN_EXE_group_hello"), &[]);
    assert!(out.success(), "group_hello: {}", out.stderr);
    // Every greeting and the end, once each, in any order: srun forwards each task's output
    // separately, so a line of one process can come out after a later line of another.
    let mut got = out.lines();
    let mut expected: Vec<String> = (0..6)
        .map(|i| format!("Hi[{}] from element {i}", 17 + i))
        .chain(["All done".to_owned()])
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    let out = srun(2, 1, env!("CARGO_BIN_EXE_pmap"), &[]);
    assert!(out.success(), "pmap: {}", out.stderr);
    assert_eq!(
        out.lines(),
        vec!["Final results are [1, 4, 9, 16, 25] [1, 9, 25, 49, 81]"]
    );
}

#[test]
fn a_panic_in_one_process_ends_the_srun_job_naming_it() {
    if !have_slurm() {
        return;
    }
    // The last PE (in process 1) panics: the job step ends, non-zero, naming chare, entry, PE.
    let out = srun(2, 2, env!("CARGO_BIN_EXE_mpcheck"), &["panic"]);
    assert!(!out.success(), "the job succeeded: {}", out.stderr);
    for needle in ["Victim::fail", "PE 3", "injected failure"] {
        assert!(
            out.stderr.contains(needle),
            "`{needle}` missing: {}",
            out.stderr
        );
    }
    assert!(out.took < Duration::from_secs(20), "took {:?}", out.took);
}

#[test]
fn a_process_whose_machine_layer_cannot_start_ends_the_srun_job() {
    if !have_slurm() {
        return;
    }
    // Task 1 cannot start its TCP layer; task 0 would wait for it in a fence. Slurm does not
    // end the step for a failed task here: only the PMIx_Abort the failing process sends does.
    let script = format!(
        "if [ \"$SLURM_PROCID\" = 1 ]; then export CHARMRS_TCP_IFACE=nope0; fi; \
         exec {} +machine tcp",
        env!("CARGO_BIN_EXE_hello")
    );
    let out = srun_with(false, 2, 1, "sh", &["-c", &script]);
    assert!(!out.success(), "the job succeeded: {}", out.stderr);
    assert!(
        out.stderr.contains("CHARMRS_TCP_IFACE=nope0"),
        "{}",
        out.stderr
    );
    assert!(out.took < Duration::from_secs(30), "took {:?}", out.took);
}
