//! Engines as plug-ins: Rust engines that tap fewer sites than the bundled one (logits only,
//! layer outputs only) driven through the library API, golden traces recorded from an engine
//! and replayed against it, and Python engines (`--engine python:...`) caught by bisect.

mod common;

use std::path::Path;

use candle_core::{IndexOp, Tensor};
use common::{lockstep, repo, run, tmp};
use lockstep::golden::Golden;
use lockstep::{Lockstep, Plugin};
use lockstep_engine::faults::Diagnosis;
use lockstep_engine::{Capture, Decoder, EngineError, KvCache, LoadOptions, LoadedModel, ModelInfo, SiteGraph};

/// A user's engine that taps less than the bundled one: the bundled engine underneath (its
/// faults included), but it declares only `keep` of its sites and returns the logits of the
/// last position only when `last_only`.
struct Partial {
    inner: Box<dyn Decoder>,
    info: ModelInfo,
    graph: SiteGraph,
    last_only: bool,
}

impl Decoder for Partial {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn site_graph(&self) -> &SiteGraph {
        &self.graph
    }
    fn new_cache(&self) -> KvCache {
        self.inner.new_cache()
    }
    fn forward(&self, tokens: &[u32], cache: &mut KvCache, capture: Option<&mut Capture>) -> lockstep_engine::Result<Tensor> {
        let mut all = Capture::new();
        let logits = self.inner.forward(tokens, cache, Some(&mut all))?;
        if let Some(c) = capture {
            c.entries.extend(all.entries.into_iter().filter(|(n, _)| self.graph.get(n).is_some()));
        }
        if self.last_only {
            let n = logits.dim(0)?;
            return Ok(logits.i(n - 1..n)?);
        }
        Ok(logits)
    }
}

fn partial(name: &'static str, keep: fn(&lockstep_engine::Site) -> bool, last_only: bool) -> Plugin {
    Plugin::new(name, move |path: &Path, opts: &LoadOptions| -> Result<LoadedModel, EngineError> {
        let inner = lockstep_engine::load(path, opts)?;
        let mut info = ModelInfo::new("llama", inner.model.info().config.clone());
        info.engine = name.into();
        info.faults = inner.model.info().faults.clone();
        let graph = inner.model.site_graph().restrict(keep);
        LoadedModel::plugin(Box::new(Partial { inner: inner.model, info, graph, last_only }), path)
    })
}

/// The in-process live tests load references into one embedded interpreter; references patch
/// their library's modules for capture, so two loaded at once in one process would see each
/// other's hooks. They run one at a time (the CLI tests run in processes of their own).
static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner())
}

fn logits_only() -> Plugin {
    partial("logits-only", |s| s.name == "logits", true)
}

live_test! {
    /// A clean logits-only engine passes with per-step verdicts, and the report says what it
    /// could not compare and which taps would let bisect go further.
    fn a_logits_only_engine_gets_per_step_verdicts_and_the_taps_it_lacks() {
        let _one = one_at_a_time();
        let r = Lockstep::new("tiny").engine(logits_only()).references("transformers").prompt("The capital of France is").steps(4).run().unwrap();
        let table = r.table();
        eprintln!("{table}");
        assert!(r.passed(), "{:?}", r.result.first_divergence);
        assert_eq!(r.result.steps.len(), 4);
        for st in &r.result.steps {
            let rs = &st.references[0];
            // Nothing but the logits (as a site too where the step fed one token: then the
            // last position is every position).
            assert!(rs.sites.iter().all(|s| s.site == "logits"), "{:?}", rs.sites.iter().map(|s| &s.site).collect::<Vec<_>>());
            assert!(rs.logits.kl < 1e-6 && rs.logits.top1_agree, "step {}: KL {:e}", st.step, rs.logits.kl);
        }
        let taps = &r.result.engine.taps;
        assert_eq!((taps.declared, taps.localizes_to), (1, "step"));
        assert!(taps.not_declared.iter().any(|s| s == "layers.0.cache_k"), "{:?}", taps.not_declared);
        assert!(table.contains("logits-only taps the logits only (1 of the 51 canonical sites): bisect localizes to the step; add per-layer taps"), "{table}");
        let json = r.json().unwrap();
        assert_eq!(json["engine"]["taps"]["localizes_to"], "step");
        assert_eq!(json["engine"]["name"], "logits-only");
    }
}

live_test! {
    /// The same engine with the context dropped after the prompt: bisect names the first
    /// divergent step and asks for per-layer taps, rather than failing.
    fn bisect_stops_at_the_step_for_a_logits_only_engine() {
        let _one = one_at_a_time();
        let (rep, run) = Lockstep::new("tiny")
            .engine(logits_only())
            .references("transformers")
            .prompt("The capital of France is")
            .steps(4)
            .inject("drop-context")
            .bisect()
            .unwrap();
        let text = lockstep::bisect::render(&rep, "tiny", "transformers");
        eprintln!("{text}");
        let d = rep.diagnosis.as_ref().expect("a diagnosis");
        assert_eq!(d.kind, Diagnosis::LogitsOnly, "{d:?}");
        assert_eq!(rep.step, Some(1));
        assert_eq!(d.title, "first divergent step 1; add per-layer taps to localize further");
        assert!(d.evidence.iter().any(|e| e.contains("mean KL")), "{:?}", d.evidence);
        assert_eq!(run.result.steps[0].verdict, lockstep::compare::tolerance::Verdict::Pass);
        assert!(!run.passed());
    }
}

live_test! {
    /// With each layer's output tapped, bisect places the same kind of bug at its layer.
    fn layer_outputs_let_bisect_localize_to_the_layer() {
        let _one = one_at_a_time();
        let plugin = partial("layer-outputs", |s| s.name == "logits" || s.leaf == "out", false);
        let (rep, _) = Lockstep::new("tiny")
            .engine(plugin)
            .references("transformers")
            .prompt("The capital of France is")
            .steps(3)
            .inject("rope-theta")
            .bisect()
            .unwrap();
        eprintln!("{}", lockstep::bisect::render(&rep, "tiny", "transformers"));
        assert_eq!((rep.step, rep.layer, rep.site.as_deref()), (Some(0), Some(0), Some("layers.0.out")));
        assert_ne!(rep.diagnosis.as_ref().map(|d| d.kind), Some(Diagnosis::LogitsOnly));
    }
}

fn bundled(path: &Path, faults: &str) -> LoadedModel {
    let faults = lockstep_engine::Faults::parse(faults).unwrap();
    lockstep_engine::load(path, &LoadOptions { faults, ..Default::default() }).unwrap()
}

/// A golden trace recorded from the engine itself (`--reference engine`, no Python) replays
/// clean against the same build and fails, with step, layer and site, against an engine
/// whose math changed (here the RoPE base, through its fault option).
#[test]
fn a_golden_trace_of_the_engine_catches_a_change_of_its_math() {
    let dir = tmp("self-trace");
    let (code, out, err) = run(lockstep()
        .args(["record", "--model", "tiny", "--reference", "engine", "--prompt", "The capital of France is", "--steps", "4"])
        .args(["--name", "self", "--out"])
        .arg(dir.join("traces")));
    assert_eq!(code, 0, "{out}\n{err}");
    let model = repo().join("snapshots/models/tiny-llama");
    let golden = Golden::at(&dir);
    let clean = golden.replay(&bundled(&model, ""), "self").unwrap();
    assert!(clean.result.verdict_pass, "{}", clean.summary);
    // Judged as the engine against itself: the tight same-engine bounds, no other floor.
    assert_eq!(clean.result.summary.references[0].mode.name(), "same-engine");
    let changed = bundled(&model, "rope-theta");
    let r = golden.replay(&changed, "self").unwrap();
    let d = r.result.first_divergence.as_ref().expect("the changed engine diverges");
    assert_eq!((d.step, d.layer, d.site.as_str()), (0, Some(0), "layers.0.q_rope"), "{}", r.summary);
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| golden.assert_parity(&changed, "self"))).unwrap_err();
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("diverged at step 0, layer 0, site `layers.0.q_rope`"), "{msg}");
    // No such case: an error that says how to record it.
    let e = golden.replay(&changed, "nope").err().expect("an error").to_string();
    assert!(e.contains("no trace of case `nope`") && e.contains("lockstep record"), "{e}");
}

#[test]
fn a_bad_engine_spec_is_a_usage_error() {
    for (spec, want) in [
        ("python:examples/python/nope.py", "no such Python file"),
        ("cuda", "expected `bundled` or `python:PATH.py[:FACTORY]`"),
        ("python:README.md", "must be a .py file"),
    ] {
        let (code, out, err) = run(lockstep().args(["run", "--engine", spec, "--model", "tiny", "--prompt", "x", "--steps", "2"]));
        assert_eq!(code, 2, "{spec}: {out}\n{err}");
        assert!(err.contains(want), "{spec}: {err}");
    }
}

live_test! {
    /// examples/python/mlx_cache_bug.py: an MLX Llama whose model ignores the cache it is
    /// passed. Bisect names the dropped context at step 1, from the cache lengths.
    fn bisect_names_the_python_engine_that_drops_its_cache() {
        let (code, out, err) = run(lockstep().current_dir(repo()).args([
            "bisect", "--engine", "python:examples/python/mlx_cache_bug.py", "--model", "tiny", "--reference", "mlx",
            "--prompt", "The capital of France is", "--steps", "4",
        ]));
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(out.contains("first divergent step  1"), "{out}");
        assert!(out.contains("the engine's cache holds 1 position, the reference's holds 12 positions"), "{out}");
        assert!(out.contains("[context-dropped]"), "{out}");
    }
}

live_test! {
    /// examples/python/lora_stub.py: an adapter manager that only sets a flag. Bisect names
    /// it: the adapter has no effect.
    fn bisect_names_the_python_engine_whose_adapter_is_a_stub() {
        let (code, out, err) = run(lockstep().current_dir(repo()).args([
            "bisect", "--engine", "python:examples/python/lora_stub.py", "--model", "tiny", "--lora", "snapshots/adapters/tiny-peft",
            "--reference", "mlx", "--chat", "What is the capital of France?", "--steps", "3",
        ]));
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(out.contains("diagnosis: adapter has no effect"), "{out}");
        assert!(out.contains("[adapter-no-effect]"), "{out}");
    }
}

live_test! {
    /// Engine vs engine: a Python engine (here the MLX reference's own module, as an engine)
    /// against the bundled engine, with no other reference; and the engine under test as its
    /// own reference (`--reference engine`).
    fn a_python_engine_runs_against_the_bundled_engine() {
        let (code, out, err) = run(lockstep().current_dir(repo()).args([
            "run", "--engine", "python:references/mlx_ref.py", "--model", "tiny", "--reference", "bundled,engine",
            "--prompt", "The capital of France is", "--steps", "3",
        ]));
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("engine     python:mlx_ref.py (mlx)"), "{out}");
        assert!(out.contains("verdict: PASS"), "{out}");
    }
}

live_test! {
    /// Any decoder, any engine (issue 33): the tiny Qwen3 (per-head q/k norms) is a model the
    /// bundled engine refuses, and examples/python/hf_engine.py runs it. The model is described
    /// by the engine under test, so the run goes ahead against transformers and MLX at the sites
    /// every decoder has, and passes; with the engine's bug switch (layer 1 drops its residual)
    /// bisect names that layer's output.
    fn a_python_engine_on_a_model_the_bundled_engine_does_not_load() {
        let model = "snapshots/models/tiny-qwen3";
        let (code, out, err) = run(lockstep().current_dir(repo()).args(["run", "--model", model, "--reference", "transformers", "--prompt", "x", "--steps", "2"]));
        assert_eq!(code, 2, "the bundled engine does not run qwen3: {out}\n{err}");
        assert!(err.contains("model_type `qwen3` is not supported"), "{err}");

        let json = tmp("qwen3-generic").join("run.json");
        let (code, out, err) = run(lockstep().current_dir(repo()).args([
            "run", "--engine", "python:examples/python/hf_engine.py", "--model", model, "--reference", "transformers,mlx",
            "--prompt", "The capital of France is", "--steps", "4", "--json", json.to_str().unwrap(),
        ]));
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("engine     python:hf_engine.py (hf-engine)"), "{out}");
        assert!(out.contains("no family mapping knows model type `qwen3`, so the sites inside a layer (q, k, attn, mlp_*) are not compared"), "{out}");
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["verdict"], "pass", "{out}");
        assert_the_generic_sites_pass(&report);
        let out = bisect_the_dropped_residual(model, "transformers");
        assert!(out.contains("first divergent step  0"), "{out}");
    }
}

/// Every step of `report` compares the generic sites of the 3-layer tiny Qwen3 against every
/// reference: embed, each layer's cache and output, final_norm, logits (3 + 3 x 3), not one
/// site more, each passing.
fn assert_the_generic_sites_pass(report: &serde_json::Value) {
    let mut want: Vec<String> = vec!["embed".into()];
    for l in 0..3 {
        want.extend(["cache_k", "cache_v", "out"].map(|leaf| format!("layers.{l}.{leaf}")));
    }
    want.extend(["final_norm".into(), "logits".into()]);
    for st in report["steps"].as_array().unwrap() {
        for rs in st["references"].as_array().unwrap() {
            let sites: Vec<&str> = rs["sites"].as_array().unwrap().iter().map(|s| s["site"].as_str().unwrap()).collect();
            assert_eq!(sites, want, "step {} vs {}", st["step"], rs["reference"]);
            assert!(rs["sites"].as_array().unwrap().iter().all(|s| s["verdict"] == "pass"), "{rs}");
        }
    }
}

/// `bisect` of hf_engine.py with its bug switch (layer 1 drops its residual) on `model` against
/// `reference`: exit 1, layer 1's `out` named; its output.
fn bisect_the_dropped_residual(model: &str, reference: &str) -> String {
    let (code, out, err) = run(lockstep().current_dir(repo()).args([
        "bisect", "--engine", "python:examples/python/hf_engine.py:load_dropped_residual", "--model", model,
        "--reference", reference, "--prompt", "The capital of France is", "--steps", "4",
    ]));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains(&format!("first failing site    layers.1.out, layer 1 (vs {reference})")), "{out}");
    assert!(out.contains("layers.1.out fails while what it reads (layers.0.out) passes"), "{out}");
    out
}

live_test! {
    /// The same model as a GGUF (llama.cpp's `qwen3` architecture, which the bundled engine
    /// does not run): llama.cpp offers the generic sites of its graph, the engine passes
    /// against it and transformers, and the dropped residual is found at its layer.
    fn a_python_engine_on_a_gguf_architecture_the_bundled_engine_does_not_load_against_llamacpp() {
        let model = "snapshots/models/tiny-qwen3.gguf";
        let (code, out, err) = run(lockstep().current_dir(repo()).args(["run", "--model", model, "--reference", "llamacpp", "--prompt", "x", "--steps", "2"]));
        assert_eq!(code, 2, "the bundled engine does not run qwen3: {out}\n{err}");
        assert!(err.contains("general.architecture \"qwen3\" is not supported (only llama, gemma3, qwen2)"), "{err}");

        let json = tmp("qwen3-gguf-generic").join("run.json");
        let (code, out, err) = run(lockstep().current_dir(repo()).args([
            "run", "--engine", "python:examples/python/hf_engine.py", "--model", model, "--reference", "llamacpp,transformers",
            "--prompt", "The capital of France is", "--steps", "4", "--json", json.to_str().unwrap(),
        ]));
        assert_eq!(code, 0, "{out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["verdict"], "pass", "{out}");
        assert_the_generic_sites_pass(&report);
        bisect_the_dropped_residual(model, "llamacpp");
    }
}

/// The complete example of docs/your-engine.md is harness/examples/my_engine.rs, verbatim
/// (cargo builds the example, so the page's code compiles).
#[test]
fn the_docs_example_is_the_compiled_one() {
    let page = std::fs::read_to_string(repo().join("docs/your-engine.md")).unwrap();
    let example = std::fs::read_to_string(repo().join("harness/examples/my_engine.rs")).unwrap();
    assert!(page.contains(&format!("```rust\n{example}```")), "docs/your-engine.md's example differs from harness/examples/my_engine.rs: copy the file into the page's rust block");
}
