//! The command line: its flags ([`args`]) and one function per command ([`commands`]), and
//! the entry points: [`main`] (the `lockstep` binary) and [`main_with`], which a user's
//! binary calls with its own engine plugged in, so that `run`, `bisect`, `report`, `record`
//! and `replay` check that engine.

pub mod args;
pub mod output;
pub mod commands;
pub mod live;

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

/// A lockstep step allocates and frees large buffers (every site of a call, on every side:
/// hundreds of MB on a long prompt). glibc's malloc raises its mmap threshold after such a
/// buffer is freed, so the next ones come from the heap and stay in the process when freed:
/// the peak then grows with every call. A fixed threshold of 1 MiB keeps large buffers in
/// their own mappings, returned to the system when freed (measured: see docs/long-context.md).
fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn run_cli(plugin: Option<Plugin>) -> ExitCode {
    // Errors are for users: candle captures a backtrace into every error value when
    // RUST_BACKTRACE is set, and some of them reach messages. RUST_LIB_BACKTRACE=0 stops
    // that capture while a panic (a bug of ours) still prints its backtrace.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the first thing the process does, before any other thread starts.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    return_large_buffers_to_the_os();
    let cli = Cli::parse();
    let mut ui = crate::ui::Ui::from_flags(cli.quiet, cli.verbose, cli.wide, cli.width, cli.color);
    // A report's worker draws the report's own progress (report::nightly), not a spinner.
    if std::env::var_os(crate::report::nightly::WORKER_ENV).is_some() {
        ui.live = false;
    }
    crate::ui::set(ui);
    let spec = match (cli.engine.as_deref(), plugin) {
        (Some(s), _) => EngineSpec::parse(s),
        (None, Some(p)) => Ok(EngineSpec::Plugin(p)),
        (None, None) => Ok(EngineSpec::Bundled),
    };
    let outcome = spec.and_then(|s| {
        // A Python engine under test is user code: it runs in a worker process whose crash is
        // reported, not lockstep's own (`report` supervises its cases itself).
        if let EngineSpec::Python { path, .. } = &s {
            let supervised = std::env::var_os(crate::supervise::ENGINE_WORKER_ENV).is_some()
                || std::env::var_os(crate::report::nightly::WORKER_ENV).is_some()
                || matches!(cli.cmd, args::Cmd::Report(_));
            if !supervised {
                let name = format!("python:{}", path.display());
                return crate::supervise::run_engine_worker(&name).map(Outcome::Exit);
            }
        }
        EngineSpec::set_under_test(s);
        // A report on stdout (`--json -`, `--junit -`): stdout carries it alone.
        if cli.cmd.report_to_stdout()? {
            output::human_to_stderr();
        }
        dispatch(cli.cmd)
    });
    crate::ui::live_done();
    // stdout closed early is quiet; stdout failing otherwise (a full disk) is an error.
    if let Some(e) = output::finish() {
        if outcome.is_ok() {
            eprintln!("error: writing to standard output: {e}");
            return ExitCode::from(2);
        }
    }
    match outcome {
        Ok(Outcome::Pass) => ExitCode::from(0),
        Ok(Outcome::Diverged) => ExitCode::from(1),
        Ok(Outcome::Exit(code)) => ExitCode::from(code),
        // An error that Ctrl-C caused on its way out is the interruption.
        Err(e) if crate::interrupt::interrupted() && !matches!(e, crate::error::HarnessError::Interrupted) => {
            let e = crate::error::HarnessError::Interrupted;
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
