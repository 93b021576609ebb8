"""Our KDA kernels (metal/*.metal) inside MLX on a GPU: correct at the real shape, and do they win?

    PYTHONPATH=$PWD python3 bench/gpu/check_kernels_mlx.py --budget 230   # on the H200 (MLX CUDA)
    python bench/gpu/check_kernels_mlx.py --tiny --emulator              # dry run on the CPU: the
                                           # kernels on the CPU emulator (tests/metal_emu), tiny sizes

Sections (each prints as it finishes; the table is printed last, JSON + log under $OUT or --out):
  check    each kernel configuration the runtime uses, at the real shape (H=32, Dk=Dv=128, batch 1
           and 8, fp32 state, bf16 and fp32 inputs): the runtime's own self-check verdict
           (kernel_status / layer_status), then relative error ||out - ref|| / ||ref|| against
           kda_naive (the Layer step against prologue.decode_layer_ops, kda_naive inside) for
           kda_decode at T=1 and T=69, the Layer step at T=1; and the Layer kernel called inside
           mx.compile against the same call outside it.
  layer    one KDA layer's decode step (KDA attention + dense SwiGLU MLP, 4-bit weights as the
           real model, 1k-token planted state), B=1 and 8: ops path (KIMI_MLX_KERNELS=ops, auto's
           KDA path for one token) against the Layer kernel, eager and compiled (decode.py; the
           kernel inside the layer's trace, and "compiled-split": between two traces,
           decode.KERNEL_IN_TRACE False), with graph nodes / kernel nodes of the eager step.
  prefill  the KDA recurrence over 512 (the model's prefill step), 2048 and 4096 tokens (B=1,
           bf16 q/k/v): chunked ops (auto's path without the kernels) against kda_decode over T
           (the kernels' route for every T). Decides KERNEL_MAX_T (kimi_mlx/kda/dispatch.py).
  model    if time is left: the full-size random 4-bit model (bench/bench_gpu.py's builder),
           one synced decode step and decode tok/s at 1k context, kernels auto vs ops.
Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kimi_mlx import decode as decode_mod  # noqa: E402
from kimi_mlx.cache import KDACache  # noqa: E402
from kimi_mlx.config import ModelArgs  # noqa: E402
from kimi_mlx.kda import kda_chunked, kda_naive, metal, set_kda_path  # noqa: E402
from kimi_mlx.kda.prologue import decode_layer_ops, prologue  # noqa: E402
from kimi_mlx.model import DecoderLayer  # noqa: E402
from kimi_mlx.precision import relative_error  # noqa: E402

FULL_CONFIG = ROOT / "tests" / "data" / "kimi_linear_48b_a3b_config.json"
LOG: list[str] = []


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


@contextmanager
def kernels(on: bool):
    """The kernels forced on (mode "metal": an error, never a silent fallback) or off (mode "ops",
    auto's KDA path)."""
    metal.set_kernel_mode("metal" if on else "ops")
    set_kda_path("metal" if on else None)
    try:
        yield
    finally:
        set_kda_path(None)
        metal.set_kernel_mode(None)


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() evaluated (synced), after warm-ups (first call: compiles)."""
    for _ in range(warmup):
        mx.eval(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def rnd(rng, *shape, scale=1.0, dtype=mx.float32):
    return mx.array((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)


def recurrence_inputs(rng, B, T, H, D, dtype):
    """(q, k, v, g, beta, state) by the layer's prologue from random raw inputs; q, k, v in dtype."""
    qr, kr, v, f = (rnd(rng, B, T, H, D) for _ in range(4))
    b, A_log, dt_bias = rnd(rng, B, T, H), 0.5 * rnd(rng, H), rnd(rng, H * D)
    q, k, g, beta = prologue(qr, kr, f, b, A_log, dt_bias)
    state = rnd(rng, B, H, D, D, scale=0.5)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta, state


def layer_inputs(rng, B, T, H, D, K, dtype):
    C = H * D
    return (rnd(rng, B, T, 3 * C, dtype=dtype), [rnd(rng, B, K - 1, C, dtype=dtype) for _ in range(3)],
            rnd(rng, 3 * C, K, 1, scale=0.5, dtype=dtype), rnd(rng, B, T, H, D, dtype=dtype), rnd(rng, B, T, H, dtype=dtype),
            0.5 * rnd(rng, H), rnd(rng, H * D), rnd(rng, B, T, H, D, dtype=dtype),
            (1 + 0.1 * rnd(rng, D)).astype(dtype), 1e-5, rnd(rng, B, H, D, D, scale=0.5))


# --------------------------------------------------------------------------------------------

def section_check(res, H, D, batches, emulator: bool):
    kern = metal._current()[1]
    rows = []
    rng = np.random.default_rng(0)
    for dtype in (mx.bfloat16, mx.float32):
        t0 = time.perf_counter()
        status = metal.kernel_status(H, D, D, dtype, dtype)
        lstatus = metal.layer_status(H, D, D, 4, dtype)
        say(f"self-check H={H} D={D} {dtype}: kda_metal {status or 'passed'}; layer {lstatus or 'passed'} "
            f"({time.perf_counter() - t0:.1f} s incl. compiles)")
        rows.append({"what": "runtime self-check", "dtype": str(dtype), "kda_metal": status or "passed",
                     "layer": lstatus or "passed"})
        for B in batches:
            first = len(rows)
            for T in (1, 69):
                args = recurrence_inputs(rng, B, T, H, D, dtype)
                ref = kda_naive(*args)
                out = kern.decode(*args)
                rows.append({"what": f"kda_decode T={T}", "B": B, "dtype": str(dtype),
                             "o": relative_error(out[0], ref[0]), "state": relative_error(out[1], ref[1])})
            largs = layer_inputs(rng, B, 1, H, D, 4, dtype)
            y, win, st = kern.layer(*largs)
            ry, rwin, rst = decode_layer_ops(*largs)
            rows.append({"what": "layer step T=1", "B": B, "dtype": str(dtype), "o": relative_error(y, ry),
                         "state": relative_error(st, rst),
                         "windows_equal": all(mx.array_equal(a, b).item() for a, b in zip(win, rwin))})
            if not emulator:
                try:
                    def flat(qkv, w0, w1, w2, st):
                        cy, cw, cst = kern.layer(qkv, [w0, w1, w2], *largs[2:10], st)
                        return cy, *cw, cst

                    cy, *_, cst = mx.compile(flat)(largs[0], *largs[1], largs[10])
                    rows.append({"what": "layer step inside mx.compile", "B": B, "dtype": str(dtype),
                                 "o": relative_error(cy, y), "state": relative_error(cst, st)})
                except Exception as e:
                    rows.append({"what": "layer step inside mx.compile", "B": B, "dtype": str(dtype),
                                 "error": f"{type(e).__name__}: {str(e)[:200]}"})
            for r in rows[first:]:
                say("  ", json.dumps(r, default=str))
    res["check"] = rows


def build_layer(H, D, hidden, inter, B, context, quantize: bool):
    """A KDA decoder layer with a dense SwiGLU MLP at the given sizes, random weights (4-bit like
    the real model when quantize), and a planted cache (conv windows, fp32 state)."""
    cfg = json.loads(FULL_CONFIG.read_text())
    cfg["hidden_size"], cfg["intermediate_size"] = hidden, inter
    cfg["linear_attn_config"] = {**cfg["linear_attn_config"], "num_heads": H, "head_dim": D}
    args = ModelArgs.from_dict(cfg)
    layer = DecoderLayer(args, 0)
    assert layer.is_kda and not hasattr(layer.mlp, "experts"), "layer 0 should be KDA with a dense MLP"
    mx.random.seed(0)
    from mlx.utils import tree_flatten

    weights = []
    for name, p in tree_flatten(layer.parameters()):
        if name.endswith("A_log"):
            w = mx.log(mx.random.uniform(1.0, 16.0, p.shape))
        elif name.endswith("dt_bias"):
            w = 0.1 * mx.random.normal(p.shape)
        elif p.ndim == 1:
            w = mx.ones(p.shape, dtype=mx.bfloat16)
        else:
            w = (mx.random.normal(p.shape) * p.shape[-1] ** -0.5).astype(mx.bfloat16)
        weights.append((name, w))
    layer.load_weights(weights)
    if quantize:
        nn.quantize(layer, group_size=64, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear)
                    and m.weight.shape[-1] % 64 == 0)
    mx.eval(layer.parameters())

    def cache():
        c = KDACache()
        c.conv = [(0.5 * mx.random.normal((B, 3, H * D))).astype(mx.bfloat16) for _ in range(3)]
        c.recurrent = 0.1 * mx.random.normal((B, H, D, D))
        c.offset = context
        mx.eval(c.conv, c.recurrent)
        return c

    return layer, cache


def section_layer(res, H, D, hidden, inter, batches, repeats, emulator: bool):
    from bench_gpu import count_ops

    rows = []
    for B in batches:
        layer, make_cache = build_layer(H, D, hidden, inter, B, 1024, quantize=not emulator)
        x = (0.5 * mx.random.normal((B, 1, hidden))).astype(mx.bfloat16)
        mx.eval(x)
        for on in (False, True):
            with kernels(on):
                for path in ("eager", "compiled", "compiled-split") if on else ("eager", "compiled"):
                    if path == "compiled" and on and emulator:
                        continue  # the emulator evaluates on the host: it cannot run inside a trace
                    decode_mod.set_decode_path(path.split("-")[0])
                    decode_mod.KERNEL_IN_TRACE = path != "compiled-split"
                    try:
                        c = make_cache()
                        step = lambda: layer(x, None, c)  # noqa: E731  (advances c: cost does not depend on it)
                        ms = timed(step, repeats)
                        row = {"B": B, "kernel": on, "path": path, "ms": ms}
                        if path != "eager":  # which traces the layer holds (None: a trace that failed)
                            row["traces"] = {k[0]: f is not None for k, f in layer.__dict__.get("_decode_fns", {}).items()
                                             if k[1] == x.shape}
                        if path == "eager":
                            row["graph_nodes"], row["kernel_nodes"] = count_ops(layer(x, None, make_cache()))
                        rows.append(row)
                        say("  layer step", json.dumps(row))
                    except Exception as e:
                        rows.append({"B": B, "kernel": on, "path": path, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                        say("  layer step FAILED", rows[-1])
                    finally:
                        decode_mod.set_decode_path(None)
                        decode_mod.KERNEL_IN_TRACE = True
        # The two paths agree (same cache, same input): the ops step is the reference.
        c_ops = make_cache()
        c_k = KDACache()
        c_k.conv, c_k.recurrent, c_k.offset = list(c_ops.conv), c_ops.recurrent, c_ops.offset
        outs = []
        for on, c in ((False, c_ops), (True, c_k)):
            with kernels(on):
                outs.append(layer(x, None, c).astype(mx.float32))
        rows.append({"B": B, "agreement_rel_err": relative_error(outs[1], outs[0]),
                     "state_rel_err": relative_error(c_k.recurrent, c_ops.recurrent)})
        say("  layer step kernel vs ops:", rows[-1])
    res["layer"] = rows


def section_prefill(res, H, D, sizes, repeats):
    kern = metal._current()[1]
    rng = np.random.default_rng(1)
    rows = []
    for T in sizes:
        dtype = mx.bfloat16
        args = recurrence_inputs(rng, 1, T, H, D, dtype)
        mx.eval(args)
        ref = kda_chunked(*args)
        routes = {"chunked ops": lambda: kda_chunked(*args), "kernel: kda_decode over T": lambda: kern.decode(*args)}
        for name, fn in routes.items():
            try:
                ms = timed(fn, repeats, warmup=1)
                out = fn()
                rows.append({"route": name, "T": T, "dtype": str(dtype), "ms": ms, "tok_s": T / ms * 1e3,
                             "rel_err_vs_chunked": relative_error(out[0], ref[0])})
            except Exception as e:
                rows.append({"route": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            say("  prefill", json.dumps(rows[-1], default=str))
    res["prefill"] = rows


def section_model(res, deadline: Deadline, tiny: bool):
    import bench_gpu as bg

    base = bg.TINY_CONFIG if tiny else json.loads(FULL_CONFIG.read_text())
    config = bg.quantized_config(base)
    t0 = time.perf_counter()
    theirs, ours, weights = bg.build_models(config)
    del weights, theirs
    say(f"  model built in {time.perf_counter() - t0:.1f} s")
    rows = []
    ctx = 64 if tiny else 1024
    for rnd_ in range(2):
        for on in ((False, True) if rnd_ == 0 else (True, False)):
            if deadline.left() < 25:
                break
            metal.set_kernel_mode(None if on else "ops")  # auto: the Layer kernel once its self-check passed
            try:
                c_ours, _ = bg.planted_caches(config, ctx, seed=rnd_)
                prof = bg.step_profile("ours", ours, c_ours, repeats=5)
                c_ours, _ = bg.planted_caches(config, ctx, seed=rnd_)
                tps = bg.decode_run("ours", ours, c_ours, 8 if tiny else 32)
                rows.append({"run": rnd_, "kernels": "auto" if on else "ops", "tok_s": tps, **prof})
            except Exception as e:
                rows.append({"run": rnd_, "kernels": "auto" if on else "ops", "error": f"{type(e).__name__}: {e}"[:300]})
            finally:
                metal.set_kernel_mode(None)
            say("  model", json.dumps(rows[-1], default=str))
    res["model"] = rows


def print_table(res) -> None:
    say("\n== check_kernels_mlx: " + res["device"] + f", backend {res['backend']}, mlx {res['mlx']}")
    say("| check | B | dtype | rel err o | rel err state | note |")
    say("| --- | --- | --- | --- | --- | --- |")
    for r in res.get("check", []):
        if r["what"] == "runtime self-check":
            say(f"| runtime self-check | | {r['dtype']} | | | kda_metal: {r['kda_metal']}; layer: {r['layer']} |")
        elif "error" in r:
            say(f"| {r['what']} | {r['B']} | {r['dtype']} | | | {r['error']} |")
        else:
            say(f"| {r['what']} | {r['B']} | {r['dtype']} | {r['o']:.2e} | {r['state']:.2e} | "
                f"{'windows equal' if r.get('windows_equal') else ''} |")
    say("| layer decode step | B | path | ms | graph nodes (kernels), or traces held |")
    say("| --- | --- | --- | --- | --- |")
    for r in res.get("layer", []):
        if "agreement_rel_err" in r:
            say(f"| kernel vs ops output | {r['B']} | | rel err {r['agreement_rel_err']:.2e} | |")
        elif "error" in r:
            say(f"| {'kernel' if r['kernel'] else 'ops'} | {r['B']} | {r['path']} | {r['error']} | |")
        else:
            nodes = f"{r['graph_nodes']} ({r['kernel_nodes']})" if "graph_nodes" in r else str(r.get("traces", ""))
            say(f"| {'kernel' if r['kernel'] else 'ops'} | {r['B']} | {r['path']} | {r['ms']:.3f} | {nodes} |")
    say("| prefill (KDA only, one layer, B=1) | T | ms | tok/s | rel err vs chunked |")
    say("| --- | --- | --- | --- | --- |")
    for r in res.get("prefill", []):
        if "error" in r:
            say(f"| {r['route']} | | {r['error']} | | |")
        else:
            say(f"| {r['route']} | {r['T']} | {r['ms']:.1f} | {r['tok_s']:.0f} | {r['rel_err_vs_chunked']:.2e} |")
    if res.get("model"):
        say("| model decode (1k ctx) | kernels | tok/s | step ms | host build ms | nodes (kernels) |")
        say("| --- | --- | --- | --- | --- | --- |")
        for r in res["model"]:
            if "error" in r:
                say(f"| run {r['run']} | {r['kernels']} | {r['error']} | | | |")
            else:
                say(f"| run {r['run']} | {r['kernels']} | {r['tok_s']:.1f} | {r['step_ms']:.2f} | "
                    f"{r['host_build_ms']:.2f} | {r['graph_nodes']} ({r['kernel_nodes']}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes (for a dry run)")
    ap.add_argument("--emulator", action="store_true", help="kernels on the CPU emulator (implies --tiny)")
    ap.add_argument("--budget", type=float, default=230.0, help="seconds this call may take in all")
    ap.add_argument("--only", default="check,layer,prefill,model")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tiny = a.tiny or a.emulator
    deadline = Deadline(a.budget)
    sections = set(a.only.split(","))
    out_dir = Path(a.out or os.environ.get("OUT", str(ROOT / "bench" / "gpu")))
    if a.emulator:
        sys.path.insert(0, str(ROOT / "tests"))
        from metal_emu import emulate

        metal._use_backend(metal.MetalKDA(emulate.kernel_factory("free")), available=True)
    H, D = (2, 32) if tiny else (32, 128)
    hidden, inter = (256, 512) if tiny else (2304, 9216)
    res = {"device": str(mx.default_device()), "mlx": mx.__version__, "backend": metal.kernel_backend(),
           "H": H, "D": D, "budget_s": a.budget, "env": {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "KIMI_MLX_"))}}
    say(f"device {res['device']}, kernel backend {res['backend']}, mlx {res['mlx']}")
    if res["backend"] is None:
        raise SystemExit("no GPU as the default device (use --emulator on the CPU)")

    def save():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "check_kernels_mlx.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / "check_kernels_mlx.log").write_text("\n".join(LOG) + "\n")

    plan = [("check", lambda: section_check(res, H, D, (1, 2) if tiny else (1, 8), a.emulator), 20),
            ("layer", lambda: section_layer(res, H, D, hidden, inter, (1, 2) if tiny else (1, 8), 3 if tiny else 20,
                                            a.emulator), 20),
            ("prefill", lambda: section_prefill(res, H, D, (200,) if tiny else (512, 2048, 4096), 2 if tiny else 3), 15),
            ("model", lambda: section_model(res, deadline, tiny), 60)]
    for name, fn, need in plan:
        if name not in sections:
            continue
        if deadline.left() < need:
            say(f"[{name}] skipped: {deadline.left():.0f} s left")
            continue
        t0 = time.perf_counter()
        say(f"[{name}]")
        try:
            fn()
        except Exception:
            res[name + "_error"] = traceback.format_exc()[-2000:]
            say(res[name + "_error"])
        res.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        say(f"[{name}] {res['section_s'][name]} s, {deadline.left():.0f} s left")
        save()
    print_table(res)
    save()


if __name__ == "__main__":
    main()
