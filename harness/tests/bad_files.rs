//! Regression tests of bad model files (issue 21): each test builds one bad input from a
//! committed fixture in a temp dir, runs the CLI and asserts exit code 2, no panic, and the
//! words of the message that say what is wrong and where. The engine checks these at open,
//! before any reference is loaded: none of these tests needs Python.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::*;
#[path = "common/gguf.rs"]
mod gguf;
use gguf::{Gguf, Val};

fn fixture(name: &str) -> PathBuf {
    repo().join("snapshots/models").join(name)
}

/// `src` (a fixture) changed by `edit`, written to a temp file named after the test.
fn bad_gguf(src: &str, tag: &str, edit: impl FnOnce(&mut Gguf)) -> PathBuf {
    let mut g = Gguf::read(&fixture(src));
    edit(&mut g);
    let p = tmp(tag).join(format!("{tag}.gguf"));
    g.write(&p);
    p
}

/// A copy of a Hugging Face fixture directory, for editing.
fn hf_copy(src: &str, tag: &str) -> PathBuf {
    let d = tmp(tag).join(src);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(fixture(src)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    d
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Exit 2 from `generate` (no reference needed), and the message has no raw control bytes.
fn generate_exit_2(model: &Path, needles: &[&str]) {
    let m = model.to_str().unwrap();
    assert_exit_2(&["generate", "--model", m, "--prompt", "hi", "-n", "4"], &[], needles);
    let (_, _, err) = run(lockstep().args(["generate", "--model", m, "--prompt", "hi", "-n", "4"]));
    assert!(!err.chars().any(|c| c.is_control() && c != '\n'), "raw control bytes in:\n{err:?}");
}

/// Exit 2 from `run` and `bisect` too: the engine's check comes before any reference loads.
fn run_and_bisect_exit_2(model: &Path, needles: &[&str]) {
    let m = model.to_str().unwrap();
    assert_exit_2(&["run", "--model", m, "--reference", "transformers", "--chat", "hi", "--steps", "2"], &[], needles);
    assert_exit_2(&["bisect", "--model", m, "--reference", "transformers", "--chat", "hi", "--steps", "2"], &[], needles);
}

// --- GGUF header: alignment ---------------------------------------------------------------------

#[test]
fn gguf_alignment_zero_is_exit_2_naming_the_key() {
    // candle's reader divides by it: a panic (exit 101) before.
    let p = bad_gguf("tiny-llama.gguf", "align0", |g| {
        g.set("general.alignment", Val::U32(0));
    });
    let needles = [p.to_str().unwrap(), "general.alignment", "power of two"];
    generate_exit_2(&p, &needles);
    assert_exit_2(&["quant-check", p.to_str().unwrap()], &[], &needles);
    run_and_bisect_exit_2(&p, &needles);
}

#[test]
fn gguf_alignment_not_a_power_of_two_is_exit_2() {
    // 7 was accepted: the data section moved and `generate` printed garbage with exit 0.
    let p = bad_gguf("tiny-llama.Q4_1.gguf", "align7", |g| {
        g.set("general.alignment", Val::U32(7));
    });
    generate_exit_2(&p, &["general.alignment = 7", "power of two"]);
    assert_exit_2(&["quant-check", p.to_str().unwrap()], &[], &["general.alignment"]);
}

// --- GGUF tensor table ---------------------------------------------------------------------------

#[test]
fn gguf_misaligned_tensor_offset_is_exit_2_naming_the_tensor() {
    let p = bad_gguf("tiny-llama.gguf", "misaligned", |g| {
        g.tensor_mut("blk.1.attn_q.weight").offset += 4;
    });
    generate_exit_2(&p, &["blk.1.attn_q.weight", "not a multiple of the alignment 32"]);
    run_and_bisect_exit_2(&p, &["blk.1.attn_q.weight", "alignment"]);
}

#[test]
fn gguf_overlapping_tensors_are_exit_2_naming_both() {
    let p = bad_gguf("tiny-llama.Q4_1.gguf", "overlap", |g| {
        let at = g.tensor("blk.0.ffn_up.weight").offset;
        g.tensor_mut("blk.2.ffn_down.weight").offset = at;
    });
    generate_exit_2(&p, &["blk.0.ffn_up.weight", "blk.2.ffn_down.weight", "overlap"]);
    assert_exit_2(&["quant-check", p.to_str().unwrap()], &[], &["overlap"]);
    run_and_bisect_exit_2(&p, &["overlap"]);
}

#[test]
fn gguf_tensor_past_the_end_of_the_file_is_exit_2_naming_it() {
    let p = bad_gguf("tiny-llama.gguf", "pastend", |g| {
        let end = g.data.len() as u64;
        g.tensor_mut("output_norm.weight").offset = end.next_multiple_of(32) + 4096;
    });
    generate_exit_2(&p, &["output_norm.weight", "past the end of the file"]);
    assert_exit_2(&["quant-check", p.to_str().unwrap()], &[], &["output_norm.weight", "past the end"]);
}

// --- absurd sizes --------------------------------------------------------------------------------

#[test]
fn gguf_absurd_sizes_are_exit_2_before_allocating() {
    // block_count 4294967295 aborted on an allocation failure (exit 134).
    let arch = Gguf::read(&fixture("tiny-llama.gguf")).arch();
    for (key, v, needle) in [
        ("block_count", u32::MAX, "does not match the weights"),
        ("embedding_length", 1 << 30, "embedding_length"),
        ("attention.head_count", 1 << 30, "head_count"),
        ("attention.head_count_kv", 1 << 30, "head_count_kv"),
        ("feed_forward_length", u32::MAX, "feed_forward_length"),
    ] {
        let key = format!("{arch}.{key}");
        let p = bad_gguf("tiny-llama.gguf", &format!("huge-{key}"), |g| {
            g.set(&key, Val::U32(v));
        });
        generate_exit_2(&p, &[&key, needle]);
        if key.ends_with("block_count") {
            run_and_bisect_exit_2(&p, &[&key]);
        }
    }
    // A u64 that does not fit a u32 is refused, not truncated.
    let key = format!("{arch}.block_count");
    let p = bad_gguf("tiny-llama.gguf", "u64-block-count", |g| {
        g.set(&key, Val::U64((1 << 32) + 3));
    });
    generate_exit_2(&p, &[&key, "4294967299"]);
}

#[test]
fn hf_absurd_sizes_are_exit_2_before_allocating() {
    for (key, v) in [
        ("num_hidden_layers", 1_000_000_000_000u64),
        ("hidden_size", 1 << 40),
        ("num_attention_heads", 1 << 40),
        ("num_key_value_heads", 1 << 40),
        ("vocab_size", 1 << 40),
        ("intermediate_size", 1 << 40),
    ] {
        let d = hf_copy("tiny-llama", &format!("hf-huge-{key}"));
        edit_json(&d.join("config.json"), |c| c[key] = v.into());
        generate_exit_2(&d, &["config.json", key]);
        if key == "num_hidden_layers" {
            generate_exit_2(&d, &["num_hidden_layers 1000000000000 does not match the weights", "3 layers"]);
            run_and_bisect_exit_2(&d, &[key]);
        }
    }
}

// --- non-finite weights --------------------------------------------------------------------------

#[test]
fn nan_in_a_safetensors_weight_is_exit_2_naming_the_tensor() {
    // Was exit 1, "NaN/Inf in the engine", after a whole lockstep run.
    let d = hf_copy("tiny-llama", "hf-nan");
    let st = d.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    assert_eq!(header[name]["dtype"], "F32");
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize + 4 * 5;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    generate_exit_2(&d, &["model.safetensors", name, "non-finite", "element 5"]);
    run_and_bisect_exit_2(&d, &[name, "non-finite"]);
}

// --- adapters for another model ------------------------------------------------------------------

/// A safetensors file of f32 zeros with these tensors.
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * 4;
        header.insert(name.to_string(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.resize(out.len() + off, 0);
    std::fs::write(path, out).unwrap();
}

#[test]
fn an_adapter_for_another_model_is_exit_2_with_the_shapes() {
    // SmolLM2's adapter (layers 14..29, width 576) on the 3-layer tiny model attached to
    // nothing: `generate` ran the base model, `run` diverged (exit 1).
    let smol = repo().join("snapshots/adapters/smollm2-mlx");
    let s = smol.to_str().unwrap();
    let needles = ["adapters.safetensors", "model.layers.14.self_attn.q_proj.lora_a", "layer 14", "3 layers", "another model"];
    assert_exit_2(&["generate", "--model", "tiny", "--chat", "hi", "-n", "2", "--lora", s], &[], &needles);
    assert_exit_2(&["run", "--model", "tiny", "--chat", "hi", "--steps", "2", "--lora", s], &[], &needles);

    // Tensors of an untargeted layer with another model's widths (was: attached to nothing).
    let d = tmp("lora-other-dims");
    std::fs::write(
        d.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_to_transform": [0]}"#,
    )
    .unwrap();
    let base = "base_model.model.model.layers";
    write_safetensors(
        &d.join("adapter_model.safetensors"),
        &[
            (&format!("{base}.0.self_attn.q_proj.lora_A.weight"), vec![4, 64]),
            (&format!("{base}.0.self_attn.q_proj.lora_B.weight"), vec![64, 4]),
            (&format!("{base}.2.self_attn.q_proj.lora_A.weight"), vec![4, 576]),
            (&format!("{base}.2.self_attn.q_proj.lora_B.weight"), vec![576, 4]),
        ],
    );
    let ds = d.to_str().unwrap();
    let needles = ["adapter_model.safetensors", "layers.2.self_attn.q_proj.lora_A.weight", "[4, 576]", "expected [4, 64]"];
    assert_exit_2(&["generate", "--model", "tiny", "--chat", "hi", "-n", "2", "--lora", ds], &[], &needles);
    assert_exit_2(&["run", "--model", "tiny", "--chat", "hi", "--steps", "2", "--lora", ds], &[], &needles);

    // A configuration that targets nothing the file holds: nothing would attach.
    let d = tmp("lora-attaches-nothing");
    std::fs::copy(repo().join("snapshots/adapters/tiny-mlx/adapters.safetensors"), d.join("adapters.safetensors")).unwrap();
    std::fs::write(
        d.join("adapter_config.json"),
        r#"{"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "keys": ["self_attn.o_proj"]}}"#,
    )
    .unwrap();
    assert_exit_2(&["generate", "--model", "tiny", "--chat", "hi", "-n", "2", "--lora", d.to_str().unwrap()], &[], &["attaches to nothing", "o_proj"]);
}

// --- vocabulary against the model ----------------------------------------------------------------

#[test]
fn gguf_vocabulary_that_does_not_fit_the_model_is_exit_2() {
    let pop = |g: &mut Gguf, key: &str| match g.kv.iter_mut().find(|(k, _)| k == key) {
        Some((_, Val::Arr(_, v))) => {
            v.pop();
        }
        _ => panic!("no array {key}"),
    };
    // One token fewer than the embedding's rows.
    let p = bad_gguf("tiny-llama.gguf", "vocab-short", |g| {
        pop(g, "tokenizer.ggml.tokens");
        if g.get("tokenizer.ggml.token_type").is_some() {
            pop(g, "tokenizer.ggml.token_type");
        }
    });
    generate_exit_2(&p, &["tokenizer.ggml.tokens has 511 tokens", "512 rows"]);
    run_and_bisect_exit_2(&p, &["tokenizer.ggml.tokens"]);
    // A token-type array of the wrong length.
    let p = bad_gguf("tiny-llama.gguf", "types-short", |g| {
        let n = g.get("tokenizer.ggml.tokens").unwrap().array_len().unwrap();
        g.set("tokenizer.ggml.token_type", Val::Arr(5, vec![Val::I32(1); n - 3]));
    });
    generate_exit_2(&p, &["tokenizer.ggml.token_type has 509 entries for 512 tokens"]);
    // BOS / EOS outside the vocabulary, in both tokenizer kinds (gpt2 BPE, SentencePiece).
    for src in ["tiny-llama.gguf", "tiny-spm.gguf"] {
        for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"] {
            let p = bad_gguf(src, &format!("id-{src}-{key}"), |g| {
                g.set(key, Val::U32(70000));
            });
            generate_exit_2(&p, &[&format!("{key} = 70000 is not a token id")]);
        }
    }
}

#[test]
fn hf_vocabulary_that_does_not_fit_the_model_is_exit_2() {
    // The config's BOS / EOS ids outside the vocabulary.
    for (key, v) in [("bos_token_id", serde_json::json!(512)), ("eos_token_id", serde_json::json!([2, 9999]))] {
        let d = hf_copy("tiny-llama", &format!("hf-{key}"));
        edit_json(&d.join("config.json"), |c| c[key] = v);
        generate_exit_2(&d, &["config.json", key, "is not a token id (vocab_size 512)"]);
    }
    // A tokenizer with ids the embedding has no row for.
    let d = hf_copy("tiny-llama", "hf-tok-too-big");
    edit_json(&d.join("tokenizer.json"), |t| {
        t["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
            "id": 512, "content": "<extra>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true
        }));
    });
    generate_exit_2(&d, &["tokenizer.json", "token id 512 (`<extra>`)", "vocab_size is 512"]);
    run_and_bisect_exit_2(&d, &["tokenizer.json", "token id 512"]);
}

// --- messages that say what is wrong -------------------------------------------------------------

#[test]
fn gguf_version_1_and_bad_head_counts_say_what_is_wrong() {
    // Version 1 read its counts as u32 and printed the misread bytes.
    let p = bad_gguf("tiny-llama.gguf", "v1", |g| g.version = 1);
    generate_exit_2(&p, &["GGUF version 1 is not supported", "re-convert"]);
    let p = bad_gguf("tiny-llama.gguf", "v-be", |g| g.version = 3u32.swap_bytes());
    generate_exit_2(&p, &["big-endian"]);
    // "partial RoPE" before, for both.
    let arch = Gguf::read(&fixture("tiny-llama.gguf")).arch();
    let hc = format!("{arch}.attention.head_count");
    let p = bad_gguf("tiny-llama.gguf", "heads0", |g| {
        g.set(&hc, Val::U32(0));
    });
    generate_exit_2(&p, &["head_count 0"]);
    let p = bad_gguf("tiny-llama.gguf", "heads3", |g| {
        g.set(&hc, Val::U32(3)).remove(&format!("{arch}.attention.key_length"));
    });
    generate_exit_2(&p, &["embedding_length 64 is not a multiple of head_count 3"]);
    // A key with control bytes is escaped in the message, never printed raw.
    let p = bad_gguf("tiny-llama.gguf", "ctrl-arch", |g| {
        g.set("general.architecture", Val::Str(b"ll\x1b[2Jama\x07".to_vec()));
    });
    generate_exit_2(&p, &["general.architecture", "\\u{1b}[2Jama\\u{7}", "not supported"]);
}

// --- issue 35: last round's POOR rows ------------------------------------------------------------

#[test]
fn gguf_embedding_length_zero_is_exit_2_naming_the_key() {
    // Was "partial RoPE (rope.dimension_count 16 != head_dim 0)".
    let arch = Gguf::read(&fixture("tiny-llama.gguf")).arch();
    let key = format!("{arch}.embedding_length");
    let p = bad_gguf("tiny-llama.gguf", "embd0", |g| {
        g.set(&key, Val::U32(0));
    });
    generate_exit_2(&p, &[&format!("{key} 0")]);
}

#[test]
fn an_empty_chat_template_is_exit_2_saying_it_rendered_nothing() {
    // Was "forward called with no tokens".
    let d = hf_copy("tiny-llama", "empty-template");
    edit_json(&d.join("tokenizer_config.json"), |v| v["chat_template"] = "".into());
    let m = d.to_str().unwrap();
    assert_exit_2(&["generate", "--model", m, "--chat", "hi", "-n", "2"], &[], &["encodes to no tokens", "chat template rendered nothing"]);
}

#[test]
fn a_lora_adapter_with_a_nan_is_exit_2_naming_the_tensor() {
    // Was exit 0 with an empty text (every logit NaN).
    let src = repo().join("snapshots/adapters/tiny-peft");
    let d = tmp("lora-nan").join("adapter");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(src.join("adapter_config.json"), d.join("adapter_config.json")).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    let target = owned.iter().position(|(n, d, ..)| n.contains("lora_B") && *d == safetensors::Dtype::F32).expect("a float32 B matrix");
    owned[target].3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let name = owned[target].0.clone();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        owned.iter().map(|(n, dt, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap())).collect();
    std::fs::write(d.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    assert_exit_2(
        &["generate", "--model", "tiny", "--prompt", "hi", "-n", "2", "--lora", d.to_str().unwrap()],
        &[],
        &[&name, "non-finite value", "adapter is corrupted"],
    );
}

#[test]
fn a_sentencepiece_token_type_outside_llama_cpps_is_exit_2() {
    for (tag, bad) in [("tt99", 99), ("ttneg", -1)] {
        let p = bad_gguf("tiny-spm.gguf", tag, |g| {
            let Some(Val::Arr(ty, items)) = g.get("tokenizer.ggml.token_type").cloned() else { panic!("token types") };
            let mut items = items;
            items[5] = Val::I32(bad);
            g.set("tokenizer.ggml.token_type", Val::Arr(ty, items));
        });
        generate_exit_2(&p, &[&format!("tokenizer.ggml.token_type[5] = {bad}"), "is not a token type"]);
    }
}

live_test! {
    /// Issue 35: a SentencePiece GGUF without its byte tokens `<0x00>`..`<0xFF>` made llama.cpp
    /// abort the process (tokcheck: SIGABRT 134, run: SIGSEGV 139); the llamacpp reference
    /// refuses it before handing it over (exit 2, the file and the missing tokens named).
    fn a_sentencepiece_gguf_without_byte_tokens_is_refused_before_llamacpp_sees_it() {
        let p = bad_gguf("tiny-spm.gguf", "spm-no-bytes", |g| {
            let Some(Val::Arr(ty, items)) = g.get("tokenizer.ggml.tokens").cloned() else { panic!("tokens") };
            let items = items
                .into_iter()
                .map(|v| match v {
                    Val::Str(s) if s.starts_with(b"<0x") && s.len() == 6 => Val::Str(format!("<b{}>", String::from_utf8_lossy(&s[3..5])).into_bytes()),
                    v => v,
                })
                .collect();
            g.set("tokenizer.ggml.tokens", Val::Arr(ty, items));
        });
        let m = p.to_str().unwrap();
        for args in [
            vec!["tokcheck", "--model", m, "--reference", "llamacpp"],
            vec!["run", "--model", m, "--reference", "llamacpp", "--prompt", "hi", "--steps", "2"],
        ] {
            assert_exit_2(&args, &[], &["lacks 256 of the 256 byte tokens", "llamacpp reference refuses it"]);
        }
    }
}
