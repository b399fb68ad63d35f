//! `lockstep quant-check FILE.gguf`: every tensor dequantized by the engine and by the
//! `gguf` package's reference dequantizer (`gguf.quants.dequantize`, in
//! `references/quant_check.py`), compared element by element. Block formats are exact
//! (integers times f16 scales), so anything but equality is a dequantization bug; the
//! first differing element is reported with its block and both values.
//!
//! The engine has two dequantization paths and both are checked: candle's dequantizer
//! (what `--weights dequant` multiplies with) and, for Q4_0/Q4_1/Q8_0, the repacked blocks
//! its own quantized kernels read (what `--weights quantized` multiplies with).

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use lockstep_engine::quant::{first_nonfinite, Linear};
use lockstep_engine::weights::GgufFile;
use numpy::PyReadonlyArray1;
use pyo3::prelude::*;
use serde::Serialize;

use crate::error::HarnessError;
use crate::reference::python::{ensure_python};
use crate::reference::pycall::{py_err};

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Status {
    Equal,
    Differs {
        /// Flat element index (ggml order), its block, the engine's and the reference's value.
        index: usize,
        block: usize,
        engine: f32,
        reference: f32,
        /// Which engine path differs: `dequantizer` or `kernel-blocks`.
        path: &'static str,
        count: usize,
    },
    /// The file itself is bad (truncated data, a non-finite scale).
    Corrupt { message: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorCheck {
    pub name: String,
    pub ggml_type: String,
    /// ggml dims (dimension 0 fastest), as `gguf` prints them.
    pub dims: Vec<usize>,
    pub elements: usize,
    pub max_abs_diff: f64,
    /// Whether the kernel repack (Q4_0/Q4_1/Q8_0) was checked too.
    pub kernel_blocks_checked: bool,
    #[serde(flatten)]
    pub status: Status,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuantCheck {
    pub file: String,
    pub reference: String,
    pub tensors: Vec<TensorCheck>,
}

impl QuantCheck {
    pub fn count(&self, f: impl Fn(&Status) -> bool) -> usize {
        self.tensors.iter().filter(|t| f(&t.status)).count()
    }
}

/// Compares two dequantizations; NaN equals NaN (a corrupt block is reported elsewhere).
fn compare(engine: &[f32], reference: &[f32]) -> (f64, Option<(usize, usize)>) {
    let mut max = 0f64;
    let mut first = None;
    let mut count = 0;
    for (i, (a, b)) in engine.iter().zip(reference).enumerate() {
        if a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) || a == b {
            continue;
        }
        count += 1;
        first.get_or_insert(i);
        let d = (*a as f64 - *b as f64).abs();
        if d.is_finite() {
            max = max.max(d);
        } else {
            max = f64::INFINITY;
        }
    }
    (max, first.map(|i| (i, count)))
}

pub fn run(path: &Path) -> Result<QuantCheck, HarnessError> {
    let mut g = GgufFile::open(path)?;
    let mut infos: Vec<(String, GgmlDType, Vec<usize>, u64)> = g
        .content
        .tensor_infos
        .iter()
        .map(|(n, i)| (n.clone(), i.ggml_dtype, i.shape.dims().to_vec(), i.offset))
        .collect();
    infos.sort_by_key(|x| x.3);

    // Truncated tensor data stops every reader (the gguf package's too): name the tensors
    // that do not fit in the file before going further.
    let file_len = std::fs::metadata(path).map_err(|e| HarnessError::Io { path: path.display().to_string(), message: e.to_string() })?.len();
    let short: Vec<String> = infos
        .iter()
        .filter_map(|(name, dt, dims, off)| {
            let elems: usize = dims.iter().product();
            let bytes = (elems / dt.block_size() * dt.type_size()) as u64;
            let start = g.content.tensor_data_offset + off;
            (start + bytes > file_len).then(|| {
                format!("`{name}` needs {bytes} bytes at offset {start}, only {} left", file_len.saturating_sub(start))
            })
        })
        .collect();
    if !short.is_empty() {
        return Err(HarnessError::Io {
            path: path.display().to_string(),
            message: format!(
                "tensor data truncated: {} (a truncated download or copy; re-download the file)",
                short.join("; ")
            ),
        });
    }

    ensure_python()?;
    Python::attach(|py| {
        let m = py.import("quant_check").map_err(|e| py_err(py, e, "importing references/quant_check.py"))?;
        let r = m
            .call_method1("open", (path.to_string_lossy().as_ref(),))
            .map_err(|e| py_err(py, e, format!("the gguf package reading {}", path.display())))?;
        let versions: std::collections::BTreeMap<String, String> = r
            .call_method0("versions")
            .and_then(|v| v.extract())
            .map_err(|e| py_err(py, e, "quant_check versions()"))?;
        let mut out = vec![];
        for (name, dt, dims, _) in &infos {
            // candle reports shapes outermost first; ggml dims are the reverse.
            let ggml_dims: Vec<usize> = dims.iter().rev().copied().collect();
            let elements: usize = dims.iter().product();
            let base = |status, max_abs_diff, kernel| TensorCheck {
                name: name.clone(),
                ggml_type: format!("{dt:?}"),
                dims: ggml_dims.clone(),
                elements,
                max_abs_diff,
                kernel_blocks_checked: kernel,
                status,
            };
            let q = match g.qtensor(name) {
                Ok(q) => q,
                Err(e) => {
                    out.push(base(Status::Corrupt { message: e.to_string() }, f64::NAN, false));
                    continue;
                }
            };
            let deq = q.dequantize(&Device::Cpu)?;
            let engine: Vec<f32> = deq.flatten_all()?.to_vec1()?;
            let nonfinite = first_nonfinite(&deq, dt.block_size())?;
            // The kernels' repacked blocks, for the types the engine multiplies itself.
            let kernel: Option<Vec<f32>> = match dims.len() {
                2 => match Linear::from_qtensor(q)? {
                    Linear::Blocks(b) => Some(b.dequantize()),
                    _ => None,
                },
                _ => None,
            };
            let arr = r
                .call_method1("dequantize", (name.as_str(),))
                .map_err(|e| py_err(py, e, format!("gguf dequantizing `{name}`")))?;
            let arr: PyReadonlyArray1<f32> =
                arr.extract().map_err(|e: PyErr| py_err(py, e, format!("`{name}` from gguf as a float32 array")))?;
            let reference = arr.as_slice().map_err(|e| HarnessError::Python(format!("`{name}`: {e}")))?;
            if reference.len() != engine.len() {
                out.push(base(
                    Status::Differs { index: 0, block: 0, engine: f32::NAN, reference: f32::NAN, path: "dequantizer", count: engine.len() },
                    f64::INFINITY,
                    kernel.is_some(),
                ));
                continue;
            }
            let (max_d, first_d) = compare(&engine, reference);
            let (max_k, first_k) = kernel.as_deref().map(|k| compare(k, reference)).unwrap_or((0.0, None));
            let status = if let Some((block, v)) = nonfinite {
                Status::Corrupt {
                    message: format!("block {block} holds a non-finite value ({v}): a corrupted scale or data"),
                }
            } else if let Some((i, count)) = first_d {
                Status::Differs { index: i, block: i / dt.block_size(), engine: engine[i], reference: reference[i], path: "dequantizer", count }
            } else if let Some((i, count)) = first_k {
                let k = kernel.as_ref().expect("checked");
                Status::Differs { index: i, block: i / dt.block_size(), engine: k[i], reference: reference[i], path: "kernel-blocks", count }
            } else {
                Status::Equal
            };
            out.push(base(status, max_d.max(max_k), kernel.is_some()));
        }
        let reference = format!(
            "gguf.quants.dequantize (gguf {}, numpy {})",
            versions.get("gguf").map(String::as_str).unwrap_or("?"),
            versions.get("numpy").map(String::as_str).unwrap_or("?")
        );
        Ok(QuantCheck { file: path.display().to_string(), reference, tensors: out })
    })
}

pub fn render(c: &QuantCheck) -> String {
    let mut s = format!("quant-check {}\n  engine: candle-core dequantizer + lockstep kernel blocks; reference: {}\n\n", c.file, c.reference);
    let w = c.tensors.iter().map(|t| t.name.len()).max().unwrap_or(6).max(6);
    s.push_str(&format!("{:<w$}  {:<5}  {:>14}  {:>10}  verdict\n", "tensor", "type", "shape", "max |Δ|"));
    for t in &c.tensors {
        let shape = t.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let (diff, verdict) = match &t.status {
            Status::Equal => ("0".to_string(), format!("equal{}", if t.kernel_blocks_checked { " (dequantizer, kernel blocks)" } else { "" })),
            Status::Differs { index, block, engine, reference, path, count } => (
                format!("{:.3e}", t.max_abs_diff),
                format!(
                    "DIFFERS ({path}): {count} elements, first at element {index} (block {block}): engine {engine:e}, gguf {reference:e}"
                ),
            ),
            Status::Corrupt { message } => ("-".into(), format!("CORRUPT: {message}")),
        };
        s.push_str(&format!("{:<w$}  {:<5}  {:>14}  {:>10}  {verdict}\n", t.name, t.ggml_type, shape, diff));
    }
    let mut types: Vec<(String, usize)> = vec![];
    for t in &c.tensors {
        match types.iter_mut().find(|(n, _)| *n == t.ggml_type) {
            Some(e) => e.1 += 1,
            None => types.push((t.ggml_type.clone(), 1)),
        }
    }
    let types = types.iter().map(|(n, k)| format!("{k} {n}")).collect::<Vec<_>>().join(", ");
    s.push_str(&format!(
        "\n{} tensors ({types}): {} equal to the reference dequantizer, {} differ, {} corrupt\n",
        c.tensors.len(),
        c.count(|s| matches!(s, Status::Equal)),
        c.count(|s| matches!(s, Status::Differs { .. })),
        c.count(|s| matches!(s, Status::Corrupt { .. })),
    ));
    s
}
