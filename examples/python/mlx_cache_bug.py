"""An MLX Llama engine that drops the KV cache after the prompt (a lockstep example).

The incident (docs/incidents.md, 1: "Context dropped after the prompt"): a custom
generation loop fed the whole prompt at step 0, then only the newest token at each later
step, but the model it called ignored the cache it was passed, so from step 1 every decode
step saw one token of context and produced fluent nonsense.

The bug here is in the model wrapper, ``ForgetfulModel``: its ``__call__(inputs, cache)``
runs the mlx-lm model on a fresh ``make_prompt_cache`` and then writes those fresh caches
into the caller's list. The caller's loop looks right (it keeps one cache list and passes
it every step), and the prompt step is right; every later step starts from an empty cache:
its RoPE position is 0 and its attention sees only itself.

Everything else (loading, site capture, the step loop, tokenizer) is the mlx reference's
own (``references/mlx_ref.py``), which a lockstep engine is free to reuse. The sites it
returns are the reference's; ``layers.N.cache_k`` / ``cache_v`` are read from the cache the
model actually used: after step 1 they hold 1 position where the reference holds
prompt_len + 1.

Catch it with::

    lockstep bisect --engine python:examples/python/mlx_cache_bug.py --model tiny \
        --reference mlx --prompt "The capital of France is" --steps 4

Step 0 matches everywhere; at step 1 the cache holds 1 position vs prompt_len + 1 in the
reference: "context is dropped after the prompt".
"""
from __future__ import annotations

from mlx_lm.models.cache import make_prompt_cache

import mlx_ref
import protocol

PROTOCOL = protocol.declare(name="mlx-cache-bug", main_package="mlx", capabilities=[])


class ForgetfulModel:
    """Wraps an mlx-lm model. THE BUG: ``__call__`` ignores the cache it is given."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # args, layers, model, make_cache, ...: the inner model's
        return getattr(self.inner, name)

    def __call__(self, inputs, cache=None, **kwargs):
        fresh = make_prompt_cache(self.inner)       # should have been: cache
        out = self.inner(inputs, cache=fresh, **kwargs)
        if cache is not None:
            cache[:] = fresh                        # the caller now holds what was used
        return out


class MlxCacheBug(mlx_ref.MlxReference):
    def __init__(self, model: str, dtype: str = "float32", sites: list[str] | None = None, lora: str | None = None):
        super().__init__(model, dtype=dtype, sites=sites, lora=lora)
        self.model = ForgetfulModel(self.model)  # step() and generate_greedy() both call it
        self.notes.append("model wrapped in ForgetfulModel: each call runs on a fresh cache (the bug)")

    def describe(self) -> dict:
        d = {k: v for k, v in super().describe().items() if k not in mlx_ref.PROTOCOL}
        return {**d, **PROTOCOL}  # this engine's name and capabilities, not the mlx reference's


def load(model_path: str, dtype: str = "float32", sites: list[str] | None = None, lora: str | None = None,
         **options) -> MlxCacheBug:
    return MlxCacheBug(model_path, dtype=dtype, sites=sites, lora=lora)
