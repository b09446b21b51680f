//! The real `charmrun` binary starting real processes of
//! `charmrs-tcp-check` (and of `sh`), which talk over the TCP layer on
//! loopback. Every job runs under a watchdog: a hang kills charmrun (its
//! processes follow through their lifeline, or the parent-death signal) and
//! fails the test.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const CHARMRUN: &str = env!("CARGO_BIN_EXE_charmrun");
const CHECK: &str = env!("CARGO_BIN_EXE_charmrs-tcp-check");

/// Longest any job here may take.
const WATCHDOG: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

type Line = (Instant, Stream, String);

/// Where charmrun is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// In the test's process group.
    Inherited,
    /// Leading a process group of its own, in the test's session (as a shell's job).
    OwnGroup,
    /// Leading a session of its own: its process group is orphaned (its parent, the test, is
    /// in another session).
    OwnSession,
    /// As `OwnGroup`, started with SIGCONT ignored.
    OwnGroupContIgnored,
}

/// A running charmrun whose output is read line by line, timestamped.
struct Live {
    child: Child,
    rx: Receiver<Line>,
    lines: Vec<Line>,
    started: Instant,
}

/// How a job ended.
#[derive(Debug)]
struct Done {
    status: i32,
    ended: Instant,
    lines: Vec<Line>,
}

impl Done {
    fn text(&self, which: Stream) -> String {
        self.lines
            .iter()
            .filter(|l| l.1 == which)
            .map(|l| format!("{}\n", l.2))
            .collect()
    }
    fn out(&self) -> String {
        self.text(Stream::Out)
    }
    fn err(&self) -> String {
        self.text(Stream::Err)
    }
    /// Stdout lines starting with `prefix`.
    fn count(&self, prefix: &str) -> usize {
        self.lines
            .iter()
            .filter(|l| l.1 == Stream::Out && l.2.starts_with(prefix))
            .count()
    }
}

impl Live {
    fn start(args: &[&str]) -> Live {
        Live::start_cmd(CHARMRUN, args)
    }

    fn start_cmd(prog: &str, args: &[&str]) -> Live {
        Live::start_with(prog, args, Placement::Inherited)
    }

    /// Charmrun leading a process group of its own (as a shell's job), which a test may signal
    /// as a whole without signalling itself.
    fn start_in_own_group(args: &[&str]) -> Live {
        Live::start_with(CHARMRUN, args, Placement::OwnGroup)
    }

    fn start_with(prog: &str, args: &[&str], placement: Placement) -> Live {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(prog);
        match placement {
            Placement::Inherited => {}
            Placement::OwnGroup => {
                cmd.process_group(0);
            }
            Placement::OwnSession => {
                // SAFETY: the closure runs in the child between fork and exec and makes one
                // async-signal-safe system call (`setsid`).
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::setsid() == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            Placement::OwnGroupContIgnored => {
                cmd.process_group(0);
                // SAFETY: the closure runs in the child between fork and exec and makes one
                // async-signal-safe call (`signal`, to ignore SIGCONT).
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::signal(libc::SIGCONT, libc::SIG_IGN) == libc::SIG_ERR {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start charmrun");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for (pipe, which) in [
            (Box::new(out) as Box<dyn std::io::Read + Send>, Stream::Out),
            (Box::new(err), Stream::Err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((Instant::now(), which, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Live {
            child,
            rx,
            lines: Vec::new(),
            started: Instant::now(),
        }
    }

    fn deadline(&self) -> Instant {
        self.started + WATCHDOG
    }

    /// Waits for a line matching `pred`; fails the test at the watchdog.
    fn wait_line(&mut self, pred: impl Fn(&Line) -> bool) -> Line {
        if let Some(l) = self.lines.iter().find(|l| pred(l)) {
            return l.clone();
        }
        loop {
            let left = self.deadline().saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.lines.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "watchdog: expected line never came; output so far:\n{}",
                    self.dump()
                ),
            }
        }
    }

    fn dump(&self) -> String {
        self.lines
            .iter()
            .map(|l| format!("{:?}: {}\n", l.1, l.2))
            .collect()
    }

    /// Waits for charmrun to exit and its output to end.
    fn finish(mut self) -> Done {
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() > self.deadline() {
                let _ = self.child.kill();
                panic!(
                    "watchdog: charmrun did not finish; output:\n{}",
                    self.dump()
                );
            }
            while let Ok(l) = self.rx.try_recv() {
                self.lines.push(l);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let ended = Instant::now();
        loop {
            let left = self.deadline().saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.lines.push(l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("watchdog: output never closed:\n{}", self.dump())
                }
            }
        }
        Done {
            status: status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            ended,
            lines: std::mem::take(&mut self.lines),
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // On a failed test: take charmrun down (its processes follow).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> Done {
    Live::start(args).finish()
}

fn pid_alive(pid: u32) -> bool {
    // A zombie waiting for its reaper counts as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The state letter of `/proc/<pid>/stat` ('T': stopped), `None` if it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == key {
            return it.next().unwrap_or("");
        }
    }
    ""
}

// ---------------------------------------------------------------- usage

#[test]
fn unknown_option_is_a_usage_error_listing_the_valid_ones() {
    let d = run(&["+p2", "++nodelist", "hosts", CHECK, "env"]);
    assert_eq!(d.status, 2);
    let err = d.err();
    assert!(err.contains("++nodelist"), "{err}");
    for opt in ["+p", "++ppn", "++quiet", "++help"] {
        assert!(err.contains(opt), "valid option {opt} not listed: {err}");
    }
    assert!(d.out().is_empty());
}

#[test]
fn ppn_must_divide_the_pe_count_and_a_program_is_required() {
    let d = run(&["+p4", "++ppn", "3", CHECK, "env"]);
    assert_eq!(d.status, 2);
    assert!(d.err().contains("does not divide"), "{}", d.err());
    let d = run(&["+p4"]);
    assert_eq!(d.status, 2);
    assert!(d.err().contains("no program"), "{}", d.err());
    let d = run(&["++help"]);
    assert_eq!(d.status, 0);
    assert!(d.out().contains("usage: charmrun"));
}

/// A huge `+p` is a usage error naming the limit, not an allocation failure of charmrun.
#[test]
fn pe_and_process_counts_beyond_the_limits_are_usage_errors() {
    let d = run(&["+p4294967295", "++ppn", "1", "/nonexistent"]);
    assert_eq!(d.status, 2, "{}", d.err());
    assert!(
        d.err().contains("+p4294967295") && d.err().contains("16777216"),
        "{}",
        d.err()
    );
    let d = run(&["+p100000", "++ppn", "1", "/nonexistent"]);
    assert_eq!(d.status, 2, "{}", d.err());
    assert!(d.err().contains("100000 processes"), "{}", d.err());
}

#[test]
fn a_program_that_cannot_start_is_reported() {
    let d = run(&["+p2", "++ppn", "1", "/nonexistent/charmrs-program"]);
    assert_eq!(d.status, 127);
    assert!(d.err().contains("cannot start"), "{}", d.err());
}

// ------------------------------------------------------- env contract

#[test]
fn environment_contract_and_argument_passthrough() {
    let d = run(&[
        "+p4",
        "++ppn",
        "2",
        CHECK,
        "env",
        "a",
        "+idlespin",
        "7",
        "--flag",
        "b c",
    ]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert!(
        d.err().contains("4 PEs in 2 processes of 2 PEs"),
        "{}",
        d.err()
    );
    let out = d.out();
    let value = |rank: u32, var: &str| -> String {
        let prefix = format!("ENV rank={rank} {var}=");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {var} for rank {rank} in:\n{out}"))
            .to_owned()
    };
    for r in 0..2 {
        assert_eq!(value(r, "CHARMRS_RANK"), r.to_string());
        assert_eq!(value(r, "CHARMRS_NPROCS"), "2");
        assert_eq!(value(r, "CHARMRS_PPN"), "2");
        assert_eq!(value(r, "CHARMRS_PES"), "2");
        assert_eq!(value(r, "CHARMRS_TOTAL_PES"), "4");
        assert!(value(r, "CHARMRS_KV_ADDR").starts_with("127.0.0.1:"));
        let secret = value(r, "CHARMRS_JOB_SECRET");
        assert_eq!(secret.len(), 64);
        assert!(secret.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(secret, value(0, "CHARMRS_JOB_SECRET"));
        // Program arguments reach it unchanged (the last one had a space).
        assert!(
            out.contains(&format!("ARGS rank={r} a +idlespin 7 --flag b c")),
            "{out}"
        );
    }
    // Charm++ style: charmrun options after the program are charmrun's.
    let d = run(&["++quiet", CHECK, "env", "x", "+p3", "++ppn", "1", "y"]);
    assert_eq!(d.status, 0);
    assert!(d.err().is_empty(), "++quiet: {}", d.err());
    assert_eq!(d.count("ARGS"), 3);
    assert!(d.out().contains("ARGS rank=2 x y"), "{}", d.out());
    // A fresh secret per job.
    let d2 = run(&["++quiet", CHECK, "env"]);
    let s = |d: &Done| {
        d.out()
            .lines()
            .find_map(|l| {
                l.strip_prefix("ENV rank=0 CHARMRS_JOB_SECRET=")
                    .map(str::to_owned)
            })
            .unwrap()
    };
    assert_ne!(s(&d), s(&d2));
}

/// charmrun inside another launcher's job (`srun -n1 charmrun …`, a shell of an `srun` or
/// `mpirun` allocation): its processes must not inherit that launcher's PMIx variables (they
/// would join the outer job, each a job of its own) nor its host placement (every process would
/// pin its PEs to the same cores); charmrun gives its own.
#[test]
fn an_outer_launchers_variables_do_not_reach_the_processes() {
    let script = "echo \"R=$CHARMRS_RANK L=$CHARMRS_LOCAL_RANK/$CHARMRS_LOCAL_SIZE \
                  P=${PMIX_RANK:-none}${PMIX_NAMESPACE:-none}${PMIX_SERVER_URI41:-none} \
                  S=${SLURM_LOCALID:-none}${SLURM_NTASKS_PER_NODE:-none} \
                  O=${OMPI_COMM_WORLD_LOCAL_RANK:-none} J=${SLURM_JOB_ID:-none}\"";
    let d = Live::start_cmd(
        "env",
        &[
            "PMIX_RANK=0",
            "PMIX_NAMESPACE=outer",
            "PMIX_SERVER_URI41=x",
            "SLURM_LOCALID=0",
            "SLURM_NTASKS_PER_NODE=1",
            "OMPI_COMM_WORLD_LOCAL_RANK=0",
            "SLURM_JOB_ID=77",
            CHARMRUN,
            "++quiet",
            "+p2",
            "++ppn",
            "1",
            "sh",
            "-c",
            script,
        ],
    )
    .finish();
    assert_eq!(d.status, 0, "{}", d.err());
    let out = d.out();
    for r in 0..2 {
        let want = format!("R={r} L={r}/2 P=nonenonenone S=nonenone O=none J=77");
        assert!(out.lines().any(|l| l == want), "{want:?} in:\n{out}");
    }
}

// --------------------------------------------------------- messaging

#[test]
fn pingpong_between_two_processes() {
    let d = run(&["+p2", "++ppn", "1", CHECK, "pingpong", "200"]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert_eq!(d.count("OK pingpong"), 2, "{}", d.out());
    assert!(d.out().contains("segments 3"));
}

#[test]
fn pingpong_among_four_processes() {
    let d = run(&["+p4", "++ppn", "1", CHECK, "pingpong", "100"]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert_eq!(d.count("OK pingpong"), 4, "{}", d.out());
}

#[test]
fn every_rank_to_all_among_four_processes() {
    let d = run(&["+p4", "++ppn", "1", CHECK, "alltoall", "300"]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert_eq!(d.count("OK alltoall"), 4, "{}", d.out());
    // Each process opened exactly one connection to each of the 3 others.
    assert_eq!(d.out().matches("connections 3").count(), 4, "{}", d.out());
}

#[test]
fn every_rank_to_all_with_two_pes_per_process() {
    let d = run(&["+p4", "++ppn", "2", CHECK, "alltoall", "300"]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert_eq!(d.count("OK alltoall"), 2, "{}", d.out());
}

#[test]
fn sixteen_processes_all_to_all() {
    let d = run(&["+p16", "++ppn", "1", "++quiet", CHECK, "alltoall", "50"]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert_eq!(d.count("OK alltoall"), 16, "{}", d.out());
    assert_eq!(d.out().matches("connections 15").count(), 16, "{}", d.out());
}

#[test]
fn remote_reads_among_three_processes() {
    let d = run(&["+p3", "++ppn", "1", CHECK, "get"]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert_eq!(d.count("OK get"), 3, "{}", d.out());
}

// ---------------------------------------------------------- failures

#[test]
fn exit_status_3_is_the_job_status_and_the_others_are_killed_fast() {
    let d = run(&["+p4", "++ppn", "1", CHECK, "exit", "1", "3"]);
    assert_eq!(d.status, 3, "{}", d.err());
    assert_eq!(d.count("WAITING"), 3, "{}", d.out());
    let (seen, _, line) = d
        .lines
        .iter()
        .find(|l| l.1 == Stream::Err && l.2.contains("exited with status 3"))
        .cloned()
        .unwrap_or_else(|| panic!("no failure message:\n{}", d.err()));
    assert!(line.contains("rank 1") && line.contains("pid "), "{line}");
    // The waiting processes would never exit: charmrun killed them.
    assert!(
        d.ended.duration_since(seen) < Duration::from_secs(5),
        "took {:?} to stop the others",
        d.ended.duration_since(seen)
    );
}

#[test]
fn plain_processes_are_killed_too() {
    // Not charmrs programs (no lifeline): rank 1 fails, the others sleep.
    let script = "if [ \"$CHARMRS_RANK\" = 1 ]; then sleep 0.2; exit 3; fi; exec sleep 60";
    let t = Instant::now();
    let d = run(&["+p3", "++ppn", "1", "sh", "-c", script]);
    assert_eq!(d.status, 3, "{}", d.err());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(d.err().contains("rank 1"), "{}", d.err());
}

#[test]
fn a_process_ending_well_without_joining_ends_the_job_instead_of_a_hang() {
    // Rank 1 is not a charmrs program and exits at once; rank 0 joins and waits for it.
    let script = format!("if [ \"$CHARMRS_RANK\" = 1 ]; then exit 0; fi; exec {CHECK} pingpong 10");
    let t = Instant::now();
    let d = run(&["+p2", "++ppn", "1", "sh", "-c", &script]);
    assert_ne!(d.status, 0, "{}", d.err());
    assert!(
        d.err().contains("rank 1") && d.err().contains("without joining"),
        "{}",
        d.err()
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

/// A rank that hangs before it even starts its bootstrap (here a wrapper that sleeps instead of
/// starting the program) ends the job at the fence timeout, with a message naming it.
#[test]
fn a_rank_that_never_joins_ends_the_job_at_the_fence_timeout() {
    let script =
        format!("if [ \"$CHARMRS_RANK\" = 1 ]; then exec sleep 300; fi; exec {CHECK} pingpong 10");
    let t = Instant::now();
    let d = Live::start_cmd(
        "env",
        &[
            "CHARMRS_KV_FENCE_TIMEOUT=2",
            CHARMRUN,
            "+p3",
            "++ppn",
            "1",
            "sh",
            "-c",
            &script,
        ],
    )
    .finish();
    let took = t.elapsed();
    assert_eq!(d.status, 1, "{}", d.err());
    let err = d.err();
    assert!(
        err.contains("did not all reach a bootstrap fence within 2s")
            && err.contains("CHARMRS_KV_FENCE_TIMEOUT")
            && err.contains("rank 1 (pid ")
            && err.contains("never joined the job")
            && !err.contains("rank 0 (pid")
            && !err.contains("rank 2 (pid"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "took {took:?}"
    );
}

/// A rank that joins the job and then hangs before the start-up fence: the same, and the
/// message says it joined.
#[test]
fn a_rank_that_joins_but_never_reaches_the_fence_ends_the_job() {
    let t = Instant::now();
    let mut live = Live::start_cmd(
        "env",
        &[
            "CHARMRS_KV_FENCE_TIMEOUT=2",
            CHARMRUN,
            "+p3",
            "++ppn",
            "1",
            CHECK,
            "stall",
            "2",
        ],
    );
    let (_, _, stalled) = live.wait_line(|l| l.1 == Stream::Out && l.2.starts_with("STALLING"));
    let pid = field(&stalled, "pid").to_owned();
    let d = live.finish();
    let took = t.elapsed();
    assert_eq!(d.status, 1, "{}", d.err());
    let err = d.err();
    assert!(
        err.contains(&format!(
            "rank 2 (pid {pid}) joined the job but did not reach the fence"
        )) && err.contains("within 2s"),
        "{err}"
    );
    // The waiting ranks say why they failed; the stalled one was killed.
    assert!(err.contains("fence timed out after 2s"), "{err}");
    assert!(
        err.contains(&format!("killing rank 2 (pid {pid})")),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "took {took:?}"
    );
}

#[test]
fn a_bad_fence_timeout_is_a_usage_error_naming_the_variable() {
    let d = Live::start_cmd(
        "env",
        &["CHARMRS_KV_FENCE_TIMEOUT=soon", CHARMRUN, CHECK, "env"],
    )
    .finish();
    assert_eq!(d.status, 2, "{}", d.err());
    assert!(
        d.err().contains(
            "CHARMRS_KV_FENCE_TIMEOUT=\"soon\" is not a positive whole number of seconds"
        ),
        "{}",
        d.err()
    );
    assert!(d.out().is_empty(), "no process started: {}", d.out());
}

#[test]
fn a_killed_process_is_reported_lost_by_the_survivors_within_5s() {
    let mut live = Live::start(&["+p3", "++ppn", "1", CHECK, "peerlost", "1"]);
    let (_, _, victim) = live.wait_line(|l| l.1 == Stream::Out && l.2.starts_with("VICTIM"));
    let pid = field(&victim, "pid").to_owned();
    let killed_at = Instant::now();
    let victim: libc::pid_t = pid.parse().expect("pid");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(victim, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
    let mut reports = Vec::new();
    for _ in 0..2 {
        let seen = live.wait_line(|l| {
            l.1 == Stream::Out
                && l.2.starts_with("PEERLOST")
                && !reports.iter().any(|r: &Line| r.2 == l.2)
        });
        reports.push(seen);
    }
    for (at, _, line) in &reports {
        assert_eq!(field(line, "process"), "1", "{line}");
        let after = at.duration_since(killed_at);
        assert!(
            after < Duration::from_secs(5),
            "reported after {after:?}: {line}"
        );
    }
    let d = live.finish();
    assert_eq!(d.status, 128 + 9, "{}", d.err());
    let err = d.err();
    assert!(
        err.contains(&format!("rank 1 (pid {pid}) was killed by signal 9")),
        "{err}"
    );
}

#[test]
fn abort_reaches_peers_and_launcher() {
    let d = run(&["+p3", "++ppn", "1", CHECK, "abort", "2"]);
    assert_eq!(d.status, 5, "{}", d.err());
    assert!(
        d.err().contains("rank 2") && d.err().contains("aborted the job: check abort from rank 2"),
        "{}",
        d.err()
    );
    assert_eq!(d.count("ABORT-SEEN"), 2, "{}", d.out());
}

#[test]
fn an_aborting_process_that_lingers_is_killed_and_the_status_is_the_aborts() {
    // Rank 2 aborts and sleeps: charmrun's SIGKILL after the grace ends it, and must not make
    // the job's status 128 + 9.
    let t = Instant::now();
    let d = run(&["+p3", "++ppn", "1", CHECK, "abort-linger", "2"]);
    assert_eq!(d.status, 1, "{}", d.err());
    assert!(
        d.err().contains("rank 2") && d.err().contains("aborted the job: check abort from rank 2"),
        "{}",
        d.err()
    );
    assert!(d.err().contains("charmrun: killing "), "{}", d.err());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn the_processes_do_not_outlive_a_killed_charmrun() {
    let mut live = Live::start(&["+p2", "++ppn", "1", CHECK, "exit", "99", "0"]);
    let mut pids = Vec::new();
    for _ in 0..2 {
        let l = live.wait_line(|l| {
            l.1 == Stream::Out
                && l.2.starts_with("WAITING")
                && !pids.iter().any(|p: &Line| p.2 == l.2)
        });
        pids.push(l);
    }
    let pids: Vec<u32> = pids
        .iter()
        .map(|l| field(&l.2, "pid").parse().expect("pid"))
        .collect();
    live.child.kill().unwrap();
    let t = Instant::now();
    while pids.iter().any(|&p| pid_alive(p)) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "orphans {pids:?} still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ----------------------------------------------------------- signals

/// Sends `sig` to charmrun alone (not to its processes).
fn signal_charmrun(live: &Live, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(live.child.id()).expect("pid");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

/// Waits for `n` distinct stdout lines `PID <who> <pid>`; returns the pids.
fn wait_pids(live: &mut Live, n: usize) -> Vec<u32> {
    let mut seen: Vec<Line> = Vec::new();
    while seen.len() < n {
        let l = live.wait_line(|l| {
            l.1 == Stream::Out && l.2.starts_with("PID ") && !seen.iter().any(|s| s.2 == l.2)
        });
        seen.push(l);
    }
    seen.iter()
        .map(|l| l.2.rsplit(' ').next().unwrap().parse().expect("pid"))
        .collect()
}

/// Asserts that every one of `pids` is gone within `limit`.
fn assert_all_gone(pids: &[u32], limit: Duration) {
    let t = Instant::now();
    while pids.iter().any(|&p| pid_alive(p)) {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
        assert!(
            t.elapsed() < limit,
            "still alive after {limit:?}: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to charmrun alone: a plain program, wrapper scripts that do not exec and the programs
/// they run (charmrun's grandchildren) all go within a few seconds, and charmrun's status is
/// 128 + 15.
#[test]
fn sigterm_to_charmrun_stops_every_process_and_what_they_started() {
    let script = "if [ \"$CHARMRS_RANK\" = 0 ]; then echo \"PID 0 $$\"; exec sleep 300; fi; \
                  echo \"PID $CHARMRS_RANK $$\"; \
                  sh -c 'echo \"PID g$CHARMRS_RANK $$\"; exec sleep 300'; echo after";
    let mut live = Live::start(&["+p3", "++ppn", "1", "sh", "-c", script]);
    let pids = wait_pids(&mut live, 5);
    let t = Instant::now();
    signal_charmrun(&live, libc::SIGTERM);
    // Ends only once nobody holds its output: the grandchildren too.
    let d = live.finish();
    assert_eq!(d.status, 128 + 15, "{}", d.err());
    assert!(
        d.err()
            .contains("received SIGTERM; passing it to the 3 running processes"),
        "{}",
        d.err()
    );
    assert!(!d.out().contains("after"), "a wrapper outlived its program");
    assert_all_gone(&pids, Duration::from_secs(1));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

/// SIGINT, SIGHUP and SIGQUIT stop the job too; processes that ignore the signal are killed
/// after the grace; the status is 128 + the signal.
#[test]
fn sigint_sighup_and_sigquit_stop_the_job_even_if_the_processes_ignore_them() {
    for (sig, name) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGQUIT, "SIGQUIT"),
    ] {
        let script = "trap '' INT HUP QUIT; echo \"PID $CHARMRS_RANK $$\"; exec sleep 300";
        let mut live = Live::start(&["+p2", "++ppn", "1", "sh", "-c", script]);
        let pids = wait_pids(&mut live, 2);
        let t = Instant::now();
        signal_charmrun(&live, sig);
        let d = live.finish();
        let took = t.elapsed();
        assert_eq!(d.status, 128 + sig, "{name}: {}", d.err());
        assert!(
            d.err().contains(&format!("received {name}")) && d.err().contains("killing rank"),
            "{name}: {}",
            d.err()
        );
        assert_all_gone(&pids, Duration::from_secs(1));
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
            "{name}: took {took:?}"
        );
    }
}

/// A second signal does not wait for the grace: the processes are killed at once.
#[test]
fn a_second_signal_kills_at_once() {
    let script = "trap '' TERM; echo \"PID $CHARMRS_RANK $$\"; exec sleep 300";
    let mut live = Live::start(&["+p2", "++ppn", "1", "sh", "-c", script]);
    let pids = wait_pids(&mut live, 2);
    signal_charmrun(&live, libc::SIGTERM);
    live.wait_line(|l| l.1 == Stream::Err && l.2.contains("received SIGTERM"));
    let t = Instant::now();
    signal_charmrun(&live, libc::SIGTERM);
    let d = live.finish();
    assert_eq!(d.status, 128 + 15, "{}", d.err());
    assert!(d.err().contains("SIGTERM again"), "{}", d.err());
    assert_all_gone(&pids, Duration::from_secs(1));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
}

/// SIGTSTP to charmrun alone (as the terminal's ^Z, which reaches only the foreground process
/// group) stops every process and what it started, and charmrun itself; SIGCONT to charmrun
/// alone (as `fg`) resumes them all, and the job then ends normally. Also when charmrun's process
/// group is orphaned, where the kernel would discard a SIGTSTP to charmrun, and when charmrun was
/// started with SIGCONT ignored (no handler of its counts the continue).
#[test]
fn sigtstp_stops_every_process_and_sigcont_resumes_them() {
    const TICKS: usize = 25;
    // A wrapper that does not exec: its child ticks every 0.1 s.
    let script = format!(
        "echo \"PID $CHARMRS_RANK $$\"; \
         sh -c 'echo \"PID g$CHARMRS_RANK $$\"; i=0; \
                while [ $i -lt {TICKS} ]; do echo \"TICK $CHARMRS_RANK $i\"; i=$((i+1)); \
                sleep 0.1; done'; \
         echo \"DONE $CHARMRS_RANK\""
    );
    // A shell's job; then in an orphaned process group, where the kernel discards SIGTSTP:
    // charmrun stops with SIGSTOP instead; then a shell's job started with SIGCONT ignored.
    for (placement, stop) in [
        (Placement::OwnGroup, libc::SIGTSTP),
        (Placement::OwnSession, libc::SIGSTOP),
        (Placement::OwnGroupContIgnored, libc::SIGTSTP),
    ] {
        let mut live = Live::start_with(
            CHARMRUN,
            &["+p3", "++ppn", "1", "sh", "-c", &script],
            placement,
        );
        let mut pids = wait_pids(&mut live, 6);
        live.wait_line(|l| l.1 == Stream::Out && l.2.starts_with("TICK "));
        pids.push(live.child.id());
        signal_charmrun(&live, libc::SIGTSTP);
        let t = Instant::now();
        // A shell that was starting a command with vfork (as dash does) waits uninterruptibly
        // ('D') for its child, stopped before its exec, until that child is continued.
        let stopped = |pids: &[u32]| {
            pids.iter()
                .all(|&p| matches!(proc_state(p), Some('T' | 'D')))
        };
        while !stopped(&pids) {
            let states: Vec<_> = pids.iter().map(|&p| (p, proc_state(p))).collect();
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "not all stopped: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Charmrun stopped by SIGTSTP in a shell's job (a shell says "Stopped"), by SIGSTOP in
        // an orphaned group.
        // Reported once each of charmrun's threads has stopped, maybe some time after its main
        // thread shows stopped.
        let t = Instant::now();
        let (code, status) = loop {
            // SAFETY: `siginfo_t` is plain data, for which all-zero bytes are a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `info` is valid and writable; WNOWAIT leaves the stop to be reported again
            // and charmrun, our child, unreaped.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    live.child.id(),
                    &mut info,
                    libc::WSTOPPED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
            // SAFETY: `waitid` filled `info` with a child event (SIGCHLD layout), or left it
            // zeroed.
            let (code, status) = (info.si_code, unsafe { info.si_status() });
            if code != 0 || t.elapsed() > Duration::from_secs(5) {
                break (code, status);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            (code, status),
            (libc::CLD_STOPPED, stop),
            "charmrun's stop ({placement:?})"
        );
        // Stopped, they stay so: no tick while charmrun and the processes are stopped (lines
        // written before the stop are read first).
        let ticks = |live: &mut Live| {
            while let Ok(l) = live.rx.try_recv() {
                live.lines.push(l);
            }
            live.lines
                .iter()
                .filter(|l| l.2.starts_with("TICK "))
                .count()
        };
        std::thread::sleep(Duration::from_millis(200));
        let before = ticks(&mut live);
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(ticks(&mut live), before, "ticks while stopped");
        assert!(stopped(&pids), "resumed without SIGCONT");
        signal_charmrun(&live, libc::SIGCONT);
        let t = Instant::now();
        while pids.iter().any(|&p| proc_state(p) == Some('T')) {
            let states: Vec<_> = pids.iter().map(|&p| (p, proc_state(p))).collect();
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "not all resumed: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let d = live.finish();
        assert_eq!(d.status, 0, "{}", d.err());
        assert_eq!(d.count("TICK "), 3 * TICKS, "{}", d.out());
        assert_eq!(d.count("DONE "), 3, "{}", d.out());
        assert!(
            d.err()
                .contains("received SIGTSTP; stopping the 3 running processes")
                && d.err().contains("received SIGCONT; resuming"),
            "{}",
            d.err()
        );
    }
}

/// What ranks start outside an `exec` (a wrapper's background job, its child) does not outlive
/// a SIGKILL of charmrun, alone or with its whole process group (as a test harness or a batch
/// system may do): the parent-death signal reaches only the ranks, but charmrun's watch process
/// kills their process groups.
#[test]
fn what_the_processes_started_does_not_outlive_a_sigkill_of_charmrun_or_its_group() {
    for whole_group in [false, true] {
        let script = "sleep 300 & echo \"PID b$CHARMRS_RANK $!\"; \
                      sh -c 'echo \"PID g$CHARMRS_RANK $$\"; exec sleep 300' & \
                      echo \"PID $CHARMRS_RANK $$\"; wait";
        let mut live = Live::start_in_own_group(&["+p2", "++ppn", "1", "sh", "-c", script]);
        let pids = wait_pids(&mut live, 6);
        let charmrun = libc::pid_t::try_from(live.child.id()).expect("pid");
        let target = if whole_group { -charmrun } else { charmrun };
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; the target is
        // our unreaped child, or the process group it leads (not ours).
        let rc = unsafe { libc::kill(target, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill {target}: {}", std::io::Error::last_os_error());
        assert_all_gone(&pids, Duration::from_secs(5));
        // Nothing holds charmrun's output any more: the watch process neither.
        let d = live.finish();
        assert_eq!(d.status, 128 + 9, "whole group {whole_group}: {}", d.err());
    }
}

/// Programs without the bootstrap's lifeline do not outlive a charmrun killed by SIGKILL
/// either (the kernel kills them: parent-death signal).
#[test]
fn plain_processes_do_not_outlive_a_killed_charmrun() {
    let script = "echo \"PID $CHARMRS_RANK $$\"; exec sleep 300";
    let mut live = Live::start(&["+p2", "++ppn", "1", "sh", "-c", script]);
    let pids = wait_pids(&mut live, 2);
    live.child.kill().unwrap();
    assert_all_gone(&pids, Duration::from_secs(5));
}

// ---------------------------------------------------------- security

#[test]
fn a_wrong_secret_is_refused_and_logged_and_the_job_goes_on() {
    let d = run(&["+p2", "++ppn", "1", CHECK, "badsecret"]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert_eq!(d.count("OK badsecret"), 2, "{}", d.out());
    let err = d.err();
    assert!(
        err.contains("refused connection from 127.0.0.1:") && err.contains("wrong job secret"),
        "{err}"
    );
}

#[test]
fn garbage_after_a_valid_handshake_is_rejected_and_the_job_goes_on() {
    let d = run(&["+p2", "++ppn", "1", CHECK, "garbage"]);
    assert_eq!(d.status, 0, "{}", d.err());
    assert_eq!(d.count("OK garbage"), 2, "{}", d.out());
    assert_eq!(d.count("MALFORMED rank 0: process 1"), 1, "{}", d.out());
    assert!(d.err().contains("malformed frame"), "{}", d.err());
}
