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
//! group, so it can read the terminal and gets its ^C, ^\ and ^Z directly.
//! (A terminal set to `stty tostop` stops the other ranks when they write to
//! it.)
//!
//! # Signals
//!
//! "A rank's group" below is the process group the rank leads: the rank and
//! whatever it started that stayed in that group (a wrapper script's
//! program, its background jobs).
//!
//! * SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to charmrun (by `kill`, a
//!   batch system, `timeout`, or the terminal's ^C and ^\): passed to every
//!   rank's group, and the job ends (see "Job status and failures").
//! * SIGTSTP (^Z, `kill -TSTP`): passed to every rank's group; then charmrun
//!   stops itself. SIGCONT (`fg`, `bg`, `kill -CONT`) sent to charmrun is
//!   passed on likewise; one that comes just as charmrun stops itself may be
//!   overtaken by that stop, and the job then stays stopped until the next
//!   SIGCONT. (The group of a rank that has ended is orphaned, and
//!   the kernel discards SIGTSTP there: what such a rank left running goes
//!   on. Time runs on while stopped: a job stopped before its start-up fence
//!   may time out there when resumed.)
//! * Rank 0 in charmrun's group (the terminal case above) gets each of these
//!   by its pid only: what it started gets only what is sent to charmrun's
//!   whole group (the terminal's ^C, ^\, ^Z; `fg`), and not charmrun's
//!   SIGKILL at the end of the grace.
//! * A signal charmrun was started with ignored (as by `nohup`) stays
//!   ignored, and is not passed on; but with SIGCONT ignored, charmrun still
//!   resumes the processes it stopped on SIGTSTP once it is continued itself.
//! * SIGKILL of charmrun, which it cannot catch: the kernel kills every rank
//!   (`PR_SET_PDEATHSIG`, Linux), and charmrun's watch process
//!   (`charmrun-watch`, a child of charmrun in a process group of its own)
//!   sees charmrun gone and kills every rank's group except rank 0's in the
//!   terminal case: there, what rank 0 started survives.
//! * SIGKILL of charmrun's whole process group (as a test harness or a batch
//!   system may do): the same, and whatever is in that group dies with it
//!   (in the terminal case rank 0 and what it started).
//! * Out of reach of all of these: a process that left its rank's group
//!   (`setsid`, a daemon, a job of a shell with job control), and, after a
//!   SIGKILL of charmrun, what the ranks started if the watch process was
//!   killed too. So a wrapper script should `exec` the program
//!   (`exec ./app "$@"`): the rank is then the program itself, which
//!   everything above reaches.
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
//! * SIGINT, SIGTERM, SIGHUP or SIGQUIT sent to charmrun (unless it was
//!   started with that signal ignored, as by `nohup`): charmrun prints the
//!   signal, passes it on (see "Signals"), gives the processes [`KILL_GRACE`],
//!   kills what is left (SIGKILL, with the groups) and exits with
//!   `128 + signal` (unless a process had failed first: its status stands).
//!   A second such signal kills them at once.
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
//!   notice the closed connection and exit; the others are killed (see
//!   "Signals", SIGKILL).

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
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
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
/// not inherit: PMIx's (a process would join the outer job), the host placement of OpenMPI and
/// Slurm (every process would pin its PEs to the same cores), and the task count of an `srun`
/// step (a process would take itself for one of its tasks and refuse to run).
fn is_outer_launcher_var(name: &str) -> bool {
    name.starts_with("PMIX_")
        || name.starts_with("PMI_")
        || name.starts_with("OMPI_COMM_WORLD_")
        || matches!(
            name,
            "SLURM_LOCALID" | "SLURM_NTASKS_PER_NODE" | "SLURM_STEP_NUM_TASKS" | "SLURM_PROCID"
        )
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
        3 => "SIGQUIT",
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
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The last of [`FORWARDED`] charmrun received.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// How many of [`FORWARDED`] charmrun received since its handlers were installed.
static SIGNALS: AtomicU32 = AtomicU32::new(0);

/// How many SIGTSTP and SIGCONT charmrun received since its handlers were installed.
static JOB_CONTROL: AtomicU32 = AtomicU32::new(0);
/// Whether the last of them was SIGTSTP (the job is to stop) rather than SIGCONT.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Whether charmrun catches SIGTSTP (it was not ignored when its handlers were installed).
static CATCHES_TSTP: AtomicBool = AtomicBool::new(false);

/// The handler of [`FORWARDED`]: records the signal for the supervision loop (atomic stores
/// only, which are async-signal-safe).
extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// The handler of SIGTSTP and SIGCONT: records which came last for the supervision loop
/// (atomic stores only, which are async-signal-safe). Each blocks the other while it runs, and
/// charmrun's other threads block both ([`with_handled_signals_blocked`]), so the flag and the
/// count change in the order the signals came.
extern "C" fn on_job_control(sig: libc::c_int) {
    STOP_REQUESTED.store(sig == libc::SIGTSTP, Ordering::SeqCst);
    JOB_CONTROL.fetch_add(1, Ordering::SeqCst);
}

/// What [`on_job_control`] blocks while it runs.
const JOB_CONTROL_BLOCKED: &[libc::c_int] = &[libc::SIGTSTP, libc::SIGCONT];

/// Installs `handler` for `sig` unless `sig` is ignored (as whoever started charmrun left it);
/// returns the previous action, to be restored, if it installed it. `blocked` are blocked while
/// the handler runs.
fn install_handler(
    sig: libc::c_int,
    handler: extern "C" fn(libc::c_int),
    blocked: &[libc::c_int],
) -> Option<libc::sigaction> {
    // SAFETY: `sigaction` is plain data, for which all-zero bytes are a valid value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `old`, a valid, writable
    // `sigaction`.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0
        || old.sa_sigaction == libc::SIG_IGN
    {
        return None;
    }
    set_handler(sig, handler, blocked)
}

/// Sets the action of `sig` to `handler`, whatever it was; returns the previous action, or
/// `None` if it could not. `blocked` are blocked while the handler runs.
fn set_handler(
    sig: libc::c_int,
    handler: extern "C" fn(libc::c_int),
    blocked: &[libc::c_int],
) -> Option<libc::sigaction> {
    // SAFETY: `sigaction` is plain data, for which all-zero bytes are a valid value.
    let (mut new, mut old): (libc::sigaction, libc::sigaction) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    new.sa_sigaction = handler as libc::sighandler_t;
    // SA_RESTART: charmrun's own calls (and those of any thread that does not block the
    // signal) resume rather than fail with EINTR.
    new.sa_flags = libc::SA_RESTART;
    // SAFETY: `new.sa_mask` is a valid `sigset_t` to initialise and fill with valid signal
    // numbers; `new` is a complete action whose handler (one of `on_signal` and
    // `on_job_control`) only does atomic operations (async-signal-safe) and lives for the whole
    // program; `old` is valid and writable.
    let installed = unsafe {
        libc::sigemptyset(&mut new.sa_mask);
        for &b in blocked {
            libc::sigaddset(&mut new.sa_mask, b);
        }
        libc::sigaction(sig, &new, &mut old) == 0
    };
    installed.then_some(old)
}

/// Runs `f` with [`FORWARDED`], SIGTSTP and SIGCONT blocked on this thread, so that the threads
/// it starts block them (a thread starts with the mask of the one that started it), and only
/// charmrun's main thread runs its handlers. (A blocked SIGCONT still continues the process;
/// a signal that comes meanwhile waits until the mask is restored.)
fn with_handled_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: `sigset_t` is plain data, for which all-zero bytes are a valid value.
    let (mut set, mut old): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: `set` and `old` are valid, writable signal sets, `set` filled with valid signal
    // numbers; `pthread_sigmask` changes this thread's mask only.
    let blocked = unsafe {
        libc::sigemptyset(&mut set);
        for sig in FORWARDED.into_iter().chain([libc::SIGTSTP, libc::SIGCONT]) {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) == 0
    };
    let result = f();
    if blocked {
        // SAFETY: `old` is the mask `pthread_sigmask` returned, set back as it was.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
    }
    result
}

/// Sets the action of `sig` to `action` (`SIG_DFL` or `SIG_IGN`).
fn set_disposition(sig: libc::c_int, action: libc::sighandler_t) {
    // SAFETY: all-zero is a valid `sigaction`; `act` is then complete (a default or ignore
    // action with an empty mask); a null pointer asks for no copy of the old action.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = action;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(sig, &act, std::ptr::null_mut());
    }
}

/// Charmrun's handlers of [`FORWARDED`], SIGTSTP and SIGCONT while a job runs; the previous
/// dispositions come back when dropped.
struct SignalHandlers {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalHandlers {
    /// Installs [`on_signal`] for each of [`FORWARDED`] and [`on_job_control`] for SIGTSTP and
    /// SIGCONT, those that are not ignored: a signal ignored by whoever started charmrun
    /// (`nohup`, a background job of a non-interactive shell) stays ignored, and the processes
    /// inherit that as before.
    fn install() -> SignalHandlers {
        SIGNALS.store(0, Ordering::SeqCst);
        JOB_CONTROL.store(0, Ordering::SeqCst);
        STOP_REQUESTED.store(false, Ordering::SeqCst);
        let mut previous = Vec::new();
        for sig in FORWARDED {
            if let Some(old) = install_handler(sig, on_signal, &[]) {
                previous.push((sig, old));
            }
        }
        let mut catches_tstp = false;
        for sig in [libc::SIGTSTP, libc::SIGCONT] {
            if let Some(old) = install_handler(sig, on_job_control, JOB_CONTROL_BLOCKED) {
                catches_tstp |= sig == libc::SIGTSTP;
                previous.push((sig, old));
            }
        }
        CATCHES_TSTP.store(catches_tstp, Ordering::SeqCst);
        SignalHandlers { previous }
    }
}

/// Blocks SIGTSTP on this thread only; returns the mask it had, for [`set_mask`].
fn block_tstp() -> libc::sigset_t {
    // SAFETY: all-zero is a valid `sigset_t`; `set` is then initialised and given a valid
    // signal number, `old` is valid and writable; `pthread_sigmask` changes this thread's mask
    // only.
    unsafe {
        let (mut set, mut old): (libc::sigset_t, libc::sigset_t) =
            (std::mem::zeroed(), std::mem::zeroed());
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTSTP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// Sets this thread's signal mask back to `old`, from [`block_tstp`].
fn set_mask(old: &libc::sigset_t) {
    // SAFETY: `old` is a mask `pthread_sigmask` returned; a null pointer asks for no copy.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
    }
}

/// Sends `sig` to this thread.
fn raise(sig: libc::c_int) {
    // SAFETY: `raise` takes a plain signal number; each caller has seen to what it does (no
    // handler of ours runs for it).
    unsafe {
        libc::raise(sig);
    }
}

/// Stops charmrun itself, as SIGTSTP would have without its handler, unless a SIGCONT came
/// since the stop was decided (`seen` is the [`JOB_CONTROL`] count it was decided on); returns
/// whether it went on to stop (also when a SIGCONT then discarded the pending SIGTSTP), and then
/// returns once charmrun is continued. The kernel discards a
/// SIGTSTP in an orphaned process group (of which no shell would continue a job): unless
/// charmrun's group is surely not orphaned, charmrun stops with SIGSTOP, which always stops (its
/// processes were stopped already, and whoever sent the SIGTSTP expects charmrun stopped too; a
/// shell then says "Stopped (signal)" or the like rather than "Stopped").
///
/// Runs on charmrun's main thread, the only one that takes SIGTSTP and SIGCONT
/// ([`with_handled_signals_blocked`]). With SIGTSTP, the stop signal is sent while SIGTSTP is
/// blocked on this thread (it stays pending until unblocked), and the count is checked after;
/// SIGSTOP cannot be blocked, and the count is checked just before. Then:
///
/// * A SIGCONT counted by its handler before the check cancels the stop. One sent after the
///   stop signal resumes charmrun (with SIGTSTP still pending, the kernel discards it), and is
///   counted if caught. Either way, the supervision loop then passes the continue on.
/// * SIGTSTP has its default action only while it is blocked (one that comes then merges into
///   this stop), and from when charmrun is continued until its handler is back: one that comes
///   then stops charmrun at once, uncounted; the whole job stays stopped then (charmrun has not
///   passed the continue on yet), and the next SIGCONT resumes it.
/// * Not guaranteed: a SIGCONT sent just before the stop signal but not counted before the
///   check (its handler had not run, or, with SIGSTOP, ran after the check) is overtaken by the
///   stop: the kernel discards a pending SIGCONT when a stop signal is sent. Charmrun then stops
///   all the same, and the job stays stopped until the next SIGCONT, which resumes it all. And
///   a SIGCONT that cancels the stop after the SIGTSTP was sent cancels with it another SIGTSTP
///   that merged into it.
///
/// Once charmrun is continued, the supervision loop compares [`JOB_CONTROL`] with `seen` again
/// and handles the latest state: after exactly the one SIGCONT that continued charmrun it is
/// `seen + 1` with [`STOP_REQUESTED`] clear, and the loop passes it on; after more signals it
/// passes on a continue, or stops the job again (maybe redundantly); [`Supervision::stop`]
/// resumes the job on a continue that no handler counted.
fn stop_self(seen: u32) -> bool {
    if !CATCHES_TSTP.load(Ordering::SeqCst) {
        return false;
    }
    if !group_surely_not_orphaned() {
        // SIGSTOP can be neither blocked nor caught: the count can only be checked before.
        if JOB_CONTROL.load(Ordering::SeqCst) != seen {
            return false;
        }
        raise(libc::SIGSTOP);
        return true;
    }
    let mask = block_tstp();
    set_disposition(libc::SIGTSTP, libc::SIG_DFL);
    let mut stop = JOB_CONTROL.load(Ordering::SeqCst) == seen;
    if stop {
        // Pending until unblocked below: SIGTSTP is blocked, and now has its default action.
        raise(libc::SIGTSTP);
        if JOB_CONTROL.load(Ordering::SeqCst) != seen {
            // A SIGCONT was handled since the check: setting SIGTSTP ignored discards the
            // pending one, if the SIGCONT came too early for the kernel to have done so.
            set_disposition(libc::SIGTSTP, libc::SIG_IGN);
            stop = false;
        }
    }
    if stop {
        // The pending SIGTSTP stops charmrun here; the SIGCONT that continues it runs its
        // handler before this returns.
        set_mask(&mask);
    }
    // Back to charmrun's handler (it was installed: [`CATCHES_TSTP`]); if the stop was cancelled,
    // before SIGTSTP is unblocked, so that one that came meanwhile is handled and counted.
    let _ = set_handler(libc::SIGTSTP, on_job_control, JOB_CONTROL_BLOCKED);
    if !stop {
        set_mask(&mask);
    }
    stop
}

/// Whether charmrun's process group is surely not orphaned: charmrun, or an ancestor of it in
/// its group, has its parent in another group of the same session (as a shell's job). `false`
/// when that cannot be found (another member of the group might still keep it from being
/// orphaned).
fn group_surely_not_orphaned() -> bool {
    // SAFETY: these take and return plain integers.
    let (pgrp, sid, mut ppid) = unsafe { (libc::getpgrp(), libc::getsid(0), libc::getppid()) };
    for _ in 0..64 {
        if ppid <= 0 {
            return false;
        }
        // SAFETY: these take and return plain integers.
        let (ppgrp, psid) = unsafe { (libc::getpgid(ppid), libc::getsid(ppid)) };
        if ppgrp < 0 || psid < 0 {
            return false;
        }
        if ppgrp != pgrp {
            return psid == sid;
        }
        // The parent is in charmrun's group too: its own parent decides.
        ppid = match parent_of(ppid) {
            Some(p) => p,
            None => return false,
        };
    }
    false
}

/// The parent of process `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; the name may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
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
/// While it runs, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGTSTP and SIGCONT
/// (those not ignored) are caught by handlers of its own, process-wide; the
/// previous dispositions come back when it returns. It also forks a watch
/// process (see the crate docs, "Signals"), which it ends and reaps before
/// it returns.
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
    // Kills the ranks' process groups if charmrun dies. Forked before any thread of charmrun's
    // own starts (the key-value server's), so from charmrun alone, with no socket of the job.
    let watcher = Watcher::start(nprocs as usize);
    // The server's threads (and those they start) block the signals charmrun handles: its
    // handlers run on this thread, one at a time.
    let (server, addr) = match with_handled_signals_blocked(|| KvServer::start(nprocs, secret)) {
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
            Ok(child) => {
                if own_group {
                    if let Some(w) = &watcher {
                        w.watch(child.id());
                    }
                }
                procs.push(Proc {
                    rank,
                    pid: child.id(),
                    child,
                    own_group,
                    ended: false,
                    killed: false,
                });
            }
            Err(e) => {
                note!("charmrun: cannot start {prog:?} (rank {rank}): {e}");
                kill_all(&mut procs);
                // Before the processes are reaped: their group ids stay theirs while it may
                // kill them.
                if let Some(w) = watcher {
                    w.disarm();
                }
                reap_all(&mut procs, true);
                return EXIT_SPAWN;
            }
        }
    }
    let status = supervise(opts, &server, &mut procs);
    if let Some(w) = watcher {
        w.disarm();
    }
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

/// Charmrun's watch process: a child of charmrun in a process group of its own, which kills the
/// process group of every rank charmrun tells it of (SIGKILL) as soon as charmrun is gone,
/// however it ended (SIGKILL included, of charmrun alone or of its whole process group, which
/// the watch process is not in). The parent-death signal reaches only charmrun's children,
/// not what they started, and is not inherited by their children.
///
/// Charmrun sends each rank's pid over a connected pair of Unix sockets, of which it holds the
/// only copy of one end; the watch process reads the other. When charmrun ends, however it
/// ends, the kernel closes its end, and the watch process reads the end of the stream and
/// kills. A job that ends under charmrun's supervision [`disarm`](Watcher::disarm)s it first:
/// charmrun then ends the processes itself, and leaves a successful job's leftovers alone.
struct Watcher {
    /// The watch process's pid.
    pid: libc::pid_t,
    /// Charmrun's end of the socket pair; `None` once disarmed.
    write: Option<std::os::fd::OwnedFd>,
}

/// The name the watch process shows (`ps -o comm`), 15 bytes at most.
#[cfg(target_os = "linux")]
const WATCHER_NAME: &[u8] = b"charmrun-watch\0";

impl Watcher {
    /// Starts the watch process for at most `capacity` ranks; `None` (after a message) if it
    /// cannot be started: the job runs without it.
    fn start(capacity: usize) -> Option<Watcher> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two descriptors. SOCK_CLOEXEC: the
        // processes charmrun starts do not keep its end open (it is closed when they exec).
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            note!(
                "charmrun: cannot start its watch process (socketpair: {}); continuing \
                 without it",
                std::io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: `socketpair` returned two new descriptors, owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Where the watch process keeps the pids, allocated here: it may not allocate.
        let mut pids: Vec<libc::pid_t> = vec![0; capacity];
        // The descriptors it closes when `close_range` is missing (Linux before 5.9).
        // SAFETY: `sysconf` takes and returns plain integers.
        let open_max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
        let open_max = libc::c_int::try_from(open_max.clamp(1024, 1 << 20)).unwrap_or(1 << 20);
        let read_fd = std::os::fd::AsRawFd::as_raw_fd(&read);
        let pids_ptr = pids.as_mut_ptr();
        // SAFETY: `fork` takes nothing; what the child may do is below.
        match unsafe { libc::fork() } {
            -1 => {
                note!(
                    "charmrun: cannot start its watch process (fork: {}); continuing without it",
                    std::io::Error::last_os_error()
                );
                None
            }
            // SAFETY: this is the child of the fork. Charmrun may have had other threads (the
            // key-value server's, or the caller's): `watch_process` makes only async-signal-safe calls,
            // allocates nothing and never returns (`_exit`), so no lock another thread held and
            // no destructor is touched. `pids_ptr` points to the child's own copy of `pids`, of
            // `capacity` elements (the parent's was alive at the fork).
            0 => unsafe { watch_process(read_fd, pids_ptr, capacity, open_max) },
            pid => {
                // Also here, as shells do: in its own group before any rank starts, whichever of
                // the two calls comes first (an error: it is in it already, or dead).
                // SAFETY: `setpgid` takes plain integers; `pid` is our unreaped child.
                unsafe {
                    libc::setpgid(pid, pid);
                }
                drop(read);
                drop(pids);
                Some(Watcher {
                    pid,
                    write: Some(write),
                })
            }
        }
    }

    /// Tells the watch process of the rank of pid `pid`, which leads its own process group.
    fn watch(&self, pid: u32) {
        let Some(write) = &self.write else { return };
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return;
        };
        let bytes = pid.to_ne_bytes();
        loop {
            // SAFETY: `bytes` is valid for its length; the socket is open (owned by self). A
            // blocking stream socket sends four bytes whole; MSG_NOSIGNAL: a watch process
            // gone is an error (EPIPE), not a SIGPIPE.
            let n = unsafe {
                libc::send(
                    std::os::fd::AsRawFd::as_raw_fd(write),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // Anything else: sent, or the watch process is gone and there is nothing to do.
            return;
        }
    }

    /// Ends the watch process without it killing anything (charmrun ends the job itself).
    fn disarm(mut self) {
        // SAFETY: kill(2) takes plain integers; `self.pid` is our child, not yet reaped, so
        // the id is still its own.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        self.reap();
        self.write = None;
    }

    /// Waits for the watch process to end, and reaps it.
    fn reap(&self) {
        loop {
            let mut status = 0;
            // SAFETY: `status` is valid and writable; `self.pid` is our child.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if rc == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {
                continue;
            }
            return;
        }
    }
}

impl Drop for Watcher {
    /// Not disarmed (a return before the supervision or a panic): closing charmrun's end makes
    /// the watch process kill the process groups it was told of (none before the first rank
    /// started), then it is reaped.
    fn drop(&mut self) {
        if self.write.take().is_some() {
            self.reap();
        }
    }
}

/// The watch process (see [`Watcher`]), in the child of a `fork` of charmrun, which may have
/// had other threads: only async-signal-safe calls, no allocation, no return. `read_fd` is its
/// end of the socket pair (every other descriptor, charmrun's end included, is closed here);
/// `pids` has room for `capacity` pids; `open_max` bounds the descriptors to close without
/// `close_range`.
///
/// # Safety
///
/// Only in the child of a `fork`, with `pids` valid for writes of `capacity` elements.
unsafe fn watch_process(
    read_fd: libc::c_int,
    pids: *mut libc::pid_t,
    capacity: usize,
    open_max: libc::c_int,
) -> ! {
    // SAFETY: the caller guarantees the child of a fork and `pids`. Every call below is
    // async-signal-safe (setpgid, close, the close_range and prctl system calls, `signal`,
    // read, kill, _exit; errno is a thread-local read) and nothing allocates or takes a lock.
    // `read` writes within `pids` (at byte `filled` < `room`, at most `room - filled` bytes) or
    // within `scratch`; the pids read back are whole ones written there.
    unsafe {
        // Out of charmrun's process group: a SIGKILL of that group does not reach it.
        libc::setpgid(0, 0);
        // Charmrun's signals of the job, the terminal's and a hang-up do not end it: only
        // charmrun's end (or SIGKILL) does.
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGPIPE,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGALRM,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Nothing of charmrun's stays open here: not its standard output and error (whoever
        // reads them would wait for this process), not the key-value server's sockets (a
        // connection closed by charmrun would stay open), not charmrun's end of the pair.
        close_all_but(read_fd, open_max);
        #[cfg(target_os = "linux")]
        {
            let zero: libc::c_ulong = 0;
            libc::prctl(
                libc::PR_SET_NAME,
                WATCHER_NAME.as_ptr() as libc::c_ulong,
                zero,
                zero,
                zero,
            );
        }
        let size = std::mem::size_of::<libc::pid_t>();
        let room = capacity * size;
        let buf = pids.cast::<u8>();
        let mut filled = 0usize;
        let mut scratch = [0u8; 64];
        loop {
            let (at, len) = if filled < room {
                (buf.add(filled), room - filled)
            } else {
                // More than it has room for (charmrun writes one pid per rank): dropped.
                (scratch.as_mut_ptr(), scratch.len())
            };
            let n = libc::read(read_fd, at.cast(), len);
            if n > 0 {
                if filled < room {
                    filled += n as usize;
                }
                continue;
            }
            // (Reading errno allocates nothing.)
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // The end of the stream: charmrun is gone (or an error: it cannot watch any more).
            break;
        }
        for i in 0..filled / size {
            let pid = *pids.add(i);
            if pid > 0 {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        libc::_exit(0)
    }
}

/// Closes every descriptor but `keep` (see [`watch_process`]: async-signal-safe calls only).
///
/// # Safety
///
/// Only where no other code uses descriptors (the child of a `fork`).
unsafe fn close_all_but(keep: libc::c_int, open_max: libc::c_int) {
    // SAFETY: the caller guarantees nobody else uses the descriptors; `close_range` and `close`
    // take plain integers.
    unsafe {
        #[cfg(target_os = "linux")]
        {
            let keep = libc::c_ulong::try_from(keep).unwrap_or(0);
            let all = libc::c_ulong::from(u32::MAX);
            let zero: libc::c_ulong = 0;
            let below =
                keep == 0 || libc::syscall(libc::SYS_close_range, zero, keep - 1, zero) == 0;
            if below && libc::syscall(libc::SYS_close_range, keep + 1, all, zero) == 0 {
                return;
            }
        }
        for fd in 0..open_max {
            if fd != keep {
                libc::close(fd);
            }
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
    /// The [`JOB_CONTROL`] count handled.
    job_control_seen: u32,
    /// SIGTSTP stopped the job and no SIGCONT has resumed it yet.
    stopped: bool,
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

impl Supervision {
    /// Charmrun received SIGTSTP (the terminal's ^Z, or `kill -TSTP`), the last job-control
    /// signal of count `seen`: it passes it on to every process as the other signals, then stops
    /// itself until a SIGCONT (see [`stop_self`]). The supervision loop then handles the latest
    /// state, as `seen` is its [`JOB_CONTROL`] count handled.
    fn stop(&mut self, opts: &Options, procs: &[Proc], seen: u32) {
        if !opts.quiet {
            let running = procs.iter().filter(|p| p.running()).count();
            note!(
                "charmrun: received SIGTSTP; stopping the {running} running process{} and \
                 charmrun",
                if running == 1 { "" } else { "es" }
            );
        }
        for p in procs {
            p.signal(libc::SIGTSTP);
        }
        self.stopped = true;
        // Continued: after exactly the one SIGCONT that continued charmrun, the count is
        // `seen + 1` with the stop flag clear, and the loop passes that on; after more signals,
        // the loop handles the last of them. Still `seen`: no handler counted the continue
        // (SIGCONT was ignored when charmrun started), which the loop would not see; the
        // processes, stopped by charmrun, are resumed with it all the same.
        if stop_self(seen) && JOB_CONTROL.load(Ordering::SeqCst) == seen {
            self.resume(opts, procs);
        }
    }

    /// Charmrun received SIGCONT (`fg`, `bg`, `kill -CONT`), the last job-control signal: it
    /// passes it on to every process (harmless to one not stopped).
    fn resume(&mut self, opts: &Options, procs: &[Proc]) {
        if self.stopped && !opts.quiet {
            note!("charmrun: received SIGCONT; resuming the processes");
        }
        self.stopped = false;
        for p in procs {
            p.signal(libc::SIGCONT);
        }
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
        let job_control = JOB_CONTROL.load(Ordering::SeqCst);
        if job_control != s.job_control_seen {
            s.job_control_seen = job_control;
            if STOP_REQUESTED.load(Ordering::SeqCst) {
                s.stop(opts, procs, job_control);
            } else {
                s.resume(opts, procs);
            }
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
