//! An installed `lockstep` works outside the checkout (docs/install.md): `cargo install --path
//! harness` into a temporary root, then the installed binary, run from another directory
//! with a bare environment (PATH, HOME — a fresh one —, LOCKSTEP_VENV), finds its Python
//! references and fixtures in the files embedded in it, records a trace where an installed
//! binary records by default (~/.local/share/lockstep/traces), and replays it by name and by
//! path.
//!
//! Slow only the first time: the install reuses this build's target directory, so with a
//! warm target it is about a second (the harness is rebuilt once if `cargo test` built it
//! with other features).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{run, tmp, venv};

fn target_dir() -> PathBuf {
    // CARGO_BIN_EXE_lockstep is TARGET/release/lockstep.
    Path::new(env!("CARGO_BIN_EXE_lockstep")).parent().and_then(Path::parent).expect("TARGET/release/lockstep").to_path_buf()
}

/// The installed binary with nothing of the checkout's environment: HOME is `home`.
fn installed(bin: &Path, home: &Path, cwd: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("LOCKSTEP_VENV", venv())
        .current_dir(cwd);
    c
}

fn verdict(json: &Path) -> String {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    v["verdict"].as_str().unwrap_or_default().to_string()
}

live_test! {
    fn cargo_install_gives_a_binary_that_runs_outside_the_checkout() {
        let dir = tmp("install");
        let root = dir.join("root");
        let t0 = Instant::now();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let harness = Path::new(env!("CARGO_MANIFEST_DIR"));
        let (code, out, err) = run(Command::new(&cargo)
            .args(["install", "--locked", "--offline", "--path"])
            .arg(harness)
            .arg("--root")
            .arg(&root)
            .arg("--target-dir")
            .arg(target_dir())
            // pyo3 links the reference environment's libpython (as the checkout's build does).
            .env("PYO3_PYTHON", venv().join("bin/python"))
            .env("LOCKSTEP_VENV", venv()));
        assert_eq!(code, 0, "cargo install:\n{out}\n{err}");
        eprintln!("cargo install --path harness (target {}): {:.1} s", target_dir().display(), t0.elapsed().as_secs_f64());
        let bin = root.join("bin/lockstep");
        assert!(bin.is_file(), "{err}");

        let home = dir.join("home");
        let work = dir.join("work");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&work).unwrap();

        // A live run on the tiny fixture: references and fixture from the embedded files.
        let (code, out, err) = run(installed(&bin, &home, &work)
            .args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", "hello", "--steps", "4", "--json", "run.json"]));
        assert_eq!(code, 0, "installed run:\n{out}\n{err}");
        assert_eq!(verdict(&work.join("run.json")), "pass");
        let embedded = std::fs::read_dir(home.join(".cache/lockstep/embedded")).expect("the embedded files were written out").flatten().map(|e| e.path()).collect::<Vec<_>>();
        assert_eq!(embedded.len(), 1, "{embedded:?}");
        assert!(embedded[0].join("references/protocol.py").is_file());
        assert!(embedded[0].join("snapshots/models/tiny-llama/model.safetensors").is_file());
        let repo = harness.parent().unwrap();
        let report = std::fs::read_to_string(work.join("run.json")).unwrap();
        assert!(!report.contains(&repo.display().to_string()), "the installed binary used the checkout {}:\n{report}", repo.display());

        // record writes where an installed binary keeps traces; trace:NAME reads from there.
        let (code, out, err) = run(installed(&bin, &home, &work)
            .args(["record", "--model", "tiny", "--reference", "transformers", "--prompt", "hello", "--steps", "3", "--name", "mine"]));
        assert_eq!(code, 0, "installed record:\n{out}\n{err}");
        let traces = home.join(".local/share/lockstep/traces");
        assert!(traces.join("mine.json").is_file() && traces.join("mine.safetensors").is_file(), "{out}");
        let (code, out, err) = run(installed(&bin, &home, &work)
            .args(["run", "--model", "tiny", "--reference", "trace:mine", "--prompt", "hello", "--steps", "3", "--json", "replay.json"]));
        assert_eq!(code, 0, "run against trace:mine:\n{out}\n{err}");
        assert_eq!(verdict(&work.join("replay.json")), "pass");
        // ... and a trace's path replays from anywhere, without Python.
        let (code, out, err) = run(installed(&bin, &home, &dir)
            .env("LOCKSTEP_VENV", "/nonexistent")
            .arg("replay")
            .arg(traces.join("mine.json"))
            .args(["--json", "by-path.json"]));
        assert_eq!(code, 0, "replay by path:\n{out}\n{err}");
        assert_eq!(verdict(&dir.join("by-path.json")), "pass");

        // doctor: everything needed is there (the model store and Chromium are optional).
        let (code, out, err) = run(installed(&bin, &home, &work).arg("doctor"));
        assert_eq!(code, 0, "installed doctor:\n{out}\n{err}");
        assert!(out.contains("embedded in the binary"), "{out}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
