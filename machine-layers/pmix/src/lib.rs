//! PMIx bootstrap for charmrs: a process started by a PMIx launcher —
//! OpenMPI's `mpirun`/`prterun`, Slurm's `srun --mpi=pmix`, Flux — learns
//! its rank and the job size from PMIx and exchanges connection details
//! (the TCP layer's listening addresses, the job secret) through the PMIx
//! key-value store.
//!
//! # What this crate owns
//!
//! * [`PmixBootstrap`]: a [`Bootstrap`] over the PMIx client library
//!   (`libpmix`, bound by `charmrs-pmix-sys`).
//! * [`tcp_layer_from_env`]: the TCP machine layer over it in one call.
//! * [`launched_by_pmix`]: the environment check that decides whether
//!   PMIx is worth initialising at all.
//! * The binary `pmix_check`, a self-test that sets up a [`TcpLayer`] over
//!   this bootstrap and exchanges messages between all ranks (its
//!   integration test runs it under `mpirun`).
//!
//! # Using it
//!
//! ```no_run
//! use std::sync::Arc;
//! use charmrs_pmix::PmixBootstrap;
//! use charmrs_tcp::{TcpConfig, TcpLayer};
//! use charmrs_transport::Bootstrap;
//!
//! # fn main() -> Result<(), charmrs_transport::TransportError> {
//! if let Some(boot) = PmixBootstrap::from_env()? {
//!     let secret = boot.job_secret()?; // collective: every rank calls it
//!     let boot: Arc<dyn Bootstrap> = Arc::new(boot);
//!     let layer = TcpLayer::with_config(boot, secret, TcpConfig::default())?;
//!     # drop(layer);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Run it with, for instance (as root, on one host, loopback only):
//!
//! ```text
//! mpirun --allow-run-as-root --oversubscribe -n 2 \
//!        --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo ./app
//! ```
//!
//! # Invariants
//!
//! * `PMIx_Init` is called only when the environment shows a PMIx server
//!   ([`launched_by_pmix`]); otherwise [`PmixBootstrap::from_env`] is
//!   `Ok(None)` and no PMIx code runs.
//! * Every successful `PMIx_Init` is paired with one `PMIx_Finalize`, when
//!   the [`PmixBootstrap`] is dropped.
//! * Keys are stored in PMIx under [`KEY_PREFIX`] (so `"addr"` becomes
//!   `"charmrs.addr"`): they cannot collide with PMIx's reserved `pmix.*`
//!   keys or with the MPI library's own keys.
//! * A [`Bootstrap::get`] never waits for a value to appear: it asks with
//!   `PMIX_IMMEDIATE`, so the local PMIx server answers from what it holds
//!   (after a fence: everything put before it) and a missing key fails at
//!   once with `PMIX_ERR_NOT_FOUND`, instead of the server asking the
//!   launcher to fetch it from the peer and waiting until the peer puts
//!   it. `PMIX_TIMEOUT` ([`PmixBootstrap::get_timeout`]) backs this up for
//!   servers that ignore the flag.
//! * A [`Bootstrap::fence`] never waits for ever: it asks the PMIx server
//!   for a `PMIX_TIMEOUT` of [`PmixBootstrap::fence_timeout`] (default
//!   [`DEFAULT_FENCE_TIMEOUT`], set by [`ENV_FENCE_TIMEOUT`]), and gives
//!   up on its own [`FENCE_CLIENT_GRACE`] later should the server ignore
//!   it. A process that dies before its fence (under `srun
//!   --kill-on-bad-exit=0` nothing else ends the step) costs the others
//!   that long, not the job's time limit.
//! * Every error names the PMIx call, its arguments and the PMIx status
//!   (name and number), e.g. `bootstrap failed: PMIx_Get(rank 1,
//!   "charmrs.addr") failed: NOT-FOUND (-46)`.
//!
//! # Threads
//!
//! The PMIx client library is thread-safe (every call is handed to its own
//! progress thread), so [`PmixBootstrap`] is `Send + Sync` and its methods
//! may be called from any thread, concurrently.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use charmrs_pmix_sys as sys;
use charmrs_tcp::{TcpConfig, TcpLayer};
use charmrs_transport::kv::{random_secret, JobSecret, ENV_PES, SECRET_LEN};
use charmrs_transport::{Bootstrap, ProcessId, TransportError};

/// Prefix of every key this bootstrap stores in PMIx.
pub const KEY_PREFIX: &str = "charmrs.";

/// Key (after [`KEY_PREFIX`]) under which rank 0 publishes the job secret.
pub const SECRET_KEY: &str = "job-secret";

/// Default of [`PmixBootstrap::get_timeout`].
pub const DEFAULT_GET_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of [`PmixBootstrap::fence_timeout`]: two minutes. A fence waits
/// for every process of the job; at start-up they reach it within seconds
/// of each other, so this leaves room for slow starts on a loaded cluster
/// while a process that died before its fence costs the others two minutes
/// rather than the job's time limit.
pub const DEFAULT_FENCE_TIMEOUT: Duration = Duration::from_secs(120);

/// Environment variable setting [`PmixBootstrap::fence_timeout`]: a
/// positive whole number of seconds (e.g. `CHARMRS_PMIX_FENCE_TIMEOUT=600`
/// for a job whose processes start far apart). Unset or empty:
/// [`DEFAULT_FENCE_TIMEOUT`].
pub const ENV_FENCE_TIMEOUT: &str = "CHARMRS_PMIX_FENCE_TIMEOUT";

/// How much longer than [`PmixBootstrap::fence_timeout`] a fence waits for
/// the PMIx server's answer before failing on its own (for servers that
/// ignore `PMIX_TIMEOUT`; the server's own timeout, reported by it, comes
/// first).
pub const FENCE_CLIENT_GRACE: Duration = Duration::from_secs(5);

/// Environment variables whose presence shows that a PMIx server launched
/// this process. Variables whose name *starts* with `PMIX_SERVER_URI`
/// (`PMIX_SERVER_URI2`, `PMIX_SERVER_URI41`, …) count too.
pub const PMIX_ENV_VARS: &[&str] = &["PMIX_NAMESPACE", "PMIX_RANK"];

/// True when the environment shows that this process was started by a
/// PMIx launcher: one of [`PMIX_ENV_VARS`] or a `PMIX_SERVER_URI*`
/// variable is set. Looks at the environment only; calls no PMIx code.
pub fn launched_by_pmix() -> bool {
    std::env::vars_os().any(|(k, _)| k.to_str().is_some_and(is_pmix_var))
}

/// Whether this process was started by OpenMPI's launcher (`mpirun`, `prterun`), which sets
/// `OMPI_COMM_WORLD_SIZE` and ends the job when a process exits with a non-zero status.
fn started_by_openmpi() -> bool {
    std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
}

/// Whether the variable `name` is one [`launched_by_pmix`] looks for.
fn is_pmix_var(name: &str) -> bool {
    PMIX_ENV_VARS.contains(&name) || name.starts_with("PMIX_SERVER_URI")
}

/// PMIx's name for a status and its number, e.g. `NOT-FOUND (-46)` for
/// `PMIX_ERR_NOT_FOUND`.
pub fn status_string(status: c_int) -> String {
    // SAFETY: `PMIx_Error_string` only looks the status up in a static
    // table (it is usable before `PMIx_Init`); it returns a pointer to a
    // static NUL-terminated string, or NULL, which is checked.
    let name = unsafe {
        let p = sys::PMIx_Error_string(status);
        if p.is_null() {
            "unknown status".to_owned()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    format!("{name} ({status})")
}

/// The version string of the PMIx client library in use (e.g.
/// `"OpenPMIx 4.2.2rc2, ..."`).
pub fn library_version() -> String {
    // SAFETY: `PMIx_Get_version` returns a pointer to a static
    // NUL-terminated string (usable before `PMIx_Init`); NULL is checked.
    unsafe {
        let p = sys::PMIx_Get_version();
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

fn err(m: String) -> TransportError {
    TransportError::Bootstrap(m)
}

/// `timeout` as PMIx's `PMIX_TIMEOUT` wants it: whole seconds, rounded up,
/// at least 1.
fn pmix_seconds(timeout: Duration) -> c_int {
    let secs = timeout
        .as_secs()
        .saturating_add(u64::from(timeout.subsec_nanos() > 0));
    c_int::try_from(secs.max(1)).unwrap_or(c_int::MAX)
}

/// The fence timeout [`ENV_FENCE_TIMEOUT`] asks for (`value`: its value,
/// `None` if unset).
fn fence_timeout_from(value: Option<&str>) -> Result<Duration, TransportError> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT_FENCE_TIMEOUT),
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Duration::from_secs(u64::from(n))),
            _ => Err(err(format!(
                "{ENV_FENCE_TIMEOUT}={v:?} is not a positive whole number of seconds"
            ))),
        },
    }
}

/// `Ok(())` for `PMIX_SUCCESS`, otherwise an error naming `call`.
fn check(status: c_int, call: impl FnOnce() -> String) -> Result<(), TransportError> {
    if status == sys::PMIX_SUCCESS {
        Ok(())
    } else {
        Err(err(format!("{} failed: {}", call(), status_string(status))))
    }
}

/// An info entry carrying a boolean (`PMIX_BOOL`), or an int (`PMIX_INT`).
/// Neither owns heap memory, so the entry needs no destructor.
fn info(key: &[u8], value: InfoValue) -> sys::pmix_info_t {
    let mut i = sys::pmix_info_t::default();
    let key = CStr::from_bytes_with_nul(key).expect("PMIx attribute names are C strings");
    // `key` fits: PMIx attribute names are far shorter than PMIX_MAX_KEYLEN.
    for (dst, &src) in i.key.iter_mut().zip(key.to_bytes()) {
        *dst = src as c_char;
    }
    match value {
        InfoValue::Bool(b) => {
            i.value.type_ = sys::PMIX_BOOL;
            i.value.data.flag = b;
        }
        InfoValue::Int(n) => {
            i.value.type_ = sys::PMIX_INT;
            i.value.data.integer = n;
        }
    }
    i
}

enum InfoValue {
    Bool(bool),
    Int(c_int),
}

/// A `pmix_value_t` returned by `PMIx_Get`: owned, released with the
/// `PMIX_VALUE_RELEASE` recipe (destruct the contents, free the struct).
struct OwnedValue(*mut sys::pmix_value_t);

impl OwnedValue {
    fn get(&self) -> &sys::pmix_value_t {
        // SAFETY: the pointer came non-NULL from a successful `PMIx_Get`
        // and stays valid until `drop`.
        unsafe { &*self.0 }
    }

    /// The value as an unsigned integer, for the integer types PMIx uses
    /// for sizes and ranks.
    fn as_u32(&self) -> Option<u32> {
        let v = self.get();
        // SAFETY: each arm reads the union member that `type_` says is
        // the active one.
        unsafe {
            match v.type_ {
                sys::PMIX_UINT32 => Some(v.data.uint32),
                sys::PMIX_PROC_RANK => Some(v.data.rank),
                sys::PMIX_UINT16 => Some(u32::from(v.data.uint16)),
                sys::PMIX_INT => u32::try_from(v.data.integer).ok(),
                _ => None,
            }
        }
    }

    /// A copy of the bytes of a `PMIX_BYTE_OBJECT` value.
    fn byte_object(&self) -> Option<Vec<u8>> {
        let v = self.get();
        if v.type_ != sys::PMIX_BYTE_OBJECT {
            return None;
        }
        // SAFETY: `type_` is PMIX_BYTE_OBJECT, so `bo` is the active union
        // member; PMIx guarantees `bytes` points to `size` readable bytes
        // (or is NULL for an empty object, checked).
        unsafe {
            let bo = v.data.bo;
            if bo.bytes.is_null() || bo.size == 0 {
                Some(Vec::new())
            } else {
                Some(std::slice::from_raw_parts(bo.bytes.cast::<u8>(), bo.size).to_vec())
            }
        }
    }
}

impl Drop for OwnedValue {
    fn drop(&mut self) {
        // SAFETY: the struct was allocated by libpmix with `malloc` (its
        // `pmix_malloc`) and is owned by us; destructing releases what it
        // points to, then `free` (what `pmix_free` calls) releases the
        // struct itself. It is not used afterwards.
        unsafe {
            sys::PMIx_Value_destruct(self.0);
            sys::free(self.0.cast());
        }
    }
}

/// The TCP machine layer of a process started by a PMIx launcher: a
/// [`PmixBootstrap::from_env`] bootstrap, its
/// [`job_secret`](PmixBootstrap::job_secret), and
/// [`TcpLayer::with_config`] with `cfg`. `Ok(None)` when the process was
/// not started by a PMIx launcher (the counterpart of
/// [`TcpLayer::from_env`] for charmrun).
///
/// Collective: every process of the job must call it.
///
/// # Errors
///
/// As [`PmixBootstrap::from_env`], [`PmixBootstrap::job_secret`] and
/// [`TcpLayer::with_config`].
pub fn tcp_layer_from_env(cfg: TcpConfig) -> Result<Option<TcpLayer>, TransportError> {
    let Some(boot) = PmixBootstrap::from_env()? else {
        return Ok(None);
    };
    let secret = boot.job_secret()?;
    TcpLayer::with_config(Arc::new(boot), secret, cfg).map(Some)
}

/// [`Bootstrap`] over PMIx, for processes started by `mpirun` (OpenMPI 4/5,
/// PRRTE), `srun --mpi=pmix` (Slurm) or any other PMIx launcher.
///
/// * **Rank**: from `PMIx_Init`. **Size**: `PMIX_JOB_SIZE` of the job
///   (a `PMIx_Get` on the wildcard rank).
/// * **put**: `PMIx_Put` with `PMIX_GLOBAL` scope of a byte object, then
///   `PMIx_Commit`. **get**: `PMIx_Get` from the given rank, with
///   `PMIX_IMMEDIATE` (no waiting for a value that is not there) and a
///   `PMIX_TIMEOUT` of [`get_timeout`](PmixBootstrap::get_timeout).
///   **fence**: `PMIx_Fence_nb` over the whole job with
///   `PMIX_COLLECT_DATA`, so every value put before it is readable after
///   it, and a `PMIX_TIMEOUT` of
///   [`fence_timeout`](PmixBootstrap::fence_timeout); waited for at most
///   [`FENCE_CLIENT_GRACE`] longer. **abort**: `PMIx_Abort` of the whole
///   job.
/// * **Job secret** ([`job_secret`](PmixBootstrap::job_secret)): drawn by
///   rank 0 and shared through PMIx.
/// * `PMIx_Finalize` when dropped.
pub struct PmixBootstrap {
    me: sys::pmix_proc_t,
    rank: ProcessId,
    size: u32,
    namespace: String,
    local_rank: Option<u32>,
    local_size: Option<u32>,
    ppn: Option<u32>,
    get_timeout: Duration,
    fence_timeout: Duration,
    /// Fences this process has entered (to name one in an error).
    fences: AtomicU64,
    secret: Mutex<Option<JobSecret>>,
    /// Started by OpenMPI's `mpirun`, which ends the whole job when a process exits with a
    /// non-zero status: [`Bootstrap::abort`] then leaves that to the caller's exit instead of
    /// calling `PMIx_Abort` (see there why).
    launcher_kills_on_failure: bool,
}

impl PmixBootstrap {
    /// The bootstrap of a process started by a PMIx launcher:
    /// `PMIx_Init`, then the job size. `Ok(None)`, without touching PMIx,
    /// when the environment shows no PMIx server ([`launched_by_pmix`]).
    ///
    /// Not collective: each process may call it whenever it likes.
    ///
    /// # Errors
    ///
    /// [`TransportError::Bootstrap`] naming the PMIx call and its status if
    /// `PMIx_Init` fails (e.g. the server is gone) or the job size cannot
    /// be read; also if [`ENV_PES`] is set but is not a positive integer,
    /// or [`ENV_FENCE_TIMEOUT`] is set but is not a positive number of
    /// seconds.
    pub fn from_env() -> Result<Option<PmixBootstrap>, TransportError> {
        if !launched_by_pmix() {
            return Ok(None);
        }
        let fence_timeout = fence_timeout_from(std::env::var(ENV_FENCE_TIMEOUT).ok().as_deref())?;
        let ppn = match std::env::var(ENV_PES) {
            Err(_) => None,
            Ok(v) => match v.trim().parse::<u32>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(err(format!("{ENV_PES}={v:?} is not a positive integer"))),
            },
        };
        PmixBootstrap::init(ppn, fence_timeout).map(Some)
    }

    fn init(ppn: Option<u32>, fence_timeout: Duration) -> Result<PmixBootstrap, TransportError> {
        let mut me = sys::pmix_proc_t::default();
        // SAFETY: `me` is a valid, writable pmix_proc_t that PMIx fills in;
        // no info array is passed (NULL, 0), which the API allows.
        let rc = unsafe { sys::PMIx_Init(&mut me, std::ptr::null_mut(), 0) };
        check(rc, || "PMIx_Init".to_owned())?;
        // From here on, a failure must finalize: build the value first so
        // its `Drop` does.
        // SAFETY: PMIx_Init NUL-terminated the namespace inside its
        // fixed-size array (it is at most PMIX_MAX_NSLEN characters).
        let namespace = unsafe { CStr::from_ptr(me.nspace.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut b = PmixBootstrap {
            me,
            rank: me.rank,
            size: 0,
            namespace,
            local_rank: None,
            local_size: None,
            ppn,
            get_timeout: DEFAULT_GET_TIMEOUT,
            fence_timeout,
            fences: AtomicU64::new(0),
            secret: Mutex::new(None),
            launcher_kills_on_failure: started_by_openmpi(),
        };
        let job = b.wildcard();
        b.size = b
            .get_raw(&job, sys::PMIX_JOB_SIZE, &[])?
            .as_u32()
            .ok_or_else(|| err("PMIx_Get(PMIX_JOB_SIZE) returned a non-integer".to_owned()))?;
        if b.rank >= b.size {
            return Err(err(format!(
                "PMIx_Init gave rank {} but PMIX_JOB_SIZE is {}",
                b.rank, b.size
            )));
        }
        // Optional job information: launchers that do not provide it are
        // still usable.
        let me = b.me;
        b.local_rank = b
            .get_raw(&me, sys::PMIX_LOCAL_RANK, &[])
            .ok()
            .and_then(|v| v.as_u32());
        b.local_size = b
            .get_raw(&job, sys::PMIX_LOCAL_SIZE, &[])
            .ok()
            .and_then(|v| v.as_u32());
        Ok(b)
    }

    /// This job's processes as a whole (the wildcard rank).
    fn wildcard(&self) -> sys::pmix_proc_t {
        sys::pmix_proc_t {
            nspace: self.me.nspace,
            rank: sys::PMIX_RANK_WILDCARD,
        }
    }

    /// `PMIx_Get(proc, key, info)`.
    fn get_raw(
        &self,
        proc_: &sys::pmix_proc_t,
        key: &[u8],
        info: &[sys::pmix_info_t],
    ) -> Result<OwnedValue, TransportError> {
        let ckey = CStr::from_bytes_with_nul(key).map_err(|_| {
            err(format!(
                "PMIx key {:?} is not a C string",
                String::from_utf8_lossy(key)
            ))
        })?;
        let mut out: *mut sys::pmix_value_t = std::ptr::null_mut();
        // SAFETY: `proc_` and `ckey` are valid for the call; `info` points
        // to `info.len()` initialised entries (or is empty, then NULL, 0 is
        // passed); `out` is a valid location for the returned pointer.
        let rc = unsafe {
            sys::PMIx_Get(
                proc_,
                ckey.as_ptr(),
                if info.is_empty() {
                    std::ptr::null()
                } else {
                    info.as_ptr()
                },
                info.len(),
                &mut out,
            )
        };
        let who = || {
            let rank = if proc_.rank == sys::PMIX_RANK_WILDCARD {
                "wildcard".to_owned()
            } else {
                proc_.rank.to_string()
            };
            format!("PMIx_Get(rank {rank}, {:?})", ckey.to_string_lossy())
        };
        check(rc, who)?;
        if out.is_null() {
            return Err(err(format!("{} returned no value", who())));
        }
        Ok(OwnedValue(out))
    }

    /// The PMIx key for a bootstrap key: [`KEY_PREFIX`] + `key`, checked
    /// for length and NUL bytes.
    fn pmix_key(key: &str) -> Result<CString, TransportError> {
        let full = format!("{KEY_PREFIX}{key}");
        if full.len() > sys::PMIX_MAX_KEYLEN {
            return Err(err(format!(
                "key {key:?} is too long for PMIx ({} bytes with the prefix, limit {})",
                full.len(),
                sys::PMIX_MAX_KEYLEN
            )));
        }
        CString::new(full).map_err(|_| err(format!("key {key:?} contains a NUL byte")))
    }

    /// The job's PMIx namespace (its id as the launcher knows it).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// This process's rank among the job's processes on this node
    /// (`PMIX_LOCAL_RANK`), if the launcher provides it.
    pub fn local_rank(&self) -> Option<u32> {
        self.local_rank
    }

    /// Number of the job's processes on this node (`PMIX_LOCAL_SIZE`), if
    /// the launcher provides it.
    pub fn local_size(&self) -> Option<u32> {
        self.local_size
    }

    /// PEs (worker threads) of this process, from [`ENV_PES`]
    /// (`CHARMRS_PES`) when set; `None` otherwise.
    ///
    /// PMIx launchers know nothing of PEs: a program started by `mpirun`
    /// picks its own count (`+pN` on its command line, or `CHARMRS_PES`
    /// exported with `mpirun -x CHARMRS_PES=4`). Deciding it — and how
    /// [`local_size`](PmixBootstrap::local_size) processes share a node's
    /// cores — is the runtime's business; this is only what the
    /// environment said.
    pub fn ppn(&self) -> Option<u32> {
        self.ppn
    }

    /// The `PMIX_TIMEOUT` of [`Bootstrap::get`]: the longest a get may
    /// take, should the PMIx server ignore `PMIX_IMMEDIATE` and wait for a
    /// missing value. Default [`DEFAULT_GET_TIMEOUT`].
    pub fn get_timeout(&self) -> Duration {
        self.get_timeout
    }

    /// Sets [`get_timeout`](PmixBootstrap::get_timeout) (rounded up to whole
    /// seconds, at least 1: PMIx counts in seconds).
    pub fn set_get_timeout(&mut self, timeout: Duration) {
        self.get_timeout = timeout;
    }

    /// The longest a [`Bootstrap::fence`] waits for the other processes:
    /// the `PMIX_TIMEOUT` it gives the PMIx server (which then fails the
    /// fence with `PMIX_ERR_TIMEOUT`); should the server not answer, the
    /// fence fails on its own [`FENCE_CLIENT_GRACE`] later. From
    /// [`ENV_FENCE_TIMEOUT`], else [`DEFAULT_FENCE_TIMEOUT`].
    pub fn fence_timeout(&self) -> Duration {
        self.fence_timeout
    }

    /// Sets [`fence_timeout`](PmixBootstrap::fence_timeout) (given to PMIx
    /// rounded up to whole seconds, at least 1).
    pub fn set_fence_timeout(&mut self, timeout: Duration) {
        self.fence_timeout = timeout;
    }

    /// The job secret authenticating machine-layer connections (pass it to
    /// [`TcpLayer::with_config`]).
    ///
    /// Collective the first time: every process must call it. Rank 0 draws
    /// [`SECRET_LEN`] bytes from `/dev/urandom` and puts them under
    /// [`SECRET_KEY`]; everyone fences and the others read rank 0's. Later
    /// calls return the same secret without communicating.
    ///
    /// The secret is as confidential as the PMIx key-value store: readable
    /// by the job's processes and by the launcher's PMIx servers, which
    /// run as the job's user.
    ///
    /// # Errors
    ///
    /// [`TransportError::Io`] if rank 0 cannot read `/dev/urandom`;
    /// [`TransportError::Bootstrap`] if the exchange fails or rank 0's
    /// value is not [`SECRET_LEN`] bytes.
    pub fn job_secret(&self) -> Result<JobSecret, TransportError> {
        let mut cached = self.secret.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = *cached {
            return Ok(s);
        }
        let secret = if self.rank == 0 {
            let s = random_secret()?;
            self.put(SECRET_KEY, &s)?;
            self.fence()?;
            s
        } else {
            self.fence()?;
            let raw = self.get(0, SECRET_KEY)?;
            raw.as_slice().try_into().map_err(|_| {
                err(format!(
                    "rank 0 published a job secret of {} bytes, expected {SECRET_LEN}",
                    raw.len()
                ))
            })?
        };
        *cached = Some(secret);
        Ok(secret)
    }
}

impl Bootstrap for PmixBootstrap {
    fn rank(&self) -> ProcessId {
        self.rank
    }

    fn size(&self) -> u32 {
        self.size
    }

    /// `PMIx_Put(PMIX_GLOBAL, "charmrs.<key>", byte object)` then
    /// `PMIx_Commit`. A second put of the same key replaces the value
    /// (visible to others after the next fence).
    fn put(&self, key: &str, value: &[u8]) -> Result<(), TransportError> {
        let ckey = PmixBootstrap::pmix_key(key)?;
        let mut v = sys::pmix_value_t {
            type_: sys::PMIX_BYTE_OBJECT,
            ..Default::default()
        };
        v.data.bo = sys::pmix_byte_object_t {
            // PMIx copies the bytes and never writes through this pointer
            // (the API is not const-correct). An empty value is sent as
            // PMIx's own empty byte object: NULL, 0.
            bytes: if value.is_empty() {
                std::ptr::null_mut()
            } else {
                value.as_ptr().cast::<c_char>().cast_mut()
            },
            size: value.len(),
        };
        // SAFETY: `ckey` is a NUL-terminated key within PMIX_MAX_KEYLEN;
        // `v` is a valid byte-object value whose `bytes`/`size` describe
        // `value`, which outlives the call. PMIx_Put copies the value into
        // its own cache before returning, so nothing is retained.
        let rc = unsafe { sys::PMIx_Put(sys::PMIX_GLOBAL, ckey.as_ptr(), &mut v) };
        check(rc, || {
            format!(
                "PMIx_Put(PMIX_GLOBAL, {:?}, {} bytes)",
                ckey.to_string_lossy(),
                value.len()
            )
        })?;
        // SAFETY: no arguments; PMIx is initialised while `self` lives.
        let rc = unsafe { sys::PMIx_Commit() };
        check(rc, || {
            format!("PMIx_Commit (after putting {:?})", ckey.to_string_lossy())
        })
    }

    /// `PMIx_Get(rank, "charmrs.<key>")` with `PMIX_IMMEDIATE` and a
    /// `PMIX_TIMEOUT` of [`PmixBootstrap::get_timeout`]: a key the local
    /// PMIx server does not hold fails at once (before the fence that
    /// follows the peer's put it may well not be there yet).
    fn get(&self, rank: ProcessId, key: &str) -> Result<Vec<u8>, TransportError> {
        if rank >= self.size {
            return Err(TransportError::UnknownProcess {
                dst: rank,
                size: self.size,
            });
        }
        let ckey = PmixBootstrap::pmix_key(key)?;
        let peer = sys::pmix_proc_t {
            nspace: self.me.nspace,
            rank,
        };
        let secs = pmix_seconds(self.get_timeout);
        let opts = [
            info(sys::PMIX_IMMEDIATE, InfoValue::Bool(true)),
            info(sys::PMIX_TIMEOUT, InfoValue::Int(secs)),
        ];
        let v = self.get_raw(&peer, ckey.as_bytes_with_nul(), &opts)?;
        v.byte_object().ok_or_else(|| {
            err(format!(
                "PMIx_Get(rank {rank}, {:?}) returned PMIx data type {}, not a byte object",
                ckey.to_string_lossy(),
                v.get().type_
            ))
        })
    }

    /// `PMIx_Fence_nb` over every process of the job with
    /// `PMIX_COLLECT_DATA` and a `PMIX_TIMEOUT` of
    /// [`PmixBootstrap::fence_timeout`], then a wait for its callback of at
    /// most [`FENCE_CLIENT_GRACE`] longer than that. A fence that times out
    /// (a process did not reach it: it may have died) fails with an error
    /// naming the fence and the timeout.
    fn fence(&self) -> Result<(), TransportError> {
        let number = self.fences.fetch_add(1, Ordering::Relaxed) + 1;
        let secs = pmix_seconds(self.fence_timeout);
        let call = FenceCall::new([
            info(sys::PMIX_COLLECT_DATA, InfoValue::Bool(true)),
            info(sys::PMIX_TIMEOUT, InfoValue::Int(secs)),
        ]);
        let what = FenceName {
            rank: self.rank,
            number,
            secs,
        };
        // The callback's reference, taken back by `fence_done`.
        let cbdata = Arc::into_raw(Arc::clone(&call)).cast_mut().cast::<c_void>();
        // SAFETY: NULL procs with count 0 means "all processes of my
        // namespace" (the documented default); `call.info` holds two
        // initialised entries owning no heap memory, kept alive (in `call`)
        // until the callback has run, as PMIx may read them until then;
        // `fence_done` matches `pmix_op_cbfunc_t` and `cbdata` is what it
        // expects (see there).
        let rc = unsafe {
            sys::PMIx_Fence_nb(
                std::ptr::null(),
                0,
                call.info.0.as_ptr(),
                call.info.0.len(),
                Some(fence_done),
                cbdata,
            )
        };
        if rc != sys::PMIX_SUCCESS {
            // PMIx calls back only when it accepted the request.
            // SAFETY: `cbdata` came from `Arc::into_raw` above and, the
            // callback never running, is reclaimed exactly once, here.
            drop(unsafe { Arc::from_raw(cbdata.cast::<FenceCall>().cast_const()) });
            if rc == sys::PMIX_OPERATION_SUCCEEDED {
                return Ok(());
            }
            return check(rc, || what.to_string());
        }
        let limit = self.fence_timeout.saturating_add(FENCE_CLIENT_GRACE);
        fence_outcome(call.wait(limit), &what, limit)
    }

    /// Prints `reason` on this process's stderr, then `PMIx_Abort(1, reason)` of the whole job:
    /// the launcher kills every process (possibly this one, before it returns). Printed here
    /// because OpenMPI's `mpirun` (4.1) does not show the reason it is given, and the process
    /// may be killed before the runtime's own report.
    ///
    /// Under OpenMPI's `mpirun` it does not call `PMIx_Abort`: it returns, and the caller's
    /// non-zero exit makes `mpirun` end the job. OpenMPI 4.1.4's `mpirun` hangs, its children
    /// left as zombies, or crashes in about one job in four when `PMIx_Abort` arrives while
    /// another process of the job exits — which is what the other processes do when the
    /// machine layer tells them of the abort (11 of 40 jobs here; 0 of 40 without the call).
    fn abort(&self, reason: &str) {
        {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{reason}");
            let _ = err.flush();
        }
        if self.launcher_kills_on_failure {
            return;
        }
        let msg = CString::new(reason.replace('\0', " ")).unwrap_or_default();
        // SAFETY: `msg` is a valid C string for the call; NULL procs with
        // count 0 asks to abort every process of this namespace.
        let rc = unsafe { sys::PMIx_Abort(1, msg.as_ptr(), std::ptr::null_mut(), 0) };
        if rc != sys::PMIX_SUCCESS {
            eprintln!(
                "charmrs-pmix: rank {}: PMIx_Abort failed: {}",
                self.rank,
                status_string(rc)
            );
        }
    }
}

/// What a fence error calls the fence: this process's how-manieth, and its
/// timeout.
struct FenceName {
    rank: ProcessId,
    number: u64,
    secs: c_int,
}

impl std::fmt::Display for FenceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PMIx_Fence (fence {} of rank {}, all ranks, PMIX_COLLECT_DATA, PMIX_TIMEOUT {} s)",
            self.number, self.rank, self.secs
        )
    }
}

/// The result of a fence whose callback brought `status` (`None`: none
/// came within `waited`).
fn fence_outcome(
    status: Option<c_int>,
    what: &FenceName,
    waited: Duration,
) -> Result<(), TransportError> {
    let hint = format!(
        "a process of the job did not reach the fence (it may have died before it); \
         {ENV_FENCE_TIMEOUT} sets the timeout in seconds"
    );
    match status {
        Some(sys::PMIX_SUCCESS) => Ok(()),
        Some(sys::PMIX_ERR_TIMEOUT) => Err(err(format!(
            "{what} timed out after {} s: {hint}: {}",
            what.secs,
            status_string(sys::PMIX_ERR_TIMEOUT)
        ))),
        Some(st) => check(st, || what.to_string()),
        None => Err(err(format!(
            "{what} timed out: the PMIx server did not answer within {} s (the fence \
             timeout and {} s more): {hint}",
            waited.as_secs(),
            FENCE_CLIENT_GRACE.as_secs()
        ))),
    }
}

/// The info array of a non-blocking fence.
struct FenceInfo([sys::pmix_info_t; 2]);

// SAFETY: the entries hold a bool and an int (no pointers: `info` builds
// them), are never written after construction, and are only read (by PMIx)
// while the owning `FenceCall` lives; sharing or moving them between
// threads is harmless.
unsafe impl Send for FenceInfo {}
// SAFETY: as for `Send`: immutable plain data.
unsafe impl Sync for FenceInfo {}

/// What a non-blocking fence shares with its completion callback
/// ([`fence_done`], on PMIx's progress thread): its info array, which must
/// outlive the request, and the status the callback brings.
struct FenceCall {
    info: FenceInfo,
    status: Mutex<Option<c_int>>,
    done: Condvar,
}

impl FenceCall {
    fn new(info: [sys::pmix_info_t; 2]) -> Arc<FenceCall> {
        Arc::new(FenceCall {
            info: FenceInfo(info),
            status: Mutex::new(None),
            done: Condvar::new(),
        })
    }

    /// Records the fence's status and wakes the waiter.
    fn finish(&self, status: c_int) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
        self.done.notify_all();
    }

    /// The fence's status, once the callback brought it; `None` if it did
    /// not within `limit`.
    fn wait(&self, limit: Duration) -> Option<c_int> {
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let (status, _) = self
            .done
            .wait_timeout_while(status, limit, |s| s.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        *status
    }
}

/// Completion callback of `PMIx_Fence_nb` (`pmix_op_cbfunc_t`): records the
/// status and drops the reference the request held. A fence given up on
/// (its waiter gone) keeps its [`FenceCall`] alive until this runs, if
/// ever.
///
/// # Safety
///
/// `cbdata` must be a pointer from `Arc::<FenceCall>::into_raw` whose
/// reference is handed over to this call (PMIx calls it once per accepted
/// request).
unsafe extern "C" fn fence_done(status: c_int, cbdata: *mut c_void) {
    // SAFETY: per this function's contract, `cbdata` is an `Arc<FenceCall>`
    // reference given to this call alone; it is taken back exactly once.
    let call = unsafe { Arc::from_raw(cbdata.cast::<FenceCall>().cast_const()) };
    call.finish(status);
}

impl Drop for PmixBootstrap {
    fn drop(&mut self) {
        // SAFETY: paired with the successful PMIx_Init of `init`; NULL
        // info with count 0 is allowed.
        let rc = unsafe { sys::PMIx_Finalize(std::ptr::null(), 0) };
        if rc != sys::PMIX_SUCCESS {
            eprintln!(
                "charmrs-pmix: rank {}: PMIx_Finalize failed: {}",
                self.rank,
                status_string(rc)
            );
        }
    }
}

impl std::fmt::Debug for PmixBootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("PmixBootstrap")
            .field("namespace", &self.namespace)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("local_size", &self.local_size)
            .field("ppn", &self.ppn)
            .field("get_timeout", &self.get_timeout)
            .field("fence_timeout", &self.fence_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outside a PMIx launcher `from_env` is `Ok(None)` and calls no PMIx
    /// code. (Skipped, with a note, if `cargo test` itself runs under one.)
    #[test]
    fn from_env_is_none_outside_pmix() {
        if launched_by_pmix() {
            eprintln!("skipped: this test process was started by a PMIx launcher");
            return;
        }
        assert!(matches!(PmixBootstrap::from_env(), Ok(None)));
        // SAFETY: a query of the library's state, valid at any time.
        let initialised = unsafe { sys::PMIx_Initialized() };
        assert_eq!(initialised, 0, "PMIx was initialised");
    }

    #[test]
    fn pmix_variables_are_recognised() {
        for v in [
            "PMIX_NAMESPACE",
            "PMIX_RANK",
            "PMIX_SERVER_URI",
            "PMIX_SERVER_URI2",
            "PMIX_SERVER_URI41",
        ] {
            assert!(is_pmix_var(v), "{v}");
        }
        for v in [
            "PMIX_VERSION",
            "PMIX_RANKS",
            "OMPI_COMM_WORLD_RANK",
            "CHARMRS_RANK",
            "",
        ] {
            assert!(!is_pmix_var(v), "{v}");
        }
    }

    #[test]
    fn status_strings_name_the_status() {
        assert_eq!(status_string(sys::PMIX_SUCCESS), "SUCCESS (0)");
        let nf = status_string(sys::PMIX_ERR_NOT_FOUND);
        assert_eq!(nf, "NOT-FOUND (-46)");
        assert!(!library_version().is_empty());
    }

    #[test]
    fn fence_timeout_comes_from_the_environment_variable() {
        assert_eq!(fence_timeout_from(None).unwrap(), DEFAULT_FENCE_TIMEOUT);
        assert_eq!(
            fence_timeout_from(Some(" ")).unwrap(),
            DEFAULT_FENCE_TIMEOUT
        );
        assert_eq!(
            fence_timeout_from(Some("7")).unwrap(),
            Duration::from_secs(7)
        );
        for bad in ["0", "-3", "1.5", "2m", "x"] {
            let e = fence_timeout_from(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains(ENV_FENCE_TIMEOUT) && e.contains(bad),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn timeouts_go_to_pmix_in_whole_seconds_rounded_up() {
        assert_eq!(pmix_seconds(Duration::ZERO), 1);
        assert_eq!(pmix_seconds(Duration::from_millis(1200)), 2);
        assert_eq!(pmix_seconds(DEFAULT_FENCE_TIMEOUT), 120);
        assert_eq!(pmix_seconds(Duration::MAX), c_int::MAX);
    }

    fn fence_info(secs: c_int) -> [sys::pmix_info_t; 2] {
        [
            info(sys::PMIX_COLLECT_DATA, InfoValue::Bool(true)),
            info(sys::PMIX_TIMEOUT, InfoValue::Int(secs)),
        ]
    }

    /// The callback PMIx calls from its own thread brings the status to the
    /// waiter and gives back the reference it was handed.
    #[test]
    fn a_fence_callback_wakes_its_waiter_and_releases_its_reference() {
        let call = FenceCall::new(fence_info(3));
        let cbdata = Arc::into_raw(Arc::clone(&call)) as usize;
        let pmix = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: `cbdata` is an `Arc::into_raw` reference handed to this
            // one call, as PMIx would.
            unsafe { fence_done(sys::PMIX_ERR_TIMEOUT, cbdata as *mut c_void) };
        });
        assert_eq!(
            call.wait(Duration::from_secs(10)),
            Some(sys::PMIX_ERR_TIMEOUT)
        );
        pmix.join().unwrap();
        assert_eq!(Arc::strong_count(&call), 1);
    }

    /// Without a callback the wait ends at its limit: a server that ignores
    /// `PMIX_TIMEOUT` cannot hold a fence for ever.
    #[test]
    fn a_fence_without_an_answer_gives_up_at_its_limit() {
        let call = FenceCall::new(fence_info(1));
        let t = std::time::Instant::now();
        assert_eq!(call.wait(Duration::from_millis(200)), None);
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }

    #[test]
    fn fence_errors_name_the_fence_and_its_timeout() {
        let what = FenceName {
            rank: 1,
            number: 2,
            secs: 3,
        };
        let waited = Duration::from_secs(3) + FENCE_CLIENT_GRACE;
        assert!(fence_outcome(Some(sys::PMIX_SUCCESS), &what, waited).is_ok());
        let name = "PMIx_Fence (fence 2 of rank 1, all ranks, PMIX_COLLECT_DATA, PMIX_TIMEOUT 3 s)";
        // The server's timeout.
        let e = fence_outcome(Some(sys::PMIX_ERR_TIMEOUT), &what, waited)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{name} timed out after 3 s")), "{e}");
        assert!(e.contains(ENV_FENCE_TIMEOUT) && e.contains("(-24)"), "{e}");
        // Ours, when the server does not answer.
        let e = fence_outcome(None, &what, waited).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{name} timed out")) && e.contains("did not answer within 8 s"),
            "{e}"
        );
        assert!(e.contains(ENV_FENCE_TIMEOUT), "{e}");
        // Any other failure, with its status.
        let e = fence_outcome(Some(sys::PMIX_ERR_UNREACH), &what, waited)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{name} failed: ")), "{e}");
        assert!(e.contains(&format!("({})", sys::PMIX_ERR_UNREACH)), "{e}");
    }

    #[test]
    fn keys_are_prefixed_and_checked() {
        assert_eq!(
            PmixBootstrap::pmix_key("addr").unwrap().as_bytes(),
            b"charmrs.addr"
        );
        assert!(PmixBootstrap::pmix_key("a\0b").is_err());
        assert!(PmixBootstrap::pmix_key(&"k".repeat(600)).is_err());
    }
}
