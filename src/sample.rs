//! Samplers: greedy, temperature, top-k, top-p, min-p and repetition penalty, each a pure
//! function of (scores, previous tokens) on a vector of f64 scores, plus a seedable
//! generator that supplies the uniform draw. It owns the choice of the next token from
//! logits; it does not run the model (see [`crate::generate`]).
//!
//! # Filter order
//!
//! A sampler is a [`Stage`] list applied left to right to the logits, then a softmax, then
//! an inverse-CDF draw with one uniform number. The filters are invariant to adding a
//! constant to every score, so it does not matter whether a stage sees logits or
//! log-probabilities; what matters is **where the temperature sits**: top-p and min-p keep
//! other tokens when they see the tempered distribution than when they see the raw one.
//! The two orders lockstep's references use are built in:
//!
//! - [`Order::transformers`]: rep_penalty -> temperature -> top_k -> top_p -> min_p, what
//!   `GenerationMixin._get_logits_processor` builds (transformers 5.x,
//!   `generation/utils.py`): the filters see the tempered distribution; the repetition
//!   penalty looks at every token of the sequence (prompt included).
//! - [`Order::mlx`]: rep_penalty -> top_p -> min_p -> top_k -> temperature, what
//!   `mlx_lm.sample_utils.make_sampler` chains: the filters see the distribution at
//!   temperature 1, and `categorical_sampling` divides by the temperature last; the
//!   repetition penalty (`make_logits_processors`) looks at the last 20 tokens only.
//!
//! Any other order can be written out (`order=rep_penalty,top_p,temperature,...`).
//!
//! # Semantics of each filter (matching both references)
//!
//! - repetition penalty `r`: every distinct token id among the previous tokens (the last
//!   `window` of them when a window is set) gets `s < 0 ? s * r : s / r`.
//! - temperature `t`: `s / t`.
//! - top-k `k`: keeps the scores `>=` the k-th largest (ties with it kept, as
//!   transformers' `TopKLogitsWarper`); `k = 0` is off.
//! - top-p `p`: sorts by score, keeps a token when the probability mass of the tokens
//!   strictly before it is `< p` (the smallest set whose mass reaches `p`, including the
//!   token that crosses it); ties with the last kept score are kept (mlx's threshold rule;
//!   transformers' sort decides ties by position). `p = 1` is off.
//! - min-p `m`: keeps `p_i >= m * p_max` (both references); `m = 0` is off.
//! - greedy (`temperature = 0`): the penalty runs, the filters do not (they always keep the
//!   top token); the distribution is one-hot on the first largest score.
//!
//! Every filter keeps at least the top token. [`process`] also reports how close the
//! closest keep/drop decision of each filter was to its threshold ([`Processed::slack`]),
//! so that a comparison with a float32 implementation can tell a rounding-level boundary
//! case from a real difference.

use std::fmt;

use crate::error::{EngineError, Result};

/// One step of the sampling pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    RepPenalty,
    Temperature,
    TopK,
    TopP,
    MinP,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::RepPenalty, Stage::Temperature, Stage::TopK, Stage::TopP, Stage::MinP];

    pub fn name(self) -> &'static str {
        match self {
            Stage::RepPenalty => "rep_penalty",
            Stage::Temperature => "temperature",
            Stage::TopK => "top_k",
            Stage::TopP => "top_p",
            Stage::MinP => "min_p",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Some(match s {
            "rep_penalty" | "rep" | "repetition_penalty" => Stage::RepPenalty,
            "temperature" | "temp" => Stage::Temperature,
            "top_k" => Stage::TopK,
            "top_p" => Stage::TopP,
            "min_p" => Stage::MinP,
            _ => return None,
        })
    }
}

/// The order of the stages, and the repetition-penalty window that goes with a profile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Order {
    /// `transformers`, `mlx` or `custom`.
    pub name: String,
    pub stages: Vec<Stage>,
    /// How many previous tokens the repetition penalty looks at (`None`: all of them).
    pub rep_window: Option<usize>,
}

/// mlx-lm's `make_logits_processors` default `repetition_context_size`.
pub const MLX_REP_WINDOW: usize = 20;

impl Order {
    pub fn transformers() -> Order {
        use Stage::*;
        Order { name: "transformers".into(), stages: vec![RepPenalty, Temperature, TopK, TopP, MinP], rep_window: None }
    }

    pub fn mlx() -> Order {
        use Stage::*;
        Order { name: "mlx".into(), stages: vec![RepPenalty, TopP, MinP, TopK, Temperature], rep_window: Some(MLX_REP_WINDOW) }
    }

    /// A profile by name (`transformers`, `hf`, `mlx`), or a list of stage names separated
    /// by `+` or `>` (all five stages, each once).
    pub fn parse(s: &str) -> Result<Order> {
        match s {
            "transformers" | "hf" => return Ok(Order::transformers()),
            "mlx" | "mlx_lm" | "mlx-lm" => return Ok(Order::mlx()),
            _ => {}
        }
        let mut stages = vec![];
        for part in s.split(['+', '>']).map(str::trim) {
            let st = Stage::parse(part).ok_or_else(|| {
                EngineError::Input(format!(
                    "sampler order: unknown stage `{part}` (use transformers, mlx, or the five stages \
                     rep_penalty, temperature, top_k, top_p, min_p joined by `>`)"
                ))
            })?;
            if stages.contains(&st) {
                return Err(EngineError::Input(format!("sampler order: `{part}` appears twice")));
            }
            stages.push(st);
        }
        if stages.len() != Stage::ALL.len() {
            return Err(EngineError::Input(format!(
                "sampler order `{s}`: name all five stages (rep_penalty, temperature, top_k, top_p, min_p) once"
            )));
        }
        Ok(Order { name: "custom".into(), stages, rep_window: None })
    }

    /// The stages that run for `cfg` (a disabled filter is skipped; greedy runs only the penalty).
    pub fn active(&self, cfg: &SamplerConfig) -> Vec<Stage> {
        self.stages.iter().copied().filter(|s| cfg.is_active(*s)).collect()
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.stages.iter().map(|s| s.name()).collect();
        write!(f, "{}", names.join(" > "))
    }
}

/// Sampling parameters. The defaults are greedy decoding with every filter off.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SamplerConfig {
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off; otherwise in (0, 1).
    pub top_p: f64,
    /// 0 = off; otherwise in (0, 1].
    pub min_p: f64,
    /// 1 = off; > 0.
    pub rep_penalty: f64,
    pub seed: u64,
    /// Whether a seed was given (for the generation-config table).
    pub seed_given: bool,
    pub order: Order,
    /// The `sampler-temperature` fault (`crate::faults`): the logits are multiplied by the
    /// temperature instead of divided. Never set by parsing; not part of any reference's
    /// configuration.
    #[serde(skip)]
    pub invert_temperature: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            rep_penalty: 1.0,
            seed: 0,
            seed_given: false,
            order: Order::transformers(),
            invert_temperature: false,
        }
    }
}

impl SamplerConfig {
    /// Parses `temp=0.8,top_p=0.95,top_k=40,min_p=0.05,rep_penalty=1.1,seed=0[,order=mlx]
    /// [,rep_window=N]`. Unknown keys and out-of-range values are errors naming the key.
    pub fn parse(spec: &str) -> Result<SamplerConfig> {
        let mut c = SamplerConfig::default();
        let mut window: Option<Option<usize>> = None;
        let bad = |k: &str, v: &str, want: &str| EngineError::Input(format!("--sampler {k}={v}: {want}"));
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                EngineError::Input(format!("--sampler: `{part}` is not KEY=VALUE (e.g. temp=0.8,top_p=0.95,seed=0)"))
            })?;
            let (k, v) = (k.trim(), v.trim());
            let num = |want: &str| v.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| bad(k, v, want));
            match k {
                "temp" | "temperature" => {
                    c.temperature = num("a number >= 0")?;
                    if c.temperature < 0.0 {
                        return Err(bad(k, v, "must be >= 0 (0 = greedy)"));
                    }
                }
                "top_k" => c.top_k = v.parse().map_err(|_| bad(k, v, "an integer >= 0 (0 = off)"))?,
                "top_p" => {
                    c.top_p = num("a number in (0, 1]")?;
                    // top_p = 0 means "off" to mlx-lm and "keep one token" to transformers.
                    if !(c.top_p > 0.0 && c.top_p <= 1.0) {
                        return Err(bad(k, v, "must be in (0, 1] (1 = off)"));
                    }
                }
                "min_p" => {
                    c.min_p = num("a number in [0, 1]")?;
                    if !(0.0..=1.0).contains(&c.min_p) {
                        return Err(bad(k, v, "must be in [0, 1] (0 = off)"));
                    }
                }
                "rep_penalty" | "repetition_penalty" => {
                    c.rep_penalty = num("a number > 0")?;
                    if c.rep_penalty <= 0.0 {
                        return Err(bad(k, v, "must be > 0 (1 = off)"));
                    }
                }
                "seed" => {
                    c.seed = v.parse().map_err(|_| bad(k, v, "an unsigned integer"))?;
                    c.seed_given = true;
                }
                "order" => c.order = Order::parse(v)?,
                "rep_window" => {
                    window = Some(if v == "all" {
                        None
                    } else {
                        Some(v.parse().ok().filter(|n: &usize| *n > 0).ok_or_else(|| bad(k, v, "a positive integer or `all`"))?)
                    })
                }
                _ => {
                    return Err(EngineError::Input(format!(
                        "--sampler: unknown key `{k}` (known: temp, top_k, top_p, min_p, rep_penalty, seed, order, rep_window)"
                    )))
                }
            }
        }
        if let Some(w) = window {
            c.order.rep_window = w;
        }
        Ok(c)
    }

    pub fn greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn is_active(&self, s: Stage) -> bool {
        match s {
            Stage::RepPenalty => self.rep_penalty != 1.0,
            _ if self.greedy() => false,
            Stage::Temperature => true,
            Stage::TopK => self.top_k > 0,
            Stage::TopP => self.top_p < 1.0,
            Stage::MinP => self.min_p > 0.0,
        }
    }

    /// The same parameters in another order (for comparing with a reference's sampler).
    pub fn with_order(&self, order: Order) -> SamplerConfig {
        SamplerConfig { order, ..self.clone() }
    }

    /// `temp=0.8, top_p=0.95, seed=0 (transformers order)`, for reports.
    pub fn describe(&self) -> String {
        if self.greedy() && self.rep_penalty == 1.0 {
            return "greedy".into();
        }
        let mut parts = vec![];
        if self.greedy() {
            parts.push("greedy".to_string());
        } else {
            parts.push(format!("temp={}", self.temperature));
        }
        if self.top_k > 0 && !self.greedy() {
            parts.push(format!("top_k={}", self.top_k));
        }
        if self.top_p < 1.0 && !self.greedy() {
            parts.push(format!("top_p={}", self.top_p));
        }
        if self.min_p > 0.0 && !self.greedy() {
            parts.push(format!("min_p={}", self.min_p));
        }
        if self.rep_penalty != 1.0 {
            parts.push(format!("rep_penalty={}", self.rep_penalty));
        }
        if !self.greedy() {
            parts.push(format!("seed={}", self.seed));
        }
        format!("{} ({} order)", parts.join(", "), self.order.name)
    }
}

// --- the filters: pure functions on scores ------------------------------------------------------

/// Repetition penalty on `scores` for the distinct ids among `prev` (the last `window`).
pub fn repetition_penalty(scores: &mut [f64], prev: &[u32], penalty: f64, window: Option<usize>) {
    let from = window.map_or(0, |w| prev.len().saturating_sub(w));
    let mut seen = std::collections::HashSet::new();
    for &t in &prev[from..] {
        let i = t as usize;
        if i < scores.len() && seen.insert(i) {
            let s = scores[i];
            scores[i] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

pub fn temperature(scores: &mut [f64], t: f64) {
    for s in scores.iter_mut() {
        *s /= t;
    }
}

/// Indices sorted by score, largest first (NaN never occurs: logits are checked finite).
fn sorted_desc(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx
}

/// float32 unit roundoff (2^-24): the references filter in float32.
pub const F32_ROUNDOFF: f64 = 5.960_464_477_539_063e-8;

/// Decisions of the score- and log-probability-based filters (top-k, min-p) closer than this
/// to their threshold can go either way in a float32 implementation: scores of magnitude
/// ~20 carry ~1e-6 of rounding after a temperature division or a log-softmax.
pub const F32_SCORE_BOUND: f64 = 1e-5;

/// How far a float32 implementation's probability mass can be from the exact one: any
/// float32 sum of `n` terms (a softmax normalizer or logsumexp over the vocabulary, a
/// cumulative sum) is within `(n - 1)` roundoffs of the running sum (Higham, recursive
/// summation), plus ~1e-6 of relative error in the probabilities themselves. Measured:
/// mlx's float32 `logsumexp` over SmolLM2's 49152 logits is off by 0.8e-4..2e-4 (tail terms
/// below half an ulp of the running sum are lost), which moves mlx-lm's top-p decisions
/// by that much mass; the bound for n = 49152 is 2.9e-3.
pub fn f32_mass_bound(n: usize) -> f64 {
    n as f64 * F32_ROUNDOFF + 1e-6
}

/// A token whose keep/drop decision was within float32 rounding of the filter's threshold.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Boundary {
    pub stage: Stage,
    pub token: u32,
    /// Distance of its decision from the threshold (top-p: mass; min-p: log-probability;
    /// top-k: score).
    pub slack: f64,
    /// The float32 rounding bound it is within.
    pub bound: f64,
}

/// Top-k; returns the slack (the gap between the k-th and the (k+1)-th score) and the
/// tokens on the boundary (scores within [`F32_SCORE_BOUND`] of the k-th).
pub fn top_k(scores: &mut [f64], k: usize) -> (f64, Vec<Boundary>) {
    if k == 0 || k >= scores.len() {
        return (f64::INFINITY, vec![]);
    }
    let idx = sorted_desc(scores);
    let kth = scores[idx[k - 1]];
    let slack = kth - scores[idx[k]];
    let mut boundary = vec![];
    for (i, s) in scores.iter_mut().enumerate() {
        if s.is_finite() && (*s - kth).abs() <= F32_SCORE_BOUND {
            boundary.push(Boundary { stage: Stage::TopK, token: i as u32, slack: (*s - kth).abs(), bound: F32_SCORE_BOUND });
        }
        if *s < kth {
            *s = f64::NEG_INFINITY;
        }
    }
    (slack, boundary)
}

/// Softmax of finite-or-(-inf) scores.
pub fn softmax(scores: &[f64]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut out: Vec<f64> = scores.iter().map(|&s| if s == f64::NEG_INFINITY { 0.0 } else { (s - max).exp() }).collect();
    let sum: f64 = out.iter().sum();
    for x in out.iter_mut() {
        *x /= sum;
    }
    out
}

/// Top-p (nucleus); returns the slack (the smallest |mass before a token - p|: how far the
/// closest keep/drop decision was from flipping) and the tokens whose decision was within
/// [`f32_mass_bound`] of flipping.
pub fn top_p(scores: &mut [f64], p: f64) -> (f64, Vec<Boundary>) {
    if p >= 1.0 {
        return (f64::INFINITY, vec![]);
    }
    let probs = softmax(scores);
    let idx = sorted_desc(scores);
    let bound = f32_mass_bound(scores.len());
    let mut before = 0.0;
    let mut slack = f64::INFINITY;
    let mut boundary = vec![];
    let mut cut = None; // first sorted position dropped
    for (pos, &i) in idx.iter().enumerate() {
        if probs[i] == 0.0 {
            cut.get_or_insert(pos);
            break;
        }
        let d = (before - p).abs();
        slack = slack.min(d);
        if pos > 0 && d <= bound {
            boundary.push(Boundary { stage: Stage::TopP, token: i as u32, slack: d, bound });
        }
        if cut.is_none() && pos > 0 && before >= p {
            cut = Some(pos);
        }
        if before > p + bound && cut.is_some() {
            break; // every later decision is a clear drop
        }
        before += probs[i];
    }
    if let Some(c) = cut {
        // Ties with the last kept score stay (a threshold on the score, as mlx-lm).
        let threshold = scores[idx[c - 1]];
        for s in scores.iter_mut() {
            if *s < threshold {
                *s = f64::NEG_INFINITY;
            }
        }
    }
    (slack, boundary)
}

/// Min-p; returns the slack in log space (min |ln p_i - ln(m * p_max)| over the finite
/// tokens) and the tokens within [`F32_SCORE_BOUND`] of the threshold.
pub fn min_p(scores: &mut [f64], m: f64) -> (f64, Vec<Boundary>) {
    if m <= 0.0 {
        return (f64::INFINITY, vec![]);
    }
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let threshold = max + m.ln(); // ln p_i - ln p_max = s_i - max
    let mut slack = f64::INFINITY;
    let mut boundary = vec![];
    for (i, s) in scores.iter_mut().enumerate() {
        if *s == f64::NEG_INFINITY {
            continue;
        }
        let d = (*s - threshold).abs();
        slack = slack.min(d);
        if d <= F32_SCORE_BOUND {
            boundary.push(Boundary { stage: Stage::MinP, token: i as u32, slack: d, bound: F32_SCORE_BOUND });
        }
        if *s < threshold {
            *s = f64::NEG_INFINITY;
        }
    }
    (slack, boundary)
}

/// Index of the first largest score.
pub fn argmax(scores: &[f64]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best
}

/// The distribution a sampler draws from, after every stage.
#[derive(Debug, Clone)]
pub struct Processed {
    /// Scores after every stage (`-inf` for dropped tokens; before the softmax).
    pub scores: Vec<f64>,
    /// Probabilities (one-hot when greedy).
    pub probs: Vec<f64>,
    /// Kept token ids, ascending.
    pub kept: Vec<u32>,
    /// The stages that ran, in order.
    pub stages: Vec<Stage>,
    /// Per filter that ran: how close its closest keep/drop decision was to the threshold
    /// (top-k: score gap; top-p: probability mass; min-p: log-probability).
    pub slack: Vec<(Stage, f64)>,
    /// Tokens whose decision was within float32 rounding of a filter's threshold: a float32
    /// implementation may keep or drop them either way.
    pub boundary: Vec<Boundary>,
}

/// Runs the pipeline of `cfg` on one position's logits, with `prev` the tokens so far
/// (prompt included) for the repetition penalty.
pub fn process(logits: &[f32], prev: &[u32], cfg: &SamplerConfig) -> Result<Processed> {
    if logits.is_empty() {
        return Err(EngineError::Input("sampler: empty logits".into()));
    }
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(EngineError::Input(format!("sampler: logit {i} is {} (non-finite logits cannot be sampled)", logits[i])));
    }
    let mut s: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    let stages = cfg.order.active(cfg);
    let mut slack = vec![];
    let mut boundary = vec![];
    for &st in &stages {
        let (sl, b) = match st {
            Stage::RepPenalty => {
                repetition_penalty(&mut s, prev, cfg.rep_penalty, cfg.order.rep_window);
                continue;
            }
            Stage::Temperature => {
                let t = if cfg.invert_temperature { 1.0 / cfg.temperature } else { cfg.temperature };
                temperature(&mut s, t);
                continue;
            }
            Stage::TopK => top_k(&mut s, cfg.top_k),
            Stage::TopP => top_p(&mut s, cfg.top_p),
            Stage::MinP => min_p(&mut s, cfg.min_p),
        };
        slack.push((st, sl));
        boundary.extend(b);
    }
    let probs = if cfg.greedy() {
        let mut p = vec![0.0; s.len()];
        p[argmax(&s)] = 1.0;
        p
    } else {
        softmax(&s)
    };
    let kept = probs.iter().enumerate().filter(|(_, &p)| p > 0.0).map(|(i, _)| i as u32).collect();
    Ok(Processed { scores: s, probs, kept, stages, slack, boundary })
}

/// Inverse-CDF draw: the first token whose cumulative probability exceeds `u` in [0, 1).
pub fn sample(probs: &[f64], u: f64) -> u32 {
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p <= 0.0 {
            continue;
        }
        acc += p;
        last = i;
        if u < acc {
            return i as u32;
        }
    }
    last as u32 // u within rounding of 1: the last kept token
}

/// xoshiro256** seeded through SplitMix64: a small, well-known generator whose stream is
/// fixed by the seed on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A sampler with its generator: one uniform draw per token, also when greedy (so that a
/// run's draws do not depend on which steps were greedy).
#[derive(Debug, Clone)]
pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: Rng,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = Rng::new(cfg.seed);
        Sampler { cfg, rng }
    }

    /// The next token from one position's logits; also returns the processed distribution.
    pub fn next(&mut self, logits: &[f32], prev: &[u32]) -> Result<(u32, Processed)> {
        let p = process(logits, prev, &self.cfg)?;
        let u = self.rng.uniform();
        let tok = if self.cfg.greedy() { argmax(&p.scores) as u32 } else { sample(&p.probs, u) };
        Ok((tok, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(spec: &str) -> SamplerConfig {
        SamplerConfig::parse(spec).unwrap()
    }

    #[test]
    fn parses_the_issue_spec() {
        let c = cfg("temp=0.8,top_p=0.95,top_k=40,min_p=0.05,rep_penalty=1.1,seed=0");
        assert_eq!((c.temperature, c.top_p, c.top_k, c.min_p, c.rep_penalty, c.seed), (0.8, 0.95, 40, 0.05, 1.1, 0));
        assert_eq!(c.order, Order::transformers());
        assert_eq!(cfg("temp=1,order=mlx").order, Order::mlx());
        assert_eq!(cfg("temp=1,order=mlx,rep_window=all").order.rep_window, None);
        let o = cfg("temp=1,order=top_p>min_p>top_k>temperature>rep_penalty").order;
        assert_eq!(o.stages[0], Stage::TopP);
        for bad in ["temp=-1", "top_p=0", "top_p=1.5", "min_p=2", "rep_penalty=0", "top_k=x", "seed=-1", "foo=1", "temp",
                    "order=top_p>top_p", "order=top_p>min_p", "temp=nan"] {
            let e = SamplerConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--sampler") || e.contains("order"), "{bad}: {e}");
        }
    }

    #[test]
    fn greedy_is_one_hot_on_the_first_largest_and_penalty_still_applies() {
        let p = process(&[1.0, 3.0, 3.0, 2.0], &[], &cfg("")).unwrap();
        assert_eq!(p.probs, vec![0.0, 1.0, 0.0, 0.0]);
        // Penalising token 1 (score 3 -> 1.5) moves the choice to token 2.
        let p = process(&[1.0, 3.0, 3.0, 2.0], &[1, 1], &cfg("rep_penalty=2")).unwrap();
        assert_eq!(p.kept, vec![2]);
    }

    #[test]
    fn negative_scores_are_multiplied_by_the_penalty() {
        let mut s = vec![-2.0, 2.0, 1.0];
        repetition_penalty(&mut s, &[0, 1, 1], 2.0, None);
        assert_eq!(s, vec![-4.0, 1.0, 1.0]);
        let mut s = vec![-2.0, 2.0, 1.0];
        repetition_penalty(&mut s, &[0, 1, 2], 2.0, Some(1)); // only the last token counts
        assert_eq!(s, vec![-2.0, 2.0, 0.5]);
    }

    #[test]
    fn top_p_keeps_the_token_that_crosses_p() {
        // probs 0.5, 0.3, 0.2: p=0.6 keeps the first two (0.5 < 0.6, 0.8 >= 0.6 stops after).
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let p = process(&l, &[], &cfg("temp=1,top_p=0.6")).unwrap();
        assert_eq!(p.kept, vec![0, 1]);
        let p = process(&l, &[], &cfg("temp=1,top_p=0.5")).unwrap();
        assert_eq!(p.kept, vec![0]);
    }

    #[test]
    fn temperature_position_changes_what_top_p_keeps() {
        let l: Vec<f32> = [0.6f32, 0.25, 0.1, 0.05].iter().map(|p| p.ln()).collect();
        let hf = process(&l, &[], &cfg("temp=0.5,top_p=0.9")).unwrap();
        let mlx = process(&l, &[], &cfg("temp=0.5,top_p=0.9,order=mlx")).unwrap();
        assert_eq!(hf.kept, vec![0, 1]);
        assert_eq!(mlx.kept, vec![0, 1, 2]);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_seeds_differ() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let draw = |seed: u64| {
            let mut s = Sampler::new(cfg(&format!("temp=1.0,seed={seed}")));
            (0..64).map(|_| s.next(&logits, &[]).unwrap().0).collect::<Vec<_>>()
        };
        assert_eq!(draw(0), draw(0));
        assert_ne!(draw(0), draw(1));
    }

    #[test]
    fn non_finite_logits_are_an_error() {
        assert!(process(&[0.0, f32::NAN], &[], &cfg("temp=1")).is_err());
    }

    proptest! {
        #[test]
        fn every_filter_keeps_the_top_token_and_sampling_stays_in_the_kept_set(
            logits in prop::collection::vec(-20.0f32..20.0, 2..200),
            k in 0usize..50, p in 0.01f64..1.0, m in 0.0f64..1.0, t in 0.05f64..3.0, u in 0.0f64..1.0,
            mlx in any::<bool>(),
        ) {
            let mut c = cfg(&format!("temp={t},top_k={k},top_p={p},min_p={m}"));
            if mlx { c.order = Order::mlx(); }
            let pr = process(&logits, &[], &c).unwrap();
            let top = argmax(&logits.iter().map(|&x| x as f64).collect::<Vec<_>>()) as u32;
            prop_assert!(pr.kept.contains(&top));
            let tok = sample(&pr.probs, u);
            prop_assert!(pr.kept.contains(&tok));
            let total: f64 = pr.probs.iter().sum();
            prop_assert!((total - 1.0).abs() < 1e-9);
            if k > 0 { prop_assert!(pr.kept.len() >= 1 && (pr.kept.len() <= k || logits.len() <= k || pr.slack.iter().any(|(s, v)| *s == Stage::TopK && *v == 0.0))); }
        }
    }
}
