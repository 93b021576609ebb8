"""Expert parallelism for the MoE blocks: each rank holds E/N of the routed experts.

Rank r holds experts [r E/N, (r+1) E/N) (the stacked SwitchGLU weights [E, out, in], and their
scales/biases when quantized, sliced along the expert axis) and a 1/N column slice of the
shared expert. The router is replicated, so every rank makes the same top-k choice; each rank
adds the weighted outputs of the chosen experts it holds to its partial shared-expert output,
and ONE all-reduce (sum) over the ranks gives every rank the block's output:
    y = sum_ranks [ sum_{j: ids_j local} w_j expert_{ids_j}(x) + down_r(silu(gate_r x) * up_r x) ]

Two ways to run the local experts, same signature and result (`local_experts(..., path)`):
  * "masked" (the reference, and decode): every (token, slot) row goes through the experts, rows
    routed elsewhere point at local expert 0 with weight 0. No host sync (compile-friendly);
    reads at most k+1 local experts' weights per step, but computes k rows per token.
  * "compact" (prefill): the rows routed here are gathered (one host read of the ids), run
    through kimi_mlx.experts.run_experts (its gather/grouped paths), and added back per token:
    a rank computes only its 1/N share of the rows.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import KimiError
from ..experts import run_experts
from ..moe import SparseMoE, route
from .world import progress

EP_PATHS = ("masked", "compact")
COMPACT_MIN_TOKENS = 16  # tokens per step from which "compact" is the auto choice (prefill, not decode)


def local_experts(mlp, x: mx.array, ids: mx.array, weights: mx.array, first: int, count: int,
                  path: str | None = None) -> mx.array:
    """x [N, D], ids/weights [N, k] (global expert ids, fp32 weights) -> [N, D]: the weighted sum
    over the slots routed to experts [first, first + count), which `mlp` holds as 0..count-1."""
    path = path or ("compact" if x.shape[0] >= COMPACT_MIN_TOKENS else "masked")
    if path not in EP_PATHS:
        raise KimiError(f"expert-parallel path {path!r}: choose one of {', '.join(EP_PATHS)}")
    local = ids - first  # [N, k]
    mine = (local >= 0) & (local < count)
    if path == "masked":
        return run_experts(mlp, x, mx.where(mine, local, 0), mx.where(mine, weights, 0.0))
    k = ids.shape[-1]
    rows = np.flatnonzero(np.array(mine.reshape(-1)))  # host sync: which (token, slot) rows are here
    if rows.size == 0:
        return mx.zeros_like(x)
    rows = mx.array(rows.astype(np.int32))
    token = rows // k  # [n] the token of each row
    out = run_experts(mlp, x[token], local.reshape(-1)[rows][:, None], weights.reshape(-1)[rows][:, None])  # [n, D]
    return mx.zeros_like(x).at[token].add(out)


class ExpertParallelMoE(SparseMoE):
    """SparseMoE whose routed experts are split across `group` by expert (module docstring).
    Same parameter names as SparseMoE; `first`/`count`: this rank's experts."""

    @classmethod
    def from_moe(cls, moe: SparseMoE, group, where: str = "mlp") -> "ExpertParallelMoE":
        N, r = group.size(), group.rank()
        E = moe.e_score_correction_bias.shape[0]
        if E % N:
            raise KimiError(f"{where}: {E} experts cannot be split across {N} ranks; use a world size dividing {E}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.top_k, new.renormalize, new.scale = moe.top_k, moe.renormalize, moe.scale
        new.gate, new.e_score_correction_bias = moe.gate, moe.e_score_correction_bias
        new.switch_mlp = moe.switch_mlp
        count = E // N
        for proj in (new.switch_mlp.gate_proj, new.switch_mlp.up_proj, new.switch_mlp.down_proj):
            proj.update({k: mx.contiguous(v[r * count:(r + 1) * count]) for k, v in proj.parameters().items()})
        new.shared_experts = moe.shared_experts
        if new.shared_experts is not None:
            from .tensor import _columns, _inputs

            s = new.shared_experts
            _columns(s.gate_proj, group)
            _columns(s.up_proj, group)
            # Row-wise WITHOUT its own all-reduce (stays a Linear): the block's one reduce sums it.
            _inputs(s.down_proj, group, f"{where}.mlp.shared_experts.down_proj")
        new.group, new.first, new.count = group, r * count, count
        return new

    def __call__(self, x: mx.array, gate_up: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """x: [B, T, hidden] -> [B, T, hidden], the same on every rank."""
        progress()  # the watchdog: a step is being built, so the previous one finished
        ids, weights = route(self.router_logits(x), self.e_score_correction_bias, self.top_k, self.renormalize,
                             self.scale)  # replicated: the same choice on every rank
        B, T, D = x.shape
        y = local_experts(self.switch_mlp, x.reshape(B * T, D), ids.reshape(B * T, -1), weights.reshape(B * T, -1),
                          self.first, self.count).reshape(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x, gate_up)  # this rank's share of the shared expert (down not reduced)
        return mx.distributed.all_sum(y, group=self.group)
