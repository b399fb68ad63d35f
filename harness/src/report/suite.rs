//! Report suites: `scripts/suites/*.toml`, the matrix of cases `lockstep report` runs.
//!
//! This module owns the file format and its validation (names, weights modes, samplers,
//! tolerance profiles, the matrix expansion); running the cases is `crate::report::nightly`.
//!
//! ```toml
//! [suite]
//! name = "nightly"
//! about = "free text"
//!
//! [[case]]                 # one case, spelled out
//! name = "tiny-hf-chat"    # lowercase letters, digits, `-`, `_`, `.`
//! model = "tiny"           # a --model argument: alias or path
//! references = ["transformers", "mlx"]
//! weights = "default"      # default | quantized | dequant
//! chat = "What is the capital of France?"   # or prompt = "...", or prompt_file = "PATH"
//!                          # (a plain prompt read from PATH, relative to the suite's file)
//! sampler = "temp=0.8,top_p=0.95,seed=0"     # omitted: greedy
//! steps = 12
//! tolerance = "default"    # default | strict (a drift counts as a divergence)
//! inject = "rope-theta"    # optional: engine faults (`lockstep faults`)
//! lora = "path/to/adapter" # a LoRA adapter on every side (relative: to the working directory, else lockstep's files: snapshots/adapters/...)
//! expect = "pass"          # pass (default) | diverged: what the case is meant to show
//!
//! [[matrix]]               # the cross product of its lists, one case per combination
//! name = "smollm2"         # case names: NAME-MODEL-WEIGHTS-ADAPTER-PROMPT-SAMPLER, each
//!                          # part only where its list has more than one entry
//! models = ["smollm2"]
//! references = ["transformers", "llamacpp"]   # not expanded: every case runs all of them
//! weights = ["quantized", "dequant"]
//! prompts = [{ name = "capital", chat = "What is the capital of France?" }]
//! samplers = [{ name = "greedy" }, { name = "t08", spec = "temp=0.8,top_p=0.95,seed=0" }]
//! adapters = [{ name = "none" }]               # LoRA adapters: { name, lora = PATH }; "none": the base model
//! steps = 16
//! tolerance = "default"
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lockstep::options::Prompt;
use crate::error::HarnessError;

/// Tolerance profiles a case may name.
pub const PROFILES: &[&str] = &["default", "strict"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    suite: SuiteHeader,
    #[serde(rename = "case", default)]
    cases: Vec<CaseDef>,
    #[serde(default)]
    matrix: Vec<MatrixDef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SuiteHeader {
    pub name: String,
    #[serde(default)]
    pub about: String,
}

/// One case of a suite: everything `lockstep run` needs, plus how to judge it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaseDef {
    pub name: String,
    pub model: String,
    pub references: Vec<String>,
    #[serde(default = "default_str")]
    pub weights: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<String>,
    /// A plain prompt read from this file (relative to the suite's file); `prompt` holds its
    /// text once the suite is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    pub steps: usize,
    #[serde(default = "default_str")]
    pub tolerance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
    #[serde(default = "default_expect")]
    pub expect: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub about: String,
}

fn default_str() -> String {
    "default".into()
}

fn default_expect() -> String {
    "pass".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixDef {
    name: String,
    models: Vec<String>,
    references: Vec<String>,
    #[serde(default = "default_weights_list")]
    weights: Vec<String>,
    prompts: Vec<MatrixPrompt>,
    #[serde(default = "default_samplers")]
    samplers: Vec<MatrixSampler>,
    #[serde(default = "default_adapters")]
    adapters: Vec<MatrixAdapter>,
    steps: usize,
    #[serde(default = "default_str")]
    tolerance: String,
    #[serde(default)]
    about: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixPrompt {
    name: String,
    prompt: Option<String>,
    chat: Option<String>,
    prompt_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixSampler {
    name: String,
    spec: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixAdapter {
    name: String,
    lora: Option<String>,
}

fn default_weights_list() -> Vec<String> {
    vec!["default".into()]
}

fn default_samplers() -> Vec<MatrixSampler> {
    vec![MatrixSampler { name: "greedy".into(), spec: None }]
}

fn default_adapters() -> Vec<MatrixAdapter> {
    vec![MatrixAdapter { name: "none".into(), lora: None }]
}

#[derive(Debug, Clone)]
pub struct Suite {
    pub header: SuiteHeader,
    /// In file order: explicit cases first, then each matrix expanded in order.
    pub cases: Vec<CaseDef>,
    pub path: PathBuf,
}

impl CaseDef {
    /// One line of `lockstep report --list`: name, model, weights, references, prompt,
    /// steps, sampler, tolerance, fault and adapter.
    pub fn list_line(&self) -> String {
        let what = match (&self.chat, &self.prompt_file, &self.prompt) {
            (Some(ch), _, _) => format!("chat {ch:?}"),
            (None, Some(f), p) => format!("prompt_file {f:?}{}", p.as_ref().map(|p| format!(" ({} characters)", p.chars().count())).unwrap_or_default()),
            (None, None, Some(p)) => format!("prompt {p:?}"),
            _ => String::new(),
        };
        format!(
            "{:<44} {} weights={} vs {} {what} steps={} sampler={} tolerance={}{}{}",
            self.name,
            self.model,
            self.weights,
            self.references.join(","),
            self.steps,
            self.sampler.as_deref().unwrap_or("greedy"),
            self.tolerance,
            self.inject.as_deref().map(|f| format!(" inject={f}")).unwrap_or_default(),
            self.lora.as_deref().map(|l| format!(" lora={l}")).unwrap_or_default(),
        )
    }

    pub fn prompt_value(&self) -> Prompt {
        match (&self.prompt, &self.chat) {
            (Some(p), _) => Prompt::Text(p.clone()),
            (None, Some(c)) => Prompt::Chat(c.clone()),
            (None, None) => unreachable!("validated: one of prompt/chat"),
        }
    }

    pub fn weights_mode(&self) -> Option<lockstep_engine::WeightsMode> {
        match self.weights.as_str() {
            "quantized" => Some(lockstep_engine::WeightsMode::Quantized),
            "dequant" => Some(lockstep_engine::WeightsMode::Dequant),
            _ => None,
        }
    }

    /// Identifies what the case computes: a finished case is reused by a resumed run only
    /// when its fingerprint is unchanged (same definition, same lockstep version).
    pub fn fingerprint(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        crate::checks::genconfig::sha12(&format!("{}\n{text}", env!("CARGO_PKG_VERSION")))
    }

    /// Reads `prompt_file` (relative to the suite's file `file`) into `prompt`.
    fn read_prompt_file(&mut self, file: &Path) -> Result<(), HarnessError> {
        let Some(f) = &self.prompt_file else { return Ok(()) };
        let path = file.parent().unwrap_or(Path::new(".")).join(f);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            HarnessError::Usage(format!("{}: case `{}`: prompt_file {}: {e}", file.display(), self.name, path.display()))
        })?;
        if text.trim().is_empty() {
            return Err(HarnessError::Usage(format!("{}: case `{}`: prompt_file {} is empty", file.display(), self.name, path.display())));
        }
        self.prompt = Some(text.trim_end().to_string());
        Ok(())
    }

    fn validate(&self, file: &Path) -> Result<(), HarnessError> {
        let bad = |msg: String| HarnessError::Usage(format!("{}: case `{}`: {msg}", file.display(), self.name));
        let name_ok = !self.name.is_empty()
            && self.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
        if !name_ok {
            return Err(bad("names are lowercase letters, digits, `-`, `_` and `.` (they name files)".into()));
        }
        if [self.prompt.is_some(), self.chat.is_some(), self.prompt_file.is_some()].iter().filter(|&&x| x).count() != 1 {
            return Err(bad("give exactly one of `prompt`, `chat` and `prompt_file`".into()));
        }
        if self.steps == 0 {
            return Err(bad("`steps` must be at least 1".into()));
        }
        if !crate::models::names_a_model(&self.model) {
            return Err(bad(format!(
                "model `{}` is neither an existing path nor a known model alias; aliases: {}",
                self.model,
                crate::models::ALIASES.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
            )));
        }
        if self.references.is_empty() {
            return Err(bad("`references` is empty".into()));
        }
        for r in &self.references {
            crate::reference::RefSpec::parse(r).map_err(|e| bad(e.to_string()))?;
        }
        if !["default", "quantized", "dequant"].contains(&self.weights.as_str()) {
            return Err(bad(format!("weights `{}`: expected default, quantized or dequant", self.weights)));
        }
        if !PROFILES.contains(&self.tolerance.as_str()) {
            return Err(bad(format!("tolerance `{}`: expected one of {}", self.tolerance, PROFILES.join(", "))));
        }
        if !["pass", "diverged"].contains(&self.expect.as_str()) {
            return Err(bad(format!("expect `{}`: expected pass or diverged", self.expect)));
        }
        if let Some(s) = &self.sampler {
            lockstep_engine::SamplerConfig::parse(s).map_err(|e| bad(format!("sampler: {e}")))?;
        }
        if let Some(f) = &self.inject {
            lockstep_engine::Faults::parse(f).map_err(|e| bad(format!("inject: {e}")))?;
        }
        Ok(())
    }
}

impl MatrixDef {
    fn expand(&self) -> Vec<CaseDef> {
        let mut out = vec![];
        for model in &self.models {
            for weights in &self.weights {
                for adapter in &self.adapters {
                    for p in &self.prompts {
                        for s in &self.samplers {
                            // One part per dimension with more than one value.
                            let mut name = self.name.clone();
                            for (many, part) in [
                                (self.models.len() > 1, slug(model)),
                                (self.weights.len() > 1, weights.clone()),
                                (self.adapters.len() > 1, adapter.name.clone()),
                                (self.prompts.len() > 1, p.name.clone()),
                                (self.samplers.len() > 1, s.name.clone()),
                            ] {
                                if many {
                                    name = format!("{name}-{part}");
                                }
                            }
                            out.push(CaseDef {
                                name,
                                model: model.clone(),
                                references: self.references.clone(),
                                weights: weights.clone(),
                                prompt: p.prompt.clone(),
                                chat: p.chat.clone(),
                                prompt_file: p.prompt_file.clone(),
                                sampler: s.spec.clone(),
                                steps: self.steps,
                                tolerance: self.tolerance.clone(),
                                inject: None,
                                lora: adapter.lora.clone(),
                                expect: default_expect(),
                                about: self.about.clone(),
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

/// A model argument as part of a case name: its file stem, lowercase.
fn slug(model: &str) -> String {
    let stem = Path::new(model).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    stem.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' { c } else { '-' }).collect()
}

/// The most cases a suite may expand to unless `--max-cases` raises it: a few hundred bytes of
/// matrix can describe a million cases (weeks of runs, gigabytes of report).
pub const MAX_CASES: usize = 1000;

impl Suite {
    pub fn load(path: &Path) -> Result<Suite, HarnessError> {
        Suite::load_capped(path, MAX_CASES)
    }

    /// [`Suite::load`] allowing up to `max_cases` cases.
    pub fn load_capped(path: &Path, max_cases: usize) -> Result<Suite, HarnessError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| HarnessError::Io { path: path.display().to_string(), message: e.to_string() })?;
        Suite::parse_capped(&text, path, max_cases)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Suite, HarnessError> {
        Suite::parse_capped(text, path, MAX_CASES)
    }

    /// [`Suite::parse`] allowing up to `max_cases` cases; the count is taken before anything
    /// is expanded.
    pub fn parse_capped(text: &str, path: &Path, max_cases: usize) -> Result<Suite, HarnessError> {
        let f: SuiteFile =
            toml::from_str(text).map_err(|e| HarnessError::Suite { path: path.display().to_string(), message: e.to_string().trim().to_string() })?;
        let sizes: Vec<(String, [usize; 5])> =
            f.matrix.iter().map(|m| (m.name.clone(), [m.models.len(), m.weights.len(), m.adapters.len(), m.prompts.len(), m.samplers.len()])).collect();
        let total = sizes.iter().fold(f.cases.len(), |acc, (_, d)| acc.saturating_add(d.iter().fold(1usize, |p, n| p.saturating_mul(*n))));
        if total > max_cases {
            let biggest = sizes.iter().max_by_key(|(_, d)| d.iter().fold(1usize, |p, n| p.saturating_mul(*n)));
            return Err(HarnessError::Suite {
                path: path.display().to_string(),
                message: format!(
                    "the suite expands to {total} cases, more than {max_cases}{}: shorten the lists, or raise the limit with \
                     --max-cases {total} if you mean to run them all",
                    biggest
                        .map(|(n, d)| format!(" (matrix `{n}`: {} models x {} weights x {} adapters x {} prompts x {} samplers)", d[0], d[1], d[2], d[3], d[4]))
                        .unwrap_or_default()
                ),
            });
        }
        let mut cases = f.cases;
        for m in &f.matrix {
            cases.extend(m.expand());
        }
        if cases.is_empty() {
            return Err(HarnessError::Suite { path: path.display().to_string(), message: "the suite has no cases".into() });
        }
        let mut seen = BTreeSet::new();
        for c in &mut cases {
            c.validate(path)?;
            c.read_prompt_file(path)?;
            if !seen.insert(c.name.clone()) {
                return Err(HarnessError::Suite { path: path.display().to_string(), message: format!("two cases are named `{}`", c.name) });
            }
        }
        Ok(Suite { header: f.suite, cases, path: path.to_path_buf() })
    }
}

/// `--shard I/N` (1-based): case k (0-based, suite order) belongs to shard k % N + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(s: &str) -> Result<Shard, HarnessError> {
        let bad = || HarnessError::Usage(format!("--shard `{s}`: expected I/N with 1 <= I <= N, e.g. 1/2"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (i.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
        if count == 0 || index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    pub fn has(&self, k: usize) -> bool {
        k % self.count + 1 == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_file_is_read_relative_to_the_suite_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("lockstep-suite-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("prompts")).unwrap();
        std::fs::write(dir.join("prompts/long.txt"), "a long prompt\n").unwrap();
        let text = |f: &str| format!("[suite]\nname='t'\n[[matrix]]\nname='m'\nmodels=['tiny']\nreferences=['transformers']\nprompts=[{{ name='long', prompt_file='{f}' }}]\nsteps=2\n");
        std::fs::write(dir.join("s.toml"), text("prompts/long.txt")).unwrap();
        let s = Suite::load(&dir.join("s.toml")).unwrap();
        assert_eq!(s.cases[0].prompt.as_deref(), Some("a long prompt"));
        assert!(s.cases[0].list_line().contains("prompt_file \"prompts/long.txt\" (13 characters)"), "{}", s.cases[0].list_line());
        std::fs::write(dir.join("s.toml"), text("prompts/none.txt")).unwrap();
        let e = Suite::load(&dir.join("s.toml")).unwrap_err().to_string();
        assert!(e.contains("prompt_file") && e.contains("none.txt"), "{e}");
        let both = "[suite]\nname='t'\n[[case]]\nname='a'\nmodel='tiny'\nprompt='x'\nprompt_file='y'\nreferences=['transformers']\nsteps=2\n";
        assert!(Suite::parse(both, Path::new("x.toml")).unwrap_err().to_string().contains("exactly one of"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn matrix_expands_and_names_cases() {
        let q41 = crate::paths::data_dir().join("snapshots/models/tiny-llama.Q4_1.gguf");
        let s = Suite::parse(
            &r#"
[suite]
name = "t"
[[matrix]]
name = "m"
models = ["tiny", "Q41"]
references = ["transformers"]
weights = ["quantized", "dequant"]
prompts = [{ name = "p", prompt = "Hi" }]
samplers = [{ name = "greedy" }, { name = "t08", spec = "temp=0.8,seed=0" }]
steps = 4
"#
            .replace("Q41", &q41.display().to_string()),
            Path::new("t.toml"),
        )
        .unwrap();
        let names: Vec<&str> = s.cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), 8);
        assert_eq!(names[0], "m-tiny-quantized-greedy");
        assert_eq!(names[7], "m-tiny-llama.q4_1-dequant-t08");
    }

    #[test]
    fn a_model_that_is_neither_a_path_nor_an_alias_is_refused() {
        let e = Suite::parse("[suite]\nname='t'\n[[case]]\nname='a'\nmodel='tinyy'\nchat='x'\nreferences=['transformers']\nsteps=2\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("`a`") && e.contains("model `tinyy`") && e.contains("tiny-gguf"), "{e}");
    }

    #[test]
    fn bad_cases_name_the_file_and_case() {
        let e = Suite::parse("[suite]\nname='t'\n[[case]]\nname='a'\nmodel='tiny'\nreferences=['transformers']\nsteps=2\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("`a`") && e.contains("prompt"), "{e}");
        let e = Suite::parse("[suite]\nname='t'\n[[case]]\nname='a'\nmodel='tiny'\nchat='x'\nreferences=['transformers']\nsteps=2\ntolerance='loose'\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tolerance"), "{e}");
    }

    #[test]
    fn shards_partition() {
        let a = Shard::parse("1/2").unwrap();
        let b = Shard::parse("2/2").unwrap();
        assert!((0..7).all(|k| a.has(k) != b.has(k)));
        assert!(Shard::parse("3/2").is_err() && Shard::parse("0/1").is_err() && Shard::parse("x").is_err());
    }
}
