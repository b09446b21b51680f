//! The programs under OpenMPI's `mpirun` (PMIx bootstrap, TCP machine layer). Built only with
//! `--features pmix`; skipped (with a note) where `mpirun` is not installed.

#![cfg(feature = "pmix")]

mod common;

use common::Finished;
use std::process::Command;
use std::time::Duration;

/// Runs `mpirun` (as root if need be, oversubscribed, loopback only) with `args`: the test fails
/// if it takes more than 60 s. `None` (with a note) where `mpirun` is not installed.
///
/// OpenMPI 4.1.4's `mpirun` may hang while tearing down a job that failed, after every process
/// of the job is gone (its children left as zombies): once none of the job's programs has run for
/// 5 s, `mpirun` is killed and the job counts as failed ([`Finished::status`] `None`, with a note).
fn run_mpirun(args: &[&str]) -> Option<Finished> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("SKIPPED: mpirun is not installed (Debian: openmpi-bin)");
        return None;
    }
    // One `mpirun` at a time: with several at once on this 2-core host, OpenMPI 4.1 once
    // reported a process of one of them as "exiting improperly" with PID 0 (never started),
    // the program having printed nothing.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // A temporary directory of its own per run (tests run concurrently, and each removes its).
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("charmrs-mpirun-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe"])
        .args(["--mca", "btl_tcp_if_include", "lo"])
        .args(["--mca", "oob_tcp_if_include", "lo"])
        .args(args)
        .env("TMPDIR", &tmp);
    let programs: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| a.starts_with('/'))
        .collect();
    let done = common::run(
        cmd,
        Duration::from_secs(60),
        common::launcher_lingers(&programs),
    );
    if done.status.is_none() {
        eprintln!(
            "note: mpirun {args:?} had not exited 5 s after its processes ended (a known \
             OpenMPI 4.1 teardown hang); it was killed"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Some(done)
}

/// The lines `bin` prints as a job of `n` processes of 2 PEs under `mpirun`.
fn mpirun(n: usize, bin: &str) -> Option<Vec<String>> {
    let out = run_mpirun(&["-n", &n.to_string(), "-x", "CHARMRS_PES=2", bin])?;
    assert!(out.success(), "mpirun -n {n} {bin}: {}", out.stderr);
    Some(out.lines())
}

#[test]
fn programs_run_under_mpirun() {
    let Some(got) = mpirun(2, env!("CARGO_BIN_EXE_reduction")) else {
        return;
    };
    let sums: Vec<String> = (0..20).map(|x| (x * 100).to_string()).collect();
    assert_eq!(
        got,
        vec![format!("Reduction result is [{}]", sums.join(", "))]
    );
    let got = mpirun(2, env!("CARGO_BIN_EXE_pmap")).unwrap();
    assert_eq!(
        got,
        vec!["Final results are [1, 4, 9, 16, 25] [1, 9, 25, 49, 81]"]
    );
    let got = mpirun(3, env!("CARGO_BIN_EXE_group_hello")).unwrap();
    assert_ring(got, 6);
}

/// `group_hello`'s output over `pes` PEs: every greeting and the end, once each. Not in order:
/// mpirun forwards each process's output through a pipe of its own, so a line of one process can
/// come out after a later line of another.
fn assert_ring(mut got: Vec<String>, pes: usize) {
    let mut expected: Vec<String> = (0..pes)
        .map(|i| format!("Hi[{}] from element {i}", 17 + i))
        .chain(["All done".to_owned()])
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "{pes} PEs expected");
}

#[test]
fn processes_sharing_a_host_split_its_cores_when_not_told_how_many_pes() {
    // No +p, no CHARMRS_PES, no binding: each of the host's processes takes its share of the
    // cores it sees (before, every process ran a PE per core: n times too many).
    // The cores this process may run on, as the runtime counts them (its affinity mask).
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned();
    let cores: usize = list
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((lo, hi)) => hi.parse::<usize>().unwrap() - lo.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum();
    for n in [2usize, 3] {
        let Some(out) = run_mpirun(&[
            "-n",
            &n.to_string(),
            "--bind-to",
            "none",
            env!("CARGO_BIN_EXE_group_hello"),
        ]) else {
            return;
        };
        assert!(out.success(), "mpirun -n {n}: {}", out.stderr);
        assert_ring(out.lines(), n * (cores / n).max(1));
    }
    // Bound to a core each by mpirun: a slice of its own, filled (one PE each here).
    if cores >= 2 {
        let Some(out) = run_mpirun(&[
            "-n",
            "2",
            "--bind-to",
            "core",
            env!("CARGO_BIN_EXE_group_hello"),
        ]) else {
            return;
        };
        assert!(out.success(), "mpirun --bind-to core: {}", out.stderr);
        assert_ring(out.lines(), 2);
    }
}

#[test]
fn processes_with_different_pe_counts_are_refused_naming_both() {
    // Two programs in one job (MPMD): process 0 with 2 PEs, process 1 with 1. Three jobs:
    // OpenMPI 4.1's `mpirun` hung or crashed in about one in four of these while charmrs called
    // `PMIx_Abort` (see `PmixBootstrap::abort`).
    for _ in 0..3 {
        let bin = env!("CARGO_BIN_EXE_reduction");
        let Some(out) = run_mpirun(&[
            "-n",
            "1",
            "-x",
            "CHARMRS_PES=2",
            bin,
            ":",
            "-n",
            "1",
            "-x",
            "CHARMRS_PES=1",
            bin,
        ]) else {
            return;
        };
        let err = &out.stderr;
        assert!(!out.success(), "the job ran: {err}");
        assert!(
            err.contains("process 1 runs 1 PEs, process 0 runs 2"),
            "stderr: {err}"
        );
    }
}

#[test]
fn a_panic_in_one_process_ends_the_job_under_mpirun_naming_it() {
    // The last PE (in process 1) panics; the job must end, non-zero, naming chare, entry and PE.
    let Some(out) = run_mpirun(&[
        "-n",
        "2",
        "-x",
        "CHARMRS_PES=2",
        env!("CARGO_BIN_EXE_mpcheck"),
        "panic",
    ]) else {
        return;
    };
    let err = &out.stderr;
    assert!(!out.success(), "the job succeeded: {err}");
    for needle in ["Victim::fail", "PE 3", "injected failure"] {
        assert!(err.contains(needle), "`{needle}` missing: {err}");
    }
}
