//! The records of one lockstep run: per step and site, per reference and pair of references,
//! the prompt and free-running checks, the run's summary. Data only (serializable to the JSON
//! report); the loop fills them, reports and bisect read them.

use serde::Serialize;

use crate::compare::tolerance::{Precision, QuantBounds, SiteKind, Verdict, WeightsMode};
use crate::compare::{LogitMetrics, TensorMetrics};

/// The reference tensors bisect keeps from the first failing step: the localized site's
/// layer, all its sites, and its input (`layers.{L-1}.out` or `embed`).
#[derive(Debug, Clone, Default)]
pub struct KeptStep {
    pub reference: usize,
    pub step: usize,
    /// The positions fed before the call the tensors come from, and in it (a step is one
    /// call, or a long prompt's pieces: `--prefill-chunk`).
    pub start: usize,
    pub fed: usize,
    /// Index of the localized site in that reference's `sites` of this step.
    pub site_index: usize,
    /// site -> (shape, values), HF layout.
    pub arrays: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// Sliding-window layers: the reference's `cache_k` / `cache_v` rows over the run up to the
    /// call before this one (site -> (position of the first row, shape, values); at most
    /// `WINDOW_HISTORY_ROWS`): the positions its window evicted, which isolation gives the
    /// engine's layer (it attends over what its span says) and the window evidence reads.
    pub window_before: std::collections::BTreeMap<String, (usize, Vec<usize>, Vec<f32>)>,
    /// The engine's own values of the localized site at this step (shape, values; compared
    /// form): what the evidence reads where the engine cannot run one layer alone.
    pub engine_site: Option<(Vec<usize>, Vec<f32>)>,
}

/// One site of one step, engine vs one reference.
#[derive(Debug, Clone, Serialize)]
pub struct SiteRecord {
    pub site: String,
    pub layer: Option<usize>,
    pub kind: SiteKind,
    pub engine_shape: Vec<usize>,
    pub reference_shape: Vec<usize>,
    /// `None` when the shapes differ (nothing to compare element-wise).
    pub metrics: Option<TensorMetrics>,
    pub verdict: Verdict,
    /// The noise floor used: the smallest rel-L2 between this reference and another one at
    /// this site and step (absent with a single reference).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<f64>,
    /// With an f64 oracle in the run: rel-L2 of the engine and of this reference to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle: Option<OracleDistance>,
    /// Transform applied to the engine tensor before comparing (e.g. gguf-qk-deinterleave).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transform: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// MoE sites (`router`, `expert_weights`): the chosen experts compared per position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<crate::compare::routing::RoutingRecord>,
    /// A sliding-window layer's cache that fails: `Some(n)` when the engine's rows are the
    /// reference's `n` positions earlier (its row `j + n` equals the reference's row `j`, `n`
    /// the positions this call fed): the window was not moved by this call. A window's
    /// canonical form has the same length on both sides, so a stale window shows here, not in
    /// its length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_lag: Option<usize>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct OracleDistance {
    pub engine_rel_l2: f64,
    pub reference_rel_l2: f64,
}

/// Engine vs one reference at one step.
#[derive(Debug, Clone, Serialize)]
pub struct RefStep {
    pub reference: String,
    pub sites: Vec<SiteRecord>,
    /// Next-token distribution at the last position fed.
    pub logits: LogitMetrics,
    pub logits_verdict: Verdict,
    /// Largest KL over all positions fed in this step (the prompt positions at step 0).
    pub kl_max_positions: f64,
    pub verdict: Verdict,
    pub seconds: f64,
}

/// One reference vs another at one step: the measured noise floor.
#[derive(Debug, Clone, Serialize)]
pub struct PairStep {
    pub a: String,
    pub b: String,
    /// (site, metrics of a vs b) for every site both provide.
    pub sites: Vec<(String, TensorMetrics)>,
    /// KL(b || a) etc. at the last position.
    pub logits: LogitMetrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: usize,
    /// Tokens fed to every side at this step.
    pub fed: Vec<u32>,
    /// The tokens of each call when the step was fed in pieces (`--prefill-chunk`); empty
    /// when it was one call.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<usize>,
    /// The engine's choice, fed at the next step.
    pub engine_token: u32,
    pub engine_token_text: String,
    /// Worst verdict over all references.
    pub verdict: Verdict,
    pub engine_seconds: f64,
    /// The whole step's wall time: every side's forward and capture, and lockstep's
    /// conversions and comparisons (what is neither `engine_seconds` nor a reference's
    /// `seconds` is lockstep's own per-step overhead).
    pub seconds: f64,
    pub references: Vec<RefStep>,
    pub pairs: Vec<PairStep>,
    /// Sampler parity per reference that has a sampler (with `--sampler`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sampler: Vec<crate::results::checks::SamplerCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    pub step: usize,
    pub layer: Option<usize>,
    pub site: String,
    pub reference: String,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likely_cause: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptCheck {
    pub mode: &'static str,
    pub text: String,
    pub engine_ids: Vec<u32>,
    /// Each reference's own encoding of the prompt.
    pub reference_ids: Vec<(String, Vec<u32>)>,
    pub ids_match: bool,
    /// Chat prompts: the engine's rendered template text, and per reference where its
    /// rendering differs (None: identical).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_rendered: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rendered_diff: Vec<(String, Option<crate::results::checks::TextDiff>)>,
    /// When the ids differ: the pieces of every side's ids (engine first), for the report.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pieces: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateCheck {
    pub reference: String,
    /// The reference's own greedy `generate` on the engine's prompt ids.
    pub reference_tokens: Vec<u32>,
    pub reference_text: String,
    pub matches: bool,
    pub first_mismatch: Option<usize>,
    pub verdict: Verdict,
}

/// Per reference, over the run.
#[derive(Debug, Clone, Serialize)]
pub struct RefSummary {
    pub reference: String,
    /// How the engine's arithmetic relates to this reference's (decides the tolerances).
    pub mode: WeightsMode,
    /// The next-token bounds used in the quantized modes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quant_bounds: Option<QuantBounds>,
    pub sites_compared_per_step: usize,
    pub sites_not_compared: Vec<String>,
    pub mean_kl: f64,
    pub max_kl: f64,
    pub same_top1_share: f64,
    /// The share of steps where the engine's top-1 is this reference's or another reference's
    /// of the run: a flip the references make among themselves (llama.cpp, on the quantized
    /// weights, choosing the engine's token where transformers, dense, does not) is within
    /// their own spread. The quantized modes' top-1 bound reads this one.
    pub top1_share_within_refs: f64,
    /// Largest |Δp| of the reference's top token over the steps.
    pub max_abs_delta_p: f64,
    pub worst_rel_l2: Vec<WorstSite>,
    pub seconds: f64,
    pub verdict: Verdict,
}

/// Per pair of references, over the run.
#[derive(Debug, Clone, Serialize)]
pub struct PairSummary {
    pub a: String,
    pub b: String,
    pub sites_compared_per_step: usize,
    pub mean_kl: f64,
    pub max_kl: f64,
    pub same_top1_share: f64,
    pub worst_rel_l2: Vec<WorstSite>,
}

/// Worst relative L2 error of one site kind over the run.
#[derive(Debug, Clone, Serialize)]
pub struct WorstSite {
    pub kind: SiteKind,
    pub site: String,
    pub step: usize,
    pub rel_l2: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub steps: usize,
    pub steps_requested: usize,
    /// The engine chose an end-of-sequence token before `steps_requested`.
    pub stopped_at_eos: bool,
    pub engine_seconds: f64,
    pub references: Vec<RefSummary>,
    pub pairs: Vec<PairSummary>,
    /// With an f64 oracle: per f32 reference, at how many (step, site) the engine is
    /// closer to the oracle than that reference is.
    pub oracle: Vec<OracleSummary>,
    /// Seconds each side took to load (engine first), when the command measured it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load: Vec<LoadTime>,
}

/// How long one side (the engine, a reference) took to load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadTime {
    pub side: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OracleSummary {
    pub oracle: String,
    pub reference: String,
    pub engine_closer: usize,
    pub reference_closer: usize,
    /// Comparisons where both are exactly as far (e.g. embeddings, identical on both).
    pub ties: usize,
    /// Per site leaf name (attn_norm, q, ..., logits): median over layers and steps of
    /// rel-L2(engine, oracle) and rel-L2(reference, oracle).
    pub per_site: Vec<(String, f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Bisect's kept reference tensors (not serialized).
    #[serde(skip)]
    pub kept: Option<KeptStep>,
    /// The run's predicted memory (`--max-memory`, or a prompt fed in pieces), in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::lockstep::memory::MemoryPlan>,
    pub verdict_pass: bool,
    pub first_divergence: Option<Divergence>,
    pub prompt: PromptCheck,
    pub steps: Vec<StepRecord>,
    pub engine_tokens: Vec<u32>,
    pub engine_text: String,
    pub generate: Vec<GenerateCheck>,
    pub summary: RunSummary,
    pub engine: EngineInfo,
    pub num_layers: usize,
    /// The generation-config table (computed before step 0).
    pub config: crate::results::checks::GenConfig,
    /// The run stopped before step 0 (prompt tokens or, with --strict-config, the config differ).
    pub stopped_before_step0: Option<String>,
    /// The engine's sampler, and the references without sampler parity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampler: Option<SamplerInfo>,
    /// With `--lora`: the inventories, their diff and the adapter's effect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::results::checks::LoraReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SamplerInfo {
    pub engine: String,
    pub compared: Vec<String>,
    pub not_compared: Vec<String>,
    /// Over the run, per compared reference: (name, max TV, steps with equal kept sets, steps).
    pub summary: Vec<(String, f64, usize, usize)>,
}

/// What the engine under test taps, against its family's canonical site graph.
#[derive(Debug, Clone, Serialize)]
pub struct EngineTaps {
    /// Sites the engine declares.
    pub declared: usize,
    /// Sites of the family's canonical graph (`None`: the family is unknown to lockstep).
    pub canonical: Option<usize>,
    /// Canonical sites the engine does not declare (never compared).
    pub not_declared: Vec<String>,
    /// How far bisect localizes with these taps: `step`, `layer` or `site`.
    pub localizes_to: &'static str,
    /// Which taps would let bisect localize further (`None`: it already reaches the site).
    pub hint: Option<String>,
    /// The model type (`qwen3`, `gemma3`) when no family mapping knows it: only the generic
    /// sites of any decoder are compared (`None`: the family's detailed sites are).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generic: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineInfo {
    /// The engine under test (`lockstep-engine`, or a plug-in's name).
    pub name: String,
    /// Its family (`llama`).
    pub family: String,
    /// What it taps.
    pub taps: EngineTaps,
    /// Where the weights came from (hf-safetensors, gguf).
    pub weights: &'static str,
    /// quantized or dequant.
    pub weights_mode: &'static str,
    /// Storage types of the matrices, e.g. ["Q4_1", "Q8_0"] (["f32"] when dense).
    pub matrix_types: Vec<String>,
    /// Faults injected with `--inject` (empty in normal use).
    pub faults: Vec<String>,
    /// The RoPE scaling the engine applies and on which layers (`None`: unscaled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope: Option<String>,
    /// The sliding windows the engine's layers attend over, and which layers (`None`: every
    /// layer global).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<String>,
    pub dtype: Precision,
    pub qk_layout: &'static str,
    pub transforms: Vec<&'static str>,
}

