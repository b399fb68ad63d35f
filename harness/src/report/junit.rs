//! JUnit XML (`--junit PATH`) for CI systems: the test-report format that GitHub Actions
//! (through a reporter action), GitLab, Jenkins, Buildkite and Azure DevOps show natively.
//!
//! The shape is the common one (Ant's, which Jenkins' `junit-10.xsd` describes):
//! `<testsuites>` of `<testsuite name tests failures errors skipped time>` of
//! `<testcase classname name time>`, each with at most one `<failure message type>` or
//! `<error message type>` (text: the details) and an optional `<system-out>`.
//!
//! - `run`: one test case per step (a failed step carries the first divergence and its
//!   likely cause), and one for the checks before step 0 when the run stopped there;
//! - `bisect`: one test case, failed with the step, layer, site, isolation and diagnosis;
//! - `faults --check`: one per fault, failed when bisect did not localize it as the catalog
//!   says; a fault that does not apply to the model is skipped;
//! - `report` (and `report merge`): one per case of the suite, failed when the case is not
//!   as expected or regressed against the history, an error when it could not run.
//!
//! docs/ci.md says how CI systems read it.

use std::fmt::Write as _;

use crate::bisect::{BisectReport, CheckResult};
use crate::compare::tolerance::Verdict;
use crate::report::records::{CaseResult, Report};
use crate::results::run::{RunResult, StepRecord};

/// What one test case found.
#[derive(Debug, Clone, PartialEq)]
pub enum CaseOutcome {
    Pass,
    /// Something compared did not agree (`<failure>`).
    Failure { kind: String, message: String, text: String },
    /// The case could not run (`<error>`).
    Error { kind: String, message: String, text: String },
    Skipped { message: String },
}

#[derive(Debug, Clone)]
pub struct TestCase {
    pub classname: String,
    pub name: String,
    pub seconds: f64,
    pub outcome: CaseOutcome,
    pub system_out: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TestSuite {
    pub name: String,
    pub seconds: f64,
    pub properties: Vec<(String, String)>,
    pub cases: Vec<TestCase>,
}

impl TestSuite {
    fn count(&self, f: impl Fn(&CaseOutcome) -> bool) -> usize {
        self.cases.iter().filter(|c| f(&c.outcome)).count()
    }
}

/// XML 1.0 cannot carry most control characters, even escaped: they become `?`.
fn escape(s: &str, attr: bool) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' if attr => o.push_str("&quot;"),
            '\n' if attr => o.push_str("&#10;"),
            '\t' if attr => o.push_str("&#9;"),
            '\r' => o.push_str("&#13;"),
            '\t' | '\n' => o.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

/// The document: `<testsuites>` with every suite.
pub fn render(name: &str, suites: &[TestSuite]) -> String {
    let total = |f: &dyn Fn(&TestSuite) -> usize| suites.iter().map(f).sum::<usize>();
    let tests = total(&|s| s.cases.len());
    let failures = total(&|s| s.count(|o| matches!(o, CaseOutcome::Failure { .. })));
    let errors = total(&|s| s.count(|o| matches!(o, CaseOutcome::Error { .. })));
    let seconds: f64 = suites.iter().map(|s| s.seconds).sum();
    let mut o = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        o,
        "<testsuites name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{seconds:.3}\">",
        escape(name, true)
    );
    for s in suites {
        let _ = writeln!(
            o,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
            escape(&s.name, true),
            s.cases.len(),
            s.count(|o| matches!(o, CaseOutcome::Failure { .. })),
            s.count(|o| matches!(o, CaseOutcome::Error { .. })),
            s.count(|o| matches!(o, CaseOutcome::Skipped { .. })),
            s.seconds.max(0.0)
        );
        if !s.properties.is_empty() {
            o.push_str("    <properties>\n");
            for (k, v) in &s.properties {
                let _ = writeln!(o, "      <property name=\"{}\" value=\"{}\"/>", escape(k, true), escape(v, true));
            }
            o.push_str("    </properties>\n");
        }
        for c in &s.cases {
            let _ = write!(
                o,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                escape(&c.classname, true),
                escape(&c.name, true),
                c.seconds.max(0.0)
            );
            if c.outcome == CaseOutcome::Pass && c.system_out.is_none() {
                o.push_str("/>\n");
                continue;
            }
            o.push_str(">\n");
            match &c.outcome {
                CaseOutcome::Pass => {}
                CaseOutcome::Failure { kind, message, text } | CaseOutcome::Error { kind, message, text } => {
                    let tag = if matches!(c.outcome, CaseOutcome::Failure { .. }) { "failure" } else { "error" };
                    let _ = writeln!(
                        o,
                        "      <{tag} type=\"{}\" message=\"{}\">{}</{tag}>",
                        escape(kind, true),
                        escape(message, true),
                        escape(text, false)
                    );
                }
                CaseOutcome::Skipped { message } => {
                    let _ = writeln!(o, "      <skipped message=\"{}\"/>", escape(message, true));
                }
            }
            if let Some(out) = &c.system_out {
                let _ = writeln!(o, "      <system-out>{}</system-out>", escape(out, false));
            }
            o.push_str("    </testcase>\n");
        }
        o.push_str("  </testsuite>\n");
    }
    o.push_str("</testsuites>\n");
    o
}

/// `step 3 layer 1 layers.1.q_rope`: where, for one-line messages.
fn where_(step: usize, layer: Option<usize>, site: &str) -> String {
    format!("step {step}{} {site}", layer.map(|l| format!(" layer {l}")).unwrap_or_default())
}

fn step_name(s: &StepRecord) -> String {
    if s.step == 0 {
        format!("step 0 (prefill, {} tokens)", s.fed.len())
    } else {
        format!("step {}", s.step)
    }
}

/// Failing sites listed per step (the rest are counted).
const MAX_SITES: usize = 12;

/// The failing sites of one step, one line each, in forward order.
fn failing_sites(s: &StepRecord) -> Vec<String> {
    let mut lines = vec![];
    for rs in &s.references {
        for x in rs.sites.iter().filter(|x| x.verdict == Verdict::Fail) {
            let m = x.metrics.map(|m| format!("rel-L2 {:.3e}, cosine {:.6}", m.rel_l2, m.cosine)).unwrap_or_else(|| {
                format!("shapes differ: engine {:?}, reference {:?}", x.engine_shape, x.reference_shape)
            });
            lines.push(format!("{} vs {}: {m}{}", x.site, rs.reference, x.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()));
        }
        if rs.logits_verdict == Verdict::Fail {
            lines.push(format!("next token vs {}: KL {:.3e}", rs.reference, rs.logits.kl));
        }
    }
    lines
}

/// The first [`MAX_SITES`] lines, and how many more there are.
fn listed(sites: &[String]) -> Vec<String> {
    let mut v: Vec<String> = sites.iter().take(MAX_SITES).cloned().collect();
    if sites.len() > MAX_SITES {
        v.push(format!("... and {} more (the JSON report has every site)", sites.len() - MAX_SITES));
    }
    v
}

/// `lockstep run --junit`: one test case per step.
pub fn from_run(r: &RunResult, model: &str, references: &str) -> String {
    let classname = format!("lockstep.run.{}", short_model(model));
    let d = r.first_divergence.as_ref();
    let mut cases = vec![];
    if let Some(why) = &r.stopped_before_step0 {
        let text = d.map(|d| d.detail.clone()).unwrap_or_default();
        cases.push(TestCase {
            classname: classname.clone(),
            name: "before step 0 (prompt tokens, generation config)".into(),
            seconds: 0.0,
            outcome: CaseOutcome::Failure { kind: "diverged".into(), message: why.clone(), text },
            system_out: None,
        });
    }
    for s in &r.steps {
        let sites = failing_sites(s);
        let first_here = d.filter(|d| d.step == s.step);
        let outcome = if let Some(d) = first_here {
            let mut message = format!("first divergence: {} vs {}: {}", where_(d.step, d.layer, &d.site), d.reference, d.detail);
            if let Some(c) = &d.likely_cause {
                let _ = write!(message, "; likely cause: {c}");
            }
            let mut text = format!("first divergence\n  step      {}\n  layer     {}\n  site      {}\n  reference {}\n  detail    {}\n", d.step, d.layer.map(|l| l.to_string()).unwrap_or("-".into()), d.site, d.reference, d.detail);
            if let Some(c) = &d.likely_cause {
                let _ = writeln!(text, "  likely cause {c}");
            }
            if !sites.is_empty() {
                let _ = writeln!(text, "failing sites at this step:\n  {}", listed(&sites).join("\n  "));
            }
            text.push_str("`lockstep bisect` with the same flags localizes it and names the cause.\n");
            CaseOutcome::Failure { kind: "diverged".into(), message, text }
        } else if s.verdict == Verdict::Fail {
            CaseOutcome::Failure {
                kind: "diverged".into(),
                message: format!("step {}: {} failing site(s){}", s.step, sites.len(), sites.first().map(|x| format!(", first {x}")).unwrap_or_default()),
                text: listed(&sites).join("\n"),
            }
        } else {
            CaseOutcome::Pass
        };
        let drift = s.verdict == Verdict::Drift;
        cases.push(TestCase {
            classname: classname.clone(),
            name: step_name(s),
            seconds: s.engine_seconds + s.references.iter().map(|x| x.seconds).sum::<f64>(),
            outcome,
            system_out: Some(format!(
                "fed {:?}; engine chose {} {:?}{}",
                s.fed,
                s.engine_token,
                s.engine_token_text,
                if drift { "; drift (over the noise floor, under the failure bound)" } else { "" }
            )),
        });
    }
    // A divergence outside the steps (the free-running generate check): one more case.
    if let Some(d) = d.filter(|d| r.stopped_before_step0.is_none() && !r.steps.iter().any(|s| s.step == d.step)) {
        cases.push(TestCase {
            classname: classname.clone(),
            name: format!("{} ({})", d.site, d.reference),
            seconds: 0.0,
            outcome: CaseOutcome::Failure {
                kind: "diverged".into(),
                message: format!("first divergence: {} vs {}: {}", where_(d.step, d.layer, &d.site), d.reference, d.detail),
                text: d.detail.clone(),
            },
            system_out: None,
        });
    }
    let suite = TestSuite {
        name: format!("lockstep run {} vs {references}", short_model(model)),
        seconds: r.summary.engine_seconds + r.summary.references.iter().map(|x| x.seconds).sum::<f64>(),
        properties: vec![
            ("model".into(), model.into()),
            ("references".into(), references.into()),
            ("engine".into(), r.engine.name.clone()),
            ("verdict".into(), if r.verdict_pass { "pass" } else { "diverged" }.into()),
        ],
        cases,
    };
    render("lockstep run", &[suite])
}

/// `lockstep bisect --junit`: one test case.
pub fn from_bisect(b: &BisectReport, model: &str, references: &str) -> String {
    let outcome = if !b.found {
        CaseOutcome::Pass
    } else {
        let (step, site) = (b.step.unwrap_or(0), b.site.clone().unwrap_or_default());
        let mut message = format!("diverged at {}", where_(step, b.layer, &site));
        if let Some(r) = &b.reference {
            let _ = write!(message, " vs {r}");
        }
        if let Some(f) = &b.diagnosis {
            let _ = write!(message, "; diagnosis {}: {}", f.kind.name(), f.title);
        }
        let mut text = String::new();
        let _ = writeln!(text, "step {step}, layer {}, site {site}", b.layer.map(|l| l.to_string()).unwrap_or("-".into()));
        if let Some(d) = &b.detail {
            let _ = writeln!(text, "detail: {d}");
        }
        if let Some(i) = &b.isolation {
            let _ = writeln!(
                text,
                "isolation: layer {} is {} on the reference's input and cache{}",
                i.layer,
                i.verdict,
                i.first_failing_site.as_deref().map(|s| format!(" (first failing site {s})")).unwrap_or_default()
            );
        }
        if let Some(f) = &b.diagnosis {
            let _ = writeln!(text, "diagnosis: {} ({})", f.kind.name(), f.title);
            for e in &f.evidence {
                let _ = writeln!(text, "  - {e}");
            }
        }
        CaseOutcome::Failure { kind: "diverged".into(), message, text }
    };
    let suite = TestSuite {
        name: format!("lockstep bisect {} vs {references}", short_model(model)),
        seconds: b.seconds,
        properties: vec![
            ("model".into(), model.into()),
            ("references".into(), references.into()),
            ("faults".into(), b.faults_injected.join(",")),
        ],
        cases: vec![TestCase {
            classname: format!("lockstep.bisect.{}", short_model(model)),
            name: format!("bisect ({} of {} steps run)", b.steps_run, b.steps_requested),
            seconds: b.seconds,
            outcome,
            system_out: None,
        }],
    };
    render("lockstep bisect", &[suite])
}

/// `lockstep faults --check --junit`: one test case per fault.
pub fn from_faults(rows: &[CheckResult], model: &str, references: &str) -> String {
    let cases = rows
        .iter()
        .map(|r| TestCase {
            classname: format!("lockstep.faults.{}", short_model(model)),
            name: r.fault.clone(),
            seconds: r.seconds,
            outcome: if !r.applicable {
                CaseOutcome::Skipped { message: format!("does not apply to this model: {}", r.note) }
            } else if r.ok {
                CaseOutcome::Pass
            } else {
                CaseOutcome::Failure {
                    kind: "not-localized".into(),
                    message: format!("{}: expected {}, bisect found {}", r.fault, r.expected, r.found),
                    text: format!("expected:     {}\nbisect found: {}\n{}\n", r.expected, r.found, r.note),
                }
            },
            system_out: (r.applicable && r.ok).then(|| format!("bisect found {} ({})", r.found, r.note)),
        })
        .collect();
    let suite = TestSuite {
        name: format!("lockstep faults --check {} vs {references}", short_model(model)),
        seconds: rows.iter().map(|r| r.seconds).sum(),
        properties: vec![("model".into(), model.into()), ("references".into(), references.into())],
        cases,
    };
    render("lockstep faults --check", &[suite])
}

fn case_outcome(c: &CaseResult, regression: Option<&str>) -> CaseOutcome {
    if c.verdict == "error" {
        let e = c.error.clone().unwrap_or_default();
        return CaseOutcome::Error {
            kind: if c.crashed { "crashed".into() } else { "error".into() },
            message: e.lines().next().unwrap_or("error").to_string(),
            text: e,
        };
    }
    if c.as_expected && regression.is_none() {
        return CaseOutcome::Pass;
    }
    let mut message = if c.as_expected {
        format!("regression: {}", regression.unwrap_or_default())
    } else {
        format!("{} (expected {})", c.verdict, c.def.expect)
    };
    let mut text = String::new();
    if let Some(d) = &c.first_divergence {
        let _ = write!(message, "; first divergence {} vs {}", where_(d.step, d.layer, &d.site), d.reference);
        let _ = writeln!(text, "first divergence: {} vs {}: {}", where_(d.step, d.layer, &d.site), d.reference, d.detail);
    }
    if let Some(b) = c.bisect.as_ref().filter(|b| b.found) {
        if let (Some(name), Some(title)) = (&b.diagnosis, &b.diagnosis_title) {
            let _ = write!(message, "; diagnosis {name}: {title}");
        }
        let _ = writeln!(
            text,
            "bisect: {}{}",
            where_(b.step.unwrap_or(0), b.layer, b.site.as_deref().unwrap_or("")),
            b.isolation.as_deref().map(|i| format!("; isolation: {i}")).unwrap_or_default()
        );
        if let Some(name) = &b.diagnosis {
            let _ = writeln!(text, "diagnosis: {name} ({})", b.diagnosis_title.as_deref().unwrap_or(""));
        }
        for e in &b.evidence {
            let _ = writeln!(text, "  - {e}");
        }
    } else if let Some(e) = c.bisect.as_ref().and_then(|b| b.error.as_deref()) {
        let _ = writeln!(text, "bisect failed: {e}");
    }
    if let Some(s) = &c.stopped_before_step0 {
        let _ = writeln!(text, "stopped before step 0: {s}");
    }
    if let Some(r) = regression.filter(|_| !c.as_expected) {
        let _ = writeln!(text, "regression: {r}");
    }
    let kind = if regression.is_some() { "regression" } else { "not-as-expected" };
    CaseOutcome::Failure { kind: kind.into(), message, text }
}

/// `lockstep report --junit`: one test case per case of the report.
pub fn from_report(rep: &Report) -> String {
    let cases = rep
        .cases
        .iter()
        .map(|c| {
            let regression = rep.regressions.iter().find(|r| r.case == c.name).map(|r| r.reason.as_str());
            TestCase {
                classname: format!("lockstep.report.{}", rep.suite.name),
                name: c.name.clone(),
                seconds: c.timing.total_s,
                outcome: case_outcome(c, regression),
                system_out: Some(if c.def.about.is_empty() {
                    crate::report::nightly::case_line(c)
                } else {
                    format!("{}\n{}", crate::report::nightly::case_line(c), c.def.about)
                }),
            }
        })
        .collect();
    let mut properties = vec![("suite".into(), rep.suite.name.clone()), ("lockstep".into(), rep.lockstep_version.clone())];
    if let Some(s) = &rep.shard {
        properties.push(("shard".into(), s.clone()));
    }
    let suite = TestSuite {
        name: format!("lockstep report {}{}", rep.suite.name, rep.shard.as_deref().map(|s| format!(" (shard {s})")).unwrap_or_default()),
        seconds: rep.cases.iter().map(|c| c.timing.total_s).sum(),
        properties,
        cases,
    };
    render(&format!("lockstep report {}", rep.suite.name), &[suite])
}

/// The model's file or directory name (`tiny-hf`, `model.gguf`).
fn short_model(model: &str) -> String {
    std::path::Path::new(model).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| model.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(outcome: CaseOutcome) -> TestSuite {
        TestSuite {
            name: "s".into(),
            seconds: 1.5,
            properties: vec![("model".into(), "a\"b".into())],
            cases: vec![TestCase { classname: "c".into(), name: "n<1>".into(), seconds: 0.25, outcome, system_out: None }],
        }
    }

    #[test]
    fn counts_and_escapes() {
        let x = render(
            "all & one",
            &[suite(CaseOutcome::Failure { kind: "diverged".into(), message: "a \"b\"\nc".into(), text: "x < y & \u{1} z".into() })],
        );
        assert!(x.contains("<testsuites name=\"all &amp; one\" tests=\"1\" failures=\"1\" errors=\"0\" time=\"1.500\">"), "{x}");
        assert!(x.contains("failures=\"1\" errors=\"0\" skipped=\"0\""), "{x}");
        assert!(x.contains("name=\"n&lt;1&gt;\""), "{x}");
        assert!(x.contains("message=\"a &quot;b&quot;&#10;c\""), "{x}");
        assert!(x.contains(">x &lt; y &amp; ? z</failure>"), "{x}");
        assert!(x.contains("<property name=\"model\" value=\"a&quot;b\"/>"), "{x}");
        let e = render("e", &[suite(CaseOutcome::Error { kind: "error".into(), message: "m".into(), text: String::new() })]);
        assert!(e.contains("tests=\"1\" failures=\"0\" errors=\"1\""), "{e}");
        let p = render("p", &[suite(CaseOutcome::Pass)]);
        assert!(p.contains("time=\"0.250\"/>") && !p.contains("<failure"), "{p}");
    }

    fn row(fault: &str, applicable: bool, ok: bool) -> CheckResult {
        CheckResult {
            fault: fault.into(),
            applicable,
            note: "why".into(),
            expected: "step 0, layers.0.q_rope [rope-base]".into(),
            found: if ok { "step 0, layers.0.q_rope [rope-base]".into() } else { "nothing".into() },
            ok,
            seconds: 0.5,
        }
    }

    #[test]
    fn a_fault_bisect_misses_is_a_failure_and_one_that_does_not_apply_is_skipped() {
        let x = from_faults(&[row("rope-theta", true, false), row("q4_1-min", false, false), row("rms-eps", true, true)], "tiny", "transformers");
        assert!(x.contains("tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""), "{x}");
        assert!(x.contains("message=\"rope-theta: expected step 0, layers.0.q_rope [rope-base], bisect found nothing\""), "{x}");
        assert!(x.contains("<skipped message=\"does not apply to this model: why\"/>"), "{x}");
    }
}
