//! The programs under OpenMPI's `mpirun` (PMIx bootstrap, TCP machine layer). Built only with
//! `--features pmix`; skipped (with a note) where `mpirun` is not installed.

#![cfg(feature = "pmix")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn mpirun(n: usize, bin: &str) -> Option<Vec<String>> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("SKIPPED: mpirun is not installed (Debian: openmpi-bin)");
        return None;
    }
    let tmp = std::env::temp_dir().join(format!("charmrs-mpirun-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut child = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            &n.to_string(),
        ])
        .args([
            "--mca",
            "btl_tcp_if_include",
            "lo",
            "--mca",
            "oob_tcp_if_include",
            "lo",
        ])
        .args(["-x", "CHARMRS_PES=2", bin])
        .env("TMPDIR", &tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("mpirun -n {n} {bin} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        out.status.success(),
        "mpirun -n {n} {bin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
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
    assert_eq!(got.len(), 7);
    assert_eq!(got[6], "All done");
}

#[test]
fn processes_with_different_pe_counts_are_refused_naming_both() {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("SKIPPED: mpirun is not installed (Debian: openmpi-bin)");
        return;
    }
    // Two programs in one job (MPMD): process 0 with 2 PEs, process 1 with 1.
    let bin = env!("CARGO_BIN_EXE_reduction");
    let mut child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe"])
        .args(["--mca", "btl_tcp_if_include", "lo"])
        .args(["--mca", "oob_tcp_if_include", "lo"])
        .args(["-n", "1", "-x", "CHARMRS_PES=2", bin, ":"])
        .args(["-n", "1", "-x", "CHARMRS_PES=1", bin])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("a job with different PE counts per process hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job ran: {err}");
    assert!(
        err.contains("process 1 runs 1 PEs, process 0 runs 2"),
        "stderr: {err}"
    );
}
