//! Errors of the measurement-file layer. Every message names the file (or `<string>` for
//! in-memory input), the linear / module / row concerned, the offending value and what was
//! expected, so a user can fix the file without reading our source.
use std::io;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MeasurementError {
    /// Reading, writing, syncing or renaming failed.
    #[error("{file}: cannot {action}: {source}")]
    Io {
        file: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    /// Zero bytes (or only whitespace): a crash before the first write, or a wrong path.
    #[error("{file}: the file is empty; expected {expected}")]
    Empty {
        file: String,
        expected: &'static str,
    },

    /// Malformed or truncated JSON.
    #[error("{file}: invalid JSON at line {line}, column {column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },

    /// Valid JSON, but not the kind of file this reader handles.
    #[error("{file}: {found}; expected {expected}")]
    WrongFormat {
        file: String,
        found: String,
        expected: String,
    },

    #[error(
        "{file}: unsupported measurement version {found}; this exl2rs reads version {supported}"
    )]
    UnsupportedVersion {
        file: String,
        found: String,
        supported: u32,
    },

    /// A field is missing or has the wrong JSON type. `at` is the JSON path.
    #[error("{file}: {at}: {message}")]
    Schema {
        file: String,
        at: String,
        message: String,
    },

    #[error("{file}: {at}: config index {index} is out of range; expected 0..{count} (the file lists {count} configs)")]
    ConfigIndex {
        file: String,
        at: String,
        index: u64,
        count: usize,
    },

    #[error("{file}: {at}: bits = {found}, but config {config} ({desc}) costs exactly {expected} bits on a {in_features}x{out_features} matrix")]
    BitsMismatch {
        file: String,
        at: String,
        config: usize,
        desc: String,
        found: u64,
        expected: u64,
        in_features: u64,
        out_features: u64,
    },

    /// A number that is NaN, infinite, negative or otherwise out of its domain.
    #[error("{file}: {at}: {field} = {value}; expected {expected}")]
    BadNumber {
        file: String,
        at: String,
        field: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error(
        "{file}: duplicate {what} name {name:?} at {first} and {second}; expected unique names"
    )]
    Duplicate {
        file: String,
        what: &'static str,
        name: String,
        first: String,
        second: String,
    },

    /// Any other inconsistency found by validation.
    #[error("{file}: {at}: {message}")]
    Invalid {
        file: String,
        at: String,
        message: String,
    },

    /// A cache key (model / calibration / candidate hash) differs from what the caller expects.
    #[error("{file}: {what} mismatch: the file has {found:?}, expected {expected:?}; the measurement belongs to a different {what} and cannot be reused")]
    KeyMismatch {
        file: String,
        what: &'static str,
        found: String,
        expected: String,
    },

    /// Members of a fused group (one shared input) were measured with different configs.
    #[error("fused group {group:?}: {member:?} lacks config {config} that {other:?} has; fused linears must share their configs (measure them with the same candidate set, or disable fusing)")]
    FusedMismatch {
        group: String,
        member: String,
        other: String,
        config: u32,
    },

    /// Converting to an allocation problem, a strategy or a job file failed.
    #[error("{context}: {message}")]
    Convert { context: String, message: String },
}

pub type Result<T, E = MeasurementError> = std::result::Result<T, E>;
