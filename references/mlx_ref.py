"""MLX (mlx + mlx-lm, CPU backend) as a lockstep reference.

Loads a Hugging Face directory through mlx-lm's own loader (``mlx_lm.utils.load_model``),
or a GGUF file through ``mx.load(path, return_metadata=True)`` mapped onto mlx-lm's Llama
``Model``: Q4_0/Q4_1/Q8_0 tensors stay quantized as MLX affine 4/8-bit weights with group
size 32 (``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding``), their scales and biases
converted to float32 (with MLX's float16 default the dequantized weights are off by up to
2e-3 from the gguf dequantizer; in float32 they are equal); F32/F16 tensors are used as
float32.

(or mlx-lm's Qwen2 ``Model`` for ``general.architecture = qwen2``, with its q/k/v biases).
A GGUF with types MLX's loader does not read (K-quants, Q5_0/Q5_1) runs from its dequantized
Hugging Face directory in the model store instead (``dequant_store``: made once by
transformers' GGUF loader, float32, keyed by the file's sha256).

A Llama GGUF stores the Q/K rows permuted for interleaved RoPE; the model keeps that order and
runs mlx-lm's Llama with ``rope_traditional=True``. A Qwen2 GGUF is not permuted (llama.cpp
runs qwen2 with NEOX RoPE): half-split RoPE, no transform. The q, k, q_rope, k_rope and cache_k
sites of such a model are mapped back to the Hugging Face order by the transform
``gguf-qk-deinterleave`` (see ``protocol.gguf_qk_deinterleave``).

MLX has no hooks: the modules whose inputs/outputs are sites (``hooks.LAYER_HOOKS`` /
``hooks.GLOBAL_HOOKS``, module names mlx-lm's models share with transformers; the
attention's ``rope`` module for q_rope/k_rope) get their class swapped for a subclass whose
``__call__`` records them (the parameter tree and every attribute stay as they were). Of
the site names the harness gives ``load``, those the model's modules give are captured.
The model is called directly, one lockstep step at a time, with its own ``KVCache`` list
(not ``generate_step``, whose chunked prefill changes the numerics); cache contents are
read from the caches after each step. ``generate_greedy`` is mlx-lm's own loop
(``generate_step`` with an argmax sampler) on a fresh cache.

A LoRA adapter (``lora=DIR``) uses mlx-lm's own LoRA layers: an mlx-lm adapter is loaded with
``mlx_lm.tuner.utils.load_adapters``; a PEFT adapter is attached module by module with
``mlx_lm.tuner.lora.LoRALinear.from_base`` (``lora_a = A^T``, ``lora_b = B^T``, scale
``lora_alpha / r``), since mlx-lm's config can only name the last N layers. Adapter matrices
are held in float32. On a GGUF model (Q/K rows in GGUF order) ``lora_b``'s columns of q_proj
and k_proj are permuted into that order (the inverse of ``gguf-qk-deinterleave``).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import mmap
import os
import struct
from collections import Counter
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF tokenizer loader uses tqdm

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import transformers
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache
from mlx_lm.models.llama import Model as LlamaModel, ModelArgs as LlamaArgs
from mlx_lm.models.qwen2 import Model as Qwen2Model, ModelArgs as Qwen2Args
from mlx_lm.models.mixtral import Model as MixtralModel, ModelArgs as MixtralArgs
from transformers import AutoTokenizer

import dequant_store
import hooks
import lora_adapter
import protocol
from protocol import QK_SITES, TRANSFORM_QK, contiguous_f32, gguf_qk_deinterleave, hf_encode_chat, hf_encode_prompt
from sampling import MLX_REPETITION_CONTEXT, HfSideMixin, HfTokenizerSide, MlxSampling

PROTOCOL = protocol.declare(
    name="mlx",
    main_package="mlx",
    capabilities=["lora", "generation_config", "sampler", "chat_render", "tokenizer"],
    # mlx_lm.sample_utils: logits processors, then make_sampler's top_p, min_p, top_k, and
    # the temperature in categorical_sampling (sampling.MlxSampling.order).
    sampler_order=["rep_penalty", "top_p", "min_p", "top_k", "temperature"],
    sampler_rep_window=MLX_REPETITION_CONTEXT,
)

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


# Sites whose last dimension holds Q/K head vectors (in GGUF order for a GGUF model).


def _np(a: mx.array) -> np.ndarray:
    # np.asarray shares MLX's buffer when the (evaluated) array is row-contiguous float32.
    if a.dtype != mx.float32:
        a = a.astype(mx.float32)
    return contiguous_f32(np.asarray(a))


# -- GGUF ------------------------------------------------------------------------------------

# ggml tensor types this reference loads, and how.
_F32, _F16, _Q4_0, _Q4_1, _Q8_0, _BF16 = 0, 1, 2, 3, 8, 30
_QUANT_BITS = {_Q4_0: 4, _Q4_1: 4, _Q8_0: 8}
_PLAIN = {_F32, _F16, _BF16}
_GGML_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
               9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
               15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 30: "BF16"}


def _ggml_name(t: int) -> str:
    if t in _GGML_NAMES:
        return _GGML_NAMES[t]
    try:
        import gguf
        return gguf.GGMLQuantizationType(t).name
    except Exception:
        return f"ggml type {t}"


def _gguf_header(path: Path) -> tuple[str | None, dict[str, int]]:
    """(general.architecture, {tensor name: ggml type}) from a GGUF header, read before
    mx.load: mx.load does not say which types a file had, dequantizes some types it does
    not keep quantized to float16 and fails on others with a message naming neither."""
    # Value sizes of the GGUF metadata types; 8 = string, 9 = array.
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(m[:4])!r})")
        version, = struct.unpack_from("<I", m, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        pos = 24

        def skip_string(pos):
            n, = struct.unpack_from("<Q", m, pos)
            return pos + 8 + n

        def skip_value(pos, vt):
            if vt in fixed:
                return pos + fixed[vt]
            if vt == 8:
                return skip_string(pos)
            if vt == 9:
                et, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if et in fixed:
                    return pos + fixed[et] * count
                for _ in range(count):
                    pos = skip_value(pos, et)
                return pos
            raise ValueError(f"{path}: unknown GGUF metadata value type {vt}")

        arch = None
        for _ in range(n_kv):
            n, = struct.unpack_from("<Q", m, pos)
            key = m[pos + 8:pos + 8 + n]
            pos += 8 + n
            vt, = struct.unpack_from("<I", m, pos)
            if key == b"general.architecture" and vt == 8:
                n, = struct.unpack_from("<Q", m, pos + 4)
                arch = m[pos + 12:pos + 12 + n].decode("utf-8", "replace")
            pos = skip_value(pos + 4, vt)
        types = {}
        for _ in range(n_tensors):
            n, = struct.unpack_from("<Q", m, pos)
            name = m[pos + 8:pos + 8 + n].decode("utf-8")
            pos += 8 + n
            nd, = struct.unpack_from("<I", m, pos)
            pos += 4 + 8 * nd
            t, = struct.unpack_from("<I", m, pos)
            pos += 4 + 8  # type, offset
            types[name] = t
        return arch, types


_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               # Mixtral (llama with experts): the router and the merged [n_expert, out, in]
               # experts, which are mlx-lm's SwitchGLU weights as they are.
               "ffn_gate_inp": "block_sparse_moe.gate",
               "ffn_gate_exps": "block_sparse_moe.switch_mlp.gate_proj",
               "ffn_up_exps": "block_sparse_moe.switch_mlp.up_proj",
               "ffn_down_exps": "block_sparse_moe.switch_mlp.down_proj"}


def _gguf_module(name: str) -> str | None:
    """GGUF tensor base name (without .weight) -> mlx-lm Llama module path."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}"
    return None


def _meta(meta: dict, key: str, path: Path, default=None, required=True):
    if key not in meta:
        if required:
            raise ValueError(f"{path}: GGUF metadata lacks {key!r}")
        return default
    v = meta[key]
    return v.item() if isinstance(v, mx.array) else v


# GGUF architectures this loader maps onto mlx-lm: the model class, its args, whether the
# converter permuted Q/K rows for interleaved RoPE (llama: yes; qwen2: no, llama.cpp runs it
# with NEOX RoPE on Hugging Face-ordered rows), and the projections that carry a bias.
_GGUF_ARCHS = {
    "llama": (LlamaModel, LlamaArgs, True, ()),
    "qwen2": (Qwen2Model, Qwen2Args, False, ("attn_q", "attn_k", "attn_v")),
}


def _unloadable_types(path: Path) -> list[str]:
    """The ggml types of a GGUF that MLX's GGUF loader cannot read (K-quants, Q5_0, ...)."""
    try:
        _, types = _gguf_header(path)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError, OSError):
        return []  # _load_gguf reports the bad header
    return sorted({_ggml_name(t) for t in types.values() if t not in _PLAIN and t not in _QUANT_BITS})


def _load_gguf(path: Path):
    """(model, notes, Q/K rows permuted) for a Llama or Qwen2 GGUF file."""
    try:
        arch, types = _gguf_header(path)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError, OSError) as e:
        raise ValueError(f"{path}: could not read its GGUF header: {e}") from e
    if arch not in _GGUF_ARCHS:
        what = f"architecture {arch!r}" if arch else "no general.architecture"
        raise ValueError(f"{path}: GGUF has {what}; the mlx reference supports only "
                         + ", ".join(repr(a) for a in _GGUF_ARCHS))
    model_cls, args_cls, permuted, biased = _GGUF_ARCHS[arch]
    a_ = arch  # metadata keys are {arch}.*
    bad = sorted({_ggml_name(t) for t in types.values() if t not in _PLAIN and t not in _QUANT_BITS})
    if bad:
        which = [n for n, t in types.items() if _ggml_name(t) in bad][:5]
        raise ValueError(f"{path}: GGUF tensor type(s) {', '.join(bad)} not supported by the "
                         f"mlx reference (it keeps only Q4_0, Q4_1, Q8_0 quantized and reads "
                         f"F32/F16/BF16), e.g. {', '.join(which)}")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"{path}: mx.load could not read it: {e}") from e
    if "rope_freqs.weight" in types:
        raise ValueError(f"{path}: GGUF has rope_freqs.weight (Llama 3 RoPE frequency factors), "
                         "which the mlx reference does not support")
    scaling = _meta(meta, f"{a_}.rope.scaling.type", path, required=False)
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: GGUF RoPE scaling {scaling!r} is not supported by the mlx reference")

    hidden = int(_meta(meta, f"{a_}.embedding_length", path))
    heads = int(_meta(meta, f"{a_}.attention.head_count", path))
    head_dim = int(_meta(meta, f"{a_}.attention.key_length", path, hidden // heads, required=False))
    rope_dims = int(_meta(meta, f"{a_}.rope.dimension_count", path, head_dim, required=False))
    if rope_dims != head_dim:
        raise ValueError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported "
                         "by the mlx reference")
    if "token_embd.weight" not in arrays:
        raise ValueError(f"{path}: GGUF lacks tensor 'token_embd.weight'")
    weights: dict[str, mx.array] = {}
    quant: dict[str, int] = {}  # module path -> bits
    for name, t in types.items():
        if name.endswith(".bias") and name.split(".")[-2] in biased:
            mod = _gguf_module(name[: -len(".bias")])
            a = arrays.get(name)
            if mod is None or a is None or t != _F32:
                raise ValueError(f"{path}: bias tensor {name!r} is not an F32 {arch} projection bias")
            weights[f"{mod}.bias"] = a.astype(mx.float32)
            continue
        if not name.endswith(".weight"):
            raise ValueError(f"{path}: unexpected GGUF tensor {name!r} for a {arch} model")
        base = name[: -len(".weight")]
        mod = _gguf_module(base)
        if mod is None:
            raise ValueError(f"{path}: unexpected GGUF tensor {name!r} for a {arch} model")
        if t in _QUANT_BITS:
            w = arrays.get(name)
            s = arrays.get(f"{base}.scales")
            b = arrays.get(f"{base}.biases")
            if w is None or s is None or w.dtype != mx.uint32:
                raise ValueError(f"{path}: mx.load did not return {_ggml_name(t)} tensor {name!r} "
                                 "as MLX quantized weight + scales")
            if b is None:
                # Q4_0 / Q8_0 are symmetric: x = d * (q - 2^(bits-1)).
                b = -float(2 ** (_QUANT_BITS[t] - 1)) * s.astype(mx.float32)
            weights[f"{mod}.weight"] = w
            weights[f"{mod}.scales"] = s.astype(mx.float32)
            weights[f"{mod}.biases"] = b.astype(mx.float32)
            quant[mod] = _QUANT_BITS[t]
        else:
            a = arrays.get(name)
            if a is None:
                raise ValueError(f"{path}: mx.load did not return tensor {name!r}")
            if t == _F16 and a.dtype != mx.float16 or t == _BF16 and a.dtype != mx.bfloat16 \
                    or t == _F32 and a.dtype != mx.float32:
                raise ValueError(f"{path}: mx.load returned {name!r} ({_ggml_name(t)}) as {a.dtype}")
            weights[f"{mod}.weight"] = a.astype(mx.float32)

    vocab = int(arrays["token_embd.weight"].shape[0])
    tie = "output.weight" not in types
    kw = dict(head_dim=head_dim) if arch == "llama" else {}
    n_expert = int(_meta(meta, f"{a_}.expert_count", path, 0, required=False))
    if n_expert > 0:
        # llama.cpp writes Mixtral as llama with experts: mlx-lm's mixtral model (which derives
        # head_dim from hidden/heads).
        if arch != "llama" or head_dim != hidden // heads:
            raise ValueError(f"{path}: experts in a {arch} GGUF (head_dim {head_dim}) do not fit mlx-lm's mixtral")
        model_cls, args_cls, arch = MixtralModel, MixtralArgs, "mixtral"
        kw = dict(num_local_experts=n_expert,
                  num_experts_per_tok=int(_meta(meta, f"{a_}.expert_used_count", path)))
    if arch not in ("llama", "mixtral") and head_dim != hidden // heads:
        raise ValueError(f"{path}: head_dim {head_dim} != hidden/heads: mlx-lm's {arch} derives it")
    args = args_cls(
        model_type=arch,
        hidden_size=hidden,
        num_hidden_layers=int(_meta(meta, f"{a_}.block_count", path)),
        intermediate_size=int(_meta(meta, f"{a_}.feed_forward_length", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(_meta(meta, f"{a_}.attention.head_count_kv", path, heads, required=False)),
        **kw,
        rms_norm_eps=float(_meta(meta, f"{a_}.attention.layer_norm_rms_epsilon", path)),
        vocab_size=vocab,
        **({} if arch == "mixtral" else  # mlx-lm's mixtral args have no max_position_embeddings
           dict(max_position_embeddings=int(_meta(meta, f"{a_}.context_length", path, 4096, required=False)))),
        rope_theta=float(_meta(meta, f"{a_}.rope.freq_base", path, 10000.0, required=False)),
        rope_traditional=permuted,  # a Llama GGUF's Q/K rows are permuted for interleaved RoPE
        tie_word_embeddings=tie,
    )
    model = model_cls(args)  # random init is lazy: never computed, replaced below

    def predicate(p, m):
        if p in quant:
            return {"group_size": 32, "bits": quant[p], "mode": "affine"}
        return False

    nn.quantize(model, class_predicate=predicate)
    expected = {k for k, _ in tree_flatten(model.parameters())}
    missing = sorted(expected - set(weights))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) for a {arch} model: "
                         + ", ".join(_to_gguf_name(k) for k in missing[:8])
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"{path}: its tensors do not fit mlx-lm's {arch} model: {e}") from e
    model.eval()
    mx.eval(model.parameters())

    counts = Counter(_ggml_name(t) for t in types.values())
    notes = []
    for t in sorted({t for t in types.values()}):
        n = _ggml_name(t)
        if t in _QUANT_BITS:
            notes.append(f"GGUF {n} weights kept quantized ({counts[n]} tensors: MLX affine "
                         f"{_QUANT_BITS[t]}-bit, group 32, float32 scales and biases)")
        else:
            notes.append(f"GGUF {n} tensors used as float32 ({counts[n]} tensors)")
    if permuted:
        notes.append("Q/K kept in GGUF order with traditional (interleaved) RoPE; q, k, q_rope, "
                     f"k_rope, cache_k mapped back to the Hugging Face order ({TRANSFORM_QK})")
    else:
        notes.append(f"GGUF architecture {arch}: Q/K rows in Hugging Face order (not permuted by the "
                     "converter), half-split RoPE, no transform")
    return model, notes, permuted


def _to_gguf_name(param: str) -> str:
    """mlx-lm parameter path -> the GGUF tensor name it comes from (for error messages)."""
    mod, _, leaf = param.rpartition(".")
    for g, m in _GGUF_GLOBAL.items():
        if mod == m:
            return f"{g}.{leaf}"
    parts = mod.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        rest = ".".join(parts[3:])
        for g, m in _GGUF_LAYER.items():
            if rest == m:
                return f"blk.{parts[2]}.{g}.{leaf}"
    return param


def _load_hf(path: Path):
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    cfg = json.loads(cfg_path.read_text())
    mt = cfg.get("model_type")
    # Any model type mlx-lm has a model for (its models/<model_type>.py): the sites of any
    # decoder (embed, each layer's output and cache, final_norm, logits) are read the same way
    # in all of them; the detailed ones where the layer has the Llama module names.
    from mlx_lm.utils import load_model
    notes = ["loaded with mlx_lm.utils.load_model; float parameters cast to float32"]
    # transformers 5 writes RoPE as `rope_parameters`; mlx-lm's Llama-style models read
    # `rope_theta` and `rope_scaling` only, and would run such a model unscaled. A flat
    # rope_parameters (one RoPE for every layer) is handed to them in that form.
    overrides = {}
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and ("rope_type" in rp or "rope_theta" in rp) and cfg.get("rope_scaling") is None:
        if "rope_theta" in rp:
            overrides["rope_theta"] = rp["rope_theta"]
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            overrides["rope_scaling"] = scaling
        notes.append("rope_parameters given to mlx-lm as rope_theta/rope_scaling"
                     + (f" ({scaling['rope_type']})" if "rope_scaling" in overrides else ""))
    try:
        model, _ = load_model(path, lazy=True, model_config=overrides)
    except Exception as e:
        raise ValueError(f"{path}: mlx-lm could not load it (model_type {mt!r}): {e}") from e
    model.set_dtype(mx.float32)  # float weights (and any quantization scales) in float32
    model.eval()
    mx.eval(model.parameters())
    return model, notes


# -- capture -----------------------------------------------------------------------------------

# The rotary embedding module of an mlx-lm decoder layer (called on the queries, then the keys).
_ROPE = f"{hooks.ATTENTION}.rope"

class _Recorder:
    def __init__(self):
        self.on = False
        self.out: dict[str, mx.array] = {}

    def put(self, name, a):
        if name is not None:
            self.out[name] = a[0]  # batch of one


_CAPTURE_CLASSES: dict[type, type] = {}


def _capture_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` records its first input and/or output."""
    sub = _CAPTURE_CLASSES.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            rec = self._ls_rec
            if rec.on:
                if self._ls_in is not None:
                    rec.put(self._ls_in, args[0])
                if self._ls_out is not None:
                    rec.put(self._ls_out, out)
                if getattr(self, "_ls_arg1", None) is not None:  # an MoE's expert indices
                    rec.put(self._ls_arg1, args[1])
                if self._ls_alt is not None:  # RoPE: called on the queries, then the keys
                    rec.put(self._ls_alt[self._ls_n % 2], out)
                    object.__setattr__(self, "_ls_n", self._ls_n + 1)
            return out

        sub = type(f"Captured{cls.__name__}", (cls,), {"__call__": __call__})
        _CAPTURE_CLASSES[cls] = sub
    return sub


def _capture(m: nn.Module, rec: _Recorder, out=None, inp=None, alt=None):
    m.__class__ = _capture_class(type(m))
    # object.__setattr__: plain attributes, never part of the module's parameter tree.
    object.__setattr__(m, "_ls_rec", rec)
    object.__setattr__(m, "_ls_out", out)
    object.__setattr__(m, "_ls_in", inp)
    object.__setattr__(m, "_ls_alt", alt)
    object.__setattr__(m, "_ls_n", 0)


# -- the reference -----------------------------------------------------------------------------

class MlxReference(HfSideMixin):
    def __init__(self, model: str, dtype: str = "float32", threads: int | None = None, lora: str | None = None,
                 sites: list[str] | None = None, context: int | None = None, windows: list | None = None):
        # `context`: mlx-lm's KVCache grows in steps of 256; no fixed context to size.
        if dtype != "float32":
            raise ValueError(f"the mlx reference runs float32 only (MLX's CPU backend here), "
                             f"not {dtype!r}")
        self.model_path = model
        self.dtype_name = dtype
        p = Path(model)
        dequant = _unloadable_types(p) if p.is_file() else []
        if dequant:
            # K-quants (and Q5_0/Q5_1): the same weights from their dequantized Hugging Face
            # directory in the model store (dequant_store), made once.
            d, made = dequant_store.hf_dir_for(p)
            self.model, notes = _load_hf(d)
            self.gguf = False
            self.qk_permuted = False
            self.tok = AutoTokenizer.from_pretrained(str(d))
            notes.insert(0, f"GGUF tensor types {', '.join(dequant)} are not in MLX's GGUF loader: the weights are "
                            f"the file's dequantized Hugging Face directory {d} ({'made now' if made else 'made once before'}"
                            f" by transformers' GGUF loader, float32)")
            notes.append("tokenizer: transformers AutoTokenizer from that directory (built from the GGUF)")
        elif p.is_file():
            self.model, notes, self.qk_permuted = _load_gguf(p)
            self.gguf = True
            self.tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            notes.append("tokenizer: transformers AutoTokenizer built from the GGUF (gguf_file=)")
        elif p.is_dir():
            self.model, notes = _load_hf(p)
            self.gguf = False
            self.qk_permuted = False
            self.tok = AutoTokenizer.from_pretrained(str(p))
            notes.append("tokenizer: transformers AutoTokenizer from the model directory")
        else:
            raise FileNotFoundError(f"{model}: no such model file or directory")
        self.tokside = HfTokenizerSide(self.tok, "transformers AutoTokenizer" + (" from the GGUF" if self.gguf else ""))
        self.sampling = MlxSampling()
        if threads:
            notes.append(f"threads={threads} ignored: MLX's CPU backend chooses its own threading")
        notes.append(f"device: {mx.default_device()}")
        self.notes = notes
        args = self.model.args
        rope = self._rope_module()
        if rope is not None:
            scale = getattr(rope, "scale", None)
            if type(rope).__name__ != "RoPE" or (scale not in (None, 1.0)):
                self.notes.append(f"RoPE: mlx-lm's {type(rope).__name__}" + (f" (scale {scale})" if scale not in (None, 1.0) else ""))
        self.num_layers = args.num_hidden_layers
        self._check_windows(windows)
        self._check_config(p)
        self.head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        self.transforms = [TRANSFORM_QK] if self.qk_permuted else []
        self.lora_path = lora
        self.lora_how = None
        if lora:
            self._attach_lora(lora)
            self.notes.append(f"LoRA adapter {lora}: {self.lora_how}, unmerged")
        self._rec = _Recorder()
        self._ropes = []
        self._install(protocol.requested_sites(sites, self.num_layers, "the mlx reference"))
        self.reset()

    def _attach_lora(self, path: str):
        from mlx_lm.tuner.lora import LoRALinear
        fmt = lora_adapter.adapter_format(path)
        layers = self.model.model.layers
        if fmt == "mlx":
            from mlx_lm.tuner.utils import load_adapters
            load_adapters(self.model, path)
            self.lora_how = "mlx_lm.tuner.utils.load_adapters"
        else:
            ad = lora_adapter.read(path, self.num_layers)
            for (i, m), (a, b) in sorted(ad["pairs"].items()):
                parent_name, leaf = lora_adapter.PROJ_PATHS[m].split(".")
                parent = getattr(layers[i], parent_name, None)
                if parent is None or getattr(parent, leaf, None) is None:
                    raise ValueError(f"the adapter targets layers.{i}.{m}, which this model lacks")
                ll = LoRALinear.from_base(getattr(parent, leaf), r=ad["rank"], dropout=0.0, scale=ad["scale"])
                ll.lora_a = mx.array(np.ascontiguousarray(a.T))
                ll.lora_b = mx.array(np.ascontiguousarray(b.T))
                setattr(parent, leaf, ll)
            self.lora_how = ("PEFT adapter attached with mlx_lm.tuner.lora.LoRALinear.from_base "
                             f"(scale lora_alpha / r = {ad['scale']:g})")
        for i, layer in enumerate(layers):
            for m, p in lora_adapter.PROJ_PATHS.items():
                parent_name, leaf = p.split(".")
                mod = getattr(getattr(layer, parent_name, None), leaf, None)
                if not isinstance(mod, LoRALinear):
                    continue
                mod.lora_a = mod.lora_a.astype(mx.float32)
                mod.lora_b = mod.lora_b.astype(mx.float32)
                if self.qk_permuted and m in ("q_proj", "k_proj"):
                    mod.lora_b = mx.array(_qk_interleave(np.array(mod.lora_b), self.head_dim))
        self.model.eval()
        mx.eval(self.model.parameters())

    def lora_inventory(self) -> str:
        """JSON list of the LoRA modules this side holds (PEFT convention, HF Q/K order)."""
        from mlx_lm.tuner.lora import LoRALinear
        out = []
        for i, layer in enumerate(self.model.model.layers):
            for m, p in lora_adapter.PROJ_PATHS.items():
                parent_name, leaf = p.split(".")
                mod = getattr(getattr(layer, parent_name, None), leaf, None)
                if not isinstance(mod, LoRALinear):
                    continue
                a = np.array(mod.lora_a.astype(mx.float32)).T
                b = np.array(mod.lora_b.astype(mx.float32))
                if self.qk_permuted and m in ("q_proj", "k_proj"):
                    b = gguf_qk_deinterleave(b, self.head_dim)
                dt = str(mod.lora_a.dtype).removeprefix("mlx.core.")
                out.append(lora_adapter.entry(f"layers.{i}.{m}", a, b.T, dt, float(mod.scale)))
        return json.dumps(out)

    def lora_config(self) -> str:
        if not self.lora_path:
            return json.dumps(None)
        cfg = json.loads((Path(self.lora_path) / "adapter_config.json").read_text())
        return json.dumps({"loader": self.lora_how, "mlx-lm": md.version("mlx-lm"), "adapter_config": cfg})

    def _install(self, requested):
        """Captures for the requested sites this model has; ``self.sites`` lists them."""
        rec, m = self._rec, self.model.model
        got: set[str] = set()

        def attach(root, table, wanted):
            for mod, sides in hooks.plan(root, table, wanted).values():
                _capture(mod, rec, out=sides.get(hooks.OUTPUT), inp=sides.get(hooks.INPUT))
                got.update(sides.values())

        by_layer: dict[int, dict[str, str]] = {}
        glob: dict[str, str] = {}
        for name, layer, leaf in requested:
            (glob if layer is None else by_layer.setdefault(layer, {}))[leaf] = name
        # embed: the first layer's input, i.e. after any scale the model applies to the embedding
        # (Gemma's sqrt(hidden), which mlx-lm multiplies outside embed_tokens; transformers' scaled
        # embedding module returns it, llama.cpp's inp_scaled holds it).
        embed = glob.pop("embed", None)
        attach(m, hooks.GLOBAL_HOOKS, glob)
        self._logits = "logits" in glob
        got.update(["logits"] if self._logits else [])
        self._cache_sites = {}
        self._moe_sites = {}
        for i, layer in enumerate(m.layers):
            wanted = by_layer.get(i, {})
            attach(layer, hooks.LAYER_HOOKS, wanted)
            q, k = (wanted.get(s) for s in hooks.ROPE_SITES)
            if q or k:
                rope = hooks.submodule(layer, _ROPE)
                if rope is None:
                    raise ValueError(f"the mlx reference: layer {i}'s attention ({type(layer.self_attn).__name__}) "
                                     f"has no {_ROPE.rpartition('.')[2]!r} module, so its post-RoPE q/k (q_rope, "
                                     "k_rope) cannot be captured")
                _capture(rope, rec, alt=(q, k))
                self._ropes.append(rope)
                got.update(x for x in (q, k) if x)
            ew = wanted.get(hooks.EXPERT_WEIGHTS)
            moe = hooks.submodule(layer, "block_sparse_moe")
            if ew and moe is not None and hasattr(moe, "switch_mlp"):
                # mlx-lm's MixtralSparseMoeBlock: inds = top-k of the gate's logits (given to
                # switch_mlp), weights = softmax over those k logits; both captured here and
                # assembled after the step (_moe_sites).
                logits_key, inds_key = f"{ew}#logits", f"{ew}#inds"
                gate = moe.gate
                if getattr(gate, "_ls_out", None) is None:
                    _capture(gate, rec, out=logits_key)
                else:
                    logits_key = gate._ls_out
                _capture(moe.switch_mlp, rec)
                object.__setattr__(moe.switch_mlp, "_ls_arg1", inds_key)
                self._moe_sites[ew] = (logits_key, inds_key, moe.num_experts_per_tok)
                got.add(ew)
            kv = tuple(wanted.get(s) for s in hooks.CACHE_SITES)
            if any(kv):
                self._cache_sites[i] = kv
                got.update(x for x in kv if x)
        if embed and m.layers:
            first = m.layers[0]
            if getattr(first, "_ls_rec", None) is None:
                _capture(first, rec, inp=embed)
            else:
                object.__setattr__(first, "_ls_in", embed)
            got.add(embed)
        self.sites = [name for name, _, _ in requested if name in got]

    # -- protocol --------------------------------------------------------------------------
    def describe(self) -> dict:
        versions = {}
        for pkg in ["mlx", "mlx-lm", "mlx-metal", "mlx-cpu", "numpy", "transformers", "tokenizers"]:
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                pass
        return {
            **PROTOCOL,
            "versions": versions,
            "model": self.model_path,
            "dtype": self.dtype_name,
            "num_layers": self.num_layers,
            "sites": list(self.sites),
            "transforms": list(self.transforms),
            "notes": list(self.notes),
        }

    def _check_config(self, p: Path) -> None:
        """Keys of a Hugging Face config.json that mlx-lm's model of it does not read, where
        they would make it compute another model: a final logit soft-cap (its gemma3_text has
        no `final_logit_softcapping`), and transformers 5's per-layer-type `rope_parameters`
        (gemma3_text reads `rope_theta` / `rope_local_base_freq` only, defaults 1e6 / 1e4)."""
        if not p.is_dir() or not (p / "config.json").is_file():
            return
        cfg = json.loads((p / "config.json").read_text())
        args = self.model.args
        where = f"mlx-lm {md.version('mlx-lm')}'s {type(self.model).__module__}"
        cap = cfg.get("final_logit_softcapping")
        if cap and getattr(args, "final_logit_softcapping", None) is None:
            raise ValueError(f"the mlx reference: {where} does not apply this config's final_logit_softcapping "
                             f"({cap}); it would compute another model (use --reference transformers for it)")
        rp = cfg.get("rope_parameters") or {}
        for layer_type, attr in (("full_attention", "rope_theta"), ("sliding_attention", "rope_local_base_freq")):
            want = (rp.get(layer_type) or {}).get("rope_theta") if isinstance(rp.get(layer_type), dict) else None
            have = getattr(args, attr, None)
            if want is not None and have is not None and float(want) != float(have):
                raise ValueError(f"the mlx reference: {where} runs {layer_type} layers with RoPE base {have} ({attr}; "
                                 f"it does not read rope_parameters) where the config says {want}: it would compute "
                                 "another model")

    def _check_windows(self, windows: list | None) -> None:
        """The windows mlx-lm runs the model with (its caches: a RotatingKVCache of max_size W
        where a layer attends over a window) must be the config's, as lockstep reads it
        (`windows`, one per layer): mlx-lm's `llama` model, which runs Mistral, windows only the
        layers `layer_types` names and needs a global one; its `qwen2` model none."""
        if windows is None:
            # Not told (a Python engine built on this reference; a model without windows).
            return
        caches = make_prompt_cache(self.model)
        ours = [c.max_size if isinstance(c, RotatingKVCache) else None for c in caches]
        want = list(windows)
        if ours != want:
            show = lambda ws: ", ".join("global" if w is None else f"window {w}" for w in ws)
            raise ValueError(
                f"the mlx reference: mlx-lm {md.version('mlx-lm')} runs this model ({type(self.model).__module__}) with "
                f"layers [{show(ours)}] where its config defines [{show(want)}]; it would compute another model "
                "(mlx-lm windows a Llama-architecture model only on the layers `layer_types` names, and needs one global "
                "layer among them): compare against transformers instead")

    def _rope_module(self):
        """The first layer's rotary embedding, where the model has the Llama module names."""
        try:
            return self.model.model.layers[0].self_attn.rope
        except AttributeError:
            return None

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model)
        self.pos = 0

    def step(self, token_ids: list[int]) -> dict[str, np.ndarray]:
        if len(token_ids) == 0:
            raise ValueError("step() needs at least one token")
        ids = mx.array([[int(t) for t in token_ids]], dtype=mx.int32)
        rec = self._rec
        rec.out = {}
        for r in self._ropes:
            object.__setattr__(r, "_ls_n", 0)
        rec.on = True
        try:
            logits = self.model(ids, cache=self.cache)
        finally:
            rec.on = False
        self.pos += len(token_ids)
        out = dict(rec.out)
        rec.out = {}
        if self._logits:
            out["logits"] = logits[0]
        for i, c in enumerate(self.cache):
            if i not in self._cache_sites:
                continue
            if isinstance(c, RotatingKVCache):
                # A ring: rotated into position order, newest last (the canonical form's order).
                k, v = c._temporal_order(c.keys), c._temporal_order(c.values)
            else:
                k, v = c.keys_and_values() if hasattr(c, "keys_and_values") else (c.keys, c.values)
            for site, a in zip(self._cache_sites[i], (k, v)):
                if site:
                    out[site] = a[0]
        for ew, (logits_key, inds_key, _k) in self._moe_sites.items():
            gates, inds = out[logits_key], out.pop(inds_key)
            if logits_key.endswith("#logits"):
                out.pop(logits_key)
            # mlx-lm's own weights: softmax over the chosen experts' logits (precise).
            scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)
            dense = mx.put_along_axis(mx.zeros(gates.shape, dtype=scores.dtype), inds, scores, axis=-1)
            out[ew] = dense
        mx.eval(list(out.values()))
        res = {name: _np(a) for name, a in out.items()}
        if self.qk_permuted:
            for name in res:
                if name.rpartition(".")[2] in QK_SITES:
                    res[name] = gguf_qk_deinterleave(res[name], self.head_dim)
        return res

    def encode_prompt(self, text: str) -> list[int]:
        return hf_encode_prompt(self.tok, text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return hf_encode_chat(self.tok, messages)

    def generate_greedy(self, token_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        if max_new_tokens <= 0:
            return []
        stop = {int(s) for s in stop_ids}
        prompt = mx.array([int(t) for t in token_ids], dtype=mx.int32)
        new: list[int] = []
        for tok, _ in generate_step(prompt, self.model, max_tokens=max_new_tokens,
                                    sampler=lambda x: mx.argmax(x, axis=-1)):
            new.append(int(tok))
            if new[-1] in stop:
                break
        return new


    def stop_ids(self) -> list[int]:
        """mlx-lm's stop set: its TokenizerWrapper's eos_token_ids (config.json's eos_token_id
        plus the tokenizer's EOS, as mlx_lm.utils.load builds it)."""
        return sorted(_mlx_stop_ids(self.tok, Path(self.model_path)))


def _qk_interleave(a: np.ndarray, head_dim: int) -> np.ndarray:
    """Hugging Face Q/K order -> GGUF order along the last axis (inverse of
    ``gguf_qk_deinterleave``)."""
    n = a.shape[-1]
    b = a.reshape(*a.shape[:-1], n // head_dim, 2, head_dim // 2).swapaxes(-1, -2)
    return np.ascontiguousarray(b).reshape(a.shape)


def _mlx_stop_ids(tok, p: Path) -> set[int]:
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    eos = None
    if p.is_dir() and (p / "config.json").is_file():
        eos = json.loads((p / "config.json").read_text()).get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos
    return {int(x) for x in TokenizerWrapper(tok, eos_token_ids=eos).eos_token_ids}


def load(model: str, dtype: str = "float32", **options) -> MlxReference:
    return MlxReference(model, dtype=dtype, **options)


def load_tokenizer(model: str, **options) -> HfTokenizerSide:
    """Only the tokenizer and chat template, as this reference loads them (for tokcheck):
    transformers' AutoTokenizer (mlx-lm wraps the same one; for a GGUF it has none)."""
    p = Path(model)
    if p.is_file():
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(p))
    return HfTokenizerSide(tok, "transformers AutoTokenizer" + (" from the GGUF" if p.is_file() else ""))
