//! The softmax of one row of f32 scores, with an exponential that gives the same bits on
//! every x86-64 CPU and in every code path.
//!
//! glibc's `expf` is correctly rounded in most cases but scalar (a decode step at 4,096
//! positions calls it a million times); a vectorized exponential is fast but, written
//! differently in the plain and the AVX2 path, would make the engine's results depend on the
//! CPU. [`expf`] is one algorithm written twice with the same operations in the same order
//! (fused multiply-adds in both: `f32::mul_add` is correctly rounded, as `vfmadd` is), so the
//! two paths give the same bits; a test checks it on every kind of input.
//!
//! The algorithm is the one ggml's `ggml_v_expf` uses (from Arm's optimized-routines,
//! maximum error 1.45 + 0.5 ulp): `x = n ln2 + b` with `n` rounded to an integer, a degree-5
//! polynomial for `exp(b) - 1`, and `2^n` put into the exponent bits; `|n| > 126` scales in
//! two steps so results near the ends of the range are neither lost nor doubled. Above
//! ~88.7 the result is `inf`, below ~-103.97 it is `0`; `exp(-inf) = 0` and NaN stays NaN.
//! The row's sum is ggml's `ggml_vec_soft_max_f32`'s: eight exponentials summed in f32 as
//! AVX2's horizontal add does, each eight added to an f64 total.

/// `0x1.8p23`: added and subtracted, rounds to an integer (and keeps it in the low bits).
const SHIFT: u32 = 0x4b40_0000;
/// `log2(e)`, `0x1.715476p+0`.
const LOG2E: u32 = 0x3fb8_aa3b;
/// `ln 2` in two parts, `0x1.62e4p-1` and `0x1.7f7d1cp-20`.
const LN2_HI: u32 = 0x3f31_7200;
const LN2_LO: u32 = 0x35bf_be8e;
/// The polynomial's coefficients, highest degree first.
const C: [u32; 5] = [0x3c07_2010, 0x3d2b_9f17, 0x3e2a_af33, 0x3eff_fedb, 0x3f7f_fff6];

#[inline(always)]
fn f(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// `e^x` (see the module's notes), the plain form of the AVX2 one: the same bits.
#[inline]
pub fn expf(x: f32) -> f32 {
    let z = x.mul_add(f(LOG2E), f(SHIFT));
    let n = z - f(SHIFT);
    let b = (-n).mul_add(f(LN2_LO), (-n).mul_add(f(LN2_HI), x));
    let e = z.to_bits() << 23;
    let k = f(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = f(C[0]).mul_add(b, f(C[1])).mul_add(u, f(C[2]).mul_add(b, f(C[3]))).mul_add(u, f(C[4]) * b);
    // NaN takes this branch (`is_nan`), as the AVX2 form's ordered compare sends it.
    if n.abs() <= 126.0 || n.is_nan() {
        return k.mul_add(j, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f(g.wrapping_add(0x7f00_0000));
    let s2 = f(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// The sum of eight values in the order of AVX2's reduction: the high half onto the low
/// half, then the upper pair onto the lower, then the two left.
#[inline(always)]
fn sum8(v: &[f32; 8]) -> f32 {
    let h = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Softmax of `row` in place; returns the row's max and the sum of its exponentials (f64).
/// A row that is all `-inf` or holds a NaN becomes NaN, as the textbook formula gives.
pub fn softmax_row_stats(row: &mut [f32]) -> (f32, f64) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { avx2::softmax_row_stats(row) };
    }
    softmax_row_stats_plain(row)
}

/// [`softmax_row_stats`] without SIMD registers: the same operations, the same bits.
pub fn softmax_row_stats_plain(row: &mut [f32]) -> (f32, f64) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut v = [0f32; 8];
        for (o, x) in v.iter_mut().zip(c.iter()) {
            *o = expf(*x - m);
        }
        c.copy_from_slice(&v);
        sum += sum8(&v) as f64;
    }
    for e in chunks.into_remainder() {
        *e = expf(*e - m);
        sum += *e as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|e| *e *= inv);
    (m, sum)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{expf, f, C, LN2_HI, LN2_LO, LOG2E, SHIFT};

    pub fn available() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// [`expf`] of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn expf8(x: __m256) -> __m256 {
        let set = |b: u32| _mm256_set1_ps(f(b));
        let z = _mm256_fmadd_ps(x, set(LOG2E), set(SHIFT));
        let n = _mm256_sub_ps(z, set(SHIFT));
        let b = _mm256_fnmadd_ps(n, set(LN2_LO), _mm256_fnmadd_ps(n, set(LN2_HI), x));
        let e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
        let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1.0))));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let c = _mm256_cmp_ps(abs_n, _mm256_set1_ps(126.0), _CMP_GT_OQ);
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_fmadd_ps(set(C[0]), b, set(C[1])), u, _mm256_fmadd_ps(set(C[2]), b, set(C[3]))),
            u,
            _mm256_mul_ps(set(C[4]), b),
        );
        let usual = _mm256_fmadd_ps(k, j, k);
        if _mm256_movemask_ps(c) == 0 {
            return usual;
        }
        let g = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)), _mm256_set1_epi32(0x8200_0000u32 as i32));
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let d = _mm256_cmp_ps(abs_n, _mm256_set1_ps(192.0), _CMP_GT_OQ);
        let far = _mm256_mul_ps(s1, s1);
        let near = _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1);
        _mm256_blendv_ps(_mm256_blendv_ps(usual, near, c), far, d)
    }

    #[inline(always)]
    unsafe fn sum8(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
    }

    /// [`super::softmax_row_stats_plain`] with AVX2 registers.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_row_stats(row: &mut [f32]) -> (f32, f64) {
        let n = row.len();
        let p = row.as_mut_ptr();
        // The max: `max_ps(x, acc)` keeps `acc` when `x` is NaN, as `f32::max` ignores a NaN.
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), acc);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let m = lanes.iter().chain(&row[i..]).copied().fold(f32::NEG_INFINITY, f32::max);
        let mv = _mm256_set1_ps(m);
        let mut sum = 0f64;
        let mut i = 0;
        while i + 8 <= n {
            let v = expf8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            _mm256_storeu_ps(p.add(i), v);
            sum += sum8(v) as f64;
            i += 8;
        }
        for e in &mut row[i..] {
            *e = expf(*e - m);
            sum += *e as f64;
        }
        let inv = _mm256_set1_ps((1.0 / sum) as f32);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
            i += 8;
        }
        let inv = (1.0 / sum) as f32;
        row[i..].iter_mut().for_each(|e| *e *= inv);
        (m, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of every kind: the usual range, both ends of it, the scaled region past
    /// |n| = 126, the limits, zeros, infinities and NaN.
    fn inputs() -> Vec<f32> {
        let mut v = vec![0.0, -0.0, 1.0, -1.0, 88.3, 88.38, 88.72, 88.73, 100.0, -87.0, -87.34, -100.0, -103.9, -103.98, -110.0, -200.0];
        v.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 1e-30, -1e-30]);
        let mut s = 0x2545_f491u32;
        for _ in 0..20_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            v.push((s as f32 / u32::MAX as f32) * 240.0 - 150.0);
        }
        v
    }

    #[test]
    fn the_exponential_is_within_two_ulps_of_f64_where_the_result_is_normal() {
        for x in inputs() {
            let (got, want) = (expf(x), (x as f64).exp());
            if x.is_nan() {
                assert!(got.is_nan());
            } else if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            } else if want >= f32::MIN_POSITIVE as f64 {
                let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
                assert!(ulp <= 2, "exp({x}) = {got}, f64 says {want} ({ulp} ulps)");
            } else {
                // Subnormal or zero: within the smallest normal.
                assert!((got as f64 - want).abs() <= f32::MIN_POSITIVE as f64, "exp({x}) = {got}, f64 says {want}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_exponential_and_softmax_give_the_plain_bits() {
        use std::arch::x86_64::*;
        if !avx2::available() {
            eprintln!("no AVX2 on this CPU: the plain path is the only one");
            return;
        }
        let xs = inputs();
        for c in xs.chunks_exact(8) {
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA checked above.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), avx2::expf8(_mm256_loadu_ps(c.as_ptr()))) };
            for (x, o) in c.iter().zip(out) {
                assert_eq!(o.to_bits(), expf(*x).to_bits(), "exp({x})");
            }
        }
        // Rows of every length round a multiple of 8, scores as attention gives them.
        for n in [1, 7, 8, 9, 63, 64, 517] {
            let row: Vec<f32> = xs.iter().filter(|x| x.is_finite()).take(n).map(|x| x / 10.0).collect();
            let (mut a, mut b) = (row.clone(), row);
            // SAFETY: checked above.
            let sa = unsafe { avx2::softmax_row_stats(&mut a) };
            let sb = softmax_row_stats_plain(&mut b);
            assert_eq!((sa.0.to_bits(), sa.1.to_bits()), (sb.0.to_bits(), sb.1.to_bits()), "n = {n}");
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "n = {n}");
            let total: f64 = a.iter().map(|&p| p as f64).sum();
            assert!((total - 1.0).abs() < 1e-5, "n = {n}: sums to {total}");
        }
    }

    #[test]
    fn a_masked_row_keeps_its_mass_on_the_seen_columns_and_nan_spreads() {
        let mut row = vec![0.5, f32::NEG_INFINITY, 1.5, f32::NEG_INFINITY, -2.0, 0.0, 3.0, 1.0, 2.0];
        softmax_row_stats(&mut row);
        assert_eq!((row[1], row[3]), (0.0, 0.0));
        let want: Vec<f64> = {
            let xs = [0.5f64, 1.5, -2.0, 0.0, 3.0, 1.0, 2.0];
            let s: f64 = xs.iter().map(|x| (x - 3.0).exp()).sum();
            xs.iter().map(|x| (x - 3.0).exp() / s).collect()
        };
        let got = [row[0], row[2], row[4], row[5], row[6], row[7], row[8]];
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        let mut bad = vec![1.0, f32::NAN, 2.0];
        softmax_row_stats(&mut bad);
        assert!(bad.iter().all(|x| x.is_nan()));
    }
}
