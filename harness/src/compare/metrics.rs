//! Comparators: how far apart two tensors, or two logit vectors, are (pure functions of
//! two slices; [`super::data`] dispatches them over borrowed reference data).
//!
//! Everything is computed in f64 over the flat, row-major data of two tensors of the
//! same shape. The reference side is a borrowed slice (numpy memory, no copy); the
//! engine side is whatever the engine produced, widened to f64.

use serde::Serialize;

/// Distance between an engine tensor `a` and a reference tensor `b`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TensorMetrics {
    /// max |a - b|
    pub max_abs: f64,
    /// flat index of the element with the largest |a - b|
    pub max_abs_index: usize,
    /// ||a - b|| / ||b|| (||a - b|| alone when b is all zeros)
    pub rel_l2: f64,
    /// a·b / (||a|| ||b||); 1 when both are zero
    pub cosine: f64,
    /// NaN or Inf in the engine tensor
    pub nonfinite_engine: bool,
    /// NaN or Inf in the reference tensor
    pub nonfinite_reference: bool,
    /// Compared through sketches (a trace keeps some sites as statistics, `sketch.rs`):
    /// rel_l2 and cosine are estimates, max_abs a lower bound, max_abs_index meaningless.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

/// Compares two equally long slices. Panics only on a length mismatch, which callers
/// rule out by comparing shapes first.
pub fn tensor_metrics<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> TensorMetrics {
    assert_eq!(a.len(), b.len(), "tensor_metrics on slices of different lengths");
    let (mut max_abs, mut max_abs_index) = (0.0f64, 0usize);
    let (mut diff2, mut aa, mut bb, mut ab) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut nf_a, mut nf_b) = (false, false);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let (x, y): (f64, f64) = (x.into(), y.into());
        nf_a |= !x.is_finite();
        nf_b |= !y.is_finite();
        let d = (x - y).abs();
        // `!(d <= max)` also catches a NaN difference, so it is reported, not hidden.
        if !(d <= max_abs) && !max_abs.is_nan() {
            max_abs = d;
            max_abs_index = i;
        }
        diff2 += d * d;
        aa += x * x;
        bb += y * y;
        ab += x * y;
    }
    let rel_l2 = if bb > 0.0 { (diff2 / bb).sqrt() } else { diff2.sqrt() };
    let cosine = if aa == 0.0 && bb == 0.0 {
        1.0
    } else if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    };
    TensorMetrics { max_abs, max_abs_index, rel_l2, cosine, nonfinite_engine: nf_a, nonfinite_reference: nf_b, estimated: false }
}

/// log(sum(exp(x))) in f64, shifted by the largest value.
pub fn log_sum_exp<T: Copy + Into<f64>>(x: &[T]) -> f64 {
    let m = x.iter().map(|&v| v.into()).fold(f64::NEG_INFINITY, f64::max);
    m + x.iter().map(|&v| (v.into() - m).exp()).sum::<f64>().ln()
}

/// Log-softmax in f64.
pub fn log_softmax<T: Copy + Into<f64>>(x: &[T]) -> Vec<f64> {
    let lse = log_sum_exp(x);
    x.iter().map(|&v| v.into() - lse).collect()
}

/// Indices of the `k` largest values, largest first (lower index first on ties).
pub fn top_k(x: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    let k = k.min(x.len());
    let cmp = |&i: &usize, &j: &usize| x[j].partial_cmp(&x[i]).unwrap_or(std::cmp::Ordering::Equal).then(i.cmp(&j));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx.truncate(k);
    idx
}

/// The logits of one position, engine vs reference, as distributions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogitMetrics {
    /// KL(reference || engine) in nats.
    pub kl: f64,
    /// |top-k(engine) ∩ top-k(reference)| / k
    pub top_k_overlap: f64,
    pub k: usize,
    pub engine_top1: u32,
    pub reference_top1: u32,
    pub top1_agree: bool,
    /// Engine's top-1 minus top-2 log-probability: how close the choice was to a flip.
    pub engine_margin: f64,
    /// The same on the reference side.
    pub reference_margin: f64,
    /// p_engine(t) - p_reference(t) for the reference's top token t: llama.cpp's
    /// `perplexity --kl-divergence` "Δp" statistic.
    pub delta_p: f64,
}

pub const TOP_K: usize = 10;

pub fn logit_metrics<A: Copy + Into<f64>, B: Copy + Into<f64>>(engine: &[A], reference: &[B]) -> LogitMetrics {
    assert_eq!(engine.len(), reference.len(), "logit_metrics on slices of different lengths");
    let le = log_softmax(engine);
    let lr = log_softmax(reference);
    let kl = lr
        .iter()
        .zip(&le)
        .map(|(&r, &e)| if r == f64::NEG_INFINITY { 0.0 } else { r.exp() * (r - e) })
        .sum::<f64>()
        .max(0.0);
    let te = top_k(&le, TOP_K.max(2));
    let tr = top_k(&lr, TOP_K.max(2));
    let k = TOP_K.min(le.len());
    let overlap = te[..k].iter().filter(|i| tr[..k].contains(i)).count() as f64 / k.max(1) as f64;
    let margin = |l: &[f64], t: &[usize]| if t.len() >= 2 { l[t[0]] - l[t[1]] } else { f64::INFINITY };
    LogitMetrics {
        kl,
        top_k_overlap: overlap,
        k,
        engine_top1: te[0] as u32,
        reference_top1: tr[0] as u32,
        top1_agree: te[0] == tr[0],
        engine_margin: margin(&le, &te),
        reference_margin: margin(&lr, &tr),
        delta_p: le[tr[0]].exp() - lr[tr[0]].exp(),
    }
}

/// [`logit_metrics`] against a reference row kept as its top entries only (a trace of a long
/// prefill, `golden/trace.rs`): `idx`/`logit` the reference's `idx.len()` largest logits, in
/// order, and `lse` the log-sum-exp of its whole row. KL is taken over those tokens and the
/// rest of the vocabulary as one outcome: a lower bound of the full KL (grouping outcomes
/// never raises a KL), equal to it when the rest holds no mass on either side. The top-k
/// overlap, top-1s, margins and Δp are exact while `idx.len() >= TOP_K`.
pub fn logit_metrics_topk<A: Copy + Into<f64>>(engine: &[A], idx: &[u32], logit: &[f32], lse: f64) -> LogitMetrics {
    let le = log_softmax(engine);
    let lr: Vec<f64> = logit.iter().map(|&x| x as f64 - lse).collect();
    let (mut kl, mut p_top, mut q_top) = (0.0f64, 0.0f64, 0.0f64);
    for (&i, &r) in idx.iter().zip(&lr) {
        let e = le[i as usize];
        let p = r.exp();
        if p > 0.0 {
            kl += p * (r - e);
        }
        p_top += p;
        q_top += e.exp();
    }
    let (p_rest, q_rest) = ((1.0 - p_top).max(0.0), (1.0 - q_top).max(f64::MIN_POSITIVE));
    if p_rest > 0.0 {
        kl += p_rest * (p_rest.ln() - q_rest.ln());
    }
    let te = top_k(&le, TOP_K.max(2));
    let k = TOP_K.min(le.len()).min(idx.len().max(1));
    let overlap = te[..k].iter().filter(|&&i| idx[..k].contains(&(i as u32))).count() as f64 / k.max(1) as f64;
    let r0 = idx.first().copied().unwrap_or(0);
    LogitMetrics {
        kl: kl.max(0.0),
        top_k_overlap: overlap,
        k,
        engine_top1: te[0] as u32,
        reference_top1: r0,
        top1_agree: te[0] as u32 == r0,
        engine_margin: if te.len() >= 2 { le[te[0]] - le[te[1]] } else { f64::INFINITY },
        reference_margin: if lr.len() >= 2 { lr[0] - lr[1] } else { f64::INFINITY },
        delta_p: le[r0 as usize].exp() - lr.first().map_or(0.0, |r| r.exp()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_top_k_row_gives_the_full_rows_top1_and_a_kl_no_larger(e in vec_f32(64..200), r in vec_f32(64..200)) {
            let n = e.len().min(r.len());
            let (e, r) = (&e[..n], &r[..n]);
            let full = logit_metrics(e, r);
            let lr = log_softmax(r);
            let top = top_k(&lr, 32);
            let lse = r[top[0]] as f64 - lr[top[0]];
            let idx: Vec<u32> = top.iter().map(|&i| i as u32).collect();
            let logit: Vec<f32> = top.iter().map(|&i| r[i]).collect();
            let t = logit_metrics_topk(e, &idx, &logit, lse);
            prop_assert_eq!(t.reference_top1, full.reference_top1);
            prop_assert_eq!(t.top1_agree, full.top1_agree);
            prop_assert!(t.kl <= full.kl + 1e-9, "top-k KL {} above the full {}", t.kl, full.kl);
            prop_assert!((t.delta_p - full.delta_p).abs() < 1e-9);
            prop_assert!((t.top_k_overlap - full.top_k_overlap).abs() < 1e-12);
        }
    }

    fn vec_f32(n: std::ops::Range<usize>) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(-100.0f32..100.0, n)
    }

    proptest! {
        #[test]
        fn identical_tensors_have_zero_error(a in vec_f32(1..400)) {
            let m = tensor_metrics(&a, &a);
            prop_assert_eq!(m.max_abs, 0.0);
            prop_assert_eq!(m.rel_l2, 0.0);
            prop_assert!(!m.nonfinite_engine && !m.nonfinite_reference);
            if a.iter().any(|&x| x != 0.0) {
                prop_assert!((m.cosine - 1.0).abs() < 1e-12);
            }
        }

        #[test]
        fn one_perturbed_element_is_found_at_its_index(
            a in vec_f32(1..400), idx in any::<prop::sample::Index>(), delta in 0.5f32..50.0,
        ) {
            let i = idx.index(a.len());
            let mut b = a.clone();
            b[i] += delta;
            let m = tensor_metrics(&b, &a);
            prop_assert_eq!(m.max_abs_index, i);
            prop_assert!((m.max_abs - (b[i] as f64 - a[i] as f64).abs()).abs() < 1e-9);
            prop_assert!(m.rel_l2 > 0.0);
        }

        #[test]
        fn rel_l2_is_scale_invariant(a in vec_f32(2..200), s in 0.01f64..100.0) {
            let b: Vec<f64> = a.iter().map(|&x| x as f64 * 1.001).collect();
            let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            let m1 = tensor_metrics(&b, &a64);
            let bs: Vec<f64> = b.iter().map(|x| x * s).collect();
            let as_: Vec<f64> = a64.iter().map(|x| x * s).collect();
            let m2 = tensor_metrics(&bs, &as_);
            prop_assert!((m1.rel_l2 - m2.rel_l2).abs() <= 1e-9 * m1.rel_l2.max(1e-12));
        }

        #[test]
        fn kl_of_identical_distributions_is_zero(l in vec_f32(2..300)) {
            let m = logit_metrics(&l, &l);
            prop_assert!(m.kl.abs() < 1e-12, "kl {}", m.kl);
            prop_assert!(m.top1_agree);
            prop_assert_eq!(m.top_k_overlap, 1.0);
        }

        #[test]
        fn kl_is_shift_invariant_and_nonnegative(l in vec_f32(2..300), c in -50.0f32..50.0, r in vec_f32(2..300)) {
            let shifted: Vec<f32> = l.iter().map(|x| x + c).collect();
            prop_assert!(logit_metrics(&shifted, &l).kl < 1e-9);
            let n = l.len().min(r.len());
            prop_assert!(logit_metrics(&l[..n], &r[..n]).kl >= 0.0);
        }
    }

    #[test]
    fn nan_is_reported_not_hidden() {
        let a = [1.0f32, f32::NAN, 3.0];
        let b = [1.0f32, 2.0, 3.0];
        let m = tensor_metrics(&a, &b);
        assert!(m.nonfinite_engine);
        assert!(!m.nonfinite_reference);
        assert!(m.rel_l2.is_nan() || m.rel_l2 > 0.0);
    }

    #[test]
    fn swapped_top_tokens_disagree_with_margin() {
        let e = [0.0f32, 2.0, 1.0];
        let r = [0.0f32, 1.0, 2.0];
        let m = logit_metrics(&e, &r);
        assert!(!m.top1_agree);
        assert_eq!((m.engine_top1, m.reference_top1), (1, 2));
        assert!((m.engine_margin - 1.0).abs() < 1e-12);
        assert!(m.kl > 0.0);
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[5.0], 3), vec![0]);
    }
}
