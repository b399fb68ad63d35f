//! The Qwen2 family: the Llama architecture ([`crate::models::llama`]: RMSNorm, RoPE,
//! grouped-query attention, SwiGLU, from [`crate::blocks`]) plus biases on the q/k/v
//! projections (`o_proj` has none), a large RoPE base read from the config (1e6 in the
//! released checkpoints) and a tied or untied output head. The `q`, `k`, `v` sites include
//! the bias.
//!
//! Q/K layout. llama.cpp's `convert_hf_to_gguf.py` permutes Q/K rows only for its
//! `LlamaModel` (rope type NORM, interleaved); Qwen2 GGUFs keep the Hugging Face row order
//! and llama.cpp runs them with NEOX (half-split) RoPE. So both checkpoint formats run
//! [`QkLayout::HalfSplit`] here and no transform is needed (unlike Llama GGUF). The tiny
//! fixture checks it: transformers' logits from `tiny-qwen2/` and `tiny-qwen2.gguf` are
//! bit-identical (scripts/make_fixtures.py), and the engine passes against both.
//!
//! Checkpoints: Hugging Face `model_type: qwen2` (`self_attn.{q,k,v}_proj.bias`) and GGUF
//! `general.architecture = qwen2` (`qwen2.*` metadata, `blk.N.attn_{q,k,v}.bias`).

use std::path::Path;

use super::llama::{finish, llama_config, load_weights, Llama, LAYER_SITES as LLAMA_LAYER_SITES};
use super::{Checkpoint, Family, FamilyModel};
use crate::config::{Config, HfConfig};
use crate::error::Result;
use crate::layout::QkLayout;
use crate::options::LoadOptions;
use crate::sites::LayerSite;
use crate::weights::Arch;

/// What Qwen2 checkpoints hold beyond the Llama tensors.
const ARCH: Arch = Arch { name: "qwen2", qkv_bias: true, ..Arch::LLAMA };

/// The family's registration.
pub const FAMILY: Family = Family { name: "qwen2", model_types: &["qwen2"], gguf_archs: &["qwen2"], layer_sites: LAYER_SITES, hf_config, gguf_config: crate::weights::GgufFile::config, load };

/// Per-layer sites: Llama's, in the same order and with the same dataflow (the bias is part
/// of the projection sites `q`, `k`, `v`).
pub const LAYER_SITES: &[LayerSite] = LLAMA_LAYER_SITES;

/// Qwen2's `config.json`: the Llama architecture's checks and q/k/v biases implied by the
/// model type (its configs usually omit `attention_bias`). With `use_sliding_window` the
/// layers from `max_window_layers` on attend over `sliding_window` ([`HfConfig::layer_windows`]).
fn hf_config(hf: &HfConfig, path: &Path) -> Result<Config> {
    llama_config(hf, path, true, (0, 0))
}

/// Loads the weights (biases included, every shape checked), sets the faults and attaches the
/// adapter. Q/K rows are half-split in both formats.
fn load(ckpt: Checkpoint<'_>, opts: &LoadOptions) -> Result<FamilyModel> {
    ckpt.require_model_type(&FAMILY)?;
    let (cfg, weights, _) = load_weights(ckpt, opts, &FAMILY, &ARCH)?;
    let layout = QkLayout::HalfSplit;
    finish(Llama::of_family(&FAMILY, cfg, weights, layout, opts.dtype), layout, opts)
}
