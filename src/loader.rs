//! One call from a path to a runnable model: detects the format (Hugging Face
//! directory or GGUF file), resolves the config, loads and checks the weights, builds
//! the tokenizer, and picks the Q/K layout that matches the weights' origin.

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::config::HfConfig;
use crate::decoder::Decoder;
use crate::error::{EngineError, Result};
use crate::faults::{Fault, Faults};
use crate::lora::{LoraAdapter, LoraMode};
use crate::models::Checkpoint;
pub use crate::options::LoadOptions;
use crate::models;
use crate::quant::WeightsMode;
use crate::tokenizer::ChatMessage;
use crate::tokenizer::{Tokenizer, TokenizerOptions};
use crate::weights::GgufFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsOrigin {
    HfSafetensors,
    Gguf,
}

impl WeightsOrigin {
    pub fn name(&self) -> &'static str {
        match self {
            WeightsOrigin::HfSafetensors => "hf-safetensors",
            WeightsOrigin::Gguf => "gguf",
        }
    }
}

pub struct LoadedModel {
    pub model: Box<dyn Decoder>,
    pub tokenizer: Tokenizer,
    pub origin: WeightsOrigin,
    /// The mode the weights were loaded in (dense for Hugging Face weights).
    pub weights: WeightsMode,
    pub path: PathBuf,
    /// The attached adapter and its mode.
    pub lora: Option<(LoraAdapter, LoraMode)>,
    /// The injected faults (the prompt faults act in [`LoadedModel::encode_prompt`]).
    pub faults: Faults,
}

impl LoadedModel {
    /// The prompt's token ids: a chat prompt (one user message) through the chat template
    /// with the generation prompt, plain text with the tokenizer's special tokens. The
    /// `raw-prompt` and `missing-bos` faults live here.
    pub fn encode_prompt(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        self.encode_prompt_with(text, chat, &self.faults)
    }

    /// [`LoadedModel::encode_prompt`] with other prompt faults than the injected ones
    /// (`Faults::none()`: the prompt a clean engine feeds).
    pub fn encode_prompt_with(&self, text: &str, chat: bool, f: &Faults) -> Result<Vec<u32>> {
        if let Some(ids) = self.model.tokenize(text, chat) {
            return ids;
        }
        let mut ids = if chat && !f.has(Fault::RawPrompt) {
            self.tokenizer.encode_chat(&[ChatMessage::user(text.to_string())])?
        } else {
            self.tokenizer.encode(text, true)?
        };
        if f.has(Fault::MissingBos) {
            let bos = self.model.info().config.bos_token_id.or_else(|| {
                self.tokenizer.bos_token.as_deref().and_then(|t| self.tokenizer.token_to_id(t))
            });
            if bos.is_some() && ids.first().copied() == bos {
                ids.remove(0);
            }
        }
        Ok(ids)
    }

    /// An engine under test that is not the bundled one (see [`crate::decoder`] for the
    /// contract): the harness drives `model` and tokenizes with the tokenizer of the model at
    /// `path` (a Hugging Face directory or a GGUF file; its own [`Decoder::tokenize`] first,
    /// if it has one). The weights mode is read from what the engine declares (quantized
    /// kernels or not).
    pub fn plugin(model: Box<dyn Decoder>, path: &Path) -> Result<LoadedModel> {
        let tokenizer = model_tokenizer(path)?;
        let info = model.info();
        let weights = if info.quantized_kernels { WeightsMode::Quantized } else { WeightsMode::Dequant };
        let origin = if path.is_dir() { WeightsOrigin::HfSafetensors } else { WeightsOrigin::Gguf };
        Ok(LoadedModel { model, tokenizer, origin, weights, path: path.into(), lora: None, faults: Faults::default() })
    }

    /// Ids that end a generation: the config's EOS ids, else the tokenizer's EOS token.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.model.info().config.eos_token_ids.clone();
        if let Some(id) = self.tokenizer.eos_token.as_deref().and_then(|t| self.tokenizer.token_to_id(t)) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// The validated hyper-parameters of the model at `path` (a Hugging Face directory or a GGUF
/// file), read from its config or metadata alone: what a plug-in engine reports in its
/// [`crate::ModelInfo`].
pub fn model_config(path: &Path) -> Result<crate::Config> {
    if !path.exists() {
        return Err(EngineError::io(path, "no such file or directory"));
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        return models::resolve_hf(&HfConfig::from_file(&cfg_path)?, &cfg_path);
    }
    GgufFile::open(path)?.config()
}

/// The tokenizer (and chat template) of the model at `path`: `tokenizer.json` of a Hugging
/// Face directory, the vocabulary of a GGUF file.
pub fn model_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(EngineError::io(path, "no such file or directory"));
    }
    if path.is_dir() {
        return Tokenizer::from_hf_dir(path);
    }
    Tokenizer::from_gguf(&GgufFile::open(path)?)
}

/// A Hugging Face tokenizer against the config it runs with: every id the tokenizer produces
/// has an embedding row, and the config's BOS/EOS ids are inside the vocabulary. (An
/// embedding with more rows than the tokenizer has tokens is common: vocabularies padded to a
/// multiple of 64 or 128.)
fn check_hf_vocabulary(tok: &Tokenizer, cfg: &crate::Config, dir: &Path) -> Result<()> {
    let n = cfg.vocab_size;
    if let Some(max) = tok.max_id() {
        if max as usize >= n {
            return Err(EngineError::Config {
                path: dir.join("tokenizer.json"),
                message: format!(
                    "the tokenizer has token id {max} (`{}`), the model's vocab_size is {n} (config.json, the embedding's rows): \
                     the tokenizer and the model do not match",
                    tok.id_to_token(max).unwrap_or_default().escape_debug()
                ),
            });
        }
    }
    let ids = cfg.bos_token_id.iter().map(|i| ("bos_token_id", *i)).chain(cfg.eos_token_ids.iter().map(|i| ("eos_token_id", *i)));
    for (key, id) in ids {
        if id as usize >= n {
            return Err(EngineError::Config {
                path: dir.join("config.json"),
                message: format!("{key} {id} is not a token id (vocab_size {n})"),
            });
        }
    }
    Ok(())
}

/// The tokenizer's part of the injected faults (`spm-space-prefix`).
fn tokenizer_options(faults: &Faults) -> TokenizerOptions {
    TokenizerOptions { drop_space_prefix: faults.has(Fault::SpmSpacePrefix) }
}

/// Loads a model from a Hugging Face directory or a `.gguf` file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if !matches!(opts.dtype, DType::F32 | DType::F64) {
        return Err(EngineError::Input(format!("dtype {:?} is not supported (f32 or f64)", opts.dtype)));
    }
    if !path.exists() {
        return Err(EngineError::io(path, "no such file or directory"));
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        if !cfg_path.is_file() {
            return Err(EngineError::io(&cfg_path, "missing (a Hugging Face model directory needs config.json)"));
        }
        if opts.weights == Some(WeightsMode::Quantized) {
            return Err(EngineError::Input(format!(
                "{} holds dense weights: --weights quantized needs a GGUF file (use --weights dequant or leave it out)",
                path.display()
            )));
        }
        let hf = HfConfig::from_file(&cfg_path)?;
        let family = models::for_model_type(hf.model_type.as_deref(), &cfg_path)?;
        let tokenizer = Tokenizer::from_hf_dir_with(path, tokenizer_options(&opts.faults))?;
        // Sizes against the safetensors headers, and the tokenizer against the config, before
        // any weight is read.
        check_hf_vocabulary(&tokenizer, &models::resolve_hf(&hf, &cfg_path)?, path)?;
        let (model, lora) = (family.load)(Checkpoint::Hf { dir: path, config: &hf }, opts)?;
        return Ok(LoadedModel {
            model,
            tokenizer,
            origin: WeightsOrigin::HfSafetensors,
            weights: WeightsMode::Dequant,
            path: path.into(),
            lora,
            faults: opts.faults.clone(),
        });
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| EngineError::io(path, e))?;
        if n < 4 || &magic != b"GGUF" {
            return Err(EngineError::Unsupported {
                path: path.into(),
                message: "not a GGUF file (no GGUF magic) and not a model directory".into(),
            });
        }
    }
    let mode = match (opts.weights, opts.dtype) {
        (Some(WeightsMode::Quantized), DType::F64) => {
            return Err(EngineError::Input(
                "--weights quantized computes in f32; use --weights dequant for an f64 run".into(),
            ))
        }
        (Some(m), _) => m,
        (None, DType::F64) => WeightsMode::Dequant,
        (None, _) => WeightsMode::Quantized,
    };
    let mut g = GgufFile::open(path)?;
    g.drop_q41_min = opts.faults.has(Fault::Q41Min);
    let family = models::for_gguf(&g)?;
    // The hyper-parameters against the tensor table and the vocabulary against the
    // embedding, before the tokenizer is built from that vocabulary or any weight is read.
    (family.gguf_config)(&g)?;
    let tokenizer = Tokenizer::from_gguf_with(&g, tokenizer_options(&opts.faults))?;
    let (model, lora) = (family.load)(Checkpoint::Gguf { file: &mut g, mode }, opts)?;
    Ok(LoadedModel { model, tokenizer, origin: WeightsOrigin::Gguf, weights: mode, path: path.into(), lora, faults: opts.faults.clone() })
}

