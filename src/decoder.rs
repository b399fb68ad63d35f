//! The one seam everything outside the engine drives: [`Decoder`]. A family implements it
//! (today [`crate::models::llama::Llama`]); the harness, bisect, the LoRA checks and the
//! reports see only this trait, the [`ModelInfo`] it describes itself with and the
//! [`SiteGraph`] it declares.
//!
//! # The contract for an engine under test
//!
//! Any engine — yours — takes the bundled one's place by implementing [`Decoder`] and being
//! wrapped with [`crate::LoadedModel::plugin`].
//!
//! **Must provide**
//! - [`Decoder::forward`]: run the tokens of one step at positions `cache.offset()..` with
//!   the engine's own cache, and return the logits: of every position fed `(seq, vocab)`, or
//!   of the last one only `(1, vocab)` (then the earlier positions of a prefill are not
//!   compared). An engine that keeps its cache inside itself treats [`KvCache`] as the
//!   position counter: call [`KvCache::push_tokens`] with the ids fed, and start over when
//!   [`Decoder::new_cache`] is called.
//! - [`Decoder::info`]: family name and [`Config`] (layers, heads, vocabulary, BOS/EOS; read
//!   it from the model with [`crate::loader::model_config`]), dtype, how it holds weights.
//!   [`ModelInfo::new`] fills the rest with "nothing declared".
//! - token ids: the harness tokenizes with the model file's tokenizer
//!   ([`crate::loader::model_tokenizer`]) unless the engine brings its own
//!   ([`Decoder::tokenize`]).
//!
//! **May provide**
//! - any subset of the canonical sites ([`crate::sites`]), offered to the [`Capture`] in
//!   forward order and declared in [`Decoder::site_graph`] (from
//!   [`SiteGraph::logits_only`] to the family's whole graph, or [`SiteGraph::restrict`]).
//!   The harness compares exactly what is declared, lists what it could not compare, and
//!   bisect localizes as far as the taps allow: logits only, to the step; every layer's
//!   `layers.N.out`, to the layer; every site, to the site ([`SiteGraph::localizes_to`]).
//! - cache contents (`layers.N.cache_k` / `cache_v`): the dropped-context and stale-cache
//!   diagnoses need them.
//! - [`Decoder::isolate_layer`] and [`Decoder::project`] ([`Capabilities`]): bisect's
//!   isolation and its LoRA evidence.
//! - fault injection and a LoRA adapter: whatever the engine's own loader does with
//!   [`crate::LoadOptions`] (`faults`, `lora`), reported in [`ModelInfo::faults`].

use candle_core::{DType, Tensor};

use crate::cache::KvCache;
use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::layout::QkLayout;
use crate::plan::{self, LayerPlan};
use crate::sites::{Site, SiteGraph};
use crate::taps::Capture;

/// What a model says about itself: enough for a report header, the tolerance choice and
/// bisect's evidence, without reaching into its fields.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The engine's name in reports (`lockstep-engine` for the bundled one).
    pub engine: String,
    /// The family (`llama`), or the model type a plug-in runs (`qwen3`).
    pub family: std::borrow::Cow<'static, str>,
    /// The validated hyper-parameters.
    pub config: Config,
    /// The compute dtype (f32, or f64 for an oracle run).
    pub dtype: DType,
    /// The Q/K row layout of its weights (the transform that maps its q/k/cache captures
    /// to the Hugging Face layout).
    pub qk_layout: QkLayout,
    /// Each layer's plan, one per layer: its attention span, its RoPE, how its cache keeps
    /// positions ([`crate::plan`]). Whatever depends on one of these reads the layer's entry.
    pub plan: Vec<LayerPlan>,
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

impl ModelInfo {
    /// The description of an engine (named `plug-in` until you set [`ModelInfo::engine`])
    /// that declares nothing beyond its family and config: f32,
    /// Hugging Face Q/K layout (its captures need no transform), every layer global with the
    /// config's RoPE and an append-only cache ([`plan::uniform`]), float weights, no faults, no
    /// capabilities. Set the fields that differ.
    pub fn new(family: impl Into<std::borrow::Cow<'static, str>>, config: Config) -> Self {
        let plan = plan::uniform(&config);
        ModelInfo {
            engine: "plug-in".into(),
            family: family.into(),
            config,
            dtype: DType::F32,
            qk_layout: QkLayout::HalfSplit,
            plan,
            matrix_types: vec![],
            quant_type: None,
            quantized_kernels: false,
            faults: vec![],
            capabilities: Capabilities::default(),
        }
    }

    /// The plan of layer `layer` (the config's global plan for a layer the plan does not
    /// list: an engine that filled in fewer entries than it has layers).
    pub fn layer_plan(&self, layer: usize) -> LayerPlan {
        self.plan.get(layer).cloned().unwrap_or_else(|| LayerPlan::global(&self.config))
    }
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
    /// `capture` and returns the logits of every position fed, `(seq, vocab)`, or of the
    /// last position only, `(1, vocab)`.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache, capture: Option<&mut Capture>) -> Result<Tensor>;

    /// The engine's own tokenization of a prompt (`chat`: one user message through its chat
    /// template with the generation prompt), or `None` to let the harness use the model
    /// file's tokenizer. The harness compares the ids with every reference's before step 0.
    fn tokenize(&self, _text: &str, _chat: bool) -> Option<Result<Vec<u32>>> {
        None
    }

    /// Runs layer `layer` alone on its input `x (seq, hidden)` at positions `start..` (the
    /// positions fed before this step: explicit, since a windowed layer's cache holds fewer),
    /// with the layer's cache before the step (`(kv_heads, cached, head_dim)` each, in this
    /// model's Q/K layout; `None`: empty), offering every site of the layer to `capture`;
    /// returns the layer's output.
    fn isolate_layer(&self, layer: usize, _start: usize, _x: &Tensor, _kv: Option<(Tensor, Tensor)>, _capture: &mut Capture) -> Result<Tensor> {
        Err(EngineError::Input(format!("this engine cannot run layer {layer} in isolation")))
    }

    /// `x @ W^T` (plus the bias, where the projection has one) for one projection of a layer, named by its checkpoint module (`q_proj`,
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
