//! The Gemma 3 family (text decoder): the shared architecture of [`crate::models::llama`] with
//! what Gemma 3 computes differently, each a part of the shared code ([`crate::config::Variant`],
//! [`crate::weights::ExtraNorms`]), none a copy of it:
//!
//! - the embedding multiplied by `sqrt(hidden_size)`, rounded to the model's dtype;
//! - RMSNorm multiplying by `1 + w`: a Hugging Face checkpoint holds `w` (one is added at load,
//!   in f32 as transformers' `Gemma3RMSNorm` adds it), a GGUF file `w + 1` (llama.cpp's
//!   converter adds it, so nothing is added);
//! - an RMSNorm over each head of q and of k before RoPE (`q_norm`, `k_norm` sites), and one on
//!   the attention's and the MLP's output before each joins the residual stream
//!   (`attn_post_norm`, `mlp_post_norm`); the norm before the MLP is Gemma's
//!   `pre_feedforward_layernorm` (`mlp_norm`);
//! - a GELU-gated MLP (`gelu_pytorch_tanh`);
//! - attention scores scaled by `query_pre_attn_scalar ** -0.5`;
//! - local (sliding-window) and global layers, every sixth global by default, the local ones
//!   with their own RoPE base (`rope_local_base_freq`, 10,000) and no scaling;
//! - a tied output head, and `final_logit_softcapping` where the config sets it.
//!
//! Checkpoints: Hugging Face `model_type: gemma3_text` (`Gemma3ForCausalLM`) and GGUF
//! `general.architecture = gemma3`, read with llama.cpp's defaults where the file is silent:
//! a global layer every sixth, the local RoPE base 10,000, the attention scale
//! `1/sqrt(head_dim)` (`1/sqrt(hidden / heads)` for the 62-layer 27B: no GGUF key holds
//! `query_pre_attn_scalar`). Q/K rows are in the Hugging Face order in both (llama.cpp runs
//! Gemma with NEOX RoPE and its converter does not permute them).

use std::path::Path;

use super::llama::{finish, load_weights, Llama};
use super::{Checkpoint, Family, FamilyModel};
use crate::config::{Activation, Config, HfConfig, Variant};
use crate::error::{EngineError, Result};
use crate::faults::Fault;
use crate::layout::QkLayout;
use crate::options::LoadOptions;
use crate::rope::{HfRope, RopeParams, RopeScaling};
use crate::sites::{LayerSite, SiteKind, INPUT};
use crate::weights::{Arch, GgufFile};

/// What Gemma 3 checkpoints hold beyond the Llama tensors.
const ARCH: Arch = Arch { name: "gemma3", gemma_norms: true, ..Arch::LLAMA };

/// The family's registration.
pub const FAMILY: Family = Family {
    name: "gemma3",
    model_types: &["gemma3_text"],
    gguf_archs: &["gemma3"],
    layer_sites: LAYER_SITES,
    hf_config,
    gguf_config,
    load,
};

/// llama.cpp's local RoPE base for Gemma 3 (`rope_freq_base_train_swa`), and transformers'
/// default `rope_local_base_freq`.
const LOCAL_ROPE_BASE: f64 = 10_000.0;

/// Per-layer sites in forward order, with what each reads.
pub const LAYER_SITES: &[LayerSite] = &[
    LayerSite::new("attn_norm", SiteKind::Norm, &[INPUT]),
    LayerSite::qk("q", SiteKind::Projection, &["attn_norm"]).of("q_proj"),
    LayerSite::qk("k", SiteKind::Projection, &["attn_norm"]).of("k_proj"),
    LayerSite::new("v", SiteKind::Projection, &["attn_norm"]).of("v_proj"),
    LayerSite::qk("q_norm", SiteKind::Norm, &["q"]),
    LayerSite::qk("k_norm", SiteKind::Norm, &["k"]),
    LayerSite::qk("q_rope", SiteKind::Rope, &["q_norm"]),
    LayerSite::qk("k_rope", SiteKind::Rope, &["k_norm"]),
    LayerSite::qk("cache_k", SiteKind::Cache, &["k_rope"]),
    LayerSite::new("cache_v", SiteKind::Cache, &["v"]),
    LayerSite::new("attn", SiteKind::Attention, &["q_rope", "cache_k", "cache_v"]),
    LayerSite::new("attn_out", SiteKind::Projection, &["attn"]).of("o_proj"),
    LayerSite::new("attn_post_norm", SiteKind::Norm, &["attn_out"]),
    LayerSite::new("mlp_norm", SiteKind::Norm, &["attn_post_norm", INPUT]),
    LayerSite::new("mlp_gate", SiteKind::Projection, &["mlp_norm"]).of("gate_proj"),
    LayerSite::new("mlp_up", SiteKind::Projection, &["mlp_norm"]).of("up_proj"),
    LayerSite::new("mlp_act", SiteKind::Activation, &["mlp_gate", "mlp_up"]),
    LayerSite::new("mlp_out", SiteKind::Projection, &["mlp_act"]).of("down_proj"),
    LayerSite::new("mlp_post_norm", SiteKind::Norm, &["mlp_out"]),
    LayerSite::new("out", SiteKind::Residual, &["mlp_post_norm", "attn_post_norm", INPUT]),
];

/// Gemma 3's `config.json` (`Gemma3TextConfig`'s keys and defaults).
fn hf_config(hf: &HfConfig, path: &Path) -> Result<Config> {
    let unsupported = |message: String| Err(EngineError::Unsupported { path: path.to_path_buf(), message });
    if hf.attention_bias || hf.mlp_bias {
        return unsupported("attention_bias/mlp_bias = true is not supported".into());
    }
    let act = hf.key::<String>("hidden_activation", path)?.or_else(|| hf.hidden_act.clone()).unwrap_or_else(|| "gelu_pytorch_tanh".into());
    if act != "gelu_pytorch_tanh" {
        return unsupported(format!("hidden_activation `{act}` is not supported for gemma3 (only gelu_pytorch_tanh)"));
    }
    if let Some(cap) = hf.key::<f64>("attn_logit_softcapping", path)? {
        return unsupported(format!("attn_logit_softcapping = {cap} (Gemma 2's) is not run by the gemma3 family"));
    }
    if hf.key::<bool>("use_bidirectional_attention", path)? == Some(true) {
        return unsupported("use_bidirectional_attention = true (an embedding model) is not a causal decoder".into());
    }
    let (global, local) = match hf.rope(path)? {
        HfRope::Uniform(r) => {
            let theta = hf.key::<f64>("rope_local_base_freq", path)?.unwrap_or(LOCAL_ROPE_BASE);
            (r, RopeParams { theta, scaling: RopeScaling::Default })
        }
        HfRope::PerLayerType(types) => {
            let find = |t: &str| types.iter().find(|(n, _)| n == t).map(|(_, r)| r.clone());
            match (find("full_attention"), find("sliding_attention"), types.len()) {
                (Some(g), Some(l), 2) => (g, l),
                _ => {
                    let names: Vec<&str> = types.iter().map(|(t, _)| t.as_str()).collect();
                    return unsupported(format!(
                        "rope_parameters per layer type ({}): gemma3 needs exactly full_attention and sliding_attention",
                        names.join(", ")
                    ));
                }
            }
        }
    };
    let mut cfg = hf.shape(path, false, 0, 0)?;
    cfg.tie_word_embeddings = hf.tie_word_embeddings.unwrap_or(true);
    cfg.rope_theta = global.theta;
    cfg.rope_scaling = global.scaling;
    let qpas = hf.key::<f64>("query_pre_attn_scalar", path)?.unwrap_or(256.0);
    cfg.variant = Variant {
        embed_scale: Some((cfg.hidden_size as f64).sqrt()),
        activation: Activation::GeluTanh,
        attn_scale: Some(qpas.powf(-0.5)),
        final_logit_softcap: hf.key::<f64>("final_logit_softcapping", path)?,
        local_rope: Some(local),
    };
    Ok(cfg)
}

/// A GGUF file's metadata as llama.cpp reads `gemma3`: with `gemma3.attention.sliding_window`,
/// the layers of `gemma3.attention.sliding_window_pattern` (every sixth global by default; a count,
/// or one boolean per layer) attend over that window with `gemma3.rope.freq_base_swa` (10,000 by
/// default), unscaled; without it every layer is global. `gemma3.final_logit_softcapping` where
/// set; the attention scale of the layer count (see the module's documentation).
fn gguf_config(g: &GgufFile) -> Result<Config> {
    const KEYS: &[&str] = &["attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa", "final_logit_softcapping"];
    let mut cfg = g.config_reading(KEYS)?;
    let k = |key: &str| format!("gemma3.{key}");
    let n = cfg.num_layers;
    let window = if g.has(&k("attention.sliding_window")) { g.md_u32(&k("attention.sliding_window"))? as usize } else { 0 };
    if window > 0 {
        let pattern = k("attention.sliding_window_pattern");
        let local: Vec<bool> = match g.has(&pattern) {
            false => (0..n).map(|i| i % 6 < 5).collect(),
            true => match g.md_u32(&pattern) {
                Ok(0) => return Err(EngineError::Config { path: g.path.clone(), message: format!("{pattern} is 0") }),
                Ok(every) => (0..n).map(|i| i % (every as usize) < (every as usize) - 1).collect(),
                Err(_) => {
                    let bad = |message: String| EngineError::Config { path: g.path.clone(), message };
                    let flags = g.metadata(&pattern)?.to_vec().map_err(|_| bad(format!("{pattern} is neither a count nor a list")))?;
                    if flags.len() != n {
                        return Err(bad(format!("{pattern} lists {} layers, the model has {n}", flags.len())));
                    }
                    flags
                        .iter()
                        .map(|f| f.to_bool().or_else(|_| f.to_i32().map(|v| v != 0)).map_err(|_| bad(format!("{pattern} holds a non-boolean"))))
                        .collect::<Result<Vec<bool>>>()?
                }
            },
        };
        cfg.layer_windows = local.iter().map(|&l| l.then_some(window)).collect();
        if cfg.layer_windows.iter().all(Option::is_none) {
            cfg.layer_windows.clear();
        }
    }
    let opt = |key: &str| -> Result<Option<f64>> { if g.has(&k(key)) { g.md_f32(&k(key)).map(|v| Some(v as f64)) } else { Ok(None) } };
    let scale = match n {
        62 => (cfg.hidden_size as f64 / cfg.num_heads as f64).powf(-0.5),
        _ => (cfg.head_dim as f64).powf(-0.5),
    };
    cfg.variant = Variant {
        embed_scale: Some((cfg.hidden_size as f64).sqrt()),
        activation: Activation::GeluTanh,
        attn_scale: Some(scale),
        final_logit_softcap: opt("final_logit_softcapping")?.filter(|&c| c != 0.0),
        local_rope: Some(RopeParams { theta: opt("rope.freq_base_swa")?.unwrap_or(LOCAL_ROPE_BASE), scaling: RopeScaling::Default }),
    };
    Ok(cfg)
}

/// Loads the weights (Gemma's norms, every shape checked), sets the faults and attaches the
/// adapter. Q/K rows are half-split in both formats.
fn load(ckpt: Checkpoint<'_>, opts: &LoadOptions) -> Result<FamilyModel> {
    ckpt.require_model_type(&FAMILY)?;
    let arch = Arch { offset_gguf_norms: opts.faults.has(Fault::NormOffsetDoubled), ..ARCH };
    let (cfg, weights, _) = load_weights(ckpt, opts, &FAMILY, &arch)?;
    let layout = QkLayout::HalfSplit;
    finish(Llama::of_family(&FAMILY, cfg, weights, layout, opts.dtype), layout, opts)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use candle_core::{DType, Tensor};

    use crate::plan::Span;
    use crate::{load, LoadOptions};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/models").join(name)
    }

    /// The tiny fixture's config.json as `Gemma3TextConfig` reads it: five local layers and a
    /// global one, the local RoPE base of `rope_parameters.sliding_attention`, the scale of
    /// `query_pre_attn_scalar`, a tied head.
    #[test]
    fn the_tiny_config_reads_as_transformers_reads_it() {
        let m = load(&fixture("tiny-gemma3"), &LoadOptions::default()).unwrap();
        let info = m.model.info();
        let cfg = &info.config;
        assert_eq!(cfg.layer_windows, vec![Some(8), Some(8), Some(8), Some(8), Some(8), None]);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.variant.attn_scale, Some(24f64.powf(-0.5)));
        assert_eq!(cfg.variant.embed_scale, Some(8.0));
        let bases: Vec<f64> = info.plan.iter().map(|p| p.rope.base).collect();
        assert_eq!(bases, vec![1e4, 1e4, 1e4, 1e4, 1e4, 1e6]);
        assert_eq!(info.plan[0].span, Span::Window(8));
        assert_eq!(info.plan[5].span, Span::Global);
    }

    fn logits(path: &Path, ids: &[u32]) -> Tensor {
        let m = load(path, &LoadOptions { dtype: DType::F32, ..Default::default() }).unwrap();
        m.model.forward(ids, &mut m.model.new_cache(), None).unwrap()
    }

    /// The GGUF holds `w + 1` for every norm and no `query_pre_attn_scalar` (llama.cpp's
    /// 1/sqrt(head_dim)): read so, it computes what the Hugging Face weights compute with that
    /// scale, past the window; with the one added again (a port reading the GGUF as a Hugging
    /// Face checkpoint), it does not.
    #[test]
    fn the_gguf_norms_hold_the_offset_and_its_scale_is_llamacpps() {
        let dir = std::env::temp_dir().join(format!("lockstep-gemma3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixture("tiny-gemma3");
        for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
            let _ = std::fs::remove_file(dir.join(f));
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
        std::fs::write(dir.join("config.json"), cfg.replace("\"query_pre_attn_scalar\": 24", "\"query_pre_attn_scalar\": 16")).unwrap();
        let ids: Vec<u32> = (0..20).map(|i| 3 + (7 * i) % 500).collect();
        let hf = logits(&dir, &ids);
        let gguf = logits(&fixture("tiny-gemma3.gguf"), &ids);
        let d = (hf - &gguf).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "HF (query_pre_attn_scalar = head_dim) vs GGUF: {d}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
