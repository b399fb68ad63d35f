//! candle-transformers' quantized Llama checked by lockstep through its library API, on
//! SmolLM2-135M-Instruct Q4_1: in lockstep with llama.cpp and transformers (live: the
//! reference environment of `make setup`), and against golden traces without Python
//! (snapshots/traces, recorded with this crate's `candle-lockstep record --engine-sites`).
//!
//! What lockstep finds (measured, 32 steps of "The capital of France is"; the closing note of
//! the issue has the whole table): per-step KL 3.3e-3 against llama.cpp already at step 0,
//! where the bundled engine on the same Q4_1 weights and Q8_1 activations is exact (KL 0);
//! mean KL 2.3e-3 over the run, within the same-quant bounds (per step <= 0.1). The greedy
//! text leaves llama.cpp's at step 5, a near tie: llama.cpp's own margin there is 0.034 nats
//! (the bundled engine flips at the same step). lockstep judges it drift, not a failure.

use candle_quantized_llama::{loaded, ENGINE_NAME};
use lockstep::compare::tolerance::Verdict;
use lockstep::{Lockstep, Plugin};

fn smollm2() -> std::path::PathBuf {
    lockstep::models::smollm2_path().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn in_lockstep_with_llamacpp_and_transformers() {
    let r = Lockstep::new("smollm2")
        .engine(Plugin::new(ENGINE_NAME, candle_quantized_llama::plugin_load))
        .references("llamacpp,transformers")
        .prompt("The capital of France is")
        .steps(8)
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", r.table());
    // Per-step verdicts on the logits alone (the crate exposes nothing else).
    assert_eq!(r.result.steps.len(), 8);
    assert_eq!(r.result.engine.taps.localizes_to, "step");
    for st in &r.result.steps {
        for rs in &st.references {
            assert!(rs.logits.kl < 0.05, "step {} vs {}: KL {:.3e} (measured at most 1.0e-2)", st.step, rs.reference, rs.logits.kl);
            assert_ne!(rs.logits_verdict, Verdict::Fail, "step {} vs {}", st.step, rs.reference);
        }
    }
    // KL statistics over the run.
    for s in &r.result.summary.references {
        assert!(s.mean_kl > 0.0 && s.mean_kl < 0.01, "{}: mean KL {:.3e} (measured 2.3e-3)", s.reference, s.mean_kl);
        assert!(s.same_top1_share >= 0.75, "{}: same top-1 {:.2}", s.reference, s.same_top1_share);
    }
    // The step-0 distance to llama.cpp (same quantization, same activation blocks): not the
    // exactness the bundled engine reaches, but a few 1e-3 nats.
    let kl0 = r.result.steps[0].references[0].logits.kl;
    assert!(kl0 > 1e-4 && kl0 < 1e-2, "step 0 KL vs llama.cpp {kl0:.3e} (measured 3.3e-3)");
    assert!(r.passed(), "{:?}", r.result.first_divergence);
}

/// Golden parity against llama.cpp's recorded answers, without Python.
#[test]
fn golden_parity_with_llamacpp() {
    lockstep::golden::assert_parity(&loaded(&smollm2()).unwrap(), "smollm2-paris");
}

/// Golden parity with this engine's own previous build (`--reference engine`): a change of
/// its numbers fails here, at the step.
#[test]
fn golden_parity_with_its_previous_build() {
    lockstep::golden::assert_parity(&loaded(&smollm2()).unwrap(), "smollm2-self");
}
