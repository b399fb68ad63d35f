//! RoPE scaling: how a layer's rotary frequencies are derived from the base, for every type the
//! released checkpoints use, read from Hugging Face configs (`rope_scaling`, transformers 5's
//! `rope_parameters`) and GGUF metadata, and computed as transformers computes them
//! (`transformers/modeling_rope_utils.py`, `ROPE_INIT_FUNCTIONS` and `dynamic_rope_update`):
//!
//! | type | frequencies `inv[i]` (default `1 / base^(2i/d)`) | attention factor |
//! |---|---|---|
//! | `default` | unchanged | 1 |
//! | `linear` | `inv / factor` | 1 |
//! | `dynamic` | with the base `base * (factor * L / max - (factor - 1))^(d/(d-2))` once the sequence length `L` (largest position + 1 of the call) passes `max_position_embeddings` | 1 |
//! | `yarn` | a ramp between `inv` (fast dims) and `inv / factor` (slow dims), over the correction range of `beta_fast`/`beta_slow` at `original_max_position_embeddings` | `attention_factor`, else `0.1 ln(factor) + 1` (or the `mscale`/`mscale_all_dim` ratio) |
//! | `llama3` | `inv / factor` for wavelengths past `orig / low_freq_factor`, `inv` under `orig / high_freq_factor`, smoothed between | 1 |
//! | `longrope` | `inv / short_factor[i]`, or `inv / long_factor[i]` once `L` passes `original_max_position_embeddings` | `attention_factor`, else `sqrt(1 + ln(factor) / ln(orig))` with `factor = max / orig` |
//! | GGUF `rope_freqs.weight` | `inv / freq_factor[i]` (llama.cpp's Llama 3 form: the per-frequency divisors, precomputed) | 1 |
//!
//! The attention factor multiplies cos and sin. A key or a type this engine does not compute is
//! refused by name, never dropped: a scaled model run unscaled stays fluent and is wrong past
//! the original context.

use std::path::Path;


use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// How a layer's RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RopeScaling {
    /// No scaling.
    #[default]
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows with the sequence length past `max_position_embeddings`.
    Dynamic { factor: f64, max_position_embeddings: usize },
    /// YaRN.
    Yarn { factor: f64, original_max_position_embeddings: usize, beta_fast: f64, beta_slow: f64, attention_factor: f64, truncate: bool },
    /// Llama 3.x.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// LongRoPE (Phi-3): per-frequency divisors, short or long by the sequence length.
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original_max_position_embeddings: usize, attention_factor: f64 },
    /// Per-frequency divisors as llama.cpp stores Llama 3's scaling (`rope_freqs.weight`).
    FreqFactors { factors: Vec<f64> },
}

impl RopeScaling {
    pub fn is_default(&self) -> bool {
        *self == RopeScaling::Default
    }

    /// The type's name as configs spell it (`llama3`), or `gguf rope_freqs` for the divisors.
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::FreqFactors { .. } => "rope_freqs",
        }
    }

    /// One line for reports: `llama3 (factor 8, original context 64)`.
    pub fn describe(&self) -> String {
        match self {
            RopeScaling::Default => "unscaled".into(),
            RopeScaling::Linear { factor } => format!("linear x{factor}"),
            RopeScaling::Dynamic { factor, max_position_embeddings } => format!("dynamic NTK x{factor} past {max_position_embeddings} positions"),
            RopeScaling::Yarn { factor, original_max_position_embeddings, attention_factor, .. } => {
                format!("yarn x{factor} (original context {original_max_position_embeddings}, attention factor {attention_factor:.4})")
            }
            RopeScaling::Llama3 { factor, original_max_position_embeddings, .. } => format!("llama3 x{factor} (original context {original_max_position_embeddings})"),
            RopeScaling::LongRope { original_max_position_embeddings, attention_factor, .. } => {
                format!("longrope (original context {original_max_position_embeddings}, attention factor {attention_factor:.4})")
            }
            RopeScaling::FreqFactors { factors } => format!("per-frequency factors ({} from rope_freqs.weight)", factors.len()),
        }
    }

    /// The context a model of this scaling serves, given its `max_position_embeddings`: dynamic
    /// NTK extends it by its factor; the other types' configs already state the extended one.
    pub fn context(&self, max_position_embeddings: usize) -> usize {
        match self {
            RopeScaling::Dynamic { factor, .. } => (max_position_embeddings as f64 * factor.max(1.0)) as usize,
            _ => max_position_embeddings,
        }
    }

    /// The factor cos and sin are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        match self {
            RopeScaling::Yarn { attention_factor, .. } | RopeScaling::LongRope { attention_factor, .. } => *attention_factor,
            _ => 1.0,
        }
    }

    /// The base for a call whose largest position is `len - 1`: dynamic NTK's grown base, else
    /// `base`.
    pub fn base_at(&self, base: f64, dims: usize, len: usize) -> f64 {
        match self {
            RopeScaling::Dynamic { factor, max_position_embeddings } if len > *max_position_embeddings => {
                let d = dims as f64;
                base * ((factor * len as f64 / *max_position_embeddings as f64) - (factor - 1.0)).powf(d / (d - 2.0))
            }
            _ => base,
        }
    }

    /// The scaled frequencies, from the unscaled ones `inv` (`dims / 2` of them, of the base
    /// [`RopeScaling::base_at`] gave) for a call whose largest position is `len - 1`.
    pub fn scale(&self, inv: &[f64], base: f64, dims: usize, len: usize) -> Vec<f64> {
        let two_pi = 2.0 * std::f64::consts::PI;
        match self {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => inv.to_vec(),
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / factor).collect(),
            RopeScaling::FreqFactors { factors } => inv.iter().zip(factors.iter()).map(|(f, d)| f / d).collect(),
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, .. } => {
                let ext = if len > *original_max_position_embeddings { long_factor } else { short_factor };
                inv.iter().zip(ext.iter()).map(|(f, e)| f / e).collect()
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let orig = *original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (orig / low_freq_factor, orig / high_freq_factor);
                inv.iter()
                    .map(|&f| {
                        let wavelen = two_pi / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, .. } => {
                let d = dims as f64;
                let orig = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| (d * (orig / (rotations * two_pi)).ln()) / (2.0 * base.ln());
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001; // transformers' guard against a zero-width ramp
                }
                inv.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (f / factor) * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect()
            }
        }
    }
}

/// The RoPE of one set of layers as a config states it: its base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// A Hugging Face config's RoPE: one for every layer, or one per layer type (transformers 5's
/// nested `rope_parameters`: `full_attention`, `sliding_attention`).
#[derive(Debug, Clone, PartialEq)]
pub enum HfRope {
    Uniform(RopeParams),
    PerLayerType(Vec<(String, RopeParams)>),
}

/// What a config holds beside its RoPE dictionary that the RoPE reads.
#[derive(Debug, Clone, Copy)]
pub struct RopeContext {
    /// Top-level `rope_theta` (older files).
    pub rope_theta: Option<f64>,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// Top-level `original_max_position_embeddings` (Phi-3's place for it), which transformers
    /// puts into the scaling of the types that read it.
    pub original_max_position_embeddings: Option<usize>,
    /// Top-level `partial_rotary_factor`.
    pub partial_rotary_factor: Option<f64>,
}

/// Reads a config's RoPE from `rope_parameters` (transformers 5, flat or nested per layer type)
/// or `rope_scaling` (older files, with a top-level `rope_theta`). `path` names the file.
pub fn from_hf(rope_parameters: Option<&Value>, rope_scaling: Option<&Value>, ctx: RopeContext, path: &Path) -> Result<HfRope> {
    let bad = |message: String| EngineError::Config { path: path.to_path_buf(), message };
    let (key, dict) = match (rope_parameters.filter(|v| !v.is_null()), rope_scaling.filter(|v| !v.is_null())) {
        (Some(p), _) => ("rope_parameters", p),
        (None, Some(s)) => ("rope_scaling", s),
        (None, None) => return Ok(HfRope::Uniform(params(&Map::new(), "rope_parameters", ctx, path)?)),
    };
    let map = dict.as_object().ok_or_else(|| bad(format!("{key} is not an object")))?;
    // Nested: every value an object (or null), keyed by layer type.
    let nested = !map.is_empty() && map.values().all(|v| v.is_object() || v.is_null()) && !map.contains_key("rope_type") && !map.contains_key("type");
    if nested {
        let mut out = vec![];
        for (layer_type, v) in map {
            let Some(m) = v.as_object() else { continue };
            out.push((layer_type.clone(), params(m, &format!("{key}.{layer_type}"), ctx, path)?));
        }
        return Ok(HfRope::PerLayerType(out));
    }
    Ok(HfRope::Uniform(params(map, key, ctx, path)?))
}

/// One RoPE dictionary (`where` names it in messages).
fn params(m: &Map<String, Value>, at: &str, ctx: RopeContext, path: &Path) -> Result<RopeParams> {
    let unsupported = |message: String| EngineError::Unsupported { path: path.to_path_buf(), message };
    let bad = |message: String| EngineError::Config { path: path.to_path_buf(), message };
    let num = |k: &str| -> Result<Option<f64>> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(format!("{at}.{k} is not a number ({v})"))),
        }
    };
    let count = |k: &str| -> Result<Option<usize>> {
        match num(k)? {
            None => Ok(None),
            Some(x) if x >= 1.0 && x.fract() == 0.0 && x < 1e12 => Ok(Some(x as usize)),
            Some(x) => Err(bad(format!("{at}.{k} = {x} is not a positive count"))),
        }
    };
    let factors = |k: &str| -> Result<Vec<f64>> {
        let v = m.get(k).and_then(|v| v.as_array()).ok_or_else(|| bad(format!("{at}.{k} must be a list of numbers")))?;
        v.iter().map(|x| x.as_f64().filter(|f| *f > 0.0 && f.is_finite())).collect::<Option<Vec<f64>>>().ok_or_else(|| bad(format!("{at}.{k} must hold positive numbers")))
    };
    let ty = match (m.get("rope_type"), m.get("type")) {
        (Some(Value::String(t)), _) | (None, Some(Value::String(t))) => t.as_str(),
        (None, None) => "default",
        (Some(v), _) | (None, Some(v)) => return Err(bad(format!("{at}.rope_type is not a string ({v})"))),
    };
    // Which keys each type reads; any other key is refused by name, never ignored.
    let keys: &[&str] = match ty {
        "default" => &[],
        "linear" | "dynamic" => &["factor"],
        "yarn" => &["factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"],
        "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
        "longrope" | "su" => &["short_factor", "long_factor", "factor", "attention_factor", "original_max_position_embeddings"],
        other => {
            return Err(unsupported(format!(
                "{at}: RoPE type `{other}` is not computed by this engine (it computes default, linear, dynamic, yarn, llama3, longrope)"
            )))
        }
    };
    for k in m.keys() {
        if !matches!(k.as_str(), "rope_type" | "type" | "rope_theta" | "partial_rotary_factor") && !keys.contains(&k.as_str()) {
            return Err(unsupported(format!("{at}.{k} is not read by the engine's `{ty}` RoPE (it reads {}): refused rather than ignored", if keys.is_empty() { "no other key".to_string() } else { keys.join(", ") })));
        }
    }
    if let Some(p) = num("partial_rotary_factor")?.or(ctx.partial_rotary_factor) {
        if p != 1.0 {
            return Err(unsupported(format!("{at}: partial_rotary_factor {p} (partial RoPE) is not run by this engine")));
        }
    }
    let theta = num("rope_theta")?.or(ctx.rope_theta).unwrap_or(10_000.0);
    let factor = |required: bool| -> Result<f64> {
        match num("factor")? {
            Some(f) if f >= 1.0 && f.is_finite() => Ok(f),
            Some(f) => Err(bad(format!("{at}.factor = {f}: a RoPE scaling factor is at least 1"))),
            None if required => Err(bad(format!("{at}: RoPE type `{ty}` needs a factor"))),
            None => Ok(1.0),
        }
    };
    // transformers puts a top-level original_max_position_embeddings into these types' params,
    // over theirs, and defaults it to max_position_embeddings.
    let orig = || -> Result<usize> { Ok(ctx.original_max_position_embeddings.or(count("original_max_position_embeddings")?).unwrap_or(ctx.max_position_embeddings)) };
    let scaling = match ty {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor(true)? },
        "dynamic" => RopeScaling::Dynamic { factor: factor(true)?, max_position_embeddings: ctx.max_position_embeddings },
        "llama3" => {
            let need = |k: &str| num(k)?.ok_or_else(|| bad(format!("{at}: RoPE type llama3 needs {k}")));
            let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
            if !(high > low && low > 0.0) {
                return Err(bad(format!("{at}: llama3 needs high_freq_factor ({high}) > low_freq_factor ({low}) > 0")));
            }
            RopeScaling::Llama3 { factor: factor(true)?, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: orig()? }
        }
        "yarn" => {
            let orig = orig()?;
            let factor = match num("factor")? {
                Some(_) => factor(true)?,
                None => ctx.max_position_embeddings as f64 / orig as f64,
            };
            let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attention_factor = match (num("attention_factor")?, num("mscale")?, num("mscale_all_dim")?) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
                _ => mscale(factor, 1.0),
            };
            let truncate = match m.get("truncate") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(bad(format!("{at}.truncate is not a boolean ({v})"))),
            };
            // transformers: `beta_fast or 32`, `beta_slow or 1`.
            let beta_fast = num("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0);
            let beta_slow = num("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0);
            RopeScaling::Yarn { factor, original_max_position_embeddings: orig, beta_fast, beta_slow, attention_factor, truncate }
        }
        _ => {
            // longrope (`su` is its older name)
            let orig = orig()?;
            let factor = num("factor")?.unwrap_or(ctx.max_position_embeddings as f64 / orig as f64);
            let attention_factor = match num("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope { short_factor: factors("short_factor")?, long_factor: factors("long_factor")?, original_max_position_embeddings: orig, attention_factor }
        }
    };
    Ok(RopeParams { theta, scaling })
}

impl RopeParams {
    /// Checks the scaling against the rotated width `dims`: per-frequency factors, one per
    /// rotated pair.
    pub fn check(&self, dims: usize, path: &Path) -> Result<()> {
        let pairs = dims / 2;
        let lists: Vec<(&str, usize)> = match &self.scaling {
            RopeScaling::LongRope { short_factor, long_factor, .. } => vec![("short_factor", short_factor.len()), ("long_factor", long_factor.len())],
            RopeScaling::FreqFactors { factors } => vec![("rope_freqs", factors.len())],
            _ => vec![],
        };
        for (name, n) in lists {
            if n != pairs {
                return Err(EngineError::Config {
                    path: path.to_path_buf(),
                    message: format!("RoPE {name} has {n} factors, the head rotates {pairs} pairs (head_dim {dims})"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> RopeContext {
        RopeContext { rope_theta: Some(10_000.0), max_position_embeddings: 256, original_max_position_embeddings: None, partial_rotary_factor: None }
    }

    fn parse(v: Value) -> Result<HfRope> {
        from_hf(None, Some(&v), ctx(), Path::new("config.json"))
    }

    #[test]
    fn every_type_parses_and_what_it_does_not_read_is_refused_by_name() {
        let HfRope::Uniform(p) = parse(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})).unwrap() else { panic!() };
        assert_eq!(p.scaling, RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64 });
        let HfRope::Uniform(p) = parse(json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})).unwrap() else { panic!() };
        assert!((p.scaling.attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        let e = parse(json!({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.low_freq_factor is not read"), "{e}");
        let e = parse(json!({"rope_type": "mrope", "mrope_section": [1, 2, 3]})).unwrap_err().to_string();
        assert!(e.contains("RoPE type `mrope` is not computed"), "{e}");
        let e = parse(json!({"rope_type": "linear"})).unwrap_err().to_string();
        assert!(e.contains("needs a factor"), "{e}");
        // transformers 5's nested form, one entry per layer type, each with its own base.
        let nested = json!({"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}});
        let HfRope::PerLayerType(v) = from_hf(Some(&nested), None, ctx(), Path::new("c")).unwrap() else { panic!() };
        assert_eq!(v[0], ("full_attention".into(), RopeParams { theta: 1e6, scaling: RopeScaling::Linear { factor: 8.0 } }));
        assert_eq!(v[1], ("sliding_attention".into(), RopeParams { theta: 1e4, scaling: RopeScaling::Default }));
    }

    #[test]
    fn the_scaled_frequencies_follow_the_published_formulas() {
        let (base, dims) = (10_000.0f64, 16usize);
        let inv: Vec<f64> = (0..dims / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / dims as f64)).collect();
        let l3 = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64 };
        let s = l3.scale(&inv, base, dims, 1);
        // High frequencies (wavelength < 16) unchanged, low ones (> 64) divided by 8.
        for (f, g) in inv.iter().zip(&s) {
            let w = 2.0 * std::f64::consts::PI / f;
            if w < 16.0 {
                assert_eq!(f, g);
            } else if w > 64.0 {
                assert!((f / 8.0 - g).abs() < 1e-18);
            } else {
                assert!(*g < *f && *g > f / 8.0);
            }
        }
        let dynamic = RopeScaling::Dynamic { factor: 4.0, max_position_embeddings: 64 };
        assert_eq!(dynamic.base_at(base, dims, 64), base);
        let grown = base * (4.0 * 128.0 / 64.0 - 3.0f64).powf(16.0 / 14.0);
        assert!((dynamic.base_at(base, dims, 128) - grown).abs() < 1e-9);
        let lr = RopeScaling::LongRope { short_factor: vec![1.0; 8], long_factor: vec![2.0; 8], original_max_position_embeddings: 64, attention_factor: 1.0 };
        assert_eq!(lr.scale(&inv, base, dims, 64), inv);
        assert_eq!(lr.scale(&inv, base, dims, 65), inv.iter().map(|f| f / 2.0).collect::<Vec<_>>());
    }
}
