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

A third factory, ``load_old_row_rewritten``, switches on a cache bug that leaves every step's
own rows right: at each decode step, layer ``BUG_LAYER``'s cache update also writes the new
position's keys and values over an old position (``OLD_ROW``: a slot index computed from the
wrong length, as ring-buffer and compaction slips do). What the step appends is right; the
cache it keeps, and what later steps attend over, is not. lockstep compares at each step the
rows it appended and, in turn, 32 earlier ones (every earlier row of a short prompt), and a
step where anything fails with every row, so the rewritten row is caught at the step that
rewrote it::

    lockstep run --engine python:examples/python/hf_engine.py:load_old_row_rewritten \\
        --model snapshots/models/tiny-qwen3 --reference transformers --prompt "The capital of France is"

``load_far_row_rewritten`` does the same at ``FAR_ROW``, beyond the earlier rows a decode step
after a longer prompt compares on its own: the step still fails (attention reads the rewritten
row), and its whole-cache comparison names the cache.
"""
from __future__ import annotations

import protocol
import transformers_ref

PROTOCOL = protocol.declare(name="hf-engine", main_package="transformers", capabilities=[])

# The layer whose residual (or whose cache, with the cache bug) the bug switches break.
BUG_LAYER = 1
# The old position the cache bug overwrites at each decode step.
OLD_ROW = 1
# The row ``load_far_row_rewritten`` overwrites: past the first earlier rows lockstep compares at
# a decode step of a long prompt (its sweep), so only the failing step's whole-cache
# comparison finds it there.
FAR_ROW = 120


class HfEngine(transformers_ref.TransformersReference):
    def __init__(self, model: str, dtype: str = "float32", sites: list[str] | None = None, drop_residual_of: int | None = None,
                 rewrite_old_row_of: tuple[int, int] | None = None):
        self.engine_notes: list[str] = []
        self.rewrite_old_row_of = rewrite_old_row_of
        super().__init__(model, dtype=dtype, sites=sites)
        if drop_residual_of is not None:
            self._drop_residual(drop_residual_of)
        if rewrite_old_row_of is not None:
            self.engine_notes.append(f"bug switch on: at each decode step, layer {rewrite_old_row_of[0]}'s cache update "
                                     f"also overwrites position {rewrite_old_row_of[1]} with the new position")

    def reset(self) -> None:
        super().reset()
        if self.rewrite_old_row_of is not None:
            layer, row = self.rewrite_old_row_of
            self._rewrite_old_row(self.cache.layers[layer], row)

    @staticmethod
    def _rewrite_old_row(layer, row: int) -> None:
        """Layer's cache update, with the slot slip: a one-token update after a cached prefix
        longer than ``row`` also lands on ``row``."""
        update = layer.update

        def slipped(key_states, value_states, *args, **kwargs):
            keys, values = update(key_states, value_states, *args, **kwargs)
            if key_states.shape[-2] == 1 and keys.shape[-2] > row + 1:
                layer.keys[..., row, :] = key_states[..., 0, :]
                layer.values[..., row, :] = value_states[..., 0, :]
            return layer.keys, layer.values

        layer.update = slipped

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


def load_old_row_rewritten(model_path: str, dtype: str = "float32", sites: list[str] | None = None,
                           lora: str | None = None, **options) -> HfEngine:
    """The same engine with its cache bug on: layer BUG_LAYER's decode steps overwrite OLD_ROW."""
    if lora:
        raise ValueError("hf-engine: this example takes no LoRA adapter")
    return HfEngine(model_path, dtype=dtype, sites=sites, rewrite_old_row_of=(BUG_LAYER, OLD_ROW))


def load_far_row_rewritten(model_path: str, dtype: str = "float32", sites: list[str] | None = None,
                           lora: str | None = None, **options) -> HfEngine:
    """The same cache bug at FAR_ROW (a prompt longer than FAR_ROW + 1 tokens shows it)."""
    if lora:
        raise ValueError("hf-engine: this example takes no LoRA adapter")
    return HfEngine(model_path, dtype=dtype, sites=sites, rewrite_old_row_of=(BUG_LAYER, FAR_ROW))
