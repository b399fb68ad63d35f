//! The lockstep harness: runs the `lockstep-engine` in lockstep with a Python reference
//! embedded through pyo3, compares every site, and reports the first divergence.
//!
//! - [`python`]: the reference environment, the embedded interpreter, reference objects
//! - [`driver`]: the lockstep protocol (prefill, then one teacher-forced token per step)
//! - [`compare`]: tensor and logit comparators
//! - [`tolerance`]: the one table of tolerances, with sources
//! - [`report`]: the printed table and the JSON report
//! - [`models`]: model aliases
//! - [`trace`], [`record`], [`sketch`]: golden traces (recorded reference answers replayed
//!   without Python as `--reference trace:NAME`), recording them, and the sketches that
//!   summarize the sites a trace does not keep in full
//! - [`manifest`], [`parity`]: the golden cases of `snapshots/traces/manifest.toml`, their
//!   replay and the parity summary that `cargo test` snapshots with insta
//! - [`lora`]: the checks of a run with a LoRA adapter (inventory diff, adapter effect)
//! - [`sampler_parity`], [`genconfig`], [`tokcheck`]: the sampler, the generation config
//!   and the tokenizer/chat template of each side
//! - [`suite`], [`nightly`], [`html`]: `lockstep report`: suites of cases, running them with
//!   resume, shards and history, and the report pages

pub mod api;
pub mod bench;
pub mod bisect;
pub mod checks;
pub mod cli;
pub mod compare;
pub mod diagnosis;
pub mod error;
pub mod golden;
pub mod lockstep;
pub mod models;
pub mod paths;
pub mod plugin;
pub mod reference;
pub mod report;
pub mod results;

pub use api::{Lockstep, Report};
pub use error::HarnessError;
pub use plugin::{EngineSpec, Plugin};
