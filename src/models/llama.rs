//! The Llama-family decoder, bottom-up: RMSNorm, RoPE (both conventions), GQA attention
//! with a causal mask, SwiGLU MLP, block, model. Batch size is 1 and kept implicit:
//! activations are `(seq, hidden)`, per-head tensors `(heads, seq, head_dim)`.
//!
//! Prefill and decode are the same code: [`Llama::forward`] takes any number of new
//! tokens, appends their K/V to the explicit [`KvCache`] and attends over the whole
//! cache. Every intermediate is offered to the optional [`Capture`] under its site name.

use candle_core::{DType, Device, Tensor, D};

use crate::cache::KvCache;
use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::faults::{Fault, Faults};
use crate::layout::QkLayout;
use crate::quant::Linear;
use crate::taps::{tap, Capture};
use crate::weights::{LayerWeights, LlamaWeights};
use crate::sites::{LayerSite, SiteGraph, SiteKind, INPUT};
use super::Family;

pub struct Llama {
    pub cfg: Config,
    pub weights: LlamaWeights,
    pub qk_layout: QkLayout,
    pub dtype: DType,
    /// Injected faults (`crate::faults`); empty in normal use.
    pub faults: Faults,
    device: Device,
}

/// `x @ w.T` for `x (seq, in)`, `w (out, in)`, dense or quantized.
fn linear(x: &Tensor, w: &Linear) -> Result<Tensor> {
    w.forward(x)
}

/// RMSNorm as in transformers' `LlamaRMSNorm`: `w * x / sqrt(mean(x^2) + eps)`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return fast::rms_norm(x, w, eps);
    }
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Numerically stable softmax over the last dimension.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return fast::softmax_last(x);
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// cos/sin tables `(seq, head_dim/2)` for positions `offset..offset+seq`, computed in the
/// model dtype the way transformers' `LlamaRotaryEmbedding` does (inv_freq, then
/// position * inv_freq, then cos/sin).
fn rope_tables(cfg: &Config, theta: f64, offset: usize, seq: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let (cos, sin) = if dtype == DType::F64 {
        let mut c = Vec::with_capacity(seq * half);
        let mut s = Vec::with_capacity(seq * half);
        for p in offset..offset + seq {
            for i in 0..half {
                let inv = 1.0 / theta.powf((2 * i) as f64 / cfg.head_dim as f64);
                let f = p as f64 * inv;
                c.push(f.cos());
                s.push(f.sin());
            }
        }
        (Tensor::from_vec(c, (seq, half), dev)?, Tensor::from_vec(s, (seq, half), dev)?)
    } else {
        let theta = theta as f32;
        let mut c = Vec::with_capacity(seq * half);
        let mut s = Vec::with_capacity(seq * half);
        for p in offset..offset + seq {
            for i in 0..half {
                let inv = 1.0f32 / theta.powf((2 * i) as f32 / cfg.head_dim as f32);
                let f = p as f32 * inv;
                c.push(f.cos());
                s.push(f.sin());
            }
        }
        (Tensor::from_vec(c, (seq, half), dev)?, Tensor::from_vec(s, (seq, half), dev)?)
    };
    Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
}

/// Applies RoPE to `x (heads, seq, head_dim)` with tables `(seq, head_dim/2)`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: QkLayout) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return fast::rope(x, cos, sin, layout);
    }
    let (h, seq, hd) = x.dims3()?;
    match layout {
        QkLayout::HalfSplit => {
            // out = x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1)
            let cos = Tensor::cat(&[cos, cos], D::Minus1)?; // (seq, hd)
            let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
            let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
            let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
            let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
        }
        QkLayout::Interleaved => {
            // pairs (2i, 2i+1): (a, b) -> (a cos - b sin, a sin + b cos)
            let xp = x.reshape((h, seq, hd / 2, 2))?;
            let a = xp.narrow(D::Minus1, 0, 1)?;
            let b = xp.narrow(D::Minus1, 1, 1)?;
            let cos = cos.unsqueeze(D::Minus1)?; // (seq, hd/2, 1)
            let sin = sin.unsqueeze(D::Minus1)?;
            let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
            let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
            Ok(Tensor::cat(&[&ra, &rb], D::Minus1)?.reshape((h, seq, hd))?)
        }
    }
}

/// `(kv_heads, len, hd)` -> `(kv_heads * n_rep, len, hd)`, each KV head repeated for the
/// `n_rep` consecutive query heads it serves (transformers' `repeat_kv`). `tiled` is the
/// `gqa-mapping` fault: the KV heads tiled, so query head h reads KV head h % kv_heads.
fn repeat_kv(x: &Tensor, n_rep: usize, tiled: bool) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    if tiled {
        return Ok(x.repeat((n_rep, 1, 1))?);
    }
    let (kv, len, hd) = x.dims3()?;
    Ok(x.unsqueeze(1)?.broadcast_as((kv, n_rep, len, hd))?.reshape((kv * n_rep, len, hd))?)
}

impl Llama {
    pub fn new(cfg: Config, weights: LlamaWeights, qk_layout: QkLayout, dtype: DType) -> Self {
        Self { cfg, weights, qk_layout, dtype, faults: Faults::none(), device: Device::Cpu }
    }

    /// A fresh, empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    /// Runs `tokens` at positions `cache.offset()..`, appends their K/V to `cache`, and
    /// returns the logits of every position fed, `(seq, vocab)`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, cap: Option<&mut Capture>) -> Result<Tensor> {
        // The whole step runs on a worker of the engine's pool: the serial parts then do not
        // compete for the cores with idle workers spinning for the next parallel matmul.
        crate::threads::pool().install(|| self.forward_on_pool(tokens, cache, cap))
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
        tap(&mut cap, || "embed".into(), &x);

        let (cos, sin) = rope_tables(cfg, self.theta(), offset, seq, self.dtype, &self.device)?;
        let mask = if seq > 1 && !self.faults.has(Fault::CausalMask) { Some(self.causal_mask(seq, offset)?) } else { None };
        for (i, lw) in self.weights.layers.iter().enumerate() {
            x = self.block(i, lw, &x, &cos, &sin, mask.as_ref(), cache, &mut cap)?;
        }
        let x = rms_norm(&x, &self.weights.norm, self.eps())?;
        tap(&mut cap, || "final_norm".into(), &x);
        let logits = linear(&x, &self.weights.lm_head)?; // (seq, vocab)
        tap(&mut cap, || "logits".into(), &logits);
        Ok(logits.narrow(0, seq - n_new, n_new)?)
    }

    /// Runs decoder layer `i` alone (bisect's isolation): `x (seq, hidden)` is the layer's
    /// input, `kv` the layer's cache before this step, `(kv_heads, cached, head_dim)` each,
    /// in this model's Q/K layout (`None`: an empty cache). Every site of the layer is
    /// offered to `cap`; returns the layer's output.
    pub fn isolate_layer(&self, i: usize, x: &Tensor, kv: Option<(Tensor, Tensor)>, cap: &mut Capture) -> Result<Tensor> {
        let lw = self.weights.layers.get(i).ok_or_else(|| {
            EngineError::Input(format!("layer {i} does not exist (the model has {})", self.cfg.num_layers))
        })?;
        crate::threads::pool().install(|| {
            let mut cache = KvCache::new(self.cfg.num_layers);
            let offset = kv.as_ref().map(|(k, _)| k.dims()[1]).unwrap_or(0);
            if let Some((k, v)) = kv {
                cache.set_layer(i, k, v);
            }
            let seq = x.dims2()?.0;
            let (cos, sin) = rope_tables(&self.cfg, self.theta(), offset, seq, self.dtype, &self.device)?;
            let mask = if seq > 1 && !self.faults.has(Fault::CausalMask) { Some(self.causal_mask(seq, offset)?) } else { None };
            let x = x.to_dtype(self.dtype)?;
            self.block(i, lw, &x, &cos, &sin, mask.as_ref(), &mut cache, &mut Some(cap))
        })
    }

    /// The RoPE base in use (the `rope-theta` fault replaces it with the 10000 default, or
    /// with 100000 when the config already says 10000).
    fn theta(&self) -> f64 {
        match self.faults.has(Fault::RopeTheta) {
            false => self.cfg.rope_theta,
            true if self.cfg.rope_theta == 10_000.0 => 100_000.0,
            true => 10_000.0,
        }
    }

    /// The RMSNorm epsilon in use (the `rms-eps` fault replaces it).
    fn eps(&self) -> f64 {
        if self.faults.has(Fault::RmsEps) {
            1e-2
        } else {
            self.cfg.rms_norm_eps
        }
    }

    /// `(seq, offset+seq)`: 0 where query `i` (position offset+i) may see key `j`, -inf after.
    fn causal_mask(&self, seq: usize, offset: usize) -> Result<Tensor> {
        let total = offset + seq;
        let m: Vec<f32> = (0..seq)
            .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Ok(Tensor::from_vec(m, (seq, total), &self.device)?.to_dtype(self.dtype)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        i: usize,
        lw: &LayerWeights,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
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
        let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]); // (seq, nh*hd), (seq, nkv*hd) x2
        tap(cap, || format!("layers.{i}.q"), q);
        tap(cap, || format!("layers.{i}.k"), k);
        tap(cap, || format!("layers.{i}.v"), v);
        let q = q.reshape((seq, nh, hd))?.transpose(0, 1)?.contiguous()?; // (nh, seq, hd)
        let k = k.reshape((seq, nkv, hd))?.transpose(0, 1)?.contiguous()?; // (nkv, seq, hd)
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

        let stale = self.faults.layer(Fault::StaleCache) == Some(i) && cache.layer_len(i) > 0;
        let (k_all, v_all) = if stale {
            cache.layer(i).cloned().expect("checked non-empty") // the fault: not updated
        } else {
            cache.update_and_fetch(i, &k, &v)? // (nkv, total, hd)
        };
        tap(cap, || format!("layers.{i}.cache_k"), &k_all);
        tap(cap, || format!("layers.{i}.cache_v"), &v_all);
        let scale = 1.0 / (hd as f64).sqrt();
        let n_rep = cfg.n_rep();
        let total = k_all.dims()[1];
        let attn = if self.faults.has(Fault::GqaMapping) {
            // The fault's path: KV heads materialized per query head, in the wrong order.
            let k_all = repeat_kv(&k_all, n_rep, true)?; // (nh, total, hd)
            let v_all = repeat_kv(&v_all, n_rep, true)?;
            let scores = (q.matmul(&k_all.t()?)? * scale)?; // (nh, seq, total)
            let scores = match mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            softmax_last(&scores)?.matmul(&v_all)? // (nh, seq, hd)
        } else if seq == 1 && mask.is_none() && q.dtype() == DType::F32 {
            // A decode step: one query row per head, in one pass (no gemm dispatch).
            fast::attention_one_row(&q, &k_all, &v_all, n_rep, scale)?
        } else {
            // Grouped-query attention without copying K/V per query head: the n_rep query
            // heads of KV head g are consecutive, so q regroups as (nkv, n_rep*seq, hd) and
            // multiplies that KV head's cache directly (transformers' repeat_kv, unmaterialized).
            let qg = q.reshape((nkv, n_rep * seq, hd))?;
            let scores = (qg.matmul(&k_all.t()?)? * scale)?; // (nkv, n_rep*seq, total)
            let scores = match mask {
                Some(m) => scores.reshape((nkv, n_rep, seq, total))?.broadcast_add(m)?.reshape((nkv, n_rep * seq, total))?,
                None => scores,
            };
            softmax_last(&scores)?.matmul(&v_all)?.reshape((nh, seq, hd))? // (nh, seq, hd)
        };
        let attn = attn.transpose(0, 1)?.contiguous()?.reshape((seq, nh * hd))?;
        tap(cap, || format!("layers.{i}.attn"), &attn);
        let attn_out = linear(&attn, &lw.wo)?;
        tap(cap, || format!("layers.{i}.attn_out"), &attn_out);
        let x = (x + attn_out)?;

        // --- MLP ---
        let h = rms_norm(&x, &lw.mlp_norm, self.eps())?;
        tap(cap, || format!("layers.{i}.mlp_norm"), &h);
        let gu = Linear::forward_group(&[&lw.w_gate, &lw.w_up], &h)?;
        let (gate, up) = (&gu[0], &gu[1]);
        tap(cap, || format!("layers.{i}.mlp_gate"), gate);
        tap(cap, || format!("layers.{i}.mlp_up"), up);
        let act = if gate.dtype() == DType::F32 { fast::silu_mul(gate, up)? } else { (gate.silu()? * up)? };
        tap(cap, || format!("layers.{i}.mlp_act"), &act);
        let mlp_out = linear(&act, &lw.w_down)?;
        tap(cap, || format!("layers.{i}.mlp_out"), &mlp_out);
        let out = (x + mlp_out)?;
        tap(cap, || format!("layers.{i}.out"), &out);
        Ok(out)
    }

    /// Site names this engine captures, in forward order.
    pub fn site_names(&self) -> Vec<String> {
        SiteGraph::new(self.cfg.num_layers, LAYER_SITES).names()
    }
}

/// The family's registration.
pub const FAMILY: Family = Family { name: "llama", model_types: &["llama"], gguf_archs: &["llama"], layer_sites: LAYER_SITES };

/// Per-layer sites in forward order, with what each reads (the dataflow bisect follows).
pub const LAYER_SITES: &[LayerSite] = &[
    LayerSite::new("attn_norm", SiteKind::Norm, &[INPUT]),
    LayerSite::qk("q", SiteKind::Projection, &["attn_norm"]),
    LayerSite::qk("k", SiteKind::Projection, &["attn_norm"]),
    LayerSite::new("v", SiteKind::Projection, &["attn_norm"]),
    LayerSite::qk("q_rope", SiteKind::Rope, &["q"]),
    LayerSite::qk("k_rope", SiteKind::Rope, &["k"]),
    LayerSite::qk("cache_k", SiteKind::Cache, &["k_rope"]),
    LayerSite::new("cache_v", SiteKind::Cache, &["v"]),
    LayerSite::new("attn", SiteKind::Attention, &["q_rope", "cache_k", "cache_v"]),
    LayerSite::new("attn_out", SiteKind::Projection, &["attn"]),
    LayerSite::new("mlp_norm", SiteKind::Norm, &["attn_out", INPUT]),
    LayerSite::new("mlp_gate", SiteKind::Projection, &["mlp_norm"]),
    LayerSite::new("mlp_up", SiteKind::Projection, &["mlp_norm"]),
    LayerSite::new("mlp_act", SiteKind::Activation, &["mlp_gate", "mlp_up"]),
    LayerSite::new("mlp_out", SiteKind::Projection, &["mlp_act"]),
    LayerSite::new("out", SiteKind::Residual, &["mlp_out", "attn_out", INPUT]),
];

/// One-pass f32 versions of the small ops above (each replaces a chain of candle ops and
/// their allocations, which dominate a decode step's serial time). Same formulas; the f64
/// path keeps the candle chains.
mod fast {
    use candle_core::{Tensor, D};

    use crate::error::Result;
    use crate::layout::QkLayout;

    fn data(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let n = x.dim(D::Minus1)?;
        let (xs, ws) = (data(x)?, data(w)?);
        let mut out = Vec::with_capacity(xs.len());
        for row in xs.chunks(n) {
            // As ggml_compute_forward_rms_norm_f32: f32 squares summed in f64, the mean
            // rounded to f32, scale = 1/sqrtf(mean + eps).
            let ms = (row.iter().map(|&v| (v * v) as f64).sum::<f64>() / n as f64) as f32;
            let inv = 1.0 / (ms + eps as f32).sqrt();
            out.extend(row.iter().zip(&ws).map(|(&v, &g)| v * inv * g));
        }
        Ok(Tensor::from_vec(out, x.shape(), x.device())?)
    }

    pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
        let n = x.dim(D::Minus1)?;
        let mut v = data(x)?;
        for row in v.chunks_mut(n) {
            softmax_row(row);
        }
        Ok(Tensor::from_vec(v, x.shape(), x.device())?)
    }

    /// As ggml's `ggml_vec_soft_max_f32`: exp(x - max) summed in f64, then scaled by the
    /// reciprocal of the sum.
    fn softmax_row(row: &mut [f32]) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f64;
        for e in row.iter_mut() {
            *e = (*e - m).exp();
            sum += *e as f64;
        }
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|e| *e *= inv);
    }

    pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (g, u) = (data(gate)?, data(up)?);
        let out: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| a / (1.0 + (-a).exp()) * b).collect();
        Ok(Tensor::from_vec(out, gate.shape(), gate.device())?)
    }

    /// Attention of one query position: `q (nh, 1, hd)`, `k`, `v (nkv, total, hd)`; query
    /// head h reads KV head h / n_rep. Scores, softmax and the weighted sum of V per head.
    pub fn attention_one_row(q: &Tensor, k: &Tensor, v: &Tensor, n_rep: usize, scale: f64) -> Result<Tensor> {
        let (nh, _, hd) = q.dims3()?;
        let (_, total, _) = k.dims3()?;
        let (qs, ks, vs) = (data(q)?, data(k)?, data(v)?);
        let scale = scale as f32;
        let mut out = vec![0f32; nh * hd];
        let mut p = vec![0f32; total];
        for h in 0..nh {
            let g = h / n_rep;
            let qh = &qs[h * hd..(h + 1) * hd];
            let kg = &ks[g * total * hd..(g + 1) * total * hd];
            let vg = &vs[g * total * hd..(g + 1) * total * hd];
            for (t, pt) in p.iter_mut().enumerate() {
                let kt = &kg[t * hd..(t + 1) * hd];
                *pt = qh.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            softmax_row(&mut p);
            let o = &mut out[h * hd..(h + 1) * hd];
            for (t, &w) in p.iter().enumerate() {
                for (od, &vd) in o.iter_mut().zip(&vg[t * hd..(t + 1) * hd]) {
                    *od += w * vd;
                }
            }
        }
        Ok(Tensor::from_vec(out, (nh, 1, hd), q.device())?)
    }

    /// `x (heads, seq, hd)`, tables `(seq, hd/2)`.
    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: QkLayout) -> Result<Tensor> {
        let (h, seq, hd) = x.dims3()?;
        let half = hd / 2;
        let (xs, c, s) = (data(x)?, data(cos)?, data(sin)?);
        let mut out = vec![0f32; xs.len()];
        for head in 0..h {
            for p in 0..seq {
                let base = (head * seq + p) * hd;
                let (row, dst) = (&xs[base..base + hd], &mut out[base..base + hd]);
                for i in 0..half {
                    let (cc, ss) = (c[p * half + i], s[p * half + i]);
                    let (a, b) = match layout {
                        QkLayout::HalfSplit => (i, i + half),
                        QkLayout::Interleaved => (2 * i, 2 * i + 1),
                    };
                    dst[a] = row[a] * cc - row[b] * ss;
                    dst[b] = row[b] * cc + row[a] * ss;
                }
            }
        }
        Ok(Tensor::from_vec(out, (h, seq, hd), x.device())?)
    }
}
