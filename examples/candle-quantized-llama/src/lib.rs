//! candle-transformers' quantized Llama as an engine under test for lockstep.
//!
//! [`CandleQuantizedLlama`] wraps the published crate's
//! `candle_transformers::models::quantized_llama::ModelWeights` (family `llama`, loaded
//! from a GGUF file with `ModelWeights::from_gguf`) behind [`lockstep_engine::Decoder`], the
//! contract documented in `lockstep_engine::decoder`. The harness then drives it exactly as
//! it drives the bundled engine: [`loaded`] returns a [`LoadedModel`] whose tokenizer is the
//! GGUF file's own.
//!
//! What the wrapped crate exposes, and so what this engine declares:
//! - **Logits of the last position only.** `ModelWeights::forward(x, index_pos)` returns
//!   `(batch, vocab)` for the last position fed; the earlier positions of a prefill are not
//!   compared. The site graph is [`SiteGraph::logits_only`]: no per-layer taps, so bisect
//!   localizes a divergence to the step, not to a layer.
//! - **An internal KV cache.** Each layer keeps its keys and values inside `ModelWeights`;
//!   `forward` with `index_pos == 0` *replaces* them (a new sequence), any other `index_pos`
//!   appends to them. The crate does not check that `index_pos` matches what it holds, so
//!   this wrapper does: [`KvCache`] is only the position counter ([`KvCache::push_tokens`],
//!   [`KvCache::offset`]), and the wrapper remembers the ids its internal cache holds. A
//!   forward whose cache does not continue that sequence (another cache, a trimmed one)
//!   first re-runs the cache's ids from position 0, so the internal state always matches the
//!   cache handed in. [`Decoder::new_cache`] needs no reset call: the next forward starts at
//!   `index_pos == 0`, which resets the internal cache.
//! - Quantized kernels (candle's `QMatMul`, activations quantized per block), f32 compute,
//!   no q/k/cache taps. Internally its Q/K rows stay in the GGUF (interleaved-RoPE) order,
//!   but since no Q/K site is exposed no layout transform applies, so the declared layout is
//!   [`QkLayout::HalfSplit`] (no transform).
//!
//! Threads: candle's CPU kernels use rayon's global pool; left at its default.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};
use lockstep_engine::error::candle_message;
use lockstep_engine::loader::model_config;
use lockstep_engine::{Capture, Decoder, EngineError, KvCache, LoadOptions, LoadedModel, ModelInfo, QkLayout, SiteGraph, WeightsMode};

/// candle-transformers' quantized Llama behind the engine contract.
pub struct CandleQuantizedLlama {
    state: Mutex<State>,
    info: ModelInfo,
    graph: SiteGraph,
    path: PathBuf,
}

/// The wrapped model and the ids its internal KV cache holds, in order.
struct State {
    model: ModelWeights,
    fed: Vec<u32>,
}

/// The engine's name in lockstep's reports.
pub const ENGINE_NAME: &str = "candle-transformers quantized_llama";

/// The loader lockstep calls (`Plugin::new(ENGINE_NAME, plugin_load)`): GGUF weights kept
/// quantized, f32, no adapter of its own (an adapter given to the run is then judged by the
/// effect check: this crate has none, so "adapter has no effect" is the true answer).
pub fn plugin_load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, EngineError> {
    if opts.dtype != DType::F32 || opts.weights == Some(WeightsMode::Dequant) {
        return Err(EngineError::Input(format!(
            "{ENGINE_NAME} computes with quantized GGUF weights in f32 only (no --f64, no --weights dequant)"
        )));
    }
    if !opts.faults.is_empty() {
        return Err(EngineError::Input(format!("{ENGINE_NAME} has no fault injection (--inject)")));
    }
    loaded(path)
}

/// Loads the GGUF file at `path` with `ModelWeights::from_gguf` on the CPU.
///
/// A missing file, a file that is not GGUF, or a GGUF file without the `llama.*` metadata
/// and tensors the crate reads is an [`EngineError`], never a panic.
pub fn load(path: &Path) -> Result<CandleQuantizedLlama, EngineError> {
    if !path.is_file() {
        let message = if path.exists() { "not a file (expected a .gguf file)" } else { "no such file" };
        return Err(EngineError::Io { path: path.into(), message: message.into() });
    }
    let file = File::open(path).map_err(|e| EngineError::Io { path: path.into(), message: e.to_string() })?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| EngineError::Gguf {
        path: path.into(),
        message: format!("candle-transformers cannot read it as GGUF: {}", candle_message(&e)),
    })?;
    // The crate reads `llama.*` metadata whatever the architecture says; refuse the others.
    let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
    if arch.as_deref() != Some("llama") {
        return Err(EngineError::Unsupported {
            path: path.into(),
            message: format!(
                "general.architecture is {}; candle-transformers quantized_llama reads llama models only",
                arch.map_or("missing".to_string(), |a| format!("`{a}`"))
            ),
        });
    }
    // The lockstep reader resolves (and validates) the same metadata the crate reads.
    let config = model_config(path)?;
    let (matrix_types, quant_type) = storage_types(&content, config.num_layers);
    let model = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).map_err(|e| EngineError::Unsupported {
        path: path.into(),
        message: format!("candle-transformers quantized_llama cannot load it: {}", candle_message(&e)),
    })?;
    let mut info = ModelInfo::new("llama", config);
    info.engine = ENGINE_NAME.into();
    info.dtype = DType::F32;
    info.qk_layout = QkLayout::HalfSplit;
    info.quantized_kernels = true;
    info.matrix_types = matrix_types;
    info.quant_type = quant_type;
    let graph = SiteGraph::logits_only(info.config.num_layers);
    Ok(CandleQuantizedLlama { state: Mutex::new(State { model, fed: vec![] }), info, graph, path: path.into() })
}

/// [`load`], wrapped for the harness: the model file's tokenizer, weights mode from what
/// the engine declares (quantized kernels).
pub fn loaded(path: &Path) -> Result<LoadedModel, EngineError> {
    LoadedModel::plugin(Box::new(load(path)?), path)
}

/// The storage types of the matrices `quantized_llama` multiplies with (every layer's
/// attention and MLP projections, and the output head: `output.weight`, else the token
/// embedding it falls back to when tied): the distinct types sorted, and the most common
/// block-quantized one (`None` when all are float).
fn storage_types(content: &gguf_file::Content, num_layers: usize) -> (Vec<String>, Option<String>) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = |name: &str| {
        if let Some(t) = content.tensor_infos.get(name) {
            *counts.entry(format!("{:?}", t.ggml_dtype)).or_insert(0) += 1;
        }
    };
    for i in 0..num_layers {
        for m in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
            count(&format!("blk.{i}.{m}.weight"));
        }
    }
    if content.tensor_infos.contains_key("output.weight") {
        count("output.weight");
    } else {
        count("token_embd.weight");
    }
    let quant = counts
        .iter()
        .filter(|(t, _)| !matches!(t.as_str(), "F32" | "F16" | "BF16"))
        .max_by_key(|(_, n)| **n)
        .map(|(t, _)| t.clone());
    (counts.into_keys().collect(), quant)
}

impl CandleQuantizedLlama {
    /// The GGUF file this engine was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn run(state: &mut State, tokens: &[u32], index_pos: usize) -> Result<Tensor, EngineError> {
        // Until this forward succeeds the internal cache is in an unknown state: an empty
        // `fed` makes the next forward past position 0 rebuild it.
        let mut fed = std::mem::take(&mut state.fed);
        let x = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let logits = state.model.forward(&x, index_pos)?;
        if index_pos == 0 {
            fed.clear();
        }
        fed.extend_from_slice(tokens);
        state.fed = fed;
        Ok(logits)
    }
}

impl Decoder for CandleQuantizedLlama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn site_graph(&self) -> &SiteGraph {
        &self.graph
    }

    /// A position counter: the internal cache is reset by the next forward, which runs at
    /// `index_pos == 0`.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.info.config.num_layers)
    }

    fn forward(&self, tokens: &[u32], cache: &mut KvCache, capture: Option<&mut Capture>) -> lockstep_engine::Result<Tensor> {
        if tokens.is_empty() {
            return Err(EngineError::Input("forward needs at least one token".into()));
        }
        let offset = cache.offset();
        // Its RoPE tables hold MAX_SEQ_LEN positions; past them its `narrow` fails anyway,
        // but this names the limit.
        if offset + tokens.len() > MAX_SEQ_LEN {
            return Err(EngineError::Input(format!(
                "candle-transformers quantized_llama holds at most {MAX_SEQ_LEN} positions; this step would reach {}",
                offset + tokens.len()
            )));
        }
        let mut state = self.state.lock().map_err(|_| EngineError::Input("the model's lock is poisoned (an earlier forward panicked)".into()))?;
        // The internal cache must hold exactly the cache's ids; otherwise rebuild it.
        if offset > 0 && state.fed.as_slice() != cache.tokens() {
            let prefix = cache.tokens().to_vec();
            Self::run(&mut state, &prefix, 0)?;
        }
        let logits = Self::run(&mut state, tokens, offset)?;
        cache.push_tokens(tokens);
        let vocab = self.info.config.vocab_size;
        let logits = logits.to_dtype(DType::F32)?.reshape((1, vocab))?;
        if let Some(c) = capture {
            c.entries.push(("logits".into(), logits.clone()));
        }
        Ok(logits)
    }
}
