//! `lockstep tokcheck`: the engine's tokenizer and chat template against each reference's.
//!
//! A built-in corpus of hard strings (unicode, emoji, CJK, digit runs, whitespace runs,
//! code, special tokens written as text, the empty string), plus an optional corpus file,
//! is encoded by the engine and by every reference (without special tokens); the first
//! mismatch per string is reported with ids and pieces. Then BOS/EOS handling
//! (`add_bos_token`, the ids, a probe encoded with special tokens) and a multi-turn
//! conversation through each side's chat template (rendered text and ids).
//!
//! A string where the engine agrees with one reference and another reference differs is a
//! **reference disagreement**: reported, with the references named, but not an engine
//! failure (e.g. transformers builds SmolLM2's GGUF tokenizer without the `smollm` digit
//! split that the engine and llama.cpp apply; docs/traps.md). A string where the engine
//! differs from every reference is a mismatch (exit 1).
//!
//! References load only their tokenizer side for this (`load_tokenizer` in each module:
//! no weights).

use std::fmt::Write as _;
use std::path::Path;

use lockstep_engine::{ChatMessage, Tokenizer};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::HarnessError;
use crate::results::checks::TextDiff;
use crate::reference::pycall::{call_json, call_str};
use crate::reference::python::{ensure_python};
use crate::reference::pycall::{py_err};
use crate::reference::{Capability, RefSpec};

/// (label, text): strings that tokenizers get wrong.
pub const CORPUS: &[(&str, &str)] = &[
    ("empty", ""),
    ("ascii", "Hello, world!"),
    ("leading space", " leading space"),
    ("accents", "naïve café résumé Ørsted Ångström"),
    ("combining mark", "e\u{301} a\u{308} n\u{303}"),
    ("emoji", "Rust 🦀 rocks 🚀🔥👍🏽"),
    ("zwj emoji", "👨\u{200d}👩\u{200d}👧\u{200d}👦 🏳\u{fe0f}\u{200d}🌈"),
    ("CJK", "日本語のテキストと中文文本，还有한국어"),
    ("RTL", "مرحبا بالعالم שלום עולם"),
    ("digit runs", "1234567890 2024 3.14159 1,000,000 007"),
    ("digits in words", "abc123def x2 v1.2.3 0xFF 4K 1st 22nd"),
    ("space before digits", "in 1999 and  42 or\t7"),
    ("unicode digits", "٣٤٥ ½ ² Ⅻ ⑦ १२३ ７８９"),
    ("whitespace runs", "a  b   c\t\td\n\n\ne    "),
    ("only whitespace", "   \n\t "),
    ("line endings", "line1\r\nline2\rline3\n"),
    ("code", "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n"),
    ("python", "def f(x):\n\treturn x ** 2  # square\n"),
    ("json", "{\"key\": [1, 2.5e-3, null, true], \"k2\": \"v\"}"),
    ("special tokens as text", "<|im_start|>user\nhi<|im_end|>\n"),
    ("special token mid-word", "before<|endoftext|>after"),
    ("near-special text", "<|im_start |> <|notatoken|> <|im_end"),
    ("contractions", "I'm can't won't they'll you've she'd It'S"),
    ("punctuation runs", "!!!??? ... --- *** ~~~ ''' \"\"\""),
    ("url", "https://example.com/path?q=1&x=%20#frag"),
    ("long word", "Pneumonoultramicroscopicsilicovolcanoconiosis"),
    ("camel case", "HTTPServer getHTTPResponseCode XMLHttpRequest"),
    ("control chars", "a\u{0}b\u{7}c\u{1b}[0m"),
    ("odd spaces", "non\u{a0}breaking\u{2009}thin\u{200b}zero\u{3000}ideographic"),
    ("repeated char", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("math", "∑ᵢ xᵢ² ≤ ∞ → ∀x∈ℝ, α+β=γ"),
];

/// The conversation rendered through both chat templates.
pub fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("user", "Hi! What's 2+2?"),
        ChatMessage::new("assistant", "2+2 = 4."),
        ChatMessage::new("user", "And in Japanese? 日本語で 🙏"),
        ChatMessage::new("assistant", "四です。"),
        ChatMessage::new("user", "Thanks.\n  Bye"),
    ]
}

/// Reads a corpus file: a `.json` file holds an array of strings; any other file one
/// string per line, with `\n`, `\t`, `\r` and `\\` escapes decoded.
pub fn read_corpus(path: &Path) -> Result<Vec<(String, String)>, HarnessError> {
    let io = |m: String| HarnessError::Io { path: path.display().to_string(), message: m };
    let text = std::fs::read_to_string(path).map_err(|e| io(format!("cannot read the corpus: {e}")))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if path.extension().is_some_and(|e| e == "json") {
        let v: Vec<String> = serde_json::from_str(&text)
            .map_err(|e| io(format!("a .json corpus must be an array of strings: {e}")))?;
        return Ok(v.into_iter().enumerate().map(|(i, s)| (format!("{name}[{i}]"), s)).collect());
    }
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let mut s = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                s.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => s.push('\n'),
                Some('t') => s.push('\t'),
                Some('r') => s.push('\r'),
                Some('\\') => s.push('\\'),
                Some(o) => {
                    s.push('\\');
                    s.push(o);
                }
                None => s.push('\\'),
            }
        }
        out.push((format!("{name}:{}", i + 1), s));
    }
    Ok(out)
}

/// A reference's tokenizer side (from `load_tokenizer`, or a loaded reference object).
pub struct TokSide {
    pub name: String,
    obj: Py<PyAny>,
    pub info: Value,
}

impl TokSide {
    /// `references/<module>.py`'s `load_tokenizer(model)`.
    pub fn load(spec: &RefSpec, model: &Path) -> Result<TokSide, HarnessError> {
        ensure_python()?;
        let name = spec.label();
        let obj = Python::attach(|py| -> Result<Py<PyAny>, HarnessError> {
            let m = py
                .import(spec.module)
                .map_err(|e| py_err(py, e, format!("the {name} reference: importing references/{}.py", spec.module)))?;
            let kw = PyDict::new(py);
            let o = m
                .call_method("load_tokenizer", (model.to_string_lossy().as_ref(),), Some(&kw))
                .map_err(|e| py_err(py, e, format!("loading the tokenizer of {} with the {name} reference", model.display())))?;
            Ok(o.unbind())
        })?;
        let info = call_json(&obj, &name, "token_info", &[])?;
        Ok(TokSide { name, obj, info })
    }

    pub fn encode(&self, texts: &[&str], add_special: bool) -> Result<Vec<Vec<u32>>, HarnessError> {
        let v = call_json(&self.obj, &self.name, "tokenize", &[json!(texts), json!(add_special)])?;
        serde_json::from_value(v).map_err(|e| HarnessError::Python(format!("{}.tokenize(): {e}", self.name)))
    }

    pub fn pieces(&self, ids: &[u32]) -> Result<Vec<String>, HarnessError> {
        let v = call_json(&self.obj, &self.name, "pieces", &[json!(ids)])?;
        let v: Vec<Option<String>> = serde_json::from_value(v).map_err(|e| HarnessError::Python(format!("{}.pieces(): {e}", self.name)))?;
        Ok(v.into_iter().map(|p| p.unwrap_or_else(|| "?".into())).collect())
    }

    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, HarnessError> {
        call_str(&self.obj, &self.name, "render_chat", &[json!(messages), json!(add_generation_prompt)])
    }

    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>, HarnessError> {
        let v = call_json(&self.obj, &self.name, "encode_chat_messages", &[json!(messages), json!(add_generation_prompt)])?;
        serde_json::from_value(v).map_err(|e| HarnessError::Python(format!("{}.encode_chat_messages(): {e}", self.name)))
    }
}

/// The tokenizer sides for `specs`. For a GGUF file, llama.cpp's tokenizer of that file (the
/// format's own implementation) is added as a witness when it is not among them and can be
/// loaded, so that a reference that builds the GGUF tokenizer differently (transformers'
/// GGUF loader ignores `tokenizer.ggml.pre`) shows as a reference disagreement rather than
/// as an engine mismatch. Returns the sides and notes for the report.
pub fn load_sides(specs: &[RefSpec], model: &Path) -> Result<(Vec<TokSide>, Vec<String>), HarnessError> {
    let mut sides = specs.iter().map(|s| TokSide::load(s, model)).collect::<Result<Vec<_>, _>>()?;
    let mut notes = vec![];
    let first_line = |e: &HarnessError| e.to_string().lines().next().unwrap_or("").to_string();
    let gguf_tokenizer = |s: &RefSpec| s.declaration().is_ok_and(|d| d.declares(Capability::GgufTokenizer));
    if model.is_file() && !specs.iter().any(gguf_tokenizer) {
        // The first known reference whose tokenizer of a GGUF is the format's own; a module
        // that cannot be imported says why there is none.
        let mut witness = Err("no reference declares the gguf_tokenizer capability".to_string());
        for (name, _) in crate::reference::REFERENCES {
            let spec = RefSpec::parse(name)?;
            match spec.declaration() {
                Ok(d) if d.declares(Capability::GgufTokenizer) => {
                    witness = Ok(spec);
                    break;
                }
                Ok(_) => {}
                Err(e) => witness = Err(format!("the {name} reference could not be imported: {}", first_line(&e))),
            }
        }
        let loaded = witness.and_then(|spec| match TokSide::load(&spec, model) {
            Ok(w) => Ok((spec, w)),
            Err(e) => Err(format!("the {} reference's tokenizer could not be loaded: {}", spec.name, first_line(&e))),
        });
        match loaded {
            Ok((spec, mut w)) => {
                let n = &spec.name;
                w.name = format!("{n}(witness)");
                notes.push(format!(
                    "{n}(witness): the {n} reference's tokenizer of the GGUF (the format's own), added for GGUF files \
                     (--reference did not name {n})"
                ));
                sides.push(w);
            }
            Err(why) => notes.push(format!("no GGUF witness ({why})")),
        }
    }
    Ok((sides, notes))
}

/// The first position where two id sequences part, with a few tokens of each from there.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub reference: String,
    pub index: usize,
    /// (id, piece) from `index` on, up to 4.
    pub engine: Vec<(u32, String)>,
    pub theirs: Vec<(u32, String)>,
    pub engine_len: usize,
    pub reference_len: usize,
}

pub fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

fn mismatch(tok: &Tokenizer, side: &TokSide, ours: &[u32], theirs: &[u32]) -> Result<Option<Mismatch>, HarnessError> {
    let Some(i) = first_difference(ours, theirs) else { return Ok(None) };
    let take = |ids: &[u32]| ids.iter().skip(i).take(4).copied().collect::<Vec<u32>>();
    let e = take(ours);
    let t = take(theirs);
    let tp = side.pieces(&t)?;
    Ok(Some(Mismatch {
        reference: side.name.clone(),
        index: i,
        engine: e.iter().map(|&id| (id, tok.id_to_token(id).unwrap_or_else(|| "?".into()))).collect(),
        theirs: t.into_iter().zip(tp).collect(),
        engine_len: ours.len(),
        reference_len: theirs.len(),
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every reference has the engine's ids.
    Agree,
    /// The engine agrees with at least one reference; another one differs.
    ReferencesDisagree,
    /// The engine differs from every reference.
    Mismatch,
}

#[derive(Debug, Clone, Serialize)]
pub struct StringResult {
    pub label: String,
    pub text: String,
    pub engine_ids: Vec<u32>,
    /// One per reference: `None` when it agrees with the engine.
    pub mismatches: Vec<Option<Mismatch>>,
    pub outcome: Outcome,
}

fn outcome(m: &[Option<Mismatch>]) -> Outcome {
    if m.iter().all(|x| x.is_none()) {
        Outcome::Agree
    } else if m.iter().any(|x| x.is_none()) {
        Outcome::ReferencesDisagree
    } else {
        Outcome::Mismatch
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SpecialRow {
    pub name: &'static str,
    pub engine: String,
    pub references: Vec<String>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize)]
pub struct TemplateResult {
    pub messages: usize,
    pub engine_text: String,
    pub engine_tokens: usize,
    /// Per reference: the first differing character (None: identical text) with context.
    pub text: Vec<Option<TextDiff>>,
    pub ids: Vec<Option<Mismatch>>,
    pub outcome: Outcome,
}

/// The first differing character of two texts, with 30 characters of each from a little before it.
pub fn text_diff(reference: &str, ours: &str, theirs: &str) -> Option<TextDiff> {
    if ours == theirs {
        return None;
    }
    let a: Vec<char> = ours.chars().collect();
    let b: Vec<char> = theirs.chars().collect();
    let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    let from = i.saturating_sub(10);
    let snip = |v: &[char]| v.iter().skip(from).take(40).collect::<String>();
    Some(TextDiff { reference: reference.to_string(), char_index: i, engine: snip(&a), theirs: snip(&b) })
}

#[derive(Debug, Clone, Serialize)]
pub struct TokcheckResult {
    pub model: String,
    pub notes: Vec<String>,
    pub engine_tokenizer: String,
    pub references: Vec<(String, String)>,
    pub strings: Vec<StringResult>,
    pub special: Vec<SpecialRow>,
    pub template: Option<TemplateResult>,
    pub mismatches: usize,
    pub reference_disagreements: usize,
    pub pass: bool,
}

fn row(name: &'static str, engine: String, refs: Vec<String>) -> SpecialRow {
    let m: Vec<Option<Mismatch>> =
        refs.iter().map(|r| (*r != engine).then(|| Mismatch { reference: String::new(), index: 0, engine: vec![], theirs: vec![], engine_len: 0, reference_len: 0 })).collect();
    SpecialRow { name, engine, references: refs, outcome: outcome(&m) }
}

/// Runs every check. `corpus` is the built-in corpus plus the file's strings.
pub fn run(model: &Path, tok: &Tokenizer, sides: &[TokSide], notes: Vec<String>, corpus: &[(String, String)]) -> Result<TokcheckResult, HarnessError> {
    let texts: Vec<&str> = corpus.iter().map(|(_, t)| t.as_str()).collect();
    let theirs: Vec<Vec<Vec<u32>>> = sides.iter().map(|s| s.encode(&texts, false)).collect::<Result<_, _>>()?;
    let mut strings = vec![];
    for (k, (label, text)) in corpus.iter().enumerate() {
        let ours = tok.encode(text, false)?;
        let mut mm = vec![];
        for (j, s) in sides.iter().enumerate() {
            mm.push(mismatch(tok, s, &ours, &theirs[j][k])?);
        }
        strings.push(StringResult { label: label.clone(), text: text.clone(), engine_ids: ours, outcome: outcome(&mm), mismatches: mm });
    }

    // BOS/EOS handling.
    let info = |s: &TokSide, k: &str| s.info.get(k).cloned().unwrap_or(Value::Null);
    let idtxt = |id: Value, t: Value| match (id.as_u64(), t.as_str()) {
        (Some(i), Some(t)) => format!("{i} {t:?}"),
        (Some(i), None) => i.to_string(),
        _ => "none".into(),
    };
    let mut special = vec![];
    special.push(row(
        "bos",
        match (tok.bos_id(), &tok.bos_token) {
            (Some(i), Some(t)) => format!("{i} {t:?}"),
            _ => "none".into(),
        },
        sides.iter().map(|s| idtxt(info(s, "bos_id"), info(s, "bos_token"))).collect(),
    ));
    special.push(row(
        "eos",
        match (tok.eos_id(), &tok.eos_token) {
            (Some(i), Some(t)) => format!("{i} {t:?}"),
            _ => "none".into(),
        },
        sides.iter().map(|s| idtxt(info(s, "eos_id"), info(s, "eos_token"))).collect(),
    ));
    special.push(row("add_bos_token", tok.adds_bos()?.to_string(), sides.iter().map(|s| info(s, "add_bos").to_string()).collect()));
    special.push(row("add_eos_token", tok.adds_eos()?.to_string(), sides.iter().map(|s| info(s, "add_eos").to_string()).collect()));
    let probe = "Hello world";
    let ours = tok.encode(probe, true)?;
    let with_special: Vec<Vec<u32>> = sides.iter().map(|s| s.encode(&[probe], true).map(|mut v| v.remove(0))).collect::<Result<_, _>>()?;
    special.push(row("\"Hello world\" with special tokens", format!("{ours:?}"), with_special.iter().map(|v| format!("{v:?}")).collect()));

    // The chat template, on a multi-turn conversation.
    let template = if tok.chat_template.is_some() {
        let msgs = conversation();
        let engine_text = tok.render_chat(&msgs, true)?;
        let engine_ids = tok.encode_messages(&msgs, true)?;
        let mut text = vec![];
        let mut ids = vec![];
        for s in sides {
            let t = s.render_chat(&msgs, true)?;
            text.push(text_diff(&s.name, &engine_text, &t));
            let theirs = s.encode_chat(&msgs, true)?;
            ids.push(mismatch(tok, s, &engine_ids, &theirs)?);
        }
        let both: Vec<Option<Mismatch>> = text
            .iter()
            .zip(&ids)
            .map(|(t, i)| if t.is_some() || i.is_some() { Some(i.clone().unwrap_or(Mismatch { reference: String::new(), index: 0, engine: vec![], theirs: vec![], engine_len: 0, reference_len: 0 })) } else { None })
            .collect();
        Some(TemplateResult { messages: msgs.len(), engine_tokens: engine_ids.len(), engine_text, outcome: outcome(&both), text, ids })
    } else {
        None
    };

    let outcomes = strings.iter().map(|s| s.outcome).chain(special.iter().map(|s| s.outcome)).chain(template.iter().map(|t| t.outcome));
    let (mut mismatches, mut disagreements) = (0, 0);
    for o in outcomes {
        match o {
            Outcome::Mismatch => mismatches += 1,
            Outcome::ReferencesDisagree => disagreements += 1,
            Outcome::Agree => {}
        }
    }
    Ok(TokcheckResult {
        model: model.display().to_string(),
        notes,
        engine_tokenizer: format!("tokenizers (Rust), {} ({})", tok.description, tok.source),
        references: sides.iter().map(|s| (s.name.clone(), info(s, "tokenizer").as_str().unwrap_or("?").to_string())).collect(),
        strings,
        special,
        template,
        mismatches,
        reference_disagreements: disagreements,
        pass: mismatches == 0,
    })
}

fn show(s: &str, n: usize) -> String {
    let d = format!("{s:?}");
    if d.chars().count() > n {
        format!("{}…", d.chars().take(n - 1).collect::<String>())
    } else {
        d
    }
}

fn show_tokens(v: &[(u32, String)]) -> String {
    if v.is_empty() {
        return "(end)".into();
    }
    v.iter().map(|(i, p)| format!("{i} {p:?}")).collect::<Vec<_>>().join(", ")
}

pub fn render(r: &TokcheckResult) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "lockstep tokcheck");
    let _ = writeln!(o, "  model      {}", r.model);
    let _ = writeln!(o, "  engine     {}", r.engine_tokenizer);
    for (n, what) in &r.references {
        let _ = writeln!(o, "  reference  {n}: {what}");
    }
    for n in &r.notes {
        let _ = writeln!(o, "  note       {n}");
    }
    let names: Vec<&str> = r.references.iter().map(|(n, _)| n.as_str()).collect();
    let cw = names.iter().map(|n| n.len()).max().unwrap_or(8).max(10);
    let _ = writeln!(o, "\nstrings ({}), encoded without special tokens:", r.strings.len());
    let mut h = format!("  {:<24} {:>6}", "string", "tokens");
    for n in &names {
        h.push_str(&format!("  {n:<cw$}"));
    }
    let _ = writeln!(o, "{}", h.trim_end());
    for s in &r.strings {
        let mut line = format!("  {:<24} {:>6}", show_label(&s.label), s.engine_ids.len());
        for m in &s.mismatches {
            let cell = match m {
                None => "=".to_string(),
                Some(m) => format!("≠ at {}", m.index),
            };
            line.push_str(&format!("  {cell:<cw$}"));
        }
        match s.outcome {
            Outcome::Agree => {}
            Outcome::ReferencesDisagree => line.push_str("  references disagree"),
            Outcome::Mismatch => line.push_str("  MISMATCH"),
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
    let firsts: Vec<_> = r.strings.iter().filter(|s| s.outcome != Outcome::Agree).collect();
    if !firsts.is_empty() {
        let _ = writeln!(o, "\nfirst mismatch per string (id and piece from the first differing token):");
        for s in firsts {
            let _ = writeln!(o, "  {} {}", show_label(&s.label), show(&s.text, 60));
            let agree: Vec<&str> = s.mismatches.iter().zip(&names).filter(|(m, _)| m.is_none()).map(|(_, n)| *n).collect();
            // References with the same ids (e.g. transformers and mlx share a tokenizer) once.
            let mut shown: Vec<(&Mismatch, Vec<&str>)> = vec![];
            for (m, n) in s.mismatches.iter().zip(&names) {
                let Some(m) = m else { continue };
                match shown.iter_mut().find(|(x, _)| x.index == m.index && x.theirs == m.theirs && x.reference_len == m.reference_len) {
                    Some((_, ns)) => ns.push(n),
                    None => shown.push((m, vec![n])),
                }
            }
            for (m, ns) in shown {
                let _ = writeln!(o, "    token {}: engine {} ({} tokens)", m.index, show_tokens(&m.engine), m.engine_len);
                let _ = writeln!(o, "    {:>w$}: {} ({} tokens)", ns.join(", "), show_tokens(&m.theirs), m.reference_len, w = 6 + m.index.to_string().len() + 7);
            }
            if !agree.is_empty() {
                let _ = writeln!(o, "    the engine agrees with {}", agree.join(", "));
            }
        }
    }
    let _ = writeln!(o, "\nspecial tokens:");
    let ew = r.special.iter().map(|s| s.engine.chars().count()).max().unwrap_or(6).max(6);
    let rws: Vec<usize> = (0..names.len())
        .map(|i| r.special.iter().map(|s| s.references[i].chars().count() + 1).max().unwrap_or(0).max(names[i].len()))
        .collect();
    let mut h = format!("  {:<34} {:<ew$}", "", "engine");
    for (i, n) in names.iter().enumerate() {
        h.push_str(&format!("  {n:<w$}", w = rws[i]));
    }
    let _ = writeln!(o, "{}", h.trim_end());
    for s in &r.special {
        let mut line = format!("  {:<34} {:<ew$}", s.name, s.engine);
        for (i, v) in s.references.iter().enumerate() {
            let cell = format!("{}{v}", if *v == s.engine { "" } else { "*" });
            line.push_str(&format!("  {cell:<w$}", w = rws[i]));
        }
        let mut line = line.trim_end().to_string();
        if s.outcome != Outcome::Agree {
            line.push_str(if s.outcome == Outcome::Mismatch { "  MISMATCH" } else { "  references disagree" });
        }
        let _ = writeln!(o, "{line}");
    }
    match &r.template {
        None => {
            let _ = writeln!(o, "\nchat template: the engine's tokenizer has none (not compared)");
        }
        Some(t) => {
            let _ = writeln!(o, "\nchat template, {} messages + generation prompt ({} chars, {} tokens on the engine):", t.messages, t.engine_text.chars().count(), t.engine_tokens);
            for (i, n) in names.iter().enumerate() {
                let text = match &t.text[i] {
                    None => "text identical".to_string(),
                    Some(d) => format!("text differs at char {}: engine {:?} vs {:?}", d.char_index, d.engine, d.theirs),
                };
                let ids = match &t.ids[i] {
                    None => "ids identical".to_string(),
                    Some(m) => format!("ids differ at token {}: engine {} vs {}", m.index, show_tokens(&m.engine), show_tokens(&m.theirs)),
                };
                let _ = writeln!(o, "  {n:<cw$}  {text}; {ids}");
            }
        }
    }
    let _ = writeln!(o);
    if r.pass {
        let _ = writeln!(
            o,
            "verdict: PASS ({} strings, special tokens and the chat template agree{})",
            r.strings.len(),
            if r.reference_disagreements > 0 {
                format!("; {} check(s) where the references disagree with each other and the engine agrees with one of them", r.reference_disagreements)
            } else {
                String::new()
            }
        );
    } else {
        let _ = writeln!(o, "verdict: MISMATCH ({} check(s) where the engine differs from every reference)", r.mismatches);
    }
    o
}

fn show_label(l: &str) -> String {
    if l.chars().count() > 24 {
        format!("{}…", l.chars().take(23).collect::<String>())
    } else {
        l.to_string()
    }
}
