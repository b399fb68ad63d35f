"""A transformers engine for a model the bundled engine does not run (a lockstep example).

lockstep's own engine runs Llama, Qwen2 and Mixtral; your engine may run anything. This one
runs any decoder-only model transformers ships, on PyTorch (here the committed tiny Qwen3,
whose per-head q/k RMSNorm the bundled engine does not have), and lockstep checks it against
the references at the sites every decoder has: ``embed``, each layer's cache and output,
``final_norm``, ``logits``. The model is described by the engine under test and its config,
never by the bundled engine's list of families::

    lockstep run --engine python:examples/python/hf_engine.py --model snapshots/models/tiny-qwen3 \\
        --reference transformers,mlx --prompt "The capital of France is" --steps 4

Its bug switch is a second factory, ``load_dropped_residual``: layer ``BUG_LAYER``'s forward
returns its output without the residual stream it was given (``out - x``: the skip connection
around the block is lost), the kind of slip a port of a new architecture makes when it
rewrites a block. It is an option of this engine's real forward (the layer's own ``forward``
is wrapped), not a second copy of the model, and bisect names the layer's ``out``::

    lockstep bisect --engine python:examples/python/hf_engine.py:load_dropped_residual \\
        --model snapshots/models/tiny-qwen3 --reference transformers --prompt "The capital of France is"
"""
from __future__ import annotations

import protocol
import transformers_ref

PROTOCOL = protocol.declare(name="hf-engine", main_package="transformers", capabilities=[])

# The layer whose residual the bug switch drops.
BUG_LAYER = 1


class HfEngine(transformers_ref.TransformersReference):
    def __init__(self, model: str, dtype: str = "float32", sites: list[str] | None = None, drop_residual_of: int | None = None):
        super().__init__(model, dtype=dtype, sites=sites)
        self.engine_notes: list[str] = []
        if drop_residual_of is not None:
            self._drop_residual(drop_residual_of)

    def _drop_residual(self, i: int) -> None:
        layer = self.model.model.layers[i]
        forward = layer.forward

        def without_residual(hidden_states, *args, **kwargs):
            out = forward(hidden_states, *args, **kwargs)
            if isinstance(out, tuple):  # decoder layers of older transformers return (hidden, ...)
                return (out[0] - hidden_states, *out[1:])
            return out - hidden_states

        layer.forward = without_residual  # inside nn.Module.__call__: the capture hooks see it
        self.engine_notes.append(f"bug switch on: layer {i} returns its output without its residual input")

    def describe(self) -> dict:
        d = {k: v for k, v in super().describe().items() if k not in transformers_ref.PROTOCOL}
        d["notes"] = d["notes"] + self.engine_notes
        return {**d, **PROTOCOL}  # this engine's name and capabilities, not the transformers reference's


def load(model_path: str, dtype: str = "float32", sites: list[str] | None = None, lora: str | None = None,
         **options) -> HfEngine:
    if lora:
        raise ValueError("hf-engine: this example takes no LoRA adapter")
    return HfEngine(model_path, dtype=dtype, sites=sites)


def load_dropped_residual(model_path: str, dtype: str = "float32", sites: list[str] | None = None,
                          lora: str | None = None, **options) -> HfEngine:
    """The same engine with its bug switch on: layer BUG_LAYER drops its residual."""
    if lora:
        raise ValueError("hf-engine: this example takes no LoRA adapter")
    return HfEngine(model_path, dtype=dtype, sites=sites, drop_residual_of=BUG_LAYER)
