#!/usr/bin/env python
"""Generate lockstep's tiny fixture model, in Hugging Face and in GGUF form.

What it makes (under snapshots/models/):

  tiny-llama/            a Hugging Face Llama directory: config.json, model.safetensors (f32),
                         tokenizer.json, tokenizer_config.json (with a ChatML chat template),
                         special_tokens_map.json, generation_config.json
  tiny-llama.gguf        the same model and tokenizer as llama.cpp's convert_hf_to_gguf.py would
                         write them: all tensors F32, Q/K rows permuted to GGUF's RoPE layout
  tiny-llama.Q4_0.gguf   the same GGUF quantized with the gguf package's quantizers, laid out byte
  tiny-llama.Q4_1.gguf   for byte as `llama-quantize --pure` lays it out: every 2-D matrix (token_embd
  tiny-llama.Q8_0.gguf   and output included) in the quant type, the 1-D norm weights F32
  tiny-llama-k.Q4_K_M.gguf  a second tiny Llama, wide enough for llama.cpp's K-quants (their rows are
  tiny-llama-k.Q6_K.gguf    multiples of 256; hidden 64 is not, and llama.cpp would silently fall back
                         to other types): hidden 256, 2 layers, 8 query / 4 KV heads, the same
                         tokenizer. Its F32 GGUF is written to a temporary directory only and then
                         quantized by llama.cpp itself (llama-cpp-python's llama_model_quantize,
                         one thread), with llama.cpp's default recipe for the file type (Q4_K_M
                         mixes Q4_K and Q6_K)
  tiny-qwen2/            a tiny Qwen2 (Qwen2ForCausalLM): TINY's dimensions with 2 layers, q/k/v
  tiny-qwen2.gguf        biases (o_proj none), RoPE base 1e6, an untied head, the same tokenizer,
                         ChatML with Qwen's default system prompt and no BOS; its GGUF as
                         convert_hf_to_gguf.py's Qwen2Model writes it (architecture qwen2, Q/K rows
                         NOT permuted: llama.cpp runs qwen2 with NEOX RoPE); tiny-qwen2.Q8_0.gguf
                         the same with its matrices in Q8_0 (biases and norms F32). `--qwen2-only`
                         writes and checks just these
  tiny-mixtral/          a tiny Mixtral (MixtralForCausalLM): hidden 32, 2 layers, 4 query / 2 KV
  tiny-mixtral.gguf      heads, 4 experts (SwiGLU, 32 wide) with top-2 routing, RoPE base 1e6, an
  tiny-mixtral.Q8_0.gguf untied head, the same tokenizer and ChatML template as tiny-llama. HF names as
                         Mixtral's released checkpoints (block_sparse_moe.gate, experts.N.w1/w2/w3);
                         its GGUF as convert_hf_to_gguf.py writes Mixtral (architecture llama,
                         llama.expert_count / expert_used_count, Q/K rows permuted, the experts
                         merged into blk.N.ffn_{gate,up,down}_exps [n_expert, out, in]); its Q8_0 as
                         `llama-quantize --pure` would (every matrix Q8_0 except the router
                         blk.N.ffn_gate_inp, which llama.cpp never quantizes). The router weights
                         are scaled (MIXTRAL_ROUTER_STD) so that top-2 choices are well separated.
                         `--mixtral-only` writes and checks just these (transformers on the HF
                         directory; llama.cpp on both GGUFs: its F32 logits must equal
                         transformers', which also proves the GGUF's expert and Q/K layout)
  tiny-qwen3/            a tiny Qwen3 (Qwen3ForCausalLM): TINY's dimensions with 3 layers, RMSNorm
                         over each head of q and k (q_norm / k_norm), RoPE base 1e6, no biases, an
  tiny-qwen3.gguf         untied head, tiny-qwen2's tokenizer setup, and its F32 GGUF (llama.cpp's
                         `qwen3` architecture): a model the bundled engine does not run, for
                         engines under test that bring their own (examples/python/hf_engine.py).
                         `--qwen3-only` writes and checks it (transformers, mlx-lm's qwen3 and
                         llama.cpp's qwen3 on the GGUF with the same logits)
  tiny-spm/              a tiny Llama (hidden 32, 2 layers, head_dim 8) whose tokenizer is SentencePiece,
  tiny-spm.gguf          Llama 2 / TinyLlama style: a 512-piece BPE model trained here by the
                         sentencepiece package (byte fallback, <unk> <s> </s> = 0 1 2, add-BOS, a
                         Llama 2 [INST] chat template), as tokenizer.model + tokenizer.json (HF) and as
                         tokenizer.ggml.model = llama (tokens, scores, token types) in the F32 GGUF.
                         `--spm-only` writes and checks just these; the self-check compares
                         sentencepiece, the tokenizer.json and llama.cpp's tokenizer of the GGUF

Why: the engine's and the harness's tests need a model that loads in a second, runs on any
machine, and still exercises everything a real Llama does (grouped-query attention, RoPE,
RMSNorm weights, SwiGLU, an untied LM head, a byte-level BPE tokenizer with special tokens
and a chat template), in both weight formats, with the two formats provably the same model.

Everything is deterministic: the corpus the tokenizer is trained on is generated from a seeded
RNG, the weights come from numpy's PCG64 with a fixed seed, and every file is written with
sorted keys / fixed order, so running the script twice gives byte-identical files. It prints
the sha256 of each file it writes.

The weights are random, but scaled so that the model is not degenerate: greedy choices have
clear top-1/top-2 margins, a greedy continuation does not repeat one token forever, and the
RMSNorm weights are not all 1 (a bug that ignores them changes the output).

The K-quant files are byte-reproducible for a given llama.cpp build (the one
scripts/setup_env.sh builds into the reference environment); another llama.cpp version may
quantize differently.

At the end it checks itself and exits non-zero if anything is off: transformers loads the
HF directory and the GGUF, both tokenizers must give the same ids on a chat prompt and on
awkward text, and both models must give the same logits (max abs difference < 1e-4). Every
quantized GGUF must keep the F32 file's metadata (general.file_type aside), the Q4_0/Q4_1/Q8_0
files must equal llama.cpp's own `--pure` quantization of tiny-llama.gguf byte for byte, and
transformers (which dequantizes with the gguf package) must load each quantized file and give
finite logits; Q8_0's must be close to F32's. It prints each quant type's max |logit
difference| from its F32 model and how often their greedy top-1 agrees.

LoRA adapters (under snapshots/adapters/), each drawn from its own seeded generator:

  tiny-peft/       PEFT format for the tiny Llama: r 4, lora_alpha 8 (scale 2), all seven
                   projections, layers_to_transform [0, 2]
  tiny-mlx/        mlx-lm format for the tiny Llama: rank 4, scale 2, q/k/v and down_proj,
                   num_layers 2 (the last two layers)
  tiny-zero-b/     PEFT, q_proj/v_proj, every B matrix zero: an adapter with no effect
  smollm2-mlx/     mlx-lm format for SmolLM2-135M: rank 8, scale 20, q_proj/v_proj, the last
                   16 of 30 layers (mlx-lm's defaults), float16 tensors (~0.5 MB). A is drawn
                   as mlx-lm initializes it (uniform +-1/sqrt(in)), B normal with std
                   SMOLLM2_B_STD = 0.006, chosen so the adapter changes the logits visibly
                   (transformers' greedy answer to "What is the capital of France?" becomes
                   "L'Étoile (The City of Lights) is the capital of France" instead of "The
                   capital of France is Paris."; logits rel-L2 8e-2) while the model still
                   answers sensibly (0.01 gave rel-L2 1.3e-1 and flatter distributions).

  tiny-mixtral-mlx/ mlx-lm format for the tiny Mixtral: rank 2, scale 2, q_proj and the router
                   block_sparse_moe.gate, both layers (written with the tiny Mixtral)

Adapters are written with --adapters-only too (without rewriting the models).

Run with the reference environment's Python:
    /root/.cache/lockstep/venv/bin/python scripts/make_fixtures.py [--no-check] [--adapters-only]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "snapshots" / "models"
HF_DIR = OUT_DIR / "tiny-llama"
GGUF_NAME = "tiny-llama.gguf"
GGUF_PATH = OUT_DIR / GGUF_NAME

# --- tokenizer -------------------------------------------------------------------------------
CORPUS_SEED = 20261123
CORPUS_LINES = 3000
VOCAB_SIZE = 512  # total, special tokens included
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 256

# SmolLM2's ChatML template, with a system prompt of our own.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# --- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """The dimensions and weight seed of one tiny Llama (everything else is shared)."""

    name: str  # general.name, and the stem of its file names
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    weight_seed: int
    arch: str = "llama"  # "qwen2": q/k/v biases, HF-ordered Q/K rows in the GGUF, its own config
    # "mixtral": a sparse mixture of num_experts SwiGLU experts (intermediate_size each), top_k
    num_experts: int = 0
    top_k: int = 0


# The fixture of the HF directory, tiny-llama.gguf and its Q4_0/Q4_1/Q8_0 files.
TINY = ModelSpec("tiny-llama", hidden_size=64, intermediate_size=160, num_layers=3,
                 num_heads=4, num_kv_heads=2, head_dim=16, weight_seed=7)
# Wide enough for K-quants: every matrix row (hidden, intermediate, heads * head_dim) is a
# multiple of 256, llama.cpp's K-quant super-block. Seeds 8 and 9 give a near-tie greedy choice
# (margin 0.013 < MIN_MARGIN) on the check prompt; 10 is the first that does not.
TINY_K = ModelSpec("tiny-llama-k", hidden_size=256, intermediate_size=512, num_layers=2,
                   num_heads=8, num_kv_heads=4, head_dim=32, weight_seed=10)

# The tiny Qwen2 (HF directory tiny-qwen2/ and tiny-qwen2.gguf): the Llama architecture plus
# q/k/v biases (o_proj has none), RoPE base 1e6, an untied head (as the Qwen2.5-Coder-0.5B GGUF
# of issue 17), TINY's dimensions and tokenizer, ChatML with Qwen's default system prompt.
# Seeds 11-13 and 15 give a near-tie greedy choice (margin < MIN_MARGIN) on the check prompt, or
# a 4-7-token loop (14); 17 is the first with min margins of 0.09 / 0.12 on both chat prompts.
QWEN2 = ModelSpec("tiny-qwen2", hidden_size=64, intermediate_size=160, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, weight_seed=17, arch="qwen2")
QWEN2_DIR = OUT_DIR / "tiny-qwen2"
QWEN2_GGUF = OUT_DIR / "tiny-qwen2.gguf"
QWEN2_QUANT = "Q8_0"
QWEN2_ROPE_THETA = 1_000_000.0
QWEN2_RMS_NORM_EPS = 1e-6
# q/k/v biases are N(0, BIAS_STD): of the order of the projections' own outputs (unit scale),
# so that a dropped bias moves q, k and v visibly.
BIAS_STD = 0.5
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The tiny Qwen3 (HF directory tiny-qwen3/): a decoder the bundled engine does not run (an
# RMSNorm over each head of q and k before RoPE, `q_norm` / `k_norm`), for the engines under test
# that bring their own model (examples/python/hf_engine.py; issue 33). Qwen2's settings otherwise,
# without the biases; 3 layers, so that a bug in the middle one has a layer before and after it.
QWEN3 = ModelSpec("tiny-qwen3", hidden_size=64, intermediate_size=160, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16, weight_seed=19, arch="qwen3")
QWEN3_DIR = OUT_DIR / "tiny-qwen3"
QWEN3_GGUF = OUT_DIR / "tiny-qwen3.gguf"
# Its config.json's keys, in the order the committed file has them.
QWEN3_KEY_ORDER = ["architectures", "model_type", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
                   "head_dim", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
                   "max_position_embeddings", "max_window_layers", "num_attention_heads", "num_hidden_layers",
                   "num_key_value_heads", "rms_norm_eps", "rope_theta", "sliding_window", "tie_word_embeddings",
                   "torch_dtype", "use_cache", "use_sliding_window", "vocab_size"]

# The tiny Mixtral (tiny-mixtral/, tiny-mixtral.gguf, tiny-mixtral.Q8_0.gguf): small enough that
# the three files and its golden traces fit in 1 MB of snapshots/.
MIXTRAL = ModelSpec("tiny-mixtral", hidden_size=32, intermediate_size=32, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, weight_seed=32, arch="mixtral",
                    num_experts=4, top_k=2)
MIXTRAL_DIR = OUT_DIR / "tiny-mixtral"
MIXTRAL_GGUF = OUT_DIR / "tiny-mixtral.gguf"
MIXTRAL_QUANT = "Q8_0"
MIXTRAL_ROPE_THETA = 1_000_000.0
# Router weights N(0, (MIXTRAL_ROUTER_STD / sqrt(hidden))^2) in opposite pairs (make_weights): router
# logits of std ~MIXTRAL_ROUTER_STD whose top-2 stand clear of the third. A plain random router has
# near-ties (2nd minus 3rd probability ~1e-4 over the check prompts, seeds 23-34, std 1-3) that flip
# the choice on float noise and make parity flaky. The self-check measures the margin.
# Searched (seeds 23-34, std 1, 1.5, 2.5): the smallest margin over every layer and position of the
# check prompts stays below 5e-3 for every seed (random hidden states bring some pair's logit near
# 0 somewhere); seed 32 at std 1.5 gives 0.0044 with a greedy margin of 0.026 (>= MIN_MARGIN).
# 4e-3 of probability is still ~1e3 times the float32 noise between the engine and a reference.
MIXTRAL_ROUTER_STD = 1.5
MIN_ROUTER_MARGIN = 2e-3
# transformers (HF directory) vs llama.cpp (F32 GGUF), max abs logit difference: float32 noise of two
# implementations of one model (a layout slip in the experts or Q/K moves logits by whole units).
# Measured 5.7e-6 with an f32 KV cache.
MIXTRAL_LLAMACPP_DIFF = 1e-3

RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
MAX_POSITIONS = 256

# Standard deviations. Projections get 1/sqrt(fan_in) so activations keep unit scale; the LM
# head gets LOGIT_SCALE/sqrt(hidden), so the logits have a std of about LOGIT_SCALE, which
# gives top-1/top-2 margins of tenths of a nat rather than millionths.
EMBED_STD = 1.0
LOGIT_SCALE = 4.0
NORM_NOISE = 0.1  # norm weights are 1 + NORM_NOISE * N(0, 1)

# --- quantized files -------------------------------------------------------------------------
# TINY in these types, quantized by the gguf package (file name tiny-llama.<TYPE>.gguf).
GGUF_QUANTS = ("Q4_0", "Q4_1", "Q8_0")
# TINY_K quantized by llama.cpp: file type suffix -> (llama_cpp's ftype constant, the exact set
# of quantized tensor types llama.cpp must have produced; anything else means it fell back).
K_QUANTS = {
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", frozenset({"Q4_K", "Q6_K"})),
    "Q6_K": ("LLAMA_FTYPE_MOSTLY_Q6_K", frozenset({"Q6_K"})),
}

# --- self-check ------------------------------------------------------------------------------
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
CHECK_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, trailing spaces   ",
    "def add(a, b):\n    return a + b  # 12345 + 678\n",
    "Café naïve façade — Grüße, señor! 日本語 🙂",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
    "tabs\tand\r\nnewlines\n\n\nand 3.14159e-10",
]
CHECK_NEW_TOKENS = 20
MAX_LOGITS_DIFF = 1e-4
MIN_DISTINCT = 5
MIN_MARGIN = 0.02
# Q8_0 vs F32, max abs over the prompt and the continuation. Measured 0.33 (logit std 4; relative
# RMS 1.5%), all of it quantization error: the F32 model with gguf-dequantized Q8_0 weights gives
# the Q8_0 file's logits exactly. Q8_0 must also agree with F32 on top-1 at every position.
MAX_Q8_0_LOGITS_DIFF = 1.0


# =============================================================================================
# tokenizer
# =============================================================================================

WORDS = (
    "the a an of to and in is it that for on with as was at by be this from or have not are "
    "model token cache layer weight value query key attention norm small tiny test check "
    "river mountain light water stone city house garden winter summer morning evening "
    "quick brown fox jumps over lazy dog cat bird tree book table window door road "
    "run runs running read write open close find keep make take give think know see "
    "red green blue yellow black white first second third last next every some many "
    "what where when who why how which answer question capital country paris france "
    "hello world you we they he she one two three four five ten hundred"
).split()
CODE_NAMES = "x y n i j k data items total count result value buf idx".split()
NON_ASCII = "café naïve façade Grüße señor jalapeño déjà vu — … « » ° € £ 日本語 中文 привет 🙂".split()
PUNCT_END = [".", ".", ".", "!", "?", "...", ";", ":"]


def make_corpus(seed: int = CORPUS_SEED, n_lines: int = CORPUS_LINES) -> list[str]:
    """A deterministic corpus: prose, numbers, code, chat-shaped text and some non-ASCII."""
    rng = random.Random(seed)
    lines: list[str] = []

    def sentence() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        if rng.random() < 0.15:
            words.insert(rng.randrange(len(words)), rng.choice(NON_ASCII))
        if rng.random() < 0.2:
            words[rng.randrange(len(words))] += ","
        s = " ".join(words)
        return s[0].upper() + s[1:] + rng.choice(PUNCT_END)

    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.6:
            lines.append(" ".join(sentence() for _ in range(rng.randint(1, 3))))
        elif kind < 0.75:
            a, b = rng.sample(CODE_NAMES, 2)
            op = rng.choice(["+", "-", "*", "//", "%", "=="])
            lines.append(
                rng.choice(
                    [
                        f"def {a}_{b}({a}, {b}):\n    return {a} {op} {b}\n",
                        f"for {a} in range({rng.randint(1, 100)}):\n    {b} += {a} {op} {rng.randint(0, 9)}\n",
                        f"{a} = [{', '.join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 6)))}]",
                        f"if {a} {op} {b}:\n\tprint(\"{rng.choice(WORDS)}\", {a})  # {rng.choice(WORDS)}",
                        f"{{\"{a}\": {rng.randint(0, 999)}, \"{b}\": \"{rng.choice(WORDS)}\"}}",
                    ]
                )
            )
        elif kind < 0.9:
            user = sentence()
            reply = sentence()
            lines.append(f"system\nYou are a tiny test model.\nuser\n{user}\nassistant\n{reply}\n")
        else:
            x, y = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(
                rng.choice(
                    [
                        f"{x} + {y} = {x + y}",
                        f"{x}.{y}% of {rng.randint(1, 99)} items cost {rng.randint(1, 99)},{y:03d} €",
                        f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
                        f"({x}, {y}) -> [{x * y}]  #{rng.randint(0, 99)}",
                    ]
                )
            )
    return lines


def train_tokenizer():
    """Byte-level BPE, GPT-2 style: ByteLevel(add_prefix_space=False) pre-tokenizer with the
    GPT-2 regex, ByteLevel decoder, no normalizer and no post-processor (no BOS is added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(), trainer)
    vocab = tok.get_vocab(with_added_tokens=True)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert vocab[s] == i, (s, vocab[s])
    return tok


# =============================================================================================
# weights
# =============================================================================================


def make_weights(spec: ModelSpec, vocab_size: int) -> dict[str, np.ndarray]:
    """HF-named float32 tensors, drawn in a fixed order from one seeded generator."""
    rng = np.random.Generator(np.random.PCG64(spec.weight_seed))

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():
        return (1.0 + NORM_NOISE * rng.standard_normal(h)).astype(np.float32)

    h, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    nh, nkv = spec.num_heads, spec.num_kv_heads
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((vocab_size, h), EMBED_STD)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "self_attn.q_proj.weight"] = normal((nh * hd, h), h**-0.5)
        w[p + "self_attn.k_proj.weight"] = normal((nkv * hd, h), h**-0.5)
        w[p + "self_attn.v_proj.weight"] = normal((nkv * hd, h), h**-0.5)
        if spec.arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = normal((nh * hd,), BIAS_STD)
            w[p + "self_attn.k_proj.bias"] = normal((nkv * hd,), BIAS_STD)
            w[p + "self_attn.v_proj.bias"] = normal((nkv * hd,), BIAS_STD)
        w[p + "self_attn.o_proj.weight"] = normal((h, nh * hd), (nh * hd) ** -0.5)
        if spec.arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = (1.0 + NORM_NOISE * rng.standard_normal(hd)).astype(np.float32)
            w[p + "self_attn.k_norm.weight"] = (1.0 + NORM_NOISE * rng.standard_normal(hd)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = norm_weight()
        if spec.arch == "mixtral":
            # Router rows in opposite pairs (expert e + n/2 = -expert e): each position picks one
            # expert of each pair, and a top-2 choice nears a tie only where a pair's logit nears 0.
            half = normal((spec.num_experts // 2, h), MIXTRAL_ROUTER_STD * h**-0.5)
            w[p + "block_sparse_moe.gate.weight"] = np.concatenate([half, -half])
            for e in range(spec.num_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                w[q + "w1.weight"] = normal((f, h), h**-0.5)
                w[q + "w3.weight"] = normal((f, h), h**-0.5)
                w[q + "w2.weight"] = normal((h, f), f**-0.5)
            continue
        w[p + "mlp.gate_proj.weight"] = normal((f, h), h**-0.5)
        w[p + "mlp.up_proj.weight"] = normal((f, h), h**-0.5)
        w[p + "mlp.down_proj.weight"] = normal((h, f), f**-0.5)
    w["model.norm.weight"] = norm_weight()
    w["lm_head.weight"] = normal((vocab_size, h), LOGIT_SCALE * h**-0.5)
    return w


# =============================================================================================
# writers
# =============================================================================================


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_dir(tok, weights: dict[str, np.ndarray], spec: ModelSpec = TINY, out_dir: Path = HF_DIR) -> list[Path]:
    """A Hugging Face directory of `spec` (Llama, or Qwen2 for QWEN2) in `out_dir`."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    bos, eos, pad = vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[PAD_TOKEN]

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": False,
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": len(vocab),
    }
    if spec.arch in ("qwen2", "qwen3"):
        # As Qwen2.5's config.json: no head_dim (derived), sliding window off, bos_token_id the
        # <|endoftext|> id while the tokenizer has no BOS token (Qwen adds none).
        config = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "attention_dropout": 0.0,
            "bos_token_id": pad,
            "eos_token_id": eos,
            "hidden_act": "silu",
            "hidden_size": spec.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": spec.intermediate_size,
            "max_position_embeddings": MAX_POSITIONS,
            "max_window_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_hidden_layers": spec.num_layers,
            "num_key_value_heads": spec.num_kv_heads,
            "rms_norm_eps": QWEN2_RMS_NORM_EPS,
            "rope_theta": QWEN2_ROPE_THETA,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": len(vocab),
        }
    if spec.arch == "qwen3":
        # As Qwen3-0.6B's config.json: Qwen2's, with head_dim explicit and no biases (the
        # keys in the order of the committed file).
        q2 = config
        config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False}
        config.update({k: v for k, v in q2.items() if k not in config})
        config["head_dim"] = spec.head_dim
        config = {k: config[k] for k in sorted(config, key=lambda k: QWEN3_KEY_ORDER.index(k))}
    if spec.arch == "mixtral":
        # As Mixtral-8x7B's config.json (sliding window off), at tiny-llama's other settings.
        config = {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "attention_dropout": 0.0,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "head_dim": spec.head_dim,
            "hidden_act": "silu",
            "hidden_size": spec.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": spec.intermediate_size,
            "max_position_embeddings": MAX_POSITIONS,
            "num_attention_heads": spec.num_heads,
            "num_experts_per_tok": spec.top_k,
            "num_hidden_layers": spec.num_layers,
            "num_key_value_heads": spec.num_kv_heads,
            "num_local_experts": spec.num_experts,
            "output_router_logits": False,
            "rms_norm_eps": RMS_NORM_EPS,
            "rope_theta": MIXTRAL_ROPE_THETA,
            "router_aux_loss_coef": 0.02,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": True,
            "vocab_size": len(vocab),
        }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": SPECIAL_TOKENS,
    }
    if spec.arch in ("qwen2", "qwen3"):
        tokenizer_config.update(bos_token=None, chat_template=QWEN2_CHAT_TEMPLATE)
    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": SPECIAL_TOKENS,
    }
    if spec.arch in ("qwen2", "qwen3"):
        del special_tokens_map["bos_token"]
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}

    paths = []
    for name, obj in [
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_tokens_map),
        ("generation_config.json", generation_config),
    ]:
        write_json(out_dir / name, obj)
        paths.append(out_dir / name)

    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    paths.append(out_dir / "tokenizer.json")

    tensors = {k: torch.from_numpy(v).contiguous() for k, v in weights.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    paths.append(out_dir / "model.safetensors")
    return paths


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half Q/K rows -> GGUF's
    interleaved-pair order. GGUF row h*hd + 2i + j holds HF row h*hd + j*hd/2 + i."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensors(spec: ModelSpec, weights: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """GGUF-named tensors in convert_hf_to_gguf.py's order, Q/K rows permuted for Llama.

    Qwen2: convert_hf_to_gguf.py's Qwen2Model does not permute (llama.cpp runs qwen2 with NEOX,
    half-split, RoPE on HF-ordered rows), and the q/k/v biases follow their weights."""
    out = [("token_embd.weight", weights["model.embed_tokens.weight"])]
    for i in range(spec.num_layers):
        for hf, gg in HF_TO_GGUF_LAYER.items():
            if spec.arch == "mixtral" and hf.startswith("mlp."):
                if hf == "mlp.gate_proj.weight":
                    out += mixtral_gguf_experts(spec, weights, i)
                continue
            w = weights[f"model.layers.{i}.{hf}"]
            if spec.arch == "qwen3":
                # Qwen3Model (a Qwen2Model): rows unpermuted, and the per-head q/k norms after k.
                out.append((f"blk.{i}.{gg}", np.ascontiguousarray(w, dtype=np.float32)))
                if gg == "attn_k.weight":
                    for n in ("q", "k"):
                        norm = weights[f"model.layers.{i}.self_attn.{n}_norm.weight"]
                        out.append((f"blk.{i}.attn_{n}_norm.weight", np.ascontiguousarray(norm, dtype=np.float32)))
                continue
            if spec.arch == "qwen2":
                out.append((f"blk.{i}.{gg}", np.ascontiguousarray(w, dtype=np.float32)))
                bias = weights.get(f"model.layers.{i}.{hf[:-len('weight')]}bias")
                if bias is not None:
                    out.append((f"blk.{i}.{gg[:-len('weight')]}bias", np.ascontiguousarray(bias, dtype=np.float32)))
                continue
            if gg == "attn_q.weight":
                w = permute(w, spec.num_heads, spec.num_heads)
            elif gg == "attn_k.weight":
                w = permute(w, spec.num_heads, spec.num_kv_heads)
            out.append((f"blk.{i}.{gg}", np.ascontiguousarray(w, dtype=np.float32)))
    out.append(("output_norm.weight", weights["model.norm.weight"]))
    out.append(("output.weight", weights["lm_head.weight"]))
    return out


def mixtral_gguf_experts(spec: ModelSpec, weights: dict[str, np.ndarray], i: int) -> list[tuple[str, np.ndarray]]:
    """Layer i's router and merged experts as convert_hf_to_gguf.py's LlamaModel writes Mixtral:
    ffn_gate_inp (the router), then experts.N.w1/w2/w3 stacked over N into ffn_gate_exps /
    ffn_down_exps / ffn_up_exps, [n_expert, out, in] in numpy order."""
    p = f"model.layers.{i}.block_sparse_moe."
    out = [(f"blk.{i}.ffn_gate_inp.weight", np.ascontiguousarray(weights[p + "gate.weight"], dtype=np.float32))]
    for w, gg in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
        stacked = np.stack([weights[f"{p}experts.{e}.{w}.weight"] for e in range(spec.num_experts)])
        out.append((f"blk.{i}.{gg}.weight", np.ascontiguousarray(stacked, dtype=np.float32)))
    return out


def llama_quantize_order(tensors: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """The order llama-quantize writes tensors in: those outside the blocks first, then block by
    block; by name within each group."""

    def key(item):
        m = re.match(r"blk\.(\d+)\.", item[0])
        return (int(m.group(1)) if m else -1, item[0])

    return sorted(tensors, key=key)


def quant_path(spec: ModelSpec, qtype: str) -> Path:
    return OUT_DIR / f"{spec.name}.{qtype}.gguf"


def add_bpe_tokenizer(w, tok, bos: int, chat_template: str) -> None:
    """tokenizer.* of the tiny byte-level BPE tokenizer `tok`, as _set_vocab_gpt2 + SpecialVocab
    write them ("gpt-2" is llama.cpp's name for the plain GPT-2 split regex, the one tokenizers'
    ByteLevel(use_regex=True) uses), with `bos` as BOS and no BOS added."""
    import gguf

    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens)
    special = set(SPECIAL_TOKENS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(vocab[EOS_TOKEN])
    w.add_pad_token_id(vocab[PAD_TOKEN])
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)


def write_gguf(path: Path, spec: ModelSpec, tok, weights: dict[str, np.ndarray], qtype: str = "F32",
               rope_freqs: np.ndarray | None = None) -> Path:
    """Writes `spec`'s model and the tokenizer `tok` as a GGUF file.

    qtype "F32": as convert_hf_to_gguf.py writes it (--outtype f32). Any other gguf quant type
    name ("Q4_0", ...): every 2-D matrix quantized to it by the gguf package (which equals
    llama.cpp's reference quantizers), the 1-D norm weights F32, and the file laid out as
    `llama-quantize --pure` lays out its quantization of the F32 file: the same metadata with
    general.file_type re-set (which moves the key last), tensors in llama_quantize_order."""
    import gguf

    quantized = qtype != "F32"
    qt = gguf.GGMLQuantizationType[qtype]
    file_type = gguf.LlamaFileType[f"MOSTLY_{qtype}"] if quantized else gguf.LlamaFileType.ALL_F32

    vocab = tok.get_vocab(with_added_tokens=True)

    # llama.cpp writes Mixtral as the llama architecture with expert counts.
    w = gguf.GGUFWriter(str(path), "llama" if spec.arch == "mixtral" else spec.arch)
    # general.*  (general.architecture is added by the constructor)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(spec.name)
    # llama.* (qwen2.*), as LlamaModel.set_gguf_parameters writes them
    w.add_vocab_size(len(vocab))
    w.add_context_length(MAX_POSITIONS)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    if spec.arch == "qwen3":
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    qwen = spec.arch in ("qwen2", "qwen3")
    w.add_rope_freq_base(QWEN2_ROPE_THETA if qwen else MIXTRAL_ROPE_THETA if spec.arch == "mixtral" else ROPE_THETA)
    w.add_layer_norm_rms_eps(QWEN2_RMS_NORM_EPS if qwen else RMS_NORM_EPS)
    if spec.arch == "mixtral":
        w.add_expert_count(spec.num_experts)
        w.add_expert_used_count(spec.top_k)
    if not quantized:
        w.add_file_type(file_type)
    add_bpe_tokenizer(w, tok, vocab[PAD_TOKEN] if qwen else vocab[BOS_TOKEN], QWEN2_CHAT_TEMPLATE if qwen else CHAT_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if quantized:
        w.add_file_type(file_type)  # where llama-quantize puts it
    tensors = gguf_tensors(spec, weights)
    if rope_freqs is not None:
        # LlamaModel.generate_extra_tensors yields it before the model's own tensors.
        tensors.insert(0, ("rope_freqs.weight", np.ascontiguousarray(rope_freqs, dtype=np.float32)))
    for name, t in llama_quantize_order(tensors) if quantized else tensors:
        # llama-quantize never quantizes an MoE router (ffn_gate_inp); 3-D merged experts are
        # matrices like the others.
        if quantized and t.ndim >= 2 and not name.endswith("ffn_gate_inp.weight"):
            w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, t, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# llama.cpp logs through one process-wide callback; keep it quiet but remember its errors. The
# ctypes callback object must stay referenced as long as llama.cpp may call it (module lifetime).
_LLAMA_LOG_CALLBACK = None
_LLAMA_LOG_ERRORS: list[str] = []


def import_llama_cpp():
    """llama_cpp, with llama.cpp's log silenced (as references/llamacpp_ref.py does)."""
    global _LLAMA_LOG_CALLBACK
    import llama_cpp

    if _LLAMA_LOG_CALLBACK is None:
        C = llama_cpp.llama_cpp

        @C.llama_log_callback
        def quiet_log(level, text, user_data):
            try:
                if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
                    _LLAMA_LOG_ERRORS.append(text.decode("utf-8", "replace").rstrip())
            except Exception:
                pass

        C.llama_log_set(quiet_log, ctypes.c_void_p(0))
        _LLAMA_LOG_CALLBACK = quiet_log
    return llama_cpp


def llama_quantize(src: Path, dst: Path, ftype: str, pure: bool = False) -> Path:
    """Quantizes the GGUF file `src` into `dst` with llama.cpp's own quantizer (what llama-quantize
    runs), on one thread. ftype: the name of a llama_cpp LLAMA_FTYPE_* constant. pure: every
    matrix in the file type's base type (llama-quantize --pure), no per-tensor recipe."""
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = 1
    params.pure = pure
    _LLAMA_LOG_ERRORS.clear()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype} (status {rc}): "
                           + "; ".join(_LLAMA_LOG_ERRORS))
    return dst


def tensor_type_counts(path: Path) -> tuple[Counter, set[str], set[str]]:
    """(count of each tensor type, the types of the 2-D tensors, the types of the others)."""
    from gguf import GGUFReader

    counts, matrix_types, other_types = Counter(), set(), set()
    for t in GGUFReader(str(path)).tensors:
        name = t.tensor_type.name
        counts[name] += 1
        (matrix_types if len(t.shape) == 2 else other_types).add(name)
    return counts, matrix_types, other_types


def check_tensor_types(path: Path, matrix_types: set[str]) -> Counter:
    """Counts `path`'s tensor types; raises unless its 2-D tensors are exactly in `matrix_types`
    (all of them present) and its 1-D tensors F32."""
    counts, matrices, others = tensor_type_counts(path)
    if matrices != set(matrix_types) or others != {"F32"}:
        raise RuntimeError(f"{path.name}: tensor types {dict(counts)}: matrices in {sorted(matrices)}, "
                           f"1-D tensors in {sorted(others)}; expected matrices in {sorted(matrix_types)}, "
                           "1-D tensors in F32 (did llama.cpp fall back to other types?)")
    return counts


def gguf_metadata(path: Path) -> dict[str, tuple]:
    """Every key-value field of a GGUF file (header fields aside), as comparable raw bytes."""
    from gguf import GGUFReader

    return {
        k: (tuple(f.types), b"".join(p.tobytes() for p in f.parts))
        for k, f in GGUFReader(str(path)).fields.items()
        if not k.startswith("GGUF.")
    }


# =============================================================================================
# self-check
# =============================================================================================


def greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens after `ids` (a full forward per step: simple, no cache), and the top-1 /
    top-2 log-prob margin of each choice."""
    import torch

    seq, gen, margins = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1], dim=-1)
            top = torch.topk(lp, 2)
            margins.append((top.values[0] - top.values[1]).item())
            nxt = int(top.indices[0])
            gen.append(nxt)
            seq.append(nxt)
    return gen, margins


def self_check(k_f32: Path) -> bool:
    """k_f32: TINY_K's F32 GGUF (in a temporary directory)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.manual_seed(0)
    ok = True

    def fail(msg):
        nonlocal ok
        ok = False
        print(f"CHECK FAILED: {msg}", file=sys.stderr)

    def load_gguf(path: Path):
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    tok_hf = AutoTokenizer.from_pretrained(str(HF_DIR))
    tok_gg = AutoTokenizer.from_pretrained(str(OUT_DIR), gguf_file=GGUF_NAME)
    ids_hf = tok_hf.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids_gg = tok_gg.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids_hf, ids_gg = list(ids_hf), list(ids_gg)
    print(f"chat prompt: {len(ids_hf)} tokens: {ids_hf}")
    if ids_hf != ids_gg:
        fail(f"chat prompt ids differ:\n  hf   {ids_hf}\n  gguf {ids_gg}")
    for text in CHECK_TEXTS:
        a = tok_hf(text, add_special_tokens=True)["input_ids"]
        b = tok_gg(text, add_special_tokens=True)["input_ids"]
        if a != b:
            fail(f"ids differ on {text!r}:\n  hf   {a}\n  gguf {b}")
        if tok_hf.decode(a) != text:
            fail(f"hf tokenizer does not round-trip {text!r}: {tok_hf.decode(a)!r}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok_hf, name) != getattr(tok_gg, name):
            fail(f"{name}: hf {getattr(tok_hf, name)} gguf {getattr(tok_gg, name)}")

    m_hf = AutoModelForCausalLM.from_pretrained(str(HF_DIR), dtype=torch.float32).eval()
    m_gg = load_gguf(GGUF_PATH)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        a, b = getattr(m_hf.config, key, None), getattr(m_gg.config, key, None)
        if a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) < 1e-12):
            fail(f"config.{key}: hf {a} gguf {b}")
    theta_hf = m_hf.config.rope_parameters["rope_theta"]
    theta_gg = m_gg.config.rope_parameters["rope_theta"]
    if theta_hf != ROPE_THETA or theta_gg != ROPE_THETA:
        fail(f"rope_theta: hf {theta_hf} gguf {theta_gg}")

    def check_greedy(label: str, gen: list[int], margins: list[float]) -> None:
        distinct = len(set(gen))
        print(f"{label}: greedy {CHECK_NEW_TOKENS}-token continuation: {gen}")
        print(f"  text: {tok_hf.decode(gen)!r}")
        print(f"  distinct tokens: {distinct}")
        print(f"  top1-top2 log-prob margins: min {min(margins):.4f}, median {float(np.median(margins)):.4f}")
        print(f"  margins: {[round(m, 3) for m in margins]}")
        if distinct < MIN_DISTINCT:
            fail(f"{label}: only {distinct} distinct tokens in the greedy continuation")
        if min(margins) < MIN_MARGIN:
            fail(f"{label}: minimum greedy margin {min(margins):.4f} < {MIN_MARGIN}")

    with torch.no_grad():
        x = torch.tensor([ids_hf])
        lh = m_hf(x).logits[0]
        lg = m_gg(x).logits[0]
        diff = (lh - lg).abs().max().item()
        print(f"prefill logits [{tuple(lh.shape)}]: max |hf - gguf| = {diff:.3e}")
        if not diff < MAX_LOGITS_DIFF:
            fail(f"logits differ by {diff}")

        gen, margins = greedy(m_hf, ids_hf, CHECK_NEW_TOKENS)
        seq = ids_hf + gen
        lg_all = m_gg(torch.tensor([seq])).logits[0]
        lh_all = m_hf(torch.tensor([seq])).logits[0]
        diff_all = (lh_all - lg_all).abs().max().item()
        print(f"full-sequence logits [{tuple(lh_all.shape)}]: max |hf - gguf| = {diff_all:.3e}")
        if not diff_all < MAX_LOGITS_DIFF:
            fail(f"logits over the continuation differ by {diff_all}")
    check_greedy(TINY.name, gen, margins)

    # --- the quantized files -----------------------------------------------------------------
    # Metadata: each quantized file keeps its F32 file's (general.file_type aside), and TINY_K's
    # F32 file has TINY's tokenizer.
    f32_meta = {TINY: gguf_metadata(GGUF_PATH), TINY_K: gguf_metadata(k_f32)}
    tok_keys = sorted(k for k in f32_meta[TINY] if k.startswith("tokenizer."))
    if [f32_meta[TINY][k] for k in tok_keys] != [f32_meta[TINY_K].get(k) for k in tok_keys]:
        fail(f"{k_f32.name}: tokenizer metadata differs from {GGUF_NAME}'s")
    quant_files = [(TINY, q) for q in GGUF_QUANTS] + [(TINY_K, q) for q in K_QUANTS]
    for spec, q in quant_files:
        meta = gguf_metadata(quant_path(spec, q))
        ref = f32_meta[spec]
        ft = meta.pop("general.file_type", None)
        if meta != {k: v for k, v in ref.items() if k != "general.file_type"}:
            changed = sorted(k for k in set(meta) | set(ref) if k != "general.file_type" and meta.get(k) != ref.get(k))
            fail(f"{quant_path(spec, q).name}: metadata differs from the F32 file's: {changed}")
        want = gguf.LlamaFileType[f"MOSTLY_{q}"]
        got = int.from_bytes(ft[1][-4:], "little") if ft and ft[0] == (gguf.GGUFValueType.UINT32,) else None
        if got != want:
            fail(f"{quant_path(spec, q).name}: general.file_type {got}, expected {want.value} ({want.name})")

    # The gguf-package files equal llama.cpp's own quantization of tiny-llama.gguf, byte for byte.
    with tempfile.TemporaryDirectory(prefix="lockstep-fixtures-check-") as tmp:
        for q in GGUF_QUANTS:
            theirs = llama_quantize(GGUF_PATH, Path(tmp) / f"{q}.gguf", f"LLAMA_FTYPE_MOSTLY_{q}", pure=True)
            same = sha256(theirs) == sha256(quant_path(TINY, q))
            print(f"{quant_path(TINY, q).name} == llama.cpp's --pure {q} quantization of {GGUF_NAME}: {same}")
            if not same:
                fail(f"{quant_path(TINY, q).name} differs from llama.cpp's --pure {q} quantization")

    # Logits: each quantized model against its F32 model, on the chat prompt plus the F32 model's
    # greedy continuation (teacher-forced), and greedy generation from the quantized model itself.
    m_k = load_gguf(k_f32)
    with torch.no_grad():
        gen_k, margins_k = greedy(m_k, ids_hf, CHECK_NEW_TOKENS)
        seq_k = ids_hf + gen_k
        ref = {TINY: (lh_all, seq, gen), TINY_K: (m_k(torch.tensor([seq_k])).logits[0], seq_k, gen_k)}
    check_greedy(TINY_K.name, gen_k, margins_k)

    print(f"\nquantized vs F32 logits, over the chat prompt + the F32 model's {CHECK_NEW_TOKENS}-token greedy "
          f"continuation ({len(seq)} positions; F32 logit std {lh_all.std().item():.2f} tiny, "
          f"{ref[TINY_K][0].std().item():.2f} tiny-k):")
    print(f"  {'file':<26} {'max|diff|':>10} {'mean|diff|':>11} {'rel rms':>8} {'top-1 agree':>12} "
          f"{'own greedy = F32 greedy':>24}")
    for spec, q in quant_files:
        path = quant_path(spec, q)
        lf, sq, gen_f = ref[spec]
        m_q = load_gguf(path)
        with torch.no_grad():
            lq = m_q(torch.tensor([sq])).logits[0]
        gen_q, _ = greedy(m_q, ids_hf, CHECK_NEW_TOKENS)
        if not torch.isfinite(lq).all():
            fail(f"{path.name}: non-finite logits")
        d = (lq - lf).abs()
        rel_rms = (d.pow(2).mean().sqrt() / lf.pow(2).mean().sqrt()).item()
        agree = int((lq.argmax(-1) == lf.argmax(-1)).sum())
        prefix = next((i for i, (a, b) in enumerate(zip(gen_q, gen_f)) if a != b), len(gen_f))
        print(f"  {path.name:<26} {d.max().item():>10.4f} {d.mean().item():>11.4f} {rel_rms:>8.2%} "
              f"{agree:>7}/{len(sq):<4} {f'first {prefix}/{len(gen_f)} tokens':>24}")
        if q == "Q8_0" and not d.max().item() < MAX_Q8_0_LOGITS_DIFF:
            fail(f"{path.name}: logits differ from F32 by {d.max().item():.4f} >= {MAX_Q8_0_LOGITS_DIFF}")
        if q == "Q8_0" and agree != len(sq):
            fail(f"{path.name}: top-1 differs from F32 at {len(sq) - agree} of {len(sq)} positions")
    return ok


# =============================================================================================


# =============================================================================================
# LoRA adapters
# =============================================================================================

ADAPTER_DIR = REPO / "snapshots" / "adapters"
PROJ_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj", "gate": "block_sparse_moe.gate"}
# SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, intermediate 1536, 30 layers.
SMOLLM2_DIMS = dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                    num_layers=30)
SMOLLM2_B_STD = 0.006


def proj_dims(d: dict, proj: str) -> tuple[int, int]:
    """(out, in) of a projection."""
    h, hd, f = d["hidden_size"], d["head_dim"], d["intermediate_size"]
    return {"q_proj": (d["num_heads"] * hd, h), "k_proj": (d["num_kv_heads"] * hd, h),
            "v_proj": (d["num_kv_heads"] * hd, h), "o_proj": (h, d["num_heads"] * hd),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
            "gate": (d.get("num_experts", 0), h)}[proj]


# The tiny Mixtral's adapter (snapshots/adapters/tiny-mixtral-mlx/, mlx-lm format): rank 2, scale 2,
# q_proj and the router (block_sparse_moe.gate, among mlx-lm's default keys for Mixtral), both
# layers. B ~ N(0, MIXTRAL_LORA_B_STD^2): the router delta moves the router logits by a few tenths
# without bringing a top-2 choice near a tie on the check prompts (the self-check measures both).
MIXTRAL_ADAPTER = REPO / "snapshots" / "adapters" / "tiny-mixtral-mlx"
MIXTRAL_LORA_B_STD = 0.5


def write_mixtral_adapter() -> list[Path]:
    d = dict(hidden_size=MIXTRAL.hidden_size, intermediate_size=MIXTRAL.intermediate_size, num_heads=MIXTRAL.num_heads,
             num_kv_heads=MIXTRAL.num_kv_heads, head_dim=MIXTRAL.head_dim, num_experts=MIXTRAL.num_experts)
    projs = ["q_proj", "gate"]
    pairs = lora_pairs(d, 33, 2, projs, list(range(MIXTRAL.num_layers)), MIXTRAL_LORA_B_STD)
    return write_mlx(MIXTRAL_ADAPTER, pairs, 2, 2.0, projs, MIXTRAL.num_layers)


def lora_pairs(d: dict, seed: int, rank: int, projs: list[str], layers: list[int], b_std: float,
               zero_b: bool = False) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(layer, proj) -> (A (r, in), B (out, r)) float32, PEFT convention, drawn in order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = {}
    for i in layers:
        for p in projs:
            o, n = proj_dims(d, p)
            a = rng.uniform(-n ** -0.5, n ** -0.5, (rank, n)).astype(np.float32)
            b = (rng.standard_normal((o, rank)) * b_std).astype(np.float32)
            out[(i, p)] = (a, np.zeros_like(b) if zero_b else b)
    return out


def write_peft(path: Path, pairs, rank: int, alpha: float, projs: list[str], layers: list[int] | None) -> list[Path]:
    from safetensors.numpy import save_file
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": rank,
           "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
           "target_modules": projs, "layers_to_transform": layers, "fan_in_fan_out": False,
           "init_lora_weights": True, "inference_mode": True}
    write_json(path / "adapter_config.json", cfg)
    t = {}
    for (i, p), (a, b) in sorted(pairs.items()):
        k = f"base_model.model.model.layers.{i}.{PROJ_PATHS[p]}"
        t[f"{k}.lora_A.weight"] = np.ascontiguousarray(a)
        t[f"{k}.lora_B.weight"] = np.ascontiguousarray(b)
    save_file(t, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return [path / "adapter_config.json", path / "adapter_model.safetensors"]


def write_mlx(path: Path, pairs, rank: int, scale: float, projs: list[str], num_layers: int,
              dtype=np.float32) -> list[Path]:
    from safetensors.numpy import save_file
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"fine_tune_type": "lora", "num_layers": num_layers,
           "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0,
                               "keys": [PROJ_PATHS[p] for p in projs]}}
    write_json(path / "adapter_config.json", cfg)
    t = {}
    for (i, p), (a, b) in sorted(pairs.items()):
        k = f"model.layers.{i}.{PROJ_PATHS[p]}"
        t[f"{k}.lora_a"] = np.ascontiguousarray(a.T.astype(dtype))  # (in, r)
        t[f"{k}.lora_b"] = np.ascontiguousarray(b.T.astype(dtype))  # (r, out)
    save_file(t, str(path / "adapters.safetensors"), metadata={"format": "mlx"})
    return [path / "adapter_config.json", path / "adapters.safetensors"]


def write_adapters() -> list[Path]:
    d = dict(hidden_size=TINY.hidden_size, intermediate_size=TINY.intermediate_size, num_heads=TINY.num_heads,
             num_kv_heads=TINY.num_kv_heads, head_dim=TINY.head_dim, num_layers=TINY.num_layers)
    allp = [p for p in PROJ_PATHS if p != "gate"]  # a dense layer's seven projections (no router)
    paths = write_peft(ADAPTER_DIR / "tiny-peft", lora_pairs(d, 21, 4, allp, [0, 2], 0.05), 4, 8.0, allp, [0, 2])
    mlxp = ["q_proj", "k_proj", "v_proj", "down_proj"]
    last2 = list(range(TINY.num_layers - 2, TINY.num_layers))
    paths += write_mlx(ADAPTER_DIR / "tiny-mlx", lora_pairs(d, 22, 4, mlxp, last2, 0.05), 4, 2.0, mlxp, 2)
    qv = ["q_proj", "v_proj"]
    paths += write_peft(ADAPTER_DIR / "tiny-zero-b",
                        lora_pairs(d, 23, 4, qv, list(range(TINY.num_layers)), 0.05, zero_b=True), 4, 8.0, qv, None)
    s = SMOLLM2_DIMS
    last16 = list(range(s["num_layers"] - 16, s["num_layers"]))
    paths += write_mlx(ADAPTER_DIR / "smollm2-mlx", lora_pairs(s, 24, 8, qv, last16, SMOLLM2_B_STD), 8, 20.0, qv, 16,
                       dtype=np.float16)
    return paths


def write_qwen2(tok) -> list[Path]:
    """The tiny Qwen2: its HF directory and its F32 GGUF."""
    weights = make_weights(QWEN2, tok.get_vocab_size())
    return write_hf_dir(tok, weights, QWEN2, QWEN2_DIR) + [
        write_gguf(QWEN2_GGUF, QWEN2, tok, weights),
        # The quantized Qwen2: matrices Q8_0 (gguf package quantizer), norms and q/k/v biases F32.
        write_gguf(quant_path(QWEN2, QWEN2_QUANT), QWEN2, tok, weights, QWEN2_QUANT),
    ]


def self_check_qwen2() -> bool:
    """transformers loads the tiny Qwen2's HF directory and GGUF: same tokens on the chat prompt
    and the awkward texts, same logits (< MAX_LOGITS_DIFF), non-zero biases that matter, and a
    non-degenerate greedy continuation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ok = True

    def fail(msg):
        nonlocal ok
        ok = False
        print(f"CHECK FAILED: {msg}", file=sys.stderr)

    tok_hf = AutoTokenizer.from_pretrained(str(QWEN2_DIR))
    tok_gg = AutoTokenizer.from_pretrained(str(OUT_DIR), gguf_file=QWEN2_GGUF.name)
    ids = list(tok_hf.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    ids_gg = list(tok_gg.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    print(f"{QWEN2.name} chat prompt: {len(ids)} tokens: {ids}")
    if ids != ids_gg:
        fail(f"{QWEN2.name}: chat prompt ids differ:\n  hf   {ids}\n  gguf {ids_gg}")
    for text in CHECK_TEXTS:
        a, b = tok_hf(text)["input_ids"], tok_gg(text)["input_ids"]
        if a != b and re.search(r"\d\d", text):
            # transformers builds the tokenizer of every qwen2 GGUF with Qwen2's own split regex
            # (digits one by one), whatever tokenizer.ggml.pre says; this tokenizer (and the
            # file's pre = gpt-2, which the engine and llama.cpp follow) keeps digit runs whole.
            print(f"{QWEN2.name}: ids differ on {text!r} (digit runs: transformers' qwen2 GGUF tokenizer "
                  "splits digits one by one, ignoring tokenizer.ggml.pre = gpt-2)")
        elif a != b:
            fail(f"{QWEN2.name}: ids differ on {text!r}:\n  hf   {a}\n  gguf {b}")
    m_hf = AutoModelForCausalLM.from_pretrained(str(QWEN2_DIR), dtype=torch.float32).eval()
    m_gg = AutoModelForCausalLM.from_pretrained(str(OUT_DIR), gguf_file=QWEN2_GGUF.name, dtype=torch.float32).eval()
    if type(m_hf).__name__ != "Qwen2ForCausalLM" or type(m_gg).__name__ != "Qwen2ForCausalLM":
        fail(f"{QWEN2.name}: transformers built {type(m_hf).__name__} / {type(m_gg).__name__}")
    theta = (m_hf.config.rope_parameters or {}).get("rope_theta")
    if theta != QWEN2_ROPE_THETA or (m_gg.config.rope_parameters or {}).get("rope_theta") != QWEN2_ROPE_THETA:
        fail(f"{QWEN2.name}: rope_theta hf {theta} gguf {m_gg.config.rope_parameters}")
    with torch.no_grad():
        gen, margins = greedy(m_hf, ids, CHECK_NEW_TOKENS)
        seq = torch.tensor([ids + gen])
        lh, lg = m_hf(seq).logits[0], m_gg(seq).logits[0]
        diff = (lh - lg).abs().max().item()
        print(f"{QWEN2.name} logits [{tuple(lh.shape)}]: max |hf - gguf| = {diff:.3e}")
        if not diff < MAX_LOGITS_DIFF:
            fail(f"{QWEN2.name}: hf and gguf logits differ by {diff}")
        attn = m_hf.model.layers[0].self_attn
        saved = [m.bias.clone() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        for m in (attn.q_proj, attn.k_proj, attn.v_proj):
            m.bias.zero_()
        moved = (m_hf(seq).logits[0] - lh).abs().max().item()
        for m, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), saved):
            m.bias.copy_(b)
        print(f"{QWEN2.name}: layer 0 without its q/k/v biases moves the logits by up to {moved:.3f}")
        if not moved > 0.1:
            fail(f"{QWEN2.name}: the biases barely matter ({moved})")
        if attn.o_proj.bias is not None:
            fail(f"{QWEN2.name}: o_proj has a bias")
    distinct = len(set(gen))
    print(f"{QWEN2.name}: greedy {CHECK_NEW_TOKENS}-token continuation: {gen}")
    print(f"  text: {tok_hf.decode(gen)!r}")
    print(f"  distinct tokens: {distinct}; margins min {min(margins):.4f}, median {float(np.median(margins)):.4f}")
    if distinct < MIN_DISTINCT:
        fail(f"{QWEN2.name}: only {distinct} distinct tokens in the greedy continuation")
    if min(margins) < MIN_MARGIN:
        fail(f"{QWEN2.name}: minimum greedy margin {min(margins):.4f} < {MIN_MARGIN}")
    return ok


def write_qwen3(tok) -> list[Path]:
    """The tiny Qwen3: its HF directory and its F32 GGUF, as convert_hf_to_gguf.py writes them
    (a model the bundled engine does not run, in both formats)."""
    weights = make_weights(QWEN3, tok.get_vocab_size())
    return write_hf_dir(tok, weights, QWEN3, QWEN3_DIR) + [write_gguf(QWEN3_GGUF, QWEN3, tok, weights)]


def llamacpp_f32_logits(path: Path, seq: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `seq` on the GGUF at `path`, with an f32 KV cache
    (llama.cpp's default f16 cache alone moves the logits by ~5e-3)."""
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                          type_k=0, type_v=0, verbose=False)
    llm.eval(seq)
    out = np.array(llm.scores[: len(seq)], dtype=np.float32)
    llm.close()
    return out


# RoPE-scaling variants of the tiny Llama (tiny-llama-rope/TYPE/): its weights and tokenizer
# (symlinks into tiny-llama/) with one scaling each in config.json, the original context (64
# positions) short enough that a ~150-token prompt is past it. `yarn` is written in transformers
# 5's `rope_parameters` form, the others as `rope_scaling` beside `rope_theta` (Llama 3.1's form).
# `dynamic` scales past max_position_embeddings, so its config says 64 there (its factor x 64 =
# 256 positions served). And tiny-llama-rope-llama3.gguf: tiny-llama.gguf with llama.cpp's
# rope_freqs.weight for the llama3 variant, as convert_hf_to_gguf.py computes it.
ROPE_DIR = OUT_DIR / "tiny-llama-rope"
ROPE_ORIGINAL = 64
ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ROPE_ORIGINAL},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ROPE_ORIGINAL},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": ROPE_ORIGINAL,
                 "short_factor": [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5],
                 "long_factor": [1.0, 1.1, 1.4, 2.0, 3.0, 4.5, 6.0, 8.0]},
}
ROPE_GGUF = OUT_DIR / "tiny-llama-rope-llama3.gguf"


def link_model_files(src: Path, d: Path, rel: Path) -> None:
    """Every file of the model directory `src` but its config.json, linked into `d` (created)
    as `rel / NAME` (relative links: the checkout may move)."""
    d.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name == "config.json":
            continue
        link = d / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(rel / f.name)


def llama3_rope_freqs(scaling: dict, head_dim: int, base: float) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: the divisor of each frequency."""
    import math
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_rope_variants(tok) -> list[Path]:
    base = json.loads((HF_DIR / "config.json").read_text())
    paths = []
    for name, scaling in ROPE_VARIANTS.items():
        d = ROPE_DIR / name
        link_model_files(HF_DIR, d, Path("..") / ".." / HF_DIR.name)
        cfg = dict(base)
        if name == "yarn":
            del cfg["rope_theta"]
            cfg["rope_parameters"] = {"rope_theta": ROPE_THETA, **scaling}
        else:
            cfg["rope_scaling"] = scaling
        if name == "dynamic":
            cfg["max_position_embeddings"] = ROPE_ORIGINAL
        write_json(d / "config.json", cfg)
        paths.append(d / "config.json")
    weights = make_weights(TINY, tok.get_vocab_size())
    freqs = llama3_rope_freqs(ROPE_VARIANTS["llama3"], TINY.head_dim, ROPE_THETA)
    paths.append(write_gguf(ROPE_GGUF, TINY, tok, weights, rope_freqs=freqs))
    return paths


def self_check_rope() -> bool:
    """transformers loads every variant with its scaling, and it matters past the original
    context (the logits at ~150 positions move against the unscaled tiny Llama); llama.cpp runs
    the rope_freqs GGUF as transformers runs the llama3 variant."""
    import torch
    from transformers import AutoModelForCausalLM
    ok = True
    seq = [1] + [(7 * i) % 500 + 3 for i in range(150)]
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(HF_DIR), dtype=torch.float32).eval()(torch.tensor([seq])).logits[0]
        for name in ROPE_VARIANTS:
            m = AutoModelForCausalLM.from_pretrained(str(ROPE_DIR / name), dtype=torch.float32).eval()
            rt = m.config.rope_parameters.get("rope_type")
            lh = m(torch.tensor([seq])).logits[0]
            early = float((lh[:16] - plain[:16]).abs().max())
            late = float((lh[-16:] - plain[-16:]).abs().max())
            print(f"tiny-llama-rope/{name}: transformers rope_type {rt}; |logits - unscaled| first 16 positions {early:.3e}, last 16 {late:.3e}")
            if rt != name or not late > 0.05:
                ok = False
                print(f"CHECK FAILED: tiny-llama-rope/{name}: rope_type {rt}, scaling moves the late logits by {late}", file=sys.stderr)
            if name == "llama3":
                lc = llamacpp_f32_logits(ROPE_GGUF, seq)
                diff = float(np.abs(lc - lh.numpy()).max())
                print(f"tiny-llama-rope-llama3.gguf: llama.cpp vs transformers (llama3 config): max |diff| = {diff:.3e}")
                if not diff < MIXTRAL_LLAMACPP_DIFF:
                    ok = False
                    print(f"CHECK FAILED: llama.cpp's rope_freqs run differs from transformers' llama3 by {diff}", file=sys.stderr)
    return ok


# Sliding-window variants (issue 37): the weights and tokenizer of tiny-llama and tiny-qwen2
# (symlinks) with a window of WINDOW positions in config.json. tiny-mistral: model_type mistral,
# every layer windowed (as Mistral 7B). tiny-qwen2-swa: Qwen2's use_sliding_window with
# max_window_layers 1, so layer 0 is global and layer 1 windowed (transformers windows the
# layers from max_window_layers on). The GGUF formats carry no window for these architectures
# (llama.cpp's converter writes none and its llama/qwen2 graphs run without one): HF only.
# tiny-mistral-mixed: tiny-mistral with `layer_types` windowing layers 0 and 2 (layer 1 global,
# Ministral's form): the one form mlx-lm 0.32.2 windows (its llama model, which runs Mistral,
# windows only the layers layer_types names and needs a global one), so MLX is checked too.
WINDOW = 8
# The variants run in float32 only (no GGUF, no quantized side): a near tie matters when it is
# within the engine-vs-transformers noise, measured at 5e-7 relative on the logits (lockstep run
# on tiny-mistral, 20 steps); 1e-3 nats stays 2,000 times above it.
WINDOW_MIN_MARGIN = 1e-3
WINDOW_VARIANTS = {
    "tiny-mistral": (HF_DIR, {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": WINDOW},
                     ["mlp_bias", "pretraining_tp"]),
    "tiny-qwen2-swa": (QWEN2_DIR, {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}, []),
    "tiny-mistral-mixed": (HF_DIR, {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": WINDOW,
                                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
                           ["mlp_bias", "pretraining_tp"]),
}


def write_window_variants() -> list[Path]:
    paths = []
    for name, (src, changes, dropped) in WINDOW_VARIANTS.items():
        d = OUT_DIR / name
        link_model_files(src, d, Path("..") / src.name)
        cfg = {k: v for k, v in json.loads((src / "config.json").read_text()).items() if k not in dropped}
        cfg.update(changes)
        write_json(d / "config.json", cfg)
        paths.append(d / "config.json")
    return paths


def self_check_windows() -> bool:
    """transformers builds each variant with its window on the layers it names, and the window
    matters exactly from the first position past it: the logits equal those of the model
    without a window up to position WINDOW - 1 and move after; the greedy continuation of a
    prompt past the window has no near tie."""
    import torch
    from transformers import AutoModelForCausalLM
    ok = True
    seq = [1] + [(7 * i) % 500 + 3 for i in range(3 * WINDOW)]
    with torch.no_grad():
        for name, (src, _, _) in WINDOW_VARIANTS.items():
            m = AutoModelForCausalLM.from_pretrained(str(OUT_DIR / name), dtype=torch.float32).eval()
            base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
            types = getattr(m.config, "layer_types", None) or ["sliding_attention"] * m.config.num_hidden_layers
            lw, lb = m(torch.tensor([seq])).logits[0], base(torch.tensor([seq])).logits[0]
            d = (lw - lb).abs().amax(dim=1)
            first = int(torch.nonzero(d > 1e-4)[0]) if bool((d > 1e-4).any()) else None
            gen, margins = greedy(m, seq[:2 * WINDOW], CHECK_NEW_TOKENS)
            print(f"{name}: {type(m).__name__}, sliding_window {m.config.sliding_window}, layer types {types}; "
                  f"logits leave the unwindowed model's at position {first}; greedy margins min {min(margins):.4f}")
            if first != WINDOW:
                ok = False
                print(f"CHECK FAILED: {name}: the window acts from position {first}, not {WINDOW}", file=sys.stderr)
            if min(margins) < WINDOW_MIN_MARGIN:
                ok = False
                print(f"CHECK FAILED: {name}: minimum greedy margin {min(margins):.4f} < {WINDOW_MIN_MARGIN}", file=sys.stderr)
    return ok


def self_check_qwen3() -> bool:
    """transformers loads the tiny Qwen3 as Qwen3ForCausalLM; its q/k norms matter (set to one,
    the logits move); the greedy continuation of the chat prompt is not degenerate and has no
    near tie; and mlx-lm loads it too (its own qwen3 model) with the same logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ok = True

    def fail(msg):
        nonlocal ok
        ok = False
        print(f"CHECK FAILED: {msg}", file=sys.stderr)

    tok_hf = AutoTokenizer.from_pretrained(str(QWEN3_DIR))
    ids = list(tok_hf.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    m = AutoModelForCausalLM.from_pretrained(str(QWEN3_DIR), dtype=torch.float32).eval()
    if type(m).__name__ != "Qwen3ForCausalLM":
        fail(f"{QWEN3.name}: transformers built {type(m).__name__}")
    with torch.no_grad():
        gen, margins = greedy(m, ids, CHECK_NEW_TOKENS)
        seq = torch.tensor([ids + gen])
        lh = m(seq).logits[0]
        attn = m.model.layers[0].self_attn
        saved = [attn.q_norm.weight.clone(), attn.k_norm.weight.clone()]
        attn.q_norm.weight.fill_(1.0)
        attn.k_norm.weight.fill_(1.0)
        moved = (m(seq).logits[0] - lh).abs().max().item()
        attn.q_norm.weight.copy_(saved[0])
        attn.k_norm.weight.copy_(saved[1])
    print(f"{QWEN3.name}: layer 0 with unit q/k norms moves the logits by up to {moved:.3f}")
    if not moved > 0.01:
        fail(f"{QWEN3.name}: the q/k norms barely matter ({moved})")
    try:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        mm, _ = load_model(QWEN3_DIR)
        lm = np.array(mm(mx.array([ids + gen])).astype(mx.float32))[0]
        diff = float(np.abs(lm - lh.numpy()).max())
        print(f"{QWEN3.name}: mlx-lm ({type(mm).__module__}) logits vs transformers: max |diff| = {diff:.3e}")
        if not diff < MAX_LOGITS_DIFF:
            fail(f"{QWEN3.name}: mlx-lm and transformers logits differ by {diff}")
    except ImportError as e:
        print(f"{QWEN3.name}: mlx-lm not checked ({e})")
    # llama.cpp's qwen3 graph on the GGUF (an f32 KV cache), and transformers' GGUF loader: the
    # same logits as the HF directory, which proves the GGUF's names, norms and row order.
    seq = ids + gen
    lc = llamacpp_f32_logits(QWEN3_GGUF, seq)
    diff = float(np.abs(lc - lh.numpy()).max())
    print(f"{QWEN3.name}: llama.cpp(gguf F32) logits vs transformers(hf): max |diff| = {diff:.3e}")
    if not diff < MIXTRAL_LLAMACPP_DIFF:
        fail(f"{QWEN3.name}: llama.cpp and transformers logits differ by {diff}")
    # transformers' qwen3 GGUF mapping does not read qwen3.attention.key_length (its
    # Qwen3Config default head_dim is 128): the head width is given, as the transformers
    # reference gives it (references/transformers_ref.py, _gguf_config).
    from transformers import AutoConfig
    gcfg = AutoConfig.from_pretrained(str(OUT_DIR), gguf_file=QWEN3_GGUF.name)
    gcfg.head_dim = QWEN3.head_dim
    mg = AutoModelForCausalLM.from_pretrained(str(OUT_DIR), gguf_file=QWEN3_GGUF.name, config=gcfg,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        lg = mg(torch.tensor([seq])).logits[0]
    gdiff = float((lg - lh).abs().max())
    print(f"{QWEN3.name}: transformers(gguf) vs transformers(hf): max |diff| = {gdiff:.3e}")
    if not gdiff < MAX_LOGITS_DIFF:
        fail(f"{QWEN3.name}: transformers reads the GGUF as another model ({gdiff})")
    distinct = len(set(gen))
    print(f"{QWEN3.name}: greedy {CHECK_NEW_TOKENS}-token continuation: {gen}")
    print(f"  distinct tokens: {distinct}; margins min {min(margins):.4f}, median {float(np.median(margins)):.4f}")
    if distinct < MIN_DISTINCT:
        fail(f"{QWEN3.name}: only {distinct} distinct tokens in the greedy continuation")
    if min(margins) < MIN_MARGIN:
        fail(f"{QWEN3.name}: minimum greedy margin {min(margins):.4f} < {MIN_MARGIN}")
    return ok


def write_mixtral(tok) -> list[Path]:
    """The tiny Mixtral: its HF directory, its F32 GGUF and its MIXTRAL_QUANT GGUF."""
    weights = make_weights(MIXTRAL, tok.get_vocab_size())
    return write_hf_dir(tok, weights, MIXTRAL, MIXTRAL_DIR) + [
        write_gguf(MIXTRAL_GGUF, MIXTRAL, tok, weights),
        write_gguf(quant_path(MIXTRAL, MIXTRAL_QUANT), MIXTRAL, tok, weights, MIXTRAL_QUANT),
    ] + write_mixtral_adapter()


# The prompts the tiny Mixtral's golden cases and tests run (the router margin is measured on them).
MIXTRAL_PROMPTS = ["The capital of France is"]


def self_check_mixtral() -> bool:
    """transformers loads the HF directory as MixtralForCausalLM (its GGUF loader has no Mixtral
    mapping); llama.cpp loads both GGUFs. The F32 GGUF's logits in llama.cpp must equal
    transformers' (< MIXTRAL_LLAMACPP_DIFF: the same model, so the merged experts and the Q/K
    permutation are right), the Q8_0 file's must agree on top-1 and stay within
    MAX_Q8_0_LOGITS_DIFF with top-1 agreement >= 0.95; the greedy continuation is not degenerate, and the router's top-2
    choice is clear: the smallest margin (2nd minus 3rd router probability) over every layer and
    position of the chat prompt, its continuation and MIXTRAL_PROMPTS is at least MIN_ROUTER_MARGIN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ok = True
    name = MIXTRAL.name

    def fail(msg):
        nonlocal ok
        ok = False
        print(f"CHECK FAILED: {msg}", file=sys.stderr)

    tok_hf = AutoTokenizer.from_pretrained(str(MIXTRAL_DIR))
    ids = list(tok_hf.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    m_hf = AutoModelForCausalLM.from_pretrained(str(MIXTRAL_DIR), dtype=torch.float32).eval()
    if type(m_hf).__name__ != "MixtralForCausalLM":
        fail(f"{name}: transformers built {type(m_hf).__name__}")
    weights = make_weights(MIXTRAL, len(tok_hf))
    routers = [torch.from_numpy(weights[f"model.layers.{i}.block_sparse_moe.gate.weight"]) for i in range(MIXTRAL.num_layers)]
    norms: dict[int, torch.Tensor] = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda _m, _i, out, i=i: norms.__setitem__(i, out[0].detach())) for i, layer in enumerate(m_hf.model.layers)]

    def min_margin(seq: list[int]) -> float:
        with torch.no_grad():
            m_hf(torch.tensor([seq]))
        worst = 1.0
        for i, w in enumerate(routers):
            p = torch.softmax(norms[i] @ w.T, dim=-1)
            top = torch.sort(p, dim=-1, descending=True).values
            worst = min(worst, (top[:, MIXTRAL.top_k - 1] - top[:, MIXTRAL.top_k]).min().item())
        return worst

    with torch.no_grad():
        gen, margins = greedy(m_hf, ids, CHECK_NEW_TOKENS)
        seq = ids + gen
        lh = m_hf(torch.tensor([seq])).logits[0].numpy()
    router_margin = min_margin(seq)
    for text in MIXTRAL_PROMPTS:
        router_margin = min(router_margin, min_margin(tok_hf(text)["input_ids"]))
    # With the adapter merged (q_proj and the router of both layers): the router still clear.
    from safetensors.numpy import load_file
    ad = load_file(str(MIXTRAL_ADAPTER / "adapters.safetensors"))
    with torch.no_grad():
        lh_base = lh
        for i, layer in enumerate(m_hf.model.layers):
            for key, mod in (("self_attn.q_proj", layer.self_attn.q_proj), ("block_sparse_moe.gate", layer.mlp.gate)):
                a, b = ad[f"model.layers.{i}.{key}.lora_a"], ad[f"model.layers.{i}.{key}.lora_b"]
                mod.weight += torch.from_numpy(2.0 * (a @ b).T)
            routers[i] = layer.mlp.gate.weight.detach().clone()
        moved = float(np.abs(m_hf(torch.tensor([seq])).logits[0].numpy() - lh_base).max())
    lora_margin = min_margin(seq)
    print(f"{name}: with the tiny-mixtral-mlx adapter merged: logits move by up to {moved:.3f}; "
          f"smallest router margin {lora_margin:.4f}")
    if moved < 0.1 or lora_margin < MIN_ROUTER_MARGIN:
        fail(f"{name}: the adapter barely matters ({moved}) or brings a router near-tie ({lora_margin})")
    for h in hooks:
        h.remove()
    print(f"{name}: greedy {CHECK_NEW_TOKENS}-token continuation: {gen}")
    print(f"  distinct tokens: {len(set(gen))}; margins min {min(margins):.4f}; "
          f"smallest router margin (top-{MIXTRAL.top_k} vs next probability) {router_margin:.4f}")
    if len(set(gen)) < MIN_DISTINCT:
        fail(f"{name}: only {len(set(gen))} distinct tokens in the greedy continuation")
    if min(margins) < MIN_MARGIN:
        fail(f"{name}: minimum greedy margin {min(margins):.4f} < {MIN_MARGIN}")
    if router_margin < MIN_ROUTER_MARGIN:
        fail(f"{name}: smallest router margin {router_margin:.4f} < {MIN_ROUTER_MARGIN}")

    lf = llamacpp_f32_logits(MIXTRAL_GGUF, seq)
    diff = float(np.abs(lf - lh).max())
    print(f"{name} logits [{lh.shape}]: max |transformers(hf) - llama.cpp(gguf F32)| = {diff:.3e}")
    if not diff < MIXTRAL_LLAMACPP_DIFF:
        fail(f"{name}: transformers and llama.cpp logits differ by {diff}")
    qpath = quant_path(MIXTRAL, MIXTRAL_QUANT)
    lq = llamacpp_f32_logits(qpath, seq)
    qdiff = float(np.abs(lq - lf).max())
    agree = float(np.mean(lq.argmax(-1) == lf.argmax(-1)))
    print(f"{name} {MIXTRAL_QUANT}: max |logit - F32| = {qdiff:.3f}, top-1 agreement {agree:.2f}")
    # Measured 0.295 and 0.97 (2 of 64 positions, both greedy margins under 0.05, flip with Q8_0).
    if not (qdiff < MAX_Q8_0_LOGITS_DIFF and agree >= 0.95):
        fail(f"{name}: {MIXTRAL_QUANT} logits too far from F32 ({qdiff}, top-1 {agree})")
    return ok


# =============================================================================================
# the SentencePiece fixture (issue 17): tiny-spm/ and tiny-spm.gguf
# =============================================================================================

# A tiny Llama whose tokenizer is SentencePiece (Llama 2 / TinyLlama style): trained here by the
# sentencepiece package (BPE, byte fallback, digits split, a dummy-prefix space, whitespace kept
# as it is, no normalization: Llama 2's trainer settings) on a corpus of its own, so that " The"
# is one token (▁The) and rarer characters (é, CJK, emoji) fall back to <0xNN> byte tokens.
# Smaller than TINY (hidden 32, 2 layers, head_dim 8) to keep the files and their golden traces
# inside snapshots/'s size budget. Seed 21 (the first tried); the self-check asserts the margins.
SPM = ModelSpec("tiny-spm", hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, weight_seed=21)
SPM_DIR = OUT_DIR / "tiny-spm"
SPM_GGUF = OUT_DIR / "tiny-spm.gguf"
SPM_CORPUS_SEED = 20261202
SPM_CORPUS_LINES = 2000
SPM_THE_LINES = 600  # extra sentences starting with "The", so that ▁The is learned
SPM_VOCAB_SIZE = 512  # <unk> <s> </s>, 256 byte tokens, 253 learned pieces and characters
SPM_CHARACTER_COVERAGE = 0.995
# Llama 2's template (without its system-prompt branch): BOS before every user turn.
SPM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
SPM_CHECK_TEXTS = CHECK_TEXTS + [
    "The", " The capital", "  two spaces", "a<s>b</s> c", "emoji 🦀 and é and 日本語", "", " ", "\n\nx",
]


def make_spm_corpus() -> list[str]:
    rng = random.Random(SPM_CORPUS_SEED)
    lines = make_corpus(SPM_CORPUS_SEED, SPM_CORPUS_LINES)
    lines += ["The " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "." for _ in range(SPM_THE_LINES)]
    return lines


def train_spm() -> bytes:
    """The serialized SentencePiece model (tokenizer.model); deterministic (one thread, no
    sampling of the input)."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_spm_corpus()), model_writer=out, model_type="bpe", vocab_size=SPM_VOCAB_SIZE,
        character_coverage=SPM_CHARACTER_COVERAGE, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, shuffle_input_sentence=False,
        input_sentence_size=0, max_sentence_length=100000,
    )
    proto = out.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == SPM_VOCAB_SIZE, sp.get_piece_size()
    assert sp.encode(" The", out_type=str)[-1] == "\u2581The", sp.encode(" The", out_type=str)
    return proto


def spm_tokenizer_json(model_path: Path) -> dict:
    """tokenizer.json for the SentencePiece model, as transformers converts tokenizer.model (its
    LlamaConverter: BPE with byte fallback, merges from the vocabulary), with the legacy Llama 2 /
    TinyLlama normalizer Prepend("▁") + Replace(" ", "▁") and no pre-tokenizer (transformers 5
    writes a Metaspace pre-tokenizer instead, which adds no ▁ in front of a text that starts with
    a space; llama.cpp and sentencepiece do)."""
    import shutil

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="lockstep-spm-") as tmp:
        shutil.copy(model_path, Path(tmp) / "tokenizer.model")
        write_json(Path(tmp) / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "legacy": True,
                                                              "add_bos_token": True, "add_eos_token": False})
        tok = AutoTokenizer.from_pretrained(tmp)
        tok.save_pretrained(Path(tmp) / "out")
        tj = json.loads((Path(tmp) / "out" / "tokenizer.json").read_text(encoding="utf-8"))
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    return tj


def write_spm(proto: bytes) -> list[Path]:
    """The tiny SentencePiece Llama: its HF directory (tokenizer.model, tokenizer.json, f32
    safetensors) and its F32 GGUF with tokenizer.ggml.model = llama (tokens, scores, token
    types as convert_hf_to_gguf.py's _set_vocab_sentencepiece writes them, add_bos_token true,
    no add_space_prefix key: llama.cpp's default, true, as in the TinyLlama GGUFs)."""
    import gguf
    import sentencepiece as spm
    import torch
    from safetensors.torch import save_file

    SPM_DIR.mkdir(parents=True, exist_ok=True)
    model_path = SPM_DIR / "tokenizer.model"
    model_path.write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()
    bos, eos, unk = sp.bos_id(), sp.eos_id(), sp.unk_id()
    weights = make_weights(SPM, n)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": bos, "eos_token_id": eos, "head_dim": SPM.head_dim,
        "hidden_act": "silu", "hidden_size": SPM.hidden_size, "initializer_range": 0.02,
        "intermediate_size": SPM.intermediate_size, "max_position_embeddings": MAX_POSITIONS, "mlp_bias": False,
        "num_attention_heads": SPM.num_heads, "num_hidden_layers": SPM.num_layers,
        "num_key_value_heads": SPM.num_kv_heads, "pretraining_tp": 1, "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": n,
    }
    # PreTrainedTokenizerFast: transformers uses tokenizer.json as it is. With "LlamaTokenizer"
    # transformers 5 swaps in its own Metaspace pre-tokenizer (docs/traps.md).
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "legacy": True, "model_max_length": MODEL_MAX_LENGTH, "chat_template": SPM_CHAT_TEMPLATE,
    }
    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    generation_config = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    paths = [model_path]
    for name, obj in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                      ("special_tokens_map.json", special_tokens_map), ("generation_config.json", generation_config),
                      ("tokenizer.json", spm_tokenizer_json(model_path))]:
        write_json(SPM_DIR / name, obj)
        paths.append(SPM_DIR / name)
    save_file({k: torch.from_numpy(v).contiguous() for k, v in weights.items()}, str(SPM_DIR / "model.safetensors"),
              metadata={"format": "pt"})
    paths.append(SPM_DIR / "model.safetensors")

    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                     else gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(str(SPM_GGUF), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(SPM.name)
    w.add_vocab_size(n)
    w.add_context_length(MAX_POSITIONS)
    w.add_embedding_length(SPM.hidden_size)
    w.add_block_count(SPM.num_layers)
    w.add_feed_forward_length(SPM.intermediate_size)
    w.add_rope_dimension_count(SPM.head_dim)
    w.add_head_count(SPM.num_heads)
    w.add_head_count_kv(SPM.num_kv_heads)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_NORM_EPS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # tokenizer.*, as _set_vocab_sentencepiece + SpecialVocab write them
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(SPM_CHAT_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, t in gguf_tensors(SPM, weights):
        w.add_tensor(name, t, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return paths + [SPM_GGUF]


def self_check_spm() -> bool:
    """The SentencePiece fixture: sentencepiece itself, the HF directory's tokenizer, llama.cpp's
    tokenizer of the GGUF (and transformers' GGUF tokenizer, which may differ on text that starts
    with a space: printed, not failed) agree on the check texts; the BOS-only prompt is [1]; the
    HF directory and the GGUF give the same logits; the greedy continuation is not degenerate."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ok = True

    def fail(msg):
        nonlocal ok
        ok = False
        print(f"CHECK FAILED: {msg}", file=sys.stderr)

    sp = spm.SentencePieceProcessor(model_file=str(SPM_DIR / "tokenizer.model"))
    tok_hf = AutoTokenizer.from_pretrained(str(SPM_DIR))
    tok_gg = AutoTokenizer.from_pretrained(str(OUT_DIR), gguf_file=SPM_GGUF.name)
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(SPM_GGUF), vocab_only=True, verbose=False)
    for text in SPM_CHECK_TEXTS:
        hf = tok_hf(text, add_special_tokens=False)["input_ids"]
        lc = [int(x) for x in llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)]
        if hf != lc:
            fail(f"{SPM.name}: HF tokenizer.json and llama.cpp differ on {text!r}:\n  hf       {hf}\n  llamacpp {lc}")
        if "<" not in text and sp.encode(text) != hf:
            fail(f"{SPM.name}: sentencepiece and the HF tokenizer differ on {text!r}:\n  spm {sp.encode(text)}\n  hf  {hf}")
        gg = tok_gg(text, add_special_tokens=False)["input_ids"]
        if gg != hf:
            print(f"{SPM.name}: transformers' GGUF tokenizer differs on {text!r} (Metaspace prepend): {gg} vs {hf}")
    the = tok_hf(" The", add_special_tokens=False)["input_ids"]
    print(f"{SPM.name}: ' The' -> {the} {tok_hf.convert_ids_to_tokens(the)}; BOS-only prompt {tok_hf('')['input_ids']}")
    if tok_hf("")["input_ids"] != [sp.bos_id()] or [int(x) for x in llm.tokenize(b"", add_bos=True)] != [sp.bos_id()]:
        fail(f"{SPM.name}: the empty prompt is not [BOS]")
    ids = list(tok_hf.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    lc = [int(x) for x in llm.tokenize(tok_hf.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=False).encode(), add_bos=False, special=True)]
    print(f"{SPM.name} chat prompt: {len(ids)} tokens: {ids}")
    if ids != lc:
        fail(f"{SPM.name}: chat prompt ids differ:\n  hf       {ids}\n  llamacpp {lc}")
    m_hf = AutoModelForCausalLM.from_pretrained(str(SPM_DIR), dtype=torch.float32).eval()
    m_gg = AutoModelForCausalLM.from_pretrained(str(OUT_DIR), gguf_file=SPM_GGUF.name, dtype=torch.float32).eval()
    with torch.no_grad():
        for label, prompt in [("chat", ids), ("BOS only", [sp.bos_id()])]:
            gen, margins = greedy(m_hf, prompt, CHECK_NEW_TOKENS)
            seq = torch.tensor([prompt + gen])
            diff = (m_hf(seq).logits[0] - m_gg(seq).logits[0]).abs().max().item()
            print(f"{SPM.name} {label}: max |hf - gguf| logits {diff:.3e}; greedy {gen}")
            print(f"  text: {tok_hf.decode(gen)!r}; distinct {len(set(gen))}; margins min {min(margins):.4f}")
            if not diff < MAX_LOGITS_DIFF:
                fail(f"{SPM.name} {label}: hf and gguf logits differ by {diff}")
            if len(set(gen)) < MIN_DISTINCT:
                fail(f"{SPM.name} {label}: only {len(set(gen))} distinct tokens in the greedy continuation")
            if min(margins) < MIN_MARGIN:
                fail(f"{SPM.name} {label}: minimum greedy margin {min(margins):.4f} < {MIN_MARGIN}")
    return ok



# The tiny Gemma 3 (tiny-gemma3/, tiny-gemma3.gguf, tiny-gemma3.Q8_0.gguf): Gemma3ForCausalLM's
# architecture (issue 38) at a size that keeps the three files near 1 MB: 6 layers, the sixth
# global and the others local (Gemma 3's pattern, which llama.cpp assumes for every gemma3 file),
# a window of GEMMA3_WINDOW, the local and global RoPE bases apart, query_pre_attn_scalar !=
# head_dim, a tied head; hidden 64, whose square root (the embedding scale) every dtype holds
# exactly (mlx-lm rounds it to bfloat16). The tokenizer is tiny-llama's (linked).
# A GGUF file holds neither query_pre_attn_scalar nor final_logit_softcapping, and llama.cpp reads
# a gemma3 file with 1/sqrt(head_dim) and no soft-cap: tiny-gemma3.gguf is that model (the
# engine reads it as llama.cpp does), checked against transformers on the HF weights with those two
# settings (self_check_gemma3).
GEMMA3 = ModelSpec("tiny-gemma3", hidden_size=64, intermediate_size=32, num_layers=6,
                   num_heads=2, num_kv_heads=1, head_dim=16, weight_seed=41, arch="gemma3")
GEMMA3_DIR = OUT_DIR / "tiny-gemma3"
GEMMA3_GGUF = OUT_DIR / "tiny-gemma3.gguf"
GEMMA3_QUANT = "Q8_0"
GEMMA3_WINDOW = 8
GEMMA3_ROPE_GLOBAL = 1_000_000.0
GEMMA3_ROPE_LOCAL = 10_000.0
GEMMA3_QPAS = 24  # query_pre_attn_scalar, head_dim 16
# tiny-gemma3-softcap/: the same model with a final logit soft-cap (config.json only, the other files
# linked). mlx-lm's gemma3_text computes no soft-cap, so the soft-cap is a variant of its own.
GEMMA3_SOFTCAP = 10.0
GEMMA3_SOFTCAP_DIR = OUT_DIR / "tiny-gemma3-softcap"
GEMMA3_RMS_NORM_EPS = 1e-6
# Norm weights are Gemma's offsets from one: the norm multiplies by 1 + w.
GEMMA3_NORM_STD = 0.1
# A random model with a tied head repeats its last input token (the token's own embedding decides
# the logits): small embeddings and large post-norm (1 + 8) and final-norm (1 + 6) multipliers let
# the layers decide. Seeds 38-47 searched at these settings; 41 gives 10 distinct greedy tokens of
# 20 and a minimum margin of 0.10 on the check prompt.
GEMMA3_EMBED_STD = 0.1
GEMMA3_POST_NORM = 8.0
GEMMA3_FINAL_NORM = 6.0


def gemma3_weights(spec: ModelSpec, vocab_size: int) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of a Gemma3ForCausalLM (tied head: no lm_head.weight)."""
    rng = np.random.Generator(np.random.PCG64(spec.weight_seed))
    h, f, hd, nh, nkv = spec.hidden_size, spec.intermediate_size, spec.head_dim, spec.num_heads, spec.num_kv_heads

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"model.embed_tokens.weight": normal((vocab_size, h), GEMMA3_EMBED_STD)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = normal((h,), GEMMA3_NORM_STD)
        w[p + "self_attn.q_proj.weight"] = normal((nh * hd, h), h**-0.5)
        w[p + "self_attn.k_proj.weight"] = normal((nkv * hd, h), h**-0.5)
        w[p + "self_attn.v_proj.weight"] = normal((nkv * hd, h), h**-0.5)
        w[p + "self_attn.o_proj.weight"] = normal((h, nh * hd), (nh * hd) ** -0.5)
        w[p + "self_attn.q_norm.weight"] = normal((hd,), GEMMA3_NORM_STD)
        w[p + "self_attn.k_norm.weight"] = normal((hd,), GEMMA3_NORM_STD)
        w[p + "post_attention_layernorm.weight"] = GEMMA3_POST_NORM + normal((h,), GEMMA3_NORM_STD)
        w[p + "pre_feedforward_layernorm.weight"] = normal((h,), GEMMA3_NORM_STD)
        w[p + "mlp.gate_proj.weight"] = normal((f, h), h**-0.5)
        w[p + "mlp.up_proj.weight"] = normal((f, h), h**-0.5)
        w[p + "mlp.down_proj.weight"] = normal((h, f), f**-0.5)
        w[p + "post_feedforward_layernorm.weight"] = GEMMA3_POST_NORM + normal((h,), GEMMA3_NORM_STD)
    w["model.norm.weight"] = GEMMA3_FINAL_NORM + normal((h,), GEMMA3_NORM_STD)
    return w


def gemma3_config(spec: ModelSpec, vocab_size: int, bos: int, eos: int, pad: int, **changes) -> dict:
    """The config.json of Gemma 3 270M's form (transformers 5's keys), at the tiny sizes."""
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(spec.num_layers)]
    cfg = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "final_logit_softcapping": None,
        "head_dim": spec.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "layer_types": types,
        "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "query_pre_attn_scalar": GEMMA3_QPAS,
        "rms_norm_eps": GEMMA3_RMS_NORM_EPS,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": GEMMA3_ROPE_GLOBAL},
            "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_ROPE_LOCAL},
        },
        "sliding_window": GEMMA3_WINDOW,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_bidirectional_attention": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    cfg.update(changes)
    return cfg


# HF name (after model.layers.N.) -> GGUF name (after blk.N.), in convert_hf_to_gguf.py's order.
GEMMA3_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def write_gemma3_gguf(path: Path, spec: ModelSpec, tok, weights: dict[str, np.ndarray], qtype: str = "F32") -> Path:
    """The tiny Gemma 3 as convert_hf_to_gguf.py's Gemma3Model writes it: norm weights + 1 (every
    `*norm.weight`), Q/K rows unpermuted, no output.weight (tied), gemma3.* metadata (no
    query_pre_attn_scalar, no soft-cap); quantized as write_gguf quantizes (`--pure`)."""
    import gguf

    quantized = qtype != "F32"
    qt = gguf.GGMLQuantizationType[qtype]
    vocab = tok.get_vocab(with_added_tokens=True)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(spec.name)
    w.add_context_length(MAX_POSITIONS)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_layer_norm_rms_eps(GEMMA3_RMS_NORM_EPS)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_freq_base(GEMMA3_ROPE_GLOBAL)
    w.add_sliding_window(GEMMA3_WINDOW)
    w.add_head_count_kv(spec.num_kv_heads)
    file_type = gguf.LlamaFileType[f"MOSTLY_{qtype}"] if quantized else gguf.LlamaFileType.ALL_F32
    if not quantized:
        w.add_file_type(file_type)
    add_bpe_tokenizer(w, tok, vocab[BOS_TOKEN], CHAT_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if quantized:
        w.add_file_type(file_type)

    def norm(x):
        return np.ascontiguousarray(x + 1.0, dtype=np.float32)

    tensors = [("token_embd.weight", weights["model.embed_tokens.weight"])]
    for i in range(spec.num_layers):
        for hf, gg in GEMMA3_HF_TO_GGUF.items():
            t = weights[f"model.layers.{i}.{hf}"]
            tensors.append((f"blk.{i}.{gg}", norm(t) if hf.endswith("norm.weight") else np.ascontiguousarray(t, dtype=np.float32)))
    tensors.append(("output_norm.weight", norm(weights["model.norm.weight"])))
    for name, t in llama_quantize_order(tensors) if quantized else tensors:
        if quantized and t.ndim >= 2:
            w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, t, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gemma3(tok) -> list[Path]:
    """The tiny Gemma 3: its HF directory (tiny-llama's tokenizer files linked), the F32 GGUF and
    its Q8_0 quantization."""
    import torch
    from safetensors.torch import save_file

    vocab = tok.get_vocab(with_added_tokens=True)
    weights = gemma3_weights(GEMMA3, len(vocab))
    link_model_files(HF_DIR, GEMMA3_DIR, Path("..") / HF_DIR.name)
    (GEMMA3_DIR / "model.safetensors").unlink()
    write_json(GEMMA3_DIR / "config.json", gemma3_config(GEMMA3, len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[PAD_TOKEN]))
    tensors = {k: torch.from_numpy(v).contiguous() for k, v in weights.items()}
    save_file(tensors, str(GEMMA3_DIR / "model.safetensors"), metadata={"format": "pt"})
    link_model_files(GEMMA3_DIR, GEMMA3_SOFTCAP_DIR, Path("..") / GEMMA3_DIR.name)
    capped = gemma3_config(GEMMA3, len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[PAD_TOKEN], final_logit_softcapping=GEMMA3_SOFTCAP)
    write_json(GEMMA3_SOFTCAP_DIR / "config.json", capped)
    return [GEMMA3_DIR / "config.json", GEMMA3_DIR / "model.safetensors", GEMMA3_SOFTCAP_DIR / "config.json",
            write_gemma3_gguf(GEMMA3_GGUF, GEMMA3, tok, weights),
            write_gemma3_gguf(quant_path(GEMMA3, GEMMA3_QUANT), GEMMA3, tok, weights, GEMMA3_QUANT)]


# transformers (HF directory, read with llama.cpp's settings) vs llama.cpp (F32 GGUF), max abs logit
# difference: float32 noise of two implementations plus llama.cpp's GELU (an f16 table).
GEMMA3_LLAMACPP_DIFF = 1e-2


def self_check_gemma3() -> bool:
    """transformers loads the tiny Gemma 3 as Gemma3ForCausalLM with local and global layers; the
    window acts from position GEMMA3_WINDOW on; the greedy continuation has no near tie; mlx-lm
    gives transformers' logits; llama.cpp on the F32 GGUF gives the logits of transformers on the
    HF weights read as llama.cpp reads a gemma3 file (scale 1/sqrt(head_dim), no soft-cap)."""
    import tempfile as _tf
    import torch
    from transformers import AutoModelForCausalLM

    ok = True

    def fail(msg):
        nonlocal ok
        ok = False
        print(f"CHECK FAILED: tiny-gemma3: {msg}", file=sys.stderr)

    seq = [1] + [(7 * i) % 500 + 3 for i in range(3 * GEMMA3_WINDOW)]
    cfg = json.loads((GEMMA3_DIR / "config.json").read_text())

    def variant_logits(**changes) -> np.ndarray:
        with _tf.TemporaryDirectory() as d:
            link_model_files(GEMMA3_DIR, Path(d), GEMMA3_DIR.resolve())
            write_json(Path(d) / "config.json", {**cfg, **changes})
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            with torch.no_grad():
                return m(torch.tensor([seq])).logits[0].numpy()

    m = AutoModelForCausalLM.from_pretrained(str(GEMMA3_DIR), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = m(torch.tensor([seq])).logits[0].numpy()
    print(f"tiny-gemma3: {type(m).__name__}, layer types {m.config.layer_types}, window {m.config.sliding_window}")
    wide = variant_logits(sliding_window=4096)
    d = np.abs(ref - wide).max(axis=1)
    first = int(np.nonzero(d > 1e-4)[0][0]) if (d > 1e-4).any() else None
    print(f"tiny-gemma3: logits leave the unwindowed model's at position {first}")
    if first != GEMMA3_WINDOW:
        fail(f"the window acts from position {first}, not {GEMMA3_WINDOW}")
    gen, margins = greedy(m, seq[: 2 * GEMMA3_WINDOW], CHECK_NEW_TOKENS)
    print(f"tiny-gemma3: greedy {gen}, min margin {min(margins):.4f}")
    if min(margins) < WINDOW_MIN_MARGIN or len(set(gen)) < MIN_DISTINCT:
        fail(f"greedy continuation degenerate or near a tie (min margin {min(margins):.4f}, {len(set(gen))} distinct)")
    try:
        from mlx_lm import load as mlx_load
        import mlx.core as mx
        mm, _ = mlx_load(str(GEMMA3_DIR))
        ml = np.array(mm(mx.array([seq]))[0].astype(mx.float32))
        diff = float(np.abs(ml - ref).max())
        print(f"tiny-gemma3: mlx-lm vs transformers max |logit diff| {diff:.2e}")
        if diff > GEMMA3_LLAMACPP_DIFF:
            fail(f"mlx-lm differs from transformers by {diff:.2e}")
    except ImportError as e:
        print(f"tiny-gemma3: mlx-lm not checked ({e})")
    capped = variant_logits(final_logit_softcapping=GEMMA3_SOFTCAP)
    moved = float(np.abs(capped - ref).max())
    print(f"tiny-gemma3-softcap: the soft-cap moves the logits by up to {moved:.2f}, every |logit| < {GEMMA3_SOFTCAP}: "
          f"{bool(np.abs(capped).max() < GEMMA3_SOFTCAP)}")
    if moved < 0.1:
        fail(f"the soft-cap moves the logits by {moved:.2e} only")
    as_llamacpp = variant_logits(query_pre_attn_scalar=GEMMA3.head_dim)
    lc = llamacpp_f32_logits(GEMMA3_GGUF, seq)
    diff = float(np.abs(lc - as_llamacpp).max())
    print(f"tiny-gemma3: llama.cpp (F32 GGUF) vs transformers read as llama.cpp reads it, max |logit diff| {diff:.2e}; "
          f"vs the HF model itself {float(np.abs(lc - ref).max()):.2e}")
    if diff > GEMMA3_LLAMACPP_DIFF:
        fail(f"llama.cpp differs from transformers by {diff:.2e}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-check", action="store_true", help="write the files, skip the transformers self-check")
    ap.add_argument("--adapters-only", action="store_true", help="write only the LoRA adapters")
    ap.add_argument("--qwen2-only", action="store_true", help="write (and check) only the tiny Qwen2")
    ap.add_argument("--mixtral-only", action="store_true", help="write (and check) only the tiny Mixtral")
    ap.add_argument("--qwen3-only", action="store_true", help="write (and check) only the tiny Qwen3")
    ap.add_argument("--rope-only", action="store_true", help="write (and check) only the tiny Llama's RoPE-scaling variants")
    ap.add_argument("--spm-only", action="store_true", help="write (and check) only the tiny SentencePiece Llama")
    ap.add_argument("--windows-only", action="store_true", help="write (and check) only the sliding-window variants")
    ap.add_argument("--gemma3-only", action="store_true", help="write (and check) only the tiny Gemma 3")
    args = ap.parse_args()
    if args.adapters_only:
        for p in write_adapters():
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        return 0
    # No progress bar from transformers' GGUF loader in the self-check; tqdm reads this when
    # it is first imported (by torch, in write_hf_dir).
    os.environ.setdefault("TQDM_DISABLE", "1")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if args.spm_only:
        for p in write_spm(train_spm()):
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        return 0 if args.no_check or self_check_spm() else 1
    tok = train_tokenizer()
    if args.qwen2_only:
        for p in write_qwen2(tok):
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        return 0 if args.no_check or self_check_qwen2() else 1
    if args.qwen3_only:
        for p in write_qwen3(tok):
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        return 0 if args.no_check or self_check_qwen3() else 1
    if args.windows_only:
        for p in write_window_variants():
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        return 0 if args.no_check or self_check_windows() else 1
    if args.gemma3_only:
        for p in write_gemma3(tok):
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        return 0 if args.no_check or self_check_gemma3() else 1
    if args.rope_only:
        for p in write_rope_variants(tok):
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        return 0 if args.no_check or self_check_rope() else 1
    if args.mixtral_only:
        for p in write_mixtral(tok):
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        return 0 if args.no_check or self_check_mixtral() else 1
    vocab_size = tok.get_vocab_size()
    weights = make_weights(TINY, vocab_size)
    paths = write_hf_dir(tok, weights) + [write_gguf(GGUF_PATH, TINY, tok, weights)]
    paths += [write_gguf(quant_path(TINY, q), TINY, tok, weights, q) for q in GGUF_QUANTS]
    paths += write_qwen2(tok)
    paths += write_mixtral(tok)
    paths += write_qwen3(tok)
    paths += write_rope_variants(tok)
    paths += write_window_variants()
    paths += write_gemma3(tok)
    paths += write_spm(train_spm())
    paths += write_adapters()
    with tempfile.TemporaryDirectory(prefix="lockstep-fixtures-") as tmp:
        k_f32 = write_gguf(Path(tmp) / f"{TINY_K.name}.gguf", TINY_K, tok, make_weights(TINY_K, vocab_size))
        paths += [llama_quantize(k_f32, quant_path(TINY_K, q), ftype) for q, (ftype, _) in K_QUANTS.items()]
        for p in paths:
            print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
        print(f"vocab size {vocab_size}; specials " + ", ".join(f"{s}={tok.token_to_id(s)}" for s in SPECIAL_TOKENS))

        expected = {GGUF_PATH: {"F32"}, k_f32: {"F32"}, QWEN2_GGUF: {"F32"}, MIXTRAL_GGUF: {"F32"}}
        expected.update({quant_path(TINY, q): {q} for q in GGUF_QUANTS})
        expected.update({quant_path(TINY_K, q): types for q, (_, types) in K_QUANTS.items()})
        print("tensor types:")
        for path, types in expected.items():
            counts = check_tensor_types(path, types)
            where = "(temporary) " if path == k_f32 else ""
            print(f"  {where}{path.name}: " + ", ".join(f"{n} {c}" for n, c in sorted(counts.items())))

        if args.no_check:
            return 0
        if not self_check(k_f32) or not self_check_qwen2() or not self_check_mixtral() or not self_check_qwen3() or not self_check_rope() or not self_check_windows() or not self_check_gemma3() or not self_check_spm():
            print("self-check FAILED", file=sys.stderr)
            return 1
    print("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
