//! The Mistral family: the Llama architecture ([`crate::models::llama`]) with sliding-window
//! attention. Mistral 7B's `config.json` sets `sliding_window` (4,096 where the key is absent,
//! as transformers' `MistralConfig` defaults it) and every layer attends over that window,
//! keeping a rotating cache of it; `layer_types` (Ministral's form) picks the sliding layers
//! instead ([`crate::config::HfConfig::layer_windows`]). `sliding_window: null` is plain Llama.
//!
//! Checkpoints: Hugging Face `model_type: mistral`. llama.cpp's converter writes Mistral as
//! `general.architecture = llama` without a window, and llama.cpp runs it without one: such a
//! file is the Llama family's.

use std::path::Path;

use super::llama::{finish, llama_config, load_weights, Llama, LAYER_SITES};
use super::{Checkpoint, Family, FamilyModel};
use crate::config::{Config, HfConfig};
use crate::error::Result;
use crate::options::LoadOptions;
use crate::weights::Arch;

/// The family's registration.
pub const FAMILY: Family = Family { name: "mistral", model_types: &["mistral"], gguf_archs: &[], layer_sites: LAYER_SITES, hf_config, gguf_config: crate::weights::GgufFile::config, load };

/// Mistral's `config.json`: the Llama architecture's checks (its window is read with the
/// shape, [`HfConfig::layer_windows`]).
fn hf_config(hf: &HfConfig, path: &Path) -> Result<Config> {
    llama_config(hf, path, false, (0, 0))
}

/// Loads the weights (Llama's names), sets the faults and attaches the adapter.
fn load(ckpt: Checkpoint<'_>, opts: &LoadOptions) -> Result<FamilyModel> {
    ckpt.require_model_type(&FAMILY)?;
    let (cfg, weights, layout) = load_weights(ckpt, opts, &FAMILY, &Arch::LLAMA)?;
    finish(Llama::of_family(&FAMILY, cfg, weights, layout, opts.dtype), layout, opts)
}
