//! End-to-end tests of the `lockstep` binary against the real transformers reference.
//!
//! Most need the reference environment. `make test` creates it; run directly with
//! `cargo test` they use `$LOCKSTEP_VENV` or the repository's `.venv`. Where it did not
//! exist when the harness was built (build.rs), they are listed as ignored with the command
//! that enables them, never passed silently; the tests of bad input need no Python and
//! always run. Golden replays that need no Python at all are in tests/replay.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::*;

/// Runs `lockstep run` with a JSON report and returns (exit code, stdout, report).
/// `model` may carry more options after the model ("smollm2 --weights dequant").
fn run_json(model: &str, prompt_flag: &str, prompt: &str, steps: usize, extra_env: &[(&str, &str)]) -> (i32, String, String, Value) {
    let dir = tmp(&format!("json-{}-{steps}", model.replace(['/', ' '], "_")));
    let json = dir.join("report.json");
    let mut cmd = lockstep();
    cmd.args(["run", "--model"])
        .args(model.split_whitespace())
        .args(["--reference", "transformers", prompt_flag, prompt, "--steps"])
        .arg(steps.to_string())
        .arg("--json")
        .arg(&json);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let (code, out, err) = run(&mut cmd);
    let report = match std::fs::read_to_string(&json) {
        Ok(t) => serde_json::from_str(&t).expect("report is JSON"),
        Err(_) => Value::Null,
    };
    (code, out, err, report)
}

/// Everything a passing run must show, for every reference in `full` (which provide all
/// sites): every site of every layer, both caches and the logits compared on every step,
/// with pass/drift verdicts, and each reference's own generate equal to the engine's tokens.
/// The site graph of the model the report ran (its family's).
fn site_graph(report: &Value) -> lockstep_engine::SiteGraph {
    let path = report["model"]["path"].as_str().expect("the report names its model");
    lockstep_engine::models::site_graph_at(Path::new(path)).expect("the model's site graph")
}

fn assert_full_pass(report: &Value, num_layers: usize, out: &str, full: &[&str]) {
    assert_eq!(report["verdict"], "pass", "{out}");
    let g = site_graph(report);
    assert_eq!(g.num_layers(), num_layers);
    let graph = g.names();
    assert!(report["first_divergence"].is_null());
    let steps = report["steps"].as_array().unwrap();
    assert!(!steps.is_empty());
    for (n, st) in steps.iter().enumerate() {
        assert_eq!(st["step"], n);
        let fed = st["fed"].as_array().unwrap().len();
        if n > 0 {
            assert_eq!(fed, 1, "step {n} must feed exactly one token");
        }
        let fed_so_far: usize = steps[..=n].iter().map(|s| s["fed"].as_array().unwrap().len()).sum();
        for rs in st["references"].as_array().unwrap() {
            let name = rs["reference"].as_str().unwrap();
            for s in rs["sites"].as_array().unwrap() {
                let v = s["verdict"].as_str().unwrap();
                assert!(v == "pass" || v == "drift", "step {n} {name} {}: {v}", s["site"]);
            }
            assert!(rs["logits_verdict"] != "fail", "step {n} {name}: logits fail");
            if !full.contains(&name) {
                continue;
            }
            // Every site of the model's site graph compared, looked up by name.
            let sites: Vec<&str> = rs["sites"].as_array().unwrap().iter().map(|s| s["site"].as_str().unwrap()).collect();
            for site in &graph {
                assert!(sites.contains(&site.as_str()), "step {n} {name}: {site} not compared");
            }
            assert_eq!(sites.len(), graph.len(), "step {n} {name}: {} sites", sites.len());
            for s in rs["sites"].as_array().unwrap() {
                assert!(s["metrics"]["rel_l2"].as_f64().unwrap() < 1e-2, "step {n} {name} {}", s["site"]);
            }
            // The cache holds everything fed so far, on both sides.
            let cache = rs["sites"].as_array().unwrap().iter().find(|s| s["site"] == "layers.0.cache_k").unwrap();
            assert_eq!(cache["engine_shape"][1], fed_so_far);
            assert_eq!(cache["reference_shape"][1], fed_so_far);
            assert!(rs["logits"]["top1_agree"].as_bool().unwrap(), "step {n} {name}: top-1 differs");
        }
    }
    for g in report["generate"].as_array().unwrap() {
        if full.contains(&g["reference"].as_str().unwrap()) {
            assert_eq!(g["matches"], true, "engine tokens != {} generate:\n{out}", g["reference"]);
        }
    }
    assert_eq!(report["tokens"]["prompt"]["ids_match"], true);
    assert_eq!(report["model"]["sha256"].as_str().unwrap().len(), 64);
    assert!(out.contains("verdict: PASS"), "{out}");
}

live_test! {
    fn tiny_hf_dir_runs_in_lockstep_and_passes() {
        let (code, out, err, report) = run_json("tiny", "--chat", "What is the capital of France?", 12, &[]);
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        assert_full_pass(&report, 3, &out, &["transformers"]);
        assert_eq!(report["reference"]["name"], "transformers");
        assert_eq!(report["reference"]["version"], "5.23.0");
        assert_eq!(report["engine"]["weights"], "hf-safetensors");
        assert_eq!(report["engine"]["transforms"].as_array().unwrap().len(), 0);
        assert_eq!(report["steps"].as_array().unwrap().len(), 12);
    }
}

live_test! {
    fn tiny_gguf_runs_in_lockstep_through_the_qk_transform() {
        let (code, out, err, report) = run_json("tiny-gguf", "--chat", "What is the capital of France?", 12, &[]);
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        assert_full_pass(&report, 3, &out, &["transformers"]);
        assert_eq!(report["engine"]["weights"], "gguf");
        assert_eq!(report["engine"]["transforms"][0], "gguf-qk-deinterleave");
        let q = &report["steps"][0]["references"][0]["sites"].as_array().unwrap().iter().find(|s| s["site"] == "layers.1.q_rope").unwrap();
        assert_eq!(q["transform"], "gguf-qk-deinterleave");
        assert!(out.contains("compared through gguf-qk-deinterleave"));
    }
}

live_test! {
    fn smollm2_dequantized_passes_on_all_30_layers_and_matches_generate() {
        let (code, out, err, report) = run_json("smollm2 --weights dequant", "--chat", "What is the capital of France?", 32, &[]);
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        assert_full_pass(&report, 30, &out, &["transformers"]);
        let text = report["tokens"]["generated_text"].as_str().unwrap();
        assert!(text.contains("Paris"), "SmolLM2 should answer Paris: {text:?}");
        assert!(out.contains("transformers generate (greedy): identical tokens"));
    }
}

live_test! {
    fn plain_prompt_and_generate_command_agree_with_lockstep_tokens() {
        let (code, out, _, report) = run_json("tiny", "--prompt", "def add(a, b):", 6, &[]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(report["tokens"]["prompt"]["mode"], "prompt");
        let (code, gen, err) = run(lockstep().args(["generate", "--model", "tiny", "--prompt", "def add(a, b):", "-n", "6"]));
        assert_eq!(code, 0, "{err}");
        assert_eq!(gen.strip_suffix('\n').unwrap(), report["tokens"]["generated_text"].as_str().unwrap());
    }
}

// --- several references: MLX, llama.cpp, the f64 oracle ---------------------------------------

fn assert_pairs_printed(out: &str, pairs: &[&str]) {
    assert!(out.contains("reference vs reference (the measured noise floor)"), "{out}");
    for p in pairs {
        assert!(out.contains(p), "pair {p:?} missing:\n{out}");
    }
}

live_test! {
    fn tiny_hf_dir_with_transformers_and_mlx() {
        let (code, out, err, report) = run_json("tiny", "--chat", "What is the capital of France?", 8, &[]);
        assert_eq!(code, 0, "{out}{err}");
        let dir = tmp("tiny-mlx");
        let json = dir.join("r.json");
        let (code, out, err) = run(lockstep()
            .args(["run", "--model", "tiny", "--reference", "transformers,mlx", "--chat", "What is the capital of France?", "--steps", "8", "--json"])
            .arg(&json));
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_full_pass(&r, 3, &out, &["transformers", "mlx"]);
        assert_eq!(r["references"][1]["name"], "mlx");
        assert_eq!(r["references"][1]["version"], "0.32.4");
        assert_pairs_printed(&out, &["transformers vs mlx"]);
        // Same engine tokens as the single-reference run.
        assert_eq!(r["tokens"]["generated"], report["tokens"]["generated"]);
        // Every engine site carries the floor measured between the two references.
        let s = &r["steps"][3]["references"][0]["sites"][10];
        assert!(s["floor"].as_f64().unwrap() < 1e-4, "{s}");
    }
}

live_test! {
    fn tiny_gguf_with_transformers_mlx_and_llamacpp() {
        let dir = tmp("tiny-gguf-3");
        let json = dir.join("r.json");
        let (code, out, err) = run(lockstep()
            .args(["run", "--model", "tiny-gguf", "--reference", "transformers,mlx,llamacpp", "--chat", "What is the capital of France?", "--steps", "8", "--json"])
            .arg(&json));
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        // The tiny GGUF is F32: llama.cpp computes in f32 too, so it is held to the full set.
        assert_full_pass(&r, 3, &out, &["transformers", "mlx", "llamacpp"]);
        assert_pairs_printed(&out, &["transformers vs mlx", "transformers vs llamacpp", "mlx vs llamacpp"]);
        for rf in r["references"].as_array().unwrap().iter().skip(1) {
            assert_eq!(rf["transforms"][0], "gguf-qk-deinterleave", "{rf}");
        }
    }
}

live_test! {
    fn smollm2_against_transformers_mlx_and_llamacpp() {
        let dir = tmp("smollm2-3");
        let json = dir.join("r.json");
        let (code, out, err) = run(lockstep()
            .args(["run", "--model", "smollm2", "--weights", "dequant", "--reference", "transformers,mlx,llamacpp", "--chat", "What is the capital of France?", "--steps", "16", "--json"])
            .arg(&json));
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        // transformers and MLX: every site, pass. llama.cpp quantizes activations for its Q4_1
        // matmuls: far from the f32 engine, but no farther than from the other references.
        assert_full_pass(&r, 30, &out, &["transformers", "mlx"]);
        for st in r["steps"].as_array().unwrap() {
            let l = &st["references"][2];
            assert_eq!(l["reference"], "llamacpp");
            let sites: Vec<&str> = l["sites"].as_array().unwrap().iter().map(|s| s["site"].as_str().unwrap()).collect();
            assert_eq!(sites, site_graph(&r).names(), "llama.cpp provides every site");
        }
        let summary = r["summary"]["references"].as_array().unwrap();
        assert_eq!(summary[0]["verdict"], "pass");
        assert_eq!(summary[1]["verdict"], "pass");
        assert_pairs_printed(&out, &["transformers vs mlx", "transformers vs llamacpp", "mlx vs llamacpp"]);
        let pairs = r["summary"]["pairs"].as_array().unwrap();
        let tm = pairs.iter().find(|p| p["a"] == "transformers" && p["b"] == "mlx").unwrap();
        assert!(tm["worst_rel_l2"][0]["rel_l2"].as_f64().unwrap() < 1e-4, "{tm}");
        assert!(r["tokens"]["generated_text"].as_str().unwrap().contains("Paris"));
    }
}

live_test! {
    fn f64_oracle_says_which_side_is_closer() {
        let dir = tmp("oracle");
        let json = dir.join("r.json");
        let (code, out, err) = run(lockstep()
            .args(["run", "--model", "tiny", "--reference", "transformers,transformers:f64", "--chat", "hi", "--steps", "4", "--json"])
            .arg(&json));
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let o = &r["summary"]["oracle"][0];
        assert_eq!(o["oracle"], "transformers:f64");
        assert_eq!(o["reference"], "transformers");
        let total = o["engine_closer"].as_u64().unwrap() + o["reference_closer"].as_u64().unwrap() + o["ties"].as_u64().unwrap();
        assert_eq!(total as usize, 4 * 51);
        let site = &r["steps"][1]["references"][0]["sites"][5]["oracle"];
        assert!(site["engine_rel_l2"].as_f64().unwrap() > 0.0 && site["reference_rel_l2"].as_f64().unwrap() > 0.0, "{site}");
        assert!(out.contains("which is right? distance to the transformers:f64 oracle"));
    }
}

live_test! {
    fn a_model_a_reference_cannot_load_names_the_reference() {
        assert_exit_2(
            &["run", "--model", "tiny", "--reference", "transformers,llamacpp", "--chat", "hi"],
            &[],
            &["llamacpp", "needs a .gguf file"],
        );
    }
}

live_test! {
    fn a_missing_reference_package_names_the_reference_and_the_fix() {
        // A references/ directory whose mlx module needs a package the environment lacks.
        let dir = tmp("refs-missing-pkg");
        std::fs::write(dir.join("mlx_ref.py"), "import mlx_package_that_is_not_installed\n").unwrap();
        let d = dir.to_str().unwrap();
        assert_exit_2(
            &["run", "--model", "tiny", "--reference", "mlx", "--chat", "hi"],
            &[("LOCKSTEP_REFERENCES", d)],
            &["the mlx reference", "references/mlx_ref.py", "No module named 'mlx_package_that_is_not_installed'", "make setup"],
        );
    }
}

#[test]
#[cfg_attr(not(lockstep_live), ignore = "needs the reference environment: run `make setup` or `make test` (or set LOCKSTEP_VENV)")]
fn a_reference_without_a_declared_capabilitys_method_is_named_after_load() {
    // The real transformers reference, which declares capability `sampler`, without its sampler.
    let dir = tmp("refs-missing-method");
    let real = repo().join("references");
    let shim = format!(
        r#"
import importlib.util, sys
sys.path.append({real:?})
_spec = importlib.util.spec_from_file_location("_real_transformers_ref", {real_ref:?})
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)

class NoSampler(_real.TransformersReference):
    sample_distribution = None

def load(model, **kw):
    return NoSampler(model, **kw)
"#,
        real = real.display().to_string(),
        real_ref = real.join("transformers_ref.py").display().to_string(),
    );
    std::fs::write(dir.join("transformers_ref.py"), shim).unwrap();
    let d = dir.to_str().unwrap();
    assert_exit_2(
        &["run", "--model", "tiny", "--reference", "transformers", "--chat", "hi"],
        &[("LOCKSTEP_REFERENCES", d)],
        &["references/protocol.py", "the transformers reference (NoSampler) declares capability 'sampler' but has no method sample_distribution()"],
    );
}

// --- the harness catches what a reference (or engine) gets wrong --------------------------

/// A reference module wrapping the real transformers reference, with a sabotage chosen by
/// `LOCKSTEP_TEST_SABOTAGE`: proves the comparison can fail and names the right place.
fn sabotaged_references() -> PathBuf {
    let dir = tmp("sabotaged-refs");
    let real = repo().join("references");
    let shim = format!(
        r#"
import importlib.util, os, sys
sys.path.append({real:?})
_spec = importlib.util.spec_from_file_location("_real_transformers_ref", {real_ref:?})
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
MODE = os.environ.get("LOCKSTEP_TEST_SABOTAGE", "")

class Sabotaged(_real.TransformersReference):
    n = 0
    def step(self, ids):
        out = super().step(ids)
        n, self.n = self.n, self.n + 1
        if MODE == "perturb" and n == 2:
            out["layers.1.mlp_up"] = (out["layers.1.mlp_up"] * 1.5).copy()
        if MODE == "perturb-f32" and n == 2 and self.dtype_name == "float32":
            out["layers.1.mlp_up"] = (out["layers.1.mlp_up"] * 1.03).copy()
        if MODE == "raise" and n == 1:
            raise RuntimeError("sabotage: the reference failed at step 1")
        return out

def load(model, **kw):
    if MODE == "load-raise":
        raise ValueError("sabotage: cannot load " + model)
    return Sabotaged(model, **kw)
"#,
        real = real.display().to_string(),
        real_ref = real.join("transformers_ref.py").display().to_string(),
    );
    std::fs::write(dir.join("transformers_ref.py"), shim).unwrap();
    dir
}

live_test! {
    fn a_divergent_site_is_named_with_step_and_layer_and_exits_1() {
        let refs = sabotaged_references();
        let refs = refs.to_str().unwrap();
        let (code, out, err, report) =
            run_json("tiny", "--chat", "hello", 5, &[("LOCKSTEP_REFERENCES", refs), ("LOCKSTEP_TEST_SABOTAGE", "perturb")]);
        assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
        assert_eq!(report["verdict"], "diverged");
        let fd = &report["first_divergence"];
        assert_eq!(fd["step"], 2);
        assert_eq!(fd["layer"], 1);
        assert_eq!(fd["site"], "layers.1.mlp_up");
        assert!(out.contains("verdict: DIVERGED at step 2, layer 1, site `layers.1.mlp_up`"), "{out}");
        // Steps 0 and 1 pass; the failure is reported where it is, not before.
        assert_eq!(report["steps"][1]["verdict"], "pass");
        assert_eq!(report["steps"][2]["verdict"], "fail");
        assert_eq!(fd["reference"], "transformers");
    }
}

live_test! {
    fn the_noise_floor_turns_a_failure_within_reference_disagreement_into_drift() {
        let refs = sabotaged_references();
        let refs = refs.to_str().unwrap();
        let env = [("LOCKSTEP_REFERENCES", refs), ("LOCKSTEP_TEST_SABOTAGE", "perturb-f32")];
        // Against the (perturbed, 3%) f32 reference alone: over the fail bound.
        let (code, out, _, report) = run_json("tiny", "--chat", "hello", 4, &env);
        assert_eq!(code, 1, "{out}");
        assert_eq!(report["first_divergence"]["site"], "layers.1.mlp_up");
        // With an f64 reference in the run, the two references disagree by the same 3% at that
        // site: the engine's error is within the measured floor, so it is drift, not failure.
        let dir = tmp("floor");
        let json = dir.join("r.json");
        let (code, out, err) = run(
            lockstep()
                .args(["run", "--model", "tiny", "--reference", "transformers,transformers:f64", "--chat", "hello", "--steps", "4", "--json"])
                .arg(&json)
                .envs(env),
        );
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let site = report["steps"][2]["references"][0]["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["site"] == "layers.1.mlp_up")
            .unwrap()
            .clone();
        assert_eq!(site["verdict"], "drift", "{site}");
        let rel = site["metrics"]["rel_l2"].as_f64().unwrap();
        let floor = site["floor"].as_f64().unwrap();
        assert!(rel > 1e-2 && (rel - 0.03).abs() < 1e-3 && (floor - 0.03).abs() < 1e-3, "rel {rel} floor {floor}");
        // Against the f64 reference the same site passes, and the engine is the closer one.
        let f64site = report["steps"][2]["references"][1]["sites"].as_array().unwrap().iter().find(|s| s["site"] == "layers.1.mlp_up").unwrap().clone();
        assert_eq!(f64site["verdict"], "pass");
        assert!(out.contains("verdict: PASS (with drift)"), "{out}");
        assert!(out.contains("reference vs reference (the measured noise floor)"), "{out}");
        assert!(out.contains("which is right?"), "{out}");
    }
}

live_test! {
    fn an_exception_in_the_reference_is_exit_2_with_its_traceback() {
        let refs = sabotaged_references();
        let refs = refs.to_str().unwrap();
        for (mode, what) in [("raise", "RuntimeError: sabotage: the reference failed at step 1"), ("load-raise", "ValueError: sabotage: cannot load")] {
            let (code, out, err) = run(
                lockstep()
                    .args(["run", "--model", "tiny", "--chat", "hello", "--steps", "4"])
                    .env("LOCKSTEP_REFERENCES", refs)
                    .env("LOCKSTEP_TEST_SABOTAGE", mode),
            );
            assert_eq!(code, 2, "{mode}: stdout:\n{out}\nstderr:\n{err}");
            assert!(err.contains("Traceback (most recent call last)"), "{mode}: {err}");
            assert!(err.contains(what), "{mode}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

// --- bad input: exit 2 and a message that says what and where -------------------------------

#[test]
fn nonexistent_model_path() {
    assert_exit_2(&["run", "--model", "/no/such/model.gguf", "--chat", "hi"], &[], &["/no/such/model.gguf", "no such file"]);
    assert_exit_2(&["generate", "--model", "./nope", "--prompt", "hi"], &[], &["./nope", "no such file"]);
}

#[test]
fn unknown_model_alias() {
    assert_exit_2(&["run", "--model", "llama-70b", "--chat", "hi"], &[], &["llama-70b", "smollm2, qwen2.5, tiny, tiny-gguf"]);
}

#[test]
fn truncated_gguf() {
    let dir = tmp("trunc");
    let bytes = std::fs::read(repo().join("snapshots/models/tiny-llama.gguf")).unwrap();
    for cut in [200usize, bytes.len() * 2 / 3] {
        let p = dir.join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let ps = p.to_str().unwrap();
        assert_exit_2(&["run", "--model", ps, "--chat", "hi"], &[], &[ps, "GGUF"]);
        assert_exit_2(&["generate", "--model", ps, "--chat", "hi"], &[], &[ps]);
    }
}

#[test]
fn config_with_a_missing_field() {
    let dir = tmp("badcfg");
    for e in std::fs::read_dir(repo().join("snapshots/models/tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg_path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let d = dir.to_str().unwrap();
    assert_exit_2(&["run", "--model", d, "--chat", "hi"], &[], &["config.json", "num_hidden_layers"]);
}

#[test]
fn unknown_reference_name() {
    assert_exit_2(&["run", "--model", "tiny", "--reference", "vllm", "--chat", "hi"], &[], &["unknown reference `vllm`", "transformers"]);
}

#[test]
fn missing_reference_environment() {
    let missing = tmp("no-venv").join("venv");
    let m = missing.to_str().unwrap();
    assert_exit_2(&["run", "--model", "tiny", "--chat", "hi"], &[("LOCKSTEP_VENV", m)], &[m, "make setup"]);
    assert_exit_2(&["run", "--model", "smollm2", "--chat", "hi"], &[("LOCKSTEP_VENV", m)], &["smollm2", "make setup"]);
}

live_test! {
    fn missing_python_package_names_the_fix() {
        // A venv-shaped directory whose Python lacks torch/transformers.
        let dir = tmp("bare-venv");
        let bare = dir.join("venv");
        let base = Command::new(venv().join("bin/python"))
            .args(["-c", "import sys; print(sys.base_prefix)"])
            .output()
            .unwrap();
        let base = String::from_utf8(base.stdout).unwrap().trim().to_string();
        let status = Command::new(Path::new(&base).join("bin/python3.11"))
            .args(["-m", "venv", "--without-pip"])
            .arg(&bare)
            .status()
            .unwrap();
        assert!(status.success());
        let v = bare.to_str().unwrap();
        assert_exit_2(&["run", "--model", "tiny", "--chat", "hi"], &[("LOCKSTEP_VENV", v)], &["No module named", "make setup"]);
    }
}

#[test]
fn zero_steps_and_missing_prompt_are_usage_errors() {
    assert_exit_2(&["run", "--model", "tiny", "--chat", "hi", "--steps", "0"], &[], &["--steps"]);
    assert_exit_2(&["run", "--model", "tiny"], &[], &["--prompt", "--chat"]);
}

/// `make test` sets LOCKSTEP_REQUIRE_LIVE=1 after creating the reference environment: there
/// the live tests above must have been built to run, not as ignored.
#[test]
fn live_tests_run_where_make_test_requires_them() {
    if std::env::var("LOCKSTEP_REQUIRE_LIVE").as_deref() == Ok("1") {
        assert!(
            cfg!(lockstep_live),
            "LOCKSTEP_REQUIRE_LIVE=1 but the live-reference tests were built as ignored: no reference environment at {} \
             when the harness was built (build.rs); run `make setup`",
            venv_path().display()
        );
    }
}
