//! The lockstep protocol. Step 0 feeds the whole prompt to the engine and to every
//! reference; each later step feeds exactly one token, the engine's choice at the previous
//! step (teacher forcing), to all of them. Each side keeps its own cache; the harness never
//! re-feeds history. After every step each engine site is mapped to the Hugging Face layout
//! and compared with every reference's array of the same name, and every pair of references
//! is compared with each other: that disagreement is the measured noise floor the engine is
//! judged against ([`crate::lockstep::judge`]).
//!
//! This module sequences the pieces: the prompt check ([`super::prompt`]), the generation
//! config, the steps ([`super::step`]), the free-running check ([`super::free_running`]),
//! the LoRA checks and the verdicts over the run ([`super::summary`]).

use std::collections::HashSet;

use candle_core::{DType, IndexOp, Tensor};
use lockstep_engine::{Decoder, LoadedModel, Sampler};

use crate::checks::sampler::RefSampler;
use crate::compare::tolerance::Verdict;
use crate::error::HarnessError;
use crate::lockstep::free_running::free_running;
use crate::lockstep::judge::Judge;
use crate::lockstep::options::{Prompt, RunOptions};
use crate::lockstep::prompt::check_prompt;
use crate::lockstep::step::{engine_step, reference_steps, EngineStep, StepCompare};
use crate::lockstep::summary::{engine_info, find_first_divergence, quant_run_checks, stopped_before_step0, summarize};
use crate::reference::{Reference, StepOutput};
use crate::results::checks::{GenConfig, SamplerCheck};
use crate::results::run::{KeptStep, PromptCheck, RunResult, StepRecord};

use lockstep_engine::sites::layer_of;

/// What a run tells its observer as it goes (`lockstep run` prints its table from these,
/// `lockstep report` draws its progress).
pub enum RunEvent<'a> {
    /// The prompt was checked; nothing has been fed yet.
    Started { opts: &'a RunOptions, engine: &'a LoadedModel, refs: &'a [Reference], prompt: &'a PromptCheck },
    /// A step was computed and compared (`planned`: the steps the run will do at most).
    Step { record: &'a StepRecord, planned: usize },
    /// The next runs on this thread are bisect's re-runs of a case (`lockstep report` says
    /// so in its progress line).
    Bisecting,
}

thread_local! {
    /// Told of every [`RunEvent`] of the runs on this thread (see `set_observer`).
    static OBSERVER: std::cell::RefCell<Option<Box<dyn FnMut(RunEvent<'_>)>>> = const { std::cell::RefCell::new(None) };
}

/// Sets (or clears) this thread's run observer.
pub fn set_observer(observer: Option<Box<dyn FnMut(RunEvent<'_>)>>) {
    OBSERVER.with(|o| *o.borrow_mut() = observer);
}

/// Tells this thread's observer, if any, of `event` (the driver's own events, and the
/// phases its callers run, such as [`RunEvent::Bisecting`]).
pub fn tell(event: RunEvent<'_>) {
    OBSERVER.with(|o| {
        if let Some(f) = o.borrow_mut().as_mut() {
            f(event)
        }
    });
}

/// Runs the engine and the references in lockstep.
pub fn run(opts: &RunOptions, engine: &LoadedModel, refs: &[Reference]) -> Result<RunResult, HarnessError> {
    assert!(!refs.is_empty(), "run() needs at least one reference");
    let model = engine.model.as_ref();
    let prompt = check_prompt(opts, engine, refs)?;
    tell(RunEvent::Started { opts, engine, refs, prompt: &prompt });
    // The generation config of every side; stop before step 0 on a prompt mismatch.
    let sampler_cfg = opts.sampler.clone().unwrap_or_default();
    let chat = matches!(opts.prompt, Prompt::Chat(_));
    let config = crate::checks::genconfig::collect(engine, refs, chat, opts.steps.max(1), &sampler_cfg)?;
    if let Some(reason) = stop_reason(opts, &prompt, &config) {
        return Ok(stopped_before_step0(opts, engine, prompt, config, reason));
    }
    let mut samplers = Samplers::new(opts, refs, &config)?;
    let ref_sites = declared_sites(model, refs)?;
    let judge = Judge::new(model.info(), refs, opts.precision);
    let lp = Lockstep { opts, engine, refs, judge: &judge, ref_sites: &ref_sites, oracle: refs.iter().position(|r| r.spec.is_oracle()) };
    let (steps, generated, kept) = lp.steps(&prompt, &mut samplers)?;

    let stop = engine.stop_ids();
    let generate = free_running(opts, engine, refs, &prompt.engine_ids, &steps, &generated, &stop)?;
    let engine_sites = model.site_graph().names();
    let mut summary = summarize(opts, refs, &ref_sites, &engine_sites, &steps, &stop, lp.oracle);
    let run_level = quant_run_checks(&mut summary, &judge.modes, &judge.qbounds, steps.len());
    let mut first_divergence = find_first_divergence(&prompt, &steps, &generate, &generated, model).or(run_level);
    // An adapter problem (inventories differ, tensors attached to nothing, no effect) is the
    // root cause of whatever else diverged: it is reported first.
    // Bisect runs the adapter checks only for an engine that cannot run one projection alone
    // (bisect's own LoRA evidence, `Decoder::project`, needs that).
    let lora = match (&engine.lora, opts.bisect) {
        (Some(_), false) => Some(crate::checks::lora::check(opts, engine, refs, &steps)?),
        (Some(_), true) if !model.info().capabilities.project => Some(crate::checks::lora::check(opts, engine, refs, &steps)?),
        _ => None,
    };
    if let Some(d) = lora.as_ref().and_then(crate::checks::lora::divergence) {
        first_divergence = Some(d);
    }
    let sampler_info = opts.sampler.as_ref().map(|c| crate::checks::sampler::info(c, refs, &samplers.refs, &samplers.without, &steps));
    Ok(RunResult {
        kept,
        verdict_pass: first_divergence.is_none(),
        first_divergence,
        prompt,
        engine_text: engine.tokenizer.decode(&generated, true).unwrap_or_default(),
        steps,
        engine_tokens: generated,
        generate,
        summary,
        engine: engine_info(engine, opts),
        num_layers: model.info().config.num_layers,
        sampler: sampler_info,
        config,
        stopped_before_step0: None,
        lora,
    })
}

/// Why the run stops before step 0, if it does: the prompt's ids differ, or with
/// `--strict-config` the generation config differs.
fn stop_reason(opts: &RunOptions, prompt: &PromptCheck, config: &GenConfig) -> Option<String> {
    if !prompt.ids_match {
        return Some("the prompt's token ids differ between the engine and a reference".to_string());
    }
    let diffs = config.differences();
    (opts.strict_config && !diffs.is_empty()).then(|| {
        format!("--strict-config: the generation config differs ({})", diffs.iter().map(|r| r.name).collect::<Vec<_>>().join(", "))
    })
}

/// The sites each reference declares; each must be of the engine's model (same number of
/// layers) and include the logits.
fn declared_sites(model: &dyn Decoder, refs: &[Reference]) -> Result<Vec<HashSet<String>>, HarnessError> {
    let num_layers = model.info().config.num_layers;
    let ref_sites: Vec<HashSet<String>> = refs.iter().map(|r| r.description.sites.iter().cloned().collect()).collect();
    for (r, sites) in refs.iter().zip(&ref_sites) {
        let ref_layers = sites.iter().filter_map(|s| layer_of(s)).max().map(|l| l + 1).unwrap_or(0);
        if ref_layers != 0 && ref_layers != num_layers {
            return Err(HarnessError::LayerCount { reference: r.name.clone(), engine: num_layers, theirs: ref_layers });
        }
        if !sites.contains("logits") {
            return Err(HarnessError::NoLogits { reference: r.name.clone() });
        }
    }
    Ok(ref_sites)
}

/// The engine's sampler (greedy without `--sampler`) and, with one, every reference's own
/// sampling code on the same logits (sampler parity).
struct Samplers {
    engine: Option<Sampler>,
    refs: Vec<RefSampler>,
    without: Vec<String>,
}

impl Samplers {
    fn new(opts: &RunOptions, refs: &[Reference], config: &GenConfig) -> Result<Samplers, HarnessError> {
        // The sampler-temperature fault lives in the engine sampler's configuration only (each
        // reference's sampler gets the parameters as given).
        let engine_cfg = opts.sampler.clone().map(|mut c| {
            c.invert_temperature = opts.faults.has(lockstep_engine::faults::Fault::SamplerTemperature);
            c
        });
        let (ref_samplers, without) = match &engine_cfg {
            Some(c) => crate::checks::sampler::setup(refs, c, &config.declared)?,
            None => (vec![], vec![]),
        };
        Ok(Samplers { engine: engine_cfg.map(Sampler::new), refs: ref_samplers, without })
    }

    /// The engine's next token after `logits (positions, vocab)`, and each reference
    /// sampler's check on the same last row. `history`: every token so far.
    fn choose(&mut self, refs: &[Reference], logits: &Tensor, history: &[u32]) -> Result<(u32, Vec<SamplerCheck>), HarnessError> {
        let last = logits.i(logits.dim(0)? - 1)?;
        match self.engine.as_mut() {
            None => Ok((lockstep_engine::generate::argmax(&last)?, vec![])),
            Some(smp) => {
                let last: Vec<f32> = last.to_dtype(DType::F32)?.to_vec1()?;
                let (tok, _) = smp.next(&last, history)?;
                Ok((tok, crate::checks::sampler::check_step(refs, &self.refs, &last, history)?))
            }
        }
    }
}

/// The steps run: their records, the engine's tokens, and what bisect keeps.
type Steps = (Vec<StepRecord>, Vec<u32>, Option<KeptStep>);

/// One run's fixed parts, for the steps.
struct Lockstep<'a> {
    opts: &'a RunOptions,
    engine: &'a LoadedModel,
    refs: &'a [Reference],
    judge: &'a Judge,
    ref_sites: &'a [HashSet<String>],
    oracle: Option<usize>,
}

impl Lockstep<'_> {
    /// Runs the steps: the prompt, then one teacher-forced token per step, until the steps
    /// asked for, an end-of-sequence token, or (bisect) the first failing step. Returns the
    /// step records, the engine's tokens and what bisect keeps.
    fn steps(&self, prompt: &PromptCheck, samplers: &mut Samplers) -> Result<Steps, HarnessError> {
        let (opts, refs, model) = (self.opts, self.refs, self.engine.model.as_ref());
        let wanted: HashSet<&str> = self.ref_sites.iter().flat_map(|s| s.iter().map(|x| x.as_str())).collect();
        for r in refs {
            r.reset()?;
        }
        let stop = self.engine.stop_ids();
        let mut cache = model.new_cache();
        let (mut steps, mut generated, mut kept) = (Vec::new(), Vec::new(), None);
        let mut feed = prompt.engine_ids.clone();
        let mut total = 0;
        // Bisect stops at a token mismatch: nothing after it is comparable.
        let n_steps = if opts.bisect && !prompt.ids_match { 0 } else { opts.steps.max(1) };
        for step in 0..n_steps {
            crate::interrupt::check()?;
            let es = engine_step(model, &feed, &mut cache, &wanted)?;
            let history: Vec<u32> = prompt.engine_ids.iter().chain(&generated).copied().collect();
            let (engine_token, sampler_checks) = samplers.choose(refs, &es.logits, &history)?;
            total += feed.len();
            let (record, kept_now) = self.compare(step, &feed, total, &es, engine_token, sampler_checks)?;
            tell(RunEvent::Step { record: &record, planned: n_steps });
            steps.push(record);
            generated.push(engine_token);
            // Bisect: a failing sampler step is the divergence (the forward pass passed).
            let sampler_failed = steps.last().is_some_and(|s: &StepRecord| s.sampler.iter().any(|c| c.verdict == Verdict::Fail));
            if kept_now.is_some() || (opts.bisect && sampler_failed) {
                kept = kept_now;
                break;
            }
            if stop.contains(&engine_token) {
                break;
            }
            feed = vec![engine_token];
        }
        Ok((steps, generated, kept))
    }

    /// Every reference's step on `feed`, compared with the engine's and with each other.
    fn compare(
        &self,
        step: usize,
        feed: &[u32],
        total: usize,
        es: &EngineStep,
        engine_token: u32,
        sampler: Vec<SamplerCheck>,
    ) -> Result<(StepRecord, Option<KeptStep>), HarnessError> {
        let outputs = reference_steps(self.refs, feed)?;
        let cmp = StepCompare { judge: self.judge, refs: self.refs, ref_sites: self.ref_sites, engine: es, oracle: self.oracle };
        let (references, pairs, kept) = StepOutput::with_views(outputs.iter().map(|(o, _)| o), |views| -> Result<_, HarnessError> {
            cmp.check_declared(views, total)?;
            let pairs = cmp.pairs(views)?;
            let refs = (0..self.refs.len()).map(|i| cmp.reference(i, views, &pairs, outputs[i].1)).collect::<Result<Vec<_>, _>>()?;
            let kept = if self.opts.bisect { cmp.keep(step, views, &refs)? } else { None };
            Ok((refs, pairs, kept))
        })?;
        let verdict = references.iter().map(|r| r.verdict).chain(sampler.iter().map(|c| c.verdict)).max().unwrap_or(Verdict::Pass);
        let record = StepRecord {
            step,
            fed: feed.to_vec(),
            engine_token,
            engine_token_text: self.engine.tokenizer.decode(&[engine_token], false).unwrap_or_default(),
            verdict,
            engine_seconds: es.seconds,
            references,
            pairs,
            sampler,
        };
        Ok((record, kept))
    }
}
