//! Finds UCX through pkg-config (`ucx.pc`, Debian package `libucx-dev`) and
//! generates the bindings with bindgen.
//!
//! Only the ucp calls and types charmrs uses are allowlisted; `src/lib.rs`
//! lists them and re-implements the needed static inline helpers and macros
//! in Rust.

use std::env;
use std::path::PathBuf;

/// Functions of the ucp / ucs API that are bound.
const FUNCTIONS: &[&str] = &[
    // context
    "ucp_init_version",
    "ucp_cleanup",
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

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let lib = match pkg_config::Config::new()
        .atleast_version("1.10")
        .probe("ucx")
    {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "\ncharmrs-ucx-sys: UCX was not found through pkg-config \
                 (`pkg-config --cflags --libs ucx`).\n\
                 On Debian/Ubuntu install it with:   apt-get install libucx-dev pkg-config\n\
                 (bindgen also needs libclang:     apt-get install libclang-dev)\n\
                 or point PKG_CONFIG_PATH at the directory holding ucx.pc.\n\
                 pkg-config said: {e}\n"
            );
            panic!(
                "UCX not found by pkg-config; install the Debian package `libucx-dev` \
                 (apt-get install libucx-dev; see the message above)"
            );
        }
    };

    // Generate code for the workspace's minimum Rust version (1.80: no
    // `unsafe extern` blocks).
    let target = bindgen::RustTarget::stable(80, 0)
        .unwrap_or_else(|e| panic!("bindgen does not know Rust 1.80: {e}"));
    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .rust_target(target)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .clang_args(
            lib.include_paths
                .iter()
                .map(|p| format!("-I{}", p.display())),
        )
        .allowlist_recursively(true)
        // C enums become plain integer constants named as in C
        // (`UCP_FEATURE_AM`), so they combine into bit masks without casts.
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .generate_comments(false);
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    for t in TYPES {
        builder = builder.allowlist_type(t);
    }
    for v in VARS {
        builder = builder.allowlist_var(v);
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!(
            "bindgen could not generate the UCX bindings from ucp/api/ucp.h ({e}); is libclang \
             installed (Debian: `apt-get install libclang-dev`)?"
        )
    });
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");
}
