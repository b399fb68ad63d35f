"""The references' own sampling code, driven on logits the harness gives them.

lockstep never re-implements a reference's sampler on the Python side: each function here
builds the reference's own objects and runs them on the engine's logits, so the harness
can compare the engine's processed distribution (after all filters) with what the
reference would sample from.

- transformers: the ``LogitsProcessorList`` that ``GenerationMixin._get_logits_processor``
  builds from a ``GenerationConfig`` resolved like ``generate()`` resolves it
  (``_prepare_generation_config``: user kwargs > the model's generation_config > global
  defaults), applied to float32 scores; the distribution is ``softmax(scores)``, what
  ``_sample`` hands to ``torch.multinomial``. Order (transformers 5.x):
  RepetitionPenalty -> Temperature -> TopK -> TopP -> MinP.
- mlx-lm: ``make_logits_processors`` (repetition penalty over the last
  ``repetition_context_size`` = 20 tokens) on the logits, ``logits - logsumexp`` as
  ``generate_step`` does, then the chain of ``make_sampler``: top-p -> min-p -> top-k on the
  log-probabilities at temperature 1, and only then ``categorical_sampling(x, temp)``,
  which samples ``softmax(x * (1/temp))``. To read that distribution instead of a sample,
  ``categorical_sampling`` is swapped for a function that returns its argument while the
  sampler runs (``make_sampler`` looks it up as a module global at call time).

Sampler parameters cross as a dict: temperature (0 = greedy), top_k (0 = off), top_p
(1 = off), min_p (0 = off), rep_penalty (1 = off), seed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json

import numpy as np

OFF = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "rep_penalty": 1.0, "seed": None}


def normalize(params: dict | None) -> dict:
    p = dict(OFF)
    p.update({k: v for k, v in (params or {}).items() if v is not None})
    p["temperature"] = float(p["temperature"])
    p["top_k"] = int(p["top_k"])
    p["top_p"] = float(p["top_p"])
    p["min_p"] = float(p["min_p"])
    p["rep_penalty"] = float(p["rep_penalty"])
    return p


def one_hot(n: int, i: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float64)
    out[i] = 1.0
    return out


def template_sha(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- transformers ------------------------------------------------------------------------------

_HF_ORDER = ["rep_penalty", "temperature", "top_k", "top_p", "min_p"]
_HF_CLASS = {"RepetitionPenaltyLogitsProcessor": "rep_penalty", "TemperatureLogitsWarper": "temperature",
             "TopKLogitsWarper": "top_k", "TopPLogitsWarper": "top_p", "MinPLogitsWarper": "min_p"}


def _hf_shim():
    """A ``GenerationMixin`` without a model: ``_get_logits_processor`` and
    ``_prepare_generation_config`` only read ``self.config`` and ``self.generation_config``."""
    from transformers import GenerationConfig, PretrainedConfig
    from transformers.generation.utils import GenerationMixin

    class _Shim(GenerationMixin):
        def __init__(self):
            self.config = PretrainedConfig()
            self.generation_config = GenerationConfig()

    return _Shim()


class TransformersSampling:
    """transformers' sampling, for a loaded model (its generation_config counts) or none."""

    def __init__(self, model=None):
        import torch  # noqa: F401  (fail early, naming the package)
        self.owner = model if model is not None else _hf_shim()

    def kwargs(self, params: dict, max_new_tokens: int | None) -> dict:
        """Everything lockstep asks for, passed explicitly (nothing left to defaults)."""
        p = normalize(params)
        greedy = p["temperature"] == 0.0
        kw = dict(do_sample=not greedy, repetition_penalty=p["rep_penalty"])
        if not greedy:
            kw.update(temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"],
                      min_p=(p["min_p"] if p["min_p"] > 0 else None))
        else:
            kw.update(temperature=None, top_k=None, top_p=None, min_p=None)
        if max_new_tokens is not None:
            kw["max_new_tokens"] = int(max_new_tokens)
        return kw

    def resolve(self, **kwargs):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gc, _ = self.owner._prepare_generation_config(None, **kwargs)
        return gc

    def processors(self, params: dict, n_input: int):
        gc = self.resolve(**self.kwargs(params, None))
        return gc, self.owner._get_logits_processor(generation_config=gc, input_ids_seq_length=n_input,
                                                    device="cpu")

    def distribution(self, logits: np.ndarray, prev: list[int], params: dict) -> np.ndarray:
        import torch
        gc, procs = self.processors(params, len(prev))
        scores = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).reshape(1, -1).clone()
        ids = torch.tensor([list(prev) or []], dtype=torch.long).reshape(1, -1)
        with torch.no_grad():
            scores = procs(ids, scores)
        if not gc.do_sample:
            return one_hot(scores.shape[-1], int(torch.argmax(scores[0])))
        return torch.softmax(scores[0], dim=-1).to(torch.float64).numpy()

    def order(self, params: dict) -> list[str]:
        """The stages transformers would run for these parameters, in its order (read from
        the processor list it builds)."""
        _, procs = self.processors(params, 1)
        return [_HF_CLASS.get(type(p).__name__, type(p).__name__) for p in procs]

    def config(self, params: dict, max_new_tokens: int | None) -> dict:
        p = normalize(params)
        gc = self.resolve(**self.kwargs(p, max_new_tokens))
        # What generate() would use for everything --sampler left unset.
        given = {"do_sample": p["temperature"] > 0}
        if p["temperature"] > 0:
            given["temperature"] = p["temperature"]
        for k, hf in [("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"), ("rep_penalty", "repetition_penalty")]:
            if params and params.get(k) is not None:
                given[hf] = p[k]
        unset = self.resolve(**given)
        hidden = {}
        if p["temperature"] > 0:
            for k in ["top_k", "top_p", "min_p", "repetition_penalty", "typical_p"]:
                v = getattr(unset, k, None)
                off = {"top_k": 0, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0, "typical_p": 1.0}[k]
                if k not in given and v is not None and v != off and not (k == "min_p" and v == 0):
                    hidden[k] = v
        if max_new_tokens is not None and unset.max_new_tokens is None:
            hidden["max_length"] = unset.max_length
        eos = gc.eos_token_id
        eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
        return {
            "temperature": float(gc.temperature) if gc.do_sample and gc.temperature is not None else 0.0,
            "top_k": int(gc.top_k or 0) if gc.do_sample else 0,
            "top_p": float(gc.top_p if gc.top_p is not None else 1.0) if gc.do_sample else 1.0,
            "min_p": float(gc.min_p or 0.0) if gc.do_sample else 0.0,
            "rep_penalty": float(gc.repetition_penalty or 1.0),
            "rep_window": None,
            "order": self.order(p),
            "max_new_tokens": gc.max_new_tokens,
            "stop_ids": eos,
            "generator": "torch.manual_seed(seed) + torch.multinomial",
            "defaults_if_unset": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in hidden.items()},
        }


# -- mlx-lm ------------------------------------------------------------------------------------

MLX_REPETITION_CONTEXT = 20  # make_logits_processors' default repetition_context_size


class MlxSampling:
    def __init__(self):
        import mlx.core  # noqa: F401

    @staticmethod
    @contextlib.contextmanager
    def _capture():
        """While active, make_sampler's final ``categorical_sampling(x, temp)`` returns the
        logits it would sample from instead of a sample."""
        from mlx_lm import sample_utils
        real = sample_utils.categorical_sampling
        seen = []

        def capture(logits, temp):
            out = logits * (1.0 / temp)  # exactly what categorical_sampling samples from
            seen.append(out)
            return out

        sample_utils.categorical_sampling = capture
        try:
            yield seen
        finally:
            sample_utils.categorical_sampling = real

    def distribution(self, logits: np.ndarray, prev: list[int], params: dict) -> np.ndarray:
        import mlx.core as mx
        from mlx_lm.sample_utils import make_logits_processors, make_sampler
        p = normalize(params)
        x = mx.array(np.ascontiguousarray(logits, dtype=np.float32))[None]
        procs = make_logits_processors(
            repetition_penalty=(p["rep_penalty"] if p["rep_penalty"] != 1.0 else None),
            repetition_context_size=MLX_REPETITION_CONTEXT)
        tokens = mx.array([int(t) for t in prev], dtype=mx.int32)
        for proc in procs:
            x = proc(tokens, x)
        logprobs = x - mx.logsumexp(x, keepdims=True)  # as generate_step
        sampler = make_sampler(temp=p["temperature"], top_p=p["top_p"], min_p=p["min_p"], top_k=p["top_k"])
        if p["temperature"] == 0.0:
            tok = sampler(logprobs)
            return one_hot(logprobs.shape[-1], int(tok.item()))
        with self._capture() as seen:
            sampler(logprobs)
        if len(seen) != 1:
            raise RuntimeError("mlx_lm's sampler did not call categorical_sampling once: "
                               "sample_utils changed, update references/sampling.py")
        probs = mx.softmax(seen[0][0], axis=-1)
        mx.eval(probs)
        return np.array(probs, dtype=np.float64)

    @staticmethod
    def order(params: dict) -> list[str]:
        # make_sampler's chain (mlx_lm/sample_utils.py): top_p, min_p, (xtc), top_k, then
        # categorical_sampling at the temperature; processors run on the logits before.
        p = normalize(params)
        out = []
        if p["rep_penalty"] != 1.0:
            out.append("rep_penalty")
        if p["temperature"] == 0.0:
            return out
        if 0 < p["top_p"] < 1.0:
            out.append("top_p")
        if p["min_p"] != 0.0:
            out.append("min_p")
        if p["top_k"] > 0:
            out.append("top_k")
        out.append("temperature")
        return out

    def config(self, params: dict, max_new_tokens: int | None) -> dict:
        p = normalize(params)
        return {
            "temperature": p["temperature"],
            "top_k": p["top_k"] if p["temperature"] > 0 else 0,
            "top_p": p["top_p"] if p["temperature"] > 0 and 0 < p["top_p"] < 1.0 else 1.0,
            "min_p": p["min_p"] if p["temperature"] > 0 else 0.0,
            "rep_penalty": p["rep_penalty"],
            "rep_window": MLX_REPETITION_CONTEXT if p["rep_penalty"] != 1.0 else None,
            "order": self.order(p),
            "max_new_tokens": max_new_tokens,
            "generator": "mx.random.seed(seed) + mx.random.categorical (np.random.seed has no effect)",
            "defaults_if_unset": {"temp": "0.0 (greedy)", "repetition_context_size": MLX_REPETITION_CONTEXT,
                                  "max_tokens": 256},
        }


# -- tokenizer side (transformers tokenizers; also what the mlx reference uses) ----------------

def _pre_tokenizer(t) -> str:
    bt = getattr(t, "backend_tokenizer", None)
    pre = getattr(bt, "pre_tokenizer", None) if bt is not None else None
    return str(pre).split("(")[0] if pre is not None else "none"


class HfTokenizerSide:
    """Tokenizer, chat template and special-token facts of a transformers tokenizer, for
    ``lockstep tokcheck`` and the generation-config table."""

    def __init__(self, tok, source: str, generation_eos: list[int] | None = None):
        self.tok = tok
        self.source = source
        self.generation_eos = generation_eos

    def tokenize(self, texts: list[str], add_special_tokens: bool) -> str:
        out = [[int(x) for x in self.tok(t, add_special_tokens=add_special_tokens)["input_ids"]] for t in texts]
        return json.dumps(out)

    def pieces(self, ids: list[int]) -> str:
        return json.dumps([str(x) if x is not None else None for x in self.tok.convert_ids_to_tokens([int(i) for i in ids])])

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def encode_chat_messages(self, messages: list[dict], add_generation_prompt: bool) -> str:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return json.dumps([int(x) for x in out])

    def token_info(self) -> str:
        t = self.tok
        probe = [int(x) for x in t("a")["input_ids"]]
        bare = [int(x) for x in t("a", add_special_tokens=False)["input_ids"]]
        add_bos = t.bos_token_id is not None and len(probe) > len(bare) and probe[0] == t.bos_token_id
        add_eos = t.eos_token_id is not None and len(probe) > len(bare) and probe[-1] == t.eos_token_id
        tmpl = t.chat_template if isinstance(t.chat_template, str) else None
        return json.dumps({
            "bos_id": t.bos_token_id, "bos_token": t.bos_token,
            "eos_id": t.eos_token_id, "eos_token": t.eos_token,
            "add_bos": bool(add_bos), "add_eos": bool(add_eos),
            "chat_template": tmpl,
            "tokenizer": f"{type(t).__name__} ({self.source}), pre-tokenizer {_pre_tokenizer(t)}",
            "vocab_size": len(t),
        })


class HfSideMixin:
    """Protocol methods for a reference whose tokenizer is a transformers tokenizer
    (``self.tokside``) and whose sampler is ``self.sampling``. Dict-shaped results cross as
    JSON text."""

    tokside: HfTokenizerSide
    sampling: object

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

    def sample_distribution(self, logits: np.ndarray, prev: list[int], params: dict) -> np.ndarray:
        return np.ascontiguousarray(self.sampling.distribution(logits, prev, params), dtype=np.float64)

    def generation_config(self, params: dict, max_new_tokens: int | None) -> str:
        info = json.loads(self.tokside.token_info())
        cfg = self.sampling.config(params, max_new_tokens)
        stop = cfg.pop("stop_ids", None)
        if not stop:
            stop = sorted(self.stop_ids()) if hasattr(self, "stop_ids") else ([info["eos_id"]] if info["eos_id"] is not None else [])
        info.update(cfg)
        info["stop_ids"] = [int(x) for x in stop]
        info["seed"] = normalize(params).get("seed")
        return json.dumps(info)
