//! Loading what `--reference` names: parsing its entries (`NAME`, `NAME:f64`, `trace:CASE`)
//! and loading each as a live Python reference or a recorded trace.

use std::path::Path;

use crate::error::HarnessError;
use crate::reference::python::{references_declaring, PyReference};
use crate::reference::engine::{BUNDLED, ENGINE};
use crate::reference::{reference_module, Capability, Declaration, RefSpec, Reference};

impl RefSpec {
    /// What the reference's module declares (imports it; loads nothing). A trace's spec
    /// names the module of the reference it was recorded from.
    pub fn declaration(&self) -> Result<Declaration, HarnessError> {
        if self.is_engine() {
            return Ok(crate::reference::engine::declaration());
        }
        crate::reference::python::declaration(self.module, &self.name)
    }

    pub fn parse(spec: &str) -> Result<RefSpec, HarnessError> {
        if let Some(case) = spec.strip_prefix("trace:") {
            return crate::golden::trace::parse_spec(case);
        }
        let (name, dtype) = match spec.split_once(':') {
            None => (spec, "float32"),
            Some((n, "f64" | "float64")) => (n, "float64"),
            Some((n, "f32" | "float32")) => (n, "float32"),
            Some((_, d)) => {
                return Err(HarnessError::ReferenceDtype { entry: spec.to_string(), dtype: d.to_string() })
            }
        };
        let module = if name == ENGINE || name == BUNDLED { "" } else { reference_module(name)? };
        Ok(RefSpec { name: name.to_string(), module, dtype, trace: None })
    }

    /// Comma-separated list, no duplicates.
    pub fn parse_list(list: &str) -> Result<Vec<RefSpec>, HarnessError> {
        let mut out: Vec<RefSpec> = vec![];
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let r = RefSpec::parse(part)?;
            if out.contains(&r) {
                return Err(HarnessError::DuplicateReference { entry: part.to_string() });
            }
            out.push(r);
        }
        if out.is_empty() {
            return Err(HarnessError::NoReference);
        }
        Ok(out)
    }

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
        Self::load_for_run(spec, model, lora, None)
    }

    /// As [`Reference::load_with_lora`], for a run that feeds at most `context` positions (a
    /// reference with a fixed context sizes it from this; see [`Description::context`]).
    ///
    /// [`Description::context`]: crate::reference::Description::context
    pub fn load_for_run(spec: &RefSpec, model: &Path, lora: Option<&Path>, context: Option<usize>) -> Result<Reference, HarnessError> {
        if spec.trace.is_some() {
            return crate::golden::trace::load_reference_with_lora(spec, model, lora);
        }
        if spec.is_engine() {
            return crate::reference::engine::load(spec, model, lora);
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
        let (obj, description) = PyReference::load(spec, model, lora, context)?;
        Ok(Reference { name: spec.label(), spec: spec.clone(), backend: Box::new(obj), description })
    }

}
