//! The programs of the CharmPy paper and mini-apps, written with charmrs. Each binary in
//! `src/bin/` is one program; run it with `cargo run --release --bin NAME -- +pN [args]`.

pub mod cli;
pub mod leanmd;
pub mod stencil;
