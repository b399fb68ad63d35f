//! Long contexts (issue 36): a prompt longer than `--prefill-chunk` is fed to every side in
//! pieces, each compared as it comes, and the run's verdict, tokens and localization are what
//! one call gives; `--context` sizes every reference with a fixed context (llama.cpp's n_ctx)
//! and is checked against the model before anything runs; a cache bug that rewrites an old
//! row while every appended row is right is still caught.

mod common;
use common::*;

/// 93 tokens of the tiny tokenizer.
const LONG_PROMPT: &str = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire and the rain falls \
                           on the old stone house near the river where children play every summer day until the sun goes down behind the hills";

/// `lockstep CMD` with `args`, its JSON report: (exit code, stdout, stderr, report).
fn json_of(cmd: &str, args: &[&str], tag: &str) -> (i32, String, String, serde_json::Value) {
    let json = tmp(tag).join("out.json");
    let (code, out, err) = run(lockstep().current_dir(repo()).arg(cmd).args(args).args(["--json", json.to_str().unwrap()]));
    let report = std::fs::read_to_string(&json).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    (code, out, err, report)
}

fn tokens(report: &serde_json::Value) -> Vec<u64> {
    report["steps"].as_array().map(|s| s.iter().filter_map(|s| s["engine_token"].as_u64()).collect()).unwrap_or_default()
}

/// The worst rel-L2 of step 0 over every site of every reference.
fn worst_step0(report: &serde_json::Value) -> f64 {
    report["steps"][0]["references"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["sites"].as_array().unwrap().iter().filter_map(|s| s["metrics"]["rel_l2"].as_f64()))
        .fold(0.0, f64::max)
}

live_test! {
    /// The 93-token prompt in pieces of 16 against transformers, MLX and llama.cpp: the same
    /// verdict (pass) and the same tokens as one call, step 0 records its six calls, and its
    /// worst site is within a decade of one call's (the same arithmetic, in other shapes).
    fn a_prompt_fed_in_pieces_passes_with_the_tokens_of_one_call() {
        let base = ["--model", "tiny-gguf", "--reference", "transformers,mlx,llamacpp", "--prompt", LONG_PROMPT, "--steps", "4"];
        let (code, out, err, whole) = json_of("run", &base, "whole");
        assert_eq!(code, 0, "{out}\n{err}");
        let (code, out, err, pieces) = json_of("run", &[&base[..], &["--prefill-chunk", "16"]].concat(), "pieces");
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(pieces["verdict"], "pass", "{out}");
        let calls: Vec<u64> = pieces["steps"][0]["calls"].as_array().expect("step 0 records its calls").iter().map(|c| c.as_u64().unwrap()).collect();
        assert_eq!(calls, [16, 16, 16, 16, 16, 13], "{out}");
        assert!(whole["steps"][0].get("calls").is_none(), "one call records no pieces");
        assert_eq!(tokens(&whole), tokens(&pieces));
        let (w, p) = (worst_step0(&whole), worst_step0(&pieces));
        assert!(p > 0.0 && p < 10.0 * w.max(1e-7) && w < 10.0 * p.max(1e-7), "worst step-0 rel-L2: one call {w:.2e}, pieces {p:.2e}");
        assert!(out.contains("step 0 fed its 93 tokens in 6 calls of at most 16 (--prefill-chunk)"), "{out}");
    }

}

live_test! {
    /// Faults that act in the prompt are found in the piece where they act and bisected there:
    /// the same step, layer, site and diagnosis as with the prompt in one call.
    fn a_fault_in_a_piece_is_localized_and_diagnosed_as_in_one_call() {
        for fault in ["rope-theta", "causal-mask", "rms-eps"] {
            let base = ["--model", "tiny", "--reference", "transformers", "--prompt", LONG_PROMPT, "--steps", "3", "--inject", fault];
            let (_, out1, _, whole) = json_of("bisect", &base, &format!("bisect-whole-{fault}"));
            let (code, out, err, pieces) = json_of("bisect", &[&base[..], &["--prefill-chunk", "16"]].concat(), &format!("bisect-pieces-{fault}"));
            assert_eq!(code, 1, "{fault}: {out}\n{err}");
            for key in ["step", "layer", "site"] {
                assert_eq!(whole[key], pieces[key], "{fault}: {key}\none call:\n{out1}\npieces:\n{out}");
            }
            assert_eq!(whole["diagnosis"]["name"], pieces["diagnosis"]["name"], "{fault}:\none call:\n{out1}\npieces:\n{out}");
            assert!(pieces["diagnosis"]["name"].is_string(), "{fault}: {out}");
        }
    }

}

live_test! {
    /// llama.cpp's fixed context is sized from the run: `--context 3000` gives it at least
    /// 3,000 positions, and by default it holds the prompt plus the steps (no more than its
    /// padding), not a fixed 2,048.
    fn llama_cpp_holds_the_context_the_run_asks_for() {
        let n_ctx = |out: &str| -> usize {
            let at = out.find("n_ctx ").unwrap_or_else(|| panic!("no n_ctx in the header:\n{out}"));
            out[at + 6..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        let base = ["--model", "smollm2", "--reference", "llamacpp", "--prompt", "The capital of France is", "--steps", "2"];
        let (code, out, err) = run(lockstep().arg("run").args(base).args(["--context", "3000"]));
        assert_eq!(code, 0, "{out}\n{err}");
        let n = n_ctx(&out);
        assert!((3000..4096).contains(&n), "--context 3000 gave llama.cpp n_ctx {n}:\n{out}");
        let (code, out, err) = run(lockstep().arg("run").args(base));
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(n_ctx(&out) < 2048, "by default llama.cpp holds what the run feeds:\n{out}");
    }

}

live_test! {
    /// A cache bug that leaves every appended row right and rewrites an old one (an engine's
    /// slot slip: examples/python/hf_engine.py's `load_old_row_rewritten`) is caught at the
    /// step that rewrote it, at the layer's cache.
    fn a_cache_that_rewrites_an_old_row_is_caught_at_that_step() {
        let (code, out, err, report) = json_of(
            "run",
            &[
                "--engine", "python:examples/python/hf_engine.py:load_old_row_rewritten", "--model", "snapshots/models/tiny-qwen3",
                "--reference", "transformers", "--prompt", "The capital of France is", "--steps", "4",
            ],
            "old-row",
        );
        assert_eq!(code, 1, "{out}\n{err}");
        let d = &report["first_divergence"];
        assert_eq!((d["step"].as_u64(), d["layer"].as_u64()), (Some(1), Some(1)), "{out}");
        assert!(d["site"].as_str().is_some_and(|s| s.starts_with("layers.1.cache_")), "{out}");
    }
}

live_test! {
    /// The same bug at a row past the earlier rows a decode step compares on its own (row 120
    /// of a 160-token prompt; the step's sweep covers rows 0..32): the step drifts (attention
    /// reads the rewritten row: `layers.1.out` 6e-3 from transformers), is compared again with
    /// whole caches, and the cache is named at that step, not at the next (whose sweep holds
    /// row 120).
    fn a_rewritten_row_outside_the_sweep_is_named_at_its_step() {
        let prompt = "The capital of France is Paris. ".repeat(10);
        let (code, out, err, report) = json_of(
            "run",
            &[
                "--engine", "python:examples/python/hf_engine.py:load_far_row_rewritten", "--model", "snapshots/models/tiny-qwen3",
                "--reference", "transformers", "--prompt", &prompt, "--steps", "3",
            ],
            "far-row",
        );
        assert_eq!(code, 1, "{out}\n{err}");
        let fed = report["steps"][0]["fed"].as_array().map_or(0, |f| f.len());
        // Row 120 is past step 1's sweep (rows 0..32) and inside the prompt.
        assert!(fed > 121 && 120 >= lockstep::lockstep::step::CACHE_SWEEP_ROWS, "a prompt of {fed} tokens");
        let d = &report["first_divergence"];
        assert_eq!((d["step"].as_u64(), d["layer"].as_u64()), (Some(1), Some(1)), "{out}");
        assert!(d["site"].as_str().is_some_and(|s| s.starts_with("layers.1.cache_")), "{out}");
    }
}

live_test! {
    /// A trace of a long call keeps its logits as their top entries (`@topk`: each earlier
    /// row's 64 largest logits and log-sum-exp, the last row in full): SmolLM2's ~110-token
    /// prefill against llama.cpp keeps its logits in under 1 MB (22 MB in full), and
    /// replays without Python with every position's distribution judged.
    fn a_long_calls_logits_are_traced_as_top_entries_and_replayed() {
        let dir = tmp("topk-trace");
        let prompt = "The capital of France is Paris. ".repeat(14);
        let (code, out, err) = run(lockstep().current_dir(repo()).args([
            "record", "--model", "smollm2", "--reference", "llamacpp", "--prompt", &prompt, "--steps", "2", "--name", "long",
            "--out", dir.to_str().unwrap(),
        ]));
        assert_eq!(code, 0, "{out}\n{err}");
        let json = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "json")).expect("a trace");
        let tensors = json.with_extension("safetensors");
        let bytes = std::fs::read(&tensors).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        assert!(header.get("s000/logits").is_none(), "step 0's logits are not kept in full");
        let at = header["s000/logits@topk"]["data_offsets"].as_array().expect("step 0's logits kept as top entries");
        let size = at[1].as_u64().unwrap() - at[0].as_u64().unwrap();
        assert!(size < 1 << 20, "{size} bytes for step 0's logits");
        let (code, out, err, report) = json_of(
            "run",
            &["--model", "smollm2", "--reference", &format!("trace:{}", json.display()), "--prompt", &prompt, "--steps", "2"],
            "topk-replay",
        );
        assert_eq!(code, 0, "{out}\n{err}");
        let fed = report["steps"][0]["fed"].as_array().map_or(0, |f| f.len());
        assert!(fed * 49152 > 1 << 22, "{fed} tokens: the logits must pass the size kept in full");
        let r = &report["steps"][0]["references"][0];
        let (kl_max, kl_last) = (r["kl_max_positions"].as_f64().unwrap(), r["logits"]["kl"].as_f64().unwrap());
        assert!(kl_max > 0.0 && kl_max >= kl_last, "every position judged: max KL {kl_max}, last {kl_last}");
    }
}

/// `--context` is checked against the run and the model before any reference loads; a piece
/// of no tokens is refused. Exit 2 with the numbers.
#[test]
fn a_context_that_cannot_hold_the_run_or_exceeds_the_model_is_exit_2_with_the_numbers() {
    let run = ["run", "--model", "tiny", "--reference", "transformers", "--prompt", "The capital of France is", "--steps", "4"];
    assert_exit_2(
        &[&run[..], &["--context", "5"]].concat(),
        &[],
        &["--context 5 is smaller than the run", "a prompt of 11 tokens and 4 steps feed 14 positions", "give --context 14 or more"],
    );
    assert_exit_2(&[&run[..], &["--context", "100000"]].concat(), &[], &["--context 100000 exceeds", "context window of 256 positions"]);
    assert_exit_2(&[&run[..], &["--prefill-chunk", "0"]].concat(), &[], &["--prefill-chunk 0"]);
}

live_test! {
    /// `--max-memory`: a run predicted past it stops before step 0 (exit 2, the prediction's
    /// parts named); within it, the run goes on and its report holds the prediction, which is
    /// above what was loaded.
    fn a_run_predicted_past_max_memory_stops_before_step_0() {
        let base = ["--model", "tiny", "--reference", "transformers", "--prompt", LONG_PROMPT, "--steps", "3"];
        assert_exit_2(
            &[&["run"][..], &base[..], &["--max-memory", "1"]].concat(),
            &[],
            &["--max-memory 1: the run is predicted peak", "MB: loaded", "x one call of 93 positions' captures", "caches of 95 positions"],
        );
        let (code, out, err, report) = json_of("run", &[&base[..], &["--max-memory", "100000"]].concat(), "max-memory");
        assert_eq!(code, 0, "{out}\n{err}");
        let m = &report["memory"];
        assert!(m["peak"].as_u64() > m["loaded"].as_u64() && m["loaded"].as_u64() > Some(0), "{m}");
        assert_eq!(m["positions"], 95, "{m}");
        assert!(out.contains("memory: predicted peak"), "{out}");
    }
}
