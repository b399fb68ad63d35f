//! Helpers shared by the integration tests: the binary, the reference environment, temp dirs,
//! and [`live_test!`], the one declaration of a test that needs the reference environment.
#![allow(dead_code)]

/// A test that needs the reference environment (the Python venv with transformers, MLX and
/// llama.cpp). Where the environment did not exist at build time (`harness/build.rs` sets
/// `cfg(lockstep_live)` when it does), the test is built as ignored, with the command that
/// enables it; `make test` sets LOCKSTEP_REQUIRE_LIVE=1, under which that is a failure
/// (tests/cli.rs), so in CI every live test runs.
#[macro_export]
macro_rules! live_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        #[cfg_attr(not(lockstep_live), ignore = "needs the reference environment: run `make setup` or `make test` (or set LOCKSTEP_VENV)")]
        fn $name() $body
    };
}

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn venv_path() -> PathBuf {
    std::env::var_os("LOCKSTEP_VENV").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| repo().join(".venv"))
}

pub fn venv() -> PathBuf {
    let v = venv_path();
    assert!(
        v.join("bin/python").exists(),
        "the reference environment is missing at {}: run `make setup` (or `make test`, which does it)",
        v.display()
    );
    v
}

pub fn lockstep() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    // Not asserted here: the tests of bad input need no Python. A live test without the
    // environment fails with the binary's own message (`make setup`); where the environment
    // did not exist at build time, live tests are built as ignored (harness/build.rs).
    c.env("LOCKSTEP_VENV", venv_path()).env_remove("LOCKSTEP_REFERENCES").env_remove("RUST_BACKTRACE");
    c
}

pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = cmd.output().expect("lockstep runs");
    (status.code().unwrap_or(-1), String::from_utf8_lossy(&stdout).into(), String::from_utf8_lossy(&stderr).into())
}

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lockstep-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `lockstep ARGS --json FILE` in a temp dir of its own (`name`): the exit code, stdout and
/// stderr together, and the JSON (`Null` when none was written).
pub fn run_with_json(name: &str, args: &[&str]) -> (i32, String, serde_json::Value) {
    let json = tmp(name).join("r.json");
    let (code, out, err) = run(lockstep().args(args).arg("--json").arg(&json));
    let v = std::fs::read_to_string(&json).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(serde_json::Value::Null);
    (code, format!("{out}{err}"), v)
}

/// Runs the binary and asserts exit code 2, no panic, and every needle in stderr.
pub fn assert_exit_2(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let mut cmd = lockstep();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 2, "{args:?}: stdout:\n{out}\nstderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks {n:?}:\n{err}");
    }
}

/// [`live_test!`] for property tests: `proptest!`'s syntax, each test needing the reference
/// environment.
#[macro_export]
macro_rules! live_proptest {
    ($(#![$($cfg:tt)*])? $($(#[$meta:meta])* fn $name:ident($($args:tt)*) $body:block)*) => {
        proptest::proptest! {
            $(#![$($cfg)*])?
            $(
                $(#[$meta])*
                #[test]
                #[cfg_attr(not(lockstep_live), ignore = "needs the reference environment: run `make setup` or `make test` (or set LOCKSTEP_VENV)")]
                fn $name($($args)*) $body
            )*
        }
    };
}

