//! Running a job of `pmix_check` from a test (under `mpirun` or `srun`): output read on
//! threads, a stop predicate, and a watchdog after which the launcher and every process it
//! started are killed and the test fails.

#![allow(dead_code)] // each test file uses part of it

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// Longest a job may take.
pub(crate) const WATCHDOG: Duration = Duration::from_secs(60);

/// How a job ended.
pub(crate) struct Done {
    /// `None` if the job was stopped because `stop` held (see [`run`]).
    pub(crate) status: Option<ExitStatus>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) took: Duration,
}

impl Done {
    pub(crate) fn report(&self) -> String {
        format!(
            "status {:?} after {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.took, self.stdout, self.stderr
        )
    }
}

/// Reads `r` to the end on a thread; the text arrives on the channel.
fn reader(mut r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// `(pid, parent pid, state, command name)` of every process, from
/// `/proc/<pid>/stat`.
fn processes() -> Vec<(u32, u32, char, String)> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        v.push((pid, ppid, state, comm));
    }
    v
}

/// Every live (not zombie) descendant of `root`, with its command name.
/// (mpirun puts the processes it starts in process groups of their own,
/// so a group kill would miss them.)
pub(crate) fn descendants(root: u32) -> Vec<(u32, String)> {
    let procs = processes();
    let mut children: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, p) in procs.iter().enumerate() {
        children.entry(p.1).or_default().push(i);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &i in children.get(&p).map_or(&[][..], Vec::as_slice) {
            let (pid, _, state, comm) = &procs[i];
            stack.push(*pid);
            if *state != 'Z' {
                out.push((*pid, comm.clone()));
            }
        }
    }
    out
}

/// Sends `sig` to each of `pids`; one already gone is no error.
fn kill(sig: libc::c_int, pids: &[u32]) {
    for &pid in pids {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// Runs `cmd` until it exits, or until `stop(pid)` holds (then it and its
/// descendants are killed and `status` is `None`), or until the watchdog
/// fires: then SIGTERM to mpirun (which stops its job), 5 s later SIGKILL
/// to it and every descendant, and the test fails.
pub(crate) fn run(mut cmd: Command, stop: impl Fn(u32) -> bool) -> Done {
    let started = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the job");
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    let pid = child.id();
    let kill_tree = |sig: libc::c_int| {
        let mut pids: Vec<u32> = descendants(pid).into_iter().map(|d| d.0).collect();
        pids.push(pid);
        kill(sig, &pids);
    };
    let mut watchdog = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the job") {
            break Some(st);
        }
        if stop(pid) {
            kill_tree(libc::SIGKILL);
            let _ = child.wait();
            break None;
        }
        if started.elapsed() > WATCHDOG {
            watchdog = true;
            kill(libc::SIGTERM, &[pid]);
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(5)
                && child.try_wait().ok().flatten().is_none()
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            kill_tree(libc::SIGKILL);
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Processes that outlived mpirun (it died abnormally) are killed too.
    kill_tree(libc::SIGKILL);
    if let Some(tmp) = cmd
        .get_envs()
        .find(|(k, _)| *k == "TMPDIR")
        .and_then(|(_, v)| v)
    {
        let _ = std::fs::remove_dir_all(tmp);
    }
    let collect =
        |rx: Receiver<String>| rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let done = Done {
        status,
        stdout: collect(out),
        stderr: collect(err),
        took: started.elapsed(),
    };
    assert!(
        !watchdog,
        "watchdog: the job took over {WATCHDOG:?} and was killed\n{}",
        done.report()
    );
    done
}
