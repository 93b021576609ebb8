"""Write a trained Model as a checkpoint in Moonshot's ORIGINAL Hugging Face layout.

The inverse of kimi_mlx/weights.py's renaming steps, one small function each:
  mlp.switch_mlp.{gate,up,down}_proj [E, out, in] -> block_sparse_moe.experts.E.{w1,w3,w2}
  mlp.gate / mlp.e_score_correction_bias / mlp.shared_experts (MoE layers) -> block_sparse_moe.*
  {q,k,v}_conv.conv.weight [C, K, 1] -> {q,k,v}_conv1d.weight [C, 1, K]
  embed_q [H, R, Dn] + unembed_out [H, Dv, R] -> kv_b_proj [H*(Dn+Dv), R]
The dense layer (layer 0) keeps `mlp.{gate,up,down}_proj`; A_log stays [1, 1, H, 1], dt_bias [H*D].
Tensors are stored in bfloat16 except FP32_PARAMS (A_log, dt_bias, the router bias), which the
model always computes in float32: keeping them float32 on disk costs a few KB and loses nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..model import FP32_PARAMS, Model

_SWITCH = re.compile(r"^(.*)\.mlp\.switch_mlp\.(gate|up|down)_proj\.weight$")
_ORIGINAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}


def unstack_experts(weights: dict) -> dict:
    out = {}
    for name, w in weights.items():
        m = _SWITCH.match(name)
        if m is None:
            out[name] = w
            continue
        for e in range(w.shape[0]):
            out[f"{m.group(1)}.block_sparse_moe.experts.{e}.{_ORIGINAL_EXPERT[m.group(2)]}.weight"] = w[e]
    return out


def moe_block_names(weights: dict, moe_layers: set[int]) -> dict:
    """Router, its bias and the shared expert of MoE layers go back under block_sparse_moe."""
    out = {}
    for name, w in weights.items():
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.(.*)$", name)
        if m and int(m.group(1)) in moe_layers:
            prefix, rest = f"model.layers.{m.group(1)}.block_sparse_moe.", m.group(2)
            name = prefix + ("gate.e_score_correction_bias" if rest == "e_score_correction_bias" else rest)
        out[name] = w
    return out


def conv_to_torch(weights: dict) -> dict:
    out = {}
    for name, w in weights.items():
        m = re.match(r"^(.*\.self_attn\.)([qkv])_conv\.conv\.weight$", name)
        if m:
            name, w = f"{m.group(1)}{m.group(2)}_conv1d.weight", w.swapaxes(1, 2)  # [C, K, 1] -> [C, 1, K]
        out[name] = w
    return out


def merge_kv_b(weights: dict) -> dict:
    """embed_q [H, R, Dn] and unembed_out [H, Dv, R] -> kv_b_proj [H*(Dn+Dv), R] (per head: Dn key rows, then Dv)."""
    out = {}
    for name, w in weights.items():
        if name.endswith(".unembed_out.weight"):
            continue
        if name.endswith(".embed_q.weight"):
            prefix = name[: -len("embed_q.weight")]
            wv = weights[prefix + "unembed_out.weight"]  # [H, Dv, R]
            kv_b = mx.concatenate([w.swapaxes(1, 2), wv], axis=1)  # [H, Dn+Dv, R]
            out[prefix + "kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
            continue
        out[name] = w
    return out


def to_original_layout(model: Model) -> dict:
    args = model.args
    moe_layers = {i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)}
    weights = dict(tree_flatten(model.parameters()))
    weights = unstack_experts(weights)
    weights = moe_block_names(weights, moe_layers)
    weights = conv_to_torch(weights)
    return merge_kv_b(weights)


def save_original(model: Model, config: dict, folder: str | Path) -> Path:
    """config.json (released format, as given) + model.safetensors in the original layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {
        n: mx.contiguous(w.astype(mx.float32 if n.endswith(FP32_PARAMS) else mx.bfloat16))
        for n, w in sorted(to_original_layout(model).items())
    }
    # Written beside the folder, then renamed: a crash never leaves a half file that *.safetensors matches.
    tmp = folder.parent / f".{folder.name}.partial.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "pt"})
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(dict(config, dtype="bfloat16"), indent=2) + "\n")
    return folder
