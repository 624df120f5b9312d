//! GGUF v3 reader and atomic writer (being built).
#![deny(missing_docs)]

/// Errors from reading or writing GGUF files.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Placeholder.
    #[error("{0}")]
    Other(String),
}
