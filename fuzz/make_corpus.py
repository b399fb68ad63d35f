"""Writes the fuzz targets' seed corpus, fuzz/corpus/<target>/, from the committed fixtures.

Deterministic (a second run changes nothing). Run with the reference environment's Python
(it uses the `gguf` and `safetensors` packages):

    $LOCKSTEP_VENV/bin/python fuzz/make_corpus.py

Files named `regress-*` are inputs the fuzzers found (each one a bug, now fixed): this script
keeps them. Kept small (well under 2 MB): GGUF seeds are a micro model written here (complete: the whole
load runs) and the fixtures' headers and tensor tables with their tensor data cut off.
"""

import json
import struct
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from safetensors.numpy import save

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "snapshots" / "models"
ADAPTERS = ROOT / "snapshots" / "adapters"
TRACES = ROOT / "snapshots" / "traces"
SUITES = ROOT / "scripts" / "suites"
OUT = ROOT / "fuzz" / "corpus"


def put(target: str, name: str, data: bytes) -> None:
    """Writes a seed, unless the target already has one with the same bytes."""
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    if any(p.read_bytes() == data for p in d.iterdir()):
        return
    (d / name).write_bytes(data)


def gguf_header_len(data: bytes) -> int:
    """Where a GGUF's tensor data starts (v3, default alignment 32)."""
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16

    def string(pos):
        (n,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + n

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def value(pos, t):
        if t == 8:
            return string(pos)
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                pos = value(pos, et)
            return pos
        return pos + sizes[t]

    for _ in range(n_kv):
        pos = string(pos)
        (t,) = struct.unpack_from("<I", data, pos)
        pos = value(pos + 4, t)
    for _ in range(n_tensors):
        pos = string(pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * nd + 4 + 8
    return (pos + 31) // 32 * 32


def micro_gguf(name: str, alignment=None, arch="llama", experts=0) -> bytes:
    """A complete 1-layer Llama (hidden 8, 2 heads, vocabulary of 8 byte-level tokens)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f".{name}.tmp"
    w = GGUFWriter(str(path), arch)
    h, ff, vocab, heads, kv = 8, 16, 8, 2, 1
    hd = h // heads
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    tokens = ["a", "b", "Ġ", "ab", "Ġa", "<s>", "</s>", "!"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1, 1, 1, 1, 1, 3, 3, 1])
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(5)
    w.add_eos_token_id(6)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<s>{{ m.role }} {{ m.content }}</s>{% endfor %}")
    rng = np.random.default_rng(0)
    t = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    w.add_tensor("token_embd.weight", t(vocab, h))
    w.add_tensor("blk.0.attn_norm.weight", t(h))
    w.add_tensor("blk.0.attn_q.weight", t(heads * hd, h))
    w.add_tensor("blk.0.attn_k.weight", t(kv * hd, h))
    w.add_tensor("blk.0.attn_v.weight", t(kv * hd, h))
    w.add_tensor("blk.0.attn_output.weight", t(h, heads * hd))
    w.add_tensor("blk.0.ffn_norm.weight", t(h))
    if experts:
        w.add_tensor("blk.0.ffn_gate_inp.weight", t(experts, h))
        w.add_tensor("blk.0.ffn_gate_exps.weight", t(experts, ff, h))
        w.add_tensor("blk.0.ffn_up_exps.weight", t(experts, ff, h))
        w.add_tensor("blk.0.ffn_down_exps.weight", t(experts, h, ff))
    else:
        w.add_tensor("blk.0.ffn_gate.weight", t(ff, h))
        w.add_tensor("blk.0.ffn_up.weight", t(ff, h))
        w.add_tensor("blk.0.ffn_down.weight", t(h, ff))
    w.add_tensor("output_norm.weight", t(h))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.unlink()
    return data


def main() -> None:
    # Seeds named regress-* are inputs the fuzzer found (a bug, fixed): kept, never regenerated.
    for p in sorted(OUT.rglob("*")) if OUT.exists() else []:
        if p.is_file() and not p.name.startswith("regress-"):
            p.unlink()

    # gguf: micro models (complete), the fixtures' headers (tensor data cut to 64 bytes).
    put("gguf", "micro-llama.gguf", micro_gguf("a"))
    put("gguf", "micro-llama-align64.gguf", micro_gguf("b", alignment=64))
    put("gguf", "micro-moe.gguf", micro_gguf("c", experts=4))
    for f in sorted(MODELS.glob("*.gguf")):
        data = f.read_bytes()
        put("gguf", f"{f.stem}.header.gguf", data[: gguf_header_len(data) + 64])

    # safetensors: the small adapters as they are, and a few tensors of the tiny Llama's
    # names in each dtype the engine reads.
    put("safetensors", "tiny-mixtral-mlx.safetensors", (ADAPTERS / "tiny-mixtral-mlx/adapters.safetensors").read_bytes())
    rng = np.random.default_rng(0)
    norm = rng.standard_normal(64).astype(np.float32)
    for dt in ["float32", "float16"]:
        put(
            "safetensors",
            f"norms-{dt}.safetensors",
            save({"model.norm.weight": norm.astype(dt), "model.layers.0.input_layernorm.weight": norm.astype(dt),
                  "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((2, 4)).astype(dt)},
                 metadata={"format": "pt"}),
        )
    put("safetensors", "empty.safetensors", save({}))

    # Every Hugging Face directory, the RoPE-scaling variants (tiny-llama-rope/TYPE/) included.
    for d in sorted(p.parent for p in MODELS.rglob("config.json")):
        if d.is_dir():
            put("hf_config", f"{d.name}.json", (d / "config.json").read_bytes())
            put("tokenizer", f"{d.name}.json", (d / "tokenizer.json").read_bytes())
            tc = json.loads((d / "tokenizer_config.json").read_text())
            if isinstance(tc.get("chat_template"), str):
                put("chat_template", f"{d.name}.jinja", tc["chat_template"].encode())

    # chat_template: the constructs real templates use (namespace, loop controls, Python
    # string methods, raise_exception, slicing, filters).
    put("chat_template", "constructs.jinja", (
        "{%- set ns = namespace(sys='') -%}\n"
        "{%- for m in messages -%}\n"
        "  {%- if m['role'] == 'system' %}{% set ns.sys = m.content.strip() %}{% continue %}{% endif -%}\n"
        "  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' ~ m.role) }}{% endif -%}\n"
        "  {{ bos_token if loop.first }}[{{ m.role|upper }}] {{ m.content.split(' ')|join('_') }}"
        "{{ m.content[:3]|length }}{{ m.content.startswith('W')|string }}{{ eos_token }}\n"
        "  {%- if loop.index > 8 %}{% break %}{% endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt %}{{ ns.sys|replace('terse', 'brief') }}<assistant>{% endif %}\n"
        "{%- macro f(x) %}{{ x * 2 }}{% endmacro %}{{ f(3) }}{{ messages|selectattr('role', 'eq', 'user')|list|length }}"
        "{{ {'a': 1}.items()|list }}{{ range(3)|list }}{{ '%s-%d'|format('x', 1) }}"
    ).encode())

    for d in sorted(ADAPTERS.iterdir()):
        put("lora_config", f"{d.name}.json", (d / "adapter_config.json").read_bytes())

    for f in sorted(SUITES.glob("*.toml")):
        put("suite", f.name, f.read_bytes())

    for name in ["tiny-hf-lora.transformers", "tiny-spm-bos.llamacpp", "tiny-mixtral-hf.mlx", "tiny-k-q4-k-m.transformers"]:
        put("trace", f"{name}.json", (TRACES / f"{name}.json").read_bytes())
    # A whole trace: its JSON, a NUL byte, its tensors file (the smallest trace, 81 KB).
    name = "tiny-mixtral-hf.mlx"
    put("trace", f"{name}.whole", (TRACES / f"{name}.json").read_bytes() + b"\0" + (TRACES / f"{name}.safetensors").read_bytes())

    # arrays: dtype, ndim, layout, dims, values (fuzz/src/lib.rs, `arrays`): a float32 (2, 3) in
    # every layout, a float64 (3, 2, 2) Fortran array, a float16 and an int32 one, a 0-d array.
    values = bytes(range(1, 97))
    for layout in range(7):
        put("arrays", f"f32-2x3-layout{layout}", bytes([0, 2, layout, 2, 3]) + values)
    put("arrays", "f64-3x2x2-fortran", bytes([1, 3, 1, 3, 2, 2]) + values)
    put("arrays", "f16-4", bytes([2, 1, 0, 4]) + values[:8])
    put("arrays", "i32-2x2", bytes([3, 2, 2, 2, 2]) + values[:16])
    put("arrays", "f32-0d", bytes([0, 0, 5]) + values[:4])

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fuzz corpus: {sum(1 for p in OUT.rglob('*') if p.is_file())} files, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
