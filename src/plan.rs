//! Per-layer plans: what each layer of a model does that another layer of the same model may
//! do differently. Today's models mix layer types: Gemma 2/3 and Mistral alternate
//! sliding-window and global attention, Gemma 3 gives its local and global layers different
//! RoPE bases, Llama 3.x scales RoPE. So the model states each layer's plan ([`LayerPlan`]),
//! derived from its config when the layer is built, and everything that depends on one reads
//! the layer's plan, never a model-wide value: the RoPE tables and the attention mask of the
//! forward pass, the cache kind of each layer ([`crate::KvCache::with_kinds`]), isolation, and
//! in the harness bisect's RoPE evidence and the diagnosis of cache lengths.
//!
//! (As mlx-lm's `make_cache()` and candle-transformers' Gemma attention, which holds an
//! optional sliding window and a rotary embedding of its own per layer.)
//!
//! Llama, Mistral, Qwen2 and Mixtral layers share one RoPE and differ at most in their
//! attention span: [`of_config`] gives each layer the global plan of the config
//! ([`LayerPlan::global`]) or, where the config sets a sliding window, that window.

use serde::Serialize;

use crate::cache::CacheKind;
use crate::config::Config;
use crate::rope::RopeScaling;

/// Which positions a layer's attention sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Span {
    /// Every earlier position (causal).
    Global,
    /// The last `w` positions, the query's own included (sliding-window attention: position
    /// `i` sees `i - w + 1 ..= i`).
    Window(usize),
}

impl Span {
    pub fn describe(&self) -> String {
        match self {
            Span::Global => "global".into(),
            Span::Window(w) => format!("window of {w}"),
        }
    }
}

/// A layer's rotary position embedding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RopePlan {
    /// The base (theta) of the frequencies.
    pub base: f64,
    /// How many dimensions of each head are rotated (the head's width for full RoPE).
    pub dims: usize,
    /// How the frequencies are scaled ([`crate::rope`]).
    #[serde(skip_serializing_if = "RopeScaling::is_default")]
    pub scaling: RopeScaling,
}

impl RopePlan {
    /// The unscaled RoPE of `base` over `dims`.
    pub fn unscaled(base: f64, dims: usize) -> Self {
        RopePlan { base, dims, scaling: RopeScaling::Default }
    }

    /// The frequencies (`dims / 2` of them) for a call whose largest position is `len - 1`, and
    /// the factor cos and sin are multiplied by: the unscaled frequencies of the base (dynamic
    /// NTK's grown base past its length) computed in the dtype's precision as transformers
    /// does (`f32`: `1 / base^(2i/d)` in f32), then scaled in f64 and rounded once.
    pub fn frequencies(&self, len: usize, f32: bool) -> (Vec<f64>, f64) {
        let base = self.scaling.base_at(self.base, self.dims, len);
        let half = self.dims / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| match f32 {
                true => (1.0f32 / (base as f32).powf((2 * i) as f32 / self.dims as f32)) as f64,
                false => 1.0 / base.powf((2 * i) as f64 / self.dims as f64),
            })
            .collect();
        let scaled = self.scaling.scale(&inv, base, self.dims, len);
        let scaled = if f32 { scaled.into_iter().map(|f| f as f32 as f64).collect() } else { scaled };
        (scaled, self.scaling.attention_factor())
    }
}

/// What one layer does: its attention span, its RoPE and how its cache keeps positions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerPlan {
    pub span: Span,
    pub rope: RopePlan,
    pub cache: CacheKind,
}

impl LayerPlan {
    /// A global-attention layer of `cfg`: causal attention over every position, RoPE with the
    /// config's base over the whole head, an append-only cache.
    pub fn global(cfg: &Config) -> Self {
        LayerPlan {
            span: Span::Global,
            rope: RopePlan { base: cfg.rope_theta, dims: cfg.head_dim, scaling: cfg.rope_scaling.clone() },
            cache: CacheKind::AppendOnly,
        }
    }

    /// One line for reports: `global, RoPE base 10000 over 64 dims, append-only cache`.
    pub fn describe(&self) -> String {
        let scaled = match self.rope.scaling {
            RopeScaling::Default => String::new(),
            ref s => format!(" ({})", s.describe()),
        };
        format!("{}, RoPE base {} over {} dims{scaled}, {} cache", self.span.describe(), self.rope.base, self.rope.dims, self.cache.describe())
    }
}

/// Every layer of `cfg` global ([`LayerPlan::global`]).
pub fn uniform(cfg: &Config) -> Vec<LayerPlan> {
    vec![LayerPlan::global(cfg); cfg.num_layers]
}

/// The plan of a config of the shared architecture (Llama, Mistral, Qwen2, Mixtral, Gemma 3):
/// a layer with a window ([`Config::layer_windows`]) attends over it and keeps a rotating cache
/// of that many positions, with the local RoPE where the model has one (Gemma 3's
/// `rope_local_base_freq`, [`crate::config::Variant::local_rope`]); the others are global, with
/// the config's RoPE.
pub fn of_config(cfg: &Config) -> Vec<LayerPlan> {
    let local = |global: RopePlan| match &cfg.variant.local_rope {
        Some(r) => RopePlan { base: r.theta, scaling: r.scaling.clone(), ..global },
        None => global,
    };
    (0..cfg.num_layers)
        .map(|i| match cfg.window(i) {
            Some(w) => {
                let g = LayerPlan::global(cfg);
                LayerPlan { span: Span::Window(w), cache: CacheKind::Window(w), rope: local(g.rope) }
            }
            None => LayerPlan::global(cfg),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uniform_plan_is_the_config_for_every_layer() {
        let cfg = Config {
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 100,
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            rope_scaling: Default::default(),
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            qkv_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            num_experts: 0,
            num_experts_per_tok: 0,
            layer_windows: vec![],
            variant: Default::default(),
        };
        let plan = uniform(&cfg);
        assert_eq!(plan.len(), 3);
        assert!(plan.iter().all(|p| *p == LayerPlan { span: Span::Global, rope: RopePlan::unscaled(1e6, 16), cache: CacheKind::AppendOnly }));
        assert_eq!(plan[0].describe(), "global, RoPE base 1000000 over 16 dims, append-only cache");
        assert_eq!(Span::Window(512).describe(), "window of 512");
        let windowed = Config { layer_windows: vec![None, Some(8), None], ..cfg };
        let plan = of_config(&windowed);
        assert_eq!((plan[0].span, plan[1].span, plan[2].span), (Span::Global, Span::Window(8), Span::Global));
        assert_eq!(plan[1].cache, CacheKind::Window(8));
        assert_eq!(plan[1].describe(), "window of 8, RoPE base 1000000 over 16 dims, rotating window of 8 cache");
        // Gemma 3: the windowed layers with their own RoPE, the global ones with the config's.
        let local = crate::rope::RopeParams { theta: 1e4, scaling: RopeScaling::Default };
        let gemma = Config { variant: crate::config::Variant { local_rope: Some(local), ..Default::default() }, ..windowed };
        let plan = of_config(&gemma);
        assert_eq!((plan[0].rope.base, plan[1].rope.base, plan[2].rope.base), (1e6, 1e4, 1e6));
    }
}
