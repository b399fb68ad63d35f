//! What a lockstep run is asked to do ([`RunOptions`]), and the engine it loads from them.

use std::path::PathBuf;

use candle_core::DType;
use lockstep_engine::{LoadOptions, LoadedModel};

use crate::compare::tolerance::Precision;
use crate::error::HarnessError;
use crate::plugin::EngineSpec;
use crate::reference::RefSpec;

#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's special tokens (BOS if it adds one).
    Text(String),
    /// One user message through the chat template, with the generation prompt.
    Chat(String),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub model: PathBuf,
    pub references: Vec<RefSpec>,
    pub prompt: Prompt,
    pub steps: usize,
    pub precision: Precision,
    /// How the engine holds GGUF weights (`None`: quantized for GGUF in f32, else dense).
    pub weights: Option<lockstep_engine::WeightsMode>,
    /// Faults injected into the engine (`--inject`).
    pub faults: lockstep_engine::Faults,
    /// Bisect mode: stop at the first failing step and keep the reference's tensors of the
    /// suspect layer at that step (`crate::bisect`); no free-running generate check.
    pub bisect: bool,
    /// The engine's sampler (`--sampler`); `None`: greedy, without sampler parity.
    pub sampler: Option<lockstep_engine::SamplerConfig>,
    /// Any difference in the generation-config table stops the run before step 0.
    pub strict_config: bool,
    /// A LoRA adapter on every side (`--lora DIR`); the mode is the engine's.
    pub lora: Option<lockstep_engine::LoraOptions>,
    /// The engine under test (the bundled one unless `--engine` or the library says otherwise).
    pub engine: EngineSpec,
}

/// Loads the engine the options name (model, dtype, weights mode, faults, adapter).
pub fn load_engine(opts: &RunOptions) -> Result<LoadedModel, HarnessError> {
    let dtype = match opts.precision {
        Precision::F32 => DType::F32,
        Precision::F64 => DType::F64,
    };
    crate::plugin::set_run_weights(opts.weights);
    opts.engine.load(&opts.model, &LoadOptions { dtype, weights: opts.weights, faults: opts.faults.clone(), lora: opts.lora.clone() })
}

/// Encodes the prompt on the engine side.
pub fn engine_prompt_ids(m: &LoadedModel, prompt: &Prompt) -> Result<Vec<u32>, HarnessError> {
    Ok(match prompt {
        Prompt::Text(t) => m.encode_prompt(t, false)?,
        Prompt::Chat(t) => m.encode_prompt(t, true)?,
    })
}


/// `--sampler`'s value parsed, as a usage error when malformed.
pub fn parse_sampler(spec: Option<&str>) -> Result<Option<lockstep_engine::SamplerConfig>, HarnessError> {
    spec.map(|s| {
        lockstep_engine::SamplerConfig::parse(s).map_err(|e| HarnessError::Usage(e.to_string().trim_start_matches("input: ").to_string()))
    })
    .transpose()
}
