//! Which machine layer this process uses (`+machine ucx|ofi|tcp|local`).
//!
//! A process started by the `charmrun` launcher, or (with the `pmix` feature) by
//! `mpirun`/`srun` through PMIx, belongs to a multi-process job: its bootstrap (rank, size, the
//! key-value exchange and the job secret) comes from that launcher, and the layer named by
//! `+machine` (or the `CHARMRS_MACHINE` environment variable) is built on it. Without either the
//! choice is automatic and the same in every
//! process of the job (they run one binary): UCX if the binary was built with the `ucx` feature,
//! else libfabric if built with `ofi`, else TCP. A layer that fails to start is an error naming
//! it — never a silent fallback, which could leave processes of one job on different layers.
//! A process started on its own is a one-process job on the local layer.

use crate::error::{Error, Result};
use charmrs_local::LocalLayer;
use charmrs_tcp::{TcpConfig, TcpLayer};
use charmrs_transport::kv::JobSecret;
use charmrs_transport::{Bootstrap, KvBootstrap, MachineLayer};
use std::sync::Arc;

/// What [`select`] gives the runtime: the process's machine layer, and the host of every
/// process of the job (`crate::hosts`).
pub(crate) struct Machine {
    pub(crate) layer: Box<dyn MachineLayer>,
    pub(crate) hosts: Vec<u32>,
}

/// The layers `+machine` can name.
pub(crate) const MACHINES: &[&str] = &["ucx", "ofi", "tcp", "local"];

/// How this process was started.
enum Launch {
    /// On its own.
    Alone,
    /// As a process of a job: its bootstrap, the job's secret, and whether every process of
    /// the job runs on this host (as under charmrun).
    Job {
        bootstrap: Arc<dyn Bootstrap>,
        secret: JobSecret,
        one_host: bool,
    },
}

fn launch(pes: usize) -> Result<Launch> {
    let join = |e: charmrs_transport::TransportError, how: &str| {
        Error::Options(format!("cannot join the job started by {how}: {e}"))
    };
    // A process charmrun started is charmrun's, whatever PMIx variables an outer launcher left
    // (charmrun removes them; this also covers a charmrun that did not).
    #[cfg(feature = "pmix")]
    if charmrs_pmix::launched_by_pmix()
        && std::env::var_os(charmrs_transport::kv::ENV_KV_ADDR).is_none()
    {
        if let Some(b) = charmrs_pmix::PmixBootstrap::from_env().map_err(|e| join(e, "PMIx"))? {
            // A failed fence (a process that died before it, or timed out) ends the job step
            // through PMIx: the other processes may still be waiting in it.
            let secret = b.job_secret().map_err(|e| {
                let e = join(e, "PMIx");
                charmrs_transport::Bootstrap::abort(
                    &b,
                    &format!("charmrs: process {}: {e}", b.rank()),
                );
                e
            })?;
            let one_host = b.local_size() == Some(b.size());
            return Ok(Launch::Job {
                bootstrap: Arc::new(b),
                secret,
                one_host,
            });
        }
    }
    match KvBootstrap::from_env().map_err(|e| join(e, "charmrun"))? {
        Some(b) => {
            // charmrun told every process its PE count; a `+p` given to the program (after
            // `--`, say) that differs would make a job of another size than announced.
            if let Some(ppn) = b.ppn().filter(|&ppn| ppn as usize != pes) {
                return Err(Error::Options(format!(
                    "charmrun started this job with {ppn} PEs per process (++ppn), but this \
                     process was asked for {pes} (+p or CHARMRS_PES given to the program): give \
                     the PE counts to charmrun only"
                )));
            }
            let secret = *b.secret();
            // charmrun starts every process on its own host.
            Ok(Launch::Job {
                bootstrap: Arc::new(b),
                secret,
                one_host: true,
            })
        }
        None => match foreign_launch() {
            Some(hint) => Err(Error::Options(format!(
                "this process is one of several started by another launcher ({hint}), but \
                 charmrs cannot join them: {}",
                if cfg!(feature = "pmix") {
                    "launch with PMIx (`srun --mpi=pmix`, OpenMPI's `mpirun`), or with charmrun"
                } else {
                    "build with the `pmix` feature and launch with PMIx (`srun --mpi=pmix`, \
                     OpenMPI's `mpirun`), or start the job with charmrun"
                }
            ))),
            None => Ok(Launch::Alone),
        },
    }
}

/// Signs that a launcher other than charmrun started this process as one of several, without a
/// bootstrap this build can use (each process would otherwise run as a job of its own, every
/// one of them PE 0): the variable that says so.
fn foreign_launch() -> Option<String> {
    let more_than_one = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&n| n > 1)
            .map(|n| format!("{var}={n}"))
    };
    more_than_one("OMPI_COMM_WORLD_SIZE")
        .or_else(|| more_than_one("PMI_SIZE"))
        .or_else(|| more_than_one("PMIX_SIZE"))
        // A task of an `srun` step of several tasks with no PMI at all (`--mpi=none`, Slurm's
        // default `MpiDefault`): srun sets it for a step's tasks, a batch script has none.
        .or_else(|| more_than_one("SLURM_STEP_NUM_TASKS"))
        .or_else(|| {
            // A PMIx launch this build cannot use (with the feature, `launched_by_pmix` took it).
            (!cfg!(feature = "pmix"))
                .then(|| std::env::var("PMIX_RANK").ok())
                .flatten()
                .map(|rank| format!("PMIX_RANK={rank}"))
        })
}

/// The address the TCP layer listens on and publishes: `CHARMRS_TCP_ADDR`, else the interface
/// `CHARMRS_TCP_IFACE` names, else loopback for a job on one host and this host's first network
/// interface up (not loopback) for one that spans hosts.
fn tcp_listen_address(one_host: bool) -> Result<std::net::IpAddr> {
    charmrs_tcp::interfaces::ListenChoice::from_env(one_host)
        .resolve()
        .map_err(|e| Error::Options(format!("the tcp machine layer: {e}")))
}

/// The layer `+machine` (else `CHARMRS_MACHINE`) asks for, or the automatic choice.
fn wanted(machine: Option<&str>) -> Result<&'static str> {
    let env = std::env::var("CHARMRS_MACHINE").ok();
    let env = env.as_deref().filter(|s| !s.is_empty());
    match machine.or(env) {
        Some(name) => MACHINES
            .iter()
            .copied()
            .find(|m| *m == name)
            .ok_or_else(|| {
                // Name where the value came from: the flag wins over the environment.
                let source = if machine.is_some() {
                    "+machine".to_string()
                } else {
                    format!("CHARMRS_MACHINE={name}")
                };
                Error::Options(format!(
                    "{source}: unknown machine layer `{name}`; valid: {}",
                    MACHINES.join(", ")
                ))
            }),
        None if cfg!(feature = "ucx") => Ok("ucx"),
        None if cfg!(feature = "ofi") => Ok("ofi"),
        None => Ok("tcp"),
    }
}

/// The machine layer of this process of `pes` PEs (`local_only`: ignore any launcher
/// environment).
pub(crate) fn select(local_only: bool, machine: Option<&str>, pes: usize) -> Result<Machine> {
    let name = wanted(machine)?;
    let alone = || {
        Ok(Machine {
            layer: Box::new(LocalLayer::new()),
            hosts: vec![0],
        })
    };
    if local_only {
        return alone();
    }
    let Launch::Job {
        bootstrap,
        secret,
        one_host,
    } = launch(pes)?
    else {
        return alone();
    };
    // A layer that cannot start tells the launcher before this process exits: the other
    // processes may be waiting for it in a fence (under `srun` nothing else would end the job).
    let launcher = Arc::clone(&bootstrap);
    let started = crate::hosts::exchange(&*bootstrap).and_then(|hosts| {
        start_layer(name, bootstrap, secret, one_host, pes).map(|layer| Machine { layer, hosts })
    });
    if let Err(e) = &started {
        launcher.abort(&format!("charmrs: process {}: {e}", launcher.rank()));
    }
    started
}

/// Starts machine layer `name` on `bootstrap`.
fn start_layer(
    name: &str,
    bootstrap: Arc<dyn Bootstrap>,
    secret: JobSecret,
    one_host: bool,
    pes: usize,
) -> Result<Box<dyn MachineLayer>> {
    let failed = |e: charmrs_transport::TransportError| {
        Error::Options(format!("the {name} machine layer cannot start: {e}"))
    };
    match name {
        "local" if bootstrap.size() > 1 => Err(Error::Options(format!(
            "+machine local: this process is one of {} processes of a job; the local layer cannot \
             reach the others (use ucx, ofi or tcp)",
            bootstrap.size()
        ))),
        "local" => Ok(Box::new(LocalLayer::new())),
        "tcp" => {
            let defaults = TcpConfig::default();
            let cfg = TcpConfig {
                bind: tcp_listen_address(one_host)?,
                ack_timeout: ack_timeout(
                    TCP_ACK_TIMEOUT,
                    std::env::var(TCP_ACK_TIMEOUT).ok().as_deref(),
                    defaults.ack_timeout,
                )?,
                ..defaults
            };
            TcpLayer::with_config(bootstrap, secret, cfg)
                .map(|l| Box::new(l) as Box<dyn MachineLayer>)
                .map_err(failed)
        }
        "ucx" => ucx(bootstrap, lanes_from_env(UCX_LANES, pes)?).map_err(|e| match e {
            Some(e) => failed(e),
            None => not_built("ucx"),
        }),
        _ => ofi(bootstrap, lanes_from_env(OFI_LANES, pes)?).map_err(|e| match e {
            Some(e) => failed(e),
            None => not_built("ofi"),
        }),
    }
}

fn not_built(name: &str) -> Error {
    Error::Options(format!(
        "+machine {name}: this binary was built without the `{name}` cargo feature (charmrs/{name}; \
         it needs Debian's {})",
        if name == "ucx" { "libucx-dev" } else { "libfabric-dev" }
    ))
}

/// The variable that sets how many UCX workers a process has (see [`lanes`]).
const UCX_LANES: &str = "CHARMRS_UCX_WORKERS";
/// The variable that sets how many libfabric endpoints a process has (see [`lanes`]).
const OFI_LANES: &str = "CHARMRS_OFI_ENDPOINTS";

/// Seconds the TCP layer lets data in flight to a peer go unacknowledged by the peer's host before
/// it declares the peer lost (`TcpConfig::ack_timeout`).
const TCP_ACK_TIMEOUT: &str = "CHARMRS_TCP_ACK_TIMEOUT";

/// The TCP layer's `ack_timeout` from `setting` (the value of variable `var`: seconds, at least
/// the layer's minimum, `charmrs_tcp::MIN_ACK_TIMEOUT`, or `never`), else `default`.
fn ack_timeout(
    var: &str,
    setting: Option<&str>,
    default: std::time::Duration,
) -> Result<std::time::Duration> {
    match setting.map(str::trim) {
        None | Some("") => Ok(default),
        Some("never") => Ok(std::time::Duration::MAX),
        Some(text) => text
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= charmrs_tcp::MIN_ACK_TIMEOUT.as_secs_f64())
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| {
                Error::Options(format!(
                    "{var}={text}: expected seconds (at least {}) or `never`",
                    charmrs_tcp::MIN_ACK_TIMEOUT.as_secs_f64()
                ))
            }),
    }
}

/// [`lanes`] from the environment variable `var`.
fn lanes_from_env(var: &str, pes: usize) -> Result<usize> {
    lanes(var, std::env::var(var).ok().as_deref(), pes)
}

/// The lanes (UCX workers, libfabric endpoints) of a process of `pes` PEs, from `setting` (the
/// value of variable `var`): `pe` (one per PE, each polled by its PE; the default) or `process`
/// (one, polled by the first PE, which hands arrivals on to the others). Per PE measured as
/// fast for the polling PEs and far faster for the others (docs/performance.md, "Session 20"
/// for UCX, "Session 22" for libfabric).
fn lanes(var: &str, setting: Option<&str>, pes: usize) -> Result<usize> {
    match setting {
        None | Some("" | "pe") => Ok(pes),
        Some("process") => Ok(1),
        Some(other) => Err(Error::Options(format!(
            "{var}: unknown value `{other}`; valid: process, pe"
        ))),
    }
}

#[cfg(feature = "ucx")]
fn ucx(
    b: Arc<dyn Bootstrap>,
    workers: usize,
) -> std::result::Result<Box<dyn MachineLayer>, Option<charmrs_transport::TransportError>> {
    let cfg = charmrs_ucx::UcxConfig {
        workers,
        ..charmrs_ucx::UcxConfig::default()
    };
    charmrs_ucx::UcxLayer::with_config(b, cfg)
        .map(|l| Box::new(l) as Box<dyn MachineLayer>)
        .map_err(Some)
}

#[cfg(not(feature = "ucx"))]
fn ucx(
    _b: Arc<dyn Bootstrap>,
    _workers: usize,
) -> std::result::Result<Box<dyn MachineLayer>, Option<charmrs_transport::TransportError>> {
    Err(None)
}

#[cfg(feature = "ofi")]
fn ofi(
    b: Arc<dyn Bootstrap>,
    endpoints: usize,
) -> std::result::Result<Box<dyn MachineLayer>, Option<charmrs_transport::TransportError>> {
    let cfg = charmrs_ofi::OfiConfig {
        endpoints,
        ..charmrs_ofi::OfiConfig::from_env().map_err(Some)?
    };
    charmrs_ofi::OfiLayer::new(b, cfg)
        .map(|l| Box::new(l) as Box<dyn MachineLayer>)
        .map_err(Some)
}

#[cfg(not(feature = "ofi"))]
fn ofi(
    _b: Arc<dyn Bootstrap>,
    _endpoints: usize,
) -> std::result::Result<Box<dyn MachineLayer>, Option<charmrs_transport::TransportError>> {
    Err(None)
}

#[cfg(test)]
mod tests {
    use super::{ack_timeout, lanes, OFI_LANES, TCP_ACK_TIMEOUT, UCX_LANES};
    use std::time::Duration;

    #[test]
    fn the_tcp_ack_timeout_is_seconds_or_never_and_bad_values_are_named() {
        let default = Duration::from_secs(10);
        let at = |s| ack_timeout(TCP_ACK_TIMEOUT, s, default);
        assert_eq!(at(None).unwrap(), default);
        assert_eq!(at(Some(" ")).unwrap(), default);
        assert_eq!(at(Some("30")).unwrap(), Duration::from_secs(30));
        assert_eq!(at(Some("2.5")).unwrap(), Duration::from_millis(2500));
        assert_eq!(at(Some("never")).unwrap(), Duration::MAX);
        for bad in ["0", "-1", "1.5", "1e-12", "soon", "inf", "NaN", "1e30"] {
            let e = at(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("{TCP_ACK_TIMEOUT}={bad}")), "{e}");
        }
    }

    #[test]
    fn lanes_are_per_pe_unless_asked_otherwise_and_bad_values_are_named() {
        for var in [UCX_LANES, OFI_LANES] {
            assert_eq!(lanes(var, None, 4).unwrap(), 4);
            assert_eq!(lanes(var, Some(""), 3).unwrap(), 3);
            assert_eq!(lanes(var, Some("pe"), 2).unwrap(), 2);
            assert_eq!(lanes(var, Some("process"), 4).unwrap(), 1);
            let e = lanes(var, Some("node"), 4).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains("`node`"), "{e}");
        }
    }
}
