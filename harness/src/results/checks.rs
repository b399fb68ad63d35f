//! The records of the checks beside the per-site comparison: sampler parity per step, the
//! rendered-prompt difference, the generation-config table, and a LoRA adapter's inventory
//! and effect. Data only, with the verdict each implies.

use lockstep_engine::lora::{InventoryEntry, LoraConfig};
use lockstep_engine::sample::Stage;
use std::fmt::Write as _;

use serde::Serialize;

use crate::compare::tolerance::Verdict;

/// Engine vs one reference's sampler at one step.
#[derive(Debug, Clone, Serialize)]
pub struct SamplerCheck {
    pub reference: String,
    /// The stages that ran, in the reference's order (e.g. "temperature > top_p").
    pub order: String,
    /// Total-variation distance, 0.5 * sum |p_engine - p_reference|.
    pub tv: f64,
    pub kept_engine: usize,
    pub kept_reference: usize,
    pub kept_equal: bool,
    /// Up to 8 ids kept by one side only.
    pub only_engine: Vec<u32>,
    pub only_reference: Vec<u32>,
    /// The filter whose closest keep/drop decision was nearest its threshold, and how near.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tightest: Option<(Stage, f64)>,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// On a failure: a simple misconfiguration of the engine's sampler that reproduces the
    /// engine's distribution exactly ([`explain`]), the evidence of bisect's diagnosis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explained: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TextDiff {
    pub reference: String,
    pub char_index: usize,
    pub engine: String,
    pub theirs: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: &'static str,
    pub engine: String,
    /// One per reference, in the run's order.
    pub references: Vec<String>,
    /// Some reference's value differs from the engine's.
    pub differs: bool,
    /// Information only: never counts as a difference.
    pub info: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenConfig {
    pub references: Vec<String>,
    pub rows: Vec<Row>,
    /// Each reference's declared sampler stages and repetition window (None: no sampler).
    #[serde(skip)]
    pub declared: Vec<Option<(Vec<String>, Option<usize>)>>,
    /// Each reference's chat template text (for the prompt check's message).
    #[serde(skip)]
    pub templates: Vec<Option<String>>,
}

impl GenConfig {
    pub fn differences(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.differs && !r.info).collect()
    }
}

/// One side's adapter: its inventory and its own account of the configuration.
#[derive(Debug, Clone, Serialize)]
pub struct SideInventory {
    pub side: String,
    pub entries: Vec<InventoryEntry>,
    /// How the side loaded the adapter (loader, effective config), as it reports it.
    pub config: serde_json::Value,
}

/// One difference between a reference's inventory and the engine's.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryDiff {
    pub side: String,
    pub module: String,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerEffect {
    pub layer: usize,
    /// The adapted modules of this layer (empty: none).
    pub adapted: Vec<String>,
    /// rel-L2 of `layers.{i}.out`, adapted vs base.
    pub rel_l2: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterEffect {
    /// Tokens run through both models.
    pub tokens: usize,
    /// rel-L2 of the logits (all positions), adapted vs base.
    pub logits_rel_l2: f64,
    /// Largest KL(adapted || base) over the positions.
    pub max_kl: f64,
    /// Positions whose top-1 token the adapter changes.
    pub top1_changed: usize,
    pub per_layer: Vec<LayerEffect>,
    /// The noise floor the effect must exceed, and where it comes from.
    pub floor: f64,
    pub floor_source: String,
    pub has_effect: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoraReport {
    pub dir: String,
    pub mode: &'static str,
    pub config: LoraConfig,
    pub sides: Vec<SideInventory>,
    pub diffs: Vec<InventoryDiff>,
    /// Tensors of the file attached to nothing.
    pub unattached: Vec<String>,
    /// Targeted modules without tensors in the file.
    pub missing: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effect: Option<AdapterEffect>,
}


pub(crate) fn list(v: &[String], n: usize) -> String {
    let mut s = v.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > n {
        let _ = write!(s, " (+{} more)", v.len() - n);
    }
    s
}
