//! One function per command. Each validates its flags into the harness's options, does its
//! work and says whether everything it compared passed ([`Outcome`]); `main` turns that, or
//! an error, into the exit code.

use std::path::{Path, PathBuf};

use crate::cli::output::{out, outln};
use crate::compare::tolerance::Precision;
use crate::error::HarnessError;
use crate::golden::manifest::{Expect, Manifest};
use crate::golden::record::{self, KeepPolicy, RecordRequest};
use crate::golden::{parity, trace};
use crate::lockstep::options::{engine_prompt_ids, load_engine, parse_sampler, RunOptions};
use crate::lockstep::run as driver;
use crate::models;
use crate::reference::{Capability, RefSpec, Reference};
use crate::report::table as report;
use crate::results::run::LoadTime;
use crate::ui::Phase;
use crate::cli::live::{self, Head};
use lockstep_engine::{Faults, WeightsMode};
use serde::Serialize;

use super::args::*;

/// What a command found: exit 0 when everything compared passes (drift allowed), 1 when
/// something diverged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Diverged,
    /// The exit code of a worker process (`lockstep report`'s supervisor passes it on).
    Exit(u8),
}

impl Outcome {
    fn of(pass: bool) -> Outcome {
        if pass {
            Outcome::Pass
        } else {
            Outcome::Diverged
        }
    }
}

pub fn dispatch(cmd: Cmd) -> Result<Outcome, HarnessError> {
    // The commands that run references stop cleanly on Ctrl-C (crate::interrupt); the others
    // keep the default (the process ends at once: they write nothing).
    if !matches!(cmd, Cmd::Generate(_) | Cmd::Models | Cmd::Inspect(_) | Cmd::Doctor) {
        crate::interrupt::install();
    }
    match cmd {
        Cmd::Run(a) => run(a),
        Cmd::Inspect(a) => inspect(a),
        Cmd::Bisect(a) => bisect(a),
        Cmd::Faults(a) => faults(a),
        Cmd::Record(a) => record_cmd(a),
        Cmd::Snapshots(a) => snapshots(a),
        Cmd::Replay(a) => replay(a),
        Cmd::Generate(a) => generate(a),
        Cmd::Tokcheck(a) => tokcheck(a),
        Cmd::Bench(a) => bench(a),
        Cmd::QuantCheck(a) => quant_check(a),
        Cmd::Report(a) => report_cmd(a),
        Cmd::Doctor => crate::doctor::run().map(Outcome::of),
        Cmd::Models => {
            for (a, what) in models::ALIASES {
                outln!("{a:<10} {what}");
            }
            Ok(Outcome::Pass)
        }
    }
}

// ------------------------------------------------------------------ shared steps

/// The flags every lockstep-running command shares, validated into [`RunOptions`] (the
/// cheap checks, reference names and the model path, before anything loads).
struct RunFlags<'a> {
    model: &'a str,
    reference: &'a str,
    prompt: &'a PromptArgs,
    steps: usize,
    precision: Precision,
    weights: Option<WeightsArg>,
    inject: Option<&'a str>,
    sampler: Option<&'a str>,
    lora: &'a LoraArgs,
    length: Option<&'a LengthArgs>,
}

impl RunFlags<'_> {
    fn options(&self, bisect: bool, strict_config: bool) -> Result<RunOptions, HarnessError> {
        if self.steps == 0 {
            return Err(HarnessError::ZeroSteps);
        }
        let (context, prefill_chunk, max_memory) = match self.length {
            Some(l) => (l.context, l.prefill_chunk, l.max_memory),
            None => (None, crate::lockstep::options::DEFAULT_PREFILL_CHUNK, None),
        };
        if prefill_chunk == 0 {
            return Err(HarnessError::Usage("--prefill-chunk 0: a piece of a prompt holds at least one token".into()));
        }
        let sampler = parse_sampler(self.sampler)?;
        let references = if self.reference.is_empty() { vec![] } else { RefSpec::parse_list(self.reference)? };
        Ok(RunOptions {
            engine: crate::plugin::EngineSpec::under_test(),
            model: models::resolve(self.model)?,
            references,
            prompt: self.prompt.to_prompt()?,
            steps: self.steps,
            precision: self.precision,
            weights: self.weights.map(WeightsArg::mode),
            faults: Faults::parse(self.inject.unwrap_or(""))?,
            bisect,
            sampler,
            strict_config,
            lora: self.lora.options(),
            context,
            prefill_chunk,
            max_memory,
        })
    }
}

/// Every reference of `specs`, loaded for `model` (with the adapter, if any), each with a
/// spinner on a terminal; their load times.
fn load_references_timed(
    specs: &[RefSpec],
    model: &Path,
    lora: Option<&Path>,
    context: Option<usize>,
) -> Result<(Vec<Reference>, Vec<LoadTime>), HarnessError> {
    let mut refs = vec![];
    let mut times = vec![];
    for s in specs {
        let phase = Phase::start(format!("loading the {} reference ({})", s.label(), short_path(model)));
        let r = Reference::load_for_run(s, model, lora, context);
        let secs = phase.done();
        let r = r?;
        crate::interrupt::check()?;
        times.push(LoadTime { side: r.name.clone(), seconds: secs });
        refs.push(r);
    }
    Ok((refs, times))
}

/// Every reference of `specs`, loaded for `model` (with the adapter, if any).
fn load_references(specs: &[RefSpec], model: &Path, lora: Option<&Path>) -> Result<Vec<Reference>, HarnessError> {
    load_references_timed(specs, model, lora, None).map(|(r, _)| r)
}

/// The engine under test, loaded with a spinner on a terminal; its load time.
fn load_engine_timed(opts: &RunOptions) -> Result<(lockstep_engine::LoadedModel, LoadTime), HarnessError> {
    let phase = Phase::start(format!("loading the engine ({})", short_path(&opts.model)));
    let e = load_engine(opts);
    let secs = phase.done();
    Ok((e?, LoadTime { side: "engine".into(), seconds: secs }))
}

/// The last two components of a path (what a spinner has room for).
fn short_path(p: &Path) -> String {
    let parts: Vec<_> = p.components().rev().take(2).collect();
    parts.iter().rev().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), HarnessError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| HarnessError::Usage(e.to_string()))?;
    crate::paths::write_output(path, (text + "\n").as_bytes())
}

/// `--junit PATH`: the JUnit XML report (`-`: standard output).
fn write_junit(path: Option<&Path>, xml: impl FnOnce() -> String) -> Result<(), HarnessError> {
    match path {
        Some(p) => crate::paths::write_output(p, xml().as_bytes()),
        None => Ok(()),
    }
}

fn print_replay_notes(refs: &[Reference]) {
    for r in refs {
        for n in r.replay().map(|x| x.notes()).unwrap_or_default() {
            outln!("{}: {n}", r.name);
        }
    }
}

/// The end of a streamed run's report: everything after the rows (the verdict alone with
/// `--quiet`).
fn print_run_end(r: &crate::results::run::RunResult, refs: &[Reference]) {
    if crate::ui::get().quiet {
        out!("{}", report::render_verdict(r, refs));
    } else {
        crate::ui::print_above(&crate::ui::paint_verdicts(&report::render_tail(r, refs)));
    }
}

/// Records, prints the run's report (its rows as they come), and says what was written.
fn record_and_report(req: &RecordRequest) -> Result<record::Recorded, HarnessError> {
    let rec = {
        let _stream = live::stream(Head::Full);
        record::record(req)?
    };
    print_run_end(&rec.result, &rec.refs);
    for (name, bytes) in rec.written.iter().filter(|_| !crate::ui::get().quiet) {
        outln!("wrote trace {name}: {}.safetensors ({:.2} MB) + .json", req.dir.join(name).display(), *bytes as f64 / 1e6);
    }
    Ok(rec)
}

// ------------------------------------------------------------------ commands

fn run(a: RunArgs) -> Result<Outcome, HarnessError> {
    if let Some(j) = &a.json {
        crate::paths::check_writable_file(j, "--json")?;
    }
    let flags = RunFlags {
        model: &a.model,
        reference: &a.reference,
        prompt: &a.prompt,
        steps: a.steps,
        precision: if a.f64 { Precision::F64 } else { Precision::F32 },
        weights: a.weights,
        inject: a.inject.as_deref(),
        sampler: a.sampler.as_deref(),
        lora: &a.lora,
        length: Some(&a.length),
    };
    let mut opts = flags.options(false, a.strict_config)?;
    let (engine, engine_load) = load_engine_timed(&opts)?;
    // A prompt that encodes to no tokens is said now, not after the references have loaded.
    let ids = crate::lockstep::options::engine_prompt_ids(&engine, &opts.prompt)?;
    let context = opts.context_for(ids.len());
    let (refs, ref_loads) = load_references_timed(&opts.references, &opts.model, a.lora.lora.as_deref(), Some(context))?;
    // A trace holds the steps it recorded: run no further than the shortest.
    if let Some(held) = refs.iter().filter_map(|r| r.trace().map(|t| t.meta.steps)).min() {
        if held < opts.steps {
            eprintln!("note: the traces hold {held} steps: running {held} of the {} asked for", opts.steps);
            opts.steps = held;
        }
    }
    let mut result = {
        let _stream = live::stream(Head::Full);
        driver::run(&opts, &engine, &refs)?
    };
    result.summary.load = std::iter::once(engine_load).chain(ref_loads).collect();
    let sha = trace::model_sha256_cached(&opts.model)?;
    print_run_end(&result, &refs);
    if !crate::ui::get().quiet {
        print_replay_notes(&refs);
    }
    if let Some(j) = a.json {
        report::write_json(&j, &result, &refs, &opts.model, &sha)?;
        if !crate::paths::is_stdout(&j) {
            outln!("report: {}", j.display());
        }
    }
    write_junit(a.junit.as_deref(), || crate::report::junit::from_run(&result, &opts.model.display().to_string(), &a.reference))?;
    Ok(Outcome::of(result.verdict_pass))
}

fn record_cmd(a: RecordArgs) -> Result<Outcome, HarnessError> {
    if a.steps == 0 {
        return Err(HarnessError::ZeroSteps);
    }
    trace::check_name(&a.name)?;
    if let Some(out) = &a.out {
        // Made if missing (as the traces are written there), checked before anything runs.
        std::fs::create_dir_all(out).map_err(|e| HarnessError::Io {
            path: out.display().to_string(),
            message: format!("cannot create this directory: {e} (record --out): nothing was run"),
        })?;
        crate::paths::check_writable_dir(out, "record --out")?;
    }
    let specs = RefSpec::parse_list(&a.reference)?;
    let names: Vec<String> = if specs.len() == 1 {
        vec![a.name.clone()]
    } else {
        specs.iter().map(|s| format!("{}.{}", a.name, s.label().replace(':', "-"))).collect()
    };
    let req = RecordRequest {
        model_arg: a.model,
        references: specs,
        prompt: a.prompt.to_prompt()?,
        steps: a.steps,
        names,
        policy: KeepPolicy { full_layers: a.full_layers, only: None },
        engine_sites: a.engine_sites,
        weights: a.weights.map(WeightsArg::mode),
        lora: a.lora,
        budget_bytes: a.budget_mb.map(|b| (b * 1e6) as u64),
        dir: a.out.unwrap_or_else(trace::traces_dir),
    };
    record_and_report(&req)?;
    Ok(Outcome::Pass)
}

fn snapshots(a: SnapshotsArgs) -> Result<Outcome, HarnessError> {
    let m = match a.manifest {
        Some(p) => Manifest::load(&p)?,
        None => Manifest::load_default()?,
    };
    for c in &a.cases {
        m.case(c)?;
    }
    let dir = m.path.parent().map(PathBuf::from).unwrap_or_else(trace::traces_dir);
    let t0 = std::time::Instant::now();
    let mut total = 0u64;
    for c in m.cases.iter().filter(|c| a.cases.is_empty() || a.cases.contains(&c.name)) {
        outln!("== case {} ==", c.name);
        let t = std::time::Instant::now();
        let req = RecordRequest {
            model_arg: c.model.clone(),
            references: c.references.iter().map(|r| RefSpec::parse(r)).collect::<Result<_, _>>()?,
            prompt: c.prompt(),
            steps: c.steps,
            names: c.trace_names(),
            policy: KeepPolicy { full_layers: c.full_layers.clone(), only: None },
            engine_sites: false,
            weights: c.weights_mode(),
            lora: c.lora_dir(),
            budget_bytes: Some(c.budget_bytes()),
            dir: dir.clone(),
        };
        let rec = record_and_report(&req)?;
        total += rec.written.iter().map(|(_, b)| b).sum::<u64>();
        outln!("case {}: recorded in {:.1} s", c.name, t.elapsed().as_secs_f64());
        let expected = match c.expect {
            Expect::Pass => rec.result.verdict_pass,
            Expect::Diverged => !rec.result.verdict_pass,
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
    outln!("recorded {:.2} MB of traces in {:.1} s", total as f64 / 1e6, t0.elapsed().as_secs_f64());
    Ok(Outcome::Pass)
}

fn replay(a: ReplayArgs) -> Result<Outcome, HarnessError> {
    if let Some(j) = &a.json {
        crate::paths::check_writable_file(j, "--json")?;
    }
    let case = Manifest::load_default().ok().and_then(|m| m.case(&a.name).ok().cloned());
    let traces = match &case {
        Some(c) => c.trace_names(),
        None => vec![a.name.clone()],
    };
    let r = parity::replay_traces(&a.name, &traces)?;
    if crate::ui::get().quiet {
        out!("{}", report::render_verdict(&r.result, &r.refs));
        return Ok(Outcome::of(r.result.verdict_pass));
    }
    out!("{}", crate::ui::paint_verdicts(&report::render_table(&r.result, &r.refs, &r.model, &r.sha256)));
    print_replay_notes(&r.refs);
    if a.summary {
        outln!("\n{}", r.summary);
    }
    if let Some(j) = a.json {
        report::write_json(&j, &r.result, &r.refs, &r.model, &r.sha256)?;
        if !crate::paths::is_stdout(&j) {
            outln!("report: {}", j.display());
        }
    }
    Ok(Outcome::of(r.result.verdict_pass))
}

fn generate(a: GenerateArgs) -> Result<Outcome, HarnessError> {
    let flags = RunFlags {
        model: &a.model,
        reference: "",
        prompt: &a.prompt,
        steps: a.n.max(1),
        precision: if a.f64 { Precision::F64 } else { Precision::F32 },
        weights: a.weights,
        inject: a.inject.as_deref(),
        sampler: a.sampler.as_deref(),
        lora: &a.lora,
        length: None,
    };
    let opts = flags.options(false, false)?;
    let m = load_engine(&opts)?;
    let ids = engine_prompt_ids(&m, &opts.prompt)?;
    let out = match opts.sampler {
        None => lockstep_engine::generate::generate_greedy(m.model.as_ref(), &ids, a.n, &m.stop_ids())?,
        Some(c) => {
            let mut s = lockstep_engine::Sampler::new(c);
            lockstep_engine::generate::generate_sampled(m.model.as_ref(), &ids, a.n, &m.stop_ids(), &mut s)?
        }
    };
    outln!("{}", m.tokenizer.decode(&out, true)?);
    Ok(Outcome::Pass)
}

fn bench(a: BenchArgs) -> Result<Outcome, HarnessError> {
    use crate::bench;
    if a.threads == 0 || a.prefill == 0 {
        return Err(HarnessError::Usage("--threads and --prefill must be at least 1".into()));
    }
    bench::set_engine_threads(a.threads)?;
    let path = models::resolve(&a.model)?;
    let tok = lockstep_engine::load(&path, &lockstep_engine::LoadOptions::default())?;
    let text = "The quick brown fox jumps over the lazy dog while the history of Rome unfolds in many chapters.";
    let ids = bench::prompt_ids(&tok, text, a.prefill)?;
    drop(tok);
    let mut rows = vec![];
    for side in a.sides.split(',').map(str::trim) {
        let r = match side {
            "engine" => bench::engine(&path, WeightsMode::Quantized, &ids, a.decode, a.repeats)?,
            "engine-dequant" => bench::engine(&path, WeightsMode::Dequant, &ids, a.decode, a.repeats)?,
            // A reference whose module declares the bench capability (references/bench.py times it).
            other => match RefSpec::parse(other) {
                Ok(spec) if spec.label() == other && spec.trace.is_none() && !spec.is_oracle() && spec.declaration()?.declares(Capability::Bench) => {
                    bench::reference(&spec.name, &path, a.threads, &ids, a.decode, a.repeats)?
                }
                _ => {
                    let mut refs = crate::reference::python::references_declaring(Capability::Bench);
                    refs.sort_unstable();
                    return Err(HarnessError::Usage(format!("unknown bench side `{other}` (engine, engine-dequant, {})", refs.join(", "))));
                }
            },
        };
        eprintln!("  {}: prefill {:.1} tok/s, decode {:.1} tok/s", r.name, r.prefill_tps(), r.decode_tps());
        rows.push(r);
    }
    out!("{}", bench::render(&rows, a.threads, &path));
    bench_long_context(&a, &path, &ids, text)?;
    Ok(Outcome::Pass)
}

/// `bench`'s long-context part: the engine's decode step at each `--contexts` length, then
/// `lockstep run`s (child processes) for lockstep's per-step cost and peak memory.
fn bench_long_context(a: &BenchArgs, path: &Path, ids: &[u32], text: &str) -> Result<(), HarnessError> {
    use crate::bench;
    let list = |s: &str, flag: &str| -> Result<Vec<usize>, HarnessError> {
        s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(|x| x.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
            HarnessError::Usage(format!("{flag}: `{x}` is not a positive number of tokens"))
        })).collect()
    };
    let (contexts, prompts) = (list(&a.contexts, "--contexts")?, list(&a.memory_prompts, "--memory-prompts")?);
    if contexts.is_empty() && prompts.is_empty() {
        return Ok(());
    }
    // One load: the decode measurements and the prompts' tokenizer.
    let engine = lockstep_engine::load(path, &lockstep_engine::LoadOptions { weights: Some(WeightsMode::Quantized), ..Default::default() })?;
    let mut decode = vec![];
    for kv in lockstep_engine::KvDtype::ALL {
        for &c in &contexts {
            let s = bench::engine_decode_at(engine.model.as_ref(), ids, c, 16, kv)?;
            eprintln!("  engine decode step at context {c}, {} cache: {:.2} ms", kv.name(), s * 1e3);
            decode.push((c, kv, s));
        }
    }
    let exe = std::env::current_exe().map_err(|e| HarnessError::Usage(format!("bench: where is this binary? {e}")))?;
    let scratch = std::env::temp_dir().join(format!("lockstep-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| HarnessError::Io { path: scratch.display().to_string(), message: e.to_string() })?;
    let mut runs = vec![];
    let mut lengths: Vec<usize> = vec![];
    for &n in contexts.iter().chain(&prompts) {
        if !lengths.contains(&n) {
            lengths.push(n);
        }
    }
    for n in lengths {
        let prompt = bench::prompt_text(&engine, text, n)?;
        let args: Vec<String> = ["--model", &path.to_string_lossy(), "--weights", "dequant", "--reference", "transformers", "--steps", "9", "--prompt", &prompt]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = bench::run_cost(&exe, &args, &scratch)?;
        eprintln!("  lockstep run, prompt {} tokens: peak {:.0} MB, {:.1} ms per step, {:.1} ms of it lockstep's own", c.prompt_tokens, c.peak_mb, c.step_s * 1e3, c.overhead_s * 1e3);
        runs.push((n, c));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    out!("{}", bench::render_long(&decode, &runs, &contexts, &prompts));
    Ok(())
}

fn quant_check(a: QuantCheckArgs) -> Result<Outcome, HarnessError> {
    if let Some(j) = &a.json {
        crate::paths::check_writable_file(j, "--json")?;
    }
    use crate::checks::quantcheck::{self, Status};
    let path = models::resolve(&a.file)?;
    let c = quantcheck::run(&path)?;
    if crate::ui::get().quiet {
        outln!("quant-check: {} tensors, {} differ", c.tensors.len(), c.count(|s| matches!(s, Status::Differs { .. })));
    } else {
        out!("{}", crate::ui::fit(&quantcheck::render(&c)));
    }
    if let Some(j) = a.json {
        write_json(&j, &c)?;
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
    Ok(Outcome::of(c.count(|s| matches!(s, Status::Differs { .. })) == 0))
}

fn bisect(a: BisectArgs) -> Result<Outcome, HarnessError> {
    if let Some(j) = &a.json {
        crate::paths::check_writable_file(j, "--json")?;
    }
    let flags = RunFlags {
        model: &a.model,
        reference: &a.reference,
        prompt: &a.prompt,
        steps: a.steps,
        precision: Precision::F32,
        weights: a.weights,
        inject: a.inject.as_deref(),
        sampler: a.sampler.as_deref(),
        lora: &a.lora,
        length: Some(&a.length),
    };
    let opts = flags.options(true, false)?;
    let (engine, _) = load_engine_timed(&opts)?;
    let ids = crate::lockstep::options::engine_prompt_ids(&engine, &opts.prompt)?;
    let context = opts.context_for(ids.len());
    let refs = load_references_timed(&opts.references, &opts.model, a.lora.lora.as_deref(), Some(context))?.0;
    let (mut rep, _run) = {
        let _stream = live::stream(Head::RowsOnly);
        crate::bisect::bisect(&opts, &engine, &refs, a.max_capture_mb)?
    };
    rep.steps_requested = a.steps;
    if crate::ui::get().quiet {
        outln!("{}", crate::bisect::verdict_line(&rep));
    } else {
        let text = crate::bisect::render(&rep, &opts.model.display().to_string(), &a.reference);
        crate::ui::print_above(&crate::ui::paint_verdicts(&format!("\n{}", crate::ui::fit(&text))));
    }
    if let Some(j) = a.json {
        write_json(&j, &rep)?;
    }
    write_junit(a.junit.as_deref(), || crate::report::junit::from_bisect(&rep, &opts.model.display().to_string(), &a.reference))?;
    Ok(Outcome::of(!rep.found))
}

fn faults(a: FaultsArgs) -> Result<Outcome, HarnessError> {
    if let Some(j) = &a.json {
        crate::paths::check_writable_file(j, "--json")?;
    }
    use lockstep_engine::faults::{Layer, CATALOG, DEFAULT_FAULT_LAYER};
    if !a.check {
        // The full table needs ~240 columns; narrower, the bug and the code path go on
        // lines of their own, word-wrapped.
        let wide = CATALOG.iter().map(|f| 65 + f.bug.chars().count().max(f.code_path.chars().count() + f.needs.chars().count() + 10)).max().unwrap_or(0);
        let narrow = crate::ui::get().width.filter(|&w| w < wide);
        let mut o = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(o, "{:<22} {:<5} {:<8} {:<10} {:<17} {}", "fault", "step", "layer", "site", "diagnosis", if narrow.is_some() { "" } else { "bug / where injected" });
        for f in CATALOG {
            let layer = match f.layer {
                Layer::None => "-".to_string(),
                Layer::First => "0".to_string(),
                Layer::Injected => format!("{DEFAULT_FAULT_LAYER} (:N)"),
                Layer::FirstWindow => "1st win".to_string(),
                Layer::FirstGlobal => "1st glob".to_string(),
            };
            let needs = if f.needs.is_empty() { String::new() } else { format!("; needs {}", f.needs) };
            match narrow {
                None => {
                    let _ = writeln!(o, "{:<22} {:<5} {:<8} {:<10} {:<17} {}", f.name, f.step, layer, f.site, f.diagnosis, f.bug);
                    let _ = writeln!(o, "{:<66} in {}{needs}", "", f.code_path);
                }
                Some(w) => {
                    let _ = writeln!(o, "{}", format!("{:<22} {:<5} {:<8} {:<10} {}", f.name, f.step, layer, f.site, f.diagnosis).trim_end());
                    let _ = writeln!(o, "{}", crate::ui::wrap(&format!("    {}", f.bug), w, 4));
                    let _ = writeln!(o, "{}", crate::ui::wrap(&format!("    in {}{needs}", f.code_path), w, 7));
                }
            }
        }
        out!("{}", crate::ui::fit(&o));
        return Ok(Outcome::Pass);
    }
    let path = models::resolve(&a.model)?;
    let specs = RefSpec::parse_list(&a.reference)?;
    let refs = load_references(&specs, &path, a.lora.lora.as_deref())?;
    let results = crate::bisect::check_catalog(&path, &specs, &refs, a.steps, a.weights.map(WeightsArg::mode), a.lora.options())?;
    if crate::ui::get().quiet {
        let applicable = results.iter().filter(|r| r.applicable).count();
        let ok = results.iter().filter(|r| r.applicable && r.ok).count();
        outln!("faults --check: {ok} of {applicable} applicable checks as the catalog says");
    } else {
        out!("{}", crate::ui::paint_verdicts(&crate::ui::fit(&crate::bisect::render_check(&results, &path.display().to_string(), &a.reference))));
    }
    if let Some(j) = a.json {
        write_json(&j, &results)?;
    }
    write_junit(a.junit.as_deref(), || crate::report::junit::from_faults(&results, &path.display().to_string(), &a.reference))?;
    Ok(Outcome::of(results.iter().all(|r| r.ok)))
}

fn tokcheck(a: TokcheckArgs) -> Result<Outcome, HarnessError> {
    if let Some(j) = &a.json {
        crate::paths::check_writable_file(j, "--json")?;
    }
    use crate::checks::tokcheck;
    let specs = RefSpec::parse_list(&a.reference)?;
    let path = models::resolve(&a.model)?;
    let mut strings: Vec<(String, String)> = tokcheck::CORPUS.iter().map(|(l, t)| (l.to_string(), t.to_string())).collect();
    if let Some(f) = &a.corpus {
        strings.extend(tokcheck::read_corpus(f)?);
    }
    let tok = lockstep_engine::Tokenizer::load(&path)?;
    let (sides, notes) = tokcheck::load_sides(&specs, &path)?;
    let r = tokcheck::run(&path, &tok, &sides, notes, &strings)?;
    if crate::ui::get().quiet {
        outln!("tokcheck: {}", if r.pass { "PASS" } else { "DIFFERS (run without --quiet for the strings)" });
    } else {
        out!("{}", crate::ui::fit(&tokcheck::render(&r)));
    }
    if let Some(j) = a.json {
        write_json(&j, &r)?;
    }
    Ok(Outcome::of(r.pass))
}

fn report_cmd(a: ReportArgs) -> Result<Outcome, HarnessError> {
    use crate::report::nightly;
    use crate::report::suite::{Shard, Suite};
    let junit = match &a.cmd {
        Some(ReportCmd::Merge { junit, .. }) => junit.clone(),
        None => a.junit.clone(),
    };
    let (rep, code, out) = match a.cmd {
        Some(ReportCmd::Merge { dirs, out, history, .. }) => {
            let (rep, code) = nightly::merge(&dirs, &out, history.as_deref())?;
            (rep, code, out)
        }
        None => {
            let (suite, out) = (a.suite.expect("clap requires --suite"), a.out.expect("clap requires --out"));
            let shard = a.shard.as_deref().map(Shard::parse).transpose()?;
            if a.list {
                let s = Suite::load_capped(&suite, a.max_cases)?;
                for (k, c) in s.cases.iter().enumerate().filter(|(k, _)| shard.is_none_or(|sh| sh.has(*k))) {
                    outln!("{k:>3} {}", c.list_line());
                }
                return Ok(Outcome::Pass);
            }
            let rerun_crashed = std::env::var_os(nightly::WORKER_ENV).is_none_or(|v| v != "restart");
            let o = nightly::RunReportOptions { suite, out: out.clone(), shard, history: a.history, full_json: a.full_json, rerun_crashed, max_cases: a.max_cases };
            if std::env::var_os(nightly::WORKER_ENV).is_none() {
                return nightly::report_supervised(&o).map(Outcome::Exit);
            }
            let (rep, code) = nightly::run_report(&o)?;
            (rep, code, out)
        }
    };
    // (Under the supervisor this is the worker: it writes the JUnit file too.)
    write_junit(junit.as_deref(), || crate::report::junit::from_report(&rep))?;
    if crate::ui::get().quiet {
        let t = &rep.totals;
        outln!("report: {} cases: {} pass, {} diverged, {} error; {} not as expected", t.cases, t.pass, t.diverged, t.error, t.not_as_expected);
        return Ok(Outcome::of(code == 0));
    }
    out!("{}", crate::report::html::summary_md(&rep));
    outln!("\nreport: {}", out.join("index.html").display());
    Ok(Outcome::of(code == 0))
}

fn inspect(a: InspectArgs) -> Result<Outcome, HarnessError> {
    if let Some(j) = &a.json {
        crate::paths::check_writable_file(j, "--json")?;
    }
    use crate::checks::lora;
    let specs = RefSpec::parse_list(&a.reference)?;
    let path = models::resolve(&a.model)?;
    let Some(lopts) = a.lora.options() else {
        outln!("lockstep inspect\n  model      {}\n  adapter    none (give --lora DIR)", path.display());
        return Ok(Outcome::Pass);
    };
    let engine = lockstep_engine::load(
        &path,
        &lockstep_engine::LoadOptions { weights: a.weights.map(WeightsArg::mode), lora: Some(lopts), ..Default::default() },
    )?;
    let refs = load_references(&specs, &path, a.lora.lora.as_deref())?;
    let rep = lora::inventory_report(&engine, &refs)?;
    outln!("lockstep inspect\n  model      {}", path.display());
    for s in &rep.sides {
        outln!("  config     {:<12} {}", s.side, s.config);
    }
    out!("{}", lora::render_inventory(&rep));
    out!("{}", lora::render_modules(&rep));
    out!("{}", lora::render_checks(&rep));
    if let Some(j) = a.json {
        write_json(&j, &rep)?;
    }
    Ok(Outcome::of(lora::divergence(&rep).is_none()))
}
