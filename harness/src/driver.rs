//! The lockstep driver (DESIGN.md, "The lockstep protocol").
//!
//! Step 0 feeds the whole prompt to both sides; each later step feeds exactly one token,
//! the engine's greedy choice of the previous step (teacher forcing), to both. Each side
//! keeps its own cache. After every step each engine site is mapped to the Hugging Face
//! layout and compared with the reference's array of the same name, in forward order.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, IndexOp, Tensor};
use lockstep_engine::{Capture, ChatMessage, LoadOptions, LoadedModel, QkLayout};
use serde::Serialize;

use crate::compare::{logit_metrics, tensor_metrics, LogitMetrics, TensorMetrics};
use crate::error::HarnessError;
use crate::python::Reference;
use crate::tolerance::{
    logit_tolerance, logit_verdict, tensor_verdict, tolerance, Precision, SiteKind, Verdict, WeightsMode,
};

#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's special tokens (BOS if it adds one).
    Text(String),
    /// One user message through the chat template, with the generation prompt.
    Chat(String),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub model: PathBuf,
    pub reference: String,
    pub prompt: Prompt,
    pub steps: usize,
    pub precision: Precision,
}

/// One site of one step.
#[derive(Debug, Clone, Serialize)]
pub struct SiteRecord {
    pub site: String,
    pub layer: Option<usize>,
    pub kind: SiteKind,
    pub engine_shape: Vec<usize>,
    pub reference_shape: Vec<usize>,
    /// `None` when the shapes differ (nothing to compare element-wise).
    pub metrics: Option<TensorMetrics>,
    pub verdict: Verdict,
    /// Transform applied to the engine tensor before comparing (e.g. gguf-qk-deinterleave).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transform: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: usize,
    /// Tokens fed to both sides at this step.
    pub fed: Vec<u32>,
    pub sites: Vec<SiteRecord>,
    /// Next-token distribution at the last position fed.
    pub logits: LogitMetrics,
    pub logits_verdict: Verdict,
    /// Largest KL over all positions fed in this step (the prompt positions at step 0).
    pub kl_max_positions: f64,
    /// The engine's choice, fed at the next step.
    pub engine_token: u32,
    pub engine_token_text: String,
    pub verdict: Verdict,
    pub engine_seconds: f64,
    pub reference_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    pub step: usize,
    pub layer: Option<usize>,
    pub site: String,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likely_cause: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptCheck {
    pub mode: &'static str,
    pub text: String,
    pub engine_ids: Vec<u32>,
    pub reference_ids: Vec<u32>,
    pub ids_match: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateCheck {
    /// The engine's tokens in the lockstep run.
    pub engine_tokens: Vec<u32>,
    /// The reference's own greedy `generate` on the same prompt.
    pub reference_tokens: Vec<u32>,
    pub engine_text: String,
    pub reference_text: String,
    pub matches: bool,
    pub first_mismatch: Option<usize>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub steps: usize,
    pub steps_requested: usize,
    /// The engine chose an end-of-sequence token before `steps_requested`.
    pub stopped_at_eos: bool,
    pub sites_compared_per_step: usize,
    pub sites_not_compared: Vec<String>,
    pub mean_kl: f64,
    pub max_kl: f64,
    pub same_top1_share: f64,
    pub worst_rel_l2: Vec<WorstSite>,
    pub engine_seconds: f64,
    pub reference_seconds: f64,
}

/// Worst relative L2 error of one site kind over the run.
#[derive(Debug, Clone, Serialize)]
pub struct WorstSite {
    pub kind: SiteKind,
    pub site: String,
    pub step: usize,
    pub rel_l2: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub verdict_pass: bool,
    pub first_divergence: Option<Divergence>,
    pub prompt: PromptCheck,
    pub steps: Vec<StepRecord>,
    pub generate: GenerateCheck,
    pub summary: RunSummary,
    pub engine: EngineInfo,
    pub num_layers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineInfo {
    pub weights: &'static str,
    pub dtype: Precision,
    pub qk_layout: &'static str,
    pub transforms: Vec<&'static str>,
}

fn layer_of(site: &str) -> Option<usize> {
    site.strip_prefix("layers.")?.split('.').next()?.parse().ok()
}

fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>, HarnessError> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

pub fn load_engine(opts: &RunOptions) -> Result<LoadedModel, HarnessError> {
    let dtype = match opts.precision {
        Precision::F32 => DType::F32,
        Precision::F64 => DType::F64,
    };
    Ok(lockstep_engine::load(&opts.model, &LoadOptions { dtype })?)
}

/// Encodes the prompt on the engine side.
pub fn engine_prompt_ids(m: &LoadedModel, prompt: &Prompt) -> Result<Vec<u32>, HarnessError> {
    Ok(match prompt {
        Prompt::Text(t) => m.tokenizer.encode(t, true)?,
        Prompt::Chat(t) => m.tokenizer.encode_chat(&[ChatMessage::user(t.clone())])?,
    })
}

/// Runs the engine and the reference in lockstep.
pub fn run(opts: &RunOptions, engine: &LoadedModel, reference: &Reference) -> Result<RunResult, HarnessError> {
    let model = &engine.model;
    let cfg = &model.cfg;
    let mode = WeightsMode::SameWeights;
    let ltol = logit_tolerance(mode, opts.precision);

    // --- the prompt, on both sides ---
    let engine_ids = engine_prompt_ids(engine, &opts.prompt)?;
    let (mode_name, text, reference_ids) = match &opts.prompt {
        Prompt::Text(t) => ("prompt", t.clone(), reference.encode_prompt(t)?),
        Prompt::Chat(t) => ("chat", t.clone(), reference.encode_chat(t)?),
    };
    if engine_ids.is_empty() {
        return Err(HarnessError::Usage("the prompt encodes to no tokens".into()));
    }
    let prompt = PromptCheck { mode: mode_name, text, ids_match: engine_ids == reference_ids, engine_ids, reference_ids };

    // --- which sites both sides have ---
    let ref_sites: std::collections::HashSet<&str> = reference.description.sites.iter().map(|s| s.as_str()).collect();
    let engine_sites = model.site_names();
    let sites_not_compared: Vec<String> =
        engine_sites.iter().filter(|s| !ref_sites.contains(s.as_str())).cloned().collect();
    let ref_layers = reference.description.sites.iter().filter_map(|s| layer_of(s)).max().map(|l| l + 1).unwrap_or(0);
    if ref_layers != 0 && ref_layers != cfg.num_layers {
        return Err(HarnessError::Mismatch(format!(
            "the engine's model has {} layers, the {} reference's has {}: they did not load the same model",
            cfg.num_layers, reference.name, ref_layers
        )));
    }

    reference.reset()?;
    let stop = engine.stop_ids();
    let mut cache = model.new_cache();
    let mut steps: Vec<StepRecord> = Vec::new();
    let mut feed = prompt.engine_ids.clone();
    let mut generated: Vec<u32> = Vec::new();
    let layout = model.qk_layout;

    for step in 0..opts.steps.max(1) {
        let t0 = Instant::now();
        let mut cap = Capture::new();
        let logits = model.forward(&feed, &mut cache, Some(&mut cap))?;
        // Map the engine's captures to the HF layout now (outside the timed reference call).
        let mut engine_tensors: Vec<(String, Vec<usize>, Vec<f64>, Option<&'static str>)> = Vec::new();
        for (site, t) in &cap.entries {
            if !ref_sites.contains(site.as_str()) {
                continue;
            }
            let (t, tr) = if QkLayout::affects_site(site) && layout != QkLayout::HalfSplit {
                (layout.to_hf(t, cfg.head_dim)?, layout.transform_name())
            } else {
                (t.clone(), None)
            };
            engine_tensors.push((site.clone(), t.dims().to_vec(), to_f64_vec(&t)?, tr));
        }
        let engine_seconds = t0.elapsed().as_secs_f64();
        let n_pos = logits.dim(0)?;
        let vocab = logits.dim(1)?;
        let all_engine_logits = to_f64_vec(&logits)?;

        let t1 = Instant::now();
        let (sites, logit_m, kl_max) = reference.step(&feed, |arrays| {
            let mut sites = Vec::with_capacity(engine_tensors.len());
            for (site, eshape, edata, transform) in &engine_tensors {
                let kind = SiteKind::of(site);
                let tol = tolerance(mode, opts.precision, kind);
                let rec = arrays.with_site(site, |rshape, rdata| {
                    if rshape != eshape.as_slice() {
                        let note = shape_note(site, eshape, rshape);
                        SiteRecord {
                            site: site.clone(),
                            layer: layer_of(site),
                            kind,
                            engine_shape: eshape.clone(),
                            reference_shape: rshape.to_vec(),
                            metrics: None,
                            verdict: Verdict::Fail,
                            transform: *transform,
                            note: Some(note),
                        }
                    } else {
                        let m = tensor_metrics(edata, rdata);
                        SiteRecord {
                            site: site.clone(),
                            layer: layer_of(site),
                            kind,
                            engine_shape: eshape.clone(),
                            reference_shape: rshape.to_vec(),
                            verdict: tensor_verdict(&m, &tol),
                            metrics: Some(m),
                            transform: *transform,
                            note: None,
                        }
                    }
                })?;
                match rec {
                    Some(r) => sites.push(r),
                    None => {
                        return Err(HarnessError::Python(format!(
                            "the {} reference lists site `{site}` in describe() but step() did not return it",
                            reference.name
                        )))
                    }
                }
            }
            // Next-token distributions, every position fed.
            let lm = arrays.with_site("logits", |rshape, rdata| -> Result<(LogitMetrics, f64), HarnessError> {
                if rshape != [n_pos, vocab] {
                    return Err(HarnessError::Mismatch(format!(
                        "logits: engine shape [{n_pos}, {vocab}], {} reference {:?}: vocabularies or positions differ",
                        reference.name, rshape
                    )));
                }
                let mut kl_max = 0.0f64;
                let mut last = None;
                for p in 0..n_pos {
                    let e = &all_engine_logits[p * vocab..(p + 1) * vocab];
                    let r = &rdata[p * vocab..(p + 1) * vocab];
                    let m = logit_metrics(e, r);
                    kl_max = kl_max.max(m.kl);
                    if p == n_pos - 1 {
                        last = Some(m);
                    }
                }
                Ok((last.expect("n_pos >= 1"), kl_max))
            })?;
            let (lm, kl_max) = match lm {
                Some(r) => r?,
                None => {
                    return Err(HarnessError::Python(format!("the {} reference returned no `logits`", reference.name)))
                }
            };
            Ok((sites, lm, kl_max))
        })?;
        let reference_seconds = t1.elapsed().as_secs_f64();
        debug_assert_eq!(logit_m.engine_top1, lockstep_engine::generate::argmax(&logits.i(n_pos - 1)?)?);

        let logits_verdict = logit_verdict(&logit_m, &ltol);
        let verdict = sites.iter().map(|s| s.verdict).chain([logits_verdict]).max().unwrap_or(Verdict::Pass);
        let token = logit_m.engine_top1;
        let token_text = engine.tokenizer.decode(&[token], false).unwrap_or_default();
        steps.push(StepRecord {
            step,
            fed: feed.clone(),
            sites,
            logits: logit_m,
            logits_verdict,
            kl_max_positions: kl_max,
            engine_token: token,
            engine_token_text: token_text,
            verdict,
            engine_seconds,
            reference_seconds,
        });
        generated.push(token);
        if stop.contains(&token) {
            break;
        }
        feed = vec![token];
    }

    // --- the reference's own greedy loop, on the engine's prompt ---
    let reference_tokens = reference.generate_greedy(&prompt.engine_ids, opts.steps.max(1), &stop)?;
    let first_mismatch = generated
        .iter()
        .zip(&reference_tokens)
        .position(|(a, b)| a != b)
        .or_else(|| (generated.len() != reference_tokens.len()).then(|| generated.len().min(reference_tokens.len())));
    let gen_verdict = match first_mismatch {
        None => Verdict::Pass,
        // A flip at a near tie that the lockstep run already reported as drift.
        Some(i) if steps.get(i).is_some_and(|s| !s.logits.top1_agree && s.logits_verdict == Verdict::Drift) => {
            Verdict::Drift
        }
        Some(_) => Verdict::Fail,
    };
    let generate = GenerateCheck {
        engine_text: engine.tokenizer.decode(&generated, true).unwrap_or_default(),
        reference_text: engine.tokenizer.decode(&reference_tokens, true).unwrap_or_default(),
        matches: first_mismatch.is_none(),
        engine_tokens: generated,
        reference_tokens,
        first_mismatch,
        verdict: gen_verdict,
    };

    let first_divergence = find_first_divergence(&prompt, &steps, &generate, cfg.num_layers);
    let mut summary = summarize(&steps, sites_not_compared);
    summary.steps_requested = opts.steps.max(1);
    summary.stopped_at_eos = steps.last().is_some_and(|s| stop.contains(&s.engine_token));
    Ok(RunResult {
        verdict_pass: first_divergence.is_none(),
        first_divergence,
        prompt,
        steps,
        generate,
        summary,
        engine: EngineInfo {
            weights: engine.origin.name(),
            dtype: opts.precision,
            qk_layout: match layout {
                QkLayout::HalfSplit => "half-split",
                QkLayout::Interleaved => "interleaved",
            },
            transforms: layout.transform_name().into_iter().collect(),
        },
        num_layers: cfg.num_layers,
    })
}

fn shape_note(site: &str, e: &[usize], r: &[usize]) -> String {
    if SiteKind::of(site) == SiteKind::Cache && e.len() == 3 && r.len() == 3 && e[0] == r[0] && e[2] == r[2] {
        let pl = |n: usize| if n == 1 { "1 position".to_string() } else { format!("{n} positions") };
        return format!("the engine's cache holds {}, the reference's holds {}", pl(e[1]), pl(r[1]));
    }
    format!("shape {e:?} in the engine, {r:?} in the reference")
}

fn find_first_divergence(
    prompt: &PromptCheck,
    steps: &[StepRecord],
    generate: &GenerateCheck,
    _num_layers: usize,
) -> Option<Divergence> {
    if !prompt.ids_match {
        let at = prompt.engine_ids.iter().zip(&prompt.reference_ids).position(|(a, b)| a != b);
        return Some(Divergence {
            step: 0,
            layer: None,
            site: "tokens".into(),
            detail: format!(
                "prompt token ids differ{}: engine {} tokens, reference {} tokens",
                at.map(|i| format!(" from position {i}")).unwrap_or_default(),
                prompt.engine_ids.len(),
                prompt.reference_ids.len()
            ),
            likely_cause: Some(
                "tokenizer, chat template or BOS handling differs between the engine and the reference".into(),
            ),
        });
    }
    for s in steps {
        if let Some(site) = s.sites.iter().find(|x| x.verdict == Verdict::Fail) {
            let detail = match (&site.note, &site.metrics) {
                (Some(n), _) => n.clone(),
                (None, Some(m)) if m.nonfinite_engine || m.nonfinite_reference => format!(
                    "NaN/Inf in the {}",
                    if m.nonfinite_engine { "engine" } else { "reference" }
                ),
                (None, Some(m)) => format!(
                    "rel-L2 {:.3e}, max |Δ| {:.3e} at flat index {}, cosine {:.6}",
                    m.rel_l2, m.max_abs, m.max_abs_index, m.cosine
                ),
                _ => "differs".into(),
            };
            return Some(Divergence {
                step: s.step,
                layer: site.layer,
                site: site.site.clone(),
                likely_cause: likely_cause(s, site),
                detail,
            });
        }
        if s.logits_verdict == Verdict::Fail {
            return Some(Divergence {
                step: s.step,
                layer: None,
                site: "logits".into(),
                detail: format!(
                    "KL {:.3e}; top-1 engine {} vs reference {} (margins {:.3} / {:.3})",
                    s.logits.kl, s.logits.engine_top1, s.logits.reference_top1, s.logits.engine_margin,
                    s.logits.reference_margin
                ),
                likely_cause: None,
            });
        }
    }
    if generate.verdict == Verdict::Fail {
        let i = generate.first_mismatch.unwrap_or(0);
        return Some(Divergence {
            step: i,
            layer: None,
            site: "generate".into(),
            detail: format!(
                "the reference's own greedy generate differs from the lockstep tokens at token {i}: engine {:?}, reference {:?}",
                generate.engine_tokens.get(i),
                generate.reference_tokens.get(i)
            ),
            likely_cause: Some(
                "the lockstep steps agree but the reference's generate loop does not: its generation settings \
                 (stop ids, sampling defaults) differ"
                    .into(),
            ),
        });
    }
    None
}

/// A first guess at the bug class from where the first failure is.
fn likely_cause(step: &StepRecord, site: &SiteRecord) -> Option<String> {
    let leaf = site.site.rsplit('.').next().unwrap_or(&site.site);
    if site.kind == SiteKind::Cache && site.metrics.is_none() && site.engine_shape.len() == 3 {
        let (e, r) = (site.engine_shape[1], site.reference_shape.get(1).copied().unwrap_or(0));
        if e < r && step.step > 0 {
            return Some("context is dropped after the prompt: the engine's KV cache does not keep earlier steps".into());
        }
        if e > r {
            return Some("history is fed again on top of the cache (re-feeding instead of caching)".into());
        }
    }
    let same_layer = |name: &str| {
        step.sites.iter().find(|x| x.layer == site.layer && x.site.ends_with(&format!(".{name}"))).map(|x| x.verdict)
    };
    match leaf {
        "q_rope" | "k_rope" if same_layer("q") == Some(Verdict::Pass) && same_layer("k") == Some(Verdict::Pass) => {
            Some("RoPE differs while q/k before RoPE agree: rotary convention, theta or positions".into())
        }
        "q" | "k" if same_layer("v") == Some(Verdict::Pass) => {
            Some("q/k projections differ while v agrees: Q/K weight layout (GGUF permutation) or an adapter on q/k".into())
        }
        "embed" => Some("token embeddings differ: different tokens or embedding weights/scale".into()),
        _ => None,
    }
}

fn summarize(steps: &[StepRecord], sites_not_compared: Vec<String>) -> RunSummary {
    let n = steps.len().max(1) as f64;
    let mean_kl = steps.iter().map(|s| s.logits.kl).sum::<f64>() / n;
    let max_kl = steps.iter().map(|s| s.kl_max_positions).fold(0.0, f64::max);
    let same = steps.iter().filter(|s| s.logits.top1_agree).count() as f64 / n;
    let mut worst: Vec<WorstSite> = Vec::new();
    for kind in [SiteKind::Activation, SiteKind::Cache, SiteKind::Logits] {
        let mut best: Option<WorstSite> = None;
        for s in steps {
            for x in s.sites.iter().filter(|x| x.kind == kind) {
                let r = x.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
                if best.as_ref().is_none_or(|b| r > b.rel_l2) {
                    best = Some(WorstSite { kind, site: x.site.clone(), step: s.step, rel_l2: r });
                }
            }
        }
        worst.extend(best);
    }
    RunSummary {
        steps: steps.len(),
        steps_requested: steps.len(),
        stopped_at_eos: false,
        sites_compared_per_step: steps.first().map(|s| s.sites.len()).unwrap_or(0),
        sites_not_compared,
        mean_kl,
        max_kl,
        same_top1_share: same,
        worst_rel_l2: worst,
        engine_seconds: steps.iter().map(|s| s.engine_seconds).sum(),
        reference_seconds: steps.iter().map(|s| s.reference_seconds).sum(),
    }
}
