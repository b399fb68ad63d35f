//! Sampler parity: at a step, the engine's processed distribution (after every filter of
//! [`lockstep_engine::sample`]) against the distribution a reference's own sampling code
//! (`references/sampling.py`: transformers' logits processors, `mlx_lm.sample_utils`)
//! produces from the **same** logits (the engine's) and the same previous tokens.
//!
//! Each reference declares the order of its stages and its repetition-penalty window
//! (`generation_config()["order"]`, `["rep_window"]`); the engine is run in that order for
//! the comparison, so the check is of the filters themselves. Which order the engine
//! samples its own tokens in is its `--sampler order=` (the generation-config table shows
//! where that differs from a reference). Metrics: total-variation distance and equality of
//! the kept-token sets; verdicts use [`crate::compare::tolerance::SAMPLER_TV_PASS`] and
//! [`crate::compare::tolerance::SAMPLER_BOUNDARY_SLACK`].

use lockstep_engine::sample::{self, Order, SamplerConfig, Stage};
use numpy::{PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::HarnessError;
use crate::checks::genconfig::params_json;
use crate::results::checks::SamplerCheck;
use crate::reference::pycall::{py_err};
use crate::reference::{Capability, Reference};
use crate::compare::tolerance::{Verdict, SAMPLER_TV_BOUNDARY, SAMPLER_TV_PASS};

/// The engine order that reproduces a reference's declared stage list (the stages it runs,
/// in order) and repetition window. Stages it does not run are appended (inactive anyway).
pub fn reference_order(name: &str, declared: &[String], rep_window: Option<usize>) -> Result<Order, HarnessError> {
    let mut stages = vec![];
    for s in declared {
        let st = Stage::parse(s).ok_or_else(|| {
            HarnessError::Python(format!("the {name} reference declares an unknown sampler stage `{s}` in its order"))
        })?;
        if !stages.contains(&st) {
            stages.push(st);
        }
    }
    for st in Stage::ALL {
        if !stages.contains(&st) {
            stages.push(st);
        }
    }
    Ok(Order { name: name.to_string(), stages, rep_window })
}


/// Whether a reference can run its sampler on given logits.
pub fn supports(r: &Reference) -> bool {
    r.can(Capability::Sampler)
}

/// The reference's processed distribution of `logits` after `prev`.
pub fn reference_distribution(r: &Reference, logits: &[f32], prev: &[u32], cfg: &SamplerConfig) -> Result<Vec<f64>, HarnessError> {
    Python::attach(|py| {
        let arr = PyArray1::from_slice(py, logits);
        let prev = PyList::new(py, prev.iter().copied()).map_err(|e| py_err(py, e, "building arguments"))?;
        let params = PyDict::new(py);
        for (k, v) in params_json(cfg).as_object().expect("an object") {
            params.set_item(k, crate::reference::pycall::to_py(py, v).map_err(|e| py_err(py, e, "building arguments"))?)
                .map_err(|e| py_err(py, e, "building arguments"))?;
        }
        let obj = r.object().ok_or_else(|| HarnessError::Usage(format!("{} is a recorded trace: it cannot run a sampler", r.name)))?;
        let out = obj
            .bind(py)
            .call_method1("sample_distribution", (arr, prev, params))
            .map_err(|e| py_err(py, e, format!("{}.sample_distribution()", r.name)))?;
        let a = out.cast::<PyArray1<f64>>().map_err(|_| {
            HarnessError::Python(format!("{}.sample_distribution() did not return a float64 numpy vector", r.name))
        })?;
        let ro = a.try_readonly().map_err(|e| HarnessError::Python(format!("{}: {e}", r.name)))?;
        if ro.len() != logits.len() {
            return Err(HarnessError::Mismatch(format!(
                "{}.sample_distribution() returned {} probabilities for {} logits",
                r.name,
                ro.len(),
                logits.len()
            )));
        }
        Ok(ro.as_slice().map_err(|e| HarnessError::Python(format!("{}: {e}", r.name)))?.to_vec())
    })
}

/// Compares two processed distributions; `engine` carries the engine's decision slack.
pub fn compare(reference: &str, engine: &sample::Processed, theirs: &[f64]) -> SamplerCheck {
    let tv = 0.5 * engine.probs.iter().zip(theirs).map(|(a, b)| (a - b).abs()).sum::<f64>();
    // Kept: a probability above KEPT_MIN on both sides. A float32 softmax underflows to 0
    // below ~1e-38 (e.g. at temperature 0.1) without any filter having dropped the token.
    let kept_of = |p: &[f64]| -> Vec<u32> { p.iter().enumerate().filter(|(_, &x)| x > KEPT_MIN).map(|(i, _)| i as u32).collect() };
    let kept_ref = kept_of(theirs);
    let kept_eng = kept_of(&engine.probs);
    let engine = &sample::Processed { kept: kept_eng, ..engine.clone() };
    let only = |a: &[u32], b: &[u32]| -> Vec<u32> { a.iter().filter(|x| b.binary_search(x).is_err()).take(8).copied().collect() };
    let only_engine = only(&engine.kept, &kept_ref);
    let only_reference = only(&kept_ref, &engine.kept);
    let kept_equal = only_engine.is_empty() && only_reference.is_empty();
    let tightest = engine.slack.iter().copied().min_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal));
    let order = if engine.stages.is_empty() {
        "argmax".to_string()
    } else {
        engine.stages.iter().map(|s| s.name()).collect::<Vec<_>>().join(" > ")
    };
    // Every token kept by one side only, against the engine's boundary tokens.
    let differing: Vec<u32> = engine
        .kept
        .iter()
        .filter(|x| kept_ref.binary_search(x).is_err())
        .chain(kept_ref.iter().filter(|x| engine.kept.binary_search(x).is_err()))
        .copied()
        .collect();
    let (verdict, note) = if kept_equal && tv <= SAMPLER_TV_PASS {
        (Verdict::Pass, None)
    } else if kept_equal {
        (Verdict::Fail, Some(format!("same kept tokens, but TV {tv:.2e} > {SAMPLER_TV_PASS:.0e}: the weights differ (temperature or penalty)")))
    } else {
        let what = format!(
            "kept sets differ: engine {} tokens, {reference} {}; only engine {:?}, only {reference} {:?}",
            engine.kept.len(),
            kept_ref.len(),
            only_engine,
            only_reference
        );
        let on_boundary: Vec<&sample::Boundary> =
            differing.iter().filter_map(|t| engine.boundary.iter().find(|b| b.token == *t)).collect();
        // Exact ties with the k-th score: transformers (and the engine) keep every tie,
        // mlx-lm's argpartition keeps exactly k of them, whichever it lands on.
        let ties_only = on_boundary.iter().all(|b| b.stage == Stage::TopK && b.slack == 0.0);
        if on_boundary.len() == differing.len() && (tv <= SAMPLER_TV_BOUNDARY || ties_only) {
            let worst = on_boundary.iter().map(|b| b.slack / b.bound).fold(0.0, f64::max);
            let stages: Vec<&str> = on_boundary.iter().map(|b| b.stage.name()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            (
                Verdict::Drift,
                Some(if ties_only {
                    format!("{what}: all {} tied with the k-th score (top-k keeps every tie here, exactly k there)", differing.len())
                } else {
                    format!(
                        "{what}: all {} on the {} boundary within float32 rounding (slack <= {:.0}% of the bound)",
                        differing.len(),
                        stages.join("/"),
                        100.0 * worst
                    )
                }),
            )
        } else {
            (Verdict::Fail, Some(what))
        }
    };
    SamplerCheck {
        reference: reference.to_string(),
        order,
        tv,
        kept_engine: engine.kept.len(),
        kept_reference: kept_ref.len(),
        kept_equal,
        only_engine,
        only_reference,
        tightest,
        verdict,
        note,
        explained: None,
    }
}

/// A token counts as kept when its probability is above this (far below anything that
/// matters for sampling, far above float32's underflow at ~1e-38..1e-45).
pub const KEPT_MIN: f64 = 1e-30;

/// One reference's sampler, set up for a run.
pub struct RefSampler {
    /// Index of the reference in the run.
    pub index: usize,
    /// The engine configured in this reference's order.
    pub engine_cfg: SamplerConfig,
}

/// For every reference that supports it: the engine configuration in its order (from its
/// `generation_config`). References without a sampler are listed in the second vector.
pub fn setup(refs: &[Reference], cfg: &SamplerConfig, declared: &[Option<(Vec<String>, Option<usize>)>]) -> Result<(Vec<RefSampler>, Vec<String>), HarnessError> {
    let mut out = vec![];
    let mut without = vec![];
    for (i, r) in refs.iter().enumerate() {
        match (&declared[i], supports(r)) {
            (Some((stages, window)), true) => {
                let order = reference_order(&r.name, stages, *window)?;
                out.push(RefSampler { index: i, engine_cfg: cfg.with_order(order) });
            }
            _ => without.push(r.name.clone()),
        }
    }
    Ok((out, without))
}

/// Which simple slip of the sampler's configuration reproduces the engine's processed
/// distribution (TV <= [`SAMPLER_TV_PASS`], same kept set) from the same logits, when the
/// references' own samplers disagree with it: the temperature inverted, not applied or
/// applied twice, or the stages in another library's order (`orders`: [`library_orders`]).
/// `None`: no hypothesis fits.
pub fn explain(
    logits: &[f32],
    prev: &[u32],
    cfg: &SamplerConfig,
    engine: &sample::Processed,
    orders: &[Order],
) -> Result<Option<String>, HarnessError> {
    let nominal = SamplerConfig { invert_temperature: false, ..cfg.clone() };
    let t = nominal.temperature;
    let mut hyps: Vec<(SamplerConfig, String)> = vec![];
    if t > 0.0 && t != 1.0 {
        let at = |x: f64| SamplerConfig { temperature: x, ..nominal.clone() };
        hyps.push((at(1.0 / t), format!("the temperature is applied inverted: the engine samples as at temperature {:.4} = 1/{t} (logits x t instead of / t)", 1.0 / t)));
        hyps.push((at(1.0), format!("the temperature is not applied: the engine samples as at temperature 1, not {t}")));
        hyps.push((at(t * t), format!("the temperature is applied twice: the engine samples as at temperature {:.4} = {t}^2", t * t)));
    }
    for order in orders {
        if order.stages != nominal.order.stages {
            let why = format!("the filters run in {}'s order, not the reference's", order.name);
            hyps.push((nominal.with_order(order.clone()), why));
        }
    }
    for (h, why) in hyps {
        let p = sample::process(logits, prev, &h)?;
        let tv = 0.5 * p.probs.iter().zip(&engine.probs).map(|(a, b)| (a - b).abs()).sum::<f64>();
        if tv <= SAMPLER_TV_PASS && p.kept == engine.kept {
            return Ok(Some(format!("{why} (reproduces the engine's distribution: TV {tv:.1e})")));
        }
    }
    Ok(None)
}

/// The whole filter chain of every reference library that declares a sampler
/// (`sampler_order`, `sampler_rep_window`), named by the reference, in
/// [`crate::reference::REFERENCES`] order: from a loaded reference's description, else from its
/// module's declaration (a module that cannot be imported is left out).
pub fn library_orders(refs: &[Reference]) -> Result<Vec<Order>, HarnessError> {
    let mut out = vec![];
    for (name, module) in crate::reference::REFERENCES {
        let loaded = refs.iter().find(|r| r.description.name == *name && r.description.declares(Capability::Sampler));
        let (stages, window) = match loaded {
            Some(r) => (r.description.sampler_order.clone(), r.description.sampler_rep_window),
            None => match crate::reference::python::declaration(module, name) {
                Ok(d) if d.declares(Capability::Sampler) => (d.sampler_order, d.sampler_rep_window),
                _ => continue,
            },
        };
        out.push(reference_order(name, &stages, window)?);
    }
    Ok(out)
}

/// All checks of one step.
pub fn check_step(
    refs: &[Reference],
    samplers: &[RefSampler],
    logits: &[f32],
    prev: &[u32],
) -> Result<Vec<SamplerCheck>, HarnessError> {
    let mut out = vec![];
    for s in samplers {
        let r = &refs[s.index];
        let engine = sample::process(logits, prev, &s.engine_cfg)?;
        let theirs = reference_distribution(r, logits, prev, &s.engine_cfg)?;
        let mut c = compare(&r.name, &engine, &theirs);
        if c.verdict == Verdict::Fail {
            c.explained = explain(logits, prev, &s.engine_cfg, &engine, &library_orders(refs)?)?;
        }
        out.push(c);
    }
    Ok(out)
}

/// For a chat prompt: the engine's rendered template, and per reference that can render
/// one, where its text differs (None: identical). Plain prompts: nothing.
pub fn rendered_prompts(
    engine: &lockstep_engine::LoadedModel,
    refs: &[Reference],
    prompt: &crate::lockstep::options::Prompt,
) -> Result<(Option<String>, Vec<(String, Option<crate::results::checks::TextDiff>)>), HarnessError> {
    let crate::lockstep::options::Prompt::Chat(user) = prompt else { return Ok((None, vec![])) };
    let msgs = [lockstep_engine::ChatMessage::user(user.clone())];
    let ours = engine.tokenizer.render_chat(&msgs, true)?;
    let mut diffs = vec![];
    for r in refs.iter().filter(|r| r.can(Capability::ChatRender)) {
        let Some(o) = r.object() else { continue };
        let theirs = crate::reference::pycall::call_str(o, &r.name, "render_chat", &[serde_json::json!(msgs), serde_json::json!(true)])?;
        diffs.push((r.name.clone(), crate::checks::tokcheck::text_diff(&r.name, &ours, &theirs)));
    }
    Ok((Some(ours), diffs))
}

/// The run's sampler summary for the report.
pub fn info(
    cfg: &SamplerConfig,
    refs: &[Reference],
    samplers: &[RefSampler],
    without: &[String],
    steps: &[crate::results::run::StepRecord],
) -> crate::results::run::SamplerInfo {
    let summary = samplers
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let checks = steps.iter().filter_map(|st| st.sampler.get(k));
            let max_tv = checks.clone().map(|c| c.tv).fold(0.0, f64::max);
            let equal = checks.clone().filter(|c| c.kept_equal).count();
            (refs[s.index].name.clone(), max_tv, equal, checks.count())
        })
        .collect();
    crate::results::run::SamplerInfo {
        engine: cfg.describe(),
        compared: samplers.iter().map(|s| refs[s.index].name.clone()).collect(),
        not_compared: without.to_vec(),
        summary,
    }
}

// --- report sections (called from report.rs) ----------------------------------------------------

use std::fmt::Write as _;

/// Before the step table: the generation-config table and any chat-template text difference.
pub fn render_prelude(r: &crate::results::run::RunResult) -> String {
    let mut o = String::new();
    if let Some(s) = &r.sampler {
        let _ = writeln!(o, "  sampler    engine {}", s.engine);
    }
    for (name, d) in &r.prompt.rendered_diff {
        match d {
            None => {
                let _ = writeln!(o, "  template   {name} renders the same chat text");
            }
            Some(d) => {
                let _ = writeln!(
                    o,
                    "  template   {name} renders OTHER chat text, from char {}: engine {:?} vs {name} {:?}",
                    d.char_index, d.engine, d.theirs
                );
            }
        }
    }
    let _ = writeln!(o);
    o.push_str(&crate::checks::genconfig::render(&r.config));
    o
}

fn show_ids(ids: &[u32], pieces: Option<&Vec<String>>) -> String {
    ids.iter()
        .enumerate()
        .map(|(k, id)| match pieces.and_then(|p| p.get(k)) {
            Some(p) => format!("{id} {p:?}"),
            None => id.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A run stopped before step 0: why, both token sequences, the verdict.
pub fn render_stopped(r: &crate::results::run::RunResult) -> String {
    let mut o = String::new();
    let reason = r.stopped_before_step0.as_deref().unwrap_or("");
    let _ = writeln!(o, "\nstopped before step 0: {reason}; nothing was fed to any model.");
    let p = &r.prompt;
    if !p.ids_match {
        let pieces = |name: &str| p.pieces.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let _ = writeln!(o, "  engine ({} tokens): {}", p.engine_ids.len(), show_ids(&p.engine_ids, pieces("engine")));
        for (name, ids) in &p.reference_ids {
            let same = *ids == p.engine_ids;
            let _ = writeln!(
                o,
                "  {name} ({} tokens{}): {}",
                ids.len(),
                if same { ", same" } else { "" },
                if same { "=".to_string() } else { show_ids(ids, pieces(name)) }
            );
            if let Some(i) = crate::checks::tokcheck::first_difference(&p.engine_ids, ids) {
                let _ = writeln!(
                    o,
                    "    first difference at token {i}: engine {:?}, {name} {:?}",
                    p.engine_ids.get(i),
                    ids.get(i)
                );
            }
        }
    }
    if let Some(dv) = &r.first_divergence {
        let _ = writeln!(
            o,
            "\nverdict: DIVERGED at step 0, site `{}`{}: {}",
            dv.site,
            if dv.reference.is_empty() { String::new() } else { format!(" (vs {})", dv.reference) },
            dv.detail
        );
        if let Some(c) = &dv.likely_cause {
            let _ = writeln!(o, "  likely cause: {c}");
        }
    }
    o
}

/// After the step table: sampler parity per step and over the run.
pub fn render_steps(r: &crate::results::run::RunResult) -> String {
    let mut o = String::new();
    let Some(info) = &r.sampler else { return o };
    if info.compared.is_empty() {
        let _ = writeln!(
            o,
            "\nsampler parity: no reference can run its sampler on given logits ({}): not compared",
            info.not_compared.join(", ")
        );
        return o;
    }
    let orders: Vec<String> = (0..info.compared.len())
        .map(|k| r.steps.iter().find_map(|s| s.sampler.get(k)).map(|c| c.order.clone()).unwrap_or_default())
        .collect();
    let _ = writeln!(
        o,
        "\nsampler parity: the engine's processed distribution vs each reference's own sampling code on the engine's logits"
    );
    let cw: Vec<usize> = info.compared.iter().zip(&orders).map(|(n, ord)| (n.len() + ord.len() + 3).max(30)).collect();
    let mut h = format!("{:>4}  {:<14}", "step", "token");
    for (k, n) in info.compared.iter().enumerate() {
        h.push_str(&format!("  {:<w$}", format!("{n} ({})", orders[k]), w = cw[k]));
    }
    let _ = writeln!(o, "{}", h.trim_end());
    for st in &r.steps {
        let tok = format!("{:?}", st.engine_token_text);
        let tok = if tok.chars().count() > 14 { format!("{}…\"", tok.chars().take(12).collect::<String>()) } else { tok };
        let mut line = format!("{:>4}  {:<14}", st.step, tok);
        for (k, c) in st.sampler.iter().enumerate() {
            let cell = format!(
                "TV {:.1e}  kept {}{}{}",
                c.tv,
                c.kept_engine,
                if c.kept_equal { " =" } else { &"≠" },
                if c.kept_equal { String::new() } else { format!("{}", c.kept_reference) }
            );
            let v = if c.verdict == Verdict::Pass { String::new() } else { format!(" [{}]", c.verdict.as_str()) };
            line.push_str(&format!("  {:<w$}", cell + &v, w = cw.get(k).copied().unwrap_or(30)));
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
    for (k, (name, max_tv, equal, n)) in info.summary.iter().enumerate() {
        let drift = r.steps.iter().filter_map(|s| s.sampler.get(k)).filter(|c| c.verdict == Verdict::Drift).count();
        let _ = writeln!(
            o,
            "  {name}: max TV {max_tv:.1e} (pass <= {SAMPLER_TV_PASS:.0e}), same kept tokens at {equal} of {n} steps{}",
            if drift > 0 {
                format!("; {drift} drift: the kept sets differ only by tokens within float32 rounding of a filter's threshold")
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        o,
        "  the references' own generate loops were not compared: the engine's draws come from its own generator"
    );
    if !info.not_compared.is_empty() {
        let _ = writeln!(o, "  not compared: {} (no sampler that runs on given logits)", info.not_compared.join(", "));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another library's declared filter chain is named when it reproduces the engine's
    /// distribution, and the chains the references declare are the engine's named orders.
    #[test]
    fn another_librarys_declared_order_explains_the_engine() {
        let logits: Vec<f32> = (0..200).map(|i| ((i * 7919) % 97) as f32 / 12.0).collect();
        let nominal = SamplerConfig::parse("temp=0.5,top_p=0.9").unwrap(); // transformers' order
        let engine = sample::process(&logits, &[], &nominal.with_order(Order::mlx())).unwrap();
        let why = explain(&logits, &[], &nominal, &engine, &[Order::transformers(), Order::mlx()]).unwrap();
        assert!(why.as_deref().is_some_and(|w| w.starts_with("the filters run in mlx's order")), "{why:?}");
        if crate::reference::python::ensure_python().is_ok() {
            assert_eq!(library_orders(&[]).unwrap(), vec![Order::transformers(), Order::mlx()]);
        }
    }
}
