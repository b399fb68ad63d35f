//! One lockstep step: the engine's forward with its captures (mapped to the Hugging Face
//! layout), every reference's step on the same tokens, and the comparison of all of them at
//! that step: reference against reference (the noise floor), the engine against each
//! reference (sites and next-token distribution), and what bisect keeps of a failing step.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Instant;

use candle_core::{DType, Tensor};
use lockstep_engine::{Capture, Decoder};

use crate::compare::tolerance::Verdict;
use crate::compare::data::{gather_rows, Values};
use crate::compare::{logit_metrics_data, metrics_data, Data};
use crate::error::HarnessError;
use crate::lockstep::judge::{floor, localize, oracle_distance, EngineSite, Judge};
use crate::reference::{Reference, StepArrays, StepOutput};
use crate::results::run::{KeptStep, PairStep, RefStep};

/// The engine's answer at one step: the captured sites a reference asks for, and the
/// logits: `rows` rows (every position fed, or only the last) of `vocab`.
pub struct EngineStep {
    pub sites: Vec<EngineSite>,
    pub logits: Tensor,
    /// Positions fed at this step (the references' logits have this many rows).
    pub n_pos: usize,
    /// Rows of the engine's logits: `n_pos`, or 1 for an engine that returns the last
    /// position's only (its earlier prefill positions are not compared).
    pub rows: usize,
    pub vocab: usize,
    /// The logits, row-major `rows x vocab`, when they are not also the `logits` site (held
    /// once: in `sites` when the engine returned every position).
    logits_values: Values,
    /// The position of the `logits` site in `sites`, if it is there.
    logits_site: Option<usize>,
    pub seconds: f64,
}

impl EngineStep {
    /// The engine's logits row of position `p` of the step, if it returned that position.
    pub fn logits_row(&self, p: usize) -> Option<Data<'_>> {
        let first = self.n_pos - self.rows;
        let data = match self.logits_site {
            Some(i) => &self.sites[i].data,
            None => &self.logits_values,
        };
        (p >= first && p < self.n_pos).then(|| data.data().slice((p - first) * self.vocab..(p - first + 1) * self.vocab))
    }
}

/// The earlier cache rows a call compares besides the rows it appended, taken in turn
/// ([`Sweep`]): a cache of up to this many earlier positions is compared whole at every
/// call. A constant, so that a decode step's comparison costs the same at any context
/// (measured by `make bench`: lockstep's own time per step at prompt 16 and 4,096).
pub const CACHE_SWEEP_ROWS: usize = 32;

/// What a call compares of each cache (`layers.N.cache_k` / `cache_v`, whose shape is the
/// whole cache's): `None` for every row; else the rows this call appended and
/// [`CACHE_SWEEP_ROWS`] earlier rows from `from` on (wrapping). A cache that does not hold
/// every position fed (a window) is compared whole: it is bounded by its window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheScope {
    /// Positions fed to every side, this call included.
    pub total: usize,
    /// Positions this call fed.
    pub fed: usize,
    /// The first earlier row of this call's sweep; `None`: every row.
    pub from: Option<usize>,
}

impl CacheScope {
    /// Every row of every cache.
    pub fn whole(total: usize, fed: usize) -> Self {
        CacheScope { total, fed, from: None }
    }

    /// The rows to compare of a cache holding `len` positions, in order: `None` for all.
    pub fn rows(&self, len: usize) -> Option<Vec<Range<usize>>> {
        let from = self.from?;
        if len != self.total || self.fed > len {
            return None;
        }
        let old = len - self.fed;
        if old <= CACHE_SWEEP_ROWS {
            return None;
        }
        let from = from % old;
        let end = from + CACHE_SWEEP_ROWS;
        let sweep = if end > old { [Some(0..end - old), Some(from..old)] } else { [Some(from..end), None] };
        Some(sweep.into_iter().flatten().chain([old..len]).collect())
    }
}

/// The run's cursor over earlier cache rows: each call's [`CacheScope`] takes the next
/// [`CACHE_SWEEP_ROWS`] of them, so every earlier row is compared at least once every
/// ⌈earlier / CACHE_SWEEP_ROWS⌉ calls (a rewritten old row that changes nothing else at its
/// step is caught within that many steps; one that changes what the step computes makes the
/// call drift or fail, and a call worse than the one before it is compared again whole, so it
/// is caught at its step).
#[derive(Debug, Default)]
pub struct Sweep {
    next: usize,
    /// The verdict of the last call (over every reference).
    pub last: Verdict,
    /// The model's sliding windows: a windowed layer's cache is compared in its canonical
    /// form, whole.
    pub windows: Windows,
    /// Bisect on a windowed model: per reference, each window layer's cache rows over the run
    /// so far ([`window_history`]).
    pub history: Vec<std::collections::BTreeMap<String, (usize, Vec<usize>, Vec<f32>)>>,
}

impl Sweep {
    /// A run's sweep, for a model with these windows.
    pub fn new(windows: Windows) -> Self {
        Sweep { windows, ..Sweep::default() }
    }

    /// The scope of a call feeding `fed` positions after `start`; advances the cursor.
    pub fn scope(&mut self, start: usize, fed: usize) -> CacheScope {
        let total = start + fed;
        if start <= CACHE_SWEEP_ROWS {
            return CacheScope::whole(total, fed);
        }
        let from = if self.next >= start { 0 } else { self.next };
        self.next = (from + CACHE_SWEEP_ROWS) % start;
        CacheScope { total, fed, from: Some(from) }
    }
}

/// The sliding windows of the model's layers, as its config defines them (whatever engine
/// runs it), and the canonical form of a windowed layer's cache they give: sides store a
/// window differently (transformers keeps the last W - 1 positions, MLX a ring of W, the
/// engine W and this call's), but what the next position attends over is the same, the last
/// W - 1 positions fed. So each side returns its window's positions in position order,
/// newest last, and the last `min(fed, W - 1)` of them are compared (docs/contract.md).
#[derive(Debug, Default, Clone)]
pub struct Windows(pub Vec<Option<usize>>);

impl Windows {
    /// The windows of the model at `path` ([`lockstep_engine::models::describe_at`]); none
    /// where it cannot be described (the engine's loader then says why).
    pub fn of_model(path: &std::path::Path) -> Self {
        Windows(lockstep_engine::models::describe_at(path).map(|d| d.config.layer_windows).unwrap_or_default())
    }

    /// The positions compared of layer `layer`'s cache after `total` fed: `None` for a global
    /// layer (every one), else the last `min(total, W - 1)` (one at least).
    pub fn keep(&self, layer: usize, total: usize) -> Option<usize> {
        let w = self.0.get(layer).copied().flatten()?;
        Some(total.min(w.saturating_sub(1).max(1)))
    }
}

/// Runs the engine on `feed`, keeping the sites in `wanted`, each in the Hugging Face layout;
/// of each cache, the rows `scope` names (of a windowed layer's, its canonical rows).
pub fn engine_step(
    model: &dyn Decoder,
    feed: &[u32],
    cache: &mut lockstep_engine::KvCache,
    wanted: &HashSet<&str>,
    scope: CacheScope,
    windows: &Windows,
) -> Result<EngineStep, HarnessError> {
    let t0 = Instant::now();
    let mut cap = Capture::new();
    let logits = model.forward(feed, cache, Some(&mut cap))?;
    let graph = model.site_graph();
    let mut sites = Vec::new();
    // Each captured tensor is dropped once converted: a call holds its sites once.
    for (site, t) in std::mem::take(&mut cap.entries) {
        // The logits are taken from forward's result, whatever the engine taps.
        if !wanted.contains(site.as_str()) || site == lockstep_engine::sites::LOGITS {
            continue;
        }
        let s = graph
            .get(&site)
            .ok_or_else(|| HarnessError::SiteNotInGraph { site: site.clone() })?;
        // A sliding-window layer's cache in its canonical form: its last positions.
        let (t, window) = match (s.kind, s.layer.and_then(|l| windows.keep(l, scope.total)), t.dims()) {
            (lockstep_engine::sites::SiteKind::Cache, Some(keep), &[_, len, _]) if len > keep => (t.narrow(1, len - keep, keep)?, Some(keep)),
            (lockstep_engine::sites::SiteKind::Cache, Some(keep), _) => (t, Some(keep)),
            _ => (t, None),
        };
        let shape = t.dims().to_vec();
        let rows = match (s.kind, shape.as_slice()) {
            (lockstep_engine::sites::SiteKind::Cache, [_, len, _]) => scope.rows(*len),
            _ => None,
        };
        let (part, view) = match &rows {
            // Only the rows compared are converted; the cache itself stays a view (no copy).
            Some(rows) => {
                let parts = rows.iter().map(|r| t.narrow(1, r.start, r.len())).collect::<Result<Vec<_>, _>>()?;
                (Tensor::cat(&parts, 1)?, Some(t))
            }
            None => (t, None),
        };
        let (part, transform) = model.to_canonical(s, &part)?;
        let data = values(&part)?;
        sites.push(EngineSite { site, shape, data, transform, rows, view, window });
    }
    let seconds = t0.elapsed().as_secs_f64();
    let (rows, vocab) = logits.dims2().map_err(|_| HarnessError::EngineLogits { fed: feed.len(), shape: logits.dims().to_vec() })?;
    if rows != feed.len() && rows != 1 {
        return Err(HarnessError::EngineLogits { fed: feed.len(), shape: logits.dims().to_vec() });
    }
    let mut logits_values = values(&logits)?;
    let mut logits_site = None;
    // Every position: also the `logits` site, holding the one copy (`logits_row` reads it).
    if wanted.contains(lockstep_engine::sites::LOGITS) && rows == feed.len() {
        let data = std::mem::replace(&mut logits_values, Values::F32(vec![]));
        logits_site = Some(sites.len());
        sites.push(EngineSite { site: "logits".into(), shape: vec![rows, vocab], data, transform: None, rows: None, view: None, window: None });
    }
    Ok(EngineStep { sites, logits, n_pos: feed.len(), rows, vocab, logits_values, logits_site, seconds })
}

impl EngineStep {
    /// True when some cache was compared in part ([`CacheScope`]).
    pub fn caches_in_part(&self) -> bool {
        self.sites.iter().any(|s| s.rows.is_some())
    }

    /// Every cache in full: each one compared in part is converted whole from its view.
    pub fn widen_caches(&mut self, model: &dyn Decoder) -> Result<(), HarnessError> {
        let graph = model.site_graph();
        for es in self.sites.iter_mut().filter(|s| s.rows.is_some()) {
            let view = es.view.take().expect("a cache compared in part keeps its view");
            let s = graph.get(&es.site).ok_or_else(|| HarnessError::SiteNotInGraph { site: es.site.clone() })?;
            let (t, _) = model.to_canonical(s, &view)?;
            es.data = values(&t)?;
            es.rows = None;
        }
        Ok(())
    }
}

/// A tensor's values in its own dtype (f32 stays f32: no widened copy; f64 and the half
/// types as f64).
fn values(t: &Tensor) -> Result<Values, HarnessError> {
    Ok(match t.dtype() {
        DType::F32 => Values::F32(t.flatten_all()?.to_vec1::<f32>()?),
        _ => Values::F64(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?),
    })
}

/// `f` on a reference's data of `es`'s site as the engine's is compared: the rows the engine
/// kept of a cache compared in part ([`CacheScope`]) when the shapes agree, else all of it
/// (a shape that differs fails on its shape; a trace's caches are rows, never sketches).
fn as_compared<R>(es: &EngineSite, shape: &[usize], data: Data<'_>, f: impl FnOnce(Data<'_>) -> R) -> R {
    match &es.rows {
        Some(rows) if shape == es.shape.as_slice() => match gather_rows(data, shape, rows) {
            Some(part) => f(part.data()),
            None => f(data),
        },
        _ => f(data),
    }
}

/// `f` on a reference's `es.site` in the form the engine's was taken: a windowed layer's
/// cache cut to its canonical last positions ([`Windows`]); anything else as returned.
fn ref_site<R>(view: &StepArrays<'_, '_>, es: &EngineSite, f: impl FnOnce(&[usize], Data<'_>) -> R) -> Result<Option<R>, HarnessError> {
    view.with_site(&es.site, |shape, data| match (es.window, shape) {
        (Some(keep), &[h, len, w]) if len > keep => match gather_rows(data, shape, &[len - keep..len]) {
            Some(part) => f(&[h, keep, w], part.data()),
            None => f(shape, data),
        },
        _ => f(shape, data),
    })
}

/// Rows of history [`window_history`] keeps per window layer (the newest).
pub const WINDOW_HISTORY_ROWS: usize = 4096;

/// Bisect on a windowed model: per reference, each window layer's cache rows over the run so
/// far (site -> (position of the first row, shape, values)): `previous`'s rows of the
/// positions this call's cache no longer holds, then the cache as the reference returned it
/// after a call that fed positions up to `total`; at most [`WINDOW_HISTORY_ROWS`], the newest.
/// Isolation and the window evidence read the positions a window evicted from it
/// ([`KeptStep::window_before`]): what the engine's layer attends over at a step, whatever
/// span it uses, on the reference's values.
///
/// [`KeptStep::window_before`]: crate::results::run::KeptStep::window_before
pub fn window_history(
    previous: &[std::collections::BTreeMap<String, (usize, Vec<usize>, Vec<f32>)>],
    views: &[StepArrays<'_, '_>],
    windows: &Windows,
    total: usize,
) -> Result<Vec<std::collections::BTreeMap<String, (usize, Vec<usize>, Vec<f32>)>>, HarnessError> {
    let mut out = vec![];
    for (i, v) in views.iter().enumerate() {
        let mut m = std::collections::BTreeMap::new();
        for (l, _) in windows.0.iter().enumerate().filter(|(_, w)| w.is_some()) {
            for name in [format!("layers.{l}.cache_k"), format!("layers.{l}.cache_v")] {
                let got = v.with_site(&name, |shape, data| -> Option<Tensor> {
                    Tensor::from_vec(data.to_f32_vec()?, shape, &candle_core::Device::Cpu).ok()
                })?;
                let Some(Some(after)) = got else { continue };
                let len = after.dims()[1];
                let a0 = total.saturating_sub(len);
                let mut parts = vec![];
                if let Some((first, shape, vals)) = previous.get(i).and_then(|p| p.get(&name)) {
                    let n = a0.saturating_sub(*first).min(shape[1]);
                    if n > 0 && *first <= a0 {
                        let t = Tensor::from_vec(vals.clone(), shape.as_slice(), &candle_core::Device::Cpu)?;
                        parts.push(t.narrow(1, 0, n)?);
                    }
                }
                let first = a0 - parts.first().map(|t| t.dims()[1]).unwrap_or(0);
                parts.push(after);
                let all = Tensor::cat(&parts, 1)?;
                let n = all.dims()[1];
                let keep = n.min(WINDOW_HISTORY_ROWS);
                let all = all.narrow(1, n - keep, keep)?.contiguous()?;
                m.insert(name, (first + (n - keep), all.dims().to_vec(), all.flatten_all()?.to_vec1::<f32>()?));
            }
        }
        out.push(m);
    }
    Ok(out)
}

/// Every reference's step on `feed`, with its time.
pub fn reference_steps(refs: &[Reference], feed: &[u32]) -> Result<Vec<(StepOutput, f64)>, HarnessError> {
    let mut outputs = Vec::with_capacity(refs.len());
    for r in refs {
        let t1 = Instant::now();
        let out = r.step(feed)?;
        outputs.push((out, t1.elapsed().as_secs_f64()));
    }
    Ok(outputs)
}

/// The comparisons of one step.
pub struct StepCompare<'a> {
    pub judge: &'a Judge,
    pub refs: &'a [Reference],
    /// The sites each reference declared.
    pub ref_sites: &'a [HashSet<String>],
    pub engine: &'a EngineStep,
    /// The f64 oracle among the references, if any.
    pub oracle: Option<usize>,
}

impl StepCompare<'_> {
    /// Every declared site must be there, with logits of every position fed or of the last
    /// one only (an engine as a reference, or a reference, that returns the last row).
    /// `total`: positions fed to every side up to and including this step.
    pub fn check_declared(&self, views: &[StepArrays<'_, '_>], total: usize) -> Result<(), HarnessError> {
        let (n_pos, vocab) = (self.engine.n_pos, self.engine.vocab);
        for (i, v) in views.iter().enumerate() {
            self.check_caches(i, v, total)?;
            for s in &self.ref_sites[i] {
                if !v.has(s)? {
                    return Err(HarnessError::SiteNotReturned { reference: self.refs[i].name.clone(), site: s.clone() });
                }
            }
            let shape = v.with_site("logits", |sh, _| sh.to_vec())?.unwrap_or_default();
            if shape != [n_pos, vocab] && shape != [1, vocab] {
                return Err(HarnessError::LogitsShape { reference: self.refs[i].name.clone(), n_pos, vocab, shape });
            }
        }
        Ok(())
    }

    /// A reference's `layers.N.cache_k` / `cache_v` is `[kv_heads, cached_len, head_dim]` with
    /// the engine's heads and head size, and holds at least one and at most `total` positions
    /// (a window holds fewer: that is its kind, not a protocol error). Anything else is the
    /// reference breaking the protocol, not a finding about the engine.
    fn check_caches(&self, i: usize, v: &StepArrays<'_, '_>, total: usize) -> Result<(), HarnessError> {
        for es in self.engine.sites.iter().filter(|s| s.site.ends_with(".cache_k") || s.site.ends_with(".cache_v")) {
            if !self.ref_sites[i].contains(&es.site) {
                continue;
            }
            let Some(shape) = ref_site(v, es, |sh, _| sh.to_vec())? else { continue };
            let broke = |what: String| HarnessError::Protocol {
                reference: self.refs[i].name.clone(),
                message: format!(
                    "`{}` has shape {shape:?}: {what} (a cache is [kv_heads, cached_len, head_dim]; \
                     the reference's code that returns its cache is wrong, not the engine)",
                    es.site
                ),
            };
            if shape.len() != 3 {
                return Err(broke(format!("{} dimensions, not 3", shape.len())));
            }
            if es.shape.len() == 3 && (shape[0] != es.shape[0] || shape[2] != es.shape[2]) {
                return Err(broke(format!(
                    "the model has {} KV heads of size {} (the engine's cache is {:?})",
                    es.shape[0], es.shape[2], es.shape
                )));
            }
            if shape[1] == 0 || shape[1] > total {
                return Err(broke(format!("{} cached positions after {total} fed", shape[1])));
            }
        }
        Ok(())
    }

    /// Reference against reference at every site both provide: the noise floor.
    pub fn pairs(&self, views: &[StepArrays<'_, '_>]) -> Result<Vec<PairStep>, HarnessError> {
        let vocab = self.engine.vocab;
        let mut pairs = vec![];
        for a in 0..self.refs.len() {
            for b in a + 1..self.refs.len() {
                let mut sites = vec![];
                for es in &self.engine.sites {
                    if !(self.ref_sites[a].contains(&es.site) && self.ref_sites[b].contains(&es.site)) {
                        continue;
                    }
                    let m = ref_site(&views[a], es, |sa, da| {
                        ref_site(&views[b], es, |sb, db| {
                            (sa == sb).then(|| as_compared(es, sa, da, |da| as_compared(es, sb, db, |db| metrics_data(da, db))))
                        })
                    })?;
                    if let Some(inner) = m {
                        if let Some(Some(m)) = inner? {
                            sites.push((es.site.clone(), m));
                        }
                    }
                }
                let lm = views[a]
                    .with_site("logits", |sa, da| {
                        views[b].with_site("logits", |sb, db| {
                            let last = |rows: usize| (rows - 1) * vocab..rows * vocab;
                            logit_metrics_data(da.slice(last(sa[0])), db.slice(last(sb[0])))
                        })
                    })?
                    .transpose()?
                    .flatten()
                    .expect("logits checked above");
                pairs.push(PairStep { a: self.refs[a].name.clone(), b: self.refs[b].name.clone(), sites, logits: lm });
            }
        }
        Ok(pairs)
    }

    /// The pair of references `i` and `j` in [`StepCompare::pairs`]'s order.
    fn pair<'p>(&self, pairs: &'p [PairStep], i: usize, j: usize) -> &'p PairStep {
        let n = self.refs.len();
        let (a, b) = (i.min(j), i.max(j));
        &pairs[a * (2 * n - a - 1) / 2 + (b - a - 1)]
    }

    /// The engine against reference `i`: every site it provides, then the logits of every
    /// position fed (the verdict at the last, the largest KL over all).
    pub fn reference(&self, i: usize, views: &[StepArrays<'_, '_>], pairs: &[PairStep], seconds: f64) -> Result<RefStep, HarnessError> {
        // The noise floor excuses a comparison only with the disagreement of references that
        // compute in its own arithmetic class (the same weights mode against the engine): the
        // distance between a dense reference and llama.cpp's 8-bit activations is no excuse
        // for the engine against the dense one.
        let others: Vec<usize> = (0..self.refs.len()).filter(|&j| j != i && self.judge.modes[j] == self.judge.modes[i]).collect();
        let mut sites = Vec::new();
        // A reference that returns the last row of the logits only is compared row-wise below,
        // not as a site.
        let ref_rows = views[i].with_site("logits", |sh, _| sh[0])?.unwrap_or(0);
        for es in self.engine.sites.iter().filter(|es| self.ref_sites[i].contains(&es.site)) {
            if es.site == "logits" && es.shape[0] != ref_rows {
                continue;
            }
            let pair_rel = |j: usize| self.pair(pairs, i, j).sites.iter().find(|(s, _)| *s == es.site).map(|(_, m)| m.rel_l2);
            let site_floor = floor(others.iter().filter_map(|&j| pair_rel(j)));
            let oracle = match self.oracle {
                Some(o) if o != i && self.ref_sites[o].contains(&es.site) => {
                    let to_engine = ref_site(&views[o], es, |so, dor| {
                        (so == es.shape.as_slice()).then(|| as_compared(es, so, dor, |dor| metrics_data(es.data.data(), dor).rel_l2))
                    })?;
                    oracle_distance(to_engine.flatten(), pair_rel(o))
                }
                _ => None,
            };
            let rec = ref_site(&views[i], es, |rshape, rdata| {
                as_compared(es, rshape, rdata, |rdata| self.judge.site(i, es, rshape, rdata, site_floor, oracle, self.engine.n_pos))
            })?;
            sites.push(rec.expect("declared sites checked above"));
        }
        let (n_pos, vocab) = (self.engine.n_pos, self.engine.vocab);
        let (lm, kl_max) = views[i]
            .with_site("logits", |rshape, rdata| {
                let mut kl_max = 0.0f64;
                let mut last = None;
                // The reference's rows are the last `rshape[0]` positions fed.
                let first = n_pos - rshape[0];
                for p in first..n_pos {
                    let Some(row) = self.engine.logits_row(p) else { continue };
                    let r = p - first;
                    let m = logit_metrics_data(row, rdata.slice(r * vocab..(r + 1) * vocab));
                    kl_max = kl_max.max(m.kl);
                    if p == n_pos - 1 {
                        last = Some(m);
                    }
                }
                (last.expect("n_pos >= 1"), kl_max)
            })?
            .expect("logits checked above");
        let kl_floor = floor(others.iter().map(|&j| self.pair(pairs, i, j).logits.kl));
        let refs_flip = others.iter().any(|&j| !self.pair(pairs, i, j).logits.top1_agree);
        let logits_verdict = self.judge.logits(i, &lm, kl_floor, refs_flip);
        let verdict = sites.iter().map(|s| s.verdict).chain([logits_verdict]).max().unwrap_or(Verdict::Pass);
        Ok(RefStep {
            reference: self.refs[i].name.clone(),
            sites,
            logits: lm,
            logits_verdict,
            kl_max_positions: kl_max,
            verdict,
            seconds,
        })
    }

    /// Bisect: at the first failing step, the reference's tensors of the suspect layer and
    /// its input (what isolation runs the engine's layer on).
    pub fn keep(&self, step: usize, start: usize, fed: usize, views: &[StepArrays<'_, '_>], ref_steps: &[RefStep]) -> Result<Option<KeptStep>, HarnessError> {
        let Some((ri, si)) = localize(ref_steps) else { return Ok(None) };
        let mut k = KeptStep { reference: ri, step, start, fed, site_index: si, ..Default::default() };
        let failing = &ref_steps[ri].sites[si].site;
        k.engine_site = self
            .engine
            .sites
            .iter()
            .find(|e| &e.site == failing && e.rows.is_none())
            .and_then(|e| Some((e.shape.clone(), e.data.data().to_f32_vec()?)));
        if let Some(l) = ref_steps[ri].sites[si].layer {
            let input = lockstep_engine::sites::layer_input(l);
            let prefix = format!("layers.{l}.");
            for name in self.ref_sites[ri].iter().filter(|n| **n == input || n.starts_with(&prefix)) {
                if let Some(Some(a)) = views[ri].with_site(name, |sh, d| d.to_f32_vec().map(|v| (sh.to_vec(), v)))? {
                    k.arrays.insert(name.clone(), a);
                }
            }
        } else if let Some(Some(a)) = views[ri].with_site(failing, |sh, d| d.to_f32_vec().map(|v| (sh.to_vec(), v)))? {
            // A site outside the layers (embed): the reference's value, beside the engine's.
            k.arrays.insert(failing.clone(), a);
        }
        Ok(Some(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_cache_is_compared_whole_and_a_long_one_in_its_appended_rows_and_a_sweep() {
        let mut sweep = Sweep::default();
        // Prefill, and decode steps while the earlier rows fit in one sweep: every row.
        assert_eq!(sweep.scope(0, 40).rows(40), None);
        assert_eq!(sweep.scope(CACHE_SWEEP_ROWS, 1).rows(CACHE_SWEEP_ROWS + 1), None);
        // 200 earlier rows: CACHE_SWEEP_ROWS of them from the cursor, and the row appended.
        const N: usize = CACHE_SWEEP_ROWS;
        let s = sweep.scope(200, 1);
        assert_eq!(s.rows(201), Some(vec![0..N, 200..201]));
        assert_eq!(sweep.scope(201, 1).rows(202), Some(vec![N..2 * N, 201..202]));
        // A cache that does not hold every position (a window; the stale-cache bug): whole.
        assert_eq!(sweep.scope(202, 1).rows(150), None);
    }

    #[test]
    fn the_sweep_reaches_every_earlier_row_within_its_bound_of_calls() {
        for start in [65usize, 100, 1000, 4095] {
            let mut sweep = Sweep::default();
            let calls = start.div_ceil(CACHE_SWEEP_ROWS);
            let mut seen = vec![false; start + calls];
            for c in 0..calls {
                let total = start + c + 1;
                for r in sweep.scope(start + c, 1).rows(total).expect("in part") {
                    r.for_each(|p| seen[p] = true);
                }
            }
            assert!(seen[..start].iter().all(|&s| s), "start {start}: rows left after {calls} calls");
        }
    }
}
