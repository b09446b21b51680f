//! UCX status codes as readable errors.
//!
//! Owns the conversion of a `ucs_status_t` into text (`ucs_status_string`)
//! and into [`TransportError`]s that name the call that failed.

use std::ffi::CStr;

use charmrs_transport::TransportError;
use charmrs_ucx_sys as sys;

/// The library's description of `status` ("Destination is unreachable", ...).
pub(crate) fn describe(status: sys::ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a pointer to a static NUL-terminated
    // string for every value (unknown codes included).
    let text = unsafe { CStr::from_ptr(sys::ucs_status_string(status)) };
    format!("{} (UCX status {status})", text.to_string_lossy())
}

/// `Ok(())` for `UCS_OK`, otherwise an error naming `what` and the status.
pub(crate) fn check(status: sys::ucs_status_t, what: &str) -> Result<(), TransportError> {
    if status == sys::UCS_OK {
        Ok(())
    } else {
        Err(TransportError::Io(std::io::Error::other(format!(
            "{what} failed: {}",
            describe(status)
        ))))
    }
}

/// Whether `status` means the remote process is gone or unreachable (as
/// opposed to a local or usage error).
pub(crate) fn is_peer_failure(status: sys::ucs_status_t) -> bool {
    matches!(
        status,
        sys::UCS_ERR_UNREACHABLE
            | sys::UCS_ERR_CONNECTION_RESET
            | sys::UCS_ERR_ENDPOINT_TIMEOUT
            | sys::UCS_ERR_REJECTED
            | sys::UCS_ERR_NOT_CONNECTED
            | sys::UCS_ERR_CANCELED
            | sys::UCS_ERR_TIMED_OUT
    ) || (sys::UCS_ERR_LAST_ENDPOINT_FAILURE..=sys::UCS_ERR_FIRST_ENDPOINT_FAILURE)
        .contains(&status)
        || (sys::UCS_ERR_LAST_LINK_FAILURE..=sys::UCS_ERR_FIRST_LINK_FAILURE).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_named() {
        assert!(check(sys::UCS_OK, "x").is_ok());
        let e = check(sys::UCS_ERR_NO_MEMORY, "ucp_mem_map").unwrap_err();
        assert!(e.to_string().contains("ucp_mem_map failed"), "{e}");
        assert!(is_peer_failure(sys::UCS_ERR_CONNECTION_RESET));
        assert!(is_peer_failure(sys::UCS_ERR_ENDPOINT_TIMEOUT));
        assert!(!is_peer_failure(sys::UCS_ERR_NO_MEMORY));
    }
}
