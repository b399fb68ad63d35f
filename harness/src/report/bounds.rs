//! The bounds a case was judged with, as the report page draws them: per layer the rel-L2
//! pass and fail bounds and the noise floor, per reference the next-token KL bounds, the
//! references' own KL per step, and the case's worst error relative to its bound (what the
//! page sorts by). Read from a run's records with the tolerance table the judge uses
//! (`compare::tolerance`), so a line on a chart is the bound a verdict was decided by.

use lockstep_engine::sites::leaf_of;

use crate::compare::tolerance::{
    logit_tolerance, quant_bounds, same_quant_layer0_exact, tolerance, tolerance_layer, Tolerance, WeightsMode,
};
use crate::report::records::{CaseResult, WorstError};
use crate::results::run::{RunResult, SiteRecord};

/// The rel-L2 bounds of one site against reference `ri` (the judge's own lookup).
fn site_bounds(r: &RunResult, ri: usize, s: &SiteRecord, layer0_exact: bool) -> Option<Tolerance> {
    let mode = r.summary.references.get(ri)?.mode;
    Some(tolerance(mode, r.engine.dtype, s.kind, tolerance_layer(mode, s.layer, layer0_exact)))
}

/// The next-token KL bounds (pass, fail) of reference `ri`: the f32 logit tolerance in the
/// same-weights and same-engine modes, the quantized row otherwise.
fn kl_bounds(r: &RunResult, ri: usize) -> Option<(f64, f64)> {
    let s = r.summary.references.get(ri)?;
    Some(match s.mode {
        WeightsMode::SameWeights | WeightsMode::SameEngine => {
            let t = logit_tolerance(s.mode, r.engine.dtype);
            (t.pass_kl, t.fail_kl)
        }
        WeightsMode::SameQuant | WeightsMode::QuantVsDense => {
            let b = s.quant_bounds.unwrap_or_else(|| quant_bounds(None));
            (b.pass_kl, b.fail_kl)
        }
    })
}

fn tighter(a: Option<f64>, b: f64) -> Option<f64> {
    Some(a.map_or(b, |a| a.min(b)))
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Fills the bounds, floors, pair KLs and the worst error of a case summarized from `r`
/// (after `layer_error` and `heatmap` are filled).
pub fn annotate(c: &mut CaseResult, r: &RunResult) {
    let exact = same_quant_layer0_exact(&r.engine.matrix_types);
    let n_layers = r.num_layers;
    for (ri, rn) in c.references.iter_mut().enumerate() {
        if let Some((p, f)) = kl_bounds(r, ri) {
            rn.pass_kl = Some(p);
            rn.fail_kl = Some(f);
        }
    }
    for p in c.pairs.iter_mut() {
        p.kl = r
            .steps
            .iter()
            .map(|st| st.pairs.iter().find(|x| x.a == p.a && x.b == p.b).and_then(|x| finite(x.logits.kl)))
            .collect();
    }
    for (ri, le) in c.layer_error.iter_mut().enumerate() {
        let (mut pass, mut fail, mut floor) = (vec![None; n_layers], vec![None; n_layers], vec![None; n_layers]);
        for st in &r.steps {
            for s in st.references.get(ri).map(|x| x.sites.as_slice()).unwrap_or_default() {
                let Some(l) = s.layer.filter(|l| *l < n_layers) else { continue };
                if let Some(t) = site_bounds(r, ri, s, exact) {
                    pass[l] = tighter(pass[l], t.pass_rel_l2);
                    fail[l] = tighter(fail[l], t.fail_rel_l2);
                }
                if let Some(f) = s.floor.and_then(finite) {
                    floor[l] = Some(floor[l].map_or(f, |x: f64| x.max(f)));
                }
            }
        }
        le.pass_bound = pass;
        le.fail_bound = fail;
        le.floor = if floor.iter().any(|f| f.is_some()) { floor } else { vec![] };
    }
    if let Some(h) = c.heatmap.as_mut() {
        let (mut pass, mut fail) = (vec![None; n_layers], vec![None; n_layers]);
        for st in &r.steps {
            for s in st.references.first().map(|x| x.sites.as_slice()).unwrap_or_default() {
                let Some(l) = s.layer.filter(|l| *l < n_layers) else { continue };
                if leaf_of(&s.site) != h.site {
                    continue;
                }
                if let Some(t) = site_bounds(r, 0, s, exact) {
                    pass[l] = tighter(pass[l], t.pass_rel_l2);
                    fail[l] = tighter(fail[l], t.fail_rel_l2);
                }
            }
        }
        h.pass_bound = pass;
        h.fail_bound = fail;
    }
    c.worst = worst_error(r, exact);
}

/// The largest rel-L2 ÷ pass bound over every compared site, and KL ÷ pass bound over every
/// step's next-token distribution, against every reference.
fn worst_error(r: &RunResult, exact: bool) -> Option<WorstError> {
    let mut worst: Option<WorstError> = None;
    let mut offer = |w: WorstError| {
        if w.ratio.is_finite() && worst.as_ref().is_none_or(|b| w.ratio > b.ratio) {
            worst = Some(w);
        }
    };
    for st in &r.steps {
        for (ri, rs) in st.references.iter().enumerate() {
            for s in &rs.sites {
                let (Some(m), Some(t)) = (s.metrics.as_ref(), site_bounds(r, ri, s, exact)) else { continue };
                if !m.rel_l2.is_finite() || t.pass_rel_l2 <= 0.0 {
                    continue;
                }
                offer(WorstError {
                    ratio: m.rel_l2 / t.pass_rel_l2,
                    value: m.rel_l2,
                    metric: "rel-l2".into(),
                    pass_bound: t.pass_rel_l2,
                    fail_bound: t.fail_rel_l2,
                    step: st.step,
                    layer: s.layer,
                    site: s.site.clone(),
                    reference: rs.reference.clone(),
                });
            }
            if let (Some(kl), Some((p, f))) = (finite(rs.logits.kl), kl_bounds(r, ri)) {
                if p > 0.0 {
                    offer(WorstError {
                        ratio: kl.max(0.0) / p,
                        value: kl,
                        metric: "kl".into(),
                        pass_bound: p,
                        fail_bound: f,
                        step: st.step,
                        layer: None,
                        site: "logits".into(),
                        reference: rs.reference.clone(),
                    });
                }
            }
        }
    }
    worst
}
