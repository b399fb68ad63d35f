//! Check your own engine with lockstep: implement `Decoder`, plug it in, and every command,
//! the builder API and the golden-trace assertions check it.
//!
//!     cargo run --release --example my_engine -- run --model tiny --reference transformers \
//!         --prompt "The capital of France is" --steps 8
//!     cargo run --release --example my_engine -- bisect --model tiny --reference transformers \
//!         --prompt "The capital of France is" --steps 8
//!     cargo run --release --example my_engine -- record --model tiny --reference engine \
//!         --prompt "The capital of France is" --steps 8 --name my-engine --out snapshots/traces

use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;

use candle_core::{IndexOp, Tensor};
use lockstep::Plugin;
use lockstep_engine::{Capture, Decoder, EngineError, KvCache, LoadOptions, LoadedModel, ModelInfo, SiteGraph};

/// Your engine. This stand-in keeps its cache inside itself and returns the logits of the last
/// position only, as many engines do; it computes with the bundled Llama, where yours runs
/// your own code.
struct MyEngine {
    net: Box<dyn Decoder>,
    cache: Mutex<KvCache>,
    info: ModelInfo,
    graph: SiteGraph,
}

impl MyEngine {
    fn load(path: &Path) -> Result<MyEngine, EngineError> {
        let net = lockstep_engine::load(path, &LoadOptions::default())?.model;
        // Must provide: the config (read from the model), the family, how it holds weights.
        let mut info = ModelInfo::new("llama", lockstep_engine::loader::model_config(path)?);
        info.engine = "my-engine".into();
        // May provide: any subset of the canonical sites. Logits only here: lockstep gives
        // per-step verdicts and bisect names the first divergent step; declare
        // `layers.N.out` (SiteGraph::restrict) to localize to the layer, every site for the site.
        let graph = SiteGraph::logits_only(info.config.num_layers);
        let cache = Mutex::new(net.new_cache());
        Ok(MyEngine { net, cache, info, graph })
    }
}

impl Decoder for MyEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn site_graph(&self) -> &SiteGraph {
        &self.graph
    }

    /// lockstep's cache is only the position counter here: the engine starts over at 0.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.info.config.num_layers)
    }

    fn forward(&self, tokens: &[u32], cache: &mut KvCache, capture: Option<&mut Capture>) -> lockstep_engine::Result<Tensor> {
        let mut own = self.cache.lock().map_err(|_| EngineError::Engine("cache lock poisoned".into()))?;
        if cache.offset() == 0 {
            *own = self.net.new_cache();
        }
        let all = self.net.forward(tokens, &mut own, None)?;
        cache.push_tokens(tokens);
        let last = all.i(all.dim(0)? - 1..)?; // (1, vocab): the last position only
        if let Some(c) = capture {
            c.entries.push(("logits".into(), last.clone()));
        }
        Ok(last)
    }
}

/// The loader lockstep calls for every model it runs your engine on.
fn load(path: &Path, _opts: &LoadOptions) -> Result<LoadedModel, EngineError> {
    // Tokenized with the model file's tokenizer (or implement Decoder::tokenize).
    LoadedModel::plugin(Box::new(MyEngine::load(path)?), path)
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("check") {
        // The builder API: the same records the CLI prints and writes as JSON.
        let report = lockstep::Lockstep::new("tiny")
            .engine(Plugin::new("my-engine", load))
            .references("transformers")
            .prompt("The capital of France is")
            .steps(8)
            .run();
        return match report {
            Ok(r) => {
                print!("{}", r.table());
                ExitCode::from(if r.passed() { 0 } else { 1 })
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    // The whole command line (run, bisect, record, replay, report, ...) with your engine under
    // test; `--reference engine` is your engine itself, `--reference bundled` lockstep's.
    lockstep::cli::main_with(Plugin::new("my-engine", load))
}
