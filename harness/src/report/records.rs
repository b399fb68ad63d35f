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
    /// The next-token KL bounds this reference was judged with (per step: pass at or under
    /// `pass_kl`, fail over `fail_kl`): the f32 logit tolerance, or the quantized row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_kl: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_kl: Option<f64>,
}

/// One reference against another: the noise floor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairNumbers {
    pub a: String,
    pub b: String,
    pub mean_kl: Option<f64>,
    pub max_kl: Option<f64>,
    pub top1: Option<f64>,
    /// Per step: KL between the two references' next-token distributions (the noise floor
    /// drawn on the KL chart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kl: Vec<Option<f64>>,
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
    /// Per layer: the rel-L2 bounds of the layer's sites against this reference (pass at or
    /// under `pass_bound`, fail over `fail_bound`; the tightest over the layer's sites).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pass_bound: Vec<Option<f64>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail_bound: Vec<Option<f64>>,
    /// Per layer: the noise floor, the largest over steps and the layer's sites of the
    /// smallest rel-L2 between this reference and another one (empty with one reference).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub floor: Vec<Option<f64>>,
}

/// `[step][layer]` rel-L2 of the site kind (leaf name, e.g. `mlp_out`) that is worst over
/// the run, against the first reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heatmap {
    pub reference: String,
    pub site: String,
    pub cells: Vec<Vec<Option<f64>>>,
    /// Per layer: the site's rel-L2 bounds (the page colours each cell by rel-L2 ÷ pass
    /// bound, on one scale for every case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pass_bound: Vec<Option<f64>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail_bound: Vec<Option<f64>>,
}

/// The case's largest error relative to its bound, over every reference, step and compared
/// site (rel-L2 ÷ the site's pass bound) and every step's next-token KL (KL ÷ its pass
/// bound): how wrong the case is, what the page sorts by within a verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorstError {
    /// `value / pass_bound`: at most 1 within the pass bound.
    pub ratio: f64,
    pub value: f64,
    /// `rel-l2` (a site) or `kl` (the next-token distribution).
    pub metric: String,
    pub pass_bound: f64,
    pub fail_bound: f64,
    pub step: usize,
    pub layer: Option<usize>,
    pub site: String,
    pub reference: String,
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
    /// The largest error relative to its bound (absent when nothing was compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst: Option<WorstError>,
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


/// *The* first divergence of a case ([`CaseResult::divergence`]) and who located it.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<'a> {
    pub step: usize,
    pub layer: Option<usize>,
    pub site: &'a str,
    pub reference: &'a str,
    pub detail: &'a str,
    /// Bisect's localization (`false`: the run's first failing site).
    pub by_bisect: bool,
}

impl CaseResult {
    /// Where the case first diverged: bisect's localization when bisect ran and found one
    /// (it follows the data flow: a cache whose length differs, then the first site in forward
    /// order over its pass bound, checked by running the layer in isolation), otherwise the
    /// run's first site over its fail bound. The other one, when both exist, is evidence.
    pub fn divergence(&self) -> Option<Located<'_>> {
        if let Some(b) = self.bisect.as_ref().filter(|b| b.found && b.error.is_none()) {
            if let (Some(step), Some(site)) = (b.step, b.site.as_deref()) {
                return Some(Located {
                    step,
                    layer: b.layer,
                    site,
                    reference: b.reference.as_deref().unwrap_or(""),
                    detail: b.detail.as_deref().unwrap_or(""),
                    by_bisect: true,
                });
            }
        }
        self.first_divergence.as_ref().map(|d| Located {
            step: d.step,
            layer: d.layer,
            site: &d.site,
            reference: &d.reference,
            detail: &d.detail,
            by_bisect: false,
        })
    }

    /// The verdict class, most wrong first: 0 error (nothing could be compared), 1 diverged,
    /// 2 drift (passed, but over the noise floor somewhere), 3 pass.
    pub fn verdict_rank(&self) -> u8 {
        match self.verdict.as_str() {
            "diverged" => 1,
            "pass" if self.drift => 2,
            "pass" => 3,
            _ => 0,
        }
    }
}

/// The cases in the order the page shows them: by verdict class ([`CaseResult::verdict_rank`]),
/// within a class by the worst error relative to its bound, largest first (cases with no
/// compared numbers last), then in the suite's order.
pub fn by_severity(cases: &[CaseResult]) -> Vec<&CaseResult> {
    let mut v: Vec<&CaseResult> = cases.iter().collect();
    let ratio = |c: &CaseResult| c.worst.as_ref().map(|w| w.ratio).unwrap_or(f64::NEG_INFINITY);
    // A stable sort: equal keys keep the suite's order.
    v.sort_by(|a, b| a.verdict_rank().cmp(&b.verdict_rank()).then(ratio(b).total_cmp(&ratio(a))));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, verdict: &str, drift: bool, ratio: Option<f64>) -> CaseResult {
        let def: CaseDef =
            toml::from_str(&format!("name = '{name}'\nmodel = 'tiny'\nreferences = ['transformers']\nprompt = 'x'\nsteps = 2\n")).unwrap();
        let mut c = CaseResult::error(&def, String::new(), 0.0);
        c.verdict = verdict.into();
        c.drift = drift;
        c.worst = ratio.map(|ratio| WorstError {
            ratio,
            value: ratio * 1e-4,
            metric: "rel-l2".into(),
            pass_bound: 1e-4,
            fail_bound: 1e-2,
            step: 0,
            layer: Some(0),
            site: "layers.0.q".into(),
            reference: "transformers".into(),
        });
        c
    }

    #[test]
    fn cases_sort_by_verdict_class_then_worst_error_over_its_bound() {
        let cases = vec![
            case("pass-half", "pass", false, Some(0.5)),
            case("diverged-10", "diverged", false, Some(10.0)),
            case("pass-clean", "pass", false, Some(0.01)),
            case("drift", "pass", true, Some(0.2)),
            case("pass-unknown", "pass", false, None),
            case("diverged-1e6", "diverged", false, Some(1e6)),
            case("error", "error", false, None),
            case("pass-half-later", "pass", false, Some(0.5)),
        ];
        let order: Vec<&str> = by_severity(&cases).iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            order,
            ["error", "diverged-1e6", "diverged-10", "drift", "pass-half", "pass-half-later", "pass-clean", "pass-unknown"],
            "errors, diverged, drift, pass; within a class the worst ratio first, ties in the suite's order"
        );
    }

    #[test]
    fn the_first_divergence_is_bisects_when_it_localized_one() {
        let mut c = case("c", "diverged", false, Some(1e3));
        assert_eq!(c.divergence(), None);
        c.first_divergence = Some(FirstDivergence {
            step: 1,
            layer: Some(0),
            site: "layers.0.q_rope".into(),
            reference: "transformers".into(),
            detail: "rel-L2 0.9".into(),
        });
        let run = c.divergence().unwrap();
        assert!(!run.by_bisect && run.site == "layers.0.q_rope");
        let mut b = BisectNumbers {
            found: true,
            step: Some(1),
            layer: Some(0),
            site: Some("layers.0.cache_k".into()),
            reference: Some("transformers".into()),
            detail: Some("the engine's cache holds 1 position".into()),
            isolation: None,
            diagnosis: Some("context-dropped".into()),
            diagnosis_title: None,
            evidence: vec![],
            error: None,
        };
        c.bisect = Some(b.clone());
        let d = c.divergence().unwrap();
        assert!(d.by_bisect && d.site == "layers.0.cache_k" && d.step == 1 && d.layer == Some(0), "{d:?}");
        // Bisect found nothing, or failed: the run's first failing site stands.
        b.found = false;
        c.bisect = Some(b.clone());
        assert_eq!(c.divergence().unwrap().site, "layers.0.q_rope");
        b.found = true;
        b.error = Some("out of memory".into());
        c.bisect = Some(b);
        assert_eq!(c.divergence().unwrap().site, "layers.0.q_rope");
    }
}
