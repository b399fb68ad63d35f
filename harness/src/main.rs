//! The `lockstep` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lockstep::driver::{self, Prompt, RunOptions};
use lockstep::error::HarnessError;
use lockstep::manifest::Manifest;
use lockstep::python::{Capability, RefSpec, Reference};
use lockstep::record::{KeepPolicy, RecordRequest};
use lockstep::tolerance::Precision;
use lockstep::{models, parity, record, report, trace};
use lockstep_engine::{Faults, WeightsMode};

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

#[derive(Clone, Copy, clap::ValueEnum)]
enum LoraModeArg {
    Unmerged,
    Merged,
}

#[derive(Args, Clone)]
struct LoraArgs {
    /// A LoRA adapter directory, PEFT (adapter_model.safetensors) or mlx-lm
    /// (adapters.safetensors) format; every side loads it (see README, "LoRA adapters").
    #[arg(long)]
    lora: Option<PathBuf>,
    /// How the engine applies the adapter: unmerged (y = Wx + s*B(Ax)) or merged
    /// (W + s*BA; a quantized W is dequantized first).
    #[arg(long, value_enum, default_value = "unmerged")]
    lora_mode: LoraModeArg,
}

impl LoraArgs {
    fn options(&self) -> Option<lockstep_engine::LoraOptions> {
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
enum Cmd {
    /// Run the engine and a reference in lockstep and compare every site at every step.
    Run {
        /// Model: a Hugging Face directory, a .gguf file, or an alias (`lockstep models` lists them).
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
        /// Inject faults into the engine: NAME[:LAYER], comma-separated (`lockstep faults`).
        #[arg(long)]
        inject: Option<String>,
        #[command(flatten)]
        lora: LoraArgs,
    },
    /// Print the LoRA adapter inventories (per module: shapes, dtype, rank, scale,
    /// checksums) and the effective LoRA configuration of the engine and the references,
    /// with their diff, without generating (exit 1 if they differ).
    Inspect {
        /// Model: a Hugging Face directory, a .gguf file, or an alias.
        #[arg(long)]
        model: String,
        /// References, comma-separated: transformers, mlx.
        #[arg(long, default_value = "transformers")]
        reference: String,
        #[arg(long, value_enum)]
        weights: Option<WeightsArg>,
        #[command(flatten)]
        lora: LoraArgs,
        /// Write the inventories as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Find where the engine first leaves the reference: step, layer, site, whether the
    /// layer is wrong by itself, and the most likely cause with its evidence.
    Bisect {
        /// Model: a Hugging Face directory, a .gguf file, or an alias (`lockstep models` lists them).
        #[arg(long)]
        model: String,
        /// The reference to bisect against (the first one is used for isolation).
        #[arg(long, default_value = "transformers")]
        reference: String,
        #[command(flatten)]
        prompt: PromptArgs,
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Write the bisect report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, value_enum)]
        weights: Option<WeightsArg>,
        /// Inject faults into the engine: NAME[:LAYER], comma-separated (`lockstep faults`).
        #[arg(long)]
        inject: Option<String>,
        /// Reference tensors kept for isolation beyond this size are dropped (statistics stay).
        #[arg(long, default_value_t = 256)]
        max_capture_mb: usize,
        /// Sample as `run --sampler` does; each reference's own sampler is compared at every step.
        #[arg(long)]
        sampler: Option<String>,
        #[command(flatten)]
        lora: LoraArgs,
    },
    /// List the fault catalog; with --check, inject each fault and bisect it.
    Faults {
        /// Inject every applicable fault in turn and check that bisect localizes it.
        #[arg(long)]
        check: bool,
        #[arg(long, default_value = "tiny")]
        model: String,
        #[arg(long, default_value = "transformers")]
        reference: String,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, value_enum)]
        weights: Option<WeightsArg>,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run every fault with this LoRA adapter on every side (the LoRA faults need one).
        #[command(flatten)]
        lora: LoraArgs,
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
        /// GGUF weights: quantized (default for GGUF) or dequant (f32). Recorded in the trace;
        /// replays load them the same way.
        #[arg(long, value_enum)]
        weights: Option<WeightsArg>,
        /// A LoRA adapter directory on every side (the engine unmerged); recorded in the trace
        /// (path, sha256, the reference's inventory), which then replays only with it.
        #[arg(long)]
        lora: Option<PathBuf>,
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
        /// Inject faults into the engine: NAME[:LAYER], comma-separated (`lockstep faults`).
        #[arg(long)]
        inject: Option<String>,
        /// Sample instead of greedy (same syntax as `run --sampler`); seeded, reproducible.
        #[arg(long)]
        sampler: Option<String>,
        #[command(flatten)]
        lora: LoraArgs,
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
    /// Run a suite of cases (scripts/suites/*.toml) and write a report: DIR/index.html,
    /// DIR/report.json, DIR/summary.md, DIR/cases/*.json. Re-running with the same --out
    /// resumes. Exit 1 on a regression against --history (without it: on any case not as
    /// expected), 2 on a usage or input error.
    Report(ReportArgs),
    /// List the model aliases.
    Models,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ReportArgs {
    #[command(subcommand)]
    cmd: Option<ReportCmd>,
    /// The suite file (e.g. scripts/suites/ci.toml).
    #[arg(long, required = true)]
    suite: Option<PathBuf>,
    /// The report directory (finished cases in it are not run again).
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Run only shard I of N (1-based; case k goes to shard k % N + 1); join with `report merge`.
    #[arg(long)]
    shard: Option<String>,
    /// Append one JSON line per case to this file; the page shows the trend and the exit code
    /// flags regressions against the previous line of each case.
    #[arg(long)]
    history: Option<PathBuf>,
    /// Also write each case's complete run report (as `lockstep run --json`: every site of
    /// every step) to DIR/runs/NAME.json; the page links it.
    #[arg(long)]
    full_json: bool,
    /// List the suite's cases (the matrices expanded) with their shard, and run nothing.
    #[arg(long)]
    list: bool,
}

#[derive(Subcommand)]
enum ReportCmd {
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
    },
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
        Cmd::Run { model, reference, prompt, steps, json, f64, weights, inject, sampler, strict_config, lora } => {
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
                faults: Faults::parse(inject.as_deref().unwrap_or(""))?,
                bisect: false,
                sampler,
                strict_config,
                lora: lora.options(),
            };
            let mut opts = opts;
            let engine = driver::load_engine(&opts)?;
            let refs = specs
                .iter()
                .map(|s| Reference::load_with_lora(s, &path, lora.lora.as_deref()))
                .collect::<Result<Vec<_>, _>>()?;
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
        Cmd::Record { model, reference, prompt, steps, name, full_layers, budget_mb, out, weights, lora } => {
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
                weights: weights.map(WeightsArg::mode),
                lora,
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
                    weights: c.weights_mode(),
                    lora: c.lora_dir(),
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
        Cmd::Generate { model, prompt, n, f64, weights, inject, sampler, lora } => {
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
                faults: Faults::parse(inject.as_deref().unwrap_or(""))?,
                bisect: false,
                sampler: sampler.clone(),
                strict_config: false,
                lora: lora.options(),
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
                    // A reference whose module declares the bench capability (references/bench.py times it).
                    other => match RefSpec::parse(other) {
                        Ok(spec) if spec.label() == other && spec.trace.is_none() && !spec.is_oracle() && spec.declaration()?.declares(Capability::Bench) => {
                            lockstep::bench::reference(&spec.name, &path, threads, &ids, decode, repeats)?
                        }
                        _ => {
                            let mut refs = lockstep::python::references_declaring(Capability::Bench);
                            refs.sort_unstable();
                            return Err(HarnessError::Usage(format!(
                                "unknown bench side `{other}` (engine, engine-dequant, {})",
                                refs.join(", ")
                            )));
                        }
                    },
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
        Cmd::Bisect { model, reference, prompt, steps, json, weights, inject, max_capture_mb, sampler, lora } => {
            let sampler = parse_sampler(sampler.as_deref())?;
            if steps == 0 {
                return Err(HarnessError::Usage("--steps must be at least 1".into()));
            }
            let specs = RefSpec::parse_list(&reference)?;
            let path = models::resolve(&model)?;
            let opts = RunOptions {
                model: path.clone(),
                references: specs.clone(),
                prompt: prompt.to_prompt(),
                steps,
                precision: Precision::F32,
                weights: weights.map(WeightsArg::mode),
                faults: Faults::parse(inject.as_deref().unwrap_or(""))?,
                bisect: true,
                sampler,
                strict_config: false,
                lora: lora.options(),
            };
            let engine = driver::load_engine(&opts)?;
            let refs = specs
                .iter()
                .map(|s| Reference::load_with_lora(s, &path, lora.lora.as_deref()))
                .collect::<Result<Vec<_>, _>>()?;
            let (mut rep, _run) = lockstep::bisect::bisect(&opts, &engine, &refs, max_capture_mb)?;
            rep.steps_requested = steps;
            print!("{}", lockstep::bisect::render(&rep, &path.display().to_string(), &reference));
            if let Some(j) = json {
                let text = serde_json::to_string_pretty(&rep).map_err(|e| HarnessError::Usage(e.to_string()))?;
                std::fs::write(&j, text + "\n")
                    .map_err(|e| HarnessError::Io { path: j.display().to_string(), message: e.to_string() })?;
            }
            Ok(if rep.found { 1 } else { 0 })
        }
        Cmd::Faults { check, model, reference, steps, weights, json, lora } => {
            use lockstep_engine::faults::{Layer, CATALOG, DEFAULT_FAULT_LAYER};
            if !check {
                println!("{:<20} {:<5} {:<8} {:<10} {:<17} bug / where injected", "fault", "step", "layer", "site", "diagnosis");
                for f in CATALOG {
                    let layer = match f.layer {
                        Layer::None => "-".to_string(),
                        Layer::First => "0".to_string(),
                        Layer::Injected => format!("{DEFAULT_FAULT_LAYER} (:N)"),
                    };
                    println!("{:<20} {:<5} {:<8} {:<10} {:<17} {}", f.name, f.step, layer, f.site, f.diagnosis, f.bug);
                    println!("{:<64} in {}{}", "", f.code_path, if f.needs.is_empty() { String::new() } else { format!("; needs {}", f.needs) });
                }
                return Ok(0);
            }
            let path = models::resolve(&model)?;
            let specs = RefSpec::parse_list(&reference)?;
            let refs = specs
                .iter()
                .map(|s| Reference::load_with_lora(s, &path, lora.lora.as_deref()))
                .collect::<Result<Vec<_>, _>>()?;
            let results = lockstep::bisect::check_catalog(&path, &specs, &refs, steps, weights.map(WeightsArg::mode), lora.options())?;
            print!("{}", lockstep::bisect::render_check(&results, &path.display().to_string(), &reference));
            if let Some(j) = json {
                let text = serde_json::to_string_pretty(&results).map_err(|e| HarnessError::Usage(e.to_string()))?;
                std::fs::write(&j, text + "\n")
                    .map_err(|e| HarnessError::Io { path: j.display().to_string(), message: e.to_string() })?;
            }
            Ok(if results.iter().all(|r| r.ok) { 0 } else { 1 })
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
        Cmd::Report(a) => {
            use lockstep::nightly;
            let (rep, code, out) = match a.cmd {
                Some(ReportCmd::Merge { dirs, out, history }) => {
                    let (rep, code) = nightly::merge(&dirs, &out, history.as_deref())?;
                    (rep, code, out)
                }
                None => {
                    let (suite, out) = (a.suite.expect("clap requires --suite"), a.out.expect("clap requires --out"));
                    let shard = a.shard.as_deref().map(lockstep::suite::Shard::parse).transpose()?;
                    if a.list {
                        let s = lockstep::suite::Suite::load(&suite)?;
                        for (k, c) in s.cases.iter().enumerate().filter(|(k, _)| shard.is_none_or(|sh| sh.has(*k))) {
                            let what = match (&c.chat, &c.prompt) {
                                (Some(ch), _) => format!("chat {ch:?}"),
                                (None, Some(p)) => format!("prompt {p:?}"),
                                _ => String::new(),
                            };
                            println!(
                                "{k:>3} {:<44} {} weights={} vs {} {what} steps={} sampler={} tolerance={}{}{}",
                                c.name,
                                c.model,
                                c.weights,
                                c.references.join(","),
                                c.steps,
                                c.sampler.as_deref().unwrap_or("greedy"),
                                c.tolerance,
                                c.inject.as_deref().map(|f| format!(" inject={f}")).unwrap_or_default(),
                                c.lora.as_deref().map(|l| format!(" lora={l}")).unwrap_or_default(),
                            );
                        }
                        return Ok(0);
                    }
                    let o = nightly::RunReportOptions { suite, out: out.clone(), shard, history: a.history, full_json: a.full_json };
                    let (rep, code) = nightly::run_report(&o)?;
                    (rep, code, out)
                }
            };
            print!("{}", lockstep::html::summary_md(&rep));
            println!("\nreport: {}", out.join("index.html").display());
            Ok(code)
        }
        Cmd::Inspect { model, reference, weights, lora, json } => {
            let specs = RefSpec::parse_list(&reference)?;
            let path = models::resolve(&model)?;
            let Some(lopts) = lora.options() else {
                println!("lockstep inspect\n  model      {}\n  adapter    none (give --lora DIR)", path.display());
                return Ok(0);
            };
            let engine = lockstep_engine::load(
                &path,
                &lockstep_engine::LoadOptions { weights: weights.map(WeightsArg::mode), lora: Some(lopts), ..Default::default() },
            )?;
            let refs = specs
                .iter()
                .map(|s| Reference::load_with_lora(s, &path, lora.lora.as_deref()))
                .collect::<Result<Vec<_>, _>>()?;
            let rep = lockstep::lora::inventory_report(&engine, &refs)?;
            println!("lockstep inspect\n  model      {}", path.display());
            for s in &rep.sides {
                println!("  config     {:<12} {}", s.side, s.config);
            }
            print!("{}", lockstep::lora::render_inventory(&rep));
            print!("{}", lockstep::lora::render_modules(&rep));
            print!("{}", lockstep::lora::render_checks(&rep));
            if let Some(j) = json {
                let text = serde_json::to_string_pretty(&rep).map_err(|e| HarnessError::Usage(e.to_string()))?;
                std::fs::write(&j, text + "\n")
                    .map_err(|e| HarnessError::Io { path: j.display().to_string(), message: e.to_string() })?;
            }
            Ok(if rep.divergence().is_some() { 1 } else { 0 })
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
