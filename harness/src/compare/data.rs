//! Borrowed tensor data (numpy memory, a trace's arrays, or a trace's sketch of a site) and
//! the comparators of [`super::metrics`] dispatched over it.

use super::metrics::{logit_metrics, logit_metrics_topk, tensor_metrics, LogitMetrics, TensorMetrics};
use super::sketch::{self, Sketch};

/// A reference tensor's data, borrowed from numpy or a trace: float32, float64 from an f64
/// oracle, or the sketch a trace keeps for a site it does not store in full (`sketch.rs`).
#[derive(Clone, Copy)]
pub enum Data<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    Sketch(&'a Sketch),
    /// A trace's logits of a long call ([`TopKLogits`]): compared as a tensor through its
    /// sketch, row by row through [`Data::slice`].
    TopK(&'a TopKLogits),
    /// Row `.1` of such logits, one kept as its top entries.
    TopKRow(&'a TopKLogits, usize),
}

/// Logits of a call a trace keeps in part (`golden/trace.rs`, `@topk`): every row but the last
/// as its [`TopKLogits::K`] largest logits (token ids, values) and the row's log-sum-exp, the
/// last row (the next-token distribution the verdict reads) in full, and the sketch of the
/// whole `(rows, vocab)` tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKLogits {
    pub rows: usize,
    pub vocab: usize,
    /// `(rows - 1) x (2K + 1)`: per row K token ids (as f32: exact below 2^24), their K
    /// logits in decreasing order, the row's log-sum-exp.
    pub top: Vec<f32>,
    pub last: Vec<f64>,
    pub sketch: Sketch,
}

impl TopKLogits {
    /// Entries kept per earlier row.
    pub const K: usize = 64;

    /// Keeps `data` (`rows x vocab`, row-major) in part.
    pub fn of<T: Copy + Into<f64>>(data: &[T], rows: usize, vocab: usize) -> TopKLogits {
        let k = Self::K.min(vocab);
        let mut top = Vec::with_capacity(rows.saturating_sub(1) * (2 * Self::K + 1));
        for r in 0..rows.saturating_sub(1) {
            let row: Vec<f64> = data[r * vocab..(r + 1) * vocab].iter().map(|&x| x.into()).collect();
            let best = super::metrics::top_k(&row, k);
            let lse = super::metrics::log_sum_exp(&row);
            top.extend(best.iter().map(|&i| i as f32).chain(std::iter::repeat_n(-1.0, Self::K - k)));
            top.extend(best.iter().map(|&i| row[i] as f32).chain(std::iter::repeat_n(f32::NEG_INFINITY, Self::K - k)));
            top.push(lse as f32);
        }
        let last = data[rows.saturating_sub(1) * vocab..rows * vocab].iter().map(|&x| x.into()).collect();
        TopKLogits { rows, vocab, top, last, sketch: Sketch::of(data) }
    }

    /// Row `r` (not the last): its token ids, logits and log-sum-exp.
    pub fn row(&self, r: usize) -> (Vec<u32>, &[f32], f64) {
        let w = 2 * Self::K + 1;
        let v = &self.top[r * w..(r + 1) * w];
        let ids: Vec<u32> = v[..Self::K].iter().take_while(|&&i| i >= 0.0).map(|&i| i as u32).collect();
        let n = ids.len();
        (ids, &v[Self::K..Self::K + n], v[2 * Self::K] as f64)
    }
}

impl<'a> Data<'a> {
    /// The sketch of the data (a sketch is its own sketch).
    pub fn sketch(&self) -> Sketch {
        match self {
            Data::F32(x) => Sketch::of(x),
            Data::F64(x) => Sketch::of(x),
            Data::Sketch(s) => (*s).clone(),
            Data::TopK(t) => t.sketch.clone(),
            Data::TopKRow(t, r) => {
                // Not compared as a tensor (a row of logits is compared as a distribution).
                let (_, v, _) = t.row(*r);
                Sketch::of(v)
            }
        }
    }

    /// A copy as f32; `None` for a sketch (a trace keeps no values for that site).
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        match self {
            Data::F32(d) => Some(d.to_vec()),
            Data::F64(d) => Some(d.iter().map(|&x| x as f32).collect()),
            Data::Sketch(_) | Data::TopK(_) | Data::TopKRow(..) => None,
        }
    }

    /// Rows `range` of a flat buffer. Only full tensors and the logits of a trace can be
    /// sliced, the latter by whole rows (logits are the one sliced site).
    pub fn slice(self, range: std::ops::Range<usize>) -> Data<'a> {
        match self {
            Data::F32(d) => Data::F32(&d[range]),
            Data::F64(d) => Data::F64(&d[range]),
            Data::TopK(t) => match range.start / t.vocab.max(1) {
                r if r + 1 == t.rows => Data::F64(&t.last),
                r => Data::TopKRow(t, r),
            },
            Data::Sketch(_) | Data::TopKRow(..) => unreachable!("a sketch cannot be sliced; traces keep logits rows"),
        }
    }
}

/// Owned tensor data in the dtype it was computed in: an f32 engine's sites are held as f32
/// (one copy, not a widened one), an f64 engine's as f64.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Values {
    pub fn data(&self) -> Data<'_> {
        match self {
            Values::F32(v) => Data::F32(v),
            Values::F64(v) => Data::F64(v),
        }
    }

    /// A widened copy (the few comparisons that need f64 values: MoE routing).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Values::F64(v) => v.clone(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rows `rows` (along the middle axis) of a `(heads, len, width)` tensor, heads first: the
/// part of a cache a call compares. `None` for a sketch (traces keep caches as rows).
pub fn gather_rows(data: Data<'_>, shape: &[usize], rows: &[std::ops::Range<usize>]) -> Option<Values> {
    let &[heads, len, width] = shape else { return None };
    fn pick<T: Copy>(d: &[T], heads: usize, len: usize, width: usize, rows: &[std::ops::Range<usize>]) -> Vec<T> {
        let mut out = Vec::with_capacity(heads * width * rows.iter().map(|r| r.len()).sum::<usize>());
        for h in 0..heads {
            for r in rows {
                out.extend_from_slice(&d[(h * len + r.start) * width..(h * len + r.end) * width]);
            }
        }
        out
    }
    match data {
        Data::F32(d) => Some(Values::F32(pick(d, heads, len, width, rows))),
        Data::F64(d) => Some(Values::F64(pick(d, heads, len, width, rows))),
        Data::Sketch(_) | Data::TopK(_) | Data::TopKRow(..) => None,
    }
}

impl From<Vec<f64>> for Values {
    fn from(v: Vec<f64>) -> Values {
        Values::F64(v)
    }
}

/// [`tensor_metrics`] of engine data (f64) or reference data against reference data.
pub fn metrics_data(a: Data<'_>, b: Data<'_>) -> TensorMetrics {
    use Data::*;
    match (a, b) {
        (F32(a), F32(b)) => tensor_metrics(a, b),
        (F32(a), F64(b)) => tensor_metrics(a, b),
        (F64(a), F32(b)) => tensor_metrics(a, b),
        (F64(a), F64(b)) => tensor_metrics(a, b),
        // A site a trace keeps as a sketch: compare sketches.
        (a, b) => sketch::metrics(&a.sketch(), &b.sketch()),
    }
}

/// [`logit_metrics`] on borrowed data.
pub fn logit_metrics_data(a: Data<'_>, b: Data<'_>) -> LogitMetrics {
    use Data::*;
    match (a, b) {
        (F32(a), F32(b)) => logit_metrics(a, b),
        (F32(a), F64(b)) => logit_metrics(a, b),
        (F64(a), F32(b)) => logit_metrics(a, b),
        (F64(a), F64(b)) => logit_metrics(a, b),
        (F32(a), TopKRow(t, r)) => {
            let (ids, v, lse) = t.row(r);
            logit_metrics_topk(a, &ids, v, lse)
        }
        (F64(a), TopKRow(t, r)) => {
            let (ids, v, lse) = t.row(r);
            logit_metrics_topk(a, &ids, v, lse)
        }
        _ => unreachable!("the engine's logits rows are in full; a trace's are rows (checked when a trace is loaded)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_rows_are_each_heads_rows_in_order() {
        // (2 heads, 4 positions, width 2): value = 100 h + 10 p + w.
        let d: Vec<f32> = (0..2).flat_map(|h| (0..4).flat_map(move |p| (0..2).map(move |w| (100 * h + 10 * p + w) as f32))).collect();
        let got = gather_rows(Data::F32(&d), &[2, 4, 2], &[0..1, 3..4]).unwrap();
        assert_eq!(got, Values::F32(vec![0.0, 1.0, 30.0, 31.0, 100.0, 101.0, 130.0, 131.0]));
    }
}
