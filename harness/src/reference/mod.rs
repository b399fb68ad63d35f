//! The references: what the harness compares the engine against. A [`Reference`] is a
//! [`Backend`] (a live Python module of `references/`, a recorded trace, or a recorder
//! wrapping a live one) with the [`Description`] it gave of itself; its capabilities are
//! declared, never inferred from its name.
//!
//! - [`python`]: the embedded interpreter and the live Python backend
//! - [`pycall`]: Python errors in one place, JSON-shaped calls
//! - [`arrays`]: the arrays of one step, borrowed from numpy or held in Rust
//! - [`load`]: parsing `--reference` entries and loading the reference each names

use std::any::Any;

use pyo3::prelude::*;

use crate::error::HarnessError;

pub mod arrays;
pub mod engine;
pub mod load;
pub mod pycall;
pub mod python;
pub mod python_engine;

pub use arrays::{SiteArrays, StepArrays, StepOutput};

/// Known references: CLI name -> module in `references/`.
pub const REFERENCES: &[(&str, &str)] =
    &[("transformers", "transformers_ref"), ("mlx", "mlx_ref"), ("llamacpp", "llamacpp_ref")];

pub fn reference_module(name: &str) -> Result<&'static str, HarnessError> {
    REFERENCES.iter().find(|(n, _)| *n == name).map(|(_, m)| *m).ok_or_else(|| {
        let known: Vec<&str> = REFERENCES.iter().map(|(n, _)| *n).collect();
        HarnessError::UnknownReference { name: name.to_string(), known: format!("{}, {}, {}", known.join(", "), engine::ENGINE, engine::BUNDLED) }
    })
}

/// One `--reference` entry: `NAME`, `NAME:f64`, `trace:CASE` (a recorded trace), or
/// `engine` (the bundled engine, clean, as a reference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefSpec {
    /// The reference's name (`transformers`); for a trace, the name of the reference it was
    /// recorded from.
    pub name: String,
    pub module: &'static str,
    /// "float32" or "float64"
    pub dtype: &'static str,
    /// `trace:CASE`: the trace to replay instead of running Python (`trace.rs`).
    pub trace: Option<String>,
}

impl RefSpec {
    /// How the reference is named in reports: `transformers`, `transformers:f64`,
    /// `trace:CASE`.
    pub fn label(&self) -> String {
        if let Some(t) = &self.trace {
            format!("trace:{t}")
        } else if self.dtype == "float64" {
            format!("{}:f64", self.name)
        } else {
            self.name.clone()
        }
    }

    pub fn is_oracle(&self) -> bool {
        self.dtype == "float64"
    }

    /// The bundled engine as a reference (`engine`, `engine:f64`): no Python module.
    pub fn is_engine(&self) -> bool {
        self.trace.is_none() && (self.name == engine::ENGINE || self.name == engine::BUNDLED)
    }
}
/// An optional part of the reference protocol: `references/protocol.py`'s `CAPABILITIES`,
/// which says what each requires. A reference declares the ones it implements; the harness
/// reads the declaration and never asks Python whether a method exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// `load(..., lora=DIR)`, `lora_inventory()`, `lora_config()`.
    Lora,
    /// `generation_config(params, max_new_tokens)`.
    GenerationConfig,
    /// `sample_distribution(logits, prev, params)`; `describe()["sampler_order"]`,
    /// `["sampler_rep_window"]`.
    Sampler,
    /// `render_chat(messages, add_generation_prompt)`.
    ChatRender,
    /// The module's `load_tokenizer(model_path)` (tokcheck).
    Tokenizer,
    /// For a GGUF file, `load_tokenizer` is the format's own tokenizer: tokcheck's witness.
    GgufTokenizer,
    /// `references/bench.py` times it (`lockstep bench`).
    Bench,
    /// The module's `open(path)`: a reference dequantizer (quant-check).
    Dequantize,
}

impl Capability {
    /// The name in `references/protocol.py`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Lora => "lora",
            Capability::GenerationConfig => "generation_config",
            Capability::Sampler => "sampler",
            Capability::ChatRender => "chat_render",
            Capability::Tokenizer => "tokenizer",
            Capability::GgufTokenizer => "gguf_tokenizer",
            Capability::Bench => "bench",
            Capability::Dequantize => "dequantize",
        }
    }
}

/// What a module of `references/` declares about itself before anything loads: its
/// `PROTOCOL` (`protocol.declare`), checked against the module by `protocol.declaration`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Declaration {
    pub name: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub main_package: Option<String>,
    #[serde(default)]
    pub sampler_order: Vec<String>,
    #[serde(default)]
    pub sampler_rep_window: Option<usize>,
}

impl Declaration {
    pub fn declares(&self, c: Capability) -> bool {
        self.capabilities.iter().any(|n| n == c.name())
    }
}

/// What a reference says about itself (`describe()`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Description {
    pub name: String,
    pub versions: std::collections::BTreeMap<String, String>,
    pub dtype: String,
    pub sites: Vec<String>,
    pub notes: Vec<String>,
    /// Named layout transforms the reference applied to reach the HF layout.
    pub transforms: Vec<String>,
    /// True when the reference quantizes activations for quantized matmuls (llama.cpp on a
    /// quantized file); false when it computes in its float dtype.
    #[serde(default)]
    pub quantized_activations: bool,
    /// The capabilities it declares (`references/protocol.py`); none for a trace, which
    /// has no live object to call.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The key of `versions` it is reported by (`transformers`); `None` for a trace.
    #[serde(default)]
    pub main_package: Option<String>,
    /// With [`Capability::Sampler`]: its library's whole filter chain, the five stages of
    /// `lockstep_engine::sample::Stage` in the order it applies them.
    #[serde(default)]
    pub sampler_order: Vec<String>,
    /// With [`Capability::Sampler`]: how many previous tokens its repetition penalty looks
    /// at (`None`: all of them).
    #[serde(default)]
    pub sampler_rep_window: Option<usize>,
    /// The positions it can hold, for a reference with a fixed context (llama.cpp's `n_ctx`):
    /// a run that needs more stops before step 0. `None`: its cache grows.
    #[serde(default)]
    pub context: Option<usize>,
}

impl Description {
    pub fn declares(&self, c: Capability) -> bool {
        self.capabilities.iter().any(|n| n == c.name())
    }
}

/// A loaded reference: a live Python object implementing `references/protocol.py`, or a
/// recorded trace replayed without Python. Both answer the same protocol, so the driver,
/// the comparators and the reports do not know which one they talk to.
pub struct Reference {
    /// Label in reports (`transformers`, `transformers:f64`, `trace:CASE`).
    pub name: String,
    pub spec: RefSpec,
    pub backend: Box<dyn Backend>,
    pub description: Description,
}

impl Reference {
    /// The main package's version (e.g. transformers 5.23.0): `versions[main_package]`.
    pub fn version(&self) -> String {
        let v = &self.description.versions;
        let keys = match &self.description.main_package {
            Some(p) => vec![p.as_str()],
            // A trace: its file keeps no main package; the package named like the reference,
            // else llama.cpp's binding (the packages these references declare).
            None => vec![self.spec.name.as_str(), "llama_cpp_python", "llama-cpp-python"],
        };
        keys.iter().find_map(|k| v.get(*k)).cloned().unwrap_or_else(|| "?".into())
    }

    /// The Python object of a live reference (`None` for a trace), for the optional
    /// methods other modules call (generation config, sampler parity, chat rendering).
    pub fn object(&self) -> Option<&Py<PyAny>> {
        self.backend.object()
    }

    /// Whether the reference can be called for capability `c`: a live reference that
    /// declares it (`describe()["capabilities"]`, checked by `protocol.check` at load). A
    /// trace has no live object, so none.
    pub fn can(&self, c: Capability) -> bool {
        self.object().is_some() && self.description.declares(c)
    }

    pub fn reset(&self) -> Result<(), HarnessError> {
        self.backend.reset()
    }

    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, HarnessError> {
        self.backend.encode_prompt(text)
    }

    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>, HarnessError> {
        self.backend.encode_chat(user)
    }

    pub fn generate_greedy(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError> {
        self.backend.generate_greedy(ids, n, stop)
    }

    /// Feeds `ids`; a live reference's `{site: ndarray}` stays in Python until read.
    pub fn step(&self, ids: &[u32]) -> Result<StepOutput, HarnessError> {
        self.backend.step(ids, &self.name)
    }
}

/// Where a reference's answers come from: a live Python object (`python.rs`), a recorded
/// trace (`golden::trace::Replay`), or a live reference whose answers are recorded as they
/// pass (`golden::record::Recorder`). Each answers the protocol's required calls; what a
/// reference can do beyond them is in its declared capabilities ([`Description`]).
pub trait Backend {
    fn reset(&self) -> Result<(), HarnessError>;
    /// Token ids of a plain prompt, as the reference's tokenizer makes them.
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, HarnessError>;
    /// Token ids of one user message through the reference's chat template.
    fn encode_chat(&self, user: &str) -> Result<Vec<u32>, HarnessError>;
    /// Feeds `ids` after everything fed since `reset`; `label` names the reference in messages.
    fn step(&self, ids: &[u32], label: &str) -> Result<StepOutput, HarnessError>;
    /// The reference's own greedy loop.
    fn generate_greedy(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError>;
    /// The live Python object, for the optional methods of its declared capabilities
    /// (`None`: no live object, e.g. a trace).
    fn object(&self) -> Option<&Py<PyAny>> {
        None
    }
    /// For the owners of a concrete backend (a trace's replay, a recorder) to find it again.
    fn as_any(&self) -> &dyn Any;
}
