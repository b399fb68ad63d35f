//! The lockstep harness: runs an engine under test — the bundled `lockstep-engine`, a user's
//! Rust engine behind `lockstep_engine::Decoder`, or a Python one — in lockstep with Python
//! references embedded through pyo3, compares every site both declare, and reports the
//! first divergence.
//!
//! As a library: [`Lockstep`] (a builder: run or bisect an engine, get the report),
//! [`golden::assert_parity`] (golden traces in your own `cargo test`, without Python) and
//! [`cli::main_with`] (the whole command line with your engine plugged in).
//!
//! Modules, top down: [`cli`] (flags, one function per command), [`api`], [`report`]
//! (table, JSON, suites, HTML), [`golden`] (traces, record, replay, parity), [`bisect`] and
//! [`diagnosis`], [`lockstep`] (the protocol: options, prompt, step, judge, summary, run),
//! [`checks`] (generation config, sampler, tokenizer, LoRA, quant-check), [`plugin`] (which
//! engine is under test), [`reference`] (one `Backend` trait: live Python references, the
//! engine as a reference, a Python engine), [`results`] (records), [`compare`] (metrics and
//! the tolerance table), [`models`] (aliases), [`paths`] (where things are: the checkout, or the files
//! [`embedded`] in the binary), [`identity`] (what a report's resume keys on), [`doctor`].

pub mod api;
pub mod bench;
pub mod bisect;
pub mod checks;
pub mod cli;
pub mod compare;
pub mod diagnosis;
pub mod doctor;
pub mod embedded;
pub mod error;
pub mod golden;
pub mod identity;
pub mod interrupt;
pub mod lockstep;
pub mod models;
pub mod paths;
pub mod plugin;
pub mod reference;
pub mod report;
pub mod results;
pub mod supervise;
pub mod ui;

pub use api::{Lockstep, Report};
pub use error::HarnessError;
pub use plugin::{EngineSpec, Plugin};
