//! The lockstep loop: the run's options, one teacher-forced step on every side, and the
//! judgement of each step against the references and their noise floor.

pub mod judge;
pub mod options;
pub mod run;
