//! Finds libfabric through pkg-config, generates the bindings with bindgen,
//! and compiles C wrappers for the `static inline` part of the API.
//!
//! Almost every libfabric call (`fi_domain`, `fi_endpoint`, `fi_sendmsg`,
//! `fi_read`, `fi_cq_read`, `fi_mr_reg`, ...) is a `static inline` function
//! in the headers that jumps through the object's operations table; only a
//! few (`fi_getinfo`, `fi_freeinfo`, `fi_fabric`, `fi_strerror`, ...) are
//! exported by `libfabric.so`. bindgen's `wrap_static_fns` writes one
//! exported C function per inline one (named `<name>__extern`, and bound
//! under the original name), which the `cc` crate compiles into a static
//! library linked into this crate.

use std::env;
use std::path::PathBuf;

/// Functions bound: every `fi_*` call of the public headers (the exported
/// ones directly, the inline ones through the generated wrappers).
const FUNCTIONS: &str = "fi_.*";

/// Types bound (their dependencies follow).
const TYPES: &[&str] = &["fi_.*", "fid_.*", "fid", "iovec"];

/// Gives the integer `#define`s the Rust type of the C field or argument
/// they are used with, so no cast is needed at the call sites (bindgen would
/// otherwise choose `u32` for every value that fits).
#[derive(Debug)]
struct TypedConstants;

impl bindgen::callbacks::ParseCallbacks for TypedConstants {
    fn int_macro(&self, name: &str, _value: i64) -> Option<bindgen::callbacks::IntKind> {
        use bindgen::callbacks::IntKind;
        if !name.starts_with("FI_") {
            return None;
        }
        Some(match name {
            // `int mr_mode` bits.
            _ if name.starts_with("FI_MR_") => IntKind::Int,
            // Error numbers (positive; calls return them negated).
            _ if name.starts_with("FI_E") && !name.starts_with("FI_EXP") => IntKind::Int,
            "FI_MAJOR_VERSION" | "FI_MINOR_VERSION" | "FI_REVISION_VERSION" => IntKind::U32,
            "FI_NAME_MAX" => IntKind::Custom {
                name: "usize",
                is_signed: false,
            },
            // Capability, mode, operation-flag, access and order bits are
            // all `uint64_t`.
            _ => IntKind::U64,
        })
    }
}

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let lib = match pkg_config::Config::new()
        .atleast_version("1.10")
        .probe("libfabric")
    {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "\ncharmrs-ofi-sys: libfabric was not found through pkg-config \
                 (`pkg-config --cflags --libs libfabric`).\n\
                 On Debian/Ubuntu install it with:   apt-get install libfabric-dev pkg-config\n\
                 (bindgen also needs libclang:     apt-get install libclang-dev clang)\n\
                 or point PKG_CONFIG_PATH at the directory holding libfabric.pc.\n\
                 pkg-config said: {e}\n"
            );
            panic!(
                "libfabric not found by pkg-config; install the Debian package `libfabric-dev` \
                 (apt-get install libfabric-dev; see the message above)"
            );
        }
    };

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let wrappers = out.join("ofi_inline_wrappers");
    let header =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("wrapper.h");

    // Generate code for the workspace's minimum Rust version (1.80: no
    // `unsafe extern` blocks).
    let target = bindgen::RustTarget::stable(80, 0)
        .unwrap_or_else(|e| panic!("bindgen does not know Rust 1.80: {e}"));
    let mut builder = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .rust_target(target)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .parse_callbacks(Box::new(TypedConstants))
        .clang_args(
            lib.include_paths
                .iter()
                .map(|p| format!("-I{}", p.display())),
        )
        .allowlist_function(FUNCTIONS)
        .allowlist_var("FI_.*")
        .allowlist_recursively(true)
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .generate_comments(false)
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers);
    for t in TYPES {
        builder = builder.allowlist_type(t);
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!(
            "bindgen could not generate the libfabric bindings from rdma/fabric.h ({e}); is \
             libclang installed (Debian: `apt-get install libclang-dev`)?"
        )
    });
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");

    // The wrappers of the static inline functions: one exported C function
    // each, compiled against the same headers.
    let mut cc = cc::Build::new();
    cc.file(wrappers.with_extension("c"))
        .include(header.parent().expect("wrapper.h has a directory"))
        .warnings(false);
    for p in &lib.include_paths {
        cc.include(p);
    }
    cc.compile("charmrs_ofi_inline");
}
