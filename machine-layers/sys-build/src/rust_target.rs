//! The Rust version bindgen generates code for: the `rust-version` of the
//! package being built (the workspace's minimum supported Rust), so the
//! bindings use no newer syntax (e.g. no `unsafe extern` blocks before 1.82).

/// The bindgen target for the `rust-version` of the package whose build
/// script runs (`CARGO_PKG_RUST_VERSION`).
///
/// # Panics
///
/// If the package has no `rust-version`, or bindgen does not know it.
pub(crate) fn package_rust_target() -> bindgen::RustTarget {
    let declared = std::env::var("CARGO_PKG_RUST_VERSION").unwrap_or_default();
    let Some((minor, patch)) = parse_rust_version(&declared) else {
        panic!(
            "the package's rust-version is {declared:?}; charmrs-sys-build needs a `1.MINOR` or \
             `1.MINOR.PATCH` rust-version to choose the Rust syntax of the bindings"
        );
    };
    bindgen::RustTarget::stable(minor, patch).unwrap_or_else(|e| {
        panic!("bindgen cannot generate code for Rust {declared} (the package's rust-version): {e}")
    })
}

/// `"1.80"` -> `(80, 0)`, `"1.80.1"` -> `(80, 1)`; `None` for anything else.
fn parse_rust_version(v: &str) -> Option<(u64, u64)> {
    let mut parts = v.trim().split('.');
    if parts.next()? != "1" {
        return None;
    }
    let minor = parts.next()?.parse().ok()?;
    let patch = match parts.next() {
        Some(p) => p.parse().ok()?,
        None => 0,
    };
    parts.next().is_none().then_some((minor, patch))
}

#[cfg(test)]
mod tests {
    use super::parse_rust_version;

    #[test]
    fn parses_minor_and_optional_patch() {
        assert_eq!(parse_rust_version("1.80"), Some((80, 0)));
        assert_eq!(parse_rust_version("1.80.1"), Some((80, 1)));
    }

    #[test]
    fn rejects_missing_or_malformed_versions() {
        for v in ["", "1", "2.0", "1.x", "1.80.1.2", "1.80-beta"] {
            assert_eq!(parse_rust_version(v), None, "{v:?}");
        }
    }
}
