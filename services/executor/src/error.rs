//! Errors of model loading and step execution.

use thiserror::Error;

/// Everything that can go wrong loading a model or running a step.
#[derive(Debug, Error)]
pub enum ExecutorError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `config.json` is malformed or describes something unsupported.
    #[error("model config: {0}")]
    Config(String),
    /// A weight file is malformed, a tensor is missing, or one has the wrong shape or dtype.
    #[error("model weights: {0}")]
    Weights(String),
    /// A step plan refers to something that does not exist (bad block, bad token, bad sequence).
    #[error("invalid step plan: {0}")]
    InvalidPlan(String),
    /// A compute device is missing, or failed.
    #[error("device: {0}")]
    Device(String),
}

impl From<pagemesh_gguf::GgufError> for ExecutorError {
    fn from(e: pagemesh_gguf::GgufError) -> Self {
        ExecutorError::Config(e.0)
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, ExecutorError>;
