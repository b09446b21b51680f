//! The process's one `ucp_context`, shared by its workers.
//!
//! # What this module owns
//!
//! [`Context`]: the `ucp_context_h` (features AM, RMA and, if asked, WAKEUP), created once per
//! layer from UCX's environment configuration plus the few defaults the layer needs, and
//! whether UCX may move same-host rendezvous data by CMA.
//!
//! # Invariants
//!
//! * One context per layer, however many workers (one per process, or one per PE): memory
//!   mapped on it (`ucp_mem_map`) is reachable through every worker's endpoints, and on a
//!   network with protection domains an rkey is only valid within the context that packed it.
//! * With more than one worker the context is created with `mt_workers_shared`, so that workers
//!   driven by different threads may call into it concurrently (memory mapping from one PE
//!   while another progresses).
//! * The context is cleaned up after its last worker is destroyed: each worker holds an `Arc`
//!   of it, and a worker that must leak itself (descriptors still viewed) leaks its `Arc` too.

use std::ffi::CString;
use std::ptr;

use charmrs_transport::{ProcessId, TransportError};
use charmrs_ucx_sys as sys;

use crate::status::{check, describe};
use crate::worker::{zeroed, WorkerConfig};

/// A `ucp_context` and what the layer learnt while making it; see the module docs.
pub(crate) struct Context {
    pub(crate) handle: sys::ucp_context_h,
    /// Whether `UCX_TLS` lets UCX use CMA (see `PendingRndv::fetch_limit`).
    pub(crate) cma_possible: bool,
}

// SAFETY: a ucp_context_h is not tied to its creating thread. Calls on it come from workers'
// threads, each under its worker's lock; with several workers the context is created
// thread-safe (`mt_workers_shared`), with one, every call on it is under that worker's lock.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    /// Creates the context of process `rank` for `workers` workers expecting `peers`
    /// endpoints each.
    pub(crate) fn new(
        rank: ProcessId,
        peers: usize,
        workers: usize,
        cfg: &WorkerConfig,
    ) -> Result<Context, TransportError> {
        let mut config: *mut sys::ucp_config_t = ptr::null_mut();
        // SAFETY: null prefix and file mean "environment only"; `config` is
        // a valid out-pointer.
        let st = unsafe { sys::ucp_config_read(ptr::null(), ptr::null(), &mut config) };
        check(st, "ucp_config_read")?;
        // Defaults this layer needs, unless the user chose otherwise:
        // shared-memory transports that accept endpoints with peer error
        // handling, when same-host endpoints use it and shared memory may be
        // among the transports (UCX warns about a setting no transport
        // consumed).
        let tls = std::env::var("UCX_TLS").unwrap_or_default();
        let shm_possible = tls_may_use(&tls, &["shm", "sm", "mm"], &["posix", "sysv"]);
        // Whether UCX may move a same-host rendezvous by CMA (a kernel copy on the receiving
        // core; see `PendingRndv::fetch_limit`).
        let cma_possible = tls_may_use(&tls, &["shm", "sm", "cma"], &[]);
        let mut defaults = Vec::new();
        if cfg.same_host_error_handling && shm_possible {
            defaults.push(("MM_ERROR_HANDLING", "y".to_owned()));
        }
        defaults.retain(|(k, _)| std::env::var_os(format!("UCX_{k}")).is_none());
        for (k, v) in defaults {
            let (ck, cv) = (cstr(k)?, cstr(&v)?);
            // SAFETY: `config` came from ucp_config_read; both strings are
            // NUL-terminated and outlive the call.
            let st = unsafe { sys::ucp_config_modify(config, ck.as_ptr(), cv.as_ptr()) };
            if st != sys::UCS_OK {
                eprintln!(
                    "charmrs-ucx: rank {rank}: cannot set UCX_{k}={v}: {}",
                    describe(st)
                );
            }
        }
        let name = cstr(&format!("charmrs-{rank}"))?;
        let mut params: sys::ucp_params_t = zeroed();
        params.field_mask = (sys::UCP_PARAM_FIELD_FEATURES
            | sys::UCP_PARAM_FIELD_ESTIMATED_NUM_EPS
            | sys::UCP_PARAM_FIELD_MT_WORKERS_SHARED
            | sys::UCP_PARAM_FIELD_NAME) as u64;
        params.features = (sys::UCP_FEATURE_AM | sys::UCP_FEATURE_RMA) as u64;
        if cfg.wakeup {
            params.features |= sys::UCP_FEATURE_WAKEUP as u64;
        }
        params.estimated_num_eps = peers;
        params.mt_workers_shared = i32::from(workers > 1);
        params.name = name.as_ptr();
        let mut handle: sys::ucp_context_h = ptr::null_mut();
        // SAFETY: params is initialised per its field mask; config is valid.
        let st = unsafe { sys::ucp_init(&params, config, &mut handle) };
        // SAFETY: config came from ucp_config_read and is released once.
        unsafe { sys::ucp_config_release(config) };
        check(st, "ucp_init")?;
        Ok(Context {
            handle,
            cma_possible,
        })
    }

    /// Whether workers driven by different threads may share this context: created with
    /// `mt_workers_shared`, it must report `UCS_THREAD_MODE_MULTI` (UCX 1.13, as Debian builds
    /// it, does; a build or version without thread-safe contexts would not, and the layer then
    /// keeps one worker).
    pub(crate) fn shared_by_threads(&self) -> bool {
        let mut attr: sys::ucp_context_attr_t = zeroed();
        attr.field_mask = sys::UCP_ATTR_FIELD_THREAD_MODE as u64;
        // SAFETY: the context is live; attr is a valid out-struct with its mask set.
        let st = unsafe { sys::ucp_context_query(self.handle, &mut attr) };
        st == sys::UCS_OK && attr.thread_mode == sys::UCS_THREAD_MODE_MULTI
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every worker of this context held an `Arc` of it and is destroyed (a worker
        // that could not be destroyed leaked its `Arc`, so this does not run); the handle is
        // cleaned up once.
        unsafe { sys::ucp_cleanup(self.handle) };
    }
}

/// Whether a `UCX_TLS` value lets UCX use a kind of transport: `group`, the
/// names that stand for the whole kind (an alias such as `shm`, or the kind
/// itself), and `members`, names of single transports of it. An empty value
/// means every transport; an exclusion list (`^…`) allows the kind unless it
/// names the whole of it; an inclusion list allows it when it names `all`, the
/// kind or one of its members.
fn tls_may_use(tls: &str, group: &[&str], members: &[&str]) -> bool {
    let names = |list: &str, wanted: &[&str]| {
        list.split(',')
            .any(|x| wanted.iter().any(|w| x.trim() == *w))
    };
    match tls.strip_prefix('^') {
        _ if tls.is_empty() => true,
        Some(excluded) => !names(excluded, group),
        None => names(tls, &["all"]) || names(tls, group) || names(tls, members),
    }
}

fn cstr(s: &str) -> Result<CString, TransportError> {
    CString::new(s).map_err(|_| TransportError::Malformed(format!("{s:?} contains NUL")))
}

#[cfg(test)]
mod tests {
    use super::tls_may_use;

    #[test]
    fn ucx_tls_values_allow_or_exclude_a_kind_of_transport() {
        let cma = |tls| tls_may_use(tls, &["shm", "sm", "cma"], &[]);
        let mm = |tls| tls_may_use(tls, &["shm", "sm", "mm"], &["posix", "sysv"]);
        assert!(cma("") && mm(""), "unset: every transport");
        assert!(cma("shm,self") && mm("shm,self"));
        assert!(cma("all") && mm("all"));
        assert!(cma("cma,tcp") && !mm("cma,tcp"));
        assert!(!cma("tcp,self") && !mm("tcp, self"));
        assert!(!cma("posix,self") && mm("posix,self"));
        assert!(cma("^tcp") && mm("^tcp"));
        assert!(!cma("^shm") && !mm("^shm"));
        assert!(!cma("^cma") && mm("^cma"));
        assert!(cma("^posix") && mm("^posix"), "sysv is left");
    }
}
