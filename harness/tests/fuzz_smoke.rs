//! A smoke run of the fuzz targets in every `cargo test`: each target's body (the very code the
//! libFuzzer binaries of fuzz/ run: `fuzz/src/lib.rs` is included here as a module) over its
//! committed seed corpus, `fuzz/corpus/<target>/`, then over deterministic mutations of it
//! (bit flips, interesting bytes and integers, insertions, deletions, truncations, repeated
//! and spliced ranges) for up to `LOCKSTEP_FUZZ_SMOKE_ITERS` inputs (default 2000) or
//! `LOCKSTEP_FUZZ_SMOKE_SECONDS` seconds (default 3), whichever comes first.
//!
//! Coverage-guided fuzzing is `make fuzz` (scripts/fuzz.sh). An input that panics here is
//! written to the test's temporary directory; add it to `fuzz/corpus/<target>/` with the fix.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

/// Panics whose cause is known and fixed elsewhere: (target, part of the message, why).
/// Empty: `general.alignment = 0` (a divide by zero in candle's GGUF reader) was the one,
/// until the engine read GGUF headers itself (src/gguf.rs).
const KNOWN: &[(&str, &str, &str)] = &[];

thread_local! {
    /// Set while a target runs: its panics are caught and kept here, not printed.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic hook that keeps the message (and the location) for the test to report, instead of
/// printing a trace for every expected, caught panic.
fn quiet_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(|c| c.get()) {
                return default(info);
            }
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
        }));
    });
}

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: the mutations are the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

const INTERESTING: &[u64] = &[0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 1 << 32, u64::MAX >> 1, u64::MAX];

/// One to four stacked mutations of `input` (`other`: another seed to splice from).
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b'\\', b'\n'][rng.below(9)];
            }
            2 if len >= 8 => {
                // An interesting little-endian integer of 1, 2, 4 or 8 bytes (GGUF counts, lengths, dims).
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(len - w + 1);
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                v[i..i + w].copy_from_slice(&x[..w]);
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            5 => v.truncate(rng.below(len + 1)),
            6 if len > 0 => {
                // A range repeated (a list or a table grows).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let chunk = v[i..i + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            7 if !other.is_empty() => {
                // Splice: our head, the other seed's tail.
                let (i, j) = (rng.below(len + 1), rng.below(other.len()));
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            _ if len > 1 => {
                // Two bytes swapped.
                let (i, j) = (rng.below(len), rng.below(len));
                v.swap(i, j);
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seeds", dir.display());
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

/// Runs `body` on `input`: Ok, or the panic's message. A known panic is counted in `known`.
fn run_one(target: &str, body: fn(&[u8]), input: &[u8], known: &mut usize) -> Result<(), String> {
    LAST_PANIC.with(|p| p.borrow_mut().take());
    CATCHING.with(|c| c.set(true));
    let result = std::panic::catch_unwind(|| body(input));
    CATCHING.with(|c| c.set(false));
    match result {
        Ok(()) => Ok(()),
        Err(_) => {
            let msg = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_default();
            if KNOWN.iter().any(|(t, m, _)| *t == target && msg.contains(m)) {
                *known += 1;
                return Ok(());
            }
            Err(msg)
        }
    }
}

fn smoke(target: &str) {
    quiet_panics();
    let body = targets::TARGETS.iter().find(|(n, _)| *n == target).unwrap_or_else(|| panic!("no target {target}")).1;
    let seeds = corpus(target);
    let mut known = 0;
    let fail = |what: String, input: &[u8], msg: String| -> ! {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-smoke-{target}.bin"));
        std::fs::write(&out, input).unwrap();
        panic!("fuzz target `{target}` panicked on {what}: {msg}\n  input written to {}", out.display());
    };
    for (path, data) in &seeds {
        if let Err(msg) = run_one(target, body, data, &mut known) {
            fail(format!("seed {}", path.display()), data, msg);
        }
    }
    let iters = env_num("LOCKSTEP_FUZZ_SMOKE_ITERS", 5000);
    let budget = Duration::from_secs_f64(env_num("LOCKSTEP_FUZZ_SMOKE_SECONDS", 3) as f64);
    let start = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let mut n = 0;
    while n < iters && start.elapsed() < budget {
        let a = &seeds[rng.below(seeds.len())].1;
        let b = &seeds[rng.below(seeds.len())].1;
        let input = mutate(&mut rng, a, b);
        if let Err(msg) = run_one(target, body, &input, &mut known) {
            fail(format!("mutation {n}"), &input, msg);
        }
        n += 1;
    }
    eprintln!(
        "fuzz smoke `{target}`: {} seeds + {n} mutations in {:.1}s{}",
        seeds.len(),
        start.elapsed().as_secs_f64(),
        if known > 0 { format!(", {known} known panics ({})", KNOWN.iter().find(|k| k.0 == target).unwrap().2) } else { String::new() }
    );
}

#[test]
fn fuzz_smoke_gguf() {
    smoke("gguf");
}
#[test]
fn fuzz_smoke_safetensors() {
    smoke("safetensors");
}
#[test]
fn fuzz_smoke_hf_config() {
    smoke("hf_config");
}
#[test]
fn fuzz_smoke_tokenizer() {
    smoke("tokenizer");
}
#[test]
fn fuzz_smoke_chat_template() {
    smoke("chat_template");
}
#[test]
fn fuzz_smoke_lora_config() {
    smoke("lora_config");
}
#[test]
fn fuzz_smoke_suite() {
    smoke("suite");
}
#[test]
fn fuzz_smoke_trace() {
    smoke("trace");
}

/// The arrays target embeds Python (the reference environment): run where it exists.
#[test]
#[cfg_attr(not(lockstep_live), ignore = "needs the reference environment: run `make setup` or `make test` (or set LOCKSTEP_VENV)")]
fn fuzz_smoke_arrays() {
    smoke("arrays");
}

/// Every target the library lists has a smoke test above and a seed corpus.
#[test]
fn every_target_has_a_smoke_test_and_seeds() {
    let src = include_str!("fuzz_smoke.rs");
    for (name, _) in targets::TARGETS {
        assert!(src.contains(&format!("fn fuzz_smoke_{name}()")), "no smoke test for `{name}`");
        assert!(!corpus(name).is_empty());
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../fuzz/fuzz_targets/{name}.rs"));
        assert!(bin.is_file(), "no {}", bin.display());
    }
}
