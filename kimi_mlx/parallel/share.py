"""Which share of each parameter a rank holds, by parameter name (for `kimi-mlx plan --ranks`).

Mirrors tensor.py / expert.py / pipeline.py without building anything: names in the MLX layout
(`model.layers.3.self_attn.q_proj.weight`, `...switch_mlp.up_proj.scales`), shares 0, 1/N or 1.
"""

from __future__ import annotations

import re

from .pipeline import stage_bounds

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Parameters tensor parallelism keeps whole on every rank (inside a layer).
_REPLICATED = re.compile(r"(input_layernorm|post_attention_layernorm|o_norm|kv_a_layernorm|f_a_proj|g_a_proj|"
                         r"kv_a_proj_with_mqa|mlp\.gate|mlp\.e_score_correction_bias)(\.|$)")


def held_share(name: str, layers: int, mode: str, ranks: int, rank: int) -> float:
    """The fraction of parameter `name` that `rank` of `ranks` holds in `mode` (tensor | pipeline)."""
    if ranks == 1:
        return 1.0
    m = _LAYER.match(name)
    if m is None:  # embedding, final norm, lm_head: on every rank in both modes
        return 1.0
    if mode == "pipeline":
        start, end = stage_bounds(layers, ranks, rank)
        return 1.0 if start <= int(m.group(1)) < end else 0.0
    return 1.0 if _REPLICATED.match(m.group(2).split("self_attn.", 1)[-1]) else 1.0 / ranks


def layers_held(layers: int, mode: str, ranks: int, rank: int) -> tuple[range, float]:
    """(the layers whose states and caches `rank` holds, the share of each KDA state it holds)."""
    if mode == "pipeline":
        start, end = stage_bounds(layers, ranks, rank)
        return range(start, end), 1.0
    return range(layers), 1.0 / ranks
