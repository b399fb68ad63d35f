//! Reports: the per-step table printed by `lockstep run`, and the JSON report of DESIGN.md.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::driver::{RunResult, StepRecord};
use crate::error::HarnessError;
use crate::python::Reference;
use crate::tolerance::Verdict;

/// sha256 of a model: of the file, or for a directory of its files (sorted by name).
pub fn model_sha256(path: &Path) -> Result<String, HarnessError> {
    let io = |e: std::io::Error, p: &Path| HarnessError::Io { path: p.display().to_string(), message: e.to_string() };
    let mut h = Sha256::new();
    let mut files = vec![];
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path).map_err(|e| io(e, path))?.flatten().map(|e| e.path()).collect();
        entries.sort();
        files.extend(entries.into_iter().filter(|p| p.is_file()));
    } else {
        files.push(path.to_path_buf());
    }
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        if path.is_dir() {
            h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        }
        let mut r = std::fs::File::open(&f).map_err(|e| io(e, &f))?;
        loop {
            let n = r.read(&mut buf).map_err(|e| io(e, &f))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

#[derive(Serialize)]
struct JsonReport<'a> {
    verdict: &'static str,
    first_divergence: &'a Option<crate::driver::Divergence>,
    steps: &'a [StepRecord],
    reference: JsonReference<'a>,
    model: JsonModel<'a>,
    tokens: JsonTokens<'a>,
    engine: &'a crate::driver::EngineInfo,
    generate: &'a crate::driver::GenerateCheck,
    summary: &'a crate::driver::RunSummary,
    tolerances: serde_json::Value,
}

#[derive(Serialize)]
struct JsonReference<'a> {
    name: &'a str,
    version: String,
    versions: &'a std::collections::BTreeMap<String, String>,
    dtype: &'a str,
    notes: &'a [String],
}

#[derive(Serialize)]
struct JsonModel<'a> {
    path: String,
    sha256: &'a str,
    num_layers: usize,
}

#[derive(Serialize)]
struct JsonTokens<'a> {
    prompt: &'a crate::driver::PromptCheck,
    generated: &'a [u32],
    generated_text: &'a str,
}

pub fn write_json(path: &Path, r: &RunResult, reference: &Reference, model: &Path, sha: &str) -> Result<(), HarnessError> {
    use crate::tolerance::*;
    let mut tols = serde_json::Map::new();
    for kind in [SiteKind::Activation, SiteKind::Cache, SiteKind::Logits] {
        let t = tolerance(WeightsMode::SameWeights, r.engine.dtype, kind);
        tols.insert(format!("{kind:?}").to_lowercase(), serde_json::to_value(t).unwrap_or_default());
    }
    tols.insert("next_token".into(), serde_json::to_value(LOGITS_F32).unwrap_or_default());
    let report = JsonReport {
        verdict: if r.verdict_pass { "pass" } else { "diverged" },
        first_divergence: &r.first_divergence,
        steps: &r.steps,
        reference: JsonReference {
            name: &reference.name,
            version: reference.version(),
            versions: &reference.description.versions,
            dtype: &reference.description.dtype,
            notes: &reference.description.notes,
        },
        model: JsonModel { path: model.display().to_string(), sha256: sha, num_layers: r.num_layers },
        tokens: JsonTokens {
            prompt: &r.prompt,
            generated: &r.generate.engine_tokens,
            generated_text: &r.generate.engine_text,
        },
        engine: &r.engine,
        generate: &r.generate,
        summary: &r.summary,
        tolerances: serde_json::Value::Object(tols),
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| HarnessError::Io {
        path: path.display().to_string(),
        message: format!("serializing the report: {e}"),
    })?;
    std::fs::write(path, text).map_err(|e| HarnessError::Io { path: path.display().to_string(), message: e.to_string() })
}

/// One digit per layer: how many leading digits of agreement its worst site has,
/// floor(-log10(rel-L2)) capped to 0..9; `!` marks a failed site, `~` drift.
fn layer_strip(s: &StepRecord, num_layers: usize) -> String {
    let mut out = String::with_capacity(num_layers);
    for l in 0..num_layers {
        let sites: Vec<_> = s.sites.iter().filter(|x| x.layer == Some(l)).collect();
        let verdict = sites.iter().map(|x| x.verdict).max().unwrap_or(Verdict::Pass);
        let worst = sites.iter().map(|x| x.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY)).fold(0.0, f64::max);
        out.push(match verdict {
            Verdict::Fail => '!',
            Verdict::Drift => '~',
            Verdict::Pass if sites.is_empty() => ' ',
            Verdict::Pass => {
                let d = if worst <= 0.0 { 9.0 } else { (-worst.log10()).floor().clamp(0.0, 9.0) };
                char::from_digit(d as u32, 10).unwrap_or('?')
            }
        });
    }
    out
}

fn show_token(t: &str) -> String {
    let s: String = format!("{t:?}");
    if s.chars().count() > 14 { format!("{}…\"", s.chars().take(12).collect::<String>()) } else { s }
}

/// The human-readable report of a run.
pub fn render_table(r: &RunResult, reference: &Reference, model: &Path, sha: &str) -> String {
    let mut o = String::new();
    let d = &reference.description;
    let versions: Vec<String> = d.versions.iter().filter(|(k, _)| *k != &reference.name).map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(o, "lockstep run");
    let _ = writeln!(o, "  model      {} (sha256 {}…)", model.display(), &sha[..12.min(sha.len())]);
    let _ = writeln!(
        o,
        "  engine     lockstep-engine {}, weights {}, {:?}, Q/K {}{}",
        env!("CARGO_PKG_VERSION"),
        r.engine.weights,
        r.engine.dtype,
        r.engine.qk_layout,
        if r.engine.transforms.is_empty() { String::new() } else { format!(" (compared through {})", r.engine.transforms.join(", ")) }
    );
    let _ = writeln!(o, "  reference  {} {} ({}), {}", reference.name, reference.version(), versions.join(", "), d.dtype);
    let p = &r.prompt;
    let _ = writeln!(
        o,
        "  prompt     {} {:?}: {} tokens; engine and reference token ids {}",
        p.mode,
        p.text,
        p.engine_ids.len(),
        if p.ids_match { "agree".to_string() } else { format!("DIFFER (reference: {} tokens)", p.reference_ids.len()) }
    );
    let s = &r.summary;
    let _ = writeln!(
        o,
        "  compared   {} sites per step: embed, {} layers x {} sites (incl. cache_k, cache_v), final_norm, logits{}",
        s.sites_compared_per_step,
        r.num_layers,
        r.steps.first().map(|st| st.sites.iter().filter(|x| x.layer == Some(0)).count()).unwrap_or(0),
        if s.sites_not_compared.is_empty() { "; nothing skipped".to_string() } else { format!("; NOT compared: {}", s.sites_not_compared.join(", ")) }
    );
    let _ = writeln!(o);
    let lw = r.num_layers.max(6);
    let _ = writeln!(
        o,
        "{:>4} {:>4}  {:<lw$}  {:<22} {:>8}  {:>8}  {:>4} {:>7}  {}",
        "step", "fed", "layers", "worst site", "rel-L2", "KL", "top1", "margin", "token"
    );
    for st in &r.steps {
        let worst = st
            .sites
            .iter()
            .max_by(|a, b| {
                let ra = a.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
                let rb = b.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
                (a.verdict, ra).partial_cmp(&(b.verdict, rb)).unwrap_or(std::cmp::Ordering::Equal)
            });
        let (wname, wrel) = match worst {
            Some(w) => (w.site.clone(), w.metrics.map(|m| format!("{:.1e}", m.rel_l2)).unwrap_or_else(|| "shape".into())),
            None => ("-".into(), "-".into()),
        };
        let lm = &st.logits;
        let top1 = if lm.top1_agree { "=".to_string() } else { format!("≠{}", lm.reference_top1) };
        let _ = writeln!(
            o,
            "{:>4} {:>4}  {:<lw$}  {:<22} {:>8}  {:>8.1e}  {:>4} {:>7.3}  {}{}",
            st.step,
            st.fed.len(),
            layer_strip(st, r.num_layers),
            wname,
            wrel,
            st.kl_max_positions,
            top1,
            lm.engine_margin,
            show_token(&st.engine_token_text),
            if st.verdict == Verdict::Pass { String::new() } else { format!("  [{}]", st.verdict.as_str()) }
        );
    }
    if s.stopped_at_eos && s.steps < s.steps_requested {
        let _ = writeln!(o, "(the engine chose an end-of-sequence token: stopped after {} of {} steps)", s.steps, s.steps_requested);
    }
    let _ = writeln!(
        o,
        "\nlayers: one digit per layer = floor(-log10(worst rel-L2 of its sites)), '~' drift, '!' fail. \
         KL(ref||engine) in nats, max over the positions fed; margin = engine top-1 minus top-2 log-prob."
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "logits over {} steps: mean KL {:.2e}, max KL {:.2e}, same top-1 {:.1}%",
        s.steps,
        s.mean_kl,
        s.max_kl,
        100.0 * s.same_top1_share
    );
    for w in &s.worst_rel_l2 {
        let _ = writeln!(o, "worst {:<10} rel-L2 {:.2e} at {} (step {})", format!("{:?}", w.kind).to_lowercase(), w.rel_l2, w.site, w.step);
    }
    let _ = writeln!(o, "time: engine {:.2} s, reference {:.2} s (capture and compare included)", s.engine_seconds, s.reference_seconds);
    let g = &r.generate;
    let _ = writeln!(o);
    let _ = writeln!(o, "engine text ({} tokens):      {:?}", g.engine_tokens.len(), g.engine_text);
    if g.matches {
        let _ = writeln!(o, "{} generate (greedy): identical tokens", reference.name);
    } else {
        let _ = writeln!(o, "{} generate (greedy): {:?}", reference.name, g.reference_text);
        let _ = writeln!(o, "  first different token at {} [{}]", g.first_mismatch.unwrap_or(0), g.verdict.as_str());
    }
    let _ = writeln!(o);
    match &r.first_divergence {
        None => {
            let drift = r.steps.iter().any(|s| s.verdict == Verdict::Drift) || g.verdict == Verdict::Drift;
            let _ = writeln!(o, "verdict: PASS{}", if drift { " (with drift)" } else { "" });
        }
        Some(dv) => {
            let _ = writeln!(
                o,
                "verdict: DIVERGED at step {}, {}site `{}`: {}",
                dv.step,
                dv.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
                dv.site,
                dv.detail
            );
            if let Some(c) = &dv.likely_cause {
                let _ = writeln!(o, "  likely cause: {c}");
            }
        }
    }
    o
}
