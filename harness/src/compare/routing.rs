//! Comparing a sparse mixture of experts' routing: pure functions from two `(seq, n_experts)`
//! tensors to the positions where the two sides choose other experts.
//!
//! - At a `router` site (router logits), each side's choice is recomputed from its own
//!   logits as Mixtral defines it (softmax over the experts, the `k` most probable), with the
//!   **router margin** that decided it: the k-th minus the (k+1)-th probability. A small
//!   margin means the choice flips on noise; a large one means the logits really differ.
//! - At an `expert_weights` site (the weight each expert received, zero where not chosen), the
//!   choice is the set of experts with a non-zero weight, and the weights' per-position sums
//!   are checked (they are 1 when the top-k weights are renormalised, as in Mixtral).
//!
//! The record names the first positions that differ ([`ChoiceDiff`]); the diagnosis table
//! (`crate::diagnosis`) reads it.

use serde::Serialize;

/// How many differing positions a record keeps (the count is kept whole).
pub const KEEP_DIFFS: usize = 8;

/// Below this router margin (a probability difference), a different choice is a near-tie:
/// float noise of the order of the run's tolerances can flip it.
pub const NEAR_TIE_MARGIN: f64 = 1e-3;

/// A position where the two sides route to other experts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChoiceDiff {
    pub position: usize,
    /// The chosen experts, ascending.
    pub engine: Vec<usize>,
    pub reference: Vec<usize>,
    /// The router margin on each side (router sites only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_margin: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_margin: Option<f64>,
}

/// The routing comparison of one MoE site at one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutingRecord {
    /// Experts per position.
    pub top_k: usize,
    /// Positions whose chosen experts differ (the first [`KEEP_DIFFS`]).
    pub choice_diffs: Vec<ChoiceDiff>,
    pub n_choice_diffs: usize,
    /// Router sites: the smallest router margin over the positions (reference side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_margin: Option<f64>,
    /// Router sites: the reference's margin at every position (for the diagnosis; not in JSON).
    #[serde(skip)]
    pub margins: Vec<f64>,
    /// Expert-weight sites: the largest |sum of a position's weights - 1| on each side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_sum_error: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_sum_error: Option<f64>,
}

impl RoutingRecord {
    /// One line for the run's table: the first different choice, or nothing.
    pub fn note(&self) -> Option<String> {
        let d = self.choice_diffs.first()?;
        let margin = match (d.engine_margin, d.reference_margin) {
            (Some(e), Some(r)) => format!(", router margin {r:.4} (engine {e:.4})"),
            _ => String::new(),
        };
        let more = match self.n_choice_diffs {
            1 => String::new(),
            n => format!(" ({n} positions differ)"),
        };
        Some(format!(
            "expert choice differs at position {}: engine {:?}, reference {:?}{margin}{more}",
            d.position, d.engine, d.reference
        ))
    }
}

/// The `k` most probable experts of one position's router logits (ascending) and the margin
/// (k-th minus (k+1)-th probability; 1 when every expert is chosen).
pub fn router_choice(logits: &[f64], k: usize) -> (Vec<usize>, f64) {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
    let k = k.min(logits.len());
    let margin = if k < logits.len() { (e[order[k - 1]] - e[order[k]]) / sum } else { 1.0 };
    let mut chosen = order[..k].to_vec();
    chosen.sort_unstable();
    (chosen, margin)
}

/// The experts with a non-zero weight at one position (ascending).
pub fn weight_choice(weights: &[f64]) -> Vec<usize> {
    weights.iter().enumerate().filter(|(_, w)| **w != 0.0).map(|(i, _)| i).collect()
}

fn rows(x: &[f64], n: usize) -> impl Iterator<Item = &[f64]> {
    x.chunks(n.max(1))
}

/// Router logits `(seq, n_experts)` of both sides, top-`k` routing.
pub fn compare_router(engine: &[f64], reference: &[f64], n_experts: usize, k: usize) -> RoutingRecord {
    let mut diffs = vec![];
    let mut n_diffs = 0;
    let mut margins = vec![];
    for (p, (e, r)) in rows(engine, n_experts).zip(rows(reference, n_experts)).enumerate() {
        let ((ec, em), (rc, rm)) = (router_choice(e, k), router_choice(r, k));
        margins.push(rm);
        if ec != rc {
            n_diffs += 1;
            if diffs.len() < KEEP_DIFFS {
                diffs.push(ChoiceDiff { position: p, engine: ec, reference: rc, engine_margin: Some(em), reference_margin: Some(rm) });
            }
        }
    }
    let min_margin = margins.iter().copied().reduce(f64::min);
    RoutingRecord { top_k: k, choice_diffs: diffs, n_choice_diffs: n_diffs, min_margin, margins, engine_sum_error: None, reference_sum_error: None }
}

/// Expert weights `(seq, n_experts)` of both sides (zero where an expert is not chosen).
pub fn compare_expert_weights(engine: &[f64], reference: &[f64], n_experts: usize) -> RoutingRecord {
    let mut diffs = vec![];
    let mut n_diffs = 0;
    let mut top_k = 0;
    for (p, (e, r)) in rows(engine, n_experts).zip(rows(reference, n_experts)).enumerate() {
        let (ec, rc) = (weight_choice(e), weight_choice(r));
        top_k = top_k.max(rc.len());
        if ec != rc {
            n_diffs += 1;
            if diffs.len() < KEEP_DIFFS {
                diffs.push(ChoiceDiff { position: p, engine: ec, reference: rc, engine_margin: None, reference_margin: None });
            }
        }
    }
    let sum_error = |x: &[f64]| rows(x, n_experts).map(|r| (r.iter().sum::<f64>() - 1.0).abs()).fold(0.0, f64::max);
    RoutingRecord {
        top_k,
        choice_diffs: diffs,
        n_choice_diffs: n_diffs,
        min_margin: None,
        margins: vec![],
        engine_sum_error: Some(sum_error(engine)),
        reference_sum_error: Some(sum_error(reference)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_router_that_flips_the_choice_is_named_with_its_margin() {
        // p = [0.1, 0.2, 0.3, 0.4]: top-2 {2, 3}, margin 0.3 - 0.2 = 0.1.
        let r = [0.0, 2f64.ln(), 3f64.ln(), 4f64.ln()];
        let (c, m) = router_choice(&r, 2);
        assert_eq!(c, vec![2, 3]);
        assert!((m - 0.1).abs() < 1e-12);
        // The engine's logits favour expert 1 over 2 at position 1 only.
        let e = [r.to_vec(), vec![0.0, 3f64.ln(), 2f64.ln(), 4f64.ln()]].concat();
        let rr = [r.to_vec(), r.to_vec()].concat();
        let rec = compare_router(&e, &rr, 4, 2);
        assert_eq!(rec.n_choice_diffs, 1);
        let d = &rec.choice_diffs[0];
        assert_eq!((d.position, d.engine.clone(), d.reference.clone()), (1, vec![1, 3], vec![2, 3]));
        assert!((d.reference_margin.unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(rec.note().unwrap(), "expert choice differs at position 1: engine [1, 3], reference [2, 3], router margin 0.1000 (engine 0.1000)");
        assert!((rec.min_margin.unwrap() - 0.1).abs() < 1e-12);
        // The same logits: no difference, no note.
        assert_eq!(compare_router(&rr, &rr, 4, 2).note(), None);
    }

    #[test]
    fn expert_weights_give_the_choice_and_the_renormalisation() {
        let reference = [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0, 0.5, 0.5, 0.0, 0.0];
        // Not renormalised: same experts, sums 0.7 and 0.6.
        let raw = [0.0, 0.0, 0.3, 0.4, 0.3, 0.3, 0.0, 0.0];
        let rec = compare_expert_weights(&raw, &reference, 4);
        assert_eq!(rec.n_choice_diffs, 0);
        assert!((rec.engine_sum_error.unwrap() - 0.4).abs() < 1e-12 && rec.reference_sum_error.unwrap() < 1e-12);
        // Off by one expert: every position differs.
        let shifted = [4.0 / 7.0, 0.0, 0.0, 3.0 / 7.0, 0.0, 0.5, 0.5, 0.0];
        let rec = compare_expert_weights(&shifted, &reference, 4);
        assert_eq!(rec.n_choice_diffs, 2);
        assert_eq!(rec.choice_diffs[1], ChoiceDiff { position: 1, engine: vec![1, 2], reference: vec![0, 1], engine_margin: None, reference_margin: None });
        assert_eq!(rec.top_k, 2);
    }
}
