"""Several ranks against one: prefill and decode tokens/s and per-rank memory of a split model.

    python bench/bench_parallel.py --tiny                                       # one process (the baseline)
    mlx.launch --backend ring -n 2 -- python bench/bench_parallel.py --tiny     # two ranks (CPU: checks this script)
    PYTHONPATH=$PWD python3 bench/bench_parallel.py                             # full size, one GPU
    mlx.launch --backend nccl -n 2 -- python3 bench/bench_parallel.py           # full size, two GPUs (NCCL)
    KIMI_MLX_PARALLEL=pipeline mlx.launch ...                                   # pipeline instead of tensor
    PYTHONPATH=$PWD python3 bench/gpu/parallel_x2.py                            # all three on nvidia-h200-x2, one table

The model: the released architecture (tests/data/kimi_linear_48b_a3b_config.json) with random
4-bit weights (router gate 8-bit), made lazily with the same seed on every rank and split before
it is evaluated, so a rank only ever holds its share (plus one layer while it builds). Measured:
time to first token and prompt tok/s for --prompt tokens; decode tok/s over --decode tokens
after it (kimi_mlx.generate.generate_tokens, greedy; rank 0's tokens broadcast as in the CLI);
per rank: the bytes its parameters hold and MLX's peak memory. Rank 0 prints one JSON line and
writes it to $OUT/bench_parallel_<N>.json (or --out). Run it with 1 and with N ranks to compare.
Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kimi_mlx.config import ModelArgs  # noqa: E402
from kimi_mlx.generate import generate_tokens  # noqa: E402
from kimi_mlx.parallel import join_world, parallel_mode  # noqa: E402

FULL_CONFIG = ROOT / "tests" / "data" / "kimi_linear_48b_a3b_config.json"
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
        "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64, "num_experts": 8,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "num_experts_per_token": 2, "moe_intermediate_size": 128, "vocab_size": 1024,
        "linear_attn_config": {"full_attn_layers": [4], "kda_layers": [1, 2, 3], "num_heads": 4, "head_dim": 64,
                               "short_conv_kernel_size": 4}}
GROUP, BITS, GATE_BITS = 64, 4, 8


def config(tiny: bool) -> dict:
    cfg = json.loads(FULL_CONFIG.read_text())
    if tiny:
        cfg.update(TINY)
    q = {"group_size": GROUP, "bits": BITS}
    for i in range(cfg.get("first_k_dense_replace", 1), cfg["num_hidden_layers"]):
        q[f"model.layers.{i}.mlp.gate"] = {"group_size": GROUP, "bits": GATE_BITS}
    cfg["quantization"] = q
    return cfg


def random_model(cfg: dict):
    """Model(cfg) quantized as mlx-lm converts it, with LAZY random parameters (same values on
    every rank for the same seed): packed words random bits, scales keeping activations O(1)."""
    from kimi_mlx.loading import _quantize_like_checkpoint
    from kimi_mlx.model import Model

    args = ModelArgs.from_dict(cfg)
    model = Model(args)
    names = {n: p for n, p in tree_flatten(model.parameters())}
    # The loader's rule quantizes a module when its `.scales` exist: name every weight's but norms and convs.
    quantized = {f"{n.rsplit('.', 1)[0]}.scales": None for n in names if n.endswith(".weight")
                 and not n.endswith(("norm.weight", "conv.weight"))}
    _quantize_like_checkpoint(model, args, quantized)
    mx.random.seed(0)
    params = dict(tree_flatten(model.parameters()))
    out = []
    for name, p in params.items():
        base = name.rsplit(".", 1)[0]
        if p.dtype == mx.uint32:
            w = mx.random.randint(-(2**31), 2**31 - 1, p.shape, dtype=mx.int32).view(mx.uint32)
        elif name.endswith((".scales", ".biases")):
            levels = 2 ** (params[base + ".weight"].shape[-1] * 32 // (p.shape[-1] * GROUP))
            s = 1.0 / ((levels / 12**0.5) * (p.shape[-1] * GROUP) ** 0.5)
            w = mx.full(p.shape, s if name.endswith(".scales") else -s * (levels - 1) / 2, dtype=mx.bfloat16)
        elif name.endswith("A_log"):
            w = mx.log(mx.random.uniform(1.0, 16.0, p.shape))
        elif name.endswith(("dt_bias", "e_score_correction_bias")):
            w = 0.1 * mx.random.normal(p.shape)
        elif p.ndim == 1:
            w = mx.ones(p.shape, dtype=mx.bfloat16)
        else:
            w = (mx.random.normal(p.shape) * p.shape[-1] ** -0.5).astype(mx.bfloat16)
        out.append((name, w))
    model.load_weights(out, strict=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small model (CPU check of the script)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 4096; tiny 256)")
    ap.add_argument("--decode", type=int, default=None, help="decoded tokens (default 128; tiny 32)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    prompt_len = a.prompt or (256 if a.tiny else 4096)
    n_decode = a.decode or (32 if a.tiny else 128)
    group = join_world()
    N, rank = group.size(), group.rank()
    mode = parallel_mode()
    t0 = time.perf_counter()
    model = random_model(config(a.tiny))
    if N > 1:
        from kimi_mlx.parallel import shard_pipeline, shard_tensor

        (shard_tensor if mode == "tensor" else shard_pipeline)(model, group)
    for layer in model.layers:  # one layer's full random tensors at a time
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    model.eval()
    build_s = time.perf_counter() - t0
    held = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    mx.random.seed(1)
    prompt = mx.random.randint(3, model.args.vocab_size, (prompt_len,))
    for warm in (True, False):  # the first run compiles kernels and fills the allocator
        mx.reset_peak_memory()
        t = time.perf_counter()
        tokens = generate_tokens(model, prompt, max_tokens=(4 if warm else n_decode))
        next(tokens)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        n = sum(1 for _ in tokens)
        decode_s = time.perf_counter() - t
    peak = mx.get_peak_memory()
    per_rank = mx.distributed.all_gather(mx.array([[float(held), float(peak)]]), group=group) if N > 1 else \
        mx.array([[float(held), float(peak)]])
    result = {
        "ranks": N, "mode": mode if N > 1 else "one process", "device": str(mx.default_device()),
        "model": "tiny" if a.tiny else "Kimi-Linear-48B-A3B random 4-bit", "build_s": round(build_s, 1),
        "prompt_tokens": prompt_len, "ttft_s": round(ttft, 3), "prefill_tok_s": round(prompt_len / ttft, 1),
        "decode_tokens": n, "decode_tok_s": round(n / max(decode_s, 1e-9), 2),
        "weights_gib_per_rank": [round(r[0] / 2**30, 3) for r in per_rank.tolist()],
        "peak_gib_per_rank": [round(r[1] / 2**30, 3) for r in per_rank.tolist()],
    }
    if rank == 0:
        print(json.dumps(result))
        out = a.out or (Path(os.environ["OUT"]) / f"bench_parallel_{N}.json" if os.environ.get("OUT") else None)
        if out:
            Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
