//! The checks a run makes whenever a LoRA adapter is given (`--lora DIR`).
//!
//! - **Inventory**: per adapted module, which LoRA tensors each side holds (shapes in the
//!   PEFT convention, dtype, rank, scale, checksums), printed as a diff of every reference
//!   against the engine; tensors of the file that the configuration attaches to nothing, and
//!   targeted modules the file has no tensors for, are named.
//! - **Effect**: the engine's base model (no adapter) and the adapted one run the same
//!   tokens (everything fed in the run, as one prefill); if the adapter moves the logits by
//!   less than the noise floor, the verdict is "adapter has no effect", with the per-layer
//!   difference showing where an effect was expected.
//!
//! The engine loads the adapter itself (`lockstep_engine::lora`); each reference with its
//! own library (`references/*_ref.py`, `lora=DIR`). This module only compares.

use std::fmt::Write;

use candle_core::{DType, Tensor};
use lockstep_engine::lora::InventoryEntry;
use lockstep_engine::{Capture, LoadedModel};

use crate::results::run::StepRecord;
use crate::lockstep::options::{RunOptions};
use crate::error::HarnessError;
use crate::results::run::Divergence;
use crate::results::checks::{list, AdapterEffect, InventoryDiff, LayerEffect, LoraReport, SideInventory};
use crate::reference::Reference;
use crate::compare::tolerance::{LORA_CHECKSUM_REL, LORA_EFFECT_MIN_LOGITS_REL_L2};

/// The run's divergence for an adapter problem: an inventory that differs, tensors
/// attached to nothing or targets without tensors, or no effect.
pub fn divergence(r: &LoraReport) -> Option<Divergence> {
    let d = |detail: String, cause: &str| Divergence {
        step: 0,
        layer: None,
        site: "lora".into(),
        reference: "engine".into(),
        detail,
        likely_cause: Some(cause.into()),
    };
    if let Some(x) = r.diffs.first() {
        return Some(Divergence {
            reference: x.side.clone(),
            ..d(
                format!("the adapter inventories differ ({} difference(s)); first: {} {}: {}", r.diffs.len(), x.side, x.module, x.what),
                "a side attached the adapter to other modules, with another rank or scale, or other tensors",
            )
        });
    }
    if !r.unattached.is_empty() {
        return Some(d(
            format!("{} adapter tensor(s) attached to nothing: {}", r.unattached.len(), list(&r.unattached, 6)),
            "the adapter's configuration (target modules, layers) does not cover tensors of its file",
        ));
    }
    if !r.missing.is_empty() {
        return Some(d(
            format!("{} target module(s) without adapter tensors: {}", r.missing.len(), list(&r.missing, 6)),
            "the adapter file lacks tensors its configuration targets",
        ));
    }
    if let Some(e) = r.effect.as_ref().filter(|e| !e.has_effect) {
        let expected: Vec<String> = e
            .per_layer
            .iter()
            .filter(|l| !l.adapted.is_empty())
            .map(|l| format!("layer {} ({}) {:.1e}", l.layer, l.adapted.join("/"), l.rel_l2))
            .collect();
        return Some(d(
            format!(
                "adapter has no effect: logits rel-L2 {:.1e} (adapted vs base) <= noise floor {:.1e}; where an effect was expected: {}",
                e.logits_rel_l2,
                e.floor,
                list(&expected, 4)
            ),
            "the adapter is not attached, its B matrices are zero, or its scale is 0",
        ));
    }
    None
}

/// The inventories of the engine and of every reference.
pub fn inventories(engine: &LoadedModel, refs: &[Reference]) -> Result<Vec<SideInventory>, HarnessError> {
    let (adapter, mode) = engine.lora.as_ref().ok_or_else(|| HarnessError::Usage("no adapter attached to the engine".into()))?;
    let info = engine.model.info();
    let loader = if info.engine == "lockstep-engine" {
        format!("lockstep_engine::lora ({} format)", adapter.config.format.name())
    } else {
        format!("the adapter file as lockstep reads it ({} format): {} reports no inventory of its own", adapter.config.format.name(), info.engine)
    };
    let mut sides = vec![SideInventory {
        side: "engine".into(),
        entries: adapter.inventory()?,
        config: serde_json::json!({
            "loader": loader,
            "mode": mode.name(),
            "scale": adapter.config.scale_source,
        }),
    }];
    for r in refs {
        if let Some(a) = r.replay().and_then(|t| t.adapter()) {
            // A recorded trace: the inventory its reference reported when recording.
            sides.push(SideInventory { side: r.name.clone(), entries: a.inventory.clone(), config: a.config.clone() });
            continue;
        }
        let obj = r.object().ok_or_else(|| HarnessError::Usage(format!("--lora needs live references, not {}", r.name)))?;
        if !r.can(crate::reference::Capability::Lora) {
            return Err(HarnessError::Usage(format!("the {} reference cannot load LoRA adapters", r.name)));
        }
        let text = crate::reference::pycall::call_str(obj, &r.name, "lora_inventory", &[])?;
        let entries: Vec<InventoryEntry> = serde_json::from_str(&text)
            .map_err(|e| HarnessError::Python(format!("{}.lora_inventory() is not an inventory: {e}", r.name)))?;
        let config = crate::reference::pycall::call_json(obj, &r.name, "lora_config", &[])?;
        sides.push(SideInventory { side: r.name.clone(), entries, config });
    }
    Ok(sides)
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

/// Every reference's inventory against the engine's, module by module.
pub fn diff(sides: &[SideInventory]) -> Vec<InventoryDiff> {
    let mut out = vec![];
    let Some(engine) = sides.first() else { return out };
    for s in &sides[1..] {
        let mut push = |module: &str, what: String| out.push(InventoryDiff { side: s.side.clone(), module: module.into(), what });
        for e in &engine.entries {
            let Some(r) = s.entries.iter().find(|r| r.module == e.module) else {
                push(&e.module, format!("no adapter on {} (the engine has rank {}, scale {})", s.side, e.rank, e.scale));
                continue;
            };
            if r.a_shape != e.a_shape || r.b_shape != e.b_shape {
                push(&e.module, format!("shapes A {:?} B {:?} on {}, A {:?} B {:?} in the engine", r.a_shape, r.b_shape, s.side, e.a_shape, e.b_shape));
            }
            if r.rank != e.rank {
                push(&e.module, format!("rank {} on {}, {} in the engine", r.rank, s.side, e.rank));
            }
            if !close(r.scale, e.scale, 1e-9) {
                push(&e.module, format!("scale {} on {}, {} in the engine", r.scale, s.side, e.scale));
            }
            for (name, x, y) in [("sum(A)", r.a_sum, e.a_sum), ("|A|", r.a_norm, e.a_norm), ("sum(B)", r.b_sum, e.b_sum), ("|B|", r.b_norm, e.b_norm)] {
                if !close(x, y, LORA_CHECKSUM_REL) {
                    push(&e.module, format!("checksum {name} {x:.6e} on {}, {y:.6e} in the engine", s.side));
                }
            }
        }
        for r in s.entries.iter().filter(|r| !engine.entries.iter().any(|e| e.module == r.module)) {
            push(&r.module, format!("adapter on {} (rank {}, scale {}) but not in the engine", s.side, r.rank, r.scale));
        }
    }
    out
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64, HarnessError> {
    let a: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    Ok(if den == 0.0 { num } else { num / den })
}

fn log_softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    row.iter().map(|x| x - lse).collect()
}

/// The engine's adapted model against its base model on `tokens` (one prefill), judged
/// against `floor`.
pub fn effect(opts: &RunOptions, engine: &LoadedModel, tokens: &[u32], floor: f64, floor_source: String) -> Result<AdapterEffect, HarnessError> {
    let base = crate::lockstep::options::load_engine(&RunOptions { lora: None, faults: opts.faults.without_lora(), ..opts.clone() })?;
    let run = |m: &LoadedModel| -> Result<(Capture, Tensor), HarnessError> {
        let mut cap = Capture::new();
        let mut cache = m.model.new_cache();
        let logits = m.model.forward(tokens, &mut cache, Some(&mut cap))?;
        Ok((cap, logits))
    };
    let ((ca, la), (cb, lb)) = (run(engine)?, run(&base)?);
    let adapted_modules = |layer: usize| -> Vec<String> {
        engine
            .lora
            .as_ref()
            .map(|(a, _)| a.pairs.iter().filter(|p| p.layer == layer).map(|p| p.module.trim_end_matches("_proj").to_string()).collect())
            .unwrap_or_default()
    };
    // Per layer where the engine taps its layers' outputs (an engine with fewer taps gets the
    // logits alone).
    let mut per_layer = vec![];
    for i in 0..engine.model.info().config.num_layers {
        let s = format!("layers.{i}.out");
        if let (Some(a), Some(b)) = (ca.get(&s), cb.get(&s)) {
            per_layer.push(LayerEffect { layer: i, adapted: adapted_modules(i), rel_l2: rel_l2(a, b)? });
        }
    }
    let logits_rel_l2 = rel_l2(&la, &lb)?;
    let (n, vocab) = la.dims2()?;
    let va: Vec<f64> = la.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let vb: Vec<f64> = lb.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (mut max_kl, mut top1_changed) = (0.0f64, 0);
    let argmax = |r: &[f64]| r.iter().enumerate().fold(0, |b, (i, x)| if *x > r[b] { i } else { b });
    for p in 0..n {
        let (ra, rb) = (&va[p * vocab..(p + 1) * vocab], &vb[p * vocab..(p + 1) * vocab]);
        let (pa, pb) = (log_softmax(ra), log_softmax(rb));
        let kl: f64 = pa.iter().zip(&pb).map(|(x, y)| x.exp() * (x - y)).sum();
        max_kl = max_kl.max(kl);
        top1_changed += usize::from(argmax(ra) != argmax(rb));
    }
    Ok(AdapterEffect {
        tokens: tokens.len(),
        logits_rel_l2,
        max_kl,
        top1_changed,
        per_layer,
        has_effect: logits_rel_l2 > floor,
        floor,
        floor_source,
    })
}

/// The noise floor of a run's logits: the largest disagreement between two references at
/// any step (docs/contract.md: the measured floor), at least [`LORA_EFFECT_MIN_LOGITS_REL_L2`].
/// The engine-vs-reference disagreement is not noise here: base and adapted both run on
/// the engine, with the same kernels, so an adapter that does nothing changes nothing.
pub fn noise_floor(steps: &[StepRecord]) -> (f64, String) {
    let mut best = (LORA_EFFECT_MIN_LOGITS_REL_L2, "the f32 minimum".to_string());
    for s in steps {
        for p in &s.pairs {
            for (site, m) in p.sites.iter().filter(|(n, _)| n == "logits") {
                if m.rel_l2 > best.0 {
                    best = (m.rel_l2, format!("{} vs {} {site} at step {}", p.a, p.b, s.step));
                }
            }
        }
    }
    best
}

/// The inventories of every side and their diff, without running anything (`inspect`).
pub fn inventory_report(engine: &LoadedModel, refs: &[Reference]) -> Result<LoraReport, HarnessError> {
    let (adapter, mode) = engine.lora.as_ref().ok_or_else(|| HarnessError::Usage("no adapter attached to the engine".into()))?;
    let sides = inventories(engine, refs)?;
    let diffs = diff(&sides);
    Ok(LoraReport {
        dir: adapter.dir.display().to_string(),
        mode: mode.name(),
        config: adapter.config.clone(),
        sides,
        diffs,
        unattached: adapter.unattached.clone(),
        missing: adapter.missing.clone(),
        effect: None,
    })
}

/// All the checks of a run with an adapter.
pub fn check(opts: &RunOptions, engine: &LoadedModel, refs: &[Reference], steps: &[StepRecord]) -> Result<LoraReport, HarnessError> {
    let mut r = inventory_report(engine, refs)?;
    let tokens: Vec<u32> = steps.iter().flat_map(|s| s.fed.iter().copied()).collect();
    if !tokens.is_empty() {
        let (floor, src) = noise_floor(steps);
        r.effect = Some(effect(opts, engine, &tokens, floor, src)?);
    }
    Ok(r)
}

fn layers_text(layers: &[usize]) -> String {
    if layers.len() > 2 && layers.windows(2).all(|w| w[1] == w[0] + 1) {
        format!("{}..={}", layers[0], layers[layers.len() - 1])
    } else {
        layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")
    }
}

/// The adapter's configuration and every side's inventory (what `inspect` prints, and the
/// head of the run's LoRA section).
pub fn render_inventory(r: &LoraReport) -> String {
    let mut o = String::new();
    let c = &r.config;
    let _ = writeln!(
        o,
        "  adapter    {} ({} format, {} tensors): rank {}, scale {} ({}), targets {}, layers {} ({}); engine {}",
        r.dir,
        c.format.name(),
        c.file_dtype,
        c.rank,
        c.scale,
        c.scale_source,
        c.targets.join(","),
        layers_text(&c.layers),
        c.layers.len(),
        r.mode
    );
    for s in &r.sides {
        let total: usize = s.entries.iter().map(|e| e.a_shape.iter().product::<usize>() + e.b_shape.iter().product::<usize>()).sum();
        let dtypes: std::collections::BTreeSet<&str> = s.entries.iter().map(|e| e.dtype.as_str()).collect();
        let loader = s.config.get("loader").and_then(|v| v.as_str()).unwrap_or("");
        let _ = writeln!(
            o,
            "  inventory  {:<12} {} modules, {} LoRA tensors, {} parameters ({}){}",
            s.side,
            s.entries.len(),
            2 * s.entries.len(),
            total,
            dtypes.into_iter().collect::<Vec<_>>().join("/"),
            if loader.is_empty() { String::new() } else { format!("; {loader}") }
        );
    }
    o
}

/// Per module, every side's entry (`inspect --verbose` and a failing diff).
pub fn render_modules(r: &LoraReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "  {:<22} {:<12} {:>10} {:>10} {:>5} {:>7} {:>11} {:>11} {:>11} {:>11}", "module", "side", "A", "B", "rank", "scale", "sum(A)", "|A|", "sum(B)", "|B|");
    let mut modules: Vec<&str> = r.sides.iter().flat_map(|s| s.entries.iter().map(|e| e.module.as_str())).collect();
    modules.sort_by_key(|m| {
        let mut it = m.split('.');
        (it.nth(1).and_then(|l| l.parse::<usize>().ok()).unwrap_or(0), lockstep_engine::lora::PROJECTIONS.iter().position(|(p, _)| m.ends_with(p)))
    });
    modules.dedup();
    for m in modules {
        for s in &r.sides {
            match s.entries.iter().find(|e| e.module == m) {
                Some(e) => {
                    let _ = writeln!(
                        o,
                        "  {:<22} {:<12} {:>10} {:>10} {:>5} {:>7} {:>11.4e} {:>11.4e} {:>11.4e} {:>11.4e}",
                        m,
                        s.side,
                        format!("{}x{}", e.a_shape[0], e.a_shape.get(1).unwrap_or(&0)),
                        format!("{}x{}", e.b_shape[0], e.b_shape.get(1).unwrap_or(&0)),
                        e.rank,
                        e.scale,
                        e.a_sum,
                        e.a_norm,
                        e.b_sum,
                        e.b_norm
                    );
                }
                None => {
                    let _ = writeln!(o, "  {:<22} {:<12} (none)", m, s.side);
                }
            }
        }
    }
    o
}

/// The diff, the unattached and missing names, and the effect.
pub fn render_checks(r: &LoraReport) -> String {
    let mut o = String::new();
    if r.diffs.is_empty() {
        let _ = writeln!(
            o,
            "  inventory  identical on every side ({} modules: names, shapes, rank, scale, checksums)",
            r.sides.first().map(|s| s.entries.len()).unwrap_or(0)
        );
    } else {
        let _ = writeln!(o, "  inventory  DIFFERS ({} difference(s)):", r.diffs.len());
        for d in &r.diffs {
            let _ = writeln!(o, "    {:<12} {:<22} {}", d.side, d.module, d.what);
        }
    }
    if !r.unattached.is_empty() {
        let _ = writeln!(o, "  unattached {} tensor(s) of the file attached to nothing: {}", r.unattached.len(), list(&r.unattached, 8));
    }
    if !r.missing.is_empty() {
        let _ = writeln!(o, "  missing    {} target module(s) without tensors in the file: {}", r.missing.len(), list(&r.missing, 8));
    }
    if let Some(e) = &r.effect {
        let _ = writeln!(
            o,
            "  effect     {}: logits rel-L2 {:.3e} adapted vs base (noise floor {:.1e}: {}), max KL {:.3e}, top-1 changed at {} of {} positions",
            if e.has_effect { "the adapter has an effect" } else { "ADAPTER HAS NO EFFECT" },
            e.logits_rel_l2,
            e.floor,
            e.floor_source,
            e.max_kl,
            e.top1_changed,
            e.tokens
        );
        let cells: Vec<String> = e
            .per_layer
            .iter()
            .map(|l| format!("{}{}:{:.0e}", l.layer, if l.adapted.is_empty() { "" } else { "*" }, l.rel_l2))
            .collect();
        let _ = writeln!(o, "  per layer  rel-L2 of layers.N.out adapted vs base (* = adapted layer): {}", cells.join(" "));
    }
    o
}

/// The run report's LoRA section.
pub fn render(r: &LoraReport) -> String {
    let mut o = String::from("\nLoRA adapter:\n");
    o.push_str(&render_inventory(r));
    o.push_str(&render_checks(r));
    if !r.diffs.is_empty() {
        o.push_str(&render_modules(r));
    }
    o
}
