//! The Llama family, bottom-up from the shared blocks ([`crate::blocks`]): RMSNorm, RoPE,
//! grouped-query attention with a causal mask, SwiGLU MLP, block, model. Batch size is 1 and
//! kept implicit: activations are `(seq, hidden)`, per-head tensors `(heads, seq, head_dim)`.
//!
//! Prefill and decode are the same code: [`Llama::forward`] takes any number of new
//! tokens, appends their K/V to the explicit [`KvCache`] and attends over the whole
//! cache. Each layer reads its own plan ([`crate::plan`]: RoPE base, attention span, cache
//! kind; [`plan::of_config`]: global, or the config's sliding window). Every intermediate
//! is offered to the optional [`Capture`] under its site name (the family's [`LAYER_SITES`]
//! table, from which its [`SiteGraph`] is generated).

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use super::Family;
use crate::blocks::{attention, linear, rms_norm, rope, rope_tables, silu_mul, HeadMapping, Mask};
use crate::cache::{CacheKind, KvCache, KvDtype};
use crate::config::{Activation, Config};
use crate::decoder::{Capabilities, Decoder, ModelInfo};
use crate::error::{EngineError, Result};
use crate::faults::{Fault, Faults};
use crate::layout::QkLayout;
use crate::plan::{self, LayerPlan, RopePlan, Span};
use crate::quant::Linear;
use crate::sites::{LayerSite, SiteGraph, SiteKind, INPUT};
use crate::taps::{tap, Capture};
use super::{Checkpoint, FamilyModel};
use crate::options::LoadOptions;
use crate::weights::{self, Ffn, GgufFile, LayerWeights, LlamaWeights};
use crate::config::HfConfig;
use crate::rope::{HfRope, RopeScaling};
use crate::quant::WeightsMode;
use crate::tensors::{Safetensors, TensorTable};
use std::path::Path;

pub struct Llama {
    pub cfg: Config,
    pub weights: LlamaWeights,
    pub qk_layout: QkLayout,
    pub dtype: DType,
    /// Injected faults (`crate::faults`); empty in normal use.
    pub faults: Faults,
    /// How the caches of [`Decoder::new_cache`] store K and V (`LoadOptions::kv_cache`).
    pub kv_cache: KvDtype,
    device: Device,
    /// The registered family this decoder runs as: Llama, or a family that is the Llama
    /// architecture plus what its weights carry (Qwen2: q/k/v biases, `crate::models::qwen2`).
    family: &'static Family,
    graph: SiteGraph,
    /// Each layer's plan ([`plan::of_config`]: global, or the config's sliding window).
    plan: Vec<LayerPlan>,
    /// Built on first use, after the loader has set the faults and attached any adapter.
    info: OnceLock<ModelInfo>,
}

impl Llama {
    pub fn new(cfg: Config, weights: LlamaWeights, qk_layout: QkLayout, dtype: DType) -> Self {
        Self::of_family(&FAMILY, cfg, weights, qk_layout, dtype)
    }

    /// The decoder of `family`, a family of the Llama architecture (its site table is the
    /// graph's); the layers' optional q/k/v biases are added to the projections.
    pub fn of_family(family: &'static Family, cfg: Config, weights: LlamaWeights, qk_layout: QkLayout, dtype: DType) -> Self {
        let graph = SiteGraph::new(cfg.num_layers, family.layer_sites);
        let plan = plan::of_config(&cfg);
        Self { cfg, weights, qk_layout, dtype, faults: Faults::none(), kv_cache: KvDtype::default(), device: Device::Cpu, family, graph, plan, info: OnceLock::new() }
    }

    fn build_info(&self) -> ModelInfo {
        ModelInfo {
            engine: "lockstep-engine".into(),
            family: self.family.name.into(),
            config: self.cfg.clone(),
            dtype: self.dtype,
            qk_layout: self.qk_layout,
            plan: self.plan.clone(),
            matrix_types: self.weights.matrix_types(),
            quant_type: self.weights.quant_type(),
            quantized_kernels: self.weights.any_quantized(),
            faults: self.faults.describe(),
            capabilities: Capabilities { isolate_layer: true, project: true },
        }
    }

    fn forward_on_pool(&self, tokens: &[u32], cache: &mut KvCache, mut cap: Option<&mut Capture>) -> Result<Tensor> {
        let cfg = &self.cfg;
        if tokens.is_empty() {
            return Err(EngineError::Input("forward called with no tokens".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::Input(format!("token id {bad} is outside the vocabulary (size {})", cfg.vocab_size)));
        }
        if cache.num_layers() != cfg.num_layers {
            return Err(EngineError::Input(format!(
                "cache has {} layers, model has {}",
                cache.num_layers(),
                cfg.num_layers
            )));
        }
        // Faults of the generation loop (crate::faults): a decode step without the prompt's
        // cache, or with the whole history re-fed instead of a cache.
        let history: Vec<u32>;
        let mut tokens = tokens;
        if cache.offset() > 0 && self.faults.has(Fault::DropContext) {
            cache.reset();
        }
        let n_new = tokens.len();
        if cache.offset() > 0 && self.faults.has(Fault::RefeedHistory) {
            history = cache.tokens().iter().chain(tokens).copied().collect();
            cache.reset();
            tokens = &history;
        }
        let seq = tokens.len();
        let offset = cache.offset();
        cache.push_tokens(tokens);
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.weights.embed.index_select(&ids, 0)?; // (seq, hidden)
        if let Some(s) = self.cfg.variant.embed_scale.filter(|_| !self.faults.has(Fault::EmbedScaleMissing)) {
            x = (x * self.embed_scale(s))?;
        }
        tap(&mut cap, || "embed".into(), &x);

        // RoPE tables and masks per layer plan, each computed once for the layers that share it.
        let mut tables: Vec<(&LayerPlan, (Tensor, Tensor), Mask)> = vec![];
        for (i, lw) in self.weights.layers.iter().enumerate() {
            let p = &self.plan[i];
            let t = match tables.iter().position(|(q, _, _)| *q == p) {
                Some(t) => t,
                None => {
                    tables.push((p, self.rope_for(p, offset, seq)?, self.mask_for(p, offset, seq)));
                    tables.len() - 1
                }
            };
            let (_, (cos, sin), mask) = &tables[t];
            x = self.block(i, lw, &x, offset, cos, sin, *mask, cache, &mut cap)?;
        }
        let x = rms_norm(&x, &self.weights.norm, self.eps())?;
        tap(&mut cap, || "final_norm".into(), &x);
        let mut logits = linear(&x, &self.weights.lm_head)?; // (seq, vocab)
        if let Some(cap) = self.cfg.variant.final_logit_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        tap(&mut cap, || "logits".into(), &logits);
        Ok(logits.narrow(0, seq - n_new, n_new)?)
    }

    /// The embedding's scale as the model multiplies by it: rounded to the model's dtype (to f32
    /// first for f64, as transformers' `embed_scale` buffer is an f32 tensor widened with the
    /// model).
    fn embed_scale(&self, s: f64) -> f64 {
        let s = s as f32 as f64;
        match self.dtype {
            DType::BF16 => half::bf16::from_f64(s).to_f64(),
            DType::F16 => half::f16::from_f64(s).to_f64(),
            _ => s,
        }
    }

    /// The RoPE base a layer uses (the `rope-theta` fault replaces the plan's base with the
    /// 10000 default, or with 100000 when the plan already says 10000).
    fn theta(&self, p: &LayerPlan) -> f64 {
        match self.faults.has(Fault::RopeTheta) {
            false => p.rope.base,
            true if p.rope.base == 10_000.0 => 100_000.0,
            true => 10_000.0,
        }
    }

    /// A layer's RoPE tables for positions `offset..offset + seq`.
    fn rope_for(&self, p: &LayerPlan, offset: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        if p.rope.dims != self.cfg.head_dim {
            return Err(EngineError::Input(format!(
                "partial RoPE ({} of {} dims per head) is not run by this family",
                p.rope.dims, self.cfg.head_dim
            )));
        }
        let scaling = match self.faults.has(Fault::RopeScalingIgnored) {
            true => RopeScaling::Default,
            false => p.rope.scaling.clone(),
        };
        let rope = RopePlan { base: self.theta(p), scaling, ..p.rope.clone() };
        // The `local-rope-base-global` fault: a window layer rotates as the global ones do.
        let rope = match p.span {
            Span::Window(_) if self.faults.has(Fault::LocalRopeBaseGlobal) => {
                RopePlan { base: self.cfg.rope_theta, scaling: self.cfg.rope_scaling.clone(), ..rope }
            }
            _ => rope,
        };
        rope_tables(&rope, offset, seq, self.dtype, &self.device)
    }

    /// A layer's attention mask for `seq` positions after `offset`, over keys counted from
    /// position 0 (`Mask::None`: every cached position is visible, a one-token step of a
    /// global layer); the `causal-mask` fault drops the causal part of a prefill. A description,
    /// never a `(seq, total)` tensor: attention builds it a chunk of rows at a time.
    fn mask_for(&self, p: &LayerPlan, offset: usize, seq: usize) -> Mask {
        match self.span(p) {
            Span::Global if seq > 1 && !self.faults.has(Fault::CausalMask) => Mask::Causal { offset },
            Span::Global => Mask::None,
            Span::Window(w) if self.faults.has(Fault::WindowOffByOne) => Mask::Window { offset, w: w + 1 },
            Span::Window(w) => Mask::Window { offset, w },
        }
    }

    /// A layer's attention span as it runs: its plan's (the `sliding-window-ignored` fault:
    /// global).
    fn span(&self, p: &LayerPlan) -> Span {
        match p.span {
            Span::Window(_) if self.faults.has(Fault::SlidingWindowIgnored) => Span::Global,
            s => s,
        }
    }

    /// A q/k/v projection's bias as it is added (the `qkv-bias-dropped` fault: never).
    fn bias<'a>(&self, b: &'a Option<Tensor>) -> Option<&'a Tensor> {
        b.as_ref().filter(|_| !self.faults.has(Fault::QkvBiasDropped))
    }

    /// The RMSNorm epsilon in use (the `rms-eps` fault replaces it).
    fn eps(&self) -> f64 {
        if self.faults.has(Fault::RmsEps) {
            1e-2
        } else {
            self.cfg.rms_norm_eps
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        i: usize,
        lw: &LayerWeights,
        x: &Tensor,
        offset: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: Mask,
        cache: &mut KvCache,
        cap: &mut Option<&mut Capture>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (seq, _) = x.dims2()?;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);

        // --- attention ---
        let h = rms_norm(x, &lw.attn_norm, self.eps())?;
        tap(cap, || format!("layers.{i}.attn_norm"), &h);
        let qkv = Linear::forward_group(&[&lw.wq, &lw.wk, &lw.wv], &h)?;
        let qkv = [(&qkv[0], &lw.bq), (&qkv[1], &lw.bk), (&qkv[2], &lw.bv)].map(|(y, b)| with_bias(y, self.bias(b)));
        let [q, k, v] = qkv;
        let (q, k, v) = (&q?, &k?, &v?); // (seq, nh*hd), (seq, nkv*hd) x2
        tap(cap, || format!("layers.{i}.q"), q);
        tap(cap, || format!("layers.{i}.k"), k);
        tap(cap, || format!("layers.{i}.v"), v);
        let (mut q, mut k) = (q.reshape((seq, nh, hd))?, k.reshape((seq, nkv, hd))?);
        if let Some(n) = &lw.extra {
            // Gemma 3: each head of q and k RMS-normed before RoPE.
            q = rms_norm(&q, &n.q_norm, self.eps())?;
            k = rms_norm(&k, &n.k_norm, self.eps())?;
        }
        let q = q.transpose(0, 1)?.contiguous()?; // (nh, seq, hd)
        let k = k.transpose(0, 1)?.contiguous()?; // (nkv, seq, hd)
        if lw.extra.is_some() {
            tap(cap, || format!("layers.{i}.q_norm"), &q);
            tap(cap, || format!("layers.{i}.k_norm"), &k);
        }
        let v = v.reshape((seq, nkv, hd))?.transpose(0, 1)?.contiguous()?;
        let layout = match (self.faults.has(Fault::RopeConvention), self.qk_layout) {
            (false, l) => l,
            (true, QkLayout::HalfSplit) => QkLayout::Interleaved,
            (true, QkLayout::Interleaved) => QkLayout::HalfSplit,
        };
        let q = rope(&q, cos, sin, layout)?;
        let k = rope(&k, cos, sin, layout)?;
        tap(cap, || format!("layers.{i}.q_rope"), &q);
        tap(cap, || format!("layers.{i}.k_rope"), &k);

        // The fault acts on decode steps (one token after a cached prefix), as the catalog says.
        let stale = self.faults.layer(Fault::StaleCache) == Some(i) && cache.layer_len(i) > 0 && seq == 1;
        let (k_all, v_all) = if stale {
            cache.layer(i).cloned().expect("checked non-empty") // the fault: not updated
        } else {
            cache.update_and_fetch(i, &k, &v)? // (nkv, total, hd)
        };
        // The position of the first key: a window cache no longer holds the earliest ones,
        // and the stale cache's keys end before this step's positions.
        let total = k_all.dims()[1];
        let first = if stale { offset.saturating_sub(total) } else { (offset + seq).saturating_sub(total) };
        let mask = mask.from_key(first);
        tap(cap, || format!("layers.{i}.cache_k"), &k_all);
        tap(cap, || format!("layers.{i}.cache_v"), &v_all);
        let scale = cfg.attn_scale();
        let mapping = if self.faults.has(Fault::GqaMapping) { HeadMapping::Tiled } else { HeadMapping::Grouped };
        let attn = attention(&q, &k_all, &v_all, mask, scale, mapping)?; // (nh, seq, hd)
        let attn = attn.transpose(0, 1)?.contiguous()?.reshape((seq, nh * hd))?;
        tap(cap, || format!("layers.{i}.attn"), &attn);
        let mut attn_out = linear(&attn, &lw.wo)?;
        tap(cap, || format!("layers.{i}.attn_out"), &attn_out);
        if let Some(n) = &lw.extra {
            attn_out = rms_norm(&attn_out, &n.attn_post_norm, self.eps())?;
            tap(cap, || format!("layers.{i}.attn_post_norm"), &attn_out);
        }
        let x = (x + attn_out)?;

        // --- MLP (or the sparse mixture of experts of crate::models::mixtral) ---
        let h = rms_norm(&x, &lw.mlp_norm, self.eps())?;
        tap(cap, || format!("layers.{i}.mlp_norm"), &h);
        let mlp_out = match &lw.ffn {
            Ffn::Dense(m) => {
                let gu = Linear::forward_group(&[&m.gate, &m.up], &h)?;
                let (gate, up) = (&gu[0], &gu[1]);
                tap(cap, || format!("layers.{i}.mlp_gate"), gate);
                tap(cap, || format!("layers.{i}.mlp_up"), up);
                let act = match cfg.variant.activation {
                    Activation::Silu => silu_mul(gate, up)?,
                    Activation::GeluTanh if self.faults.has(Fault::GeluAsSilu) => silu_mul(gate, up)?,
                    Activation::GeluTanh => (gate.gelu()? * up)?,
                };
                tap(cap, || format!("layers.{i}.mlp_act"), &act);
                linear(&act, &m.down)?
            }
            Ffn::Moe(moe) => crate::moe::sparse_moe(i, moe, &h, cfg.num_experts_per_tok, &self.faults, cap)?,
        };
        tap(cap, || format!("layers.{i}.mlp_out"), &mlp_out);
        let mlp_out = match &lw.extra {
            Some(n) => {
                let y = rms_norm(&mlp_out, &n.mlp_post_norm, self.eps())?;
                tap(cap, || format!("layers.{i}.mlp_post_norm"), &y);
                y
            }
            None => mlp_out,
        };
        let out = (x + mlp_out)?;
        tap(cap, || format!("layers.{i}.out"), &out);
        Ok(out)
    }

}

impl Decoder for Llama {
    fn info(&self) -> &ModelInfo {
        self.info.get_or_init(|| self.build_info())
    }

    fn site_graph(&self) -> &SiteGraph {
        &self.graph
    }

    fn new_cache(&self) -> KvCache {
        // The `sliding-window-ignored` fault keeps every position of a window layer.
        let kind = |p: &LayerPlan| match self.faults.has(Fault::SlidingWindowIgnored) {
            true => CacheKind::AppendOnly,
            false => p.cache,
        };
        KvCache::with_kinds(self.plan.iter().map(kind).collect()).stored_as(self.kv_cache)
    }

    fn forward(&self, tokens: &[u32], cache: &mut KvCache, cap: Option<&mut Capture>) -> Result<Tensor> {
        // The whole step runs on a worker of the engine's pool: the serial parts then do not
        // compete for the cores with idle workers spinning for the next parallel matmul.
        crate::threads::pool().install(|| self.forward_on_pool(tokens, cache, cap))
    }

    /// Runs decoder layer `i` alone (bisect's isolation): `x (seq, hidden)` is the layer's
    /// input, `kv` the layer's cache before this step, `(kv_heads, cached, head_dim)` each,
    /// in this model's Q/K layout (`None`: an empty cache). Every site of the layer is
    /// offered to `cap`; returns the layer's output.
    fn isolate_layer(&self, i: usize, start: usize, x: &Tensor, kv: Option<(Tensor, Tensor)>, cap: &mut Capture) -> Result<Tensor> {
        let lw = self.weights.layers.get(i).ok_or_else(|| {
            EngineError::Input(format!("layer {i} does not exist (the model has {})", self.cfg.num_layers))
        })?;
        crate::threads::pool().install(|| {
            let mut cache = self.new_cache();
            let p = &self.plan[i];
            let cached = kv.as_ref().map(|(k, _)| k.dims()[1]).unwrap_or(0);
            // An append-only cache holds every position before the step; a window at least the
            // `w - 1` before it that the step's first position attends over (more are masked).
            let least = match p.cache {
                CacheKind::AppendOnly => start,
                CacheKind::Window(w) => start.min(w.saturating_sub(1)),
            };
            if cached < least || cached > start {
                return Err(EngineError::Input(format!(
                    "isolating layer {i} at position {start}: its {} cache should hold {} positions, it was given {cached}",
                    p.cache.describe(),
                    p.cache.expected_len(start)
                )));
            }
            if let Some((k, v)) = kv {
                cache.set_layer(i, k, v);
            }
            let seq = x.dims2()?.0;
            let (cos, sin) = self.rope_for(p, start, seq)?;
            let mask = self.mask_for(p, start, seq);
            let x = x.to_dtype(self.dtype)?;
            self.block(i, lw, &x, start, &cos, &sin, mask, &mut cache, &mut Some(cap))
        })
    }

    fn project(&self, layer: usize, module: &str, x: &Tensor) -> Result<Tensor> {
        let lw = self.weights.layers.get(layer).ok_or_else(|| {
            EngineError::Input(format!("layer {layer} does not exist (the model has {})", self.cfg.num_layers))
        })?;
        let (w, b) = match module {
            "q_proj" => (&lw.wq, self.bias(&lw.bq)),
            "k_proj" => (&lw.wk, self.bias(&lw.bk)),
            "v_proj" => (&lw.wv, self.bias(&lw.bv)),
            "o_proj" => (&lw.wo, None),
            "gate_proj" | "up_proj" | "down_proj" | "gate" => match (&lw.ffn, module) {
                (Ffn::Dense(m), "gate_proj") => (&m.gate, None),
                (Ffn::Dense(m), "up_proj") => (&m.up, None),
                (Ffn::Dense(m), "down_proj") => (&m.down, None),
                (Ffn::Moe(moe), "gate") => (&moe.router, None),
                (_, other) => return Err(EngineError::Input(format!("a {} layer has no projection `{other}`", self.family.name))),
            },
            other => return Err(EngineError::Input(format!("a {} layer has no projection `{other}`", self.family.name))),
        };
        let y = with_bias(&linear(&x.to_dtype(self.dtype)?, w)?, b)?;
        match module {
            "q_proj" | "k_proj" => self.qk_layout.to_hf(&y, self.cfg.head_dim),
            _ => Ok(y),
        }
    }
}

/// `y (seq, out)` plus the bias `(out)`, when there is one (`y` itself otherwise).
fn with_bias(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        None => Ok(y.clone()),
        Some(b) => Ok(y.broadcast_add(&b.to_dtype(y.dtype())?)?),
    }
}

/// The family's registration.
pub const FAMILY: Family = Family {
    name: "llama",
    model_types: &["llama"],
    gguf_archs: &["llama"],
    layer_sites: LAYER_SITES,
    hf_config: |hf, path| llama_config(hf, path, false, (0, 0)),
    gguf_config: GgufFile::config,
    load,
};

/// The hyper-parameters of a Llama-architecture `config.json` (Llama, and the families built
/// on it, which say whether the q/k/v projections carry biases and how many experts a layer
/// has): what this decoder computes is checked here (SiLU, no MLP bias, unscaled RoPE), not
/// yet against the weights ([`crate::models::resolve_hf`] does that).
pub(crate) fn llama_config(hf: &HfConfig, path: &Path, qkv_bias: bool, (experts, per_tok): (usize, usize)) -> Result<Config> {
    let unsupported = |message: String| Err(EngineError::Unsupported { path: path.to_path_buf(), message });
    if (hf.attention_bias && !qkv_bias) || hf.mlp_bias {
        return unsupported("attention_bias/mlp_bias = true is not supported".into());
    }
    if let Some(act) = &hf.hidden_act {
        if act != "silu" {
            return unsupported(format!("hidden_act `{act}` is not supported (only silu)"));
        }
    }
    // Every layer of this architecture attends globally with one RoPE: a config that states one
    // per layer type may only state it for full attention.
    let rope = match hf.rope(path)? {
        HfRope::Uniform(r) => r,
        HfRope::PerLayerType(mut types) if types.len() == 1 && types[0].0 == "full_attention" => types.remove(0).1,
        HfRope::PerLayerType(types) => {
            let names: Vec<&str> = types.iter().map(|(t, _)| t.as_str()).collect();
            return unsupported(format!(
                "rope_parameters per layer type ({}) is not run by the {} family, whose layers are all full attention",
                names.join(", "),
                hf.model_type.as_deref().unwrap_or("llama")
            ));
        }
    };
    let mut cfg = hf.shape(path, qkv_bias || hf.attention_bias, experts, per_tok)?;
    cfg.rope_theta = rope.theta;
    cfg.rope_scaling = rope.scaling;
    Ok(cfg)
}

/// Loads the weights (Hugging Face names or GGUF names, every shape checked), sets the
/// faults and attaches the adapter. GGUF Q/K rows stay in their interleaved-RoPE order
/// (`crate::layout`); Hugging Face rows are half-split.
fn load(ckpt: Checkpoint<'_>, opts: &LoadOptions) -> Result<FamilyModel> {
    let (cfg, weights, layout) = load_weights(ckpt, opts, &FAMILY, &weights::Arch::LLAMA)?;
    finish(Llama::new(cfg, weights, layout, opts.dtype), layout, opts)
}

/// The config and weights of a Llama-architecture checkpoint of `family` (its `hf_config`
/// resolves a `config.json`), faults that act on the weights set; the Q/K row layout of the
/// format (Hugging Face half-split, GGUF interleaved as llama.cpp's converter permutes Llama's
/// rows: a family whose GGUF rows stay half-split, Qwen2's, says so itself).
pub(crate) fn load_weights(ckpt: Checkpoint<'_>, opts: &LoadOptions, family: &Family, arch: &weights::Arch) -> Result<(Config, LlamaWeights, QkLayout)> {
    match ckpt {
        Checkpoint::Hf { dir, config } => {
            let cfg = super::checked_hf((family.hf_config)(config, &dir.join("config.json"))?, &dir.join("config.json"))?;
            let t = TensorTable::new(Safetensors::open(dir)?, opts.dtype, WeightsMode::Dequant);
            let w = weights::llama_weights(t, weights::Format::Hf, &opts.faults.weights_config(&cfg), arch)?;
            Ok((cfg, w, QkLayout::HalfSplit))
        }
        Checkpoint::Gguf { file, mode } => {
            file.drop_q41_min = opts.faults.has(Fault::Q41Min);
            let mut cfg = (family.gguf_config)(file)?;
            let w = weights::llama_weights(TensorTable::new(file, opts.dtype, mode), weights::Format::Gguf, &opts.faults.weights_config(&cfg), arch)?;
            // llama.cpp's Llama 3 scaling: per-frequency divisors stored as a tensor.
            if let Some(f) = &w.rope_freqs {
                let factors: Vec<f64> = f.to_dtype(candle_core::DType::F64)?.to_vec1()?;
                cfg.rope_scaling = RopeScaling::FreqFactors { factors };
            }
            Ok((cfg, w, QkLayout::Interleaved))
        }
    }
}

/// The last step of loading a model of the shared decoder (Llama, and the families built on
/// it): its faults, and the adapter attached to its layers.
pub(crate) fn finish(mut model: Llama, layout: QkLayout, opts: &LoadOptions) -> Result<FamilyModel> {
    model.faults = opts.faults.clone();
    model.kv_cache = opts.kv_cache;
    let lora = match (opts.adapter(&model.cfg)?, &opts.lora) {
        (Some(adapter), Some(l)) => {
            adapter.attach(&mut model.weights, &model.cfg, layout, opts.dtype, l.mode, &opts.faults)?;
            Some((adapter, l.mode))
        }
        _ => None,
    };
    Ok((Box::new(model), lora))
}

/// Per-layer sites in forward order, with what each reads (the dataflow bisect follows).
pub const LAYER_SITES: &[LayerSite] = &[
    LayerSite::new("attn_norm", SiteKind::Norm, &[INPUT]),
    LayerSite::qk("q", SiteKind::Projection, &["attn_norm"]).of("q_proj"),
    LayerSite::qk("k", SiteKind::Projection, &["attn_norm"]).of("k_proj"),
    LayerSite::new("v", SiteKind::Projection, &["attn_norm"]).of("v_proj"),
    LayerSite::qk("q_rope", SiteKind::Rope, &["q"]),
    LayerSite::qk("k_rope", SiteKind::Rope, &["k"]),
    LayerSite::qk("cache_k", SiteKind::Cache, &["k_rope"]),
    LayerSite::new("cache_v", SiteKind::Cache, &["v"]),
    LayerSite::new("attn", SiteKind::Attention, &["q_rope", "cache_k", "cache_v"]),
    LayerSite::new("attn_out", SiteKind::Projection, &["attn"]).of("o_proj"),
    LayerSite::new("mlp_norm", SiteKind::Norm, &["attn_out", INPUT]),
    LayerSite::new("mlp_gate", SiteKind::Projection, &["mlp_norm"]).of("gate_proj"),
    LayerSite::new("mlp_up", SiteKind::Projection, &["mlp_norm"]).of("up_proj"),
    LayerSite::new("mlp_act", SiteKind::Activation, &["mlp_gate", "mlp_up"]),
    LayerSite::new("mlp_out", SiteKind::Projection, &["mlp_act"]).of("down_proj"),
    LayerSite::new("out", SiteKind::Residual, &["mlp_out", "attn_out", INPUT]),
];

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor};

    use crate::{load, LoadOptions, LoadedModel};

    fn tiny(dtype: DType) -> LoadedModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/models/tiny-llama");
        load(&dir, &LoadOptions { dtype, ..Default::default() }).expect("the tiny fixture loads")
    }

    fn ids(n: usize) -> Vec<u32> {
        let mut x = 12345u64;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                3 + ((x >> 33) % 490) as u32
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    /// A long prompt (prefill attention in several chunks of query rows, decode attention over
    /// several key blocks) gives the logits of the same tokens fed in pieces and one at a time.
    #[test]
    fn a_long_prefill_in_chunks_equals_pieces_and_one_token_steps() {
        for (dtype, n, tol) in [(DType::F32, 700, 1e-4), (DType::F64, 300, 1e-10)] {
            let m = tiny(dtype);
            let ids = ids(n);
            let whole = m.model.forward(&ids, &mut m.model.new_cache(), None).unwrap();
            // Two pieces: the second a prefill at an offset (a causal mask that starts late).
            let mut cache = m.model.new_cache();
            let cut = n / 2 - 7;
            let a = m.model.forward(&ids[..cut], &mut cache, None).unwrap();
            let b = m.model.forward(&ids[cut..], &mut cache, None).unwrap();
            let pieces = Tensor::cat(&[a, b], 0).unwrap();
            assert!(max_diff(&whole, &pieces) < tol, "{dtype:?}: pieces differ by {}", max_diff(&whole, &pieces));
            // A short prefill, then one token a step (reserved, as generation does).
            let mut cache = m.model.new_cache();
            cache.reserve(n).unwrap();
            let mut rows = vec![m.model.forward(&ids[..5], &mut cache, None).unwrap()];
            for &t in &ids[5..] {
                rows.push(m.model.forward(&[t], &mut cache, None).unwrap());
            }
            let steps = Tensor::cat(&rows, 0).unwrap();
            assert!(max_diff(&whole, &steps) < tol, "{dtype:?}: steps differ by {}", max_diff(&whole, &steps));
            assert_eq!(cache.layer_len(0), n);
        }
    }
}
