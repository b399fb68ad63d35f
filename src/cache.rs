//! The KV cache: an explicit object, one per sequence, passed to [`crate::Decoder::forward`].
//! Nothing is hidden or global; its state can be inspected (per layer K and V, the tokens
//! fed, the offset), reset or trimmed.
//!
//! A family chooses the cache's [`CacheKind`]: append-only (every position kept) or a
//! rotating window (the last `n` positions kept). The kind says how many positions a correct
//! cache holds after a number of positions fed ([`CacheKind::expected_len`]), so that a
//! window holding fewer positions than were fed is not mistaken for a dropped context.

use candle_core::Tensor;
use serde::Serialize;

use crate::error::Result;

/// How a cache keeps positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheKind {
    /// Every position fed stays (Llama).
    AppendOnly,
    /// Only the last `n` positions stay (sliding-window attention).
    Window(usize),
}

impl CacheKind {
    /// Positions a correct cache of this kind holds after `fed` positions.
    pub fn expected_len(&self, fed: usize) -> usize {
        match self {
            CacheKind::AppendOnly => fed,
            CacheKind::Window(n) => fed.min(*n),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            CacheKind::AppendOnly => "append-only".into(),
            CacheKind::Window(n) => format!("rotating window of {n}"),
        }
    }
}

/// Per-layer cached keys and values, each `(kv_heads, cached_len, head_dim)`, keys
/// after RoPE, in the layout of the model's Q/K weights.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Each layer's kind (from the model's per-layer plan).
    kinds: Vec<CacheKind>,
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The token ids fed so far, in order.
    tokens: Vec<u32>,
}

impl KvCache {
    /// An append-only cache.
    pub fn new(num_layers: usize) -> Self {
        Self::with_kind(num_layers, CacheKind::AppendOnly)
    }

    /// Every layer of one kind.
    pub fn with_kind(num_layers: usize, kind: CacheKind) -> Self {
        Self { kinds: vec![kind; num_layers], layers: vec![None; num_layers], tokens: vec![] }
    }

    /// One layer per kind: each layer as its plan says ([`crate::plan::LayerPlan::cache`];
    /// mlx-lm's `make_cache()`: the model decides which layer keeps what).
    pub fn with_kinds(kinds: Vec<CacheKind>) -> Self {
        Self { layers: vec![None; kinds.len()], kinds, tokens: vec![] }
    }

    /// How layer `layer` keeps positions.
    pub fn kind(&self, layer: usize) -> CacheKind {
        self.kinds.get(layer).copied().unwrap_or(CacheKind::AppendOnly)
    }

    /// The token ids fed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Records the ids of a forward step (called by the family's forward).
    pub fn push_tokens(&mut self, ids: &[u32]) {
        self.tokens.extend_from_slice(ids);
    }

    /// Number of positions fed (the position of the next token fed).
    pub fn offset(&self) -> usize {
        self.tokens.len()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Cached length of one layer (0 when empty).
    pub fn layer_len(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Some((k, _))) => k.dims()[1],
            _ => 0,
        }
    }

    /// The cached `(k, v)` of a layer, `(kv_heads, len, head_dim)` each.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(|x| x.as_ref())
    }

    /// Adds this step's `k`, `v` `(kv_heads, seq, head_dim)` and returns what attention
    /// reads: the layer's kept positions followed by this step's. A window then keeps only
    /// its last `n` positions.
    pub fn update_and_fetch(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let kind = self.kind(layer);
        let entry = &mut self.layers[layer];
        let (k, v) = match entry.take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((ck, cv)) => (Tensor::cat(&[&ck, k], 1)?, Tensor::cat(&[&cv, v], 1)?),
        };
        let len = k.dims()[1];
        let keep = kind.expected_len(len);
        *entry = if keep < len {
            Some((k.narrow(1, len - keep, keep)?.contiguous()?, v.narrow(1, len - keep, keep)?.contiguous()?))
        } else {
            Some((k.clone(), v.clone()))
        };
        Ok((k, v))
    }

    /// Sets one layer's cache `(k, v)`, `(kv_heads, len, head_dim)` each (isolation runs a
    /// layer on a reference's cache).
    pub fn set_layer(&mut self, layer: usize, k: Tensor, v: Tensor) {
        self.layers[layer] = Some((k, v));
    }

    /// Drops everything (a new sequence).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.tokens.clear();
    }

    /// Keeps only the first `len` positions of every layer (append-only caches).
    pub fn trim(&mut self, len: usize) -> Result<()> {
        self.tokens.truncate(len);
        for l in self.layers.iter_mut() {
            if let Some((k, v)) = l.take() {
                if len > 0 {
                    let n = len.min(k.dims()[1]);
                    *l = Some((k.narrow(1, 0, n)?, v.narrow(1, 0, n)?));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn kv(len: usize, start: f32) -> Tensor {
        Tensor::arange(start, start + len as f32, &Device::Cpu).unwrap().reshape((1, len, 1)).unwrap()
    }

    #[test]
    fn window_keeps_the_last_positions_and_attention_sees_the_step() {
        let mut c = KvCache::with_kind(1, CacheKind::Window(3));
        let (k, _) = c.update_and_fetch(0, &kv(4, 0.0), &kv(4, 0.0)).unwrap();
        assert_eq!(k.dims()[1], 4, "the prefill attends over all of its positions");
        assert_eq!(c.layer_len(0), 3);
        let (k, _) = c.update_and_fetch(0, &kv(1, 4.0), &kv(1, 4.0)).unwrap();
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(c.layer(0).unwrap().0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [2.0, 3.0, 4.0]);
        assert_eq!(CacheKind::Window(3).expected_len(14), 3);
        assert_eq!(CacheKind::AppendOnly.expected_len(14), 14);
    }
}
