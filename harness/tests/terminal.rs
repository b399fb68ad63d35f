//! What a person sees: rows that stream as the steps are computed, a spinner on a terminal
//! (plain lines without one), tables laid out for the width, colour that `NO_COLOR` turns
//! off, `--quiet` and `-v`. A terminal is a real pseudo-terminal (`script`, util-linux).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

mod common;
use common::*;

const PROMPT: &str = "The capital of France is";

/// `s` without its terminal control sequences (ESC [ ... final byte).
fn strip_csi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn lines_wider_than(text: &str, width: usize) -> Vec<String> {
    text.lines().filter(|l| lockstep::ui::width_of(l) > width).map(String::from).collect()
}

/// `lockstep ARGS` on a pseudo-terminal of `cols` columns: what the terminal received
/// (stdout and stderr together) and the exit code.
fn on_a_terminal(args: &[&str], cols: usize, env: &[(&str, &str)]) -> (i32, String) {
    let bin = env!("CARGO_BIN_EXE_lockstep");
    let quoted: Vec<String> = args.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    // `stty cols` sets the size the kernel reports for the pseudo-terminal (TIOCGWINSZ).
    let inner = format!("stty cols {cols} rows 50; exec '{bin}' {}", quoted.join(" "));
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &inner, "/dev/null"]).env("LOCKSTEP_VENV", venv_path()).env_remove("CI").env("TERM", "xterm");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    let (code, out, err) = run(&mut cmd);
    assert!(err.is_empty() || !err.contains("script:"), "script(1) failed: {err}");
    (code, out)
}

live_test! {
    fn rows_stream_while_the_run_goes_on() {
        let mut child = lockstep()
            .args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", PROMPT, "--steps", "150"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("lockstep runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut before_first_row = vec![];
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.starts_with("   0 ") {
                break;
            }
            before_first_row.push(line);
        }
        // The header came first, and the run is still going: the row was printed as step 0
        // was compared, not at the end.
        assert!(before_first_row.iter().any(|l| l.starts_with("  prompt ")), "{before_first_row:?}");
        assert!(child.try_wait().unwrap().is_none(), "the process had ended before its first row was read");
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        assert_eq!(child.wait().unwrap().code(), Some(0));
        assert!(rest.iter().any(|l| l.starts_with(" 149 ")), "every step has its row");
        assert!(rest.iter().any(|l| l.starts_with("time: loading engine ")), "the load time is its own part of the time line");
        assert_eq!(rest.last().map(String::as_str), Some("verdict: PASS"));
    }
}

live_test! {
    fn a_100_column_layout_has_no_line_wider_than_100() {
        let mut cmd = lockstep();
        cmd.args(["run", "--model", "tiny-gguf", "--reference", "transformers,llamacpp", "--prompt", PROMPT, "--steps", "3"]);
        cmd.args(["--inject", "drop-context", "--width", "100"]);
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 1, "{out}\n{err}");
        assert_eq!(lines_wider_than(&out, 100), Vec::<String>::new(), "{out}");
        assert!(out.contains("[fail]"), "{out}");
        assert!(out.lines().any(|l| l.starts_with("verdict: DIVERGED at step 1")), "{out}");
        // Unlimited (a pipe without --width) keeps every column.
        let mut cmd = lockstep();
        cmd.args(["run", "--model", "tiny-gguf", "--reference", "transformers,llamacpp", "--prompt", PROMPT, "--steps", "3"]);
        cmd.args(["--inject", "drop-context"]);
        let (_, wide, _) = run(&mut cmd);
        assert!(!lines_wider_than(&wide, 100).is_empty(), "the full table is wider than 100 columns");
    }
}

live_test! {
    fn a_terminal_gets_a_spinner_its_width_and_colour() {
        let args = ["run", "--model", "tiny", "--reference", "transformers", "--prompt", PROMPT, "--steps", "3", "--inject", "drop-context"];
        let (code, seen) = on_a_terminal(&args, 100, &[]);
        assert_eq!(code, 1, "{seen}");
        // The spinner redraws its line (carriage return, erase line) while a reference loads.
        assert!(seen.contains("loading the transformers reference"), "{seen}");
        assert!(seen.contains('\r'), "no redrawn line: {seen}");
        // Verdicts in colour; no line of the report wider than the terminal.
        assert!(seen.contains("\x1b[31;1mverdict: DIVERGED"), "{seen}");
        // What the terminal shows of each line: the text after its last carriage return (the
        // pseudo-terminal ends lines with \r\n; a spinner redraws after \r).
        let report: String =
            seen.split('\n').map(|l| format!("{}\n", strip_csi(l.trim_end_matches('\r').rsplit('\r').next().unwrap_or("")))).collect();
        assert!(report.lines().filter(|l| l.starts_with("   1 ")).count() == 1, "{report}");
        assert_eq!(lines_wider_than(&report, 100), Vec::<String>::new(), "{report}");
        // NO_COLOR turns the colour off, on a terminal too.
        let (_, plain) = on_a_terminal(&args, 100, &[("NO_COLOR", "1")]);
        assert!(!plain.contains("\x1b[31"), "{plain}");
        assert!(plain.contains("verdict: DIVERGED"), "{plain}");
    }
}

live_test! {
    fn without_a_terminal_phases_are_plain_lines_and_colour_is_off() {
        let mut cmd = lockstep();
        cmd.args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", PROMPT, "--steps", "2"]);
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(err.lines().any(|l| l.starts_with("loading the transformers reference")), "{err}");
        assert!(!err.contains('\r') && !out.contains('\x1b'), "no redraws, no colour on a pipe");
        // --color always colours a pipe too.
        let mut cmd = lockstep();
        cmd.args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", PROMPT, "--steps", "2", "--color", "always"]);
        let (_, out, _) = run(&mut cmd);
        assert!(out.contains("\x1b[32mverdict: PASS\x1b[0m"), "{out}");
    }
}

live_test! {
    fn quiet_prints_the_verdict_only() {
        let mut cmd = lockstep();
        cmd.args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", PROMPT, "--steps", "3", "--inject", "drop-context", "-q"]);
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(out.starts_with("verdict: DIVERGED at step 1"), "{out}");
        assert!(out.lines().count() <= 2, "the verdict (and its likely cause) only: {out}");
        assert!(err.is_empty(), "{err}");
        let mut cmd = lockstep();
        cmd.args(["bisect", "--model", "tiny", "--reference", "transformers", "--prompt", PROMPT, "--steps", "3", "--inject", "drop-context", "--quiet"]);
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 1, "{out}\n{err}");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.starts_with("bisect: step 1, layer 0, site `layers.0.cache_k`"), "{out}");
    }
}

live_test! {
    fn verbose_shows_the_failing_sites_and_the_phase_times() {
        let mut cmd = lockstep();
        cmd.args(["run", "--model", "tiny", "--reference", "transformers", "--prompt", PROMPT, "--steps", "2", "--inject", "drop-context", "-v"]);
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(out.lines().any(|l| l.trim_start().starts_with("transformers layers.0.cache_k: rel-L2 shape [fail]")), "{out}");
        assert!(out.contains("per site, worst over layers and steps"), "-v prints the per-site table with one reference: {out}");
        assert!(err.lines().any(|l| l.starts_with("loading the transformers reference") && l.ends_with(" s")), "{err}");
    }
}

#[test]
fn faults_and_help_fit_a_narrow_terminal() {
    let mut cmd = lockstep();
    cmd.args(["faults", "--width", "100"]);
    let (code, out, _) = run(&mut cmd);
    assert_eq!(code, 0);
    assert_eq!(lines_wider_than(&out, 100), Vec::<String>::new(), "{out}");
    for f in ["drop-context", "refeed-history", "spm-space-prefix"] {
        assert!(out.lines().any(|l| l.starts_with(f)), "{f}: {out}");
    }
    let (_, wide, _) = run(lockstep().args(["faults", "--wide"]));
    assert!(wide.lines().next().unwrap().ends_with("bug / where injected"), "{wide}");
    // clap wraps the help text at the terminal's width (COLUMNS without a terminal).
    let (_, help, _) = run(lockstep().args(["run", "--help"]).env("COLUMNS", "80"));
    assert!(help.contains("--quiet") && help.contains("--width"), "{help}");
    assert_eq!(lines_wider_than(&help, 80), Vec::<String>::new(), "{help}");
}
