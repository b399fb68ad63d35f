"""An MLX Llama engine whose LoRA adapter manager is a stub (a lockstep example).

The incident (docs/incidents.md, 4: "LoRA never attached"): after fine-tuning, the model
emitted ``<|endoftext|>`` 512 times out of 512. The adapter manager's ``add_adapter`` only
set a flag: no layer was converted, and nothing complained.

Here ``AdapterManager.add_adapter`` reads the adapter's ``adapter_config.json`` (rank,
alpha, targets: it looks convincing, and the notes report it), records it as active, and
converts no layer. ``load(model, ..., lora=DIR)`` accepts the adapter and the engine runs
the base model: its outputs equal the base model's.

The engine does not declare the protocol's "lora" capability (``lora_inventory`` /
``lora_config``): it has nothing honest to report there (the methods it inherits from
``MlxReference`` would say ``[]`` and ``null``: no LoRA layer, no adapter loaded).
lockstep passes ``lora=DIR`` to a Python engine's ``load`` whenever ``--lora`` is given,
and its adapter-effect check (base vs adapted logits, on the engine itself) is what
catches the stub::

    lockstep bisect --engine python:examples/python/lora_stub.py --model tiny \
        --lora snapshots/adapters/tiny-peft --reference mlx \
        --chat "What is the capital of France?" --steps 3

verdict: "adapter has no effect".
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx_ref
import protocol

PROTOCOL = protocol.declare(name="lora-stub", main_package="mlx", capabilities=[])


class AdapterManager:
    def __init__(self):
        self.adapters: dict[str, dict] = {}
        self.active: str | None = None

    def add_adapter(self, name: str, path: str) -> None:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        self.adapters[name] = {"path": str(path), "r": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
                               "targets": cfg.get("target_modules")}
        self.active = name  # THE BUG: that is all; no LoRALinear replaces any projection


class LoraStub(mlx_ref.MlxReference):
    def __init__(self, model: str, dtype: str = "float32", sites: list[str] | None = None, lora: str | None = None):
        super().__init__(model, dtype=dtype, sites=sites)  # the base model; the adapter goes below
        self.adapter_manager = AdapterManager()
        if lora:
            self.adapter_manager.add_adapter("default", lora)
            a = self.adapter_manager.adapters["default"]
            self.notes.append(f"LoRA adapter 'default' added from {lora} (r={a['r']}, alpha={a['alpha']}, "
                              f"targets {', '.join(a['targets'] or [])})")

    def describe(self) -> dict:
        d = {k: v for k, v in super().describe().items() if k not in mlx_ref.PROTOCOL}
        return {**d, **PROTOCOL}  # this engine's name and capabilities, not the mlx reference's


def load(model_path: str, dtype: str = "float32", sites: list[str] | None = None, lora: str | None = None,
         **options) -> LoraStub:
    return LoraStub(model_path, dtype=dtype, sites=sites, lora=lora)
