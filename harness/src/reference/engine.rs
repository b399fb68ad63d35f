//! The bundled engine as a reference (`--reference engine`, `engine:f64`): a second, clean
//! instance of the engine (no faults; the reference's dtype; the run's adapter) answering the
//! same protocol as a Python reference. The engine under test and a reference are then two
//! roles of the same kind of thing: `--inject rope-theta --reference engine` compares a
//! faulted engine with its clean self, and `engine:f64` is an oracle that needs no Python.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::DType;
use lockstep_engine::{Capture, Decoder, KvCache, LoadOptions, LoadedModel, LoraMode, LoraOptions};

use crate::compare::Data;
use crate::error::HarnessError;
use crate::plugin::EngineSpec;
use crate::reference::{Backend, Declaration, Description, RefSpec, Reference, SiteArrays, StepOutput};

/// The name of the engine's reference entry: the engine under test itself, clean.
pub const ENGINE: &str = "engine";
/// The bundled engine as a reference, whichever engine is under test (engine vs engine).
pub const BUNDLED: &str = "bundled";

/// What the engine reference declares: no Python object to call, an adapter it loads itself.
pub fn declaration() -> Declaration {
    Declaration {
        name: ENGINE.into(),
        capabilities: vec!["lora".into()],
        main_package: Some("lockstep-engine".into()),
        ..Declaration::default()
    }
}

/// Loads the engine for `model` as a reference.
pub fn load(spec: &RefSpec, model: &Path, lora: Option<&Path>) -> Result<Reference, HarnessError> {
    let dtype = if spec.is_oracle() { DType::F64 } else { DType::F32 };
    let lora = lora.map(|dir| LoraOptions { dir: dir.to_path_buf(), mode: LoraMode::Unmerged });
    let which = if spec.name == BUNDLED { EngineSpec::Bundled } else { EngineSpec::under_test() };
    // The run's weights mode (quantized or dequant GGUF weights): the same arithmetic as the
    // engine under test, or an f64 oracle (always dense).
    let weights = if dtype == DType::F64 { None } else { crate::plugin::run_weights() };
    let m = which.load(model, &LoadOptions { dtype, lora, weights, ..Default::default() })?;
    let info = m.model.info();
    let description = Description {
        name: spec.name.clone(),
        versions: [(info.engine.clone(), env!("CARGO_PKG_VERSION").to_string())].into(),
        dtype: spec.dtype.into(),
        sites: m.model.site_graph().names(),
        notes: vec![format!("the engine {} ({}, weights {}), without faults", info.engine, info.family, m.weights.name())],
        transforms: info.qk_layout.transform_name().map(String::from).into_iter().collect(),
        quantized_activations: info.quantized_kernels,
        main_package: Some(info.engine.clone()),
        ..Description::default()
    };
    let cache = RefCell::new(m.model.new_cache());
    Ok(Reference { name: spec.label(), spec: spec.clone(), backend: Box::new(EngineBackend { m, cache }), description })
}

struct EngineBackend {
    m: LoadedModel,
    cache: RefCell<KvCache>,
}

/// One step's captures in the Hugging Face layout, widened to f64 (exact for f32 values).
struct EngineArrays {
    sites: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl SiteArrays for EngineArrays {
    fn get(&self, site: &str) -> Option<(&[usize], Data<'_>)> {
        let (shape, data) = self.sites.get(site)?;
        Some((shape.as_slice(), Data::F64(data)))
    }

    fn has(&self, site: &str) -> bool {
        self.sites.contains_key(site)
    }
}

impl Backend for EngineBackend {
    fn reset(&self) -> Result<(), HarnessError> {
        *self.cache.borrow_mut() = self.m.model.new_cache();
        Ok(())
    }

    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, HarnessError> {
        Ok(self.m.encode_prompt(text, false)?)
    }

    fn encode_chat(&self, user: &str) -> Result<Vec<u32>, HarnessError> {
        Ok(self.m.encode_prompt(user, true)?)
    }

    fn step(&self, ids: &[u32], label: &str) -> Result<StepOutput, HarnessError> {
        let model: &dyn Decoder = self.m.model.as_ref();
        let mut cap = Capture::new();
        model.forward(ids, &mut self.cache.borrow_mut(), Some(&mut cap))?;
        let graph = model.site_graph();
        let mut sites = HashMap::new();
        for (name, t) in &cap.entries {
            let Some(site) = graph.get(name) else { continue };
            let (t, _) = model.to_canonical(site, t)?;
            let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            sites.insert(name.clone(), (t.dims().to_vec(), data));
        }
        Ok(StepOutput::arrays(Arc::new(EngineArrays { sites }), label))
    }

    fn generate_greedy(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError> {
        Ok(lockstep_engine::generate::generate_greedy(self.m.model.as_ref(), ids, n, stop)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
