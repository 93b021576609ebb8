"""Weight renaming from Moonshot's original layout to the MLX layout (mlx-lm's names), in small steps.

Each step is a pure function `dict[name, array] -> dict[name, array]` that rewrites only the keys
it recognises, so the chain is idempotent: a checkpoint already in the MLX layout (ours or an
mlx-community conversion) passes through unchanged. Steps work on any subset of the tensors as long
as a layer's related tensors come together (all experts of a layer for `stack_experts`), which is
what lets the converter stream layer by layer.

Original -> MLX
  layers.N.block_sparse_moe.experts.E.w1|w3|w2.weight  -> layers.N.mlp.switch_mlp.gate|up|down_proj.weight [E, out, in]
  layers.N.block_sparse_moe.gate.weight                -> layers.N.mlp.gate.weight
  layers.N.block_sparse_moe.gate.e_score_correction_bias -> layers.N.mlp.e_score_correction_bias
  layers.N.block_sparse_moe.shared_experts.*           -> layers.N.mlp.shared_experts.*
  layers.N.self_attn.{q,k,v}_conv1d.weight [C, 1, K]   -> layers.N.self_attn.{q,k,v}_conv.conv.weight [C, K, 1]
  layers.N.self_attn.kv_b_proj.weight [H*(Dn+Dv), R]   -> embed_q.weight [H, R, Dn], unembed_out.weight [H, Dv, R]
  layers.N.self_attn.dt_bias [.., H*D]                 -> dt_bias [H*D]
"""

from __future__ import annotations

import re

import mlx.core as mx

from .config import ModelArgs
from .errors import ModelFormatError

_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def stack_experts(weights: dict, num_experts: int) -> dict:
    """Per-expert w1/w3/w2 matrices -> one [E, out, in] tensor per projection (SwitchGLU layout)."""
    groups: dict[tuple[str, str], dict[int, mx.array]] = {}
    out = {}
    for name, w in weights.items():
        m = _EXPERT.match(name)
        if m is None:
            out[name] = w
            continue
        prefix, e, which = m.group(1), int(m.group(2)), m.group(3)
        groups.setdefault((prefix, which), {})[e] = w
    for (prefix, which), experts in groups.items():
        missing = [e for e in range(num_experts) if e not in experts]
        if missing or len(experts) != num_experts:
            raise ModelFormatError(
                f"{prefix}.block_sparse_moe.experts.{missing[0] if missing else num_experts}.{which}.weight: "
                f"expected {num_experts} experts, found {len(experts)}"
            )
        stacked = mx.stack([experts[e] for e in range(num_experts)])
        out[f"{prefix}.mlp.switch_mlp.{_EXPERT_NAMES[which]}.weight"] = stacked
    return out


def rename_moe_block(weights: dict) -> dict:
    """The router and shared expert move from `block_sparse_moe` to `mlp` (the bias leaves the gate)."""
    out = {}
    for name, w in weights.items():
        name = name.replace(".block_sparse_moe.gate.e_score_correction_bias", ".mlp.e_score_correction_bias")
        name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        name = name.replace(".block_sparse_moe.shared_experts.", ".mlp.shared_experts.")
        out[name] = w
    return out


def conv_to_mlx(weights: dict) -> dict:
    """Depthwise conv weights [C, 1, K] (torch) -> [C, K, 1] (MLX Conv1d) under `{q,k,v}_conv.conv`."""
    out = {}
    for name, w in weights.items():
        m = re.match(r"^(.*\.self_attn\.)([qkv])_conv1d\.weight$", name)
        if m:
            name = f"{m.group(1)}{m.group(2)}_conv.conv.weight"
            w = w.swapaxes(1, 2) if w.ndim == 3 else w[:, :, None]
        out[name] = w
    return out


def split_kv_b(weights: dict, args: ModelArgs) -> dict:
    """kv_b_proj [H*(Dn+Dv), R] -> embed_q [H, R, Dn] (latent -> keys) and unembed_out [H, Dv, R]."""
    out = {}
    H, Dn, Dv, R = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
    for name, w in weights.items():
        if not name.endswith(".kv_b_proj.weight"):
            if ".kv_b_proj." not in name:
                out[name] = w
            continue
        prefix = name[: -len("kv_b_proj.weight")]
        scales = weights.get(prefix + "kv_b_proj.scales")
        if scales is not None:  # an older quantized conversion: dequantize, split (and stay fp)
            bits = w.shape[-1] * 32 // R
            w = mx.dequantize(w, scales, weights.get(prefix + "kv_b_proj.biases"), group_size=R // scales.shape[-1], bits=bits)
        w = w.reshape(H, Dn + Dv, R)
        out[prefix + "embed_q.weight"] = mx.contiguous(w[:, :Dn, :].swapaxes(1, 2))
        out[prefix + "unembed_out.weight"] = mx.contiguous(w[:, Dn:, :])
    return out


def flatten_dt_bias(weights: dict) -> dict:
    return {n: (w.reshape(-1) if n.endswith(".dt_bias") and w.ndim > 1 else w) for n, w in weights.items()}


def drop_unused(weights: dict) -> dict:
    """Multi-token-prediction heads (if any) and rotary caches are not part of the model we run."""
    return {n: w for n, w in weights.items() if not n.startswith("model.mtp") and "rotary_emb" not in n}


def to_mlx_layout(weights: dict, args: ModelArgs) -> dict:
    """Apply every renaming step; a no-op on weights already in the MLX layout."""
    weights = drop_unused(weights)
    weights = stack_experts(weights, args.num_experts)
    weights = rename_moe_block(weights)
    weights = conv_to_mlx(weights)
    weights = split_kv_b(weights, args)
    weights = flatten_dt_bias(weights)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights
