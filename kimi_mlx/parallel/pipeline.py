"""Pipeline parallelism: consecutive layers on consecutive ranks (the choice for slow links).

Rank r runs layers [start_r, end_r) (an even split; the low ranks take the extra ones). Per
model call, one activation [B, T, hidden] crosses each link once (mx.distributed send/recv
between neighbours), then the last rank's output is all-gathered so every rank applies the
final norm and lm_head and holds the same logits. Tensor parallelism instead all-reduces twice
per layer: 54 small messages per decode token against N here, which is what a slow link favours.
The ranks take turns (no micro-batching): a stage idles while the others work, so a pipeline
adds memory (each rank holds 1/N of the layers, their KDA states and latent caches) but not speed.

`shard_pipeline(model, group)` replaces model.model with a PipelineStage in place. Layers other ranks
run become RemoteLayer placeholders (no weights, so loading never reads them), keeping the
layer numbering, so model.make_cache() still makes one cache per layer; a remote layer's cache
stays empty and only advances its offset (context checks read it).
Evaluate each model call before building the next (generation does): two calls evaluated as
one graph can order their sends and all-gathers differently on two ranks and wait on each other.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import KDACache
from ..errors import KimiError
from .world import progress


def stage_bounds(layers: int, ranks: int, rank: int) -> tuple[int, int]:
    """[start, end) of the layers `rank` runs, of `layers` split over `ranks`."""
    base, extra = divmod(layers, ranks)
    sizes = [base + (1 if r < extra else 0) for r in range(ranks)]
    return sum(sizes[:rank]), sum(sizes[: rank + 1])


def check_pipeline_split(layers: int, ranks: int) -> None:
    if ranks > layers:
        raise KimiError(f"{ranks} ranks for {layers} layers: a pipeline needs at least one layer per rank; "
                        f"use at most {layers} ranks")


class RemoteLayer(nn.Module):
    """Stands for a layer another rank runs: no weights; `is_kda` says which cache it needs."""

    def __init__(self, is_kda: bool):
        super().__init__()
        self.is_kda = is_kda


class PipelineStage(nn.Module):
    """KimiLinearModel's contract (inputs [B, T], cache, mask -> normed hidden [B, T, hidden],
    the same on every rank) for one stage of a pipeline over `group`."""

    def __init__(self, inner, group):
        super().__init__()
        N, r = group.size(), group.rank()
        check_pipeline_split(len(inner.layers), N)
        self.start, self.end = stage_bounds(len(inner.layers), N, r)
        self.group, self.rank, self.size = group, r, N
        self.hidden = inner.norm.weight.shape[0]
        embed = inner.embed_tokens
        self.dtype = embed.scales.dtype if isinstance(embed, nn.QuantizedEmbedding) else embed.weight.dtype
        self.embed_tokens = embed  # kept on every stage (as mlx-lm): the memory plan reads its dtype
        self.layers = [layer if self.start <= i < self.end else RemoteLayer(layer.is_kda)
                       for i, layer in enumerate(inner.layers)]
        self.norm = inner.norm

    def __call__(self, inputs: mx.array, cache=None, mask: mx.array | None = None) -> mx.array:
        B, T = inputs.shape
        g, r, N = self.group, self.rank, self.size
        progress()  # the watchdog: a step is being built, so the previous one finished
        cache = cache if cache is not None else [None] * len(self.layers)
        if r == 0:
            h = self.embed_tokens(inputs)  # [B, T, hidden]
        else:
            h = mx.distributed.recv((B, T, self.hidden), self.dtype, r - 1, group=g)
        # The decode step's switch reads, once for this stage's layers. (Imported here: `kimi-mlx
        # plan --ranks` imports this module and must stay light: decode pulls in mlx-lm.)
        from ..decode import DecodeStep

        step = DecodeStep(h) if T == 1 and mask is None and cache[self.start] is not None else None
        for i in range(self.start, self.end):
            h = self.layers[i](h, mask, cache[i], step)
        if r < N - 1:
            h = mx.distributed.send(h, r + 1, group=g)
            # Prefill evaluates only the caches: make this stage's last cache depend on the send,
            # or the next rank would wait for activations that are never sent.
            _after(cache[self.end - 1], h)
        for i, c in enumerate(cache):
            if c is not None and not self.start <= i < self.end:
                c.offset += T  # a remote layer's cache: only its position advances
        h = mx.distributed.all_gather(h, group=g)[(N - 1) * B:]  # the last stage's output, on every rank
        return self.norm(h)


def _after(cache, h: mx.array) -> None:
    if cache is None:
        return
    if isinstance(cache, KDACache):
        cache.recurrent = mx.depends(cache.recurrent, h)
    elif cache.tail is not None:
        cache.tail = (mx.depends(cache.tail[0], h), *cache.tail[1:])


def shard_pipeline(model, group) -> None:
    """Split `model`'s layers across `group` in place (module docstring)."""
    model.model = PipelineStage(model.model, group)
    model.group = group  # generation broadcasts rank 0's tokens over it
    model.parallel = "pipeline"
