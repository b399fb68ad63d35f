"""SmolLM2's weights under RoPE-scaling configs, in the model store (issue 34).

A config variant of real weights is a fair real-weights test of RoPE scaling: every side
computes the same model. This makes, once, in ``$LOCKSTEP_MODELS/rope-variants/``:

  smollm2-llama3/    rope llama3, factor 8, low/high frequency factors 1/4, original context 512
  smollm2-dynamic/   rope dynamic (NTK), factor 8, max_position_embeddings 512 (so 4096 served)

each a Hugging Face directory: the dequantized SmolLM2-135M-Instruct Q4_1 (float32, made by
``references/dequant_store.py`` from the GGUF, shared with the MLX reference) by symlink, and its
own config.json with the scaling in transformers 5's ``rope_parameters`` form. The original
context (512) is short enough that a 1,000-token prompt runs past it (the nightly suite's
``smollm2-rope`` matrix; aliases ``smollm2-llama3``, ``smollm2-dynamic``).

    python scripts/rope_variants.py SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "references"))
import dequant_store  # noqa: E402

ORIGINAL = 512
VARIANTS = {
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL}, None),
    "dynamic": ({"rope_type": "dynamic", "factor": 8.0}, ORIGINAL),
}


def make(gguf: Path) -> list[Path]:
    src, _ = dequant_store.hf_dir_for(gguf)
    base = json.loads((src / "config.json").read_text())
    theta = (base.get("rope_parameters") or {}).get("rope_theta") or base.get("rope_theta")
    out = []
    for name, (scaling, max_pos) in VARIANTS.items():
        d = dequant_store.store_dir() / "rope-variants" / f"smollm2-{name}"
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.name in ("config.json", dequant_store.MANIFEST):
                continue
            link = d / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(f)
        cfg = dict(base)
        cfg.pop("rope_scaling", None)
        cfg["rope_theta"] = theta
        cfg["rope_parameters"] = {"rope_theta": theta, **scaling}
        if max_pos is not None:
            cfg["max_position_embeddings"] = max_pos
        (d / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        out.append(d)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/rope_variants.py SmolLM2-135M-Instruct.Q4_1.gguf")
    for d in make(Path(sys.argv[1])):
        print(d)
