//! Text to token ids and back: the `tokenizers` crate for BPE, `minijinja` for chat
//! templates, configured like transformers' `apply_chat_template` (trim_blocks,
//! lstrip_blocks, Python string/dict methods, `raise_exception`, `bos_token` and
//! `eos_token` in the context).
//!
//! A Hugging Face directory provides `tokenizer.json` + `tokenizer_config.json` (or
//! `chat_template.jinja`); a GGUF file provides `tokenizer.ggml.*` metadata, from which
//! an equivalent `tokenizer.json` is built (see [`Tokenizer::from_gguf`]).

use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{EngineError, Result};
use crate::weights::GgufFile;

mod spm;
pub use spm::{drop_space_prefix, merges_from_scores, TokenizerOptions, SPIECE_UNDERLINE};

/// One message of a chat.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }

    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Where the tokenizer came from, for messages.
    pub source: String,
    /// How it was built (tokenizer.json, or the GGUF's `tokenizer.ggml.pre` and the
    /// pre-tokenizer chosen for it), for reports.
    pub description: String,
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// `bos_token` in tokenizer_config.json is a string or an AddedToken dict.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// The `tokenizer.ggml.pre` values [`gpt2_pre_tokenizer`] knows.
const KNOWN_PRE: &[&str] = &[
    "default", "gpt2", "gpt-2", "phi-2", "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "qwen2",
    "deepseek-r1-qwen", "llama-bpe", "llama3", "llama-v3",
];

/// The pre-tokenizer (tokenizers-crate JSON) of a byte-level BPE GGUF, from its
/// `tokenizer.ggml.pre`, with a short description; `None` for a value not known here.
/// The splits are llama.cpp's (`llama-vocab.cpp`, `llm_tokenizer_bpe`), written as the
/// `tokenizer.json` regexes they come from:
/// - `default`, `gpt-2` (and `phi-2`): GPT-2's `ByteLevel` split;
/// - `smollm` and the other types that split `\p{N}` one by one first: `Digits` + `ByteLevel`;
/// - `qwen2` (Qwen2/2.5, DeepSeek-R1 distills): Qwen2's regex, single digits, case-insensitive
///   contractions, newlines kept with the punctuation before them;
/// - `llama-bpe` / `llama3` / `llama-v3`: the same with digits in groups of up to three.
fn gpt2_pre_tokenizer(pre: &str) -> Option<(Value, &'static str)> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
    };
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]})
    };
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "phi-2" => (byte_level(true), "ByteLevel"),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => (
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "Digits(individual) + ByteLevel",
        ),
        "qwen2" | "deepseek-r1-qwen" => (split(QWEN2), "Qwen2 regex split + ByteLevel"),
        "llama-bpe" | "llama3" | "llama-v3" => (split(LLAMA3), "Llama 3 regex split + ByteLevel"),
        _ => return None,
    })
}

impl Tokenizer {
    /// The tokenizer of a model (a Hugging Face directory or a GGUF file) without its weights.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::from_hf_dir(path);
        }
        if !path.exists() {
            return Err(EngineError::io(path, "no such file or directory"));
        }
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// Loads `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` (if any)
    /// from a Hugging Face directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        Self::from_hf_dir_with(dir, TokenizerOptions::default())
    }

    /// [`Tokenizer::from_hf_dir`] with the tokenizer fault applied to `tokenizer.json` when
    /// `opts` asks for it (see [`TokenizerOptions`]).
    pub fn from_hf_dir_with(dir: &Path, opts: TokenizerOptions) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(EngineError::io(&tj, "missing (the model directory needs a tokenizer.json)"));
        }
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| EngineError::io(p, e));
        let tokenizer_json = read(&tj)?;
        let tc = dir.join("tokenizer_config.json");
        let tokenizer_config = if tc.is_file() { Some(read(&tc)?) } else { None };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() { Some(read(&jinja)?) } else { None };
        Self::from_hf_parts(dir, &tokenizer_json, tokenizer_config.as_deref(), chat_template, opts)
    }

    /// [`Tokenizer::from_hf_dir_with`] on the files' texts: `tokenizer.json`,
    /// `tokenizer_config.json` and `chat_template.jinja` (which wins over the config's
    /// template) when the directory has them. `dir` names the files in messages.
    /// Parses tokenizer.json. The tokenizers library panics on some malformed files
    /// (`expect("Helper")` in its decoder deserializer, found by the fuzz target `tokenizer`):
    /// that panic is caught here and becomes an error, without its message on stderr.
    pub fn from_hf_parts(
        dir: &Path,
        tokenizer_json: &str,
        tokenizer_config: Option<&str>,
        chat_template_file: Option<String>,
        opts: TokenizerOptions,
    ) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let cannot = |e: &dyn std::fmt::Display| EngineError::io(&tj, format!("cannot load tokenizer: {e}"));
        // The text is parsed as JSON first (a syntax error is reported as such), and the
        // tokenizer built from that JSON through parse_tokenizer_json: tokenizers 0.22 panics
        // (`expect("Helper")` in its decoder's Deserialize) on a malformed `decoder` object
        // instead of returning an error (found by the `tokenizer` fuzz target; seed
        // fuzz/corpus/tokenizer/regress-decoder-syntax-error.json).
        let mut v: Value = serde_json::from_str(tokenizer_json).map_err(|e| cannot(&e))?;
        if opts.drop_space_prefix {
            drop_space_prefix(&mut v);
        }
        check_template_processing(&v["post_processor"]).map_err(|e| cannot(&e))?;
        let inner: tokenizers::Tokenizer = parse_tokenizer_json(&v.to_string()).map_err(|e| cannot(&e))?;
        let mut chat_template = None;
        let (mut bos_token, mut eos_token) = (None, None);
        if let Some(text) = tokenizer_config {
            let tc = dir.join("tokenizer_config.json");
            let v: Value =
                serde_json::from_str(text).map_err(|e| EngineError::Config { path: tc, message: e.to_string() })?;
            bos_token = token_str(v.get("bos_token"));
            eos_token = token_str(v.get("eos_token"));
            chat_template = match v.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: use "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template").and_then(|x| x.as_str()))
                    .map(String::from),
                _ => None,
            };
        }
        if chat_template_file.is_some() {
            chat_template = chat_template_file;
        }
        Ok(Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            source: dir.display().to_string(),
            description: "tokenizer.json".into(),
        })
    }

    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model = gpt2`: byte-level
    /// BPE). The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` ([`gpt2_pre_tokenizer`]);
    /// a value it does not know is refused, not guessed.
    ///
    /// `tokenizer.ggml.model = llama` (SentencePiece) is built by [`Tokenizer::from_gguf_spm`].
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.md_str("tokenizer.ggml.model")?;
        if model == "llama" {
            return Self::from_gguf_spm(g, TokenizerOptions::default());
        }
        if model != "gpt2" {
            return Err(EngineError::Unsupported {
                path: g.path.clone(),
                message: format!(
                    "tokenizer.ggml.model {model:?} is not supported yet (only gpt2 byte-level BPE and llama SentencePiece)"
                ),
            });
        }
        let tokens = g.md_str_array("tokenizer.ggml.tokens")?;
        let merges = g.md_str_array("tokenizer.ggml.merges")?;
        let bad = |message: String| EngineError::Gguf { path: g.path.clone(), message };
        if tokens.is_empty() {
            return Err(bad("tokenizer.ggml.tokens is empty".into()));
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
        let pre = if g.has("tokenizer.ggml.pre") { g.md_str("tokenizer.ggml.pre")?.to_string() } else { "default".into() };
        let opt_id = |k: &str| -> Result<Option<u32>> {
            match if g.has(k) { Some(g.md_u32(k)?) } else { None } {
                Some(i) if i as usize >= tokens.len() => Err(bad(format!("{k} = {i} is not a token id (vocabulary of {})", tokens.len()))),
                id => Ok(id),
            }
        };
        let bos_id = opt_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = opt_id("tokenizer.ggml.eos_token_id")?;
        let add_bos = match g.content.metadata.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v.to_bool().unwrap_or(false),
            None => false,
        };
        let chat_template = if g.has("tokenizer.chat_template") {
            Some(g.md_str("tokenizer.chat_template")?.to_string())
        } else {
            None
        };

        let vocab: serde_json::Map<String, Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let pre_tokenizer = gpt2_pre_tokenizer(&pre).ok_or_else(|| EngineError::Unsupported {
            path: g.path.clone(),
            message: format!(
                "tokenizer.ggml.pre {pre:?} is not known to this engine (it knows {}); its split regex decides the \
                 token ids, so guessing one would give wrong ids silently",
                KNOWN_PRE.join(", ")
            ),
        })?;
        let description = format!("GGUF tokenizer.ggml.pre={pre}: {} pre-tokenizer", pre_tokenizer.1);
        let pre_tokenizer = pre_tokenizer.0;
        let post_processor = match (add_bos, bos_id) {
            (true, Some(b)) => {
                let bos = tokens.get(b as usize).cloned().unwrap_or_default();
                json!({"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {bos.clone(): {"id": bos, "ids": [b], "tokens": [bos]}}})
            }
            _ => Value::Null,
        };
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = parse_tokenizer_json(&tj.to_string())
            .map_err(|e| EngineError::Gguf { path: g.path.clone(), message: format!("tokenizer metadata: {e}") })?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Self {
            inner,
            chat_template,
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            source: g.path.display().to_string(),
            description,
        })
    }

    /// [`Tokenizer::from_gguf`] with the tokenizer fault applied when `opts` asks for it (it acts
    /// on SentencePiece vocabularies only).
    pub fn from_gguf_with(g: &GgufFile, opts: TokenizerOptions) -> Result<Self> {
        if g.md_str("tokenizer.ggml.model")? == "llama" {
            return Self::from_gguf_spm(g, opts);
        }
        Self::from_gguf(g)
    }

    /// Whether the tokenizer writes a word-boundary `▁` in front of a text (SentencePiece's
    /// space prefix), probed on "a".
    pub fn prepends_space(&self) -> Result<bool> {
        let ids = self.encode("a", false)?;
        Ok(ids.first().and_then(|&i| self.id_to_token(i)).is_some_and(|p| p.starts_with(SPIECE_UNDERLINE)))
    }

    /// Encodes `text`; `add_special_tokens` as in transformers (`tokenizer(text)` adds them,
    /// `apply_chat_template` does not).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // The library indexes maps it trusts its file to fill: a panic in it is the file's
        // fault, reported as an error (the known case is refused at load already).
        let enc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.encode(text, add_special_tokens)))
            .map_err(|_| EngineError::Tokenizer("the tokenizers library failed on this tokenizer.json (a malformed file)".into()))?
            .map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// The text of one token id (its piece), for tables.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The highest token id the tokenizer can produce (added tokens included).
    pub fn max_id(&self) -> Option<u32> {
        self.inner.get_vocab(true).values().copied().max()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the chat template like `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`.
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let src = self.chat_template.as_deref().ok_or_else(|| {
            EngineError::Template(format!("{} has no chat template; use a plain prompt instead", self.source))
        })?;
        render_chat_template(
            src,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or_default(),
            self.eos_token.as_deref().unwrap_or_default(),
        )
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Whether `encode(text, true)` puts a BOS in front (`add_bos_token`), probed on "a".
    pub fn adds_bos(&self) -> Result<bool> {
        let (with, bare) = (self.encode("a", true)?, self.encode("a", false)?);
        Ok(with.len() > bare.len() && self.bos_id().is_some_and(|b| with.first() == Some(&b)))
    }

    /// Whether `encode(text, true)` appends an EOS (`add_eos_token`), probed on "a".
    pub fn adds_eos(&self) -> Result<bool> {
        let (with, bare) = (self.encode("a", true)?, self.encode("a", false)?);
        Ok(with.len() > bare.len() && self.eos_id().is_some_and(|e| with.last() == Some(&e)))
    }

    /// Token ids of a conversation rendered by the chat template, encoded without extra
    /// special tokens.
    pub fn encode_messages(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Token ids of a one-turn chat, rendered then encoded without extra special tokens
    /// (what transformers' `apply_chat_template(..., tokenize=True)` returns).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, true)?;
        self.encode(&text, false)
    }
}

/// How much work one chat-template rendering may do, in minijinja's fuel units (about one
/// per instruction): a template comes with the model, so it is untrusted input, and
/// `{% for a in range(99999) %}{% for b in range(99999) %}` would otherwise run for hours.
/// Real templates are far below it (a long chat with ChatML needs a few thousand).
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Renders the chat template `src` like transformers' `apply_chat_template(messages,
/// tokenize=False, add_generation_prompt=...)`, within [`TEMPLATE_FUEL`].
pub fn render_chat_template(
    src: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    let mut syntax = minijinja::syntax::SyntaxConfig::builder();
    syntax.trim_blocks(true).lstrip_blocks(true);
    env.set_syntax(syntax.build().map_err(|e| EngineError::Template(e.to_string()))?);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let tmpl = env.template_from_str(src).map_err(|e| EngineError::Template(format!("{e:#}")))?;
    let ctx = minijinja::context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    tmpl.render(ctx).map_err(|e| EngineError::Template(format!("{e:#}")))
}

/// `tokenizer_json.parse::<tokenizers::Tokenizer>()`, with a panic of the library an error.
pub(crate) fn parse_tokenizer_json(text: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>());
    std::panic::set_hook(quiet);
    match r {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            Err(format!("malformed tokenizer.json (the tokenizers library could not read it: {msg})"))
        }
    }
}

/// A `TemplateProcessing` post-processor (alone or in a `Sequence`) may only name special
/// tokens its `special_tokens` define: tokenizers 0.22 loads such a file and then panics when
/// it encodes ("no entry found for key", processors/template.rs; found by the `tokenizer`
/// fuzz target, seed fuzz/corpus/tokenizer/regress-template-special-token.json).
fn check_template_processing(pp: &Value) -> std::result::Result<(), String> {
    if let Some(list) = pp.get("processors").and_then(Value::as_array) {
        return list.iter().try_for_each(check_template_processing);
    }
    if pp.get("type").and_then(Value::as_str) != Some("TemplateProcessing") {
        return Ok(());
    }
    let defined = pp.get("special_tokens").and_then(Value::as_object);
    for which in ["single", "pair"] {
        for piece in pp.get(which).and_then(Value::as_array).into_iter().flatten() {
            if let Some(id) = piece.get("SpecialToken").and_then(|t| t.get("id")).and_then(Value::as_str) {
                if !defined.is_some_and(|d| d.contains_key(id)) {
                    return Err(format!(
                        "post_processor: its {which} template uses the special token {id:?}, which its special_tokens do not define"
                    ));
                }
            }
        }
    }
    Ok(())
}
