"""An MLX engine whose sliding-window ring never evicts when a call feeds more than one token
(a lockstep example; the bug class of mlx-lm issue 1914).

A sliding-window layer keeps a ring of its last W positions. Fed one token at a time, the
ring here is right: the new row overwrites the oldest. Fed several at once (a prompt in
pieces, `--prefill-chunk`; a speculative verify), ``EagerRing._update_concat`` appends them
without first dropping the positions the window no longer sees, and the mask it builds for
the call assumes a window's worth of keys: the queries of the call then see positions older
than their window. Everything is right while the sequence is shorter than the window, and
wrong from the first multi-token call after it fills.

Everything else (loading, site capture, the step loop, tokenizer) is the mlx reference's
own (``references/mlx_ref.py``). Catch it with::

    lockstep bisect --engine python:examples/python/mlx_ring_bug.py \
        --model snapshots/models/tiny-mistral-mixed --reference transformers \
        --prompt "the quick brown fox jumps over the lazy dog and the cat sleeps by the warm fire" \
        --prefill-chunk 4 --steps 2

The first piece past the window (positions 8-11) fails at layer 0's attention, the first
window layer, and bisect names the span the engine attended over.
"""
from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache

import mlx_ref
import protocol

PROTOCOL = protocol.declare(name="mlx-ring-bug", main_package="mlx", capabilities=[])


class EagerRing(RotatingKVCache):
    """mlx-lm's rotating cache. THE BUG: a multi-token update keeps every position it holds."""

    def _update_concat(self, keys, values):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = self._temporal_order(self.keys)
            self.values = self._temporal_order(self.values)
            # should have been: drop the positions before the window (mlx-lm's _trim)
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        self._idx = self.keys.shape[2]
        return self.keys, self.values

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        if N > 1 and self.keys is not None:
            # The ring is taken to hold its window, so the call's queries are masked causally
            # over whatever it holds (mlx-lm's mask assumes max_size - 1 positions before).
            held = self.keys.shape[2]
            return "causal" if not return_array else mx.tril(mx.ones((N, held + N), dtype=mx.bool_), k=held)
        return super().make_mask(N, window_size=window_size, return_array=return_array)


class MlxRingBug(mlx_ref.MlxReference):
    def reset(self) -> None:
        super().reset()
        for i, c in enumerate(self.cache):
            if type(c) is RotatingKVCache:
                self.cache[i] = EagerRing(max_size=c.max_size, keep=c.keep)

    def describe(self) -> dict:
        d = {k: v for k, v in super().describe().items() if k not in mlx_ref.PROTOCOL}
        return {**d, **PROTOCOL, "notes": d.get("notes", []) + ["window rings are EagerRing: no eviction on a multi-token update (the bug)"]}


def load(model_path: str, dtype: str = "float32", sites: list[str] | None = None, lora: str | None = None,
         **options) -> MlxRingBug:
    return MlxRingBug(model_path, dtype=dtype, sites=sites, lora=lora)
