//! `lockstep report`: the CI suite's page checked in a real browser (headless Chromium),
//! a failing and a crashing case that do not stop the others, resume, shards + merge equal
//! to one unsharded run, and history regressions.
//!
//! Live tests (they run the references): ignored with the command that enables them where
//! the reference environment did not exist at build time (build.rs); `make test` requires
//! them (LOCKSTEP_REQUIRE_LIVE=1, checked in tests/cli.rs). The browser test needs
//! Debian's `chromium` (`scripts/setup_browser.sh`, run by `make setup`): without it, it fails
//! and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::*;

fn report_cmd() -> Command {
    let mut c = lockstep();
    // Plain log lines, as in CI.
    c.env("CI", "true").env_remove("LOCKSTEP_REPORT_DATE").env_remove("LOCKSTEP_REPORT_TEST_PANIC");
    c
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// report.json without its timing fields (`timing`, `generated_at`): what must be equal
/// between two runs of the same suite.
fn without_timings(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("timing");
                m.remove("generated_at");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

fn case<'a>(rep: &'a Value, name: &str) -> &'a Value {
    rep["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}"))
}

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("LOCKSTEP_CHROMIUM").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in ["chromium", "chromium-browser"] {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("headless Chromium is needed to check the report page: run `scripts/setup_browser.sh` (or `make setup`), or set LOCKSTEP_CHROMIUM");
}

fn headless(extra: &[String], page: &Path) -> (i32, String, String) {
    let mut c = Command::new(chromium());
    c.args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-dev-shm-usage"])
        .args(extra)
        .arg(format!("file://{}", page.canonicalize().unwrap().display()));
    run(&mut c)
}

fn attr(dom: &str, name: &str) -> String {
    let key = format!("{name}=\"");
    let i = dom.find(&key).unwrap_or_else(|| panic!("no {name} in the rendered DOM"));
    dom[i + key.len()..].split('"').next().unwrap().to_string()
}

/// What the page's script read back from the rendered DOM (`<script id="self-check">`): the
/// summary rows in order, and per case card its open state, first-divergence lines, chart
/// guides and heatmap cells.
fn self_check(dom: &str) -> Value {
    let key = r#"<script type="application/json" id="self-check">"#;
    let i = dom.find(key).unwrap_or_else(|| panic!("no self-check in the rendered DOM"));
    let body = &dom[i + key.len()..];
    serde_json::from_str(&body[..body.find("</script>").expect("self-check closed")]).expect("self-check is JSON")
}

/// The report page leads with failures, one first divergence per card, charts with their
/// bounds and floor, one colour scale: checked on the DOM Chromium rendered from `rep`.
fn assert_page_leads_with_failures(dom: &str, rep: &Value) {
    let chk = self_check(dom);
    assert_eq!(chk["guides"], chk["guides_drawn"], "every bound/floor line has a drawn size: {}", chk["guides"]);
    let rows = chk["summary"].as_array().unwrap();
    let cases = rep["cases"].as_array().unwrap();
    assert_eq!(rows.len(), cases.len());
    // Sorted: by verdict class (error, diverged, drift, pass), then worst error ÷ pass bound, largest first.
    let rank = |v: &str| ["error", "diverged", "drift", "pass"].iter().position(|x| *x == v).unwrap_or_else(|| panic!("verdict class {v}"));
    for w in rows.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let (ra, rb) = (rank(a["verdict"].as_str().unwrap()), rank(b["verdict"].as_str().unwrap()));
        assert_eq!(a["rank"].as_u64().unwrap() as usize, ra);
        assert!(ra <= rb, "{} ({ra}) above {} ({rb})", a["case"], b["case"]);
        if ra == rb {
            let (x, y) = (a["ratio"].as_f64().unwrap_or(f64::NEG_INFINITY), b["ratio"].as_f64().unwrap_or(f64::NEG_INFINITY));
            assert!(x >= y, "within a class the worse case first: {} {x} above {} {y}", a["case"], b["case"]);
        }
    }
    let pos = |v: &str| rows.iter().position(|r| r["verdict"] == v);
    let last_diverged = rows.iter().rposition(|r| r["verdict"] == "diverged").expect("a diverged case on the page");
    assert!(pos("pass").is_none_or(|p| p > last_diverged), "a failing case above the passing ones: {rows:?}");
    for r in rows {
        let c = case(rep, r["case"].as_str().unwrap());
        let d = r["diagnosis"].as_str().expect("a diagnosis cell");
        match c["verdict"].as_str().unwrap() {
            // Bisect's named cause, as report.json has it.
            "diverged" => {
                let title = c["bisect"]["diagnosis_title"].as_str().unwrap_or_else(|| panic!("{} diverged without a diagnosis: {}", c["name"], c["bisect"]));
                assert!(d.contains(title) && d.contains(c["bisect"]["diagnosis"].as_str().unwrap()), "{d}");
            }
            "error" => assert!(d.starts_with("error: "), "{d}"),
            _ if c["drift"] == true => assert!(d.starts_with("drift"), "{d}"),
            _ => assert_eq!(d, "within bounds"),
        }
        // The worst ratio is report.json's.
        assert_eq!(r["ratio"].as_f64(), c["worst"]["ratio"].as_f64(), "{}", c["name"]);
    }
    // The cards, in the summary's order: failures open, passing cases closed.
    let cards = chk["cases"].as_array().unwrap();
    let names = |v: &[Value]| v.iter().map(|x| x["case"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(names(cards), names(rows), "cards in the summary's order");
    let (mut cool_seen, mut hot_seen) = (false, false);
    let scales: std::collections::BTreeSet<String> = cards.iter().filter_map(|k| k["heatmap"]["scale"].as_str().map(String::from)).collect();
    assert_eq!(scales.len(), 1, "one colour scale for every heatmap: {scales:?}");
    for k in cards {
        let c = case(rep, k["case"].as_str().unwrap());
        let failed = c["verdict"] != "pass" || c["as_expected"] == false;
        assert_eq!(k["open"], failed, "{}: failures open, passing cases closed", c["name"]);
        // Exactly one first divergence per diverged card; none on a passing one.
        let want = u64::from(c["verdict"] == "diverged");
        assert_eq!(k["first_divergence"], want, "{}", c["name"]);
        assert_eq!(k["first_divergence_text"], want, "{}: the words \"first divergence\" once", c["name"]);
        if c["bisect"]["found"] == true && !c["first_divergence"].is_null() {
            assert_eq!(k["secondary"], 1, "{}: the run's first failing site shown as secondary evidence", c["name"]);
        }
        if c["steps"].as_array().unwrap().is_empty() {
            continue;
        }
        // Bound lines on the error-per-layer and KL charts; the noise floor where two references ran.
        for chart in ["layer_chart", "kl_chart"] {
            let g = &k[chart];
            assert!(g["pass"].as_u64().unwrap() >= 1 && g["fail"].as_u64().unwrap() >= 1, "{} {chart}: {g}", c["name"]);
            let two = c["references"].as_array().unwrap().len() >= 2;
            assert_eq!(g["floor"].as_u64().unwrap() >= 1, two, "{} {chart}: a noise floor with two references: {g}", c["name"]);
        }
        // The fixed scale: a clean case all cool, a case over its bounds with hot cells.
        let h = &k["heatmap"];
        assert_eq!(h["unbounded"], 0, "{}: every cell has its bound", c["name"]);
        let (cool, hot) = (h["cool"].as_u64().unwrap(), h["hot"].as_u64().unwrap());
        let worst = c["worst"]["ratio"].as_f64().unwrap();
        if c["verdict"] == "pass" && c["drift"] == false {
            assert!(cool > 0 && hot == 0, "{}: a clean case is all cool ({cool} cool, {hot} hot)", c["name"]);
            cool_seen = true;
        }
        if c["verdict"] == "diverged" && worst > 1.0 {
            assert!(hot > 0, "{}: a case over its bounds has hot cells ({cool} cool, {hot} hot)", c["name"]);
            hot_seen = true;
        }
    }
    assert!(cool_seen && hot_seen, "the page shows a clean case and a failing one");
}

live_test! {
    /// What `make test` runs: the CI suite into reports/ci (finished cases are reused: `make
    /// test` ran it just before), then the page in headless Chromium: the summary table and
    /// every chart rendered (the page's own script measures each chart's drawn paths and
    /// writes the counts onto <body>), and a screenshot in reports/ci/screenshot.png.
    fn ci_suite_report_renders_in_headless_chromium() {
        let out = repo().join("reports/ci");
        let (code, stdout, stderr) = run(report_cmd().current_dir(repo()).args(["report", "--suite", "scripts/suites/ci.toml", "--out", "reports/ci"]));
        assert_eq!(code, 0, "every case as expected (the canary diverges):\nstdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(!stderr.contains('\r'), "no progress bar without a terminal:\n{stderr}");
        let rep = read_json(&out.join("report.json"));
        assert_eq!(rep["schema_version"], 1);
        let n = rep["cases"].as_array().unwrap().len();
        assert!(n >= 4, "{n} cases");
        // All pass but the canary, whose fault bisect localizes to the cache.
        assert_eq!(rep["totals"]["pass"], n - 1, "{stdout}");
        assert_eq!(rep["totals"]["diverged"], 1, "{stdout}");
        assert_eq!(rep["totals"]["not_as_expected"], 0, "{stdout}");
        let canary = case(&rep, "canary-drop-context");
        assert_eq!(canary["bisect"]["diagnosis"], "context-dropped", "{}", canary["bisect"]);
        assert!(canary["bisect"]["site"].as_str().unwrap().ends_with("cache_k"), "{}", canary["bisect"]);
        assert!(std::fs::read_to_string(out.join("summary.md")).unwrap().contains("| case | verdict |"));
        let html = std::fs::read_to_string(out.join("index.html")).unwrap();
        // Self-contained: nothing fetched from anywhere.
        for needle in ["http://", "https://", "src=", "@import", "url("] {
            let hits: Vec<_> = html.match_indices(needle).map(|(i, _)| &html[i.saturating_sub(30)..(i + 40).min(html.len())]).collect();
            let allowed = |h: &&str| h.contains("xmlns=\"http://www.w3.org/2000/svg\"");
            assert!(hits.iter().all(allowed), "external reference {needle}: {hits:?}");
        }

        let page = out.join("index.html");
        let (code, dom, err) = headless(&["--dump-dom".into(), "--virtual-time-budget=5000".into()], &page);
        assert_eq!(code, 0, "chromium --dump-dom failed:\n{err}");
        assert_eq!(attr(&dom, "data-render"), "ok", "the page's self-check failed");
        assert_eq!(attr(&dom, "data-summary-rows"), n.to_string());
        let charts: usize = attr(&dom, "data-charts").parse().unwrap();
        assert_eq!(attr(&dom, "data-charts-drawn"), charts.to_string());
        // Four charts per case: error per layer, heatmap, KL per step, token margins.
        assert_eq!(charts, 4 * n, "charts");
        assert!(dom.contains(r#"<table id="summary">"#));
        let paths = dom.matches("<path ").count();
        let empty = dom.matches(r#"d="""#).count();
        assert!(paths >= charts && empty == 0, "{paths} paths, {empty} empty");
        for c in rep["cases"].as_array().unwrap() {
            assert!(dom.contains(&format!(">{}</a>", c["name"].as_str().unwrap())), "summary row of {}", c["name"]);
        }
        assert_page_leads_with_failures(&dom, &rep);

        let shot = out.join("screenshot.png");
        let _ = std::fs::remove_file(&shot);
        let (code, _, err) = headless(&[format!("--screenshot={}", shot.display()), "--window-size=1280,2400".into()], &page);
        assert_eq!(code, 0, "screenshot failed:\n{err}");
        let png = std::fs::read(&shot).expect("screenshot written");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "{} bytes", png.len());
        // A phone-sized one too (the page is responsive: no horizontal overflow of the body).
        let phone = out.join("screenshot-phone.png");
        let (code, _, err) = headless(&[format!("--screenshot={}", phone.display()), "--window-size=390,1600".into()], &page);
        assert_eq!(code, 0, "phone screenshot failed:\n{err}");
    }
}

const OK_CASE: &str = r#"
[[case]]
name = "tiny-ok"
model = "tiny"
references = ["transformers"]
chat = "What is the capital of France?"
steps = 3
"#;

fn write_suite(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, format!("[suite]\nname = \"{name}\"\n{body}")).unwrap();
    p
}

live_test! {
    /// One case with an injected fault (it fails, bisect names it), one with an unreadable
    /// model, one that panics, one with a LoRA adapter directory that does not exist: each is in the
    /// report with its error, and the cases after them still run. A second run resumes.
    fn a_failing_and_a_crashing_case_do_not_stop_the_others() {
        let dir = tmp("report-fail-crash");
        let garbage = dir.join("broken.gguf");
        std::fs::write(&garbage, b"GGUF\x03\x00\x00\x00 this is not a model").unwrap();
        let body = format!(
            r#"
    [[case]]
    name = "fault-rope-theta"
    model = "tiny"
    references = ["transformers"]
    chat = "What is the capital of France?"
    steps = 4
    inject = "rope-theta"

    [[case]]
    name = "crash-unreadable-model"
    model = "{}"
    references = ["transformers"]
    prompt = "Hello"
    steps = 3

    [[case]]
    name = "panics"
    model = "tiny"
    references = ["transformers"]
    prompt = "Hello"
    steps = 3

    [[case]]
    name = "with-lora"
    model = "tiny"
    references = ["transformers"]
    prompt = "Hello"
    steps = 3
    lora = "adapters/none"
    {OK_CASE}"#,
            garbage.display()
        );
        let suite = write_suite(&dir, "failcrash", &body);
        let out = dir.join("out");
        let (code, stdout, stderr) = run(report_cmd()
            .env("LOCKSTEP_REPORT_TEST_PANIC", "panics")
            .args(["report", "--suite"])
            .arg(&suite)
            .arg("--out")
            .arg(&out));
        assert_eq!(code, 1, "cases not as expected: exit 1\nstdout:\n{stdout}\nstderr:\n{stderr}");
        let rep = read_json(&out.join("report.json"));
        assert_eq!(rep["totals"]["cases"], 5);
        assert_eq!(rep["totals"]["pass"], 1);
        assert_eq!(rep["totals"]["diverged"], 1);
        assert_eq!(rep["totals"]["error"], 3);

        let f = case(&rep, "fault-rope-theta");
        assert_eq!(f["verdict"], "diverged");
        assert_eq!(f["first_divergence"]["step"], 0);
        assert_eq!(f["bisect"]["diagnosis"], "rope-base", "{}", f["bisect"]);
        assert_eq!(f["bisect"]["layer"], 0);
        assert!(f["bisect"]["site"].as_str().unwrap().ends_with("q_rope"), "{}", f["bisect"]);

        let c = case(&rep, "crash-unreadable-model");
        assert_eq!(c["verdict"], "error");
        assert!(c["error"].as_str().unwrap().contains("broken.gguf"), "{}", c["error"]);
        let p = case(&rep, "panics");
        assert_eq!(p["verdict"], "error");
        assert!(p["error"].as_str().unwrap().starts_with("panicked:"), "{}", p["error"]);
        let l = case(&rep, "with-lora");
        assert!(l["error"].as_str().unwrap().contains("adapters/none"), "a missing adapter directory is named: {}", l["error"]);
        // The case after the failures ran.
        let ok = case(&rep, "tiny-ok");
        assert_eq!(ok["verdict"], "pass");
        assert!(ok["steps"].as_array().unwrap().len() == 3);

        let html = std::fs::read_to_string(out.join("index.html")).unwrap();
        assert!(html.contains("broken.gguf") && html.contains("panicked:") && html.contains("rope-base"));
        // The page with failures renders too: the bisect diagnosis, the errors, every chart drawn.
        let (code, dom, err) = headless(&["--dump-dom".into(), "--virtual-time-budget=5000".into()], &out.join("index.html"));
        assert_eq!(code, 0, "chromium --dump-dom failed:\n{err}");
        assert_eq!(attr(&dom, "data-render"), "ok", "the page's self-check failed");
        assert_eq!(attr(&dom, "data-summary-rows"), "5");
        assert_eq!(attr(&dom, "data-charts"), "8", "four charts for each case that ran steps (the fault and tiny-ok)");
        assert_eq!(attr(&dom, "data-charts-drawn"), "8");
        assert!(dom.contains("<b>diagnosis</b>") && dom.contains("panicked:"));
        assert_page_leads_with_failures(&dom, &rep);
        let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
        assert!(md.contains("**error**") && md.contains("**diverged**"), "{md}");

        // Resume: every case is finished, none runs again; the report is the same.
        let (code, _, stderr) = run(report_cmd().args(["report", "--suite"]).arg(&suite).arg("--out").arg(&out));
        assert_eq!(code, 1);
        assert!(stderr.contains("5 already finished") && !stderr.contains("running"), "{stderr}");
        assert_eq!(without_timings(read_json(&out.join("report.json"))), without_timings(rep));

        // A case finished by another build of lockstep is run again.
        let f = out.join("cases/tiny-ok.json");
        let mut c = read_json(&f);
        c["build"] = Value::from("another-build");
        std::fs::write(&f, c.to_string()).unwrap();
        let (code, _, stderr) = run(report_cmd().args(["report", "--suite"]).arg(&suite).arg("--out").arg(&out));
        assert_eq!(code, 1);
        assert!(stderr.contains("4 already finished") && stderr.contains("[1/1] tiny-ok: pass"), "{stderr}");
    }
}

fn shard_suite(dir: &Path) -> PathBuf {
    write_suite(
        dir,
        "shards",
        &format!(
            r#"{OK_CASE}
[[case]]
name = "tiny-gguf-mlx"
model = "tiny-gguf"
references = ["transformers", "mlx"]
prompt = "The quick brown fox"
steps = 3

[[case]]
name = "fault-drop-context"
model = "tiny"
references = ["transformers"]
chat = "What is the capital of France?"
steps = 4
inject = "drop-context"

[[case]]
name = "tiny-sampled"
model = "tiny"
references = ["transformers"]
chat = "Tell me a story."
sampler = "temp=0.8,top_p=0.95,seed=1"
steps = 3
"#
        ),
    )
}

live_test! {
    /// `--shard 1/2` + `--shard 2/2` + `report merge` gives the report of one unsharded run
    /// (report.json identical but for its timing fields).
    fn shards_merged_equal_an_unsharded_run() {
        let dir = tmp("report-shards");
        let suite = shard_suite(&dir);
        let go = |extra: &[&str], out: &Path| {
            let (code, stdout, stderr) = run(report_cmd().args(["report", "--suite"]).arg(&suite).arg("--out").arg(out).args(extra));
            assert!(code == 0 || code == 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
            code
        };
        let full = go(&["--full-json"], &dir.join("full"));
        let s1 = go(&["--shard", "1/2", "--full-json"], &dir.join("s1"));
        let s2 = go(&["--shard", "2/2", "--full-json"], &dir.join("s2"));
        assert_eq!(full, 1, "the fault case diverges");
        // Case k goes to shard k % 2 + 1: cases 0 and 2 (the fault) in shard 1, 1 and 3 in shard 2.
        assert_eq!((s1, s2), (1, 0));
        let s1rep = read_json(&dir.join("s1/report.json"));
        assert_eq!(s1rep["shard"], "1/2");
        assert_eq!(s1rep["cases"].as_array().unwrap().len(), 2);
        let (code, stdout, stderr) = run(lockstep()
            .args(["report", "merge"])
            .arg(dir.join("s1"))
            .arg(dir.join("s2"))
            .arg("--out")
            .arg(dir.join("merged")));
        assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
        let a = without_timings(read_json(&dir.join("full/report.json")));
        let b = without_timings(read_json(&dir.join("merged/report.json")));
        assert_eq!(a["cases"].as_array().unwrap().len(), 4);
        if a != b {
            let (ta, tb) = (serde_json::to_string_pretty(&a).unwrap(), serde_json::to_string_pretty(&b).unwrap());
            let first = ta.lines().zip(tb.lines()).enumerate().find(|(_, (x, y))| x != y);
            panic!("merged report differs from the unsharded one; first differing line: {first:?}");
        }
        assert!(dir.join("merged/index.html").is_file() && dir.join("merged/summary.md").is_file());
        // --full-json: each case's complete run report (docs/contract.md's keys), copied by merge.
        let run = read_json(&dir.join("merged/runs/fault-drop-context.json"));
        assert_eq!(run["verdict"], "diverged");
        assert!(run["steps"][0]["references"][0]["sites"].as_array().unwrap().len() > 10);
        assert!(run["model"]["sha256"].as_str().unwrap().len() == 64);
        // Merging directories of another suite is refused.
        let other = dir.join("other");
        std::fs::create_dir_all(&other).unwrap();
        let mut rec = read_json(&dir.join("s1/suite.json"));
        rec["suite"]["name"] = Value::from("another");
        std::fs::write(other.join("suite.json"), rec.to_string()).unwrap();
        assert_exit_2(
            &["report", "merge", dir.join("s1").to_str().unwrap(), other.to_str().unwrap(), "--out", dir.join("m2").to_str().unwrap()],
            &[],
            &["another suite"],
        );
    }
}

live_test! {
    /// History: a first night passes (exit 0), the second night the same case fails (a fault
    /// injected): exit 1 with the regression named, and the page shows the trend.
    fn a_case_that_passed_last_night_and_fails_now_exits_1() {
        let dir = tmp("report-history");
        let hist = dir.join("history.jsonl");
        let night = |date: &str, inject: &str, out: &str| {
            let suite = write_suite(&dir, "hist", &format!("{OK_CASE}{inject}\n"));
            run(report_cmd()
                .env("LOCKSTEP_REPORT_DATE", date)
                .args(["report", "--suite"])
                .arg(&suite)
                .arg("--out")
                .arg(dir.join(out))
                .arg("--history")
                .arg(&hist))
        };
        let (code, out, err) = night("2026-11-20T02:00:00Z", "", "n1");
        assert_eq!(code, 0, "{out}\n{err}");
        let (code, out, err) = night("2026-11-21T02:00:00Z", "", "n2");
        assert_eq!(code, 0, "{out}\n{err}");
        let (code, out, err) = night("2026-11-22T02:00:00Z", "inject = \"rope-theta\"", "n3");
        assert_eq!(code, 1, "{out}\n{err}");
        let rep = read_json(&dir.join("n3/report.json"));
        let regs = rep["regressions"].as_array().unwrap();
        assert_eq!(regs.len(), 1, "{regs:?}");
        assert_eq!(regs[0]["case"], "tiny-ok");
        assert!(regs[0]["reason"].as_str().unwrap().contains("was pass on 2026-11-21"), "{}", regs[0]["reason"]);
        assert_eq!(rep["trend"]["tiny-ok"].as_array().unwrap().len(), 3);
        let lines = std::fs::read_to_string(&hist).unwrap();
        assert_eq!(lines.lines().count(), 3);
        let html = std::fs::read_to_string(dir.join("n3/index.html")).unwrap();
        assert!(html.contains("Regressions since the last report") && html.contains(r#"class="spark""#));
        // A known failure the next night is no regression: exit 0, still diverged on the page.
        let (code, out, err) = night("2026-11-23T02:00:00Z", "inject = \"rope-theta\"", "n4");
        assert_eq!(code, 0, "{out}\n{err}");
    }
}

/// The committed suites parse; the nightly matrix expands to named cases (no Python needed).
#[test]
fn committed_suites_parse_and_the_nightly_matrix_expands() {
    let list = |suite: &str, extra: &[&str]| {
        let (code, out, err) = run(lockstep().current_dir(repo()).args(["report", "--suite", suite, "--out", "/nonexistent", "--list"]).args(extra));
        assert_eq!(code, 0, "{out}\n{err}");
        out
    };
    let ci = list("scripts/suites/ci.toml", &[]);
    assert_eq!(ci.lines().count(), 10, "{ci}");
    assert!(ci.contains("canary-drop-context"), "the CI suite has a failing case for the page: {ci}");
    assert!(ci.contains("tiny-qwen2-gguf"), "{ci}");
    assert!(ci.contains("lora=snapshots/adapters/tiny-peft"), "{ci}");
    let nightly = list("scripts/suites/nightly.toml", &[]);
    for name in ["smollm2-llamacpp-capital-greedy", "smollm2-llamacpp-count-t08", "smollm2-f32-count", "fixture-tiny-gguf-t08", "quant-tiny-k-q6_k", "canary-rope-theta", "smollm2-lora-f32", "tiny-lora-mlx",
                 "qwen25-llamacpp-code", "qwen25-f32", "qwen2-fixture-tiny-qwen2-gguf"] {
        assert!(nightly.contains(name), "{name} not in\n{nightly}");
    }
    let n = nightly.lines().count();
    let (a, b) = (list("scripts/suites/nightly.toml", &["--shard", "1/2"]), list("scripts/suites/nightly.toml", &["--shard", "2/2"]));
    assert_eq!(a.lines().count() + b.lines().count(), n);
}

/// Usage errors exit 2 and name the file and the problem (no Python needed).
#[test]
fn bad_suites_exit_2() {
    let dir = tmp("report-bad");
    let p = write_suite(&dir, "bad", "[[case]]\nname = \"x\"\nmodel = \"tiny\"\nreferences = [\"transformers\"]\nsteps = 2\n");
    assert_exit_2(&["report", "--suite", p.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()], &[], &["bad.toml", "`x`", "prompt"]);
    assert_exit_2(&["report", "--suite", "no/such/suite.toml", "--out", dir.join("o").to_str().unwrap()], &[], &["no/such/suite.toml"]);
    let ok = write_suite(&dir, "ok", OK_CASE);
    assert_exit_2(&["report", "--suite", ok.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap(), "--shard", "3/2"], &[], &["--shard"]);
    assert_exit_2(&["report", "merge", dir.join("nothing-here").to_str().unwrap(), "--out", dir.join("m").to_str().unwrap()], &[], &["suite.json"]);
}
