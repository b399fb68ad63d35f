//! The run's records: data only, at the bottom of the harness. The loop, the checks and
//! bisect fill them; the reports and golden traces read them.

pub mod checks;
pub mod run;
