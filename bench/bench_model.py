"""Prefill and decode speed: kimi_mlx against mlx-lm's `kimi_linear`, same random weights, one process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python bench/bench_model.py

(on Linux the BLAS inside `mlx[cpu]` is ~10x slower than Debian's OpenBLAS; whichever is used,
both models use the same one.) Prints a table of medians after warm-up and writes JSON to
bench/results/bench_model.json. Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_mlx import load_model  # noqa: E402

CONFIG = {  # the shape: hidden 1024, 8 layers of which 2 MLA, 64 experts top-8 + shared
    "model_type": "kimi_linear", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "mla_use_nope": True, "q_lora_rank": None, "num_experts": 64, "num_experts_per_token": 8,
    "moe_intermediate_size": 256, "num_shared_experts": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.446, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
    "num_expert_group": 1, "topk_group": 1, "use_grouped_topk": True, "moe_layer_freq": 1,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "model_max_length": 1048576, "tie_word_embeddings": False,
    "linear_attn_config": {"full_attn_layers": [4, 8], "kda_layers": [1, 2, 3, 5, 6, 7],
                           "num_heads": 8, "head_dim": 128, "short_conv_kernel_size": 4},
}


def build_mlx_lm_model(folder: Path):
    """A random mlx-lm model, saved in its layout so kimi_mlx loads the very same tensors."""
    from mlx_lm.models import kimi_linear

    mx.random.seed(0)
    model = kimi_linear.Model(kimi_linear.ModelArgs.from_dict(CONFIG))
    params = dict(tree_flatten(model.parameters()))
    # Gentle random weights: activations O(1) so neither side hits NaN paths.
    params = {k: (v * 0.5 if v.ndim >= 2 else v) for k, v in params.items()}
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return model


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prefill_fn(model, tokens, ours: bool, cache_only: bool = False):
    """One prefill of `tokens`, ending with the last position's logits.

    mlx-lm's model returns logits for every position (its lm_head over the whole prompt), the
    comparison the issue sets. cache_only runs it the way mlx-lm's generate_step does: all but
    the last token evaluating only the cache state (the lazy logits are never computed), then
    the last token alone."""
    def run():
        cache = model.make_cache()
        if ours:
            out = model(tokens, cache=cache, last_only=True)
        elif cache_only:
            model(tokens[:, :-1], cache=cache)
            mx.eval([c.state for c in cache])
            out = model(tokens[:, -1:], cache=cache)
        else:
            out = model(tokens, cache=cache)[:, -1:]
        mx.eval(out)
        return cache

    return run


def decode_fn(model, tokens, n_steps: int, ours: bool):
    def run():
        cache = prefill_fn(model, tokens[:, :16], ours)()
        y = tokens[:, 16:17]
        t0 = time.perf_counter()
        for _ in range(n_steps):
            logits = model(y, cache=cache)
            y = mx.argmax(logits[:, -1:], axis=-1)
            mx.eval(y)
        return (time.perf_counter() - t0) / n_steps

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        theirs = build_mlx_lm_model(Path(tmp))
        ours = load_model(tmp)
    tokens = mx.random.randint(0, CONFIG["vocab_size"], (1, a.prompt)).astype(mx.int32)

    rows = {}
    t_cache_only = median_time(prefill_fn(theirs, tokens, False, cache_only=True), a.repeats)
    for name, model, is_ours in (("mlx-lm", theirs, False), ("kimi-mlx", ours, True)):
        t_prefill = median_time(prefill_fn(model, tokens, is_ours), a.repeats)
        run_decode = decode_fn(model, tokens, a.decode, is_ours)
        run_decode()
        t_decode = statistics.median(run_decode() for _ in range(a.repeats))
        rows[name] = {"prefill_tok_s": a.prompt / t_prefill, "decode_tok_s": 1.0 / t_decode}

    base = rows["mlx-lm"]
    print(f"prompt {a.prompt} tokens, decode {a.decode} steps, median of {a.repeats}; "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '(none)')}")
    print(f"{'':10s} {'prefill tok/s':>14s} {'ratio':>7s} {'decode tok/s':>13s} {'ratio':>7s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['prefill_tok_s']:14.1f} {r['prefill_tok_s'] / base['prefill_tok_s']:7.2f} "
              f"{r['decode_tok_s']:13.2f} {r['decode_tok_s'] / base['decode_tok_s']:7.2f}")
    cache_only_tps = a.prompt / t_cache_only
    print(f"mlx-lm prefill as its generate_step runs it (no logits over the prompt): {cache_only_tps:.1f} tok/s; "
          f"kimi-mlx {rows['kimi-mlx']['prefill_tok_s'] / cache_only_tps:.2f}x that")
    rows["mlx-lm (no prompt logits)"] = {"prefill_tok_s": cache_only_tps}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_model.json").write_text(json.dumps({"config": CONFIG, "args": vars(a), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
