//! LoRA adapters (issue 5): both adapter formats against both references in both engine
//! modes on the tiny fixture, the "adapter has no effect" verdict, inventory problems named,
//! bad adapters refused (exit 2), `inspect`, and merged vs unmerged agreement in the engine.
//!
//! The live tests need the reference environment (`make test` creates it); where it did not
//! exist when the harness was built they are listed as ignored (build.rs), never passed
//! silently. The others need no Python.

use std::path::PathBuf;

use lockstep::compare::tolerance::{LORA_MODES_LOGITS_REL_L2_F32, LORA_MODES_LOGITS_REL_L2_QUANTIZED};
use lockstep_engine::{load, LoadOptions, LoraMode, LoraOptions, WeightsMode};
use serde_json::Value;

mod common;
use common::*;

fn adapter(name: &str) -> PathBuf {
    repo().join("snapshots/adapters").join(name)
}

/// `lockstep run` with an adapter; returns (exit code, stdout, the JSON report).
fn run_lora(model: &str, lora: &std::path::Path, mode: &str, reference: &str) -> (i32, String, Value) {
    let json = tmp(&format!("lora-{model}-{}-{mode}-{}", lora.file_name().unwrap().to_string_lossy(), reference.replace(',', "_")))
        .join("r.json");
    let (code, out, err) = run(lockstep()
        .args(["run", "--model", model, "--reference", reference, "--chat", "Hi", "--steps", "4", "--lora-mode", mode])
        .arg("--lora")
        .arg(lora)
        .arg("--json")
        .arg(&json));
    assert!(code == 0 || code == 1, "{model} {lora:?} {mode}: exit {code}\n{out}\n{err}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (code, out, v)
}

live_test! {
    fn both_formats_pass_against_both_references_merged_and_unmerged() {
        // (model, adapter, modules attached): PEFT on layers 0 and 2, all seven projections;
        // mlx-lm on the last two layers, q/k/v and down_proj; also on a quantized GGUF (the
        // engine's quantized kernels, B's Q/K rows in GGUF order, MLX's quantized layers).
        for (model, name, modules) in
            [("tiny", "tiny-peft", 14), ("tiny", "tiny-mlx", 8), ("tiny-q4_1", "tiny-mlx", 8), ("tiny-gguf", "tiny-peft", 14)]
        {
            for mode in ["unmerged", "merged"] {
                let (code, out, v) = run_lora(model, &adapter(name), mode, "transformers,mlx");
                assert_eq!(code, 0, "{model} {name} {mode}:\n{out}");
                assert_eq!(v["verdict"], "pass", "{model} {name} {mode}");
                let l = &v["lora"];
                assert_eq!(l["mode"], mode);
                assert_eq!(l["diffs"].as_array().unwrap().len(), 0, "{out}");
                let sides = l["sides"].as_array().unwrap();
                assert_eq!(sides.len(), 3, "engine, transformers, mlx");
                for s in sides {
                    assert_eq!(s["entries"].as_array().unwrap().len(), modules, "{}: {out}", s["side"]);
                }
                let e = &l["effect"];
                assert_eq!(e["has_effect"], true, "{out}");
                assert!(e["logits_rel_l2"].as_f64().unwrap() > 10.0 * e["floor"].as_f64().unwrap(), "{out}");
                assert!(out.contains("inventory  identical on every side"), "{out}");
                assert!(out.contains("effect     the adapter has an effect"), "{out}");
            }
        }
    }
}

live_test! {
    fn an_adapter_with_zero_b_has_no_effect() {
        for mode in ["unmerged", "merged"] {
            let (code, out, v) = run_lora("tiny", &adapter("tiny-zero-b"), mode, "transformers,mlx");
            assert_eq!(code, 1, "{out}");
            assert_eq!(v["verdict"], "diverged");
            assert_eq!(v["first_divergence"]["site"], "lora");
            assert!(v["first_divergence"]["detail"].as_str().unwrap().starts_with("adapter has no effect"), "{}", v["first_divergence"]);
            assert!(out.contains("ADAPTER HAS NO EFFECT"), "{out}");
            assert!(out.contains("verdict: DIVERGED at step 0, site `lora`"), "{out}");
            // Where an effect was expected: every layer (q_proj/v_proj on all three).
            assert!(out.contains("layer 0 (q/v) 0.0e0, layer 1 (q/v) 0.0e0, layer 2 (q/v) 0.0e0"), "{out}");
            assert_eq!(v["lora"]["effect"]["logits_rel_l2"].as_f64(), Some(0.0));
        }
    }
}

live_test! {
    fn tensors_attached_to_nothing_are_named() {
        // The mlx-lm adapter covers layers 1 and 2; a config that says "the last layer only"
        // leaves layer 1's tensors attached to nothing.
        let d = tmp("lora-unattached");
        std::fs::copy(adapter("tiny-mlx").join("adapters.safetensors"), d.join("adapters.safetensors")).unwrap();
        let cfg = std::fs::read_to_string(adapter("tiny-mlx").join("adapter_config.json")).unwrap();
        std::fs::write(d.join("adapter_config.json"), cfg.replace("\"num_layers\": 2", "\"num_layers\": 1")).unwrap();
        let (code, out, v) = run_lora("tiny", &d, "unmerged", "transformers");
        assert_eq!(code, 1, "{out}");
        let un: Vec<&str> = v["lora"]["unattached"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        assert_eq!(un.len(), 8, "{un:?}");
        assert!(un.contains(&"model.layers.1.self_attn.q_proj.lora_a"), "{un:?}");
        assert!(out.contains("attached to nothing: model.layers.1.mlp.down_proj.lora_a"), "{out}");
        assert_eq!(v["first_divergence"]["site"], "lora");
    }
}

#[test]
fn target_modules_that_match_nothing_are_exit_2_naming_them() {
    let d = tmp("lora-bad-targets");
    std::fs::copy(adapter("tiny-peft").join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(adapter("tiny-peft").join("adapter_config.json")).unwrap();
    std::fs::write(d.join("adapter_config.json"), cfg.replace("\"q_proj\"", "\"query\"").replace("\"up_proj\"", "\"w3\"")).unwrap();
    let ds = d.to_str().unwrap();
    assert_exit_2(
        &["run", "--model", "tiny", "--chat", "hi", "--lora", ds],
        &[],
        &["adapter_config.json", "target module(s) `query`, `w3` match no projection", "q_proj, k_proj"],
    );
    assert_exit_2(&["generate", "--model", "tiny", "--chat", "hi", "--lora", ds], &[], &["`query`, `w3`"]);
}

#[test]
fn bad_adapters_are_exit_2_with_the_file_and_the_problem() {
    // No such directory; no config; no weights; a shape that does not fit the model.
    assert_exit_2(&["run", "--model", "tiny", "--chat", "hi", "--lora", "/nonexistent/adapter"], &[], &["/nonexistent/adapter", "no such adapter directory"]);
    let d = tmp("lora-no-config");
    std::fs::copy(adapter("tiny-peft").join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
    assert_exit_2(&["generate", "--model", "tiny", "--chat", "hi", "--lora", d.to_str().unwrap()], &[], &["adapter_config.json", "missing"]);
    let d = tmp("lora-no-weights");
    std::fs::copy(adapter("tiny-peft").join("adapter_config.json"), d.join("adapter_config.json")).unwrap();
    assert_exit_2(&["generate", "--model", "tiny", "--chat", "hi", "--lora", d.to_str().unwrap()], &[], &["no adapter weights", "adapters.safetensors"]);
    // A reference that cannot take the adapter.
    assert_exit_2(
        &["run", "--model", "tiny", "--chat", "hi", "--reference", "llamacpp", "--lora", adapter("tiny-peft").to_str().unwrap()],
        &[],
        &["--lora: the llamacpp reference cannot load"],
    );
    // The tiny adapter (hidden 64) on the 256-wide, 2-layer tiny-k model: mlx-lm shapes
    // (in, r) in the message, as the file holds them.
    assert_exit_2(
        &["generate", "--model", "tiny-k-q4_k_m", "--chat", "hi", "--lora", adapter("tiny-mlx").to_str().unwrap()],
        &[],
        &["adapters.safetensors", "model.layers.1.self_attn.q_proj.lora_a", "[64, 4]", "[256, 4]"],
    );
    assert_exit_2(
        &["generate", "--model", "tiny-k-q4_k_m", "--chat", "hi", "--lora", adapter("tiny-peft").to_str().unwrap()],
        &[],
        &["adapter_config.json", "`layers_to_transform` names layer 2, the model has 2 layers"],
    );
}

#[test]
fn generate_with_an_adapter_changes_the_text_and_both_modes_agree() {
    let gen = |extra: &[&str]| {
        let (code, out, err) = run(lockstep().args(["generate", "--model", "tiny", "--chat", "Hi", "-n", "12"]).args(extra));
        assert_eq!(code, 0, "{err}");
        out
    };
    let base = gen(&[]);
    let lora = adapter("tiny-peft");
    let un = gen(&["--lora", lora.to_str().unwrap()]);
    let merged = gen(&["--lora", lora.to_str().unwrap(), "--lora-mode", "merged"]);
    assert_ne!(base, un, "the adapter changes the greedy text");
    assert_eq!(un, merged);
}

/// rel-L2 of two logits tensors.
fn rel(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let n: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    n / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn merged_and_unmerged_agree_within_the_named_tolerance() {
    // (model, weights, adapter, bound): f32 weights, then quantized ones (merged dequantizes
    // the adapted matrices, so their activations are no longer rounded to 8 bits).
    let cases = [
        ("tiny-llama", None, "tiny-peft", LORA_MODES_LOGITS_REL_L2_F32),
        ("tiny-llama", None, "tiny-mlx", LORA_MODES_LOGITS_REL_L2_F32),
        ("tiny-llama.gguf", Some(WeightsMode::Dequant), "tiny-peft", LORA_MODES_LOGITS_REL_L2_F32),
        ("tiny-llama.Q4_1.gguf", Some(WeightsMode::Quantized), "tiny-mlx", LORA_MODES_LOGITS_REL_L2_QUANTIZED),
        ("tiny-llama.Q8_0.gguf", Some(WeightsMode::Quantized), "tiny-peft", LORA_MODES_LOGITS_REL_L2_QUANTIZED),
    ];
    let tokens: Vec<u32> = (1..40).map(|i| (i * 37 % 500) as u32).collect();
    let mut cases: Vec<(PathBuf, Option<WeightsMode>, &str, f64)> =
        cases.iter().map(|(f, w, n, b)| (repo().join("snapshots/models").join(f), *w, *n, *b)).collect();
    // SmolLM2 (30 layers, Q4_1) where the reference environment has it.
    if let Ok(p) = lockstep::models::resolve("smollm2") {
        cases.push((p, Some(WeightsMode::Quantized), "smollm2-mlx", LORA_MODES_LOGITS_REL_L2_QUANTIZED));
    }
    for (path, weights, name, bound) in cases {
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let logits = |lora: Option<LoraMode>| {
            let opts = LoadOptions { weights, lora: lora.map(|mode| LoraOptions { dir: adapter(name), mode }), ..Default::default() };
            let m = load(&path, &opts).unwrap();
            let mut cache = m.model.new_cache();
            m.model.forward(&tokens, &mut cache, None).unwrap()
        };
        let (base, un, merged) = (logits(None), logits(Some(LoraMode::Unmerged)), logits(Some(LoraMode::Merged)));
        let (modes, effect) = (rel(&merged, &un), rel(&un, &base));
        println!("{file} + {name}: merged vs unmerged logits rel-L2 {modes:.2e} (bound {bound:.0e}); adapter effect {effect:.2e}");
        assert!(modes <= bound, "{file} + {name}: {modes:.3e} > {bound:.0e}");
        // The tiny adapters are strong; SmolLM2's is mild (its effect on these arbitrary
        // tokens is about the size of the quantized modes' difference): not compared there.
        assert!(name == "smollm2-mlx" || effect > 2.0 * modes, "{file} + {name}: the effect {effect:.3e} must dwarf the modes' difference {modes:.3e}");
    }
}

live_test! {
    fn inspect_prints_both_inventories_and_the_effective_config() {
        let (code, out, err) = run(lockstep()
            .args(["inspect", "--model", "tiny-q4_1", "--reference", "transformers,mlx", "--lora"])
            .arg(adapter("tiny-mlx")));
        assert_eq!(code, 0, "{out}\n{err}");
        for needle in [
            "mlx-lm format, F32 tensors): rank 4, scale 2 (lora_parameters.scale = 2), targets q_proj,k_proj,v_proj,down_proj, layers 1,2",
            "inventory  engine       8 modules, 16 LoRA tensors",
            "inventory  transformers 8 modules",
            "inventory  mlx          8 modules, 16 LoRA tensors, 4352 parameters (float32); mlx_lm.tuner.utils.load_adapters",
            "layers.2.down_proj",
            "inventory  identical on every side",
        ] {
            assert!(out.contains(needle), "{needle:?} missing:\n{out}");
        }
        assert!(!out.contains("effect "), "inspect runs nothing:\n{out}");
    }
}

live_test! {
    fn smollm2_with_its_mlx_adapter_passes_with_a_real_effect() {
        // The must-show: the committed mlx-lm adapter (rank 8, scale 20, q/v, last 16
        // layers) on SmolLM2 Q4_1, against transformers (peft) and MLX (mlx-lm), 16 steps.
        let json = tmp("lora-smollm2").join("r.json");
        let (code, out, err) = run(lockstep()
            .args(["run", "--model", "smollm2", "--reference", "transformers,mlx", "--steps", "16", "--chat", "What is the capital of France?", "--lora"])
            .arg(adapter("smollm2-mlx"))
            .arg("--json")
            .arg(&json));
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("verdict: PASS"), "{out}");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let l = &v["lora"];
        assert_eq!(l["diffs"].as_array().unwrap().len(), 0);
        for s in l["sides"].as_array().unwrap() {
            assert_eq!(s["entries"].as_array().unwrap().len(), 32, "q_proj and v_proj of 16 layers on {}", s["side"]);
        }
        let e = &l["effect"];
        assert_eq!(e["has_effect"], true);
        // A real effect: thousands of times the transformers-vs-MLX floor, and next tokens change.
        assert!(e["logits_rel_l2"].as_f64().unwrap() > 1000.0 * e["floor"].as_f64().unwrap(), "{out}");
        assert!(e["top1_changed"].as_u64().unwrap() >= 1, "{out}");
        // No effect before layer 14 (the adapter covers layers 14..=29).
        let per = e["per_layer"].as_array().unwrap();
        assert!(per[..14].iter().all(|l| l["rel_l2"].as_f64() == Some(0.0)));
        assert!(per[14..].iter().all(|l| l["rel_l2"].as_f64().unwrap() > 0.0));
    }
}

live_test! {
    fn the_lora_faults_are_caught_by_run_and_diagnosed_by_bisect() {
        let lora = adapter("tiny-peft");
        for mode in ["unmerged", "merged"] {
            // A stub adapter manager: the run's effect check says so, whatever else diverges.
            let (code, out, err) = run(lockstep()
                .args(["run", "--model", "tiny", "--reference", "transformers", "--chat", "Hi", "--steps", "3", "--lora-mode", mode])
                .args(["--inject", "lora-not-attached", "--lora"])
                .arg(&lora));
            assert_eq!(code, 1, "{out}\n{err}");
            assert!(out.contains("ADAPTER HAS NO EFFECT"), "{out}");
            assert!(out.contains("verdict: DIVERGED at step 0, site `lora`: adapter has no effect"), "{out}");
            // The scale applied twice: the adapter has an effect, the wrong one, from layer 0's q.
            let (code, out, _) = run(lockstep()
                .args(["run", "--model", "tiny", "--reference", "transformers", "--chat", "Hi", "--steps", "3", "--lora-mode", mode])
                .args(["--inject", "lora-scale", "--lora"])
                .arg(&lora));
            assert_eq!(code, 1, "{out}");
            assert!(out.contains("verdict: DIVERGED at step 0, layer 0, site `layers.0.q`"), "{out}");
            assert!(out.contains("effect     the adapter has an effect"), "{out}");
        }
        for (fault, diagnosis, says) in [
            ("lora-not-attached", "[adapter-not-attached]", "the engine applies scale 0.0000 where the reference applies 2: no adapter at all"),
            ("lora-scale", "[adapter-scale]", "the engine applies scale 4.0000 where the reference applies 2"),
        ] {
            let (code, out, err) = run(lockstep()
                .args(["bisect", "--model", "tiny", "--reference", "transformers", "--chat", "What is the capital of France?"])
                .args(["--steps", "3", "--inject", fault, "--lora"])
                .arg(&lora));
            assert_eq!(code, 1, "{out}\n{err}");
            assert!(out.contains("first failing site    layers.0.q, layer 0"), "{fault}:\n{out}");
            assert!(out.contains(diagnosis) && out.contains(says), "{fault}:\n{out}");
        }
    }
}
