//! The KV cache: an explicit object, one per model instance, passed to
//! [`crate::Llama::forward`]. Nothing is hidden or global; its state can be inspected
//! (per layer K and V, the offset) and reset or trimmed.

use candle_core::Tensor;

use crate::error::Result;

/// Per-layer cached keys and values, each `(kv_heads, cached_len, head_dim)`, keys
/// after RoPE, in the layout of the model's Q/K weights.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The token ids fed so far, in order.
    tokens: Vec<u32>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], tokens: vec![] }
    }

    /// The token ids fed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Records the ids of a forward step (called by `Llama::forward`).
    pub fn push_tokens(&mut self, ids: &[u32]) {
        self.tokens.extend_from_slice(ids);
    }

    /// Number of positions cached (the position of the next token fed).
    pub fn offset(&self) -> usize {
        self.layer_len(0)
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

    /// Appends this step's `k`, `v` `(kv_heads, seq, head_dim)` and returns the whole
    /// cache of the layer.
    pub fn update_and_fetch(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let entry = &mut self.layers[layer];
        let (k, v) = match entry.take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((ck, cv)) => (Tensor::cat(&[&ck, k], 1)?, Tensor::cat(&[&cv, v], 1)?),
        };
        *entry = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Sets one layer's cache `(k, v)`, `(kv_heads, len, head_dim)` each (bisect's isolation
    /// runs a layer on a reference's cache).
    pub fn set_layer(&mut self, layer: usize, k: Tensor, v: Tensor) {
        self.layers[layer] = Some((k, v));
    }

    /// Drops everything (a new sequence).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.tokens.clear();
    }

    /// Keeps only the first `len` positions of every layer.
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
