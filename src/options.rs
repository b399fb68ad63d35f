//! How to load a model: the compute dtype, how GGUF matrices are held, how the KV cache stores
//! K and V, injected faults, and a LoRA adapter.

use candle_core::DType;

use crate::cache::KvDtype;
use crate::faults::Faults;
use crate::lora::{LoraAdapter, LoraOptions};
use crate::quant::WeightsMode;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; dense weights are converted (GGUF: dequantized) to it. F32 or F64.
    pub dtype: DType,
    /// How GGUF matrices are held; `None` picks quantized for a GGUF file in f32 and dense
    /// otherwise (Hugging Face weights are dense, and quantized kernels compute in f32).
    pub weights: Option<WeightsMode>,
    /// Injected faults (`crate::faults`), none in normal use.
    pub faults: Faults,
    /// A LoRA adapter to attach (`--lora DIR`), and how.
    pub lora: Option<LoraOptions>,
    /// How the caches the model makes ([`crate::Decoder::new_cache`]) store K and V: as
    /// computed (the default) or in f16, as llama.cpp does by default.
    pub kv_cache: KvDtype,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, weights: None, faults: Faults::none(), lora: None, kv_cache: KvDtype::default() }
    }
}

impl LoadOptions {
    /// The adapter of `lora`, loaded and checked against `cfg` (`None` without one).
    pub fn adapter(&self, cfg: &crate::Config) -> crate::Result<Option<LoraAdapter>> {
        self.lora.as_ref().map(|l| LoraAdapter::load(&l.dir, cfg)).transpose()
    }
}
