//! `pmix_check` under Slurm's `srun --mpi=pmix`: the bootstrap, and `PMIx_Abort` ending a job
//! step on its own. Runs where a Slurm cluster answers (`ci/local-slurm start DIR` makes a
//! one-node one on this host), skipped with a note elsewhere.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// `srun --mpi=pmix --ntasks=n pmix_check args`: exit success, stdout, stderr and time taken;
/// killed (failing the test) after 60 s. No `--kill-on-bad-exit`: a task that fails does not end
/// the step by itself.
fn srun(n: u32, args: &[&str]) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new("srun")
        .args(["--mpi=pmix", "--overcommit", "--time=2"])
        .arg(format!("--ntasks={n}"))
        .arg(CHECK)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start srun");
    let mut pipes = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    let readers: Vec<_> = pipes
        .iter_mut()
        .map(|p| {
            let mut pipe = p.take().expect("pipe");
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        })
        .collect();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for srun") {
            break st;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("srun {args:?} did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let mut texts = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let (out, err) = (texts.next().unwrap(), texts.next().unwrap());
    (status.success(), out, err, took)
}

#[test]
fn srun_bootstrap_exchanges_among_all_ranks() {
    if !have_slurm("srun_bootstrap_exchanges_among_all_ranks") {
        return;
    }
    let (ok, out, err, _) = srun(3, &[]);
    assert!(ok, "{out}\n{err}");
    for r in 0..3 {
        assert!(out.contains(&format!("ok rank {r} of 3")), "{out}\n{err}");
    }
}

#[test]
fn srun_ends_the_step_on_pmix_abort() {
    if !have_slurm("srun_ends_the_step_on_pmix_abort") {
        return;
    }
    // Two ranks wait in a fence; the third aborts and then sleeps 30 s: only Slurm acting on
    // PMIx_Abort ends the step within seconds.
    let (ok, out, err, took) = srun(3, &["abort-linger"]);
    assert!(!ok, "the step succeeded\n{out}\n{err}");
    assert!(err.contains("rank 2 aborts the job on purpose"), "{err}");
    assert!(!err.contains("despite the abort"), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}\n{err}");
}
