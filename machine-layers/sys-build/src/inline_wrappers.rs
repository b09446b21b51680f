//! Bindings to `static inline` functions (feature `inline-wrappers`).
//!
//! A library whose API is mostly `static inline` in its headers (libfabric)
//! exports no symbol for those calls. bindgen's `wrap_static_fns` writes one
//! exported C function per inline one (`<name>__extern`, bound in Rust under
//! the original name) to `$OUT_DIR/inline_wrappers.c`; the `cc` crate
//! compiles that file against the same headers into a static library named
//! after the `-sys` crate (`charmrs_ofi_sys_inline`), which Cargo links into
//! it.

use crate::FoundLib;

impl FoundLib {
    /// [`FoundLib::write_bindings`], plus exported C wrappers for the
    /// `static inline` functions the allowlist selects, compiled and linked.
    ///
    /// # Panics
    ///
    /// As [`FoundLib::write_bindings`]; and if the C compiler fails (`cc`
    /// prints its diagnostics).
    pub fn write_bindings_with_inline_wrappers(&self, builder: bindgen::Builder) {
        let wrappers = self.out_dir.join("inline_wrappers");
        self.write_bindings(
            builder
                .wrap_static_fns(true)
                .wrap_static_fns_path(&wrappers),
        );

        let mut cc = cc::Build::new();
        cc.file(wrappers.with_extension("c")).warnings(false);
        if let Some(dir) = self.header.parent() {
            cc.include(dir);
        }
        for p in &self.include_paths {
            cc.include(p);
        }
        cc.compile(&format!("{}_inline", self.crate_name.replace('-', "_")));
    }
}
