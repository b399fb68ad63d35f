//! A Python engine under test (`--engine python:PATH.py[:FACTORY]`): a Python implementation
//! of the reference protocol (torch, MLX, numpy…) driven through the engine seam
//! ([`Decoder`]) instead of as a reference, so that the author of a custom Python stack can
//! check it against the canonical libraries with every comparator, tolerance and bisect.
//!
//! The file is imported with `references/` on `sys.path`; `FACTORY` (default `load`) is
//! called as a reference's `load(model, dtype=..., sites=[...], lora=DIR)` and the object is
//! checked with `protocol.check`. What it returns from `step()` (a subset of the canonical
//! sites, in the Hugging Face layout; `logits` required) is what the harness compares; its
//! own `encode_prompt` / `encode_chat` tokenize the prompt.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{Device, Tensor};
use lockstep_engine::{Capture, Decoder, EngineError, KvCache, LoadedModel, ModelInfo, SiteGraph};

use crate::compare::Data;
use crate::error::HarnessError;
use crate::reference::python::PyReference;
use crate::reference::{Backend, Description, StepArrays, StepOutput};

/// The engine: the Python object, what it declared, and the site graph of its declared sites.
pub struct PyEngine {
    py: PyReference,
    label: String,
    /// What `describe()` said (versions, notes, sites).
    pub description: Description,
    info: ModelInfo,
    graph: SiteGraph,
}

fn engine_err(e: HarnessError) -> EngineError {
    EngineError::Engine(e.to_string())
}

impl PyEngine {
    /// Loads `path`'s `factory` on `model` (with the adapter directory, if any) as the engine
    /// under test.
    pub fn load(path: &Path, factory: &str, model: &Path, dtype: &str, lora: Option<&Path>) -> Result<LoadedModel, HarnessError> {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let label = format!("python:{file}");
        // Any decoder: a model type the bundled engine does not run is described by its shape
        // and the generic sites (embed, each layer's cache and output, final_norm, logits).
        let model_desc = lockstep_engine::models::describe_at(model)?;
        let (py, description) = PyReference::load_file(path, factory, &label, model, lora)?;
        if dtype != "float32" && description.dtype != dtype {
            return Err(HarnessError::Usage(format!("{label} runs {} only (asked for {dtype})", description.dtype)));
        }
        let declared: HashSet<&str> = description.sites.iter().map(String::as_str).collect();
        let graph = model_desc.graph.restrict(|s| declared.contains(s.name.as_str()));
        if graph.get(lockstep_engine::sites::LOGITS).is_none() {
            return Err(HarnessError::NoLogits { reference: label });
        }
        // The family's name where the bundled engine knows the model type, else the type.
        let family = match model_desc.family {
            Some(f) => std::borrow::Cow::Borrowed(f.name),
            None => std::borrow::Cow::Owned(model_desc.model_type.clone()),
        };
        let mut info = ModelInfo::new(family, model_desc.config.clone());
        info.engine = format!("{label} ({})", description.name);
        info.quantized_kernels = description.quantized_activations;
        let engine = PyEngine { py, label, description, info, graph };
        Ok(LoadedModel::plugin(Box::new(engine), model)?)
    }

    fn tensors(&self, out: &StepOutput, capture: &mut Option<&mut Capture>) -> Result<Tensor, HarnessError> {
        StepOutput::with_views([out], |views: &[StepArrays<'_, '_>]| -> Result<Tensor, HarnessError> {
            let v = &views[0];
            let mut logits = None;
            for site in self.graph.sites() {
                let t = v.with_site(&site.name, |shape, data| -> Result<Tensor, HarnessError> {
                    Ok(match data {
                        Data::F32(d) => Tensor::from_slice(d, shape, &Device::Cpu)?,
                        Data::F64(d) => Tensor::from_slice(d, shape, &Device::Cpu)?,
                        Data::Sketch(_) | Data::TopK(_) | Data::TopKRow(..) => {
                            return Err(HarnessError::Python(format!("{}: site `{}` is a sketch, not an array", self.label, site.name)))
                        }
                    })
                })?;
                let Some(t) = t.transpose()? else {
                    return Err(HarnessError::SiteNotReturned { reference: self.label.clone(), site: site.name.clone() });
                };
                if site.name == lockstep_engine::sites::LOGITS {
                    logits = Some(t.clone());
                }
                if let Some(c) = capture.as_deref_mut() {
                    c.entries.push((site.name.clone(), t));
                }
            }
            logits.ok_or_else(|| HarnessError::NoLogits { reference: self.label.clone() })
        })
    }
}

impl Decoder for PyEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn site_graph(&self) -> &SiteGraph {
        &self.graph
    }

    /// A fresh position counter: the Python object keeps its own cache and is reset by the
    /// first forward at position 0.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.info.config.num_layers)
    }

    fn forward(&self, tokens: &[u32], cache: &mut KvCache, mut capture: Option<&mut Capture>) -> lockstep_engine::Result<Tensor> {
        if cache.offset() == 0 {
            self.py.reset().map_err(engine_err)?;
        }
        let out = Backend::step(&self.py, tokens, &self.label).map_err(engine_err)?;
        cache.push_tokens(tokens);
        self.tensors(&out, &mut capture).map_err(engine_err)
    }

    fn tokenize(&self, text: &str, chat: bool) -> Option<lockstep_engine::Result<Vec<u32>>> {
        let ids = if chat { self.py.encode_chat(text) } else { self.py.encode_prompt(text) };
        Some(ids.map_err(engine_err))
    }
}
