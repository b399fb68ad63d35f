//! Engine tests on the committed tiny fixture: the cache, the two weight origins, the
//! taps, and load errors that name the tensor.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use lockstep_engine::{load, Capture, ChatMessage, EngineError, LoadOptions, LoadedModel, QkLayout};
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/models").join(name)
}

fn tiny_hf() -> LoadedModel {
    load(&fixture("tiny-llama"), &LoadOptions::default()).expect("tiny HF fixture loads")
}

fn tiny_gguf() -> LoadedModel {
    load(&fixture("tiny-llama.gguf"), &LoadOptions::default()).expect("tiny GGUF fixture loads")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn prompt_ids(m: &LoadedModel) -> Vec<u32> {
    m.tokenizer.encode_chat(&[ChatMessage::user("What is the capital of France? 12345")]).unwrap()
}

/// Feeds `ids` in chunks of the given lengths; returns the logits of every position.
fn forward_chunked(m: &LoadedModel, ids: &[u32], chunks: &[usize]) -> (Tensor, lockstep_engine::KvCache) {
    let mut cache = m.model.new_cache();
    let mut out = vec![];
    let mut at = 0;
    for &n in chunks {
        out.push(m.model.forward(&ids[at..at + n], &mut cache, None).unwrap());
        at += n;
    }
    assert_eq!(at, ids.len());
    (Tensor::cat(&out, 0).unwrap(), cache)
}

#[test]
fn prefill_then_decode_equals_one_prefill() {
    for m in [tiny_hf(), tiny_gguf()] {
        let mut ids = prompt_ids(&m);
        ids.extend([100, 200, 300, 17, 42]);
        let n = ids.len();
        let (whole, cache_whole) = forward_chunked(&m, &ids, &[n]);
        let mut chunks = vec![n - 5];
        chunks.extend([1; 5]);
        let (stepped, cache_stepped) = forward_chunked(&m, &ids, &chunks);
        let d = max_abs_diff(&whole, &stepped);
        assert!(d < 5e-5, "{}: logits differ by {d}", m.origin.name());
        assert_eq!(cache_whole.offset(), n);
        assert_eq!(cache_stepped.offset(), n);
        for l in 0..m.model.info().config.num_layers {
            let (kw, vw) = cache_whole.layer(l).unwrap();
            let (ks, vs) = cache_stepped.layer(l).unwrap();
            assert_eq!(kw.dims(), &[m.model.info().config.num_kv_heads, n, m.model.info().config.head_dim]);
            assert!(max_abs_diff(kw, ks) < 1e-5 && max_abs_diff(vw, vs) < 1e-5, "layer {l} cache differs");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    /// Any split of a sequence into chunks gives the logits of one forward pass.
    #[test]
    fn any_chunking_equals_one_prefill(cuts in prop::collection::vec(1usize..8, 1..6), tail in prop::collection::vec(3u32..500, 0..6)) {
        let m = tiny_hf();
        let mut ids = prompt_ids(&m);
        ids.extend(tail);
        let n = ids.len();
        let mut chunks = vec![];
        let mut left = n;
        for c in cuts {
            if left <= c { break; }
            chunks.push(c);
            left -= c;
        }
        chunks.push(left);
        let (whole, _) = forward_chunked(&m, &ids, &[n]);
        let (parts, cache) = forward_chunked(&m, &ids, &chunks);
        prop_assert_eq!(cache.offset(), n);
        // Chunks of other lengths run GEMMs of other shapes, which sum in another order:
        // measured up to 1.05e-5 on logits of magnitude ~10 (f32 epsilon x ~100).
        let d = max_abs_diff(&whole, &parts);
        prop_assert!(d < 5e-5, "chunks {:?}: logits differ by {}", chunks, d);
    }
}

#[test]
fn hf_and_gguf_origins_agree() {
    let (hf, gg) = (tiny_hf(), tiny_gguf());
    assert_eq!(hf.model.info().qk_layout, QkLayout::HalfSplit);
    assert_eq!(gg.model.info().qk_layout, QkLayout::Interleaved);
    let ids = prompt_ids(&hf);
    assert_eq!(ids, prompt_ids(&gg), "tokenizers of the two origins disagree");
    let (mut c1, mut c2) = (hf.model.new_cache(), gg.model.new_cache());
    let (mut cap1, mut cap2) = (Capture::new(), Capture::new());
    let l1 = hf.model.forward(&ids, &mut c1, Some(&mut cap1)).unwrap();
    let l2 = gg.model.forward(&ids, &mut c2, Some(&mut cap2)).unwrap();
    assert!(max_abs_diff(&l1, &l2) < 1e-4);
    let hd = gg.model.info().config.head_dim;
    for site in ["layers.0.q", "layers.0.k", "layers.1.q_rope", "layers.2.k_rope", "layers.2.cache_k"] {
        let a = cap1.get(site).unwrap();
        let b = gg.model.info().qk_layout.to_hf(cap2.get(site).unwrap(), hd).unwrap();
        assert!(max_abs_diff(a, &b) < 1e-4, "{site} differs after gguf-qk-deinterleave");
        // ...and without the transform they differ: the GGUF really is stored permuted.
        assert!(max_abs_diff(a, cap2.get(site).unwrap()) > 1e-2, "{site}: GGUF Q/K not permuted?");
    }
}

#[test]
fn taps_capture_every_site_and_change_nothing() {
    let m = tiny_hf();
    let ids = prompt_ids(&m);
    let mut cap = Capture::new();
    let with = m.model.forward(&ids, &mut m.model.new_cache(), Some(&mut cap)).unwrap();
    let without = m.model.forward(&ids, &mut m.model.new_cache(), None).unwrap();
    assert_eq!(max_abs_diff(&with, &without), 0.0);
    let names: Vec<&str> = cap.sites().collect();
    assert_eq!(names, m.model.site_graph().names().iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let cfg = &m.model.info().config;
    let n = ids.len();
    assert_eq!(cap.get("layers.1.q_rope").unwrap().dims(), &[cfg.num_heads, n, cfg.head_dim]);
    assert_eq!(cap.get("layers.1.cache_v").unwrap().dims(), &[cfg.num_kv_heads, n, cfg.head_dim]);
    assert_eq!(cap.get("layers.1.mlp_act").unwrap().dims(), &[n, cfg.intermediate_size]);
    assert_eq!(cap.get("logits").unwrap().dims(), &[n, cfg.vocab_size]);
}

#[test]
fn greedy_generate_is_the_stepwise_argmax() {
    let m = tiny_hf();
    let ids = prompt_ids(&m);
    let out = lockstep_engine::generate::generate_greedy(m.model.as_ref(), &ids, 6, &[]).unwrap();
    // The same by full re-forward of the growing sequence (no cache reuse).
    let mut seq = ids.clone();
    for &tok in &out {
        let logits = m.model.forward(&seq, &mut m.model.new_cache(), None).unwrap();
        let next = lockstep_engine::generate::argmax(&logits.i(seq.len() - 1).unwrap()).unwrap();
        assert_eq!(next, tok);
        seq.push(tok);
    }
}

#[test]
fn f64_runs_and_agrees_with_f32() {
    let m32 = tiny_hf();
    let m64 = load(&fixture("tiny-llama"), &LoadOptions { dtype: DType::F64, ..Default::default() }).unwrap();
    let ids = prompt_ids(&m32);
    let a = m32.model.forward(&ids, &mut m32.model.new_cache(), None).unwrap();
    let b = m64.model.forward(&ids, &mut m64.model.new_cache(), None).unwrap();
    assert_eq!(b.dtype(), DType::F64);
    assert!(max_abs_diff(&a, &b.to_dtype(DType::F32).unwrap()) < 1e-4);
}

// --- load errors ----------------------------------------------------------------------------

fn copy_fixture_dir(tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("lockstep-engine-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn rewrite_safetensors(dir: &Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut ts = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut ts);
    candle_core::safetensors::save(&ts, &p).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture_dir("missing");
    rewrite_safetensors(&dir, |ts| {
        ts.remove("model.layers.1.self_attn.k_proj.weight").unwrap();
    });
    let err = load(&dir, &LoadOptions::default()).err().expect("load must fail");
    match &err {
        EngineError::MissingTensor { tensor, .. } => assert_eq!(tensor, "model.layers.1.self_attn.k_proj.weight"),
        other => panic!("expected MissingTensor, got {other}"),
    }
    assert!(err.to_string().contains("model.layers.1.self_attn.k_proj.weight"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let dir = copy_fixture_dir("shape");
    rewrite_safetensors(&dir, |ts| {
        let t = ts["model.layers.2.mlp.up_proj.weight"].narrow(0, 0, 100).unwrap();
        ts.insert("model.layers.2.mlp.up_proj.weight".into(), t);
    });
    let err = load(&dir, &LoadOptions::default()).err().expect("load must fail");
    match &err {
        EngineError::ShapeMismatch { tensor, got, expected, .. } => {
            assert_eq!(tensor, "model.layers.2.mlp.up_proj.weight");
            assert_eq!(got, &vec![100, 64]);
            assert_eq!(expected, &vec![160, 64]);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_gguf_is_an_error_not_a_panic() {
    let bytes = std::fs::read(fixture("tiny-llama.gguf")).unwrap();
    for cut in [3usize, 100, 2000, bytes.len() / 2, bytes.len() - 1] {
        let p = std::env::temp_dir().join(format!("lockstep-trunc-{cut}-{}.gguf", std::process::id()));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err = load(&p, &LoadOptions::default()).err().unwrap_or_else(|| panic!("cut at {cut} loaded"));
        let msg = err.to_string();
        assert!(msg.contains(&p.display().to_string()), "error does not name the file: {msg}");
        assert!(!msg.contains("backtrace") && !msg.contains("   0: "), "backtrace in message: {msg}");
        std::fs::remove_file(p).unwrap();
    }
}

// --- quantized weights -------------------------------------------------------------------------

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let num: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn quantized_and_dequantized_modes_agree_on_every_quant_fixture() {
    use lockstep_engine::quant::MODES_AGREE_LOGITS_REL_L2;
    use lockstep_engine::WeightsMode;
    for (file, types) in [
        ("tiny-llama.Q4_0.gguf", "Q4_0"),
        ("tiny-llama.Q4_1.gguf", "Q4_1"),
        ("tiny-llama.Q8_0.gguf", "Q8_0"),
        ("tiny-llama-k.Q4_K_M.gguf", "Q4K"),
        ("tiny-llama-k.Q6_K.gguf", "Q6K"),
    ] {
        let q = load(&fixture(file), &LoadOptions { weights: Some(WeightsMode::Quantized), ..Default::default() }).unwrap();
        let d = load(&fixture(file), &LoadOptions { weights: Some(WeightsMode::Dequant), ..Default::default() }).unwrap();
        assert!(q.model.info().quantized_kernels && !d.model.info().quantized_kernels, "{file}");
        assert!(q.model.info().matrix_types.iter().any(|t| t == types), "{file}: {:?}", q.model.info().matrix_types);
        assert_eq!(d.model.info().matrix_types, vec!["f32".to_string()]);
        let ids = prompt_ids(&q);
        let (lq, _) = forward_chunked(&q, &ids, &[ids.len() - 3, 1, 1, 1]);
        let (ld, _) = forward_chunked(&d, &ids, &[ids.len()]);
        let r = rel_l2(&lq, &ld);
        eprintln!("{file}: quantized vs dequant logits rel-L2 {r:.3e}");
        assert!(r > 0.0, "{file}: quantized kernels must not be the dense path");
        assert!(r < MODES_AGREE_LOGITS_REL_L2, "{file}: rel-L2 {r} >= {MODES_AGREE_LOGITS_REL_L2}");
    }
}

/// Any decoder (issue 33): a model the bundled engine does not run is still described, by its
/// shape and the sites every decoder has, for an engine under test that runs it; a model it
/// runs keeps its family's detailed sites.
#[test]
fn a_model_the_engine_does_not_run_is_described_by_its_shape_and_the_generic_sites() {
    use lockstep_engine::models::{describe_at, site_graph_at};
    let qwen3 = fixture("tiny-qwen3");
    let err = load(&qwen3, &LoadOptions::default()).err().expect("the bundled engine refuses qwen3");
    assert!(err.to_string().contains("model_type `qwen3` is not supported"), "{err}");
    let d = describe_at(&qwen3).unwrap();
    assert!(d.family.is_none());
    assert_eq!(d.model_type, "qwen3");
    assert_eq!((d.config.num_layers, d.config.hidden_size, d.config.num_heads, d.config.num_kv_heads, d.config.head_dim), (3, 64, 4, 2, 16));
    let mut want = vec!["embed".to_string()];
    for l in 0..3 {
        want.extend(["cache_k", "cache_v", "out"].map(|leaf| format!("layers.{l}.{leaf}")));
    }
    want.extend(["final_norm".into(), "logits".into()]);
    assert_eq!(d.graph.names(), want);
    assert_eq!(d.graph.localizes_to(), "site");

    for known in ["tiny-llama", "tiny-llama.gguf", "tiny-qwen2", "tiny-mixtral"] {
        let d = describe_at(&fixture(known)).unwrap();
        assert!(d.family.is_some(), "{known}");
        assert_eq!(d.graph, site_graph_at(&fixture(known)).unwrap(), "{known}: the family's own graph");
    }
}

/// An f16 cache (`LoadOptions::kv_cache`): every K/V row is the step's `k_rope`/`v` rounded to
/// f16, and each layer's attention over it is the attention over an f32 cache holding the same
/// rounded values: at a prefill longer than a chunk of query rows (300 rows), at a prefill at an
/// offset, and at decode steps past a key block (512) and across the cache's growth (no
/// reservation: its buffers move at 600 positions). The logits stay near the f32 cache's, and
/// the harness's conversion of a captured cache (a few rows, the canonical layout, f64) works.
#[test]
fn an_f16_cache_attends_as_an_f32_cache_of_its_rounded_values() {
    use lockstep_engine::blocks::{attention, HeadMapping, Mask};
    use lockstep_engine::KvDtype;
    for file in ["tiny-llama", "tiny-llama.gguf"] {
        let m = load(&fixture(file), &LoadOptions { kv_cache: KvDtype::F16, ..Default::default() }).unwrap();
        let f = load(&fixture(file), &LoadOptions::default()).unwrap();
        let cfg = m.model.info().config.clone();
        let (nh, hd) = (cfg.num_heads, cfg.head_dim);
        let mut x = 99u64;
        let ids: Vec<u32> = (0..615)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                3 + ((x >> 33) % (cfg.vocab_size as u64 - 3)) as u32
            })
            .collect();
        let (mut cache, mut cache32) = (m.model.new_cache(), f.model.new_cache());
        assert_eq!((cache.dtype(), cache32.dtype()), (KvDtype::F16, KvDtype::F32));
        let mut pieces = vec![300, 5];
        pieces.extend([1; 310]);
        let mut at = 0;
        for (call, &n) in pieces.iter().enumerate() {
            let mut cap = Capture::new();
            let logits = m.model.forward(&ids[at..at + n], &mut cache, Some(&mut cap)).unwrap();
            let logits32 = f.model.forward(&ids[at..at + n], &mut cache32, None).unwrap();
            at += n;
            let r = rel_l2(&logits, &logits32);
            assert!(r < 2e-2, "{file} call {call}: logits vs the f32 cache's, rel-L2 {r}");
            for i in 0..cfg.num_layers {
                let get = |leaf: &str| cap.get(&format!("layers.{i}.{leaf}")).unwrap().clone();
                let (q, ck, cv, attn) = (get("q_rope"), get("cache_k"), get("cache_v"), get("attn"));
                assert_eq!((ck.dtype(), cv.dtype(), ck.dims()[1]), (DType::F16, DType::F16, at));
                // The step's rows: k_rope and v rounded to f16.
                let rounded = |t: &Tensor| t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
                let k_step = ck.narrow(1, at - n, n).unwrap().to_dtype(DType::F32).unwrap();
                assert_eq!(max_abs_diff(&k_step, &rounded(&get("k_rope"))), 0.0, "{file} layer {i}");
                let v_step = cv.narrow(1, at - n, n).unwrap().to_dtype(DType::F32).unwrap();
                let v = get("v").reshape((n, cfg.num_kv_heads, hd)).unwrap().transpose(0, 1).unwrap();
                assert_eq!(max_abs_diff(&v_step, &rounded(&v)), 0.0, "{file} layer {i}");
                // Attention over an f32 cache of the same values.
                let (k32, v32) = (ck.to_dtype(DType::F32).unwrap(), cv.to_dtype(DType::F32).unwrap());
                let mask = if n > 1 { Mask::Causal { offset: at - n } } else { Mask::None };
                let want = attention(&q, &k32, &v32, mask, 1.0 / (hd as f64).sqrt(), HeadMapping::Grouped).unwrap();
                let got = attn.reshape((n, nh, hd)).unwrap().transpose(0, 1).unwrap();
                let d = max_abs_diff(&got, &want);
                match n {
                    1 => assert_eq!(d, 0.0, "{file} call {call} layer {i}: a decode step reads the f16 rows as their f32 values"),
                    _ => assert!(d < 1e-6, "{file} call {call} layer {i}: prefill differs by {d}"),
                }
            }
            if call == 0 || at == pieces.iter().sum::<usize>() {
                // What the harness does with a captured cache: a few rows, canonical, f64.
                let site = m.model.site_graph().get("layers.0.cache_k").unwrap().clone();
                let ck = cap.get("layers.0.cache_k").unwrap();
                let (canon, _) = m.model.to_canonical(&site, &ck.narrow(1, 0, 4).unwrap()).unwrap();
                let (canon32, _) = f.model.to_canonical(&site, &ck.narrow(1, 0, 4).unwrap().to_dtype(DType::F32).unwrap()).unwrap();
                let (a, b) = (canon.to_dtype(DType::F64).unwrap(), canon32.to_dtype(DType::F64).unwrap());
                assert_eq!(a.flatten_all().unwrap().to_vec1::<f64>().unwrap(), b.flatten_all().unwrap().to_vec1::<f64>().unwrap());
            }
        }
    }
}
