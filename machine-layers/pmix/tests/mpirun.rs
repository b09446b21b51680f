//! `pmix_check` started by OpenMPI's `mpirun` (a real PMIx launcher) on
//! loopback, 2 and 4 processes: PMIx bootstrap, job secret, TCP layer,
//! rank-to-all exchange; the one-call `tcp_layer_from_env`; and a job
//! aborted through `PMIx_Abort`. Every job
//! runs under a watchdog: after `common::WATCHDOG` mpirun and every process it
//! started are killed and the test fails. The mpirun tests are skipped,
//! with a note on stderr, when `mpirun` is not installed (Debian:
//! `apt-get install openmpi-bin`).

mod common;

use common::{descendants, run};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHECK: &str = env!("CARGO_BIN_EXE_pmix_check");

/// True if `mpirun` can be started; otherwise prints why the test is
/// skipped.
fn have_mpirun(test: &str) -> bool {
    match Command::new("mpirun")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "SKIPPED {test}: mpirun is not available ({e}); install OpenMPI \
                 (Debian: apt-get install openmpi-bin) to run it"
            );
            false
        }
    }
}

/// A fresh temporary directory for one mpirun: OpenMPI keeps its session
/// directory (with PMIx's shared-memory store, several MB) under `$TMPDIR`,
/// and a killed mpirun leaves it behind; [`run`] removes it afterwards.
fn session_tmpdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "charmrs-pmix-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).expect("create a temporary directory");
    d
}

/// The command line that starts `n` copies of `pmix_check ARGS` on this
/// host, on loopback only, as root or not, with `CHARMRS_PES=2` exported.
fn mpirun(n: u32, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.env("TMPDIR", session_tmpdir());
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        &n.to_string(),
        "--mca",
        "btl_tcp_if_include",
        "lo",
        "--mca",
        "oob_tcp_if_include",
        "lo",
        "-x",
        "CHARMRS_PES=2",
        CHECK,
    ])
    .args(args)
    // The variable forms of --allow-run-as-root (OpenMPI 4 wants both;
    // harmless as a normal user), and no MPI transports beyond loopback
    // TCP should anything initialise MPI.
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("OMPI_MCA_btl", "self,tcp");
    // A PMIx environment of an enclosing job must not leak into ours.
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("PMIX_")) {
            c.env_remove(k);
        }
    }
    c
}

fn check_job(n: u32) {
    let test = format!("mpirun_{n}_ranks");
    if !have_mpirun(&test) {
        return;
    }
    let done = run(mpirun(n, &[]), |_| false);
    let report = done.report();
    assert!(done.status.is_some_and(|s| s.success()), "{report}");
    for r in 0..n {
        let line = format!("ok rank {r} of {n}");
        let count = done.stdout.lines().filter(|l| l.trim() == line).count();
        assert_eq!(count, 1, "expected one {line:?}\n{report}");
    }
    assert_eq!(
        done.stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        n as usize,
        "{report}"
    );
    // What PMIx said about the job, and the PE count from the environment.
    let infos: Vec<&str> = done
        .stdout
        .lines()
        .filter(|l| l.starts_with("info rank "))
        .collect();
    assert_eq!(infos.len(), n as usize, "{report}");
    for l in infos {
        assert!(l.contains(&format!(" size={n} ")), "{l}");
        assert!(l.contains(&format!(" local_size=Some({n}) ")), "{l}");
        assert!(l.contains(" ppn=Some(2) "), "{l}");
    }
}

/// `Bootstrap::abort` and the exit that follows bring the whole job down
/// promptly, the others being stuck in a fence.
///
/// Under `mpirun` the abort does not call `PMIx_Abort` (OpenMPI 4.1.4 with
/// PMIx 4.2.2, Debian 12, sometimes deadlocks in `PMIx_server_finalize`, or
/// crashes, while tearing down a job aborted that way); the test still
/// passes once all `pmix_check` processes have died, and then kills a
/// lingering mpirun, so that a teardown hang shows as a note, not a failure.
#[test]
fn mpirun_abort_stops_the_job() {
    if !have_mpirun("mpirun_abort_stops_the_job") {
        return;
    }
    // Once every rank is gone, mpirun gets 5 s to exit by itself.
    let seen = std::cell::Cell::new(false);
    let gone_at = std::cell::Cell::new(None::<Instant>);
    let done = run(mpirun(3, &["abort"]), |pid| {
        let live = descendants(pid)
            .iter()
            .filter(|d| d.1 == "pmix_check")
            .count();
        if live > 0 {
            seen.set(true);
            return false;
        }
        if !seen.get() {
            return false;
        }
        let t = gone_at.get().unwrap_or_else(Instant::now);
        gone_at.set(Some(t));
        t.elapsed() > Duration::from_secs(5)
    });
    let report = done.report();
    if done.status.is_none() {
        eprintln!(
            "note: every rank was gone but mpirun had not exited 5 s later \
             (a known OpenMPI 4.1 teardown hang); it was killed"
        );
    }
    assert!(!done.status.is_some_and(|s| s.success()), "{report}");
    assert!(done.took < Duration::from_secs(20), "{report}");
    // Not asserted here (it is under srun, where the abort is `PMIx_Abort`): that the others'
    // fence fails. Under mpirun the abort is the aborting rank's exit, and OpenPMIx may complete
    // a fence without a member whose exit it saw before the others entered it (seen once in a
    // clean-clone CI run, stop 33: ranks 0 and 1 got Ok and exited with status 6, and mpirun
    // ended the job with a non-zero status all the same). What charmrs relies on is asserted:
    // the job ends, promptly and failed, naming the aborting rank.
    assert!(
        done.stderr.contains("rank 2 aborts the job on purpose"),
        "{report}"
    );
    assert!(
        done.stdout.lines().all(|l| !l.starts_with("ok ")),
        "{report}"
    );
}

/// The one-call set-up, `tcp_layer_from_env`, under mpirun.
#[test]
fn mpirun_tcp_layer_from_env() {
    if !have_mpirun("mpirun_tcp_layer_from_env") {
        return;
    }
    let n = 3;
    let done = run(mpirun(n, &["layer"]), |_| false);
    let report = done.report();
    assert!(done.status.is_some_and(|s| s.success()), "{report}");
    for r in 0..n {
        let line = format!("ok rank {r} of {n}");
        assert_eq!(
            done.stdout.lines().filter(|l| l.trim() == line).count(),
            1,
            "expected one {line:?}\n{report}"
        );
    }
}

#[test]
fn mpirun_2_ranks() {
    check_job(2);
}

#[test]
fn mpirun_4_ranks() {
    check_job(4);
}

/// Outside a launcher `pmix_check` says so and exits 2 (no PMIx call).
#[test]
fn without_launcher_exits_cleanly() {
    let mut c = Command::new(CHECK);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("PMIX_")) {
            c.env_remove(k);
        }
    }
    let done = run(c, |_| false);
    assert_eq!(
        done.status.and_then(|s| s.code()),
        Some(2),
        "{}",
        done.report()
    );
    assert!(
        done.stderr.contains("not started by a PMIx launcher"),
        "{}",
        done.stderr
    );
}

/// A PMIx environment whose server is gone: the error names `PMIx_Init`
/// and its status, promptly (no hang).
#[test]
fn stale_pmix_environment_fails_naming_pmix_init() {
    let mut c = Command::new(CHECK);
    c.env("PMIX_NAMESPACE", "charmrs-test-no-such-job")
        .env("PMIX_RANK", "0")
        .env(
            "PMIX_SERVER_URI41",
            "charmrs-test-no-such-job.0;tcp4://127.0.0.1:1",
        );
    let done = run(c, |_| false);
    assert_eq!(
        done.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        done.report()
    );
    assert!(
        done.stderr.contains("PMIx_Init failed"),
        "stderr: {}",
        done.stderr
    );
    assert!(done.took < Duration::from_secs(20), "took {:?}", done.took);
}
