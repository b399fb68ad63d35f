//! Errors of the harness. Every one of them is a usage or input problem (exit code 2):
//! a divergence is not an error but a verdict (exit code 1).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum HarnessError {
    /// Wrong command-line use: unknown alias, unknown reference, bad flag combination.
    #[error("{0}")]
    Usage(String),
    /// The reference environment is missing or incomplete.
    #[error("{0}")]
    Env(String),
    /// The engine refused the input (bad model file, shape mismatch, ...).
    #[error(transparent)]
    Engine(#[from] lockstep_engine::EngineError),
    /// An exception inside a reference, with its traceback.
    #[error("{0}")]
    Python(String),
    /// The engine and the reference disagree on something that is not numeric
    /// (e.g. the number of layers), so no comparison is possible.
    #[error("{0}")]
    Mismatch(String),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

impl HarnessError {
    pub fn exit_code(&self) -> u8 {
        2
    }
}

impl From<candle_core::Error> for HarnessError {
    fn from(e: candle_core::Error) -> Self {
        HarnessError::Engine(lockstep_engine::EngineError::from(e))
    }
}
