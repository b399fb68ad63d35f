//! The one seam everything outside the engine drives: [`Decoder`]. A family implements it
//! (today [`crate::models::llama::Llama`]); the harness, bisect, the LoRA checks and the
//! reports see only this trait, the [`ModelInfo`] it describes itself with and the
//! [`SiteGraph`] it declares. A user's engine can take the bundled one's place by
//! implementing it.

use candle_core::{DType, Tensor};

use crate::cache::{CacheKind, KvCache};
use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::layout::QkLayout;
use crate::sites::{Site, SiteGraph};
use crate::taps::Capture;

/// What a model says about itself: enough for a report header, the tolerance choice and
/// bisect's evidence, without reaching into its fields.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The family (`llama`).
    pub family: &'static str,
    /// The validated hyper-parameters.
    pub config: Config,
    /// The compute dtype (f32, or f64 for an oracle run).
    pub dtype: DType,
    /// The Q/K row layout of its weights (the transform that maps its q/k/cache captures
    /// to the Hugging Face layout).
    pub qk_layout: QkLayout,
    /// How its KV cache keeps positions.
    pub cache: CacheKind,
    /// The distinct storage types of its matrices (`["Q4_1", "Q8_0"]`).
    pub matrix_types: Vec<String>,
    /// The file's quantization (its most common block type), `None` for float weights.
    pub quant_type: Option<String>,
    /// True when some matrix multiplies with quantized kernels (activations quantized).
    pub quantized_kernels: bool,
    /// The injected faults, `name[:layer]`.
    pub faults: Vec<String>,
    /// What it can do beyond forward.
    pub capabilities: Capabilities,
}

/// What a decoder can do beyond `forward`; the harness asks, never assumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// [`Decoder::isolate_layer`] runs one layer on given inputs.
    pub isolate_layer: bool,
    /// [`Decoder::project`] runs one projection of a layer (bisect's LoRA evidence).
    pub project: bool,
}

/// A decoder-only language model with an explicit cache and observation taps.
pub trait Decoder: Send + Sync {
    /// Family, config, weights, layout, cache kind, faults, capabilities.
    fn info(&self) -> &ModelInfo;

    /// Every site this model captures, with kinds and dataflow.
    fn site_graph(&self) -> &SiteGraph;

    /// A fresh, empty cache of the family's kind.
    fn new_cache(&self) -> KvCache;

    /// Runs `tokens` at positions `cache.offset()..`, updates `cache`, offers every site to
    /// `capture` and returns the logits of every position fed, `(seq, vocab)`.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache, capture: Option<&mut Capture>) -> Result<Tensor>;

    /// Runs layer `layer` alone on its input `x (seq, hidden)` and the layer's cache before the
    /// step (`(kv_heads, cached, head_dim)` each, in this model's Q/K layout; `None`: empty),
    /// offering every site of the layer to `capture`; returns the layer's output.
    fn isolate_layer(&self, layer: usize, _x: &Tensor, _kv: Option<(Tensor, Tensor)>, _capture: &mut Capture) -> Result<Tensor> {
        Err(EngineError::Input(format!("this engine cannot run layer {layer} in isolation")))
    }

    /// `x @ W^T` for one projection of a layer, named by its checkpoint module (`q_proj`,
    /// `down_proj`), with whatever adapter is attached; the output in the Hugging Face layout.
    fn project(&self, layer: usize, module: &str, _x: &Tensor) -> Result<Tensor> {
        Err(EngineError::Input(format!("this engine cannot run layers.{layer}.{module} alone")))
    }

    /// A captured tensor of `site` in the Hugging Face layout, and the name of the transform
    /// applied (`None`: already in that layout).
    fn to_canonical(&self, site: &Site, t: &Tensor) -> Result<(Tensor, Option<&'static str>)> {
        let info = self.info();
        if site.qk_rows && info.qk_layout != QkLayout::HalfSplit {
            return Ok((info.qk_layout.to_hf(t, info.config.head_dim)?, info.qk_layout.transform_name()));
        }
        Ok((t.clone(), None))
    }

    /// The inverse of [`Decoder::to_canonical`]: a Hugging Face-layout tensor of `site` in
    /// this model's layout (a reference's cache handed to [`Decoder::isolate_layer`]).
    fn to_model_layout(&self, site: &Site, t: &Tensor) -> Result<Tensor> {
        let info = self.info();
        if site.qk_rows {
            return info.qk_layout.from_hf(t, info.config.head_dim);
        }
        Ok(t.clone())
    }
}
