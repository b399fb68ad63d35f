//! The `lockstep` command line: parse the flags, run one command, decide the exit code once:
//! 0 when everything compared passes (drift allowed), 1 when something diverged, 2 for a
//! usage or input error (with a message that says what, where and what to do).

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::args::Cli;
use cli::commands::{dispatch, Outcome};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(Outcome::Pass) => ExitCode::from(0),
        Ok(Outcome::Diverged) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
