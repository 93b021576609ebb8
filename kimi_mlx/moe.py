"""Feed-forward blocks: the dense SwiGLU of layer 0 and the routed mixture of experts.

Router (as the reference): scores = sigmoid(x W_gate^T) in fp32; the correction bias is added for
the CHOICE of the top-k experts only; the chosen raw scores are renormalised to sum 1 and scaled
by routed_scaling_factor. One shared expert is always added.
Experts hold mlx-lm's SwitchGLU weights (quantized or not) and run on one of two paths (see
experts.py): gather matmuls, or on CPU prefill one matmul per expert over the tokens it was given.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from .config import ModelArgs
from .experts import run_experts
from .moe_route import route  # the kernel on a GPU, else route_ops (the reference)
from .precision import fp32_matmul


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array, gate_up: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """x [..., hidden] -> [..., hidden]; gate_up: (gate_proj(x), up_proj(x)) computed by the
        caller (kimi_mlx.decode runs the two as one fused matmul)."""
        g, u = (self.gate_proj(x), self.up_proj(x)) if gate_up is None else gate_up
        return self.down_proj(nn.silu(g) * u)


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_token
        self.renormalize = args.moe_renormalize
        self.scale = args.routed_scaling_factor
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.e_score_correction_bias = mx.zeros((args.num_experts,), dtype=mx.float32)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.num_shared_experts)
            if args.num_shared_experts
            else None
        )

    def router_logits(self, x: mx.array) -> mx.array:
        """x [..., hidden] -> [..., E] fp32. An unquantized gate runs as a full-fp32 product (TF32
        GPUs would move near-ties); a quantized one (mlx-lm's 8-bit gate) is a quantized matmul."""
        x = x.astype(mx.float32)
        if isinstance(self.gate, nn.Linear):
            return fp32_matmul(x, self.gate.weight.astype(mx.float32).T)
        return self.gate(x)

    def __call__(self, x: mx.array, gate_up: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """x: [B, T, hidden] -> [B, T, hidden]; gate_up: the shared expert's, precomputed (see MLP)."""
        # Router in fp32 (as the reference): near-ties between experts must not flip with the activation dtype.
        ids, weights = route(self.router_logits(x), self.e_score_correction_bias, self.top_k, self.renormalize,
                             self.scale)
        B, T, D = x.shape
        y = run_experts(self.switch_mlp, x.reshape(B * T, D), ids.reshape(B * T, -1), weights.reshape(B * T, -1))
        y = y.reshape(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x, gate_up)
        return y
