//! Starting and ending a job: [`start`], [`Runtime`], and the calls every PE can make
//! ([`my_pe`], [`num_pes`], [`exit`], [`abort`], …).
//!
//! A job in one process is P PE threads (pinned to cores when there are enough) sharing a
//! [`Shared`] block. The program's entry point runs as a task on PE 0. The job ends when some PE
//! calls [`exit`] or the job aborts (a panic in user code, or [`abort`]); the first outcome wins.

use crate::envelope::{Control, Envelope, LocalTask};
use crate::error::{Error, Result};
use crate::options::Options;
use crate::registry::EntryTable;
use crate::scheduler::{on_pe, run_pe, with_pe, AbortUnwind, Outcome, Shared};
use charmrs_transport::Topology;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// Configures and runs a job inside the calling process. [`start`] is the usual front door; this
/// is for embedding a job (tests, benchmarks) and getting its exit code back instead of exiting.
///
/// ```
/// use charmrs::Runtime;
/// let code = Runtime::new(2)
///     .run(|_args| async move {
///         assert_eq!(charmrs::num_pes(), 2);
///         charmrs::exit(7);
///     })
///     .unwrap();
/// assert_eq!(code, 7);
/// ```
#[derive(Debug, Clone)]
pub struct Runtime {
    options: Options,
    args: Vec<String>,
    /// How long `run` waits for PE threads to finish after the job ended.
    join_grace: Duration,
    /// The process exits as soon as `run` returns (`start`): the layer may leave its library's
    /// handles to the exit (see `MachineLayer::exit_follows`).
    exit_follows: bool,
}

impl Runtime {
    /// A job of `pes` PEs (at least 1) with default options.
    pub fn new(pes: usize) -> Runtime {
        // An embedded job (test, benchmark) is one process even under a launcher.
        let options = Options {
            pes: Some(pes.max(1)),
            local_only: true,
            ..Options::default()
        };
        Runtime {
            options,
            args: vec!["charmrs".into()],
            join_grace: Duration::from_secs(10),
            exit_follows: false,
        }
    }

    /// Takes runtime options (`+pN`, …) from `args` and `CHARMRS_PES`; the rest become the
    /// program's arguments.
    ///
    /// # Errors
    /// A bad option; the message names it and lists the valid ones.
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Runtime> {
        let (options, args) = Options::parse(args, std::env::var("CHARMRS_PES").ok())?;
        Ok(Runtime {
            options,
            args,
            join_grace: Duration::from_secs(10),
            exit_follows: false,
        })
    }

    /// Sets whether PE threads are pinned to cores (when there are at least as many cores).
    pub fn affinity(mut self, pin: bool) -> Runtime {
        self.options.affinity = pin;
        self
    }

    /// Sets how long an idle PE polls before it parks.
    pub fn idle_spin(mut self, spin: Duration) -> Runtime {
        self.options.idle_spin = spin;
        self
    }

    /// Load-balancing strategy used at [`Ctx::at_sync`](crate::Ctx::at_sync) (`+balancer NAME`:
    /// `GreedyRefine`, `Greedy`, `Refine`, `Hierarchical`, `Rotate`, `Random`, `Dummy`). An
    /// unknown name fails [`run`](Runtime::run) with the list of valid ones.
    pub fn balancer(mut self, strategy: &str) -> Runtime {
        self.options.balancer = Some(strategy.to_string());
        self
    }

    /// Also balance every `period` without waiting for `at_sync` (`+LBPeriod`; needs a
    /// [`balancer`](Runtime::balancer)).
    pub fn lb_period(mut self, period: Duration) -> Runtime {
        self.options.lb_period_ms = Some(period.as_millis().max(1) as u64);
        self
    }

    /// Records every PE's timeline (entry methods, resumed suspended entries, idle periods) and
    /// writes it at the end of the job to `path` as Chrome trace JSON, which
    /// [Perfetto](https://ui.perfetto.dev) and `chrome://tracing` open; prints a summary to
    /// standard error: each PE's time in entries, idle and other, each entry's calls and time,
    /// and the messages and bytes that crossed the machine layer (`+trace FILE` on the command
    /// line). A multi-process job writes one file per process, the rank before the extension
    /// (`trace.json` → `trace.1.json`).
    ///
    /// ```
    /// let dir = std::env::temp_dir().join(format!("charmrs-doc-trace-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let file = dir.join("trace.json");
    /// charmrs::Runtime::new(2)
    ///     .affinity(false)
    ///     .trace(&file)
    ///     .run(|_| async { charmrs::exit(0) })
    ///     .unwrap();
    /// let json = std::fs::read_to_string(&file).unwrap();
    /// assert!(json.starts_with("{\"traceEvents\":["));
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn trace(mut self, path: impl AsRef<std::path::Path>) -> Runtime {
        self.options.trace = Some(path.as_ref().to_path_buf());
        self
    }

    /// Print every load-balancing step (`+LBDebug`).
    pub fn lb_debug(mut self, on: bool) -> Runtime {
        self.options.lb_debug = on;
        self
    }

    /// Sends every entry call and creation between PEs through the inter-process wire format
    /// (encode, then decode), to prove that a program's arguments survive a multi-process run
    /// (`+wirecheck` on the command line).
    pub fn wire_check(mut self, on: bool) -> Runtime {
        self.options.wire_check = on;
        self
    }

    /// Sets the arguments handed to the entry point.
    pub fn args(mut self, args: Vec<String>) -> Runtime {
        self.args = args;
        self
    }

    /// Number of PEs this process will run: as set (`+p`, `CHARMRS_PES`, [`Runtime::new`]),
    /// else its share of the host's cores — every core its binding lists if a launcher bound it
    /// to a slice of the host of its own (`srun --cpu-bind=cores`, `mpirun --bind-to core`; see
    /// [`Topology::has_own_slice`]), else the cores it sees divided among the job's processes on
    /// the host (`OMPI_COMM_WORLD_LOCAL_SIZE`, `SLURM_STEP_TASKS_PER_NODE`, ...), at least one.
    pub fn pes(&self) -> usize {
        self.options.pes.unwrap_or_else(|| {
            let topology = Topology::detect();
            // A malformed setting is `run`'s error; here it counts as none.
            let host_procs = host_env().ok().flatten().map_or(1, |(_, n)| n);
            default_pes(
                topology.num_cores(),
                topology.has_own_slice(host_procs),
                host_procs,
            )
        })
    }

    /// Runs the job: `main(args)` runs as a task on PE 0; returns the code passed to [`exit`].
    ///
    /// # Errors
    /// [`Error::Aborted`] with the cause if the job aborted (a panic in an entry method names
    /// chare, index, entry and PE), or a start-up error.
    pub fn run<F, Fut>(self, main: F) -> Result<i32>
    where
        F: FnOnce(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        crate::panic::install_hook();
        // Large messages' buffers are reused, not handed back to the kernel after each one.
        charmrs_transport::allocator::keep_freed_message_memory();
        let pes = self.pes();
        if pes == 0 || pes > crate::MAX_PES {
            return Err(Error::Options(format!(
                "a process runs 1 to {} PEs, not {pes}",
                crate::MAX_PES
            )));
        }
        // Fails on an id collision, before any PE starts.
        let table = EntryTable::get()?;
        let machine = crate::machine::select(
            self.options.local_only,
            self.options.machine.as_deref(),
            pes,
        )?;
        let total = pes.saturating_mul(machine.layer.size() as usize);
        if total > crate::MAX_PES {
            return Err(Error::Options(format!(
                "{} processes of {pes} PEs make {total} PEs, more than a job may have ({})",
                machine.layer.size(),
                crate::MAX_PES
            )));
        }
        let first = machine.layer.rank() as usize * pes;
        let trace = self
            .options
            .trace
            .clone()
            .map(|path| crate::trace::TraceSink::new(path, first..first + pes));
        // Files written at the end of the job, or at each balancing step (by process 0): a path
        // that cannot be written is refused now, not found out after the run. It may fail in
        // one process only (a directory one host lacks): the launcher is told, since the
        // others would wait for this one.
        let (rank, size) = (machine.layer.rank(), machine.layer.size());
        if let Err(e) = self.check_output_files(trace.as_ref(), rank, size) {
            machine
                .layer
                .abort(&format!("charmrs: process {rank}: {e}"));
            return Err(e);
        }
        let shared = Arc::new(Shared::new(
            pes,
            self.options.idle_spin,
            self.options.wire_check,
            machine,
            table,
            crate::balance::BalanceConfig::from_options(&self.options)?,
            trace,
        ));
        let topology = Topology::detect();
        // Processes of one job on one host share its cores: this process's PEs take the cores
        // after those of the processes before it on the host, and pinning happens only if every
        // PE of the host gets a core of its own.
        let (host_rank, host_procs) = host_placement(shared.layer.rank(), shared.layer.size())
            .map_err(|e| start_failed(&shared, e.to_string()))?;
        let place = placement(
            &topology,
            topology.has_own_slice(host_procs),
            host_rank,
            host_procs,
            pes,
        );
        let pin = self.options.affinity && place.own_cores;
        let first_pe = shared.first_pe;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        if shared.layer.size() > 1 {
            if shared.layer.rank() != 0 {
                let hello = crate::wire::hello_message(table.checksum(), first_pe as u32);
                shared
                    .layer
                    .send(0, hello)
                    .map_err(|e| start_failed(&shared, format!("cannot reach process 0: {e}")))?;
            } else {
                check_hellos(&shared, table)?;
            }
            // Every process is up before any PE runs, so no process can finish the job (and
            // shut down) before another has even joined it.
            shared
                .layer
                .barrier()
                .map_err(|e| start_failed(&shared, format!("start-up barrier: {e}")))?;
            // The first PE polls the network (or, with a lane per PE, every PE its own lane),
            // woken by the layer if it can (else it naps).
            let lanes = shared.layer.lanes().clamp(1, pes);
            let mut wakes = true;
            for lane in 0..lanes {
                let weak = Arc::downgrade(&shared);
                let hook = Box::new(move || {
                    if let Some(s) = weak.upgrade() {
                        if let Some(m) = s.mailbox(s.first_pe + lane) {
                            m.wake();
                        }
                    }
                });
                wakes &= shared.layer.set_lane_wakeup(lane, hook);
            }
            let _ = shared.network_wakes.set(wakes);
            let _ = shared.network_pes.set(lanes);
        }
        // Whether idle PEs may poll without ever yielding: only if each has a core of its own.
        shared
            .own_cores
            .store(place.own_cores, std::sync::atomic::Ordering::Relaxed);
        let args = self.args;
        let mut first = Some(Envelope::new(
            0,
            Control::Spawn(Box::new(move || -> LocalTask { Box::pin(main(args)) })),
        ));
        for local in 0..pes {
            let pe = first_pe + local;
            let shared = shared.clone();
            let core = if pin {
                topology.core_for_pe(place.first_core + local)
            } else {
                None
            };
            let topology = topology.clone();
            // The entry point runs on PE 0 of the job, in process 0.
            let first = if pe == 0 { first.take() } else { None };
            let done = done_tx.clone();
            std::thread::Builder::new()
                .name(format!("pe-{pe}"))
                .stack_size(8 << 20)
                .spawn(move || {
                    if let Some(core) = core {
                        topology.pin_current_thread(core);
                    }
                    // A panic in the runtime itself (user code is caught where it runs) would
                    // otherwise end this thread silently and leave the job waiting forever.
                    let watch = Arc::clone(&shared);
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_pe(shared, pe, first)
                    }));
                    // `charmrs::abort` unwinds with `AbortUnwind` after ending the job itself.
                    if let Err(payload) = ran {
                        if payload.is::<AbortUnwind>() {
                            return;
                        }
                        watch.finish(Outcome::Abort(format!(
                            "charmrs: PE {pe} failed outside any entry method: {}",
                            crate::panic::describe(payload)
                        )));
                    }
                    // This thread's hold on the runtime (and so on the layer) goes before the
                    // word that it left: the main thread may then be the one to drop the layer
                    // (and exit the process, see `exit_follows`) as soon as every PE left.
                    drop(watch);
                    drop(done);
                })
                .map_err(|e| Error::Options(format!("cannot start the thread of PE {pe}: {e}")))?;
        }
        drop(done_tx);
        let outcome = shared.wait_outcome();
        // A multi-process job that ended well needs its PEs gone for the end-of-job handshake:
        // an entry still running elsewhere in this process (it ends before the PE stops) gets
        // as long as the handshake's own waits.
        let handshake = shared.layer.size() > 1 && matches!(outcome, Outcome::Exit(_));
        let grace = if handshake {
            self.join_grace.max(crate::scheduler::ENDING_WAIT)
        } else {
            self.join_grace
        };
        // Nothing is ever sent on `done`: every PE thread drops its sender when it leaves, so the
        // receive returns `Disconnected` once all have left, or times out after the grace period.
        let joined = !matches!(
            done_rx.recv_timeout(grace),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        );
        // Every process must know the job ended before any leaves (else a departure looks like a
        // crash to a process that has not read the end yet). Only with the PEs gone: this thread
        // is then the layer's only poller.
        if handshake {
            if joined {
                crate::scheduler::finish_job(&shared);
            } else {
                eprintln!(
                    "charmrs: process {}: an entry method still runs {} s after the job's exit; \
                     leaving without the end-of-job handshake (another process may report this \
                     one as lost)",
                    shared.layer.rank(),
                    grace.as_secs()
                );
            }
        }
        if let Some(trace) = &shared.trace {
            trace.finish(shared.layer.rank(), shared.layer.size());
        }
        if self.exit_follows {
            shared.layer.exit_follows();
        }
        match outcome {
            Outcome::Exit(code) => Ok(code),
            Outcome::Abort(msg) => Err(Error::Aborted(msg)),
        }
    }
}

/// Runs the program: parses runtime options from the command line, starts the PEs, runs `main`
/// on PE 0, and exits the process with the status passed to [`exit`] (1 after an abort, 2 for a
/// bad command line).
///
/// ```no_run
/// charmrs::start(|args| async move {
///     println!("{} PEs, arguments {:?}", charmrs::num_pes(), &args[1..]);
///     charmrs::exit(0);
/// })
/// ```
pub fn start<F, Fut>(main: F) -> !
where
    F: FnOnce(Vec<String>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    // `std::env::args` would panic on an argument that is not UTF-8 (charmrun passes them on).
    let args: std::result::Result<Vec<String>, _> = std::env::args_os()
        .map(std::ffi::OsString::into_string)
        .collect();
    let args = args.unwrap_or_else(|bad| {
        eprintln!("charmrs: an argument is not valid UTF-8: {bad:?}");
        std::process::exit(2);
    });
    let runtime = match Runtime::from_args(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("charmrs: {e}");
            std::process::exit(2);
        }
    };
    let mut runtime = runtime;
    runtime.join_grace = Duration::from_secs(1);
    runtime.exit_follows = true;
    let code = match runtime.run(main) {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("{e}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(process_status(code))
}

/// The process exit status for job status `code`: the operating system keeps only its low 8
/// bits, so a non-zero code whose low byte is 0 (`exit(256)`) becomes 1 rather than success.
fn process_status(code: i32) -> i32 {
    if code != 0 && code & 0xff == 0 {
        1
    } else {
        code
    }
}

/// `f` on the calling PE's state; panics (naming `what`) outside a running PE.
pub(crate) fn in_pe<R>(what: &'static str, f: impl FnOnce(&crate::scheduler::PeState) -> R) -> R {
    with_pe(what, f).unwrap_or_else(|e| panic!("{e}"))
}

/// The PE the caller runs on.
///
/// # Panics
/// Outside a running PE (before [`start`], or on a thread the runtime did not create).
pub fn my_pe() -> usize {
    in_pe("my_pe", |pe| pe.pe)
}

/// Number of PEs in the job.
///
/// # Panics
/// Outside a running PE.
pub fn num_pes() -> usize {
    in_pe("num_pes", |pe| pe.num_pes())
}

/// Whether the calling thread is a running PE (so runtime calls are allowed).
pub fn in_runtime() -> bool {
    on_pe()
}

/// Ends the job on every PE with status `code` once the calling entry returns; no further
/// messages are delivered.
///
/// [`start`] exits the process with `code` (the operating system keeps its low 8 bits, so a
/// non-zero code whose low byte is 0, such as 256, exits with 1); [`Runtime::run`] returns it:
///
/// ```
/// let code = charmrs::Runtime::new(2).run(|_| async {
///     charmrs::exit(3);
/// }).unwrap();
/// assert_eq!(code, 3);
/// ```
///
/// # Panics
/// Outside a running PE.
pub fn exit(code: i32) {
    in_pe("exit", |pe| pe.shared.finish(Outcome::Exit(code)))
}

/// Aborts the whole job: prints `msg` (with the calling PE) and exits with a non-zero status. The
/// calling entry method stops here.
pub fn abort(msg: &str) -> ! {
    if on_pe() {
        in_pe("abort", |pe| {
            pe.abort_job(format!("charmrs: abort on PE {}: {msg}", pe.pe))
        });
        std::panic::resume_unwind(Box::new(AbortUnwind));
    }
    let _ = std::io::stdout().flush();
    eprintln!("charmrs: abort: {msg}");
    std::process::exit(1)
}

/// How long process 0 waits for the other processes' hellos at start-up.
const HELLO_WAIT: Duration = Duration::from_secs(60);

/// The most PEs a job may have, over all its processes (2^24): a forwarded call carries the PE
/// it came from in 24 bits. More (`+p`, `CHARMRS_PES`, `Runtime::new`) is refused at start-up.
pub const MAX_PES: usize = 1 << 24;

/// Process 0, before the start-up barrier: reads every other process's hello (sent before that
/// process entered the barrier, so nothing else can be in flight: no PE runs anywhere yet) and
/// refuses the job, naming the process, if one runs a different program. Checked here rather
/// than among the first messages: with a lane per PE (`MachineLayer::lanes`) a hello is not
/// ordered before the calls that process's PEs send later.
/// A start-up step failed (`why`): the launcher is told (the other processes may wait for this
/// one in a fence), and the error returned.
fn start_failed(shared: &Shared, why: String) -> Error {
    let me = shared.layer.rank();
    shared.layer.abort(&format!("charmrs: process {me}: {why}"));
    Error::Options(why)
}

/// The build id in `hello`, in hex, if it is not this process's (both having one).
fn other_build(hello: &charmrs_transport::Message) -> Option<String> {
    let ours = crate::build_id::build_id()?;
    let theirs = hello.segments().first().filter(|id| !id.is_empty())?;
    (theirs.as_ref() != ours).then(|| hex(theirs))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_hellos(shared: &Shared, table: &EntryTable) -> Result<()> {
    let n = shared.layer.size() as usize;
    let mut seen = vec![false; n];
    seen[0] = true;
    let mut problem: Option<String> = None;
    let deadline = std::time::Instant::now() + HELLO_WAIT;
    while problem.is_none() && seen.contains(&false) {
        if std::time::Instant::now() >= deadline {
            let missing: Vec<usize> = (0..n).filter(|&p| !seen[p]).collect();
            problem = Some(format!(
                "processes {missing:?} did not report to process 0 within {HELLO_WAIT:?}"
            ));
            break;
        }
        let polled = shared.layer.progress_wait(
            &mut |src, msg| {
                let h = *msg.header();
                let why = if h.kind != crate::wire::KIND_HELLO {
                    format!(
                        "process {src} sent a message of kind {} before the job started",
                        h.kind
                    )
                } else if h.tag != table.checksum() {
                    format!(
                        "process {src} runs a different program: its entry table checksum is \
                         {:#x}, this process's is {:#x} (every process of a job must run the same \
                         binary)",
                        h.tag,
                        table.checksum()
                    )
                } else if let Some(theirs) = other_build(&msg) {
                    format!(
                        "process {src} runs another build of this program (build id {theirs}, \
                         this process's {}): every process of a job must run the same binary \
                         (was it rebuilt while the job started?)",
                        hex(crate::build_id::build_id().unwrap_or_default())
                    )
                } else if h.src_pe as usize != src as usize * shared.local_pes() {
                    // Its first PE is its rank times its PE count.
                    format!(
                        "process {src} runs {} PEs, process 0 runs {}: every process of a job \
                         needs the same number of PEs (+p, ++ppn, CHARMRS_PES)",
                        h.src_pe as usize / (src as usize).max(1),
                        shared.local_pes()
                    )
                } else {
                    if let Some(s) = seen.get_mut(src as usize) {
                        *s = true;
                    }
                    return;
                };
                problem.get_or_insert(why);
            },
            Duration::from_millis(10),
        );
        if let Err(e) = polled {
            problem = Some(format!("waiting for the other processes to start: {e}"));
        }
    }
    match problem {
        None => Ok(()),
        Some(why) => {
            let why = format!("charmrs: process 0: {why}");
            shared.layer.abort(&why);
            Err(Error::Options(why))
        }
    }
}

impl Runtime {
    /// Checks the files process `rank` of `size` will write: its `+trace` file, and (process 0)
    /// the `+LBDump` files' place.
    fn check_output_files(
        &self,
        trace: Option<&crate::trace::TraceSink>,
        rank: u32,
        size: u32,
    ) -> Result<()> {
        if let Some(t) = trace {
            check_writable(&t.file_for(rank, size), "+trace")?;
        }
        if let (Some(prefix), 0) = (&self.options.lb_dump, rank) {
            let probe = format!("{prefix}.probe-{}", std::process::id());
            check_writable(std::path::Path::new(&probe), "+LBDump")?;
        }
        Ok(())
    }
}

/// Checks that `file` can be written (creating its directory's entry if needed, and removing
/// it again if it did not exist), for option `option`.
///
/// # Errors
/// The file cannot be opened for writing: the message names the option, the file and why.
fn check_writable(file: &std::path::Path, option: &str) -> Result<()> {
    let refused = |e: std::io::Error| {
        Error::Options(format!(
            "{option} {}: cannot write there: {e}",
            file.display()
        ))
    };
    // Created here, so removed again: nobody else can have written it meanwhile.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(file);
            return Ok(());
        }
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(refused(e)),
        Err(_) => {}
    }
    // There already: a regular file must open for writing (left as it is); anything else (a
    // FIFO, whose opening would wait for a reader) is taken as the user's choice.
    match std::fs::metadata(file) {
        Ok(m) if m.is_dir() => Err(refused(std::io::Error::other("it is a directory"))),
        Ok(m) if m.is_file() => std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .map(drop)
            .map_err(refused),
        _ => Ok(()),
    }
}

/// This process's rank among the job's processes on this host, and their number: from the
/// launcher's environment ([`host_env`]), else — as with `charmrun`, which starts every process
/// on this host — the job rank and size.
///
/// # Errors
/// A malformed launcher setting ([`host_env`]).
fn host_placement(rank: u32, size: u32) -> Result<(usize, usize)> {
    let size = size.max(1) as usize;
    Ok(match host_env()? {
        // No more processes on the host than in the job.
        Some((r, n)) if r < n.min(size) => (r, n.min(size)),
        _ => (rank as usize, size),
    })
}

/// This process's rank among the job's processes on this host, and their number, as the
/// launcher says: `CHARMRS_LOCAL_RANK`/`CHARMRS_LOCAL_SIZE` (charmrun), OpenMPI's
/// `OMPI_COMM_WORLD_LOCAL_*`, Slurm's `SLURM_LOCALID` with this node's entry (`SLURM_NODEID`)
/// of `SLURM_STEP_TASKS_PER_NODE` — the step's, set by `srun` only: a program run directly in a
/// batch script sees the job's `SLURM_TASKS_PER_NODE` and `SLURM_LOCALID=0` but is one process.
/// `None` if none says.
///
/// # Errors
/// `CHARMRS_LOCAL_RANK`/`CHARMRS_LOCAL_SIZE` set but not a number, or a rank not below the
/// size: a hand-set or mistyped placement would otherwise pin PEs to another process's cores
/// without a word. A launcher's own variables that say something odd are passed over.
fn host_env() -> Result<Option<(usize, usize)>> {
    host_env_from(|name| std::env::var(name).ok())
}

/// [`host_env`] with the environment read through `get`.
fn host_env_from(get: impl Fn(&str) -> Option<String>) -> Result<Option<(usize, usize)>> {
    // The first of `names` that is set (and not empty), with its name. Ours (`CHARMRS_*`,
    // which a user may set by hand) must be a number; a launcher's that is not is passed over,
    // as before (the job rank and size stand in).
    let var = |names: &[&'static str]| -> Result<Option<(&'static str, usize)>> {
        for &name in names {
            let Some(text) = get(name).filter(|t| !t.trim().is_empty()) else {
                continue;
            };
            match text.trim().parse::<usize>() {
                Ok(v) => return Ok(Some((name, v))),
                Err(_) if name.starts_with("CHARMRS_") => {
                    return Err(Error::Options(format!(
                        "{name}={text}: expected a number (this process's place among the \
                         job's processes on its host)"
                    )))
                }
                Err(_) => {}
            }
        }
        Ok(None)
    };
    let local_rank = var(&[
        "CHARMRS_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID",
    ])?;
    let local_size = match var(&["CHARMRS_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"])? {
        Some(size) => Some(size),
        None => match (var(&["SLURM_NODEID"])?, get("SLURM_STEP_TASKS_PER_NODE")) {
            (Some((_, node)), Some(spec)) => {
                slurm_tasks_on_node(&spec, node).map(|n| ("SLURM_STEP_TASKS_PER_NODE", n))
            }
            _ => None,
        },
    };
    match (local_rank, local_size) {
        (Some((_, r)), Some((_, n))) if r < n => Ok(Some((r, n))),
        (Some((rank_var, r)), Some((size_var, n)))
            if rank_var.starts_with("CHARMRS_") || size_var.starts_with("CHARMRS_") =>
        {
            Err(Error::Options(format!(
                "{rank_var}={r} is not below {size_var}={n}: a process's rank on its host must be \
             below the number of the job's processes there"
            )))
        }
        _ => Ok(None),
    }
}

/// The task count of node `node` in Slurm's `SLURM_STEP_TASKS_PER_NODE` (`2(x3),1`: 2 tasks on each
/// of the first three nodes, then 1); `None` if malformed or too short.
fn slurm_tasks_on_node(spec: &str, node: usize) -> Option<usize> {
    let mut first = 0usize;
    for part in spec.split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((count, rest)) => (count, rest.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (part, 1),
        };
        let count = count.trim().parse::<usize>().ok()?;
        first = first.checked_add(repeat)?;
        if node < first {
            return Some(count);
        }
    }
    None
}

/// The PEs of a process that was not told how many to run: every core of its binding if a
/// launcher bound it to a slice of the host of its own, else its share of the cores it sees with
/// the host's other processes of the job (at least one).
fn default_pes(cores: usize, own_slice: bool, host_procs: usize) -> usize {
    if own_slice {
        cores.max(1)
    } else {
        (cores / host_procs.max(1)).max(1)
    }
}

/// Where a process's PEs go among the cores of its [`Topology`].
#[derive(Debug, PartialEq, Eq)]
struct Placement {
    /// The topology position of its first PE's core.
    first_core: usize,
    /// Whether every PE of the host gets a core of its own (then PEs are pinned, and idle ones
    /// may poll without yielding).
    own_cores: bool,
}

/// A process bound to a slice of the host of its own fills it from its first core; processes
/// sharing the cores they see (all of the host's, or a socket's) take them in host-rank order,
/// `pes` each.
fn placement(
    topology: &Topology,
    own_slice: bool,
    host_rank: usize,
    host_procs: usize,
    pes: usize,
) -> Placement {
    if own_slice {
        Placement {
            first_core: 0,
            own_cores: topology.pes_fit(pes),
        }
    } else {
        Placement {
            first_core: host_rank * pes,
            own_cores: topology.pes_fit(pes * host_procs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        default_pes, host_env_from, placement, process_status, slurm_tasks_on_node, Placement,
    };
    use charmrs_transport::{CoreId, Topology};

    #[test]
    fn processes_sharing_a_host_split_its_cores_and_bound_ones_fill_their_slice() {
        // 8 cores seen, 4 processes on the host: 2 PEs each, the third process from core 4.
        let eight = Topology::from_cores((0..8).map(CoreId).collect());
        assert_eq!(default_pes(8, false, 4), 2);
        assert_eq!(
            placement(&eight, false, 2, 4, 2),
            Placement {
                first_core: 4,
                own_cores: true
            }
        );
        // More processes than cores: one PE each, not pinned.
        assert_eq!(default_pes(2, false, 3), 1);
        assert!(!placement(&eight, false, 0, 9, 1).own_cores);
        // Bound to a slice of 2 cores (the host has more): both PEs, from the slice's first.
        let slice = Topology::from_cores(vec![CoreId(6), CoreId(7)]);
        assert_eq!(default_pes(2, true, 4), 2);
        assert_eq!(
            placement(&slice, true, 3, 4, 2),
            Placement {
                first_core: 0,
                own_cores: true
            }
        );
        assert!(!placement(&slice, true, 3, 4, 3).own_cores);
        // Alone on the host: every core.
        assert_eq!(default_pes(8, false, 1), 8);
    }

    #[test]
    fn slurm_task_counts_per_node_are_read() {
        assert_eq!(slurm_tasks_on_node("4", 0), Some(4));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 0), Some(2));
        // Through the environment.
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(host_env_from(env(&[])).unwrap(), None);
        assert_eq!(
            host_env_from(env(&[
                ("CHARMRS_LOCAL_RANK", "1"),
                ("CHARMRS_LOCAL_SIZE", "2")
            ]))
            .unwrap(),
            Some((1, 2))
        );
        assert_eq!(
            host_env_from(env(&[
                ("SLURM_LOCALID", "2"),
                ("SLURM_NODEID", "1"),
                ("SLURM_STEP_TASKS_PER_NODE", "1,3")
            ]))
            .unwrap(),
            Some((2, 3))
        );
        let e = host_env_from(env(&[
            ("CHARMRS_LOCAL_RANK", "one"),
            ("CHARMRS_LOCAL_SIZE", "2"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("CHARMRS_LOCAL_RANK=one: expected a number"),
            "{e}"
        );
        let e = host_env_from(env(&[
            ("CHARMRS_LOCAL_RANK", "2"),
            ("CHARMRS_LOCAL_SIZE", "2"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("CHARMRS_LOCAL_RANK=2 is not below CHARMRS_LOCAL_SIZE=2"),
            "{e}"
        );
        // Empty is unset; a launcher's odd values fall back to the job rank and size.
        assert_eq!(
            host_env_from(env(&[
                ("CHARMRS_LOCAL_RANK", ""),
                ("CHARMRS_LOCAL_SIZE", " ")
            ]))
            .unwrap(),
            None
        );
        assert_eq!(
            host_env_from(env(&[
                ("OMPI_COMM_WORLD_LOCAL_RANK", "x"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
            ]))
            .unwrap(),
            None
        );
        assert_eq!(
            host_env_from(env(&[
                ("SLURM_LOCALID", "3"),
                ("SLURM_NODEID", "0"),
                ("SLURM_STEP_TASKS_PER_NODE", "2")
            ]))
            .unwrap(),
            None
        );
        assert_eq!(slurm_tasks_on_node("2(x3),1", 2), Some(2));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 3), Some(1));
        assert_eq!(slurm_tasks_on_node("2(x3),1", 4), None);
        assert_eq!(slurm_tasks_on_node("2(x,1", 0), None);
    }

    #[test]
    fn a_failing_code_never_exits_as_success() {
        assert_eq!(process_status(0), 0);
        assert_eq!(process_status(3), 3);
        assert_eq!(process_status(255), 255);
        assert_eq!(process_status(256), 1);
        assert_eq!(process_status(512), 1);
        assert_eq!(process_status(-1), -1);
    }
}
