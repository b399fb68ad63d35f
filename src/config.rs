//! Model hyper-parameters: one validated [`Config`], resolved from a Hugging Face
//! `config.json` (through the serde mirror [`HfConfig`]) or from GGUF metadata
//! (in [`crate::weights`]). Nothing downstream reads raw config files.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// Validated hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How the RoPE frequencies are scaled ([`crate::rope`]); the default for an unscaled model.
    pub rope_scaling: crate::rope::RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// The q/k/v projections carry biases (Qwen2).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Sparse mixture of experts (Mixtral): experts per layer, 0 for a dense MLP.
    pub num_experts: usize,
    /// Experts each position is routed to (top-k), 0 for a dense MLP.
    pub num_experts_per_tok: usize,
    /// Sliding-window attention per layer: `Some(w)` where layer `i` attends over the last `w`
    /// positions, its own included (position `p` sees `p - w + 1 ..= p`, as transformers and
    /// llama.cpp count), `None` where it attends globally. Empty: every layer global.
    pub layer_windows: Vec<Option<usize>>,
    /// What the decoder computes where a family departs from Llama's choices (Gemma 3's); the
    /// default is Llama's.
    pub variant: Variant,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU: Llama, Mistral, Qwen2).
    #[default]
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU with the tanh approximation: Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// What a decoder of the shared architecture ([`crate::models::llama`]) computes differently
/// per family. `Variant::default()` is Llama's: no embedding scale, SiLU, attention scaled by
/// `1/sqrt(head_dim)`, raw logits, one RoPE for every layer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    /// The embedding rows are multiplied by this, rounded to the model's dtype first (Gemma:
    /// `sqrt(hidden_size)`).
    pub embed_scale: Option<f64>,
    pub activation: Activation,
    /// The attention scores' factor when it is not `1/sqrt(head_dim)` (Gemma 3:
    /// `query_pre_attn_scalar ** -0.5`).
    pub attn_scale: Option<f64>,
    /// Final logits soft-capped as `cap * tanh(logits / cap)` (Gemma 2's
    /// `final_logit_softcapping`).
    pub final_logit_softcap: Option<f64>,
    /// The RoPE of the sliding-window layers where it differs from the global layers' (Gemma
    /// 3's `rope_local_base_freq`, unscaled).
    pub local_rope: Option<crate::rope::RopeParams>,
}

impl Config {
    /// Checks the relations the forward pass relies on; `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| Err(EngineError::Config { path: path.to_path_buf(), message });
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        // A backstop where no tensor table is at hand to check the sizes against
        // (`crate::weights` checks them against the file first): sizes no model has.
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 22),
            ("num_hidden_layers", self.num_layers, 1 << 16),
            ("num_attention_heads", self.num_heads, 1 << 16),
            ("num_key_value_heads", self.num_kv_heads, 1 << 16),
            ("head_dim", self.head_dim, 1 << 16),
            ("vocab_size", self.vocab_size, 1 << 28),
            ("num_local_experts", self.num_experts, 1 << 16),
        ] {
            if v > max {
                return bad(format!("{name} is {v}, more than any model has (at most {max} here): the config is corrupt"));
            }
        }
        crate::rope::RopeParams { theta: self.rope_theta, scaling: self.rope_scaling.clone() }.check(self.head_dim, path)?;
        if self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if !self.layer_windows.is_empty() && self.layer_windows.len() != self.num_layers {
            return bad(format!("{} layer types for {} layers", self.layer_windows.len(), self.num_layers));
        }
        if self.layer_windows.contains(&Some(0)) {
            return bad("sliding_window is 0: a window holds at least the query's own position".into());
        }
        if self.num_experts > 0 && !(1..=self.num_experts).contains(&self.num_experts_per_tok) {
            return bad(format!(
                "num_experts_per_tok ({}) must be between 1 and num_local_experts ({})",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        let v = &self.variant;
        for (name, x) in [("embedding scale", v.embed_scale), ("attention scale", v.attn_scale), ("final_logit_softcapping", v.final_logit_softcap)] {
            if let Some(x) = x {
                if !(x > 0.0 && x.is_finite()) {
                    return bad(format!("{name} is {x}: it must be a positive number"));
                }
            }
        }
        if let Some(r) = &v.local_rope {
            r.check(self.head_dim, path)?;
        }
        if !(self.rms_norm_eps > 0.0) || !(self.rope_theta > 0.0) {
            return bad(format!(
                "rms_norm_eps ({}) and rope_theta ({}) must be positive",
                self.rms_norm_eps, self.rope_theta
            ));
        }
        Ok(())
    }

    /// The positions the model serves: `max_position_embeddings`, extended by dynamic NTK
    /// scaling's factor.
    pub fn context_window(&self) -> usize {
        self.rope_scaling.context(self.max_position_embeddings)
    }

    /// Layer `i`'s attention window ([`Config::layer_windows`]), `None` for global attention.
    pub fn window(&self, i: usize) -> Option<usize> {
        self.layer_windows.get(i).copied().flatten()
    }

    /// The factor of the attention scores: the variant's (Gemma 3's `query_pre_attn_scalar`),
    /// else `1/sqrt(head_dim)`.
    pub fn attn_scale(&self) -> f64 {
        self.variant.attn_scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }

    /// Number of query heads served by each KV head.
    pub fn n_rep(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// `eos_token_id` is an int or a list of ints in `config.json`.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![*x],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Serde mirror of a Hugging Face Llama `config.json`: required fields are plain,
/// optional ones carry the defaults of transformers' `LlamaConfig`.
#[derive(Debug, Deserialize, Clone)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5's form of the RoPE settings (flat, or nested per layer type); older files
    /// use `rope_theta` + `rope_scaling`. Both are read by [`crate::rope::from_hf`].
    pub rope_parameters: Option<serde_json::Value>,
    pub max_position_embeddings: Option<usize>,
    /// Absent: the family's default (false for Llama, true for Gemma 3).
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub hidden_act: Option<String>,
    /// Every other key of the file, for the family that reads it (Qwen2's
    /// `use_sliding_window`, Mixtral's `num_local_experts`, ...): a family's own keys and
    /// checks live in its file (`crate::models`), read through [`HfConfig::key`].
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl HfConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// A `config.json`'s text (`path` names it in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| EngineError::Config { path: path.to_path_buf(), message: e.to_string() })
    }

    /// The RoPE base of `rope_parameters` without checking the rest of it (the shape of a model
    /// only): its `rope_theta`, or the first layer type's.
    fn loose_rope_theta(&self) -> Option<f64> {
        let p = self.rope_parameters.as_ref()?.as_object()?;
        p.get("rope_theta").and_then(|v| v.as_f64()).or_else(|| p.values().find_map(|v| v.get("rope_theta")?.as_f64()))
    }

    /// The RoPE of this config ([`crate::rope::from_hf`]): base and scaling, for every layer or
    /// per layer type.
    pub fn rope(&self, path: &Path) -> Result<crate::rope::HfRope> {
        let ctx = crate::rope::RopeContext {
            rope_theta: self.rope_theta,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            original_max_position_embeddings: self.key("original_max_position_embeddings", path)?,
            partial_rotary_factor: self.key("partial_rotary_factor", path)?,
        };
        crate::rope::from_hf(self.rope_parameters.as_ref(), self.rope_scaling.as_ref(), ctx, path)
    }

    /// A key of the file beyond the common ones, parsed as `T`; `None` when absent or `null`.
    pub fn key<T: serde::de::DeserializeOwned>(&self, name: &str, path: &Path) -> Result<Option<T>> {
        match self.extra.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| EngineError::Config { path: path.to_path_buf(), message: format!("{name}: {e}") }),
        }
    }

    /// The shape of any decoder-only model of this `config.json`, without this engine's
    /// family checks (activation, RoPE kind, biases, windows): what the harness needs to
    /// describe a model that an engine under test other than the bundled one runs. Checked by
    /// [`Config::validate`] only (its backstop refuses sizes no model has): the tensors are
    /// the engine under test's to check.
    pub fn resolve_shape(&self, path: &Path) -> Result<Config> {
        let experts = self.key::<usize>("num_local_experts", path)?.or(self.key::<usize>("num_experts", path)?);
        let moe = experts.zip(self.key::<usize>("num_experts_per_tok", path)?).unwrap_or((0, 0));
        let cfg = self.shape(path, self.attention_bias, moe.0, moe.1)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The hyper-parameters as given, unchecked but for the head width: a family's config
    /// function (`crate::models`) checks what its architecture needs first, and
    /// [`crate::models::resolve_hf`] checks the result against the weights.
    pub fn shape(&self, path: &Path, qkv_bias: bool, num_experts: usize, num_experts_per_tok: usize) -> Result<Config> {
        if self.head_dim.is_none() {
            let bad = |message: String| Err(EngineError::Config { path: path.to_path_buf(), message });
            if self.num_attention_heads == 0 {
                return bad("num_attention_heads is 0: a model needs at least one attention head".into());
            }
            if self.hidden_size % self.num_attention_heads != 0 {
                return bad(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim gives the head width)",
                    self.hidden_size, self.num_attention_heads
                ));
            }
        }
        let cfg = Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta.or_else(|| self.loose_rope_theta()).unwrap_or(10_000.0),
            rope_scaling: crate::rope::RopeScaling::Default,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default(),
            num_experts,
            num_experts_per_tok,
            layer_windows: self.layer_windows(path)?,
            variant: Variant::default(),
        };
        Ok(cfg)
    }

    /// Which layers attend over a sliding window, as transformers 5 reads the config. The
    /// window: `sliding_window` (Mistral's default 4,096 where the key is absent; Qwen2's and
    /// Qwen3's only when `use_sliding_window` is true, 4,096 by default). The layers:
    /// `layer_types` where the file lists them (`sliding_attention` ones), else every layer
    /// for Mistral and Mixtral, the layers from `max_window_layers` (default 28) on for Qwen2
    /// and Qwen3, all but every `sliding_window_pattern`-th (default 6) for Gemma 3 (whose window
    /// defaults to 4,096 too). Llama's config has no window (transformers' Llama ignores both keys).
    /// Empty: every layer global.
    pub fn layer_windows(&self, path: &Path) -> Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        let mt = self.model_type.as_deref().unwrap_or("llama");
        let given = self.key::<usize>("sliding_window", path)?;
        let absent = !self.extra.contains_key("sliding_window");
        let window = match mt {
            "mistral" | "gemma3_text" if absent => Some(4096),
            "qwen2" | "qwen3" => match self.key::<bool>("use_sliding_window", path)? {
                Some(true) if absent => Some(4096),
                Some(true) => given,
                _ => None,
            },
            "llama" => None,
            _ => given,
        };
        let Some(w) = window else { return Ok(vec![]) };
        if let Some(types) = self.key::<Vec<String>>("layer_types", path)? {
            if types.len() != n {
                return Err(EngineError::Config {
                    path: path.into(),
                    message: format!("layer_types lists {} layers, num_hidden_layers is {n}", types.len()),
                });
            }
            let mut out = vec![];
            for (i, t) in types.iter().enumerate() {
                out.push(match t.as_str() {
                    "full_attention" => None,
                    "sliding_attention" => Some(w),
                    other => {
                        return Err(EngineError::Unsupported {
                            path: path.into(),
                            message: format!("layer_types[{i}] is `{other}` (only full_attention and sliding_attention are run)"),
                        })
                    }
                });
            }
            return Ok(all_global_as_empty(out));
        }
        Ok(all_global_as_empty(match mt {
            "mistral" | "mixtral" => vec![Some(w); n],
            "qwen2" | "qwen3" => {
                let from = self.key::<usize>("max_window_layers", path)?.unwrap_or(28);
                (0..n).map(|i| (i >= from).then_some(w)).collect()
            }
            // Gemma 3: every `sliding_window_pattern`-th layer (default 6) global, the others local.
            "gemma3_text" => {
                let every = self.key::<usize>("sliding_window_pattern", path)?.unwrap_or(6).max(1);
                (0..n).map(|i| ((i + 1) % every != 0).then_some(w)).collect()
            }
            _ => vec![],
        }))
    }
}

/// Windows of which none is set as the empty list (every layer global).
fn all_global_as_empty(windows: Vec<Option<usize>>) -> Vec<Option<usize>> {
    if windows.iter().all(Option::is_none) {
        vec![]
    } else {
        windows
    }
}
