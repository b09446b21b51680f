//! [`Error`]: everything the runtime can refuse, each variant naming the bad value and the valid range.

use crate::index::Index;

/// An error reported by charmrs. The message always names what was wrong and what would be valid.
///
/// Non-exhaustive: later versions may add variants, and fields to `Remote`; match with a `_`
/// arm and `..`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PE number that does not exist in this job.
    #[error("unknown PE {pe}: this job has {num_pes} PEs (valid PEs are 0..={max})", max = num_pes.saturating_sub(1))]
    PeOutOfRange {
        /// The PE that was asked for.
        pe: usize,
        /// Number of PEs in the job.
        num_pes: usize,
    },
    /// An array element index outside the array's dimensions.
    #[error("index {index} is out of range for an array of dimensions {dims}")]
    IndexOutOfRange {
        /// The index that was asked for.
        index: Index,
        /// The array's extent in every dimension.
        dims: Index,
    },
    /// An index with the wrong number of dimensions for its collection.
    #[error("index {index} has {got} dimension(s) but the {collection} expects {expected}")]
    IndexDimensions {
        /// The index that was given.
        index: Index,
        /// Its number of dimensions.
        got: usize,
        /// The number the collection uses.
        expected: usize,
        /// What kind of collection it is ("3-d array", "group", ...).
        collection: String,
    },
    /// An element index with a coordinate that no collection can have (coordinates are
    /// below 2^32, as extents are).
    #[error(
        "index coordinate {coordinate} is out of range: no collection has an extent above {max}"
    )]
    CoordinateTooLarge {
        /// The coordinate that was given.
        coordinate: usize,
        /// The largest extent of any collection.
        max: usize,
    },
    /// An array dimension that charmrs cannot represent.
    #[error("array dimension {extent} is too large (the maximum extent is {max})")]
    DimensionTooLarge {
        /// The extent that was asked for.
        extent: usize,
        /// The largest extent supported.
        max: usize,
    },
    /// A runtime call made on a thread that is not a running PE.
    #[error("`{what}` was called outside a running PE: call it from the entry point given to charmrs::start or from an entry method")]
    NotInRuntime {
        /// The call that was made.
        what: &'static str,
    },
    /// A bad command-line option or environment setting.
    #[error("{0}")]
    Options(String),
    /// The entry-method table is inconsistent (two entries hash to the same id).
    #[error("entry table: {0}")]
    EntryTable(String),
    /// A remote entry method failed (panicked) while computing a result someone asked for.
    #[error("entry method `{entry}` failed {}on PE {pe}: {message}", at_index(.index))]
    #[non_exhaustive]
    Remote {
        /// The PE it ran on.
        pe: usize,
        /// `Type::method`.
        entry: String,
        /// The index of the element whose entry failed (`None` for a task of the pool, which
        /// names its item in `message`).
        index: Option<crate::index::Index>,
        /// The panic message (with its source location when known).
        message: String,
    },
    /// A checkpoint could not be written or restored (`charmrs::checkpoint`,
    /// `charmrs::restore`): the message names the file, element or chare at fault.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A chare that cannot migrate was asked to.
    #[error("chare {chare} is not migratable: declare it with #[chare(migratable)] and derive Serialize and Deserialize")]
    NotMigratable {
        /// The chare type.
        chare: &'static str,
    },
    /// The job was aborted; the message says by whom and why.
    #[error("{0}")]
    Aborted(String),
}

/// `at index (2, 1) ` for [`Error::Remote`]'s message, or nothing.
fn at_index(index: &Option<crate::index::Index>) -> String {
    index.map_or_else(String::new, |i| format!("at index {i} "))
}

/// Result type of fallible charmrs calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
