//! The bodies of lockstep's fuzz targets: every parser lockstep owns or feeds untrusted bytes
//! to, called through the same entry points the engine and the harness use (in memory: no
//! file per input). A target must never panic, hang or exhaust memory, whatever the bytes;
//! an `Err` is the right answer to a bad input.
//!
//! Two drivers run them: the coverage-guided libFuzzer binaries of `fuzz_targets/` (`make
//! fuzz`, `scripts/fuzz.sh`), and `harness/tests/fuzz_smoke.rs`, which includes this file
//! and runs each body over the committed corpus (`fuzz/corpus/<target>/`) plus a few thousand
//! deterministic mutations in every `cargo test`.
//!
//! This file is compiled both as the `lockstep_fuzz` library and as a module of the harness's
//! smoke test: it uses only crates both have (the engine, the harness, candle-core).

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use lockstep_engine::config::{Config, HfConfig};
use lockstep_engine::lora::{LoraAdapter, LoraConfig, LoraFormat};
use lockstep_engine::models::{self, Checkpoint};
use lockstep_engine::tokenizer::{render_chat_template, ChatMessage, Tokenizer, TokenizerOptions};
use lockstep_engine::weights::{self, Arch, GgufFile};
use lockstep_engine::{LoadOptions, WeightsMode};

/// Every target: its name (the binary in `fuzz_targets/`, the folder in `fuzz/corpus/`) and
/// its body.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("hf_config", hf_config),
    ("tokenizer", tokenizer),
    ("chat_template", chat_template),
    ("lora_config", lora_config),
    ("suite", suite),
    ("trace", trace),
    ("arrays", arrays),
];

/// Texts every tokenizer encodes: ASCII, a digit run, whitespace, a special token, non-ASCII.
const TEXTS: &[&str] = &["Hello, world! 12345", "  two  spaces\n\ttab", "<|im_start|>user\nhi<|im_end|>", "héllo 日本 🦀"];

fn messages() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are terse."),
        ChatMessage::user("What is the capital of France?"),
        ChatMessage::new("assistant", "Paris."),
        ChatMessage::user("And of Italy?"),
    ]
}

/// A tokenizer's texts encoded, decoded, and its probes: the calls the harness makes.
fn exercise_tokenizer(t: &Tokenizer) {
    for text in TEXTS {
        if let Ok(ids) = t.encode(text, true) {
            let _ = t.decode(&ids, false);
            let _ = t.decode(&ids, true);
        }
    }
    let n = t.vocab_size() as u32;
    let _ = t.decode(&[0, 1, n.saturating_sub(1), n, u32::MAX], false);
    for id in [0, n.saturating_sub(1), n, u32::MAX] {
        let _ = t.id_to_token(id);
    }
    let _ = (t.prepends_space(), t.adds_bos(), t.adds_eos(), t.bos_id(), t.eos_id());
    if t.chat_template.is_some() {
        if let Ok(ids) = t.encode_chat(&messages()) {
            let _ = t.decode(&ids, false);
        }
    }
}

/// A GGUF file: the header and tensor table (`GgufFile`), the config and family it resolves
/// to, its tokenizer, and the whole model load (weights checked against the config,
/// dequantized or kept quantized) as `lockstep_engine::load` does it.
pub fn gguf(data: &[u8]) {
    let path = Path::new("fuzz.gguf");
    let Ok(mut g) = GgufFile::from_bytes(path, data.to_vec()) else { return };
    let _ = g.config();
    if let Ok(t) = Tokenizer::from_gguf_with(&g, TokenizerOptions::default()) {
        exercise_tokenizer(&t);
    }
    let Ok(family) = models::for_gguf(&g) else { return };
    for mode in [WeightsMode::Quantized, WeightsMode::Dequant] {
        let _ = (family.load)(Checkpoint::Gguf { file: &mut g, mode }, &LoadOptions::default());
    }
}

/// The tiny Llama's config (hidden 64, 3 layers, 512 tokens): safetensors tensors are
/// checked against it.
fn tiny_config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let text = include_str!("../../snapshots/models/tiny-llama/config.json");
        models::resolve_hf(&HfConfig::parse(text, Path::new("config.json")).unwrap(), Path::new("config.json")).unwrap()
    })
}

/// A safetensors file (header and data) read as the engine reads model weights and LoRA
/// adapters, then checked and converted as the weights of the tiny Llama.
pub fn safetensors(data: &[u8]) {
    let path = Path::new("model.safetensors");
    let Ok(tensors) = lockstep_engine::tensors::safetensors_from_bytes(path, data) else { return };
    let _ = weights::hf_weights_from_tensors(Path::new("fuzz"), tensors, tiny_config(), DType::F32, &Arch::LLAMA);
}

/// A Hugging Face `config.json`: the serde mirror, then resolved and validated.
pub fn hf_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("config.json");
    if let Ok(hf) = HfConfig::parse(text, path) {
        if let Ok(cfg) = models::resolve_hf(&hf, path) {
            let _ = models::for_model_type(hf.model_type.as_deref(), path);
            let _ = cfg.n_rep();
        }
    }
}

/// A `tokenizer.json` (the `tokenizers` crate's format), built as the engine builds a Hugging
/// Face directory's tokenizer (also with the `spm-space-prefix` fault's rewrite), then used.
pub fn tokenizer(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}"#;
    for drop_space_prefix in [false, true] {
        let opts = TokenizerOptions { drop_space_prefix };
        if let Ok(t) = Tokenizer::from_hf_parts(Path::new("fuzz"), text, Some(config), None, opts) {
            exercise_tokenizer(&t);
        }
    }
}

/// A chat template (Jinja, from a model's tokenizer_config.json or GGUF metadata) rendered
/// with a four-message chat, with and without the generation prompt.
pub fn chat_template(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else { return };
    for add_generation_prompt in [true, false] {
        let _ = render_chat_template(src, &messages(), add_generation_prompt, "<s>", "</s>");
    }
}

/// The committed adapters' tensors, by format: what an `adapter_config.json` is resolved and
/// paired against.
fn adapter_tensors(format: LoraFormat) -> HashMap<String, Tensor> {
    static PEFT: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    static MLX: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    let read = |bytes: &[u8]| candle_core::safetensors::load_buffer(bytes, &Device::Cpu).unwrap();
    match format {
        LoraFormat::Peft => PEFT.get_or_init(|| read(include_bytes!("../../snapshots/adapters/tiny-peft/adapter_model.safetensors"))),
        LoraFormat::Mlx => MLX.get_or_init(|| read(include_bytes!("../../snapshots/adapters/tiny-mlx/adapters.safetensors"))),
    }
    .clone()
}

/// A LoRA `adapter_config.json`, read as PEFT's and as mlx-lm's, resolved against the tiny
/// Llama, then paired with the committed adapter's tensors of that format.
pub fn lora_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let cfg = tiny_config();
    for format in [LoraFormat::Peft, LoraFormat::Mlx] {
        let path = Path::new("adapter_config.json");
        if let Ok(config) = LoraConfig::parse(text, format, path, cfg) {
            if let Ok(a) = LoraAdapter::from_parts(Path::new("fuzz"), config, adapter_tensors(format), cfg) {
                let _ = a.inventory();
            }
        }
    }
}

/// A report suite (`scripts/suites/*.toml`): parsed, matrices expanded, every case validated,
/// then the per-case values `lockstep report` reads.
pub fn suite(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(s) = lockstep::report::suite::Suite::parse(text, Path::new("suite.toml")) else { return };
    for c in &s.cases {
        let _ = (c.list_line(), c.prompt_value(), c.weights_mode(), c.fingerprint());
    }
}

/// A golden trace: its JSON (`snapshots/traces/*.json`), and after a NUL byte the bytes of its
/// tensors file. The JSON is parsed and checked, then the values a replay reads from it; the
/// tensors (their sha256 set to match, so that the fuzzer gets past that check) are read into
/// the trace's steps as a replay reads them, and every step's sites are taken.
pub fn trace(data: &[u8]) {
    use lockstep::golden::trace::{sha256_hex, Trace, TraceMeta};
    let (json, tensors) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(text) = std::str::from_utf8(json) else { return };
    let Ok(mut meta) = TraceMeta::parse(text, Path::new("trace.json")) else { return };
    let _ = (meta.description(), meta.weights_mode());
    let Some(bytes) = tensors else { return };
    meta.tensors.sha256 = sha256_hex(bytes);
    let Ok(t) = Trace::from_bytes(meta, bytes, "trace.json".into(), "trace.safetensors".into()) else { return };
    for s in &t.steps {
        let _ = format!("{s:?}").len();
    }
}

/// The boundary where a Python engine's or reference's arrays enter the harness
/// (`StepOutput::python`, `StepArrays::with_site`): the input chooses a dtype, a shape, a memory
/// layout (C order, Fortran order, a transposed view, a strided or reversed slice, a 0-d array,
/// a list) and the values. Whatever is accepted must come out with as many values as its shape
/// holds, in its logical (row-major) order: the values numpy's `ascontiguousarray` gives.
pub fn arrays(data: &[u8]) {
    use lockstep::compare::Data;
    use lockstep::reference::arrays::StepOutput;
    use pyo3::prelude::*;
    use pyo3::types::PyDict;
    if data.len() < 4 {
        return;
    }
    lockstep::reference::python::ensure_python().expect("the reference environment (LOCKSTEP_VENV) for the arrays target");
    let (dtype, ndim, layout) = (data[0] % 6, (data[1] % 4) as usize, data[2] % 7);
    let dims: Vec<usize> = data[3..].iter().take(ndim).map(|d| (d % 6) as usize).collect();
    let payload = data.get(3 + ndim..).unwrap_or_default().to_vec();
    Python::attach(|py| {
        let locals = PyDict::new(py);
        locals.set_item("dtype", dtype).unwrap();
        locals.set_item("dims", dims.clone()).unwrap();
        locals.set_item("layout", layout).unwrap();
        locals.set_item("payload", pyo3::types::PyBytes::new(py, &payload)).unwrap();
        let made = py.run(
            c"import numpy as np
dt = [np.float32, np.float64, np.float16, np.int32, np.bool_, np.float32][dtype]
n = int(np.prod(dims)) if dims else 1
raw = (payload * (n * 8 // max(len(payload), 1) + 1))[: n * np.dtype(dt).itemsize] if payload else bytes(n * np.dtype(dt).itemsize)
base = np.frombuffer(raw, dtype=dt).copy().reshape(dims if dims else ())
if dt in (np.float32, np.float64, np.float16):
    base = np.nan_to_num(base)
arr = [base, np.asfortranarray(base), base.T, base[::2] if base.ndim else base, base[::-1] if base.ndim else base,
       base.reshape(()) if base.size == 1 else base, base.tolist()][layout]
want = np.ascontiguousarray(arr).ravel().astype(np.float64).tolist() if isinstance(arr, np.ndarray) else None
",
            None,
            Some(&locals),
        );
        if made.is_err() {
            return;
        }
        let arr = locals.get_item("arr").unwrap().unwrap();
        let want: Option<Vec<f64>> = locals.get_item("want").unwrap().unwrap().extract().unwrap();
        let dict = PyDict::new(py);
        dict.set_item("logits", arr).unwrap();
        let out = StepOutput::python(dict.unbind(), "fuzz");
        let got = StepOutput::with_views([&out], |v| {
            v[0].with_site("logits", |shape, data| {
                let values: Vec<f64> = match data {
                    Data::F32(d) => d.iter().map(|&x| x as f64).collect(),
                    Data::F64(d) => d.to_vec(),
                    Data::Sketch(_) | Data::TopK(_) | Data::TopKRow(..) => return None,
                };
                Some((shape.to_vec(), values))
            })
        });
        // Refused (another dtype, a list) is fine; accepted must be whole and in order.
        if let Ok(Some(Some((shape, values)))) = got {
            assert_eq!(shape.iter().product::<usize>(), values.len(), "shape {shape:?} and {} values", values.len());
            let want = want.expect("an accepted site is a numpy array");
            assert_eq!(values, want, "the array's values in logical order (layout {layout}, shape {shape:?})");
        }
    });
}
