//! Finds PMIx through pkg-config and generates the bindings with bindgen.
//!
//! Only the client calls and types charmrs uses are allowlisted; see
//! `src/lib.rs` for the list.

use std::env;
use std::path::PathBuf;

/// Functions of the PMIx client API that are bound.
const FUNCTIONS: &[&str] = &[
    "PMIx_Init",
    "PMIx_Initialized",
    "PMIx_Finalize",
    "PMIx_Abort",
    "PMIx_Put",
    "PMIx_Commit",
    "PMIx_Fence",
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
];

/// Constants (`#define`s): status codes, data types, scopes, limits, ranks
/// and the attribute-name strings.
const VARS: &[&str] = &[
    "PMIX_SUCCESS",
    "PMIX_ERR_NOT_FOUND",
    "PMIX_ERR_TIMEOUT",
    "PMIX_ERR_UNREACH",
    "PMIX_ERR_INIT",
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
            _ if name == "PMIX_SUCCESS" || name.starts_with("PMIX_ERR_") => IntKind::Int,
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
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let lib = match pkg_config::Config::new()
        .atleast_version("3.0")
        .probe("pmix")
    {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "\ncharmrs-pmix-sys: the PMIx client library was not found through pkg-config \
                 (`pkg-config --cflags --libs pmix`).\n\
                 On Debian/Ubuntu install it with:   apt-get install libpmix-dev pkg-config\n\
                 (bindgen also needs libclang:     apt-get install libclang-dev)\n\
                 or point PKG_CONFIG_PATH at the directory holding pmix.pc.\n\
                 pkg-config said: {e}\n"
            );
            panic!(
                "PMIx not found by pkg-config; install the Debian package `libpmix-dev` \
                 (see the message above)"
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
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .parse_callbacks(Box::new(TypedConstants))
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
            "bindgen could not generate the PMIx bindings from pmix.h ({e}); is libclang \
             installed (Debian: `apt-get install libclang-dev`)?"
        )
    });
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");
}
