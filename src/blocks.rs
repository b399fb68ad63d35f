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
    Mask::Causal { offset }.block(0, seq, 0, offset + seq, dtype, dev)
}

/// The mask of a sliding-window layer over an append-only cache, `(seq, offset + seq)`:
/// position `offset + i` sees `offset + i - w + 1 ..= offset + i` (`w` positions, its own
/// included), as transformers' sliding-window layers.
pub fn window_mask(seq: usize, offset: usize, w: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Mask::Window { offset, w }.block(0, seq, 0, offset + seq, dtype, dev)
}

/// Which keys each query row of an attention call sees, without materializing the mask:
/// query row `i` stands at `offset + i` in the coordinates of the key columns (key column `j`
/// is the `j`-th position the call attends over). [`attention`] builds the additive mask of
/// the rows it is computing, a chunk at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// Every key is visible (a one-token step of a global layer; the `causal-mask` fault).
    None,
    /// Row `i` sees columns `0 ..= offset + i`.
    Causal { offset: usize },
    /// Row `i` sees columns `offset + i + 1 - w ..= offset + i` (`w` of them, its own
    /// included).
    Window { offset: usize, w: usize },
}

impl Mask {
    /// The same mask with the key columns starting at position `first` (a cache that no longer
    /// holds the positions before it): `offset` counted from there.
    pub fn from_key(self, first: usize) -> Mask {
        match self {
            Mask::None => Mask::None,
            Mask::Causal { offset } => Mask::Causal { offset: offset.saturating_sub(first) },
            Mask::Window { offset, w } => Mask::Window { offset: offset.saturating_sub(first), w },
        }
    }

    /// The columns of `0..total` that row `i` sees.
    pub fn visible(&self, i: usize, total: usize) -> std::ops::Range<usize> {
        match *self {
            Mask::None => 0..total,
            Mask::Causal { offset } => 0..(offset + i + 1).min(total),
            Mask::Window { offset, w } => (offset + i + 1).saturating_sub(w).min(total)..(offset + i + 1).min(total),
        }
    }

    /// The additive mask `(rows, cols)` of rows `r0..r0 + rows` over columns
    /// `c0..c0 + cols`: 0 where visible, -inf elsewhere.
    pub fn block(&self, r0: usize, rows: usize, c0: usize, cols: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
        let total = c0 + cols;
        let mut m = vec![f32::NEG_INFINITY; rows * cols];
        for (i, row) in m.chunks_mut(cols.max(1)).take(rows).enumerate() {
            let seen = self.visible(r0 + i, total);
            row[seen.start.max(c0) - c0..seen.end.max(c0) - c0].fill(0.0);
        }
        Ok(Tensor::from_vec(m, (rows, cols), dev)?.to_dtype(dtype)?)
    }
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

/// How many query rows of a prefill are computed at once: the scores of a chunk,
/// `(heads, rows, total)`, stay near `CHUNK_ELEMS` elements (4M: 16 MB in f32), whatever the
/// context, between 16 and 256 rows.
const CHUNK_ELEMS: usize = 1 << 22;

fn chunk_rows(nh: usize, total: usize) -> usize {
    (CHUNK_ELEMS / (nh * total).max(1)).clamp(16, 256)
}

/// Scaled dot-product attention of `q (nh, seq, hd)` over a layer's whole cache
/// `k`, `v (nkv, total, hd)`, query row `i` seeing the keys `mask` says; returns
/// `(nh, seq, hd)`. Query head `h` reads KV head `mapping.kv_head(h)`.
///
/// `k`, `v` may be stored in another dtype than `q` (an f16 cache, [`crate::KvDtype`]): a
/// one-row f32 step reads them in place, converting each element as it is read; a longer step
/// converts the key columns a chunk of rows sees.
///
/// A one-row step (decode) reads the cache in place ([`fast::attention_one_row`] in f32). A
/// longer step runs its query rows in chunks: each chunk multiplies only the key columns its
/// rows can see and masks them with its own block of the mask ([`Mask::block`]), so neither a
/// `(seq, total)` mask nor a `(heads, seq, total)` score tensor is ever built.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask, scale: f64, mapping: HeadMapping) -> Result<Tensor> {
    let (nh, seq, _) = q.dims3()?;
    let (nkv, total, _) = k.dims3()?;
    let n_rep = nh / nkv;
    if seq == 1 && q.dtype() == DType::F32 {
        // A decode step: one query row per head, in one pass over the visible keys.
        let cols = mask.visible(0, total);
        return fast::attention_one_row(q, k, v, cols, scale, |h| mapping.kv_head(h, n_rep, nkv));
    }
    attention_chunked(q, k, v, mask, scale, mapping, chunk_rows(nh, total))
}

/// [`attention`]'s batched path, `rows` query rows at a time.
fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask, scale: f64, mapping: HeadMapping, rows: usize) -> Result<Tensor> {
    let (nh, seq, hd) = q.dims3()?;
    let (nkv, total, _) = k.dims3()?;
    let (n_rep, rows) = (nh / nkv, rows.max(1));
    // Grouped-query attention without copying K/V per query head: the query heads of KV
    // head g, put next to each other, regroup as (nkv, n_rep*rows, hd) and multiply that KV
    // head's cache directly (transformers' repeat_kv, unmaterialized).
    let order = mapping.order(nh, nkv);
    let q = match &order {
        Some((o, _)) => q.index_select(&Tensor::new(o.as_slice(), q.device())?, 0)?,
        None => q.clone(),
    };
    let mut outs = Vec::with_capacity(seq.div_ceil(rows));
    for r0 in (0..seq).step_by(rows) {
        let c = rows.min(seq - r0);
        // The key columns some row of the chunk sees (each row's range starts and ends no
        // earlier than the row before's).
        let (first, last) = (mask.visible(r0, total), mask.visible(r0 + c - 1, total));
        let (lo, hi) = (first.start.min(last.start), first.end.max(last.end));
        let (kc, vc) = (k.narrow(1, lo, hi - lo)?, v.narrow(1, lo, hi - lo)?);
        let (kc, vc) = match kc.dtype() == q.dtype() {
            true => (kc, vc),
            false => (kc.to_dtype(q.dtype())?, vc.to_dtype(q.dtype())?),
        };
        let qc = if c == seq { q.clone() } else { q.narrow(1, r0, c)?.contiguous()? };
        let qg = qc.reshape((nkv, n_rep * c, hd))?;
        let scores = qg.matmul(&kc.t()?)?; // (nkv, n_rep*c, hi-lo), unscaled
        let p = if scores.dtype() == DType::F32 {
            fast::masked_softmax(&scores, scale, c, |i| {
                let s = mask.visible(r0 + i, total);
                s.start.max(lo) - lo..s.end.max(lo) - lo
            })?
        } else {
            let scores = (scores * scale)?;
            let scores = match mask {
                Mask::None => scores,
                m => {
                    let b = m.block(r0, c, lo, hi - lo, scores.dtype(), scores.device())?;
                    scores.reshape((nkv, n_rep, c, hi - lo))?.broadcast_add(&b)?.reshape((nkv, n_rep * c, hi - lo))?
                }
            };
            softmax_last(&scores)?
        };
        outs.push(p.matmul(&vc)?.reshape((nh, c, hd))?); // (nh, c, hd)
    }
    let out = if outs.len() == 1 { outs.pop().expect("one chunk") } else { Tensor::cat(&outs, 1)? };
    Ok(match &order {
        Some((_, inv)) => out.index_select(&Tensor::new(inv.as_slice(), out.device())?, 0)?,
        None => out,
    })
}

/// One-pass f32 versions of the ops above (each replaces a chain of candle ops and their
/// allocations, which dominate a decode step's serial time). Same formulas; the f64 path
/// keeps the candle chains.
pub mod fast {
    use std::ops::Range;

    use candle_core::{CpuStorage, DType, Storage, Tensor, D};
    use half::f16;
    use rayon::prelude::*;

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
    /// reciprocal of the sum ([`crate::softmax`]: the same bits on every CPU).
    fn softmax_row(row: &mut [f32]) {
        crate::softmax::softmax_row_stats(row);
    }

    /// The softmax of the first `r` rows of `n` scores in `p`, with each row's max and sum of
    /// exponentials.
    fn softmax_rows_stats(p: &mut [f32], n: usize, r: usize) -> (Vec<f32>, Vec<f64>) {
        p.chunks_mut(n.max(1)).take(r).map(crate::softmax::softmax_row_stats).unzip()
    }

    pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (g, u) = (data(gate)?, data(up)?);
        let out: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| a / (1.0 + (-a).exp()) * b).collect();
        Ok(Tensor::from_vec(out, gate.shape(), gate.device())?)
    }

    /// `a · b` in eight lanes (lane `l` sums the products `8c + l` in order), the lanes summed
    /// as `((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`, then the tail: the order in
    /// which `avx2::scores` sums its registers (the two give the same bits: each product and
    /// its sum are one fused multiply-add in both).
    #[inline(always)]
    fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
        let mut s = [0f32; 8];
        let full = a.len() / 8 * 8;
        for (x, y) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
            for l in 0..8 {
                s[l] = x[l].mul_add(y[l].to_f32(), s[l]);
            }
        }
        let head = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        head + a[full..].iter().zip(&b[full..]).map(|(x, y)| x * y.to_f32()).sum::<f32>()
    }

    /// An element of a K/V buffer the decode kernels read in place: f32, or f16 (an f16 cache,
    /// [`crate::KvDtype::F16`]) widened to f32 as it is read, exactly (every f16 is an f32).
    /// The only thing the kernels do differently for the two.
    pub trait KvElem: Copy + Send + Sync + 'static {
        /// Whether the element is an f16 (the AVX2 kernels widen 8 at a time with F16C).
        const F16: bool;
        fn to_f32(self) -> f32;
    }

    impl KvElem for f32 {
        const F16: bool = false;
        #[inline(always)]
        fn to_f32(self) -> f32 {
            self
        }
    }

    impl KvElem for f16 {
        const F16: bool = true;
        #[inline(always)]
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    /// A `(heads, rows, hd)` tensor's elements where they are: the storage slice, its start and
    /// the strides of the first two dimensions (the last one contiguous).
    struct InPlace<'a, T> {
        data: &'a [T],
        start: usize,
        head_stride: usize,
        row_stride: usize,
    }

    impl<'a, T> InPlace<'a, T> {
        fn of(cpu: &'a [T], layout: &candle_core::Layout) -> Option<Self> {
            match layout.stride() {
                &[s0, s1, 1] => Some(Self { data: cpu, start: layout.start_offset(), head_stride: s0, row_stride: s1 }),
                _ => None,
            }
        }

        /// The rows of KV head `g`.
        fn head(&self, g: usize) -> Rows<'a, T> {
            Rows { data: self.data, base: self.start + g * self.head_stride, stride: self.row_stride }
        }
    }

    /// Attention of one query position: `q (nh, 1, hd)` over the key columns `cols` of `k`,
    /// `v (nkv, total, hd)`; query head h reads KV head `kv_head(h)`. Scores, softmax and the
    /// weighted sum of V per head, reading K and V where they are (a cache's buffers: nothing
    /// copied).
    ///
    /// The query heads of one KV head go together (each K and V row is read once per step, not
    /// once per query head), over blocks of [`KEY_BLOCK`] keys split over the thread pool. A
    /// context of one block is the textbook computation (softmax of the scores, then the
    /// weighted sum); a longer one combines the blocks' softmaxes as flash-decoding does (each
    /// block's weighted sum rescaled by its share of the total), which differs from it by f32
    /// rounding only. The blocks do not depend on the number of threads: neither do the
    /// results.
    pub fn attention_one_row(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cols: Range<usize>,
        scale: f64,
        kv_head: impl Fn(usize) -> usize + Sync,
    ) -> Result<Tensor> {
        let (nh, _, hd) = q.dims3()?;
        let nkv = k.dims3()?.0;
        let qs = data(q)?;
        // The query heads of each KV head.
        let groups: Vec<Vec<usize>> = (0..nkv).map(|g| (0..nh).filter(|&h| kv_head(h) == g).collect()).collect();
        let one = OneRow { qs: &qs, nh, hd, groups: &groups, cols: cols.clone(), scale: scale as f32 };
        let done = {
            let ((ks, kl), (vs, vl)) = (k.storage_and_layout(), v.storage_and_layout());
            match (&*ks, &*vs) {
                (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) => {
                    InPlace::of(kd.as_slice(), kl).zip(InPlace::of(vd.as_slice(), vl)).map(|(k, v)| one.run(k, v))
                }
                (Storage::Cpu(CpuStorage::F16(kd)), Storage::Cpu(CpuStorage::F16(vd))) => {
                    InPlace::of(kd.as_slice(), kl).zip(InPlace::of(vd.as_slice(), vl)).map(|(k, v)| one.run(k, v))
                }
                _ => None,
            }
        };
        match done {
            Some(out) => Ok(Tensor::from_vec(out, (nh, 1, hd), q.device())?),
            None => {
                // Another layout or dtype: the same on a contiguous f32 copy of the visible rows.
                let f32_whole = |t: &Tensor| t.dtype() == DType::F32 && t.is_contiguous();
                if f32_whole(k) && f32_whole(v) && cols == (0..k.dim(1)?) {
                    return Err(candle_core::Error::Msg("the one-row attention runs on f32 or f16 CPU tensors".into()).into());
                }
                let n = cols.len();
                let copy = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, cols.start, n)?.to_dtype(DType::F32)?.contiguous()?) };
                attention_one_row(q, &copy(k)?, &copy(v)?, 0..n, scale, kv_head)
            }
        }
    }

    /// [`attention_one_row`]'s arguments, for K and V read in place as `T`.
    struct OneRow<'a> {
        qs: &'a [f32],
        nh: usize,
        hd: usize,
        groups: &'a [Vec<usize>],
        cols: Range<usize>,
        scale: f32,
    }

    impl OneRow<'_> {
        /// `out (nh, hd)`.
        fn run<T: KvElem>(&self, k: InPlace<T>, v: InPlace<T>) -> Vec<f32> {
            let (nh, hd, cols) = (self.nh, self.hd, self.cols.clone());
            let nkv = self.groups.len();
            let n = cols.len();
            let blocks = n.div_ceil(KEY_BLOCK).max(1);
            let task = |i: usize, p: &mut Vec<f32>| {
                let (g, b) = (i / blocks, i % blocks);
                let t0 = cols.start + b * KEY_BLOCK;
                let t1 = (t0 + KEY_BLOCK).min(cols.end);
                one_row_block(&self.groups[g], self.qs, hd, k.head(g), v.head(g), t0..t1, self.scale, p)
            };
            let tasks = nkv * blocks;
            let parts: Vec<Part> = if n * nh * hd >= PARALLEL_WORK && rayon::current_num_threads() > 1 {
                (0..tasks).into_par_iter().map_init(|| Vec::with_capacity(KEY_BLOCK.min(n) * nh), |p, i| task(i, p)).collect()
            } else {
                let mut p = Vec::with_capacity(KEY_BLOCK.min(n) * nh);
                (0..tasks).map(|i| task(i, &mut p)).collect()
            };
            let mut out = vec![0f32; nh * hd];
            for (g, heads) in self.groups.iter().enumerate() {
                combine(heads, &parts[g * blocks..(g + 1) * blocks], hd, &mut out);
            }
            out
        }
    }

    /// Keys per block of a decode step's attention.
    pub const KEY_BLOCK: usize = 512;

    /// Rows of one KV head in a storage slice: row `t` is `data[base + t * stride..][..hd]`.
    struct Rows<'a, T> {
        data: &'a [T],
        base: usize,
        stride: usize,
    }

    impl<T> Clone for Rows<'_, T> {
        fn clone(&self) -> Self {
            *self
        }
    }

    impl<T> Copy for Rows<'_, T> {}

    impl<T> Rows<'_, T> {
        #[inline(always)]
        fn row(&self, t: usize, hd: usize) -> &[T] {
            let at = self.base + t * self.stride;
            &self.data[at..at + hd]
        }
    }

    /// One block of one KV head: for each of its query heads, the max score, the sum of the
    /// exponentials (f64) and the softmax-weighted sum of the block's V rows, `(heads, hd)`.
    struct Part {
        max: Vec<f32>,
        sum: Vec<f64>,
        out: Vec<f32>,
    }

    #[allow(clippy::too_many_arguments)]
    fn one_row_block<T: KvElem>(heads: &[usize], qs: &[f32], hd: usize, k: Rows<T>, v: Rows<T>, keys: Range<usize>, scale: f32, p: &mut Vec<f32>) -> Part {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked); the body is the plain Rust below.
            return unsafe { one_row_block_avx2(heads, qs, hd, k, v, keys, scale, p) };
        }
        one_row_block_impl(heads, qs, hd, k, v, keys, scale, p)
    }

    /// [`one_row_block_impl`] with AVX2 registers: the same operations in the same order (each
    /// product and its sum fused, `vfmadd` as `f32::mul_add`: both round once), so the same
    /// bits (an f16 element widened by F16C, exactly as `f16::to_f32`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn one_row_block_avx2<T: KvElem>(heads: &[usize], qs: &[f32], hd: usize, k: Rows<T>, v: Rows<T>, keys: Range<usize>, scale: f32, p: &mut Vec<f32>) -> Part {
        if hd % 8 != 0 {
            return one_row_block_impl(heads, qs, hd, k, v, keys, scale, p);
        }
        let (r, n) = (heads.len(), keys.len());
        p.clear();
        p.resize(r * n, 0.0);
        // Three query heads at a time: each K row is loaded once for the three.
        let mut i = 0;
        while i < r {
            let q = |j: usize| &qs[heads[(i + j).min(r - 1)] * hd..][..hd];
            let [p0, p1, p2] = avx2::split3(&mut p[i * n..], n);
            match r - i {
                1 => avx2::scores::<1, T>([q(0), q(0), q(0)], k, keys.clone(), scale, [p0, &mut [], &mut []]),
                2 => avx2::scores::<2, T>([q(0), q(1), q(1)], k, keys.clone(), scale, [p0, p1, &mut []]),
                _ => avx2::scores::<3, T>([q(0), q(1), q(2)], k, keys.clone(), scale, [p0, p1, p2]),
            }
            i += 3;
        }
        let (max, sum) = softmax_rows_stats(p, n, r);
        let mut out = vec![0f32; r * hd];
        let mut i = 0;
        while i < r {
            let w = |j: usize| &p[(i + j).min(r - 1) * n..][..n];
            let [o0, o1, o2] = avx2::split3(&mut out[i * hd..], hd);
            match r - i {
                1 => avx2::weighted_sum::<1, T>([w(0), w(0), w(0)], v, keys.start, [o0, &mut [], &mut []]),
                2 => avx2::weighted_sum::<2, T>([w(0), w(1), w(1)], v, keys.start, [o0, o1, &mut []]),
                _ => avx2::weighted_sum::<3, T>([w(0), w(1), w(2)], v, keys.start, [o0, o1, o2]),
            }
            i += 3;
        }
        Part { max, sum, out }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use super::{KvElem, Rows};

        /// Eight elements at `p` as f32 (an f16 widened with F16C's `vcvtph2ps`).
        #[inline(always)]
        unsafe fn load8<T: KvElem>(p: *const T) -> __m256 {
            match T::F16 {
                true => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                false => _mm256_loadu_ps(p as *const f32),
            }
        }

        /// The first three rows of `n` elements of `p` (empty past its end).
        pub fn split3(p: &mut [f32], n: usize) -> [&mut [f32]; 3] {
            let (a, rest) = p.split_at_mut(n.min(p.len()));
            let (b, rest) = rest.split_at_mut(n.min(rest.len()));
            let (c, _) = rest.split_at_mut(n.min(rest.len()));
            [a, b, c]
        }

        /// `out[i][j] = scale * q[i] · k.row(keys.start + j)` for the first `R` query heads
        /// ([`super::dot`]'s bits; `q[i].len()` a multiple of 8), four keys at a time: each K
        /// chunk loaded once for the `R` heads, the four keys' accumulators reduced together.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::needless_range_loop)]
        pub unsafe fn scores<const R: usize, T: KvElem>(q: [&[f32]; 3], k: Rows<T>, keys: std::ops::Range<usize>, scale: f32, out: [&mut [f32]; 3]) {
            let hd = q[0].len();
            let n = keys.len();
            assert!(R <= 3 && hd % 8 == 0 && (n == 0 || k.base + (keys.end - 1) * k.stride + hd <= k.data.len()));
            for i in 0..R {
                assert!(q[i].len() == hd && out[i].len() >= n);
            }
            let qp = q.map(|q| q.as_ptr());
            let kp = k.data.as_ptr().add(k.base + keys.start * k.stride);
            let sc = _mm_set1_ps(scale);
            let mut j = 0;
            while j + 4 <= n {
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                for c in (0..hd).step_by(8) {
                    for t in 0..4 {
                        let kc = load8(kp.add((j + t) * k.stride + c));
                        for i in 0..R {
                            acc[i][t] = _mm256_fmadd_ps(_mm256_loadu_ps(qp[i].add(c)), kc, acc[i][t]);
                        }
                    }
                }
                for i in 0..R {
                    // Lane sums of the four: ((s0+s1)+(s2+s3)) + ((s4+s5)+(s6+s7)) each.
                    let t0 = _mm256_hadd_ps(acc[i][0], acc[i][1]);
                    let t1 = _mm256_hadd_ps(acc[i][2], acc[i][3]);
                    let u = _mm256_hadd_ps(t0, t1); // lanes 0-3 sums of the 4 keys | lanes 4-7 sums
                    let sum = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
                    _mm_storeu_ps(out[i].as_mut_ptr().add(j), _mm_mul_ps(sum, sc));
                }
                j += 4;
            }
            while j < n {
                for i in 0..R {
                    let mut a = _mm256_setzero_ps();
                    for c in (0..hd).step_by(8) {
                        a = _mm256_fmadd_ps(_mm256_loadu_ps(qp[i].add(c)), load8(kp.add(j * k.stride + c)), a);
                    }
                    let t = _mm256_hadd_ps(a, a); // s01 s23 . . | s45 s67 . .
                    let u = _mm256_hadd_ps(t, t); // s0123 ... | s4567 ...
                    let sum = _mm_add_ss(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
                    out[i][j] = _mm_cvtss_f32(sum) * scale;
                }
                j += 1;
            }
        }

        /// `o[i] += sum_j w[i][j] * v.row(t0 + j)` for the first `R` heads (`o[i].len()` a
        /// multiple of 8), over `j` in order for each element: 32 elements of the `R` heads
        /// at a time, accumulated in registers, each V row chunk read for all of them.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn weighted_sum<const R: usize, T: KvElem>(w: [&[f32]; 3], v: Rows<T>, t0: usize, o: [&mut [f32]; 3]) {
            let hd = o[0].len();
            let n = w[0].len();
            assert!(R <= 3 && hd % 8 == 0 && (n == 0 || v.base + (t0 + n - 1) * v.stride + hd <= v.data.len()));
            for i in 0..R {
                assert!(w[i].len() == n && o[i].len() == hd);
            }
            let vp = v.data.as_ptr().add(v.base + t0 * v.stride);
            let mut d0 = 0;
            while d0 < hd {
                let width = (hd - d0).min(32) / 8; // registers per head
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                for i in 0..R {
                    for (r, a) in acc[i].iter_mut().enumerate().take(width) {
                        *a = _mm256_loadu_ps(o[i].as_ptr().add(d0 + 8 * r));
                    }
                }
                if width == 4 {
                    for j in 0..n {
                        let row = vp.add(j * v.stride + d0);
                        for i in 0..R {
                            let ww = _mm256_set1_ps(*w[i].get_unchecked(j));
                            for (r, a) in acc[i].iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(ww, load8(row.add(8 * r)), *a);
                            }
                        }
                    }
                } else {
                    for j in 0..n {
                        let row = vp.add(j * v.stride + d0);
                        for i in 0..R {
                            let ww = _mm256_set1_ps(*w[i].get_unchecked(j));
                            for (r, a) in acc[i].iter_mut().enumerate().take(width) {
                                *a = _mm256_fmadd_ps(ww, load8(row.add(8 * r)), *a);
                            }
                        }
                    }
                }
                for i in 0..R {
                    for (r, a) in acc[i].iter().enumerate().take(width) {
                        _mm256_storeu_ps(o[i].as_mut_ptr().add(d0 + 8 * r), *a);
                    }
                }
                d0 += 8 * width;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn avx2() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        // Every CPU with AVX2 has F16C (which came before it); checked all the same.
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn one_row_block_impl<T: KvElem>(heads: &[usize], qs: &[f32], hd: usize, k: Rows<T>, v: Rows<T>, keys: Range<usize>, scale: f32, p: &mut Vec<f32>) -> Part {
        let (r, n) = (heads.len(), keys.len());
        p.clear();
        p.resize(r * n, 0.0);
        // Scores (heads, n): each K row read once for every query head of the group.
        for (j, t) in keys.clone().enumerate() {
            let kt = k.row(t, hd);
            for (i, &h) in heads.iter().enumerate() {
                p[i * n + j] = dot(&qs[h * hd..(h + 1) * hd], kt) * scale;
            }
        }
        let (max, sum) = softmax_rows_stats(p, n, r);
        // The weighted sum of V (heads, hd): each V row read once.
        let mut out = vec![0f32; r * hd];
        for (j, t) in keys.enumerate() {
            let vt = v.row(t, hd);
            for (i, o) in out.chunks_mut(hd).enumerate() {
                let w = p[i * n + j];
                for (od, &vd) in o.iter_mut().zip(vt) {
                    *od = w.mul_add(vd.to_f32(), *od);
                }
            }
        }
        Part { max, sum, out }
    }

    /// The blocks of one KV head into its query heads' rows of `out (nh, hd)`: one block is
    /// the result; several are weighted by their share of the softmax's total,
    /// `sum_b exp(max_b - max)` over `sum_b sum_b exp(max_b - max)`.
    fn combine(heads: &[usize], parts: &[Part], hd: usize, out: &mut [f32]) {
        for (i, &h) in heads.iter().enumerate() {
            let o = &mut out[h * hd..(h + 1) * hd];
            if let [part] = parts {
                o.copy_from_slice(&part.out[i * hd..(i + 1) * hd]);
                continue;
            }
            let m = parts.iter().map(|b| b.max[i]).fold(f32::NEG_INFINITY, f32::max);
            let scaled: Vec<f64> = parts.iter().map(|b| b.sum[i] * ((b.max[i] - m) as f64).exp()).collect();
            let total: f64 = scaled.iter().sum();
            for (b, s) in parts.iter().zip(&scaled) {
                let w = (s / total) as f32;
                for (od, &bd) in o.iter_mut().zip(&b.out[i * hd..(i + 1) * hd]) {
                    *od += w * bd;
                }
            }
        }
    }

    /// Elements of work (scores x head width) above which a loop splits over the threads.
    const PARALLEL_WORK: usize = 1 << 16;

    /// The softmax of the last dimension of `scale * scores (groups, rows_per_group, cols)`
    /// where row `r` of every group only sees the columns `visible(r % rows)` (the others get
    /// weight 0, exactly as an additive -inf mask gives them), rows split over the thread pool.
    pub fn masked_softmax(scores: &Tensor, scale: f64, rows: usize, visible: impl Fn(usize) -> Range<usize> + Sync) -> Result<Tensor> {
        let n = scores.dim(D::Minus1)?;
        let mut v = data(scores)?;
        let scale = scale as f32;
        let one = |r: usize, row: &mut [f32]| {
            let seen = visible(r % rows);
            row[..seen.start].fill(0.0);
            row[seen.end..].fill(0.0);
            let row = &mut row[seen];
            row.iter_mut().for_each(|x| *x *= scale);
            softmax_row(row);
        };
        if v.len() >= PARALLEL_WORK && rayon::current_num_threads() > 1 {
            v.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| one(r, row));
        } else {
            v.chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| one(r, row));
        }
        Ok(Tensor::from_vec(v, scores.shape(), scores.device())?)
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    mod tests {
        use super::*;

        #[test]
        fn the_avx2_decode_block_gives_the_bits_of_the_plain_one() {
            if !avx2() {
                return;
            }
            let mut x = 7u64;
            let mut r = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                    })
                    .collect()
            };
            let cases = [(64, 64, 0..29), (64, 80, 3..515), (128, 128, 0..8), (8, 8, 0..1), (24, 40, 1..50)];
            let heads: [&[usize]; 5] = [&[2, 0, 1], &[1], &[0, 2], &[2, 0, 1, 1, 0], &[0, 1, 2, 0]];
            for ((hd, stride, keys), heads) in cases.into_iter().zip(heads) {
                let (ks, vs, qs) = (r(stride * keys.end + hd), r(stride * keys.end + hd), r(3 * hd));
                let k = Rows { data: &ks, base: 5, stride };
                let v = Rows { data: &vs, base: 3, stride };
                let (mut p1, mut p2) = (vec![], vec![]);
                let a = one_row_block_impl(heads, &qs, hd, k, v, keys.clone(), 0.3, &mut p1);
                // SAFETY: AVX2 checked above.
                let b = unsafe { one_row_block_avx2(heads, &qs, hd, k, v, keys.clone(), 0.3, &mut p2) };
                assert_eq!(p1, p2, "scores, hd {hd}");
                // An f16 cache: the plain and AVX2 (F16C) blocks over the f16 rows give the bits
                // of the plain block over f32 rows holding the same (rounded) values.
                let (k16, v16): (Vec<f16>, Vec<f16>) = (ks.iter().map(|&x| f16::from_f32(x)).collect(), vs.iter().map(|&x| f16::from_f32(x)).collect());
                let (kr, vr): (Vec<f32>, Vec<f32>) = (k16.iter().map(|x| x.to_f32()).collect(), v16.iter().map(|x| x.to_f32()).collect());
                let (mut p3, mut p4, mut p5) = (vec![], vec![], vec![]);
                let rounded = one_row_block_impl(heads, &qs, hd, Rows { data: &kr, ..k }, Rows { data: &vr, ..v }, keys.clone(), 0.3, &mut p3);
                let plain = one_row_block_impl(heads, &qs, hd, Rows { data: &k16, base: 5, stride }, Rows { data: &v16, base: 3, stride }, keys.clone(), 0.3, &mut p4);
                // SAFETY: AVX2 (and F16C) checked above.
                let simd = unsafe { one_row_block_avx2(heads, &qs, hd, Rows { data: &k16, base: 5, stride }, Rows { data: &v16, base: 3, stride }, keys.clone(), 0.3, &mut p5) };
                assert_eq!((&p3, &p3), (&p4, &p5), "f16 scores, hd {hd}");
                for c in [&plain, &simd] {
                    assert_eq!((&rounded.max, &rounded.sum, &rounded.out), (&c.max, &c.sum, &c.out), "f16, hd {hd}, keys {keys:?}");
                }
                assert_ne!(rounded.out, a.out, "the rounding shows");
                assert_eq!((a.max, a.sum, a.out), (b.max, b.sum, b.out), "hd {hd}, keys {keys:?}");
            }
        }
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

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        let d = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
        d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
    }

    #[test]
    fn grouped_and_decode_attention_match_the_materialized_form_for_both_mappings() {
        let (nh, nkv, hd, total) = (4, 2, 8, 5);
        let (k, v) = (rand(&[nkv, total, hd], 1), rand(&[nkv, total, hd], 2));
        for mapping in [HeadMapping::Grouped, HeadMapping::Tiled] {
            // Prefill: seq = total, causal mask, the batched path.
            let q = rand(&[nh, total, hd], 3);
            let mask = causal_mask(total, 0, DType::F32, &Device::Cpu).unwrap();
            let got = attention(&q, &k, &v, Mask::Causal { offset: 0 }, 0.35, mapping).unwrap();
            assert!(rel(&got, &materialized(&q, &k, &v, Some(&mask), 0.35, mapping)) < 1e-6, "{mapping:?} prefill");
            // Decode: one row, the single-row path.
            let q1 = rand(&[nh, 1, hd], 4);
            let got = attention(&q1, &k, &v, Mask::None, 0.35, mapping).unwrap();
            assert!(rel(&got, &materialized(&q1, &k, &v, None, 0.35, mapping)) < 1e-6, "{mapping:?} decode");
        }
        // The two mappings differ when heads are shared (the gqa-mapping fault shows).
        let q1 = rand(&[nh, 1, hd], 4);
        let a = attention(&q1, &k, &v, Mask::None, 0.35, HeadMapping::Grouped).unwrap();
        let b = attention(&q1, &k, &v, Mask::None, 0.35, HeadMapping::Tiled).unwrap();
        assert!(rel(&a, &b) > 1e-2);
    }

    /// `t (a, n, c)` as a view of rows `5..5 + n` of a larger buffer (as a cache hands out).
    fn in_buffer(t: &Tensor) -> Tensor {
        let (a, n, c) = t.dims3().unwrap();
        let buf = Tensor::zeros((a, n + 13, c), t.dtype(), t.device()).unwrap();
        buf.slice_set(t, 1, 5).unwrap();
        buf.narrow(1, 5, n).unwrap()
    }

    #[test]
    fn chunked_and_one_row_attention_match_the_materialized_mask_for_long_windows_and_chunk_edges() {
        let (nh, nkv, hd) = (6, 2, 16);
        for dtype in [DType::F32, DType::F64] {
            let tol = if dtype == DType::F32 { 2e-6 } else { 1e-12 };
            for (seq, offset) in [(1, 0), (1, 37), (1, 1500), (40, 0), (33, 17), (300, 0), (257, 100)] {
                let total = offset + seq;
                let (k, v) = (rand(&[nkv, total, hd], 11).to_dtype(dtype).unwrap(), rand(&[nkv, total, hd], 12).to_dtype(dtype).unwrap());
                let (kb, vb) = (in_buffer(&k), in_buffer(&v));
                let q = rand(&[nh, seq, hd], 13).to_dtype(dtype).unwrap();
                let masks = [
                    Mask::None,
                    Mask::Causal { offset },
                    Mask::Window { offset, w: 1 },
                    Mask::Window { offset, w: 7 },
                    Mask::Window { offset, w: 1000 },
                    Mask::Window { offset, w: 520 },
                ];
                for mask in masks {
                    let m = match mask {
                        Mask::None => None,
                        m => Some(m.block(0, seq, 0, total, dtype, &Device::Cpu).unwrap()),
                    };
                    for mapping in [HeadMapping::Grouped, HeadMapping::Tiled] {
                        let want = materialized(&q, &k, &v, m.as_ref(), 0.25, mapping);
                        let what = format!("{dtype:?} seq {seq} offset {offset} {mask:?} {mapping:?}");
                        let got = attention(&q, &kb, &vb, mask, 0.25, mapping).unwrap();
                        assert!(rel(&got, &want) < tol, "{what}: {}", rel(&got, &want));
                        for rows in [1, 7, 16, 256] {
                            let got = attention_chunked(&q, &kb, &vb, mask, 0.25, mapping, rows).unwrap();
                            assert!(rel(&got, &want) < tol, "{what}, {rows} rows a chunk: {}", rel(&got, &want));
                        }
                    }
                }
            }
        }
    }

    /// K/V stored in f16 (an f16 cache) give the attention of f32 K/V holding the same rounded
    /// values: a decode step reads the f16 rows in place (the same bits), a prefill converts the
    /// keys each chunk of rows sees (the same values, up to the matmul's order).
    #[test]
    fn attention_over_f16_rows_is_attention_over_their_f32_values() {
        let (nh, nkv, hd) = (6, 2, 16);
        for (seq, offset) in [(1, 0), (1, 37), (1, 1500), (40, 0), (33, 17), (300, 0), (257, 100)] {
            let total = offset + seq;
            let (k, v) = (rand(&[nkv, total, hd], 21), rand(&[nkv, total, hd], 22));
            let (k16, v16) = (in_buffer(&k.to_dtype(DType::F16).unwrap()), in_buffer(&v.to_dtype(DType::F16).unwrap()));
            let (kr, vr) = (in_buffer(&k16.to_dtype(DType::F32).unwrap()), in_buffer(&v16.to_dtype(DType::F32).unwrap()));
            let q = rand(&[nh, seq, hd], 23);
            for mask in [Mask::None, Mask::Causal { offset }, Mask::Window { offset, w: 7 }, Mask::Window { offset, w: 520 }] {
                for mapping in [HeadMapping::Grouped, HeadMapping::Tiled] {
                    let what = format!("seq {seq} offset {offset} {mask:?} {mapping:?}");
                    let want = attention(&q, &kr, &vr, mask, 0.25, mapping).unwrap();
                    let got = attention(&q, &k16, &v16, mask, 0.25, mapping).unwrap();
                    assert_eq!(got.dtype(), DType::F32);
                    if seq == 1 {
                        let (a, b) = (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                        assert_eq!(a, b, "{what}");
                    } else {
                        assert!(rel(&got, &want) < 1e-6, "{what}: {}", rel(&got, &want));
                    }
                    // An f64 step over an f16 cache converts it too.
                    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                    let got = attention(&f64_of(&q), &k16, &v16, mask, 0.25, mapping).unwrap();
                    let want = attention(&f64_of(&q), &f64_of(&kr), &f64_of(&vr), mask, 0.25, mapping).unwrap();
                    assert!(rel(&got, &want) < 1e-12, "f64 {what}: {}", rel(&got, &want));
                }
            }
        }
    }

    #[test]
    fn a_mask_block_is_a_window_of_the_whole_mask_and_counts_keys_from_the_cache_start() {
        let whole = window_mask(9, 4, 3, DType::F32, &Device::Cpu).unwrap();
        let part = Mask::Window { offset: 4, w: 3 }.block(2, 5, 3, 8, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(part.to_vec2::<f32>().unwrap(), whole.narrow(0, 2, 5).unwrap().narrow(1, 3, 8).unwrap().to_vec2::<f32>().unwrap());
        // A window cache holding positions 6.. : row 0 (position 8) sees 6..=8, columns 0..3.
        assert_eq!(Mask::Window { offset: 8, w: 3 }.from_key(6).visible(0, 4), 0..3);
        assert_eq!(Mask::Causal { offset: 8 }.from_key(6).visible(1, 4), 0..4);
        assert_eq!(chunk_rows(9, 6000), 77);
        assert_eq!((chunk_rows(9, 10), chunk_rows(64, 1 << 20)), (256, 16));
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
