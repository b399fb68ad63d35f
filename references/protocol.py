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
