//! lockstep as a library: run an engine — yours — in lockstep with the references and get
//! the report, the same records the CLI prints and writes as JSON.
//!
//! ```no_run
//! use lockstep::{Lockstep, Plugin};
//!
//! # fn my_engine_load(p: &std::path::Path, o: &lockstep_engine::LoadOptions) -> Result<lockstep_engine::LoadedModel, lockstep_engine::EngineError> { lockstep_engine::load(p, o) }
//! let report = Lockstep::new("smollm2")
//!     .engine(Plugin::new("my-engine", my_engine_load))
//!     .references("llamacpp,transformers")
//!     .prompt("The capital of France is")
//!     .steps(8)
//!     .run()?;
//! print!("{}", report.table());
//! assert!(report.passed(), "{:?}", report.result.first_divergence);
//! # Ok::<(), lockstep::HarnessError>(())
//! ```
//!
//! The engine is the bundled one unless [`Lockstep::engine`] plugs one in (any
//! [`lockstep_engine::Decoder`], wrapped with [`lockstep_engine::LoadedModel::plugin`]) or
//! [`Lockstep::engine_spec`] names a Python engine. `--reference engine` in the list is the
//! engine under test itself, clean; `bundled` the bundled engine (engine vs engine).

use std::path::{Path, PathBuf};

use crate::bisect::BisectReport;
use crate::compare::tolerance::Precision;
use crate::error::HarnessError;
use crate::lockstep::options::{load_engine, parse_sampler, Prompt, RunOptions};
use crate::plugin::{EngineSpec, Plugin};
use crate::reference::{RefSpec, Reference};
use crate::results::run::RunResult;

/// A lockstep run, built step by step; [`Lockstep::run`] or [`Lockstep::bisect`] runs it.
#[derive(Clone, Debug)]
pub struct Lockstep {
    model: String,
    engine: EngineSpec,
    references: String,
    prompt: Option<Prompt>,
    steps: usize,
    precision: Precision,
    weights: Option<lockstep_engine::WeightsMode>,
    lora: Option<PathBuf>,
    sampler: Option<String>,
    inject: String,
    context: Option<usize>,
    prefill_chunk: usize,
}

/// What a run found: its records, the references that answered, the model and its hash.
pub struct Report {
    pub result: RunResult,
    pub references: Vec<Reference>,
    pub model: PathBuf,
    pub sha256: String,
}

impl Report {
    /// True when everything compared passed (drift allowed): the CLI's exit code 0.
    pub fn passed(&self) -> bool {
        self.result.verdict_pass
    }

    /// The report as `lockstep run` prints it.
    pub fn table(&self) -> String {
        crate::report::table::render_table(&self.result, &self.references, &self.model, &self.sha256)
    }

    /// The report as `lockstep run --json` writes it.
    pub fn json(&self) -> Result<serde_json::Value, HarnessError> {
        crate::report::table::json_report(&self.result, &self.references, &self.model, &self.sha256)
    }

    /// Writes [`Report::json`] to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), HarnessError> {
        crate::report::table::write_json(path, &self.result, &self.references, &self.model, &self.sha256)
    }
}

impl Lockstep {
    /// A run on `model`: a Hugging Face directory, a `.gguf` file or an alias (`smollm2`,
    /// `tiny`, ...). Defaults: the bundled engine, `--reference transformers`, 16 steps, f32.
    pub fn new(model: impl Into<String>) -> Lockstep {
        Lockstep {
            model: model.into(),
            engine: EngineSpec::Bundled,
            references: "transformers".into(),
            prompt: None,
            steps: 16,
            precision: Precision::F32,
            weights: None,
            lora: None,
            sampler: None,
            inject: String::new(),
            context: None,
            prefill_chunk: crate::lockstep::options::DEFAULT_PREFILL_CHUNK,
        }
    }

    /// Plugs a Rust engine in as the engine under test.
    pub fn engine(mut self, plugin: Plugin) -> Lockstep {
        self.engine = EngineSpec::Plugin(plugin);
        self
    }

    /// The engine under test by spec (`EngineSpec::parse("python:my_engine.py")`).
    pub fn engine_spec(mut self, spec: EngineSpec) -> Lockstep {
        self.engine = spec;
        self
    }

    /// The references, as `--reference` takes them (`llamacpp,transformers`, `trace:NAME`,
    /// `engine`, `bundled`, `NAME:f64`).
    pub fn references(mut self, list: &str) -> Lockstep {
        self.references = list.into();
        self
    }

    /// A plain-text prompt (the tokenizer's special tokens, e.g. BOS, added).
    pub fn prompt(mut self, text: impl Into<String>) -> Lockstep {
        self.prompt = Some(Prompt::Text(text.into()));
        self
    }

    /// One user message through the model's chat template.
    pub fn chat(mut self, text: impl Into<String>) -> Lockstep {
        self.prompt = Some(Prompt::Chat(text.into()));
        self
    }

    /// Steps: the prefill, then one token per step.
    pub fn steps(mut self, n: usize) -> Lockstep {
        self.steps = n;
        self
    }

    /// How the engine holds GGUF weights.
    pub fn weights(mut self, mode: lockstep_engine::WeightsMode) -> Lockstep {
        self.weights = Some(mode);
        self
    }

    /// The engine in f64 (an oracle run of the engine).
    pub fn f64(mut self) -> Lockstep {
        self.precision = Precision::F64;
        self
    }

    /// A LoRA adapter directory on every side.
    pub fn lora(mut self, dir: impl Into<PathBuf>) -> Lockstep {
        self.lora = Some(dir.into());
        self
    }

    /// Sample as `--sampler` does (`temp=0.8,top_p=0.95,seed=0`).
    pub fn sampler(mut self, spec: impl Into<String>) -> Lockstep {
        self.sampler = Some(spec.into());
        self
    }

    /// Faults for the engine (`--inject`), for an engine that implements them.
    pub fn inject(mut self, faults: impl Into<String>) -> Lockstep {
        self.inject = faults.into();
        self
    }

    /// The positions the run may feed (`--context N`; default: the prompt plus the steps).
    pub fn context(mut self, positions: usize) -> Lockstep {
        self.context = Some(positions);
        self
    }

    /// Feed a longer prompt in pieces of this many tokens (`--prefill-chunk`).
    pub fn prefill_chunk(mut self, tokens: usize) -> Lockstep {
        self.prefill_chunk = tokens;
        self
    }

    /// The validated options (what the CLI builds from its flags).
    pub fn options(&self, bisect: bool) -> Result<RunOptions, HarnessError> {
        if self.steps == 0 {
            return Err(HarnessError::ZeroSteps);
        }
        let prompt = self.prompt.clone().ok_or_else(|| HarnessError::Usage("no prompt: call .prompt(text) or .chat(text)".into()))?;
        let sampler = parse_sampler(self.sampler.as_deref())?;
        Ok(RunOptions {
            model: crate::models::resolve(&self.model)?,
            references: RefSpec::parse_list(&self.references)?,
            prompt,
            steps: self.steps,
            precision: self.precision,
            weights: self.weights,
            faults: lockstep_engine::Faults::parse(&self.inject)?,
            bisect,
            sampler,
            strict_config: false,
            lora: self.lora.clone().map(|dir| lockstep_engine::LoraOptions { dir, mode: lockstep_engine::LoraMode::Unmerged }),
            engine: self.engine.clone(),
            context: self.context,
            prefill_chunk: self.prefill_chunk,
            max_memory: None,
        })
    }

    /// Loads the engine and the references (the engine under test is also what
    /// `--reference engine` names, on this thread), runs the steps, returns the report.
    pub fn run(self) -> Result<Report, HarnessError> {
        let opts = self.options(false)?;
        let (engine, refs) = self.load(&opts)?;
        let result = crate::lockstep::run::run(&opts, &engine, &refs)?;
        let sha256 = crate::golden::trace::model_sha256_cached(&opts.model)?;
        Ok(Report { result, references: refs, model: opts.model, sha256 })
    }

    /// Bisects: stops at the first failing step and localizes it as far as the engine's taps
    /// allow; returns the bisect report (printable with [`crate::bisect::render`]) and the run.
    pub fn bisect(self) -> Result<(BisectReport, Report), HarnessError> {
        let opts = self.options(true)?;
        let (engine, refs) = self.load(&opts)?;
        let (rep, result) = crate::bisect::bisect(&opts, &engine, &refs, 256)?;
        let sha256 = crate::golden::trace::model_sha256_cached(&opts.model)?;
        Ok((rep, Report { result, references: refs, model: opts.model, sha256 }))
    }

    fn load(&self, opts: &RunOptions) -> Result<(lockstep_engine::LoadedModel, Vec<Reference>), HarnessError> {
        EngineSpec::set_under_test(opts.engine.clone());
        let engine = load_engine(opts)?;
        let lora = opts.lora.as_ref().map(|l| l.dir.as_path());
        // Every reference holds what the run feeds (llama.cpp's n_ctx), as `lockstep run` sizes it.
        let context = opts.context_for(crate::lockstep::options::engine_prompt_ids(&engine, &opts.prompt)?.len());
        let refs =
            opts.references.iter().map(|s| Reference::load_for_run(s, &opts.model, lora, Some(context))).collect::<Result<Vec<_>, _>>()?;
        Ok((engine, refs))
    }
}
