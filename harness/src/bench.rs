//! `lockstep bench`: prefill and decode speed of the engine, llama.cpp and transformers,
//! measured side by side in one process on the same token ids and thread count, printed
//! as tokens/s and engine/llama.cpp ratios. Ratios, not absolute numbers, are what to
//! read on a shared, noisy machine.

use std::path::Path;
use std::time::Instant;

use candle_core::IndexOp;
use lockstep_engine::{KvDtype, LoadOptions, WeightsMode};
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

/// The engine's decode step time with `context` positions in its cache, which stores K and V
/// as `kv` says: the cache filled by a prefill in calls of 256 tokens, then `steps` one-token
/// steps timed (the median step).
pub fn engine_decode_at(model: &dyn lockstep_engine::Decoder, ids: &[u32], context: usize, steps: usize, kv: KvDtype) -> Result<f64, HarnessError> {
    let mut cache = model.new_cache().stored_as(kv);
    let fill: Vec<u32> = ids.iter().copied().cycle().take(context).collect();
    let mut logits = None;
    for part in fill.chunks(256) {
        logits = Some(model.forward(part, &mut cache, None)?);
    }
    let logits = logits.ok_or_else(|| HarnessError::Usage("a context of 0 positions".into()))?;
    let mut tok = lockstep_engine::generate::argmax(&logits.i(logits.dim(0)? - 1)?)?;
    let mut times = vec![];
    for _ in 0..steps.max(1) {
        let t0 = Instant::now();
        let l = model.forward(&[tok], &mut cache, None)?;
        times.push(t0.elapsed().as_secs_f64());
        tok = lockstep_engine::generate::argmax(&l.i(0)?)?;
    }
    Ok(median(times))
}

/// One `lockstep run` measured from outside: its peak resident memory and, per decode step,
/// the step's wall time and what lockstep itself spent (the step's wall time minus the
/// engine's and every reference's own time).
#[derive(Debug, Clone)]
pub struct RunCost {
    pub prompt_tokens: usize,
    pub peak_mb: f64,
    pub wall_s: f64,
    /// Median over the decode steps.
    pub step_s: f64,
    pub overhead_s: f64,
}

/// Runs `exe run ARGS --json FILE` as a child process and reads its cost: peak RSS from
/// `wait4`'s resource usage, the per-step times from the JSON report.
pub fn run_cost(exe: &Path, args: &[String], scratch: &Path) -> Result<RunCost, HarnessError> {
    let json = scratch.join("bench-run.json");
    let t0 = Instant::now();
    let child = std::process::Command::new(exe)
        .arg("run")
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| HarnessError::Usage(format!("bench: could not start {}: {e}", exe.display())))?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the child's pid, valid pointers to a status and a rusage.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall_s = t0.elapsed().as_secs_f64();
    if pid < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(HarnessError::Usage(format!("bench: `lockstep run {}` did not pass (status {status})", args.join(" "))));
    }
    let text = std::fs::read_to_string(&json).map_err(|e| HarnessError::Io { path: json.display().to_string(), message: e.to_string() })?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| HarnessError::Io { path: json.display().to_string(), message: e.to_string() })?;
    let steps = report["steps"].as_array().cloned().unwrap_or_default();
    let decode: Vec<&serde_json::Value> = steps.iter().skip(1).collect();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let step_s = if decode.is_empty() { 0.0 } else { median(decode.iter().map(|s| f(&s["seconds"])).collect()) };
    let overhead: Vec<f64> = decode
        .iter()
        .map(|s| {
            let refs: f64 = s["references"].as_array().map(|r| r.iter().map(|r| f(&r["seconds"])).sum()).unwrap_or(0.0);
            (f(&s["seconds"]) - f(&s["engine_seconds"]) - refs).max(0.0)
        })
        .collect();
    Ok(RunCost {
        prompt_tokens: steps.first().and_then(|s| s["fed"].as_array()).map_or(0, |f| f.len()),
        // Linux reports ru_maxrss in kilobytes.
        peak_mb: usage.ru_maxrss as f64 / 1024.0,
        wall_s,
        step_s,
        overhead_s: if overhead.is_empty() { 0.0 } else { median(overhead) },
    })
}

/// A plain prompt of at least `n` tokens of `model`'s tokenizer (the fewest words of `text`
/// repeated that reach it).
pub fn prompt_text(model: &lockstep_engine::LoadedModel, text: &str, n: usize) -> Result<String, HarnessError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return Err(HarnessError::Usage("the benchmark text has no words".into()));
    }
    let of = |k: usize| words.iter().cycle().take(k).copied().collect::<Vec<_>>().join(" ");
    let tokens = |k: usize| -> Result<usize, HarnessError> { Ok(model.tokenizer.encode(&of(k), true)?.len()) };
    let mut hi = 1;
    while tokens(hi)? < n {
        hi *= 2;
    }
    let mut lo = hi / 2;
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if tokens(mid)? >= n {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(of(hi))
}

/// The long-context table `make bench` prints after the speed table; `decode` holds the
/// engine's decode step time per context and cache dtype.
pub fn render_long(decode: &[(usize, KvDtype, f64)], runs: &[(usize, RunCost)], contexts: &[usize], prompts: &[usize]) -> String {
    let mut s = String::from("\nlong contexts (same machine, same run)\n");
    for kv in KvDtype::ALL {
        let times: Vec<(usize, f64)> = decode.iter().filter(|d| d.1 == kv).map(|&(c, _, t)| (c, t)).collect();
        for (c, t) in &times {
            s.push_str(&format!("engine (quantized) decode step at context {c:>5}, {} cache: {:>8.2} ms\n", kv.name(), t * 1e3));
        }
        if let (Some(a), Some(b)) = (times.first(), times.last()) {
            if times.len() > 1 {
                s.push_str(&format!("engine decode step, context {} / {}, {} cache: {:.2}x\n", b.0, a.0, kv.name(), b.1 / a.1));
            }
        }
    }
    s.push_str("lockstep run --weights dequant --reference transformers, 8 decode steps:\n");
    s.push_str(&format!("{:>8} {:>10} {:>12} {:>16} {:>8}\n", "prompt", "peak MB", "step ms", "lockstep's ms", "wall s"));
    for (_, c) in runs {
        s.push_str(&format!("{:>8} {:>10.0} {:>12.1} {:>16.2} {:>8.1}\n", c.prompt_tokens, c.peak_mb, c.step_s * 1e3, c.overhead_s * 1e3, c.wall_s));
    }
    let cost = |n: usize| runs.iter().find(|(m, _)| *m == n).map(|(_, c)| c);
    if let (Some(a), Some(b)) = (contexts.first().and_then(|&n| cost(n)), contexts.last().and_then(|&n| cost(n))) {
        if contexts.len() > 1 && a.overhead_s > 0.0 {
            s.push_str(&format!("lockstep's own time per step, prompt {} / {}: {:.2}x\n", b.prompt_tokens, a.prompt_tokens, b.overhead_s / a.overhead_s));
        }
    }
    if let (Some(a), Some(b)) = (prompts.first().and_then(|&n| cost(n)), prompts.last().and_then(|&n| cost(n))) {
        if prompts.len() > 1 {
            s.push_str(&format!("peak memory, prompt {} / {}: {:.2}x\n", b.prompt_tokens, a.prompt_tokens, b.peak_mb / a.peak_mb));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_context_table_gives_each_cache_dtype_its_decode_steps_and_ratio() {
        let decode = [(16, KvDtype::F32, 0.0088), (16, KvDtype::F16, 0.0087), (4096, KvDtype::F32, 0.0184), (4096, KvDtype::F16, 0.0125)];
        let s = render_long(&decode, &[], &[16, 4096], &[]);
        assert!(s.contains("decode step at context  4096, f32 cache:    18.40 ms"), "{s}");
        assert!(s.contains("decode step at context    16, f16 cache:     8.70 ms"), "{s}");
        assert!(s.contains("context 4096 / 16, f32 cache: 2.09x"), "{s}");
        assert!(s.contains("context 4096 / 16, f16 cache: 1.44x"), "{s}");
    }
}
