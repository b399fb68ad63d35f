//! The bundled engine as a reference (`--reference engine`): the engine under test and a
//! reference are two roles of one kind of thing. These runs need no Python (the reference
//! environment is pointed at nothing to prove it).

use serde_json::Value;

mod common;
use common::*;

fn run_json(args: &[&str], name: &str) -> (i32, Value, String) {
    let dir = tmp(name);
    let json = dir.join("r.json");
    let (code, out, err) = run(lockstep().env("LOCKSTEP_VENV", "/nonexistent").args(args).arg("--json").arg(&json));
    let v = std::fs::read_to_string(&json).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(Value::Null);
    (code, v, format!("{out}\n{err}"))
}

#[test]
fn a_clean_engine_matches_itself_exactly_at_every_site() {
    let args = ["run", "--model", "tiny", "--reference", "engine", "--chat", "What is the capital of France?", "--steps", "4"];
    let (code, r, out) = run_json(&args, "engine-self");
    assert_eq!(code, 0, "{out}");
    for st in r["steps"].as_array().unwrap() {
        for s in st["references"][0]["sites"].as_array().unwrap() {
            assert_eq!(s["metrics"]["rel_l2"].as_f64(), Some(0.0), "{}", s["site"]);
        }
    }
    assert_eq!(r["generate"][0]["matches"], true, "{out}");
}

#[test]
fn a_faulted_engine_against_its_clean_self_is_localized_without_python() {
    let args = ["run", "--model", "tiny", "--reference", "engine", "--chat", "What is the capital of France?", "--steps", "3", "--inject", "rope-theta"];
    let (code, r, out) = run_json(&args, "engine-fault");
    assert_eq!(code, 1, "{out}");
    assert_eq!(r["first_divergence"]["site"], "layers.0.q_rope", "{out}");
    let (code, out, err) = run(lockstep().env("LOCKSTEP_VENV", "/nonexistent").args([
        "bisect", "--model", "tiny", "--reference", "engine", "--chat", "What is the capital of France?", "--steps", "4", "--inject", "drop-context",
    ]));
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("[context-dropped]"), "{out}");
}

#[test]
fn an_f64_engine_is_an_oracle_that_needs_no_python() {
    let args = ["run", "--model", "tiny-gguf", "--reference", "engine:f64", "--chat", "What is the capital of France?", "--steps", "3"];
    let (code, r, out) = run_json(&args, "engine-f64");
    assert_eq!(code, 0, "{out}");
    let worst = r["summary"]["references"][0]["worst_rel_l2"].as_array().unwrap();
    // f32 against f64 on the same weights: far below the f32 pass bound, and not zero.
    assert!(worst.iter().all(|w| w["rel_l2"].as_f64().unwrap() < 1e-5), "{worst:?}");
    assert!(worst.iter().any(|w| w["rel_l2"].as_f64().unwrap() > 0.0), "{worst:?}");
}
