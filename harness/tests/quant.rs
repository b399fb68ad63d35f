//! Quantized weights end to end: `quant-check` against the `gguf` package's dequantizer,
//! every quantized fixture in both weight modes against transformers and llama.cpp,
//! SmolLM2 Q4_1 against llama.cpp and transformers, and corrupted files.
//!
//! Most need the reference environment (`make test` creates it); where it did not exist
//! when the harness was built they are listed as ignored with the command that enables
//! them (build.rs), never passed silently. The tests of corrupted files that fail before
//! any Python always run.

use serde_json::Value;

mod common;
use common::*;

/// (alias, file, quant type the bounds are chosen by)
const QUANT_FIXTURES: &[(&str, &str, &str)] = &[
    ("tiny-q4_0", "tiny-llama.Q4_0.gguf", "Q4_0"),
    ("tiny-q4_1", "tiny-llama.Q4_1.gguf", "Q4_1"),
    ("tiny-q8_0", "tiny-llama.Q8_0.gguf", "Q8_0"),
    ("tiny-k-q4_k_m", "tiny-llama-k.Q4_K_M.gguf", "Q4K"),
    ("tiny-k-q6_k", "tiny-llama-k.Q6_K.gguf", "Q6K"),
];

fn quant_check(model: &str) -> (i32, String, Value) {
    let json = tmp(&format!("qc-{model}")).join("qc.json");
    let (code, out, err) = run(lockstep().args(["quant-check", model, "--json"]).arg(&json));
    let v = std::fs::read_to_string(&json).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(Value::Null);
    (code, format!("{out}{err}"), v)
}

live_test! {
    fn quant_check_smollm2_and_every_fixture_equal_the_gguf_dequantizer() {
        let mut models = vec!["smollm2", "tiny-gguf"];
        models.extend(QUANT_FIXTURES.iter().map(|f| f.0));
        for m in models {
            let (code, out, v) = quant_check(m);
            assert_eq!(code, 0, "{m}:\n{out}");
            let tensors = v["tensors"].as_array().unwrap();
            assert!(!tensors.is_empty());
            for t in tensors {
                assert_eq!(t["status"], "equal", "{m}: {t}");
                assert_eq!(t["max_abs_diff"], 0.0, "{m}: {t}");
            }
            assert!(out.contains(&format!("{} equal to the reference dequantizer, 0 differ, 0 corrupt", tensors.len())), "{out}");
        }
        // SmolLM2: 210 Q4_1 matrices and the Q8_0 embedding, each checked on both engine paths.
        let (_, out, v) = quant_check("smollm2");
        assert!(out.contains("272 tensors (1 Q8_0, 61 F32, 210 Q4_1)"), "{out}");
        let q41 = v["tensors"].as_array().unwrap().iter().filter(|t| t["ggml_type"] == "Q4_1" && t["kernel_blocks_checked"] == true);
        assert_eq!(q41.count(), 210);
    }
}

live_test! {
    fn the_fixtures_hold_the_types_they_are_named_for() {
        for (alias, _, qtype) in QUANT_FIXTURES {
            let (_, out, v) = quant_check(alias);
            let n = v["tensors"].as_array().unwrap().iter().filter(|t| t["ggml_type"] == *qtype).count();
            assert!(n >= 2, "{alias}: only {n} {qtype} tensors:\n{out}");
        }
    }
}

/// One lockstep run of a quantized fixture against transformers and llama.cpp.
fn quant_run(model: &str, weights: &str, steps: usize) -> (i32, String, Value) {
    let json = tmp(&format!("qrun-{model}-{weights}")).join("r.json");
    let (code, out, err) = run(lockstep()
        .args(["run", "--model", model, "--weights", weights, "--reference", "transformers,llamacpp"])
        .args(["--chat", "What is the capital of France?", "--steps", &steps.to_string(), "--json"])
        .arg(&json));
    let v = std::fs::read_to_string(&json).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(Value::Null);
    (code, format!("stdout:\n{out}\nstderr:\n{err}"), v)
}

live_test! {
    fn every_quant_fixture_passes_in_both_modes_against_both_references() {
        for (alias, _, qtype) in QUANT_FIXTURES {
            for (weights, modes) in [("quantized", ["quant-vs-dense", "same-quant"]), ("dequant", ["same-weights", "quant-vs-dense"])] {
                let (code, out, r) = quant_run(alias, weights, 8);
                assert_eq!(code, 0, "{alias} --weights {weights}:\n{out}");
                assert_eq!(r["verdict"], "pass", "{alias} {weights}");
                assert_eq!(r["engine"]["weights_mode"], weights);
                let refs = r["summary"]["references"].as_array().unwrap();
                for (rs, mode) in refs.iter().zip(modes) {
                    assert_eq!(rs["mode"], mode, "{alias} {weights}: {}", rs["reference"]);
                    let mean_kl = rs["mean_kl"].as_f64().unwrap();
                    if mode != "same-weights" {
                        assert_eq!(rs["quant_bounds"]["quant_type"], *qtype, "{alias}: bounds chosen by the file's type");
                    }
                    if mode == "quant-vs-dense" {
                        assert!(mean_kl > 0.0, "{alias}: quantized activations must show");
                    } else if mode == "same-quant" && ["Q4_0", "Q4_1", "Q8_0"].contains(qtype) {
                        // The engine's own kernels do ggml's arithmetic: measured exact on the fixtures.
                        assert!(mean_kl < 1e-9, "{alias}: engine vs llama.cpp mean KL {mean_kl}");
                    } else if mode == "same-weights" {
                        assert!(rs["mean_kl"].as_f64().unwrap() < 1e-6, "{alias}: dense vs f32 transformers is exact");
                    }
                }
                if weights == "quantized" {
                    // Same quantization as llama.cpp: layer 0 holds to the f32 bounds.
                    let l0 = r["steps"][0]["references"][1]["sites"].as_array().unwrap().iter()
                        .find(|s| s["site"] == "layers.0.q").unwrap().clone();
                    assert!(l0["metrics"]["rel_l2"].as_f64().unwrap() < 1e-4, "{alias}: layer 0 q vs llama.cpp {l0}");
                    assert!(out.contains("quantized modes are judged on the next token"), "{out}");
                }
            }
        }
    }
}

live_test! {
    fn tiny_qwen2_q8_0_in_both_modes() {
        // Biases stay F32 beside the Q8_0 matrices. Quantized: llama.cpp's arithmetic, logits
        // bit-identical (measured); dequantized: transformers' dense weights, ~1e-6.
        let (code, out, r) = quant_run("tiny-qwen2-q8_0", "quantized", 8);
        assert_eq!(code, 0, "{out}");
        let ll = &r["summary"]["references"].as_array().unwrap()[1];
        assert_eq!((ll["reference"].as_str(), ll["mode"].as_str(), ll["verdict"].as_str()), (Some("llamacpp"), Some("same-quant"), Some("pass")), "{out}");
        assert!(ll["max_kl"].as_f64().unwrap() < 1e-9, "{out}");
        let g = r["generate"].as_array().unwrap().iter().find(|g| g["reference"] == "llamacpp").unwrap();
        assert_eq!(g["matches"], true, "{out}");
        let (code, out, r) = quant_run("tiny-qwen2-q8_0", "dequant", 8);
        assert_eq!(code, 0, "{out}");
        let tf = &r["summary"]["references"].as_array().unwrap()[0];
        assert_eq!((tf["mode"].as_str(), tf["verdict"].as_str()), (Some("same-weights"), Some("pass")), "{out}");
        let worst = tf["worst_rel_l2"].as_array().unwrap().iter().map(|w| w["rel_l2"].as_f64().unwrap()).fold(0.0, f64::max);
        assert!(worst < 1e-5, "dequantized vs transformers: rel-L2 {worst}\n{out}");
    }
}

live_test! {
    fn smollm2_quantized_against_llamacpp_and_transformers_64_steps() {
        let (code, out, r) = quant_run("smollm2", "quantized", 64);
        assert_eq!(code, 0, "{out}");
        assert_eq!(r["verdict"], "pass");
        assert_eq!(r["engine"]["matrix_types"], serde_json::json!(["Q4_1", "Q8_0"]));
        let refs = r["summary"]["references"].as_array().unwrap();
        assert_eq!(refs[1]["reference"], "llamacpp");
        assert_eq!(refs[1]["mode"], "same-quant");
        assert_eq!(refs[0]["mode"], "quant-vs-dense");
        // The same greedy tokens as llama.cpp's own generate on the same file, or a first
        // difference the harness judges a near-tie (drift): llama.cpp's AVX2 and AVX-512 kernels
        // round differently, and on an AVX2-only CPU its own loop takes the other branch of a
        // near-tie at token 15 of 64 (measured 2026-12-02; the AVX-512 build matched all 64).
        let g = r["generate"].as_array().unwrap().iter().find(|g| g["reference"] == "llamacpp").unwrap();
        assert!(g["matches"] == true || g["verdict"] == "drift", "{g}\n{out}");
        // KL, top-1 agreement and Δp are printed for both.
        for needle in ["mean KL", "top1 =", "max|Δp|", "same-quant", "quant-vs-dense", "Q4_1 bounds"] {
            assert!(out.contains(needle), "{needle} missing:\n{out}");
        }
        // Layers 0 of the engine and llama.cpp are the same arithmetic: bitwise-level agreement.
        let l0 = r["steps"][0]["references"][1]["sites"].as_array().unwrap().iter()
            .filter(|s| s["layer"] == 0 && ["q", "k", "v", "mlp_gate", "mlp_up"].contains(&s["site"].as_str().unwrap().rsplit('.').next().unwrap()))
            .map(|s| s["metrics"]["rel_l2"].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert!(l0 < 1e-6, "layer-0 matmuls vs llama.cpp: rel-L2 {l0}");
    }
}

// --- corrupted files ---------------------------------------------------------------------------

/// Byte offset of tensor `name`'s data in a GGUF file.
fn tensor_offset(path: &std::path::Path, name: &str) -> usize {
    let g = lockstep_engine::weights::GgufFile::open(path).unwrap();
    (g.content.tensor_data_offset + g.content.tensor_infos[name].offset) as usize
}

live_test! {
    fn a_block_with_an_infinite_scale_is_exit_2_naming_the_tensor() {
        let src = repo().join("snapshots/models/tiny-llama.Q4_1.gguf");
        let mut bytes = std::fs::read(&src).unwrap();
        let name = "blk.1.ffn_up.weight";
        // Block 3 of the tensor: Q4_1 blocks are 20 bytes, the f16 scale first.
        let at = tensor_offset(&src, name) + 3 * 20;
        bytes[at..at + 2].copy_from_slice(&0x7C00u16.to_le_bytes()); // +inf
        let p = tmp("badscale").join("bad-scale.gguf");
        std::fs::write(&p, &bytes).unwrap();
        let ps = p.to_str().unwrap();
        assert_exit_2(&["run", "--model", ps, "--chat", "hi"], &[], &[name, "block 3", "non-finite", "corrupted"]);
        assert_exit_2(&["generate", "--model", ps, "--weights", "dequant", "--chat", "hi"], &[], &[name, "non-finite"]);
        let (code, out, _) = quant_check(ps);
        assert_eq!(code, 2, "{out}");
        assert!(out.contains("CORRUPT: block 3"), "{out}");
        assert!(out.contains(&format!("1 corrupt tensor(s): {name}")), "{out}");
    }
}

#[test]
fn truncated_tensor_data_is_exit_2_naming_the_tensor() {
    let src = repo().join("snapshots/models/tiny-llama.Q8_0.gguf");
    let bytes = std::fs::read(&src).unwrap();
    // Cut inside the last tensor of the file: only it is incomplete.
    let g = lockstep_engine::weights::GgufFile::open(&src).unwrap();
    let name = g.content.tensor_infos.iter().max_by_key(|(_, i)| i.offset).map(|(n, _)| n.clone()).unwrap();
    let name = name.as_str();
    let cut = tensor_offset(&src, name) + 10;
    assert!(cut < bytes.len());
    let p = tmp("truncdata").join("trunc.gguf");
    std::fs::write(&p, &bytes[..cut]).unwrap();
    let ps = p.to_str().unwrap();
    assert_exit_2(&["run", "--model", ps, "--chat", "hi"], &[], &[name, "only"]);
    let (code, out, _) = quant_check(ps);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(name), "{out}");
}

#[test]
fn quantized_weights_need_a_gguf_and_f32() {
    assert_exit_2(&["run", "--model", "tiny", "--weights", "quantized", "--chat", "hi"], &[], &["--weights quantized needs a GGUF"]);
    assert_exit_2(&["generate", "--model", "tiny-q4_1", "--weights", "quantized", "--f64", "--chat", "hi"], &[], &["computes in f32"]);
}

live_test! {
    /// The noise floor comes from references of the comparison's own arithmetic class (issue
    /// 39, item 1). The dequantized engine against transformers (same weights) and llama.cpp
    /// (8-bit activations) on tiny-q8_0: the transformers-vs-llama.cpp distance (2.4e-2) once
    /// excused a wrong RMSNorm epsilon against transformers as drift (1.7e-2 at the worst site);
    /// it fails now, and the clean engine still passes both.
    fn a_floor_from_another_arithmetic_class_excuses_nothing() {
        let args = ["run", "--model", "tiny-q8_0", "--weights", "dequant", "--reference", "transformers,llamacpp", "--chat", "What is the capital of France?", "--steps", "4", "--json"];
        let verdicts = |inject: Option<&str>| -> (i32, Vec<(String, String)>) {
            let json = tmp(&format!("floor-class-{}", inject.unwrap_or("clean"))).join("r.json");
            let mut c = lockstep();
            c.args(args).arg(&json);
            if let Some(f) = inject {
                c.args(["--inject", f]);
            }
            let (code, out, err) = run(&mut c);
            let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default()).unwrap_or(Value::Null);
            let refs = r["summary"]["references"].as_array().unwrap_or_else(|| panic!("{out}{err}"));
            (code, refs.iter().map(|s| (s["reference"].as_str().unwrap().to_string(), s["verdict"].as_str().unwrap().to_string())).collect())
        };
        let (code, clean) = verdicts(None);
        assert_eq!(code, 0, "{clean:?}");
        assert!(clean.iter().all(|(_, v)| v == "pass"), "{clean:?}");
        let (code, eps) = verdicts(Some("rms-eps"));
        assert_eq!(code, 1, "{eps:?}");
        assert_eq!(eps[0], ("transformers".to_string(), "fail".to_string()), "{eps:?}");
    }
}
