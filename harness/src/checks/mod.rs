//! The checks a run makes beside the per-site comparison, each a computation over what the
//! sides report: the generation config ([`genconfig`]), the sampler on the same logits
//! ([`sampler`]), the tokenizer and chat template ([`tokcheck`]), a LoRA adapter's inventory
//! and effect ([`lora`]), and a GGUF file's dequantization ([`quantcheck`]). Their records
//! live in [`crate::results`].

pub mod genconfig;
pub mod lora;
pub mod quantcheck;
pub mod sampler;
pub mod tokcheck;
