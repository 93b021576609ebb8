"""MLA attention over a long latent cache on a GPU: which form of the same math runs fastest?

    PYTHONPATH=$PWD python3 bench/gpu/mla_forms.py --budget 200     # on the H200 (MLX CUDA)
    python bench/gpu/mla_forms.py --tiny                             # dry run on the CPU

One MLA layer of the real model (32 heads, latent 512 + 64, Dn 128, Dv 128, bf16), random weights
and a planted latent cache; only the attention over the cache (kimi_mlx.mla_layer's `attend`) is
timed, synced, median of repeats. Not a test: timings are never asserted; each variant's output
is compared with the library's current form (relative error, fp32 reference).

decode   one query (T=1) over S cached keys, S = 1k / 16k / 64k / 128k:
  current      MLAttention.attend as shipped (absorbed form; one block per 64k page)
  full_values  scores, softmax, then p @ latent with all 576 columns (values = the first 512):
               no strided [..., :512] operand, 12% more multiply-adds
  split_K      full_values with the keys cut into K-key slices: a batched matmul over the slices
               (one [H, K] x [K, 576] product each) and a sum: more thread blocks than one
               [H, S] x [S, 576] product with its long inner dimension
  sdpa         mx.fast.scaled_dot_product_attention as MQA (32 query heads, one 576-wide key
               head, values the latent): if MLX runs it for these head sizes
prefill  one 2048-token step over a 64k-token prefix (the middle of a 128k prompt):
  current                  as shipped (expanded form, key blocks of SCORE_BLOCK_BYTES, a host
                           sync per block)
  blocks_<MB>_sync_<MB>    SCORE_BLOCK_BYTES / SYNC_SCORE_BYTES set to these sizes
  sdpa_expanded            the prefix's per-head keys / values expanded at once, then
                           mx.fast.scaled_dot_product_attention (memory: the expanded prefix)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kimi_mlx import mla_layer  # noqa: E402
from kimi_mlx.cache import LatentCache  # noqa: E402
from kimi_mlx.config import ModelArgs  # noqa: E402
from kimi_mlx.precision import relative_error  # noqa: E402

FULL_CONFIG = ROOT / "tests" / "data" / "kimi_linear_48b_a3b_config.json"
LOG: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def timed(fn, repeats: int) -> tuple[float, mx.array]:
    """Median seconds of fn() evaluated (one warm-up), and its last output."""
    out = fn()
    mx.eval(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def layer_and_cache(args: ModelArgs, S: int, seed: int):
    mx.random.seed(seed)
    layer = mla_layer.MLAttention(args)
    layer.set_dtype(mx.bfloat16)
    R, P = args.kv_lora_rank, args.qk_rope_head_dim
    cache = LatentCache()
    cache.update((0.5 * mx.random.normal((1, S, R + P))).astype(mx.bfloat16))
    mx.eval(layer.parameters(), cache.state)
    return layer, cache


def attend_once(layer, cache, q, latent):
    """The library's attend on a snapshot of the cache (the snapshot's tail write copies nothing
    the next call needs: each call starts from the same S keys)."""
    return layer.attend(q, latent, cache.copy())


def decode_section(args: ModelArgs, sizes, repeats: int, res: dict, deadline) -> None:
    H, R, P, Dn = args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim, args.qk_nope_head_dim
    for S in sizes:
        if deadline() < 10:
            log(f"decode S={S}: skipped (budget)")
            continue
        layer, cache = layer_and_cache(args, S, seed=S)
        q = (0.5 * mx.random.normal((1, H, 1, Dn + P))).astype(mx.bfloat16)
        latent = (0.5 * mx.random.normal((1, 1, R + P))).astype(mx.bfloat16)
        full = cache.copy()
        full.update(latent)
        L = full.segments()  # [(start, (latent [1, n, R+P],))]
        lat = mx.concatenate([a[0] for _, a in L], axis=1) if len(L) > 1 else L[0][1][0]  # [1, S+1, R+P]
        mx.eval(lat)
        q_lat = layer.embed_q(q[..., :Dn])  # [1, H, 1, R]
        q_cat = (mx.concatenate([q_lat, q[..., Dn:]], axis=-1) * layer.scale).reshape(1, H, R + P)
        mx.eval(q_cat)

        def current():
            return attend_once(layer, cache, q, latent)

        def probs():
            s = q_cat @ lat.swapaxes(1, 2)  # [1, H, S+1]
            return mx.softmax(s, axis=-1, precise=True).astype(lat.dtype)

        def full_values():
            return (probs() @ lat)[..., :R].reshape(1, H, 1, R)

        def split_k(K):
            def fn():
                p = probs()  # [1, H, n]
                n = p.shape[-1]
                main = n // K * K
                pm = p[..., :main].reshape(1, H, main // K, K).transpose(0, 2, 1, 3)  # [1, nb, H, K]
                vm = lat[:, :main].reshape(1, main // K, K, R + P)  # [1, nb, K, R+P]
                o = (pm @ vm).sum(axis=1)  # [1, H, R+P] (fp32 accumulation inside each product only)
                if main < n:
                    o = o + p[..., main:] @ lat[:, main:]
                return o[..., :R].reshape(1, H, 1, R)
            return fn

        def sdpa():
            qq = q_cat.reshape(1, H, 1, R + P)
            k = lat[:, None]  # [1, 1, S+1, R+P]
            o = mx.fast.scaled_dot_product_attention(qq, k, k, scale=1.0)  # values: the whole latent
            return o[..., :R]

        row = {}
        t_ref, ref = timed(current, repeats)
        row["current"] = {"ms": 1e3 * t_ref}
        variants = [("full_values", full_values)] + [(f"split_{K}", split_k(K)) for K in (1024, 4096)] + [("sdpa", sdpa)]
        for name, fn in variants:
            try:
                t, out = timed(fn, repeats)
                row[name] = {"ms": 1e3 * t, "rel_err": relative_error(out.astype(mx.float32), ref.astype(mx.float32))}
            except Exception as e:
                row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        res.setdefault("decode", {})[S] = row
        log(f"decode S={S}: " + ", ".join(f"{k} {v.get('ms', float('nan')):.3f} ms"
                                          + (f" (err {v['rel_err']:.1e})" if "rel_err" in v else "")
                                          + (f" [{v['error']}]" if "error" in v else "") for k, v in row.items()))
        del layer, cache, full, lat
        mx.clear_cache()


def prefill_section(args: ModelArgs, prefix: int, T: int, repeats: int, res: dict, deadline) -> None:
    H, R, P, Dn, Dv = (args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim, args.qk_nope_head_dim,
                       args.v_head_dim)
    layer, cache = layer_and_cache(args, prefix, seed=1)
    q = (0.5 * mx.random.normal((1, H, T, Dn + P))).astype(mx.bfloat16)
    latent = (0.5 * mx.random.normal((1, T, R + P))).astype(mx.bfloat16)
    mx.eval(q, latent)
    row = {}
    saved = (mla_layer.SCORE_BLOCK_BYTES, mla_layer.SYNC_SCORE_BYTES)
    t_ref, ref = timed(lambda: attend_once(layer, cache, q, latent), repeats)
    row["current"] = {"ms": 1e3 * t_ref, "peak_gib": mx.get_peak_memory() / 2**30}
    log(f"prefill T={T} over {prefix}: current {1e3 * t_ref:.1f} ms")
    for block_mb, sync_mb in ((256, 256), (1024, 1024), (64, 1024), (256, 2048), (1024, 4096)):
        if deadline() < 15:
            break
        name = f"blocks_{block_mb}_sync_{sync_mb}"
        mla_layer.SCORE_BLOCK_BYTES, mla_layer.SYNC_SCORE_BYTES = block_mb << 20, sync_mb << 20
        try:
            mx.clear_cache()
            mx.reset_peak_memory()
            t, out = timed(lambda: attend_once(layer, cache, q, latent), repeats)
            row[name] = {"ms": 1e3 * t, "rel_err": relative_error(out, ref), "peak_gib": mx.get_peak_memory() / 2**30}
        except Exception as e:
            row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        finally:
            mla_layer.SCORE_BLOCK_BYTES, mla_layer.SYNC_SCORE_BYTES = saved
        log(f"  {name}: {row[name]}")
    if deadline() > 15:
        def sdpa_expanded():
            full = cache.copy()
            full.update(latent)
            lat = mx.concatenate([a[0] for _, a in full.segments()], axis=1)[:, None]  # [1, 1, S, R+P]
            S = lat.shape[2]
            k = mx.concatenate([layer.embed_q(lat[..., :R], transpose=False),
                                mx.broadcast_to(lat[..., R:], (1, H, S, P))], axis=-1)  # [1, H, S, Dn+P]
            v = layer.unembed_out(lat[..., :R])  # [1, H, S, Dv]
            keep = mx.arange(S - T, S)[:, None] >= mx.arange(S)[None]  # [T, S] causal, queries last
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=layer.scale, mask=keep)
        try:
            mx.clear_cache()
            mx.reset_peak_memory()
            t, out = timed(sdpa_expanded, repeats)
            row["sdpa_expanded"] = {"ms": 1e3 * t, "rel_err": relative_error(out.astype(mx.float32), ref),
                                    "peak_gib": mx.get_peak_memory() / 2**30}
        except Exception as e:
            row["sdpa_expanded"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        log(f"  sdpa_expanded: {row['sdpa_expanded']}")
    res.setdefault("prefill", {})[f"{T}@{prefix}"] = row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=200.0, help="seconds this call may take in all")
    ap.add_argument("--tiny", action="store_true", help="small sizes (a CPU dry run)")
    ap.add_argument("--only", default="decode,prefill")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t_start = time.perf_counter()

    def deadline() -> float:
        return a.budget - (time.perf_counter() - t_start)

    args = ModelArgs.from_dict(json.loads(FULL_CONFIG.read_text()))
    res = {"device": str(mx.default_device()), "mlx": mx.__version__, "tiny": a.tiny}
    out_dir = Path(a.out or os.environ.get("OUT", "/tmp"))
    sections = a.only.split(",")
    try:
        if "decode" in sections:
            decode_section(args, (1024, 4096) if a.tiny else (1024, 16384, 65536, 131072), 3 if a.tiny else 20,
                           res, deadline)
        if "prefill" in sections:
            if a.tiny:
                prefill_section(args, 1024, 256, 1, res, deadline)
            else:
                prefill_section(args, 65536, 2048, 2, res, deadline)
    except Exception:
        log(traceback.format_exc())
    (out_dir / "mla_forms.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "mla_forms.log").write_text("\n".join(LOG) + "\n")
    log(f"done in {time.perf_counter() - t_start:.0f} s; wrote {out_dir / 'mla_forms.json'}")


if __name__ == "__main__":
    main()
