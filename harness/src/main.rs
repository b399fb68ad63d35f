//! The `lockstep` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lockstep::driver::{self, Prompt, RunOptions};
use lockstep::error::HarnessError;
use lockstep::python::{RefSpec, Reference};
use lockstep::tolerance::Precision;
use lockstep::{models, report};

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

#[derive(Subcommand)]
enum Cmd {
    /// Run the engine and a reference in lockstep and compare every site at every step.
    Run {
        /// Model: a Hugging Face directory, a .gguf file, or an alias (smollm2, tiny, tiny-gguf).
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
    },
    /// Generate greedily with the engine alone and print the text.
    Generate {
        /// Model: a Hugging Face directory, a .gguf file, or an alias (smollm2, tiny, tiny-gguf).
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
        Cmd::Run { model, reference, prompt, steps, json, f64 } => {
            if steps == 0 {
                return Err(HarnessError::Usage("--steps must be at least 1".into()));
            }
            // Check the cheap things (reference name, model path) before loading anything.
            let specs = RefSpec::parse_list(&reference)?;
            let path = models::resolve(&model)?;
            let precision = if f64 { Precision::F64 } else { Precision::F32 };
            let opts = RunOptions { model: path.clone(), references: specs.clone(), prompt: prompt.to_prompt(), steps, precision };
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
        Cmd::Generate { model, prompt, n, f64 } => {
            let path = models::resolve(&model)?;
            let precision = if f64 { Precision::F64 } else { Precision::F32 };
            let opts = RunOptions { model: path, references: vec![], prompt: prompt.to_prompt(), steps: n, precision };
            let m = driver::load_engine(&opts)?;
            let ids = driver::engine_prompt_ids(&m, &opts.prompt)?;
            let out = lockstep_engine::generate::generate_greedy(&m.model, &ids, n, &m.stop_ids())?;
            let text = m.tokenizer.decode(&out, true)?;
            println!("{text}");
            Ok(0)
        }
        Cmd::Models => {
            for (a, what) in models::ALIASES {
                println!("{a:<10} {what}");
            }
            Ok(0)
        }
    }
}
