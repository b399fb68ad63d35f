// Embeds the rpath of the libpython that pyo3 was configured with, so the binary loads
// the same interpreter as the reference venv (pyenv's), not Debian's (docs/traps.md).
//
// Also sets `cfg(lockstep_live)` when the reference environment exists ($LOCKSTEP_VENV, else
// the repository's .venv): the live-reference tests of tests/cli.rs run then, and are
// listed as ignored, with the command that enables them, where it does not (a machine with
// no Python reference environment still runs every replay of tests/replay.rs). `make test`
// creates the environment and sets LOCKSTEP_REQUIRE_LIVE=1, under which a missing
// environment is a test failure, not an ignored test.
use std::path::PathBuf;

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    println!("cargo::rustc-check-cfg=cfg(lockstep_live)");
    println!("cargo::rerun-if-env-changed=LOCKSTEP_VENV");
    println!("cargo::rerun-if-changed=build.rs");
    let venv = match std::env::var_os("LOCKSTEP_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("../.venv"),
    };
    let python = venv.join("bin/python");
    if python.exists() {
        // Watched only while it exists: a missing path would make cargo rebuild every time.
        println!("cargo::rerun-if-changed={}", python.display());
        println!("cargo::rustc-cfg=lockstep_live");
    }
}
