//! Standard output that never panics. `println!` panics when stdout is closed
//! (`lockstep run ... | head -1`) or full (`> /dev/full`); the commands print through
//! [`out!`] and [`outln!`] instead:
//!
//! - a closed pipe (EPIPE): the reader has what it wanted; the rest of the output is dropped
//!   quietly and the command ends with its own exit code (the verdict is not lost);
//! - any other write error (a full disk): the output stops, and the command ends with exit
//!   code 2 and one message naming the error ([`finish`]).
//!
//! When a report goes to standard output (`--json -`, `--junit -`), [`human_to_stderr`] sends
//! this human output to stderr instead, so that stdout holds the report alone.

use std::fmt;
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The first write error that was not a closed pipe; `Some("")` once the pipe closed.
static FAILED: Mutex<Option<String>> = Mutex::new(None);

/// The human output goes to stderr: stdout carries a report (`--json -`, `--junit -`).
static TO_STDERR: AtomicBool = AtomicBool::new(false);

/// From now on [`out!`] and [`outln!`] write to stderr (see the module).
pub fn human_to_stderr() {
    TO_STDERR.store(true, Ordering::Relaxed);
}

/// Writes to stdout unless an earlier write failed.
pub fn write(args: fmt::Arguments<'_>) {
    if TO_STDERR.load(Ordering::Relaxed) {
        let _ = std::io::stderr().lock().write_fmt(args);
        return;
    }
    let mut failed = FAILED.lock().unwrap_or_else(|e| e.into_inner());
    if failed.is_some() {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|_| o.flush()) {
        *failed = Some(if e.kind() == ErrorKind::BrokenPipe { String::new() } else { e.to_string() });
    }
}

/// Writes `text` to stdout (as [`write`]).
pub fn write_stdout(text: &str) {
    write(format_args!("{text}"))
}

/// The error to end with, if stdout failed for another reason than a closed pipe.
pub fn finish() -> Option<String> {
    let _ = std::io::stdout().flush();
    FAILED.lock().unwrap_or_else(|e| e.into_inner()).clone().filter(|m| !m.is_empty())
}

/// `print!` that never panics (see the module).
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::output::write(format_args!($($t)*)) };
}

/// `println!` that never panics (see the module).
macro_rules! outln {
    () => { $crate::cli::output::write(format_args!("\n")) };
    ($($t:tt)*) => { $crate::cli::output::write(format_args!("{}\n", format_args!($($t)*))) };
}

pub(crate) use {out, outln};
