//! Command-line helpers shared by the programs: refusing arguments a program does not take, and
//! bounding the size a run asks for before anything is allocated.
//!
//! The programs see their arguments after the runtime took its own options (`+pN`, `+balancer`,
//! …) out of them: `args[0]` is the program, the rest are the program's. A usage error prints
//! what is wrong, naming the argument, and the program's usage line, and exits with status 2.

/// Most grid points a stencil program (`stencil3d`, `heat2d`) accepts per process of the job:
/// 2^34 (about 1.7 × 10^10), 128 GiB per copy of the field at 8 bytes a point; the programs keep
/// two. A size past it is a mistake, not a run that could fit in memory.
pub const MAX_POINTS: u64 = 1 << 34;

/// Most atoms `leanmd` accepts per process of the job: 2^30 (about 10^9); with positions,
/// velocities, forces and the copies in flight an atom takes about 100 bytes, so over 100 GiB.
pub const MAX_ATOMS: u64 = 1 << 30;

/// The product of `factors`, or `None` if it does not fit in a `u64`.
pub fn product(factors: &[u64]) -> Option<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f))
}

/// Whether a run of `total` items (`None`: more than a `u64` holds) is more than `per_process`
/// items for each of `processes` processes.
pub fn too_large(total: Option<u64>, per_process: u64, processes: usize) -> bool {
    total.is_none_or(|t| t > per_process.saturating_mul(processes.max(1) as u64))
}

/// Prints `usage` and exits with status 2 (a usage error).
pub fn usage_exit(usage: &str) -> ! {
    eprintln!("usage: {usage}");
    std::process::exit(2)
}

/// For a program that takes no arguments of its own: if `args` (as `charmrs::start` passes them,
/// the program's name first) holds any more, names the first one and exits with status 2.
pub fn no_arguments(program: &str, args: &[String]) {
    if let Some(extra) = args.get(1) {
        eprintln!("{program}: unexpected argument `{extra}`: {program} takes no arguments");
        usage_exit(&format!("{program} [+pN] [runtime options]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_that_overflow_are_none() {
        assert_eq!(product(&[]), Some(1));
        assert_eq!(product(&[3, 4, 5]), Some(60));
        assert_eq!(product(&[1 << 32, 1 << 32]), None);
        assert_eq!(product(&[1_000_000; 4]), None);
        assert!(!too_large(Some(10), 10, 1));
        assert!(too_large(Some(11), 10, 1));
        assert!(!too_large(Some(20), 10, 2));
        assert!(too_large(None, u64::MAX, usize::MAX));
    }
}
