#!/usr/bin/env python
"""Generate lockstep's tiny fixture model, in Hugging Face and in GGUF form.

What it makes (under snapshots/models/):

  tiny-llama/            a Hugging Face Llama directory: config.json, model.safetensors (f32),
                         tokenizer.json, tokenizer_config.json (with a ChatML chat template),
                         special_tokens_map.json, generation_config.json
  tiny-llama.gguf        the same model and tokenizer as llama.cpp's convert_hf_to_gguf.py would
                         write them: all tensors F32, Q/K rows permuted to GGUF's RoPE layout

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

At the end it checks itself and exits non-zero if anything is off: transformers loads the
HF directory and the GGUF, both tokenizers must give the same ids on a chat prompt and on
awkward text, and both models must give the same logits (max abs difference < 1e-4).

Run with the reference environment's Python:
    /root/.cache/lockstep/venv/bin/python scripts/make_fixtures.py [--no-check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "snapshots" / "models"
HF_DIR = OUT_DIR / "tiny-llama"
GGUF_NAME = "tiny-llama.gguf"
GGUF_PATH = OUT_DIR / GGUF_NAME
MODEL_NAME = "tiny-llama"

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

# --- model -----------------------------------------------------------------------------------
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 160
NUM_LAYERS = 3
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
MAX_POSITIONS = 256

WEIGHT_SEED = 7
# Standard deviations. Projections get 1/sqrt(fan_in) so activations keep unit scale; the LM
# head gets LOGIT_SCALE/sqrt(hidden), so the logits have a std of about LOGIT_SCALE, which
# gives top-1/top-2 margins of tenths of a nat rather than millionths.
EMBED_STD = 1.0
LOGIT_SCALE = 4.0
NORM_NOISE = 0.1  # norm weights are 1 + NORM_NOISE * N(0, 1)

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


def make_weights(vocab_size: int) -> dict[str, np.ndarray]:
    """HF-named float32 tensors, drawn in a fixed order from one seeded generator."""
    rng = np.random.Generator(np.random.PCG64(WEIGHT_SEED))

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():
        return (1.0 + NORM_NOISE * rng.standard_normal(HIDDEN_SIZE)).astype(np.float32)

    h, f, hd = HIDDEN_SIZE, INTERMEDIATE_SIZE, HEAD_DIM
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((vocab_size, h), EMBED_STD)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "self_attn.q_proj.weight"] = normal((NUM_HEADS * hd, h), h**-0.5)
        w[p + "self_attn.k_proj.weight"] = normal((NUM_KV_HEADS * hd, h), h**-0.5)
        w[p + "self_attn.v_proj.weight"] = normal((NUM_KV_HEADS * hd, h), h**-0.5)
        w[p + "self_attn.o_proj.weight"] = normal((h, NUM_HEADS * hd), (NUM_HEADS * hd) ** -0.5)
        w[p + "post_attention_layernorm.weight"] = norm_weight()
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


def write_hf_dir(tok, weights: dict[str, np.ndarray]) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    HF_DIR.mkdir(parents=True, exist_ok=True)
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
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": False,
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
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
    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": SPECIAL_TOKENS,
    }
    generation_config = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}

    paths = []
    for name, obj in [
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_tokens_map),
        ("generation_config.json", generation_config),
    ]:
        write_json(HF_DIR / name, obj)
        paths.append(HF_DIR / name)

    (HF_DIR / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    paths.append(HF_DIR / "tokenizer.json")

    tensors = {k: torch.from_numpy(v).contiguous() for k, v in weights.items()}
    save_file(tensors, str(HF_DIR / "model.safetensors"), metadata={"format": "pt"})
    paths.append(HF_DIR / "model.safetensors")
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


def gguf_tensors(weights: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    out = [("token_embd.weight", weights["model.embed_tokens.weight"])]
    for i in range(NUM_LAYERS):
        for hf, gg in HF_TO_GGUF_LAYER.items():
            w = weights[f"model.layers.{i}.{hf}"]
            if gg == "attn_q.weight":
                w = permute(w, NUM_HEADS, NUM_HEADS)
            elif gg == "attn_k.weight":
                w = permute(w, NUM_HEADS, NUM_KV_HEADS)
            out.append((f"blk.{i}.{gg}", np.ascontiguousarray(w, dtype=np.float32)))
    out.append(("output_norm.weight", weights["model.norm.weight"]))
    out.append(("output.weight", weights["lm_head.weight"]))
    return out


def write_gguf(tok, weights: dict[str, np.ndarray]) -> Path:
    import gguf

    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens)
    special = set(SPECIAL_TOKENS)
    token_types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    w = gguf.GGUFWriter(str(GGUF_PATH), "llama")
    # general.*  (general.architecture is added by the constructor)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(MODEL_NAME)
    # llama.*, as LlamaModel.set_gguf_parameters writes them
    w.add_vocab_size(len(tokens))
    w.add_context_length(MAX_POSITIONS)
    w.add_embedding_length(HIDDEN_SIZE)
    w.add_block_count(NUM_LAYERS)
    w.add_feed_forward_length(INTERMEDIATE_SIZE)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_head_count(NUM_HEADS)
    w.add_head_count_kv(NUM_KV_HEADS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_NORM_EPS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # tokenizer.*, as _set_vocab_gpt2 + SpecialVocab write them. "gpt-2" is llama.cpp's name for
    # the plain GPT-2 split regex, the one tokenizers' ByteLevel(use_regex=True) uses.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[BOS_TOKEN])
    w.add_eos_token_id(vocab[EOS_TOKEN])
    w.add_pad_token_id(vocab[PAD_TOKEN])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, t in gguf_tensors(weights):
        w.add_tensor(name, t, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUF_PATH


# =============================================================================================
# self-check
# =============================================================================================


def self_check() -> bool:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    ok = True

    def fail(msg):
        nonlocal ok
        ok = False
        print(f"CHECK FAILED: {msg}", file=sys.stderr)

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
    m_gg = AutoModelForCausalLM.from_pretrained(str(OUT_DIR), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
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

    with torch.no_grad():
        x = torch.tensor([ids_hf])
        lh = m_hf(x).logits[0]
        lg = m_gg(x).logits[0]
        diff = (lh - lg).abs().max().item()
        print(f"prefill logits [{tuple(lh.shape)}]: max |hf - gguf| = {diff:.3e}")
        if not diff < MAX_LOGITS_DIFF:
            fail(f"logits differ by {diff}")

        # Greedy continuation with the HF model (full re-forward each step: simple, no cache).
        seq = list(ids_hf)
        margins, gen = [], []
        for _ in range(CHECK_NEW_TOKENS):
            lp = torch.log_softmax(m_hf(torch.tensor([seq])).logits[0, -1], dim=-1)
            top = torch.topk(lp, 2)
            margins.append((top.values[0] - top.values[1]).item())
            nxt = int(top.indices[0])
            gen.append(nxt)
            seq.append(nxt)
        lg_all = m_gg(torch.tensor([seq])).logits[0]
        lh_all = m_hf(torch.tensor([seq])).logits[0]
        diff_all = (lh_all - lg_all).abs().max().item()
        print(f"full-sequence logits [{tuple(lh_all.shape)}]: max |hf - gguf| = {diff_all:.3e}")
        if not diff_all < MAX_LOGITS_DIFF:
            fail(f"logits over the continuation differ by {diff_all}")

    distinct = len(set(gen))
    print(f"greedy {CHECK_NEW_TOKENS}-token continuation: {gen}")
    print(f"  text: {tok_hf.decode(gen)!r}")
    print(f"  distinct tokens: {distinct}")
    print(f"  top1-top2 log-prob margins: min {min(margins):.4f}, median {float(np.median(margins)):.4f}")
    print(f"  margins: {[round(m, 3) for m in margins]}")
    if distinct < MIN_DISTINCT:
        fail(f"only {distinct} distinct tokens in the greedy continuation")
    if min(margins) < MIN_MARGIN:
        fail(f"minimum greedy margin {min(margins):.4f} < {MIN_MARGIN}")
    return ok


# =============================================================================================


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-check", action="store_true", help="write the files, skip the transformers self-check")
    args = ap.parse_args()

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    weights = make_weights(tok.get_vocab_size())
    paths = write_hf_dir(tok, weights) + [write_gguf(tok, weights)]
    for p in paths:
        print(f"{sha256(p)}  {p.relative_to(REPO)}  ({p.stat().st_size} bytes)")
    print(f"vocab size {tok.get_vocab_size()}; specials " + ", ".join(f"{s}={tok.token_to_id(s)}" for s in SPECIAL_TOKENS))

    if args.no_check:
        return 0
    if not self_check():
        print("self-check FAILED", file=sys.stderr)
        return 1
    print("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
