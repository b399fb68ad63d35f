//! Judging a step: which site of a failing step is to blame.

use crate::compare::tolerance::{SiteKind, Verdict};
use crate::results::run::RefStep;

/// Picks the site to blame in the first failing step: (reference index, site index), or
/// None when nothing failed at this step.
pub fn localize(refs: &[RefStep]) -> Option<(usize, usize)> {
    let failed = refs.iter().any(|r| r.verdict == Verdict::Fail);
    if !failed {
        return None;
    }
    // (priority, position): lower wins.
    let mut best: Option<((u8, usize), usize, usize)> = None;
    for (ri, rs) in refs.iter().enumerate() {
        for (si, s) in rs.sites.iter().enumerate() {
            let prio = match (s.metrics.is_none(), s.kind, s.verdict) {
                (true, SiteKind::Cache, _) => 0,
                (true, _, _) => 1,
                (false, _, Verdict::Fail | Verdict::Drift) => 2,
                _ => continue,
            };
            let key = (prio, si);
            if best.is_none_or(|(b, _, _)| key < b) {
                best = Some((key, ri, si));
            }
        }
    }
    best.map(|(_, ri, si)| (ri, si)).or_else(|| {
        // Only the next-token distribution failed: blame the logits site.
        refs.iter().enumerate().find_map(|(ri, rs)| {
            (rs.logits_verdict == Verdict::Fail)
                .then(|| rs.sites.iter().position(|s| s.site == "logits").map(|si| (ri, si)))
                .flatten()
        })
    })
}
