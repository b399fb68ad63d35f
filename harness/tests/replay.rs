//! Golden snapshots: every case of snapshots/traces/manifest.toml replayed against the
//! engine from its recorded traces, without Python.
//!
//! Each case asserts (1) its parity summary against `snapshots/parity/CASE.snap` (insta;
//! the snapshot's `info:` header carries the model hash and the reference versions) and
//! (2) its per-site verdicts: every site of every step compared, none failed, the engine's
//! tokens equal to the recorded ones. The summary is printed first, so a failing case names
//! its first divergent step, layer and site whichever assertion stops it.
//!
//! Nothing here needs the reference environment: the traces are committed, the tiny fixture
//! too, and SmolLM2's weights are found by sha256 in a reference environment or the model
//! store (`make models`). A missing model fails the test with that command; nothing skips.
//!
//! An intended change of the engine's numbers: `cargo test`, then `cargo insta review`
//! (or `INSTA_UPDATE=always cargo test --release --test replay`) and commit the `.snap`.

use std::path::{Path, PathBuf};
use std::process::Command;

use lockstep::golden::manifest::{Expect, Manifest};
use lockstep::golden::parity::{self, Replayed};
use lockstep::compare::tolerance::Verdict;
use lockstep::golden::trace;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The summary against `snapshots/parity/CASE.snap`, at the precision lockstep claims: one
/// snapshot for every CPU (golden::printed says what may move between CPU classes).
fn snapshot(name: &str, r: &Replayed) {
    let description = format!(
        "parity summary of golden case `{name}` (snapshots/traces/manifest.toml); accept an intended change with `cargo insta review`"
    );
    lockstep::golden::assert_summary(&repo().join("snapshots/parity"), name, &r.summary, &r.info, &description);
}

/// Every non-passing site, logits and generate check of a run, one line each.
fn failures(r: &Replayed) -> Vec<String> {
    let mut out = vec![];
    for st in &r.result.steps {
        for rs in &st.references {
            for s in rs.sites.iter().filter(|s| s.verdict == Verdict::Fail) {
                out.push(format!("step {} {} {}: {:?} {}", st.step, rs.reference, s.site, s.metrics.map(|m| m.rel_l2), s.note.clone().unwrap_or_default()));
            }
            if rs.logits_verdict == Verdict::Fail {
                out.push(format!("step {} {} logits: KL {:.3e} top-1 agree {}", st.step, rs.reference, rs.logits.kl, rs.logits.top1_agree));
            }
        }
    }
    for g in r.result.generate.iter().filter(|g| g.verdict == Verdict::Fail) {
        out.push(format!("generate {}: first different token at {:?}", g.reference, g.first_mismatch));
    }
    out
}

fn replay(name: &str) {
    let m = Manifest::load_default().expect("snapshots/traces/manifest.toml");
    let case = m.case(name).expect("the case is in the manifest");
    let r = match parity::replay_case(case) {
        Ok(r) => r,
        Err(e) => panic!("replaying case `{name}`: {e}"),
    };
    eprintln!("{}", r.summary);
    for n in &r.notes {
        eprintln!("replay: {n}");
    }
    snapshot(name, &r);

    // Per-site verdicts.
    let fails = failures(&r);
    let first = r.result.first_divergence.as_ref().map(|d| {
        format!("step {}, layer {:?}, site `{}` (vs {}): {}", d.step, d.layer, d.site, d.reference, d.detail)
    });
    match case.expect {
        Expect::Pass => {
            assert!(r.result.verdict_pass, "case `{name}` diverged at {}:\n{}", first.unwrap_or_default(), fails.join("\n"));
            assert!(fails.is_empty(), "case `{name}`:\n{}", fails.join("\n"));
        }
        Expect::Diverged => assert!(!r.result.verdict_pass, "case `{name}` is expected to diverge but passed"),
    }
    // Every site each trace lists was compared at every step; nothing skipped.
    for (i, rf) in r.refs.iter().enumerate() {
        let t = rf.trace().expect("a replay reference");
        for st in &r.result.steps {
            let rs = &st.references[i];
            assert_eq!(rs.sites.len(), rf.description.sites.len(), "step {} {}: sites compared", st.step, rf.name);
        }
        assert!(r.result.summary.references[i].sites_not_compared.is_empty(), "{}: {:?}", rf.name, r.result.summary.references[i].sites_not_compared);
        // The engine chose the tokens it chose when the trace was recorded.
        assert_eq!(r.result.engine_tokens, t.meta.engine_tokens, "{}: engine tokens differ from the recording", rf.name);
        assert_eq!(r.result.steps.len(), t.meta.steps);
    }
    assert!(r.notes.is_empty(), "{:?}", r.notes);
}

#[test]
fn replay_tiny_hf() {
    replay("tiny-hf");
}

#[test]
fn replay_tiny_hf_lora() {
    replay("tiny-hf-lora");
}

#[test]
fn replay_tiny_gguf() {
    replay("tiny-gguf");
}

#[test]
fn replay_smollm2() {
    replay("smollm2");
}

#[test]
fn replay_tiny_q4_0() {
    replay("tiny-q4-0");
}

#[test]
fn replay_tiny_q4_1() {
    replay("tiny-q4-1");
}

#[test]
fn replay_tiny_q8_0() {
    replay("tiny-q8-0");
}

#[test]
fn replay_tiny_k_q4_k_m() {
    replay("tiny-k-q4-k-m");
}

#[test]
fn replay_tiny_k_q6_k() {
    replay("tiny-k-q6-k");
}

#[test]
fn replay_tiny_qwen2_gguf() {
    replay("tiny-qwen2-gguf");
}

#[test]
fn replay_tiny_qwen2_q8_0() {
    replay("tiny-qwen2-q8-0");
}

// Mixtral-style sparse MoE.
#[test]
fn replay_tiny_mixtral_hf() {
    replay("tiny-mixtral-hf");
}

#[test]
fn replay_tiny_mixtral_q8_0() {
    replay("tiny-mixtral-q8-0");
}

// SentencePiece tokenizers (issue 17).
#[test]
fn replay_tiny_spm_bos() {
    replay("tiny-spm-bos");
}

// RoPE scaling (issue 34): llama3, past the original context.
#[test]
fn replay_tiny_rope_llama3() {
    replay("tiny-rope-llama3");
}

// Sliding windows (issue 37): past the window, the caches in their canonical form.
#[test]
fn replay_tiny_mistral() {
    replay("tiny-mistral");
}

#[test]
fn replay_tiny_qwen2_swa() {
    replay("tiny-qwen2-swa");
}

// Gemma 3 (issue 38): its q/k norms and sandwich norms, local and global layers.
#[test]
fn replay_tiny_gemma3() {
    replay("tiny-gemma3");
}

/// The cases above are the manifest's cases, every trace on disk belongs to one, and every
/// parity snapshot to a case: nothing recorded is left unreplayed.
#[test]
fn every_case_is_replayed_and_every_trace_belongs_to_a_case() {
    let tested = ["tiny-hf", "tiny-hf-lora", "tiny-gguf", "smollm2", "tiny-q4-0", "tiny-q4-1", "tiny-q8-0", "tiny-k-q4-k-m", "tiny-k-q6-k", "tiny-qwen2-gguf",
                  "tiny-qwen2-q8-0", "tiny-mixtral-hf", "tiny-mixtral-q8-0", "tiny-spm-bos", "tiny-rope-llama3", "tiny-mistral",
                  "tiny-qwen2-swa", "tiny-gemma3"];
    let m = Manifest::load_default().unwrap();
    let cases: Vec<&str> = m.cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(cases, tested, "add a #[test] fn replay_... to harness/tests/replay.rs for each case");
    let mut on_disk = trace::list_traces(&trace::traces_dir());
    let mut wanted = m.trace_names();
    on_disk.sort();
    wanted.sort();
    assert_eq!(on_disk, wanted, "traces in snapshots/traces vs the manifest's cases (run `make snapshots`)");
    for t in &wanted {
        assert!(trace::trace_paths(t).0.exists(), "{t}.json is missing");
    }
    let mut snaps: Vec<String> = std::fs::read_dir(repo().join("snapshots/parity"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".snap")).map(String::from))
        .collect();
    snaps.sort();
    let mut names: Vec<String> = tested.iter().map(|s| s.to_string()).collect();
    names.sort();
    // One snapshot per case for every CPU: no `CASE@avx512.snap` variants (golden::printed).
    assert_eq!(snaps, names, "snapshots/parity/*.snap vs the cases");
}

/// The traces are small: the whole snapshots/ directory stays under 33 MB (30 until the
/// RoPE-scaling fixtures: a 0.8 MB GGUF and a 0.3 MB trace, 2026-12-07; 31 until the tiny Gemma 3:
/// 1.0 MB of models and a 0.5 MB trace).
#[test]
fn snapshots_stay_under_33_mb() {
    // A symlink (the RoPE-scaling variants share tiny-llama's files) counts as itself.
    fn size(p: &Path) -> u64 {
        match p.symlink_metadata() {
            Ok(m) if m.is_dir() => std::fs::read_dir(p).unwrap().flatten().map(|e| size(&e.path())).sum(),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    let total = size(&repo().join("snapshots"));
    assert!(total < 33_000_000, "snapshots/ holds {:.1} MB", total as f64 / 1e6);
}

// --- a trace that differs is caught where it differs ------------------------------------------

/// Copies trace `name` into `dir` with `edit` applied to its tensors, keeping the metadata
/// consistent (tensor sha256 and size).
fn edited_trace(name: &str, dir: &Path, edit: impl Fn(&str, &mut Vec<u8>)) -> String {
    let (json, st) = trace::trace_paths(name);
    let bytes = std::fs::read(&st).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let mut data = v.data().to_vec();
            edit(&n, &mut data);
            (n, v.dtype(), v.shape().to_vec(), data)
        })
        .collect();
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    meta["tensors"]["sha256"] = trace::sha256_hex(&out).into();
    meta["tensors"]["bytes"] = out.len().into();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.safetensors")), out).unwrap();
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&meta).unwrap()).unwrap();
    dir.join(name).display().to_string()
}

fn scale_f32(data: &mut [u8], by: f32) {
    for c in data.chunks_exact_mut(4) {
        let v = f32::from_le_bytes(c.try_into().unwrap()) * by;
        c.copy_from_slice(&v.to_le_bytes());
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lockstep-replay-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn a_perturbed_full_site_is_named_with_step_and_layer() {
    let dir = tmp("full");
    let t = edited_trace("tiny-hf.transformers", &dir, |n, d| {
        if n == "s002/layers.1.mlp_up" {
            scale_f32(d, 1.5);
        }
    });
    let r = parity::replay_traces("perturbed", &[t]).unwrap();
    let d = r.result.first_divergence.as_ref().expect("diverges");
    assert_eq!((d.step, d.layer, d.site.as_str()), (2, Some(1), "layers.1.mlp_up"), "{}", r.summary);
    assert!(r.summary.contains("first divergence: step 2, layer 1, site `layers.1.mlp_up`"), "{}", r.summary);
}

#[test]
fn a_perturbed_sketched_site_is_named_with_step_and_layer() {
    // SmolLM2 keeps layer 7 as sketches: scaling the projections of one sketch by 3% makes
    // the reference's layers.7.mlp_up at step 2 differ from the engine's by ~3% rel-L2.
    let dir = tmp("sketch");
    let t = edited_trace("smollm2.transformers", &dir, |n, d| {
        if n == "s002/layers.7.mlp_up@sketch" {
            // [ndim, dims.., sum_sq, max_abs, nonfinite, y_0..]: scale the projections only.
            let v: Vec<f64> = d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
            let start = 1 + v[0] as usize + 3;
            let v: Vec<f64> = v.iter().enumerate().map(|(i, &x)| if i >= start { x * 1.03 } else { x }).collect();
            d.clear();
            d.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
    });
    let r = parity::replay_traces("perturbed-sketch", &[t]).unwrap();
    let d = r.result.first_divergence.as_ref().expect("diverges");
    assert_eq!((d.step, d.layer, d.site.as_str()), (2, Some(7), "layers.7.mlp_up"), "{}", r.summary);
    assert!(d.detail.contains("estimated"), "{}", d.detail);
}

// --- `--reference trace:NAME` on the command line, without Python -----------------------------

/// The binary with an environment in which Python cannot start (a bogus PYTHONHOME is fatal
/// to CPython's initialization) and no reference environment: a replay must not need it.
fn lockstep_without_python() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    c.env("LOCKSTEP_VENV", std::env::temp_dir().join("lockstep-no-venv-here"))
        .env("PYTHONHOME", "/nonexistent-python-home")
        .env_remove("LOCKSTEP_TRACES")
        .env_remove("RUST_BACKTRACE");
    c
}

fn run(c: &mut Command) -> (i32, String, String) {
    let o = c.output().expect("lockstep runs");
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn run_takes_a_trace_as_reference_without_python() {
    let (code, out, err) = run(lockstep_without_python().args([
        "run", "--model", "tiny-gguf", "--reference", "trace:tiny-gguf.transformers,trace:tiny-gguf.mlx",
        "--chat", "What is the capital of France?", "--steps", "12",
    ]));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("verdict: PASS"), "{out}");
    assert!(out.contains("trace:tiny-gguf.transformers vs trace:tiny-gguf.mlx"), "{out}");
    assert!(out.contains("replayed from trace `tiny-gguf.mlx`"), "{out}");
    // More steps than recorded: run what the traces hold.
    let (code, out, err) = run(lockstep_without_python().args([
        "run", "--model", "tiny", "--reference", "trace:tiny-hf.transformers", "--chat", "What is the capital of France?",
        "--steps", "40",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("the traces hold 12 steps"), "{err}");
}

#[test]
fn replay_command_prints_the_summary_without_python() {
    let (code, out, err) = run(lockstep_without_python().args(["replay", "tiny-hf", "--summary"]));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("parity summary of case `tiny-hf`"), "{out}");
    assert!(out.contains("verdict: PASS"), "{out}");
}

#[test]
fn a_trace_replays_only_its_own_model_and_prompt() {
    let (code, _, err) = run(lockstep_without_python().args([
        "run", "--model", "tiny", "--reference", "trace:tiny-hf.transformers", "--chat", "hello",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("was recorded with --chat \"What is the capital of France?\""), "{err}");
    let (code, _, err) = run(lockstep_without_python().args([
        "run", "--model", "tiny-gguf", "--reference", "trace:tiny-hf.transformers", "--chat", "What is the capital of France?",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("was recorded from tiny-llama"), "{err}");
    let (code, _, err) = run(lockstep_without_python().args(["run", "--model", "tiny", "--reference", "trace:no-such-case", "--chat", "x"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no trace `no-such-case`") && err.contains("tiny-hf.transformers"), "{err}");
}

/// A trace recorded with a LoRA adapter replays only with that adapter (checked by sha256),
/// and its reference's recorded inventory is diffed against the engine's, without Python.
#[test]
fn an_adapter_trace_replays_only_with_its_adapter() {
    let args = ["run", "--model", "tiny", "--reference", "trace:tiny-hf-lora.transformers", "--chat", "What is the capital of France?"];
    let (code, _, err) = run(lockstep_without_python().args(args));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pass --lora snapshots/adapters/tiny-peft"), "{err}");
    let (code, _, err) = run(lockstep_without_python().args(args).args(["--lora", "../snapshots/adapters/tiny-mlx"]));
    assert_eq!(code, 2, "another adapter: refused\n{err}");
    assert!(err.contains("was recorded with the adapter snapshots/adapters/tiny-peft"), "{err}");
    let (code, out, err) = run(lockstep_without_python().args(args).args(["--lora", "../snapshots/adapters/tiny-peft"]));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("inventory  identical on every side"), "{out}");
    assert!(out.contains("the adapter has an effect"), "{out}");
}

#[test]
fn a_trace_whose_files_do_not_match_is_refused() {
    let dir = tmp("mismatch");
    let t = edited_trace("tiny-hf.mlx", &dir, |_, _| {});
    // Break the pairing: the JSON's sha256 no longer describes the tensor file.
    let json = PathBuf::from(format!("{t}.json"));
    let text = std::fs::read_to_string(&json).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["tensors"]["sha256"] = "0".repeat(64).into();
    std::fs::write(&json, meta.to_string()).unwrap();
    let err = parity::replay_traces("bad", &[t]).err().expect("refused").to_string();
    assert!(err.contains("do not belong together"), "{err}");
}

/// The engine's fault catalog (`lockstep faults`), each fault injected into the engine and
/// bisected against the tiny traces, without Python: every applicable fault is found at the
/// catalog's step, layer and site with its diagnosis, and the clean engine raises nothing.
#[test]
fn every_fault_is_found_by_bisecting_against_the_traces() {
    for (model, traces) in [("tiny", "trace:tiny-hf.transformers"), ("tiny-gguf", "trace:tiny-gguf.mlx")] {
        let json = tmp(&format!("faults-{model}")).join("f.json");
        std::fs::create_dir_all(json.parent().unwrap()).unwrap();
        let (code, out, err) =
            run(lockstep_without_python().args(["faults", "--check", "--model", model, "--reference", traces, "--json"]).arg(&json));
        assert_eq!(code, 0, "{model}: stdout:\n{out}\nstderr:\n{err}");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let rows = v.as_array().unwrap();
        assert_eq!(rows[0]["found"], "nothing", "false alarm on the clean engine: {}", rows[0]);
        assert!(rows.iter().all(|r| r["ok"] == true), "{out}");
        let n = rows.iter().filter(|r| r["applicable"] == true).count();
        assert!(n >= 10, "{model}: {n} applicable faults:\n{out}");
        assert!(out.contains(&format!("{n} of {n} applicable checks as the catalog says")), "{out}");
    }
}
