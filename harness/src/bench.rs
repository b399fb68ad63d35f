//! `lockstep bench`: prefill and decode speed of the engine, llama.cpp and transformers,
//! measured side by side in one process on the same token ids and thread count, printed
//! as tokens/s and engine/llama.cpp ratios. Ratios, not absolute numbers, are what to
//! read on a shared, noisy machine.

use std::path::Path;
use std::time::Instant;

use candle_core::IndexOp;
use lockstep_engine::{LoadOptions, WeightsMode};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::HarnessError;
use crate::reference::python::{ensure_python};
use crate::reference::pycall::{py_err};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Speed {
    pub name: String,
    pub detail: String,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Speed {
    pub fn prefill_tps(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_s
    }
    pub fn decode_tps(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_s
    }
}

/// Sets the engine's thread count (its pool for quantized matmuls and candle's gemm).
/// Must run before the first parallel operation of the process.
pub fn set_engine_threads(threads: usize) -> Result<(), HarnessError> {
    // SAFETY: called at start-up, before any other thread of this process reads the environment.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if lockstep_engine::threads::set_threads(threads) {
        Ok(())
    } else {
        Err(HarnessError::Usage("the engine's thread pool was already started with another size".into()))
    }
}

/// Prompt ids of exactly `n` tokens: the text's ids, repeated as needed.
pub fn prompt_ids(model: &lockstep_engine::LoadedModel, text: &str, n: usize) -> Result<Vec<u32>, HarnessError> {
    let base = model.tokenizer.encode(text, true)?;
    if base.is_empty() {
        return Err(HarnessError::Usage("the benchmark text encodes to no tokens".into()));
    }
    Ok(base.iter().copied().cycle().take(n).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn engine(path: &Path, mode: WeightsMode, ids: &[u32], n_decode: usize, repeats: usize) -> Result<Speed, HarnessError> {
    let m = lockstep_engine::load(path, &LoadOptions { weights: Some(mode), ..Default::default() })?;
    let model = &m.model;
    let mut times = vec![];
    for _ in 0..repeats.max(1) {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        model.forward(ids, &mut cache, None)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mut cache = model.new_cache();
    let logits = model.forward(ids, &mut cache, None)?;
    let mut tok = lockstep_engine::generate::argmax(&logits.i(ids.len() - 1)?)?;
    let t0 = Instant::now();
    for _ in 0..n_decode {
        let l = model.forward(&[tok], &mut cache, None)?;
        tok = lockstep_engine::generate::argmax(&l.i(0)?)?;
    }
    let decode_s = t0.elapsed().as_secs_f64();
    Ok(Speed {
        name: format!("engine ({})", mode.name()),
        detail: format!("lockstep-engine {}, matrices {}", env!("CARGO_PKG_VERSION"), model.info().matrix_types.clone().join("+")),
        prefill_tokens: ids.len(),
        decode_tokens: n_decode,
        prefill_s: median(times),
        decode_s,
    })
}

/// Runs `references/bench.py`'s function `which` (llamacpp, transformers).
pub fn reference(which: &str, path: &Path, threads: usize, ids: &[u32], n_decode: usize, repeats: usize) -> Result<Speed, HarnessError> {
    ensure_python()?;
    Python::attach(|py| {
        let m = py.import("bench").map_err(|e| py_err(py, e, "importing references/bench.py"))?;
        let kw = PyDict::new(py);
        kw.set_item("repeats", repeats.max(1)).map_err(|e| py_err(py, e, "arguments"))?;
        let r = m
            .call_method(which, (path.to_string_lossy().as_ref(), threads, ids.to_vec(), n_decode), Some(&kw))
            .map_err(|e| py_err(py, e, format!("benchmarking {which} on {}", path.display())))?;
        let get = |k: &str| -> Result<Bound<'_, PyAny>, HarnessError> {
            r.get_item(k).map_err(|e| py_err(py, e, format!("bench result key `{k}`")))
        };
        let f = |k: &str| -> Result<f64, HarnessError> {
            get(k)?.extract::<f64>().map_err(|e| py_err(py, e.into(), format!("bench result `{k}`")))
        };
        let s = |k: &str| -> Result<String, HarnessError> {
            get(k)?.extract::<String>().map_err(|e| py_err(py, e.into(), format!("bench result `{k}`")))
        };
        Ok(Speed {
            name: s("name")?,
            detail: format!("{} {}", s("name")?, s("version")?),
            prefill_tokens: ids.len(),
            decode_tokens: n_decode,
            prefill_s: f("prefill_s")?,
            decode_s: f("decode_s")?,
        })
    })
}

/// The table `make bench` prints.
pub fn render(rows: &[Speed], threads: usize, model: &Path) -> String {
    let mut s = String::new();
    s.push_str(&format!("lockstep bench: {} ({} threads), one run, side by side\n", model.display(), threads));
    s.push_str(&format!(
        "{:<22} {:>16} {:>16}  {}\n",
        "",
        format!("prefill {} tok/s", rows.first().map_or(0, |r| r.prefill_tokens)),
        format!("decode {} tok/s", rows.first().map_or(0, |r| r.decode_tokens)),
        "what"
    ));
    for r in rows {
        s.push_str(&format!("{:<22} {:>16.1} {:>16.1}  {}\n", r.name, r.prefill_tps(), r.decode_tps(), r.detail));
    }
    if let Some(l) = rows.iter().find(|r| r.name == "llama.cpp") {
        for e in rows.iter().filter(|r| r.name.starts_with("engine")) {
            s.push_str(&format!(
                "{} / llama.cpp: prefill {:.2}x, decode {:.2}x\n",
                e.name,
                e.prefill_tps() / l.prefill_tps(),
                e.decode_tps() / l.decode_tps()
            ));
        }
    }
    s
}
