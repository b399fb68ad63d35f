//! The shared building blocks every family is made of: linear layers, norms, RoPE (both
//! conventions), grouped-query attention (the batched path and the single-row decode path),
//! softmax, the causal mask and gated activations. Batch size is 1 and kept implicit:
//! activations are `(seq, hidden)`, per-head tensors `(heads, seq, head_dim)`.
//!
//! Each op has an f32 fast path (one pass over the data, in [`fast`]) beside the chain of
//! candle ops that the f64 oracle runs: same formulas, and the engine tests hold them to each
//! other. Faults that live in these ops are plain options of their arguments (a
//! [`HeadMapping`], an epsilon, a RoPE base), never another code path.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::layout::QkLayout;
use crate::plan::RopePlan;
use crate::quant::Linear;

/// `x @ w.T` for `x (seq, in)`, `w (out, in)`, dense or quantized.
pub fn linear(x: &Tensor, w: &Linear) -> Result<Tensor> {
    w.forward(x)
}

/// RMSNorm as in transformers' `LlamaRMSNorm`: `w * x / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return fast::rms_norm(x, w, eps);
    }
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Numerically stable softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return fast::softmax_last(x);
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// `silu(gate) * up` (SwiGLU's activation).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() == DType::F32 {
        return fast::silu_mul(gate, up);
    }
    Ok((gate.silu()? * up)?)
}

/// cos/sin tables `(seq, dims/2)` for positions `offset..offset+seq` of a layer's RoPE
/// (`rope`: base, rotated width, scaling), computed in the model dtype the way transformers'
/// rotary embeddings do: the frequencies ([`RopePlan::frequencies`], for a call whose largest
/// position is `offset + seq - 1`), then position x frequency, then cos/sin, multiplied by the
/// scaling's attention factor.
pub fn rope_tables(rope: &RopePlan, offset: usize, seq: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = rope.dims / 2;
    let (inv, attention_factor) = rope.frequencies(offset + seq, dtype != DType::F64);
    let (cos, sin) = if dtype == DType::F64 {
        let mut c = Vec::with_capacity(seq * half);
        let mut s = Vec::with_capacity(seq * half);
        for p in offset..offset + seq {
            for inv in &inv {
                let f = p as f64 * inv;
                c.push(f.cos() * attention_factor);
                s.push(f.sin() * attention_factor);
            }
        }
        (Tensor::from_vec(c, (seq, half), dev)?, Tensor::from_vec(s, (seq, half), dev)?)
    } else {
        let inv: Vec<f32> = inv.iter().map(|&f| f as f32).collect();
        let a = attention_factor as f32;
        let mut c = Vec::with_capacity(seq * half);
        let mut s = Vec::with_capacity(seq * half);
        for p in offset..offset + seq {
            for inv in &inv {
                let f = p as f32 * inv;
                // transformers: `emb.cos() * attention_scaling` (an unscaled RoPE multiplies by 1).
                c.push(if a == 1.0 { f.cos() } else { f.cos() * a });
                s.push(if a == 1.0 { f.sin() } else { f.sin() * a });
            }
        }
        (Tensor::from_vec(c, (seq, half), dev)?, Tensor::from_vec(s, (seq, half), dev)?)
    };
    Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
}

/// Applies RoPE to `x (heads, seq, head_dim)` with tables `(seq, head_dim/2)`, pairing
/// dimensions as `layout` says (half-split: `i, i + hd/2`; interleaved: `2i, 2i+1`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: QkLayout) -> Result<Tensor> {
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

/// `(seq, offset+seq)`: 0 where query `i` (position offset+i) may see key `j`, -inf after.
pub fn causal_mask(seq: usize, offset: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let total = offset + seq;
    let m: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (seq, total), dev)?.to_dtype(dtype)?)
}

/// The mask of a sliding-window layer over an append-only cache, `(seq, offset + seq)`:
/// position `offset + i` sees `offset + i - w + 1 ..= offset + i` (`w` positions, its own
/// included), as transformers' sliding-window layers.
pub fn window_mask(seq: usize, offset: usize, w: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let total = offset + seq;
    let m: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > offset + i || j + w <= offset + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (seq, total), dev)?.to_dtype(dtype)?)
}

/// Which KV head a query head reads in grouped-query attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMapping {
    /// Query head `h` reads KV head `h / n_rep`: the `n_rep` consecutive query heads of a
    /// group share it (transformers' `repeat_kv`).
    Grouped,
    /// Query head `h` reads KV head `h % n_kv`: the KV heads tiled (the `gqa-mapping` fault).
    Tiled,
}

impl HeadMapping {
    pub fn kv_head(&self, h: usize, n_rep: usize, n_kv: usize) -> usize {
        match self {
            HeadMapping::Grouped => h / n_rep,
            HeadMapping::Tiled => h % n_kv,
        }
    }

    /// The query heads in the order of the KV head they read (`None` when that is the
    /// natural order), and the inverse permutation.
    fn order(&self, n_heads: usize, n_kv: usize) -> Option<(Vec<u32>, Vec<u32>)> {
        let n_rep = n_heads / n_kv;
        if *self == HeadMapping::Grouped || n_rep == 1 {
            return None;
        }
        let mut order: Vec<u32> = (0..n_heads as u32).collect();
        order.sort_by_key(|&h| (self.kv_head(h as usize, n_rep, n_kv), h));
        let mut inverse = vec![0u32; n_heads];
        for (pos, &h) in order.iter().enumerate() {
            inverse[h as usize] = pos as u32;
        }
        Some((order, inverse))
    }
}

/// Scaled dot-product attention of `q (nh, seq, hd)` over a layer's whole cache
/// `k`, `v (nkv, total, hd)`, with an optional additive mask `(seq, total)`; returns
/// `(nh, seq, hd)`. Query head `h` reads KV head `mapping.kv_head(h)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64, mapping: HeadMapping) -> Result<Tensor> {
    let (nh, seq, hd) = q.dims3()?;
    let (nkv, total, _) = k.dims3()?;
    let n_rep = nh / nkv;
    if seq == 1 && mask.is_none() && q.dtype() == DType::F32 {
        // A decode step: one query row per head, in one pass (no gemm dispatch).
        return fast::attention_one_row(q, k, v, scale, |h| mapping.kv_head(h, n_rep, nkv));
    }
    // Grouped-query attention without copying K/V per query head: the query heads of KV
    // head g, put next to each other, regroup as (nkv, n_rep*seq, hd) and multiply that KV
    // head's cache directly (transformers' repeat_kv, unmaterialized).
    let order = mapping.order(nh, nkv);
    let q = match &order {
        Some((o, _)) => q.index_select(&Tensor::new(o.as_slice(), q.device())?, 0)?,
        None => q.clone(),
    };
    let qg = q.reshape((nkv, n_rep * seq, hd))?;
    let scores = (qg.matmul(&k.t()?)? * scale)?; // (nkv, n_rep*seq, total)
    let scores = match mask {
        Some(m) => scores.reshape((nkv, n_rep, seq, total))?.broadcast_add(m)?.reshape((nkv, n_rep * seq, total))?,
        None => scores,
    };
    let out = softmax_last(&scores)?.matmul(v)?.reshape((nh, seq, hd))?; // (nh, seq, hd)
    Ok(match &order {
        Some((_, inv)) => out.index_select(&Tensor::new(inv.as_slice(), out.device())?, 0)?,
        None => out,
    })
}

/// One-pass f32 versions of the ops above (each replaces a chain of candle ops and their
/// allocations, which dominate a decode step's serial time). Same formulas; the f64 path
/// keeps the candle chains.
pub mod fast {
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
    /// head h reads KV head `kv_head(h)`. Scores, softmax and the weighted sum of V per head.
    pub fn attention_one_row(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, kv_head: impl Fn(usize) -> usize) -> Result<Tensor> {
        let (nh, _, hd) = q.dims3()?;
        let (_, total, _) = k.dims3()?;
        let (qs, ks, vs) = (data(q)?, data(k)?, data(v)?);
        let scale = scale as f32;
        let mut out = vec![0f32; nh * hd];
        let mut p = vec![0f32; total];
        for h in 0..nh {
            let g = kv_head(h);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_mask_sees_the_last_w_positions_and_a_window_wider_than_the_sequence_is_causal() {
        let seen = |m: Tensor| -> Vec<Vec<bool>> {
            m.to_vec2::<f32>().unwrap().into_iter().map(|r| r.into_iter().map(|x| x == 0.0).collect()).collect()
        };
        // 3 new positions after 2 cached, window 2: position p sees p-1 and p.
        let w = seen(window_mask(3, 2, 2, DType::F32, &Device::Cpu).unwrap());
        assert_eq!(w, vec![vec![false, true, true, false, false], vec![false, false, true, true, false], vec![false, false, false, true, true]]);
        let wide = window_mask(4, 1, 100, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(seen(wide), seen(causal_mask(4, 1, DType::F32, &Device::Cpu).unwrap()));
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Attention with K/V materialized per query head (`repeat_kv`), the textbook form.
    fn materialized(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64, mapping: HeadMapping) -> Tensor {
        let (nh, _, _) = q.dims3().unwrap();
        let nkv = k.dims3().unwrap().0;
        let idx: Vec<u32> = (0..nh).map(|h| mapping.kv_head(h, nh / nkv, nkv) as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
        let (k, v) = (k.index_select(&idx, 0).unwrap(), v.index_select(&idx, 0).unwrap());
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let s = match mask {
            Some(m) => s.broadcast_add(m).unwrap(),
            None => s,
        };
        softmax_last(&s).unwrap().matmul(&v).unwrap()
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
    }

    #[test]
    fn grouped_and_decode_attention_match_the_materialized_form_for_both_mappings() {
        let (nh, nkv, hd, total) = (4, 2, 8, 5);
        let (k, v) = (rand(&[nkv, total, hd], 1), rand(&[nkv, total, hd], 2));
        for mapping in [HeadMapping::Grouped, HeadMapping::Tiled] {
            // Prefill: seq = total, causal mask, the batched path.
            let q = rand(&[nh, total, hd], 3);
            let mask = causal_mask(total, 0, DType::F32, &Device::Cpu).unwrap();
            let got = attention(&q, &k, &v, Some(&mask), 0.35, mapping).unwrap();
            assert!(rel(&got, &materialized(&q, &k, &v, Some(&mask), 0.35, mapping)) < 1e-6, "{mapping:?} prefill");
            // Decode: one row, the single-row path.
            let q1 = rand(&[nh, 1, hd], 4);
            let got = attention(&q1, &k, &v, None, 0.35, mapping).unwrap();
            assert!(rel(&got, &materialized(&q1, &k, &v, None, 0.35, mapping)) < 1e-6, "{mapping:?} decode");
        }
        // The two mappings differ when heads are shared (the gqa-mapping fault shows).
        let q1 = rand(&[nh, 1, hd], 4);
        let a = attention(&q1, &k, &v, None, 0.35, HeadMapping::Grouped).unwrap();
        let b = attention(&q1, &k, &v, None, 0.35, HeadMapping::Tiled).unwrap();
        assert!(rel(&a, &b) > 1e-2);
    }

    #[test]
    fn f32_fast_paths_match_the_f64_candle_chains() {
        let x = rand(&[3, 8], 5);
        let w = rand(&[8], 6);
        let (cos, sin) = rope_tables(&RopePlan::unscaled(10_000.0, 8), 2, 3, DType::F32, &Device::Cpu).unwrap();
        let xh = rand(&[2, 3, 8], 7);
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(rel(&rms_norm(&x, &w, 1e-5).unwrap(), &f32_of(&rms_norm(&f64_of(&x), &f64_of(&w), 1e-5).unwrap())) < 1e-6);
        assert!(rel(&softmax_last(&x).unwrap(), &f32_of(&softmax_last(&f64_of(&x)).unwrap())) < 1e-6);
        assert!(rel(&silu_mul(&x, &x).unwrap(), &f32_of(&silu_mul(&f64_of(&x), &f64_of(&x)).unwrap())) < 1e-6);
        for layout in [QkLayout::HalfSplit, QkLayout::Interleaved] {
            let fast = rope(&xh, &cos, &sin, layout).unwrap();
            let slow = rope(&f64_of(&xh), &f64_of(&cos), &f64_of(&sin), layout).unwrap();
            assert!(rel(&fast, &f32_of(&slow)) < 1e-6, "{layout:?}");
        }
    }
}
