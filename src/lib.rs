//! The lockstep engine: a native Llama-family decoder on `candle-core`.
//!
//! This crate owns everything needed to run a model without Python: configuration
//! ([`config`]), weights from Hugging Face directories and GGUF files ([`weights`]),
//! the explicit KV cache ([`cache`]), the forward pass with its observation taps
//! ([`llama`], [`taps`]), the Q/K layout transforms ([`layout`]), the tokenizer and chat
//! template ([`tokenizer`]), samplers ([`sample`]), generation ([`generate`]), LoRA adapters ([`lora`]) and model loading as one
//! call ([`loader`]). It never imports the harness: the harness drives it through this
//! public API.

pub mod cache;
pub mod config;
pub mod error;
pub mod faults;
pub mod generate;
pub mod layout;
pub mod models;
pub use models::llama;
pub mod loader;
pub mod lora;
pub mod quant;
pub mod sample;
pub mod sites;
pub mod taps;
pub mod threads;
pub mod tokenizer;
pub mod weights;

pub use cache::KvCache;
pub use config::Config;
pub use error::{EngineError, Result};
pub use faults::{Fault, Faults};
pub use layout::QkLayout;
pub use llama::Llama;
pub use loader::{load, LoadOptions, LoadedModel, WeightsOrigin};
pub use lora::{LoraAdapter, LoraMode, LoraOptions};
pub use quant::{Linear, WeightsMode};
pub use sample::{Order, SamplerConfig, Sampler};
pub use taps::Capture;
pub use tokenizer::{ChatMessage, Tokenizer};
