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
use crate::layout::QkLayout;
use crate::quant::Linear;
use crate::taps::{tap, Capture};
use crate::weights::{LayerWeights, LlamaWeights};

pub struct Llama {
    pub cfg: Config,
    pub weights: LlamaWeights,
    pub qk_layout: QkLayout,
    pub dtype: DType,
    device: Device,
}

/// `x @ w.T` for `x (seq, in)`, `w (out, in)`, dense or quantized.
fn linear(x: &Tensor, w: &Linear) -> Result<Tensor> {
    w.forward(x)
}

/// RMSNorm as in transformers' `LlamaRMSNorm`: `w * x / sqrt(mean(x^2) + eps)`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Numerically stable softmax over the last dimension.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// cos/sin tables `(seq, head_dim/2)` for positions `offset..offset+seq`, computed in the
/// model dtype the way transformers' `LlamaRotaryEmbedding` does (inv_freq, then
/// position * inv_freq, then cos/sin).
fn rope_tables(cfg: &Config, offset: usize, seq: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let (cos, sin) = if dtype == DType::F64 {
        let mut c = Vec::with_capacity(seq * half);
        let mut s = Vec::with_capacity(seq * half);
        for p in offset..offset + seq {
            for i in 0..half {
                let inv = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64);
                let f = p as f64 * inv;
                c.push(f.cos());
                s.push(f.sin());
            }
        }
        (Tensor::from_vec(c, (seq, half), dev)?, Tensor::from_vec(s, (seq, half), dev)?)
    } else {
        let theta = cfg.rope_theta as f32;
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
/// `n_rep` consecutive query heads it serves (transformers' `repeat_kv`).
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (kv, len, hd) = x.dims3()?;
    Ok(x.unsqueeze(1)?.broadcast_as((kv, n_rep, len, hd))?.reshape((kv * n_rep, len, hd))?)
}

impl Llama {
    pub fn new(cfg: Config, weights: LlamaWeights, qk_layout: QkLayout, dtype: DType) -> Self {
        Self { cfg, weights, qk_layout, dtype, device: Device::Cpu }
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
        let seq = tokens.len();
        let offset = cache.offset();
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.weights.embed.index_select(&ids, 0)?; // (seq, hidden)
        tap(&mut cap, || "embed".into(), &x);

        let (cos, sin) = rope_tables(cfg, offset, seq, self.dtype, &self.device)?;
        let mask = if seq > 1 { Some(self.causal_mask(seq, offset)?) } else { None };
        for (i, lw) in self.weights.layers.iter().enumerate() {
            x = self.block(i, lw, &x, &cos, &sin, mask.as_ref(), cache, &mut cap)?;
        }
        let x = rms_norm(&x, &self.weights.norm, cfg.rms_norm_eps)?;
        tap(&mut cap, || "final_norm".into(), &x);
        let logits = linear(&x, &self.weights.lm_head)?; // (seq, vocab)
        tap(&mut cap, || "logits".into(), &logits);
        Ok(logits)
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
        let h = rms_norm(x, &lw.attn_norm, cfg.rms_norm_eps)?;
        tap(cap, || format!("layers.{i}.attn_norm"), &h);
        let qkv = Linear::forward_group(&[&lw.wq, &lw.wk, &lw.wv], &h)?;
        let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]); // (seq, nh*hd), (seq, nkv*hd) x2
        tap(cap, || format!("layers.{i}.q"), q);
        tap(cap, || format!("layers.{i}.k"), k);
        tap(cap, || format!("layers.{i}.v"), v);
        let q = q.reshape((seq, nh, hd))?.transpose(0, 1)?.contiguous()?; // (nh, seq, hd)
        let k = k.reshape((seq, nkv, hd))?.transpose(0, 1)?.contiguous()?; // (nkv, seq, hd)
        let v = v.reshape((seq, nkv, hd))?.transpose(0, 1)?.contiguous()?;
        let q = rope(&q, cos, sin, self.qk_layout)?;
        let k = rope(&k, cos, sin, self.qk_layout)?;
        tap(cap, || format!("layers.{i}.q_rope"), &q);
        tap(cap, || format!("layers.{i}.k_rope"), &k);

        let (k_all, v_all) = cache.update_and_fetch(i, &k, &v)?; // (nkv, total, hd)
        tap(cap, || format!("layers.{i}.cache_k"), &k_all);
        tap(cap, || format!("layers.{i}.cache_v"), &v_all);
        let k_all = repeat_kv(&k_all, cfg.n_rep())?; // (nh, total, hd)
        let v_all = repeat_kv(&v_all, cfg.n_rep())?;

        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k_all.t()?)? * scale)?; // (nh, seq, total)
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last(&scores)?;
        let attn = probs.matmul(&v_all)?; // (nh, seq, hd)
        let attn = attn.transpose(0, 1)?.contiguous()?.reshape((seq, nh * hd))?;
        tap(cap, || format!("layers.{i}.attn"), &attn);
        let attn_out = linear(&attn, &lw.wo)?;
        tap(cap, || format!("layers.{i}.attn_out"), &attn_out);
        let x = (x + attn_out)?;

        // --- MLP ---
        let h = rms_norm(&x, &lw.mlp_norm, cfg.rms_norm_eps)?;
        tap(cap, || format!("layers.{i}.mlp_norm"), &h);
        let gu = Linear::forward_group(&[&lw.w_gate, &lw.w_up], &h)?;
        let (gate, up) = (&gu[0], &gu[1]);
        tap(cap, || format!("layers.{i}.mlp_gate"), gate);
        tap(cap, || format!("layers.{i}.mlp_up"), up);
        let act = (gate.silu()? * up)?;
        tap(cap, || format!("layers.{i}.mlp_act"), &act);
        let mlp_out = linear(&act, &lw.w_down)?;
        tap(cap, || format!("layers.{i}.mlp_out"), &mlp_out);
        let out = (x + mlp_out)?;
        tap(cap, || format!("layers.{i}.out"), &out);
        Ok(out)
    }

    /// Site names this engine captures, in forward order (DESIGN.md's table, no router).
    pub fn site_names(&self) -> Vec<String> {
        let mut v = vec!["embed".to_string()];
        for i in 0..self.cfg.num_layers {
            for s in LAYER_SITES {
                v.push(format!("layers.{i}.{s}"));
            }
        }
        v.push("final_norm".into());
        v.push("logits".into());
        v
    }
}

/// Per-layer sites in forward order.
pub const LAYER_SITES: [&str; 16] = [
    "attn_norm", "q", "k", "v", "q_rope", "k_rope", "cache_k", "cache_v", "attn", "attn_out", "mlp_norm",
    "mlp_gate", "mlp_up", "mlp_act", "mlp_out", "out",
];
