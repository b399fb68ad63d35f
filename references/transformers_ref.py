"""Hugging Face transformers (PyTorch) as a lockstep reference.

Loads a Hugging Face directory, or a GGUF file through ``gguf_file=`` (transformers
dequantizes it to float32 and undoes GGUF's Q/K row permutation, so everything here is
in the Hugging Face layout). Of the site names the harness gives ``load``, it captures
those its model has: with forward hooks on the modules of ``hooks.LAYER_HOOKS`` /
``hooks.GLOBAL_HOOKS`` (and ``lm_head`` for the logits); the post-RoPE q/k, which no module
outputs, by wrapping ``apply_rotary_pos_emb`` of the modeling module that defines the
model's attention class (``modeling_llama``, ``modeling_qwen2``, ...); cache contents are
read from the ``DynamicCache`` after each step.

A LoRA adapter (``lora=DIR``) is attached with ``peft.PeftModel.from_pretrained`` (unmerged
``peft`` LoRA layers, injected into the model in place, so hooks and ``generate`` see them);
an mlx-lm adapter is first converted to a PEFT directory (``lora_adapter.to_peft_dir``:
transposed matrices, ``lora_alpha = scale * r``, ``layers_to_transform`` = its last layers).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader uses tqdm directly

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import hooks
import lora_adapter
import protocol
from protocol import contiguous, hf_encode_chat, hf_encode_prompt
from sampling import HfSideMixin, HfTokenizerSide, TransformersSampling

PROTOCOL = protocol.declare(
    name="transformers",
    main_package="transformers",
    capabilities=["lora", "generation_config", "sampler", "chat_render", "tokenizer", "bench"],
    # transformers 5.x's LogitsProcessorList order (sampling.TransformersSampling.order).
    sampler_order=["rep_penalty", "temperature", "top_k", "top_p", "min_p"],
    sampler_rep_window=None,  # the penalty looks at every previous token
)

# Progress bars and load-time advice go to a terminal the harness owns; keep them out.
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()



# Post-RoPE q/k: no module returns them, so the function the attention calls is wrapped in
# the modeling module that defines the attention class (where its forward looks it up),
# once per process and module; it records into the reference that is stepping (several
# instances, e.g. float32 and float64, can live in one process).
_ACTIVE = None


def _install_rope_wrapper(attention) -> None:
    modeling = sys.modules.get(type(attention).__module__)
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None:
        raise ValueError(f"the transformers reference: {type(attention).__module__} (which defines "
                         f"{type(attention).__name__}) has no apply_rotary_pos_emb, so the post-RoPE q/k "
                         "(q_rope, k_rope) of this model cannot be captured")
    if getattr(original, "_lockstep_wrapped", False):
        return

    def wrapped(q, k, *args, **kwargs):
        q2, k2 = original(q, k, *args, **kwargs)
        ref = _ACTIVE
        if ref is not None and ref._capturing and ref._current_layer is not None:
            i = ref._current_layer
            ref._put(f"layers.{i}.q_rope", q2)
            ref._put(f"layers.{i}.k_rope", k2)
        return q2, k2

    wrapped._lockstep_wrapped = True
    modeling.apply_rotary_pos_emb = wrapped


def _expert_weights(router_out) -> torch.Tensor:
    """(seq, n_experts) from a MoE router's (logits, top-k weights, top-k indices): each
    position's weight per expert, zero for the experts it is not routed to."""
    logits, weights, indices = router_out
    return torch.zeros(logits.shape, dtype=weights.dtype).scatter(-1, indices, weights)


def _np(t: torch.Tensor) -> np.ndarray:
    # .numpy() shares the tensor's buffer: the harness reads torch's own memory. float64
    # stays float64 (the oracle's extra digits must reach the comparison).
    t = t.detach()
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return contiguous(t.contiguous().numpy(), np.float64 if t.dtype == torch.float64 else np.float32)


class TransformersReference(HfSideMixin):
    def __init__(self, model: str, dtype: str = "float32", threads: int | None = None,
                 attn_implementation: str = "eager", lora: str | None = None, sites: list[str] | None = None,
                 context: int | None = None, windows: list | None = None):
        # `context`: transformers' DynamicCache grows with the sequence; no fixed context to size.
        # `windows`: transformers reads them from the config itself (lockstep reads them as it
        # does); its sliding layers keep the last W - 1 positions, the canonical form.
        if threads:
            torch.set_num_threads(int(threads))
        self.model_path = model
        self.dtype_name = dtype
        torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        p = Path(model)
        kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
        self.load_notes: list[str] = []
        if p.is_file():
            src, extra = str(p.parent), dict(gguf_file=p.name)
            kwargs["config"] = self._gguf_config(p)
        else:
            src, extra = str(p), {}
        self.tok = AutoTokenizer.from_pretrained(src, **extra)
        self.model = AutoModelForCausalLM.from_pretrained(src, **kwargs, **extra).eval()
        # Sampling and generation config as this model's generate() resolves them.
        self.tokside = HfTokenizerSide(self.tok, "AutoTokenizer" + (" from the GGUF" if extra else ""))
        self.sampling = TransformersSampling(self.model)
        self.attn_implementation = attn_implementation
        cfg = self.model.config
        rp = getattr(cfg, "rope_parameters", None) or {}
        types = {rp.get("rope_type")} if "rope_type" in rp else {v.get("rope_type") for v in rp.values() if isinstance(v, dict)}
        scaled = sorted(t for t in types if t and t != "default")
        if scaled:
            self.load_notes.append(f"RoPE scaling {', '.join(scaled)}, as transformers computes it (modeling_rope_utils)"
                                   + ("; the dynamic base is reset to the original at each reset and generate" if "dynamic" in scaled else ""))
        self.num_layers = cfg.num_hidden_layers
        self.lora_path = lora
        self.lora_how = None
        if lora:
            self._attach_lora(lora, torch_dtype)
        self._capturing = False
        self._current_layer = None
        self._out: dict[str, torch.Tensor] = {}
        self._install_hooks(protocol.requested_sites(sites, self.num_layers, "the transformers reference"))
        self.reset()

    def _gguf_config(self, p: Path):
        """The model config transformers' GGUF loader reads from the file, with the head width
        the file states where that loader leaves its config class's default: transformers 5's
        mapping for ``qwen3`` does not read ``qwen3.attention.key_length`` (its qwen3_moe,
        gemma2/3 mappings do), so a Qwen3 GGUF whose heads are not 128 wide would load as
        another model (every attention matrix re-initialised)."""
        import gguf
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        reader = gguf.GGUFReader(str(p))
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[-1]).decode() if arch_field else ""
        # transformers' GGUF loader reads no RoPE scaling: neither llama.cpp's per-frequency
        # tensors nor {arch}.rope.scaling.*. Run unscaled, the model would agree with a scaled
        # engine up to the original context and drift after: refused instead.
        scaled = sorted(t.name for t in reader.tensors
                        if t.name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"))
        stype = reader.fields.get(f"{arch}.rope.scaling.type")
        stype = bytes(stype.parts[-1]).decode() if stype is not None else "none"
        if stype != "none":
            scaled.append(f"{arch}.rope.scaling.type = {stype}")
        rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        if scaled and rope_type == "default":
            raise ValueError(f"{p}: the file scales its RoPE ({', '.join(scaled)}), which transformers' GGUF loader "
                             "does not read (it would run the model unscaled): use the Hugging Face checkpoint with "
                             "the transformers reference, or --reference llamacpp for this file")
        if arch == "gemma3":
            self._gemma3_as_llamacpp(cfg, reader)
        key = reader.fields.get(f"{arch}.attention.key_length")
        if key is not None and hasattr(cfg, "head_dim"):
            width = int(key.parts[-1][0])
            if cfg.head_dim != width:
                self.load_notes.append(f"transformers' GGUF loader does not read {arch}.attention.key_length: "
                                       f"head_dim set to the file's {width} (the loader left {cfg.head_dim})")
                cfg.head_dim = width
        return cfg

    def _gemma3_as_llamacpp(self, cfg, reader) -> None:
        """A gemma3 GGUF holds no query_pre_attn_scalar and may hold keys transformers' GGUF
        loader does not read (its pattern of local layers, the local RoPE base, a final
        soft-cap): the config is set as llama.cpp reads the file (its defaults where the file is
        silent), so that both references compute the model the file defines."""
        import numpy as np

        def value(key):
            f = reader.fields.get(key)
            return None if f is None else [np.asarray(f.parts[i]).tolist()[0] for i in f.data]

        n, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        head_dim = (value("gemma3.attention.key_length") or [cfg.head_dim])[0]
        # llama.cpp: 1/sqrt(head_dim), except the 62-layer 27B's 1/sqrt(hidden / heads).
        qpas = cfg.hidden_size / heads if n == 62 else head_dim
        changed = []
        if cfg.query_pre_attn_scalar != qpas:
            changed.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} -> {qpas:g}")
            cfg.query_pre_attn_scalar = qpas
        pattern = value("gemma3.attention.sliding_window_pattern")
        if pattern is not None:
            swa = [bool(x) for x in pattern] if len(pattern) == n and n > 1 else \
                  [i % int(pattern[0]) < int(pattern[0]) - 1 for i in range(n)]
            types = ["sliding_attention" if x else "full_attention" for x in swa]
            if types != list(cfg.layer_types):
                changed.append("layer_types from gemma3.attention.sliding_window_pattern")
                cfg.layer_types = types
        local = value("gemma3.rope.freq_base_swa")
        rp = getattr(cfg, "rope_parameters", None)
        if local is not None and isinstance(rp, dict) and "sliding_attention" in rp:
            if rp["sliding_attention"].get("rope_theta") != float(local[0]):
                changed.append(f"local RoPE base -> {local[0]:g} (gemma3.rope.freq_base_swa)")
                rp["sliding_attention"]["rope_theta"] = float(local[0])
        cap = value("gemma3.final_logit_softcapping")
        if cap is not None and cap[0] and cfg.final_logit_softcapping != cap[0]:
            changed.append(f"final_logit_softcapping -> {cap[0]:g}")
            cfg.final_logit_softcapping = float(cap[0])
        if changed:
            self.load_notes.append("gemma3 GGUF read as llama.cpp reads it: " + "; ".join(changed))

    def _attach_lora(self, path: str, torch_dtype):
        from peft import PeftModel
        # peft 0.21 calls a transformers method that transformers 5.23 marks as deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        fmt = lora_adapter.adapter_format(path)
        src, how = path, "peft.PeftModel.from_pretrained"
        ad = lora_adapter.read(path, self.model.config.num_hidden_layers)
        router = {k: v for k, v in ad["pairs"].items() if k[1] == "gate"}
        if fmt == "mlx" or router:
            self._tmp = tempfile.TemporaryDirectory(prefix="lockstep-peft-")
            rest = dict(ad, pairs={k: v for k, v in ad["pairs"].items() if k[1] != "gate"},
                        targets=[t for t in ad["targets"] if t != "gate"])
            src = str(lora_adapter.to_peft_dir(rest, Path(self._tmp.name)))
            if fmt == "mlx":
                how += " (mlx-lm adapter converted to PEFT form: transposed, lora_alpha = scale * r)"
        # transformers 5's Mixtral router (MixtralTopKRouter, mlp.gate) is not a Linear that peft
        # can wrap: its adapter is merged into the router weight (W + s B A), as peft's
        # merge_and_unload would (the engine's unmerged sum differs by float rounding only).
        self._router_lora = {}
        for (i, _m), (a, b) in sorted(router.items()):
            mod, _ = lora_adapter.module_of(self.model.model.layers[i], "gate")
            if mod is None:
                raise ValueError(f"{path}: the adapter targets layers.{i}.gate, which this model lacks")
            with torch.no_grad():
                mod.weight += ad["scale"] * torch.from_numpy(b @ a).to(mod.weight.dtype)
            self._router_lora[i] = (a, b, ad["scale"])
        if router:
            how += f"; the router adapter (layers {sorted(self._router_lora)}) merged into mlp.gate.weight"
        self.peft = PeftModel.from_pretrained(self.model, src, is_trainable=False)
        # peft keeps float32 adapter weights; an f64 oracle computes them in float64 too.
        self.model.to(torch_dtype)
        self.model.eval()
        self.lora_how = how

    def lora_inventory(self) -> str:
        """JSON list of the LoRA modules this side holds (PEFT convention)."""
        out = []
        for i, layer in enumerate(self.model.model.layers):
            for m, path in lora_adapter.PROJ_PATHS.items():
                if m == "gate" and i in getattr(self, "_router_lora", {}):
                    a, b, sc = self._router_lora[i]
                    out.append(lora_adapter.entry(f"layers.{i}.gate", a, b, "float32", float(sc)))
                    continue
                mod, _ = lora_adapter.module_of(layer, m)
                la, lb = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
                if la is None or "default" not in la:
                    continue
                a = la["default"].weight.detach().to(torch.float64).numpy()
                b = lb["default"].weight.detach().to(torch.float64).numpy()
                dt = str(la["default"].weight.dtype).removeprefix("torch.")
                out.append(lora_adapter.entry(f"layers.{i}.{m}", a, b, dt, float(mod.scaling["default"])))
        return json.dumps(out)

    def lora_config(self) -> str:
        """JSON: how the adapter was loaded and its effective configuration."""
        if not self.lora_path:
            return json.dumps(None)
        c = self.peft.peft_config["default"]
        return json.dumps({"loader": self.lora_how, "peft": md.version("peft"), "r": c.r, "lora_alpha": c.lora_alpha,
                           "use_rslora": c.use_rslora, "target_modules": sorted(c.target_modules),
                           "layers_to_transform": c.layers_to_transform})

    # -- capture ---------------------------------------------------------------------------
    def _put(self, name, t):
        if self._capturing and name in self._wanted:
            self._out[name] = t[0] if t.dim() >= 3 and t.shape[0] == 1 else t

    def _install_hooks(self, requested):
        """Hooks for the requested sites this model has; ``self.sites`` lists them."""
        m = self.model.model
        hook = lambda name: (lambda mod, inp, out: self._put(name, out[0] if isinstance(out, tuple) else out))
        pre = lambda name: (lambda mod, args: self._put(name, args[0]))
        got: set[str] = set()

        def attach(root, table, wanted):
            for mod, sides in hooks.plan(root, table, wanted).values():
                if hooks.INPUT in sides:
                    mod.register_forward_pre_hook(pre(sides[hooks.INPUT]))
                if hooks.OUTPUT in sides:
                    mod.register_forward_hook(hook(sides[hooks.OUTPUT]))
                got.update(sides.values())

        by_layer: dict[int, dict[str, str]] = {}
        glob: dict[str, str] = {}
        for name, layer, leaf in requested:
            (glob if layer is None else by_layer.setdefault(layer, {}))[leaf] = name
        attach(m, hooks.GLOBAL_HOOKS, glob)
        if "logits" in glob:
            self.model.lm_head.register_forward_hook(hook("logits"))
            got.add("logits")
        self._cache_sites = []
        for i, layer in enumerate(m.layers):
            wanted = by_layer.get(i, {})
            attach(layer, hooks.LAYER_HOOKS, wanted)
            ew = wanted.get(hooks.EXPERT_WEIGHTS)
            router = hooks.submodule(layer, "mlp.gate")
            if ew and router is not None and hasattr(router, "top_k"):
                # transformers 5's MixtralTopKRouter returns (logits, top-k weights, top-k
                # indices): the weights it applies, scattered into (seq, n_experts).
                router.register_forward_hook(lambda mod, inp, out, name=ew: self._put(name, _expert_weights(out)))
                got.add(ew)
            rope = [wanted[s] for s in hooks.ROPE_SITES if s in wanted]
            if rope:
                attention = hooks.submodule(layer, hooks.ATTENTION)
                _install_rope_wrapper(attention)
                attention.register_forward_pre_hook(lambda mod, args, kwargs, i=i: self._set_layer(i), with_kwargs=True)
                got.update(rope)
            k, v = (wanted.get(s) for s in hooks.CACHE_SITES)
            if k or v:
                self._cache_sites.append((i, k, v))
                got.update(x for x in (k, v) if x)
        self.sites = [name for name, _, _ in requested if name in got]
        self._wanted = set(self.sites)

    def _set_layer(self, i):
        self._current_layer = i

    # -- protocol --------------------------------------------------------------------------
    def describe(self) -> dict:
        versions = {}
        for pkg in ["torch", "transformers", "accelerate", "gguf", "numpy", "tokenizers"] + (["peft"] if self.lora_path else []):
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                pass
        return {
            **PROTOCOL,
            "versions": versions,
            "model": self.model_path,
            "dtype": self.dtype_name,
            "attn_implementation": self.attn_implementation,
            "num_layers": self.num_layers,
            "sites": list(self.sites),
            "threads": torch.get_num_threads(),
            "notes": self.load_notes + ([f"LoRA adapter {self.lora_path}: {self.lora_how}, unmerged"] if self.lora_path else []),
        }

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.pos = 0
        self._reset_rope()

    def _reset_rope(self) -> None:
        """transformers' dynamic-NTK RoPE keeps the base grown by the longest sequence it has
        seen (``dynamic_rope_update``: it grows, and shrinks back only below the original
        length), so a run after a longer one would rotate with another base: every rotary
        embedding is put back to its original frequencies, as a fresh model has them."""
        for m in self.model.modules():
            if hasattr(m, "original_inv_freq") and hasattr(m, "max_seq_len_cached") and hasattr(m, "original_max_seq_len"):
                m.inv_freq = m.original_inv_freq.clone()
                m.max_seq_len_cached = m.original_max_seq_len

    def step(self, token_ids: list[int]) -> dict[str, np.ndarray]:
        ids = torch.tensor([token_ids], dtype=torch.long)
        n = len(token_ids)
        global _ACTIVE
        self._out = {}
        self._capturing = True
        _ACTIVE = self
        try:
            with torch.no_grad():
                result = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                                    position_ids=torch.arange(self.pos, self.pos + n).unsqueeze(0),
                                    cache_position=torch.arange(self.pos, self.pos + n))
            if "logits" in self._out and getattr(self.model.config, "final_logit_softcapping", None):
                # `logits` is what the model returns: after the soft-cap its forward applies to
                # lm_head's output (Gemma), which the lm_head hook saw before it.
                self._out["logits"] = result.logits[0]
        finally:
            self._capturing = False
            self._current_layer = None
            _ACTIVE = None
        self.pos += n
        out = {k: _np(v) for k, v in self._out.items()}
        self._out = {}  # the captured tensors live on in `out` only (a copy where one was made)
        for i, k_site, v_site in self._cache_sites:
            k, v = self._cache_layer(i)
            if k_site:
                out[k_site] = _np(k[0])
            if v_site:
                out[v_site] = _np(v[0])
        return out

    def _cache_layer(self, i):
        c = self.cache
        if hasattr(c, "layers"):
            return c.layers[i].keys, c.layers[i].values
        return c.key_cache[i], c.value_cache[i]

    def encode_prompt(self, text: str) -> list[int]:
        return hf_encode_prompt(self.tok, text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return hf_encode_chat(self.tok, messages)

    def generate_greedy(self, token_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        ids = torch.tensor([token_ids], dtype=torch.long)
        self._reset_rope()  # a fresh model's RoPE, whatever the steps before grew
        # A long prompt is prefilled in pieces (generate's own prefill_chunk_size): eager
        # attention over n positions in one call holds heads x n x n scores (6,000 tokens of
        # SmolLM2: 1.3 GB per layer).
        chunk = GENERATE_PREFILL_CHUNK if len(token_ids) > GENERATE_PREFILL_CHUNK else None
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=list(stop_ids) or None,
                                      pad_token_id=(stop_ids[0] if stop_ids else 0),
                                      temperature=None, top_p=None, top_k=None,
                                      prefill_chunk_size=chunk)
        return [int(x) for x in out[0, len(token_ids):]]


# The free-running check's prefill: prompts longer than this go in pieces of this many tokens.
GENERATE_PREFILL_CHUNK = 512


def load(model: str, **options) -> TransformersReference:
    return TransformersReference(model, **options)


def load_tokenizer(model: str, **options) -> HfTokenizerSide:
    """Only the tokenizer and chat template, as this reference loads them (for tokcheck)."""
    p = Path(model)
    src, extra = (str(p.parent), dict(gguf_file=p.name)) if p.is_file() else (str(p), {})
    side = HfTokenizerSide(AutoTokenizer.from_pretrained(src, **extra),
                           "AutoTokenizer" + (" from the GGUF" if extra else ""))
    return side
