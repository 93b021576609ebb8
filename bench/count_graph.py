"""Graph nodes per decode token, per layer kind: our decode step against mlx-lm's, on the CPU.

    python bench/count_graph.py                 # table per layer kind + whole step, ours vs mlx-lm
    python bench/count_graph.py --ops           # also the op histogram of each layer kind (diff)
    python bench/count_graph.py --paths eager   # our eager path only

Machine-independent: the count of a lazy graph's nodes (mx.export_to_dot) does not depend on the
device that would run it, and every node that is not a view is one kernel launch on a GPU (the
per-token cost of a decode step on the H200 is launches and host work, bench/gpu/NOTES.md). The
model is small (hidden 256, 16 experts) but has the REAL per-layer structure: KDA+dense (layer
0), KDA+MoE, MLA+MoE, top-8 routing, one shared expert, 4-bit weights with an 8-bit router gate
in mlx-lm's layout; both libraries hold the same arrays (bench/bench_gpu.py's builder). The
decode path "compiled" traces on the CPU too (MLX builds C++ for each new trace: seconds).
Counts are per layer KIND (one layer of each) and for the whole step (embedding .. argmax), so
x20 / x6 / x1 gives the full model's 27 layers.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gpu import TINY_CONFIG, VIEW_OPS, build_models, planted_caches, quantized_config  # noqa: E402

from kimi_mlx.decode import set_decode_path  # noqa: E402

# The real model's per-layer structure at small dims (multiples of the 64-wide quantization group).
SMALL_CONFIG = {**TINY_CONFIG, "num_experts": 16, "num_experts_per_token": 8}  # top-8 of 16, as the real top-8 of 256
# Layers of each kind in Kimi-Linear-48B-A3B (27 layers): for the full-model estimate.
REAL_COUNTS = {"kda+dense": 1, "kda+moe": 19, "mla+moe": 7}


def _rms_norm_as_on_gpu(x, weight, eps):
    """Stands in for mx.fast.rms_norm while counting: on a GPU it is ONE kernel (an RMSNorm node),
    on the CPU MLX expands it into Square, Sum and an elementwise tail. A Softmax node (one
    kernel, never fused by mx.compile, the same shape and dtype) keeps the count as a GPU's."""
    return mx.softmax(x, axis=-1)


def _kda_layer_kernel_stand_in(qkv, windows, conv_w, f, b, A_log, dt_bias, gate, norm_w, eps, state):
    """Stands in for the KDA Layer kernel (kimi_mlx.kda.kda_decode_layer, ONE kernel on a GPU
    once its self-check passes; the CPU has no such kernel): one Concatenate of its activation
    inputs, whose views give y and the windows, and one elementwise kernel for the new state, so
    a count with it is at most one kernel per KDA layer above a GPU's."""
    B, T = qkv.shape[:2]
    H, Dv = gate.shape[-2:]
    z = mx.concatenate([qkv.reshape(B, -1), f.reshape(B, -1), b.reshape(B, -1), gate.reshape(B, -1)], axis=-1)
    y = z[:, : H * Dv].reshape(B, T, H, Dv)
    K1 = windows[0].shape[1]
    new_windows = [z[:, None, : w.shape[-1]] * mx.ones((1, K1, 1), dtype=w.dtype) for w in windows]
    return y, new_windows, state * 0.5


class _RouteKernelStandIn:
    """Stands in for the moe_route kernel (kimi_mlx.moe_route, ONE kernel on a GPU once its
    self-check passes): one ArgPartition of the logits, whose views give the ids, and one
    elementwise kernel for the weights, so a count with it is at most one kernel per MoE layer
    above a GPU's."""

    def __call__(self, logits, bias, top_k, renormalize, scale, shared=False):
        if shared:  # rows [..., 2k+2] (kimi_mlx.fused.FusedMoE): a constant plus one elementwise kernel
            E = logits.shape[-1]
            rows = mx.array(np.array([*range(top_k), E, *range(E + 1, E + 1 + top_k), 2 * E + 1], np.uint32))
            ids = rows + (logits[..., :1] * 0).astype(mx.uint32)
            return ids, ids[..., : top_k + 1].astype(mx.float32) * scale
        ids = mx.argpartition(logits, kth=top_k - 1, axis=-1)[..., :top_k]
        return ids, ids.astype(mx.float32) * scale

    def self_check(self, *args):
        return None


def graph_ops(*outputs) -> list[str]:
    """The primitive name of every node of the lazy graph behind `outputs`."""
    with tempfile.NamedTemporaryFile("w", suffix=".dot", delete=False) as f:
        path = f.name
    try:
        mx.export_to_dot(path, *outputs)
        lines = open(path).read().splitlines()
    finally:
        os.remove(path)
    return [line.split('label ="', 1)[1].split('"', 1)[0] for line in lines if "shape=rectangle" in line]


def kernels(ops: list[str]) -> int:
    return sum(1 for o in ops if o not in VIEW_OPS)


def layer_kinds(config: dict) -> dict[str, int]:
    """kind -> index of the first layer of that kind."""
    from kimi_mlx.config import ModelArgs

    args = ModelArgs.from_dict(config)
    out = {}
    for i in range(args.num_hidden_layers):
        kind = ("kda" if args.is_kda_layer(i) else "mla") + ("+moe" if args.is_moe_layer(i) else "+dense")
        out.setdefault(kind, i)
    return out


def _warm(fn, n: int = 2):
    """Run fn n times (evaluated): the first call traces/compiles; counts come from the next."""
    for _ in range(n):
        mx.eval(fn())


def count(ours, theirs, config: dict, paths: list[str], context: int = 64) -> dict:
    """{(who, kind): ops list} for one layer of each kind and the whole step ('step')."""
    kinds = layer_kinds(config)
    res = {}
    h = mx.random.normal((1, 1, config["hidden_size"]), key=mx.random.key(0)).astype(mx.bfloat16)
    y = mx.array([[1]])
    for path in paths:
        set_decode_path(path)
        try:
            for kind, i in kinds.items():
                c_ours, _ = planted_caches(config, context, seed=1)
                layer = ours.layers[i]
                _warm(lambda: layer(h, None, c_ours[i]))
                res[(f"ours-{path}", kind)] = graph_ops(layer(h, None, c_ours[i]))
            c_ours, _ = planted_caches(config, context, seed=1)
            _warm(lambda: mx.argmax(ours(y, cache=c_ours)[:, -1], axis=-1))
            res[(f"ours-{path}", "step")] = graph_ops(mx.argmax(ours(y, cache=c_ours)[:, -1], axis=-1))
        finally:
            set_decode_path(None)
    for kind, i in kinds.items():
        _, c_theirs = planted_caches(config, context, seed=1)
        res[("mlx-lm", kind)] = graph_ops(theirs.model.layers[i](h, None, c_theirs[i]))
    _, c_theirs = planted_caches(config, context, seed=1)
    res[("mlx-lm", "step")] = graph_ops(mx.argmax(theirs(y, cache=c_theirs)[:, -1], axis=-1))
    return res


def full_model_estimate(res: dict, who: str) -> tuple[int, int]:
    """(graph nodes, kernels) of a 27-layer decode step from the per-kind counts and the step's
    non-layer part (embedding, final norm, lm_head, argmax) of the small model."""
    small = {k: 0 for k in REAL_COUNTS}
    for kind, n in layer_kinds(SMALL_CONFIG).items():
        small[kind] = n
    small_counts = collections.Counter()
    from kimi_mlx.config import ModelArgs

    args = ModelArgs.from_dict(SMALL_CONFIG)
    for i in range(args.num_hidden_layers):
        small_counts[("kda" if args.is_kda_layer(i) else "mla") + ("+moe" if args.is_moe_layer(i) else "+dense")] += 1
    step = res[(who, "step")]
    rest_n = len(step) - sum(small_counts[k] * len(res[(who, k)]) for k in small_counts)
    rest_k = kernels(step) - sum(small_counts[k] * kernels(res[(who, k)]) for k in small_counts)
    n = rest_n + sum(c * len(res[(who, k)]) for k, c in REAL_COUNTS.items())
    kk = rest_k + sum(c * kernels(res[(who, k)]) for k, c in REAL_COUNTS.items())
    return n, kk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="compiled,eager", help="our decode paths to count")
    ap.add_argument("--rms-norm", choices=("gpu", "cpu"), default="gpu",
                    help="count mx.fast.rms_norm as one kernel as on a GPU (default) or as the CPU expands it")
    ap.add_argument("--kda-kernel", action="store_true",
                    help="count our KDA layers with the one-kernel decode step (a stand-in; <= +1 kernel per layer)")
    ap.add_argument("--route-kernel", action="store_true",
                    help="count our MoE router as the one-kernel moe_route (a stand-in; <= +1 kernel per layer)")
    ap.add_argument("--ops", action="store_true", help="print each kind's op histogram, ours vs mlx-lm")
    a = ap.parse_args()
    mx.set_default_device(mx.cpu)
    if a.rms_norm == "gpu":
        mx.fast.rms_norm = _rms_norm_as_on_gpu  # before any trace is made
    if a.kda_kernel:
        import kimi_mlx.kda_layer as kl

        kl.layer_kernel_ready = lambda *args: True
        kl.kda_decode_layer = _kda_layer_kernel_stand_in
    if a.route_kernel:
        from kimi_mlx import moe_route

        moe_route._use_backend(_RouteKernelStandIn(), available=True)
    config = quantized_config(SMALL_CONFIG)
    theirs, ours, _ = build_models(config)
    paths = a.paths.split(",")
    res = count(ours, theirs, config, paths)
    whos = [f"ours-{p}" for p in paths] + ["mlx-lm"]
    kinds = [*layer_kinds(config), "step"]
    print("\n| layer kind | " + " | ".join(f"{w}: nodes (kernels)" for w in whos) + " |")
    print("| --- |" + " --- |" * len(whos))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{len(res[(w, kind)])} ({kernels(res[(w, kind)])})" for w in whos) + " |")
    est = {w: full_model_estimate(res, w) for w in whos}
    print("| 27-layer step (estimate) | " + " | ".join(f"{n} ({k})" for n, k in est.values()) + " |")
    if a.ops:
        for kind in kinds[:-1]:
            print(f"\n{kind}: op counts (" + " / ".join(whos) + ")")
            hists = {w: collections.Counter(res[(w, kind)]) for w in whos}
            for op in sorted(set().union(*hists.values()), key=lambda o: -max(h[o] for h in hists.values())):
                print(f"  {op:28s} " + " ".join(f"{hists[w][op]:4d}" for w in whos)
                      + ("   (view)" if op in VIEW_OPS else ""))


if __name__ == "__main__":
    main()
