//! Running a job (a program, `charmrun` or `mpirun`) from a test: both pipes drained on threads
//! while it runs (a chatty job cannot block on a full pipe), a time limit after which the job and
//! every process it started are killed and the test fails with the output so far.

#![allow(dead_code)] // each test file uses part of it

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a job ended.
pub(crate) struct Finished {
    /// Its exit status; `None` if [`run`]'s `stop` ended it.
    pub(crate) status: Option<ExitStatus>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) took: Duration,
}

impl Finished {
    /// Whether the job exited with status 0.
    pub(crate) fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Standard output, line by line.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.stdout.lines().map(str::to_string).collect()
    }

    /// As [`std::process::Output`], for a job that exited by itself.
    pub(crate) fn into_output(self) -> Output {
        Output {
            status: self
                .status
                .expect("the job was stopped, it has no exit status"),
            stdout: self.stdout.into_bytes(),
            stderr: self.stderr.into_bytes(),
        }
    }
}

/// Runs `cmd` (stdin closed, output captured) until it exits. After `limit` the job and its
/// descendants are killed and the test fails, naming `cmd` and showing what it printed. `stop`
/// is asked every 20 ms with the job's pid; when it says so the job and its descendants are
/// killed and [`Finished::status`] is `None` (for a launcher that lingers after its processes).
pub(crate) fn run(mut cmd: Command, limit: Duration, stop: impl Fn(u32) -> bool) -> Finished {
    let started = Instant::now();
    // A process group of its own: what the job leaves behind can be killed even once it exited.
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    // From here on a panic (in `stop`, or the time limit's) kills the job on its way out.
    let mut job = Job::new(child);
    let stdout = drain(job.child.stdout.take().expect("stdout"));
    let stderr = drain(job.child.stderr.take().expect("stderr"));
    let pid = job.child.id();
    let status = loop {
        if let Some(st) = job.child.try_wait().expect("wait for the job") {
            job.reaped = true;
            break Some(st);
        }
        if stop(pid) {
            job.kill();
            break None;
        }
        if started.elapsed() > limit {
            job.kill();
            panic!(
                "{cmd:?} did not finish within {limit:?}; its output so far:\n--- stdout\n{}\n--- stderr\n{}",
                joined(stdout),
                joined(stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    // Processes that outlived the job (a launcher that died) must not hold the pipes open.
    job.kill();
    Finished {
        status,
        stdout: joined(stdout),
        stderr: joined(stderr),
        took,
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn joined(reader: JoinHandle<String>) -> String {
    reader.join().unwrap_or_default()
}

/// A job's process (the leader of its own process group) that is killed, with everything it
/// started, when it is dropped: a test that panics while the job runs leaves nothing behind.
pub(crate) struct Job {
    pub(crate) child: Child,
    /// `child` was waited for: its pid may name somebody else now.
    reaped: bool,
    /// [`Job::kill`] ran: nothing is left to kill when dropped.
    killed: bool,
}

impl Job {
    /// Takes charge of `child`, which must have been started with `process_group(0)`.
    pub(crate) fn new(child: Child) -> Job {
        Job {
            child,
            reaped: false,
            killed: false,
        }
    }

    /// Kills (SIGKILL) the job's process unless it was reaped already, every process below it,
    /// and its process group (which holds what it started, even orphaned ones, unless they left
    /// the group); reaps the job's process.
    pub(crate) fn kill(&mut self) {
        let leader = self.child.id();
        if !self.reaped {
            // Once reaped, its pid names nobody (or somebody else): only the group is left.
            for d in descendants(leader) {
                signal(d.pid as i32, libc::SIGKILL);
            }
            signal(leader as i32, libc::SIGKILL);
        }
        signal(-(leader as i32), libc::SIGKILL);
        // The leader got SIGKILL (or was reaped): this returns.
        let _ = self.child.wait();
        self.reaped = true;
        self.killed = true;
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.killed {
            self.kill();
        }
    }
}

/// Sends `sig` to `pid` (a process group if negative); one already gone is no error.
pub(crate) fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A process below a job (from `/proc`).
pub(crate) struct Descendant {
    pub(crate) pid: u32,
    /// Its command name (at most 15 characters, as the kernel keeps it).
    pub(crate) name: String,
    /// It exited and waits to be reaped (a zombie).
    pub(crate) exited: bool,
}

/// The processes below `root`.
pub(crate) fn descendants(root: u32) -> Vec<Descendant> {
    let mut all: Vec<(u32, Descendant)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the name may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().unwrap_or("");
        let Some(ppid) = rest.next().and_then(|v| v.parse().ok()) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let exited = state == "Z";
        all.push((ppid, Descendant { pid, name, exited }));
    }
    let mut found: Vec<Descendant> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        let (children, others): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|(ppid, _)| *ppid == parent);
        all = others;
        for (_, d) in children {
            frontier.push(d.pid);
            found.push(d);
        }
    }
    found
}

/// A `stop` check for [`run`] for a launcher that may hang after its programs ended (OpenMPI
/// 4.1.4's `mpirun` may, while tearing down a job that failed, its children left as zombies):
/// true once none of the job's `programs` (paths; compared by the name the kernel keeps, 15
/// characters) has run for 5 s after one was seen. The job then counts as failed
/// ([`Finished::status`] `None`).
pub(crate) fn launcher_lingers(programs: &[&str]) -> impl Fn(u32) -> bool {
    let names: Vec<String> = programs
        .iter()
        .filter_map(|a| std::path::Path::new(a).file_name()?.to_str())
        .map(|n| n.chars().take(15).collect())
        .collect();
    let (seen, gone_since) = (std::cell::Cell::new(false), std::cell::Cell::new(None));
    move |pid| {
        let ours: Vec<_> = descendants(pid)
            .into_iter()
            .filter(|d| names.contains(&d.name))
            .collect();
        // Seen once started (a zombie counts: a program may start and end between two looks).
        seen.set(seen.get() || !ours.is_empty());
        if ours.iter().any(|d| !d.exited) || !seen.get() {
            return false;
        }
        let since: Instant = gone_since.get().unwrap_or_else(Instant::now);
        gone_since.set(Some(since));
        since.elapsed() > Duration::from_secs(5)
    }
}

/// What `mpcheck features` prints after its first line (`ok placement …`).
pub(crate) const MPCHECK_FEATURES: [&str; 8] = [
    "ok reduction",
    "ok multi-value future",
    "ok readonly",
    "ok allreduce",
    "ok when",
    "ok quiescence",
    "ok pool",
    "ok large buffers",
];

/// What `mpcheck mobility` prints.
pub(crate) const MPCHECK_MOBILITY: [&str; 14] = [
    "ok migration",
    "ok sparse",
    "ok load balancing",
    "ok results from away",
    "ok allreduce from elsewhere",
    "ok load balancing from elsewhere",
    "ok allreduce outside the tree",
    "ok reductions in order",
    "ok channels",
    "ok sections",
    "ok section multicast",
    "ok combined section",
    "ok reductions of 600 elements away from home",
    "ok a move asked for inside a lent call",
];

/// heat2d's lines that depend neither on the PE count nor on timing: residuals and checksum.
pub(crate) fn heat_figures(lines: impl IntoIterator<Item = String>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| l.starts_with("step ") || l.starts_with("field checksum"))
        .collect()
}

/// stencil3d's `field checksum: …` line (the test fails without one).
pub(crate) fn field_checksum(lines: &[String]) -> &str {
    lines
        .iter()
        .find(|l| l.starts_with("field checksum: "))
        .unwrap_or_else(|| panic!("no field checksum in {lines:?}"))
}
