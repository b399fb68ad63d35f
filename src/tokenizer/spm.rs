//! SentencePiece tokenizers (Llama 2 / TinyLlama style) from GGUF metadata, built as an
//! equivalent `tokenizer.json` for the `tokenizers` crate; and the `spm-space-prefix` fault
//! of the catalog, which lives in how such a tokenizer is built.
//!
//! llama.cpp's `llm_tokenizer_spm` (src/llama-vocab.cpp) tokenizes a piece of raw text so:
//! a space is put in front when `tokenizer.ggml.add_space_prefix` (default true) and the
//! text is the first fragment or follows a special token; every ' ' becomes `▁`; the text
//! is cut into UTF-8 characters, and the adjacent pair whose concatenation is a vocabulary
//! token with the highest score is merged, again and again (ties: the leftmost pair); a
//! symbol that is no token is written as its bytes' `<0xNN>` tokens. Control (type 3),
//! user-defined (4) and unknown (2) tokens are matched whole in the text first.
//!
//! The `tokenizers` equivalent: a BPE model with `byte_fallback`, its merges derived from the
//! scores as transformers' `generate_merges` does (every split of every token into two
//! tokens, ranked by the merged token's score, best first), a normalizer
//! `Prepend("▁") + Replace(" ", "▁")` (it runs on each fragment between added tokens, which
//! is llama.cpp's "after a special token" rule), no pre-tokenizer, the decoder
//! `Replace("▁", " ") + ByteFallback + Fuse + Strip(1 left)`, and a BOS (EOS) post-processor
//! from `tokenizer.ggml.add_bos_token` (default true, as llama.cpp) and `add_eos_token`.
//!
//! What it does not own: the gpt2 byte-level path ([`Tokenizer::from_gguf`]) and Hugging Face
//! directories, which bring their own `tokenizer.json` ([`Tokenizer::from_hf_dir_with`] applies
//! the fault to theirs).

use std::collections::HashMap;

use serde_json::{json, Value};

use super::Tokenizer;
use crate::error::{EngineError, Result};
use crate::weights::GgufFile;

/// SentencePiece's word-boundary mark, U+2581.
pub const SPIECE_UNDERLINE: &str = "\u{2581}";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// How a tokenizer is built beyond what its files say: the catalog's tokenizer fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizerOptions {
    /// The `spm-space-prefix` fault: SentencePiece's `▁` prefix is left out (GGUF: as if
    /// `add_space_prefix` were false; tokenizer.json: its `Prepend("▁")` normalizer removed,
    /// a `Metaspace` set to `prepend_scheme: never`). The decoder is left as it is.
    pub drop_space_prefix: bool,
}

/// Merges implied by a vocabulary with scores, as transformers' `generate_merges`
/// (tokenization_utils_base.py) derives them: for each token (in id order) every split into
/// two tokens (by characters), those of one token ordered by the ids of (left, right); then
/// all of them sorted, stably, by (the merged token's score, left length, right length),
/// highest first. A BPE that applies the lowest-ranked merge first then merges like
/// llama.cpp's highest-score-first SentencePiece loop.
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // (score, left chars, right chars, left, right), in generation order.
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = vec![];
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, piece) in tokens.iter().enumerate() {
        // A duplicated token is visited once (a Python dict keeps its first position).
        if !seen.insert(piece.as_str()) {
            continue;
        }
        // The score of the last duplicate (a Python dict keeps the last value).
        let score = scores[*ids.get(piece.as_str()).unwrap_or(&i)];
        let mut local = vec![];
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&il), Some(&ir)) = (ids.get(l), ids.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        merges.extend(local.into_iter().map(|(_, _, l, r)| (score, l.chars().count(), r.chars().count(), l, r)));
    }
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2))
    });
    merges.into_iter().map(|(_, _, _, l, r)| (l.to_string(), r.to_string())).collect()
}

/// The SentencePiece normalizer: `▁` for spaces, with a `▁` in front when `space_prefix`.
fn normalizer(space_prefix: bool) -> Value {
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE});
    if space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPIECE_UNDERLINE}, replace]})
    } else {
        replace
    }
}

/// Removes SentencePiece's `▁` prefix from a `tokenizer.json`: `Prepend` normalizers (alone or
/// in a `Sequence`) and a `Metaspace` pre-tokenizer's prepend (`prepend_scheme: never`, or
/// `add_prefix_space: false` in the older format). Returns whether there was one.
pub fn drop_space_prefix(tj: &mut Value) -> bool {
    fn in_normalizer(n: &mut Value) -> bool {
        match n.get("type").and_then(|t| t.as_str()) {
            Some("Prepend") => {
                *n = Value::Null;
                true
            }
            Some("Sequence") => {
                let Some(list) = n.get_mut("normalizers").and_then(|l| l.as_array_mut()) else { return false };
                let before = list.len();
                list.retain(|x| x.get("type").and_then(|t| t.as_str()) != Some("Prepend"));
                let mut found = list.len() != before;
                for x in list.iter_mut() {
                    found |= in_normalizer(x);
                }
                found
            }
            _ => false,
        }
    }
    fn in_pre_tokenizer(p: &mut Value) -> bool {
        match p.get("type").and_then(|t| t.as_str()) {
            Some("Metaspace") => {
                let Some(o) = p.as_object_mut() else { return false };
                let mut found = false;
                if let Some(s) = o.get("prepend_scheme") {
                    found = s.as_str() != Some("never");
                    o.insert("prepend_scheme".into(), json!("never"));
                }
                if let Some(a) = o.get("add_prefix_space") {
                    found |= a.as_bool() == Some(true);
                    o.insert("add_prefix_space".into(), json!(false));
                }
                found
            }
            Some("Sequence") => p
                .get_mut("pretokenizers")
                .and_then(|l| l.as_array_mut())
                .map(|l| l.iter_mut().fold(false, |f, x| in_pre_tokenizer(x) | f))
                .unwrap_or(false),
            _ => false,
        }
    }
    let mut found = false;
    if let Some(n) = tj.get_mut("normalizer") {
        found |= in_normalizer(n);
    }
    if let Some(p) = tj.get_mut("pre_tokenizer") {
        found |= in_pre_tokenizer(p);
    }
    found
}

impl Tokenizer {
    /// Builds the SentencePiece tokenizer a GGUF file describes (`tokenizer.ggml.model =
    /// llama`): `tokens`, `scores`, `token_type` (byte tokens `<0xNN>`, control, unknown,
    /// user-defined), `add_space_prefix`, `add_bos_token` / `add_eos_token`, and the BOS, EOS
    /// and unknown ids. See the module's text for how it maps onto llama.cpp's tokenizer.
    pub fn from_gguf_spm(g: &GgufFile, opts: TokenizerOptions) -> Result<Self> {
        let bad = |message: String| EngineError::Gguf { path: g.path.clone(), message };
        let tokens = g.md_str_array("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(bad("tokenizer.ggml.tokens is empty".into()));
        }
        let scores = g.md_f32_array("tokenizer.ggml.scores")?;
        if scores.len() != tokens.len() {
            return Err(bad(format!(
                "tokenizer.ggml.scores has {} entries for {} tokens (tokenizer.ggml.tokens)",
                scores.len(),
                tokens.len()
            )));
        }
        let types = if g.has("tokenizer.ggml.token_type") {
            let t = g.md_i32_array("tokenizer.ggml.token_type")?;
            if t.len() != tokens.len() {
                return Err(bad(format!("tokenizer.ggml.token_type has {} entries for {} tokens", t.len(), tokens.len())));
            }
            t
        } else {
            vec![1; tokens.len()]
        };
        let flag = |k: &str, default: bool| match g.content.metadata.get(k) {
            Some(v) => v.to_bool().map_err(|e| bad(format!("metadata {k}: {e}"))),
            None => Ok(default),
        };
        // llama.cpp's defaults for a SentencePiece vocabulary (llama_vocab::impl::load).
        let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true)?;
        let add_bos = flag("tokenizer.ggml.add_bos_token", true)?;
        let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;
        let opt_id = |k: &str| -> Result<Option<u32>> {
            let id = if g.has(k) { Some(g.md_u32(k)?) } else { None };
            match id {
                Some(i) if i as usize >= tokens.len() => Err(bad(format!("{k} = {i} is not a token id (vocabulary of {})", tokens.len()))),
                _ => Ok(id),
            }
        };
        let bos_id = opt_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = opt_id("tokenizer.ggml.eos_token_id")?;
        let unk_id = opt_id("tokenizer.ggml.unknown_token_id")?;
        let chat_template =
            if g.has("tokenizer.chat_template") { Some(g.md_str("tokenizer.chat_template")?.to_string()) } else { None };
        let name = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
        let space_prefix = add_space_prefix && !opts.drop_space_prefix;

        let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        if vocab.len() != tokens.len() {
            return Err(bad(format!(
                "tokenizer.ggml.tokens holds {} distinct tokens in {} entries (a token twice)",
                vocab.len(),
                tokens.len()
            )));
        }
        let merges: Vec<Value> = merges_from_scores(&tokens, &scores).into_iter().map(|(l, r)| json!([l, r])).collect();
        // llama.cpp matches unknown, control and user-defined tokens whole in the text.
        let added: Vec<Value> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED))
            .map(|(i, &t)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": t != TYPE_USER_DEFINED})
            })
            .collect();
        let special = |id: u32| {
            let t = &tokens[id as usize];
            (json!({"SpecialToken": {"id": t, "type_id": 0}}), (t.clone(), json!({"id": t, "ids": [id], "tokens": [t]})))
        };
        let bos = bos_id.filter(|_| add_bos).map(special);
        let eos = eos_id.filter(|_| add_eos).map(special);
        let post_processor = if bos.is_none() && eos.is_none() {
            Value::Null
        } else {
            let seq = |s: &str, t: u32| json!({"Sequence": {"id": s, "type_id": t}});
            let mut single = vec![];
            let mut pair = vec![];
            let mut specials = serde_json::Map::new();
            if let Some((p, (k, v))) = &bos {
                single.push(p.clone());
                pair.push(p.clone());
                specials.insert(k.clone(), v.clone());
            }
            single.push(seq("A", 0));
            pair.push(seq("A", 0));
            if let Some((p, _)) = &eos {
                single.push(p.clone());
                pair.push(p.clone());
            }
            if let Some((p, _)) = &bos {
                pair.push(p.clone());
            }
            pair.push(seq("B", 1));
            if let Some((p, (k, v))) = &eos {
                pair.push(p.clone());
                specials.insert(k.clone(), v.clone());
            }
            json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": normalizer(space_prefix),
            "pre_tokenizer": null,
            "post_processor": post_processor,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": name(unk_id), "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                      "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer =
            super::parse_tokenizer_json(&tj.to_string()).map_err(|e| bad(format!("tokenizer metadata (SentencePiece): {e}")))?;
        let description = format!(
            "GGUF tokenizer.ggml.model=llama: SentencePiece as BPE with byte fallback, merges from the scores, {}",
            match (add_space_prefix, space_prefix) {
                (true, true) => "▁ prefix",
                (true, false) => "▁ prefix DROPPED (fault spm-space-prefix)",
                (false, _) => "no ▁ prefix (add_space_prefix false)",
            }
        );
        Ok(Self {
            inner,
            chat_template,
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            source: g.path.display().to_string(),
            description,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn merges_are_ranked_by_the_merged_tokens_score_then_by_longer_left_parts() {
        let tokens = v(&["a", "b", "c", "ab", "bc", "abc"]);
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -0.5];
        let m = merges_from_scores(&tokens, &scores);
        let m: Vec<(&str, &str)> = m.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        // abc (-0.5): "ab"+"c" (left 2) before "a"+"bc"; then ab (-1), then bc (-2).
        assert_eq!(m, [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]);
    }

    #[test]
    fn the_fault_removes_prepend_normalizers_and_metaspace_prefixes() {
        let mut legacy = json!({"normalizer": normalizer(true), "pre_tokenizer": null});
        assert!(drop_space_prefix(&mut legacy));
        assert_eq!(legacy["normalizer"]["normalizers"].as_array().unwrap().len(), 1);
        assert!(!drop_space_prefix(&mut legacy), "nothing left to drop");
        let mut meta = json!({"normalizer": null, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}});
        assert!(drop_space_prefix(&mut meta));
        assert_eq!(meta["pre_tokenizer"]["prepend_scheme"], "never");
        let mut gpt2 = json!({"normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false}});
        assert!(!drop_space_prefix(&mut gpt2));
    }
}
