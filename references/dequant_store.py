"""A GGUF's weights as a dequantized Hugging Face directory, made once into the model store.

MLX's GGUF loader reads F32/F16/BF16 and keeps Q4_0/Q4_1/Q8_0 quantized; it has no K-quants
(Q4_K, Q5_K, Q6_K, ...) and no Q5_0/Q5_1. For such a file (the Q4_K_M Qwen2.5-0.5B mixes Q4_K,
Q5_0, Q6_K and Q8_0) the mlx reference runs the same weights from a Hugging Face directory
instead: transformers' GGUF loader (``from_pretrained(gguf_file=...)``, which dequantizes with
gguf-py to float32 and undoes the Llama Q/K row permutation) loads it, and its float32 weights
are written as safetensors with the config (``save_pretrained`` refuses a GGUF-loaded model),
plus the tokenizer transformers builds from the GGUF.

Where: ``$LOCKSTEP_MODELS/hf-dequant/<sha256 of the GGUF>/`` (else ``~/.cache/lockstep/models``),
with ``lockstep-dequant.json`` naming the source file, its size and sha256 and the package
versions that made it. The directory is made once (a minute and ~4 bytes per parameter of
disk for a 0.5B model) and reused by every later run; it is written under a temporary name
and renamed when complete, so an interrupted run leaves nothing that looks finished.

``python references/dequant_store.py MODEL.gguf`` makes it ahead of time and prints its path.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a progress bar

MANIFEST = "lockstep-dequant.json"


def store_dir() -> Path:
    env = os.environ.get("LOCKSTEP_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "lockstep" / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def hf_dir_for(gguf: Path, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> tuple[Path, bool]:
    """(the dequantized directory of ``gguf``, whether this call made it)."""
    gguf = Path(gguf).resolve()
    sha = sha256_file(gguf)
    out = store_dir() / "hf-dequant" / sha
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{manifest}: unreadable ({e}); delete {out} and run again") from e
        if m.get("sha256") != sha:
            raise ValueError(f"{manifest}: records sha256 {m.get('sha256')}, the GGUF has {sha}; delete {out}")
        return out, False

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    log(f"dequant_store: making the dequantized Hugging Face directory of {gguf.name} once, in {out} "
        "(transformers' GGUF loader, float32; later runs reuse it)")
    tmp = out.parent / f"{sha}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model ("quantized with gguf and is not
        # serializable"): the weights are plain float32 tensors by now, so write them and the
        # config (without its gguf quantization_config) directly. A tied head is stored as
        # Hugging Face checkpoints store it: the embedding only (safetensors' save_model would
        # keep whichever name of the shared tensor it meets first, lm_head.weight).
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        model.config.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = cfg["dtype"] = "float32"
        # transformers 5 writes the RoPE base under rope_parameters only; mlx-lm reads rope_theta.
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            cfg.setdefault("rope_theta", theta)
        cfg_path.write_text(json.dumps(cfg, indent=1) + "\n")
        del model
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps({
            "source": gguf.name,
            "size": gguf.stat().st_size,
            "sha256": sha,
            "dtype": "float32",
            "made_by": {p: md.version(p) for p in ("transformers", "torch", "gguf")},
        }, indent=1) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / MANIFEST).is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python references/dequant_store.py MODEL.gguf")
    path, made = hf_dir_for(Path(sys.argv[1]))
    print(path)
