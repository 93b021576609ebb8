"""Long-context prefill: peak memory against context length, and prefill tokens/s.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python bench/bench_long_context.py \
        [--contexts 8192 32768 65536 131072 262144] [--kv-bits 16]

A tiny Kimi-Linear (3 KDA + 1 MLA layer with one head: attention is O(T^2) and this is a CPU; float32;
the real model's 576-wide latent) prefills
each context in steps of 512 tokens, in a fresh process per context so peaks do not mix. Peak
memory is MLX's own counter (mx.get_peak_memory) and the process's max RSS. A least-squares line
through (context, peak) of the contexts past one key block (FIT_FROM: before that the score block
itself still grows) gives the slope and intercept; the predicted slope is the latent cache's
bytes per token from kimi_mlx.plan (MLA layers x row bytes). Slope ~ prediction means nothing but
the latent cache grows with the context. Writes bench/results/bench_long_context.json.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = {
    "model_type": "kimi_linear", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 4, "num_attention_heads": 1, "num_key_value_heads": 1,
    "kv_lora_rank": 512, "qk_nope_head_dim": 8, "qk_rope_head_dim": 64, "v_head_dim": 8,
    "mla_use_nope": True, "q_lora_rank": None, "num_experts": 4, "num_experts_per_token": 2,
    "moe_intermediate_size": 64, "num_shared_experts": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.446, "rms_norm_eps": 1e-5, "model_max_length": 1048576,
    "linear_attn_config": {"full_attn_layers": [4], "kda_layers": [1, 2, 3], "num_heads": 2,
                           "head_dim": 32, "short_conv_kernel_size": 4},
    "dtype": "float32",  # MLX's CPU matmuls have no bf16 BLAS path (~8x slower): fp32 here
}
STEP = 512
FIT_FROM = 65536  # contexts fitted: from here the attention's key block has its full size


def one(context: int, kv_bits: int | None, folder: Path) -> dict:
    """Prefill `context` random tokens in this process; report peaks and speed."""
    import mlx.core as mx

    from kimi_mlx import load_model
    from kimi_mlx.generate import prefill_all
    from kimi_mlx.plan import plan_memory

    model = load_model(folder, dtype=mx.float32)
    ids = mx.random.randint(3, CONFIG["vocab_size"], (context,), key=mx.random.key(0))
    mx.eval(ids)
    warm = model.make_cache(kv_bits)  # compile / allocate once, not timed
    prefill_all(model, ids[:STEP], warm, STEP)
    del warm
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    cache = model.make_cache(kv_bits)
    t0 = time.perf_counter()
    prefill_all(model, ids, cache, STEP)
    seconds = time.perf_counter() - t0
    cache_bytes = sum(c.nbytes for c in cache if hasattr(c, "nbytes")) + sum(
        a.nbytes for c in cache if not hasattr(c, "nbytes") for a in c.state)
    plan = plan_memory(CONFIG, context, kv_bits, prefill_step=STEP, memory_bytes=1 << 40)
    return {
        "context": context, "seconds": seconds, "tokens_per_s": context / seconds,
        "peak_bytes": mx.get_peak_memory(), "base_bytes": base, "cache_bytes": cache_bytes,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "plan_latent_bytes": plan.latent_cache, "plan_kda_bytes": plan.kda_states,
        "plan_activation_bytes": plan.activations,
    }


def fit(xs, ys):
    n = len(xs)
    mx_, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx_) ** 2 for x in xs)
    return slope, my - slope * mx_


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072, 262144])
    parser.add_argument("--kv-bits", type=int, default=None)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one context
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.kv_bits, a.folder)))
        return

    import mlx.core as mx

    from kimi_mlx.model import Model
    from kimi_mlx.config import ModelArgs
    from kimi_mlx.plan import latent_row_bytes
    from mlx.utils import tree_flatten

    args = ModelArgs.from_dict(CONFIG)
    mx.random.seed(0)
    model = Model(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mx.save_safetensors(str(folder / "model.safetensors"),
                            {k: v * 0.5 for k, v in tree_flatten(model.parameters())})
        (folder / "config.json").write_text(json.dumps(CONFIG))
        rows = []
        for context in a.contexts:
            cmd = [sys.executable, __file__, "--one", str(context), "--folder", str(folder)]
            if a.kv_bits:
                cmd += ["--kv-bits", str(a.kv_bits)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{context:>8} tokens  {r['tokens_per_s']:8.0f} tok/s  peak {r['peak_bytes'] / 2**20:8.1f} MiB  "
                  f"(cache {r['cache_bytes'] / 2**20:7.1f} MiB, peak - cache "
                  f"{(r['peak_bytes'] - r['cache_bytes']) / 2**20:6.1f} MiB)  max RSS {r['max_rss_bytes'] / 2**20:7.1f} MiB",
                  flush=True)
    mla_layers = sum(not args.is_kda_layer(i) for i in range(args.num_hidden_layers))
    predicted = mla_layers * latent_row_bytes(args, a.kv_bits or 16, 4)
    fitted = [r for r in rows if r["context"] >= FIT_FROM] if sum(r["context"] >= FIT_FROM for r in rows) >= 2 else rows
    xs = [r["context"] for r in fitted]
    slope, intercept = fit(xs, [r["peak_bytes"] for r in fitted])
    rss_slope, rss_intercept = fit(xs, [r["max_rss_bytes"] for r in fitted])
    print(f"\nfitted over contexts {xs}")
    print(f"peak (MLX) = {slope:.1f} B/token x context + {intercept / 2**20:.1f} MiB;  "
          f"predicted slope (latent cache) {predicted} B/token;  ratio {slope / predicted:.3f}")
    print(f"max RSS    = {rss_slope:.1f} B/token x context + {rss_intercept / 2**20:.1f} MiB")
    out = ROOT / "bench" / "results" / "bench_long_context.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"config": CONFIG, "kv_bits": a.kv_bits or 16, "step": STEP, "rows": rows,
                               "slope_bytes_per_token": slope, "intercept_bytes": intercept,
                               "predicted_slope": predicted, "rss_slope": rss_slope,
                               "rss_intercept": rss_intercept}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
