//! Samplers, tokenizer and chat-template parity, the generation-config diff.
//!
//! - Every filter of the engine's sampler against each reference's own implementation
//!   (transformers' logits processors, `mlx_lm.sample_utils`) on random logits (proptest,
//!   in-process through the same bridge the harness uses).
//! - `lockstep run --sampler`: sampler parity at every step, seeded reproducibility, a
//!   reference with another temperature caught, `--strict-config`.
//! - A chat template changed on one side is caught before step 0.
//! - `lockstep tokcheck` on the fixture and SmolLM2.
//!
//! Needs the reference environment (`make test` creates it); fails, never skips, without it.

use std::path::PathBuf;
use std::sync::OnceLock;

use lockstep::checks::sampler::compare;
use lockstep::compare::tolerance::Verdict;
use lockstep_engine::sample::{self, Order, SamplerConfig};
use numpy::{PyArray1, PyArrayMethods};
use proptest::prelude::*;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::Value;

mod common;
use common::*;

// --- each filter against each reference's own code ------------------------------------------

static SAMPLERS: OnceLock<(Py<PyAny>, Py<PyAny>)> = OnceLock::new();

/// Both reference samplers, made once (transformers' lazy imports are not safe to race
/// from the test threads).
fn samplers() -> &'static (Py<PyAny>, Py<PyAny>) {
    SAMPLERS.get_or_init(|| {
        // SAFETY: before the interpreter starts; the tests of this file only read it.
        unsafe { std::env::set_var("LOCKSTEP_VENV", venv()) };
        lockstep::reference::python::ensure_python().expect("the reference environment starts");
        Python::attach(|py| {
            let m = py.import("sampling").expect("references/sampling.py imports");
            let hf = m.getattr("TransformersSampling").unwrap().call0().unwrap().unbind();
            let mlx = m.getattr("MlxSampling").unwrap().call0().unwrap().unbind();
            (hf, mlx)
        })
    })
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Transformers,
    Mlx,
}

/// The reference's processed distribution, from `references/sampling.py`.
fn reference(side: Side, logits: &[f32], prev: &[u32], cfg: &SamplerConfig) -> Vec<f64> {
    let (hf, mlx) = samplers();
    Python::attach(|py| {
        let obj = match side {
            Side::Transformers => hf.bind(py),
            Side::Mlx => mlx.bind(py),
        };
        let params = PyDict::new(py);
        params.set_item("temperature", cfg.temperature).unwrap();
        params.set_item("top_k", cfg.top_k).unwrap();
        params.set_item("top_p", cfg.top_p).unwrap();
        params.set_item("min_p", cfg.min_p).unwrap();
        params.set_item("rep_penalty", cfg.rep_penalty).unwrap();
        let out = obj
            .call_method1("distribution", (PyArray1::from_slice(py, logits), PyList::new(py, prev.iter().copied()).unwrap(), params))
            .unwrap_or_else(|e| panic!("{}", lockstep::reference::pycall::format_pyerr(py, &e)));
        out.cast::<PyArray1<f64>>().unwrap().readonly().as_slice().unwrap().to_vec()
    })
}

/// The engine in the reference's order, compared with the reference: never a failure, and
/// an exact kept set unless a token sat on a filter boundary within float32 rounding.
fn check(side: Side, logits: &[f32], prev: &[u32], spec: &str) -> Result<(), TestCaseError> {
    let order = match side {
        Side::Transformers => Order::transformers(),
        Side::Mlx => Order::mlx(),
    };
    let cfg = SamplerConfig::parse(spec).unwrap().with_order(order);
    let ours = sample::process(logits, prev, &cfg).unwrap();
    let theirs = reference(side, logits, prev, &cfg);
    let c = compare(&format!("{side:?}"), &ours, &theirs);
    prop_assert!(c.verdict != Verdict::Fail, "{side:?} {spec}: {c:?}");
    if c.verdict == Verdict::Pass {
        prop_assert!(c.kept_equal && c.tv <= 1e-5, "{c:?}");
    }
    Ok(())
}

fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    // Two vocabulary sizes: mlx-lm compiles its filters (mx.compile) once per shape and
    // parameter value, ~1 s each, so shapes and filter parameters come from small sets
    // while the logits are fresh in every case.
    (prop::sample::select(vec![64usize, 300]), 0.3f32..8.0).prop_flat_map(|(n, scale)| prop::collection::vec(-1.0f32..1.0, n).prop_map(move |v| {
        // Spread like real logits: a few large values above a broad body.
        v.iter().enumerate().map(|(i, x)| x * scale + if i % 17 == 3 { scale } else { 0.0 }).collect()
    }))
}

fn prev_strategy(n: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0u32..n as u32, 0..40)
}

fn one_of(v: &[f64]) -> impl Strategy<Value = f64> {
    prop::sample::select(v.to_vec())
}

live_proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    fn temperature_matches_transformers_and_mlx(l in logits_strategy(), t in 0.05f64..4.0) {
        check(Side::Transformers, &l, &[], &format!("temp={t}"))?;
        check(Side::Mlx, &l, &[], &format!("temp={t}"))?;
    }

    fn top_k_matches_transformers_and_mlx(l in logits_strategy(), k in prop::sample::select(vec![1usize, 5, 40]), t in 0.3f64..2.0) {
        check(Side::Transformers, &l, &[], &format!("temp={t},top_k={k}"))?;
        check(Side::Mlx, &l, &[], &format!("temp={t},top_k={k}"))?;
    }

    fn top_p_matches_transformers_and_mlx(l in logits_strategy(), p in one_of(&[0.1, 0.5, 0.9, 0.99]), t in 0.3f64..2.0) {
        check(Side::Transformers, &l, &[], &format!("temp={t},top_p={p}"))?;
        check(Side::Mlx, &l, &[], &format!("temp={t},top_p={p}"))?;
    }

    fn min_p_matches_transformers_and_mlx(l in logits_strategy(), m in one_of(&[0.001, 0.05, 0.3, 0.9]), t in 0.3f64..2.0) {
        check(Side::Transformers, &l, &[], &format!("temp={t},min_p={m}"))?;
        check(Side::Mlx, &l, &[], &format!("temp={t},min_p={m}"))?;
    }

    fn repetition_penalty_matches_transformers_and_mlx(
        (l, prev) in logits_strategy().prop_flat_map(|l| { let n = l.len(); (Just(l), prev_strategy(n)) }),
        r in 0.5f64..2.0, greedy in any::<bool>(),
    ) {
        let spec = if greedy { format!("rep_penalty={r}") } else { format!("temp=0.9,rep_penalty={r}") };
        check(Side::Transformers, &l, &prev, &spec)?;
        check(Side::Mlx, &l, &prev, &spec)?;
    }

    fn the_whole_chain_matches_transformers_and_mlx(
        (l, prev) in logits_strategy().prop_flat_map(|l| { let n = l.len(); (Just(l), prev_strategy(n)) }),
        t in 0.3f64..2.0, r in 0.8f64..1.5,
        (k, p, m) in prop::sample::select(vec![(40usize, 0.95f64, 0.05f64), (5, 0.5, 0.0), (0, 0.9, 0.2)]),
    ) {
        let spec = format!("temp={t},top_k={k},top_p={p},min_p={m},rep_penalty={r}");
        check(Side::Transformers, &l, &prev, &spec)?;
        check(Side::Mlx, &l, &prev, &spec)?;
    }

    fn greedy_matches_transformers_and_mlx(l in logits_strategy()) {
        check(Side::Transformers, &l, &[], "")?;
        check(Side::Mlx, &l, &[], "")?;
    }
}

live_test! {
    /// The comparison can fail: temperature before top-p (transformers) is another sampler than
    /// top-p before temperature (mlx-lm), and 0.7 is not 0.8 (incident 3).
    fn another_order_or_temperature_is_a_sampler_failure() {
        let logits: Vec<f32> = (0..200).map(|i| ((i * 7919) % 97) as f32 / 12.0).collect();
        let cfg = SamplerConfig::parse("temp=0.5,top_p=0.9").unwrap();
        let ours = sample::process(&logits, &[], &cfg).unwrap(); // transformers order
        let c = compare("mlx", &ours, &reference(Side::Mlx, &logits, &[], &cfg));
        assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
        assert!(!c.kept_equal);
        let hot = SamplerConfig::parse("temp=0.8").unwrap();
        let ours = sample::process(&logits, &[], &hot).unwrap();
        let c = compare("transformers", &ours, &reference(Side::Transformers, &logits, &[], &SamplerConfig::parse("temp=0.7").unwrap()));
        assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
        assert!(c.kept_equal && c.tv > 1e-3, "{c:?}");
    }
}

// --- lockstep run --sampler -------------------------------------------------------------------

fn run_json(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String, Value) {
    let dir = tmp(&format!("sampling-{}", args.join("_").replace(['/', ' ', '=', ',', '"', '.'], "").chars().take(60).collect::<String>()));
    let json = dir.join("report.json");
    let mut cmd = lockstep();
    cmd.args(args).arg("--json").arg(&json);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (code, out, err) = run(&mut cmd);
    let report = std::fs::read_to_string(&json).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(Value::Null);
    (code, out, err, report)
}

/// Every step has a sampler check for each named reference, none of them a failure.
fn assert_sampler_parity(report: &Value, refs: &[&str], out: &str) {
    let steps = report["steps"].as_array().unwrap();
    assert!(!steps.is_empty(), "{out}");
    for st in steps {
        let checks = st["sampler"].as_array().unwrap_or_else(|| panic!("step {} has no sampler checks:\n{out}", st["step"]));
        let names: Vec<&str> = checks.iter().map(|c| c["reference"].as_str().unwrap()).collect();
        assert_eq!(names, refs);
        for c in checks {
            assert_ne!(c["verdict"], "fail", "step {}: {c}\n{out}", st["step"]);
            assert!(c["tv"].as_f64().unwrap() < 1e-3, "{c}");
        }
    }
}

live_test! {
    fn smollm2_sampler_parity_passes_at_every_step_against_transformers_and_mlx() {
        let (code, out, err, report) = run_json(
            &["run", "--model", "smollm2", "--reference", "transformers,mlx", "--chat", "Write a haiku about rust.",
              "--sampler", "temp=0.8,top_p=0.95,seed=0", "--steps", "12"],
            &[],
        );
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        assert_sampler_parity(&report, &["transformers", "mlx"], &out);
        // transformers sums its nucleus in a way that lands on the engine's kept set exactly.
        for st in report["steps"].as_array().unwrap() {
            let c = &st["sampler"][0];
            assert_eq!(c["kept_equal"], true, "{c}");
            assert!(c["tv"].as_f64().unwrap() < 1e-5, "{c}");
        }
        assert!(out.contains("sampler parity: the engine's processed distribution"), "{out}");
        assert!(out.contains("* filter order       temperature > top_p"), "{out}");
        assert!(report["generate"].as_array().unwrap().is_empty(), "a sampled run has no greedy generate check");
    }
}

live_test! {
    fn tiny_sampler_parity_with_every_filter_and_the_mlx_order() {
        for order in ["transformers", "mlx"] {
            let spec = format!("temp=0.7,top_k=40,top_p=0.9,min_p=0.02,rep_penalty=1.2,seed=5,order={order}");
            let (code, out, err, report) = run_json(
                &["run", "--model", "tiny", "--reference", "transformers,mlx", "--chat", "Count to ten: 1 2 3", "--sampler", &spec, "--steps", "10"],
                &[],
            );
            assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
            assert_sampler_parity(&report, &["transformers", "mlx"], &out);
            // The engine samples in the order it was given; the table marks the reference whose order differs.
            let row = out.lines().find(|l| l.contains("filter order")).unwrap();
            let theirs = if order == "mlx" { "*rep_penalty > temperature" } else { "*rep_penalty > top_p" };
            assert!(row.contains("DIFFERS") && row.contains(theirs), "{row}");
            let row = out.lines().find(|l| l.contains("rep window")).unwrap();
            assert!(row.contains("DIFFERS") && row.contains("last 20") && row.contains("all"), "{row}");
        }
    }
}

live_test! {
    fn seeded_sampling_is_reproducible() {
        let gen = |seed: &str| {
            let (code, out, err) = run(lockstep().args(["generate", "--model", "tiny", "--chat", "hello", "-n", "24", "--sampler"]).arg(format!("temp=1.0,top_k=50,seed={seed}")));
            assert_eq!(code, 0, "{err}");
            out
        };
        assert_eq!(gen("7"), gen("7"));
        assert_ne!(gen("7"), gen("8"));
        // run and generate draw the same tokens from the same seed.
        let (code, out, _, report) =
            run_json(&["run", "--model", "tiny", "--reference", "transformers", "--chat", "hello", "--sampler", "temp=1.0,top_k=50,seed=7", "--steps", "24"], &[]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(format!("{}\n", report["tokens"]["generated_text"].as_str().unwrap()), gen("7"));
    }
}

live_test! {
    fn strict_config_fails_before_step_0_on_any_difference() {
        let base = ["run", "--model", "tiny", "--chat", "hello", "--sampler", "temp=0.8,top_p=0.9,seed=0", "--steps", "3", "--strict-config"];
        // transformers' order is the engine's default: nothing differs.
        let (code, out, err, _) = run_json(&[&base[..], &["--reference", "transformers"]].concat(), &[]);
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        assert!(out.contains("every compared setting agrees"), "{out}");
        // mlx applies top-p before the temperature.
        let (code, out, _, report) = run_json(&[&base[..], &["--reference", "transformers,mlx"]].concat(), &[]);
        assert_eq!(code, 1, "{out}");
        assert_eq!(report["steps"].as_array().unwrap().len(), 0);
        assert_eq!(report["first_divergence"]["site"], "config");
        assert!(out.contains("stopped before step 0: --strict-config: the generation config differs (filter order)"), "{out}");
    }
}

/// A reference shim around the real one, with a sabotage chosen by `LOCKSTEP_TEST_SABOTAGE`.
fn sabotaged(tag: &str, module: &str, class: &str, body: &str) -> PathBuf {
    let dir = tmp(&format!("sabotaged-{tag}"));
    let real = repo().join("references");
    let shim = format!(
        r#"
import importlib.util, os, sys, json
sys.path.append({real:?})
_spec = importlib.util.spec_from_file_location("_real_{module}", {real_ref:?})
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
MODE = os.environ.get("LOCKSTEP_TEST_SABOTAGE", "")

class Sabotaged(_real.{class}):
{body}

def load(model, **kw):
    return Sabotaged(model, **kw)

def load_tokenizer(model, **kw):
    side = _real.load_tokenizer(model, **kw)
    if MODE == "tokenizer":
        real = side.tokenize
        def tokenize(texts, add_special_tokens):
            return json.dumps([ids + [0] if "2024" in t else ids for ids, t in zip(json.loads(real(texts, add_special_tokens)), texts)])
        side.tokenize = tokenize
    return side
"#,
        real = real.display().to_string(),
        real_ref = real.join(format!("{module}.py")).display().to_string(),
    );
    std::fs::write(dir.join(format!("{module}.py")), shim).unwrap();
    dir
}

live_test! {
    fn a_reference_sampling_at_another_temperature_is_caught_at_step_0() {
        let refs = sabotaged(
            "temperature",
            "transformers_ref",
            "TransformersReference",
            r#"    def sample_distribution(self, logits, prev, params):
            if MODE == "temperature":
                params = dict(params, temperature=params["temperature"] * 0.875)  # 0.8 -> 0.7
            return super().sample_distribution(logits, prev, params)"#,
        );
        let (code, out, err, report) = run_json(
            &["run", "--model", "tiny", "--reference", "transformers", "--chat", "hello", "--sampler", "temp=0.8,top_p=0.95,seed=0", "--steps", "4"],
            &[("LOCKSTEP_REFERENCES", refs.to_str().unwrap()), ("LOCKSTEP_TEST_SABOTAGE", "temperature")],
        );
        assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
        assert_eq!(report["first_divergence"]["site"], "sampler");
        assert_eq!(report["first_divergence"]["step"], 0);
        assert!(out.contains("verdict: DIVERGED at step 0, site `sampler`"), "{out}");
    }
}

// --- template and tokens before step 0 --------------------------------------------------------

live_test! {
    fn a_chat_template_changed_on_one_side_is_caught_before_step_0() {
        let refs = sabotaged(
            "template",
            "transformers_ref",
            "TransformersReference",
            r#"    def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if MODE == "template":
                self.tok.chat_template = self.tok.chat_template.replace("You are a tiny test model.", "You are a tiny model.")"#,
        );
        let (code, out, err, report) = run_json(
            &["run", "--model", "tiny", "--reference", "transformers", "--chat", "What is the capital of France?", "--steps", "8"],
            &[("LOCKSTEP_REFERENCES", refs.to_str().unwrap()), ("LOCKSTEP_TEST_SABOTAGE", "template")],
        );
        assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
        assert_eq!(report["steps"].as_array().unwrap().len(), 0, "nothing may be fed after a prompt mismatch");
        assert_eq!(report["first_divergence"]["site"], "tokens");
        assert_eq!(report["first_divergence"]["step"], 0);
        assert!(out.contains("stopped before step 0: the prompt's token ids differ"), "{out}");
        assert!(out.contains("transformers renders OTHER chat text, from char"), "{out}");
        assert!(out.contains("* chat template"), "{out}");
        // Both token sequences, with pieces.
        let engine_line = out.lines().find(|l| l.trim_start().starts_with("engine (")).expect("engine token line");
        let ref_line = out.lines().find(|l| l.trim_start().starts_with("transformers (")).expect("reference token line");
        assert!(engine_line.contains("\"test\"") || engine_line.contains("Ġtest"), "{engine_line}");
        assert!(!ref_line.contains("Ġtest"), "{ref_line}");
        assert!(out.contains("first difference at token"), "{out}");
    }
}

#[test]
fn bad_sampler_specs_are_usage_errors() {
    for (spec, needle) in [("temp=-1", "--sampler temp=-1"), ("top_p=0", "(0, 1]"), ("foo=1", "unknown key `foo`"), ("order=top_p", "name all five stages")] {
        assert_exit_2(&["run", "--model", "tiny", "--chat", "hi", "--sampler", spec], &[], &[needle]);
    }
}

// --- tokcheck ---------------------------------------------------------------------------------

fn tokcheck(args: &[&str], env: &[(&str, &str)]) -> (i32, String, Value) {
    let json = tmp(&format!("tokcheck-{}", args.join("_").replace(['/', ',', '.'], "_"))).join("t.json");
    let mut cmd = lockstep();
    cmd.arg("tokcheck").args(args).arg("--json").arg(&json);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (code, out, err) = run(&mut cmd);
    let v = std::fs::read_to_string(&json).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(Value::Null);
    (code, format!("{out}{err}"), v)
}

live_test! {
    fn tokcheck_tiny_agrees_with_transformers_and_mlx() {
        let corpus = tmp("corpus").join("extra.txt");
        std::fs::write(&corpus, "first line\nsecond\\twith a tab\\n\n\n").unwrap();
        let (code, out, v) = tokcheck(&["--model", "tiny", "--reference", "transformers,mlx", "--corpus", corpus.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(v["mismatches"], 0);
        assert_eq!(v["reference_disagreements"], 0, "{out}");
        let strings = v["strings"].as_array().unwrap();
        assert_eq!(strings.len(), lockstep::checks::tokcheck::CORPUS.len() + 3);
        assert_eq!(strings.last().unwrap()["text"], "");
        assert_eq!(strings[strings.len() - 2]["text"], "second\twith a tab\n");
        assert_eq!(v["template"]["outcome"], "agree");
        assert!(out.contains("verdict: PASS"), "{out}");
        // Missing corpus file: exit 2, named.
        let (code, out, _) = tokcheck(&["--model", "tiny", "--corpus", "/nonexistent/corpus.txt"], &[]);
        assert_eq!(code, 2, "{out}");
        assert!(out.contains("/nonexistent/corpus.txt"), "{out}");
    }
}

live_test! {
    /// SmolLM2's GGUF says `tokenizer.ggml.pre = smollm` (digits split one by one). The engine
    /// and llama.cpp follow it; transformers' GGUF tokenizer (which mlx uses too) does not. That
    /// is reported as the references disagreeing, with the engine on llama.cpp's side.
    fn tokcheck_smollm2_reports_the_reference_side_digit_split_disagreement() {
        let (code, out, v) = tokcheck(&["--model", "smollm2", "--reference", "transformers,mlx"], &[]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(v["mismatches"], 0, "{out}");
        let disagree: Vec<&str> = v["strings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["outcome"] == "references_disagree")
            .map(|s| s["label"].as_str().unwrap())
            .collect();
        assert!(disagree.contains(&"space before digits"), "{out}");
        assert!(out.contains("the engine agrees with llamacpp(witness)"), "{out}");
        assert!(out.contains("pre-tokenizer ByteLevel"), "{out}");
        assert_eq!(v["template"]["outcome"], "agree", "{out}");
        assert!(out.contains("references disagree with each other"), "{out}");
    }
}

live_test! {
    fn tokcheck_catches_a_tokenizer_that_differs() {
        let refs = sabotaged("tokenizer", "transformers_ref", "TransformersReference", "    pass");
        let (code, out, v) = tokcheck(
            &["--model", "tiny", "--reference", "transformers"],
            &[("LOCKSTEP_REFERENCES", refs.to_str().unwrap()), ("LOCKSTEP_TEST_SABOTAGE", "tokenizer")],
        );
        assert_eq!(code, 1, "{out}");
        assert!(v["mismatches"].as_u64().unwrap() >= 1, "{out}");
        assert!(out.contains("MISMATCH"), "{out}");
        assert!(out.contains("verdict: MISMATCH"), "{out}");
    }
}
