"""The reference protocol: everything the harness calls in the modules of ``references/``.

This file owns the protocol between the Rust harness (which embeds CPython through pyo3)
and the Python references: the module function ``load``, the methods every reference
object has (``REQUIRED``), the optional **capabilities** (``CAPABILITIES``: each a named
group of methods, module functions and ``describe()`` keys), the keys of ``describe()``
(``DESCRIBE``), a module's declaration of itself (``declare`` / ``declaration``) and the
checks the harness runs on a module and on a loaded reference (``check``). It also holds
the helpers every reference shares: reading the site names the harness asks for, the
array forms that cross to Rust, the GGUF Q/K transform and the transformers-tokenizer
encoders.

A module of ``references/`` declares at import time what it is::

    PROTOCOL = protocol.declare(name="transformers", main_package="transformers",
                                capabilities=["lora", "sampler", ...], sampler_order=[...])

The harness reads that declaration before anything loads (``declaration(module)``): it
decides whether ``--lora`` may be given to the reference, which reference is the GGUF
tokenizer witness of ``lockstep tokcheck``, which ``lockstep bench`` sides exist. A
reference object repeats it in ``describe()`` (``**PROTOCOL``), which is what the harness
reads after ``load``: the harness never asks Python whether a method exists, it reads the
declared capabilities, and ``check(obj)`` verifies once after ``load`` that every
declared capability's methods are there.

Sites. The site names come from the harness (the engine's site graph of the model,
forward order): ``load(model_path, dtype=..., sites=[...])``. Every tensor crosses to Rust
as a C-contiguous float32 numpy array (float64 from a reference loaded with
dtype="float64"; zero-copy where the framework allows), in the Hugging Face layout:

    embed, layers.{i}.attn_norm/attn_out/mlp_norm/mlp_out/out, final_norm  (seq, hidden)
    layers.{i}.q/k/v          (seq, heads*head_dim)   projections before RoPE
    layers.{i}.q_rope/k_rope  (heads, seq, head_dim)  after RoPE
    layers.{i}.attn           (seq, heads*head_dim)   heads merged, before o_proj
    layers.{i}.mlp_gate/mlp_up/mlp_act                (seq, intermediate)
    layers.{i}.cache_k/cache_v (kv_heads, cached_len, head_dim)  whole cache after the step
                              (a view of the framework's memory where it can be: the harness
                              reads the rows a call appended and a few earlier ones)
    logits                    (seq, vocab)            every position fed in the step

A reference captures the names it can and lists exactly those in ``describe()["sites"]``
(in the order given); the report lists the others as not compared.
"""
from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ProtocolError(TypeError):
    """A module or a reference object does not implement what it declares."""


# -- the functions of a module of references/ ----------------------------------------------

class ModuleFunctions:
    """The module-level functions the harness calls (documentation; ``CAPABILITIES`` names
    the optional ones)."""

    @staticmethod
    def load(model_path: str, *, dtype: str = "float32", sites: list[str], lora: str | None = None,
             context: int | None = None, **options) -> "Reference":
        """Every reference module: the reference object for the model at ``model_path`` (a
        Hugging Face directory or a GGUF file). ``dtype``: "float32" or "float64" (an
        oracle; a reference that cannot run it raises ValueError). ``sites``: every site
        name of the model, in forward order, from the engine's site graph; the reference
        captures those it can. ``lora``: a LoRA adapter directory, given only to a
        reference declaring capability "lora" — and to a Python engine under test
        (``--engine python:PATH.py``) whenever the run has one: whether the engine applied
        it is what lockstep's adapter-effect check measures. ``context``: the positions the run
        feeds at most (``--context``; the prompt plus the steps by default), given to every
        reference of ``references/`` (not to a Python engine under test): one with a fixed
        context sizes it from this (llama.cpp's ``n_ctx``) and says how many positions it holds
        in ``describe()["context"]``, which the harness checks before any step; one whose cache
        grows ignores it. ``windows``: given to the references of ``references/`` when some layer
        of the model attends over a sliding window, one entry per layer (its window, or None for
        a global layer), as the config defines them: a reference whose library would run the
        model with other windows raises ValueError (it would compute another model); one that
        stores a window as a ring returns its cache rotated into position order, newest last
        (docs/contract.md, "Windowed caches"). Other options (``threads``, ...) are the
        reference's own."""

    @staticmethod
    def load_tokenizer(model_path: str, **options) -> "TokenizerSide":
        """Capability "tokenizer": only the tokenizer and chat template of the model, as the
        reference loads them (``lockstep tokcheck``)."""

    @staticmethod
    def bench(model_path: str, threads: int, prompt_ids: list[int], n_decode: int, repeats: int) -> dict:
        """Capability "bench", in ``references/bench.py`` under the reference's name
        (``bench.transformers``): times a prefill of ``prompt_ids`` (median of ``repeats``)
        and ``n_decode`` greedy decode steps; {name, version, prefill_s, decode_s, threads}."""

    @staticmethod
    def open(path: str) -> "Dequantizer":
        """Capability "dequantize": the reference dequantizer of a GGUF file
        (``lockstep quant-check``)."""


# -- the methods every reference object has -----------------------------------------------

class Reference(Protocol):
    def describe(self) -> dict:
        """What the reference is; the keys are ``DESCRIBE`` (required) and
        ``DESCRIBE_OPTIONAL``."""

    def reset(self) -> None:
        """Forget the sequence: a new, empty cache."""

    def step(self, token_ids: list[int]) -> dict[str, np.ndarray]:
        """Feed ``token_ids`` after everything fed since ``reset()`` (the reference keeps
        its own cache) and return {site: array} for this step: every name of
        ``describe()["sites"]``."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain prompt, as the reference's tokenizer makes them."""

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat ([{"role", "content"}]) with the generation prompt, as its
        chat template makes them."""

    def generate_greedy(self, token_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """The reference's own greedy generation loop (not the lockstep one) on a fresh
        cache: the new token ids, at most ``max_new_tokens``, the stop token included."""


REQUIRED = ("describe", "reset", "step", "encode_prompt", "encode_chat", "generate_greedy")

# describe() keys: what each holds. The first group is required of every reference.
DESCRIBE = {
    "name": "str: the reference's name, as the harness knows it (transformers, mlx, llamacpp)",
    "versions": "{package: version} of what it computes with",
    "dtype": "str: the dtype it computes in (float32, float64)",
    "sites": "[site]: the site names step() returns, a subset of the names load() was given, in their order",
    "notes": "[str]: how it loaded and computes, for the report",
    "capabilities": "[capability]: the names of CAPABILITIES it implements",
}
DESCRIBE_OPTIONAL = {
    "main_package": "str: the key of `versions` reports name the reference by (transformers 5.23.0)",
    "transforms": "[str]: named layout transforms applied to reach the Hugging Face layout "
                  "(gguf-qk-deinterleave)",
    "quantized_activations": "bool: it quantizes activations for quantized matmuls (llama.cpp on a "
                             "quantized GGUF); decides which tolerances apply",
    "sampler_order": "[stage]: with capability sampler, its library's filter chain (see SAMPLER_STAGES)",
    "sampler_rep_window": "int | None: with capability sampler, how many previous tokens its repetition "
                          "penalty looks at (None: all of them)",
    "model": "str: the model path it loaded",
    "num_layers": "int: the decoder layers of its model",
    "context": "int: the positions it can hold, for a reference with a fixed context (llama.cpp's n_ctx); "
               "a run that needs more stops before step 0",
}


# -- capabilities -----------------------------------------------------------------------------

# The stages of a sampler chain, as the harness (lockstep_engine::sample::Stage) names them.
SAMPLER_STAGES = ("rep_penalty", "temperature", "top_k", "top_p", "min_p")


class Lora(Protocol):
    def lora_inventory(self) -> str:
        """JSON text: a list of one entry per adapted module ("layers.{i}.{q_proj,...}"),
        in PEFT's convention and the Hugging Face Q/K order: {module, a_shape (r, in),
        b_shape (out, r), dtype, rank, scale, a_sum, a_norm, b_sum, b_norm}
        (``lora_adapter.entry``). Empty without an adapter."""

    def lora_config(self) -> str:
        """JSON text: how the adapter was loaded and its effective configuration
        ({"loader": ..., library version, ranks, alpha, targets ...}); null without one."""


class GenerationConfig(Protocol):
    def generation_config(self, params: dict, max_new_tokens: int | None) -> str:
        """JSON text: what the reference's own generation would use for these sampler
        ``params`` (temperature, top_k, top_p, min_p, rep_penalty, seed; see
        ``sampling.normalize``): bos_id, bos_token, eos_id, eos_token, add_bos, add_eos,
        chat_template, stop_ids, max_new_tokens, temperature, top_k, top_p, min_p,
        rep_penalty, rep_window, order (the stages it runs for these params, in its
        order), generator, seed, defaults_if_unset; "sampler": null for a reference whose
        sampler lockstep does not drive."""


class Sampler(Protocol):
    def sample_distribution(self, logits: np.ndarray, prev: list[int], params: dict) -> np.ndarray:
        """The distribution the reference's own sampling code samples from, given float32
        ``logits`` (vocab,), the previous token ids ``prev`` and the sampler ``params``:
        a float64 numpy vector (vocab,) (one-hot of the argmax at temperature 0)."""


class ChatRender(Protocol):
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat's text as the reference's chat template renders it."""


class TokenizerSide(Protocol):
    """What ``load_tokenizer`` returns: a tokenizer and chat template without the weights.
    Dict-shaped results cross as JSON text."""

    def token_info(self) -> str:
        """JSON: {bos_id, bos_token, eos_id, eos_token, add_bos, add_eos, chat_template,
        tokenizer (a description), vocab_size}."""

    def tokenize(self, texts: list[str], add_special_tokens: bool) -> str:
        """JSON: the ids of each text, [[int]]."""

    def pieces(self, ids: list[int]) -> str:
        """JSON: the vocabulary piece of each id, [str | null]."""

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat's text as the template renders it."""

    def encode_chat_messages(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """JSON: the chat's ids, [int], as the template and tokenizer make them."""


class Dequantizer(Protocol):
    """What ``open(path)`` of capability "dequantize" returns."""

    def versions(self) -> dict:
        """{package: version} of the dequantizer."""

    def tensors(self) -> list[tuple[str, str, list[int]]]:
        """(name, ggml type name, ggml dims) of every tensor, in file order."""

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a flat C-contiguous float32 array in ggml's element order."""


@dataclass(frozen=True)
class Capability:
    """One optional part of the protocol: the methods a reference object then has (a
    Protocol class above), the module functions its module then has (names of
    ``ModuleFunctions``; ``bench.{name}`` is a function of references/bench.py named like
    the reference), the describe() keys it then gives and the capabilities it builds on.
    ``standalone``: a module may declare it without being a reference (no ``load``)."""
    doc: str
    methods: type | None = None
    module: tuple = ()
    describe: tuple = ()
    requires: tuple = ()
    standalone: bool = False

    def method_names(self) -> list[str]:
        if self.methods is None:
            return []
        return [n for n, v in vars(self.methods).items() if inspect.isfunction(v)]


CAPABILITIES: dict[str, Capability] = {
    "lora": Capability(
        "load(..., lora=DIR) attaches a LoRA adapter directory (PEFT or mlx-lm format), "
        "unmerged; the harness diffs its inventory against the engine's. Without it, --lora "
        "is refused before the reference loads.",
        methods=Lora),
    "generation_config": Capability(
        "The generation-config table: what the reference's own generate() would use.",
        methods=GenerationConfig),
    "sampler": Capability(
        "Sampler parity: the reference's own sampler runs on the engine's logits. "
        "describe()['sampler_order'] is its library's whole filter chain: the five stages of "
        "SAMPLER_STAGES, each once, in the order its sampler applies them; "
        "describe()['sampler_rep_window'] its repetition penalty's window.",
        methods=Sampler, describe=("sampler_order", "sampler_rep_window")),
    "chat_render": Capability(
        "The run header compares the engine's rendered chat template with the reference's.",
        methods=ChatRender),
    "tokenizer": Capability(
        "lockstep tokcheck: the module's load_tokenizer(model_path) gives a TokenizerSide "
        "without loading the weights.",
        module=("load_tokenizer",)),
    "gguf_tokenizer": Capability(
        "For a GGUF file, load_tokenizer gives the format's own tokenizer (the GGUF's "
        "tokenizer.ggml.* with its pre-tokenizer type): tokcheck adds it as a witness when "
        "--reference names no reference with this capability.",
        requires=("tokenizer",)),
    "bench": Capability(
        "lockstep bench can time the reference: references/bench.py has a function named like it.",
        module=("bench.{name}",)),
    "dequantize": Capability(
        "lockstep quant-check: the module's open(path) gives the reference Dequantizer of a "
        "GGUF file.",
        module=("open",), standalone=True),
}


# -- declarations and checks -------------------------------------------------------------------

def declare(*, name: str, capabilities: list[str], main_package: str | None = None,
            sampler_order: list[str] | None = None, sampler_rep_window: int | None = None) -> dict:
    """A module's ``PROTOCOL``: its name, the capabilities it implements, the package its
    version is reported by and, with capability "sampler", its sampler's filter chain and
    repetition window. What can be checked without the module is checked here, at import."""
    out = {"name": name, "capabilities": list(capabilities)}
    if main_package is not None:
        out["main_package"] = main_package
    if sampler_order is not None:
        out["sampler_order"] = list(sampler_order)
        out["sampler_rep_window"] = sampler_rep_window
    _check_facts(out, f"the {name} reference")
    return out


def _check_facts(d: dict, who: str) -> None:
    caps = d.get("capabilities")
    if not isinstance(caps, (list, tuple)) or not all(isinstance(c, str) for c in caps):
        raise ProtocolError(f"{who}: 'capabilities' must be a list of capability names, not {caps!r}")
    for c in caps:
        cap = CAPABILITIES.get(c)
        if cap is None:
            raise ProtocolError(f"{who} declares the unknown capability {c!r} (references/protocol.py "
                                f"knows {', '.join(CAPABILITIES)})")
        for r in cap.requires:
            if r not in caps:
                raise ProtocolError(f"{who} declares capability {c!r}, which needs capability {r!r}")
        for k in cap.describe:
            if k not in d:
                raise ProtocolError(f"{who} declares capability {c!r} but gives no {k!r}")
    if "sampler_order" in d:
        order = d["sampler_order"]
        if not isinstance(order, (list, tuple)) or sorted(order) != sorted(SAMPLER_STAGES):
            raise ProtocolError(f"{who}: 'sampler_order' must name each of {', '.join(SAMPLER_STAGES)} "
                                f"once, not {order!r}")
    w = d.get("sampler_rep_window")
    if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
        raise ProtocolError(f"{who}: 'sampler_rep_window' must be a positive number of tokens or None, not {w!r}")
    mp = d.get("main_package")
    if mp is not None and not isinstance(mp, str):
        raise ProtocolError(f"{who}: 'main_package' must be a package name, not {mp!r}")


def declaration(module) -> str:
    """JSON text of ``module.PROTOCOL``, after checking that the module has what it declares:
    ``load`` (unless it declares only standalone capabilities) and the module functions of
    each capability. The harness calls this before it loads anything from the module."""
    mod = getattr(module, "__name__", repr(module))
    d = getattr(module, "PROTOCOL", None)
    if not isinstance(d, dict):
        raise ProtocolError(f"references/{mod}.py declares no PROTOCOL (each module of references/ "
                            "declares PROTOCOL = protocol.declare(name=..., capabilities=[...]))")
    who = f"the {d.get('name', mod)} reference (references/{mod}.py)"
    _check_facts(d, who)
    caps = d["capabilities"]
    if not (caps and all(CAPABILITIES[c].standalone for c in caps)) and not callable(getattr(module, "load", None)):
        raise ProtocolError(f"{who} has no function load(model_path, dtype=..., sites=...)")
    for c in caps:
        for fn in CAPABILITIES[c].module:
            fn = fn.format(name=d["name"])
            owner_name, _, attr = fn.rpartition(".")
            owner = importlib.import_module(owner_name) if owner_name else module
            if not callable(getattr(owner, attr, None)):
                raise ProtocolError(f"{who} declares capability {c!r} but there is no function {fn}()")
    return json.dumps(d)


def check(obj, who: str | None = None) -> dict:
    """Checks a loaded reference object against the protocol and returns its describe():
    the required methods, describe()'s required keys and the methods of every capability it
    declares. Raises ProtocolError naming the reference (``who``, else its describe()
    name), the capability and what is missing."""
    cls = type(obj).__name__
    describe = getattr(obj, "describe", None)
    if not callable(describe):
        raise ProtocolError(f"the {who or cls} reference ({cls}) has no method describe()")
    d = describe()
    if not isinstance(d, dict):
        raise ProtocolError(f"the {who or cls} reference ({cls}): describe() returned a "
                            f"{type(d).__name__}, not a dict")
    who = f"the {who or d.get('name', cls)} reference ({cls})"
    for m in REQUIRED:
        if not callable(getattr(obj, m, None)):
            raise ProtocolError(f"{who} has no method {m}(), which every reference has")
    for k, what in DESCRIBE.items():
        if k not in d:
            raise ProtocolError(f"{who}: describe() has no {k!r} ({what})")
    _check_facts(d, who)
    for c in d["capabilities"]:
        for m in CAPABILITIES[c].method_names():
            if not callable(getattr(obj, m, None)):
                raise ProtocolError(f"{who} declares capability {c!r} but has no method {m}()")
    return d


# -- sites -------------------------------------------------------------------------------------

GLOBAL_SITES = ("embed", "final_norm", "logits")


def parse_site(name: str) -> tuple[int | None, str]:
    """(layer, leaf) of a site name: ``layers.3.q_rope`` -> (3, "q_rope"), ``embed`` ->
    (None, "embed")."""
    if name.startswith("layers."):
        _, layer, leaf = name.split(".", 2)
        return int(layer), leaf
    return None, name


def requested_sites(sites, num_layers: int, who: str) -> list[tuple[str, int | None, str]]:
    """The site names the harness gave ``load`` as (name, layer, leaf), after checking that
    they are the sites of a model with this reference's number of layers."""
    if sites is None:
        raise ProtocolError(f"{who}: load() needs sites=[...], the site names of the model (the harness gives them)")
    out = [(s, *parse_site(s)) for s in sites]
    layers = max((l for _, l, _ in out if l is not None), default=-1) + 1
    if layers != num_layers:
        raise ValueError(f"{who}: the harness asks for the sites of {layers} layers, this reference's model has "
                         f"{num_layers}: they did not load the same model")
    return out


# -- what crosses to Rust ----------------------------------------------------------------------

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
