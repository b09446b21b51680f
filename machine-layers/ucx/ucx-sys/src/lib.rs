//! Raw bindings to UCX's ucp API (`libucp`), generated at build time by
//! bindgen from the system's `ucp/api/ucp.h` (found with pkg-config's
//! `ucx.pc`; Debian package `libucx-dev`).
//!
//! Only what charmrs needs is bound (the list is in `build.rs`): context
//! (`ucp_init_version`, `ucp_cleanup`, `ucp_config_read`,
//! `ucp_config_modify`), worker (create,
//! address, progress, event fd, arm, signal, active-message handler),
//! endpoints (create, close, flush), active messages (`ucp_am_send_nbx`,
//! `ucp_am_recv_data_nbx`, `ucp_am_data_release`), requests, memory
//! registration and remote keys (`ucp_mem_map`, `ucp_rkey_pack`,
//! `ucp_ep_rkey_unpack`), `ucp_get_nbx`, and `ucs_status_string`, with the
//! parameter structs and enums they use. C enums are plain constants named
//! as in C (`UCP_FEATURE_AM`).
//!
//! UCX helpers that are macros or `static inline` in C are written here in
//! Rust: [`ucp_init`] (inline over `ucp_init_version`), [`UCS_PTR_IS_ERR`],
//! [`UCS_PTR_IS_PTR`], [`UCS_PTR_STATUS`], [`UCS_PTR_RAW_STATUS`] and
//! [`ucp_dt_make_contig`].
//!
//! Everything here is `unsafe` to call; the safe interface is the
//! `charmrs-ucx` crate.

#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// `ucp_init` from `ucp.h` (a `static inline` over [`ucp_init_version`]
/// passing the API version these bindings were generated against).
///
/// # Safety
///
/// As `ucp_init`: `params` must point to a valid `ucp_params_t` whose
/// `field_mask` describes the initialised fields, `config` is null or from
/// [`ucp_config_read`], and `context_p` is writable.
pub unsafe fn ucp_init(
    params: *const ucp_params_t,
    config: *const ucp_config_t,
    context_p: *mut ucp_context_h,
) -> ucs_status_t {
    // SAFETY: forwarded verbatim; the caller upholds ucp_init's contract.
    unsafe { ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, params, config, context_p) }
}

/// `UCS_PTR_IS_ERR`: whether a pointer returned by a non-blocking call
/// encodes an error status.
pub fn UCS_PTR_IS_ERR(ptr: *const std::ffi::c_void) -> bool {
    ptr as usize >= UCS_ERR_LAST as isize as usize
}

/// `UCS_PTR_IS_PTR`: whether a pointer returned by a non-blocking call is a
/// real request handle (neither null = done, nor an error).
pub fn UCS_PTR_IS_PTR(ptr: *const std::ffi::c_void) -> bool {
    (ptr as usize).wrapping_sub(1) < (UCS_ERR_LAST as isize as usize).wrapping_sub(1)
}

/// `UCS_PTR_RAW_STATUS`: the status encoded in a pointer (meaningful only
/// when it is not a request handle).
pub fn UCS_PTR_RAW_STATUS(ptr: *const std::ffi::c_void) -> ucs_status_t {
    ptr as isize as ucs_status_t
}

/// `UCS_PTR_STATUS`: `UCS_INPROGRESS` for a request handle, otherwise the
/// encoded status (`UCS_OK` for null).
pub fn UCS_PTR_STATUS(ptr: *const std::ffi::c_void) -> ucs_status_t {
    if UCS_PTR_IS_PTR(ptr) {
        UCS_INPROGRESS
    } else {
        UCS_PTR_RAW_STATUS(ptr)
    }
}

/// `ucp_dt_make_contig(1)`: the contiguous byte datatype.
pub const fn ucp_dt_make_contig(elem_size: usize) -> ucp_datatype_t {
    ((elem_size as ucp_datatype_t) << UCP_DATATYPE_SHIFT) | UCP_DATATYPE_CONTIG as ucp_datatype_t
}

/// `ucp_dt_make_iov()`: the scatter-gather datatype (buffer = array of
/// [`ucp_dt_iov_t`], count = number of entries).
pub const fn ucp_dt_make_iov() -> ucp_datatype_t {
    UCP_DATATYPE_IOV as ucp_datatype_t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_status_helpers_match_the_c_macros() {
        let null = std::ptr::null::<std::ffi::c_void>();
        assert!(!UCS_PTR_IS_ERR(null));
        assert!(!UCS_PTR_IS_PTR(null));
        assert_eq!(UCS_PTR_STATUS(null), UCS_OK);
        let err = UCS_ERR_NO_MEMORY as isize as *const std::ffi::c_void;
        assert!(UCS_PTR_IS_ERR(err));
        assert!(!UCS_PTR_IS_PTR(err));
        assert_eq!(UCS_PTR_STATUS(err), UCS_ERR_NO_MEMORY);
        let req = 0x1000usize as *const std::ffi::c_void;
        assert!(UCS_PTR_IS_PTR(req));
        assert!(!UCS_PTR_IS_ERR(req));
        assert_eq!(UCS_PTR_STATUS(req), UCS_INPROGRESS);
    }

    #[test]
    fn library_reports_a_version_and_a_status_string() {
        // SAFETY: both return pointers to static NUL-terminated strings.
        let (v, s) = unsafe {
            (
                std::ffi::CStr::from_ptr(ucp_get_version_string()),
                std::ffi::CStr::from_ptr(ucs_status_string(UCS_ERR_NO_MEMORY)),
            )
        };
        assert!(v.to_str().unwrap().starts_with("1."));
        assert!(!s.to_bytes().is_empty());
    }
}
