"""llama.cpp (through llama-cpp-python) as a lockstep reference.

Loads a GGUF file and computes with llama.cpp's own CPU kernels on the GGUF's own weight
types (quantized matmuls included: llama.cpp quantizes the activations to Q8 for those).

Two llama.cpp contexts share one loaded model:

* the lockstep context, created with the low-level API so that ``cb_eval`` (the graph
  evaluation callback that ``llama-eval-callback`` uses) is set. ``step()`` feeds tokens
  with ``llama_decode`` (all positions as outputs) after everything fed since ``reset()``;
  llama.cpp keeps its KV cache. The callback asks the scheduler for the named graph
  tensors of the sites the harness asked for (``load(..., sites=[...])``; those
  ``_site_of`` knows) and copies them out while they are alive (the graph allocator
  reuses their memory later in the same evaluation);
* the context of a high-level ``llama_cpp.Llama``, used only by ``generate_greedy`` (its
  own ``Llama.generate`` loop), so that generating never touches the lockstep cache.

Layouts. ggml lists dimensions innermost first (``ne = [head_dim, heads, seq]`` is numpy
``(seq, heads, head_dim)``). For rope type NORM (the ``llama`` architecture) the GGUF
converter permuted the rows of Q and K inside each head so that llama.cpp's interleaved
RoPE equals Hugging Face's rotate-half RoPE; q, k, q_rope, k_rope and cache_k are in that
GGUF order and are mapped back with the transform ``gguf-qk-deinterleave``: per head,
GGUF index ``2*i + j`` is HF index ``j*head_dim/2 + i`` (``(hd/2, 2) -> (2, hd/2)``).
V, the attention output and everything else are unaffected by the permutation.
"""
from __future__ import annotations

import ctypes
import importlib.metadata as md
import json
import os
import re
import weakref
from collections import deque
from pathlib import Path

import numpy as np

import llama_cpp
from llama_cpp import _internals
from llama_cpp import llama_cpp as C
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import protocol
from protocol import TRANSFORM_QK, contiguous_f32, gguf_qk_deinterleave

PROTOCOL = protocol.declare(
    name="llamacpp",
    main_package="llama_cpp_python",
    # No "sampler": llama.cpp's samplers are not driven on given logits here. No "lora":
    # llama.cpp takes GGUF LoRA files, not PEFT or mlx-lm adapters.
    capabilities=["generation_config", "chat_render", "tokenizer", "gguf_tokenizer", "bench"],
)



# llama.cpp logs through one process-wide callback. Keep it quiet, but remember the last
# messages so that a load failure can say what llama.cpp said. The ctypes callback object
# must stay referenced as long as llama.cpp may call it: module lifetime.
_LOG_TAIL: deque[str] = deque(maxlen=40)


@C.llama_log_callback
def _quiet_log(level, text, user_data):
    try:
        if level == 4 and text:  # GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3)
            _LOG_TAIL.append(text.decode("utf-8", "replace").rstrip())
    except Exception:
        pass


C.llama_log_set(_quiet_log, ctypes.c_void_p(0))


# -- struct ggml_tensor (ggml.h of the llama.cpp vendored by llama-cpp-python 0.3.x) ---------
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32 = 0, 1, 26


class _GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _load_ggml():
    """libggml-base (where ggml_get_name & co. live), for op names and a layout check."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ["libggml-base.so", "libggml.so", "libggml-base.dylib", "libggml.dylib"]:
        p = lib_dir / name
        if p.exists():
            lib = ctypes.CDLL(str(p))
            try:
                lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
                lib.ggml_op_desc.restype = ctypes.c_char_p
                lib.ggml_get_name.argtypes = [ctypes.c_void_p]
                lib.ggml_get_name.restype = ctypes.c_void_p
                lib.ggml_get_data.argtypes = [ctypes.c_void_p]
                lib.ggml_get_data.restype = ctypes.c_void_p
                lib.ggml_nelements.argtypes = [ctypes.c_void_p]
                lib.ggml_nelements.restype = ctypes.c_int64
                lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
                lib.ggml_nbytes.restype = ctypes.c_size_t
                return lib
            except AttributeError:
                continue
    raise ImportError(f"llamacpp_ref: no libggml with ggml_op_desc under {lib_dir}")


_GGML = _load_ggml()

# Which graph tensors are which site. Names are set by llama.cpp's graph builder
# (``cb(cur, name, il)`` -> "name-il"); several nodes can carry one name (Qcur-N is the
# projection, its reshape and the RoPE output): the site is chosen by name and op, and for
# a site met several times the last node wins (a reshape view holds the same data as the
# matmul it views; a bias add comes after the matmul).
_LAYER_NAME = re.compile(r"^(?P<base>[A-Za-z_]+)-(?P<il>\d+)$")
_CACHE_NAME = re.compile(r"^cache_(?P<kv>[kv])_l(?P<il>\d+) \(view\)$")
_BY_NAME = {
    "attn_norm": "attn_norm",
    "Vcur": "v",
    "kqv_out": "attn",
    "attn_out": "attn_out",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp_gate",
    "ffn_up": "mlp_up",
    "ffn_swiglu": "mlp_act",
    "ffn_geglu": "mlp_act",
    # Gemma 3: q and k normed per head before RoPE, each branch's output normed before the
    # residual add (the un-suffixed `norm` nodes before them are the plain RMS norms).
    "Qcur_normed": "q_norm",
    "Kcur_normed": "k_norm",
    "attn_post_norm": "attn_post_norm",
    "ffn_post_norm": "mlp_post_norm",
    "ffn_gate_par": "mlp_act",
    "ffn_out": "mlp_out",
    "l_out": "out",
    # Sparse MoE (llm_graph_context::build_moe_ffn): the router's logits, the mixture's output
    # (in a MoE graph ffn_out-N is the residual sum after it, not the MLP's output), and the
    # chosen experts (ffn_moe_topk-N, I32) with their renormalised weights
    # (ffn_moe_weights_norm-N), assembled into expert_weights after the decode.
    "ffn_moe_logits": "router",
    "ffn_moe_out": "mlp_out",
    "ffn_moe_topk": "expert_weights#topk",
    "ffn_moe_weights_norm": "expert_weights#w",
}
# `inp_scaled` (Gemma: the embedding times sqrt(hidden)) follows `embd` and wins.
_GLOBAL = {"embd": "embed", "inp_scaled": "embed", "result_norm": "final_norm"}
# The leaves _site_of can name (and logits, read with llama_get_logits).
_LAYER_LEAVES = {v for v in _BY_NAME.values() if "#" not in v} | {"q", "k", "q_rope", "k_rope", "cache_k", "cache_v",
                                                                  "expert_weights"}
_GLOBAL_SITES = set(_GLOBAL.values()) | {"logits"}


def _site_of(name: str, op: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_NAME.match(name)
    if m:
        base, il = m["base"], m["il"]
        if base in ("Qcur", "Kcur"):
            s = base[0].lower()
            return f"layers.{il}.{s}_rope" if op == "ROPE" else f"layers.{il}.{s}"
        site = _BY_NAME.get(base)
        return f"layers.{il}.{site}" if site else None
    m = _CACHE_NAME.match(name)
    if m and op == "VIEW":  # the SET_ROWS writing the cache carries the same name
        return f"layers.{m['il']}.cache_{m['kv']}"
    return None


def _read_tensor(t: _GgmlTensor) -> np.ndarray:
    """A float32 copy of a host tensor, numpy order (ne reversed), strides honoured."""
    if t.type == GGML_TYPE_F32:
        dt = np.dtype(np.float32)
    elif t.type == GGML_TYPE_F16:
        dt = np.dtype(np.float16)
    elif t.type == GGML_TYPE_I32:  # an MoE's expert indices
        dt = np.dtype(np.int32)
    else:
        raise RuntimeError(f"tensor {t.name!r}: ggml type {t.type} is not F32/F16/I32")
    if not t.data:
        raise RuntimeError(f"tensor {t.name!r} has no host data")
    ne = [int(t.ne[i]) for i in range(GGML_MAX_DIMS)]
    nb = [int(t.nb[i]) for i in range(GGML_MAX_DIMS)]
    extent = sum((n - 1) * s for n, s in zip(ne, nb)) + dt.itemsize
    buf = (ctypes.c_char * extent).from_address(t.data)
    a = np.ndarray(shape=tuple(reversed(ne)), dtype=dt, buffer=buf, strides=tuple(reversed(nb)))
    return np.array(a, dtype=np.int32 if t.type == GGML_TYPE_I32 else np.float32, copy=True)


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


_READERS: dict = {}


def gguf_reader(path):
    """The gguf package's reader of `path`, parsed once per file version (size, mtime): it
    parses every metadata array, 9 s for a 262,144-token vocabulary (Gemma 3)."""
    import gguf
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _READERS:
        _READERS.clear()
        _READERS[key] = gguf.GGUFReader(str(path))
    return _READERS[key]


def check_runnable(path: Path) -> None:
    """Refuses a file llama.cpp would abort the whole process on, before handing it over: a
    SentencePiece vocabulary (``tokenizer.ggml.model = llama``) without the 256 byte tokens
    ``<0x00>``..``<0xFF>`` that its byte fallback indexes (llama.cpp: SIGABRT in tokcheck,
    SIGSEGV in a run)."""
    import gguf
    reader = gguf_reader(path)
    model = reader.fields.get("tokenizer.ggml.model")
    if model is None or bytes(model.parts[-1]).decode("utf-8", "replace") != "llama":
        return
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    have = {bytes(tokens.parts[i]).decode("utf-8", "replace") for i in tokens.data} if tokens is not None else set()
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in have]
    if missing:
        raise ValueError(f"{path}: the SentencePiece vocabulary lacks {len(missing)} of the 256 byte tokens "
                         f"<0x00>..<0xFF> (first {missing[0]}), which llama.cpp's byte fallback needs: llama.cpp "
                         "would abort the process on this file, so the llamacpp reference refuses it (re-convert "
                         "the model with its byte tokens)")


# Architectures whose llama.cpp graph runs sliding-window layers, and the default of
# `{arch}.attention.sliding_window_pattern` (llama.cpp's load_swa_pattern: every n-th layer global).
_SWA_ARCHS = {"gemma3": 6}


def llamacpp_windows(path: Path) -> list:
    """The window of each layer as llama.cpp runs the GGUF at `path` (None: global): for an
    architecture of _SWA_ARCHS with `{arch}.attention.sliding_window`, the layers its pattern
    (`{arch}.attention.sliding_window_pattern`, a count or a list of booleans) makes local."""
    import gguf
    r = gguf_reader(path)

    def field(key):
        f = r.fields.get(key)
        return None if f is None else [f.parts[i].tolist()[0] for i in f.data]

    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n = int(field(f"{arch}.block_count")[0])
    window = field(f"{arch}.attention.sliding_window")
    if arch not in _SWA_ARCHS or not window or int(window[0]) == 0:
        return [None] * n
    w = int(window[0])
    pattern = field(f"{arch}.attention.sliding_window_pattern")
    if pattern is not None and len(pattern) == n and n > 1:
        return [w if bool(x) else None for x in pattern]
    every = int(pattern[0]) if pattern else _SWA_ARCHS[arch]
    return [w if i % every < every - 1 else None for i in range(n)]


class LlamaCppTokenizerSide:
    """llama.cpp's own tokenizer (the GGUF's ``tokenizer.ggml.*``, with its ``pre`` type) and
    llama-cpp-python's chat formatter (``Jinja2ChatFormatter``), for tokcheck and the
    generation-config table. Dict-shaped results cross as JSON text."""

    def __init__(self, llm, metadata: dict, source: str):
        self.llm = llm
        self.metadata = metadata
        self.source = source
        self._vocab = C.llama_model_get_vocab(llm._model.model)

    def _encode(self, text: str, add_special: bool) -> list[int]:
        # add_bos=add_special: BOS/EOS as the GGUF says (tokenizer.ggml.add_bos_token);
        # special=True: special tokens written as text are matched, as transformers does.
        if text == "" and not add_special:
            return []
        return [int(x) for x in self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)]

    def tokenize(self, texts: list[str], add_special_tokens: bool) -> str:
        return json.dumps([self._encode(t, add_special_tokens) for t in texts])

    def pieces(self, ids: list[int]) -> str:
        return json.dumps([self.llm._model.token_get_text(int(i)) for i in ids])

    def _token_text(self, t: int) -> str:
        return self.llm._model.token_get_text(t) if t != -1 else ""

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.source}: the GGUF has no tokenizer.chat_template")
        fmt = Jinja2ChatFormatter(template=template,
                                  eos_token=self._token_text(C.llama_vocab_eos(self._vocab)),
                                  bos_token=self._token_text(C.llama_vocab_bos(self._vocab)),
                                  add_generation_prompt=add_generation_prompt)
        return fmt(messages=messages).prompt

    def encode_chat_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        # As transformers' apply_chat_template: the template writes any BOS itself.
        return json.dumps(self._encode(self.render_chat(messages, add_generation_prompt), False))

    def stop_ids(self) -> list[int]:
        """End-of-generation tokens (llama_vocab_is_eog), where llama.cpp's loops stop."""
        n = int(C.llama_vocab_n_tokens(self._vocab))
        return [t for t in range(n) if C.llama_vocab_is_eog(self._vocab, t)]

    def token_info(self) -> str:
        bos, eos = int(C.llama_vocab_bos(self._vocab)), int(C.llama_vocab_eos(self._vocab))
        return json.dumps({
            "bos_id": None if bos == -1 else bos, "bos_token": self._token_text(bos) or None,
            "eos_id": None if eos == -1 else eos, "eos_token": self._token_text(eos) or None,
            "add_bos": bool(C.llama_vocab_get_add_bos(self._vocab)),
            "add_eos": bool(C.llama_vocab_get_add_eos(self._vocab)),
            "chat_template": self.metadata.get("tokenizer.chat_template"),
            "tokenizer": f"llama.cpp vocab (pre={self.metadata.get('tokenizer.ggml.pre', '?')}) ({self.source})",
            "vocab_size": int(C.llama_vocab_n_tokens(self._vocab)),
        })


class LlamaCppReference:
    def __init__(self, model: str, dtype: str = "float32", threads: int | None = 2,
                 n_ctx: int | None = None, n_batch: int = 512, kv_type: str = "f32", sites: list[str] | None = None,
                 context: int | None = None, windows: list | None = None):
        p = Path(model)
        if p.is_dir():
            raise ValueError(f"llama.cpp needs a .gguf file, got a directory: {model}")
        if not p.is_file():
            raise ValueError(f"llama.cpp: model file not found: {model}")
        if dtype != "float32":
            raise ValueError(f"llama.cpp reference: dtype {dtype!r} is not supported (only "
                             "'float32': llama.cpp computes with the GGUF's own weight types)")
        kv_types = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}
        if kv_type not in kv_types:
            raise ValueError(f"llama.cpp reference: kv_type must be one of {sorted(kv_types)}")
        check_runnable(p)
        # `windows` (the config's, as lockstep reads it): llama.cpp must run the same ones. Its
        # graph windows only the architectures that declare it (gemma3); its cache cells stay
        # indexed by position (a full-size SWA cache), the harness keeps a window's last rows.
        if windows is not None:
            ours = llamacpp_windows(p)
            if list(windows) != ours and any(w is not None for w in list(windows) + ours):
                show = lambda ws: ", ".join("global" if w is None else f"window {w}" for w in ws)
                raise ValueError(f"llama.cpp runs this file with layers [{show(ours)}] where lockstep reads "
                                 f"[{show(windows)}]: it would compute another model")
        self.model_path = str(model)
        self.dtype_name = dtype
        self.threads = int(threads or 2)
        # The positions the run feeds (the harness's `context`) size llama.cpp's fixed context;
        # an explicit n_ctx wins; 2048 without either.
        self.n_ctx = int(n_ctx or context or 2048)
        self.n_batch = int(min(n_batch, self.n_ctx))
        self.kv_type = kv_type

        _LOG_TAIL.clear()
        try:
            self.llm = llama_cpp.Llama(
                model_path=self.model_path, n_gpu_layers=0, n_ctx=self.n_ctx,
                n_batch=self.n_batch, n_ubatch=self.n_batch,
                n_threads=self.threads, n_threads_batch=self.threads,
                flash_attn=False, logits_all=False,
                type_k=kv_types[kv_type], type_v=kv_types[kv_type], verbose=False)
        except Exception as e:
            said = "; ".join(m for m in _LOG_TAIL if m)
            raise ValueError(f"llama.cpp could not load {self.model_path}: {e}"
                             + (f" (llama.cpp: {said})" if said else "")) from e

        self._model = self.llm._model.model
        self._vocab = C.llama_model_get_vocab(self._model)
        self.num_layers = int(C.llama_model_n_layer(self._model))
        requested = protocol.requested_sites(sites, self.num_layers, "the llamacpp reference")
        self.sites = [name for name, layer, leaf in requested
                      if (leaf in _LAYER_LEAVES if layer is not None else leaf in _GLOBAL_SITES)]
        self._wanted = set(self.sites)
        self.n_vocab = int(C.llama_vocab_n_tokens(self._vocab))
        self.rope_type = int(C.llama_model_rope_type(self._model))
        # NORM (interleaved) RoPE: the converter permuted Q/K rows; NEOX: HF layout already.
        self.qk_permuted = self.rope_type == C.LLAMA_ROPE_TYPE_NORM
        # ggml multiplies a block-quantized matrix with activations quantized to 8 bits
        # (vec_dot_type Q8_0/Q8_1/Q8_K); F32/F16/BF16 matrices see float activations.
        import gguf
        float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                       gguf.GGMLQuantizationType.BF16}
        self.quantized_activations = any(
            len(t.shape) == 2 and t.tensor_type not in float_types
            for t in gguf_reader(self.model_path).tensors)
        buf = ctypes.create_string_buffer(256)
        C.llama_model_desc(self._model, buf, 256)
        self.model_desc = buf.value.decode("utf-8", "replace")
        self.metadata = dict(self.llm.metadata)
        key_length = self.metadata.get(f"{self.metadata.get('general.architecture', 'llama')}.attention.key_length")
        self.head_dim = (int(key_length) if key_length is not None
                         else int(C.llama_model_n_embd(self._model)) // int(C.llama_model_n_head(self._model)))
        self.tokside = LlamaCppTokenizerSide(self.llm, self.metadata, self.model_path)
        arch = self.metadata.get("general.architecture", "llama")
        self.n_expert = int(self.metadata.get(f"{arch}.expert_count", 0) or 0)
        self.n_expert_used = int(self.metadata.get(f"{arch}.expert_used_count", 0) or 0)

        # The lockstep context: same model, the eval callback set, flash attention off (its
        # fused kernel never materializes the merged-head attention), no other user.
        params = C.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = kv_types[kv_type]
        params.type_v = kv_types[kv_type]
        params.embeddings = False
        params.no_perf = True
        # The ctypes callback must stay referenced while the context lives; it reaches this
        # object through a weak reference so that no cycle delays close() (the contexts must
        # be freed before the model they share).
        me = weakref.ref(self)

        def _callback(ptr, ask, user_data):
            obj = me()
            return obj._eval_callback(ptr, ask, user_data) if obj is not None else not ask

        self._cb = C.ggml_backend_sched_eval_callback(_callback)
        params.cb_eval = self._cb
        params.cb_eval_user_data = None
        self._ctx_params = params
        try:
            self._lctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        except Exception as e:
            said = "; ".join(m for m in _LOG_TAIL if m)
            raise ValueError(f"llama.cpp could not create a context for {self.model_path}: {e}"
                             + (f" (llama.cpp: {said})" if said else "")) from e
        self._ctx = self._lctx.ctx
        self.n_ctx = int(C.llama_n_ctx(self._ctx))
        self._batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)

        self._capturing = False
        self._cap: dict[str, np.ndarray] = {}
        self._cap_meta: dict[str, tuple[str, str, bool]] = {}
        self._cb_error: BaseException | None = None
        self._layout_checked = False
        self._prev_name, self._unnamed = "", {}
        self.reset()
        self._probe_sites()

    def _rope_notes(self) -> list[str]:
        """Which RoPE scaling llama.cpp applies to this file: {arch}.rope.scaling.* from the
        metadata, llama.cpp's per-frequency factors (rope_freqs.weight) from the tensors."""
        arch = self.metadata.get("general.architecture", "llama")
        out = []
        stype = self.metadata.get(f"{arch}.rope.scaling.type")
        if stype and stype != "none":
            factor = self.metadata.get(f"{arch}.rope.scaling.factor")
            out.append(f"RoPE scaling {stype} x{factor} from the GGUF metadata, as llama.cpp computes it")
        import gguf
        names = {t.name for t in gguf_reader(self.model_path).tensors}
        for t in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
            if t in names:
                out.append(f"RoPE per-frequency factors {t}, as llama.cpp applies them")
        return out

    def _probe_sites(self) -> None:
        """Keeps only the sites this architecture's graph gives. llama.cpp's graph builders
        differ per architecture (qwen2's leaves the output projection unnamed; it is found
        as the MUL_MAT right after ``kqv_out-N``), so one token is decoded with every
        candidate site wanted, the sites the graph gave are declared, and the cache is
        cleared again."""
        rc = self._captured_decode([0], 0)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} probing the graph's sites")
        given = set(self._cap)
        self.not_in_graph = sorted({s.rsplit(".", 1)[-1] for s in self._expected_sites() if s not in given})
        self.sites = [s for s in self.sites if s == "logits" or s in given]
        self._wanted = set(self.sites)
        self._cap, self._cap_meta = {}, {}
        self.reset()

    # -- capture ---------------------------------------------------------------------------
    def _check_layout(self, ptr: int, t: _GgmlTensor) -> None:
        # The struct above must match the built ggml: compare with ggml's own accessors.
        name_ok = _GGML.ggml_get_name(ptr) == ptr + _GgmlTensor.name.offset
        data_ok = (_GGML.ggml_get_data(ptr) or 0) == (t.data or 0)
        n = 1
        for i in range(GGML_MAX_DIMS):
            n *= int(t.ne[i])
        if not (name_ok and data_ok and n == _GGML.ggml_nelements(ptr)):
            raise RuntimeError("llamacpp_ref: struct ggml_tensor layout does not match this "
                               f"llama-cpp-python build ({_version('llama_cpp_python')})")
        self._layout_checked = True

    def _eval_callback(self, ptr, ask, user_data):
        # Called by ggml's scheduler for every graph node: ask=True "do you want it?",
        # ask=False "here it is, computed" (returning False there aborts the computation).
        try:
            if not self._capturing or self._cb_error is not None:
                return False if ask else True
            t = _GgmlTensor.from_address(ptr)
            if not self._layout_checked:
                self._check_layout(ptr, t)
            name = t.name.decode("utf-8", "replace")
            op = (_GGML.ggml_op_desc(ptr) or b"").decode()
            site = _site_of(name, op)
            if ask:
                # Some graph builders (qwen2's) leave the output projection unnamed: the
                # MUL_MAT right after kqv_out-N (an auto-named node_K) is layer N's attn_out.
                m = _LAYER_NAME.match(self._prev_name)
                if site is None and op == "MUL_MAT" and name.startswith("node_") and m and m["base"] == "kqv_out":
                    self._unnamed[ptr] = f"layers.{m['il']}.attn_out"
                self._prev_name = name
            if site is None:
                site = self._unnamed.get(ptr)
            if self.n_expert and site is not None and name.startswith("ffn_out-"):
                site = None  # the residual sum after the mixture (its output is ffn_moe_out-N)
            if site is not None and site.split("#")[0] not in self._wanted:
                site = None
            if ask:
                return site is not None
            if site is not None:
                self._cap[site] = _read_tensor(t)
                # a V cache view is transposed (cells innermost) when nb[1] > nb[2]
                self._cap_meta[site] = (name, op, int(t.nb[1]) > int(t.nb[2]))
            return True
        except BaseException as e:  # noqa: BLE001 - cannot raise through C
            self._cb_error = e
            return False if ask else True

    # -- protocol --------------------------------------------------------------------------
    def describe(self) -> dict:
        versions = {k: v for k, v in (("llama_cpp_python", _version("llama_cpp_python")),
                                      ("numpy", _version("numpy")),
                                      ("gguf", _version("gguf"))) if v}
        notes = [
            "llama.cpp computes with the GGUF's own weight types (quantized matmuls quantize "
            "the activations to Q8 first); dtype 'float32' means float32 activations",
            f"KV cache type {self.kv_type}; flash attention off; n_ctx {self.n_ctx}, "
            f"n_batch/n_ubatch {self.n_batch}",
            "sites are read with llama.cpp's graph evaluation callback (cb_eval); "
            "cache_k/cache_v are read from the cache views the attention reads, cells "
            "0..cached_len-1 (one sequence, cell = position; checked each step against "
            "this step's k_rope and v)",
            "logits from llama_get_logits with every fed position marked as output",
            "generate_greedy runs Llama.generate (temp 0 = greedy sampler, repeat_penalty 1) "
            "on a second context of the same model; the lockstep cache is not touched",
        ]
        if self.qk_permuted:
            notes.append(f"q, k, q_rope, k_rope, cache_k mapped from GGUF order with "
                         f"{TRANSFORM_QK}")
        if self.not_in_graph:
            notes.append("not in llama.cpp's graph for this architecture (no named node): "
                         + ", ".join(self.not_in_graph))
        notes += self._rope_notes()
        return {
            **PROTOCOL,
            "versions": versions,
            "model": self.model_path,
            "model_desc": self.model_desc,
            "dtype": self.dtype_name,
            "num_layers": self.num_layers,
            "sites": list(self.sites),
            "transforms": [TRANSFORM_QK] if self.qk_permuted else [],
            "quantized_activations": self.quantized_activations,
            "threads": self.threads,
            "kv_type": self.kv_type,
            "n_ctx": self.n_ctx,
            "context": self.n_ctx,
            "notes": notes,
        }

    def reset(self) -> None:
        mem = C.llama_get_memory(self._ctx)
        if mem is not None:
            C.llama_memory_clear(mem, True)
        self.pos = 0

    def _captured_decode(self, ids: list[int], n_past: int) -> int:
        """One ``llama_decode`` of ``ids`` at ``n_past`` with the eval callback capturing into
        a fresh ``self._cap``; returns llama_decode's code (a callback error is raised)."""
        self._cap, self._cap_meta, self._cb_error = {}, {}, None
        self._prev_name, self._unnamed = "", {}
        self._batch.set_batch(batch=ids, n_past=n_past, logits_all=True)
        self._capturing = True
        try:
            rc = C.llama_decode(self._ctx, self._batch.batch)
        finally:
            self._capturing = False
        if self._cb_error is not None:
            raise RuntimeError(f"llamacpp_ref: eval callback failed: {self._cb_error!r}") from self._cb_error
        self._assemble_expert_weights()
        return rc

    def _assemble_expert_weights(self) -> None:
        """An MoE layer's chosen experts ([k, n_tokens] I32) and their weights ([k, n_tokens])
        -> expert_weights (n_tokens, n_expert), zero where an expert is not chosen."""
        for key in [k for k in self._cap if k.endswith("#topk")]:
            site = key.split("#")[0]
            idx = self._cap.pop(key)
            w = self._cap.pop(f"{site}#w", None)
            if w is None:
                continue
            idx = idx.reshape(-1, self.n_expert_used)
            w = w.reshape(idx.shape)
            dense = np.zeros((idx.shape[0], self.n_expert), dtype=np.float32)
            np.put_along_axis(dense, idx.astype(np.int64), w, axis=-1)
            self._cap[site] = dense

    def _decode_chunk(self, ids: list[int]) -> dict[str, np.ndarray]:
        n = len(ids)
        rc = self._captured_decode(ids, self.pos)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (pos {self.pos}, {n} tokens, n_ctx {self.n_ctx})")
        self.pos += n
        cap = self._cap
        missing = [s for s in self._expected_sites() if s not in cap]
        if missing:
            raise RuntimeError(f"llamacpp_ref: llama.cpp's graph did not give {len(missing)} declared "
                               f"site(s) at pos {self.pos - n}: {missing[:8]}"
                               f"{' ...' if len(missing) > 8 else ''}")
        out = {}
        if "logits" in self._wanted:
            logits = np.ctypeslib.as_array(C.llama_get_logits(self._ctx), shape=(n * self.n_vocab,))
            out["logits"] = logits.reshape(n, self.n_vocab).copy()

        hd = self.head_dim
        for site, a in cap.items():
            kind = site.rsplit(".", 1)[-1]
            if kind in ("q_rope", "k_rope"):
                # ne [hd, heads, seq] -> (seq, heads, hd) -> (heads, seq, hd)
                a = a.reshape(n, -1, hd).transpose(1, 0, 2)
                if self.qk_permuted:
                    a = gguf_qk_deinterleave(a, hd)
            elif kind == "cache_k":
                # ne [hd, kv_heads, n_kv, 1] -> (n_kv, kv_heads, hd) -> (kv_heads, cached, hd)
                a = a.reshape(a.shape[-3], a.shape[-2], a.shape[-1])[: self.pos].transpose(1, 0, 2)
                if self.qk_permuted:
                    a = gguf_qk_deinterleave(a, hd)
            elif kind == "cache_v":
                if not self._cap_meta[site][2]:  # ne [hd, kv_heads, n_kv, 1]
                    a = a.reshape(a.shape[-3], a.shape[-2], a.shape[-1])[: self.pos].transpose(1, 0, 2)
                else:  # transposed (the layout without flash attention): ne [n_kv, kv_heads, hd, 1]
                    a = a.reshape(a.shape[-3], a.shape[-2], a.shape[-1]).transpose(1, 2, 0)[:, : self.pos]
            elif kind in ("q_norm", "k_norm"):
                a = a.reshape(n, -1, hd).transpose(1, 0, 2)  # ne [hd, heads, seq] -> (heads, seq, hd), as q_rope
            else:
                a = a.reshape(n, -1)
                if kind in ("q", "k") and self.qk_permuted:
                    a = gguf_qk_deinterleave(a, hd)
            out[site] = a
        self._check_cache(out, n)
        return out

    def _expected_sites(self) -> list[str]:
        return [s for s in self.sites if s != "logits"]

    def _check_cache(self, out: dict, n: int) -> None:
        # The cache views are read as cells 0..pos-1 = positions 0..pos-1: the newest cells
        # must hold exactly what this step computed (up to the cache type's rounding).
        for i in range(self.num_layers):
            for c, src in (("cache_k", "k_rope"), ("cache_v", "v")):
                if f"layers.{i}.{c}" not in out or f"layers.{i}.{src}" not in out:
                    continue
                got = out[f"layers.{i}.{c}"][:, -n:]
                want = out[f"layers.{i}.{src}"]
                if src == "v":
                    want = want.reshape(n, got.shape[0], got.shape[2]).transpose(1, 0, 2)
                if self.kv_type == "f16":
                    want = want.astype(np.float16).astype(np.float32)
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-6):
                    raise RuntimeError(f"llamacpp_ref: layers.{i}.{c}: the cache cells read do not "
                                       f"hold this step's {src} (cell != position?)")

    def step(self, token_ids: list[int]) -> dict[str, np.ndarray]:
        ids = [int(x) for x in token_ids]
        if not ids:
            raise ValueError("step: no tokens")
        if self.pos + len(ids) > self.n_ctx:
            raise ValueError(f"step: {self.pos} + {len(ids)} tokens exceed llama.cpp's n_ctx "
                             f"{self.n_ctx} (load with a larger n_ctx)")
        parts = []
        for s in range(0, len(ids), self.n_batch):
            parts.append(self._decode_chunk(ids[s: s + self.n_batch]))
        if len(parts) == 1:
            out = parts[0]
        else:
            out = {}
            for site in parts[0]:
                kind = site.rsplit(".", 1)[-1]
                if kind in ("cache_k", "cache_v"):
                    out[site] = parts[-1][site]
                elif kind in ("q_rope", "k_rope"):
                    out[site] = np.concatenate([p[site] for p in parts], axis=1)
                else:
                    out[site] = np.concatenate([p[site] for p in parts], axis=0)
        return {k: contiguous_f32(v) for k, v in out.items()}

    def encode_prompt(self, text: str) -> list[int]:
        # add_special: BOS/EOS as the GGUF says (tokenizer.ggml.add_bos_token / add_eos_token)
        return [int(x) for x in self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.model_path}: the GGUF has no tokenizer.chat_template")
        bos, eos = C.llama_vocab_bos(self._vocab), C.llama_vocab_eos(self._vocab)
        fmt = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
            add_generation_prompt=True)
        prompt = fmt(messages=messages).prompt
        # As transformers' apply_chat_template: the template writes any BOS itself.
        return [int(x) for x in self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)]

    # -- tokenizer, template, generation config (no sampler parity: llama.cpp's samplers are
    # not driven on given logits here, and the report says so) -----------------------------
    def tokenize(self, texts: list[str], add_special_tokens: bool) -> str:
        return self.tokside.tokenize(texts, add_special_tokens)

    def pieces(self, ids: list[int]) -> str:
        return self.tokside.pieces(ids)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokside.render_chat(messages, add_generation_prompt)

    def encode_chat_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokside.encode_chat_messages(messages, add_generation_prompt)

    def token_info(self) -> str:
        return self.tokside.token_info()

    def generation_config(self, params: dict, max_new_tokens: int | None) -> str:
        info = json.loads(self.tokside.token_info())
        info.update({"stop_ids": self.tokside.stop_ids(), "max_new_tokens": max_new_tokens,
                     "sampler": None,
                     "generator": "llama.cpp llama_sampler_init_dist(seed) (not driven in lockstep)"})
        return json.dumps(info)

    def generate_greedy(self, token_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        ids = [int(x) for x in token_ids]
        # The last token generated is never fed: prompt + max_new_tokens - 1 positions.
        if len(ids) + max_new_tokens - 1 > self.n_ctx:
            raise ValueError(f"generate_greedy: {len(ids)} + {max_new_tokens} tokens exceed "
                             f"llama.cpp's n_ctx {self.n_ctx}")
        stops = {int(s) for s in stop_ids}
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        self.llm.reset()  # no prefix reuse from an earlier call: every call from scratch
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0,
                                     repeat_penalty=1.0, frequency_penalty=0.0,
                                     presence_penalty=0.0, reset=True):
            out.append(int(tok))
            if int(tok) in stops or len(out) >= max_new_tokens:
                break
        self.llm.reset()
        return out

    def close(self) -> None:
        for obj in ("_batch", "_lctx"):
            o = getattr(self, obj, None)
            if o is not None:
                o.close()
                setattr(self, obj, None)
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def load(model: str, **options) -> LlamaCppReference:
    return LlamaCppReference(model, **options)


def load_tokenizer(model: str, **options) -> LlamaCppTokenizerSide:
    """Only llama.cpp's vocabulary (vocab_only=True: no weights), for tokcheck."""
    p = Path(model)
    if not p.is_file():
        raise ValueError(f"llama.cpp needs a .gguf file, got: {model}")
    check_runnable(p)
    llm = llama_cpp.Llama(model_path=str(p), vocab_only=True, verbose=False)
    return LlamaCppTokenizerSide(llm, dict(llm.metadata), str(p))
