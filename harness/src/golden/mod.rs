//! Golden traces: the trace format and its replay ([`trace`]), recording ([`record`]), the
//! golden cases of `snapshots/traces/manifest.toml` ([`manifest`]) and the parity summary
//! that `cargo test` snapshots with insta ([`parity`]).

pub mod assert;
pub mod manifest;
pub mod parity;
pub mod record;
pub mod trace;

pub use assert::{assert_parity, Golden};
