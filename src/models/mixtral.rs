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

use std::path::Path;

use super::llama::{finish, llama_config, load_weights, Llama, LAYER_SITES as LLAMA_LAYER_SITES};
use super::{Checkpoint, Family, FamilyModel};
use crate::config::{Config, HfConfig};
use crate::error::{EngineError, Result};
use crate::options::LoadOptions;
use crate::sites::{LayerSite, SiteKind, INPUT};
use crate::weights::Arch;

// The mixture itself is a shared block (crate::moe): any family with experts runs it.
pub use crate::moe::{route, sparse_moe, Route};

/// What Mixtral checkpoints hold beyond the Llama attention (the experts follow the config).
const ARCH: Arch = Arch { name: "mixtral", ..Arch::LLAMA };

/// The family's registration. Its GGUF files say `general.architecture = llama`: they are
/// told from Llama by their expert count ([`crate::models::for_gguf`]).
pub const FAMILY: Family = Family { name: "mixtral", model_types: &["mixtral"], gguf_archs: &[], layer_sites: LAYER_SITES, hf_config, gguf_config: crate::weights::GgufFile::config, load };

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

/// Mixtral's `config.json`: the Llama architecture's checks and the experts
/// (`num_local_experts`, `num_experts_per_tok`, both required); a `sliding_window` applies to
/// every layer ([`HfConfig::layer_windows`]).
fn hf_config(hf: &HfConfig, path: &Path) -> Result<Config> {
    let experts = match (hf.key::<usize>("num_local_experts", path)?, hf.key::<usize>("num_experts_per_tok", path)?) {
        (Some(e), Some(k)) => (e, k),
        _ => {
            return Err(EngineError::Config {
                path: path.into(),
                message: "model_type mixtral needs num_local_experts and num_experts_per_tok".into(),
            })
        }
    };
    llama_config(hf, path, false, experts)
}

/// Loads the weights (router and experts included, every shape checked), sets the faults and
/// attaches the adapter.
fn load(ckpt: Checkpoint<'_>, opts: &LoadOptions) -> Result<FamilyModel> {
    ckpt.require_model_type(&FAMILY)?;
    match &ckpt {
        Checkpoint::Gguf { file, .. } if file.config()?.num_experts == 0 => {
            return Err(EngineError::Unsupported { path: file.path.clone(), message: "the mixtral family needs {arch}.expert_count > 0".into() });
        }
        _ => {}
    }
    let (cfg, weights, layout) = load_weights(ckpt, opts, &FAMILY, &ARCH)?;
    finish(Llama::of_family(&FAMILY, cfg, weights, layout, opts.dtype), layout, opts)
}
