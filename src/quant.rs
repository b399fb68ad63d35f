//! Quantized weight matrices and the matmul kernels that use them.
//!
//! A [`Linear`] is one weight matrix `(out, in)` applied as `x @ W^T`. It is either dense
//! (an f32/f64 [`Tensor`], `--weights dequant`) or kept in its GGUF block format
//! (`--weights quantized`, the default for GGUF files).
//!
//! Quantized matmuls follow ggml's CPU scheme, so that the engine and llama.cpp compute
//! the same numbers from the same file: the activations of each row are quantized to
//! 8 bits per 32-value block (Q8_0, or Q8_1 which also stores `d * sum(q)` for formats
//! with a block minimum), then every output is a sum over blocks of
//! `d_w * d_x * Σ q_w q_x` (+ `m_w * s_x` for Q4_1). Q4_0, Q4_1 and Q8_0 use this
//! crate's own AVX2 kernels (candle's Q4_1 dot product is scalar on x86, see docs/traps.md);
//! every other GGUF type goes through candle's `QMatMul`, which implements the same
//! scheme with its own kernels (Q8_K activations for the K-quants).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::Result;

/// How GGUF weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsMode {
    /// Kept in their block format, multiplied with quantized kernels (what llama.cpp does).
    #[default]
    Quantized,
    /// Dequantized to the compute dtype at load (f32 or f64), multiplied densely.
    Dequant,
}

impl WeightsMode {
    pub fn name(&self) -> &'static str {
        match self {
            WeightsMode::Quantized => "quantized",
            WeightsMode::Dequant => "dequant",
        }
    }
}

const QK: usize = 32;

/// `--weights quantized` and `--weights dequant` on the same file differ only by the 8-bit
/// rounding of the activations: the logits of the two modes agree within this relative L2.
/// Measured on the quantized fixtures (2-3 layers; `cargo test --release --test engine
/// quantized_and_dequantized -- --nocapture` prints them): Q4_0 1.28e-2, Q4_1 1.39e-2,
/// Q8_0 1.36e-2, Q4_K_M 1.68e-2, Q6_K 1.68e-2 (the activation rounding, not the weight
/// type, sets the size); the bound is 3x the worst. Deeper models accumulate more: on
/// SmolLM2 (30 layers) the harness measures up to 1.4e-1 and judges that case with the
/// quantized-mode tolerances of `harness/src/tolerance.rs`.
pub const MODES_AGREE_LOGITS_REL_L2: f64 = 5e-2;

/// A weight matrix `(out, in)`, applied as `x @ W^T`.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(Tensor),
    /// Q4_0, Q4_1, Q8_0 with this crate's kernels.
    Blocks(Arc<BlockMatrix>),
    /// Any other GGUF type, through candle (`QMatMul`), with its GGUF type kept for reports.
    Candle(Arc<QMatMul>, GgmlDType),
    /// A base matrix with an unmerged LoRA adapter: `y = x W^T + s * (x A^T) B^T`
    /// (`crate::lora`).
    Lora(Arc<LoraLinear>),
}

/// An unmerged adapter on a base matrix (`Linear::Lora`).
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: Linear,
    /// `(r, in)`, compute dtype.
    pub a: Tensor,
    /// `(out, r)`, compute dtype, in the model's Q/K layout.
    pub b: Tensor,
    pub scale: f64,
}

impl LoraLinear {
    /// `s * (x A^T) B^T` for `x (seq, in)`, in `x`'s dtype.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.a.dtype())?;
        let z = x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)?; // (seq, out)
        Ok((z * self.scale)?)
    }
}

impl Linear {
    /// Wraps a GGUF tensor `(out, in)` for quantized matmuls.
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        let dtype = q.dtype();
        let (out, inp) = q.shape().dims2()?;
        let kind = match dtype {
            GgmlDType::Q4_0 => Some(BlockKind::Q4_0),
            GgmlDType::Q4_1 => Some(BlockKind::Q4_1),
            GgmlDType::Q8_0 => Some(BlockKind::Q8_0),
            _ => None,
        };
        match kind {
            Some(kind) if inp % QK == 0 => {
                Ok(Linear::Blocks(Arc::new(BlockMatrix::new(kind, out, inp, &q.data()?))))
            }
            _ => Ok(Linear::Candle(Arc::new(QMatMul::from_qtensor(q)?), dtype)),
        }
    }

    /// `x (seq, in)` -> `(seq, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(w) => Ok(x.matmul(&w.t()?)?),
            Linear::Blocks(m) => {
                let (seq, inp) = x.dims2()?;
                if inp != m.inp {
                    return Err(crate::EngineError::Input(format!(
                        "quantized matmul: input has {inp} columns, weight has {}",
                        m.inp
                    )));
                }
                let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let out = m.matmul(&xs, seq);
                Ok(Tensor::from_vec(out, (seq, m.out), x.device())?)
            }
            Linear::Candle(q, _) => Ok(q.forward(x)?),
            Linear::Lora(l) => {
                let y = l.base.forward(x)?;
                Ok((y + l.delta(x)?)?)
            }
        }
    }

    /// The matrix without its adapter (itself when it has none).
    pub fn base(&self) -> &Linear {
        match self {
            Linear::Lora(l) => l.base.base(),
            other => other,
        }
    }

    /// `x @ W_i^T` for several matrices that read the same input (Q/K/V, gate/up): when
    /// all use this crate's kernels with one block kind, `x` is quantized once and all
    /// rows run in one parallel pass.
    pub fn forward_group(ws: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        if ws.iter().any(|w| matches!(w, Linear::Lora(_))) {
            // The bases as a group (one activation quantization), then each adapter's delta.
            let bases: Vec<&Linear> = ws.iter().map(|w| w.base()).collect();
            let ys = Self::forward_group(&bases, x)?;
            return ys
                .into_iter()
                .zip(ws)
                .map(|(y, w)| match w {
                    Linear::Lora(l) => Ok((y + l.delta(x)?)?),
                    _ => Ok(y),
                })
                .collect();
        }
        let blocks: Vec<&BlockMatrix> = ws
            .iter()
            .filter_map(|w| match w {
                Linear::Blocks(m) => Some(m.as_ref()),
                _ => None,
            })
            .collect();
        let same = blocks.len() == ws.len()
            && blocks.windows(2).all(|p| p[0].kind == p[1].kind && p[0].inp == p[1].inp);
        if !same || blocks.is_empty() {
            return ws.iter().map(|w| w.forward(x)).collect();
        }
        let (seq, inp) = x.dims2()?;
        if inp != blocks[0].inp {
            return Err(crate::EngineError::Input(format!(
                "quantized matmul: input has {inp} columns, weight has {}",
                blocks[0].inp
            )));
        }
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let outs = matmul_group(&blocks, &xs, seq);
        outs.into_iter()
            .zip(&blocks)
            .map(|(o, m)| Ok(Tensor::from_vec(o, (seq, m.out), x.device())?))
            .collect()
    }

    /// The first block whose scale (or minimum) is not finite, with that value: a corrupted
    /// file. Dense weights are checked element by element (block = element index).
    pub fn first_nonfinite(&self) -> Result<Option<(usize, f32)>> {
        match self {
            Linear::Blocks(m) => Ok(m.first_nonfinite_scale()),
            Linear::Dense(t) => first_nonfinite(t, 1),
            Linear::Candle(_, d) => first_nonfinite(&self.dequantize()?, d.block_size()),
            Linear::Lora(l) => l.base.first_nonfinite(),
        }
    }

    /// The storage type: "f32" for dense, else the GGUF type name.
    pub fn type_name(&self) -> String {
        match self {
            Linear::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Linear::Blocks(m) => m.kind.name().into(),
            Linear::Candle(_, d) => format!("{d:?}"),
            Linear::Lora(l) => l.base.type_name(),
        }
    }

    /// The weight as a dense f32 tensor (for inspection and tests); the base weight of an
    /// unmerged adapter.
    pub fn dequantize(&self) -> Result<Tensor> {
        match self {
            Linear::Lora(l) => l.base.dequantize(),
            Linear::Dense(t) => Ok(t.clone()),
            Linear::Blocks(m) => Ok(Tensor::from_vec(m.dequantize(), (m.out, m.inp), &Device::Cpu)?),
            Linear::Candle(q, _) => match q.as_ref() {
                QMatMul::QTensor(t) => Ok(t.dequantize(&Device::Cpu)?),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Ok(t.to_dtype(DType::F32)?),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BlockKind {
    fn name(&self) -> &'static str {
        match self {
            BlockKind::Q4_0 => "Q4_0",
            BlockKind::Q4_1 => "Q4_1",
            BlockKind::Q8_0 => "Q8_0",
        }
    }
    /// Bytes per 32-value weight block.
    fn block_bytes(&self) -> usize {
        match self {
            BlockKind::Q4_0 => 18,
            BlockKind::Q4_1 => 20,
            BlockKind::Q8_0 => 34,
        }
    }
}

/// A row-major matrix of GGUF blocks, repacked for the kernels: the 4/8-bit values of
/// every block stay as stored, the f16 scale (and Q4_1 minimum) of every block are
/// widened to f32 once at load (exact: every f16 is an f32).
#[derive(Debug, Clone)]
pub struct BlockMatrix {
    pub kind: BlockKind,
    pub out: usize,
    pub inp: usize,
    /// Quant values, `qbytes()` per block, row-major.
    qs: Vec<u8>,
    /// Block scales, `out * inp/32`.
    d: Vec<f32>,
    /// Block minimums (Q4_1), else empty.
    m: Vec<f32>,
}

fn rd_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Output rows per parallel task: two tasks per pool thread (so a thread that another
/// process slows down leaves work to steal), at least 16 rows to amortize a task.
fn rows_per_task(out: usize) -> usize {
    let tasks = 2 * rayon::current_num_threads().max(1);
    out.div_ceil(tasks).max(16)
}

impl BlockKind {
    /// Bytes of quant values per block (after the f16 header).
    fn qbytes(&self) -> usize {
        match self {
            BlockKind::Q4_0 | BlockKind::Q4_1 => 16,
            BlockKind::Q8_0 => 32,
        }
    }
    fn header(&self) -> usize {
        self.block_bytes() - self.qbytes()
    }
}

/// Activations quantized per 32-value block: i8 values, f32 scales `d` and (Q8_1) `s = d·Σq`.
pub struct QuantizedRows {
    pub k: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

impl BlockMatrix {
    pub fn new(kind: BlockKind, out: usize, inp: usize, raw: &[u8]) -> Self {
        let nb = out * inp / QK;
        let (h, qb) = (kind.header(), kind.qbytes());
        let mut qs = Vec::with_capacity(nb * qb);
        let mut d = Vec::with_capacity(nb);
        let mut m = Vec::new();
        for blk in raw.chunks_exact(kind.block_bytes()).take(nb) {
            d.push(rd_f16(blk, 0));
            if kind == BlockKind::Q4_1 {
                m.push(rd_f16(blk, 2));
            }
            qs.extend_from_slice(&blk[h..h + qb]);
        }
        Self { kind, out, inp, qs, d, m }
    }

    fn first_nonfinite_scale(&self) -> Option<(usize, f32)> {
        let d = self.d.iter().position(|x| !x.is_finite()).map(|i| (i, self.d[i]));
        d.or_else(|| self.m.iter().position(|x| !x.is_finite()).map(|i| (i, self.m[i])))
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let qb = self.kind.qbytes();
        let mut out = Vec::with_capacity(self.out * self.inp);
        for (b, q) in self.qs.chunks_exact(qb).enumerate() {
            let d = self.d[b];
            match self.kind {
                BlockKind::Q4_0 => {
                    out.extend(q.iter().map(|&v| ((v & 0xF) as i32 - 8) as f32 * d));
                    out.extend(q.iter().map(|&v| ((v >> 4) as i32 - 8) as f32 * d));
                }
                BlockKind::Q4_1 => {
                    let m = self.m[b];
                    out.extend(q.iter().map(|&v| (v & 0xF) as f32 * d + m));
                    out.extend(q.iter().map(|&v| (v >> 4) as f32 * d + m));
                }
                BlockKind::Q8_0 => out.extend(q.iter().map(|&v| v as i8 as f32 * d)),
            }
        }
        out
    }

    /// `x (seq, in)` row-major -> `(seq, out)` row-major.
    pub fn matmul(&self, x: &[f32], seq: usize) -> Vec<f32> {
        matmul_group(&[self], x, seq).pop().expect("one matrix")
    }
}

/// Several matrices with the same block kind and input width times one input: the input
/// is quantized once; the output rows of all matrices are split into tasks for the pool.
fn matmul_group(ms: &[&BlockMatrix], x: &[f32], seq: usize) -> Vec<Vec<f32>> {
    let kind = ms[0].kind;
    let xq = quantize_rows(x, seq, ms[0].inp, kind == BlockKind::Q4_1);
    let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; seq * m.out]).collect();
    let ptrs: Vec<SyncPtr> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
    // Tasks: (matrix, first row, end row).
    let total: usize = ms.iter().map(|m| m.out).sum();
    let rows = rows_per_task(total);
    let mut tasks = vec![];
    for (mi, m) in ms.iter().enumerate() {
        let mut o = 0;
        while o < m.out {
            tasks.push((mi, o, (o + rows).min(m.out)));
            o += rows;
        }
    }
    let task = |&(mi, o0, o1): &(usize, usize, usize)| {
        let m = ms[mi];
        let out = ptrs[mi];
        // SAFETY: each task writes only the columns o0..o1 of its matrix's output rows.
        let mut put = |o: usize, s: usize, v: f32| unsafe { *out.get().add(s * m.out + o) = v };
        rows_times_cols(m, o0, o1, &xq, seq, &mut put);
    };
    if tasks.len() > 1 && total * ms[0].inp * seq >= 1 << 14 {
        tasks.par_iter().for_each(task);
    } else {
        tasks.iter().for_each(task);
    }
    outs
}

/// The first non-finite element of `t` as (block index, value), blocks of `block` elements.
/// The `q4_1-min` fault on a Q4_1 tensor's raw bytes: each block (`d: f16, m: f16,
/// qs: [u8; 16]`, 20 bytes, ggml's `block_q4_1`) gets `m = 0`, so it dequantizes to `d*q`.
pub fn zero_q41_minimums(raw: &mut [u8]) {
    for block in raw.chunks_exact_mut(20) {
        block[2..4].fill(0);
    }
}

pub fn first_nonfinite(t: &Tensor, block: usize) -> Result<Option<(usize, f32)>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().position(|x| !x.is_finite()).map(|i| (i / block.max(1), v[i])))
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes from parallel tasks, joined before the Vec is read.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// --- activation quantization ----------------------------------------------------------------

/// Quantizes each row of `x (seq, k)` to 8-bit blocks as ggml's `quantize_row_q8_0` /
/// `quantize_row_q8_1` do: `d = amax/127`, `q = round(x · 127/amax)` (nearest, ties to
/// even as in ggml's AVX2 path), and for Q8_1 `s = d · Σq`. `d` and `s` are rounded to
/// f16 as ggml stores them, so both sides multiply with the same scales.
pub fn quantize_rows(x: &[f32], seq: usize, k: usize, with_sum: bool) -> QuantizedRows {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked); the body is plain Rust compiled with it, so
        // rounding is one instruction instead of a libm call.
        return unsafe { quantize_rows_avx2(x, seq, k, with_sum) };
    }
    quantize_rows_impl(x, seq, k, with_sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_rows_avx2(x: &[f32], seq: usize, k: usize, with_sum: bool) -> QuantizedRows {
    quantize_rows_impl(x, seq, k, with_sum)
}

#[inline(always)]
fn quantize_rows_impl(x: &[f32], seq: usize, k: usize, with_sum: bool) -> QuantizedRows {
    let nb = seq * k / QK;
    let mut qs = vec![0i8; nb * QK];
    let mut d = Vec::with_capacity(nb);
    let mut s = Vec::with_capacity(if with_sum { nb } else { 0 });
    for (blk, dst) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)) {
        let amax = blk.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let dd = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in dst.iter_mut().zip(blk) {
            let r = (v * id).round_ties_even() as i32;
            sum += r;
            *q = r as i8;
        }
        d.push(f16::from_f32(dd).to_f32());
        if with_sum {
            s.push(f16::from_f32(dd * sum as f32).to_f32());
        }
    }
    QuantizedRows { k, qs, d, s }
}

// --- dot products ---------------------------------------------------------------------------

/// Output rows `o0..o1` of `m` for all `seq` activation rows, through `put(o, s, value)`.
/// Tiles: a decode step (fewer than 4 activation rows) takes 4 weight rows at a time (one
/// activation load serves 4 rows); a prefill takes 2 weight rows x 4 activation rows (each
/// unpacked weight block serves 4 rows).
fn rows_times_cols(m: &BlockMatrix, o0: usize, o1: usize, x: &QuantizedRows, seq: usize, put: &mut impl FnMut(usize, usize, f32)) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked; VNNI too for the second); tiles stay
        // inside o0..o1 and 0..seq.
        unsafe {
            if vnni() {
                x86::rows_times_cols_vnni(m, o0, o1, x, seq, put)
            } else {
                x86::rows_times_cols(m, o0, o1, x, seq, put)
            }
        };
        return;
    }
    for o in o0..o1 {
        for s in 0..seq {
            put(o, s, dot_scalar(m, o, x, s));
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("LOCKSTEP_NO_VNNI").is_none()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    })
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The same sums in plain Rust (other CPUs, and the oracle of the SIMD kernels' tests).
pub fn dot_scalar(w: &BlockMatrix, o: usize, x: &QuantizedRows, s: usize) -> f32 {
    let nb = w.inp / QK;
    let qb = w.kind.qbytes();
    let mut sum = 0f32;
    for i in 0..nb {
        let wb = o * nb + i;
        let xb = s * nb + i;
        let q = &w.qs[wb * qb..(wb + 1) * qb];
        let y = &x.qs[xb * QK..(xb + 1) * QK];
        let dot: i32 = match w.kind {
            BlockKind::Q4_0 => (0..16)
                .map(|j| ((q[j] & 0xF) as i32 - 8) * y[j] as i32 + ((q[j] >> 4) as i32 - 8) * y[j + 16] as i32)
                .sum(),
            BlockKind::Q4_1 => {
                (0..16).map(|j| (q[j] & 0xF) as i32 * y[j] as i32 + (q[j] >> 4) as i32 * y[j + 16] as i32).sum()
            }
            BlockKind::Q8_0 => (0..32).map(|j| q[j] as i8 as i32 * y[j] as i32).sum(),
        };
        sum += dot as f32 * (w.d[wb] * x.d[xb]);
        if w.kind == BlockKind::Q4_1 {
            sum += w.m[wb] * x.s[xb];
        }
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BlockKind, BlockMatrix, QuantizedRows, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// 32 nibbles -> 32 bytes: low nibbles (values 0..16) then high nibbles (16..32).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let b = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4));
        _mm256_and_si256(b, _mm256_set1_epi8(0xF))
    }

    /// Σ over 32 lanes of unsigned x · signed y, as 8 f32 partial sums (ggml's
    /// `mul_sum_us8_pairs_float`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
    }

    /// The same sums with AVX-512 VNNI (`vpdpbusd`, one instruction; what ggml uses when
    /// built with VNNI). Equal to `mul_sum_us8`: its i16 pair sums cannot saturate here
    /// (at most 2 * 128 * 127).
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    fn mul_sum_us8_vnni(ax: __m256i, sy: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy))
    }

    /// The weight block `i` of row `o` as 32 bytes: unsigned 0..16 for Q4_1, signed otherwise.
    #[inline(always)]
    unsafe fn weight_block<const K: u8>(wq: *const u8, i: usize) -> __m256i {
        unsafe {
            match K {
                Q4_0 => _mm256_sub_epi8(nibbles(wq.add(i * 16)), _mm256_set1_epi8(8)),
                Q4_1 => nibbles(wq.add(i * 16)),
                _ => _mm256_loadu_si256(wq.add(i * 32) as *const __m256i),
            }
        }
    }

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    /// An R x C tile: weight rows o..o+R times activation rows s..s+C. Per block the same
    /// arithmetic and accumulation order as ggml's AVX2 `vec_dot_q4_0_q8_0` /
    /// `vec_dot_q4_1_q8_1` / `vec_dot_q8_0_q8_0` (8-lane f32 accumulator, fmadd of
    /// d_w*d_x times the integer block sum; Q4_1's m_w*s_x summed in block order after).
    #[inline(always)]
    unsafe fn tile<const K: u8, const R: usize, const C: usize, const V: bool>(
        w: &BlockMatrix,
        o: usize,
        x: &QuantizedRows,
        s: usize,
    ) -> [[f32; C]; R] {
        let nb = w.inp / QK;
        let qb = if K == Q8_0 { 32 } else { 16 };
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        unsafe {
            let wq: [*const u8; R] = std::array::from_fn(|r| w.qs.as_ptr().add((o + r) * nb * qb));
            let wd: [*const f32; R] = std::array::from_fn(|r| w.d.as_ptr().add((o + r) * nb));
            let xq: [*const i8; C] = std::array::from_fn(|c| x.qs.as_ptr().add((s + c) * nb * QK));
            let xd: [*const f32; C] = std::array::from_fn(|c| x.d.as_ptr().add((s + c) * nb));
            for i in 0..nb {
                let ys: [__m256i; C] = std::array::from_fn(|c| _mm256_loadu_si256(xq[c].add(i * QK) as *const __m256i));
                for r in 0..R {
                    let qw = weight_block::<K>(wq[r], i);
                    let dw = *wd[r].add(i);
                    let ax = if K == Q4_1 { qw } else { _mm256_sign_epi8(qw, qw) };
                    for c in 0..C {
                        let sy = if K == Q4_1 { ys[c] } else { _mm256_sign_epi8(ys[c], qw) };
                        let p = if V { mul_sum_us8_vnni(ax, sy) } else { mul_sum_us8(ax, sy) };
                        acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw * *xd[c].add(i)), p, acc[r][c]);
                    }
                }
            }
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                out[r][c] = hsum(acc[r][c]);
                if K == Q4_1 {
                    let (m, sx) = (&w.m[(o + r) * nb..(o + r + 1) * nb], &x.s[(s + c) * nb..(s + c + 1) * nb]);
                    let mut mins = 0f32;
                    for i in 0..nb {
                        mins += m[i] * sx[i];
                    }
                    out[r][c] += mins;
                }
            }
        }
        out
    }

    #[inline(always)]
    unsafe fn tiles<const K: u8, const V: bool>(m: &BlockMatrix, o0: usize, o1: usize, x: &QuantizedRows, seq: usize, put: &mut impl FnMut(usize, usize, f32)) {
        unsafe {
            if seq < 4 {
                let mut o = o0;
                while o + 4 <= o1 {
                    for s in 0..seq {
                        let t = tile::<K, 4, 1, V>(m, o, x, s);
                        (0..4).for_each(|r| put(o + r, s, t[r][0]));
                    }
                    o += 4;
                }
                for o in o..o1 {
                    for s in 0..seq {
                        put(o, s, tile::<K, 1, 1, V>(m, o, x, s)[0][0]);
                    }
                }
                return;
            }
            let mut o = o0;
            while o < o1 {
                let two = o + 2 <= o1;
                let mut s = 0;
                while s + 4 <= seq {
                    if two {
                        let t = tile::<K, 2, 4, V>(m, o, x, s);
                        (0..2).for_each(|r| (0..4).for_each(|c| put(o + r, s + c, t[r][c])));
                    } else {
                        let t = tile::<K, 1, 4, V>(m, o, x, s);
                        (0..4).for_each(|c| put(o, s + c, t[0][c]));
                    }
                    s += 4;
                }
                for s in s..seq {
                    for r in 0..if two { 2 } else { 1 } {
                        put(o + r, s, tile::<K, 1, 1, V>(m, o + r, x, s)[0][0]);
                    }
                }
                o += if two { 2 } else { 1 };
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_times_cols(m: &BlockMatrix, o0: usize, o1: usize, x: &QuantizedRows, seq: usize, put: &mut impl FnMut(usize, usize, f32)) {
        unsafe {
            match m.kind {
                BlockKind::Q4_0 => tiles::<Q4_0, false>(m, o0, o1, x, seq, put),
                BlockKind::Q4_1 => tiles::<Q4_1, false>(m, o0, o1, x, seq, put),
                BlockKind::Q8_0 => tiles::<Q8_0, false>(m, o0, o1, x, seq, put),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub unsafe fn rows_times_cols_vnni(m: &BlockMatrix, o0: usize, o1: usize, x: &QuantizedRows, seq: usize, put: &mut impl FnMut(usize, usize, f32)) {
        unsafe {
            match m.kind {
                BlockKind::Q4_0 => tiles::<Q4_0, true>(m, o0, o1, x, seq, put),
                BlockKind::Q4_1 => tiles::<Q4_1, true>(m, o0, o1, x, seq, put),
                BlockKind::Q8_0 => tiles::<Q8_0, true>(m, o0, o1, x, seq, put),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        }
    }

    #[test]
    fn simd_kernels_equal_the_scalar_sums() {
        // Every tile shape: decode (seq < 4: 4-row tiles and leftover rows), prefill (2x4
        // tiles, an odd last row, leftover columns).
        let (out, inp) = (37, 96);
        let mut r = lcg(7);
        let w: Vec<f32> = (0..out * inp).map(|_| r()).collect();
        for seq in [1, 3, 6, 9] {
            let x: Vec<f32> = (0..seq * inp).map(|_| r()).collect();
            for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let t = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&t, dt).unwrap();
                let Linear::Blocks(m) = Linear::from_qtensor(q).unwrap() else { panic!("{dt:?} not on own kernels") };
                let got = m.matmul(&x, seq);
                let xq = quantize_rows(&x, seq, inp, m.kind == BlockKind::Q4_1);
                for s in 0..seq {
                    for o in 0..out {
                        let want = dot_scalar(&m, o, &xq, s);
                        let g = got[s * out + o];
                        assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "{dt:?} seq{seq} s{s} o{o}: {g} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_gguf_matrix_type_multiplies_close_to_its_dequantized_weight() {
        // The types the engine takes from GGUF files: own kernels, candle's QMatMul, or
        // dense (F16/BF16). Activation rounding (8 bits per block, Q8_K for the K-quants)
        // is the only difference allowed.
        let (out, inp, seq) = (64, 512, 3);
        let mut r = lcg(5);
        let w: Vec<f32> = (0..out * inp).map(|_| r()).collect();
        let x = Tensor::from_vec((0..seq * inp).map(|_| r()).collect::<Vec<f32>>(), (seq, inp), &Device::Cpu).unwrap();
        use GgmlDType::*;
        for dt in [F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K] {
            let t = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
            let lin = Linear::from_qtensor(QTensor::quantize(&t, dt).unwrap()).unwrap();
            let dense = Linear::Dense(lin.dequantize().unwrap());
            let a: Vec<f32> = lin.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = dense.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let num: f32 = a.iter().zip(&b).map(|(p, q)| (p - q).powi(2)).sum();
            let den: f32 = b.iter().map(|q| q * q).sum();
            let rel = (num / den).sqrt();
            assert!(rel < 2e-2, "{dt:?} ({}): rel {rel}", lin.type_name());
        }
    }

    #[test]
    fn own_dequantizer_equals_candles() {
        let mut r = lcg(3);
        let w: Vec<f32> = (0..8 * 64).map(|_| r()).collect();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let t = Tensor::from_vec(w.clone(), (8, 64), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, dt).unwrap();
            let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let Linear::Blocks(m) = Linear::from_qtensor(q).unwrap() else { panic!() };
            assert_eq!(m.dequantize(), want, "{dt:?}");
        }
    }

    #[test]
    fn quantized_matmul_is_close_to_the_dense_one() {
        // Activation quantization to 8 bits costs ~1e-2 relative (docs/traps.md), not more.
        let (out, inp, seq) = (64, 128, 5);
        let mut r = lcg(11);
        let w: Vec<f32> = (0..out * inp).map(|_| r()).collect();
        let x: Vec<f32> = (0..seq * inp).map(|_| r()).collect();
        let xt = Tensor::from_vec(x, (seq, inp), &Device::Cpu).unwrap();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let t = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
            let lin = Linear::from_qtensor(QTensor::quantize(&t, dt).unwrap()).unwrap();
            let dense = Linear::Dense(lin.dequantize().unwrap());
            let a: Vec<f32> = lin.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = dense.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
            let den: f32 = b.iter().map(|y| y * y).sum();
            let rel = (num / den).sqrt();
            assert!(rel < 1.5e-2 && rel > 0.0, "{dt:?}: rel {rel}");
        }
    }
}
