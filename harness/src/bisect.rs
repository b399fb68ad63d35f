//! `lockstep bisect`: where the engine first leaves the reference, whether that layer is
//! wrong by itself or inherits an earlier error, and the most likely cause, with evidence.
//!
//! 1. The lockstep driver runs in bisect mode: every step compares logits, caches and all
//!    sites, and the run stops at the first failing step (so a bisect costs at most one
//!    plain run; a found fault usually much less).
//! 2. At that step the suspect site is chosen ([`localize`]): a cache whose length differs
//!    first (the most specific evidence), then an activation whose shape differs, then the
//!    first site in forward order over its pass bound.
//! 3. Isolation: the engine runs the suspect layer again on the reference's own input
//!    (`layers.{L-1}.out`) and the reference's cache of that layer before the step. If the
//!    isolated layer still fails, the cause is inside the layer; if it passes, the layer
//!    inherited the error (through its cache: the cache handling between steps is wrong).
//! 4. Diagnosis: a rule table maps the evidence to a named cause ([`diagnose`]).

use std::time::Instant;

use candle_core::{Device, Tensor};
use lockstep_engine::{sites, Capture, LoadedModel, QkLayout};
use serde::Serialize;

use crate::compare::metrics::tensor_metrics;
use crate::diagnosis::{classify, finding, At, Finding};
use lockstep_engine::faults::Diagnosis;
use crate::lockstep::run as driver;
use lockstep_engine::sites::{layer_of, leaf_of};
use crate::results::run::{KeptStep, RunResult, SiteRecord};
use crate::lockstep::options::{RunOptions};
use crate::error::HarnessError;
use crate::reference::Reference;
use crate::compare::tolerance::{tensor_verdict, tolerance, SiteKind, Verdict, WeightsMode};


#[derive(Debug, Clone, Serialize)]
pub struct IsolatedSite {
    pub site: String,
    pub rel_l2: f64,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct Isolation {
    pub layer: usize,
    /// `local`: the layer fails on the reference's own input and cache; `inherited`: it
    /// passes there, so the error came in through its input or cache.
    pub verdict: &'static str,
    pub first_failing_site: Option<String>,
    pub sites: Vec<IsolatedSite>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BisectReport {
    pub found: bool,
    pub step: Option<usize>,
    pub layer: Option<usize>,
    pub site: Option<String>,
    pub reference: Option<String>,
    pub detail: Option<String>,
    pub isolation: Option<Isolation>,
    pub diagnosis: Option<Finding>,
    pub steps_run: usize,
    pub steps_requested: usize,
    pub seconds: f64,
    pub faults_injected: Vec<String>,
}

pub fn bisect(opts: &RunOptions, engine: &LoadedModel, refs: &[Reference], max_capture_mb: usize) -> Result<(BisectReport, RunResult), HarnessError> {
    let t0 = Instant::now();
    let mut o = opts.clone();
    o.bisect = true;
    let mut run = driver::run(&o, engine, refs)?;
    // Tensors over the capture budget are not kept: the report then rests on statistics.
    let mut dropped = None;
    if let Some(k) = &run.kept {
        let bytes: usize = k.arrays.values().map(|(_, v)| v.len() * 4).sum();
        if bytes > max_capture_mb << 20 {
            dropped = Some(bytes);
            if let Some(k) = run.kept.as_mut() {
                k.arrays.clear();
            }
        }
    }
    let mut rep = BisectReport {
        found: false,
        step: None,
        layer: None,
        site: None,
        reference: None,
        detail: None,
        isolation: None,
        diagnosis: None,
        steps_run: run.steps.len(),
        steps_requested: opts.steps,
        seconds: 0.0,
        faults_injected: engine.model.info().faults.clone(),
    };
    if let Some(d) = &run.first_divergence {
        rep.found = true;
        rep.step = Some(d.step);
        rep.layer = d.layer;
        rep.site = Some(d.site.clone());
        rep.reference = Some(d.reference.clone());
        rep.detail = Some(d.detail.clone());
    }
    let logits_only = engine.model.site_graph().localizes_to() == "step";
    if d_is_tokens(&run) {
        rep.diagnosis = Some(diagnose_tokens(&run, engine));
    } else if let Some(d) = run.first_divergence.as_ref().filter(|d| d.site == "lora") {
        rep.diagnosis = Some(diagnose_adapter(&run, d));
    } else if let Some(d) = run.first_divergence.as_ref().filter(|d| logits_only && d.site == "logits") {
        rep.diagnosis = Some(diagnose_logits_only(&run, d, engine));
    } else if run.first_divergence.as_ref().is_some_and(|d| d.site == "sampler") {
        rep.diagnosis = Some(diagnose_sampler(&run));
    } else if let Some(k) = &run.kept {
        let st = run.steps.last().expect("a kept step was run");
        let rs = &st.references[k.reference];
        let site = &rs.sites[k.site_index];
        rep.found = true;
        rep.step = Some(k.step);
        rep.layer = site.layer;
        rep.site = Some(site.site.clone());
        rep.reference = Some(rs.reference.clone());
        rep.detail = Some(site_detail(site));
        let mode = run.summary.references.get(k.reference).map(|r| r.mode).unwrap_or(WeightsMode::SameWeights);
        // The call the kept tensors come from (a long prompt is fed in pieces).
        let total = k.start + k.fed;
        // Isolation where the engine can run one layer alone (its declared capability).
        let iso = match site.layer {
            Some(l) if engine.model.info().capabilities.isolate_layer => isolate(engine, k, l, k.fed, k.start, mode)?,
            _ => None,
        };
        // The cache kind of the site's own layer (a model's layers may keep positions differently).
        let cache = engine.model.info().layer_plan(site.layer.unwrap_or(0)).cache;
        let at = At { step: k.step, rs, site, fed: k.fed, total, graph: engine.model.site_graph(), cache };
        rep.diagnosis = Some(diagnose(engine, k, &at, iso.as_ref()));
        rep.isolation = iso;
    } else if rep.found {
        rep.diagnosis = Some(finding(
            Diagnosis::Unclassified,
            "a divergence outside the per-step comparison (see the run report)",
            vec![rep.detail.clone().unwrap_or_default()],
        ));
    }
    if let (Some(bytes), Some(d)) = (dropped, rep.diagnosis.as_mut()) {
        d.evidence.push(format!(
            "the layer's reference tensors ({:.0} MB) exceed --max-capture-mb {max_capture_mb}: kept as statistics, no isolation",
            bytes as f64 / 1048576.0
        ));
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok((rep, run))
}

/// The sampler `faults --check` runs the sampler faults with (the fault needs a
/// temperature other than 0 and 1).
pub const CHECK_SAMPLER: &str = "temp=0.8,top_p=0.95,seed=0";

/// One row of `lockstep faults --check`.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub fault: String,
    pub applicable: bool,
    pub note: String,
    pub expected: String,
    pub found: String,
    pub ok: bool,
    pub seconds: f64,
}

/// Injects every catalog fault that applies to the model (and none, first: no false
/// alarm), bisects each against the loaded references and compares with the catalog.
pub fn check_catalog(
    path: &std::path::Path,
    specs: &[crate::reference::RefSpec],
    refs: &[Reference],
    steps: usize,
    weights: Option<lockstep_engine::WeightsMode>,
    lora: Option<lockstep_engine::LoraOptions>,
) -> Result<Vec<CheckResult>, HarnessError> {
    use lockstep_engine::faults::{Fault, Faults, Layer, CATALOG, DEFAULT_FAULT_LAYER};
    let base = RunOptions {
        engine: crate::plugin::EngineSpec::under_test(),
        model: path.to_path_buf(),
        references: specs.to_vec(),
        prompt: crate::lockstep::options::Prompt::Chat("What is the capital of France?".into()),
        steps: steps.max(2),
        precision: crate::compare::tolerance::Precision::F32,
        weights,
        faults: Faults::none(),
        bisect: true,
        sampler: None,
        strict_config: false,
        lora,
        context: None,
        prefill_chunk: crate::lockstep::options::DEFAULT_PREFILL_CHUNK,
        max_memory: None,
    };
    let show = |r: &BisectReport| match &r.diagnosis {
        Some(d) => format!(
            "step {}, {}{} [{}]",
            r.step.map(|s| s.to_string()).unwrap_or("-".into()),
            r.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
            r.site.as_deref().map(leaf_of).unwrap_or("-"),
            d.kind
        ),
        None if r.found => format!("step {:?}, site {:?} (no diagnosis)", r.step, r.site),
        None => "nothing".into(),
    };
    let mut out = vec![];
    // No false alarm first.
    let engine = crate::lockstep::options::load_engine(&base)?;
    let (rep, _) = bisect(&base, &engine, refs, 256)?;
    out.push(CheckResult {
        fault: "(none)".into(),
        applicable: true,
        note: "the clean engine".into(),
        expected: "nothing".into(),
        found: show(&rep),
        ok: !rep.found,
        seconds: rep.seconds,
    });
    let g = lockstep_engine::weights::GgufFile::open(path).ok();
    let ttype = |name: &str| g.as_ref().and_then(|g| g.content.tensor_infos.get(name).map(|i| format!("{:?}", i.ggml_dtype)));
    let quant_embed = ttype("token_embd.weight").as_deref() == Some("Q4_1");
    let prompt_ids = crate::lockstep::options::engine_prompt_ids(&engine, &base.prompt)?;
    // (layer, site) of the adapter's first projection in forward order.
    const FORWARD: [(&str, &str); 8] = [
        ("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "attn_out"),
        ("gate", "router"), ("gate_proj", "mlp_gate"), ("up_proj", "mlp_up"), ("down_proj", "mlp_out"),
    ];
    let first_adapted: Option<(usize, &str)> = engine.lora.as_ref().and_then(|(a, _)| {
        a.pairs
            .iter()
            .filter_map(|p| FORWARD.iter().position(|(m, _)| *m == p.module).map(|k| (p.layer, k)))
            .min()
            .map(|(l, k)| (l, FORWARD[k].1))
    });
    for info in CATALOG {
        crate::interrupt::check()?;
        let mut o = base.clone();
        o.faults = Faults::parse(info.name)?;
        if info.fault == Fault::SamplerTemperature {
            o.sampler = Some(lockstep_engine::SamplerConfig::parse(CHECK_SAMPLER)?);
        }
        // What `--inject` refuses (the model, prompt and sampler), then what only this check
        // knows (the references).
        let why_not = crate::lockstep::options::fault_inapplicable(info.fault, DEFAULT_FAULT_LAYER, &engine, &o, &prompt_ids).or_else(|| {
            match info.fault {
                Fault::SamplerTemperature if !refs.iter().any(crate::checks::sampler::supports) => {
                    Some("no reference runs its own sampler on given logits (llama.cpp and recorded traces do not)".into())
                }
                Fault::LoraNotAttached | Fault::LoraScale if first_adapted.is_none() => Some("needs a LoRA adapter: faults --check --lora DIR".into()),
                _ => None,
            }
        });
        // The LoRA faults enter at the first adapted projection in forward order.
        if let (Fault::LoraNotAttached | Fault::LoraScale, Some((l, site)), None) = (info.fault, first_adapted, &why_not) {
            let expected = format!("step 0, layer {l}, {site} [{}]", info.diagnosis);
            let eng = crate::lockstep::options::load_engine(&o)?;
            let (rep, _) = bisect(&o, &eng, refs, 256)?;
            let ok = rep.step == Some(0)
                && rep.layer == Some(l)
                && rep.site.as_deref().map(leaf_of) == Some(site)
                && rep.diagnosis.as_ref().is_some_and(|d| d.kind == info.diagnosis);
            out.push(CheckResult {
                fault: info.name.into(),
                applicable: true,
                note: rep.diagnosis.as_ref().map(|d| d.title.clone()).unwrap_or_default(),
                expected,
                found: show(&rep),
                ok,
                seconds: rep.seconds,
            });
            continue;
        }
        let expected = format!(
            "step {}, {}{} [{}]",
            info.step,
            match info.layer {
                Layer::None => String::new(),
                Layer::First => "layer 0, ".into(),
                Layer::Injected => format!("layer {DEFAULT_FAULT_LAYER}, "),
                Layer::FirstWindow => "first window layer, ".into(),
                Layer::FirstGlobal => "first global layer, ".into(),
            },
            if quant_embed && info.fault == Fault::Q41Min { "embed" } else { info.site },
            info.diagnosis
        );
        let expected = if quant_embed && info.fault == Fault::Q41Min { expected.replace("layer 0, ", "") } else { expected };
        if let Some(w) = why_not {
            out.push(CheckResult { fault: info.name.into(), applicable: false, note: w, expected, found: "-".into(), ok: true, seconds: 0.0 });
            continue;
        }
        let eng = crate::lockstep::options::load_engine(&o)?;
        let (rep, run) = bisect(&o, &eng, refs, 256)?;
        // A sampler fault that no draw can show: the distributions this check runs on are so
        // peaked that every reference's sampler and the engine's keep one token at every step
        // (top_p 0.95 on the model's own logits), and a temperature changes nothing.
        let single = |r: &RunResult| r.steps.iter().all(|s| s.sampler.iter().all(|c| c.kept_engine == 1 && c.kept_reference == 1));
        if info.fault == Fault::SamplerTemperature && rep.diagnosis.is_none() && !run.steps.is_empty() && single(&run) {
            let note = format!("the sampler keeps one token at every step on both sides ({CHECK_SAMPLER}): no temperature changes a draw");
            out.push(CheckResult { fault: info.name.into(), applicable: false, note, expected, found: show(&rep), ok: true, seconds: rep.seconds });
            continue;
        }
        let windows = &engine.model.info().config.layer_windows;
        let first_window = windows.iter().position(Option::is_some);
        let first_global = if windows.is_empty() { Some(0) } else { windows.iter().position(Option::is_none) };
        let ok = matches_catalog(&rep, info, DEFAULT_FAULT_LAYER, (first_window, first_global), quant_embed);
        out.push(CheckResult {
            fault: info.name.into(),
            applicable: true,
            note: rep.diagnosis.as_ref().map(|d| d.title.clone()).unwrap_or_default(),
            expected,
            found: show(&rep),
            ok,
            seconds: rep.seconds,
        });
    }
    Ok(out)
}

pub fn render_check(rows: &[CheckResult], model: &str, reference: &str) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "lockstep faults --check: {model} vs {reference}\n");
    let mark = |r: &CheckResult| if !r.applicable { "n/a" } else if r.ok { "ok" } else { "MISS" };
    let wide = rows.iter().map(|r| 22 + 1 + 5 + 1 + 50 + 1 + 50 + 1 + 6 + 2 + r.note.chars().count()).max().unwrap_or(0);
    match crate::ui::get().width.filter(|&w| w < wide) {
        None => {
            let _ = writeln!(o, "{:<22} {:<5} {:<50} {:<50} {:>6}  diagnosis", "fault", "", "expected", "bisect found", "s");
            for r in rows {
                let _ = writeln!(o, "{:<22} {:<5} {:<50} {:<50} {:>6.2}  {}", r.fault, mark(r), r.expected, r.found, r.seconds, r.note);
            }
        }
        // Narrow: one block per fault, the long fields on lines of their own.
        Some(w) => {
            for r in rows {
                let _ = writeln!(o, "{:<22} {:<5} {:>6.2} s", r.fault, mark(r), r.seconds);
                for (label, text) in [("expected", &r.expected), ("found", &r.found), ("note", &r.note)] {
                    if !text.is_empty() {
                        let _ = writeln!(o, "{}", crate::ui::wrap(&format!("  {label:<9}{text}"), w, 11));
                    }
                }
            }
        }
    }
    let applicable = rows.iter().filter(|r| r.applicable).count();
    let ok = rows.iter().filter(|r| r.applicable && r.ok).count();
    let _ = writeln!(o, "\n{ok} of {applicable} applicable checks as the catalog says");
    o
}

fn d_is_tokens(run: &RunResult) -> bool {
    run.first_divergence.as_ref().is_some_and(|d| d.site == "tokens")
}

fn site_detail(s: &SiteRecord) -> String {
    match (&s.note, &s.metrics) {
        (Some(n), Some(m)) if s.routing.is_some() => format!("{n}; rel-L2 {:.3e}, verdict {}", m.rel_l2, s.verdict.as_str()),
        (Some(n), _) => n.clone(),
        (None, Some(m)) => format!("rel-L2 {:.3e}, cosine {:.6}, verdict {}", m.rel_l2, m.cosine, s.verdict.as_str()),
        _ => "differs".into(),
    }
}

/// The reference's cache of layer `l` before the step, `(kv_heads, n, head_dim)` each in the
/// Hugging Face layout: its cache after the step minus the positions fed; for a sliding-window
/// layer, every earlier position kept ([`KeptStep::window_before`]: the rows its window
/// evicted), at least the last `min(start, w - 1)` (what the step's first position attends
/// over besides itself). `Ok(None)`: nothing was cached (or kept); `Err`: the rows are not at
/// hand, with the reason.
fn before_cache(engine: &LoadedModel, k: &KeptStep, l: usize) -> Result<Option<(Tensor, Tensor)>, String> {
    let names = [format!("layers.{l}.cache_k"), format!("layers.{l}.cache_v")];
    let (Some((ks, _)), Some(_)) = (arr(k, &names[0]), arr(k, &names[1])) else { return Ok(None) };
    let err = |e: candle_core::Error| e.to_string();
    let start = k.start;
    let Some(w) = crate::lockstep::step::Windows::of_model(&engine.path).0.get(l).copied().flatten() else {
        // A global layer: the cache after the step, less the step's own positions.
        let held = ks[1].saturating_sub(k.fed);
        if held == 0 {
            return Ok(None);
        }
        let rows = |(s, v): &(Vec<usize>, Vec<f32>)| Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu)?.narrow(1, 0, held)?.contiguous();
        return Ok(Some((rows(arr(k, &names[0]).expect("checked")).map_err(err)?, rows(arr(k, &names[1]).expect("checked")).map_err(err)?)));
    };
    let needed = start - start.min(w.saturating_sub(1));
    if needed >= start {
        return Ok(None);
    }
    let mut out = vec![];
    for name in &names {
        let (first, shape, vals) = match k.window_before.get(name) {
            Some((first, shape, vals)) if *first <= needed && first + shape[1] >= start => (first, shape, vals),
            _ => {
                return Err(format!(
                    "layer {l} attends over a window of {w}: the reference's cache before step {} (positions {needed}..{start}) \
                     was not kept, and this step evicted part of it",
                    k.step
                ))
            }
        };
        let t = Tensor::from_vec(vals.clone(), shape.as_slice(), &Device::Cpu).map_err(err)?;
        out.push(t.narrow(1, 0, start - first).and_then(|t| t.contiguous()).map_err(err)?);
    }
    let v = out.pop().expect("two");
    Ok(Some((out.pop().expect("two"), v)))
}

/// Runs layer `l` of the engine on the reference's input and cache, at the step's positions
/// (`start..`, `start` the positions fed before it); compares every site. `None` where the
/// reference's cache before the step is not at hand ([`before_cache`]).
fn isolate(engine: &LoadedModel, k: &KeptStep, l: usize, fed: usize, start: usize, mode: WeightsMode) -> Result<Option<Isolation>, HarnessError> {
    let Ok(before) = before_cache(engine, k, l) else { return Ok(None) };
    let keep = crate::lockstep::step::Windows::of_model(&engine.path).keep(l, start + fed);
    let model = &engine.model;
    let input_name = sites::layer_input(l);
    let tensor = |name: &str| -> Option<Tensor> {
        k.arrays.get(name).and_then(|(shape, v)| Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu).ok())
    };
    let missing = |what: &str| HarnessError::IsolationInput { site: what.to_string() };
    let x = tensor(&input_name).ok_or_else(|| missing(&input_name))?;
    // The reference's cache of this layer before the step, in the engine's Q/K layout.
    let kv = match before {
        Some((ck, cv)) => {
            // cache_k is (kv_heads, len, hd): the layout transform works on the last dim.
            let site = model.site_graph().get(&format!("layers.{l}.cache_k")).ok_or(HarnessError::SiteNotInGraph { site: format!("layers.{l}.cache_k") })?;
            Some((model.to_model_layout(site, &ck)?, cv))
        }
        None => None,
    };
    let mut cap = Capture::new();
    model.isolate_layer(l, start, &x, kv, &mut cap)?;
    let mut sites = vec![];
    for (name, t) in &cap.entries {
        let Some((rshape, rv)) = k.arrays.get(name) else { continue };
        let Some(site) = model.site_graph().get(name) else { continue };
        let (t, _) = model.to_canonical(site, t)?;
        // A window layer's caches in their canonical form, on both sides.
        let (t, rshape, rv) = match (site.kind, keep, rshape.as_slice()) {
            (lockstep_engine::SiteKind::Cache, Some(n), &[h, len, w]) if len >= n && t.dims().get(1).is_some_and(|&e| e >= n) => {
                let part = crate::compare::data::gather_rows(crate::compare::data::Data::F32(rv), rshape, &[len - n..len]).expect("f32 rows");
                let e = t.dims()[1];
                (t.narrow(1, e - n, n)?, vec![h, n, w], std::borrow::Cow::Owned(part.data().to_f32_vec().expect("f32 rows")))
            }
            _ => (t.clone(), rshape.clone(), std::borrow::Cow::Borrowed(rv)),
        };
        let (rshape, rv) = (&rshape, rv.as_ref());
        if t.dims() != rshape.as_slice() {
            sites.push(IsolatedSite { site: name.clone(), rel_l2: f64::INFINITY, verdict: Verdict::Fail });
            continue;
        }
        let e: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let m = tensor_metrics(&e, rv);
        // The same bounds as the run used for this reference.
        let exact = crate::compare::tolerance::same_quant_layer0_exact(&model.info().matrix_types);
        let layer = crate::compare::tolerance::tolerance_layer(mode, layer_of(name), exact);
        let tol = tolerance(mode, crate::compare::tolerance::Precision::F32, SiteKind::of(name), layer);
        sites.push(IsolatedSite { site: name.clone(), rel_l2: m.rel_l2, verdict: tensor_verdict(&m, &tol) });
    }
    let first = sites.iter().find(|s| s.verdict == Verdict::Fail).map(|s| s.site.clone());
    Ok(Some(Isolation { layer: l, verdict: if first.is_some() { "local" } else { "inherited" }, first_failing_site: first, sites }))
}


fn diagnose_tokens(run: &RunResult, engine: &LoadedModel) -> Finding {
    let p = &run.prompt;
    let e = &p.engine_ids;
    let Some((rname, r)) = p.reference_ids.iter().find(|(_, ids)| ids != e) else {
        return finding(Diagnosis::TokenMismatch, "prompt tokens differ", vec![]);
    };
    let show = |ids: &[u32]| {
        let n = ids.len().min(8);
        let pieces: Vec<String> = ids[..n]
            .iter()
            .map(|&i| format!("{i}:{:?}", engine.tokenizer.id_to_token(i).unwrap_or_default()))
            .collect();
        format!("[{}{}] ({} tokens)", pieces.join(", "), if ids.len() > n { ", …" } else { "" }, ids.len())
    };
    let mut ev = vec![format!("engine    {}", show(e)), format!("{rname:<9} {}", show(r))];
    let bos = engine.model.info().config.bos_token_id.or_else(|| {
        engine.tokenizer.bos_token.as_deref().and_then(|t| engine.tokenizer.token_to_id(t))
    });
    if r.len() == e.len() + 1 && r[1..] == e[..] && bos == Some(r[0]) {
        ev.push(format!("the reference starts with BOS {} and is otherwise identical", r[0]));
        return finding(Diagnosis::MissingBos, "the engine's prompt lacks the BOS token", ev);
    }
    if let Some(why) = space_prefix_dropped(engine, e, r) {
        ev.push(why);
        return finding(Diagnosis::SpacePrefix, "SentencePiece space handling differs: the engine's prompt lacks the ▁ space prefix", ev);
    }
    if p.mode == "chat" {
        let raw = engine.tokenizer.encode(&p.text, true).unwrap_or_default();
        if *e == raw {
            ev.push(format!("the engine's ids are the plain encoding of {:?}: no chat template applied", p.text));
            return finding(Diagnosis::TemplateSkipped, "the chat template was skipped: the raw prompt was fed", ev);
        }
        if let (Ok(rendered), true) = (engine.tokenizer.render_chat(&[lockstep_engine::ChatMessage::user(p.text.clone())], true), e.len() < r.len()) {
            ev.push(format!("the reference's ids are {} tokens of the rendered template ({} chars)", r.len(), rendered.len()));
        }
    }
    let at = e.iter().zip(r).position(|(a, b)| a != b).unwrap_or(e.len().min(r.len()));
    ev.push(format!("first difference at position {at}"));
    finding(Diagnosis::TokenMismatch, "tokenizer or chat template differs (see tokcheck)", ev)
}

/// The engine's and the reference's pieces spell the same text once every SentencePiece `▁` is
/// taken out, and the reference's has more of them: the engine's tokenizer dropped the `▁`
/// space prefix (the spm-space-prefix fault; a hand-written SentencePiece tokenizer that forgets
/// add_space_prefix). Returns the evidence.
fn space_prefix_dropped(engine: &LoadedModel, e: &[u32], r: &[u32]) -> Option<String> {
    let u = lockstep_engine::tokenizer::SPIECE_UNDERLINE;
    let spell = |ids: &[u32]| ids.iter().map(|&i| engine.tokenizer.id_to_token(i).unwrap_or_default()).collect::<String>();
    let (a, b) = (spell(e), spell(r));
    let (na, nb) = (a.matches(u).count(), b.matches(u).count());
    (a != b && nb > na && a.replace(u, "") == b.replace(u, "")).then(|| {
        let show = |s: &str| s.chars().take(24).collect::<String>();
        format!(
            "the pieces spell the same text but for {} fewer ▁ on the engine's side: engine {:?}…, reference {:?}…",
            nb - na,
            show(&a),
            show(&b)
        )
    })
}

/// The adapter checks failed (an engine that cannot run one projection alone): the inventory
/// or the effect says what.
fn diagnose_adapter(run: &RunResult, d: &crate::results::run::Divergence) -> Finding {
    let mut ev = vec![d.detail.clone()];
    if let Some(r) = &run.lora {
        ev.extend(crate::checks::lora::render_checks(r).lines().map(|l| l.trim().to_string()));
    }
    match run.lora.as_ref().and_then(|r| r.effect.as_ref()).filter(|e| !e.has_effect) {
        Some(e) => finding(
            Diagnosis::AdapterNoEffect,
            format!(
                "adapter has no effect: the engine's adapted and base models give the same logits (rel-L2 {:.1e} <= noise floor {:.1e}); its adapter layers are not attached",
                e.logits_rel_l2, e.floor
            ),
            ev,
        ),
        None => finding(Diagnosis::Unclassified, "the LoRA adapter differs between the engine and the references (see the inventory)", ev),
    }
}

/// An engine that taps its logits only: the step is as far as bisect can go.
fn diagnose_logits_only(run: &RunResult, d: &crate::results::run::Divergence, engine: &LoadedModel) -> Finding {
    let mut ev = vec![format!("step {}: {}", d.step, d.detail)];
    for r in &run.summary.references {
        ev.push(format!(
            "vs {}: mean KL {:.3e}, max KL {:.3e}, same top-1 at {:.0}% of {} steps",
            r.reference,
            r.mean_kl,
            r.max_kl,
            100.0 * r.same_top1_share,
            run.steps.len()
        ));
    }
    let taps = &run.engine.taps;
    ev.push(format!(
        "{} declares {} site(s) (logits only){}",
        engine.model.info().engine,
        taps.declared,
        taps.hint.as_ref().map(|h| format!(": {h}")).unwrap_or_default()
    ));
    finding(Diagnosis::LogitsOnly, format!("first divergent step {}; add per-layer taps to localize further", d.step), ev)
}

/// The forward pass matched and a reference's own sampler, on the engine's logits, kept
/// other tokens or other weights: the sampler's configuration or code differs.
fn diagnose_sampler(run: &RunResult) -> Finding {
    let Some(st) = run.first_divergence.as_ref().and_then(|d| run.steps.iter().find(|s| s.step == d.step)) else {
        return finding(Diagnosis::SamplerMismatch, "the sampler differs", vec![]);
    };
    let mut ev = vec![format!("step {}: every compared site within its band; the processed distributions differ", st.step)];
    for c in &st.sampler {
        ev.push(format!(
            "{}: TV {:.3e}, kept {} (engine) vs {} ({}), {} [{}]",
            c.reference,
            c.tv,
            c.kept_engine,
            c.kept_reference,
            c.reference,
            c.order,
            c.verdict.as_str()
        ));
    }
    let explained = st.sampler.iter().find_map(|c| c.explained.clone());
    let title = match &explained {
        Some(e) => format!("sampler mismatch: {}", e.split(" (reproduces").next().unwrap_or(e)),
        None => "sampler mismatch: a filter's threshold or order, the temperature or the penalty differs".into(),
    };
    if let Some(e) = explained {
        ev.push(e);
    }
    finding(Diagnosis::SamplerMismatch, title, ev)
}

/// Per-row relative L2 of two `(rows, cols)` arrays.
fn row_errors(e: &[f32], r: &[f32], cols: usize) -> Vec<f64> {
    e.chunks(cols).zip(r.chunks(cols)).map(|(a, b)| tensor_metrics(a, b).rel_l2).collect()
}

fn fmt_list(v: &[usize]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// The diagnosis table's finding ([`crate::diagnosis::classify`]), refined for its generic
/// kinds by measurements on the engine: which RoPE reproduces the engine's q_rope, how the
/// attention differs (per position, per head), whether a norm differs by a scale only, and
/// whether an adapter or the dequantization explains a weight's output.
fn diagnose(engine: &LoadedModel, k: &KeptStep, at: &At, iso: Option<&Isolation>) -> Finding {
    let site = at.site;
    let leaf = leaf_of(&site.site);
    let where_ = format!("step {}, {}{}", at.step, site.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(), leaf);
    let mut ev = vec![format!("{where_}: {}", site_detail(site))];
    if let Some(i) = iso {
        ev.push(match i.verdict {
            "local" => format!(
                "isolation: layer {} fails on the reference's own input and cache (first at {}): the cause is inside the layer",
                i.layer,
                i.first_failing_site.as_deref().unwrap_or("?")
            ),
            _ => format!(
                "isolation: layer {} passes on the reference's own input and cache (worst rel-L2 {:.1e}): the error is inherited",
                i.layer,
                i.sites.iter().map(|s| s.rel_l2).fold(0.0, f64::max)
            ),
        });
    }
    let mut f = classify(at);
    ev.append(&mut f.evidence);
    let l = site.layer.unwrap_or(0);
    let isolated_fails = iso.and_then(|i| i.sites.iter().find(|s| s.site == site.site)).is_some_and(|s| s.verdict == Verdict::Fail);
    match f.kind {
        Diagnosis::Rope => rope_evidence(engine, k, l, at, &mut ev).unwrap_or_else(|| finding(f.kind, f.title, ev)),
        Diagnosis::Attention => attention_evidence(engine, k, l, at, &mut ev),
        Diagnosis::Norm if site.layer.is_some() => norm_evidence(engine, k, l, at, &mut ev),
        Diagnosis::OutputHead => {
            let cfg = &engine.model.info().config;
            ev.push(match cfg.tie_word_embeddings {
                false => "the model has its own output head (tie_word_embeddings = false): an engine that multiplies with the \
                          embedding instead gives these logits"
                    .to_string(),
                true => "the model's head is tied to the embedding (tie_word_embeddings = true): the engine must multiply with \
                         the embedding matrix"
                    .to_string(),
            });
            if let Some(t) = engine.model.info().quant_type.clone() {
                ev.push(format!("the weights are {t}: `lockstep quant-check {}` checks the head's dequantization", engine.path.display()));
            }
            finding(f.kind, f.title, ev)
        }
        Diagnosis::Activation if leaf == "mlp_act" => activation_evidence(engine, k, l, &mut ev).unwrap_or_else(|| finding(f.kind, f.title, ev)),
        Diagnosis::Weights | Diagnosis::QkLayout | Diagnosis::Embedding => {
            if leaf == "embed" {
                if let Some(d) = embed_scale_evidence(engine, k, &mut ev) {
                    return d;
                }
            }
            if let Some(d) = lora_evidence(engine, k, l, leaf, &mut ev) {
                return d;
            }
            if let Some(d) = bias_evidence(engine, k, l, leaf, &mut ev) {
                return d;
            }
            ev.push(format!("{} is a pure function of its input (which passes) and a weight matrix", site.site));
            match engine.model.info().quant_type.clone() {
                Some(t) => {
                    ev.push(format!(
                        "the weights are {t}: the matrix dequantizes differently; `lockstep quant-check {}` checks the dequantizer",
                        engine.path.display()
                    ));
                    finding(Diagnosis::Dequantization, format!("the {t} weights of `{}` are read wrong (dequantization)", site.site), ev)
                }
                None => finding(f.kind, f.title, ev),
            }
        }
        // An input fails too, yet isolation on the reference's own inputs still fails here.
        Diagnosis::Unclassified if isolated_fails => finding(f.kind, format!("first failure at {}", site.site), ev),
        _ => finding(f.kind, f.title, ev),
    }
}

/// The embedding off by a constant factor: the engine's rows times one number give the
/// reference's (least squares, to 1e-5). Named for the model's own scale where it has one
/// (Gemma's `sqrt(hidden)`): multiplied by it, the engine's embedding is the reference's.
fn embed_scale_evidence(engine: &LoadedModel, k: &KeptStep, ev: &mut Vec<String>) -> Option<Finding> {
    let (_, e) = k.engine_site.as_ref()?;
    let (_, r) = arr(k, "embed")?;
    if e.len() != r.len() || e.is_empty() {
        return None;
    }
    let (er, ee) = e.iter().zip(r).fold((0f64, 0f64), |(er, ee), (a, b)| (er + *a as f64 * *b as f64, ee + (*a as f64).powi(2)));
    let c = er / ee.max(1e-300);
    let scaled: Vec<f32> = e.iter().map(|a| (*a as f64 * c) as f32).collect();
    let rel = tensor_metrics(&scaled, r).rel_l2;
    if !(rel < 1e-5 && (c - 1.0).abs() > 1e-4) {
        return None;
    }
    let model = engine.model.info().config.variant.embed_scale;
    ev.push(format!("the reference's embedding is the engine's times {c:.6} at every position (rel-L2 {rel:.1e} after that one factor)"));
    let title = match model {
        Some(s) if (c - s).abs() < 1e-3 * s => {
            format!("embedding scale missing: the engine does not multiply its embedding by sqrt(hidden_size) = {s:.6}, as the model does")
        }
        Some(s) if (c * s - 1.0).abs() < 1e-3 => format!("embedding scale applied twice: the engine's embedding is {s:.6} times the model's"),
        Some(s) => format!("embedding scaled by another factor: {c:.6} apart from the reference, the model's scale is {s:.6}"),
        None => format!("embedding scaled: the reference's is {c:.6} times the engine's, and this model scales none"),
    };
    Some(finding(Diagnosis::EmbedScale, title, std::mem::take(ev)))
}

/// The MLP activation the engine computes, found by recomputing `act(gate) * up` from the
/// reference's own gate and up with each gated activation: the one that gives the engine's
/// `mlp_act` (to 1e-4) is named, beside the model's.
fn activation_evidence(engine: &LoadedModel, k: &KeptStep, l: usize, ev: &mut Vec<String>) -> Option<Finding> {
    let (_, g) = arr(k, &format!("layers.{l}.mlp_gate"))?;
    let (_, u) = arr(k, &format!("layers.{l}.mlp_up"))?;
    let (_, e) = k.engine_site.as_ref()?;
    if g.len() != e.len() || u.len() != e.len() {
        return None;
    }
    let gelu_tanh = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let relu = |x: f64| x.max(0.0);
    let candidates: [(&str, &dyn Fn(f64) -> f64); 3] = [("silu", &silu), ("gelu_pytorch_tanh", &gelu_tanh), ("relu", &relu)];
    let model = engine.model.info().config.variant.activation;
    let dist: Vec<(&str, f64)> = candidates
        .iter()
        .map(|(n, f)| {
            let y: Vec<f32> = g.iter().zip(u).map(|(a, b)| (f(*a as f64) * *b as f64) as f32).collect();
            (*n, tensor_metrics(e, &y).rel_l2)
        })
        .collect();
    ev.push(format!(
        "act(gate) * up on the reference's gate and up, rel-L2 to the engine's mlp_act: {}",
        dist.iter().map(|(n, d)| format!("{n} {d:.1e}")).collect::<Vec<_>>().join(", ")
    ));
    let (used, d) = dist.iter().copied().find(|(_, d)| *d < 1e-4)?;
    if used == model.name() {
        return None;
    }
    let (_, right) = dist.iter().copied().find(|(n, _)| *n == model.name()).unwrap_or(("", f64::NAN));
    ev.push(format!("the engine computes {used} (rel-L2 {d:.1e}); the model's activation, {}, is {right:.1e} away", model.name()));
    Some(finding(Diagnosis::Activation, format!("the MLP activation is {used} where the model uses {}", model.name()), std::mem::take(ev)))
}

/// A projection site's engine output on the reference's own input, against the reference's
/// output: what the adapter and bias rules measure. Needs the engine's `project`.
struct ReferenceInputProjection {
    module: &'static str,
    site: String,
    /// The reference's input, as fed to the engine's projection.
    x: Tensor,
    /// (rows, cols) of the output.
    shape: (usize, usize),
    /// Engine output minus reference output, row-major.
    diff: Vec<f64>,
}

fn projection_on_reference_input(engine: &LoadedModel, k: &KeptStep, l: usize, leaf: &str) -> Option<ReferenceInputProjection> {
    if !engine.model.info().capabilities.project {
        return None;
    }
    // The projection whose output this site is, and the site it reads (the site graph).
    let graph = engine.model.site_graph();
    let site = graph.get(&sites::layer_site(l, leaf))?;
    let (module, input) = (site.module?, site.reads.first()?);
    let (xs, xd) = arr(k, input)?;
    let (_, yref) = arr(k, &site.name)?;
    let x = Tensor::from_vec(xd.clone(), xs.as_slice(), &Device::Cpu).ok()?;
    let y = engine.model.project(l, module, &x).ok()?;
    let shape = y.dims2().ok()?;
    let ye: Vec<f64> = y.to_dtype(candle_core::DType::F64).ok()?.flatten_all().ok()?.to_vec1().ok()?;
    if ye.len() != yref.len() {
        return None;
    }
    let diff = ye.iter().zip(yref).map(|(a, b)| a - *b as f64).collect();
    Some(ReferenceInputProjection { module, site: site.name.clone(), x, shape, diff })
}

/// With a LoRA adapter on the failing projection: how much of the engine-minus-reference
/// difference is the adapter's delta. On the reference's own input x, `D = (x A^T) B^T`;
/// the difference `y_engine - y_reference` projected on D gives `c`; when c*D explains the
/// difference, the engine applies the adapter with scale `s + c` where the reference applies
/// `s`: `c = -s` is an adapter that is not attached, another c a wrong scale.
fn lora_evidence(engine: &LoadedModel, k: &KeptStep, l: usize, leaf: &str, ev: &mut Vec<String>) -> Option<Finding> {
    let (adapter, _) = engine.lora.as_ref()?;
    let p = projection_on_reference_input(engine, k, l, leaf)?;
    let (module, x, diff) = (p.module, &p.x, &p.diff);
    let pair = adapter.pairs.iter().find(|p| p.layer == l && p.module == module)?;
    let d = x.matmul(&pair.a.t().ok()?).ok()?.matmul(&pair.b.t().ok()?).ok()?;
    let dv: Vec<f64> = d.to_dtype(candle_core::DType::F64).ok()?.flatten_all().ok()?.to_vec1().ok()?;
    let dd: f64 = dv.iter().map(|v| v * v).sum();
    if dd == 0.0 || diff.len() != dv.len() {
        return None;
    }
    let c = diff.iter().zip(&dv).map(|(a, b)| a * b).sum::<f64>() / dd;
    let total: f64 = diff.iter().map(|v| v * v).sum::<f64>().sqrt();
    let resid: f64 = diff.iter().zip(&dv).map(|(a, b)| (a - c * b).powi(2)).sum::<f64>().sqrt();
    if total == 0.0 || resid > 0.5 * total {
        return None; // the adapter does not explain the difference
    }
    let s = pair.scale;
    ev.push(format!(
        "layers.{l}.{module} has a LoRA adapter (scale {s}): on the reference's input, the engine's output minus the \
         reference's is {c:.4} x (x A^T) B^T (that explains {:.0}% of the difference)",
        100.0 * (1.0 - (resid / total).powi(2))
    ));
    if (c + s).abs() <= 0.05 * s.abs() {
        ev.push(format!("the engine applies scale {:.4} where the reference applies {s}: no adapter at all", s + c));
        return Some(finding(Diagnosis::AdapterNotAttached, format!("the LoRA adapter is not attached to `layers.{l}.{module}` in the engine"), std::mem::take(ev)));
    }
    ev.push(format!("the engine applies scale {:.4} where the reference applies {s}", s + c));
    Some(finding(Diagnosis::AdapterScale, format!("the LoRA scale of `layers.{l}.{module}` is wrong in the engine ({:.4} instead of {s})", s + c), std::mem::take(ev)))
}

/// Whether the engine's projection output differs from the reference's by the same vector
/// at every position (on the reference's own input): an additive term, the projection's
/// bias, is missing or differs. Needs 2+ positions and the engine's `project`.
fn bias_evidence(engine: &LoadedModel, k: &KeptStep, l: usize, leaf: &str, ev: &mut Vec<String>) -> Option<Finding> {
    let p = projection_on_reference_input(engine, k, l, leaf)?;
    let (module, site, diff, (rows, cols)) = (p.module, &p.site, &p.diff, p.shape);
    if rows < 2 {
        return None;
    }
    let mean: Vec<f64> = (0..cols).map(|c| (0..rows).map(|r| diff[r * cols + c]).sum::<f64>() / rows as f64).collect();
    let total: f64 = diff.iter().map(|v| v * v).sum::<f64>().sqrt();
    let resid: f64 = diff.iter().enumerate().map(|(i, v)| (v - mean[i % cols]).powi(2)).sum::<f64>().sqrt();
    if total == 0.0 || resid > 0.05 * total {
        return None; // the difference varies with the input: not an additive term
    }
    let norm: f64 = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
    ev.push(format!(
        "on the reference's input, the engine's `{site}` minus the reference's is the same vector at all {rows} positions \
         (norm {norm:.3e}; it explains {:.1}% of the difference): an additive term, not the matrix",
        100.0 * (1.0 - (resid / total).powi(2))
    ));
    Some(finding(
        Diagnosis::Bias,
        format!("the bias of `layers.{l}.{module}` is missing or differs in the engine (the output is off by a constant vector)"),
        std::mem::take(ev),
    ))
}

fn arr<'a>(k: &'a KeptStep, name: &str) -> Option<&'a (Vec<usize>, Vec<f32>)> {
    k.arrays.get(name)
}

/// A per-head array `(heads, seq, hd)` as `(seq, heads * hd)` rows; a 2-D one as it is.
fn rows_of((shape, v): &(Vec<usize>, Vec<f32>)) -> Option<(Vec<usize>, Vec<f32>)> {
    match shape.as_slice() {
        &[h, seq, hd] => {
            let t = Tensor::from_vec(v.clone(), (h, seq, hd), &Device::Cpu).ok()?;
            let rows = t.transpose(0, 1).ok()?.contiguous().ok()?.flatten_all().ok()?.to_vec1().ok()?;
            Some((vec![seq, h * hd], rows))
        }
        _ => Some((shape.clone(), v.clone())),
    }
}

/// RoPE in the HF convention (rotate-half) or the interleaved one, on `(rows, heads*hd)`
/// rows at positions `offset..`, with the frequencies `inv` (`hd / 2` of them) and cos/sin
/// multiplied by `attn` (a scaling's attention factor).
fn apply_rope(x: &[f32], cols: usize, hd: usize, offset: usize, inv: &[f64], attn: f64, interleaved: bool) -> Vec<f32> {
    let mut out = x.to_vec();
    for (row, chunk) in x.chunks(cols).enumerate() {
        let pos = (offset + row) as f64;
        for h in 0..cols / hd {
            for (i, f) in inv.iter().enumerate().take(hd / 2) {
                let a_ = pos * f;
                let (c, s) = (a_.cos() * attn, a_.sin() * attn);
                let (a, b) = if interleaved { (h * hd + 2 * i, h * hd + 2 * i + 1) } else { (h * hd + i, h * hd + i + hd / 2) };
                let (xa, xb) = (chunk[a] as f64, chunk[b] as f64);
                out[row * cols + a] = (xa * c - xb * s) as f32;
                out[row * cols + b] = (xa * s + xb * c) as f32;
            }
        }
    }
    out
}

/// The layer's cache before the step ([`before_cache`]) in the engine's Q/K layout: what
/// isolation at the step's own positions needs. `None` at a prefill from position 0, or where
/// the rows are not at hand.
fn cache_before(engine: &LoadedModel, k: &KeptStep, l: usize) -> Option<(Tensor, Tensor)> {
    let (kt, vt) = before_cache(engine, k, l).ok()??;
    let site = engine.model.site_graph().get(&format!("layers.{l}.cache_k"))?;
    Some((engine.model.to_model_layout(site, &kt).ok()?, vt))
}

/// Which RoPE reproduces the engine's q_rope from the reference's q, at the step's own
/// positions: the other convention, the rotation without the layer's scaling, or another base.
fn rope_evidence(engine: &LoadedModel, k: &KeptStep, l: usize, at: &At, ev: &mut Vec<String>) -> Option<Finding> {
    let cfg = &engine.model.info().config;
    // The layer's own RoPE (its plan: layers of one model may differ).
    let plan = engine.model.info().layer_plan(l);
    let base = plan.rope.base;
    // RoPE's input: the projection `q`, or what the site graph says q_rope reads (Gemma 3's
    // per-head `q_norm`, `(heads, seq, hd)`, taken here as `(seq, heads * hd)` rows like q).
    let input = engine.model.site_graph().get(&format!("layers.{l}.q_rope"))?.reads.first()?.clone();
    let (qs, q) = rows_of(arr(k, &input)?)?;
    let (qs, q) = (&qs, &q);
    let cols = *qs.last()?;
    // The engine's own q_rope, recomputed from the reference's q by isolation at the step's
    // positions (on the reference's cache before the step).
    let start = at.total - at.fed;
    let mut cap = Capture::new();
    let x = arr(k, &sites::layer_input(l))?;
    let xt = Tensor::from_vec(x.1.clone(), x.0.as_slice(), &Device::Cpu).ok()?;
    let kv = cache_before(engine, k, l);
    let start = if kv.is_some() { start } else { 0 };
    engine.model.isolate_layer(l, start, &xt, kv, &mut cap).ok()?;
    let eq = cap.entries.iter().find(|(n, _)| *n == format!("layers.{l}.q_rope"))?.1.clone();
    let (eq, _) = engine.model.to_canonical(engine.model.site_graph().get(&format!("layers.{l}.q_rope"))?, &eq).ok()?;
    // q_rope is (heads, seq, hd); q is (seq, heads*hd).
    let (nh, seq, hd) = eq.dims3().ok()?;
    let eq: Vec<f32> = eq.transpose(0, 1).ok()?.contiguous().ok()?.reshape((seq, nh * hd)).ok()?.flatten_all().ok()?.to_vec1().ok()?;
    let close = |cand: &[f32]| tensor_metrics(&eq, cand).rel_l2 < 1e-4;
    let (inv, attn) = plan.rope.frequencies(start + seq, false);
    let right = apply_rope(q, cols, cfg.head_dim, start, &inv, attn, false);
    let rel_right = tensor_metrics(&eq, &right).rel_l2;
    // The other convention, applied in the engine's own row order (GGUF Q/K rows are
    // stored for interleaved RoPE; HF rows for rotate-half).
    let layout = engine.model.info().qk_layout;
    let other = (|| -> Option<Vec<f32>> {
        let qt = Tensor::from_vec(q.clone(), qs.as_slice(), &Device::Cpu).ok()?;
        let own: Vec<f32> = layout.from_hf(&qt, cfg.head_dim).ok()?.flatten_all().ok()?.to_vec1().ok()?;
        let rot = apply_rope(&own, cols, cfg.head_dim, start, &inv, attn, layout == QkLayout::HalfSplit);
        let rt = Tensor::from_vec(rot, qs.as_slice(), &Device::Cpu).ok()?;
        layout.to_hf(&rt, cfg.head_dim).ok()?.flatten_all().ok()?.to_vec1().ok()
    })()?;
    if close(&other) {
        let (used, want) = match layout {
            QkLayout::HalfSplit => ("interleaved pairs (2i, 2i+1)", "rotate-half pairs (i, i+hd/2)"),
            QkLayout::Interleaved => ("rotate-half pairs (i, i+hd/2)", "interleaved pairs (2i, 2i+1)"),
        };
        ev.push(format!(
            "the engine's q_rope equals the reference's q rotated with {used} where the weights' row order needs {want} \
             (rel-L2 to the right rotation {rel_right:.2e}); position 0 is unrotated in both"
        ));
        return Some(finding(Diagnosis::RopeConvention, "RoPE convention: interleaved vs half-split pairs", std::mem::take(ev)));
    }
    // The rotation without the layer's scaling: undo the scaling and the computation matches.
    if !plan.rope.scaling.is_default() {
        let (plain, _) = lockstep_engine::RopePlan::unscaled(base, plan.rope.dims).frequencies(start + seq, false);
        let unscaled = apply_rope(q, cols, cfg.head_dim, start, &plain, 1.0, false);
        if close(&unscaled) {
            // How the error grows with the position: the engine's rows against the right rotation.
            let rows = row_errors(&eq, &right, cols);
            let first = rows.iter().position(|&e| e > 1e-4).map(|r| start + r);
            let at_pos: Vec<String> = [0, rows.len() / 4, rows.len() / 2, rows.len() - 1]
                .iter()
                .filter(|&&r| r < rows.len())
                .map(|&r| format!("{:.1e} at position {}", rows[r], start + r))
                .collect();
            ev.push(format!(
                "the engine's q_rope equals the reference's q rotated without the config's RoPE scaling ({}): rel-L2 {:.1e} \
                 to the unscaled rotation, {rel_right:.2e} to the scaled one",
                plan.rope.scaling.describe(),
                tensor_metrics(&eq, &unscaled).rel_l2
            ));
            ev.push(format!("the error grows with the position: {}", at_pos.join(", ")));
            let from = first.map(|p| format!(", from position {p}")).unwrap_or_default();
            return Some(finding(
                Diagnosis::RopeScaling,
                format!("RoPE scaling not applied: the engine rotates unscaled where the config says {}{from}", plan.rope.scaling.describe()),
                std::mem::take(ev),
            ));
        }
    }
    // The other layers' bases first (Gemma 3's local and global layers), then common ones.
    let plans = &engine.model.info().plan;
    let mut thetas: Vec<f64> = plans.iter().map(|p| p.rope.base).collect();
    thetas.extend([10_000.0, 100_000.0, 500_000.0, 1_000_000.0, 10_000_000.0]);
    let mut seen = vec![];
    for theta in thetas {
        if theta == base || seen.contains(&theta) {
            continue;
        }
        seen.push(theta);
        if let Some(other) = plans.iter().position(|p| p.rope.base == theta && p.span != plan.span) {
            let (inv, attn) = plans[other].rope.frequencies(start + seq, false);
            if close(&apply_rope(q, cols, cfg.head_dim, start, &inv, attn, false)) {
                let kind = |s: &lockstep_engine::plan::Span| match s {
                    lockstep_engine::plan::Span::Window(_) => "local (sliding-window)",
                    lockstep_engine::plan::Span::Global => "global",
                };
                let (this, that) = (kind(&plan.span), kind(&plans[other].span));
                ev.push(format!(
                    "the engine's q_rope equals the reference's q rotated with layer {other}'s RoPE (base {theta}, a {that} layer); \
                     this {this} layer's base is {base}"
                ));
                return Some(finding(
                    Diagnosis::RopeBase,
                    format!("RoPE base: a {this} layer rotates with the {that} layers' base {theta} instead of its own {base}"),
                    std::mem::take(ev),
                ));
            }
        }
        let (inv, attn) = lockstep_engine::RopePlan { base: theta, ..plan.rope.clone() }.frequencies(start + seq, false);
        if close(&apply_rope(q, cols, cfg.head_dim, start, &inv, attn, false)) {
            ev.push(format!(
                "the engine's q_rope equals the reference's q rotated with base theta = {theta} (the config says {})",
                base
            ));
            return Some(finding(Diagnosis::RopeBase, format!("RoPE base: theta {theta} instead of {}", base), std::mem::take(ev)));
        }
    }
    ev.push(format!("neither the other convention nor a common base reproduces it (rel-L2 to the right rotation {rel_right:.2e})"));
    None
}

fn attention_evidence(engine: &LoadedModel, k: &KeptStep, l: usize, at: &At, ev: &mut Vec<String>) -> Finding {
    let cfg = &engine.model.info().config;
    let name = format!("layers.{l}.attn");
    let reference = arr(k, &name);
    // The engine's attention on the reference's input and cache (isolation).
    let mut cap = Capture::new();
    let input = sites::layer_input(l);
    let (Some((rs, r)), Some(x)) = (reference, arr(k, &input)) else {
        return finding(Diagnosis::Attention, "the attention output differs", std::mem::take(ev));
    };
    let xt = Tensor::from_vec(x.1.clone(), x.0.as_slice(), &Device::Cpu).expect("kept shape");
    if let Err(why) = before_cache(engine, k, l) {
        ev.push(why);
        return finding(Diagnosis::Attention, "the attention output differs", std::mem::take(ev));
    }
    let kv = cache_before(engine, k, l);
    let ok = engine.model.isolate_layer(l, at.total - at.fed, &xt, kv, &mut cap).is_ok();
    let e = cap.entries.iter().find(|(n, _)| *n == name).and_then(|(_, t)| t.flatten_all().ok()?.to_vec1::<f32>().ok());
    // An engine that cannot run one layer alone: its own output of the step, computed from
    // inputs that pass (the dataflow rule that led here).
    let (e, ok) = match (e, ok, &k.engine_site) {
        (Some(e), true, _) => (Some(e), true),
        (_, _, Some((shape, v))) if at.inputs_pass() && shape == rs => {
            ev.push(format!("the engine cannot run layer {l} alone: its own `attn` of this step is used, computed from inputs that pass"));
            (Some(v.clone()), true)
        }
        _ => (None, false),
    };
    let (Some(e), true) = (e, ok) else {
        return finding(Diagnosis::Attention, "the attention output differs", std::mem::take(ev));
    };
    let cols = *rs.last().unwrap_or(&1);
    if let Some(f) = window_evidence(engine, k, l, &e, r, ev) {
        return f;
    }
    let rows = row_errors(&e, r, cols);
    let n = rows.len();
    if n > 1 && rows[n - 1] < 1e-4 && rows[..n - 1].iter().any(|&x| x > 1e-2) {
        let bad: Vec<usize> = (0..n - 1).filter(|&i| rows[i] > 1e-2).collect();
        ev.push(format!(
            "the last position matches (rel-L2 {:.1e}) and {} earlier positions differ: earlier positions see later ones",
            rows[n - 1],
            bad.len()
        ));
        return finding(Diagnosis::AttentionMask, "attention mask: the prefill is not causal", std::mem::take(ev));
    }
    // Per query head.
    let hd = cfg.head_dim;
    let heads = cols / hd;
    let per_head: Vec<f64> = (0..heads)
        .map(|h| {
            let a: Vec<f32> = e.chunks(cols).flat_map(|row| row[h * hd..(h + 1) * hd].to_vec()).collect();
            let b: Vec<f32> = r.chunks(cols).flat_map(|row| row[h * hd..(h + 1) * hd].to_vec()).collect();
            tensor_metrics(&a, &b).rel_l2
        })
        .collect();
    let good: Vec<usize> = (0..heads).filter(|&h| per_head[h] < 1e-4).collect();
    let bad: Vec<usize> = (0..heads).filter(|&h| per_head[h] >= 1e-2).collect();
    if !good.is_empty() && !bad.is_empty() && cfg.num_kv_heads < cfg.num_heads {
        ev.push(format!(
            "query heads {} match and heads {} differ ({} query heads share {} KV heads): a query head reads the wrong KV head",
            fmt_list(&good),
            fmt_list(&bad),
            cfg.num_heads,
            cfg.num_kv_heads
        ));
        return finding(Diagnosis::GqaMapping, "GQA head mapping: query heads are served by the wrong KV heads", std::mem::take(ev));
    }
    ev.push(format!("per-head rel-L2: {}", per_head.iter().map(|x| format!("{x:.1e}")).collect::<Vec<_>>().join(" ")));
    finding(Diagnosis::Attention, "the attention (scores, softmax or mask) differs", std::mem::take(ev))
}

/// A sliding-window layer's attention recomputed from the reference's q_rope, k_rope, v and its
/// cache before the step over other spans than the config's window `w`: `w` itself (which must
/// give the reference's output: the recomputation is checked), `w + 1`, `w - 1` and every
/// position. The span that gives the engine's output (on the reference's input, by isolation)
/// is the finding; none: `None`, and the distances are evidence.
fn window_evidence(engine: &LoadedModel, k: &KeptStep, l: usize, e: &[f32], r: &[f32], ev: &mut Vec<String>) -> Option<Finding> {
    use lockstep_engine::blocks::{attention, HeadMapping, Mask};
    let w = crate::lockstep::step::Windows::of_model(&engine.path).0.get(l).copied().flatten()?;
    let before = before_cache(engine, k, l).ok()?;
    let tensor = |name: &str| arr(k, name).and_then(|(s, v)| Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).ok());
    let (q, kr) = (tensor(&format!("layers.{l}.q_rope"))?, tensor(&format!("layers.{l}.k_rope"))?);
    let (nh, seq, hd) = q.dims3().ok()?;
    let nkv = kr.dims3().ok()?.0;
    let v = tensor(&format!("layers.{l}.v"))?.reshape((seq, nkv, hd)).ok()?.transpose(0, 1).ok()?.contiguous().ok()?;
    let (mut keys, mut values, mut n_before) = (kr, v, 0);
    if let Some((bk, bv)) = before {
        n_before = bk.dims()[1];
        keys = Tensor::cat(&[bk, keys], 1).ok()?;
        values = Tensor::cat(&[bv, values], 1).ok()?;
    }
    let before = n_before;
    let scale = engine.model.info().config.attn_scale();
    let span = |mask: Mask| -> Option<Vec<f32>> {
        let out = attention(&q, &keys, &values, mask, scale, HeadMapping::Grouped).ok()?;
        out.transpose(0, 1).ok()?.contiguous().ok()?.reshape((seq, nh * hd)).ok()?.flatten_all().ok()?.to_vec1().ok()
    };
    let window = |w: usize| span(Mask::Window { offset: before, w });
    let right = tensor_metrics(&window(w)?, r).rel_l2;
    if right > 1e-4 {
        ev.push(format!("attention over the window of {w} recomputed from the reference's q_rope, k_rope and v differs from its output (rel-L2 {right:.1e}): not tested further"));
        return None;
    }
    // The spans tried: (what, positions seen by the step's last query).
    let last = before + seq; // keys the last query may see
    let cands = [
        ("every position (the window ignored)", span(Mask::Causal { offset: before })?, last),
        ("a window of w + 1 (the query's own position not counted, as FlashAttention's left size)", window(w + 1)?, (w + 1).min(last)),
        ("a window of w - 1", window(w.saturating_sub(1).max(1))?, w.saturating_sub(1).max(1).min(last)),
    ];
    let d: Vec<f64> = cands.iter().map(|(_, out, _)| tensor_metrics(e, out).rel_l2).collect();
    let hits: Vec<usize> = (0..cands.len()).filter(|&i| d[i] < 1e-4).collect();
    let show = |what: &str| what.replace("w + 1", &(w + 1).to_string()).replace("w - 1", &(w - 1).to_string());
    match hits.as_slice() {
        [] => {
            ev.push(format!(
                "layer {l} has a window of {w}: no other span reproduces the engine (rel-L2 to every position, {}, {}: {:.1e}, {:.1e}, {:.1e})",
                w + 1,
                w - 1,
                d[0],
                d[1],
                d[2]
            ));
            None
        }
        [i] => {
            ev.push(format!(
                "the engine's attention at layer {l} is attention over {} (rel-L2 {:.1e}); over the config's \
                 window of {w} it is the reference's (rel-L2 {right:.1e})",
                show(cands[*i].0),
                d[*i]
            ));
            let title = match i {
                0 => format!("sliding window ignored: layer {l} attends over every position, its window is {w}"),
                _ => format!("sliding window off by one: layer {l} attends over {} positions, its window is {w}", cands[*i].2),
            };
            Some(finding(Diagnosis::SlidingWindow, title, std::mem::take(ev)))
        }
        many => {
            // At the first position past the window, every position and w + 1 are the same span.
            let n = cands[many[0]].2;
            ev.push(format!(
                "the engine's attention at layer {l} is attention over {} (rel-L2 {}): here they are the same \
                 {n} positions; over the config's window of {w} it is the reference's (rel-L2 {right:.1e})",
                many.iter().map(|&i| show(cands[i].0)).collect::<Vec<_>>().join(" and over "),
                many.iter().map(|&i| format!("{:.1e}", d[i])).collect::<Vec<_>>().join(", ")
            ));
            Some(finding(
                Diagnosis::SlidingWindow,
                format!("sliding window ignored or one too wide: layer {l} attends over {n} positions, its window is {w}"),
                std::mem::take(ev),
            ))
        }
    }
}

fn norm_evidence(engine: &LoadedModel, k: &KeptStep, l: usize, at: &At, ev: &mut Vec<String>) -> Finding {
    // The engine's norm on the reference's input (a norm that reads one site): a per-row
    // scale-only error is epsilon.
    let name = at.site.site.clone();
    let input = match at.graph.get(&name).map(|s| s.reads.as_slice()) {
        Some([one]) => one.clone(),
        _ => String::new(),
    };
    let mut ratio = None;
    if let (Some((rs, r)), Some(x)) = (arr(k, &name), arr(k, &input)) {
        let mut cap = Capture::new();
        let xt = Tensor::from_vec(x.1.clone(), x.0.as_slice(), &Device::Cpu).expect("kept shape");
        // A norm reads no cache and no position: the layer alone, at position 0.
        if engine.model.isolate_layer(l, 0, &xt, None, &mut cap).is_ok() {
            if let Some(e) = cap.entries.iter().find(|(n, _)| *n == name).and_then(|(_, t)| t.flatten_all().ok()?.to_vec1::<f32>().ok()) {
                if let Some(d) = norm_offset_evidence(engine, &e, r, x, rs, ev) {
                    return d;
                }
                let cols = *rs.last().unwrap_or(&1);
                let (mut lo, mut hi, mut cos_min) = (f64::INFINITY, 0f64, 1f64);
                for (a, b) in e.chunks(cols).zip(r.chunks(cols)) {
                    let m = tensor_metrics(a, b);
                    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    let q = na / nb.max(1e-30);
                    lo = lo.min(q);
                    hi = hi.max(q);
                    cos_min = cos_min.min(m.cosine);
                }
                ratio = Some((lo, hi, cos_min));
            }
        }
    }
    match ratio {
        Some((lo, hi, c)) if c > 0.99999 && (hi - 1.0).abs().max((1.0 - lo).abs()) > 1e-5 => {
            ev.push(format!(
                "every position differs by a scale factor only (engine/reference norm ratio {lo:.6}..{hi:.6}, cosine >= {c:.7}): \
                 the normalisation's epsilon differs"
            ));
            finding(Diagnosis::NormEpsilon, "RMSNorm epsilon differs", std::mem::take(ev))
        }
        Some((_, _, c)) => {
            ev.push(format!("per-position cosine down to {c:.5}: not a scale-only difference"));
            finding(Diagnosis::Norm, "the normalisation (weights or formula) differs", std::mem::take(ev))
        }
        None => finding(Diagnosis::Norm, "the normalisation differs", std::mem::take(ev)),
    }
}

/// A norm whose weight is off by exactly one (Gemma's `1 + w` applied to a weight that holds
/// it, or not applied): the engine's output minus the reference's is the input RMS-normalized
/// with a unit weight, `x / sqrt(mean(x^2) + eps)`, row by row (to 1e-3): take that one unit
/// of weight away and the computation matches.
fn norm_offset_evidence(engine: &LoadedModel, e: &[f32], r: &[f32], x: &(Vec<usize>, Vec<f32>), rs: &[usize], ev: &mut Vec<String>) -> Option<Finding> {
    let cols = *rs.last()?;
    if x.0 != rs || e.len() != r.len() || x.1.len() != r.len() || cols == 0 {
        return None;
    }
    let eps = engine.model.info().config.rms_norm_eps;
    let unit: Vec<f32> = x
        .1
        .chunks(cols)
        .flat_map(|row| {
            let inv = 1.0 / (row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / cols as f64 + eps).sqrt();
            row.iter().map(move |v| (*v as f64 * inv) as f32)
        })
        .collect();
    let diff: Vec<f32> = e.iter().zip(r).map(|(a, b)| a - b).collect();
    let neg: Vec<f32> = unit.iter().map(|v| -v).collect();
    for (plus, cand) in [(true, &unit), (false, &neg)] {
        let rel = tensor_metrics(&diff, cand).rel_l2;
        if rel < 1e-3 {
            ev.push(format!(
                "the engine's output minus the reference's is the input normalized with a unit weight (rel-L2 {rel:.1e}): the engine's \
                 norm weight is the reference's {} one",
                if plus { "plus" } else { "minus" }
            ));
            let title = match plus {
                true => "norm weight off by one: 1 + w applied to a weight that already holds the one (a GGUF stores w + 1)",
                false => "norm weight off by one: the weight used as stored where the model multiplies by 1 + w",
            };
            return Some(finding(Diagnosis::NormOffset, title, std::mem::take(ev)));
        }
    }
    None
}

/// One screen for a person.
pub fn render(rep: &BisectReport, model: &str, references: &str) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "lockstep bisect: {model} vs {references}");
    if !rep.faults_injected.is_empty() {
        let _ = writeln!(o, "  FAULTS injected into the engine: {}", rep.faults_injected.join(", "));
    }
    let _ = writeln!(o, "  {} of {} steps run in {:.1} s", rep.steps_run, rep.steps_requested, rep.seconds);
    if !rep.found {
        let _ = writeln!(o, "\nnothing found: every step, layer and site within its bounds");
        return o;
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "  first divergent step  {}", rep.step.map(|s| s.to_string()).unwrap_or("-".into()));
    let _ = writeln!(
        o,
        "  first failing site    {}{} (vs {})",
        rep.site.as_deref().unwrap_or("-"),
        rep.layer.map(|l| format!(", layer {l}")).unwrap_or_default(),
        rep.reference.as_deref().unwrap_or("-")
    );
    if let Some(d) = &rep.detail {
        let line = format!("                        {d}");
        let _ = writeln!(o, "{}", crate::ui::get().width.map(|w| crate::ui::wrap(&line, w, 24)).unwrap_or(line));
    }
    if let Some(i) = &rep.isolation {
        let worst = i.sites.iter().filter(|s| s.rel_l2.is_finite()).map(|s| s.rel_l2).fold(0.0, f64::max);
        let _ = writeln!(
            o,
            "  isolation             layer {} on the reference's input and cache: {}{}",
            i.layer,
            if i.verdict == "local" { "FAILS -> the cause is in this layer" } else { "passes -> the error is inherited" },
            match &i.first_failing_site {
                Some(s) => format!(" (first at {s})"),
                None => format!(" (worst rel-L2 {worst:.1e})"),
            }
        );
    }
    if let Some(d) = &rep.diagnosis {
        let _ = writeln!(o, "\n  diagnosis: {} [{}]", d.title, d.kind);
        for e in &d.evidence {
            let line = format!("    - {e}");
            let _ = writeln!(o, "{}", crate::ui::get().width.map(|w| crate::ui::wrap(&line, w, 6)).unwrap_or(line));
        }
    }
    o
}

/// One line: what bisect found (what `--quiet` prints).
pub fn verdict_line(rep: &BisectReport) -> String {
    if !rep.found {
        return format!("bisect: nothing found in {} of {} steps", rep.steps_run, rep.steps_requested);
    }
    format!(
        "bisect: step {}, {}site `{}` (vs {}){}",
        rep.step.map(|s| s.to_string()).unwrap_or("-".into()),
        rep.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
        rep.site.as_deref().unwrap_or("-"),
        rep.reference.as_deref().unwrap_or("-"),
        rep.diagnosis.as_ref().map(|d| format!(": {} [{}]", d.title, d.kind)).unwrap_or_default()
    )
}

/// For `lockstep faults --check`: does a bisect report match a catalog entry?
pub fn matches_catalog(
    rep: &BisectReport,
    info: &lockstep_engine::faults::FaultInfo,
    injected_layer: usize,
    (first_window, first_global): (Option<usize>, Option<usize>),
    quant_embed: bool,
) -> bool {
    use lockstep_engine::faults::Layer;
    let Some(d) = &rep.diagnosis else { return false };
    let want_layer = match info.layer {
        Layer::None => None,
        Layer::First => Some(0),
        Layer::Injected => Some(injected_layer),
        Layer::FirstWindow => first_window,
        Layer::FirstGlobal => first_global,
    };
    let site_leaf = rep.site.as_deref().map(leaf_of).unwrap_or("");
    // q4_1-min enters at the first Q4_1 matrix: the embedding itself when it is Q4_1.
    let (want_site, want_layer) = if quant_embed && info.site == "q" { ("embed", None) } else { (info.site, want_layer) };
    rep.step == Some(info.step) && rep.layer == want_layer && site_leaf == want_site && d.kind == info.diagnosis
}
