//! The Mixtral family: the Llama architecture ([`crate::models::llama`]: RMSNorm, RoPE,
//! grouped-query attention, from [`crate::blocks`]) with a sparse mixture of SwiGLU experts in
//! place of the MLP.
//!
//! The mixture, as transformers' `MixtralSparseMoeBlock` computes it, per position:
//! router logits `r = x W_gate^T` `(n_experts)` (no bias), probabilities `p = softmax(r)`
//! (in f32, or f64 in the oracle), the `top_k` largest, their weights renormalised to sum 1,
//! and the output `sum_j w_j * expert_j(x)` with `expert(x) = w2(silu(w1 x) * w3 x)`.
//! mlx-lm's `softmax(top-k logits)` and llama.cpp's `build_moe_ffn` (softmax, top-k, weights
//! normalised) compute the same weights.
//!
//! Sites beyond the attention: `router` (the router logits, `(seq, n_experts)`),
//! `expert_weights` (the weight each expert received, `(seq, n_experts)`, zero for the
//! experts a position was not routed to: the chosen experts and their weights in one
//! tensor; the harness compares the choices per position and names a different choice with
//! the router margin), `mlp_out` (the weighted sum of the experts' outputs). The experts'
//! own gate/up/act are not sites: each sees another subset of the positions.
//!
//! Checkpoints: Hugging Face `model_type: mixtral` (`block_sparse_moe.gate`,
//! `block_sparse_moe.experts.{e}.w1/w2/w3`) and GGUF, which llama.cpp writes as
//! `general.architecture = llama` with `llama.expert_count` / `llama.expert_used_count`, the
//! router `blk.N.ffn_gate_inp` and the merged experts `blk.N.ffn_{gate,up,down}_exps`
//! (`(n_experts, out, in)`); Q/K rows permuted as for every Llama GGUF
//! ([`QkLayout::Interleaved`]). Quantized expert tensors stay quantized in that mode, split
//! per expert (the engine's block kernels).

use candle_core::{DType, Tensor};

use super::llama::{Llama, LAYER_SITES as LLAMA_LAYER_SITES};
use super::{Checkpoint, Family, FamilyModel};
use crate::blocks::{linear, silu_mul};
use crate::error::{EngineError, Result};
use crate::faults::{Fault, Faults};
use crate::layout::QkLayout;
use crate::options::LoadOptions;
use crate::quant::Linear;
use crate::sites::{LayerSite, SiteKind, INPUT};
use crate::taps::{tap, Capture};
use crate::weights::{self, Arch, MoeWeights};

/// What Mixtral checkpoints hold beyond the Llama attention (the experts follow the config).
const ARCH: Arch = Arch { name: "mixtral", qkv_bias: false };

/// The family's registration. Its GGUF files say `general.architecture = llama`: they are
/// told from Llama by their expert count ([`crate::models::for_gguf`]).
pub const FAMILY: Family = Family { name: "mixtral", model_types: &["mixtral"], gguf_archs: &[], layer_sites: LAYER_SITES, load };

/// Per-layer sites: Llama's attention, then the mixture (router, expert weights, their sum).
pub const LAYER_SITES: &[LayerSite] = &[
    LLAMA_LAYER_SITES[0],  // attn_norm
    LLAMA_LAYER_SITES[1],  // q
    LLAMA_LAYER_SITES[2],  // k
    LLAMA_LAYER_SITES[3],  // v
    LLAMA_LAYER_SITES[4],  // q_rope
    LLAMA_LAYER_SITES[5],  // k_rope
    LLAMA_LAYER_SITES[6],  // cache_k
    LLAMA_LAYER_SITES[7],  // cache_v
    LLAMA_LAYER_SITES[8],  // attn
    LLAMA_LAYER_SITES[9],  // attn_out
    LLAMA_LAYER_SITES[10], // mlp_norm
    LayerSite::new("router", SiteKind::Router, &["mlp_norm"]).of("gate"),
    LayerSite::new("expert_weights", SiteKind::Routing, &["router"]),
    LayerSite::new("mlp_out", SiteKind::Experts, &["expert_weights", "mlp_norm"]),
    LayerSite::new("out", SiteKind::Residual, &["mlp_out", "attn_out", INPUT]),
];

/// Loads the weights (router and experts included, every shape checked), sets the faults and
/// attaches the adapter.
fn load(ckpt: Checkpoint<'_>, opts: &LoadOptions) -> Result<FamilyModel> {
    let (cfg, weights, layout) = match ckpt {
        Checkpoint::Hf { dir, config } => {
            let path = dir.join("config.json");
            if config.model_type.as_deref() != Some("mixtral") {
                return Err(EngineError::Unsupported { path, message: "the mixtral family needs model_type mixtral".into() });
            }
            let cfg = config.resolve(&path)?;
            let w = weights::load_hf_family(dir, &opts.faults.weights_config(&cfg), opts.dtype, &ARCH)?;
            (cfg, w, QkLayout::HalfSplit)
        }
        Checkpoint::Gguf { file, mode } => {
            file.drop_q41_min = opts.faults.has(Fault::Q41Min);
            let cfg = file.config()?;
            if cfg.num_experts == 0 {
                return Err(EngineError::Unsupported {
                    path: file.path.clone(),
                    message: "the mixtral family needs {arch}.expert_count > 0".into(),
                });
            }
            let w = weights::load_gguf_family(file, &opts.faults.weights_config(&cfg), opts.dtype, mode, &ARCH)?;
            (cfg, w, QkLayout::Interleaved)
        }
    };
    super::llama::finish(Llama::of_family(&FAMILY, cfg, weights, layout, opts.dtype), layout, opts)
}

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
