//! Errors reported by machine layers, bootstraps and the wire codec.
//!
//! This module owns [`TransportError`], the single error type of the crate.
//! Every variant names *what* went wrong with enough context (which process,
//! how many bytes) to be acted on without a backtrace. Two groups matter to
//! callers:
//!
//! * [`TransportError::Truncated`] is the only *recoverable* decode error: a
//!   stream transport that sees it simply waits for more bytes.
//! * [`TransportError::Malformed`] and [`TransportError::TooLarge`] from the
//!   decoder mean the peer sent garbage (or is hostile); the connection must
//!   be dropped, never resynchronised.

use crate::layer::ProcessId;

/// Everything that can go wrong below the runtime: addressing, framing,
/// lost peers, I/O and job bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A message was addressed to a process outside `0..size`.
    #[error("unknown process {dst}: the job has {size} processes")]
    UnknownProcess {
        /// The rank that was asked for.
        dst: ProcessId,
        /// Number of processes in the job.
        size: u32,
    },

    /// The input ended before a complete item could be decoded. `needed` is
    /// a lower bound on the total input length required, given what has been
    /// parsed so far; more input may reveal that even more is needed.
    #[error("truncated input: needed at least {needed} bytes, got {got}")]
    Truncated {
        /// Minimum number of bytes required so far.
        needed: usize,
        /// Number of bytes available.
        got: usize,
    },

    /// A length or count exceeds its limit (frame size, segment count).
    #[error("too large: {len} exceeds the limit of {max}")]
    TooLarge {
        /// The offending length or count (saturated at `u64::MAX` on overflow).
        len: u64,
        /// The limit it was checked against.
        max: u64,
    },

    /// Input that can never become valid (bad magic, unknown version,
    /// non-zero reserved bytes, inconsistent fields).
    #[error("malformed input: {0}")]
    Malformed(String),

    /// A peer process died or its connection broke.
    #[error("lost contact with process {process}: {reason}")]
    PeerLost {
        /// The rank of the lost process.
        process: ProcessId,
        /// What was observed (error text, "connection closed", ...).
        reason: String,
    },

    /// The machine layer does not implement the requested operation.
    #[error("unsupported by this machine layer: {0}")]
    Unsupported(&'static str),

    /// An operating-system I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The job bootstrap (key-value exchange, fence) failed.
    #[error("bootstrap failed: {0}")]
    Bootstrap(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_problem() {
        let e = TransportError::UnknownProcess { dst: 7, size: 4 };
        assert_eq!(e.to_string(), "unknown process 7: the job has 4 processes");
        let e = TransportError::Truncated { needed: 32, got: 5 };
        assert_eq!(
            e.to_string(),
            "truncated input: needed at least 32 bytes, got 5"
        );
        let e = TransportError::PeerLost {
            process: 3,
            reason: "connection closed".into(),
        };
        assert_eq!(
            e.to_string(),
            "lost contact with process 3: connection closed"
        );
    }

    #[test]
    fn io_errors_convert() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipe");
        let e: TransportError = io.into();
        assert!(
            matches!(e, TransportError::Io(ref inner) if inner.kind() == std::io::ErrorKind::BrokenPipe)
        );
    }
}
