//! The lockstep engine: native decoder-only model families on `candle-core`, behind one
//! trait.
//!
//! Everything outside this crate drives a model through [`Decoder`] (forward with an
//! explicit [`KvCache`] and optional [`Capture`], a description [`ModelInfo`], the model's
//! [`SiteGraph`], one layer in isolation). The crate owns: the site vocabulary ([`sites`]),
//! the shared building blocks ([`blocks`]: norms, RoPE, attention, softmax, activations), one
//! file per family under [`models`] with the registry that picks a family from
//! `model_type` / `general.architecture`, configuration ([`config`]), the tensor table families load
//! their weights with ([`tensors`]), GGUF files and the Llama-shaped weights ([`weights`],
//! [`quant`]), the cache ([`cache`]), the Q/K
//! layout transforms ([`layout`]), the tokenizer and chat template ([`tokenizer`]), samplers
//! ([`sample`]), generation ([`generate`]), LoRA adapters ([`lora`]), the fault catalog
//! ([`faults`]) and model loading as one call ([`loader`]). It never imports the harness.

pub mod blocks;
pub mod cache;
pub mod config;
pub mod decoder;
pub mod error;
pub mod faults;
pub mod generate;
pub mod gguf;
pub mod layout;
pub mod models;
pub mod moe;
pub mod options;
pub mod plan;
pub use models::llama;
pub mod loader;
pub mod lora;
pub mod quant;
pub mod rope;
pub mod sample;
pub mod sites;
pub mod softmax;
pub mod taps;
pub mod tensors;
pub mod threads;
pub mod tokenizer;
pub mod weights;

pub use cache::{CacheKind, KvCache, KvDtype};
pub use decoder::{Capabilities, Decoder, ModelInfo};
pub use config::Config;
pub use error::{EngineError, Result};
pub use faults::{Fault, Faults};
pub use layout::QkLayout;
pub use plan::{LayerPlan, RopePlan, Span};
pub use llama::Llama;
pub use loader::{load, LoadOptions, LoadedModel, WeightsOrigin};
pub use sites::{Site, SiteGraph, SiteKind};
pub use lora::{LoraAdapter, LoraMode, LoraOptions};
pub use quant::{Linear, WeightsMode};
pub use sample::{Order, SamplerConfig, Sampler};
pub use taps::Capture;
pub use tokenizer::{ChatMessage, Tokenizer};
