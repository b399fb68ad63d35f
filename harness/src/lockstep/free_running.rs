//! The free-running check: each reference's own greedy generation loop on the engine's
//! prompt ids, against the tokens the engine chose in lockstep.

use lockstep_engine::LoadedModel;

use crate::compare::tolerance::Verdict;
use crate::error::HarnessError;
use crate::lockstep::options::RunOptions;
use crate::reference::Reference;
use crate::results::run::{GenerateCheck, StepRecord};

/// Where two token sequences first part (`None`: identical).
pub fn first_mismatch(ours: &[u32], theirs: &[u32]) -> Option<usize> {
    ours.iter().zip(theirs).position(|(a, b)| a != b).or_else(|| (ours.len() != theirs.len()).then(|| ours.len().min(theirs.len())))
}

/// Teacher forcing keeps the lockstep run on the engine's tokens. If the lockstep run already
/// judged a top-1 flip at or before the first mismatch as drift (a near tie, or within the
/// noise floor), the free-running texts may part there: drift too.
pub fn verdict(first: Option<usize>, steps: &[StepRecord], reference: usize) -> Verdict {
    match first {
        None => Verdict::Pass,
        Some(k)
            if steps.iter().take(k + 1).any(|s| {
                let rs = &s.references[reference];
                !rs.logits.top1_agree && rs.logits_verdict == Verdict::Drift
            }) =>
        {
            Verdict::Drift
        }
        Some(_) => Verdict::Fail,
    }
}

/// Every reference's own loop, when the run is greedy (a sampled run cannot be compared
/// token by token with another generator: its sampler was compared step by step instead)
/// and not a bisect.
pub fn free_running(
    opts: &RunOptions,
    engine: &LoadedModel,
    refs: &[Reference],
    prompt_ids: &[u32],
    steps: &[StepRecord],
    generated: &[u32],
    stop: &[u32],
) -> Result<Vec<GenerateCheck>, HarnessError> {
    let plain_greedy = opts.sampler.as_ref().is_none_or(|c| c.greedy() && c.rep_penalty == 1.0);
    if !plain_greedy || opts.bisect {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for (i, r) in refs.iter().enumerate() {
        let toks = r.generate_greedy(prompt_ids, opts.steps.max(1), stop)?;
        let first = first_mismatch(generated, &toks);
        out.push(GenerateCheck {
            reference: r.name.clone(),
            reference_text: engine.tokenizer.decode(&toks, true).unwrap_or_default(),
            matches: first.is_none(),
            reference_tokens: toks,
            first_mismatch: first,
            verdict: verdict(first, steps, i),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_part_at_the_first_other_token_or_where_one_ends() {
        assert_eq!(first_mismatch(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_mismatch(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_mismatch(&[1, 2], &[1, 2, 3]), Some(2));
        assert_eq!(verdict(None, &[], 0), Verdict::Pass);
        assert_eq!(verdict(Some(0), &[], 0), Verdict::Fail);
    }
}
