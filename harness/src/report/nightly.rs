//! `lockstep report`: runs every case of a suite (`crate::report::suite`) in this process, bisects
//! each diverged case, and writes the report: `DIR/cases/NAME.json` per case as it
//! finishes (a re-run with the same `--out` skips them: resume), then `DIR/report.json`,
//! `DIR/summary.md` and `DIR/index.html` (`crate::report::html`). Shards (`--shard I/N`) write the
//! same files for their cases; [`merge`] joins shard directories into one report.
//!
//! A case that fails, errors or panics is a result like any other: its error is in the
//! report and the next case runs. History (`--history FILE`): one JSON line per case per
//! report; the page shows each case's trend and the exit code flags regressions
//! ([`regressions`]).
//!
//! This module owns the per-case numbers kept for the report ([`CaseResult`], a summary of
//! `crate::results::run::RunResult` and `bisect::BisectReport`, deserializable for resume and merge);
//! it does not compare anything itself.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::lockstep::run as driver;
use crate::lockstep::options::{RunOptions};
use crate::results::run::{RunResult};
use crate::error::HarnessError;
pub use crate::report::records::{FirstDivergence, RefNumbers, PairNumbers, StepRef, StepNumbers, LayerError, Heatmap, BisectNumbers, ConfigRow, GenerateNumbers, Timing, CaseResult, SuiteRecord, HistoryLine, Regression, Totals, Report, Thresholds};
use crate::reference::{RefSpec, Reference};
use crate::report::suite::{CaseDef, Shard, Suite, SuiteHeader};
use crate::compare::tolerance::{Precision, Verdict};

/// Version of `report.json` and `cases/*.json`. Bump it when a field changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// A case's mean KL "grew past the threshold" when it is more than this many times last
/// night's: KL of one f32 implementation against another moves by a few percent between
/// runs on other prompts or threads (and the quantized bounds of tolerance.rs are per
/// step, not per run), while every bug class of the fault catalog moves it by orders of
/// magnitude; ×10 is one decade, clear of the first and far below the second.
pub const KL_GROWTH_FACTOR: f64 = 10.0;
/// ... and only when it is above this many nats: same-weights f32 runs sit at 1e-12..1e-8
/// nats (rounding noise), where a ×10 step means nothing for the tokens.
pub const KL_NOISE_NATS: f64 = 1e-6;
/// Nights shown in each case's trend.
pub const TREND_NIGHTS: usize = 14;
/// Reference tensors bisect keeps for isolation (`bisect --max-capture-mb`).
const BISECT_CAPTURE_MB: usize = 256;

fn fin(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

impl CaseResult {
    pub(crate) fn error(def: &CaseDef, message: String, seconds: f64) -> CaseResult {
        CaseResult {
            schema_version: SCHEMA_VERSION,
            name: def.name.clone(),
            fingerprint: def.fingerprint(),
            build: build_id(),
            def: def.clone(),
            verdict: "error".into(),
            drift: false,
            as_expected: false,
            error: Some(message),
            model_path: None,
            first_divergence: None,
            mean_kl: None,
            max_kl: None,
            top1: None,
            references: vec![],
            pairs: vec![],
            num_layers: 0,
            engine_weights: None,
            faults: vec![],
            engine_text: String::new(),
            stopped_before_step0: None,
            lora: None,
            steps: vec![],
            layer_error: vec![],
            heatmap: None,
            generate: vec![],
            config: vec![],
            bisect: None,
            worst: None,
            run_json: None,
            timing: Timing { run_s: seconds, bisect_s: 0.0, total_s: seconds },
            crashed: false,
        }
    }

    /// `step/layer/site` of *the* first divergence ([`CaseResult::divergence`]: bisect's
    /// localization when it found one), for one-line summaries.
    pub fn where_short(&self) -> String {
        match self.divergence() {
            None => "-".into(),
            Some(d) => format!("step {} {}{}", d.step, d.layer.map(|l| format!("layer {l} ")).unwrap_or_default(), d.site),
        }
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// The case's numbers from a run (and its bisect when it diverged).
fn summarize(def: &CaseDef, r: &RunResult, refs: &[Reference], model: &Path) -> CaseResult {
    let v = |v: Verdict| v.as_str().to_string();
    let mut c = CaseResult::error(def, String::new(), 0.0);
    c.error = None;
    c.model_path = Some(model.display().to_string());
    c.num_layers = r.num_layers;
    c.engine_weights = Some(format!("{} ({}, {})", r.engine.weights, r.engine.weights_mode, r.engine.matrix_types.join("+")));
    c.faults = r.engine.faults.clone();
    c.engine_text = r.engine_text.clone();
    c.stopped_before_step0 = r.stopped_before_step0.clone();
    c.lora = r.lora.as_ref().map(crate::checks::lora::render_checks);
    c.first_divergence = r.first_divergence.as_ref().map(|d| FirstDivergence {
        step: d.step,
        layer: d.layer,
        site: d.site.clone(),
        reference: d.reference.clone(),
        detail: d.detail.clone(),
    });
    for (i, s) in r.summary.references.iter().enumerate() {
        c.references.push(RefNumbers {
            reference: s.reference.clone(),
            version: refs.get(i).map(|r| r.version()).unwrap_or_default(),
            mode: s.mode.name().to_string(),
            mean_kl: fin(s.mean_kl),
            max_kl: fin(s.max_kl),
            top1: fin(s.same_top1_share),
            verdict: v(s.verdict),
            sites_not_compared: s.sites_not_compared.clone(),
            pass_kl: None,
            fail_kl: None,
        });
        c.mean_kl = max_opt(c.mean_kl, fin(s.mean_kl));
        c.max_kl = max_opt(c.max_kl, fin(s.max_kl));
        c.top1 = min_opt(c.top1, fin(s.same_top1_share));
    }
    c.pairs = r
        .summary
        .pairs
        .iter()
        .map(|p| PairNumbers { a: p.a.clone(), b: p.b.clone(), mean_kl: fin(p.mean_kl), max_kl: fin(p.max_kl), top1: fin(p.same_top1_share), kl: vec![] })
        .collect();
    c.drift = r.steps.iter().any(|s| s.verdict == Verdict::Drift) || r.summary.references.iter().any(|s| s.verdict == Verdict::Drift);
    for st in &r.steps {
        c.steps.push(StepNumbers {
            step: st.step,
            fed: st.fed.len(),
            engine_token: st.engine_token,
            engine_token_text: st.engine_token_text.clone(),
            verdict: v(st.verdict),
            references: st
                .references
                .iter()
                .map(|rs| StepRef {
                    reference: rs.reference.clone(),
                    kl: fin(rs.logits.kl),
                    top1_agree: rs.logits.top1_agree,
                    engine_top1: rs.logits.engine_top1,
                    reference_top1: rs.logits.reference_top1,
                    engine_margin: fin(rs.logits.engine_margin),
                    reference_margin: fin(rs.logits.reference_margin),
                    verdict: v(rs.verdict),
                })
                .collect(),
        });
    }
    // Error per layer: per reference, [step][layer] the worst rel-L2 over the layer's sites.
    let n_refs = r.steps.first().map(|s| s.references.len()).unwrap_or(0);
    for ri in 0..n_refs {
        let mut grid = vec![];
        for st in &r.steps {
            let mut row: Vec<Option<f64>> = vec![None; r.num_layers];
            for s in &st.references[ri].sites {
                if let (Some(l), Some(m)) = (s.layer, s.metrics.as_ref()) {
                    if l < row.len() {
                        row[l] = max_opt(row[l], fin(m.rel_l2));
                    }
                }
            }
            grid.push(row);
        }
        c.layer_error.push(LayerError { reference: r.steps[0].references[ri].reference.clone(), steps: grid, pass_bound: vec![], fail_bound: vec![], floor: vec![] });
    }
    // Heatmap: the per-layer site kind with the largest rel-L2 anywhere, vs the first reference.
    if n_refs > 0 {
        let mut worst: Option<(f64, String)> = None;
        for st in &r.steps {
            for s in st.references[0].sites.iter().filter(|s| s.layer.is_some()) {
                if let Some(e) = s.metrics.as_ref().and_then(|m| fin(m.rel_l2)) {
                    if worst.as_ref().is_none_or(|(w, _)| e > *w) {
                        worst = Some((e, lockstep_engine::sites::leaf_of(&s.site).to_string()));
                    }
                }
            }
        }
        if let Some((_, leaf)) = worst {
            let cells = r
                .steps
                .iter()
                .map(|st| {
                    let mut row = vec![None; r.num_layers];
                    for s in st.references[0].sites.iter().filter(|s| lockstep_engine::sites::leaf_of(&s.site) == leaf) {
                        if let (Some(l), Some(m)) = (s.layer, s.metrics.as_ref()) {
                            if l < row.len() {
                                row[l] = fin(m.rel_l2);
                            }
                        }
                    }
                    row
                })
                .collect();
            c.heatmap = Some(Heatmap { reference: r.steps[0].references[0].reference.clone(), site: leaf, cells, pass_bound: vec![], fail_bound: vec![] });
        }
    }
    c.generate = r
        .generate
        .iter()
        .map(|g| GenerateNumbers { reference: g.reference.clone(), matches: g.matches, first_mismatch: g.first_mismatch })
        .collect();
    c.config = r
        .config
        .rows
        .iter()
        .map(|row| ConfigRow {
            name: row.name.to_string(),
            engine: row.engine.clone(),
            references: row.references.clone(),
            differs: row.differs,
            info: row.info,
        })
        .collect();
    crate::report::bounds::annotate(&mut c, r);
    c.verdict = if r.verdict_pass { "pass" } else { "diverged" }.into();
    // The strict profile: a drift is a divergence too.
    if def.tolerance == "strict" && r.verdict_pass && c.drift {
        c.verdict = "diverged".into();
        c.first_divergence = first_drift(r);
    }
    c.as_expected = c.verdict == def.expect;
    c
}

/// The first drifting site or next-token distribution (for the strict profile).
fn first_drift(r: &RunResult) -> Option<FirstDivergence> {
    for st in &r.steps {
        for rs in &st.references {
            if let Some(s) = rs.sites.iter().find(|s| s.verdict == Verdict::Drift) {
                let e = s.metrics.map(|m| format!("rel-L2 {:.2e}", m.rel_l2)).unwrap_or_default();
                return Some(FirstDivergence {
                    step: st.step,
                    layer: s.layer,
                    site: s.site.clone(),
                    reference: rs.reference.clone(),
                    detail: format!("drift ({e}) under the strict tolerance profile"),
                });
            }
            if rs.logits_verdict == Verdict::Drift {
                return Some(FirstDivergence {
                    step: st.step,
                    layer: None,
                    site: "logits".into(),
                    reference: rs.reference.clone(),
                    detail: format!("next-token drift (KL {:.2e}) under the strict tolerance profile", rs.logits.kl),
                });
            }
        }
    }
    None
}

/// References kept loaded between cases of the same model (loading SmolLM2 in transformers
/// alone takes ~18 s). Keyed by reference label; cleared when the model changes.
#[derive(Default)]
pub struct RefCache {
    /// The model and adapter the cached references were loaded with.
    key: Option<(PathBuf, Option<PathBuf>)>,
    refs: HashMap<String, Reference>,
}

impl RefCache {
    /// The references of a case feeding `context` positions: those cached for the same model
    /// and adapter when they can hold the case (a fixed context, llama.cpp's `n_ctx`, at least
    /// `context`), else loaded for it.
    fn take(&mut self, specs: &[RefSpec], model: &Path, lora: Option<&Path>, context: usize) -> Result<Vec<Reference>, HarnessError> {
        let key = (model.to_path_buf(), lora.map(Path::to_path_buf));
        if self.key.as_ref() != Some(&key) {
            self.refs.clear();
            self.key = Some(key);
        }
        specs
            .iter()
            .map(|s| match self.refs.remove(&s.label()) {
                Some(r) if r.description.context.is_none_or(|c| c >= context) => Ok(r),
                _ => Reference::load_for_run(s, model, lora, Some(context)),
            })
            .collect()
    }

    fn put_back(&mut self, refs: Vec<Reference>) {
        for r in refs {
            self.refs.insert(r.spec.label(), r);
        }
    }
}

/// A suite's `lora = PATH`: as given when it exists from the working directory, else
/// relative to lockstep's files (the checkout or the embedded copy: the committed adapters
/// are `snapshots/adapters/...`).
fn resolve_adapter(l: &str) -> PathBuf {
    let p = PathBuf::from(l);
    if p.is_absolute() || p.exists() {
        p
    } else {
        crate::paths::data_dir().join(p)
    }
}

/// Runs one case (and bisects it when it diverged). Errors are the caller's to record.
fn run_case_inner(def: &CaseDef, cache: &mut RefCache, full_json: Option<&Path>) -> Result<CaseResult, HarnessError> {
    if std::env::var("LOCKSTEP_REPORT_TEST_PANIC").is_ok_and(|n| n == def.name) {
        // A test hook: proves that a panicking case is caught and reported (tests/report.rs).
        panic!("LOCKSTEP_REPORT_TEST_PANIC asked case `{}` to panic", def.name);
    }
    let t0 = Instant::now();
    let specs = def.references.iter().map(|r| RefSpec::parse(r)).collect::<Result<Vec<_>, _>>()?;
    let path = crate::models::resolve(&def.model)?;
    let sampler = match &def.sampler {
        Some(s) => Some(lockstep_engine::SamplerConfig::parse(s).map_err(|e| HarnessError::Usage(e.to_string()))?),
        None => None,
    };
    let lora_dir = def.lora.as_deref().map(resolve_adapter);
    let mut opts = RunOptions {
        engine: crate::plugin::EngineSpec::under_test(),
        model: path.clone(),
        references: specs.clone(),
        prompt: def.prompt_value(),
        steps: def.steps,
        precision: Precision::F32,
        weights: def.weights_mode(),
        faults: lockstep_engine::Faults::parse(def.inject.as_deref().unwrap_or(""))?,
        bisect: false,
        sampler,
        strict_config: false,
        lora: lora_dir.clone().map(|dir| lockstep_engine::LoraOptions { dir, mode: lockstep_engine::LoraMode::Unmerged }),
        context: None,
        prefill_chunk: crate::lockstep::options::DEFAULT_PREFILL_CHUNK,
        max_memory: None,
    };
    let engine = crate::lockstep::options::load_engine(&opts)?;
    // Every reference holds what the case feeds (llama.cpp's n_ctx), as `lockstep run` sizes it.
    let prompt_len = crate::lockstep::options::engine_prompt_ids(&engine, &opts.prompt)?.len();
    let refs = cache.take(&specs, &path, lora_dir.as_deref(), opts.context_for(prompt_len))?;
    if let Some(held) = refs.iter().filter_map(|r| r.trace().map(|t| t.meta.steps)).min() {
        opts.steps = opts.steps.min(held);
    }
    let run = driver::run(&opts, &engine, &refs)?;
    let run_s = t0.elapsed().as_secs_f64();
    let mut c = summarize(def, &run, &refs, &path);
    if let Some(dir) = full_json {
        let rel = run_json_rel(&def.name);
        let p = dir.join(&rel);
        std::fs::create_dir_all(p.parent().expect("runs/")).map_err(|e| io_err(dir, e))?;
        let sha = crate::golden::trace::model_sha256_cached(&path)?;
        crate::report::table::write_json(&p, &run, &refs, &path, &sha)?;
        c.run_json = Some(rel);
    }
    if c.verdict == "diverged" {
        let t1 = Instant::now();
        // The progress bar says "bisect" while it runs (planned 0: see run_report's hook).
        notify_bisect();
        c.bisect = Some(match crate::bisect::bisect(&opts, &engine, &refs, BISECT_CAPTURE_MB) {
            Ok((rep, _)) => BisectNumbers {
                found: rep.found,
                step: rep.step,
                layer: rep.layer,
                site: rep.site.clone(),
                reference: rep.reference.clone(),
                detail: rep.detail.clone(),
                isolation: rep.isolation.as_ref().map(|i| {
                    format!(
                        "layer {} on the reference's input and cache: {}{}",
                        i.layer,
                        if i.verdict == "local" { "fails, the cause is in this layer" } else { "passes, the error is inherited" },
                        i.first_failing_site.as_ref().map(|s| format!(" (first at {s})")).unwrap_or_default()
                    )
                }),
                diagnosis: rep.diagnosis.as_ref().map(|d| d.kind.name().to_string()),
                diagnosis_title: rep.diagnosis.as_ref().map(|d| d.title.clone()),
                evidence: rep.diagnosis.as_ref().map(|d| d.evidence.clone()).unwrap_or_default(),
                error: None,
            },
            Err(e) => BisectNumbers {
                found: false,
                step: None,
                layer: None,
                site: None,
                reference: None,
                detail: None,
                isolation: None,
                diagnosis: None,
                diagnosis_title: None,
                evidence: vec![],
                error: Some(e.to_string()),
            },
        });
        c.timing.bisect_s = t1.elapsed().as_secs_f64();
    }
    cache.put_back(refs);
    c.timing.run_s = run_s;
    Ok(c)
}

fn notify_bisect() {
    driver::tell(driver::RunEvent::Bisecting);
}

/// Where `--full-json` puts a case's run report, relative to the report directory.
fn run_json_rel(name: &str) -> String {
    format!("runs/{name}.json")
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs one case; an error or a panic becomes an `error` result. Ctrl-C is not a result of
/// the case: it is returned, and the case is not recorded.
pub fn run_case(def: &CaseDef, cache: &mut RefCache, full_json: Option<&Path>) -> Result<CaseResult, HarnessError> {
    let t0 = Instant::now();
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case_inner(def, cache, full_json)));
    let secs = t0.elapsed().as_secs_f64();
    let mut c = match out {
        Ok(Ok(c)) => c,
        // Whatever error Ctrl-C caused on its way out (a plug-in engine wraps it in its own).
        Ok(Err(_)) if crate::interrupt::interrupted() => return Err(HarnessError::Interrupted),
        Ok(Err(e)) => CaseResult::error(def, e.to_string(), secs),
        Err(p) => {
            // The references of a panicked case may be mid-step: load them afresh.
            *cache = RefCache::default();
            CaseResult::error(def, format!("panicked: {}", panic_message(&*p)), secs)
        }
    };
    c.timing.total_s = secs;
    Ok(c)
}

// ---------------------------------------------------------------- progress

/// A progress bar on a terminal, plain log lines otherwise (CI, pipes). The bar is cut to
/// the terminal's width (a longer line would wrap, and `\r` would redraw it on a new line);
/// its ETA counts the loading of each case (measured: the time from a case's start to its
/// first step) apart from the steps.
struct Progress {
    tty: bool,
    quiet: bool,
    total_cases: usize,
    done_cases: usize,
    planned_steps: usize,
    done_steps: usize,
    case_steps_done: usize,
    case: String,
    /// When the current case started, and when its first step ended (its loading before).
    case_started: Instant,
    case_first_step: Option<Instant>,
    /// Seconds spent loading and stepping, over the cases finished.
    load_seconds: f64,
    loads: usize,
    step_seconds: f64,
}

impl Progress {
    fn new(tty: bool, quiet: bool, total_cases: usize, planned_steps: usize) -> Progress {
        Progress {
            tty,
            quiet,
            total_cases,
            done_cases: 0,
            planned_steps,
            done_steps: 0,
            case_steps_done: 0,
            case: String::new(),
            case_started: Instant::now(),
            case_first_step: None,
            load_seconds: 0.0,
            loads: 0,
            step_seconds: 0.0,
        }
    }

    fn start_case(&mut self, name: &str) {
        self.case = name.to_string();
        self.case_steps_done = 0;
        self.case_started = Instant::now();
        self.case_first_step = None;
    }

    /// A step of the current case ended.
    fn step(&mut self, done: usize, planned: usize) {
        if self.case_first_step.is_none() {
            self.case_first_step = Some(Instant::now());
        }
        self.case_steps_done = done.min(planned);
    }

    fn end_case(&mut self, steps: usize) {
        let end = Instant::now();
        match self.case_first_step {
            Some(first) => {
                // The first step is counted with the load (it is mostly the prompt's prefill).
                self.load_seconds += (first - self.case_started).as_secs_f64();
                self.loads += 1;
                self.step_seconds += (end - first).as_secs_f64();
            }
            None => {
                self.load_seconds += (end - self.case_started).as_secs_f64();
                self.loads += 1;
            }
        }
        self.done_cases += 1;
        self.done_steps += steps;
        self.case_steps_done = 0;
    }

    /// Seconds left: the steps left at the measured seconds per step, plus the loading of
    /// every case not started at the measured seconds per load.
    fn seconds_left(&self) -> Option<f64> {
        let now = Instant::now();
        let (mut load, mut loads, mut step, mut steps) = (self.load_seconds, self.loads, self.step_seconds, self.done_steps.saturating_sub(self.done_cases));
        match self.case_first_step {
            Some(first) => {
                load += (first - self.case_started).as_secs_f64();
                loads += 1;
                step += (now - first).as_secs_f64();
                steps += self.case_steps_done.saturating_sub(1);
            }
            None if loads == 0 => return None,
            None => {}
        }
        let per_load = load / loads.max(1) as f64;
        let per_step = if steps > 0 { step / steps as f64 } else { 0.0 };
        let done = self.done_steps + self.case_steps_done;
        let steps_left = self.planned_steps.saturating_sub(done) as f64;
        let cases_left = self.total_cases.saturating_sub(self.done_cases + 1) as f64;
        let this_load = if self.case_first_step.is_none() { (per_load - (now - self.case_started).as_secs_f64()).max(0.0) } else { 0.0 };
        Some(steps_left * per_step + cases_left * per_load + this_load)
    }

    fn eta(&self) -> String {
        match self.seconds_left() {
            None => "--:--".into(),
            Some(left) => format!("{}:{:02}", (left / 60.0) as u64, left as u64 % 60),
        }
    }

    fn show(&self, text: &str) {
        let width = crate::ui::terminal_width().unwrap_or(80).saturating_sub(1).max(20);
        eprint!("\r\x1b[2K{}", crate::ui::truncate(text, width));
        let _ = std::io::stderr().flush();
    }

    fn draw(&self, step: usize, planned: usize) {
        if !self.tty {
            return;
        }
        let frac = (self.done_steps + self.case_steps_done) as f64 / self.planned_steps.max(1) as f64;
        let w = 24usize;
        let fill = ((frac.min(1.0)) * w as f64) as usize;
        let phase = if self.case_first_step.is_none() { "loading".to_string() } else { format!("step {step}/{planned}") };
        self.show(&format!(
            "[{}{}] ETA {} case {}/{} {} {phase}",
            "#".repeat(fill),
            "-".repeat(w - fill),
            self.eta(),
            self.done_cases + 1,
            self.total_cases,
            self.case,
        ));
    }

    fn draw_phase(&self, phase: &str, step: usize) {
        if !self.tty {
            return;
        }
        self.show(&format!("ETA {} case {}/{} {} {phase} step {step}", self.eta(), self.done_cases + 1, self.total_cases, self.case));
    }

    fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{text}");
    }
}

// ---------------------------------------------------------------- outputs

fn io_err(p: &Path, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Io { path: p.display().to_string(), message: e.to_string() }
}

fn write_file(p: &Path, text: &str) -> Result<(), HarnessError> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
    }
    // Written to a temporary name and renamed: a killed run never leaves half a case file
    // that a resume would trust.
    crate::paths::write_atomic(p, text.as_bytes())
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("report values serialize") + "\n"
}

/// The time now (UTC) as `YYYY-MM-DDTHH:MM:SSZ`; `LOCKSTEP_REPORT_DATE` overrides it (tests
/// simulate nights with it).
pub fn now_utc() -> String {
    if let Ok(d) = std::env::var("LOCKSTEP_REPORT_DATE") {
        return d;
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn case_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("cases").join(format!("{name}.json"))
}

/// Identifies the code that runs the cases: the engine under test and the engine's, the
/// harness's and the references' code (crate::identity). A rebuild, copy or install of the
/// same code keeps it, so a resume reuses the finished cases; changed code re-runs them.
pub fn build_id() -> String {
    crate::identity::engine_identity()
}

/// A finished case in `dir`, if it is for this definition (and, with `same_build`, was run
/// by the same code ([`build_id`]): what resume requires; merge accepts any build).
fn finished(dir: &Path, def: &CaseDef, same_build: bool) -> Option<CaseResult> {
    let text = std::fs::read_to_string(case_path(dir, &def.name)).ok()?;
    let c: CaseResult = serde_json::from_str(&text).ok()?;
    // A case that killed its process is run again by a resume (the supervisor makes that safe).
    let ok = c.schema_version == SCHEMA_VERSION
        && c.fingerprint == def.fingerprint()
        && (!same_build || (c.build == build_id() && !c.crashed));
    ok.then_some(c)
}

pub struct RunReportOptions {
    pub suite: PathBuf,
    pub out: PathBuf,
    pub shard: Option<Shard>,
    pub history: Option<PathBuf>,
    /// Also write each case's complete run report to `DIR/runs/NAME.json`.
    pub full_json: bool,
    /// Run again the cases that crashed (a resume does; a worker restarted after a crash
    /// does not).
    pub rerun_crashed: bool,
    /// The most cases the suite may expand to (`--max-cases`, default [`crate::report::suite::MAX_CASES`]).
    pub max_cases: usize,
}

/// The exit code of a report (see docs/reports.md, "Exit codes"): 1 when a regression against
/// the history was found, or — without history — when any case is not as expected; else 0.
pub fn exit_code(rep: &Report, with_history: bool) -> u8 {
    let bad = if with_history { !rep.regressions.is_empty() } else { rep.totals.not_as_expected > 0 };
    u8::from(bad)
}

/// `lockstep report --suite FILE --out DIR`.
pub fn run_report(o: &RunReportOptions) -> Result<(Report, u8), HarnessError> {
    let suite = Suite::load_capped(&o.suite, o.max_cases)?;
    std::fs::create_dir_all(o.out.join("cases")).map_err(|e| io_err(&o.out, e))?;
    let record = SuiteRecord {
        schema_version: SCHEMA_VERSION,
        suite: suite.header.clone(),
        suite_path: o.suite.display().to_string(),
        cases: suite.cases.iter().map(|c| (c.name.clone(), c.fingerprint())).collect(),
        shard: o.shard.map(|s| format!("{}/{}", s.index, s.count)),
        defs: suite.cases.clone(),
    };
    write_file(&o.out.join("suite.json"), &to_json(&record))?;
    let mine: Vec<&CaseDef> =
        suite.cases.iter().enumerate().filter(|(k, _)| o.shard.is_none_or(|s| s.has(*k))).map(|(_, c)| c).collect();
    // A case that crashed is run again, unless it crashed under this very supervisor (which
    // restarted this worker after recording it).
    let done = |c: &CaseDef| finished(&o.out, c, true).is_some() || (!o.rerun_crashed && finished(&o.out, c, false).is_some_and(|r| r.crashed));
    let todo: Vec<&CaseDef> = mine.iter().copied().filter(|c| !done(c)).collect();
    let tty = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false");
    let quiet = crate::ui::get().quiet;
    let progress = std::rc::Rc::new(std::cell::RefCell::new(Progress::new(tty && !quiet, quiet, todo.len(), todo.iter().map(|c| c.steps).sum())));
    let skipped = mine.len() - todo.len();
    progress.borrow().line(&format!(
        "lockstep report: suite {} ({}), {} case(s){}{}",
        suite.header.name,
        o.suite.display(),
        mine.len(),
        o.shard.map(|s| format!(" in shard {}/{}", s.index, s.count)).unwrap_or_default(),
        if skipped > 0 { format!(", {skipped} already finished in {} (resumed)", o.out.display()) } else { String::new() }
    ));
    let mut cache = RefCache::default();
    let mut interrupted = false;
    for (k, def) in todo.iter().enumerate() {
        if crate::interrupt::interrupted() {
            interrupted = true;
            break;
        }
        // The case being run, for the supervisor (`report_supervised`) should it kill us.
        write_file(&o.out.join(RUNNING), &def.name)?;
        {
            let mut p = progress.borrow_mut();
            p.start_case(&def.name);
            if !p.tty {
                p.line(&format!("[{}/{}] {}: running ({} steps vs {})", k + 1, todo.len(), def.name, def.steps, def.references.join(",")));
            }
            p.draw(0, def.steps);
        }
        let hook_p = progress.clone();
        let mut bisecting = false;
        driver::set_observer(Some(Box::new(move |e: driver::RunEvent<'_>| {
            let mut p = hook_p.borrow_mut();
            match e {
                driver::RunEvent::Bisecting => {
                    bisecting = true;
                    p.draw_phase("bisect", 0);
                }
                // Bisect re-runs the case: show it, without moving the ETA.
                driver::RunEvent::Step { record, .. } if bisecting => p.draw_phase("bisect", record.step + 1),
                driver::RunEvent::Step { record, planned } => {
                    p.step(record.step + 1, planned);
                    p.draw(record.step + 1, planned);
                }
                driver::RunEvent::Started { .. } => {}
            }
        })));
        let c = run_case(def, &mut cache, o.full_json.then_some(o.out.as_path()));
        driver::set_observer(None);
        let Ok(c) = c else {
            // Ctrl-C: this case is not recorded (a resume runs it); the page shows the rest.
            let _ = std::fs::remove_file(o.out.join(RUNNING));
            progress.borrow().line(&format!("[{}/{}] {}: interrupted (not recorded)", k + 1, todo.len(), def.name));
            interrupted = true;
            break;
        };
        write_file(&case_path(&o.out, &def.name), &to_json(&c))?;
        let _ = std::fs::remove_file(o.out.join(RUNNING));
        let mut p = progress.borrow_mut();
        p.end_case(def.steps);
        p.line(&format!("[{}/{}] {}: {} ({:.1} s){}", k + 1, todo.len(), def.name, case_line(&c), c.timing.total_s, if c.as_expected { "" } else { "  <- not as expected" }));
    }
    drop(cache);
    let missing = if interrupted {
        format!("not run: the report was interrupted (Ctrl-C); run the same command again to resume (same --out {})", o.out.display())
    } else {
        "no result was written for this case".to_string()
    };
    let cases: Vec<CaseResult> = mine
        .iter()
        .map(|d| {
            // A crashed case's record is shown (it is what happened) though a resume re-runs it.
            finished(&o.out, d, true).or_else(|| finished(&o.out, d, false).filter(|c| c.crashed)).unwrap_or_else(|| CaseResult::error(d, missing.clone(), 0.0))
        })
        .collect();
    let rep = assemble(&record.suite, record.shard.clone(), cases, o.history.as_deref())?;
    write_outputs(&o.out, &rep)?;
    if interrupted {
        // The page shows what finished; the history is not told of a partial night.
        return Err(HarnessError::Interrupted);
    }
    if let Some(h) = &o.history {
        append_history(h, &rep)?;
    }
    let code = exit_code(&rep, o.history.is_some());
    Ok((rep, code))
}

/// The file naming the case a report's worker is running (removed when it is recorded).
const RUNNING: &str = "running";

/// Set in a report's worker process (see [`report_supervised`]).
pub const WORKER_ENV: &str = "LOCKSTEP_REPORT_WORKER";

/// `lockstep report` as a supervisor: the cases run in a worker process (this binary, same
/// arguments, [`WORKER_ENV`] set), so that a case which kills its process (an allocation
/// failure's abort, a crash in a reference's native code, the OOM killer) is recorded as that
/// case's error and the suite goes on in a new worker; the page is always written. The worker
/// exits with the report's own code; Ctrl-C reaches it (the supervisor ignores it) and its
/// 130 is passed on.
pub fn report_supervised(o: &RunReportOptions) -> Result<u8, HarnessError> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let suite = Suite::load_capped(&o.suite, o.max_cases)?;
    let exe = std::env::current_exe().map_err(|e| HarnessError::Env(format!("cannot find the lockstep binary to run the report's cases: {e}")))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // Each restart follows a recorded crash: at most one per case, and one to write the page.
    for attempt in 0..=suite.cases.len() + 1 {
        let first = attempt == 0;
        let _ = std::fs::remove_file(o.out.join(RUNNING));
        // The worker runs in a process group of its own, so that a terminal's Ctrl-C reaches
        // this process alone, which passes it (and SIGTERM, SIGHUP) on to the worker once and
        // waits for it: a process manager signals this PID, not the group, and the worker must
        // never outlive the command (it would write case files after it returned).
        crate::supervise::forward::install();
        let mut child = std::process::Command::new(&exe)
            .args(&args)
            .env(WORKER_ENV, if first { "1" } else { "restart" })
            .process_group(0)
            .spawn()
            .map_err(|e| HarnessError::Env(format!("cannot start {}: {e}", exe.display())))?;
        crate::supervise::forward::set_child(child.id());
        let status = child.wait().map_err(|e| HarnessError::Env(format!("waiting for the report's worker: {e}")))?;
        crate::supervise::forward::set_child(0);
        match crate::supervise::forward::received() {
            // Ctrl-C: the worker stopped at a step boundary and wrote the page (130).
            Some(libc::SIGINT) => return Ok(130),
            // 128 + the signal, as a shell reports a process the signal ended.
            Some(sig) => return Ok((128 + sig) as u8),
            None => {}
        }
        if let Some(code) = status.code().filter(|c| [0, 1, 2, 130].contains(c)) {
            return Ok(code as u8);
        }
        let how = match (status.code(), status.signal()) {
            (_, Some(s)) => format!("killed by signal {s} ({})", crate::supervise::signal_name(s)),
            (Some(c), None) => format!("exit code {c}"),
            (None, None) => "an unknown status".into(),
        };
        let case = std::fs::read_to_string(o.out.join(RUNNING)).unwrap_or_default();
        let Some(def) = suite.cases.iter().find(|c| c.name == case.trim()) else {
            return Err(HarnessError::Env(format!("the report's worker died ({how}) outside any case; run the command again to resume")));
        };
        eprintln!("lockstep report: case {} killed the process running it ({how}); recorded as an error, going on", def.name);
        let mut c = CaseResult::error(
            def,
            format!(
                "the case killed the process running it ({how}): an abort or a crash in the engine or a reference, \
                 or the system ran out of memory; run it alone with `lockstep run` to see its messages (a resume runs it again)"
            ),
            0.0,
        );
        c.crashed = true;
        write_file(&case_path(&o.out, &def.name), &to_json(&c))?;
    }
    Err(HarnessError::Env("the report's worker kept dying; see the messages above".into()))
}


/// The one-line verdict of a case: `pass`, `diverged at step 1 layer 0 q_rope (KL ...)`, `error: ...`.
pub fn case_line(c: &CaseResult) -> String {
    match c.verdict.as_str() {
        "error" => format!("error: {}", c.error.as_deref().unwrap_or("").lines().next().unwrap_or("")),
        v => format!(
            "{v}{} mean KL {} top-1 {}{}",
            if c.drift && v == "pass" { " (drift)" } else { "" },
            c.mean_kl.map(|x| format!("{x:.2e}")).unwrap_or("-".into()),
            c.top1.map(|x| format!("{:.0}%", x * 100.0)).unwrap_or("-".into()),
            if c.first_divergence.is_some() { format!(", first divergence {}", c.where_short()) } else { String::new() }
        ),
    }
}

fn read_history(path: &Path) -> Result<Vec<HistoryLine>, HarnessError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_err(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| io_err(path, format!("line {}: {e}", i + 1))))
        .collect()
}

fn history_line(suite: &str, date: &str, c: &CaseResult) -> HistoryLine {
    HistoryLine {
        date: date.to_string(),
        suite: suite.to_string(),
        case: c.name.clone(),
        verdict: c.verdict.clone(),
        as_expected: c.as_expected,
        mean_kl: c.mean_kl,
        max_kl: c.max_kl,
        top1: c.top1,
        first_divergence: c.first_divergence.as_ref().map(|_| c.where_short()),
        seconds: c.timing.total_s,
    }
}

/// Regressions of this report against each case's previous history line: a case that was
/// as expected (passed) and now is not; a new case that is not as expected; a mean KL more
/// than [`KL_GROWTH_FACTOR`] times the previous one and above [`KL_NOISE_NATS`].
pub fn regressions(cases: &[CaseResult], prev: &HashMap<String, HistoryLine>) -> Vec<Regression> {
    let mut out = vec![];
    for c in cases {
        let reason = match prev.get(&c.name) {
            None if !c.as_expected => Some(format!("new case, {} (expected {})", c.verdict, c.def.expect)),
            None => None,
            Some(p) if p.as_expected && !c.as_expected => {
                Some(format!("was {} on {}, now {} ({})", p.verdict, p.date, c.verdict, case_line(c)))
            }
            Some(p) => match (p.mean_kl, c.mean_kl) {
                (Some(a), Some(b)) if c.as_expected && b > KL_GROWTH_FACTOR * a && b > KL_NOISE_NATS => Some(format!(
                    "mean KL grew from {a:.2e} ({}) to {b:.2e} nats: more than x{KL_GROWTH_FACTOR} and above {KL_NOISE_NATS:e}",
                    p.date
                )),
                _ => None,
            },
        };
        if let Some(reason) = reason {
            out.push(Regression { case: c.name.clone(), reason });
        }
    }
    out
}

fn assemble(suite: &SuiteHeader, shard: Option<String>, cases: Vec<CaseResult>, history: Option<&Path>) -> Result<Report, HarnessError> {
    let date = now_utc();
    let past = match history {
        Some(h) => read_history(h)?,
        None => vec![],
    };
    let mut prev: HashMap<String, HistoryLine> = HashMap::new();
    let mut trend: BTreeMap<String, Vec<HistoryLine>> = BTreeMap::new();
    for l in past.iter().filter(|l| l.suite == suite.name) {
        prev.insert(l.case.clone(), l.clone());
        trend.entry(l.case.clone()).or_default().push(l.clone());
    }
    let regs = if history.is_some() { regressions(&cases, &prev) } else { vec![] };
    if history.is_some() {
        for c in &cases {
            let t = trend.entry(c.name.clone()).or_default();
            t.push(history_line(&suite.name, &date, c));
            let n = t.len();
            t.drain(..n.saturating_sub(TREND_NIGHTS));
        }
        trend.retain(|k, _| cases.iter().any(|c| &c.name == k));
    }
    let count = |v: &str| cases.iter().filter(|c| c.verdict == v).count();
    let totals = Totals {
        cases: cases.len(),
        pass: count("pass"),
        diverged: count("diverged"),
        error: count("error"),
        not_as_expected: cases.iter().filter(|c| !c.as_expected).count(),
    };
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        suite: suite.clone(),
        shard,
        totals,
        cases,
        regressions: regs,
        trend,
        thresholds: Thresholds { kl_growth_factor: KL_GROWTH_FACTOR, kl_noise_nats: KL_NOISE_NATS },
        generated_at: date,
        lockstep_version: env!("CARGO_PKG_VERSION").into(),
    })
}

fn append_history(path: &Path, rep: &Report) -> Result<(), HarnessError> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| io_err(path, e))?;
    for c in &rep.cases {
        let line = serde_json::to_string(&history_line(&rep.suite.name, &rep.generated_at, c)).expect("serializes");
        writeln!(f, "{line}").map_err(|e| io_err(path, e))?;
    }
    Ok(())
}

fn write_outputs(dir: &Path, rep: &Report) -> Result<(), HarnessError> {
    write_file(&dir.join("report.json"), &to_json(rep))?;
    write_file(&dir.join("summary.md"), &crate::report::html::summary_md(rep))?;
    write_file(&dir.join("index.html"), &crate::report::html::page(rep))?;
    Ok(())
}

/// `lockstep report merge DIR... --out DIR`: one report from the shards' directories. Every
/// directory must come from the same suite (same cases, same fingerprints); a case no shard
/// finished is an error of the merged report.
pub fn merge(dirs: &[PathBuf], out: &Path, history: Option<&Path>) -> Result<(Report, u8), HarnessError> {
    if dirs.is_empty() {
        return Err(HarnessError::Usage("report merge: give at least one shard directory".into()));
    }
    let mut record: Option<SuiteRecord> = None;
    for d in dirs {
        let p = d.join("suite.json");
        let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, format!("{e} (not a `lockstep report --out` directory?)")))?;
        let r: SuiteRecord = serde_json::from_str(&text).map_err(|e| io_err(&p, e))?;
        if r.schema_version != SCHEMA_VERSION {
            return Err(io_err(&p, format!("schema_version {} (this lockstep writes {SCHEMA_VERSION})", r.schema_version)));
        }
        match &record {
            None => record = Some(r),
            Some(first) if first.suite != r.suite || first.cases != r.cases => {
                return Err(HarnessError::Usage(format!(
                    "report merge: {} is from another suite or another version of it than {} (cases or their definitions differ)",
                    d.display(),
                    dirs[0].display()
                )))
            }
            Some(_) => {}
        }
    }
    let mut record = record.expect("at least one directory");
    record.shard = None;
    std::fs::create_dir_all(out.join("cases")).map_err(|e| io_err(out, e))?;
    write_file(&out.join("suite.json"), &to_json(&record))?;
    let mut cases = vec![];
    for def in &record.defs {
        let found = dirs.iter().find_map(|d| finished(d, def, false).map(|c| (d, c)));
        // The full run report travels with its case.
        if let Some((d, c)) = &found {
            if let Some(rel) = &c.run_json {
                let (from, to) = (d.join(rel), out.join(rel));
                std::fs::create_dir_all(to.parent().expect("runs/")).map_err(|e| io_err(out, e))?;
                std::fs::copy(&from, &to).map_err(|e| io_err(&from, e))?;
            }
        }
        let c = found
            .map(|(_, c)| c)
            .unwrap_or_else(|| CaseResult::error(def, "missing: no shard directory holds a result for this case".into(), 0.0));
        write_file(&case_path(out, &def.name), &to_json(&c))?;
        cases.push(c);
    }
    let rep = assemble(&record.suite, None, cases, history)?;
    write_outputs(out, &rep)?;
    if let Some(h) = history {
        append_history(h, &rep)?;
    }
    let code = exit_code(&rep, history.is_some());
    Ok((rep, code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, verdict: &str, mean_kl: Option<f64>) -> CaseResult {
        let def: CaseDef = toml::from_str(&format!(
            "name = '{name}'\nmodel = 'tiny'\nreferences = ['transformers']\nprompt = 'x'\nsteps = 2\n"
        ))
        .unwrap();
        let mut c = CaseResult::error(&def, String::new(), 0.0);
        c.verdict = verdict.into();
        c.as_expected = verdict == "pass";
        c.mean_kl = mean_kl;
        c
    }

    fn prev(c: &CaseResult) -> (String, HistoryLine) {
        (c.name.clone(), history_line("s", "2026-11-20T02:00:00Z", c))
    }

    #[test]
    fn regressions_are_new_failures_and_kl_growth_past_the_threshold() {
        let last: HashMap<String, HistoryLine> = [
            prev(&case("was-pass", "pass", Some(1e-3))),
            prev(&case("was-fail", "diverged", Some(1e-1))),
            prev(&case("kl-10x", "pass", Some(1e-3))),
            prev(&case("kl-noise", "pass", Some(1e-12))),
            prev(&case("kl-5x", "pass", Some(1e-3))),
        ]
        .into_iter()
        .collect();
        let now = [
            case("was-pass", "error", None),
            case("was-fail", "diverged", Some(2e-1)),
            case("kl-10x", "pass", Some(1.1e-2)),
            case("kl-noise", "pass", Some(1e-9)),
            case("kl-5x", "pass", Some(5e-3)),
            case("new-fail", "diverged", Some(1.0)),
            case("new-pass", "pass", Some(1e-12)),
        ];
        let r = regressions(&now, &last);
        let names: Vec<&str> = r.iter().map(|r| r.case.as_str()).collect();
        assert_eq!(names, ["was-pass", "kl-10x", "new-fail"], "{r:?}");
        assert!(r[1].reason.contains("mean KL grew"), "{}", r[1].reason);
    }

    #[test]
    fn dates_are_utc_iso() {
        let d = now_utc();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z') && &d[10..11] == "T", "{d}");
    }

    #[test]
    fn the_eta_counts_the_loading_of_the_cases_left() {
        use std::time::Duration;
        let ago = |s: u64| Instant::now() - Duration::from_secs(s);
        // Three cases of 10 steps. The first took 20 s to load and 9 s for its other 9 steps.
        let mut p = Progress::new(false, false, 3, 30);
        p.case_started = ago(29);
        p.case_first_step = Some(ago(9));
        p.case_steps_done = 10;
        p.end_case(10);
        // The second is loading since 5 s: 15 s of its load left, then 10 steps of 1 s,
        // then the third case's load (20 s) and steps (10 s).
        p.start_case("b");
        p.case_started = ago(5);
        let left = p.seconds_left().expect("measured");
        assert!((left - (15.0 + 10.0 + 20.0 + 10.0)).abs() < 1.0, "{left}");
        assert!(left > 40.0);
        // Nothing measured yet: no ETA.
        assert!(Progress::new(false, false, 2, 8).seconds_left().is_none());
    }
}
