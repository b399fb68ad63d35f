//! Calling into Python: Python errors converted in one place (with the traceback), and the
//! helpers for reference methods whose results are dict-shaped, which cross as JSON text
//! (`json.dumps` on the Python side): one conversion on the bridge, serde on the Rust side.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::Value;

use crate::error::HarnessError;

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
    if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) {
        return HarnessError::Interrupted;
    }
    let (doing, traceback) = (doing.to_string(), format_pyerr(py, &e));
    if e.is_instance_of::<pyo3::exceptions::PyImportError>(py) {
        return HarnessError::PythonImport { doing, traceback };
    }
    HarnessError::PythonException { doing, traceback }
}

pub(crate) fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// Converts a JSON value into a Python object (dicts, lists, strings, numbers, None).
pub fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u), _) => u.into_pyobject(py)?.into_any(),
            (_, _, Some(f)) => f.into_pyobject(py)?.into_any(),
            _ => py.None().into_bound(py),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => {
            let items = a.iter().map(|x| to_py(py, x)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// Calls `obj.method(*args)` (arguments given as JSON values) and parses the JSON text it returns.
pub fn call_json(obj: &Py<PyAny>, who: &str, method: &str, args: &[Value]) -> Result<Value, HarnessError> {
    let text = call_str(obj, who, method, args)?;
    serde_json::from_str(&text)
        .map_err(|e| HarnessError::Python(format!("{who}.{method}() returned text that is not JSON: {e}")))
}

/// Calls `obj.method(*args)` and returns the string it returns.
pub fn call_str(obj: &Py<PyAny>, who: &str, method: &str, args: &[Value]) -> Result<String, HarnessError> {
    Python::attach(|py| {
        let a = args.iter().map(|x| to_py(py, x)).collect::<PyResult<Vec<_>>>().map_err(|e| py_err(py, e, "building arguments"))?;
        let t = pyo3::types::PyTuple::new(py, a).map_err(|e| py_err(py, e, "building arguments"))?;
        let r = obj.bind(py).call_method1(method, t).map_err(|e| py_err(py, e, format!("{who}.{method}()")))?;
        r.extract::<String>().map_err(|e| py_err(py, e, format!("reading {who}.{method}()'s result")))
    })
}
