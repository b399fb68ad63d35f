//! Regression tests for bad runs (issue 21), one per case, in the style of ripgrep's: the
//! input, the command, the exit code and the key words of the message. Bad model files are
//! `bad_files.rs`; these are bad arguments, bad references, closed or full output, Ctrl-C,
//! and a report case that kills its process.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_exit_2, lockstep, repo, run, tmp};

/// A venv path that does not exist: a command that exits 2 with it never reached Python.
fn no_venv() -> String {
    std::env::temp_dir().join("lockstep-no-venv-here").display().to_string()
}

// ----------------------------------------------------------------- output

/// stdout closed before anything is written (`lockstep ... | head -0`).
fn closed_stdout() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    writer
}

#[test]
fn stdout_closed_is_a_quiet_exit_with_the_commands_own_code() {
    let mut cmd = lockstep();
    cmd.arg("faults").stdout(closed_stdout());
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "a closed stdout is quiet: {err}");
}

#[test]
fn stdout_full_is_exit_2_naming_the_error() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let mut cmd = lockstep();
    cmd.arg("faults").stdout(full);
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("writing to standard output") && err.contains("No space left"), "{err}");
}

live_test! {
    /// A run whose reader went away still ends with its verdict: 1 for a divergence.
    fn stdout_closed_keeps_the_verdict() {
        let mut cmd = lockstep();
        cmd.args(["run", "--model", "tiny", "--reference", "transformers", "--steps", "2", "--inject", "rope-theta", "--prompt", "The capital of France is"])
            .stdout(closed_stdout());
        let (code, _, err) = run(&mut cmd);
        assert_eq!(code, 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

// ----------------------------------------------------------------- arguments

#[test]
fn steps_past_the_context_window_are_refused_before_anything_runs() {
    // The tiny models have a 256-position window. LOCKSTEP_VENV points nowhere: an exit 2
    // about the window proves no reference was loaded first.
    let v = no_venv();
    let env = [("LOCKSTEP_VENV", v.as_str())];
    assert_exit_2(
        &["run", "--model", "tiny", "--reference", "transformers", "--steps", "100000", "--prompt", "The capital of France is"],
        &env,
        &["context window is 256", "100000 steps", "246 steps or fewer"],
    );
    assert_exit_2(&["bisect", "--model", "tiny-gguf", "--reference", "llamacpp", "--steps", "300", "--prompt", "The capital of France is"], &env, &["context window is 256"]);
    assert_exit_2(&["generate", "--model", "tiny", "-n", "100000", "--prompt", "The capital of France is"], &env, &["context window is 256", "-n for generate"]);
    // A prompt longer than the window on its own.
    let long = "word ".repeat(400);
    assert_exit_2(&["generate", "--model", "tiny", "-n", "1", "--prompt", &long], &env, &["the prompt alone is longer than the window"]);
}

#[test]
fn a_fault_that_cannot_act_is_refused() {
    let v = no_venv();
    let env = [("LOCKSTEP_VENV", v.as_str())];
    // The tiny model has 3 layers.
    assert_exit_2(&["generate", "--model", "tiny", "--inject", "stale-cache:99", "--prompt", "The capital of France is"], &env, &["--inject stale-cache", "layer 99 does not exist", "3 layers"]);
    assert_exit_2(&["generate", "--model", "tiny", "--inject", "lora-scale", "--prompt", "The capital of France is"], &env, &["--inject lora-scale", "no adapter"]);
    assert_exit_2(&["generate", "--model", "tiny-gguf", "--inject", "q4_1-min", "--prompt", "The capital of France is"], &env, &["--inject q4_1-min", "no Q4_1 tensor"]);
    assert_exit_2(&["generate", "--model", "tiny", "--inject", "qkv-bias-dropped", "--prompt", "The capital of France is"], &env, &["no biases"]);
    assert_exit_2(&["generate", "--model", "tiny", "--inject", "expert-off-by-one", "--prompt", "The capital of France is"], &env, &["not a mixture-of-experts model"]);
    assert_exit_2(&["generate", "--model", "tiny", "--inject", "sampler-temperature", "--prompt", "The capital of France is"], &env, &["greedy"]);
    assert_exit_2(&["generate", "--model", "tiny", "--inject", "raw-prompt", "--prompt", "Hi"], &env, &["not a chat prompt"]);
    // bisect refuses before loading any reference.
    assert_exit_2(&["bisect", "--model", "tiny", "--reference", "transformers", "--inject", "stale-cache:99", "--prompt", "The capital of France is"], &env, &["layer 99 does not exist"]);
    // The faults that apply still run (layer 1 of 3 exists).
    let (code, out, err) = run(lockstep().args(["generate", "--model", "tiny", "--inject", "stale-cache:1", "-n", "3", "--prompt", "The capital of France is"]));
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn a_trace_name_cannot_write_outside_the_traces_directory() {
    let v = no_venv();
    let env = [("LOCKSTEP_VENV", v.as_str())];
    for name in ["../x", "a/b", ".hidden", ""] {
        assert_exit_2(&["record", "--model", "tiny", "--reference", "transformers", "--name", name, "--prompt", "The capital of France is"], &env, &["trace name", "--out DIR"]);
    }
    assert!(!repo().join("snapshots/x.json").exists());
}

#[test]
fn an_unknown_model_alias_in_a_suite_is_exit_2_before_anything_runs() {
    let d = tmp("suite-alias");
    let suite = d.join("s.toml");
    std::fs::write(
        &suite,
        "[suite]\nname = \"s\"\n[[case]]\nname = \"ok\"\nmodel = \"tiny\"\nreferences = [\"transformers\"]\nchat = \"Hi\"\nsteps = 2\n\
         [[case]]\nname = \"bad\"\nmodel = \"tinyy\"\nreferences = [\"transformers\"]\nchat = \"Hi\"\nsteps = 2\n",
    )
    .unwrap();
    let out = d.join("out");
    let v = no_venv();
    assert_exit_2(
        &["report", "--suite", suite.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &[("LOCKSTEP_VENV", v.as_str())],
        &["s.toml", "case `bad`", "model `tinyy`", "known model alias", "tiny-gguf"],
    );
    assert!(!out.join("cases/ok.json").exists(), "nothing ran");
}

#[test]
fn rust_backtrace_does_not_reach_error_messages() {
    // Errors that come out of candle (which captures a backtrace into the error value when
    // RUST_BACKTRACE is set): a GGUF whose last tensor is cut short, a safetensors file cut
    // in half.
    let d = tmp("bt-message");
    let gguf = std::fs::read(repo().join("snapshots/models/tiny-llama.Q4_1.gguf")).unwrap();
    let cut = d.join("cut.gguf");
    std::fs::write(&cut, &gguf[..gguf.len() - 100]).unwrap();
    let st = d.join("model");
    std::fs::create_dir_all(&st).unwrap();
    for e in std::fs::read_dir(repo().join("snapshots/models/tiny-llama")).unwrap().flatten() {
        std::fs::copy(e.path(), st.join(e.file_name())).unwrap();
    }
    let full = std::fs::read(st.join("model.safetensors")).unwrap();
    std::fs::write(st.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    for model in [&cut, &st] {
        for env in [vec![("RUST_BACKTRACE", "1")], vec![("RUST_BACKTRACE", "full"), ("RUST_LIB_BACKTRACE", "1")]] {
            let mut cmd = lockstep();
            cmd.args(["generate", "--model", model.to_str().unwrap(), "--prompt", "The capital of France is"]);
            for (k, v) in &env {
                cmd.env(k, v);
            }
            let (code, _, err) = run(&mut cmd);
            assert_eq!(code, 2, "{err}");
            assert!(!err.contains("panicked"), "{err}");
            assert!(
                !err.contains("backtrace") && !err.contains("   0: ") && !err.contains("at /rustc/") && !err.contains(".rs:"),
                "{env:?}: a backtrace in the message:\n{err}"
            );
            assert_eq!(err.lines().count(), 1, "the message only:\n{err}");
        }
    }
}

// ----------------------------------------------------------------- Ctrl-C

fn sigint(pid: u32) {
    let ok = Command::new("kill").args(["-INT", &pid.to_string()]).status().expect("kill runs").success();
    assert!(ok, "kill -INT {pid}");
}

fn wait_with_timeout(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the process did not stop within {limit:?} of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

live_test! {
    fn ctrl_c_during_run_is_exit_130_and_writes_nothing() {
        let d = tmp("ctrl-c-run");
        let json = d.join("run.json");
        let mut child = lockstep()
            .args(["run", "--model", "tiny", "--reference", "transformers", "--steps", "200", "--prompt", "The capital of France is"])
            .arg("--json")
            .arg(&json)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // While the reference loads or the steps run (200 steps take far longer than this).
        std::thread::sleep(Duration::from_millis(2500));
        sigint(child.id());
        let status = wait_with_timeout(&mut child, Duration::from_secs(60));
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(130), "{err}");
        assert!(err.contains("interrupted (Ctrl-C)"), "{err}");
        assert!(!err.contains("KeyboardInterrupt") && !err.contains("Traceback") && !err.contains("panicked"), "{err}");
        let left: Vec<PathBuf> = std::fs::read_dir(&d).unwrap().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "nothing is written: {left:?}");
    }
}

/// A Python engine (a subclass of the transformers reference: correct) that, on the model
/// `tiny-llama.gguf`, sends itself SIGINT (as Ctrl-C would) or aborts (as a crash in native
/// code would) when the test's environment variable says so.
const MISCHIEF_ENGINE: &str = r#"
import os, signal, time
import protocol, transformers_ref

PROTOCOL = protocol.declare(name="mischief", main_package="transformers", capabilities=[])

class Mischief(transformers_ref.TransformersReference):
    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.target = model.endswith("tiny-llama.gguf")
        self.steps = 0

    def describe(self):
        d = {k: v for k, v in super().describe().items() if k not in transformers_ref.PROTOCOL}
        return {**d, **PROTOCOL}

    def step(self, token_ids):
        self.steps += 1
        if self.target and self.steps == 2:
            what = os.environ.get("LOCKSTEP_TEST_MISCHIEF", "")
            if what == "interrupt":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
            elif what == "abort":
                os.abort()
        return super().step(token_ids)

def load(model_path, dtype="float32", sites=None, lora=None, **options):
    return Mischief(model_path, dtype=dtype, sites=sites, lora=lora)
"#;

fn mischief_suite(d: &Path) -> (PathBuf, PathBuf) {
    let engine = d.join("mischief.py");
    std::fs::write(&engine, MISCHIEF_ENGINE).unwrap();
    let suite = d.join("suite.toml");
    let case = |name: &str, model: &str| {
        format!("[[case]]\nname = \"{name}\"\nmodel = \"{model}\"\nreferences = [\"transformers\"]\nprompt = \"The capital of France is\"\nsteps = 3\n")
    };
    std::fs::write(&suite, format!("[suite]\nname = \"mischief\"\n{}{}{}", case("a", "tiny"), case("b", "tiny-gguf"), case("c", "tiny-qwen2"))).unwrap();
    (engine, suite)
}

fn report_cmd(engine: &Path, suite: &Path, out: &Path, mischief: Option<&str>) -> (i32, String, String) {
    let mut cmd = lockstep();
    cmd.arg("--engine").arg(format!("python:{}", engine.display())).arg("report").arg("--suite").arg(suite).arg("--out").arg(out);
    match mischief {
        Some(m) => cmd.env("LOCKSTEP_TEST_MISCHIEF", m),
        None => cmd.env_remove("LOCKSTEP_TEST_MISCHIEF"),
    };
    run(&mut cmd)
}

fn case_json(out: &Path, name: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("cases").join(format!("{name}.json"))).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

live_test! {
    fn ctrl_c_during_report_stops_writes_the_page_and_resume_finishes() {
        let d = tmp("ctrl-c-report");
        let (engine, suite) = mischief_suite(&d);
        let out = d.join("out");
        let (code, stdout, err) = report_cmd(&engine, &suite, &out, Some("interrupt"));
        assert_eq!(code, 130, "{stdout}\n{err}");
        assert!(err.contains("interrupted"), "{err}");
        assert!(!err.contains("KeyboardInterrupt") && !err.contains("panicked"), "{err}");
        assert!(out.join("index.html").is_file(), "the page is written");
        assert_eq!(case_json(&out, "a").unwrap()["verdict"], "pass");
        assert!(case_json(&out, "b").is_none(), "the interrupted case is not recorded");
        assert!(case_json(&out, "c").is_none(), "the suite stopped at once");
        let page = std::fs::read_to_string(out.join("report.json")).unwrap();
        assert!(page.contains("interrupted"), "the page says why b and c did not run");
        // Resume: a is reused, b and c run.
        let (code, stdout, err) = report_cmd(&engine, &suite, &out, None);
        assert_eq!(code, 0, "{stdout}\n{err}");
        assert!(err.contains("1 already finished"), "{err}");
        for c in ["a", "b", "c"] {
            assert_eq!(case_json(&out, c).unwrap()["verdict"], "pass", "{c}");
        }
    }
}

live_test! {
    fn a_report_case_that_aborts_is_recorded_and_the_suite_goes_on() {
        let d = tmp("abort-report");
        let (engine, suite) = mischief_suite(&d);
        let out = d.join("out");
        let (code, stdout, err) = report_cmd(&engine, &suite, &out, Some("abort"));
        assert_eq!(code, 1, "b is not as expected:\n{stdout}\n{err}");
        assert!(out.join("index.html").is_file(), "the page is written");
        let b = case_json(&out, "b").unwrap();
        assert_eq!(b["verdict"], "error");
        assert_eq!(b["crashed"], true);
        let msg = b["error"].as_str().unwrap();
        assert!(msg.contains("killed the process") && msg.contains("signal 6") && msg.contains("SIGABRT"), "{msg}");
        assert_eq!(case_json(&out, "a").unwrap()["verdict"], "pass");
        assert_eq!(case_json(&out, "c").unwrap()["verdict"], "pass", "the suite went on after the crash");
        // Resume runs the crashed case again (and only it).
        let (code, stdout, err) = report_cmd(&engine, &suite, &out, None);
        assert_eq!(code, 0, "{stdout}\n{err}");
        assert!(err.contains("2 already finished"), "{err}");
        assert_eq!(case_json(&out, "b").unwrap()["verdict"], "pass");
    }
}

// ----------------------------------------------------------------- references

live_test! {
    /// A reference whose cache holds twice the positions it was fed: the reference broke the
    /// protocol (exit 2), the engine is not blamed.
    fn a_reference_with_a_malformed_cache_broke_the_protocol() {
        let d = tmp("bad-cache-ref");
        let refs = d.join("references");
        std::fs::create_dir_all(&refs).unwrap();
        for e in std::fs::read_dir(repo().join("references")).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "py" || x == "txt") {
                std::fs::copy(e.path(), refs.join(e.file_name())).unwrap();
            }
        }
        let mut src = std::fs::read_to_string(refs.join("transformers_ref.py")).unwrap();
        src.push_str(
            "\n\n_orig_step = TransformersReference.step\n\
             def _doubled(self, token_ids):\n\
             \x20   out = _orig_step(self, token_ids)\n\
             \x20   for k in list(out):\n\
             \x20       if k.endswith('.cache_k'):\n\
             \x20           out[k] = np.concatenate([out[k], out[k]], axis=1)\n\
             \x20   return out\n\
             TransformersReference.step = _doubled\n",
        );
        std::fs::write(refs.join("transformers_ref.py"), src).unwrap();
        let (code, out, err) = run(lockstep()
            .args(["run", "--model", "tiny", "--reference", "transformers", "--steps", "2", "--prompt", "The capital of France is"])
            .env("LOCKSTEP_REFERENCES", &refs));
        assert_eq!(code, 2, "{out}\n{err}");
        assert!(err.contains("transformers reference broke the protocol") && err.contains("cache_k") && err.contains("cached positions after"), "{err}");
        assert!(!out.contains("history") && !err.contains("history"), "the engine is not blamed:\n{out}\n{err}");
    }
}

live_test! {
    /// A trace recorded while the reference environment lived in the repository (`.venv/...`)
    /// finds its model by sha256 in the environment LOCKSTEP_VENV names.
    fn a_trace_finds_its_model_in_lockstep_venv() {
        let d = tmp("trace-venv");
        let src = repo().join("snapshots/traces");
        let name = "smollm2.transformers";
        std::fs::copy(src.join(format!("{name}.safetensors")), d.join(format!("{name}.safetensors"))).unwrap();
        let json = std::fs::read_to_string(src.join(format!("{name}.json"))).unwrap();
        assert!(json.contains("\"$LOCKSTEP_VENV/lib/"), "the trace names its model inside the venv");
        std::fs::write(d.join(format!("{name}.json")), json.replace("\"$LOCKSTEP_VENV/lib/", "\".venv/lib/")).unwrap();
        assert!(!repo().join(".venv/lib").exists() || common::venv_path() == repo().join(".venv"), "the test needs the venv outside the repository");
        let (code, out, err) = run(lockstep()
            .args(["replay", name])
            .env("LOCKSTEP_TRACES", &d)
            .env("LOCKSTEP_MODELS", d.join("no-store")));
        assert_eq!(code, 0, "{out}\n{err}");
    }
}

// ----------------------------------------------------------------- found by fuzzing

/// A tokenizer.json whose post-processor template names a special token it does not define
/// (the `tokenizer` fuzz target): the tokenizers library loads it and panics on encode.
#[test]
fn a_post_processor_naming_an_undefined_special_token_is_exit_2() {
    let d = tmp("bad-post-processor");
    let m = d.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(repo().join("snapshots/models/tiny-llama")).unwrap().flatten() {
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    let mut tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(m.join("tokenizer.json")).unwrap()).unwrap();
    tj["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<?s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    });
    std::fs::write(m.join("tokenizer.json"), tj.to_string()).unwrap();
    let v = no_venv();
    assert_exit_2(
        &["generate", "--model", m.to_str().unwrap(), "--prompt", "The capital of France is"],
        &[("LOCKSTEP_VENV", v.as_str())],
        &["tokenizer.json", "post_processor", "\"<s>\"", "special_tokens do not define"],
    );
}

live_test! {
    /// Issue 35: a Python engine that prints and returns its prefill logits in Fortran order
    /// (np.asfortranarray, as any `.T` view is) computes the right numbers: the run passes
    /// (the array is read in its logical order, not its memory order, which was reported as a
    /// divergence at the output head), and `--json -` holds the JSON alone (the print goes to
    /// stderr).
    fn a_python_engine_that_prints_and_returns_fortran_ordered_arrays_passes_with_clean_json() {
        let dir = tmp("fortran-engine");
        let engine = dir.join("fortran_engine.py");
        std::fs::write(
            &engine,
            r#"import numpy as np
import transformers_ref


class FortranEngine(transformers_ref.TransformersReference):
    def step(self, token_ids):
        out = super().step(token_ids)
        print("a print from the engine under test")
        return {k: (np.asfortranarray(v) if v.ndim >= 2 else v) for k, v in out.items()}


def load(model, dtype="float32", sites=None, lora=None, **options):
    return FortranEngine(model, dtype=dtype, sites=sites)
"#,
        )
        .unwrap();
        let spec = format!("python:{}", engine.display());
        let (code, out, err) = run(lockstep().args([
            "run", "--engine", &spec, "--model", "tiny", "--reference", "transformers", "--prompt", "The capital of France is", "--steps",
            "3", "--json", "-",
        ]));
        assert_eq!(code, 0, "{out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("stdout is not the JSON alone ({e}):\n{out}"));
        assert_eq!(report["verdict"], "pass", "{out}");
        assert!(err.contains("a print from the engine under test"), "the print goes to stderr:\n{err}");
    }
}

/// Issue 35: a trace whose JSON declares 2^40 steps (a 26 TB allocation, abort 134) or 10^9
/// (14.6 GB in 40 s) is refused before anything is allocated from the count: exit 2, the file
/// and the count named.
#[test]
fn a_trace_declaring_absurd_steps_is_exit_2_before_allocating() {
    let src = repo().join("snapshots/traces");
    let name = "tiny-hf.transformers";
    for (tag, steps) in [("2e40", 1u64 << 40), ("1e9", 1_000_000_000)] {
        let d = tmp(&format!("trace-steps-{tag}"));
        std::fs::copy(src.join(format!("{name}.safetensors")), d.join(format!("{name}.safetensors"))).unwrap();
        let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join(format!("{name}.json"))).unwrap()).unwrap();
        j["steps"] = serde_json::json!(steps);
        std::fs::write(d.join(format!("{name}.json")), j.to_string()).unwrap();
        let start = std::time::Instant::now();
        let (code, out, err) = run(lockstep().args(["replay", name]).env("LOCKSTEP_TRACES", &d));
        assert_eq!(code, 2, "{tag}: {out}\n{err}");
        assert!(err.contains(&format!("{steps} steps but tokens for")) && err.contains(&format!("{name}.json")), "{tag}: {err}");
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{tag}: took {:?}", start.elapsed());
    }
}

/// Issue 35: a suite of a few hundred bytes whose matrix expands to a million cases is refused
/// before anything runs (exit 2, the count, the matrix and the flag named); `--max-cases`
/// raises the limit (here `--list` then shows them without running any).
#[test]
fn a_suite_expanding_to_a_million_cases_is_refused_unless_max_cases_allows_it() {
    let d = tmp("suite-million");
    let names = |p: &str, n: usize| (0..n).map(|i| format!("{{ name = \"{p}{i}\", prompt = \"x{i}\" }}")).collect::<Vec<_>>().join(", ");
    let samplers = (0..100).map(|i| format!("{{ name = \"s{i}\", spec = \"temp=0.5,seed={i}\" }}")).collect::<Vec<_>>().join(", ");
    let suite = format!(
        "[suite]\nname = \"big\"\n[[matrix]]\nname = \"m\"\nmodels = [\"tiny\"]\nreferences = [\"transformers\"]\nweights = [\"default\"]\n\
         prompts = [{}]\nsamplers = [{samplers}]\nadapters = [{}]\nsteps = 2\n",
        names("p", 100),
        (0..100).map(|i| format!("{{ name = \"a{i}\" }}")).collect::<Vec<_>>().join(", ")
    );
    let path = d.join("big.toml");
    std::fs::write(&path, suite).unwrap();
    let p = path.to_str().unwrap();
    let out_dir = d.join("out");
    assert_exit_2(
        &["report", "--suite", p, "--out", out_dir.to_str().unwrap()],
        &[],
        &["the suite expands to 1000000 cases, more than 1000", "matrix `m`: 1 models x 1 weights x 100 adapters x 100 prompts x 100 samplers", "--max-cases 1000000"],
    );
    assert!(!out_dir.exists(), "nothing is written for a refused suite");
    let (code, out, err) = run(lockstep().args(["report", "--suite", p, "--out", "unused", "--list", "--max-cases", "1000000"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1_000_000);
}

/// Issue 35: what can be checked before a run is checked before it: an empty prompt (it was
/// refused only after the references loaded), a `--json` file in a directory that does not
/// exist and a `record --out` that is not a directory (both failed after the whole run, naming
/// a hidden .tmp file), `record --full-layers` naming a layer the model lacks (accepted).
#[test]
fn what_can_be_checked_before_a_run_is_checked_before_it() {
    let d = tmp("before-run");
    // A prompt with no tokens (the tiny BPE model adds no BOS) is said before the references
    // load: quickly, and without Python (a reference environment that does not exist).
    let start = Instant::now();
    let (code, _, err) = run(lockstep().args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", ""]).env("LOCKSTEP_VENV", d.join("no-venv")));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the prompt encodes to no tokens") && start.elapsed() < Duration::from_secs(10), "{err}");
    let missing = d.join("no-such-dir").join("run.json");
    assert_exit_2(
        &["run", "--model", "tiny", "--reference", "transformers", "--prompt", "hi", "--json", missing.to_str().unwrap()],
        &[],
        &["no-such-dir", "no such directory", "--json", "nothing was run"],
    );
    let file = d.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    assert_exit_2(
        &["record", "--model", "tiny", "--reference", "transformers", "--prompt", "hi", "--name", "t", "--out", file.to_str().unwrap()],
        &[],
        &["a-file", "record --out", "nothing was run"],
    );
    let out = d.join("traces");
    std::fs::create_dir_all(&out).unwrap();
    assert_exit_2(
        &["record", "--model", "tiny", "--reference", "transformers", "--prompt", "hi", "--name", "t", "--out", out.to_str().unwrap(), "--full-layers", "0,99"],
        &[],
        &["--full-layers names layer 99", "the model has 3 layers"],
    );
}

/// Every file under `dir` with its size and modification time.
fn listing(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.len(), m.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

live_test! {
    /// Issue 35: `kill -INT PID` and `kill -TERM PID` to `lockstep report` (a process manager
    /// signals the PID, not the group) stop the suite: exit 130 or 143, and no worker outlives
    /// the command (nothing in --out changes after it returned). SIGINT was ignored (the suite
    /// ran on, exit 0); SIGTERM orphaned the worker, which kept writing case files.
    fn signals_to_report_stop_the_worker_with_it() {
        for (sig, code) in [("-INT", 130), ("-TERM", 143)] {
            let d = tmp(&format!("report-signal{sig}"));
            let suite = d.join("s.toml");
            std::fs::write(
                &suite,
                "[suite]\nname = \"sig\"\n[[matrix]]\nname = \"long\"\nmodels = [\"tiny\"]\nreferences = [\"transformers\"]\nweights = [\"default\"]\n\
                 prompts = [{ name = \"a\", prompt = \"The capital of France is\" }, { name = \"b\", prompt = \"One, two, three,\" }, { name = \"c\", prompt = \"Once upon a time\" }]\n\
                 samplers = [{ name = \"greedy\" }]\nsteps = 200\n",
            )
            .unwrap();
            let out = d.join("out");
            let mut child = lockstep()
                .args(["report", "--suite", suite.to_str().unwrap(), "--out", out.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The worker is running the first case (200 steps take far longer than this).
            std::thread::sleep(Duration::from_millis(6000));
            let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
            assert!(ok);
            let status = wait_with_timeout(&mut child, Duration::from_secs(90));
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            assert_eq!(status.code(), Some(code), "kill {sig}: {err}");
            let before = listing(&out);
            std::thread::sleep(Duration::from_millis(4000));
            assert_eq!(listing(&out), before, "kill {sig}: files under --out changed after the command returned:\n{err}");
        }
    }
}

live_test! {
    /// Issue 35: a Python engine under test that ends the process (os._exit(3)) or crashes it
    /// (a segfault in native code) made `run` and `bisect` exit 3 or 139 with no message. It
    /// runs in a worker process now: exit 2, the engine and how the process ended named.
    fn a_python_engine_that_kills_its_process_is_exit_2_naming_it() {
        let dir = tmp("killer-engine");
        let engine = dir.join("killer.py");
        std::fs::write(
            &engine,
            r#"import ctypes, os
import transformers_ref


class Killer(transformers_ref.TransformersReference):
    def step(self, token_ids):
        if self.pos > 0:
            how = os.environ["LOCKSTEP_TEST_KILLER"]
            if how == "exit":
                os._exit(3)
            ctypes.string_at(0)
        return super().step(token_ids)


def load(model, dtype="float32", sites=None, lora=None, **options):
    return Killer(model, dtype=dtype, sites=sites)
"#,
        )
        .unwrap();
        let spec = format!("python:{}", engine.display());
        for (how, needle) in [("exit", "ended lockstep's process with exit code 3"), ("segv", "killed by signal 11 (SIGSEGV")] {
            for cmd in ["run", "bisect"] {
                assert_exit_2(
                    &[cmd, "--engine", &spec, "--model", "tiny", "--reference", "transformers", "--prompt", "The capital of France is", "--steps", "3"],
                    &[("LOCKSTEP_TEST_KILLER", how)],
                    &[&format!("the engine under test ({spec})"), needle, "no verdict"],
                );
            }
        }
    }
}
