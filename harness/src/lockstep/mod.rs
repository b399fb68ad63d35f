//! The lockstep loop, in small pieces: the run's options ([`options`]), the prompt check
//! ([`prompt`]), one step on every side and its comparisons ([`step`]), the judgement of a
//! site and of the next-token distribution against the tolerances and the noise floor
//! ([`judge`]), the free-running check ([`free_running`]), the verdicts over the run
//! ([`summary`]), and the protocol that sequences them ([`run`]).

pub mod free_running;
pub mod judge;
pub mod memory;
pub mod options;
pub mod prompt;
pub mod run;
pub mod step;
pub mod summary;
