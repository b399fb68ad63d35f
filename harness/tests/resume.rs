//! `lockstep report` resumes on the suite's cases and the identity of the code that ran them
//! (crate::identity), not on the binary's size and mtime: the same bytes with a new mtime
//! (a rebuild of the same code, a copy, an install) resume every finished case; changed code
//! re-runs them. No Python: the cases run the engine against itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use common::{run, tmp};

const SUITE: &str = r#"
[suite]
name = "resume"
about = "two cases that need no Python"

[[case]]
name = "hf"
model = "tiny"
references = ["engine"]
prompt = "hello"
steps = 2

[[case]]
name = "gguf"
model = "tiny-gguf"
references = ["engine"]
prompt = "hello"
steps = 2
"#;

/// (contents, mtime) of each case file.
fn cases(out: &Path) -> Vec<(String, SystemTime)> {
    ["hf", "gguf"]
        .iter()
        .map(|n| {
            let p = out.join("cases").join(format!("{n}.json"));
            (std::fs::read_to_string(&p).unwrap(), std::fs::metadata(&p).unwrap().modified().unwrap())
        })
        .collect()
}

fn build_of(case_json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(case_json).unwrap();
    v["build"].as_str().unwrap().to_string()
}

fn report(bin: &Path, dir: &Path, home: &Path, env: &[(&str, &Path)]) {
    let mut c = Command::new(bin);
    c.args(["report", "--suite", "suite.toml", "--out", "out"])
        .current_dir(dir)
        .env("HOME", home)
        .env_remove("LOCKSTEP_REFERENCES")
        .env_remove(lockstep::report::nightly::WORKER_ENV);
    for (k, v) in env {
        c.env(k, v);
    }
    let (code, out, err) = run(&mut c);
    assert_eq!(code, 0, "{} report:\nstdout:\n{out}\nstderr:\n{err}", bin.display());
}

#[test]
fn a_report_resumes_on_the_code_not_on_the_binary_mtime() {
    let dir = tmp("resume");
    let home = dir.join("home");
    std::fs::write(dir.join("suite.toml"), SUITE).unwrap();
    let checkout_bin = PathBuf::from(env!("CARGO_BIN_EXE_lockstep"));
    report(&checkout_bin, &dir, &home, &[]);
    let first = cases(&dir.join("out"));

    // The same bytes with a new mtime, elsewhere (as a rebuild of the same code, or an install).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let copy = dir.join("bin/lockstep");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(&checkout_bin, &copy).unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&checkout_bin).unwrap());
    assert_ne!(
        std::fs::metadata(&copy).unwrap().modified().unwrap(),
        std::fs::metadata(&checkout_bin).unwrap().modified().unwrap(),
        "the copy must have another mtime"
    );
    report(&copy, &dir, &home, &[]);
    assert_eq!(cases(&dir.join("out")), first, "a binary with the same bytes re-ran finished cases");

    // Changed code: references that differ by one comment give another identity; every case runs again.
    let refs = dir.join("references");
    std::fs::create_dir_all(&refs).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../references");
    for e in std::fs::read_dir(&src).unwrap().flatten().filter(|e| e.path().is_file()) {
        std::fs::copy(e.path(), refs.join(e.file_name())).unwrap();
    }
    let protocol = refs.join("protocol.py");
    let text = std::fs::read_to_string(&protocol).unwrap() + "\n# changed\n";
    std::fs::write(&protocol, text).unwrap();
    report(&copy, &dir, &home, &[("LOCKSTEP_REFERENCES", &refs)]);
    let rerun = cases(&dir.join("out"));
    for (k, ((old_text, old_mtime), (new_text, new_mtime))) in first.iter().zip(&rerun).enumerate() {
        assert_ne!(old_mtime, new_mtime, "case {k} was not run again after the code changed");
        assert_ne!(build_of(old_text), build_of(new_text), "case {k}: the identity did not change");
    }
    // ... and the changed code resumes its own cases.
    report(&copy, &dir, &home, &[("LOCKSTEP_REFERENCES", &refs)]);
    assert_eq!(cases(&dir.join("out")), rerun);
    let _ = std::fs::remove_dir_all(&dir);
}
