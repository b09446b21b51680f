//! [`NativeLib`]: the description of a system library a `-sys` crate binds,
//! and [`FoundLib`]: that library once pkg-config has found it.
//!
//! Probing emits the `cargo:` rerun lines of the build script and, through
//! the `pkg-config` crate, the link directives (`rustc-link-lib`,
//! `rustc-link-search`, rpath arguments). A library that pkg-config cannot
//! find stops the build with a message naming the Debian package to install.

use std::env;
use std::fmt::Display;
use std::path::{Path, PathBuf};

/// A system library found through pkg-config, and the header its bindings
/// are generated from. Meant to be a `const` in the build script.
#[derive(Debug, Clone, Copy)]
pub struct NativeLib {
    /// Name used in messages, e.g. `"PMIx"`.
    pub name: &'static str,
    /// pkg-config package, the stem of its `.pc` file, e.g. `"pmix"`.
    pub pkg_config_name: &'static str,
    /// Oldest accepted version, e.g. `"3.0"`.
    pub min_version: &'static str,
    /// Debian package that provides the headers, the library and the `.pc`
    /// file, e.g. `"libpmix-dev"`.
    pub debian_package: &'static str,
    /// The C header bindgen reads, relative to the crate's manifest
    /// directory, e.g. `"wrapper.h"`.
    pub header: &'static str,
}

/// A [`NativeLib`] that pkg-config found; builds its bindings (see
/// [`FoundLib::bindgen_builder`] and [`FoundLib::write_bindings`]).
#[derive(Debug)]
pub struct FoundLib {
    pub(crate) lib: NativeLib,
    /// The `-sys` crate whose build script runs (`CARGO_PKG_NAME`).
    pub(crate) crate_name: String,
    /// Include directories reported by pkg-config (`-I` flags).
    pub(crate) include_paths: Vec<PathBuf>,
    /// Absolute path of [`NativeLib::header`].
    pub(crate) header: PathBuf,
    /// The build script's `OUT_DIR`.
    pub(crate) out_dir: PathBuf,
}

impl NativeLib {
    /// Finds the library with pkg-config, which emits the link directives.
    ///
    /// Also tells Cargo to rerun the build script when the header, the
    /// build script or `PKG_CONFIG_PATH` change.
    ///
    /// # Panics
    ///
    /// If pkg-config does not find the library at [`NativeLib::min_version`]
    /// or newer (after printing how to install [`NativeLib::debian_package`]),
    /// or if Cargo's build-script environment (`CARGO_PKG_NAME`,
    /// `CARGO_MANIFEST_DIR`, `OUT_DIR`) is missing.
    pub fn probe(self) -> FoundLib {
        println!("cargo:rerun-if-changed={}", self.header);
        println!("cargo:rerun-if-changed=build.rs");
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

        let crate_name = cargo_env("CARGO_PKG_NAME");
        let found = pkg_config::Config::new()
            .atleast_version(self.min_version)
            .probe(self.pkg_config_name);
        let library = match found {
            Ok(library) => library,
            Err(e) => {
                eprintln!("{}", self.not_found_message(&crate_name, &e));
                panic!(
                    "{} not found by pkg-config; install the Debian package `{}` \
                     (apt-get install {}; see the message above)",
                    self.name, self.debian_package, self.debian_package
                );
            }
        };
        FoundLib {
            lib: self,
            crate_name,
            include_paths: library.include_paths,
            header: Path::new(&cargo_env("CARGO_MANIFEST_DIR")).join(self.header),
            out_dir: PathBuf::from(cargo_env("OUT_DIR")),
        }
    }

    /// The explanation printed when pkg-config does not find the library;
    /// `crate_name` is the `-sys` crate being built, `error` what
    /// pkg-config said.
    fn not_found_message(&self, crate_name: &str, error: &dyn Display) -> String {
        let pc = self.pkg_config_name;
        format!(
            "\n{crate_name}: {name} {min}+ was not found through pkg-config \
             (`pkg-config --cflags --libs {pc}`).\n\
             On Debian/Ubuntu install it with:   apt-get install {deb} pkg-config\n\
             (bindgen also needs libclang:     apt-get install libclang-dev)\n\
             or point PKG_CONFIG_PATH at the directory holding {pc}.pc.\n\
             pkg-config said: {error}\n",
            name = self.name,
            min = self.min_version,
            deb = self.debian_package,
        )
    }
}

/// A variable Cargo sets for every build script.
fn cargo_env(name: &str) -> String {
    env::var(name).unwrap_or_else(|e| {
        panic!("{name} is not readable ({e}); charmrs-sys-build runs inside a Cargo build script")
    })
}

#[cfg(test)]
mod tests {
    use super::NativeLib;

    #[test]
    fn not_found_message_names_the_debian_package_and_the_pc_file() {
        let lib = NativeLib {
            name: "UCX",
            pkg_config_name: "ucx",
            min_version: "1.10",
            debian_package: "libucx-dev",
            header: "wrapper.h",
        };
        let msg = lib.not_found_message("charmrs-ucx-sys", &"Package ucx was not found");
        assert!(msg.contains("charmrs-ucx-sys: UCX 1.10+ was not found through pkg-config"));
        assert!(msg.contains("`pkg-config --cflags --libs ucx`"));
        assert!(msg.contains("apt-get install libucx-dev pkg-config"));
        assert!(msg.contains("libclang-dev"));
        assert!(msg.contains("directory holding ucx.pc"));
        assert!(msg.contains("pkg-config said: Package ucx was not found"));
    }
}
