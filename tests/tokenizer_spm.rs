//! SentencePiece tokenizers (issue 17) on the committed tiny-spm fixture, without Python: the
//! tokenizer the engine builds from the GGUF's `tokenizer.ggml.*` (tokens, scores, token
//! types) must give the ids of the Hugging Face directory's `tokenizer.json` (converted from
//! the same `tokenizer.model` by transformers: merges from the vocabulary order, not the
//! scores), which `scripts/make_fixtures.py` checked against sentencepiece and llama.cpp.
//! And the `spm-space-prefix` fault acts in both.

use std::path::{Path, PathBuf};

use lockstep_engine::tokenizer::{merges_from_scores, TokenizerOptions};
use lockstep_engine::weights::GgufFile;
use lockstep_engine::{load, Faults, LoadOptions, Tokenizer};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/models").join(name)
}

fn gguf() -> Tokenizer {
    Tokenizer::load(&fixture("tiny-spm.gguf")).expect("the SentencePiece GGUF's tokenizer builds")
}

fn hf() -> Tokenizer {
    Tokenizer::load(&fixture("tiny-spm")).expect("the SentencePiece HF directory's tokenizer loads")
}

/// Strings that SentencePiece tokenizers get wrong.
const HARD: &[&str] = &[
    "The capital of France is",
    "The",
    " The",
    "  two leading spaces",
    "trailing spaces   ",
    "a  b   c\t\td\n\n\ne",
    "\n",
    " ",
    "   ",
    "digits 1234567890 3.14159 007",
    "naïve café résumé Ørsted",
    "Rust 🦀 rocks 🚀🔥👍🏽",
    "日本語のテキストと中文",
    "<s>",
    "<s>hello</s>",
    "a<s>b</s> c",
    "before<s> after </s>",
    "<unk> <0x41> ▁ ▁▁x",
    "[INST] What is the capital of France? [/INST]",
    "def f(x):\n\treturn x ** 2  # square\n",
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
];

#[test]
fn gguf_tokenizer_equals_the_hf_tokenizer_json_on_hard_strings() {
    let (g, h) = (gguf(), hf());
    for text in HARD {
        for special in [false, true] {
            let (a, b) = (g.encode(text, special).unwrap(), h.encode(text, special).unwrap());
            assert_eq!(a, b, "{text:?} (special tokens {special}): GGUF {a:?} vs tokenizer.json {b:?}");
        }
    }
    assert_eq!(g.vocab_size(), 512);
    assert_eq!((g.bos_id(), g.eos_id()), (Some(1), Some(2)));
    assert_eq!((h.bos_id(), h.eos_id()), (Some(1), Some(2)));
}

#[test]
fn the_is_one_token_after_the_space_prefix() {
    let g = gguf();
    let the = g.token_to_id("\u{2581}The").expect("▁The is in the vocabulary");
    assert_eq!(g.encode("The", false).unwrap(), [the]);
    // " The": the prefix ▁ and the text's own space: ▁ + ▁The.
    assert_eq!(g.encode(" The", false).unwrap(), [g.token_to_id("\u{2581}").unwrap(), the]);
    assert!(g.prepends_space().unwrap());
    assert!(!Tokenizer::load(&fixture("tiny-llama.gguf")).unwrap().prepends_space().unwrap(), "gpt2 BPE writes no ▁");
}

#[test]
fn the_bos_only_prompt_of_the_tinyllama_incident_is_one_token() {
    for t in [gguf(), hf()] {
        assert_eq!(t.encode("", true).unwrap(), [1], "{}", t.source);
        assert!(t.encode("", false).unwrap().is_empty(), "{}", t.source);
        assert!(t.adds_bos().unwrap() && !t.adds_eos().unwrap(), "{}", t.source);
    }
}

#[test]
fn unknown_characters_fall_back_to_byte_tokens_and_decode_back() {
    let g = gguf();
    let ids = g.encode("🦀", false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| g.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["\u{2581}", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]);
    for text in HARD.iter().filter(|t| !t.contains('<')) {
        let ids = g.encode(text, true).unwrap();
        assert_eq!(g.decode(&ids, true).unwrap(), *text, "{text:?} does not round-trip: {ids:?}");
    }
}

#[test]
fn control_tokens_in_text_are_matched_whole_and_followed_by_a_space_prefix() {
    let g = gguf();
    let ids = g.encode("a<s>b", false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| g.id_to_token(i).unwrap()).collect();
    // llama.cpp: a space prefix on every text fragment after a special token.
    assert_eq!(pieces, ["\u{2581}a", "<s>", "\u{2581}b"]);
}

#[test]
fn merges_follow_the_scores() {
    let g = GgufFile::open(&fixture("tiny-spm.gguf")).unwrap();
    let tokens = g.md_str_array("tokenizer.ggml.tokens").unwrap();
    let scores = g.md_f32_array("tokenizer.ggml.scores").unwrap();
    let merges = merges_from_scores(&tokens, &scores);
    let score = |t: &str| scores[tokens.iter().position(|x| x == t).unwrap()];
    assert!(!merges.is_empty());
    for w in merges.windows(2) {
        let (a, b) = (score(&format!("{}{}", w[0].0, w[0].1)), score(&format!("{}{}", w[1].0, w[1].1)));
        assert!(a >= b, "merge {:?} (score {a}) ranked before {:?} (score {b})", w[0], w[1]);
    }
}

#[test]
fn spm_space_prefix_fault_drops_the_prefix_in_both_origins() {
    let faults = Faults::parse("spm-space-prefix").unwrap();
    let opts = LoadOptions { faults, ..LoadOptions::default() };
    for path in [fixture("tiny-spm.gguf"), fixture("tiny-spm")] {
        let clean = load(&path, &LoadOptions::default()).unwrap();
        let broken = load(&path, &opts).unwrap();
        let (a, b) = (clean.encode_prompt("The capital", false).unwrap(), broken.encode_prompt("The capital", false).unwrap());
        assert_ne!(a, b, "{}: the fault changes nothing", path.display());
        let piece = |m: &lockstep_engine::LoadedModel, ids: &[u32]| m.tokenizer.id_to_token(ids[1]).unwrap();
        assert_eq!(piece(&clean, &a), "\u{2581}The");
        assert!(!piece(&broken, &b).starts_with('\u{2581}'), "{}: {:?}", path.display(), piece(&broken, &b));
        assert!(!broken.tokenizer.prepends_space().unwrap());
        // The words after the first keep their ▁ (only the prefix is dropped).
        assert_eq!(a[a.len() - 2..], b[b.len() - 2..]);
    }
    let g = GgufFile::open(&fixture("tiny-spm.gguf")).unwrap();
    let t = Tokenizer::from_gguf_with(&g, TokenizerOptions { drop_space_prefix: true }).unwrap();
    assert!(t.description.contains("DROPPED"), "{}", t.description);
}
