//! The command line's flags (clap): one `Args` struct per command, and the conversions
//! from flags to the harness's options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use crate::lockstep::options::Prompt;
use lockstep_engine::WeightsMode;

/// The environment variables of `lockstep --help` (all of them, with the test-suite ones:
/// docs/environment.md).
pub const ENV_HELP: &str = "\
Environment (all of them: docs/environment.md):
  LOCKSTEP_VENV         the reference environment, a Python venv (default: .venv in the repository)
  LOCKSTEP_MODELS       the model store (default: ~/.cache/lockstep/models)
  LOCKSTEP_REFERENCES   the Python reference modules (default: references/ in the repository)
  LOCKSTEP_TRACES       golden traces (default: snapshots/traces in the repository)
  LOCKSTEP_THREADS      the engine's threads (default: RAYON_NUM_THREADS, else every CPU)
  LOCKSTEP_NO_VNNI      set: the quantized kernels do not use AVX-512 VNNI
  LOCKSTEP_REPORT_DATE  `report`: the date written into the report and the history
  CI                    set (not `false`): `report` prints one line per case, no progress line
  RUST_LIB_BACKTRACE    lockstep sets it to 0 when unset (no library backtraces in messages)

Reports: --json - and --junit - write to standard output; the human output then goes to stderr.
Exit codes: 0 pass, 1 diverged, 2 usage or input error, 130 interrupted.";

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Differential testing of LLM inference: the lockstep engine against Python references, layer by layer, step by step.", after_help = ENV_HELP)]
pub struct Cli {
    /// The engine under test: `bundled` (the default: lockstep-engine), or
    /// `python:PATH.py[:FACTORY]`, a Python implementation of the reference protocol (see
    /// examples/python/). A Rust engine plugs in through the library (lockstep::cli::main_with).
    /// `--reference engine` is the engine under test itself (clean, without faults);
    /// `--reference bundled` is always lockstep-engine.
    #[arg(long, global = true)]
    pub engine: Option<String>,
    /// Print the verdict line only (and errors); the exit code says the rest.
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Also print how long each phase took and, under each step's row, the sites that did
    /// not pass; the per-site table with one reference too.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// Never cut or fold a table to the terminal's width (a pipe or a file is never cut).
    #[arg(long, global = true)]
    pub wide: bool,
    /// Lay tables out for N columns (default: the terminal's width; none on a pipe).
    #[arg(long, global = true, value_name = "N", conflicts_with = "wide")]
    pub width: Option<usize>,
    /// Colour the verdicts: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, global = true, value_enum, default_value = "auto", value_name = "WHEN")]
    pub color: crate::ui::ColorChoice,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Plain text prompt (tokenized with the tokenizer's special tokens, e.g. BOS).
    #[arg(long)]
    pub prompt: Option<String>,
    /// One user message, rendered with the model's chat template (generation prompt on).
    #[arg(long)]
    pub chat: Option<String>,
}

impl PromptArgs {
    /// The prompt (an empty one is a prompt: a SentencePiece model feeds its BOS alone; one
    /// that encodes to no tokens is refused once the engine has loaded, before the references).
    pub fn to_prompt(&self) -> Result<Prompt, crate::error::HarnessError> {
        Ok(match (&self.prompt, &self.chat) {
            (Some(p), _) => Prompt::Text(p.clone()),
            (None, Some(c)) => Prompt::Chat(c.clone()),
            (None, None) => unreachable!("clap requires one of --prompt/--chat"),
        })
    }
}

/// How long a run may get, and how a long prompt is fed.
#[derive(Args, Clone, Debug)]
pub struct LengthArgs {
    /// The positions the run may feed (default: the prompt plus the steps). Given to every
    /// reference with a fixed context (llama.cpp's n_ctx) and checked against the model's
    /// context window and every reference's before any step runs.
    #[arg(long, value_name = "N")]
    pub context: Option<usize>,
    /// Feed a prompt longer than this to every side in pieces of this many tokens, each
    /// compared as it comes (what one step holds stays bounded whatever the prompt's length).
    #[arg(long, value_name = "TOKENS", default_value_t = crate::lockstep::options::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Refuse (exit 2, before step 0) a run predicted to need more resident memory than this
    /// many MB: what is loaded, measured, plus one call's captures and the caches.
    #[arg(long, value_name = "MB")]
    pub max_memory: Option<u64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum WeightsArg {
    Quantized,
    Dequant,
}

impl WeightsArg {
    pub fn mode(self) -> WeightsMode {
        match self {
            WeightsArg::Quantized => WeightsMode::Quantized,
            WeightsArg::Dequant => WeightsMode::Dequant,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LoraModeArg {
    Unmerged,
    Merged,
}

#[derive(Args, Clone)]
pub struct LoraArgs {
    /// A LoRA adapter directory, PEFT (adapter_model.safetensors) or mlx-lm
    /// (adapters.safetensors) format; every side loads it (see docs/lora.md).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// How the engine applies the adapter: unmerged (y = Wx + s*B(Ax)) or merged
    /// (W + s*BA; a quantized W is dequantized first).
    #[arg(long, value_enum, default_value = "unmerged")]
    pub lora_mode: LoraModeArg,
}

impl LoraArgs {
    pub fn options(&self) -> Option<lockstep_engine::LoraOptions> {
        self.lora.as_ref().map(|dir| lockstep_engine::LoraOptions {
            dir: dir.clone(),
            mode: match self.lora_mode {
                LoraModeArg::Unmerged => lockstep_engine::LoraMode::Unmerged,
                LoraModeArg::Merged => lockstep_engine::LoraMode::Merged,
            },
        })
    }
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the engine and a reference in lockstep and compare every site at every step.
    Run(RunArgs),
    /// Print the LoRA adapter inventories (per module: shapes, dtype, rank, scale,
    /// checksums) and the effective LoRA configuration of the engine and the references,
    /// with their diff, without generating (exit 1 if they differ).
    Inspect(InspectArgs),
    /// Find where the engine first leaves the reference: step, layer, site, whether the
    /// layer is wrong by itself, and the most likely cause with its evidence.
    Bisect(BisectArgs),
    /// List the fault catalog; with --check, inject each fault and bisect it.
    Faults(FaultsArgs),
    /// Run in lockstep with live references and record their answers as golden traces
    /// (DIR/NAME.safetensors + NAME.json; with several references NAME.REFERENCE.*), DIR as
    /// --out says; replay one with `lockstep replay DIR/NAME.json` or `--reference trace:DIR/NAME`.
    Record(RecordArgs),
    /// Re-record every case of snapshots/traces/manifest.toml (what `make snapshots` runs).
    Snapshots(SnapshotsArgs),
    /// Replay a golden case (or one trace) against the engine, without Python.
    Replay(ReplayArgs),
    /// Generate greedily with the engine alone and print the text.
    Generate(GenerateArgs),
    /// Compare the engine's tokenizer, special tokens and chat template with the references'
    /// on a built-in corpus of hard strings (and --corpus FILE); exit 1 on a mismatch.
    Tokcheck(TokcheckArgs),
    /// Prefill and decode speed of the engine, llama.cpp and transformers, side by side.
    Bench(BenchArgs),
    /// Dequantize every tensor of a GGUF file with the engine and with the `gguf` package's
    /// reference dequantizer and compare them (exit 1 if any differs, 2 if the file is corrupt).
    QuantCheck(QuantCheckArgs),
    /// Run a suite of cases (scripts/suites/*.toml) and write a report: DIR/index.html,
    /// DIR/report.json, DIR/summary.md, DIR/cases/*.json. Re-running with the same --out
    /// resumes. Exit 1 on a regression against --history (without it: on any case not as
    /// expected), 2 on a usage or input error.
    Report(ReportArgs),
    /// List the model aliases.
    Models,
    /// Check the environment: the reference environment (Python, each reference package and
    /// its version, llama.cpp's build against this CPU), the fixtures, the model store, the
    /// traces directory, Chromium; for each gap, the command to run. Loads no model. Exit 0
    /// when everything needed is there, 1 when something is missing.
    Doctor,
}

#[derive(Args)]
pub struct RunArgs {
    /// Model: a Hugging Face directory, a .gguf file, or an alias (`lockstep models` lists them).
    #[arg(long)]
    pub model: String,
    /// References, comma-separated: transformers, mlx, llamacpp; NAME:f64 runs one in
    /// float64 as an oracle (e.g. transformers,mlx,transformers:f64); trace:NAME replays a
    /// recorded trace without Python (e.g. trace:tiny-hf.transformers); engine is the bundled
    /// engine itself, without faults (no Python; engine:f64 is an oracle).
    #[arg(long, default_value = "transformers")]
    pub reference: String,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Number of steps: the prefill, then one token per step.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Write the JSON report here (`-`: standard output; the table then goes to stderr).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a JUnit XML report here (`-`: standard output): one test case per step, a failed step carries the first divergence and its likely cause.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Run the engine in f64 (the reference stays f32).
    #[arg(long)]
    pub f64: bool,
    /// GGUF weights: `quantized` (kept in their block format, quantized kernels; the
    /// default for GGUF) or `dequant` (f32).
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Sample instead of greedy: KEY=VALUE pairs joined by commas, e.g. temp=0.8,seed=0; keys temp,
    /// top_p, top_k, min_p, rep_penalty, seed, order (transformers | mlx | STAGE>STAGE...),
    /// rep_window (N | all). Each reference's own
    /// sampler is compared with the engine's at every step.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Fail (exit 1, before step 0) when any setting of the generation-config table differs.
    #[arg(long)]
    pub strict_config: bool,
    /// Inject faults into the engine: NAME[:LAYER], comma-separated (`lockstep faults`).
    #[arg(long)]
    pub inject: Option<String>,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub length: LengthArgs,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Model: a Hugging Face directory, a .gguf file, or an alias.
    #[arg(long)]
    pub model: String,
    /// References, comma-separated: transformers, mlx.
    #[arg(long, default_value = "transformers")]
    pub reference: String,
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Write the inventories as JSON here (`-`: standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct BisectArgs {
    /// Model: a Hugging Face directory, a .gguf file, or an alias (`lockstep models` lists them).
    #[arg(long)]
    pub model: String,
    /// The reference to bisect against (the first one is used for isolation).
    #[arg(long, default_value = "transformers")]
    pub reference: String,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Write the bisect report as JSON here (`-`: standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a JUnit XML report here (`-`: standard output): one test case, failed with the step, layer, site and diagnosis when bisect finds a divergence.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Inject faults into the engine: NAME[:LAYER], comma-separated (`lockstep faults`).
    #[arg(long)]
    pub inject: Option<String>,
    /// Reference tensors kept for isolation beyond this size are dropped (statistics stay).
    #[arg(long, default_value_t = 256)]
    pub max_capture_mb: usize,
    /// Sample as `run --sampler` does; each reference's own sampler is compared at every step.
    #[arg(long)]
    pub sampler: Option<String>,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub length: LengthArgs,
}

#[derive(Args)]
pub struct FaultsArgs {
    /// Inject every applicable fault in turn and check that bisect localizes it.
    #[arg(long)]
    pub check: bool,
    #[arg(long, default_value = "tiny")]
    pub model: String,
    #[arg(long, default_value = "transformers")]
    pub reference: String,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Write the results as JSON here (`-`: standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// With --check: write a JUnit XML report here (`-`: standard output), one test case per
    /// fault, failed when bisect does not localize it where the catalog says.
    #[arg(long, requires = "check")]
    pub junit: Option<PathBuf>,
    /// Run every fault with this LoRA adapter on every side (the LoRA faults need one).
    #[command(flatten)]
    pub lora: LoraArgs,
}

#[derive(Args)]
pub struct RecordArgs {
    /// Model: a Hugging Face directory, a .gguf file, or an alias (smollm2, tiny, tiny-gguf).
    #[arg(long)]
    pub model: String,
    /// Live references to record, comma-separated (transformers, mlx, llamacpp, NAME:f64).
    #[arg(long, default_value = "transformers")]
    pub reference: String,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Number of steps: the prefill, then one token per step.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Trace name.
    #[arg(long)]
    pub name: String,
    /// Layers whose sites are kept in full, comma-separated; the other layers' sites are
    /// kept as sketches (logits, caches, embed and final_norm always in full). Default:
    /// every layer.
    #[arg(long, value_delimiter = ',')]
    pub full_layers: Option<Vec<usize>>,
    /// Refuse to write a trace larger than this many MB.
    #[arg(long)]
    pub budget_mb: Option<f64>,
    /// Record only the sites the engine under test declares (a logits-only engine's traces
    /// then hold the logits alone); replays of such traces compare those sites only.
    #[arg(long)]
    pub engine_sites: bool,
    /// Directory to write the traces to. Default: $LOCKSTEP_TRACES, else the checkout's
    /// snapshots/traces when this binary runs from one, else ~/.local/share/lockstep/traces
    /// (`lockstep doctor` shows which); `trace:NAME` reads from the same directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// GGUF weights: quantized (default for GGUF) or dequant (f32). Recorded in the trace;
    /// replays load them the same way.
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// A LoRA adapter directory on every side (the engine unmerged); recorded in the trace
    /// (path, sha256, the reference's inventory), which then replays only with it.
    #[arg(long)]
    pub lora: Option<PathBuf>,
}

#[derive(Args)]
pub struct SnapshotsArgs {
    /// Only these cases (repeatable).
    #[arg(long = "case")]
    pub cases: Vec<String>,
    /// Another manifest.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
}

#[derive(Args)]
pub struct ReplayArgs {
    /// A case of snapshots/traces/manifest.toml, a trace name (in the traces directory, as for
    /// `record`), or a trace's path (DIR/NAME.json).
    pub name: String,
    /// Print the parity summary that `cargo test` snapshots.
    #[arg(long)]
    pub summary: bool,
    /// Write the JSON report here (`-`: standard output; the table then goes to stderr).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model: a Hugging Face directory, a .gguf file, or an alias (`lockstep models` lists them).
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Maximum number of new tokens.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 32)]
    pub n: usize,
    /// Compute in f64.
    #[arg(long)]
    pub f64: bool,
    /// GGUF weights: quantized (default for GGUF) or dequant (f32).
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Inject faults into the engine: NAME[:LAYER], comma-separated (`lockstep faults`).
    #[arg(long)]
    pub inject: Option<String>,
    /// Sample instead of greedy (same syntax as `run --sampler`); seeded, reproducible.
    #[arg(long)]
    pub sampler: Option<String>,
    #[command(flatten)]
    pub lora: LoraArgs,
}

#[derive(Args)]
pub struct TokcheckArgs {
    /// Model: a Hugging Face directory, a .gguf file, or an alias.
    #[arg(long)]
    pub model: String,
    /// References, comma-separated: transformers, mlx, llamacpp.
    #[arg(long, default_value = "transformers")]
    pub reference: String,
    /// More strings: a .json array of strings, or one string per line (\\n, \\t escapes).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Write the result as JSON here (`-`: standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Model: a .gguf file or an alias.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Threads for every side.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prefill: usize,
    /// Number of single-token decode steps.
    #[arg(long, default_value_t = 64)]
    pub decode: usize,
    /// Prefill runs per side (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Which sides, comma-separated: engine, engine-dequant, llamacpp, transformers.
    #[arg(long, default_value = "engine,engine-dequant,llamacpp,transformers")]
    pub sides: String,
    /// Long contexts: the engine's decode step time with this many positions in its cache,
    /// and lockstep's own per-step cost (a `run --weights dequant --reference transformers`
    /// with a prompt of this length), comma-separated; empty: skip.
    #[arg(long, default_value = "16,4096")]
    pub contexts: String,
    /// Long contexts: the peak memory of a `run --weights dequant --reference transformers`
    /// with prompts of these lengths, comma-separated; empty: skip.
    #[arg(long, default_value = "64,2048")]
    pub memory_prompts: String,
}

#[derive(Args)]
pub struct QuantCheckArgs {
    /// A .gguf file or an alias (smollm2, tiny-gguf, ...).
    pub file: String,
    /// Write the result as JSON here (`-`: standard output).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReportArgs {
    #[command(subcommand)]
    pub cmd: Option<ReportCmd>,
    /// The suite file (e.g. scripts/suites/ci.toml).
    #[arg(long, required = true)]
    pub suite: Option<PathBuf>,
    /// The report directory (finished cases in it are not run again).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Run only shard I of N (1-based; case k goes to shard k % N + 1); join with `report merge`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Append one JSON line per case to this file; the page shows the trend and the exit code
    /// flags regressions against the previous line of each case.
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Also write each case's complete run report (as `lockstep run --json`: every site of
    /// every step) to DIR/runs/NAME.json; the page links it.
    #[arg(long)]
    pub full_json: bool,
    /// The most cases the suite may expand to (its matrices multiplied out): a larger suite is
    /// refused before anything runs.
    #[arg(long, value_name = "N", default_value_t = crate::report::suite::MAX_CASES)]
    pub max_cases: usize,
    /// List the suite's cases (the matrices expanded) with their shard, and run nothing.
    #[arg(long)]
    pub list: bool,
    /// Also write a JUnit XML report here (`-`: standard output), one test case per case of
    /// the suite (of the shard): failed when the case is not as expected or regressed, with
    /// the first divergence and bisect's diagnosis.
    #[arg(long)]
    pub junit: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ReportCmd {
    /// Merge shard directories into one report.
    Merge {
        /// The shards' --out directories.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// The merged report's directory.
        #[arg(long)]
        out: PathBuf,
        /// As for `report`: append the merged cases and check for regressions.
        #[arg(long)]
        history: Option<PathBuf>,
        /// As for `report`: a JUnit XML report of the merged cases (`-`: standard output).
        #[arg(long)]
        junit: Option<PathBuf>,
    },
}


impl Cmd {
    /// Whether a report of this command goes to standard output (`--json -` or `--junit -`):
    /// then the human output goes to stderr. Both at once is a usage error.
    pub fn report_to_stdout(&self) -> Result<bool, crate::error::HarnessError> {
        let (json, junit) = match self {
            Cmd::Run(a) => (a.json.as_ref(), a.junit.as_ref()),
            Cmd::Bisect(a) => (a.json.as_ref(), a.junit.as_ref()),
            Cmd::Faults(a) => (a.json.as_ref(), a.junit.as_ref()),
            Cmd::Inspect(a) => (a.json.as_ref(), None),
            Cmd::Replay(a) => (a.json.as_ref(), None),
            Cmd::Tokcheck(a) => (a.json.as_ref(), None),
            Cmd::QuantCheck(a) => (a.json.as_ref(), None),
            Cmd::Report(a) => match &a.cmd {
                Some(ReportCmd::Merge { junit, .. }) => (None, junit.as_ref()),
                None => (None, a.junit.as_ref()),
            },
            Cmd::Record(_) | Cmd::Snapshots(_) | Cmd::Generate(_) | Cmd::Bench(_) | Cmd::Models | Cmd::Doctor => (None, None),
        };
        let dash = |p: Option<&PathBuf>| p.is_some_and(|p| crate::paths::is_stdout(p));
        if dash(json) && dash(junit) {
            return Err(crate::error::HarnessError::Usage(
                "--json - and --junit - both ask for standard output: write one of them to a file".into(),
            ));
        }
        Ok(dash(json) || dash(junit))
    }
}
