//! The fault catalog: named reproductions of real bug classes, injected as options of the
//! engine's own code paths (never a second copy of the model code), so that the harness
//! can prove it catches and names each of them (`--inject NAME[:LAYER]`, `lockstep faults`).

use std::fmt;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    DropContext,
    RefeedHistory,
    RopeConvention,
    RopeTheta,
    /// The config's RoPE scaling not applied (issue 34).
    RopeScalingIgnored,
    RmsEps,
    GqaMapping,
    CausalMask,
    StaleCache,
    MissingBos,
    RawPrompt,
    Q41Min,
    LoraNotAttached,
    LoraScale,
    SamplerTemperature,
    QkvBiasDropped,
    TiedHead,
    // Mixtral-style sparse MoE (crate::models::mixtral).
    RouterRenormSkipped,
    ExpertOffByOne,
    // SentencePiece tokenizers (issue 17).
    SpmSpacePrefix,
    // Sliding-window attention (issue 37).
    SlidingWindowIgnored,
    WindowOffByOne,
    // Gemma 3 (issue 38).
    NormOffsetDoubled,
    EmbedScaleMissing,
    GeluAsSilu,
    LocalRopeBaseGlobal,
}

/// What a divergence is diagnosed as: the one vocabulary that bisect's diagnosis table
/// (in the harness) produces and that the catalog below expects for each fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Diagnosis {
    /// Decode steps run without the prompt's cache.
    ContextDropped,
    /// The whole history is fed again at each step instead of using the cache.
    HistoryRefed,
    /// One layer's cache is not updated.
    StaleCache,
    /// The cache holds another number of positions, for no named reason.
    CacheLength,
    /// The engine's cache is correct for its kind (a rotating window) and the reference keeps
    /// another number of positions: the cache kinds differ, nothing is dropped.
    CacheKind,
    /// RoPE pairs rotated with the other convention.
    RopeConvention,
    /// RoPE with another base (theta).
    RopeBase,
    /// RoPE without the config's scaling (or with another type's).
    RopeScaling,
    /// RoPE differs (convention, base or positions), unnamed.
    Rope,
    /// A norm's epsilon differs.
    NormEpsilon,
    /// A norm differs, unnamed.
    Norm,
    /// Query heads read the wrong KV heads.
    GqaMapping,
    /// The prefill is not causal.
    AttentionMask,
    /// The attention differs, unnamed.
    Attention,
    /// The MLP activation differs.
    Activation,
    /// A quantized matrix dequantizes differently.
    Dequantization,
    /// A matrix differs (loading or layout).
    Weights,
    /// Q/K projections differ while V agrees: the Q/K row layout.
    QkLayout,
    /// The token embeddings differ.
    Embedding,
    /// The prompt lacks its BOS token.
    MissingBos,
    /// The chat template was not applied.
    TemplateSkipped,
    /// The prompt's token ids differ otherwise.
    TokenMismatch,
    /// The LoRA adapter is not attached.
    AdapterNotAttached,
    /// The LoRA adapter is attached with another scale.
    AdapterScale,
    /// The adapted model gives the base model's logits: the adapter has no effect.
    AdapterNoEffect,
    /// The engine taps its logits only: the divergence is placed at its step, no further.
    LogitsOnly,
    /// The sampler differs.
    SamplerMismatch,
    /// A projection's output is off by the same vector at every position: its bias is
    /// missing or differs.
    Bias,
    /// The logits differ while the final norm passes: the output head (tied to the embedding
    /// or its own matrix) differs.
    OutputHead,
    /// MoE: the chosen experts' weights do not sum to 1 (the top-k renormalisation skipped).
    RouterRenorm,
    /// MoE: the experts applied are not the ones the (agreeing) router logits choose.
    ExpertIndex,
    /// MoE: another expert choice, decided by router logits that differ (the margin named).
    ExpertChoice,
    /// MoE: the expert weights differ, unnamed.
    Routing,
    /// The prompt's ids spell the reference's text without SentencePiece's `▁` space prefix.
    SpacePrefix,
    /// A sliding-window layer attends over another span than its window (the window
    /// ignored, one position too wide or too narrow), named by the span that reproduces it.
    SlidingWindow,
    /// A norm multiplies by its weight plus or minus one: Gemma's `1 + w` applied to a weight
    /// that holds it already (llama.cpp's converter stores `w + 1`), or not applied.
    NormOffset,
    /// The embedding is scaled by another factor than the model's (Gemma's `sqrt(hidden)`
    /// missing, or applied to a model without one).
    EmbedScale,
    /// No rule names it.
    Unclassified,
}

impl Diagnosis {
    /// The stable name (`context-dropped`), as in reports and the catalog.
    pub fn name(&self) -> &'static str {
        match self {
            Diagnosis::ContextDropped => "context-dropped",
            Diagnosis::HistoryRefed => "history-refed",
            Diagnosis::StaleCache => "stale-cache",
            Diagnosis::CacheLength => "cache-length",
            Diagnosis::CacheKind => "cache-kind",
            Diagnosis::RopeConvention => "rope-convention",
            Diagnosis::RopeBase => "rope-base",
            Diagnosis::RopeScaling => "rope-scaling",
            Diagnosis::Rope => "rope",
            Diagnosis::NormEpsilon => "norm-epsilon",
            Diagnosis::Norm => "norm",
            Diagnosis::GqaMapping => "gqa-mapping",
            Diagnosis::AttentionMask => "attention-mask",
            Diagnosis::Attention => "attention",
            Diagnosis::Activation => "activation",
            Diagnosis::Dequantization => "dequantization",
            Diagnosis::Weights => "weights",
            Diagnosis::QkLayout => "qk-layout",
            Diagnosis::Embedding => "embedding",
            Diagnosis::MissingBos => "missing-bos",
            Diagnosis::TemplateSkipped => "template-skipped",
            Diagnosis::TokenMismatch => "token-mismatch",
            Diagnosis::AdapterNotAttached => "adapter-not-attached",
            Diagnosis::AdapterScale => "adapter-scale",
            Diagnosis::AdapterNoEffect => "adapter-no-effect",
            Diagnosis::LogitsOnly => "logits-only",
            Diagnosis::SamplerMismatch => "sampler-mismatch",
            Diagnosis::Bias => "bias",
            Diagnosis::OutputHead => "output-head",
            Diagnosis::RouterRenorm => "router-renorm",
            Diagnosis::ExpertIndex => "expert-index",
            Diagnosis::ExpertChoice => "expert-choice",
            Diagnosis::Routing => "routing",
            Diagnosis::SpacePrefix => "space-prefix",
            Diagnosis::SlidingWindow => "sliding-window",
            Diagnosis::NormOffset => "norm-offset",
            Diagnosis::EmbedScale => "embedding-scale",
            Diagnosis::Unclassified => "unclassified",
        }
    }
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One catalog entry: what the fault reproduces and where it must be localized.
#[derive(Debug, Clone, Copy)]
pub struct FaultInfo {
    pub fault: Fault,
    pub name: &'static str,
    /// The real bug it reproduces.
    pub bug: &'static str,
    /// Where the engine's code is changed.
    pub code_path: &'static str,
    /// Where bisect must find it: step, layer (None: outside the layers or every layer
    /// from the first), site leaf, diagnosis name.
    pub step: usize,
    pub layer: Layer,
    pub site: &'static str,
    pub diagnosis: Diagnosis,
    /// What the fault needs to show at all.
    pub needs: &'static str,
}

/// Where a fault enters, in layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Not in a layer (tokens, embed).
    None,
    /// The first layer (every layer is affected; layer 0 is where it enters).
    First,
    /// The injected layer (`NAME:LAYER`, default [`DEFAULT_FAULT_LAYER`]).
    Injected,
    /// The first sliding-window layer (every window layer is affected).
    FirstWindow,
    /// The first global-attention layer (every global layer is affected; layer 0 in a model
    /// without windows).
    FirstGlobal,
}

/// The layer of the one-layer faults when none is given.
pub const DEFAULT_FAULT_LAYER: usize = 1;

pub const CATALOG: &[FaultInfo] = &[
    FaultInfo {
        fault: Fault::DropContext,
        name: "drop-context",
        bug: "the generation loop drops the KV cache after the prompt: every decode step sees only itself",
        code_path: "Llama::forward: a decode step (cache offset > 0) starts from an empty cache",
        step: 1,
        layer: Layer::First,
        site: "cache_k",
        diagnosis: Diagnosis::ContextDropped,
        needs: "2 steps",
    },
    FaultInfo {
        fault: Fault::RefeedHistory,
        name: "refeed-history",
        bug: "no cache: each step re-feeds the whole sequence (right numbers, O(n^2) cost)",
        code_path: "Llama::forward: a decode step resets the cache and runs prompt + history + token",
        step: 1,
        layer: Layer::None,
        site: "embed",
        diagnosis: Diagnosis::HistoryRefed,
        needs: "2 steps",
    },
    FaultInfo {
        fault: Fault::RopeConvention,
        name: "rope-convention",
        bug: "Q/K rotated with the other RoPE convention (interleaved vs half-split) than the weights' layout",
        code_path: "Llama::block: rope() with the other QkLayout",
        step: 0,
        layer: Layer::First,
        site: "q_rope",
        diagnosis: Diagnosis::RopeConvention,
        needs: "a prompt of 2+ tokens",
    },
    FaultInfo {
        fault: Fault::RopeTheta,
        name: "rope-theta",
        bug: "RoPE base (theta) not read from the config: the 10000 default used instead",
        code_path: "rope_tables: theta = 10000 (x10 when the config already says 10000)",
        step: 0,
        layer: Layer::First,
        site: "q_rope",
        diagnosis: Diagnosis::RopeBase,
        needs: "a prompt of 2+ tokens",
    },
    FaultInfo {
        fault: Fault::RopeScalingIgnored,
        name: "rope-scaling-ignored",
        bug: "the config's RoPE scaling (llama3, yarn, linear, dynamic, longrope) not applied: the unscaled frequencies used, right at position 0 and wrong more and more after",
        code_path: "Llama::rope_for: the plan's scaling replaced by none",
        step: 0,
        layer: Layer::First,
        site: "q_rope",
        diagnosis: Diagnosis::RopeScaling,
        needs: "a model whose RoPE is scaled, and a run past where the scaling acts",
    },
    FaultInfo {
        fault: Fault::RmsEps,
        name: "rms-eps",
        bug: "RMSNorm epsilon wrong (1e-2 instead of the config's)",
        code_path: "rms_norm: eps = 1e-2",
        step: 0,
        layer: Layer::First,
        site: "attn_norm",
        diagnosis: Diagnosis::NormEpsilon,
        needs: "",
    },
    FaultInfo {
        fault: Fault::GqaMapping,
        name: "gqa-mapping",
        bug: "grouped-query attention maps query head h to KV head h % n_kv instead of h / n_rep",
        code_path: "repeat_kv: KV heads tiled instead of repeated",
        step: 0,
        layer: Layer::First,
        site: "attn",
        diagnosis: Diagnosis::GqaMapping,
        needs: "a model with num_kv_heads < num_heads",
    },
    FaultInfo {
        fault: Fault::CausalMask,
        name: "causal-mask",
        bug: "no causal mask in the prefill: prompt positions attend to later ones",
        code_path: "Llama::mask_for: a global layer's prefill runs without its mask",
        step: 0,
        layer: Layer::FirstGlobal,
        site: "attn",
        diagnosis: Diagnosis::AttentionMask,
        needs: "a prompt of 2+ tokens",
    },
    FaultInfo {
        fault: Fault::StaleCache,
        name: "stale-cache",
        bug: "one layer's cache is not updated after the prompt",
        code_path: "KvCache::update_and_fetch: the injected layer keeps its old cache on decode steps",
        step: 1,
        layer: Layer::Injected,
        site: "cache_k",
        diagnosis: Diagnosis::StaleCache,
        needs: "2 steps",
    },
    FaultInfo {
        fault: Fault::MissingBos,
        name: "missing-bos",
        bug: "the prompt loses its BOS token (a loop that strips or never adds it)",
        code_path: "LoadedModel::encode_prompt: a leading BOS id is dropped",
        step: 0,
        layer: Layer::None,
        site: "tokens",
        diagnosis: Diagnosis::MissingBos,
        needs: "a prompt that starts with the BOS id (the chat prompts of the fixtures and SmolLM2 do)",
    },
    FaultInfo {
        fault: Fault::RawPrompt,
        name: "raw-prompt",
        bug: "the chat template is skipped: the raw user text is fed",
        code_path: "LoadedModel::encode_prompt: a chat prompt is encoded as plain text",
        step: 0,
        layer: Layer::None,
        site: "tokens",
        diagnosis: Diagnosis::TemplateSkipped,
        needs: "--chat",
    },
    FaultInfo {
        fault: Fault::Q41Min,
        name: "q4_1-min",
        bug: "Q4_1 dequantization without the block minimum (d*q instead of d*q + m)",
        code_path: "GgufFile::qtensor: each Q4_1 block's minimum is zeroed as the file is read (both weight modes)",
        step: 0,
        layer: Layer::First,
        site: "q",
        diagnosis: Diagnosis::Dequantization,
        needs: "a Q4_1 file",
    },
    FaultInfo {
        fault: Fault::LoraNotAttached,
        name: "lora-not-attached",
        bug: "the LoRA adapter is loaded but never attached (a stub adapter manager): the base model runs",
        code_path: "LoraAdapter::attach: the projections are left as they are",
        step: 0,
        layer: Layer::First,
        site: "q",
        diagnosis: Diagnosis::AdapterNotAttached,
        needs: "--lora with an adapter on layer 0's q_proj (run: the adapter-effect check says \"adapter has no effect\")",
    },
    FaultInfo {
        fault: Fault::LoraScale,
        name: "lora-scale",
        bug: "the LoRA scale applied twice (s^2 instead of s = alpha/r)",
        code_path: "LoraAdapter::attach: the delta is multiplied by s*s",
        step: 0,
        layer: Layer::First,
        site: "q",
        diagnosis: Diagnosis::AdapterScale,
        needs: "--lora with an adapter on layer 0's q_proj and a scale other than 1",
    },
    FaultInfo {
        fault: Fault::SamplerTemperature,
        name: "sampler-temperature",
        bug: "the sampler applies the temperature inverted: logits x t instead of / t (t=0.8 samples as if at 1.25)",
        code_path: "sample::process: the temperature stage multiplies by the temperature",
        step: 0,
        layer: Layer::None,
        site: "sampler",
        diagnosis: Diagnosis::SamplerMismatch,
        needs: "--sampler with a temperature other than 0 and 1 (faults --check uses temp=0.8,top_p=0.95,seed=0)",
    },
    FaultInfo {
        fault: Fault::QkvBiasDropped,
        name: "qkv-bias-dropped",
        bug: "the q/k/v biases are loaded but never added (a Llama forward reused for Qwen2)",
        code_path: "Llama::block and Llama::project: the q/k/v projections run without their biases",
        step: 0,
        layer: Layer::First,
        site: "q",
        diagnosis: Diagnosis::Bias,
        needs: "a model with q/k/v biases (Qwen2) and a prompt of 2+ tokens",
    },
    FaultInfo {
        fault: Fault::TiedHead,
        name: "tied-head",
        bug: "the output head tied to the embedding although the checkpoint has its own (tie_word_embeddings taken as true)",
        code_path: "the family loaders: the weights are loaded as if tie_word_embeddings were true, so lm_head is the embedding",
        step: 0,
        layer: Layer::None,
        site: "logits",
        diagnosis: Diagnosis::OutputHead,
        needs: "a model with its own output head (tie_word_embeddings = false: tiny-qwen2, Qwen2.5)",
    },
    // Mixtral-style sparse MoE.
    FaultInfo {
        fault: Fault::RouterRenormSkipped,
        name: "router-renorm-skipped",
        bug: "MoE top-k weights not renormalised: the chosen experts' softmax probabilities (summing to < 1) weight their outputs",
        code_path: "moe::sparse_moe: route() without the top-k renormalisation",
        step: 0,
        layer: Layer::First,
        site: "expert_weights",
        diagnosis: Diagnosis::RouterRenorm,
        needs: "a mixture-of-experts model with top-k < n_experts",
    },
    FaultInfo {
        fault: Fault::ExpertOffByOne,
        name: "expert-off-by-one",
        bug: "MoE expert index off by one: each position runs the expert after the one its router chose",
        code_path: "moe::sparse_moe: the chosen expert e dispatched to (e + 1) % n_experts",
        step: 0,
        layer: Layer::First,
        site: "expert_weights",
        diagnosis: Diagnosis::ExpertIndex,
        needs: "a mixture-of-experts model",
    },
    // SentencePiece tokenizers (issue 17).
    FaultInfo {
        fault: Fault::SpmSpacePrefix,
        name: "spm-space-prefix",
        bug: "SentencePiece space handling dropped: no `▁` in front of the text (\"The\" encoded as \"The\", not \"▁The\")",
        code_path: "Tokenizer::from_gguf_spm / from_hf_dir_with: the tokenizer is built without its ▁ prefix (add_space_prefix, Prepend(\"▁\"))",
        step: 0,
        layer: Layer::None,
        site: "tokens",
        diagnosis: Diagnosis::SpacePrefix,
        needs: "a SentencePiece tokenizer (the tiny-spm fixtures, Llama 2 / TinyLlama files)",
    },
    // Sliding-window attention (issue 37). Both show from the first position past the window:
    // at step 0 when the prompt is longer than it, else at the first decode step past it.
    FaultInfo {
        fault: Fault::SlidingWindowIgnored,
        name: "sliding-window-ignored",
        bug: "the window forgotten on one code path (candle's quantized Gemma 3; litgpt: gibberish after ~800 tokens): window layers attend over every position and keep every position",
        code_path: "Llama::mask_for and Llama::new_cache: a window layer gets the causal mask and an append-only cache",
        step: 0,
        layer: Layer::FirstWindow,
        site: "attn",
        diagnosis: Diagnosis::SlidingWindow,
        needs: "a model with sliding-window layers and a prompt longer than the window",
    },
    FaultInfo {
        fault: Fault::WindowOffByOne,
        name: "window-off-by-one",
        bug: "the window one position too wide: `sliding_window` passed as FlashAttention's left size, which does not count the query's own position (mlx-lm PR 390, transformers issue 39408)",
        code_path: "Llama::mask_for: a window layer's mask sees w + 1 positions",
        step: 0,
        layer: Layer::FirstWindow,
        site: "attn",
        diagnosis: Diagnosis::SlidingWindow,
        needs: "a model with sliding-window layers and a prompt longer than the window",
    },
    FaultInfo {
        fault: Fault::NormOffsetDoubled,
        name: "norm-offset-doubled",
        bug: "Gemma's norm offset applied twice: 1 + w computed on a GGUF weight that llama.cpp's converter stored as w + 1 (\"token salad\"; embedding cosine 0.19)",
        code_path: "weights::offset_norm: the one added to a GGUF file's norm weights too",
        step: 0,
        layer: Layer::First,
        site: "attn_norm",
        diagnosis: Diagnosis::NormOffset,
        needs: "a Gemma 3 GGUF (its norm weights hold w + 1)",
    },
    FaultInfo {
        fault: Fault::EmbedScaleMissing,
        name: "embed-scale-missing",
        bug: "the embedding not multiplied by sqrt(hidden_size) (Gemma's normalizer; ports that reuse a Llama embedding)",
        code_path: "Llama::forward: the variant's embedding scale skipped",
        step: 0,
        layer: Layer::None,
        site: "embed",
        diagnosis: Diagnosis::EmbedScale,
        needs: "a model that scales its embedding (Gemma 3)",
    },
    FaultInfo {
        fault: Fault::GeluAsSilu,
        name: "gelu-as-silu",
        bug: "SiLU instead of GELU-tanh in the gated MLP (one code path of a Gemma port: \"nothing overflows and per-layer norms look healthy\")",
        code_path: "Llama::block: the MLP's activation",
        step: 0,
        layer: Layer::First,
        site: "mlp_act",
        diagnosis: Diagnosis::Activation,
        needs: "a GELU-gated model (Gemma 3)",
    },
    FaultInfo {
        fault: Fault::LocalRopeBaseGlobal,
        name: "local-rope-base-global",
        bug: "the local (sliding-window) layers rotated with the global layers' RoPE base (Gemma 3 ports after a context shift)",
        code_path: "Llama::rope_for: a window layer's RoPE from the config's global base and scaling",
        step: 0,
        layer: Layer::FirstWindow,
        site: "q_rope",
        diagnosis: Diagnosis::RopeBase,
        needs: "local layers with a RoPE base of their own (Gemma 3) and a prompt of 2+ tokens",
    },
];

impl Fault {
    pub fn info(&self) -> &'static FaultInfo {
        CATALOG.iter().find(|i| i.fault == *self).expect("every fault is in the catalog")
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.info().name)
    }
}

/// The faults injected into one engine instance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    active: Vec<(Fault, usize)>,
}

impl Faults {
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses `NAME[:LAYER]`, comma-separated.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut active = vec![];
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, layer) = match part.split_once(':') {
                Some((n, l)) => {
                    let l: usize = l.parse().map_err(|_| {
                        EngineError::Input(format!("--inject {part}: `{l}` is not a layer number"))
                    })?;
                    (n, l)
                }
                None => (part, DEFAULT_FAULT_LAYER),
            };
            let info = CATALOG.iter().find(|i| i.name == name).ok_or_else(|| {
                EngineError::Input(format!(
                    "unknown fault `{name}`; `lockstep faults` lists them: {}",
                    CATALOG.iter().map(|i| i.name).collect::<Vec<_>>().join(", ")
                ))
            })?;
            active.push((info.fault, layer));
        }
        Ok(Self { active })
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    pub fn has(&self, f: Fault) -> bool {
        self.active.iter().any(|(x, _)| *x == f)
    }

    /// The layer a one-layer fault is injected at.
    pub fn layer(&self, f: Fault) -> Option<usize> {
        self.active.iter().find(|(x, _)| *x == f).map(|(_, l)| *l)
    }

    pub fn list(&self) -> Vec<(Fault, usize)> {
        self.active.clone()
    }

    /// These faults without the adapter's (`lora-*`): what a model loaded without the
    /// adapter can carry.
    pub fn without_lora(&self) -> Faults {
        Faults { active: self.active.iter().copied().filter(|(f, _)| !matches!(f, Fault::LoraNotAttached | Fault::LoraScale)).collect() }
    }

    /// The config the weights are loaded with: the model's own, except that the `tied-head`
    /// fault loads them as if the head were tied to the embedding.
    pub fn weights_config(&self, cfg: &crate::config::Config) -> crate::config::Config {
        crate::config::Config { tie_word_embeddings: cfg.tie_word_embeddings || self.has(Fault::TiedHead), ..cfg.clone() }
    }

    /// `name[:layer]` for reports.
    pub fn describe(&self) -> Vec<String> {
        self.active
            .iter()
            .map(|(f, l)| if f.info().layer == Layer::Injected { format!("{f}:{l}") } else { f.to_string() })
            .collect()
    }
}
