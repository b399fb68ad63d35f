//! Golden traces: the trace format and its replay ([`trace`]), recording ([`record`]), the
//! golden cases of `snapshots/traces/manifest.toml` ([`manifest`]) and the parity summary
//! that `cargo test` snapshots with insta ([`parity`]), compared at the precision lockstep
//! claims on every CPU ([`printed`]).

pub mod assert;
pub mod manifest;
pub mod parity;
pub mod printed;
pub mod record;
pub mod trace;

pub use assert::{assert_parity, assert_summary, Golden};
