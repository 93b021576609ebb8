"""Tensor parallelism: split an already-built Model's heads, MLP widths and experts across ranks.

`shard_tensor(model, group)` rewrites the model in place (as mlx-lm's `Model.shard`), with
mlx.nn's sharding helpers; each rank then holds 1/N of every split weight and runs one
all-reduce per attention block and one per MLP block:
  * KDA: q/k/v projections, their depthwise convs (by channel), f_b/g_b (column-wise), b_proj
    (by head), A_log and dt_bias are split by head; f_a/g_a (rank-D bottlenecks) and the
    per-head-dim o_norm are replicated; o_proj is row-wise (`ShardedToAllLinear`: the reduce).
    Each rank's recurrent state is [B, H/N, Dv, Dk]: 1/N of it.
  * MLA: q_proj and the per-head embed_q/unembed_out are split by head, o_proj row-wise. The
    latent projection kv_a (and its norm) is replicated: the latent is SHARED by all heads, so
    every rank computes and caches the whole [S, R+P] latent cache (not 1/N of it; splitting it
    would need splitting the sequence instead: context parallelism, not done here).
  * dense MLP and the shared expert: gate/up column-wise, down row-wise.
  * routed experts: expert parallel (see expert.py): rank r holds experts [r E/N, (r+1) E/N);
    the router is replicated; the shared expert's partial output joins the routed one in ONE
    all-reduce per MoE block.
  * embeddings, final norm and lm_head are replicated (every rank computes the same logits).
Column-wise layers keep their rows in place (they stay nn.Linear / nn.QuantizedLinear, so
kimi_mlx.decode still fuses them; mlx.nn's AllToShardedLinear would add only a gradient
all-reduce); row-wise ones become mlx.nn's (Quantized)ShardedToAllLinear. (mlx.nn's
shard_inplace / shard_linear helpers do the same but are not exported by mlx.nn in 0.32.3.) Quantized weights split
the same way (scales/biases follow their rows; row-wise needs whole quantization groups per rank).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import KimiError


def tensor_split_sizes(args) -> list[tuple[str, int]]:
    """(what, count) that a tensor-parallel world size must divide."""
    sizes = [("KDA heads (linear_attn_config.num_heads)", args.kda_heads),
             ("MLA heads (num_attention_heads)", args.num_attention_heads)]
    if args.num_experts:
        sizes.append(("routed experts (num_experts)", args.num_experts))
        if args.num_shared_experts:
            sizes.append(("shared expert width", args.moe_intermediate_size * args.num_shared_experts))
    if any(not args.is_moe_layer(i) for i in range(args.num_hidden_layers)):
        sizes.append(("dense MLP width (intermediate_size)", args.intermediate_size))
    return sizes


def check_tensor_split(args, ranks: int) -> None:
    """KimiError (one line) unless `ranks` divides every split dimension of the model."""
    for what, n in tensor_split_sizes(args):
        if n % ranks:
            ok = [d for d in range(2, n + 1) if n % d == 0 and all(m % d == 0 for _, m in tensor_split_sizes(args))]
            raise KimiError(f"{ranks} ranks do not divide the model's {n} {what}: tensor parallelism needs a world "
                            f"size dividing it ({', '.join(map(str, ok[:6])) or 'none'}), or use "
                            "KIMI_MLX_PARALLEL=pipeline")


def shard_tensor(model, group) -> None:
    """Split `model` (a kimi_mlx Model, weights loaded or lazy) across `group`, in place."""
    from .expert import ExpertParallelMoE  # here: it imports mlx-lm, which `kimi-mlx plan --ranks` does not need

    N = group.size()
    check_tensor_split(model.args, N)
    for i, layer in enumerate(model.layers):
        where = f"model.layers.{i}"
        (_shard_kda if layer.is_kda else _shard_mla)(layer.self_attn, group, where)
        if hasattr(layer.mlp, "switch_mlp"):
            layer.mlp = ExpertParallelMoE.from_moe(layer.mlp, group, where)
        else:
            _shard_swiglu(layer.mlp, group, f"{where}.mlp")
            layer.mlp.down_proj = _row_linear(layer.mlp.down_proj, group, f"{where}.mlp.down_proj")
    model.group = group  # generation broadcasts rank 0's tokens over it (an attribute, not a parameter)
    model.parallel = "tensor"


def _columns(linear, group) -> None:
    """Keep this rank's block of output rows (weight, scales, biases: [out, ...]), in place."""
    linear.update({k: _rows_of(v, 0, group) for k, v in linear.parameters().items()})


def _inputs(linear, group, where: str) -> None:
    """Keep this rank's block of input columns, in place, without a reduce (the caller sums)."""
    _check_row_groups(linear, group.size(), where)
    linear.update({k: _rows_of(v, -1, group) for k, v in linear.parameters().items()})


def _row_linear(linear, group, where: str):
    """A row-wise split linear that all-reduces its output (mlx.nn's ShardedToAllLinear)."""
    _check_row_groups(linear, group.size(), where)
    if isinstance(linear, nn.QuantizedLinear):
        return nn.QuantizedShardedToAllLinear.from_quantized_linear(linear, group=group)
    return nn.ShardedToAllLinear.from_linear(linear, group=group)


def _check_row_groups(linear, N: int, where: str) -> None:
    if isinstance(linear, nn.QuantizedLinear):
        inputs = linear.scales.shape[-1] * linear.group_size
        if (inputs // N) % linear.group_size:
            raise KimiError(f"{where}: {inputs} inputs quantized in groups of {linear.group_size} cannot be split "
                            f"across {N} ranks (whole groups per rank); use fewer ranks or KIMI_MLX_PARALLEL=pipeline")


def _rows_of(a: mx.array, axis: int, group) -> mx.array:
    """This rank's 1/N slice of `a` along `axis` (contiguous, so the full array can be freed)."""
    N, r = group.size(), group.rank()
    n = a.shape[axis] // N
    index = [slice(None)] * a.ndim
    index[axis % a.ndim] = slice(r * n, (r + 1) * n)
    return mx.contiguous(a[tuple(index)])


def _shard_swiglu(mlp, group, where: str) -> None:
    _columns(mlp.gate_proj, group)
    _columns(mlp.up_proj, group)


def _shard_kda(a, group, where: str) -> None:
    N = group.size()
    for linear in (a.q_proj, a.k_proj, a.v_proj, a.f_b_proj, a.g_b_proj, a.b_proj):
        _columns(linear, group)  # outputs are head-major ([H, D] or [H]): a contiguous block of heads
    for conv in (a.q_conv, a.k_conv, a.v_conv):
        conv.conv.weight = _rows_of(conv.conv.weight, 0, group)  # [C, K, 1]: channels = the heads' q/k/v
    a.A_log = _rows_of(a.A_log, 2, group)  # [1, 1, H, 1]
    a.dt_bias = _rows_of(a.dt_bias, 0, group)  # [H * D]
    a.o_proj = _row_linear(a.o_proj, group, f"{where}.self_attn.o_proj")
    a.num_heads //= N


def _shard_mla(a, group, where: str) -> None:
    N = group.size()
    _columns(a.q_proj, group)  # [H * (Dn + Dr), hidden]: head-major
    for per_head in (a.embed_q, a.unembed_out):  # [H, ...] each (weight, and scales/biases when quantized)
        per_head.update({k: _rows_of(v, 0, group) for k, v in per_head.parameters().items()})
    a.o_proj = _row_linear(a.o_proj, group, f"{where}.self_attn.o_proj")
    a.num_heads //= N
