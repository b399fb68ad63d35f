//! One lockstep step: the engine's forward with its captures (mapped to the Hugging Face
//! layout), every reference's step on the same tokens, and the comparison of all of them at
//! that step: reference against reference (the noise floor), the engine against each
//! reference (sites and next-token distribution), and what bisect keeps of a failing step.

use std::collections::HashSet;
use std::time::Instant;

use candle_core::{DType, Tensor};
use lockstep_engine::{Capture, Decoder};

use crate::compare::tolerance::Verdict;
use crate::compare::data::Values;
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

/// Runs the engine on `feed`, keeping the sites in `wanted`, each in the Hugging Face layout.
pub fn engine_step(model: &dyn Decoder, feed: &[u32], cache: &mut lockstep_engine::KvCache, wanted: &HashSet<&str>) -> Result<EngineStep, HarnessError> {
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
        let (t, transform) = model.to_canonical(s, &t)?;
        let data = values(&t)?;
        sites.push(EngineSite { site, shape: t.dims().to_vec(), data, transform });
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
        sites.push(EngineSite { site: "logits".into(), shape: vec![rows, vocab], data, transform: None });
    }
    Ok(EngineStep { sites, logits, n_pos: feed.len(), rows, vocab, logits_values, logits_site, seconds })
}

/// A tensor's values in its own dtype (f32 stays f32: no widened copy; f64 and the half
/// types as f64).
fn values(t: &Tensor) -> Result<Values, HarnessError> {
    Ok(match t.dtype() {
        DType::F32 => Values::F32(t.flatten_all()?.to_vec1::<f32>()?),
        _ => Values::F64(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?),
    })
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
            let Some(shape) = v.with_site(&es.site, |sh, _| sh.to_vec())? else { continue };
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
                    let m = views[a].with_site(&es.site, |sa, da| {
                        views[b].with_site(&es.site, |sb, db| (sa == sb).then(|| metrics_data(da, db)))
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
        let others: Vec<usize> = (0..self.refs.len()).filter(|&j| j != i).collect();
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
                    let to_engine = views[o].with_site(&es.site, |so, dor| {
                        (so == es.shape.as_slice()).then(|| metrics_data(es.data.data(), dor).rel_l2)
                    })?;
                    oracle_distance(to_engine.flatten(), pair_rel(o))
                }
                _ => None,
            };
            let rec = views[i].with_site(&es.site, |rshape, rdata| self.judge.site(i, es, rshape, rdata, site_floor, oracle))?;
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
        if let Some(l) = ref_steps[ri].sites[si].layer {
            let input = lockstep_engine::sites::layer_input(l);
            let prefix = format!("layers.{l}.");
            for name in self.ref_sites[ri].iter().filter(|n| **n == input || n.starts_with(&prefix)) {
                if let Some(Some(a)) = views[ri].with_site(name, |sh, d| d.to_f32_vec().map(|v| (sh.to_vec(), v)))? {
                    k.arrays.insert(name.clone(), a);
                }
            }
        }
        Ok(Some(k))
    }
}
