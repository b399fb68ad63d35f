//! The arrays of one reference step: a live reference's `{site: ndarray}` (read in place,
//! without copies, while attached to Python), or arrays held in Rust (a replayed trace), both
//! read through the same view by the comparators.

use std::sync::Arc;

use numpy::{PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::compare::Data;
use crate::error::HarnessError;
use crate::reference::pycall::{py_err, type_name};

/// Site arrays held in Rust, as a step of a recorded trace keeps them.
pub trait SiteArrays: Send + Sync {
    /// The shape and data of `site`, `None` when the step has no such site.
    fn get(&self, site: &str) -> Option<(&[usize], Data<'_>)>;
    fn has(&self, site: &str) -> bool;
}

/// The `{site: array}` of one reference step: owned by Python for a live reference, by the
/// trace for a replayed one.
pub struct StepOutput {
    inner: StepInner,
    reference: String,
}

enum StepInner {
    Python(Py<PyDict>),
    Arrays(Arc<dyn SiteArrays>),
}

impl StepOutput {
    /// A live reference's (or Python engine's) `{site: array}` (public for the `arrays` fuzz
    /// target, which feeds it arrays of every dtype, shape and memory layout).
    pub fn python(dict: Py<PyDict>, reference: &str) -> StepOutput {
        StepOutput { inner: StepInner::Python(dict), reference: reference.to_string() }
    }

    /// Arrays held in Rust (a replayed trace's step).
    pub fn arrays(arrays: Arc<dyn SiteArrays>, reference: &str) -> StepOutput {
        StepOutput { inner: StepInner::Arrays(arrays), reference: reference.to_string() }
    }

    /// Borrows the arrays for reading (numpy or trace memory, no copies).
    pub fn view<'a, 'py>(&'a self, py: Python<'py>) -> StepArrays<'a, 'py> {
        match &self.inner {
            StepInner::Python(d) => {
                StepArrays { inner: ArraysInner::Python { py, dict: d.bind(py).clone(), reference: &self.reference } }
            }
            StepInner::Arrays(t) => StepArrays { inner: ArraysInner::Arrays(t.as_ref(), std::marker::PhantomData) },
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
                    StepInner::Arrays(t) => StepArrays { inner: ArraysInner::Arrays(t.as_ref(), std::marker::PhantomData) },
                    StepInner::Python(_) => unreachable!("checked above"),
                })
                .collect();
            f(&views)
        }
    }
}

/// The arrays of one reference step, borrowed from Python or from a trace.
pub struct StepArrays<'a, 'py> {
    inner: ArraysInner<'a, 'py>,
}

enum ArraysInner<'a, 'py> {
    Python { py: Python<'py>, dict: Bound<'py, PyDict>, reference: &'a str },
    Arrays(&'a dyn SiteArrays, std::marker::PhantomData<Python<'py>>),
}

impl<'a, 'py> StepArrays<'a, 'py> {
    /// Calls `f(shape, data)` on the array of `site`, without copying; `None` when the
    /// reference did not return that site.
    pub fn with_site<R>(&self, site: &str, f: impl FnOnce(&[usize], Data<'_>) -> R) -> Result<Option<R>, HarnessError> {
        let (py, dict, reference) = match &self.inner {
            ArraysInner::Arrays(t, _) => return Ok(t.get(site).map(|(shape, data)| f(shape, data))),
            ArraysInner::Python { py, dict, reference } => (*py, dict, *reference),
        };
        let Some(obj) = dict.get_item(site).map_err(|e| py_err(py, e, "reading the step's dict"))? else {
            return Ok(None);
        };
        let borrow_err = |e: &dyn std::fmt::Display| {
            HarnessError::Python(format!("{reference}: site `{site}` cannot be read without a copy ({e})"))
        };
        // A C-contiguous array is read in place. Any other layout (Fortran order, a `.T` view,
        // a strided slice) is read in its logical row-major order, copied: rust-numpy's
        // `as_slice` also accepts Fortran-contiguous memory, which read as row-major would be
        // the transpose.
        if let Ok(arr) = obj.cast::<numpy::PyArrayDyn<f32>>() {
            let ro = arr.try_readonly().map_err(|e| borrow_err(&e))?;
            if ro.is_c_contiguous() {
                let data = ro.as_slice().map_err(|e| borrow_err(&e))?;
                return Ok(Some(f(ro.shape(), Data::F32(data))));
            }
            let owned: Vec<f32> = ro.as_array().iter().copied().collect();
            return Ok(Some(f(ro.shape(), Data::F32(&owned))));
        }
        if let Ok(arr) = obj.cast::<numpy::PyArrayDyn<f64>>() {
            let ro = arr.try_readonly().map_err(|e| borrow_err(&e))?;
            if ro.is_c_contiguous() {
                let data = ro.as_slice().map_err(|e| borrow_err(&e))?;
                return Ok(Some(f(ro.shape(), Data::F64(data))));
            }
            let owned: Vec<f64> = ro.as_array().iter().copied().collect();
            return Ok(Some(f(ro.shape(), Data::F64(&owned))));
        }
        Err(HarnessError::Python(format!(
            "{reference}: site `{site}` is a {}, not a float32/float64 numpy array (the protocol requires C-contiguous float32, \
             or float64 from a float64 reference)",
            type_name(&obj)
        )))
    }

    pub fn has(&self, site: &str) -> Result<bool, HarnessError> {
        match &self.inner {
            ArraysInner::Arrays(t, _) => Ok(t.has(site)),
            ArraysInner::Python { py, dict, .. } => dict.contains(site).map_err(|e| py_err(*py, e, "reading the step's dict")),
        }
    }
}
