//! [`Allowlist`]: which functions, types and constants of a library's headers
//! are bound.

/// The items of the headers that get bindings; each entry is a bindgen
/// pattern (an exact C name or a regular expression such as `fi_.*`).
/// Types used by an allowlisted item are bound too.
#[derive(Debug, Clone, Copy)]
pub struct Allowlist {
    /// Functions (exported or, with inline wrappers, `static inline`).
    pub functions: &'static [&'static str],
    /// Types: structs, unions, enums, typedefs.
    pub types: &'static [&'static str],
    /// Constants: `#define`s, `const` variables and anonymous enum values.
    pub vars: &'static [&'static str],
}

impl Allowlist {
    /// Adds every pattern of `self` to `builder`'s allowlists.
    pub(crate) fn apply(&self, mut builder: bindgen::Builder) -> bindgen::Builder {
        for f in self.functions {
            builder = builder.allowlist_function(f);
        }
        for t in self.types {
            builder = builder.allowlist_type(t);
        }
        for v in self.vars {
            builder = builder.allowlist_var(v);
        }
        builder
    }
}
