"""The reference dequantizer for `lockstep quant-check`: the `gguf` package's
`gguf.quants.dequantize`, the numpy port of ggml's `dequantize_row_*` functions that
llama.cpp's own conversion scripts use.

`open(path)` returns a reader; `tensors()` lists (name, type name, ggml dims) in file
order and `dequantize(name)` returns the tensor as a flat, C-contiguous float32 array in
ggml's element order (dimension 0 fastest), the order the engine's dequantizer uses too.
"""

from __future__ import annotations

import numpy as np

import protocol

PROTOCOL = protocol.declare(name="gguf", main_package="gguf", capabilities=["dequantize"])


class QuantReference:
    def __init__(self, path: str):
        import gguf

        self._gguf = gguf
        self.reader = gguf.GGUFReader(path)
        self.by_name = {t.name: t for t in self.reader.tensors}

    def versions(self) -> dict:
        import importlib.metadata as md

        return {"gguf": md.version("gguf"), "numpy": np.__version__}

    def tensors(self) -> list[tuple[str, str, list[int]]]:
        return [(t.name, t.tensor_type.name, [int(x) for x in t.shape]) for t in self.reader.tensors]

    def dequantize(self, name: str) -> np.ndarray:
        t = self.by_name[name]
        a = self._gguf.quants.dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(a, dtype=np.float32).reshape(-1)


def open(path: str) -> QuantReference:  # noqa: A001 - the protocol's entry point name
    return QuantReference(path)
