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
}
