"""Tiny random checkpoints written by kimi_mlx itself (no torch): for loading, cache and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

TINY_CONFIG = {
    "model_type": "kimi_linear", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 4, "num_attention_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4, "v_head_dim": 8, "mla_use_nope": True, "num_experts": 4,
    "num_experts_per_token": 2, "moe_intermediate_size": 16, "num_shared_experts": 1,
    "first_k_dense_replace": 1, "routed_scaling_factor": 2.446, "rms_norm_eps": 1e-5,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "linear_attn_config": {"full_attn_layers": [3], "kda_layers": [1, 2, 4], "num_heads": 2,
                           "head_dim": 16, "short_conv_kernel_size": 4},
}


def random_weights(config: dict = TINY_CONFIG, seed: int = 0) -> dict:
    """Random parameters of the model in the MLX layout, scaled so activations stay O(1)."""
    from kimi_mlx import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    out = {}
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("A_log"):
            p = mx.random.uniform(-1, 1, p.shape)
        elif p.ndim >= 2:
            p = mx.random.normal(p.shape) * p.shape[-1] ** -0.5
        else:
            p = 1 + 0.2 * mx.random.normal(p.shape)
        out[name] = p.astype(mx.float32)
    return out


def write_checkpoint(folder: Path, config: dict = TINY_CONFIG, weights: dict | None = None, shards: int = 1) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_weights(config) if weights is None else weights
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), weights)
        return folder
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(folder / fname), {n: weights[n] for n in part})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def tiny_model(head_dim: int = 32):
    """A float32 Model of TINY_CONFIG with KDA head dim `head_dim`, random weights seeded by it."""
    import copy

    from kimi_mlx import Model, ModelArgs

    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["linear_attn_config"]["head_dim"] = head_dim
    model = Model(ModelArgs.from_dict(cfg))
    model.load_weights(list(random_weights(cfg, seed=head_dim).items()))
    mx.eval(model.parameters())
    return model
