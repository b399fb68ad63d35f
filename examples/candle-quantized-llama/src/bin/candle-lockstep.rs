//! lockstep's whole command line with candle-transformers' quantized Llama as the engine under
//! test: `cargo run --release -p candle-quantized-llama --bin candle-lockstep -- run --model
//! smollm2 --reference llamacpp,transformers --prompt "The capital of France is" --steps 16`.

use std::process::ExitCode;

fn main() -> ExitCode {
    lockstep::cli::main_with(lockstep::Plugin::new(candle_quantized_llama::ENGINE_NAME, candle_quantized_llama::plugin_load))
}
