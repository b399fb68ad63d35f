//! Sliding-window attention (issue 37): windowed models pass against transformers with prompts
//! shorter than, as long as and longer than the window, for 32 steps and more past it; the two
//! window faults are found at the first step where the window matters, at the first window
//! layer, and named by the span that reproduces them.
//!
//! Fixtures (scripts/make_fixtures.py, `--windows-only`): `snapshots/models/tiny-mistral/`
//! (tiny-llama's weights, model_type mistral, a window of 8 on every layer) and
//! `snapshots/models/tiny-qwen2-swa/` (tiny-qwen2's, use_sliding_window with max_window_layers
//! 1: layer 0 global, layer 1 a window of 8), and `snapshots/models/tiny-mistral-mixed/`
//! (tiny-mistral with `layer_types` windowing layers 0 and 2: the form mlx-lm windows too).

use std::path::PathBuf;

mod common;
use common::*;

const WINDOW: usize = 8;

/// Prompts of 5, 8 and 29 tokens of the tiny tokenizer (shorter than, as long as and longer
/// than the window).
const PROMPTS: [(&str, usize); 3] = [
    ("hello world you", 5),
    ("the quick brown fox jumps over", 8),
    ("the quick brown fox jumps over the lazy dog and the cat sleeps by the warm fire", 29),
];

fn fixture(name: &str) -> PathBuf {
    repo().join("snapshots/models").join(name)
}

live_test! {
    /// Every fixture, each prompt, 41 steps (every run ends 32 positions or more past the
    /// window): the engine passes against transformers, whose cache keeps the last 7 positions
    /// where the engine's keeps 8 and the step's (the canonical form compares the last 7), and
    /// against MLX on the fixture mlx-lm windows (a ring of 8, rotated into position order);
    /// the run states each layer's window.
    fn every_window_fixture_passes_past_the_window() {
        for (name, references, says) in [
            ("tiny-mistral", "transformers", "  attention  sliding window of 8 on every layer"),
            ("tiny-qwen2-swa", "transformers", "  attention  sliding window of 8 on layers [1] (the others global)"),
            ("tiny-mistral-mixed", "transformers,mlx", "  attention  sliding window of 8 on layers [0, 2] (the others global)"),
        ] {
            for (prompt, len) in PROMPTS {
                let json = tmp(&format!("win-{name}-{len}")).join("run.json");
                let (code, out, err) = run(lockstep().args([
                    "run", "--model", fixture(name).to_str().unwrap(), "--reference", references, "--prompt", prompt, "--steps", "41",
                    "--json", json.to_str().unwrap(),
                ]));
                assert_eq!(code, 0, "{name}, {len}-token prompt: {out}\n{err}");
                assert!(out.contains(says), "{name}: the windows are not stated:\n{out}");
                let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
                assert_eq!(report["verdict"], "pass", "{name}, {len}: {out}");
                let ids = report["tokens"]["prompt"]["engine_ids"].as_array().map(|a| a.len()).unwrap_or(0);
                assert_eq!(ids, len, "{name}: the prompt is not {len} tokens");
                let steps = report["steps"].as_array().map(|s| s.len()).unwrap_or(0);
                assert!(len + steps >= WINDOW + 32, "{name}, {len}: the run stopped after {steps} steps, before 32 past the window");
            }
        }
    }
}

#[test]
fn the_windows_are_read_as_transformers_reads_them() {
    // A Mistral config without `sliding_window` has MistralConfig's 4,096 on every layer; with
    // `null`, none; Qwen2's window only with use_sliding_window, from max_window_layers on.
    let cfg = |json: &str| -> Vec<Option<usize>> {
        let hf = lockstep_engine::config::HfConfig::parse(json, std::path::Path::new("config.json")).unwrap();
        hf.layer_windows(std::path::Path::new("config.json")).unwrap()
    };
    let base = r#""hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 10, "rms_norm_eps": 1e-5"#;
    assert_eq!(cfg(&format!(r#"{{"model_type": "mistral", {base}}}"#)), vec![Some(4096); 3]);
    assert_eq!(cfg(&format!(r#"{{"model_type": "mistral", "sliding_window": null, {base}}}"#)), vec![]);
    assert_eq!(cfg(&format!(r#"{{"model_type": "qwen2", "sliding_window": 8, "max_window_layers": 1, {base}}}"#)), vec![]);
    assert_eq!(
        cfg(&format!(r#"{{"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1, {base}}}"#)),
        vec![None, Some(8), Some(8)]
    );
    assert_eq!(
        cfg(&format!(r#"{{"model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention", "full_attention"], {base}}}"#)),
        vec![None, Some(8), None]
    );
    assert_eq!(cfg(&format!(r#"{{"model_type": "llama", "sliding_window": 8, {base}}}"#)), vec![]);
    assert_eq!(cfg(&format!(r#"{{"model_type": "mixtral", "sliding_window": 8, {base}}}"#)), vec![Some(8); 3]);
}

live_test! {
    /// mlx-lm 0.32.2 would run tiny-mistral (every layer windowed) and tiny-qwen2-swa without
    /// their windows: the MLX reference refuses them with what it would run instead.
    fn mlx_refuses_a_model_it_would_run_without_its_windows() {
        for (name, theirs, ours) in [
            ("tiny-mistral", "[global, global, global]", "[window 8, window 8, window 8]"),
            ("tiny-qwen2-swa", "[global, global]", "[global, window 8]"),
        ] {
            assert_exit_2(
                &["run", "--model", fixture(name).to_str().unwrap(), "--reference", "mlx", "--prompt", PROMPTS[0].0, "--steps", "2"],
                &[],
                &[&format!("with layers {theirs} where its config defines {ours}"), "compare against transformers instead"],
            );
        }
    }
}

/// `lockstep bisect` of `model` with `fault` on `prompt`: (exit code, stdout).
fn bisect(model: &str, prompt: &str, fault: &str) -> (i32, String) {
    let (code, out, err) = run(lockstep().args([
        "bisect", "--model", fixture(model).to_str().unwrap(), "--reference", "transformers", "--prompt", prompt, "--steps", "12",
        "--inject", fault, "--wide",
    ]));
    (code, format!("{out}\n{err}"))
}

live_test! {
    /// A prompt longer than the window: both faults at step 0, at the first window layer's
    /// `attn`, named with the span the engine attended over (attention recomputed from the
    /// reference's q/k/v over every position and over 9 gives the engine's output, over 8 the
    /// reference's). On tiny-qwen2-swa the first window layer is 1: layer 0 is global and passes.
    fn both_window_faults_are_found_where_the_window_first_matters_and_named() {
        let long = PROMPTS[2].0;
        for (model, layer) in [("tiny-mistral", 0), ("tiny-qwen2-swa", 1)] {
            for (fault, title) in [
                ("sliding-window-ignored", format!("sliding window ignored: layer {layer} attends over every position, its window is 8")),
                ("window-off-by-one", format!("sliding window off by one: layer {layer} attends over 9 positions, its window is 8")),
            ] {
                let (code, out) = bisect(model, long, fault);
                assert_eq!(code, 1, "{model} {fault}: {out}");
                assert!(out.contains("first divergent step  0"), "{model} {fault}: {out}");
                assert!(out.contains(&format!("first failing site    layers.{layer}.attn, layer {layer}")), "{model} {fault}: {out}");
                assert!(out.contains(&format!("diagnosis: {title} [sliding-window]")), "{model} {fault}: {out}");
            }
        }
        // A 5-token prompt: the window first matters at position 8, fed at step 4 (positions
        // 0-4 at step 0, one per step after). Isolation runs the layer on the positions the
        // reference's window evicted too (kept by bisect), and at position 8 every position and
        // a window of 9 are the same 9 positions: both faults are named as what they are there.
        for fault in ["sliding-window-ignored", "window-off-by-one"] {
            let (code, out) = bisect("tiny-mistral", PROMPTS[0].0, fault);
            assert_eq!(code, 1, "{fault}: {out}");
            assert!(out.contains("first divergent step  4"), "{fault}: {out}");
            assert!(out.contains("first failing site    layers.0.attn, layer 0"), "{fault}: {out}");
            assert!(out.contains("isolation             layer 0 on the reference's input and cache: FAILS"), "{fault}: {out}");
            assert!(
                out.contains("diagnosis: sliding window ignored or one too wide: layer 0 attends over 9 positions, its window is 8 [sliding-window]"),
                "{fault}: {out}"
            );
        }
        // A run that never passes the window: refused, not run.
        assert_exit_2(
            &["run", "--model", fixture("tiny-mistral").to_str().unwrap(), "--prompt", PROMPTS[0].0, "--steps", "3", "--inject", "window-off-by-one"],
            &[],
            &["the run feeds 7 positions and the smallest window holds 8"],
        );
        // A model without windows: refused by name.
        assert_exit_2(&["run", "--model", "tiny", "--prompt", PROMPTS[2].0, "--inject", "sliding-window-ignored"], &[], &["the model has no sliding-window layer"]);
    }
}

live_test! {
    /// A Python engine whose window ring never evicts on a multi-token update (the bug class
    /// of mlx-lm issue 1914; examples/python/mlx_ring_bug.py): right one token at a time and
    /// until the window fills, wrong from the first piece of the prompt past it. Fed in pieces
    /// of 4, the third (positions 8-11) fails at layer 0's attention, and bisect names the span:
    /// the engine cannot run one layer alone, so its own attention of the step (from inputs that
    /// pass) is compared with attention recomputed over each span.
    fn a_ring_that_never_evicts_on_multi_token_calls_is_caught_with_its_window_named() {
        let engine = format!("python:{}", repo().join("examples/python/mlx_ring_bug.py").display());
        let args = |chunk: &str| -> (i32, String, String) {
            run(lockstep().args([
                "bisect", "--engine", &engine, "--model", fixture("tiny-mistral-mixed").to_str().unwrap(), "--reference", "transformers",
                "--prompt", PROMPTS[2].0, "--prefill-chunk", chunk, "--steps", "4", "--wide",
            ]))
        };
        let (code, out, err) = args("4");
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(out.contains("first divergent step  0"), "{out}");
        assert!(out.contains("first failing site    layers.0.attn, layer 0"), "{out}");
        assert!(out.contains("diagnosis: sliding window ignored: layer 0 attends over every position, its window is 8 [sliding-window]"), "{out}");
        assert!(out.contains("its own `attn` of this step is used"), "{out}");
        // One token per call after a whole-prompt prefill: the ring is right, nothing found.
        let (code, out, err) = args("128");
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("nothing found"), "{out}");
    }
}
