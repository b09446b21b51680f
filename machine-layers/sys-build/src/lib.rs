//! Build-script helper shared by charmrs's `-sys` crates (`charmrs-pmix-sys`,
//! `charmrs-ucx-sys`, `charmrs-ofi-sys`); used as a `[build-dependencies]`
//! entry, never at run time, and it needs no native library itself.
//!
//! It owns the steps every one of those build scripts takes, in order:
//!
//! 1. [`NativeLib::probe`]: find the library with pkg-config (which also
//!    emits the link directives), or stop the build with a message naming
//!    the Debian package to install;
//! 2. [`FoundLib::bindgen_builder`]: a `bindgen::Builder` over the crate's
//!    `wrapper.h` with the library's include paths, the crate's
//!    [`Allowlist`] and the options all the crates share (Rust target = the
//!    package's `rust-version`, `Default` and `Debug` derives, layout tests,
//!    no comments, Cargo rerun callbacks);
//! 3. [`FoundLib::write_bindings`]: generate `$OUT_DIR/bindings.rs`, which the
//!    crate's `lib.rs` `include!`s; or, with the `inline-wrappers` feature,
//!    `FoundLib::write_bindings_with_inline_wrappers`, which also compiles C
//!    wrappers for the headers' `static inline` functions and links them.
//!
//! What stays in each build script is what is specific to its library: the
//! [`NativeLib`] description, the allowlists, and extra bindgen options or
//! callbacks (enum style, typed constants), applied to the builder between
//! steps 2 and 3.
//!
//! Failures panic (the way a build script fails) after printing a message
//! that names what is missing and how to install it.

mod allowlist;
mod bindings;
#[cfg(feature = "inline-wrappers")]
mod inline_wrappers;
mod library;
mod rust_target;

/// The bindgen this crate drives, for the build scripts' own options and
/// callbacks (so they need no separate `bindgen` dependency).
pub use bindgen;

pub use allowlist::Allowlist;
pub use library::{FoundLib, NativeLib};
