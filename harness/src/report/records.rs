//! What `lockstep report` keeps: the per-case numbers ([`CaseResult`], a summary of a run's
//! records and its bisect report, deserializable for resume and merge), the suite record,
//! history lines and the report file. Data only; the runner fills them, the page reads them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::report::suite::{CaseDef, SuiteHeader};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstDivergence {
    pub step: usize,
    pub layer: Option<usize>,
    pub site: String,
    pub reference: String,
    pub detail: String,
}

/// Engine vs one reference over the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefNumbers {
    pub reference: String,
    pub version: String,
    /// How the engine's arithmetic relates to this reference's (same-weights, quant-vs-dense, ...).
    pub mode: String,
    pub mean_kl: Option<f64>,
    pub max_kl: Option<f64>,
    pub top1: Option<f64>,
    pub verdict: String,
    pub sites_not_compared: Vec<String>,
}

/// One reference against another: the noise floor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairNumbers {
    pub a: String,
    pub b: String,
    pub mean_kl: Option<f64>,
    pub max_kl: Option<f64>,
    pub top1: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRef {
    pub reference: String,
    pub kl: Option<f64>,
    pub top1_agree: bool,
    pub engine_top1: u32,
    pub reference_top1: u32,
    /// Top-1 minus top-2 log-probability on each side: how close the choice was to a flip.
    pub engine_margin: Option<f64>,
    pub reference_margin: Option<f64>,
    pub verdict: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepNumbers {
    pub step: usize,
    pub fed: usize,
    pub engine_token: u32,
    pub engine_token_text: String,
    pub verdict: String,
    pub references: Vec<StepRef>,
}

/// Per reference: `[step][layer]` the largest rel-L2 error over the layer's sites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerError {
    pub reference: String,
    pub steps: Vec<Vec<Option<f64>>>,
}

/// `[step][layer]` rel-L2 of the site kind (leaf name, e.g. `mlp_out`) that is worst over
/// the run, against the first reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heatmap {
    pub reference: String,
    pub site: String,
    pub cells: Vec<Vec<Option<f64>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BisectNumbers {
    pub found: bool,
    pub step: Option<usize>,
    pub layer: Option<usize>,
    pub site: Option<String>,
    pub reference: Option<String>,
    pub detail: Option<String>,
    pub isolation: Option<String>,
    pub diagnosis: Option<String>,
    pub diagnosis_title: Option<String>,
    pub evidence: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRow {
    pub name: String,
    pub engine: String,
    pub references: Vec<String>,
    pub differs: bool,
    pub info: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateNumbers {
    pub reference: String,
    pub matches: bool,
    pub first_mismatch: Option<usize>,
}

/// Seconds: the only fields that differ between two runs of the same case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Timing {
    pub run_s: f64,
    pub bisect_s: f64,
    pub total_s: f64,
}

/// Everything the report shows about one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    pub schema_version: u32,
    pub name: String,
    /// The case's definition and the lockstep version (`CaseDef::fingerprint`): shards merge
    /// only when these agree.
    pub fingerprint: String,
    /// The identity of the code that ran the case ([`build_id`], crate::identity): a resumed
    /// run reuses a finished case only from the same code, so a changed engine never reports
    /// stale numbers, and a rebuild of the same code re-runs nothing.
    pub build: String,
    pub def: CaseDef,
    /// `pass`, `diverged` or `error`.
    pub verdict: String,
    /// Some site or step drifted (over the noise floor, under the failure bound).
    pub drift: bool,
    /// The verdict is the one the case expects (`expect`, default `pass`).
    pub as_expected: bool,
    pub error: Option<String>,
    pub model_path: Option<String>,
    pub first_divergence: Option<FirstDivergence>,
    /// Worst over the references: largest mean and max KL, smallest top-1 agreement.
    pub mean_kl: Option<f64>,
    pub max_kl: Option<f64>,
    pub top1: Option<f64>,
    pub references: Vec<RefNumbers>,
    pub pairs: Vec<PairNumbers>,
    pub num_layers: usize,
    pub engine_weights: Option<String>,
    pub faults: Vec<String>,
    pub engine_text: String,
    pub stopped_before_step0: Option<String>,
    /// With an adapter: the LoRA checks as `lockstep run` prints them (inventory diff,
    /// unattached tensors, the adapter's effect and where).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
    pub steps: Vec<StepNumbers>,
    pub layer_error: Vec<LayerError>,
    pub heatmap: Option<Heatmap>,
    pub generate: Vec<GenerateNumbers>,
    pub config: Vec<ConfigRow>,
    pub bisect: Option<BisectNumbers>,
    /// With `--full-json`: the case's complete run report (`lockstep run --json`: every site
    /// of every step), relative to the report directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_json: Option<String>,
    pub timing: Timing,
    /// The case killed the process that ran it (an abort, a crash, the kernel's OOM killer):
    /// the report's supervisor recorded the error, and a resume runs the case again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub crashed: bool,
}

/// What a report directory holds about its suite (`DIR/suite.json`), for resume and merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteRecord {
    pub schema_version: u32,
    pub suite: SuiteHeader,
    pub suite_path: String,
    /// Every case of the suite, in order, with its fingerprint.
    pub cases: Vec<(String, String)>,
    pub shard: Option<String>,
    pub defs: Vec<CaseDef>,
}

/// One night's line of the history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryLine {
    pub date: String,
    pub suite: String,
    pub case: String,
    pub verdict: String,
    pub as_expected: bool,
    pub mean_kl: Option<f64>,
    pub max_kl: Option<f64>,
    pub top1: Option<f64>,
    pub first_divergence: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Regression {
    pub case: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub cases: usize,
    pub pass: usize,
    pub diverged: usize,
    pub error: usize,
    pub not_as_expected: usize,
}

/// `DIR/report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub suite: SuiteHeader,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shard: Option<String>,
    pub totals: Totals,
    pub cases: Vec<CaseResult>,
    /// Regressions against the history's previous line of each case (with --history).
    pub regressions: Vec<Regression>,
    /// Per case: the last nights of the history, oldest first, this report included.
    pub trend: BTreeMap<String, Vec<HistoryLine>>,
    pub thresholds: Thresholds,
    /// When the report was written (UTC): a timing field, like every `timing`.
    pub generated_at: String,
    pub lockstep_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub kl_growth_factor: f64,
    pub kl_noise_nats: f64,
}

