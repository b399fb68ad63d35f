//! Recording golden traces (`lockstep record`, `lockstep snapshots`).
//!
//! Recording is a lockstep run: the engine and live references step together exactly as in
//! `lockstep run` (same prompt, teacher forcing, same report), and each reference is wrapped
//! in a [`Recorder`] that copies what it answers (prompt ids, every site of every step, its
//! own greedy `generate`) before handing it on to the driver. After the run, [`write_traces`]
//! stores one trace per reference (`trace.rs` has the format).
//!
//! What is kept in full and what as a sketch ([`KeepPolicy`]): logits, caches, `embed` and
//! `final_norm` always in full (caches as the rows each step appends; the logits of a call
//! past `trace::LOGITS_IN_FULL` values as their top entries, `@topk`); the sites of the
//! layers in `full_layers` in full, those of every other layer as sketches. The tiny
//! fixture keeps every layer; SmolLM2 a few (see snapshots/traces/manifest.toml).
//!
//! Recording is deterministic: nothing time- or machine-dependent is written (no timings,
//! model paths relative to the repository or the reference environment), JSON maps are
//! ordered, safetensors sorts its tensors, and the references compute the same numbers for
//! the same inputs on the same machine (checked by `make snapshots` twice + `git status`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use lockstep_engine::sites::layer_of;
use crate::results::run::{RunResult};
use crate::error::HarnessError;
use crate::compare::Data;
use crate::reference::{Backend, Reference, StepOutput};
use crate::compare::data::TopKLogits;
use crate::compare::sketch::{Sketch, K};
use crate::compare::tolerance::SiteKind;
use crate::golden::trace::{self, Form, Stored, TraceMeta};

/// Which sites a trace keeps in full.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeepPolicy {
    /// Layers kept in full; `None`: every layer.
    pub full_layers: Option<Vec<usize>>,
    /// Only these sites are recorded (`record --engine-sites`: what the engine under test
    /// declares, so that a logits-only engine's traces hold the logits alone); `None`: all.
    pub only: Option<Vec<String>>,
}

impl KeepPolicy {
    pub fn form(&self, site: &str) -> Form {
        match SiteKind::of(site) {
            SiteKind::Cache => Form::NewRows,
            SiteKind::Logits => Form::Full,
            SiteKind::Activation => match (layer_of(site), &self.full_layers) {
                (Some(l), Some(keep)) if !keep.contains(&l) => Form::Sketch,
                _ => Form::Full,
            },
        }
    }
}

/// A live reference whose answers are copied into a trace as they pass.
pub struct Recorder {
    live: Box<dyn Backend>,
    sites: Vec<String>,
    policy: KeepPolicy,
    state: RefCell<RecState>,
}

#[derive(Default)]
struct RecState {
    prompt: Option<(String, String, Vec<u32>)>,
    fed: Vec<Vec<u32>>,
    tensors: Vec<(String, Stored)>,
    /// The whole cache of each cache site after the previous step: (shape, data).
    caches: HashMap<String, (Vec<usize>, Stored)>,
    generate: Option<(Vec<u32>, usize, Vec<u32>, Vec<u32>)>,
    full_per_step: usize,
    sketched_per_step: usize,
}

/// Wraps a live reference (a Python one, or an engine: `--reference engine` records the
/// engine under test) so that what it answers is recorded.
pub fn recording(r: Reference, policy: KeepPolicy) -> Result<Reference, HarnessError> {
    let Reference { name, spec, backend: live, description } = r;
    if spec.trace.is_some() {
        return Err(HarnessError::Usage(format!("{name}: a replayed trace cannot be recorded again; record from the live reference")));
    }
    let mut description = description;
    if let Some(only) = &policy.only {
        description.sites.retain(|s| only.contains(s));
    }
    let sites = description.sites.clone();
    let rec = Recorder { live, sites, policy, state: RefCell::new(RecState::default()) };
    Ok(Reference { name, spec, backend: Box::new(rec), description })
}

fn copy_data(shape: &[usize], d: Data<'_>) -> Stored {
    match d {
        Data::F32(x) => Stored::F32 { shape: shape.to_vec(), data: x.to_vec() },
        Data::F64(x) => Stored::F64 { shape: shape.to_vec(), data: x.to_vec() },
        Data::Sketch(_) | Data::TopK(_) | Data::TopKRow(..) => unreachable!("a live reference returns arrays"),
    }
}

/// Rows of a `[h, len, d]` cache past the first `from`: `Some` when the first `from` rows
/// of `now` equal `before` bit for bit.
fn new_rows(before: &(Vec<usize>, Stored), now_shape: &[usize], now: &Stored) -> Option<Stored> {
    let (bshape, b) = before;
    let (&[h, a, d], &[h2, n, d2]) = (bshape.as_slice(), now_shape) else { return None };
    if h != h2 || d != d2 || n < a {
        return None;
    }
    fn split<T: Copy + PartialEq>(b: &[T], x: &[T], h: usize, a: usize, n: usize, d: usize) -> Option<Vec<T>> {
        let mut out = Vec::with_capacity(h * (n - a) * d);
        for head in 0..h {
            let row = &x[head * n * d..(head + 1) * n * d];
            let old = &b[head * a * d..(head + 1) * a * d];
            // Bitwise equality (NaN-safe): compare as bytes through the bit patterns.
            if row[..a * d].iter().zip(old).any(|(p, q)| p != q) {
                return None;
            }
            out.extend_from_slice(&row[a * d..]);
        }
        Some(out)
    }
    let shape = vec![h, n - a, d];
    match (b, now) {
        (Stored::F32 { data: bd, .. }, Stored::F32 { data: xd, .. }) => {
            let bb: Vec<u32> = bd.iter().map(|v| v.to_bits()).collect();
            let xb: Vec<u32> = xd.iter().map(|v| v.to_bits()).collect();
            split(&bb, &xb, h, a, n, d).map(|v| Stored::F32 { shape, data: v.into_iter().map(f32::from_bits).collect() })
        }
        (Stored::F64 { data: bd, .. }, Stored::F64 { data: xd, .. }) => {
            let bb: Vec<u64> = bd.iter().map(|v| v.to_bits()).collect();
            let xb: Vec<u64> = xd.iter().map(|v| v.to_bits()).collect();
            split(&bb, &xb, h, a, n, d).map(|v| Stored::F64 { shape, data: v.into_iter().map(f64::from_bits).collect() })
        }
        _ => None,
    }
}

impl Backend for Recorder {
    fn reset(&self) -> Result<(), HarnessError> {
        self.live.reset()?;
        let mut st = self.state.borrow_mut();
        let prompt = st.prompt.take();
        *st = RecState { prompt, ..RecState::default() };
        Ok(())
    }

    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, HarnessError> {
        let ids = self.live.encode_prompt(text)?;
        self.state.borrow_mut().prompt = Some(("prompt".to_string(), text.to_string(), ids.clone()));
        Ok(ids)
    }

    fn encode_chat(&self, user: &str) -> Result<Vec<u32>, HarnessError> {
        let ids = self.live.encode_chat(user)?;
        self.state.borrow_mut().prompt = Some(("chat".to_string(), user.to_string(), ids.clone()));
        Ok(ids)
    }

    fn object(&self) -> Option<&pyo3::Py<pyo3::PyAny>> {
        self.live.object()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn generate_greedy(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError> {
        let toks = self.live.generate_greedy(ids, n, stop)?;
        self.state.borrow_mut().generate = Some((ids.to_vec(), n, stop.to_vec(), toks.clone()));
        Ok(toks)
    }

    /// Steps the live reference and copies every site of its answer.
    fn step(&self, ids: &[u32], label: &str) -> Result<StepOutput, HarnessError> {
        let out = self.live.step(ids, label)?;
        let mut st = self.state.borrow_mut();
        let step = st.fed.len();
        st.fed.push(ids.to_vec());
        let (mut full, mut sketched) = (0, 0);
        StepOutput::with_views([&out], |views| -> Result<(), HarnessError> {
            for site in &self.sites {
                let got = views[0].with_site(site, |shape, d| (shape.to_vec(), copy_data(shape, d)))?;
                let Some((shape, data)) = got else {
                    return Err(HarnessError::Python(format!(
                        "the {label} reference lists site `{site}` in describe() but step() did not return it"
                    )));
                };
                let long_logits = site == "logits" && shape.len() == 2 && shape[0] > 1 && shape[0] * shape[1] > trace::LOGITS_IN_FULL;
                match if long_logits { Form::TopK } else { self.policy.form(site) } {
                    Form::TopK => {
                        full += 1;
                        let t = match &data {
                            Stored::F32 { data, .. } => TopKLogits::of(data, shape[0], shape[1]),
                            Stored::F64 { data, .. } => TopKLogits::of(data, shape[0], shape[1]),
                        };
                        st.tensors.push((trace::tensor_name(step, site, Form::TopK), trace::topk_tensor(&t)));
                    }
                    Form::Full => {
                        full += 1;
                        st.tensors.push((trace::tensor_name(step, site, Form::Full), data));
                    }
                    Form::Sketch => {
                        sketched += 1;
                        let sk = match &data {
                            Stored::F32 { data, .. } => Sketch::of(data),
                            Stored::F64 { data, .. } => Sketch::of(data),
                        };
                        st.tensors.push((trace::tensor_name(step, site, Form::Sketch), trace::sketch_tensor(&shape, &sk)));
                    }
                    Form::NewRows => {
                        full += 1;
                        let empty = match &data {
                            Stored::F32 { .. } => Stored::F32 { shape: vec![], data: vec![] },
                            Stored::F64 { .. } => Stored::F64 { shape: vec![], data: vec![] },
                        };
                        let before = st.caches.remove(site).unwrap_or_else(|| {
                            let mut s = shape.clone();
                            if s.len() == 3 {
                                s[1] = 0;
                            }
                            (s, empty)
                        });
                        let entry = match new_rows(&before, &shape, &data) {
                            Some(rows) => (trace::tensor_name(step, site, Form::NewRows), rows),
                            // Earlier rows changed (or an unexpected shape): keep the whole cache.
                            None => (trace::tensor_name(step, site, Form::Full), data.clone()),
                        };
                        st.tensors.push(entry);
                        st.caches.insert(site.clone(), (shape, data));
                    }
                }
            }
            Ok(())
        })?;
        st.full_per_step = full;
        st.sketched_per_step = sketched;
        Ok(out)
    }
}

/// What `write_traces` needs to know about the run besides the references.
pub struct RecordTarget<'a> {
    /// Trace names, one per reference.
    pub names: &'a [String],
    pub dir: &'a Path,
    pub model_arg: &'a str,
    pub model_path: &'a Path,
    pub model_sha256: &'a str,
    pub weights: &'a str,
    /// The LoRA adapter (directory, sha256) every side ran with.
    pub adapter: Option<(&'a Path, &'a str)>,
    pub steps_requested: usize,
    pub budget_bytes: Option<u64>,
}

/// Writes one trace per recorded reference of a finished run. Returns (name, bytes).
pub fn write_traces(result: &RunResult, refs: &[Reference], t: &RecordTarget<'_>) -> Result<Vec<(String, u64)>, HarnessError> {
    assert_eq!(refs.len(), t.names.len());
    let mut written = vec![];
    for (r, name) in refs.iter().zip(t.names) {
        let Some(rec) = r.backend.as_any().downcast_ref::<Recorder>() else {
            return Err(HarnessError::Usage(format!("{}: not a recording reference", r.name)));
        };
        let st = rec.state.borrow();
        let (mode, text, reference_ids) =
            st.prompt.clone().ok_or_else(|| HarnessError::Mismatch(format!("{}: no prompt was encoded", r.name)))?;
        let (gen_ids, max_new, stop_ids, gen_tokens) =
            st.generate.clone().ok_or_else(|| HarnessError::Mismatch(format!("{}: generate was not run", r.name)))?;
        if gen_ids != result.prompt.engine_ids {
            return Err(HarnessError::Mismatch(format!("{}: generate ran on other ids than the prompt", r.name)));
        }
        let d = &r.description;
        let file = t.model_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let mut meta = TraceMeta {
            format: trace::FORMAT.into(),
            name: name.clone(),
            lockstep_version: env!("CARGO_PKG_VERSION").into(),
            reference: trace::RefMeta {
                name: d.name.clone(),
                label: r.name.clone(),
                dtype: d.dtype.clone(),
                versions: d.versions.clone(),
                notes: d.notes.clone(),
                transforms: d.transforms.clone(),
                quantized_activations: d.quantized_activations,
                sites: d.sites.clone(),
            },
            model: trace::ModelMeta {
                arg: t.model_arg.to_string(),
                path: trace::portable_model_path(t.model_path),
                file,
                sha256: t.model_sha256.to_string(),
                weights: t.weights.to_string(),
            },
            prompt: trace::PromptMeta { mode, text, engine_ids: result.prompt.engine_ids.clone(), reference_ids },
            sampler: trace::SamplerMeta { kind: "greedy".into() },
            steps: st.fed.len(),
            steps_requested: t.steps_requested,
            tokens_fed: st.fed.clone(),
            engine_tokens: result.engine_tokens.clone(),
            generate: trace::GenerateMeta { max_new_tokens: max_new, stop_ids, tokens: gen_tokens },
            capture: trace::CaptureMeta {
                full_layers: rec.policy.full_layers.clone(),
                full_sites: st.full_per_step,
                sketched_sites: st.sketched_per_step,
                sketch: format!(
                    "sum of squares, max |x|, NaN/Inf flag and {K} projections with splitmix64 sign bits (harness/src/sketch.rs)"
                ),
                caches: "the rows each step appends ({site}@new); replays rebuild the whole cache".into(),
            },
            tensors: trace::TensorsMeta { file: String::new(), bytes: 0, sha256: String::new() },
            adapter: match (t.adapter, result.lora.as_ref()) {
                (Some((path, sha)), Some(l)) => {
                    let side = l.sides.iter().find(|s| s.side == r.name).ok_or_else(|| {
                        HarnessError::Mismatch(format!("{}: the run has no LoRA inventory of this reference", r.name))
                    })?;
                    Some(trace::AdapterMeta {
                        path: trace::portable_model_path(path),
                        sha256: sha.to_string(),
                        inventory: side.entries.clone(),
                        config: side.config.clone(),
                    })
                }
                (Some(_), None) => return Err(HarnessError::Mismatch("the run with an adapter has no LoRA report".into())),
                (None, _) => None,
            },
        };
        let size = trace::write(&mut meta, &st.tensors, t.dir, t.budget_bytes)?;
        written.push((name.clone(), size));
    }
    Ok(written)
}

/// One recording: which live references, on which model and prompt, into which traces.
pub struct RecordRequest {
    pub model_arg: String,
    pub references: Vec<crate::reference::RefSpec>,
    pub prompt: crate::lockstep::options::Prompt,
    pub steps: usize,
    /// Trace names, one per reference.
    pub names: Vec<String>,
    pub policy: KeepPolicy,
    /// How the engine holds GGUF weights (`None`: its default for the file).
    pub weights: Option<lockstep_engine::WeightsMode>,
    /// A LoRA adapter directory for every side (unmerged in the engine).
    pub lora: Option<std::path::PathBuf>,
    pub budget_bytes: Option<u64>,
    pub dir: std::path::PathBuf,
    /// Record only the sites the engine under test declares.
    pub engine_sites: bool,
}

/// A finished recording: the lockstep run it was (for its report) and the traces written.
pub struct Recorded {
    pub result: RunResult,
    pub refs: Vec<Reference>,
    pub model: std::path::PathBuf,
    pub sha256: String,
    /// (trace name, bytes)
    pub written: Vec<(String, u64)>,
}

/// Runs the engine in lockstep with the live references, recording them, and writes one
/// trace per reference.
pub fn record(req: &RecordRequest) -> Result<Recorded, HarnessError> {
    use crate::lockstep::run as driver;
use crate::lockstep::options::{RunOptions};
    use crate::compare::tolerance::Precision;
    if req.names.len() != req.references.len() {
        return Err(HarnessError::Usage("one trace name per reference".into()));
    }
    if let Some(bad) = req.references.iter().find(|s| s.trace.is_some()) {
        return Err(HarnessError::Usage(format!("{}: a trace cannot be recorded again; record a live reference", bad.label())));
    }
    let path = crate::models::resolve(&req.model_arg)?;
    let opts = RunOptions {
        engine: crate::plugin::EngineSpec::under_test(),
        model: path.clone(),
        references: req.references.clone(),
        prompt: req.prompt.clone(),
        steps: req.steps,
        precision: Precision::F32,
        weights: req.weights,
        bisect: false,
        faults: Default::default(),
        sampler: None,
        strict_config: false,
        lora: req.lora.clone().map(|dir| lockstep_engine::LoraOptions { dir, mode: lockstep_engine::LoraMode::Unmerged }),
        context: None,
        prefill_chunk: crate::lockstep::options::DEFAULT_PREFILL_CHUNK,
        max_memory: None,
    };
    let phase = crate::ui::Phase::start(format!("loading the engine ({})", path.display()));
    let engine = crate::lockstep::options::load_engine(&opts);
    phase.done();
    let engine = engine?;
    // Layers kept in full that the model does not have: said before any reference loads.
    let layers = engine.model.info().config.num_layers;
    if let Some(bad) = req.policy.full_layers.as_ref().and_then(|f| f.iter().find(|&&l| l >= layers)) {
        return Err(HarnessError::Usage(format!(
            "--full-layers names layer {bad}, and the model has {layers} layers (0..{}): keep layers that exist",
            layers.saturating_sub(1)
        )));
    }
    let mut policy = req.policy.clone();
    if req.engine_sites {
        policy.only = Some(engine.model.site_graph().names());
    }
    // Every reference holds what the run feeds (llama.cpp's n_ctx), as `lockstep run` sizes it.
    let context = opts.context_for(crate::lockstep::options::engine_prompt_ids(&engine, &opts.prompt)?.len());
    let refs = req
        .references
        .iter()
        .map(|s| {
            let phase = crate::ui::Phase::start(format!("loading the {} reference", s.label()));
            let r = Reference::load_for_run(s, &path, req.lora.as_deref(), Some(context)).and_then(|r| recording(r, policy.clone()));
            phase.done();
            r
        })
        .collect::<Result<Vec<_>, _>>()?;
    let result = driver::run(&opts, &engine, &refs)?;
    let sha256 = trace::model_sha256_cached(&path)?;
    let adapter_sha = req.lora.as_deref().map(trace::model_sha256_cached).transpose()?;
    let target = RecordTarget {
        names: &req.names,
        dir: &req.dir,
        model_arg: &req.model_arg,
        model_path: &path,
        model_sha256: &sha256,
        weights: engine.weights.name(),
        adapter: req.lora.as_deref().zip(adapter_sha.as_deref()),
        steps_requested: req.steps,
        budget_bytes: req.budget_bytes,
    };
    let written = write_traces(&result, &refs, &target)?;
    Ok(Recorded { result, refs, model: path, sha256, written })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_keeps_logits_caches_and_chosen_layers() {
        let p = KeepPolicy { full_layers: Some(vec![0, 29]), only: None };
        assert_eq!(p.form("logits"), Form::Full);
        assert_eq!(p.form("embed"), Form::Full);
        assert_eq!(p.form("final_norm"), Form::Full);
        assert_eq!(p.form("layers.5.cache_k"), Form::NewRows);
        assert_eq!(p.form("layers.29.q_rope"), Form::Full);
        assert_eq!(p.form("layers.5.q_rope"), Form::Sketch);
        assert_eq!(KeepPolicy::default().form("layers.5.q_rope"), Form::Full);
    }

    #[test]
    fn cache_rows_are_split_only_when_the_prefix_is_unchanged() {
        let before = (vec![1, 1, 2], Stored::F32 { shape: vec![1, 1, 2], data: vec![1.0, 2.0] });
        let now = Stored::F32 { shape: vec![1, 2, 2], data: vec![1.0, 2.0, 3.0, 4.0] };
        match new_rows(&before, &[1, 2, 2], &now) {
            Some(Stored::F32 { shape, data }) => assert_eq!((shape, data), (vec![1, 1, 2], vec![3.0, 4.0])),
            other => panic!("{other:?}"),
        }
        let changed = Stored::F32 { shape: vec![1, 2, 2], data: vec![1.5, 2.0, 3.0, 4.0] };
        assert!(new_rows(&before, &[1, 2, 2], &changed).is_none());
    }
}
