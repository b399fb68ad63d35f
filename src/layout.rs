//! Q/K layouts and the named transform that maps the engine's tensors to the
//! Hugging Face layout used for every comparison (docs/contract.md, "Canonical site names").
//!
//! Hugging Face checkpoints use the *half-split* RoPE convention: within each head,
//! dimension `i` is rotated with dimension `i + head_dim/2`. GGUF files store Q/K rows
//! permuted for the *interleaved* convention (llama.cpp's `convert_hf_to_gguf.py`
//! `permute`): dimension `2i` is rotated with `2i + 1`. The permutation, per head, is
//!
//! ```text
//! GGUF row  h*hd + 2i + j   <->   HF row  h*hd + j*hd/2 + i      (i < hd/2, j ∈ {0,1})
//! ```
//!
//! (the inverse is transformers' `_reverse_permute_weights` in
//! `modeling_gguf_pytorch_utils.py`). Running interleaved RoPE on GGUF-ordered Q/K gives
//! exactly the HF result with its last dimension permuted, so the engine keeps the GGUF
//! order and the transform [`QkLayout::to_hf`] (named `gguf-qk-deinterleave`) maps its
//! `q`, `k`, `q_rope`, `k_rope` and `cache_k` captures back. `v` is never permuted.

use candle_core::{Tensor, D};

use crate::error::Result;

/// Which RoPE convention the Q/K weights are stored for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkLayout {
    /// Hugging Face order, half-split (`rotate_half`) RoPE.
    HalfSplit,
    /// GGUF order, interleaved (GPT-J style, "traditional") RoPE.
    Interleaved,
}

impl QkLayout {
    /// Name of the transform applied by [`QkLayout::to_hf`], shown in reports.
    pub fn transform_name(&self) -> Option<&'static str> {
        match self {
            QkLayout::HalfSplit => None,
            QkLayout::Interleaved => Some("gguf-qk-deinterleave"),
        }
    }

    /// Whether a site's tensor is stored in this Q/K layout (and so needs [`Self::to_hf`]).
    pub fn affects_site(site: &str) -> bool {
        let leaf = site.rsplit('.').next().unwrap_or(site);
        matches!(leaf, "q" | "k" | "q_rope" | "k_rope" | "cache_k")
    }

    /// Maps a tensor whose last dimension is `n * head_dim` (heads concatenated) or
    /// `head_dim` from this layout to the HF layout. Identity for `HalfSplit`.
    pub fn to_hf(&self, t: &Tensor, head_dim: usize) -> Result<Tensor> {
        match self {
            QkLayout::HalfSplit => Ok(t.clone()),
            QkLayout::Interleaved => {
                let dims = t.dims().to_vec();
                let last = *dims.last().unwrap_or(&0);
                let heads = last / head_dim;
                // (..., heads, hd/2, 2) -> (..., heads, 2, hd/2)
                let mut split = dims[..dims.len() - 1].to_vec();
                split.extend([heads, head_dim / 2, 2]);
                let out = t.reshape(split)?.transpose(D::Minus1, D::Minus2)?.contiguous()?;
                Ok(out.reshape(dims)?)
            }
        }
    }

    /// Inverse of [`Self::to_hf`]: maps an HF-ordered tensor to this layout.
    pub fn from_hf(&self, t: &Tensor, head_dim: usize) -> Result<Tensor> {
        match self {
            QkLayout::HalfSplit => Ok(t.clone()),
            QkLayout::Interleaved => {
                let dims = t.dims().to_vec();
                let heads = dims.last().copied().unwrap_or(0) / head_dim;
                let mut split = dims[..dims.len() - 1].to_vec();
                split.extend([heads, 2, head_dim / 2]);
                let out = t.reshape(split)?.transpose(D::Minus1, D::Minus2)?.contiguous()?;
                Ok(out.reshape(dims)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn deinterleave_matches_the_documented_row_map() {
        let hd = 8;
        let heads = 2;
        let gguf: Vec<f32> = (0..heads * hd).map(|x| x as f32).collect();
        let t = Tensor::from_vec(gguf.clone(), (1, heads * hd), &Device::Cpu).unwrap();
        let hf = QkLayout::Interleaved.to_hf(&t, hd).unwrap().flatten_all().unwrap();
        let hf: Vec<f32> = hf.to_vec1().unwrap();
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    assert_eq!(hf[h * hd + j * hd / 2 + i], gguf[h * hd + 2 * i + j]);
                }
            }
        }
        let back = QkLayout::Interleaved.from_hf(&Tensor::from_vec(hf, (1, heads * hd), &Device::Cpu).unwrap(), hd).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), gguf);
    }
}
