//! The libfabric objects of one layer and the checked calls that create
//! them.
//!
//! # What this module owns
//!
//! * [`Fabric`]: the `fi_info` chosen by `fi_getinfo`, and the fabric,
//!   domain, completion queue, address vector and `FI_EP_RDM` endpoint
//!   opened from it, closed in reverse order on drop.
//! * [`Mr`]: one memory registration, closed on drop.
//! * [`ofi_error`]/[`check`]: libfabric status codes turned into errors that
//!   name the call and carry `fi_strerror`'s text.
//!
//! # Invariants
//!
//! * Every pointer in a [`Fabric`] is non-null and open from construction
//!   to drop; the domain is opened with `FI_THREAD_DOMAIN`, so the caller
//!   serializes every call on these objects (the layer keeps the `Fabric`
//!   inside its engine mutex).
//! * The endpoint is enabled and bound to the one completion queue (send,
//!   receive and RMA completions) and to the address vector, which is an
//!   `FI_AV_TABLE`: the `fi_addr_t` of the i-th inserted address is `i`.

use std::ffi::{c_int, c_void, CStr, CString};
use std::ptr;

use charmrs_ofi_sys as sys;
use charmrs_transport::TransportError;

/// An error of libfabric call `what` that returned `ret` (a negative
/// `FI_E*` number), with libfabric's description.
pub(crate) fn ofi_error(what: &str, ret: i64) -> TransportError {
    TransportError::Io(std::io::Error::other(format!(
        "libfabric {what} failed: {} ({ret})",
        strerror(ret)
    )))
}

/// libfabric's text for the (negated or not) error number `ret`.
pub(crate) fn strerror(ret: i64) -> String {
    let code = c_int::try_from(ret.unsigned_abs()).unwrap_or(c_int::MAX);
    // SAFETY: fi_strerror returns a pointer to a static NUL-terminated
    // string for any number (a generic text for unknown ones).
    unsafe { CStr::from_ptr(sys::fi_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

/// `Ok(())` if `ret` is a success status, else the error of call `what`.
pub(crate) fn check(what: &str, ret: c_int) -> Result<(), TransportError> {
    if ret < 0 {
        Err(ofi_error(what, i64::from(ret)))
    } else {
        Ok(())
    }
}

/// Attempts after the first at enabling an endpoint whose name was taken.
/// Each refused attempt removes one stale name of this process id and the
/// next endpoint gets the next name, so a dead process with this id leaves
/// at most one refusal per endpoint it had (one per PE with endpoints per
/// PE): the bound only has to exceed any process's endpoint count.
const ENABLE_RETRIES: usize = 4096;

/// What the chosen provider supports, read off its `fi_info`.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Provider name (`"shm"`, `"tcp;ofi_rxm"`, ...).
    pub(crate) provider: String,
    /// Most iovec entries in one send.
    pub(crate) iov_limit: usize,
    /// Largest packet `fi_inject` takes (copied by the provider, no
    /// completion).
    pub(crate) inject_size: usize,
    /// Largest single message or RMA transfer.
    pub(crate) max_msg_size: usize,
    /// Remote addresses of registered memory are virtual addresses
    /// (`FI_MR_VIRT_ADDR`); otherwise offsets from the region start.
    pub(crate) virt_addr: bool,
    /// Depth of the transmit queue.
    pub(crate) tx_size: usize,
    /// Depth of the receive queue.
    pub(crate) rx_size: usize,
}

/// The libfabric objects of one layer (see the module docs).
pub(crate) struct Fabric {
    infos: *mut sys::fi_info,
    info: *mut sys::fi_info,
    fabric: *mut sys::fid_fabric,
    domain: *mut sys::fid_domain,
    pub(crate) cq: *mut sys::fid_cq,
    av: *mut sys::fid_av,
    pub(crate) ep: *mut sys::fid_ep,
    /// File descriptor of the CQ's wait object, if the provider gave one.
    pub(crate) wait_fd: Option<c_int>,
    pub(crate) limits: Limits,
}

// SAFETY: the handles are plain pointers to libfabric objects that are not
// tied to the thread that opened them; with FI_THREAD_DOMAIN any thread may
// use them as long as calls are serialized, which the owner guarantees by
// keeping the Fabric behind a mutex (module invariants).
unsafe impl Send for Fabric {}

/// Provider names never chosen automatically: `sockets` (millisecond
/// latency, known hangs) and the UDP-based ones (no reliability of their
/// own worth having on loopback). They are still used when asked for by
/// name.
const AVOIDED: &[&str] = &["sockets", "udp", "ofi_rxd"];

impl Fabric {
    /// Asks libfabric for an `FI_EP_RDM` endpoint with `FI_MSG | FI_RMA`,
    /// send-after-send ordering and `FI_THREAD_DOMAIN`, from `provider`
    /// (or the best available one, skipping [`AVOIDED`] providers), and
    /// opens everything up to an enabled endpoint. `av_count` sizes the
    /// address vector.
    pub(crate) fn open(provider: Option<&str>, av_count: usize) -> Result<Fabric, TransportError> {
        // SAFETY: fi_allocinfo returns a zeroed fi_info whose attribute
        // structs are allocated, or null.
        let hints = unsafe { sys::fi_allocinfo() };
        if hints.is_null() {
            return Err(ofi_error("fi_allocinfo", -i64::from(sys::FI_ENOMEM)));
        }
        // SAFETY: `hints` and its attribute pointers are valid (checked
        // above; fi_allocinfo allocates all of them). prov_name is freed by
        // fi_freeinfo, so it must come from malloc: CString -> strdup.
        let ret = unsafe {
            let h = &mut *hints;
            (*h.ep_attr).type_ = sys::FI_EP_RDM;
            h.caps = sys::FI_MSG | sys::FI_RMA;
            // Contexts we pass are fi_context2-sized, so both modes are fine.
            h.mode = sys::FI_CONTEXT | sys::FI_CONTEXT2;
            (*h.domain_attr).threading = sys::FI_THREAD_DOMAIN;
            (*h.domain_attr).mr_mode =
                sys::FI_MR_VIRT_ADDR | sys::FI_MR_ALLOCATED | sys::FI_MR_PROV_KEY;
            (*h.tx_attr).msg_order = sys::FI_ORDER_SAS;
            (*h.rx_attr).msg_order = sys::FI_ORDER_SAS;
            if let Some(p) = provider {
                let name = CString::new(p).map_err(|_| {
                    TransportError::Bootstrap(format!("provider name {p:?} contains NUL"))
                })?;
                (*h.fabric_attr).prov_name = libc::strdup(name.as_ptr());
            }
            let mut infos = ptr::null_mut();
            let ret = sys::fi_getinfo(
                sys::FI_VERSION(sys::FI_MAJOR_VERSION, sys::FI_MINOR_VERSION),
                ptr::null(),
                ptr::null(),
                0,
                hints,
                &mut infos,
            );
            sys::fi_freeinfo(hints);
            (ret, infos)
        };
        let (ret, infos) = ret;
        if ret < 0 || infos.is_null() {
            return Err(TransportError::Io(std::io::Error::other(format!(
                "libfabric has no provider {} offering reliable datagram endpoints (FI_EP_RDM) \
                 with FI_MSG|FI_RMA and send-after-send ordering: fi_getinfo: {} ({ret}); \
                 `fi_info -l` lists the providers",
                provider.map_or_else(|| "at all".to_owned(), |p| format!("{p:?}")),
                strerror(i64::from(ret))
            ))));
        }
        let mut fab = Fabric {
            infos,
            info: ptr::null_mut(),
            fabric: ptr::null_mut(),
            domain: ptr::null_mut(),
            cq: ptr::null_mut(),
            av: ptr::null_mut(),
            ep: ptr::null_mut(),
            wait_fd: None,
            limits: Limits {
                provider: String::new(),
                iov_limit: 1,
                inject_size: 0,
                max_msg_size: 0,
                virt_addr: false,
                tx_size: 0,
                rx_size: 0,
            },
        };
        fab.info = fab.choose(provider.is_some())?;
        fab.open_objects(av_count)?;
        Ok(fab)
    }

    /// The first entry of the list, skipping [`AVOIDED`] providers unless
    /// one was asked for by name.
    fn choose(&mut self, named: bool) -> Result<*mut sys::fi_info, TransportError> {
        let mut cur = self.infos;
        let mut seen = Vec::new();
        while !cur.is_null() {
            // SAFETY: `cur` is an entry of the list fi_getinfo returned,
            // alive until fi_freeinfo in drop; its attribute pointers are
            // valid and prov_name is a NUL-terminated string.
            let name = unsafe {
                let fa = (*cur).fabric_attr;
                if fa.is_null() || (*fa).prov_name.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr((*fa).prov_name)
                        .to_string_lossy()
                        .into_owned()
                }
            };
            if named || !AVOIDED.iter().any(|a| name.split(';').any(|p| p == *a)) {
                return Ok(cur);
            }
            seen.push(name);
            // SAFETY: as above.
            cur = unsafe { (*cur).next };
        }
        Err(TransportError::Io(std::io::Error::other(format!(
            "libfabric offers only avoided providers ({}); name one with CHARMRS_OFI_PROVIDER \
             (e.g. shm or \"tcp;ofi_rxm\")",
            seen.join(", ")
        ))))
    }

    /// Opens fabric, domain, CQ, AV and endpoint from `self.info`.
    fn open_objects(&mut self, av_count: usize) -> Result<(), TransportError> {
        // SAFETY: `self.info` is a valid entry of the list (choose); every
        // out-pointer is a field of `self`, and each object is created from
        // the one opened just before, checked for success first. Objects
        // opened before a failure are closed by Drop.
        unsafe {
            let info = &*self.info;
            let cstr = |p: *const std::ffi::c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            self.limits = Limits {
                provider: cstr((*info.fabric_attr).prov_name),
                iov_limit: (*info.tx_attr).iov_limit.max(1),
                inject_size: (*info.tx_attr).inject_size,
                max_msg_size: (*info.ep_attr).max_msg_size,
                virt_addr: (*info.domain_attr).mr_mode & sys::FI_MR_VIRT_ADDR != 0,
                tx_size: (*info.tx_attr).size,
                rx_size: (*info.rx_attr).size,
            };
            check(
                "fi_fabric",
                sys::fi_fabric(info.fabric_attr, &mut self.fabric, ptr::null_mut()),
            )?;
            check(
                "fi_domain",
                sys::fi_domain(self.fabric, self.info, &mut self.domain, ptr::null_mut()),
            )?;
            // A CQ with a file-descriptor wait object lets an idle thread
            // sleep in poll(2); providers without one get a plain CQ.
            let mut attr = sys::fi_cq_attr {
                size: self.limits.tx_size + self.limits.rx_size,
                format: sys::FI_CQ_FORMAT_MSG,
                wait_obj: sys::FI_WAIT_FD,
                ..Default::default()
            };
            if sys::fi_cq_open(self.domain, &mut attr, &mut self.cq, ptr::null_mut()) < 0 {
                self.cq = ptr::null_mut();
                attr.wait_obj = sys::FI_WAIT_NONE;
                check(
                    "fi_cq_open",
                    sys::fi_cq_open(self.domain, &mut attr, &mut self.cq, ptr::null_mut()),
                )?;
            } else {
                let mut fd: c_int = -1;
                let ret = sys::fi_control(
                    &mut (*self.cq).fid,
                    sys::FI_GETWAIT as c_int,
                    (&mut fd as *mut c_int).cast::<c_void>(),
                );
                if ret == 0 && fd >= 0 {
                    self.wait_fd = Some(fd);
                }
            }
            let mut av_attr = sys::fi_av_attr {
                type_: sys::FI_AV_TABLE,
                count: av_count,
                ..Default::default()
            };
            check(
                "fi_av_open",
                sys::fi_av_open(self.domain, &mut av_attr, &mut self.av, ptr::null_mut()),
            )?;
        }
        // libfabric 1.17's shm provider names its region after the process id
        // and refuses (`EBUSY`) a region left behind by a dead process that had
        // the same id — it then removes that file, and the next endpoint gets
        // the next name (`<pid>:<uid>:<n>`, n counting endpoints), which may
        // be stale too: a killed process leaves one name per endpoint. Such
        // leftovers come from processes killed before closing their
        // endpoints; pid reuse makes them collide sooner or later (3 stale
        // names stopped a start in CI when this retried twice).
        for attempt in 0..=ENABLE_RETRIES {
            if self.open_endpoint()? {
                return Ok(());
            }
            if attempt < ENABLE_RETRIES {
                // SAFETY: open_endpoint opened the endpoint; it is closed
                // once here and forgotten (the last one is closed by Drop).
                unsafe { sys::fi_close(&mut (*self.ep).fid) };
                self.ep = ptr::null_mut();
            }
        }
        Err(ofi_error(
            "fi_enable (the endpoint's shared-memory name stays in use)",
            -i64::from(sys::FI_EBUSY),
        ))
    }

    /// Opens the endpoint, binds it to the CQ and AV and enables it.
    /// `Ok(false)`: the provider refused to enable it because its name is in
    /// use (`EBUSY`; the endpoint is open but not enabled).
    fn open_endpoint(&mut self) -> Result<bool, TransportError> {
        // SAFETY: fabric, domain, CQ and AV are open (open_objects); `self.ep`
        // is an out-pointer field, used only after fi_endpoint succeeded.
        unsafe {
            check(
                "fi_endpoint",
                sys::fi_endpoint(self.domain, self.info, &mut self.ep, ptr::null_mut()),
            )?;
            check(
                "fi_ep_bind (completion queue)",
                sys::fi_ep_bind(
                    self.ep,
                    &mut (*self.cq).fid,
                    sys::FI_TRANSMIT | sys::FI_RECV,
                ),
            )?;
            check(
                "fi_ep_bind (address vector)",
                sys::fi_ep_bind(self.ep, &mut (*self.av).fid, 0),
            )?;
            match sys::fi_enable(self.ep) {
                ret if ret == -sys::FI_EBUSY => Ok(false),
                ret => check("fi_enable", ret).map(|()| true),
            }
        }
    }

    /// This endpoint's address, to publish to the peers.
    pub(crate) fn name(&self) -> Result<Vec<u8>, TransportError> {
        let mut buf = vec![0u8; 256];
        loop {
            let mut len = buf.len();
            // SAFETY: the endpoint is open; `buf` has `len` writable bytes
            // and `len` is updated to the address length.
            let ret = unsafe {
                sys::fi_getname(
                    &mut (*self.ep).fid,
                    buf.as_mut_ptr().cast::<c_void>(),
                    &mut len,
                )
            };
            if ret == -(sys::FI_ETOOSMALL as c_int) && len > buf.len() {
                buf.resize(len, 0);
                continue;
            }
            check("fi_getname", ret)?;
            buf.truncate(len);
            return Ok(buf);
        }
    }

    /// Inserts the peer endpoints' addresses (index = endpoint id) and returns their
    /// `fi_addr_t`s.
    pub(crate) fn insert_peers(
        &mut self,
        names: &[Vec<u8>],
    ) -> Result<Vec<sys::fi_addr_t>, TransportError> {
        let mut addrs = vec![sys::FI_ADDR_UNSPEC; names.len()];
        // A peer's name comes from the bootstrap and the provider reads as many bytes as its
        // address format says (a fixed size, or up to a NUL): each is copied, zero-padded to at
        // least this process's own name's length (same provider) and 256 bytes, so that a short
        // or garbled one cannot make it read past the buffer.
        let floor = self.name()?.len().max(256);
        for (r, name) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(TransportError::Bootstrap(format!(
                    "endpoint {r} was published with an empty libfabric address"
                )));
            }
            let mut padded = name.clone();
            padded.resize(padded.len().max(floor), 0);
            // SAFETY: the AV is open; `padded` is one provider address (as fi_getname
            // produced it in process r), zero-padded as above, and `addrs[r]` receives its
            // handle. One address per call, so names of different lengths are fine.
            let ret = unsafe {
                sys::fi_av_insert(
                    self.av,
                    padded.as_ptr().cast::<c_void>(),
                    1,
                    &mut addrs[r],
                    0,
                    ptr::null_mut(),
                )
            };
            if ret != 1 {
                return Err(ofi_error(
                    &format!("fi_av_insert of endpoint {r}'s address"),
                    i64::from(ret.min(-1)),
                ));
            }
        }
        Ok(addrs)
    }

    /// Registers `len` bytes at `buf` for remote reads with `key` (ignored
    /// when the provider chooses keys).
    pub(crate) fn register(
        &self,
        buf: *const u8,
        len: usize,
        key: u64,
    ) -> Result<Mr, TransportError> {
        let mut mr = ptr::null_mut();
        // SAFETY: the domain is open; the caller keeps `buf..buf+len` alive
        // and unchanged until the returned Mr is dropped (closed).
        let ret = unsafe {
            sys::fi_mr_reg(
                self.domain,
                buf.cast::<c_void>(),
                len,
                sys::FI_REMOTE_READ,
                0,
                key,
                0,
                &mut mr,
                ptr::null_mut(),
            )
        };
        check("fi_mr_reg", ret)?;
        // SAFETY: fi_mr_reg succeeded, so `mr` is an open registration.
        let key = unsafe { sys::fi_mr_key(mr) };
        Ok(Mr { mr, key })
    }

    /// The remote address of byte 0 of a region registered at `buf`.
    pub(crate) fn remote_addr(&self, buf: *const u8) -> u64 {
        if self.limits.virt_addr {
            buf as u64
        } else {
            0
        }
    }

    /// Asks whether the CQ may be waited on (`fi_trywait`): `true` if the
    /// caller may sleep on [`Fabric::wait_fd`] now.
    pub(crate) fn trywait(&self) -> bool {
        // SAFETY: the CQ is open; `fids` points at one valid fid pointer.
        unsafe {
            let mut fid: *mut sys::fid = ptr::addr_of_mut!((*self.cq).fid);
            sys::fi_trywait(self.fabric, &mut fid, 1) == 0
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // SAFETY: each object is closed once, children before parents
        // (endpoint, AV, CQ, domain, fabric), and only if it was opened.
        unsafe {
            if !self.ep.is_null() {
                sys::fi_close(&mut (*self.ep).fid);
            }
            if !self.av.is_null() {
                sys::fi_close(&mut (*self.av).fid);
            }
            if !self.cq.is_null() {
                sys::fi_close(&mut (*self.cq).fid);
            }
            if !self.domain.is_null() {
                sys::fi_close(&mut (*self.domain).fid);
            }
            if !self.fabric.is_null() {
                sys::fi_close(&mut (*self.fabric).fid);
            }
            if !self.infos.is_null() {
                sys::fi_freeinfo(self.infos);
            }
        }
    }
}

/// One memory registration; closed on drop. Must be dropped while its
/// domain is open and under the domain's serialization (the engine lock).
pub(crate) struct Mr {
    mr: *mut sys::fid_mr,
    /// The key peers use to access it.
    pub(crate) key: u64,
}

// SAFETY: a registration handle is not tied to a thread; the owner only
// closes it under the engine lock (see the type docs).
unsafe impl Send for Mr {}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: `mr` is an open registration (constructed only after a
        // successful fi_mr_reg) closed exactly once, here.
        unsafe {
            sys::fi_close(&mut (*self.mr).fid);
        }
    }
}
