//! The one diagnosis table: from the records of a failing site to a typed
//! [`Diagnosis`] (the vocabulary the engine's fault catalog expects), a one-line title and
//! the evidence. The run's `likely_cause` is this table's title; bisect starts from the same
//! finding and refines its generic kinds (RoPE, attention, norm, weights) with measurements
//! on the engine (isolation, projections).
//!
//! The rules, in order:
//! 1. **Cache length.** A cache site whose positions differ. What a correct cache holds comes
//!    from the engine's [`CacheKind`]: an engine cache that holds what its kind should (a
//!    rotating window after more positions than it keeps) is not a dropped context, whatever
//!    the reference keeps. Then: only this step's tokens (context dropped), one layer one
//!    step behind (stale cache), more than fed (history re-fed on the cache).
//! 2. **Positions computed.** More positions than fed at a decode step: the history re-fed.
//! 3. **Dataflow.** The site's kind (the family's site graph) when every site it reads
//!    passes: the cause is that operation (RoPE, attention, norm, activation, a weight
//!    matrix). When an input fails too, nothing is named.
//! 4. **MoE routing**, within 3: at a `router` / `expert_weights` site, what the per-position
//!    expert choice says ([`routing`]).

use lockstep_engine::faults::Diagnosis;
use lockstep_engine::sites::{SiteGraph, SiteKind as EngineKind};
use lockstep_engine::CacheKind;
use serde::Serialize;

use crate::compare::tolerance::{SiteKind, Verdict};
use crate::results::run::{RefStep, SiteRecord};

/// A diagnosis with its title and evidence (`name` in JSON is the diagnosis's stable name).
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    #[serde(rename = "name")]
    pub kind: Diagnosis,
    pub title: String,
    pub evidence: Vec<String>,
}

pub fn finding(kind: Diagnosis, title: impl Into<String>, evidence: Vec<String>) -> Finding {
    Finding { kind, title: title.into(), evidence }
}

/// A failing site in its step: what the rules read.
pub struct At<'a> {
    pub step: usize,
    /// The engine vs this reference at that step (every site's verdict).
    pub rs: &'a RefStep,
    pub site: &'a SiteRecord,
    /// Tokens fed at this step.
    pub fed: usize,
    /// Positions fed up to and including this step.
    pub total: usize,
    pub graph: &'a SiteGraph,
    /// The engine's cache kind.
    pub cache: CacheKind,
}

impl At<'_> {
    fn passes(&self, name: &str) -> bool {
        name == "tokens" || self.rs.sites.iter().any(|s| s.site == name && s.verdict == Verdict::Pass)
    }

    /// Every site this one reads passes (its inputs are right: the operation is wrong).
    pub fn inputs_pass(&self) -> bool {
        self.graph.get(&self.site.site).is_some_and(|s| s.reads.iter().all(|r| self.passes(r)))
    }
}

fn positions(n: usize) -> String {
    if n == 1 {
        "1 position".into()
    } else {
        format!("{n} positions")
    }
}

/// The table. Always names something (`unclassified` at worst); `evidence` holds the facts
/// each rule read.
pub fn classify(at: &At) -> Finding {
    let (site, step, fed) = (at.site, at.step, at.fed);
    let mut ev = vec![];
    // 1. Cache length.
    if site.kind == SiteKind::Cache && site.metrics.is_none() && site.engine_shape.len() == 3 {
        let (el, rl) = (site.engine_shape[1], site.reference_shape.get(1).copied().unwrap_or(0));
        let expected = at.cache.expected_len(at.total);
        let layer = site.layer.unwrap_or(0);
        let other_layers_ok =
            at.rs.sites.iter().filter(|s| s.kind == SiteKind::Cache && s.layer != site.layer).all(|s| s.metrics.is_some());
        if el == expected && at.cache != CacheKind::AppendOnly {
            ev.push(format!(
                "the engine's cache is a {} and holds {} after {} fed, as it should; the reference holds {}",
                at.cache.describe(),
                positions(el),
                at.total,
                positions(rl)
            ));
            return finding(Diagnosis::CacheKind, "the cache kinds differ (the engine's window is right for its kind): not a dropped context", ev);
        }
        if step >= 1 && el == fed && expected > fed {
            ev.push(format!("the cache holds {el} position(s), the reference holds {rl}: only this step's tokens"));
            return finding(Diagnosis::ContextDropped, "context is dropped after the prompt: decode steps run without the prompt's cache", ev);
        }
        if step >= 1 && el == at.cache.expected_len(at.total - fed) && other_layers_ok {
            ev.push(format!("layer {layer} holds {el} positions, every other layer {rl}: this layer's cache was not updated at step {step}"));
            return finding(Diagnosis::StaleCache, format!("stale cache: layer {layer}'s cache is not updated"), ev);
        }
        if el > expected {
            ev.push(format!("the cache holds {} where {} were fed", positions(el), at.total));
            return finding(Diagnosis::HistoryRefed, "history is fed again on top of the cache (re-feeding instead of caching)", ev);
        }
        return finding(Diagnosis::CacheLength, format!("cache length differs: engine {el}, reference {rl}"), ev);
    }
    // 1b. A window that was not moved (its canonical form has the reference's length).
    if site.kind == SiteKind::Cache && step >= 1 && site.window_lag == Some(fed) {
        let layer = site.layer.unwrap_or(0);
        // Later layers inherit the error through their input; no other layer lags.
        let others_ok = at.rs.sites.iter().filter(|s| s.kind == SiteKind::Cache && s.layer != site.layer).all(|s| {
            s.window_lag.is_none() && (s.layer > site.layer || s.verdict != Verdict::Fail)
        });
        ev.push(format!(
            "layer {layer}'s window holds the positions before step {step}: its rows are the reference's {} earlier (the {} this step fed are missing){}",
            positions(fed),
            positions(fed),
            if others_ok { "; no other layer's window lags, the earlier layers' caches pass" } else { "" }
        ));
        if others_ok {
            return finding(Diagnosis::StaleCache, format!("stale cache: layer {layer}'s cache is not updated"), ev);
        }
        return finding(Diagnosis::CacheLength, "the windowed caches are not moved by this step", ev);
    }
    // 2. More positions than fed.
    if site.metrics.is_none() && site.engine_shape.first().copied().unwrap_or(0) > fed && step >= 1 {
        let n = site.engine_shape[0];
        ev.push(format!(
            "step {step} feeds {fed} token(s) but the engine computed {n} positions: the whole history re-fed, O(n^2) work over a generation"
        ));
        return finding(Diagnosis::HistoryRefed, "history re-fed each step instead of using the cache (quadratic cost)", ev);
    }
    // 3. Dataflow: the operation whose inputs all pass.
    let Some(gs) = at.graph.get(&site.site) else {
        return finding(Diagnosis::Unclassified, format!("first failure at {}", site.site), ev);
    };
    if !at.inputs_pass() {
        return finding(Diagnosis::Unclassified, format!("{} fails but its input does too", site.site), ev);
    }
    ev.push(format!("{} fails while what it reads ({}) passes", site.site, gs.reads.join(", ")));
    if let Some(f) = routing(at, gs, &mut ev) {
        return f;
    }
    match gs.kind {
        EngineKind::Rope => finding(Diagnosis::Rope, "RoPE (convention, base or positions) differs", ev),
        EngineKind::Attention => finding(Diagnosis::Attention, "the attention (scores, softmax or mask) differs", ev),
        EngineKind::Norm => finding(Diagnosis::Norm, "a norm differs (weight or epsilon)", ev),
        EngineKind::Activation => finding(Diagnosis::Activation, format!("the activation `{}` differs", gs.leaf), ev),
        EngineKind::Embedding => finding(Diagnosis::Embedding, "token embeddings differ: different tokens or embedding weights/scale", ev),
        EngineKind::Projection if gs.qk_rows && qk_sibling_passes(at, gs) => finding(
            Diagnosis::QkLayout,
            "q/k projections differ while v agrees: Q/K weight layout (GGUF permutation) or an adapter on q/k",
            ev,
        ),
        EngineKind::Logits => finding(
            Diagnosis::OutputHead,
            "the output head differs (tied to the embedding where the checkpoint has its own head, or its weights)",
            ev,
        ),
        EngineKind::Routing => finding(Diagnosis::Routing, format!("the expert weights `{}` differ while the router logits agree", site.site), ev),
        EngineKind::Projection | EngineKind::Router | EngineKind::Experts => {
            finding(Diagnosis::Weights, format!("the weights of `{}` differ (loading, layout or dequantization)", site.site), ev)
        }
        EngineKind::Cache | EngineKind::Residual => finding(Diagnosis::Unclassified, format!("first failure at {}", site.site), ev),
    }
}

/// 4. **MoE routing** (a `router` or `expert_weights` site whose inputs pass). Router logits
///    that change the expert choice: the choice named with its margin. Expert weights that
///    choose other experts than the agreeing router logits do: an expert index slip, unless
///    the router margin there is a near-tie. The same experts with weights that do not sum to 1
///    (where the reference's do): the top-k renormalisation skipped.
fn routing(at: &At, gs: &lockstep_engine::Site, ev: &mut Vec<String>) -> Option<Finding> {
    use crate::compare::routing::NEAR_TIE_MARGIN;
    let r = at.site.routing.as_ref()?;
    let site = &at.site.site;
    let first = r.choice_diffs.first();
    let named = |d: &crate::compare::routing::ChoiceDiff, margin: Option<f64>| {
        format!(
            "position {}: the engine routes to experts {:?}, the reference to {:?}{}",
            d.position,
            d.engine,
            d.reference,
            margin.map(|m| format!(" (router margin {m:.4})")).unwrap_or_default()
        )
    };
    match gs.kind {
        EngineKind::Router => {
            let d = first?;
            ev.push(format!("{} position(s) route to other experts; first at {}", r.n_choice_diffs, named(d, d.reference_margin)));
            Some(finding(
                Diagnosis::ExpertChoice,
                format!(
                    "the router logits of `{site}` differ and change the expert choice at {}",
                    named(d, d.reference_margin)
                ),
                std::mem::take(ev),
            ))
        }
        EngineKind::Routing => {
            let layer = at.site.layer;
            let router = at.rs.sites.iter().find(|s| s.layer == layer && s.routing.as_ref().is_some_and(|x| x.min_margin.is_some()));
            let margin_at = |p: usize| router.and_then(|s| s.routing.as_ref()).and_then(|x| x.margins.get(p).copied());
            if let Some(d) = first {
                let m = margin_at(d.position);
                ev.push(format!("{} position(s) route to other experts; first at {}", r.n_choice_diffs, named(d, m)));
                if m.is_some_and(|m| m < NEAR_TIE_MARGIN) {
                    return Some(finding(
                        Diagnosis::ExpertChoice,
                        format!("a near-tie of the router flips the expert choice at {}", named(d, m)),
                        std::mem::take(ev),
                    ));
                }
                return Some(finding(
                    Diagnosis::ExpertIndex,
                    format!("the experts applied are not those the (agreeing) router logits choose: {}", named(d, m)),
                    std::mem::take(ev),
                ));
            }
            let (e, rf) = (r.engine_sum_error?, r.reference_sum_error?);
            if e > 1e-3 && rf <= 1e-3 {
                ev.push(format!(
                    "the same experts on both sides; the engine's weights per position sum to 1 +- {e:.3}, the reference's to 1 +- {rf:.1e}"
                ));
                return Some(finding(
                    Diagnosis::RouterRenorm,
                    format!("the top-{} expert weights of `{site}` are not renormalised to sum 1", r.top_k),
                    std::mem::take(ev),
                ));
            }
            None
        }
        _ => None,
    }
}

/// A projection of the same layer that reads the same input and is not in the Q/K row
/// layout (v for q and k) passes.
fn qk_sibling_passes(at: &At, gs: &lockstep_engine::Site) -> bool {
    at.graph
        .layer(gs.layer.unwrap_or(0))
        .filter(|s| s.kind == EngineKind::Projection && !s.qk_rows && s.reads == gs.reads)
        .any(|s| at.passes(&s.name))
}

/// The run report's one-line cause of a divergence (`None` when no rule names one).
pub fn likely_cause(at: &At) -> Option<String> {
    let f = classify(at);
    (f.kind != Diagnosis::Unclassified).then_some(f.title)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::metrics::tensor_metrics;
    use lockstep_engine::models::llama::LAYER_SITES;

    fn rec(site: &str, verdict: Verdict, shapes: Option<(Vec<usize>, Vec<usize>)>) -> SiteRecord {
        let kind = SiteKind::of(site);
        let (engine_shape, reference_shape) = shapes.clone().unwrap_or((vec![1, 4], vec![1, 4]));
        SiteRecord {
            site: site.into(),
            layer: lockstep_engine::sites::layer_of(site),
            kind,
            engine_shape,
            reference_shape,
            metrics: shapes.is_none().then(|| tensor_metrics(&[1.0f32], &[1.0f32])),
            verdict,
            floor: None,
            oracle: None,
            transform: None,
            note: None,
            routing: None,
            window_lag: None,
        }
    }

    fn step(sites: Vec<SiteRecord>) -> RefStep {
        RefStep {
            reference: "r".into(),
            sites,
            logits: crate::compare::metrics::logit_metrics(&[0.0f32, 1.0], &[0.0f32, 1.0]),
            logits_verdict: Verdict::Pass,
            kl_max_positions: 0.0,
            verdict: Verdict::Fail,
            seconds: 0.0,
        }
    }

    fn classify_cache(el: usize, rl: usize, fed: usize, total: usize, cache: CacheKind) -> Diagnosis {
        let graph = SiteGraph::new(2, LAYER_SITES);
        let bad = rec("layers.0.cache_k", Verdict::Fail, Some((vec![2, el, 8], vec![2, rl, 8])));
        let rs = step(vec![bad.clone(), rec("layers.1.cache_k", Verdict::Pass, None)]);
        classify(&At { step: 1, rs: &rs, site: &bad, fed, total, graph: &graph, cache }).kind
    }

    #[test]
    fn a_window_that_keeps_what_its_kind_should_is_not_a_dropped_context() {
        // 14 positions fed; the engine's window of 4 holds 4, the reference all 14.
        assert_eq!(classify_cache(4, 14, 1, 14, CacheKind::Window(4)), Diagnosis::CacheKind);
        // The same lengths from an append-only engine are a real fault; a window that holds
        // only this step's token too.
        assert_eq!(classify_cache(1, 14, 1, 14, CacheKind::AppendOnly), Diagnosis::ContextDropped);
        assert_eq!(classify_cache(1, 14, 1, 14, CacheKind::Window(4)), Diagnosis::ContextDropped);
        assert_eq!(classify_cache(13, 14, 1, 14, CacheKind::AppendOnly), Diagnosis::StaleCache);
        assert_eq!(classify_cache(27, 14, 1, 14, CacheKind::AppendOnly), Diagnosis::HistoryRefed);
    }

    /// The sites of a Mixtral layer around its router, with the router's and the expert
    /// weights' routing records from these logits / weights (seq 2, 4 experts, top-2).
    fn moe_step(engine_router: &[f64], reference_router: &[f64], engine_w: &[f64], reference_w: &[f64]) -> (SiteGraph, RefStep) {
        use crate::compare::routing::{compare_expert_weights, compare_router};
        let graph = SiteGraph::new(1, lockstep_engine::models::mixtral::LAYER_SITES);
        let router_rec = compare_router(engine_router, reference_router, 4, 2);
        let w_rec = compare_expert_weights(engine_w, reference_w, 4);
        let pass = |s: &str| rec(s, Verdict::Pass, None);
        let mut router = rec("layers.0.router", if engine_router == reference_router { Verdict::Pass } else { Verdict::Fail }, None);
        router.note = router_rec.note();
        router.routing = Some(router_rec);
        let mut weights = rec("layers.0.expert_weights", Verdict::Fail, None);
        weights.note = w_rec.note();
        weights.routing = Some(w_rec);
        (graph, step(vec![pass("embed"), pass("layers.0.attn_out"), pass("layers.0.mlp_norm"), router, weights]))
    }

    #[test]
    fn expert_weights_name_the_index_slip_the_renormalisation_and_a_router_that_changes_the_choice() {
        // p = [0.1, 0.2, 0.3, 0.4] at both positions: experts {2, 3}, margin 0.1.
        let r = [0.0, 2f64.ln(), 3f64.ln(), 4f64.ln()];
        let logits = [r, r].concat();
        let right = [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0, 0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0];
        let at = |graph: &'static SiteGraph, rs: &'static RefStep, i: usize| At {
            step: 0,
            rs,
            site: &rs.sites[i],
            fed: 2,
            total: 2,
            graph,
            cache: CacheKind::AppendOnly,
        };
        let leak = |x: (SiteGraph, RefStep)| -> (&'static SiteGraph, &'static RefStep) { (Box::leak(Box::new(x.0)), Box::leak(Box::new(x.1))) };
        // Off by one: experts {3, 0} applied where the agreeing router chose {2, 3}.
        let shifted = [4.0 / 7.0, 0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0, 0.0, 0.0, 3.0 / 7.0];
        let (g, rs) = leak(moe_step(&logits, &logits, &shifted, &right));
        let f = classify(&at(g, rs, 4));
        assert_eq!(f.kind, Diagnosis::ExpertIndex, "{f:?}");
        assert!(f.title.contains("position 0: the engine routes to experts [0, 3], the reference to [2, 3] (router margin 0.1000)"), "{}", f.title);
        // Not renormalised: the same experts, weights summing to 0.7.
        let raw = [0.0, 0.0, 0.3, 0.4, 0.0, 0.0, 0.3, 0.4];
        let (g, rs) = leak(moe_step(&logits, &logits, &raw, &right));
        assert_eq!(classify(&at(g, rs, 4)).kind, Diagnosis::RouterRenorm);
        // The engine's router logits differ and flip position 1 to {1, 3}: named at the router.
        let flipped = [r.to_vec(), vec![0.0, 3f64.ln(), 2f64.ln(), 4f64.ln()]].concat();
        let (g, rs) = leak(moe_step(&flipped, &logits, &right, &right));
        let f = classify(&at(g, rs, 3));
        assert_eq!(f.kind, Diagnosis::ExpertChoice, "{f:?}");
        assert!(f.title.contains("position 1: the engine routes to experts [1, 3], the reference to [2, 3] (router margin 0.1000)"), "{}", f.title);
    }

    #[test]
    fn the_dataflow_names_the_operation_whose_inputs_pass() {
        let graph = SiteGraph::new(1, LAYER_SITES);
        let q_rope = rec("layers.0.q_rope", Verdict::Fail, None);
        let pass = |s: &str| rec(s, Verdict::Pass, None);
        let rs = step(vec![pass("embed"), pass("layers.0.attn_norm"), pass("layers.0.q"), q_rope.clone()]);
        let at = At { step: 0, rs: &rs, site: &q_rope, fed: 3, total: 3, graph: &graph, cache: CacheKind::AppendOnly };
        assert_eq!(classify(&at).kind, Diagnosis::Rope);
        // With its input failing too, nothing is named.
        let rs = step(vec![pass("embed"), rec("layers.0.q", Verdict::Fail, None), q_rope.clone()]);
        let at = At { rs: &rs, ..at };
        assert_eq!(classify(&at).kind, Diagnosis::Unclassified);
        assert_eq!(likely_cause(&at), None);
        // q fails, v passes: the Q/K layout.
        let q = rec("layers.0.q", Verdict::Fail, None);
        let rs = step(vec![pass("layers.0.attn_norm"), q.clone(), pass("layers.0.v")]);
        let at = At { rs: &rs, site: &q, ..at };
        assert_eq!(classify(&at).kind, Diagnosis::QkLayout);
    }
}
