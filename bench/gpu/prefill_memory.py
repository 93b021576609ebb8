"""Where a long prefill's peak memory goes: per layer, one 2048-token step deep into a prompt.

    PYTHONPATH=$PWD python3 bench/gpu/prefill_memory.py --context 16384 --blocks-mb 1024,256
    python bench/gpu/prefill_memory.py --tiny                      # dry run on the CPU

The full-size random 4-bit model (bench/bench_gpu.py's builder). For each MLA key-block size
(mla_layer.SCORE_BLOCK_BYTES = SYNC_SCORE_BYTES): prefill context - step tokens as generate
does, then run the last step layer by layer, each evaluated on its own (output and cache), and
print the peak active memory above what was resident before the layer (mx.get_peak_memory),
with the seconds of the whole prefill and kimi_mlx.plan's activation estimate for the step.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gpu import FULL_CONFIG, TINY_CONFIG, build_models, quantized_config  # noqa: E402

from kimi_mlx import mla_layer  # noqa: E402
from kimi_mlx.config import ModelArgs  # noqa: E402
from kimi_mlx.generate import prefill_all  # noqa: E402
from kimi_mlx.plan import activation_bytes  # noqa: E402

GiB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--step", type=int, default=2048)
    ap.add_argument("--blocks-mb", default="1024,256")
    a = ap.parse_args()
    config = quantized_config(TINY_CONFIG if a.tiny else json.loads(FULL_CONFIG.read_text()))
    if a.tiny:
        a.context, a.step = min(a.context, 512), min(a.step, 128)
    _, model, _ = build_models(config)
    args = ModelArgs.from_dict(config)
    ids = mx.random.randint(3, args.vocab_size - 1, (a.context,))
    for mb in (int(x) for x in a.blocks_mb.split(",")):
        mla_layer.SCORE_BLOCK_BYTES = mla_layer.SYNC_SCORE_BYTES = mb << 20
        cache = model.make_cache()
        t0 = time.perf_counter()
        prefill_all(model, ids[: a.context - a.step], cache, a.step)
        seconds = time.perf_counter() - t0
        snapshot = [c.copy() for c in cache]
        mx.clear_cache()
        resident = mx.get_active_memory()
        mx.reset_peak_memory()
        model.model(ids[None, a.context - a.step:], snapshot)  # the last step as generate runs it
        mx.eval([c.state for c in snapshot])
        whole = (mx.get_peak_memory() - resident) / GiB
        del snapshot
        h = model.model.embed_tokens(ids[None, a.context - a.step:])
        mx.eval(h)
        peaks = {}
        for i, (layer, c) in enumerate(zip(model.layers, cache)):
            mx.clear_cache()
            resident = mx.get_active_memory()
            mx.reset_peak_memory()
            h = layer(h, None, c)
            mx.eval(h, c.state)
            kind = ("kda" if layer.is_kda else "mla") + ("+moe" if hasattr(layer.mlp, "switch_mlp") else "+dense")
            peaks.setdefault(kind, []).append((mx.get_peak_memory() - resident) / GiB)
        plan = activation_bytes(args, a.step, a.context, 1, 2) / GiB
        print(f"blocks {mb} MB: prefill of {a.context - a.step} tokens {seconds:.1f} s; last step's peak above "
              f"resident: whole step {whole:.2f} GiB; per layer kind (GiB, max / median): "
              + ", ".join(f"{k} {max(v):.2f} / {sorted(v)[len(v) // 2]:.2f}" for k, v in peaks.items())
              + f"; plan activations {plan:.2f}", flush=True)
        del cache
        mx.clear_cache()


if __name__ == "__main__":
    main()
