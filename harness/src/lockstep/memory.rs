//! What a run holds in memory, predicted before step 0 (`--max-memory`).
//!
//! The model: the resident memory measured once the engine and every reference are loaded,
//! plus what the steps add on top of it:
//!
//! - **one call's captures**: every compared site of the positions one call feeds (at most
//!   `--prefill-chunk`), held by every side at once while they are compared: per position,
//!   the width of each site (hidden, heads x head_dim, kv_heads x head_dim, intermediate,
//!   vocabulary for the logits) times 4 bytes (8 for a side in f64);
//! - **the caches**: per position, layers x 2 x kv_heads x head_dim x 4 bytes: the engine's
//!   cache (compared in place: only the rows a call compares are converted), and per
//!   reference its cache and the whole cache it hands over at each call.
//!
//! The captures are counted twice ([`CALL_FACTOR`]: while a call is compared each side holds
//! them both as its framework's tensors and as the arrays compared), the caches once, plus
//! [`FIXED`]. Fitted and checked on SmolLM2-135M (8 steps, peak resident memory from
//! `/usr/bin/time -v`; docs/long-context.md): against transformers (`--weights dequant`) at
//! prompts of 64, 1,024 and 2,048 tokens and against llama.cpp at 2,048, the prediction is
//! 2–10% above the measured peak.

use std::collections::HashSet;

use lockstep_engine::Config;
use serde::Serialize;

/// One call's captures are held twice at the comparison (see the module's measurements).
pub const CALL_FACTOR: u64 = 2;

/// What a run adds whatever its length (the free-running check, allocator slack): 64 MiB.
pub const FIXED: u64 = 64 << 20;

/// A run's predicted memory, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    /// Resident memory once everything is loaded (measured).
    pub loaded: u64,
    /// One call's captures on every side.
    pub call: u64,
    /// The caches' copies at the run's last position.
    pub caches: u64,
    /// `loaded + CALL_FACTOR * call + caches + FIXED`.
    pub peak: u64,
    /// Positions of the largest call, and of the whole run.
    pub call_positions: usize,
    pub positions: usize,
}

impl MemoryPlan {
    pub fn describe(&self) -> String {
        let mb = |b: u64| b as f64 / 1048576.0;
        format!(
            "predicted peak {:.0} MB: loaded {:.0} MB + {CALL_FACTOR} x one call of {} positions' captures {:.0} MB + caches of {} positions {:.0} MB + {} MB",
            mb(self.peak),
            mb(self.loaded),
            self.call_positions,
            mb(self.call),
            self.positions,
            mb(self.caches),
            FIXED >> 20
        )
    }
}

/// Floats per position of a site of `info`'s model (0 for the caches, counted apart).
fn width(site: &str, c: &Config) -> usize {
    match lockstep_engine::sites::leaf_of(site) {
        "logits" => c.vocab_size,
        "q" | "q_rope" | "attn" => c.num_heads * c.head_dim,
        "k" | "v" | "k_rope" => c.num_kv_heads * c.head_dim,
        "mlp_gate" | "mlp_up" | "mlp_act" => c.intermediate_size,
        "router" | "expert_weights" => c.num_experts,
        "cache_k" | "cache_v" => 0,
        _ => c.hidden_size,
    }
}

/// The prediction for a run of `positions` positions of a model shaped `c` whose largest
/// call feeds `call_positions`, the engine in `engine_bytes` per value comparing `engine_sites`, and
/// each reference `(its sites, bytes per value)`; `loaded`: the resident memory now.
pub fn predict(
    c: &Config,
    engine_sites: &HashSet<&str>,
    engine_bytes: u64,
    refs: &[(&HashSet<String>, u64)],
    call_positions: usize,
    positions: usize,
    loaded: u64,
) -> MemoryPlan {
    let row = |sites: Vec<&str>, bytes: u64| sites.iter().map(|s| width(s, c) as u64).sum::<u64>() * bytes;
    let engine_row = row(engine_sites.iter().copied().collect(), engine_bytes);
    let refs_row: u64 = refs.iter().map(|(sites, bytes)| row(sites.iter().map(String::as_str).collect(), *bytes)).sum();
    let call = (engine_row + refs_row) * call_positions as u64;
    let cache_row = (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64;
    let compares_caches = engine_sites.iter().any(|s| s.ends_with(".cache_k") || s.ends_with(".cache_v"));
    // Each side's own cache; when caches are compared, each reference's whole cache crosses
    // to the comparison (transformers' grows by concatenation, llama.cpp's is read out): a
    // second copy per reference. The engine's is compared in place (a view, rows converted).
    let copies = 1 + refs.len() as u64 * if compares_caches { 2 } else { 1 };
    let caches = cache_row * positions as u64 * copies;
    let peak = loaded + CALL_FACTOR * call + caches + FIXED;
    MemoryPlan { loaded, call, caches, peak, call_positions, positions }
}

/// This process's resident memory now (Linux: `/proc/self/status`), if it can be read.
pub fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_grows_with_its_positions_and_the_caches_with_the_run() {
        let d = lockstep_engine::models::describe_at(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../snapshots/models/tiny-llama"))
            .expect("the tiny fixture");
        let c = &d.config;
        let sites: HashSet<&str> = ["layers.0.q", "layers.0.k", "layers.0.mlp_act", "layers.0.cache_k", "logits"].into_iter().collect();
        let owned: HashSet<String> = sites.iter().map(|s| s.to_string()).collect();
        let p = predict(c, &sites, 4, &[(&owned, 4)], 10, 100, 1000);
        let per_position = (c.num_heads * c.head_dim + c.num_kv_heads * c.head_dim + c.intermediate_size + c.vocab_size) as u64 * 4;
        assert_eq!(p.call, 2 * 10 * per_position, "engine and reference hold one call each");
        let row = (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as u64;
        assert_eq!(p.caches, 100 * row * 3, "the engine's cache, the reference's and the copy it hands over");
        assert_eq!(p.peak, 1000 + CALL_FACTOR * p.call + p.caches + FIXED);
        let longer = predict(c, &sites, 4, &[(&owned, 8)], 20, 200, 1000);
        assert!(longer.call > p.call && longer.caches == 2 * p.caches, "{longer:?}");
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}
