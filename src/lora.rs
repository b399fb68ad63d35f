//! LoRA adapters: loading the two formats people have, checking them against the model,
//! and attaching them to the attention and MLP projections, unmerged or merged.
//!
//! Formats (detected by the weights file in the adapter directory):
//!
//! - **PEFT** (`adapter_config.json` + `adapter_model.safetensors`): `r`, `lora_alpha`,
//!   `use_rslora`, `target_modules`, `layers_to_transform`. Tensors
//!   `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `(r, in)` and
//!   `...lora_B.weight` `(out, r)`. Scale `lora_alpha / r` (`lora_alpha / sqrt(r)` with
//!   rsLoRA), as `peft.tuners.lora.layer.LoraLayer.update_layer`.
//! - **mlx-lm** (`adapter_config.json` + `adapters.safetensors`): `lora_parameters:
//!   {rank, scale, dropout, keys}` and `num_layers` (the last N layers; N <= 0 means all,
//!   as the slice `model.layers[-max(N, 0):]` in `mlx_lm/tuner/utils.py`
//!   `linear_to_lora_layers`; no `keys` means every linear projection of those layers).
//!   Tensors `model.layers.{i}.self_attn.q_proj.lora_a` `(in, r)` and `.lora_b` `(r, out)`;
//!   the scale is used as written.
//!
//! Everything is held in the PEFT convention, in the Hugging Face Q/K layout: `A (r, in)`,
//! `B (out, r)`, delta `s * B A`. A GGUF model keeps Q/K in the interleaved order
//! ([`crate::layout`]), so `B`'s rows of `q_proj`/`k_proj` are permuted into that order when
//! attached.
//!
//! Modes: **unmerged** keeps the base matrix as it is (quantized or dense) and adds
//! `s * (x A^T) B^T` in the compute dtype ([`LoraLinear`]); **merged** replaces the matrix
//! with the dense `W + s * B A` — for a quantized base this is dequantize-then-add, so the
//! adapted matrices of a quantized model become dense f32 (their activations are then no
//! longer rounded to 8 bits; the two modes differ by that rounding, see the harness's
//! `tolerance.rs`).
//!
//! What is in the file but attached to nothing, and what the configuration targets but the
//! file lacks, are kept by name ([`LoraAdapter::unattached`], [`LoraAdapter::missing`]);
//! a target name that matches no projection of the model is an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::layout::QkLayout;
use crate::quant::Linear;

/// The projections an adapter can target: (name, module path inside a decoder layer). A
/// dense layer has the `mlp.*` ones, a mixture-of-experts layer (Mixtral) the router `gate`
/// instead (mlx-lm's default LoRA keys for Mixtral include it); [`model_projections`].
pub const PROJECTIONS: [(&str, &str); 8] = [
    ("q_proj", "self_attn.q_proj"),
    ("k_proj", "self_attn.k_proj"),
    ("v_proj", "self_attn.v_proj"),
    ("o_proj", "self_attn.o_proj"),
    ("gate_proj", "mlp.gate_proj"),
    ("up_proj", "mlp.up_proj"),
    ("down_proj", "mlp.down_proj"),
    // Mixtral's router.
    ("gate", "block_sparse_moe.gate"),
];

/// The projections of [`PROJECTIONS`] a layer of this model has.
pub fn model_projections(cfg: &Config) -> impl Iterator<Item = &'static str> {
    let moe = cfg.num_experts > 0;
    PROJECTIONS.iter().map(|(m, _)| *m).filter(move |m| match *m {
        "gate_proj" | "up_proj" | "down_proj" => !moe,
        "gate" => moe,
        _ => true,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraFormat {
    Peft,
    Mlx,
}

impl LoraFormat {
    pub fn name(&self) -> &'static str {
        match self {
            LoraFormat::Peft => "peft",
            LoraFormat::Mlx => "mlx-lm",
        }
    }
    /// The weights file of this format.
    pub fn weights_file(&self) -> &'static str {
        match self {
            LoraFormat::Peft => "adapter_model.safetensors",
            LoraFormat::Mlx => "adapters.safetensors",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraMode {
    /// `y = W x + s B (A x)`, the base matrix untouched.
    #[default]
    Unmerged,
    /// `W' = W + s B A` (dequantized first when W is quantized).
    Merged,
}

impl LoraMode {
    pub fn name(&self) -> &'static str {
        match self {
            LoraMode::Unmerged => "unmerged",
            LoraMode::Merged => "merged",
        }
    }
}

/// `--lora DIR` with its mode.
#[derive(Debug, Clone)]
pub struct LoraOptions {
    pub dir: PathBuf,
    pub mode: LoraMode,
}

/// The adapter's configuration, resolved (the effective values, whichever format).
#[derive(Debug, Clone, Serialize)]
pub struct LoraConfig {
    pub format: LoraFormat,
    pub rank: usize,
    /// The factor the delta is multiplied by.
    pub scale: f64,
    /// How the scale was obtained, e.g. `lora_alpha / r = 16 / 8`.
    pub scale_source: String,
    /// Target projections (canonical names, e.g. `q_proj`).
    pub targets: Vec<String>,
    /// Layers the adapter applies to.
    pub layers: Vec<usize>,
    /// The dtype of the tensors in the file (held as f32 once loaded).
    pub file_dtype: String,
}

/// One adapted projection: `A (r, in)`, `B (out, r)` in f32, Hugging Face layout.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub layer: usize,
    pub module: &'static str,
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// The tensors' dtype in the file (`F32`, `F16`, `BF16`).
    pub file_dtype: String,
    pub key_a: String,
    pub key_b: String,
}

impl LoraPair {
    /// `layers.{i}.{module}`.
    pub fn name(&self) -> String {
        format!("layers.{}.{}", self.layer, self.module)
    }
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub pairs: Vec<LoraPair>,
    /// Tensors of the file that the configuration attaches to nothing.
    pub unattached: Vec<String>,
    /// Targeted modules (`layers.{i}.{module}`) without tensors in the file.
    pub missing: Vec<String>,
}

pub use crate::quant::LoraLinear;

/// Per-module statistics of the adapter a side holds: what the harness diffs.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct InventoryEntry {
    /// `layers.{i}.{module}`.
    pub module: String,
    /// Shapes in the PEFT convention: A `(r, in)`, B `(out, r)`.
    pub a_shape: Vec<usize>,
    pub b_shape: Vec<usize>,
    pub dtype: String,
    pub rank: usize,
    pub scale: f64,
    /// Checksums, invariant to the Q/K row order: sum and Frobenius norm of A and of B.
    pub a_sum: f64,
    pub a_norm: f64,
    pub b_sum: f64,
    pub b_norm: f64,
}

/// The tensor names of one module's A and B, as found in the file.
type KeyPair = (Option<String>, Option<String>);

fn sum_norm(t: &Tensor) -> Result<(f64, f64)> {
    let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok((v.iter().sum(), v.iter().map(|x| x * x).sum::<f64>().sqrt()))
}

impl LoraAdapter {
    /// Loads and checks an adapter directory against the model's config.
    pub fn load(dir: &Path, cfg: &Config) -> Result<LoraAdapter> {
        if !dir.is_dir() {
            return Err(EngineError::io(dir, "no such adapter directory"));
        }
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            return Err(EngineError::io(&cfg_path, "missing (a LoRA adapter directory needs adapter_config.json)"));
        }
        let peft = dir.join(LoraFormat::Peft.weights_file());
        let mlx = dir.join(LoraFormat::Mlx.weights_file());
        let format = match (peft.is_file(), mlx.is_file()) {
            (true, false) => LoraFormat::Peft,
            (false, true) => LoraFormat::Mlx,
            (true, true) => {
                return Err(EngineError::io(dir, "holds both adapter_model.safetensors (PEFT) and adapters.safetensors (mlx-lm): which one?"))
            }
            (false, false) => {
                return Err(EngineError::io(
                    dir,
                    "no adapter weights: expected adapter_model.safetensors (PEFT) or adapters.safetensors (mlx-lm)",
                ))
            }
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
        let config = LoraConfig::parse(&text, format, &cfg_path, cfg)?;
        let wpath = dir.join(format.weights_file());
        let bytes = std::fs::read(&wpath).map_err(|e| EngineError::io(&wpath, e))?;
        let tensors = crate::tensors::safetensors_from_bytes(&wpath, &bytes)?;
        Self::from_parts(dir, config, tensors, cfg)
    }

    /// [`LoraAdapter::load`] on a configuration and tensors already read (the directory `dir`
    /// names them in messages).
    pub fn from_parts(dir: &Path, config: LoraConfig, tensors: HashMap<String, Tensor>, cfg: &Config) -> Result<LoraAdapter> {
        let format = config.format;
        let wpath = dir.join(format.weights_file());
        // (layer, module) -> (key of A, key of B)
        let mut found: BTreeMap<(usize, &'static str), KeyPair> = BTreeMap::new();
        let mut unattached = vec![];
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            match parse_key(name, format) {
                Some((layer, module, is_b))
                    if layer < cfg.num_layers
                        && config.layers.contains(&layer)
                        && config.targets.iter().any(|t| t == module) =>
                {
                    let e = found.entry((layer, module)).or_default();
                    if is_b {
                        e.1 = Some(name.clone());
                    } else {
                        e.0 = Some(name.clone());
                    }
                }
                _ => unattached.push(name.clone()),
            }
        }
        let mut pairs = vec![];
        let mut missing = vec![];
        for &layer in &config.layers {
            for (module, _) in PROJECTIONS.iter().filter(|(m, _)| config.targets.iter().any(|t| t == m)) {
                let (ka, kb) = match found.get(&(layer, *module)) {
                    None => {
                        missing.push(format!("layers.{layer}.{module}"));
                        continue;
                    }
                    Some((Some(a), Some(b))) => (a.clone(), b.clone()),
                    Some((a, b)) => {
                        let have = a.as_ref().or(b.as_ref()).expect("an entry has one key");
                        return Err(EngineError::MissingTensor {
                            path: wpath.clone(),
                            tensor: format!(
                                "the {} matrix of layers.{layer}.{module} (only `{have}` is present)",
                                if a.is_none() { "A" } else { "B" }
                            ),
                        });
                    }
                };
                let (ta, tb) = (&tensors[&ka], &tensors[&kb]);
                let file_dtype = format!("{:?}", ta.dtype()).to_uppercase();
                let (ta, tb) = match format {
                    LoraFormat::Peft => (ta.clone(), tb.clone()),
                    // mlx-lm: lora_a (in, r), lora_b (r, out).
                    LoraFormat::Mlx => (ta.t()?.contiguous()?, tb.t()?.contiguous()?),
                };
                let (out, inp) = module_dims(cfg, module);
                let r = config.rank;
                let check = |t: &Tensor, key: &str, expected: Vec<usize>, native: Vec<usize>| -> Result<()> {
                    if t.dims() != expected.as_slice() {
                        let got = match format {
                            LoraFormat::Peft => t.dims().to_vec(),
                            LoraFormat::Mlx => t.dims().iter().rev().copied().collect(),
                        };
                        return Err(EngineError::ShapeMismatch { path: wpath.clone(), tensor: key.into(), got, expected: native });
                    }
                    Ok(())
                };
                let (na, nb) = match format {
                    LoraFormat::Peft => (vec![r, inp], vec![out, r]),
                    LoraFormat::Mlx => (vec![inp, r], vec![r, out]),
                };
                check(&ta, &ka, vec![r, inp], na)?;
                check(&tb, &kb, vec![out, r], nb)?;
                // A NaN/Inf in A or B is a corrupted adapter (it would turn every output NaN).
                for (t, key) in [(&ta, &ka), (&tb, &kb)] {
                    if let Some((i, v)) = crate::quant::first_nonfinite(t, 1)? {
                        return Err(EngineError::BadTensor {
                            path: wpath.clone(),
                            tensor: key.clone(),
                            message: format!("element {i} holds a non-finite value ({v}): the adapter is corrupted (re-save or re-train it)"),
                        });
                    }
                }
                pairs.push(LoraPair {
                    layer,
                    module,
                    a: ta.to_dtype(DType::F32)?,
                    b: tb.to_dtype(DType::F32)?,
                    scale: config.scale,
                    file_dtype,
                    key_a: ka,
                    key_b: kb,
                });
            }
        }
        let mut all_names: Vec<&String> = tensors.keys().collect();
        all_names.sort();
        // Every tensor that names a projection must fit this model, targeted or not: an
        // adapter made for another model (more layers, other widths, a projection this model
        // does not have) is refused, not attached in part or not at all.
        let mut model_modules: Vec<&str> = model_projections(cfg).collect();
        model_modules.sort();
        for name in &all_names {
            let Some((layer, module, is_b)) = parse_key(name, format) else { continue };
            let other = |m: String| Err(EngineError::Adapter { path: wpath.clone(), message: format!("{m}: the adapter was made for another model") });
            if layer >= cfg.num_layers {
                return other(format!("tensor `{name}` is for layer {layer}, the model has {} layers (0..{})", cfg.num_layers, cfg.num_layers - 1));
            }
            if !model_modules.contains(&module) {
                return other(format!("tensor `{name}` adapts `{module}`, which this model's layers do not have (they have {})", model_modules.join(", ")));
            }
            let t = &tensors[name.as_str()];
            let (out, inp) = module_dims(cfg, module);
            // PEFT: A (r, in), B (out, r); mlx-lm: A (in, r), B (r, out). The rank is the file's.
            let (fixed, at) = match (format, is_b) {
                (LoraFormat::Peft, false) => (inp, 1),
                (LoraFormat::Peft, true) => (out, 0),
                (LoraFormat::Mlx, false) => (inp, 0),
                (LoraFormat::Mlx, true) => (out, 1),
            };
            if t.dims().len() != 2 || t.dims()[at] != fixed {
                let mut expected = vec![config.rank; 2];
                expected[at] = fixed;
                return Err(EngineError::Adapter {
                    path: wpath.clone(),
                    message: format!(
                        "tensor `{name}` has shape {:?}, expected {expected:?} for `{module}` of this model ({} in, {} out, rank {}): \
                         the adapter was made for another model",
                        t.dims(),
                        inp,
                        out,
                        config.rank
                    ),
                });
            }
        }
        if pairs.is_empty() {
            return Err(EngineError::Adapter {
                path: dir.into(),
                message: format!(
                    "the adapter attaches to nothing in this model: its configuration targets {} of layers {:?}, its file has {} tensor(s) ({}); \
                     was it made for another model?",
                    config.targets.join(", "),
                    config.layers,
                    tensors.len(),
                    unattached.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        let mut config = config;
        config.file_dtype = pairs.first().map(|p| p.file_dtype.clone()).unwrap_or_default();
        Ok(LoraAdapter { dir: dir.into(), config, pairs, unattached, missing })
    }

    /// Attaches every pair to `layers`, in `mode`; `layout` is the model's Q/K layout and
    /// `dtype` its compute dtype. `faults`: `lora-not-attached` attaches nothing,
    /// `lora-scale` multiplies by the scale twice.
    pub fn attach(
        &self,
        target: &mut dyn LoraTarget,
        cfg: &Config,
        layout: QkLayout,
        dtype: DType,
        mode: LoraMode,
        faults: &crate::faults::Faults,
    ) -> Result<()> {
        if faults.has(crate::faults::Fault::LoraNotAttached) {
            return Ok(()); // the fault: loaded, never attached
        }
        let double = faults.has(crate::faults::Fault::LoraScale);
        for p in &self.pairs {
            let scale = if double { p.scale * p.scale } else { p.scale };
            let slot = target.lora_slot(p.layer, p.module).ok_or_else(|| {
                EngineError::Input(format!(
                    "{}: the adapter targets `{}`, which layer {} of this model does not have",
                    self.dir.display(),
                    p.module,
                    p.layer
                ))
            })?;
            let mut b = p.b.clone();
            if matches!(p.module, "q_proj" | "k_proj") {
                // B's rows are output rows: into the model's Q/K order.
                b = layout.from_hf(&b.t()?.contiguous()?, cfg.head_dim)?.t()?.contiguous()?;
            }
            let (a, b) = (p.a.to_dtype(dtype)?, b.to_dtype(dtype)?);
            *slot = match mode {
                LoraMode::Unmerged => Linear::Lora(Arc::new(LoraLinear { base: slot.clone(), a, b, scale })),
                LoraMode::Merged => {
                    let w = slot.dequantize()?.to_dtype(dtype)?;
                    let delta = (b.matmul(&a)? * scale)?; // (out, in)
                    Linear::Dense((w + delta)?)
                }
            };
        }
        Ok(())
    }

    /// The engine's inventory: one entry per attached module.
    pub fn inventory(&self) -> Result<Vec<InventoryEntry>> {
        self.pairs
            .iter()
            .map(|p| {
                let (a_sum, a_norm) = sum_norm(&p.a)?;
                let (b_sum, b_norm) = sum_norm(&p.b)?;
                Ok(InventoryEntry {
                    module: p.name(),
                    a_shape: p.a.dims().to_vec(),
                    b_shape: p.b.dims().to_vec(),
                    dtype: "float32".into(),
                    rank: p.a.dims()[0],
                    scale: p.scale,
                    a_sum,
                    a_norm,
                    b_sum,
                    b_norm,
                })
            })
            .collect()
    }
}

/// What an adapter attaches to: a family's weights, which hand out the matrix of a module
/// by the name adapters give it (PEFT's and MLX's `q_proj`, `k_proj`, `v_proj`, `o_proj`,
/// `gate_proj`, `up_proj`, `down_proj`; Mixtral's router `gate`). A family whose weights
/// implement it takes adapters without any change here.
pub trait LoraTarget {
    /// The matrix of `module` in layer `layer` (`None`: the model has no such layer or module,
    /// e.g. `gate_proj` in a mixture-of-experts layer).
    fn lora_slot(&mut self, layer: usize, module: &str) -> Option<&mut Linear>;
}

/// `(out, in)` of a projection.
pub fn module_dims(cfg: &Config, module: &str) -> (usize, usize) {
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    match module {
        "q_proj" => (cfg.num_heads * hd, h),
        "k_proj" | "v_proj" => (cfg.num_kv_heads * hd, h),
        "o_proj" => (h, cfg.num_heads * hd),
        "gate_proj" | "up_proj" => (i, h),
        "gate" => (cfg.num_experts, h),
        _ => (h, i),
    }
}

/// A tensor name -> (layer, projection, is B), or None when it names no projection's
/// LoRA matrix.
fn parse_key(name: &str, format: LoraFormat) -> Option<(usize, &'static str, bool)> {
    let rest = match format {
        LoraFormat::Peft => name.strip_prefix("base_model.model.model.layers.")?,
        LoraFormat::Mlx => name.strip_prefix("model.layers.")?,
    };
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    for (module, path) in PROJECTIONS {
        if let Some(tail) = rest.strip_prefix(path).and_then(|t| t.strip_prefix('.')) {
            let is_b = match (format, tail) {
                (LoraFormat::Peft, "lora_A.weight" | "lora_A.default.weight") => false,
                (LoraFormat::Peft, "lora_B.weight" | "lora_B.default.weight") => true,
                (LoraFormat::Mlx, "lora_a") => false,
                (LoraFormat::Mlx, "lora_b") => true,
                _ => return None,
            };
            return Some((layer, module, is_b));
        }
    }
    None
}

/// A target name (`q_proj`, `self_attn.q_proj`, ...) -> the canonical projection name.
fn resolve_targets(names: &[String], path: &Path) -> Result<Vec<String>> {
    let mut out = BTreeSet::new();
    let mut unknown = vec![];
    for n in names {
        match PROJECTIONS.iter().find(|(m, p)| n == m || n == p || n.ends_with(&format!(".{p}"))) {
            Some((m, _)) => {
                out.insert(*m);
            }
            None => unknown.push(n.clone()),
        }
    }
    if !unknown.is_empty() {
        return Err(EngineError::Config {
            path: path.into(),
            message: format!(
                "target module(s) {} match no projection of the model (a Llama layer has {})",
                unknown.iter().map(|u| format!("`{u}`")).collect::<Vec<_>>().join(", "),
                PROJECTIONS.iter().map(|(m, _)| *m).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    // In forward order.
    Ok(PROJECTIONS.iter().filter(|(m, _)| out.contains(m)).map(|(m, _)| m.to_string()).collect())
}

fn bad(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Config { path: path.into(), message: message.into() }
}

impl LoraConfig {
    /// An `adapter_config.json`'s text in `format`, resolved against the model's config
    /// (`path` names the file in messages).
    pub fn parse(text: &str, format: LoraFormat, path: &Path, cfg: &Config) -> Result<LoraConfig> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| EngineError::Config { path: path.into(), message: e.to_string() })?;
        match format {
            LoraFormat::Peft => peft_config(&json, path, cfg),
            LoraFormat::Mlx => mlx_config(&json, path, cfg),
        }
    }
}

fn peft_config(j: &serde_json::Value, path: &Path, cfg: &Config) -> Result<LoraConfig> {
    if let Some(t) = j.get("peft_type").and_then(|v| v.as_str()) {
        if t != "LORA" {
            return Err(bad(path, format!("peft_type {t:?}: only LORA adapters are supported")));
        }
    }
    for (key, ok) in [
        ("use_dora", j.get("use_dora").is_none_or(|v| v.is_null() || v == false)),
        ("fan_in_fan_out", j.get("fan_in_fan_out").is_none_or(|v| v.is_null() || v == false)),
        ("bias", j.get("bias").is_none_or(|v| v.is_null() || v == "none")),
        ("modules_to_save", j.get("modules_to_save").is_none_or(|v| v.is_null() || v.as_array().is_some_and(|a| a.is_empty()))),
        ("rank_pattern", j.get("rank_pattern").is_none_or(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))),
        ("alpha_pattern", j.get("alpha_pattern").is_none_or(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))),
    ] {
        if !ok {
            return Err(bad(path, format!("`{key}` = {} is not supported", j[key])));
        }
    }
    let r = j.get("r").and_then(|v| v.as_u64()).ok_or_else(|| bad(path, "missing or invalid `r` (the LoRA rank)"))? as usize;
    if r == 0 {
        return Err(bad(path, "`r` is 0"));
    }
    let alpha = j.get("lora_alpha").and_then(|v| v.as_f64()).ok_or_else(|| bad(path, "missing or invalid `lora_alpha`"))?;
    let rslora = j.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
    let (scale, scale_source) = if rslora {
        (alpha / (r as f64).sqrt(), format!("lora_alpha / sqrt(r) = {alpha} / sqrt({r}) (rsLoRA)"))
    } else {
        (alpha / r as f64, format!("lora_alpha / r = {alpha} / {r}"))
    };
    let targets: Vec<String> = match j.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a.iter().map(|v| v.as_str().map(String::from)).collect::<Option<_>>().ok_or_else(|| bad(path, "`target_modules` must be a list of names"))?,
        Some(serde_json::Value::String(s)) => {
            return Err(bad(path, format!("`target_modules` is the regular expression {s:?}: give a list of module names")))
        }
        _ => return Err(bad(path, "missing `target_modules`")),
    };
    let targets = resolve_targets(&targets, path)?;
    let layers: Vec<usize> = match j.get("layers_to_transform") {
        None | Some(serde_json::Value::Null) => (0..cfg.num_layers).collect(),
        Some(v) => {
            let list: Vec<u64> = match v {
                serde_json::Value::Number(n) => vec![n.as_u64().ok_or_else(|| bad(path, "invalid `layers_to_transform`"))?],
                serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64()).collect::<Option<_>>().ok_or_else(|| bad(path, "invalid `layers_to_transform`"))?,
                _ => return Err(bad(path, "invalid `layers_to_transform`")),
            };
            if let Some(l) = list.iter().find(|&&l| l as usize >= cfg.num_layers) {
                return Err(bad(path, format!("`layers_to_transform` names layer {l}, the model has {} layers", cfg.num_layers)));
            }
            let set: BTreeSet<usize> = list.into_iter().map(|l| l as usize).collect();
            set.into_iter().collect()
        }
    };
    Ok(LoraConfig { format: LoraFormat::Peft, rank: r, scale, scale_source, targets, layers, file_dtype: String::new() })
}

fn mlx_config(j: &serde_json::Value, path: &Path, cfg: &Config) -> Result<LoraConfig> {
    let ft = j.get("fine_tune_type").and_then(|v| v.as_str()).unwrap_or("lora");
    if ft != "lora" {
        return Err(bad(path, format!("fine_tune_type {ft:?}: only \"lora\" is supported")));
    }
    let p = j.get("lora_parameters").ok_or_else(|| bad(path, "missing `lora_parameters`"))?;
    let r = p.get("rank").and_then(|v| v.as_u64()).ok_or_else(|| bad(path, "missing or invalid `lora_parameters.rank`"))? as usize;
    if r == 0 {
        return Err(bad(path, "`lora_parameters.rank` is 0"));
    }
    let scale = p.get("scale").and_then(|v| v.as_f64()).ok_or_else(|| {
        bad(path, "missing `lora_parameters.scale` (mlx-lm's LoRA config uses `scale`, not `alpha`)")
    })?;
    let targets = match p.get("keys") {
        None | Some(serde_json::Value::Null) => model_projections(cfg).map(String::from).collect(),
        Some(serde_json::Value::Array(a)) => {
            let names: Vec<String> =
                a.iter().map(|v| v.as_str().map(String::from)).collect::<Option<_>>().ok_or_else(|| bad(path, "`lora_parameters.keys` must be a list of names"))?;
            resolve_targets(&names, path)?
        }
        Some(_) => return Err(bad(path, "`lora_parameters.keys` must be a list of names")),
    };
    let n = j.get("num_layers").and_then(|v| v.as_i64()).ok_or_else(|| bad(path, "missing or invalid `num_layers`"))?;
    let total = cfg.num_layers;
    // model.layers[-max(n, 0):]: n <= 0 slices everything, n > total too.
    let first = if n <= 0 || n as usize >= total { 0 } else { total - n as usize };
    Ok(LoraConfig {
        format: LoraFormat::Mlx,
        rank: r,
        scale,
        scale_source: format!("lora_parameters.scale = {scale}"),
        targets,
        layers: (first..total).collect(),
        file_dtype: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_cfg() -> Config {
        Config {
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 512,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: Default::default(),
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            qkv_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            num_experts: 0,
            num_experts_per_tok: 0,
            layer_windows: vec![],
            variant: Default::default(),
        }
    }

    #[test]
    fn keys_of_both_formats_name_layer_module_and_matrix() {
        assert_eq!(parse_key("base_model.model.model.layers.2.mlp.down_proj.lora_B.weight", LoraFormat::Peft), Some((2, "down_proj", true)));
        assert_eq!(parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", LoraFormat::Peft), Some((0, "q_proj", false)));
        assert_eq!(parse_key("model.layers.11.self_attn.v_proj.lora_a", LoraFormat::Mlx), Some((11, "v_proj", false)));
        assert_eq!(parse_key("model.layers.1.self_attn.q_proj.lora_A.weight", LoraFormat::Mlx), None);
        assert_eq!(parse_key("lm_head.lora_a", LoraFormat::Mlx), None);
        assert_eq!(parse_key("model.layers.1.block_sparse_moe.gate.lora_a", LoraFormat::Mlx), Some((1, "gate", false)));
    }

    #[test]
    fn mlx_num_layers_counts_from_the_end_and_zero_or_less_means_all() {
        let cfg = tiny_cfg();
        let layers = |n: i64| {
            let j = serde_json::json!({"num_layers": n, "lora_parameters": {"rank": 8, "scale": 20.0, "keys": ["self_attn.q_proj"]}});
            mlx_config(&j, Path::new("c.json"), &cfg).unwrap().layers
        };
        assert_eq!(layers(1), vec![2]);
        assert_eq!(layers(2), vec![1, 2]);
        assert_eq!(layers(16), vec![0, 1, 2]);
        assert_eq!(layers(0), vec![0, 1, 2]);
        assert_eq!(layers(-1), vec![0, 1, 2]);
    }

    #[test]
    fn peft_scale_is_alpha_over_r_or_over_sqrt_r() {
        let cfg = tiny_cfg();
        let j = serde_json::json!({"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "self_attn.v_proj"]});
        let c = peft_config(&j, Path::new("c.json"), &cfg).unwrap();
        assert_eq!((c.scale, c.targets.clone(), c.layers.clone()), (2.0, vec!["q_proj".to_string(), "v_proj".to_string()], vec![0, 1, 2]));
        let j = serde_json::json!({"r": 16, "lora_alpha": 32, "use_rslora": true, "target_modules": ["q_proj"], "layers_to_transform": 1});
        let c = peft_config(&j, Path::new("c.json"), &cfg).unwrap();
        assert_eq!((c.scale, c.layers), (8.0, vec![1]));
        let j = serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": "q_proj|v_proj"});
        assert!(peft_config(&j, Path::new("c.json"), &cfg).unwrap_err().to_string().contains("regular expression"));
    }
}
