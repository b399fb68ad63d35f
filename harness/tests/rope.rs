//! RoPE scaling (issue 34): every type the engine computes passes against the references that
//! implement it on a prompt past the original context; what the engine does not compute is
//! refused by name, in both checkpoint formats; a reference that would ignore a file's scaling
//! refuses it.
//!
//! Fixtures (scripts/make_fixtures.py): `snapshots/models/tiny-llama-rope/TYPE/`, the tiny
//! Llama's weights with one scaling each in config.json (original context 64 positions), and
//! `tiny-llama-rope-llama3.gguf` (llama.cpp's `rope_freqs.weight` for the llama3 variant).

use std::path::{Path, PathBuf};

mod common;
use common::*;
#[path = "common/gguf.rs"]
mod gguf;
use gguf::{Gguf, Val};

/// 93 tokens of the tiny tokenizer: past the variants' original context of 64 positions, and
/// with 32 steps inside the 256 the tiny Llama serves.
const LONG_PROMPT: &str = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire and the rain falls \
                           on the old stone house near the river where children play every summer day until the sun goes down behind the hills";

fn fixture(name: &str) -> PathBuf {
    repo().join("snapshots/models").join(name)
}

/// `lockstep run` of `model` against `references`, 32 steps of the long prompt: (exit code,
/// stdout, stderr, the JSON report).
fn run_long(model: &Path, references: &str, tag: &str) -> (i32, String, String, serde_json::Value) {
    let json = tmp(tag).join("run.json");
    let (code, out, err) = run(lockstep().args([
        "run", "--model", model.to_str().unwrap(), "--reference", references, "--prompt", LONG_PROMPT, "--steps", "32", "--json",
        json.to_str().unwrap(),
    ]));
    let report = std::fs::read_to_string(&json).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    (code, out, err, report)
}

live_test! {
    /// Each type, on its variant of the tiny Llama, passes against transformers and MLX over 32
    /// steps after a 93-token prompt (every step past the original 64 positions): the engine,
    /// transformers' modeling_rope_utils and mlx-lm's rope modules compute the same rotation.
    /// The run says which scaling each side applied.
    fn every_rope_type_passes_against_transformers_and_mlx_past_the_original_context() {
        for (ty, says) in [
            ("linear", "linear x4 on every layer"),
            ("dynamic", "dynamic NTK x4 past 64 positions on every layer"),
            ("yarn", "yarn x4 (original context 64, attention factor 1.1386) on every layer"),
            ("llama3", "llama3 x8 (original context 64) on every layer"),
            ("longrope", "longrope (original context 64, attention factor 1.1547) on every layer"),
        ] {
            let (code, out, err, report) = run_long(&fixture(&format!("tiny-llama-rope/{ty}")), "transformers,mlx", &format!("rope-{ty}"));
            assert_eq!(code, 0, "{ty}: {out}\n{err}");
            assert_eq!(report["verdict"], "pass", "{ty}: {out}");
            assert!(out.contains(&format!("  rope       {says}")), "{ty}: the engine's scaling is not stated:\n{out}");
            assert!(out.contains(&format!("RoPE scaling {ty}, as transformers computes it")), "{ty}: {out}");
            let prompt = report["tokens"]["prompt"]["engine_ids"].as_array().map(|a| a.len()).unwrap_or(0);
            assert!(prompt > 64, "{ty}: the prompt ({prompt} tokens) does not pass the original context");
        }
    }
}

live_test! {
    /// The llama3 variant as llama.cpp stores it (`rope_freqs.weight`): the engine reads the
    /// factors and passes against llama.cpp; transformers' GGUF loader would ignore them, so the
    /// transformers reference refuses the file by name instead of running it unscaled.
    fn a_rope_freqs_gguf_passes_against_llamacpp_and_transformers_refuses_it() {
        let model = fixture("tiny-llama-rope-llama3.gguf");
        let (code, out, err, report) = run_long(&model, "llamacpp", "rope-freqs-llamacpp");
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(report["verdict"], "pass", "{out}");
        assert!(out.contains("  rope       per-frequency factors (8 from rope_freqs.weight) on every layer"), "{out}");
        assert!(out.contains("RoPE per-frequency factors rope_freqs.weight, as llama.cpp applies them"), "{out}");
        let (code, out, err, _) = run_long(&model, "transformers", "rope-freqs-transformers");
        assert_eq!(code, 2, "{out}\n{err}");
        assert!(err.contains("the file scales its RoPE (rope_freqs.weight), which transformers' GGUF loader does not read"), "{err}");
    }
}

live_test! {
    /// `rope-scaling-ignored` (the engine rotates with the unscaled frequencies) is found by
    /// bisect on every type at layer 0's q_rope, named with the scaling the config states, the
    /// evidence being the undone scaling: the engine's q_rope is the reference's q rotated
    /// unscaled. The first position where it matters and the growth are shown.
    fn bisect_names_an_ignored_rope_scaling_of_every_type() {
        for ty in ["linear", "dynamic", "yarn", "llama3", "longrope"] {
            let model = fixture(&format!("tiny-llama-rope/{ty}"));
            let (code, out, err) = run(lockstep().args([
                "bisect", "--model", model.to_str().unwrap(), "--reference", "transformers", "--prompt", LONG_PROMPT, "--steps", "4",
                "--inject", "rope-scaling-ignored",
            ]));
            assert_eq!(code, 1, "{ty}: {out}\n{err}");
            assert!(out.contains("first failing site    layers.0.q_rope, layer 0"), "{ty}: {out}");
            assert!(out.contains("diagnosis: RoPE scaling not applied: the engine rotates unscaled where the config says "), "{ty}: {out}");
            assert!(out.contains("[rope-scaling]"), "{ty}: {out}");
            assert!(out.contains("rotated without the config's RoPE scaling"), "{ty}: {out}");
            assert!(out.contains("the error grows with the position: "), "{ty}: {out}");
        }
        // On an unscaled model the fault would change nothing: refused, not run.
        assert_exit_2(&["run", "--model", "tiny", "--prompt", LONG_PROMPT, "--inject", "rope-scaling-ignored"], &[], &["the model's RoPE is unscaled"]);
    }
}

/// The tiny Llama's GGUF with `edit` applied, written to a temp file.
fn gguf_with(tag: &str, edit: impl FnOnce(&mut Gguf)) -> PathBuf {
    let mut g = Gguf::read(&fixture("tiny-llama.gguf"));
    edit(&mut g);
    let p = tmp(tag).join(format!("{tag}.gguf"));
    g.write(&p);
    p
}

fn s(v: &str) -> Val {
    Val::Str(v.as_bytes().to_vec())
}

live_test! {
    /// GGUF's own scaling keys are read, not dropped: a linear and a YaRN file run scaled and
    /// pass against llama.cpp, which scales them too.
    fn gguf_linear_and_yarn_scaling_pass_against_llamacpp() {
        let linear = gguf_with("rope-gguf-linear", |g| {
            g.set("llama.rope.scaling.type", s("linear"));
            g.set("llama.rope.scaling.factor", Val::F32(4.0));
        });
        let yarn = gguf_with("rope-gguf-yarn", |g| {
            g.set("llama.rope.scaling.type", s("yarn"));
            g.set("llama.rope.scaling.factor", Val::F32(4.0));
            g.set("llama.rope.scaling.original_context_length", Val::U32(64));
        });
        for (model, says) in [(linear, "linear x4 on every layer"), (yarn, "yarn x4 (original context 64, attention factor 1.1386) on every layer")] {
            let (code, out, err, report) = run_long(&model, "llamacpp", "rope-gguf");
            assert_eq!(code, 0, "{says}: {out}\n{err}");
            assert_eq!(report["verdict"], "pass", "{says}: {out}");
            assert!(out.contains(&format!("  rope       {says}")), "{out}");
            assert!(out.contains("from the GGUF metadata, as llama.cpp computes it"), "{out}");
        }
    }
}

/// A configuration the engine does not compute exits 2 naming the key, in every format, before
/// any reference loads.
#[test]
fn rope_settings_the_engine_does_not_compute_are_refused_by_name() {
    let gen = |m: &Path, needles: &[&str]| assert_exit_2(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hi", "-n", "2"], &[], needles);
    // Hugging Face: a type, a key, a per-layer-type RoPE the Llama family has no layers for.
    for (tag, rope, needle) in [
        ("mrope", serde_json::json!({"rope_scaling": {"rope_type": "mrope", "mrope_section": [2, 3, 3]}}), "RoPE type `mrope` is not computed by this engine"),
        ("extra-key", serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}}), "rope_scaling.beta_fast is not read by the engine's `linear` RoPE"),
        ("no-factor", serde_json::json!({"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}}), "needs a factor"),
        ("partial", serde_json::json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor 0.5"),
        (
            "per-layer-type",
            serde_json::json!({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
            "rope_parameters per layer type (full_attention, sliding_attention) is not run by the llama family",
        ),
    ] {
        let d = tmp(&format!("rope-hf-{tag}")).join("m");
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(fixture("tiny-llama")).unwrap().flatten() {
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        for (k, v) in rope.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        gen(&d, &[needle, "config.json"]);
    }
    // GGUF: a scaling type and a key the engine does not compute.
    let su = gguf_with("rope-gguf-su", |g| {
        g.set("llama.rope.scaling.type", s("longrope"));
        g.set("llama.rope.scaling.factor", Val::F32(4.0));
    });
    gen(&su, &["llama.rope.scaling.type `longrope` is not computed by this engine for GGUF files"]);
    let key = gguf_with("rope-gguf-key", |g| {
        g.set("llama.rope.scaling.type", s("yarn"));
        g.set("llama.rope.scaling.factor", Val::F32(4.0));
        g.set("llama.rope.scaling.original_context_length", Val::U32(64));
        g.set("llama.rope.scaling.yarn_log_multiplier", Val::F32(0.1));
    });
    gen(&key, &["llama.rope.scaling.yarn_log_multiplier is not computed by this engine's RoPE"]);
    // Issue 35: nothing else a file says is ignored either (a window, logit soft-capping).
    for (key, v) in [("llama.attention.sliding_window", Val::U32(32)), ("llama.final_logit_softcapping", Val::F32(30.0))] {
        let p = gguf_with(&format!("gguf-{key}"), |g| {
            g.set(key, v);
        });
        gen(&p, &[&format!("{key} is not computed by this engine"), "refused rather than ignored"]);
    }
}

live_test! {
    /// The engine's RoPE tables against transformers' rotary embedding, positions 0..8192, for
    /// every type (the tiny variants' configs with max_position_embeddings 8192, so that the
    /// length-dependent types run their long form): the largest |cos - cos'| and |sin - sin'|
    /// per position range, printed (the closing note's "error by position") and bounded. Both
    /// compute in f32 the same way (inv_freq, then position x inv_freq rounded to f32, then
    /// cos/sin); against the exact f64 angles each is off by up to half an f32 ulp of the
    /// angle (2.4e-4 at position 8191), which the bound leaves room for.
    fn rope_tables_match_transformers_up_to_8k_positions() {
        let n = 8192usize;
        // One Python process for every type: (directory, max_position_embeddings or "-") pairs.
        let script = r#"
import json, sys, torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
n = int(sys.argv[1])
out = []
for d, m in zip(sys.argv[2::2], sys.argv[3::2]):
    cfg = AutoConfig.from_pretrained(d)
    if m != "-":
        cfg.max_position_embeddings = int(m)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, n, 16), torch.arange(n)[None, :])
    half = cos.shape[-1] // 2
    out.append({"cos": cos[0, :, :half].flatten().tolist(), "sin": sin[0, :, :half].flatten().tolist()})
json.dump(out, sys.stdout)
"#;
        let types = ["default", "linear", "dynamic", "yarn", "llama3", "longrope"];
        let dir = |ty: &str| if ty == "default" { fixture("tiny-llama") } else { fixture(&format!("tiny-llama-rope/{ty}")) };
        let mut args = vec!["-c".to_string(), script.to_string(), n.to_string()];
        for ty in types {
            // dynamic keeps its own max_position_embeddings (64): past it the base grows.
            args.extend([dir(ty).to_str().unwrap().to_string(), if ty == "dynamic" { "-".into() } else { n.to_string() }]);
        }
        let out = std::process::Command::new(venv().join("bin/python")).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for (t, ty) in types.into_iter().enumerate() {
            let dir = dir(ty);
            let v = &all[t];
            let theirs = |k: &str| -> Vec<f32> { v[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
            let (tc, ts) = (theirs("cos"), theirs("sin"));
            // The engine's plan of the same config (its max_position_embeddings set alike).
            let mut hf = lockstep_engine::config::HfConfig::from_file(&dir.join("config.json")).unwrap();
            if ty != "dynamic" {
                hf.max_position_embeddings = Some(n);
            }
            let cfg = lockstep_engine::models::llama::FAMILY.hf_config;
            let cfg = cfg(&hf, &dir.join("config.json")).unwrap();
            let plan = lockstep_engine::RopePlan { base: cfg.rope_theta, dims: cfg.head_dim, scaling: cfg.rope_scaling.clone() };
            let (c, s) = lockstep_engine::blocks::rope_tables(&plan, 0, n, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
            let (c, s): (Vec<f32>, Vec<f32>) = (c.flatten_all().unwrap().to_vec1().unwrap(), s.flatten_all().unwrap().to_vec1().unwrap());
            // The exact tables: the same plan in f64 throughout.
            let (ec, es) = lockstep_engine::blocks::rope_tables(&plan, 0, n, candle_core::DType::F64, &candle_core::Device::Cpu).unwrap();
            let (ec, es): (Vec<f64>, Vec<f64>) = (ec.flatten_all().unwrap().to_vec1().unwrap(), es.flatten_all().unwrap().to_vec1().unwrap());
            let half = cfg.head_dim / 2;
            let (mut ours, mut exact_ours, mut exact_theirs) = (vec![], vec![], vec![]);
            let mut worst = 0f64;
            for (lo, hi) in [(0, 64), (64, 512), (512, 2048), (2048, 4096), (4096, 8192)] {
                let max = |a: &dyn Fn(usize) -> f64| (lo * half..hi * half).map(a).fold(0f64, f64::max);
                let d = max(&|i| ((c[i] - tc[i]).abs().max((s[i] - ts[i]).abs())) as f64);
                let eo = max(&|i| (c[i] as f64 - ec[i]).abs().max((s[i] as f64 - es[i]).abs()));
                let et = max(&|i| (tc[i] as f64 - ec[i]).abs().max((ts[i] as f64 - es[i]).abs()));
                worst = worst.max(d);
                ours.push(format!("{lo}..{hi}: {d:.1e}"));
                exact_ours.push(format!("{eo:.1e}"));
                exact_theirs.push(format!("{et:.1e}"));
            }
            println!("{ty:9} engine vs transformers, max |Δcos|,|Δsin| by position: {}", ours.join(", "));
            println!("{:9} vs exact (f64): engine {}; transformers {}", "", exact_ours.join(" "), exact_theirs.join(" "));
            assert!(worst < 1e-3, "{ty}: the engine's RoPE tables differ from transformers' by {worst}");
        }
    }
}
