//! Reports: the terminal table and the JSON report of one run ([`table`]), and `lockstep
//! report`: suites of cases ([`suite`]), running them with resume, shards and history
//! ([`nightly`]), and the self-contained HTML page ([`html`]); JUnit XML for CI ([`junit`]).

pub mod bounds;
pub mod html;
pub mod junit;
pub mod nightly;
pub mod records;
pub mod suite;
pub mod table;
