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
//! library linked into this crate. The common steps, wrappers included, are
//! `charmrs-sys-build`'s (feature `inline-wrappers`).

use charmrs_sys_build::{bindgen, Allowlist, NativeLib};

/// The library and the header the bindings are generated from.
const LIBFABRIC: NativeLib = NativeLib {
    name: "libfabric",
    pkg_config_name: "libfabric",
    min_version: "1.10",
    debian_package: "libfabric-dev",
    header: "wrapper.h",
};

/// What is bound: every `fi_*` call of the public headers (the exported
/// ones directly, the inline ones through the generated wrappers), the
/// `fi_*`/`fid_*` types (their dependencies follow) and the `FI_*`
/// constants.
const ALLOWLIST: Allowlist = Allowlist {
    functions: &["fi_.*"],
    types: &["fi_.*", "fid_.*", "fid", "iovec"],
    vars: &["FI_.*"],
};

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
    let libfabric = LIBFABRIC.probe();
    let builder = libfabric
        .bindgen_builder(&ALLOWLIST)
        .parse_callbacks(Box::new(TypedConstants))
        .prepend_enum_name(false);
    libfabric.write_bindings_with_inline_wrappers(builder);
}
