//! The prompt check before step 0: the engine's token ids against each reference's own
//! encoding of the same prompt, the rendered chat template of every side, and the pieces of
//! every side's ids when they differ.

use lockstep_engine::LoadedModel;

use crate::error::HarnessError;
use crate::lockstep::options::{engine_prompt_ids, Prompt, RunOptions};
use crate::reference::Reference;
use crate::results::run::PromptCheck;

pub fn check_prompt(opts: &RunOptions, engine: &LoadedModel, refs: &[Reference]) -> Result<PromptCheck, HarnessError> {
    let engine_ids = engine_prompt_ids(engine, &opts.prompt)?;
    if engine_ids.is_empty() {
        return Err(HarnessError::EmptyPrompt);
    }
    let (mode, text) = match &opts.prompt {
        Prompt::Text(t) => ("prompt", t.clone()),
        Prompt::Chat(t) => ("chat", t.clone()),
    };
    let mut reference_ids = vec![];
    for r in refs {
        let ids = match &opts.prompt {
            Prompt::Text(t) => r.encode_prompt(t)?,
            Prompt::Chat(t) => r.encode_chat(t)?,
        };
        reference_ids.push((r.name.clone(), ids));
    }
    let ids_match = reference_ids.iter().all(|(_, ids)| *ids == engine_ids);
    let (engine_rendered, rendered_diff) = crate::checks::sampler::rendered_prompts(engine, refs, &opts.prompt)?;
    let piece = |ids: &[u32]| ids.iter().map(|&i| engine.tokenizer.id_to_token(i).unwrap_or_else(|| "?".into())).collect();
    let pieces = if ids_match {
        vec![]
    } else {
        std::iter::once(("engine".to_string(), piece(&engine_ids)))
            .chain(reference_ids.iter().map(|(n, ids)| (n.clone(), piece(ids))))
            .collect()
    };
    Ok(PromptCheck { mode, text, engine_ids, reference_ids, ids_match, engine_rendered, rendered_diff, pieces })
}
