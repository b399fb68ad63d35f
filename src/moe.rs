//! The sparse mixture of experts, shared by every family with experts (Mixtral; a Llama
//! checkpoint whose layers carry experts runs it in place of the MLP): the routing of one
//! position ([`route`]) and the mixture of one layer ([`sparse_moe`]), as transformers'
//! `MixtralSparseMoeBlock` computes them (see [`crate::models::mixtral`] for the formulas and
//! the checkpoints).

use candle_core::{DType, Tensor};

use crate::blocks::{linear, silu_mul};
use crate::error::Result;
use crate::faults::{Fault, Faults};
use crate::quant::Linear;
use crate::taps::{tap, Capture};
use crate::weights::MoeWeights;

/// One position's routing: the experts chosen, in decreasing probability, their weights, and
/// the router margin (the k-th minus the (k+1)-th probability; 1 when every expert is used).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f64>,
    pub margin: f64,
}

/// The routing of one position from its router logits, as transformers' Mixtral: softmax over
/// the experts, the `k` most probable (ties to the lower index), weights renormalised to sum 1
/// (`renormalise = false` is the `router-renorm-skipped` fault: the raw probabilities).
pub fn route(logits: &[f64], k: usize, renormalise: bool) -> Route {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|x| x / sum).collect();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let experts: Vec<usize> = order[..k].to_vec();
    let margin = if k < p.len() { p[order[k - 1]] - p[order[k]] } else { 1.0 };
    let chosen: f64 = experts.iter().map(|&j| p[j]).sum();
    let weights = experts.iter().map(|&j| if renormalise { p[j] / chosen } else { p[j] }).collect();
    Route { experts, weights, margin }
}

/// The sparse mixture of layer `i` on `h (seq, hidden)` (the post-attention norm's output):
/// routes every position to its `top_k` experts and returns the weighted sum of their outputs,
/// `(seq, hidden)`. Taps `router` and `expert_weights`.
///
/// Faults: `router-renorm-skipped` applies the top-k probabilities without renormalising them;
/// `expert-off-by-one` dispatches each position to the expert after the one chosen
/// (`(e + 1) % n_experts`), its weight unchanged.
pub fn sparse_moe(i: usize, moe: &MoeWeights, h: &Tensor, top_k: usize, faults: &Faults, cap: &mut Option<&mut Capture>) -> Result<Tensor> {
    let (seq, hidden) = h.dims2()?;
    let n = moe.experts.len();
    let logits = linear(h, &moe.router)?; // (seq, n_experts)
    tap(cap, || format!("layers.{i}.router"), &logits);
    let rows: Vec<f64> = logits.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let renormalise = !faults.has(Fault::RouterRenormSkipped);
    let shift = usize::from(faults.has(Fault::ExpertOffByOne));
    // Dense routing map (seq, n_experts): the weight each expert gets at each position, in
    // the model dtype (transformers casts the renormalised f32 weights to the hidden dtype).
    let mut map = vec![0f64; seq * n];
    for (pos, r) in rows.chunks(n).enumerate() {
        let route = route(r, top_k, renormalise);
        for (&e, &w) in route.experts.iter().zip(&route.weights) {
            map[pos * n + (e + shift) % n] = w;
        }
    }
    let map = match h.dtype() {
        DType::F64 => map,
        _ => map.iter().map(|&w| w as f32 as f64).collect(),
    };
    let map_t = Tensor::from_vec(map.clone(), (seq, n), h.device())?.to_dtype(h.dtype())?;
    tap(cap, || format!("layers.{i}.expert_weights"), &map_t);
    // Each expert on the positions routed to it, accumulated in expert order (as
    // transformers' loop over experts with index_add_).
    let mut out = Tensor::zeros((seq, hidden), h.dtype(), h.device())?;
    for (e, expert) in moe.experts.iter().enumerate() {
        let (pos, w): (Vec<u32>, Vec<f64>) =
            (0..seq).filter(|&p| map[p * n + e] != 0.0).map(|p| (p as u32, map[p * n + e])).unzip();
        if pos.is_empty() {
            continue;
        }
        let idx = Tensor::new(pos.as_slice(), h.device())?;
        let x = h.index_select(&idx, 0)?; // (m, hidden)
        let gu = Linear::forward_group(&[&expert.gate, &expert.up], &x)?;
        let y = linear(&silu_mul(&gu[0], &gu[1])?, &expert.down)?; // (m, hidden)
        let w = Tensor::from_vec(w, (pos.len(), 1), h.device())?.to_dtype(h.dtype())?;
        out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_the_top_k_renormalises_and_measures_the_margin() {
        // p = softmax([0, ln 2, ln 3, ln 4]) = [0.1, 0.2, 0.3, 0.4]
        let logits = [0.0, 2f64.ln(), 3f64.ln(), 4f64.ln()];
        let r = route(&logits, 2, true);
        assert_eq!(r.experts, vec![3, 2]);
        assert!((r.weights[0] - 4.0 / 7.0).abs() < 1e-12 && (r.weights[1] - 3.0 / 7.0).abs() < 1e-12);
        assert!((r.margin - 0.1).abs() < 1e-12, "0.3 - 0.2");
        // The fault: the raw probabilities, summing to 0.7.
        let raw = route(&logits, 2, false);
        assert!((raw.weights.iter().sum::<f64>() - 0.7).abs() < 1e-12);
        // Every expert used: no margin to speak of.
        assert_eq!(route(&logits, 4, true).margin, 1.0);
    }
}
