//! Generating `$OUT_DIR/bindings.rs`: the bindgen options every charmrs
//! `-sys` crate shares, and writing the result.

use crate::rust_target::package_rust_target;
use crate::{Allowlist, FoundLib};

impl FoundLib {
    /// A bindgen builder over [`NativeLib::header`](crate::NativeLib::header)
    /// with the library's include paths, `allowlist` (bound recursively),
    /// and the options shared by charmrs's `-sys` crates: code for the
    /// package's `rust-version`, Cargo rerun lines for every header read,
    /// `Default` and `Debug` derives, layout tests, no doc comments.
    ///
    /// Add library-specific options and callbacks to the result, then pass
    /// it to [`FoundLib::write_bindings`].
    pub fn bindgen_builder(&self, allowlist: &Allowlist) -> bindgen::Builder {
        let builder = bindgen::Builder::default()
            .header(self.header.to_string_lossy())
            .rust_target(package_rust_target())
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            .clang_args(
                self.include_paths
                    .iter()
                    .map(|p| format!("-I{}", p.display())),
            )
            .allowlist_recursively(true)
            .derive_default(true)
            .derive_debug(true)
            .layout_tests(true)
            .generate_comments(false);
        allowlist.apply(builder)
    }

    /// Generates the bindings and writes them to `$OUT_DIR/bindings.rs`.
    ///
    /// # Panics
    ///
    /// If bindgen fails (most often: libclang is missing) or the file
    /// cannot be written.
    pub fn write_bindings(&self, builder: bindgen::Builder) {
        let bindings = builder.generate().unwrap_or_else(|e| {
            panic!(
                "{}: bindgen could not generate the {} bindings from {} ({e}); is libclang \
                 installed (Debian: `apt-get install libclang-dev`)?",
                self.crate_name,
                self.lib.name,
                self.header.display()
            )
        });
        let path = self.out_dir.join("bindings.rs");
        bindings
            .write_to_file(&path)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}
