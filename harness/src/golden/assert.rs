//! Golden-trace assertions for a user's own `cargo test`, without Python: replay the traces
//! recorded from the references (with `lockstep record`, or a binary built on
//! `lockstep::cli::main_with`) against your engine and assert its parity summary with insta.
//!
//! ```no_run
//! # fn my_engine() -> lockstep_engine::LoadedModel { unimplemented!() }
//! #[test]
//! fn parity_with_llamacpp() {
//!     let engine = my_engine();
//!     // snapshots/traces/smollm2-paris.*.{json,safetensors} of this crate, recorded with
//!     // `my-lockstep record --model smollm2 --reference llamacpp --prompt ... --name smollm2-paris --out snapshots/traces`
//!     lockstep::golden::assert_parity(&engine, "smollm2-paris");
//! }
//! ```
//!
//! A case is every trace named `CASE` or `CASE.REFERENCE` in the traces directory:
//! `$LOCKSTEP_TRACES`, else `snapshots/traces` of the crate under test
//! (`$CARGO_MANIFEST_DIR`, which cargo sets for tests). The summary snapshot is
//! `snapshots/parity/CASE.snap` beside it; accept an intended change with `cargo insta review`.
//! A trace recorded from an engine (`--reference engine`) makes the engine's previous build
//! the golden reference of its next one.

use std::path::{Path, PathBuf};

use lockstep_engine::LoadedModel;

use crate::error::HarnessError;
use crate::golden::parity::{self, Replayed};
use crate::golden::trace;

/// Where a crate's golden cases are: its traces and its parity snapshots.
#[derive(Debug, Clone)]
pub struct Golden {
    pub traces: PathBuf,
    pub parity: PathBuf,
}

impl Golden {
    /// `DIR/traces` and `DIR/parity`.
    pub fn at(dir: impl AsRef<Path>) -> Golden {
        let d = dir.as_ref();
        Golden { traces: d.join("traces"), parity: d.join("parity") }
    }

    /// `$LOCKSTEP_TRACES` (snapshots beside it, in `../parity`), else `snapshots/` of the
    /// crate being tested (`$CARGO_MANIFEST_DIR`), else of the current directory.
    pub fn for_crate() -> Golden {
        if let Some(t) = std::env::var_os("LOCKSTEP_TRACES").filter(|v| !v.is_empty()) {
            let traces = PathBuf::from(t);
            let parity = traces.parent().map(|p| p.join("parity")).unwrap_or_else(|| PathBuf::from("parity"));
            return Golden { traces, parity };
        }
        let root = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        Golden::at(root.join("snapshots"))
    }

    /// The traces of `case`: `CASE.json` or `CASE.*.json` in the traces directory, sorted;
    /// as paths relative to the current directory where they are under it (they name the
    /// references in the summary, which must not depend on where the checkout is).
    pub fn traces_of(&self, case: &str) -> Result<Vec<String>, HarnessError> {
        let cwd = std::env::current_dir().ok().and_then(|d| std::fs::canonicalize(d).ok());
        let dir = std::fs::canonicalize(&self.traces).unwrap_or_else(|_| self.traces.clone());
        let shown = match cwd.as_ref().and_then(|c| dir.strip_prefix(c).ok()) {
            Some(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
            _ => self.traces.clone(),
        };
        let names: Vec<String> = trace::list_traces(&self.traces)
            .into_iter()
            .filter(|n| n == case || n.strip_prefix(case).is_some_and(|r| r.starts_with('.')))
            .map(|n| shown.join(n).display().to_string())
            .collect();
        if names.is_empty() {
            return Err(HarnessError::Usage(format!(
                "no trace of case `{case}` in {}: record it first (lockstep record --name {case} --out {} ...)",
                self.traces.display(),
                self.traces.display()
            )));
        }
        Ok(names)
    }

    /// Replays `case` against `engine`.
    pub fn replay(&self, engine: &LoadedModel, case: &str) -> Result<Replayed, HarnessError> {
        parity::replay_with(case, &self.traces_of(case)?, Some(engine))
    }

    /// Replays `case` against `engine`, prints its parity summary, asserts the verdict
    /// (panics with the first divergent step, layer and site), then asserts the summary
    /// against the insta snapshot `parity/CASE.snap`.
    pub fn assert_parity(&self, engine: &LoadedModel, case: &str) {
        let r = match self.replay(engine, case) {
            Ok(r) => r,
            Err(e) => panic!("replaying golden case `{case}`: {e}"),
        };
        eprintln!("{}", r.summary);
        if let Some(d) = &r.result.first_divergence {
            panic!(
                "golden case `{case}` diverged at step {}, {}site `{}` (vs {}): {}{}",
                d.step,
                d.layer.map(|l| format!("layer {l}, ")).unwrap_or_default(),
                d.site,
                d.reference,
                d.detail,
                d.likely_cause.as_ref().map(|c| format!("; likely cause: {c}")).unwrap_or_default()
            );
        }
        let description = format!("parity summary of golden case `{case}`; accept an intended change with `cargo insta review`");
        assert_summary(&self.parity, case, &r.summary, &r.info, &description);
    }
}

/// The body of an insta snapshot file (what follows its `---` header), if it exists.
fn snapshot_body(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = text.strip_prefix("---\n")?;
    let end = rest.find("\n---\n")?;
    Some(rest[end + 5..].to_string())
}

/// Asserts a parity summary against the insta snapshot `DIR/CASE.snap` at the precision
/// lockstep claims ([`printed`](crate::golden::printed)): a summary whose numbers moved in
/// their last printed digit (another CPU's SIMD kernels) matches the committed snapshot as it
/// is, so one snapshot serves every CPU. Any other difference, or no snapshot yet, goes to
/// insta's own assertion: it fails with insta's diff and leaves `CASE.snap.new` for
/// `cargo insta review` (or writes the snapshot under `INSTA_UPDATE=always`).
pub fn assert_summary<I: serde::Serialize>(dir: &Path, case: &str, summary: &str, info: &I, description: &str) {
    if let Some(body) = snapshot_body(&dir.join(format!("{case}.snap"))) {
        if crate::golden::printed::text_matches(&body, summary) {
            return;
        }
        if let Some((line, want, got)) = crate::golden::printed::first_difference(&body, summary) {
            eprintln!("parity summary of `{case}` differs beyond lockstep's precision at line {line}:\n  snapshot: {want}\n  now:      {got}");
        }
    }
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(dir);
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.set_description(description);
    settings.set_info(info);
    settings.bind(|| insta::assert_snapshot!(case.to_string(), summary));
}

/// [`Golden::assert_parity`] in the crate's default place ([`Golden::for_crate`]).
pub fn assert_parity(engine: &LoadedModel, case: &str) {
    Golden::for_crate().assert_parity(engine, case)
}
