//! Judging one step: pure functions from the engine's tensor, a reference's tensor, the
//! tolerance and the measured noise floor to a record with its verdict; the next-token
//! distribution's verdict; which site of a failing step is to blame.
//!
//! The noise-floor rule: at each site and step, the smallest rel-L2 between this reference
//! and any other reference of the same arithmetic class (the same [`WeightsMode`] against the
//! engine) is the floor; an engine error within `FLOOR_MULTIPLE` times the floor is drift, not
//! failure (`compare::tolerance`).

use lockstep_engine::ModelInfo;

use crate::compare::metrics::LogitMetrics;
use crate::compare::tolerance::{
    logit_tolerance, logit_verdict_with_floor, quant_bounds, quant_logit_verdict, same_quant_layer0_exact,
    tensor_verdict_with_floor, tolerance, tolerance_layer, LogitTolerance, Precision, QuantBounds, SiteKind, Verdict,
    WeightsMode, FLOOR_MULTIPLE,
};
use crate::compare::routing::{self, RoutingRecord};
use crate::compare::data::Values;
use crate::compare::{metrics_data, Data};
use crate::reference::Reference;
use crate::results::run::{OracleDistance, RefStep, SiteRecord};

/// An engine site of one step, in the Hugging Face layout, in the engine's dtype.
pub struct EngineSite {
    pub site: String,
    pub shape: Vec<usize>,
    /// The values compared: of a cache compared in part, its `rows` only (heads first).
    pub data: Values,
    pub transform: Option<&'static str>,
    /// A cache compared in part: the rows `data` holds (`shape` is the whole cache's).
    pub rows: Option<Vec<std::ops::Range<usize>>>,
    /// A cache compared in part: the cache itself, in the model's layout (a view, not a copy).
    pub view: Option<candle_core::Tensor>,
    /// The cache of a sliding-window layer, in its canonical form ([`super::step::Windows`]):
    /// `data` and `shape` hold its last positions only, and every reference's cache is cut to
    /// as many before it is compared.
    pub window: Option<usize>,
}

/// [`SiteRecord::window_lag`]: the engine's rows of a windowed cache `(heads, keep, width)`
/// from `fed` on against the reference's first `keep - fed`, equal within f32 noise
/// (rel-L2 < 1e-4, what separates the same K/V rows computed twice from other rows).
fn window_lag(es: &EngineSite, shape: &[usize], rdata: Data<'_>, fed: usize) -> Option<usize> {
    use crate::compare::data::gather_rows;
    let (Some(_), &[_, keep, _]) = (es.window, shape) else { return None };
    if fed == 0 || fed >= keep || es.rows.is_some() {
        return None;
    }
    let e = gather_rows(es.data.data(), shape, &[fed..keep])?;
    let r = gather_rows(rdata, shape, &[0..keep - fed])?;
    (crate::compare::data::metrics_data(e.data(), r.data()).rel_l2 < 1e-4).then_some(fed)
}

/// How the engine is judged against each reference of a run: which arithmetic each pair
/// shares decides the tolerances.
pub struct Judge {
    pub modes: Vec<WeightsMode>,
    pub qbounds: QuantBounds,
    layer0_exact: bool,
    ltol: LogitTolerance,
    precision: Precision,
    /// Experts per position of an MoE model (0: dense).
    top_k: usize,
}

impl Judge {
    pub fn new(info: &ModelInfo, refs: &[Reference], precision: Precision) -> Judge {
        Judge {
            modes: refs
                .iter()
                .map(|r| {
                    if is_same_engine(info, r, precision) {
                        WeightsMode::SameEngine
                    } else {
                        WeightsMode::of(info.quantized_kernels, r.description.quantized_activations)
                    }
                })
                .collect(),
            qbounds: quant_bounds(info.quant_type.as_deref()),
            layer0_exact: same_quant_layer0_exact(&info.matrix_types),
            ltol: logit_tolerance(WeightsMode::SameWeights, precision),
            precision,
            top_k: info.config.num_experts_per_tok,
        }
    }

    /// The record of one site against reference `i`: its shapes, metrics and verdict
    /// (a shape mismatch fails, with a note that says how).
    #[allow(clippy::too_many_arguments)]
    pub fn site(
        &self,
        i: usize,
        es: &EngineSite,
        rshape: &[usize],
        rdata: Data<'_>,
        floor: Option<f64>,
        oracle: Option<OracleDistance>,
        fed: usize,
    ) -> SiteRecord {
        let kind = SiteKind::of(&es.site);
        let layer = lockstep_engine::sites::layer_of(&es.site);
        let base = SiteRecord {
            site: es.site.clone(),
            layer,
            kind,
            engine_shape: es.shape.clone(),
            reference_shape: rshape.to_vec(),
            metrics: None,
            verdict: Verdict::Fail,
            floor,
            oracle,
            transform: es.transform,
            note: None,
            routing: None,
            window_lag: None,
        };
        if rshape != es.shape.as_slice() {
            return SiteRecord { note: Some(shape_note(kind, &es.shape, rshape)), ..base };
        }
        let tol = tolerance(self.modes[i], self.precision, kind, tolerance_layer(self.modes[i], layer, self.layer0_exact));
        let m = metrics_data(es.data.data(), rdata);
        // Against itself, another reference's disagreement excuses nothing.
        let floor = if self.modes[i] == WeightsMode::SameEngine { None } else { floor };
        let routing = self.routing(es, rdata);
        let note = routing.as_ref().and_then(|r| r.note());
        let verdict = tensor_verdict_with_floor(&m, &tol, floor);
        let window_lag = match verdict {
            Verdict::Fail => window_lag(es, rshape, rdata, fed),
            _ => None,
        };
        SiteRecord { verdict, metrics: Some(m), note, routing, window_lag, ..base }
    }

    /// An MoE site's routing comparison (`None` for other sites, or a sketched reference).
    fn routing(&self, es: &EngineSite, rdata: Data<'_>) -> Option<RoutingRecord> {
        let leaf = lockstep_engine::sites::leaf_of(&es.site);
        let n = *es.shape.last()?;
        let r: Vec<f64> = match rdata {
            Data::F32(x) => x.iter().map(|&v| v as f64).collect(),
            Data::F64(x) => x.to_vec(),
            Data::Sketch(_) | Data::TopK(_) | Data::TopKRow(..) => return None,
        };
        match leaf {
            "router" if self.top_k > 0 => Some(routing::compare_router(&es.data.to_f64(), &r, n, self.top_k)),
            "expert_weights" => Some(routing::compare_expert_weights(&es.data.to_f64(), &r, n)),
            _ => None,
        }
    }

    /// The next-token distribution's verdict against reference `i`, given the smallest KL
    /// between that reference and another (`kl_floor`) and whether the references
    /// themselves disagree on the top token (`refs_flip`).
    pub fn logits(&self, i: usize, lm: &LogitMetrics, kl_floor: Option<f64>, refs_flip: bool) -> Verdict {
        match self.modes[i] {
            WeightsMode::SameWeights => logit_verdict_with_floor(lm, &self.ltol, kl_floor, refs_flip),
            WeightsMode::SameEngine => logit_verdict_with_floor(lm, &self.ltol, None, false),
            _ => match quant_logit_verdict(lm, &self.qbounds) {
                // As far from this reference as another reference is: drift.
                Verdict::Fail
                    if kl_floor.is_some_and(|f| lm.kl <= FLOOR_MULTIPLE * f) && lm.delta_p.abs() <= self.qbounds.fail_delta_p =>
                {
                    Verdict::Drift
                }
                v => v,
            },
        }
    }
}

/// True when reference `r` is the engine under test itself in the run's dtype: `--reference
/// engine` (live, or a trace recorded from it), or `bundled` when the bundled engine is
/// under test.
fn is_same_engine(info: &ModelInfo, r: &Reference, precision: Precision) -> bool {
    let name = r.spec.name.as_str();
    let itself = name == "engine" || (name == "bundled" && info.engine == "lockstep-engine");
    itself && r.spec.is_oracle() == (precision == Precision::F64)
}

/// The smallest of the reference-vs-reference disagreements (`None` with one reference).
pub fn floor(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    values.into_iter().fold(None, |acc: Option<f64>, x| Some(acc.map_or(x, |a| a.min(x))))
}

/// What a shape mismatch means: for a cache, how many positions each side holds.
pub fn shape_note(kind: SiteKind, e: &[usize], r: &[usize]) -> String {
    if kind == SiteKind::Cache && e.len() == 3 && r.len() == 3 && e[0] == r[0] && e[2] == r[2] {
        let pl = |n: usize| if n == 1 { "1 position".to_string() } else { format!("{n} positions") };
        return format!("the engine's cache holds {}, the reference's holds {}", pl(e[1]), pl(r[1]));
    }
    format!("shape {e:?} in the engine, {r:?} in the reference")
}

/// Picks the site to blame in the first failing step: (reference index, site index), or
/// None when nothing failed at this step.
pub fn localize(refs: &[RefStep]) -> Option<(usize, usize)> {
    let failed = refs.iter().any(|r| r.verdict == Verdict::Fail);
    if !failed {
        return None;
    }
    // (priority, position): lower wins.
    let mut best: Option<((u8, usize), usize, usize)> = None;
    for (ri, rs) in refs.iter().enumerate() {
        for (si, s) in rs.sites.iter().enumerate() {
            let prio = match (s.metrics.is_none(), s.kind, s.verdict) {
                (true, SiteKind::Cache, _) => 0,
                (true, _, _) => 1,
                (false, _, Verdict::Fail | Verdict::Drift) => 2,
                _ => continue,
            };
            let key = (prio, si);
            if best.is_none_or(|(b, _, _)| key < b) {
                best = Some((key, ri, si));
            }
        }
    }
    best.map(|(_, ri, si)| (ri, si)).or_else(|| {
        // Only the next-token distribution failed: blame the logits site.
        refs.iter().enumerate().find_map(|(ri, rs)| {
            (rs.logits_verdict == Verdict::Fail)
                .then(|| rs.sites.iter().position(|s| s.site == "logits").map(|si| (ri, si)))
                .flatten()
        })
    })
}

/// An oracle's distances: rel-L2 of the engine and of the reference to the f64 oracle.
pub fn oracle_distance(engine_to_oracle: Option<f64>, reference_to_oracle: Option<f64>) -> Option<OracleDistance> {
    match (engine_to_oracle, reference_to_oracle) {
        (Some(e), Some(r)) => Some(OracleDistance { engine_rel_l2: e, reference_rel_l2: r }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_smallest_disagreement() {
        assert_eq!(floor([3e-6, 1e-6, 2e-6]), Some(1e-6));
        assert_eq!(floor(std::iter::empty()), None);
    }

    #[test]
    fn a_cache_shape_mismatch_says_how_many_positions_each_side_holds() {
        assert_eq!(
            shape_note(SiteKind::Cache, &[2, 1, 8], &[2, 14, 8]),
            "the engine's cache holds 1 position, the reference's holds 14 positions"
        );
        assert_eq!(shape_note(SiteKind::Activation, &[1, 4], &[2, 4]), "shape [1, 4] in the engine, [2, 4] in the reference");
    }

    #[test]
    fn a_site_within_the_floor_multiple_is_drift_and_beyond_it_fails() {
        let j = Judge {
            modes: vec![WeightsMode::SameWeights],
            qbounds: quant_bounds(None),
            layer0_exact: false,
            ltol: logit_tolerance(WeightsMode::SameWeights, Precision::F32),
            precision: Precision::F32,
            top_k: 0,
        };
        let es = |v: f64| EngineSite { site: "layers.0.q".into(), shape: vec![1, 2], data: vec![1.0, v].into(), transform: None, rows: None, view: None, window: None };
        let r = [1.0f32, 1.0];
        // rel-L2 2e-2 fails the f32 bound (1e-2) by itself; within 4x a floor of 6e-3 it is
        // drift; 4x a floor of 4e-3 does not cover it.
        let big = j.site(0, &es(1.0 + 2.828e-2), &[1, 2], Data::F32(&r), None, None, 1);
        assert_eq!(big.verdict, Verdict::Fail, "{big:?}");
        let within = j.site(0, &es(1.0 + 2.828e-2), &[1, 2], Data::F32(&r), Some(6e-3), None, 1);
        assert_eq!(within.verdict, Verdict::Drift, "{within:?}");
        let beyond = j.site(0, &es(1.0 + 2.828e-2), &[1, 2], Data::F32(&r), Some(4e-3), None, 1);
        assert_eq!(beyond.verdict, Verdict::Fail, "{beyond:?}");
        let exact = j.site(0, &es(1.0), &[1, 2], Data::F32(&r), None, None, 1);
        assert_eq!(exact.verdict, Verdict::Pass);
        let shape = j.site(0, &es(1.0), &[2, 1], Data::F32(&r), None, None, 1);
        assert_eq!((shape.verdict, shape.metrics.is_none()), (Verdict::Fail, true));
    }
}
