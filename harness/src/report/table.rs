//! Reports: the per-step table printed by `lockstep run`, and the JSON report of docs/contract.md.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::results::run::{RefStep, RunResult, StepRecord, WorstSite};
use crate::compare::tolerance::SiteKind;
use crate::error::HarnessError;
use crate::reference::Reference;
use crate::compare::tolerance::Verdict;


#[derive(Serialize)]
struct JsonReport<'a> {
    schema_version: u32,
    verdict: &'static str,
    first_divergence: &'a Option<crate::results::run::Divergence>,
    steps: &'a [StepRecord],
    /// The first reference (the one named first on the command line).
    reference: JsonReference<'a>,
    references: Vec<JsonReference<'a>>,
    model: JsonModel<'a>,
    tokens: JsonTokens<'a>,
    engine: &'a crate::results::run::EngineInfo,
    generate: &'a [crate::results::run::GenerateCheck],
    summary: &'a crate::results::run::RunSummary,
    tolerances: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora: Option<&'a crate::results::checks::LoraReport>,
    /// The predicted memory (`--max-memory`, or a prompt fed in pieces), in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<&'a crate::lockstep::memory::MemoryPlan>,
}

#[derive(Serialize)]
struct JsonReference<'a> {
    name: &'a str,
    version: String,
    versions: &'a std::collections::BTreeMap<String, String>,
    dtype: &'a str,
    notes: &'a [String],
    transforms: &'a [String],
}

#[derive(Serialize)]
struct JsonModel<'a> {
    path: String,
    sha256: &'a str,
    num_layers: usize,
}

#[derive(Serialize)]
struct JsonTokens<'a> {
    prompt: &'a crate::results::run::PromptCheck,
    generated: &'a [u32],
    generated_text: &'a str,
}

fn json_ref(r: &Reference) -> JsonReference<'_> {
    JsonReference {
        name: &r.name,
        version: r.version(),
        versions: &r.description.versions,
        dtype: &r.description.dtype,
        notes: &r.description.notes,
        transforms: &r.description.transforms,
    }
}

pub fn write_json(path: &Path, r: &RunResult, refs: &[Reference], model: &Path, sha: &str) -> Result<(), HarnessError> {
    let text = serde_json::to_string_pretty(&json_report(r, refs, model, sha)?).map_err(|e| HarnessError::Io {
        path: path.display().to_string(),
        message: format!("serializing the report: {e}"),
    })?;
    crate::paths::write_output(path, (text + "\n").as_bytes())
}

/// The version of the run report (its `schema_version` key) and of its JSON Schema,
/// docs/schema/run-report.schema.json. Bump both when a key changes meaning or goes away.
pub const RUN_SCHEMA_VERSION: u32 = 1;

/// The run's JSON report (what `--json` writes) as a value.
pub fn json_report(r: &RunResult, refs: &[Reference], model: &Path, sha: &str) -> Result<serde_json::Value, HarnessError> {
    use crate::compare::tolerance::*;
    let mut tols = serde_json::Map::new();
    for kind in [SiteKind::Activation, SiteKind::Cache, SiteKind::Logits] {
        let t = tolerance(WeightsMode::SameWeights, r.engine.dtype, kind, None);
        tols.insert(format!("{kind:?}").to_lowercase(), serde_json::to_value(t).unwrap_or_default());
    }
    tols.insert("next_token".into(), serde_json::to_value(LOGITS_F32).unwrap_or_default());
    tols.insert("floor_multiple".into(), serde_json::Value::from(FLOOR_MULTIPLE));
    tols.insert("quantized_sites".into(), serde_json::to_value(tolerance(WeightsMode::QuantVsDense, r.engine.dtype, SiteKind::Activation, None)).unwrap_or_default());
    tols.insert("quantized_next_token".into(), serde_json::to_value(QUANT_BOUNDS).unwrap_or_default());
    let report = JsonReport {
        schema_version: RUN_SCHEMA_VERSION,
        verdict: if r.verdict_pass { "pass" } else { "diverged" },
        first_divergence: &r.first_divergence,
        steps: &r.steps,
        reference: json_ref(&refs[0]),
        references: refs.iter().map(json_ref).collect(),
        model: JsonModel { path: model.display().to_string(), sha256: sha, num_layers: r.num_layers },
        tokens: JsonTokens { prompt: &r.prompt, generated: &r.engine_tokens, generated_text: &r.engine_text },
        engine: &r.engine,
        generate: &r.generate,
        summary: &r.summary,
        tolerances: serde_json::Value::Object(tols),
        lora: r.lora.as_ref(),
        memory: r.memory.as_ref(),
    };
    serde_json::to_value(&report).map_err(|e| HarnessError::Usage(format!("serializing the report: {e}")))
}

/// One character per layer (per `group` layers on a narrow terminal): how many leading digits of agreement its worst site has,
/// floor(-log10(rel-L2)) capped to 0..9; `!` marks a failed site, `~` drift, `.` a layer
/// with no compared site.
fn layer_strip(rs: &RefStep, num_layers: usize, group: usize) -> String {
    let group = group.max(1);
    let mut out = String::with_capacity(num_layers);
    for g in 0..num_layers.div_ceil(group) {
        let in_group = |l: usize| l / group == g;
        let sites: Vec<_> = rs.sites.iter().filter(|x| x.layer.is_some_and(in_group)).collect();
        let verdict = sites.iter().map(|x| x.verdict).max().unwrap_or(Verdict::Pass);
        let worst = sites.iter().map(|x| x.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY)).fold(0.0, f64::max);
        out.push(match verdict {
            Verdict::Fail => '!',
            Verdict::Drift => '~',
            Verdict::Pass if sites.is_empty() => '.',
            Verdict::Pass => digit(worst),
        });
    }
    out
}

fn digit(rel: f64) -> char {
    let d = if rel <= 0.0 { 9.0 } else { (-rel.log10()).floor().clamp(0.0, 9.0) };
    char::from_digit(d as u32, 10).unwrap_or('?')
}

/// The worst rel-L2 of one site kind, for a table cell.
fn worst_cell(worst: &[WorstSite], kind: SiteKind) -> String {
    worst.iter().find(|x| x.kind == kind).map(|x| format!("{:.1e}", x.rel_l2)).unwrap_or_else(|| "-".into())
}

fn show_token(t: &str, width: usize) -> String {
    let s: String = format!("{t:?}");
    if crate::ui::width_of(&s) > width {
        format!("{}\"", crate::ui::truncate(&s, width - 1))
    } else {
        s
    }
}

fn worst_of(rs: &RefStep) -> (String, String, String) {
    let worst = rs.sites.iter().max_by(|a, b| {
        let ra = a.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
        let rb = b.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
        (a.verdict, ra).partial_cmp(&(b.verdict, rb)).unwrap_or(std::cmp::Ordering::Equal)
    });
    match worst {
        Some(w) => (
            w.site.clone(),
            w.metrics.map(|m| format!("{:.1e}", m.rel_l2)).unwrap_or_else(|| "shape".into()),
            w.floor.map(|f| format!("{f:.1e}")).unwrap_or_else(|| "-".into()),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    }
}

/// Sites a reference does not provide, grouped by leaf name.
fn not_compared(sites: &[String], num_layers: usize) -> String {
    let mut leaves: Vec<(String, usize)> = vec![];
    let mut other = vec![];
    for s in sites {
        if lockstep_engine::sites::layer_of(s).is_some() {
            let leaf = lockstep_engine::sites::leaf_of(s).to_string();
            match leaves.iter_mut().find(|(l, _)| *l == leaf) {
                Some((_, n)) => *n += 1,
                None => leaves.push((leaf, 1)),
            }
        } else {
            other.push(s.clone());
        }
    }
    let mut parts: Vec<String> = other;
    for (leaf, n) in leaves {
        parts.push(if n == num_layers { format!("{leaf} (all layers)") } else { format!("{leaf} ({n} layers)") });
    }
    parts.join(", ")
}

/// The human-readable report of a run: [`render_head`], the step table ([`RowLayout`]) and
/// [`render_tail`]. `lockstep run` prints the same three parts as the run goes (the rows as
/// each step is computed); this is all of it at once.
pub fn render_table(r: &RunResult, refs: &[Reference], model: &Path, sha: &str) -> String {
    let mut o = render_head(&r.engine, refs, model, sha);
    o.push_str(&render_prompt(&r.prompt));
    if r.stopped_before_step0.is_none() {
        let layout = RowLayout::new(refs, r.num_layers, crate::ui::get().width);
        o.push_str(&layout.header());
        for st in &r.steps {
            o.push_str(&layout.row(st));
        }
    }
    o.push_str(&render_tail(r, refs));
    o
}

/// The run's header: title, model, engine (and faults), one line per reference.
pub fn render_head(engine: &crate::results::run::EngineInfo, refs: &[Reference], model: &Path, sha: &str) -> String {
    let mut o = String::new();
    write_header(&mut o, engine, model, sha);
    write_references(&mut o, refs);
    crate::ui::fit(&o)
}

/// The `prompt` line (after the prompt check, before step 0).
pub fn render_prompt(p: &crate::results::run::PromptCheck) -> String {
    let mut o = String::new();
    write_prompt(&mut o, p);
    crate::ui::fit(&o)
}

/// Everything after the step table: what was compared, the generation config, the
/// summaries, the times, the texts and the verdict.
pub fn render_tail(r: &RunResult, refs: &[Reference]) -> String {
    let mut o = String::new();
    let multi = refs.len() > 1;
    if r.stopped_before_step0.is_some() {
        write_compared(&mut o, r);
        o.push_str(&crate::checks::sampler::render_prelude(r));
        o.push_str(&crate::checks::sampler::render_stopped(r));
        return crate::ui::fit(&o);
    }
    write_eos_note(&mut o, r);
    o.push_str(&crate::checks::sampler::render_steps(r));
    write_legend(&mut o, multi, &RowLayout::new(refs, r.num_layers, crate::ui::get().width));
    write_calls_note(&mut o, r);
    let _ = writeln!(o);
    write_compared(&mut o, r);
    o.push_str(&crate::checks::sampler::render_prelude(r));
    let rw = refs.iter().map(|x| x.name.len()).max().unwrap_or(8).max(9);
    write_reference_summary(&mut o, r, rw);
    write_quant_bounds(&mut o, r);
    if !r.summary.pairs.is_empty() {
        write_pairs(&mut o, r);
    }
    if !r.summary.pairs.is_empty() || crate::ui::get().verbose {
        write_per_site(&mut o, r, refs);
    }
    write_oracles(&mut o, r);
    write_time(&mut o, r);
    let _ = writeln!(o);
    write_texts(&mut o, r);
    let _ = writeln!(o);
    // The verdict is never cut (it is what a person reads first): word-wrapped instead.
    crate::ui::fit(&o) + &render_verdict(r, refs)
}

/// The verdict line(s) alone (what `--quiet` prints).
pub fn render_verdict(r: &RunResult, refs: &[Reference]) -> String {
    let mut v = String::new();
    write_verdict(&mut v, r, refs.len() > 1);
    match crate::ui::get().width {
        Some(w) => v.lines().map(|l| crate::ui::wrap(l, w, 4) + "\n").collect(),
        None => v,
    }
}

/// The title, model and engine lines of the run's header, and the faults injected.
fn write_header(o: &mut String, engine: &crate::results::run::EngineInfo, model: &Path, sha: &str) {
    let _ = writeln!(o, "lockstep run");
    let _ = writeln!(o, "  model      {} (sha256 {}…)", model.display(), &sha[..12.min(sha.len())]);
    let _ = writeln!(
        o,
        "  engine     {}, weights {}{}, {:?}, Q/K {}{}",
        if engine.name == "lockstep-engine" { format!("lockstep-engine {}", env!("CARGO_PKG_VERSION")) } else { engine.name.clone() },
        engine.weights,
        // A plug-in does not say how it holds its matrices.
        match engine.matrix_types.is_empty() {
            true => String::new(),
            false => format!(" ({}: {})", engine.weights_mode, engine.matrix_types.join("+")),
        },
        engine.dtype,
        engine.qk_layout,
        if engine.transforms.is_empty() {
            String::new()
        } else {
            format!(" (compared through {})", engine.transforms.join(", "))
        }
    );
    if let Some(r) = &engine.rope {
        let _ = writeln!(o, "  rope       {r}");
    }
    if let Some(w) = &engine.windows {
        let _ = writeln!(o, "  attention  {w}");
    }
    if !engine.faults.is_empty() {
        let _ = writeln!(o, "  FAULTS     injected into the engine: {}", engine.faults.join(", "));
    }
}

/// One `reference` line per reference (versions, dtype) and its notes.
fn write_references(o: &mut String, refs: &[Reference]) {
    for rf in refs {
        let d = &rf.description;
        let main_key = [rf.spec.name.as_str(), "llama_cpp_python"];
        let versions: Vec<String> =
            d.versions.iter().filter(|(k, _)| !main_key.contains(&k.as_str())).map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(o, "  reference  {} {} ({}), {}", rf.name, rf.version(), versions.join(", "), d.dtype);
        for note in &d.notes {
            let _ = writeln!(o, "             - {note}");
        }
    }
}

/// The `prompt` line: mode, text, token count and whether each reference's ids agree.
fn write_prompt(o: &mut String, p: &crate::results::run::PromptCheck) {
    let agree: Vec<String> = p
        .reference_ids
        .iter()
        .map(|(n, ids)| {
            if *ids == p.engine_ids {
                format!("{n} agrees")
            } else {
                format!("{n} DIFFERS ({} tokens)", ids.len())
            }
        })
        .collect();
    let _ = writeln!(o, "  prompt     {} {}: {} tokens; token ids: {}", p.mode, shown_prompt(&p.text), p.engine_ids.len(), agree.join(", "));
}

/// One `compared` line per reference: sites per step and the sites not compared; for an
/// engine that taps fewer sites than its family's graph, what it taps and how far bisect can
/// localize with that.
fn write_compared(o: &mut String, r: &RunResult) {
    let t = &r.engine.taps;
    let partial = !t.not_declared.is_empty();
    if let Some(n) = t.canonical.filter(|_| partial) {
        let what = if t.declared == 1 {
            format!("taps the logits only (1 of the {n} canonical sites)")
        } else {
            format!("declares {} of the {n} canonical sites; NOT tapped: {}", t.declared, not_compared(&t.not_declared, r.num_layers))
        };
        let _ = writeln!(
            o,
            "  taps       {} {what}: bisect localizes to the {}{}",
            r.engine.name,
            t.localizes_to,
            t.hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default()
        );
    }
    if let Some(mt) = &t.generic {
        let _ = writeln!(
            o,
            "  sites      the generic sites of any decoder: no family mapping knows model type `{mt}`, so the sites inside \
             a layer (q, k, attn, mlp_*) are not compared; bisect localizes to the layer (docs/models.md#adding-a-family)"
        );
    }
    for rs in &r.summary.references {
        let _ = writeln!(
            o,
            "  compared   {}: {} sites per step{}",
            rs.reference,
            rs.sites_compared_per_step,
            if rs.sites_not_compared.is_empty() && partial {
                " (what the engine taps) and the next-token logits".to_string()
            } else if rs.sites_not_compared.is_empty() {
                // embed, final_norm and logits around the layers' own sites (16 per Llama layer;
                // 3 for the generic sites of any decoder: cache_k, cache_v, out).
                let per_layer = rs.sites_compared_per_step.saturating_sub(3) / r.num_layers.max(1);
                format!(" (embed, {} layers x {per_layer} incl. cache_k/cache_v, final_norm, logits); nothing skipped", r.num_layers)
            } else {
                format!("; NOT compared: {}", not_compared(&rs.sites_not_compared, r.num_layers))
            }
        );
    }
}

/// The layout of the per-step table for a width: the full table when it fits (or without a
/// width), else, in this order until it fits: no empty floor column, no margin column, a
/// shorter token and site column, no `fed` column, then several layers per character of the
/// layer strip; a line still too wide is cut with `…`.
#[derive(Debug, Clone, Copy)]
pub struct RowLayout {
    multi: bool,
    rw: usize,
    num_layers: usize,
    width: Option<usize>,
    floor: bool,
    margin: bool,
    fed: bool,
    token_w: usize,
    site_w: usize,
    /// Layers per character of the layer strip.
    group: usize,
}

/// The columns of the tag after a row (`  [drift]`).
const TAG_W: usize = 9;

impl RowLayout {
    pub fn new(refs: &[Reference], num_layers: usize, width: Option<usize>) -> RowLayout {
        let multi = refs.len() > 1;
        let rw = refs.iter().map(|x| x.name.len()).max().unwrap_or(8).max(9);
        Self::for_names(multi, rw, num_layers, width)
    }

    fn for_names(multi: bool, rw: usize, num_layers: usize, width: Option<usize>) -> RowLayout {
        let mut l = RowLayout { multi, rw, num_layers, width, floor: true, margin: true, fed: true, token_w: 14, site_w: 22, group: 1 };
        let Some(w) = width else { return l };
        let shrinks: [fn(&mut RowLayout); 5] = [
            |l| l.floor = l.multi,
            |l| l.margin = false,
            |l| l.token_w = 8,
            |l| l.site_w = 14,
            |l| l.fed = false,
        ];
        for shrink in shrinks {
            if l.total() <= w {
                return l;
            }
            shrink(&mut l);
        }
        while l.total() > w && l.strip_w() > 6 {
            l.group += 1;
        }
        if l.total() > w {
            l.rw = l.rw.min(8);
            l.site_w = 10;
        }
        l
    }

    fn strip_w(&self) -> usize {
        self.num_layers.div_ceil(self.group).max(6)
    }

    /// The columns of a row with a tag.
    fn total(&self) -> usize {
        let mut t = 4 + 2 + self.token_w + 2 + self.rw + 2 + self.strip_w() + 2 + self.site_w + 1 + 8 + 2 + 8 + 2 + 5 + TAG_W;
        if self.fed {
            t += 5;
        }
        if self.floor {
            t += 9;
        }
        if self.margin {
            t += 8;
        }
        t
    }

    /// Layers per character of the layer strip (1 unless the width asked for fewer).
    pub fn group(&self) -> usize {
        self.group
    }

    fn line(&self, c: [&str; 11], tag: &str) -> String {
        let [step, fed, token, reference, layers, site, rel, floor, kl, top1, margin] = c;
        use crate::ui::truncate_left;
        // Without a width nothing is cut: a long cell pushes the rest right, as `format!` does.
        let cut = self.width.is_some();
        let pad = |s: &str, w: usize| if cut { crate::ui::pad(s, w) } else { format!("{s:<w$}") };
        let pad_left = |s: &str, w: usize| if cut { crate::ui::pad_left(s, w) } else { format!("{s:>w$}") };
        // Narrow: `layers.23.mlp_act` is `L23.mlp_act` (the legend says so).
        let site = match site.strip_prefix("layers.") {
            Some(rest) if cut && self.site_w < 22 => format!("L{rest}"),
            _ => site.to_string(),
        };
        let site = if cut { truncate_left(&site, self.site_w) } else { site };
        let mut o = pad_left(step, 4);
        if self.fed {
            o.push(' ');
            o.push_str(&pad_left(fed, 4));
        }
        o.push_str("  ");
        o.push_str(&pad(token, self.token_w));
        o.push_str("  ");
        o.push_str(&pad(reference, self.rw));
        o.push_str("  ");
        o.push_str(&pad(layers, self.strip_w()));
        o.push_str("  ");
        o.push_str(&pad(&site, self.site_w));
        o.push(' ');
        o.push_str(&pad_left(rel, 8));
        if self.floor {
            o.push(' ');
            o.push_str(&pad_left(floor, 8));
        }
        o.push_str("  ");
        o.push_str(&pad_left(kl, 8));
        o.push_str("  ");
        o.push_str(&pad_left(top1, 5));
        if self.margin {
            o.push(' ');
            o.push_str(&pad_left(margin, 7));
        }
        let mut o = match self.width {
            Some(w) => crate::ui::truncate(&o, w.saturating_sub(crate::ui::width_of(tag))),
            None => o,
        };
        if tag.is_empty() {
            // No trailing blanks on a row without a tag.
            o.truncate(o.trim_end().len());
        }
        o.push_str(&crate::ui::paint_verdicts(tag));
        o.push('\n');
        o
    }

    /// A blank line and the column header of the step table.
    pub fn header(&self) -> String {
        let layers = if self.group > 1 { format!("layers/{}", self.group) } else { "layers".to_string() };
        let head = [
            "step", "fed", "token", "reference", layers.as_str(), "worst site", "rel-L2",
            if self.multi { "floor" } else { "" }, "KL", "top1", "margin",
        ];
        format!("\n{}", self.line(head, ""))
    }

    /// One step's rows: one per reference.
    pub fn row(&self, st: &StepRecord) -> String {
        let mut o = String::new();
        for (k, rs) in st.references.iter().enumerate() {
            let (wname, wrel, wfloor) = worst_of(rs);
            let lm = &rs.logits;
            let top1 = if lm.top1_agree { "=".to_string() } else { format!("≠{}", lm.reference_top1) };
            let (stepc, fedc, tokc) = if k == 0 {
                (st.step.to_string(), st.fed.len().to_string(), show_token(&st.engine_token_text, self.token_w))
            } else {
                (String::new(), String::new(), String::new())
            };
            let tag = if rs.verdict == Verdict::Pass { String::new() } else { format!("  [{}]", rs.verdict.as_str()) };
            let cells = [
                stepc.as_str(),
                fedc.as_str(),
                tokc.as_str(),
                rs.reference.as_str(),
                &layer_strip(rs, self.num_layers, self.group),
                &wname,
                &wrel,
                if self.multi { wfloor.as_str() } else { "" },
                &format!("{:.1e}", rs.kl_max_positions),
                &top1,
                &format!("{:.3}", lm.engine_margin),
            ];
            o.push_str(&self.line(cells, &tag));
            if crate::ui::get().verbose {
                o.push_str(&self.verbose_sites(rs));
            }
        }
        o
    }

    /// `-v`: the sites of a reference's step that did not pass, worst first.
    fn verbose_sites(&self, rs: &RefStep) -> String {
        let mut bad: Vec<_> = rs.sites.iter().filter(|x| x.verdict != Verdict::Pass).collect();
        bad.sort_by(|a, b| {
            let ra = a.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
            let rb = b.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
            (b.verdict, rb).partial_cmp(&(a.verdict, ra)).unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut o = String::new();
        for x in bad.iter().take(8) {
            let line = format!(
                "{:>10}{} {}: rel-L2 {} [{}]",
                "",
                rs.reference,
                x.site,
                x.metrics.map(|m| format!("{:.2e}", m.rel_l2)).unwrap_or_else(|| "shape".into()),
                x.verdict.as_str()
            );
            o.push_str(&crate::ui::fit_to(&line, self.width));
            o.push('\n');
        }
        if bad.len() > 8 {
            let _ = writeln!(o, "{:>10}… and {} more", "", bad.len() - 8);
        }
        o
    }
}

/// The note that the engine stopped at an end-of-sequence token before the steps asked for.
fn write_eos_note(o: &mut String, r: &RunResult) {
    let s = &r.summary;
    if s.stopped_at_eos && s.steps < s.steps_requested {
        let _ = writeln!(o, "(the engine chose an end-of-sequence token: stopped after {} of {} steps)", s.steps, s.steps_requested);
    }
}

/// The prompt as the header shows it: quoted whole up to 300 characters; a longer one (a
/// long-context run) by its start and end, with its length.
fn shown_prompt(text: &str) -> String {
    const MOST: usize = 300;
    let n = text.chars().count();
    if n <= MOST {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(MOST / 2).collect();
    let tail: String = text.chars().skip(n - MOST / 4).collect();
    format!("{head:?} … {tail:?} ({n} characters)")
}

/// How a step fed in pieces was fed (`--prefill-chunk`): each row then holds its worst call.
fn write_calls_note(o: &mut String, r: &RunResult) {
    if let Some(m) = &r.memory {
        let _ = writeln!(o, "memory: {}.", m.describe());
    }
    for s in r.steps.iter().filter(|s| !s.calls.is_empty()) {
        let most = s.calls.iter().max().copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "step {} fed its {} tokens in {} calls of at most {most} (--prefill-chunk): every position compared, each site's worst call shown.",
            s.step,
            s.fed.len(),
            s.calls.len()
        );
    }
    // The positions before the last step: past CACHE_SWEEP_ROWS, steps compared caches in part.
    let before_last: usize = r.steps.iter().rev().skip(1).map(|s| s.fed.len()).sum();
    let caches = r.steps.iter().any(|s| s.references.iter().any(|x| x.sites.iter().any(|x| x.kind == crate::compare::tolerance::SiteKind::Cache)));
    let sweep = crate::lockstep::step::CACHE_SWEEP_ROWS;
    if caches && before_last > sweep {
        let _ = writeln!(
            o,
            "caches: a step compares the rows it appended and {sweep} earlier rows in turn (each earlier row at least every {} steps); a call worse than the one before it is compared with every row.",
            before_last.div_ceil(sweep)
        );
    }
}

/// The legend of the per-step table's columns (word-wrapped to the width).
fn write_legend(o: &mut String, multi: bool, layout: &RowLayout) {
    let per = if layout.group() > 1 {
        format!("one digit per {} layers (at this width; --wide for one per layer)", layout.group())
    } else {
        "one digit per layer".to_string()
    };
    let mut lines = vec![
        format!("layers: {per} = floor(-log10(worst rel-L2 of its sites)), '~' drift, '!' fail, '.' nothing compared."),
        "KL(ref||engine) in nats, max over the positions fed; margin = engine top-1 minus top-2 log-prob.".to_string(),
    ];
    if layout.site_w < 22 && layout.width.is_some() {
        lines.push("worst site: L23.mlp_act is layers.23.mlp_act.".into());
    }
    if multi {
        lines.push("floor: rel-L2 between this reference and the nearest other one at the worst site (the noise floor).".into());
    }
    let _ = writeln!(o);
    for l in lines {
        match crate::ui::get().width {
            Some(w) => {
                let _ = writeln!(o, "{}", crate::ui::wrap(&l, w, 2));
            }
            None => {
                let _ = writeln!(o, "{l}");
            }
        }
    }
}

/// The `engine vs reference` table: one row of the run's worst numbers per reference.
fn write_reference_summary(o: &mut String, r: &RunResult, rw: usize) {
    let s = &r.summary;
    let _ = writeln!(o, "\nengine vs reference, over {} steps:", s.steps);
    // Narrow terminals get narrower number columns and single gaps (same columns).
    let full = 2 + rw + 2 + 8 + 2 + 14 + 2 + 10 + 1 + 10 + 1 + 10 + 2 + 9 + 1 + 9 + 2 + 6 + 2 + 7;
    let (g, n, k) = if crate::ui::get().width.is_some_and(|w| w < full) { (" ", 8, 8) } else { ("  ", 10, 9) };
    let _ = writeln!(
        o,
        "  {:<rw$}{g}{:>8}{g}{:<14}{g}{:>n$} {:>n$} {:>n$}{g}{:>k$} {:>k$}{g}{:>6}{g}{:>7}",
        "reference", "verdict", "mode", if n < 10 { "act" } else { "act rel-L2" }, "cache", "logits", "mean KL", "max KL", "top1 =", "max|Δp|"
    );
    for rs in &s.references {
        let w = |k: SiteKind| worst_cell(&rs.worst_rel_l2, k);
        let _ = writeln!(
            o,
            "  {:<rw$}{g}{:>8}{g}{:<14}{g}{:>n$} {:>n$} {:>n$}{g}{:>k$.1e} {:>k$.1e}{g}{:>5.1}%{g}{:>7.3}",
            rs.reference,
            rs.verdict.as_str(),
            rs.mode.name(),
            w(SiteKind::Activation),
            w(SiteKind::Cache),
            w(SiteKind::Logits),
            rs.mean_kl,
            rs.max_kl,
            100.0 * rs.same_top1_share,
            rs.max_abs_delta_p
        );
    }
}

/// The bounds quantized modes are judged by, when a reference was judged as one.
fn write_quant_bounds(o: &mut String, r: &RunResult) {
    if let Some(b) = r.summary.references.iter().find_map(|rs| rs.quant_bounds) {
        let _ = writeln!(
            o,
            "  quantized modes are judged on the next token ({} bounds; {}): per step KL <= {} pass, > {} fail, \
             |Δp| <= {}; over the run mean KL <= {}, same top-1 >= {:.0}%; per site only rel-L2 > {} fails \
             (8-bit activation rounding flips make deeper layers differ by up to ~0.2)",
            b.quant_type,
            b.source,
            b.pass_kl,
            b.fail_kl,
            b.fail_delta_p,
            b.fail_mean_kl,
            100.0 * b.min_top1_share,
            crate::compare::tolerance::tolerance(crate::compare::tolerance::WeightsMode::QuantVsDense, r.engine.dtype, SiteKind::Activation, None).fail_rel_l2
        );
    }
}

/// The `reference vs reference` table: the measured noise floor of each pair.
fn write_pairs(o: &mut String, r: &RunResult) {
    let s = &r.summary;
    let pw = s.pairs.iter().map(|p| p.a.len() + p.b.len() + 4).max().unwrap_or(10);
    let _ = writeln!(o, "\nreference vs reference (the measured noise floor), over {} steps:", s.steps);
    let _ = writeln!(
        o,
        "  {:<pw$}  {:>5}  {:>10} {:>10} {:>10}  {:>9} {:>9}  {:>6}",
        "pair", "sites", "act rel-L2", "cache", "logits", "mean KL", "max KL", "top1 ="
    );
    for p in &s.pairs {
        let w = |k: SiteKind| worst_cell(&p.worst_rel_l2, k);
        let _ = writeln!(
            o,
            "  {:<pw$}  {:>5}  {:>10} {:>10} {:>10}  {:>9.1e} {:>9.1e}  {:>5.1}%",
            format!("{} vs {}", p.a, p.b),
            p.sites_compared_per_step,
            w(SiteKind::Activation),
            w(SiteKind::Cache),
            w(SiteKind::Logits),
            p.mean_kl,
            p.max_kl,
            100.0 * p.same_top1_share
        );
    }
}

/// The per-site table: per leaf name, worst over layers and steps, engine error vs the floor.
fn write_per_site(o: &mut String, r: &RunResult, refs: &[Reference]) {
    let _ = writeln!(o, "\nper site, worst over layers and steps: engine rel-L2 / noise floor (nearest other reference)");
    let mut header = format!("  {:<10}", "site");
    for rf in refs {
        header.push_str(&format!("  {:>21}", rf.name));
    }
    let _ = writeln!(o, "{header}");
    let mut leaves: Vec<String> = vec![];
    for x in r.steps.first().map(|s| s.references.iter().flat_map(|rs| rs.sites.iter()).collect::<Vec<_>>()).unwrap_or_default() {
        let leaf = lockstep_engine::sites::leaf_of(&x.site).to_string();
        if !leaves.contains(&leaf) {
            leaves.push(leaf);
        }
    }
    for leaf in leaves {
        let mut line = format!("  {leaf:<10}");
        for i in 0..refs.len() {
            line.push_str(&format!("  {:>21}", per_site_cell(r, i, &leaf)));
        }
        let _ = writeln!(o, "{line}");
    }
}

/// One cell of the per-site table: reference `i`'s worst rel-L2 at `leaf` and its floor.
fn per_site_cell(r: &RunResult, i: usize, leaf: &str) -> String {
    let mut e = None::<f64>;
    let mut f = None::<f64>;
    for st in &r.steps {
        for x in st.references[i].sites.iter().filter(|x| lockstep_engine::sites::leaf_of(&x.site) == leaf) {
            let v = x.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
            e = Some(e.map_or(v, |a| a.max(v)));
            if let Some(fl) = x.floor {
                f = Some(f.map_or(fl, |a| a.max(fl)));
            }
        }
    }
    match (e, f) {
        (Some(e), Some(f)) => format!("{e:.1e} / {f:.1e}"),
        (Some(e), None) => format!("{e:.1e} / -"),
        _ => "not compared".into(),
    }
}

/// One `which is right?` table per oracle: engine and reference distance to it per site.
fn write_oracles(o: &mut String, r: &RunResult) {
    for orc in &r.summary.oracle {
        let total = orc.engine_closer + orc.reference_closer + orc.ties;
        let _ = writeln!(
            o,
            "\nwhich is right? distance to the {} oracle (median over layers and steps):",
            orc.oracle
        );
        let _ = writeln!(o, "  {:<10}  {:>10}  {:>12}  closer", "site", "engine", orc.reference);
        for (leaf, e, rr) in &orc.per_site {
            let _ = writeln!(
                o,
                "  {:<10}  {:>10.1e}  {:>12.1e}  {}",
                leaf,
                e,
                rr,
                if e < rr {
                    "engine"
                } else if e == rr {
                    "tie"
                } else {
                    orc.reference.as_str()
                }
            );
        }
        let _ = writeln!(
            o,
            "  the engine is closer to {} than {} is at {} of {} (step, site) comparisons, {} at {}, {} ties",
            orc.oracle, orc.reference, orc.engine_closer, total, orc.reference, orc.reference_closer, orc.ties
        );
    }
}

/// The `time` line: the engine's and each reference's seconds.
fn write_time(o: &mut String, r: &RunResult) {
    let s = &r.summary;
    let steps = format!(
        "engine {:.2} s{}",
        s.engine_seconds,
        s.references.iter().map(|x| format!(", {} {:.2} s", x.reference, x.seconds)).collect::<String>()
    );
    if s.load.is_empty() {
        let _ = writeln!(o, "\ntime: {steps} (capture and compare included)");
    } else {
        let load = s.load.iter().map(|l| format!("{} {:.2} s", l.side, l.seconds)).collect::<Vec<_>>().join(", ");
        let line = format!("time: loading {load}; steps {steps} (capture and compare included)");
        let _ = writeln!(o, "\n{}", crate::ui::get().width.map(|w| crate::ui::wrap(&line, w, 6)).unwrap_or(line));
    }
}

/// The engine's generated text, each reference's own greedy generate, and the LoRA checks.
fn write_texts(o: &mut String, r: &RunResult) {
    let _ = writeln!(o, "engine text ({} tokens): {:?}", r.engine_tokens.len(), r.engine_text);
    for g in &r.generate {
        if g.matches {
            let _ = writeln!(o, "{} generate (greedy): identical tokens", g.reference);
        } else {
            let _ = writeln!(o, "{} generate (greedy): {:?}", g.reference, g.reference_text);
            let _ = writeln!(o, "  first different token at {} [{}]", g.first_mismatch.unwrap_or(0), g.verdict.as_str());
        }
    }
    if let Some(l) = &r.lora {
        o.push_str(&crate::checks::lora::render(l));
    }
}

/// The `verdict` line: PASS (with drift or not), or where the run diverged and why.
fn write_verdict(o: &mut String, r: &RunResult, multi: bool) {
    match &r.first_divergence {
        None => {
            let drift = r.steps.iter().any(|s| s.verdict == Verdict::Drift) || r.generate.iter().any(|g| g.verdict == Verdict::Drift);
            let _ = writeln!(o, "verdict: PASS{}", if drift { " (with drift)" } else { "" });
        }
        Some(dv) => {
            let _ = writeln!(
                o,
                "verdict: DIVERGED at step {}, {}site `{}`{}: {}",
                dv.step,
                dv.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
                dv.site,
                if multi { format!(" (vs {})", dv.reference) } else { String::new() },
                dv.detail
            );
            if let Some(c) = &dv.likely_cause {
                let _ = writeln!(o, "  likely cause: {c}");
            }
        }
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    #[test]
    fn a_long_prompt_is_shown_by_its_ends_and_length() {
        assert_eq!(shown_prompt("hello"), "\"hello\"");
        let long = format!("start{}end", "x".repeat(1000));
        let shown = shown_prompt(&long);
        assert!(shown.starts_with("\"startxx") && shown.ends_with("xxend\" (1008 characters)"), "{shown}");
        assert!(shown.chars().count() < 260, "{shown}");
    }

    fn widest_line(l: &RowLayout) -> usize {
        let cells = [
            "31", "1024", "\"abcdefghijk…\"", "transformers", &"9".repeat(l.strip_w()), "layers.29.expert_weights", "shape", "3.3e-7",
            "1.8e-12", "≠123456", "12.345",
        ];
        let row = l.line(cells, "  [drift]");
        crate::ui::width_of(row.trim_end_matches('\n'))
    }

    #[test]
    fn rows_fit_every_width_down_to_the_minimum() {
        for layers in [3, 30, 64] {
            for multi in [false, true] {
                for w in [crate::ui::MIN_WIDTH, 80, 100, 120, 140] {
                    let l = RowLayout::for_names(multi, 12, layers, Some(w));
                    assert!(widest_line(&l) <= w, "{layers} layers, multi {multi}, width {w}: {}", widest_line(&l));
                    let h = l.header();
                    assert!(h.lines().all(|x| crate::ui::width_of(x) <= w), "{h}");
                }
            }
        }
    }

    #[test]
    fn a_wide_terminal_gets_the_whole_table() {
        let l = RowLayout::for_names(true, 12, 30, Some(200));
        assert!(l.fed && l.margin && l.floor && l.group == 1 && l.site_w == 22);
        // Unlimited is the same layout, and nothing is cut.
        let u = RowLayout::for_names(true, 12, 30, None);
        assert_eq!(l.header(), u.header());
        assert!(widest_line(&u) > 140);
    }

    #[test]
    fn a_narrow_terminal_shrinks_in_order_and_groups_layers_last() {
        // 30 layers at 100 columns: the optional columns go before the strip is grouped.
        let l = RowLayout::for_names(false, 12, 30, Some(100));
        assert!(!l.fed && !l.margin && !l.floor, "{l:?}");
        assert_eq!(l.group, 2, "{l:?}");
        // 3 layers at 100 columns: nothing grouped, and the margin column stays.
        let l = RowLayout::for_names(true, 12, 3, Some(100));
        assert_eq!(l.group, 1);
        assert!(l.floor, "several references keep their floor column: {l:?}");
    }

    #[test]
    fn narrow_site_names_are_abbreviated_not_cut_blindly() {
        let l = RowLayout::for_names(false, 12, 30, Some(100));
        let row = l.line(["1", "1", "\"x\"", "transformers", "55", "layers.23.mlp_act", "1e-6", "", "1e-9", "=", "0.1"], "");
        assert!(row.contains("L23.mlp_act"), "{row}");
    }
}
