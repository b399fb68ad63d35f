"""LoRA adapter directories for the references: reading either format, converting one into
the other, and the per-module inventory every side reports.

Formats: PEFT (``adapter_config.json`` + ``adapter_model.safetensors``) and mlx-lm
(``adapter_config.json`` + ``adapters.safetensors``). Each reference loads an adapter of
its own library's format with that library's own loader (``peft.PeftModel.from_pretrained``,
``mlx_lm.tuner.utils.load_adapters``); an adapter of the other format is converted here
first (``to_peft_dir``) or attached module by module with the library's LoRA layer.

Conventions: PEFT holds ``lora_A (r, in)``, ``lora_B (out, r)`` and the scale
``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); mlx-lm holds ``lora_a (in, r)``,
``lora_b (r, out)`` and ``scale`` as written, on the last ``num_layers`` layers
(``model.layers[-max(num_layers, 0):]``). The inventory is always in PEFT's convention.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

PROJ_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj",
              # Mixtral's router (mlx-lm's default LoRA keys include it); transformers 5 names
              # the module mlp.gate (ROUTER_PATHS).
              "gate": "block_sparse_moe.gate"}
# Where each library keeps the router of a layer (checkpoint / mlx-lm, transformers 5).
ROUTER_PATHS = ("block_sparse_moe.gate", "mlp.gate")


def module_of(layer, proj: str):
    """The module of projection ``proj`` in a decoder layer (attribute paths, torch or MLX),
    None when the layer has none (a dense layer's router, an MoE layer's gate_proj)."""
    for path in ROUTER_PATHS if proj == "gate" else (PROJ_PATHS[proj],):
        m = layer
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if m is not None:
            return m, path
    return None, None


def adapter_format(path: str | Path) -> str:
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{p}: no adapter_config.json (not a LoRA adapter directory)")
    peft, mlx = (p / "adapter_model.safetensors").is_file(), (p / "adapters.safetensors").is_file()
    if peft == mlx:
        raise ValueError(f"{p}: expected exactly one of adapter_model.safetensors (PEFT) and "
                         "adapters.safetensors (mlx-lm)")
    return "peft" if peft else "mlx"


def _canon(name: str) -> str:
    if name == "mlp.gate" or name.endswith(".mlp.gate"):
        return "gate"
    for short, path in PROJ_PATHS.items():
        if name in (short, path) or name.endswith("." + path):
            return short
    raise ValueError(f"target module {name!r} matches no projection of a Llama layer")


def read(path: str | Path, num_layers: int) -> dict:
    """{format, rank, scale, targets, layers, pairs: {(layer, proj): (A (r, in), B (out, r))}}
    in float32, PEFT convention, Hugging Face Q/K order."""
    from safetensors.numpy import load_file
    p = Path(path)
    fmt = adapter_format(p)
    cfg = json.loads((p / "adapter_config.json").read_text())
    pairs: dict = {}
    if fmt == "peft":
        r = int(cfg["r"])
        scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        targets = sorted({_canon(t) for t in cfg["target_modules"]})
        lt = cfg.get("layers_to_transform")
        layers = list(range(num_layers)) if lt is None else sorted({lt} if isinstance(lt, int) else set(lt))
        t = load_file(str(p / "adapter_model.safetensors"))
        for i in layers:
            for m in targets:
                k = f"base_model.model.model.layers.{i}.{PROJ_PATHS[m]}"
                if f"{k}.lora_A.weight" in t:
                    pairs[(i, m)] = (t[f"{k}.lora_A.weight"].astype(np.float32),
                                     t[f"{k}.lora_B.weight"].astype(np.float32))
    else:
        lp = cfg["lora_parameters"]
        r, scale = int(lp["rank"]), float(lp["scale"])
        keys = lp.get("keys")
        targets = sorted({_canon(k) for k in keys}) if keys else list(PROJ_PATHS)
        n = int(cfg["num_layers"])
        layers = list(range(num_layers))[-max(n, 0):]
        t = load_file(str(p / "adapters.safetensors"))
        for i in layers:
            for m in targets:
                k = f"model.layers.{i}.{PROJ_PATHS[m]}"
                if f"{k}.lora_a" in t:
                    pairs[(i, m)] = (t[f"{k}.lora_a"].astype(np.float32).T.copy(),
                                     t[f"{k}.lora_b"].astype(np.float32).T.copy())
    return {"format": fmt, "rank": r, "scale": float(scale), "targets": targets, "layers": layers, "pairs": pairs}


def to_peft_dir(ad: dict, out: Path) -> Path:
    """Writes ``ad`` (from ``read``) as a PEFT adapter directory; lora_alpha = scale * r."""
    from safetensors.numpy import save_file
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ad["rank"], "lora_alpha": ad["scale"] * ad["rank"],
           "lora_dropout": 0.0, "bias": "none", "target_modules": ad["targets"],
           "layers_to_transform": ad["layers"], "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    t = {}
    for (i, m), (a, b) in ad["pairs"].items():
        k = f"base_model.model.model.layers.{i}.{PROJ_PATHS[m]}"
        t[f"{k}.lora_A.weight"], t[f"{k}.lora_B.weight"] = a, b
    save_file(t, str(out / "adapter_model.safetensors"))
    return out


def entry(module: str, a: np.ndarray, b: np.ndarray, dtype: str, scale: float) -> dict:
    """One inventory entry; ``a (r, in)``, ``b (out, r)``. The checksums (sum and norm) do not
    depend on the Q/K row order."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return {"module": module, "a_shape": list(a.shape), "b_shape": list(b.shape), "dtype": dtype,
            "rank": int(a.shape[0]), "scale": float(scale),
            "a_sum": float(a64.sum()), "a_norm": float(np.sqrt((a64 * a64).sum())),
            "b_sum": float(b64.sum()), "b_norm": float(np.sqrt((b64 * b64).sum()))}
