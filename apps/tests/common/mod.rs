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
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let pid = child.id();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the job") {
            break Some(st);
        }
        if stop(pid) {
            kill_tree(&mut child, false);
            break None;
        }
        if started.elapsed() > limit {
            kill_tree(&mut child, false);
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
    kill_tree(&mut child, true);
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

/// Kills (SIGKILL) `child` unless it was `reaped` already, every process below it, and its
/// process group (which holds what it started, even orphaned ones, unless they left the group);
/// reaps `child`.
fn kill_tree(child: &mut Child, reaped: bool) {
    // Once reaped, its pid names nobody (or somebody else): only the group is left to kill.
    let mut targets: Vec<String> = Vec::new();
    if !reaped {
        targets.extend(
            descendants(child.id())
                .into_iter()
                .map(|p| p.pid.to_string()),
        );
        targets.push(child.id().to_string());
    }
    targets.push(format!("-{}", child.id()));
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg("--")
        .args(&targets)
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
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

/// heat2d's lines that depend neither on the PE count nor on timing: residuals and checksum.
pub(crate) fn heat_figures(lines: impl IntoIterator<Item = String>) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| l.starts_with("step ") || l.starts_with("field checksum"))
        .collect()
}
