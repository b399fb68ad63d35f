//! The site vocabulary: the canonical name of every capture point, and a model's **site
//! graph** (every site's name, kind and the sites it reads). Site names are built here and
//! nowhere else: a family declares its per-layer sites as a [`LayerSite`] table, the graph is
//! generated from that table and the number of layers, and everything outside the engine
//! (the harness, the Python references, which receive the names through the reference
//! protocol) takes the names from the graph.
//!
//! | name | tensor (Hugging Face layout, batch 1 implicit) |
//! |---|---|
//! | `embed` | token embeddings (after any embedding scale), `(seq, hidden)` |
//! | `layers.{i}.attn_norm` | input norm output |
//! | `layers.{i}.q`, `.k`, `.v` | projections before RoPE (LoRA included), `(seq, heads*head_dim)` |
//! | `layers.{i}.q_rope`, `.k_rope` | after RoPE, `(heads, seq, head_dim)` |
//! | `layers.{i}.cache_k`, `.cache_v` | the layer's whole cache after the step, `(kv_heads, cached, head_dim)` |
//! | `layers.{i}.attn` | attention output, heads merged, before the output projection |
//! | `layers.{i}.attn_out` | after the output projection |
//! | `layers.{i}.mlp_norm` | post-attention norm output |
//! | `layers.{i}.mlp_gate`, `.mlp_up`, `.mlp_act`, `.mlp_out` | gate, up, act(gate)*up, down (MoE: `mlp_out` only, the weighted sum of the experts) |
//! | `layers.{i}.router` | MoE router logits (MoE families only), `(seq, n_experts)` |
//! | `layers.{i}.expert_weights` | MoE: the weight each expert received, `(seq, n_experts)`, zero where not chosen (the chosen experts and their weights) |
//! | `layers.{i}.out` | the block's residual output |
//! | `final_norm` | final norm output |
//! | `logits` | logits of the positions fed in the step, `(seq, vocab)` |

use std::collections::HashMap;

use serde::Serialize;

/// What a site holds; decides which tolerances apply and how a divergence there reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteKind {
    /// Token embeddings.
    Embedding,
    /// A norm's output.
    Norm,
    /// A linear projection's output (q, k, v, attn_out, mlp gate/up/out).
    Projection,
    /// Q or K after the rotary embedding.
    Rope,
    /// The KV cache contents after the step.
    Cache,
    /// Attention output (heads merged).
    Attention,
    /// An activation inside the MLP (act(gate) * up).
    Activation,
    /// MoE router logits.
    Router,
    /// MoE routing: the weight each expert received per position (zero where not chosen).
    Routing,
    /// MoE output: the routing-weighted sum of the chosen experts' outputs.
    Experts,
    /// A residual stream (a block's output).
    Residual,
    /// The model's logits.
    Logits,
}

impl SiteKind {
    pub fn name(&self) -> &'static str {
        match self {
            SiteKind::Embedding => "embedding",
            SiteKind::Norm => "norm",
            SiteKind::Projection => "projection",
            SiteKind::Rope => "rope",
            SiteKind::Cache => "cache",
            SiteKind::Attention => "attention",
            SiteKind::Activation => "activation",
            SiteKind::Router => "router",
            SiteKind::Routing => "routing",
            SiteKind::Experts => "experts",
            SiteKind::Residual => "residual",
            SiteKind::Logits => "logits",
        }
    }
}

/// The layer's input, as a [`LayerSite::reads`] entry: layer 0 reads `embed`, layer `l`
/// reads `layers.{l-1}.out`.
pub const INPUT: &str = "input";
/// The leaf of a block's output (what the next layer reads).
pub const OUT: &str = "out";
/// The global sites around the layers.
pub const EMBED: &str = "embed";
pub const FINAL_NORM: &str = "final_norm";
pub const LOGITS: &str = "logits";

/// One per-layer site of a family, in forward order: its leaf name, its kind, the leaves of
/// the same layer it reads ([`INPUT`] for the layer's input), and whether a GGUF-ordered
/// engine holds it in its Q/K row layout (mapped back by a named transform for comparison),
/// and, for a projection, the checkpoint module whose output it is (`q_proj`).
#[derive(Debug, Clone, Copy)]
pub struct LayerSite {
    pub leaf: &'static str,
    pub kind: SiteKind,
    pub reads: &'static [&'static str],
    pub qk_rows: bool,
    pub module: Option<&'static str>,
}

impl LayerSite {
    pub const fn new(leaf: &'static str, kind: SiteKind, reads: &'static [&'static str]) -> Self {
        Self { leaf, kind, reads, qk_rows: false, module: None }
    }

    /// A site stored in the Q/K row layout of the weights (q, k, q_rope, k_rope, cache_k).
    pub const fn qk(leaf: &'static str, kind: SiteKind, reads: &'static [&'static str]) -> Self {
        Self { leaf, kind, reads, qk_rows: true, module: None }
    }

    /// The output of the checkpoint module `module` (a projection), which reads `reads[0]`.
    pub const fn of(self, module: &'static str) -> Self {
        Self { module: Some(module), ..self }
    }
}

/// One site of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Site {
    pub name: String,
    /// The layer, for per-layer sites.
    pub layer: Option<usize>,
    /// The last component of the name (`q_rope`, `embed`).
    pub leaf: &'static str,
    pub kind: SiteKind,
    /// Full names of the sites it reads (the dataflow bisect follows); `tokens` for `embed`.
    pub reads: Vec<String>,
    /// Held in the weights' Q/K row layout by an engine that keeps GGUF order.
    pub qk_rows: bool,
    /// The checkpoint module whose output it is (`q_proj`), for projections.
    pub module: Option<&'static str>,
}

/// A model's sites in forward order, with their dataflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteGraph {
    sites: Vec<Site>,
    /// Name -> position in `sites` (the harness looks a site up for every capture).
    #[serde(skip)]
    index: HashMap<String, usize>,
    num_layers: usize,
    layer_sites: Vec<&'static str>,
}

/// The name of a per-layer site.
pub fn layer_site(layer: usize, leaf: &str) -> String {
    format!("layers.{layer}.{leaf}")
}

/// The layer of a site name (`layers.3.q` -> 3), `None` outside the layers.
pub fn layer_of(site: &str) -> Option<usize> {
    site.strip_prefix("layers.").and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok())
}

/// The leaf of a site name (`layers.3.q_rope` -> `q_rope`, `embed` -> `embed`).
pub fn leaf_of(site: &str) -> &str {
    site.rsplit('.').next().unwrap_or(site)
}

/// The site a layer reads as its input: `embed` for layer 0, the previous layer's output after.
pub fn layer_input(layer: usize) -> String {
    match layer {
        0 => EMBED.to_string(),
        l => layer_site(l - 1, OUT),
    }
}

impl SiteGraph {
    /// The graph of a model with `num_layers` blocks of `layer` sites, between `embed` and
    /// `final_norm`, `logits`.
    pub fn new(num_layers: usize, layer: &[LayerSite]) -> Self {
        let mut sites = vec![Site {
            name: EMBED.into(),
            layer: None,
            leaf: EMBED,
            kind: SiteKind::Embedding,
            reads: vec!["tokens".into()],
            qk_rows: false,
            module: None,
        }];
        for l in 0..num_layers {
            for s in layer {
                let reads = s
                    .reads
                    .iter()
                    .map(|r| if *r == INPUT { layer_input(l) } else { layer_site(l, r) })
                    .collect();
                sites.push(Site { name: layer_site(l, s.leaf), layer: Some(l), leaf: s.leaf, kind: s.kind, reads, qk_rows: s.qk_rows, module: s.module });
            }
        }
        let last = if num_layers == 0 { EMBED.to_string() } else { layer_site(num_layers - 1, OUT) };
        sites.push(Site { name: FINAL_NORM.into(), layer: None, leaf: FINAL_NORM, kind: SiteKind::Norm, reads: vec![last], qk_rows: false, module: None });
        sites.push(Site { name: LOGITS.into(), layer: None, leaf: LOGITS, kind: SiteKind::Logits, reads: vec![FINAL_NORM.into()], qk_rows: false, module: Some("lm_head") });
        let index = sites.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self { sites, index, num_layers, layer_sites: layer.iter().map(|s| s.leaf).collect() }
    }

    /// The graph of an engine that exposes only its logits (of `num_layers` layers): the
    /// harness compares the next-token distributions at every step and nothing else.
    pub fn logits_only(num_layers: usize) -> Self {
        Self::new(num_layers, &[]).restrict(|s| s.kind == SiteKind::Logits)
    }

    /// The sites of this graph that `keep` accepts, in the same order and with the same
    /// dataflow (an engine that taps a subset of its family's sites declares this graph;
    /// a site it reads may be missing, which only means bisect cannot follow it there).
    pub fn restrict(&self, keep: impl Fn(&Site) -> bool) -> Self {
        let sites: Vec<Site> = self.sites.iter().filter(|s| keep(s)).cloned().collect();
        let index = sites.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let layer_sites = self.layer_sites.iter().copied().filter(|l| sites.iter().any(|s| s.layer.is_some() && s.leaf == *l)).collect();
        Self { sites, index, num_layers: self.num_layers, layer_sites }
    }

    /// True when every site of the family graph `full` is here (a fully tapped engine).
    pub fn covers(&self, full: &SiteGraph) -> bool {
        full.sites.iter().all(|s| self.index.contains_key(&s.name))
    }

    /// How far bisect can localize a divergence with these taps: `"site"` with every
    /// per-layer site, `"layer"` with each layer's output, else `"step"` (logits only).
    pub fn localizes_to(&self) -> &'static str {
        let layers_out = (0..self.num_layers).all(|l| self.index.contains_key(&layer_site(l, OUT)));
        let more_than_out = self.sites.iter().any(|s| s.layer.is_some() && s.leaf != OUT);
        match (layers_out, more_than_out) {
            (true, true) => "site",
            (true, false) => "layer",
            _ => "step",
        }
    }

    /// Every site, in forward order.
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// Every site name, in forward order.
    pub fn names(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.name.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Site> {
        self.index.get(name).map(|&i| &self.sites[i])
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// The per-layer leaves, in forward order.
    pub fn layer_sites(&self) -> &[&'static str] {
        &self.layer_sites
    }

    /// The sites of one layer, in forward order.
    pub fn layer(&self, l: usize) -> impl Iterator<Item = &Site> {
        self.sites.iter().filter(move |s| s.layer == Some(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &[LayerSite] = &[
        LayerSite::new("attn_norm", SiteKind::Norm, &[INPUT]),
        LayerSite::new("out", SiteKind::Residual, &["attn_norm", INPUT]),
    ];

    #[test]
    fn graph_names_and_dataflow() {
        let g = SiteGraph::new(2, TWO);
        assert_eq!(g.names(), ["embed", "layers.0.attn_norm", "layers.0.out", "layers.1.attn_norm", "layers.1.out", "final_norm", "logits"]);
        assert_eq!(g.get("layers.1.attn_norm").unwrap().reads, ["layers.0.out"]);
        assert_eq!(g.get("final_norm").unwrap().reads, ["layers.1.out"]);
        assert_eq!(layer_of("layers.12.q"), Some(12));
        assert_eq!(leaf_of("layers.12.q_rope"), "q_rope");
        assert_eq!(layer_input(0), "embed");
    }

    #[test]
    fn subsets_say_how_far_bisect_localizes() {
        let g = SiteGraph::new(2, TWO);
        assert_eq!(g.localizes_to(), "site");
        let outs = g.restrict(|s| s.leaf == OUT || s.layer.is_none());
        assert_eq!(outs.localizes_to(), "layer");
        assert_eq!(outs.layer_sites(), ["out"]);
        let logits = SiteGraph::logits_only(2);
        assert_eq!(logits.names(), ["logits"]);
        assert_eq!(logits.num_layers(), 2);
        assert_eq!(logits.localizes_to(), "step");
        assert!(g.covers(&outs) && !outs.covers(&g));
    }
}
