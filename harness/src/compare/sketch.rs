//! Sketches: a fixed-size summary of a tensor that can still be compared.
//!
//! A golden trace cannot keep every activation of a 30-layer model at every step in full
//! (SmolLM2: ~40 KB per layer per position). For the layers it does not keep, it keeps a
//! sketch of each site: the exact sum of squares, the largest |x|, a NaN/Inf flag, and
//! [`K`] random projections `y_j = sum_i s_ij x_i` with signs `s_ij = ±1` taken from the
//! bits of a fixed hash of the flat index `i` (a Johnson–Lindenstrauss sketch with
//! Rademacher signs, as in Achlioptas 2003). Projections are linear, so the sketch of a
//! difference is the difference of the sketches, and `sum_j (y_j(a) - y_j(b))^2 / K` is an
//! unbiased estimate of `||a - b||^2`. With K = 64 the estimated `||a - b||` has a relative
//! standard error of 1/sqrt(2K) ≈ 9%; the verdict bands of `tolerance.rs` are two decades
//! apart, so a sketched site gets the same verdict as the full tensor would, except within
//! ~10% of a bound.
//!
//! It does not own the choice of what is sketched (that is `record.rs`) nor the file format
//! (`trace.rs`). Everything is computed in f64 from the same code on both sides, so a
//! sketch is a deterministic function of the tensor's values and its flat order.

use super::metrics::TensorMetrics;

/// Number of random projections per sketch (one bit of a 64-bit hash each).
pub const K: usize = 64;

/// Seed of the sign hash: part of the trace format (changing it invalidates every trace).
const SEED: u64 = 0x6c6f_636b_7374_6570; // "lockstep"

/// splitmix64 (Steele, Lea, Flood 2014): a fixed, well-mixed 64-bit hash.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The summary of one tensor kept by a trace for a site it does not store in full.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    /// sum of x^2
    pub sum_sq: f64,
    /// max |x| over the finite elements
    pub max_abs: f64,
    /// some element is NaN or Inf
    pub nonfinite: bool,
    /// y_j = sum_i s_ij x_i
    pub proj: [f64; K],
}

impl Sketch {
    pub fn of<T: Copy + Into<f64>>(x: &[T]) -> Sketch {
        let mut proj = [0.0f64; K];
        let (mut sum_sq, mut max_abs, mut nonfinite) = (0.0f64, 0.0f64, false);
        for (i, &v) in x.iter().enumerate() {
            let v: f64 = v.into();
            if v.is_finite() {
                max_abs = max_abs.max(v.abs());
            } else {
                nonfinite = true;
            }
            sum_sq += v * v;
            let h = splitmix64(SEED ^ i as u64);
            for (j, p) in proj.iter_mut().enumerate() {
                // bit j set: +v, clear: -v (branch-free, so the loop vectorizes)
                *p += v * ((((h >> j) & 1) as f64) * 2.0 - 1.0);
            }
        }
        Sketch { sum_sq, max_abs, nonfinite, proj }
    }

    /// Flat form stored in a trace: `[sum_sq, max_abs, nonfinite (0 or 1), y_0 .. y_{K-1}]`.
    pub fn to_vec(&self) -> Vec<f64> {
        let mut v = Vec::with_capacity(3 + K);
        v.extend([self.sum_sq, self.max_abs, if self.nonfinite { 1.0 } else { 0.0 }]);
        v.extend_from_slice(&self.proj);
        v
    }

    pub fn from_slice(v: &[f64]) -> Option<Sketch> {
        if v.len() != 3 + K {
            return None;
        }
        let mut proj = [0.0; K];
        proj.copy_from_slice(&v[3..]);
        Some(Sketch { sum_sq: v[0], max_abs: v[1], nonfinite: v[2] != 0.0, proj })
    }
}

/// Engine (or reference) `a` against reference `b`, from their sketches: the comparator of
/// sketched sites. `rel_l2` is the estimate above divided by the exact ||b||; `cosine`
/// follows from the exact norms and the estimated distance; `max_abs` is
/// | max|a| - max|b| |, a lower bound of max |a - b|, and `max_abs_index` means nothing.
/// `estimated` is set so that reports can say so.
pub fn metrics(a: &Sketch, b: &Sketch) -> TensorMetrics {
    let d2 = a.proj.iter().zip(&b.proj).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / K as f64;
    let (na, nb) = (a.sum_sq, b.sum_sq);
    let rel_l2 = if nb > 0.0 { (d2 / nb).sqrt() } else { d2.sqrt() };
    let cosine = if na == 0.0 && nb == 0.0 {
        1.0
    } else if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        ((na + nb - d2) / (2.0 * (na * nb).sqrt())).clamp(-1.0, 1.0)
    };
    TensorMetrics {
        max_abs: (a.max_abs - b.max_abs).abs(),
        max_abs_index: 0,
        rel_l2,
        cosine,
        nonfinite_engine: a.nonfinite,
        nonfinite_reference: b.nonfinite,
        estimated: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::metrics::tensor_metrics;
    use proptest::prelude::*;

    fn vec_f32(n: std::ops::Range<usize>) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(-10.0f32..10.0, n)
    }

    proptest! {
        #[test]
        fn sketch_estimates_rel_l2_within_a_factor_of_two(
            b in vec_f32(64..2000), eps in 1e-7f64..1e-1, seed in any::<u64>(),
        ) {
            // a = b + a perturbation of relative size ~eps.
            let a: Vec<f64> = b.iter().enumerate()
                .map(|(i, &x)| x as f64 + eps * ((splitmix64(seed ^ i as u64) % 2001) as f64 / 1000.0 - 1.0) * 10.0)
                .collect();
            let exact = tensor_metrics(&a, &b);
            let est = metrics(&Sketch::of(&a), &Sketch::of(&b));
            prop_assume!(exact.rel_l2 > 0.0);
            let ratio = est.rel_l2 / exact.rel_l2;
            prop_assert!((0.5..2.0).contains(&ratio), "exact {} estimate {}", exact.rel_l2, est.rel_l2);
            prop_assert!(est.estimated);
            // cosine = (|a|²+|b|²-|a-b|²) / (2|a||b|): its error is that of |a-b|², ~rel².
            prop_assert!((est.cosine - exact.cosine).abs() <= exact.rel_l2.powi(2) + 1e-9,
                "cosine exact {} estimate {}", exact.cosine, est.cosine);
        }

        #[test]
        fn identical_tensors_have_zero_estimated_error(b in vec_f32(1..500)) {
            let m = metrics(&Sketch::of(&b), &Sketch::of(&b));
            prop_assert_eq!(m.rel_l2, 0.0);
            prop_assert_eq!(m.max_abs, 0.0);
        }

        #[test]
        fn flat_form_round_trips(b in vec_f32(1..300)) {
            let s = Sketch::of(&b);
            prop_assert_eq!(Sketch::from_slice(&s.to_vec()), Some(s));
        }
    }

    #[test]
    fn nan_is_flagged() {
        let s = Sketch::of(&[1.0f32, f32::NAN]);
        assert!(s.nonfinite);
        let m = metrics(&s, &Sketch::of(&[1.0f32, 2.0]));
        assert!(m.nonfinite_engine && !m.nonfinite_reference);
    }

    #[test]
    fn the_sign_hash_is_fixed() {
        // Part of the trace format: recorded sketches are only comparable under this hash.
        // Values from an independent implementation of splitmix64 (Python).
        assert_eq!(splitmix64(SEED), 0x2a03_9f45_4559_1008);
        assert_eq!(splitmix64(SEED ^ 2), 0x4421_56b8_08ba_8cd5);
        let s = Sketch::of(&[1.0f32, 2.0, 3.0]);
        assert_eq!(s.proj[..8], [0.0, -2.0, 0.0, -4.0, 0.0, -6.0, 0.0, 0.0]);
        assert_eq!((s.sum_sq, s.max_abs), (14.0, 3.0));
    }
}
