//! The golden cases: `snapshots/traces/manifest.toml`.
//!
//! One `[[case]]` per parity snapshot: a model, a prompt, a number of steps and the
//! references to record. `make snapshots` (`lockstep snapshots`) records every case in one
//! lockstep run per case, one trace per reference named `CASE.REFERENCE`; `cargo test`
//! (harness/tests/replay.rs) replays every case against the engine without Python and
//! compares its parity summary with `snapshots/parity/CASE.snap`.
//!
//! Fields (unknown fields are an error):
//!
//! | field | meaning |
//! |---|---|
//! | `name` | case name: lowercase letters, digits and `-` |
//! | `model` | a `--model` argument: alias or path |
//! | `prompt` / `chat` | exactly one: a plain prompt, or one user message through the chat template |
//! | `steps` | lockstep steps: the prefill, then one token per step |
//! | `references` | references to record, e.g. `["transformers", "mlx"]` (`NAME:f64` for an oracle) |
//! | `weights` | how the engine holds GGUF weights: `quantized`, `dequant` (f32), or `default` (omitted: quantized for a GGUF, dense for a Hugging Face directory); a replay loads them as they were recorded |
//! | `full_layers` | layers whose sites are kept in full; omitted: every layer. Logits, caches, `embed` and `final_norm` are always kept in full; the other layers' sites as sketches |
//! | `budget_mb` | the largest a trace of this case may be; recording fails over it |
//! | `expect` | `pass` (default) or `diverged`: the verdict the replay must reach |
//! | `about` | why the case exists (free text) |

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::lockstep::options::Prompt;
use crate::error::HarnessError;
use crate::reference::RefSpec;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "case", default)]
    pub cases: Vec<Case>,
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    #[default]
    Pass,
    Diverged,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub model: String,
    pub prompt: Option<String>,
    pub chat: Option<String>,
    pub steps: usize,
    pub references: Vec<String>,
    #[serde(default = "default_weights")]
    pub weights: String,
    pub full_layers: Option<Vec<usize>>,
    /// A LoRA adapter directory (repository-relative) on every side.
    #[serde(default)]
    pub lora: Option<String>,
    pub budget_mb: f64,
    #[serde(default)]
    pub expect: Expect,
    #[serde(default)]
    pub about: String,
}

fn default_weights() -> String {
    "default".into()
}

/// The manifest in the traces directory (`trace::traces_dir`).
pub fn default_path() -> PathBuf {
    crate::golden::trace::traces_dir().join("manifest.toml")
}

impl Manifest {
    pub fn load_default() -> Result<Manifest, HarnessError> {
        Manifest::load(&default_path())
    }

    pub fn load(path: &Path) -> Result<Manifest, HarnessError> {
        let err = |m: String| HarnessError::Io { path: path.display().to_string(), message: m };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut m: Manifest = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        m.path = path.to_path_buf();
        let mut names: Vec<&str> = vec![];
        for c in &m.cases {
            let bad = |what: String| err(format!("case `{}`: {what}", c.name));
            if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-') {
                return Err(bad("names use lowercase letters, digits and `-`".into()));
            }
            if names.contains(&c.name.as_str()) {
                return Err(bad("is listed twice".into()));
            }
            names.push(&c.name);
            if c.prompt.is_some() == c.chat.is_some() {
                return Err(bad("give exactly one of `prompt` and `chat`".into()));
            }
            if c.steps == 0 {
                return Err(bad("`steps` must be at least 1".into()));
            }
            if c.references.is_empty() {
                return Err(bad("`references` is empty".into()));
            }
            for r in &c.references {
                let spec = RefSpec::parse(r).map_err(|e| bad(e.to_string()))?;
                if spec.trace.is_some() {
                    return Err(bad(format!("reference `{r}`: a case records live references")));
                }
            }
            crate::golden::trace::parse_weights(&c.weights).map_err(bad)?;
            if c.budget_mb <= 0.0 {
                return Err(bad("`budget_mb` must be positive".into()));
            }
        }
        Ok(m)
    }

    pub fn case(&self, name: &str) -> Result<&Case, HarnessError> {
        self.cases.iter().find(|c| c.name == name).ok_or_else(|| {
            HarnessError::Usage(format!(
                "no case `{name}` in {}; cases: {}",
                self.path.display(),
                self.cases.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Every trace name the manifest's cases produce.
    pub fn trace_names(&self) -> Vec<String> {
        self.cases.iter().flat_map(|c| c.trace_names()).collect()
    }
}

impl Case {
    /// The adapter directory, resolved against lockstep's files (the checkout, or the embedded copy).
    pub fn lora_dir(&self) -> Option<std::path::PathBuf> {
        self.lora.as_ref().map(|l| crate::paths::data_dir().join(l))
    }

    pub fn weights_mode(&self) -> Option<lockstep_engine::WeightsMode> {
        crate::golden::trace::parse_weights(&self.weights).expect("checked when loading")
    }

    pub fn prompt(&self) -> Prompt {
        match (&self.prompt, &self.chat) {
            (Some(p), _) => Prompt::Text(p.clone()),
            (None, Some(c)) => Prompt::Chat(c.clone()),
            (None, None) => unreachable!("checked when loading"),
        }
    }

    /// `CASE.REFERENCE` per reference (`transformers:f64` -> `CASE.transformers-f64`).
    pub fn trace_names(&self) -> Vec<String> {
        self.references.iter().map(|r| format!("{}.{}", self.name, r.replace(':', "-"))).collect()
    }

    pub fn budget_bytes(&self) -> u64 {
        (self.budget_mb * 1e6) as u64
    }
}
