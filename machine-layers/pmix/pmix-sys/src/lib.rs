//! Raw bindings to the PMIx client library (`libpmix`), generated at build
//! time by bindgen from the system's `pmix.h` (found with pkg-config;
//! Debian package `libpmix-dev`).
//!
//! Only what charmrs needs is bound: `PMIx_Init`, `PMIx_Finalize`,
//! `PMIx_Initialized`, `PMIx_Abort`, `PMIx_Put`, `PMIx_Commit`,
//! `PMIx_Fence`, `PMIx_Fence_nb`, `PMIx_Get`, `PMIx_Error_string`,
//! `PMIx_Get_version`, `PMIx_Value_destruct` (with libc's `free`, the two
//! halves of the `PMIX_VALUE_RELEASE` macro); the types `pmix_proc_t`,
//! `pmix_value_t`, `pmix_info_t`, `pmix_byte_object_t` and what they
//! contain, and the callback type `pmix_op_cbfunc_t`; and the constants
//! listed in `build.rs` (status codes, data types, scopes, ranks, attribute
//! names). String attribute names such as [`PMIX_JOB_SIZE`] are
//! NUL-terminated byte strings (`&[u8; N]`), ready to pass as `const char*`.
//!
//! Everything here is `unsafe` to call; the safe interface is the
//! `charmrs-pmix` crate.

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
