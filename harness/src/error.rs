//! Errors of the harness. Every one of them is a usage or input problem (exit code 2), but
//! Ctrl-C (130): a divergence is not an error but a verdict (exit code 1).

use thiserror::Error;

/// What to do when the reference environment is missing or incomplete.
pub const SETUP_FIX: &str =
    "run `make setup` in the lockstep repository, or `lockstep doctor` for the command that creates the environment \
     (or point LOCKSTEP_VENV at an environment made by scripts/setup_env.sh)";

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
    /// A Python module of the reference environment could not be imported.
    #[error("{doing}: {traceback}\n{}", SETUP_FIX)]
    PythonImport { doing: String, traceback: String },
    /// A reference raised an exception: what was being done, and the Python traceback.
    #[error("{doing}: Python raised an exception:\n{traceback}")]
    PythonException { doing: String, traceback: String },
    /// A `--reference` entry names no reference lockstep knows.
    #[error("unknown reference `{name}`; known references: {known} (append `:f64` to run one in float64, e.g. transformers:f64)")]
    UnknownReference { name: String, known: String },
    /// A `--reference` entry with a dtype other than f32/f64.
    #[error("reference `{entry}`: unknown dtype `{dtype}` (use f32 or f64)")]
    ReferenceDtype { entry: String, dtype: String },
    /// The same `--reference` entry twice.
    #[error("reference `{entry}` is given twice")]
    DuplicateReference { entry: String },
    /// An empty `--reference` list.
    #[error("--reference needs at least one reference")]
    NoReference,
    /// The prompt has no tokens on the engine's side.
    #[error("the prompt encodes to no tokens")]
    EmptyPrompt,
    /// A trace cannot be read, written or replayed as asked.
    #[error("trace {name}: {message}")]
    Trace { name: String, message: String },
    /// A suite file is wrong: the file and what is wrong with it.
    #[error("{path}: {message}")]
    Suite { path: String, message: String },
    /// `--steps 0`.
    #[error("--steps must be at least 1")]
    ZeroSteps,
    /// A reference's step lacks a site its `describe()` lists.
    #[error("the {reference} reference lists site `{site}` in describe() but step() did not return it")]
    SiteNotReturned { reference: String, site: String },
    /// A reference declares no logits (every comparison needs them).
    #[error("the {reference} reference does not provide `logits`")]
    NoLogits { reference: String },
    /// The engine and a reference loaded models of different depth.
    #[error("the engine's model has {engine} layers, the {reference} reference's has {theirs}: they did not load the same model")]
    LayerCount { reference: String, engine: usize, theirs: usize },
    /// The logits of a step have another shape on a reference.
    #[error("logits: engine shape [{n_pos}, {vocab}], {reference} reference {shape:?}: vocabularies or positions differ")]
    LogitsShape { reference: String, n_pos: usize, vocab: usize, shape: Vec<usize> },
    /// The engine under test returned logits of another shape than the contract allows.
    #[error("the engine under test returned logits of shape {shape:?} for {fed} token(s) fed: forward must return (positions fed, vocab) or (1, vocab) for the last position")]
    EngineLogits { fed: usize, shape: Vec<usize> },
    /// The engine captured a site its own site graph does not declare.
    #[error("the engine captured `{site}`, which is not in its site graph")]
    SiteNotInGraph { site: String },
    /// Ctrl-C (SIGINT): the run stopped at a step boundary; nothing half-done was written.
    #[error("interrupted (Ctrl-C): stopped before the next step; nothing half-done was written")]
    Interrupted,
    /// A reference answered a step with something the protocol does not allow (the harness
    /// cannot compare it, and the engine is not to blame).
    #[error("the {reference} reference broke the protocol: {message}")]
    Protocol { reference: String, message: String },
    /// Bisect's isolation needs a reference tensor that was not kept.
    #[error("bisect isolation: the reference did not provide `{site}`")]
    IsolationInput { site: String },
}

impl HarnessError {
    /// 130 for Ctrl-C (128 + SIGINT, as shells report it), else 2.
    pub fn exit_code(&self) -> u8 {
        match self {
            HarnessError::Interrupted => 130,
            _ => 2,
        }
    }
}

impl From<candle_core::Error> for HarnessError {
    fn from(e: candle_core::Error) -> Self {
        HarnessError::Engine(lockstep_engine::EngineError::from(e))
    }
}
