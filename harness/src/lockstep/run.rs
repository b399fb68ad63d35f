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
use crate::lockstep::step::{engine_step, reference_steps, EngineStep, StepCompare, Sweep, Windows};
use crate::lockstep::summary::{engine_info, find_first_divergence, quant_run_checks, stopped_before_step0, summarize};
use crate::reference::{Reference, StepOutput};
use crate::results::checks::{GenConfig, SamplerCheck};
use crate::results::run::{KeptStep, PairStep, PromptCheck, RefStep, RunResult, SiteRecord, StepRecord};

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
    check_reference_context(opts, refs, prompt.engine_ids.len())?;
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
    let memory = memory_plan(opts, model, refs, &ref_sites, prompt.engine_ids.len())?;
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
        memory,
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

/// The run's predicted memory, with `--max-memory` or a prompt fed in pieces; a run
/// predicted past `--max-memory` stops here, before step 0 (exit 2 with the numbers).
fn memory_plan(
    opts: &RunOptions,
    model: &dyn Decoder,
    refs: &[Reference],
    ref_sites: &[HashSet<String>],
    prompt_len: usize,
) -> Result<Option<crate::lockstep::memory::MemoryPlan>, HarnessError> {
    use crate::lockstep::memory;
    if opts.max_memory.is_none() && prompt_len <= opts.prefill_chunk {
        return Ok(None);
    }
    let Some(loaded) = memory::resident_bytes() else {
        return match opts.max_memory {
            Some(_) => Err(HarnessError::Usage("--max-memory: this system does not say how much memory the process holds (/proc/self/status)".into())),
            None => Ok(None),
        };
    };
    let engine_sites: HashSet<&str> = ref_sites.iter().flat_map(|s| s.iter().map(|x| x.as_str())).collect();
    let bytes = |dtype: &str| if dtype == "float64" { 8 } else { 4 };
    let engine_bytes = if opts.precision == crate::compare::tolerance::Precision::F64 { 8 } else { 4 };
    let per_ref: Vec<(&HashSet<String>, u64)> = ref_sites.iter().zip(refs).map(|(s, r)| (s, bytes(&r.description.dtype))).collect();
    let plan = memory::predict(
        &model.info().config,
        &engine_sites,
        engine_bytes,
        &per_ref,
        prompt_len.min(opts.prefill_chunk),
        opts.context_for(prompt_len),
        loaded,
    );
    if let Some(max) = opts.max_memory.filter(|&m| plan.peak > m * 1048576) {
        return Err(HarnessError::Usage(format!(
            "--max-memory {max}: the run is {}; a smaller --prefill-chunk bounds one call, fewer steps or a shorter prompt the caches",
            plan.describe()
        )));
    }
    Ok(Some(plan))
}

/// Every reference with a fixed context (`describe()["context"]`, llama.cpp's `n_ctx`) must
/// hold the positions the run feeds: said before step 0, with the numbers.
fn check_reference_context(opts: &RunOptions, refs: &[Reference], prompt_len: usize) -> Result<(), HarnessError> {
    let needed = crate::lockstep::options::positions_fed(prompt_len, opts.steps);
    for r in refs {
        if let Some(c) = r.description.context.filter(|&c| c < needed) {
            return Err(HarnessError::Usage(format!(
                "the {} reference holds {c} positions (its fixed context) but the run feeds {needed} (a prompt of {prompt_len} tokens \
                 and {} steps): give --context {needed} or more (every reference's context is sized from it), or ask for fewer steps",
                r.name, opts.steps
            )));
        }
    }
    Ok(())
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
        // The engine's cache sized once for the whole run (written in place, never moved).
        cache.reserve(opts.context_for(prompt.engine_ids.len()))?;
        let (mut steps, mut generated, mut kept) = (Vec::new(), Vec::new(), None);
        let mut feed = prompt.engine_ids.clone();
        let mut total = 0;
        let mut sweep = Sweep::new(Windows::of_model(&self.engine.path));
        // Bisect stops at a token mismatch: nothing after it is comparable.
        let n_steps = if opts.bisect && !prompt.ids_match { 0 } else { opts.steps.max(1) };
        for step in 0..n_steps {
            crate::interrupt::check()?;
            let history: Vec<u32> = prompt.engine_ids.iter().chain(&generated).copied().collect();
            let (record, kept_now) = self.step(step, &feed, &mut total, &mut sweep, &mut cache, &wanted, samplers, &history)?;
            let engine_token = record.engine_token;
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

    /// One step: `feed` to every side, in calls of at most `--prefill-chunk` tokens (a long
    /// prompt; a decode step is one call), each call compared as it comes and the step's
    /// record merged from them ([`merge_call`]). The engine's token is chosen after the last.
    /// `total`: the positions fed before the step, advanced by each call.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        step: usize,
        feed: &[u32],
        total: &mut usize,
        sweep: &mut Sweep,
        cache: &mut lockstep_engine::KvCache,
        wanted: &HashSet<&str>,
        samplers: &mut Samplers,
        history: &[u32],
    ) -> Result<(StepRecord, Option<KeptStep>), HarnessError> {
        let t0 = std::time::Instant::now();
        let model = self.engine.model.as_ref();
        let calls: Vec<&[u32]> = feed.chunks(self.opts.prefill_chunk.max(1)).collect();
        let (mut merged, mut engine_seconds): (Option<(Vec<RefStep>, Vec<PairStep>)>, f64) = (None, 0.0);
        for (c, part) in calls.iter().enumerate() {
            if c > 0 {
                crate::interrupt::check()?;
            }
            let start = *total;
            let scope = sweep.scope(start, part.len());
            let mut es = engine_step(model, part, cache, wanted, scope, &sweep.windows)?;
            *total += part.len();
            engine_seconds += es.seconds;
            let outputs = reference_steps(self.refs, part)?;
            let (mut references, mut pairs, mut kept) = self.call(step, start, part.len(), &outputs, &es)?;
            // A call whose verdict is worse than the call before it (the first to drift, the
            // first to fail) is compared again with every row of every cache: an old row
            // rewritten by this call is then named at its step, not when the sweep reaches it.
            // A run that keeps drifting (llama.cpp's Q8 activations) is not compared whole at
            // every step.
            let verdict = |r: &[RefStep]| r.iter().map(|r| r.verdict).max().unwrap_or(Verdict::Pass);
            if es.caches_in_part() && verdict(&references) > sweep.last {
                es.widen_caches(model)?;
                (references, pairs, kept) = self.call(step, start, part.len(), &outputs, &es)?;
            }
            sweep.last = verdict(&references);
            // Bisect on a windowed model: the rows the windows evicted, for isolation.
            if self.opts.bisect && sweep.windows.0.iter().any(Option::is_some) {
                if let Some(k) = kept.as_mut() {
                    k.window_before = sweep.history.get(k.reference).cloned().unwrap_or_default();
                }
                sweep.history = StepOutput::with_views(outputs.iter().map(|(o, _)| o), |views| {
                    crate::lockstep::step::window_history(&sweep.history, views, &sweep.windows, start + part.len())
                })?;
            }
            merged = Some(match merged {
                None => (references, pairs),
                Some((r, p)) => merge_call((r, p), (references, pairs)),
            });
            let last = c + 1 == calls.len();
            // Bisect stops at the first failing call: the step's record is what was compared.
            if last || kept.is_some() {
                let (engine_token, sampler) = samplers.choose(self.refs, &es.logits, history)?;
                let (references, pairs) = merged.expect("one call at least");
                let verdict = references.iter().map(|r| r.verdict).chain(sampler.iter().map(|c| c.verdict)).max().unwrap_or(Verdict::Pass);
                let record = StepRecord {
                    step,
                    fed: feed.to_vec(),
                    calls: if calls.len() > 1 { calls.iter().map(|c| c.len()).collect() } else { vec![] },
                    engine_token,
                    engine_token_text: self.engine.tokenizer.decode(&[engine_token], false).unwrap_or_default(),
                    verdict,
                    engine_seconds,
                    seconds: t0.elapsed().as_secs_f64(),
                    references,
                    pairs,
                    sampler,
                };
                return Ok((record, kept));
            }
        }
        unreachable!("a step feeds one token at least")
    }

    /// One call of a step (`fed` tokens after `start` positions): every reference's outputs
    /// compared with the engine's and with each other.
    fn call(
        &self,
        step: usize,
        start: usize,
        fed: usize,
        outputs: &[(StepOutput, f64)],
        es: &EngineStep,
    ) -> Result<(Vec<RefStep>, Vec<PairStep>, Option<KeptStep>), HarnessError> {
        let cmp = StepCompare { judge: self.judge, refs: self.refs, ref_sites: self.ref_sites, engine: es, oracle: self.oracle };
        StepOutput::with_views(outputs.iter().map(|(o, _)| o), |views| -> Result<_, HarnessError> {
            cmp.check_declared(views, start + fed)?;
            let pairs = cmp.pairs(views)?;
            let refs = (0..self.refs.len()).map(|i| cmp.reference(i, views, &pairs, outputs[i].1)).collect::<Result<Vec<_>, _>>()?;
            let kept = if self.opts.bisect { cmp.keep(step, start, fed, views, &refs)? } else { None };
            Ok((refs, pairs, kept))
        })
    }
}

/// The records of a step's calls so far merged with the next call's: per reference, each
/// site keeps the call where it was worst (verdict, then rel-L2: a site passes only if it
/// passed on every row of every call); the next-token distribution is the last call's (the
/// last position fed), the largest KL over positions the largest of all calls; seconds add
/// up. Pairs of references keep, per site, their largest disagreement.
fn merge_call(acc: (Vec<RefStep>, Vec<PairStep>), next: (Vec<RefStep>, Vec<PairStep>)) -> (Vec<RefStep>, Vec<PairStep>) {
    let (mut refs, mut pairs) = acc;
    for (r, n) in refs.iter_mut().zip(next.0) {
        let worse = |a: &SiteRecord, b: &SiteRecord| {
            let rel = |s: &SiteRecord| s.metrics.map(|m| m.rel_l2).unwrap_or(f64::INFINITY);
            (b.verdict, rel(b)) > (a.verdict, rel(a))
        };
        for ns in n.sites {
            match r.sites.iter_mut().find(|s| s.site == ns.site) {
                Some(s) if worse(s, &ns) => *s = ns,
                Some(_) => {}
                None => r.sites.push(ns),
            }
        }
        r.kl_max_positions = r.kl_max_positions.max(n.kl_max_positions);
        r.logits = n.logits;
        r.logits_verdict = n.logits_verdict;
        r.seconds += n.seconds;
        r.verdict = r.sites.iter().map(|s| s.verdict).chain([r.logits_verdict]).max().unwrap_or(Verdict::Pass);
    }
    for (p, np) in pairs.iter_mut().zip(next.1) {
        for (site, nm) in np.sites {
            match p.sites.iter_mut().find(|(s, _)| *s == site) {
                Some((_, m)) if nm.rel_l2 > m.rel_l2 => *m = nm,
                Some(_) => {}
                None => p.sites.push((site, nm)),
            }
        }
        p.logits = np.logits;
    }
    (refs, pairs)
}
