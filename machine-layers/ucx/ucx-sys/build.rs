//! Finds UCX through pkg-config (`ucx.pc`, Debian package `libucx-dev`) and
//! generates the bindings with bindgen; the common steps are
//! `charmrs-sys-build`'s.
//!
//! Only the ucp calls and types charmrs uses are allowlisted; `src/lib.rs`
//! lists them and re-implements the needed static inline helpers and macros
//! in Rust.

use charmrs_sys_build::{bindgen, Allowlist, NativeLib};

/// The library and the header the bindings are generated from.
const UCX: NativeLib = NativeLib {
    name: "UCX",
    pkg_config_name: "ucx",
    min_version: "1.10",
    debian_package: "libucx-dev",
    header: "wrapper.h",
};

/// Functions of the ucp / ucs API that are bound.
const FUNCTIONS: &[&str] = &[
    // context
    "ucp_init_version",
    "ucp_cleanup",
    "ucp_context_query",
    "ucp_config_read",
    "ucp_config_release",
    "ucp_config_modify",
    "ucp_get_version_string",
    // worker
    "ucp_worker_create",
    "ucp_worker_destroy",
    "ucp_worker_get_address",
    "ucp_worker_release_address",
    "ucp_worker_progress",
    "ucp_worker_get_efd",
    "ucp_worker_arm",
    "ucp_worker_signal",
    "ucp_worker_set_am_recv_handler",
    "ucp_worker_query",
    // endpoints
    "ucp_ep_create",
    "ucp_ep_close_nbx",
    "ucp_ep_flush_nbx",
    // active messages
    "ucp_am_send_nbx",
    "ucp_am_recv_data_nbx",
    "ucp_am_data_release",
    // requests
    "ucp_request_check_status",
    "ucp_request_free",
    "ucp_request_cancel",
    // memory and one-sided reads
    "ucp_mem_map",
    "ucp_mem_unmap",
    "ucp_rkey_pack",
    "ucp_rkey_buffer_release",
    "ucp_ep_rkey_unpack",
    "ucp_rkey_destroy",
    "ucp_get_nbx",
    // diagnostics
    "ucs_status_string",
    "ucs_global_opts_set_value",
];

/// Types (their dependencies follow).
const TYPES: &[&str] = &[
    "ucs_status_t",
    "ucs_thread_mode_t",
    "ucp_params_t",
    "ucp_params_field",
    "ucp_feature",
    "ucp_worker_params_t",
    "ucp_worker_params_field",
    "ucp_context_attr_t",
    "ucp_context_attr_field",
    "ucp_worker_attr_t",
    "ucp_worker_attr_field",
    "ucp_ep_params_t",
    "ucp_ep_params_field",
    "ucp_ep_params_flags_field",
    "ucp_err_handling_mode_t",
    "ucp_ep_close_flags_t",
    "ucp_ep_close_mode",
    "ucp_request_param_t",
    "ucp_op_attr_t",
    "ucp_am_handler_param_t",
    "ucp_am_handler_param_field",
    "ucp_am_cb_flags",
    "ucp_am_recv_param_t",
    "ucp_am_recv_attr_t",
    "ucp_send_am_flags",
    "ucp_dt_iov_t",
    "ucp_dt_type",
    "ucp_mem_map_params_t",
    "ucp_mem_map_params_field",
    "ucp_mem_map_flags",
];

/// Constants (`#define`s and anonymous enums).
const VARS: &[&str] = &[
    "UCP_API_MAJOR",
    "UCP_API_MINOR",
    // anonymous enum of ucp_mem_map protections
    "UCP_MEM_MAP_PROT_.*",
];

/// What is bound.
const ALLOWLIST: Allowlist = Allowlist {
    functions: FUNCTIONS,
    types: TYPES,
    vars: VARS,
};

fn main() {
    let ucx = UCX.probe();
    let builder = ucx
        .bindgen_builder(&ALLOWLIST)
        // C enums become plain integer constants named as in C
        // (`UCP_FEATURE_AM`), so they combine into bit masks without casts.
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false);
    ucx.write_bindings(builder);
}
