//! SentencePiece tokenizers (issue 17) through the CLI, on the tiny-spm fixtures: `tokcheck`
//! against transformers and llama.cpp (the references' disagreements reported as such), the
//! BOS-only prompt of the TinyLlama incident in lockstep (`--prompt ""`: ids [BOS], compared
//! at step 0), and the fault catalog (`spm-space-prefix`, `missing-bos`) found by bisect.
//!
//! Needs the reference environment (live tests; see tests/common/mod.rs). Without Python:
//! the engine's side in tests/tokenizer_spm.rs (root crate), the golden case
//! `tiny-spm-bos` in replay.rs.

use serde_json::Value;

mod common;
use common::*;

/// Strings of the SentencePiece kind beyond tokcheck's built-in corpus: BOS/EOS written as
/// text (llama.cpp puts a ▁ after each), leading space runs, the Llama 2 chat markers.
const SPM_CORPUS: &str = "<s>hello</s>\na<s>b</s> c\n  two leading spaces\n The\n[INST] hi [/INST]\n<unk>\n";

fn tokcheck(name: &str, args: &[&str]) -> (i32, String, Value) {
    let dir = tmp(&format!("spm-tokcheck-{name}"));
    let corpus = dir.join("spm.txt");
    std::fs::write(&corpus, SPM_CORPUS).unwrap();
    let json = dir.join("t.json");
    let (code, out, err) = run(lockstep().arg("tokcheck").args(args).arg("--corpus").arg(&corpus).arg("--json").arg(&json));
    let v = std::fs::read_to_string(&json).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(Value::Null);
    (code, format!("{out}{err}"), v)
}

fn strings(v: &Value) -> &Vec<Value> {
    v["strings"].as_array().unwrap()
}

/// Labels of the strings whose outcome is `outcome`.
fn with_outcome<'a>(v: &'a Value, outcome: &str) -> Vec<&'a str> {
    strings(v).iter().filter(|s| s["outcome"] == outcome).map(|s| s["label"].as_str().unwrap()).collect()
}

live_test! {
    /// llama.cpp is the GGUF format's own tokenizer: the engine has its ids on every string,
    /// the special tokens and the Llama 2 chat template.
    fn tokcheck_spm_gguf_agrees_with_llamacpp_everywhere() {
        let (code, out, v) = tokcheck("gguf-llamacpp", &["--model", "tiny-spm-gguf", "--reference", "llamacpp"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(v["mismatches"], 0, "{out}");
        assert_eq!(v["reference_disagreements"], 0, "{out}");
        assert_eq!(with_outcome(&v, "agree").len(), strings(&v).len(), "{out}");
        assert_eq!(v["template"]["outcome"], "agree", "{out}");
        assert!(out.contains("tokenizer.ggml.model=llama"), "{out}");
    }
}

live_test! {
    /// transformers builds this GGUF's tokenizer with a Metaspace pre-tokenizer (prepend_scheme
    /// first): no ▁ in front of a text that starts with a space, none after a special token.
    /// The engine sides with llama.cpp (the witness): references disagree, no mismatch.
    fn tokcheck_spm_gguf_reports_transformers_metaspace_as_a_reference_disagreement() {
        let (code, out, v) = tokcheck("gguf-transformers", &["--model", "tiny-spm-gguf", "--reference", "transformers"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(v["mismatches"], 0, "{out}");
        let names: Vec<&str> = v["references"].as_array().unwrap().iter().map(|r| r[0].as_str().unwrap()).collect();
        assert_eq!(names, ["transformers", "llamacpp(witness)"], "{out}");
        // The witness (index 1) has the engine's ids on every string.
        for s in strings(&v) {
            assert!(s["mismatches"][1].is_null(), "llama.cpp differs from the engine on {}: {out}", s["label"]);
        }
        let disagree = with_outcome(&v, "references_disagree");
        // " leading space", "<s>hello</s>", "a<s>b</s> c", "  two leading spaces", " The".
        for label in ["leading space", "spm.txt:1", "spm.txt:2", "spm.txt:3", "spm.txt:4"] {
            assert!(disagree.contains(&label), "{label} should be a reference disagreement: {disagree:?}\n{out}");
        }
        // Plain text without leading spaces or special tokens: everyone agrees.
        let agree = with_outcome(&v, "agree");
        for label in ["ascii", "emoji", "CJK", "digit runs", "empty"] {
            assert!(agree.contains(&label), "{label}: {out}");
        }
        assert!(out.contains("the engine agrees with llamacpp(witness)"), "{out}");
    }
}

live_test! {
    /// The Hugging Face directory: tokenizer.json (legacy Llama 2 normalizer) read as it is by
    /// transformers (PreTrainedTokenizerFast) and by MLX's tokenizer: identical everywhere.
    fn tokcheck_spm_hf_dir_agrees_with_transformers_and_mlx() {
        let (code, out, v) = tokcheck("hf", &["--model", "tiny-spm", "--reference", "transformers,mlx"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(v["mismatches"], 0, "{out}");
        assert_eq!(v["reference_disagreements"], 0, "{out}");
        assert_eq!(v["template"]["outcome"], "agree", "{out}");
    }
}

live_test! {
    /// The RusTorch/TinyLlama incident's prompt: a bare BOS. It is a valid prompt (one token),
    /// compared at step 0 against transformers and llama.cpp, and the run passes.
    fn the_bos_only_prompt_runs_in_lockstep_and_is_compared_at_step_0() {
        let json = tmp("spm-bos").join("r.json");
        let (code, out, err) = run(lockstep()
            .args(["run", "--model", "tiny-spm-gguf", "--reference", "transformers,llamacpp", "--prompt", "", "--steps", "3", "--json"])
            .arg(&json));
        assert_eq!(code, 0, "{out}\n{err}");
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(r["verdict"], "pass");
        let s0 = &r["steps"][0];
        assert_eq!(s0["fed"], serde_json::json!([1]), "step 0 feeds the BOS alone: {s0}");
        let refs = s0["references"].as_array().unwrap();
        assert_eq!(refs.len(), 2);
        for rs in refs {
            assert!(rs["sites"].as_array().unwrap().iter().any(|s| s["site"] == "logits"), "{rs}");
        }
    }
}

live_test! {
    /// An empty token list is still refused: the gpt2 fixture adds no BOS, so `--prompt ""`
    /// has no tokens (exit 2, named).
    fn an_empty_token_list_is_a_usage_error() {
        assert_exit_2(&["run", "--model", "tiny", "--reference", "transformers", "--prompt", ""], &[], &["no tokens"]);
    }
}

/// `faults --check` on one model and reference; returns the rows.
fn faults_check(model: &str, reference: &str) -> (String, Vec<Value>) {
    let json = tmp(&format!("spm-faults-{model}-{reference}")).join("f.json");
    let (code, out, err) = run(lockstep().args(["faults", "--check", "--model", model, "--reference", reference, "--json"]).arg(&json));
    assert_eq!(code, 0, "{model} vs {reference}:\n{out}\n{err}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (out, v.as_array().unwrap().clone())
}

fn row<'a>(rows: &'a [Value], fault: &str) -> &'a Value {
    rows.iter().find(|r| r["fault"] == fault).unwrap_or_else(|| panic!("{fault} missing"))
}

live_test! {
    fn faults_check_finds_the_space_prefix_and_missing_bos_on_the_spm_fixtures() {
        for (model, reference) in [("tiny-spm", "transformers"), ("tiny-spm-gguf", "llamacpp")] {
            let (out, rows) = faults_check(model, reference);
            assert_eq!(rows[0]["found"], "nothing", "false alarm: {out}");
            for r in &rows {
                assert_eq!(r["ok"], true, "{model} vs {reference}: {r}\n{out}");
            }
            for fault in ["spm-space-prefix", "missing-bos"] {
                let r = row(&rows, fault);
                assert_eq!(r["applicable"], true, "{model}: {r}");
            }
            assert_eq!(row(&rows, "spm-space-prefix")["found"], "step 0, tokens [space-prefix]", "{out}");
            assert_eq!(row(&rows, "missing-bos")["found"], "step 0, tokens [missing-bos]", "{out}");
        }
        // On a byte-level BPE model the fault does not apply (no ▁ prefix to drop).
        let (_, rows) = faults_check("tiny", "transformers");
        assert_eq!(row(&rows, "spm-space-prefix")["applicable"], false);
    }
}
