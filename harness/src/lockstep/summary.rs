//! Verdicts over a whole run: the first divergence (prompt tokens, then the earliest failing
//! site of the earliest failing step, then logits, the sampler and the free-running check),
//! the run-level next-token checks of the quantized modes, and the per-reference and
//! per-pair summaries of the report.

use std::collections::HashSet;

use lockstep_engine::sites::leaf_of;
use lockstep_engine::{Decoder, LoadedModel, QkLayout};

use crate::compare::tolerance::{QuantBounds, SiteKind, Verdict, WeightsMode};
use crate::diagnosis::{self, At};
use crate::lockstep::options::RunOptions;
use crate::reference::Reference;
use crate::results::run::{
    Divergence, EngineInfo, EngineTaps, GenerateCheck, OracleSummary, PairSummary, PromptCheck, RefStep, RefSummary, RunResult, RunSummary,
    SiteRecord, StepRecord, WorstSite,
};

pub fn find_first_divergence(
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
                (Some(n), Some(m)) if site.routing.is_some() => format!("{n}; rel-L2 {:.3e}", m.rel_l2),
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
                    cache: engine.info().layer_plan(site.layer.unwrap_or(0)).cache,
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
                likely_cause: (engine.site_graph().localizes_to() == "step").then(|| {
                    format!("first divergent step {}; add per-layer taps to localize further (the engine declares logits only)", s.step)
                }),
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
pub fn quant_run_checks(summary: &mut RunSummary, modes: &[WeightsMode], b: &QuantBounds, n_steps: usize) -> Option<Divergence> {
    let mut found = None;
    for (rs, &mode) in summary.references.iter_mut().zip(modes) {
        rs.mode = mode;
        if matches!(mode, WeightsMode::SameWeights | WeightsMode::SameEngine) {
            continue;
        }
        rs.quant_bounds = Some(*b);
        let mut why = vec![];
        if !(rs.mean_kl <= b.fail_mean_kl) {
            why.push(format!("mean KL {:.3e} > {:.1e}", rs.mean_kl, b.fail_mean_kl));
        }
        if rs.top1_share_within_refs < b.min_top1_share {
            why.push(format!(
                "same top-1 at {:.1}% of steps < {:.0}% (counting the steps where another reference chose the engine's token: {:.1}%)",
                100.0 * rs.same_top1_share,
                100.0 * b.min_top1_share,
                100.0 * rs.top1_share_within_refs
            ));
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

pub fn summarize(
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
            top1_share_within_refs: steps.iter().filter(|s| s.references.iter().any(|x| x.logits.top1_agree)).count() as f64 / n,
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
        load: vec![],
    }
}

/// The result of a run stopped before step 0: nothing was fed to any model.
pub fn stopped_before_step0(
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
        memory: None,
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
            load: vec![],
        },
        engine: engine_info(engine, opts),
        num_layers: model.info().config.num_layers,
        config,
        stopped_before_step0: Some(reason),
        sampler: None,
        lora: None,
    }
}

/// What `describe` says of each layer of a plan (`None`: nothing to say), grouped: `X on every
/// layer`, `X on layers [..]` plus `rest` when not every layer; `None` when no layer says anything.
fn per_layer(plan: &[lockstep_engine::LayerPlan], describe: impl Fn(&lockstep_engine::LayerPlan) -> Option<String>, rest: &str) -> Option<String> {
    let mut groups: Vec<(String, Vec<usize>)> = vec![];
    for (l, d) in plan.iter().enumerate().filter_map(|(l, p)| Some((l, describe(p)?))) {
        match groups.iter_mut().find(|(g, _)| *g == d) {
            Some((_, layers)) => layers.push(l),
            None => groups.push((d, vec![l])),
        }
    }
    let parts: Vec<String> = groups
        .into_iter()
        .map(|(d, layers)| match layers.len() == plan.len() {
            true => format!("{d} on every layer"),
            false => format!("{d} on layers {layers:?}{rest}"),
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The RoPE scalings of a plan and the layers each applies to (`None` when no layer scales).
fn rope_scaling(plan: &[lockstep_engine::LayerPlan]) -> Option<String> {
    per_layer(plan, |p| (!p.rope.scaling.is_default()).then(|| p.rope.scaling.describe()), "")
}

/// The sliding windows of the plan: `sliding window of 8 on every layer`, `... on layers [1]
/// (the others global)`; `None` when every layer is global.
fn windows(plan: &[lockstep_engine::LayerPlan]) -> Option<String> {
    let window = |p: &lockstep_engine::LayerPlan| match p.span {
        lockstep_engine::plan::Span::Window(w) => Some(format!("sliding window of {w}")),
        lockstep_engine::plan::Span::Global => None,
    };
    per_layer(plan, window, " (the others global)")
}

/// The engine's side of the report header: weights, kernels, faults, dtype, Q/K layout.
pub fn engine_info(engine: &LoadedModel, opts: &RunOptions) -> EngineInfo {
    let info = engine.model.info();
    EngineInfo {
        name: info.engine.clone(),
        family: info.family.to_string(),
        taps: engine_taps(engine),
        weights: engine.origin.name(),
        weights_mode: engine.weights.name(),
        matrix_types: info.matrix_types.clone(),
        faults: info.faults.clone(),
        rope: rope_scaling(&info.plan),
        windows: windows(&info.plan),
        dtype: opts.precision,
        qk_layout: match info.qk_layout {
            QkLayout::HalfSplit => "half-split",
            QkLayout::Interleaved => "interleaved",
        },
        transforms: info.qk_layout.transform_name().into_iter().collect(),
    }
}

/// What the engine taps against the canonical graph of the model it runs, and the taps that
/// would let bisect localize further.
pub fn engine_taps(engine: &LoadedModel) -> EngineTaps {
    let graph = engine.model.site_graph();
    let described = lockstep_engine::models::describe_at(&engine.path).ok();
    let generic = described.as_ref().filter(|d| d.family.is_none()).map(|d| d.model_type.clone());
    let canonical = described.map(|d| d.graph);
    let not_declared: Vec<String> =
        canonical.as_ref().map(|c| c.names().into_iter().filter(|n| graph.get(n).is_none()).collect()).unwrap_or_default();
    let localizes_to = graph.localizes_to();
    let hint = match localizes_to {
        "step" => Some("add per-layer taps (layers.N.out) to localize to the layer, every site of the layer to localize to the site".to_string()),
        "layer" => Some("add the per-layer sites (q, k, v, q_rope, k_rope, cache_k, cache_v, attn, mlp_*) to localize to the site".to_string()),
        _ => None,
    };
    EngineTaps { declared: graph.sites().len(), canonical: canonical.map(|c| c.sites().len()), not_declared, localizes_to, hint, generic }
}
