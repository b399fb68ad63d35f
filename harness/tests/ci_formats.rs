//! lockstep's formats for CI: `--json -` and `--junit -` on stdout (stdout then holds the
//! report alone), the JSON reports validated against their published JSON Schemas
//! (docs/schema/) by a real validator (Python's `jsonschema`), JUnit XML read by a real
//! consumer's parser (`junitparser`) with the failure path exercised by injected faults, the
//! example CI workflow (examples/ci/github-actions.yml) parsed and its shard matrix checked
//! against the suite, and docs/environment.md checked against the variables the code reads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::*;

/// Validates JSON files against a schema of docs/schema/ with `jsonschema` (Draft 2020-12):
/// the schema is checked against the metaschema first. Prints one line per error.
const VALIDATE: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
v = Draft202012Validator(schema)
bad = 0
for path in sys.argv[2:]:
    errors = sorted(v.iter_errors(json.load(open(path))), key=lambda e: list(map(str, e.absolute_path)))
    for e in errors[:10]:
        print(f"{path}: at /{'/'.join(map(str, e.absolute_path))}: {e.message}")
    bad += bool(errors)
print(f"{len(sys.argv) - 2 - bad} valid, {bad} invalid")
sys.exit(1 if bad else 0)
"#;

/// Reads JUnit XML files as CI tools do, with `junitparser`, and prints what it read as JSON.
const JUNIT: &str = r#"
import json, sys
from junitparser import JUnitXml, TestSuite, Failure, Error, Skipped
out = []
for path in sys.argv[1:]:
    xml = JUnitXml.fromfile(path)
    suites = [xml] if isinstance(xml, TestSuite) else list(xml)
    for s in suites:
        cases = []
        for c in s:
            r = c.result
            kind = "pass" if not r else {Failure: "failure", Error: "error", Skipped: "skipped"}[type(r[0])]
            cases.append({"classname": c.classname, "name": c.name, "time": c.time, "outcome": kind,
                          "message": r[0].message if r else None, "type": r[0].type if r else None,
                          "text": r[0].text if r else None, "system_out": c.system_out})
        out.append({"name": s.name, "tests": s.tests, "failures": s.failures, "errors": s.errors,
                    "skipped": s.skipped, "time": s.time, "cases": cases,
                    "properties": {p.name: p.value for p in s.properties()}})
print(json.dumps(out))
"#;

fn python(script: &str, args: &[&Path]) -> (i32, String, String) {
    let dir = tmp("ci-formats-py");
    let file = dir.join(format!("script-{:x}.py", script.len()));
    std::fs::write(&file, script).unwrap();
    run(Command::new(venv().join("bin/python")).arg(&file).args(args))
}

fn schema(name: &str) -> PathBuf {
    repo().join("docs/schema").join(name)
}

/// Asserts that every file is valid against the schema.
fn assert_valid(schema_name: &str, files: &[&Path]) {
    let (code, out, err) = python(VALIDATE, &[&[schema(schema_name).as_path()], files].concat());
    assert_eq!(code, 0, "{schema_name}:\n{out}\n{err}");
    assert!(out.contains(&format!("{} valid, 0 invalid", files.len())), "{out}");
}

/// The validator's errors for one document (it must reject it).
fn rejected(schema_name: &str, doc: &Value) -> String {
    let f = tmp("ci-formats-broken").join(format!("broken-{:x}.json", doc.to_string().len()));
    std::fs::write(&f, doc.to_string()).unwrap();
    let (code, out, err) = python(VALIDATE, &[schema(schema_name).as_path(), &f]);
    assert_eq!(code, 1, "{schema_name} should reject the document:\n{out}\n{err}");
    assert!(out.contains("0 valid, 1 invalid"), "{out}");
    out
}

fn junit(files: &[&Path]) -> Vec<Value> {
    let (code, out, err) = python(JUNIT, files);
    assert_eq!(code, 0, "junitparser could not read {files:?}:\n{out}\n{err}");
    serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().clone()
}

fn cases(suite: &Value) -> &Vec<Value> {
    suite["cases"].as_array().unwrap()
}

/// A suite's counts agree with its test cases (what CI shows as totals).
fn assert_counts(suite: &Value) {
    let n = |kind: &str| cases(suite).iter().filter(|c| c["outcome"] == kind).count();
    assert_eq!(suite["tests"], cases(suite).len(), "{suite}");
    assert_eq!(suite["failures"], n("failure"), "{suite}");
    assert_eq!(suite["errors"], n("error"), "{suite}");
    assert_eq!(suite["skipped"], n("skipped"), "{suite}");
}

fn schema_const(name: &str, def: Option<&str>) -> Value {
    let s: Value = serde_json::from_str(&std::fs::read_to_string(schema(name)).unwrap()).unwrap();
    let obj = match def {
        Some(d) => &s["$defs"][d],
        None => &s,
    };
    let v = obj["properties"]["schema_version"]["const"].clone();
    assert!(s["$id"].as_str().unwrap().ends_with(&format!(":{v}")), "{name}: the $id carries the version {v}");
    v
}

live_test! {
    /// `run --json -`: stdout is the JSON report and nothing else (the table goes to stderr);
    /// the report is valid against docs/schema/run-report.schema.json, passing and diverged;
    /// the validator rejects broken copies of it. `run --junit -`: one test case per step,
    /// the failing step carries the first divergence and its likely cause.
    fn run_json_and_junit_on_stdout_are_valid() {
        let (code, stdout, stderr) = run(lockstep().args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", "hello", "--steps", "3", "--json", "-"]));
        assert_eq!(code, 0, "{stderr}");
        let pass: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is not the JSON report alone ({e}):\n{stdout}"));
        assert_eq!(pass["verdict"], "pass");
        assert_eq!(pass["schema_version"], schema_const("run-report.schema.json", None));
        assert!(stderr.contains("verdict: PASS"), "the table went to stderr:\n{stderr}");
        assert!(!stderr.contains("report: -"), "{stderr}");

        // An injected fault: exit 1, a diverged report, and the JUnit file on stdout.
        let dir = tmp("ci-formats-run");
        let json = dir.join("diverged.json");
        let (code, stdout, stderr) = run(lockstep()
            .args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", "hello", "--steps", "3", "--inject", "rope-theta", "--junit", "-", "--json"])
            .arg(&json));
        assert_eq!(code, 1, "{stderr}");
        assert!(stdout.starts_with("<?xml") && stdout.trim_end().ends_with("</testsuites>"), "stdout is the JUnit XML alone:\n{stdout}");
        let diverged: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let d = &diverged["first_divergence"];
        assert_eq!(diverged["verdict"], "diverged");
        let xml = dir.join("run.xml");
        std::fs::write(&xml, &stdout).unwrap();
        let suites = junit(&[&xml]);
        assert_eq!(suites.len(), 1);
        let s = &suites[0];
        assert_counts(s);
        assert_eq!(s["tests"], 3, "one test case per step: {s}");
        assert_eq!(s["properties"]["verdict"], "diverged");
        let failed: Vec<&Value> = cases(s).iter().filter(|c| c["outcome"] == "failure").collect();
        assert!(!failed.is_empty(), "{s}");
        let first = failed.iter().find(|c| c["message"].as_str().unwrap().starts_with("first divergence")).expect("the first divergence is a failure");
        let msg = first["message"].as_str().unwrap();
        let step = d["step"].as_u64().unwrap();
        assert!(first["name"].as_str().unwrap().starts_with(&format!("step {step}")), "{first}");
        let site = d["site"].as_str().unwrap();
        let layer = d["layer"].as_u64().map(|l| format!(" layer {l}")).unwrap_or_default();
        assert!(msg.contains(&format!("step {step}{layer} {site}")), "{msg}");
        assert!(msg.contains("vs transformers"), "{msg}");
        if let Some(cause) = d["likely_cause"].as_str() {
            assert!(msg.contains(&format!("likely cause: {cause}")), "{msg}");
        }
        assert!(first["text"].as_str().unwrap().contains("lockstep bisect"), "{first}");

        // Two references (the noise floor between them), an f64 oracle and a sampler; the
        // prompt fed in pieces (`calls`).
        let multi = dir.join("multi.json");
        let (code, _, stderr) = run(lockstep()
            .args(["run", "--model", "tiny", "--reference", "transformers,mlx,transformers:f64", "--chat", "hi", "--steps", "3", "--sampler", "temp=0.8,top_p=0.95,seed=0"])
            .args(["--prefill-chunk", "4", "--json"])
            .arg(&multi));
        assert_eq!(code, 0, "{stderr}");
        let m: Value = serde_json::from_str(&std::fs::read_to_string(&multi).unwrap()).unwrap();
        assert!(!m["steps"][0]["pairs"].as_array().unwrap().is_empty() && !m["summary"]["oracle"].as_array().unwrap().is_empty(), "{}", m["summary"]);
        assert!(m["steps"][0]["calls"].as_array().is_some_and(|c| c.len() > 1), "{}", m["steps"][0]);

        // The reports are valid; broken copies are not.
        let passing = dir.join("pass.json");
        std::fs::write(&passing, pass.to_string()).unwrap();
        assert_valid("run-report.schema.json", &[&passing, &json, &multi]);
        let mut no_verdict = diverged.clone();
        no_verdict.as_object_mut().unwrap().remove("verdict");
        assert!(rejected("run-report.schema.json", &no_verdict).contains("'verdict' is a required property"));
        let mut bad_divergence = diverged.clone();
        bad_divergence["first_divergence"]["step"] = Value::from("zero");
        assert!(rejected("run-report.schema.json", &bad_divergence).contains("at /first_divergence"));
        let mut other_version = pass.clone();
        other_version["schema_version"] = Value::from(2);
        assert!(rejected("run-report.schema.json", &other_version).contains("at /schema_version"));
        let mut bad_site = pass.clone();
        bad_site["steps"][0]["references"][0]["sites"][0]["verdict"] = Value::from("fine");
        assert!(rejected("run-report.schema.json", &bad_site).contains("at /steps/0/references/0/sites/0/verdict"));

        // --json - and --junit - at once: a usage error.
        assert_exit_2(&["run", "--model", "tiny", "--prompt", "hi", "--json", "-", "--junit", "-"], &[], &["--json -", "--junit -"]);
    }
}

live_test! {
    /// `bisect --junit -` on an injected fault: one failed test case naming the step, layer,
    /// site and diagnosis that the JSON report (`--json FILE`) holds.
    fn bisect_junit_names_the_site_and_the_diagnosis() {
        let dir = tmp("ci-formats-bisect");
        let json = dir.join("bisect.json");
        let (code, stdout, stderr) = run(lockstep()
            .args(["bisect", "--model", "tiny", "--reference", "transformers", "--chat", "What is the capital of France?", "--steps", "4", "--inject", "rope-theta", "--junit", "-", "--json"])
            .arg(&json));
        assert_eq!(code, 1, "{stderr}");
        let b: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(b["diagnosis"]["name"], "rope-base", "{b}");
        let xml = dir.join("bisect.xml");
        std::fs::write(&xml, &stdout).unwrap();
        let s = &junit(&[&xml])[0];
        assert_counts(s);
        assert_eq!((s["tests"].as_u64(), s["failures"].as_u64()), (Some(1), Some(1)), "{s}");
        let c = &cases(s)[0];
        let msg = c["message"].as_str().unwrap();
        let at = format!("step {} layer {} {}", b["step"], b["layer"], b["site"].as_str().unwrap());
        assert!(msg.contains(&format!("diverged at {at}")), "{msg}");
        assert!(msg.contains("diagnosis rope-base"), "{msg}");
        let text = c["text"].as_str().unwrap();
        assert!(text.contains("isolation: layer 0 is local"), "{text}");
        for e in b["diagnosis"]["evidence"].as_array().unwrap() {
            assert!(text.contains(e.as_str().unwrap()), "the evidence is in the failure's text: {text}");
        }

        // The clean engine: one passing test case.
        let (code, stdout, stderr) = run(lockstep().args(["bisect", "--model", "tiny", "--reference", "transformers", "--prompt", "hello", "--steps", "2", "--junit", "-"]));
        assert_eq!(code, 0, "{stderr}");
        std::fs::write(&xml, &stdout).unwrap();
        let s = &junit(&[&xml])[0];
        assert_eq!((s["tests"].as_u64(), s["failures"].as_u64()), (Some(1), Some(0)), "{s}");
    }
}

live_test! {
    /// `faults --check --junit`: one test case per row of the check, the faults that do not
    /// apply skipped; the counts agree with the JSON.
    fn faults_check_junit_has_one_case_per_fault() {
        let dir = tmp("ci-formats-faults");
        let (json, xml) = (dir.join("faults.json"), dir.join("faults.xml"));
        let (code, _, stderr) = run(lockstep().args(["faults", "--check", "--model", "tiny", "--reference", "transformers", "--json"]).arg(&json).arg("--junit").arg(&xml));
        assert_eq!(code, 0, "{stderr}");
        let rows: Vec<Value> = serde_json::from_str::<Value>(&std::fs::read_to_string(&json).unwrap()).unwrap().as_array().unwrap().clone();
        let s = &junit(&[&xml])[0];
        assert_counts(s);
        assert_eq!(s["tests"], rows.len());
        assert_eq!(s["failures"], 0);
        assert_eq!(s["skipped"], rows.iter().filter(|r| r["applicable"] == false).count());
        let names: Vec<&Value> = cases(s).iter().map(|c| &c["name"]).collect();
        let faults: Vec<&Value> = rows.iter().map(|r| &r["fault"]).collect();
        assert_eq!(names, faults);
        // --junit needs --check.
        assert_exit_2(&["faults", "--junit", "x.xml"], &[], &["--check"]);
    }
}

fn write_suite(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("suite.toml");
    std::fs::write(&p, format!("[suite]\nname = \"ci-formats\"\n{body}")).unwrap();
    p
}

live_test! {
    /// `report --junit`: one test case per case (a passing one, a fault that is expected to
    /// pass, so fails with bisect's diagnosis, a fault expected to diverge, and a case that
    /// cannot run: an error). DIR/report.json and every DIR/cases/*.json are valid against
    /// docs/schema/suite-report.schema.json (DIR/runs/*.json, with --full-json, against the
    /// run report's), and broken copies are rejected. `report merge
    /// --junit -` writes the same test cases on stdout.
    fn report_json_is_valid_and_junit_leads_with_failures() {
        let dir = tmp("ci-formats-report");
        let broken = dir.join("broken.gguf");
        std::fs::write(&broken, b"GGUF\x03\x00\x00\x00 not a model").unwrap();
        let suite = write_suite(
            &dir,
            &format!(
                r#"
[[case]]
name = "ok"
about = "the clean engine"
model = "tiny"
references = ["transformers"]
prompt = "Hello"
steps = 3

[[case]]
name = "fault-unexpected"
model = "tiny"
references = ["transformers"]
chat = "What is the capital of France?"
steps = 3
inject = "rope-theta"

[[case]]
name = "fault-expected"
model = "tiny"
references = ["transformers"]
prompt = "Hello"
steps = 3
inject = "rms-eps"
expect = "diverged"

[[case]]
name = "unreadable"
model = "{}"
references = ["transformers"]
prompt = "Hello"
steps = 3
"#,
                broken.display()
            ),
        );
        let out = dir.join("out");
        let xml = dir.join("report.xml");
        let (code, stdout, stderr) =
            run(lockstep().env("CI", "true").args(["report", "--full-json", "--suite"]).arg(&suite).arg("--out").arg(&out).arg("--junit").arg(&xml));
        assert_eq!(code, 1, "cases not as expected:\n{stdout}\n{stderr}");
        let rep: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        assert_eq!(rep["schema_version"], schema_const("suite-report.schema.json", Some("report")));
        assert_eq!(rep["schema_version"], schema_const("suite-report.schema.json", Some("case")));

        let s = &junit(&[&xml])[0];
        assert_counts(s);
        assert_eq!((s["tests"].as_u64(), s["failures"].as_u64(), s["errors"].as_u64()), (Some(4), Some(1), Some(1)), "{s}");
        let case = |name: &str| cases(s).iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no test case {name}: {s}"));
        assert_eq!(case("ok")["outcome"], "pass");
        assert!(case("ok")["system_out"].as_str().unwrap().contains("the clean engine"));
        assert_eq!(case("fault-expected")["outcome"], "pass", "a case that diverges as expected passes");
        let f = case("fault-unexpected");
        assert_eq!(f["outcome"], "failure");
        assert_eq!(f["type"], "not-as-expected");
        let msg = f["message"].as_str().unwrap();
        let rf = rep["cases"].as_array().unwrap().iter().find(|c| c["name"] == "fault-unexpected").unwrap();
        let d = &rf["first_divergence"];
        assert!(msg.starts_with("diverged (expected pass)"), "{msg}");
        assert!(msg.contains(&format!("first divergence step {} layer {} {}", d["step"], d["layer"], d["site"].as_str().unwrap())), "{msg}");
        assert!(msg.contains("diagnosis rope-base"), "{msg}");
        assert!(f["text"].as_str().unwrap().contains("bisect: step"), "{f}");
        let e = case("unreadable");
        assert_eq!(e["outcome"], "error");
        assert!(e["message"].as_str().unwrap().contains("broken.gguf"), "{e}");

        // The schema: report.json and every case file.
        let mut files = vec![out.join("report.json")];
        for entry in std::fs::read_dir(out.join("cases")).unwrap() {
            files.push(entry.unwrap().path());
        }
        assert_eq!(files.len(), 5);
        assert_valid("suite-report.schema.json", &files.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        // --full-json: each case that ran has its run report, valid against the run schema.
        let runs: Vec<PathBuf> = std::fs::read_dir(out.join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_valid("run-report.schema.json", &runs.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        let mut no_totals = rep.clone();
        no_totals["totals"].as_object_mut().unwrap().remove("pass");
        assert!(rejected("suite-report.schema.json", &no_totals).contains("'pass' is a required property"));
        let mut bad_case = rf.clone();
        bad_case["verdict"] = Value::from("maybe");
        assert!(rejected("suite-report.schema.json", &bad_case).contains("at /verdict"));
        let mut bad_bisect = rf.clone();
        bad_bisect["bisect"]["found"] = Value::from("yes");
        assert!(rejected("suite-report.schema.json", &bad_bisect).contains("at /bisect"));

        let strip = |s: &Value| cases(s).iter().map(|c| (c["name"].clone(), c["outcome"].clone(), c["message"].clone())).collect::<Vec<_>>();
        // A resume with --junit -: every case is finished; the worker writes the same JUnit
        // on stdout, the summary on stderr.
        let (code, stdout, stderr) = run(lockstep().env("CI", "true").args(["report", "--suite"]).arg(&suite).arg("--out").arg(&out).args(["--junit", "-"]));
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("4 already finished") && stderr.contains("report:"), "{stderr}");
        let rx = dir.join("resumed.xml");
        std::fs::write(&rx, &stdout).unwrap();
        assert_eq!(strip(&junit(&[&rx])[0]), strip(s), "stdout:\n{stdout}");

        // merge --junit -: stdout is the JUnit XML alone, with the same test cases.
        let merged = dir.join("merged");
        let (code, stdout, stderr) = run(lockstep().args(["report", "merge"]).arg(&out).arg("--out").arg(&merged).args(["--junit", "-"]));
        assert_eq!(code, 1, "{stderr}");
        assert!(stdout.starts_with("<?xml") && stdout.trim_end().ends_with("</testsuites>"), "{stdout}");
        assert!(stderr.contains("report:"), "the summary went to stderr: {stderr}");
        let mx = dir.join("merged.xml");
        std::fs::write(&mx, &stdout).unwrap();
        let m = &junit(&[&mx])[0];
        assert_eq!(strip(m), strip(s));
    }
}

/// The example workflow parsed as YAML (PyYAML), as JSON.
fn workflow() -> Value {
    let (code, out, err) = python(
        "import json, sys, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1]))))\n",
        &[&repo().join("examples/ci/github-actions.yml")],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn step_runs(job: &Value) -> Vec<String> {
    job["steps"].as_array().unwrap().iter().filter_map(|s| s["run"].as_str().map(|r| r.replace("\\\n", " "))).collect()
}

fn uploads(job: &Value) -> String {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["uses"].as_str().is_some_and(|u| u.starts_with("actions/upload-artifact")))
        .map(|s| s["with"]["path"].as_str().unwrap().to_string())
        .collect()
}

live_test! {
    /// examples/ci/github-actions.yml: the shard matrix is 1..N and the report command runs
    /// shard `${{ matrix.shard }}/N` of the nightly suite with --junit; the shards together
    /// hold every case of the suite once (`report --list`); the merge job needs the shards
    /// and merges exactly their N directories; the JUnit files and the HTML page are uploaded.
    fn the_example_workflow_shards_cover_the_nightly_suite() {
        let w = workflow();
        let shard = &w["jobs"]["shard"];
        let merge = &w["jobs"]["merge"];
        let matrix: Vec<u64> = shard["strategy"]["matrix"]["shard"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let n = matrix.len() as u64;
        assert_eq!(matrix, (1..=n).collect::<Vec<_>>());
        let runs = step_runs(shard);
        let report = runs.iter().find(|r| r.contains("lockstep report")).expect("a report step");
        for needle in [
            "--suite scripts/suites/nightly.toml".to_string(),
            format!("--shard ${{{{ matrix.shard }}}}/{n}"),
            "--out reports/shard-${{ matrix.shard }}".into(),
            "--junit reports/shard-${{ matrix.shard }}.junit.xml".into(),
        ] {
            assert!(report.contains(&needle), "the report step lacks {needle:?}: {report}");
        }
        let up = uploads(shard);
        assert!(up.contains("reports/shard-${{ matrix.shard }}\n") && up.contains("reports/shard-${{ matrix.shard }}.junit.xml"), "{up}");
        assert!(repo().join("scripts/suites/nightly.toml").is_file());

        // The merge job merges the N shard directories, writes JUnit, uploads the page.
        assert_eq!(merge["needs"], "shard");
        let runs = step_runs(merge);
        let m = runs.iter().find(|r| r.contains("lockstep report merge")).expect("a merge step");
        let dirs: Vec<&str> = m.split_whitespace().filter(|a| a.starts_with("reports/shard-")).collect();
        assert_eq!(dirs, (1..=n).map(|i| format!("reports/shard-{i}")).collect::<Vec<_>>(), "{m}");
        assert!(m.contains("--out reports/nightly") && m.contains("--junit reports/nightly.junit.xml"), "{m}");
        let up = uploads(merge);
        assert!(up.contains("reports/nightly/index.html") && up.contains("reports/nightly.junit.xml"), "{up}");

        // Every case of the nightly suite is in exactly one of the N shards.
        let list = |shard: Option<u64>| -> Vec<String> {
            let mut c = lockstep();
            c.args(["report", "--suite", "scripts/suites/nightly.toml", "--out", "unused", "--list"]).current_dir(repo());
            if let Some(i) = shard {
                c.arg("--shard").arg(format!("{i}/{n}"));
            }
            let (code, out, err) = run(&mut c);
            assert_eq!(code, 0, "{err}");
            out.lines().map(str::to_string).collect()
        };
        let all = list(None);
        assert!(all.len() >= n as usize, "{all:?}");
        let mut seen = BTreeSet::new();
        for i in 1..=n {
            let part = list(Some(i));
            assert!(!part.is_empty(), "shard {i}/{n} runs nothing");
            for line in part {
                assert!(seen.insert(line.clone()), "a case in two shards: {line}");
            }
        }
        assert_eq!(seen, all.into_iter().collect::<BTreeSet<_>>());

        // The command lines themselves, on a small suite: N shards, then the merge, with the
        // workflow's paths; the merged report and JUnit file hold every case.
        let dir = tmp("ci-formats-workflow");
        let cases_toml: String = (0..n + 1)
            .map(|k| format!("[[case]]\nname = \"c{k}\"\nmodel = \"tiny\"\nreferences = [\"transformers\"]\nprompt = \"Hello {k}\"\nsteps = 2\n\n"))
            .collect();
        let small = dir.join("small.toml");
        std::fs::write(&small, format!("[suite]\nname = \"small\"\n{cases_toml}")).unwrap();
        let bash = |script: &str| {
            let script = script
                .replace("target/release/lockstep", env!("CARGO_BIN_EXE_lockstep"))
                .replace("scripts/suites/nightly.toml", small.to_str().unwrap());
            let (code, out, err) = run(Command::new("bash")
                .current_dir(&dir)
                .env("CI", "true")
                .env("LOCKSTEP_VENV", venv_path())
                .env_remove("LOCKSTEP_REFERENCES")
                .args(["-euo", "pipefail", "-c", &script]));
            assert_eq!(code, 0, "{script}\n{out}\n{err}");
        };
        let report = step_runs(shard).into_iter().find(|r| r.contains("lockstep report")).unwrap();
        for i in 1..=n {
            bash(&report.replace("${{ matrix.shard }}", &i.to_string()));
            assert!(dir.join(format!("reports/shard-{i}.junit.xml")).is_file());
        }
        bash(step_runs(merge).iter().find(|r| r.contains("lockstep report merge")).unwrap());
        assert!(dir.join("reports/nightly/index.html").is_file());
        let s = &junit(&[&dir.join("reports/nightly.junit.xml")])[0];
        assert_eq!((s["tests"].as_u64(), s["failures"].as_u64(), s["errors"].as_u64()), (Some(n + 1), Some(0), Some(0)), "{s}");
    }
}

/// Every `LOCKSTEP_*` name in `text`.
fn lockstep_vars(text: &str) -> BTreeSet<String> {
    let prefix = "LOCKSTEP_";
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(k) = text[i..].find(prefix) {
        let start = i + k;
        let mut end = start + prefix.len();
        while end < b.len() && (b[end].is_ascii_uppercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        let name = text[start..end].trim_end_matches('_');
        let word_start = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if word_start && name.len() > prefix.len() {
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            if !["target", "work", "artifacts", "corpus", "__pycache__", "node_modules"].contains(&name.as_str()) && !name.starts_with('.') {
                source_files(&p, out);
            }
        } else if [".rs", ".py", ".sh"].iter().any(|x| name.ends_with(x)) || name == "Makefile" {
            out.push(p);
        }
    }
}

/// The variables documented on the page: the first column's names.
fn undocumented(found: &BTreeSet<String>, page: &str) -> Vec<String> {
    found.iter().filter(|v| !page.contains(&format!("`{v}`"))).cloned().collect()
}

#[test]
fn every_lockstep_variable_the_code_reads_is_documented() {
    let root = repo();
    let mut files = vec![root.join("Makefile")];
    for d in ["src", "harness", "references", "scripts", "fuzz", "examples"] {
        source_files(&root.join(d), &mut files);
    }
    let mut found = BTreeSet::new();
    for f in &files {
        found.extend(lockstep_vars(&std::fs::read_to_string(f).unwrap_or_default()));
    }
    // Not vacuous: the scan sees the variables of the binary, the scripts and the tests.
    for v in ["LOCKSTEP_VENV", "LOCKSTEP_MODELS", "LOCKSTEP_TRACES", "LOCKSTEP_PYTHON", "LOCKSTEP_REQUIRE_LIVE", "LOCKSTEP_REPORT_WORKER"] {
        assert!(found.contains(v), "the scan missed {v}: {found:?}");
    }
    let page = std::fs::read_to_string(root.join("docs/environment.md")).unwrap();
    let missing = undocumented(&found, &page);
    assert!(missing.is_empty(), "read by the code but not in docs/environment.md: {missing:?}");
    // The check can fail: a name the page lacks is reported.
    let bogus = format!("{}{}", "LOCKSTEP_", "NOT_ON_THE_PAGE");
    let extra = lockstep_vars(&format!("std::env::var(\"{bogus}\")"));
    assert_eq!(undocumented(&extra, &page), vec![bogus]);

    // `lockstep --help` lists the main ones, and every one it lists is on the page.
    let (code, help, err) = run(lockstep().arg("--help"));
    assert_eq!(code, 0, "{err}");
    assert!(help.contains("docs/environment.md"), "{help}");
    let listed = lockstep_vars(&help);
    assert!(listed.contains("LOCKSTEP_VENV") && listed.contains("LOCKSTEP_MODELS"), "{help}");
    assert_eq!(undocumented(&listed, &page), Vec::<String>::new());
    assert!(help.contains("--json -"), "{help}");
}
