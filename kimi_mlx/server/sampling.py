"""Per-request sampling inside a shared decode batch.

The filters are mlx-lm's (apply_top_p / apply_min_p / apply_top_k, the same semantics as
`make_sampler`), but each request draws from its own PRNG key chain (seeded from `seed`, or
fresh): mlx-lm's sampler draws from MLX's global random state, so a seeded request would give
different tokens depending on which other requests shared its steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


class RowSampler:
    """Draws one request's tokens: logprobs [1, V] -> token [1] int32."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.greedy = params.temperature == 0
        seed = params.seed if params.seed is not None else int.from_bytes(__import__("os").urandom(4), "little")
        self.key = mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        p = self.params
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        if 0 < p.top_p < 1:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p > 0:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / p.temperature), key=sub)
