"""Where each site is read in a Hugging Face-style decoder, shared by the transformers and
MLX references (transformers' modeling files and mlx-lm's models use the same module
names: ``model.embed_tokens``, ``model.layers[i].self_attn.q_proj``, ``model.norm`` ...).

This file owns that mapping, from a site's leaf to the module whose output (or input)
holds it. The sites no module gives are read elsewhere by each reference: ``q_rope`` and
``k_rope`` from the rotary embedding, ``cache_k`` / ``cache_v`` from the cache after the
step, ``logits`` from the model's output.
"""
from __future__ import annotations

OUTPUT, INPUT = "output", "input"

# Per-layer leaf -> (module path inside a decoder layer, "" for the layer itself; which
# side of its call).
LAYER_HOOKS: dict[str, tuple[str, str]] = {
    "attn_norm": ("input_layernorm", OUTPUT),
    "q": ("self_attn.q_proj", OUTPUT),
    "k": ("self_attn.k_proj", OUTPUT),
    "v": ("self_attn.v_proj", OUTPUT),
    "attn": ("self_attn.o_proj", INPUT),
    "attn_out": ("self_attn.o_proj", OUTPUT),
    # Gemma 3: q and k normed per head before RoPE, and each branch's output normed before it
    # joins the residual stream; its norm before the MLP is ``pre_feedforward_layernorm`` (its
    # ``post_attention_layernorm`` is the attention branch's output norm, Llama's is the norm
    # before the MLP).
    "q_norm": ("self_attn.q_norm", OUTPUT),
    "k_norm": ("self_attn.k_norm", OUTPUT),
    "attn_post_norm": ("post_attention_layernorm", OUTPUT),
    "mlp_norm": [("pre_feedforward_layernorm", OUTPUT), ("post_attention_layernorm", OUTPUT)],
    "mlp_gate": ("mlp.gate_proj", OUTPUT),
    "mlp_up": ("mlp.up_proj", OUTPUT),
    "mlp_act": ("mlp.down_proj", INPUT),
    "mlp_out": [("mlp.down_proj", OUTPUT), ("mlp", OUTPUT), ("block_sparse_moe", OUTPUT)],
    "mlp_post_norm": ("post_feedforward_layernorm", OUTPUT),
    "out": ("", OUTPUT),
    # Sparse MoE (Mixtral): the router's logits. transformers 5 names the mixture ``mlp`` and its
    # router ``mlp.gate`` (a MixtralTopKRouter returning (logits, top-k weights, top-k indices));
    # mlx-lm keeps ``block_sparse_moe.gate`` (a Linear). ``mlp_out`` above is then the mixture's
    # output (there is no ``mlp.down_proj``).
    "router": [("mlp.gate", OUTPUT), ("block_sparse_moe.gate", OUTPUT)],
}
# A leaf may list alternatives: the first path the model has is used.

# Sparse MoE: the leaf of the weight each expert received per position, ``(seq, n_experts)``,
# zero where not chosen. Each reference builds it from what its own router computed.
EXPERT_WEIGHTS = "expert_weights"
# The mixture module of a layer in each framework (transformers 5, mlx-lm).
MOE_BLOCKS = ("mlp", "block_sparse_moe")

# Global site -> (module path inside the decoder stack, i.e. ``model.model``; side).
GLOBAL_HOOKS: dict[str, tuple[str, str]] = {
    "embed": ("embed_tokens", OUTPUT),
    "final_norm": ("norm", OUTPUT),
}

# The attention module of a layer (whose rotary embedding gives q_rope / k_rope).
ATTENTION = "self_attn"
ROPE_SITES = ("q_rope", "k_rope")
CACHE_SITES = ("cache_k", "cache_v")


def submodule(root, path: str):
    """The module at a dotted ``path`` below ``root`` (attribute access, which both
    frameworks support), ``root`` itself for ""; None when there is none."""
    m = root
    for part in path.split(".") if path else []:
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def plan(root, path_of: dict[str, tuple[str, str]], wanted: dict[str, str]):
    """Groups the hooks of ``wanted`` ({leaf or global name: site name}) by module:
    {module path: (module, {OUTPUT: site, INPUT: site})}, in ``path_of``'s order. A name
    whose module ``root`` lacks is left out (the reference does not provide that site)."""
    out: dict[str, tuple[object, dict[str, str]]] = {}
    for key, where in path_of.items():
        site = wanted.get(key)
        if site is None:
            continue
        for path, side in where if isinstance(where, list) else [where]:
            mod = submodule(root, path)
            if mod is not None:
                out.setdefault(path, (mod, {}))[1][side] = site
                break
    return out
