//! The bridge to the Python references: finding the reference environment, starting the
//! embedded interpreter in it, and calling a reference object of `references/`. Also the
//! [`Reference`] the driver talks to, which is either such a live object or a recorded trace
//! replayed without Python (`trace.rs`), and the step data both hand to the comparators.
//!
//! The interpreter is the venv's (see GOTCHAS.md): `PYTHONEXECUTABLE` and `PATH` are set
//! before the first `Python::attach`, so `sys.prefix` is the venv and its site-packages,
//! `.pth` files included, are on the path. The binary is linked against the same
//! libpython through an rpath set in `build.rs`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pyo3::prelude::*;
use numpy::{PyArrayMethods, PyUntypedArrayMethods};
use pyo3::types::{PyDict, PyList};

use crate::compare::Data;
use crate::error::HarnessError;

use crate::paths::{references_dir, venv_dir};

const FIX: &str = "run `make setup` in the lockstep repository (or point LOCKSTEP_VENV at an environment made by scripts/setup_env.sh)";

static STARTED: OnceLock<Result<(), String>> = OnceLock::new();

/// Starts the embedded interpreter in the reference environment (once per process).
pub fn ensure_python() -> Result<(), HarnessError> {
    STARTED.get_or_init(start).clone().map_err(HarnessError::Env)
}

fn start() -> Result<(), String> {
    let venv = venv_dir();
    let python = venv.join("bin").join("python");
    if !python.exists() {
        return Err(format!("the reference environment is missing: {} does not exist; {FIX}", python.display()));
    }
    // SAFETY: called once, before the interpreter (or any other thread of ours) starts.
    unsafe {
        std::env::set_var("PYTHONEXECUTABLE", &python);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut parts = vec![venv.join("bin")];
        parts.extend(std::env::split_paths(&path));
        if let Ok(p) = std::env::join_paths(parts) {
            std::env::set_var("PATH", p);
        }
    }
    let refs = references_dir();
    Python::attach(|py| -> Result<(), String> {
        let sys = py.import("sys").map_err(|e| e.to_string())?;
        let prefix: String = sys.getattr("prefix").and_then(|p| p.extract()).map_err(|e| e.to_string())?;
        let want = std::fs::canonicalize(&venv).unwrap_or(venv.clone());
        let got = std::fs::canonicalize(&prefix).unwrap_or(PathBuf::from(&prefix));
        if got != want {
            return Err(format!(
                "the embedded Python started with sys.prefix={prefix}, not the reference environment {}; \
                 the binary was probably built against another libpython. Rebuild with `make setup`.",
                venv.display()
            ));
        }
        let path = sys.getattr("path").map_err(|e| e.to_string())?;
        let path = path.cast::<PyList>().map_err(|e| e.to_string())?;
        path.insert(0, refs.to_string_lossy().as_ref()).map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// A Python exception as text, with its traceback.
pub fn format_pyerr(py: Python<'_>, e: &PyErr) -> String {
    let formatted = (|| -> PyResult<String> {
        let tb = py.import("traceback")?;
        let value = e.value(py);
        let lines = tb.call_method1("format_exception", (value.get_type(), value, e.traceback(py)))?;
        let lines: Vec<String> = lines.extract()?;
        Ok(lines.concat())
    })();
    formatted.unwrap_or_else(|_| e.to_string()).trim_end().to_string()
}

/// Turns a Python error into a [`HarnessError`], with the traceback, saying what was being done.
pub fn py_err(py: Python<'_>, e: PyErr, doing: impl std::fmt::Display) -> HarnessError {
    if e.is_instance_of::<pyo3::exceptions::PyImportError>(py) {
        return HarnessError::Env(format!("{doing}: {}\n{FIX}", format_pyerr(py, &e)));
    }
    HarnessError::Python(format!("{doing}: Python raised an exception:\n{}", format_pyerr(py, &e)))
}

/// Known references: CLI name -> module in `references/`.
pub const REFERENCES: &[(&str, &str)] =
    &[("transformers", "transformers_ref"), ("mlx", "mlx_ref"), ("llamacpp", "llamacpp_ref")];

pub fn reference_module(name: &str) -> Result<&'static str, HarnessError> {
    REFERENCES.iter().find(|(n, _)| *n == name).map(|(_, m)| *m).ok_or_else(|| {
        let known: Vec<&str> = REFERENCES.iter().map(|(n, _)| *n).collect();
        HarnessError::Usage(format!(
            "unknown reference `{name}`; known references: {} (append `:f64` to run one in float64, e.g. transformers:f64)",
            known.join(", ")
        ))
    })
}

/// One `--reference` entry: `NAME`, `NAME:f64`, or `trace:CASE` (a recorded trace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefSpec {
    /// The reference's name (`transformers`); for a trace, the name of the reference it was
    /// recorded from.
    pub name: String,
    pub module: &'static str,
    /// "float32" or "float64"
    pub dtype: &'static str,
    /// `trace:CASE`: the trace to replay instead of running Python (`trace.rs`).
    pub trace: Option<String>,
}

impl RefSpec {
    pub fn parse(spec: &str) -> Result<RefSpec, HarnessError> {
        if let Some(case) = spec.strip_prefix("trace:") {
            return crate::golden::trace::parse_spec(case);
        }
        let (name, dtype) = match spec.split_once(':') {
            None => (spec, "float32"),
            Some((n, "f64" | "float64")) => (n, "float64"),
            Some((n, "f32" | "float32")) => (n, "float32"),
            Some((_, d)) => {
                return Err(HarnessError::Usage(format!("reference `{spec}`: unknown dtype `{d}` (use f32 or f64)")))
            }
        };
        Ok(RefSpec { name: name.to_string(), module: reference_module(name)?, dtype, trace: None })
    }

    /// Comma-separated list, no duplicates.
    pub fn parse_list(list: &str) -> Result<Vec<RefSpec>, HarnessError> {
        let mut out: Vec<RefSpec> = vec![];
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let r = RefSpec::parse(part)?;
            if out.contains(&r) {
                return Err(HarnessError::Usage(format!("reference `{part}` is given twice")));
            }
            out.push(r);
        }
        if out.is_empty() {
            return Err(HarnessError::Usage("--reference needs at least one reference".into()));
        }
        Ok(out)
    }

    /// How the reference is named in reports: `transformers`, `transformers:f64`,
    /// `trace:CASE`.
    pub fn label(&self) -> String {
        if let Some(t) = &self.trace {
            format!("trace:{t}")
        } else if self.dtype == "float64" {
            format!("{}:f64", self.name)
        } else {
            self.name.clone()
        }
    }

    pub fn is_oracle(&self) -> bool {
        self.dtype == "float64"
    }

    /// What the reference's module declares (imports it; loads nothing). A trace's spec
    /// names the module of the reference it was recorded from.
    pub fn declaration(&self) -> Result<Declaration, HarnessError> {
        declaration(self.module, &self.name)
    }
}

/// An optional part of the reference protocol: `references/protocol.py`'s `CAPABILITIES`,
/// which says what each requires. A reference declares the ones it implements; the harness
/// reads the declaration and never asks Python whether a method exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// `load(..., lora=DIR)`, `lora_inventory()`, `lora_config()`.
    Lora,
    /// `generation_config(params, max_new_tokens)`.
    GenerationConfig,
    /// `sample_distribution(logits, prev, params)`; `describe()["sampler_order"]`,
    /// `["sampler_rep_window"]`.
    Sampler,
    /// `render_chat(messages, add_generation_prompt)`.
    ChatRender,
    /// The module's `load_tokenizer(model_path)` (tokcheck).
    Tokenizer,
    /// For a GGUF file, `load_tokenizer` is the format's own tokenizer: tokcheck's witness.
    GgufTokenizer,
    /// `references/bench.py` times it (`lockstep bench`).
    Bench,
    /// The module's `open(path)`: a reference dequantizer (quant-check).
    Dequantize,
}

impl Capability {
    /// The name in `references/protocol.py`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Lora => "lora",
            Capability::GenerationConfig => "generation_config",
            Capability::Sampler => "sampler",
            Capability::ChatRender => "chat_render",
            Capability::Tokenizer => "tokenizer",
            Capability::GgufTokenizer => "gguf_tokenizer",
            Capability::Bench => "bench",
            Capability::Dequantize => "dequantize",
        }
    }
}

/// What a module of `references/` declares about itself before anything loads: its
/// `PROTOCOL` (`protocol.declare`), checked against the module by `protocol.declaration`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Declaration {
    pub name: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub main_package: Option<String>,
    #[serde(default)]
    pub sampler_order: Vec<String>,
    #[serde(default)]
    pub sampler_rep_window: Option<usize>,
}

impl Declaration {
    pub fn declares(&self, c: Capability) -> bool {
        self.capabilities.iter().any(|n| n == c.name())
    }
}

/// `references/<module>.py`'s declaration: imports the module (nothing is loaded) and calls
/// `protocol.declaration` on it. `label` names the reference in messages.
pub fn declaration(module: &str, label: &str) -> Result<Declaration, HarnessError> {
    ensure_python()?;
    let text = Python::attach(|py| -> Result<String, HarnessError> {
        let m = py.import(module).map_err(|e| py_err(py, e, format!("the {label} reference: importing references/{module}.py")))?;
        let protocol = py.import("protocol").map_err(|e| py_err(py, e, "importing references/protocol.py"))?;
        let r = protocol
            .call_method1("declaration", (m,))
            .map_err(|e| py_err(py, e, format!("the {label} reference's declaration (references/{module}.py)")))?;
        r.extract::<String>().map_err(|e| py_err(py, e.into(), "reading protocol.declaration()'s result"))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| HarnessError::Python(format!("the {label} reference's declaration is not what protocol.declare makes: {e}")))
}

/// The known references whose modules declare `c`, in [`REFERENCES`] order (a module that
/// cannot be imported is left out).
pub fn references_declaring(c: Capability) -> Vec<&'static str> {
    REFERENCES.iter().filter(|(n, m)| declaration(m, n).is_ok_and(|d| d.declares(c))).map(|(n, _)| *n).collect()
}

/// What a reference says about itself (`describe()`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Description {
    pub name: String,
    pub versions: std::collections::BTreeMap<String, String>,
    pub dtype: String,
    pub sites: Vec<String>,
    pub notes: Vec<String>,
    /// Named layout transforms the reference applied to reach the HF layout.
    pub transforms: Vec<String>,
    /// True when the reference quantizes activations for quantized matmuls (llama.cpp on a
    /// quantized file); false when it computes in its float dtype.
    #[serde(default)]
    pub quantized_activations: bool,
    /// The capabilities it declares (`references/protocol.py`); none for a trace, which
    /// has no live object to call.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The key of `versions` it is reported by (`transformers`); `None` for a trace.
    #[serde(default)]
    pub main_package: Option<String>,
    /// With [`Capability::Sampler`]: its library's whole filter chain, the five stages of
    /// `lockstep_engine::sample::Stage` in the order it applies them.
    #[serde(default)]
    pub sampler_order: Vec<String>,
    /// With [`Capability::Sampler`]: how many previous tokens its repetition penalty looks
    /// at (`None`: all of them).
    #[serde(default)]
    pub sampler_rep_window: Option<usize>,
}

impl Description {
    pub fn declares(&self, c: Capability) -> bool {
        self.capabilities.iter().any(|n| n == c.name())
    }
}

/// A loaded reference: a live Python object implementing `references/protocol.py`, or a
/// recorded trace replayed without Python. Both answer the same protocol, so the driver,
/// the comparators and the reports do not know which one they talk to.
pub struct Reference {
    /// Label in reports (`transformers`, `transformers:f64`, `trace:CASE`).
    pub name: String,
    pub spec: RefSpec,
    pub(crate) backend: Backend,
    pub description: Description,
}

/// Where a reference's answers come from.
pub(crate) enum Backend {
    /// A live Python reference.
    Python(PyReference),
    /// A live Python reference whose answers are also recorded (`lockstep record`).
    Record(Box<crate::golden::record::Recorder>),
    /// A recorded trace (`--reference trace:CASE`): no Python.
    Trace(crate::golden::trace::Replay),
}

impl Reference {
    /// A live reference: imports `references/<module>.py` and calls its
    /// `load(model, dtype=...)`; a trace: reads it and checks it was recorded from `model`.
    pub fn load(spec: &RefSpec, model: &Path) -> Result<Reference, HarnessError> {
        Self::load_with_lora(spec, model, None)
    }

    /// As [`Reference::load`], with a LoRA adapter directory given to the reference's
    /// `load(model, dtype=..., lora=DIR)` (a trace cannot take one).
    pub fn load_with_lora(spec: &RefSpec, model: &Path, lora: Option<&Path>) -> Result<Reference, HarnessError> {
        if spec.trace.is_some() {
            return crate::golden::trace::load_reference_with_lora(spec, model, lora);
        }
        if lora.is_some() && !spec.declaration()?.declares(Capability::Lora) {
            return Err(HarnessError::Usage(format!(
                "--lora: the {} reference cannot load PEFT or mlx-lm adapters (references/{}.py does not declare \
                 the `lora` capability); use --reference {}",
                spec.name,
                spec.module,
                references_declaring(Capability::Lora).join(",")
            )));
        }
        let (obj, description) = PyReference::load(spec, model, lora)?;
        Ok(Reference { name: spec.label(), spec: spec.clone(), backend: Backend::Python(obj), description })
    }

    /// The main package's version (e.g. transformers 5.23.0): `versions[main_package]`.
    pub fn version(&self) -> String {
        let v = &self.description.versions;
        let keys = match &self.description.main_package {
            Some(p) => vec![p.as_str()],
            // A trace: its file keeps no main package; the package named like the reference,
            // else llama.cpp's binding (the packages these references declare).
            None => vec![self.spec.name.as_str(), "llama_cpp_python", "llama-cpp-python"],
        };
        keys.iter().find_map(|k| v.get(*k)).cloned().unwrap_or_else(|| "?".into())
    }

    /// The Python object of a live reference (`None` for a trace), for the optional
    /// methods other modules call (generation config, sampler parity, chat rendering).
    pub fn object(&self) -> Option<&Py<PyAny>> {
        match &self.backend {
            Backend::Python(p) => Some(p.object()),
            Backend::Record(r) => Some(r.live().object()),
            Backend::Trace(_) => None,
        }
    }

    /// Whether the reference can be called for capability `c`: a live reference that
    /// declares it (`describe()["capabilities"]`, checked by `protocol.check` at load). A
    /// trace has no live object, so none.
    pub fn can(&self, c: Capability) -> bool {
        self.object().is_some() && self.description.declares(c)
    }

    /// The replay behind a `trace:NAME` reference.
    pub fn replay(&self) -> Option<&crate::golden::trace::Replay> {
        match &self.backend {
            Backend::Trace(t) => Some(t),
            _ => None,
        }
    }

    /// The trace this reference replays, if it is one.
    pub fn trace(&self) -> Option<&crate::golden::trace::Trace> {
        self.replay().map(|r| r.trace())
    }

    pub fn reset(&self) -> Result<(), HarnessError> {
        match &self.backend {
            Backend::Python(p) => p.reset(),
            Backend::Record(r) => r.reset(),
            Backend::Trace(t) => t.reset(),
        }
    }

    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, HarnessError> {
        match &self.backend {
            Backend::Python(p) => p.encode_prompt(text),
            Backend::Record(r) => r.encode("prompt", text),
            Backend::Trace(t) => t.encode("prompt", text),
        }
    }

    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>, HarnessError> {
        match &self.backend {
            Backend::Python(p) => p.encode_chat(user),
            Backend::Record(r) => r.encode("chat", user),
            Backend::Trace(t) => t.encode("chat", user),
        }
    }

    pub fn generate_greedy(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError> {
        match &self.backend {
            Backend::Python(p) => p.generate_greedy(ids, n, stop),
            Backend::Record(r) => r.generate_greedy(ids, n, stop),
            Backend::Trace(t) => t.generate_greedy(ids, n, stop),
        }
    }

    /// Feeds `ids`; a live reference's `{site: ndarray}` stays in Python until read.
    pub fn step(&self, ids: &[u32]) -> Result<StepOutput, HarnessError> {
        match &self.backend {
            Backend::Python(p) => Ok(StepOutput::python(p.step(ids)?, &self.name)),
            Backend::Record(r) => r.step(ids, &self.name),
            Backend::Trace(t) => Ok(StepOutput { inner: StepInner::Trace(t.step(ids)?), reference: self.name.clone() }),
        }
    }
}

/// A Python object of `references/`.
pub struct PyReference {
    /// Label in messages.
    name: String,
    obj: Py<PyAny>,
}

impl PyReference {
    /// Imports `references/<module>.py`, calls its `load(model, dtype=..., sites=[...])` with
    /// every site name of the engine's site graph of `model`, and checks the object against
    /// the protocol (`protocol.check`), which gives its `describe()`.
    pub fn load(spec: &RefSpec, model: &Path, lora: Option<&Path>) -> Result<(PyReference, Description), HarnessError> {
        let (module, dtype) = (spec.module, spec.dtype);
        let name = spec.label();
        let name = name.as_str();
        let sites = lockstep_engine::models::site_graph_at(model)?.names();
        ensure_python()?;
        Python::attach(|py| {
            let m = py.import(module).map_err(|e| py_err(py, e, format!("the {name} reference: importing references/{module}.py")))?;
            let protocol = py.import("protocol").map_err(|e| py_err(py, e, "importing references/protocol.py"))?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("dtype", dtype).map_err(|e| py_err(py, e, "building arguments"))?;
            kwargs.set_item("sites", PyList::new(py, &sites).map_err(|e| py_err(py, e, "building arguments"))?)
                .map_err(|e| py_err(py, e, "building arguments"))?;
            if let Some(l) = lora {
                kwargs.set_item("lora", l.to_string_lossy().as_ref()).map_err(|e| py_err(py, e, "building arguments"))?;
            }
            let obj = m
                .call_method("load", (model.to_string_lossy().as_ref(),), Some(&kwargs))
                .map_err(|e| py_err(py, e, format!("loading {} with the {name} reference", model.display())))?;
            let d = protocol
                .call_method1("check", (&obj, name))
                .map_err(|e| py_err(py, e, format!("checking the {name} reference against references/protocol.py")))?;
            let description = Description {
                name: get(py, &d, "name")?,
                versions: get(py, &d, "versions")?,
                dtype: get(py, &d, "dtype")?,
                sites: get(py, &d, "sites")?,
                notes: get(py, &d, "notes")?,
                transforms: get_or_default(py, &d, "transforms")?,
                quantized_activations: get_or_default(py, &d, "quantized_activations")?,
                capabilities: get(py, &d, "capabilities")?,
                main_package: get_or_default(py, &d, "main_package")?,
                sampler_order: get_or_default(py, &d, "sampler_order")?,
                sampler_rep_window: get_or_default(py, &d, "sampler_rep_window")?,
            };
            Ok((PyReference { name: name.to_string(), obj: obj.unbind() }, description))
        })
    }

    /// The Python object, for the calls of other modules (tokcheck, sampler parity).
    pub fn object(&self) -> &Py<PyAny> {
        &self.obj
    }

    pub fn reset(&self) -> Result<(), HarnessError> {
        Python::attach(|py| {
            self.obj.bind(py).call_method0("reset").map_err(|e| py_err(py, e, format!("{}.reset()", self.name)))?;
            Ok(())
        })
    }

    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, HarnessError> {
        Python::attach(|py| {
            let r = self.obj.bind(py).call_method1("encode_prompt", (text,));
            let r = r.map_err(|e| py_err(py, e, format!("{}.encode_prompt()", self.name)))?;
            r.extract().map_err(|e: PyErr| py_err(py, e, "reading encode_prompt's result"))
        })
    }

    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>, HarnessError> {
        Python::attach(|py| {
            let msg = PyDict::new(py);
            msg.set_item("role", "user").and_then(|_| msg.set_item("content", user)).map_err(|e| py_err(py, e, "building a message"))?;
            let msgs = PyList::new(py, [msg]).map_err(|e| py_err(py, e, "building messages"))?;
            let r = self.obj.bind(py).call_method1("encode_chat", (msgs,));
            let r = r.map_err(|e| py_err(py, e, format!("{}.encode_chat()", self.name)))?;
            r.extract().map_err(|e: PyErr| py_err(py, e, "reading encode_chat's result"))
        })
    }

    pub fn generate_greedy(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError> {
        Python::attach(|py| {
            let r = self.obj.bind(py).call_method1("generate_greedy", (ids.to_vec(), n, stop.to_vec()));
            let r = r.map_err(|e| py_err(py, e, format!("{}.generate_greedy()", self.name)))?;
            r.extract().map_err(|e: PyErr| py_err(py, e, "reading generate_greedy's result"))
        })
    }

    /// Feeds `ids`; the returned `{site: ndarray}` stays in Python until read.
    pub fn step(&self, ids: &[u32]) -> Result<Py<PyDict>, HarnessError> {
        Python::attach(|py| {
            let out = self.obj.bind(py).call_method1("step", (ids.to_vec(),));
            let out = out.map_err(|e| py_err(py, e, format!("{}.step({} tokens)", self.name, ids.len())))?;
            let dict = out.cast::<PyDict>().map_err(|_| {
                HarnessError::Python(format!("{}.step() returned {} instead of a dict", self.name, type_name(&out)))
            })?;
            Ok(dict.clone().unbind())
        })
    }
}

/// The `{site: array}` of one reference step: owned by Python for a live reference, by the
/// trace for a replayed one.
pub struct StepOutput {
    inner: StepInner,
    reference: String,
}

enum StepInner {
    Python(Py<PyDict>),
    Trace(std::sync::Arc<crate::golden::trace::TraceStep>),
}

impl StepOutput {
    pub(crate) fn python(dict: Py<PyDict>, reference: &str) -> StepOutput {
        StepOutput { inner: StepInner::Python(dict), reference: reference.to_string() }
    }

    /// Borrows the arrays for reading (numpy or trace memory, no copies).
    pub fn view<'a, 'py>(&'a self, py: Python<'py>) -> StepArrays<'a, 'py> {
        match &self.inner {
            StepInner::Python(d) => {
                StepArrays { inner: ArraysInner::Python { py, dict: d.bind(py).clone(), reference: &self.reference } }
            }
            StepInner::Trace(t) => StepArrays { inner: ArraysInner::Trace(t, std::marker::PhantomData) },
        }
    }

    /// Calls `f` with views of all `outputs`, attaching to Python only when one of them
    /// lives there: a run against traces alone never starts the interpreter.
    pub fn with_views<'a, R>(
        outputs: impl IntoIterator<Item = &'a StepOutput>,
        f: impl for<'py> FnOnce(&[StepArrays<'a, 'py>]) -> R,
    ) -> R {
        let outputs: Vec<&'a StepOutput> = outputs.into_iter().collect();
        if outputs.iter().any(|o| matches!(o.inner, StepInner::Python(_))) {
            Python::attach(|py| {
                let views: Vec<StepArrays<'a, '_>> = outputs.iter().map(|o| o.view(py)).collect();
                f(&views)
            })
        } else {
            let views: Vec<StepArrays<'a, '_>> = outputs
                .iter()
                .map(|o| match &o.inner {
                    StepInner::Trace(t) => StepArrays { inner: ArraysInner::Trace(t, std::marker::PhantomData) },
                    StepInner::Python(_) => unreachable!("checked above"),
                })
                .collect();
            f(&views)
        }
    }
}

fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

fn get<'py, T>(py: Python<'py>, d: &Bound<'py, PyAny>, key: &str) -> Result<T, HarnessError>
where
    T: for<'a> FromPyObjectOwned<'py>,
{
    let v = d.get_item(key).map_err(|e| py_err(py, e, format!("describe()[{key:?}]")))?;
    v.extract::<T>().map_err(|e| py_err(py, e.into(), format!("describe()[{key:?}]")))
}

fn get_or_default<'py, T>(py: Python<'py>, d: &Bound<'py, PyAny>, key: &str) -> Result<T, HarnessError>
where
    T: for<'a> FromPyObjectOwned<'py> + Default,
{
    let has = d.contains(key).map_err(|e| py_err(py, e, format!("describe()[{key:?}]")))?;
    if has {
        get(py, d, key)
    } else {
        Ok(T::default())
    }
}

/// The arrays of one reference step, borrowed from Python or from a trace.
pub struct StepArrays<'a, 'py> {
    inner: ArraysInner<'a, 'py>,
}

enum ArraysInner<'a, 'py> {
    Python { py: Python<'py>, dict: Bound<'py, PyDict>, reference: &'a str },
    Trace(&'a crate::golden::trace::TraceStep, std::marker::PhantomData<Python<'py>>),
}

impl<'a, 'py> StepArrays<'a, 'py> {
    /// Calls `f(shape, data)` on the array of `site`, without copying; `None` when the
    /// reference did not return that site.
    pub fn with_site<R>(&self, site: &str, f: impl FnOnce(&[usize], Data<'_>) -> R) -> Result<Option<R>, HarnessError> {
        let (py, dict, reference) = match &self.inner {
            ArraysInner::Trace(t, _) => return Ok(t.with_site(site, f)),
            ArraysInner::Python { py, dict, reference } => (*py, dict, *reference),
        };
        let Some(obj) = dict.get_item(site).map_err(|e| py_err(py, e, "reading the step's dict"))? else {
            return Ok(None);
        };
        let borrow_err = |e: &dyn std::fmt::Display| {
            HarnessError::Python(format!("{reference}: site `{site}` cannot be read without a copy ({e})"))
        };
        if let Ok(arr) = obj.cast::<numpy::PyArrayDyn<f32>>() {
            let ro = arr.try_readonly().map_err(|e| borrow_err(&e))?;
            let data = ro.as_slice().map_err(|e| borrow_err(&e))?;
            return Ok(Some(f(ro.shape(), Data::F32(data))));
        }
        if let Ok(arr) = obj.cast::<numpy::PyArrayDyn<f64>>() {
            let ro = arr.try_readonly().map_err(|e| borrow_err(&e))?;
            let data = ro.as_slice().map_err(|e| borrow_err(&e))?;
            return Ok(Some(f(ro.shape(), Data::F64(data))));
        }
        Err(HarnessError::Python(format!(
            "{reference}: site `{site}` is a {}, not a float32/float64 numpy array (the protocol requires C-contiguous float32, \
             or float64 from a float64 reference)",
            type_name(&obj)
        )))
    }

    pub fn has(&self, site: &str) -> Result<bool, HarnessError> {
        match &self.inner {
            ArraysInner::Trace(t, _) => Ok(t.has(site)),
            ArraysInner::Python { py, dict, .. } => dict.contains(site).map_err(|e| py_err(*py, e, "reading the step's dict")),
        }
    }
}
