//! GGUF files ([`GgufFile`]: metadata, the hyper-parameters any architecture writes under
//! `{arch}.*`, tensors read in their stored format) and the weights of the Llama-shaped
//! families (Llama, Qwen2, Mixtral: [`LlamaWeights`], taken by [`llama_weights`] from a
//! [`TensorTable`], the loader any family builds its weights with). Every tensor the
//! architecture needs is taken by its checkpoint name
//! (`model.layers.{i}.self_attn.q_proj.weight` / `blk.{i}.attn_q.weight`), its shape is
//! checked against the [`Config`], and any tensor the architecture does not use is an
//! error: a silently ignored tensor is how an unattached adapter goes unnoticed.
//!
//! GGUF tensors are dequantized to the requested dtype at load, or kept in their block
//! format ([`WeightsMode`]). GGUF stores Q/K rows in the interleaved-RoPE order; they are
//! kept that way (see [`crate::layout`]).
//!
//! A layer's feed-forward part is a dense SwiGLU MLP or, for a sparse mixture of experts
//! (Mixtral: a config with `num_experts` > 0), a router and one SwiGLU MLP per expert
//! ([`Ffn`]): Hugging Face `block_sparse_moe.gate` and
//! `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down); GGUF `blk.{i}.ffn_gate_inp` and
//! the merged `blk.{i}.ffn_{gate,up,down}_exps` `(n_experts, out, in)`, split per expert at
//! load (quantized blocks are split whole).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{candle_message, EngineError, Result};
use crate::quant::{Linear, WeightsMode};
use crate::tensors::{safetensors_files, safetensors_shapes, Safetensors, TensorSource, TensorTable};

/// Weights of one decoder block; matrices are `[out, in]` as in the checkpoint.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor, // (hidden)
    pub wq: Linear,        // (heads*head_dim, hidden)
    pub wk: Linear,        // (kv_heads*head_dim, hidden)
    pub wv: Linear,        // (kv_heads*head_dim, hidden)
    pub wo: Linear,        // (hidden, heads*head_dim)
    /// q/k/v biases (Qwen2), `(heads*head_dim)` / `(kv_heads*head_dim)`, in the Q/K row
    /// layout of `wq`/`wk`; `None` for families without them.
    pub bq: Option<Tensor>,
    pub bk: Option<Tensor>,
    pub bv: Option<Tensor>,
    pub mlp_norm: Tensor,  // (hidden)
    pub ffn: Ffn,
    /// Gemma 3's extra norms ([`Arch::gemma_norms`]), `None` for the other families.
    pub extra: Option<ExtraNorms>,
}

/// The norms Gemma 3 adds to a block: an RMSNorm over each head of q and of k before RoPE
/// (`(head_dim)` weights), and one on each branch's output before it joins the residual stream
/// (`(hidden)`). Held as the multiplier the norm applies (`1 + w` of the Hugging Face
/// checkpoint, which llama.cpp's converter stores).
#[derive(Debug, Clone)]
pub struct ExtraNorms {
    pub q_norm: Tensor,
    pub k_norm: Tensor,
    pub attn_post_norm: Tensor,
    pub mlp_post_norm: Tensor,
}

/// The feed-forward part of a block.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// One SwiGLU MLP (`mlp.{gate,up,down}_proj`).
    Dense(SwiGlu),
    /// A router and a SwiGLU MLP per expert (Mixtral's `block_sparse_moe`).
    Moe(MoeWeights),
}

/// A SwiGLU MLP: `down(silu(gate x) * up x)`.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Linear, // (intermediate, hidden)
    pub up: Linear,   // (intermediate, hidden)
    pub down: Linear, // (hidden, intermediate)
}

/// A sparse mixture of experts: the router (`block_sparse_moe.gate`, no bias) and the experts
/// (`w1` = gate, `w3` = up, `w2` = down).
#[derive(Debug, Clone)]
pub struct MoeWeights {
    pub router: Linear, // (n_experts, hidden)
    pub experts: Vec<SwiGlu>,
}

impl Ffn {
    /// The dense MLP (`None` for a mixture of experts).
    pub fn dense(&self) -> Option<&SwiGlu> {
        match self {
            Ffn::Dense(m) => Some(m),
            Ffn::Moe(_) => None,
        }
    }
    pub fn dense_mut(&mut self) -> Option<&mut SwiGlu> {
        match self {
            Ffn::Dense(m) => Some(m),
            Ffn::Moe(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LlamaWeights {
    pub embed: Tensor, // (vocab, hidden), dense in every mode (a row lookup)
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,    // (hidden)
    pub lm_head: Linear, // (vocab, hidden); the embedding itself when tied
    /// llama.cpp's `rope_freqs.weight` `(head_dim / 2)`: Llama 3's RoPE scaling as
    /// per-frequency divisors (GGUF only).
    pub rope_freqs: Option<Tensor>,
    /// How many of the matrices are stored in each type in the file ("F32", "Q4_1", ...),
    /// whatever mode they were loaded in.
    pub stored_types: std::collections::BTreeMap<String, usize>,
}

impl LlamaWeights {
    /// Every matrix, in forward order, with its role name.
    pub fn matrices(&self) -> Vec<(String, &Linear)> {
        let mut v = vec![];
        for (i, l) in self.layers.iter().enumerate() {
            for (n, m) in [("q", &l.wq), ("k", &l.wk), ("v", &l.wv), ("o", &l.wo)] {
                v.push((format!("layers.{i}.{n}"), m));
            }
            match &l.ffn {
                Ffn::Dense(m) => {
                    for (n, w) in [("gate", &m.gate), ("up", &m.up), ("down", &m.down)] {
                        v.push((format!("layers.{i}.{n}"), w));
                    }
                }
                Ffn::Moe(moe) => {
                    v.push((format!("layers.{i}.router"), &moe.router));
                    for (e, m) in moe.experts.iter().enumerate() {
                        for (n, w) in [("gate", &m.gate), ("up", &m.up), ("down", &m.down)] {
                            v.push((format!("layers.{i}.experts.{e}.{n}"), w));
                        }
                    }
                }
            }
        }
        v.push(("lm_head".into(), &self.lm_head));
        v
    }

    /// The distinct storage types of the matrices, sorted (e.g. `["Q4_1", "Q8_0"]`).
    pub fn matrix_types(&self) -> Vec<String> {
        let set: BTreeSet<String> = self.matrices().iter().map(|(_, m)| m.type_name()).collect();
        set.into_iter().collect()
    }

    /// The file's quantization: its most common block-quantized matrix type (None when
    /// every matrix is stored as F32/F16/BF16).
    pub fn quant_type(&self) -> Option<String> {
        self.stored_types
            .iter()
            .filter(|(t, _)| !matches!(t.as_str(), "F32" | "F16" | "BF16"))
            .max_by_key(|(_, n)| **n)
            .map(|(t, _)| t.clone())
    }

    /// True when any matrix is multiplied with quantized kernels.
    pub fn any_quantized(&self) -> bool {
        self.matrices().iter().any(|(_, m)| !matches!(m.base(), Linear::Dense(_)))
    }
}

impl crate::lora::LoraTarget for LlamaWeights {
    fn lora_slot(&mut self, layer: usize, module: &str) -> Option<&mut Linear> {
        let lw = self.layers.get_mut(layer)?;
        Some(match (module, &mut lw.ffn) {
            ("q_proj", _) => &mut lw.wq,
            ("k_proj", _) => &mut lw.wk,
            ("v_proj", _) => &mut lw.wv,
            ("o_proj", _) => &mut lw.wo,
            ("gate_proj", Ffn::Dense(m)) => &mut m.gate,
            ("up_proj", Ffn::Dense(m)) => &mut m.up,
            ("down_proj", Ffn::Dense(m)) => &mut m.down,
            ("gate", Ffn::Moe(moe)) => &mut moe.router,
            _ => return None,
        })
    }
}

/// Names of one checkpoint format.
struct Naming {
    embed: &'static str,
    norm: &'static str,
    lm_head: &'static str,
    layer: fn(usize, Part) -> String,
    /// The bias of a layer's projection (`Part::Q` -> `...q_proj.bias`).
    bias: fn(usize, Part) -> String,
    /// Tensors that may be present and are legitimately unused.
    ignorable: fn(&str) -> bool,
    /// A mixture-of-experts layer's tensors.
    moe: MoeNaming,
    /// What every tensor of layer `i` starts with, before `{i}.`.
    layer_prefix: &'static str,
}

/// Names of a mixture-of-experts layer in one checkpoint format.
enum MoeNaming {
    /// One tensor per expert and matrix (Hugging Face): router name, and expert `e`'s matrix.
    PerExpert { router: fn(usize) -> String, expert: fn(usize, usize, Part) -> String },
    /// The experts' matrices merged into one `(n_experts, out, in)` tensor each (GGUF).
    Merged { router: fn(usize) -> String, merged: fn(usize, Part) -> String },
}

#[derive(Clone, Copy)]
enum Part {
    AttnNorm,
    Q,
    K,
    V,
    O,
    MlpNorm,
    Gate,
    Up,
    Down,
    // Gemma 3: its norm before the MLP (Llama's `MlpNorm` is `post_attention_layernorm` in a
    // Hugging Face checkpoint, Gemma's `post_attention_layernorm` is its `AttnPostNorm`).
    QNorm,
    KNorm,
    AttnPostNorm,
    PreFfnNorm,
    MlpPostNorm,
}

const HF: Naming = Naming {
    embed: "model.embed_tokens.weight",
    norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layer: |i, p| {
        let s = match p {
            Part::AttnNorm => "input_layernorm",
            Part::Q => "self_attn.q_proj",
            Part::K => "self_attn.k_proj",
            Part::V => "self_attn.v_proj",
            Part::O => "self_attn.o_proj",
            Part::MlpNorm => "post_attention_layernorm",
            Part::Gate => "mlp.gate_proj",
            Part::Up => "mlp.up_proj",
            Part::Down => "mlp.down_proj",
            Part::QNorm => "self_attn.q_norm",
            Part::KNorm => "self_attn.k_norm",
            Part::AttnPostNorm => "post_attention_layernorm",
            Part::PreFfnNorm => "pre_feedforward_layernorm",
            Part::MlpPostNorm => "post_feedforward_layernorm",
        };
        format!("model.layers.{i}.{s}.weight")
    },
    bias: |i, p| (HF.layer)(i, p).replace(".weight", ".bias"),
    ignorable: |n| n.ends_with("rotary_emb.inv_freq"),
    layer_prefix: "model.layers.",
    moe: MoeNaming::PerExpert {
        router: |i| format!("model.layers.{i}.block_sparse_moe.gate.weight"),
        expert: |i, e, p| {
            let w = match p {
                Part::Gate => "w1",
                Part::Up => "w3",
                _ => "w2",
            };
            format!("model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight")
        },
    },
};

const GGUF: Naming = Naming {
    embed: "token_embd.weight",
    norm: "output_norm.weight",
    lm_head: "output.weight",
    layer: |i, p| {
        let s = match p {
            Part::AttnNorm => "attn_norm",
            Part::Q => "attn_q",
            Part::K => "attn_k",
            Part::V => "attn_v",
            Part::O => "attn_output",
            Part::MlpNorm => "ffn_norm",
            Part::Gate => "ffn_gate",
            Part::Up => "ffn_up",
            Part::Down => "ffn_down",
            Part::QNorm => "attn_q_norm",
            Part::KNorm => "attn_k_norm",
            Part::AttnPostNorm => "post_attention_norm",
            Part::PreFfnNorm => "ffn_norm",
            Part::MlpPostNorm => "post_ffw_norm",
        };
        format!("blk.{i}.{s}.weight")
    },
    bias: |i, p| (GGUF.layer)(i, p).replace(".weight", ".bias"),
    ignorable: |_| false,
    layer_prefix: "blk.",
    moe: MoeNaming::Merged {
        router: |i| format!("blk.{i}.ffn_gate_inp.weight"),
        merged: |i, p| (GGUF.layer)(i, p).replace(".weight", "_exps.weight"),
    },
};

/// What a GGUF file's tensor data is read from: the file, or bytes in memory.
pub trait GgufReader: std::io::Read + std::io::Seek + Send + Sync {}
impl<T: std::io::Read + std::io::Seek + Send + Sync> GgufReader for T {}

/// An opened GGUF file: its parsed header and a reader for tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    reader: Box<dyn GgufReader>,
    /// The `q4_1-min` fault: Q4_1 blocks lose their minimum (both weight modes).
    pub drop_q41_min: bool,
}

impl GgufFile {
    /// Opens a GGUF file: its header is read and checked by [`crate::gguf::read_content`]
    /// (alignment, counts and lengths against the file size, the tensor table's offsets and
    /// ranges), not by candle's reader.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        Self::from_reader(path, Box::new(BufReader::new(file)), len)
    }

    /// A GGUF file held in memory (`path` only names it in messages): the entry point for
    /// fuzzing everything past the header ([`GgufFile::config`], the tokenizer, the weights).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let len = bytes.len() as u64;
        Self::from_reader(path, Box::new(std::io::Cursor::new(bytes)), len)
    }

    /// A GGUF file read from `reader`, positioned at its start, `len` bytes long.
    pub fn from_reader(path: &Path, mut reader: Box<dyn GgufReader>, len: u64) -> Result<Self> {
        let content = crate::gguf::read_content(&mut reader, len)
            .map_err(|message| EngineError::Gguf { path: path.to_path_buf(), message })?;
        Ok(Self { path: path.to_path_buf(), content, reader, drop_q41_min: false })
    }

    /// Checks a GGUF header held in memory (the whole file, or at least its header and
    /// enough bytes for the tensor data it declares) and returns it parsed. Never panics on
    /// any bytes: the entry point a fuzzer calls.
    pub fn validate_header(bytes: &[u8]) -> Result<gguf_file::Content> {
        crate::gguf::read_content(&mut std::io::Cursor::new(bytes), bytes.len() as u64)
            .map_err(|message| EngineError::Gguf { path: PathBuf::from("<memory>"), message })
    }

    pub fn metadata(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content.metadata.get(key).ok_or_else(|| EngineError::MissingMetadata {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn bad_value(&self, key: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::Gguf { path: self.path.clone(), message: format!("metadata {key}: {e}") }
    }

    /// An unsigned integer of any width that fits in a u32 (a u64 or a negative i32 that
    /// does not is an error, never truncated or wrapped).
    pub fn md_u32(&self, key: &str) -> Result<u32> {
        let v = self.metadata(key)?;
        let Some(x) = crate::gguf::as_integer(v) else {
            return Err(self.bad_value(key, format!("has type {}, expected an integer", crate::gguf::type_name(v))));
        };
        u32::try_from(x).map_err(|_| self.bad_value(key, format!("{x} is not a count or id (0 to {})", u32::MAX)))
    }

    pub fn md_f32(&self, key: &str) -> Result<f32> {
        let v = self.metadata(key)?;
        v.to_f32().or_else(|_| v.to_f64().map(|x| x as f32)).map_err(|e| self.bad_value(key, e))
    }

    pub fn md_str(&self, key: &str) -> Result<&str> {
        let v = self.metadata(key)?;
        v.to_string().map(|s| s.as_str()).map_err(|e| self.bad_value(key, e))
    }

    pub fn md_str_array(&self, key: &str) -> Result<Vec<String>> {
        let v = self.metadata(key)?.to_vec().map_err(|e| self.bad_value(key, e))?;
        v.iter()
            .map(|x| x.to_string().cloned().map_err(|e| self.bad_value(key, e)))
            .collect()
    }

    pub fn md_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        let v = self.metadata(key)?.to_vec().map_err(|e| self.bad_value(key, e))?;
        v.iter()
            .map(|x| x.to_i32().or_else(|_| x.to_u32().map(|u| u as i32)).map_err(|e| self.bad_value(key, e)))
            .collect()
    }

    pub fn md_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.metadata(key)?.to_vec().map_err(|e| self.bad_value(key, e))?;
        v.iter()
            .map(|x| x.to_f32().or_else(|_| x.to_f64().map(|f| f as f32)).map_err(|e| self.bad_value(key, e)))
            .collect()
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    /// The shape of any decoder-only model in this file, from its architecture's metadata
    /// (`{arch}.block_count`, `.embedding_length`, `.attention.head_count[_kv]`,
    /// `.attention.key_length`, `.feed_forward_length`) and the embedding's rows, without this
    /// engine's checks of what it runs: what the harness needs to describe a model that an
    /// engine under test other than the bundled one runs (Gemma 3, Phi-3, ...). Checked by
    /// [`Config::validate`] only.
    pub fn shape_config(&self) -> Result<Config> {
        self.read_config(false, &[])
    }

    /// Resolves hyper-parameters from the architecture's metadata (`{arch}.*`: `llama.*`,
    /// `qwen2.*`, ...), checked against the tensor table and the vocabulary, with what the
    /// engine's decoder needs (full-width, unscaled RoPE; the feed-forward width and the norm
    /// epsilon given). Which architectures the engine runs is the registry's to say
    /// ([`crate::models::for_gguf`]), not this reader's.
    pub fn config(&self) -> Result<Config> {
        self.read_config(true, &[])
    }

    /// [`GgufFile::config`] for a family that reads `family_keys` (`{arch}.` and what
    /// follows) itself: those keys are not refused as unread (Gemma 3's
    /// `attention.sliding_window`).
    pub fn config_reading(&self, family_keys: &[&str]) -> Result<Config> {
        self.read_config(true, family_keys)
    }

    /// Every `{arch}.*` key outside RoPE's (checked by [`GgufFile::rope_scaling`]) is one the
    /// engine reads, or the file states something the engine would not compute (a sliding
    /// window, logit soft-capping, another value width) and is refused, naming the key.
    fn check_keys_read(&self, arch: &str, head_dim: usize, family_keys: &[&str]) -> Result<()> {
        const READ: &[&str] = &[
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "vocab_size",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.value_length",
            "attention.layer_norm_rms_epsilon",
            "expert_count",
            "expert_used_count",
        ];
        let prefix = format!("{arch}.");
        let mut unread: Vec<&str> = self
            .content
            .metadata
            .keys()
            .filter_map(|key| key.strip_prefix(&prefix))
            .filter(|rest| !rest.starts_with("rope.") && !READ.contains(rest) && !family_keys.contains(rest))
            .collect();
        unread.sort();
        if let Some(first) = unread.first() {
            return Err(EngineError::Unsupported {
                path: self.path.clone(),
                message: format!(
                    "{prefix}{first} is not computed by this engine ({}): refused rather than ignored",
                    if unread.len() > 1 { format!("nor {} more such key(s)", unread.len() - 1) } else { "a model the engine would run without it".into() }
                ),
            });
        }
        let value = format!("{prefix}attention.value_length");
        if self.has(&value) && self.md_u32(&value)? as usize != head_dim {
            return Err(EngineError::Unsupported {
                path: self.path.clone(),
                message: format!("{value} {} differs from the key width {head_dim}: not run by this engine", self.md_u32(&value)?),
            });
        }
        Ok(())
    }

    /// The RoPE scaling the metadata states (`{arch}.rope.scaling.*`): none, linear or YaRN as
    /// llama.cpp computes them; every other `{arch}.rope.*` key this engine does not compute is
    /// refused by name. (`rope_freqs.weight`, Llama 3's per-frequency divisors, is a tensor:
    /// the weights' loader takes it.)
    fn rope_scaling(&self, arch: &str, family_keys: &[&str]) -> Result<crate::rope::RopeScaling> {
        use crate::rope::RopeScaling;
        let k = |key: &str| format!("{arch}.rope.{key}");
        let unsupported = |message: String| EngineError::Unsupported { path: self.path.clone(), message };
        const READ: &[&str] = &[
            "freq_base",
            "dimension_count",
            "scaling.type",
            "scaling.factor",
            "scaling.original_context_length",
            "scaling.finetuned",
            "scaling.attn_factor",
            "scaling.yarn_beta_fast",
            "scaling.yarn_beta_slow",
        ];
        let prefix = k("");
        let mut unread: Vec<&str> = self.content.metadata.keys().filter_map(|key| key.strip_prefix(&prefix)).filter(|rest| !READ.contains(rest) && !family_keys.contains(&format!("rope.{rest}").as_str())).collect();
        unread.sort();
        if let Some(first) = unread.first() {
            return Err(unsupported(format!("{prefix}{first} is not computed by this engine's RoPE: refused rather than ignored")));
        }
        let opt_f32 = |key: &str| -> Result<Option<f64>> { if self.has(key) { self.md_f32(key).map(|v| Some(v as f64)) } else { Ok(None) } };
        let ty = if self.has(&k("scaling.type")) { self.md_str(&k("scaling.type"))?.to_string() } else { "none".into() };
        let factor = || -> Result<f64> {
            match opt_f32(&k("scaling.factor"))? {
                Some(f) if f >= 1.0 && f.is_finite() => Ok(f),
                Some(f) => Err(EngineError::Config { path: self.path.clone(), message: format!("{} = {f}: a RoPE scaling factor is at least 1", k("scaling.factor")) }),
                None => Err(EngineError::MissingMetadata { path: self.path.clone(), key: k("scaling.factor") }),
            }
        };
        let scaling = match ty.as_str() {
            "none" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "yarn" => {
                let factor = factor()?;
                let orig = self.md_u32(&k("scaling.original_context_length"))? as usize;
                // llama.cpp: mscale = attn_factor * (1 + 0.1 ln(factor)).
                let attn = opt_f32(&k("scaling.attn_factor"))?.unwrap_or(1.0);
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast: opt_f32(&k("scaling.yarn_beta_fast"))?.unwrap_or(32.0),
                    beta_slow: opt_f32(&k("scaling.yarn_beta_slow"))?.unwrap_or(1.0),
                    attention_factor: attn * (0.1 * factor.ln() + 1.0),
                    truncate: true,
                }
            }
            other => {
                return Err(unsupported(format!(
                    "{} `{other}` is not computed by this engine for GGUF files (it computes none, linear, yarn and rope_freqs.weight)",
                    k("scaling.type")
                )))
            }
        };
        if scaling != RopeScaling::Default && self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(unsupported(format!("{} `{ty}` and rope_freqs.weight together: the file scales its RoPE twice", k("scaling.type"))));
        }
        for t in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            if self.content.tensor_infos.contains_key(t) {
                return Err(unsupported(format!("{t} (LongRoPE in a GGUF) is not run by this engine yet: use the Hugging Face checkpoint")));
            }
        }
        Ok(scaling)
    }

    /// [`GgufFile::config`] (`strict`) or [`GgufFile::shape_config`].
    fn read_config(&self, strict: bool, family_keys: &[&str]) -> Result<Config> {
        let arch = self.md_str("general.architecture")?;
        let k = |key: &str| format!("{arch}.{key}");
        let bad = |message: String| EngineError::Config { path: self.path.clone(), message };
        let opt_u32 = |k: &str| -> Result<Option<u32>> {
            if self.has(k) { self.md_u32(k).map(Some) } else { Ok(None) }
        };
        let hidden = self.md_u32(&k("embedding_length"))? as usize;
        if hidden == 0 {
            return Err(bad(format!("{} 0: a model's hidden state has at least one dimension", k("embedding_length"))));
        }
        let heads = self.md_u32(&k("attention.head_count"))? as usize;
        if heads == 0 {
            return Err(bad(format!("{} 0: head_count 0, a model needs at least one attention head", k("attention.head_count"))));
        }
        let kv_heads = opt_u32(&k("attention.head_count_kv"))?.map_or(heads, |v| v as usize);
        if kv_heads == 0 {
            return Err(bad(format!("{} 0: a model needs at least one key/value head", k("attention.head_count_kv"))));
        }
        let head_dim = match opt_u32(&k("attention.key_length"))? {
            Some(d) => d as usize,
            None if hidden % heads != 0 => {
                return Err(bad(format!(
                    "embedding_length {hidden} is not a multiple of head_count {heads} ({}, {}; no {} gives the head width)",
                    k("embedding_length"),
                    k("attention.head_count"),
                    k("attention.key_length")
                )))
            }
            None => hidden / heads,
        };
        if strict {
            self.check_keys_read(arch, head_dim, family_keys)?;
            if let Some(rd) = opt_u32(&k("rope.dimension_count"))? {
                if rd as usize != head_dim {
                    return Err(EngineError::Unsupported {
                        path: self.path.clone(),
                        message: format!("partial RoPE (rope.dimension_count {rd} != head_dim {head_dim})"),
                    });
                }
            }
        }
        let vocab = match self.content.tensor_infos.get(GGUF.embed) {
            Some(info) => info.shape.dims()[0],
            None => return Err(EngineError::MissingTensor { path: self.path.clone(), tensor: GGUF.embed.into() }),
        };
        let eps = k("attention.layer_norm_rms_epsilon");
        let cfg = Config {
            hidden_size: hidden,
            intermediate_size: match strict {
                true => self.md_u32(&k("feed_forward_length"))? as usize,
                false => opt_u32(&k("feed_forward_length"))?.unwrap_or(0).max(1) as usize,
            },
            num_layers: self.md_u32(&k("block_count"))? as usize,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: match (strict, self.has(&eps)) {
                (true, _) | (false, true) => self.md_f32(&eps)? as f64,
                (false, false) => 1e-6,
            },
            rope_theta: if self.has(&k("rope.freq_base")) { self.md_f32(&k("rope.freq_base"))? as f64 } else { 10_000.0 },
            rope_scaling: match strict {
                true => self.rope_scaling(arch, family_keys)?,
                false => crate::rope::RopeScaling::Default,
            },
            max_position_embeddings: opt_u32(&k("context_length"))?.unwrap_or(2048) as usize,
            tie_word_embeddings: !self.content.tensor_infos.contains_key(GGUF.lm_head),
            qkv_bias: self.content.tensor_infos.contains_key(&(GGUF.bias)(0, Part::Q)),
            bos_token_id: opt_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: opt_u32("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
            // llama.cpp writes Mixtral as `llama` with these two keys.
            num_experts: opt_u32(&k("expert_count"))?.unwrap_or(0) as usize,
            num_experts_per_tok: opt_u32(&k("expert_used_count"))?.unwrap_or(0) as usize,
            // llama.cpp runs the architectures of these families without a window (its `llama`
            // and `qwen2` graphs ignore `{arch}.attention.sliding_window`; its converter writes
            // none for Mistral): a file that sets one is refused by the key check, not run
            // with or without it.
            layer_windows: vec![],
            variant: Default::default(),
        };
        if strict {
            let infos = &self.content.tensor_infos;
            check_sizes(&cfg, &self.path, &mut infos.keys().map(|s| s.as_str()), &|n| infos.get(n).map(|i| i.shape.dims().to_vec()), &GGUF, &SizeKeys::gguf(arch))?;
        }
        cfg.validate(&self.path)?;
        if strict {
            self.check_vocabulary(&cfg)?;
        }
        Ok(cfg)
    }

    /// The tokenizer metadata against the model: as many tokens (and token types, scores)
    /// as the embedding has rows, BOS/EOS/unknown/padding ids inside the vocabulary.
    fn check_vocabulary(&self, cfg: &Config) -> Result<()> {
        let bad = |message: String| Err(EngineError::Gguf { path: self.path.clone(), message });
        let len = |key: &str| -> Result<Option<usize>> {
            match self.content.metadata.get(key) {
                None => Ok(None),
                Some(v) => Ok(Some(v.to_vec().map_err(|e| self.bad_value(key, e))?.len())),
            }
        };
        let n_tokens = len("tokenizer.ggml.tokens")?;
        if let Some(n) = n_tokens {
            if n != cfg.vocab_size {
                return bad(format!(
                    "tokenizer.ggml.tokens has {n} tokens, the embedding `{}` has {} rows: the vocabulary and the model do not match",
                    GGUF.embed, cfg.vocab_size
                ));
            }
        }
        // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
        // 6 byte (0 undefined); anything else is no vocabulary llama.cpp or this engine reads.
        if self.has("tokenizer.ggml.token_type") {
            let types = self.md_i32_array("tokenizer.ggml.token_type")?;
            if let Some((i, v)) = types.iter().enumerate().find(|(_, v)| !(0..=6).contains(*v)) {
                return bad(format!(
                    "tokenizer.ggml.token_type[{i}] = {v} is not a token type (0..6: undefined, normal, unknown, control, \
                     user-defined, unused, byte)"
                ));
            }
        }
        for key in ["tokenizer.ggml.token_type", "tokenizer.ggml.scores"] {
            if let (Some(n), Some(t)) = (len(key)?, n_tokens) {
                if n != t {
                    return bad(format!("{key} has {n} entries for {t} tokens (tokenizer.ggml.tokens)"));
                }
            }
        }
        for key in ["bos_token_id", "eos_token_id", "unknown_token_id"] {
            let key = format!("tokenizer.ggml.{key}");
            if self.has(&key) {
                let id = self.md_u32(&key)?;
                if id as usize >= cfg.vocab_size {
                    return bad(format!("{key} = {id} is not a token id (vocabulary of {})", cfg.vocab_size));
                }
            }
        }
        Ok(())
    }
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.content.tensor_infos.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims().to_vec())
    }
    fn stored_type(&self, name: &str) -> String {
        self.content.tensor_infos.get(name).map(|i| format!("{:?}", i.ggml_dtype)).unwrap_or_default()
    }
    fn load(&mut self, name: &str, dtype: DType) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        let dt = q.dtype();
        let t = q.dequantize(&Device::Cpu).map_err(|e| EngineError::Gguf {
            path: self.path.clone(),
            message: format!("dequantizing `{name}` ({dt:?}): {}", candle_message(&e)),
        })?;
        self.report_nonfinite(name, crate::quant::first_nonfinite(&t, dt.block_size())?, dt)?;
        Ok(t.to_dtype(dtype)?)
    }
    fn load_linear(&mut self, name: &str, dtype: DType, mode: WeightsMode) -> Result<Linear> {
        if mode == WeightsMode::Dequant {
            return Ok(Linear::Dense(self.load(name, dtype)?));
        }
        let q = self.qtensor(name)?;
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(Linear::Dense(self.load(name, dtype)?));
        }
        let dt = q.dtype();
        let lin = Linear::from_qtensor(q)
            .map_err(|e| EngineError::Gguf { path: self.path.clone(), message: format!("tensor `{name}`: {e}") })?;
        self.report_nonfinite(name, lin.first_nonfinite()?, dt)?;
        Ok(lin)
    }
    fn load_experts(&mut self, name: &str, n: usize, dtype: DType, mode: WeightsMode) -> Result<Vec<Linear>> {
        let q = self.qtensor(name)?;
        let dt = q.dtype();
        if mode == WeightsMode::Dequant || matches!(dt, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            let t = self.load(name, dtype)?;
            return (0..n).map(|e| Ok(Linear::Dense(t.get(e)?.contiguous()?))).collect();
        }
        // Each expert's rows are whole blocks, contiguous in the merged tensor: split the raw
        // bytes and wrap each part as its own quantized matrix.
        let gguf_err = |m: String| EngineError::Gguf { path: self.path.clone(), message: format!("tensor `{name}`: {m}") };
        let dims = q.shape().dims().to_vec();
        let (out, inp) = (dims[1], dims[2]);
        let raw = q.data().map_err(|e| gguf_err(candle_message(&e)))?;
        if raw.len() % n != 0 {
            return Err(gguf_err(format!("{} bytes do not split into {n} experts", raw.len())));
        }
        let per = raw.len() / n;
        let mut experts = Vec::with_capacity(n);
        for e in 0..n {
            let part = candle_core::quantized::ggml_file::qtensor_from_ggml(dt, &raw[e * per..(e + 1) * per], vec![out, inp], &Device::Cpu)
                .map_err(|err| gguf_err(format!("expert {e}: {}", candle_message(&err))))?;
            let lin = Linear::from_qtensor(part).map_err(|err| gguf_err(format!("expert {e}: {err}")))?;
            self.report_nonfinite(name, lin.first_nonfinite()?, dt)?;
            experts.push(lin);
        }
        Ok(experts)
    }
}

impl GgufFile {
    /// A weight with a NaN/Inf scale is a corrupted file, not a model to run.
    fn report_nonfinite(&self, name: &str, found: Option<(usize, f32)>, dt: GgmlDType) -> Result<()> {
        match found {
            None => Ok(()),
            Some((block, v)) => Err(EngineError::Gguf {
                path: self.path.clone(),
                message: format!(
                    "tensor `{name}` ({dt:?}): block {block} holds a non-finite value ({v}): the tensor data is \
                     corrupted (re-download or re-convert the file; `lockstep quant-check` lists every bad tensor)"
                ),
            }),
        }
    }

    /// Reads one tensor in its stored format. With the `q4_1-min` fault (`drop_q41_min`),
    /// every Q4_1 block's minimum is zeroed as it is read, so that both weight modes (candle's
    /// dequantizer, this crate's block kernels) compute `d*q` instead of `d*q + m`.
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let gguf_err = |e: candle_core::Error| EngineError::Gguf {
            path: self.path.clone(),
            message: format!("tensor `{name}`: {}", candle_message(&e)),
        };
        let q = self.content.tensor(&mut self.reader, name, &Device::Cpu).map_err(gguf_err)?;
        if !(self.drop_q41_min && q.dtype() == GgmlDType::Q4_1) {
            return Ok(q);
        }
        let mut raw = q.data().map_err(gguf_err)?.into_owned();
        crate::quant::zero_q41_minimums(&mut raw);
        candle_core::quantized::ggml_file::qtensor_from_ggml(GgmlDType::Q4_1, &raw, q.shape().dims().to_vec(), &Device::Cpu)
            .map_err(gguf_err)
    }
}

/// What a family's checkpoint holds beyond the Llama tensors.
#[derive(Debug, Clone, Copy)]
pub struct Arch {
    /// The family's name in errors (`llama`).
    pub name: &'static str,
    /// q/k/v projections carry biases (Qwen2).
    pub qkv_bias: bool,
    /// Gemma 3's norms ([`ExtraNorms`], its `pre_feedforward_layernorm` before the MLP), each
    /// applying `1 + w`: a Hugging Face checkpoint holds `w` (one is added at load), a GGUF
    /// file `w + 1` (llama.cpp's converter adds it).
    pub gemma_norms: bool,
    /// The `norm-offset-doubled` fault: the one added to a GGUF file's norms too.
    pub offset_gguf_norms: bool,
}

impl Arch {
    pub const LLAMA: Arch = Arch { name: "llama", qkv_bias: false, gemma_norms: false, offset_gguf_norms: false };
}

/// The tensor names of a checkpoint format a Llama-shaped family reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`).
    Hf,
    /// llama.cpp's GGUF names (`blk.{i}.attn_q.weight`).
    Gguf,
}

impl Format {
    fn naming(self) -> &'static Naming {
        match self {
            Format::Hf => &HF,
            Format::Gguf => &GGUF,
        }
    }
}

/// Takes the weights of a Llama-shaped decoder (Llama, and the families built on it: Qwen2's
/// q/k/v biases, Mixtral's experts, as `arch` and `cfg` say) from `t` by the names of
/// `format`, every shape checked against `cfg`, and refuses any tensor left unused.
pub fn llama_weights(mut t: TensorTable<'_>, format: Format, cfg: &Config, arch: &Arch) -> Result<LlamaWeights> {
    let n = format.naming();
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let embed = t.tensor(n.embed, &[cfg.vocab_size, h])?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let l = |p| (n.layer)(i, p);
        let (q_rows, kv_rows) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let mut bias = |p: Part, rows: usize| match arch.qkv_bias {
            true => t.tensor(&(n.bias)(i, p), &[rows]).map(Some),
            false => Ok(None),
        };
        let (bq, bk, bv) = (bias(Part::Q, q_rows)?, bias(Part::K, kv_rows)?, bias(Part::V, kv_rows)?);
        let mut norm = |p: Part, len: usize| -> Result<Tensor> { offset_norm(t.tensor(&l(p), &[len])?, format, arch) };
        let (extra, mlp_norm) = match arch.gemma_norms {
            false => (None, norm(Part::MlpNorm, h)?),
            true => {
                let extra = ExtraNorms {
                    q_norm: norm(Part::QNorm, hd)?,
                    k_norm: norm(Part::KNorm, hd)?,
                    attn_post_norm: norm(Part::AttnPostNorm, h)?,
                    mlp_post_norm: norm(Part::MlpPostNorm, h)?,
                };
                (Some(extra), norm(Part::PreFfnNorm, h)?)
            }
        };
        let attn_norm = norm(Part::AttnNorm, h)?;
        layers.push(LayerWeights {
            extra,
            bq,
            bk,
            bv,
            attn_norm,
            wq: t.matrix(&l(Part::Q), &[q_rows, h])?,
            wk: t.matrix(&l(Part::K), &[kv_rows, h])?,
            wv: t.matrix(&l(Part::V), &[kv_rows, h])?,
            wo: t.matrix(&l(Part::O), &[h, q_rows])?,
            mlp_norm,
            // A config with experts (Mixtral) has a mixture of experts in every layer.
            ffn: match cfg.num_experts > 0 {
                false => Ffn::Dense(SwiGlu {
                    gate: t.matrix(&l(Part::Gate), &[cfg.intermediate_size, h])?,
                    up: t.matrix(&l(Part::Up), &[cfg.intermediate_size, h])?,
                    down: t.matrix(&l(Part::Down), &[h, cfg.intermediate_size])?,
                }),
                true => {
                    let (ne, f) = (cfg.num_experts, cfg.intermediate_size);
                    let shape = |p: Part| if matches!(p, Part::Down) { [h, f] } else { [f, h] };
                    match &n.moe {
                        MoeNaming::PerExpert { router, expert } => {
                            let router = t.matrix(&router(i), &[ne, h])?;
                            let mut experts = Vec::with_capacity(ne);
                            for e in 0..ne {
                                experts.push(SwiGlu {
                                    gate: t.matrix(&expert(i, e, Part::Gate), &shape(Part::Gate))?,
                                    up: t.matrix(&expert(i, e, Part::Up), &shape(Part::Up))?,
                                    down: t.matrix(&expert(i, e, Part::Down), &shape(Part::Down))?,
                                });
                            }
                            Ffn::Moe(MoeWeights { router, experts })
                        }
                        MoeNaming::Merged { router, merged } => {
                            let router = t.matrix(&router(i), &[ne, h])?;
                            let gate = t.experts(&merged(i, Part::Gate), ne, &shape(Part::Gate))?;
                            let up = t.experts(&merged(i, Part::Up), ne, &shape(Part::Up))?;
                            let down = t.experts(&merged(i, Part::Down), ne, &shape(Part::Down))?;
                            let experts = gate
                                .into_iter()
                                .zip(up)
                                .zip(down)
                                .map(|((gate, up), down)| SwiGlu { gate, up, down })
                                .collect();
                            Ffn::Moe(MoeWeights { router, experts })
                        }
                    }
                }
            },
        });
    }
    let norm = offset_norm(t.tensor(n.norm, &[h])?, format, arch)?;
    let lm_head = if cfg.tie_word_embeddings {
        // A checkpoint may still carry a copy of the tied head; it is checked, then unused.
        if t.has(n.lm_head) {
            t.check(n.lm_head, &[cfg.vocab_size, h])?;
        }
        match t.mode() {
            WeightsMode::Dequant => Linear::Dense(embed.clone()),
            // The tied head multiplies with the embedding in its stored format, as llama.cpp does.
            WeightsMode::Quantized => t.matrix(n.embed, &[cfg.vocab_size, h])?,
        }
    } else {
        t.matrix(n.lm_head, &[cfg.vocab_size, h])?
    };
    let rope_freqs = match format {
        Format::Gguf => t.optional_tensor("rope_freqs.weight", &[hd / 2])?,
        Format::Hf => None,
    };
    let stored_types = t.finish(arch.name, n.ignorable)?;
    Ok(LlamaWeights { embed, layers, norm, lm_head, rope_freqs, stored_types })
}

/// A norm's weight as the norm multiplies by it: Gemma's `1 + w` where the checkpoint holds `w`
/// (Hugging Face; computed in f32 as transformers' `Gemma3RMSNorm` does, or f64), the stored
/// weight otherwise. The `norm-offset-doubled` fault ([`Arch::offset_gguf_norms`]) adds the one to a
/// GGUF weight that already holds it, as a port that reads llama.cpp's files the way it reads
/// Hugging Face's does.
fn offset_norm(w: Tensor, format: Format, arch: &Arch) -> Result<Tensor> {
    if !arch.gemma_norms || (format == Format::Gguf && !arch.offset_gguf_norms) {
        return Ok(w);
    }
    let dtype = w.dtype();
    let wide = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    Ok((w.to_dtype(wide)? + 1.0)?.to_dtype(dtype)?)
}

/// [`llama_weights`] from tensors already read, by Hugging Face names (the fuzz target's
/// entry point: `dir` names them in messages).
pub fn hf_weights_from_tensors(dir: &Path, tensors: HashMap<String, Tensor>, cfg: &Config, dtype: DType, arch: &Arch) -> Result<LlamaWeights> {
    let t = TensorTable::new(Safetensors::from_tensors(dir, tensors), dtype, WeightsMode::Dequant);
    llama_weights(t, Format::Hf, cfg, arch)
}

/// The config keys of one checkpoint format, for messages.
pub(crate) struct SizeKeys {
    pub layers: String,
    pub hidden: String,
    pub heads: String,
    pub kv_heads: String,
    pub ffn: String,
    pub vocab: String,
    pub experts: String,
}

impl SizeKeys {
    pub(crate) fn hf() -> Self {
        let s = |k: &str| k.to_string();
        SizeKeys {
            layers: s("num_hidden_layers"),
            hidden: s("hidden_size"),
            heads: s("num_attention_heads"),
            kv_heads: s("num_key_value_heads"),
            ffn: s("intermediate_size"),
            vocab: s("vocab_size"),
            experts: s("num_local_experts"),
        }
    }
    fn gguf(arch: &str) -> Self {
        let k = |key: &str| format!("{arch}.{key}");
        SizeKeys {
            layers: k("block_count"),
            hidden: k("embedding_length"),
            heads: k("attention.head_count"),
            kv_heads: k("attention.head_count_kv"),
            ffn: k("feed_forward_length"),
            vocab: "the vocabulary (token_embd.weight rows)".into(),
            experts: k("expert_count"),
        }
    }
}

/// Checks a config's sizes against the checkpoint's tensor table (`names`, `shape`) before
/// anything is allocated from them: the layer count against the layers the table holds,
/// the widths against the embedding and layer 0's projections. An absurd size (a corrupt
/// `block_count`, a `num_hidden_layers` of 1e12) is refused here, naming the key and the
/// tensor it disagrees with.
fn check_sizes(cfg: &Config, path: &Path, names: &mut dyn Iterator<Item = &str>, shape: &dyn Fn(&str) -> Option<Vec<usize>>, n: &Naming, keys: &SizeKeys) -> Result<()> {
    let bad = |message: String| Err(EngineError::Config { path: path.to_path_buf(), message });
    let mut layers = BTreeSet::new();
    for name in names {
        if let Some(i) = name.strip_prefix(n.layer_prefix).and_then(|r| r.split_once('.')).and_then(|(i, _)| i.parse::<usize>().ok()) {
            layers.insert(i);
        }
    }
    let held = layers.last().map_or(0, |l| l + 1);
    if cfg.num_layers != held || layers.len() != held {
        let what = match (held, layers.len() == held) {
            (0, _) => "no layer tensors".to_string(),
            (h, true) => format!("layers 0..{} ({h} layers)", h - 1),
            (_, false) => format!("{} layers with gaps (highest index {})", layers.len(), held - 1),
        };
        return bad(format!("{} {} does not match the weights: they hold {what}", keys.layers, cfg.num_layers));
    }
    let shape_of = |name: &str| shape(name).ok_or_else(|| EngineError::MissingTensor { path: path.to_path_buf(), tensor: name.to_string() });
    let embed = shape_of(n.embed)?;
    if embed.len() != 2 || embed[1] != cfg.hidden_size || embed[0] != cfg.vocab_size {
        return bad(format!(
            "{} {} and {} {} do not match the embedding `{}`, shape {embed:?} (vocabulary, hidden)",
            keys.vocab, cfg.vocab_size, keys.hidden, cfg.hidden_size, n.embed
        ));
    }
    let rows = |name: String, want: Option<usize>, what: String| -> Result<()> {
        let got = shape_of(&name)?;
        match want {
            Some(w) if got.first() == Some(&w) => Ok(()),
            _ => bad(format!("{what} does not match `{name}`, shape {got:?}")),
        }
    };
    let hd = cfg.head_dim;
    rows((n.layer)(0, Part::Q), cfg.num_heads.checked_mul(hd), format!("{} {} x head width {hd}", keys.heads, cfg.num_heads))?;
    rows((n.layer)(0, Part::K), cfg.num_kv_heads.checked_mul(hd), format!("{} {} x head width {hd}", keys.kv_heads, cfg.num_kv_heads))?;
    if cfg.num_experts == 0 {
        rows((n.layer)(0, Part::Gate), Some(cfg.intermediate_size), format!("{} {}", keys.ffn, cfg.intermediate_size))?;
    } else {
        let router = match &n.moe {
            MoeNaming::PerExpert { router, .. } | MoeNaming::Merged { router, .. } => router(0),
        };
        rows(router, Some(cfg.num_experts), format!("{} {}", keys.experts, cfg.num_experts))?;
        let gate = match &n.moe {
            MoeNaming::PerExpert { expert, .. } => expert(0, 0, Part::Gate),
            MoeNaming::Merged { merged, .. } => merged(0, Part::Gate),
        };
        let got = shape_of(&gate)?;
        let f = if matches!(n.moe, MoeNaming::Merged { .. }) { got.get(1) } else { got.first() };
        if f != Some(&cfg.intermediate_size) {
            return bad(format!("{} {} does not match `{gate}`, shape {got:?}", keys.ffn, cfg.intermediate_size));
        }
    }
    Ok(())
}

/// [`check_sizes`] for a Hugging Face directory: the config of `cfg_path` (resolved by its
/// family) against the headers of the directory's safetensors files, before anything is
/// allocated from it (a corrupt num_hidden_layers of 1e12 stops here). Skipped when the
/// directory has no safetensors file: such a directory is refused where its weights are
/// loaded.
pub fn check_hf_sizes(cfg: &Config, cfg_path: &Path) -> Result<()> {
    let dir = match cfg_path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => return Ok(()),
    };
    if !dir.is_dir() || safetensors_files(dir)?.is_empty() {
        return Ok(());
    }
    let shapes = safetensors_shapes(dir)?;
    check_sizes(cfg, cfg_path, &mut shapes.keys().map(|s| s.as_str()), &|n| shapes.get(n).cloned(), &HF, &SizeKeys::hf())
}
