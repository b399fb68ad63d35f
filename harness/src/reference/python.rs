//! The live Python backend: finding the reference environment, starting the embedded
//! interpreter in it, reading a reference module's declaration, and a reference object of
//! `references/` answering the protocol.
//!
//! The interpreter is the venv's (see docs/traps.md): `PYTHONEXECUTABLE` and `PATH` are set
//! before the first `Python::attach`, so `sys.prefix` is the venv and its site-packages,
//! `.pth` files included, are on the path. The binary is linked against the same
//! libpython through an rpath set in `build.rs`.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::HarnessError;
use crate::paths::{references_dir, venv_dir};
use crate::error::SETUP_FIX as FIX;
use crate::reference::pycall::{py_err, type_name};
use crate::reference::{Backend, Capability, Declaration, Description, RefSpec, StepOutput, REFERENCES};

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
        // stdout is lockstep's (its tables, `--json -`): a print() in an engine or reference
        // goes to stderr with the other diagnostics instead of into the JSON.
        py.run(c"import sys\nsys.stdout = sys.stderr", None, None).map_err(|e| e.to_string())?;
        if crate::interrupt::is_installed() {
            // Python's table must name a handler for SIGINT, or the interrupt our own
            // handler requests is dropped ("ignored due to race condition").
            py.run(c"import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)", None, None)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    crate::interrupt::reinstall_after_python();
    Ok(())
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

/// Where a Python module comes from: `references/<name>.py`, or a file of the user's.
enum Source<'a> {
    Module(&'a str),
    File(&'a Path),
}

impl Source<'_> {
    fn role(&self) -> &'static str {
        match self {
            Source::Module(_) => "reference",
            Source::File(_) => "Python engine",
        }
    }
}

/// Imports the file `path` as a module named after its stem (`importlib.util`).
fn import_file<'py>(py: Python<'py>, path: &Path, label: &str) -> Result<Bound<'py, PyModule>, HarnessError> {
    if !path.is_file() {
        return Err(HarnessError::Io { path: path.display().to_string(), message: "no such Python file (--engine python:PATH.py[:FACTORY])".into() });
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().replace(|c: char| !c.is_ascii_alphanumeric(), "_")).unwrap_or_default();
    let code = c"
import importlib.util, sys
def import_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f'{path}: not a Python module')
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
";
    let helper = PyModule::from_code(py, code, c"lockstep_import_file.py", c"lockstep_import_file")
        .map_err(|e| py_err(py, e, "building the module importer"))?;
    let m = helper
        .call_method1("import_file", (format!("lockstep_engine_{stem}"), path.to_string_lossy().as_ref()))
        .map_err(|e| py_err(py, e, format!("the {label} engine: importing {}", path.display())))?;
    m.cast_into::<PyModule>().map_err(|_| HarnessError::Python(format!("{}: the import did not give a module", path.display())))
}

/// A Python object of `references/` (or a Python engine under test).
pub struct PyReference {
    /// Label in messages.
    name: String,
    obj: Py<PyAny>,
}

impl PyReference {
    /// Imports `references/<module>.py`, calls its `load(model, dtype=..., sites=[...])` with
    /// every site name of the engine's site graph of `model`, and checks the object against
    /// the protocol (`protocol.check`), which gives its `describe()`.
    /// `context`: the positions the run feeds at most (`--context`), for a reference with a
    /// fixed context to size it.
    pub fn load(spec: &RefSpec, model: &Path, lora: Option<&Path>, context: Option<usize>) -> Result<(PyReference, Description), HarnessError> {
        let name = spec.label();
        let source = Source::Module(spec.module);
        Self::load_from(&source, "load", &name, spec.dtype, model, lora, context)
    }

    /// Imports the Python file `path` as a module (with `references/` on `sys.path`, so it
    /// may `import protocol` or build on a reference), calls its `factory(model, dtype=...,
    /// sites=[...], lora=DIR)` and checks the object against the protocol: a Python engine
    /// under test (`--engine python:PATH.py[:FACTORY]`).
    pub fn load_file(path: &Path, factory: &str, label: &str, model: &Path, lora: Option<&Path>) -> Result<(PyReference, Description), HarnessError> {
        Self::load_from(&Source::File(path), factory, label, "float32", model, lora, None)
    }

    fn load_from(
        source: &Source<'_>,
        factory: &str,
        name: &str,
        dtype: &str,
        model: &Path,
        lora: Option<&Path>,
        context: Option<usize>,
    ) -> Result<(PyReference, Description), HarnessError> {
        // The sites of the model as any engine under test may run it: its family's where the
        // bundled engine knows the model type, the generic sites of any decoder where not.
        let described = lockstep_engine::models::describe_at(model)?;
        let sites = described.graph.names();
        // The model's sliding windows, per layer (`None`: global), for the references of
        // references/ (docs/contract.md, "Windowed caches"): given only when some layer has one.
        let windows = &described.config.layer_windows;
        ensure_python()?;
        Python::attach(|py| {
            let (m, what) = match source {
                Source::Module(module) => (
                    py.import(*module).map_err(|e| py_err(py, e, format!("the {name} reference: importing references/{module}.py")))?,
                    format!("references/{module}.py"),
                ),
                Source::File(path) => (import_file(py, path, name)?, path.display().to_string()),
            };
            let protocol = py.import("protocol").map_err(|e| py_err(py, e, "importing references/protocol.py"))?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("dtype", dtype).map_err(|e| py_err(py, e, "building arguments"))?;
            kwargs.set_item("sites", PyList::new(py, &sites).map_err(|e| py_err(py, e, "building arguments"))?)
                .map_err(|e| py_err(py, e, "building arguments"))?;
            if let Some(l) = lora {
                kwargs.set_item("lora", l.to_string_lossy().as_ref()).map_err(|e| py_err(py, e, "building arguments"))?;
            }
            if let Some(c) = context {
                kwargs.set_item("context", c).map_err(|e| py_err(py, e, "building arguments"))?;
            }
            if matches!(source, Source::Module(_)) && !windows.is_empty() {
                kwargs.set_item("windows", windows.clone()).map_err(|e| py_err(py, e, "building arguments"))?;
            }
            if !m.hasattr(factory).unwrap_or(false) {
                return Err(HarnessError::Usage(format!(
                    "{what} has no function `{factory}`: a Python engine or reference module defines {factory}(model_path, dtype=..., sites=[...], lora=None) returning an object of the protocol (references/protocol.py)"
                )));
            }
            let obj = m
                .call_method(factory, (model.to_string_lossy().as_ref(),), Some(&kwargs))
                .map_err(|e| py_err(py, e, format!("loading {} with the {name} {}", model.display(), source.role())))?;
            let d = protocol
                .call_method1("check", (&obj, name))
                .map_err(|e| py_err(py, e, format!("checking the {name} {} against references/protocol.py", source.role())))?;
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
                context: get_or_default(py, &d, "context")?,
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
    pub fn step_dict(&self, ids: &[u32]) -> Result<Py<PyDict>, HarnessError> {
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


impl Backend for PyReference {
    fn reset(&self) -> Result<(), HarnessError> {
        PyReference::reset(self)
    }
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, HarnessError> {
        PyReference::encode_prompt(self, text)
    }
    fn encode_chat(&self, user: &str) -> Result<Vec<u32>, HarnessError> {
        PyReference::encode_chat(self, user)
    }
    fn step(&self, ids: &[u32], label: &str) -> Result<StepOutput, HarnessError> {
        Ok(StepOutput::python(self.step_dict(ids)?, label))
    }
    fn generate_greedy(&self, ids: &[u32], n: usize, stop: &[u32]) -> Result<Vec<u32>, HarnessError> {
        PyReference::generate_greedy(self, ids, n, stop)
    }
    fn object(&self) -> Option<&Py<PyAny>> {
        Some(&self.obj)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
