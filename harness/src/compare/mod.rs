//! Comparing: pure functions from two tensors (or two logit vectors) and a tolerance to a
//! record. No model, no Python: [`metrics`] computes distances over slices, [`sketch`] keeps
//! a comparable fixed-size summary of a tensor, [`data`] dispatches both over borrowed
//! reference data, and [`tolerance`] holds the one table of bounds (each with its source)
//! and turns distances into verdicts.

pub mod data;
pub mod metrics;
pub mod routing;
pub mod sketch;
pub mod tolerance;

pub use data::{logit_metrics_data, metrics_data, Data};
pub use metrics::{LogitMetrics, TensorMetrics};
