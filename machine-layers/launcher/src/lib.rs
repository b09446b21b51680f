//! `charmrun`, the launcher of charmrs jobs on one host.
//!
//! `charmrun +p4 ++ppn 2 ./app args…` starts `4 / 2 = 2` processes of
//! `./app`, runs the job's bootstrap key-value server
//! ([`KvServer`]) on loopback, waits for the processes and exits with the
//! job's status.
//!
//! # Command line
//!
//! ```text
//! charmrun [+pN | +p N] [++ppn N] [++quiet] [++help] PROGRAM [ARGS…]
//! ```
//!
//! * `+pN` / `+p N`: total PEs of the job (default 1, at most [`MAX_PES`]).
//! * `++ppn N` (or `++ppn=N`): PEs per process; `N` must divide the PE
//!   count, and the job may have at most [`MAX_PROCS`] processes. Default:
//!   all PEs in one process.
//! * `++quiet`: no informational messages from charmrun (errors are still
//!   printed).
//! * `++help`: usage.
//! * `--`: what follows is the program's, unchanged (the `--` too, so its
//!   runtime stops reading options there). Before `--`, `+p` and `++`
//!   options are charmrun's wherever they are (Charm++'s
//!   `charmrun ./app +p4`); each may be given once.
//!
//! Each process gets `CHARMRS_LOCAL_RANK`/`CHARMRS_LOCAL_SIZE` (its place
//! on this host) and none of an outer launcher's PMIx, OpenMPI or Slurm
//! placement variables: charmrun inside an `srun` or `mpirun` job runs its
//! own job.
//!
//! Charmrun options may also follow the program (Charm++ style:
//! `charmrun ./app +p4`); they are removed from its arguments. Every other
//! argument reaches the program unchanged and in order. An unknown `++`
//! option is an error (exit status 2) listing the valid ones.
//!
//! # What each process gets
//!
//! The environment of charmrun plus the variables of
//! [`charmrs_transport::kv`]: `CHARMRS_RANK`, `CHARMRS_NPROCS`,
//! `CHARMRS_KV_ADDR`, `CHARMRS_JOB_SECRET` (32 bytes from `/dev/urandom`,
//! hex), `CHARMRS_PPN` and `CHARMRS_PES` (= ppn) and `CHARMRS_TOTAL_PES`
//! (= `+p`). Standard output and error are inherited (lines of different
//! processes may interleave in any order); rank 0 inherits standard input,
//! the others read from `/dev/null`.
//!
//! # Job status and failures
//!
//! * 0 when every process exits with 0.
//! * Otherwise the status of the first failure: a process exiting with a
//!   non-zero code `c` gives `c`; one killed by signal `s` gives `128 + s`;
//!   a process that calls `abort` through its bootstrap gives its own exit
//!   code (1 if it exits with 0, or if it is still running when charmrun
//!   kills the survivors). Charmrun prints the lost process (rank,
//!   pid, status) on stderr, gives the others [`KILL_GRACE`] to notice and
//!   exit, then kills the rest (SIGKILL): all are gone well within 5 s.
//! * A process that hangs before the job's start-up fence (never starts its
//!   bootstrap, or joins and never reaches the fence) does not stall the
//!   others for ever: the key-value server fails the fence
//!   [`DEFAULT_FENCE_TIMEOUT`](charmrs_transport::kv::DEFAULT_FENCE_TIMEOUT)
//!   (2 minutes) after the first process reached it, or after
//!   `CHARMRS_KV_FENCE_TIMEOUT` seconds if that is set. Charmrun then prints
//!   the missing ranks (rank, pid, whether each joined the job) and stops the
//!   job as after a failure; its status is 1.
//! * 2 for a usage error (including a `CHARMRS_KV_FENCE_TIMEOUT` that is not
//!   a positive whole number), 127 if a process cannot be started.
//! * If charmrun itself dies, processes using
//!   [`KvBootstrap::from_env`](charmrs_transport::KvBootstrap::from_env)
//!   notice the closed connection and exit.

/// Writes a line to stderr, ignoring a failure (`eprintln!` panics when stderr is a broken pipe,
/// as after `charmrun … 2>&1 | head`: the launcher must still end its job and report its status).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use charmrs_transport::kv::{
    fence_timeout_from_env, random_secret, secret_to_hex, ENV_JOB_SECRET, ENV_KV_ADDR,
    ENV_KV_FENCE_TIMEOUT, ENV_NPROCS, ENV_PES, ENV_PPN, ENV_RANK, ENV_TOTAL_PES,
};
use charmrs_transport::{KvEvent, KvServer, TransportError};

/// How long the surviving processes get to exit on their own after a
/// failure before charmrun kills them.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How often charmrun checks its processes.
const POLL: Duration = Duration::from_millis(20);

/// Exit status for usage errors.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when a process cannot be started.
pub const EXIT_SPAWN: i32 = 127;

/// The largest `+p` charmrun accepts: the most PEs a charmrs job may have, 2^24 (the runtime's
/// `charmrs::MAX_PES` in `runtime/src/runtime.rs`: a forwarded call carries its PE in 24 bits).
/// The same number, not the constant itself: the launcher does not depend on the runtime.
pub const MAX_PES: u32 = 1 << 24;

/// The most processes charmrun starts for one job (`+p` / `++ppn`), all on this host: far more
/// than a host runs usefully, and a bound on what charmrun allocates for them before the first
/// one starts.
pub const MAX_PROCS: u32 = 1 << 16;

/// The `++` options charmrun knows, for error messages and `++help`.
pub const VALID_OPTIONS: &str = "+pN | +p N, ++ppn N, ++quiet, ++help";

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Total PEs of the job (`+p`).
    pub pes: u32,
    /// PEs per process (`++ppn`); divides `pes`.
    pub ppn: u32,
    /// `++quiet`.
    pub quiet: bool,
    /// The program to start.
    pub program: OsString,
    /// Its arguments, charmrun options removed.
    pub args: Vec<OsString>,
}

impl Options {
    /// Number of processes: `pes / ppn`.
    pub fn nprocs(&self) -> u32 {
        self.pes / self.ppn
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Run a job.
    Run(Options),
    /// Print usage and exit 0.
    Help,
}

/// The usage text.
pub fn usage() -> String {
    format!(
        "usage: charmrun [+pN] [++ppn N] [++quiet] PROGRAM [ARGS...]\n\
         \x20 +pN, +p N   total PEs of the job (default 1)\n\
         \x20 ++ppn N     PEs per process (must divide the PE count; default: one process)\n\
         \x20 ++quiet     no informational messages\n\
         \x20 ++help      this text\n\
         valid options: {VALID_OPTIONS}"
    )
}

fn parse_count(what: &str, s: Option<&str>) -> Result<u32, String> {
    let s = s.ok_or_else(|| format!("{what} needs a number"))?;
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{what}: {s:?} is not a positive integer")),
    }
}

/// Parses charmrun's arguments (without the program name `argv[0]`).
///
/// # Errors
///
/// A message for the user (exit with [`EXIT_USAGE`]): unknown `++` option
/// (listing the valid ones), bad counts, `+p` above [`MAX_PES`], `ppn` not
/// dividing the PE count, more than [`MAX_PROCS`] processes, missing
/// program.
pub fn parse_args<I>(args: I) -> Result<Invocation, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut it = args.into_iter().map(Into::into).peekable();
    let mut pes: Option<u32> = None;
    let mut ppn: Option<u32> = None;
    let mut quiet = false;
    let mut program: Option<OsString> = None;
    let mut rest = Vec::new();
    while let Some(arg) = it.next() {
        let Some(s) = arg.to_str() else {
            match program {
                None => program = Some(arg),
                Some(_) => rest.push(arg),
            }
            continue;
        };
        if s == "--" {
            // Everything after `--` is the program's (and `--` with it: the program's runtime
            // stops reading its options there too).
            if program.is_none() {
                program = it.next();
                if program.is_none() {
                    return Err(format!("no program after --\n{}", usage()));
                }
            } else {
                rest.push(arg);
            }
            rest.extend(it.by_ref());
            break;
        }
        if let Some(opt) = s.strip_prefix("++") {
            let (name, inline) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (opt, None),
            };
            match name {
                "ppn" => {
                    let v = match inline {
                        Some(v) => Some(v),
                        None => it.next().map(|v| v.to_string_lossy().into_owned()),
                    };
                    let n = parse_count("++ppn", v.as_deref())?;
                    if let Some(first) = ppn.replace(n) {
                        return Err(format!("++ppn given twice ({first} and {n})"));
                    }
                }
                "quiet" if inline.is_none() => quiet = true,
                "help" if inline.is_none() => return Ok(Invocation::Help),
                _ => {
                    return Err(format!(
                        "unknown option {s:?}; valid options: {VALID_OPTIONS}"
                    ))
                }
            }
        } else if let Some(n) = s
            .strip_prefix("+p")
            .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        {
            let v = if n.is_empty() {
                it.next().map(|v| v.to_string_lossy().into_owned())
            } else {
                Some(n.to_owned())
            };
            let n = parse_count("+p", v.as_deref())?;
            if let Some(first) = pes.replace(n) {
                return Err(format!("+p given twice (+p{first} and +p{n})"));
            }
        } else if program.is_none() {
            if matches!(s, "-h" | "--help") {
                return Ok(Invocation::Help);
            }
            if s.starts_with('+') || s.starts_with('-') {
                return Err(format!(
                    "unknown option {s:?} before the program; valid options: {VALID_OPTIONS} \
                     (options for the program go after it)"
                ));
            }
            program = Some(arg);
        } else {
            rest.push(arg);
        }
    }
    let program = program.ok_or_else(|| format!("no program given\n{}", usage()))?;
    let pes = pes.unwrap_or(1);
    if pes > MAX_PES {
        return Err(format!(
            "+p{pes} is more PEs than a charmrs job may have ({MAX_PES})"
        ));
    }
    let ppn = ppn.unwrap_or(pes);
    if !pes.is_multiple_of(ppn) {
        return Err(format!(
            "++ppn {ppn} does not divide +p{pes}: the job needs a whole number of processes"
        ));
    }
    if pes / ppn > MAX_PROCS {
        return Err(format!(
            "+p{pes} ++ppn {ppn} makes {} processes; charmrun starts at most {MAX_PROCS} \
             (give more PEs per process with ++ppn)",
            pes / ppn
        ));
    }
    Ok(Invocation::Run(Options {
        pes,
        ppn,
        quiet,
        program,
        args: rest,
    }))
}

/// Whether `name` is a variable another launcher sets for its processes, which charmrun's must
/// not inherit: PMIx's (a process would join the outer job), and the host placement of
/// OpenMPI and Slurm (every process would pin its PEs to the same cores).
fn is_outer_launcher_var(name: &str) -> bool {
    name.starts_with("PMIX_")
        || name.starts_with("PMI_")
        || name.starts_with("OMPI_COMM_WORLD_")
        || matches!(name, "SLURM_LOCALID" | "SLURM_NTASKS_PER_NODE")
}

/// How a process ended, for messages.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}{}", signal_name(s)),
        _ => format!("ended ({status})"),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        1 => " (SIGHUP)",
        2 => " (SIGINT)",
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        13 => " (SIGPIPE)",
        15 => " (SIGTERM)",
        _ => "",
    }
}

/// The job status a process's end stands for (0: success).
fn code_of(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}

/// One started process.
struct Proc {
    rank: u32,
    pid: u32,
    child: Option<Child>,
    /// Charmrun killed it (SIGKILL, [`kill_all`]) while it ran.
    killed: bool,
}

/// Runs a job: starts the processes, serves the bootstrap, supervises, and
/// returns the job's exit status (see the crate docs).
pub fn run(opts: &Options) -> i32 {
    let nprocs = opts.nprocs();
    let fence_timeout = match fence_timeout_from_env() {
        Ok(t) => t,
        Err(e) => {
            let why = match e {
                TransportError::Bootstrap(m) => m,
                other => other.to_string(),
            };
            note!("charmrun: {why}");
            return EXIT_USAGE;
        }
    };
    let secret = match random_secret() {
        Ok(s) => s,
        Err(e) => {
            note!("charmrun: cannot make the job secret: {e}");
            return 1;
        }
    };
    let (server, addr) = match KvServer::start(nprocs, secret) {
        Ok(x) => x,
        Err(e) => {
            note!("charmrun: cannot start the key-value server: {e}");
            return 1;
        }
    };
    server.set_fence_timeout(fence_timeout);
    let hex = secret_to_hex(&secret);
    let prog = opts.program.to_string_lossy();
    if !opts.quiet {
        note!(
            "charmrun: {} PEs in {nprocs} process{} of {} PE{}: {prog}",
            opts.pes,
            if nprocs == 1 { "" } else { "es" },
            opts.ppn,
            if opts.ppn == 1 { "" } else { "s" },
        );
    }
    let mut procs: Vec<Proc> = Vec::with_capacity(nprocs as usize);
    for rank in 0..nprocs {
        let mut cmd = Command::new(&opts.program);
        // Variables of an outer launcher (charmrun run inside an `srun` or `mpirun` job, or
        // a shell of one) would make a process join that job (PMIx) or take its placement on
        // the host: this job's processes are charmrun's, all on this host.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(is_outer_launcher_var) {
                cmd.env_remove(name);
            }
        }
        cmd.args(&opts.args)
            .env("CHARMRS_LOCAL_RANK", rank.to_string())
            .env("CHARMRS_LOCAL_SIZE", nprocs.to_string())
            .env(ENV_RANK, rank.to_string())
            .env(ENV_NPROCS, nprocs.to_string())
            .env(ENV_KV_ADDR, addr.to_string())
            .env(ENV_JOB_SECRET, &hex)
            .env(ENV_PPN, opts.ppn.to_string())
            .env(ENV_PES, opts.ppn.to_string())
            .env(ENV_TOTAL_PES, opts.pes.to_string())
            .stdin(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        match cmd.spawn() {
            Ok(child) => procs.push(Proc {
                rank,
                pid: child.id(),
                child: Some(child),
                killed: false,
            }),
            Err(e) => {
                note!("charmrun: cannot start {prog:?} (rank {rank}): {e}");
                kill_all(&mut procs);
                reap_all(&mut procs);
                return EXIT_SPAWN;
            }
        }
    }
    supervise(opts, &server, &mut procs)
}

/// Kills every process still running (SIGKILL).
fn kill_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if let Some(c) = p.child.as_mut() {
            p.killed = true;
            let _ = c.kill();
        }
    }
}

/// Waits for every process (after `kill_all`).
fn reap_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if let Some(mut c) = p.child.take() {
            let _ = c.wait();
        }
    }
}

/// What the supervision of a job knows so far.
#[derive(Default)]
struct Supervision {
    /// The job's status, once something failed.
    status: Option<i32>,
    /// The process whose abort decided the status.
    aborted_by: Option<u32>,
    /// When the survivors of a failure get killed.
    kill_at: Option<Instant>,
    /// The survivors were killed.
    killed: bool,
    /// Which ranks joined the job (claimed their rank at the key-value server).
    joined: Vec<bool>,
    /// The processes that ended with status 0.
    ended_ok: Vec<(u32, u32)>,
}

impl Supervision {
    /// Reports a failure (`why`) and gives the `others` still running [`KILL_GRACE`].
    fn begin_teardown(&mut self, why: String, others: usize) {
        self.teardown(why, others, "other ");
    }

    /// Reports a failure (`why`) that is no one process's and gives the `running` processes
    /// [`KILL_GRACE`].
    fn begin_teardown_all(&mut self, why: String, running: usize) {
        self.teardown(why, running, "");
    }

    fn teardown(&mut self, why: String, n: usize, other: &str) {
        if n == 0 {
            note!("charmrun: {why}");
        } else {
            note!(
                "charmrun: {why}; stopping the {other}{n} process{}",
                if n == 1 { "" } else { "es" }
            );
        }
        self.kill_at = Some(Instant::now() + KILL_GRACE);
    }

    /// Process `procs[i]` ended with `st`.
    fn ended(&mut self, procs: &mut [Proc], i: usize, st: ExitStatus) {
        let (rank, pid) = (procs[i].rank, procs[i].pid);
        let killed_by_charmrun = procs[i].killed && st.signal() == Some(SIGKILL);
        procs[i].child = None;
        let code = code_of(st);
        if code == 0 {
            self.ended_ok.push((rank, pid));
        }
        if self.aborted_by == Some(rank) && code != 0 && !killed_by_charmrun {
            // The aborting process's own status stands for the job (not the SIGKILL of
            // charmrun's teardown, should it linger after its abort).
            self.status = Some(code);
        }
        if code != 0 && self.status.is_none() && !self.killed {
            self.status = Some(code);
            let others = procs.iter().filter(|p| p.child.is_some()).count();
            self.begin_teardown(
                format!("process rank {rank} (pid {pid}) {}", describe(st)),
                others,
            );
        }
    }

    /// An event of the key-value server.
    fn event(&mut self, procs: &[Proc], event: KvEvent) {
        match event {
            KvEvent::Joined { rank } => {
                if let Some(j) = self.joined.get_mut(rank as usize) {
                    *j = true;
                }
            }
            KvEvent::Abort { rank, reason } if self.status.is_none() => {
                self.status = Some(1);
                self.aborted_by = Some(rank);
                let pid = procs.iter().find(|p| p.rank == rank).map_or(0, |p| p.pid);
                let others = procs
                    .iter()
                    .filter(|p| p.child.is_some() && p.rank != rank)
                    .count();
                self.begin_teardown(
                    format!("process rank {rank} (pid {pid}) aborted the job: {reason}"),
                    others,
                );
            }
            KvEvent::FenceTimedOut { missing, after } if self.status.is_none() => {
                self.status = Some(1);
                let running = procs.iter().filter(|p| p.child.is_some()).count();
                let why = format!(
                    "the processes did not all reach a bootstrap fence within {after:?} \
                     ({ENV_KV_FENCE_TIMEOUT} sets it, in seconds): {}",
                    self.describe_missing(procs, &missing)
                );
                self.begin_teardown_all(why, running);
            }
            _ => {}
        }
    }

    /// The ranks missing at a fence, with their pids and whether each joined the job; at most
    /// 16 named.
    fn describe_missing(&self, procs: &[Proc], missing: &[u32]) -> String {
        const NAMED: usize = 16;
        let mut parts: Vec<String> = missing
            .iter()
            .take(NAMED)
            .map(|&rank| {
                let pid = procs
                    .iter()
                    .find(|p| p.rank == rank)
                    .map_or_else(|| "?".to_owned(), |p| p.pid.to_string());
                let what = if self.joined.get(rank as usize).copied().unwrap_or(false) {
                    "joined the job but did not reach the fence"
                } else {
                    "never joined the job"
                };
                format!("rank {rank} (pid {pid}) {what}")
            })
            .collect();
        if missing.len() > NAMED {
            parts.push(format!("and {} more", missing.len() - NAMED));
        }
        parts.join(", ")
    }
}

/// The signal `Child::kill` sends.
const SIGKILL: i32 = 9;

/// The supervision loop; returns the job status.
fn supervise(opts: &Options, server: &KvServer, procs: &mut [Proc]) -> i32 {
    let mut s = Supervision {
        joined: vec![false; procs.len()],
        ..Supervision::default()
    };
    loop {
        // Events already queued first: the server sends a fence's timeout before the processes
        // waiting in it hear of it, so it is judged before their exits are.
        while let Some(event) = server.try_event() {
            s.event(procs, event);
        }
        let mut running = 0;
        for i in 0..procs.len() {
            let Some(child) = procs[i].child.as_mut() else {
                continue;
            };
            let (rank, pid) = (procs[i].rank, procs[i].pid);
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(st)) => s.ended(procs, i, st),
                Err(e) => {
                    procs[i].child = None;
                    if s.status.is_none() {
                        s.status = Some(1);
                        let others = procs.iter().filter(|p| p.child.is_some()).count();
                        s.begin_teardown(
                            format!("lost track of process rank {rank} (pid {pid}): {e}"),
                            others,
                        );
                    }
                }
            }
        }
        if running == 0 {
            // Events queued before the last exits were seen: an abort acknowledged to a process
            // that then exited with 0 (an abort is queued before it is acknowledged).
            while let Some(event) = server.try_event() {
                s.event(procs, event);
            }
            break;
        }
        if let Some(t) = s.kill_at {
            if Instant::now() >= t && !s.killed {
                s.killed = true;
                let left: Vec<String> = procs
                    .iter()
                    .filter(|p| p.child.is_some())
                    .map(|p| format!("rank {} (pid {})", p.rank, p.pid))
                    .collect();
                if !opts.quiet && !left.is_empty() {
                    note!("charmrun: killing {}", left.join(", "));
                }
                kill_all(procs);
            }
        }
        let mut wait = POLL;
        while let Some(event) = server.next_event(wait) {
            // Every event already queued, before the exits are judged below.
            wait = Duration::ZERO;
            s.event(procs, event);
        }
        // A process that ended successfully without ever joining, in a job whose other
        // processes join: they would wait for it at start-up for ever. (A job of plain
        // programs, none of which joins, is left alone.) A process joins before it can end,
        // and its join is queued before it is answered, so the drain above has seen it.
        if s.status.is_none() && s.joined.contains(&true) {
            if let Some(&(rank, pid)) = s
                .ended_ok
                .iter()
                .find(|&&(rank, _)| !s.joined[rank as usize])
            {
                s.status = Some(1);
                let others = procs.iter().filter(|p| p.child.is_some()).count();
                s.begin_teardown(
                    format!(
                        "process rank {rank} (pid {pid}) exited with status 0 without joining \
                         the job (the others would wait for it for ever)"
                    ),
                    others,
                );
            }
        }
    }
    s.status.unwrap_or(0)
}

/// Entry point of the `charmrun` binary: parses `args` (without `argv[0]`),
/// runs the job, returns the process exit status.
pub fn main_with_args<I>(args: I) -> i32
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    match parse_args(args) {
        Ok(Invocation::Help) => {
            println!("{}", usage());
            0
        }
        Ok(Invocation::Run(opts)) => run(&opts),
        Err(msg) => {
            note!("charmrun: {msg}");
            EXIT_USAGE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_opts(args: &[&str]) -> Options {
        match parse_args(args.iter().copied()) {
            Ok(Invocation::Run(o)) => o,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn pes_and_ppn_forms() {
        let o = run_opts(&["+p4", "++ppn", "2", "./app", "a", "b"]);
        assert_eq!((o.pes, o.ppn, o.nprocs(), o.quiet), (4, 2, 2, false));
        assert_eq!(o.program, "./app");
        assert_eq!(o.args, vec![OsString::from("a"), OsString::from("b")]);
        let o = run_opts(&["+p", "6", "++ppn=3", "++quiet", "./app"]);
        assert_eq!((o.pes, o.ppn, o.nprocs(), o.quiet), (6, 3, 2, true));
        // No ++ppn: one process with every PE; no +p: one PE.
        let o = run_opts(&["+p8", "./app"]);
        assert_eq!((o.pes, o.ppn, o.nprocs()), (8, 8, 1));
        let o = run_opts(&["./app"]);
        assert_eq!((o.pes, o.ppn, o.nprocs()), (1, 1, 1));
    }

    #[test]
    fn options_after_the_program_are_charmruns_others_pass_unchanged() {
        let o = run_opts(&[
            "./app",
            "+p4",
            "x",
            "+idlespin",
            "50",
            "++ppn",
            "1",
            "--flag",
            "-v",
        ]);
        assert_eq!((o.pes, o.ppn), (4, 1));
        let want: Vec<OsString> = ["x", "+idlespin", "50", "--flag", "-v"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(o.args, want);
        // `+pe` is not `+p`: passed through.
        let o = run_opts(&["./app", "+pemap", "0-3"]);
        assert_eq!(o.args.len(), 2);
    }

    #[test]
    fn everything_after_a_double_dash_is_the_programs() {
        let o = run_opts(&["+p2", "./app", "a", "--", "+p8", "++ppn", "1", "b"]);
        assert_eq!((o.pes, o.ppn), (2, 2));
        let want: Vec<OsString> = ["a", "--", "+p8", "++ppn", "1", "b"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(o.args, want);
        let o = run_opts(&["+p2", "--", "./app", "++verbose"]);
        assert_eq!(o.program, "./app");
        assert_eq!(o.args, vec![OsString::from("++verbose")]);
    }

    #[test]
    fn usage_errors() {
        let err = |args: &[&str]| parse_args(args.iter().copied()).unwrap_err();
        assert!(err(&["+p4", "./app", "+p2"]).contains("+p given twice (+p4 and +p2)"));
        assert!(err(&["++ppn", "2", "+p4", "./app", "++ppn=1"]).contains("++ppn given twice"));
        assert!(err(&["+p4", "--"]).contains("no program after --"));
        let err = |args: &[&str]| parse_args(args.iter().copied()).unwrap_err();
        let e = err(&["++nodelist", "f", "./app"]);
        assert!(
            e.contains("++nodelist") && e.contains("++ppn") && e.contains("++quiet"),
            "{e}"
        );
        assert!(err(&["./app", "++bogus"]).contains("valid options"));
        assert!(err(&["+p4", "++ppn", "3", "./app"]).contains("does not divide"));
        assert!(err(&["+p0", "./app"]).contains("positive"));
        assert!(err(&["+p", "x", "./app"]).contains("positive"));
        assert!(err(&["++ppn"]).contains("number"));
        assert!(err(&["+p2"]).contains("no program"));
        assert!(err(&["-x", "./app"]).contains("before the program"));
        assert_eq!(parse_args(["++help"]).unwrap(), Invocation::Help);
    }

    /// `+p` above the runtime's limit, or more processes than charmrun starts, are usage errors
    /// (not an allocation failure of charmrun's process table).
    #[test]
    fn pe_and_process_counts_are_bounded() {
        let err = |args: &[&str]| parse_args(args.iter().copied()).unwrap_err();
        let e = err(&["+p4294967295", "++ppn", "1", "/nonexistent"]);
        assert!(e.contains("+p4294967295") && e.contains("16777216"), "{e}");
        let e = err(&["+p16777217", "./app"]);
        assert!(e.contains("more PEs than a charmrs job may have"), "{e}");
        // At the PE limit, in one process: fine.
        assert_eq!(run_opts(&["+p16777216", "./app"]).nprocs(), 1);
        let e = err(&["+p65537", "++ppn", "1", "./app"]);
        assert!(
            e.contains("65537 processes") && e.contains("at most 65536") && e.contains("++ppn"),
            "{e}"
        );
        assert_eq!(
            run_opts(&["+p16777216", "++ppn", "256", "./app"]).nprocs(),
            MAX_PROCS
        );
    }

    /// A key-value server for a job of one process, whose rank 0 (this test) has joined and
    /// aborted: the abort is acknowledged, so its event is queued.
    fn server_with_an_abort() -> (KvServer, charmrs_transport::KvBootstrap) {
        use charmrs_transport::{Bootstrap, KvBootstrap};
        let secret = random_secret().unwrap();
        let (server, addr) = KvServer::start(1, secret).unwrap();
        let boot = KvBootstrap::connect(addr, 0, 1, secret).unwrap();
        boot.abort("test abort");
        (server, boot)
    }

    fn supervised(server: &KvServer, child: Child) -> i32 {
        let opts = run_opts(&["++quiet", "unused"]);
        let mut procs = vec![Proc {
            rank: 0,
            pid: child.id(),
            child: Some(child),
            killed: false,
        }];
        supervise(&opts, server, &mut procs)
    }

    /// The last process aborts and exits with 0 before charmrun looks at the server's events:
    /// the abort still makes the job fail.
    #[test]
    fn an_abort_queued_before_the_last_exit_fails_the_job() {
        let (server, _boot) = server_with_an_abort();
        let mut child = Command::new("true").spawn().unwrap();
        // Ended (with 0) before supervision starts; `try_wait` reports it at once.
        assert!(child.wait().unwrap().success());
        assert_eq!(supervised(&server, child), 1);
    }

    /// An aborting process that does not exit is killed after the grace; the job's status is
    /// the abort's (1), not that SIGKILL's (137).
    #[test]
    fn killing_a_lingering_aborter_does_not_make_the_status() {
        let (server, _boot) = server_with_an_abort();
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        let t = Instant::now();
        assert_eq!(supervised(&server, child), 1);
        assert!(
            t.elapsed() < KILL_GRACE + Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }
}
