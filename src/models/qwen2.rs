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

use super::llama::{Llama, LAYER_SITES as LLAMA_LAYER_SITES};
use super::{Checkpoint, Family, FamilyModel};
use crate::error::{EngineError, Result};
use crate::faults::Fault;
use crate::layout::QkLayout;
use crate::options::LoadOptions;
use crate::sites::LayerSite;
use crate::weights::{self, Arch};

/// What Qwen2 checkpoints hold beyond the Llama tensors.
const ARCH: Arch = Arch { name: "qwen2", qkv_bias: true };

/// The family's registration.
pub const FAMILY: Family = Family { name: "qwen2", model_types: &["qwen2"], gguf_archs: &["qwen2"], layer_sites: LAYER_SITES, load };

/// Per-layer sites: Llama's, in the same order and with the same dataflow (the bias is part
/// of the projection sites `q`, `k`, `v`).
pub const LAYER_SITES: &[LayerSite] = LLAMA_LAYER_SITES;

/// Loads the weights (biases included, every shape checked), sets the faults and attaches the
/// adapter. Q/K rows are half-split in both formats.
fn load(ckpt: Checkpoint<'_>, opts: &LoadOptions) -> Result<FamilyModel> {
    let (cfg, weights) = match ckpt {
        Checkpoint::Hf { dir, config } => {
            let path = dir.join("config.json");
            if config.model_type.as_deref() != Some("qwen2") {
                return Err(EngineError::Unsupported { path, message: "the qwen2 family needs model_type qwen2".into() });
            }
            let cfg = config.resolve(&path)?;
            let w = weights::load_hf_family(dir, &opts.faults.weights_config(&cfg), opts.dtype, &ARCH)?;
            (cfg, w)
        }
        Checkpoint::Gguf { file, mode } => {
            file.drop_q41_min = opts.faults.has(Fault::Q41Min);
            let cfg = file.config()?;
            let w = weights::load_gguf_family(file, &opts.faults.weights_config(&cfg), opts.dtype, mode, &ARCH)?;
            (cfg, w)
        }
    };
    let layout = QkLayout::HalfSplit;
    crate::models::llama::finish(Llama::of_family(&FAMILY, cfg, weights, layout, opts.dtype), layout, opts)
}
