//! The lockstep driver (DESIGN.md, "The lockstep protocol").
//!
//! Step 0 feeds the whole prompt to the engine and to every reference; each later step
//! feeds exactly one token, the engine's greedy choice of the previous step (teacher
//! forcing), to all of them. Each side keeps its own cache. After every step each engine
//! site is mapped to the Hugging Face layout and compared with every reference's array of
//! the same name, and every pair of references is compared with each other: that
//! disagreement is the measured noise floor the engine is judged against.

use std::collections::HashSet;
use std::time::Instant;

use candle_core::{DType, IndexOp, Tensor};
use lockstep_engine::{Decoder, Capture, LoadedModel, QkLayout};

use crate::compare::{logit_metrics_data, metrics_data};
use crate::diagnosis::{self, At};
use crate::error::HarnessError;
use crate::lockstep::options::{engine_prompt_ids, Prompt, RunOptions};
use crate::results::run::{
    Divergence, EngineInfo, GenerateCheck, KeptStep, OracleDistance, OracleSummary, PairStep, PairSummary, PromptCheck, RefStep,
    RefSummary, RunResult, RunSummary, SiteRecord, StepRecord, WorstSite,
};
use crate::compare::Data;
use crate::python::{Reference, StepOutput};
use crate::compare::tolerance::{
    logit_tolerance, logit_verdict_with_floor, quant_bounds, quant_logit_verdict, tensor_verdict_with_floor,
    tolerance, tolerance_layer, QuantBounds, SiteKind, Verdict, WeightsMode, FLOOR_MULTIPLE,
};

pub use lockstep_engine::sites::{layer_of, leaf_of};

fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>, HarnessError> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

struct EngineSite {
    site: String,
    shape: Vec<usize>,
    data: Vec<f64>,
    transform: Option<&'static str>,
}

thread_local! {
    /// Called after every step with (steps done, steps planned): `lockstep report`'s progress.
    static STEP_HOOK: std::cell::RefCell<Option<Box<dyn FnMut(usize, usize)>>> = const { std::cell::RefCell::new(None) };
}

/// Sets (or clears) this thread's step hook (see `STEP_HOOK`).
pub fn set_step_hook(hook: Option<Box<dyn FnMut(usize, usize)>>) {
    STEP_HOOK.with(|h| *h.borrow_mut() = hook);
}

/// Calls this thread's step hook, if any (for callers that report phases of their own).
pub fn call_step_hook(done: usize, planned: usize) {
    notify_step(done, planned)
}

fn notify_step(done: usize, planned: usize) {
    STEP_HOOK.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f(done, planned)
        }
    });
}

/// Runs the engine and the references in lockstep.
pub fn run(opts: &RunOptions, engine: &LoadedModel, refs: &[Reference]) -> Result<RunResult, HarnessError> {
    assert!(!refs.is_empty(), "run() needs at least one reference");
    let model = &engine.model;
    let cfg = &model.info().config;
    // Which arithmetic each pair shares decides the tolerances (tolerance.rs).
    let engine_quantized = model.info().quantized_kernels;
    let modes: Vec<WeightsMode> =
        refs.iter().map(|r| WeightsMode::of(engine_quantized, r.description.quantized_activations)).collect();
    let qbounds = quant_bounds(model.info().quant_type.clone().as_deref());
    let layer0_exact = crate::compare::tolerance::same_quant_layer0_exact(&model.info().matrix_types);
    let ltol = logit_tolerance(WeightsMode::SameWeights, opts.precision);

    // --- the prompt, on every side ---
    let engine_ids = engine_prompt_ids(engine, &opts.prompt)?;
    if engine_ids.is_empty() {
        return Err(HarnessError::Usage("the prompt encodes to no tokens".into()));
    }
    let (mode_name, text) = match &opts.prompt {
        Prompt::Text(t) => ("prompt", t.clone()),
        Prompt::Chat(t) => ("chat", t.clone()),
    };
    let mut reference_ids = vec![];
    for r in refs {
        let ids = match &opts.prompt {
            Prompt::Text(t) => r.encode_prompt(t)?,
            Prompt::Chat(t) => r.encode_chat(t)?,
        };
        reference_ids.push((r.name.clone(), ids));
    }
    let ids_match = reference_ids.iter().all(|(_, ids)| *ids == engine_ids);
    let mut kept: Option<KeptStep> = None;
    let (engine_rendered, rendered_diff) = crate::checks::sampler::rendered_prompts(engine, refs, &opts.prompt)?;
    let piece = |ids: &[u32]| ids.iter().map(|&i| engine.tokenizer.id_to_token(i).unwrap_or_else(|| "?".into())).collect();
    let pieces = if ids_match {
        vec![]
    } else {
        std::iter::once(("engine".to_string(), piece(&engine_ids)))
            .chain(reference_ids.iter().map(|(n, ids)| (n.clone(), piece(ids))))
            .collect()
    };
    let prompt =
        PromptCheck { mode: mode_name, text, engine_ids, reference_ids, ids_match, engine_rendered, rendered_diff, pieces };

    // --- the generation config of every side; stop before step 0 on a prompt mismatch ---
    let sampler_cfg = opts.sampler.clone().unwrap_or_default();
    let config = crate::checks::genconfig::collect(engine, refs, matches!(opts.prompt, Prompt::Chat(_)), opts.steps.max(1), &sampler_cfg)?;
    let stop_reason = if !prompt.ids_match {
        Some("the prompt's token ids differ between the engine and a reference".to_string())
    } else if opts.strict_config && !config.differences().is_empty() {
        Some(format!(
            "--strict-config: the generation config differs ({})",
            config.differences().iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
        ))
    } else {
        None
    };
    if let Some(reason) = stop_reason {
        return Ok(stopped_before_step0(opts, engine, prompt, config, reason));
    }
    // The engine's sampler; the sampler-temperature fault lives in its configuration only
    // (each reference's sampler gets the parameters as given).
    let engine_sampler_cfg = opts.sampler.clone().map(|mut c| {
        c.invert_temperature = opts.faults.has(lockstep_engine::faults::Fault::SamplerTemperature);
        c
    });
    let mut sampler = engine_sampler_cfg.clone().map(lockstep_engine::Sampler::new);
    let (ref_samplers, no_sampler) = match &engine_sampler_cfg {
        Some(c) => crate::checks::sampler::setup(refs, c, &config.declared)?,
        None => (vec![], vec![]),
    };

    // --- which sites each reference has ---
    let graph = model.site_graph();
    let engine_sites = graph.names();
    let ref_sites: Vec<HashSet<String>> = refs.iter().map(|r| r.description.sites.iter().cloned().collect()).collect();
    for (r, sites) in refs.iter().zip(&ref_sites) {
        let ref_layers = sites.iter().filter_map(|s| layer_of(s)).max().map(|l| l + 1).unwrap_or(0);
        if ref_layers != 0 && ref_layers != cfg.num_layers {
            return Err(HarnessError::Mismatch(format!(
                "the engine's model has {} layers, the {} reference's has {}: they did not load the same model",
                cfg.num_layers, r.name, ref_layers
            )));
        }
        if !sites.contains("logits") {
            return Err(HarnessError::Python(format!("the {} reference does not provide `logits`", r.name)));
        }
    }
    let wanted: HashSet<&str> = ref_sites.iter().flat_map(|s| s.iter().map(|x| x.as_str())).collect();
    let oracle_idx: Option<usize> = refs.iter().position(|r| r.spec.is_oracle());

    for r in refs {
        r.reset()?;
    }
    let stop = engine.stop_ids();
    let mut cache = model.new_cache();
    let mut steps: Vec<StepRecord> = Vec::new();
    let mut feed = prompt.engine_ids.clone();
    let mut generated: Vec<u32> = Vec::new();
    let layout = model.info().qk_layout;

    // Bisect stops at a token mismatch: nothing after it is comparable.
    let n_steps = if opts.bisect && !ids_match { 0 } else { opts.steps.max(1) };
    for step in 0..n_steps {
        // --- engine ---
        let t0 = Instant::now();
        let mut cap = Capture::new();
        let logits = model.forward(&feed, &mut cache, Some(&mut cap))?;
        let mut esites: Vec<EngineSite> = Vec::new();
        for (site, t) in &cap.entries {
            if !wanted.contains(site.as_str()) {
                continue;
            }
            let s = graph.get(site).ok_or_else(|| HarnessError::Mismatch(format!("the engine captured `{site}`, which is not in its site graph")))?;
            let (t, transform) = model.to_canonical(s, t)?;
            esites.push(EngineSite { site: site.clone(), shape: t.dims().to_vec(), data: to_f64_vec(&t)?, transform });
        }
        let engine_seconds = t0.elapsed().as_secs_f64();
        let n_pos = logits.dim(0)?;
        let vocab = logits.dim(1)?;
        // Converted once with the other sites (every reference provides logits, checked above).
        let engine_logits: &[f64] = &esites
            .iter()
            .find(|e| e.site == "logits")
            .ok_or_else(|| HarnessError::Mismatch("the engine captured no logits".into()))?
            .data;
        // The engine's choice: greedy, or its sampler; with a sampler, every reference's own
        // sampling code runs on the same logits (sampler parity).
        let (engine_token, sampler_checks) = match sampler.as_mut() {
            None => (lockstep_engine::generate::argmax(&logits.i(n_pos - 1)?)?, vec![]),
            Some(smp) => {
                let last: Vec<f32> = logits.i(n_pos - 1)?.to_dtype(DType::F32)?.to_vec1()?;
                let mut seq = prompt.engine_ids.clone();
                seq.extend(&generated);
                let (tok, _) = smp.next(&last, &seq)?;
                (tok, crate::checks::sampler::check_step(refs, &ref_samplers, &last, &seq)?)
            }
        };

        // --- references ---
        let mut outputs: Vec<(StepOutput, f64)> = Vec::with_capacity(refs.len());
        for r in refs {
            let t1 = Instant::now();
            let out = r.step(&feed)?;
            outputs.push((out, t1.elapsed().as_secs_f64()));
        }

        let (ref_steps, pairs, kept_now) = StepOutput::with_views(outputs.iter().map(|(o, _)| o), |views| -> Result<(Vec<RefStep>, Vec<PairStep>, Option<KeptStep>), HarnessError> {
            // Every declared site must be there, with logits of the right shape.
            for (i, v) in views.iter().enumerate() {
                for s in &ref_sites[i] {
                    if !v.has(s)? {
                        return Err(HarnessError::Python(format!(
                            "the {} reference lists site `{s}` in describe() but step() did not return it",
                            refs[i].name
                        )));
                    }
                }
                let shape = v.with_site("logits", |sh, _| sh.to_vec())?.unwrap_or_default();
                if shape != [n_pos, vocab] {
                    return Err(HarnessError::Mismatch(format!(
                        "logits: engine shape [{n_pos}, {vocab}], {} reference {shape:?}: vocabularies or positions differ",
                        refs[i].name
                    )));
                }
            }

            // Reference vs reference (the noise floor).
            let mut pairs = vec![];
            for a in 0..refs.len() {
                for b in a + 1..refs.len() {
                    let mut sites = vec![];
                    for es in &esites {
                        if !(ref_sites[a].contains(&es.site) && ref_sites[b].contains(&es.site)) {
                            continue;
                        }
                        let m = views[a].with_site(&es.site, |sa, da| {
                            views[b].with_site(&es.site, |sb, db| (sa == sb).then(|| metrics_data(da, db)))
                        })?;
                        if let Some(inner) = m {
                            if let Some(Some(m)) = inner? {
                                sites.push((es.site.clone(), m));
                            }
                        }
                    }
                    let lm = views[a]
                        .with_site("logits", |_, da| {
                            views[b].with_site("logits", |_, db| {
                                let last = (n_pos - 1) * vocab..n_pos * vocab;
                                logit_metrics_data(da.slice(last.clone()), db.slice(last))
                            })
                        })?
                        .transpose()?
                        .flatten()
                        .expect("logits checked above");
                    pairs.push(PairStep { a: refs[a].name.clone(), b: refs[b].name.clone(), sites, logits: lm });
                }
            }
            let pair_of = |i: usize, j: usize| {
                let (a, b) = (i.min(j), i.max(j));
                let idx = a * (2 * refs.len() - a - 1) / 2 + (b - a - 1);
                &pairs[idx]
            };

            // Engine vs each reference.
            let mut ref_steps = vec![];
            for (i, r) in refs.iter().enumerate() {
                let others: Vec<usize> = (0..refs.len()).filter(|&j| j != i).collect();
                let mut sites = Vec::new();
                for es in esites.iter().filter(|es| ref_sites[i].contains(&es.site)) {
                    let kind = SiteKind::of(&es.site);
                    let tol = tolerance(modes[i], opts.precision, kind, tolerance_layer(modes[i], layer_of(&es.site), layer0_exact));
                    let floor = others
                        .iter()
                        .filter_map(|&j| pair_of(i, j).sites.iter().find(|(s, _)| *s == es.site).map(|(_, m)| m.rel_l2))
                        .fold(None, |acc: Option<f64>, x| Some(acc.map_or(x, |a| a.min(x))));
                    let oracle = match oracle_idx {
                        Some(o) if o != i && ref_sites[o].contains(&es.site) => {
                            let to_engine = views[o].with_site(&es.site, |so, dor| {
                                (so == es.shape.as_slice()).then(|| metrics_data(Data::F64(&es.data), dor).rel_l2)
                            })?;
                            let to_ref = pair_of(i, o).sites.iter().find(|(s, _)| *s == es.site).map(|(_, m)| m.rel_l2);
                            match (to_engine.flatten(), to_ref) {
                                (Some(e), Some(rr)) => Some(OracleDistance { engine_rel_l2: e, reference_rel_l2: rr }),
                                _ => None,
                            }
                        }
                        _ => None,
                    };
                    let rec = views[i].with_site(&es.site, |rshape, rdata| {
                        let base = SiteRecord {
                            site: es.site.clone(),
                            layer: layer_of(&es.site),
                            kind,
                            engine_shape: es.shape.clone(),
                            reference_shape: rshape.to_vec(),
                            metrics: None,
                            verdict: Verdict::Fail,
                            floor,
                            oracle,
                            transform: es.transform,
                            note: None,
                        };
                        if rshape != es.shape.as_slice() {
                            SiteRecord { note: Some(shape_note(&es.site, &es.shape, rshape)), ..base }
                        } else {
                            let m = metrics_data(Data::F64(&es.data), rdata);
                            SiteRecord { verdict: tensor_verdict_with_floor(&m, &tol, floor), metrics: Some(m), ..base }
                        }
                    })?;
                    sites.push(rec.expect("declared sites checked above"));
                }
                let (lm, kl_max) = views[i]
                    .with_site("logits", |_, rdata| {
                        let mut kl_max = 0.0f64;
                        let mut last = None;
                        for p in 0..n_pos {
                            let m = logit_metrics_data(
                                Data::F64(&engine_logits[p * vocab..(p + 1) * vocab]),
                                rdata.slice(p * vocab..(p + 1) * vocab),
                            );
                            kl_max = kl_max.max(m.kl);
                            if p == n_pos - 1 {
                                last = Some(m);
                            }
                        }
                        (last.expect("n_pos >= 1"), kl_max)
                    })?
                    .expect("logits checked above");
                let kl_floor = others.iter().map(|&j| pair_of(i, j).logits.kl).fold(None, |acc: Option<f64>, x| {
                    Some(acc.map_or(x, |a| a.min(x)))
                });
                let refs_flip = others.iter().any(|&j| !pair_of(i, j).logits.top1_agree);
                let logits_verdict = match modes[i] {
                    WeightsMode::SameWeights => logit_verdict_with_floor(&lm, &ltol, kl_floor, refs_flip),
                    _ => match quant_logit_verdict(&lm, &qbounds) {
                        // As far from this reference as another reference is: drift.
                        Verdict::Fail
                            if kl_floor.is_some_and(|f| lm.kl <= FLOOR_MULTIPLE * f)
                                && lm.delta_p.abs() <= qbounds.fail_delta_p =>
                        {
                            Verdict::Drift
                        }
                        v => v,
                    },
                };
                let verdict = sites.iter().map(|s| s.verdict).chain([logits_verdict]).max().unwrap_or(Verdict::Pass);
                ref_steps.push(RefStep {
                    reference: r.name.clone(),
                    sites,
                    logits: lm,
                    logits_verdict,
                    kl_max_positions: kl_max,
                    verdict,
                    seconds: outputs[i].1,
                });
            }
            // Bisect: keep the suspect layer's reference tensors of the first failing step.
            let mut kept_now = None;
            if opts.bisect {
                if let Some((ri, si)) = crate::lockstep::judge::localize(&ref_steps) {
                    let mut k = KeptStep { reference: ri, step, site_index: si, ..Default::default() };
                    if let Some(l) = ref_steps[ri].sites[si].layer {
                        let input = lockstep_engine::sites::layer_input(l);
                        let prefix = format!("layers.{l}.");
                        for name in ref_sites[ri].iter().filter(|n| **n == input || n.starts_with(&prefix)) {
                            if let Some(Some(a)) = views[ri].with_site(name, |sh, d| d.to_f32_vec().map(|v| (sh.to_vec(), v)))? {
                                k.arrays.insert(name.clone(), a);
                            }
                        }
                    }
                    kept_now = Some(k);
                }
            }
            Ok((ref_steps, pairs, kept_now))
        })?;
        drop(outputs);

        let verdict = ref_steps.iter().map(|r| r.verdict).chain(sampler_checks.iter().map(|c| c.verdict)).max().unwrap_or(Verdict::Pass);
        steps.push(StepRecord {
            step,
            fed: feed.clone(),
            engine_token,
            engine_token_text: engine.tokenizer.decode(&[engine_token], false).unwrap_or_default(),
            verdict,
            engine_seconds,
            references: ref_steps,
            pairs,
            sampler: sampler_checks,
        });
        generated.push(engine_token);
        notify_step(step + 1, n_steps);
        // Bisect: a failing sampler step is the divergence (the forward pass passed).
        let sampler_failed = sampler_checks_failed(&steps);
        if kept_now.is_some() || (opts.bisect && sampler_failed) {
            kept = kept_now;
            break;
        }
        if stop.contains(&engine_token) {
            break;
        }
        feed = vec![engine_token];
    }

    // --- each reference's own greedy loop, on the engine's prompt ---
    let mut generate = vec![];
    // A sampled run cannot be compared token by token with a reference's own loop (another
    // generator); its sampler was compared step by step instead.
    let plain_greedy = opts.sampler.as_ref().is_none_or(|c| c.greedy() && c.rep_penalty == 1.0);
    for (i, r) in refs.iter().enumerate().filter(|_| plain_greedy && !opts.bisect) {
        let toks = r.generate_greedy(&prompt.engine_ids, opts.steps.max(1), &stop)?;
        let first_mismatch = generated
            .iter()
            .zip(&toks)
            .position(|(a, b)| a != b)
            .or_else(|| (generated.len() != toks.len()).then(|| generated.len().min(toks.len())));
        // Teacher forcing keeps the lockstep run on the engine's tokens. If the lockstep run
        // already judged a top-1 flip at or before the first mismatch as drift (a near tie,
        // or within the noise floor), the free-running texts may part there: drift too.
        let verdict = match first_mismatch {
            None => Verdict::Pass,
            Some(k)
                if steps.iter().take(k + 1).any(|s| {
                    let rs = &s.references[i];
                    !rs.logits.top1_agree && rs.logits_verdict == Verdict::Drift
                }) =>
            {
                Verdict::Drift
            }
            Some(_) => Verdict::Fail,
        };
        generate.push(GenerateCheck {
            reference: r.name.clone(),
            reference_text: engine.tokenizer.decode(&toks, true).unwrap_or_default(),
            matches: first_mismatch.is_none(),
            reference_tokens: toks,
            first_mismatch,
            verdict,
        });
    }

    let engine_text = engine.tokenizer.decode(&generated, true).unwrap_or_default();
    let mut summary = summarize(opts, refs, &ref_sites, &engine_sites, &steps, &stop, oracle_idx);
    let run_level = quant_run_checks(&mut summary, &modes, &qbounds, steps.len());
    let mut first_divergence = find_first_divergence(&prompt, &steps, &generate, &generated, model.as_ref()).or(run_level);
    // An adapter problem (inventories differ, tensors attached to nothing, no effect) is the
    // root cause of whatever else diverged: it is reported first.
    let lora = match (&engine.lora, opts.bisect) {
        (Some(_), false) => Some(crate::checks::lora::check(opts, engine, refs, &steps)?),
        _ => None,
    };
    if let Some(d) = lora.as_ref().and_then(crate::checks::lora::divergence) {
        first_divergence = Some(d);
    }
    let sampler_info = opts.sampler.as_ref().map(|c| crate::checks::sampler::info(c, refs, &ref_samplers, &no_sampler, &steps));
    Ok(RunResult {
        kept,
        verdict_pass: first_divergence.is_none(),
        first_divergence,
        prompt,
        steps,
        engine_tokens: generated,
        engine_text,
        generate,
        summary,
        engine: EngineInfo {
            weights: engine.origin.name(),
            weights_mode: engine.weights.name(),
            matrix_types: engine.model.info().matrix_types.clone(),
            faults: engine.model.info().faults.clone(),
            dtype: opts.precision,
            qk_layout: match layout {
                QkLayout::HalfSplit => "half-split",
                QkLayout::Interleaved => "interleaved",
            },
            transforms: layout.transform_name().into_iter().collect(),
        },
        num_layers: cfg.num_layers,
        sampler: sampler_info,
        config,
        stopped_before_step0: None,
        lora,
    })
}

fn sampler_checks_failed(steps: &[StepRecord]) -> bool {
    steps.last().is_some_and(|s| s.sampler.iter().any(|c| c.verdict == Verdict::Fail))
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
    generate: &[GenerateCheck],
    generated: &[u32],
    engine: &dyn Decoder,
) -> Option<Divergence> {
    if let Some((name, ids)) = prompt.reference_ids.iter().find(|(_, ids)| *ids != prompt.engine_ids) {
        let at = prompt.engine_ids.iter().zip(ids).position(|(a, b)| a != b);
        return Some(Divergence {
            step: 0,
            layer: None,
            site: "tokens".into(),
            reference: name.clone(),
            detail: format!(
                "prompt token ids differ{}: engine {} tokens, {name} {} tokens",
                at.map(|i| format!(" from position {i}")).unwrap_or_default(),
                prompt.engine_ids.len(),
                ids.len()
            ),
            likely_cause: Some(
                "tokenizer, chat template or BOS handling differs between the engine and the reference".into(),
            ),
        });
    }
    let mut total = 0;
    for s in steps {
        total += s.fed.len();
        // Forward order across references: the earliest failing site wins.
        let mut best: Option<(usize, &RefStep, &SiteRecord)> = None;
        for rs in &s.references {
            if let Some((pos, site)) = rs.sites.iter().enumerate().find(|(_, x)| x.verdict == Verdict::Fail) {
                if best.is_none_or(|(p, _, _)| pos < p) {
                    best = Some((pos, rs, site));
                }
            }
        }
        if let Some((_, rs, site)) = best {
            let detail = match (&site.note, &site.metrics) {
                (Some(n), _) => n.clone(),
                (None, Some(m)) if m.nonfinite_engine || m.nonfinite_reference => {
                    format!("NaN/Inf in the {}", if m.nonfinite_engine { "engine" } else { "reference" })
                }
                (None, Some(m)) if m.estimated => format!(
                    "rel-L2 ~{:.1e}, cosine ~{:.6} (estimated: the trace keeps this site as a sketch){}",
                    m.rel_l2,
                    m.cosine,
                    site.floor.map(|f| format!(" (noise floor {f:.1e})")).unwrap_or_default()
                ),
                (None, Some(m)) => format!(
                    "rel-L2 {:.3e}, max |Δ| {:.3e} at flat index {}, cosine {:.6}{}",
                    m.rel_l2,
                    m.max_abs,
                    m.max_abs_index,
                    m.cosine,
                    site.floor.map(|f| format!(" (noise floor {f:.1e})")).unwrap_or_default()
                ),
                _ => "differs".into(),
            };
            return Some(Divergence {
                step: s.step,
                layer: site.layer,
                site: site.site.clone(),
                reference: rs.reference.clone(),
                likely_cause: diagnosis::likely_cause(&At {
                    step: s.step,
                    rs,
                    site,
                    fed: s.fed.len(),
                    total,
                    graph: engine.site_graph(),
                    cache: engine.info().cache,
                }),
                detail,
            });
        }
        if let Some(rs) = s.references.iter().find(|r| r.logits_verdict == Verdict::Fail) {
            return Some(Divergence {
                step: s.step,
                layer: None,
                site: "logits".into(),
                reference: rs.reference.clone(),
                detail: format!(
                    "KL {:.3e}; top-1 engine {} vs reference {} (margins {:.3} / {:.3})",
                    rs.logits.kl,
                    rs.logits.engine_top1,
                    rs.logits.reference_top1,
                    rs.logits.engine_margin,
                    rs.logits.reference_margin
                ),
                likely_cause: None,
            });
        }
        if let Some(c) = s.sampler.iter().find(|c| c.verdict == Verdict::Fail) {
            return Some(Divergence {
                step: s.step,
                layer: None,
                site: "sampler".into(),
                reference: c.reference.clone(),
                detail: format!(
                    "TV {:.3e}, kept {} vs {} tokens ({}){}",
                    c.tv,
                    c.kept_engine,
                    c.kept_reference,
                    c.order,
                    c.note.as_ref().map(|n| format!(": {n}")).unwrap_or_default()
                ),
                likely_cause: Some(c.explained.clone().unwrap_or_else(|| {
                    "the sampler differs: a filter's threshold or order, the temperature, or the penalty".into()
                })),
            });
        }
    }
    if let Some(g) = generate.iter().find(|g| g.verdict == Verdict::Fail) {
        let i = g.first_mismatch.unwrap_or(0);
        return Some(Divergence {
            step: i,
            layer: None,
            site: "generate".into(),
            reference: g.reference.clone(),
            detail: format!(
                "the reference's own greedy generate differs from the lockstep tokens at token {i}: engine {:?}, {} {:?}",
                generated.get(i),
                g.reference,
                g.reference_tokens.get(i)
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

/// Over-the-run bounds of the quantized modes (mean KL, same-top-1 share): records the
/// mode and bounds on each reference's summary and returns a divergence when one fails.
fn quant_run_checks(summary: &mut RunSummary, modes: &[WeightsMode], b: &QuantBounds, n_steps: usize) -> Option<Divergence> {
    let mut found = None;
    for (rs, &mode) in summary.references.iter_mut().zip(modes) {
        rs.mode = mode;
        if mode == WeightsMode::SameWeights {
            continue;
        }
        rs.quant_bounds = Some(*b);
        let mut why = vec![];
        if !(rs.mean_kl <= b.fail_mean_kl) {
            why.push(format!("mean KL {:.3e} > {:.1e}", rs.mean_kl, b.fail_mean_kl));
        }
        if rs.same_top1_share < b.min_top1_share {
            why.push(format!("same top-1 at {:.1}% of steps < {:.0}%", 100.0 * rs.same_top1_share, 100.0 * b.min_top1_share));
        }
        if !why.is_empty() {
            rs.verdict = Verdict::Fail;
            found.get_or_insert(Divergence {
                step: n_steps.saturating_sub(1),
                layer: None,
                site: "logits".into(),
                reference: rs.reference.clone(),
                detail: format!("over the run, {} ({} bounds, {} mode)", why.join(", "), b.quant_type, mode.name()),
                likely_cause: Some(
                    "more than quantization noise: a dequantization or kernel error, or a quant type the bounds do not cover"
                        .into(),
                ),
            });
        }
    }
    found
}

/// A first guess at the bug class from where the first failure is.
fn worst_sites<'a>(items: impl Iterator<Item = (usize, &'a str, Option<f64>)> + Clone) -> Vec<WorstSite> {
    let mut out = vec![];
    for kind in [SiteKind::Activation, SiteKind::Cache, SiteKind::Logits] {
        let mut best: Option<WorstSite> = None;
        for (step, site, rel) in items.clone().filter(|(_, s, _)| SiteKind::of(s) == kind) {
            let r = rel.unwrap_or(f64::INFINITY);
            if best.as_ref().is_none_or(|b| r > b.rel_l2) {
                best = Some(WorstSite { kind, site: site.to_string(), step, rel_l2: r });
            }
        }
        out.extend(best);
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn summarize(
    opts: &RunOptions,
    refs: &[Reference],
    ref_sites: &[HashSet<String>],
    engine_sites: &[String],
    steps: &[StepRecord],
    stop: &[u32],
    oracle_idx: Option<usize>,
) -> RunSummary {
    let n = steps.len().max(1) as f64;
    let mut references = vec![];
    for (i, r) in refs.iter().enumerate() {
        let per = || steps.iter().map(move |s| &s.references[i]);
        references.push(RefSummary {
            reference: r.name.clone(),
            mode: WeightsMode::SameWeights,
            quant_bounds: None,
            sites_compared_per_step: steps.first().map(|s| s.references[i].sites.len()).unwrap_or(0),
            sites_not_compared: engine_sites.iter().filter(|s| !ref_sites[i].contains(*s)).cloned().collect(),
            mean_kl: per().map(|x| x.logits.kl).sum::<f64>() / n,
            max_kl: per().map(|x| x.kl_max_positions).fold(0.0, f64::max),
            same_top1_share: per().filter(|x| x.logits.top1_agree).count() as f64 / n,
            max_abs_delta_p: per().map(|x| x.logits.delta_p.abs()).fold(0.0, f64::max),
            worst_rel_l2: worst_sites(
                steps.iter().flat_map(|s| {
                    s.references[i].sites.iter().map(move |x| (s.step, x.site.as_str(), x.metrics.map(|m| m.rel_l2)))
                }),
            ),
            seconds: per().map(|x| x.seconds).sum(),
            verdict: per().map(|x| x.verdict).max().unwrap_or(Verdict::Pass),
        });
    }
    let mut pairs = vec![];
    if let Some(first) = steps.first() {
        for (p, pair) in first.pairs.iter().enumerate() {
            let per = || steps.iter().map(move |s| &s.pairs[p]);
            pairs.push(PairSummary {
                a: pair.a.clone(),
                b: pair.b.clone(),
                sites_compared_per_step: pair.sites.len(),
                mean_kl: per().map(|x| x.logits.kl).sum::<f64>() / n,
                max_kl: per().map(|x| x.logits.kl).fold(0.0, f64::max),
                same_top1_share: per().filter(|x| x.logits.top1_agree).count() as f64 / n,
                worst_rel_l2: worst_sites(
                    steps.iter().flat_map(|s| s.pairs[p].sites.iter().map(move |(st, m)| (s.step, st.as_str(), Some(m.rel_l2)))),
                ),
            });
        }
    }
    let mut oracle = vec![];
    if let Some(o) = oracle_idx {
        for (i, r) in refs.iter().enumerate().filter(|(i, _)| *i != o) {
            let (mut ec, mut rc, mut total) = (0, 0, 0);
            let mut by_leaf: std::collections::BTreeMap<String, (Vec<f64>, Vec<f64>)> = Default::default();
            let mut order: Vec<String> = vec![];
            for s in steps {
                for x in &s.references[i].sites {
                    if let Some(od) = x.oracle {
                        total += 1;
                        if od.engine_rel_l2 < od.reference_rel_l2 {
                            ec += 1;
                        } else if od.engine_rel_l2 > od.reference_rel_l2 {
                            rc += 1;
                        }
                        let leaf = leaf_of(&x.site).to_string();
                        if !order.contains(&leaf) {
                            order.push(leaf.clone());
                        }
                        let e = by_leaf.entry(leaf).or_default();
                        e.0.push(od.engine_rel_l2);
                        e.1.push(od.reference_rel_l2);
                    }
                }
            }
            let per_site = order
                .into_iter()
                .map(|leaf| {
                    let (e, rr) = by_leaf.remove(&leaf).unwrap_or_default();
                    (leaf, median(e), median(rr))
                })
                .collect();
            oracle.push(OracleSummary {
                oracle: refs[o].name.clone(),
                reference: r.name.clone(),
                engine_closer: ec,
                reference_closer: rc,
                ties: total - ec - rc,
                per_site,
            });
        }
    }
    RunSummary {
        steps: steps.len(),
        steps_requested: opts.steps.max(1),
        stopped_at_eos: steps.last().is_some_and(|s| stop.contains(&s.engine_token)),
        engine_seconds: steps.iter().map(|s| s.engine_seconds).sum(),
        references,
        pairs,
        oracle,
    }
}

/// The result of a run stopped before step 0: nothing was fed to any model.
fn stopped_before_step0(
    opts: &RunOptions,
    engine: &LoadedModel,
    prompt: PromptCheck,
    config: crate::results::checks::GenConfig,
    reason: String,
) -> RunResult {
    let first_divergence = find_first_divergence(&prompt, &[], &[], &[], engine.model.as_ref()).or_else(|| {
        let d = config.differences();
        Some(Divergence {
            step: 0,
            layer: None,
            site: "config".into(),
            reference: String::new(),
            detail: format!(
                "the generation config differs: {}",
                d.iter()
                    .map(|r| format!("{} (engine {}, references {})", r.name, r.engine, r.references.join(" / ")))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            likely_cause: Some("the sides were not set up alike (--strict-config)".into()),
        })
    });
    let model = &engine.model;
    RunResult {
        kept: None,
        verdict_pass: false,
        first_divergence,
        prompt,
        steps: vec![],
        engine_tokens: vec![],
        engine_text: String::new(),
        generate: vec![],
        summary: RunSummary {
            steps: 0,
            steps_requested: opts.steps.max(1),
            stopped_at_eos: false,
            engine_seconds: 0.0,
            references: vec![],
            pairs: vec![],
            oracle: vec![],
        },
        engine: EngineInfo {
            weights: engine.origin.name(),
            weights_mode: engine.weights.name(),
            matrix_types: model.info().matrix_types.clone(),
            faults: model.info().faults.clone(),
            dtype: opts.precision,
            qk_layout: match model.info().qk_layout {
                QkLayout::HalfSplit => "half-split",
                QkLayout::Interleaved => "interleaved",
            },
            transforms: model.info().qk_layout.transform_name().into_iter().collect(),
        },
        num_layers: model.info().config.num_layers,
        config,
        stopped_before_step0: Some(reason),
        sampler: None,
        lora: None,
    }
}
