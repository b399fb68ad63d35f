//! Model families: one file per family, built from the shared blocks of [`crate::blocks`],
//! and the registry that picks a family from a checkpoint's `model_type` (Hugging Face
//! `config.json`) or `general.architecture` (GGUF).
//!
//! Adding a family: a new file here with its config function (its own `config.json` keys and
//! checks), its weights (taken from a [`crate::tensors::TensorTable`] by the checkpoint's
//! names), its forward pass (from [`crate::blocks`]), its per-layer plan and site table, a
//! [`crate::lora::LoraTarget`] impl if adapters attach to it, and one [`Family`] entry in
//! [`FAMILIES`] (which also lists the GGUF architectures it runs). No shared file changes.

use std::path::Path;

use crate::config::{Config, HfConfig};
use crate::error::{EngineError, Result};
use crate::decoder::Decoder;
use crate::lora::{LoraAdapter, LoraMode};
use crate::options::LoadOptions;
use crate::quant::WeightsMode;
use crate::sites::{LayerSite, SiteGraph, SiteKind, INPUT, OUT};
use crate::weights::GgufFile;

pub mod gemma3;
pub mod llama;
pub mod mistral;
pub mod qwen2;
// Mixtral-style sparse MoE.
pub mod mixtral;

/// Where a family's loader reads the weights from.
pub enum Checkpoint<'a> {
    /// A Hugging Face directory and its parsed `config.json`.
    Hf { dir: &'a Path, config: &'a HfConfig },
    /// An open GGUF file and the mode its matrices are held in.
    Gguf { file: &'a mut GgufFile, mode: WeightsMode },
}

impl Checkpoint<'_> {
    /// A Hugging Face checkpoint of `family` must say its model type (its loader may be called
    /// directly, not through the registry that picked it by that type).
    pub fn require_model_type(&self, family: &Family) -> Result<()> {
        match self {
            Checkpoint::Hf { dir, config } if !config.model_type.as_deref().is_some_and(|t| family.model_types.contains(&t)) => {
                Err(EngineError::Unsupported {
                    path: dir.join("config.json"),
                    message: format!("the {} family needs model_type {}", family.name, family.model_types.join(" or ")),
                })
            }
            _ => Ok(()),
        }
    }
}

/// What a family's loader returns: the decoder and the adapter it attached.
pub type FamilyModel = (Box<dyn Decoder>, Option<(LoraAdapter, LoraMode)>);

/// A registered family.
#[derive(Clone, Copy)]
pub struct Family {
    /// The family's name in reports (`llama`).
    pub name: &'static str,
    /// Hugging Face `model_type` values it runs.
    pub model_types: &'static [&'static str],
    /// GGUF `general.architecture` values it runs.
    pub gguf_archs: &'static [&'static str],
    /// The per-layer sites, in forward order, with their dataflow.
    pub layer_sites: &'static [LayerSite],
    /// Resolves a `config.json` of this family: its own keys (read with [`HfConfig::key`]) and
    /// the checks of what its forward pass computes, not yet against the weights
    /// ([`resolve_hf`] adds that).
    pub hf_config: fn(&HfConfig, &Path) -> Result<Config>,
    /// Resolves a GGUF file's metadata of this family ([`GgufFile::config`], or the family's
    /// own keys read too).
    pub gguf_config: fn(&GgufFile) -> Result<Config>,
    /// Builds the decoder from a checkpoint (faults set, the adapter of `opts.lora` attached).
    pub load: fn(Checkpoint<'_>, &LoadOptions) -> Result<FamilyModel>,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Every family the engine runs.
pub const FAMILIES: &[Family] = &[
    llama::FAMILY,
    mistral::FAMILY,
    gemma3::FAMILY,
    qwen2::FAMILY,
    // Mixtral-style sparse MoE.
    mixtral::FAMILY,
];

/// GGUF architectures whose files with `{arch}.expert_count` > 0 are a sparse mixture of
/// experts of another family: llama.cpp writes Mixtral as `llama`.
const MOE_GGUF: &[(&str, &Family)] = &[("llama", &mixtral::FAMILY)];

/// The family of an open GGUF file: its `general.architecture`, or the mixture-of-experts
/// family of that architecture when the file has experts.
pub fn for_gguf(file: &GgufFile) -> Result<&'static Family> {
    let arch = file.md_str("general.architecture")?;
    let key = format!("{arch}.expert_count");
    if file.has(&key) && file.md_u32(&key)? > 0 {
        return MOE_GGUF.iter().find(|(a, _)| *a == arch).map(|(_, f)| *f).ok_or_else(|| EngineError::Unsupported {
            path: file.path.clone(),
            message: format!("general.architecture {arch:?} with experts ({key}) is not supported (only llama's: Mixtral)"),
        });
    }
    for_gguf_arch(arch, &file.path)
}

fn known(list: impl Fn(&Family) -> &'static [&'static str]) -> String {
    FAMILIES.iter().flat_map(|f| list(f).iter().copied()).collect::<Vec<_>>().join(", ")
}

/// The family of a Hugging Face `model_type` (a config without one is read as Llama, as
/// transformers' own Llama checkpoints of old did).
pub fn for_model_type(model_type: Option<&str>, path: &Path) -> Result<&'static Family> {
    let mt = model_type.unwrap_or("llama");
    FAMILIES.iter().find(|f| f.model_types.contains(&mt)).ok_or_else(|| EngineError::Unsupported {
        path: path.into(),
        message: format!("model_type `{mt}` is not supported (this engine runs model_type {})", known(|f| f.model_types)),
    })
}

/// The family of a GGUF `general.architecture`.
pub fn for_gguf_arch(arch: &str, path: &Path) -> Result<&'static Family> {
    FAMILIES.iter().find(|f| f.gguf_archs.contains(&arch)).ok_or_else(|| EngineError::Unsupported {
        path: path.into(),
        message: format!("general.architecture {arch:?} is not supported (only {})", known(|f| f.gguf_archs)),
    })
}

/// Resolves a `config.json` (at `path`) into the checked [`Config`] of a model this engine
/// runs: its family's config function, then [`checked_hf`].
pub fn resolve_hf(hf: &HfConfig, path: &Path) -> Result<Config> {
    let family = for_model_type(hf.model_type.as_deref(), path)?;
    checked_hf((family.hf_config)(hf, path)?, path)
}

/// A family's resolved config of the `config.json` at `path`, checked against the safetensors
/// headers beside it before anything is allocated from it (a corrupt num_hidden_layers of
/// 1e12 stops here), then [`Config::validate`]d.
pub fn checked_hf(cfg: Config, path: &Path) -> Result<Config> {
    crate::weights::check_hf_sizes(&cfg, path)?;
    cfg.validate(path)?;
    Ok(cfg)
}

/// The family of the model at `path` and its number of layers, read from its config alone.
pub fn family_at(path: &Path) -> Result<(&'static Family, usize)> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let hf = HfConfig::from_file(&cfg_path)?;
        let family = for_model_type(hf.model_type.as_deref(), &cfg_path)?;
        // Resolved, so that the layer count is checked against the weights before a site
        // graph is built from it.
        return Ok((family, resolve_hf(&hf, &cfg_path)?.num_layers));
    }
    let g = GgufFile::open(path)?;
    let family = for_gguf(&g)?;
    Ok((family, (family.gguf_config)(&g)?.num_layers))
}

/// The site graph of the model at `path` (a Hugging Face directory or a GGUF file), read
/// from its config alone: the bundled engine's graph of a model it runs.
pub fn site_graph_at(path: &Path) -> Result<SiteGraph> {
    let (family, layers) = family_at(path)?;
    Ok(SiteGraph::new(layers, family.layer_sites))
}

/// The per-layer sites every decoder-only model has, whatever its family: the KV cache the
/// layer keeps and the block's residual output. With `embed`, `final_norm` and `logits`
/// around them, they are what every reference offers for a model no family mapping knows.
pub const GENERIC_LAYER_SITES: &[LayerSite] = &[
    LayerSite::new("cache_k", SiteKind::Cache, &[INPUT]),
    LayerSite::new("cache_v", SiteKind::Cache, &[INPUT]),
    LayerSite::new(OUT, SiteKind::Residual, &[INPUT]),
];

/// A model as any engine under test may run it: its shape, and the sites references are asked
/// for. The bundled engine's family where one runs its `model_type` / architecture (its
/// detailed sites), else the generic sites of any decoder.
#[derive(Debug, Clone)]
pub struct ModelDescription {
    /// The bundled engine's family of this model type, if it has one.
    pub family: Option<&'static Family>,
    /// `model_type` (Hugging Face) or `general.architecture` (GGUF).
    pub model_type: String,
    /// The shape (layers, widths, vocabulary); for a family the bundled engine runs, checked
    /// as its loader checks it.
    pub config: crate::Config,
    /// The sites: the family's, or [`GENERIC_LAYER_SITES`] per layer.
    pub graph: SiteGraph,
}

/// Describes the model at `path` from its config alone, for an engine under test that is not
/// (necessarily) the bundled one: a model type the bundled engine does not run (Qwen3, Gemma 3,
/// Phi-3) gets the generic sites and its shape, where [`family_at`] refuses it. A family whose
/// `model_type` the bundled engine knows but whose config it refuses (Llama 3's `rope_scaling`)
/// keeps its family's sites.
pub fn describe_at(path: &Path) -> Result<ModelDescription> {
    let (family, model_type, config) = if path.is_dir() {
        let cfg_path = path.join("config.json");
        let hf = HfConfig::from_file(&cfg_path)?;
        let model_type = hf.model_type.clone().unwrap_or_else(|| "llama".into());
        let family = for_model_type(hf.model_type.as_deref(), &cfg_path).ok();
        let config = match family.map(|_| resolve_hf(&hf, &cfg_path)) {
            Some(Ok(c)) => c,
            // What the bundled engine does not run is still a model; a corrupt config is not.
            None | Some(Err(EngineError::Unsupported { .. })) => hf.resolve_shape(&cfg_path)?,
            Some(Err(e)) => return Err(e),
        };
        (family, model_type, config)
    } else {
        let g = GgufFile::open(path)?;
        let arch = g.md_str("general.architecture")?.to_string();
        let family = for_gguf(&g).ok();
        let config = match family.map(|f| (f.gguf_config)(&g)) {
            Some(Ok(c)) => c,
            None | Some(Err(EngineError::Unsupported { .. })) => g.shape_config()?,
            Some(Err(e)) => return Err(e),
        };
        (family, arch, config)
    };
    let layer_sites = family.map_or(GENERIC_LAYER_SITES, |f| f.layer_sites);
    let graph = SiteGraph::new(config.num_layers, layer_sites);
    Ok(ModelDescription { family, model_type, config, graph })
}
