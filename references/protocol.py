"""The reference protocol: what every Python reference of lockstep implements.

The harness (Rust, embedding CPython through pyo3) creates one object per reference with
``load(model_path, **options)`` from the reference's module and then only calls the
methods below. Every tensor crosses to Rust as a C-contiguous float32 numpy array
(float64 from a reference loaded with dtype="float64"; zero-copy where the framework
allows), in the Hugging Face layout of DESIGN.md:

    embed, layers.{i}.attn_norm/attn_out/mlp_norm/mlp_out/out, final_norm  (seq, hidden)
    layers.{i}.q/k/v          (seq, heads*head_dim)   projections before RoPE
    layers.{i}.q_rope/k_rope  (heads, seq, head_dim)  after RoPE
    layers.{i}.attn           (seq, heads*head_dim)   heads merged, before o_proj
    layers.{i}.mlp_gate/mlp_up/mlp_act                (seq, intermediate)
    layers.{i}.cache_k/cache_v (kv_heads, cached_len, head_dim)  whole cache after the step
    logits                    (seq, vocab)            every position fed in the step

A reference that cannot provide a site leaves it out of ``describe()["sites"]``; the
report lists it as not compared.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Reference(Protocol):
    def describe(self) -> dict:
        """{"name", "versions": {package: version}, "model", "dtype", "sites": [..],
        "layer_sites": [..], "num_layers", "notes": [..]}"""

    def reset(self) -> None:
        """Forget the sequence: a new, empty cache."""

    def step(self, token_ids: list[int]) -> dict[str, np.ndarray]:
        """Feed ``token_ids`` after everything fed since ``reset()`` (the reference keeps
        its own cache) and return {site: array} for this step."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain prompt, as the reference's tokenizer makes them."""

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat with the generation prompt, as its chat template makes them."""

    def generate_greedy(self, token_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """The reference's own greedy generation loop (not the lockstep one)."""


def contiguous_f32(a: np.ndarray) -> np.ndarray:
    """The form the harness reads without copying."""
    if a.dtype != np.float32 or not a.flags["C_CONTIGUOUS"]:
        a = np.ascontiguousarray(a, dtype=np.float32)
    return a


def contiguous(a: np.ndarray, dtype=np.float32) -> np.ndarray:
    """C-contiguous float32, or float64 for a reference running in float64 (an oracle whose
    extra digits must survive the crossing)."""
    if a.dtype != dtype or not a.flags["C_CONTIGUOUS"]:
        a = np.ascontiguousarray(a, dtype=dtype)
    return a


# Per-layer sites in forward order (DESIGN.md), shared by every reference.
LAYER_SITES = ["attn_norm", "q", "k", "v", "q_rope", "k_rope", "cache_k", "cache_v", "attn",
               "attn_out", "mlp_norm", "mlp_gate", "mlp_up", "mlp_act", "mlp_out", "out"]


def site_names(num_layers: int, layer_sites=LAYER_SITES) -> list[str]:
    """All site names of a model, in forward order."""
    return ["embed"] + [f"layers.{i}.{s}" for i in range(num_layers) for s in layer_sites] + ["final_norm", "logits"]


# GGUF stores Q/K rows permuted for interleaved RoPE; these sites are in that order.
TRANSFORM_QK = "gguf-qk-deinterleave"
QK_SITES = ("q", "k", "q_rope", "k_rope", "cache_k")


def gguf_qk_deinterleave(a: np.ndarray, head_dim: int) -> np.ndarray:
    """GGUF/interleaved Q/K order -> Hugging Face order, along the last axis.

    The last axis is whole heads of ``head_dim``. GGUF's element ``2i + j`` of a head
    (i < head_dim/2, j in {0, 1}: the RoPE pair i) is Hugging Face's ``j*head_dim/2 + i``
    (rotate-half pairs i and i + head_dim/2): split the head into (head_dim/2, 2) and
    transpose to (2, head_dim/2). A pure permutation, so it is exact.
    """
    n = a.shape[-1]
    b = a.reshape(*a.shape[:-1], n // head_dim, head_dim // 2, 2).swapaxes(-1, -2)
    return np.ascontiguousarray(b).reshape(a.shape)


def hf_encode_prompt(tok, text: str) -> list[int]:
    """A plain prompt through a transformers tokenizer (its special tokens, e.g. BOS)."""
    return [int(x) for x in tok(text)["input_ids"]]


def hf_encode_chat(tok, messages: list[dict]) -> list[int]:
    """A chat through a transformers tokenizer's chat template, with the generation prompt."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(x) for x in out]
