//! Generation on the engine alone (greedy, or with a [`crate::sample::Sampler`]): prefill the prompt, then feed one token per
//! step through the same [`Decoder::forward`], carrying the [`KvCache`].

use candle_core::{DType, IndexOp, Tensor};

use crate::error::Result;
use crate::decoder::Decoder;

/// Index of the largest value of a 1-D tensor (first one on ties).
pub fn argmax(logits: &Tensor) -> Result<u32> {
    let v: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// Generates up to `max_new` tokens greedily after `prompt`; stops after an id in `stop`.
pub fn generate_greedy(model: &dyn Decoder, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    // The sequence's length is known: the cache's buffers are allocated once.
    cache.reserve(prompt.len() + max_new)?;
    let mut out = Vec::with_capacity(max_new);
    let mut feed = prompt.to_vec();
    for _ in 0..max_new {
        let logits = model.forward(&feed, &mut cache, None)?;
        let last = logits.i(logits.dim(0)? - 1)?;
        let next = argmax(&last)?;
        out.push(next);
        if stop.contains(&next) {
            break;
        }
        feed = vec![next];
    }
    Ok(out)
}

/// Generates up to `max_new` tokens after `prompt` with `sampler` (greedy or seeded
/// sampling, see [`crate::sample`]); stops after an id in `stop`. The repetition penalty
/// sees the prompt and everything generated, as transformers' and mlx-lm's do.
pub fn generate_sampled(
    model: &dyn Decoder,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    sampler: &mut crate::sample::Sampler,
) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    // The sequence's length is known: the cache's buffers are allocated once.
    cache.reserve(prompt.len() + max_new)?;
    let mut out = Vec::with_capacity(max_new);
    let mut seq = prompt.to_vec();
    let mut feed = prompt.to_vec();
    for _ in 0..max_new {
        let logits = model.forward(&feed, &mut cache, None)?;
        let last: Vec<f32> = logits.i(logits.dim(0)? - 1)?.to_dtype(DType::F32)?.to_vec1()?;
        let (next, _) = sampler.next(&last, &seq)?;
        out.push(next);
        seq.push(next);
        if stop.contains(&next) {
            break;
        }
        feed = vec![next];
    }
    Ok(out)
}
