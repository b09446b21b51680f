//! Benchmarks of charmrs. The code lives in `benches/`; run them with
//! `cargo bench -p charmrs-bench` (see `docs/performance.md` for the figures and how to read them).
//!
//! This library is empty: it exists so that the package has a target other than its benchmarks.
