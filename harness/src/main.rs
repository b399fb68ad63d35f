//! The `lockstep` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lockstep::driver::{self, Prompt, RunOptions};
use lockstep::error::HarnessError;
use lockstep::manifest::Manifest;
use lockstep::python::{RefSpec, Reference};
use lockstep::record::{KeepPolicy, RecordRequest};
use lockstep::tolerance::Precision;
use lockstep::{models, parity, record, report, trace};

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
        /// float64 as an oracle (e.g. transformers,mlx,transformers:f64); trace:NAME replays a
        /// recorded trace without Python (e.g. trace:tiny-hf.transformers).
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
    /// Run in lockstep with live references and record their answers as golden traces
    /// (snapshots/traces/NAME.safetensors + NAME.json; with several references NAME.REFERENCE.*).
    Record {
        /// Model: a Hugging Face directory, a .gguf file, or an alias (smollm2, tiny, tiny-gguf).
        #[arg(long)]
        model: String,
        /// Live references to record, comma-separated (transformers, mlx, llamacpp, NAME:f64).
        #[arg(long, default_value = "transformers")]
        reference: String,
        #[command(flatten)]
        prompt: PromptArgs,
        /// Number of steps: the prefill, then one token per step.
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Trace name.
        #[arg(long)]
        name: String,
        /// Layers whose sites are kept in full, comma-separated; the other layers' sites are
        /// kept as sketches (logits, caches, embed and final_norm always in full). Default:
        /// every layer.
        #[arg(long, value_delimiter = ',')]
        full_layers: Option<Vec<usize>>,
        /// Refuse to write a trace larger than this many MB.
        #[arg(long)]
        budget_mb: Option<f64>,
        /// Directory to write the traces to (default: snapshots/traces, or $LOCKSTEP_TRACES).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Re-record every case of snapshots/traces/manifest.toml (what `make snapshots` runs).
    Snapshots {
        /// Only these cases (repeatable).
        #[arg(long = "case")]
        cases: Vec<String>,
        /// Another manifest.
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Replay a golden case (or one trace) against the engine, without Python.
    Replay {
        /// A case of snapshots/traces/manifest.toml, or a trace name.
        name: String,
        /// Print the parity summary that `cargo test` snapshots.
        #[arg(long)]
        summary: bool,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
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

fn print_replay_notes(refs: &[Reference]) {
    for r in refs {
        for n in r.replay().map(|x| x.notes()).unwrap_or_default() {
            println!("{}: {n}", r.name);
        }
    }
}

/// Records, prints the run's report, and says what was written.
fn record_and_report(req: &RecordRequest) -> Result<record::Recorded, HarnessError> {
    let rec = record::record(req)?;
    print!("{}", report::render_table(&rec.result, &rec.refs, &rec.model, &rec.sha256));
    for (name, bytes) in &rec.written {
        println!("wrote trace {name}: {}.safetensors ({:.2} MB) + .json", req.dir.join(name).display(), *bytes as f64 / 1e6);
    }
    Ok(rec)
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
            let mut opts = opts;
            let engine = driver::load_engine(&opts)?;
            let refs = specs.iter().map(|s| Reference::load(s, &path)).collect::<Result<Vec<_>, _>>()?;
            // A trace holds the steps it recorded: run no further than the shortest.
            if let Some(held) = refs.iter().filter_map(|r| r.trace().map(|t| t.meta.steps)).min() {
                if held < opts.steps {
                    eprintln!("note: the traces hold {held} steps: running {held} of the {} asked for", opts.steps);
                    opts.steps = held;
                }
            }
            let result = driver::run(&opts, &engine, &refs)?;
            let sha = trace::model_sha256_cached(&path)?;
            print!("{}", report::render_table(&result, &refs, &path, &sha));
            print_replay_notes(&refs);
            if let Some(j) = json {
                report::write_json(&j, &result, &refs, &path, &sha)?;
                println!("report: {}", j.display());
            }
            Ok(if result.verdict_pass { 0 } else { 1 })
        }
        Cmd::Record { model, reference, prompt, steps, name, full_layers, budget_mb, out } => {
            if steps == 0 {
                return Err(HarnessError::Usage("--steps must be at least 1".into()));
            }
            let specs = RefSpec::parse_list(&reference)?;
            let names: Vec<String> = if specs.len() == 1 {
                vec![name.clone()]
            } else {
                specs.iter().map(|s| format!("{name}.{}", s.label().replace(':', "-"))).collect()
            };
            let req = RecordRequest {
                model_arg: model,
                references: specs,
                prompt: prompt.to_prompt(),
                steps,
                names,
                policy: KeepPolicy { full_layers },
                weights: "native".into(),
                budget_bytes: budget_mb.map(|b| (b * 1e6) as u64),
                dir: out.unwrap_or_else(trace::traces_dir),
            };
            record_and_report(&req)?;
            Ok(0)
        }
        Cmd::Snapshots { cases, manifest } => {
            let m = match manifest {
                Some(p) => Manifest::load(&p)?,
                None => Manifest::load_default()?,
            };
            for c in &cases {
                m.case(c)?;
            }
            let dir = m.path.parent().map(PathBuf::from).unwrap_or_else(trace::traces_dir);
            let t0 = std::time::Instant::now();
            let mut total = 0u64;
            for c in m.cases.iter().filter(|c| cases.is_empty() || cases.contains(&c.name)) {
                println!("== case {} ==", c.name);
                let t = std::time::Instant::now();
                let req = RecordRequest {
                    model_arg: c.model.clone(),
                    references: c.references.iter().map(|r| RefSpec::parse(r)).collect::<Result<_, _>>()?,
                    prompt: c.prompt(),
                    steps: c.steps,
                    names: c.trace_names(),
                    policy: KeepPolicy { full_layers: c.full_layers.clone() },
                    weights: c.weights.clone(),
                    budget_bytes: Some(c.budget_bytes()),
                    dir: dir.clone(),
                };
                let rec = record_and_report(&req)?;
                total += rec.written.iter().map(|(_, b)| b).sum::<u64>();
                println!("case {}: recorded in {:.1} s", c.name, t.elapsed().as_secs_f64());
                let expected = match c.expect {
                    lockstep::manifest::Expect::Pass => rec.result.verdict_pass,
                    lockstep::manifest::Expect::Diverged => !rec.result.verdict_pass,
                };
                if !expected {
                    eprintln!(
                        "warning: case {} expects {:?} but the live run's verdict is {}",
                        c.name,
                        c.expect,
                        if rec.result.verdict_pass { "pass" } else { "diverged" }
                    );
                }
            }
            let wanted = m.trace_names();
            let orphans: Vec<String> = trace::list_traces(&dir).into_iter().filter(|t| !wanted.contains(t)).collect();
            if !orphans.is_empty() {
                eprintln!(
                    "warning: traces in {} that no case of {} records (cargo test fails on them): {}",
                    dir.display(),
                    m.path.display(),
                    orphans.join(", ")
                );
            }
            println!("recorded {:.2} MB of traces in {:.1} s", total as f64 / 1e6, t0.elapsed().as_secs_f64());
            Ok(0)
        }
        Cmd::Replay { name, summary, json } => {
            let case = Manifest::load_default().ok().and_then(|m| m.case(&name).ok().cloned());
            let traces = match &case {
                Some(c) => c.trace_names(),
                None => vec![name.clone()],
            };
            let r = parity::replay_traces(&name, &traces)?;
            print!("{}", report::render_table(&r.result, &r.refs, &r.model, &r.sha256));
            print_replay_notes(&r.refs);
            if summary {
                println!("\n{}", r.summary);
            }
            if let Some(j) = json {
                report::write_json(&j, &r.result, &r.refs, &r.model, &r.sha256)?;
                println!("report: {}", j.display());
            }
            Ok(if r.result.verdict_pass { 0 } else { 1 })
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
