//! The command line: its flags ([`args`]) and one function per command ([`commands`]), and
//! the entry points: [`main`] (the `lockstep` binary) and [`main_with`], which a user's
//! binary calls with its own engine plugged in, so that `run`, `bisect`, `report`, `record`
//! and `replay` check that engine.

pub mod args;
pub mod commands;

use std::process::ExitCode;

use clap::Parser;

use crate::plugin::{EngineSpec, Plugin};
use args::Cli;
use commands::{dispatch, Outcome};

/// The `lockstep` command line with the bundled engine under test (or `--engine python:...`).
pub fn main() -> ExitCode {
    run_cli(None)
}

/// The `lockstep` command line with `plugin` as the engine under test: a user's binary is
/// `fn main() -> ExitCode { lockstep::cli::main_with(Plugin::new("my-engine", my_engine::load)) }`.
/// `--engine bundled` (or `python:...`) still selects another engine.
pub fn main_with(plugin: Plugin) -> ExitCode {
    run_cli(Some(plugin))
}

fn run_cli(plugin: Option<Plugin>) -> ExitCode {
    let cli = Cli::parse();
    let spec = match (cli.engine.as_deref(), plugin) {
        (Some(s), _) => EngineSpec::parse(s),
        (None, Some(p)) => Ok(EngineSpec::Plugin(p)),
        (None, None) => Ok(EngineSpec::Bundled),
    };
    let outcome = spec.and_then(|s| {
        EngineSpec::set_under_test(s);
        dispatch(cli.cmd)
    });
    match outcome {
        Ok(Outcome::Pass) => ExitCode::from(0),
        Ok(Outcome::Diverged) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
