//! Engine errors. Each variant carries what a user needs to act: the file, the tensor,
//! the shapes, the key. Loading never panics on bad input; it returns one of these.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, EngineError>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },

    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: cannot find {key} in metadata")]
    MissingMetadata { path: PathBuf, key: String },

    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, tensor: String, got: Vec<usize>, expected: Vec<usize> },

    #[error("{path}: unexpected tensor `{tensor}` ({count} unused in all; not part of a {arch} model): refusing to ignore it")]
    UnexpectedTensor { path: PathBuf, tensor: String, count: usize, arch: String },

    /// A tensor whose contents are unusable (NaN/Inf in a weight): the file is corrupted.
    #[error("{path}: tensor `{tensor}`: {message}")]
    BadTensor { path: PathBuf, tensor: String, message: String },

    /// An adapter (`--lora DIR`) that does not fit the model it is given to.
    #[error("{path}: {message}")]
    Adapter { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },

    #[error("{path}: malformed GGUF: {message}")]
    Gguf { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("input: {0}")]
    Input(String),

    /// An error inside an engine under test that is not the bundled one (a plug-in).
    #[error("the engine under test: {0}")]
    Engine(String),

    #[error("tensor op: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE`
/// is set: users get what went wrong and where in their file, not our stack.
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        EngineError::Io { path: path.into(), message: e.to_string() }
    }
}
