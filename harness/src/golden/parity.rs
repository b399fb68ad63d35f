//! Replaying golden cases, and the parity summary that `cargo test` snapshots.
//!
//! [`replay_case`] runs the engine in lockstep with the traces of one manifest case (no
//! Python): the same driver, comparators and tolerances as `lockstep run`, with the
//! references' pairwise noise floor measured between the recorded traces. [`summary`]
//! turns the result into a small, stable text that a reviewer can read in a diff:
//!
//! - tokens fed at every step and the engine's choice;
//! - the engine's top-5 next-token ids with log-probs rounded to [`LOGPROB_DECIMALS`]
//!   decimals (0.01 nats), and whether each reference has the same top-5;
//! - per reference and step, the error of every layer in decades (one digit per layer:
//!   floor(-log10(worst rel-L2 of its sites)), the layer strip of `lockstep run`), of
//!   `embed`, `final_norm` and `logits`, and KL as a power of ten;
//! - verdicts (per step and reference; per layer when not all pass), the pairwise floor,
//!   the references' own generate, and the first divergence (step, layer, site).
//!
//! Rounding to decades and 0.01 nats keeps the summary stable under last-bit changes of
//! the engine's arithmetic, and makes any change of the math visible.

use std::fmt::Write as _;
use std::path::PathBuf;

use candle_core::{DType, IndexOp};
use lockstep_engine::LoadedModel;
use serde::Serialize;

use crate::lockstep::run as driver;
use crate::lockstep::options::{RunOptions};
use crate::results::run::{RefStep, RunResult, StepRecord, WorstSite};
use crate::error::HarnessError;
use crate::golden::manifest::Case;
use crate::compare::Data;
use crate::reference::SiteArrays;
use crate::reference::{RefSpec, Reference};
use crate::compare::tolerance::{Precision, SiteKind, Verdict};
use crate::golden::trace::{self, TraceMeta};

/// Log-probs in the summary are rounded to this many decimals (nats).
pub const LOGPROB_DECIMALS: usize = 2;
/// Top-k shown per step.
pub const TOP_K: usize = 5;

/// A replayed case: the run, its references, and its parity summary.
pub struct Replayed {
    pub name: String,
    pub opts: RunOptions,
    pub result: RunResult,
    pub refs: Vec<Reference>,
    pub model: PathBuf,
    pub sha256: String,
    pub summary: String,
    pub info: SnapshotInfo,
    /// What the replays noticed (the engine fed other tokens than were recorded).
    pub notes: Vec<String>,
}

/// Snapshot metadata (insta's `info:` header): the model hash and the reference versions.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub case: String,
    pub model: SnapshotModel,
    pub references: Vec<SnapshotRef>,
    pub lockstep_version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotModel {
    pub arg: String,
    pub file: String,
    pub sha256: String,
    pub weights: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRef {
    pub trace: String,
    pub reference: String,
    pub dtype: String,
    pub versions: std::collections::BTreeMap<String, String>,
    pub recorded_by: String,
}

/// Replays every trace of a manifest case.
pub fn replay_case(case: &Case) -> Result<Replayed, HarnessError> {
    replay_traces(&case.name, &case.trace_names())
}

/// Replays traces recorded together (same model, prompt and tokens) against the engine under
/// test, loaded from the model the traces were recorded from.
pub fn replay_traces(name: &str, traces: &[String]) -> Result<Replayed, HarnessError> {
    replay_with(name, traces, None)
}

/// As [`replay_traces`], against `engine` when given (a user's engine, already loaded).
pub fn replay_with(name: &str, traces: &[String], given: Option<&LoadedModel>) -> Result<Replayed, HarnessError> {
    let specs = traces.iter().map(|t| RefSpec::parse(&format!("trace:{t}"))).collect::<Result<Vec<_>, _>>()?;
    let metas = traces
        .iter()
        .map(|t| TraceMeta::read(&trace::trace_paths(t).0))
        .collect::<Result<Vec<_>, _>>()?;
    let first = &metas[0];
    for m in &metas[1..] {
        let same = m.model.sha256 == first.model.sha256
            && m.model.weights == first.model.weights
            && m.prompt.mode == first.prompt.mode
            && m.prompt.text == first.prompt.text
            && m.tokens_fed == first.tokens_fed
            && m.adapter.as_ref().map(|a| &a.sha256) == first.adapter.as_ref().map(|a| &a.sha256);
        if !same {
            return Err(HarnessError::Mismatch(format!(
                "traces `{}` and `{}` were not recorded together (model, prompt or tokens differ): re-record case `{name}`",
                first.name, m.name
            )));
        }
    }
    let model = trace::locate_model(&first.model)?;
    // The adapter the traces were recorded with (its sha256 is checked by each trace).
    let lora = first.adapter.as_ref().map(|a| crate::paths::data_dir().join(&a.path));
    let prompt = match first.prompt.mode.as_str() {
        "chat" => crate::lockstep::options::Prompt::Chat(first.prompt.text.clone()),
        _ => crate::lockstep::options::Prompt::Text(first.prompt.text.clone()),
    };
    let opts = RunOptions {
        engine: crate::plugin::EngineSpec::under_test(),
        model: model.clone(),
        references: specs.clone(),
        prompt,
        steps: first.steps,
        precision: Precision::F32,
        weights: first.weights_mode()?,
        bisect: false,
        faults: Default::default(),
        sampler: None,
        strict_config: false,
        lora: lora.clone().map(|dir| lockstep_engine::LoraOptions { dir, mode: lockstep_engine::LoraMode::Unmerged }),
        context: None,
        prefill_chunk: crate::lockstep::options::DEFAULT_PREFILL_CHUNK,
        max_memory: None,
    };
    let loaded;
    let engine = match given {
        Some(e) => e,
        None => {
            loaded = crate::lockstep::options::load_engine(&opts)?;
            &loaded
        }
    };
    let refs = specs.iter().map(|s| Reference::load_with_lora(s, &model, lora.as_deref())).collect::<Result<Vec<_>, _>>()?;
    let result = driver::run(&opts, engine, &refs)?;
    let sha256 = trace::model_sha256_cached(&model)?;
    let notes = refs.iter().filter_map(|r| r.replay()).flat_map(|r| r.notes()).collect();
    let summary = summary(name, &result, &refs, engine)?;
    let info = SnapshotInfo {
        case: name.to_string(),
        model: SnapshotModel {
            arg: first.model.arg.clone(),
            file: first.model.file.clone(),
            sha256: first.model.sha256.clone(),
            weights: first.model.weights.clone(),
        },
        references: metas
            .iter()
            .map(|m| SnapshotRef {
                trace: m.name.clone(),
                reference: m.reference.label.clone(),
                dtype: m.reference.dtype.clone(),
                versions: m.reference.versions.clone(),
                recorded_by: format!("lockstep {}", m.lockstep_version),
            })
            .collect(),
        lockstep_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok(Replayed { name: name.to_string(), opts, result, refs, model, sha256, summary, info, notes })
}

/// One character per decade of a relative error: floor(-log10(rel)) in 0..=9 (9 also for
/// zero), `?` for NaN.
pub fn decade(rel: f64) -> char {
    if rel.is_nan() {
        return '?';
    }
    let d = if rel <= 0.0 { 9.0 } else { (-rel.log10()).floor().clamp(0.0, 9.0) };
    char::from_digit(d as u32, 10).unwrap_or('?')
}

/// KL values under this are shown as `<1e-9`: f32 rounding alone moves them by decades
/// (the measured noise is 1e-13..1e-10), and the pass bound is 1e-6.
pub const KL_SHOWN_FROM: f64 = 1e-9;

/// A KL as a power of ten: `1e-7`, or `<1e-9` under [`KL_SHOWN_FROM`].
fn pow10(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x < KL_SHOWN_FROM {
        "<1e-9".into()
    } else {
        format!("1e{}", x.log10().floor() as i64)
    }
}

fn verdict_char(v: Verdict) -> char {
    match v {
        Verdict::Pass => '.',
        Verdict::Drift => '~',
        Verdict::Fail => '!',
    }
}

fn worst_decade(worst: &[WorstSite], kind: SiteKind) -> char {
    worst.iter().find(|w| w.kind == kind).map(|w| decade(w.rel_l2)).unwrap_or('-')
}

/// Top-k of a logit row as (id, log-prob), ties by lower id.
fn top_logprobs(row: &[f64], k: usize) -> Vec<(usize, f64)> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, row[i] - lse)).collect()
}

/// The engine's next-token top-k at each step of `result`, from a second engine pass over
/// the same tokens (teacher-forced, as in the run).
fn engine_top_k(engine: &LoadedModel, result: &RunResult) -> Result<Vec<Vec<(usize, f64)>>, HarnessError> {
    let mut cache = engine.model.new_cache();
    let mut out = vec![];
    for st in &result.steps {
        let logits = engine.model.forward(&st.fed, &mut cache, None)?;
        let n = logits.dim(0)?;
        let row: Vec<f64> = logits.i(n - 1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        out.push(top_logprobs(&row, TOP_K));
    }
    Ok(out)
}

/// The reference's top-k ids at the last position of step `n`, read from its trace.
fn reference_top_ids(r: &Reference, n: usize) -> Option<Vec<usize>> {
    let step = r.trace()?.steps.get(n)?;
    let (shape, d) = step.get("logits")?;
    let vocab = *shape.last()?;
    let rows = shape.first()?;
    let last = (rows - 1) * vocab..rows * vocab;
    let row: Vec<f64> = match d {
        Data::F32(x) => x[last].iter().map(|&v| v as f64).collect(),
        Data::F64(x) => x[last].to_vec(),
        Data::TopK(t) => t.last.clone(),
        Data::Sketch(_) | Data::TopKRow(..) => return None,
    };
    Some(top_logprobs(&row, TOP_K).into_iter().map(|(i, _)| i).collect())
}

fn escape_token(t: &str) -> String {
    format!("{t:?}")
}

/// The parity summary of a replayed (or live) run.
pub fn summary(name: &str, r: &RunResult, refs: &[Reference], engine: &LoadedModel) -> Result<String, HarnessError> {
    let mut o = String::new();
    let top = engine_top_k(engine, r)?;
    let width = refs.iter().map(|x| x.name.len()).max().unwrap_or(10);
    write_header(&mut o, name, r, refs);
    write_references(&mut o, refs, width);
    write_prompt(&mut o, r);
    write_legend(&mut o);
    for (st, tk) in r.steps.iter().zip(&top) {
        write_step(&mut o, r, refs, st, tk, width);
    }
    let _ = writeln!(o);
    write_totals(&mut o, r, width);
    let _ = writeln!(o);
    write_first_divergence(&mut o, r);
    write_first_non_pass(&mut o, r, refs, width);
    write_verdict(&mut o, r);
    Ok(o)
}

/// The title, the model (from the first trace) and the engine lines.
fn write_header(o: &mut String, name: &str, r: &RunResult, refs: &[Reference]) {
    let _ = writeln!(o, "parity summary of case `{name}`");
    if let Some(m) = refs.first().and_then(|x| x.trace()).map(|t| &t.meta) {
        let _ = writeln!(o, "model      {} = {} (weights {}), sha256 {}", m.model.arg, m.model.path, m.model.weights, m.model.sha256);
    }
    let _ = writeln!(
        o,
        "engine     {}, weights {} ({}: {}), {:?}, Q/K {}{}",
        r.engine.name,
        r.engine.weights,
        r.engine.weights_mode,
        r.engine.matrix_types.join(", "),
        r.engine.dtype,
        r.engine.qk_layout,
        if r.engine.transforms.is_empty() { String::new() } else { format!(" (compared through {})", r.engine.transforms.join(", ")) }
    );
}

/// One `reference` line per reference, and what its trace kept.
fn write_references(o: &mut String, refs: &[Reference], width: usize) {
    for x in refs {
        let d = &x.description;
        let others: Vec<String> = d.versions.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(o, "reference  {:<width$}  {} {} ({})", x.name, d.name, d.dtype, others.join(", "));
        if let Some(t) = x.trace() {
            let c = &t.meta.capture;
            let _ = writeln!(
                o,
                "           {:<width$}  kept: {} sites per step in full{}, {} as sketches",
                "",
                c.full_sites,
                match &c.full_layers {
                    None => " (every layer)".to_string(),
                    Some(l) => format!(" (logits, caches, embed, final_norm, layers {l:?})"),
                },
                c.sketched_sites
            );
        }
    }
}

/// The `prompt` line: mode, text, token count and whether the references' ids agree.
fn write_prompt(o: &mut String, r: &RunResult) {
    let p = &r.prompt;
    let _ = writeln!(
        o,
        "prompt     {} {:?}: {} tokens; reference ids {}",
        p.mode,
        p.text,
        p.engine_ids.len(),
        if p.ids_match { "agree".to_string() } else {
            p.reference_ids.iter().filter(|(_, ids)| *ids != p.engine_ids).map(|(n, _)| format!("{n} DIFFERS")).collect::<Vec<_>>().join(", ")
        }
    );
}

/// The legend of the per-step lines.
fn write_legend(o: &mut String) {
    let _ = writeln!(
        o,
        "legend     top-5: the engine's next-token log-probs, rounded to 0.{}1 nats; errors in decades: one digit =\n           \
         floor(-log10(rel-L2)), per layer its worst site (sketched layers: estimated), 9 = below 1e-9;\n           \
         KL(ref||engine) as a power of ten (max over the positions fed; <1e-9 is f32 noise); verdicts per layer: . pass ~ drift ! fail",
        "0".repeat(LOGPROB_DECIMALS - 1)
    );
}

/// One step: the tokens fed, the engine's choice and top-5, then a line per reference.
fn write_step(o: &mut String, r: &RunResult, refs: &[Reference], st: &StepRecord, tk: &[(usize, f64)], width: usize) {
    let _ = writeln!(o);
    let fed = if st.fed.len() == 1 { format!("{:?}", st.fed) } else { format!("{} tokens {:?}", st.fed.len(), st.fed) };
    let _ = writeln!(o, "step {}  fed {}  -> {} {}", st.step, fed, st.engine_token, escape_token(&st.engine_token_text));
    let cells: Vec<String> = tk.iter().map(|(i, lp)| format!("{i} {lp:.prec$}", prec = LOGPROB_DECIMALS)).collect();
    let _ = writeln!(o, "  top-5 {}", cells.join(" | "));
    let engine_ids: Vec<usize> = tk.iter().map(|(i, _)| *i).collect();
    for (k, rs) in st.references.iter().enumerate() {
        write_step_reference(o, r, &refs[k], st.step, rs, &engine_ids, width);
    }
}

/// One reference's line at one step (decades, KL, top-5), and its verdicts when not all pass.
fn write_step_reference(o: &mut String, r: &RunResult, rf: &Reference, step: usize, rs: &RefStep, engine_ids: &[usize], width: usize) {
    let dec = |site: &str| {
        rs.sites.iter().find(|x| x.site == site).map(|x| x.metrics.map(|m| decade(m.rel_l2)).unwrap_or('!')).unwrap_or('-')
    };
    let mut strip = String::new();
    let mut vstrip = String::new();
    for l in 0..r.num_layers {
        let sites: Vec<_> = rs.sites.iter().filter(|x| x.layer == Some(l)).collect();
        let worst = sites.iter().map(|x| x.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY)).fold(0.0, f64::max);
        strip.push(if sites.is_empty() { '-' } else { decade(worst) });
        vstrip.push(verdict_char(sites.iter().map(|x| x.verdict).max().unwrap_or(Verdict::Pass)));
    }
    let top_same = match reference_top_ids(rf, step) {
        Some(ids) if ids == engine_ids => "top-5 same".to_string(),
        Some(ids) => format!("top-5 {ids:?}"),
        None => "top-5 -".to_string(),
    };
    let _ = writeln!(
        o,
        "  {:<width$}  {:<5}  embed {} layers {} final_norm {} logits {}  KL {}  {}",
        rs.reference,
        rs.verdict.as_str(),
        dec("embed"),
        strip,
        dec("final_norm"),
        dec("logits"),
        pow10(rs.kl_max_positions),
        top_same
    );
    if rs.verdict != Verdict::Pass {
        let other = |site: &str| rs.sites.iter().find(|x| x.site == site).map(|x| verdict_char(x.verdict)).unwrap_or('-');
        let _ = writeln!(
            o,
            "  {:<width$}  {:<5}  embed {} layers {} final_norm {} logits {}",
            "",
            "",
            other("embed"),
            vstrip,
            other("final_norm"),
            verdict_char(rs.logits_verdict)
        );
    }
}

/// The run's totals: each reference's worst errors, the pairwise floors, their own generate.
fn write_totals(o: &mut String, r: &RunResult, width: usize) {
    let s = &r.summary;
    let _ = writeln!(o, "over {} steps (worst rel-L2 in decades):", s.steps);
    for rs in &s.references {
        let _ = writeln!(
            o,
            "  {:<width$}  {:<5}  activations {} caches {} logits {}  max KL {}  same top-1 {:.0}%  (judged as {})",
            rs.reference,
            rs.verdict.as_str(),
            worst_decade(&rs.worst_rel_l2, SiteKind::Activation),
            worst_decade(&rs.worst_rel_l2, SiteKind::Cache),
            worst_decade(&rs.worst_rel_l2, SiteKind::Logits),
            pow10(rs.max_kl),
            100.0 * rs.same_top1_share,
            serde_json::to_value(rs.mode).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        );
    }
    for pr in &s.pairs {
        let _ = writeln!(
            o,
            "  floor {} vs {}: activations {} caches {} logits {}  max KL {}  same top-1 {:.0}%",
            pr.a,
            pr.b,
            worst_decade(&pr.worst_rel_l2, SiteKind::Activation),
            worst_decade(&pr.worst_rel_l2, SiteKind::Cache),
            worst_decade(&pr.worst_rel_l2, SiteKind::Logits),
            pow10(pr.max_kl),
            100.0 * pr.same_top1_share
        );
    }
    for g in &r.generate {
        let _ = writeln!(
            o,
            "  generate {}: {}",
            g.reference,
            if g.matches {
                "identical tokens".to_string()
            } else {
                format!("first different token at {} [{}]", g.first_mismatch.unwrap_or(0), g.verdict.as_str())
            }
        );
    }
}

/// The `first divergence` line (step, layer, site, reference) and its likely cause.
fn write_first_divergence(o: &mut String, r: &RunResult) {
    match &r.first_divergence {
        None => {
            let _ = writeln!(o, "first divergence: none");
        }
        Some(d) => {
            let _ = writeln!(
                o,
                "first divergence: step {}, {}site `{}` (vs {}): {}",
                d.step,
                d.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
                d.site,
                d.reference,
                d.detail
            );
            if let Some(c) = &d.likely_cause {
                let _ = writeln!(o, "  likely cause: {c}");
            }
        }
    }
}

/// The `first non-pass site` lines: where each reference first leaves the pass band.
fn write_first_non_pass(o: &mut String, r: &RunResult, refs: &[Reference], width: usize) {
    // Drift included: a change of the engine's math shows here at the site where it
    // enters, even when it stays under the fail bound (or first fails further on).
    let _ = writeln!(o, "first non-pass site (forward order, drift included):");
    for (i, x) in refs.iter().enumerate() {
        let first = r.steps.iter().find_map(|st| {
            let rs = &st.references[i];
            if let Some(s) = rs.sites.iter().find(|s| s.verdict != Verdict::Pass) {
                let rel = s.metrics.map(|m| format!("rel-L2 decade {}", decade(m.rel_l2))).unwrap_or_else(|| "shape".into());
                return Some(format!(
                    "step {}, {}site `{}`: {}, {rel}",
                    st.step,
                    s.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
                    s.site,
                    s.verdict.as_str()
                ));
            }
            (rs.logits_verdict != Verdict::Pass)
                .then(|| format!("step {}, next-token distribution: {}, KL {}", st.step, rs.logits_verdict.as_str(), pow10(rs.logits.kl)))
        });
        let _ = writeln!(o, "  {:<width$}  {}", x.name, first.unwrap_or_else(|| "none".into()));
    }
}

/// The `verdict` line, then the sites each reference never compared.
fn write_verdict(o: &mut String, r: &RunResult) {
    let _ = writeln!(o, "verdict: {}", if r.verdict_pass { "PASS" } else { "DIVERGED" });
    // Sites that were never compared are listed, never silently skipped.
    for rs in &r.summary.references {
        if !rs.sites_not_compared.is_empty() {
            let _ = writeln!(o, "not compared ({}): {}", rs.reference, rs.sites_not_compared.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decades() {
        assert_eq!(decade(3.8e-6), '5');
        assert_eq!(decade(1.01e-5), '4');
        assert_eq!(decade(0.0), '9');
        assert_eq!(decade(2.0), '0');
        assert_eq!(decade(f64::NAN), '?');
        assert_eq!(pow10(1.3e-7), "1e-7");
        assert_eq!(pow10(1.3e-10), "<1e-9");
        assert_eq!(pow10(0.0), "<1e-9");
    }

    #[test]
    fn top_logprobs_are_normalized_and_ordered() {
        let t = top_logprobs(&[0.0, 2.0, 1.0, 2.0], 3);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let all = top_logprobs(&[0.0, 2.0, 1.0, 2.0], 4);
        let total: f64 = all.iter().map(|x| x.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
    }
}
