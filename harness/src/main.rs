//! The `lockstep` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lockstep::driver::{self, Prompt, RunOptions};
use lockstep::error::HarnessError;
use lockstep::python::{RefSpec, Reference};
use lockstep::tolerance::Precision;
use lockstep::{models, report};
use lockstep_engine::WeightsMode;

#[derive(Parser)]
#[command(name = "lockstep", version, about = "Differential testing of LLM inference: the lockstep engine against Python references, layer by layer, step by step.")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
struct PromptArgs {
    /// Plain text prompt (tokenized with the tokenizer's special tokens, e.g. BOS).
    #[arg(long)]
    prompt: Option<String>,
    /// One user message, rendered with the model's chat template (generation prompt on).
    #[arg(long)]
    chat: Option<String>,
}

impl PromptArgs {
    fn to_prompt(&self) -> Prompt {
        match (&self.prompt, &self.chat) {
            (Some(p), _) => Prompt::Text(p.clone()),
            (None, Some(c)) => Prompt::Chat(c.clone()),
            (None, None) => unreachable!("clap requires one of --prompt/--chat"),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WeightsArg {
    Quantized,
    Dequant,
}

impl WeightsArg {
    fn mode(self) -> WeightsMode {
        match self {
            WeightsArg::Quantized => WeightsMode::Quantized,
            WeightsArg::Dequant => WeightsMode::Dequant,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the engine and a reference in lockstep and compare every site at every step.
    Run {
        /// Model: a Hugging Face directory, a .gguf file, or an alias (`lockstep models` lists them).
        #[arg(long)]
        model: String,
        /// References, comma-separated: transformers, mlx, llamacpp; NAME:f64 runs one in
        /// float64 as an oracle (e.g. transformers,mlx,transformers:f64).
        #[arg(long, default_value = "transformers")]
        reference: String,
        #[command(flatten)]
        prompt: PromptArgs,
        /// Number of steps: the prefill, then one token per step.
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run the engine in f64 (the reference stays f32).
        #[arg(long)]
        f64: bool,
        /// GGUF weights: `quantized` (kept in their block format, quantized kernels; the
        /// default for GGUF) or `dequant` (f32).
        #[arg(long, value_enum)]
        weights: Option<WeightsArg>,
        /// Sample instead of greedy, e.g. temp=0.8,top_p=0.95,top_k=40,min_p=0.05,rep_penalty=1.1,seed=0
        /// (also order=transformers|mlx|STAGE>STAGE..., rep_window=N|all). Each reference's own
        /// sampler is compared with the engine's at every step.
        #[arg(long)]
        sampler: Option<String>,
        /// Fail (exit 1, before step 0) when any setting of the generation-config table differs.
        #[arg(long)]
        strict_config: bool,
    },
    /// Generate greedily with the engine alone and print the text.
    Generate {
        /// Model: a Hugging Face directory, a .gguf file, or an alias (`lockstep models` lists them).
        #[arg(long)]
        model: String,
        #[command(flatten)]
        prompt: PromptArgs,
        /// Maximum number of new tokens.
        #[arg(short = 'n', long = "max-tokens", default_value_t = 32)]
        n: usize,
        /// Compute in f64.
        #[arg(long)]
        f64: bool,
        /// GGUF weights: quantized (default for GGUF) or dequant (f32).
        #[arg(long, value_enum)]
        weights: Option<WeightsArg>,
        /// Sample instead of greedy (same syntax as `run --sampler`); seeded, reproducible.
        #[arg(long)]
        sampler: Option<String>,
    },
    /// Compare the engine's tokenizer, special tokens and chat template with the references'
    /// on a built-in corpus of hard strings (and --corpus FILE); exit 1 on a mismatch.
    Tokcheck {
        /// Model: a Hugging Face directory, a .gguf file, or an alias.
        #[arg(long)]
        model: String,
        /// References, comma-separated: transformers, mlx, llamacpp.
        #[arg(long, default_value = "transformers")]
        reference: String,
        /// More strings: a .json array of strings, or one string per line (\\n, \\t escapes).
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Prefill and decode speed of the engine, llama.cpp and transformers, side by side.
    Bench {
        /// Model: a .gguf file or an alias.
        #[arg(long, default_value = "smollm2")]
        model: String,
        /// Threads for every side.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Prompt length of the prefill measurement.
        #[arg(long, default_value_t = 128)]
        prefill: usize,
        /// Number of single-token decode steps.
        #[arg(long, default_value_t = 64)]
        decode: usize,
        /// Prefill runs per side (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Which sides, comma-separated: engine, engine-dequant, llamacpp, transformers.
        #[arg(long, default_value = "engine,engine-dequant,llamacpp,transformers")]
        sides: String,
    },
    /// Dequantize every tensor of a GGUF file with the engine and with the `gguf` package's
    /// reference dequantizer and compare them (exit 1 if any differs, 2 if the file is corrupt).
    QuantCheck {
        /// A .gguf file or an alias (smollm2, tiny-gguf, ...).
        file: String,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// List the model aliases.
    Models,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn real_main(cli: Cli) -> Result<u8, HarnessError> {
    match cli.cmd {
        Cmd::Run { model, reference, prompt, steps, json, f64, weights, sampler, strict_config } => {
            if steps == 0 {
                return Err(HarnessError::Usage("--steps must be at least 1".into()));
            }
            let sampler = parse_sampler(sampler.as_deref())?;
            // Check the cheap things (reference name, model path) before loading anything.
            let specs = RefSpec::parse_list(&reference)?;
            let path = models::resolve(&model)?;
            let precision = if f64 { Precision::F64 } else { Precision::F32 };
            let opts = RunOptions {
                model: path.clone(),
                references: specs.clone(),
                prompt: prompt.to_prompt(),
                steps,
                precision,
                weights: weights.map(WeightsArg::mode),
                sampler,
                strict_config,
            };
            let engine = driver::load_engine(&opts)?;
            let refs = specs.iter().map(|s| Reference::load(s, &path)).collect::<Result<Vec<_>, _>>()?;
            let result = driver::run(&opts, &engine, &refs)?;
            let sha = report::model_sha256(&path)?;
            print!("{}", report::render_table(&result, &refs, &path, &sha));
            if let Some(j) = json {
                report::write_json(&j, &result, &refs, &path, &sha)?;
                println!("report: {}", j.display());
            }
            Ok(if result.verdict_pass { 0 } else { 1 })
        }
        Cmd::Generate { model, prompt, n, f64, weights, sampler } => {
            let sampler = parse_sampler(sampler.as_deref())?;
            let path = models::resolve(&model)?;
            let precision = if f64 { Precision::F64 } else { Precision::F32 };
            let opts = RunOptions {
                model: path,
                references: vec![],
                prompt: prompt.to_prompt(),
                steps: n,
                precision,
                weights: weights.map(WeightsArg::mode),
                sampler: sampler.clone(),
                strict_config: false,
            };
            let m = driver::load_engine(&opts)?;
            let ids = driver::engine_prompt_ids(&m, &opts.prompt)?;
            let out = match sampler {
                None => lockstep_engine::generate::generate_greedy(&m.model, &ids, n, &m.stop_ids())?,
                Some(c) => {
                    let mut s = lockstep_engine::Sampler::new(c);
                    lockstep_engine::generate::generate_sampled(&m.model, &ids, n, &m.stop_ids(), &mut s)?
                }
            };
            let text = m.tokenizer.decode(&out, true)?;
            println!("{text}");
            Ok(0)
        }
        Cmd::Bench { model, threads, prefill, decode, repeats, sides } => {
            if threads == 0 || prefill == 0 {
                return Err(HarnessError::Usage("--threads and --prefill must be at least 1".into()));
            }
            lockstep::bench::set_engine_threads(threads)?;
            let path = models::resolve(&model)?;
            let tok = lockstep_engine::load(&path, &lockstep_engine::LoadOptions::default())?;
            let text = "The quick brown fox jumps over the lazy dog while the history of Rome unfolds in many chapters.";
            let ids = lockstep::bench::prompt_ids(&tok, text, prefill)?;
            drop(tok);
            let mut rows = vec![];
            for side in sides.split(',').map(str::trim) {
                let r = match side {
                    "engine" => lockstep::bench::engine(&path, WeightsMode::Quantized, &ids, decode, repeats)?,
                    "engine-dequant" => lockstep::bench::engine(&path, WeightsMode::Dequant, &ids, decode, repeats)?,
                    "llamacpp" | "transformers" => {
                        lockstep::bench::reference(side, &path, threads, &ids, decode, repeats)?
                    }
                    other => {
                        return Err(HarnessError::Usage(format!(
                            "unknown bench side `{other}` (engine, engine-dequant, llamacpp, transformers)"
                        )))
                    }
                };
                eprintln!("  {}: prefill {:.1} tok/s, decode {:.1} tok/s", r.name, r.prefill_tps(), r.decode_tps());
                rows.push(r);
            }
            print!("{}", lockstep::bench::render(&rows, threads, &path));
            Ok(0)
        }
        Cmd::QuantCheck { file, json } => {
            use lockstep::quantcheck::{self, Status};
            let path = models::resolve(&file)?;
            let c = quantcheck::run(&path)?;
            print!("{}", quantcheck::render(&c));
            if let Some(j) = json {
                let text = serde_json::to_string_pretty(&c).map_err(|e| HarnessError::Usage(e.to_string()))?;
                std::fs::write(&j, text + "\n")
                    .map_err(|e| HarnessError::Io { path: j.display().to_string(), message: e.to_string() })?;
            }
            let corrupt: Vec<&str> =
                c.tensors.iter().filter(|t| matches!(t.status, Status::Corrupt { .. })).map(|t| t.name.as_str()).collect();
            if !corrupt.is_empty() {
                return Err(HarnessError::Io {
                    path: path.display().to_string(),
                    message: format!(
                        "{} corrupt tensor(s): {} (see the lines above; re-download or re-convert the file)",
                        corrupt.len(),
                        corrupt.join(", ")
                    ),
                });
            }
            Ok(if c.count(|s| matches!(s, Status::Differs { .. })) > 0 { 1 } else { 0 })
        }
        Cmd::Tokcheck { model, reference, corpus, json } => {
            use lockstep::tokcheck;
            let specs = RefSpec::parse_list(&reference)?;
            let path = models::resolve(&model)?;
            let mut strings: Vec<(String, String)> = tokcheck::CORPUS.iter().map(|(l, t)| (l.to_string(), t.to_string())).collect();
            if let Some(f) = &corpus {
                strings.extend(tokcheck::read_corpus(f)?);
            }
            let tok = lockstep_engine::Tokenizer::load(&path)?;
            let (sides, notes) = tokcheck::load_sides(&specs, &path)?;
            let r = tokcheck::run(&path, &tok, &sides, notes, &strings)?;
            print!("{}", tokcheck::render(&r));
            if let Some(j) = json {
                let text = serde_json::to_string_pretty(&r).map_err(|e| HarnessError::Usage(e.to_string()))?;
                std::fs::write(&j, text + "\n")
                    .map_err(|e| HarnessError::Io { path: j.display().to_string(), message: e.to_string() })?;
            }
            Ok(if r.pass { 0 } else { 1 })
        }
        Cmd::Models => {
            for (a, what) in models::ALIASES {
                println!("{a:<10} {what}");
            }
            Ok(0)
        }
    }
}

fn parse_sampler(spec: Option<&str>) -> Result<Option<lockstep_engine::SamplerConfig>, HarnessError> {
    spec.map(|s| lockstep_engine::SamplerConfig::parse(s).map_err(|e| HarnessError::Usage(e.to_string().trim_start_matches("input: ").to_string())))
        .transpose()
}
