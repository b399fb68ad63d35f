//! The `lockstep` command line (`lockstep::cli`): parse the flags, run one command, decide
//! the exit code once: 0 when everything compared passes (drift allowed), 1 when something
//! diverged, 2 for a usage or input error (with a message that says what, where and what to
//! do).

fn main() -> std::process::ExitCode {
    lockstep::cli::main()
}
