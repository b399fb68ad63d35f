//! The generation-config diff: before a run, one table of what each side will use: BOS/EOS
//! ids, add-BOS, the chat template, stop tokens, max tokens, the sampler parameters, the
//! filter order and the seed. The engine's values come from its tokenizer and
//! `--sampler`; each reference reports its own (`generation_config()` in `references/`:
//! transformers resolves them like `generate()` does, from the parameters lockstep passes
//! explicitly, the model's generation_config and its global defaults).
//!
//! Rows that differ are marked; `--strict-config` turns any marked row into a failure
//! before step 0. Some rows are information only (the random generator each side would
//! use, the defaults a side would apply to what was left unset): they never count.

use std::fmt::Write as _;

use lockstep_engine::{LoadedModel, SamplerConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::HarnessError;
use crate::results::checks::{GenConfig, Row};
use crate::reference::Reference;

/// The parameters as `references/sampling.py` takes them.
pub fn params_json(cfg: &SamplerConfig) -> serde_json::Value {
    serde_json::json!({
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
        "min_p": cfg.min_p, "rep_penalty": cfg.rep_penalty, "seed": cfg.seed,
    })
}

pub fn sha12(text: &str) -> String {
    let h = Sha256::digest(text.as_bytes());
    h.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn template_cell(t: Option<&str>, used: bool) -> String {
    match t {
        None => "none".into(),
        Some(t) => format!("sha256 {} ({} chars){}", sha12(t), t.chars().count(), if used { "" } else { ", not used" }),
    }
}

fn tok_cell(id: Option<u64>, text: Option<&str>) -> String {
    match (id, text) {
        (Some(i), Some(t)) => format!("{i} {t:?}"),
        (Some(i), None) => i.to_string(),
        _ => "none".into(),
    }
}

fn num(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn ids_cell(ids: &[u64]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        format!("{ids:?}")
    }
}

fn order_cell(stages: &[String]) -> String {
    if stages.is_empty() {
        "argmax".into()
    } else {
        stages.join(" > ")
    }
}

/// Collects the table. `chat` says whether the run renders the chat template.
pub fn collect(engine: &LoadedModel, refs: &[Reference], chat: bool, max_new: usize, cfg: &SamplerConfig) -> Result<GenConfig, HarnessError> {
    let tok = &engine.tokenizer;
    let params = params_json(cfg);
    let mut infos: Vec<Option<Value>> = vec![];
    for r in refs {
        if let Some(o) = r.object().filter(|_| r.can(crate::reference::Capability::GenerationConfig)) {
            let v = crate::reference::pycall::call_json(o, &r.name, "generation_config", &[params.clone(), Value::from(max_new)])?;
            infos.push(Some(v));
        } else {
            infos.push(None);
        }
    }
    let get = |i: usize, k: &str| -> Option<&Value> { infos[i].as_ref().and_then(|v| v.get(k)) };
    let has_sampler = |i: usize| infos[i].as_ref().is_some_and(|v| v.get("sampler") != Some(&Value::Null));
    let mut rows = vec![];
    let mut push = |name: &'static str, engine: String, f: &dyn Fn(usize) -> Option<String>, info: bool| {
        let references: Vec<String> = (0..refs.len()).map(|i| f(i).unwrap_or_else(|| "n/a".into())).collect();
        let differs = references.iter().any(|x| x != "n/a" && *x != engine);
        rows.push(Row { name, engine, references, differs, info });
    };
    let u = |v: Option<&Value>| v.and_then(|x| x.as_u64());
    let s = |v: Option<&Value>| v.and_then(|x| x.as_str()).map(String::from);

    push("bos", tok_cell(tok.bos_id().map(u64::from), tok.bos_token.as_deref()), &|i| {
        infos[i].as_ref().map(|_| tok_cell(u(get(i, "bos_id")), s(get(i, "bos_token")).as_deref()))
    }, false);
    push("eos", tok_cell(tok.eos_id().map(u64::from), tok.eos_token.as_deref()), &|i| {
        infos[i].as_ref().map(|_| tok_cell(u(get(i, "eos_id")), s(get(i, "eos_token")).as_deref()))
    }, false);
    push("add bos", tok.adds_bos()?.to_string(), &|i| get(i, "add_bos").and_then(|v| v.as_bool()).map(|b| b.to_string()), false);
    push("add eos", tok.adds_eos()?.to_string(), &|i| get(i, "add_eos").and_then(|v| v.as_bool()).map(|b| b.to_string()), false);
    push("chat template", template_cell(tok.chat_template.as_deref(), chat), &|i| {
        infos[i].as_ref().map(|_| template_cell(get(i, "chat_template").and_then(|v| v.as_str()), chat))
    }, false);
    let mut stop: Vec<u64> = engine.stop_ids().into_iter().map(u64::from).collect();
    stop.sort();
    push("stop tokens", ids_cell(&stop), &|i| {
        get(i, "stop_ids").and_then(|v| v.as_array()).map(|a| {
            let mut ids: Vec<u64> = a.iter().filter_map(|x| x.as_u64()).collect();
            ids.sort();
            ids_cell(&ids)
        })
    }, false);
    push("max new tokens", max_new.to_string(), &|i| get(i, "max_new_tokens").map(num), false);
    let sampler_row = |key: &'static str| move |i: usize| if has_sampler(i) { get(i, key).map(num) } else { None };
    let greedy = cfg.greedy();
    push("temperature", if greedy { "0.0".into() } else { format!("{}", cfg.temperature) }, &|i| {
        if has_sampler(i) { get(i, "temperature").and_then(|v| v.as_f64()).map(|t| if t == 0.0 { "0.0".into() } else { format!("{t}") }) } else { None }
    }, false);
    push("top_k", if greedy { "0".into() } else { cfg.top_k.to_string() }, &sampler_row("top_k"), false);
    push("top_p", if greedy { "1.0".into() } else { fmt_f(cfg.top_p) }, &|i| {
        if has_sampler(i) { get(i, "top_p").and_then(|v| v.as_f64()).map(fmt_f) } else { None }
    }, false);
    push("min_p", if greedy { "0.0".into() } else { fmt_f(cfg.min_p) }, &|i| {
        if has_sampler(i) { get(i, "min_p").and_then(|v| v.as_f64()).map(fmt_f) } else { None }
    }, false);
    push("rep penalty", fmt_f(cfg.rep_penalty), &|i| {
        if has_sampler(i) { get(i, "rep_penalty").and_then(|v| v.as_f64()).map(fmt_f) } else { None }
    }, false);
    let window = |w: Option<u64>, active: bool| if !active { "-".to_string() } else { w.map(|n| format!("last {n}")).unwrap_or_else(|| "all".into()) };
    let rep_on = cfg.rep_penalty != 1.0;
    push("rep window", window(cfg.order.rep_window.map(|w| w as u64), rep_on), &|i| {
        if has_sampler(i) { Some(window(u(get(i, "rep_window")), rep_on)) } else { None }
    }, false);
    let engine_order: Vec<String> = cfg.order.active(cfg).iter().map(|s| s.name().to_string()).collect();
    let declared: Vec<Option<(Vec<String>, Option<usize>)>> = (0..refs.len())
        .map(|i| {
            if !has_sampler(i) {
                return None;
            }
            let stages = get(i, "order")?.as_array()?.iter().filter_map(|x| x.as_str().map(String::from)).collect();
            Some((stages, u(get(i, "rep_window")).map(|w| w as usize)))
        })
        .collect();
    push("filter order", order_cell(&engine_order), &|i| declared[i].as_ref().map(|(st, _)| order_cell(st)), false);
    let seed = if greedy { "-".to_string() } else { cfg.seed.to_string() };
    push("seed", seed.clone(), &|i| if has_sampler(i) && !greedy { get(i, "seed").map(num) } else if has_sampler(i) { Some("-".into()) } else { None }, false);
    push("generator", "xoshiro256** (SplitMix64 seeding), inverse CDF".into(), &|i| s(get(i, "generator")), true);
    push("defaults if unset", "greedy; every filter off".into(), &|i| {
        get(i, "defaults_if_unset").and_then(|v| v.as_object()).map(|o| {
            if o.is_empty() {
                "-".to_string()
            } else {
                o.iter().map(|(k, v)| format!("{k}={}", num(v))).collect::<Vec<_>>().join(", ")
            }
        })
    }, true);
    let templates = (0..refs.len()).map(|i| s(get(i, "chat_template"))).collect();
    Ok(GenConfig { references: refs.iter().map(|r| r.name.clone()).collect(), rows, declared, templates })
}

fn fmt_f(x: f64) -> String {
    let s = format!("{x}");
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

/// The table, differences marked with `*` (and `DIFFERS` after the row).
pub fn render(g: &GenConfig) -> String {
    let mut o = String::new();
    let nw = g.rows.iter().map(|r| r.name.len()).max().unwrap_or(8) + 2;
    // Each value column holds up to 44 characters; on a narrower terminal every side gets an
    // equal share of the width (at least 8), the rest of a value cut with `…`.
    let sides = 1 + g.references.len();
    let cap = match crate::ui::get().width {
        Some(w) => ((w.saturating_sub(2 + nw + 9)) / sides).saturating_sub(2).clamp(8, 44),
        None => 44,
    };
    let ew = g.rows.iter().map(|r| r.engine.chars().count()).max().unwrap_or(6).clamp(6, cap);
    let rw: Vec<usize> = (0..g.references.len())
        .map(|i| g.rows.iter().map(|r| r.references[i].chars().count()).max().unwrap_or(0).max(g.references[i].len()).clamp(6, cap))
        .collect();
    let cut = |s: &str, w: usize| -> String {
        if s.chars().count() > w {
            format!("{}…", s.chars().take(w - 1).collect::<String>())
        } else {
            s.to_string()
        }
    };
    let _ = writeln!(o, "generation config (what each side will use; * = differs from the engine):");
    let mut header = format!("  {:<nw$}{:<ew$}", "", "engine");
    for (i, n) in g.references.iter().enumerate() {
        header.push_str(&format!("  {:<w$}", n, w = rw[i]));
    }
    let _ = writeln!(o, "{}", header.trim_end());
    for r in &g.rows {
        let mark = if r.differs && !r.info { "*" } else { " " };
        let mut line = format!("{mark} {:<nw$}{:<ew$}", r.name, cut(&r.engine, ew));
        for (i, v) in r.references.iter().enumerate() {
            let m = if !r.info && v != "n/a" && *v != r.engine { "*" } else { " " };
            line.push_str(&format!(" {m}{:<w$}", cut(v, rw[i]), w = rw[i]));
        }
        if r.differs && !r.info {
            line.push_str("  DIFFERS");
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
    let d = g.differences();
    if d.is_empty() {
        let _ = writeln!(o, "  every compared setting agrees");
    } else {
        let _ = writeln!(o, "  {} setting(s) differ: {}", d.len(), d.iter().map(|r| r.name).collect::<Vec<_>>().join(", "));
    }
    o
}
