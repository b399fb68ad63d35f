//! The engine under test: the bundled `lockstep-engine`, a Python engine
//! (`--engine python:PATH.py[:FACTORY]`), or a Rust engine plugged in through the library
//! ([`crate::api::Lockstep::engine`], [`crate::cli::main_with`]). Everything after loading
//! sees only the [`lockstep_engine::Decoder`] seam, whichever it is.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lockstep_engine::{EngineError, LoadOptions, LoadedModel, LoraAdapter, LoraMode, WeightsMode};

use crate::error::HarnessError;
use crate::reference::python_engine::PyEngine;

/// A function that loads a user's engine for a model path with lockstep's load options
/// (dtype, weights mode, faults, adapter: honour what it can, report it in `ModelInfo`).
pub type LoadFn = dyn Fn(&Path, &LoadOptions) -> Result<LoadedModel, EngineError> + Send + Sync;

/// A Rust engine plugged in: its name and its loader.
#[derive(Clone)]
pub struct Plugin {
    pub name: String,
    pub load: Arc<LoadFn>,
}

impl Plugin {
    pub fn new(name: impl Into<String>, load: impl Fn(&Path, &LoadOptions) -> Result<LoadedModel, EngineError> + Send + Sync + 'static) -> Plugin {
        Plugin { name: name.into(), load: Arc::new(load) }
    }
}

/// Which engine is under test.
#[derive(Clone, Default)]
pub enum EngineSpec {
    /// The bundled engine (`lockstep-engine`).
    #[default]
    Bundled,
    /// A Python file implementing the reference protocol; `factory` is its `load`.
    Python { path: PathBuf, factory: String },
    /// A Rust engine plugged in through the library.
    Plugin(Plugin),
}

impl fmt::Debug for EngineSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

thread_local! {
    static UNDER_TEST: RefCell<EngineSpec> = RefCell::new(EngineSpec::Bundled);
    static RUN_WEIGHTS: std::cell::Cell<Option<WeightsMode>> = const { std::cell::Cell::new(None) };
}

/// Records how the run's engine holds GGUF weights (set when the engine under test loads):
/// `--reference engine` loads its clean instance the same way, so that it is the same
/// arithmetic, not the other weights mode.
pub fn set_run_weights(w: Option<WeightsMode>) {
    RUN_WEIGHTS.with(|c| c.set(w));
}

/// The weights mode of this thread's last loaded engine under test.
pub fn run_weights() -> Option<WeightsMode> {
    RUN_WEIGHTS.with(|c| c.get())
}

impl EngineSpec {
    /// `bundled`, or `python:PATH.py[:FACTORY]`.
    pub fn parse(s: &str) -> Result<EngineSpec, HarnessError> {
        if s == "bundled" || s == "lockstep-engine" {
            return Ok(EngineSpec::Bundled);
        }
        let Some(rest) = s.strip_prefix("python:") else {
            return Err(HarnessError::Usage(format!(
                "--engine {s:?}: expected `bundled` or `python:PATH.py[:FACTORY]` (a Rust engine plugs in through the library: lockstep::cli::main_with)"
            )));
        };
        let (path, factory) = match rest.rsplit_once(':') {
            Some((p, f)) if p.ends_with(".py") && !f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => (p, f),
            _ => (rest, "load"),
        };
        if !path.ends_with(".py") {
            return Err(HarnessError::Usage(format!("--engine {s:?}: the Python engine must be a .py file (python:PATH.py[:FACTORY])")));
        }
        Ok(EngineSpec::Python { path: PathBuf::from(path), factory: factory.to_string() })
    }

    /// The engine's name in messages.
    pub fn name(&self) -> String {
        match self {
            EngineSpec::Bundled => "lockstep-engine".into(),
            EngineSpec::Python { path, factory } => format!("python:{}:{factory}", path.display()),
            EngineSpec::Plugin(p) => p.name.clone(),
        }
    }

    /// The engine under test of this thread (what `--engine` or `cli::main_with` set; the
    /// bundled engine otherwise): the engine runs load, and `--reference engine` is it.
    pub fn under_test() -> EngineSpec {
        UNDER_TEST.with(|u| u.borrow().clone())
    }

    /// Sets this thread's engine under test.
    pub fn set_under_test(spec: EngineSpec) {
        UNDER_TEST.with(|u| *u.borrow_mut() = spec);
    }

    /// Loads this engine for `model`.
    pub fn load(&self, model: &Path, opts: &LoadOptions) -> Result<LoadedModel, HarnessError> {
        match self {
            EngineSpec::Bundled => lockstep_engine::load(model, opts).map_err(|e| match e {
                // A model the bundled engine does not run is still one lockstep checks: with
                // the user's own engine, at the sites every decoder has (issue 33).
                lockstep_engine::EngineError::Unsupported { path, message } if lockstep_engine::models::describe_at(model).is_ok_and(|d| d.family.is_none()) => {
                    HarnessError::Usage(format!(
                        "{}: {message}. The bundled engine does not run this model; lockstep checks an engine of \
                         your own that does, against the references, at the sites every decoder has: --engine \
                         python:FILE.py (examples/python/hf_engine.py runs any model transformers has) or a Rust \
                         plug-in (docs/your-engine.md)",
                        path.display()
                    ))
                }
                e => e.into(),
            }),
            EngineSpec::Python { path, factory } => {
                if !opts.faults.is_empty() {
                    return Err(HarnessError::Usage(format!(
                        "--inject: faults are options inside the bundled engine's code; the Python engine {} has none",
                        path.display()
                    )));
                }
                let dtype = if opts.dtype == candle_core::DType::F64 { "float64" } else { "float32" };
                with_file_adapter(PyEngine::load(path, factory, model, dtype, opts.lora.as_ref().map(|l| l.dir.as_path()))?, opts)
            }
            EngineSpec::Plugin(p) => {
                let m = (p.load)(model, opts)?;
                if !opts.faults.is_empty() && m.model.info().faults.is_empty() {
                    return Err(HarnessError::Usage(format!("--inject: the engine {} does not implement fault injection", p.name)));
                }
                with_file_adapter(m, opts)
            }
        }
    }
}

/// An engine that reports no adapter of its own gets the file as lockstep reads it as its
/// side of the LoRA inventory; the effect check then says whether it applied it.
fn with_file_adapter(mut m: LoadedModel, opts: &LoadOptions) -> Result<LoadedModel, HarnessError> {
    if let (Some(l), None) = (&opts.lora, &m.lora) {
        let cfg = m.model.info().config.clone();
        m.lora = Some((LoraAdapter::load(&l.dir, &cfg)?, LoraMode::Unmerged));
    }
    Ok(m)
}
