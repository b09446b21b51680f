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
//! Each process leads a process group of its own, so that charmrun's
//! signals reach whatever it starts (the program of a wrapper script, say).
//! The exception is rank 0 when charmrun's standard input is a terminal of
//! which charmrun is in the foreground: rank 0 then stays in charmrun's
//! group, so it can read the terminal and gets its ^C directly. (A terminal
//! set to `stty tostop` stops the other ranks when they write to it.) On
//! Linux each process is also killed by the kernel if charmrun dies
//! (`PR_SET_PDEATHSIG`), a backstop for programs without the bootstrap's
//! lifeline.
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
//!   exit, then kills the rest with their process groups (SIGKILL): all are
//!   gone well within 5 s. Once all have ended, what is left in their
//!   process groups is killed too (a successful job's is left alone).
//! * SIGINT, SIGTERM or SIGHUP sent to charmrun (unless it was started with
//!   that signal ignored, as by `nohup`): charmrun prints the signal, passes
//!   it to every process's group, gives them [`KILL_GRACE`], kills what is
//!   left (SIGKILL) and exits with `128 + signal` (unless a process had
//!   failed first: its status stands). A second such signal kills them at
//!   once.
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
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
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

/// ` (SIGTERM)` for 15 and so on, empty for a signal without a name here.
fn signal_name(s: i32) -> String {
    signal_label(s).map_or_else(String::new, |n| format!(" ({n})"))
}

fn signal_label(s: i32) -> Option<&'static str> {
    Some(match s {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// The job status a process's end stands for (0: success).
fn code_of(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}

/// The signals charmrun passes on to its processes before it stops the job.
const FORWARDED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The last of [`FORWARDED`] charmrun received.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// How many of [`FORWARDED`] charmrun received since its handlers were installed.
static SIGNALS: AtomicU32 = AtomicU32::new(0);

/// The handler of [`FORWARDED`]: records the signal for the supervision loop (atomic stores
/// only, which are async-signal-safe).
extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Charmrun's handlers of [`FORWARDED`] while a job runs; the previous dispositions come back
/// when dropped.
struct SignalHandlers {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalHandlers {
    /// Installs [`on_signal`] for each of [`FORWARDED`] that is not ignored: a signal ignored
    /// by whoever started charmrun (`nohup`, a background job of a non-interactive shell) stays
    /// ignored, and the processes inherit that as before.
    fn install() -> SignalHandlers {
        SIGNALS.store(0, Ordering::SeqCst);
        let mut previous = Vec::new();
        for sig in FORWARDED {
            // SAFETY: `sigaction` is plain data, for which all-zero bytes are a valid value.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: a null new action only reads the current one into `old`, a valid,
            // writable `sigaction`.
            if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0
                || old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            // SAFETY: as above, all-zero is a valid `sigaction`.
            let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
            new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // SA_RESTART: the key-value server's threads and charmrun's own calls resume
            // rather than fail with EINTR.
            new.sa_flags = libc::SA_RESTART;
            // SAFETY: `new.sa_mask` is a valid `sigset_t` to initialise; `new` is a complete
            // action whose handler only does atomic stores (async-signal-safe) and lives for
            // the whole program; `old` is valid and writable.
            let installed = unsafe {
                libc::sigemptyset(&mut new.sa_mask);
                libc::sigaction(sig, &new, &mut old) == 0
            };
            if installed {
                previous.push((sig, old));
            }
        }
        SignalHandlers { previous }
    }
}

impl Drop for SignalHandlers {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: `old` is the action `sigaction` returned for `sig`, reinstalled as it
            // was; a null pointer asks for no copy of the current one.
            unsafe {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }
}

/// Whether charmrun's standard input is a terminal of which charmrun is in the foreground:
/// rank 0, which reads it, then stays in charmrun's process group, where it may (a process of
/// a background group reading its terminal is stopped) and where the terminal's ^C reaches it
/// as before.
fn in_foreground_of_stdin_terminal() -> bool {
    // SAFETY: `isatty`, `tcgetpgrp` and `getpgrp` take and return plain integers.
    unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() }
}

/// One started process.
struct Proc {
    rank: u32,
    pid: u32,
    child: Child,
    /// It leads a process group of its own, which charmrun signals as a whole (so its children,
    /// e.g. of a wrapper script, get the signal too).
    own_group: bool,
    /// Its end was seen. It stays unreaped (a zombie) until the job ends: its pid, and so the
    /// id of its process group, cannot be taken by another process while charmrun may still
    /// signal that group.
    ended: bool,
    /// Charmrun killed it (SIGKILL, [`kill_all`]) while it ran.
    killed: bool,
}

impl Proc {
    fn running(&self) -> bool {
        !self.ended
    }

    /// Sends `sig` to its process group if it has its own (even after it ended: what it left
    /// in the group), else to it while it runs.
    fn signal(&self, sig: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return;
        };
        let target = if self.own_group {
            -pid
        } else if self.running() {
            pid
        } else {
            return;
        };
        // SAFETY: kill(2) takes plain integers. The target is the pid of a child not yet
        // reaped, or the process group it leads: neither id can belong to another process.
        unsafe {
            libc::kill(target, sig);
        }
    }

    /// Its exit status if it ended, without reaping it (see [`Proc::ended`]).
    fn peek_exit(&self) -> std::io::Result<Option<ExitStatus>> {
        let pid = libc::id_t::from(self.pid);
        loop {
            // SAFETY: `siginfo_t` is plain data, for which all-zero bytes are a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `info` is a valid, writable `siginfo_t`; with WNOWAIT the child is left
            // waitable (its `Child::wait` reaps it later).
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: `waitid` filled `info` for a child event (SIGCHLD layout), or left it
            // zeroed (si_pid 0) if the child has not ended.
            let (who, status) = unsafe { (info.si_pid(), info.si_status()) };
            if who == 0 {
                return Ok(None);
            }
            // Back to the wait status `ExitStatus` holds.
            let raw = match info.si_code {
                libc::CLD_EXITED => (status & 0xff) << 8,
                libc::CLD_KILLED => status & 0x7f,
                libc::CLD_DUMPED => (status & 0x7f) | 0x80,
                _ => return Ok(None),
            };
            return Ok(Some(ExitStatus::from_raw(raw)));
        }
    }
}

/// Runs a job: starts the processes, serves the bootstrap, supervises, and
/// returns the job's exit status (see the crate docs).
///
/// While it runs, SIGINT, SIGTERM and SIGHUP (those not ignored) are caught
/// by handlers of its own, process-wide; the previous dispositions come back
/// when it returns.
pub fn run(opts: &Options) -> i32 {
    let nprocs = opts.nprocs();
    // Before the first process starts, so that none can be left behind by a signal.
    let _handlers = SignalHandlers::install();
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
    let rank0_in_our_group = in_foreground_of_stdin_terminal();
    for rank in 0..nprocs {
        let mut cmd = Command::new(&opts.program);
        let own_group = rank != 0 || !rank0_in_our_group;
        if own_group {
            cmd.process_group(0);
        }
        backstop_parent_death(&mut cmd);
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
                child,
                own_group,
                ended: false,
                killed: false,
            }),
            Err(e) => {
                note!("charmrun: cannot start {prog:?} (rank {rank}): {e}");
                kill_all(&mut procs);
                reap_all(&mut procs, true);
                return EXIT_SPAWN;
            }
        }
    }
    let status = supervise(opts, &server, &mut procs);
    reap_all(&mut procs, status != 0);
    status
}

/// Makes the kernel kill the process started by `cmd` (SIGKILL) if charmrun dies, even by
/// SIGKILL: a backstop for programs without the bootstrap's lifeline. (It fires when the thread
/// that started the process ends; charmrun starts them all on its main thread, which ends
/// last.)
fn backstop_parent_death(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `getpid` takes nothing and cannot fail.
        let charmrun = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it makes two system calls (`prctl`, `getppid`),
        // allocates nothing and touches no lock.
        unsafe {
            cmd.pre_exec(move || {
                // Variadic: every argument as the `unsigned long` the kernel reads.
                let zero: libc::c_ulong = 0;
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    zero,
                    zero,
                    zero,
                );
                if libc::getppid() != charmrun {
                    // Charmrun died before the death signal was armed.
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}

/// Kills every process still running, with its process group (SIGKILL).
fn kill_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if p.running() {
            p.killed = true;
            p.signal(libc::SIGKILL);
        }
    }
}

/// Waits for every process, after killing what is left in the process groups of a `failed`
/// job (children a wrapper script left behind; a successful job's are left alone).
fn reap_all(procs: &mut [Proc], failed: bool) {
    for p in procs.iter_mut() {
        if failed && p.own_group {
            p.signal(libc::SIGKILL);
        }
        let _ = p.child.wait();
        p.ended = true;
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
    /// The signal (one of [`FORWARDED`]) that stops the job.
    signal: Option<i32>,
    /// How many of [`SIGNALS`] were handled.
    signals_seen: u32,
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
        let killed_by_charmrun = procs[i].killed && st.signal() == Some(libc::SIGKILL);
        procs[i].ended = true;
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
            let others = procs.iter().filter(|p| p.running()).count();
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
                    .filter(|p| p.running() && p.rank != rank)
                    .count();
                self.begin_teardown(
                    format!("process rank {rank} (pid {pid}) aborted the job: {reason}"),
                    others,
                );
            }
            KvEvent::FenceTimedOut { missing, after } if self.status.is_none() => {
                self.status = Some(1);
                let running = procs.iter().filter(|p| p.running()).count();
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

    /// Charmrun received signal `sig` (one of [`FORWARDED`]): the first passes it on to every
    /// process (with its process group) and gives them [`KILL_GRACE`]; another kills them at
    /// once.
    fn signalled(&mut self, procs: &[Proc], sig: i32) {
        let name = signal_label(sig).map_or_else(|| format!("signal {sig}"), str::to_owned);
        if self.signal.is_some() {
            if !self.killed {
                note!("charmrun: {name} again: killing the processes now");
                self.kill_at = Some(Instant::now());
            }
            return;
        }
        self.signal = Some(sig);
        // The first failure's status stands, as always; otherwise a shell's for a signal.
        self.status.get_or_insert(128 + sig);
        // Printed under ++quiet too, as every reason the job ends early.
        let running = procs.iter().filter(|p| p.running()).count();
        note!(
            "charmrun: received {name}; passing it to the {running} running process{} and \
             stopping the job",
            if running == 1 { "" } else { "es" }
        );
        for p in procs {
            p.signal(sig);
        }
        let deadline = Instant::now() + KILL_GRACE;
        self.kill_at = Some(self.kill_at.map_or(deadline, |t| t.min(deadline)));
    }
}

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
        let signals = SIGNALS.load(Ordering::SeqCst);
        if signals != s.signals_seen {
            s.signals_seen = signals;
            s.signalled(procs, SIGNAL.load(Ordering::SeqCst));
        }
        let mut running = 0;
        for i in 0..procs.len() {
            if !procs[i].running() {
                continue;
            }
            let (rank, pid) = (procs[i].rank, procs[i].pid);
            match procs[i].peek_exit() {
                Ok(None) => running += 1,
                Ok(Some(st)) => s.ended(procs, i, st),
                Err(e) => {
                    procs[i].ended = true;
                    if s.status.is_none() {
                        s.status = Some(1);
                        let others = procs.iter().filter(|p| p.running()).count();
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
                    .filter(|p| p.running())
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
                let others = procs.iter().filter(|p| p.running()).count();
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

    /// `child` as charmrun's rank 0, in the test's own process group: signalled alone, never
    /// as a group.
    fn proc_of(child: Child) -> Proc {
        Proc {
            rank: 0,
            pid: child.id(),
            child,
            own_group: false,
            ended: false,
            killed: false,
        }
    }

    fn supervised(server: &KvServer, proc: Proc) -> i32 {
        let opts = run_opts(&["++quiet", "unused"]);
        let mut procs = vec![proc];
        let status = supervise(&opts, server, &mut procs);
        reap_all(&mut procs, status != 0);
        status
    }

    /// The last process aborts and exits with 0 before charmrun looks at the server's events:
    /// the abort still makes the job fail.
    #[test]
    fn an_abort_queued_before_the_last_exit_fails_the_job() {
        let (server, _boot) = server_with_an_abort();
        let proc = proc_of(Command::new("true").spawn().unwrap());
        // Ended (with 0), unreaped, before supervision starts: its first look sees the end.
        let t = Instant::now();
        loop {
            match proc.peek_exit().unwrap() {
                Some(st) => break assert!(st.success(), "{st}"),
                None => assert!(t.elapsed() < Duration::from_secs(10), "`true` never ended"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(supervised(&server, proc), 1);
    }

    /// An exit seen without reaping gives the status `Child::wait` gives: exit codes, and
    /// signals with and without a core dump.
    #[test]
    fn peek_exit_reads_exit_codes_and_signals_without_reaping() {
        for (script, code) in [
            ("exit 0", 0),
            ("exit 3", 3),
            ("exit 255", 255),
            ("kill -TERM $$", 128 + 15),
            ("kill -KILL $$", 128 + 9),
            ("ulimit -c 0; kill -SEGV $$", 128 + 11),
        ] {
            let proc = proc_of(Command::new("sh").args(["-c", script]).spawn().unwrap());
            let t = Instant::now();
            let seen = loop {
                if let Some(st) = proc.peek_exit().unwrap() {
                    break st;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{script}: never ended"
                );
                std::thread::sleep(Duration::from_millis(5));
            };
            // Still there to reap, with the same status.
            assert_eq!(proc.peek_exit().unwrap(), Some(seen), "{script}");
            let mut child = proc.child;
            let reaped = child.wait().unwrap();
            assert_eq!(seen, reaped, "{script}");
            assert_eq!(code_of(seen), code, "{script}");
        }
    }

    /// An aborting process that does not exit is killed after the grace; the job's status is
    /// the abort's (1), not that SIGKILL's (137).
    #[test]
    fn killing_a_lingering_aborter_does_not_make_the_status() {
        let (server, _boot) = server_with_an_abort();
        let proc = proc_of(Command::new("sleep").arg("60").spawn().unwrap());
        let t = Instant::now();
        assert_eq!(supervised(&server, proc), 1);
        assert!(
            t.elapsed() < KILL_GRACE + Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }
}
