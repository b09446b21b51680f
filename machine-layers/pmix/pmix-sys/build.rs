//! Finds PMIx through pkg-config (`pmix.pc`, Debian package `libpmix-dev`)
//! and generates the bindings with bindgen; the common steps are
//! `charmrs-sys-build`'s.
//!
//! Only the client calls and types charmrs uses are allowlisted; see
//! `src/lib.rs` for the list.

use charmrs_sys_build::{bindgen, Allowlist, NativeLib};

/// The library and the header the bindings are generated from.
const PMIX: NativeLib = NativeLib {
    name: "PMIx",
    pkg_config_name: "pmix",
    min_version: "3.0",
    debian_package: "libpmix-dev",
    header: "wrapper.h",
};

/// Functions of the PMIx client API that are bound.
const FUNCTIONS: &[&str] = &[
    "PMIx_Init",
    "PMIx_Initialized",
    "PMIx_Finalize",
    "PMIx_Abort",
    "PMIx_Put",
    "PMIx_Commit",
    "PMIx_Fence",
    "PMIx_Fence_nb",
    "PMIx_Get",
    "PMIx_Error_string",
    "PMIx_Get_version",
    "PMIx_Value_destruct",
    // `PMIX_VALUE_RELEASE` is a macro over `PMIx_Value_destruct` and the
    // static inline `pmix_free`, which is `free`: bind libc's `free` so the
    // macro can be written in Rust without a C shim.
    "free",
];

/// Types (their dependencies follow).
const TYPES: &[&str] = &[
    "pmix_proc_t",
    "pmix_value_t",
    "pmix_info_t",
    "pmix_byte_object_t",
    "pmix_status_t",
    "pmix_rank_t",
    "pmix_scope_t",
    "pmix_data_type_t",
    "pmix_info_directives_t",
    "pmix_key_t",
    "pmix_nspace_t",
    "pmix_op_cbfunc_t",
];

/// Constants (`#define`s): status codes, data types, scopes, limits, ranks
/// and the attribute-name strings.
const VARS: &[&str] = &[
    "PMIX_SUCCESS",
    "PMIX_ERR_NOT_FOUND",
    "PMIX_ERR_TIMEOUT",
    "PMIX_ERR_UNREACH",
    "PMIX_ERR_INIT",
    "PMIX_OPERATION_SUCCEEDED",
    "PMIX_BOOL",
    "PMIX_INT",
    "PMIX_UINT16",
    "PMIX_UINT32",
    "PMIX_BYTE_OBJECT",
    "PMIX_PROC_RANK",
    "PMIX_GLOBAL",
    "PMIX_LOCAL",
    "PMIX_REMOTE",
    "PMIX_INFO_REQD",
    "PMIX_MAX_NSLEN",
    "PMIX_MAX_KEYLEN",
    "PMIX_RANK_WILDCARD",
    "PMIX_RANK_UNDEF",
    "PMIX_RANK",
    "PMIX_JOB_SIZE",
    "PMIX_LOCAL_RANK",
    "PMIX_LOCAL_SIZE",
    "PMIX_COLLECT_DATA",
    "PMIX_TIMEOUT",
    "PMIX_OPTIONAL",
    "PMIX_IMMEDIATE",
    "PMIX_VERSION_MAJOR",
    "PMIX_VERSION_MINOR",
    "PMIX_VERSION_RELEASE",
];

/// What is bound.
const ALLOWLIST: Allowlist = Allowlist {
    functions: FUNCTIONS,
    types: TYPES,
    vars: VARS,
};

/// Gives each integer `#define` the Rust type of the C typedef it is used
/// with, so no cast is needed at the call sites (bindgen would otherwise
/// make them all `u32`/`i32`).
#[derive(Debug)]
struct TypedConstants;

impl bindgen::callbacks::ParseCallbacks for TypedConstants {
    fn int_macro(&self, name: &str, _value: i64) -> Option<bindgen::callbacks::IntKind> {
        use bindgen::callbacks::IntKind;
        Some(match name {
            // pmix_status_t
            _ if name == "PMIX_SUCCESS"
                || name == "PMIX_OPERATION_SUCCEEDED"
                || name.starts_with("PMIX_ERR_") =>
            {
                IntKind::Int
            }
            // pmix_data_type_t
            "PMIX_BOOL" | "PMIX_INT" | "PMIX_UINT16" | "PMIX_UINT32" | "PMIX_BYTE_OBJECT"
            | "PMIX_PROC_RANK" => IntKind::U16,
            // pmix_scope_t
            "PMIX_GLOBAL" | "PMIX_LOCAL" | "PMIX_REMOTE" => IntKind::U8,
            // pmix_rank_t, pmix_info_directives_t
            "PMIX_RANK_WILDCARD" | "PMIX_RANK_UNDEF" | "PMIX_INFO_REQD" => IntKind::U32,
            // array lengths
            "PMIX_MAX_NSLEN" | "PMIX_MAX_KEYLEN" => IntKind::Custom {
                name: "usize",
                is_signed: false,
            },
            _ => return None,
        })
    }
}

fn main() {
    let pmix = PMIX.probe();
    let builder = pmix
        .bindgen_builder(&ALLOWLIST)
        .parse_callbacks(Box::new(TypedConstants));
    pmix.write_bindings(builder);
}
