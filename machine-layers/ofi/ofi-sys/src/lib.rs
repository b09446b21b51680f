//! Raw bindings to libfabric (`libfabric.so`, the OpenFabrics Interfaces),
//! generated at build time by bindgen from the system's `rdma/*.h` (found
//! with pkg-config; Debian package `libfabric-dev`).
//!
//! Every `fi_*` function of the headers is bound. Most of them are
//! `static inline` in C (they dispatch through the object's operations
//! table); for those, `build.rs` compiles exported C wrappers, so they are
//! called from Rust under their usual names exactly like the exported ones
//! (`fi_getinfo`, `fi_fabric`, `fi_strerror`, ...). Types (`fi_info`,
//! `fid_ep`, `fi_cq_msg_entry`, ...) and constants (`FI_MSG`, `FI_EAGAIN`,
//! `FI_EP_RDM`, ...) keep their C names; enum constants are not prefixed
//! with the enum's name. Bit constants are `u64` (the type of the `caps`,
//! `mode`, `flags` and `msg_order` fields), except the `FI_MR_*` modes,
//! which are `i32` like `mr_mode`; error numbers are positive `i32`s that
//! calls return negated.
//!
//! Two macros of the headers cannot be expressed by bindgen and are written
//! here: [`FI_VERSION`] and [`FI_ADDR_UNSPEC`].
//!
//! Everything here is `unsafe` to call; the safe interface is the
//! `charmrs-ofi` crate.

#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs,
    unreachable_pub,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// `FI_VERSION(major, minor)`: the API version number passed to
/// [`fi_getinfo`].
pub const fn FI_VERSION(major: u32, minor: u32) -> u32 {
    (major << 16) | minor
}

/// `FI_ADDR_UNSPEC`: "no particular peer" (receive from anyone).
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_reports_a_version_and_error_strings() {
        // SAFETY: `fi_version` takes no arguments and only reads constants.
        let v = unsafe { fi_version() };
        assert!(v >= FI_VERSION(1, 10), "libfabric too old: {v:#x}");
        // SAFETY: `fi_strerror` returns a pointer to a static string for
        // any error number.
        let s = unsafe { std::ffi::CStr::from_ptr(fi_strerror(FI_EAGAIN)) };
        assert!(!s.to_bytes().is_empty());
    }
}
