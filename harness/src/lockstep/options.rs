//! What a lockstep run is asked to do ([`RunOptions`]), and the engine it loads from them.

use std::path::PathBuf;

use candle_core::DType;
use lockstep_engine::{LoadOptions, LoadedModel};

use crate::compare::tolerance::Precision;
use crate::error::HarnessError;
use crate::plugin::EngineSpec;
use crate::reference::RefSpec;

#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's special tokens (BOS if it adds one).
    Text(String),
    /// One user message through the chat template, with the generation prompt.
    Chat(String),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub model: PathBuf,
    pub references: Vec<RefSpec>,
    pub prompt: Prompt,
    pub steps: usize,
    pub precision: Precision,
    /// How the engine holds GGUF weights (`None`: quantized for GGUF in f32, else dense).
    pub weights: Option<lockstep_engine::WeightsMode>,
    /// Faults injected into the engine (`--inject`).
    pub faults: lockstep_engine::Faults,
    /// Bisect mode: stop at the first failing step and keep the reference's tensors of the
    /// suspect layer at that step (`crate::bisect`); no free-running generate check.
    pub bisect: bool,
    /// The engine's sampler (`--sampler`); `None`: greedy, without sampler parity.
    pub sampler: Option<lockstep_engine::SamplerConfig>,
    /// Any difference in the generation-config table stops the run before step 0.
    pub strict_config: bool,
    /// A LoRA adapter on every side (`--lora DIR`); the mode is the engine's.
    pub lora: Option<lockstep_engine::LoraOptions>,
    /// The engine under test (the bundled one unless `--engine` or the library says otherwise).
    pub engine: EngineSpec,
    /// The positions the run may feed (`--context N`): given to every reference with a fixed
    /// context (llama.cpp's `n_ctx`) and checked against the engine's window and each
    /// reference's before any step. `None`: the prompt plus the steps.
    pub context: Option<usize>,
    /// A step that feeds more tokens than this (a long prompt) is fed to every side in
    /// pieces of this many tokens, each compared as it comes (`--prefill-chunk`): what one
    /// call captures stays bounded whatever the prompt's length.
    pub prefill_chunk: usize,
    /// Refuse, before step 0, a run predicted to need more resident memory than this many
    /// MB (`--max-memory`; [`crate::lockstep::memory`]).
    pub max_memory: Option<u64>,
}

/// The positions a run of `steps` steps feeds after a prompt of `prompt_len` tokens: step 0
/// feeds the prompt, each later step one token.
pub fn positions_fed(prompt_len: usize, steps: usize) -> usize {
    prompt_len + steps.max(1) - 1
}

impl RunOptions {
    /// The positions the run may feed: `--context`, else [`positions_fed`].
    pub fn context_for(&self, prompt_len: usize) -> usize {
        self.context.unwrap_or(positions_fed(prompt_len, self.steps))
    }
}

/// `--prefill-chunk`'s default: a prompt up to this many tokens is one call on every side.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

/// Loads the engine the options name (model, dtype, weights mode, faults, adapter), and
/// checks, before anything runs, that the run fits the model's context window and that
/// every injected fault can act on this model, prompt and sampler.
pub fn load_engine(opts: &RunOptions) -> Result<LoadedModel, HarnessError> {
    let dtype = match opts.precision {
        Precision::F32 => DType::F32,
        Precision::F64 => DType::F64,
    };
    crate::plugin::set_run_weights(opts.weights);
    let engine =
        opts.engine.load(&opts.model, &LoadOptions { dtype, weights: opts.weights, faults: opts.faults.clone(), lora: opts.lora.clone(), ..Default::default() })?;
    let ids = engine_prompt_ids(&engine, &opts.prompt)?;
    check_context(&engine, ids.len(), opts.steps, opts.context)?;
    // Whether a fault can act is judged on the prompt a clean engine feeds (missing-bos
    // removes the very BOS it needs).
    let clean_ids = match &opts.prompt {
        Prompt::Text(t) => engine.encode_prompt_with(t, false, &lockstep_engine::Faults::none())?,
        Prompt::Chat(t) => engine.encode_prompt_with(t, true, &lockstep_engine::Faults::none())?,
    };
    for (fault, layer) in opts.faults.list() {
        if let Some(why) = fault_inapplicable(fault, layer, &engine, opts, &clean_ids) {
            let name = if fault.info().layer == lockstep_engine::faults::Layer::Injected {
                format!("{}:{layer}", fault.info().name)
            } else {
                fault.info().name.to_string()
            };
            return Err(HarnessError::Usage(format!(
                "--inject {name}: this fault cannot act on this run: {why}; it would change nothing and every check would pass \
                 (`lockstep faults` lists what each fault needs)"
            )));
        }
    }
    Ok(engine)
}

/// The prompt and the steps must fit the model's context window: step 0 feeds the prompt and
/// each later step one token, so `steps` steps feed `prompt + steps - 1` positions; a
/// `--context` must hold them and fit the window too.
pub fn check_context(engine: &LoadedModel, prompt_len: usize, steps: usize, context: Option<usize>) -> Result<(), HarnessError> {
    let cfg = &engine.model.info().config;
    let window = cfg.context_window();
    let dynamic = match window != cfg.max_position_embeddings {
        true => format!(" times its dynamic RoPE scaling's factor, {}", cfg.rope_scaling.describe()),
        false => String::new(),
    };
    let needed = positions_fed(prompt_len, steps);
    if let Some(c) = context {
        if c < needed {
            return Err(HarnessError::Usage(format!(
                "--context {c} is smaller than the run: a prompt of {prompt_len} tokens and {steps} steps feed {needed} positions; \
                 give --context {needed} or more, or leave it out (it defaults to what the run feeds)"
            )));
        }
        if c > window {
            return Err(HarnessError::Usage(format!(
                "--context {c} exceeds {}'s context window of {window} positions (max_position_embeddings / context_length{dynamic}); \
                 give --context {window} or less",
                engine.path.display()
            )));
        }
    }
    if needed <= window {
        return Ok(());
    }
    let fits = (window + 1).saturating_sub(prompt_len);
    Err(HarnessError::Usage(format!(
        "the run needs {needed} positions (a prompt of {prompt_len} tokens and {steps} steps) but {}'s context window is {window} \
         positions (max_position_embeddings / context_length{dynamic}): {}",
        engine.path.display(),
        if fits == 0 {
            format!("the prompt alone is longer than the window; shorten it to at most {window} tokens")
        } else {
            format!("ask for {fits} steps or fewer (--steps, or -n for generate), or use a shorter prompt")
        }
    )))
}

/// Why `fault` cannot act on this engine and run, if it cannot: a fault that changes
/// nothing would let a check pass for the wrong reason (`faults --check` skips these as
/// n/a; `--inject` refuses them). The reference-dependent cases are `faults --check`'s.
pub fn fault_inapplicable(
    fault: lockstep_engine::faults::Fault,
    layer: usize,
    engine: &LoadedModel,
    opts: &RunOptions,
    prompt_ids: &[u32],
) -> Option<String> {
    use lockstep_engine::faults::{Fault, Layer};
    let cfg = &engine.model.info().config;
    let steps = opts.steps.max(1);
    if fault.info().layer == Layer::Injected && layer >= cfg.num_layers {
        return Some(format!("layer {layer} does not exist: the model has {} layers (0..{})", cfg.num_layers, cfg.num_layers.saturating_sub(1)));
    }
    let gguf_types = || -> Vec<String> {
        lockstep_engine::weights::GgufFile::open(&engine.path)
            .map(|g| g.content.tensor_infos.values().map(|i| format!("{:?}", i.ggml_dtype)).collect())
            .unwrap_or_default()
    };
    let bos = cfg.bos_token_id.or_else(|| engine.tokenizer.bos_id());
    let why: Option<String> = match fault {
        Fault::DropContext | Fault::RefeedHistory | Fault::StaleCache if steps < 2 => {
            Some(format!("it acts from step 1 and the run has {steps} step"))
        }
        Fault::RopeConvention | Fault::RopeTheta | Fault::CausalMask if prompt_ids.len() < 2 => {
            Some(format!("the prompt has {} token: at one position it changes nothing", prompt_ids.len()))
        }
        Fault::Q41Min if !gguf_types().iter().any(|t| t == "Q4_1") => Some("the model has no Q4_1 tensor".into()),
        Fault::RopeScalingIgnored => rope_scaling_inapplicable(engine, positions_fed(prompt_ids.len(), steps)),
        Fault::MissingBos if bos.is_none() || prompt_ids.first().copied() != bos => Some("the prompt does not start with a BOS id".into()),
        Fault::RawPrompt if !matches!(opts.prompt, Prompt::Chat(_)) => Some("the prompt is not a chat prompt (--chat)".into()),
        // Judged on the model's own tokenizer: the loaded one already lacks the prefix when
        // the fault is injected.
        Fault::SpmSpacePrefix
            if !lockstep_engine::loader::model_tokenizer(&engine.path).and_then(|t| t.prepends_space()).unwrap_or(false) =>
        {
            Some("the tokenizer writes no ▁ space prefix (not SentencePiece)".into())
        }
        Fault::GqaMapping if cfg.num_kv_heads == cfg.num_heads || cfg.num_kv_heads == 1 => {
            Some(format!("with {} query heads on {} KV heads every mapping reads the same heads", cfg.num_heads, cfg.num_kv_heads))
        }
        Fault::QkvBiasDropped if !cfg.qkv_bias => Some("the model's q/k/v projections have no biases".into()),
        Fault::CausalMask if !cfg.layer_windows.is_empty() && cfg.layer_windows.iter().all(Option::is_some) => {
            Some("every layer attends over a sliding window, whose mask the fault leaves as it is (it drops a global layer's)".into())
        }
        Fault::SlidingWindowIgnored | Fault::WindowOffByOne => match cfg.layer_windows.iter().flatten().min() {
            None => Some("the model has no sliding-window layer".into()),
            Some(&w) if positions_fed(prompt_ids.len(), steps) <= w => Some(format!(
                "the run feeds {} positions and the smallest window holds {w}: a window acts only past it",
                positions_fed(prompt_ids.len(), steps)
            )),
            Some(_) => None,
        },
        Fault::NormOffsetDoubled if !(engine.origin == lockstep_engine::loader::WeightsOrigin::Gguf && engine.model.info().family == "gemma3") => {
            Some("it acts on a Gemma 3 GGUF only (whose norm weights hold w + 1)".into())
        }
        Fault::EmbedScaleMissing if cfg.variant.embed_scale.is_none() => Some("the model does not scale its embedding".into()),
        Fault::GeluAsSilu if cfg.variant.activation != lockstep_engine::config::Activation::GeluTanh => {
            Some("the model's MLP is not GELU-gated".into())
        }
        Fault::LocalRopeBaseGlobal
            if cfg.layer_windows.iter().all(Option::is_none)
                || cfg.variant.local_rope.as_ref().is_none_or(|r| r.theta == cfg.rope_theta && r.scaling == cfg.rope_scaling) =>
        {
            Some("the model has no local layers with a RoPE of their own".into())
        }
        Fault::LocalRopeBaseGlobal if prompt_ids.len() < 2 => {
            Some(format!("the prompt has {} token: at one position it changes nothing", prompt_ids.len()))
        }
        Fault::TiedHead if cfg.tie_word_embeddings => Some("the model's head is tied to the embedding already".into()),
        Fault::RouterRenormSkipped | Fault::ExpertOffByOne if cfg.num_experts == 0 => Some("not a mixture-of-experts model".into()),
        Fault::RouterRenormSkipped if cfg.num_experts_per_tok >= cfg.num_experts => {
            Some(format!("all {} experts are chosen: their weights sum to 1 without renormalisation", cfg.num_experts))
        }
        Fault::LoraNotAttached | Fault::LoraScale if engine.lora.is_none() => Some("no adapter is attached (--lora DIR)".into()),
        Fault::LoraScale if engine.lora.as_ref().is_some_and(|(a, _)| a.pairs.iter().all(|p| p.scale == 1.0)) => {
            Some("the adapter's scale is 1: applied twice it is the same".into())
        }
        Fault::SamplerTemperature => match &opts.sampler {
            None => Some("the run is greedy (no --sampler)".into()),
            Some(c) if c.temperature == 0.0 || c.temperature == 1.0 => {
                Some(format!("the sampler's temperature is {}: inverted it is the same", c.temperature))
            }
            _ => None,
        },
        _ => None,
    };
    why
}

/// Why ignoring the RoPE scaling changes nothing in a run that reaches `positions`: no layer
/// scales, or every scaling acts only past where the run goes.
fn rope_scaling_inapplicable(engine: &LoadedModel, positions: usize) -> Option<String> {
    use lockstep_engine::rope::RopeScaling;
    let plan = &engine.model.info().plan;
    let acts = |s: &RopeScaling| match s {
        RopeScaling::Default => false,
        RopeScaling::Dynamic { max_position_embeddings, .. } => positions > *max_position_embeddings,
        RopeScaling::LongRope { short_factor, original_max_position_embeddings, .. } => {
            positions > *original_max_position_embeddings || short_factor.iter().any(|f| *f != 1.0)
        }
        _ => positions > 1,
    };
    if plan.iter().all(|p| p.rope.scaling.is_default()) {
        return Some("the model's RoPE is unscaled".into());
    }
    (!plan.iter().any(|p| acts(&p.rope.scaling))).then(|| {
        format!("the model's RoPE scaling ({}) acts only past the {positions} positions this run reaches", plan[0].rope.scaling.describe())
    })
}

/// Encodes the prompt on the engine side.
/// A prompt that encodes to no tokens is an error (a model without BOS fed `--prompt ""`, an
/// empty chat template).
pub fn engine_prompt_ids(m: &LoadedModel, prompt: &Prompt) -> Result<Vec<u32>, HarnessError> {
    let ids = match prompt {
        Prompt::Text(t) => m.encode_prompt(t, false)?,
        Prompt::Chat(t) => m.encode_prompt(t, true)?,
    };
    if ids.is_empty() {
        return Err(match prompt {
            Prompt::Text(_) => HarnessError::EmptyPrompt,
            Prompt::Chat(_) => HarnessError::Usage(
                "the prompt encodes to no tokens: the chat template rendered nothing (check the model's chat_template)".into(),
            ),
        });
    }
    Ok(ids)
}


/// `--sampler`'s value parsed, as a usage error when malformed.
pub fn parse_sampler(spec: Option<&str>) -> Result<Option<lockstep_engine::SamplerConfig>, HarnessError> {
    spec.map(|s| {
        lockstep_engine::SamplerConfig::parse(s).map_err(|e| HarnessError::Usage(e.to_string().trim_start_matches("input: ").to_string()))
    })
    .transpose()
}
