//! How the command line talks to a person: the output width, colour, `--quiet`/`-v`, and
//! the live parts (a spinner while something loads, a step counter while steps run).
//!
//! The CLI sets the settings once ([`set`]); library users get the defaults (no colour, no
//! width limit, nothing live), so the renderers in `report/` stay plain text for them.
//!
//! Rules, in one place:
//! - width: `--wide` is unlimited; `--width N` is N; else the terminal's width when stdout is
//!   a terminal, else unlimited (a pipe or a file gets every column);
//! - colour: `--color always|never|auto`; auto is on when stdout is a terminal, `NO_COLOR`
//!   is unset or empty and `TERM` is not `dumb`;
//! - live output (spinner, step counter) goes to stderr, only when stderr is a terminal,
//!   `CI` is unset (or `false`) and not `--quiet`; without one the phases are plain lines on
//!   stderr;
//! - `--quiet`: the verdict line (and errors) only; `-v`: phase timings and, per step, the
//!   sites that did not pass.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use unicode_width::UnicodeWidthChar;

/// `--color WHEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// The settings of this process's output (see the module's rules).
#[derive(Debug, Clone)]
pub struct Ui {
    pub quiet: bool,
    pub verbose: bool,
    pub color: bool,
    /// The columns a line may take; `None`: unlimited.
    pub width: Option<usize>,
    /// Spinner and step counter on stderr.
    pub live: bool,
}

impl Default for Ui {
    fn default() -> Ui {
        Ui { quiet: false, verbose: false, color: false, width: None, live: false }
    }
}

impl Ui {
    /// The settings from the flags and the environment.
    pub fn from_flags(quiet: bool, verbose: bool, wide: bool, width: Option<usize>, color: ColorChoice) -> Ui {
        let stdout_tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let color = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => stdout_tty && !no_color && !dumb,
        };
        let width = if wide {
            None
        } else if let Some(w) = width {
            Some(w.max(MIN_WIDTH))
        } else if stdout_tty {
            terminal_width().map(|w| w.max(MIN_WIDTH))
        } else {
            None
        };
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
        let live = !quiet && !ci && !dumb && std::io::stderr().is_terminal();
        Ui { quiet, verbose: verbose && !quiet, color, width, live }
    }
}

/// The narrowest layout lockstep lays out for (a narrower `--width` is taken as this).
pub const MIN_WIDTH: usize = 60;

static UI: OnceLock<Ui> = OnceLock::new();

/// Sets this process's output settings (the CLI does, once, before any command runs).
pub fn set(ui: Ui) {
    let _ = UI.set(ui);
}

/// This process's output settings (the defaults if the CLI did not set them).
pub fn get() -> &'static Ui {
    UI.get_or_init(Ui::default)
}

/// The width of the terminal on stdout (else stderr), from the kernel; `COLUMNS` when
/// neither is a terminal that says.
pub fn terminal_width() -> Option<usize> {
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some(ws.ws_col as usize);
        }
    }
    std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse().ok()).filter(|&c: &usize| c > 0)
}

// ------------------------------------------------------------------ text

/// The columns `s` takes on a terminal (wide characters count 2; ANSI colour codes 0).
pub fn width_of(s: &str) -> usize {
    let mut w = 0;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
            continue;
        }
        w += c.width().unwrap_or(0);
    }
    w
}

/// `s` cut to at most `width` columns, ending in `…` when cut.
pub fn truncate(s: &str, width: usize) -> String {
    if width_of(s) <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut out = String::new();
    let mut w = 0;
    for c in s.chars() {
        let cw = c.width().unwrap_or(0);
        if w + cw > width - 1 {
            break;
        }
        out.push(c);
        w += cw;
    }
    out.push('…');
    out
}

/// `s` cut to at most `width` columns from the left (`…` first): the end of a site name is
/// the part that says what it is.
pub fn truncate_left(s: &str, width: usize) -> String {
    if width_of(s) <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut kept: Vec<char> = vec![];
    let mut w = 0;
    for c in s.chars().rev() {
        let cw = c.width().unwrap_or(0);
        if w + cw > width - 1 {
            break;
        }
        kept.push(c);
        w += cw;
    }
    std::iter::once('…').chain(kept.into_iter().rev()).collect()
}

/// `s` padded with spaces to `width` columns (left-aligned), cut with `…` if longer.
pub fn pad(s: &str, width: usize) -> String {
    let t = truncate(s, width);
    let w = width_of(&t);
    t + &" ".repeat(width.saturating_sub(w))
}

/// `s` right-aligned in `width` columns, cut with `…` if longer.
pub fn pad_left(s: &str, width: usize) -> String {
    let t = truncate(s, width);
    let w = width_of(&t);
    " ".repeat(width.saturating_sub(w)) + &t
}

/// Every line of `text` cut to this process's width (unchanged without a width).
pub fn fit(text: &str) -> String {
    fit_to(text, get().width)
}

/// Every line of `text` fitted to `width` columns ([`fit_line`]).
pub fn fit_to(text: &str, width: Option<usize>) -> String {
    let Some(w) = width else { return text.to_string() };
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        out.push_str(&fit_line(body, w));
        out.push_str(nl);
    }
    out
}

/// One line fitted to `width` columns. Prose (no gap of two spaces after its indentation) is
/// word-wrapped under itself; a `key   value` line whose value is prose is wrapped under its
/// value; anything else (a table row) is cut with `…`.
pub fn fit_line(line: &str, width: usize) -> String {
    if width_of(line) <= width {
        return line.to_string();
    }
    let indent = line.len() - line.trim_start().len();
    let body = &line[indent..];
    let gaps: Vec<usize> = body.match_indices("  ").map(|(i, _)| i).collect();
    // Where the wrapped part starts, and how far its continuation lines are indented.
    let (head, rest, hang) = if gaps.is_empty() {
        ("", line, indent + 2)
    } else {
        let first_gap = gaps[0];
        let value_at = indent + first_gap + body[first_gap..].len() - body[first_gap..].trim_start().len();
        let value = &line[value_at..];
        if value.contains("  ") || width_of(&line[..value_at]) + 12 > width {
            return truncate(line, width);
        }
        (&line[..value_at], value, width_of(&line[..value_at]))
    };
    let room = width.saturating_sub(width_of(head));
    let wrapped = wrap(rest, if head.is_empty() { width } else { room }, if head.is_empty() { hang } else { 0 });
    let pad = " ".repeat(hang);
    let lines: Vec<String> = wrapped
        .lines()
        .enumerate()
        .map(|(k, l)| {
            let l = if k == 0 { format!("{head}{l}") } else if head.is_empty() { l.to_string() } else { format!("{pad}{l}") };
            truncate(&l, width)
        })
        .collect();
    lines.join("\n")
}

/// `text` word-wrapped to `width` columns, every line after the first indented by `indent`.
pub fn wrap(text: &str, width: usize, indent: usize) -> String {
    let mut lines: Vec<String> = vec![];
    // The first line keeps its own indentation.
    let lead = &text[..text.len() - text.trim_start().len()];
    let mut line = lead.to_string();
    for word in text.split_whitespace() {
        let room = if lines.is_empty() { width } else { width.saturating_sub(indent) };
        let fresh = line.trim().is_empty();
        if !fresh && width_of(&line) + 1 + width_of(word) > room {
            lines.push(std::mem::take(&mut line));
        }
        if !line.trim().is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    let pad = " ".repeat(indent);
    lines.iter().enumerate().map(|(k, l)| if k == 0 { l.clone() } else { format!("{pad}{l}") }).collect::<Vec<_>>().join("\n")
}

// ------------------------------------------------------------------ colour

#[derive(Debug, Clone, Copy)]
pub enum Tone {
    Good,
    Warn,
    Bad,
}

/// `s` in the colour of `tone` when colour is on.
pub fn paint(s: &str, tone: Tone) -> String {
    if !get().color || s.is_empty() {
        return s.to_string();
    }
    let code = match tone {
        Tone::Good => "32",
        Tone::Warn => "33",
        Tone::Bad => "31;1",
    };
    format!("\x1b[{code}m{s}\x1b[0m")
}

/// Colours the verdict words of a rendered report (after its layout is done, so that the
/// colour codes never count against a column's width).
pub fn paint_verdicts(text: &str) -> String {
    if !get().color {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        out.push_str(&paint_line(line));
    }
    out
}

fn paint_line(line: &str) -> String {
    const MARKS: [(&str, Tone); 8] = [
        ("verdict: PASS (with drift)", Tone::Warn),
        ("verdict: PASS", Tone::Good),
        ("verdict: DIVERGED", Tone::Bad),
        ("[fail]", Tone::Bad),
        ("[drift]", Tone::Warn),
        ("nothing found", Tone::Good),
        ("MISS ", Tone::Bad),
        ("FAULTS", Tone::Warn),
    ];
    for (mark, tone) in MARKS {
        if let Some(at) = line.find(mark) {
            return format!("{}{}{}", &line[..at], paint(mark, tone), &line[at + mark.len()..]);
        }
    }
    line.to_string()
}

// ------------------------------------------------------------------ live

/// The live line on stderr (spinner or step counter), if one is shown.
static LIVE: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// A phase of the work a person waits for ("loading transformers"): a spinner with the
/// elapsed time on a terminal, a plain line on stderr otherwise; ended by [`Phase::done`].
pub struct Phase {
    what: String,
    started: Instant,
}

impl Phase {
    pub fn start(what: impl Into<String>) -> Phase {
        let what = what.into();
        let ui = get();
        if ui.live {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            pb.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            pb.set_message(truncate(&what, ui.width.or(terminal_width()).unwrap_or(80).saturating_sub(12)));
            pb.enable_steady_tick(Duration::from_millis(120));
            replace_live(Some(pb));
        } else if !ui.quiet {
            eprintln!("{what} …");
        }
        Phase { what, started: Instant::now() }
    }

    /// Ends the phase; returns its seconds.
    pub fn done(self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        let ui = get();
        replace_live(None);
        if ui.verbose {
            eprintln!("{}: {secs:.2} s", self.what);
        }
        secs
    }
}

fn replace_live(pb: Option<indicatif::ProgressBar>) {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(old) = live.take() {
        old.finish_and_clear();
    }
    *live = pb;
}

/// A step counter on stderr while the steps run ("step 3/32, 4.1 s"), on a terminal only.
pub fn steps_started(planned: usize) {
    let ui = get();
    if !ui.live {
        return;
    }
    let pb = indicatif::ProgressBar::new(planned as u64);
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} {elapsed}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    replace_live(Some(pb));
}

/// Moves the step counter on.
pub fn step_done(done: usize) {
    if let Some(pb) = LIVE.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        pb.set_position(done as u64);
    }
}

/// Clears whatever live line is shown.
pub fn live_done() {
    replace_live(None);
}

/// Prints `text` to stdout above the live line (which is redrawn below it).
pub fn print_above(text: &str) {
    let live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    match live.as_ref() {
        Some(pb) => pb.suspend(|| crate::cli::output::write_stdout(text)),
        None => crate::cli::output::write_stdout(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_counts_columns_not_bytes() {
        assert_eq!(truncate("layers.12.mlp_act", 10), "layers.12…");
        assert_eq!(truncate_left("layers.12.mlp_act", 10), "…2.mlp_act");
        // A wide character is never split: the cut may leave one column empty.
        assert!((8..=9).contains(&width_of(&truncate("≠12345 日本語テキスト", 9))));
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(pad("ab", 4), "ab  ");
        assert_eq!(pad_left("ab", 4), "  ab");
        assert_eq!(width_of("\x1b[31;1mfail\x1b[0m"), 4);
    }

    #[test]
    fn fit_cuts_every_line() {
        let t = "0123456789\nabc\n0123456789abcdef";
        assert_eq!(fit_to(t, Some(8)), "0123456…\nabc\n0123456…");
        assert_eq!(fit_to(t, None), t);
    }

    #[test]
    fn fit_wraps_prose_and_values_and_cuts_table_rows() {
        let prose = "sampler parity: the engine's processed distribution vs each reference's own sampling code";
        let f = fit_line(prose, 40);
        assert!(f.lines().count() > 1 && f.lines().all(|l| width_of(l) <= 40), "{f}");
        assert_eq!(f.split_whitespace().collect::<Vec<_>>(), prose.split_whitespace().collect::<Vec<_>>(), "nothing lost");
        let kv = "  compared   transformers: 51 sites per step (embed, 3 layers x 16 incl. cache_k/cache_v)";
        let f = fit_line(kv, 50);
        assert!(f.starts_with("  compared   transformers:"), "{f}");
        assert!(f.lines().skip(1).all(|l| l.starts_with("             ") && width_of(l) <= 50), "under the value:\n{f}");
        let row = "  chat template      sha256 86c79f00d708 (331 chars)   sha256 86c79f00d708 (331 chars)";
        assert_eq!(fit_line(row, 40), truncate(row, 40), "a table row is cut, not folded");
    }

    #[test]
    fn wrap_keeps_to_the_width_and_indents() {
        let w = wrap("the quick brown fox jumps over the lazy dog", 16, 4);
        for l in w.lines() {
            assert!(width_of(l) <= 16, "{l:?}");
        }
        assert!(w.lines().skip(1).all(|l| l.starts_with("    ")), "{w}");
        assert_eq!(w.split_whitespace().count(), 9);
        assert!(wrap("    - a b", 80, 6).starts_with("    - a"), "the first line keeps its indentation");
    }
}
