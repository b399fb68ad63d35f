//! The KV cache: an explicit object, one per sequence, passed to [`crate::Decoder::forward`].
//! Nothing is hidden or global; its state can be inspected (per layer K and V, the tokens
//! fed, the offset), reset or trimmed.
//!
//! A family chooses the cache's [`CacheKind`]: append-only (every position kept) or a
//! rotating window (the last `n` positions kept). The kind says how many positions a correct
//! cache holds after a number of positions fed ([`CacheKind::expected_len`]), so that a
//! window holding fewer positions than were fed is not mistaken for a dropped context.
//!
//! A cache stores K and V as they are computed, or in f16 ([`KvDtype`]): each row is rounded
//! once as it is written, and attention reads the f16 rows in place.

use candle_core::{DType, Tensor};
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

/// How a cache stores K and V (`LoadOptions::kv_cache`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvDtype {
    /// As computed, in the model's dtype (f32; f64 for an f64 engine): nothing rounded.
    #[default]
    F32,
    /// Rounded to f16 once, as each row is written (llama.cpp's default `type_k`/`type_v`):
    /// half the bytes a decode step reads. An f32 engine's decode attention reads the f16
    /// rows in place (`blocks::fast::attention_one_row`); a prefill converts the keys a chunk
    /// of query rows sees.
    F16,
}

impl KvDtype {
    pub const ALL: [KvDtype; 2] = [KvDtype::F32, KvDtype::F16];

    pub fn name(&self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    pub fn parse(s: &str) -> Option<KvDtype> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The dtype rows are stored in (`None`: as they come).
    fn storage(&self) -> Option<DType> {
        match self {
            KvDtype::F32 => None,
            KvDtype::F16 => Some(DType::F16),
        }
    }
}

/// `t` in `storage` (itself when that is its dtype or there is none).
fn stored(t: &Tensor, storage: Option<DType>) -> Result<Tensor> {
    Ok(match storage {
        Some(d) if d != t.dtype() => t.to_dtype(d)?,
        _ => t.clone(),
    })
}

/// One layer's keys and values: buffers `(kv_heads, capacity, head_dim)` whose rows
/// `start..start + len` are the cached positions, written in place as positions arrive.
///
/// Nothing handed out is ever written again: every tensor given away (what
/// [`KvCache::layer`] and [`KvCache::update_and_fetch`] return, and so every capture of
/// `cache_k`/`cache_v`) is a view of rows below `sealed`, and rows below `sealed` are never
/// written; a step that would write there (after a [`KvCache::trim`]) or past the capacity
/// moves the live rows to a new buffer first. Growth doubles, so each position is copied
/// O(1) times in amortized terms.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    start: usize,
    len: usize,
    /// Rows `0..sealed` may be seen by a tensor handed out: never written in place.
    sealed: usize,
    /// The live rows, `(kv_heads, len, head_dim)` views of the buffers.
    view: (Tensor, Tensor),
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.k.dims()[1]
    }

    /// A layer whose buffers are `k`, `v` themselves, every row live and sealed (they came
    /// from outside: the first write moves them to a buffer of this cache's own).
    fn sealed(k: Tensor, v: Tensor) -> Self {
        let len = k.dims()[1];
        Self { view: (k.clone(), v.clone()), k, v, start: 0, len, sealed: len }
    }

    /// Live rows `from..from + n` (relative to `start`) as views.
    fn rows(&self, from: usize, n: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.k.narrow(1, self.start + from, n)?, self.v.narrow(1, self.start + from, n)?))
    }

    /// Moves the live rows to the start of new buffers of `capacity` rows, in `storage` (as
    /// they are when `None`).
    fn relocate(&mut self, capacity: usize, storage: Option<DType>) -> Result<()> {
        let (k, v) = self.rows(0, self.len)?;
        let (k, v) = (stored(&k, storage)?, stored(&v, storage)?);
        let nk = zeros_like_rows(&k, capacity)?;
        let nv = zeros_like_rows(&v, capacity)?;
        if self.len > 0 {
            nk.slice_set(&k.contiguous()?, 1, 0)?;
            nv.slice_set(&v.contiguous()?, 1, 0)?;
        }
        (self.k, self.v, self.start, self.sealed) = (nk, nv, 0, self.len);
        self.view = self.rows(0, self.len)?;
        Ok(())
    }
}

/// Zero buffers shaped as `t (kv_heads, _, head_dim)` with `rows` rows (allocated zeroed, so
/// the pages of rows never written are never touched).
fn zeros_like_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let (h, _, d) = t.dims3()?;
    Ok(Tensor::zeros((h, rows, d), t.dtype(), t.device())?)
}

/// Per-layer cached keys and values, each `(kv_heads, cached_len, head_dim)`, keys
/// after RoPE, in the layout of the model's Q/K weights.
///
/// Each layer's K and V live in preallocated buffers written in place ([`LayerKv`]): a step
/// costs the rows it adds, not a copy of the whole cache. [`KvCache::reserve`] sizes the
/// buffers for a known context once; without it they grow geometrically. Cloning a cache
/// gives an independent cache (the clone shares the rows written so far and writes its own
/// in a buffer of its own).
#[derive(Debug)]
pub struct KvCache {
    /// Each layer's kind (from the model's per-layer plan).
    kinds: Vec<CacheKind>,
    layers: Vec<Option<LayerKv>>,
    /// The token ids fed so far, in order.
    tokens: Vec<u32>,
    /// Positions the caller said the sequence will reach ([`KvCache::reserve`]).
    reserved: usize,
    /// How K and V are stored.
    dtype: KvDtype,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|l| {
                    // Shares the buffers, but every row of them sealed for the clone: its
                    // first write moves it to buffers of its own, and the original never
                    // writes below its own `sealed`, which covers every row the clone sees.
                    let view = l.view.clone();
                    LayerKv { k: l.k.clone(), v: l.v.clone(), start: l.start, len: l.len, sealed: l.capacity(), view }
                })
            })
            .collect();
        Self { kinds: self.kinds.clone(), layers, tokens: self.tokens.clone(), reserved: self.reserved, dtype: self.dtype }
    }
}

impl KvCache {
    /// An append-only cache.
    pub fn new(num_layers: usize) -> Self {
        Self::with_kind(num_layers, CacheKind::AppendOnly)
    }

    /// Every layer of one kind.
    pub fn with_kind(num_layers: usize, kind: CacheKind) -> Self {
        Self::with_kinds(vec![kind; num_layers])
    }

    /// One layer per kind: each layer as its plan says ([`crate::plan::LayerPlan::cache`];
    /// mlx-lm's `make_cache()`: the model decides which layer keeps what).
    pub fn with_kinds(kinds: Vec<CacheKind>) -> Self {
        Self { layers: kinds.iter().map(|_| None).collect(), kinds, tokens: vec![], reserved: 0, dtype: KvDtype::F32 }
    }

    /// The same cache storing K and V as `dtype` says (set before the first step: rows already
    /// held keep their dtype until the layer next moves them).
    pub fn stored_as(mut self, dtype: KvDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// How this cache stores K and V.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
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
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }

    /// The cached `(k, v)` of a layer, `(kv_heads, len, head_dim)` each (views of the cache's
    /// buffers; what they show never changes, whatever the cache does next).
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(|x| x.as_ref()).map(|l| &l.view)
    }

    /// Rows a layer of `kind` should have room for when the sequence reaches `positions`: all
    /// of them for an append-only layer; a window needs its `n` kept positions plus a step's,
    /// and twice `n` lets it move its rows only every `n` positions.
    fn rows_for(kind: CacheKind, positions: usize) -> usize {
        match kind {
            CacheKind::AppendOnly => positions,
            CacheKind::Window(n) => positions.min(2 * n.max(1)),
        }
    }

    /// Makes room for a sequence of `positions` positions in all (prompt and generated
    /// tokens; e.g. the `--context` of a run): layers already holding positions move to
    /// buffers that large now (once), the others allocate them at their first step. The
    /// buffers then never grow or move while the sequence stays within `positions`.
    /// Reserving less than what is held does nothing; the reservation outlives
    /// [`KvCache::reset`].
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        self.reserved = self.reserved.max(positions);
        for (i, l) in self.layers.iter_mut().enumerate() {
            if let Some(l) = l {
                let want = Self::rows_for(self.kinds[i], self.reserved);
                if l.capacity() < want {
                    l.relocate(want, self.dtype.storage())?;
                }
            }
        }
        Ok(())
    }

    /// Adds this step's `k`, `v` `(kv_heads, seq, head_dim)` and returns what attention
    /// reads: the layer's kept positions followed by this step's (in the cache's storage
    /// dtype, [`KvCache::dtype`]). A window then keeps only its last `n` positions.
    pub fn update_and_fetch(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let kind = self.kind(layer);
        let storage = self.dtype.storage();
        let (k, v) = (&stored(k, storage)?, &stored(v, storage)?);
        let seq = k.dims3()?.1;
        let reserved = Self::rows_for(kind, self.reserved);
        let entry = &mut self.layers[layer];
        if entry.is_none() {
            let (k0, v0) = (zeros_like_rows(k, seq.max(reserved))?, zeros_like_rows(v, seq.max(reserved))?);
            *entry = Some(LayerKv { view: (k0.narrow(1, 0, 0)?, v0.narrow(1, 0, 0)?), k: k0, v: v0, start: 0, len: 0, sealed: 0 });
        }
        let l = entry.as_mut().expect("allocated above");
        let at = l.start + l.len;
        // Rows held in another dtype (given by `set_layer`) move to buffers of the storage's.
        let foreign = storage.is_some_and(|d| l.k.dtype() != d || l.v.dtype() != d);
        if at < l.sealed || at + seq > l.capacity() || foreign {
            // No room, or the rows to write may be seen by a tensor handed out: new buffers.
            // Growth doubles (amortized O(1) copies per position); a window, whose live rows
            // stay under n + seq, moves them to buffers twice that.
            let need = l.len + seq;
            let cap = match at + seq > l.capacity() {
                true => need.max(2 * l.capacity().min(need)).max(reserved),
                false => l.capacity().max(need),
            };
            l.relocate(cap, storage)?;
        }
        let at = l.start + l.len;
        l.k.slice_set(&k.contiguous()?, 1, at)?;
        l.v.slice_set(&v.contiguous()?, 1, at)?;
        let total = l.len + seq;
        let fetched = l.rows(0, total)?;
        let keep = kind.expected_len(total);
        l.start += total - keep;
        l.len = keep;
        l.sealed = l.sealed.max(l.start + l.len);
        l.view = l.rows(0, keep)?;
        Ok(fetched)
    }

    /// Sets one layer's cache `(k, v)`, `(kv_heads, len, head_dim)` each (isolation runs a
    /// layer on a reference's cache). They are not copied, and never written: the layer's
    /// next step moves them to buffers of the cache's own.
    pub fn set_layer(&mut self, layer: usize, k: Tensor, v: Tensor) {
        self.layers[layer] = Some(LayerKv::sealed(k, v));
    }

    /// Drops everything (a new sequence). A reservation stays.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.tokens.clear();
    }

    /// Keeps only the first `len` positions of every layer (append-only caches).
    pub fn trim(&mut self, len: usize) -> Result<()> {
        self.tokens.truncate(len);
        for l in self.layers.iter_mut() {
            if len == 0 {
                *l = None;
            } else if let Some(l) = l {
                // The dropped rows stay sealed (a view handed out may show them): the next
                // step writes to new buffers.
                l.len = len.min(l.len);
                l.view = l.rows(0, l.len)?;
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

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// `(2, len, 3)` with distinct values per position (`start..start + len`).
    fn rows(len: usize, start: usize) -> Tensor {
        let v: Vec<f32> = (0..2).flat_map(|h| (start..start + len).flat_map(move |p| (0..3).map(move |d| (h * 100_000 + p * 10 + d) as f32))).collect();
        Tensor::from_vec(v, (2, len, 3), &Device::Cpu).unwrap()
    }

    fn buffer_ptr(c: &KvCache, layer: usize) -> usize {
        let l = c.layers[layer].as_ref().unwrap();
        let (s, _) = l.k.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().unwrap().as_ptr() as usize,
            _ => unreachable!(),
        }
    }

    #[test]
    fn appends_in_place_and_nothing_handed_out_changes() {
        let mut c = KvCache::new(1);
        let mut handed = vec![];
        let mut at = 0;
        for n in [5, 1, 1, 3, 1, 1, 1, 8, 1, 1, 1, 1, 1, 20, 1] {
            let (k, v) = c.update_and_fetch(0, &rows(n, at), &rows(n, at)).unwrap();
            at += n;
            assert_eq!(vals(&k), vals(&rows(at, 0)), "attention reads every position so far");
            assert_eq!(vals(&v), vals(&rows(at, 0)));
            assert_eq!(c.layer_len(0), at);
            handed.push((at, k, c.layer(0).unwrap().clone()));
        }
        // Growth doubles: a few moves for 45 positions, not one per step.
        assert!(c.layers[0].as_ref().unwrap().capacity() < 2 * 45 + 1);
        // A trim, then new positions over the trimmed ones, and a clone that writes its own.
        c.trim(10).unwrap();
        assert_eq!(vals(&c.layer(0).unwrap().0), vals(&rows(10, 0)));
        let mut d = c.clone();
        c.update_and_fetch(0, &rows(4, 1000), &rows(4, 1000)).unwrap();
        d.update_and_fetch(0, &rows(2, 2000), &rows(2, 2000)).unwrap();
        let want = |tail: Tensor| vals(&Tensor::cat(&[rows(10, 0), tail], 1).unwrap());
        assert_eq!(vals(&c.layer(0).unwrap().0), want(rows(4, 1000)));
        assert_eq!(vals(&d.layer(0).unwrap().1), want(rows(2, 2000)));
        for (len, fetched, (k, v)) in &handed {
            assert_eq!(vals(fetched), vals(&rows(*len, 0)), "a fetched cache of {len} positions changed");
            assert_eq!((vals(k), vals(v)), (vals(&rows(*len, 0)), vals(&rows(*len, 0))), "layer() of {len} changed");
        }
    }

    #[test]
    fn set_layer_never_writes_the_given_tensors_and_reserve_allocates_once() {
        let (k, v) = (rows(4, 0), rows(4, 0));
        let mut c = KvCache::new(2);
        c.set_layer(0, k.clone(), v.clone());
        let (fk, _) = c.update_and_fetch(0, &rows(1, 4), &rows(1, 4)).unwrap();
        assert_eq!(vals(&fk), vals(&rows(5, 0)));
        assert_eq!((vals(&k), vals(&v)), (vals(&rows(4, 0)), vals(&rows(4, 0))));

        c.reserve(64).unwrap();
        assert_eq!(c.layers[0].as_ref().unwrap().capacity(), 64, "a held layer moves once");
        c.update_and_fetch(1, &rows(7, 0), &rows(7, 0)).unwrap();
        let (p0, p1) = (buffer_ptr(&c, 0), buffer_ptr(&c, 1));
        for at in 5..64 {
            c.update_and_fetch(0, &rows(1, at), &rows(1, at)).unwrap();
        }
        for at in 7..64 {
            c.update_and_fetch(1, &rows(1, at), &rows(1, at)).unwrap();
        }
        assert_eq!((buffer_ptr(&c, 0), buffer_ptr(&c, 1)), (p0, p1), "no move within the reservation");
        assert_eq!(vals(&c.layer(0).unwrap().0), vals(&rows(64, 0)));
        assert_eq!(vals(&c.layer(1).unwrap().1), vals(&rows(64, 0)));
        c.reset();
        assert_eq!((c.layer_len(0), c.offset()), (0, 0));
        c.update_and_fetch(0, &rows(3, 0), &rows(3, 0)).unwrap();
        assert_eq!(c.layers[0].as_ref().unwrap().capacity(), 64, "the reservation outlives a reset");
    }

    #[test]
    fn an_f16_cache_stores_rows_rounded_once_and_moves_given_rows_to_f16() {
        let round = |t: &Tensor| vals(&t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap());
        let f16_vals = |t: &Tensor| {
            assert_eq!(t.dtype(), DType::F16);
            vals(&t.to_dtype(DType::F32).unwrap())
        };
        // Values within f16's range that it rounds (the positions' values / 1000 + 1/3).
        let third = |t: Tensor| ((t * 1e-3).unwrap() + 1.0 / 3.0).unwrap();
        let mut c = KvCache::new(2).stored_as(KvDtype::F16);
        assert_eq!(c.dtype(), KvDtype::F16);
        let mut handed = vec![];
        let mut at = 0;
        for n in [5, 1, 1, 3, 1, 20, 1] {
            let (k, v) = c.update_and_fetch(0, &third(rows(n, at)), &rows(n, at).affine(1e-3, 0.0).unwrap()).unwrap();
            at += n;
            assert_eq!(f16_vals(&k), round(&third(rows(at, 0))));
            assert_eq!(f16_vals(&v), round(&rows(at, 0).affine(1e-3, 0.0).unwrap()));
            handed.push((at, k));
        }
        assert_ne!(round(&third(rows(at, 0))), vals(&third(rows(at, 0))), "the rounding shows");
        for (len, k) in &handed {
            assert_eq!(f16_vals(k), round(&third(rows(*len, 0))), "a fetched cache of {len} positions changed");
        }
        // Rows given in f32 (isolation) stay as given, and move to f16 at the layer's next step.
        let given = third(rows(4, 0));
        c.set_layer(1, given.clone(), given.clone());
        assert_eq!(c.layer(1).unwrap().0.dtype(), DType::F32);
        let (k, _) = c.update_and_fetch(1, &third(rows(1, 4)), &third(rows(1, 4))).unwrap();
        assert_eq!(f16_vals(&k), round(&third(rows(5, 0))));
        assert_eq!(vals(&given), vals(&third(rows(4, 0))));
        // Clones, trims and reservations keep the dtype.
        c.trim(3).unwrap();
        let mut d = c.clone();
        d.reserve(64).unwrap();
        let (k, _) = d.update_and_fetch(0, &third(rows(2, 3)), &third(rows(2, 3))).unwrap();
        assert_eq!(k.dtype(), DType::F16);
        assert_eq!(d.dtype(), KvDtype::F16);
        assert_eq!(KvDtype::parse("f16"), Some(KvDtype::F16));
        assert_eq!(KvDtype::default().name(), "f32");
    }

    #[test]
    fn a_window_moves_its_rows_rarely_and_keeps_its_semantics() {
        let mut c = KvCache::with_kind(1, CacheKind::Window(4));
        let mut at = 0;
        let mut handed = vec![];
        for n in [6, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1, 1] {
            let kept = c.layer_len(0);
            let (k, _) = c.update_and_fetch(0, &rows(n, at), &rows(n, at)).unwrap();
            assert_eq!(vals(&k), vals(&rows(kept + n, at - kept)), "the kept positions, then the step's");
            at += n;
            assert_eq!(c.layer_len(0), at.min(4));
            assert_eq!(vals(&c.layer(0).unwrap().0), vals(&rows(at.min(4), at - at.min(4))));
            assert!(c.layers[0].as_ref().unwrap().capacity() <= 2 * (4 + 6));
            handed.push((at - kept - n, kept + n, k));
        }
        for (from, len, k) in &handed {
            assert_eq!(vals(k), vals(&rows(*len, *from)));
        }
    }
}
